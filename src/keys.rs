//! NKey helpers and at-rest encryption of the seeds kept in Postgres.
//!
//! A stored seed is either the plain nkey seed (`S…`, when no key is configured) or
//! `enc:v2:<key id>:<base64 standard(nonce || ciphertext+tag)>`: AES-256-GCM with a random
//! 12-byte nonce and the key's **public key** (its ASCII bytes) as associated data. Binding the
//! public key means a seed copied onto another row does not open there (`WrongKey`) instead of
//! silently signing as the wrong identity. The key id ([`key_id`]: 8 hex digits of a SHA-256 of
//! the key, which says nothing usable about the key) names the key a seed is sealed with, so a
//! database holding seeds under several keys (a rotation a replica did not follow) can be told
//! apart and counted without any key. `enc:v1:<base64>` (the same without the id, written by
//! earlier releases) is still read.
//!
//! Nothing in this module prints a seed or the encryption key: not in `Debug`, not in errors.

use std::fmt;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use nkeys::{KeyPair, XKey};
use rand::RngCore;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};

const PREFIX_V1: &str = "enc:v1:";
const PREFIX_V2: &str = "enc:v2:";
/// Hex digits of a key id.
pub const KEY_ID_LEN: usize = 8;
/// Length of the AES-GCM nonce of sealed values and files.
pub const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Length in bytes of the at-rest key.
pub const KEY_LEN: usize = 32;

/// Why a seed or key could not be used. `public_key` fields name the identity (never secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the seed of {public_key} is encrypted but no encryption key is configured \
         (set --encryption-key or --encryption-key-file)"
    )]
    MissingKey { public_key: String },
    #[error(
        "cannot decrypt the seed of {public_key}: wrong encryption key, or the stored seed \
         belongs to another key"
    )]
    WrongKey { public_key: String },
    #[error("the stored seed of {public_key} is malformed: {reason}")]
    Malformed {
        public_key: String,
        reason: &'static str,
    },
    #[error("the stored seed of {public_key} belongs to another key ({actual})")]
    Mismatch { public_key: String, actual: String },
    #[error(
        "cannot decrypt the seed of {public_key}: it is sealed with the encryption key whose id is \
         {key_id}, which is not this replica's key"
    )]
    OtherKey { public_key: String, key_id: String },
    #[error("invalid encryption key: {0}")]
    BadKey(String),
    #[error("cannot encrypt the seed of {public_key}")]
    Encrypt { public_key: String },
    #[error(
        "the seed of {public_key} is stored in plain text although an encryption key is \
         configured: this service never writes one so (someone else wrote it); refused. If it was \
         written on purpose, encrypt it with `nats-pg-auth rotate-encryption-key`"
    )]
    Plain { public_key: String },
}

/// [`KeyError`] without its data: for matching and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyErrorKind {
    MissingKey,
    WrongKey,
    Malformed,
    Mismatch,
    OtherKey,
    BadKey,
    Encrypt,
    Plain,
}

impl KeyError {
    pub fn kind(&self) -> KeyErrorKind {
        match self {
            KeyError::MissingKey { .. } => KeyErrorKind::MissingKey,
            KeyError::WrongKey { .. } => KeyErrorKind::WrongKey,
            KeyError::Malformed { .. } => KeyErrorKind::Malformed,
            KeyError::Mismatch { .. } => KeyErrorKind::Mismatch,
            KeyError::OtherKey { .. } => KeyErrorKind::OtherKey,
            KeyError::BadKey(_) => KeyErrorKind::BadKey,
            KeyError::Encrypt { .. } => KeyErrorKind::Encrypt,
            KeyError::Plain { .. } => KeyErrorKind::Plain,
        }
    }
}

fn malformed(public_key: &str, reason: &'static str) -> KeyError {
    KeyError::Malformed {
        public_key: public_key.to_owned(),
        reason,
    }
}

// ---------------------------------------------------------------------------------------------
// New keys
// ---------------------------------------------------------------------------------------------

pub fn new_operator() -> KeyPair {
    KeyPair::new_operator()
}

pub fn new_account() -> KeyPair {
    KeyPair::new_account()
}

pub fn new_user() -> KeyPair {
    KeyPair::new_user()
}

/// A curve (X25519) key for sealing callout requests and responses.
pub fn new_xkey() -> XKey {
    XKey::new()
}

/// `(public key, seed as stored)` of `kp`, sealed with `cipher`: ready for an insert.
pub fn seal_keypair(cipher: &SeedCipher, kp: &KeyPair) -> Result<(String, String), KeyError> {
    let public_key = kp.public_key();
    let seed = Zeroizing::new(
        kp.seed()
            .map_err(|_| malformed(&public_key, "key pair has no seed"))?,
    );
    let stored = cipher.seal(&seed, &public_key)?;
    Ok((public_key, stored))
}

/// `(public key, seed as stored)` of a curve key, sealed with `cipher`.
pub fn seal_xkey(cipher: &SeedCipher, xkey: &XKey) -> Result<(String, String), KeyError> {
    let public_key = xkey.public_key();
    let seed = Zeroizing::new(
        xkey.seed()
            .map_err(|_| malformed(&public_key, "xkey has no seed"))?,
    );
    let stored = cipher.seal(&seed, &public_key)?;
    Ok((public_key, stored))
}

// ---------------------------------------------------------------------------------------------
// Loading stored keys
// ---------------------------------------------------------------------------------------------

/// Opens a stored seed and checks it is the seed of `public_key` (O/A/U/N keys).
pub fn keypair_from_stored(
    cipher: &SeedCipher,
    stored: &str,
    public_key: &str,
) -> Result<KeyPair, KeyError> {
    let seed = cipher.open(stored, public_key)?;
    // The nkeys error text is not passed on: it may quote part of its input.
    let kp = KeyPair::from_seed(seed.expose_secret())
        .map_err(|_| malformed(public_key, "not a valid nkey seed"))?;
    let actual = kp.public_key();
    if actual != public_key {
        return Err(KeyError::Mismatch {
            public_key: public_key.to_owned(),
            actual,
        });
    }
    Ok(kp)
}

/// Opens a stored curve seed (`SX…`) and checks it is the seed of `public_key` (`X…`).
pub fn xkey_from_stored(
    cipher: &SeedCipher,
    stored: &str,
    public_key: &str,
) -> Result<XKey, KeyError> {
    let seed = cipher.open(stored, public_key)?;
    let xkey = XKey::from_seed(seed.expose_secret())
        .map_err(|_| malformed(public_key, "not a valid curve seed"))?;
    let actual = xkey.public_key();
    if actual != public_key {
        return Err(KeyError::Mismatch {
            public_key: public_key.to_owned(),
            actual,
        });
    }
    Ok(xkey)
}

// ---------------------------------------------------------------------------------------------
// At-rest key
// ---------------------------------------------------------------------------------------------

/// Decodes the at-rest key: standard base64 of exactly 32 bytes. Surrounding whitespace (a
/// trailing newline in a key file) is ignored. The error never quotes the input.
pub fn parse_key(b64: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let bytes = Zeroizing::new(B64.decode(b64.trim()).map_err(|_| {
        KeyError::BadKey(
            "not standard base64; generate one with `nats-pg-auth generate-key`".to_owned(),
        )
    })?);
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
        KeyError::BadKey(format!(
            "must decode to exactly {KEY_LEN} bytes, got {}; generate one with `nats-pg-auth generate-key`",
            bytes.len()
        ))
    })
}

/// A fresh random at-rest key, base64 standard (what [`parse_key`] reads).
pub fn generate_key() -> String {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    rand::rngs::OsRng.fill_bytes(key.as_mut());
    B64.encode(key.as_ref())
}

/// The id of an at-rest key: the first 4 bytes of SHA-256("nats-pg-auth key id\0" ‖ key), in
/// hex. Stored in the clear beside each seed sealed with the key; a one-way digest of a random
/// 32-byte key gives nothing away about it.
pub fn key_id(key: &[u8; KEY_LEN]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"nats-pg-auth key id\0")
        .chain_update(key)
        .finalize();
    digest[..KEY_ID_LEN / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a stored seed says about the key it is sealed with (no key needed to tell).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SealedWith {
    /// A plain seed (no key).
    Plain,
    /// `enc:v1:` (before key ids): some key, which one is not recorded.
    Unlabelled,
    /// `enc:v2:` with this key id.
    Key(String),
    /// Neither.
    Unknown,
}

impl fmt::Display for SealedWith {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealedWith::Plain => f.write_str("plain text (no key)"),
            SealedWith::Unlabelled => {
                f.write_str("a key without an id (sealed by an earlier release)")
            }
            SealedWith::Key(id) => write!(f, "key id {id}"),
            SealedWith::Unknown => f.write_str("an unknown format"),
        }
    }
}

/// The key `stored` is sealed with, as far as the stored value says.
pub fn sealed_with(stored: &str) -> SealedWith {
    if stored.starts_with('S') {
        SealedWith::Plain
    } else if stored.starts_with(PREFIX_V1) {
        SealedWith::Unlabelled
    } else if let Some((id, _)) = stored
        .strip_prefix(PREFIX_V2)
        .and_then(|rest| rest.split_once(':'))
    {
        SealedWith::Key(id.to_owned())
    } else {
        SealedWith::Unknown
    }
}

/// True for `enc:…` values (any version), false for plain seeds.
pub fn is_encrypted(stored: &str) -> bool {
    stored.starts_with("enc:")
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::Mac as _;
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key)
        .expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Seals and opens stored seeds. Without a key, seeds are stored and read in plain; with one,
/// new seeds are encrypted and plain ones are still read (so a key can be introduced later:
/// the CLI verbs and `serve`'s start-up encryption of a keyless database). A cipher made
/// [`SeedCipher::refusing_plain`] (what `serve` runs with once started) refuses plain seeds when
/// it has a key: the service never writes one then, so one is foreign.
#[derive(Clone)]
pub struct SeedCipher {
    aead: Option<Key>,
    refuse_plain: bool,
    /// Keys that only open (never seal): the previous key during a rotation.
    old: Vec<Key>,
}

/// One at-rest key and its id.
#[derive(Clone)]
struct Key {
    aead: Aes256Gcm,
    id: String,
    /// HMAC-SHA256 of the key under a fixed label: the root of [`SeedCipher::derive`] (the key
    /// itself is not kept outside the AEAD).
    derive_root: Zeroizing<[u8; 32]>,
}

impl Key {
    fn new(key: [u8; KEY_LEN]) -> Self {
        let k = Zeroizing::new(key);
        Key {
            aead: Aes256Gcm::new(k.as_ref().into()),
            id: key_id(&k),
            derive_root: Zeroizing::new(hmac_sha256(&k[..], b"nats-pg-auth derive v1")),
        }
    }
}

impl fmt::Debug for SeedCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedCipher")
            .field("encrypting", &self.has_key())
            .finish()
    }
}

impl SeedCipher {
    pub fn new(key: Option<[u8; KEY_LEN]>) -> Self {
        Self {
            aead: key.map(Key::new),
            refuse_plain: false,
            old: vec![],
        }
    }

    /// A cipher with no key: seeds are stored in plain.
    pub fn plain() -> Self {
        Self {
            aead: None,
            refuse_plain: false,
            old: vec![],
        }
    }

    /// The same key, but [`SeedCipher::open`] refuses plain seeds when there is a key
    /// ([`KeyError::Plain`]). Without a key it changes nothing.
    pub fn refusing_plain(&self) -> Self {
        Self {
            aead: self.aead.clone(),
            refuse_plain: true,
            old: self.old.clone(),
        }
    }

    /// Also opens seeds sealed with `key` (the previous key, while a rotation is finished);
    /// sealing still uses only the main key.
    pub fn with_old_key(mut self, key: [u8; KEY_LEN]) -> Self {
        self.old.push(Key::new(key));
        self
    }

    /// Also opens what `other` opens (its main and old keys).
    pub fn also_opening(mut self, other: &SeedCipher) -> Self {
        self.old
            .extend(other.aead.iter().chain(&other.old).cloned());
        self
    }

    /// True when `stored` is sealed with the main key in the current format (so re-sealing it
    /// would change nothing).
    pub fn is_current(&self, stored: &str, public_key: &str) -> bool {
        match (&self.aead, sealed_with(stored)) {
            (Some(key), SealedWith::Key(id)) if id == key.id => Self {
                aead: Some(key.clone()),
                refuse_plain: false,
                old: vec![],
            }
            .open(stored, public_key)
            .is_ok(),
            _ => false,
        }
    }

    /// True when `stored` is what this cipher would write now: sealed with its main key, or
    /// plain when it has none. A replica whose cipher does not write like the database's own
    /// seeds (the operator's, which every rotation re-seals) no longer holds the current key.
    pub fn writes_like(&self, stored: &str, public_key: &str) -> bool {
        match &self.aead {
            None => sealed_with(stored) == SealedWith::Plain,
            // Sealed by an earlier release with this very key: still current.
            Some(_) if sealed_with(stored) == SealedWith::Unlabelled => Self {
                aead: self.aead.clone(),
                refuse_plain: false,
                old: vec![],
            }
            .open(stored, public_key)
            .is_ok(),
            Some(_) => self.is_current(stored, public_key),
        }
    }

    /// The id of the main key (the one that seals), if any.
    pub fn key_id(&self) -> Option<&str> {
        self.aead.as_ref().map(|k| k.id.as_str())
    }

    /// The ids of the keys that only open (`--old-encryption-key`).
    pub fn old_key_ids(&self) -> Vec<&str> {
        self.old.iter().map(|k| k.id.as_str()).collect()
    }

    /// 32 secret bytes derived from the main key for `label` (HMAC-SHA256), the same on every
    /// replica with the same key: for keys a replica must find again without Postgres (the
    /// snapshot account in JetStream, `copy::snapshot_jetstream`). None without a key.
    pub fn derive(&self, label: &str) -> Option<Zeroizing<[u8; 32]>> {
        let root = &self.aead.as_ref()?.derive_root;
        Some(Zeroizing::new(hmac_sha256(&root[..], label.as_bytes())))
    }

    /// Whether [`SeedCipher::seal`] encrypts.
    pub fn has_key(&self) -> bool {
        self.aead.is_some()
    }

    /// Seals `buf` in place with the main key (AES-256-GCM, a fresh random nonce, the 16-byte
    /// tag appended): for files sealed with the at-rest key, such as the login copy's snapshot.
    /// Returns the nonce; None without a key (nothing is sealed then).
    pub fn seal_in_place(&self, buf: &mut Vec<u8>, aad: &[u8]) -> Option<[u8; NONCE_LEN]> {
        use aes_gcm::aead::AeadInPlace;
        let aead = &self.aead.as_ref()?.aead;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        aead.encrypt_in_place(Nonce::from_slice(&nonce), aad, buf)
            .ok()?;
        Some(nonce)
    }

    /// Opens what [`SeedCipher::seal_in_place`] sealed (with the main key or an old one), in
    /// place. False when no key opens it (wrong key, other `aad`, or altered bytes): `buf` is
    /// then left as it was.
    pub fn open_in_place(&self, nonce: &[u8; NONCE_LEN], buf: &mut Vec<u8>, aad: &[u8]) -> bool {
        use aes_gcm::aead::AeadInPlace;
        self.aead.iter().chain(&self.old).any(|key| {
            key.aead
                .decrypt_in_place(Nonce::from_slice(nonce), aad, buf)
                .is_ok()
        })
    }

    /// The value to store for `seed` (an `S…` nkey seed) of `public_key`.
    pub fn seal(&self, seed: &str, public_key: &str) -> Result<String, KeyError> {
        if !seed.starts_with('S') {
            return Err(malformed(public_key, "not an nkey seed"));
        }
        let Some(key) = &self.aead else {
            return Ok(seed.to_owned());
        };
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = key
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: seed.as_bytes(),
                    aad: public_key.as_bytes(),
                },
            )
            .map_err(|_| KeyError::Encrypt {
                public_key: public_key.to_owned(),
            })?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(format!("{PREFIX_V2}{}:{}", key.id, B64.encode(blob)))
    }

    /// The seed of `public_key` from its stored value (plain `S…`, `enc:v2:` or `enc:v1:`).
    pub fn open(&self, stored: &str, public_key: &str) -> Result<SecretString, KeyError> {
        let (encoded, candidates): (&str, Vec<&Key>) = match sealed_with(stored) {
            SealedWith::Plain => {
                if self.refuse_plain && self.aead.is_some() {
                    return Err(KeyError::Plain {
                        public_key: public_key.to_owned(),
                    });
                }
                return Ok(SecretString::from(stored.to_owned()));
            }
            SealedWith::Unknown => {
                return Err(malformed(
                    public_key,
                    if is_encrypted(stored) {
                        "unknown encryption version"
                    } else {
                        "neither a seed nor enc:v2/enc:v1"
                    },
                ))
            }
            // No id: every key is tried.
            SealedWith::Unlabelled => (
                &stored[PREFIX_V1.len()..],
                self.aead.iter().chain(&self.old).collect(),
            ),
            SealedWith::Key(id) => {
                let encoded = &stored[PREFIX_V2.len() + id.len() + 1..];
                let keys: Vec<&Key> = self
                    .aead
                    .iter()
                    .chain(&self.old)
                    .filter(|k| k.id == id)
                    .collect();
                if keys.is_empty() && (self.aead.is_some() || !self.old.is_empty()) {
                    return Err(KeyError::OtherKey {
                        public_key: public_key.to_owned(),
                        key_id: id,
                    });
                }
                (encoded, keys)
            }
        };
        if self.aead.is_none() && self.old.is_empty() {
            return Err(KeyError::MissingKey {
                public_key: public_key.to_owned(),
            });
        }
        let blob = B64
            .decode(encoded)
            .map_err(|_| malformed(public_key, "sealed payload is not base64"))?;
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(malformed(public_key, "sealed payload is too short"));
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        // GCM cannot tell a wrong key from a wrong AAD (another row's public key): both are
        // WrongKey, and the message names both causes.
        let plain = Zeroizing::new(
            candidates
                .iter()
                .find_map(|key| {
                    key.aead
                        .decrypt(
                            Nonce::from_slice(nonce),
                            Payload {
                                msg: sealed,
                                aad: public_key.as_bytes(),
                            },
                        )
                        .ok()
                })
                .ok_or_else(|| KeyError::WrongKey {
                    public_key: public_key.to_owned(),
                })?,
        );
        let seed = std::str::from_utf8(&plain)
            .map_err(|_| malformed(public_key, "decrypted seed is not UTF-8"))?;
        Ok(SecretString::from(seed.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SeedCipher {
        SeedCipher::new(Some([byte; KEY_LEN]))
    }

    #[test]
    fn encrypted_round_trip_for_every_kind() {
        let cipher = key(7);
        for kp in [new_operator(), new_account(), new_user()] {
            let (pk, stored) = seal_keypair(&cipher, &kp).expect("seals");
            let id = key_id(&[7; KEY_LEN]);
            assert!(stored.starts_with(&format!("enc:v2:{id}:")) && is_encrypted(&stored));
            assert_eq!(sealed_with(&stored), SealedWith::Key(id));
            let seed = kp.seed().expect("seed");
            assert!(!stored.contains(&seed));
            assert_eq!(
                cipher.open(&stored, &pk).expect("opens").expose_secret(),
                seed
            );
            assert_eq!(
                keypair_from_stored(&cipher, &stored, &pk)
                    .expect("loads")
                    .public_key(),
                pk
            );
        }
        let x = new_xkey();
        let (xpk, stored) = seal_xkey(&cipher, &x).expect("seals");
        assert_eq!(
            xkey_from_stored(&cipher, &stored, &xpk)
                .expect("loads")
                .public_key(),
            xpk
        );
    }

    /// Seeds written before key ids (`enc:v1:`, no id) still open, with the main or an old key.
    #[test]
    fn unlabelled_v1_seeds_still_open() {
        let kp = new_account();
        let (pk, seed) = (kp.public_key(), kp.seed().expect("seed"));
        let aead = Aes256Gcm::new((&[6u8; KEY_LEN]).into());
        let nonce = [3u8; NONCE_LEN];
        let sealed = aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: seed.as_bytes(),
                    aad: pk.as_bytes(),
                },
            )
            .expect("seals");
        let v1 = format!("enc:v1:{}", B64.encode([&nonce[..], &sealed].concat()));
        assert_eq!(sealed_with(&v1), SealedWith::Unlabelled);
        assert_eq!(key(6).open(&v1, &pk).expect("opens").expose_secret(), seed);
        let rotated = key(8).with_old_key([6; KEY_LEN]);
        assert_eq!(rotated.open(&v1, &pk).expect("opens").expose_secret(), seed);
        // Current for the key that wrote it (no re-seal needed), not for another.
        assert!(key(6).writes_like(&v1, &pk) && !key(6).is_current(&v1, &pk));
        assert!(!rotated.writes_like(&v1, &pk));
        assert_eq!(
            key(9).open(&v1, &pk).expect_err("wrong").kind(),
            KeyErrorKind::WrongKey
        );
    }

    /// A seed under a key this cipher does not hold names that key's id (and no key material).
    #[test]
    fn a_seed_under_another_key_names_its_key_id() {
        let kp = new_account();
        let (pk, stored) = seal_keypair(&key(1), &kp).expect("seals");
        let err = key(2).open(&stored, &pk).expect_err("other key");
        assert_eq!(err.kind(), KeyErrorKind::OtherKey);
        assert!(err.to_string().contains(&key_id(&[1; KEY_LEN])), "{err}");
        assert_eq!(key(1).key_id(), Some(key_id(&[1; KEY_LEN]).as_str()));
        assert_ne!(key_id(&[1; KEY_LEN]), key_id(&[2; KEY_LEN]));
        assert_eq!(key_id(&[1; KEY_LEN]).len(), KEY_ID_LEN);
        // The old key opens it; the cipher writes like the database only with it as main key.
        let rotated = key(2).with_old_key([1; KEY_LEN]);
        assert!(rotated.open(&stored, &pk).is_ok());
        assert_eq!(rotated.old_key_ids(), vec![key_id(&[1; KEY_LEN])]);
        assert!(key(1).writes_like(&stored, &pk) && !rotated.writes_like(&stored, &pk));
        assert!(!SeedCipher::plain().writes_like(&stored, &pk));
        assert!(SeedCipher::plain().writes_like(&kp.seed().expect("seed"), &pk));
    }

    #[test]
    fn nonce_is_fresh_per_seal() {
        let cipher = key(1);
        let kp = new_account();
        let seed = kp.seed().expect("seed");
        assert_ne!(
            cipher.seal(&seed, &kp.public_key()).ok(),
            cipher.seal(&seed, &kp.public_key()).ok()
        );
    }

    #[test]
    fn wrong_key_is_wrong_key() {
        let kp = new_account();
        let (pk, stored) = seal_keypair(&key(1), &kp).expect("seals");
        let err = key(2).open(&stored, &pk).expect_err("must not open");
        assert_eq!(err.kind(), KeyErrorKind::OtherKey);
        assert!(err.to_string().contains(&pk));
    }

    /// With a key, `serve` only ever writes encrypted seeds: a plain one was written by someone
    /// else (an admin pasting a seed they know) and must not sign anything.
    #[test]
    fn a_cipher_refusing_plain_refuses_plain_seeds_only_when_it_has_a_key() {
        let kp = new_account();
        let seed = kp.seed().expect("seed");
        let pk = kp.public_key();
        let strict = key(4).refusing_plain();
        let err = keypair_from_stored(&strict, &seed, &pk).expect_err("plain refused");
        assert_eq!(err.kind(), KeyErrorKind::Plain);
        assert!(err.to_string().contains(&pk) && err.to_string().contains("plain text"));
        assert!(!err.to_string().contains(&seed), "never quotes the seed");
        // Encrypted seeds open as before; without a key plain seeds are the normal case.
        let (_, sealed) = seal_keypair(&strict, &kp).expect("seals");
        assert_eq!(
            keypair_from_stored(&strict, &sealed, &pk)
                .expect("opens")
                .public_key(),
            pk
        );
        assert!(keypair_from_stored(&SeedCipher::plain().refusing_plain(), &seed, &pk).is_ok());
        // The lenient cipher (CLI verbs, start-up encryption) still reads plain seeds.
        assert!(keypair_from_stored(&key(4), &seed, &pk).is_ok());
    }

    #[test]
    fn ciphertext_moved_to_another_public_key_is_wrong_key() {
        let cipher = key(3);
        let (a, b) = (new_account(), new_account());
        let (_, stored_a) = seal_keypair(&cipher, &a).expect("seals");
        let err = cipher
            .open(&stored_a, &b.public_key())
            .expect_err("bound to a's key");
        assert_eq!(err.kind(), KeyErrorKind::WrongKey);
        let err = keypair_from_stored(&cipher, &stored_a, &b.public_key()).expect_err("bound");
        assert_eq!(err.kind(), KeyErrorKind::WrongKey);
    }

    #[test]
    fn plain_seeds_pass_through_and_are_checked() {
        let kp = new_user();
        let seed = kp.seed().expect("seed");
        // No key: sealing stores the plain seed; with a key, plain seeds still open.
        assert_eq!(
            SeedCipher::plain()
                .seal(&seed, &kp.public_key())
                .expect("plain"),
            seed
        );
        for cipher in [SeedCipher::plain(), key(9)] {
            assert_eq!(
                cipher
                    .open(&seed, &kp.public_key())
                    .expect("plain")
                    .expose_secret(),
                seed
            );
            assert!(keypair_from_stored(&cipher, &seed, &kp.public_key()).is_ok());
        }
        let other = new_user();
        let err = keypair_from_stored(&SeedCipher::plain(), &seed, &other.public_key())
            .expect_err("mismatch");
        assert_eq!(err.kind(), KeyErrorKind::Mismatch);
        assert!(!err.to_string().contains(&seed));
    }

    #[test]
    fn encrypted_row_without_key_is_missing_key() {
        let kp = new_account();
        let (pk, stored) = seal_keypair(&key(4), &kp).expect("seals");
        let err = SeedCipher::plain().open(&stored, &pk).expect_err("no key");
        assert_eq!(err.kind(), KeyErrorKind::MissingKey);
        assert!(err.to_string().contains("--encryption-key"));
    }

    #[test]
    fn malformed_values() {
        let c = key(5);
        let id = key_id(&[5; KEY_LEN]);
        for bad in [
            "",
            "enc:v3:AAAA",
            "enc:v2:AAAA",
            "enc:v1:!!!",
            "enc:v1:AAAA",
            &format!("enc:v2:{id}:AAAA"),
            &format!("enc:v2:{id}:!!!"),
            "hello",
        ] {
            assert_eq!(
                c.open(bad, "A").expect_err(bad).kind(),
                KeyErrorKind::Malformed,
                "{bad}"
            );
        }
        assert_eq!(
            c.seal("not-a-seed", "A").expect_err("seed").kind(),
            KeyErrorKind::Malformed
        );
        // A curve seed is not an ed25519 key pair of that public key, nor the reverse.
        let x = new_xkey();
        let xseed = x.seed().expect("seed");
        assert!(keypair_from_stored(&c, &xseed, &x.public_key()).is_err());
        let a = new_account();
        assert!(xkey_from_stored(&c, &a.seed().expect("seed"), &a.public_key()).is_err());
    }

    #[test]
    fn debug_prints_no_key_material() {
        assert_eq!(
            format!("{:?}", key(0xAB)),
            "SeedCipher { encrypting: true }"
        );
        let kp = new_account();
        let opened = key(1)
            .open(&kp.seed().expect("seed"), &kp.public_key())
            .expect("opens");
        assert!(!format!("{opened:?}").contains(&kp.seed().expect("seed")));
    }

    #[test]
    fn parse_key_accepts_exactly_32_bytes() {
        let generated = generate_key();
        let k = parse_key(&format!("{generated}\n")).expect("generated key parses");
        assert_eq!(B64.encode(k), generated);
        let short = B64.encode([0u8; 31]);
        let err = parse_key(&short).expect_err("31 bytes");
        assert_eq!(err.kind(), KeyErrorKind::BadKey);
        assert!(
            err.to_string().contains("exactly 32 bytes, got 31"),
            "{err}"
        );
        let err = parse_key("not base64 at all!").expect_err("not base64");
        assert!(err.to_string().contains("not standard base64"), "{err}");
        assert!(!err.to_string().contains("at all"));
        // URL-safe alphabet is a different encoding: refuse rather than guess.
        let url = base64::engine::general_purpose::URL_SAFE.encode([0xfbu8; 32]);
        assert!(parse_key(&url).is_err());
    }

    #[test]
    fn xkey_seal_open_uses_the_server_layout() {
        // The callout layout (protocol doc §3.6): "xkv1" + 24-byte nonce + box.
        let (ours, server) = (new_xkey(), new_xkey());
        let sealed = ours.seal(b"eyJhbGciOi", &server).expect("seals");
        assert!(sealed.starts_with(b"xkv1"));
        assert_eq!(sealed.len(), 4 + 24 + 16 + 10);
        let server_view = XKey::from_public_key(&ours.public_key()).expect("public");
        assert_eq!(
            server.open(&sealed, &server_view).expect("opens"),
            b"eyJhbGciOi"
        );
        assert!(
            new_xkey().open(&sealed, &server_view).is_err(),
            "third party cannot open"
        );
    }
}
