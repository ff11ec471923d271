//! Account sync under bulk work: each new account is pushed once, and a change an admin makes
//! is not stuck behind a re-push of every account. One leader: a replica that loses its lock
//! stops pushing at once; reconcile repairs what the server serves.

use std::time::{Duration, Instant};

use crate::common::{wait_until, EnvOptions, TestEnv};

async fn insert_accounts(env: &TestEnv, n: usize) {
    env.sql(&format!(
        "INSERT INTO nats.accounts (name) SELECT 'bulk' || g FROM generate_series(1, {n}) g"
    ))
    .await;
    env.wait_sql(
        "SELECT count(*) = 0 FROM nats.accounts WHERE name LIKE 'bulk%' AND synced_at IS NULL",
        Duration::from_secs(120),
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
    // A redundant second push (the sync's own key writes queueing one) would be queued before
    // the first push ends, so the outbox cannot drain without it.
    env.wait_sql(
        "SELECT NOT EXISTS (SELECT 1 FROM nats.sync_outbox)",
        Duration::from_secs(20),
        "every new account to be pushed",
    )
    .await;
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

async fn synced_bulk(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM nats.accounts WHERE name LIKE 'bulk%' AND synced_at IS NOT NULL",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_leader_that_loses_its_lock_stops_pushing_within_a_second_mid_drain() {
    let env = TestEnv::start().await;
    leader_idle(&env).await;
    let total = 1000;
    env.sql(&format!(
        "INSERT INTO nats.accounts (name) SELECT 'bulk' || g FROM generate_series(1, {total}) g"
    ))
    .await;
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(30), "the drain to be under way", || {
        let pool = pool.clone();
        async move { synced_bulk(&pool).await >= 30 }
    })
    .await;
    // What Postgres does to a partitioned leader's session (after its keepalives), or an
    // operator to a stuck one: the lock is gone.
    let lost_at = Instant::now();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'nats-pg-auth sync leader' AND datname = current_database()) t",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        killed, 1,
        "one lock connection, found by its application_name"
    );
    let at_loss = synced_bulk(&env.pool).await;
    // Watch the pushes being recorded. The replica competes again 2 s after standing down,
    // so anything recorded in this window comes from the term that lost the lock.
    // The term's wake-up listener closes when it stands down: that is when it noticed.
    let (mut last, mut last_change, mut stood_down) = (at_loss, Duration::ZERO, None);
    while lost_at.elapsed() < Duration::from_millis(1900) {
        let n = synced_bulk(&env.pool).await;
        if n != last {
            last = n;
            last_change = lost_at.elapsed();
        }
        if stood_down.is_none() {
            let listening: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'nats-pg-auth sync' AND datname = current_database()",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap();
            if listening == 0 {
                stood_down = Some(lost_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "lock lost with {at_loss}/{total} pushed; stood down after {stood_down:?}; \
         last push recorded {last_change:?} after the loss ({last} pushed)"
    );
    assert!(stood_down.is_some(), "the leader stood down");
    assert!(
        total - last > 200,
        "the drain was still long when the lock went ({last}/{total} pushed): the test proves nothing"
    );
    assert!(
        last_change < Duration::from_secs(1),
        "pushes went on {last_change:?} after the lock was lost"
    );
    // The next leader (this replica again) pushes the rows the lost term had claimed at once,
    // not after their 60 s lease.
    let claimed: Vec<i64> = sqlx::query_scalar(
        "SELECT account_id FROM nats.sync_outbox WHERE attempts > 0 AND next_attempt_at > now() + interval '30 seconds'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(!claimed.is_empty(), "the lost term held claimed rows");
    let pool = env.pool.clone();
    wait_until(
        // Well under the 60 s lease, with room for a busy machine.
        Duration::from_secs(45),
        "the next leader to push the rows the lost term had claimed",
        || {
            let (pool, claimed) = (pool.clone(), claimed.clone());
            async move {
                sqlx::query_scalar::<_, bool>(
                    "SELECT bool_and(synced_at IS NOT NULL) FROM nats.accounts WHERE id = ANY($1)",
                )
                .bind(&claimed)
                .fetch_one(&pool)
                .await
                .unwrap_or(false)
            }
        },
    )
    .await;
    eprintln!(
        "the {} rows claimed by the lost term were pushed {:?} after the lock was lost",
        claimed.len(),
        lost_at.elapsed()
    );
}

#[tokio::test]
async fn reconcile_repairs_a_stale_jwt_that_the_server_serves() {
    let env = TestEnv::start_with(EnvOptions {
        tweak: |args| args.reconcile_interval = Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    env.acme().await;
    let key = env.account_key("acme").await;
    let recorded = {
        let pool = env.pool.clone();
        move || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, String>("SELECT jwt FROM nats.accounts WHERE name = 'acme'")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        }
    };
    let old = recorded().await;
    env.sql("UPDATE nats.accounts SET max_connections = 777 WHERE name = 'acme'")
        .await;
    wait_until(Duration::from_secs(10), "the change to be pushed", || {
        let (recorded, old) = (recorded.clone(), old.clone());
        async move { recorded().await != old }
    })
    .await;
    // A former leader's late push: an older, valid JWT (the server accepts it, protocol §2.3).
    let sys = env.system_client().await;
    nats_pg_auth::sync::publish::update(&sys, &old, Duration::from_secs(2))
        .await
        .expect("the server takes the old JWT");
    let pushed_at = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "reconcile to put the recorded JWT back",
        || {
            let (sys, key, recorded) = (sys.clone(), key.clone(), recorded.clone());
            async move {
                let served =
                    nats_pg_auth::sync::publish::lookup(&sys, &key, Duration::from_secs(2))
                        .await
                        .ok()
                        .flatten();
                served.is_some() && served == Some(recorded().await)
            }
        },
    )
    .await;
    eprintln!(
        "stale JWT repaired {:?} after it was pushed",
        pushed_at.elapsed()
    );
    let served = nats_pg_auth::sync::publish::lookup(&sys, &key, Duration::from_secs(2))
        .await
        .unwrap()
        .unwrap();
    let claims = nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(&served).unwrap();
    assert_eq!(
        claims.nats["limits"]["conn"], 777,
        "the current limits are served"
    );
}

/// Scans of the outbox so far, as Postgres's statistics count them.
async fn outbox_scans(env: &TestEnv) -> i64 {
    // A fresh view of the statistics, not the one this session cached.
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&env.pool)
        .await
        .expect("clear the statistics snapshot");
    sqlx::query_scalar(
        "SELECT (seq_scan + COALESCE(idx_scan, 0))::bigint FROM pg_stat_user_tables \
         WHERE schemaname = 'nats' AND relname = 'sync_outbox'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("outbox statistics")
}

/// A leader with nothing to push waits for a notification (or its 5 s safety poll); it used to
/// take an empty outbox for a row due now and read it every 20 ms, three queries each time, for
/// as long as it led (~150 queries a second against Postgres, and CPU taken from logins).
#[tokio::test]
async fn an_idle_leader_leaves_the_outbox_alone() {
    let env = TestEnv::start().await;
    leader_idle(&env).await;
    let before = outbox_scans(&env).await;
    let start = Instant::now();
    // Statistics reach the view when a backend is idle for a moment (at most every second);
    // a window of several seconds holds hundreds of scans with the old behaviour, a few now.
    wait_until(
        Duration::from_secs(10),
        "a six-second window",
        || async move { start.elapsed() >= Duration::from_secs(6) },
    )
    .await;
    let scans = outbox_scans(&env).await - before;
    assert!(
        scans < 30,
        "an idle sync leader scanned the outbox {scans} times in about 6 s"
    );
    // And it still wakes for work at once.
    env.sql("INSERT INTO nats.accounts (name) VALUES ('later')")
        .await;
    env.wait_synced("later").await;
}
