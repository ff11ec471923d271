//! The login copy: while Postgres is unreachable, known users still log in (from the copy,
//! with a short JWT), and nothing else does.

use std::sync::Arc;
use std::time::Duration;

use nats_pg_auth::copy::{CacheStats, LoginCache};

use crate::common::{is_auth_refusal, user_info, wait_until, DbOutage, EnvOptions, TestEnv};

fn cache(env: &TestEnv) -> Arc<LoginCache> {
    env.callout.as_ref().expect("service").cache().clone()
}

async fn copy_holds(env: &TestEnv, users: &'static [&'static str], tokens: usize) {
    let c = cache(env);
    wait_until(
        Duration::from_secs(5),
        "the copy to hold every user, each re-read after its last change",
        || {
            let c = c.clone();
            async move {
                c.is_live()
                    && c.copy_size() == (users.len(), tokens)
                    && users
                        .iter()
                        .all(|u| matches!(c.copy_user(u), nats_pg_auth::copy::CopyLookup::Found(_)))
            }
        },
    )
    .await;
}

/// Users and a token nobody has used yet: the copy holds them all, not only those seen.
async fn tenants(env: &TestEnv) {
    env.acme().await;
    env.sql(
        "INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
           SELECT id, 'ops', '{ops.>,$SYS.REQ.USER.INFO}', '{_INBOX.>}' FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.users (account_id, role_id, username, password_hash, active)
           SELECT a.id, r.id, u.name, crypt('pw', gen_salt('bf', 4)), u.active
           FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id AND r.name = 'ops',
                (VALUES ('bob', true), ('carol', false), ('dave', true)) AS u(name, active)
           WHERE a.name = 'acme';
         INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('bobs-token', 'sha256') FROM nats.users WHERE username = 'bob';
         INSERT INTO nats.user_tokens (user_id, token_sha256, revoked_at)
           SELECT id, digest('revoked-token', 'sha256'), now() FROM nats.users WHERE username = 'bob';",
    )
    .await;
    copy_holds(env, &["alice", "bob", "carol", "dave"], 2).await;
}

#[tokio::test]
async fn known_users_log_in_from_the_copy_while_postgres_is_unreachable() {
    let env = TestEnv::start().await;
    tenants(&env).await;
    // A change just before the outage is in the copy: dave's password changes, then Postgres
    // goes away.
    let c = cache(&env);
    let hash_of = |c: &LoginCache| match c.copy_user("dave") {
        nats_pg_auth::copy::CopyLookup::Found(l) => l.password_hash.clone(),
        _ => None,
    };
    let old_hash = hash_of(&c);
    assert!(old_hash.is_some(), "dave is in the copy");
    env.sql("UPDATE nats.users SET password_hash = crypt('new-pw', gen_salt('bf', 4)) WHERE username = 'dave'")
        .await;
    wait_until(Duration::from_secs(5), "the change to be applied", || {
        let c = c.clone();
        let old_hash = old_hash.clone();
        async move { hash_of(&c).is_some_and(|h| Some(h) != old_hash) }
    })
    .await;

    let acme_key = env.account_key("acme").await;
    let outage = DbOutage::begin(&env).await;
    // Bob never logged in before: the copy holds him anyway.
    let bob = env
        .connect_user("bob", "pw")
        .await
        .expect("a known user logs in without Postgres");
    let info = user_info(&bob).await;
    assert_eq!(info["account"].as_str(), Some(acme_key.as_str()));
    let expires_ns = info["expires"].as_i64().expect("the JWT expires");
    assert!(
        expires_ns > 0 && expires_ns <= 300_000_000_000,
        "JWT lifetime capped by --db-outage-ttl (5m): {expires_ns} ns"
    );
    env.connect_token("bobs-token")
        .await
        .expect("a valid token logs in without Postgres");
    env.connect_user("dave", "new-pw")
        .await
        .expect("the change made just before the outage holds");

    for (user, pass, why) in [
        ("bob", "wrong", "wrong password"),
        ("nobody", "pw", "unknown user"),
        ("carol", "pw", "inactive user"),
        ("dave", "pw", "old password"),
    ] {
        let err = env
            .connect_user(user, pass)
            .await
            .err()
            .unwrap_or_else(|| panic!("{why} refused"));
        assert!(is_auth_refusal(&err), "{why}: {err}");
    }
    for token in ["revoked-token", "no-such-token"] {
        let err = env.connect_token(token).await.expect_err("refused");
        assert!(is_auth_refusal(&err), "{token}: {err}");
    }
    assert!(c.in_outage(), "outage mode entered");
    assert!(CacheStats::get(&c.stats().logins_from_copy) >= 3);
    assert!(env.metrics.denied("unknown_user") >= 1);
    assert!(env.metrics.denied("bad_password") >= 2);
    assert!(env.metrics.denied("inactive_user") >= 1);
    assert!(env.metrics.denied("token_revoked") >= 1);
    assert!(env.metrics.denied("unknown_token") >= 1);

    outage.end().await;
    wait_until(
        Duration::from_secs(15),
        "the copy to be current again",
        || {
            let c = c.clone();
            async move { c.is_live() && !c.in_outage() }
        },
    )
    .await;
    // Back to normal: a change is seen by the next login.
    env.sql("UPDATE nats.users SET active = false WHERE username = 'bob'")
        .await;
    wait_until(Duration::from_secs(5), "bob's deactivation to hold", || {
        let env = &env;
        async move { env.connect_user("bob", "pw").await.is_err() }
    })
    .await;
    let before = CacheStats::get(&c.stats().logins_from_copy);
    env.connect_user("alice", "s3cret").await.expect("alice");
    assert_eq!(
        CacheStats::get(&c.stats().logins_from_copy),
        before,
        "not from the copy once Postgres is back"
    );
}

#[tokio::test]
async fn grace_zero_means_no_logins_without_postgres() {
    let env = TestEnv::start_with(EnvOptions {
        tweak: |a| a.db_outage_grace = Duration::ZERO,
        ..Default::default()
    })
    .await;
    tenants(&env).await;
    let outage = DbOutage::begin(&env).await;
    let err = env.connect_user("bob", "pw").await.expect_err("refused");
    assert!(is_auth_refusal(&err), "{err}");
    assert!(env.metrics.denied("internal_error") >= 1);
    outage.end().await;
    env.wait_login(
        "bob",
        "pw",
        Duration::from_secs(15),
        "logins after Postgres returns",
    )
    .await;
}

#[tokio::test]
async fn a_user_changed_in_bulk_is_reread_with_its_role() {
    // A role change reaches every user of the role in the copy, not only those who log in.
    let env = TestEnv::start().await;
    tenants(&env).await;
    env.sql("UPDATE nats.roles SET publish_permissions = '{other.>,$SYS.REQ.USER.INFO}' WHERE name = 'ops'")
        .await;
    let c = cache(&env);
    wait_until(
        Duration::from_secs(5),
        "the role change to reach the copy",
        || {
            let c = c.clone();
            async move {
                match c.copy_user("dave") {
                    nats_pg_auth::copy::CopyLookup::Found(l) => {
                        l.shape.merged.publish.allow.iter().any(|s| s == "other.>")
                    }
                    _ => false,
                }
            }
        },
    )
    .await;
    let outage = DbOutage::begin(&env).await;
    let dave = env.connect_user("dave", "pw").await.expect("dave");
    let info = user_info(&dave).await;
    let allow = info["permissions"]["publish"]["allow"].to_string();
    assert!(
        allow.contains("other.>"),
        "new role rights from the copy: {allow}"
    );
    outage.end().await;
}

#[tokio::test]
async fn a_replica_started_while_postgres_is_down_says_so_waits_and_then_serves() {
    let mut env = TestEnv::start().await;
    tenants(&env).await;
    // Only the process answers logins in this test.
    env.stop_service().await;
    let outage = DbOutage::begin(&env).await;
    let mut replica = crate::common::ServiceProcess::for_env(&env, "late");
    wait_until(
        Duration::from_secs(20),
        "the replica to say it waits",
        || {
            let log = replica.log();
            async move { log.contains("answers no logins until it has loaded a copy") }
        },
    )
    .await;
    let err = env
        .connect_user("bob", "pw")
        .await
        .expect_err("nothing answers without a copy");
    assert!(is_auth_refusal(&err), "{err}");
    outage.end().await;
    replica.wait_ready(Duration::from_secs(20)).await;
    env.wait_login(
        "bob",
        "pw",
        Duration::from_secs(10),
        "bob logs in through the late replica",
    )
    .await;
    let log = replica.log();
    assert_eq!(
        log.matches("answers no logins until it has loaded a copy")
            .count(),
        1,
        "said once, not once per retry:\n{log}"
    );
    replica.signal(rustix::process::Signal::TERM);
    let status = replica.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{log}");
}

/// Issue 15 (7): /readyz is reachable by whoever reaches the port (the pod network), so when
/// Postgres fails it says what kind of failure, never the driver's text (database, role and
/// host names, the server's message).
#[tokio::test]
async fn readyz_names_the_kind_of_postgres_failure_and_nothing_more() {
    let env = TestEnv::start_with(EnvOptions {
        tweak: |args| args.http_listen = "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
    tenants(&env).await;
    let addr = env.http.expect("HTTP endpoints on");
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let outage = DbOutage::begin(&env).await;
    let started = std::time::Instant::now();
    let body = loop {
        let (_, body) = crate::common::http_get(addr, "/readyz").await;
        if body.contains("mode: outage") || started.elapsed() > Duration::from_secs(10) {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    outage.end().await;
    assert!(body.starts_with("ready\n"), "the copy answers: {body}");
    assert!(
        body.contains("Postgres refused the check (SQLSTATE 55000)"),
        "{body}"
    );
    assert!(!body.contains(&db), "no database name: {body}");
    assert!(!body.contains("error returned from database"), "{body}");
}
