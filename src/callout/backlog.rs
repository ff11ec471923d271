//! Requests received but not started yet, and which one to serve next.
//!
//! At most a fixed number of requests are handled at once; the rest wait here. While the
//! backlog is short they are served in arrival order. When it is deep (the oldest has waited
//! more than half the auth timeout: serving in order would answer everyone with less than half
//! of their time left, and the overloaded server needs time to process the answer too) the
//! newest is served first: in a reconnect storm the
//! requests at the front have the least time left, and answering them first means answering
//! every request late — after nats-server, itself busy, has given up. Serving the newest gets
//! answers to those that can still use them; the older ones left waiting are dropped once their
//! auth timeout has passed since they were received (the server gave up; the client was told
//! `Authorization Violation` and will retry), without any work.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// True when a request queued at `since`, due at `deadline`, has waited more than half of its
/// time: the queue it is at the front of is serving too late, newest first is better.
fn waited_too_long(since: Instant, deadline: Instant, now: Instant) -> bool {
    now.duration_since(since) > deadline.saturating_duration_since(since) / 2
}

/// A request as it came off the subscription.
pub struct Queued<T> {
    pub item: T,
    pub received: Instant,
}

pub struct Backlog<T> {
    queue: VecDeque<Queued<T>>,
    /// The server's auth timeout: past it after `received`, nobody waits for the answer.
    window: Duration,
}

impl<T> Backlog<T> {
    pub fn new(window: Duration) -> Self {
        Self {
            queue: VecDeque::new(),
            window,
        }
    }

    pub fn push(&mut self, item: T, received: Instant) {
        self.queue.push_back(Queued { item, received });
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The next request to serve, after dropping those nobody waits for any more (returned
    /// count). `None` when nothing is left.
    pub fn pop(&mut self, now: Instant) -> (Option<Queued<T>>, usize) {
        let mut dropped = 0;
        while self
            .queue
            .front()
            .is_some_and(|q| now >= q.received + self.window)
        {
            self.queue.pop_front();
            dropped += 1;
        }
        let deep = self
            .queue
            .front()
            .is_some_and(|q| waited_too_long(q.received, q.received + self.window, now));
        let next = if deep {
            self.queue.pop_back()
        } else {
            self.queue.pop_front()
        };
        (next, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_order_while_short_newest_first_when_deep_expired_dropped() {
        let t = Instant::now();
        let window = Duration::from_secs(2);
        let mut b = Backlog::new(window);
        for i in 0..4 {
            b.push(i, t + Duration::from_millis(i * 100));
        }
        // Oldest waited 900 ms (of 2 s): still arrival order.
        let (next, dropped) = b.pop(t + Duration::from_millis(900));
        assert_eq!((next.map(|q| q.item), dropped), (Some(0), 0));
        // The oldest (1, received at 100 ms) has waited 1.05 s: newest first.
        let (next, _) = b.pop(t + Duration::from_millis(1_150));
        assert_eq!(next.map(|q| q.item), Some(3));
        // 2.15 s: request 1 is past its window, dropped unseen; 2 is served.
        let (next, dropped) = b.pop(t + Duration::from_millis(2_150));
        assert_eq!((next.map(|q| q.item), dropped), (Some(2), 1));
        assert!(b.is_empty());
        assert_eq!(b.pop(t).0.map(|q| q.item), None);
    }
}
