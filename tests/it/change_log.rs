//! The login copy follows the change log `nats.changes` (migration 0011), not notification
//! payloads: anyone may NOTIFY, so a notification only wakes the copy's maintainer. Forged
//! wake-ups cost no reload, and a change is applied however its transaction's commit is
//! ordered against others (the log is read by snapshot, not by id).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nats_pg_auth::copy::{CacheStats, LoginCache};
use sqlx::{Connection, PgConnection, PgPool};

use crate::common::{create_login_role, is_auth_refusal, tenant_admin, wait_until, TestEnv};

/// acme (with a tenant admin: a LOGIN role of `nats_pg_auth_tenant`) and globex (gw with a
/// token, gx and gy with passwords).
async fn setup() -> (TestEnv, PgPool) {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql("INSERT INTO nats.accounts (name) VALUES ('globex')")
        .await;
    for u in ["gw", "gx", "gy"] {
        env.add_watcher("globex", u).await;
    }
    env.sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('gw-token', 'sha256') FROM nats.users WHERE username = 'gw'",
    )
    .await;
    env.wait_synced("globex").await;
    let (_, tenant) = tenant_admin(&env, "acme").await;
    (env, tenant)
}

/// The copy, once it answers live logins.
async fn live_copy(env: &TestEnv) -> Arc<LoginCache> {
    let cache = env
        .callout
        .clone()
        .expect("service running")
        .cache()
        .clone();
    let c = cache.clone();
    wait_until(Duration::from_secs(10), "the login copy to go live", || {
        let c = c.clone();
        async move { c.is_live() }
    })
    .await;
    cache
}

/// Polls (10 s at most) until `connect` is refused by the server.
async fn refused_within<F, Fut>(what: &str, mut connect: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<async_nats::Client, async_nats::ConnectError>>,
{
    let start = Instant::now();
    loop {
        match connect().await {
            Err(e) if is_auth_refusal(&e) => return,
            Err(e) => panic!("{what}: not an auth refusal: {e}"),
            Ok(_) if start.elapsed() > Duration::from_secs(10) => {
                panic!("{what}: still admitted 10 s after the change")
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// 200 forged notifications with payloads nobody understands (sent by acme's tenant admin,
/// each in its own transaction) reload nothing; globex's token revoked right after is refused.
#[tokio::test]
async fn forged_garbage_notifications_cost_no_reload() {
    let (env, tenant) = setup().await;
    let cache = live_copy(&env).await;
    env.wait_login("gx", "pw", Duration::from_secs(10), "gx")
        .await;
    let reloads = CacheStats::get(&cache.stats().reloads);
    let flushes = CacheStats::get(&cache.stats().flushes);
    let woken = CacheStats::get(&cache.stats().notifications);
    for i in 0..200 {
        let channel = if i % 2 == 0 {
            "nats_pg_auth_change"
        } else {
            "nats_pg_auth_sync"
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(format!("garbage {i}"))
            .execute(&tenant)
            .await
            .expect("anyone may notify");
    }
    let c = cache.clone();
    wait_until(
        Duration::from_secs(10),
        "the copy to receive the forged notifications",
        || {
            let c = c.clone();
            async move { CacheStats::get(&c.stats().notifications) >= woken + 200 }
        },
    )
    .await;
    env.sql("UPDATE nats.user_tokens SET revoked_at = now() WHERE token_sha256 = digest('gw-token', 'sha256')")
        .await;
    refused_within("gw's revoked token", || env.connect_token("gw-token")).await;
    env.wait_login("gx", "pw", Duration::from_secs(10), "gx after")
        .await;
    assert_eq!(
        CacheStats::get(&cache.stats().reloads),
        reloads,
        "forged notifications reloaded the copy"
    );
    assert_eq!(
        CacheStats::get(&cache.stats().flushes),
        flushes,
        "forged notifications flushed the copy"
    );
    assert!(cache.is_live());
}

/// A transaction that wrote its change before a shorter one but commits after it (its log row
/// has the smaller id): the copy has read past the shorter one, and still applies the longer.
#[tokio::test]
async fn a_change_committed_after_a_later_one_is_applied() {
    let (env, _tenant) = setup().await;
    live_copy(&env).await;
    env.wait_login("gx", "pw", Duration::from_secs(10), "gx")
        .await;
    env.wait_login("gy", "pw", Duration::from_secs(10), "gy")
        .await;

    let mut long = PgConnection::connect(&env.database_url)
        .await
        .expect("connect");
    sqlx::raw_sql("BEGIN; UPDATE nats.users SET active = false WHERE username = 'gx'")
        .execute(&mut long)
        .await
        .expect("the long transaction writes first");
    env.sql("UPDATE nats.users SET active = false WHERE username = 'gy'")
        .await;
    // The copy has read the log past the shorter transaction.
    refused_within("deactivated gy", || env.connect_user("gy", "pw")).await;
    env.connect_user("gx", "pw")
        .await
        .expect("gx is active until the long transaction commits");
    sqlx::raw_sql("COMMIT")
        .execute(&mut long)
        .await
        .expect("commit the long transaction");
    refused_within("gx, deactivated by the long transaction", || {
        env.connect_user("gx", "pw")
    })
    .await;
}

/// Who may touch the log: the service reads it, logs through `nats.log_change` and prunes it;
/// a tenant admin can neither read it (other tenants' ids), write it, nor lock it (a lock would
/// hold back every replica's reads); nor may it call `nats.log_change`.
#[tokio::test]
async fn only_the_service_reads_logs_and_prunes_the_change_log() {
    use nats_pg_auth::db::changes;
    let (env, tenant) = setup().await;
    for sql in [
        "SELECT count(*) FROM nats.changes",
        "INSERT INTO nats.changes (scope) VALUES ('user:1')",
        "SELECT nats.log_change('user:1')",
        "DELETE FROM nats.changes",
        "BEGIN; LOCK TABLE nats.changes IN ACCESS EXCLUSIVE MODE",
    ] {
        let mut conn = tenant.acquire().await.unwrap();
        let err = sqlx::raw_sql(sql)
            .execute(&mut *conn)
            .await
            .expect_err("a tenant admin may not");
        assert!(
            err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
        conn.close().await.unwrap();
    }

    let (_, service_url) =
        create_login_role(&env.pool, &env.database_url, "nats_pg_auth_service").await;
    let service = PgPool::connect(&service_url).await.unwrap();
    let start = changes::current(&service).await.unwrap();
    sqlx::query("SELECT nats.log_change('account:424242')")
        .execute(&service)
        .await
        .expect("the service logs through the function");
    let (scopes, after) = changes::since(&service, &start).await.unwrap();
    assert_eq!(scopes, vec!["account:424242".to_owned()]);
    let (scopes, _) = changes::since(&service, &after).await.unwrap();
    assert!(scopes.is_empty(), "read twice: {scopes:?}");
    // A change after `after` survives a prune with `after`; the ones `after` saw do not.
    env.sql("UPDATE nats.users SET active = false WHERE username = 'gy'")
        .await;
    changes::prune(&service, &after)
        .await
        .expect("the service prunes");
    let (left, _) = changes::since(&service, &start).await.unwrap();
    let gy: i64 = sqlx::query_scalar("SELECT id FROM nats.users WHERE username = 'gy'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(left.contains(&format!("user:{gy}")), "{left:?}");
    assert!(!left.contains(&"account:424242".to_owned()), "{left:?}");
}
