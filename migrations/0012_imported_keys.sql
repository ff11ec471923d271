-- Issue 16: adopting an nsc store (and later pb-nats) keeps the accounts' existing keys.
--
-- 1. An imported account key may come without its seed (the keys directory did not hold it):
--    the key stays listed in the account JWT (its users' JWTs keep verifying), but the service
--    never signs with it. Every imported account also gets a signing key of the service's own,
--    with a seed, newer than the imported ones: that is what the callout and activations use.
ALTER TABLE nats.account_keys ALTER COLUMN seed DROP NOT NULL;

-- 2. User JWTs the account JWT revokes (`revocations`: a user's public key, or `*`, and the
--    time before which its JWTs are refused). Service-owned: written by the import (the nsc
--    account JWT's own list) and when a user with a public nkey is deleted, so a JWT issued
--    before the service existed (an nsc `.creds` file) stays refused. Deactivated users are
--    added by the sync itself (their row's `updated_at`), and leave the list when reactivated.
CREATE TABLE nats.account_revocations (
  account_id bigint NOT NULL REFERENCES nats.accounts(id) ON DELETE CASCADE,
  public_key text NOT NULL CONSTRAINT revocation_key_format
    CHECK (public_key ~ '^U[A-Z2-7]{55}$' OR public_key = '*'),
  revoked_before bigint NOT NULL CONSTRAINT revocation_time_positive CHECK (revoked_before > 0),
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (account_id, public_key)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON nats.account_revocations TO nats_pg_auth_service;
GRANT SELECT ON nats.account_revocations TO nats_pg_auth_admin;

CREATE FUNCTION nats.revocations_changed() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  acc bigint;
BEGIN
  FOR acc IN SELECT DISTINCT x FROM unnest(ARRAY[OLD.account_id, NEW.account_id]) AS x WHERE x IS NOT NULL LOOP
    IF EXISTS (SELECT 1 FROM nats.accounts WHERE id = acc) THEN
      PERFORM nats.enqueue_account_sync(acc, 'revocations changed');
    END IF;
  END LOOP;
  RETURN NULL;
END $$;
CREATE TRIGGER account_revocations_sync AFTER INSERT OR UPDATE OR DELETE ON nats.account_revocations
  FOR EACH ROW EXECUTE FUNCTION nats.revocations_changed();

-- A user bound to a public nkey is in its account JWT's revocations while inactive: a change of
-- `active` (or of the key, or of the account) re-pushes the account. Deleting such a user
-- revokes its key for good (a deleted row must not bring an old JWT back to life).
CREATE FUNCTION nats.user_revocation_changed() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    IF OLD.nkey IS NOT NULL AND EXISTS (SELECT 1 FROM nats.accounts WHERE id = OLD.account_id) THEN
      INSERT INTO nats.account_revocations (account_id, public_key, revoked_before)
      VALUES (OLD.account_id, OLD.nkey, ceil(extract(epoch FROM clock_timestamp()))::bigint)
      ON CONFLICT (account_id, public_key)
        DO UPDATE SET revoked_before = greatest(nats.account_revocations.revoked_before, EXCLUDED.revoked_before);
    END IF;
    RETURN NULL;
  END IF;
  IF (OLD.nkey IS NOT NULL OR NEW.nkey IS NOT NULL)
     AND (OLD.active IS DISTINCT FROM NEW.active OR OLD.nkey IS DISTINCT FROM NEW.nkey
          OR OLD.account_id IS DISTINCT FROM NEW.account_id) THEN
    PERFORM nats.enqueue_account_sync(OLD.account_id, 'user revocation changed');
    IF NEW.account_id <> OLD.account_id THEN
      PERFORM nats.enqueue_account_sync(NEW.account_id, 'user revocation changed');
    END IF;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER users_revocation_sync AFTER UPDATE OR DELETE ON nats.users
  FOR EACH ROW EXECUTE FUNCTION nats.user_revocation_changed();

-- Trigger functions: nobody calls them (0009 made EXECUTE not PUBLIC by default for the migrating
-- role; said again here for a schema migrated by another role).
REVOKE EXECUTE ON FUNCTION nats.revocations_changed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION nats.user_revocation_changed() FROM PUBLIC;
