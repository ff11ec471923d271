-- Issue 18, item 3: every CHECK (and NOT NULL) an admin or tenant admin can hit on the admin
-- tables gets a message that says what is wrong and what is allowed. Without these triggers
-- Postgres reports `violates check constraint "…"` with a DETAIL `Failing row contains (…)`
-- that dumps the whole row: the password hash, a token digest. BEFORE ROW triggers run before
-- NOT NULL and CHECK constraints, so the row is refused here first, with no DETAIL. The
-- constraints stay the guarantee (bulk loads that skip triggers still meet them).
--
-- Constraints already explained by earlier triggers (account names, limits, subjects, array
-- bounds, password hashes, token digest length) are not repeated. `tests/it/explain_checks.rs`
-- violates every CHECK of these tables, as the roles that can write them, and fails on a raw
-- message or on one that shows a hash, digest or seed; a new constraint without a case fails it.
-- Values are quoted only where they are names or subjects (never a hash, nkey, token or seed),
-- and at most 64 characters of them.

CREATE FUNCTION nats.refuse_row(tbl text, col text, con text, msg text, hint text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- con NULL: a required column is missing (what NOT NULL would report, with the row).
  IF con IS NULL THEN
    RAISE EXCEPTION '%', msg
      USING ERRCODE = 'not_null_violation', SCHEMA = 'nats', TABLE = tbl, COLUMN = coalesce(col, ''), HINT = hint;
  END IF;
  RAISE EXCEPTION '% (constraint %)', msg, con
    USING ERRCODE = 'check_violation', CONSTRAINT = con, SCHEMA = 'nats', TABLE = tbl,
          COLUMN = coalesce(col, ''), HINT = hint;
END $$;
REVOKE EXECUTE ON FUNCTION nats.refuse_row(text, text, text, text, text) FROM PUBLIC;

-- A name for messages: at most 64 characters, quoted.
CREATE FUNCTION nats.quote_short(v text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN v IS NULL THEN 'NULL'
              WHEN length(v) > 64 THEN quote_literal(left(v, 64)) || '…'
              ELSE quote_literal(v) END
$$;
REVOKE EXECUTE ON FUNCTION nats.quote_short(text) FROM PUBLIC;
-- The trigger functions below run as the writing role and call these two: they only raise
-- or quote what they are given.
GRANT EXECUTE ON FUNCTION nats.refuse_row(text, text, text, text, text), nats.quote_short(text)
  TO nats_pg_auth_service, nats_pg_auth_admin, nats_pg_auth_tenant;

CREATE FUNCTION nats.explain_accounts() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  what text := 'account ' || nats.quote_short(NEW.name);
BEGIN
  IF NEW.name IS NULL THEN
    PERFORM nats.refuse_row('accounts', 'name', NULL,
      'an account needs a name', 'name: 1 to 64 letters, digits, ''_'', ''.'' or ''-'', starting with a letter or digit.');
  END IF;
  IF length(NEW.description) > 1024 THEN
    PERFORM nats.refuse_row('accounts', 'description', 'account_description_at_most_1024_characters',
      format('%s: a description of %s characters is too long', what, length(NEW.description)),
      'description: at most 1024 characters.');
  END IF;
  IF NEW.user_jwt_ttl <= interval '0' THEN
    PERFORM nats.refuse_row('accounts', 'user_jwt_ttl', 'user_jwt_ttl_positive',
      format('%s: user_jwt_ttl %s is not positive', what, NEW.user_jwt_ttl),
      'user_jwt_ttl: more than 0 and at most 366 days (e.g. ''1 hour''), or NULL for --default-ttl.');
  END IF;
  IF NEW.user_jwt_ttl > interval '366 days' THEN
    PERFORM nats.refuse_row('accounts', 'user_jwt_ttl', 'user_jwt_ttl_at_most_366_days',
      format('%s: user_jwt_ttl %s is longer than 366 days', what, NEW.user_jwt_ttl),
      'user_jwt_ttl: more than 0 and at most 366 days (e.g. ''1 hour''), or NULL for --default-ttl.');
  END IF;
  RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION nats.explain_accounts() FROM PUBLIC;
CREATE TRIGGER accounts_explain_checks BEFORE INSERT OR UPDATE ON nats.accounts
  FOR EACH ROW EXECUTE FUNCTION nats.explain_accounts();

CREATE FUNCTION nats.explain_roles() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  what text := 'role ' || nats.quote_short(NEW.name);
  unknown text;
  ttl_hint constant text := 'user_jwt_ttl: more than 0 and at most 366 days (e.g. ''1 hour''), or NULL to use the account''s or --default-ttl.';
  resp_hint constant text := 'allow_response_ttl: more than 0 and at most 1 day (e.g. ''5 seconds''), or NULL for no limit.';
BEGIN
  IF NEW.name IS NULL THEN
    PERFORM nats.refuse_row('roles', 'name', NULL,
      'a role needs a name', 'name: any text of at most 256 characters, unique in its account.');
  END IF;
  IF length(NEW.name) > 256 THEN
    PERFORM nats.refuse_row('roles', 'name', 'role_name_at_most_256_characters',
      format('a role name of %s characters is too long', length(NEW.name)),
      'name: at most 256 characters.');
  END IF;
  IF length(NEW.description) > 1024 THEN
    PERFORM nats.refuse_row('roles', 'description', 'role_description_at_most_1024_characters',
      format('%s: a description of %s characters is too long', what, length(NEW.description)),
      'description: at most 1024 characters.');
  END IF;
  IF NEW.allow_response_ttl <= interval '0' THEN
    PERFORM nats.refuse_row('roles', 'allow_response_ttl', 'allow_response_ttl_positive',
      format('%s: allow_response_ttl %s is not positive', what, NEW.allow_response_ttl), resp_hint);
  END IF;
  IF NEW.allow_response_ttl > interval '1 day' THEN
    PERFORM nats.refuse_row('roles', 'allow_response_ttl', 'allow_response_ttl_at_most_1_day',
      format('%s: allow_response_ttl %s is longer than 1 day', what, NEW.allow_response_ttl), resp_hint);
  END IF;
  IF NEW.user_jwt_ttl <= interval '0' THEN
    PERFORM nats.refuse_row('roles', 'user_jwt_ttl', 'role_user_jwt_ttl_positive',
      format('%s: user_jwt_ttl %s is not positive', what, NEW.user_jwt_ttl), ttl_hint);
  END IF;
  IF NEW.user_jwt_ttl > interval '366 days' THEN
    PERFORM nats.refuse_row('roles', 'user_jwt_ttl', 'role_user_jwt_ttl_at_most_366_days',
      format('%s: user_jwt_ttl %s is longer than 366 days', what, NEW.user_jwt_ttl), ttl_hint);
  END IF;
  IF array_position(NEW.allowed_sources, NULL) IS NOT NULL THEN
    PERFORM nats.refuse_row('roles', 'allowed_sources', 'allowed_sources_no_nulls',
      format('%s: allowed_sources has a NULL entry', what),
      'allowed_sources: client networks such as ''{10.0.0.0/8,192.168.1.7/32}'' (cidr), no NULL; empty allows any source.');
  END IF;
  SELECT string_agg(coalesce(quote_literal(t), 'NULL'), ', ') INTO unknown
    FROM unnest(NEW.allowed_connection_types) AS t
    WHERE t IS NULL OR t <> ALL (ARRAY['STANDARD', 'WEBSOCKET', 'LEAFNODE', 'LEAFNODE_WS', 'MQTT', 'MQTT_WS', 'IN_PROCESS']);
  IF unknown IS NOT NULL THEN
    PERFORM nats.refuse_row('roles', 'allowed_connection_types', 'allowed_connection_types_known',
      format('%s: allowed_connection_types has unknown entries: %s', what, left(unknown, 200)),
      'allowed_connection_types: a subset of STANDARD, WEBSOCKET, LEAFNODE, LEAFNODE_WS, MQTT, MQTT_WS, IN_PROCESS (upper case); empty allows every type.');
  END IF;
  RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION nats.explain_roles() FROM PUBLIC;
CREATE TRIGGER roles_explain_checks BEFORE INSERT OR UPDATE ON nats.roles
  FOR EACH ROW EXECUTE FUNCTION nats.explain_roles();

-- Never quotes the nkey, the hash or anything but the username: an nkey column may hold a seed
-- pasted by mistake.
CREATE FUNCTION nats.explain_users() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  what text := 'user ' || nats.quote_short(NEW.username);
  ttl_hint constant text := 'user_jwt_ttl: more than 0 and at most 366 days (e.g. ''1 hour''), or NULL to use the role''s, the account''s or --default-ttl.';
  name_hint constant text := 'username: 1 to 256 characters without whitespace (no spaces, tabs or newlines), e.g. alice or device-17; case-sensitive.';
BEGIN
  IF NEW.account_id IS NULL THEN
    PERFORM nats.refuse_row('users', 'account_id', NULL,
      format('%s needs an account_id', what),
      'account_id: the id of the user''s account, e.g. (SELECT id FROM nats.accounts WHERE name = ''acme'').');
  END IF;
  IF NEW.username IS NULL THEN
    PERFORM nats.refuse_row('users', 'username', NULL, 'a user needs a username', name_hint);
  END IF;
  IF NEW.username !~ '^\S+$' THEN
    PERFORM nats.refuse_row('users', 'username', 'username_not_blank',
      format('username %s is refused: a username is 1 to 256 characters without spaces or other whitespace', nats.quote_short(NEW.username)),
      name_hint);
  END IF;
  IF length(NEW.username) > 256 THEN
    PERFORM nats.refuse_row('users', 'username', 'username_at_most_256_characters',
      format('a username of %s characters is too long', length(NEW.username)), name_hint);
  END IF;
  IF NEW.nkey !~ '^U[A-Z2-7]{55}$' THEN
    PERFORM nats.refuse_row('users', 'nkey', 'nkey_is_user_public_key',
      format('%s: nkey is not a user public nkey%s', what,
             CASE WHEN NEW.nkey LIKE 'S%' THEN ' (it looks like a seed, the secret half: never store it)'
                  ELSE ' (the value is not repeated here)' END),
      'nkey: the public key of a user key pair, ''U'' and 55 characters of A-Z and 2-7 (56 in all), e.g. the U… line `nk -gen user -pubout` prints; the seed (SU…) stays with the client.');
  END IF;
  IF length(NEW.description) > 1024 THEN
    PERFORM nats.refuse_row('users', 'description', 'user_description_at_most_1024_characters',
      format('%s: a description of %s characters is too long', what, length(NEW.description)),
      'description: at most 1024 characters.');
  END IF;
  IF NEW.user_jwt_ttl <= interval '0' THEN
    PERFORM nats.refuse_row('users', 'user_jwt_ttl', 'user_user_jwt_ttl_positive',
      format('%s: user_jwt_ttl %s is not positive', what, NEW.user_jwt_ttl), ttl_hint);
  END IF;
  IF NEW.user_jwt_ttl > interval '366 days' THEN
    PERFORM nats.refuse_row('users', 'user_jwt_ttl', 'user_user_jwt_ttl_at_most_366_days',
      format('%s: user_jwt_ttl %s is longer than 366 days', what, NEW.user_jwt_ttl), ttl_hint);
  END IF;
  IF array_position(NEW.mqtt_client_ids, NULL) IS NOT NULL OR array_position(NEW.mqtt_client_ids, '') IS NOT NULL THEN
    PERFORM nats.refuse_row('users', 'mqtt_client_ids', 'user_mqtt_client_ids_bounds',
      format('%s: mqtt_client_ids has an empty or NULL entry', what),
      'mqtt_client_ids: the MQTT client ids this user may connect with, e.g. ''{sensor-1,sensor-2}'': at most 100 non-empty ids of at most 512 characters; empty allows any id.');
  END IF;
  RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION nats.explain_users() FROM PUBLIC;
CREATE TRIGGER users_explain_checks BEFORE INSERT OR UPDATE ON nats.users
  FOR EACH ROW EXECUTE FUNCTION nats.explain_users();

-- Runs as its owner so that a digest stored by another tenant is found too (the unique index
-- would refuse it anyway, quoting the digest in its DETAIL); says nothing about whose it is.
CREATE FUNCTION nats.explain_user_tokens() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  time_hint constant text := 'a finite time before year 10000 (e.g. now() + interval ''30 days''), or NULL.';
BEGIN
  IF NEW.user_id IS NULL THEN
    PERFORM nats.refuse_row('user_tokens', 'user_id', NULL,
      'a token needs a user_id',
      'user_id: the id of the token''s user, e.g. (SELECT id FROM nats.users WHERE username = ''alice'').');
  END IF;
  IF NEW.token_sha256 IS NULL THEN
    PERFORM nats.refuse_row('user_tokens', 'token_sha256', NULL,
      'a token needs token_sha256',
      'token_sha256: digest(''the token'', ''sha256'') (pgcrypto); the token itself is never stored.');
  END IF;
  IF length(NEW.description) > 1024 THEN
    PERFORM nats.refuse_row('user_tokens', 'description', 'token_description_at_most_1024_characters',
      format('a token description of %s characters is too long', length(NEW.description)),
      'description: at most 1024 characters.');
  END IF;
  IF NOT (isfinite(NEW.expires_at) AND NEW.expires_at < '10000-01-01') THEN
    PERFORM nats.refuse_row('user_tokens', 'expires_at', 'token_expires_at_finite',
      'a token''s expires_at must be a finite time before year 10000', 'expires_at: ' || time_hint || ' NULL: never expires.');
  END IF;
  IF NOT (isfinite(NEW.revoked_at) AND NEW.revoked_at < '10000-01-01') THEN
    PERFORM nats.refuse_row('user_tokens', 'revoked_at', 'token_revoked_at_finite',
      'a token''s revoked_at must be a finite time before year 10000', 'revoked_at: now() to revoke it; ' || time_hint);
  END IF;
  IF (TG_OP = 'INSERT' OR NEW.token_sha256 IS DISTINCT FROM OLD.token_sha256)
     AND EXISTS (SELECT 1 FROM nats.user_tokens t WHERE t.token_sha256 = NEW.token_sha256 AND t.id IS DISTINCT FROM NEW.id) THEN
    PERFORM nats.refuse_row('user_tokens', 'token_sha256', 'user_tokens_token_sha256_key',
      'this token is already stored (each token may belong to one user only)',
      'Generate a new random token (e.g. `nats-pg-auth token create`, or encode(gen_random_bytes(32), ''hex'')) and store its digest.');
  END IF;
  RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION nats.explain_user_tokens() FROM PUBLIC;
CREATE TRIGGER user_tokens_explain_checks BEFORE INSERT OR UPDATE ON nats.user_tokens
  FOR EACH ROW EXECUTE FUNCTION nats.explain_user_tokens();

CREATE FUNCTION nats.explain_user_certificates() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  id_hint constant text := 'A mapping names the certificate by fingerprint_sha256 (32 bytes, e.g. decode(''ab12…'', ''hex'')), subject_dn (1 to 1024 characters) or san (''email:…'', ''uri:…'' or ''dns:…'', at most 1024 characters); at least one of them.';
BEGIN
  IF NEW.user_id IS NULL THEN
    PERFORM nats.refuse_row('user_certificates', 'user_id', NULL,
      'a certificate mapping needs a user_id',
      'user_id: the id of the user the certificate logs in as.');
  END IF;
  IF NEW.fingerprint_sha256 IS NULL AND NEW.subject_dn IS NULL AND NEW.san IS NULL THEN
    PERFORM nats.refuse_row('user_certificates', NULL, 'certificate_identity_given',
      'a certificate mapping names no certificate: fingerprint_sha256, subject_dn and san are all NULL', id_hint);
  END IF;
  IF octet_length(NEW.fingerprint_sha256) <> 32 THEN
    PERFORM nats.refuse_row('user_certificates', 'fingerprint_sha256', 'certificate_fingerprint_is_32_bytes',
      format('fingerprint_sha256 has %s bytes, not 32', octet_length(NEW.fingerprint_sha256)),
      'fingerprint_sha256: the SHA-256 of the certificate (DER), 32 bytes: decode(''<64 hex digits>'', ''hex''), e.g. from `openssl x509 -noout -fingerprint -sha256` without the colons.');
  END IF;
  IF NOT (char_length(NEW.subject_dn) BETWEEN 1 AND 1024) THEN
    PERFORM nats.refuse_row('user_certificates', 'subject_dn', 'certificate_subject_dn_bounded',
      format('subject_dn has %s characters; 1 to 1024 are allowed', char_length(NEW.subject_dn)), id_hint);
  END IF;
  IF char_length(NEW.san) > 1024 THEN
    PERFORM nats.refuse_row('user_certificates', 'san', 'certificate_san_bounded',
      format('san has %s characters; at most 1024 are allowed', char_length(NEW.san)), id_hint);
  END IF;
  IF NEW.san !~ '^(email|uri|dns):\S' THEN
    PERFORM nats.refuse_row('user_certificates', 'san', 'certificate_san_prefix',
      format('san %s does not start with email:, uri: or dns: followed by the name', nats.quote_short(NEW.san)),
      'san: ''email:alice@example.com'', ''uri:spiffe://example.org/alice'' or ''dns:device-17.example.com''.');
  END IF;
  IF char_length(NEW.description) > 1024 THEN
    PERFORM nats.refuse_row('user_certificates', 'description', 'certificate_description_bounded',
      format('a certificate mapping description of %s characters is too long', char_length(NEW.description)),
      'description: at most 1024 characters.');
  END IF;
  RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION nats.explain_user_certificates() FROM PUBLIC;
CREATE TRIGGER user_certificates_explain_checks BEFORE INSERT OR UPDATE ON nats.user_certificates
  FOR EACH ROW EXECUTE FUNCTION nats.explain_user_certificates();

CREATE FUNCTION nats.explain_account_exports() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  what text := 'export ' || nats.quote_short(coalesce(NEW.name, NEW.subject));
  threshold_hint constant text := 'response_threshold (service exports): more than 0 and at most 1 day (e.g. ''2 seconds''), or NULL.';
BEGIN
  IF NEW.account_id IS NULL THEN
    PERFORM nats.refuse_row('account_exports', 'account_id', NULL,
      format('%s needs an account_id', what), 'account_id: the id of the exporting account.');
  END IF;
  IF NEW.subject IS NULL THEN
    PERFORM nats.refuse_row('account_exports', 'subject', NULL,
      'an export needs a subject', 'subject: the subject (wildcards allowed) other accounts may import, e.g. ''telemetry.>''.');
  END IF;
  IF NEW.type IS NULL OR NEW.type NOT IN ('stream', 'service') THEN
    PERFORM nats.refuse_row('account_exports', 'type',
      CASE WHEN NEW.type IS NOT NULL THEN 'export_type_known' END,
      format('%s: type %s is not stream or service', what, nats.quote_short(NEW.type)),
      'type: ''stream'' (messages published on the subject) or ''service'' (requests answered on it), lower case.');
  END IF;
  IF length(NEW.name) > 256 THEN
    PERFORM nats.refuse_row('account_exports', 'name', 'export_name_at_most_256_characters',
      format('an export name of %s characters is too long', length(NEW.name)), 'name: at most 256 characters.');
  END IF;
  IF length(NEW.subject) > 512 THEN
    PERFORM nats.refuse_row('account_exports', 'subject', 'export_subject_at_most_512_characters',
      format('%s: a subject of %s characters is too long', what, length(NEW.subject)), 'subject: at most 512 characters.');
  END IF;
  IF length(NEW.description) > 1024 THEN
    PERFORM nats.refuse_row('account_exports', 'description', 'export_description_at_most_1024_characters',
      format('%s: a description of %s characters is too long', what, length(NEW.description)),
      'description: at most 1024 characters.');
  END IF;
  IF NEW.response_type NOT IN ('Singleton', 'Stream', 'Chunked') THEN
    PERFORM nats.refuse_row('account_exports', 'response_type', 'export_response_type_known',
      format('%s: response_type %s is not Singleton, Stream or Chunked', what, nats.quote_short(NEW.response_type)),
      'response_type (service exports): ''Singleton'' (one reply), ''Stream'' or ''Chunked'', as written, or NULL for Singleton.');
  END IF;
  IF NEW.response_threshold <= interval '0' THEN
    PERFORM nats.refuse_row('account_exports', 'response_threshold', 'export_response_threshold_positive',
      format('%s: response_threshold %s is not positive', what, NEW.response_threshold), threshold_hint);
  END IF;
  IF NEW.response_threshold > interval '1 day' THEN
    PERFORM nats.refuse_row('account_exports', 'response_threshold', 'export_response_threshold_at_most_1_day',
      format('%s: response_threshold %s is longer than 1 day', what, NEW.response_threshold), threshold_hint);
  END IF;
  IF NEW.type = 'stream' AND (NEW.response_type IS NOT NULL OR NEW.response_threshold IS NOT NULL OR NEW.allow_trace) THEN
    PERFORM nats.refuse_row('account_exports', NULL, 'export_service_only_fields',
      format('%s is a stream export: response_type, response_threshold and allow_trace apply to service exports only', what),
      'Leave response_type and response_threshold NULL and allow_trace false on a stream export, or make it type ''service''.');
  END IF;
  IF NEW.account_token_position <= 0 THEN
    PERFORM nats.refuse_row('account_exports', 'account_token_position', 'export_account_token_position_positive',
      format('%s: account_token_position %s is not a token position', what, NEW.account_token_position),
      'account_token_position: the 1-based position of the subject token that must be the importer''s public key (e.g. 2 for ''orders.*.>''), or NULL.');
  END IF;
  RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION nats.explain_account_exports() FROM PUBLIC;
CREATE TRIGGER exports_explain_checks BEFORE INSERT OR UPDATE ON nats.account_exports
  FOR EACH ROW EXECUTE FUNCTION nats.explain_account_exports();

-- The activation token is not quoted: it is a JWT granted to this account.
CREATE FUNCTION nats.explain_account_imports() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  what text := 'import ' || nats.quote_short(coalesce(NEW.name, NEW.subject));
  exporter_hint constant text := 'Set exactly one of exporter_account_id (an account of this database, e.g. (SELECT id FROM nats.accounts WHERE name = ''acme'')) and exporter_public_key (an account public key ''A…'' of 56 characters, for an account outside this database).';
BEGIN
  IF NEW.account_id IS NULL THEN
    PERFORM nats.refuse_row('account_imports', 'account_id', NULL,
      format('%s needs an account_id', what), 'account_id: the id of the importing account.');
  END IF;
  IF NEW.subject IS NULL THEN
    PERFORM nats.refuse_row('account_imports', 'subject', NULL,
      'an import needs a subject', 'subject: the exported subject (or a part of it) to import, e.g. ''telemetry.>''.');
  END IF;
  IF NEW.type IS NULL OR NEW.type NOT IN ('stream', 'service') THEN
    PERFORM nats.refuse_row('account_imports', 'type',
      CASE WHEN NEW.type IS NOT NULL THEN 'import_type_known' END,
      format('%s: type %s is not stream or service', what, nats.quote_short(NEW.type)),
      'type: ''stream'' or ''service'' (lower case), the type of the export it imports.');
  END IF;
  IF (NEW.exporter_account_id IS NULL) = (NEW.exporter_public_key IS NULL) THEN
    PERFORM nats.refuse_row('account_imports', NULL, 'import_exactly_one_exporter',
      format('%s: %s', what, CASE WHEN NEW.exporter_account_id IS NULL THEN 'no exporter is given'
                                   ELSE 'both exporter_account_id and exporter_public_key are given' END),
      exporter_hint);
  END IF;
  IF NEW.exporter_public_key !~ '^A[A-Z2-7]{55}$' THEN
    PERFORM nats.refuse_row('account_imports', 'exporter_public_key', 'import_exporter_public_key_format',
      format('%s: exporter_public_key is not an account public key', what), exporter_hint);
  END IF;
  IF NEW.exporter_account_id = NEW.account_id THEN
    PERFORM nats.refuse_row('account_imports', 'exporter_account_id', 'import_not_from_itself',
      format('%s: an account cannot import from itself', what),
      'exporter_account_id: another account; within one account, publish and subscribe on the subject directly.');
  END IF;
  IF length(NEW.name) > 256 THEN
    PERFORM nats.refuse_row('account_imports', 'name', 'import_name_at_most_256_characters',
      format('an import name of %s characters is too long', length(NEW.name)), 'name: at most 256 characters.');
  END IF;
  IF length(NEW.subject) > 512 OR length(NEW.local_subject) > 512 THEN
    PERFORM nats.refuse_row('account_imports', CASE WHEN length(NEW.subject) > 512 THEN 'subject' ELSE 'local_subject' END,
      'import_subjects_at_most_512_characters',
      format('%s: a subject of %s characters is too long', what, greatest(length(NEW.subject), length(NEW.local_subject))),
      'subject and local_subject: at most 512 characters each.');
  END IF;
  IF length(NEW.token) > 16384 THEN
    PERFORM nats.refuse_row('account_imports', 'token', 'import_token_at_most_16384_characters',
      format('%s: an activation token of %s characters is too long', what, length(NEW.token)),
      'token: the activation JWT the exporter issued (at most 16384 characters), or NULL when the export is public or granted in nats.account_export_grants.');
  END IF;
  IF length(NEW.description) > 1024 THEN
    PERFORM nats.refuse_row('account_imports', 'description', 'import_description_at_most_1024_characters',
      format('%s: a description of %s characters is too long', what, length(NEW.description)),
      'description: at most 1024 characters.');
  END IF;
  RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION nats.explain_account_imports() FROM PUBLIC;
CREATE TRIGGER imports_explain_checks BEFORE INSERT OR UPDATE ON nats.account_imports
  FOR EACH ROW EXECUTE FUNCTION nats.explain_account_imports();

CREATE FUNCTION nats.explain_account_export_grants() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF length(NEW.description) > 1024 THEN
    PERFORM nats.refuse_row('account_export_grants', 'description', 'export_grant_description_at_most_1024_characters',
      format('an export grant description of %s characters is too long', length(NEW.description)),
      'description: at most 1024 characters.');
  END IF;
  RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION nats.explain_account_export_grants() FROM PUBLIC;
CREATE TRIGGER export_grants_explain_checks BEFORE INSERT OR UPDATE ON nats.account_export_grants
  FOR EACH ROW EXECUTE FUNCTION nats.explain_account_export_grants();
