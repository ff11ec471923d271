//! What the server refuses or cannot grant lands on the row at fault (issue 10, bugs 1 and 5).

use std::time::Duration;

use futures::StreamExt;

use crate::common::{wait_until, EnvOptions, TestEnv};

async fn tenant(env: &TestEnv, account: &str, user: &str) {
    env.sql(&format!(
        "INSERT INTO nats.accounts (name) VALUES ('{account}')"
    ))
    .await;
    env.add_watcher(account, user).await;
    env.wait_synced(account).await;
}

/// (sync_error, in the pushed JWT) of an import.
async fn import_state(env: &TestEnv, name: &str) -> (Option<String>, bool) {
    let (err, jwt): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT i.sync_error, a.jwt FROM nats.account_imports i JOIN nats.accounts a ON a.id = i.account_id \
         WHERE i.name = $1",
    )
    .bind(name)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let in_jwt = jwt
        .and_then(|j| nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(&j).ok())
        .and_then(|c| c.nats["imports"].as_array().cloned())
        .is_some_and(|imports| imports.iter().any(|i| i["name"] == name));
    (err, in_jwt)
}

/// Bug 1: a remote import with a bad activation token makes nats-server refuse the account JWT;
/// only that import is left out (with the error on its row), the working one stays.
#[tokio::test]
async fn a_refused_import_is_left_out_alone_and_the_others_keep_working() {
    let env = TestEnv::start().await;
    tenant(&env, "provider", "prov").await;
    tenant(&env, "consumer", "cons").await;
    let stranger = nkeys::KeyPair::new_account().public_key();
    env.sql(&format!(
        "INSERT INTO nats.account_exports (account_id, name, subject, type)
           SELECT id, 'echo', 'svc.echo.>', 'service' FROM nats.accounts WHERE name = 'provider';
         INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, local_subject, type)
           SELECT c.id, 'echo-in', 'svc.echo.>', p.id, 'echo.>', 'service'
           FROM nats.accounts c, nats.accounts p WHERE c.name = 'consumer' AND p.name = 'provider';
         INSERT INTO nats.account_imports (account_id, name, subject, exporter_public_key, type, token)
           SELECT id, 'remote', 'feed.>', '{stranger}', 'stream', 'eyJ0eXAiOiJKV1QifQ.bad.bad'
           FROM nats.accounts WHERE name = 'consumer';
         INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, local_subject, type)
           SELECT c.id, 'echo-too', 'svc.echo.two', p.id, 'two', 'service'
           FROM nats.accounts c, nats.accounts p WHERE c.name = 'consumer' AND p.name = 'provider';"
    ))
    .await;
    let pool_env = &env;
    // The sync finds the bad import by pushing halves: wait for its last push, not its first.
    wait_until(
        Duration::from_secs(20),
        "the bad import to be left out and the good ones pushed",
        || async move {
            import_state(pool_env, "remote").await.0.is_some()
                && import_state(pool_env, "echo-in").await.1
                && import_state(pool_env, "echo-too").await.1
        },
    )
    .await;
    let (err, in_jwt) = import_state(&env, "remote").await;
    let err = err.unwrap();
    assert!(!in_jwt);
    assert!(
        err.contains("refuses") && err.contains("this import"),
        "{err}"
    );
    for good in ["echo-in", "echo-too"] {
        let (err, in_jwt) = import_state(&env, good).await;
        assert_eq!(err, None, "{good} is not blamed");
        assert!(in_jwt, "{good} stays in the pushed JWT");
    }

    // And it works.
    let prov = env.connect_user("prov", "pw").await.unwrap();
    let mut requests = prov.subscribe("svc.echo.>").await.unwrap();
    let responder = prov.clone();
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, "pong".into()).await;
            }
        }
    });
    crate::common::settle(&prov).await;
    let cons = env.connect_user("cons", "pw").await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(3), cons.request("echo.hi", "".into()))
        .await
        .expect("answered in time")
        .expect("request through the working import");
    assert_eq!(&answer.payload[..], b"pong");

    // Fixing the bad row clears its error.
    env.sql("DELETE FROM nats.account_imports WHERE name = 'remote'")
        .await;
    wait_until(
        Duration::from_secs(10),
        "the errors to clear",
        || async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT bool_and(sync_error IS NULL) FROM nats.account_imports",
            )
            .fetch_one(&pool_env.pool)
            .await
            .unwrap()
        },
    )
    .await;
}

async fn account_error(env: &TestEnv, name: &str) -> Option<String> {
    sqlx::query_scalar("SELECT sync_error FROM nats.accounts WHERE name = $1")
        .bind(name)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Bug 5: JetStream limits above what the server can grant are recorded on the account row.
#[tokio::test]
async fn jetstream_limits_the_server_cannot_grant_are_recorded_on_the_account() {
    let env = TestEnv::start_with(EnvOptions {
        nats_extra:
            "jetstream: { store_dir: \"js\", max_memory_store: 4194304, max_file_store: 4194304 }"
                .into(),
        ..Default::default()
    })
    .await;
    // Within the server's limits: no error.
    env.sql(
        "INSERT INTO nats.accounts (name, max_jetstream_memory_storage, max_jetstream_disk_storage)
           VALUES ('js', 1048576, 1048576)",
    )
    .await;
    env.add_watcher("js", "jsuser").await;
    env.wait_synced("js").await;
    let client = env.connect_user("jsuser", "pw").await.unwrap();
    crate::common::settle(&client).await;
    assert_eq!(account_error(&env, "js").await, None);

    // More memory than max_memory_store.
    env.sql("UPDATE nats.accounts SET max_jetstream_memory_storage = 1073741824 WHERE name = 'js'")
        .await;
    let e = &env;
    wait_until(
        Duration::from_secs(10),
        "the error on the account",
        || async move { account_error(e, "js").await.is_some() },
    )
    .await;
    let err = account_error(&env, "js").await.unwrap();
    assert!(err.contains("max_memory_store"), "{err}");

    // Back within limits: the error goes.
    env.sql("UPDATE nats.accounts SET max_jetstream_memory_storage = 2097152 WHERE name = 'js'")
        .await;
    wait_until(
        Duration::from_secs(10),
        "the error to clear",
        || async move { account_error(e, "js").await.is_none() },
    )
    .await;
}
