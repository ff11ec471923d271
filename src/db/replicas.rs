//! `nats.replicas` (migration 0015): each `serve` replica's own row, written by its heartbeat
//! ([`crate::replica`]) and read by `status`.

use serde::Serialize;
use sqlx::PgPool;

/// What a replica reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub ready: bool,
    /// `ready`, or why not (the first line /readyz answers).
    pub readiness: String,
    /// `live`, `catching up …`, `outage …`; None while not ready.
    pub mode: Option<String>,
    pub nats_connected: bool,
    pub leader: bool,
}

/// Who a replica is (fixed for the life of the process).
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub host: Option<String>,
    pub pid: i32,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub sync: bool,
}

/// Writes (or rewrites) the replica's row with `last_seen = now()`.
pub async fn beat(pool: &PgPool, me: &Identity, report: &Report) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO nats.replicas (name, host, pid, version, git_sha, started_at, last_seen, ready,
                                    readiness, mode, nats_connected, sync, leader)
         VALUES ($1, $2, $3, $4, $5, $6, now(), $7, $8, $9, $10, $11, $12)
         ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid,
           version = EXCLUDED.version, git_sha = EXCLUDED.git_sha, started_at = EXCLUDED.started_at,
           last_seen = now(), ready = EXCLUDED.ready, readiness = EXCLUDED.readiness,
           mode = EXCLUDED.mode, nats_connected = EXCLUDED.nats_connected, sync = EXCLUDED.sync,
           leader = EXCLUDED.leader",
    )
    .bind(&me.name)
    .bind(&me.host)
    .bind(me.pid)
    .bind(crate::build_info::VERSION)
    .bind(crate::build_info::GIT_SHA)
    .bind(me.started_at)
    .bind(report.ready)
    .bind(&report.readiness)
    .bind(&report.mode)
    .bind(report.nats_connected)
    .bind(me.sync)
    .bind(report.leader)
    .execute(pool)
    .await?;
    Ok(())
}

/// A replica that stops says so: its row goes (and with it the lockouts it recorded, which
/// ended with its memory).
pub async fn deregister(pool: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM nats.replicas WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    super::lockouts::forget_replica(pool, name).await
}

/// Deletes rows of replicas not heard from for `seconds` (killed without deregistering).
pub async fn prune(pool: &PgPool, seconds: f64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM nats.replicas WHERE last_seen < now() - make_interval(secs => $1)",
    )
    .bind(seconds)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// A row as `status` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Replica {
    pub name: String,
    pub host: Option<String>,
    pub pid: Option<i32>,
    pub version: String,
    pub git_sha: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// Seconds since the replica last wrote its row.
    pub seen_seconds_ago: f64,
    pub ready: bool,
    pub readiness: String,
    pub mode: Option<String>,
    pub nats_connected: bool,
    pub sync: bool,
    pub leader: bool,
}

pub async fn list(pool: &PgPool) -> Result<Vec<Replica>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, host, pid, version, git_sha,
                to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS started_at,
                greatest(EXTRACT(EPOCH FROM now() - last_seen)::float8, 0) AS seen_seconds_ago,
                ready, readiness, mode, nats_connected, sync, leader
         FROM nats.replicas ORDER BY name",
    )
    .fetch_all(pool)
    .await
}
