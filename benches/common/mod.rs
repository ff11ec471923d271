//! Inputs shared by the benchmarks: a fake nats-server that builds real authorization
//! requests (signed by a server key, sealed to the AUTH xkey), and a realistic login row.

#![allow(dead_code)]

use async_nats::{HeaderMap, Message};
use nats_pg_auth::db::logins::LoginRow;
use nats_pg_auth::jwt::claims::{AuthorizationRequest, Secret};
use nats_pg_auth::jwt::{self, Claims};
use nkeys::{KeyPair, XKey};

/// What a client presents.
pub enum Credential<'a> {
    Password(&'a str, &'a str),
    Token(&'a str),
}

/// A fake nats-server: its identity key and its curve key.
pub struct FakeServer {
    pub key: KeyPair,
    pub xkey: XKey,
    auth_account: String,
    auth_xkey: XKey,
}

impl FakeServer {
    pub fn new(auth_account: &str, auth_xkey_public: &str) -> Self {
        Self {
            key: KeyPair::new_server(),
            xkey: XKey::new(),
            auth_account: auth_account.to_owned(),
            auth_xkey: XKey::from_public_key(auth_xkey_public).expect("AUTH xkey"),
        }
    }

    /// The signed request JWT, as the server builds it for one client.
    pub fn request_jwt(&self, cred: &Credential<'_>) -> String {
        let mut nats = AuthorizationRequest::default();
        nats.server_id.id = self.key.public_key();
        nats.server_id.name = "bench".into();
        nats.server_id.xkey = Some(self.xkey.public_key());
        nats.user_nkey = KeyPair::new_user().public_key();
        nats.client_info.host = Some("127.0.0.1".into());
        nats.client_info.id = 42;
        nats.client_info.kind = Some("Client".into());
        nats.client_info.client_type = Some("nats".into());
        match cred {
            Credential::Password(user, pass) => {
                nats.connect_opts.user = Some((*user).into());
                nats.connect_opts.pass = Secret::new(*pass);
            }
            Credential::Token(token) => nats.connect_opts.auth_token = Secret::new(*token),
        }
        let now = jwt::now_unix();
        let claims = Claims {
            aud: Some("nats-authorization-request".into()),
            exp: Some(now + 2),
            jti: String::new(),
            iat: now,
            iss: String::new(),
            name: None,
            nbf: None,
            sub: self.auth_account.clone(),
            nats,
        };
        jwt::encode(&claims, &self.key).expect("sign request")
    }

    /// The message the callout receives: the request sealed to the AUTH xkey.
    pub fn message(&self, cred: &Credential<'_>) -> Message {
        let token = self.request_jwt(cred);
        let payload = self
            .xkey
            .seal(token.as_bytes(), &self.auth_xkey)
            .expect("seal");
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Server-Xkey", self.xkey.public_key().as_str());
        Message {
            subject: "$SYS.REQ.USER.AUTH".into(),
            reply: Some("$SYS._INBOX.bench.reply".into()),
            length: payload.len(),
            payload: payload.into(),
            headers: Some(headers),
            status: None,
            description: None,
        }
    }
}

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A user with a role of typical size: a handful of allow and deny subjects each side, plus
/// two subjects of the user's own.
pub fn login_row(account_public_key: &str, signing: &KeyPair, stored_seed: &str) -> LoginRow {
    LoginRow {
        user_id: 7,
        username: "sensor-0001".into(),
        password_hash: Some("$2b$10$Y5b1dW8Oq8N3Tbq7u3jY1eE8m4C7wWl6o5v9X0xH0x7h3lQe6dG1K".into()),
        nkey: None,
        user_active: true,
        user_pub_allow: v(&["alerts.sensor-0001.>", "telemetry.sensor-0001"]),
        user_pub_deny: vec![],
        user_sub_allow: v(&["cmd.sensor-0001.>"]),
        user_sub_deny: vec![],
        user_max_subscriptions: None,
        user_max_data: None,
        user_max_payload: Some(65536),
        user_ttl_secs: None,
        user_mqtt_client_ids: vec![],
        role_id: Some(3),
        role_account_id: Some(1),
        role_pub_allow: Some(v(&["sensors.>", "telemetry.>", "events.>", "$JS.API.>"])),
        role_pub_deny: Some(v(&["sensors.admin.>", "events.audit"])),
        role_sub_allow: Some(v(&["sensors.>", "_INBOX.>", "cmd.broadcast"])),
        role_sub_deny: Some(v(&["sensors.secret.>"])),
        role_allow_response: Some(true),
        role_allow_response_max: Some(1),
        role_allow_response_ttl_secs: Some(5.0),
        role_max_subscriptions: Some(100),
        role_max_data: None,
        role_max_payload: None,
        role_ttl_secs: Some(3600.0),
        role_allowed_sources: None,
        role_allowed_connection_types: None,
        account_id: 1,
        account_name: "acme".into(),
        account_active: true,
        account_jetstream_disk: false,
        account_public_key: Some(account_public_key.to_owned()),
        account_ttl_secs: None,
        signing_public_key: Some(signing.public_key()),
        signing_seed: Some(stored_seed.to_owned()),
        signing_key_pending: false,
    }
}
