//! The login copy's sealed snapshot kept in JetStream (`--snapshot-jetstream`, on by default),
//! so that a replica whose pod moved to another node (new nats-server data directory, no local
//! snapshot) still finds one while Postgres is unreachable.
//!
//! ## Where
//! An Object Store bucket ([`BUCKET`]) in an account of the service's own, the **snapshot
//! account**: objects [`OBJECT`] (the sealed snapshot, byte for byte what `--snapshot-dir`
//! holds) and [`CONFIRM_OBJECT`] (its confirmation). Replicated by the NATS cluster:
//! `--snapshot-replicas` (default: as many as the cluster allows, up to 3).
//!
//! ## Why an account of its own, with keys derived from the at-rest key
//! A replica that starts without Postgres and without a local snapshot knows only its flags:
//! the database URL, the NATS URLs and the at-rest key. The service's NATS identities (their
//! seeds) are in Postgres, so it cannot log in as the service user to read a snapshot kept in
//! AUTH. The snapshot account's key and its one user's key are therefore derived from the
//! at-rest key (`SeedCipher::derive`, HMAC-SHA256 under fixed labels): every replica with the
//! key finds the same account and can sign its own user JWT, with nothing else. The account JWT
//! (JetStream on, signed by the operator signing key) is pushed by the sync leader before it
//! writes; the full resolver keeps it on every server and a server with an empty directory
//! fetches it from its peers. SYS cannot hold streams (nats-server refuses JetStream in the
//! system account), and AUTH is left as `init` made it.
//!
//! ## Who can read it
//! Only a client holding the at-rest key can derive the user key or sign a user JWT for the
//! account; the callout never places a tenant there (no tenant account has this key: tenant
//! accounts are the ones in `nats.accounts`, checked before every push), and the account
//! exports nothing. The bytes are sealed anyway (AES-256-GCM with the at-rest key, header as
//! associated data): a copy of the stream, or of a server's store directory, opens nowhere
//! without the key. Rotating the at-rest key moves the snapshot to a new account (the old one
//! keeps its last, unreadable-without-the-old-key snapshot until deleted).
//!
//! ## Who writes
//! The sync leader only (one writer), on the local writer's cadence (`copy::snapshot::Writer`:
//! after each full load, when the copy changed at most every 30 s, a confirmation every 30 s
//! while unchanged). Without JetStream on the servers it says so once and the local directory
//! (if any) is all there is.

use std::time::{Duration, Instant};

use async_nats::jetstream::object_store::{self, ObjectMetadata, ObjectStore};
use async_nats::{Client, ServerAddr};
use nkeys::{KeyPair, KeyPairType};
use tokio::io::AsyncReadExt as _;

use crate::config::NatsTlsArgs;
use crate::jwt::claims::{AccountClaims, AccountLimits, Claims, UserClaims};
use crate::keys::SeedCipher;

/// The Object Store bucket in the snapshot account.
pub const BUCKET: &str = "nats-pg-auth-snapshot";
/// The sealed snapshot (as `copy::snapshot::FILE_NAME` on disk).
pub const OBJECT: &str = "login-copy.snap";
/// Its confirmation (as `login-copy.confirmed` on disk).
pub const CONFIRM_OBJECT: &str = "login-copy.confirmed";
/// Chunks of 512 KiB: a 100 MB snapshot is ~200 acknowledged publishes, below the default
/// 1 MiB max_payload.
const CHUNK: usize = 512 * 1024;
/// The account JWT's `iat`: fixed, so the same key gives the same JWT (same `jti`) every time
/// the leader pushes it and the resolvers have nothing to sync. Raise it when the claims change.
const ACCOUNT_JWT_IAT: i64 = 1_796_000_000;
/// Bounds each step (connect, a request) of reading the snapshot at start.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the JetStream snapshot could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to NATS as the snapshot account: {0}")]
    Connect(String),
    #[error("JetStream is not enabled on the NATS server for the snapshot account ({0})")]
    NotEnabled(String),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("cannot push the snapshot account's JWT: {0}")]
    Push(String),
    #[error("cannot sign the snapshot account's JWTs: {0}")]
    Jwt(String),
    #[error("timed out reading the snapshot from JetStream")]
    Timeout,
}

/// The error and its sources, one line (async-nats puts the server's answer in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// A JetStream error as a [`StoreError`]: "not enabled" (no JetStream on the server, or not for
/// this account) apart, so the caller can say it once and fall back.
fn classify(e: &dyn std::error::Error) -> StoreError {
    let text = chain(e);
    let lower = text.to_ascii_lowercase();
    if lower.contains("not enabled") || lower.contains("no responders") {
        StoreError::NotEnabled(text)
    } else {
        StoreError::JetStream(text)
    }
}

fn is_not_found(e: &dyn std::error::Error) -> bool {
    chain(e).to_ascii_lowercase().contains("not found")
}

/// The snapshot account and its user, derived from the at-rest key.
pub struct SnapshotAccount {
    account: KeyPair,
    user: KeyPair,
}

impl SnapshotAccount {
    /// None without an at-rest key (no snapshot is kept then).
    pub fn derive(cipher: &SeedCipher) -> Option<SnapshotAccount> {
        let account = cipher.derive("nats-pg-auth snapshot account v1")?;
        let user = cipher.derive("nats-pg-auth snapshot user v1")?;
        Some(SnapshotAccount {
            account: KeyPair::new_from_raw(KeyPairType::Account, *account).ok()?,
            user: KeyPair::new_from_raw(KeyPairType::User, *user).ok()?,
        })
    }

    pub fn public_key(&self) -> String {
        self.account.public_key()
    }

    /// The account JWT: JetStream on (file storage only), signed by the operator signing key.
    pub fn account_jwt(&self, operator_signing: &KeyPair) -> Result<String, StoreError> {
        let mut nats = AccountClaims {
            limits: AccountLimits {
                mem_storage: 0,
                disk_storage: -1,
                streams: -1,
                consumer: -1,
                ..AccountLimits::default()
            },
            description: Some(
                "nats-pg-auth: the login copy's sealed snapshot (keys derived from the at-rest key)"
                    .into(),
            ),
            ..Default::default()
        };
        nats.limits.leaf = 0;
        let claims = Claims {
            aud: None,
            exp: None,
            jti: String::new(),
            iat: ACCOUNT_JWT_IAT,
            iss: String::new(),
            name: Some("nats-pg-auth-snapshot".into()),
            nbf: None,
            sub: self.account.public_key(),
            nats,
        };
        crate::jwt::encode(&claims, operator_signing).map_err(|e| StoreError::Jwt(e.to_string()))
    }

    fn user_jwt(&self) -> Result<String, StoreError> {
        let mut nats = UserClaims::default();
        nats.limits.subs = -1;
        nats.limits.data = -1;
        nats.limits.payload = -1;
        let claims = Claims {
            aud: None,
            exp: None,
            jti: String::new(),
            iat: crate::jwt::now_unix(),
            iss: String::new(),
            name: Some("nats-pg-auth-snapshot".into()),
            nbf: None,
            sub: self.user.public_key(),
            nats,
        };
        crate::jwt::encode(&claims, &self.account).map_err(|e| StoreError::Jwt(e.to_string()))
    }

    /// A connection as the account's user (no reconnect at start: the caller bounds it).
    pub async fn connect(
        &self,
        addrs: &[ServerAddr],
        tls: &NatsTlsArgs,
        retry: bool,
    ) -> Result<Client, StoreError> {
        let jwt = self.user_jwt()?;
        let seed = self
            .user
            .seed()
            .map_err(|e| StoreError::Jwt(e.to_string()))?;
        let key = KeyPair::from_seed(&seed).map_err(|e| StoreError::Jwt(e.to_string()))?;
        let mut opts = tls
            .apply(crate::app::jwt_login(jwt, key))
            .name("nats-pg-auth snapshot")
            .connection_timeout(Duration::from_secs(3))
            .request_timeout(Some(Duration::from_secs(10)));
        opts = if retry {
            opts.max_reconnects(None)
        } else {
            opts.max_reconnects(Some(1))
        };
        opts.connect(addrs.to_vec())
            .await
            .map_err(|e| StoreError::Connect(chain(&e)))
    }
}

/// The sealed snapshot and its confirmation (if any), as stored.
pub struct Fetched {
    pub snapshot: Vec<u8>,
    pub confirmation: Option<Vec<u8>>,
}

/// Reads one object whole (None: there is none).
pub async fn read_object(bucket: &ObjectStore, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let mut object = match bucket.get(name).await {
        Ok(o) => o,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(classify(&e)),
    };
    let mut out = Vec::with_capacity(object.info().size);
    object
        .read_to_end(&mut out)
        .await
        .map_err(|e| StoreError::JetStream(format!("reading {name}: {e}")))?;
    Ok(Some(out))
}

/// Writes one object in [`CHUNK`]-sized chunks (each acknowledged), then its metadata; the
/// previous version's chunks are purged.
pub async fn put_object(bucket: &ObjectStore, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let meta = ObjectMetadata {
        name: name.into(),
        chunk_size: Some(CHUNK),
        ..Default::default()
    };
    bucket
        .put(meta, &mut &bytes[..])
        .await
        .map(|_| ())
        .map_err(|e| classify(&e))
}

/// Reads the snapshot from JetStream (at start, Postgres unreachable). Ok(None): there is none.
pub async fn fetch(
    account: &SnapshotAccount,
    addrs: &[ServerAddr],
    tls: &NatsTlsArgs,
) -> Result<Option<Fetched>, StoreError> {
    let client = tokio::time::timeout(STEP_TIMEOUT, account.connect(addrs, tls, false))
        .await
        .map_err(|_| StoreError::Timeout)??;
    let read = async {
        let js = async_nats::jetstream::new(client.clone());
        let bucket = match js.get_object_store(BUCKET).await {
            Ok(b) => b,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(classify(&e)),
        };
        let Some(snapshot) = read_object(&bucket, OBJECT).await? else {
            return Ok(None);
        };
        let confirmation = read_object(&bucket, CONFIRM_OBJECT).await.ok().flatten();
        Ok(Some(Fetched {
            snapshot,
            confirmation,
        }))
    };
    // A 100 MB snapshot reads in about a second on loopback; a minute bounds a slow network.
    let out = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .map_err(|_| StoreError::Timeout)?;
    let _ = client.drain().await;
    out
}

/// Writes the snapshot into JetStream, on the sync leader.
pub struct Publisher {
    pub account: SnapshotAccount,
    pub addrs: Vec<ServerAddr>,
    pub tls: NatsTlsArgs,
    /// 0: as many as the cluster allows, up to 3.
    pub replicas: usize,
    /// The system account's connection (pushes the account JWT).
    pub system: Client,
    /// The operator signing key at start; the current one is read from Postgres before each
    /// push (`rotate-operator-key` replaces it).
    pub operator_signing: std::sync::Arc<KeyPair>,
    pub pool: sqlx::PgPool,
    pub cipher: SeedCipher,
    pub metrics: crate::metrics::Metrics,
    bucket: tokio::sync::Mutex<Option<(Client, ObjectStore)>>,
}

/// What one put cost.
#[derive(Debug, Clone, Copy)]
pub struct Put {
    pub bytes: usize,
    pub took: Duration,
}

impl Publisher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        account: SnapshotAccount,
        addrs: Vec<ServerAddr>,
        tls: NatsTlsArgs,
        replicas: usize,
        system: Client,
        operator_signing: std::sync::Arc<KeyPair>,
        pool: sqlx::PgPool,
        cipher: SeedCipher,
        metrics: crate::metrics::Metrics,
    ) -> Publisher {
        Publisher {
            account,
            addrs,
            tls,
            replicas,
            system,
            operator_signing,
            pool,
            cipher,
            metrics,
            bucket: tokio::sync::Mutex::new(None),
        }
    }

    /// True while this replica is the sync leader (the one writer).
    pub fn leading(&self) -> bool {
        self.metrics.is_leader()
    }

    /// The operator signing key now (after a `rotate-operator-key` it is not the one at start).
    async fn signing_key(&self) -> std::sync::Arc<KeyPair> {
        let row: Result<Option<(String, String)>, _> = sqlx::query_as(
            "SELECT public_key, seed FROM nats.service_identities WHERE kind = 'operator_signing'",
        )
        .fetch_optional(&self.pool)
        .await;
        match row {
            Ok(Some((public_key, seed))) if public_key != self.operator_signing.public_key() => {
                crate::keys::keypair_from_stored(&self.cipher, &seed, &public_key)
                    .map(std::sync::Arc::new)
                    .unwrap_or_else(|_| self.operator_signing.clone())
            }
            _ => self.operator_signing.clone(),
        }
    }

    /// Pushes the account JWT (before every write: it costs one request, and heals a server
    /// that lost it or an operator signing key that changed), then returns the bucket, created
    /// if missing.
    async fn bucket(&self) -> Result<(Client, ObjectStore), StoreError> {
        // A server without JetStream says so in its INFO: no account is pushed to it for nothing.
        if !self.system.server_info().jetstream {
            return Err(StoreError::NotEnabled(
                "the server's INFO says jetstream: false".into(),
            ));
        }
        let jwt = self.account.account_jwt(&*self.signing_key().await)?;
        crate::sync::publish::update(&self.system, &jwt, Duration::from_secs(5))
            .await
            .map_err(|e| StoreError::Push(e.to_string()))?;
        let mut held = self.bucket.lock().await;
        if let Some(b) = held.as_ref() {
            return Ok(b.clone());
        }
        let client = self.account.connect(&self.addrs, &self.tls, true).await?;
        let js = async_nats::jetstream::new(client.clone());
        let bucket = match js.get_object_store(BUCKET).await {
            Ok(b) => b,
            Err(e) if is_not_found(&e) => self.create(&js).await?,
            Err(e) => return Err(classify(&e)),
        };
        *held = Some((client.clone(), bucket.clone()));
        Ok((client, bucket))
    }

    async fn create(&self, js: &async_nats::jetstream::Context) -> Result<ObjectStore, StoreError> {
        let tries: Vec<usize> = match self.replicas {
            0 => vec![3, 2, 1],
            n => vec![n],
        };
        let mut last = None;
        for replicas in tries {
            match js
                .create_object_store(object_store::Config {
                    bucket: BUCKET.into(),
                    description: Some("nats-pg-auth: the login copy's sealed snapshot".into()),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(b) => {
                    tracing::info!(
                        bucket = BUCKET,
                        replicas,
                        "created the JetStream bucket for the login copy's snapshot"
                    );
                    return Ok(b);
                }
                Err(e) => {
                    let e = classify(&e);
                    if matches!(e, StoreError::NotEnabled(_)) {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(StoreError::JetStream("no replica count tried".into())))
    }

    /// Puts `bytes` as `name`. A failure drops the connection (the next put starts over).
    pub async fn put(&self, name: &str, bytes: &[u8]) -> Result<Put, StoreError> {
        let started = Instant::now();
        let result = async {
            let (_, bucket) = self.bucket().await?;
            put_object(&bucket, name, bytes).await
        }
        .await;
        match result {
            Ok(_) => Ok(Put {
                bytes: bytes.len(),
                took: started.elapsed(),
            }),
            Err(e) => {
                if let Some((client, _)) = self.bucket.lock().await.take() {
                    let _ = client.drain().await;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_account_comes_from_the_key_alone() {
        let a = SnapshotAccount::derive(&SeedCipher::new(Some([1; 32]))).unwrap();
        let again = SnapshotAccount::derive(&SeedCipher::new(Some([1; 32]))).unwrap();
        let other = SnapshotAccount::derive(&SeedCipher::new(Some([2; 32]))).unwrap();
        assert_eq!(a.public_key(), again.public_key());
        assert_eq!(a.user.public_key(), again.user.public_key());
        assert_ne!(a.public_key(), other.public_key());
        assert!(a.public_key().starts_with('A') && a.user.public_key().starts_with('U'));
        assert!(SnapshotAccount::derive(&SeedCipher::new(None)).is_none());
        // The same JWT every time (nothing for the resolvers to sync), JetStream on.
        let signing = KeyPair::new_operator();
        let jwt = a.account_jwt(&signing).unwrap();
        assert_eq!(jwt, a.account_jwt(&signing).unwrap());
        let claims: Claims<AccountClaims> = crate::jwt::decode_verified(&jwt).unwrap();
        assert_eq!(claims.sub, a.public_key());
        assert_eq!(claims.nats.limits.disk_storage, -1);
        assert!(claims.nats.exports.is_empty());
    }
}
