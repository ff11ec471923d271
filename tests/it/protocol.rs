//! The callout's request handling, driven with hand-made requests against the running service:
//! what a real server sends is accepted and answered correctly; garbage, forged and expired
//! requests get no answer and do not hurt the service.

use std::time::Instant;

use async_nats::{HeaderMap, Message};
use nats_pg_auth::db::identities::IdentityKind;
use nats_pg_auth::init::ServiceIdentities;
use nats_pg_auth::jwt::claims::{AuthorizationRequest, AuthorizationResponse, Secret, UserClaims};
use nats_pg_auth::jwt::{self, Claims};
use nkeys::{KeyPair, XKey};

use crate::common::TestEnv;

/// A fake nats-server: its identity key and its curve key.
struct FakeServer {
    key: KeyPair,
    xkey: XKey,
}

impl FakeServer {
    fn new() -> Self {
        Self {
            key: KeyPair::new_server(),
            xkey: XKey::new(),
        }
    }

    fn request(
        &self,
        auth_account: &str,
        user: &str,
        pass: &str,
        exp_in: i64,
    ) -> (Claims<AuthorizationRequest>, String) {
        let mut nats = AuthorizationRequest::default();
        nats.server_id.id = self.key.public_key();
        nats.server_id.name = "fake".into();
        nats.server_id.xkey = Some(self.xkey.public_key());
        nats.user_nkey = KeyPair::new_user().public_key();
        nats.client_info.host = Some("127.0.0.1".into());
        nats.client_info.id = 42;
        nats.client_info.kind = Some("Client".into());
        nats.client_info.client_type = Some("nats".into());
        nats.connect_opts.user = Some(user.into());
        nats.connect_opts.pass = Secret::new(pass);
        let now = jwt::now_unix();
        let claims = Claims {
            aud: Some("nats-authorization-request".into()),
            exp: Some(now + exp_in),
            jti: String::new(),
            iat: now,
            iss: String::new(),
            name: None,
            nbf: None,
            sub: auth_account.to_owned(),
            nats,
        };
        let token = jwt::encode(&claims, &self.key).unwrap();
        (claims, token)
    }

    fn sealed(&self, token: &str, auth_xkey: &str) -> Message {
        let recipient = XKey::from_public_key(auth_xkey).unwrap();
        message(
            self.xkey.seal(token.as_bytes(), &recipient).unwrap(),
            Some(self.xkey.public_key()),
        )
    }
}

fn message(payload: Vec<u8>, server_xkey: Option<String>) -> Message {
    let mut headers = HeaderMap::new();
    if let Some(x) = server_xkey {
        headers.insert("Nats-Server-Xkey", x.as_str());
    }
    Message {
        subject: "$SYS.REQ.USER.AUTH".into(),
        reply: Some("$SYS._INBOX.test.reply".into()),
        length: payload.len(),
        payload: payload.into(),
        headers: Some(headers),
        status: None,
        description: None,
    }
}

#[tokio::test]
async fn a_well_formed_request_gets_a_sealed_signed_response_with_the_merged_user_jwt() {
    let env = TestEnv::start().await;
    env.acme().await;
    let ids = ServiceIdentities::load(&env.pool).await.unwrap();
    let auth = ids.public_key(IdentityKind::AuthAccount).to_owned();
    let auth_xkey = ids.public_key(IdentityKind::AuthXkey).to_owned();
    let server = FakeServer::new();
    let (req, token) = server.request(&auth, "alice", "s3cret", 2);

    let callout = env.callout.clone().unwrap();
    let reply = callout
        .answer(&server.sealed(&token, &auth_xkey), Instant::now())
        .await
        .expect("answered");
    assert!(
        reply.starts_with(b"xkv1"),
        "the response is sealed because the request was"
    );
    let opened = server
        .xkey
        .open(&reply, &XKey::from_public_key(&auth_xkey).unwrap())
        .expect("sealed to the server's xkey");
    let response: Claims<AuthorizationResponse> =
        jwt::decode_verified(std::str::from_utf8(&opened).unwrap()).unwrap();
    assert_eq!(response.iss, auth, "signed by AUTH");
    assert_eq!(
        response.aud.as_deref(),
        Some(server.key.public_key().as_str()),
        "aud = this server"
    );
    assert_eq!(
        response.sub, req.nats.user_nkey,
        "sub = the request's user nkey"
    );
    assert!(response.nats.error.is_none());
    let user: Claims<serde_json::Value> =
        jwt::decode_verified(response.nats.jwt.as_deref().unwrap()).unwrap();
    let acme = env.account_key("acme").await;
    assert_eq!(user.sub, req.nats.user_nkey);
    assert_eq!(user.nats["issuer_account"], acme.as_str());
    assert_ne!(
        user.iss, acme,
        "signed by a signing key, not the identity key"
    );
    assert_eq!(user.nats["type"], "user");
    assert_eq!(user.nats["version"], 2);
    assert_eq!(user.nats["pub"]["allow"], serde_json::json!(["sensors.>"]));
    assert_eq!(
        user.nats["sub"]["allow"],
        serde_json::json!(["_INBOX.>", "sensors.>"])
    );
    assert_eq!(
        (user.nats["subs"].as_i64(), user.nats["payload"].as_i64()),
        (Some(-1), Some(-1))
    );
    assert_eq!(user.exp.unwrap() - user.iat, 3600, "default TTL 1h");
    assert_eq!(user.name.as_deref(), Some("alice"));
    let typed: Claims<UserClaims> =
        jwt::decode_verified(response.nats.jwt.as_deref().unwrap()).unwrap();
    assert!(typed.nats.permissions.publish.deny.is_empty());

    // A wrong password gets a signed deny (not silence), so the server fails fast.
    let (_, bad) = server.request(&auth, "alice", "nope", 2);
    let reply = callout
        .answer(&server.sealed(&bad, &auth_xkey), Instant::now())
        .await
        .expect("answered");
    let opened = server
        .xkey
        .open(&reply, &XKey::from_public_key(&auth_xkey).unwrap())
        .unwrap();
    let deny: Claims<AuthorizationResponse> =
        jwt::decode_verified(std::str::from_utf8(&opened).unwrap()).unwrap();
    assert!(deny.nats.jwt.is_none());
    assert_eq!(deny.nats.error.as_deref(), Some("bad_password"));
}

#[tokio::test]
async fn garbage_forged_and_expired_requests_are_refused_without_harm() {
    let env = TestEnv::start().await;
    env.acme().await;
    let ids = ServiceIdentities::load(&env.pool).await.unwrap();
    let auth = ids.public_key(IdentityKind::AuthAccount).to_owned();
    let auth_xkey = ids.public_key(IdentityKind::AuthXkey).to_owned();
    let callout = env.callout.clone().unwrap();
    let server = FakeServer::new();

    let (_, good) = server.request(&auth, "alice", "s3cret", 2);
    let mut forged_parts: Vec<String> = good.split('.').map(String::from).collect();
    forged_parts[2] = forged_parts[2].chars().rev().collect();
    let forged = forged_parts.join(".");
    let (_, expired) = server.request(&auth, "alice", "s3cret", -60);
    let (_, other_account) =
        server.request(&KeyPair::new_account().public_key(), "alice", "s3cret", 2);
    // Signed by an account key pretending to be a server.
    let impostor = FakeServer {
        key: KeyPair::new_account(),
        xkey: XKey::new(),
    };
    let (_, not_a_server) = impostor.request(&auth, "alice", "s3cret", 2);

    let cases: Vec<(&str, Message)> = vec![
        ("empty", message(vec![], None)),
        ("garbage", message(b"\x00\xffnot a jwt".to_vec(), None)),
        (
            "xkv1 garbage",
            message(
                b"xkv1 definitely not a box".to_vec(),
                Some(server.xkey.public_key()),
            ),
        ),
        (
            "sealed, no header",
            message(server.sealed(&good, &auth_xkey).payload.to_vec(), None),
        ),
        (
            "sealed, bad header",
            message(
                server.sealed(&good, &auth_xkey).payload.to_vec(),
                Some("XNOTAKEY".into()),
            ),
        ),
        (
            "sealed for another xkey",
            server.sealed(&good, &XKey::new().public_key()),
        ),
        ("bad signature", server.sealed(&forged, &auth_xkey)),
        ("expired", server.sealed(&expired, &auth_xkey)),
        (
            "another callout account",
            server.sealed(&other_account, &auth_xkey),
        ),
        (
            "issuer is not a server",
            impostor.sealed(&not_a_server, &auth_xkey),
        ),
        ("huge", message(vec![b'e'; 2 << 20], None)),
    ];
    for (what, msg) in cases {
        assert!(
            callout.answer(&msg, Instant::now()).await.is_none(),
            "{what}: refused without an answer"
        );
    }
    // The service is unharmed: a real client still logs in through the real server.
    env.connect_user("alice", "s3cret")
        .await
        .expect("alice still logs in");
}
