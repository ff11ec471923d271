//! The hashing lane under a hostile tenant (issue 15, finding 2), with the service at its own
//! defaults (`serve`'s flag defaults: hash threads, work-factor bounds), so the same file run on
//! an older checkout measures the "before":
//!
//!   cargo bench --profile dev --bench lane              # ~1 min
//!   LOAD_QUICK=1 cargo bench --profile dev --bench lane # ~40 s
//!
//! (`--profile dev`: bcrypt, blowfish, argon2 and blake2 are optimised in that profile too, see
//! Cargo.toml, and nothing else here is CPU-bound; it saves a release build of every crate.)
//!
//! Environment: `NATS_PG_AUTH_TEST_DATABASE_URL` (admin URL of a Postgres) and `NATS_SERVER_BIN`,
//! as for the integration tests (the harness is theirs, `tests/it/common`).
//!
//! 1. **fairness**: tenant A's admin gives 24 users a bcrypt hash at the highest cost the
//!    service allows and floods wrong passwords for them over 24 parallel connections (lockout
//!    off: spread over enough users and addresses, it never triggers). Once the lane is
//!    saturated (a flood check has waited until the auth timeout), tenant B's users log in for
//!    the first time one after the other (bcrypt 10, not in the credential cache): how many get
//!    in, and the latency of each attempt (refusals included).
//! 2. **rss**: in a child process running only the harness and the service, a user whose stored
//!    argon2id hash asks for the most memory the service allows (t=1, p=1), and 6 parallel
//!    wrong-password logins for it, twice: the process's peak RSS (`VmHWM`) over its RSS before.

#[path = "../tests/it/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::ConnectOptions;
use nats_pg_auth::callout::credentials::HashLimits;
use nats_pg_auth::config::{Cli, Command, ServeArgs};

use common::{client_options, wait_until, EnvOptions, TestEnv};

/// `serve`'s own defaults for what this bench is about.
fn defaults() -> ServeArgs {
    use clap::Parser;
    match Cli::try_parse_from(["nats-pg-auth", "serve"])
        .expect("serve parses with no flags")
        .command
    {
        Command::Serve(a) => a,
        _ => unreachable!(),
    }
}

fn at_defaults(args: &mut ServeArgs) {
    let d = defaults();
    args.hash_threads = d.hash_threads;
    args.max_bcrypt_cost = d.max_bcrypt_cost;
    args.max_argon2_memory_kib = d.max_argon2_memory_kib;
    args.max_argon2_iterations = d.max_argon2_iterations;
    args.max_argon2_parallelism = d.max_argon2_parallelism;
    args.callout_concurrency = d.callout_concurrency;
    args.db_pool_size = d.db_pool_size;
    args.lockout_failures = 0;
}

fn quick() -> bool {
    std::env::var("LOAD_QUICK").is_ok_and(|v| v == "1")
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn tenant(env: &TestEnv, account: &str, prefix: &str, n: usize, cost: u32) {
    env.sql(&format!(
        "INSERT INTO nats.accounts (name, max_connections) VALUES ('{account}', 1000);
         WITH h AS (SELECT crypt('pw', gen_salt('bf', {cost})) AS hash)
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT a.id, '{prefix}' || i, h.hash
           FROM nats.accounts a, h, generate_series(0, {n} - 1) AS i WHERE a.name = '{account}'"
    ))
    .await;
    env.wait_synced(account).await;
}

async fn fairness() {
    const FLOODERS: usize = 24;
    let cold = if quick() { 20 } else { 40 };
    let d = defaults();
    let env = TestEnv::start_with(EnvOptions {
        tweak: at_defaults,
        ..Default::default()
    })
    .await;
    tenant(&env, "flooder", "a", FLOODERS, d.max_bcrypt_cost).await;
    tenant(&env, "bystander", "b", cold, 10).await;
    env.wait_login("a0", "pw", Duration::from_secs(10), "the flooder's users")
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..FLOODERS {
        let (stop, attempts, url) = (stop.clone(), attempts.clone(), env.url());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let opts = ConnectOptions::with_user_and_password(format!("a{i}"), "wrong".into());
                let _ = client_options(opts).connect(&url).await;
                attempts.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let metrics = env.metrics.clone();
    wait_until(
        Duration::from_secs(30),
        "the flood to saturate the lane",
        || {
            let metrics = metrics.clone();
            async move { metrics.denied("overloaded") >= 1 }
        },
    )
    .await;
    let hashes = env.callout.as_ref().unwrap().password_hashes_computed();
    let started = Instant::now();
    let mut ok = 0;
    let mut lat = Vec::new();
    for i in 0..cold {
        let t = Instant::now();
        if env.connect_user(&format!("b{i}"), "pw").await.is_ok() {
            ok += 1;
        }
        lat.push(t.elapsed());
    }
    let took = started.elapsed();
    let hashed = env.callout.as_ref().unwrap().password_hashes_computed() - hashes;
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        let _ = f.await;
    }
    lat.sort();
    println!(
        "fairness: hash threads {}, flood at bcrypt {} ({FLOODERS} connections, {} attempts): tenant B cold logins {ok}/{cold} ok, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({:.1} s, {hashed} hashes computed meanwhile)",
        d.hash_threads,
        d.max_bcrypt_cost,
        attempts.load(Ordering::Relaxed),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        took.as_secs_f64(),
    );
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// In the child: the largest hash allowed, 6 parallel wrong passwords, twice.
async fn rss_child() {
    let limits = HashLimits::default();
    let d = defaults();
    let env = TestEnv::start_with(EnvOptions {
        tweak: at_defaults,
        ..Default::default()
    })
    .await;
    // Any 32-byte digest: verifying computes argon2 with the string's parameters either way.
    let hash = format!(
        "$argon2id$v=19$m={},t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        limits.max_argon2_memory_kib
    );
    env.sql(&format!(
        "INSERT INTO nats.accounts (name) VALUES ('big');
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'big', '{hash}' FROM nats.accounts WHERE name = 'big';"
    ))
    .await;
    env.wait_synced("big").await;
    let before = status_kib("VmRSS:");
    let hashes = env.callout.as_ref().unwrap().password_hashes_computed();
    for _ in 0..2 {
        let mut logins = Vec::new();
        for _ in 0..6 {
            let url = env.url();
            logins.push(tokio::spawn(async move {
                let opts = ConnectOptions::with_user_and_password("big".into(), "wrong".into());
                let _ = client_options(opts).connect(&url).await;
            }));
        }
        for l in logins {
            let _ = l.await;
        }
    }
    let hashed = env.callout.as_ref().unwrap().password_hashes_computed() - hashes;
    let peak = status_kib("VmHWM:");
    println!(
        "rss: argon2id m={} KiB (the largest allowed), hash threads {}, 2 x 6 parallel wrong passwords ({hashed} hashed): RSS before {} MiB, peak {} MiB (+{} MiB)",
        limits.max_argon2_memory_kib,
        d.hash_threads,
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("LANE_CHILD").is_ok_and(|v| v == "rss") {
        runtime.block_on(rss_child());
        return;
    }
    runtime.block_on(fairness());
    // The peak RSS of a process that did nothing else.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("LANE_CHILD", "rss")
        .output()
        .expect("run the rss child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
}
