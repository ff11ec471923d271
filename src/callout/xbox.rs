//! xkey boxes with the Diffie-Hellman step done once per server instead of twice per request.
//!
//! `nkeys::XKey::open`/`seal` derive the shared key (an X25519 scalar multiplication, ~50 µs
//! here) on every call: opening the request and sealing the response paid it twice, ~40% of
//! a warm decision's CPU. A server keeps its xkey until it restarts, so the precomputed box is
//! kept per server public key (taken from the request's header every time, as the protocol
//! requires; only the arithmetic is remembered). The wire layout is nkeys' own: `xkv1`, a
//! 24-byte nonce, then the NaCl box.

use std::sync::Arc;

use crypto_box::aead::{Aead, AeadCore};
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use data_encoding::BASE32_NOPAD;
use moka::sync::Cache;
use nkeys::XKey;

const XKV1: &[u8] = b"xkv1";
const NONCE_LEN: usize = 24;

/// The AUTH curve key plus the boxes shared with the servers seen recently.
pub struct ServerBoxes {
    ours: SecretKey,
    boxes: Cache<String, Arc<SalsaBox>>,
}

/// The 32 raw bytes inside an nkeys-encoded key: `[prefix…][32 bytes][crc16]`.
fn raw(encoded: &str, prefix_len: usize) -> Option<[u8; 32]> {
    let bytes = BASE32_NOPAD.decode(encoded.trim().as_bytes()).ok()?;
    bytes.get(prefix_len..prefix_len + 32)?.try_into().ok()
}

impl ServerBoxes {
    /// None when the key has no seed or its seed does not give its public key (then the
    /// callout keeps using nkeys' own open/seal).
    pub fn new(ours: &XKey) -> Option<ServerBoxes> {
        let seed = ours.seed().ok()?;
        let secret = SecretKey::from_bytes(raw(&seed, 2)?);
        let public = raw(&ours.public_key(), 1)?;
        if secret.public_key().as_bytes() != &public {
            return None;
        }
        Some(ServerBoxes {
            ours: secret,
            boxes: Cache::builder()
                .max_capacity(1024)
                .time_to_idle(std::time::Duration::from_secs(3600))
                .build(),
        })
    }

    /// The box shared with the server whose (already validated) curve public key is given.
    pub fn with(&self, server: &XKey) -> Option<Arc<SalsaBox>> {
        let key = server.public_key();
        if let Some(b) = self.boxes.get(&key) {
            return Some(b);
        }
        let b = Arc::new(SalsaBox::new(
            &PublicKey::from_bytes(raw(&key, 1)?),
            &self.ours,
        ));
        self.boxes.insert(key, b.clone());
        Some(b)
    }
}

/// Opens `xkv1 | nonce | box`.
pub fn open(b: &SalsaBox, payload: &[u8]) -> Option<Vec<u8>> {
    let rest = payload.strip_prefix(XKV1)?;
    if rest.len() <= NONCE_LEN {
        return None;
    }
    let (nonce, ct) = rest.split_at(NONCE_LEN);
    b.decrypt(nonce.into(), ct).ok()
}

/// Seals to `xkv1 | nonce | box` with a fresh random nonce.
pub fn seal(b: &SalsaBox, msg: &[u8]) -> Option<Vec<u8>> {
    let nonce = SalsaBox::generate_nonce(&mut rand::rngs::OsRng);
    let ct = b.encrypt(&nonce, msg).ok()?;
    let mut out = Vec::with_capacity(XKV1.len() + NONCE_LEN + ct.len());
    out.extend_from_slice(XKV1);
    out.extend_from_slice(nonce.as_slice());
    out.extend_from_slice(&ct);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interoperates_with_nkeys_both_ways() {
        let auth = XKey::new();
        let server = XKey::new();
        let boxes = ServerBoxes::new(&auth).expect("seeded key");
        let server_pub = XKey::from_public_key(&server.public_key()).unwrap();
        let b = boxes.with(&server_pub).unwrap();
        // Server → us, sealed by nkeys, opened by the precomputed box.
        let sealed = server.seal(b"request", &auth).unwrap();
        assert_eq!(open(&b, &sealed).unwrap(), b"request");
        // Us → server, sealed by the box, opened by nkeys.
        let reply = seal(&b, b"response").unwrap();
        assert_eq!(server.open(&reply, &auth).unwrap(), b"response");
        // Cached, and not confused with another server.
        assert!(Arc::ptr_eq(&b, &boxes.with(&server_pub).unwrap()));
        let other = XKey::new();
        let b2 = boxes
            .with(&XKey::from_public_key(&other.public_key()).unwrap())
            .unwrap();
        assert!(open(&b2, &sealed).is_none());
        assert!(open(&b, b"xkv1short").is_none());
    }

    #[test]
    fn a_public_only_key_has_no_boxes() {
        let k = XKey::new();
        assert!(ServerBoxes::new(&XKey::from_public_key(&k.public_key()).unwrap()).is_none());
    }
}
