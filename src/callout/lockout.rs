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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use tokio::sync::Notify;

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

/// Why an attempt may not check a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `failures` wrong passwords within the window: refused without checking.
    Locked,
    /// So many checks of this username are in flight that one more could exceed the limit,
    /// and none finished before the deadline.
    Busy,
}

/// Per username: wrong passwords in the current window and checks in flight.
#[derive(Default)]
struct State {
    failures: u32,
    in_flight: u32,
    /// The first failure of the window; the window (and a lockout) ends `duration` after it.
    since: Option<Instant>,
}

impl State {
    fn expire(&mut self, window: Duration) {
        if self.since.is_some_and(|t| t.elapsed() >= window) {
            self.failures = 0;
            self.since = None;
        }
    }
}

#[derive(Default)]
struct Entry {
    state: Mutex<State>,
    /// An attempt finished (or the count was cleared): waiting attempts look again.
    changed: Notify,
}

impl Entry {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checking and counting are one step: an attempt is admitted only while wrong passwords plus
/// checks already in flight stay below the limit, so a parallel burst of N wrong passwords
/// gets at most `failures` of them checked (the others wait for a slot, then are refused as
/// locked out). Admitted attempts that turn out right (or fail for another reason) give their
/// slot back.
pub struct Lockout {
    failures: u32,
    window: Duration,
    /// Keyed hash of the username (a client picks the username, up to 4 KB: never store it).
    entries: Option<Cache<u64, Arc<Entry>>>,
    hasher: RandomState,
}

impl Lockout {
    pub fn new(settings: &LockoutSettings) -> Self {
        let entries = (settings.failures > 0 && !settings.duration.is_zero()).then(|| {
            // An entry idle for a whole window has nothing left to say (its window, which
            // started at or before its last use, is over).
            Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(settings.duration)
                .build()
        });
        Self {
            failures: settings.failures,
            window: settings.duration,
            entries,
            hasher: RandomState::new(),
        }
    }

    fn key(&self, username: &str) -> u64 {
        self.hasher.hash_one(username)
    }

    /// True while `username` is locked out.
    pub fn is_locked(&self, username: &str) -> bool {
        let Some(entry) = self
            .entries
            .as_ref()
            .and_then(|e| e.get(&self.key(username)))
        else {
            return false;
        };
        let mut s = entry.state();
        s.expire(self.window);
        s.failures >= self.failures
    }

    /// Admits one password check of `username`, counted before it runs. Waits (until
    /// `deadline`) while the checks in flight could still push the count to the limit.
    pub async fn attempt(&self, username: &str, deadline: Instant) -> Result<Attempt, Refused> {
        let Some(entries) = &self.entries else {
            return Ok(Attempt {
                entry: None,
                limit: 0,
                done: false,
                waited: false,
            });
        };
        let entry = entries.get_with(self.key(username), || Arc::new(Entry::default()));
        let mut waited = false;
        loop {
            let changed = entry.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a finish between the look and the wait is not lost.
            changed.as_mut().enable();
            {
                let mut s = entry.state();
                s.expire(self.window);
                if s.failures >= self.failures {
                    return Err(Refused::Locked);
                }
                if s.failures + s.in_flight < self.failures {
                    s.in_flight += 1;
                    return Ok(Attempt {
                        entry: Some(entry.clone()),
                        limit: self.failures,
                        done: false,
                        waited,
                    });
                }
            }
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                return Err(Refused::Busy);
            }
            waited = true;
        }
    }

    /// How long the lockout of `username` still lasts; None when it is not locked out.
    pub fn remaining(&self, username: &str) -> Option<Duration> {
        let entry = self.entries.as_ref()?.get(&self.key(username))?;
        let mut s = entry.state();
        s.expire(self.window);
        let since = s.since.filter(|_| s.failures >= self.failures)?;
        Some(self.window.saturating_sub(since.elapsed()))
    }

    /// An operator lifted the lockout (`user unlock`): failures are forgotten, as after a
    /// successful login.
    pub fn lift(&self, username: &str) {
        self.succeeded(username);
    }

    /// An unlock requested `ago` (replayed after a full load of the copy, for a replica that
    /// was not following the change log then): lifts the lockout of `username` only if it
    /// started before the request, so a lockout earned since stays.
    pub fn lift_if_started_before(&self, username: &str, ago: Duration) {
        let Some(entry) = self
            .entries
            .as_ref()
            .and_then(|e| e.get(&self.key(username)))
        else {
            return;
        };
        let started_before = entry.state().since.is_some_and(|t| t.elapsed() >= ago);
        if started_before {
            self.lift(username);
        }
    }

    /// A successful login (also one answered by the credential cache) forgets earlier failures.
    pub fn succeeded(&self, username: &str) {
        if let Some(entry) = self
            .entries
            .as_ref()
            .and_then(|e| e.get(&self.key(username)))
        {
            {
                let mut s = entry.state();
                s.failures = 0;
                s.since = None;
            }
            entry.changed.notify_waiters();
        }
    }
}

/// One admitted password check. Report how it went with [`Attempt::failed`] or
/// [`Attempt::succeeded`]; dropped without either (an internal error, an overloaded lane),
/// it counts as nothing and gives its slot back.
pub struct Attempt {
    entry: Option<Arc<Entry>>,
    limit: u32,
    done: bool,
    waited: bool,
}

enum Outcome {
    Failed,
    Succeeded,
    Neither,
}

impl Attempt {
    /// True when it had to wait for other checks of the username to finish first.
    pub fn waited(&self) -> bool {
        self.waited
    }

    /// A wrong password (or unknown user); true when this one started the lockout.
    pub fn failed(mut self) -> bool {
        self.finish(Outcome::Failed)
    }

    /// The right password: earlier failures are forgotten.
    pub fn succeeded(mut self) {
        self.finish(Outcome::Succeeded);
    }

    fn finish(&mut self, outcome: Outcome) -> bool {
        self.done = true;
        let Some(entry) = &self.entry else {
            return false;
        };
        let started = {
            let mut s = entry.state();
            s.in_flight = s.in_flight.saturating_sub(1);
            match outcome {
                Outcome::Failed => {
                    s.since.get_or_insert_with(Instant::now);
                    s.failures = s.failures.saturating_add(1);
                    s.failures == self.limit
                }
                Outcome::Succeeded => {
                    s.failures = 0;
                    s.since = None;
                    false
                }
                Outcome::Neither => false,
            }
        };
        entry.changed.notify_waiters();
        started
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Outcome::Neither);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn locks_after_n_failures_and_success_resets() {
        let l = Lockout::new(&LockoutSettings {
            failures: 3,
            duration: Duration::from_secs(60),
        });
        assert!(!l.attempt("a", soon()).await.unwrap().failed());
        assert!(!l.attempt("a", soon()).await.unwrap().failed());
        l.attempt("a", soon()).await.unwrap().succeeded();
        assert!(!l.attempt("a", soon()).await.unwrap().failed());
        assert!(!l.attempt("a", soon()).await.unwrap().failed());
        l.succeeded("b");
        assert!(!l.is_locked("a"));
        assert!(
            l.attempt("a", soon()).await.unwrap().failed(),
            "the third failure starts the lockout"
        );
        assert!(l.is_locked("a"));
        assert_eq!(l.attempt("a", soon()).await.err(), Some(Refused::Locked));
        assert!(!l.is_locked("b"), "per username");
        let left = l.remaining("a").expect("locked out");
        assert!(left > Duration::from_secs(50) && left <= Duration::from_secs(60));
        assert_eq!(l.remaining("b"), None);
        // An attempt dropped without an outcome (an internal error) counts as nothing.
        drop(l.attempt("c", soon()).await.unwrap());
        assert!(!l.is_locked("c"));
    }

    #[tokio::test]
    async fn lifting_ends_a_lockout_at_once() {
        let l = Lockout::new(&LockoutSettings {
            failures: 2,
            duration: Duration::from_secs(60),
        });
        l.attempt("a", soon()).await.unwrap().failed();
        l.attempt("a", soon()).await.unwrap().failed();
        assert!(l.is_locked("a"));
        l.lift("a");
        assert!(!l.is_locked("a"));
        assert_eq!(l.remaining("a"), None);
        assert!(l.attempt("a", soon()).await.is_ok(), "checked again");
    }

    /// A replayed unlock lifts a lockout that started before it, not one earned since.
    #[tokio::test]
    async fn a_replayed_unlock_spares_a_newer_lockout() {
        let l = Lockout::new(&LockoutSettings {
            failures: 1,
            duration: Duration::from_secs(60),
        });
        l.attempt("a", soon()).await.unwrap().failed();
        l.lift_if_started_before("a", Duration::from_secs(30));
        assert!(l.is_locked("a"), "locked after the unlock 30 s ago");
        l.lift_if_started_before("a", Duration::ZERO);
        assert!(!l.is_locked("a"), "locked before the unlock just now");
    }

    #[tokio::test]
    async fn zero_turns_it_off() {
        let l = Lockout::new(&LockoutSettings {
            failures: 0,
            duration: Duration::from_secs(60),
        });
        for _ in 0..100 {
            assert!(!l.attempt("a", soon()).await.unwrap().failed());
        }
        assert!(!l.is_locked("a"));
    }

    #[tokio::test]
    async fn the_window_starts_at_the_first_failure() {
        let l = Lockout::new(&LockoutSettings {
            failures: 2,
            duration: Duration::from_millis(300),
        });
        l.attempt("a", soon()).await.unwrap().failed();
        l.attempt("a", soon()).await.unwrap().failed();
        assert!(l.is_locked("a"));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!l.is_locked("a"), "over after the window");
        assert!(!l.attempt("a", soon()).await.unwrap().failed());
    }

    /// Check-then-act would let a parallel burst past the limit: all of them look before any
    /// has failed. Counted on admission, at most `failures` checks run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_parallel_burst_gets_at_most_the_limit_checked() {
        let l = Arc::new(Lockout::new(&LockoutSettings {
            failures: 3,
            duration: Duration::from_secs(60),
        }));
        let checked = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = vec![];
        for _ in 0..40 {
            let l = l.clone();
            let checked = checked.clone();
            tasks.push(tokio::spawn(async move {
                match l.attempt("victim", soon()).await {
                    Ok(attempt) => {
                        checked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        // The "hash": long enough for every other attempt to arrive meanwhile.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        attempt.failed();
                        None
                    }
                    Err(r) => Some(r),
                }
            }));
        }
        let mut refused = 0;
        for t in tasks {
            if let Some(r) = t.await.unwrap() {
                assert_eq!(r, Refused::Locked);
                refused += 1;
            }
        }
        assert_eq!(checked.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(refused, 37);
        assert!(l.is_locked("victim"));
    }

    /// Right passwords in parallel (a reconnect storm of clients sharing a username) are not
    /// refused: they wait for a slot, and a success frees everyone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn parallel_right_passwords_wait_for_a_slot_and_all_get_in() {
        let l = Arc::new(Lockout::new(&LockoutSettings {
            failures: 2,
            duration: Duration::from_secs(60),
        }));
        let mut tasks = vec![];
        for _ in 0..10 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                let attempt = l.attempt("shared", soon()).await?;
                let waited = attempt.waited();
                tokio::time::sleep(Duration::from_millis(20)).await;
                attempt.succeeded();
                Ok::<bool, Refused>(waited)
            }));
        }
        let mut waited = 0;
        for t in tasks {
            waited += usize::from(t.await.unwrap().expect("admitted"));
        }
        assert_eq!(
            waited, 8,
            "2 at once; the others waited (and may skip hashing)"
        );
        // With no slot freed before the deadline, an attempt gives up as Busy.
        let a = l.attempt("shared", soon()).await.unwrap();
        let b = l.attempt("shared", soon()).await.unwrap();
        let waited = l
            .attempt("shared", Instant::now() + Duration::from_millis(50))
            .await;
        assert_eq!(waited.err(), Some(Refused::Busy));
        drop((a, b));
    }
}
