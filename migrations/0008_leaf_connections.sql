-- Leaf node connections admitted by the callout (issue 11). A leaf connection is not in CONNZ,
-- and LEAFZ names no user, so the kicks of src/sessions.rs could not find the leaf connections
-- of a deactivated user. The callout records each leaf login it admits here (asynchronously:
-- a Postgres outage never delays a login), and the kicks close the recorded connections of
-- their targets after LEAFZ confirms the connection still exists in that account.
--
-- Service-owned: written and cleaned up by the service only. A server's id changes on every
-- restart and a connection id (cid) is never reused within one server run, so
-- (server_id, cid) names one connection for good. Rows are deleted when LEAFZ no longer shows
-- the connection, and once the JWT they were admitted with has expired (the server closes the
-- connection then).
CREATE TABLE nats.leaf_connections (
  server_id text NOT NULL,
  cid bigint NOT NULL,
  -- Not foreign keys: the row must outlive the user or account it names until the kick that
  -- a deletion triggers has run.
  account_key text NOT NULL,
  username text NOT NULL,
  -- The server's clock at the authorization request (its `iat`), so a re-scan tells a login
  -- that was in flight during the first scan from a reconnect after it (see src/sessions.rs).
  requested_at timestamptz NOT NULL,
  expires_at timestamptz NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (server_id, cid)
);
CREATE INDEX leaf_connections_target ON nats.leaf_connections (account_key, username);
CREATE INDEX leaf_connections_expiry ON nats.leaf_connections (expires_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON nats.leaf_connections TO nats_pg_auth_service;
GRANT SELECT ON nats.leaf_connections TO nats_pg_auth_admin;
