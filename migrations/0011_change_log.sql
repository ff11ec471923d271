-- A durable change log for the login copy (issue 15, finding 1). Anyone connected to the
-- database may NOTIFY on any channel (it cannot be revoked), so a notification's payload proves
-- nothing: a tenant admin could name another tenant's user (whose logins then read Postgres,
-- and are refused while that tenant admin holds a lock on nats.users) or send garbage (which
-- made every replica reload its whole copy). From now on the triggers that notify the copy also
-- write the scope they notify to nats.changes, and the copy reads its scopes from there only:
-- a notification is a wake-up, whoever sends it, and costs one indexed query of this table.
--
-- Nobody but the owner of the trigger functions writes the table (they run as their owner);
-- the service may read it, log a scope through nats.log_change (record_synced) and prune it.
-- Tenants and admins have no privilege on it: they cannot read other tenants' ids from it nor
-- LOCK it, so no lock of theirs holds back the copy's read of the log.
--
-- Rows are found by the transaction that wrote them (xid), not by id: ids are taken at insert
-- and commit out of order. The copy remembers the snapshot of its previous read and selects
-- the rows its new statement sees that the previous snapshot did not (src/db/changes.rs).
-- The payloads stay as they were, so a binary of the previous release keeps working during a
-- rolling upgrade.

CREATE TABLE nats.changes (
  id    bigserial PRIMARY KEY,
  xid   xid8 NOT NULL DEFAULT pg_current_xact_id(),
  -- 'user:<id>', 'role:<id>', 'account:<id>', 'token:<user id>', 'certificate:<user id>'
  scope text NOT NULL CHECK (scope ~ '^(user|role|account|token|certificate):[0-9]+$'),
  at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX changes_xid ON nats.changes (xid);
COMMENT ON TABLE nats.changes IS
  'Changes the login copy re-reads (written by triggers; read, logged and pruned by the service).';

REVOKE ALL ON nats.changes FROM PUBLIC;
REVOKE ALL ON SEQUENCE nats.changes_id_seq FROM PUBLIC;
GRANT SELECT, DELETE ON nats.changes TO nats_pg_auth_service;

-- Logs one scope. Runs as its owner: the trigger functions below call it as their owner too.
CREATE FUNCTION nats.log_change(p_scope text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  INSERT INTO nats.changes (scope) VALUES (p_scope);
$$;
REVOKE EXECUTE ON FUNCTION nats.log_change(text) FROM PUBLIC;
-- The service logs an account whose signing key reached the server (record_synced).
GRANT EXECUTE ON FUNCTION nats.log_change(text) TO nats_pg_auth_service;

-- Users, roles, tokens. Now SECURITY DEFINER: it writes nats.changes, which its callers (admins,
-- tenants) may not.
CREATE OR REPLACE FUNCTION nats.notify_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  rec record := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
  payload text;
BEGIN
  IF TG_TABLE_NAME = 'user_tokens' THEN
    -- last_used_at is bookkeeping written at login; it must not look like a revocation.
    IF TG_OP = 'UPDATE' AND NEW.revoked_at IS NOT DISTINCT FROM OLD.revoked_at
       AND NEW.expires_at IS NOT DISTINCT FROM OLD.expires_at
       AND NEW.user_id = OLD.user_id AND NEW.token_sha256 = OLD.token_sha256 THEN
      RETURN NULL;
    END IF;
    payload := 'token:' || rec.user_id;
    IF TG_OP = 'UPDATE' AND NEW.user_id <> OLD.user_id THEN
      PERFORM nats.log_change('token:' || OLD.user_id);
      PERFORM pg_notify('nats_pg_auth_change', 'token:' || OLD.user_id);
    END IF;
  ELSIF TG_TABLE_NAME = 'users' THEN
    payload := 'user:' || rec.id;
  ELSE
    payload := 'role:' || rec.id;
  END IF;
  PERFORM nats.log_change(payload);
  PERFORM pg_notify('nats_pg_auth_change', payload);
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION nats.accounts_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    PERFORM nats.enqueue_account_sync(NEW.id, 'account inserted');
    PERFORM nats.log_change('account:' || NEW.id);
    PERFORM pg_notify('nats_pg_auth_change', 'account:' || NEW.id);
  ELSIF TG_OP = 'UPDATE' THEN
    IF nats.account_admin_view(NEW) IS DISTINCT FROM nats.account_admin_view(OLD) THEN
      PERFORM nats.enqueue_account_sync(NEW.id, 'account updated');
      PERFORM nats.log_change('account:' || NEW.id);
      PERFORM pg_notify('nats_pg_auth_change', 'account:' || NEW.id);
    END IF;
  ELSE
    IF OLD.public_key IS NOT NULL THEN
      INSERT INTO nats.sync_outbox (account_id, account_public_key, op, reason)
      VALUES (OLD.id, OLD.public_key, 'delete', 'account deleted');
      PERFORM pg_notify('nats_pg_auth_sync', OLD.id::text);
    END IF;
    PERFORM nats.log_change('account:' || OLD.id);
    PERFORM pg_notify('nats_pg_auth_change', 'account:' || OLD.id);
  END IF;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION nats.user_certificates_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  req bigint;
BEGIN
  IF TG_OP = 'UPDATE' AND NEW.user_id = OLD.user_id
     AND NEW.fingerprint_sha256 IS NOT DISTINCT FROM OLD.fingerprint_sha256
     AND NEW.subject_dn IS NOT DISTINCT FROM OLD.subject_dn
     AND NEW.san IS NOT DISTINCT FROM OLD.san THEN
    RETURN NULL;   -- description only
  END IF;
  IF TG_OP <> 'DELETE' THEN
    PERFORM nats.log_change('certificate:' || NEW.user_id);
    PERFORM pg_notify('nats_pg_auth_change', 'certificate:' || NEW.user_id);
  END IF;
  IF TG_OP <> 'INSERT' THEN
    IF TG_OP = 'DELETE' OR NEW.user_id <> OLD.user_id THEN
      PERFORM nats.log_change('certificate:' || OLD.user_id);
      PERFORM pg_notify('nats_pg_auth_change', 'certificate:' || OLD.user_id);
    END IF;
    INSERT INTO nats.kick_requests (user_id) VALUES (OLD.user_id) RETURNING id INTO req;
    PERFORM pg_notify('nats_pg_auth_kick', req::text);
  END IF;
  RETURN NULL;
END $$;

-- The copy used to treat every nats_pg_auth_sync notification as a change of that account (its
-- signing key, its exports and imports): the account scope is logged wherever it is sent for an
-- account's sake.
CREATE OR REPLACE FUNCTION nats.enqueue_account_sync(p_account_id bigint, p_reason text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_account_id IS NULL THEN RETURN; END IF;
  UPDATE nats.sync_outbox SET bulk = false, reason = p_reason
   WHERE account_id = p_account_id AND op = 'upsert' AND attempts = 0 AND bulk;
  IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM nats.sync_outbox
                  WHERE account_id = p_account_id AND op = 'upsert' AND attempts = 0) THEN
    INSERT INTO nats.sync_outbox (account_id, op, reason) VALUES (p_account_id, 'upsert', p_reason);
  END IF;
  PERFORM nats.log_change('account:' || p_account_id);
  PERFORM pg_notify('nats_pg_auth_sync', p_account_id::text);
END $$;

CREATE OR REPLACE FUNCTION nats.account_keys_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  acc bigint;
  own boolean := coalesce(current_setting('nats_pg_auth.sync_writes', true), '') = 'on';
BEGIN
  FOR acc IN SELECT nats.owning_accounts(OLD.account_id, NEW.account_id) LOOP
    -- Skip when the account itself is being deleted (cascade): its delete row does the work.
    IF EXISTS (SELECT 1 FROM nats.accounts WHERE id = acc) THEN
      IF own THEN
        PERFORM nats.log_change('account:' || acc);
        PERFORM pg_notify('nats_pg_auth_sync', acc::text);
      ELSE
        PERFORM nats.enqueue_account_sync(acc, 'signing keys changed');
      END IF;
    END IF;
  END LOOP;
  RETURN NULL;
END $$;
