//! What a login reads: a user with its role, its account and the account's signing key, in one
//! round trip (by username or by token hash).

use ipnetwork::IpNetwork;
use sqlx::PgPool;

/// Everything the callout needs to decide and mint. Intervals arrive as seconds (`f64`) so
/// months/days of `interval` never need converting here.
#[derive(Clone, sqlx::FromRow)]
pub struct LoginRow {
    pub user_id: i64,
    pub username: String,
    pub password_hash: Option<String>,
    pub user_active: bool,
    pub user_pub_allow: Vec<String>,
    pub user_pub_deny: Vec<String>,
    pub user_sub_allow: Vec<String>,
    pub user_sub_deny: Vec<String>,
    pub user_max_subscriptions: Option<i64>,
    pub user_max_data: Option<i64>,
    pub user_max_payload: Option<i64>,
    pub user_ttl_secs: Option<f64>,

    pub role_id: Option<i64>,
    pub role_account_id: Option<i64>,
    pub role_pub_allow: Option<Vec<String>>,
    pub role_pub_deny: Option<Vec<String>>,
    pub role_sub_allow: Option<Vec<String>>,
    pub role_sub_deny: Option<Vec<String>>,
    pub role_allow_response: Option<bool>,
    pub role_allow_response_max: Option<i32>,
    pub role_allow_response_ttl_secs: Option<f64>,
    pub role_max_subscriptions: Option<i64>,
    pub role_max_data: Option<i64>,
    pub role_max_payload: Option<i64>,
    pub role_ttl_secs: Option<f64>,
    pub role_allowed_sources: Option<Vec<IpNetwork>>,
    pub role_allowed_connection_types: Option<Vec<String>>,

    pub account_id: i64,
    pub account_name: String,
    pub account_active: bool,
    pub account_public_key: Option<String>,
    pub account_ttl_secs: Option<f64>,
    /// Newest signing key that the server already has (created before the last good push).
    pub signing_public_key: Option<String>,
    pub signing_seed: Option<String>,
    /// A signing key exists that the server does not have yet (created after the last good
    /// push). The row will change when the push lands, and that sends no notification, so a
    /// login read in this state must not be cached.
    pub signing_key_pending: bool,
}

impl std::fmt::Debug for LoginRow {
    // Hashes and seeds stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRow")
            .field("user_id", &self.user_id)
            .field("username", &self.username)
            .field("account_id", &self.account_id)
            .field("role_id", &self.role_id)
            .finish_non_exhaustive()
    }
}

/// Token fields that decide whether a token login is allowed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenRow {
    pub token_id: i64,
    pub token_sha256: Vec<u8>,
    pub token_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub token_revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

const SELECT_LOGIN: &str = r#"
SELECT u.id AS user_id, u.username, u.password_hash, u.active AS user_active,
       u.publish_permissions AS user_pub_allow, u.publish_deny_permissions AS user_pub_deny,
       u.subscribe_permissions AS user_sub_allow, u.subscribe_deny_permissions AS user_sub_deny,
       u.max_subscriptions AS user_max_subscriptions, u.max_data AS user_max_data,
       u.max_payload AS user_max_payload,
       EXTRACT(EPOCH FROM u.user_jwt_ttl)::float8 AS user_ttl_secs,
       r.id AS role_id, r.account_id AS role_account_id,
       r.publish_permissions AS role_pub_allow, r.publish_deny_permissions AS role_pub_deny,
       r.subscribe_permissions AS role_sub_allow, r.subscribe_deny_permissions AS role_sub_deny,
       r.allow_response AS role_allow_response, r.allow_response_max AS role_allow_response_max,
       EXTRACT(EPOCH FROM r.allow_response_ttl)::float8 AS role_allow_response_ttl_secs,
       r.max_subscriptions AS role_max_subscriptions, r.max_data AS role_max_data,
       r.max_payload AS role_max_payload,
       EXTRACT(EPOCH FROM r.user_jwt_ttl)::float8 AS role_ttl_secs,
       r.allowed_sources AS role_allowed_sources,
       r.allowed_connection_types AS role_allowed_connection_types,
       a.id AS account_id, a.name AS account_name, a.active AS account_active,
       a.public_key AS account_public_key,
       EXTRACT(EPOCH FROM a.user_jwt_ttl)::float8 AS account_ttl_secs,
       k.public_key AS signing_public_key, k.seed AS signing_seed,
       EXISTS (
           SELECT 1 FROM nats.account_keys pk
           WHERE pk.account_id = a.id AND pk.kind = 'signing' AND pk.retired_at IS NULL
             AND (a.synced_at IS NULL OR pk.created_at > a.synced_at)
       ) AS signing_key_pending
FROM nats.users u
JOIN nats.accounts a ON a.id = u.account_id
LEFT JOIN nats.roles r ON r.id = u.role_id
LEFT JOIN LATERAL (
    -- Newest key the server knows: a key added after the last successful push is not in the
    -- account JWT on the server yet, and a user JWT signed by it would be refused.
    SELECT ak.public_key, ak.seed FROM nats.account_keys ak
    WHERE ak.account_id = a.id AND ak.kind = 'signing' AND ak.retired_at IS NULL
      AND a.synced_at IS NOT NULL AND ak.created_at <= a.synced_at
    ORDER BY ak.created_at DESC, ak.id DESC LIMIT 1
) k ON true
"#;

pub async fn by_username(pool: &PgPool, username: &str) -> Result<Option<LoginRow>, sqlx::Error> {
    let sql = format!("{SELECT_LOGIN} WHERE u.username = $1");
    sqlx::query_as(&sql)
        .bind(username)
        .fetch_optional(pool)
        .await
}

pub async fn by_token(
    pool: &PgPool,
    token_sha256: &[u8],
) -> Result<Option<(LoginRow, TokenRow)>, sqlx::Error> {
    let sql = SELECT_LOGIN.replacen(
        "SELECT u.id AS user_id,",
        "SELECT t.id AS token_id, t.token_sha256, t.expires_at AS token_expires_at, t.revoked_at AS token_revoked_at, u.id AS user_id,",
        1,
    ) + " JOIN nats.user_tokens t ON t.user_id = u.id WHERE t.token_sha256 = $1";
    // JOIN after the LATERAL is fine in Postgres; keep the token join last so SELECT_LOGIN
    // stays the one definition of what a login reads.
    let row = sqlx::query(&sql)
        .bind(token_sha256)
        .fetch_optional(pool)
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            use sqlx::FromRow;
            Ok(Some((LoginRow::from_row(&row)?, TokenRow::from_row(&row)?)))
        }
    }
}

/// Best effort bookkeeping; a failure here must never fail a login.
pub async fn touch_token(pool: &PgPool, token_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE nats.user_tokens SET last_used_at = now() \
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(token_id)
    .execute(pool)
    .await?;
    Ok(())
}
