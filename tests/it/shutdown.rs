//! Stopping a `serve` replica (issue 7, item 6): SIGTERM to the real binary in the middle of a
//! login loop, and a replica whose callout subscription ends by itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::ConnectOptions;
use nats_pg_auth::app::{Application, ServeConfig};
use tokio_util::sync::CancellationToken;

use crate::common::{self, http_get, wait_until, ServiceProcess, TestEnv};

fn allowed(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("nats_pg_auth_logins_allowed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

struct LoginLoop {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU64>,
    refused: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl LoginLoop {
    /// `n` loops logging alice in and out, one connection after the other.
    fn start(url: String, n: usize) -> LoginLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..n)
            .map(|_| {
                let (stop, attempts, refused, url) =
                    (stop.clone(), attempts.clone(), refused.clone(), url.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let opts =
                            ConnectOptions::with_user_and_password("alice".into(), "s3cret".into());
                        match common::client_options(opts).connect(url.as_str()).await {
                            Ok(client) => {
                                let _ =
                                    tokio::time::timeout(Duration::from_secs(2), client.drain())
                                        .await;
                            }
                            Err(e) => refused.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        LoginLoop {
            stop,
            attempts,
            refused,
            tasks,
        }
    }

    fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let refused = self.refused.lock().unwrap().clone();
        (self.attempts.load(Ordering::Relaxed), refused)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_login_loop_exits_zero_and_no_login_is_refused() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    // The process is to lead the sync (so its stop gives up the leadership): it starts while the
    // in-process replica is stopped, which then comes back as a follower.
    env.stop_service().await;
    let mut a = ServiceProcess::for_env(&env, "replica-a");
    a.wait_ready(Duration::from_secs(20)).await;
    wait_until(
        Duration::from_secs(10),
        "the process to lead the sync",
        || {
            let log = a.log();
            async move { log.contains("this replica is the sync leader") }
        },
    )
    .await;
    env.start_service(common::serve_args(env.url())).await;
    env.wait_login("alice", "s3cret", Duration::from_secs(10), "alice logs in")
        .await;

    let logins = LoginLoop::start(env.url(), 3);
    // Both replicas answer part of the logins (one queue group).
    let (http, metrics) = (a.http, env.metrics.clone());
    wait_until(Duration::from_secs(20), "both replicas to answer logins", || {
        let metrics = metrics.clone();
        async move { allowed(&http_get(http, "/metrics").await.1) >= 5 && metrics.allowed() >= 5 }
    })
    .await;

    let signalled = Instant::now();
    a.signal(rustix::process::Signal::TERM);
    let status = a.wait_exit(Duration::from_secs(20)).await;
    let took = signalled.elapsed();
    let log = a.log();
    assert_eq!(status.code(), Some(0), "exit status {status}; log:\n{log}");
    assert!(
        took < Duration::from_secs(10),
        "stopped in {took:?}, beyond --shutdown-timeout 10s; log:\n{log}"
    );
    assert!(log.contains("auth callout unsubscribed"), "log:\n{log}");

    // Logins go on against the remaining replica, which also takes over the sync.
    let at_exit = logins.attempts();
    wait_until(
        Duration::from_secs(20),
        "more logins after the exit",
        || {
            let n = logins.attempts();
            async move { n >= at_exit + 20 }
        },
    )
    .await;
    env.wait_sql(
        "SELECT count(*) = 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        Duration::from_secs(10),
        "the other replica to take the sync leadership",
    )
    .await;
    let (attempts, refused) = logins.finish().await;
    eprintln!(
        "shutdown: SIGTERM to exit {took:?}; {attempts} logins, {} refused",
        refused.len()
    );
    assert!(
        refused.is_empty(),
        "logins refused: {refused:?}\nlog:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_whose_callout_subscription_ends_stops_with_an_error() {
    let env = TestEnv::start().await;
    let mut args = common::serve_args(env.url());
    args.http_listen = "127.0.0.1:0".into();
    args.sync = false;
    let app = Application::build(ServeConfig {
        database_url: env.database_url.clone(),
        cipher: env.cipher.clone(),
        args,
    })
    .await
    .expect("build");
    let http = app.http_addr().expect("HTTP on");
    let client = app.callout_client();
    let running = tokio::spawn(app.run_until_stopped(CancellationToken::new()));
    wait_until(
        Duration::from_secs(10),
        "the replica to be ready",
        || async move { http_get(http, "/readyz").await.0.contains("200") },
    )
    .await;

    // The NATS client closes (as when the library gives up): the subscription stream ends.
    client.drain().await.expect("drain the callout connection");
    let result = tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("the replica stops by itself, without a signal")
        .expect("no panic");
    let err = result.expect_err("an error, hence a non-zero exit");
    let line = err.to_string();
    assert!(
        line.starts_with(
            "the auth callout stopped unexpectedly: the auth callout's subscription ended"
        ),
        "{line}"
    );
    assert!(!line.contains('\n'), "one line: {line}");
}
