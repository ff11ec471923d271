//! How far behind nats-server is with the answers of one connection.
//!
//! nats-server checks every answer (opens it, verifies the response and user JWTs, registers
//! the user) on the reading goroutine of the connection it arrives on, one after the other, and
//! answers a PING on that goroutine too, after everything sent before it. So the time a PING
//! takes to come back as PONG is how long an answer published now waits before the server looks
//! at it. In a reconnect storm that wait, not our own, is what makes answers late: an answer the
//! server reaches after the client's auth timeout costs it the whole check for nothing (it
//! verifies answers nobody waits for). The callout skips requests whose answer would be
//! reached too late.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use tokio_util::sync::CancellationToken;

/// How often the PING goes out.
const EVERY: Duration = Duration::from_millis(50);

/// The current wait of one connection, shared with the handlers that publish on it.
#[derive(Clone)]
pub struct Lag {
    start: Instant,
    /// The last PING's round trip, µs.
    last_us: Arc<AtomicU64>,
    /// When the PING in flight went out (µs since `start`, plus one); 0 when none is.
    pending_since_us: Arc<AtomicU64>,
}

impl Default for Lag {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_us: Arc::default(),
            pending_since_us: Arc::default(),
        }
    }
}

impl Lag {
    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64 + 1
    }

    /// The wait an answer published at `now` can expect: the last round trip, or longer while
    /// the PING in flight has been out longer.
    pub fn now(&self, now: Instant) -> Duration {
        let last = self.last_us.load(Ordering::Relaxed);
        let pending = match self.pending_since_us.load(Ordering::Relaxed) {
            0 => 0,
            since => self.micros(now).saturating_sub(since),
        };
        Duration::from_micros(last.max(pending))
    }

    /// Measures `client`'s round trip every [`EVERY`] until `stop`.
    pub async fn keep_measuring(self, client: Client, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            let sent = Instant::now();
            self.pending_since_us
                .store(self.micros(sent), Ordering::Relaxed);
            let flushed = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(Duration::from_secs(30), client.flush()) => r,
            };
            self.pending_since_us.store(0, Ordering::Relaxed);
            // Not connected: nothing to say about the server's queue (answers fail anyway).
            let rtt = match flushed {
                Ok(Ok(())) => sent.elapsed(),
                _ => Duration::ZERO,
            };
            self.last_us
                .store(rtt.as_micros() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_in_flight_longer_than_the_last_round_trip_counts() {
        let lag = Lag::default();
        let t = lag.start;
        lag.last_us.store(2_000, Ordering::Relaxed);
        assert_eq!(lag.now(t), Duration::from_millis(2));
        lag.pending_since_us
            .store(lag.micros(t + Duration::from_millis(10)), Ordering::Relaxed);
        assert_eq!(
            lag.now(t + Duration::from_millis(11)),
            Duration::from_millis(2)
        );
        assert_eq!(
            lag.now(t + Duration::from_millis(510)),
            Duration::from_millis(500)
        );
    }
}
