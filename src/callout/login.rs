//! A login row prepared for deciding and minting: what `authorize` needs and nothing else.
//!
//! The raw [`LoginRow`] carries every column of the user, its role and its account (~1.5 KB with
//! the encrypted signing seed and the permission arrays). A `Login` keeps the merged permission
//! set (interned, so the users of one role share it), the JWT TTL, and the account's parsed
//! signing key (shared by every user of the account). This is what the login caches hold, so
//! 100,000 cached users stay within a few tens of megabytes.

use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use nkeys::KeyPair;

use super::permissions::{self, Defaults, Merged};
use crate::db::logins::LoginRow;

/// An account's signing key, parsed once (AES-GCM open + seed decode) and shared.
pub struct Issuer {
    /// The account's identity public key (`issuer_account` in the user JWT).
    pub account: String,
    pub signing_public_key: String,
    pub keypair: KeyPair,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("account", &self.account)
            .field("signing_public_key", &self.signing_public_key)
            .finish_non_exhaustive()
    }
}

/// Whether the account can have users minted for it.
#[derive(Debug, Clone)]
pub enum Signing {
    Ready(Arc<Issuer>),
    /// No identity yet, or no signing key the server already has (sync pending).
    NotReady,
    /// The stored seed cannot be opened (wrong encryption key, corrupt row).
    Unusable(String),
}

/// What a login has in common with every other user of the same role, account and overrides
/// (usually: all users of a role). Interned, so 100,000 cached users of one role hold one copy.
pub struct Shape {
    pub role_id: Option<i64>,
    pub account_id: i64,
    pub account_name: Box<str>,
    pub account_active: bool,
    /// The account has JetStream file storage (MQTT clients need it; see `authorize`).
    pub account_jetstream_disk: bool,
    /// The role belongs to another account (the schema refuses this; deny if it happens).
    pub foreign_role: bool,
    pub allowed_sources: Option<Vec<IpNetwork>>,
    pub allowed_connection_types: Option<Vec<String>>,
    pub signing: Signing,
    pub merged: Arc<Merged>,
    pub ttl: Duration,
    /// See [`LoginRow::signing_key_pending`].
    pub signing_key_pending: bool,
}

impl Signing {
    /// What identifies the signing state (a public key has exactly one seed).
    fn identity(&self) -> (u8, &str) {
        match self {
            Signing::Ready(i) => (0, &i.signing_public_key),
            Signing::NotReady => (1, ""),
            Signing::Unusable(why) => (2, why),
        }
    }
}

impl PartialEq for Shape {
    fn eq(&self, o: &Self) -> bool {
        self.role_id == o.role_id
            && self.account_id == o.account_id
            && self.account_name == o.account_name
            && self.account_active == o.account_active
            && self.account_jetstream_disk == o.account_jetstream_disk
            && self.foreign_role == o.foreign_role
            && self.allowed_sources == o.allowed_sources
            && self.allowed_connection_types == o.allowed_connection_types
            && self.signing.identity() == o.signing.identity()
            && self.merged == o.merged
            && self.ttl == o.ttl
            && self.signing_key_pending == o.signing_key_pending
    }
}

impl Eq for Shape {}

impl std::hash::Hash for Shape {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.role_id.hash(h);
        self.account_id.hash(h);
        self.signing.identity().hash(h);
        self.merged.hash(h);
        self.ttl.hash(h);
    }
}

/// Everything the callout needs after the credential check. Never holds a seed.
pub struct Login {
    pub user_id: i64,
    pub username: Arc<str>,
    /// bcrypt or argon2id; None for token-only users.
    pub password_hash: Option<Box<str>>,
    /// Public nkey (`U…`) the user may log in with.
    pub nkey: Option<Box<str>>,
    pub user_active: bool,
    /// MQTT client ids the user may connect with; empty: any.
    pub mqtt_client_ids: Box<[Box<str>]>,
    pub shape: Arc<Shape>,
}

impl std::fmt::Debug for Login {
    // The hash stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user_id", &self.user_id)
            .field("username", &self.username)
            .field("account_id", &self.shape.account_id)
            .field("role_id", &self.shape.role_id)
            .finish_non_exhaustive()
    }
}

impl Login {
    /// Builds a login from its row. `signing`, `intern` and `intern_shape` come from the cache
    /// (or build fresh values when caching is off).
    pub fn prepare(
        row: LoginRow,
        defaults: &Defaults,
        default_ttl: Duration,
        max_ttl: Duration,
        signing: Signing,
        intern: impl FnOnce(Merged) -> Arc<Merged>,
        intern_shape: impl FnOnce(Shape) -> Arc<Shape>,
    ) -> Login {
        let merged = intern(permissions::merge(&row, defaults));
        let ttl = permissions::ttl(&row, default_ttl, max_ttl);
        let shape = intern_shape(Shape {
            role_id: row.role_id,
            account_id: row.account_id,
            foreign_role: row.role_account_id.is_some_and(|a| a != row.account_id),
            account_name: row.account_name.into_boxed_str(),
            account_active: row.account_active,
            account_jetstream_disk: row.account_jetstream_disk,
            allowed_sources: row.role_allowed_sources.filter(|s| !s.is_empty()),
            allowed_connection_types: row.role_allowed_connection_types.filter(|t| !t.is_empty()),
            signing,
            merged,
            ttl,
            signing_key_pending: row.signing_key_pending,
        });
        Login {
            user_id: row.user_id,
            username: Arc::from(row.username),
            password_hash: row.password_hash.map(String::into_boxed_str),
            nkey: row.nkey.map(String::into_boxed_str),
            user_active: row.user_active,
            mqtt_client_ids: row
                .user_mqtt_client_ids
                .into_iter()
                .map(String::into_boxed_str)
                .collect(),
            shape,
        }
    }

    /// Only logins that can be minted are cached, and only while no push is pending: a
    /// not-ready account becomes ready, and a newly added signing key becomes the one to use,
    /// when the sync records its push, which sends no notification.
    pub fn cacheable(&self) -> bool {
        matches!(self.shape.signing, Signing::Ready(_)) && !self.shape.signing_key_pending
    }
}
