//! A sealed snapshot of the login copy, so that a replica that (re)starts while Postgres is
//! unreachable can answer logins (`--snapshot-dir`, `--snapshot-jetstream`).
//!
//! ## What it holds
//! Everything a login answered from the copy needs, and what `serve` needs to start without
//! Postgres: every user (name, password hash, nkey, active flag, MQTT client ids), every login
//! shape (role, account, merged permissions, TTL, the account's signing key **with its seed**),
//! every token (SHA-256, expiry, revocation), every certificate mapping, whether a change of a
//! user or of its credentials was notified and not re-read yet (such entries stay refused after
//! a restore, as in the copy), and the service identities (`nats.service_identities` rows, seeds
//! as stored).
//!
//! ## Format (version 1)
//! `login-copy.snap`: `NPASNAP1` (8 bytes) | operator public key (56) | random snapshot id (16) |
//! taken-at, Unix milliseconds (i64 LE, 8) | nonce (12) | AES-256-GCM(postcard body) + tag (16).
//! Sealed with the at-rest key (`--encryption-key`, the key of the seeds in Postgres), the 88
//! header bytes as associated data: a file whose header, body or tag was changed, or that was
//! sealed under another key, does not open. Without a key nothing is written (the seeds would be
//! on disk in plain text); the replica says so once.
//!
//! `login-copy.confirmed`: `NPASCNF1` | snapshot id (16) | confirmed-at (i64 LE) | nonce | tag
//! (an empty message sealed with the at-rest key; magic, operator public key, id and time as
//! associated data, so the time cannot be moved without the key). Written
//! every 30 s while the copy is current and has not changed since the snapshot: the snapshot was
//! still what Postgres held then, so the outage grace counts from that time, not from the last
//! change (a quiet deployment's snapshot does not age out of `--db-outage-grace`).
//!
//! ## When
//! Only while the copy is current (listener connected, copy loaded from Postgres): after each
//! full load, then when the copy changed, at most every 30 s. Written to a temporary file,
//! fsynced, renamed over the old one, directory fsynced: a crash leaves the old or the new
//! snapshot, never half of one.
//!
//! ## Where
//! In `--snapshot-dir` (every replica that sets it) and, written by the sync leader, in
//! JetStream (`copy::snapshot_jetstream`), the same bytes: a pod moved to another node with an
//! empty directory finds the JetStream one. At start the newer of the two is used.
//!
//! ## Limits
//! Anyone who can write the directory can put back an *older* snapshot sealed with the same key
//! (rollback): protect the directory like the key.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use secrecy::zeroize::Zeroizing;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::callout::login::{Issuer, Login, Shape, Signing};
use crate::callout::permissions::{Lists, Merged, Response};
use crate::copy::snapshot_jetstream::{self, Publisher, SnapshotAccount};
use crate::copy::{CopyExport, ExportedUser, LoginCache};
use crate::db::identities::IdentityRow;
use crate::db::logins::{CertPart, TokenPart};
use crate::keys::{SeedCipher, NONCE_LEN};

/// The snapshot file of a replica, in `--snapshot-dir`.
pub const FILE_NAME: &str = "login-copy.snap";
const CONFIRM_NAME: &str = "login-copy.confirmed";
const MAGIC: &[u8; 8] = b"NPASNAP1";
const CONFIRM_MAGIC: &[u8; 8] = b"NPASCNF1";
const OPERATOR_LEN: usize = 56;
const HEADER_LEN: usize = 8 + OPERATOR_LEN + 16 + 8;
const CONFIRM_LEN: usize = 8 + 16 + 8 + NONCE_LEN + 16;
/// A changed copy is rewritten at most this often.
pub const REWRITE_EVERY: Duration = Duration::from_secs(30);

/// Why a snapshot was not written or not used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no snapshot in {0}")]
    None(PathBuf),
    #[error("{0}: not a snapshot of this version")]
    NotASnapshot(PathBuf),
    #[error("{0}: cannot be opened with the configured encryption key (another key, or the file was altered); not used")]
    Sealed(PathBuf),
    #[error("{0}: opened but its content is malformed ({1}); not used")]
    Malformed(PathBuf, String),
    #[error(
        "no encryption key configured: a snapshot holds signing seeds and is only kept sealed"
    )]
    NoKey,
    #[error("the operator public key {0:?} is not a 56-character nkey")]
    Operator(String),
    #[error("cannot encode the snapshot: {0}")]
    Encode(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---- the body ----------------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct Body<'a> {
    /// First: [`Head`] reads it alone.
    identities: Vec<IdentityRec<'a>>,
    shapes: Vec<ShapeRec<'a>>,
    users: Vec<UserRec<'a>>,
    tokens: Vec<TokenRec>,
    certs: Vec<CertRec<'a>>,
}

/// The first field of [`Body`] alone: what `serve` needs before the copy is decoded.
#[derive(Deserialize)]
struct Head<'a> {
    identities: Vec<IdentityRec<'a>>,
}

#[derive(Serialize, Deserialize)]
struct IdentityRec<'a> {
    kind: Cow<'a, str>,
    name: Cow<'a, str>,
    public_key: Cow<'a, str>,
    /// As stored in Postgres (sealed with the same key when one is configured).
    seed: Cow<'a, str>,
    jwt: Option<Cow<'a, str>>,
}

#[derive(Serialize, Deserialize)]
enum SigningRec<'a> {
    Ready {
        account: Cow<'a, str>,
        public_key: Cow<'a, str>,
        /// Short-lived (the body buffers are zeroed; the parsed key pair holds it anyway).
        seed: String,
    },
    NotReady,
    Unusable(Cow<'a, str>),
}

#[derive(Serialize, Deserialize)]
struct ShapeRec<'a> {
    role_id: Option<i64>,
    account_id: i64,
    account_name: Cow<'a, str>,
    account_active: bool,
    account_jetstream_disk: bool,
    foreign_role: bool,
    allowed_sources: Option<Vec<String>>,
    allowed_connection_types: Option<Cow<'a, [String]>>,
    signing: SigningRec<'a>,
    publish: (Cow<'a, [String]>, Cow<'a, [String]>),
    subscribe: (Cow<'a, [String]>, Cow<'a, [String]>),
    response: Option<(i64, Duration)>,
    limits: (i64, i64, i64),
    ttl: Duration,
    signing_key_pending: bool,
}

#[derive(Serialize, Deserialize)]
struct UserRec<'a> {
    id: i64,
    name: Cow<'a, str>,
    password_hash: Option<Cow<'a, str>>,
    nkey: Option<Cow<'a, str>>,
    active: bool,
    mqtt_client_ids: Vec<Cow<'a, str>>,
    shape: u32,
    user_stale: bool,
    credentials_stale: bool,
}

#[derive(Serialize, Deserialize)]
struct TokenRec {
    user_id: i64,
    token_id: i64,
    sha256: [u8; 32],
    /// Unix microseconds.
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct CertRec<'a> {
    user_id: i64,
    cert_id: i64,
    fingerprint: Option<[u8; 32]>,
    subject_dn: Option<Cow<'a, str>>,
    san: Option<Cow<'a, str>>,
}

fn micros(t: Option<chrono::DateTime<chrono::Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_micros())
}

fn from_micros(t: Option<i64>) -> Option<chrono::DateTime<chrono::Utc>> {
    t.and_then(chrono::DateTime::from_timestamp_micros)
}

fn shape_rec(s: &Shape) -> ShapeRec<'_> {
    ShapeRec {
        role_id: s.role_id,
        account_id: s.account_id,
        account_name: Cow::Borrowed(&s.account_name),
        account_active: s.account_active,
        account_jetstream_disk: s.account_jetstream_disk,
        foreign_role: s.foreign_role,
        allowed_sources: s
            .allowed_sources
            .as_ref()
            .map(|v| v.iter().map(|n| n.to_string()).collect()),
        allowed_connection_types: s.allowed_connection_types.as_deref().map(Cow::Borrowed),
        signing: match &s.signing {
            Signing::Ready(i) => match i.keypair.seed() {
                Ok(seed) => SigningRec::Ready {
                    account: Cow::Borrowed(&i.account),
                    public_key: Cow::Borrowed(&i.signing_public_key),
                    seed,
                },
                Err(_) => SigningRec::Unusable(Cow::Borrowed("signing key without seed")),
            },
            Signing::NotReady => SigningRec::NotReady,
            Signing::Unusable(why) => SigningRec::Unusable(Cow::Borrowed(why)),
        },
        publish: (
            Cow::Borrowed(&s.merged.publish.allow),
            Cow::Borrowed(&s.merged.publish.deny),
        ),
        subscribe: (
            Cow::Borrowed(&s.merged.subscribe.allow),
            Cow::Borrowed(&s.merged.subscribe.deny),
        ),
        response: s.merged.response.map(|r| (r.max, r.ttl)),
        limits: (
            s.merged.max_subscriptions,
            s.merged.max_data,
            s.merged.max_payload,
        ),
        ttl: s.ttl,
        signing_key_pending: s.signing_key_pending,
    }
}

/// The plain body of a snapshot of `copy` (seeds included: seal it before it leaves memory).
fn encode(
    copy: &CopyExport,
    identities: &[IdentityRow],
) -> Result<Zeroizing<Vec<u8>>, SnapshotError> {
    let mut shape_ids: HashMap<*const Shape, u32> = HashMap::new();
    let mut shapes = Vec::new();
    let mut users = Vec::with_capacity(copy.users.len());
    for u in &copy.users {
        let l = &u.login;
        let shape = *shape_ids.entry(Arc::as_ptr(&l.shape)).or_insert_with(|| {
            shapes.push(shape_rec(&l.shape));
            (shapes.len() - 1) as u32
        });
        users.push(UserRec {
            id: l.user_id,
            name: Cow::Borrowed(&l.username),
            password_hash: l.password_hash.as_deref().map(Cow::Borrowed),
            nkey: l.nkey.as_deref().map(Cow::Borrowed),
            active: l.user_active,
            mqtt_client_ids: l
                .mqtt_client_ids
                .iter()
                .map(|c| Cow::Borrowed(&**c))
                .collect(),
            shape,
            user_stale: u.user_stale,
            credentials_stale: u.credentials_stale,
        });
    }
    let body = Body {
        identities: identities
            .iter()
            .map(|r| IdentityRec {
                kind: Cow::Borrowed(&r.kind),
                name: Cow::Borrowed(&r.name),
                public_key: Cow::Borrowed(&r.public_key),
                seed: Cow::Borrowed(&r.seed),
                jwt: r.jwt.as_deref().map(Cow::Borrowed),
            })
            .collect(),
        shapes,
        users,
        tokens: copy
            .tokens
            .iter()
            .filter_map(|t| {
                Some(TokenRec {
                    user_id: t.user_id,
                    token_id: t.token_id,
                    sha256: t.token_sha256.as_slice().try_into().ok()?,
                    expires_at: micros(t.token_expires_at),
                    revoked_at: micros(t.token_revoked_at),
                })
            })
            .collect(),
        certs: copy
            .certs
            .iter()
            .map(|c| CertRec {
                user_id: c.user_id,
                cert_id: c.cert_id,
                fingerprint: c
                    .fingerprint_sha256
                    .as_deref()
                    .and_then(|f| f.try_into().ok()),
                subject_dn: c.subject_dn.as_deref().map(Cow::Borrowed),
                san: c.san.as_deref().map(Cow::Borrowed),
            })
            .collect(),
    };
    // Room for the tag, so sealing in place does not reallocate (and leave a plain copy).
    let mut out = Zeroizing::new(Vec::with_capacity(HEADER_LEN + 64 + copy.users.len() * 120));
    postcard::to_io(&body, &mut *out).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    Ok(out)
}

// ---- writing -----------------------------------------------------------------------------------

/// What one write cost.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub bytes: u64,
    pub users: usize,
    pub took: Duration,
}

fn header(operator: &str, id: &[u8; 16], at: SystemTime) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..8 + OPERATOR_LEN].copy_from_slice(operator.as_bytes());
    h[8 + OPERATOR_LEN..8 + OPERATOR_LEN + 16].copy_from_slice(id);
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    h[HEADER_LEN - 8..].copy_from_slice(&ms.to_le_bytes());
    h
}

fn millis_to_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Writes `bytes` to `dir/name` atomically: temporary file (mode 0600), fsync, rename, fsync of
/// the directory.
fn replace_file(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<u64, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let mut bytes = 0u64;
    for p in parts {
        f.write_all(p).map_err(io(&tmp))?;
        bytes += p.len() as u64;
    }
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(bytes)
}

/// A sealed snapshot, as stored (file or JetStream object).
pub struct Sealed {
    pub id: [u8; 16],
    pub bytes: Vec<u8>,
    pub users: usize,
    /// Export not included: encode and seal.
    pub took: Duration,
}

/// Seals `copy` (and the service identities): header | nonce | AES-256-GCM(body) + tag.
pub fn seal(
    cipher: &SeedCipher,
    operator: &str,
    identities: &[IdentityRow],
    copy: &CopyExport,
    taken_at: SystemTime,
) -> Result<Sealed, SnapshotError> {
    use rand::RngCore as _;
    let started = Instant::now();
    if !cipher.has_key() {
        return Err(SnapshotError::NoKey);
    }
    if operator.len() != OPERATOR_LEN || !operator.is_ascii() {
        return Err(SnapshotError::Operator(operator.to_owned()));
    }
    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let head = header(operator, &id, taken_at);
    let mut body = encode(copy, identities)?;
    let nonce = cipher
        .seal_in_place(&mut body, &head)
        .ok_or(SnapshotError::NoKey)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + NONCE_LEN + body.len());
    bytes.extend_from_slice(&head);
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&body);
    Ok(Sealed {
        id,
        bytes,
        users: copy.users.len(),
        took: started.elapsed(),
    })
}

/// Seals `copy` (and the service identities) and writes it to `dir`. Returns the snapshot id
/// (for confirmations) and what the write cost.
pub fn write(
    dir: &Path,
    cipher: &SeedCipher,
    operator: &str,
    identities: &[IdentityRow],
    copy: &CopyExport,
    taken_at: SystemTime,
) -> Result<([u8; 16], Written), SnapshotError> {
    let started = Instant::now();
    let sealed = seal(cipher, operator, identities, copy, taken_at)?;
    let bytes = replace_file(dir, FILE_NAME, &[&sealed.bytes])?;
    Ok((
        sealed.id,
        Written {
            bytes,
            users: sealed.users,
            took: started.elapsed(),
        },
    ))
}

fn confirm_aad(operator: &str, id: &[u8; 16], ms: i64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(8 + OPERATOR_LEN + 24);
    aad.extend_from_slice(CONFIRM_MAGIC);
    aad.extend_from_slice(operator.as_bytes());
    aad.extend_from_slice(id);
    aad.extend_from_slice(&ms.to_le_bytes());
    aad
}

/// The confirmation that the snapshot `id` was still what Postgres held at `at` (as stored).
fn confirm_record(
    cipher: &SeedCipher,
    operator: &str,
    id: &[u8; 16],
    at: SystemTime,
) -> Result<Vec<u8>, SnapshotError> {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    let mut tag = Vec::with_capacity(16);
    let nonce = cipher
        .seal_in_place(&mut tag, &confirm_aad(operator, id, ms))
        .ok_or(SnapshotError::NoKey)?;
    Ok([
        CONFIRM_MAGIC.as_slice(),
        id,
        &ms.to_le_bytes(),
        &nonce,
        &tag,
    ]
    .concat())
}

#[cfg(test)]
/// Records in `dir` that the snapshot `id` was still what Postgres held at `at`.
fn confirm(
    dir: &Path,
    cipher: &SeedCipher,
    operator: &str,
    id: &[u8; 16],
    at: SystemTime,
) -> Result<(), SnapshotError> {
    let record = confirm_record(cipher, operator, id, at)?;
    replace_file(dir, CONFIRM_NAME, &[&record])?;
    Ok(())
}

// ---- reading -----------------------------------------------------------------------------------

/// A snapshot that opened: the service identities and the copy to install.
pub struct Opened {
    pub path: PathBuf,
    /// When the copy was last known to be what Postgres held (taken, or confirmed since).
    pub taken_at: SystemTime,
    pub operator: String,
    pub identities: Vec<IdentityRow>,
    body: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("path", &self.path)
            .field("taken_at", &self.taken_at)
            .finish_non_exhaustive()
    }
}

impl Opened {
    /// How long ago the snapshot was taken (or last confirmed).
    pub fn age(&self) -> Duration {
        self.taken_at.elapsed().unwrap_or_default()
    }

    /// Installs the copy into `cache` (see [`LoginCache::restore`]): users, shapes (their
    /// signing keys parsed from the seeds), tokens, mappings. Returns the number of users, or
    /// None when the snapshot is past `--db-outage-grace`.
    pub fn install(&self, cache: &LoginCache) -> Result<Option<usize>, SnapshotError> {
        let bad = |why: String| SnapshotError::Malformed(self.path.clone(), why);
        let body: Body = postcard::from_bytes(&self.body).map_err(|e| bad(e.to_string()))?;
        let mut shapes = Vec::with_capacity(body.shapes.len());
        for s in body.shapes {
            shapes.push(cache.intern_shape(shape_from(s).map_err(&bad)?));
        }
        let mut users = Vec::with_capacity(body.users.len());
        for u in body.users {
            let shape = shapes
                .get(u.shape as usize)
                .ok_or_else(|| bad(format!("user {} has no shape", u.id)))?
                .clone();
            users.push(ExportedUser {
                login: Arc::new(Login {
                    user_id: u.id,
                    username: Arc::from(&*u.name),
                    password_hash: u.password_hash.map(|h| h.into_owned().into_boxed_str()),
                    nkey: u.nkey.map(|k| k.into_owned().into_boxed_str()),
                    user_active: u.active,
                    mqtt_client_ids: u
                        .mqtt_client_ids
                        .into_iter()
                        .map(|c| c.into_owned().into_boxed_str())
                        .collect(),
                    shape,
                }),
                user_stale: u.user_stale,
                credentials_stale: u.credentials_stale,
            });
        }
        let n = users.len();
        let copy = CopyExport {
            changes: 0,
            users,
            tokens: body
                .tokens
                .into_iter()
                .map(|t| TokenPart {
                    user_id: t.user_id,
                    token_id: t.token_id,
                    token_sha256: t.sha256.to_vec(),
                    token_expires_at: from_micros(t.expires_at),
                    token_revoked_at: from_micros(t.revoked_at),
                })
                .collect(),
            certs: body
                .certs
                .into_iter()
                .map(|c| CertPart {
                    user_id: c.user_id,
                    cert_id: c.cert_id,
                    fingerprint_sha256: c.fingerprint.map(|f| f.to_vec()),
                    subject_dn: c.subject_dn.map(Cow::into_owned),
                    san: c.san.map(Cow::into_owned),
                })
                .collect(),
        };
        Ok(cache.restore(copy, self.taken_at).then_some(n))
    }
}

fn shape_from(s: ShapeRec) -> Result<Shape, String> {
    let signing = match s.signing {
        SigningRec::Ready {
            account,
            public_key,
            seed,
        } => {
            let keypair = nkeys::KeyPair::from_seed(&seed)
                .map_err(|_| format!("the signing seed of {public_key} is not a seed"))?;
            if keypair.public_key() != *public_key {
                return Err(format!("the signing seed of {public_key} is another key's"));
            }
            Signing::Ready(Arc::new(Issuer {
                account: account.into_owned(),
                signing_public_key: public_key.into_owned(),
                keypair,
            }))
        }
        SigningRec::NotReady => Signing::NotReady,
        SigningRec::Unusable(why) => Signing::Unusable(why.into_owned()),
    };
    let allowed_sources = match s.allowed_sources {
        None => None,
        Some(v) => Some(
            v.iter()
                .map(|n| n.parse().map_err(|_| format!("bad network {n:?}")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Shape {
        role_id: s.role_id,
        account_id: s.account_id,
        account_name: s.account_name.into_owned().into_boxed_str(),
        account_active: s.account_active,
        account_jetstream_disk: s.account_jetstream_disk,
        foreign_role: s.foreign_role,
        allowed_sources,
        allowed_connection_types: s.allowed_connection_types.map(Cow::into_owned),
        signing,
        merged: Arc::new(Merged {
            publish: Lists {
                allow: s.publish.0.into_owned(),
                deny: s.publish.1.into_owned(),
            },
            subscribe: Lists {
                allow: s.subscribe.0.into_owned(),
                deny: s.subscribe.1.into_owned(),
            },
            response: s.response.map(|(max, ttl)| Response { max, ttl }),
            max_subscriptions: s.limits.0,
            max_data: s.limits.1,
            max_payload: s.limits.2,
        }),
        ttl: s.ttl,
        signing_key_pending: s.signing_key_pending,
    })
}

/// Opens one snapshot file and applies its confirmation (beside it), if any.
pub fn open(path: &Path, cipher: &SeedCipher) -> Result<Opened, SnapshotError> {
    let data = Zeroizing::new(std::fs::read(path).map_err(io(path))?);
    let confirmation = path
        .parent()
        .and_then(|dir| std::fs::read(dir.join(CONFIRM_NAME)).ok());
    open_bytes(path, data, confirmation.as_deref(), cipher)
}

/// Opens a stored snapshot (`path` names where it came from, for messages) and applies
/// `confirmation` if it confirms this very snapshot under the same key.
pub fn open_bytes(
    path: &Path,
    mut data: Zeroizing<Vec<u8>>,
    confirmation: Option<&[u8]>,
    cipher: &SeedCipher,
) -> Result<Opened, SnapshotError> {
    if data.len() < HEADER_LEN + NONCE_LEN + 16 || &data[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot(path.to_owned()));
    }
    let head: [u8; HEADER_LEN] = data[..HEADER_LEN].try_into().expect("length checked");
    let nonce: [u8; NONCE_LEN] = data[HEADER_LEN..HEADER_LEN + NONCE_LEN]
        .try_into()
        .expect("length checked");
    let mut body = Zeroizing::new(data.split_off(HEADER_LEN + NONCE_LEN));
    if !cipher.open_in_place(&nonce, &mut body, &head) {
        return Err(SnapshotError::Sealed(path.to_owned()));
    }
    let operator = String::from_utf8_lossy(&head[8..8 + OPERATOR_LEN]).into_owned();
    let id: [u8; 16] = head[8 + OPERATOR_LEN..8 + OPERATOR_LEN + 16]
        .try_into()
        .expect("length checked");
    let taken_ms = i64::from_le_bytes(head[HEADER_LEN - 8..].try_into().expect("8 bytes"));
    let mut taken_at = millis_to_time(taken_ms);
    // A confirmation of this very snapshot, sealed with the same key, moves its time on.
    if let Some(c) = confirmation {
        if c.len() == CONFIRM_LEN && &c[..8] == CONFIRM_MAGIC && c[8..24] == id {
            let ms = i64::from_le_bytes(c[24..32].try_into().expect("8 bytes"));
            let nonce: [u8; NONCE_LEN] = c[32..32 + NONCE_LEN].try_into().expect("12 bytes");
            let mut tag = c[32 + NONCE_LEN..].to_vec();
            if ms > taken_ms
                && cipher.open_in_place(&nonce, &mut tag, &confirm_aad(&operator, &id, ms))
            {
                taken_at = millis_to_time(ms);
            }
        }
    }
    // Only the identities are decoded here (`serve` needs them to start); the copy is decoded
    // by `install`.
    let identities = {
        // postcard writes fields one after the other: the first field alone reads as `Head`.
        let (b, _rest): (Head, _) = postcard::take_from_bytes(&body)
            .map_err(|e| SnapshotError::Malformed(path.to_owned(), e.to_string()))?;
        b.identities
            .into_iter()
            .map(|r| IdentityRow {
                kind: r.kind.into_owned(),
                name: r.name.into_owned(),
                public_key: r.public_key.into_owned(),
                seed: r.seed.into_owned(),
                jwt: r.jwt.map(Cow::into_owned),
            })
            .collect()
    };
    Ok(Opened {
        path: path.to_owned(),
        taken_at,
        operator,
        identities,
        body,
    })
}

/// Opens the newest snapshot in `dir` that opens with `cipher` (newest by the time in its
/// header). Each file that does not open is logged (one line each) and skipped.
pub fn open_newest(dir: &Path, cipher: &SeedCipher) -> Result<Opened, SnapshotError> {
    let entries = std::fs::read_dir(dir).map_err(io(dir))?;
    let mut found: Vec<(i64, PathBuf)> = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "snap") {
            continue;
        }
        let mut head = [0u8; HEADER_LEN];
        let read = std::fs::File::open(&path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head));
        let ms = match read {
            Ok(()) if &head[..8] == MAGIC => {
                i64::from_le_bytes(head[HEADER_LEN - 8..].try_into().expect("8 bytes"))
            }
            _ => i64::MIN,
        };
        found.push((ms, path));
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut last = SnapshotError::None(dir.to_owned());
    for (_, path) in found {
        match open(&path, cipher) {
            Ok(o) => return Ok(o),
            Err(e) => {
                say_once(format!("login copy snapshot refused: {e}"));
                last = e;
            }
        }
    }
    Err(last)
}

// ---- at start ------------------------------------------------------------------------------

/// Logs `line` at ERROR unless it was said already (among the last few lines): `serve` retries
/// its start every 2 s while Postgres is unreachable, and a refused snapshot is said once, not
/// once per retry (the local and the JetStream snapshot each have their line).
fn say_once(line: String) {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if !said.contains(&line) {
        tracing::error!("{line}");
        if said.len() == 8 {
            said.remove(0);
        }
        said.push(line);
    }
}

/// JetStream is asked again at start only after a growing pause (2 s, 4 s, … 30 s): each try is
/// a NATS connection (a server that does not know the snapshot account makes the client library
/// log the refusal) and may read the whole snapshot.
fn jetstream_due() -> bool {
    let next = JETSTREAM_NEXT.lock().unwrap_or_else(|p| p.into_inner());
    next.0.is_none_or(|at| Instant::now() >= at)
}

fn jetstream_tried() {
    let mut next = JETSTREAM_NEXT.lock().unwrap_or_else(|p| p.into_inner());
    let pause = (next.1 * 2).clamp(Duration::from_secs(2), Duration::from_secs(30));
    *next = (Some(Instant::now() + pause), pause);
}

static JETSTREAM_NEXT: std::sync::Mutex<(Option<Instant>, Duration)> =
    std::sync::Mutex::new((None, Duration::ZERO));

/// Where `serve` looks for a snapshot in JetStream (see `copy::snapshot_jetstream`).
pub struct JetStreamSource<'a> {
    pub account: &'a SnapshotAccount,
    pub addrs: &'a [async_nats::ServerAddr],
    pub tls: &'a crate::config::NatsTlsArgs,
}

/// Where a snapshot read from JetStream came from, for messages.
fn jetstream_path() -> PathBuf {
    PathBuf::from(format!(
        "jetstream:{}/{}",
        snapshot_jetstream::BUCKET,
        snapshot_jetstream::OBJECT
    ))
}

/// The snapshot in JetStream, if there is one that opens. Says in one line why not.
async fn open_from_jetstream(js: &JetStreamSource<'_>, cipher: &SeedCipher) -> Option<Opened> {
    match snapshot_jetstream::fetch(js.account, js.addrs, js.tls).await {
        Ok(Some(f)) => match open_bytes(
            &jetstream_path(),
            Zeroizing::new(f.snapshot),
            f.confirmation.as_deref(),
            cipher,
        ) {
            Ok(o) => Some(o),
            Err(e) => {
                say_once(format!("login copy snapshot refused: {e}"));
                None
            }
        },
        Ok(None) => {
            say_once(format!(
                "no snapshot of the login copy in JetStream (bucket {})",
                snapshot_jetstream::BUCKET
            ));
            None
        }
        Err(e) => {
            say_once(format!(
                "cannot read the login copy's snapshot from JetStream: {e}"
            ));
            None
        }
    }
}

/// `serve` could not reach Postgres: the newest snapshot that opens, in `dir` and in JetStream
/// (newest by the time it was taken or last confirmed). Says in one line why each is not used.
pub async fn open_at_start(
    dir: Option<&Path>,
    jetstream: Option<JetStreamSource<'_>>,
    cipher: &SeedCipher,
) -> Option<Opened> {
    let local = match dir {
        None => None,
        Some(dir) => match open_newest(dir, cipher) {
            Ok(o) => Some(o),
            Err(SnapshotError::None(_)) => {
                say_once(format!(
                    "no snapshot of the login copy in {} to answer from",
                    dir.display()
                ));
                None
            }
            Err(SnapshotError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                say_once(format!(
                    "no snapshot of the login copy in {} to answer from",
                    dir.display()
                ));
                None
            }
            // open_newest said why for each file it refused.
            Err(_) => None,
        },
    };
    let remote = match &jetstream {
        Some(js) if jetstream_due() => {
            // Also after a snapshot that opened: `serve` only retries when it could not be
            // installed (past the grace, say), and ~100 MB are not fetched again every 2 s.
            jetstream_tried();
            open_from_jetstream(js, cipher).await
        }
        _ => None,
    };
    match (local, remote) {
        (Some(l), Some(r)) => Some(if r.taken_at > l.taken_at { r } else { l }),
        (l, r) => l.or(r),
    }
}

/// Installs `opened` as the copy and says so in one line; false (and one line) when it cannot
/// be used.
pub fn install_at_start(opened: &Opened, cache: &LoginCache) -> bool {
    let age = age_text(opened.age());
    match opened.install(cache) {
        Ok(Some(users)) => {
            tracing::warn!(
                path = %opened.path.display(),
                users,
                grace = %humantime::format_duration(cache.settings().outage_grace),
                jwt_ttl = %humantime::format_duration(cache.settings().outage_ttl),
                "Postgres unreachable at start: answering from a snapshot taken {age} ago (outage mode until Postgres is back)"
            );
            true
        }
        Ok(None) => {
            say_once(format!(
                "{}: the snapshot of the login copy was taken {age} ago, past --db-outage-grace ({}): not used",
                opened.path.display(),
                humantime::format_duration(cache.settings().outage_grace)
            ));
            false
        }
        Err(e) => {
            say_once(format!("login copy snapshot refused: {e}"));
            false
        }
    }
}

// ---- keeping it current ------------------------------------------------------------------------

/// For `nats_pg_auth_copy_snapshot_timestamp_seconds`: the snapshot on disk is current now.
fn mark_current(cache: &LoginCache) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    cache
        .stats()
        .snapshot_current_at
        .store(now, std::sync::atomic::Ordering::Relaxed);
}

/// The writer's last snapshot.
struct LastWrite {
    /// [`LoginCache::changes`] it reflects.
    changes: u64,
    /// Full loads of the copy when it was taken (a new one is written after each).
    reloads: u64,
    id: [u8; 16],
    /// When it was written (or a write last failed): a change waits for `Writer::every`.
    written: Instant,
    /// When it was last confirmed (or written).
    confirmed: Instant,
    /// Whether it is in JetStream.
    in_jetstream: bool,
}

/// The JetStream side of the writer: the last attempt, so a failing store (no JetStream on the
/// servers, NATS away) is neither re-sealed for every second nor said more than once.
#[derive(Default)]
struct JetStreamState {
    /// The snapshot id last put (or tried), and when a failed try is repeated (with a fresh
    /// snapshot, also when the copy did not change).
    tried: Option<([u8; 16], Option<Instant>)>,
    failing: bool,
}

/// A put refused because JetStream is not enabled is tried again after this many rewrite
/// periods (the servers may be reconfigured); other failures after one.
const JETSTREAM_RETRY_PERIODS: u32 = 10;

/// Writes this replica's snapshot while it runs: to `dir` (every replica that has one), and to
/// JetStream (the sync leader only).
pub struct Writer {
    pub dir: Option<PathBuf>,
    /// A changed copy is rewritten, and an unchanged one confirmed, at most this often
    /// ([`REWRITE_EVERY`] in `serve`).
    pub every: Duration,
    pub cipher: SeedCipher,
    pub operator: String,
    pub identities: Vec<IdentityRow>,
    pub jetstream: Option<Arc<Publisher>>,
}

impl Writer {
    /// Where the snapshot goes, for messages.
    fn target(&self, to_jetstream: bool) -> String {
        let dir = self
            .dir
            .as_ref()
            .map(|d| d.join(FILE_NAME).display().to_string());
        match (dir, to_jetstream) {
            (Some(d), true) => format!("{d} and JetStream bucket {}", snapshot_jetstream::BUCKET),
            (Some(d), false) => d,
            (None, _) => format!("JetStream bucket {}", snapshot_jetstream::BUCKET),
        }
    }

    /// Every second: when the copy is current and (never written, reloaded since, or changed
    /// and the last write is `every` old, or this replica leads and JetStream lacks the last
    /// snapshot) it is written; when it is current and unchanged, the snapshot is confirmed
    /// every `every`. Encoding, sealing and file I/O run on a blocking thread. Failures are
    /// logged (the first of a run at WARN) and retried.
    pub async fn keep_writing(self, cache: Arc<LoginCache>, stop: CancellationToken) {
        if !self.cipher.has_key() {
            if let Some(dir) = &self.dir {
                tracing::warn!(
                    dir = %dir.display(),
                    "--snapshot-dir is set but no encryption key is configured: no snapshot of the login copy is written (it would hold signing seeds in plain text); set --encryption-key to keep one"
                );
            }
            return;
        }
        let me = Arc::new(self);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<LastWrite> = None;
        let mut failing = false;
        let mut js = JetStreamState::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !cache.is_live() {
                continue;
            }
            let leading = me.jetstream.as_ref().is_some_and(|j| j.leading());
            if me.dir.is_none() && !leading {
                continue;
            }
            let reloads = crate::copy::CacheStats::get(&cache.stats().reloads);
            let changes = cache.changes();
            let write = match &last {
                None => true,
                Some(l) => {
                    l.reloads != reloads
                        || (l.changes != changes && l.written.elapsed() >= me.every)
                        || (leading
                            && match js.tried {
                                None => true,
                                Some((id, retry_at)) => {
                                    (id != l.id && !l.in_jetstream)
                                        || retry_at.is_some_and(|at| Instant::now() >= at)
                                }
                            })
                }
            };
            if write {
                let (w, cache2) = (me.clone(), cache.clone());
                let done = tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let now = SystemTime::now();
                    let copy = cache2.export();
                    let changes = copy.changes;
                    let sealed = seal(&w.cipher, &w.operator, &w.identities, &copy, now)?;
                    drop(copy);
                    if let Some(dir) = &w.dir {
                        replace_file(dir, FILE_NAME, &[&sealed.bytes])?;
                    }
                    Ok::<_, SnapshotError>((sealed, changes, started.elapsed()))
                })
                .await;
                match done {
                    Ok(Ok((sealed, changes, took))) => {
                        let in_jetstream = if leading {
                            me.put_jetstream(&mut js, &sealed).await
                        } else {
                            false
                        };
                        if last.is_none() || failing {
                            tracing::info!(
                                to = %me.target(in_jetstream),
                                users = sealed.users,
                                bytes = sealed.bytes.len(),
                                took_ms = took.as_millis() as u64,
                                "wrote the login copy's snapshot (sealed; rewritten when the copy changes, at most every 30s)"
                            );
                        } else {
                            tracing::debug!(
                                to = %me.target(in_jetstream),
                                users = sealed.users,
                                bytes = sealed.bytes.len(),
                                took_ms = took.as_millis() as u64,
                                "rewrote the login copy's snapshot"
                            );
                        }
                        failing = false;
                        mark_current(&cache);
                        last = Some(LastWrite {
                            changes,
                            reloads,
                            id: sealed.id,
                            written: Instant::now(),
                            confirmed: Instant::now(),
                            in_jetstream,
                        });
                    }
                    Ok(Err(e)) => {
                        if !failing {
                            tracing::warn!(error = %e, "cannot write the login copy's snapshot; retrying");
                        }
                        failing = true;
                        // Retry on the next rewrite slot, not every second.
                        if let Some(l) = last.as_mut() {
                            l.written = Instant::now();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "the snapshot writer failed"),
                }
            } else if let Some(l) = last.as_mut() {
                if l.changes == changes && l.confirmed.elapsed() >= me.every {
                    let now = SystemTime::now();
                    let record = confirm_record(&me.cipher, &me.operator, &l.id, now);
                    let confirmed = match record {
                        Ok(record) => {
                            let mut ok = true;
                            if let Some(dir) = me.dir.clone() {
                                let r = record.clone();
                                let done = tokio::task::spawn_blocking(move || {
                                    replace_file(&dir, CONFIRM_NAME, &[&r])
                                })
                                .await;
                                if let Ok(Err(e)) = &done {
                                    tracing::debug!(error = %e, "cannot confirm the login copy's snapshot");
                                }
                                ok = matches!(done, Ok(Ok(_)));
                            }
                            if let (Some(j), true) = (&me.jetstream, leading && l.in_jetstream) {
                                if let Err(e) =
                                    j.put(snapshot_jetstream::CONFIRM_OBJECT, &record).await
                                {
                                    tracing::debug!(error = %e, "cannot confirm the login copy's snapshot in JetStream");
                                    ok = false;
                                }
                            }
                            ok
                        }
                        Err(_) => false,
                    };
                    if confirmed {
                        mark_current(&cache);
                    }
                    l.confirmed = Instant::now();
                }
            }
        }
    }

    /// Puts `sealed` into JetStream; says the first failure of a run (and "not enabled" once
    /// for all) and when it works again. True when it is there.
    async fn put_jetstream(&self, js: &mut JetStreamState, sealed: &Sealed) -> bool {
        let Some(publisher) = &self.jetstream else {
            return false;
        };
        match publisher
            .put(snapshot_jetstream::OBJECT, &sealed.bytes)
            .await
        {
            Ok(put) => {
                if js.failing || js.tried.is_none() {
                    tracing::info!(
                        bucket = snapshot_jetstream::BUCKET,
                        bytes = put.bytes,
                        took_ms = put.took.as_millis() as u64,
                        "wrote the login copy's snapshot to JetStream"
                    );
                }
                js.tried = Some((sealed.id, None));
                js.failing = false;
                true
            }
            Err(e) => {
                if !js.failing {
                    match &e {
                        snapshot_jetstream::StoreError::NotEnabled(_) => tracing::warn!(
                            error = %e,
                            "JetStream is not available for the login copy's snapshot: it is kept {}; enable JetStream on the servers or set --snapshot-jetstream=false",
                            self.dir.as_ref().map_or("nowhere".to_owned(), |d| format!("only in {}", d.display()))
                        ),
                        _ => {
                            tracing::warn!(error = %e, "cannot write the login copy's snapshot to JetStream; retrying")
                        }
                    }
                }
                let wait = match e {
                    snapshot_jetstream::StoreError::NotEnabled(_) => {
                        self.every * JETSTREAM_RETRY_PERIODS
                    }
                    _ => self.every,
                };
                js.failing = true;
                js.tried = Some((sealed.id, Some(Instant::now() + wait)));
                false
            }
        }
    }

    /// One write of `copy` to the directory, taken at `taken_at`.
    pub fn write_now(
        &self,
        copy: &CopyExport,
        taken_at: SystemTime,
    ) -> Result<([u8; 16], Written), SnapshotError> {
        let dir = self
            .dir
            .as_deref()
            .ok_or_else(|| SnapshotError::None(PathBuf::new()))?;
        write(
            dir,
            &self.cipher,
            &self.operator,
            &self.identities,
            copy,
            taken_at,
        )
    }
}

/// `3m 12s`: an age for humans (whole seconds).
pub fn age_text(age: Duration) -> String {
    humantime::format_duration(Duration::from_secs(age.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{CacheSettings, CopyLookup};

    fn shape(signing: Signing) -> Arc<Shape> {
        Arc::new(Shape {
            role_id: Some(7),
            account_id: 1,
            account_name: "acme".into(),
            account_active: true,
            account_jetstream_disk: false,
            foreign_role: false,
            allowed_sources: Some(vec!["10.0.0.0/8".parse().unwrap()]),
            allowed_connection_types: None,
            signing,
            merged: Arc::new(Merged {
                publish: Lists {
                    allow: vec!["a.>".into()],
                    deny: vec![],
                },
                subscribe: Lists::default(),
                response: Some(Response {
                    max: 1,
                    ttl: Duration::from_secs(5),
                }),
                max_subscriptions: -1,
                max_data: -1,
                max_payload: -1,
            }),
            ttl: Duration::from_secs(60),
            signing_key_pending: false,
        })
    }

    fn copy_with(users: &[(i64, &str, bool)]) -> (LoginCache, String) {
        let kp = nkeys::KeyPair::new_account();
        let signer = kp.public_key();
        let s = shape(Signing::Ready(Arc::new(Issuer {
            account: "AACCOUNT".into(),
            signing_public_key: signer.clone(),
            keypair: kp,
        })));
        let c = LoginCache::new(CacheSettings::default());
        let t = c.load_ticket();
        let logins = users
            .iter()
            .map(|(id, name, active)| {
                Arc::new(Login {
                    user_id: *id,
                    username: Arc::from(*name),
                    password_hash: Some("$2b$10$hash".into()),
                    nkey: None,
                    user_active: *active,
                    mqtt_client_ids: Box::default(),
                    shape: s.clone(),
                })
            })
            .collect();
        c.load_users(logins, t);
        let token = |user_id, id, byte: u8, revoked: bool| TokenPart {
            user_id,
            token_id: id,
            token_sha256: vec![byte; 32],
            token_expires_at: None,
            token_revoked_at: revoked.then(chrono::Utc::now),
        };
        c.finish_load(
            t,
            vec![token(1, 10, 0xaa, false), token(1, 11, 0xbb, true)],
            vec![],
        );
        c.set_live();
        (c, signer)
    }

    fn writer(dir: &Path, key: Option<u8>) -> Writer {
        Writer {
            dir: Some(dir.to_owned()),
            every: Duration::ZERO,
            jetstream: None,
            cipher: SeedCipher::new(key.map(|k| [k; 32])),
            operator: nkeys::KeyPair::new_operator().public_key(),
            identities: vec![IdentityRow {
                kind: "operator".into(),
                name: "op".into(),
                public_key: "OXXX".into(),
                seed: "enc:v1:xyz".into(),
                jwt: None,
            }],
        }
    }

    #[test]
    fn a_snapshot_round_trips_and_keeps_what_the_copy_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, signer) = copy_with(&[(1, "alice", true), (2, "bob", false), (3, "carol", true)]);
        // carol changed and was not re-read when the snapshot was taken.
        c.on_change("user:3");
        let w = writer(dir.path(), Some(9));
        w.write_now(&c.export(), SystemTime::now()).unwrap();

        let opened = open_newest(dir.path(), &w.cipher).unwrap();
        assert_eq!(opened.identities.len(), 1);
        assert_eq!(opened.operator, w.operator);
        let restored = LoginCache::new(CacheSettings::default());
        assert_eq!(opened.install(&restored).unwrap(), Some(3));
        assert!(restored.in_outage() && !restored.is_live());
        assert!(restored.snapshot_age().is_some());
        let CopyLookup::Found(alice) = restored.copy_user("alice") else {
            panic!("alice is in the snapshot")
        };
        assert_eq!(alice.password_hash.as_deref(), Some("$2b$10$hash"));
        assert_eq!(alice.shape.account_id, 1);
        assert_eq!(alice.shape.allowed_sources.as_ref().map(Vec::len), Some(1));
        let Signing::Ready(i) = &alice.shape.signing else {
            panic!("the signing key is restored")
        };
        assert_eq!(i.keypair.public_key(), signer);
        assert_eq!(alice.shape.merged.publish.allow, ["a.>"]);
        let CopyLookup::Found(bob) = restored.copy_user("bob") else {
            panic!("bob is in the snapshot")
        };
        assert!(!bob.user_active, "inactive stays inactive");
        assert!(matches!(restored.copy_user("carol"), CopyLookup::Stale));
        assert!(matches!(restored.copy_user("dave"), CopyLookup::Unknown));
        let CopyLookup::Found((_, revoked)) = restored.copy_token(&[0xbb; 32]) else {
            panic!("the revoked token is kept, as revoked")
        };
        assert!(revoked.token_revoked_at.is_some());
        // Postgres back: a load replaces it.
        restored.set_live();
        assert!(restored.snapshot_age().is_none());
    }

    #[test]
    fn an_altered_or_foreign_snapshot_does_not_open_and_no_key_writes_none() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = copy_with(&[(1, "alice", true)]);
        let w = writer(dir.path(), Some(9));
        w.write_now(&c.export(), SystemTime::now()).unwrap();
        let path = dir.path().join(FILE_NAME);
        let good = std::fs::read(&path).unwrap();
        // Another key.
        assert!(matches!(
            open(&path, &SeedCipher::new(Some([8; 32]))),
            Err(SnapshotError::Sealed(_))
        ));
        // One byte of the header (its time), of the body, of the tag.
        for at in [HEADER_LEN - 1, HEADER_LEN + NONCE_LEN + 3, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            assert!(
                matches!(open(&path, &w.cipher), Err(SnapshotError::Sealed(_))),
                "byte {at}"
            );
        }
        let keyless = tempfile::tempdir().unwrap();
        let w = writer(keyless.path(), None);
        assert!(matches!(
            w.write_now(&c.export(), SystemTime::now()),
            Err(SnapshotError::NoKey)
        ));
        assert_eq!(std::fs::read_dir(keyless.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_confirmation_moves_the_time_on_only_for_its_snapshot_and_a_stale_one_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = copy_with(&[(1, "alice", true)]);
        let w = writer(dir.path(), Some(9));
        let old = SystemTime::now() - Duration::from_secs(7200);
        let (id, _) = w.write_now(&c.export(), old).unwrap();
        let opened = open_newest(dir.path(), &w.cipher).unwrap();
        assert!(opened.age() >= Duration::from_secs(7199));
        // Past the 1 h grace: not installed.
        let fresh = LoginCache::new(CacheSettings::default());
        assert_eq!(opened.install(&fresh).unwrap(), None);
        assert!(!fresh.is_loaded());
        // Confirmed a minute ago: usable.
        let at = SystemTime::now() - Duration::from_secs(60);
        confirm(dir.path(), &w.cipher, &w.operator, &id, at).unwrap();
        let opened = open_newest(dir.path(), &w.cipher).unwrap();
        assert!(opened.age() < Duration::from_secs(120));
        assert_eq!(opened.install(&fresh).unwrap(), Some(1));
        // A confirmation of another snapshot changes nothing.
        confirm(
            dir.path(),
            &w.cipher,
            &w.operator,
            &[0; 16],
            SystemTime::now(),
        )
        .unwrap();
        assert!(open_newest(dir.path(), &w.cipher).unwrap().age() >= Duration::from_secs(7199));
    }

    #[tokio::test]
    async fn the_writer_writes_a_live_copy_and_rewrites_it_when_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = copy_with(&[(1, "alice", true)]);
        let c = Arc::new(c);
        let w = writer(dir.path(), Some(9));
        let cipher = w.cipher.clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(w.keep_writing(c.clone(), stop.clone()));
        let holds = |name: &'static str| {
            let (dir, cipher) = (dir.path().to_owned(), cipher.clone());
            move || {
                open_newest(&dir, &cipher).is_ok_and(|o| {
                    let copy = LoginCache::new(CacheSettings::default());
                    o.install(&copy).is_ok() && matches!(copy.copy_user(name), CopyLookup::Found(_))
                })
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !holds("alice")() {
            assert!(
                Instant::now() < deadline,
                "the first snapshot was not written"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // bob arrives (as a re-read would add him): the next write has him.
        let bob = match c.copy_user("alice") {
            CopyLookup::Found(l) => Arc::new(Login {
                user_id: 2,
                username: Arc::from("bob"),
                password_hash: None,
                nkey: None,
                user_active: true,
                mqtt_client_ids: Box::default(),
                shape: l.shape.clone(),
            }),
            _ => unreachable!(),
        };
        c.put_user("bob", c.ticket(), &bob);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !holds("bob")() {
            assert!(Instant::now() < deadline, "the change was not written");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        task.await.unwrap();
    }
}
