//! The at-rest key and its rotation, as an operator sees them (issue 10 bug 2, issue 18 item 6):
//! `rotate-encryption-key` while replicas serve leaves no seed under the old key (a replica
//! still on it stops sealing, and says why on /readyz and in its log), so the next start with
//! only the new key works; a start that cannot open some seeds counts them per key id and
//! prints the command that fixes it; `serve` without a key says the seeds are plain text.

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use nats_pg_auth::keys::{key_id, SeedCipher};

use crate::common::{wait_until, EnvOptions, ServiceProcess, TestEnv};

const K1: [u8; 32] = [1; 32];
const K2: [u8; 32] = [2; 32];

fn b64(k: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// How many stored seeds the cipher cannot open.
async fn unopenable(env: &TestEnv, cipher: &SeedCipher) -> usize {
    let mut rows: Vec<(String, String)> =
        sqlx::query_as("SELECT public_key, seed FROM nats.service_identities")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    rows.extend(
        sqlx::query_as::<_, (String, String)>("SELECT public_key, seed FROM nats.account_keys")
            .fetch_all(&env.pool)
            .await
            .unwrap(),
    );
    assert!(rows.iter().all(|(_, s)| s.starts_with("enc:")));
    rows.iter()
        .filter(|(pk, seed)| cipher.open(seed, pk).is_err())
        .count()
}

/// Runs `rotate-encryption-key` with these variables (and no other key variable):
/// (exit code, stderr).
fn rotate_cli(env: &TestEnv, vars: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nats-pg-auth"))
        .arg("rotate-encryption-key")
        .args(args)
        .env("DATABASE_URL", &env.database_url)
        .env_remove("NATS_PG_AUTH_ENCRYPTION_KEY")
        .env_remove("NATS_PG_AUTH_OLD_ENCRYPTION_KEY")
        .env_remove("NATS_PG_AUTH_NEW_ENCRYPTION_KEY")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A database under K1 with acme synced, and no service running.
async fn env_under_k1() -> TestEnv {
    let mut env = TestEnv::start_with(EnvOptions {
        encryption_key: Some(K1),
        ..Default::default()
    })
    .await;
    env.acme().await;
    env.stop_service().await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_while_a_replica_serves_leaves_no_seed_under_the_old_key() {
    let (old, new) = (b64(&K1), b64(&K2));
    let env = env_under_k1().await;
    let only_new = SeedCipher::new(Some(K2));
    let stale = ServiceProcess::for_env_with(
        &env,
        "old-key",
        &[("NATS_PG_AUTH_ENCRYPTION_KEY", old.as_str())],
    );
    stale.wait_ready(Duration::from_secs(20)).await;
    wait_until(
        Duration::from_secs(10),
        "the old-key replica to lead",
        || async { stale.log().contains("this replica is the sync leader") },
    )
    .await;

    // The rotation runs while that replica serves with the old key ...
    let (code, err) = rotate_cli(
        &env,
        &[("NATS_PG_AUTH_ENCRYPTION_KEY", old.as_str())],
        &["--new-key", &new],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains(&key_id(&K2)), "names the new key's id: {err}");
    // ... which says, on /readyz and in its log, that its key is no longer current.
    wait_until(Duration::from_secs(10), "/readyz to say the key is stale", || async {
        matches!(stale.readyz().await, Err(why) if why.contains("503") && why.contains("encryption key not current"))
    })
    .await;
    let log = stale.log();
    assert!(
        log.contains("encryption key not current") && log.contains(&key_id(&K2)),
        "{log}"
    );

    // A new account needs keys: the stale replica seals none; a replica started with only the
    // new key (a plain start right after the rotation) leads and gives it keys under it.
    env.sql("INSERT INTO nats.accounts (name) VALUES ('late')")
        .await;
    env.add_watcher("late", "latecomer").await;
    let current = ServiceProcess::for_env_with(
        &env,
        "new-key",
        &[("NATS_PG_AUTH_ENCRYPTION_KEY", new.as_str())],
    );
    current.wait_ready(Duration::from_secs(20)).await;
    env.wait_synced("late").await;
    assert_eq!(
        unopenable(&env, &only_new).await,
        0,
        "every seed under the new key; old-key replica's log:\n{}",
        stale.log()
    );
    assert!(stale.readyz().await.is_err(), "still says it is stale");

    // Every replica restarted with only the new key: the next plain start works.
    drop(stale);
    drop(current);
    let next = ServiceProcess::for_env_with(
        &env,
        "next-start",
        &[("NATS_PG_AUTH_ENCRYPTION_KEY", new.as_str())],
    );
    next.wait_ready(Duration::from_secs(20)).await;
    env.wait_login("latecomer", "pw", Duration::from_secs(10), "a login")
        .await;
    env.wait_login("alice", "s3cret", Duration::from_secs(10), "a login")
        .await;
}

/// One seed left under the old key (what a replica of an earlier release, still on the old key,
/// wrote after the rotation): the start with only the new key fails with the count per key id
/// and the exact command; running it fixes the database. `serve` with the old key as
/// NATS_PG_AUTH_OLD_ENCRYPTION_KEY also starts and re-seals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_cannot_open_some_seeds_counts_them_per_key_id_and_prints_the_fix() {
    let (old, new) = (b64(&K1), b64(&K2));
    let env = env_under_k1().await;
    let (code, err) = rotate_cli(
        &env,
        &[("NATS_PG_AUTH_ENCRYPTION_KEY", old.as_str())],
        &["--new-key", &new],
    );
    assert_eq!(code, Some(0), "{err}");
    let only_new = SeedCipher::new(Some(K2));
    let reseal_one_under_k1 = || async {
        let (pk, seed): (String, String) = sqlx::query_as(
            "SELECT public_key, seed FROM nats.account_keys WHERE kind = 'signing' ORDER BY id LIMIT 1",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        let plain = only_new.open(&seed, &pk).expect("under K2");
        let under_k1 = SeedCipher::new(Some(K1))
            .seal(secrecy::ExposeSecret::expose_secret(&plain), &pk)
            .unwrap();
        sqlx::query("UPDATE nats.account_keys SET seed = $1 WHERE public_key = $2")
            .bind(under_k1)
            .bind(pk)
            .execute(&env.pool)
            .await
            .unwrap();
    };
    reseal_one_under_k1().await;
    assert_eq!(unopenable(&env, &only_new).await, 1);

    let mut serve = ServiceProcess::for_env_with(
        &env,
        "new-only",
        &[("NATS_PG_AUTH_ENCRYPTION_KEY", new.as_str())],
    );
    let status = serve.wait_exit(Duration::from_secs(20)).await;
    let log = serve.log();
    assert_eq!(status.code(), Some(64), "{log}");
    let (k1, k2) = (key_id(&K1), key_id(&K2));
    assert!(
        log.contains(&format!(
            "stored seeds does not open with this replica's encryption key (id {k2}): 1 under key id {k1}"
        )),
        "counts per key id: {log}"
    );
    let fix = format!(
        "NATS_PG_AUTH_OLD_ENCRYPTION_KEY=<the key whose id is {k1}> nats-pg-auth rotate-encryption-key"
    );
    assert!(log.contains(&fix), "prints the command: {log}");
    assert!(
        !log.contains(&old) && !log.contains(&new),
        "no key in the log"
    );

    // The command it printed, with the key whose id it named.
    let (code, err) = rotate_cli(
        &env,
        &[
            ("NATS_PG_AUTH_ENCRYPTION_KEY", new.as_str()),
            ("NATS_PG_AUTH_OLD_ENCRYPTION_KEY", old.as_str()),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(unopenable(&env, &only_new).await, 0);
    serve.restart();
    serve.wait_ready(Duration::from_secs(20)).await;
    drop(serve);

    // The other way out: serve with the old key as NATS_PG_AUTH_OLD_ENCRYPTION_KEY re-seals.
    reseal_one_under_k1().await;
    let serve = ServiceProcess::for_env_with(
        &env,
        "with-old",
        &[
            ("NATS_PG_AUTH_ENCRYPTION_KEY", new.as_str()),
            ("NATS_PG_AUTH_OLD_ENCRYPTION_KEY", old.as_str()),
        ],
    );
    serve.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(unopenable(&env, &only_new).await, 0, "{}", serve.log());
    env.wait_login("alice", "s3cret", Duration::from_secs(10), "a login")
        .await;
}

/// A deployment without a key is legal (a dev stack) but must not be one by accident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_key_says_once_that_the_seeds_are_plain_text() {
    let mut env = TestEnv::start().await;
    env.stop_service().await;
    let serve = ServiceProcess::for_env(&env, "keyless");
    serve.wait_ready(Duration::from_secs(20)).await;
    let log = serve.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("PLAIN TEXT")).collect();
    assert_eq!(warnings.len(), 1, "said once: {log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("pg_dump"),
        "{log}"
    );
}
