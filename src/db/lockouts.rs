//! `nats.lockouts` (migration 0015): lockouts the replicas recorded (best effort; the lockout
//! itself lives in the replica's memory, `callout::lockout`), and `nats.unlock_requests`, which
//! lifts a user's lockout on every replica through the change log (`unlock:<user id>`).

use serde::Serialize;
use sqlx::PgPool;

/// Records that `replica` locked `user_id` out for `seconds` more after `failures` wrong
/// passwords. Also drops rows whose lockout is over (they mean nothing any more).
pub async fn record(
    pool: &PgPool,
    user_id: i64,
    replica: &str,
    failures: u32,
    seconds: f64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH gone AS (DELETE FROM nats.lockouts WHERE locked_until < now()
                                                   AND (user_id, replica) <> ($1, $2))
         INSERT INTO nats.lockouts (user_id, replica, failures, locked_at, locked_until)
         VALUES ($1, $2, $3, now(), now() + make_interval(secs => $4))
         ON CONFLICT (user_id, replica) DO UPDATE SET failures = EXCLUDED.failures,
           locked_at = EXCLUDED.locked_at, locked_until = EXCLUDED.locked_until",
    )
    .bind(user_id)
    .bind(replica)
    .bind(i32::try_from(failures).unwrap_or(i32::MAX))
    .bind(seconds)
    .execute(pool)
    .await?;
    Ok(())
}

/// A replica (re)starting or stopping under `replica` holds no lockout: its rows go.
pub async fn forget_replica(pool: &PgPool, replica: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM nats.lockouts WHERE replica = $1")
        .bind(replica)
        .execute(pool)
        .await?;
    Ok(())
}

/// A lockout in force, as `explain` and `user show` report it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Lockout {
    pub replica: String,
    pub failures: i32,
    /// RFC 3339, UTC.
    pub locked_at: String,
    pub locked_until: String,
}

/// The lockouts of `username` still in force, by replica.
pub async fn of_user(pool: &PgPool, username: &str) -> Result<Vec<Lockout>, sqlx::Error> {
    sqlx::query_as(
        "SELECT l.replica, l.failures,
                to_char(l.locked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS locked_at,
                to_char(l.locked_until AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS locked_until
         FROM nats.lockouts l JOIN nats.users u ON u.id = l.user_id
         WHERE u.username = $1 AND l.locked_until > now()
         ORDER BY l.replica",
    )
    .bind(username)
    .fetch_all(pool)
    .await
}

/// Unlocks requested within the last `seconds`: (username, seconds ago).
pub async fn unlocked_since(
    pool: &PgPool,
    seconds: f64,
) -> Result<Vec<(String, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT u.username, greatest(EXTRACT(EPOCH FROM now() - r.requested_at)::float8, 0)
         FROM nats.unlock_requests r JOIN nats.users u ON u.id = r.user_id
         WHERE r.requested_at > now() - make_interval(secs => $1)",
    )
    .bind(seconds)
    .fetch_all(pool)
    .await
}

/// Asks every replica to lift `username`'s lockout. None: no such user (or, for a tenant, not
/// one of its accounts'); else the lockouts in force that were recorded before.
pub async fn unlock(pool: &PgPool, username: &str) -> Result<Option<usize>, sqlx::Error> {
    let recorded = of_user(pool, username).await?.len();
    let done = sqlx::query(
        "INSERT INTO nats.unlock_requests (user_id) SELECT id FROM nats.users WHERE username = $1",
    )
    .bind(username)
    .execute(pool)
    .await?;
    Ok((done.rows_affected() > 0).then_some(recorded))
}
