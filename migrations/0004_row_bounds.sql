-- Rows that cannot hurt the service (issue 8). Whoever can write the admin tables must not be
-- able to stall, crash or blind the service for every tenant with one row:
--   1. a password hash chooses its own work factor (bcrypt cost, argon2id memory/time/lanes):
--      bounded here, and again by the service before it hashes (--max-bcrypt-cost, ...);
--   2. text that travels (kick requests, logs, formerly NOTIFY payloads of 8000 bytes at most)
--      is bounded: usernames;
--   3. intervals the service converts to nanoseconds or a Duration are bounded, timestamps it
--      reads must be finite ('infinity' cannot be represented by the service's clock types);
--   4. TRUNCATE, which skips every row trigger (no push, no cache drop, no kick, no delete on
--      the server), is refused on the admin tables.
-- New constraints are added NOT VALID and then validated: rows that already break one are kept
-- (with a WARNING naming the constraint) rather than failing the upgrade; any later UPDATE of
-- such a row must fix it.

-- ---------------------------------------------------------------------------------------------
-- 1. Password hash work factors
-- ---------------------------------------------------------------------------------------------
-- The bounds, in one place. To change them, replace this function (as the schema owner) AND
-- start `serve` with the matching --max-bcrypt-cost / --max-argon2-memory-kib /
-- --max-argon2-iterations / --max-argon2-parallelism: the service refuses (without hashing)
-- any hash above its own flags, whatever the table accepted. Replacing the function does not
-- re-check existing rows. Later migrations never replace it.
CREATE FUNCTION nats.password_hash_limits(
  OUT bcrypt_min_cost integer,
  OUT bcrypt_max_cost integer,
  OUT argon2_max_memory_kib bigint,
  OUT argon2_max_iterations integer,
  OUT argon2_max_parallelism integer)
LANGUAGE sql IMMUTABLE AS $$
  SELECT 4, 14, 1048576::bigint, 10, 16   -- bcrypt 4..14; argon2id m <= 1 GiB, t <= 10, p <= 16
$$;

-- What is wrong with a stored password hash, in words (NULL when it is fine). Never quotes the
-- value: it may be a plaintext password pasted into the wrong column.
CREATE FUNCTION nats.password_hash_problem(h text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  lim record := nats.password_hash_limits();
  m text[];
  cost integer;
  mem bigint;
  t bigint;
  p bigint;
BEGIN
  IF h IS NULL THEN RETURN NULL; END IF;
  IF length(h) > 512 THEN RETURN 'it is longer than 512 characters'; END IF;
  m := regexp_match(h, '^\$2[abxy]\$([0-9]{2})\$[./A-Za-z0-9]{53}$');
  IF m IS NOT NULL THEN
    cost := m[1]::integer;
    IF cost < lim.bcrypt_min_cost OR cost > lim.bcrypt_max_cost THEN
      RETURN format('its bcrypt cost %s is outside %s..%s', cost, lim.bcrypt_min_cost, lim.bcrypt_max_cost);
    END IF;
    RETURN NULL;
  END IF;
  IF h LIKE '$argon2id$%' THEN
    m := regexp_match(h,
      '^\$argon2id\$(?:v=(?:16|19)\$)?m=([0-9]{1,12}),t=([0-9]{1,12}),p=([0-9]{1,12})\$[A-Za-z0-9+/]{4,64}\$[A-Za-z0-9+/]{6,86}$');
    IF m IS NULL THEN
      RETURN 'it is not an argon2id PHC string of the form $argon2id$v=19$m=<KiB>,t=<iterations>,p=<lanes>$<salt>$<hash>';
    END IF;
    mem := m[1]::bigint;
    t := m[2]::bigint;
    p := m[3]::bigint;
    IF p < 1 OR p > lim.argon2_max_parallelism THEN
      RETURN format('its argon2id parallelism p=%s is outside 1..%s', p, lim.argon2_max_parallelism);
    END IF;
    IF t < 1 OR t > lim.argon2_max_iterations THEN
      RETURN format('its argon2id iterations t=%s are outside 1..%s', t, lim.argon2_max_iterations);
    END IF;
    IF mem < 8 * p OR mem > lim.argon2_max_memory_kib THEN
      RETURN format('its argon2id memory m=%s KiB is outside %s..%s KiB', mem, 8 * p, lim.argon2_max_memory_kib);
    END IF;
    RETURN NULL;
  END IF;
  RETURN 'it is neither a bcrypt hash nor an argon2id PHC string';
END $$;

-- The CHECK constraint password_hash_is_bcrypt_or_argon2id calls this function: replacing it
-- changes the constraint for every later INSERT/UPDATE.
CREATE OR REPLACE FUNCTION nats.valid_password_hash(h text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
  SELECT nats.password_hash_problem(h) IS NULL
$$;

CREATE OR REPLACE FUNCTION nats.check_password_hash() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  problem text := nats.password_hash_problem(NEW.password_hash);
BEGIN
  IF problem IS NOT NULL THEN
    RAISE EXCEPTION 'password_hash of user "%" is refused: % (constraint password_hash_is_bcrypt_or_argon2id)',
      NEW.username, problem
      USING ERRCODE = 'check_violation', CONSTRAINT = 'password_hash_is_bcrypt_or_argon2id',
            SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = 'password_hash',
            HINT = 'Store a hash, never the password: password_hash = crypt(''the password'', gen_salt(''bf'', 10)), '
                || 'or an argon2id PHC string ($argon2id$v=19$m=19456,t=2,p=1$...). Work factors are bounded by '
                || 'nats.password_hash_limits() (bcrypt cost 4..14, argon2id m <= 1048576 KiB, t <= 10, p <= 16 '
                || 'unless the operator changed it). NULL means the user logs in with tokens only.';
  END IF;
  RETURN NEW;
END $$;

DO $$
DECLARE
  n bigint;
BEGIN
  SELECT count(*) INTO n FROM nats.users WHERE NOT nats.valid_password_hash(password_hash);
  IF n > 0 THEN
    RAISE WARNING '% user(s) have a password_hash outside nats.password_hash_limits(); the service refuses their password logins until it is replaced (SELECT username, nats.password_hash_problem(password_hash) FROM nats.users WHERE NOT nats.valid_password_hash(password_hash))', n;
  END IF;
END $$;

-- ---------------------------------------------------------------------------------------------
-- 2. Text that travels: a username is copied into kick requests (0003), log lines and audit
--    rows. Before 0003 the kick trigger sent {"account_id":…,"username":…} as a NOTIFY payload,
--    which Postgres refuses at 8000 bytes, and with it the UPDATE/DELETE that sent it (the user
--    could then never be changed or deleted, nor its account). 256 characters are at most 1024
--    bytes, whatever carries them.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE nats.users ADD CONSTRAINT username_at_most_256_characters
  CHECK (length(username) <= 256) NOT VALID;

-- ---------------------------------------------------------------------------------------------
-- 3. Intervals and timestamps the service converts
-- ---------------------------------------------------------------------------------------------
-- JWT lifetimes: the service caps them with --max-ttl anyway; a year is far above any sane cap
-- and keeps 'infinity' (Postgres 17) and centuries out of the seconds -> Duration conversion.
ALTER TABLE nats.accounts ADD CONSTRAINT user_jwt_ttl_at_most_366_days
  CHECK (user_jwt_ttl <= interval '366 days') NOT VALID;
ALTER TABLE nats.roles ADD CONSTRAINT role_user_jwt_ttl_at_most_366_days
  CHECK (user_jwt_ttl <= interval '366 days') NOT VALID;
ALTER TABLE nats.users ADD CONSTRAINT user_user_jwt_ttl_at_most_366_days
  CHECK (user_jwt_ttl <= interval '366 days') NOT VALID;
-- How long a responder may answer (nanoseconds in the user JWT).
ALTER TABLE nats.roles ADD CONSTRAINT allow_response_ttl_at_most_1_day
  CHECK (allow_response_ttl <= interval '1 day') NOT VALID;
-- Nanoseconds in the exporter's account JWT (an int64 holds about 292 years).
ALTER TABLE nats.account_exports ADD CONSTRAINT export_response_threshold_at_most_1_day
  CHECK (response_threshold <= interval '1 day') NOT VALID;
-- 'infinity' / '-infinity' and years past 262143 cannot be read by the service's clock types
-- (decoding one panicked); years up to 9999 are plenty.
ALTER TABLE nats.user_tokens ADD CONSTRAINT token_expires_at_finite
  CHECK (isfinite(expires_at) AND expires_at < '10000-01-01') NOT VALID;
ALTER TABLE nats.user_tokens ADD CONSTRAINT token_revoked_at_finite
  CHECK (isfinite(revoked_at) AND revoked_at < '10000-01-01') NOT VALID;
ALTER TABLE nats.account_keys ADD CONSTRAINT account_key_times_finite
  CHECK (isfinite(created_at) AND created_at < '10000-01-01'
         AND isfinite(retired_at) AND retired_at < '10000-01-01') NOT VALID;

DO $$
DECLARE
  c record;
BEGIN
  FOR c IN
    SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
     WHERE connamespace = 'nats'::regnamespace AND NOT convalidated
       AND conname IN ('username_at_most_256_characters', 'user_jwt_ttl_at_most_366_days',
                       'role_user_jwt_ttl_at_most_366_days', 'user_user_jwt_ttl_at_most_366_days',
                       'allow_response_ttl_at_most_1_day', 'export_response_threshold_at_most_1_day',
                       'token_expires_at_finite', 'token_revoked_at_finite', 'account_key_times_finite')
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
-- 4. TRUNCATE skips row triggers: refuse it on the tables whose rows the service must hear about.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION nats.refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'TRUNCATE %.% is not allowed: it skips the row triggers that push account JWTs, drop cached logins, close live connections and delete accounts from nats-server; use DELETE FROM %.% instead',
    TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME
    USING ERRCODE = 'feature_not_supported',
          HINT = format('DELETE FROM %I.%I; fires those triggers (deleting an account also deletes its users, roles, tokens, exports, imports and keys).',
                        TG_TABLE_SCHEMA, TG_TABLE_NAME);
END $$;

CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON nats.accounts
  FOR EACH STATEMENT EXECUTE FUNCTION nats.refuse_truncate();
CREATE TRIGGER roles_no_truncate BEFORE TRUNCATE ON nats.roles
  FOR EACH STATEMENT EXECUTE FUNCTION nats.refuse_truncate();
CREATE TRIGGER users_no_truncate BEFORE TRUNCATE ON nats.users
  FOR EACH STATEMENT EXECUTE FUNCTION nats.refuse_truncate();
CREATE TRIGGER user_tokens_no_truncate BEFORE TRUNCATE ON nats.user_tokens
  FOR EACH STATEMENT EXECUTE FUNCTION nats.refuse_truncate();
CREATE TRIGGER account_exports_no_truncate BEFORE TRUNCATE ON nats.account_exports
  FOR EACH STATEMENT EXECUTE FUNCTION nats.refuse_truncate();
CREATE TRIGGER account_imports_no_truncate BEFORE TRUNCATE ON nats.account_imports
  FOR EACH STATEMENT EXECUTE FUNCTION nats.refuse_truncate();
CREATE TRIGGER account_keys_no_truncate BEFORE TRUNCATE ON nats.account_keys
  FOR EACH STATEMENT EXECUTE FUNCTION nats.refuse_truncate();
