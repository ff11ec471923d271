//! Issue 18, item 3: a bad row written in psql by a tenant admin or an admin is refused with a
//! message that says what is wrong and what is allowed, never with Postgres' raw
//! `violates check constraint` and its DETAIL `Failing row contains (…)`, which dumps the row:
//! the password hash, a token digest. Every CHECK constraint of the admin tables (read from the
//! catalog) must have a case here, so a new one without a friendly message fails this test.

use sqlx::postgres::PgDatabaseError;
use sqlx::PgPool;

use crate::common::{create_login_role, tenant_admin, TestEnv};

/// The tables of docs/admin-guide.md an admin or tenant admin writes.
const ADMIN_TABLES: &[&str] = &[
    "accounts",
    "roles",
    "users",
    "user_tokens",
    "user_certificates",
    "account_exports",
    "account_imports",
    "account_export_grants",
    "account_admins",
];

#[derive(Clone, Copy, Debug)]
enum Who {
    /// A tenant admin of acme.
    Tenant,
    /// A member of nats_pg_auth_admin (accounts, nkeys and certificates are theirs).
    Admin,
}

/// (constraint, who, a statement that breaks it). `alice` (acme) has a password hash and the
/// token 'alice-token'; acme exports `tel` (stream) and `svc` (service) and imports `tel` of
/// globex; the grant lets globex import acme's `svc`.
const CASES: &[(&str, Who, &str)] = &[
    // nats.accounts
    ("account_description_at_most_1024_characters", Who::Tenant, "UPDATE nats.accounts SET description = repeat('x', 1025) WHERE name = 'acme'"),
    ("account_name_format", Who::Admin, "INSERT INTO nats.accounts (name) VALUES ('bad name')"),
    ("max_connections_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_connections = -2 WHERE name = 'acme'"),
    ("max_data_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_data = -2 WHERE name = 'acme'"),
    ("max_exports_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_exports = -2 WHERE name = 'acme'"),
    ("max_imports_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_imports = -2 WHERE name = 'acme'"),
    ("max_jetstream_consumers_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_jetstream_consumers = -2 WHERE name = 'acme'"),
    ("max_jetstream_disk_storage_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_jetstream_disk_storage = -2 WHERE name = 'acme'"),
    ("max_jetstream_memory_storage_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_jetstream_memory_storage = -2 WHERE name = 'acme'"),
    ("max_jetstream_streams_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_jetstream_streams = -2 WHERE name = 'acme'"),
    ("max_leafnodes_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_leafnodes = -2 WHERE name = 'acme'"),
    ("max_payload_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_payload = -2 WHERE name = 'acme'"),
    ("max_subscriptions_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_subscriptions = -2 WHERE name = 'acme'"),
    ("max_users_at_least_minus_one", Who::Admin, "UPDATE nats.accounts SET max_users = -2 WHERE name = 'acme'"),
    ("user_jwt_ttl_at_most_366_days", Who::Admin, "UPDATE nats.accounts SET user_jwt_ttl = '400 days' WHERE name = 'acme'"),
    ("user_jwt_ttl_positive", Who::Admin, "UPDATE nats.accounts SET user_jwt_ttl = '0' WHERE name = 'acme'"),
    // nats.roles
    ("allow_response_max_at_least_minus_one", Who::Tenant, "UPDATE nats.roles SET allow_response_max = -2 WHERE name = 'sensor'"),
    ("allow_response_ttl_at_most_1_day", Who::Tenant, "UPDATE nats.roles SET allow_response_ttl = '2 days' WHERE name = 'sensor'"),
    ("allow_response_ttl_positive", Who::Tenant, "UPDATE nats.roles SET allow_response_ttl = '-1 second' WHERE name = 'sensor'"),
    ("allowed_connection_types_bounded", Who::Tenant, "UPDATE nats.roles SET allowed_connection_types = array_fill('MQTT'::text, ARRAY[17]) WHERE name = 'sensor'"),
    ("allowed_connection_types_known", Who::Tenant, "UPDATE nats.roles SET allowed_connection_types = '{mqtt}' WHERE name = 'sensor'"),
    ("allowed_sources_bounded", Who::Tenant, "UPDATE nats.roles SET allowed_sources = array_fill('10.0.0.0/8'::cidr, ARRAY[101]) WHERE name = 'sensor'"),
    ("allowed_sources_no_nulls", Who::Tenant, "UPDATE nats.roles SET allowed_sources = ARRAY[NULL]::cidr[] WHERE name = 'sensor'"),
    ("publish_deny_permissions_are_subjects", Who::Tenant, "UPDATE nats.roles SET publish_deny_permissions = '{a..b}' WHERE name = 'sensor'"),
    ("publish_deny_permissions_bounded", Who::Tenant, "UPDATE nats.roles SET publish_deny_permissions = array_fill('a'::text, ARRAY[1001]) WHERE name = 'sensor'"),
    ("publish_permissions_are_subjects", Who::Tenant, "UPDATE nats.roles SET publish_permissions = '{a..b}' WHERE name = 'sensor'"),
    ("publish_permissions_bounded", Who::Tenant, "UPDATE nats.roles SET publish_permissions = array_fill('a'::text, ARRAY[1001]) WHERE name = 'sensor'"),
    ("role_description_at_most_1024_characters", Who::Tenant, "UPDATE nats.roles SET description = repeat('x', 1025) WHERE name = 'sensor'"),
    ("role_max_data_at_least_minus_one", Who::Tenant, "UPDATE nats.roles SET max_data = -2 WHERE name = 'sensor'"),
    ("role_max_payload_at_least_minus_one", Who::Tenant, "UPDATE nats.roles SET max_payload = -2 WHERE name = 'sensor'"),
    ("role_max_subscriptions_at_least_minus_one", Who::Tenant, "UPDATE nats.roles SET max_subscriptions = -2 WHERE name = 'sensor'"),
    ("role_name_at_most_256_characters", Who::Tenant, "UPDATE nats.roles SET name = repeat('r', 257) WHERE name = 'sensor'"),
    ("role_user_jwt_ttl_at_most_366_days", Who::Tenant, "UPDATE nats.roles SET user_jwt_ttl = '367 days' WHERE name = 'sensor'"),
    ("role_user_jwt_ttl_positive", Who::Tenant, "UPDATE nats.roles SET user_jwt_ttl = '0' WHERE name = 'sensor'"),
    ("subscribe_deny_permissions_are_subjects", Who::Tenant, "UPDATE nats.roles SET subscribe_deny_permissions = '{\"a b c\"}' WHERE name = 'sensor'"),
    ("subscribe_deny_permissions_bounded", Who::Tenant, "UPDATE nats.roles SET subscribe_deny_permissions = array_fill('a'::text, ARRAY[1001]) WHERE name = 'sensor'"),
    ("subscribe_permissions_are_subjects", Who::Tenant, "UPDATE nats.roles SET subscribe_permissions = '{a.>.b}' WHERE name = 'sensor'"),
    ("subscribe_permissions_bounded", Who::Tenant, "UPDATE nats.roles SET subscribe_permissions = array_fill('a'::text, ARRAY[1001]) WHERE name = 'sensor'"),
    // nats.users: every case updates alice, whose row holds a password hash.
    ("nkey_is_user_public_key", Who::Admin, "UPDATE nats.users SET nkey = 'UABC' WHERE username = 'alice'"),
    ("password_hash_is_bcrypt_or_argon2id", Who::Tenant, "UPDATE nats.users SET password_hash = 'hunter2' WHERE username = 'alice'"),
    ("user_description_at_most_1024_characters", Who::Tenant, "UPDATE nats.users SET description = repeat('x', 1025) WHERE username = 'alice'"),
    ("user_max_data_at_least_minus_one", Who::Tenant, "UPDATE nats.users SET max_data = -2 WHERE username = 'alice'"),
    ("user_max_payload_at_least_minus_one", Who::Tenant, "UPDATE nats.users SET max_payload = -2 WHERE username = 'alice'"),
    ("user_max_subscriptions_at_least_minus_one", Who::Tenant, "UPDATE nats.users SET max_subscriptions = -2 WHERE username = 'alice'"),
    ("user_mqtt_client_id_length_bounded", Who::Tenant, "UPDATE nats.users SET mqtt_client_ids = ARRAY[repeat('c', 513)] WHERE username = 'alice'"),
    ("user_mqtt_client_ids_bounds", Who::Tenant, "UPDATE nats.users SET mqtt_client_ids = '{\"\"}' WHERE username = 'alice'"),
    ("user_publish_deny_permissions_are_subjects", Who::Tenant, "UPDATE nats.users SET publish_deny_permissions = '{\"has space\"}' WHERE username = 'alice'"),
    ("user_publish_deny_permissions_bounded", Who::Tenant, "UPDATE nats.users SET publish_deny_permissions = array_fill('a'::text, ARRAY[1001]) WHERE username = 'alice'"),
    ("user_publish_permissions_are_subjects", Who::Tenant, "UPDATE nats.users SET publish_permissions = '{\"sensors.* q\"}' WHERE username = 'alice'"),
    ("user_publish_permissions_bounded", Who::Tenant, "UPDATE nats.users SET publish_permissions = array_fill('a'::text, ARRAY[1001]) WHERE username = 'alice'"),
    ("user_subscribe_deny_permissions_are_subjects", Who::Tenant, "UPDATE nats.users SET subscribe_deny_permissions = '{a..b}' WHERE username = 'alice'"),
    ("user_subscribe_deny_permissions_bounded", Who::Tenant, "UPDATE nats.users SET subscribe_deny_permissions = array_fill('a'::text, ARRAY[1001]) WHERE username = 'alice'"),
    ("user_subscribe_permissions_are_subjects", Who::Tenant, "UPDATE nats.users SET subscribe_permissions = '{a..b}' WHERE username = 'alice'"),
    ("user_subscribe_permissions_bounded", Who::Tenant, "UPDATE nats.users SET subscribe_permissions = array_fill('a'::text, ARRAY[1001]) WHERE username = 'alice'"),
    ("user_user_jwt_ttl_at_most_366_days", Who::Tenant, "UPDATE nats.users SET user_jwt_ttl = '367 days' WHERE username = 'alice'"),
    ("user_user_jwt_ttl_positive", Who::Tenant, "UPDATE nats.users SET user_jwt_ttl = '0' WHERE username = 'alice'"),
    ("username_at_most_256_characters", Who::Tenant, "UPDATE nats.users SET username = repeat('a', 257) WHERE username = 'alice'"),
    ("username_not_blank", Who::Tenant, "UPDATE nats.users SET username = 'alice smith' WHERE username = 'alice'"),
    // nats.user_tokens: every case updates alice's token, whose row holds its digest.
    ("token_description_at_most_1024_characters", Who::Tenant, "UPDATE nats.user_tokens SET description = repeat('x', 1025)"),
    ("token_expires_at_finite", Who::Tenant, "UPDATE nats.user_tokens SET expires_at = 'infinity'"),
    ("token_revoked_at_finite", Who::Tenant, "UPDATE nats.user_tokens SET revoked_at = '10000-01-02'"),
    ("token_sha256_is_32_bytes", Who::Tenant, "UPDATE nats.user_tokens SET token_sha256 = digest('x', 'md5')"),
    // nats.user_certificates (an admin maps certificates)
    ("certificate_description_bounded", Who::Admin, "UPDATE nats.user_certificates SET description = repeat('x', 1025)"),
    ("certificate_fingerprint_is_32_bytes", Who::Admin, "UPDATE nats.user_certificates SET fingerprint_sha256 = '\\x0102'"),
    ("certificate_identity_given", Who::Admin, "UPDATE nats.user_certificates SET fingerprint_sha256 = NULL, subject_dn = NULL, san = NULL"),
    ("certificate_san_bounded", Who::Admin, "UPDATE nats.user_certificates SET san = 'dns:' || repeat('d', 1021)"),
    ("certificate_san_prefix", Who::Admin, "UPDATE nats.user_certificates SET san = 'alice@example.com'"),
    ("certificate_subject_dn_bounded", Who::Admin, "UPDATE nats.user_certificates SET subject_dn = ''"),
    // nats.account_exports
    ("export_account_token_position_positive", Who::Tenant, "UPDATE nats.account_exports SET account_token_position = 0 WHERE name = 'tel'"),
    ("export_description_at_most_1024_characters", Who::Tenant, "UPDATE nats.account_exports SET description = repeat('x', 1025) WHERE name = 'tel'"),
    ("export_name_at_most_256_characters", Who::Tenant, "UPDATE nats.account_exports SET name = repeat('e', 257) WHERE name = 'tel'"),
    ("export_response_threshold_at_most_1_day", Who::Tenant, "UPDATE nats.account_exports SET response_threshold = '2 days' WHERE name = 'svc'"),
    ("export_response_threshold_positive", Who::Tenant, "UPDATE nats.account_exports SET response_threshold = '0' WHERE name = 'svc'"),
    ("export_response_type_known", Who::Tenant, "UPDATE nats.account_exports SET response_type = 'singleton' WHERE name = 'svc'"),
    ("export_service_only_fields", Who::Tenant, "UPDATE nats.account_exports SET response_type = 'Stream' WHERE name = 'tel'"),
    ("export_subject_at_most_512_characters", Who::Tenant, "UPDATE nats.account_exports SET subject = 'tel.' || repeat('t', 509) WHERE name = 'tel'"),
    ("export_subject_valid", Who::Tenant, "UPDATE nats.account_exports SET subject = 'tel..x' WHERE name = 'tel'"),
    ("export_type_known", Who::Tenant, "UPDATE nats.account_exports SET type = 'Stream' WHERE name = 'tel'"),
    // nats.account_imports
    ("import_description_at_most_1024_characters", Who::Tenant, "UPDATE nats.account_imports SET description = repeat('x', 1025)"),
    ("import_exactly_one_exporter", Who::Tenant, "UPDATE nats.account_imports SET exporter_account_id = NULL"),
    ("import_exporter_public_key_format", Who::Tenant, "UPDATE nats.account_imports SET exporter_account_id = NULL, exporter_public_key = 'ACME'"),
    ("import_local_subject_valid", Who::Tenant, "UPDATE nats.account_imports SET local_subject = 'x.>.y'"),
    ("import_name_at_most_256_characters", Who::Tenant, "UPDATE nats.account_imports SET name = repeat('i', 257)"),
    ("import_not_from_itself", Who::Tenant, "UPDATE nats.account_imports SET exporter_account_id = account_id"),
    ("import_subject_valid", Who::Tenant, "UPDATE nats.account_imports SET subject = 'tel.>.x'"),
    ("import_subjects_at_most_512_characters", Who::Tenant, "UPDATE nats.account_imports SET local_subject = 'l.' || repeat('l', 511)"),
    ("import_token_at_most_16384_characters", Who::Tenant, "UPDATE nats.account_imports SET token = repeat('t', 16385)"),
    ("import_type_known", Who::Tenant, "UPDATE nats.account_imports SET type = 'services'"),
    // nats.account_export_grants
    ("export_grant_description_at_most_1024_characters", Who::Tenant, "UPDATE nats.account_export_grants SET description = repeat('x', 1025)"),
];

/// Required columns left out and a duplicate token: NOT NULL and UNIQUE also used to quote the
/// row or the digest.
const MORE_CASES: &[(&str, Who, &str)] = &[
    ("needs an account_id", Who::Tenant, "INSERT INTO nats.users (username, password_hash) VALUES ('bob', crypt('pw', gen_salt('bf', 4)))"),
    ("needs a username", Who::Tenant, "INSERT INTO nats.users (account_id, password_hash) SELECT id, crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'acme'"),
    ("needs a user_id", Who::Tenant, "INSERT INTO nats.user_tokens (token_sha256) VALUES (digest('t2', 'sha256'))"),
    ("needs token_sha256", Who::Tenant, "INSERT INTO nats.user_tokens (user_id) SELECT id FROM nats.users WHERE username = 'alice'"),
    ("already stored", Who::Tenant, "INSERT INTO nats.user_tokens (user_id, token_sha256) SELECT id, digest('alice-token', 'sha256') FROM nats.users WHERE username = 'alice'"),
    ("needs a name", Who::Tenant, "INSERT INTO nats.roles (account_id) SELECT id FROM nats.accounts WHERE name = 'acme'"),
    ("needs a subject", Who::Tenant, "INSERT INTO nats.account_exports (account_id, type) SELECT id, 'stream' FROM nats.accounts WHERE name = 'acme'"),
    ("not stream or service", Who::Tenant, "INSERT INTO nats.account_exports (account_id, subject) SELECT id, 'x.>' FROM nats.accounts WHERE name = 'acme'"),
];

const SETUP: &str = "
    INSERT INTO nats.accounts (name) VALUES ('globex');
    INSERT INTO nats.user_tokens (user_id, token_sha256)
      SELECT id, digest('alice-token', 'sha256') FROM nats.users WHERE username = 'alice';
    INSERT INTO nats.user_certificates (user_id, fingerprint_sha256, subject_dn, san)
      SELECT id, digest('cert', 'sha256'), 'CN=alice', 'dns:alice.example.com' FROM nats.users WHERE username = 'alice';
    INSERT INTO nats.account_exports (account_id, name, subject, type)
      SELECT id, 'tel', 'tel.>', 'stream' FROM nats.accounts WHERE name = 'acme';
    INSERT INTO nats.account_exports (account_id, name, subject, type, response_type)
      SELECT id, 'svc', 'svc.>', 'service', 'Singleton' FROM nats.accounts WHERE name = 'acme';
    INSERT INTO nats.account_exports (account_id, name, subject, type)
      SELECT id, 'tel', 'tel.>', 'stream' FROM nats.accounts WHERE name = 'globex';
    INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, type)
      SELECT a.id, 'tel', 'tel.>', g.id, 'stream' FROM nats.accounts a, nats.accounts g
      WHERE a.name = 'acme' AND g.name = 'globex';
    INSERT INTO nats.account_export_grants (export_id, importer_account_id)
      SELECT e.id, g.id FROM nats.account_exports e JOIN nats.accounts a ON a.id = e.account_id, nats.accounts g
      WHERE a.name = 'acme' AND e.name = 'svc' AND g.name = 'globex';";

/// Every secret of the database an error could show: password hashes, token digests (as
/// Postgres prints bytea, and as hex), seeds as stored.
async fn secrets(pool: &PgPool) -> Vec<String> {
    let mut out: Vec<String> = sqlx::query_scalar(
        "SELECT password_hash FROM nats.users WHERE password_hash IS NOT NULL
         UNION ALL SELECT encode(token_sha256, 'hex') FROM nats.user_tokens
         UNION ALL SELECT seed FROM nats.service_identities
         UNION ALL SELECT seed FROM nats.account_keys WHERE seed IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .expect("read the secrets");
    out.retain(|s| s.len() >= 16);
    assert!(
        out.len() > 3,
        "the test database holds a hash, a digest and seeds"
    );
    out
}

/// Runs `sql` in a transaction that is rolled back, as `pool`'s role; the error it must fail with.
async fn refused(pool: &PgPool, sql: &str) -> Box<PgDatabaseError> {
    let mut tx = pool.begin().await.expect("begin");
    let result = sqlx::raw_sql(sql).execute(&mut *tx).await;
    let _ = tx.rollback().await;
    match result {
        Ok(done) => panic!("not refused ({} rows changed): {sql}", done.rows_affected()),
        Err(sqlx::Error::Database(e)) => e.downcast::<PgDatabaseError>(),
        Err(e) => panic!("{sql}: not a database error: {e}"),
    }
}

/// What a reader of the error sees must not show the row or a secret, and must say what is
/// allowed (the HINT).
fn check_shown(sql: &str, e: &PgDatabaseError, secrets: &[String], problems: &mut Vec<String>) {
    let shown = format!(
        "{}\nDETAIL: {}\nHINT: {}",
        e.message(),
        e.detail().unwrap_or(""),
        e.hint().unwrap_or("")
    );
    if e.message().contains("violates") || e.detail().is_some() {
        problems.push(format!("raw error for {sql}:\n  {shown}"));
    }
    // What is allowed: in the HINT, or (older triggers) in the message itself.
    let says_allowed = e.hint().unwrap_or("").len() >= 20
        || ["allowed", "must be", "at most", "1 to "]
            .iter()
            .any(|w| e.message().contains(w));
    if !says_allowed {
        problems.push(format!(
            "nothing says what is allowed for {sql}:\n  {shown}"
        ));
    }
    for secret in secrets {
        if shown.contains(secret.as_str()) {
            problems.push(format!("a secret is shown for {sql}:\n  {shown}"));
        }
    }
}

#[tokio::test]
async fn every_admin_constraint_explains_itself_without_showing_secrets() {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql(SETUP).await;
    let (_, tenant) = tenant_admin(&env, "acme").await;
    let (_, admin_url) =
        create_login_role(&env.pool, &env.database_url, "nats_pg_auth_admin").await;
    let admin = PgPool::connect(&admin_url).await.expect("connect as admin");
    let secrets = secrets(&env.pool).await;

    // Every CHECK of the admin tables has a case: a new constraint needs its message.
    let in_catalog: Vec<String> = sqlx::query_scalar(
        "SELECT c.conname::text FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
         WHERE c.contype = 'c' AND t.relnamespace = 'nats'::regnamespace AND t.relname = ANY($1)
         ORDER BY 1",
    )
    .bind(ADMIN_TABLES)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let missing: Vec<&String> = in_catalog
        .iter()
        .filter(|c| !CASES.iter().any(|(name, _, _)| name == c))
        .collect();
    assert!(
        missing.is_empty(),
        "CHECK constraints without a case (add a friendly message in a BEFORE trigger, then a case here): {missing:?}"
    );

    let mut problems = vec![];
    for (constraint, who, sql) in CASES {
        let pool = match who {
            Who::Tenant => &tenant,
            Who::Admin => &admin,
        };
        let e = refused(pool, sql).await;
        if e.code() != "23514" || e.constraint() != Some(*constraint) {
            problems.push(format!(
                "{sql}: expected a check_violation of {constraint}, got {} {:?}: {}",
                e.code(),
                e.constraint(),
                e.message()
            ));
        }
        if !e.message().contains(&format!("(constraint {constraint})")) {
            problems.push(format!(
                "{sql}: the message does not name {constraint}: {}",
                e.message()
            ));
        }
        check_shown(sql, &e, &secrets, &mut problems);
    }
    for (says, who, sql) in MORE_CASES {
        let pool = match who {
            Who::Tenant => &tenant,
            Who::Admin => &admin,
        };
        let e = refused(pool, sql).await;
        if !e.message().contains(says) {
            problems.push(format!("{sql}: expected {says:?}, got: {}", e.message()));
        }
        check_shown(sql, &e, &secrets, &mut problems);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
