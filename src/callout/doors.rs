//! The nkey and certificate doors of the callout: `decide` hands a client that sent neither a
//! token nor user/password here. The proofs themselves are checked in [`super::nkey`] and
//! [`super::certificate`]; this part finds the user (login copy, Postgres, or the copy during
//! an outage, like passwords and tokens) and turns failures into deny reasons.

use std::sync::Arc;
use std::time::Instant;

use super::certificate::{self as cert, CertError, Choice};
use super::login::Login;
use super::nkey::{verify, NkeyError};
use super::request::VerifiedRequest;
use super::{Callout, Deny, DenyReason};
use crate::copy::CredentialLookup;
use crate::copy::{Found, Read};
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
            CredentialLookup::Unknown => Found {
                value: None,
                from_copy: false,
            },
            CredentialLookup::Miss => {
                let read = self
                    .read_or_copy(deadline, db::logins::by_nkey(&self.pool, key), || {
                        self.cache.copy_nkey(key)
                    })
                    .await?;
                match read {
                    Read::Postgres(row) => Found {
                        value: row.map(|r| Arc::new(self.prepare(r))),
                        from_copy: false,
                    },
                    Read::Copy(found) => found,
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
            // Not returned for certificates (only a verified chain gets here).
            CredentialLookup::Unknown => Found {
                value: None,
                from_copy: false,
            },
            CredentialLookup::Miss => {
                let read = self
                    .read_or_copy(
                        deadline,
                        db::logins::by_certificate(
                            &self.pool,
                            &presented.fingerprint,
                            &presented.sans,
                            &presented.subject_loose(),
                        ),
                        || self.cache.copy_certificate(&presented),
                    )
                    .await?;
                let choose =
                    |candidates| cert::choose(candidates, &presented, |l: &Arc<Login>| l.user_id);
                match read {
                    Read::Postgres(rows) => {
                        let candidates = rows
                            .into_iter()
                            .filter_map(|(row, part)| {
                                let m = cert::Mapping::from_part(&part)?;
                                Some((Arc::new(self.prepare(row)), m))
                            })
                            .collect();
                        Found {
                            value: Some(choose(candidates)),
                            from_copy: false,
                        }
                    }
                    Read::Copy(found) => Found {
                        value: found.value.map(choose),
                        from_copy: found.from_copy,
                    },
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
}
