//! Lockout after repeated wrong passwords (deny reason `locked_out`).
//!
//! A client with a wrong password usually does not stop: its library reconnects every couple of
//! seconds, forever, and an attacker guessing passwords does the same on purpose. Each attempt
//! costs a bcrypt run (~75 ms of CPU at cost 10). After `failures` wrong passwords for one
//! username within `duration`, every attempt for that username is refused for the rest of
//! `duration` without hashing — the right password included, or the lockout would not slow
//! guessing down. A successful login clears the count.
//!
//! Counts live in this replica's memory (bounded, time-limited): with several replicas an
//! attacker gets up to `failures` tries per replica per `duration`. The price of any lockout is
//! that someone who knows a username can keep that user out by failing on purpose; set
//! `--lockout-failures 0` where that matters more.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

#[derive(Debug, Clone)]
pub struct LockoutSettings {
    /// Wrong passwords before the lockout starts; 0 turns lockout off.
    pub failures: u32,
    /// How long failures are counted, and how long a lockout lasts (from the first failure).
    pub duration: Duration,
}

impl Default for LockoutSettings {
    fn default() -> Self {
        Self {
            failures: 10,
            duration: Duration::from_secs(300),
        }
    }
}

pub struct Lockout {
    failures: u32,
    /// Keyed hash of the username (a client picks the username, up to 4 KB: never store it) ->
    /// wrong passwords since the entry was created (it expires after `duration`).
    counts: Option<Cache<u64, Arc<AtomicU32>>>,
    hasher: RandomState,
}

impl Lockout {
    pub fn new(settings: &LockoutSettings) -> Self {
        let counts = (settings.failures > 0 && !settings.duration.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.duration)
                .build()
        });
        Self {
            failures: settings.failures,
            counts,
            hasher: RandomState::new(),
        }
    }

    fn key(&self, username: &str) -> u64 {
        self.hasher.hash_one(username)
    }

    /// True while `username` is locked out.
    pub fn is_locked(&self, username: &str) -> bool {
        self.counts
            .as_ref()
            .and_then(|c| c.get(&self.key(username)))
            .is_some_and(|n| n.load(Ordering::Relaxed) >= self.failures)
    }

    /// Counts a wrong password; true when this one started the lockout.
    pub fn failed(&self, username: &str) -> bool {
        let Some(counts) = &self.counts else {
            return false;
        };
        let n = counts
            .get_with(self.key(username), || Arc::new(AtomicU32::new(0)))
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        n == self.failures
    }

    /// A successful login forgets earlier failures.
    pub fn succeeded(&self, username: &str) {
        if let Some(counts) = &self.counts {
            counts.invalidate(&self.key(username));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_n_failures_and_success_resets() {
        let l = Lockout::new(&LockoutSettings {
            failures: 3,
            duration: Duration::from_secs(60),
        });
        assert!(!l.failed("a"));
        assert!(!l.failed("a"));
        l.succeeded("a");
        assert!(!l.failed("a"));
        assert!(!l.failed("a"));
        assert!(!l.is_locked("a"));
        assert!(l.failed("a"), "the third failure starts the lockout");
        assert!(l.is_locked("a"));
        assert!(!l.is_locked("b"), "per username");
    }

    #[test]
    fn zero_turns_it_off() {
        let l = Lockout::new(&LockoutSettings {
            failures: 0,
            duration: Duration::from_secs(60),
        });
        for _ in 0..100 {
            assert!(!l.failed("a"));
        }
        assert!(!l.is_locked("a"));
    }
}
