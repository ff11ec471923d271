//! Leader election: the replica holding a session-level Postgres advisory lock runs the sync.
//!
//! The lock lives on a dedicated connection, not on a pooled one: a pool may close or recycle
//! connections, which would silently release the lock. When that connection dies Postgres
//! releases the lock and another replica takes over within its retry period.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

/// Arbitrary but fixed: every replica of every version must use the same key.
pub const SYNC_LOCK_KEY: i64 = 0x6e61_7473_7067_0001; // "natspg" + 1

pub struct Leadership {
    conn: PgConnection,
}

impl Leadership {
    /// Tries once to become leader.
    pub async fn try_acquire(database_url: &str) -> Result<Option<Leadership>, sqlx::Error> {
        let mut conn = PgConnection::connect(database_url).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(SYNC_LOCK_KEY)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(Leadership { conn }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// True while the lock connection is alive (and so the lock held).
    pub async fn still_held(&mut self) -> bool {
        tokio::time::timeout(Duration::from_secs(3), self.conn.ping())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(SYNC_LOCK_KEY)
            .execute(&mut self.conn)
            .await;
        let _ = self.conn.close().await;
    }
}
