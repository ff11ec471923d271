//! Login caches: reconnecting users skip Postgres and bcrypt, and no change is served stale —
//! a password change, a deactivation and a token revocation hold for the very next login.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nats_pg_auth::callout::Callout;
use nats_pg_auth::copy::{CacheStats, LoginCache, UserLookup, LISTENER_APPLICATION_NAME};

use crate::common::{is_auth_refusal, wait_until, TestEnv};

fn callout(env: &TestEnv) -> Arc<Callout> {
    env.callout.clone().expect("service running")
}

/// Waits until the change listener is connected (the caches are bypassed until then).
async fn caches_live(env: &TestEnv) -> Arc<LoginCache> {
    let cache = callout(env).cache().clone();
    let c = cache.clone();
    wait_until(Duration::from_secs(5), "cache listener to connect", || {
        let c = c.clone();
        async move { c.is_live() }
    })
    .await;
    cache
}

/// The example tenant, with alice's hash at bcrypt cost 4: debug builds run bcrypt slowly,
/// and what is tested here is whether it runs, not how long it takes.
async fn acme(env: &TestEnv) {
    env.acme().await;
    env.sql("UPDATE nats.users SET password_hash = crypt('s3cret', gen_salt('bf', 4)) WHERE username = 'alice'")
        .await;
}

async fn logs_in(env: &TestEnv, user: &str, pass: &str) -> bool {
    match env.connect_user(user, pass).await {
        Ok(c) => {
            c.flush().await.expect("connected");
            drop(c);
            true
        }
        Err(e) => {
            assert!(is_auth_refusal(&e), "refused by auth, not by network: {e}");
            false
        }
    }
}

async fn token_logs_in(env: &TestEnv, token: &str) -> bool {
    match env.connect_token(token).await {
        Ok(c) => {
            c.flush().await.expect("connected");
            true
        }
        Err(e) => {
            assert!(is_auth_refusal(&e), "refused by auth, not by network: {e}");
            false
        }
    }
}

/// Retries `attempt` (each a fresh login) until it returns `want`; panics after 2 s. Returns
/// how long after `since` (the change's COMMIT) it took.
async fn within_two_seconds<F, Fut>(
    since: Instant,
    what: &str,
    want: bool,
    mut attempt: F,
) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if attempt().await == want {
            let took = since.elapsed();
            eprintln!("{what}: took effect {took:?} after COMMIT");
            return took;
        }
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "{what}: still not in effect 2 s after COMMIT (stale cache)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reconnecting_user_skips_bcrypt_and_postgres() {
    let env = TestEnv::start().await;
    acme(&env).await;
    let cache = caches_live(&env).await;
    let callout = callout(&env);

    assert!(logs_in(&env, "alice", "s3cret").await);
    let hashes = callout.password_hashes_computed();
    let hits = CacheStats::get(&cache.stats().login_hits);
    assert!(hashes >= 1, "the first login ran bcrypt");

    for _ in 0..3 {
        assert!(logs_in(&env, "alice", "s3cret").await);
    }
    assert_eq!(
        callout.password_hashes_computed(),
        hashes,
        "later logins of the same user/password do not run bcrypt again"
    );
    assert!(CacheStats::get(&cache.stats().credential_hits) >= 3);
    assert!(
        CacheStats::get(&cache.stats().login_hits) >= hits + 3,
        "later logins read the login from the cache, not Postgres"
    );

    // A wrong password always pays bcrypt and is never remembered.
    assert!(!logs_in(&env, "alice", "wrong").await);
    assert!(!logs_in(&env, "alice", "wrong").await);
    assert_eq!(callout.password_hashes_computed(), hashes + 2);

    // Off: every login verifies again.
    cache.set_credentials_enabled(false);
    assert!(logs_in(&env, "alice", "s3cret").await);
    assert_eq!(callout.password_hashes_computed(), hashes + 3);
}

#[tokio::test]
async fn a_password_change_holds_for_the_next_login() {
    let env = TestEnv::start().await;
    acme(&env).await;
    caches_live(&env).await;
    assert!(logs_in(&env, "alice", "s3cret").await);
    assert!(logs_in(&env, "alice", "s3cret").await, "cached now");

    env.sql("UPDATE nats.users SET password_hash = crypt('n3w', gen_salt('bf', 4)) WHERE username = 'alice'")
        .await;
    let committed = Instant::now();
    within_two_seconds(committed, "old password refused", false, || {
        logs_in(&env, "alice", "s3cret")
    })
    .await;
    within_two_seconds(committed, "new password accepted", true, || {
        logs_in(&env, "alice", "n3w")
    })
    .await;
    // Changed back to the same text: a new salt, so the old cached verification is useless.
    env.sql("UPDATE nats.users SET password_hash = crypt('s3cret', gen_salt('bf', 4)) WHERE username = 'alice'")
        .await;
    let committed = Instant::now();
    within_two_seconds(committed, "new password refused", false, || {
        logs_in(&env, "alice", "n3w")
    })
    .await;
    assert!(logs_in(&env, "alice", "s3cret").await);
}

#[tokio::test]
async fn deactivating_a_user_or_account_holds_for_the_next_login() {
    let env = TestEnv::start().await;
    acme(&env).await;
    caches_live(&env).await;
    for _ in 0..2 {
        assert!(logs_in(&env, "alice", "s3cret").await);
    }
    env.sql("UPDATE nats.users SET active = false WHERE username = 'alice'")
        .await;
    let took = within_two_seconds(Instant::now(), "inactive user refused", false, || {
        logs_in(&env, "alice", "s3cret")
    })
    .await;
    assert!(
        took < Duration::from_secs(1),
        "refused within ~1 s ({took:?})"
    );
    assert!(env.metrics.denied("inactive_user") >= 1);

    env.sql("UPDATE nats.users SET active = true WHERE username = 'alice'")
        .await;
    within_two_seconds(Instant::now(), "reactivated user accepted", true, || {
        logs_in(&env, "alice", "s3cret")
    })
    .await;
    assert!(logs_in(&env, "alice", "s3cret").await, "cached again");

    env.sql("UPDATE nats.accounts SET active = false WHERE name = 'acme'")
        .await;
    within_two_seconds(Instant::now(), "inactive account refused", false, || {
        logs_in(&env, "alice", "s3cret")
    })
    .await;
}

#[tokio::test]
async fn a_revoked_token_holds_for_the_next_login() {
    let env = TestEnv::start().await;
    acme(&env).await;
    let cache = caches_live(&env).await;
    env.sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256, description)
           SELECT id, digest('tok-1', 'sha256'), 'cache test' FROM nats.users WHERE username = 'alice'",
    )
    .await;
    assert!(token_logs_in(&env, "tok-1").await);
    let hits = CacheStats::get(&cache.stats().token_hits);
    assert!(token_logs_in(&env, "tok-1").await);
    assert!(
        CacheStats::get(&cache.stats().token_hits) > hits,
        "the second token login is served from the cache"
    );

    env.sql("UPDATE nats.user_tokens SET revoked_at = now() WHERE description = 'cache test'")
        .await;
    let took = within_two_seconds(Instant::now(), "revoked token refused", false, || {
        token_logs_in(&env, "tok-1")
    })
    .await;
    assert!(
        took < Duration::from_secs(1),
        "refused within ~1 s ({took:?})"
    );
    assert!(env.metrics.denied("token_revoked") >= 1);
}

#[tokio::test]
async fn an_unknown_user_becomes_known_as_soon_as_it_is_inserted() {
    let env = TestEnv::start().await;
    acme(&env).await;
    let cache = caches_live(&env).await;
    // A notification still on its way (acme's own UPDATE) may void the first negative answer,
    // so allow a few attempts; each is refused, and soon one is answered without Postgres.
    let mut attempts = 0;
    while CacheStats::get(&cache.stats().unknown_user_hits) == 0 && attempts < 5 {
        assert!(!logs_in(&env, "bob", "pw").await);
        attempts += 1;
    }
    assert!(
        CacheStats::get(&cache.stats().unknown_user_hits) >= 1,
        "a repeated attempt is answered from the negative cache"
    );
    env.add_watcher("acme", "bob").await;
    within_two_seconds(Instant::now(), "new user accepted", true, || {
        logs_in(&env, "bob", "pw")
    })
    .await;
}

#[tokio::test]
async fn a_lost_listener_flushes_and_changes_made_meanwhile_are_seen() {
    let env = TestEnv::start().await;
    acme(&env).await;
    let cache = caches_live(&env).await;
    for _ in 0..2 {
        assert!(logs_in(&env, "alice", "s3cret").await);
    }
    let connects = CacheStats::get(&cache.stats().listener_connects);
    // Kill the listener's connection and change the user in the same breath: the notification
    // may well be lost.
    env.sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{LISTENER_APPLICATION_NAME}' AND datname = current_database();
         UPDATE nats.users SET active = false WHERE username = 'alice';"
    ))
    .await;
    within_two_seconds(Instant::now(), "inactive user refused", false, || {
        logs_in(&env, "alice", "s3cret")
    })
    .await;
    let c = cache.clone();
    wait_until(Duration::from_secs(10), "listener to reconnect", || {
        let c = c.clone();
        async move { c.is_live() && CacheStats::get(&c.stats().listener_connects) > connects }
    })
    .await;
    // Live again: caching and invalidation work as before.
    env.sql("UPDATE nats.users SET active = true WHERE username = 'alice'")
        .await;
    within_two_seconds(Instant::now(), "reactivated user accepted", true, || {
        logs_in(&env, "alice", "s3cret")
    })
    .await;
    let hits = CacheStats::get(&cache.stats().login_hits);
    assert!(logs_in(&env, "alice", "s3cret").await);
    assert!(CacheStats::get(&cache.stats().login_hits) > hits);
}

#[tokio::test]
async fn serve_flags_turn_the_caches_off() {
    let env = TestEnv::start_with(crate::common::EnvOptions {
        tweak: |args| {
            args.credential_cache = false;
            args.login_cache = false;
        },
        ..Default::default()
    })
    .await;
    acme(&env).await;
    let callout = callout(&env);
    for _ in 0..3 {
        assert!(logs_in(&env, "alice", "s3cret").await);
    }
    assert_eq!(
        callout.password_hashes_computed(),
        3,
        "--credential-cache false: every login runs bcrypt"
    );
    let stats = callout.cache().stats();
    assert_eq!(CacheStats::get(&stats.login_hits), 0, "--login-cache false");
    assert_eq!(CacheStats::get(&stats.credential_hits), 0);
}

#[tokio::test]
async fn metrics_endpoint_counts_logins_and_cache_hits() {
    let env = TestEnv::start_with(crate::common::EnvOptions {
        tweak: |args| args.http_listen = "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
    acme(&env).await;
    caches_live(&env).await;
    let addr = env.http.expect("HTTP endpoints on");
    assert!(logs_in(&env, "alice", "s3cret").await);
    assert!(logs_in(&env, "alice", "s3cret").await);
    assert!(!logs_in(&env, "alice", "wrong").await);

    let (status, body) = crate::common::http_get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let value = |line: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in\n{body}"))
    };
    assert!(value("nats_pg_auth_logins_allowed_total ") >= 2.0);
    assert_eq!(
        value("nats_pg_auth_logins_denied_total{reason=\"bad_password\"} "),
        1.0
    );
    assert!(
        value("nats_pg_auth_cache_lookups_total{cache=\"credentials\",result=\"hit\"} ") >= 1.0,
        "the second login was a credential hit"
    );
    assert_eq!(value("nats_pg_auth_cache_listener_up "), 1.0);

    let (status, body) = crate::common::http_get(addr, "/readyz").await;
    assert!(status.contains("200"), "{status} {body}");
    let (status, _) = crate::common::http_get(addr, "/nope").await;
    assert!(status.contains("404"), "{status}");
}

#[tokio::test]
async fn users_of_one_role_share_one_cached_shape() {
    let env = TestEnv::start().await;
    acme(&env).await;
    env.sql(
        "INSERT INTO nats.users (account_id, role_id, username, password_hash)
           SELECT a.id, r.id, 'bob', crypt('pw', gen_salt('bf', 4))
           FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id WHERE a.name = 'acme'",
    )
    .await;
    let cache = caches_live(&env).await;
    assert!(logs_in(&env, "alice", "s3cret").await);
    assert!(logs_in(&env, "bob", "pw").await);
    let (UserLookup::Hit(alice), UserLookup::Hit(bob)) = (cache.user("alice"), cache.user("bob"))
    else {
        panic!("both logins cached");
    };
    assert!(
        Arc::ptr_eq(&alice.shape, &bob.shape),
        "one copy of role, account, signing key and rights for both"
    );
    assert_eq!(
        &*alice.shape.merged.publish.allow,
        &["sensors.>".to_string()]
    );
}
