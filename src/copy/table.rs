//! The login copy and the caches of the login hot path, and how they are kept correct.
//!
//! Every replica holds a **complete copy** of what a login needs: every user (with its role,
//! account and the account's signing key, prepared as a [`Login`]) and every token. It is
//! loaded when the change listener connects, kept current by change notifications, and
//! reloaded whenever the listener comes back (notifications sent meanwhile are lost). While
//! the listener is live the copy answers logins without Postgres — including "no such user"
//! and "no such token". While Postgres is unreachable it answers them for up to
//! `--db-outage-grace` (see `copy::feed`): the data plane keeps running while the control
//! plane is down.
//!
//! | part | key | value | bound |
//! |---|---|---|---|
//! | users | username (+ id index) | prepared [`Login`] and the generation it was read at | every user |
//! | tokens | SHA-256 of the token | owner, expiry, revocation | every token |
//! | verified credentials | HMAC(process key, username, password), 128 bits | SHA-256 (128 bits) of the hash it verified against | 10 min TTL, 250k |
//! | signing keys | signing public key | parsed `KeyPair` (no AES-GCM + seed parse per login) | 100k |
//! | merged permission sets | the set itself | shared `Arc` (users of one role share one copy) | 10k |
//!
//! ## Freshness
//!
//! Triggers write the scope of every change (`user:<id>`, `role:<id>`, `account:<id>`,
//! `token:<user_id>`, `certificate:<user_id>`) to the log `nats.changes` and send a `NOTIFY`
//! that only wakes the copy's maintainer (anyone may send one: a payload is never trusted; see
//! [`crate::db::changes`]). Each scope read from the log bumps a process-wide generation and
//! *stamps* that scope with it, at once; the maintainer then re-reads the users of the scope
//! and stores them with the generation taken **before** that read. An entry is served only
//! while no stamp of its user, role or account (or a flush) is newer than the entry, so a
//! change is visible to the next login as soon as its log row is read (one indexed query after
//! the wake-up) — until the re-read lands, logins of that scope read Postgres. A read that raced with the change can
//! never be served past it. A name the copy does not hold is asked of Postgres (its INSERT's
//! notification may still be on the way); Postgres' "no such user" is remembered for 2 s
//! unless a user changes meanwhile. Such reads (usernames and tokens) are bounded by
//! `--unknown-reads-per-second`: beyond it the live copy's "no such user/token" stands, so a
//! flood of made-up credentials costs no query each.
//!
//! A login whose account has a signing key the server does not have yet (a new account, or a
//! rotation waiting for its push) is not served from the copy while Postgres is up: the sync
//! records the push (`synced_at`) without a notification. The maintainer re-reads such
//! accounts every few seconds so the copy is right for an outage.
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
//! - It is only trusted while the user's *current* `password_hash` (from the copy or Postgres)
//!   is the one it verified against: a password change, even to the same password (new salt),
//!   makes every old entry useless at once.
//! - The price: someone who can read this process's memory can test guesses for a cached
//!   user at HMAC speed rather than bcrypt speed (the copy already holds every password hash
//!   in memory). `--credential-cache false` turns it off.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use moka::sync::Cache;
use sha2::{Digest, Sha256};

use crate::callout::certificate::{self, CertKey, Mapping, Presented};
use crate::callout::login::{Issuer, Login, Shape, Signing};
use crate::callout::permissions::Merged;
use crate::db::logins::{CertPart, TokenPart, TokenRow};
use crate::keys::{KeyError, SeedCipher};

/// Channel of change wake-ups (users, roles, accounts, tokens): what changed is read from the
/// log `nats.changes`, never from the payload.
pub const CHANGE_CHANNEL: &str = "nats_pg_auth_change";
/// Channel of account sync work; a wake-up of the copy too (the account scopes are logged).
pub const SYNC_CHANNEL: &str = "nats_pg_auth_sync";
/// `application_name` of the listener connection (visible in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "nats-pg-auth cache listener";

/// Sizes, lifetimes and switches.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Answer logins from the copy while Postgres is up. Off: every login reads Postgres (the
    /// copy is still kept, for outages).
    pub logins: bool,
    /// Cache verified credentials (see the module docs for the trade-off).
    pub credentials: bool,
    pub credential_ttl: Duration,
    pub max_credentials: u64,
    pub max_signers: u64,
    /// How often the listener connection is checked with a query.
    pub health_check_interval: Duration,
    /// How long after Postgres became unreachable the copy still answers logins (0: never).
    pub outage_grace: Duration,
    /// Longest lifetime of a user JWT minted from the copy during an outage.
    pub outage_ttl: Duration,
    /// Postgres reads per second for usernames and tokens the live copy does not hold (see
    /// [`ReadBudget`]).
    pub unknown_reads_per_second: u32,
    /// A listener reconnecting within this long of the last good read of the change log
    /// resumes it instead of reloading (`copy::feed`'s `LOG_GAP_RELOAD` by default).
    pub resume_window: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            logins: true,
            credentials: true,
            credential_ttl: Duration::from_secs(600),
            max_credentials: 250_000,
            max_signers: 100_000,
            health_check_interval: Duration::from_secs(5),
            resume_window: crate::copy::feed::LOG_GAP_RELOAD,
            outage_grace: Duration::from_secs(3600),
            outage_ttl: Duration::from_secs(300),
            unknown_reads_per_second: 50,
        }
    }
}

/// What a stamp applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    User(i64),
    /// Credentials attached to a user: its tokens and certificate mappings (a change of those
    /// does not touch the username entry). Notified as `token:<user id>` or
    /// `certificate:<user id>`.
    Tokens(i64),
    Role(i64),
    Account(i64),
}

/// The generation read before a database read; pass it back when storing the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

impl Ticket {
    pub fn value(self) -> u64 {
        self.0
    }
}

/// Result of a username lookup.
pub enum UserLookup {
    Hit(Arc<Login>),
    /// Postgres said so less than 2 s ago, and no user changed since.
    Unknown,
    /// Ask Postgres.
    Miss,
}

/// Result of a token lookup.
pub enum TokenLookup {
    Hit(Arc<Login>, TokenRow),
    /// Postgres said so less than 2 s ago, and no token changed since.
    Unknown,
    Miss,
}

/// Result of an nkey or certificate lookup in the copy while it is current.
pub enum CredentialLookup<T> {
    Hit(T),
    /// Ask Postgres (not in the copy, or changed and not re-read yet).
    Miss,
    /// Not in the live copy, and no read of such credentials left this second
    /// (`--unknown-reads-per-second`): no such credential.
    Unknown,
}

/// Result of a lookup in the copy during an outage.
pub enum CopyLookup<T> {
    Found(T),
    Unknown,
    /// A change of this user (or its tokens) was notified and could not be read before
    /// Postgres went away.
    Stale,
    /// No copy has been loaded yet.
    NotLoaded,
}

/// The copy's answer to "whose connections does this kick close" (see
/// [`LoginCache::kick_view`]).
#[derive(Debug, Default)]
pub struct KickView {
    /// Every user selected.
    pub users: Vec<KickUser>,
    /// Account id -> identity public key, for the accounts the copy can sign for.
    pub account_keys: HashMap<i64, String>,
    /// The copy is known to be complete and current for this question.
    pub complete: bool,
}

/// A user a kick concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KickUser {
    pub user_id: i64,
    pub role_id: Option<i64>,
    pub account_id: i64,
    pub username: Arc<str>,
}

/// Counters, for tests, benchmarks and logs.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub login_hits: AtomicU64,
    pub login_misses: AtomicU64,
    pub token_hits: AtomicU64,
    pub token_misses: AtomicU64,
    pub unknown_user_hits: AtomicU64,
    pub unknown_token_hits: AtomicU64,
    pub credential_hits: AtomicU64,
    pub credential_misses: AtomicU64,
    pub notifications: AtomicU64,
    pub flushes: AtomicU64,
    /// Unix seconds when this replica's snapshot was last written or confirmed current (0:
    /// never; see `copy::snapshot`).
    pub snapshot_current_at: AtomicU64,
    /// Times the listener (re)connected and the copy went live.
    pub listener_connects: AtomicU64,
    /// Full loads of the copy.
    pub reloads: AtomicU64,
    /// Logins answered from the copy because Postgres could not be asked.
    pub logins_from_copy: AtomicU64,
    /// Usernames and tokens the live copy does not hold, asked of Postgres (within
    /// `--unknown-reads-per-second`) ...
    pub absent_reads: AtomicU64,
    /// ... and answered "unknown" by the copy without a query (beyond it).
    pub absent_unread: AtomicU64,
}

/// A token bucket bounding the Postgres reads of credentials the live copy does not hold: a
/// flood of made-up tokens or usernames (each distinct, so the 2 s "no such token" memory never
/// hits) would otherwise cost one query each. Holds up to one second of reads.
struct ReadBudget {
    per_second: f64,
    state: Mutex<(f64, Instant)>,
}

impl ReadBudget {
    fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        Self {
            per_second,
            state: Mutex::new((per_second, Instant::now())),
        }
    }

    /// Takes one read if the budget has one.
    fn take(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.per_second;
        s.0 = (s.0 + refill).min(self.per_second);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

impl CacheStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A user in the copy and the generation it was read at.
struct Entry {
    login: Arc<Login>,
    generation: u64,
}

struct CopiedCert {
    mapping: Mapping,
    generation: u64,
}

struct CopiedToken {
    user_id: i64,
    token_id: i64,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    revoked_at: Option<chrono::DateTime<chrono::Utc>>,
    generation: u64,
}

/// The copy proper. One lock: a login reads its entry and the stamps that judge it together.
#[derive(Default)]
pub struct Table {
    /// Keyed by the login's own `username` (one shared allocation).
    by_name: HashMap<Arc<str>, Entry>,
    by_id: HashMap<i64, Arc<str>>,
    tokens: HashMap<[u8; 32], CopiedToken>,
    tokens_of: HashMap<i64, Vec<[u8; 32]>>,
    /// Public nkey -> user id (the login's own `nkey` is checked on every hit).
    by_nkey: HashMap<Box<str>, i64>,
    /// Certificate mappings per user, and the users with a mapping filed under each key.
    certs_of: HashMap<i64, Vec<CopiedCert>>,
    cert_index: HashMap<CertKey, Vec<i64>>,
    /// Users per account whose login cannot be served live (signing key not on the server).
    unsettled: HashMap<i64, u32>,
    stamps: HashMap<Scope, u64>,
    flushed_at: u64,
    /// Ticket of the last full load (0: none yet).
    loaded_at: u64,
}

impl Table {
    fn stamp(&self, scope: Scope) -> u64 {
        self.stamps.get(&scope).copied().unwrap_or(0)
    }

    /// A login read at `generation` is still what the database says.
    fn fresh(&self, login: &Login, generation: u64, token: bool) -> bool {
        generation >= self.flushed_at
            && generation >= self.stamp(Scope::User(login.user_id))
            && generation >= self.stamp(Scope::Account(login.shape.account_id))
            && login
                .shape
                .role_id
                .is_none_or(|r| generation >= self.stamp(Scope::Role(r)))
            && (!token || generation >= self.stamp(Scope::Tokens(login.user_id)))
    }

    /// Outage rule: with Postgres gone, a change notified but not yet re-read cannot be read
    /// any more. For the user itself (or its tokens) that means refusing it; a role- or
    /// account-wide change (often a limit that changes no login) must not lock out every user
    /// of the account for the whole outage, so those serve the copy as it was.
    fn fresh_for_outage(&self, login: &Login, generation: u64, token: bool) -> bool {
        generation >= self.stamp(Scope::User(login.user_id))
            && (!token || generation >= self.stamp(Scope::Tokens(login.user_id)))
    }

    fn settle(&mut self, login: &Login, delta: i32) {
        if login.cacheable() {
            return;
        }
        let n = self.unsettled.entry(login.shape.account_id).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.unsettled.remove(&login.shape.account_id);
        }
    }

    /// Stores a user read at `generation`, unless the copy already holds a newer read.
    pub fn upsert(&mut self, login: Arc<Login>, generation: u64) {
        if let Some(old_name) = self.by_id.get(&login.user_id).cloned() {
            if self
                .by_name
                .get(&old_name)
                .is_some_and(|e| e.generation > generation)
            {
                return;
            }
            if let Some(old) = self.by_name.remove(&old_name) {
                self.settle(&old.login, -1);
                self.unindex_nkey(&old.login);
            }
        }
        // A username now held by another id: that user was renamed or deleted meanwhile.
        if let Some(prev) = self.by_name.get(&*login.username) {
            if prev.login.user_id != login.user_id {
                if prev.generation > generation {
                    return;
                }
                let prev_id = prev.login.user_id;
                self.remove_user(prev_id);
            }
        }
        self.settle(&login, 1);
        if let Some(nkey) = &login.nkey {
            // Held by another user's older read: that user changed its key meanwhile.
            self.by_nkey.insert(nkey.clone(), login.user_id);
        }
        self.by_id.insert(login.user_id, login.username.clone());
        self.by_name
            .insert(login.username.clone(), Entry { login, generation });
    }

    pub fn remove_user(&mut self, user_id: i64) {
        if let Some(name) = self.by_id.remove(&user_id) {
            if let Some(old) = self.by_name.remove(&name) {
                self.settle(&old.login, -1);
                self.unindex_nkey(&old.login);
            }
        }
        self.set_certificates(user_id, Vec::new(), 0);
        if let Some(digests) = self.tokens_of.remove(&user_id) {
            for d in digests {
                self.tokens.remove(&d);
            }
        }
    }

    /// Replaces a user's tokens with the ones read at `generation`.
    pub fn set_tokens(&mut self, user_id: i64, tokens: Vec<TokenPart>, generation: u64) {
        if let Some(digests) = self.tokens_of.remove(&user_id) {
            for d in digests {
                self.tokens.remove(&d);
            }
        }
        let mut digests = Vec::with_capacity(tokens.len());
        for t in tokens {
            let Ok(digest) = <[u8; 32]>::try_from(t.token_sha256.as_slice()) else {
                continue; // the schema refuses other lengths
            };
            // A digest held by another user's row (moved between users): the newer read wins.
            if let Some(prev) = self.tokens.get(&digest) {
                if prev.user_id != user_id {
                    if let Some(v) = self.tokens_of.get_mut(&prev.user_id) {
                        v.retain(|d| d != &digest);
                    }
                }
            }
            self.tokens.insert(
                digest,
                CopiedToken {
                    user_id,
                    token_id: t.token_id,
                    expires_at: t.token_expires_at,
                    revoked_at: t.token_revoked_at,
                    generation,
                },
            );
            digests.push(digest);
        }
        if !digests.is_empty() {
            digests.shrink_to_fit();
            self.tokens_of.insert(user_id, digests);
        }
    }

    fn unindex_nkey(&mut self, login: &Login) {
        if let Some(nkey) = &login.nkey {
            if self.by_nkey.get(nkey) == Some(&login.user_id) {
                self.by_nkey.remove(nkey);
            }
        }
    }

    /// Replaces a user's certificate mappings with the ones read at `generation`.
    pub fn set_certificates(&mut self, user_id: i64, parts: Vec<CertPart>, generation: u64) {
        if let Some(old) = self.certs_of.remove(&user_id) {
            for key in old.iter().filter_map(|c| c.mapping.key()) {
                if let Some(users) = self.cert_index.get_mut(&key) {
                    users.retain(|u| *u != user_id);
                    if users.is_empty() {
                        self.cert_index.remove(&key);
                    }
                }
            }
        }
        let mut certs: Vec<CopiedCert> = parts
            .iter()
            .filter(|p| p.user_id == user_id)
            .filter_map(Mapping::from_part)
            .map(|mapping| CopiedCert {
                mapping,
                generation,
            })
            .collect();
        if certs.is_empty() {
            return;
        }
        for key in certs.iter().filter_map(|c| c.mapping.key()) {
            let users = self.cert_index.entry(key).or_default();
            if !users.contains(&user_id) {
                users.push(user_id);
            }
        }
        certs.shrink_to_fit();
        self.certs_of.insert(user_id, certs);
    }

    /// The login holding `nkey`, and the generation to judge it by.
    fn nkey_entry(&self, nkey: &str) -> Option<&Entry> {
        let id = self.by_nkey.get(nkey)?;
        self.login_of(*id)
            .filter(|e| e.login.nkey.as_deref() == Some(nkey))
    }

    /// Every mapping that could match the certificate, with its user's entry and the older of
    /// the two generations.
    fn cert_candidates(&self, p: &Presented) -> Vec<(&Entry, Mapping, u64)> {
        let mut users: Vec<i64> = p
            .keys()
            .iter()
            .filter_map(|k| self.cert_index.get(k))
            .flatten()
            .copied()
            .collect();
        users.sort_unstable();
        users.dedup();
        let mut out = Vec::new();
        for u in users {
            let Some(e) = self.login_of(u) else { continue };
            for c in self.certs_of.get(&u).into_iter().flatten() {
                if c.mapping.matches(p) {
                    out.push((e, c.mapping.clone(), c.generation.min(e.generation)));
                }
            }
        }
        out
    }

    pub fn users(&self) -> usize {
        self.by_name.len()
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The user ids of the copy in any of these roles or accounts.
    fn ids_in(&self, roles: &HashSet<i64>, accounts: &HashSet<i64>) -> Vec<i64> {
        if roles.is_empty() && accounts.is_empty() {
            return Vec::new();
        }
        self.by_name
            .values()
            .filter(|e| {
                accounts.contains(&e.login.shape.account_id)
                    || e.login.shape.role_id.is_some_and(|r| roles.contains(&r))
            })
            .map(|e| e.login.user_id)
            .collect()
    }

    fn login_of(&self, user_id: i64) -> Option<&Entry> {
        self.by_id.get(&user_id).and_then(|n| self.by_name.get(n))
    }

    fn token_row(digest: &[u8; 32], t: &CopiedToken) -> TokenRow {
        TokenRow {
            token_id: t.token_id,
            token_sha256: digest.to_vec(),
            token_expires_at: t.expires_at,
            token_revoked_at: t.revoked_at,
        }
    }
}

/// One user of [`LoginCache::export`]: its login and whether a change of it (or of its tokens
/// and certificate mappings) was notified and not re-read when the export was taken.
pub struct ExportedUser {
    pub login: Arc<Login>,
    pub user_stale: bool,
    pub credentials_stale: bool,
}

/// The copy's content, for the snapshot (see `copy::snapshot`).
pub struct CopyExport {
    /// [`LoginCache::changes`] when it was taken.
    pub changes: u64,
    pub users: Vec<ExportedUser>,
    pub tokens: Vec<TokenPart>,
    pub certs: Vec<CertPart>,
}

/// Why the copy is answering instead of Postgres (one per outage).
struct Outage {
    since: Instant,
    logins: u64,
}

pub struct LoginCache {
    settings: CacheSettings,
    logins_on: AtomicBool,
    credentials_on: AtomicBool,
    /// The listener is connected and the copy was reloaded since: it is current.
    live: AtomicBool,
    /// A copy has been loaded (at least once).
    loaded: AtomicBool,
    loaded_notify: tokio::sync::Notify,
    generation: AtomicU64,
    table: RwLock<Table>,
    /// Generation of the newest user notification (a user may have been inserted).
    users_changed_at: AtomicU64,
    /// Usernames Postgres said do not exist, with the generation of that answer (2 s).
    unknown_users: Cache<Box<str>, u64>,
    /// Generation of the newest token notification (a token may have been inserted).
    tokens_changed_at: AtomicU64,
    /// Token digests Postgres said do not exist (2 s): a client retrying a wrong token costs
    /// no query.
    unknown_tokens: Cache<[u8; 32], u64>,
    /// Reads of usernames and tokens the live copy does not hold.
    absent_reads: ReadBudget,
    /// When the copy stopped being kept current (listener lost); None while it is.
    stale_since: Mutex<Option<Instant>>,
    outage: Mutex<Option<Outage>>,
    /// When the snapshot this copy was restored from was taken (see `copy::snapshot`); None
    /// once a load from Postgres replaced it.
    snapshot_taken: Mutex<Option<std::time::SystemTime>>,
    /// Bumped by every change of the table (under its write lock): the snapshot writer
    /// rewrites only when it moved.
    changes: AtomicU64,
    /// `outage.is_some()`, readable without the lock on every login.
    in_outage: AtomicBool,
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
        Self {
            logins_on: AtomicBool::new(settings.logins),
            credentials_on: AtomicBool::new(settings.credentials),
            live: AtomicBool::new(false),
            loaded: AtomicBool::new(false),
            loaded_notify: tokio::sync::Notify::new(),
            generation: AtomicU64::new(1),
            table: RwLock::new(Table::default()),
            users_changed_at: AtomicU64::new(0),
            tokens_changed_at: AtomicU64::new(0),
            unknown_tokens: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(2))
                .build(),
            unknown_users: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(2))
                .build(),
            absent_reads: ReadBudget::new(settings.unknown_reads_per_second),
            stale_since: Mutex::new(None),
            outage: Mutex::new(None),
            snapshot_taken: Mutex::new(None),
            changes: AtomicU64::new(0),
            in_outage: AtomicBool::new(false),
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
                .max_capacity(250_000)
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        let t = self.table.write().unwrap_or_else(|p| p.into_inner());
        // Counted once the lock is held: a reader that sees the new count sees the change.
        self.changes.fetch_add(1, Ordering::Relaxed);
        t
    }

    /// Answer logins from the copy while Postgres is up (off: always read Postgres).
    pub fn set_logins_enabled(&self, on: bool) {
        self.logins_on.store(on, Ordering::SeqCst);
    }

    /// Turns the verified-credential cache on or off at run time (off also empties it).
    pub fn set_credentials_enabled(&self, on: bool) {
        self.credentials_on.store(on, Ordering::SeqCst);
        if !on {
            self.credentials.invalidate_all();
        }
    }

    /// True while the copy is current (listener connected, copy reloaded since).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// True once a copy has been loaded: only then can logins be answered.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// Waits until a copy is loaded; false when `stop` came first.
    pub async fn wait_loaded(&self, stop: &tokio_util::sync::CancellationToken) -> bool {
        loop {
            let loaded = self.loaded_notify.notified();
            if self.is_loaded() {
                return true;
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = loaded => {}
            }
        }
    }

    fn rows_usable(&self) -> bool {
        self.logins_on.load(Ordering::Relaxed) && self.live.load(Ordering::SeqCst)
    }

    /// A ticket for a full load: a generation of its own, so every entry read before it is
    /// older (after a reconnect no notification may have moved the generation, and the load
    /// must still be able to tell which entries it did not see).
    pub fn load_ticket(&self) -> Ticket {
        Ticket(self.next_generation())
    }

    /// Take this before reading from the database; hand it back with the result.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.generation.load(Ordering::SeqCst))
    }

    // ---- the live path ---------------------------------------------------------------------

    pub fn user(&self, username: &str) -> UserLookup {
        if !self.rows_usable() {
            return UserLookup::Miss;
        }
        let t = self.read();
        match t.by_name.get(username) {
            Some(e) if t.fresh(&e.login, e.generation, false) && e.login.cacheable() => {
                bump(&self.stats.login_hits);
                return UserLookup::Hit(e.login.clone());
            }
            // Not in the copy: Postgres decides (the user may have been inserted a moment ago,
            // its notification still on the way), unless it said "no such user" in the last
            // 2 s and no user changed since.
            Some(_) => {}
            None => {
                if let Some(g) = self.unknown_users.get(username) {
                    if g >= t.flushed_at && g >= self.users_changed_at.load(Ordering::SeqCst) {
                        bump(&self.stats.unknown_user_hits);
                        return UserLookup::Unknown;
                    }
                    self.unknown_users.invalidate(username);
                }
                if !self.absent_read_allowed() {
                    return UserLookup::Unknown;
                }
            }
        }
        bump(&self.stats.login_misses);
        UserLookup::Miss
    }

    /// Stores a login read from Postgres (when nothing newer is known about it).
    pub fn put_user(&self, username: &str, ticket: Ticket, login: &Arc<Login>) {
        if &*login.username != username {
            return;
        }
        let mut t = self.write();
        if t.fresh(login, ticket.0, false) {
            t.upsert(login.clone(), ticket.0);
        }
    }

    /// Postgres said this username does not exist (as of `ticket`).
    pub fn put_unknown_user(&self, username: &str, ticket: Ticket) {
        let mut t = self.write();
        let stale = t
            .by_name
            .get(username)
            .filter(|e| e.generation < ticket.0)
            .map(|e| e.login.user_id);
        if let Some(id) = stale {
            t.remove_user(id);
        }
        if ticket.0 >= t.flushed_at && ticket.0 >= self.users_changed_at.load(Ordering::SeqCst) {
            self.unknown_users.insert(username.into(), ticket.0);
        }
    }

    pub fn token(&self, digest: &[u8; 32]) -> TokenLookup {
        if !self.rows_usable() {
            return TokenLookup::Miss;
        }
        let t = self.read();
        // A token not in the copy may have been inserted a moment ago: Postgres decides,
        // unless it said "no such token" in the last 2 s and no token changed since.
        match t.tokens.get(digest) {
            Some(tok) => {
                if let Some(e) = t.login_of(tok.user_id) {
                    let g = tok.generation.min(e.generation);
                    if t.fresh(&e.login, g, true) && e.login.cacheable() {
                        bump(&self.stats.token_hits);
                        return TokenLookup::Hit(e.login.clone(), Table::token_row(digest, tok));
                    }
                }
            }
            None => {
                if let Some(g) = self.unknown_tokens.get(digest) {
                    if g >= t.flushed_at && g >= self.tokens_changed_at.load(Ordering::SeqCst) {
                        bump(&self.stats.unknown_token_hits);
                        return TokenLookup::Unknown;
                    }
                    self.unknown_tokens.invalidate(digest);
                }
                if !self.absent_read_allowed() {
                    return TokenLookup::Unknown;
                }
            }
        }
        bump(&self.stats.token_misses);
        TokenLookup::Miss
    }

    /// Whether a username, token or nkey the live copy does not hold may be asked of Postgres (within
    /// `--unknown-reads-per-second`); beyond it the copy's "unknown" stands.
    fn absent_read_allowed(&self) -> bool {
        if self.absent_reads.take() {
            bump(&self.stats.absent_reads);
            true
        } else {
            bump(&self.stats.absent_unread);
            false
        }
    }

    /// Postgres said this token does not exist (as of `ticket`).
    pub fn put_unknown_token(&self, digest: [u8; 32], ticket: Ticket) {
        let flushed_at = self.read().flushed_at;
        if ticket.0 >= flushed_at && ticket.0 >= self.tokens_changed_at.load(Ordering::SeqCst) {
            self.unknown_tokens.insert(digest, ticket.0);
        }
    }

    /// The login of a user nkey, from the copy while it is current.
    pub fn nkey(&self, nkey: &str) -> CredentialLookup<Arc<Login>> {
        if !self.rows_usable() {
            return CredentialLookup::Miss;
        }
        let t = self.read();
        match t.nkey_entry(nkey) {
            Some(e) if t.fresh(&e.login, e.generation, false) && e.login.cacheable() => {
                bump(&self.stats.login_hits);
                CredentialLookup::Hit(e.login.clone())
            }
            // Any key pair signs its own nonce: made-up nkeys cost no query each.
            None if !self.absent_read_allowed() => CredentialLookup::Unknown,
            _ => {
                bump(&self.stats.login_misses);
                CredentialLookup::Miss
            }
        }
    }

    /// The login a certificate maps to, from the copy while it is current. `Hit(Err(users))`:
    /// equally specific mappings of several users match.
    #[allow(clippy::type_complexity)]
    pub fn certificate(
        &self,
        p: &Presented,
    ) -> CredentialLookup<Result<(Arc<Login>, Mapping), Vec<i64>>> {
        if !self.rows_usable() {
            return CredentialLookup::Miss;
        }
        let t = self.read();
        let candidates = t.cert_candidates(p);
        if candidates.is_empty()
            || candidates
                .iter()
                .any(|(e, _, g)| !t.fresh(&e.login, *g, true) || !e.login.cacheable())
        {
            bump(&self.stats.login_misses);
            return CredentialLookup::Miss;
        }
        bump(&self.stats.login_hits);
        let candidates = candidates
            .into_iter()
            .map(|(e, m, _)| (e.login.clone(), m))
            .collect();
        CredentialLookup::Hit(
            match certificate::choose(candidates, p, |l: &Arc<Login>| l.user_id) {
                certificate::Choice::One(l, m) => Ok((l, m)),
                certificate::Choice::Ambiguous(users) => Err(users),
                certificate::Choice::Nothing => unreachable!("candidates matched"),
            },
        )
    }

    /// Stores a token login read from Postgres.
    pub fn put_token(
        &self,
        digest: [u8; 32],
        ticket: Ticket,
        login: &Arc<Login>,
        token: &TokenRow,
    ) {
        let mut t = self.write();
        if !t.fresh(login, ticket.0, true) {
            return;
        }
        t.upsert(login.clone(), ticket.0);
        if t.tokens
            .get(&digest)
            .is_some_and(|e| e.generation > ticket.0)
        {
            return;
        }
        t.tokens.insert(
            digest,
            CopiedToken {
                user_id: login.user_id,
                token_id: token.token_id,
                expires_at: token.token_expires_at,
                revoked_at: token.token_revoked_at,
                generation: ticket.0,
            },
        );
        let of = t.tokens_of.entry(login.user_id).or_default();
        if !of.contains(&digest) {
            of.push(digest);
        }
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

    // ---- the outage path -------------------------------------------------------------------

    /// The copy's answer for a username when Postgres cannot be asked.
    pub fn copy_user(&self, username: &str) -> CopyLookup<Arc<Login>> {
        if !self.is_loaded() {
            return CopyLookup::NotLoaded;
        }
        let t = self.read();
        match t.by_name.get(username) {
            Some(e) if t.fresh_for_outage(&e.login, e.generation, false) => {
                CopyLookup::Found(e.login.clone())
            }
            Some(_) => CopyLookup::Stale,
            None => CopyLookup::Unknown,
        }
    }

    /// The copy's answer for a token when Postgres cannot be asked.
    pub fn copy_token(&self, digest: &[u8; 32]) -> CopyLookup<(Arc<Login>, TokenRow)> {
        if !self.is_loaded() {
            return CopyLookup::NotLoaded;
        }
        let t = self.read();
        let Some(tok) = t.tokens.get(digest) else {
            return CopyLookup::Unknown;
        };
        match t.login_of(tok.user_id) {
            Some(e) if t.fresh_for_outage(&e.login, tok.generation.min(e.generation), true) => {
                CopyLookup::Found((e.login.clone(), Table::token_row(digest, tok)))
            }
            Some(_) => CopyLookup::Stale,
            None => CopyLookup::Unknown,
        }
    }

    /// The copy's answer for a user nkey when Postgres cannot be asked.
    pub fn copy_nkey(&self, nkey: &str) -> CopyLookup<Arc<Login>> {
        if !self.is_loaded() {
            return CopyLookup::NotLoaded;
        }
        let t = self.read();
        match t.nkey_entry(nkey) {
            Some(e) if t.fresh_for_outage(&e.login, e.generation, false) => {
                CopyLookup::Found(e.login.clone())
            }
            Some(_) => CopyLookup::Stale,
            None => CopyLookup::Unknown,
        }
    }

    /// The copy's answer for a certificate when Postgres cannot be asked: the matching
    /// mappings with their logins (the caller chooses among them).
    pub fn copy_certificate(&self, p: &Presented) -> CopyLookup<Vec<(Arc<Login>, Mapping)>> {
        if !self.is_loaded() {
            return CopyLookup::NotLoaded;
        }
        let t = self.read();
        let candidates = t.cert_candidates(p);
        if candidates.is_empty() {
            return CopyLookup::Unknown;
        }
        if candidates
            .iter()
            .any(|(e, _, g)| !t.fresh_for_outage(&e.login, *g, true))
        {
            return CopyLookup::Stale;
        }
        CopyLookup::Found(
            candidates
                .into_iter()
                .map(|(e, m, _)| (e.login.clone(), m))
                .collect(),
        )
    }

    /// How long ago the copy stopped being kept current (None: it is current).
    pub fn stale_for(&self) -> Option<Duration> {
        self.stale_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }

    /// The copy may answer logins now: loaded, and not stale for longer than the grace.
    pub fn within_grace(&self) -> bool {
        let grace = self.settings.outage_grace;
        self.is_loaded() && !grace.is_zero() && self.stale_for().is_none_or(|s| s <= grace)
    }

    /// Records a login answered from the copy; the first one of an outage logs and sets the
    /// gauge.
    pub fn served_from_copy(&self, why: &str) {
        bump(&self.stats.logins_from_copy);
        let mut o = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        match o.as_mut() {
            Some(o) => o.logins += 1,
            None => {
                let t = self.read();
                tracing::warn!(
                    users = t.users(),
                    tokens = t.token_count(),
                    grace = %humantime::format_duration(self.settings.outage_grace),
                    jwt_ttl = %humantime::format_duration(self.settings.outage_ttl),
                    "Postgres unreachable ({why}): entering outage mode, answering logins from the in-memory copy"
                );
                *o = Some(Outage {
                    since: Instant::now(),
                    logins: 1,
                });
                self.in_outage.store(true, Ordering::SeqCst);
            }
        }
    }

    /// True while logins are being answered from the copy because Postgres is unreachable.
    pub fn in_outage(&self) -> bool {
        self.in_outage.load(Ordering::SeqCst)
    }

    /// Postgres answered a login read. Ends an outage in which the copy never stopped being
    /// current (the listener stayed up while the pool could not connect).
    pub fn postgres_answered(&self) {
        if self.in_outage() && self.is_live() {
            self.leave_outage("Postgres answers again");
        }
    }

    fn leave_outage(&self, why: &str) {
        if let Some(o) = self.outage.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.in_outage.store(false, Ordering::SeqCst);
            tracing::info!(
                lasted = %humantime::format_duration(Duration::from_secs(o.since.elapsed().as_secs())),
                logins_from_copy = o.logins,
                "{why}: leaving outage mode"
            );
        }
    }

    // ---- keeping the copy current ------------------------------------------------------------

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Marks every entry stale (the next login of anyone reads Postgres until the copy is
    /// reloaded).
    pub fn flush(&self) {
        let g = self.next_generation();
        self.write().flushed_at = g;
        bump(&self.stats.flushes);
    }

    /// Counts a wake-up (a notification on one of the copy's channels, whoever sent it: its
    /// payload is not read).
    pub fn woken(&self) {
        bump(&self.stats.notifications);
    }

    /// Applies one change read from the log (`nats.changes`): stamps its scope at once.
    /// Returns the scope the maintainer must re-read; None for a scope this binary does not
    /// know (a newer release's), which it ignores: the log is written by the schema's triggers
    /// only, so nothing there calls for a full reload.
    pub fn on_change(&self, scope: &str) -> Option<Scope> {
        let id = |s: &str| s.trim().parse::<i64>().ok();
        let scope = match scope.split_once(':') {
            Some(("user", v)) => id(v).map(Scope::User),
            Some(("token" | "certificate", v)) => id(v).map(Scope::Tokens),
            Some(("role", v)) => id(v).map(Scope::Role),
            Some(("account", v)) => id(v).map(Scope::Account),
            _ => {
                tracing::debug!(scope, "unknown scope in the change log; ignored");
                None
            }
        }?;
        let g = self.next_generation();
        match scope {
            Scope::User(_) => self.users_changed_at.fetch_max(g, Ordering::SeqCst),
            Scope::Tokens(_) => self.tokens_changed_at.fetch_max(g, Ordering::SeqCst),
            _ => 0,
        };
        self.write().stamps.insert(scope, g);
        Some(scope)
    }

    /// Stores users of a full load read at `ticket`, in place (called in chunks while the load
    /// streams). A reload never holds a second copy: the bench showed two tables at once, and
    /// the allocator keeping the freed one, cost ~650 bytes per user instead of ~380.
    pub fn load_users(&self, users: Vec<Arc<Login>>, ticket: Ticket) {
        let mut t = self.write();
        for login in users {
            t.upsert(login, ticket.0);
        }
    }

    /// Ends a full load read at `ticket`: users it did not see were deleted, its tokens are every
    /// token, and every stamp it covers is dropped. Entries read after `ticket` (newer) stay.
    pub fn finish_load(&self, ticket: Ticket, tokens: Vec<TokenPart>, certs: Vec<CertPart>) {
        let g = ticket.0;
        {
            let mut t = self.write();
            let gone: Vec<i64> = t
                .by_name
                .values()
                .filter(|e| e.generation < g)
                .map(|e| e.login.user_id)
                .collect();
            for id in gone {
                t.remove_user(id);
            }
            let mut by_user: HashMap<i64, Vec<TokenPart>> = HashMap::new();
            for tok in tokens {
                by_user.entry(tok.user_id).or_default().push(tok);
            }
            for (user_id, toks) in by_user {
                t.set_tokens(user_id, toks, g);
            }
            let mut certs_by_user: HashMap<i64, Vec<CertPart>> = HashMap::new();
            for c in certs {
                certs_by_user.entry(c.user_id).or_default().push(c);
            }
            // Users whose mappings the snapshot does not have (deleted before it) lose them.
            let without: Vec<i64> = t
                .certs_of
                .iter()
                .filter(|(u, c)| {
                    !certs_by_user.contains_key(u) && c.iter().all(|c| c.generation < g)
                })
                .map(|(u, _)| *u)
                .collect();
            for u in without {
                t.set_certificates(u, Vec::new(), g);
            }
            for (user_id, parts) in certs_by_user {
                t.set_certificates(user_id, parts, g);
            }
            // Tokens the snapshot does not have (deleted before it) go too.
            t.tokens.retain(|_, tok| tok.generation >= g);
            let Table {
                tokens, tokens_of, ..
            } = &mut *t;
            tokens_of.retain(|_, digests| {
                digests.retain(|d| tokens.contains_key(d));
                !digests.is_empty()
            });
            t.stamps.retain(|_, v| *v > g);
            t.loaded_at = t.loaded_at.max(g);
        }
        self.loaded.store(true, Ordering::SeqCst);
        self.loaded_notify.notify_waiters();
        bump(&self.stats.reloads);
    }

    /// Applies a partial re-read at `ticket` of the users `scopes` selected: `users` are the
    /// users found (ids selected but not found were deleted), `tokens` all their tokens.
    pub fn apply(
        &self,
        ticket: Ticket,
        scopes: &HashSet<Scope>,
        users: Vec<Arc<Login>>,
        tokens: Vec<TokenPart>,
        certs: Vec<CertPart>,
    ) {
        let g = ticket.0;
        let mut t = self.write();
        let found: HashSet<i64> = users.iter().map(|l| l.user_id).collect();
        let roles: HashSet<i64> = scopes
            .iter()
            .filter_map(|s| {
                if let Scope::Role(r) = s {
                    Some(*r)
                } else {
                    None
                }
            })
            .collect();
        let accounts: HashSet<i64> = scopes
            .iter()
            .filter_map(|s| {
                if let Scope::Account(a) = s {
                    Some(*a)
                } else {
                    None
                }
            })
            .collect();
        let mut gone: Vec<i64> = scopes
            .iter()
            .filter_map(|s| match s {
                Scope::User(u) | Scope::Tokens(u) => Some(*u),
                _ => None,
            })
            .filter(|u| !found.contains(u))
            .collect();
        gone.extend(
            t.ids_in(&roles, &accounts)
                .into_iter()
                .filter(|u| !found.contains(u)),
        );
        for id in gone {
            let newer = t.login_of(id).is_some_and(|e| e.generation > g);
            if !newer {
                t.remove_user(id);
            }
        }
        let mut tokens_of: HashMap<i64, Vec<TokenPart>> = HashMap::new();
        for tok in tokens {
            tokens_of.entry(tok.user_id).or_default().push(tok);
        }
        let mut certs_of: HashMap<i64, Vec<CertPart>> = HashMap::new();
        for c in certs {
            certs_of.entry(c.user_id).or_default().push(c);
        }
        for login in users {
            let id = login.user_id;
            t.upsert(login, g);
            t.set_tokens(id, tokens_of.remove(&id).unwrap_or_default(), g);
            t.set_certificates(id, certs_of.remove(&id).unwrap_or_default(), g);
        }
        for s in scopes {
            if t.stamps.get(s).is_some_and(|v| *v <= g) {
                t.stamps.remove(s);
            }
        }
        drop(t);
    }

    /// Accounts whose users cannot be served live yet (their signing key is not on the server):
    /// the maintainer re-reads them until they settle.
    pub fn unsettled_accounts(&self) -> Vec<i64> {
        self.read().unsettled.keys().copied().collect()
    }

    /// The listener connected and the copy was reloaded: it is current again.
    pub fn set_live(&self) {
        self.live.store(true, Ordering::SeqCst);
        *self.stale_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self
            .snapshot_taken
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        bump(&self.stats.listener_connects);
        self.leave_outage("Postgres is back and the copy reloaded");
    }

    /// The listener is gone: the copy stays (it is what Postgres held) but is no longer kept
    /// current, so live logins read Postgres and the outage grace starts counting.
    pub fn set_disconnected(&self) {
        self.live.store(false, Ordering::SeqCst);
        let mut s = self.stale_since.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = Some(Instant::now());
        }
    }

    /// Who the kicks of session control concern, from the copy: the users holding one of
    /// `roles` and the users `users` (account id, username), and the identity key of every
    /// account the copy can sign for. Session control asks this instead of `nats.users` /
    /// `nats.roles`, which a tenant admin can lock (see `sessions`). `complete` says whether the
    /// copy is known to hold the answer: loaded and live, no full reload owed, every named user
    /// present and not changed since its read, and, when roles are asked for, no user change
    /// (which may move a user into a role) waiting to be re-read. When it is false the caller
    /// asks Postgres too (bounded by `db::LOCK_TIMEOUT`) and keeps this answer if it cannot.
    pub fn kick_view(&self, roles: &HashSet<i64>, users: &HashSet<i64>) -> KickView {
        let t = self.read();
        let mut view = KickView {
            complete: self.is_loaded() && self.is_live() && t.flushed_at <= t.loaded_at,
            ..KickView::default()
        };
        if !roles.is_empty() && t.stamps.keys().any(|s| matches!(s, Scope::User(_))) {
            view.complete = false;
        }
        for e in t.by_name.values() {
            let shape = &e.login.shape;
            if let Signing::Ready(issuer) = &shape.signing {
                view.account_keys
                    .entry(shape.account_id)
                    .or_insert_with(|| issuer.account.clone());
            }
            let named = users.contains(&e.login.user_id);
            if named && e.generation < t.stamp(Scope::User(e.login.user_id)) {
                view.complete = false;
            }
            if named || shape.role_id.is_some_and(|r| roles.contains(&r)) {
                view.users.push(KickUser {
                    user_id: e.login.user_id,
                    role_id: shape.role_id,
                    account_id: shape.account_id,
                    username: e.login.username.clone(),
                });
            }
        }
        if users.iter().any(|u| !t.by_id.contains_key(u)) {
            view.complete = false;
        }
        view
    }

    // ---- the snapshot (see `copy::snapshot`) ------------------------------------------------

    /// How many times the table changed so far (see [`LoginCache::export`]).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Everything the copy holds, as the outage path would judge it now, and the change count
    /// it reflects. Taken under the read lock (pointer copies; encoding happens outside).
    pub fn export(&self) -> CopyExport {
        let t = self.read();
        let changes = self.changes();
        let mut users = Vec::with_capacity(t.by_name.len());
        for e in t.by_name.values() {
            let id = e.login.user_id;
            let mut oldest = e.generation;
            for d in t.tokens_of.get(&id).into_iter().flatten() {
                if let Some(tok) = t.tokens.get(d) {
                    oldest = oldest.min(tok.generation);
                }
            }
            for c in t.certs_of.get(&id).into_iter().flatten() {
                oldest = oldest.min(c.generation);
            }
            users.push(ExportedUser {
                login: e.login.clone(),
                user_stale: e.generation < t.stamp(Scope::User(id)),
                credentials_stale: oldest < t.stamp(Scope::Tokens(id)),
            });
        }
        let tokens = t
            .tokens
            .iter()
            .map(|(digest, tok)| TokenPart {
                user_id: tok.user_id,
                token_id: tok.token_id,
                token_sha256: digest.to_vec(),
                token_expires_at: tok.expires_at,
                token_revoked_at: tok.revoked_at,
            })
            .collect();
        let certs = t
            .certs_of
            .iter()
            .flat_map(|(user_id, certs)| {
                certs.iter().map(|c| CertPart {
                    user_id: *user_id,
                    cert_id: c.mapping.cert_id,
                    fingerprint_sha256: c.mapping.fingerprint.map(|f| f.to_vec()),
                    subject_dn: c.mapping.subject_dn.as_deref().map(str::to_owned),
                    san: c.mapping.san.as_deref().map(str::to_owned),
                })
            })
            .collect();
        CopyExport {
            changes,
            users,
            tokens,
            certs,
        }
    }

    /// Installs a snapshot taken at `taken_at` as the copy (Postgres unreachable at start):
    /// entries that were stale when it was taken stay stale (refused), the outage grace counts
    /// from `taken_at`, and the copy is in outage mode at once (no login waits for a Postgres
    /// connect first). False, and nothing installed, when the snapshot is already past
    /// `--db-outage-grace`. The first load from Postgres replaces it ([`LoginCache::set_live`]).
    pub fn restore(&self, snapshot: CopyExport, taken_at: std::time::SystemTime) -> bool {
        let age = taken_at.elapsed().unwrap_or_default();
        let Some(stale_since) = Instant::now().checked_sub(age) else {
            return false;
        };
        if self.settings.outage_grace.is_zero() || age > self.settings.outage_grace {
            return false;
        }
        let ticket = self.load_ticket();
        let mut stale = Vec::new();
        let mut logins = Vec::with_capacity(snapshot.users.len());
        for u in snapshot.users {
            if u.user_stale {
                stale.push(Scope::User(u.login.user_id));
            }
            if u.credentials_stale {
                stale.push(Scope::Tokens(u.login.user_id));
            }
            logins.push(u.login);
        }
        self.load_users(logins, ticket);
        self.finish_load(ticket, snapshot.tokens, snapshot.certs);
        for scope in stale {
            let g = self.next_generation();
            self.write().stamps.insert(scope, g);
        }
        *self.stale_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(stale_since);
        *self
            .snapshot_taken
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(taken_at);
        *self.outage.lock().unwrap_or_else(|p| p.into_inner()) = Some(Outage {
            since: Instant::now(),
            logins: 0,
        });
        self.in_outage.store(true, Ordering::SeqCst);
        true
    }

    /// How old the snapshot the copy answers from is (None: the copy came from Postgres).
    pub fn snapshot_age(&self) -> Option<Duration> {
        self.snapshot_taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed().unwrap_or_default())
    }

    /// Entry counts, for reports and benchmarks.
    pub fn entry_counts(&self) -> Vec<(&'static str, u64)> {
        self.credentials.run_pending_tasks();
        self.issuers.run_pending_tasks();
        self.permissions.run_pending_tasks();
        self.shapes.run_pending_tasks();
        let t = self.read();
        vec![
            ("copy_users", t.users() as u64),
            ("copy_tokens", t.token_count() as u64),
            ("stamps", t.stamps.len() as u64),
            ("credentials", self.credentials.entry_count()),
            ("signing_keys", self.issuers.entry_count()),
            ("permission_sets", self.permissions.entry_count()),
            ("login_shapes", self.shapes.entry_count()),
        ]
    }

    /// Users and tokens in the copy.
    pub fn copy_size(&self) -> (usize, usize) {
        let t = self.read();
        (t.users(), t.token_count())
    }

    /// The username of a user the copy holds (lockouts are kept by username).
    pub fn username_of(&self, user_id: i64) -> Option<Arc<str>> {
        self.read().by_id.get(&user_id).cloned()
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
        if let Some(shared) = self.shapes.get(&shape) {
            return shared;
        }
        self.shapes.insert(shape.clone(), shape.clone());
        shape
    }
}

/// SHA-256 of a stored hash, truncated to 128 bits (only ever compared with the current hash's).
fn hash_of(password_hash: &str) -> [u8; 16] {
    let full = Sha256::digest(password_hash.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callout::login::Signing;
    use crate::callout::permissions::Lists;

    fn shape(account_id: i64, role_id: Option<i64>) -> Arc<Shape> {
        Arc::new(Shape {
            role_id,
            account_id,
            account_name: "acme".into(),
            account_active: true,
            account_jetstream_disk: false,
            foreign_role: false,
            allowed_sources: None,
            allowed_connection_types: None,
            // Not signable: tests of the copy itself, not of minting.
            signing: Signing::NotReady,
            merged: Arc::new(Merged {
                publish: Lists::default(),
                subscribe: Lists::default(),
                response: None,
                max_subscriptions: -1,
                max_data: -1,
                max_payload: -1,
            }),
            ttl: Duration::from_secs(60),
            signing_key_pending: false,
        })
    }

    fn login(id: i64, name: &str, hash: &str) -> Arc<Login> {
        Arc::new(Login {
            user_id: id,
            username: Arc::from(name),
            password_hash: Some(hash.into()),
            nkey: None,
            user_active: true,
            mqtt_client_ids: Box::default(),
            shape: shape(1, Some(7)),
        })
    }

    fn token(user_id: i64, id: i64, byte: u8) -> TokenPart {
        TokenPart {
            user_id,
            token_id: id,
            token_sha256: vec![byte; 32],
            token_expires_at: None,
            token_revoked_at: None,
        }
    }

    fn found_hash(c: &LoginCache, name: &str) -> Option<String> {
        match c.copy_user(name) {
            CopyLookup::Found(l) => l.password_hash.as_deref().map(str::to_owned),
            _ => None,
        }
    }

    fn loaded(users: &[Arc<Login>]) -> LoginCache {
        let c = LoginCache::new(CacheSettings::default());
        let t = c.load_ticket();
        c.load_users(users.to_vec(), t);
        c.finish_load(t, vec![token(1, 10, 0xaa)], vec![]);
        c
    }

    #[test]
    fn an_older_read_never_replaces_a_newer_one() {
        let mut t = Table::default();
        t.upsert(login(1, "alice", "new"), 5);
        t.upsert(login(1, "alice", "old"), 4);
        assert_eq!(
            t.by_name["alice"].login.password_hash.as_deref(),
            Some("new")
        );
    }

    #[test]
    fn a_rename_drops_the_old_name_and_a_reused_name_drops_its_old_owner() {
        let mut t = Table::default();
        t.upsert(login(1, "alice", "h"), 1);
        t.upsert(login(1, "alicia", "h"), 2);
        assert!(!t.by_name.contains_key("alice"));
        assert_eq!(t.users(), 1);
        // Another user now holds the old name of user 1's new name.
        t.upsert(login(2, "alicia", "h2"), 3);
        assert_eq!(t.users(), 1);
        assert!(!t.by_id.contains_key(&1));
    }

    #[test]
    fn a_notified_change_is_stale_until_reread_and_a_deleted_user_disappears() {
        let c = loaded(&[login(1, "alice", "h1"), login(2, "bob", "h2")]);
        assert_eq!(found_hash(&c, "alice").as_deref(), Some("h1"));
        assert!(matches!(c.copy_token(&[0xaa; 32]), CopyLookup::Found(_)));

        // alice changed, bob deleted: both stamped at once, re-read afterwards.
        let alice = c.on_change("user:1").unwrap();
        let bob = c.on_change("user:2").unwrap();
        assert!(matches!(c.copy_user("alice"), CopyLookup::Stale));
        assert!(matches!(c.copy_token(&[0xaa; 32]), CopyLookup::Stale));
        let t = c.ticket();
        c.apply(
            t,
            &HashSet::from([alice, bob]),
            vec![login(1, "alice", "h1b")],
            vec![token(1, 11, 0xbb)],
            vec![],
        );
        assert_eq!(found_hash(&c, "alice").as_deref(), Some("h1b"));
        assert!(matches!(c.copy_user("bob"), CopyLookup::Unknown));
        assert!(matches!(c.copy_token(&[0xaa; 32]), CopyLookup::Unknown));
        assert!(matches!(c.copy_token(&[0xbb; 32]), CopyLookup::Found(_)));
    }

    #[test]
    fn a_change_during_a_reread_keeps_the_entry_stale() {
        let c = loaded(&[login(1, "alice", "h1")]);
        let scope = c.on_change("user:1").unwrap();
        let t = c.ticket();
        // A second change commits while the re-read runs.
        c.on_change("user:1");
        c.apply(
            t,
            &HashSet::from([scope]),
            vec![login(1, "alice", "h2")],
            vec![],
            vec![],
        );
        assert!(matches!(c.copy_user("alice"), CopyLookup::Stale));
    }

    #[test]
    fn an_unread_role_or_account_change_does_not_lock_its_users_out_during_an_outage() {
        for payload in ["role:7", "account:1"] {
            let c = loaded(&[login(1, "alice", "h1")]);
            c.set_live();
            c.on_change(payload);
            // Live: the change is not served stale (the login reads Postgres).
            assert!(matches!(c.user("alice"), UserLookup::Miss), "{payload}");
            // Postgres gone before the re-read: the copy as it was.
            assert!(
                matches!(c.copy_user("alice"), CopyLookup::Found(_)),
                "{payload}"
            );
        }
    }

    #[test]
    fn a_reload_in_place_drops_what_the_snapshot_lacks_and_keeps_newer_reads() {
        let c = loaded(&[login(1, "alice", "h1"), login(2, "bob", "h2")]);
        let t = c.load_ticket();
        // While the reload streams, a login reads carol from Postgres (newer than the load).
        let newer = c.ticket();
        c.on_change("user:3");
        c.put_user("carol", Ticket(newer.0 + 10), &login(3, "carol", "h3"));
        // The snapshot: alice changed, bob deleted, alice's token gone.
        c.load_users(vec![login(1, "alice", "h1b")], t);
        c.finish_load(t, vec![], vec![]);
        assert_eq!(found_hash(&c, "alice").as_deref(), Some("h1b"));
        assert!(matches!(c.copy_user("bob"), CopyLookup::Unknown));
        assert!(matches!(c.copy_token(&[0xaa; 32]), CopyLookup::Unknown));
        assert_eq!(found_hash(&c, "carol").as_deref(), Some("h3"));
        assert_eq!(c.copy_size(), (2, 0));
    }

    fn keyed(id: i64, name: &str, nkey: &str) -> Arc<Login> {
        Arc::new(Login {
            user_id: id,
            username: Arc::from(name),
            password_hash: None,
            nkey: Some(nkey.into()),
            mqtt_client_ids: Box::default(),
            user_active: true,
            shape: shape(1, Some(7)),
        })
    }

    fn mapping(user_id: i64, id: i64, byte: u8) -> CertPart {
        CertPart {
            user_id,
            cert_id: id,
            fingerprint_sha256: Some(vec![byte; 32]),
            subject_dn: None,
            san: None,
        }
    }

    fn cert(byte: u8) -> Presented {
        Presented {
            fingerprint: [byte; 32],
            subject_dn: "CN=x".into(),
            sans: vec![],
        }
    }

    #[test]
    fn nkeys_and_certificate_mappings_follow_their_users() {
        let mut t = Table::default();
        t.upsert(keyed(1, "dev", "UKEY1"), 1);
        assert!(t.nkey_entry("UKEY1").is_some());
        // A new key replaces the old one in the index; another user's older key stays its own.
        t.upsert(keyed(1, "dev", "UKEY2"), 2);
        assert!(t.nkey_entry("UKEY1").is_none());
        assert_eq!(t.nkey_entry("UKEY2").map(|e| e.login.user_id), Some(1));
        t.set_certificates(1, vec![mapping(1, 10, 7)], 2);
        assert_eq!(t.cert_candidates(&cert(7)).len(), 1);
        assert!(t.cert_candidates(&cert(8)).is_empty());
        t.set_certificates(1, vec![mapping(1, 11, 8)], 3);
        assert!(t.cert_candidates(&cert(7)).is_empty(), "replaced");
        t.remove_user(1);
        assert!(t.nkey_entry("UKEY2").is_none());
        assert!(t.cert_candidates(&cert(8)).is_empty());
        assert!(t.cert_index.is_empty() && t.by_nkey.is_empty());
    }

    #[test]
    fn a_notified_mapping_change_is_stale_until_reread() {
        let c = LoginCache::new(CacheSettings::default());
        let t = c.load_ticket();
        c.load_users(vec![keyed(1, "dev", "UKEY1")], t);
        c.finish_load(t, vec![], vec![mapping(1, 10, 7)]);
        assert!(matches!(c.copy_nkey("UKEY1"), CopyLookup::Found(_)));
        assert!(matches!(c.copy_certificate(&cert(7)), CopyLookup::Found(_)));
        let scope = c.on_change("certificate:1").unwrap();
        assert_eq!(scope, Scope::Tokens(1));
        assert!(matches!(c.copy_certificate(&cert(7)), CopyLookup::Stale));
        assert!(
            matches!(c.copy_nkey("UKEY1"), CopyLookup::Found(_)),
            "the key did not change"
        );
        // Re-read: the mapping was deleted.
        c.apply(
            c.ticket(),
            &HashSet::from([scope]),
            vec![keyed(1, "dev", "UKEY1")],
            vec![],
            vec![],
        );
        assert!(matches!(c.copy_certificate(&cert(7)), CopyLookup::Unknown));
        // A reload whose snapshot lacks the user drops its key.
        let t = c.load_ticket();
        c.finish_load(t, vec![], vec![]);
        assert!(matches!(c.copy_nkey("UKEY1"), CopyLookup::Unknown));
    }

    #[test]
    fn the_grace_counts_from_when_the_copy_stopped_being_current() {
        let c = LoginCache::new(CacheSettings {
            outage_grace: Duration::from_millis(50),
            ..Default::default()
        });
        assert!(!c.within_grace(), "nothing loaded");
        let t = c.ticket();
        c.finish_load(t, vec![], vec![]);
        c.set_live();
        assert!(c.within_grace());
        c.set_disconnected();
        assert!(c.within_grace());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.within_grace(), "past the grace");
        c.set_live();
        assert!(c.within_grace());
        let off = LoginCache::new(CacheSettings {
            outage_grace: Duration::ZERO,
            ..Default::default()
        });
        off.finish_load(off.ticket(), vec![], vec![]);
        assert!(!off.within_grace(), "grace 0 turns it off");
    }

    #[test]
    fn kicks_are_answered_from_the_copy_and_say_when_it_cannot_vouch() {
        // alice (id 1) and bob (id 2) hold role 7 of account 1.
        let c = loaded(&[login(1, "alice", "h"), login(2, "bob", "h")]);
        let none = HashSet::new();
        let names = |v: &KickView| {
            let mut n: Vec<String> = v.users.iter().map(|u| u.username.to_string()).collect();
            n.sort();
            n
        };
        // Not live yet (the listener never connected): the copy answers but cannot vouch.
        let v = c.kick_view(&HashSet::from([7]), &none);
        assert_eq!(names(&v), ["alice", "bob"]);
        assert!(!v.complete);
        c.set_live();
        let v = c.kick_view(&HashSet::from([7]), &none);
        assert!(v.complete);
        let v = c.kick_view(&none, &HashSet::from([2]));
        assert_eq!(names(&v), ["bob"]);
        assert!(v.complete);
        // A token change of bob does not change who bob is.
        c.on_change("token:2");
        assert!(c.kick_view(&none, &HashSet::from([2])).complete);
        // A user change not re-read yet: that user's name may be old, and anyone may have
        // moved into a role.
        c.on_change("user:1");
        assert!(!c.kick_view(&none, &HashSet::from([1])).complete);
        assert!(c.kick_view(&none, &HashSet::from([2])).complete);
        assert!(!c.kick_view(&HashSet::from([7]), &none).complete);
        // A user the copy does not hold.
        assert!(!c.kick_view(&none, &HashSet::from([3])).complete);
        // Unsignable accounts give no key (the caller reads nats.accounts).
        assert!(c
            .kick_view(&none, &HashSet::from([2]))
            .account_keys
            .is_empty());
    }
}
