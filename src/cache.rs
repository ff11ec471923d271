//! Caches of the login hot path, and how they are kept correct.
//!
//! A reconnect storm (a nats-server restart: thousands of clients at once, each answered
//! inside the 2 s auth timeout) must not turn into thousands of Postgres round trips and
//! bcrypt runs. What is cached:
//!
//! | cache | key | value | bound |
//! |---|---|---|---|
//! | logins by username | username | prepared [`Login`] (merged permissions, TTL, signer) | 30 s TTL, 250k |
//! | logins by token | SHA-256 of the token | `Login` + token row (expiry, revocation) | 30 s TTL, 250k |
//! | unknown usernames | username | — | 2 s TTL, 100k |
//! | verified credentials | HMAC(process key, username, password), 128 bits | SHA-256 (128 bits) of the hash it verified against | 10 min TTL, 250k |
//! | signing keys | signing public key | parsed `KeyPair` (no AES-GCM + seed parse per login) | 100k |
//! | merged permission sets | the set itself | shared `Arc` (users of one role share one copy) | 10k |
//!
//! ## Invalidation
//!
//! Triggers send `NOTIFY nats_pg_auth_change` with `user:<id>`, `role:<id>`, `account:<id>` or
//! `token:<user_id>`, and `NOTIFY nats_pg_auth_sync` with `<account id>` (signing keys added or
//! retired, account changed). A listener (one dedicated connection, started by the callout)
//! turns each into a *stamp*: a process-wide generation number bumped per notification and
//! recorded for the user, role, account or user's tokens. Every cached login carries the
//! generation read **before** its database read; it is served only while no stamp of its user,
//! role or account (or a full flush) is newer. So a change is visible to the next login as soon
//! as its notification is processed (sub-millisecond after COMMIT on loopback), and a read that
//! raced with the change can never be cached past it: the classic "invalidate, then the slow
//! reader inserts the old value" race is closed by the generation check.
//!
//! When the listener is not connected (startup, Postgres restart, lost connection), the row
//! caches are bypassed entirely — nothing is served from them and nothing is inserted — and
//! they are flushed when it is back (notifications sent meanwhile are lost). A health query
//! every 15 s catches a connection that died silently. The 30 s TTL is only a backstop.
//!
//! A login read while its account has a signing key the server does not have yet (a new
//! account, or a rotation waiting for its push) is never cached: the sync records the push
//! (`synced_at`) without a notification, and that is when the row changes. Retiring a key is
//! an `account_keys` change, which notifies.
//!
//! ## The verified-credential cache (trade-off)
//!
//! bcrypt at cost 10 takes ~50 ms of CPU: a 2-core machine checks ~40 passwords a second, so a
//! storm of 2,000 password clients would take 50 s — far beyond the 2 s auth timeout. The
//! credential cache remembers that `(username, password)` verified against a given stored hash,
//! so a reconnecting client costs one HMAC instead of one bcrypt.
//!
//! - The key is HMAC-SHA256 under a random per-process key, never the password; the value is
//!   SHA-256 of the stored hash it was checked against. Nothing is persisted; a process restart
//!   empties it.
//! - It is only trusted while the user's *current* `password_hash` (from a fresh or validly
//!   cached row) is the one it verified against: a password change, even to the same password
//!   (new salt), makes every old entry useless at once.
//! - Cost: while an entry lives (10 min, size-bounded), a memory dump of the running service
//!   lets an attacker test password guesses for that user at HMAC speed rather than bcrypt
//!   speed — the HMAC key sits in the same memory. That is the price of answering a storm in
//!   time; set it off (`CacheSettings::credentials`, or `LoginCache::set_credentials_enabled`)
//!   where a memory dump is in the threat model and storms are not.
//! - Failed checks are never cached; wrong passwords always pay bcrypt.
//!
//! Unknown usernames are remembered for 2 s (any `user:` notification drops them all, since a
//! new user's name is not in the payload). This spares Postgres, not the CPU: an unknown user
//! is still checked against a dummy bcrypt hash, so "no such user" and "wrong password" keep
//! taking the same time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use moka::sync::Cache;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::callout::login::{Issuer, Login, Shape};
use crate::callout::permissions::Merged;
use crate::db::logins::TokenRow;
use crate::keys::{KeyError, SeedCipher};

/// Channel of per-row change notifications (users, roles, accounts, tokens).
pub const CHANGE_CHANNEL: &str = "nats_pg_auth_change";
/// Channel of account sync work; its payload is the account id.
pub const SYNC_CHANNEL: &str = "nats_pg_auth_sync";
/// `application_name` of the listener connection (visible in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "nats-pg-auth cache listener";

/// Sizes, lifetimes and switches of the caches.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Cache login rows (by username and by token) and unknown usernames.
    pub logins: bool,
    /// Cache verified credentials (see the module docs for the trade-off).
    pub credentials: bool,
    /// Backstop lifetime of a cached login; notifications normally drop it much sooner.
    pub login_ttl: Duration,
    pub max_logins: u64,
    pub credential_ttl: Duration,
    pub max_credentials: u64,
    pub unknown_user_ttl: Duration,
    pub max_unknown_users: u64,
    pub max_signers: u64,
    /// How often the listener connection is checked with a query.
    pub health_check_interval: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            logins: true,
            credentials: true,
            login_ttl: Duration::from_secs(30),
            max_logins: 250_000,
            credential_ttl: Duration::from_secs(600),
            max_credentials: 250_000,
            unknown_user_ttl: Duration::from_secs(2),
            max_unknown_users: 100_000,
            max_signers: 100_000,
            health_check_interval: Duration::from_secs(15),
        }
    }
}

/// What a stamp applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scope {
    User(i64),
    /// Tokens of a user (a token change does not touch the username entry).
    Tokens(i64),
    Role(i64),
    Account(i64),
}

/// The generation read before a database read; pass it back when caching the result.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

/// Result of a username lookup.
pub enum UserLookup {
    Hit(Arc<Login>),
    /// Recently seen not to exist.
    Unknown,
    Miss,
}

/// A token login: the user's login and the token's own row.
type TokenLogin = (Arc<Login>, TokenRow);

struct Stamped<T> {
    value: T,
    generation: u64,
}

/// Counters, for tests, benchmarks and logs.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub login_hits: AtomicU64,
    pub login_misses: AtomicU64,
    pub token_hits: AtomicU64,
    pub token_misses: AtomicU64,
    pub unknown_user_hits: AtomicU64,
    pub credential_hits: AtomicU64,
    pub credential_misses: AtomicU64,
    pub notifications: AtomicU64,
    pub flushes: AtomicU64,
    /// Times the listener (re)connected and the caches went live.
    pub listener_connects: AtomicU64,
}

impl CacheStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub struct LoginCache {
    settings: CacheSettings,
    logins_on: AtomicBool,
    credentials_on: AtomicBool,
    /// The listener is connected: notifications are being received.
    live: AtomicBool,
    generation: AtomicU64,
    flushed_at: AtomicU64,
    users_changed_at: AtomicU64,
    stamps: Cache<Scope, u64>,
    /// Keyed by the login's own `username` (one shared allocation); the value carries the
    /// generation it was read at.
    by_username: Cache<Arc<str>, (Arc<Login>, u64)>,
    by_token: Cache<[u8; 32], Arc<Stamped<TokenLogin>>>,
    unknown_users: Cache<Box<str>, u64>,
    credentials: Cache<[u8; 16], [u8; 16]>,
    issuers: Cache<Box<str>, Arc<Issuer>>,
    permissions: Cache<Merged, Arc<Merged>>,
    shapes: Cache<Arc<Shape>, Arc<Shape>>,
    touched_tokens: Cache<i64, ()>,
    hmac_key: [u8; 32],
    stats: CacheStats,
}

impl LoginCache {
    pub fn new(settings: CacheSettings) -> Self {
        use rand::RngCore;
        let mut hmac_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut hmac_key);
        let ttl = settings.login_ttl;
        Self {
            logins_on: AtomicBool::new(settings.logins),
            credentials_on: AtomicBool::new(settings.credentials),
            live: AtomicBool::new(false),
            generation: AtomicU64::new(1),
            flushed_at: AtomicU64::new(0),
            users_changed_at: AtomicU64::new(0),
            // Unbounded on purpose: evicting a stamp early would resurrect a stale entry. A stamp
            // outlives every entry it can invalidate (entries live `ttl`), so this holds at most
            // "notifications in the last ttl + 10 s".
            stamps: Cache::builder()
                .time_to_live(ttl + Duration::from_secs(10))
                .build(),
            by_username: Cache::builder()
                .max_capacity(settings.max_logins)
                .time_to_live(ttl)
                .build(),
            by_token: Cache::builder()
                .max_capacity(settings.max_logins)
                .time_to_live(ttl)
                .build(),
            unknown_users: Cache::builder()
                .max_capacity(settings.max_unknown_users)
                .time_to_live(settings.unknown_user_ttl)
                .build(),
            credentials: Cache::builder()
                .max_capacity(settings.max_credentials)
                .time_to_live(settings.credential_ttl)
                .build(),
            issuers: Cache::builder().max_capacity(settings.max_signers).build(),
            permissions: Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            shapes: Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            touched_tokens: Cache::builder()
                .max_capacity(settings.max_logins)
                .time_to_live(Duration::from_secs(60))
                .build(),
            hmac_key,
            stats: CacheStats::default(),
            settings,
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Turns the login caches on or off at run time (off also empties them).
    pub fn set_logins_enabled(&self, on: bool) {
        self.logins_on.store(on, Ordering::SeqCst);
        if !on {
            self.flush();
        }
    }

    /// Turns the verified-credential cache on or off at run time (off also empties it).
    pub fn set_credentials_enabled(&self, on: bool) {
        self.credentials_on.store(on, Ordering::SeqCst);
        if !on {
            self.credentials.invalidate_all();
        }
    }

    /// True while change notifications are being received (the login caches are in use).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    fn rows_usable(&self) -> bool {
        self.logins_on.load(Ordering::Relaxed) && self.live.load(Ordering::SeqCst)
    }

    /// Take this before reading from the database; hand it to `put_*` with the result.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.generation.load(Ordering::SeqCst))
    }

    fn stamp(&self, scope: Scope) -> u64 {
        self.stamps.get(&scope).unwrap_or(0)
    }

    /// A login read at `generation` is still what the database says.
    fn fresh(&self, login: &Login, generation: u64, token: bool) -> bool {
        generation >= self.flushed_at.load(Ordering::SeqCst)
            && generation >= self.stamp(Scope::User(login.user_id))
            && generation >= self.stamp(Scope::Account(login.shape.account_id))
            && login
                .shape
                .role_id
                .is_none_or(|r| generation >= self.stamp(Scope::Role(r)))
            && (!token || generation >= self.stamp(Scope::Tokens(login.user_id)))
    }

    // ---- logins by username --------------------------------------------------------------

    pub fn user(&self, username: &str) -> UserLookup {
        if !self.rows_usable() {
            return UserLookup::Miss;
        }
        if let Some((login, generation)) = self.by_username.get(username) {
            if self.fresh(&login, generation, false) && &*login.username == username {
                bump(&self.stats.login_hits);
                return UserLookup::Hit(login);
            }
            self.by_username.invalidate(username);
        }
        if let Some(generation) = self.unknown_users.get(username) {
            if generation >= self.flushed_at.load(Ordering::SeqCst)
                && generation >= self.users_changed_at.load(Ordering::SeqCst)
            {
                bump(&self.stats.unknown_user_hits);
                return UserLookup::Unknown;
            }
            self.unknown_users.invalidate(username);
        }
        bump(&self.stats.login_misses);
        UserLookup::Miss
    }

    pub fn put_user(&self, username: &str, ticket: Ticket, login: &Arc<Login>) {
        if !self.rows_usable() || !login.cacheable() || !self.fresh(login, ticket.0, false) {
            return;
        }
        if &*login.username != username {
            return;
        }
        self.by_username
            .insert(login.username.clone(), (login.clone(), ticket.0));
    }

    pub fn put_unknown_user(&self, username: &str, ticket: Ticket) {
        if !self.rows_usable()
            || ticket.0 < self.flushed_at.load(Ordering::SeqCst)
            || ticket.0 < self.users_changed_at.load(Ordering::SeqCst)
        {
            return;
        }
        self.unknown_users.insert(username.into(), ticket.0);
    }

    // ---- logins by token -----------------------------------------------------------------

    pub fn token(&self, digest: &[u8; 32]) -> Option<(Arc<Login>, TokenRow)> {
        if !self.rows_usable() {
            return None;
        }
        if let Some(e) = self.by_token.get(digest) {
            if self.fresh(&e.value.0, e.generation, true) {
                bump(&self.stats.token_hits);
                return Some(e.value.clone());
            }
            self.by_token.invalidate(digest);
        }
        bump(&self.stats.token_misses);
        None
    }

    pub fn put_token(
        &self,
        digest: [u8; 32],
        ticket: Ticket,
        login: &Arc<Login>,
        token: &TokenRow,
    ) {
        if !self.rows_usable() || !login.cacheable() || !self.fresh(login, ticket.0, true) {
            return;
        }
        self.by_token.insert(
            digest,
            Arc::new(Stamped {
                value: (login.clone(), token.clone()),
                generation: ticket.0,
            }),
        );
    }

    /// True at most once a minute per token: `last_used_at` is bookkeeping, not worth a write
    /// per login.
    pub fn should_touch_token(&self, token_id: i64) -> bool {
        if self.touched_tokens.contains_key(&token_id) {
            return false;
        }
        self.touched_tokens.insert(token_id, ());
        true
    }

    // ---- verified credentials ------------------------------------------------------------

    /// The keyed hash of a username and password (the key is random per process), truncated
    /// to 128 bits: plenty against collisions, half the memory per entry.
    pub fn credential_key(&self, username: &str, password: &str) -> [u8; 16] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.hmac_key).expect("HMAC takes any key length");
        mac.update(&(username.len() as u64).to_be_bytes());
        mac.update(username.as_bytes());
        mac.update(password.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut key = [0u8; 16];
        key.copy_from_slice(&full[..16]);
        key
    }

    /// True when this credential was verified against exactly `password_hash` before.
    pub fn credential_verified(&self, key: &[u8; 16], password_hash: &str) -> bool {
        if !self.credentials_on.load(Ordering::Relaxed) {
            return false;
        }
        let hit = self.credentials.get(key).is_some_and(|h| {
            bool::from(subtle::ConstantTimeEq::ct_eq(
                &h[..],
                &hash_of(password_hash)[..],
            ))
        });
        bump(if hit {
            &self.stats.credential_hits
        } else {
            &self.stats.credential_misses
        });
        hit
    }

    /// Records a successful check (never call it for a failed one).
    pub fn put_credential(&self, key: [u8; 16], password_hash: &str) {
        if self.credentials_on.load(Ordering::Relaxed) {
            self.credentials.insert(key, hash_of(password_hash));
        }
    }

    // ---- signing keys and permission sets --------------------------------------------------

    /// The parsed signing key of an account. Cached by signing public key: a public key has
    /// exactly one seed, so the entry never goes stale (the row query decides which key to use).
    pub fn issuer(
        &self,
        cipher: &SeedCipher,
        account: &str,
        signing_public_key: &str,
        stored_seed: &str,
    ) -> Result<Arc<Issuer>, KeyError> {
        if let Some(i) = self.issuers.get(signing_public_key) {
            if i.account == account {
                return Ok(i);
            }
        }
        let keypair = crate::keys::keypair_from_stored(cipher, stored_seed, signing_public_key)?;
        let issuer = Arc::new(Issuer {
            account: account.to_owned(),
            signing_public_key: signing_public_key.to_owned(),
            keypair,
        });
        self.issuers
            .insert(signing_public_key.into(), issuer.clone());
        Ok(issuer)
    }

    /// One shared copy per distinct permission set.
    pub fn intern(&self, merged: Merged) -> Arc<Merged> {
        if !self.logins_on.load(Ordering::Relaxed) {
            return Arc::new(merged);
        }
        if let Some(m) = self.permissions.get(&merged) {
            return m;
        }
        let m = Arc::new(merged.clone());
        self.permissions.insert(merged, m.clone());
        m
    }

    /// One shared copy per distinct login shape (role, account, signing key, merged rights).
    pub fn intern_shape(&self, shape: Shape) -> Arc<Shape> {
        let shape = Arc::new(shape);
        if !self.logins_on.load(Ordering::Relaxed) {
            return shape;
        }
        if let Some(shared) = self.shapes.get(&shape) {
            return shared;
        }
        self.shapes.insert(shape.clone(), shape.clone());
        shape
    }

    /// Entry counts per cache (after moka's pending maintenance), for reports and benchmarks.
    pub fn entry_counts(&self) -> Vec<(&'static str, u64)> {
        self.by_username.run_pending_tasks();
        self.by_token.run_pending_tasks();
        self.unknown_users.run_pending_tasks();
        self.credentials.run_pending_tasks();
        self.issuers.run_pending_tasks();
        self.permissions.run_pending_tasks();
        self.shapes.run_pending_tasks();
        self.stamps.run_pending_tasks();
        vec![
            ("logins_by_username", self.by_username.entry_count()),
            ("logins_by_token", self.by_token.entry_count()),
            ("unknown_users", self.unknown_users.entry_count()),
            ("credentials", self.credentials.entry_count()),
            ("signing_keys", self.issuers.entry_count()),
            ("permission_sets", self.permissions.entry_count()),
            ("login_shapes", self.shapes.entry_count()),
            ("stamps", self.stamps.entry_count()),
        ]
    }

    // ---- invalidation ----------------------------------------------------------------------

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn invalidate(&self, scope: Scope) {
        let g = self.next_generation();
        self.stamps.insert(scope, g);
        if matches!(scope, Scope::User(_)) {
            self.users_changed_at.fetch_max(g, Ordering::SeqCst);
        }
    }

    /// Drops every cached login and unknown username (credentials stay: they are checked
    /// against the current hash anyway).
    pub fn flush(&self) {
        let g = self.next_generation();
        self.flushed_at.fetch_max(g, Ordering::SeqCst);
        self.by_username.invalidate_all();
        self.by_token.invalidate_all();
        self.unknown_users.invalidate_all();
        bump(&self.stats.flushes);
    }

    /// Applies one notification.
    pub fn on_notification(&self, channel: &str, payload: &str) {
        bump(&self.stats.notifications);
        let id = |s: &str| s.trim().parse::<i64>().ok();
        let scope = if channel == SYNC_CHANNEL {
            id(payload).map(Scope::Account)
        } else {
            match payload.split_once(':') {
                Some(("user", v)) => id(v).map(Scope::User),
                Some(("token", v)) => id(v).map(Scope::Tokens),
                Some(("role", v)) => id(v).map(Scope::Role),
                Some(("account", v)) => id(v).map(Scope::Account),
                _ => None,
            }
        };
        match scope {
            Some(scope) => self.invalidate(scope),
            None => {
                tracing::debug!(
                    channel,
                    payload,
                    "unknown change notification; flushing the login caches"
                );
                self.flush();
            }
        }
    }

    fn set_live(&self, live: bool) {
        if live {
            // Order matters: LISTEN is established, then flush, then serve. A read that starts
            // after the flush sees every change that was not notified to us.
            self.flush();
            self.live.store(true, Ordering::SeqCst);
            bump(&self.stats.listener_connects);
        } else {
            self.live.store(false, Ordering::SeqCst);
            self.flush();
        }
    }

    /// Receives change notifications until `shutdown`, on a connection of its own (not one of
    /// the callout's pool). Reconnects with a backoff; the caches are bypassed while it is down.
    pub async fn listen(self: Arc<Self>, pool: &PgPool, shutdown: CancellationToken) {
        let options = (*pool.connect_options())
            .clone()
            .application_name(LISTENER_APPLICATION_NAME);
        let own = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.listen_once(&own, &shutdown).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cache listener down; logins read Postgres directly until it is back");
                }
            }
            self.set_live(false);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.set_live(false);
        own.close().await;
    }

    /// One listener connection's life. Ok when it ended by shutdown or was lost cleanly.
    async fn listen_once(
        &self,
        pool: &PgPool,
        shutdown: &CancellationToken,
    ) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.eager_reconnect(false);
        listener.listen_all([CHANGE_CHANNEL, SYNC_CHANNEL]).await?;
        self.set_live(true);
        tracing::debug!("cache listener connected; login caches live");
        let mut health = tokio::time::interval(self.settings.health_check_interval);
        health.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                n = listener.try_recv() => match n? {
                    Some(note) => self.on_notification(note.channel(), note.payload()),
                    None => {
                        tracing::warn!("cache listener lost its connection; flushing the login caches");
                        return Ok(());
                    }
                },
                _ = health.tick() => {
                    let check = sqlx::query("SELECT 1").execute(&mut listener);
                    match tokio::time::timeout(Duration::from_secs(5), check).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(sqlx::Error::PoolTimedOut),
                    }
                }
            }
        }
    }
}

/// SHA-256 of a stored hash, truncated to 128 bits (only ever compared with the current hash's).
fn hash_of(password_hash: &str) -> [u8; 16] {
    let full = Sha256::digest(password_hash.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}
