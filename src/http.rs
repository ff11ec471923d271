//! `/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1.
//!
//! Three fixed GET endpoints with `Connection: close` do not justify a web framework and its
//! dependency tree, so this reads one request line and writes one response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::Client;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Probes {
    pub metrics: Metrics,
    pub pool: PgPool,
    pub callout: Client,
    pub system: Client,
    /// The callout's caches, rendered with the other metrics.
    pub cache: Option<std::sync::Arc<crate::copy::LoginCache>>,
    /// The callout: ready only once its subscription exists on the server.
    pub handler: Option<std::sync::Arc<crate::callout::Callout>>,
    /// Set once the replica is stopping (asked to, or because an essential task died): why
    /// /readyz fails from then on.
    pub not_ready: std::sync::Arc<std::sync::OnceLock<String>>,
    /// The last Postgres check and when it ran: shared by every /readyz caller (see
    /// [`Probes::postgres`]).
    pub db_check: std::sync::Arc<tokio::sync::Mutex<Option<DbCheck>>>,
    /// Not ready while this replica's at-rest key is no longer the database's (it would need a
    /// restart with the current key; see [`crate::key_watch`]).
    pub key_watch: Option<crate::key_watch::KeyWatch>,
}

/// When the last Postgres check ran, and what it found.
type DbCheck = (Instant, Result<(), String>);

/// How long one Postgres check answers every /readyz: a probe hammered by many callers (every
/// kubelet, a scraper, anyone on the pod network) costs at most one `SELECT 1` per second on the
/// callout's pool.
const DB_CHECK_REUSE: Duration = Duration::from_secs(1);

/// At most this many HTTP connections are handled at once; more are closed unanswered, so the
/// endpoints cannot take memory or tasks from the callout.
const MAX_CONNECTIONS: usize = 32;

/// What /readyz says about a failed Postgres check: the kind of failure only. sqlx's own text
/// can carry the server's host, database and role names, and a server error message; it goes to
/// the service log at debug level instead of to whoever can reach the port.
fn postgres_problem(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::PoolTimedOut => "Postgres: no connection free or reachable within 1s".into(),
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => {
            "Postgres unreachable".into()
        }
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("Postgres refused the check (SQLSTATE {code})"),
            None => "Postgres refused the check".into(),
        },
        _ => "Postgres check failed".into(),
    }
}

impl Probes {
    /// Both NATS connections (callout and system) are up.
    pub fn nats_connected(&self) -> bool {
        self.callout.connection_state() == State::Connected
            && self.system.connection_state() == State::Connected
    }

    /// Ready when both NATS connections are up and the login copy is loaded and usable: then
    /// logins can be answered. Postgres being down does not make a replica unready while the
    /// copy answers (the body says so); it does once `--db-outage-grace` has passed. Not ready
    /// while shutting down or after an essential task died.
    pub(crate) async fn ready(&self) -> Result<String, String> {
        if let Some(why) = self.not_ready.get() {
            return Err(why.clone());
        }
        if let Some(why) = self.key_watch.as_ref().and_then(|w| w.superseded()) {
            return Err(why);
        }
        if self.callout.connection_state() != State::Connected {
            return Err("callout connection to NATS is down".into());
        }
        if self.system.connection_state() != State::Connected {
            return Err("system connection to NATS is down".into());
        }
        if let Some(cache) = &self.cache {
            if !cache.is_loaded() {
                return Err("no copy of the login data loaded yet (waiting for Postgres)".into());
            }
        }
        if self.handler.as_ref().is_some_and(|h| !h.is_serving()) {
            return Err("the auth callout has not subscribed yet".into());
        }
        let db = self.postgres().await;
        let Some(cache) = &self.cache else {
            return db.map(|()| "ready\n".to_owned());
        };
        match db {
            Ok(()) if cache.is_live() => Ok("ready\nmode: live\n".into()),
            Ok(()) => Ok("ready\nmode: catching up (login copy reloading; logins read Postgres)\n".into()),
            Err(why) if cache.within_grace() && cache.snapshot_age().is_some() => Ok(format!(
                "ready\nmode: outage, from snapshot taken {} ago ({why}); logins answered from the copy; restore Postgres\n",
                crate::copy::snapshot::age_text(cache.snapshot_age().unwrap_or_default())
            )),
            Err(why) if cache.within_grace() => Ok(format!(
                "ready\nmode: outage ({why}); logins answered from the copy, stale for {}s; restore Postgres\n",
                cache.stale_for().map_or(0, |d| d.as_secs())
            )),
            Err(why) => Err(format!(
                "{why}; the login copy is past --db-outage-grace (or off): logins are refused until Postgres is back"
            )),
        }
    }
}

impl Probes {
    /// `SELECT 1` on the pool, at most one at a time and at most once per [`DB_CHECK_REUSE`]:
    /// callers arriving meanwhile wait for the running check and share its answer.
    async fn postgres(&self) -> Result<(), String> {
        let mut last = self.db_check.lock().await;
        if let Some((at, result)) = last.as_ref() {
            if at.elapsed() < DB_CHECK_REUSE {
                return result.clone();
            }
        }
        let result = match tokio::time::timeout(
            Duration::from_secs(1),
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "readiness: Postgres check failed");
                Err(postgres_problem(&e))
            }
            Err(_) => Err("Postgres did not answer within 1s".into()),
        };
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, probes: Probes, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        // Busy: close it unanswered (dropping the stream) rather than queue it.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let probes = probes.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let line = String::from_utf8_lossy(&buf[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => {
                    let mut body = probes.metrics.render();
                    if let Some(cache) = &probes.cache {
                        body.push_str(&crate::metrics::render_cache(cache));
                    }
                    ("200 OK", body)
                }
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" => match probes.ready().await {
                    Ok(body) => ("200 OK", body),
                    Err(why) => ("503 Service Unavailable", format!("{why}\n")),
                },
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
