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
