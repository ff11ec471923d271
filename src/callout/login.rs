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

/// Everything the callout needs after the credential check. Never holds a seed.
pub struct Login {
    pub user_id: i64,
    pub role_id: Option<i64>,
    pub account_id: i64,
    pub username: Arc<str>,
    pub account_name: Box<str>,
    /// bcrypt or argon2id; None for token-only users.
    pub password_hash: Option<Box<str>>,
    pub user_active: bool,
    pub account_active: bool,
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

impl std::fmt::Debug for Login {
    // The hash stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user_id", &self.user_id)
            .field("username", &self.username)
            .field("account_id", &self.account_id)
            .field("role_id", &self.role_id)
            .finish_non_exhaustive()
    }
}

impl Login {
    /// Builds a login from its row. `signing` and `intern` come from the cache (or build fresh
    /// values when caching is off).
    pub fn prepare(
        row: LoginRow,
        defaults: &Defaults,
        default_ttl: Duration,
        max_ttl: Duration,
        signing: Signing,
        intern: impl FnOnce(Merged) -> Arc<Merged>,
    ) -> Login {
        let merged = intern(permissions::merge(&row, defaults));
        let ttl = permissions::ttl(&row, default_ttl, max_ttl);
        Login {
            user_id: row.user_id,
            role_id: row.role_id,
            account_id: row.account_id,
            foreign_role: row.role_account_id.is_some_and(|a| a != row.account_id),
            username: Arc::from(row.username),
            account_name: row.account_name.into_boxed_str(),
            password_hash: row.password_hash.map(String::into_boxed_str),
            user_active: row.user_active,
            account_active: row.account_active,
            allowed_sources: row.role_allowed_sources.filter(|s| !s.is_empty()),
            allowed_connection_types: row.role_allowed_connection_types.filter(|t| !t.is_empty()),
            signing,
            merged,
            ttl,
            signing_key_pending: row.signing_key_pending,
        }
    }

    /// Only logins that can be minted are cached, and only while no push is pending: a
    /// not-ready account becomes ready, and a newly added signing key becomes the one to use,
    /// when the sync records its push, which sends no notification.
    pub fn cacheable(&self) -> bool {
        matches!(self.signing, Signing::Ready(_)) && !self.signing_key_pending
    }
}
