//! The change log `nats.changes` (migration 0011): the scopes the login copy re-reads, written
//! by the triggers that change them. Notifications only wake the reader; what changed is read
//! here, so a forged NOTIFY (anyone may send one) names nothing and costs one indexed query.
//!
//! Rows are found by snapshot, not by id: ids are taken at insert, so a long transaction
//! commits a smaller id after a shorter one's larger id. Each read returns the snapshot its own
//! statement saw ([`Snapshot`]); the next read returns exactly the rows that statement sees and
//! that snapshot did not (`pg_visible_in_snapshot`). Rows are only inserted (and pruned long
//! after every reader saw them), so "visible in a snapshot" is "committed before it".

use sqlx::PgExecutor;

/// A snapshot as Postgres prints it (`xmin:xmax:xip,...`), passed back as `pg_snapshot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot(pub String);

/// The scopes committed since `since` (as written: `user:<id>` etc.), and the snapshot of the
/// statement that read them (the `since` of the next read).
pub async fn since(
    conn: impl PgExecutor<'_>,
    since: &Snapshot,
) -> Result<(Vec<String>, Snapshot), sqlx::Error> {
    // One statement: the rows and pg_current_snapshot() come from the same statement snapshot
    // (in READ COMMITTED, the snapshot the SELECT reads with). The xid bound lets the index
    // skip everything the previous snapshot saw for certain.
    let rows: Vec<(Option<String>, String)> = sqlx::query_as(
        "WITH s AS (SELECT pg_current_snapshot() AS now, $1::pg_snapshot AS prev)
         SELECT c.scope, s.now::text FROM s
           LEFT JOIN nats.changes c
             ON c.xid >= pg_snapshot_xmin(s.prev) AND NOT pg_visible_in_snapshot(c.xid, s.prev)",
    )
    .bind(&since.0)
    .fetch_all(conn)
    .await?;
    let now = rows
        .first()
        .map(|r| Snapshot(r.1.clone()))
        .unwrap_or_else(|| since.clone());
    let scopes = rows.into_iter().filter_map(|r| r.0).collect();
    Ok((scopes, now))
}

/// The snapshot of the current statement (inside a REPEATABLE READ transaction: the
/// transaction's; a full load takes it first so the log continues exactly from the load).
pub async fn current(conn: impl PgExecutor<'_>) -> Result<Snapshot, sqlx::Error> {
    let s: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(conn)
        .await?;
    Ok(Snapshot(s))
}

/// Deletes the rows `old` (a snapshot taken at least [`crate::copy::feed`]'s retention ago) saw:
/// every replica still reading the log has read them since. Returns how many.
pub async fn prune(conn: impl PgExecutor<'_>, old: &Snapshot) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM nats.changes
          WHERE xid < pg_snapshot_xmax($1::pg_snapshot) AND pg_visible_in_snapshot(xid, $1::pg_snapshot)",
    )
    .bind(&old.0)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
