//! Keeps the login copy (see [`crate::cache`]) complete and current, and answers from it when
//! Postgres cannot be asked.
//!
//! One task per replica (`keep_copy`) owns the change listener ([`crate::db::notify`]):
//! - on every (re)connect it loads the whole copy in one snapshot and installs it; only then
//!   does the copy answer live logins again (notifications sent while disconnected were lost);
//! - on every batch of notifications it stamps their scopes at once (those logins read
//!   Postgres meanwhile) and re-reads the users of those scopes in one query per table;
//! - every few seconds it re-reads accounts whose signing key is not on the server yet (their
//!   push is recorded without a notification);
//! - on disconnect the copy stays as it was and the outage grace starts counting.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::login::{Login, Shape};
use super::{Callout, Deny, DenyReason};
use crate::cache::{CopyLookup, Scope, CHANGE_CHANNEL, LISTENER_APPLICATION_NAME, SYNC_CHANNEL};
use crate::db::logins::{AccountPart, LoginRow, RolePart, UserFilter, UserPart};
use crate::db::notify::{self, Event, ListenSettings};

/// Users without overrides of one (role, account) share one prepared shape during a load.
type ShapeMemo = HashMap<(Option<i64>, i64), Arc<Shape>>;

/// Result of a lookup: the login (None: no such user/token) and whether the copy answered
/// because Postgres could not (the JWT lifetime is then capped).
pub(super) struct Found<T> {
    pub value: Option<T>,
    pub from_copy: bool,
}

/// Where [`Callout::read_or_copy`] got its answer.
pub(super) enum Read<R, T> {
    /// Postgres answered (the row or rows, or none).
    Postgres(R),
    /// Postgres could not be asked: the copy's answer.
    Copy(Found<T>),
}

/// What the maintainer's read in flight ended with.
enum Outcome {
    Reload(Result<(usize, usize, Duration), sqlx::Error>),
    Refresh(Result<(), sqlx::Error>),
}

/// The maintainer's read in flight: polled in the same `select!` as the listener, so a
/// notification is stamped the moment it arrives, whatever that read is waiting for.
type Work = Pin<Box<dyn Future<Output = Outcome> + Send>>;

impl Callout {
    /// Loads the copy and keeps it current until `stop`.
    ///
    /// No notification waits behind a read: the reload or re-read in flight is one branch of
    /// the loop's `select!`, so every notification is received and stamped
    /// ([`crate::cache::LoginCache::on_notification`]) when it arrives, making the entries it
    /// covers unusable at once, even while a read waits for a lock (a tenant admin's `LOCK
    /// TABLE`, an operator's `ALTER TABLE`; bounded by `db::LOCK_TIMEOUT`). Scopes notified
    /// meanwhile accumulate and are re-read together when the read in flight is done; a failed
    /// read puts its scopes back and is retried every second.
    pub async fn keep_copy(self: Arc<Self>, stop: CancellationToken) {
        let settings = ListenSettings {
            name: LISTENER_APPLICATION_NAME,
            channels: &[CHANGE_CHANNEL, SYNC_CHANNEL],
            health_interval: self.cache.settings().health_check_interval,
        };
        let mut events = notify::spawn(&self.pool, settings, stop.clone());
        let mut connected = false;
        let mut need_reload = false;
        let mut reload_failures = 0u32;
        // Stamped, not re-read yet, not in flight.
        let mut pending: HashSet<Scope> = HashSet::new();
        // The scopes of the re-read in flight (back to `pending` if it fails).
        let mut in_flight: HashSet<Scope> = HashSet::new();
        let mut work: Option<Work> = None;
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
                        need_reload = true;
                        backing_off = false;
                        // Whatever was in flight may have missed notifications: a reload
                        // covers it all.
                        work = None;
                        in_flight.clear();
                        pending.clear();
                    }
                    Some(Event::Notes(notes)) => {
                        for n in notes {
                            match self.cache.on_notification(&n.channel, &n.payload) {
                                Some(scope) => { pending.insert(scope); }
                                None => need_reload = true,
                            }
                        }
                    }
                    Some(Event::Disconnected(_)) => {
                        connected = false;
                        self.cache.set_disconnected();
                        // The reload on reconnect covers what was in flight.
                        work = None;
                        pending.extend(in_flight.drain());
                    }
                },
                done = async { work.as_mut().expect("polled only when set").await }, if work.is_some() => {
                    work = None;
                    match done {
                        Outcome::Reload(Ok((users, tokens, took))) => {
                            reload_failures = 0;
                            tracing::info!(
                                users,
                                tokens,
                                took_ms = took.as_millis() as u64,
                                "login copy loaded"
                            );
                            // Scopes notified during the load were stamped after its ticket and
                            // stay in `pending`: they are re-read next, and not served before.
                            if connected && !need_reload {
                                self.cache.set_live();
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
                _ = retry.tick() => backing_off = false,
                _ = settle.tick() => {
                    if connected && !need_reload {
                        pending.extend(self.cache.unsettled_accounts().into_iter().map(Scope::Account));
                    }
                }
            }
            if work.is_some() || !connected || backing_off {
                continue;
            }
            if need_reload {
                // The reload's ticket is newer than every stamp so far: it covers them.
                need_reload = false;
                pending.clear();
                let me = self.clone();
                work = Some(Box::pin(async move { Outcome::Reload(me.reload().await) }));
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

    /// Reads everything into the copy, in place (see [`crate::cache::LoginCache::load_users`]).
    pub async fn reload(&self) -> Result<(usize, usize, Duration), sqlx::Error> {
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
        self.cache
            .finish_load(ticket, loaded.tokens, loaded.certificates);
        let (users, tokens) = self.cache.copy_size();
        Ok((users, tokens, started.elapsed()))
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
    pub(super) async fn read_or_copy<R, T>(
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
    pub(super) fn answer_from_copy<T>(
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
