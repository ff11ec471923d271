//! What the admin CLI reads and changes (`account|role|user|token` verbs). Never selects a
//! password hash or a seed. Times come back as RFC 3339 text (UTC), intervals as seconds.

use serde::Serialize;
use sqlx::PgPool;

/// A timestamp column as RFC 3339 UTC text.
macro_rules! ts {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        )
    };
}

/// An interval column as seconds.
macro_rules! secs {
    ($col:literal) => {
        concat!("EXTRACT(EPOCH FROM ", $col, ")::float8")
    };
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Account {
    pub name: String,
    pub active: bool,
    pub description: Option<String>,
    pub public_key: Option<String>,
    pub max_connections: i64,
    pub max_subscriptions: i64,
    pub max_data: i64,
    pub max_payload: i64,
    pub user_jwt_ttl_secs: Option<f64>,
    pub users: i64,
    pub roles: i64,
    pub synced_at: Option<String>,
    pub sync_error: Option<String>,
    pub created_at: String,
}

const ACCOUNTS: &str = concat!(
    "SELECT a.name, a.active, a.description, a.public_key, a.max_connections, a.max_subscriptions,
            a.max_data, a.max_payload, ",
    secs!("a.user_jwt_ttl"),
    " AS user_jwt_ttl_secs,
            (SELECT count(*) FROM nats.users u WHERE u.account_id = a.id) AS users,
            (SELECT count(*) FROM nats.roles r WHERE r.account_id = a.id) AS roles, ",
    ts!("a.synced_at"),
    " AS synced_at, a.sync_error, ",
    ts!("a.created_at"),
    " AS created_at
     FROM nats.accounts a"
);

pub async fn accounts(pool: &PgPool) -> Result<Vec<Account>, sqlx::Error> {
    sqlx::query_as(&format!("{ACCOUNTS} ORDER BY a.name"))
        .fetch_all(pool)
        .await
}

pub async fn account(pool: &PgPool, name: &str) -> Result<Option<Account>, sqlx::Error> {
    sqlx::query_as(&format!("{ACCOUNTS} WHERE a.name = $1"))
        .bind(name)
        .fetch_optional(pool)
        .await
}

/// Sets `active`; false when there is no such account.
pub async fn set_account_active(
    pool: &PgPool,
    name: &str,
    active: bool,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE nats.accounts SET active = $2 WHERE name = $1")
        .bind(name)
        .bind(active)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub async fn account_exists(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM nats.accounts WHERE name = $1)")
        .bind(name)
        .fetch_one(pool)
        .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Role {
    pub name: String,
    /// None: a global role, usable by every account.
    pub account: Option<String>,
    pub description: Option<String>,
    pub publish_allow: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe_allow: Vec<String>,
    pub subscribe_deny: Vec<String>,
    pub allow_response: bool,
    pub allow_response_max: i32,
    pub allow_response_ttl_secs: Option<f64>,
    pub max_subscriptions: i64,
    pub max_data: i64,
    pub max_payload: i64,
    pub user_jwt_ttl_secs: Option<f64>,
    pub allowed_sources: Vec<String>,
    pub allowed_connection_types: Vec<String>,
    pub users: i64,
}

const ROLES: &str = concat!(
    "SELECT r.name, a.name AS account, r.description,
            r.publish_permissions AS publish_allow, r.publish_deny_permissions AS publish_deny,
            r.subscribe_permissions AS subscribe_allow, r.subscribe_deny_permissions AS subscribe_deny,
            r.allow_response, r.allow_response_max, ",
    secs!("r.allow_response_ttl"),
    " AS allow_response_ttl_secs, r.max_subscriptions, r.max_data, r.max_payload, ",
    secs!("r.user_jwt_ttl"),
    " AS user_jwt_ttl_secs, r.allowed_sources::text[] AS allowed_sources,
            r.allowed_connection_types,
            (SELECT count(*) FROM nats.users u WHERE u.role_id = r.id) AS users
     FROM nats.roles r LEFT JOIN nats.accounts a ON a.id = r.account_id"
);

/// Every role, or those usable by `account` (its own and the global ones).
pub async fn roles(pool: &PgPool, account: Option<&str>) -> Result<Vec<Role>, sqlx::Error> {
    sqlx::query_as(&format!(
        "{ROLES} WHERE $1::text IS NULL OR a.name = $1 OR r.account_id IS NULL
         ORDER BY a.name NULLS FIRST, r.name"
    ))
    .bind(account)
    .fetch_all(pool)
    .await
}

/// The roles named `name`: of `account` (or global), or of any account.
pub async fn roles_named(
    pool: &PgPool,
    name: &str,
    account: Option<&str>,
) -> Result<Vec<Role>, sqlx::Error> {
    sqlx::query_as(&format!(
        "{ROLES} WHERE r.name = $1 AND ($2::text IS NULL OR a.name = $2 OR r.account_id IS NULL)
         ORDER BY a.name NULLS LAST"
    ))
    .bind(name)
    .bind(account)
    .fetch_all(pool)
    .await
}

pub async fn role_name(pool: &PgPool, id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM nats.roles WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct User {
    pub username: String,
    pub account: String,
    pub role: Option<String>,
    pub active: bool,
    /// Whether a password is set (the hash itself is never shown).
    pub has_password: bool,
    pub description: Option<String>,
    pub publish_allow: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe_allow: Vec<String>,
    pub subscribe_deny: Vec<String>,
    pub max_subscriptions: Option<i64>,
    pub max_data: Option<i64>,
    pub max_payload: Option<i64>,
    pub user_jwt_ttl_secs: Option<f64>,
    /// Tokens neither revoked nor expired.
    pub active_tokens: i64,
    pub created_at: String,
}

const USERS: &str = concat!(
    "SELECT u.username, a.name AS account, r.name AS role, u.active,
            u.password_hash IS NOT NULL AS has_password, u.description,
            u.publish_permissions AS publish_allow, u.publish_deny_permissions AS publish_deny,
            u.subscribe_permissions AS subscribe_allow, u.subscribe_deny_permissions AS subscribe_deny,
            u.max_subscriptions, u.max_data, u.max_payload, ",
    secs!("u.user_jwt_ttl"),
    " AS user_jwt_ttl_secs,
            (SELECT count(*) FROM nats.user_tokens t WHERE t.user_id = u.id AND t.revoked_at IS NULL
               AND (t.expires_at IS NULL OR t.expires_at > now())) AS active_tokens, ",
    ts!("u.created_at"),
    " AS created_at
     FROM nats.users u JOIN nats.accounts a ON a.id = u.account_id
     LEFT JOIN nats.roles r ON r.id = u.role_id"
);

pub async fn users(pool: &PgPool, account: Option<&str>) -> Result<Vec<User>, sqlx::Error> {
    sqlx::query_as(&format!(
        "{USERS} WHERE $1::text IS NULL OR a.name = $1 ORDER BY u.username"
    ))
    .bind(account)
    .fetch_all(pool)
    .await
}

pub async fn user(pool: &PgPool, username: &str) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(&format!("{USERS} WHERE u.username = $1"))
        .bind(username)
        .fetch_optional(pool)
        .await
}

pub async fn user_exists(pool: &PgPool, username: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM nats.users WHERE username = $1)")
        .bind(username)
        .fetch_one(pool)
        .await
}

/// Sets `active`; false when there is no such user.
pub async fn set_user_active(
    pool: &PgPool,
    username: &str,
    active: bool,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE nats.users SET active = $2 WHERE username = $1")
        .bind(username)
        .bind(active)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Token {
    pub id: i64,
    pub username: String,
    pub description: Option<String>,
    /// `active`, `expired` or `revoked`.
    pub state: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub last_used_at: Option<String>,
}

pub async fn tokens(pool: &PgPool, username: Option<&str>) -> Result<Vec<Token>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT t.id, u.username, t.description,
                CASE WHEN t.revoked_at IS NOT NULL THEN 'revoked'
                     WHEN t.expires_at IS NOT NULL AND t.expires_at <= now() THEN 'expired'
                     ELSE 'active' END AS state, ",
        ts!("t.created_at"),
        " AS created_at, ",
        ts!("t.expires_at"),
        " AS expires_at, ",
        ts!("t.revoked_at"),
        " AS revoked_at, ",
        ts!("t.last_used_at"),
        " AS last_used_at
         FROM nats.user_tokens t JOIN nats.users u ON u.id = t.user_id
         WHERE $1::text IS NULL OR u.username = $1
         ORDER BY u.username, t.id"
    ))
    .bind(username)
    .fetch_all(pool)
    .await
}

/// What revoking a token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    Now,
    Already,
    NoSuchToken,
}

pub async fn revoke_token(pool: &PgPool, id: i64) -> Result<Revoked, sqlx::Error> {
    let before: Option<bool> =
        sqlx::query_scalar("SELECT revoked_at IS NOT NULL FROM nats.user_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    match before {
        None => Ok(Revoked::NoSuchToken),
        Some(true) => Ok(Revoked::Already),
        Some(false) => {
            sqlx::query(
                "UPDATE nats.user_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            )
            .bind(id)
            .execute(pool)
            .await?;
            Ok(Revoked::Now)
        }
    }
}

/// The sync leader: the session holding the advisory lock in this database.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct Leader {
    pub application_name: String,
    pub client_addr: Option<String>,
    /// RFC 3339, UTC.
    pub since: String,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct OutboxState {
    pub pending: i64,
    pub bulk: i64,
    pub oldest_age_seconds: Option<f64>,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct AccountSync {
    pub name: String,
    pub active: bool,
    pub public_key: Option<String>,
    /// RFC 3339, UTC.
    pub synced_at: Option<String>,
    pub sync_error: Option<String>,
}

pub struct Status {
    pub leader: Option<Leader>,
    pub outbox: OutboxState,
    pub kicks_pending: i64,
    pub accounts: Vec<AccountSync>,
}

pub async fn status(pool: &PgPool, lock_key: i64) -> Result<Status, sqlx::Error> {
    // A bigint advisory lock shows in pg_locks as classid = high 32 bits, objid = low 32 bits.
    let leader: Option<Leader> = sqlx::query_as(
        "SELECT coalesce(a.application_name, '') AS application_name,
                host(a.client_addr) AS client_addr,
                to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS since
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.classid::bigint = ($1 >> 32) AND l.objid::bigint = ($1 & 4294967295)
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
         LIMIT 1",
    )
    .bind(lock_key)
    .fetch_optional(pool)
    .await?;
    let outbox: OutboxState = sqlx::query_as(
        "SELECT count(*) AS pending, count(*) FILTER (WHERE bulk) AS bulk,
                EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS oldest_age_seconds
         FROM nats.sync_outbox",
    )
    .fetch_one(pool)
    .await?;
    let kicks_pending: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.kick_requests")
        .fetch_one(pool)
        .await?;
    let accounts: Vec<AccountSync> = sqlx::query_as(
        "SELECT name, active, public_key,
                to_char(synced_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS synced_at,
                sync_error
         FROM nats.accounts ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    Ok(Status {
        leader,
        outbox,
        kicks_pending,
        accounts,
    })
}

/// An import the server left out of its account's JWT (`nats.account_imports.sync_error`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ImportError {
    pub account: String,
    pub import: String,
    pub sync_error: String,
}

/// Every import with a sync error, by account and name.
pub async fn import_errors(pool: &PgPool) -> Result<Vec<ImportError>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.name AS account, i.name AS import, i.sync_error
         FROM nats.account_imports i JOIN nats.accounts a ON a.id = i.account_id
         WHERE i.sync_error IS NOT NULL ORDER BY a.name, i.name",
    )
    .fetch_all(pool)
    .await
}
