//! When nats-server stops waiting for an answer, so work for a request it gave up on is skipped.
//!
//! nats-server publishes a request and waits its auth timeout (`authorization { timeout }`,
//! 2 s by default) for the answer; the request says when it was sent (`iat`, the server's clock,
//! whole seconds) and for how long (`exp - iat`). An answer published later is dropped by the
//! server: minting, signing and sealing it is CPU taken from requests that can still succeed,
//! which is what a reconnect storm runs short of.
//!
//! Two upper bounds of the moment the server gives up, both safe (never before it):
//! - from our receive time: the server sent the request before we received it, so it gives up
//!   at most `window` after `received`;
//! - from `iat`: the request was sent within `[iat, iat + 1 s)` of the server's clock, so it
//!   gives up before `iat + 1 s + window`. Our clock may differ from the server's by an offset
//!   `c`; every request gives `ours(received) - iat ≥ c` (it cannot arrive before it was sent),
//!   so the smallest such difference seen from that server bounds `c` from above. Requests
//!   delivered promptly keep that bound tight; a clock step backwards only loosens it. The
//!   bound is kept per server (servers' clocks differ) and renewed every minute, so a server
//!   whose clock was corrected is re-learnt.
//!
//! The `iat` bound is the one that sees time a request spent before it reached us (in
//! nats-server, in socket buffers, in the NATS client); the receive-time bound is the one that
//! works for the first request of a server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a server's smallest offset is trusted before it is learnt again.
const RENEW: Duration = Duration::from_secs(60);
/// Servers remembered at most (a fleet restarting many times gets new ids each time).
const MAX_SERVERS: usize = 4096;

/// Current Unix time in milliseconds.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Clone, Copy)]
struct Offset {
    /// Smallest `ours - iat` (ms) since `since`.
    current: i64,
    /// The smallest of the period before (kept so a renewal does not start from scratch).
    previous: i64,
    since: Instant,
}

/// Per-server upper bounds of the clock offset (ours minus the server's).
#[derive(Default)]
pub struct ServerClocks {
    offsets: Mutex<HashMap<Box<str>, Offset>>,
}

impl ServerClocks {
    /// Records a request of `server` stamped `iat` (server seconds) and received at `now_ms`
    /// (our milliseconds); returns the bound of the offset, in ms (≥ the true offset).
    pub fn observe(&self, server: &str, iat: i64, now_ms: i64, at: Instant) -> i64 {
        let sample = now_ms.saturating_sub(iat.saturating_mul(1000));
        let mut offsets = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = offsets.get_mut(server) {
            if at.duration_since(o.since) >= RENEW {
                o.previous = o.current;
                o.current = sample;
                o.since = at;
            } else {
                o.current = o.current.min(sample);
            }
            return o.current.min(o.previous);
        }
        if offsets.len() >= MAX_SERVERS {
            offsets.clear();
        }
        offsets.insert(
            server.into(),
            Offset {
                current: sample,
                previous: sample,
                since: at,
            },
        );
        sample
    }
}

/// When the server stops waiting for one request, as an upper bound in our monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub gives_up: Instant,
}

impl Deadline {
    /// From our receive time only (the request not opened yet): `received + window`.
    pub fn received(received: Instant, window: Duration) -> Deadline {
        Deadline {
            gives_up: received + window,
        }
    }

    /// Tightened by the request's `iat` and the server's offset bound (see the module doc).
    /// `now` / `now_ms` are the same moment in both clocks.
    pub fn with_iat(
        self,
        iat: i64,
        window: Duration,
        offset_ms: i64,
        now: Instant,
        now_ms: i64,
    ) -> Deadline {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX / 4);
        let ours_ms = iat
            .saturating_add(1)
            .saturating_mul(1000)
            .saturating_add(window_ms)
            .saturating_add(offset_ms);
        let left = ours_ms.saturating_sub(now_ms);
        let by_iat = if left <= 0 {
            now
        } else {
            now + Duration::from_millis(left as u64)
        };
        Deadline {
            gives_up: self.gives_up.min(by_iat),
        }
    }

    /// True once the server has certainly stopped waiting.
    pub fn passed(&self, now: Instant) -> bool {
        now >= self.gives_up
    }

    /// Until when anything may wait (a Postgres slot, a hashing slot): `margin` before the
    /// server gives up, to leave time to send the answer; never before `floor`.
    pub fn for_waits(&self, margin: Duration, floor: Instant) -> Instant {
        self.gives_up
            .checked_sub(margin)
            .unwrap_or(self.gives_up)
            .max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_bound_is_the_smallest_difference_per_server() {
        let clocks = ServerClocks::default();
        let t = Instant::now();
        // Our clock 300 ms ahead; sent at the start of second 100, delivered in 5 ms.
        assert_eq!(clocks.observe("N1", 100, 100_305, t), 305);
        // Later requests sent mid-second or delayed do not raise the bound.
        assert_eq!(clocks.observe("N1", 101, 101_950, t), 305);
        assert_eq!(clocks.observe("N1", 102, 104_000, t), 305);
        // Another server with its own clock.
        assert_eq!(clocks.observe("N2", 100, 98_000, t), -2_000);
        assert_eq!(clocks.observe("N1", 103, 103_301, t), 301);
        // After a renewal the previous period still counts, then ages out.
        let later = t + RENEW;
        assert_eq!(clocks.observe("N1", 200, 201_000, later), 301);
        assert_eq!(clocks.observe("N1", 300, 301_000, later + RENEW), 1_000);
    }

    #[test]
    fn deadline_is_the_earlier_bound() {
        let now = Instant::now();
        let window = Duration::from_secs(2);
        let d = Deadline::received(now, window);
        assert_eq!(d.gives_up, now + window);
        // Sent in second 100 by a server whose clock equals ours (offset bound 10 ms): it gives
        // up before 103.010 by our clock; at 101.500 that is 1.51 s away.
        let by_iat = d.with_iat(100, window, 10, now, 101_500);
        assert_eq!(by_iat.gives_up, now + Duration::from_millis(1_510));
        assert!(!by_iat.passed(now));
        // Already past it: skip.
        let late = d.with_iat(100, window, 10, now, 103_010);
        assert!(late.passed(now));
        // Received-time bound wins when it is earlier.
        let early = d.with_iat(100, window, 10, now, 100_000);
        assert_eq!(early.gives_up, now + window);
        // Waits stop a margin before; never before the floor.
        let margin = Duration::from_millis(250);
        assert_eq!(
            by_iat.for_waits(margin, now),
            now + Duration::from_millis(1_260)
        );
        assert_eq!(late.for_waits(margin, now), now);
    }
}
