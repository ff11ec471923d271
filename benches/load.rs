//! The load tool (issue 4, "Measure it"): every scenario in one process run, against the same
//! nats-server binary, with the ratio to a baseline measured in the same run.
//!
//!   cargo bench --bench load                  # full run (~4 min on 2 cores)
//!   LOAD_QUICK=1 cargo bench --bench load     # small sizes (~1 min)
//!   LOAD_ONLY=baseline,token,storm cargo bench --bench load
//!
//! It starts everything itself on loopback: a throwaway Postgres (`scripts/pg.sh`, or the admin
//! URL in `NATS_PG_AUTH_TEST_DATABASE_URL`; a fresh database either way, dropped at the end),
//! two nats-servers from `NATS_SERVER_BIN` (else the pinned one in ~/.cache/nats-pg-auth, else
//! PATH) — one with users in its own config (the baseline, no callout), one in operator mode with
//! `init`'s fragment — and the service in-process on a runtime of its own (2 worker threads,
//! like a 2-core `serve`). Clients speak the NATS protocol over raw TCP (INFO, CONNECT+PING,
//! PONG or -ERR) so the client costs the same for every scenario and stays small.
//!
//! Scenarios (also `bigstorm`: reconnect storms of LOAD_BIG_STORMS clients with jittered
//! backoff, shedding off/on alternating, LOAD_STORM_ROUNDS rounds, LOAD_STORM_XKEY=off for AUTH
//! without its xkey; `xkey`: token logins with
//! AUTH with and without its xkey, alternating, nats-server restarted between phases):
//! 1 baseline; 2 callout token; 3 callout password, credential cache warm;
//! 4 callout password cold (bcrypt cost 10, users never seen); 4b token and warm logins during a
//! cold flood (isolation of the hashing lane); 5 the service's decision time (request received →
//! reply published) from its histogram, warm logins only; 6 storm: N clients at once (warm),
//! default 2 s auth timeout, also with the row cache flushed (credentials still warm), and the
//! same storm against the baseline server; 7 sync: N accounts in one INSERT until all are on the
//! server, and UPDATE → new JWT served by `$SYS.REQ.ACCOUNT.<id>.CLAIMS.LOOKUP`; 9 RSS with N
//! users logged in once, in a child process that runs only the service (plus the request
//! generator) — `VmRSS` of that process before and after.
//! 10 the login copy (issue 7): the database topped up to N users (plus a few thousand tokens),
//! then a fresh child process builds the service and times full loads of the copy
//! (`Callout::reload`), with `VmRSS` before and after the first and a second reload.
//!
//! Knobs (env): LOAD_QUICK=1, LOAD_ONLY=<names>, LOAD_SECONDS (per throughput phase, 5),
//! LOAD_CONCURRENCY (clients in flight, 16), LOAD_SAMPLES (serial latency samples, 1000),
//! LOAD_STORM (2000), LOAD_SYNC_ACCOUNTS (10000), LOAD_SYNC_SAMPLES (50), LOAD_RSS_USERS (100000),
//! LOAD_COPY_USERS (comma list of totals, 100000,1000000; quick 20000), LOAD_COPY_TOKENS (5000),
//! LOAD_LOG (service log filter, `nats_pg_auth=info,warn`; the log goes to a file), LOAD_KEEP=1
//! (keep the run directory with logs and server files).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::ConnectOptions;
use futures::StreamExt;
use nats_pg_auth::app::{Application, ServeConfig};
use nats_pg_auth::callout::Callout;
use nats_pg_auth::config::{Cli, Command as CliCommand};
use nats_pg_auth::db::identities::IdentityKind;
use nats_pg_auth::init::{self, ServiceIdentities};
use nats_pg_auth::keys::SeedCipher;
use nats_pg_auth::metrics::Metrics;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use common::{Credential, FakeServer};

// ------------------------------------------------------------------------------------------
// Knobs
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Knobs {
    quick: bool,
    only: Option<BTreeSet<String>>,
    seconds: Duration,
    concurrency: usize,
    samples: usize,
    warm_users: usize,
    token_users: usize,
    cold_users: usize,
    cold_concurrency: usize,
    storm: usize,
    /// Reconnect storms (`bigstorm`): sizes, and rounds of before/after.
    big_storms: Vec<usize>,
    storm_rounds: usize,
    sync_accounts: usize,
    sync_samples: usize,
    rss_users: usize,
    copy_users: Vec<usize>,
    copy_tokens: usize,
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Knobs {
    fn from_env() -> Self {
        let quick = std::env::var("LOAD_QUICK").is_ok_and(|v| v == "1");
        let q = |full: usize, quick_v: usize| if quick { quick_v } else { full };
        Knobs {
            quick,
            only: std::env::var("LOAD_ONLY").ok().map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            }),
            seconds: Duration::from_secs(env_num("LOAD_SECONDS", q(5, 2)) as u64),
            concurrency: env_num("LOAD_CONCURRENCY", 16),
            samples: env_num("LOAD_SAMPLES", q(1000, 200)),
            warm_users: q(100, 50),
            token_users: q(100, 50),
            cold_users: q(1500, 400),
            cold_concurrency: 4,
            storm: env_num("LOAD_STORM", q(2000, 500)),
            big_storms: std::env::var("LOAD_BIG_STORMS")
                .unwrap_or_else(|_| (if quick { "1000,2000" } else { "5000,10000" }).into())
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect(),
            storm_rounds: env_num("LOAD_STORM_ROUNDS", q(3, 1)),
            sync_accounts: env_num("LOAD_SYNC_ACCOUNTS", q(10_000, 1000)),
            sync_samples: env_num("LOAD_SYNC_SAMPLES", q(50, 10)),
            rss_users: env_num("LOAD_RSS_USERS", q(100_000, 10_000)),
            copy_users: {
                let mut v: Vec<usize> = std::env::var("LOAD_COPY_USERS")
                    .unwrap_or_else(|_| (if quick { "20000" } else { "100000,1000000" }).into())
                    .split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect();
                v.sort_unstable();
                v
            },
            copy_tokens: env_num("LOAD_COPY_TOKENS", q(5000, 1000)),
        }
    }

    fn wants(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(name))
    }
}

// ------------------------------------------------------------------------------------------
// Processes: Postgres, nats-server, the service
// ------------------------------------------------------------------------------------------

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Postgres {
    admin_url: String,
    dir: Option<tempfile::TempDir>,
}

impl Postgres {
    fn start() -> Postgres {
        if let Ok(url) = std::env::var("NATS_PG_AUTH_TEST_DATABASE_URL") {
            return Postgres {
                admin_url: url,
                dir: None,
            };
        }
        let dir = tempfile::Builder::new()
            .prefix("nats-pg-auth-load-pg.")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let out = Command::new(manifest_dir().join("scripts/pg.sh"))
            .arg("start")
            .arg(dir.path())
            .arg(port.to_string())
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/pg.sh (needs Postgres server binaries: scripts/setup.sh)");
        assert!(out.status.success(), "scripts/pg.sh start failed");
        Postgres {
            admin_url: String::from_utf8(out.stdout).unwrap().trim().to_owned(),
            dir: Some(dir),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = Command::new(manifest_dir().join("scripts/pg.sh"))
                .arg("stop")
                .arg(dir.path())
                .status();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server_bin() -> String {
    if let Ok(b) = std::env::var("NATS_SERVER_BIN") {
        return b;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let pinned = format!("{home}/.cache/nats-pg-auth/nats-server-2.15.1/bin/nats-server");
    if Path::new(&pinned).exists() {
        pinned
    } else {
        "nats-server".into()
    }
}

struct NatsServer {
    port: u16,
    child: Child,
}

impl NatsServer {
    async fn start(dir: &Path, name: &str, body: &str) -> NatsServer {
        let port = free_port();
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!("server_name: {name}\nlisten: 127.0.0.1:{port}\n{body}\n"),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start nats-server (scripts/setup.sh installs it)");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nats-server {name} did not listen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        NatsServer { port, child }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it and starts it again, same port and configuration file (re-read).
    async fn restart(&mut self, dir: &Path, name: &str) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(format!("{name}.log")))
            .unwrap();
        self.child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(dir.join(format!("{name}.conf")))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("restart nats-server");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nats-server {name} did not listen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service, in-process on a runtime of its own (2 workers, threads named `svc`).
struct Service {
    metrics: Metrics,
    callout: Arc<Callout>,
    handle: tokio::runtime::Handle,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn serve_config(database_url: &str, nats_url: &str, cipher: &SeedCipher) -> ServeConfig {
    let cli = <Cli as clap::Parser>::try_parse_from([
        "nats-pg-auth",
        "serve",
        "--database-url",
        database_url,
        "--nats-url",
        nats_url,
    ])
    .expect("serve flags");
    let CliCommand::Serve(args) = cli.command else {
        unreachable!("parsed `serve`")
    };
    ServeConfig {
        database_url: database_url.to_owned(),
        cipher: cipher.clone(),
        args,
    }
}

impl Service {
    fn start(config: ServeConfig) -> Service {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("svc-main".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("svc")
                    .enable_all()
                    .build()
                    .expect("service runtime");
                let handle = rt.handle().clone();
                rt.block_on(async move {
                    let app = Application::build(config).await.expect("build the service");
                    let shutdown = CancellationToken::new();
                    tx.send((app.metrics(), app.callout(), handle, shutdown.clone()))
                        .unwrap();
                    app.run_until_stopped(shutdown).await.expect("service run");
                });
            })
            .unwrap();
        let (metrics, callout, handle, shutdown) = rx.recv().expect("service started");
        Service {
            metrics,
            callout,
            handle,
            shutdown,
            thread: Some(thread),
        }
    }

    async fn wait_live(&self) {
        let start = Instant::now();
        while !self.callout.cache().is_live() {
            assert!(start.elapsed() < Duration::from_secs(10), "cache listener");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Logs users in through `Callout::answer` with hand-made requests (no nats-server, and not
    /// counted in the decision-time histogram, which only `handle` feeds).
    async fn answer_all(&self, fake: Arc<FakeServer>, creds: Vec<Cred>, parallel: usize) -> usize {
        let callout = self.callout.clone();
        let allowed_before = self.metrics.allowed();
        let handle = self.handle.clone();
        futures::stream::iter(creds)
            .map(|cred| {
                let callout = callout.clone();
                let fake = fake.clone();
                handle.spawn(async move {
                    let msg = fake.message(&cred.as_credential());
                    callout.answer(&msg, Instant::now()).await
                })
            })
            .buffer_unordered(parallel)
            .for_each(|_| async {})
            .await;
        (self.metrics.allowed() - allowed_before) as usize
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------------------------------
// CPU and memory accounting (from /proc)
// ------------------------------------------------------------------------------------------

const CLK_TCK: f64 = 100.0;

fn stat_cpu(path: &Path) -> Option<(String, f64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let (head, tail) = s.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let f: Vec<&str> = tail.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((comm, ticks / CLK_TCK))
}

/// CPU seconds of our threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|t| stat_cpu(&t.path().join("stat")))
        .filter(|(comm, _)| comm.starts_with(prefix))
        .map(|(_, s)| s)
        .sum()
}

fn process_cpu(pid: u32) -> f64 {
    stat_cpu(&PathBuf::from(format!("/proc/{pid}/stat")))
        .map(|(_, s)| s)
        .unwrap_or(0.0)
}

fn vm_rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

/// A `kB` line of `/proc/self/status` (`VmRSS:`, `VmHWM:`).
fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    service: f64,
    driver: f64,
}

struct CpuMeter {
    pid: u32,
    start: Cpu,
}

impl CpuMeter {
    fn now(pid: u32) -> Cpu {
        Cpu {
            server: process_cpu(pid),
            service: threads_cpu("svc") + threads_cpu("npa-hash"),
            driver: threads_cpu("drv"),
        }
    }
    fn start(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            start: Self::now(pid),
        }
    }
    fn stop(&self) -> Cpu {
        let end = Self::now(self.pid);
        Cpu {
            server: end.server - self.start.server,
            service: end.service - self.start.service,
            driver: end.driver - self.start.driver,
        }
    }
}

// ------------------------------------------------------------------------------------------
// A raw NATS client: just enough protocol to log in
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Cred {
    Password(String, String),
    Token(String),
}

impl Cred {
    fn connect_line(&self) -> String {
        let mut v = serde_json::json!({
            "verbose": false, "pedantic": false, "tls_required": false, "name": "load",
            "lang": "rust", "version": "0.0.0", "protocol": 1, "headers": true,
            "no_responders": true,
        });
        match self {
            Cred::Password(u, p) => {
                v["user"] = u.as_str().into();
                v["pass"] = p.as_str().into();
            }
            Cred::Token(t) => v["auth_token"] = t.as_str().into(),
        }
        format!("CONNECT {v}\r\nPING\r\n")
    }

    fn as_credential(&self) -> Credential<'_> {
        match self {
            Cred::Password(u, p) => Credential::Password(u, p),
            Cred::Token(t) => Credential::Token(t),
        }
    }
}

#[derive(Debug)]
enum Failure {
    Refused,
    Timeout,
    Io,
}

type Conn = BufReader<TcpStream>;

/// TCP connect, INFO, CONNECT + PING, then PONG (in) or -ERR (refused).
async fn raw_login(port: u16, connect_line: &str, limit: Duration) -> Result<Conn, Failure> {
    let attempt = async {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|_| Failure::Io)?;
        stream.set_nodelay(true).map_err(|_| Failure::Io)?;
        let mut conn = BufReader::new(stream);
        let mut line = String::new();
        conn.read_line(&mut line).await.map_err(|_| Failure::Io)?;
        if !line.starts_with("INFO") {
            return Err(Failure::Io);
        }
        conn.get_mut()
            .write_all(connect_line.as_bytes())
            .await
            .map_err(|_| Failure::Io)?;
        loop {
            line.clear();
            let n = conn.read_line(&mut line).await.map_err(|_| Failure::Io)?;
            if n == 0 {
                return Err(Failure::Io);
            }
            if line.starts_with("PONG") {
                return Ok(conn);
            }
            if line.starts_with("-ERR") {
                return Err(Failure::Refused);
            }
            if line.starts_with("PING") {
                conn.get_mut()
                    .write_all(b"PONG\r\n")
                    .await
                    .map_err(|_| Failure::Io)?;
            }
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

#[derive(Default)]
struct Phase {
    ok: usize,
    refused: usize,
    timeouts: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    cpu: Cpu,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn pct(&self, q: f64) -> Duration {
        pct(&self.latencies, q)
    }
    fn merge(&mut self, other: Phase) {
        self.ok += other.ok;
        self.refused += other.refused;
        self.timeouts += other.timeouts;
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
    }
    fn failures(&self) -> String {
        if self.refused + self.timeouts + self.errors == 0 {
            String::new()
        } else {
            format!(
                "; refused {}, timed out {}, errors {}",
                self.refused, self.timeouts, self.errors
            )
        }
    }
}

fn pct(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let idx = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1;
    s[idx]
}

/// `workers` clients log in and disconnect in a loop, cycling through `creds` (or taking each
/// once when `once`), for `duration` or until `limit` logins.
async fn hammer(
    port: u16,
    creds: Arc<Vec<Cred>>,
    workers: usize,
    duration: Duration,
    limit: usize,
    once: bool,
) -> Phase {
    let lines: Arc<Vec<String>> = Arc::new(creds.iter().map(Cred::connect_line).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let lines = lines.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut p = Phase::default();
            while start.elapsed() < duration {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit || (once && i >= lines.len()) {
                    break;
                }
                let t = Instant::now();
                match raw_login(port, &lines[i % lines.len()], Duration::from_secs(5)).await {
                    Ok(conn) => {
                        p.latencies.push(t.elapsed());
                        p.ok += 1;
                        drop(conn);
                    }
                    Err(Failure::Refused) => p.refused += 1,
                    Err(Failure::Timeout) => p.timeouts += 1,
                    Err(Failure::Io) => p.errors += 1,
                }
            }
            p
        }));
    }
    let mut total = Phase::default();
    for t in tasks {
        total.merge(t.await.unwrap());
    }
    total.elapsed = start.elapsed();
    total
}

/// Throughput with `workers` in flight, then latency one at a time.
async fn connect_phases(port: u16, pid: u32, creds: Arc<Vec<Cred>>, k: &Knobs) -> (Phase, Phase) {
    let meter = CpuMeter::start(pid);
    let mut tput = hammer(
        port,
        creds.clone(),
        k.concurrency,
        k.seconds,
        usize::MAX,
        false,
    )
    .await;
    tput.cpu = meter.stop();
    let lat = hammer(port, creds, 1, k.seconds * 4, k.samples, false).await;
    (tput, lat)
}

/// Restarts nats-server and waits until `cred` logs in through it again (the service has
/// reconnected and subscribed) and the sync has pushed every account to it again (the leader
/// pushes everything after a reconnect; that work is not what a phase measures).
async fn restart_and_log_in(server: &mut NatsServer, dir: &Path, cred: &Cred, pool: &PgPool) {
    server.restart(dir, "callout").await;
    let line = cred.connect_line();
    let t = Instant::now();
    while raw_login(server.port, &line, Duration::from_secs(5))
        .await
        .is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "logins after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.sync_outbox")
            .fetch_one(pool)
            .await
            .unwrap();
        if pending == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the sync to push every account after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` clients connect at the same instant and stay connected until all are done.
async fn storm(port: u16, creds: &[Cred], n: usize, pid: u32) -> Phase {
    let lines: Vec<String> = (0..n)
        .map(|i| creds[i % creds.len()].connect_line())
        .collect();
    let gate = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for line in lines {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let t = Instant::now();
            let r = raw_login(port, &line, Duration::from_secs(10)).await;
            (r, t.elapsed())
        }));
    }
    let meter = CpuMeter::start(pid);
    let start = Instant::now();
    gate.wait().await;
    let mut p = Phase::default();
    let mut held = Vec::with_capacity(n);
    let mut last = Duration::ZERO;
    for t in tasks {
        let (r, took) = t.await.unwrap();
        match r {
            Ok(conn) => {
                p.ok += 1;
                p.latencies.push(took);
                last = last.max(took);
                held.push(conn);
            }
            Err(Failure::Refused) => p.refused += 1,
            Err(Failure::Timeout) => p.timeouts += 1,
            Err(Failure::Io) => p.errors += 1,
        }
    }
    p.elapsed = last.max(Duration::from_nanos(1));
    p.cpu = meter.stop();
    let _ = start;
    drop(held);
    // Let the server notice the closed connections before the next phase.
    tokio::time::sleep(Duration::from_millis(500)).await;
    p
}

/// A reconnect storm's client gives up on one attempt after this long (async-nats's default
/// `connection_timeout`), as nats-server does after its 2 s auth timeout.
const STORM_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A client still out after this long (`LOAD_STORM_CAP` seconds, 60) is counted as never in.
fn storm_cap() -> Duration {
    Duration::from_secs(env_num("LOAD_STORM_CAP", 60) as u64)
}

/// The wait before the next attempt after `failures` failed ones, as client libraries do:
/// exponential from 250 ms, capped at 4 s (async-nats: 2^n ms up to 4 s), half of it random so
/// a storm's clients spread out (nats.go adds jitter to its reconnect wait the same way).
fn backoff(failures: u32) -> Duration {
    let base = (Duration::from_millis(250) * (1u32 << failures.saturating_sub(1).min(4)))
        .min(Duration::from_secs(4));
    base / 2 + base.mul_f64(rand::random::<f64>() / 2.0)
}

#[derive(Default)]
struct StormRun {
    n: usize,
    /// Clients in, and when the last one got in.
    clients_in: usize,
    last_in: Duration,
    attempts: usize,
    refused: usize,
    timeouts: usize,
    errors: usize,
    /// The service's counters over the storm.
    minted: u64,
    skipped: u64,
    late: u64,
    cpu: Cpu,
    wall: Duration,
}

impl StormRun {
    /// Answers with a JWT that no client used (the server or the client had given up).
    fn wasted(&self) -> u64 {
        self.minted.saturating_sub(self.clients_in as u64)
    }
    /// Service CPU spent on those, at the storm's average cost per minted answer.
    fn wasted_cpu(&self) -> f64 {
        if self.minted == 0 {
            0.0
        } else {
            self.cpu.service * self.wasted() as f64 / self.minted as f64
        }
    }
    fn all_in(&self) -> String {
        if self.clients_in == self.n {
            ms(self.last_in)
        } else {
            format!(
                "{} of {} in after {}",
                self.clients_in,
                self.n,
                ms(storm_cap())
            )
        }
    }
    fn line(&self, round: usize, shedding: bool) -> String {
        format!(
            "storm {} round {round} {}: all in after {}, {} attempts ({} refused, {} timed out, {} errors), {} minted, {} wasted ({:.2} s service CPU), {} late, {} skipped; CPU s: service {:.2}, nats-server {:.2}, clients {:.2}",
            self.n,
            if shedding { "after" } else { "before" },
            self.all_in(),
            self.attempts,
            self.refused,
            self.timeouts,
            self.errors,
            self.minted,
            self.wasted(),
            self.wasted_cpu(),
            self.late,
            self.skipped,
            self.cpu.service,
            self.cpu.server,
            self.cpu.driver
        )
    }
}

/// `n` clients connect at the same instant; each one refused or timed out tries again after
/// [`backoff`] until it is in (or [`storm_cap`]). All stay connected until the storm is over.
async fn reconnect_storm(
    port: u16,
    creds: &[Cred],
    n: usize,
    pid: u32,
    service: &Service,
) -> StormRun {
    let gate = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let line = creds[i % creds.len()].connect_line();
        let gate = gate.clone();
        let cap = storm_cap();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let start = Instant::now();
            let mut p = Phase::default();
            let mut failures = 0;
            let mut conn = None;
            while start.elapsed() < cap {
                match raw_login(port, &line, STORM_CLIENT_TIMEOUT).await {
                    Ok(c) => {
                        p.latencies.push(start.elapsed());
                        conn = Some(c);
                        break;
                    }
                    Err(Failure::Refused) => p.refused += 1,
                    Err(Failure::Timeout) => p.timeouts += 1,
                    Err(Failure::Io) => p.errors += 1,
                }
                failures += 1;
                tokio::time::sleep(backoff(failures)).await;
            }
            (p, conn)
        }));
    }
    let m = &service.metrics;
    let (minted0, skipped0, late0) = (m.allowed(), m.skipped(), m.late_answers());
    let meter = CpuMeter::start(pid);
    let start = Instant::now();
    gate.wait().await;
    let mut r = StormRun {
        n,
        ..StormRun::default()
    };
    let mut held = Vec::with_capacity(n);
    for t in tasks {
        let (p, conn) = t.await.unwrap();
        r.attempts += p.refused + p.timeouts + p.errors + p.latencies.len();
        r.refused += p.refused;
        r.timeouts += p.timeouts;
        r.errors += p.errors;
        if let Some(c) = conn {
            r.clients_in += 1;
            r.last_in = r.last_in.max(p.latencies[0]);
            held.push(c);
        }
    }
    r.wall = start.elapsed();
    // Answers still on their way when the last client got in are the storm's too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.cpu = meter.stop();
    r.minted = m.allowed() - minted0;
    r.skipped = m.skipped() - skipped0;
    r.late = m.late_answers() - late0;
    drop(held);
    // Let the server and the service settle (10,000 disconnects) before the next storm.
    tokio::time::sleep(Duration::from_secs(3)).await;
    r
}

/// The storm table: per size, before / after in each round.
fn print_storms(runs: &[(usize, bool, StormRun)]) {
    println!();
    println!(
        "## Reconnect storms (one replica, shedding off = before, on = after; 2 s auth timeout)"
    );
    println!();
    println!("| clients | round | | all in after | attempts | refused | timed out | JWTs minted | wasted (minted, not used) | service CPU on wasted | late answers | skipped | service CPU | nats-server CPU |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (round, shedding, r) in runs {
        println!(
            "| {} | {round} | {} | {} | {} | {} | {} | {} | {} | {:.2} s | {} | {} | {:.2} s | {:.2} s |",
            r.n,
            if *shedding { "after" } else { "before" },
            r.all_in(),
            r.attempts,
            r.refused,
            r.timeouts + r.errors,
            r.minted,
            r.wasted(),
            r.wasted_cpu(),
            r.late,
            r.skipped,
            r.cpu.service,
            r.cpu.server
        );
    }
    println!();
}

// ------------------------------------------------------------------------------------------
// Database fixtures
// ------------------------------------------------------------------------------------------

async fn fresh_database(admin: &str) -> (String, String) {
    let pool = PgPool::connect(admin).await.expect("connect admin db");
    let name = format!("npa_load_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .expect("create database");
    pool.close().await;
    let (base, _) = admin.rsplit_once('/').expect("admin URL ends with /dbname");
    let query = admin
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    (format!("{base}/{name}{query}"), name)
}

async fn drop_database(admin: &str, name: &str) {
    if let Ok(pool) = PgPool::connect(admin).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&pool)
            .await;
        pool.close().await;
    }
}

async fn sql(pool: &PgPool, q: &str) {
    sqlx::raw_sql(q)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("SQL failed: {e}\n{q}"));
}

/// `n` users `<prefix>1..n` in account `bench`, role `device`, all with one shared bcrypt hash
/// of `pw` at `cost` (hashing once keeps the fixture fast; every user still verifies alone).
async fn add_users(pool: &PgPool, prefix: &str, n: usize, cost: u32) {
    sql(
        pool,
        &format!(
            "INSERT INTO nats.users (account_id, role_id, username, password_hash)
               SELECT a.id, r.id, '{prefix}' || g, h.h
               FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id AND r.name = 'device',
                    generate_series(1, {n}) g, (SELECT crypt('pw', gen_salt('bf', {cost})) AS h) h
               WHERE a.name = 'bench'"
        ),
    )
    .await;
}

/// `n` more users `<prefix><from+1>..` (one cost-4 hash), fast: the row triggers are skipped
/// (`session_replication_role = replica`; no service listens while this runs, and the checks
/// they make hold for these rows), so a million rows take seconds, not minutes.
async fn add_users_bulk(pool: &PgPool, prefix: &str, from: usize, n: usize) {
    sql(
        pool,
        &format!(
            "BEGIN; SET LOCAL session_replication_role = replica;
             INSERT INTO nats.users (account_id, role_id, username, password_hash)
               SELECT a.id, r.id, '{prefix}' || g, h.h
               FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id AND r.name = 'device',
                    generate_series({}, {}) g, (SELECT crypt('pw', gen_salt('bf', 4)) AS h) h
               WHERE a.name = 'bench';
             COMMIT;",
            from + 1,
            from + n
        ),
    )
    .await;
}

fn users(prefix: &str, range: std::ops::Range<usize>) -> Vec<Cred> {
    range
        .map(|i| Cred::Password(format!("{prefix}{}", i + 1), "pw".into()))
        .collect()
}

async fn wait_synced(pool: &PgPool, name: &str) {
    let start = Instant::now();
    loop {
        let ok: Option<bool> = sqlx::query_scalar(
            "SELECT synced_at IS NOT NULL AND sync_error IS NULL FROM nats.accounts WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(pool)
        .await
        .unwrap();
        if ok == Some(true) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "account {name} not synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------------------------------
// The report
// ------------------------------------------------------------------------------------------

struct Row {
    id: &'static str,
    scenario: String,
    result: String,
    p50: String,
    p99: String,
    ratio: String,
    goal: String,
}

fn ms(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.1} s", us / 1e6)
    }
}

fn cpu_note(c: &Cpu, wall: Duration) -> String {
    let w = wall.as_secs_f64().max(1e-9);
    format!(
        "CPU (of 2 cores): nats-server {:.0}%, service {:.0}%, clients {:.0}%",
        100.0 * c.server / w,
        100.0 * c.service / w,
        100.0 * c.driver / w
    )
}

fn print_table(rows: &[Row], notes: &[String], k: &Knobs) {
    println!();
    println!(
        "## nats-pg-auth load run ({}; {} clients in flight, {} s per throughput phase, {} serial latency samples)",
        if k.quick { "LOAD_QUICK" } else { "full" },
        k.concurrency,
        k.seconds.as_secs(),
        k.samples
    );
    println!();
    println!("| # | scenario | result | p50 | p99 | vs baseline | goal |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.id, r.scenario, r.result, r.p50, r.p99, r.ratio, r.goal
        );
    }
    println!();
    for n in notes {
        println!("- {n}");
    }
    println!();
}

// ------------------------------------------------------------------------------------------
// The RSS child: only the service and a request generator in this process
// ------------------------------------------------------------------------------------------

fn rss_child() {
    let rss0 = vm_rss_kib();
    let db = std::env::var("LOAD_DB_URL").unwrap();
    let nats = std::env::var("LOAD_NATS_URL").unwrap();
    let key = std::env::var("LOAD_KEY").unwrap();
    let n = env_num("LOAD_RSS_USERS", 100_000);
    let cipher = SeedCipher::new(Some(nats_pg_auth::keys::parse_key(&key).unwrap()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("drv")
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let config = serve_config(&db, &nats, &cipher);
        let service = Service::start(config);
        service.wait_live().await;
        let pool = PgPool::connect(&db).await.unwrap();
        let ids = ServiceIdentities::load(&pool).await.unwrap();
        pool.close().await;
        let fake = Arc::new(FakeServer::new(
            ids.public_key(IdentityKind::AuthAccount),
            ids.public_key(IdentityKind::AuthXkey),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss1 = vm_rss_kib();
        let start = Instant::now();
        let allowed = service.answer_all(fake.clone(), users("r", 0..n), 64).await;
        let took = start.elapsed();
        // The first pass runs one bcrypt per user; a second pass (credential-cache hits) makes
        // sure every user is in every cache when measured (the child runs with a login TTL
        // longer than both passes, see `rss_child`'s config).
        let _ = service.answer_all(fake, users("r", 0..n), 64).await;
        let rss2 = vm_rss_kib();
        let counts = service.callout.cache().entry_counts();
        let hashes = service.callout.password_hashes_computed();
        println!(
            "RSS_RESULT {rss0} {rss1} {rss2} {allowed} {} {hashes} {}",
            took.as_millis(),
            counts
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        drop(service);
    });
}

/// The copy child: builds the service (not started: nothing loads on its own) and times full
/// loads of the login copy, with VmRSS before and after each.
fn copy_child() {
    let rss0 = vm_rss_kib();
    let db = std::env::var("LOAD_DB_URL").unwrap();
    let nats = std::env::var("LOAD_NATS_URL").unwrap();
    let key = std::env::var("LOAD_KEY").unwrap();
    let cipher = SeedCipher::new(Some(nats_pg_auth::keys::parse_key(&key).unwrap()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let app = Application::build(serve_config(&db, &nats, &cipher))
            .await
            .expect("build the service");
        let callout = app.callout();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss1 = vm_rss_kib();
        let (users, tokens, took1) = callout.reload().await.expect("load the copy");
        assert!(callout.cache().is_loaded());
        let rss2 = vm_rss_kib();
        let hwm = proc_status_kib("VmHWM:");
        // A reload builds the new table before the old one is dropped.
        let (_, _, took2) = callout.reload().await.expect("reload the copy");
        let rss3 = vm_rss_kib();
        // A third: does RSS keep growing, or does the second table reuse what the first freed?
        let (_, _, took3) = callout.reload().await.expect("reload the copy");
        let rss4 = vm_rss_kib();
        // The same read with nothing built: SQL, transfer and row decoding only.
        let pool = PgPool::connect(&db).await.unwrap();
        let t = Instant::now();
        nats_pg_auth::db::logins::load(
            &pool,
            &nats_pg_auth::db::logins::UserFilter::all(),
            |_, _, _| {},
        )
        .await
        .unwrap();
        let fetch = t.elapsed();
        pool.close().await;
        println!(
            "COPY_RESULT {users} {tokens} {} {} {} {rss0} {rss1} {rss2} {rss3} {hwm} {rss4}",
            took1.as_millis(),
            took2.as_millis().max(took3.as_millis()),
            fetch.as_millis()
        );
        drop(app);
    });
}

// ------------------------------------------------------------------------------------------
// The run
// ------------------------------------------------------------------------------------------

fn main() {
    // `serve` would otherwise open its HTTP endpoint on a fixed port.
    std::env::set_var("NATS_PG_AUTH_HTTP_LISTEN", "off");
    if std::env::var("LOAD_CHILD").as_deref() == Ok("rss") {
        rss_child();
        return;
    }
    if std::env::var("LOAD_CHILD").as_deref() == Ok("copy") {
        copy_child();
        return;
    }
    let knobs = Knobs::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("drv")
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(knobs));
}

async fn run(k: Knobs) {
    let dir = tempfile::Builder::new()
        .prefix("nats-pg-auth-load.")
        .tempdir()
        .unwrap();
    let log = std::fs::File::create(dir.path().join("service.log")).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(
                std::env::var("LOAD_LOG").unwrap_or_else(|_| "nats_pg_auth=info,warn".into()),
            )
            .unwrap(),
        )
        .with_ansi(false)
        .with_writer(Arc::new(log))
        .try_init();

    let pg = Postgres::start();
    let (db_url, db_name) = fresh_database(&pg.admin_url).await;
    eprintln!(
        "load: database {db_name}, files in {}",
        dir.path().display()
    );
    let result = std::panic::AssertUnwindSafe(scenarios(&k, &db_url, dir.path()));
    let outcome = futures::FutureExt::catch_unwind(result).await;
    drop_database(&pg.admin_url, &db_name).await;
    drop(pg);
    if let Err(p) = outcome {
        eprintln!("load: failed; logs kept in {}", dir.keep().display());
        std::panic::resume_unwind(p);
    }
    if std::env::var_os("LOAD_KEEP").is_some() {
        eprintln!("load: logs kept in {}", dir.keep().display());
    }
}

async fn scenarios(k: &Knobs, db_url: &str, dir: &Path) {
    let pool = nats_pg_auth::db::connect(db_url, 4).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    let key: [u8; 32] = rand::random();
    let cipher = SeedCipher::new(Some(key));
    let report = init::init(&pool, &cipher, Some("load-operator"))
        .await
        .unwrap();
    let resolver = dir.join("jwt");
    init::write_fragment(&report.identities, &resolver, &dir.join("fragment.conf")).unwrap();
    let ids = ServiceIdentities::load(&pool).await.unwrap();

    // The baseline: the same binary, users in its own config, no callout.
    let baseline_users = 100;
    let users_conf = (1..=baseline_users)
        .map(|i| format!("    {{user: \"b{i}\", password: \"pw\"}}"))
        .collect::<Vec<_>>()
        .join(",\n");
    let baseline = NatsServer::start(
        dir,
        "baseline",
        &format!("authorization {{\n  users: [\n{users_conf}\n  ]\n}}"),
    )
    .await;
    let mut server = NatsServer::start(dir, "callout", "include \"fragment.conf\"").await;
    let mut service = Service::start(serve_config(db_url, &server.url(), &cipher));
    service.wait_live().await;

    sql(
        &pool,
        "INSERT INTO nats.accounts (name) VALUES ('bench');
         INSERT INTO nats.roles (account_id, name, publish_permissions, publish_deny_permissions,
                                 subscribe_permissions, subscribe_deny_permissions, allow_response)
           SELECT id, 'device', '{sensors.>,telemetry.>,events.>}', '{sensors.admin.>}',
                  '{sensors.>,_INBOX.>,cmd.broadcast}', '{sensors.secret.>}', true
           FROM nats.accounts WHERE name = 'bench';",
    )
    .await;
    wait_synced(&pool, "bench").await;
    add_users(&pool, "w", k.warm_users, 10).await;
    add_users(&pool, "c", k.cold_users, 10).await;
    let storm_users = if k.wants("bigstorm") {
        k.big_storms
            .iter()
            .copied()
            .chain([k.storm])
            .max()
            .unwrap_or(k.storm)
    } else {
        k.storm
    };
    add_users(&pool, "s", storm_users, 4).await;
    add_users(&pool, "t", k.token_users, 4).await;
    sql(
        &pool,
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('tok-' || substr(username, 2), 'sha256') FROM nats.users WHERE username LIKE 't%'",
    )
    .await;
    let fake = Arc::new(FakeServer::new(
        ids.public_key(IdentityKind::AuthAccount),
        ids.public_key(IdentityKind::AuthXkey),
    ));

    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let na = || "n/a".to_string();

    // 1. Baseline.
    let base_creds: Arc<Vec<Cred>> = Arc::new(users("b", 0..baseline_users));
    let mut base: Option<(Phase, Phase)> = None;
    if k.wants("baseline") {
        let (t, l) = connect_phases(baseline.port, baseline.pid(), base_creds.clone(), k).await;
        rows.push(Row {
            id: "1",
            scenario: "baseline: users in nats-server config, no callout".into(),
            result: format!("{:.0} connects/s{}", t.rate(), t.failures()),
            p50: ms(l.pct(0.5)),
            p99: ms(l.pct(0.99)),
            ratio: "1.00".into(),
            goal: "—".into(),
        });
        notes.push(format!("1 baseline: {}", cpu_note(&t.cpu, t.elapsed)));
        base = Some((t, l));
    }
    let vs = |rate: f64, p50: Duration| -> String {
        match &base {
            Some((t, l)) => format!(
                "{:.2}× connects/s, {:.1}× p50",
                rate / t.rate(),
                p50.as_secs_f64() / l.pct(0.5).as_secs_f64().max(1e-9)
            ),
            None => na(),
        }
    };

    // 2 + 3. Warm callout logins: token, password (credential cache warm).
    let token_creds: Arc<Vec<Cred>> = Arc::new(
        (1..=k.token_users)
            .map(|i| Cred::Token(format!("tok-{i}")))
            .collect(),
    );
    let warm_creds: Arc<Vec<Cred>> = Arc::new(users("w", 0..k.warm_users));
    // The rows reach the login copy through its change feed, a moment after the INSERTs: a
    // warm-up that meets a row not there yet is tried again.
    let warm_up_t = Instant::now();
    let mut warmed = 0;
    while warm_up_t.elapsed() < Duration::from_secs(60) {
        warmed = service
            .answer_all(
                fake.clone(),
                token_creds
                    .iter()
                    .chain(warm_creds.iter())
                    .cloned()
                    .collect(),
                // Two per hashing thread at most: a busy machine cannot push them past the
                // timeout.
                4,
            )
            .await;
        if warmed == k.token_users + k.warm_users {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        warmed,
        k.token_users + k.warm_users,
        "warm-up logins allowed"
    );
    eprintln!("load: warmed {warmed} users in {:?}", warm_up_t.elapsed());
    let mut token_idle: Option<Phase> = None;
    let mut warm_idle: Option<Phase> = None;
    if k.wants("token") {
        let (t, l) = connect_phases(server.port, server.pid(), token_creds.clone(), k).await;
        rows.push(Row {
            id: "2",
            scenario: "callout, token (login cache warm)".into(),
            result: format!("{:.0} connects/s{}", t.rate(), t.failures()),
            p50: ms(l.pct(0.5)),
            p99: ms(l.pct(0.99)),
            ratio: vs(t.rate(), l.pct(0.5)),
            goal: "—".into(),
        });
        notes.push(format!("2 token: {}", cpu_note(&t.cpu, t.elapsed)));
        token_idle = Some(l);
    }
    if k.wants("warm") {
        let hashes = service.callout.password_hashes_computed();
        let (t, l) = connect_phases(server.port, server.pid(), warm_creds.clone(), k).await;
        let ran = service.callout.password_hashes_computed() - hashes;
        let goal_met = base
            .as_ref()
            .map(|(b, _)| t.rate() >= 0.5 * b.rate())
            .map(|m| {
                if m {
                    "≥ 0.5× baseline: met"
                } else {
                    "≥ 0.5× baseline: **missed**"
                }
            })
            .unwrap_or("≥ 0.5× baseline");
        rows.push(Row {
            id: "3",
            scenario: "callout, password, credential cache warm".into(),
            result: format!(
                "{:.0} connects/s{} (bcrypt runs: {ran})",
                t.rate(),
                t.failures()
            ),
            p50: ms(l.pct(0.5)),
            p99: ms(l.pct(0.99)),
            ratio: vs(t.rate(), l.pct(0.5)),
            goal: goal_met.into(),
        });
        notes.push(format!("3 password warm: {}", cpu_note(&t.cpu, t.elapsed)));
        warm_idle = Some(l);
    }
    // 5. Decision time, warm logins only (warm-ups go through `answer`, which the histogram
    // does not count). First as measured under scenarios 2 + 3 (mostly 16 in flight, CPU
    // saturated), then on a fresh service (fresh histogram) with one login at a time.
    if k.wants("token") || k.wants("warm") {
        let p50 = service.metrics.decision_percentile(0.5).unwrap_or_default();
        let p99 = service
            .metrics
            .decision_percentile(0.99)
            .unwrap_or_default();
        rows.push(Row {
            id: "5",
            scenario: "service decision time, warm, under scenarios 2 + 3 (CPU saturated)".into(),
            result: "request received → reply published".into(),
            p50: ms(p50),
            p99: ms(p99),
            ratio: "—".into(),
            goal: format!(
                "p99 < 1 ms: {}",
                if p99 < Duration::from_millis(1) {
                    "met"
                } else {
                    "**missed**"
                }
            ),
        });
        drop(service);
        service = Service::start(serve_config(db_url, &server.url(), &cipher));
        service.wait_live().await;
        let warmed = service
            .answer_all(
                fake.clone(),
                token_creds
                    .iter()
                    .chain(warm_creds.iter())
                    .cloned()
                    .collect(),
                8,
            )
            .await;
        assert_eq!(
            warmed,
            k.token_users + k.warm_users,
            "warm-up logins allowed"
        );
        let _ = hammer(
            server.port,
            token_creds.clone(),
            1,
            k.seconds * 2,
            k.samples / 2,
            false,
        )
        .await;
        let _ = hammer(
            server.port,
            warm_creds.clone(),
            1,
            k.seconds * 2,
            k.samples / 2,
            false,
        )
        .await;
        let p50 = service.metrics.decision_percentile(0.5).unwrap_or_default();
        let p99 = service
            .metrics
            .decision_percentile(0.99)
            .unwrap_or_default();
        rows.push(Row {
            id: "5",
            scenario: "service decision time, warm, one login at a time".into(),
            result: format!("{} token + password logins", k.samples),
            p50: ms(p50),
            p99: ms(p99),
            ratio: "—".into(),
            goal: format!(
                "p99 < 1 ms: {}",
                if p99 < Duration::from_millis(1) {
                    "met"
                } else {
                    "**missed**"
                }
            ),
        });
    }

    // 4. Cold password logins: users never seen, bcrypt cost 10 each.
    let cold_creds: Arc<Vec<Cred>> = Arc::new(users("c", 0..k.cold_users));
    let cold_used = Arc::new(AtomicUsize::new(0));
    let take_cold = |n: usize| -> Arc<Vec<Cred>> {
        let from = cold_used
            .fetch_add(n, Ordering::Relaxed)
            .min(cold_creds.len());
        let to = (from + n).min(cold_creds.len());
        Arc::new(cold_creds[from..to].to_vec())
    };
    if k.wants("cold") {
        let hashes = service.callout.password_hashes_computed();
        let meter = CpuMeter::start(server.pid());
        let creds = take_cold(k.cold_users / 2);
        let mut t = hammer(
            server.port,
            creds.clone(),
            k.cold_concurrency,
            k.seconds * 2,
            usize::MAX,
            true,
        )
        .await;
        t.cpu = meter.stop();
        let used = t.ok + t.refused + t.timeouts + t.errors;
        cold_used.fetch_sub(creds.len() - used.min(creds.len()), Ordering::Relaxed);
        let ran = service.callout.password_hashes_computed() - hashes;
        rows.push(Row {
            id: "4",
            scenario: format!(
                "callout, password, cold (bcrypt cost 10, {} in flight)",
                k.cold_concurrency
            ),
            result: format!(
                "{:.1} connects/s{} (bcrypt runs: {ran})",
                t.rate(),
                t.failures()
            ),
            p50: ms(t.pct(0.5)),
            p99: ms(t.pct(0.99)),
            ratio: vs(t.rate(), t.pct(0.5)),
            goal: "—".into(),
        });
        notes.push(format!("4 password cold: {}", cpu_note(&t.cpu, t.elapsed)));
    }

    // 4b. Isolation: token and warm password latency while a cold flood saturates bcrypt.
    if k.wants("isolation") {
        let flood_creds = take_cold(k.cold_users - cold_used.load(Ordering::Relaxed));
        let stop_after = k.seconds * 3;
        let flood = tokio::spawn(hammer(
            server.port,
            flood_creds,
            16,
            stop_after,
            usize::MAX,
            true,
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tok = hammer(
            server.port,
            token_creds.clone(),
            1,
            k.seconds,
            k.samples,
            false,
        )
        .await;
        let warm = hammer(
            server.port,
            warm_creds.clone(),
            1,
            k.seconds,
            k.samples,
            false,
        )
        .await;
        let flood = flood.await.unwrap();
        let ratio = |busy: &Phase, idle: &Option<Phase>| match idle {
            Some(i) => format!(
                "{:.2}× idle p99 ({} idle)",
                busy.pct(0.99).as_secs_f64() / i.pct(0.99).as_secs_f64().max(1e-9),
                ms(i.pct(0.99))
            ),
            None => na(),
        };
        let met = |busy: &Phase, idle: &Option<Phase>| match idle {
            Some(i) if busy.pct(0.99) <= i.pct(0.99) * 2 => "p99 ≤ 2× idle: met",
            Some(_) => "p99 ≤ 2× idle: **missed**",
            None => "p99 ≤ 2× idle",
        };
        rows.push(Row {
            id: "4b",
            scenario: "token logins during a cold password flood (16 in flight)".into(),
            result: format!("{} logins{}", tok.ok, tok.failures()),
            p50: ms(tok.pct(0.5)),
            p99: ms(tok.pct(0.99)),
            ratio: ratio(&tok, &token_idle),
            goal: met(&tok, &token_idle).into(),
        });
        rows.push(Row {
            id: "4b",
            scenario: "warm password logins during the same flood".into(),
            result: format!("{} logins{}", warm.ok, warm.failures()),
            p50: ms(warm.pct(0.5)),
            p99: ms(warm.pct(0.99)),
            ratio: ratio(&warm, &warm_idle),
            goal: met(&warm, &warm_idle).into(),
        });
        notes.push(format!(
            "4b flood: {} cold logins in, {} answered `overloaded` (refused), {} timed out, over {:?}",
            flood.ok, flood.refused, flood.timeouts, flood.elapsed
        ));
    }

    // 6. Storm: N clients at once, warm; then with the row cache flushed; then the baseline.
    if k.wants("storm") {
        let storm_creds = users("s", 0..k.storm);
        let t = Instant::now();
        let warmed = service
            .answer_all(fake.clone(), storm_creds.clone(), 8)
            .await;
        eprintln!("load: warmed {warmed} storm users in {:?}", t.elapsed());
        let hashes = service.callout.password_hashes_computed();
        let s = storm(server.port, &storm_creds, k.storm, server.pid()).await;
        let ran = service.callout.password_hashes_computed() - hashes;
        let b = if k.wants("baseline") {
            Some(storm(baseline.port, &base_creds, k.storm, baseline.pid()).await)
        } else {
            None
        };
        let in_ok = s.ok == k.storm;
        rows.push(Row {
            id: "6",
            scenario: format!("storm: {} clients at once, warm, 2 s auth timeout", k.storm),
            result: format!(
                "all in after {} ({} in{}; bcrypt runs: {ran})",
                ms(s.elapsed),
                s.ok,
                s.failures()
            ),
            p50: ms(s.pct(0.5)),
            p99: ms(s.pct(0.99)),
            ratio: b
                .as_ref()
                .map(|b| {
                    format!(
                        "baseline all in after {} ({:.1}×)",
                        ms(b.elapsed),
                        s.elapsed.as_secs_f64() / b.elapsed.as_secs_f64()
                    )
                })
                .unwrap_or_else(na),
            goal: format!(
                "all in, 0 refused: {}",
                if in_ok { "met" } else { "**missed**" }
            ),
        });
        notes.push(format!("6 storm (warm): {}", cpu_note(&s.cpu, s.elapsed)));
        if let Some(b) = &b {
            notes.push(format!(
                "6 storm (baseline): {}",
                cpu_note(&b.cpu, b.elapsed)
            ));
        }
        // Login rows expired or flushed (credentials still warm): one Postgres read each.
        service.callout.cache().flush();
        let s2 = storm(server.port, &storm_creds, k.storm, server.pid()).await;
        rows.push(Row {
            id: "6b",
            scenario: format!(
                "storm: {} clients, credential cache warm, login cache flushed",
                k.storm
            ),
            result: format!(
                "all in after {} ({} in{})",
                ms(s2.elapsed),
                s2.ok,
                s2.failures()
            ),
            p50: ms(s2.pct(0.5)),
            p99: ms(s2.pct(0.99)),
            ratio: b
                .as_ref()
                .map(|b| {
                    format!(
                        "{:.1}× baseline",
                        s2.elapsed.as_secs_f64() / b.elapsed.as_secs_f64()
                    )
                })
                .unwrap_or_else(na),
            goal: format!(
                "all in, 0 refused: {}",
                if s2.ok == k.storm {
                    "met"
                } else {
                    "**missed**"
                }
            ),
        });
        notes.push(format!(
            "6b storm (rows cold): {}",
            cpu_note(&s2.cpu, s2.elapsed)
        ));
    }

    // 6c. Reconnect storms, shedding off (before) and on (after), alternating, on one replica.
    if k.wants("bigstorm") {
        let biggest = k.big_storms.iter().copied().max().unwrap_or(0);
        let creds = users("s", 0..biggest);
        let t = Instant::now();
        let warmed = service.answer_all(fake.clone(), creds.clone(), 8).await;
        eprintln!("load: warmed {warmed} storm users in {:?}", t.elapsed());
        // LOAD_STORM_XKEY=off: the storms with AUTH published without its xkey (`init
        // --no-xkey`; nats-server is restarted before every storm and reads the fragment then).
        let xkey = std::env::var("LOAD_STORM_XKEY").map_or(true, |v| v != "off");
        if !xkey {
            let report = init::init_with(
                &pool,
                &cipher,
                None,
                init::InitOptions { xkey: Some(false) },
            )
            .await
            .unwrap();
            init::write_fragment(&report.identities, &resolver, &dir.join("fragment.conf"))
                .unwrap();
        }
        let mut runs = Vec::new();
        for round in 1..=k.storm_rounds {
            for &n in &k.big_storms {
                let order = if round % 2 == 1 {
                    [false, true]
                } else {
                    [true, false]
                };
                for shedding in order {
                    // A fresh nats-server for every storm: one that just went through a storm
                    // (10,000 connections closed, its heap grown) did worse in the next phase
                    // whatever the mode, which hid the difference between the modes.
                    restart_and_log_in(&mut server, dir, &creds[0], &pool).await;
                    service.callout.set_shedding(shedding);
                    let r = reconnect_storm(server.port, &creds, n, server.pid(), &service).await;
                    eprintln!("load: {}", r.line(round, shedding));
                    runs.push((round, shedding, r));
                }
            }
        }
        service.callout.set_shedding(true);
        print_storms(&runs);
    }

    // 11. xkey on / off: token logins (16 in flight), AUTH with and without its xkey, phases
    // alternating, nats-server restarted with `init`'s fragment between them.
    if k.wants("xkey") {
        let mut phases = Vec::new();
        for round in 1..=k.storm_rounds {
            let order = if round % 2 == 1 {
                [true, false]
            } else {
                [false, true]
            };
            for xkey in order {
                let report =
                    init::init_with(&pool, &cipher, None, init::InitOptions { xkey: Some(xkey) })
                        .await
                        .unwrap();
                init::write_fragment(&report.identities, &resolver, &dir.join("fragment.conf"))
                    .unwrap();
                restart_and_log_in(&mut server, dir, &token_creds[0], &pool).await;
                let meter = CpuMeter::start(server.pid());
                let mut p = hammer(
                    server.port,
                    token_creds.clone(),
                    k.concurrency,
                    k.seconds,
                    usize::MAX,
                    false,
                )
                .await;
                p.cpu = meter.stop();
                eprintln!(
                    "load: xkey {} round {round}: {:.0} connects/s, per login: nats-server {:.0} µs, service {:.0} µs{}",
                    if xkey { "on" } else { "off" },
                    p.rate(),
                    1e6 * p.cpu.server / p.ok.max(1) as f64,
                    1e6 * p.cpu.service / p.ok.max(1) as f64,
                    p.failures()
                );
                phases.push((round, xkey, p));
            }
        }
        println!();
        println!(
            "## xkey on / off (token logins, {} in flight, {} s per phase)",
            k.concurrency,
            k.seconds.as_secs()
        );
        println!();
        println!("| round | AUTH xkey | connects/s | nats-server CPU per login | service CPU per login | clients CPU per login |");
        println!("|---|---|---|---|---|---|");
        for (round, xkey, p) in &phases {
            let per = |c: f64| format!("{:.0} µs", 1e6 * c / p.ok.max(1) as f64);
            println!(
                "| {round} | {} | {:.0}{} | {} | {} | {} |",
                if *xkey { "on" } else { "off" },
                p.rate(),
                p.failures(),
                per(p.cpu.server),
                per(p.cpu.service),
                per(p.cpu.driver)
            );
        }
        println!();
    }

    // 7. Sync: N accounts in one statement; then UPDATE → served.
    if k.wants("sync") {
        let sys = system_client(&pool, &cipher, &server.url()).await;
        let n = k.sync_accounts;
        let meter = CpuMeter::start(server.pid());
        let t0 = Instant::now();
        sql(
            &pool,
            &format!("INSERT INTO nats.accounts (name) SELECT 'load' || g FROM generate_series(1, {n}) g"),
        )
        .await;
        let inserted = t0.elapsed();
        let mut synced = 0i64;
        while t0.elapsed() < Duration::from_secs(600) {
            synced = sqlx::query_scalar(
                "SELECT count(*) FROM nats.accounts WHERE name LIKE 'load%' AND synced_at IS NOT NULL",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            if synced as usize >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let all_in = t0.elapsed();
        let cpu = meter.stop();
        let on_server = nats_pg_auth::sync::publish::list(&sys, Duration::from_secs(10))
            .await
            .map(|l| l.len())
            .unwrap_or(0);
        rows.push(Row {
            id: "7",
            scenario: format!("sync: {n} accounts in one INSERT until all on the server"),
            result: format!(
                "{} ({synced} synced, {on_server} accounts listed by the server; INSERT took {})",
                ms(all_in),
                ms(inserted)
            ),
            p50: "—".into(),
            p99: "—".into(),
            ratio: format!("{:.0} accounts/s", synced as f64 / all_in.as_secs_f64()),
            goal: format!(
                "< 30 s: {}",
                if synced as usize >= n && all_in < Duration::from_secs(30) {
                    "met"
                } else {
                    "**missed**"
                }
            ),
        });
        notes.push(format!("7 sync: {}", cpu_note(&cpu, all_in)));

        let pk: String =
            sqlx::query_scalar("SELECT public_key FROM nats.accounts WHERE name = 'bench'")
                .fetch_one(&pool)
                .await
                .unwrap();
        let mut lat = Vec::new();
        let mut missing = 0;
        for i in 0..k.sync_samples {
            let want = 1000 + i as i64;
            sql(
                &pool,
                &format!("UPDATE nats.accounts SET max_connections = {want} WHERE name = 'bench'"),
            )
            .await;
            let t = Instant::now();
            let mut seen = false;
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(jwt)) =
                    nats_pg_auth::sync::publish::lookup(&sys, &pk, Duration::from_secs(2)).await
                {
                    let conn = nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(&jwt)
                        .ok()
                        .and_then(|c| c.nats["limits"]["conn"].as_i64());
                    if conn == Some(want) {
                        seen = true;
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if seen {
                if t.elapsed() > Duration::from_millis(500) {
                    eprintln!(
                        "load: sync sample {i} took {} (UPDATE committed at {})",
                        ms(t.elapsed()),
                        humantime::format_rfc3339_micros(
                            std::time::SystemTime::now() - t.elapsed()
                        )
                    );
                }
                lat.push(t.elapsed());
            } else {
                missing += 1;
            }
        }
        let mut sorted = lat.clone();
        sorted.sort_unstable();
        let slow = sorted
            .iter()
            .filter(|d| **d > Duration::from_millis(500))
            .count();
        notes.push(format!(
            "7 UPDATE → served: {slow} of {} samples over 500 ms; slowest {}",
            sorted.len(),
            sorted
                .iter()
                .rev()
                .take(3)
                .map(|d| ms(*d))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        rows.push(Row {
            id: "7",
            scenario: "sync: UPDATE of one account → new JWT served by CLAIMS.LOOKUP".into(),
            result: format!(
                "{} samples{}",
                lat.len(),
                if missing > 0 {
                    format!(", {missing} not served in 10 s")
                } else {
                    String::new()
                }
            ),
            p50: ms(pct(&lat, 0.5)),
            p99: ms(pct(&lat, 0.99)),
            ratio: "—".into(),
            goal: format!(
                "p99 < 500 ms: {}",
                if missing == 0 && pct(&lat, 0.99) < Duration::from_millis(500) {
                    "met"
                } else {
                    "**missed**"
                }
            ),
        });
    }

    // 9. RSS: a child process running only the service logs N users in once.
    if k.wants("rss") {
        let n = k.rss_users;
        add_users(&pool, "r", n, 4).await;
        drop(service);
        let out = Command::new(std::env::current_exe().unwrap())
            .env("LOAD_CHILD", "rss")
            .env("LOAD_DB_URL", db_url)
            .env("LOAD_NATS_URL", server.url())
            .env("LOAD_KEY", base64_key(&key))
            .env("LOAD_RSS_USERS", n.to_string())
            .stderr(Stdio::inherit())
            .output()
            .expect("run the RSS child");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("RSS_RESULT"))
            .unwrap_or_else(|| panic!("RSS child printed no result: {text}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        let kib = |i: usize| f[i].parse::<u64>().unwrap();
        let (rss0, rss1, rss2) = (kib(1), kib(2), kib(3));
        let allowed: usize = f[4].parse().unwrap();
        let took_ms: u64 = f[5].parse().unwrap();
        rows.push(Row {
            id: "9",
            scenario: format!("RSS of the service process with {n} users logged in (caches full)"),
            result: format!(
                "{:.1} MiB (idle {:.1} MiB, +{:.1} MiB = {} B/user; {allowed} logins in {:.1} s)",
                rss2 as f64 / 1024.0,
                rss1 as f64 / 1024.0,
                (rss2.saturating_sub(rss1)) as f64 / 1024.0,
                (rss2.saturating_sub(rss1)) * 1024 / n.max(1) as u64,
                took_ms as f64 / 1000.0
            ),
            p50: "—".into(),
            p99: "—".into(),
            ratio: "—".into(),
            goal: format!(
                "< 150 MB: {}",
                if rss2 * 1024 < 150_000_000 {
                    "met"
                } else {
                    "**missed**"
                }
            ),
        });
        notes.push(format!(
            "9 RSS child: VmRSS at exec {:.1} MiB; caches after the logins: {}; bcrypt runs {}",
            rss0 as f64 / 1024.0,
            f.get(7).unwrap_or(&""),
            f.get(6).unwrap_or(&"?")
        ));
    } else {
        drop(service);
    }

    // 10. The login copy (issue 7): N users in the database (all of them, including the other
    // scenarios' few thousand), a full load in a fresh child process: time and RSS per user.
    if k.wants("copy") {
        let mut tokens_added = false;
        for &n in &k.copy_users {
            let have: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.users")
                .fetch_one(&pool)
                .await
                .unwrap();
            let t = Instant::now();
            if (have as usize) < n {
                add_users_bulk(&pool, "m", have as usize, n - have as usize).await;
            }
            if !tokens_added {
                tokens_added = true;
                sql(
                    &pool,
                    &format!(
                        "BEGIN; SET LOCAL session_replication_role = replica;
                         INSERT INTO nats.user_tokens (user_id, token_sha256)
                           SELECT id, digest('mtok-' || id, 'sha256') FROM nats.users
                           WHERE username LIKE 'm%' ORDER BY id LIMIT {};
                         COMMIT;",
                        k.copy_tokens
                    ),
                )
                .await;
            }
            sql(&pool, "VACUUM (ANALYZE) nats.users, nats.user_tokens").await;
            eprintln!("load: copy fixture at {n} users in {:?}", t.elapsed());
            let out = Command::new(std::env::current_exe().unwrap())
                .env("LOAD_CHILD", "copy")
                .env("LOAD_DB_URL", db_url)
                .env("LOAD_NATS_URL", server.url())
                .env("LOAD_KEY", base64_key(&key))
                .stderr(Stdio::inherit())
                .output()
                .expect("run the copy child");
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.starts_with("COPY_RESULT"))
                .unwrap_or_else(|| panic!("copy child printed no result: {text}"));
            let f: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap())
                .collect();
            let [users, tokens, took1, took2, fetch, rss0, rss1, rss2, rss3, hwm, rss4] = f[..]
            else {
                panic!("copy child: {line}")
            };
            let per_user = |rss: u64| rss.saturating_sub(rss1) * 1024 / users.max(1);
            let (b1, b2, b3) = (per_user(rss2), per_user(rss3), per_user(rss4));
            let load = Duration::from_millis(took1);
            rows.push(Row {
                id: "10",
                scenario: format!(
                    "login copy: full load of {users} users + {tokens} tokens, fresh process"
                ),
                result: format!(
                    "load {} (slowest reload: {}; SQL read + decode only: {}); RSS {:.1} → {:.1} MiB = {b1} B/user; after a second reload {:.1} MiB = {b2} B/user, a third {:.1} MiB = {b3} B/user; peak after the first {:.1} MiB",
                    ms(load),
                    ms(Duration::from_millis(took2)),
                    ms(Duration::from_millis(fetch)),
                    rss1 as f64 / 1024.0,
                    rss2 as f64 / 1024.0,
                    rss3 as f64 / 1024.0,
                    rss4 as f64 / 1024.0,
                    hwm as f64 / 1024.0,
                ),
                p50: "—".into(),
                p99: "—".into(),
                ratio: format!("{:.0} users/s", users as f64 / load.as_secs_f64().max(1e-9)),
                goal: format!(
                    "1M < 10 s, ≤ 512 B/user (first load; after reloads): {}",
                    if load.as_secs_f64() * 1_000_000.0 / users.max(1) as f64 <= 10.0
                        && b1 <= 512
                    {
                        "met"
                    } else {
                        "**missed**"
                    }
                ),
            });
            notes.push(format!(
                "10 copy child at {users} users: VmRSS at exec {:.1} MiB; after reloads: {b2}, {b3} B/user ({})",
                rss0 as f64 / 1024.0,
                if b2.max(b3) <= 512 { "≤ 512" } else { "**over 512**: the old table's memory stays with the allocator" }
            ));
        }
    }

    print_table(&rows, &notes, k);
    pool.close().await;
}

fn base64_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

async fn system_client(pool: &PgPool, cipher: &SeedCipher, url: &str) -> async_nats::Client {
    let ids = ServiceIdentities::load(pool).await.unwrap();
    let kind = IdentityKind::SysUser;
    let key = Arc::new(ids.keypair(cipher, kind).unwrap());
    ConnectOptions::with_jwt(ids.jwt(kind).to_owned(), move |nonce| {
        let key = key.clone();
        async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
    })
    .connect(url)
    .await
    .expect("system user connects")
}
