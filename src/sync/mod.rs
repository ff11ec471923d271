//! Account sync: keeps every tenant account JWT on nats-server in step with `nats.accounts`.
//!
//! Exactly one replica (the advisory-lock leader) runs it. Work comes from `nats.sync_outbox`
//! (filled by triggers, woken by `NOTIFY nats_pg_auth_sync`); a push that fails stays in the
//! outbox with a backoff, so no change is lost while NATS or Postgres is away. Every account
//! is queued again when the system connection to NATS is (re)established, because a restarted
//! server may have lost its resolver directory.

pub mod account_jwt;
pub mod leader;
pub mod publish;
pub mod sharing;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use nkeys::KeyPair;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::db::{self, notify, outbox::OutboxRow};
use crate::jwt::{self, claims::DeleteAccountsClaims, Claims};
use crate::keys::{self, SeedCipher};
use leader::Leadership;

pub const SYNC_CHANNEL: &str = "nats_pg_auth_sync";

#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub database_url: String,
    pub reconcile_interval: Duration,
    pub push_timeout: Duration,
    /// Accounts pushed concurrently.
    pub parallelism: usize,
    /// How long a gracefully rotated signing key stays valid: the longest user JWT lifetime.
    pub signing_key_grace: Duration,
}

pub struct Sync {
    pool: PgPool,
    cipher: SeedCipher,
    /// Swapped when `rotate-operator-key --finish` installs a new operator signing key.
    operator_signer: std::sync::RwLock<std::sync::Arc<KeyPair>>,
    system_accounts: BTreeSet<String>,
    client: Client,
    settings: SyncSettings,
    metrics: crate::metrics::Metrics,
    sessions: Option<std::sync::Arc<crate::sessions::Sessions>>,
    /// Last `iat` used per account, so two pushes in one second still increase it.
    last_iat: tokio::sync::Mutex<std::collections::HashMap<i64, i64>>,
    /// Whether this replica's at-rest key is still the database's: a replica whose key is not
    /// does not lead, and seals nothing.
    key_watch: crate::key_watch::KeyWatch,
}

#[derive(Debug, thiserror::Error)]
enum AccountSyncError {
    #[error("{0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Push(#[from] publish::PushError),
    #[error("key problem: {0}")]
    Key(#[from] keys::KeyError),
    #[error("cannot sign: {0}")]
    Jwt(#[from] jwt::JwtError),
    #[error("cannot generate keys: {0}")]
    Nkeys(String),
    /// Leadership ended (lock lost, or shutdown) before the push or its bookkeeping: the rows
    /// keep their lease and the next leader does the work.
    #[error("no longer the sync leader")]
    NotLeader,
    /// The database's seeds are sealed with another key now: nothing was sealed; a replica
    /// with the current key does it.
    #[error("deferred: this replica's encryption key is no longer current (see its /readyz)")]
    KeyNotCurrent,
}

/// Fails when this replica no longer leads: checked right before every publish and every
/// write of a sync result.
fn still_leading(leading: &CancellationToken) -> Result<(), AccountSyncError> {
    if leading.is_cancelled() {
        Err(AccountSyncError::NotLeader)
    } else {
        Ok(())
    }
}

/// One push: the outbox rows it settles and how often they were tried.
enum Job {
    Upsert {
        account_id: i64,
        ids: Vec<i64>,
        attempts: i32,
    },
    Delete {
        public_key: String,
        account_id: Option<i64>,
        ids: Vec<i64>,
        attempts: i32,
    },
}

impl Job {
    fn account_id(&self) -> Option<i64> {
        match self {
            Job::Upsert { account_id, .. } => Some(*account_id),
            Job::Delete { account_id, .. } => *account_id,
        }
    }
}

impl Sync {
    pub fn new(
        pool: PgPool,
        cipher: SeedCipher,
        operator_signer: KeyPair,
        system_accounts: BTreeSet<String>,
        client: Client,
        settings: SyncSettings,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Self {
            pool,
            cipher,
            operator_signer: std::sync::RwLock::new(std::sync::Arc::new(operator_signer)),
            system_accounts,
            client,
            settings,
            metrics,
            sessions: None,
            last_iat: Default::default(),
            key_watch: Default::default(),
        }
    }

    /// Shares the replica's key watch (see [`crate::key_watch`]).
    pub fn with_key_watch(mut self, key_watch: crate::key_watch::KeyWatch) -> Self {
        self.key_watch = key_watch;
        self
    }

    /// In a transaction about to insert seeds: fails unless this replica's key is the
    /// database's, holding a lock that keeps a rotation out until the transaction ends.
    async fn ensure_key_current(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> Result<(), AccountSyncError> {
        let found = db::seeds::lock_and_check(tx, &self.cipher).await?;
        let current = found.is_none();
        self.key_watch.record(&self.cipher, found);
        if current {
            Ok(())
        } else {
            Err(AccountSyncError::KeyNotCurrent)
        }
    }

    /// Session control runs on the leader, next to the sync.
    pub fn with_sessions(mut self, sessions: crate::sessions::Sessions) -> Self {
        self.sessions = Some(std::sync::Arc::new(sessions));
        self
    }

    /// Competes for leadership until `shutdown`; leads while it holds the lock.
    pub async fn run(self, nats_connected: watch::Receiver<u64>, shutdown: CancellationToken) {
        std::sync::Arc::new(self)
            .compete(nats_connected, shutdown)
            .await
    }

    async fn compete(
        self: std::sync::Arc<Self>,
        mut nats_connected: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let mut logged_follower = false;
        // One line per outage, not one every 2 s for as long as it lasts.
        let mut logged_unreachable = false;
        while !shutdown.is_cancelled() {
            // A replica whose key is not current would seal new seeds under it: it leaves the
            // sync to one whose key is (the watch logged why).
            if self.key_watch.superseded().is_some() {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                continue;
            }
            let attempt = Leadership::try_acquire(&self.settings.database_url).await;
            if attempt.is_ok() && logged_unreachable {
                tracing::info!("sync reaches Postgres again");
                logged_unreachable = false;
            }
            match attempt {
                Ok(Some(leadership)) => {
                    tracing::info!("this replica is the sync leader");
                    logged_follower = false;
                    self.lead(leadership, &mut nats_connected, &shutdown).await;
                }
                Ok(None) => {
                    if !logged_follower {
                        tracing::info!("another replica leads the sync; standing by");
                        logged_follower = true;
                    }
                }
                Err(e) if !logged_unreachable => {
                    logged_unreachable = true;
                    tracing::warn!(error = %e, "sync cannot reach Postgres for leader election; pushes and kicks wait (nothing is lost), retrying every 2s")
                }
                Err(e) => {
                    tracing::debug!(error = %e, "sync still cannot reach Postgres")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    async fn lead(
        self: &std::sync::Arc<Self>,
        leadership: Leadership,
        nats_connected: &mut watch::Receiver<u64>,
        shutdown: &CancellationToken,
    ) {
        // Everything this term of leadership runs stops when `leading` is cancelled: by the
        // lock watch when the lock connection fails (within ~1.2 s), or on shutdown.
        let leading = shutdown.child_token();
        let watch = tokio::spawn(leadership.watch(leading.clone()));
        self.metrics.set_leader(true);
        let mut wake = notify::spawn(
            &self.pool,
            notify::ListenSettings {
                name: "nats-pg-auth sync",
                channels: &[SYNC_CHANNEL],
                health_interval: Duration::from_secs(5),
            },
            leading.clone(),
        );
        // Session control listens on its own connection, for as long as this replica leads.
        if let Some(sessions) = &self.sessions {
            tokio::spawn(sessions.clone().run(leading.clone()));
        }
        // Rows a former leader claimed keep its lease; there is one leader, so nobody else is
        // pushing them now: make them due at once instead of after the lease.
        if let Err(e) = db::outbox::retry_now(&self.pool).await {
            tracing::warn!(error = %e, "cannot reset the leases of a former leader; its rows return after them");
        }
        // A new leader cannot know what the server holds: push everything once.
        self.enqueue_all("sync leader started").await;
        nats_connected.mark_unchanged();
        // Reconcile runs beside the drain (with 10,000 accounts a round takes seconds), and
        // only queues outbox rows.
        tokio::spawn(self.clone().reconcile_every(leading.clone()));
        loop {
            if self.key_watch.superseded().is_some() {
                tracing::warn!("standing down as sync leader: this replica's encryption key is no longer current");
                break;
            }
            self.drain(&leading).await;
            if leading.is_cancelled() {
                break;
            }
            let wait = match db::outbox::backlog(&self.pool).await {
                Ok(b) => {
                    self.metrics.set_backlog(b.pending, b.oldest_secs);
                    b.next_due_in.map_or(Duration::from_secs(5), |d| {
                        d.clamp(Duration::from_millis(20), Duration::from_secs(5))
                    })
                }
                Err(_) => Duration::from_secs(1),
            };
            tokio::select! {
                _ = leading.cancelled() => break,
                event = wake.recv() => match event {
                    // A burst (10,000 accounts inserted: one notification each) is one batch,
                    // one wake-up: the outbox holds the work.
                    Some(notify::Event::Notes(_)) => {}
                    // (Re)connected: notifications sent meanwhile were missed, but the outbox
                    // rows are durable, and the drain at the top of the loop finds them.
                    Some(notify::Event::Connected) => {}
                    // Until it is back, the loop polls the outbox (at most every 5 s).
                    Some(notify::Event::Disconnected(_)) => {}
                    None => break,
                },
                _ = tokio::time::sleep(wait) => {}
                changed = nats_connected.changed() => {
                    if changed.is_ok() {
                        // Pushes that failed while NATS was away are retried now, not after
                        // their backoff.
                        if let Err(e) = db::outbox::retry_now(&self.pool).await {
                            tracing::warn!(error = %e, "cannot reschedule pending pushes; they run after their backoff");
                        }
                        // The first connection is the one this leader started with (it queued
                        // every account already); a reconnect may be to a server that lost its
                        // resolver directory.
                        if *nats_connected.borrow_and_update() > 1 {
                            tracing::info!("reconnected to NATS; queueing every account for a push");
                            self.enqueue_all("nats connection re-established").await;
                        }
                    }
                }
            }
        }
        // Releases the lock (or finds it already gone).
        leading.cancel();
        let _ = watch.await;
        self.metrics.set_leader(false);
    }

    async fn reconcile_every(self: std::sync::Arc<Self>, leading: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = leading.cancelled() => return,
                _ = tick.tick() => {}
            }
            tokio::select! {
                _ = leading.cancelled() => return,
                _ = self.reconcile() => {}
            }
        }
    }

    async fn enqueue_all(&self, reason: &str) {
        if let Err(e) = db::outbox::enqueue_all(&self.pool, reason).await {
            tracing::warn!(error = %e, "cannot queue accounts for a push; will retry on the next reconcile");
        }
    }

    /// Processes every due outbox row, keeping up to `parallelism` pushes in flight. Rows are
    /// claimed in small chunks as pushes finish, so a change queued during a burst waits for a
    /// free slot, not for the burst; an account is never pushed twice at once (two concurrent
    /// pushes could land out of order and leave the older JWT on the server).
    ///
    /// Stops as soon as `leading` is cancelled (the lock is lost, or shutdown): nothing more is
    /// claimed, and pushes in flight are aborted; each also checks the token right before it
    /// publishes and before it records its result. Their rows keep their lease, and the next
    /// leader makes them due at once.
    pub async fn drain(self: &std::sync::Arc<Self>, leading: &CancellationToken) {
        if leading.is_cancelled() {
            return;
        }
        if let Err(e) = self.refresh_operator_key(leading).await {
            tracing::warn!(error = %e, "cannot check the operator signing key; keeping the current one");
        }
        let parallelism = self.settings.parallelism.max(1);
        let refill = (parallelism / 2).max(1);
        // Tasks, not futures polled here: a push holding a Postgres connection must make
        // progress while this loop waits for a connection to claim more.
        let mut in_flight = tokio::task::JoinSet::new();
        let mut busy: BTreeSet<i64> = BTreeSet::new();
        loop {
            if leading.is_cancelled() {
                in_flight.abort_all();
                return;
            }
            // Claim when a chunk of slots is free (one query per chunk, not per push), or when
            // nothing is in flight; rows of busy accounts are looked at again after a push ends.
            let room = parallelism - in_flight.len();
            if room >= refill || in_flight.is_empty() {
                let ids: Vec<i64> = busy.iter().copied().collect();
                match db::outbox::claim(&self.pool, room as i64, Duration::from_secs(60), &ids)
                    .await
                {
                    Ok(rows) if !rows.is_empty() => {
                        // `rotate-operator-key --finish` stores the new key and queues every
                        // account in one transaction: rows claimed now are signed with the key
                        // that queued them.
                        if let Err(e) = self.refresh_operator_key(leading).await {
                            tracing::warn!(error = %e, "cannot check the operator signing key; keeping the current one");
                        }
                        for job in self.jobs(rows, leading).await {
                            if let Some(id) = job.account_id() {
                                busy.insert(id);
                            }
                            let this = self.clone();
                            let leading = leading.clone();
                            in_flight.spawn(async move { this.push_job(job, &leading).await });
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the sync outbox; retrying");
                    }
                }
            }
            let joined = tokio::select! {
                _ = leading.cancelled() => {
                    in_flight.abort_all();
                    return;
                }
                joined = in_flight.join_next() => joined,
            };
            match joined {
                Some(Ok(Some(id))) => {
                    busy.remove(&id);
                }
                Some(Ok(None)) => {}
                Some(Err(e)) if e.is_cancelled() => {}
                Some(Err(e)) => {
                    // A push task panicked: its rows keep their lease and come back after it.
                    tracing::error!(error = %e, "an account push failed unexpectedly; its rows are retried after their lease");
                    // Its account stays marked busy only until this drain ends.
                }
                None => return,
            }
        }
    }

    /// Groups claimed rows into pushes: several rows of one account collapse into one push, and
    /// a delete wins over upserts of the same account key (the row is gone).
    async fn jobs(&self, rows: Vec<OutboxRow>, leading: &CancellationToken) -> Vec<Job> {
        let mut upserts: BTreeMap<i64, (Vec<i64>, i32)> = BTreeMap::new();
        let mut deletes: BTreeMap<String, (Option<i64>, Vec<i64>, i32)> = BTreeMap::new();
        let mut orphans = Vec::new();
        for mut row in rows {
            if let ("rotate" | "rotate_emergency", Some(id)) = (row.op.as_str(), row.account_id) {
                match self
                    .rotate(id, row.op == "rotate_emergency", row.id, leading)
                    .await
                {
                    Ok(()) => row.op = "upsert".into(),
                    Err(e) => {
                        self.finish(&[row.id], row.attempts, Err((Some(id), e)), leading)
                            .await;
                        continue;
                    }
                }
            }
            match (
                row.op.as_str(),
                row.account_id,
                row.account_public_key.clone(),
            ) {
                ("delete", account_id, Some(pk)) => {
                    let e = deletes.entry(pk).or_default();
                    e.0 = e.0.or(account_id);
                    e.1.push(row.id);
                    e.2 = e.2.max(row.attempts);
                }
                ("upsert", Some(id), _) => {
                    let e = upserts.entry(id).or_default();
                    e.0.push(row.id);
                    e.1 = e.1.max(row.attempts);
                }
                _ => orphans.push(row.id),
            }
        }
        if !orphans.is_empty() {
            let _ = db::outbox::complete(&self.pool, &orphans).await;
        }
        upserts
            .into_iter()
            .map(|(account_id, (ids, attempts))| Job::Upsert {
                account_id,
                ids,
                attempts,
            })
            .chain(
                deletes
                    .into_iter()
                    .map(|(public_key, (account_id, ids, attempts))| Job::Delete {
                        public_key,
                        account_id,
                        ids,
                        attempts,
                    }),
            )
            .collect()
    }

    /// Pushes one job and records the outcome; returns the account it held.
    async fn push_job(&self, job: Job, leading: &CancellationToken) -> Option<i64> {
        match job {
            Job::Upsert {
                account_id,
                ids,
                attempts,
            } => {
                let result = self.upsert(account_id, leading).await;
                self.finish(
                    &ids,
                    attempts,
                    result.map_err(|e| (Some(account_id), e)),
                    leading,
                )
                .await;
                Some(account_id)
            }
            Job::Delete {
                public_key,
                account_id,
                ids,
                attempts,
            } => {
                let result = self.delete(&public_key, leading).await;
                self.finish(&ids, attempts, result.map_err(|e| (None, e)), leading)
                    .await;
                account_id
            }
        }
    }

    async fn finish(
        &self,
        ids: &[i64],
        attempts: i32,
        result: Result<(), (Option<i64>, AccountSyncError)>,
        leading: &CancellationToken,
    ) {
        if leading.is_cancelled() || matches!(result, Err((_, AccountSyncError::KeyNotCurrent))) {
            // Not ours to settle any more: the rows keep their lease and the next leader
            // pushes them again (the reconcile also repairs a JWT pushed but not recorded).
            // A replica whose key is no longer current stands down right after this.
            return;
        }
        match result {
            Ok(()) => {
                self.metrics.count_push(true);
                if let Err(e) = db::outbox::complete(&self.pool, ids).await {
                    tracing::warn!(error = %e, "pushed, but cannot clear the outbox rows; they will be pushed again");
                }
            }
            Err((account_id, e)) => {
                self.metrics.count_push(false);
                let backoff = backoff(attempts);
                let msg = e.to_string();
                tracing::warn!(account_id, error = %msg, retry_in = ?backoff, "account sync failed; will retry");
                if let Some(id) = account_id {
                    let _ = db::accounts::record_error(&self.pool, id, &msg).await;
                }
                if let Err(e) = db::outbox::fail(&self.pool, ids, &msg, backoff).await {
                    // The lease set at claim time still brings the rows back.
                    tracing::warn!(error = %e, "cannot record the sync failure; the rows return after their lease");
                }
            }
        }
    }

    fn signer(&self) -> std::sync::Arc<KeyPair> {
        self.operator_signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Picks up a new operator signing key (after `rotate-operator-key --finish`) and pushes the
    /// re-signed SYS and AUTH JWTs; tenant accounts were queued by the rotation itself.
    async fn refresh_operator_key(
        &self,
        leading: &CancellationToken,
    ) -> Result<(), AccountSyncError> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT public_key, seed FROM nats.service_identities WHERE kind = 'operator_signing'",
        )
        .fetch_optional(&self.pool)
        .await?;
        let Some((public_key, seed)) = row else {
            return Ok(());
        };
        if public_key == self.signer().public_key() {
            return Ok(());
        }
        let key = keys::keypair_from_stored(&self.cipher, &seed, &public_key)?;
        let own: Vec<String> = sqlx::query_scalar(
            "SELECT jwt FROM nats.service_identities WHERE kind IN ('sys_account', 'auth_account') AND jwt IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        for token in own {
            still_leading(leading)?;
            publish::update(&self.client, &token, self.settings.push_timeout).await?;
        }
        *self
            .operator_signer
            .write()
            .unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(key);
        tracing::info!(signing_key = %public_key, "now signing account JWTs with the new operator signing key");
        db::audit::record(
            &self.pool,
            db::audit::kind::OPERATOR_KEY_ADOPTED,
            &public_key,
            serde_json::json!({ "resigned": "SYS, AUTH and every account" }),
        )
        .await;
        Ok(())
    }

    /// Adds a new signing key and retires the older ones: after `signing_key_grace` (longest
    /// user JWT lifetime) for a graceful rotation, at once for an emergency one. The outbox row
    /// becomes a plain upsert in the same transaction, so a retried push never rotates twice.
    async fn rotate(
        &self,
        account_id: i64,
        emergency: bool,
        outbox_id: i64,
        leading: &CancellationToken,
    ) -> Result<(), AccountSyncError> {
        let has_keys: Option<Option<String>> =
            sqlx::query_scalar("SELECT public_key FROM nats.accounts WHERE id = $1")
                .bind(account_id)
                .fetch_optional(&self.pool)
                .await?;
        if !matches!(has_keys, Some(Some(_))) {
            return Ok(()); // first sync gives it keys; nothing to rotate yet
        }
        let key = KeyPair::new_account();
        let seed = key
            .seed()
            .map_err(|e| AccountSyncError::Nkeys(e.to_string()))?;
        let stored = self.cipher.seal(&seed, &key.public_key())?;
        let grace = if emergency {
            Duration::ZERO
        } else {
            self.settings.signing_key_grace
        };
        let mut tx = self.pool.begin().await?;
        self.ensure_key_current(&mut tx).await?;
        db::outbox::mark_own_writes(&mut tx).await?;
        let new_id: i64 = sqlx::query_scalar(
            "INSERT INTO nats.account_keys (account_id, kind, public_key, seed) VALUES ($1, 'signing', $2, $3) RETURNING id",
        )
        .bind(account_id)
        .bind(key.public_key())
        .bind(stored)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE nats.account_keys SET retired_at = now() + make_interval(secs => $3) \
             WHERE account_id = $1 AND kind = 'signing' AND id <> $2 \
               AND (retired_at IS NULL OR retired_at > now() + make_interval(secs => $3))",
        )
        .bind(account_id)
        .bind(new_id)
        .bind(grace.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE nats.sync_outbox SET op = 'upsert' WHERE id = $1")
            .bind(outbox_id)
            .execute(&mut *tx)
            .await?;
        still_leading(leading)?;
        tx.commit().await?;
        tracing::info!(account_id, emergency, signing_key = %key.public_key(), "signing key rotated");
        let name: Option<String> =
            sqlx::query_scalar("SELECT name FROM nats.accounts WHERE id = $1")
                .bind(account_id)
                .fetch_optional(&self.pool)
                .await
                .ok()
                .flatten();
        db::audit::record(
            &self.pool,
            db::audit::kind::SIGNING_KEY_ROTATED,
            name.as_deref().unwrap_or_default(),
            serde_json::json!({
                "account_id": account_id,
                "emergency": emergency,
                "signing_key": key.public_key(),
                "old_keys_retire_in_seconds": grace.as_secs(),
            }),
        )
        .await;
        Ok(())
    }

    /// Builds and pushes one account; gives it keys first when SQL created it without.
    async fn upsert(
        &self,
        account_id: i64,
        leading: &CancellationToken,
    ) -> Result<(), AccountSyncError> {
        let Some(mut row) = db::accounts::load(&self.pool, account_id).await? else {
            return Ok(()); // deleted since; its delete row does the rest
        };
        if row.public_key.is_none() {
            let identity = KeyPair::new_account();
            let signing = KeyPair::new_account();
            let seal = |kp: &KeyPair| -> Result<(String, String), AccountSyncError> {
                let seed = kp
                    .seed()
                    .map_err(|e| AccountSyncError::Nkeys(e.to_string()))?;
                Ok((kp.public_key(), self.cipher.seal(&seed, &kp.public_key())?))
            };
            let (ipk, iseed) = seal(&identity)?;
            let (spk, sseed) = seal(&signing)?;
            still_leading(leading)?;
            let assigned = db::accounts::assign_keys(
                &self.pool,
                account_id,
                (&ipk, &iseed),
                (&spk, &sseed),
                &self.cipher,
            )
            .await?;
            if let db::accounts::Assigned::KeyNotCurrent(found) = assigned {
                self.key_watch.record(&self.cipher, Some(found));
                return Err(AccountSyncError::KeyNotCurrent);
            }
            // Importers that named this account before it had keys can now be completed.
            db::sharing::enqueue_importers(&self.pool, account_id, "exporter got its keys").await?;
            row = match db::accounts::load(&self.pool, account_id).await? {
                Some(r) => r,
                None => return Ok(()),
            };
        }
        let public_key = row.public_key.clone().unwrap_or_default();
        let keys = db::accounts::live_keys(&self.pool, account_id).await?;
        let signing: Vec<String> = keys
            .iter()
            .filter(|k| k.kind == "signing")
            .map(|k| k.public_key.clone())
            .collect();
        let exports: Vec<_> = db::sharing::exports_of(&self.pool, account_id)
            .await?
            .iter()
            .map(sharing::export)
            .collect();
        let import_rows = db::sharing::imports_of(&self.pool, account_id).await?;
        let plan =
            sharing::plan_imports(&self.pool, &self.cipher, &public_key, import_rows).await?;
        let mut claims = account_jwt::build(&row, &public_key, signing, 0);
        claims.nats.exports = exports;
        claims.nats.imports = plan.imports;
        claims.nats.revocations = db::accounts::revocations(&self.pool, account_id)
            .await?
            .into_iter()
            .collect();
        let mut import_errors = plan.errors;
        // The import rows behind `claims.nats.imports`, in the same order.
        let import_ids: Vec<usize> = (0..import_errors.len())
            .filter(|&i| import_errors[i].1.is_none())
            .collect();
        let pushed = match self.push(&row, &mut claims, leading).await {
            // The server refused the JWT and it carries imports: they are the part an admin
            // can get wrong in ways we do not check (overlaps, remote tokens). Push the account
            // without them so it keeps working (if the server refuses that too, the problem is
            // elsewhere), then add them back in halves, keeping each half the server accepts,
            // down to the single imports it refuses: only those are left out, each with the
            // server's reason on its own row.
            Err(AccountSyncError::Push(publish::PushError::Refused(msg)))
                if !claims.nats.imports.is_empty() =>
            {
                let all = std::mem::take(&mut claims.nats.imports);
                let mut token = self.push(&row, &mut claims, leading).await?;
                let mut kept = vec![false; all.len()];
                let mut todo = vec![(0..all.len(), Some(msg))];
                while let Some((range, known)) = todo.pop() {
                    let refusal = match known {
                        Some(m) => m,
                        None => {
                            claims.nats.imports = (0..all.len())
                                .filter(|i| kept[*i] || range.contains(i))
                                .map(|i| all[i].clone())
                                .collect();
                            match self.push(&row, &mut claims, leading).await {
                                Ok(t) => {
                                    token = t;
                                    kept[range].fill(true);
                                    continue;
                                }
                                Err(AccountSyncError::Push(publish::PushError::Refused(m))) => m,
                                Err(e) => return Err(e),
                            }
                        }
                    };
                    if range.len() == 1 {
                        import_errors[import_ids[range.start]].1 = Some(format!(
                            "left out: nats-server refuses the account JWT with this import: {refusal}"
                        ));
                    } else {
                        let mid = range.start + range.len() / 2;
                        todo.push((mid..range.end, None));
                        todo.push((range.start..mid, None));
                    }
                }
                token
            }
            other => other?,
        };
        still_leading(leading)?;
        // One transaction: whoever reads the sync state sees a push's import errors together
        // with the JWT they belong to, never the errors beside the previous JWT.
        let mut tx = self.pool.begin().await?;
        for (id, err) in import_errors {
            db::sharing::set_import_error(&mut *tx, id, err.as_deref()).await?;
        }
        db::accounts::record_synced(&mut *tx, account_id, &pushed, row.read_at).await?;
        tx.commit().await?;
        // Limits the server cannot grant are accepted with the JWT and only logged there.
        let limits = &claims.nats.limits;
        if let Err(why) = publish::jetstream_applied(
            &self.client,
            &public_key,
            limits.mem_storage,
            limits.disk_storage,
            self.settings.push_timeout,
        )
        .await
        {
            tracing::warn!(account = %row.name, "{why}");
            db::accounts::record_error(&self.pool, account_id, &why).await?;
        }
        tracing::debug!(account = %row.name, "account JWT pushed");
        Ok(())
    }

    /// Signs (with a fresh, strictly larger `iat`) and pushes; returns the pushed JWT.
    async fn push(
        &self,
        row: &db::accounts::AccountRow,
        claims: &mut Claims<crate::jwt::claims::AccountClaims>,
        leading: &CancellationToken,
    ) -> Result<String, AccountSyncError> {
        let previous = self.last_iat.lock().await.get(&row.id).copied();
        let stored = row.jwt.as_deref().and_then(jwt::iat_of);
        claims.iat = jwt::now_unix().max(previous.max(stored).map_or(i64::MIN, |p| p + 1));
        if !row.active {
            claims.nats.revocations.insert("*".to_owned(), claims.iat);
        }
        let token = jwt::encode(claims, &self.signer())?;
        self.last_iat.lock().await.insert(row.id, claims.iat);
        still_leading(leading)?;
        publish::update_account(row, &self.client, &token, &self.settings).await?;
        Ok(token)
    }

    async fn delete(
        &self,
        public_key: &str,
        leading: &CancellationToken,
    ) -> Result<(), AccountSyncError> {
        if self.system_accounts.contains(public_key) {
            return Ok(());
        }
        let signer = self.signer();
        let signer_pk = signer.public_key();
        let claims = Claims {
            aud: None,
            exp: None,
            jti: String::new(),
            iat: jwt::now_unix(),
            iss: String::new(),
            name: None,
            nbf: None,
            sub: signer_pk,
            nats: DeleteAccountsClaims {
                accounts: vec![public_key.to_owned()],
            },
        };
        let token = jwt::encode(&claims, &signer)?;
        still_leading(leading)?;
        publish::delete(&self.client, &token, self.settings.push_timeout).await?;
        tracing::info!(account = public_key, "account deleted from nats-server");
        db::audit::record(
            &self.pool,
            db::audit::kind::ACCOUNT_DELETED,
            public_key,
            serde_json::json!({ "removed_from": "nats-server resolver" }),
        )
        .await;
        Ok(())
    }

    /// Drift repair: queues every account whose retired signing key has expired since its last
    /// push (so the key leaves its JWT), and every account the server does not serve exactly
    /// the JWT the database recorded as pushed (`nats.accounts.jwt`): missing, or another one
    /// (a stale JWT a former leader pushed late, a restored resolver directory, a push by
    /// hand). Accounts with pending outbox rows are skipped: they are about to be pushed.
    ///
    /// Bounded for many accounts: [`RECONCILE_BATCH`] accounts are read at a time, and at most
    /// [`RECONCILE_CONCURRENCY`] `CLAIMS.LOOKUP` requests are in flight. In a cluster the
    /// lookup is answered by the first server that replies (normally the one this replica is
    /// connected to); the full resolver spreads a repaired JWT to the others.
    async fn reconcile(&self) {
        let retired = sqlx::query(
            "INSERT INTO nats.sync_outbox (account_id, op, reason) \
             SELECT DISTINCT k.account_id, 'upsert', 'retired signing key expired' \
             FROM nats.account_keys k JOIN nats.accounts a ON a.id = k.account_id \
             WHERE k.kind = 'signing' AND k.retired_at <= now() AND (a.synced_at IS NULL OR k.retired_at > a.synced_at)",
        )
        .execute(&self.pool)
        .await;
        if let Err(e) = retired {
            tracing::warn!(error = %e, "cannot queue accounts with expired signing keys");
        }
        let started = std::time::Instant::now();
        let (mut checked, mut missing, mut stale) = (0usize, 0usize, 0usize);
        let mut after = 0i64;
        loop {
            let batch = match db::outbox::settled_accounts(&self.pool, after, RECONCILE_BATCH).await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "reconcile stopped: cannot read accounts");
                    return;
                }
            };
            let Some(last) = batch.last() else { break };
            after = last.0;
            let timeout = self.settings.push_timeout;
            let verdicts: Vec<Result<Option<(i64, Drift)>, publish::PushError>> =
                futures::stream::iter(batch)
                    .map(|(id, public_key, recorded)| async move {
                        let (Some(public_key), Some(recorded)) = (public_key, recorded) else {
                            return Ok(Some((id, Drift::Missing)));
                        };
                        Ok(
                            match publish::lookup(&self.client, &public_key, timeout).await? {
                                None => Some((id, Drift::Missing)),
                                Some(served) if served != recorded => Some((id, Drift::Stale)),
                                Some(_) => None,
                            },
                        )
                    })
                    .buffer_unordered(RECONCILE_CONCURRENCY)
                    .collect()
                    .await;
            for verdict in verdicts {
                checked += 1;
                let (id, drift) = match verdict {
                    Ok(Some(d)) => d,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "reconcile stopped: cannot look up the server's accounts");
                        return;
                    }
                };
                let reason = match drift {
                    Drift::Missing => {
                        missing += 1;
                        "reconcile: missing on server"
                    }
                    Drift::Stale => {
                        stale += 1;
                        "reconcile: server serves another JWT"
                    }
                };
                if let Err(e) = db::outbox::enqueue_coalesced(&self.pool, id, reason).await {
                    tracing::warn!(error = %e, "reconcile cannot queue a push; retrying next time");
                }
            }
        }
        if missing + stale > 0 {
            tracing::info!(
                checked,
                missing,
                stale,
                took = ?started.elapsed(),
                "reconcile queued accounts the server does not serve as recorded"
            );
        } else {
            tracing::debug!(checked, took = ?started.elapsed(), "reconcile: the server serves every account as recorded");
        }
    }
}

/// Accounts read per reconcile query.
const RECONCILE_BATCH: i64 = 500;
/// `CLAIMS.LOOKUP` requests in flight during a reconcile.
const RECONCILE_CONCURRENCY: usize = 32;

enum Drift {
    Missing,
    Stale,
}

fn backoff(attempts: i32) -> Duration {
    let exp = attempts.clamp(1, 8) as u32;
    Duration::from_millis(250 * 2u64.pow(exp - 1)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(super::backoff(1).as_millis(), 250);
        assert_eq!(super::backoff(2).as_millis(), 500);
        assert!(super::backoff(100) <= std::time::Duration::from_secs(30));
    }
}
