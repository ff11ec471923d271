//! The SQL surface as a trust boundary (issue 8): the sync never pushes or deletes what a row
//! says when the row could not have come from it, and the roles shipped with the migrations
//! (service, admin, tenant) can do what they promise and nothing more. Every role test connects
//! as a real LOGIN role.

use std::time::Duration;

use nats_pg_auth::db::identities::IdentityKind;
use nats_pg_auth::init::ServiceIdentities;
use sqlx::PgPool;

use crate::common::{audit_row, create_login_role, wait_until, EnvOptions, TestEnv};

async fn sync_error(env: &TestEnv, account: &str) -> Option<String> {
    sqlx::query_scalar("SELECT sync_error FROM nats.accounts WHERE name = $1")
        .bind(account)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The JWT nats-server serves for an account key.
async fn served_jwt(env: &TestEnv, key: &str) -> serde_json::Value {
    let sys = env.system_client().await;
    let jwt = nats_pg_auth::sync::publish::lookup(&sys, key, Duration::from_secs(3))
        .await
        .unwrap()
        .expect("the server has a JWT for the key");
    nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(&jwt)
        .unwrap()
        .nats
}

async fn tenant(env: &TestEnv, account: &str, user: &str) {
    env.sql(&format!(
        "INSERT INTO nats.accounts (name) VALUES ('{account}')"
    ))
    .await;
    env.add_watcher(account, user).await;
    env.wait_synced(account).await;
}

async fn id_of(env: &TestEnv, account: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM nats.accounts WHERE name = $1")
        .bind(account)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn ok(pool: &PgPool, sql: &str) -> u64 {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
        .rows_affected()
}

async fn refused(pool: &PgPool, sql: &str, fragment: &str) {
    match sqlx::raw_sql(sql).execute(pool).await {
        Ok(_) => panic!("SQL unexpectedly succeeded:\n{sql}"),
        Err(e) => assert!(
            e.to_string().contains(fragment),
            "{sql}\n  -> {e}\n  (expected \"{fragment}\")"
        ),
    }
}

async fn scalar_i64(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn an_account_key_pointed_at_a_service_identity_or_another_key_is_never_pushed() {
    let env = TestEnv::start().await;
    env.acme().await;
    tenant(&env, "globex", "gw").await;
    let ids = ServiceIdentities::load(&env.pool).await.unwrap();
    let auth = ids.public_key(IdentityKind::AuthAccount).to_owned();
    let sys = ids.public_key(IdentityKind::SysAccount).to_owned();
    let stranger = nkeys::KeyPair::new_account().public_key();
    let own = env.account_key("acme").await;
    // Written as the schema owner: privileges stop admins (see the role tests), the sync's own
    // check must hold even for a row someone with more rights got wrong.
    for (n, (key, expect)) in [
        (&auth, "service's own auth_account key"),
        (&sys, "service's own sys_account key"),
        (&stranger, "is not its identity key"),
    ]
    .into_iter()
    .enumerate()
    {
        env.sql(&format!(
            "UPDATE nats.accounts SET public_key = '{key}', max_connections = {} WHERE name = 'acme'",
            50 + n
        ))
        .await;
        let pool = env.pool.clone();
        wait_until(Duration::from_secs(5), "the push to be refused", || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, Option<String>>(
                    "SELECT sync_error FROM nats.accounts WHERE name = 'acme'",
                )
                .fetch_one(&pool)
                .await
                .unwrap()
                .is_some_and(|e| e.contains("refused to push"))
            }
        })
        .await;
        let err = sync_error(&env, "acme").await.unwrap();
        assert!(err.contains(expect), "{err}");
        // The AUTH account still carries its callout configuration, SYS is still SYS, and
        // logins of every tenant still work.
        assert!(
            served_jwt(&env, &auth).await["authorization"]["auth_users"].is_array(),
            "AUTH keeps its authorization block"
        );
        let sys_claims = served_jwt(&env, &sys).await;
        let acme_signing: Vec<String> = sqlx::query_scalar(
            "SELECT k.public_key FROM nats.account_keys k JOIN nats.accounts a ON a.id = k.account_id \
             WHERE a.name = 'acme' AND k.kind = 'signing'",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        for k in &acme_signing {
            assert!(
                !sys_claims.to_string().contains(k.as_str()),
                "acme's signing key is not a SYS signing key"
            );
        }
        env.connect_user("gw", "pw")
            .await
            .expect("the callout still answers");
        // Put it back: the next push goes through.
        env.sql(&format!(
            "UPDATE nats.accounts SET public_key = '{own}', max_connections = 100 WHERE name = 'acme'"
        ))
        .await;
        env.wait_synced("acme").await;
    }
    // Put back, acme is pushed again (its own key, its own limits).
    assert_eq!(served_jwt(&env, &own).await["limits"]["conn"], 100);
}

#[tokio::test]
async fn an_outbox_delete_of_a_live_account_or_a_service_key_is_refused() {
    let env = TestEnv::start().await;
    env.acme().await;
    let acme = env.account_key("acme").await;
    let ids = ServiceIdentities::load(&env.pool).await.unwrap();
    let operator = ids.public_key(IdentityKind::Operator).to_owned();
    env.sql(&format!(
        "INSERT INTO nats.sync_outbox (account_public_key, op, reason)
           VALUES ('{acme}', 'delete', 'forged'), ('{operator}', 'delete', 'forged');
         SELECT pg_notify('nats_pg_auth_sync', '0');"
    ))
    .await;
    env.wait_sql(
        "SELECT count(*) = 0 FROM nats.sync_outbox WHERE reason = 'forged'",
        Duration::from_secs(5),
        "the forged row to be handled",
    )
    .await;
    let detail = audit_row(&env, "account_delete_refused", &acme).await;
    assert!(
        detail["reason"].as_str().unwrap().contains("still has it"),
        "{detail}"
    );
    let detail = audit_row(&env, "account_delete_refused", &operator).await;
    assert!(
        detail["reason"]
            .as_str()
            .unwrap()
            .contains("key of the service"),
        "{detail}"
    );
    let sys = env.system_client().await;
    let listed = nats_pg_auth::sync::publish::list(&sys, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(listed.contains(&acme), "acme is still on the server");
    env.connect_user("alice", "s3cret")
        .await
        .expect("acme's users still log in");
}

#[tokio::test]
async fn tenant_admin_of_acme_administers_acme_only() {
    let env = TestEnv::start().await;
    env.acme().await;
    tenant(&env, "globex", "gw").await;
    env.sql(
        "INSERT INTO nats.account_exports (account_id, name, subject, type, token_req)
           SELECT id, 'gpriv', 'gpriv.>', 'stream', true FROM nats.accounts WHERE name = 'globex'",
    )
    .await;
    let (_, t) = crate::common::tenant_admin(&env, "acme").await;
    let acme = id_of(&env, "acme").await;
    let globex = id_of(&env, "globex").await;

    // Adds a user who logs in.
    ok(
        &t,
        "INSERT INTO nats.users (account_id, role_id, username, password_hash)
           SELECT a.id, r.id, 'bob', crypt('pw', gen_salt('bf', 4))
           FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id WHERE a.name = 'acme'",
    )
    .await;
    env.wait_login(
        "bob",
        "pw",
        Duration::from_secs(5),
        "bob, added by the tenant admin",
    )
    .await;
    ok(
        &t,
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('bobs-token', 'sha256') FROM nats.users WHERE username = 'bob'",
    )
    .await;
    env.connect_token("bobs-token")
        .await
        .expect("a token the tenant admin made");

    // Sees acme's rows only.
    let users: Vec<String> =
        sqlx::query_scalar("SELECT username FROM nats.users ORDER BY username")
            .fetch_all(&t)
            .await
            .unwrap();
    assert_eq!(users, ["alice", "bob"], "globex's user gw is invisible");
    assert_eq!(
        scalar_i64(&t, "SELECT count(*) FROM nats.accounts").await,
        1
    );
    assert_eq!(
        scalar_i64(&t, "SELECT count(*) FROM nats.account_exports").await,
        0,
        "globex's export is invisible"
    );
    assert_eq!(
        ok(
            &t,
            "UPDATE nats.users SET active = false WHERE username = 'gw'"
        )
        .await,
        0,
        "cannot touch globex's user"
    );
    refused(
        &t,
        "DELETE FROM nats.accounts WHERE name = 'acme'",
        "permission denied",
    )
    .await;

    // Cannot change acme's limits, active flag or service-owned columns, nor create accounts.
    refused(
        &t,
        "UPDATE nats.accounts SET max_connections = 100000 WHERE name = 'acme'",
        "permission denied",
    )
    .await;
    refused(
        &t,
        "UPDATE nats.accounts SET active = false WHERE name = 'acme'",
        "permission denied",
    )
    .await;
    refused(
        &t,
        "UPDATE nats.accounts SET public_key = 'x' WHERE name = 'acme'",
        "permission denied",
    )
    .await;
    refused(
        &t,
        "INSERT INTO nats.accounts (name) VALUES ('mine')",
        "permission denied",
    )
    .await;
    ok(
        &t,
        "UPDATE nats.accounts SET description = 'ours' WHERE name = 'acme'",
    )
    .await;
    // Cannot read a seed, or write keys, the outbox or the audit log.
    refused(
        &t,
        "SELECT seed FROM nats.account_keys",
        "permission denied",
    )
    .await;
    refused(
        &t,
        "SELECT seed FROM nats.service_identities",
        "permission denied",
    )
    .await;
    refused(&t, "SELECT * FROM nats.audit_log", "permission denied").await;
    refused(
        &t,
        &format!(
            "INSERT INTO nats.sync_outbox (account_id, op, reason) VALUES ({acme}, 'delete', 'x')"
        ),
        "row-level security",
    )
    .await;
    refused(&t, "TRUNCATE nats.users", "permission denied").await;
    // Cannot put rows into globex.
    refused(
        &t,
        &format!("INSERT INTO nats.users (account_id, username) VALUES ({globex}, 'intruder')"),
        "row-level security",
    )
    .await;
    assert_eq!(
        ok(
            &t,
            &format!(
                "INSERT INTO nats.account_export_grants (export_id, importer_account_id)
                   SELECT id, {acme} FROM nats.account_exports WHERE name = 'gpriv'"
            ),
        )
        .await,
        0,
        "globex's export is not even visible"
    );
    let gpriv: i64 = sqlx::query_scalar("SELECT id FROM nats.account_exports WHERE name = 'gpriv'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    refused(
        &t,
        &format!("INSERT INTO nats.account_export_grants (export_id, importer_account_id) VALUES ({gpriv}, {acme})"),
        "row-level security",
    )
    .await;

    // Importing globex's private export without globex's grant: left out, with a reason.
    ok(
        &t,
        &format!(
            "INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, type)
               VALUES ({acme}, 'steal', 'gpriv.>', {globex}, 'stream')"
        ),
    )
    .await;
    crate::tenancy::wait_import_state(&env, "steal", true).await;
    let err = crate::tenancy::import_error(&env, "steal").await.unwrap();
    assert!(err.contains("public or granted to this account"), "{err}");

    // Its own rotations, not globex's.
    ok(&t, "SELECT nats.rotate_signing_key('acme')").await;
    refused(
        &t,
        "SELECT nats.rotate_signing_key('globex')",
        "no account named",
    )
    .await;
}

#[tokio::test]
async fn admin_role_administers_every_tenant_but_not_what_the_service_owns() {
    let env = TestEnv::start().await;
    env.acme().await;
    let (_, url) = create_login_role(&env.pool, &env.database_url, "nats_pg_auth_admin").await;
    let a = PgPool::connect(&url).await.expect("connect as admin");
    ok(
        &a,
        "INSERT INTO nats.accounts (name, max_connections) VALUES ('initech', 5);
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'peter', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'initech';
         UPDATE nats.accounts SET max_connections = 50 WHERE name = 'acme';",
    )
    .await;
    env.wait_synced("initech").await;
    env.wait_login(
        "peter",
        "pw",
        Duration::from_secs(5),
        "peter, added by the admin",
    )
    .await;
    assert_eq!(
        scalar_i64(
            &a,
            "SELECT count(*) FROM nats.account_keys WHERE kind = 'identity'"
        )
        .await,
        2,
        "key columns other than seed are readable"
    );
    for sql in [
        "UPDATE nats.accounts SET public_key = NULL WHERE name = 'acme'",
        "UPDATE nats.accounts SET jwt = NULL WHERE name = 'acme'",
        "UPDATE nats.accounts SET synced_at = NULL WHERE name = 'acme'",
        "UPDATE nats.accounts SET sync_error = 'x' WHERE name = 'acme'",
        "INSERT INTO nats.accounts (name, public_key) VALUES ('x', 'AX')",
        "UPDATE nats.account_imports SET sync_error = 'x'",
        "SELECT seed FROM nats.account_keys",
        "SELECT seed FROM nats.service_identities",
        "UPDATE nats.account_keys SET retired_at = now()",
        "DELETE FROM nats.account_keys",
        "UPDATE nats.service_identities SET jwt = NULL",
        "DELETE FROM nats.sync_outbox",
        "INSERT INTO nats.audit_log (kind) VALUES ('x')",
        "DELETE FROM nats.audit_log",
        "TRUNCATE nats.users",
        "TRUNCATE nats.accounts CASCADE",
    ] {
        refused(&a, sql, "permission denied").await;
    }
    refused(
        &a,
        "INSERT INTO nats.sync_outbox (account_id, op, reason) SELECT id, 'delete', 'x' FROM nats.accounts",
        "row-level security",
    )
    .await;
    // Rotations go through the function.
    ok(&a, "SELECT nats.rotate_signing_key('acme')").await;
    scalar_i64(&a, "SELECT count(*) FROM nats.sync_outbox").await;
}

#[tokio::test]
async fn the_service_runs_as_nats_pg_auth_service() {
    let env = TestEnv::start_with(EnvOptions {
        service_role: true,
        ..Default::default()
    })
    .await;
    env.acme().await; // pushed by the sync running as the service role
    let (alice, mut events) = env.connect_user_events("alice", "s3cret").await.unwrap();
    alice.flush().await.unwrap();
    // Tokens (last_used_at is written at login), rotation (keys written by the sync), kicks.
    env.sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('tok', 'sha256') FROM nats.users WHERE username = 'alice'",
    )
    .await;
    env.connect_token("tok").await.expect("token login");
    env.sql("SELECT nats.rotate_signing_key('acme', true)")
        .await;
    crate::common::audit_row(&env, "signing_key_rotated", "acme").await;
    let start = std::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(async_nats::Event::Disconnected)) => break,
            Ok(Some(_)) => continue,
            _ => panic!("alice was not disconnected by the emergency rotation"),
        }
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    // Deleting the account removes it from the server.
    let key = env.account_key("acme").await;
    env.sql("DELETE FROM nats.accounts WHERE name = 'acme'")
        .await;
    crate::common::audit_row(&env, "account_deleted", &key).await;
}

/// Issue 15 (7): the real `serve` process holds decrypted seeds, so it runs with a core size
/// limit of 0 (soft and hard) whatever limit it was started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serve_process_writes_no_core_dumps() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.stop_service().await;
    // Started with core dumps allowed (soft limit raised to the hard one, which children inherit).
    let core = rustix::process::getrlimit(rustix::process::Resource::Core);
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: core.maximum,
            maximum: core.maximum,
        },
    );
    let serve = crate::common::ServiceProcess::for_env(&env, "no-core");
    serve.wait_ready(Duration::from_secs(20)).await;
    let pid = serve.pid().expect("running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core limit line");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], &["0", "0"], "{core}");
}
