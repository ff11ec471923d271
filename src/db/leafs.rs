//! `nats.leaf_connections` (migration 0008): the leaf node connections the callout admitted,
//! so that kicks can find them (leaf connections are not in CONNZ, and LEAFZ names no user).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// One admitted leaf connection.
#[derive(Debug, Clone)]
pub struct LeafGrant {
    pub server_id: String,
    pub cid: u64,
    pub account_key: String,
    pub username: String,
    /// The server's clock at the authorization request (unix seconds).
    pub requested_at: i64,
    /// When the minted JWT ends (unix seconds).
    pub expires_at: i64,
}

/// A recorded leaf connection of a kick target.
#[derive(Debug, sqlx::FromRow)]
pub struct LeafRow {
    pub server_id: String,
    pub cid: i64,
    pub username: String,
    pub requested_at: DateTime<Utc>,
}

pub async fn record(pool: &PgPool, grant: &LeafGrant) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO nats.leaf_connections (server_id, cid, account_key, username, requested_at, expires_at) \
         VALUES ($1, $2, $3, $4, to_timestamp($5), to_timestamp($6)) \
         ON CONFLICT (server_id, cid) DO UPDATE SET account_key = EXCLUDED.account_key, \
           username = EXCLUDED.username, requested_at = EXCLUDED.requested_at, \
           expires_at = EXCLUDED.expires_at",
    )
    .bind(&grant.server_id)
    .bind(i64::try_from(grant.cid).unwrap_or(i64::MAX))
    .bind(&grant.account_key)
    .bind(&grant.username)
    .bind(grant.requested_at as f64)
    .bind(grant.expires_at as f64)
    .execute(pool)
    .await?;
    Ok(())
}

/// The recorded leaf connections of some users of an account.
pub async fn of_users(
    pool: &PgPool,
    account_key: &str,
    usernames: &[String],
) -> Result<Vec<LeafRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT server_id, cid, username, requested_at FROM nats.leaf_connections \
         WHERE account_key = $1 AND username = ANY($2) AND expires_at > now()",
    )
    .bind(account_key)
    .bind(usernames)
    .fetch_all(pool)
    .await
}

/// Forgets connections that are gone.
pub async fn forget(pool: &PgPool, gone: &[(String, i64)]) -> Result<(), sqlx::Error> {
    if gone.is_empty() {
        return Ok(());
    }
    let (servers, cids): (Vec<String>, Vec<i64>) = gone.iter().cloned().unzip();
    sqlx::query(
        "DELETE FROM nats.leaf_connections l USING unnest($1::text[], $2::bigint[]) AS g(s, c) \
         WHERE l.server_id = g.s AND l.cid = g.c",
    )
    .bind(&servers)
    .bind(&cids)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes rows whose JWT has ended (the server closed those connections itself).
pub async fn prune_expired(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM nats.leaf_connections WHERE expires_at <= now()")
            .execute(pool)
            .await?
            .rows_affected(),
    )
}
