-- Clear errors for bad limits and account names (issue 10). The CHECK constraints of 0001 stay;
-- these BEFORE triggers reject the same rows first, with a message that names the column and
-- the rule, instead of Postgres' "Failing row contains (…)" detail that dumps the whole row
-- (an account's JWT included). The constraint names are kept in the message and the error, so
-- code matching on them keeps working.

CREATE FUNCTION nats.check_limits() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  col text;
  val jsonb;
  -- TG_ARGV[0]: the prefix of this table's constraint names ('', 'role_', 'user_').
  prefix text := coalesce(TG_ARGV[0], '');
BEGIN
  IF TG_TABLE_NAME = 'accounts'
     AND (to_jsonb(NEW) ->> 'name') !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$' THEN
    RAISE EXCEPTION 'invalid account name %: 1 to 64 letters, digits, ''_'', ''.'' or ''-'', starting with a letter or digit (constraint account_name_format)',
      quote_literal(to_jsonb(NEW) ->> 'name')
      USING ERRCODE = 'check_violation', CONSTRAINT = 'account_name_format',
            SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = 'name';
  END IF;
  FOR col, val IN
    SELECT key, value FROM jsonb_each(to_jsonb(NEW))
    WHERE (key LIKE 'max\_%' OR key = 'allow_response_max') AND jsonb_typeof(value) = 'number'
  LOOP
    IF val::numeric < -1 THEN
      RAISE EXCEPTION '%.% must be -1 (unlimited), 0 or more; got % (constraint %)',
        TG_TABLE_NAME, col, val,
        CASE WHEN col = 'allow_response_max' THEN col ELSE prefix || col END || '_at_least_minus_one'
        USING ERRCODE = 'check_violation',
              CONSTRAINT = CASE WHEN col = 'allow_response_max' THEN col ELSE prefix || col END || '_at_least_minus_one',
              SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = col;
    END IF;
  END LOOP;
  RETURN NEW;
END $$;

CREATE TRIGGER accounts_check_limits
  BEFORE INSERT OR UPDATE OF name, max_connections, max_leafnodes, max_subscriptions, max_data,
    max_payload, max_imports, max_exports, max_jetstream_memory_storage,
    max_jetstream_disk_storage, max_jetstream_streams, max_jetstream_consumers
  ON nats.accounts FOR EACH ROW EXECUTE FUNCTION nats.check_limits('');
CREATE TRIGGER roles_check_limits
  BEFORE INSERT OR UPDATE OF allow_response_max, max_subscriptions, max_data, max_payload
  ON nats.roles FOR EACH ROW EXECUTE FUNCTION nats.check_limits('role_');
CREATE TRIGGER users_check_limits
  BEFORE INSERT OR UPDATE OF max_subscriptions, max_data, max_payload
  ON nats.users FOR EACH ROW EXECUTE FUNCTION nats.check_limits('user_');
