//! Bad rows written by SQL fail at INSERT/UPDATE with a clear error, and the outbox triggers
//! queue exactly the pushes that matter.

use crate::common::TestEnv;

#[tokio::test]
async fn bad_rows_fail_with_clear_errors() {
    let env = TestEnv::start().await;
    env.acme().await;
    let cases = [
        ("UPDATE nats.roles SET publish_permissions = '{foo..bar}'", "publish_permissions_are_subjects"),
        ("UPDATE nats.roles SET subscribe_permissions = '{a.>.b}'", "subscribe_permissions_are_subjects"),
        ("UPDATE nats.users SET publish_permissions = '{\"sensors.* q\"}'", "user_publish_permissions_are_subjects"),
        ("UPDATE nats.users SET publish_deny_permissions = '{\"has space\"}'", "user_publish_deny_permissions_are_subjects"),
        ("UPDATE nats.users SET subscribe_deny_permissions = '{\"a b c\"}'", "user_subscribe_deny_permissions_are_subjects"),
        ("UPDATE nats.accounts SET max_connections = -2", "max_connections_at_least_minus_one"),
        ("UPDATE nats.roles SET max_payload = -5", "role_max_payload_at_least_minus_one"),
        (
            "INSERT INTO nats.account_exports (account_id, name, subject, type) SELECT id, 'e', 'svc.>', 'bogus' FROM nats.accounts",
            "export_type_known",
        ),
        (
            "INSERT INTO nats.user_tokens (user_id, token_sha256) SELECT id, '\\x0102'::bytea FROM nats.users",
            "token_sha256_is_32_bytes",
        ),
        ("UPDATE nats.users SET password_hash = 'plaintext'", "password_hash_is_bcrypt_or_argon2id"),
        ("UPDATE nats.roles SET allowed_connection_types = '{CARRIER_PIGEON}'", "allowed_connection_types_known"),
        ("INSERT INTO nats.accounts (name) VALUES ('bad name with spaces')", "account_name_format"),
    ];
    for (sql, constraint) in cases {
        let err = env.sql_err(sql).await;
        assert!(err.contains(constraint), "{sql}\n  -> {err}");
    }
    // Subscribe permissions may carry a queue group; publish ones may not.
    env.sql("UPDATE nats.roles SET subscribe_permissions = '{\"jobs.* workers\",_INBOX.>}'")
        .await;
}

#[tokio::test]
async fn outbox_queues_admin_changes_only() {
    let mut env = TestEnv::start().await;
    env.acme().await; // synced: the outbox is drained
                      // Stop the service so nothing drains the outbox while we look at it.
    env.stop_service().await;
    let pending = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM nats.sync_outbox WHERE attempts = 0")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    let before = pending().await;
    env.sql("UPDATE nats.accounts SET sync_error = 'x', synced_at = now() WHERE name = 'acme'")
        .await;
    assert_eq!(
        pending().await,
        before,
        "service-owned columns do not queue a push"
    );
    env.sql("UPDATE nats.accounts SET max_connections = 5 WHERE name = 'acme'")
        .await;
    env.sql("UPDATE nats.accounts SET max_payload = 1024 WHERE name = 'acme'")
        .await;
    assert_eq!(
        pending().await,
        before + 1,
        "two changes before a push coalesce into one row"
    );
    env.sql("UPDATE nats.users SET description = 'd'").await;
    assert_eq!(
        pending().await,
        before + 1,
        "user changes do not touch the account JWT"
    );
    env.sql("DELETE FROM nats.accounts WHERE name = 'acme'")
        .await;
    let deletes: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.sync_outbox WHERE op = 'delete' AND account_public_key IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        deletes, 1,
        "deleting a synced account queues a delete with its key"
    );
}

/// tests/sql/schema_checks.sql (checks, triggers, notifications and the roles of migration
/// 0005, as the real roles with SET ROLE) on a fresh database with every migration applied.
#[tokio::test]
async fn sql_schema_checks_pass() {
    let url = crate::common::fresh_database().await;
    let pool = nats_pg_auth::db::connect(&url, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    pool.close().await;
    let psql = std::env::var("PSQL").unwrap_or_else(|_| "psql".into());
    let out = std::process::Command::new(&psql)
        .arg(&url)
        .args(["-v", "ON_ERROR_STOP=1", "-f"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sql/schema_checks.sql"
        ))
        .output()
        .unwrap_or_else(|e| panic!("run {psql} (set PSQL to its path): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all schema checks passed"),
        "schema_checks.sql failed:\n{stdout}\n{stderr}"
    );
}

/// A database with the migrations applied and nothing else (no nats-server, no service):
/// enough for constraint checks.
async fn schema_only() -> sqlx::PgPool {
    let url = crate::common::fresh_database().await;
    let pool = nats_pg_auth::db::connect(&url, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO nats.accounts (name) VALUES ('acme');
         INSERT INTO nats.roles (account_id, name) SELECT id, 'r' FROM nats.accounts;
         INSERT INTO nats.users (account_id, role_id, username) SELECT a.id, r.id, 'alice' FROM nats.accounts a, nats.roles r;
         INSERT INTO nats.user_tokens (user_id, token_sha256) SELECT id, digest('t', 'sha256') FROM nats.users;
         INSERT INTO nats.account_exports (account_id, name, subject, type) SELECT id, 'e', 'svc.>', 'service' FROM nats.accounts;",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool
}

async fn refused(pool: &sqlx::PgPool, sql: &str, fragments: &[&str]) {
    match sqlx::raw_sql(sql).execute(pool).await {
        Ok(_) => panic!("accepted, must be refused:\n{sql}"),
        Err(e) => {
            let msg = e.to_string();
            for f in fragments {
                assert!(msg.contains(f), "{sql}\n  -> {msg}\n  lacks {f:?}");
            }
        }
    }
}

async fn accepted(pool: &sqlx::PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("refused, must be accepted:\n{sql}\n  -> {e}"));
}

/// A stored hash sets its own work factor: `$2b$31$` is a day of CPU per check and
/// `m=4294967295` asks argon2 for terabytes. Refused at INSERT/UPDATE, saying which parameter.
#[tokio::test]
async fn password_hash_work_factors_are_bounded() {
    let pool = schema_only().await;
    let bcrypt = |cost: &str| {
        format!("UPDATE nats.users SET password_hash = '$2b${cost}$Y5b1dW8Oq8N3Tbq7u3jY1eE8m4C7wWl6o5v9X0xH0x7h3lQe6dG1K'")
    };
    let argon = |params: &str| {
        format!("UPDATE nats.users SET password_hash = '$argon2id$v=19${params}$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA'")
    };
    for (sql, why) in [
        (bcrypt("31"), "bcrypt cost 31 is outside 4..12"),
        (bcrypt("13"), "bcrypt cost 13 is outside 4..12"),
        (bcrypt("03"), "bcrypt cost 3 is outside 4..12"),
        (
            argon("m=4294967295,t=1,p=1"),
            "memory m=4294967295 KiB is outside 8..65536",
        ),
        (
            argon("m=1048576,t=1,p=1"),
            "memory m=1048576 KiB is outside 8..65536",
        ),
        (argon("m=19456,t=9,p=1"), "iterations t=9 are outside 1..8"),
        (
            argon("m=19456,t=2,p=17"),
            "parallelism p=17 is outside 1..16",
        ),
        (argon("m=19456,t=0,p=1"), "iterations t=0"),
        (argon("m=19456"), "not an argon2id PHC string"),
    ] {
        refused(
            &pool,
            &sql,
            &[why, "user \"alice\"", "password_hash_is_bcrypt_or_argon2id"],
        )
        .await;
    }
    // The bounds themselves are accepted, and so is what pgcrypto and argon2 write by default.
    accepted(&pool, &bcrypt("12")).await;
    accepted(&pool, &bcrypt("04")).await;
    accepted(&pool, &argon("m=65536,t=8,p=16")).await;
    accepted(&pool, &argon("m=19456,t=2,p=1")).await;
    accepted(
        &pool,
        "UPDATE nats.users SET password_hash = crypt('pw', gen_salt('bf', 4))",
    )
    .await;
    // The operator can move the bounds by replacing one function.
    accepted(
        &pool,
        "CREATE OR REPLACE FUNCTION nats.password_hash_limits(
           OUT bcrypt_min_cost integer, OUT bcrypt_max_cost integer, OUT argon2_max_memory_kib bigint,
           OUT argon2_max_iterations integer, OUT argon2_max_parallelism integer)
         LANGUAGE sql IMMUTABLE AS $$ SELECT 4, 10, 65536::bigint, 4, 2 $$",
    )
    .await;
    refused(&pool, &bcrypt("11"), &["bcrypt cost 11 is outside 4..10"]).await;
    refused(&pool, &argon("m=19456,t=2,p=4"), &["p=4 is outside 1..2"]).await;
}

/// Rows that jammed the machinery: a username that pushed the kick NOTIFY past 8000 bytes made
/// its user impossible to update or delete (kicks are rows since 0003; the bound stays); centuries (or 'infinity') in intervals overflowed
/// the service's conversions; 'infinity' timestamps cannot be read by the service.
#[tokio::test]
async fn rows_that_would_jam_the_machinery_are_refused() {
    let pool = schema_only().await;
    for (sql, constraint) in [
        (
            format!("UPDATE nats.users SET username = '{}'", "x".repeat(257)),
            "username_at_most_256_characters",
        ),
        (
            format!(
                "INSERT INTO nats.users (account_id, username) SELECT id, '{}' FROM nats.accounts",
                "é".repeat(3000)
            ),
            "username_at_most_256_characters",
        ),
        (
            "UPDATE nats.accounts SET user_jwt_ttl = interval '1000 years'".into(),
            "user_jwt_ttl_at_most_366_days",
        ),
        (
            "UPDATE nats.roles SET user_jwt_ttl = interval '367 days'".into(),
            "role_user_jwt_ttl_at_most_366_days",
        ),
        (
            "UPDATE nats.users SET user_jwt_ttl = interval '178000000 years'".into(),
            "user_user_jwt_ttl_at_most_366_days",
        ),
        (
            "UPDATE nats.roles SET allow_response_ttl = interval '25 hours'".into(),
            "allow_response_ttl_at_most_1_day",
        ),
        (
            "UPDATE nats.account_exports SET response_threshold = interval '1000 years'".into(),
            "export_response_threshold_at_most_1_day",
        ),
        (
            "UPDATE nats.user_tokens SET expires_at = 'infinity'".into(),
            "token_expires_at_finite",
        ),
        (
            "UPDATE nats.user_tokens SET revoked_at = '-infinity'".into(),
            "token_revoked_at_finite",
        ),
        (
            "UPDATE nats.user_tokens SET expires_at = '200000-01-01'".into(),
            "token_expires_at_finite",
        ),
    ] {
        refused(&pool, &sql, &[constraint]).await;
    }
    // The largest values are fine, and a user with the longest name can still be changed and
    // deleted (its kick notification fits).
    let longest = "é".repeat(256);
    accepted(
        &pool,
        &format!("UPDATE nats.users SET username = '{longest}'"),
    )
    .await;
    accepted(&pool, "UPDATE nats.users SET active = false").await;
    accepted(
        &pool,
        "UPDATE nats.accounts SET user_jwt_ttl = interval '366 days';
         UPDATE nats.roles SET user_jwt_ttl = interval '1 day', allow_response_ttl = interval '1 day';
         UPDATE nats.account_exports SET response_threshold = interval '1 day';
         UPDATE nats.user_tokens SET expires_at = now() + interval '10 years', revoked_at = now();",
    )
    .await;
    accepted(&pool, "DELETE FROM nats.users").await;
}

/// TRUNCATE skips every row trigger: no push, no cache drop, no kick, no delete on the server.
#[tokio::test]
async fn truncate_is_refused_on_admin_tables() {
    let pool = schema_only().await;
    refused(
        &pool,
        "TRUNCATE nats.users CASCADE",
        &[
            "TRUNCATE nats.users is not allowed",
            "use DELETE FROM nats.users instead",
        ],
    )
    .await;
    for table in [
        "accounts",
        "roles",
        "user_tokens",
        "account_exports",
        "account_imports",
        "account_keys",
    ] {
        refused(
            &pool,
            &format!("TRUNCATE nats.{table} CASCADE"),
            &[
                &format!("TRUNCATE nats.{table} is not allowed"),
                "use DELETE",
            ],
        )
        .await;
    }
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.users")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(users, 1, "nothing was truncated");
    // The service's own bookkeeping may still be truncated.
    accepted(&pool, "TRUNCATE nats.audit_log").await;
}

/// Every function of schema `nats`, with who may execute it (service, admin, tenant, PUBLIC).
/// A function added without a decision fails here: decide, grant (or not) in its migration, and
/// add it. Trigger functions need no EXECUTE; what a CHECK, an index expression, a policy or a
/// trigger body calls runs with the writer's privileges (so the writers need it).
const FUNCTION_PRIVILEGES: &[(&str, [bool; 4])] = &[
    //                                              service admin  tenant PUBLIC
    (
        "nats.account_admin_view(nats.accounts)",
        [false, false, false, false],
    ),
    ("nats.account_keys_changed()", [false, false, false, false]),
    ("nats.accounts_changed()", [false, false, false, false]),
    ("nats.administered_accounts()", [false, false, true, false]),
    ("nats.check_array_bounds()", [false, false, false, false]),
    ("nats.check_limits()", [false, false, false, false]),
    ("nats.check_max_users()", [false, false, false, false]),
    ("nats.check_nkey_binding()", [false, false, false, false]),
    ("nats.check_password_hash()", [false, false, false, false]),
    ("nats.check_per_user_rows()", [false, false, false, false]),
    ("nats.check_role_account()", [false, false, false, false]),
    ("nats.check_role_unused()", [false, false, false, false]),
    ("nats.check_subject_columns()", [false, false, false, false]),
    ("nats.check_token_sha256()", [false, false, false, false]),
    ("nats.check_user_role()", [false, false, false, false]),
    ("nats.dn_loose(text)", [true, true, true, false]),
    (
        "nats.enqueue_account_sync(bigint,text)",
        [true, false, false, false],
    ),
    ("nats.export_grants_changed()", [false, false, false, false]),
    (
        "nats.explain_account_export_grants()",
        [false, false, false, false],
    ),
    (
        "nats.explain_account_exports()",
        [false, false, false, false],
    ),
    (
        "nats.explain_account_imports()",
        [false, false, false, false],
    ),
    ("nats.explain_accounts()", [false, false, false, false]),
    ("nats.explain_roles()", [false, false, false, false]),
    (
        "nats.explain_user_certificates()",
        [false, false, false, false],
    ),
    ("nats.explain_user_tokens()", [false, false, false, false]),
    ("nats.explain_users()", [false, false, false, false]),
    ("nats.exports_changed()", [false, false, false, false]),
    ("nats.imports_changed()", [false, false, false, false]),
    ("nats.is_member_of(text)", [false, false, true, false]),
    ("nats.kick_on_change()", [false, false, false, false]),
    // The service logs a change it makes itself (record_synced); triggers call it as its owner.
    ("nats.log_change(text)", [true, false, false, false]),
    ("nats.max_element_length(text[])", [true, true, true, false]),
    ("nats.notify_change()", [false, false, false, false]),
    (
        "nats.owning_accounts(bigint,bigint)",
        [false, false, false, false],
    ),
    ("nats.password_hash_limits()", [true, true, true, false]),
    (
        "nats.password_hash_problem(text)",
        [true, true, true, false],
    ),
    ("nats.per_user_limits()", [false, false, false, false]),
    // Helpers of the explain_* triggers (migration 0016), which run as the writing role.
    ("nats.quote_short(text)", [true, true, true, false]),
    (
        "nats.refuse_row(text,text,text,text,text)",
        [true, true, true, false],
    ),
    ("nats.refuse_truncate()", [false, false, false, false]),
    ("nats.revocations_changed()", [false, false, false, false]),
    (
        "nats.rotate_signing_key(text,boolean)",
        [true, true, true, false],
    ),
    ("nats.san_folded(text)", [true, true, true, false]),
    (
        "nats.subject_problem(text,boolean)",
        [true, true, true, false],
    ),
    ("nats.touch_updated_at()", [false, false, false, false]),
    ("nats.unlock_requested()", [false, false, false, false]),
    (
        "nats.user_certificates_changed()",
        [false, false, false, false],
    ),
    (
        "nats.user_revocation_changed()",
        [false, false, false, false],
    ),
    ("nats.valid_password_hash(text)", [true, true, true, false]),
    (
        "nats.valid_subject(text,boolean)",
        [true, true, true, false],
    ),
    (
        "nats.valid_subjects(text[],boolean)",
        [true, true, true, false],
    ),
];

#[tokio::test]
async fn every_function_has_a_decision_on_who_may_execute_it_and_a_fixed_search_path() {
    let pool = schema_only().await;
    // PUBLIC has no role to ask has_function_privilege about: its grant is an ACL entry with an
    // empty grantee (or no ACL at all, which means the default: PUBLIC may execute).
    let rows: Vec<(String, bool, bool, bool, bool, bool)> = sqlx::query_as(
        "SELECT p.oid::regprocedure::text,
                has_function_privilege('nats_pg_auth_service', p.oid, 'EXECUTE'),
                has_function_privilege('nats_pg_auth_admin', p.oid, 'EXECUTE'),
                has_function_privilege('nats_pg_auth_tenant', p.oid, 'EXECUTE'),
                p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                             WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'),
                EXISTS (SELECT 1 FROM unnest(coalesce(p.proconfig, '{}')) c WHERE c LIKE 'search_path=%')
           FROM pg_proc p WHERE p.pronamespace = 'nats'::regnamespace ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut problems = vec![];
    for (name, service, admin, tenant, public, fixed_path) in &rows {
        let actual = [*service, *admin, *tenant, *public];
        match FUNCTION_PRIVILEGES.iter().find(|(n, _)| n == name) {
            None => problems.push(format!(
                "{name}: no decision in FUNCTION_PRIVILEGES (it is {actual:?})"
            )),
            Some((_, want)) if *want != actual => problems.push(format!(
                "{name}: [service, admin, tenant, PUBLIC] may execute {actual:?}, expected {want:?}"
            )),
            Some(_) => {}
        }
        if !fixed_path {
            problems.push(format!("{name}: no fixed search_path"));
        }
    }
    for (name, _) in FUNCTION_PRIVILEGES {
        if !rows.iter().any(|r| &r.0 == name) {
            problems.push(format!("{name}: listed but no longer in the schema"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The Postgres certificate lookup and the login copy fold SANs and subject DNs the same way
/// (`nats.san_folded` / `normalize_san`, `nats.dn_loose` / `subject_loose`): a mapping found on
/// one path is found on the other.
#[tokio::test]
async fn certificate_name_folding_is_the_same_in_sql_and_in_the_service() {
    use nats_pg_auth::callout::certificate::{normalize_san, Presented};
    let pool = schema_only().await;
    let sans = [
        "email:Dev@ACME.example",
        "dns:Box-7.Acme.Example ",
        "uri:spiffe://ACME/Dev",
        "email:\u{212A}elvin@x", // KELVIN SIGN: Unicode lower-cases it to 'k', ASCII does not
        "dns:\u{C4}pfel.example", // Ä
        "email: \tspaced@X \r\n",
        "dns:a:b:C",
    ];
    for san in sans {
        let sql: String = sqlx::query_scalar("SELECT nats.san_folded($1)")
            .bind(san)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(sql, normalize_san(san), "{san:?}");
    }
    for dn in [
        "CN=Foo Bar,O=Acme\\, Inc.",
        "cn = \u{C4}pfel,\tO=X",
        "CN=\u{212A}",
    ] {
        let sql: String = sqlx::query_scalar("SELECT nats.dn_loose($1)")
            .bind(dn)
            .fetch_one(&pool)
            .await
            .unwrap();
        let p = Presented {
            fingerprint: [0; 32],
            subject_dn: dn.to_owned(),
            sans: vec![],
        };
        assert_eq!(sql, p.subject_loose(), "{dn:?}");
    }
}
