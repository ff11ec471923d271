//! Account sync under bulk work: each new account is pushed once, and a change an admin makes
//! is not stuck behind a re-push of every account.

use std::time::Duration;

use crate::common::TestEnv;

async fn insert_accounts(env: &TestEnv, n: usize) {
    env.sql(&format!(
        "INSERT INTO nats.accounts (name) SELECT 'bulk' || g FROM generate_series(1, {n}) g"
    ))
    .await;
    env.wait_sql(
        "SELECT count(*) = 0 FROM nats.accounts WHERE name LIKE 'bulk%' AND synced_at IS NULL",
        Duration::from_secs(60),
        "every account to sync",
    )
    .await;
}

/// Waits until the sync leader runs and has nothing left to do (a leader that starts later
/// queues every account once more, on purpose).
async fn leader_idle(env: &TestEnv) {
    env.sql("INSERT INTO nats.accounts (name) VALUES ('first')")
        .await;
    env.wait_synced("first").await;
    env.wait_sql(
        "SELECT count(*) = 0 FROM nats.sync_outbox",
        Duration::from_secs(10),
        "the startup sync to finish",
    )
    .await;
}

#[tokio::test]
async fn each_new_account_is_pushed_once() {
    let env = TestEnv::start().await;
    leader_idle(&env).await;
    let before = env.metrics.pushes();
    insert_accounts(&env, 40).await;
    // Give a redundant second push (the sync's own key writes queueing one) time to show.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let left: Vec<(String, i32)> =
        sqlx::query_as("SELECT reason, attempts FROM nats.sync_outbox ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(left.is_empty(), "nothing left to push: {left:?}");
    assert_eq!(
        env.metrics.pushes() - before,
        40,
        "one push per new account (keys are created and pushed in one step)"
    );
}

#[tokio::test]
async fn a_change_is_pushed_before_a_bulk_re_push_of_every_account() {
    let env = TestEnv::start().await;
    leader_idle(&env).await;
    insert_accounts(&env, 600).await;
    let last = "bulk600";
    let limit: i64 = 4242;
    // What a reconnect to NATS does (every account queued again), and in the same instant an
    // admin changes the account whose bulk row would come last.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO nats.sync_outbox (account_id, op, reason, bulk) \
         SELECT id, 'upsert', 'test: re-push everything', true FROM nats.accounts",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("UPDATE nats.accounts SET max_connections = $1 WHERE name = $2")
        .bind(limit)
        .bind(last)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let key = env.account_key(last).await;
    let sys = env.system_client().await;
    let pool = env.pool.clone();
    let mut served_while_pending = None;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let jwt = nats_pg_auth::sync::publish::lookup(&sys, &key, Duration::from_secs(2))
            .await
            .unwrap()
            .unwrap_or_default();
        let conn = nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(&jwt)
            .ok()
            .and_then(|c| c.nats["limits"]["conn"].as_i64());
        if conn == Some(limit) {
            served_while_pending = Some(
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM nats.sync_outbox WHERE bulk")
                    .fetch_one(&pool)
                    .await
                    .unwrap(),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pending = served_while_pending.expect("the change reached the server");
    eprintln!(
        "change served after {:?} with {pending} bulk rows still pending",
        start.elapsed()
    );
    assert!(
        pending > 100,
        "the change went ahead of the bulk re-push ({pending} of 601 bulk rows left)"
    );
}
