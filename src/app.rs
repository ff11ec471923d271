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
use crate::callout::permissions::Defaults;
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
    #[error("cannot start the NATS client: {0}")]
    Nats(String),
    #[error("cannot encrypt the seeds stored in plain text: {0}")]
    Seeds(crate::db::seeds::ReencryptError),
    #[error("cannot listen for HTTP on {0}: {1} (set --http-listen to another address, or `off`)")]
    Http(std::net::SocketAddr, std::io::Error),
    #[error("the auth callout cannot subscribe: {0}")]
    Subscribe(String),
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
    sys_client: Client,
    sync: Option<Sync>,
    nats_connected: watch::Receiver<u64>,
    metrics: Metrics,
    http: Option<tokio::net::TcpListener>,
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

/// Connection options for a user identified by a JWT and its nkey. The client keeps
/// reconnecting forever: the service must outlive any nats-server restart.
fn connect_options(
    name: &str,
    jwt: String,
    key: KeyPair,
    events: Option<watch::Sender<u64>>,
) -> ConnectOptions {
    let key = Arc::new(key);
    let label = name.to_owned();
    ConnectOptions::with_jwt(jwt, move |nonce| {
        let key = key.clone();
        async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
    })
    .name(name)
    .retry_on_initial_connect()
    .max_reconnects(None)
    .connection_timeout(Duration::from_secs(3))
    .request_timeout(Some(Duration::from_secs(5)))
    .event_callback(move |event| {
        let events = events.clone();
        let label = label.clone();
        async move {
            match &event {
                Event::Connected => {
                    tracing::info!(connection = %label, "connected to NATS");
                    if let Some(tx) = events {
                        tx.send_modify(|n| *n += 1);
                    }
                }
                Event::Disconnected => {
                    tracing::warn!(connection = %label, "disconnected from NATS; reconnecting")
                }
                other => tracing::info!(connection = %label, event = %other, "NATS event"),
            }
        }
    })
}

impl Application {
    pub async fn build(config: ServeConfig) -> Result<Self, AppError> {
        let args = &config.args;
        let addrs = nats_addrs(&args.nats_url)?;
        let pool = db::connect(&config.database_url, args.db_pool_size).await?;
        db::migrate(&pool).await?;
        let identities = ServiceIdentities::load(&pool).await?;
        check_seeds(&pool, &config.cipher, &identities).await?;
        if config.cipher.has_key() {
            // Seeds written before a key was configured (or by pb-nats) get encrypted now.
            let n = crate::db::seeds::reencrypt(&pool, &config.cipher, &config.cipher, true)
                .await
                .map_err(AppError::Seeds)?;
            if n > 0 {
                tracing::info!(seeds = n, "encrypted seeds that were stored in plain text");
            }
        }

        let metrics = Metrics::default();
        let auth = AuthIdentity {
            account_public_key: identities.public_key(IdentityKind::AuthAccount).to_owned(),
            signer: identities.keypair(&config.cipher, IdentityKind::AuthAccount)?,
            xkey: identities.xkey(&config.cipher)?,
        };
        let settings = CalloutSettings {
            default_ttl: args.default_ttl,
            max_ttl: args.max_ttl,
            defaults: Defaults {
                publish: args.default_publish.clone(),
                subscribe: args.default_subscribe.clone(),
            },
            concurrency: args.callout_concurrency,
            hash_threads: args.hash_threads,
            lockout: LockoutSettings {
                failures: args.lockout_failures,
                duration: args.lockout_duration,
            },
        };
        let callout = Callout::with_cache(
            pool.clone(),
            auth,
            config.cipher.clone(),
            settings,
            args.cache_settings(),
            metrics.clone(),
        );

        let service_user = identities.keypair(&config.cipher, IdentityKind::ServiceUser)?;
        let callout_client = connect_options(
            "nats-pg-auth callout",
            identities.jwt(IdentityKind::ServiceUser).to_owned(),
            service_user,
            None,
        )
        .connect(addrs.clone())
        .await
        .map_err(|e| AppError::Nats(e.to_string()))?;

        let (tx, nats_connected) = watch::channel(0u64);
        let sys_user = identities.keypair(&config.cipher, IdentityKind::SysUser)?;
        let sys_client = connect_options(
            "nats-pg-auth system",
            identities.jwt(IdentityKind::SysUser).to_owned(),
            sys_user,
            Some(tx),
        )
        .connect(addrs)
        .await
        .map_err(|e| AppError::Nats(e.to_string()))?;

        let sync = if args.sync {
            let system_accounts = BTreeSet::from([
                identities.public_key(IdentityKind::SysAccount).to_owned(),
                identities.public_key(IdentityKind::AuthAccount).to_owned(),
            ]);
            Some(
                Sync::new(
                    pool.clone(),
                    config.cipher.clone(),
                    identities.keypair(&config.cipher, IdentityKind::OperatorSigning)?,
                    system_accounts,
                    sys_client.clone(),
                    SyncSettings {
                        database_url: config.database_url.clone(),
                        reconcile_interval: args.reconcile_interval,
                        push_timeout: Duration::from_secs(5),
                        parallelism: 32,
                        signing_key_grace: args.max_ttl,
                    },
                    metrics.clone(),
                )
                .with_sessions(crate::sessions::Sessions::new(
                    pool.clone(),
                    sys_client.clone(),
                    args.kicks_per_second,
                )),
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
            sys_client,
            sync,
            nats_connected,
            metrics,
            http,
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

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let callout = tokio::spawn(
            self.callout
                .clone()
                .run(self.callout_client.clone(), shutdown.clone()),
        );
        let sync = self
            .sync
            .map(|sync| tokio::spawn(sync.run(self.nats_connected, shutdown.clone())));
        if let Some(listener) = self.http {
            let probes = crate::http::Probes {
                metrics: self.metrics.clone(),
                pool: self.pool.clone(),
                callout: self.callout_client.clone(),
                system: self.sys_client.clone(),
                cache: Some(self.callout.cache().clone()),
            };
            tokio::spawn(crate::http::serve(listener, probes, shutdown.clone()));
        }
        shutdown.cancelled().await;
        tracing::info!("shutting down: finishing in-flight requests");
        let grace = Duration::from_secs(5);
        let result = match tokio::time::timeout(grace, callout).await {
            Ok(Ok(Err(e))) => Err(AppError::Subscribe(e.to_string())),
            _ => Ok(()),
        };
        if let Some(sync) = sync {
            let _ = tokio::time::timeout(grace, sync).await;
        }
        let _ = self.callout_client.drain().await;
        let _ = self.sys_client.drain().await;
        self.pool.close().await;
        result
    }
}

/// A wrong or missing key must fail at startup with one clear line, never at login time.
async fn check_seeds(
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
