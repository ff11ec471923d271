//! Password and token checks.
//!
//! Password hashes are verified on threads of their own, at low priority, behind a semaphore
//! ("the hashing lane"): bcrypt at cost 10 takes ~50 ms of CPU, and a flood of cold password
//! logins must neither stall the async runtime nor take every thread from token logins.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

/// A valid bcrypt hash of a random password nobody knows. Unknown users are checked against it
/// so that "no such user" and "wrong password" take the same time.
const FALLBACK_BCRYPT: &str = "$2b$10$Y5b1dW8Oq8N3Tbq7u3jY1eE8m4C7wWl6o5v9X0xH0x7h3lQe6dG1K";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashError {
    /// The stored hash is neither bcrypt nor argon2id (or is corrupt): an admin must fix the row.
    UnsupportedHash,
    /// The blocking task died (panic) — ours, not the caller's.
    Worker,
    /// No hashing slot came free before the deadline (the server would have given up anyway).
    Busy,
}

/// Niceness of the hashing threads. On a small machine bcrypt would otherwise take every core
/// from the async runtime (and from nats-server next to it); at nice 10 the scheduler gives
/// the hashing threads about a tenth of a contended core, so token and cached logins keep their
/// latency while cold ones still use every idle cycle.
pub const HASH_THREAD_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// The hashing lane: at most `threads` hashes at once, on threads of its own (named
/// `npa-hash`, at low priority). Only password checks that miss the credential cache come
/// here; token and cached logins never wait on it.
#[derive(Clone)]
pub struct PasswordVerifier {
    lane: Arc<Semaphore>,
    computed: Arc<AtomicU64>,
    jobs: std::sync::mpsc::Sender<Job>,
}

impl PasswordVerifier {
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("npa-hash-{i}"))
                .spawn(move || {
                    if let Err(e) = rustix::process::setpriority_process(
                        Some(rustix::thread::gettid()),
                        HASH_THREAD_NICE,
                    ) {
                        tracing::debug!(error = %e, "cannot lower the priority of a hashing thread");
                    }
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // the verifier is gone
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        Self {
            lane: Arc::new(Semaphore::new(threads)),
            computed: Arc::new(AtomicU64::new(0)),
            jobs,
        }
    }

    /// How many hashes (bcrypt/argon2, including the dummy one for unknown users) were computed.
    pub fn hashes_computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// Verifies `password` against a stored hash, or against the fallback hash when the user does
    /// not exist (`hash = None`; the result is then always false). Gives up with `Busy` when no
    /// hashing slot is free before `deadline`.
    pub async fn verify(
        &self,
        password: SecretString,
        hash: Option<String>,
        deadline: Instant,
    ) -> Result<bool, HashError> {
        let _permit = tokio::time::timeout_at(deadline.into(), self.lane.acquire())
            .await
            .map_err(|_| HashError::Busy)?
            .map_err(|_| HashError::Worker)?;
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| FALLBACK_BCRYPT.to_owned());
        self.computed.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(verify_blocking(password.expose_secret(), &hash));
            }))
            .map_err(|_| HashError::Worker)?;
        // A panicking job drops `tx`: reported as Worker.
        let ok = rx.await.map_err(|_| HashError::Worker)??;
        Ok(ok && known)
    }
}

/// Synchronous check; public for benchmarks.
pub fn verify_blocking(password: &str, hash: &str) -> Result<bool, HashError> {
    if hash.starts_with("$2a$")
        || hash.starts_with("$2b$")
        || hash.starts_with("$2y$")
        || hash.starts_with("$2x$")
    {
        bcrypt::verify(password, hash).map_err(|_| HashError::UnsupportedHash)
    } else if hash.starts_with("$argon2id$") {
        use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
        let parsed = PasswordHash::new(hash).map_err(|_| HashError::UnsupportedHash)?;
        Ok(argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    } else {
        Err(HashError::UnsupportedHash)
    }
}

/// SHA-256 of a bearer token, as `digest(token, 'sha256')` stores it.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Constant-time comparison of the looked-up digest with ours. The index lookup already matched
/// on equality; this guards against a future lookup that is not exact (prefix, collation).
pub fn digest_matches(stored: &[u8], ours: &[u8; 32]) -> bool {
    stored.len() == 32 && bool::from(stored.ct_eq(ours))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_hash_is_valid_bcrypt() {
        assert_eq!(verify_blocking("anything", FALLBACK_BCRYPT), Ok(false));
    }

    #[test]
    fn bcrypt_variants_and_argon2id_verify() {
        let h = bcrypt::hash("s3cret", 4).unwrap();
        assert_eq!(verify_blocking("s3cret", &h), Ok(true));
        assert_eq!(verify_blocking("nope", &h), Ok(false));
        // pgcrypto writes $2a$; the same hash under $2a$ must verify.
        let h2a = h.replacen("$2b$", "$2a$", 1);
        assert_eq!(verify_blocking("s3cret", &h2a), Ok(true));

        use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut OsRng);
        let a = argon2::Argon2::default()
            .hash_password(b"s3cret", &salt)
            .unwrap()
            .to_string();
        assert!(a.starts_with("$argon2id$"));
        assert_eq!(verify_blocking("s3cret", &a), Ok(true));
        assert_eq!(verify_blocking("nope", &a), Ok(false));
    }

    #[test]
    fn garbage_hash_is_an_error_not_a_match() {
        assert_eq!(
            verify_blocking("x", "plaintext"),
            Err(HashError::UnsupportedHash)
        );
        assert_eq!(
            verify_blocking("x", "$2b$10$short"),
            Err(HashError::UnsupportedHash)
        );
    }

    #[test]
    fn token_digest_matches_pgcrypto() {
        // SELECT encode(digest('abc', 'sha256'), 'hex')
        let d = token_digest("abc");
        assert_eq!(
            data_encoding::HEXLOWER.encode(&d),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(digest_matches(&d, &d));
        assert!(!digest_matches(&d[..31], &d));
    }
}
