//! `nats.accounts` and `nats.account_keys` as the sync sees them.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AccountRow {
    pub id: i64,
    pub name: String,
    pub description: Option<String>,
    pub active: bool,
    pub max_connections: i64,
    pub max_leafnodes: i64,
    pub max_subscriptions: i64,
    pub max_data: i64,
    pub max_payload: i64,
    pub max_imports: i64,
    pub max_exports: i64,
    pub allow_wildcard_exports: bool,
    pub max_jetstream_memory_storage: i64,
    pub max_jetstream_disk_storage: i64,
    pub max_jetstream_streams: i64,
    pub max_jetstream_consumers: i64,
    pub public_key: Option<String>,
    pub jwt: Option<String>,
    /// The account's identity key in `nats.account_keys` (the only valid JWT subject).
    pub identity_key: Option<String>,
    /// When `public_key` is a key of the service itself, its kind (`auth_account`, ...).
    pub public_key_service_kind: Option<String>,
    pub updated_at: DateTime<Utc>,
    /// Database time when the row was read; recorded as `synced_at` after a good push.
    pub read_at: DateTime<Utc>,
}

/// A key of an account. `seed` as stored (maybe encrypted).
#[derive(Clone, sqlx::FromRow)]
pub struct AccountKeyRow {
    pub id: i64,
    pub kind: String,
    pub public_key: String,
    pub seed: String,
    pub created_at: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for AccountKeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountKeyRow")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("public_key", &self.public_key)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

pub async fn load(pool: &PgPool, id: i64) -> Result<Option<AccountRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, name, description, active, max_connections, max_leafnodes, max_subscriptions, \
                max_data, max_payload, max_imports, max_exports, allow_wildcard_exports, \
                max_jetstream_memory_storage, max_jetstream_disk_storage, max_jetstream_streams, \
                max_jetstream_consumers, public_key, jwt, \
                (SELECT k.public_key FROM nats.account_keys k \
                  WHERE k.account_id = a.id AND k.kind = 'identity') AS identity_key, \
                (SELECT s.kind FROM nats.service_identities s \
                  WHERE s.public_key = a.public_key) AS public_key_service_kind, \
                updated_at, clock_timestamp() AS read_at \
         FROM nats.accounts a WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Keys of an account that are still valid (signing keys not retired, plus the identity).
pub async fn live_keys(pool: &PgPool, account_id: i64) -> Result<Vec<AccountKeyRow>, sqlx::Error> {
    sqlx::query_as(
        // An imported key without its seed reads as an empty seed: listed, never signed with.
        "SELECT id, kind, public_key, COALESCE(seed, '') AS seed, created_at, retired_at FROM nats.account_keys \
         WHERE account_id = $1 AND (retired_at IS NULL OR retired_at > now()) \
         ORDER BY created_at, id",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await
}

/// What [`assign_keys`] did.
#[derive(Debug)]
pub enum Assigned {
    Assigned,
    /// Another push gave the account keys first.
    AlreadyHad,
    /// Nothing: the database's seeds are sealed with another key than `sealed_by`'s.
    KeyNotCurrent(crate::keys::SealedWith),
}

/// Gives an account created by SQL its identity and first signing key, sealed by `sealed_by`
/// (checked against the database's key in the same transaction).
pub async fn assign_keys(
    pool: &PgPool,
    account_id: i64,
    identity: (&str, &str),
    signing: (&str, &str),
    sealed_by: &crate::keys::SeedCipher,
) -> Result<Assigned, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Seeds sealed with a key that is no longer the database's would not open at the next
    // start with the current key only: insert nothing then (issue 18 item 6).
    if let Some(found) = super::seeds::lock_and_check(&mut tx, sealed_by).await? {
        tx.rollback().await?;
        return Ok(Assigned::KeyNotCurrent(found));
    }
    super::outbox::mark_own_writes(&mut tx).await?;
    let updated = sqlx::query(
        "UPDATE nats.accounts SET public_key = $2 WHERE id = $1 AND public_key IS NULL",
    )
    .bind(account_id)
    .bind(identity.0)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        tx.rollback().await?;
        return Ok(Assigned::AlreadyHad);
    }
    for (kind, (public_key, seed)) in [("identity", identity), ("signing", signing)] {
        sqlx::query(
            "INSERT INTO nats.account_keys (account_id, kind, public_key, seed) VALUES ($1, $2, $3, $4)",
        )
        .bind(account_id)
        .bind(kind)
        .bind(public_key)
        .bind(seed)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Assigned::Assigned)
}

/// Records a successful push. `built_at` is when the JWT was built (before its keys were read),
/// so the callout only picks signing keys that are in the pushed JWT. When the push makes a
/// signing key usable (a new account, a rotation), the login copies of every replica are told:
/// their users can be signed for now, and must be, even if Postgres goes away next.
pub async fn record_synced(
    conn: impl sqlx::PgExecutor<'_>,
    account_id: i64,
    jwt: &str,
    built_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH old AS (SELECT synced_at FROM nats.accounts WHERE id = $1 FOR UPDATE),
              upd AS (UPDATE nats.accounts SET jwt = $2, synced_at = $3, sync_error = NULL
                      WHERE id = $1 RETURNING id)
         SELECT nats.log_change('account:' || upd.id),
                pg_notify('nats_pg_auth_change', 'account:' || upd.id)
         FROM upd, old
         WHERE EXISTS (SELECT 1 FROM nats.account_keys k
                       WHERE k.account_id = upd.id AND k.kind = 'signing'
                         AND k.retired_at IS NULL AND k.created_at <= $3
                         AND (old.synced_at IS NULL OR k.created_at > old.synced_at))",
    )
    .bind(account_id)
    .bind(jwt)
    .bind(built_at)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn record_error(pool: &PgPool, account_id: i64, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE nats.accounts SET sync_error = $2 WHERE id = $1")
        .bind(account_id)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(())
}

/// The user JWTs an account JWT revokes (`revocations`: public key → JWTs issued at or before
/// this second are refused): the stored list (`nats.account_revocations`: an imported account's
/// own, users with a public nkey deleted since) and every inactive user bound to a public nkey,
/// as of its row's last change (reactivating the user takes it out again).
pub async fn revocations(
    pool: &PgPool,
    account_id: i64,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT public_key, max(t)::bigint FROM ( \
             SELECT public_key, revoked_before AS t FROM nats.account_revocations WHERE account_id = $1 \
             UNION ALL \
             SELECT nkey, ceil(extract(epoch FROM updated_at))::bigint FROM nats.users \
              WHERE account_id = $1 AND NOT active AND nkey IS NOT NULL) r \
         GROUP BY public_key",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await
}
