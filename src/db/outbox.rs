//! `nats.sync_outbox`: pending account pushes, filled by triggers.
//!
//! Rows are claimed by bumping `attempts` and pushing `next_attempt_at` out by a lease. The
//! triggers only coalesce into rows with `attempts = 0`, so a change made while a row is being
//! pushed always gets a row of its own and is never lost.

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};

/// Marks a transaction as the sync's own: its key writes notify but queue no push (the sync
/// pushes the account itself right after). See migrations/0002.
pub async fn mark_own_writes(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('nats_pg_auth.sync_writes', 'on', true)")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub account_id: Option<i64>,
    pub account_public_key: Option<String>,
    pub op: String,
    pub attempts: i32,
    /// Why a delete row must not be carried out (see `claim`); None for every other row.
    #[sqlx(default)]
    pub refused: Option<String>,
}

/// Claims up to `limit` due rows, changes before bulk re-pushes, oldest first, skipping rows of
/// the accounts in `busy` (being pushed right now).
///
/// A delete row removes an account from nats-server. One naming a key of the service (operator,
/// SYS, AUTH, ...) or a key some account still has is never carried out: the row comes back
/// without its key (the sync drops such rows) and the refusal is logged and kept in the
/// audit log. Only the service writes this table, but a row is not proof of who wrote it.
pub async fn claim(
    pool: &PgPool,
    limit: i64,
    lease: Duration,
    busy: &[i64],
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let mut rows: Vec<OutboxRow> = sqlx::query_as(
        "UPDATE nats.sync_outbox o SET attempts = o.attempts + 1, \
                next_attempt_at = now() + make_interval(secs => $2) \
         WHERE o.id IN (SELECT id FROM nats.sync_outbox \
                        WHERE next_attempt_at <= now() \
                          AND (account_id IS NULL OR NOT account_id = ANY($3)) \
                        ORDER BY bulk, id LIMIT $1 FOR UPDATE SKIP LOCKED) \
         RETURNING o.id, o.account_id, o.account_public_key, o.op, o.attempts, \
           CASE WHEN o.op <> 'delete' OR o.account_public_key IS NULL THEN NULL \
                WHEN EXISTS (SELECT 1 FROM nats.service_identities s \
                              WHERE s.public_key = o.account_public_key) \
                  THEN 'it is a key of the service itself' \
                WHEN EXISTS (SELECT 1 FROM nats.account_keys k \
                              WHERE k.kind = 'identity' AND k.public_key = o.account_public_key) \
                  OR EXISTS (SELECT 1 FROM nats.accounts a WHERE a.public_key = o.account_public_key) \
                  THEN 'an account of the database still has it' END AS refused",
    )
    .bind(limit)
    .bind(lease.as_secs_f64())
    .bind(busy)
    .fetch_all(pool)
    .await?;
    for row in rows.iter_mut() {
        if let Some(why) = &row.refused {
            let key = row.account_public_key.take().unwrap_or_default();
            tracing::warn!(account = %key, outbox_id = row.id, reason = %why, "refused to delete an account from nats-server");
            super::audit::record(
                pool,
                super::audit::kind::ACCOUNT_DELETE_REFUSED,
                &key,
                serde_json::json!({ "outbox_id": row.id, "reason": why }),
            )
            .await;
        }
    }
    Ok(rows)
}

pub async fn complete(pool: &PgPool, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM nats.sync_outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Keeps the rows for a later retry after `backoff`.
pub async fn fail(
    pool: &PgPool,
    ids: &[i64],
    error: &str,
    backoff: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE nats.sync_outbox SET last_error = $2, next_attempt_at = now() + make_interval(secs => $3) \
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .bind(error)
    .bind(backoff.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}

/// Queues a push of every account (after a (re)connect to NATS, or when becoming leader), as
/// bulk rows: claimed after every change an admin made, so those are not stuck behind it.
/// Accounts with an unclaimed push pending already get one; they are skipped (a leadership
/// that changes hands twice does not queue every account twice).
pub async fn enqueue_all(pool: &PgPool, reason: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO nats.sync_outbox (account_id, op, reason, bulk) \
         SELECT a.id, 'upsert', $1, true FROM nats.accounts a \
         WHERE NOT EXISTS (SELECT 1 FROM nats.sync_outbox o \
                           WHERE o.account_id = a.id AND o.op = 'upsert' AND o.attempts = 0)",
    )
    .bind(reason)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Makes every pending row due now (after a reconnect to NATS). Only called between drains,
/// when no row is being pushed.
pub async fn retry_now(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE nats.sync_outbox SET next_attempt_at = now() WHERE next_attempt_at > now()",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// When the soonest pending row is due, to sleep exactly that long.
/// The outbox as the leader sees it after a drain.
#[derive(Debug, Clone, Copy)]
pub struct Backlog {
    /// When the next row is due (None: the outbox is empty).
    pub next_due_in: Option<Duration>,
    pub pending: i64,
    /// Age of the oldest row (0 when empty).
    pub oldest_secs: f64,
}

/// One query: when the next row is due, how many wait, and how old the oldest is.
pub async fn backlog(pool: &PgPool) -> Result<Backlog, sqlx::Error> {
    let (due, pending, oldest): (Option<f64>, i64, f64) = sqlx::query_as(
        // GREATEST ignores a NULL: over an empty outbox it said "due now", and an idle leader
        // polled the outbox every 20 ms (three queries each) for ever.
        "SELECT CASE WHEN count(*) > 0
                     THEN GREATEST(0, EXTRACT(EPOCH FROM (min(next_attempt_at) - now())))::float8
                END,
                count(*), COALESCE(EXTRACT(EPOCH FROM (now() - min(created_at))), 0)::float8
         FROM nats.sync_outbox",
    )
    .fetch_one(pool)
    .await?;
    Ok(Backlog {
        // Saturating: `from_secs_f64` panics on values a Duration cannot hold.
        next_due_in: due.map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)),
        pending,
        oldest_secs: oldest.max(0.0),
    })
}

/// Queues a push of one account unless one is already pending (coalesces like the triggers,
/// and wakes the leader).
pub async fn enqueue_coalesced(
    pool: &PgPool,
    account_id: i64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT nats.enqueue_account_sync($1, $2)")
        .bind(account_id)
        .bind(reason)
        .execute(pool)
        .await?;
    Ok(())
}

/// Up to `limit` accounts after id `after`, in id order, that have no pending outbox row:
/// (id, public key, JWT last pushed).
pub async fn settled_accounts(
    pool: &PgPool,
    after: i64,
    limit: i64,
) -> Result<Vec<(i64, Option<String>, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.id, a.public_key, a.jwt FROM nats.accounts a \
         WHERE a.id > $1 AND NOT EXISTS (SELECT 1 FROM nats.sync_outbox o WHERE o.account_id = a.id) \
         ORDER BY a.id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}
