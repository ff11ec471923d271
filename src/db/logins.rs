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
    /// The user's public nkey (`U…`) for nkey logins.
    pub nkey: Option<String>,
    pub user_active: bool,
    pub user_pub_allow: Vec<String>,
    pub user_pub_deny: Vec<String>,
    pub user_sub_allow: Vec<String>,
    pub user_sub_deny: Vec<String>,
    pub user_max_subscriptions: Option<i64>,
    pub user_max_data: Option<i64>,
    pub user_max_payload: Option<i64>,
    pub user_ttl_secs: Option<f64>,
    /// MQTT client ids the user may connect with; empty: any.
    pub user_mqtt_client_ids: Vec<String>,

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
    /// The account has JetStream file storage (disk limit other than 0); MQTT needs it.
    pub account_jetstream_disk: bool,
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

/// A token's `expires_at` / `revoked_at` as the service can hold them. chrono (through sqlx)
/// panics on `'infinity'` and on years past 262143, which Postgres allows; the schema refuses
/// them now (migration 0004), and rows older than that are read as what they mean: beyond year
/// 9999 is never, before 1970 is long ago.
macro_rules! token_time {
    ($col:literal) => {
        concat!(
            "CASE WHEN ",
            $col,
            " >= '10000-01-01' THEN NULL WHEN ",
            $col,
            " < 'epoch' THEN 'epoch'::timestamptz ELSE ",
            $col,
            " END"
        )
    };
}

// The columns of each part, written once: `SELECT_LOGIN` (one login) and `load` (the copy)
// select the same expressions under the same names, so both decode into the same row types.
macro_rules! user_columns {
    () => {
        r#"u.id AS user_id, u.username, u.password_hash, u.nkey, u.active AS user_active,
       u.publish_permissions AS user_pub_allow, u.publish_deny_permissions AS user_pub_deny,
       u.subscribe_permissions AS user_sub_allow, u.subscribe_deny_permissions AS user_sub_deny,
       u.max_subscriptions AS user_max_subscriptions, u.max_data AS user_max_data,
       u.max_payload AS user_max_payload,
       EXTRACT(EPOCH FROM u.user_jwt_ttl)::float8 AS user_ttl_secs,
       u.mqtt_client_ids AS user_mqtt_client_ids"#
    };
}

macro_rules! role_columns {
    () => {
        r#"r.id AS role_id, r.account_id AS role_account_id,
       r.publish_permissions AS role_pub_allow, r.publish_deny_permissions AS role_pub_deny,
       r.subscribe_permissions AS role_sub_allow, r.subscribe_deny_permissions AS role_sub_deny,
       r.allow_response AS role_allow_response, r.allow_response_max AS role_allow_response_max,
       EXTRACT(EPOCH FROM r.allow_response_ttl)::float8 AS role_allow_response_ttl_secs,
       r.max_subscriptions AS role_max_subscriptions, r.max_data AS role_max_data,
       r.max_payload AS role_max_payload,
       EXTRACT(EPOCH FROM r.user_jwt_ttl)::float8 AS role_ttl_secs,
       r.allowed_sources AS role_allowed_sources,
       r.allowed_connection_types AS role_allowed_connection_types"#
    };
}

/// Account columns; needs `signing_key!()` joined as `k`.
macro_rules! account_columns {
    () => {
        r#"a.id AS account_id, a.name AS account_name, a.active AS account_active,
       a.max_jetstream_disk_storage <> 0 AS account_jetstream_disk,
       a.public_key AS account_public_key,
       EXTRACT(EPOCH FROM a.user_jwt_ttl)::float8 AS account_ttl_secs,
       k.public_key AS signing_public_key, k.seed AS signing_seed,
       EXISTS (
           SELECT 1 FROM nats.account_keys pk
           WHERE pk.account_id = a.id AND pk.kind = 'signing' AND pk.retired_at IS NULL
             AND (a.synced_at IS NULL OR pk.created_at > a.synced_at)
       ) AS signing_key_pending"#
    };
}

macro_rules! signing_key {
    () => {
        r#"LEFT JOIN LATERAL (
    -- Newest key the server knows: a key added after the last successful push is not in the
    -- account JWT on the server yet, and a user JWT signed by it would be refused. A key that
    -- retires in the future (a graceful rotation) is still in the server's JWT until then, and
    -- is what signs while the push of its successor has not landed.
    SELECT ak.public_key, ak.seed FROM nats.account_keys ak
    WHERE ak.account_id = a.id AND ak.kind = 'signing' AND ak.seed IS NOT NULL
      AND (ak.retired_at IS NULL OR ak.retired_at > now())
      AND a.synced_at IS NOT NULL AND ak.created_at <= a.synced_at
    ORDER BY ak.created_at DESC, ak.id DESC LIMIT 1
) k ON true"#
    };
}

const SELECT_LOGIN: &str = concat!(
    "\nSELECT ",
    user_columns!(),
    ",\n       ",
    role_columns!(),
    ",\n       ",
    account_columns!(),
    "\nFROM nats.users u\nJOIN nats.accounts a ON a.id = u.account_id\nLEFT JOIN nats.roles r ON r.id = u.role_id\n",
    signing_key!(),
    "\n"
);

pub async fn by_username(pool: &PgPool, username: &str) -> Result<Option<LoginRow>, sqlx::Error> {
    let sql = format!("{SELECT_LOGIN} WHERE u.username = $1");
    sqlx::query_as(&sql)
        .bind(username)
        .fetch_optional(pool)
        .await
}

/// The username of a user id (an unlock for a user the login copy does not hold).
pub async fn username_of(pool: &PgPool, user_id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT username FROM nats.users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(pool)
        .await
}

pub async fn by_token(
    pool: &PgPool,
    token_sha256: &[u8],
) -> Result<Option<(LoginRow, TokenRow)>, sqlx::Error> {
    let sql = SELECT_LOGIN.replacen(
        "SELECT u.id AS user_id,",
        concat!(
            "SELECT t.id AS token_id, t.token_sha256, ",
            token_time!("t.expires_at"),
            " AS token_expires_at, ",
            token_time!("t.revoked_at"),
            " AS token_revoked_at, u.id AS user_id,"
        ),
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

pub async fn by_nkey(pool: &PgPool, nkey: &str) -> Result<Option<LoginRow>, sqlx::Error> {
    let sql = format!("{SELECT_LOGIN} WHERE u.nkey = $1");
    sqlx::query_as(&sql).bind(nkey).fetch_optional(pool).await
}

const CERT_COLUMNS: &str = "c.id AS cert_id, c.fingerprint_sha256, c.subject_dn, c.san";

/// The mappings that may match a certificate, with their users: every identity column a row
/// sets matches the fingerprint, one of the SANs (folded by `nats.san_folded`, the rule of
/// `normalize_san`), or the subject DN compared loosely here (ASCII case and whitespace folded by
/// `nats.dn_loose`, as `subject_loose`; the caller compares exactly). Most specific first (a fingerprint row, then
/// more columns set), as the caller chooses: the bound can only cut off less specific rows.
pub async fn by_certificate(
    pool: &PgPool,
    fingerprint_sha256: &[u8],
    sans: &[String],
    subject_loose: &str,
) -> Result<Vec<(LoginRow, CertPart)>, sqlx::Error> {
    use sqlx::FromRow;
    let sql = SELECT_LOGIN.replacen(
        "SELECT u.id AS user_id,",
        &format!("SELECT {CERT_COLUMNS}, u.id AS user_id,"),
        1,
    ) + " JOIN nats.user_certificates c ON c.user_id = u.id \
          WHERE (c.fingerprint_sha256 = $1 OR nats.san_folded(c.san) = ANY($2) \
                 OR nats.dn_loose(c.subject_dn) = $3) \
            AND (c.fingerprint_sha256 IS NULL OR c.fingerprint_sha256 = $1) \
            AND (c.san IS NULL OR nats.san_folded(c.san) = ANY($2)) \
            AND (c.subject_dn IS NULL OR nats.dn_loose(c.subject_dn) = $3) \
          ORDER BY c.fingerprint_sha256 IS NOT NULL DESC, \
                   (c.fingerprint_sha256 IS NOT NULL)::int + (c.subject_dn IS NOT NULL)::int \
                     + (c.san IS NOT NULL)::int DESC, c.id \
          LIMIT 100";
    let rows = sqlx::query(&sql)
        .bind(fingerprint_sha256)
        .bind(sans)
        .bind(subject_loose)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| Ok((LoginRow::from_row(row)?, CertPart::from_row(row)?)))
        .collect()
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

// ---- the login copy: everything every login needs, loaded in parts ----------------------------
//
// A full load of 1,000,000 users cannot afford `SELECT_LOGIN` (a lateral key lookup per user),
// so the copy reads the four tables separately, in one REPEATABLE READ snapshot, and joins them
// in memory: accounts (with the signing key the server has) and roles are few, users and tokens
// stream. [`LoginRow::assemble`] builds the same row `SELECT_LOGIN` returns, so both paths make
// their decisions from one definition.

/// Which users a (partial) load reads: everything, or the users named by id, role or account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserFilter {
    pub all: bool,
    pub users: Vec<i64>,
    pub roles: Vec<i64>,
    pub accounts: Vec<i64>,
}

impl UserFilter {
    pub fn all() -> Self {
        Self {
            all: true,
            ..Default::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.users.is_empty() && self.roles.is_empty() && self.accounts.is_empty()
    }

    fn sql(&self) -> &'static str {
        if self.all {
            "TRUE"
        } else {
            "(u.id = ANY($1) OR u.role_id = ANY($2) OR u.account_id = ANY($3))"
        }
    }
}

/// The user's own columns.
#[derive(Clone, sqlx::FromRow)]
pub struct UserPart {
    pub user_id: i64,
    pub username: String,
    pub password_hash: Option<String>,
    /// The user's public nkey (`U…`) for nkey logins.
    pub nkey: Option<String>,
    pub user_active: bool,
    pub user_pub_allow: Vec<String>,
    pub user_pub_deny: Vec<String>,
    pub user_sub_allow: Vec<String>,
    pub user_sub_deny: Vec<String>,
    pub user_max_subscriptions: Option<i64>,
    pub user_max_data: Option<i64>,
    pub user_max_payload: Option<i64>,
    pub user_ttl_secs: Option<f64>,
    /// MQTT client ids the user may connect with; empty: any.
    pub user_mqtt_client_ids: Vec<String>,
    pub role_id: Option<i64>,
    pub account_id: i64,
}

impl UserPart {
    /// True when nothing of the user changes what its role and account give (the usual case):
    /// such users share one prepared shape per (role, account).
    pub fn has_overrides(&self) -> bool {
        !self.user_pub_allow.is_empty()
            || !self.user_pub_deny.is_empty()
            || !self.user_sub_allow.is_empty()
            || !self.user_sub_deny.is_empty()
            || self.user_max_subscriptions.is_some()
            || self.user_max_data.is_some()
            || self.user_max_payload.is_some()
            || self.user_ttl_secs.is_some()
    }
}

/// A role's columns, as `SELECT_LOGIN` names them.
#[derive(Clone, sqlx::FromRow)]
pub struct RolePart {
    pub role_id: i64,
    /// NULL: a role shared by every account.
    pub role_account_id: Option<i64>,
    pub role_pub_allow: Vec<String>,
    pub role_pub_deny: Vec<String>,
    pub role_sub_allow: Vec<String>,
    pub role_sub_deny: Vec<String>,
    pub role_allow_response: bool,
    pub role_allow_response_max: Option<i32>,
    pub role_allow_response_ttl_secs: Option<f64>,
    pub role_max_subscriptions: Option<i64>,
    pub role_max_data: Option<i64>,
    pub role_max_payload: Option<i64>,
    pub role_ttl_secs: Option<f64>,
    pub role_allowed_sources: Option<Vec<IpNetwork>>,
    pub role_allowed_connection_types: Option<Vec<String>>,
}

/// An account with the signing key the server has, as `SELECT_LOGIN` names them.
#[derive(Clone, sqlx::FromRow)]
pub struct AccountPart {
    pub account_id: i64,
    pub account_name: String,
    pub account_active: bool,
    /// The account has JetStream file storage (disk limit other than 0); MQTT needs it.
    pub account_jetstream_disk: bool,
    pub account_public_key: Option<String>,
    pub account_ttl_secs: Option<f64>,
    pub signing_public_key: Option<String>,
    pub signing_seed: Option<String>,
    pub signing_key_pending: bool,
}

/// A certificate mapping with its owner (identity columns as stored; see
/// [`crate::callout::certificate`] for how they are compared).
#[derive(Clone, sqlx::FromRow)]
pub struct CertPart {
    pub user_id: i64,
    pub cert_id: i64,
    pub fingerprint_sha256: Option<Vec<u8>>,
    pub subject_dn: Option<String>,
    pub san: Option<String>,
}

/// A token with its owner.
#[derive(Clone, sqlx::FromRow)]
pub struct TokenPart {
    pub user_id: i64,
    pub token_id: i64,
    pub token_sha256: Vec<u8>,
    pub token_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub token_revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl LoginRow {
    /// The row `SELECT_LOGIN` would return for this user, role and account.
    pub fn assemble(user: UserPart, role: Option<&RolePart>, account: &AccountPart) -> LoginRow {
        LoginRow {
            user_id: user.user_id,
            username: user.username,
            password_hash: user.password_hash,
            nkey: user.nkey,
            user_active: user.user_active,
            user_pub_allow: user.user_pub_allow,
            user_pub_deny: user.user_pub_deny,
            user_sub_allow: user.user_sub_allow,
            user_sub_deny: user.user_sub_deny,
            user_max_subscriptions: user.user_max_subscriptions,
            user_max_data: user.user_max_data,
            user_max_payload: user.user_max_payload,
            user_ttl_secs: user.user_ttl_secs,
            user_mqtt_client_ids: user.user_mqtt_client_ids,
            role_id: role.map(|r| r.role_id),
            role_account_id: role.and_then(|r| r.role_account_id),
            role_pub_allow: role.map(|r| r.role_pub_allow.clone()),
            role_pub_deny: role.map(|r| r.role_pub_deny.clone()),
            role_sub_allow: role.map(|r| r.role_sub_allow.clone()),
            role_sub_deny: role.map(|r| r.role_sub_deny.clone()),
            role_allow_response: role.map(|r| r.role_allow_response),
            role_allow_response_max: role.and_then(|r| r.role_allow_response_max),
            role_allow_response_ttl_secs: role.and_then(|r| r.role_allow_response_ttl_secs),
            role_max_subscriptions: role.and_then(|r| r.role_max_subscriptions),
            role_max_data: role.and_then(|r| r.role_max_data),
            role_max_payload: role.and_then(|r| r.role_max_payload),
            role_ttl_secs: role.and_then(|r| r.role_ttl_secs),
            role_allowed_sources: role.and_then(|r| r.role_allowed_sources.clone()),
            role_allowed_connection_types: role
                .and_then(|r| r.role_allowed_connection_types.clone()),
            account_id: account.account_id,
            account_name: account.account_name.clone(),
            account_active: account.account_active,
            account_jetstream_disk: account.account_jetstream_disk,
            account_public_key: account.account_public_key.clone(),
            account_ttl_secs: account.account_ttl_secs,
            signing_public_key: account.signing_public_key.clone(),
            signing_seed: account.signing_seed.clone(),
            signing_key_pending: account.signing_key_pending,
        }
    }
}

/// What a load found besides the users (which are streamed to the caller).
pub struct Loaded {
    pub accounts: Vec<AccountPart>,
    pub roles: Vec<RolePart>,
    pub tokens: Vec<TokenPart>,
    pub certificates: Vec<CertPart>,
    pub users: usize,
    /// The snapshot the whole read saw (full loads only): the change log continues from it.
    pub snapshot: Option<super::changes::Snapshot>,
}

/// Reads the users `filter` selects, with their roles, accounts and tokens, from one snapshot.
/// Accounts and roles come first; `on_user` sees each user as it arrives (nothing holds all
/// of them as rows at once).
pub async fn load(
    pool: &PgPool,
    filter: &UserFilter,
    mut on_user: impl FnMut(UserPart, &[AccountPart], &[RolePart]),
) -> Result<Loaded, sqlx::Error> {
    use futures::TryStreamExt;
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    if filter.all {
        // A full load streams every user: a statement bound of its own (the lock bound stays,
        // see `db::LOCK_TIMEOUT`).
        sqlx::query(&format!(
            "SET LOCAL statement_timeout = '{}ms'",
            super::FULL_LOAD_STATEMENT_TIMEOUT.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
    }
    // REPEATABLE READ: every statement below, and this one, see the transaction's snapshot.
    let snapshot = if filter.all {
        Some(super::changes::current(&mut *tx).await?)
    } else {
        None
    };
    let f = filter.sql();
    let accounts_sql = format!(
        "SELECT {} FROM nats.accounts a {}
         WHERE a.id IN (SELECT u.account_id FROM nats.users u WHERE {f}) ORDER BY a.id",
        account_columns!(),
        signing_key!()
    );
    let roles_sql = format!(
        "SELECT {} FROM nats.roles r
         WHERE r.id IN (SELECT u.role_id FROM nats.users u WHERE {f}) ORDER BY r.id",
        role_columns!()
    );
    let users_sql = format!(
        "SELECT {}, u.role_id, u.account_id FROM nats.users u WHERE {f}",
        user_columns!()
    );
    let tokens_sql = format!(
        r#"SELECT t.user_id, t.id AS token_id, t.token_sha256, {} AS token_expires_at,
               {} AS token_revoked_at
        FROM nats.user_tokens t
        WHERE t.user_id IN (SELECT u.id FROM nats.users u WHERE {f})"#,
        token_time!("t.expires_at"),
        token_time!("t.revoked_at"),
    );
    let certificates_sql = format!(
        "SELECT c.user_id, {CERT_COLUMNS} FROM nats.user_certificates c
         WHERE c.user_id IN (SELECT u.id FROM nats.users u WHERE {f})"
    );
    macro_rules! bound {
        ($q:expr) => {
            if filter.all {
                $q
            } else {
                $q.bind(&filter.users)
                    .bind(&filter.roles)
                    .bind(&filter.accounts)
            }
        };
    }
    let accounts: Vec<AccountPart> = bound!(sqlx::query_as(&accounts_sql))
        .fetch_all(&mut *tx)
        .await?;
    let roles: Vec<RolePart> = bound!(sqlx::query_as(&roles_sql))
        .fetch_all(&mut *tx)
        .await?;
    let mut users = 0usize;
    {
        let mut rows = bound!(sqlx::query_as::<_, UserPart>(&users_sql)).fetch(&mut *tx);
        while let Some(user) = rows.try_next().await? {
            users += 1;
            on_user(user, &accounts, &roles);
        }
    }
    let tokens: Vec<TokenPart> = bound!(sqlx::query_as(&tokens_sql))
        .fetch_all(&mut *tx)
        .await?;
    let certificates: Vec<CertPart> = bound!(sqlx::query_as(&certificates_sql))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Loaded {
        accounts,
        roles,
        tokens,
        certificates,
        users,
        snapshot,
    })
}
