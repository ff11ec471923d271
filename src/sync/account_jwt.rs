//! Building a tenant account JWT from its row and keys.

use crate::db::accounts::AccountRow;
use crate::jwt::claims::{AccountClaims, AccountLimits};
use crate::jwt::Claims;

/// Every limit is written explicitly: an omitted limit decodes as 0, and 0 is enforced
/// (protocol doc §6.2 — an omitted `conn` locks the account).
pub fn limits(row: &AccountRow) -> AccountLimits {
    AccountLimits {
        subs: row.max_subscriptions,
        data: row.max_data,
        payload: row.max_payload,
        imports: row.max_imports,
        exports: row.max_exports,
        wildcards: row.allow_wildcard_exports,
        disallow_bearer: false,
        conn: row.max_connections,
        leaf: row.max_leafnodes,
        mem_storage: row.max_jetstream_memory_storage,
        disk_storage: row.max_jetstream_disk_storage,
        streams: row.max_jetstream_streams,
        consumer: row.max_jetstream_consumers,
        max_ack_pending: -1,
        mem_max_stream_bytes: 0,
        disk_max_stream_bytes: 0,
        max_bytes_required: false,
    }
}

/// `iat` must grow strictly between pushes of one account: the full resolver skips a JWT whose
/// `jti` equals the stored one, and two JWTs of the same second can share it (protocol §1.3).
pub fn next_iat(previous_jwt: Option<&str>, now: i64) -> i64 {
    let prev = previous_jwt
        .and_then(crate::jwt::iat_of)
        .unwrap_or(i64::MIN);
    now.max(prev.saturating_add(1))
}

/// The account claims (unsigned). `signing_keys` are the public keys still valid.
pub fn build(
    row: &AccountRow,
    public_key: &str,
    signing_keys: Vec<String>,
    iat: i64,
) -> Claims<AccountClaims> {
    let mut nats = AccountClaims {
        limits: limits(row),
        signing_keys,
        ..Default::default()
    };
    // Inactive accounts get `revocations {"*": iat}` when signed (see Sync::push).
    if let Some(d) = row.description.as_deref().filter(|d| !d.is_empty()) {
        nats.description = Some(d.to_owned());
    }
    Claims {
        aud: None,
        exp: None,
        jti: String::new(),
        iat,
        iss: String::new(),
        name: Some(row.name.clone()),
        nbf: None,
        sub: public_key.to_owned(),
        nats,
    }
}
