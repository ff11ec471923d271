//! How far behind nats-server is with the answers of one connection.
//!
//! nats-server checks every answer (opens it, verifies the response and user JWTs, registers
//! the user) on the reading goroutine of the connection it arrives on, one after the other, and
//! delivers a message the connection publishes to itself from that goroutine too, after
//! everything sent before it. So the time such a probe takes to come back is how long an answer
//! published now waits before the server looks at it. In a reconnect storm that wait, not our
//! own, is what makes answers late: an answer the server reaches after the client's auth
//! timeout costs it the whole check for nothing (it verifies answers nobody waits for). The
//! callout skips requests whose answer would be reached too late.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// How often the probe goes out.
const EVERY: Duration = Duration::from_millis(50);
/// A probe out this long means the server is not reading this connection at all (frozen,
/// or seconds behind): its age then counts as the expected wait of an answer.
const STUCK: Duration = Duration::from_secs(3);
/// A probe out this long is taken as lost (its wait then counts as unknown, not as this long):
/// far beyond any auth timeout, so a server this far behind has had every request skipped
/// meanwhile anyway, while a probe lost without a reconnect cannot stop answers for longer.
const PROBE_LOST: Duration = Duration::from_secs(10);

/// The current wait of one connection, shared with the handlers that publish on it.
#[derive(Clone)]
pub struct Lag {
    start: Instant,
    /// The last probe's round trip, µs.
    last_us: Arc<AtomicU64>,
    /// When the probe in flight went out (µs since `start`, plus one); 0 when none is.
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

    /// What is seen of the server's queue at `now`: the last round trip, or longer while the
    /// probe in flight has been out longer (the gauge).
    pub fn now(&self, now: Instant) -> Duration {
        Duration::from_micros(self.last_us().max(self.pending_us(now)))
    }

    /// The wait an answer published at `now` is expected to have, for skipping: the last
    /// completed round trip. The age of the probe in flight counts only once it is past
    /// [`STUCK`]: while a burst drains, a probe sent at its peak is still out although the
    /// queue behind it is already shorter, and skipping by its age refused clients that the
    /// server would have let in (a 5,000-client storm: 388 skipped, all in 1.1 s later).
    /// Skipping wrongly costs a client its attempt; answering late costs only the work.
    pub fn expected(&self, now: Instant) -> Duration {
        let pending = self.pending_us(now);
        let pending = if pending >= STUCK.as_micros() as u64 {
            pending
        } else {
            0
        };
        Duration::from_micros(self.last_us().max(pending))
    }

    fn last_us(&self) -> u64 {
        self.last_us.load(Ordering::Relaxed)
    }

    fn pending_us(&self, now: Instant) -> u64 {
        match self.pending_since_us.load(Ordering::Relaxed) {
            0 => 0,
            since => self.micros(now).saturating_sub(since),
        }
    }

    /// Measures, every [`EVERY`] until `stop`, how long a message published on `client` takes
    /// to come back to it through nats-server: the server reads it on the same goroutine as the
    /// answers published before it, so that is the wait of an answer published now.
    /// (`Client::flush` would not do: it returns once the bytes are in the socket.) Publishes
    /// the wait as the `connection` label of the answer-lag gauge.
    pub async fn keep_measuring(
        self,
        client: Client,
        connection: usize,
        metrics: crate::metrics::Metrics,
        stop: CancellationToken,
    ) {
        let subject = format!(
            "{}.{:016x}{:016x}",
            crate::init::LAG_PROBE_PREFIX,
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let mut echoes = loop {
            match client.subscribe(subject.clone()).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe the answer-lag probe; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            seq += 1;
            let token = seq.to_string();
            let connects = client.statistics().connects.load(Ordering::Relaxed);
            let sent = Instant::now();
            self.pending_since_us
                .store(self.micros(sent), Ordering::Relaxed);
            let rtt = if client
                .publish(subject.clone(), token.clone().into())
                .await
                .is_err()
            {
                None
            } else {
                // Until our probe is back, or it cannot come back: the connection was made
                // again (what was in flight is lost) or it has been out for PROBE_LOST.
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        echo = echoes.next() => match echo {
                            Some(m) if m.payload.as_ref() == token.as_bytes() => {
                                break Some(sent.elapsed())
                            }
                            Some(_) => {} // an older probe, late
                            None => return, // the client is closed
                        },
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            metrics.set_answer_lag(connection, self.now(Instant::now()));
                            if client.statistics().connects.load(Ordering::Relaxed) != connects
                                || sent.elapsed() > PROBE_LOST
                            {
                                break None;
                            }
                        }
                    }
                }
            };
            self.pending_since_us.store(0, Ordering::Relaxed);
            // Unknown (not connected, or the probe was lost): nothing to say about the
            // server's queue, so nothing is skipped for it.
            let rtt = rtt.unwrap_or(Duration::ZERO);
            self.last_us
                .store(rtt.as_micros() as u64, Ordering::Relaxed);
            metrics.set_answer_lag(connection, rtt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_in_flight_longer_than_the_last_round_trip_shows() {
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

    #[test]
    fn skipping_expects_the_last_round_trip_until_the_probe_is_stuck() {
        let lag = Lag::default();
        let t = lag.start;
        lag.last_us.store(300_000, Ordering::Relaxed);
        lag.pending_since_us.store(lag.micros(t), Ordering::Relaxed);
        // A burst draining: the probe is out 2 s, the last one took 300 ms.
        let at = t + Duration::from_secs(2);
        assert_eq!(lag.now(at), Duration::from_secs(2));
        assert_eq!(lag.expected(at), Duration::from_millis(300));
        // Out past STUCK: the server is not reading; its age is the wait.
        let at = t + STUCK + Duration::from_millis(1);
        assert_eq!(lag.expected(at), STUCK + Duration::from_millis(1));
    }
}
