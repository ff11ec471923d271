//! What the admin CLI reads and changes (`account|role|user|token` verbs). Never selects a
//! password hash or a seed. Times come back as RFC 3339 text (UTC), intervals as whole seconds
//! (rounded up, so a sub-second TTL never reads as 0).

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

/// An interval column as whole seconds.
macro_rules! secs {
    ($col:literal) => {
        concat!("ceil(EXTRACT(EPOCH FROM ", $col, "))::bigint")
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
    pub max_leafnodes: i64,
    pub max_imports: i64,
    pub max_exports: i64,
    pub max_users: i64,
    /// JetStream: memory and disk storage in bytes (0: JetStream off for the account, -1:
    /// unlimited), streams and consumers (-1: unlimited).
    pub max_jetstream_memory_storage: i64,
    pub max_jetstream_disk_storage: i64,
    pub max_jetstream_streams: i64,
    pub max_jetstream_consumers: i64,
    pub user_jwt_ttl_secs: Option<i64>,
    pub users: i64,
    pub roles: i64,
    pub synced_at: Option<String>,
    pub sync_error: Option<String>,
    pub created_at: String,
}

const ACCOUNTS: &str = concat!(
    "SELECT a.name, a.active, a.description, a.public_key, a.max_connections, a.max_subscriptions,
            a.max_data, a.max_payload, a.max_leafnodes, a.max_imports, a.max_exports, a.max_users,
            a.max_jetstream_memory_storage, a.max_jetstream_disk_storage,
            a.max_jetstream_streams, a.max_jetstream_consumers, ",
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
    pub allow_response_ttl_secs: Option<i64>,
    pub max_subscriptions: i64,
    pub max_data: i64,
    pub max_payload: i64,
    pub user_jwt_ttl_secs: Option<i64>,
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
    pub user_jwt_ttl_secs: Option<i64>,
    /// The user public nkey it logs in with (`U…`), if any.
    pub nkey: Option<String>,
    /// MQTT client ids it may connect with (empty: any).
    pub mqtt_client_ids: Vec<String>,
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
    " AS user_jwt_ttl_secs, u.nkey, u.mqtt_client_ids,
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
// ---- details for `show` ---------------------------------------------------------------------

/// An account's export, as `account show` prints it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Export {
    pub name: String,
    pub subject: String,
    /// `stream` or `service`.
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    /// Private: importers need a grant (`nats.account_export_grants`).
    pub token_req: bool,
    pub advertise: bool,
    pub description: Option<String>,
}

pub async fn exports(pool: &PgPool, account: &str) -> Result<Vec<Export>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.name, e.subject, e.type, e.token_req, e.advertise, e.description
         FROM nats.account_exports e JOIN nats.accounts a ON a.id = e.account_id
         WHERE a.name = $1 ORDER BY e.name",
    )
    .bind(account)
    .fetch_all(pool)
    .await
}

/// An account's import, as `account show` prints it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Import {
    pub name: String,
    pub subject: String,
    pub local_subject: Option<String>,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    /// The exporting account's name, or its public key when it is not one of ours.
    pub exporter: String,
    pub share: bool,
    /// Why nats-server left the import out of the account (service-owned).
    pub sync_error: Option<String>,
}

pub async fn imports(pool: &PgPool, account: &str) -> Result<Vec<Import>, sqlx::Error> {
    sqlx::query_as(
        "SELECT i.name, i.subject, i.local_subject, i.type,
                coalesce(x.name, i.exporter_public_key) AS exporter, i.share, i.sync_error
         FROM nats.account_imports i JOIN nats.accounts a ON a.id = i.account_id
         LEFT JOIN nats.accounts x ON x.id = i.exporter_account_id
         WHERE a.name = $1 ORDER BY i.name",
    )
    .bind(account)
    .fetch_all(pool)
    .await
}

/// A client-certificate mapping of a user (`nats.user_certificates`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Certificate {
    pub id: i64,
    /// Hex SHA-256 of the certificate's DER.
    pub fingerprint_sha256: Option<String>,
    pub subject_dn: Option<String>,
    pub san: Option<String>,
    pub description: Option<String>,
}

pub async fn certificates(pool: &PgPool, username: &str) -> Result<Vec<Certificate>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.id, encode(c.fingerprint_sha256, 'hex') AS fingerprint_sha256, c.subject_dn,
                c.san, c.description
         FROM nats.user_certificates c JOIN nats.users u ON u.id = c.user_id
         WHERE u.username = $1 ORDER BY c.id",
    )
    .bind(username)
    .fetch_all(pool)
    .await
}

// ---- changes ----------------------------------------------------------------------------------

/// What deleting an account took with it; None when there is no such account.
#[derive(Debug, Clone, Copy)]
pub struct DeletedAccount {
    pub users: i64,
    pub roles: i64,
}

/// Deletes an account and everything that belongs to it. Its users go first: a user's role is
/// `ON DELETE RESTRICT`, so the cascade must not reach a role its users still hold.
pub async fn delete_account(
    pool: &PgPool,
    name: &str,
) -> Result<Option<DeletedAccount>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let id: Option<i64> =
        sqlx::query_scalar("SELECT id FROM nats.accounts WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(id) = id else {
        return Ok(None);
    };
    let users = sqlx::query("DELETE FROM nats.users WHERE account_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected() as i64;
    let roles: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.roles WHERE account_id = $1")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM nats.accounts WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(DeletedAccount { users, roles }))
}

/// A new role's rows (`role create`).
pub struct NewRole<'a> {
    pub name: &'a str,
    pub account: Option<&'a str>,
    pub publish: &'a [String],
    pub subscribe: &'a [String],
    pub publish_deny: &'a [String],
    pub subscribe_deny: &'a [String],
    pub jwt_ttl_secs: Option<f64>,
    pub description: Option<&'a str>,
}

/// Inserts a role; false when `account` names no account.
pub async fn create_role(pool: &PgPool, r: &NewRole<'_>) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions,
                                 publish_deny_permissions, subscribe_deny_permissions,
                                 user_jwt_ttl, description)
         SELECT a.id, $2, $3, $4, $5, $6, make_interval(secs => $7), $8
         FROM (SELECT NULL::bigint AS id WHERE $1::text IS NULL
               UNION ALL SELECT id FROM nats.accounts WHERE name = $1) a",
    )
    .bind(r.account)
    .bind(r.name)
    .bind(r.publish)
    .bind(r.subscribe)
    .bind(r.publish_deny)
    .bind(r.subscribe_deny)
    .bind(r.jwt_ttl_secs)
    .bind(r.description)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Deletes a user (its tokens and certificate mappings go with it); false when there is none.
pub async fn delete_user(pool: &PgPool, username: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM nats.users WHERE username = $1")
        .bind(username)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Replaces a user's password hash; false when there is no such user.
pub async fn set_password_hash(
    pool: &PgPool,
    username: &str,
    hash: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE nats.users SET password_hash = $2 WHERE username = $1")
        .bind(username)
        .bind(hash)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// What `set_role` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleChange {
    Done,
    NoSuchUser,
    /// No role of that name in the user's account (named here) nor a global one.
    NoSuchRole {
        account: String,
    },
}

/// Gives a user the role `role` of its own account (preferred) or the global one of that name,
/// or no role.
pub async fn set_role(
    pool: &PgPool,
    username: &str,
    role: Option<&str>,
) -> Result<RoleChange, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let user: Option<(i64, i64, String)> = sqlx::query_as(
        "SELECT u.id, u.account_id, a.name FROM nats.users u
         JOIN nats.accounts a ON a.id = u.account_id WHERE u.username = $1 FOR UPDATE OF u",
    )
    .bind(username)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((user_id, account_id, account)) = user else {
        return Ok(RoleChange::NoSuchUser);
    };
    let role_id = match role {
        None => None,
        Some(role) => {
            let id: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM nats.roles WHERE name = $1 AND (account_id = $2 OR account_id IS NULL)
                 ORDER BY account_id NULLS LAST LIMIT 1",
            )
            .bind(role)
            .bind(account_id)
            .fetch_optional(&mut *tx)
            .await?;
            match id {
                Some(id) => Some(id),
                None => return Ok(RoleChange::NoSuchRole { account }),
            }
        }
    };
    sqlx::query("UPDATE nats.users SET role_id = $2 WHERE id = $1")
        .bind(user_id)
        .bind(role_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(RoleChange::Done)
}
