//! nkey logins through the real callout: a user row with `nkey` logs in with the seed (the
//! client signs the server's nonce, the service verifies it), and every other nkey is refused.

use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, Event};
use base64::Engine as _;
use futures::StreamExt;
use nkeys::KeyPair;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::common::{
    disconnected_by, expect_violation, is_auth_refusal, wait_until, DbOutage, TestEnv,
};

/// acme (role sensor: publish sensors.>) with user `device-1` holding `key`'s public nkey and
/// no password.
async fn setup(key: &KeyPair) -> TestEnv {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql(&format!(
        "INSERT INTO nats.users (account_id, role_id, username, nkey)
           SELECT a.id, r.id, 'device-1', '{}'
           FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id WHERE a.name = 'acme'",
        key.public_key()
    ))
    .await;
    env
}

async fn connect_nkey(
    env: &TestEnv,
    seed: &str,
) -> Result<(async_nats::Client, UnboundedReceiver<Event>), async_nats::ConnectError> {
    env.connect_events(ConnectOptions::with_nkey(seed.to_owned()))
        .await
}

/// Speaks the protocol by hand, for CONNECTs no client library sends (a signature by another
/// key, none at all). Returns the server's first answer after INFO.
async fn raw_connect(env: &TestEnv, connect: impl Fn(&str) -> serde_json::Value) -> String {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", env.nats.port))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let info = lines.next_line().await.unwrap().expect("INFO");
    let info: serde_json::Value =
        serde_json::from_str(info.strip_prefix("INFO ").expect("INFO line")).unwrap();
    let nonce = info["nonce"].as_str().expect("the server sends a nonce");
    let body = connect(nonce);
    write
        .write_all(format!("CONNECT {body}\r\nPING\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("an answer")
        .unwrap()
        .unwrap_or_default()
}

fn sign(key: &KeyPair, nonce: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.sign(nonce.as_bytes()).unwrap())
}

#[tokio::test]
async fn a_user_nkey_logs_in_with_its_roles_rights_and_other_keys_are_refused() {
    let key = KeyPair::new_user();
    let env = setup(&key).await;
    let seed = key.seed().unwrap();

    let (device, mut events) = connect_nkey(&env, &seed).await.expect("nkey login");
    assert_eq!(
        env.connected_users("acme").await,
        vec!["device-1".to_string()],
        "placed in acme under its username"
    );
    let mut sub = device.subscribe("sensors.>").await.unwrap();
    device.publish("sensors.t1", "21.5".into()).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .expect("allowed subject delivered")
        .unwrap();
    assert_eq!(&msg.payload[..], b"21.5");
    device.publish("admin.reboot", "x".into()).await.unwrap();
    device.flush().await.unwrap();
    expect_violation(&mut events, "admin.reboot").await;

    // Another user seed (the "wrong seed"): its public key is nobody's.
    let stranger = KeyPair::new_user().seed().unwrap();
    let err = connect_nkey(&env, &stranger).await.expect_err("refused");
    assert!(is_auth_refusal(&err), "{err}");
    assert_eq!(env.metrics.denied("unknown_nkey"), 1);

    // Account and operator keys sign fine but are not user keys.
    for other in [KeyPair::new_account(), KeyPair::new_operator()] {
        let err = connect_nkey(&env, &other.seed().unwrap())
            .await
            .expect_err("refused");
        assert!(is_auth_refusal(&err), "{err}");
    }
    // The registered key, signed by someone else; and without any signature.
    let impostor = KeyPair::new_user();
    let pk = key.public_key();
    let answer = raw_connect(&env, |nonce| {
        serde_json::json!({"nkey": pk, "sig": sign(&impostor, nonce), "verbose": false, "protocol": 1})
    })
    .await;
    assert!(answer.contains("Authorization Violation"), "{answer}");
    let answer = raw_connect(
        &env,
        |_| serde_json::json!({"nkey": pk, "verbose": false, "protocol": 1}),
    )
    .await;
    assert!(answer.contains("Authorization Violation"), "{answer}");
    // A key whose checksum does not decode.
    let mut broken = pk.clone();
    broken.replace_range(20..21, if &pk[20..21] == "A" { "B" } else { "A" });
    let answer = raw_connect(&env, |nonce| {
        serde_json::json!({"nkey": broken, "sig": sign(&key, nonce), "verbose": false, "protocol": 1})
    })
    .await;
    assert!(answer.contains("Authorization Violation"), "{answer}");

    assert_eq!(
        env.metrics.denied("bad_nkey"),
        3,
        "account, operator, broken"
    );
    assert_eq!(
        env.metrics.denied("bad_signature"),
        2,
        "impostor signature, none"
    );
    assert_eq!(env.metrics.denied("unknown_nkey"), 1);

    // `explain --nkey` finds the same user, or says why not.
    let explain = |key: &str| {
        let (code, out, err) = crate::common::run_cli(
            &["explain", "--json", "--nkey", key],
            Some(&env.database_url),
            "",
        );
        let v = serde_json::from_str::<serde_json::Value>(&out).unwrap();
        let refused = v["allowed"] != true;
        assert_eq!(code, Some(if refused { 77 } else { 0 }), "{err}");
        v
    };
    let v = explain(&pk);
    assert_eq!(
        (v["user"].as_str(), v["allowed"].as_bool()),
        (Some("device-1"), Some(true)),
        "{v}"
    );
    let v = explain(&KeyPair::new_user().public_key());
    assert_eq!(v["deny_reason"], "unknown_nkey", "{v}");
    let v = explain(&KeyPair::new_account().public_key());
    assert_eq!(v["deny_reason"], "bad_nkey", "{v}");
}

#[tokio::test]
async fn nkey_logins_work_from_the_copy_while_postgres_is_unreachable() {
    let key = KeyPair::new_user();
    let env = setup(&key).await;
    let cache = env.callout.as_ref().unwrap().cache().clone();
    let pk = key.public_key();
    wait_until(Duration::from_secs(5), "the copy to hold the nkey", || {
        let (cache, pk) = (cache.clone(), pk.clone());
        async move {
            cache.is_live()
                && matches!(
                    cache.copy_nkey(&pk),
                    nats_pg_auth::copy::CopyLookup::Found(_)
                )
        }
    })
    .await;
    let outage = DbOutage::begin(&env).await;
    connect_nkey(&env, &key.seed().unwrap())
        .await
        .expect("the nkey logs in without Postgres");
    let err = connect_nkey(&env, &KeyPair::new_user().seed().unwrap())
        .await
        .expect_err("an unknown nkey stays out without Postgres");
    assert!(is_auth_refusal(&err), "{err}");
    assert!(cache.in_outage(), "answered from the copy");
    assert_eq!(env.metrics.denied("unknown_nkey"), 1);
    outage.end().await;
}

#[tokio::test]
async fn deactivating_or_rekeying_an_nkey_user_closes_its_connection() {
    let key = KeyPair::new_user();
    let env = setup(&key).await;
    let seed = key.seed().unwrap();
    for change in [
        "UPDATE nats.users SET active = false WHERE username = 'device-1'",
        "UPDATE nats.users SET nkey = NULL WHERE username = 'device-1'",
    ] {
        env.sql("UPDATE nats.users SET active = true, nkey = NULL WHERE username = 'device-1'")
            .await;
        env.sql(&format!(
            "UPDATE nats.users SET nkey = '{}' WHERE username = 'device-1'",
            key.public_key()
        ))
        .await;
        let (_device, mut events) = connect_nkey(&env, &seed).await.expect("nkey login");
        let start = Instant::now();
        env.sql(change).await;
        let took = disconnected_by(&mut events, start, Duration::from_secs(2), change).await;
        eprintln!("revocation delay ({change}): {took:?}");
        let err = connect_nkey(&env, &seed).await.expect_err("stays out");
        assert!(is_auth_refusal(&err), "{err}");
    }
}
