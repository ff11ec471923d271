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

// ---- the nkey and certificate doors of the callout -----------------------------------------

use std::sync::Arc;
use std::time::Instant;

use super::certificate::{self as cert, CertError, Choice};
use super::copy::Found;
use super::login::Login;
use super::request::VerifiedRequest;
use super::{Callout, Deny, DenyReason};
use crate::cache::CredentialLookup;
use crate::db;

impl Callout {
    /// A client that sent neither a token nor user/password: an nkey when it sent one, else its
    /// client certificate. (A token, then user/password, win over both: `decide`. An nkey wins
    /// over a certificate: a client that went to the trouble of signing names its identity.)
    pub(super) async fn check_nkey_or_certificate(
        &self,
        req: &VerifiedRequest,
        now: i64,
        deadline: Instant,
    ) -> Result<(Arc<Login>, bool), Deny> {
        match req.claims.nats.connect_opts.nkey.as_deref() {
            Some(key) if !key.is_empty() => self.check_nkey(req, key, deadline).await,
            _ => self.check_certificate(req, now, deadline).await,
        }
    }

    /// Verifies the nonce signature, then finds the user holding `key`.
    pub(super) async fn check_nkey(
        &self,
        req: &VerifiedRequest,
        key: &str,
        deadline: Instant,
    ) -> Result<(Arc<Login>, bool), Deny> {
        let nats = &req.claims.nats;
        verify(
            key,
            nats.connect_opts.sig.as_deref(),
            nats.client_info.nonce.as_deref(),
        )
        .map_err(|e| {
            let reason = match e {
                NkeyError::BadKey(_) => DenyReason::BadNkey,
                NkeyError::NoSignature(_) | NkeyError::BadSignature(_) => DenyReason::BadSignature,
            };
            Deny::new(reason, e.to_string())
        })?;
        let found = match self.cache.nkey(key) {
            CredentialLookup::Hit(login) => Found {
                value: Some(login),
                from_copy: false,
            },
            CredentialLookup::Miss if self.skip_postgres() => {
                self.answer_from_copy(|| self.cache.copy_nkey(key), "still down")?
            }
            CredentialLookup::Miss => {
                let slot = self.db_slot(deadline).await?;
                let read = self
                    .db_read(deadline, db::logins::by_nkey(&self.pool, key))
                    .await;
                drop(slot);
                match read {
                    Ok(row) => {
                        self.cache.postgres_answered();
                        Found {
                            value: row.map(|r| Arc::new(self.prepare(r))),
                            from_copy: false,
                        }
                    }
                    Err(why) => self.answer_from_copy(|| self.cache.copy_nkey(key), &why)?,
                }
            }
        };
        match found.value {
            Some(login) => Ok((login, found.from_copy)),
            None => Err(Deny::new(
                DenyReason::UnknownNkey,
                format!("no user has nkey {key:?}"),
            )),
        }
    }

    /// The verified client certificate, mapped to a user by `nats.user_certificates`.
    pub(super) async fn check_certificate(
        &self,
        req: &VerifiedRequest,
        now: i64,
        deadline: Instant,
    ) -> Result<(Arc<Login>, bool), Deny> {
        let presented = cert::presented(req.claims.nats.client_tls.as_ref(), now).map_err(|e| {
            let reason = match e {
                CertError::None => {
                    return Deny::new(
                        DenyReason::NoCredentials,
                        "client sent no user/password, token, nkey or client certificate",
                    )
                }
                CertError::NotVerified => DenyReason::CertificateNotVerified,
                CertError::Unparsable(_) => DenyReason::BadCertificate,
                CertError::OutsideValidity { .. } => DenyReason::CertificateExpired,
            };
            Deny::new(reason, e.to_string())
        })?;
        let choice = match self.cache.certificate(&presented) {
            CredentialLookup::Hit(Ok((login, m))) => Found {
                value: Some(Choice::One(login, m)),
                from_copy: false,
            },
            CredentialLookup::Hit(Err(users)) => Found {
                value: Some(Choice::Ambiguous(users)),
                from_copy: false,
            },
            CredentialLookup::Miss if self.skip_postgres() => {
                self.certificate_from_copy(&presented, "still down")?
            }
            CredentialLookup::Miss => {
                let slot = self.db_slot(deadline).await?;
                let read = self
                    .db_read(
                        deadline,
                        db::logins::by_certificate(
                            &self.pool,
                            &presented.fingerprint,
                            &presented.sans,
                            &presented.subject_loose(),
                        ),
                    )
                    .await;
                drop(slot);
                match read {
                    Ok(rows) => {
                        self.cache.postgres_answered();
                        let candidates = rows
                            .into_iter()
                            .filter_map(|(row, part)| {
                                let m = cert::Mapping::from_part(&part)?;
                                Some((Arc::new(self.prepare(row)), m))
                            })
                            .collect();
                        Found {
                            value: Some(cert::choose(candidates, &presented, |l| l.user_id)),
                            from_copy: false,
                        }
                    }
                    Err(why) => self.certificate_from_copy(&presented, &why)?,
                }
            }
        };
        let who = || {
            format!(
                "certificate {:?} (sha256 {})",
                presented.subject_dn,
                presented.fingerprint_hex()
            )
        };
        match choice.value {
            Some(Choice::One(login, m)) => {
                tracing::debug!(user = %login.username, mapping = m.cert_id, "{} mapped", who());
                Ok((login, choice.from_copy))
            }
            Some(Choice::Ambiguous(users)) => Err(Deny::new(
                DenyReason::AmbiguousCertificate,
                format!(
                    "{} matches equally specific nats.user_certificates rows of users {users:?}; make one mapping more specific (e.g. by fingerprint) or delete one",
                    who()
                ),
            )),
            Some(Choice::Nothing) | None => Err(Deny::new(
                DenyReason::UnknownCertificate,
                format!("{} is mapped to no user (nats.user_certificates)", who()),
            )),
        }
    }

    fn certificate_from_copy(
        &self,
        presented: &cert::Presented,
        why: &str,
    ) -> Result<Found<Choice<Arc<Login>>>, Deny> {
        let found = self.answer_from_copy(|| self.cache.copy_certificate(presented), why)?;
        Ok(Found {
            value: found
                .value
                .map(|c| cert::choose(c, presented, |l: &Arc<Login>| l.user_id)),
            from_copy: found.from_copy,
        })
    }
}
