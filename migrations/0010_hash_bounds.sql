-- Password hash work factors a service can afford (issue 15, finding 2). 0004 allowed bcrypt
-- cost 14 (~1.3 s per check on a 2-core machine, most of nats-server's 2 s auth timeout) and
-- argon2id m = 1 GiB (two hashing threads: 2 GiB, four times the 512 MiB the Kubernetes
-- manifests give the container): one tenant row could OOM-kill every replica. The new bounds
-- match the service's defaults (--max-bcrypt-cost 12, --max-argon2-memory-kib 65536,
-- --max-argon2-iterations 8, --max-argon2-parallelism 16): bcrypt cost 12 takes ~350 ms,
-- argon2id m=64 MiB,t=8 ~270 ms, and the default three hashing threads hold at most 192 MiB.
--
-- Existing rows are NOT re-checked (a CHECK constraint is only evaluated on INSERT/UPDATE): a
-- row above the new bounds stays, with a WARNING below, and the service refuses its password
-- logins without hashing (deny reason internal_error, "refused without hashing") until it is
-- replaced. As in 0004: to move the bounds, replace this function AND pass the matching flags.
CREATE OR REPLACE FUNCTION nats.password_hash_limits(
  OUT bcrypt_min_cost integer,
  OUT bcrypt_max_cost integer,
  OUT argon2_max_memory_kib bigint,
  OUT argon2_max_iterations integer,
  OUT argon2_max_parallelism integer)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT 4, 12, 65536::bigint, 8, 16   -- bcrypt 4..12; argon2id m <= 64 MiB, t <= 8, p <= 16
$$;

-- The refusal's HINT states the bounds from the function instead of a copy of them.
CREATE OR REPLACE FUNCTION nats.check_password_hash() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  problem text := nats.password_hash_problem(NEW.password_hash);
  lim record;
BEGIN
  IF problem IS NOT NULL THEN
    lim := nats.password_hash_limits();
    RAISE EXCEPTION 'password_hash of user "%" is refused: % (constraint password_hash_is_bcrypt_or_argon2id)',
      NEW.username, problem
      USING ERRCODE = 'check_violation', CONSTRAINT = 'password_hash_is_bcrypt_or_argon2id',
            SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = 'password_hash',
            HINT = 'Store a hash, never the password: password_hash = crypt(''the password'', gen_salt(''bf'', 10)), '
                || 'or an argon2id PHC string ($argon2id$v=19$m=19456,t=2,p=1$...). Work factors are bounded by '
                || format('nats.password_hash_limits(): bcrypt cost %s..%s, argon2id m <= %s KiB, t <= %s, p <= %s. ',
                          lim.bcrypt_min_cost, lim.bcrypt_max_cost, lim.argon2_max_memory_kib,
                          lim.argon2_max_iterations, lim.argon2_max_parallelism)
                || 'NULL means the user logs in with tokens only.';
  END IF;
  RETURN NEW;
END $$;

DO $$
DECLARE
  n bigint;
BEGIN
  SELECT count(*) INTO n FROM nats.users WHERE NOT nats.valid_password_hash(password_hash);
  IF n > 0 THEN
    RAISE WARNING '% user(s) have a password_hash outside nats.password_hash_limits() (bcrypt cost 4..12, argon2id m <= 65536 KiB, t <= 8, p <= 16 since migration 0010); the service refuses their password logins without hashing until it is replaced (SELECT username, nats.password_hash_problem(password_hash) FROM nats.users WHERE NOT nats.valid_password_hash(password_hash))', n;
  END IF;
END $$;
