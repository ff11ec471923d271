//! The one way this service LISTENs: a dedicated connection per listener, the same reconnect
//! and health rules everywhere (login copy, sync wake-ups, kick requests).
//!
//! A listener is a task that turns Postgres notifications into [`Event`]s on a channel:
//! `Connected` after every (re)connect — anything notified while disconnected was missed, so
//! the consumer must re-read what it keeps — `Notes` with every notification that was
//! buffered at that moment (a burst of 10,000 is one batch), and `Disconnected` when the
//! connection is lost. It reconnects with a backoff (100 ms doubling to 5 s) until stopped.
//!
//! Dead connections are found from both ends: the client runs `SELECT 1` with a timeout every
//! `health_interval`, and the connection asks the Postgres server for TCP keepalives (see
//! [`harden`]) so the server ends a session whose client vanished (a partitioned replica)
//! in about 11 s instead of the operating system's two hours.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Executor, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Server-side TCP keepalives (seconds): idle, interval, count. A silent peer is dropped after
/// idle + interval × count = 11 s. Ignored by Postgres on Unix-domain sockets.
pub const KEEPALIVE: (u32, u32, u32) = (5, 2, 3);

/// Asks the Postgres server to probe this session's TCP connection (see [`KEEPALIVE`]).
/// Best effort: a pooler that refuses the settings leaves the client-side health checks.
pub async fn harden<'c, E>(conn: E)
where
    E: Executor<'c, Database = sqlx::Postgres>,
{
    let (idle, interval, count) = KEEPALIVE;
    let sql = format!(
        "SELECT set_config('tcp_keepalives_idle', '{idle}', false), \
                set_config('tcp_keepalives_interval', '{interval}', false), \
                set_config('tcp_keepalives_count', '{count}', false)"
    );
    if let Err(e) = conn.execute(sql.as_str()).await {
        tracing::debug!(error = %e, "cannot set TCP keepalives on a Postgres session");
    }
}

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub channel: String,
    pub payload: String,
}

#[derive(Debug)]
pub enum Event {
    /// LISTEN is in place (first connect or reconnect). Re-read whatever depends on missed
    /// notifications.
    Connected,
    /// Every notification that was buffered, in order.
    Notes(Vec<Note>),
    /// The connection was lost (or could not be opened); reconnecting.
    Disconnected(String),
}

/// How a listener behaves.
#[derive(Debug, Clone)]
pub struct ListenSettings {
    /// `application_name` of the connection (visible in `pg_stat_activity`).
    pub name: &'static str,
    pub channels: &'static [&'static str],
    pub health_interval: Duration,
}

/// Starts a listener task; it ends when `stop` is cancelled or the receiver is dropped.
pub fn spawn(
    pool: &PgPool,
    settings: ListenSettings,
    stop: CancellationToken,
) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(64);
    let options = (*pool.connect_options())
        .clone()
        .application_name(settings.name);
    // A pool of one, of its own: the listener never takes a slot of the callout's pool, and a
    // pool outage of those never blocks it.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);
    tokio::spawn(run(own, settings, tx, stop));
    rx
}

async fn run(
    pool: PgPool,
    settings: ListenSettings,
    tx: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut logged_down = false;
    while !stop.is_cancelled() && !tx.is_closed() {
        let why = match connect(&pool, &settings).await {
            Ok(mut listener) => {
                if logged_down {
                    tracing::info!(
                        listener = settings.name,
                        "notification listener reconnected"
                    );
                    logged_down = false;
                }
                backoff = Duration::from_millis(100);
                if tx.send(Event::Connected).await.is_err() {
                    break;
                }
                match serve(&mut listener, &settings, &tx, &stop).await {
                    None => break,
                    Some(why) => why,
                }
            }
            Err(e) => e.to_string(),
        };
        if !logged_down {
            tracing::warn!(listener = settings.name, error = %why, "notification listener down; reconnecting");
            logged_down = true;
        } else {
            tracing::debug!(listener = settings.name, error = %why, retry_in = ?backoff, "notification listener still down");
        }
        if tx.send(Event::Disconnected(why)).await.is_err() {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    pool.close().await;
}

async fn connect(pool: &PgPool, settings: &ListenSettings) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Reconnecting is this module's job: a silent reconnect inside sqlx would hide the gap.
    listener.eager_reconnect(false);
    harden(&mut listener).await;
    // LISTEN and the health query take no table lock, but no session of the service waits
    // without bound (see `db::LOCK_TIMEOUT`).
    super::bound_session(&mut listener).await?;
    listener
        .listen_all(settings.channels.iter().copied())
        .await?;
    Ok(listener)
}

/// Forwards notifications until the connection is lost (`Some(reason)`) or the listener is
/// stopped (`None`).
async fn serve(
    listener: &mut PgListener,
    settings: &ListenSettings,
    tx: &mpsc::Sender<Event>,
    stop: &CancellationToken,
) -> Option<String> {
    let mut health = tokio::time::interval(settings.health_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            n = listener.try_recv() => match n {
                Ok(Some(first)) => {
                    let mut batch = vec![Note { channel: first.channel().into(), payload: first.payload().into() }];
                    while let Some(n) = listener.next_buffered() {
                        batch.push(Note { channel: n.channel().into(), payload: n.payload().into() });
                    }
                    if tx.send(Event::Notes(batch)).await.is_err() {
                        return None;
                    }
                }
                Ok(None) => return Some("connection closed".into()),
                Err(e) => return Some(e.to_string()),
            },
            _ = health.tick() => {
                let timeout = settings.health_interval.min(Duration::from_secs(3));
                match tokio::time::timeout(timeout, listener.execute("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Some(e.to_string()),
                    Err(_) => return Some(format!("health check got no answer within {timeout:?}")),
                }
            }
        }
    }
}
