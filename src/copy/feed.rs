//! Keeps the login copy (see [`super::table`]) complete and current, and answers from it when
//! Postgres cannot be asked.
//!
//! One task per replica (`keep_copy`) owns the change listener ([`crate::db::notify`]):
//! - on its first connect it loads the whole copy in one snapshot and installs it; only then
//!   (and after one read of the change log from that snapshot) does the copy answer live
//!   logins;
//! - on a reconnect it resumes reading the log where it stopped, when it read it less than
//!   [`LOG_GAP_RELOAD`] ago on the same server history ([`changes::Epoch`]): the log holds
//!   every change committed meanwhile, so re-reading those scopes is a complete catch-up and
//!   the copy answers live logins again after that read. Otherwise it reloads in full;
//! - when a read finds the server on another history (a standby promoted behind the same
//!   address, a restore, a restart), it never compares its old snapshot there (the new primary
//!   reuses the xids of the transactions it never received): it re-reads every scope the new
//!   primary's log holds and every scope it read itself in the last [`PRUNE_AFTER`], and
//!   continues from a snapshot of the new history (see [`Callout::keep_copy`] for why that is
//!   complete);
//! - on every wake-up (any notification on its channels, whoever sent it) and every second it
//!   reads the change log ([`crate::db::changes`]) from where its previous read ended, stamps
//!   the scopes found at once (those logins read Postgres meanwhile) and re-reads the users of
//!   those scopes in one query per table. Payloads are never read: a forged notification costs
//!   one indexed query of a table no tenant can lock or write, and names nobody;
//! - every few seconds it re-reads accounts whose signing key is not on the server yet (their
//!   push is recorded without a notification);
//! - on disconnect the copy stays as it was and the outage grace starts counting.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::table::{CopyLookup, Scope, CHANGE_CHANNEL, LISTENER_APPLICATION_NAME, SYNC_CHANNEL};
use crate::callout::login::{Login, Shape};
use crate::callout::{Callout, Deny, DenyReason};
use crate::db::changes::{self, Snapshot};
use crate::db::logins::{AccountPart, LoginRow, RolePart, UserFilter, UserPart};
use crate::db::notify::{self, Event, ListenSettings};

/// Users without overrides of one (role, account) share one prepared shape during a load.
type ShapeMemo = HashMap<(Option<i64>, i64), Arc<Shape>>;

/// Result of a lookup: the login (None: no such user/token) and whether the copy answered
/// because Postgres could not (the JWT lifetime is then capped).
pub(crate) struct Found<T> {
    pub value: Option<T>,
    pub from_copy: bool,
}

/// Where [`Callout::read_or_copy`] got its answer.
pub(crate) enum Read<R, T> {
    /// Postgres answered (the row or rows, or none).
    Postgres(R),
    /// Postgres could not be asked: the copy's answer.
    Copy(Found<T>),
}

/// What the maintainer's read in flight ended with.
enum Outcome {
    Reload(Result<Loaded, sqlx::Error>),
    Refresh(Result<(), sqlx::Error>),
}

/// A full load: (users, tokens, time taken), the snapshot it saw, the scopes the log held.
type Loaded = ((usize, usize, Duration), Snapshot, Vec<String>);

/// The maintainer's reload or re-read in flight: polled in the same `select!` as the listener
/// and the log read, so a change is read and stamped whatever that read is waiting for.
type Work = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A read of the change log in flight: the scopes committed since the previous read, and the
/// snapshot the next read continues from. Runs beside [`Work`]: a re-read waiting for a lock
/// never holds back the log (which no tenant can lock).
type LogRead = Pin<Box<dyn Future<Output = Result<(Vec<String>, Snapshot), sqlx::Error>> + Send>>;

/// A replica that could not read the log for this long reloads in full instead: the rows it
/// missed may have been pruned by then (see [`PRUNE_AFTER`]).
pub(crate) const LOG_GAP_RELOAD: Duration = Duration::from_secs(60);

/// Rows of the change log that a snapshot at least this old saw are deleted (by every replica,
/// in turn; a delete is idempotent). Every replica following the log read them long before: it
/// reads every second, and one that could not for [`LOG_GAP_RELOAD`] reloads in full, as does
/// one whose listener reconnects. So the log holds a few minutes of changes, whatever the rate.
const PRUNE_AFTER: Duration = Duration::from_secs(300);

impl Callout {
    /// Loads the copy and keeps it current until `stop`.
    ///
    /// No change waits behind a read: the reload or re-read in flight and the log read are
    /// branches of the loop's `select!`, so every change committed is read from the log and
    /// stamped ([`super::LoginCache::on_change`]) about when it is committed, making the
    /// entries it covers unusable at once, even while a re-read waits for a lock (a tenant
    /// admin's `LOCK TABLE`, an operator's `ALTER TABLE`; bounded by `db::LOCK_TIMEOUT`). The
    /// log itself cannot be locked by tenants. Scopes found meanwhile accumulate and are
    /// re-read together when the read in flight is done; a failed read puts its scopes back
    /// and is retried every second.
    ///
    /// After a failover (the log read finds another [`changes::Epoch`]) the copy is brought to
    /// the new primary's state by re-reading two sets of scopes, not every user:
    /// - every scope the new primary's log holds. A change committed on the new history before
    ///   the snapshot this re-read takes is in it: its row is there (rows younger than
    ///   [`PRUNE_AFTER`] are never pruned, and prune marks of the old history are dropped and
    ///   refused by the server) and this replica read the old history less than
    ///   [`LOG_GAP_RELOAD`] ago (it reloads in full otherwise). These are the commits whose
    ///   reused xids the old snapshot would have called seen;
    /// - every scope this replica read from the log, or found in it at its last full load, in
    ///   the last [`PRUNE_AFTER`]. A transaction the old primary committed but never replicated
    ///   is undone by the promotion; if the copy applied it, it did so through one of these
    ///   scopes (its log row is written in the same transaction), provided the standby was
    ///   less than [`PRUNE_AFTER`] behind when it was promoted (the bound this relies on; a
    ///   standby minutes behind loses minutes of writes anyway).
    ///
    /// Every other user is as the copy holds it: committed before the promotion point and
    /// replicated, so the same on the new primary. Until that re-read is stamped the copy does
    /// not answer live logins (they read Postgres).
    pub async fn keep_copy(self: Arc<Self>, stop: CancellationToken) {
        let settings = ListenSettings {
            name: LISTENER_APPLICATION_NAME,
            channels: &[CHANGE_CHANNEL, SYNC_CHANNEL],
            health_interval: self.cache.settings().health_check_interval,
        };
        let mut events = notify::spawn(&self.pool, settings, stop.clone());
        let mut connected = false;
        let mut need_reload = false;
        // The work in flight is a full load (dropping it owes one).
        let mut reload_in_flight = false;
        let mut reload_failures = 0u32;
        // Stamped, not re-read yet, not in flight.
        let mut pending: HashSet<Scope> = HashSet::new();
        // The scopes of the re-read in flight (back to `pending` if it fails).
        let mut in_flight: HashSet<Scope> = HashSet::new();
        let mut work: Option<Work> = None;
        // Where the next log read continues (None: no full load since the last connect).
        let mut log_from: Option<Snapshot> = None;
        let mut log_read: Option<LogRead> = None;
        // A wake-up (or the timer) asked for a log read.
        let mut log_due = false;
        let mut last_log_ok = Instant::now();
        // The copy goes live after the first log read that follows a full load.
        let mut live_after_log = false;
        // A snapshot taken at least PRUNE_AFTER before the next prune (see `PRUNE_AFTER`).
        let mut prune_mark: Option<(Instant, Snapshot)> = None;
        // The server's history changed: the next log read is of the whole retained log.
        let mut rebase = false;
        // The log read in flight is that read.
        let mut reading_retained = false;
        // Scopes read from the log (or found in it at the last full load), kept PRUNE_AFTER:
        // what a failover may have to undo (see above).
        let mut history: VecDeque<(Instant, String)> = VecDeque::new();
        // The last read failed: the next one starts on the retry tick.
        let mut backing_off = false;
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut settle = tokio::time::interval(Duration::from_secs(2));
        settle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                ev = events.recv() => match ev {
                    None => break,
                    Some(Event::Connected) => {
                        connected = true;
                        backing_off = false;
                        if std::mem::take(&mut reload_in_flight) {
                            need_reload = true;
                        }
                        work = None;
                        pending.extend(in_flight.drain());
                        log_read = None;
                        reading_retained = false;
                        if log_from.is_some() && !need_reload && last_log_ok.elapsed() <= self.cache.settings().resume_window {
                            // Notifications missed while disconnected are rows of the log
                            // after `log_from`: reading it catches up; the copy is live again
                            // after that read.
                            tracing::info!("listener reconnected; resuming the change log where it stopped");
                            log_due = true;
                            live_after_log = true;
                        } else {
                            need_reload = true;
                            pending.clear();
                            log_from = None;
                        }
                    }
                    Some(Event::Notes(notes)) => {
                        // Wake-ups only: what changed is read from the log.
                        for _ in &notes {
                            self.cache.woken();
                        }
                        log_due = true;
                    }
                    Some(Event::Disconnected(_)) => {
                        connected = false;
                        self.cache.set_disconnected();
                        // Redone on reconnect (the log position `log_from` stays).
                        if std::mem::take(&mut reload_in_flight) {
                            need_reload = true;
                        }
                        work = None;
                        pending.extend(in_flight.drain());
                        log_read = None;
                        reading_retained = false;
                    }
                },
                done = async { work.as_mut().expect("polled only when set").await }, if work.is_some() => {
                    work = None;
                    reload_in_flight = false;
                    match done {
                        Outcome::Reload(Ok(((users, tokens, took), snapshot, recent))) => {
                            reload_failures = 0;
                            // Unlocks logged while the log was not followed (`user unlock`).
                            self.replay_unlocks();
                            let now = Instant::now();
                            history.clear();
                            history.extend(recent.into_iter().map(|s| (now, s)));
                            tracing::info!(
                                users,
                                tokens,
                                took_ms = took.as_millis() as u64,
                                "login copy loaded"
                            );
                            // Changes committed during the load are in the log after its
                            // snapshot: they are stamped by the next log read, and the copy
                            // answers live logins only then.
                            if connected && !need_reload {
                                log_from = Some(snapshot);
                                log_due = true;
                                last_log_ok = Instant::now();
                                live_after_log = true;
                                rebase = false;
                                prune_mark = None;
                            }
                        }
                        Outcome::Reload(Err(e)) => {
                            need_reload = true;
                            backing_off = true;
                            reload_failures += 1;
                            if reload_failures == 1 {
                                tracing::warn!(error = %e, "cannot load the login copy; retrying every second (logins read Postgres, or the previous copy while it is unreachable)");
                            }
                        }
                        Outcome::Refresh(Ok(())) => in_flight.clear(),
                        Outcome::Refresh(Err(e)) => {
                            backing_off = true;
                            tracing::debug!(error = %e, scopes = in_flight.len() + pending.len(), "cannot re-read changed users; retrying (they stay stamped: their logins read Postgres, or are refused from the copy)");
                            pending.extend(in_flight.drain());
                        }
                    }
                }
                read = async { log_read.as_mut().expect("polled only when set").await }, if log_read.is_some() => {
                    log_read = None;
                    let retained = std::mem::take(&mut reading_retained);
                    match read {
                        Ok((_, next)) if !retained && log_from.as_ref().is_some_and(|f| f.epoch != next.epoch) => {
                            // Another history: the scopes of that read mean nothing (see
                            // above). Logins read Postgres until the re-read is stamped.
                            tracing::warn!(
                                was = %log_from.as_ref().map(|f| f.epoch.0.as_str()).unwrap_or(""),
                                now = %next.epoch.0,
                                "Postgres is on another history (failover, restore or restart); re-reading the users changed in the last minutes instead of trusting the change log position"
                            );
                            self.cache.set_disconnected();
                            live_after_log = true;
                            rebase = true;
                            log_due = true;
                            prune_mark = None;
                        }
                        Ok((scopes, next)) => {
                            let now = Instant::now();
                            if retained {
                                rebase = false;
                                tracing::info!(
                                    from_new_log = scopes.len(),
                                    read_before = history.len(),
                                    "re-reading what the change logs of both histories name"
                                );
                                for (_, scope) in &history {
                                    pending.extend(self.cache.on_change(scope));
                                }
                            }
                            for scope in scopes {
                                // `unlock:` lifts a lockout (`user unlock`); it names no copied
                                // row, and is not replayed on another history.
                                if !self.lift_lockout(&scope) {
                                    pending.extend(self.cache.on_change(&scope));
                                    history.push_back((now, scope));
                                }
                            }
                            log_from = Some(next);
                            last_log_ok = now;
                            if std::mem::take(&mut live_after_log) && connected && !need_reload {
                                self.cache.set_live();
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot read the change log; retrying every second");
                        }
                    }
                }
                _ = retry.tick() => {
                    backing_off = false;
                    while history.front().is_some_and(|(at, _)| at.elapsed() > PRUNE_AFTER) {
                        history.pop_front();
                    }
                    // The safety net for a lost wake-up, and the retry of a failed log read.
                    log_due = true;
                    if let Some(from) = log_from.as_ref() {
                        self.prune_log(&mut prune_mark, from);
                    }
                }
                _ = settle.tick() => {
                    if connected && !need_reload {
                        pending.extend(self.cache.unsettled_accounts().into_iter().map(Scope::Account));
                    }
                }
            }
            if connected && log_read.is_none() && log_due {
                if let Some(from) = log_from.clone() {
                    log_due = false;
                    if last_log_ok.elapsed() > LOG_GAP_RELOAD {
                        // Rows it missed may be pruned: start over from a full load.
                        tracing::info!(
                            "the change log was not read for a minute; reloading the login copy"
                        );
                        log_from = None;
                        need_reload = true;
                        work = None;
                        pending.extend(in_flight.drain());
                    } else if rebase {
                        let pool = self.pool.clone();
                        reading_retained = true;
                        log_read = Some(Box::pin(async move { changes::retained(&pool).await }));
                    } else {
                        let pool = self.pool.clone();
                        log_read =
                            Some(Box::pin(async move { changes::since(&pool, &from).await }));
                    }
                }
            }
            if work.is_some() || !connected || backing_off {
                continue;
            }
            if need_reload {
                // The reload's ticket is newer than every stamp so far: it covers them.
                need_reload = false;
                reload_in_flight = true;
                pending.clear();
                let me = self.clone();
                work = Some(Box::pin(async move {
                    Outcome::Reload(me.load_all_and_log().await)
                }));
            } else if !pending.is_empty() {
                in_flight = std::mem::take(&mut pending);
                let (me, scopes) = (self.clone(), in_flight.clone());
                work = Some(Box::pin(async move {
                    Outcome::Refresh(me.refresh(&scopes).await)
                }));
            }
        }
        self.cache.set_disconnected();
    }

    /// Reads everything into the copy, in place (see [`super::LoginCache::load_users`]).
    pub async fn reload(&self) -> Result<(usize, usize, Duration), sqlx::Error> {
        Ok(self.load_all().await?.0)
    }

    /// [`Self::load_all`], and the scopes the log holds after it: what the load may have read
    /// of transactions a failover could undo (see [`Self::keep_copy`]).
    async fn load_all_and_log(&self) -> Result<Loaded, sqlx::Error> {
        let (counts, snapshot) = self.load_all().await?;
        let (recent, now) = changes::retained(&self.pool).await?;
        if now.epoch != snapshot.epoch {
            return Err(sqlx::Error::Protocol(
                "Postgres changed history during the load of the login copy".into(),
            ));
        }
        Ok((counts, snapshot, recent))
    }

    /// Deletes the log rows a snapshot at least [`PRUNE_AFTER`] old saw (in the background; a
    /// failure is retried at the next mark), and marks `now` for the next prune. A mark of
    /// another history than `now`'s is dropped unused ([`changes::prune`] refuses it too).
    fn prune_log(&self, mark: &mut Option<(Instant, Snapshot)>, now: &Snapshot) {
        match mark {
            Some((_, old)) if old.epoch != now.epoch => {
                *mark = Some((Instant::now(), now.clone()));
            }
            Some((at, _)) if at.elapsed() < PRUNE_AFTER => {}
            _ => {
                if let Some((_, old)) = mark.replace((Instant::now(), now.clone())) {
                    let pool = self.pool.clone();
                    tokio::spawn(async move {
                        match changes::prune(&pool, &old).await {
                            Ok(n) => tracing::debug!(rows = n, "change log pruned"),
                            Err(e) => tracing::debug!(error = %e, "cannot prune the change log"),
                        }
                    });
                }
            }
        }
    }

    /// A full load, and the snapshot it saw (the change log continues from it).
    async fn load_all(&self) -> Result<((usize, usize, Duration), Snapshot), sqlx::Error> {
        const CHUNK: usize = 4096;
        let started = Instant::now();
        let ticket = self.cache.load_ticket();
        let mut memo = ShapeMemo::new();
        let mut chunk = Vec::with_capacity(CHUNK);
        let loaded =
            crate::db::logins::load(&self.pool, &UserFilter::all(), |user, accounts, roles| {
                if let Some(login) = self.build(user, accounts, roles, &mut memo) {
                    chunk.push(Arc::new(login));
                    if chunk.len() == CHUNK {
                        self.cache.load_users(
                            std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)),
                            ticket,
                        );
                    }
                }
            })
            .await?;
        self.cache.load_users(chunk, ticket);
        let snapshot = loaded
            .snapshot
            .expect("a full load returns the snapshot it saw");
        self.cache
            .finish_load(ticket, loaded.tokens, loaded.certificates);
        let (users, tokens) = self.cache.copy_size();
        Ok(((users, tokens, started.elapsed()), snapshot))
    }

    /// Re-reads the users the scopes select and applies them to the copy.
    async fn refresh(&self, scopes: &HashSet<Scope>) -> Result<(), sqlx::Error> {
        let ticket = self.cache.ticket();
        let mut filter = UserFilter::default();
        for s in scopes {
            match *s {
                Scope::User(u) | Scope::Tokens(u) => filter.users.push(u),
                Scope::Role(r) => filter.roles.push(r),
                Scope::Account(a) => filter.accounts.push(a),
            }
        }
        let mut memo = ShapeMemo::new();
        let mut users = Vec::new();
        let loaded = crate::db::logins::load(&self.pool, &filter, |user, accounts, roles| {
            if let Some(login) = self.build(user, accounts, roles, &mut memo) {
                users.push(Arc::new(login));
            }
        })
        .await?;
        self.cache
            .apply(ticket, scopes, users, loaded.tokens, loaded.certificates);
        Ok(())
    }

    /// Prepares one user of a load; users without overrides share their (role, account) shape.
    fn build(
        &self,
        user: UserPart,
        accounts: &[AccountPart],
        roles: &[RolePart],
        memo: &mut ShapeMemo,
    ) -> Option<Login> {
        // Both lists come ordered by id from one snapshot, so every user finds its account.
        let account = accounts
            .binary_search_by_key(&user.account_id, |a| a.account_id)
            .ok()
            .map(|i| &accounts[i])?;
        let role = user.role_id.and_then(|r| {
            roles
                .binary_search_by_key(&r, |x| x.role_id)
                .ok()
                .map(|i| &roles[i])
        });
        if user.has_overrides() {
            return Some(self.prepare(LoginRow::assemble(user, role, account)));
        }
        let key = (user.role_id, user.account_id);
        let shape = match memo.get(&key) {
            Some(s) => s.clone(),
            None => {
                let login = self.prepare(LoginRow::assemble(user.clone(), role, account));
                memo.insert(key, login.shape.clone());
                login.shape.clone()
            }
        };
        Some(Login {
            user_id: user.user_id,
            username: Arc::from(user.username),
            password_hash: user.password_hash.map(String::into_boxed_str),
            nkey: user.nkey.map(String::into_boxed_str),
            user_active: user.user_active,
            mqtt_client_ids: user
                .user_mqtt_client_ids
                .into_iter()
                .map(String::into_boxed_str)
                .collect(),
            shape,
        })
    }

    /// Postgres is known to be unreachable and the copy is not current: go straight to the
    /// copy instead of spending the client's auth timeout on a connect that will fail.
    fn skip_postgres(&self) -> bool {
        self.cache.in_outage() && !self.cache.is_live()
    }

    /// Reads what the copy could not answer live (a name it does not hold, a stamped scope)
    /// from Postgres: in a DB slot, bounded by the client's deadline. While Postgres is known to
    /// be down, or when the read fails, the copy answers instead, within the outage grace. Every
    /// credential kind (username, token, nkey, certificate) looks up this way.
    pub(crate) async fn read_or_copy<R, T>(
        &self,
        deadline: Instant,
        read: impl std::future::Future<Output = Result<R, sqlx::Error>>,
        copy: impl FnOnce() -> CopyLookup<T>,
    ) -> Result<Read<R, T>, Deny> {
        if self.skip_postgres() {
            return Ok(Read::Copy(self.answer_from_copy(copy, "still down")?));
        }
        let slot = self.db_slot(deadline).await?;
        let read = self.db_read(deadline, read).await;
        // The slot bounds Postgres work only; hashing has its own lane.
        drop(slot);
        match read {
            Ok(v) => {
                self.cache.postgres_answered();
                Ok(Read::Postgres(v))
            }
            Err(why) => Ok(Read::Copy(self.answer_from_copy(copy, &why)?)),
        }
    }

    /// The copy's answer when Postgres could not be asked (`why`).
    pub(crate) fn answer_from_copy<T>(
        &self,
        lookup: impl FnOnce() -> CopyLookup<T>,
        why: &str,
    ) -> Result<Found<T>, Deny> {
        if !self.cache.within_grace() {
            let detail = if self.cache.settings().outage_grace.is_zero() {
                format!("Postgres unreachable ({why}); answering from the copy is off (--db-outage-grace 0)")
            } else if !self.cache.is_loaded() {
                format!("Postgres unreachable ({why}) and no copy of the login data loaded yet")
            } else {
                format!(
                    "Postgres unreachable ({why}) for longer than --db-outage-grace ({})",
                    humantime::format_duration(self.cache.settings().outage_grace)
                )
            };
            return Err(Deny::new(DenyReason::Internal, detail));
        }
        match lookup() {
            CopyLookup::Found(v) => {
                self.cache.served_from_copy(why);
                Ok(Found {
                    value: Some(v),
                    from_copy: true,
                })
            }
            CopyLookup::Unknown => {
                self.cache.served_from_copy(why);
                Ok(Found {
                    value: None,
                    from_copy: true,
                })
            }
            CopyLookup::Stale => Err(Deny::new(
                DenyReason::Internal,
                format!("Postgres unreachable ({why}), and this user changed just before: refused until Postgres is back"),
            )),
            CopyLookup::NotLoaded => Err(Deny::new(
                DenyReason::Internal,
                format!("Postgres unreachable ({why}) and no copy of the login data loaded yet"),
            )),
        }
    }
}
