-- Two fixes to how pushes are queued, found with the load tool (10,000 accounts inserted at once,
-- then one UPDATE: the UPDATE waited 7-9 s for its push).

-- 1. The sync writes account_keys itself (a new account's first keys, rotations) and pushes the
--    account in the same step. Those writes queued a second, redundant push of the account:
--    every new account was pushed twice. The sync now marks its own transactions with
--    `SET LOCAL nats_pg_auth.sync_writes = 'on'`; the trigger still notifies (login caches must
--    hear about retired keys at once) but queues nothing.
CREATE OR REPLACE FUNCTION nats.account_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  acc bigint;
  own boolean := coalesce(current_setting('nats_pg_auth.sync_writes', true), '') = 'on';
BEGIN
  FOR acc IN SELECT nats.owning_accounts(OLD.account_id, NEW.account_id) LOOP
    -- Skip when the account itself is being deleted (cascade): its delete row does the work.
    IF EXISTS (SELECT 1 FROM nats.accounts WHERE id = acc) THEN
      IF own THEN
        PERFORM pg_notify('nats_pg_auth_sync', acc::text);
      ELSE
        PERFORM nats.enqueue_account_sync(acc, 'signing keys changed');
      END IF;
    END IF;
  END LOOP;
  RETURN NULL;
END $$;

-- 2. Re-pushing every account (a new sync leader, a reconnect to NATS) is bulk work that may
--    take many seconds; a change an admin just made must not wait behind it. Bulk rows are
--    marked and claimed after every other due row; a change to an account that already has a
--    pending bulk row turns that row into a normal one.
ALTER TABLE nats.sync_outbox ADD COLUMN bulk boolean NOT NULL DEFAULT false;

CREATE OR REPLACE FUNCTION nats.enqueue_account_sync(p_account_id bigint, p_reason text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  IF p_account_id IS NULL THEN RETURN; END IF;
  UPDATE nats.sync_outbox SET bulk = false, reason = p_reason
   WHERE account_id = p_account_id AND op = 'upsert' AND attempts = 0 AND bulk;
  IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM nats.sync_outbox
                  WHERE account_id = p_account_id AND op = 'upsert' AND attempts = 0) THEN
    INSERT INTO nats.sync_outbox (account_id, op, reason) VALUES (p_account_id, 'upsert', p_reason);
  END IF;
  PERFORM pg_notify('nats_pg_auth_sync', p_account_id::text);
END $$;

-- The order the sync claims rows in.
CREATE INDEX sync_outbox_order ON nats.sync_outbox (bulk, id);
