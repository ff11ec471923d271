-- Kicks are not lost: a change that should close live connections is kept as a row until the
-- sync leader has carried it out, instead of a NOTIFY that nobody hears while no replica leads.
-- NOTIFY nats_pg_auth_kick (payload: the row id) only wakes the leader; the leader reads the
-- table in id order on start, on every wake-up and every few seconds, and deletes a row after
-- it scanned CONNZ and kicked (and re-scanned once after the auth timeout, see
-- src/sessions.rs). Service-owned: readable by admins, never written by them (the trigger
-- function runs with its owner's rights, so admins need no privilege on this table).
CREATE TABLE nats.kick_requests (
  id           bigserial PRIMARY KEY,
  requested_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  -- exactly one shape: a user (account_id + username), a role, or a token owner (user_id)
  account_id   bigint,
  username     text,
  role_id      bigint,
  user_id      bigint,
  CONSTRAINT kick_requests_one_target CHECK (
    (account_id IS NOT NULL AND username IS NOT NULL AND role_id IS NULL AND user_id IS NULL)
    OR (account_id IS NULL AND username IS NULL AND role_id IS NOT NULL AND user_id IS NULL)
    OR (account_id IS NULL AND username IS NULL AND role_id IS NULL AND user_id IS NOT NULL))
);

CREATE OR REPLACE FUNCTION nats.kick_on_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  ignore text[] := ARRAY['description', 'updated_at', 'created_at', 'last_used_at'];
  req bigint;
BEGIN
  IF TG_OP = 'UPDATE' AND (to_jsonb(NEW) - ignore) = (to_jsonb(OLD) - ignore) THEN
    RETURN NULL;
  END IF;
  IF TG_TABLE_NAME = 'users' THEN
    INSERT INTO nats.kick_requests (account_id, username) VALUES (OLD.account_id, OLD.username)
      RETURNING id INTO req;
  ELSIF TG_TABLE_NAME = 'roles' THEN
    INSERT INTO nats.kick_requests (role_id) VALUES (OLD.id) RETURNING id INTO req;
  ELSIF TG_TABLE_NAME = 'user_tokens' THEN
    IF TG_OP = 'DELETE' OR NEW.revoked_at IS DISTINCT FROM OLD.revoked_at
       OR NEW.expires_at IS DISTINCT FROM OLD.expires_at THEN
      INSERT INTO nats.kick_requests (user_id) VALUES (OLD.user_id) RETURNING id INTO req;
    END IF;
  END IF;
  IF req IS NOT NULL THEN
    PERFORM pg_notify('nats_pg_auth_kick', req::text);
  END IF;
  RETURN NULL;
END $$;
