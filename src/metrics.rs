//! Counters and the callout decision-time histogram, rendered in Prometheus text format.
//!
//! Hand-rolled rather than a metrics crate: a handful of counters and one histogram do not
//! justify a registry, and the histogram needs percentiles for the benchmark report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Log-linear buckets: 8 sub-buckets per power of two of microseconds, up to ~70 minutes.
const SUB: usize = 8;
const BUCKETS: usize = 32 * SUB;

#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    allowed: AtomicU64,
    denied: Mutex<BTreeMap<&'static str, u64>>,
    bad_requests: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests skipped because nats-server had stopped waiting, by the stage they reached.
    skipped: Mutex<BTreeMap<&'static str, u64>>,
    /// Answers published after nats-server had certainly stopped waiting.
    late_answers: AtomicU64,
    /// How long an answer published now waits in nats-server, per answering connection, µs.
    answer_lag_us: Mutex<BTreeMap<usize, u64>>,
    decision_us: Vec<AtomicU64>,
    decision_count: AtomicU64,
    decision_sum_us: AtomicU64,
    pub sync_pushes: AtomicU64,
    pub sync_failures: AtomicU64,
    /// 1 while this replica leads the sync.
    leader: AtomicU64,
    /// The outbox as this replica last saw it while leading (0 on followers).
    outbox_pending: AtomicU64,
    outbox_oldest_ms: AtomicU64,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            allowed: AtomicU64::new(0),
            denied: Mutex::default(),
            bad_requests: Mutex::default(),
            skipped: Mutex::default(),
            late_answers: AtomicU64::new(0),
            answer_lag_us: Mutex::default(),
            decision_us: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            decision_count: AtomicU64::new(0),
            decision_sum_us: AtomicU64::new(0),
            sync_pushes: AtomicU64::new(0),
            sync_failures: AtomicU64::new(0),
            leader: AtomicU64::new(0),
            outbox_pending: AtomicU64::new(0),
            outbox_oldest_ms: AtomicU64::new(0),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let log = 63 - us.leading_zeros() as usize; // >= 3
    let shift = log - 3;
    let sub = ((us >> shift) as usize) & (SUB - 1);
    ((log - 2) * SUB + sub).min(BUCKETS - 1)
}

/// Upper bound (µs) of a bucket, for percentile reporting.
fn bucket_upper(i: usize) -> u64 {
    if i < SUB {
        return i as u64 + 1;
    }
    let log = i / SUB + 2;
    let sub = (i % SUB) as u64;
    let shift = log - 3;
    ((SUB as u64 + sub + 1) << shift).saturating_sub(1)
}

impl Metrics {
    pub fn count_allow(&self) {
        self.inner.allowed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_deny(&self, reason: &'static str) {
        *self
            .inner
            .denied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }
    pub fn count_bad_request(&self, kind: &'static str) {
        *self
            .inner
            .bad_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }
    /// `n` requests skipped at `stage` (`queued`: before opening it; `verified`: opened, before
    /// any lookup; `decided`: before minting or sealing) because nats-server stopped waiting.
    pub fn count_skipped(&self, stage: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        *self
            .inner
            .skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(stage)
            .or_default() += n;
    }
    pub fn count_late_answer(&self) {
        self.inner.late_answers.fetch_add(1, Ordering::Relaxed);
    }
    /// The answer lag of connection `connection` (0: the one requests come in on; reply
    /// connections 1…N).
    pub fn set_answer_lag(&self, connection: usize, lag: Duration) {
        self.inner
            .answer_lag_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(connection, lag.as_micros() as u64);
    }

    /// Requests skipped, every stage.
    pub fn skipped(&self) -> u64 {
        self.inner
            .skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }
    pub fn late_answers(&self) -> u64 {
        self.inner.late_answers.load(Ordering::Relaxed)
    }
    pub fn count_push(&self, ok: bool) {
        let c = if ok {
            &self.inner.sync_pushes
        } else {
            &self.inner.sync_failures
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn observe_decision(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.inner.decision_us[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.inner.decision_count.fetch_add(1, Ordering::Relaxed);
        self.inner.decision_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// This replica took or gave up the sync leadership (a follower reports an empty outbox).
    pub fn set_leader(&self, leading: bool) {
        self.inner
            .leader
            .store(u64::from(leading), Ordering::Relaxed);
        if !leading {
            self.set_backlog(0, 0.0);
        }
    }

    /// The outbox after a drain: rows waiting and the age of the oldest.
    pub fn set_backlog(&self, pending: i64, oldest_secs: f64) {
        self.inner
            .outbox_pending
            .store(pending.max(0) as u64, Ordering::Relaxed);
        self.inner
            .outbox_oldest_ms
            .store((oldest_secs.max(0.0) * 1000.0) as u64, Ordering::Relaxed);
    }

    pub fn pushes(&self) -> u64 {
        self.inner.sync_pushes.load(Ordering::Relaxed)
    }

    pub fn allowed(&self) -> u64 {
        self.inner.allowed.load(Ordering::Relaxed)
    }
    pub fn denied(&self, reason: &str) -> u64 {
        self.inner
            .denied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    /// Decision-time percentile (0.0..=1.0) as an upper bucket bound; None before any request.
    pub fn decision_percentile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .inner
            .decision_us
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(bucket_upper(i)));
            }
        }
        None
    }

    /// True while this replica leads the sync (for its `nats.replicas` row, and the JetStream
    /// snapshot's one writer).
    pub fn is_leader(&self) -> bool {
        self.inner.leader.load(Ordering::Relaxed) == 1
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // The usual `_build_info` gauge: always 1, the labels say which build runs.
        let _ = writeln!(out, "# TYPE nats_pg_auth_build_info gauge");
        let _ = writeln!(
            out,
            "nats_pg_auth_build_info{{version=\"{}\",git_sha=\"{}\"}} 1",
            crate::build_info::VERSION,
            crate::build_info::GIT_SHA
        );
        let _ = writeln!(out, "# TYPE nats_pg_auth_logins_allowed_total counter");
        let _ = writeln!(out, "nats_pg_auth_logins_allowed_total {}", self.allowed());
        let count = |n: u64| n.to_string();
        labelled(
            &mut out,
            ("nats_pg_auth_logins_denied_total", "counter", "reason"),
            &self.inner.denied,
            count,
        );
        labelled(
            &mut out,
            ("nats_pg_auth_bad_requests_total", "counter", "kind"),
            &self.inner.bad_requests,
            count,
        );
        labelled(
            &mut out,
            ("nats_pg_auth_callout_skipped_total", "counter", "stage"),
            &self.inner.skipped,
            count,
        );
        let _ = writeln!(
            out,
            "# TYPE nats_pg_auth_callout_late_answers_total counter"
        );
        let _ = writeln!(
            out,
            "nats_pg_auth_callout_late_answers_total {}",
            self.late_answers()
        );
        let _ = writeln!(out, "# TYPE nats_pg_auth_sync_pushes_total counter");
        let _ = writeln!(
            out,
            "nats_pg_auth_sync_pushes_total {}",
            self.inner.sync_pushes.load(Ordering::Relaxed)
        );
        labelled(
            &mut out,
            (
                "nats_pg_auth_callout_answer_lag_seconds",
                "gauge",
                "connection",
            ),
            &self.inner.answer_lag_us,
            |us| (us as f64 / 1e6).to_string(),
        );
        let _ = writeln!(out, "# TYPE nats_pg_auth_sync_leader gauge");
        let _ = writeln!(
            out,
            "nats_pg_auth_sync_leader {}",
            self.inner.leader.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE nats_pg_auth_sync_outbox_pending gauge");
        let _ = writeln!(
            out,
            "nats_pg_auth_sync_outbox_pending {}",
            self.inner.outbox_pending.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE nats_pg_auth_sync_outbox_oldest_seconds gauge");
        let _ = writeln!(
            out,
            "nats_pg_auth_sync_outbox_oldest_seconds {}",
            self.inner.outbox_oldest_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(out, "# TYPE nats_pg_auth_sync_failures_total counter");
        let _ = writeln!(
            out,
            "nats_pg_auth_sync_failures_total {}",
            self.inner.sync_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE nats_pg_auth_decision_seconds summary");
        for q in [0.5, 0.9, 0.99, 0.999] {
            if let Some(d) = self.decision_percentile(q) {
                let _ = writeln!(
                    out,
                    "nats_pg_auth_decision_seconds{{quantile=\"{q}\"}} {}",
                    d.as_secs_f64()
                );
            }
        }
        let _ = writeln!(
            out,
            "nats_pg_auth_decision_seconds_count {}",
            self.inner.decision_count.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "nats_pg_auth_decision_seconds_sum {}",
            self.inner.decision_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        out
    }
}

/// Prometheus text for the login caches: hits and misses per cache, notifications applied,
/// flushes, and whether the change listener is connected (0 means logins read Postgres).
/// One metric with one label, a line per key of `values` (`value` formats the number).
fn labelled<K: std::fmt::Display>(
    out: &mut String,
    (name, kind, label): (&str, &str, &str),
    values: &Mutex<BTreeMap<K, u64>>,
    value: impl Fn(u64) -> String,
) {
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (key, n) in values.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "{name}{{{label}=\"{key}\"}} {}", value(*n));
    }
}

pub fn render_cache(cache: &crate::copy::LoginCache) -> String {
    use crate::copy::CacheStats;
    let s = cache.stats();
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE nats_pg_auth_cache_lookups_total counter");
    for (cache_name, result, counter) in [
        ("logins_by_username", "hit", &s.login_hits),
        ("logins_by_username", "miss", &s.login_misses),
        ("logins_by_token", "hit", &s.token_hits),
        ("logins_by_token", "miss", &s.token_misses),
        ("unknown_users", "hit", &s.unknown_user_hits),
        ("unknown_tokens", "hit", &s.unknown_token_hits),
        ("credentials", "hit", &s.credential_hits),
        ("credentials", "miss", &s.credential_misses),
        // Usernames and tokens the live copy does not hold: read from Postgres ("miss"), or,
        // beyond --unknown-reads-per-second, answered unknown by the copy ("hit").
        ("absent_credentials", "miss", &s.absent_reads),
        ("absent_credentials", "hit", &s.absent_unread),
    ] {
        let _ = writeln!(
            out,
            "nats_pg_auth_cache_lookups_total{{cache=\"{cache_name}\",result=\"{result}\"}} {}",
            CacheStats::get(counter)
        );
    }
    let _ = writeln!(out, "# TYPE nats_pg_auth_cache_notifications_total counter");
    let _ = writeln!(
        out,
        "nats_pg_auth_cache_notifications_total {}",
        CacheStats::get(&s.notifications)
    );
    let _ = writeln!(out, "# TYPE nats_pg_auth_cache_flushes_total counter");
    let _ = writeln!(
        out,
        "nats_pg_auth_cache_flushes_total {}",
        CacheStats::get(&s.flushes)
    );
    let _ = writeln!(out, "# TYPE nats_pg_auth_cache_listener_up gauge");
    let _ = writeln!(
        out,
        "nats_pg_auth_cache_listener_up {}",
        u8::from(cache.is_live())
    );
    let (users, tokens) = cache.copy_size();
    let _ = writeln!(out, "# TYPE nats_pg_auth_copy_users gauge");
    let _ = writeln!(out, "nats_pg_auth_copy_users {users}");
    let _ = writeln!(out, "# TYPE nats_pg_auth_copy_tokens gauge");
    let _ = writeln!(out, "nats_pg_auth_copy_tokens {tokens}");
    let _ = writeln!(out, "# TYPE nats_pg_auth_copy_loaded gauge");
    let _ = writeln!(
        out,
        "nats_pg_auth_copy_loaded {}",
        u8::from(cache.is_loaded())
    );
    let _ = writeln!(out, "# TYPE nats_pg_auth_copy_reloads_total counter");
    let _ = writeln!(
        out,
        "nats_pg_auth_copy_reloads_total {}",
        CacheStats::get(&s.reloads)
    );
    let _ = writeln!(out, "# TYPE nats_pg_auth_copy_stale_seconds gauge");
    let _ = writeln!(
        out,
        "nats_pg_auth_copy_stale_seconds {}",
        cache.stale_for().map_or(0, |d| d.as_secs())
    );
    let _ = writeln!(
        out,
        "# TYPE nats_pg_auth_copy_snapshot_timestamp_seconds gauge"
    );
    let _ = writeln!(
        out,
        "nats_pg_auth_copy_snapshot_timestamp_seconds {}",
        CacheStats::get(&s.snapshot_current_at)
    );
    let _ = writeln!(out, "# TYPE nats_pg_auth_copy_from_snapshot gauge");
    let _ = writeln!(
        out,
        "nats_pg_auth_copy_from_snapshot {}",
        u8::from(cache.snapshot_age().is_some())
    );
    // 1 while logins are answered from the copy because Postgres is unreachable.
    let _ = writeln!(out, "# TYPE nats_pg_auth_db_outage gauge");
    let _ = writeln!(
        out,
        "nats_pg_auth_db_outage {}",
        u8::from(cache.in_outage())
    );
    let _ = writeln!(out, "# TYPE nats_pg_auth_logins_from_copy_total counter");
    let _ = writeln!(
        out,
        "nats_pg_auth_logins_from_copy_total {}",
        CacheStats::get(&s.logins_from_copy)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for us in [
            0u64, 1, 7, 8, 9, 15, 16, 100, 999, 1000, 1_000_000, 60_000_000,
        ] {
            let b = bucket_of(us);
            assert!(b >= last, "bucket order for {us}");
            assert!(
                bucket_upper(b) >= us,
                "upper bound of bucket {b} below {us}"
            );
            last = b;
        }
    }

    #[test]
    fn percentiles() {
        let m = Metrics::default();
        for _ in 0..99 {
            m.observe_decision(Duration::from_micros(100));
        }
        m.observe_decision(Duration::from_millis(50));
        let p50 = m.decision_percentile(0.5).unwrap();
        assert!(p50 >= Duration::from_micros(100) && p50 < Duration::from_micros(120));
        assert!(m.decision_percentile(1.0).unwrap() >= Duration::from_millis(50));
    }
}
