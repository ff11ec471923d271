//! Revocations no lock can hold back (issue 15, finding 1). A tenant admin's table-level UPDATE
//! on `nats.roles` / `nats.users` lets it `LOCK TABLE … IN ACCESS EXCLUSIVE MODE` in an open
//! transaction (and an operator's `ALTER TABLE` takes the same lock); a change of one of its
//! users then sends the login copy's maintainer to read the locked table. Another tenant's
//! revocation, committed meanwhile, must still refuse the token and close the live connection
//! while the lock is held.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, PgPool};

use crate::common::{create_login_role, disconnected_by, is_auth_refusal, wait_until, TestEnv};

/// Who holds the lock.
enum Holder {
    /// acme's tenant admin (a LOGIN role of `nats_pg_auth_tenant`).
    Tenant,
    /// The schema owner, as an operator running a migration by hand.
    Owner,
}

/// acme (alice, with acme's tenant admin) and globex (gw with a token, gx with a password).
struct Setup {
    env: TestEnv,
    /// A pool of acme's tenant admin.
    tenant: PgPool,
    tenant_url: String,
}

async fn setup() -> Setup {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql("INSERT INTO nats.accounts (name) VALUES ('globex')")
        .await;
    env.add_watcher("globex", "gw").await;
    env.add_watcher("globex", "gx").await;
    env.sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('gw-token', 'sha256') FROM nats.users WHERE username = 'gw'",
    )
    .await;
    // A spare token of alice's: changing it is how `park_the_maintainer` sends the copy to
    // re-read alice (a user's tokens are re-read with the user, its role and its account).
    env.sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('alice-spare', 'sha256') FROM nats.users WHERE username = 'alice'",
    )
    .await;
    env.wait_synced("globex").await;
    let (role, tenant_url) =
        create_login_role(&env.pool, &env.database_url, "nats_pg_auth_tenant").await;
    env.sql(&format!(
        "INSERT INTO nats.account_admins (account_id, role_name) SELECT id, '{role}' FROM nats.accounts WHERE name = 'acme'"
    ))
    .await;
    let tenant = PgPool::connect(&tenant_url)
        .await
        .expect("connect as acme's tenant admin");
    Setup {
        env,
        tenant,
        tenant_url,
    }
}

/// Opens a transaction holding `lock` (ACCESS EXCLUSIVE on a table) on a connection of its own.
async fn hold(s: &Setup, holder: Holder, lock: &str) -> PgConnection {
    let url = match holder {
        Holder::Tenant => s.tenant_url.clone(),
        Holder::Owner => s.env.database_url.clone(),
    };
    let mut conn = PgConnection::connect(&url)
        .await
        .expect("connect the holder");
    sqlx::raw_sql(&format!("BEGIN; {lock}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{lock}: {e}"));
    conn
}

/// A change of alice's spare token (written beside the lock: `nats.user_tokens` is not
/// locked, and changing the hash takes no lock on `nats.users`) sends the copy's maintainer to
/// re-read alice, which reads the locked table; returns once a service session waits for the
/// lock.
async fn park_the_maintainer(s: &Setup) {
    s.env
        .sql(
            "UPDATE nats.user_tokens SET token_sha256 = digest('alice-spare-' || id, 'sha256')
              WHERE token_sha256 = digest('alice-spare', 'sha256')",
        )
        .await;
    let pool = s.env.pool.clone();
    wait_until(
        Duration::from_secs(5),
        "a service read to wait for the lock",
        || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, bool>(
                    "SELECT count(*) > 0 FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name = 'nats-pg-auth'
                       AND wait_event_type = 'Lock'",
                )
                .fetch_one(&pool)
                .await
                .unwrap_or(false)
            }
        },
    )
    .await;
}

/// Polls (10 s at most) until a login with `connect` is refused by the server.
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
                panic!("{what}: still admitted 10 s after the change (the lock holds it back)")
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// While `lock` is held (by `holder`) and the maintainer is parked on it, the operator revokes
/// globex's token: the token is refused and gw's live connection is closed, lock still held.
async fn revocation_under(holder: Holder, lock: &str) {
    let s = setup().await;
    let env = &s.env;
    let (_gw, mut gw_events) = env
        .connect_token_events("gw-token")
        .await
        .expect("gw's token logs in");
    let held = hold(&s, holder, lock).await;
    park_the_maintainer(&s).await;

    env.sql("UPDATE nats.user_tokens SET revoked_at = now() WHERE token_sha256 = digest('gw-token', 'sha256')")
        .await;
    let revoked = Instant::now();
    refused_within("gw's revoked token", || env.connect_token("gw-token")).await;
    disconnected_by(
        &mut gw_events,
        revoked,
        Duration::from_secs(10),
        "gw's connection after its token was revoked",
    )
    .await;
    // Still inside the holder's transaction: nothing above waited for it.
    held.close().await.expect("release the lock");
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "alice after the lock",
    )
    .await;
}

#[tokio::test]
async fn a_tenants_lock_on_roles_does_not_hold_back_another_tenants_revocation() {
    revocation_under(
        Holder::Tenant,
        "LOCK TABLE nats.roles IN ACCESS EXCLUSIVE MODE",
    )
    .await;
}

#[tokio::test]
async fn a_tenants_lock_on_users_does_not_hold_back_another_tenants_revocation() {
    revocation_under(
        Holder::Tenant,
        "LOCK TABLE nats.users IN ACCESS EXCLUSIVE MODE",
    )
    .await;
}

#[tokio::test]
async fn an_operators_alter_table_does_not_hold_back_a_revocation() {
    revocation_under(
        Holder::Owner,
        "ALTER TABLE nats.users ADD COLUMN locks_test_note text",
    )
    .await;
}

#[tokio::test]
async fn a_user_deactivated_under_a_tenants_lock_on_roles_is_refused_and_closed() {
    let s = setup().await;
    let env = &s.env;
    let (_gx, mut gx_events) = env
        .connect_user_events("gx", "pw")
        .await
        .expect("gx logs in");
    let held = hold(
        &s,
        Holder::Tenant,
        "LOCK TABLE nats.roles IN ACCESS EXCLUSIVE MODE",
    )
    .await;
    park_the_maintainer(&s).await;

    env.sql("UPDATE nats.users SET active = false WHERE username = 'gx'")
        .await;
    let deactivated = Instant::now();
    refused_within("deactivated gx", || env.connect_user("gx", "pw")).await;
    disconnected_by(
        &mut gx_events,
        deactivated,
        Duration::from_secs(10),
        "gx's connection after it was deactivated",
    )
    .await;
    held.close().await.expect("release the lock");
}

/// Anyone may NOTIFY on any channel, so a payload proves nothing. acme's tenant admin holds a
/// lock on `nats.users` and forges a change of globex's user, of globex's account and a
/// payload nobody understands: globex's users (a password and a token) keep logging in while
/// the lock is held. Before the change log, the forged scopes were stamped (their logins read
/// the locked table, timed out and were refused from the copy) and the garbage marked every
/// entry stale.
#[tokio::test]
async fn forged_notifications_under_a_tenants_lock_keep_nobody_out() {
    let s = setup().await;
    let env = &s.env;
    let (gx, globex): (i64, i64) =
        sqlx::query_as("SELECT id, account_id FROM nats.users WHERE username = 'gx'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    env.wait_login("gx", "pw", Duration::from_secs(10), "gx before the lock")
        .await;
    // The copy holds globex as pushed (its signing key is on the server): it answers globex's
    // logins itself, without Postgres.
    let cache = env
        .callout
        .clone()
        .expect("service running")
        .cache()
        .clone();
    wait_until(
        Duration::from_secs(10),
        "the copy to hold globex as pushed",
        || {
            let c = cache.clone();
            async move { c.is_live() && c.unsettled_accounts().is_empty() }
        },
    )
    .await;
    let held = hold(
        &s,
        Holder::Tenant,
        "LOCK TABLE nats.users IN ACCESS EXCLUSIVE MODE",
    )
    .await;
    for (channel, payload) in [
        ("nats_pg_auth_change", format!("user:{gx}")),
        ("nats_pg_auth_sync", globex.to_string()),
        ("nats_pg_auth_change", "garbage".to_owned()),
    ] {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(&payload)
            .execute(&s.tenant)
            .await
            .expect("anyone may notify");
    }
    let forged = Instant::now();
    let mut logins = 0;
    while forged.elapsed() < Duration::from_secs(2) {
        env.connect_user("gx", "pw")
            .await
            .unwrap_or_else(|e| panic!("gx refused after forged notifications: {e}"));
        env.connect_token("gw-token")
            .await
            .unwrap_or_else(|e| panic!("gw's token refused after forged notifications: {e}"));
        logins += 2;
    }
    assert!(logins >= 2);
    held.close().await.expect("release the lock");
}

/// Kicks resolve account keys from `nats.accounts` when the copy lacks them and read their
/// requests from `nats.kick_requests`: a tenant admin cannot lock either (`LOCK TABLE` needs
/// table-level UPDATE, DELETE or TRUNCATE; tenants hold column UPDATE on accounts only).
#[tokio::test]
async fn a_tenant_cannot_lock_the_tables_kicks_rely_on() {
    let s = setup().await;
    for table in ["nats.accounts", "nats.kick_requests"] {
        let mut conn = PgConnection::connect(&s.tenant_url).await.unwrap();
        let err = sqlx::raw_sql(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .execute(&mut conn)
        .await
        .expect_err("tenants may not lock it");
        assert!(
            err.to_string().contains("permission denied"),
            "{table}: {err}"
        );
    }
}
