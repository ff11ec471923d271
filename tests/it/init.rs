//! `init` is idempotent and refuses a database that belongs to another operator; the CLI gives
//! one clear line and an exit code for bad input.

use nats_pg_auth::init::{self, InitError};
use nats_pg_auth::keys::SeedCipher;

use crate::common::fresh_database;

#[tokio::test]
async fn init_twice_changes_nothing_and_another_operator_is_refused() {
    let url = fresh_database().await;
    let pool = nats_pg_auth::db::connect(&url, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    let cipher = SeedCipher::new(None);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.conf"), dir.path().join("b.conf"));

    let first = init::init(&pool, &cipher, Some("acme-ops")).await.unwrap();
    assert!(first.created);
    init::write_fragment(&first.identities, &dir.path().join("jwt"), &a).unwrap();
    let second = init::init(&pool, &cipher, Some("acme-ops")).await.unwrap();
    assert!(!second.created);
    init::write_fragment(&second.identities, &dir.path().join("jwt"), &b).unwrap();
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "byte-identical fragment"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.service_identities")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 8);

    let text = std::fs::read_to_string(&a).unwrap();
    for key in [
        "operator:",
        "system_account:",
        "resolver:",
        "type: full",
        "allow_delete: true",
        "resolver_preload:",
        "default_sentinel:",
    ] {
        assert!(text.contains(key), "fragment has {key}");
    }
    assert!(
        !text.contains("SO")
            || !text
                .split_whitespace()
                .any(|w| w.starts_with("SO") && w.len() == 58),
        "no seeds in the fragment"
    );

    match init::init(&pool, &cipher, Some("someone-else")).await {
        Err(InitError::OtherOperator { existing, .. }) => assert_eq!(existing, "acme-ops"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_cli_reports_bad_input_in_one_line_with_an_exit_code() {
    let bin = env!("CARGO_BIN_EXE_nats-pg-auth");
    let out = std::process::Command::new(bin)
        .args(["serve", "--http-listen", "nonsense"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("--http-listen"), "{err}");

    let out = std::process::Command::new(bin)
        .args(["status"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(69),
        "unreachable Postgres is 'service unavailable'"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach Postgres"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = std::process::Command::new(bin)
        .args(["serve"])
        .env_remove("DATABASE_URL")
        .env("NATS_PG_AUTH_ENCRYPTION_KEY", "too-short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn admin_verbs_create_a_tenant_that_can_log_in() {
    let env = crate::common::TestEnv::start().await;
    let run = |args: &[&str], stdin: &str| {
        let (code, out, err) = crate::common::run_cli(args, Some(&env.database_url), stdin);
        (code, out.trim().to_owned(), err)
    };
    assert_eq!(
        run(&["add-account", "initech", "--max-connections", "10"], "").0,
        Some(0)
    );
    let (code, _, err) = run(
        &[
            "add-user",
            "--account",
            "initech",
            "--username",
            "peter",
            "--cost",
            "4",
        ],
        "tps-report\n",
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, token, err) = run(
        &["add-token", "--username", "peter", "--expires-in", "1h"],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(token.len() >= 32, "a long random token: {token}");
    let (code, _, err) = run(
        &[
            "add-user",
            "--account",
            "initech",
            "--username",
            "bob",
            "--role",
            "nope",
        ],
        "pw\n",
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("role"), "{err}");
    let (code, _, err) = run(&["add-account", "bad name"], "");
    assert_ne!(code, Some(0));
    assert!(err.contains("name"), "{err}");

    env.wait_synced("initech").await;
    env.connect_user("peter", "tps-report")
        .await
        .expect("password login");
    env.connect_token(&token).await.expect("token login");
}
