//! Who gets in, into which account, with which permissions — through the real callout.

use std::time::Duration;

use async_nats::Event;
use futures::StreamExt;

use crate::common::{expect_violation, is_auth_refusal, user_info, wait_until, TestEnv};

#[tokio::test]
async fn password_login_places_alice_in_acme_with_role_permissions() {
    let env = TestEnv::start().await;
    env.acme().await;
    let acme = env.account_key("acme").await;

    let (alice, mut events) = env
        .connect_user_events("alice", "s3cret")
        .await
        .expect("alice logs in");
    assert_eq!(
        env.connected_users("acme").await,
        vec!["alice".to_string()],
        "alice is placed in acme ({acme})"
    );

    // Allowed: publish on sensors.> reaches a subscriber of the same account.
    let mut sub = alice.subscribe("sensors.>").await.unwrap();
    alice.publish("sensors.t1", "21.5".into()).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .expect("message delivered")
        .unwrap();
    assert_eq!(&msg.payload[..], b"21.5");

    // Denied: publish outside the role.
    alice.publish("admin.reboot", "x".into()).await.unwrap();
    alice.flush().await.unwrap();
    expect_violation(&mut events, "admin.reboot").await;
}

#[tokio::test]
async fn deny_beats_allow_and_user_permissions_add_to_the_role() {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql(
        "UPDATE nats.users SET publish_deny_permissions = '{sensors.secret}', publish_permissions = '{alerts.>}'
         WHERE username = 'alice'",
    )
    .await;
    env.add_watcher("acme", "watcher").await;
    let watcher = env.connect_user("watcher", "pw").await.unwrap();
    let mut seen = watcher.subscribe(">").await.unwrap();
    crate::common::settle(&watcher).await;
    // `>` also saw settle's probe on the watcher's own inbox.
    let probe = seen.next().await.unwrap();
    assert!(probe.subject.starts_with("_INBOX."));
    let (alice, mut events) = env.connect_user_events("alice", "s3cret").await.unwrap();
    alice.publish("sensors.secret", "no".into()).await.unwrap();
    alice.publish("sensors.open", "yes".into()).await.unwrap();
    alice
        .publish("alerts.fire", "user-level allow".into())
        .await
        .unwrap();
    alice.flush().await.unwrap();
    expect_violation(&mut events, "sensors.secret").await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(2), seen.next())
            .await
            .expect("messages arrive")
            .unwrap();
        got.push(msg.subject.to_string());
    }
    assert_eq!(
        got,
        vec!["sensors.open", "alerts.fire"],
        "role and user allows both work; the denied one never arrives"
    );
    let extra = tokio::time::timeout(Duration::from_millis(300), seen.next()).await;
    assert!(
        extra.is_err(),
        "nothing else arrives: {:?}",
        extra.map(|m| m.map(|m| m.subject))
    );
}

#[tokio::test]
async fn token_login_and_token_refusals() {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256, description)
           SELECT id, digest('tok-live', 'sha256'), 'live' FROM nats.users WHERE username = 'alice';
         INSERT INTO nats.user_tokens (user_id, token_sha256, expires_at)
           SELECT id, digest('tok-expired', 'sha256'), now() - interval '1 minute' FROM nats.users WHERE username = 'alice';
         INSERT INTO nats.user_tokens (user_id, token_sha256, revoked_at)
           SELECT id, digest('tok-revoked', 'sha256'), now() - interval '1 second' FROM nats.users WHERE username = 'alice';",
    )
    .await;
    let _client = env.connect_token("tok-live").await.expect("token login");
    assert_eq!(
        env.connected_users("acme").await,
        vec!["alice".to_string()],
        "the token logs in as alice, in acme"
    );

    for bad in ["tok-expired", "tok-revoked", "tok-unknown"] {
        let err = env.connect_token(bad).await.expect_err(bad);
        assert!(is_auth_refusal(&err), "{bad}: {err}");
    }
    assert_eq!(env.metrics.denied("token_expired"), 1);
    assert_eq!(env.metrics.denied("token_revoked"), 1);
    assert_eq!(env.metrics.denied("unknown_token"), 1);
}

#[tokio::test]
async fn bad_credentials_and_inactive_rows_are_refused() {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql(
        "INSERT INTO nats.users (account_id, username, password_hash, active)
           SELECT id, 'sleepy', crypt('pw', gen_salt('bf', 4)), false FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.accounts (name, active) VALUES ('closed', false);
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'carol', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'closed';",
    )
    .await;
    env.wait_synced("closed").await;

    for (user, pass, reason) in [
        ("alice", "wrong", "bad_password"),
        ("nobody", "s3cret", "unknown_user"),
        ("sleepy", "pw", "inactive_user"),
        ("carol", "pw", "inactive_account"),
    ] {
        let err = env.connect_user(user, pass).await.expect_err(user);
        assert!(is_auth_refusal(&err), "{user}: {err}");
        assert_eq!(env.metrics.denied(reason), 1, "{user} denied as {reason}");
    }
    // Still works for the good user after all those refusals.
    env.connect_user("alice", "s3cret")
        .await
        .expect("alice still gets in");
}

#[tokio::test]
async fn account_inserted_while_running_is_usable_within_two_seconds() {
    let env = TestEnv::start().await;
    env.acme().await; // the service is up and synced
    let started = std::time::Instant::now();
    env.sql(
        "INSERT INTO nats.accounts (name) VALUES ('globex');
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'gina', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'globex';",
    )
    .await;
    env.wait_login("gina", "pw", Duration::from_secs(2), "gina to log in")
        .await;
    eprintln!("new account usable after {:?}", started.elapsed());
    let gina = env.connect_user("gina", "pw").await.unwrap();
    assert_eq!(
        user_info(&gina).await["account"],
        env.account_key("globex").await.as_str()
    );
    // No permissions anywhere → the defaults (pub/sub `>`).
    assert_eq!(
        user_info(&gina).await["permissions"]["publish"]["allow"],
        serde_json::json!([">"])
    );
}

#[tokio::test]
async fn max_connections_update_limits_the_account() {
    let env = TestEnv::start().await;
    env.acme().await;
    let before = env.account_key("acme").await;
    env.sql("UPDATE nats.accounts SET max_connections = 1 WHERE name = 'acme'")
        .await;
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(5), "the new limit to be pushed", || {
        let pool = pool.clone();
        async move {
            let jwt: Option<String> = sqlx::query_scalar(
                "SELECT jwt FROM nats.accounts WHERE name = 'acme' AND sync_error IS NULL",
            )
            .fetch_one(&pool)
            .await
            .ok()
            .flatten();
            jwt.and_then(|j| nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(&j).ok())
                .is_some_and(|c| c.nats["limits"]["conn"] == 1)
        }
    })
    .await;
    assert_eq!(
        env.account_key("acme").await,
        before,
        "keys are kept across updates"
    );
    let _first = env
        .connect_user("alice", "s3cret")
        .await
        .expect("first connection");
    let second = env.connect_user("alice", "s3cret").await;
    assert!(
        second.is_err(),
        "second connection must be refused by max_connections = 1"
    );
}

#[tokio::test]
async fn short_ttl_user_is_disconnected_and_reconnects_through_the_callout() {
    let env = TestEnv::start().await;
    env.acme().await;
    // Set on the account (user and role have none, so it applies): changing the user row would
    // also kick alice's fresh connection (session control), which is not what this test is about.
    env.sql("UPDATE nats.accounts SET user_jwt_ttl = interval '2 seconds' WHERE name = 'acme'")
        .await;
    env.wait_synced("acme").await;
    let (alice, mut events) = env.connect_user_events("alice", "s3cret").await.unwrap();
    let allowed_before = env.metrics.allowed();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let (mut disconnected, mut reconnected) = (false, false);
    while !(disconnected && reconnected) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Disconnected)) => disconnected = true,
            Ok(Some(Event::Connected)) if disconnected => reconnected = true,
            Ok(Some(_)) => {}
            _ => panic!("expected expiry disconnect and reconnect (disconnected={disconnected})"),
        }
    }
    assert!(
        env.metrics.allowed() > allowed_before,
        "the reconnect went through the callout"
    );
    alice.flush().await.expect("the reconnected client works");
    assert_eq!(env.connected_users("acme").await, vec!["alice".to_string()]);
}

#[tokio::test]
async fn logins_work_again_after_a_server_restart_with_an_empty_resolver() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.nats.restart(true).await;
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "alice to log in after the restart",
    )
    .await;
}

#[tokio::test]
async fn a_role_from_another_account_is_refused_by_sql() {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql("INSERT INTO nats.accounts (name) VALUES ('other')")
        .await;
    let err = env
        .sql_err(
            "INSERT INTO nats.users (account_id, role_id, username, password_hash)
               SELECT a.id, r.id, 'mallory', crypt('pw', gen_salt('bf', 4))
               FROM nats.accounts a, nats.roles r WHERE a.name = 'other' AND r.name = 'sensor'",
        )
        .await;
    assert!(
        err.contains("user \"mallory\": no such role in this account"),
        "clear error: {err}"
    );
}

#[tokio::test]
async fn repeated_wrong_passwords_lock_the_user_out_for_a_while() {
    let env = TestEnv::start_with(crate::common::EnvOptions {
        tweak: |args| {
            args.lockout_failures = 3;
            args.lockout_duration = Duration::from_secs(3);
        },
        ..Default::default()
    })
    .await;
    env.acme().await;
    env.add_watcher("acme", "watcher").await;
    let callout = env.callout.clone().unwrap();
    let started = std::time::Instant::now();
    for _ in 0..3 {
        assert!(env.connect_user("alice", "guess").await.is_err());
    }
    assert_eq!(env.metrics.denied("bad_password"), 3);
    let hashes = callout.password_hashes_computed();

    // Locked: even the right password is refused, and no bcrypt runs for it.
    let err = env
        .connect_user("alice", "s3cret")
        .await
        .expect_err("locked out");
    assert!(is_auth_refusal(&err), "{err}");
    assert_eq!(env.metrics.denied("locked_out"), 1);
    assert_eq!(
        callout.password_hashes_computed(),
        hashes,
        "refused without hashing"
    );
    let audit = crate::common::audit_row(&env, "user_locked_out", "alice").await;
    assert_eq!(audit["failures"], 3);
    // Other users are not affected.
    env.connect_user("watcher", "pw")
        .await
        .expect("another user still logs in");

    // When the lockout ends (3 s after the first failure), the right password works again.
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(6),
        "alice back after the lockout",
    )
    .await;
    assert!(started.elapsed() >= Duration::from_secs(3));
}
