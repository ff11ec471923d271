//! What this replica says about itself in `nats.replicas`, for `status`: its name
//! (`--replica-name`, default `host:pid`), its build, its readiness exactly as `/readyz`
//! computes it (with the mode: live, catching up, outage), whether both NATS connections are
//! up, and whether it leads the sync.
//!
//! Why a row in Postgres rather than `status` asking each replica's `/readyz`: Postgres is the
//! one place every replica and every operator already reach (replicas' HTTP ports are often
//! loopback-only or inside a cluster network), and a row names the replica and says when it was
//! last heard from, so a replica that died without a word shows as silent instead of vanishing.
//! A replica cut off from Postgres cannot write its row either: it shows as silent too.
//!
//! The row is looked at every [`LOOK_EVERY`] and written when what it says changed, else every
//! [`BEAT_EVERY`]; `status` counts a row older than [`SILENT_AFTER`] as a replica not heard
//! from. A stopping replica deletes its row; rows silent for [`FORGET_AFTER`] are deleted by the
//! replicas still running.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db::replicas::{self, Identity, Report};

pub const LOOK_EVERY: Duration = Duration::from_secs(1);
pub const BEAT_EVERY: Duration = Duration::from_secs(5);
/// `status`: a row this old is a replica not heard from (three beats missed).
pub const SILENT_AFTER: Duration = Duration::from_secs(15);
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// A write that takes longer is abandoned (and retried at the next look).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest replica name (the column's bound).
const MAX_NAME: usize = 200;

/// A replica name is 1 to 200 characters, no control characters.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty()
        || name.chars().count() > MAX_NAME
        || name.chars().any(char::is_control)
    {
        return Err(format!(
            "--replica-name {name:?}: give 1 to {MAX_NAME} printable characters (a pod or host name), unique per replica"
        ));
    }
    Ok(())
}

/// The host name of this machine (container: the pod name), if it has one.
pub fn host_name() -> Option<String> {
    let uname = rustix::system::uname();
    let host = uname.nodename().to_string_lossy().trim().to_owned();
    (!host.is_empty()).then_some(host)
}

/// `--replica-name`, else `host:pid`.
pub fn name(given: Option<&str>) -> String {
    match given {
        Some(n) => n.to_owned(),
        None => format!(
            "{}:{}",
            host_name().unwrap_or_else(|| "localhost".into()),
            std::process::id()
        ),
    }
}

/// The heartbeat task of one replica.
pub struct Heartbeat {
    pub pool: PgPool,
    pub me: Identity,
    pub probes: crate::http::Probes,
}

impl Heartbeat {
    pub fn new(pool: PgPool, name: String, sync: bool, probes: crate::http::Probes) -> Self {
        Self {
            pool,
            me: Identity {
                name,
                host: host_name(),
                pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
                started_at: chrono::Utc::now(),
                sync,
            },
            probes,
        }
    }

    /// What this replica would answer on `/readyz` now, and whether it leads.
    async fn look(&self) -> Report {
        let probe = self.probes.ready().await;
        let nats_connected = self.probes.nats_connected();
        let leader = self.probes.metrics.is_leader();
        match probe {
            Ok(body) => Report {
                ready: true,
                readiness: "ready".into(),
                mode: body
                    .lines()
                    .find_map(|l| l.strip_prefix("mode: "))
                    .map(str::to_owned),
                nats_connected,
                leader,
            },
            Err(why) => Report {
                ready: false,
                readiness: why.lines().next().unwrap_or("not ready").to_owned(),
                mode: None,
                nats_connected,
                leader,
            },
        }
    }

    /// Writes the row until `stop`; then deletes it. Failures are retried at the next look
    /// (logged once per run of failures): the row is for `status`, never for serving logins.
    pub async fn run(self, stop: CancellationToken) {
        // Lockouts recorded by an earlier process under this name ended with its memory.
        let _ = tokio::time::timeout(
            WRITE_TIMEOUT,
            crate::db::lockouts::forget_replica(&self.pool, &self.me.name),
        )
        .await;
        let mut written: Option<(Report, Instant)> = None;
        let mut pruned = Instant::now();
        let mut failing = false;
        let mut tick = tokio::time::interval(LOOK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let report = self.look().await;
            if stop.is_cancelled() {
                break;
            }
            if written
                .as_ref()
                .is_some_and(|(r, at)| *r == report && at.elapsed() < BEAT_EVERY)
            {
                continue;
            }
            match tokio::time::timeout(WRITE_TIMEOUT, replicas::beat(&self.pool, &self.me, &report))
                .await
            {
                Ok(Ok(())) => {
                    written = Some((report, Instant::now()));
                    failing = false;
                }
                outcome => {
                    written = None;
                    if !failing {
                        let why = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            _ => "no answer within 2s".into(),
                        };
                        tracing::debug!(error = %why, "cannot write this replica's row in nats.replicas (status shows it as not heard from); retrying");
                        failing = true;
                    }
                }
            }
            if pruned.elapsed() >= Duration::from_secs(60) {
                pruned = Instant::now();
                let _ = tokio::time::timeout(
                    WRITE_TIMEOUT,
                    replicas::prune(&self.pool, FORGET_AFTER.as_secs_f64()),
                )
                .await;
            }
        }
    }

    /// Deletes the row (bounded: a stopping replica must not wait for Postgres).
    pub async fn deregister(pool: &PgPool, name: &str) {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, replicas::deregister(pool, name)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_printable() {
        assert!(check_name("pod-7").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("  ").is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_name(&"x".repeat(201)).is_err());
        assert!(name(None).ends_with(&format!(":{}", std::process::id())));
        assert_eq!(name(Some("r1")), "r1");
    }
}
