//! Cross-account sharing, signing keys, JetStream limits and encrypted seeds, proved against a
//! real nats-server.

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

pub(crate) async fn import_error(env: &TestEnv, name: &str) -> Option<String> {
    sqlx::query_scalar("SELECT sync_error FROM nats.account_imports WHERE name = $1")
        .bind(name)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Waits until the import is in the importer's pushed JWT (`want_error` false), or has been
/// left out with a `sync_error` (true).
pub(crate) async fn wait_import_state(env: &TestEnv, name: &str, want_error: bool) {
    let pool = env.pool.clone();
    let name = name.to_owned();
    wait_until(Duration::from_secs(5), "the import to be synced", || {
        let pool = pool.clone();
        let name = name.clone();
        async move {
            let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT i.sync_error, a.jwt FROM nats.account_imports i JOIN nats.accounts a ON a.id = i.account_id \
                 WHERE i.name = $1",
            )
            .bind(&name)
            .fetch_optional(&pool)
            .await
            .unwrap();
            let Some((err, jwt)) = row else { return false };
            let in_jwt = jwt
                .and_then(|j| nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(&j).ok())
                .and_then(|c| c.nats["imports"].as_array().cloned())
                .is_some_and(|imports| imports.iter().any(|i| i["name"] == name.as_str()));
            if want_error {
                err.is_some() && !in_jwt
            } else {
                err.is_none() && in_jwt
            }
        }
    })
    .await;
}

#[tokio::test]
async fn service_import_answers_from_the_exporting_account() {
    let env = TestEnv::start().await;
    tenant(&env, "provider", "prov").await;
    tenant(&env, "consumer", "cons").await;
    env.sql(
        "INSERT INTO nats.account_exports (account_id, name, subject, type)
           SELECT id, 'echo', 'svc.echo.>', 'service' FROM nats.accounts WHERE name = 'provider';
         INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, local_subject, type)
           SELECT c.id, 'echo-in', 'svc.echo.>', p.id, 'echo.>', 'service'
           FROM nats.accounts c, nats.accounts p WHERE c.name = 'consumer' AND p.name = 'provider';",
    )
    .await;
    wait_import_state(&env, "echo-in", false).await;
    let prov = env.connect_user("prov", "pw").await.unwrap();
    let mut requests = prov.subscribe("svc.echo.>").await.unwrap();
    let responder = prov.clone();
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder
                    .publish(
                        reply,
                        format!("echo:{}", String::from_utf8_lossy(&msg.payload)).into(),
                    )
                    .await;
            }
        }
    });
    crate::common::settle(&prov).await;
    let cons = env.connect_user("cons", "pw").await.unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(3),
        cons.request("echo.hi", "ping".into()),
    )
    .await
    .expect("answered in time")
    .expect("request through the import");
    assert_eq!(&answer.payload[..], b"echo:ping");
}

#[tokio::test]
async fn stream_import_delivers_under_the_local_subject() {
    let env = TestEnv::start().await;
    tenant(&env, "provider", "prov").await;
    tenant(&env, "consumer", "cons").await;
    env.sql(
        "INSERT INTO nats.account_exports (account_id, name, subject, type)
           SELECT id, 'ticks', 'ticks.>', 'stream' FROM nats.accounts WHERE name = 'provider';
         INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, local_subject, type)
           SELECT c.id, 'ticks-in', 'ticks.>', p.id, 'upstream.ticks.>', 'stream'
           FROM nats.accounts c, nats.accounts p WHERE c.name = 'consumer' AND p.name = 'provider';",
    )
    .await;
    wait_import_state(&env, "ticks-in", false).await;
    let cons = env.connect_user("cons", "pw").await.unwrap();
    let mut sub = cons.subscribe("upstream.ticks.>").await.unwrap();
    crate::common::settle(&cons).await;
    let prov = env.connect_user("prov", "pw").await.unwrap();
    prov.publish("ticks.eurusd", "1.08".into()).await.unwrap();
    crate::common::settle(&prov).await;
    let msg = tokio::time::timeout(Duration::from_secs(3), sub.next())
        .await
        .expect("delivered")
        .unwrap();
    assert_eq!(msg.subject.as_str(), "upstream.ticks.eurusd");
}

#[tokio::test]
async fn token_required_export_works_through_a_minted_activation_and_stops_when_deleted() {
    let env = TestEnv::start().await;
    tenant(&env, "provider", "prov").await;
    tenant(&env, "consumer", "cons").await;
    env.sql(
        "INSERT INTO nats.account_exports (account_id, name, subject, type, token_req)
           SELECT id, 'private', 'private.>', 'stream', true FROM nats.accounts WHERE name = 'provider';
         INSERT INTO nats.account_export_grants (export_id, importer_account_id)
           SELECT e.id, c.id FROM nats.account_exports e, nats.accounts c
           WHERE e.name = 'private' AND c.name = 'consumer';
         INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, type)
           SELECT c.id, 'private-in', 'private.>', p.id, 'stream'
           FROM nats.accounts c, nats.accounts p WHERE c.name = 'consumer' AND p.name = 'provider';",
    )
    .await;
    wait_import_state(&env, "private-in", false).await;
    let jwt: String = sqlx::query_scalar("SELECT jwt FROM nats.accounts WHERE name = 'consumer'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let claims: nats_pg_auth::jwt::Claims<serde_json::Value> =
        nats_pg_auth::jwt::decode_unverified(&jwt).unwrap();
    assert!(
        claims.nats["imports"][0]["token"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "activation token minted"
    );

    let cons = env.connect_user("cons", "pw").await.unwrap();
    let mut sub = cons.subscribe("private.>").await.unwrap();
    crate::common::settle(&cons).await;
    let prov = env.connect_user("prov", "pw").await.unwrap();
    prov.publish("private.a", "1".into()).await.unwrap();
    crate::common::settle(&prov).await;
    tokio::time::timeout(Duration::from_secs(3), sub.next())
        .await
        .expect("delivered via activation")
        .unwrap();

    env.sql("DELETE FROM nats.account_exports WHERE name = 'private'")
        .await;
    wait_import_state(&env, "private-in", true).await;
    let err = import_error(&env, "private-in").await.unwrap();
    assert!(err.contains("no stream export"), "clear message: {err}");
    // The provider's JWT no longer exports it: nothing crosses any more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    prov.publish("private.b", "2".into()).await.unwrap();
    crate::common::settle(&prov).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(700), sub.next())
            .await
            .is_err(),
        "no delivery after delete"
    );
}

/// Whether a message published by `prov` on `subject` reaches `sub` within `wait`.
async fn delivered(
    prov: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
    subject: &str,
    wait: Duration,
) -> bool {
    prov.publish(subject.to_owned(), "x".into()).await.unwrap();
    crate::common::settle(prov).await;
    tokio::time::timeout(wait, sub.next()).await.is_ok()
}

#[tokio::test]
async fn a_private_export_is_importable_only_with_the_exporters_grant() {
    let env = TestEnv::start().await;
    tenant(&env, "provider", "prov").await;
    tenant(&env, "consumer", "cons").await;
    env.sql(
        "INSERT INTO nats.account_exports (account_id, name, subject, type, token_req)
           SELECT id, 'private', 'private.>', 'stream', true FROM nats.accounts WHERE name = 'provider';
         INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, type)
           SELECT c.id, 'private-in', 'private.>', p.id, 'stream'
           FROM nats.accounts c, nats.accounts p WHERE c.name = 'consumer' AND p.name = 'provider';",
    )
    .await;
    // No grant: left out, with a reason; nothing crosses.
    wait_import_state(&env, "private-in", true).await;
    let err = import_error(&env, "private-in").await.unwrap();
    assert!(
        err.contains("public or granted to this account") && err.contains("account_export_grants"),
        "{err}"
    );
    let cons = env.connect_user("cons", "pw").await.unwrap();
    let mut sub = cons.subscribe("private.>").await.unwrap();
    crate::common::settle(&cons).await;
    let prov = env.connect_user("prov", "pw").await.unwrap();
    assert!(!delivered(&prov, &mut sub, "private.a", Duration::from_millis(500)).await);

    // The exporter grants it: in the consumer's JWT within 2 s, and messages flow.
    let start = std::time::Instant::now();
    env.sql(
        "INSERT INTO nats.account_export_grants (export_id, importer_account_id)
           SELECT e.id, c.id FROM nats.account_exports e, nats.accounts c
           WHERE e.name = 'private' AND c.name = 'consumer'",
    )
    .await;
    wait_import_state(&env, "private-in", false).await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "granted after {:?}",
        start.elapsed()
    );
    let jwt: String = sqlx::query_scalar("SELECT jwt FROM nats.accounts WHERE name = 'consumer'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let activation = nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(&jwt)
        .unwrap()
        .nats["imports"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut ok = false;
    for _ in 0..20 {
        if delivered(&prov, &mut sub, "private.b", Duration::from_millis(200)).await {
            ok = true;
            break;
        }
    }
    assert!(ok, "delivered once granted");

    // Withdrawn: the import goes away again.
    env.sql("DELETE FROM nats.account_export_grants").await;
    wait_import_state(&env, "private-in", true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while tokio::time::timeout(Duration::from_millis(100), sub.next())
        .await
        .is_ok()
    {}
    assert!(
        !delivered(&prov, &mut sub, "private.c", Duration::from_millis(700)).await,
        "no delivery once the grant is gone"
    );

    // The activation minted earlier does not replace the grant, not even with the exporter
    // named by its key (as if it were another deployment's account).
    let provider_key = env.account_key("provider").await;
    env.sql(&format!(
        "INSERT INTO nats.account_imports (account_id, name, subject, exporter_public_key, type, token)
           SELECT id, 'private-by-key', 'private.>', '{provider_key}', 'stream', '{activation}'
           FROM nats.accounts WHERE name = 'consumer'"
    ))
    .await;
    wait_import_state(&env, "private-by-key", true).await;
    let err = import_error(&env, "private-by-key").await.unwrap();
    assert!(err.contains("public or granted to this account"), "{err}");
    assert!(
        !delivered(&prov, &mut sub, "private.d", Duration::from_millis(700)).await,
        "no delivery through a copied activation"
    );
}

#[tokio::test]
async fn a_broken_import_is_left_out_with_an_error_and_the_account_keeps_working() {
    let env = TestEnv::start().await;
    tenant(&env, "provider", "prov").await;
    tenant(&env, "consumer", "cons").await;
    env.sql(
        "INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, type)
           SELECT c.id, 'nothing-there', 'nope.>', p.id, 'stream'
           FROM nats.accounts c, nats.accounts p WHERE c.name = 'consumer' AND p.name = 'provider';
         UPDATE nats.accounts SET max_connections = 10 WHERE name = 'consumer';",
    )
    .await;
    wait_import_state(&env, "nothing-there", true).await;
    let err = import_error(&env, "nothing-there").await.unwrap();
    assert!(
        err.contains("no stream export") && err.contains("nope.>"),
        "{err}"
    );
    let jwt: String = sqlx::query_scalar("SELECT jwt FROM nats.accounts WHERE name = 'consumer'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let claims: nats_pg_auth::jwt::Claims<serde_json::Value> =
        nats_pg_auth::jwt::decode_unverified(&jwt).unwrap();
    assert_eq!(
        claims.nats["limits"]["conn"], 10,
        "the rest of the change was pushed"
    );
    assert!(
        claims.nats.get("imports").is_none(),
        "the broken import is not in the JWT"
    );
    env.connect_user("cons", "pw")
        .await
        .expect("the account keeps working");
}

#[tokio::test]
async fn jetstream_limits_allow_streams_up_to_the_limit() {
    let env = TestEnv::start_with(EnvOptions {
        nats_extra: "jetstream: { store_dir: \"js\" }".into(),
        ..Default::default()
    })
    .await;
    env.sql(
        "INSERT INTO nats.accounts (name, max_jetstream_memory_storage, max_jetstream_disk_storage, max_jetstream_streams)
           VALUES ('js', 1048576, 1048576, 1)",
    )
    .await;
    env.add_watcher("js", "jsuser").await;
    env.wait_synced("js").await;
    let client = env.connect_user("jsuser", "pw").await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ONE".into(),
        subjects: vec!["one.>".into()],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        max_bytes: 1024,
        ..Default::default()
    })
    .await
    .expect("first stream within the limit");
    let second = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "TWO".into(),
            subjects: vec!["two.>".into()],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            max_bytes: 1024,
            ..Default::default()
        })
        .await;
    assert!(
        second.is_err(),
        "a second stream exceeds max_jetstream_streams = 1"
    );
}

async fn signing_keys(env: &TestEnv, account: &str) -> Vec<String> {
    let jwt: String = sqlx::query_scalar("SELECT jwt FROM nats.accounts WHERE name = $1")
        .bind(account)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let c: nats_pg_auth::jwt::Claims<serde_json::Value> =
        nats_pg_auth::jwt::decode_unverified(&jwt).unwrap();
    c.nats["signing_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

async fn wait_signing_keys(
    env: &TestEnv,
    account: &str,
    count: usize,
    other_than: &[String],
) -> Vec<String> {
    let start = std::time::Instant::now();
    loop {
        let keys = signing_keys(env, account).await;
        if keys.len() == count && keys.iter().any(|k| !other_than.contains(k)) {
            return keys;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "signing keys of {account} stayed {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The signing key that signed the newest login's JWT, from the server's CONNECT advisory.
async fn login_issuer(
    env: &TestEnv,
    account: &str,
    user: &str,
    pass: &str,
) -> (async_nats::Client, String) {
    let sys = env.system_client().await;
    let key = env.account_key(account).await;
    let mut events = sys
        .subscribe(format!("$SYS.ACCOUNT.{key}.CONNECT"))
        .await
        .unwrap();
    crate::common::settle(&sys).await;
    let client = env.connect_user(user, pass).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(3), events.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    (
        client,
        v["client"]["issuer_key"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test]
async fn graceful_rotation_keeps_connections_and_signs_new_logins_with_the_new_key() {
    let env = TestEnv::start().await;
    env.acme().await;
    let before = signing_keys(&env, "acme").await;
    assert_eq!(before.len(), 1);
    let (alice, mut events) = env.connect_user_events("alice", "s3cret").await.unwrap();
    env.sql("SELECT nats.rotate_signing_key('acme')").await;
    let after = wait_signing_keys(&env, "acme", 2, &before).await;
    assert!(
        after.contains(&before[0]),
        "the old key stays until its JWTs expire"
    );
    env.add_watcher("acme", "w2").await;
    let (_w2, issuer) = login_issuer(&env, "acme", "w2", "pw").await;
    assert!(
        after.contains(&issuer) && issuer != before[0],
        "new login signed by the new key ({issuer})"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(e) = events.try_recv() {
        assert!(
            !matches!(e, async_nats::Event::Disconnected),
            "existing connection stays up"
        );
    }
    alice.flush().await.expect("alice still connected");
}

#[tokio::test]
async fn emergency_rotation_drops_connections_which_come_back_with_the_new_key() {
    let env = TestEnv::start().await;
    env.acme().await;
    let before = signing_keys(&env, "acme").await;
    let (alice, mut events) = env.connect_user_events("alice", "s3cret").await.unwrap();
    let start = std::time::Instant::now();
    env.sql("SELECT nats.rotate_signing_key('acme', true)")
        .await;
    crate::common::disconnected_by(
        &mut events,
        start,
        Duration::from_secs(2),
        "an emergency rotation",
    )
    .await;
    eprintln!(
        "emergency rotation dropped the connection after {:?}",
        start.elapsed()
    );
    let after = wait_signing_keys(&env, "acme", 1, &before).await;
    assert!(!after.contains(&before[0]), "the old key is gone at once");
    let audit = crate::common::audit_row(&env, "signing_key_rotated", "acme").await;
    assert_eq!(audit["emergency"], true);
    assert_eq!(
        audit["signing_key"],
        after[0].as_str(),
        "the audit names the new key"
    );
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(async_nats::Event::Connected)) => break,
            Ok(Some(_)) => continue,
            _ => panic!("alice did not reconnect"),
        }
    }
    alice
        .flush()
        .await
        .expect("reconnected through the callout");
}

#[tokio::test]
async fn seeds_are_encrypted_at_rest_and_logins_work() {
    let key = [42u8; 32];
    let env = TestEnv::start_with(EnvOptions {
        encryption_key: Some(key),
        ..Default::default()
    })
    .await;
    env.acme().await;
    env.connect_user("alice", "s3cret")
        .await
        .expect("login works with encrypted seeds");
    // A dump of every seed column: nothing that looks like an nkey seed.
    let seeds: Vec<String> = sqlx::query_scalar(
        "SELECT seed FROM nats.service_identities UNION ALL SELECT seed FROM nats.account_keys",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(seeds.len() >= 10);
    for s in &seeds {
        assert!(
            s.starts_with("enc:v2:"),
            "encrypted: {}",
            &s[..8.min(s.len())]
        );
    }
    let dump: String = sqlx::query_scalar(
        "SELECT string_agg(t::text, ' ') FROM (SELECT * FROM nats.service_identities) t",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    for prefix in ["SO", "SA", "SU", "SX"] {
        assert!(
            !dump
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w.len() == 58 && w.starts_with(prefix)),
            "no {prefix}… seed in the dump"
        );
    }
    // A wrong key fails at startup, with one clear error, not at login time.
    let wrong = nats_pg_auth::app::ServeConfig {
        database_url: env.database_url.clone(),
        cipher: nats_pg_auth::keys::SeedCipher::new(Some([7u8; 32])),
        args: crate::common::serve_args(env.url()),
    };
    let err = nats_pg_auth::app::Application::build(wrong)
        .await
        .err()
        .expect("wrong key refused");
    assert!(
        err.to_string().contains("NATS_PG_AUTH_ENCRYPTION_KEY"),
        "{err}"
    );
    let none = nats_pg_auth::app::ServeConfig {
        database_url: env.database_url.clone(),
        cipher: nats_pg_auth::keys::SeedCipher::new(None),
        args: crate::common::serve_args(env.url()),
    };
    assert!(
        nats_pg_auth::app::Application::build(none).await.is_err(),
        "missing key refused"
    );
}

#[tokio::test]
async fn plain_seeds_are_encrypted_when_a_key_is_configured_and_the_key_can_be_rotated() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.stop_service().await;
    let old = nats_pg_auth::keys::SeedCipher::new(None);
    let k1 = nats_pg_auth::keys::SeedCipher::new(Some([1u8; 32]));
    // Starting with a key encrypts the plain rows of the keyless start.
    env.cipher = k1.clone();
    env.start_service(crate::common::serve_args(env.url()))
        .await;
    let plain: i64 =
        sqlx::query_scalar("SELECT count(*) FROM nats.account_keys WHERE seed NOT LIKE 'enc:%'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(plain, 0);
    env.connect_user("alice", "s3cret")
        .await
        .expect("login after encrypting");
    env.stop_service().await;
    // Rotate to a second key; the first no longer opens anything.
    let k2 = nats_pg_auth::keys::SeedCipher::new(Some([2u8; 32]));
    let n = nats_pg_auth::db::seeds::reencrypt(&env.pool, &k1, &k2, false)
        .await
        .unwrap();
    assert!(n >= 10);
    assert!(
        nats_pg_auth::db::seeds::reencrypt(&env.pool, &k1, &old, false)
            .await
            .is_err(),
        "old key is useless now"
    );
    env.cipher = k2;
    env.start_service(crate::common::serve_args(env.url()))
        .await;
    env.connect_user("alice", "s3cret")
        .await
        .expect("login after key rotation");
}

#[tokio::test]
async fn operator_signing_key_rotation_resigns_every_account() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    let fragment = env.dir.path().join("fragment.conf");
    let resolver = env.dir.path().join("jwt");
    let old_issuer = |jwt: &str| {
        nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(jwt)
            .unwrap()
            .iss
    };
    let acme_jwt: String = sqlx::query_scalar("SELECT jwt FROM nats.accounts WHERE name = 'acme'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let old = old_issuer(&acme_jwt);

    // Step 1: the operator JWT lists both keys; nats-server restarts with it.
    let nats_pg_auth::operator::Step::Begun { next } =
        nats_pg_auth::operator::begin(&env.pool, &env.cipher)
            .await
            .unwrap()
    else {
        panic!("step 1")
    };
    let ids = nats_pg_auth::init::ServiceIdentities::load(&env.pool)
        .await
        .unwrap();
    nats_pg_auth::init::write_fragment(&ids, &resolver, &fragment).unwrap();
    env.nats.restart(false).await;
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "alice after step 1",
    )
    .await;

    // Step 2: the new key signs; the leader re-signs and pushes every account.
    nats_pg_auth::operator::finish(&env.pool, &env.cipher)
        .await
        .unwrap();
    let pool = env.pool.clone();
    let next_key = next.clone();
    wait_until(
        Duration::from_secs(10),
        "acme to be re-signed by the new key",
        || {
            let pool = pool.clone();
            let next_key = next_key.clone();
            async move {
                let jwt: String =
                    sqlx::query_scalar("SELECT jwt FROM nats.accounts WHERE name = 'acme'")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(&jwt)
                    .unwrap()
                    .iss
                    == next_key
            }
        },
    )
    .await;
    assert_ne!(old, next);
    // nats-server restarts trusting only the new key: SYS, AUTH and acme all still work.
    let ids = nats_pg_auth::init::ServiceIdentities::load(&env.pool)
        .await
        .unwrap();
    nats_pg_auth::init::write_fragment(&ids, &resolver, &fragment).unwrap();
    let text = std::fs::read_to_string(&fragment).unwrap();
    let op_line = text.lines().find(|l| l.starts_with("operator:")).unwrap();
    let op: nats_pg_auth::jwt::Claims<serde_json::Value> =
        nats_pg_auth::jwt::decode_unverified(op_line.trim_start_matches("operator:").trim())
            .unwrap();
    assert_eq!(
        op.nats["signing_keys"],
        serde_json::json!([next]),
        "only the new key is trusted"
    );
    env.nats.restart(false).await;
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "alice after step 2",
    )
    .await;
}
