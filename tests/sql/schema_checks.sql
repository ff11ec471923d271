-- Proves the checks and triggers of migrations/ (0001, the row bounds of 0004), the roles of
-- 0005 and the nkey/certificate columns of 0007. Needs a FRESH database with every migration
-- applied (it inserts rows and stops if nats.accounts is not empty), by a role that may create
-- roles:
--
--   URL=$(scripts/pg.sh start /tmp/pgdev 55432)            # or any Postgres >= 15
--   psql "$URL" -c 'CREATE DATABASE schema_checks'
--   DB=${URL%/*}/schema_checks
--   for f in migrations/*.sql; do psql "$DB" -v ON_ERROR_STOP=1 -f "$f"; done
--   psql "$DB" -v ON_ERROR_STOP=1 -f tests/sql/schema_checks.sql
--
-- Every rejected statement is printed with the error an admin would see. Any surprise stops the
-- script with "FAIL: ..." and a non-zero exit. Notifications are checked through a second
-- session (dblink, part of Postgres' contrib like pgcrypto) that LISTENs to both channels.
-- Statements run in autocommit mode on purpose: NOTIFY is delivered at commit.

\set ON_ERROR_STOP 1
\set QUIET 1
\o /dev/null
SET client_min_messages = notice;

DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM nats.accounts) THEN
    RAISE EXCEPTION 'FAIL: schema_checks.sql needs a fresh database (nats.accounts is not empty)';
  END IF;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Helpers (session-local, in pg_temp)
-- ---------------------------------------------------------------------------------------------

-- Runs stmt, which must fail with a message containing every fragment.
CREATE FUNCTION pg_temp.expect_error(stmt text, VARIADIC fragments text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  msg text;
  hint text;
  f text;
BEGIN
  BEGIN
    EXECUTE stmt;
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    FOREACH f IN ARRAY fragments LOOP
      IF position(f IN msg) = 0 THEN
        RAISE EXCEPTION 'FAIL: % -- failed as expected, but the message lacks "%": %', stmt, f, msg;
      END IF;
    END LOOP;
    RAISE NOTICE E'rejected: %\n      error: %', stmt,
      msg || coalesce(E'\n      hint:  ' || nullif(hint, ''), '');
    RETURN;
  END;
  RAISE EXCEPTION 'FAIL: expected an error from: %', stmt;
END $$;

CREATE FUNCTION pg_temp.expect(ok boolean, what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF ok IS NOT TRUE THEN RAISE EXCEPTION 'FAIL: %', what; END IF;
  RAISE NOTICE 'ok: %', what;
END $$;

CREATE FUNCTION pg_temp.outbox(p_account text) RETURNS bigint LANGUAGE sql AS $$
  SELECT count(*) FROM nats.sync_outbox o JOIN nats.accounts a ON a.id = o.account_id
   WHERE a.name = p_account AND o.op = 'upsert'
$$;

CREATE FUNCTION pg_temp.acc(p_name text) RETURNS bigint LANGUAGE sql AS $$
  SELECT id FROM nats.accounts WHERE name = p_name
$$;

-- The listener session.
CREATE EXTENSION IF NOT EXISTS dblink;
SELECT dblink_connect('listener', format('host=%s port=%s dbname=%s user=%s',
  coalesce(host(inet_server_addr()), split_part(current_setting('unix_socket_directories'), ',', 1)),
  current_setting('port'), current_database(), current_user));
SELECT dblink_exec('listener', 'LISTEN nats_pg_auth_change');
SELECT dblink_exec('listener', 'LISTEN nats_pg_auth_sync');

-- Forgets every notification sent so far. Delivery to the listener is asynchronous (and slow
-- on a loaded machine): wait until nothing more arrives for a while.
CREATE FUNCTION pg_temp.drain_notifications() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  quiet int := 0;
BEGIN
  WHILE quiet < 3 LOOP
    PERFORM pg_sleep(0.05);
    IF EXISTS (SELECT 1 FROM dblink_get_notify('listener')) THEN quiet := 0; ELSE quiet := quiet + 1; END IF;
  END LOOP;
END $$;

-- Notifications received since the last call must be exactly `expected` (as a set: Postgres
-- folds identical notifications of one transaction into one). Entries are 'channel payload'.
CREATE FUNCTION pg_temp.expect_notifications(what text, expected text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  got text[] := '{}';
  want text[] := ARRAY(SELECT DISTINCT x FROM unnest(expected) x ORDER BY 1);
BEGIN
  -- Delivery to the other session is asynchronous: poll until everything expected arrived,
  -- then once more to catch extras.
  FOR i IN 1..40 LOOP
    PERFORM pg_sleep(0.05);
    got := got || ARRAY(SELECT notify_name || ' ' || extra FROM dblink_get_notify('listener'));
    EXIT WHEN got @> want AND i > 2;
  END LOOP;
  got := ARRAY(SELECT DISTINCT x FROM unnest(got) x ORDER BY 1);
  IF got IS DISTINCT FROM want THEN
    RAISE EXCEPTION 'FAIL: %: expected notifications %, got %', what, want, got;
  END IF;
  RAISE NOTICE 'ok: % -> notifications %', what, got;
END $$;

-- ---------------------------------------------------------------------------------------------
\echo '== 1. The design.md §3 example session, verbatim'
-- ---------------------------------------------------------------------------------------------
INSERT INTO nats.accounts (name, max_connections) VALUES ('acme', 100);
INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
  SELECT id, 'sensor', '{sensors.>}', '{sensors.>,_INBOX.>}' FROM nats.accounts WHERE name = 'acme';
INSERT INTO nats.users (account_id, role_id, username, password_hash)
  SELECT a.id, r.id, 'alice', crypt('s3cret', gen_salt('bf', 10))
  FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id WHERE a.name = 'acme';

SELECT pg_temp.expect((SELECT password_hash = crypt('s3cret', password_hash) FROM nats.users WHERE username = 'alice'),
                      'alice''s bcrypt hash verifies');
SELECT pg_temp.expect(pg_temp.outbox('acme') = 1, 'the account insert queued exactly one upsert');
SELECT pg_temp.expect((SELECT reason FROM nats.sync_outbox) = 'account inserted', 'reason is "account inserted"');
SELECT pg_temp.expect_notifications('example session', ARRAY[
  'nats_pg_auth_sync ' || pg_temp.acc('acme'),
  'nats_pg_auth_change account:' || pg_temp.acc('acme'),
  'nats_pg_auth_change role:' || (SELECT id FROM nats.roles WHERE name = 'sensor'),
  'nats_pg_auth_change user:' || (SELECT id FROM nats.users WHERE username = 'alice')]);

-- A second tenant for the cross-account cases.
INSERT INTO nats.accounts (name) VALUES ('beta');
INSERT INTO nats.roles (account_id, name) SELECT id, 'beta-role' FROM nats.accounts WHERE name = 'beta';
INSERT INTO nats.roles (account_id, name, subscribe_permissions) VALUES (NULL, 'global-reader', '{"jobs.* workers",_INBOX.>}');
INSERT INTO nats.users (account_id, username, password_hash)
  SELECT id, 'bob', NULL FROM nats.accounts WHERE name = 'beta';  -- token-only user

-- ---------------------------------------------------------------------------------------------
\echo '== 2. Bad rows fail with a message that says what is wrong'
-- ---------------------------------------------------------------------------------------------
SELECT pg_temp.expect_error($$UPDATE nats.roles SET publish_permissions = '{sensors.>,foo..bar}' WHERE name = 'sensor'$$,
  'role "sensor"', '"foo..bar"', 'empty token', 'publish_permissions_are_subjects');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET subscribe_permissions = '{a.>.b}' WHERE name = 'sensor'$$,
  '"a.>.b"', '">" must be the last token', 'subscribe_permissions_are_subjects');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET publish_deny_permissions = '{foo*}' WHERE name = 'sensor'$$,
  'must be whole tokens', 'publish_deny_permissions_are_subjects');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET subscribe_deny_permissions = '{"a.b q r"}' WHERE name = 'sensor'$$,
  'only one space', 'subscribe_deny_permissions_are_subjects');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET subscribe_permissions = ARRAY['a.b', NULL] WHERE name = 'sensor'$$,
  'entry NULL', 'subscribe_permissions_are_subjects');
SELECT pg_temp.expect_error($$UPDATE nats.users SET publish_permissions = '{"sensors.* q"}' WHERE username = 'alice'$$,
  'user "alice"', 'only allowed in subscribe permissions', 'user_publish_permissions_are_subjects');
SELECT pg_temp.expect_error($$UPDATE nats.users SET subscribe_permissions = '{"jobs.> bad..queue"}' WHERE username = 'alice'$$,
  'queue name', 'user_subscribe_permissions_are_subjects');
SELECT pg_temp.expect_error($$UPDATE nats.users SET subscribe_deny_permissions = '{""}' WHERE username = 'alice'$$,
  'empty', 'user_subscribe_deny_permissions_are_subjects');
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET max_connections = -2 WHERE name = 'acme'$$,
  'max_connections_at_least_minus_one');
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET max_jetstream_disk_storage = -3 WHERE name = 'acme'$$,
  'max_jetstream_disk_storage_at_least_minus_one');
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET user_jwt_ttl = '0 seconds' WHERE name = 'acme'$$,
  'user_jwt_ttl_positive');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET max_payload = -5 WHERE name = 'sensor'$$,
  'role_max_payload_at_least_minus_one');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET allow_response_max = -2 WHERE name = 'sensor'$$,
  'allow_response_max_at_least_minus_one');
SELECT pg_temp.expect_error($$UPDATE nats.users SET max_data = -2 WHERE username = 'alice'$$,
  'user_max_data_at_least_minus_one');
SELECT pg_temp.expect_error($$INSERT INTO nats.accounts (name) VALUES ('bad name with spaces')$$,
  'account_name_format');
SELECT pg_temp.expect_error($$INSERT INTO nats.accounts (name) VALUES ('acme')$$,
  'accounts_name_key');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET allowed_connection_types = '{STANDARD,CARRIER_PIGEON}' WHERE name = 'sensor'$$,
  'allowed_connection_types_known');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET allowed_sources = ARRAY['10.0.0.0/8', NULL]::cidr[] WHERE name = 'sensor'$$,
  'allowed_sources_no_nulls');
SELECT pg_temp.expect_error($$INSERT INTO nats.roles (account_id, name) SELECT id, 'sensor' FROM nats.accounts WHERE name = 'acme'$$,
  'role_name_unique_per_account');
SELECT pg_temp.expect_error($$INSERT INTO nats.roles (account_id, name) VALUES (NULL, 'global-reader')$$,
  'role_name_unique_per_account');

-- Roles across accounts.
SELECT pg_temp.expect_error($$INSERT INTO nats.users (account_id, role_id, username)
    SELECT a.id, r.id, 'mallory' FROM nats.accounts a, nats.roles r WHERE a.name = 'beta' AND r.name = 'sensor'$$,
  'user "mallory": no such role in this account');
SELECT pg_temp.expect_error($$UPDATE nats.users SET account_id = (SELECT id FROM nats.accounts WHERE name = 'beta') WHERE username = 'alice'$$,
  'no such role in this account', 'user "alice"');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET account_id = (SELECT id FROM nats.accounts WHERE name = 'beta') WHERE name = 'sensor'$$,
  'is held by user "alice"');
SELECT pg_temp.expect_error($$DELETE FROM nats.roles WHERE name = 'sensor'$$,
  'is still held by 1 user(s), e.g. "alice"', 'users_role_id_fkey');

-- Secrets: wrong shapes are refused without echoing the value.
SELECT pg_temp.expect_error($$UPDATE nats.users SET password_hash = 'plaintext' WHERE username = 'alice'$$,
  'password_hash of user "alice"', 'password_hash_is_bcrypt_or_argon2id');
SELECT pg_temp.expect_error($$INSERT INTO nats.user_tokens (user_id, token_sha256)
    SELECT id, substr(digest('tok', 'sha256'), 1, 31) FROM nats.users WHERE username = 'alice'$$,
  'got 31 bytes', 'token_sha256_is_32_bytes');
SELECT pg_temp.expect_error($$INSERT INTO nats.user_tokens (user_id, token_sha256)
    SELECT id, 'my-secret-token'::bytea FROM nats.users WHERE username = 'alice'$$,
  'token_sha256_is_32_bytes');
DO $$
DECLARE msg text; detail text;
BEGIN
  UPDATE nats.users SET password_hash = 'hunter2' WHERE username = 'alice';
  RAISE EXCEPTION 'FAIL: plaintext password accepted';
EXCEPTION WHEN check_violation THEN
  GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL;
  IF position('hunter2' IN msg || coalesce(detail, '')) > 0 THEN
    RAISE EXCEPTION 'FAIL: the error echoes the rejected password: % %', msg, detail;
  END IF;
  RAISE NOTICE 'ok: a rejected plaintext password is not echoed in the error';
END $$;

-- Exports and imports.
SELECT pg_temp.expect_error($$INSERT INTO nats.account_exports (account_id, name, subject, type)
    SELECT id, 'e', 'svc.>', 'bogus' FROM nats.accounts WHERE name = 'acme'$$,
  'export_type_known');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_exports (account_id, name, subject, type)
    SELECT id, 'e', 'svc..x', 'service' FROM nats.accounts WHERE name = 'acme'$$,
  'export "e"', 'empty token', 'export_subject_valid');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_exports (account_id, name, subject, type, response_type)
    SELECT id, 'e', 'feed.>', 'stream', 'Singleton' FROM nats.accounts WHERE name = 'acme'$$,
  'export_service_only_fields');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_exports (account_id, name, subject, type, response_type)
    SELECT id, 'e', 'svc.>', 'service', 'Sometimes' FROM nats.accounts WHERE name = 'acme'$$,
  'export_response_type_known');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_exports (account_id, name, subject, type, account_token_position)
    SELECT id, 'e', 'svc.>', 'service', 0 FROM nats.accounts WHERE name = 'acme'$$,
  'export_account_token_position_positive');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_imports (account_id, name, subject, type)
    SELECT id, 'i', 'svc.>', 'service' FROM nats.accounts WHERE name = 'beta'$$,
  'import_exactly_one_exporter');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_imports (account_id, name, subject, type, exporter_account_id, exporter_public_key)
    SELECT b.id, 'i', 'svc.>', 'service', a.id, 'A' || repeat('B', 55) FROM nats.accounts a, nats.accounts b WHERE a.name = 'acme' AND b.name = 'beta'$$,
  'import_exactly_one_exporter');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_imports (account_id, name, subject, type, exporter_account_id)
    SELECT id, 'i', 'svc.>', 'service', id FROM nats.accounts WHERE name = 'beta'$$,
  'import_not_from_itself');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_imports (account_id, name, subject, type, exporter_public_key)
    SELECT id, 'i', 'svc.>', 'service', 'UABC' FROM nats.accounts WHERE name = 'beta'$$,
  'import_exporter_public_key_format');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_imports (account_id, name, subject, type, exporter_public_key, local_subject)
    SELECT id, 'i', 'svc.>', 'service', 'A' || repeat('B', 55), 'local.>.x' FROM nats.accounts WHERE name = 'beta'$$,
  'import "i"', 'local_subject', 'import_local_subject_valid');

-- Good rows that look unusual are accepted.
UPDATE nats.users SET password_hash = '$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA' WHERE username = 'bob';
UPDATE nats.users SET password_hash = NULL WHERE username = 'bob';
UPDATE nats.users SET role_id = (SELECT id FROM nats.roles WHERE name = 'global-reader') WHERE username = 'bob';
UPDATE nats.roles SET allowed_connection_types = '{STANDARD,WEBSOCKET}', allowed_sources = '{10.0.0.0/8,192.168.1.7}'
  WHERE name = 'sensor';
SELECT pg_temp.expect(true, 'argon2id, NULL (token-only), a global role, queue groups, sources and connection types are accepted');

-- ---------------------------------------------------------------------------------------------
\echo '== 3. The outbox queues admin changes, once'
-- ---------------------------------------------------------------------------------------------
-- As if the sync had pushed everything; forget the notifications section 2 sent.
DELETE FROM nats.sync_outbox;
SELECT pg_temp.drain_notifications();

-- The sync recording a push writes only service-owned columns: no push, no notification, and
-- updated_at stays put.
CREATE TEMP TABLE before AS SELECT updated_at FROM nats.accounts WHERE name = 'acme';
UPDATE nats.accounts SET public_key = 'A' || repeat('C', 55), jwt = 'x', synced_at = now(), sync_error = NULL
  WHERE name = 'acme';
SELECT pg_temp.expect(pg_temp.outbox('acme') = 0, 'writing jwt/synced_at/public_key queues nothing');
SELECT pg_temp.expect((SELECT updated_at FROM nats.accounts WHERE name = 'acme') = (SELECT updated_at FROM before),
                      'writing service-owned columns keeps updated_at');
SELECT pg_temp.expect_notifications('service-owned account columns', '{}');

UPDATE nats.accounts SET max_connections = 5 WHERE name = 'acme';
SELECT pg_temp.expect(pg_temp.outbox('acme') = 1, 'a max_connections change queues one upsert');
SELECT pg_temp.expect((SELECT updated_at FROM nats.accounts WHERE name = 'acme') > (SELECT updated_at FROM before),
                      'an admin change moves updated_at');
UPDATE nats.accounts SET max_payload = 1024 WHERE name = 'acme';
SELECT pg_temp.expect(pg_temp.outbox('acme') = 1, 'a second change before the push coalesces into the pending row');
SELECT pg_temp.expect_notifications('two account changes', ARRAY[
  'nats_pg_auth_sync ' || pg_temp.acc('acme'), 'nats_pg_auth_change account:' || pg_temp.acc('acme')]);

UPDATE nats.sync_outbox SET attempts = 1;               -- the leader claimed it
UPDATE nats.accounts SET description = 'tenant one' WHERE name = 'acme';
SELECT pg_temp.expect(pg_temp.outbox('acme') = 2, 'a change during a push gets a new row');
DELETE FROM nats.sync_outbox;

-- User, role and token changes never touch the account JWT.
UPDATE nats.users SET description = 'd';
UPDATE nats.roles SET description = 'd';
SELECT pg_temp.expect((SELECT count(*) FROM nats.sync_outbox) = 0, 'user and role changes queue no push');

-- Exports: the exporter and every account importing from it.
INSERT INTO nats.account_imports (account_id, name, subject, type, exporter_account_id)
  SELECT b.id, 'acme-svc', 'svc.>', 'service', a.id FROM nats.accounts a, nats.accounts b WHERE a.name = 'acme' AND b.name = 'beta';
SELECT pg_temp.expect(pg_temp.outbox('beta') = 1 AND pg_temp.outbox('acme') = 0, 'an import queues the importer only');
DELETE FROM nats.sync_outbox;
INSERT INTO nats.account_exports (account_id, name, subject, type, response_type)
  SELECT id, 'svc', 'svc.>', 'service', 'Singleton' FROM nats.accounts WHERE name = 'acme';
SELECT pg_temp.expect(pg_temp.outbox('acme') = 1 AND pg_temp.outbox('beta') = 1, 'an export queues the exporter and its importer');
DELETE FROM nats.sync_outbox;
UPDATE nats.account_imports SET sync_error = 'no such export' WHERE name = 'acme-svc';
SELECT pg_temp.expect((SELECT count(*) FROM nats.sync_outbox) = 0, 'the service writing an import''s sync_error queues nothing');
UPDATE nats.account_exports SET token_req = true WHERE name = 'svc';
SELECT pg_temp.expect(pg_temp.outbox('acme') = 1 AND pg_temp.outbox('beta') = 1, 'an export change queues the exporter and its importer');
DELETE FROM nats.sync_outbox;

-- Keys.
INSERT INTO nats.account_keys (account_id, kind, public_key, seed)
  SELECT id, 'identity', public_key, 'SA-not-a-real-seed' FROM nats.accounts WHERE name = 'acme';
INSERT INTO nats.account_keys (account_id, kind, public_key, seed)
  SELECT id, 'signing', 'A' || repeat('D', 55), 'SA-not-a-real-seed' FROM nats.accounts WHERE name = 'acme';
SELECT pg_temp.expect(pg_temp.outbox('acme') = 1, 'new keys queue one upsert');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_keys (account_id, kind, public_key, seed)
    SELECT id, 'identity', 'A' || repeat('E', 55), 's' FROM nats.accounts WHERE name = 'acme'$$,
  'account_keys_one_identity');
DELETE FROM nats.sync_outbox;
SELECT pg_temp.drain_notifications();

-- Deleting an account: one delete row carrying its public key; nothing queued for it by the
-- cascaded deletes of its keys, exports and users; its importers are queued (their import is gone).
DELETE FROM nats.accounts WHERE name = 'acme';
SELECT pg_temp.expect((SELECT count(*) FROM nats.sync_outbox WHERE op = 'delete' AND account_public_key = 'A' || repeat('C', 55)) = 1,
                      'deleting a synced account queues one delete row with its public key');
SELECT pg_temp.expect((SELECT count(*) FROM nats.sync_outbox WHERE op = 'upsert' AND account_id NOT IN (SELECT id FROM nats.accounts)) = 0,
                      'no upserts for the deleted account');
SELECT pg_temp.expect(pg_temp.outbox('beta') = 1, 'the importer of the deleted exporter is queued');
SELECT pg_temp.expect((SELECT count(*) FROM nats.account_imports) = 0, 'imports from the deleted account are gone');
DELETE FROM nats.sync_outbox;
SELECT pg_temp.drain_notifications();

INSERT INTO nats.accounts (name) VALUES ('never-synced');
DELETE FROM nats.sync_outbox;
DELETE FROM nats.accounts WHERE name = 'never-synced';
SELECT pg_temp.expect((SELECT count(*) FROM nats.sync_outbox) = 0, 'an account deleted before it had keys queues nothing');
SELECT pg_temp.drain_notifications();

-- ---------------------------------------------------------------------------------------------
\echo '== 4. Change notifications'
-- ---------------------------------------------------------------------------------------------
-- Everything below happens in account beta.
INSERT INTO nats.accounts (name) VALUES ('gamma');
SELECT pg_temp.expect_notifications('account insert', ARRAY[
  'nats_pg_auth_sync ' || pg_temp.acc('gamma'), 'nats_pg_auth_change account:' || pg_temp.acc('gamma')]);
DELETE FROM nats.sync_outbox;
UPDATE nats.accounts SET active = false WHERE name = 'gamma';
SELECT pg_temp.expect_notifications('account update', ARRAY[
  'nats_pg_auth_sync ' || pg_temp.acc('gamma'), 'nats_pg_auth_change account:' || pg_temp.acc('gamma')]);
CREATE TEMP TABLE gone AS SELECT pg_temp.acc('gamma') AS id;
DELETE FROM nats.accounts WHERE name = 'gamma';
SELECT pg_temp.expect_notifications('account delete (no keys yet: no sync row)', ARRAY[
  'nats_pg_auth_change account:' || (SELECT id FROM gone)]);

CREATE TEMP TABLE ids AS SELECT
  (SELECT id FROM nats.roles WHERE name = 'beta-role') AS role_id,
  (SELECT id FROM nats.users WHERE username = 'bob') AS user_id;
UPDATE nats.roles SET allow_response = true WHERE name = 'beta-role';
SELECT pg_temp.expect_notifications('role update', ARRAY['nats_pg_auth_change role:' || (SELECT role_id FROM ids)]);
UPDATE nats.users SET active = false WHERE username = 'bob';
SELECT pg_temp.expect_notifications('user update', ARRAY['nats_pg_auth_change user:' || (SELECT user_id FROM ids)]);

INSERT INTO nats.user_tokens (user_id, token_sha256) SELECT user_id, digest('tok-1', 'sha256') FROM ids;
SELECT pg_temp.expect_notifications('token insert', ARRAY['nats_pg_auth_change token:' || (SELECT user_id FROM ids)]);
UPDATE nats.user_tokens SET last_used_at = now();
SELECT pg_temp.expect_notifications('token last_used_at bookkeeping (written at login)', '{}');
UPDATE nats.user_tokens SET revoked_at = now();
SELECT pg_temp.expect_notifications('token revoke', ARRAY['nats_pg_auth_change token:' || (SELECT user_id FROM ids)]);
DELETE FROM nats.user_tokens;
SELECT pg_temp.expect_notifications('token delete', ARRAY['nats_pg_auth_change token:' || (SELECT user_id FROM ids)]);

UPDATE nats.users SET role_id = NULL WHERE username = 'bob';
DELETE FROM nats.roles WHERE name = 'beta-role';
DELETE FROM nats.users WHERE username = 'bob';
SELECT pg_temp.expect_notifications('role and user delete', ARRAY[
  'nats_pg_auth_change user:' || (SELECT user_id FROM ids),
  'nats_pg_auth_change role:' || (SELECT role_id FROM ids)]);

-- ---------------------------------------------------------------------------------------------
\echo '== 5. Rows that cannot hurt the service (migrations/0004_row_bounds.sql; hash bounds of 0010)'
-- ---------------------------------------------------------------------------------------------
INSERT INTO nats.users (account_id, username) SELECT id, 'carol' FROM nats.accounts WHERE name = 'beta';
-- A stored hash sets its own work factor: bounded (nats.password_hash_limits()).
SELECT pg_temp.expect_error($$UPDATE nats.users SET password_hash = '$2b$31$Y5b1dW8Oq8N3Tbq7u3jY1eE8m4C7wWl6o5v9X0xH0x7h3lQe6dG1K' WHERE username = 'carol'$$,
  'user "carol"', 'bcrypt cost 31 is outside 4..12', 'password_hash_is_bcrypt_or_argon2id');
SELECT pg_temp.expect_error($$UPDATE nats.users SET password_hash = '$2b$03$Y5b1dW8Oq8N3Tbq7u3jY1eE8m4C7wWl6o5v9X0xH0x7h3lQe6dG1K' WHERE username = 'carol'$$,
  'bcrypt cost 3 is outside 4..12');
SELECT pg_temp.expect_error($$UPDATE nats.users SET password_hash = '$argon2id$v=19$m=4294967295,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA' WHERE username = 'carol'$$,
  'memory m=4294967295 KiB is outside 8..65536 KiB');
SELECT pg_temp.expect_error($$UPDATE nats.users SET password_hash = '$argon2id$v=19$m=19456,t=9,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA' WHERE username = 'carol'$$,
  'iterations t=9 are outside 1..8');
SELECT pg_temp.expect_error($$UPDATE nats.users SET password_hash = '$argon2id$v=19$m=19456,t=2,p=17$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA' WHERE username = 'carol'$$,
  'parallelism p=17 is outside 1..16');
SELECT pg_temp.expect_error($$UPDATE nats.users SET password_hash = '$argon2id$anything' WHERE username = 'carol'$$,
  'not an argon2id PHC string');
UPDATE nats.users SET password_hash = crypt('pw', gen_salt('bf', 4)) WHERE username = 'carol';
UPDATE nats.users SET password_hash = '$argon2id$v=19$m=65536,t=8,p=16$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA' WHERE username = 'carol';
SELECT pg_temp.expect(true, 'bcrypt cost 4 and argon2id at the bounds are accepted');

-- Text in NOTIFY payloads (the kick trigger sends the username; 8000 bytes at most).
SELECT pg_temp.expect_error(format($$UPDATE nats.users SET username = %L WHERE username = 'carol'$$, repeat('x', 257)),
  'username_at_most_256_characters');
UPDATE nats.users SET username = repeat('é', 256) WHERE username = 'carol';
UPDATE nats.users SET active = false WHERE username = repeat('é', 256);
DELETE FROM nats.users WHERE username = repeat('é', 256);
SELECT pg_temp.expect(true, 'a 256-character username can be updated and deleted (its kick notification fits)');
INSERT INTO nats.users (account_id, username) SELECT id, 'dora' FROM nats.accounts WHERE name = 'beta';

-- Intervals and timestamps the service converts.
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET user_jwt_ttl = interval '1000 years' WHERE name = 'beta'$$,
  'user_jwt_ttl_at_most_366_days');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET user_jwt_ttl = interval '367 days' WHERE name = 'global-reader'$$,
  'role_user_jwt_ttl_at_most_366_days');
SELECT pg_temp.expect_error($$UPDATE nats.roles SET allow_response_ttl = interval '2 days' WHERE name = 'global-reader'$$,
  'allow_response_ttl_at_most_1_day');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_exports (account_id, name, subject, type, response_threshold)
    SELECT id, 'slow', 'slow.>', 'service', interval '1000 years' FROM nats.accounts WHERE name = 'beta'$$,
  'export_response_threshold_at_most_1_day');
SELECT pg_temp.expect_error($$INSERT INTO nats.user_tokens (user_id, token_sha256, expires_at)
    SELECT id, digest('tok-forever', 'sha256'), 'infinity' FROM nats.users WHERE username = 'dora'$$,
  'token_expires_at_finite');

-- TRUNCATE skips every row trigger.
SELECT pg_temp.expect_error($$TRUNCATE nats.users CASCADE$$,
  'TRUNCATE nats.users is not allowed', 'use DELETE FROM nats.users instead');
SELECT pg_temp.expect_error($$TRUNCATE nats.accounts CASCADE$$, 'TRUNCATE nats.accounts is not allowed');
SELECT dblink_get_notify('listener');

SELECT dblink_disconnect('listener');

-- ---------------------------------------------------------------------------------------------
\echo '== 5. Roles and row-level security (migrations/0005), as the real roles (SET ROLE)'
-- ---------------------------------------------------------------------------------------------
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'schema_checks_acme_admin') THEN
    CREATE ROLE schema_checks_acme_admin;
  END IF;
  GRANT nats_pg_auth_tenant TO schema_checks_acme_admin;
END $$;
INSERT INTO nats.accounts (name, max_connections) VALUES ('r-acme', 10), ('r-globex', 10);
INSERT INTO nats.roles (account_id, name) SELECT id, 'r-role' FROM nats.accounts WHERE name = 'r-acme';
INSERT INTO nats.roles (account_id, name) SELECT id, 'g-role' FROM nats.accounts WHERE name = 'r-globex';
INSERT INTO nats.users (account_id, username, password_hash)
  SELECT id, 'g-user', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'r-globex';
INSERT INTO nats.account_exports (account_id, name, subject, type, token_req)
  SELECT id, 'g-private', 'gp.>', 'stream', true FROM nats.accounts WHERE name = 'r-globex';
INSERT INTO nats.account_admins (account_id, role_name)
  SELECT id, 'schema_checks_acme_admin' FROM nats.accounts WHERE name = 'r-acme';
CREATE TEMP TABLE r AS SELECT
  (SELECT id FROM nats.accounts WHERE name = 'r-acme') AS acme,
  (SELECT id FROM nats.accounts WHERE name = 'r-globex') AS globex,
  (SELECT id FROM nats.roles WHERE name = 'g-role') AS g_role,
  (SELECT id FROM nats.account_exports WHERE name = 'g-private') AS g_export;
GRANT SELECT ON r TO PUBLIC;
-- Migration 0009 revokes PUBLIC's EXECUTE on functions the migrating role creates from then on
-- (in any schema of this database): these helpers run under SET ROLE below.
GRANT EXECUTE ON FUNCTION pg_temp.expect(boolean, text), pg_temp.expect_error(text, text[]),
  pg_temp.outbox(text), pg_temp.acc(text), pg_temp.drain_notifications(),
  pg_temp.expect_notifications(text, text[]) TO PUBLIC;

SET ROLE schema_checks_acme_admin;
INSERT INTO nats.users (account_id, role_id, username, password_hash)
  SELECT a.id, r.id, 'r-bob', crypt('pw', gen_salt('bf', 4))
  FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id WHERE a.name = 'r-acme';
SELECT pg_temp.expect((SELECT array_agg(username) FROM nats.users) = '{r-bob}', 'tenant admin sees only its own users');
SELECT pg_temp.expect((SELECT array_agg(name) FROM nats.accounts) = '{r-acme}', 'tenant admin sees only its own account');
SELECT pg_temp.expect((SELECT count(*) FROM nats.account_exports) = 0, 'tenant admin does not see other tenants'' exports');
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET max_connections = 1000$$, 'permission denied');
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET active = false$$, 'permission denied');
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET public_key = 'A'$$, 'permission denied');
SELECT pg_temp.expect_error($$INSERT INTO nats.accounts (name) VALUES ('mine')$$, 'permission denied');
SELECT pg_temp.expect_error($$SELECT seed FROM nats.account_keys$$, 'permission denied');
SELECT pg_temp.expect_error($$SELECT seed FROM nats.service_identities$$, 'permission denied');
SELECT pg_temp.expect_error($$TRUNCATE nats.users$$, 'permission denied');
SELECT pg_temp.expect_error($$INSERT INTO nats.users (account_id, username) SELECT globex, 'intruder' FROM r$$, 'row-level security');
SELECT pg_temp.expect_error($$UPDATE nats.users SET role_id = (SELECT g_role FROM r) WHERE username = 'r-bob'$$, 'no such role in this account');
SELECT pg_temp.expect_error($$INSERT INTO nats.account_export_grants (export_id, importer_account_id) SELECT g_export, acme FROM r$$,
  'row-level security');
SELECT pg_temp.expect_error($$INSERT INTO nats.sync_outbox (account_id, op, reason) SELECT acme, 'delete', 'x' FROM r$$,
  'row-level security');
SELECT pg_temp.expect_error($$SELECT nats.rotate_signing_key('r-globex')$$, 'no account named');
SELECT nats.rotate_signing_key('r-acme');
INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, type)
  SELECT acme, 'steal', 'gp.>', globex, 'stream' FROM r;   -- allowed; the sync leaves it out (no grant)
RESET ROLE;
SELECT pg_temp.expect((SELECT count(*) FROM nats.users WHERE username = 'g-user' AND active) = 1, 'globex untouched');
DELETE FROM nats.sync_outbox;

SET ROLE nats_pg_auth_admin;
UPDATE nats.accounts SET max_connections = 20 WHERE name = 'r-globex';
INSERT INTO nats.account_export_grants (export_id, importer_account_id) SELECT g_export, acme FROM r;
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET public_key = 'A'$$, 'permission denied');
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET jwt = NULL$$, 'permission denied');
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET synced_at = NULL$$, 'permission denied');
SELECT pg_temp.expect_error($$UPDATE nats.accounts SET sync_error = NULL$$, 'permission denied');
SELECT pg_temp.expect_error($$UPDATE nats.account_keys SET retired_at = now()$$, 'permission denied');
SELECT pg_temp.expect_error($$SELECT seed FROM nats.account_keys$$, 'permission denied');
SELECT pg_temp.expect_error($$DELETE FROM nats.sync_outbox$$, 'permission denied');
SELECT pg_temp.expect_error($$INSERT INTO nats.sync_outbox (account_id, op, reason) SELECT acme, 'delete', 'x' FROM r$$,
  'row-level security');
SELECT pg_temp.expect_error($$INSERT INTO nats.audit_log (kind) VALUES ('x')$$, 'permission denied');
SELECT pg_temp.expect_error($$TRUNCATE nats.users$$, 'permission denied');
RESET ROLE;
SELECT pg_temp.expect((SELECT count(*) FROM nats.sync_outbox o, r WHERE o.account_id = r.acme AND o.op = 'upsert') = 1,
                      'the grant queued the importer (as the admin, through a trigger running as the owner)');

-- ---------------------------------------------------------------------------------------------
\echo '== 6. nkeys and certificate mappings (migrations/0007)'
-- ---------------------------------------------------------------------------------------------
INSERT INTO nats.users (account_id, username, nkey) SELECT acme, 'n-dev', 'U' || repeat('A', 55) FROM r;
SELECT pg_temp.expect_error($$UPDATE nats.users SET nkey = 'A' || repeat('A', 55) WHERE username = 'n-dev'$$,
  'nkey_is_user_public_key');
SELECT pg_temp.expect_error($$UPDATE nats.users SET nkey = 'U' || repeat('a', 55) WHERE username = 'n-dev'$$,
  'nkey_is_user_public_key');
SELECT pg_temp.expect_error($$UPDATE nats.users SET nkey = 'U' || repeat('A', 55) WHERE username = 'g-user'$$,
  'users_nkey_unique');
SELECT pg_temp.expect_error($$INSERT INTO nats.user_certificates (user_id) SELECT id FROM nats.users WHERE username = 'n-dev'$$,
  'certificate_identity_given');
SELECT pg_temp.expect_error($$INSERT INTO nats.user_certificates (user_id, fingerprint_sha256)
  SELECT id, '\x00'::bytea FROM nats.users WHERE username = 'n-dev'$$, 'certificate_fingerprint_is_32_bytes');
SELECT pg_temp.expect_error($$INSERT INTO nats.user_certificates (user_id, san)
  SELECT id, 'mail:a@b' FROM nats.users WHERE username = 'n-dev'$$, 'certificate_san_prefix');
SELECT pg_temp.expect_error($$INSERT INTO nats.user_certificates (user_id, subject_dn)
  SELECT id, 'CN=' || repeat('x', 1100) FROM nats.users WHERE username = 'n-dev'$$, 'certificate_subject_dn_bounded');
INSERT INTO nats.user_certificates (user_id, subject_dn, san)
  SELECT id, 'CN=n-dev', 'email:n@acme.example' FROM nats.users WHERE username = 'n-dev';
SELECT pg_temp.expect_error($$INSERT INTO nats.user_certificates (user_id, subject_dn, san)
  SELECT id, 'CN=n-dev', 'email:n@acme.example' FROM nats.users WHERE username = 'g-user'$$,
  'user_certificates_identity_unique');
SELECT pg_temp.expect_error($$TRUNCATE nats.user_certificates$$, 'TRUNCATE nats.user_certificates is not allowed');
DELETE FROM nats.kick_requests;
UPDATE nats.user_certificates SET description = 'bookkeeping';
SELECT pg_temp.expect((SELECT count(*) FROM nats.kick_requests) = 0, 'a description change of a mapping kicks nobody');
DELETE FROM nats.user_certificates;
SELECT pg_temp.expect((SELECT count(*) FROM nats.kick_requests k JOIN nats.users u ON u.id = k.user_id
                        WHERE u.username = 'n-dev') = 1, 'deleting a mapping asks to kick its user');
DELETE FROM nats.kick_requests;

CREATE TEMP TABLE gu AS SELECT id FROM nats.users WHERE username = 'g-user';
GRANT SELECT ON gu TO PUBLIC;
INSERT INTO nats.user_certificates (user_id, san) SELECT id, 'dns:n-dev.acme.example' FROM nats.users WHERE username = 'n-dev';
SET ROLE schema_checks_acme_admin;
-- Tenants do not map certificates (the CA's names are shared between tenants; see 0007).
SELECT pg_temp.expect_error($$INSERT INTO nats.user_certificates (user_id, san) SELECT id, 'dns:mine' FROM nats.users WHERE username = 'n-dev'$$,
  'permission denied');
SELECT pg_temp.expect_error($$INSERT INTO nats.user_certificates (user_id, san) SELECT id, 'dns:steal' FROM gu$$,
  'permission denied');
SELECT pg_temp.expect_error($$UPDATE nats.user_certificates SET subject_dn = 'CN=device-17,O=Globex'$$,
  'permission denied');
SELECT pg_temp.expect_error($$TRUNCATE nats.user_certificates$$, 'permission denied');
RESET ROLE;
INSERT INTO nats.user_certificates (user_id, san) SELECT id, 'dns:g.globex.example' FROM nats.users WHERE username = 'g-user';
SET ROLE schema_checks_acme_admin;
SELECT pg_temp.expect((SELECT array_agg(san) FROM nats.user_certificates) = '{dns:n-dev.acme.example}',
  'tenant admin sees only its own users'' certificate mappings');
SELECT pg_temp.expect((SELECT count(*) FROM nats.user_certificates WHERE san LIKE '%globex%') = 0, 'and not globex''s');
UPDATE nats.user_certificates SET description = 'mine';
RESET ROLE;
SET ROLE nats_pg_auth_service;
SELECT pg_temp.expect((SELECT count(*) FROM nats.user_certificates) = 2, 'the service reads every mapping');
SELECT pg_temp.expect((SELECT count(*) FROM nats.users WHERE nkey IS NOT NULL) = 1, 'the service reads nkeys');
SELECT pg_temp.expect_error($$DELETE FROM nats.user_certificates$$, 'permission denied');
RESET ROLE;
SET ROLE nats_pg_auth_admin;
UPDATE nats.users SET nkey = NULL WHERE username = 'n-dev';
DELETE FROM nats.user_certificates WHERE san LIKE 'dns:g%';
RESET ROLE;
DELETE FROM nats.kick_requests;

\echo '== all schema checks passed'
