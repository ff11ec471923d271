-- Fences between tenants (issue 15, findings 3-6 and the SQL items of 7). A tenant admin
-- (nats_pg_auth_tenant) must not be able to reach another tenant through the schema:
--   1. functions: nobody but the roles that need one may call it (Postgres grants EXECUTE to
--      PUBLIC by default; nats.enqueue_account_sync runs as its owner and wrote any account's
--      outbox row for anyone), and every function has a fixed search_path;
--   2. nkey bindings: a user's public nkey is public, so binding one captures that device;
--      like certificate mappings (0007) they are set by the operator roles only;
--   3. errors that named another tenant's roles say "no such role in this account";
--   4. sizes a tenant controls are bounded: permission arrays, sources, connection types,
--      descriptions, names, subjects, import tokens; users per account (accounts.max_users);
--      tokens and certificate mappings per user; outbox reasons;
--   5. certificate SANs compare the same way in the Postgres lookup as in the login copy.

-- ---------------------------------------------------------------------------------------------
-- 3. A user's role: one of its account or a global one. The old message named the other
--    tenant's role, its id and its account ("role "staff" (id 1) belongs to account 2"): a
--    tenant could enumerate every tenant's role names by id. A role id that does not exist gets
--    the same answer as one of another account, so the error is no existence oracle either.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION nats.check_user_role() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  owner_account bigint;
BEGIN
  IF NEW.role_id IS NULL THEN RETURN NEW; END IF;
  SELECT account_id INTO owner_account FROM nats.roles WHERE id = NEW.role_id;
  IF NOT FOUND OR (owner_account IS NOT NULL AND owner_account <> NEW.account_id) THEN
    RAISE EXCEPTION 'user "%": no such role in this account (role_id %)', NEW.username, NEW.role_id
      USING ERRCODE = 'foreign_key_violation',
            HINT = 'Use a role of the user''s own account, or a global role (account_id NULL): '
                || 'SELECT id, name FROM nats.roles WHERE account_id = ' || NEW.account_id
                || ' OR account_id IS NULL;';
  END IF;
  RETURN NEW;
END $$;

-- ---------------------------------------------------------------------------------------------
-- 2. nkey bindings are made by the operator roles. users.nkey is a public key: anyone can read
--    a device's key off the wire or its configuration, and the first account to store it gets
--    the device's connections (users.nkey is unique across tenants). A tenant admin may read
--    its users' nkeys and clear one (NULL); it may not set or change one.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION nats.check_nkey_binding() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NEW.nkey IS NULL OR (TG_OP = 'UPDATE' AND NEW.nkey IS NOT DISTINCT FROM OLD.nkey) THEN
    RETURN NEW;
  END IF;
  -- current_user: the caller (this function does not run as its owner). A superuser is a
  -- member of every role and passes.
  IF pg_has_role(current_user, 'nats_pg_auth_tenant', 'MEMBER')
     AND NOT pg_has_role(current_user, 'nats_pg_auth_admin', 'MEMBER') THEN
    RAISE EXCEPTION 'user "%": a tenant admin cannot set users.nkey; ask an operator (a role with nats_pg_auth_admin) to bind the key', NEW.username
      USING ERRCODE = 'insufficient_privilege', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME,
            COLUMN = 'nkey',
            HINT = 'A public nkey is public: whoever binds it first gets that device''s connections, '
                || 'so bindings are made by whoever vouches for the device (nats_pg_auth_admin), '
                || 'as with client certificates. Tenant admins may clear one (SET nkey = NULL).';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER users_nkey_binding BEFORE INSERT OR UPDATE OF nkey ON nats.users
  FOR EACH ROW EXECUTE FUNCTION nats.check_nkey_binding();

-- ---------------------------------------------------------------------------------------------
-- 4a. Arrays a tenant writes. Every replica holds every row in memory and puts permissions into
--     each user JWT (a callout response must fit nats-server's max_payload, 1 MiB by default):
--       permissions (each of the four columns, roles and users): at most 1000 entries of at most
--         512 characters, 32768 characters in all;
--       allowed_sources: at most 100 networks; allowed_connection_types: at most 16 entries;
--       mqtt_client_ids: bounded by 0008 (100 ids, 25600 characters in all), plus 512 per id.
--     The CHECK constraints are the guarantee; a BEFORE trigger (named to run before the
--     subject checks, so a 50,000-entry array is refused before it is walked) says which
--     column broke which bound instead of dumping the row.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION nats.max_element_length(arr text[]) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce(max(length(x)), 0) FROM unnest(arr) AS x
$$;

-- Arguments: 'column:max_entries:max_entry_length:max_total_length:constraint' per column
-- (lengths in characters; 0 = not checked).
CREATE FUNCTION nats.check_array_bounds() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r jsonb := to_jsonb(NEW);
  what text := format('%s "%s"', CASE TG_TABLE_NAME WHEN 'roles' THEN 'role' ELSE 'user' END,
                      left(coalesce(r->>'username', r->>'name', '?'), 256));
  arg text;
  p text[];
  val jsonb;
  n integer;
  longest integer;
  total bigint;
BEGIN
  FOREACH arg IN ARRAY TG_ARGV LOOP
    p := string_to_array(arg, ':');
    val := r -> p[1];
    CONTINUE WHEN val IS NULL OR jsonb_typeof(val) <> 'array';
    n := jsonb_array_length(val);
    IF n > p[2]::integer THEN
      RAISE EXCEPTION '% has % entries in %; at most % are allowed (constraint %)', what, n, p[1], p[2], p[5]
        USING ERRCODE = 'check_violation', CONSTRAINT = p[5], SCHEMA = TG_TABLE_SCHEMA,
              TABLE = TG_TABLE_NAME, COLUMN = p[1],
              HINT = 'Use wildcards (sensors.*, sensors.>) or split the users into roles; the bounds are listed in docs/admin-guide.md.';
    END IF;
    IF p[3]::integer > 0 OR p[4]::integer > 0 THEN
      SELECT coalesce(max(length(e)), 0), coalesce(sum(length(e)), 0) INTO longest, total
        FROM jsonb_array_elements_text(val) AS e;
      IF p[3]::integer > 0 AND longest > p[3]::integer THEN
        RAISE EXCEPTION '% has an entry of % characters in %; at most % are allowed per entry (constraint %)',
          what, longest, p[1], p[3], p[5]
          USING ERRCODE = 'check_violation', CONSTRAINT = p[5], SCHEMA = TG_TABLE_SCHEMA,
                TABLE = TG_TABLE_NAME, COLUMN = p[1];
      END IF;
      IF p[4]::integer > 0 AND total > p[4]::integer THEN
        RAISE EXCEPTION '% has % characters in % in all; at most % are allowed (constraint %)',
          what, total, p[1], p[4], p[5]
          USING ERRCODE = 'check_violation', CONSTRAINT = p[5], SCHEMA = TG_TABLE_SCHEMA,
                TABLE = TG_TABLE_NAME, COLUMN = p[1];
      END IF;
    END IF;
  END LOOP;
  RETURN NEW;
END $$;

ALTER TABLE nats.roles
  ADD CONSTRAINT publish_permissions_bounded CHECK (cardinality(publish_permissions) <= 1000
    AND nats.max_element_length(publish_permissions) <= 512
    AND length(array_to_string(publish_permissions, '')) <= 32768) NOT VALID,
  ADD CONSTRAINT subscribe_permissions_bounded CHECK (cardinality(subscribe_permissions) <= 1000
    AND nats.max_element_length(subscribe_permissions) <= 512
    AND length(array_to_string(subscribe_permissions, '')) <= 32768) NOT VALID,
  ADD CONSTRAINT publish_deny_permissions_bounded CHECK (cardinality(publish_deny_permissions) <= 1000
    AND nats.max_element_length(publish_deny_permissions) <= 512
    AND length(array_to_string(publish_deny_permissions, '')) <= 32768) NOT VALID,
  ADD CONSTRAINT subscribe_deny_permissions_bounded CHECK (cardinality(subscribe_deny_permissions) <= 1000
    AND nats.max_element_length(subscribe_deny_permissions) <= 512
    AND length(array_to_string(subscribe_deny_permissions, '')) <= 32768) NOT VALID,
  ADD CONSTRAINT allowed_sources_bounded CHECK (cardinality(allowed_sources) <= 100) NOT VALID,
  ADD CONSTRAINT allowed_connection_types_bounded CHECK (cardinality(allowed_connection_types) <= 16) NOT VALID;
ALTER TABLE nats.users
  ADD CONSTRAINT user_publish_permissions_bounded CHECK (cardinality(publish_permissions) <= 1000
    AND nats.max_element_length(publish_permissions) <= 512
    AND length(array_to_string(publish_permissions, '')) <= 32768) NOT VALID,
  ADD CONSTRAINT user_subscribe_permissions_bounded CHECK (cardinality(subscribe_permissions) <= 1000
    AND nats.max_element_length(subscribe_permissions) <= 512
    AND length(array_to_string(subscribe_permissions, '')) <= 32768) NOT VALID,
  ADD CONSTRAINT user_publish_deny_permissions_bounded CHECK (cardinality(publish_deny_permissions) <= 1000
    AND nats.max_element_length(publish_deny_permissions) <= 512
    AND length(array_to_string(publish_deny_permissions, '')) <= 32768) NOT VALID,
  ADD CONSTRAINT user_subscribe_deny_permissions_bounded CHECK (cardinality(subscribe_deny_permissions) <= 1000
    AND nats.max_element_length(subscribe_deny_permissions) <= 512
    AND length(array_to_string(subscribe_deny_permissions, '')) <= 32768) NOT VALID,
  ADD CONSTRAINT user_mqtt_client_id_length_bounded
    CHECK (nats.max_element_length(mqtt_client_ids) <= 512) NOT VALID;

-- "a" sorts before "check": these run before roles_check_subjects / users_check_subjects.
CREATE TRIGGER roles_a_bounded_arrays BEFORE INSERT OR UPDATE ON nats.roles FOR EACH ROW
  EXECUTE FUNCTION nats.check_array_bounds(
    'publish_permissions:1000:512:32768:publish_permissions_bounded',
    'subscribe_permissions:1000:512:32768:subscribe_permissions_bounded',
    'publish_deny_permissions:1000:512:32768:publish_deny_permissions_bounded',
    'subscribe_deny_permissions:1000:512:32768:subscribe_deny_permissions_bounded',
    'allowed_sources:100:0:0:allowed_sources_bounded',
    'allowed_connection_types:16:0:0:allowed_connection_types_bounded');
CREATE TRIGGER users_a_bounded_arrays BEFORE INSERT OR UPDATE ON nats.users FOR EACH ROW
  EXECUTE FUNCTION nats.check_array_bounds(
    'publish_permissions:1000:512:32768:user_publish_permissions_bounded',
    'subscribe_permissions:1000:512:32768:user_subscribe_permissions_bounded',
    'publish_deny_permissions:1000:512:32768:user_publish_deny_permissions_bounded',
    'subscribe_deny_permissions:1000:512:32768:user_subscribe_deny_permissions_bounded',
    'mqtt_client_ids:100:512:25600:user_mqtt_client_id_length_bounded');

-- ---------------------------------------------------------------------------------------------
-- 4b. Text a tenant writes: descriptions at most 1024 characters, names 256, subjects 512, an
--     import's activation token 16384 (a JWT). Plain CHECKs: the constraint name says the bound.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE nats.accounts ADD CONSTRAINT account_description_at_most_1024_characters
  CHECK (length(description) <= 1024) NOT VALID;
ALTER TABLE nats.roles
  ADD CONSTRAINT role_name_at_most_256_characters CHECK (length(name) <= 256) NOT VALID,
  ADD CONSTRAINT role_description_at_most_1024_characters CHECK (length(description) <= 1024) NOT VALID;
ALTER TABLE nats.users ADD CONSTRAINT user_description_at_most_1024_characters
  CHECK (length(description) <= 1024) NOT VALID;
ALTER TABLE nats.user_tokens ADD CONSTRAINT token_description_at_most_1024_characters
  CHECK (length(description) <= 1024) NOT VALID;
ALTER TABLE nats.account_exports
  ADD CONSTRAINT export_name_at_most_256_characters CHECK (length(name) <= 256) NOT VALID,
  ADD CONSTRAINT export_subject_at_most_512_characters CHECK (length(subject) <= 512) NOT VALID,
  ADD CONSTRAINT export_description_at_most_1024_characters CHECK (length(description) <= 1024) NOT VALID;
ALTER TABLE nats.account_imports
  ADD CONSTRAINT import_name_at_most_256_characters CHECK (length(name) <= 256) NOT VALID,
  ADD CONSTRAINT import_subjects_at_most_512_characters
    CHECK (length(subject) <= 512 AND length(local_subject) <= 512) NOT VALID,
  ADD CONSTRAINT import_token_at_most_16384_characters CHECK (length(token) <= 16384) NOT VALID,
  ADD CONSTRAINT import_description_at_most_1024_characters CHECK (length(description) <= 1024) NOT VALID;
ALTER TABLE nats.account_export_grants ADD CONSTRAINT export_grant_description_at_most_1024_characters
  CHECK (length(description) <= 1024) NOT VALID;
-- The outbox takes rows from tenants (rotations, with a reason they choose) and from
-- nats.enqueue_account_sync.
ALTER TABLE nats.sync_outbox ADD CONSTRAINT outbox_reason_at_most_256_characters
  CHECK (length(reason) <= 256) NOT VALID;

-- ---------------------------------------------------------------------------------------------
-- 4c. Users per account: nats.accounts.max_users (operator-set; -1 = unlimited). Counted under
--     a lock on the account row (FOR NO KEY UPDATE: it does not block the foreign-key checks of
--     other inserts), so two concurrent inserts cannot both take the last place. Lowering it
--     below the current count keeps the users; only new ones (and moves into the account) are
--     refused.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE nats.accounts ADD COLUMN max_users bigint NOT NULL DEFAULT -1
  CONSTRAINT max_users_at_least_minus_one CHECK (max_users >= -1);
GRANT INSERT (max_users), UPDATE (max_users) ON nats.accounts TO nats_pg_auth_admin;
-- check_limits (0006) explains every max_* column; its trigger lists its columns.
DROP TRIGGER accounts_check_limits ON nats.accounts;
CREATE TRIGGER accounts_check_limits
  BEFORE INSERT OR UPDATE OF name, max_connections, max_leafnodes, max_subscriptions, max_data,
    max_payload, max_imports, max_exports, max_jetstream_memory_storage,
    max_jetstream_disk_storage, max_jetstream_streams, max_jetstream_consumers, max_users
  ON nats.accounts FOR EACH ROW EXECUTE FUNCTION nats.check_limits('');

CREATE FUNCTION nats.check_max_users() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  acc record;
  n bigint;
BEGIN
  IF TG_OP = 'UPDATE' AND NEW.account_id = OLD.account_id THEN RETURN NEW; END IF;
  SELECT name, max_users INTO acc FROM nats.accounts WHERE id = NEW.account_id FOR NO KEY UPDATE;
  IF NOT FOUND OR acc.max_users < 0 THEN RETURN NEW; END IF;
  SELECT count(*) INTO n FROM nats.users WHERE account_id = NEW.account_id;
  IF n >= acc.max_users THEN
    RAISE EXCEPTION 'account % allows at most % users (max_users); ask an operator to raise it', acc.name, acc.max_users
      USING ERRCODE = 'check_violation', CONSTRAINT = 'max_users', SCHEMA = TG_TABLE_SCHEMA,
            TABLE = TG_TABLE_NAME,
            HINT = 'An operator (nats_pg_auth_admin) sets nats.accounts.max_users; -1 is unlimited.';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER users_max_users BEFORE INSERT OR UPDATE OF account_id ON nats.users
  FOR EACH ROW EXECUTE FUNCTION nats.check_max_users();

-- ---------------------------------------------------------------------------------------------
-- 4d. Tokens and certificate mappings per user: fixed bounds, replaceable by the schema owner
--     (as nats.password_hash_limits; called only by the trigger, as its owner). Counted under a lock on the user's row, as above. Every
--     row counts, revoked and expired tokens too (every replica holds them).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION nats.per_user_limits(OUT max_tokens integer, OUT max_certificates integer)
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT 100, 100
$$;

CREATE FUNCTION nats.check_per_user_rows() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  lim record := nats.per_user_limits();
  bound integer;
  uname text;
  n bigint;
BEGIN
  IF TG_OP = 'UPDATE' AND NEW.user_id = OLD.user_id THEN RETURN NEW; END IF;
  SELECT username INTO uname FROM nats.users WHERE id = NEW.user_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN RETURN NEW; END IF;  -- the foreign key says it
  IF TG_TABLE_NAME = 'user_tokens' THEN
    bound := lim.max_tokens;
    SELECT count(*) INTO n FROM nats.user_tokens WHERE user_id = NEW.user_id;
  ELSE
    bound := lim.max_certificates;
    SELECT count(*) INTO n FROM nats.user_certificates WHERE user_id = NEW.user_id;
  END IF;
  IF n >= bound THEN
    RAISE EXCEPTION 'user "%" already has % rows in nats.%, the most allowed per user (nats.per_user_limits())',
      uname, n, TG_TABLE_NAME
      USING ERRCODE = 'check_violation', SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME,
            HINT = CASE WHEN TG_TABLE_NAME = 'user_tokens'
                        THEN 'Delete revoked or expired tokens first: DELETE FROM nats.user_tokens WHERE user_id = '
                             || NEW.user_id || ' AND (revoked_at IS NOT NULL OR expires_at < now());'
                        ELSE 'Delete mappings that are no longer used first.' END;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER user_tokens_per_user BEFORE INSERT OR UPDATE OF user_id ON nats.user_tokens
  FOR EACH ROW EXECUTE FUNCTION nats.check_per_user_rows();
CREATE TRIGGER user_certificates_per_user BEFORE INSERT OR UPDATE OF user_id ON nats.user_certificates
  FOR EACH ROW EXECUTE FUNCTION nats.check_per_user_rows();

-- ---------------------------------------------------------------------------------------------
-- 5. Certificate SANs: one rule for the Postgres lookup and the login copy (src/callout/
--    certificate.rs, normalize_san): the type prefix and `email:` / `dns:` values compare
--    without ASCII case, `uri:` values exactly, surrounding ASCII whitespace ignored. The SAN
--    types used here are IA5String (ASCII) in a certificate, so ASCII folding is complete and
--    does not depend on the database's collation (lower() under the C locale folds only ASCII,
--    under others more: the two paths would disagree again). Rows keep what was typed.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION nats.san_folded(san text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE
    WHEN position(':' IN san) = 0 THEN btrim(san, E' \t\n\f\r')
    ELSE (SELECT CASE WHEN k = 'uri' THEN k || ':' || v
                      ELSE k || ':' || translate(v, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') END
            FROM (SELECT translate(btrim(split_part(san, ':', 1), E' \t\n\f\r'),
                                   'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') AS k,
                         btrim(substr(san, position(':' IN san) + 1), E' \t\n\f\r') AS v) s)
  END
$$;
CREATE INDEX user_certificates_san_folded ON nats.user_certificates (nats.san_folded(san))
  WHERE san IS NOT NULL;
-- The subject DN's loose form, which the lookup narrows by before the service compares exactly
-- (0007 used lower(), whose folding depends on the collation while the service's did not):
-- ASCII whitespace removed, ASCII letters folded, as `Presented::subject_loose`.
CREATE FUNCTION nats.dn_loose(dn text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
  SELECT translate(dn, E'ABCDEFGHIJKLMNOPQRSTUVWXYZ \t\n\f\r', 'abcdefghijklmnopqrstuvwxyz')
$$;
CREATE INDEX user_certificates_dn_loose ON nats.user_certificates (nats.dn_loose(subject_dn))
  WHERE subject_dn IS NOT NULL;
DROP INDEX nats.user_certificates_subject_loose;

-- ---------------------------------------------------------------------------------------------
-- Validate the new constraints (rows that break one are kept, with a WARNING, as in 0004).
-- ---------------------------------------------------------------------------------------------
DO $$
DECLARE
  c record;
BEGIN
  FOR c IN
    SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
     WHERE connamespace = 'nats'::regnamespace AND NOT convalidated AND contype = 'c'
  LOOP
    BEGIN
      EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', c.tbl, c.conname);
    EXCEPTION WHEN check_violation THEN
      RAISE WARNING 'existing rows of % break the new constraint %; they are kept, but must be fixed before any other change to them is accepted',
        c.tbl, c.conname;
    END;
  END LOOP;
END $$;

-- ---------------------------------------------------------------------------------------------
-- 1. Functions: a fixed search_path for every one, and EXECUTE only for the roles that need it.
-- ---------------------------------------------------------------------------------------------
-- Every function of the schema qualifies what it uses (nats.…); pg_temp last so a temporary
-- object of the caller can never shadow anything.
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN
    SELECT p.oid FROM pg_proc p
     WHERE p.pronamespace = 'nats'::regnamespace
       AND NOT EXISTS (SELECT 1 FROM unnest(coalesce(p.proconfig, '{}')) c WHERE c LIKE 'search_path=%')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
  END LOOP;
END $$;

-- Postgres grants EXECUTE to PUBLIC on every new function. Revoke it for the functions that
-- exist, and for the functions the migrating role creates from now on (a default privilege of
-- that role in this database: per-schema defaults can only add privileges, not revoke PUBLIC's).
-- A function added later without a decision is then callable by nobody but its owner, and the
-- function-listing test (tests/it/schema.rs) fails until it is given one. The default is the
-- role's, for every schema of this database: another function that role creates later (its
-- own helpers, temporary functions) also needs an explicit GRANT EXECUTE to be callable by
-- others. `ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO PUBLIC;` (as that role)
-- undoes it; the grants above do not depend on it.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA nats FROM PUBLIC;
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- Trigger functions need no EXECUTE (a trigger runs whatever its caller's privileges). What a
-- CHECK constraint, an index expression, a policy or a trigger body calls runs with the
-- writer's privileges, so every role that writes the table needs it:
--   validation (CHECKs and the explaining triggers): all three roles;
GRANT EXECUTE ON FUNCTION
  nats.subject_problem(text, boolean), nats.valid_subject(text, boolean),
  nats.valid_subjects(text[], boolean), nats.password_hash_limits(),
  nats.password_hash_problem(text), nats.valid_password_hash(text),
  nats.max_element_length(text[]), nats.san_folded(text), nats.dn_loose(text)
  TO nats_pg_auth_service, nats_pg_auth_admin, nats_pg_auth_tenant;
--   row-level security of the tenant policies: the tenant role;
GRANT EXECUTE ON FUNCTION nats.is_member_of(text), nats.administered_accounts() TO nats_pg_auth_tenant;
--   rotations from SQL (the function runs with the caller's rights: a tenant finds only its
--   own accounts, and the outbox policy admits only rotation rows); the service role too, for
--   `nats-pg-auth rotate-signing-key` run with the service's DATABASE_URL (it writes the outbox
--   anyway);
GRANT EXECUTE ON FUNCTION nats.rotate_signing_key(text, boolean)
  TO nats_pg_auth_service, nats_pg_auth_admin, nats_pg_auth_tenant;
--   the service queues pushes itself (it runs as its owner and writes any account's outbox row:
--   nobody else).
GRANT EXECUTE ON FUNCTION nats.enqueue_account_sync(bigint, text) TO nats_pg_auth_service;
-- nats.account_admin_view and nats.owning_accounts are called only by triggers that run as
-- their owner: no grant.
