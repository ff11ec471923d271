//! Chaos on a real deployment (issue 7, "Prove it on a cluster"): three nats-servers on loopback
//! in one cluster (routes; each its own resolver directory and `init` fragment), a Postgres of the
//! test's own (the suite's shared one is never stopped), and two `serve` replicas as child
//! processes of the real binary, both with the sync on and the NATS URL listing all three
//! servers. A steady, bounded login loop (password and token users, spread over the three
//! servers) runs throughout while the steps kill and restart replicas, servers and Postgres.
//!
//! Every wait has a deadline; every step prints what the loop saw (logins attempted, refused,
//! unreachable: the server itself was down) and how long each recovery took. A step's expectations are collected rather than
//! panicking at once, so one run reports every step; the test fails at the end if any did not
//! hold. Which replica leads is read from Postgres and the kernel, not from the replicas' own
//! words: the backend holding the sync advisory lock names its client port
//! (`pg_locks` + `pg_stat_activity`), and the replica is the process owning that loopback
//! socket (`/proc/net/tcp` + `/proc/<pid>/fd`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, Event};
use base64::Engine;
use futures::StreamExt;
use nkeys::KeyPair;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::common::{
    client_options, is_auth_refusal, settle, wait_until, NatsCluster, NatsServer, PgProcess,
    ServiceProcess,
};

const SERVERS: usize = 3;
/// Login loop workers: at most this many logins are in flight at any moment.
const WORKERS: usize = 2;
/// Pause between two logins of one worker: about 20 logins/s in all, bounded.
const PACE: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug)]
enum Cred {
    Password(&'static str, &'static str),
    Token(&'static str, &'static str),
}

impl Cred {
    fn user(self) -> &'static str {
        match self {
            Cred::Password(u, _) | Cred::Token(u, _) => u,
        }
    }

    fn options(self) -> ConnectOptions {
        client_options(match self {
            Cred::Password(u, p) => ConnectOptions::with_user_and_password(u.into(), p.into()),
            Cred::Token(_, t) => ConnectOptions::with_token(t.into()),
        })
    }
}

// Users, with their accounts. The loop logs in as the first four.
const ALICE: Cred = Cred::Password("alice", "alice-pw"); // acme
const CAROL: Cred = Cred::Token("carol", "carol-token"); // acme, token only
const BOB: Cred = Cred::Password("bob", "bob-pw"); // globex
const DAVE: Cred = Cred::Token("dave", "dave-token"); // globex, token only
const BYSTANDER: Cred = Cred::Password("bystander", "bystander-pw"); // acme
const VICTIM: Cred = Cred::Password("victim", "victim-pw"); // acme, deactivated in step 4
const ERIN: Cred = Cred::Password("erin", "erin-pw"); // fresh1, inserted in step 1
const FRANK: Cred = Cred::Password("frank", "frank-pw"); // fresh2, inserted in step 2
const LOOP_CREDS: [Cred; 4] = [ALICE, CAROL, BOB, DAVE];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Refusal {
    Refused,
    Unreachable,
}

async fn login(url: &str, cred: Cred) -> Result<Client, (Refusal, String)> {
    match cred.options().connect(url).await {
        Ok(c) => Ok(c),
        Err(e) if is_auth_refusal(&e) => Err((Refusal::Refused, e.to_string())),
        Err(e) => Err((Refusal::Unreachable, e.to_string())),
    }
}

/// Logs `cred` in on every server (and out again); the first failure, described.
async fn login_everywhere(urls: &[String], cred: Cred) -> Result<(), String> {
    for (i, url) in urls.iter().enumerate() {
        login(url, cred)
            .await
            .map_err(|(kind, e)| format!("{} on server {i}: {kind:?} ({e})", cred.user()))?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The login loop
// ------------------------------------------------------------------------------------------

/// What the loop saw, per step; step 0 is the time between steps. A step begins only once the
/// logins started between steps have finished, and reports only once its own have, so each
/// login's whole flight lies in one period: a login in flight when a replica or server is
/// killed, and refused 2 s later, counts in the step that killed it.
#[derive(Default)]
struct Stats {
    step: AtomicU32,
    per_step: Mutex<BTreeMap<u32, Counts>>,
    /// Every refusal.
    refusals: Mutex<Vec<Refused>>,
    /// Users that logged in at least once.
    seen: Mutex<BTreeSet<&'static str>>,
}

struct Refused {
    step: u32,
    server: usize,
    started: Instant,
    /// When, where, who, what the client saw.
    text: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    attempts: u64,
    ok: u64,
    refused: u64,
    unreachable: u64,
    refused_at: [u64; SERVERS],
    in_flight: u64,
}

impl Stats {
    fn update(&self, step: u32, f: impl FnOnce(&mut Counts)) {
        f(self.per_step.lock().unwrap().entry(step).or_default());
    }

    fn of_step(&self, step: u32) -> Counts {
        self.per_step
            .lock()
            .unwrap()
            .get(&step)
            .copied()
            .unwrap_or_default()
    }

    /// Over all steps.
    fn total(&self) -> Counts {
        let mut t = Counts::default();
        for c in self.per_step.lock().unwrap().values() {
            t.attempts += c.attempts;
            t.ok += c.ok;
            t.refused += c.refused;
            t.unreachable += c.unreachable;
            t.in_flight += c.in_flight;
            for i in 0..SERVERS {
                t.refused_at[i] += c.refused_at[i];
            }
        }
        t
    }
}

/// `WORKERS` tasks logging in one after another, round robin over servers × `LOOP_CREDS`.
fn start_login_loop(
    urls: Vec<String>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    t0: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next = Arc::new(AtomicUsize::new(0));
    (0..WORKERS)
        .map(|_| {
            let (urls, stats, stop, next) =
                (urls.clone(), stats.clone(), stop.clone(), next.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let server = n % SERVERS;
                    let cred = LOOP_CREDS[(n / SERVERS) % LOOP_CREDS.len()];
                    let step = stats.step.load(Ordering::SeqCst);
                    let started = Instant::now();
                    stats.update(step, |c| {
                        c.attempts += 1;
                        c.in_flight += 1;
                    });
                    let outcome = login(&urls[server], cred).await;
                    if let Err((Refusal::Refused, e)) = &outcome {
                        stats.refusals.lock().unwrap().push(Refused {
                            step,
                            server,
                            started,
                            text: format!(
                                "started t+{:.1}s, refused t+{:.1}s: server {server} {}: {e}",
                                (started - t0).as_secs_f64(),
                                t0.elapsed().as_secs_f64(),
                                cred.user()
                            ),
                        });
                    }
                    if outcome.is_ok() {
                        stats.seen.lock().unwrap().insert(cred.user());
                    }
                    stats.update(step, |c| {
                        c.in_flight -= 1;
                        match &outcome {
                            Ok(_) => c.ok += 1,
                            Err((Refusal::Refused, _)) => {
                                c.refused += 1;
                                c.refused_at[server] += 1;
                            }
                            Err((Refusal::Unreachable, _)) => c.unreachable += 1,
                        }
                    });
                    drop(outcome);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(PACE) => {}
                    }
                }
            })
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Reporting
// ------------------------------------------------------------------------------------------

struct Step {
    n: u32,
    name: &'static str,
    start: Instant,
    recoveries: Vec<String>,
}

impl Step {
    async fn begin(n: u32, name: &'static str, stats: &Stats) -> Step {
        println!("\n=== step {n}: {name}");
        stats.step.store(n, Ordering::SeqCst);
        wait_until(
            Duration::from_secs(15),
            "the logins in flight between steps to finish",
            || async move { stats.of_step(0).in_flight == 0 },
        )
        .await;
        Step {
            n,
            name,
            start: Instant::now(),
            recoveries: Vec::new(),
        }
    }

    fn recovered(&mut self, what: &str, took: Duration) {
        println!("    {what}: {:.2}s", took.as_secs_f64());
        self.recoveries
            .push(format!("{what} {:.2}s", took.as_secs_f64()));
    }

    /// Ends the step: later logins count as "between steps"; waits (bounded) for the step's
    /// logins still in flight, then reports.
    async fn end(self, stats: &Stats) -> Counts {
        let took = self.start.elapsed();
        stats.step.store(0, Ordering::SeqCst);
        let n = self.n;
        wait_until(
            Duration::from_secs(15),
            "the step's logins in flight to finish",
            || async move { stats.of_step(n).in_flight == 0 },
        )
        .await;
        let c = stats.of_step(n);
        println!(
            "--- step {} ({}) took {:.1}s: logins attempted {}, ok {}, refused {} (per server {:?}), unreachable {}",
            self.n,
            self.name,
            took.as_secs_f64(),
            c.attempts,
            c.ok,
            c.refused,
            c.refused_at,
            c.unreachable
        );
        if !self.recoveries.is_empty() {
            println!("    recoveries: {}", self.recoveries.join("; "));
        }
        print_refusals(stats, n);
        c
    }
}

fn print_refusals(stats: &Stats, step: u32) {
    let refusals = stats.refusals.lock().unwrap();
    let mine: Vec<&String> = refusals
        .iter()
        .filter(|r| r.step == step)
        .map(|r| &r.text)
        .collect();
    for r in mine.iter().take(20) {
        println!("    refused: {r}");
    }
    if mine.len() > 20 {
        println!("    ... and {} more refusals", mine.len() - 20);
    }
}

/// Expectations of the steps: a failed one is printed at once and fails the test at the end.
#[derive(Default)]
struct Verdict {
    failures: Vec<String>,
}

impl Verdict {
    fn check(&mut self, step: u32, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            println!("    FAILED: {what}");
            self.failures.push(format!("step {step}: {what}"));
        }
    }
}

/// Polls `cond` until it holds (Some(time it took)) or `deadline` passed (None).
async fn wait_for<F, Fut>(deadline: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits for the first `Disconnected` event; the time it took, or None after `deadline`.
async fn wait_disconnected(
    events: &mut mpsc::UnboundedReceiver<Event>,
    deadline: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    tokio::time::timeout(deadline, async {
        while let Some(e) = events.recv().await {
            if matches!(e, Event::Disconnected) {
                return;
            }
        }
        std::future::pending::<()>().await
    })
    .await
    .ok()
    .map(|_| start.elapsed())
}

fn disconnected_since(events: &mut mpsc::UnboundedReceiver<Event>) -> bool {
    let mut seen = false;
    while let Ok(e) = events.try_recv() {
        seen |= matches!(e, Event::Disconnected);
    }
    seen
}

/// Connects with `cred` to the first of `urls` (the order is kept, so later ones are only for
/// reconnecting) and returns the client with its events.
async fn connect_watching(urls: &[String], cred: Cred) -> (Client, mpsc::UnboundedReceiver<Event>) {
    connect_watching_with(urls, cred, |o| o).await
}

/// `connect_watching` with more options.
async fn connect_watching_with(
    urls: &[String],
    cred: Cred,
    tweak: impl FnOnce(ConnectOptions) -> ConnectOptions,
) -> (Client, mpsc::UnboundedReceiver<Event>) {
    let (opts, rx) = crate::common::with_events(tweak(cred.options()).retain_servers_order());
    let client = opts
        .connect(urls.to_vec())
        .await
        .unwrap_or_else(|e| panic!("{} connects to {}: {e}", cred.user(), urls[0]));
    (client, rx)
}

// ------------------------------------------------------------------------------------------
// Who leads, what the servers hold
// ------------------------------------------------------------------------------------------

/// The replica whose Postgres connection holds the sync advisory lock, if any.
async fn leader(pool: &PgPool, pg_port: u16, replicas: &[ServiceProcess]) -> Option<usize> {
    let key = nats_pg_auth::sync::leader::SYNC_LOCK_KEY;
    let port: i32 = sqlx::query_scalar(
        "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.classid::bigint = $1 AND l.objid::bigint = $2",
    )
    .bind(key >> 32)
    .bind(key & 0xffff_ffff)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()?;
    let inode = socket_inode(u16::try_from(port).ok()?, pg_port)?;
    let link = format!("socket:[{inode}]");
    replicas.iter().position(|r| {
        r.pid().is_some_and(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|fds| {
                    fds.flatten().any(|fd| {
                        std::fs::read_link(fd.path())
                            .is_ok_and(|target| target.to_string_lossy() == link)
                    })
                })
                .unwrap_or(false)
        })
    })
}

/// Inode of the IPv4 socket from local port `local` to remote port `remote`.
fn socket_inode(local: u16, remote: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && port(f[1]) == Some(local) && port(f[2]) == Some(remote))
            .then(|| f[9].to_owned())
    })
}

/// The `nats` claims of the account JWT in a server's resolver directory.
fn account_on(server: &NatsServer, public_key: &str) -> Option<serde_json::Value> {
    let jwt =
        std::fs::read_to_string(server.resolver_dir.join(format!("{public_key}.jwt"))).ok()?;
    let payload = jwt.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(claims["nats"].clone())
}

/// The system user's credentials, to ask servers things.
#[derive(Clone)]
struct SysCreds {
    jwt: String,
    key: Arc<KeyPair>,
}

impl SysCreds {
    async fn connect(&self, url: &str) -> Option<Client> {
        let key = self.key.clone();
        ConnectOptions::with_jwt(self.jwt.clone(), move |nonce| {
            let key = key.clone();
            async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
        })
        .connection_timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .ok()
    }

    /// How many cluster members answer `$SYS.REQ.SERVER.PING` sent through the server at `url`
    /// (a member answers only over a route to that server).
    async fn members_seen_from(&self, url: &str) -> usize {
        let Some(client) = self.connect(url).await else {
            return 0;
        };
        let inbox = client.new_inbox();
        let Ok(mut replies) = client.subscribe(inbox.clone()).await else {
            return 0;
        };
        if client
            .publish_with_reply("$SYS.REQ.SERVER.PING", inbox, "".into())
            .await
            .is_err()
        {
            return 0;
        }
        let mut ids = BTreeSet::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(m) = replies.next().await {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                if let Some(id) = v["server"]["id"].as_str() {
                    ids.insert(id.to_owned());
                }
                if ids.len() >= SERVERS {
                    break;
                }
            }
        })
        .await;
        ids.len()
    }

    async fn cluster_formed(&self, urls: &[String]) -> bool {
        for url in urls {
            if self.members_seen_from(url).await < SERVERS {
                return false;
            }
        }
        true
    }
}

async fn sql(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"));
}

async fn account_key(pool: &PgPool, account: &str) -> String {
    sqlx::query_scalar("SELECT public_key FROM nats.accounts WHERE name = $1")
        .bind(account)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn add_password_user(pool: &PgPool, account: &str, cred: Cred) {
    let Cred::Password(user, pass) = cred else {
        unreachable!()
    };
    sql(
        pool,
        &format!(
            "INSERT INTO nats.users (account_id, username, password_hash)
               SELECT id, '{user}', crypt('{pass}', gen_salt('bf', 4)) FROM nats.accounts WHERE name = '{account}'"
        ),
    )
    .await;
}

async fn add_token_user(pool: &PgPool, account: &str, cred: Cred) {
    let Cred::Token(user, token) = cred else {
        unreachable!()
    };
    sql(
        pool,
        &format!(
            "INSERT INTO nats.users (account_id, username) SELECT id, '{user}' FROM nats.accounts WHERE name = '{account}';
             INSERT INTO nats.user_tokens (user_id, token_sha256)
               SELECT id, digest('{token}', 'sha256') FROM nats.users WHERE username = '{user}'"
        ),
    )
    .await;
}

/// Runs a `nats-pg-auth` verb to completion.
fn run_cli(database_url: &str, args: &[std::ffi::OsString]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nats-pg-auth"))
        .args(args)
        .env("DATABASE_URL", database_url)
        // Seeds are written plain: the test reads the system user's seed itself (before the
        // replicas start, which would encrypt them if the environment gives them a key).
        .env_remove("NATS_PG_AUTH_ENCRYPTION_KEY")
        .env_remove("NATS_PG_AUTH_ENCRYPTION_KEY_FILE")
        .output()
        .expect("run nats-pg-auth");
    assert!(
        out.status.success(),
        "nats-pg-auth {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn all_ready(replicas: &[ServiceProcess]) -> bool {
    for r in replicas {
        if r.readyz().await.is_err() {
            return false;
        }
    }
    true
}

/// Ready and reading Postgres again: `/readyz` answers 200 and its body does not report
/// outage mode or a copy still catching up.
async fn all_live(replicas: &[ServiceProcess]) -> bool {
    for r in replicas {
        match r.readyz().await {
            Ok(body) if !body.contains("outage") && !body.contains("catching up") => {}
            _ => return false,
        }
    }
    true
}

// ------------------------------------------------------------------------------------------
// The test
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cluster_keeps_logins_going_through_replica_server_and_postgres_loss() {
    let t0 = Instant::now();
    let mut verdict = Verdict::default();

    // --- Postgres of our own, the schema and the service identities.
    let pg = PgProcess::start().await;
    {
        let admin = PgPool::connect(&pg.url("postgres")).await.unwrap();
        sql(&admin, "CREATE DATABASE chaos").await;
        admin.close().await;
    }
    let database_url = pg.url("chaos");
    let dir = tempfile::tempdir().unwrap();

    // --- Three nats-servers in one cluster, each with the fragment `init` / `export-config`
    // writes for its own resolver directory.
    let mut cluster = NatsCluster::start(dir.path(), SERVERS, |i, resolver_dir, out| {
        let mut args: Vec<std::ffi::OsString> = if i == 0 {
            vec!["init".into(), "--operator-name".into(), "chaos".into()]
        } else {
            vec!["export-config".into()]
        };
        args.extend([
            "--resolver-dir".into(),
            resolver_dir.into(),
            "--out".into(),
            out.into(),
        ]);
        run_cli(&database_url, &args);
    })
    .await;
    let urls: Vec<String> = cluster.servers.iter().map(NatsServer::url).collect();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&database_url)
        .await
        .unwrap();
    let sys = {
        let ids = nats_pg_auth::init::ServiceIdentities::load(&pool)
            .await
            .unwrap();
        let kind = nats_pg_auth::db::identities::IdentityKind::SysUser;
        let cipher = nats_pg_auth::keys::SeedCipher::new(None);
        SysCreds {
            jwt: ids.jwt(kind).to_owned(),
            key: Arc::new(ids.keypair(&cipher, kind).unwrap()),
        }
    };
    wait_until(
        Duration::from_secs(20),
        "the cluster to form (routes)",
        || {
            let (sys, urls) = (sys.clone(), urls.clone());
            async move { sys.cluster_formed(&urls).await }
        },
    )
    .await;

    // --- Two replicas, both allowed to lead.
    let replica_args = ["--sync", "true", "--reconcile-interval", "5s"];
    let mut replicas: Vec<ServiceProcess> = (0..2)
        .map(|i| {
            ServiceProcess::start(
                &format!("replica{i}"),
                dir.path(),
                &database_url,
                &cluster.urls(),
                &replica_args,
            )
        })
        .collect();
    wait_until(Duration::from_secs(30), "both replicas ready", || {
        all_ready(&replicas)
    })
    .await;

    // --- Tenants.
    sql(
        &pool,
        "INSERT INTO nats.accounts (name) VALUES ('acme'), ('globex')",
    )
    .await;
    add_password_user(&pool, "acme", ALICE).await;
    add_token_user(&pool, "acme", CAROL).await;
    add_password_user(&pool, "acme", BYSTANDER).await;
    add_password_user(&pool, "acme", VICTIM).await;
    add_password_user(&pool, "globex", BOB).await;
    add_token_user(&pool, "globex", DAVE).await;
    wait_until(
        Duration::from_secs(20),
        "the tenants on every server",
        || {
            let urls = urls.clone();
            async move {
                for cred in LOOP_CREDS {
                    if login_everywhere(&urls, cred).await.is_err() {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    println!(
        "setup: Postgres :{}, nats {:?}, replicas {:?}, {:.1}s",
        pg.port,
        urls,
        replicas.iter().map(|r| r.http).collect::<Vec<_>>(),
        t0.elapsed().as_secs_f64()
    );

    let stats = Arc::new(Stats::default());
    let stop_loop = CancellationToken::new();
    let workers = start_login_loop(urls.clone(), stats.clone(), stop_loop.clone(), t0);

    // =====================================================================================
    // 1. Password and token logins on every server; an account inserted by SQL is usable on
    //    every server within 2 s.
    // =====================================================================================
    let mut step = Step::begin(
        1,
        "password and token logins on every server; a new account everywhere within 2 s",
        &stats,
    )
    .await;
    for cred in LOOP_CREDS {
        let r = login_everywhere(&urls, cred).await;
        verdict.check(1, r.is_ok(), format!("login: {r:?}"));
    }
    let inserted = Instant::now();
    sql(&pool, "INSERT INTO nats.accounts (name) VALUES ('fresh1')").await;
    add_password_user(&pool, "fresh1", ERIN).await;
    let took = wait_for(Duration::from_secs(10), || {
        let urls = urls.clone();
        async move { login_everywhere(&urls, ERIN).await.is_ok() }
    })
    .await;
    match took {
        Some(_) => {
            let took = inserted.elapsed();
            step.recovered("new account fresh1 usable on every server", took);
            verdict.check(
                1,
                took <= Duration::from_secs(2),
                format!("fresh1 took {took:?} to be usable everywhere (limit 2 s)"),
            );
        }
        None => verdict.check(1, false, "fresh1 not usable on every server within 10 s"),
    }
    let c = step.end(&stats).await;
    verdict.check(
        1,
        c.refused == 0,
        format!("{} loop logins refused", c.refused),
    );

    // =====================================================================================
    // 2. SIGKILL the leading replica: at most the in-flight logins fail, the other replica
    //    leads within 5 s, an account inserted after the kill is on every server.
    // =====================================================================================
    let mut step = Step::begin(2, "SIGKILL the leading replica", &stats).await;
    let killed = {
        let start = Instant::now();
        loop {
            if let Some(i) = leader(&pool, pg.port, &replicas).await {
                break i;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "no replica leads"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    let other = 1 - killed;
    println!(
        "    leader: {} (pid {:?})",
        replicas[killed].name,
        replicas[killed].pid()
    );
    let kill_at = Instant::now();
    replicas[killed].kill();
    let took = wait_for(Duration::from_secs(15), || {
        let (pool, replicas) = (&pool, &replicas);
        async move { leader(pool, pg.port, replicas).await == Some(other) }
    })
    .await;
    match took {
        Some(took) => {
            step.recovered(&format!("{} leads", replicas[other].name), took);
            verdict.check(
                2,
                took <= Duration::from_secs(5),
                format!("the other replica led after {took:?} (limit 5 s)"),
            );
        }
        None => verdict.check(2, false, "the other replica did not lead within 15 s"),
    }
    let inserted = Instant::now();
    sql(&pool, "INSERT INTO nats.accounts (name) VALUES ('fresh2')").await;
    add_password_user(&pool, "fresh2", FRANK).await;
    let took = wait_for(Duration::from_secs(15), || {
        let urls = urls.clone();
        async move { login_everywhere(&urls, FRANK).await.is_ok() }
    })
    .await;
    match took {
        Some(_) => step.recovered(
            "account inserted after the kill usable on every server",
            inserted.elapsed(),
        ),
        None => verdict.check(
            2,
            false,
            "fresh2 (inserted after the kill) not on every server within 15 s",
        ),
    }
    replicas[killed].restart();
    match wait_for(Duration::from_secs(30), || {
        let r = &replicas[killed];
        async move { r.readyz().await.is_ok() }
    })
    .await
    {
        Some(_) => step.recovered("killed replica restarted and ready", kill_at.elapsed()),
        None => verdict.check(2, false, "the restarted replica is not ready within 30 s"),
    }
    let c = step.end(&stats).await;
    verdict.check(
        2,
        c.refused <= WORKERS as u64,
        format!(
            "{} loop logins refused; at most the {WORKERS} in flight may fail",
            c.refused
        ),
    );
    verdict.check(
        2,
        c.unreachable == 0,
        format!("{} loop logins unreachable", c.unreachable),
    );

    // =====================================================================================
    // 3. SIGKILL a nats-server and restart it with an emptied resolver directory: its clients
    //    reconnect to the others, logins go on, after the restart its tenants log in there.
    // =====================================================================================
    let victim_server = 1;
    let order: Vec<String> = [1, 0, 2].iter().map(|&i| urls[i].clone()).collect();
    let (watcher, mut watcher_events) = connect_watching(&order, ALICE).await;
    assert_eq!(
        watcher.server_info().port,
        cluster.servers[victim_server].port
    );
    settle(&watcher).await;
    let mut step = Step::begin(
        3,
        "SIGKILL nats-server 1, restart it with an emptied resolver dir",
        &stats,
    )
    .await;
    let killed_port = cluster.servers[victim_server].port;
    let kill_at = Instant::now();
    cluster.servers[victim_server].stop();
    let reconnected = wait_for(Duration::from_secs(15), || {
        let watcher = &watcher;
        async move {
            watcher.connection_state() == async_nats::connection::State::Connected
                && watcher.server_info().port != killed_port
        }
    })
    .await;
    match reconnected {
        Some(took) => {
            step.recovered("its client reconnected to another server", took);
            verdict.check(
                3,
                disconnected_since(&mut watcher_events),
                "the watcher saw no disconnect",
            );
            settle(&watcher).await;
        }
        None => verdict.check(
            3,
            false,
            "the client of the killed server did not reconnect to another within 15 s",
        ),
    }
    let ok_before = stats.total().ok;
    let going_on = wait_for(Duration::from_secs(10), || {
        let stats = &stats;
        async move { stats.total().ok >= ok_before + 8 }
    })
    .await;
    verdict.check(
        3,
        going_on.is_some(),
        "the login loop made no progress with a server down",
    );
    let down_for = kill_at.elapsed();
    let restarted_at = Instant::now();
    cluster.servers[victim_server].restart(true).await;
    println!(
        "    server 1 down for {:.2}s, restarted with an empty resolver dir",
        down_for.as_secs_f64()
    );
    let mut tenants_back = true;
    for cred in [ALICE, CAROL, BOB, DAVE, ERIN, FRANK] {
        let url = urls[victim_server].clone();
        match wait_for(Duration::from_secs(15), || {
            let url = url.clone();
            async move { login(&url, cred).await.is_ok() }
        })
        .await
        {
            Some(_) => step.recovered(
                &format!("{} logs in on the restarted server", cred.user()),
                restarted_at.elapsed(),
            ),
            None => {
                tenants_back = false;
                verdict.check(
                    3,
                    false,
                    format!(
                        "{} cannot log in on the restarted server within 15 s",
                        cred.user()
                    ),
                );
            }
        }
    }
    let tenants_back_at = Instant::now();
    match wait_for(Duration::from_secs(20), || {
        let (sys, urls) = (&sys, &urls);
        async move { sys.cluster_formed(urls).await }
    })
    .await
    {
        Some(_) => step.recovered("cluster routes back", restarted_at.elapsed()),
        None => verdict.check(
            3,
            false,
            "the restarted server did not rejoin the cluster within 20 s",
        ),
    }
    // Replicas whose NATS connections were on the killed server are connected elsewhere.
    match wait_for(Duration::from_secs(10), || all_ready(&replicas)).await {
        Some(_) => step.recovered("both replicas ready", kill_at.elapsed()),
        None => verdict.check(
            3,
            false,
            "the replicas are not ready 10 s after the restart",
        ),
    }
    drop(watcher);
    let c = step.end(&stats).await;
    let elsewhere: u64 = (0..SERVERS)
        .filter(|&i| i != victim_server)
        .map(|i| c.refused_at[i])
        .sum();
    // A login whose callout request was on its way through the killed server (to a replica
    // connected there) is lost with it: the in-flight ones may fail, as in step 2.
    verdict.check(
        3,
        elsewhere <= WORKERS as u64,
        format!(
            "{elsewhere} loop logins refused on the servers that stayed up; at most the {WORKERS} in flight may fail"
        ),
    );
    // Right after its start (a few ms), before the routes carry the callout replicas' interest
    // to it, the restarted server refuses logins by itself: allowed until its tenants are back.
    let after_back = stats
        .refusals
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.step == 3 && r.server == victim_server && r.started >= tenants_back_at)
        .count();
    if tenants_back {
        verdict.check(
            3,
            after_back == 0,
            format!("{after_back} loop logins refused on the restarted server after its tenants were back"),
        );
    }

    // =====================================================================================
    // 4. Deactivate a user connected to the third server: that connection closes within 2 s,
    //    the others stay.
    // =====================================================================================
    let third = 2;
    // Its reconnects are refused from now on: a few are enough (a dropped async-nats client
    // that is reconnecting keeps trying).
    let (victim, mut victim_events) =
        connect_watching_with(&urls[third..=third], VICTIM, |o| o.max_reconnects(3)).await;
    let (near, mut near_events) = connect_watching(&urls[third..=third], BYSTANDER).await;
    let (far, mut far_events) = connect_watching(&urls[0..=0], BYSTANDER).await;
    for c in [&victim, &near, &far] {
        settle(c).await;
    }
    let mut step = Step::begin(4, "deactivate a user connected to server 2", &stats).await;
    sql(
        &pool,
        "UPDATE nats.users SET active = false WHERE username = 'victim'",
    )
    .await;
    match wait_disconnected(&mut victim_events, Duration::from_secs(10)).await {
        Some(took) => {
            step.recovered("the deactivated user's connection closed", took);
            verdict.check(
                4,
                took <= Duration::from_secs(2),
                format!("closed after {took:?} (limit 2 s)"),
            );
        }
        None => verdict.check(
            4,
            false,
            "the deactivated user's connection still open after 10 s",
        ),
    }
    for (name, client, events) in [
        ("on server 2", &near, &mut near_events),
        ("on server 0", &far, &mut far_events),
    ] {
        settle(client).await;
        verdict.check(
            4,
            !disconnected_since(events),
            format!("the bystander {name} was disconnected"),
        );
    }
    let refused = login(&urls[third], VICTIM).await.err().map(|(k, _)| k);
    verdict.check(
        4,
        refused == Some(Refusal::Refused),
        format!("the deactivated user logs in again: {refused:?}"),
    );
    drop(victim);
    let c = step.end(&stats).await;
    verdict.check(
        4,
        c.refused == 0,
        format!("{} loop logins refused", c.refused),
    );

    // =====================================================================================
    // 5. Stop Postgres for 20 s and restart a nats-server during it: every user seen before the
    //    outage gets back in, an unknown user and a wrong password are refused; after Postgres
    //    returns, a change made just before the outage is on the server.
    // =====================================================================================
    let mut seen: BTreeSet<&'static str> = stats.seen.lock().unwrap().clone();
    seen.extend(["bystander", "erin", "frank"]);
    let creds: BTreeMap<&str, Cred> = [ALICE, CAROL, BOB, DAVE, BYSTANDER, ERIN, FRANK]
        .into_iter()
        .map(|c| (c.user(), c))
        .collect();
    let restarted = 0;
    let order: Vec<String> = [0, 2, 1].iter().map(|&i| urls[i].clone()).collect();
    let (watcher, mut watcher_events) = connect_watching(&order, BOB).await;
    settle(&watcher).await;
    let globex = account_key(&pool, "globex").await;
    // The change is to globex, the account of two loop users (bob, dave): a change made just
    // before the outage must be pushed once Postgres is back, and must not lock the account's
    // users out of the copy meanwhile.
    let mut step = Step::begin(
        5,
        "stop Postgres for 20 s, restart nats-server 0 during it",
        &stats,
    )
    .await;
    sql(
        &pool,
        "UPDATE nats.accounts SET max_connections = 4242 WHERE name = 'globex'",
    )
    .await;
    pg.stop().await;
    let down_at = Instant::now();
    println!("    Postgres stopped; users seen before: {seen:?}");
    cluster.servers[restarted].restart(false).await;
    // Checked concurrently, each with a deadline, so the outage stays close to its 20 s even
    // when the checks fail (a login refused without Postgres costs seconds today).
    let deadline = Duration::from_secs(10);
    let watcher_back = async {
        let start = Instant::now();
        let saw_disconnect = wait_disconnected(&mut watcher_events, Duration::from_secs(5))
            .await
            .is_some();
        let back = wait_for(deadline, || {
            let watcher = &watcher;
            async move { watcher.connection_state() == async_nats::connection::State::Connected }
        })
        .await
        .map(|_| start.elapsed());
        (saw_disconnect, back)
    };
    let seen_back = futures::future::join_all(seen.iter().map(|&user| {
        let (cred, urls) = (creds[user], &urls);
        async move {
            let start = Instant::now();
            loop {
                match login_everywhere(urls, cred).await {
                    Ok(()) => return (user, Ok(start.elapsed())),
                    Err(why) if start.elapsed() >= deadline => return (user, Err(why)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
                }
            }
        }
    }));
    let bad = [
        ("an unknown user", Cred::Password("nobody", "nobody-pw")),
        (
            "a wrong password",
            Cred::Password("bystander", "not-the-password"),
        ),
    ];
    let refused = futures::future::join_all(bad.iter().flat_map(|&(what, cred)| {
        urls.iter().enumerate().map(move |(i, url)| async move {
            (what, i, login(url, cred).await.err().map(|(k, _)| k))
        })
    }));
    // The refusals are checked once everyone is back everywhere: right after its restart a
    // server may not have the callout's interest yet (routes), and a login it times out is not
    // the refusal this step is about.
    let ((saw_disconnect, back), seen_back) = tokio::join!(watcher_back, seen_back);
    let refused = refused.await;
    verdict.check(
        5,
        saw_disconnect,
        "the client of the restarted server saw no disconnect",
    );
    match back {
        Some(took) => step.recovered("the restarted server's client is back", took),
        None => verdict.check(
            5,
            false,
            format!("the restarted server's client did not get back in within {deadline:?}"),
        ),
    }
    let mut slowest = Some(Duration::ZERO);
    for (user, r) in seen_back {
        match r {
            Ok(took) => slowest = slowest.map(|s| s.max(took)),
            Err(why) => {
                slowest = None;
                verdict.check(
                    5,
                    false,
                    format!("{user} cannot log in everywhere without Postgres: {why}"),
                );
            }
        }
    }
    if let Some(slowest) = slowest {
        step.recovered(
            "every user seen before the outage in on every server (slowest)",
            slowest,
        );
    }
    for (what, i, r) in refused {
        verdict.check(
            5,
            r == Some(Refusal::Refused),
            format!("{what} on server {i}: {r:?}, not refused"),
        );
    }
    for r in replicas.iter_mut() {
        let running = r.running();
        let status = r.try_exit();
        verdict.check(
            5,
            running,
            format!("{} exited while Postgres was down: {status:?}", r.name),
        );
    }
    for r in &replicas {
        println!(
            "    {} /readyz during the outage: {:?}",
            r.name,
            r.readyz().await
        );
    }
    // Hold the outage for its 20 s (a duration the scenario asks for, not a wait for a state).
    tokio::time::sleep_until((down_at + Duration::from_secs(20)).into()).await;
    pg.start_again().await;
    let up_at = Instant::now();
    println!(
        "    Postgres back after {:.1}s",
        down_at.elapsed().as_secs_f64()
    );
    for r in replicas.iter_mut() {
        if !r.running() {
            println!("    restarting {} (it exited)", r.name);
            r.restart();
        }
    }
    let servers = &cluster.servers;
    match wait_for(Duration::from_secs(30), || {
        let globex = &globex;
        async move {
            servers
                .iter()
                .all(|s| account_on(s, globex).is_some_and(|a| a["limits"]["conn"] == 4242))
        }
    })
    .await
    {
        Some(took) => step.recovered("the change made before the outage on every server", took),
        None => verdict.check(
            5,
            false,
            format!(
                "globex max_connections 4242 not on every server 30 s after Postgres returned: {:?}",
                servers.iter().map(|s| account_on(s, &globex).map(|a| a["limits"]["conn"].clone())).collect::<Vec<_>>()
            ),
        ),
    }
    // Ready is not enough: a replica answering from its copy is ready too (`mode: outage`).
    match wait_for(Duration::from_secs(30), || all_live(&replicas)).await {
        Some(_) => step.recovered(
            "both replicas out of outage mode after Postgres returned",
            up_at.elapsed(),
        ),
        None => verdict.check(
            5,
            false,
            "the replicas are not back to normal (ready, not in outage mode) 30 s after Postgres returned",
        ),
    }
    match wait_for(Duration::from_secs(15), || {
        let (pool, replicas) = (&pool, &replicas);
        async move { leader(pool, pg.port, replicas).await.is_some() }
    })
    .await
    {
        Some(_) => step.recovered("a replica leads after Postgres returned", up_at.elapsed()),
        None => verdict.check(5, false, "no replica leads 15 s after Postgres returned"),
    }
    drop(watcher);
    let c = step.end(&stats).await;
    // A nats-server is killed in this step: a login whose request was on its way through it is
    // lost (the client sees the auth timeout), as in step 3. Postgres being down refuses none.
    verdict.check(
        5,
        c.refused <= WORKERS as u64,
        format!(
            "{} loop logins refused; at most the {WORKERS} in flight through the restarted server may fail",
            c.refused
        ),
    );

    // =====================================================================================
    // 6. SIGTERM a replica mid-loop: exit code 0, no login refused.
    // =====================================================================================
    let mut step = Step::begin(6, "SIGTERM a replica mid-loop", &stats).await;
    // The leader, so its leadership must be handed over too.
    let lead = leader(&pool, pg.port, &replicas).await;
    let target = lead.unwrap_or(0);
    println!(
        "    terminating {} (the leader: {})",
        replicas[target].name,
        lead == Some(target)
    );
    let term_at = Instant::now();
    replicas[target].signal(rustix::process::Signal::TERM);
    let status = replicas[target].wait_exit(Duration::from_secs(30)).await;
    step.recovered(
        &format!("{} exited ({status})", replicas[target].name),
        term_at.elapsed(),
    );
    verdict.check(
        6,
        status.code() == Some(0),
        format!("exit status {status}, not 0"),
    );
    let attempts = stats.total().attempts;
    wait_until(
        Duration::from_secs(20),
        "the loop to go on after the exit",
        || {
            let stats = &stats;
            async move { stats.total().attempts >= attempts + 4 * SERVERS as u64 }
        },
    )
    .await;
    match wait_for(Duration::from_secs(15), || {
        let (pool, replicas) = (&pool, &replicas);
        async move { leader(pool, pg.port, replicas).await == Some(1 - target) }
    })
    .await
    {
        Some(_) => step.recovered(
            &format!("{} leads", replicas[1 - target].name),
            term_at.elapsed(),
        ),
        None => verdict.check(6, false, "the remaining replica does not lead"),
    }
    let c = step.end(&stats).await;
    verdict.check(
        6,
        c.refused == 0,
        format!("{} loop logins refused", c.refused),
    );

    // =====================================================================================
    stop_loop.cancel();
    for w in workers {
        let _ = w.await;
    }
    let between = stats.of_step(0);
    println!(
        "\nbetween steps: logins attempted {}, ok {}, refused {}, unreachable {}",
        between.attempts, between.ok, between.refused, between.unreachable
    );
    print_refusals(&stats, 0);
    verdict.check(
        0,
        between.refused == 0,
        format!("{} loop logins refused between steps", between.refused),
    );
    let total = stats.total();
    println!(
        "\nchaos: {:.1}s in all; loop: {} logins, {} ok, {} refused, {} unreachable",
        t0.elapsed().as_secs_f64(),
        total.attempts,
        total.ok,
        total.refused,
        total.unreachable
    );
    if !verdict.failures.is_empty() {
        println!(
            "\nlogs kept in {} (nats<i>/nats.log, replica<i>.log)",
            dir.keep().display()
        );
        for r in &replicas {
            let log = r.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            println!("\n--- last lines of {}.log:", r.name);
            for line in tail.iter().rev() {
                println!("{line}");
            }
        }
    }
    assert!(
        verdict.failures.is_empty(),
        "chaos expectations not met:\n  {}",
        verdict.failures.join("\n  ")
    );
    assert!(
        t0.elapsed() < Duration::from_secs(240),
        "the chaos test must stay well under 5 minutes"
    );
}
