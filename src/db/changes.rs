//! The change log `nats.changes` (migration 0011): the scopes the login copy re-reads, written
//! by the triggers that change them. Notifications only wake the reader; what changed is read
//! here, so a forged NOTIFY (anyone may send one) names nothing and costs one indexed query.
//!
//! Rows are found by snapshot, not by id: ids are taken at insert, so a long transaction
//! commits a smaller id after a shorter one's larger id. Each read returns the snapshot its own
//! statement saw ([`Snapshot`]); the next read returns exactly the rows that statement sees and
//! that snapshot did not (`pg_visible_in_snapshot`). Rows are only inserted (and pruned long
//! after every reader saw them), so "visible in a snapshot" is "committed before it".
//!
//! A snapshot means something only on the server history it was taken on: after a standby is
//! promoted, the transactions the old primary committed but never replicated are gone and the
//! new primary hands out their xids again, so an old snapshot would call new commits "already
//! seen". Every snapshot therefore carries its [`Epoch`] (the WAL timeline and the postmaster's
//! start), every read returns the epoch it ran on, and the caller never compares snapshots
//! across epochs (see `copy::feed`).

use sqlx::PgExecutor;

/// The server history a snapshot belongs to: the WAL timeline (the first 8 hex digits of the
/// current WAL file's name; a promotion or a point-in-time restore starts a new one) and the
/// postmaster's start time (a restart after a crash may lose commits made with
/// `synchronous_commit = off` and reuse their xids on the same timeline). Both functions are
/// executable by PUBLIC; `pg_current_wal_lsn` fails on a standby in recovery, so a read on a
/// server that is not (yet) a primary fails and is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch(pub String);

/// The SQL that prints the [`Epoch`] of the server it runs on.
const EPOCH: &str =
    "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) || ' ' || extract(epoch FROM pg_postmaster_start_time())::text";

/// A snapshot as Postgres prints it (`xmin:xmax:xip,...`, passed back as `pg_snapshot`), and
/// the epoch of the server it was taken on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xids: String,
    pub epoch: Epoch,
}

/// The scopes committed since `since` (as written: `user:<id>` etc.), and the snapshot of the
/// statement that read them (the `since` of the next read). When the returned snapshot's epoch
/// differs from `since`'s, the scopes mean nothing: the caller must start over (see
/// [`retained`]).
pub async fn since(
    conn: impl PgExecutor<'_>,
    since: &Snapshot,
) -> Result<(Vec<String>, Snapshot), sqlx::Error> {
    // One statement: the rows, pg_current_snapshot() and the epoch come from the same statement
    // snapshot (in READ COMMITTED, the snapshot the SELECT reads with). The xid bound lets the
    // index skip everything the previous snapshot saw for certain.
    let sql = format!(
        "WITH s AS (SELECT pg_current_snapshot() AS now, $1::pg_snapshot AS prev, {EPOCH} AS epoch)
         SELECT c.scope, s.now::text, s.epoch FROM s
           LEFT JOIN nats.changes c
             ON c.xid >= pg_snapshot_xmin(s.prev) AND NOT pg_visible_in_snapshot(c.xid, s.prev)"
    );
    let rows: Vec<(Option<String>, String, String)> = sqlx::query_as(&sql)
        .bind(&since.xids)
        .fetch_all(conn)
        .await?;
    Ok(collect(rows, since))
}

/// Every scope the log holds (a few minutes of changes), and the snapshot of the statement
/// that read them: where a reader continues after its epoch changed.
pub async fn retained(conn: impl PgExecutor<'_>) -> Result<(Vec<String>, Snapshot), sqlx::Error> {
    let sql = format!(
        "WITH s AS (SELECT pg_current_snapshot() AS now, {EPOCH} AS epoch)
         SELECT c.scope, s.now::text, s.epoch FROM s LEFT JOIN nats.changes c ON true"
    );
    let rows: Vec<(Option<String>, String, String)> = sqlx::query_as(&sql).fetch_all(conn).await?;
    let none = Snapshot {
        xids: String::new(),
        epoch: Epoch(String::new()),
    };
    Ok(collect(rows, &none))
}

/// The scopes of `rows` and the snapshot they share (`fallback` when there are none, which
/// one statement that always returns a row never gives).
fn collect(
    rows: Vec<(Option<String>, String, String)>,
    fallback: &Snapshot,
) -> (Vec<String>, Snapshot) {
    let now = rows
        .first()
        .map(|r| Snapshot {
            xids: r.1.clone(),
            epoch: Epoch(r.2.clone()),
        })
        .unwrap_or_else(|| fallback.clone());
    (rows.into_iter().filter_map(|r| r.0).collect(), now)
}

/// The snapshot of the current statement (inside a REPEATABLE READ transaction: the
/// transaction's; a full load takes it first so the log continues exactly from the load).
pub async fn current(conn: impl PgExecutor<'_>) -> Result<Snapshot, sqlx::Error> {
    let sql = format!("SELECT pg_current_snapshot()::text, {EPOCH}");
    let (xids, epoch): (String, String) = sqlx::query_as(&sql).fetch_one(conn).await?;
    Ok(Snapshot {
        xids,
        epoch: Epoch(epoch),
    })
}

/// Deletes the rows `old` (a snapshot taken at least [`crate::copy::feed`]'s retention ago) saw:
/// every replica still reading the log has read them since. Returns how many. Deletes nothing
/// when the server is no longer on `old`'s epoch: there `old`'s xids may name transactions
/// committed since, which no replica may have read yet.
pub async fn prune(conn: impl PgExecutor<'_>, old: &Snapshot) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "DELETE FROM nats.changes
          WHERE {EPOCH} = $2
            AND xid < pg_snapshot_xmax($1::pg_snapshot) AND pg_visible_in_snapshot(xid, $1::pg_snapshot)"
    );
    let done = sqlx::query(&sql)
        .bind(&old.xids)
        .bind(&old.epoch.0)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}
