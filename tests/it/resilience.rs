//! What happens when Postgres or NATS goes away: deny rather than hang or crash, and recover
//! without a restart of the service.

use std::time::Duration;

use crate::common::TestEnv;

#[tokio::test]
async fn postgres_outage_denies_logins_then_recovers() {
    let env = TestEnv::start().await;
    env.acme().await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let admin = sqlx::PgPool::connect(&crate::common::admin_url())
        .await
        .unwrap();
    // Take the database away from every client, the service's pool included.
    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&db)
        .execute(&admin)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let err = env
        .connect_user("alice", "s3cret")
        .await
        .expect_err("no login without Postgres");
    assert!(
        crate::common::is_auth_refusal(&err),
        "refused, not hung: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "denied within the auth timeout: {:?}",
        started.elapsed()
    );
    assert!(
        env.metrics.denied("internal_error") >= 1,
        "counted as internal error"
    );

    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .unwrap();
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "logins to work again after Postgres returns",
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
