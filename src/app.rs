//! Wiring of `serve`: Postgres pool, the two NATS connections, the callout and the sync.
//!
//! `Application::build` does everything that can fail because of configuration (so `main` can
//! report it in one line before anything runs); `run_until_stopped` runs until the token is
//! cancelled. Tests start the real service in-process through the same two calls.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use nkeys::KeyPair;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::callout::lockout::LockoutSettings;
use crate::callout::{AuthIdentity, Callout, CalloutSettings};
use crate::config::ServeArgs;
use crate::db::{self, identities::IdentityKind, DbError};
use crate::init::{InitError, ServiceIdentities};
use crate::keys::{KeyError, SeedCipher};
use crate::metrics::Metrics;
use crate::sync::{Sync, SyncSettings};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error("cannot open the service's keys: {0}. Is NATS_PG_AUTH_ENCRYPTION_KEY the key the database was written with?")]
    Key(#[from] KeyError),
    #[error("invalid NATS_URL {url:?}: {reason}")]
    NatsUrl { url: String, reason: String },
    #[error("{0}")]
    NatsTls(String),
    #[error("cannot start the NATS client: {0}")]
    Nats(String),
    #[error("cannot seal the stored seeds with the current encryption key: {0}")]
    Seeds(crate::db::seeds::ReencryptError),
    /// The stored seeds do not open with the configured keys: how many, under which key ids,
    /// and the command that fixes it ([`crate::db::seeds::Census::explain`]).
    #[error("cannot open the stored seeds: {0}")]
    SeedKeys(String),
    #[error("cannot listen for HTTP on {0}: {1} (set --http-listen to another address, or `off`)")]
    Http(std::net::SocketAddr, std::io::Error),
    #[error("the auth callout cannot subscribe: {0}")]
    Subscribe(String),
    /// An essential task (callout, sync, HTTP) ended while nobody asked it to.
    #[error("{0}")]
    TaskDied(String),
}

/// Everything `serve` needs, already validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub database_url: String,
    pub cipher: SeedCipher,
    pub args: ServeArgs,
}

pub struct Application {
    pool: PgPool,
    callout: Arc<Callout>,
    callout_client: Client,
    /// The connections answers go out on (`--reply-connections`).
    reply_clients: Vec<Client>,
    sys_client: Client,
    sync: Option<Sync>,
    nats_connected: watch::Receiver<u64>,
    metrics: Metrics,
    http: Option<tokio::net::TcpListener>,
    shutdown_timeout: Duration,
    /// Cancelled when the NATS connections are closed on purpose (no "reconnecting" warning).
    closing: CancellationToken,
    /// Keeps the login copy's sealed snapshot (`--snapshot-dir`).
    snapshot_writer: Option<crate::copy::snapshot::Writer>,
    /// This replica's name (`--replica-name`) and whether it runs the sync, for its row in
    /// `nats.replicas`.
    replica: String,
    runs_sync: bool,
    /// Whether this replica's at-rest key is still the database's, and the cipher it checks.
    key_watch: (crate::key_watch::KeyWatch, SeedCipher),
}

fn nats_addrs(url: &str) -> Result<Vec<ServerAddr>, AppError> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>().map_err(|e| AppError::NatsUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err(AppError::NatsUrl {
                    url: url.to_owned(),
                    reason: "no server given".into(),
                })
            } else {
                Ok(v)
            }
        })
}

/// Options that log in as the user of `jwt`, signing the server's nonce with its nkey (every
/// connection the service or the CLI makes as one of its own users).
pub(crate) fn jwt_login(jwt: String, key: KeyPair) -> ConnectOptions {
    let key = Arc::new(key);
    ConnectOptions::with_jwt(jwt, move |nonce| {
        let key = key.clone();
        async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
    })
}

/// Connects as a user identified by a JWT and its nkey. The client keeps reconnecting forever:
/// the service must outlive any nats-server restart.
async fn connect(
    (tls, addrs): (&crate::config::NatsTlsArgs, &[ServerAddr]),
    name: &str,
    (jwt, key): (String, KeyPair),
    events: Option<watch::Sender<u64>>,
    closing: CancellationToken,
) -> Result<Client, AppError> {
    let label = name.to_owned();
    tls.apply(jwt_login(jwt, key))
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(3))
        .request_timeout(Some(Duration::from_secs(5)))
        .event_callback(move |event| {
            let events = events.clone();
            let label = label.clone();
            let closing = closing.clone();
            async move {
                match &event {
                    Event::Connected => {
                        tracing::info!(connection = %label, "connected to NATS");
                        if let Some(tx) = events {
                            tx.send_modify(|n| *n += 1);
                        }
                    }
                    Event::Disconnected if closing.is_cancelled() => {
                        tracing::debug!(connection = %label, "closed the NATS connection")
                    }
                    Event::Disconnected => {
                        tracing::warn!(connection = %label, "disconnected from NATS; reconnecting")
                    }
                    // Each failed (re)connect attempt: the callout says once, at WARN, that NATS
                    // is unreachable; repeating it every attempt would flood the log.
                    Event::ClientError(_) => {
                        tracing::debug!(connection = %label, event = %event, "NATS event")
                    }
                    other => tracing::info!(connection = %label, event = %other, "NATS event"),
                }
            }
        })
        .connect(addrs)
        .await
        .map_err(|e| AppError::Nats(e.to_string()))
}

/// The JetStream snapshot's account, when `--snapshot-jetstream` is on and there is an
/// encryption key to derive it from (without one no snapshot is kept anywhere).
fn snapshot_account(
    args: &crate::config::ServeArgs,
    cipher: &crate::keys::SeedCipher,
) -> Option<crate::copy::snapshot_jetstream::SnapshotAccount> {
    if !args.snapshot_jetstream {
        return None;
    }
    crate::copy::snapshot_jetstream::SnapshotAccount::derive(cipher)
}

impl Application {
    pub async fn build(config: ServeConfig) -> Result<Self, AppError> {
        let args = &config.args;
        let addrs = nats_addrs(&args.nats_url)?;
        // `main` validated already; in-process callers (tests) get the same one-line error.
        args.nats_tls
            .validate()
            .map_err(|e| AppError::NatsTls(e.to_string()))?;
        let (pool, snapshot) =
            match db::connect_service(&config.database_url, args.db_pool_size).await {
                Ok(pool) => (pool, None),
                // Postgres unreachable at start: the newest snapshot that opens, or fail as before.
                Err(unreachable @ DbError::Unreachable { .. }) => {
                    let cipher = config.cipher.refusing_plain();
                    let account = snapshot_account(args, &cipher);
                    let jetstream =
                        account
                            .as_ref()
                            .map(|account| crate::copy::snapshot::JetStreamSource {
                                account,
                                addrs: &addrs,
                                tls: &args.nats_tls,
                            });
                    let Some(opened) = crate::copy::snapshot::open_at_start(
                        args.snapshot_dir.as_deref(),
                        jetstream,
                        &cipher,
                    )
                    .await
                    else {
                        return Err(unreachable.into());
                    };
                    let pool = db::connect_service_lazy(&config.database_url, args.db_pool_size)?;
                    (pool, Some((opened, unreachable)))
                }
                Err(e) => return Err(e.into()),
            };
        let identities = match &snapshot {
            None => {
                db::ensure_migrated(&pool).await?;
                ServiceIdentities::load(&pool).await?
            }
            Some((opened, _)) => ServiceIdentities::from_rows(opened.identities.clone())?,
        };
        if snapshot.is_none() {
            check_seeds(&pool, &config.cipher, &identities).await?;
        }
        if config.cipher.has_key() && snapshot.is_none() {
            // Seeds of a keyless start (or pb-nats) get encrypted the first time a key is
            // configured. Once seeds are encrypted, a plain one was written by someone else: it
            // is left as it is and refused at use.
            match crate::db::seeds::encrypt_keyless_start(&pool, &config.cipher)
                .await
                .map_err(AppError::Seeds)?
            {
                crate::db::seeds::PlainSeeds::Encrypted(0) => {}
                crate::db::seeds::PlainSeeds::Encrypted(n) => {
                    tracing::info!(seeds = n, "encrypted seeds that were stored in plain text")
                }
                crate::db::seeds::PlainSeeds::Foreign(keys) => tracing::warn!(
                    public_keys = %keys.join(","),
                    "{} seed(s) are stored in plain text although the others are encrypted: this service did not write them; they are not encrypted and not used (delete them, or encrypt them with `nats-pg-auth rotate-encryption-key` if they were written on purpose)",
                    keys.len()
                ),
            }
            // A rotation in progress (`--old-encryption-key`): what is still under the old key
            // is sealed with the current one.
            let n = crate::db::seeds::reseal_previous_key(&pool, &config.cipher)
                .await
                .map_err(AppError::Seeds)?;
            if n > 0 {
                tracing::info!(
                    seeds = n,
                    "sealed seeds with the current encryption key (they were under --old-encryption-key)"
                );
            }
        }
        // From here on every seed is opened by a cipher that refuses plain seeds when it has a
        // key: the service itself never writes one then.
        let cipher = config.cipher.refusing_plain();
        let identities = match &snapshot {
            None => {
                let identities = ServiceIdentities::load(&pool).await?;
                check_seeds(&pool, &cipher, &identities).await?;
                identities
            }
            Some(_) => identities,
        };

        // A key that is no longer the database's (a rotation this replica did not follow) seals
        // nothing: see crate::key_watch. Checked now, then every few seconds.
        let key_watch = crate::key_watch::KeyWatch::default();
        if snapshot.is_none() {
            let found = crate::db::seeds::superseded_by(&pool, &cipher)
                .await
                .map_err(DbError::from)?;
            key_watch.record(&cipher, found);
        }
        match cipher.key_id() {
            Some(id) => {
                tracing::info!(key_id = id, "seeds are sealed with the encryption key of this id")
            }
            // Said once, once the seeds were found readable without a key (a database whose
            // seeds are encrypted stops above with its own line): a deployment without a key is
            // legal (a dev stack) but must not be one by accident.
            None => tracing::warn!("no encryption key (NATS_PG_AUTH_ENCRYPTION_KEY / --encryption-key-file): the seeds of the operator, the accounts and the service users are stored in PLAIN TEXT in nats.service_identities and nats.account_keys; anyone who can read a pg_dump or those tables can sign as them. Generate a key with `nats-pg-auth generate-key` and restart with it: the seeds are encrypted at that start"),
        }

        let metrics = Metrics::default();
        let closing = CancellationToken::new();
        let auth = AuthIdentity {
            account_public_key: identities.public_key(IdentityKind::AuthAccount).to_owned(),
            signer: identities.keypair(&cipher, IdentityKind::AuthAccount)?,
            xkey: identities.xkey(&cipher)?,
        };
        // Issued again rather than read from the database: `init` of an older release gave the
        // service user fewer rights than this one needs (the lag probe).
        let service_jwt = crate::init::service_user_jwt(
            identities.public_key(IdentityKind::ServiceUser),
            &auth.signer,
            0,
        )?;
        let settings = CalloutSettings {
            default_ttl: args.login.default_ttl,
            max_ttl: args.login.max_ttl,
            defaults: args.login.permissions(),
            concurrency: args.callout_concurrency,
            hash_threads: args.hash_threads,
            hash_limits: args.hash_limits(),
            lockout: LockoutSettings {
                failures: args.lockout_failures,
                duration: args.lockout_duration,
            },
            clock_skew: args.clock_skew,
            replica: crate::replica::name(args.replica_name.as_deref()),
            auth_timeout: args.auth_timeout,
            shed_expired: !args.no_shedding,
        };
        let callout = Callout::with_cache(
            pool.clone(),
            auth,
            cipher.clone(),
            settings,
            args.cache_settings(),
            metrics.clone(),
        );

        if let Some((opened, unreachable)) = snapshot {
            if !crate::copy::snapshot::install_at_start(&opened, callout.cache()) {
                return Err(unreachable.into());
            }
        }

        let nats = (&args.nats_tls, addrs.as_slice());
        let service_user = || -> Result<_, AppError> {
            Ok((
                service_jwt.clone(),
                identities.keypair(&cipher, IdentityKind::ServiceUser)?,
            ))
        };
        let callout_client = connect(
            nats,
            "nats-pg-auth callout",
            service_user()?,
            None,
            closing.clone(),
        )
        .await?;

        let mut reply_clients = Vec::with_capacity(args.reply_connections);
        for i in 1..=args.reply_connections {
            let name = format!("nats-pg-auth reply {i}");
            reply_clients.push(connect(nats, &name, service_user()?, None, closing.clone()).await?);
        }

        let (tx, nats_connected) = watch::channel(0u64);
        let sys_client = connect(
            nats,
            "nats-pg-auth system",
            (
                identities.jwt(IdentityKind::SysUser).to_owned(),
                identities.keypair(&cipher, IdentityKind::SysUser)?,
            ),
            Some(tx),
            closing.clone(),
        )
        .await?;

        // The snapshot: in --snapshot-dir (every replica) and in JetStream (the sync leader).
        let jetstream = match snapshot_account(args, &cipher) {
            Some(account) if args.sync => {
                Some(Arc::new(crate::copy::snapshot_jetstream::Publisher::new(
                    account,
                    addrs.clone(),
                    args.nats_tls.clone(),
                    usize::from(args.snapshot_replicas),
                    sys_client.clone(),
                    Arc::new(identities.keypair(&cipher, IdentityKind::OperatorSigning)?),
                    pool.clone(),
                    cipher.clone(),
                    metrics.clone(),
                )))
            }
            _ => None,
        };
        let snapshot_writer = (args.snapshot_dir.is_some() || jetstream.is_some()).then(|| {
            crate::copy::snapshot::Writer {
                dir: args.snapshot_dir.clone(),
                every: crate::copy::snapshot::REWRITE_EVERY,
                cipher: cipher.clone(),
                operator: identities.public_key(IdentityKind::Operator).to_owned(),
                identities: IdentityKind::ALL
                    .iter()
                    .map(|k| identities.get(*k).clone())
                    .collect(),
                jetstream,
            }
        });

        let sync = if args.sync {
            let mut system_accounts = BTreeSet::from([
                identities.public_key(IdentityKind::SysAccount).to_owned(),
                identities.public_key(IdentityKind::AuthAccount).to_owned(),
            ]);
            // The snapshot account is the service's too: never deleted by an outbox row.
            if let Some(account) = crate::copy::snapshot_jetstream::SnapshotAccount::derive(&cipher)
            {
                system_accounts.insert(account.public_key());
            }
            Some(
                Sync::new(
                    pool.clone(),
                    cipher.clone(),
                    identities.keypair(&cipher, IdentityKind::OperatorSigning)?,
                    system_accounts,
                    sys_client.clone(),
                    SyncSettings {
                        database_url: config.database_url.clone(),
                        reconcile_interval: args.reconcile_interval,
                        push_timeout: Duration::from_secs(5),
                        parallelism: 32,
                        signing_key_grace: args.login.max_ttl,
                    },
                    metrics.clone(),
                )
                .with_sessions(
                    crate::sessions::Sessions::new(
                        pool.clone(),
                        sys_client.clone(),
                        args.kicks_per_second,
                    )
                    .with_copy(callout.cache().clone()),
                )
                .with_key_watch(key_watch.clone()),
            )
        } else {
            None
        };
        let http = match args.http_addr() {
            Ok(Some(addr)) => Some(
                crate::http::bind(addr)
                    .await
                    .map_err(|e| AppError::Http(addr, e))?,
            ),
            _ => None,
        };
        Ok(Self {
            pool,
            callout,
            callout_client,
            reply_clients,
            sys_client,
            sync,
            nats_connected,
            metrics,
            http,
            shutdown_timeout: args.shutdown_timeout,
            closing,
            snapshot_writer,
            replica: crate::replica::name(args.replica_name.as_deref()),
            runs_sync: args.sync,
            key_watch: (key_watch, cipher),
        })
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// The callout handler, for driving it with hand-made requests in tests and benchmarks.
    pub fn callout(&self) -> Arc<Callout> {
        self.callout.clone()
    }

    /// Where the HTTP endpoints listen (the real port when `--http-listen` asked for port 0).
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The NATS connection the callout subscribes on (tests close it to end the subscription).
    pub fn callout_client(&self) -> Client {
        self.callout_client.clone()
    }

    /// Runs the callout, the sync and the HTTP endpoints until `shutdown` is cancelled, then
    /// stops within `--shutdown-timeout`: the callout unsubscribes first and answers what it was
    /// already sent, the sync leader releases its lock, replies are flushed, connections closed.
    /// If one of those tasks ends by itself (the callout's subscription closed, a panic), /readyz
    /// fails at once, the rest stops the same way, and the error says which task and why.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let stop = shutdown.child_token();
        let not_ready = Arc::new(std::sync::OnceLock::new());
        let mut tasks = tokio::task::JoinSet::new();
        let mut names = std::collections::HashMap::new();
        let callout = self.callout.clone().run(
            self.callout_client.clone(),
            self.reply_clients.clone(),
            stop.clone(),
        );
        let callout = tasks.spawn(async move { callout.await.map_err(|e| e.to_string()) });
        names.insert(callout.id(), Task::Callout);
        // Not essential either: it only ever stops this replica from sealing.
        let (key_watch, key_cipher) = self.key_watch;
        tokio::spawn(
            key_watch
                .clone()
                .run(self.pool.clone(), key_cipher, stop.clone()),
        );
        // Not essential either: `nats-pg-auth connections` asks it which connections came in
        // from the copy during an outage.
        tokio::spawn(
            self.callout
                .outage_logins()
                .clone()
                .answer(self.sys_client.clone(), stop.clone()),
        );
        if let Some(writer) = self.snapshot_writer {
            // Not essential: a replica without a snapshot still serves (it logs why).
            tokio::spawn(writer.keep_writing(self.callout.cache().clone(), stop.clone()));
        }
        if let Some(sync) = self.sync {
            let sync = sync.run(self.nats_connected, stop.clone());
            let handle = tasks.spawn(async move {
                sync.await;
                Ok(())
            });
            names.insert(handle.id(), Task::Sync);
        }
        // The HTTP endpoints outlive the others, so /readyz answers "stopping" meanwhile.
        let http_stop = CancellationToken::new();
        let probes = crate::http::Probes {
            metrics: self.metrics.clone(),
            pool: self.pool.clone(),
            callout: self.callout_client.clone(),
            system: self.sys_client.clone(),
            cache: Some(self.callout.cache().clone()),
            handler: Some(self.callout.clone()),
            not_ready: not_ready.clone(),
            db_check: Default::default(),
            key_watch: Some(key_watch.clone()),
        };
        // Not essential: the row is for `status`; a replica that cannot write it still serves.
        let heartbeat = tokio::spawn(
            crate::replica::Heartbeat::new(
                self.pool.clone(),
                self.replica.clone(),
                self.runs_sync,
                probes.clone(),
            )
            .run(http_stop.clone()),
        );
        if let Some(listener) = self.http {
            let serve = crate::http::serve(listener, probes, http_stop.clone());
            let handle = tasks.spawn(async move {
                serve.await;
                Ok(())
            });
            names.insert(handle.id(), Task::Http);
        }

        let died = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            Some(done) = tasks.join_next_with_id() => {
                // The sync ends as soon as the token is cancelled: a task that ended because
                // we are stopping did not die.
                if shutdown.is_cancelled() {
                    None
                } else {
                    Some(task_end(&mut names, done))
                }
            }
        };
        let failure = died.map(|(task, why)| {
            let why = why.unwrap_or_else(|| "it returned".to_owned());
            format!(
                "{} stopped unexpectedly: {why}; exiting so that a supervisor restarts this replica",
                task.as_str()
            )
        });
        let timeout = self.shutdown_timeout;
        match &failure {
            Some(f) => {
                tracing::error!("{f}");
                let _ = not_ready.set(f.clone());
            }
            None => {
                tracing::info!(
                    timeout = %humantime::format_duration(timeout),
                    "shutting down: no new callouts, answering those in flight, releasing the sync leadership"
                );
                let _ = not_ready.set("shutting down".to_owned());
            }
        }
        stop.cancel();
        let deadline = tokio::time::Instant::now() + timeout;
        let finished = tokio::time::timeout_at(deadline, async {
            while names.values().any(|t| *t != Task::Http) {
                match tasks.join_next_with_id().await {
                    Some(done) => {
                        if let (task, Some(why)) = task_end(&mut names, done) {
                            tracing::warn!(
                                "{} ended with an error while stopping: {why}",
                                task.as_str()
                            );
                        }
                    }
                    None => break,
                }
            }
        })
        .await;
        if finished.is_err() {
            let left: Vec<&str> = names.values().map(|t| t.as_str()).collect();
            tracing::warn!(
                "{} not finished after --shutdown-timeout {}; exiting anyway",
                left.join(", "),
                humantime::format_duration(timeout)
            );
        }
        http_stop.cancel();
        tasks.abort_all();
        // Replies still buffered go out; then the connections close. Bounded as well: neither
        // NATS nor Postgres need be reachable now.
        let grace = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(500));
        self.closing.cancel();
        let _ = tokio::time::timeout(grace, async {
            // Meanwhile the replica's row goes (once its heartbeat, stopped with the HTTP
            // endpoints, has finished its last write), so `status` does not count a replica that
            // stopped on purpose as one not heard from.
            let deregister = async {
                let _ = heartbeat.await;
                crate::replica::Heartbeat::deregister(&self.pool, &self.replica).await;
            };
            let drain = async {
                let _ = self.callout_client.drain().await;
                for client in &self.reply_clients {
                    let _ = client.drain().await;
                }
                let _ = self.sys_client.drain().await;
            };
            tokio::join!(deregister, drain);
            self.pool.close().await;
        })
        .await;
        match failure {
            Some(f) => Err(AppError::TaskDied(f)),
            None => Ok(()),
        }
    }
}

/// The tasks `serve` cannot do without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Callout,
    Sync,
    Http,
}

impl Task {
    fn as_str(self) -> &'static str {
        match self {
            Task::Callout => "the auth callout",
            Task::Sync => "the account sync",
            Task::Http => "the HTTP endpoints",
        }
    }
}

/// Which task ended, and its error or panic, from what the join set returned.
fn task_end(
    names: &mut std::collections::HashMap<tokio::task::Id, Task>,
    done: Result<(tokio::task::Id, Result<(), String>), tokio::task::JoinError>,
) -> (Task, Option<String>) {
    let (id, result) = match done {
        Ok((id, Ok(()))) => (id, None),
        Ok((id, Err(e))) => (id, Some(e)),
        Err(e) => {
            let id = e.id();
            let why = if e.is_panic() {
                let panic = e.into_panic();
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown payload".to_owned());
                format!("it panicked: {text}")
            } else {
                "it was cancelled".to_owned()
            };
            (id, Some(why))
        }
    };
    let task = names.remove(&id).unwrap_or(Task::Callout);
    (task, result)
}

/// A wrong or missing key must fail at startup with one clear line, never at login time. When
/// the seeds are under other keys, the line counts them per key id and says what fixes it.
async fn check_seeds(
    pool: &PgPool,
    cipher: &SeedCipher,
    identities: &ServiceIdentities,
) -> Result<(), AppError> {
    use crate::keys::KeyErrorKind as K;
    match try_seeds(pool, cipher, identities).await {
        Err(AppError::Key(e)) if matches!(e.kind(), K::WrongKey | K::OtherKey | K::MissingKey) => {
            let census = crate::db::seeds::census(pool, cipher)
                .await
                .map_err(DbError::from)?;
            if census.unopenable.is_empty() {
                return Err(AppError::Key(e));
            }
            Err(AppError::SeedKeys(census.explain(cipher)))
        }
        other => other,
    }
}

async fn try_seeds(
    pool: &PgPool,
    cipher: &SeedCipher,
    identities: &ServiceIdentities,
) -> Result<(), AppError> {
    for kind in IdentityKind::ALL {
        let row = identities.get(kind);
        if kind == IdentityKind::AuthXkey {
            identities.xkey(cipher)?;
        } else {
            crate::keys::keypair_from_stored(cipher, &row.seed, &row.public_key)?;
        }
    }
    let sample: Option<(String, String)> = sqlx::query_as(
        "SELECT seed, public_key FROM nats.account_keys WHERE seed LIKE 'enc:%' ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .map_err(DbError::from)?;
    if let Some((seed, pk)) = sample {
        crate::keys::keypair_from_stored(cipher, &seed, &pk)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `run_until_stopped` says when a supervised task ends: which one, and why.
    #[tokio::test]
    async fn an_ended_or_panicking_task_is_named_with_its_reason() {
        let mut set = tokio::task::JoinSet::new();
        let mut names = std::collections::HashMap::new();
        let sync = set.spawn(async {
            if true {
                panic!("boom");
            }
            Ok::<(), String>(())
        });
        names.insert(sync.id(), Task::Sync);
        let done = set.join_next_with_id().await.unwrap();
        assert_eq!(
            task_end(&mut names, done),
            (Task::Sync, Some("it panicked: boom".to_owned()))
        );
        let callout = set.spawn(async { Err("subscription ended".to_owned()) });
        names.insert(callout.id(), Task::Callout);
        let done = set.join_next_with_id().await.unwrap();
        assert_eq!(
            task_end(&mut names, done),
            (Task::Callout, Some("subscription ended".to_owned()))
        );
        let http = set.spawn(async { Ok(()) });
        names.insert(http.id(), Task::Http);
        let done = set.join_next_with_id().await.unwrap();
        assert_eq!(task_end(&mut names, done), (Task::Http, None));
        assert!(names.is_empty());
    }
}
