//! `rotate-encryption-key` while `serve` runs (issue 10, bug 2): a replica still on the old key
//! writes seeds under it; the rotation can be finished, and `serve` with the new key plus
//! `NATS_PG_AUTH_OLD_ENCRYPTION_KEY` starts and re-seals them.

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use nats_pg_auth::keys::SeedCipher;

use crate::common::{EnvOptions, ServiceProcess, TestEnv};

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
    assert!(rows.iter().all(|(_, s)| s.starts_with("enc:v1:")));
    rows.iter()
        .filter(|(pk, seed)| cipher.open(seed, pk).is_err())
        .count()
}

fn rotate(env: &TestEnv, current: &str, new: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nats-pg-auth"))
        .args(["rotate-encryption-key", "--new-key", new])
        .env("DATABASE_URL", &env.database_url)
        .env("NATS_PG_AUTH_ENCRYPTION_KEY", current)
        .env_remove("NATS_PG_AUTH_OLD_ENCRYPTION_KEY")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_while_serve_runs_can_be_finished_and_serve_accepts_the_old_key() {
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    let b64 = |k: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
    let (old, new) = (b64(&k1), b64(&k2));
    let mut env = TestEnv::start_with(EnvOptions {
        encryption_key: Some(k1),
        ..Default::default()
    })
    .await;
    env.acme().await;
    let only_new = SeedCipher::new(Some(k2));

    // The rotation runs while the (in-process) replica still has the old key ...
    let (code, err) = rotate(&env, &old, &new);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(unopenable(&env, &only_new).await, 0);
    // ... which writes the keys of a new account under it.
    env.sql("INSERT INTO nats.accounts (name) VALUES ('late')")
        .await;
    env.add_watcher("late", "latecomer").await;
    env.wait_synced("late").await;
    assert!(unopenable(&env, &only_new).await > 0, "a mixed database");

    // Running the rotation again finishes it.
    let (code, err) = rotate(&env, &old, &new);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        unopenable(&env, &only_new).await,
        0,
        "all under the new key"
    );

    // Mixed again; this time a replica restarted with the new key and the old one as
    // NATS_PG_AUTH_OLD_ENCRYPTION_KEY starts, re-seals and answers.
    env.sql("INSERT INTO nats.accounts (name) VALUES ('later')")
        .await;
    env.add_watcher("later", "laterone").await;
    env.wait_synced("later").await;
    assert!(unopenable(&env, &only_new).await > 0, "a mixed database");
    env.stop_service().await;
    let serve = ServiceProcess::for_env_with(
        &env,
        "new-key",
        &[
            ("NATS_PG_AUTH_ENCRYPTION_KEY", new.as_str()),
            ("NATS_PG_AUTH_OLD_ENCRYPTION_KEY", old.as_str()),
        ],
    );
    serve.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(
        unopenable(&env, &only_new).await,
        0,
        "serve re-sealed; log:\n{}",
        serve.log()
    );
    env.wait_login("laterone", "pw", Duration::from_secs(10), "a login")
        .await;
    env.wait_login("latecomer", "pw", Duration::from_secs(10), "a login")
        .await;
}
