//! What happens when Postgres or NATS goes away: known users keep logging in from the replica's
//! copy, everything else is refused rather than hung, and the service recovers without a restart.

use std::time::Duration;

use crate::common::{DbOutage, EnvOptions, TestEnv};

/// Issue 7: every replica keeps a complete copy of what a login needs and answers from it while
/// Postgres is unreachable (`--db-outage-grace`), so a known user gets in; the copy still
/// refuses unknown users and wrong passwords, and such logins are counted on `/metrics`.
#[tokio::test]
async fn postgres_outage_known_user_gets_in_from_the_copy_unknown_and_wrong_password_refused() {
    let env = TestEnv::start_with(EnvOptions {
        tweak: |a| a.http_listen = "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
    env.acme().await;
    env.connect_user("alice", "s3cret")
        .await
        .expect("alice logs in before the outage");
    // Take the database away from every client, the service's pool and listeners included.
    let outage = DbOutage::begin(&env).await;

    env.connect_user("alice", "s3cret")
        .await
        .expect("a user seen before the outage gets in while Postgres is unreachable");
    for (what, user, pass) in [
        ("an unknown user", "nobody", "s3cret"),
        ("a wrong password", "alice", "not-her-password"),
    ] {
        let started = std::time::Instant::now();
        let err = env
            .connect_user(user, pass)
            .await
            .expect_err("refused without Postgres too");
        assert!(
            crate::common::is_auth_refusal(&err),
            "{what}: refused, not hung: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{what}: refused within the auth timeout: {:?}",
            started.elapsed()
        );
    }
    // Logins answered from the copy are counted (the metric's name contains `from_copy`).
    let (_, metrics) = crate::common::http_get(env.http.expect("HTTP on"), "/metrics").await;
    let from_copy: f64 = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("from_copy"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(
        from_copy >= 1.0,
        "logins answered from the copy are counted on /metrics:\n{metrics}"
    );

    outage.end().await;
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "logins to work after Postgres returns",
    )
    .await;
}

#[tokio::test]
async fn changes_made_while_nats_is_down_are_pushed_when_it_returns() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.nats.stop();
    env.sql("INSERT INTO nats.accounts (name) VALUES ('during_outage');
             INSERT INTO nats.users (account_id, username, password_hash)
               SELECT id, 'olga', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'during_outage';")
        .await;
    // The push fails and stays queued (not lost).
    env.wait_sql(
        "SELECT sync_error IS NOT NULL FROM nats.accounts WHERE name = 'during_outage'",
        Duration::from_secs(15),
        "the failed push to be recorded",
    )
    .await;
    env.nats.restart(false).await;
    env.wait_synced("during_outage").await;
    env.connect_user("olga", "pw")
        .await
        .expect("olga logs in after NATS returns");
}
