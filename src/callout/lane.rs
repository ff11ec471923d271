//! The hashing lane's scheduler: a fixed set of threads shared fairly between accounts.
//!
//! Each check is queued under a [`LaneKey`] (the account of the user whose hash is checked, or
//! one shared key for unknown usernames). A free thread takes the next check of the key with
//! the fewest checks running, keys with equal counts in turn (round-robin), so:
//! - a key with queued checks gets a thread as soon as one frees up, however many checks
//!   another key has queued: one tenant flooding wrong passwords delays another tenant's check
//!   by at most one check already running, not by the flood;
//! - one key runs at most `threads - 1` checks at once (with several threads): a thread is
//!   always free for the other keys, so another tenant's check starts at once instead of
//!   waiting for one of the flooding tenant's (whose duration a loaded machine stretches);
//!   otherwise the lane is work-conserving (a key alone uses every thread it may);
//! - a key may have at most `per_key_queue` checks waiting; more are refused at once (it could
//!   not be served before the auth timeout anyway, and it must not fill the lane's memory);
//! - a check whose deadline passed while it waited, or whose caller went away, is dropped
//!   before hashing (the deadline is the request's: when nats-server stops waiting, see
//!   `callout::deadline`, less the margin to send the answer);
//!   A check whose deadline passed is also dropped when the next check of its key is queued, so
//!   it does not hold a place a check that can still succeed could take. Checks of a key start
//!   in arrival order (unlike the callout's backlog, which serves the newest first when deep):
//!   a key's queue is bounded to what its threads get through within the auth timeout, so in
//!   order every queued check is in time; newest first would only starve the oldest.
//!
//! Memory: at most `threads` checks run at once, so argon2's memory is bounded by
//! `threads × --max-argon2-memory-kib` (checked at startup, see `config`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Whose share of the lane a check is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaneKey {
    /// A user of this account (`nats.accounts.id`).
    Account(i64),
    /// A username that names no user (the dummy check that keeps "no such user" as slow as a
    /// wrong password). All unknown names share one key: a flood of made-up names gets one
    /// share, like one account, and cannot starve real accounts; it only delays other unknown
    /// names, whose logins fail anyway.
    Unknown,
}

/// What the worker tells a job: run it, or its deadline passed before a thread was free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Go {
    Run,
    Expired,
}

/// A queued check. `work` is called exactly once, on a lane thread.
pub struct Job {
    pub deadline: Instant,
    pub work: Box<dyn FnOnce(Go) + Send>,
}

/// Why a check was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The key already has `per_key_queue` checks waiting.
    QueueFull,
    /// The lane's threads are gone.
    Closed,
}

#[derive(Default)]
struct Queues {
    waiting: HashMap<LaneKey, VecDeque<Job>>,
    /// Keys with waiting checks, in service order.
    ring: VecDeque<LaneKey>,
    running: HashMap<LaneKey, usize>,
    closed: bool,
}

impl Queues {
    /// The next check: of the first key in the ring with the fewest running checks, among the
    /// keys below `per_key_running`.
    fn next(&mut self, per_key_running: usize) -> Option<(LaneKey, Job)> {
        let running = |k: &LaneKey| self.running.get(k).copied().unwrap_or(0);
        let pos = (0..self.ring.len())
            .filter(|&i| running(&self.ring[i]) < per_key_running)
            .min_by_key(|&i| (running(&self.ring[i]), i))?;
        let key = self.ring.remove(pos)?;
        let queue = self.waiting.get_mut(&key)?;
        let job = queue.pop_front()?;
        if queue.is_empty() {
            self.waiting.remove(&key);
        } else {
            self.ring.push_back(key);
        }
        Some((key, job))
    }

    fn finished(&mut self, key: LaneKey) {
        if let Some(n) = self.running.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&key);
            }
        }
    }
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
    per_key_queue: usize,
    /// Checks one key may run at once: every thread but one (when there are several), so a
    /// thread is always there for the other keys.
    per_key_running: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The threads and their queues. Dropping the last handle lets the threads finish what is
/// queued and exit.
pub struct Lane {
    shared: Arc<Shared>,
}

impl Lane {
    /// `threads` threads named `{name}-{i}`, each calling `setup` first (e.g. to lower its
    /// priority). A thread that cannot be started is logged; the others serve.
    pub fn start(threads: usize, per_key_queue: usize, name: &str, setup: fn()) -> Lane {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
            per_key_queue: per_key_queue.max(1),
            per_key_running: threads.saturating_sub(1).max(1),
        });
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    setup();
                    work(&shared)
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        Lane { shared }
    }

    /// Queues `job` under `key`.
    /// Checks of the key whose deadline passed are dropped first (told `Expired`): they must
    /// not take the places of checks that can still be used.
    pub fn submit(&self, key: LaneKey, job: Job) -> Result<(), Refused> {
        let now = Instant::now();
        let mut q = self.shared.lock();
        if q.closed {
            return Err(Refused::Closed);
        }
        let queue = q.waiting.entry(key).or_default();
        let mut expired = Vec::new();
        while queue.front().is_some_and(|j| now >= j.deadline) {
            expired.extend(queue.pop_front());
        }
        let result = if queue.len() >= self.shared.per_key_queue {
            Err(Refused::QueueFull)
        } else {
            let first = queue.is_empty();
            queue.push_back(job);
            // A key emptied by the purge is still in the ring.
            if first && !q.ring.contains(&key) {
                q.ring.push_back(key);
            }
            Ok(())
        };
        drop(q);
        for job in expired {
            (job.work)(Go::Expired);
        }
        if result.is_ok() {
            self.shared.ready.notify_one();
        }
        result
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

fn work(shared: &Shared) {
    let mut q = shared.lock();
    loop {
        match q.next(shared.per_key_running) {
            Some((key, job)) => {
                if Instant::now() >= job.deadline {
                    drop(q);
                    (job.work)(Go::Expired);
                    q = shared.lock();
                    continue;
                }
                *q.running.entry(key).or_default() += 1;
                drop(q);
                // A panicking job must not take the thread (or the running count) with it.
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.work)(Go::Run)));
                q = shared.lock();
                q.finished(key);
                // A key that was at its limit may run again: a sleeping thread may take it
                // while this one serves another key.
                if !q.ring.is_empty() {
                    shared.ready.notify_one();
                }
            }
            None if q.closed => return,
            None => q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn noop() {}

    /// With one thread held busy, checks queued as A, A, A, B, A are served B before the
    /// second A: a key's queued checks give way to another key's.
    #[test]
    fn keys_are_served_in_turn_not_in_arrival_order() {
        let lane = Lane::start(1, 16, "t-lane", noop);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (order_tx, order_rx) = mpsc::channel::<&'static str>();
        let far = Instant::now() + Duration::from_secs(30);
        let (started_tx, started_rx) = mpsc::channel::<()>();
        lane.submit(
            LaneKey::Account(1),
            Job {
                deadline: far,
                work: Box::new(move |_| {
                    let _ = started_tx.send(());
                    let _ = gate_rx.recv();
                }),
            },
        )
        .unwrap();
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        for name in ["a1", "a2", "a3", "b1", "a4"] {
            let key = if name.starts_with('a') {
                LaneKey::Account(1)
            } else {
                LaneKey::Account(2)
            };
            let tx = order_tx.clone();
            lane.submit(
                key,
                Job {
                    deadline: far,
                    work: Box::new(move |_| {
                        let _ = tx.send(name);
                    }),
                },
            )
            .unwrap();
        }
        gate_tx.send(()).unwrap();
        let order: Vec<_> = (0..5)
            .map(|_| order_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(order, ["a1", "b1", "a2", "a3", "a4"]);
    }

    /// With two threads, a key flooding the lane holds one: another key's check runs while
    /// both of the first key's running checks would still be blocked.
    #[test]
    fn one_key_never_holds_every_thread() {
        let lane = Lane::start(2, 16, "t-lane", noop);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate_rx = Arc::new(Mutex::new(gate_rx));
        let (ran_tx, ran_rx) = mpsc::channel::<&'static str>();
        let far = Instant::now() + Duration::from_secs(30);
        for _ in 0..3 {
            let (gate_rx, ran_tx) = (gate_rx.clone(), ran_tx.clone());
            lane.submit(
                LaneKey::Account(1),
                Job {
                    deadline: far,
                    work: Box::new(move |_| {
                        let _ = ran_tx.send("a");
                        let _ = gate_rx.lock().unwrap().recv();
                    }),
                },
            )
            .unwrap();
        }
        assert_eq!(ran_rx.recv_timeout(Duration::from_secs(10)), Ok("a"));
        let tx = ran_tx.clone();
        lane.submit(
            LaneKey::Unknown,
            Job {
                deadline: far,
                work: Box::new(move |_| {
                    let _ = tx.send("b");
                }),
            },
        )
        .unwrap();
        assert_eq!(ran_rx.recv_timeout(Duration::from_secs(10)), Ok("b"));
        for _ in 0..3 {
            let _ = gate_tx.send(());
        }
        assert_eq!(ran_rx.recv_timeout(Duration::from_secs(10)), Ok("a"));
        assert_eq!(ran_rx.recv_timeout(Duration::from_secs(10)), Ok("a"));
    }

    #[test]
    fn a_full_key_is_refused_and_an_expired_check_is_not_run() {
        let lane = Lane::start(1, 2, "t-lane", noop);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<Go>();
        let far = Instant::now() + Duration::from_secs(30);
        let (started_tx, started_rx) = mpsc::channel::<()>();
        lane.submit(
            LaneKey::Unknown,
            Job {
                deadline: far,
                work: Box::new(move |_| {
                    let _ = started_tx.send(());
                    let _ = gate_rx.recv();
                }),
            },
        )
        .unwrap();
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let past = Instant::now();
        for deadline in [past, far] {
            let tx = go_tx.clone();
            lane.submit(
                LaneKey::Unknown,
                Job {
                    deadline,
                    work: Box::new(move |go| {
                        let _ = tx.send(go);
                    }),
                },
            )
            .unwrap();
        }
        // The expired check was dropped when the next one was queued: it is told so at once,
        // and its place is free again.
        assert_eq!(
            go_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Go::Expired
        );
        let tx = go_tx.clone();
        lane.submit(
            LaneKey::Unknown,
            Job {
                deadline: far,
                work: Box::new(move |go| {
                    let _ = tx.send(go);
                }),
            },
        )
        .unwrap();
        let refused = lane.submit(
            LaneKey::Unknown,
            Job {
                deadline: far,
                work: Box::new(|_| {}),
            },
        );
        assert_eq!(refused.err(), Some(Refused::QueueFull));
        // Another key still has room.
        lane.submit(
            LaneKey::Account(7),
            Job {
                deadline: far,
                work: Box::new(|_| {}),
            },
        )
        .unwrap();
        gate_tx.send(()).unwrap();
        let got: Vec<_> = (0..2)
            .map(|_| go_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(got, [Go::Run, Go::Run]);
    }
}
