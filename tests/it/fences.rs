//! Fences between tenants (issue 15): a tenant admin, connected as a real LOGIN role granted
//! `nats_pg_auth_tenant`, cannot call the service's functions, bind another tenant's device
//! key, learn other tenants' role or private export names from errors, or grow what every
//! replica holds without bound.

use std::time::Duration;

use async_nats::ConnectOptions;
use nkeys::KeyPair;
use sqlx::PgPool;

use crate::common::{
    create_login_role, is_auth_refusal, tenant_admin, user_info, wait_until, TestEnv,
};

async fn ok(pool: &PgPool, sql: &str) -> u64 {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
        .rows_affected()
}

/// The error text of `sql`, which must fail.
async fn error_of(pool: &PgPool, sql: &str) -> String {
    match sqlx::raw_sql(sql).execute(pool).await {
        Ok(_) => panic!("SQL unexpectedly succeeded:\n{sql}"),
        Err(e) => match e.as_database_error() {
            Some(d) => d.message().to_owned(),
            None => e.to_string(),
        },
    }
}

async fn refused(pool: &PgPool, sql: &str, fragment: &str) {
    let err = error_of(pool, sql).await;
    assert!(
        err.contains(fragment),
        "{sql}\n  -> {err}\n  (expected \"{fragment}\")"
    );
}

async fn id_of(env: &TestEnv, account: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM nats.accounts WHERE name = $1")
        .bind(account)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn operator_admin(env: &TestEnv) -> PgPool {
    let (_, url) = create_login_role(&env.pool, &env.database_url, "nats_pg_auth_admin").await;
    PgPool::connect(&url).await.expect("connect as admin")
}

/// acme (from `TestEnv::acme`) and globex, whose role `device` may ask who it is.
async fn two_tenants() -> TestEnv {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql(
        "INSERT INTO nats.accounts (name) VALUES ('globex');
         INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
           SELECT id, 'globex-staff-secret', '{$SYS.REQ.USER.INFO}', '{_INBOX.>}' FROM nats.accounts WHERE name = 'globex';",
    )
    .await;
    env.wait_synced("globex").await;
    env
}

#[tokio::test]
async fn a_tenant_cannot_call_the_service_functions_and_its_own_writes_still_pass_the_checks() {
    let env = two_tenants().await;
    let globex = id_of(&env, "globex").await;
    let acme = id_of(&env, "acme").await;
    let (_, t) = tenant_admin(&env, "acme").await;

    // The function runs as its owner and writes any account's outbox row: not for tenants.
    for account in [globex, acme] {
        refused(
            &t,
            &format!("SELECT nats.enqueue_account_sync({account}, repeat('x', 100000))"),
            "permission denied for function enqueue_account_sync",
        )
        .await;
    }
    for sql in [
        "SELECT nats.owning_accounts(1, 2)",
        "SELECT nats.account_admin_view(a) FROM nats.accounts a",
    ] {
        refused(&t, sql, "permission denied for function").await;
    }
    let long: i64 =
        sqlx::query_scalar("SELECT count(*) FROM nats.sync_outbox WHERE length(reason) > 256")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(long, 0, "nothing was queued");
    // Its own rotation rows: with a bounded reason.
    refused(
        &t,
        &format!(
            "INSERT INTO nats.sync_outbox (account_id, op, reason) VALUES ({acme}, 'rotate', repeat('x', 257))"
        ),
        "outbox_reason_at_most_256_characters",
    )
    .await;

    // What the CHECK constraints, policies and explaining triggers call runs with the tenant's
    // privileges: its everyday writes still work, and bad rows still get their clear errors.
    ok(
        &t,
        &format!(
            "INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions, subscribe_deny_permissions)
               VALUES ({acme}, 'ops', '{{ops.>}}', '{{ops.> workers}}', '{{ops.secret}}');
             INSERT INTO nats.users (account_id, role_id, username, password_hash, publish_permissions)
               SELECT {acme}, id, 'bob', crypt('pw', gen_salt('bf', 4)), '{{bob.>}}' FROM nats.roles WHERE name = 'ops';
             INSERT INTO nats.user_tokens (user_id, token_sha256) SELECT id, digest('bobs', 'sha256') FROM nats.users WHERE username = 'bob';
             UPDATE nats.users SET subscribe_permissions = '{{bob.in}}', description = 'b' WHERE username = 'bob';
             INSERT INTO nats.account_exports (account_id, name, subject, type) VALUES ({acme}, 'svc', 'svc.>', 'service');
             INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, type)
               VALUES ({acme}, 'in', 'gsvc.>', {globex}, 'service');
             SELECT nats.rotate_signing_key('acme');"
        ),
    )
    .await;
    refused(
        &t,
        "UPDATE nats.users SET publish_permissions = '{bad..subject}' WHERE username = 'bob'",
        "invalid publish_permissions entry",
    )
    .await;
    refused(
        &t,
        "UPDATE nats.users SET password_hash = 'plaintext' WHERE username = 'bob'",
        "password_hash_is_bcrypt_or_argon2id",
    )
    .await;
    env.wait_login(
        "bob",
        "pw",
        Duration::from_secs(5),
        "bob, added by the tenant",
    )
    .await;
    ok(
        &t,
        "DELETE FROM nats.users WHERE username = 'bob'; DELETE FROM nats.roles WHERE name = 'ops'",
    )
    .await;
}

#[tokio::test]
async fn a_tenant_cannot_bind_a_device_nkey_but_an_operator_can_and_the_tenant_can_clear_it() {
    let env = two_tenants().await;
    let acme = id_of(&env, "acme").await;
    let globex = id_of(&env, "globex").await;
    let (_, thief) = tenant_admin(&env, "acme").await;
    let (_, owner) = tenant_admin(&env, "globex").await;
    let admin = operator_admin(&env).await;
    // globex's device: its public key is public (it is in the device's configuration, on the
    // wire, in logs).
    let device = KeyPair::new_user();
    let pk = device.public_key();

    // acme's tenant admin tries to take it, by insert or by update; with any key at all.
    refused(
        &thief,
        &format!(
            "INSERT INTO nats.users (account_id, username, nkey) VALUES ({acme}, 'trap', '{pk}')"
        ),
        "ask an operator (a role with nats_pg_auth_admin)",
    )
    .await;
    ok(
        &thief,
        &format!("INSERT INTO nats.users (account_id, username) VALUES ({acme}, 'trap')"),
    )
    .await;
    refused(
        &thief,
        &format!("UPDATE nats.users SET nkey = '{pk}' WHERE username = 'trap'"),
        "a tenant admin cannot set users.nkey",
    )
    .await;
    let own = KeyPair::new_user().public_key();
    refused(
        &thief,
        &format!("UPDATE nats.users SET nkey = '{own}' WHERE username = 'trap'"),
        "a tenant admin cannot set users.nkey",
    )
    .await;
    // globex's own tenant admin cannot bind it either: the operator vouches for devices.
    refused(
        &owner,
        &format!(
            "INSERT INTO nats.users (account_id, role_id, username, nkey)
               SELECT {globex}, id, 'sensor-9', '{pk}' FROM nats.roles WHERE name = 'globex-staff-secret'"
        ),
        "ask an operator",
    )
    .await;
    ok(
        &owner,
        &format!(
            "INSERT INTO nats.users (account_id, role_id, username)
               SELECT {globex}, id, 'sensor-9' FROM nats.roles WHERE name = 'globex-staff-secret'"
        ),
    )
    .await;
    // The operator binds it; the device logs into globex, as sensor-9.
    ok(
        &admin,
        &format!("UPDATE nats.users SET nkey = '{pk}' WHERE username = 'sensor-9'"),
    )
    .await;
    let seed = device.seed().unwrap();
    let url = env.url();
    let connect = || {
        let (seed, url) = (seed.clone(), url.clone());
        async move { ConnectOptions::with_nkey(seed).connect(url).await }
    };
    wait_until(Duration::from_secs(5), "the bound device to log in", || {
        let c = connect();
        async move { c.await.is_ok() }
    })
    .await;
    let client = connect().await.unwrap();
    let info = user_info(&client).await;
    assert_eq!(info["user"], "sensor-9", "{info}");
    assert_eq!(info["account"], env.account_key("globex").await, "{info}");
    drop(client);
    // The tenant sees the binding and may remove it: the device is refused from then on.
    let seen: Option<String> =
        sqlx::query_scalar("SELECT nkey FROM nats.users WHERE username = 'sensor-9'")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!(seen.as_deref(), Some(pk.as_str()));
    ok(
        &owner,
        "UPDATE nats.users SET nkey = NULL WHERE username = 'sensor-9'",
    )
    .await;
    wait_until(
        Duration::from_secs(5),
        "the cleared key to be refused",
        || {
            let c = connect();
            async move { matches!(c.await, Err(e) if is_auth_refusal(&e)) }
        },
    )
    .await;
}

#[tokio::test]
async fn errors_name_no_other_tenants_roles_or_private_exports() {
    let env = two_tenants().await;
    let acme = id_of(&env, "acme").await;
    let globex = id_of(&env, "globex").await;
    let (_, t) = tenant_admin(&env, "acme").await;
    let staff: i64 =
        sqlx::query_scalar("SELECT id FROM nats.roles WHERE name = 'globex-staff-secret'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    // Another tenant's role id and an id that exists nowhere get the same answer.
    let mut answers = vec![];
    for id in [staff, staff + 1000] {
        for sql in [
            format!("UPDATE nats.users SET role_id = {id} WHERE username = 'alice'"),
            format!("INSERT INTO nats.users (account_id, role_id, username) VALUES ({acme}, {id}, 'probe')"),
        ] {
            let err = error_of(&t, &sql).await;
            assert!(err.contains("no such role in this account"), "{err}");
            assert!(!err.contains("globex-staff-secret"), "{err}");
            assert!(!err.contains(&format!("account {globex}")), "{err}");
            answers.push(err.replace(&id.to_string(), "<id>"));
        }
    }
    assert_eq!(answers[0], answers[2], "no existence oracle");
    assert_eq!(answers[1], answers[3], "no existence oracle");

    // globex's private export, not granted to acme: acme's import error says nothing about it.
    env.sql(&format!(
        "INSERT INTO nats.account_exports (account_id, name, subject, type, token_req)
           VALUES ({globex}, 'globex-secret-feed', 'feed.>', 'stream', true)"
    ))
    .await;
    for (name, subject) in [("probe-private", "feed.x"), ("probe-nothing", "nothing.x")] {
        ok(
            &t,
            &format!(
                "INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, type)
                   VALUES ({acme}, '{name}', '{subject}', {globex}, 'stream')"
            ),
        )
        .await;
        crate::tenancy::wait_import_state(&env, name, true).await;
    }
    let private: String = sqlx::query_scalar(
        "SELECT sync_error FROM nats.account_imports WHERE name = 'probe-private'",
    )
    .fetch_one(&t)
    .await
    .unwrap();
    let nothing: String = sqlx::query_scalar(
        "SELECT sync_error FROM nats.account_imports WHERE name = 'probe-nothing'",
    )
    .fetch_one(&t)
    .await
    .unwrap();
    assert!(!private.contains("globex-secret-feed"), "{private}");
    assert!(
        private.contains("public or granted to this account"),
        "{private}"
    );
    assert_eq!(
        private.replace("feed.x", "S"),
        nothing.replace("nothing.x", "S"),
        "a private export not granted reads as no export at all"
    );
}

#[tokio::test]
async fn sizes_a_tenant_writes_are_bounded() {
    let env = two_tenants().await;
    let acme = id_of(&env, "acme").await;
    let (role, t) = tenant_admin(&env, "acme").await;
    let admin = operator_admin(&env).await;

    // Permission arrays: 1000 entries pass, 1001 or 50,000 do not; nor a 513-character entry.
    ok(
        &t,
        &format!(
            "INSERT INTO nats.roles (account_id, name, publish_permissions)
               SELECT {acme}, 'wide', array_agg('s.' || g) FROM generate_series(1, 1000) g"
        ),
    )
    .await;
    for n in [1001, 50_000] {
        for col in ["publish_permissions", "subscribe_deny_permissions"] {
            refused(
                &t,
                &format!(
                    "UPDATE nats.roles SET {col} = (SELECT array_agg('s.' || g) FROM generate_series(1, {n}) g) WHERE name = 'wide'"
                ),
                &format!("role \"wide\" has {n} entries in {col}; at most 1000 are allowed"),
            )
            .await;
        }
        refused(
            &t,
            &format!(
                "UPDATE nats.users SET subscribe_permissions = (SELECT array_agg('s.' || g) FROM generate_series(1, {n}) g) WHERE username = 'alice'"
            ),
            &format!("user \"alice\" has {n} entries in subscribe_permissions; at most 1000"),
        )
        .await;
    }
    refused(
        &t,
        "UPDATE nats.roles SET publish_permissions = ARRAY[repeat('a', 513)] WHERE name = 'wide'",
        "an entry of 513 characters in publish_permissions; at most 512",
    )
    .await;
    refused(
        &t,
        "UPDATE nats.roles SET allowed_sources = (SELECT array_agg(('10.0.' || g || '.0/24')::cidr) FROM generate_series(1, 101) g) WHERE name = 'wide'",
        "has 101 entries in allowed_sources; at most 100",
    )
    .await;
    refused(
        &t,
        "UPDATE nats.roles SET allowed_connection_types = array_fill('MQTT'::text, ARRAY[50000]) WHERE name = 'wide'",
        "has 50000 entries in allowed_connection_types; at most 16",
    )
    .await;
    refused(
        &t,
        "UPDATE nats.users SET description = repeat('d', 1025) WHERE username = 'alice'",
        "user_description_at_most_1024_characters",
    )
    .await;

    // Users per account: set by the operator, not by the tenant.
    refused(
        &t,
        "UPDATE nats.accounts SET max_users = -1 WHERE name = 'acme'",
        "permission denied",
    )
    .await;
    ok(
        &admin,
        "UPDATE nats.accounts SET max_users = 3 WHERE name = 'acme'",
    )
    .await;
    ok(
        &t,
        &format!(
            "INSERT INTO nats.users (account_id, username) VALUES ({acme}, 'u2'), ({acme}, 'u3')"
        ),
    )
    .await;
    let err = error_of(
        &t,
        &format!("INSERT INTO nats.users (account_id, username) VALUES ({acme}, 'u4')"),
    )
    .await;
    assert_eq!(
        err,
        "account acme allows at most 3 users (max_users); ask an operator to raise it"
    );
    // Two inserts racing for the last place: the second waits for the first and is refused.
    ok(
        &admin,
        "UPDATE nats.accounts SET max_users = 4 WHERE name = 'acme'",
    )
    .await;
    let mut first = t.begin().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO nats.users (account_id, username) VALUES ({acme}, 'u4')"
    ))
    .execute(&mut *first)
    .await
    .unwrap();
    let t2 = t.clone();
    let second = tokio::spawn(async move {
        sqlx::query(&format!(
            "INSERT INTO nats.users (account_id, username) VALUES ({acme}, 'u5')"
        ))
        .execute(&t2)
        .await
        .map_err(|e| e.as_database_error().unwrap().message().to_owned())
    });
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(5), "the second insert to wait for the first", || {
        let (pool, role) = (pool.clone(), role.clone());
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND wait_event_type = 'Lock'",
            )
            .bind(role)
            .fetch_one(&pool)
            .await
            .unwrap()
                == 1
        }
    })
    .await;
    first.commit().await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the second insert ends once the first committed")
        .unwrap();
    assert_eq!(
        res.unwrap_err(),
        "account acme allows at most 4 users (max_users); ask an operator to raise it"
    );
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.users WHERE account_id = $1")
        .bind(acme)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(users, 4);
    ok(
        &admin,
        "UPDATE nats.accounts SET max_users = 5 WHERE name = 'acme'",
    )
    .await;
    ok(
        &t,
        &format!("INSERT INTO nats.users (account_id, username) VALUES ({acme}, 'u5')"),
    )
    .await;

    // Tokens per user: 100.
    ok(
        &t,
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT u.id, digest('u2-' || g, 'sha256') FROM nats.users u, generate_series(1, 100) g WHERE u.username = 'u2'",
    )
    .await;
    refused(
        &t,
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('u2-101', 'sha256') FROM nats.users WHERE username = 'u2'",
        "user \"u2\" already has 100 rows in nats.user_tokens, the most allowed per user",
    )
    .await;
    // Certificate mappings per user (written by the operator): 100.
    ok(
        &admin,
        "INSERT INTO nats.user_certificates (user_id, san)
           SELECT u.id, 'dns:d' || g || '.acme.example' FROM nats.users u, generate_series(1, 100) g
           WHERE u.username = 'u2'",
    )
    .await;
    refused(
        &admin,
        "INSERT INTO nats.user_certificates (user_id, san)
           SELECT id, 'dns:d101.acme.example' FROM nats.users WHERE username = 'u2'",
        "user \"u2\" already has 100 rows in nats.user_certificates",
    )
    .await;
}
