//! Keys: nkeys helpers and at-rest encryption of seeds.
//!
//! Seeds are stored as `enc:v1:<base64(nonce || ciphertext+tag)>` (AES-256-GCM, 12-byte random
//! nonce) when a key is configured. The associated data is the seed's public key, so a
//! ciphertext copied onto another row fails to open instead of silently signing as the wrong
//! identity. Plain seeds (`S…`, from a keyless start or pb-nats) are still read.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use nkeys::{KeyPair, XKey};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};

const PREFIX_V1: &str = "enc:v1:";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a seed is encrypted but no encryption key is configured (set NATS_PG_AUTH_ENCRYPTION_KEY)")]
    MissingKey,
    #[error("a seed cannot be decrypted: wrong encryption key, or a ciphertext moved between rows")]
    WrongKey,
    #[error("a stored seed is malformed")]
    Malformed,
    #[error("a stored seed does not belong to its public key")]
    Mismatch,
    #[error("the key must be 32 bytes, base64-encoded (generate one with `nats-pg-auth generate-key`)")]
    BadKey,
    #[error("encryption failed")]
    Encrypt,
}

/// Encrypts and decrypts seeds. Cheap to clone.
#[derive(Clone)]
pub struct SeedCipher {
    aead: Option<Aes256Gcm>,
}

impl std::fmt::Debug for SeedCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.aead.is_some() { "SeedCipher(key set)" } else { "SeedCipher(no key)" })
    }
}

impl SeedCipher {
    pub fn new(key: Option<[u8; 32]>) -> Self {
        Self { aead: key.map(|k| Aes256Gcm::new(&k.into())) }
    }

    pub fn has_key(&self) -> bool {
        self.aead.is_some()
    }

    /// The stored form of `seed`: encrypted when a key is set, plain otherwise.
    pub fn seal(&self, seed: &str, public_key: &str) -> Result<String, KeyError> {
        let Some(aead) = &self.aead else {
            return Ok(seed.to_owned());
        };
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = aead
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: seed.as_bytes(), aad: public_key.as_bytes() })
            .map_err(|_| KeyError::Encrypt)?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        Ok(format!("{PREFIX_V1}{}", B64.encode(blob)))
    }

    /// Opens a stored seed (encrypted or plain).
    pub fn open(&self, stored: &str, public_key: &str) -> Result<SecretString, KeyError> {
        let Some(b64) = stored.strip_prefix(PREFIX_V1) else {
            if stored.starts_with('S') {
                return Ok(SecretString::from(stored.to_owned()));
            }
            return Err(KeyError::Malformed);
        };
        let aead = self.aead.as_ref().ok_or(KeyError::MissingKey)?;
        let blob = B64.decode(b64).map_err(|_| KeyError::Malformed)?;
        if blob.len() < 12 + 16 {
            return Err(KeyError::Malformed);
        }
        let (nonce, ct) = blob.split_at(12);
        let plain = aead
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: public_key.as_bytes() })
            .map_err(|_| KeyError::WrongKey)?;
        String::from_utf8(plain).map(SecretString::from).map_err(|_| KeyError::Malformed)
    }
}

pub fn is_encrypted(stored: &str) -> bool {
    stored.starts_with(PREFIX_V1)
}

/// Parses a base64 key of exactly 32 bytes.
pub fn parse_key(b64: &str) -> Result<[u8; 32], KeyError> {
    let bytes = B64.decode(b64.trim()).map_err(|_| KeyError::BadKey)?;
    bytes.try_into().map_err(|_| KeyError::BadKey)
}

/// A fresh random key, base64.
pub fn generate_key() -> String {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    B64.encode(k)
}

/// Loads a signing key pair from its stored seed and checks it is the expected identity.
pub fn keypair_from_stored(cipher: &SeedCipher, stored: &str, public_key: &str) -> Result<KeyPair, KeyError> {
    let seed = cipher.open(stored, public_key)?;
    let kp = KeyPair::from_seed(seed.expose_secret()).map_err(|_| KeyError::Malformed)?;
    if kp.public_key() != public_key {
        return Err(KeyError::Mismatch);
    }
    Ok(kp)
}

/// Loads a curve (xkey) key pair from its stored seed.
pub fn xkey_from_stored(cipher: &SeedCipher, stored: &str, public_key: &str) -> Result<XKey, KeyError> {
    let seed = cipher.open(stored, public_key)?;
    let x = XKey::from_seed(seed.expose_secret()).map_err(|_| KeyError::Malformed)?;
    if x.public_key() != public_key {
        return Err(KeyError::Mismatch);
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_row_binding() {
        let key = parse_key(&generate_key()).unwrap();
        let c = SeedCipher::new(Some(key));
        let kp = KeyPair::new_account();
        let seed = kp.seed().unwrap();
        let stored = c.seal(&seed, &kp.public_key()).unwrap();
        assert!(is_encrypted(&stored) && !stored.contains(&seed));
        assert_eq!(c.open(&stored, &kp.public_key()).unwrap().expose_secret(), seed);
        assert_eq!(keypair_from_stored(&c, &stored, &kp.public_key()).unwrap().public_key(), kp.public_key());
        // Moved to another row: the associated data no longer matches.
        let other = KeyPair::new_account();
        assert_eq!(c.open(&stored, &other.public_key()).unwrap_err(), KeyError::WrongKey);
        // Another key.
        let c2 = SeedCipher::new(Some(parse_key(&generate_key()).unwrap()));
        assert_eq!(c2.open(&stored, &kp.public_key()).unwrap_err(), KeyError::WrongKey);
        // No key.
        assert_eq!(SeedCipher::new(None).open(&stored, &kp.public_key()).unwrap_err(), KeyError::MissingKey);
    }

    #[test]
    fn plain_seeds_pass_through() {
        let c = SeedCipher::new(Some([7; 32]));
        let kp = KeyPair::new_user();
        let seed = kp.seed().unwrap();
        assert_eq!(c.open(&seed, &kp.public_key()).unwrap().expose_secret(), seed);
        assert_eq!(SeedCipher::new(None).seal(&seed, "x").unwrap(), seed);
        assert_eq!(keypair_from_stored(&c, &seed, &KeyPair::new_user().public_key()).unwrap_err(), KeyError::Mismatch);
    }

    #[test]
    fn key_parsing() {
        assert!(parse_key(&B64.encode([1u8; 31])).is_err());
        assert!(parse_key("not base64!").is_err());
        assert!(parse_key(&B64.encode([1u8; 32])).is_ok());
    }

    #[test]
    fn xkey_seal_open_uses_xkv1() {
        let a = XKey::new();
        let b = XKey::new();
        let sealed = a.seal(b"hello", &XKey::from_public_key(&b.public_key()).unwrap()).unwrap();
        assert!(sealed.starts_with(b"xkv1"));
        assert_eq!(b.open(&sealed, &XKey::from_public_key(&a.public_key()).unwrap()).unwrap(), b"hello");
        let stored = SeedCipher::new(None).seal(&b.seed().unwrap(), &b.public_key()).unwrap();
        assert_eq!(xkey_from_stored(&SeedCipher::new(None), &stored, &b.public_key()).unwrap().public_key(), b.public_key());
    }
}
