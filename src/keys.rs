//! NKey helpers and at-rest encryption of the seeds kept in Postgres.
//!
//! A stored seed is either the plain nkey seed (`S…`, when no key is configured) or
//! `enc:v1:<base64 standard(nonce || ciphertext+tag)>`: AES-256-GCM with a random 12-byte nonce
//! and the key's **public key** (its ASCII bytes) as associated data. Binding the public key
//! means a seed copied onto another row does not open there (`WrongKey`) instead of silently
//! signing as the wrong identity.
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
    aead: Option<Aes256Gcm>,
    /// HMAC-SHA256 of the main key under a fixed label: the root of [`SeedCipher::derive`]
    /// (the key itself is not kept outside the AEAD).
    derive_root: Option<Zeroizing<[u8; 32]>>,
    refuse_plain: bool,
    /// Keys that only open (never seal): the previous key during a rotation.
    old: Vec<Aes256Gcm>,
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
        let derive_root = key.map(|k| Zeroizing::new(hmac_sha256(&k, b"nats-pg-auth derive v1")));
        let aead = key.map(|k| {
            let k = Zeroizing::new(k);
            Aes256Gcm::new(k.as_ref().into())
        });
        Self {
            aead,
            derive_root,
            refuse_plain: false,
            old: vec![],
        }
    }

    /// A cipher with no key: seeds are stored in plain.
    pub fn plain() -> Self {
        Self {
            aead: None,
            derive_root: None,
            refuse_plain: false,
            old: vec![],
        }
    }

    /// The same key, but [`SeedCipher::open`] refuses plain seeds when there is a key
    /// ([`KeyError::Plain`]). Without a key it changes nothing.
    pub fn refusing_plain(&self) -> Self {
        Self {
            aead: self.aead.clone(),
            derive_root: self.derive_root.clone(),
            refuse_plain: true,
            old: self.old.clone(),
        }
    }

    /// Also opens seeds sealed with `key` (the previous key, while a rotation is finished);
    /// sealing still uses only the main key.
    pub fn with_old_key(mut self, key: [u8; KEY_LEN]) -> Self {
        let k = Zeroizing::new(key);
        self.old.push(Aes256Gcm::new(k.as_ref().into()));
        self
    }

    /// Also opens what `other` opens (its main and old keys).
    pub fn also_opening(mut self, other: &SeedCipher) -> Self {
        self.old
            .extend(other.aead.iter().chain(&other.old).cloned());
        self
    }

    /// True when `stored` is sealed with the main key (so re-sealing it would change nothing).
    pub fn is_current(&self, stored: &str, public_key: &str) -> bool {
        match (&self.aead, stored.strip_prefix(PREFIX_V1)) {
            (Some(aead), Some(_)) => Self {
                aead: Some(aead.clone()),
                derive_root: None,
                refuse_plain: false,
                old: vec![],
            }
            .open(stored, public_key)
            .is_ok(),
            _ => false,
        }
    }

    /// 32 secret bytes derived from the main key for `label` (HMAC-SHA256), the same on every
    /// replica with the same key: for keys a replica must find again without Postgres (the
    /// snapshot account in JetStream, `copy::snapshot_jetstream`). None without a key.
    pub fn derive(&self, label: &str) -> Option<Zeroizing<[u8; 32]>> {
        let root = self.derive_root.as_ref()?;
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
        let aead = self.aead.as_ref()?;
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
        self.aead.iter().chain(&self.old).any(|aead| {
            aead.decrypt_in_place(Nonce::from_slice(nonce), aad, buf)
                .is_ok()
        })
    }

    /// The value to store for `seed` (an `S…` nkey seed) of `public_key`.
    pub fn seal(&self, seed: &str, public_key: &str) -> Result<String, KeyError> {
        if !seed.starts_with('S') {
            return Err(malformed(public_key, "not an nkey seed"));
        }
        let Some(aead) = &self.aead else {
            return Ok(seed.to_owned());
        };
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = aead
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
        Ok(format!("{PREFIX_V1}{}", B64.encode(blob)))
    }

    /// The seed of `public_key` from its stored value (plain `S…` or `enc:v1:`).
    pub fn open(&self, stored: &str, public_key: &str) -> Result<SecretString, KeyError> {
        if stored.starts_with('S') {
            if self.refuse_plain && self.aead.is_some() {
                return Err(KeyError::Plain {
                    public_key: public_key.to_owned(),
                });
            }
            return Ok(SecretString::from(stored.to_owned()));
        }
        let Some(encoded) = stored.strip_prefix(PREFIX_V1) else {
            return Err(malformed(
                public_key,
                if is_encrypted(stored) {
                    "unknown encryption version"
                } else {
                    "neither a seed nor enc:v1"
                },
            ));
        };
        if self.aead.is_none() && self.old.is_empty() {
            return Err(KeyError::MissingKey {
                public_key: public_key.to_owned(),
            });
        }
        let blob = B64
            .decode(encoded)
            .map_err(|_| malformed(public_key, "enc:v1 payload is not base64"))?;
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(malformed(public_key, "enc:v1 payload is too short"));
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        // GCM cannot tell a wrong key from a wrong AAD (another row's public key): both are
        // WrongKey, and the message names both causes.
        let plain = Zeroizing::new(
            self.aead
                .iter()
                .chain(&self.old)
                .find_map(|aead| {
                    aead.decrypt(
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
            assert!(stored.starts_with("enc:v1:") && is_encrypted(&stored));
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
        assert_eq!(err.kind(), KeyErrorKind::WrongKey);
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
        for bad in ["", "enc:v2:AAAA", "enc:v1:!!!", "enc:v1:AAAA", "hello"] {
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
