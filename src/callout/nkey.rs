//! nkey logins: the client proves it holds the seed of a user public nkey (`U…`) by signing the
//! nonce nats-server sent in INFO. nats-server does not check that signature for a callout
//! login (the key is not in its config), so the service does, before looking anything up.
//!
//! In the request: `connect_opts.nkey` (the public key), `connect_opts.sig` (ed25519 over the
//! nonce string's bytes, base64 raw-URL as the clients send it; standard base64 is accepted too,
//! as nats-server does) and `client_info.nonce` (filled by the server only when `sig` is set).

use base64::Engine as _;
use nkeys::{KeyPair, KeyPairType};

/// Why an nkey proof is refused. No variant holds the signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NkeyError {
    #[error("nkey {0:?} is not a user public key (U…) that decodes")]
    BadKey(String),
    #[error("nkey {0:?} came without a signature or without the server's nonce")]
    NoSignature(String),
    #[error("signature of nkey {0:?} over the server's nonce does not verify")]
    BadSignature(String),
}

/// Verifies that the holder of the user key `nkey` signed `nonce`.
pub fn verify(nkey: &str, sig: Option<&str>, nonce: Option<&str>) -> Result<(), NkeyError> {
    // The client chooses this string (any length): keep a bounded prefix for the log.
    let shown = || nkey.chars().take(60).collect::<String>();
    let key = KeyPair::from_public_key(nkey).map_err(|_| NkeyError::BadKey(shown()))?;
    if !matches!(key.key_pair_type(), KeyPairType::User) {
        return Err(NkeyError::BadKey(shown()));
    }
    let (Some(sig), Some(nonce)) = (
        sig.filter(|s| !s.is_empty()),
        nonce.filter(|n| !n.is_empty()),
    ) else {
        return Err(NkeyError::NoSignature(shown()));
    };
    let sig = decode_sig(sig).ok_or_else(|| NkeyError::BadSignature(shown()))?;
    key.verify(nonce.as_bytes(), &sig)
        .map_err(|_| NkeyError::BadSignature(shown()))
}

/// Raw-URL base64 (what clients send), else standard base64 (what nats-server also accepts).
fn decode_sig(sig: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    URL_SAFE_NO_PAD
        .decode(sig)
        .or_else(|_| STANDARD.decode(sig))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    #[test]
    fn a_user_key_signing_the_nonce_verifies_and_everything_else_is_refused() {
        let user = KeyPair::new_user();
        let nonce = "q3bQhbDgK0Q8Ew";
        let sig = user.sign(nonce.as_bytes()).unwrap();
        let pk = user.public_key();
        assert_eq!(
            verify(&pk, Some(&URL_SAFE_NO_PAD.encode(&sig)), Some(nonce)),
            Ok(())
        );
        assert_eq!(
            verify(&pk, Some(&STANDARD.encode(&sig)), Some(nonce)),
            Ok(())
        );
        assert!(matches!(
            verify(&pk, Some(&URL_SAFE_NO_PAD.encode(&sig)), Some("other")),
            Err(NkeyError::BadSignature(_))
        ));
        let other = KeyPair::new_user().sign(nonce.as_bytes()).unwrap();
        assert!(matches!(
            verify(&pk, Some(&URL_SAFE_NO_PAD.encode(other)), Some(nonce)),
            Err(NkeyError::BadSignature(_))
        ));
        assert!(matches!(
            verify(&pk, None, Some(nonce)),
            Err(NkeyError::NoSignature(_))
        ));
        assert!(matches!(
            verify(&pk, Some("sig"), None),
            Err(NkeyError::NoSignature(_))
        ));
        // An account key, an operator key, a key with a broken checksum.
        let account = KeyPair::new_account();
        let sig = URL_SAFE_NO_PAD.encode(account.sign(nonce.as_bytes()).unwrap());
        assert!(matches!(
            verify(&account.public_key(), Some(&sig), Some(nonce)),
            Err(NkeyError::BadKey(_))
        ));
        let mut broken = pk.clone();
        broken.replace_range(10..11, if &pk[10..11] == "A" { "B" } else { "A" });
        assert!(matches!(
            verify(&broken, Some(&sig), Some(nonce)),
            Err(NkeyError::BadKey(_))
        ));
    }
}
