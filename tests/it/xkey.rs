//! `init --no-xkey`: the AUTH account without an xkey, for callouts inside the pod (issue 19).

use std::time::Duration;

use nats_pg_auth::db::identities::IdentityKind;
use nats_pg_auth::init::{self, InitOptions, ServiceIdentities};
use nats_pg_auth::jwt::claims::AccountClaims;

use crate::common::{is_auth_refusal, TestEnv};

/// Switches AUTH's xkey as `init --no-xkey` / `--xkey` do, then restarts nats-server with the
/// fragment `init` writes.
async fn init_and_restart(env: &mut TestEnv, xkey: bool) {
    let report = init::init_with(
        &env.pool,
        &env.cipher,
        None,
        InitOptions { xkey: Some(xkey) },
    )
    .await
    .expect("init");
    init::write_fragment(
        &report.identities,
        &env.nats.resolver_dir.clone(),
        &env.nats.dir.join("fragment.conf"),
    )
    .expect("fragment");
    env.nats.restart(false).await;
}

/// AUTH's xkey as nats-server has it.
async fn served_auth_xkey(env: &TestEnv) -> Option<String> {
    let ids = ServiceIdentities::load(&env.pool).await.unwrap();
    let auth = ids.public_key(IdentityKind::AuthAccount).to_owned();
    let sys = env.system_client().await;
    let jwt = nats_pg_auth::sync::publish::lookup(&sys, &auth, Duration::from_secs(5))
        .await
        .expect("lookup")
        .expect("AUTH is on the server");
    let claims: nats_pg_auth::jwt::Claims<AccountClaims> =
        nats_pg_auth::jwt::decode_unverified(&jwt).unwrap();
    claims
        .nats
        .authorization
        .and_then(|a| a.xkey)
        .filter(|k| !k.is_empty())
}

#[tokio::test]
async fn logins_work_without_the_xkey_and_again_with_it() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    assert!(served_auth_xkey(&env).await.is_some(), "an xkey by default");
    env.wait_login("alice", "s3cret", Duration::from_secs(10), "alice logs in")
        .await;

    init_and_restart(&mut env, false).await;
    assert_eq!(served_auth_xkey(&env).await, None, "AUTH without an xkey");
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(15),
        "alice logs in through the unencrypted callout",
    )
    .await;
    let err = env
        .connect_user("alice", "wrong")
        .await
        .expect_err("a wrong password is still refused");
    assert!(is_auth_refusal(&err), "{err}");
    // Running init again without a choice keeps it that way.
    let again = init::init(&env.pool, &env.cipher, None).await.unwrap();
    assert!(!again.created);
    let jwt = again.identities.jwt(IdentityKind::AuthAccount);
    assert!(!jwt.is_empty());
    let stored: nats_pg_auth::jwt::Claims<AccountClaims> =
        nats_pg_auth::jwt::decode_unverified(jwt).unwrap();
    assert_eq!(stored.nats.authorization.and_then(|a| a.xkey), None);

    init_and_restart(&mut env, true).await;
    assert!(served_auth_xkey(&env).await.is_some(), "the xkey is back");
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(15),
        "alice logs in through the encrypted callout",
    )
    .await;
}
