//! Leader election: the replica holding a session-level Postgres advisory lock runs the sync.
//!
//! The lock lives on a dedicated connection, not on a pooled one: a pool may close or recycle
//! connections, which would silently release the lock. When that connection dies Postgres
//! releases the lock and another replica takes over within its retry period.
//!
//! Bounds (see docs/architecture.md, "Leadership"):
//! - client side: the lock connection is checked every [`CHECK_EVERY`] with a `SELECT 1` that
//!   must answer within [`CHECK_TIMEOUT`]; when it fails the leadership token is cancelled and
//!   the leader stops pushing. A leader stops within ~1.2 s of its lock connection failing.
//! - server side: the connection asks Postgres for TCP keepalives ([`notify::harden`]), so the
//!   server ends the session of a partitioned leader (and frees the lock) in ~11 s; a standby
//!   retries every 2 s, so a new leader takes over ≤ ~13 s after a partition.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::db::notify;

/// Arbitrary but fixed: every replica of every version must use the same key.
pub const SYNC_LOCK_KEY: i64 = 0x6e61_7473_7067_0001; // "natspg" + 1

/// `application_name` of the lock connection (find it in `pg_stat_activity`).
pub const LOCK_APPLICATION_NAME: &str = "nats-pg-auth sync leader";
/// How often the lock connection is checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How long a check may take before the connection counts as lost.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(700);

pub struct Leadership {
    conn: PgConnection,
}

impl Leadership {
    /// Tries once to become leader.
    pub async fn try_acquire(database_url: &str) -> Result<Option<Leadership>, sqlx::Error> {
        let options: PgConnectOptions = database_url.parse()?;
        let mut conn = options
            .application_name(LOCK_APPLICATION_NAME)
            .connect()
            .await?;
        notify::harden(&mut conn).await;
        // `pg_try_advisory_lock` never waits; the bounds keep it so (see `db::LOCK_TIMEOUT`).
        crate::db::bound_session(&mut conn).await?;
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
        tokio::time::timeout(
            CHECK_TIMEOUT,
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut self.conn),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// Watches the lock until `leading` is cancelled (then releases it) or the lock connection
    /// fails (then cancels `leading`: everything the leader runs stops).
    pub async fn watch(mut self, leading: CancellationToken) {
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            tokio::select! {
                _ = leading.cancelled() => {
                    // Bounded: a dead connection must not hold up a shutdown.
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.release()).await;
                    return;
                }
                _ = check.tick() => {
                    if !self.still_held().await {
                        tracing::warn!("lost the sync leader lock connection; standing down");
                        leading.cancel();
                        return;
                    }
                }
            }
        }
    }

    pub async fn release(self) {
        let mut conn = self.conn;
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(SYNC_LOCK_KEY)
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
    }
}
