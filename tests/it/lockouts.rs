//! Lockouts an operator can see and lift (issue 18, item 5): after `--lockout-failures` wrong
//! passwords `explain` and `user show` say which replica locked the user out and until when,
//! and `user unlock` lets the right password in at once on every replica. Tenants see and lift
//! only their own users' lockouts and cannot forge one.

use std::time::Duration;

use serde_json::Value;

use crate::common::{
    audit_row, http_get, run_cli_async, tenant_admin, url_with_user, wait_until, EnvOptions,
    ServiceProcess, TestEnv,
};

fn locking() -> EnvOptions {
    EnvOptions {
        tweak: |a| {
            a.replica_name = Some("replica-a".into());
            a.lockout_failures = 3;
            a.lockout_duration = Duration::from_secs(3600);
        },
        ..Default::default()
    }
}

async fn cli(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    run_cli_async(args, &env.database_url, "").await
}

async fn lockouts_recorded(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM nats.lockouts")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Wrong passwords for alice until `replicas` replicas have recorded her lockout.
async fn lock_out_alice(env: &TestEnv, replicas: i64) {
    wait_until(
        Duration::from_secs(25),
        "alice to be locked out on every replica",
        || async {
            let _ = env.connect_user("alice", "wrong").await;
            lockouts_recorded(env).await == replicas
        },
    )
    .await;
}

async fn allowed_on(http: std::net::SocketAddr) -> u64 {
    let (_, body) = http_get(http, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix("nats_pg_auth_logins_allowed_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lockout_is_shown_with_replica_and_until_and_user_unlock_lifts_it_everywhere() {
    let env = TestEnv::start_with(locking()).await;
    env.acme().await;
    let b = ServiceProcess::for_env_with(
        &env,
        "b",
        &[
            ("NATS_PG_AUTH_REPLICA_NAME", "replica-b"),
            ("NATS_PG_AUTH_LOCKOUT_FAILURES", "3"),
            ("NATS_PG_AUTH_LOCKOUT_DURATION", "1h"),
        ],
    );
    b.wait_ready(Duration::from_secs(15)).await;
    let (code, text, err) = cli(&env, &["explain", "--user", "alice"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("allowed"), "{text}");

    lock_out_alice(&env, 2).await;
    assert!(
        env.connect_user("alice", "s3cret").await.is_err(),
        "the right password is refused while locked out"
    );

    let (code, text, err) = cli(&env, &["explain", "--user", "alice"]).await;
    assert_eq!(code, Some(77), "{err}");
    assert!(text.contains("denied: locked_out"), "{text}");
    for replica in ["replica-a", "replica-b"] {
        assert!(
            text.contains(&format!("on replica {replica} until 20")),
            "{text}"
        );
    }
    assert!(text.contains("user unlock alice"), "{text}");
    let (_, out, _) = cli(&env, &["explain", "--user", "alice", "--json"]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["deny_reason"], "locked_out");
    assert_eq!(v["lockouts"][0]["replica"], "replica-a");
    assert_eq!(v["lockouts"][1]["replica"], "replica-b");
    assert!(v["lockouts"][0]["locked_until"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(v["lockouts"][0]["failures"], 3);

    let (code, text, err) = cli(&env, &["user", "show", "alice"]).await;
    assert_eq!(code, Some(0), "{err}");
    let line = text
        .lines()
        .find(|l| l.starts_with("lockouts"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("locked out on replica replica-a until 20")
            && line.contains("on replica replica-b until 20"),
        "{line}"
    );
    let (_, out, _) = cli(&env, &["user", "show", "alice", "--json"]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["lockouts"].as_array().unwrap().len(), 2, "{v}");

    let before_a = env.metrics.allowed();
    let before_b = allowed_on(b.http).await;
    let (code, _, err) = cli(&env, &["user", "unlock", "alice"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("unlocked"), "{err}");
    // Each replica lets the right password in (the lockout lasts an hour otherwise).
    wait_until(
        Duration::from_secs(15),
        "both replicas to let alice in",
        || async {
            if let Ok(c) = env.connect_user("alice", "s3cret").await {
                let _ = c.drain().await;
            }
            env.metrics.allowed() > before_a && allowed_on(b.http).await > before_b
        },
    )
    .await;
    assert_eq!(lockouts_recorded(&env).await, 0);
    let (code, text, err) = cli(&env, &["explain", "--user", "alice"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("allowed"), "{text}");
    let (_, text, _) = cli(&env, &["user", "show", "alice"]).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("lockouts") && l.trim_end().ends_with('-')),
        "{text}"
    );
    let (code, _, err) = cli(&env, &["user", "unlock", "nobody"]).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("no user \"nobody\""), "{err}");
}

/// As real LOGIN roles: a tenant sees and lifts its own users' lockouts only, and can forge
/// none (no privilege on nats.lockouts, nor on `requested_by`).
#[tokio::test]
async fn tenants_see_and_lift_only_their_own_users_lockouts() {
    let env = TestEnv::start_with(locking()).await;
    env.acme().await;
    env.sql(
        "INSERT INTO nats.accounts (name) VALUES ('other');
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'bob', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'other';",
    )
    .await;
    let (acme_role, acme) = tenant_admin(&env, "acme").await;
    let (other_role, other) = tenant_admin(&env, "other").await;
    lock_out_alice(&env, 1).await;
    let alice: i64 = sqlx::query_scalar("SELECT id FROM nats.users WHERE username = 'alice'")
        .fetch_one(&env.pool)
        .await
        .unwrap();

    let count = |pool: &sqlx::PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM nats.lockouts")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count(&acme).await, 1, "acme's admin sees alice's lockout");
    assert_eq!(count(&other).await, 0, "another tenant does not");

    // Another tenant cannot lift it, by name or by id.
    let by_name = sqlx::query(
        "INSERT INTO nats.unlock_requests (user_id) SELECT id FROM nats.users WHERE username = 'alice'",
    )
    .execute(&other)
    .await
    .unwrap();
    assert_eq!(by_name.rows_affected(), 0);
    let by_id = sqlx::query("INSERT INTO nats.unlock_requests (user_id) VALUES ($1)")
        .bind(alice)
        .execute(&other)
        .await
        .expect_err("row-level security");
    assert!(by_id.to_string().contains("row-level security"), "{by_id}");
    let url = url_with_user(&env.database_url, &other_role, "pw");
    let (code, _, err) = run_cli_async(&["user", "unlock", "alice"], &url, "").await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("no user \"alice\""), "{err}");

    // Nobody but the service writes lockouts, and `requested_by` is always who asked.
    for (pool, user) in [(&other, "bob"), (&acme, "alice")] {
        let forged = sqlx::query(
            "INSERT INTO nats.lockouts (user_id, replica, failures, locked_until)
             SELECT id, 'forged', 1, now() + interval '1 hour' FROM nats.users WHERE username = $1",
        )
        .bind(user)
        .execute(pool)
        .await
        .expect_err("no privilege");
        assert!(forged.to_string().contains("permission denied"), "{forged}");
    }
    let spoofed =
        sqlx::query("INSERT INTO nats.unlock_requests (user_id, requested_by) VALUES ($1, 'x')")
            .bind(alice)
            .execute(&acme)
            .await
            .expect_err("no column privilege");
    assert!(
        spoofed.to_string().contains("permission denied"),
        "{spoofed}"
    );
    assert!(
        env.connect_user("alice", "s3cret").await.is_err(),
        "still locked out"
    );

    // alice's own tenant lifts it, through the real binary.
    let url = url_with_user(&env.database_url, &acme_role, "pw");
    let (code, _, err) = run_cli_async(&["user", "unlock", "alice"], &url, "").await;
    assert_eq!(code, Some(0), "{err}");
    env.wait_login("alice", "s3cret", Duration::from_secs(5), "alice unlocked")
        .await;
    let audit = audit_row(&env, "user_unlocked", "alice").await;
    assert_eq!(audit["requested_by"], acme_role.as_str());
}

/// A replica that was not following the change log when the unlock was logged (its listener
/// down) lifts the lockout after its next full load: it replays recent unlock requests.
#[tokio::test]
async fn an_unlock_missed_in_the_change_log_is_replayed_after_a_reload() {
    // Every listener reconnect reloads in full (as after a gap past the resume window or on
    // another server history); a reconnect within the window resumes the log instead.
    let env = TestEnv::start_with(EnvOptions {
        tweak: |a| {
            a.replica_name = Some("replica-a".into());
            a.lockout_failures = 3;
            a.lockout_duration = Duration::from_secs(3600);
            a.copy_resume_window = Duration::ZERO;
        },
        ..Default::default()
    })
    .await;
    env.acme().await;
    lock_out_alice(&env, 1).await;
    // The request without its change-log row: what a replica with its listener down misses.
    env.sql(
        "ALTER TABLE nats.unlock_requests DISABLE TRIGGER unlock_requested;
         INSERT INTO nats.unlock_requests (user_id) SELECT id FROM nats.users WHERE username = 'alice';
         ALTER TABLE nats.unlock_requests ENABLE TRIGGER unlock_requested;",
    )
    .await;
    assert!(
        env.connect_user("alice", "s3cret").await.is_err(),
        "not read from the log"
    );
    // The listener reconnects and the copy reloads in full.
    env.sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = '{}' AND datname = current_database()",
        nats_pg_auth::copy::LISTENER_APPLICATION_NAME
    ))
    .await;
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "the unlock to be replayed after the reload",
    )
    .await;
}
