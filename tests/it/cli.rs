//! The binary as an operator meets it (issue 10): exit codes, one-line errors, closed pipes.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{free_port, fresh_database, wait_until, TestEnv};

const BIN: &str = env!("CARGO_BIN_EXE_nats-pg-auth");

/// Runs the binary to completion: (exit code, stdout, stderr).
fn run(args: &[&str], database_url: Option<&str>) -> (Option<i32>, String, String) {
    crate::common::run_cli(args, database_url, "")
}

fn one_line(err: &str) {
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Bug 6: what the README promises: 64 configuration, 69 unavailable, 70 only for bugs.
#[tokio::test]
async fn exit_codes_are_64_for_configuration_and_69_for_unavailable_services() {
    // clap's own errors (unknown flag, missing value, unknown verb): 64, not 2.
    for args in [
        &["serve", "--no-such-flag"][..],
        &["init", "--resolver-dir", "/tmp/x", "--out", "-"][..],
        &["frobnicate"][..],
        &["serve", "--default-ttl", "soon"][..],
    ] {
        let (code, _, err) = run(args, None);
        assert_eq!(code, Some(64), "{args:?}: {err}");
        one_line(&err);
    }
    let (code, out, _) = run(&["--help"], None);
    assert_eq!(code, Some(0));
    assert!(out.contains("serve"), "{out}");

    // An unparsable --database-url: configuration.
    let (code, _, err) = run(&["status", "--database-url", "not a url"], None);
    assert_eq!(code, Some(64), "{err}");
    one_line(&err);
    assert!(err.contains("DATABASE_URL"), "{err}");

    // Postgres not listening: unavailable.
    let (code, _, err) = run(&["migrate"], Some("postgres://nobody@127.0.0.1:1/none"));
    assert_eq!(code, Some(69), "{err}");
    one_line(&err);
    assert!(
        err.contains("cannot reach Postgres at 127.0.0.1:1"),
        "{err}"
    );

    // A database nobody ran `init` on: say what to do, exit 64.
    let url = fresh_database().await;
    let (code, _, err) = run(&["status"], Some(&url));
    assert_eq!(code, Some(64), "{err}");
    one_line(&err);
    assert!(err.contains("nats-pg-auth init"), "{err}");

    // The HTTP port is taken: 64 (the fix is another --http-listen), one line naming the flag.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(
        &[
            "init",
            "--operator-name",
            "ops",
            "--resolver-dir",
            dir.path().join("jwt").to_str().unwrap(),
            "--out",
            dir.path().join("fragment.conf").to_str().unwrap(),
        ],
        Some(&url),
    );
    assert_eq!(code, Some(0), "{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run(
        &[
            "serve",
            "--http-listen",
            &addr,
            "--nats-url",
            &format!("nats://127.0.0.1:{}", free_port()),
        ],
        Some(&url),
    );
    assert_eq!(code, Some(64), "{err}");
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("--http-listen") && last.contains(&addr),
        "{err}"
    );
}

/// Bug 7: a default TTL above the cap is refused, in one line naming both flags.
#[test]
fn a_default_ttl_above_max_ttl_is_refused() {
    let (code, _, err) = run(
        &["serve", "--default-ttl", "2d", "--max-ttl", "1h"],
        Some("postgres://nobody@127.0.0.1:1/none"),
    );
    assert_eq!(code, Some(64), "{err}");
    one_line(&err);
    assert!(
        err.contains("--default-ttl") && err.contains("--max-ttl"),
        "{err}"
    );
}

/// Bug 3: `nats-pg-auth status | head -1` ends quietly when the reader goes away.
#[tokio::test]
async fn status_into_a_closed_pipe_ends_quietly() {
    let env = TestEnv::start().await;
    crate::common::wait_healthy(&env.database_url).await;
    for _ in 0..3 {
        let mut child = Command::new(BIN)
            .arg("status")
            .env("DATABASE_URL", &env.database_url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything was written
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(err.is_empty(), "quiet: {err}");
    }
}

/// Bug 3: a `serve` whose stderr reader went away keeps answering logins and stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_closed_stderr_keeps_working_and_stops_on_sigterm() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.stop_service().await;
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("RUST_LOG", "debug,sqlx=warn")
        .env("DATABASE_URL", &env.database_url)
        .env("NATS_URL", env.url())
        .env("NATS_PG_AUTH_HTTP_LISTEN", http.to_string())
        .env("NATS_PG_AUTH_DB_POOL_SIZE", "8")
        .env("NATS_PG_AUTH_CALLOUT_CONCURRENCY", "6")
        .env_remove("NATS_PG_AUTH_ENCRYPTION_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the log until the callout listens, then close the pipe like a `| head -1` would.
    let stderr = child.stderr.take().unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            seen += &line;
            seen.push('\n');
            if line.contains("auth callout listening") {
                break;
            }
        }
        seen // the reader is dropped here
    })
    .await
    .unwrap();
    assert!(seen.contains("auth callout listening"), "{seen}");

    // Logins (each one logs) still work, many times over.
    for i in 0..5 {
        let client = env
            .connect_user("alice", "s3cret")
            .await
            .unwrap_or_else(|e| panic!("login {i} after stderr closed: {e}"));
        client.drain().await.unwrap();
    }
    assert!(env.connect_user("alice", "wrong").await.is_err());
    let (status, _) = crate::common::http_get(http, "/readyz").await;
    assert!(status.contains("200"), "{status}");

    // A supervisor's stop still works.
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut exited = None;
    wait_until(Duration::from_secs(20), "serve to exit on SIGTERM", || {
        exited = child.try_wait().unwrap();
        let done = exited.is_some();
        async move { done }
    })
    .await;
    assert_eq!(exited.unwrap().code(), Some(0));
}

/// Bug 4: `serve` with nats-server down says so once, at WARN, never claims to listen before the
/// subscription exists, and starts answering when the server comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_nats_down_warns_once_and_listens_only_once_connected() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.stop_service().await;
    env.nats.stop();
    let serve = crate::common::ServiceProcess::for_env(&env, "no-nats");
    // The copy loads from Postgres; then the callout waits for NATS for a while.
    wait_until(Duration::from_secs(20), "the unreachable warning", || {
        let log = serve.log();
        async move { log.contains("NATS is unreachable") }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = serve.log();
    assert!(!log.contains("auth callout listening"), "log:\n{log}");
    assert_eq!(
        log.matches("NATS is unreachable").count(),
        1,
        "said once; log:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("NATS is unreachable"))
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(
        !log.lines()
            .any(|l| l.contains(" INFO ") && l.contains("NATS event")),
        "no INFO line per retry; log:\n{log}"
    );
    let (status, _) = crate::common::http_get(serve.http, "/readyz").await;
    assert!(!status.contains("200"), "not ready without NATS: {status}");

    env.nats.restart(false).await;
    serve.wait_ready(Duration::from_secs(20)).await;
    assert!(serve.log().contains("auth callout listening"));
    env.wait_login("alice", "s3cret", Duration::from_secs(10), "alice logs in")
        .await;
}

/// Issue 10, "messages that should say what to do".
#[tokio::test]
async fn errors_say_what_to_do() {
    let env = TestEnv::start().await;
    let url = env.database_url.clone();
    let (code, _, err) = run(&["add-account", "initech"], Some(&url));
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run(&["add-account", "initech"], Some(&url));
    assert_ne!(code, Some(0));
    one_line(&err);
    assert!(err.contains("account initech already exists"), "{err}");
    let (code, _, err) = run(&["add-account", "no spaces please"], Some(&url));
    assert_ne!(code, Some(0));
    one_line(&err);
    assert!(err.contains("letters, digits"), "{err}");

    // A bad limit names the column and the rule, without dumping the row (and its JWT).
    let e = sqlx::raw_sql("UPDATE nats.accounts SET max_connections = -5 WHERE name = 'initech'")
        .execute(&env.pool)
        .await
        .unwrap_err();
    let db = e.as_database_error().unwrap();
    assert!(
        db.message()
            .contains("accounts.max_connections must be -1 (unlimited), 0 or more"),
        "{}",
        db.message()
    );
    assert_eq!(db.constraint(), Some("max_connections_at_least_minus_one"));
    let detail = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|d| d.detail())
        .unwrap_or_default();
    assert!(!detail.contains("Failing row"), "{detail}");

    // A refused Postgres port says so, not "pool timed out".
    let cmd_err = run(&["migrate"], Some("postgres://nobody@127.0.0.1:1/none"));
    let err = cmd_err.2.to_lowercase();
    assert!(err.contains("refused"), "says why: {err}");
    assert!(!err.contains("pool timed out"), "{err}");
    // One "invalid encryption key" prefix, not two.
    let (code, _, err) = run(
        &[
            "rotate-encryption-key",
            "--encryption-key",
            "too-short",
            "--new-key",
            "x",
        ],
        Some(&url),
    );
    assert_eq!(code, Some(64));
    one_line(&err);
    assert_eq!(err.matches("invalid encryption key").count(), 1, "{err}");
}

/// Issue 18 item 7: `migrate` on an empty database says what it applied, not "up to date"; a
/// second run says there was nothing to apply.
#[tokio::test]
async fn migrate_says_what_it_applied() {
    let url = fresh_database().await;
    let (code, out, err) = run(&["migrate"], Some(&url));
    assert_eq!(code, Some(0), "{out}{err}");
    let said = format!("{out}{err}");
    assert!(
        said.contains("applied") && said.contains("0001 schema") && !said.contains("nothing"),
        "{said}"
    );
    let (code, out, err) = run(&["migrate"], Some(&url));
    assert_eq!(code, Some(0), "{out}{err}");
    let said = format!("{out}{err}");
    assert!(said.contains("up to date: nothing to apply"), "{said}");
}
