//! Reconnect storms: requests nats-server stopped waiting for get no work and no answer
//! (issue 19).

use std::time::Duration;

use crate::common::{http_get, is_auth_refusal, wait_until, ServiceProcess, TestEnv};

/// The value of the line of the service's `/metrics` that starts with `line`.
async fn metric_at<T: std::str::FromStr>(http: std::net::SocketAddr, line: &str) -> Option<T> {
    let (_, body) = http_get(http, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
}

/// A counter of the service's `/metrics` (0 when absent).
async fn metric(serve: &ServiceProcess, line: &str) -> u64 {
    metric_at(serve.http, line).await.unwrap_or(0)
}

/// The answer lag the replica reports for answering connection `connection`.
async fn lag_of(http: std::net::SocketAddr, connection: usize) -> Option<f64> {
    metric_at(
        http,
        &format!("nats_pg_auth_callout_answer_lag_seconds{{connection=\"{connection}\"}} "),
    )
    .await
}

#[tokio::test]
async fn a_request_the_server_stopped_waiting_for_is_not_answered_and_a_fresh_one_is() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    // The replica as a process, so it can be frozen while a request waits for it.
    env.stop_service().await;
    let serve = ServiceProcess::for_env(&env, "stormy");
    serve.wait_ready(Duration::from_secs(20)).await;
    env.wait_login("alice", "s3cret", Duration::from_secs(10), "alice logs in")
        .await;
    let allowed = "nats_pg_auth_logins_allowed_total ";
    let skipped = "nats_pg_auth_callout_skipped_total{stage=\"verified\"} ";
    let handled = "nats_pg_auth_decision_seconds_count ";
    let allowed_before = metric(&serve, allowed).await;
    let handled_before = metric(&serve, handled).await;
    assert!(allowed_before >= 1);

    // Frozen: nats-server's request waits in the replica's socket, the client is refused after
    // the 2 s auth timeout.
    serve.signal(rustix::process::Signal::STOP);
    let sent_ms = nats_pg_auth::callout::deadline::now_unix_ms();
    let err = env
        .connect_user("alice", "s3cret")
        .await
        .expect_err("nobody answers while the replica is frozen");
    assert!(is_auth_refusal(&err), "{err}");
    // The request is then at least 3.5 s old: past `iat + 1 s + auth timeout` by any rounding
    // of `iat`, and still within --clock-skew (5 s) of its `exp`, which the replica tolerated
    // before (it would have minted a JWT for it).
    let aged_ms = (sent_ms.div_euclid(1000) + 5) * 1000 + 500;
    wait_until(
        Duration::from_secs(10),
        "the request to age past the server's deadline",
        || async move { nats_pg_auth::callout::deadline::now_unix_ms() >= aged_ms },
    )
    .await;
    serve.signal(rustix::process::Signal::CONT);

    let http = serve.http;
    wait_until(
        Duration::from_secs(10),
        "the stale request to be handled",
        || async move {
            let (_, body) = http_get(http, "/metrics").await;
            body.lines().any(|l| {
                l.strip_prefix(handled)
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > handled_before)
            })
        },
    )
    .await;
    assert_eq!(
        metric(&serve, allowed).await,
        allowed_before,
        "no JWT minted for the stale request"
    );
    assert_eq!(metric(&serve, skipped).await, 1, "counted as skipped");

    // A fresh request is answered.
    env.connect_user("alice", "s3cret")
        .await
        .expect("a fresh login succeeds");
    assert_eq!(metric(&serve, allowed).await, allowed_before + 1);
    assert_eq!(metric(&serve, skipped).await, 1);
}

/// The lag probe must see nats-server's own queue: a server that reads nothing (here: frozen)
/// shows as a growing lag, which is what lets the callout skip requests whose answer the server
/// would reach too late. (A flush of the client's socket, which the probe used to be, returns at
/// once while the server is frozen.)
#[tokio::test]
async fn the_answer_lag_shows_a_server_that_does_not_read_its_answers() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.stop_service().await;
    let serve = ServiceProcess::for_env(&env, "lagged");
    serve.wait_ready(Duration::from_secs(20)).await;
    env.wait_login("alice", "s3cret", Duration::from_secs(10), "alice logs in")
        .await;
    let http = serve.http;
    wait_until(
        Duration::from_secs(10),
        "the answer lag to be measured, below a second",
        || async move { lag_of(http, 0).await.is_some_and(|l| l < 1.0) },
    )
    .await;

    let nats = rustix::process::Pid::from_raw(env.nats.pid().expect("nats-server runs") as i32)
        .expect("a pid");
    rustix::process::kill_process(nats, rustix::process::Signal::STOP).expect("SIGSTOP");
    let shown = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if lag_of(http, 0).await.is_some_and(|l| l >= 1.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    rustix::process::kill_process(nats, rustix::process::Signal::CONT).expect("SIGCONT");
    assert!(
        shown.is_ok(),
        "a frozen nats-server never showed as an answer lag of a second or more"
    );

    wait_until(
        Duration::from_secs(15),
        "the answer lag back below a second once the server reads again",
        || async move { lag_of(http, 0).await.is_some_and(|l| l < 1.0) },
    )
    .await;
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "alice logs in after the freeze",
    )
    .await;
}

/// With `--reply-connections`, answers go out over the extra connections in turn: logins are
/// answered, and each answering connection measures its own lag (a probe of its own).
#[tokio::test]
async fn reply_connections_answer_logins_and_each_measures_its_own_lag() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.stop_service().await;
    let serve =
        ServiceProcess::for_env_with(&env, "repliers", &[("NATS_PG_AUTH_REPLY_CONNECTIONS", "2")]);
    serve.wait_ready(Duration::from_secs(20)).await;
    // Several logins: the answers take turns over both reply connections.
    for i in 0..4 {
        env.wait_login(
            "alice",
            "s3cret",
            Duration::from_secs(10),
            &format!("alice logs in ({i})"),
        )
        .await;
    }
    env.connect_user("alice", "wrong")
        .await
        .expect_err("a wrong password is refused over a reply connection too");
    let http = serve.http;
    wait_until(
        Duration::from_secs(10),
        "a measured lag for both reply connections",
        || async move {
            for c in [1, 2] {
                if !lag_of(http, c).await.is_some_and(|v| v < 1.0) {
                    return false;
                }
            }
            true
        },
    )
    .await;
}
