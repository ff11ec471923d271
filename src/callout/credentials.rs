//! Password and token checks.
//!
//! Password hashes are verified on threads of their own, at low priority, queued per account
//! ("the hashing lane", see [`super::lane`]): bcrypt at cost 10 takes ~85 ms of CPU, and a flood
//! of cold password logins must neither stall the async runtime, nor take every thread from
//! token logins, nor starve another account's password logins.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::lane::{self, Go, Job, Lane, LaneKey};

/// A valid bcrypt hash of a random password nobody knows. Unknown users are checked against it
/// so that "no such user" and "wrong password" take the same time.
const FALLBACK_BCRYPT: &str = "$2b$10$Y5b1dW8Oq8N3Tbq7u3jY1eE8m4C7wWl6o5v9X0xH0x7h3lQe6dG1K";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashError {
    /// The stored hash is neither bcrypt nor argon2id (or is corrupt): an admin must fix the row.
    UnsupportedHash,
    /// The stored hash asks for more work than the service allows (`--max-bcrypt-cost`,
    /// `--max-argon2-*`); it was refused without hashing. Says which parameter, in words.
    OutOfBounds(String),
    /// The blocking task died (panic) — ours, not the caller's.
    Worker,
    /// No hashing slot came free before the deadline (the server would have given up anyway).
    Busy,
    /// The account already has its share of checks waiting in the lane
    /// ([`QUEUED_PER_THREAD`] per hashing thread); refused without queueing.
    QueueFull,
}

/// Niceness of the hashing threads. On a small machine bcrypt would otherwise take every core
/// from the async runtime (and from nats-server next to it); at nice 10 the scheduler gives
/// the hashing threads about a tenth of a contended core, so token and cached logins keep their
/// latency while cold ones still use every idle cycle.
pub const HASH_THREAD_NICE: i32 = 10;

/// The work factors a stored hash may ask for. A hash sets its own cost: without bounds one row
/// (`$2b$31$…`: a day per check; `m=4294967295`: terabytes) stalls or aborts the service on
/// every login attempt for that username. Checked before any hashing; the schema has the same
/// bounds (`nats.password_hash_limits()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashLimits {
    pub max_bcrypt_cost: u32,
    /// argon2id `m`, in KiB.
    pub max_argon2_memory_kib: u32,
    /// argon2id `t`.
    pub max_argon2_iterations: u32,
    /// argon2id `p`.
    pub max_argon2_parallelism: u32,
}

/// bcrypt's own floor (and the schema's).
pub const MIN_BCRYPT_COST: u32 = 4;

/// The defaults keep one check well inside nats-server's 2 s auth timeout and the lane's memory
/// well inside the 512 MiB the manifests give the container (measured on a 2-core machine, see
/// BENCHMARKS.md "Hashing lane"): bcrypt cost 12 takes ~350 ms (13: ~700 ms, 14: ~1.3 s);
/// argon2id m=64 MiB, t=8 ~270 ms, and the default three threads hold at most 192 MiB. The schema's
/// `nats.password_hash_limits()` has the same bounds.
impl Default for HashLimits {
    fn default() -> Self {
        Self {
            max_bcrypt_cost: 12,
            max_argon2_memory_kib: 65_536,
            max_argon2_iterations: 8,
            max_argon2_parallelism: 16,
        }
    }
}

impl HashLimits {
    /// Why `hash` may not be computed under these limits (None: it may). Only the parameters
    /// are looked at; a malformed hash is left to the verifier to refuse.
    pub fn problem(&self, hash: &str) -> Option<String> {
        if let Some(rest) = ["$2a$", "$2b$", "$2y$", "$2x$"]
            .iter()
            .find_map(|p| hash.strip_prefix(p))
        {
            let digits = rest.split('$').next().unwrap_or_default();
            let cost = (!digits.is_empty()
                && digits.len() <= 2
                && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u32>().ok())
            .flatten();
            let Some(cost) = cost else {
                return Some("bcrypt cost is not a number of one or two digits".into());
            };
            if !(MIN_BCRYPT_COST..=self.max_bcrypt_cost).contains(&cost) {
                return Some(format!(
                    "bcrypt cost {cost} is outside {MIN_BCRYPT_COST}..{} (--max-bcrypt-cost)",
                    self.max_bcrypt_cost
                ));
            }
            return None;
        }
        if hash.starts_with("$argon2id$") {
            use argon2::password_hash::PasswordHash;
            // Unparseable: the verifier refuses it as unsupported, without hashing.
            let parsed = PasswordHash::new(hash).ok()?;
            let param = |name: &str| -> Option<u64> {
                parsed
                    .params
                    .get_str(name)
                    .map(|v| v.parse::<u64>().unwrap_or(u64::MAX))
            };
            let checks = [
                (
                    "m",
                    "memory",
                    self.max_argon2_memory_kib,
                    "--max-argon2-memory-kib",
                ),
                (
                    "t",
                    "iterations",
                    self.max_argon2_iterations,
                    "--max-argon2-iterations",
                ),
                (
                    "p",
                    "parallelism",
                    self.max_argon2_parallelism,
                    "--max-argon2-parallelism",
                ),
            ];
            for (name, what, max, flag) in checks {
                // argon2's defaults apply to a missing parameter; those are within any limit
                // worth setting, but say so rather than guess: refuse it.
                let Some(v) = param(name) else {
                    return Some(format!("argon2id {what} ({name}=) is missing"));
                };
                if v == 0 || v > u64::from(max) {
                    return Some(format!(
                        "argon2id {what} {name}={v} is outside 1..{max} ({flag})"
                    ));
                }
            }
            return None;
        }
        None
    }
}

/// The hashing lane: at most `threads` hashes at once, on threads of its own (named
/// `npa-hash`, at low priority), shared fairly between accounts (see [`super::lane`]). Only
/// password checks that miss the credential cache come here; token and cached logins never
/// wait on it.
#[derive(Clone)]
pub struct PasswordVerifier {
    limits: HashLimits,
    lane: Arc<Lane>,
    computed: Arc<AtomicU64>,
}

/// Checks one account may have waiting, per hashing thread. A check waits for the ones of its
/// account queued before it (other accounts' only in turn): 16 per thread is about 1.4 s of
/// bcrypt cost 10 on two threads, more than a login can wait anyway.
pub const QUEUED_PER_THREAD: usize = 16;

fn lower_priority() {
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), HASH_THREAD_NICE)
    {
        tracing::debug!(error = %e, "cannot lower the priority of a hashing thread");
    }
}

impl PasswordVerifier {
    pub fn new(threads: usize) -> Self {
        Self::with_limits(threads, HashLimits::default())
    }

    /// A lane whose hashes must stay within `limits` (refused without hashing otherwise).
    pub fn with_limits(threads: usize, limits: HashLimits) -> Self {
        let threads = threads.max(1);
        let lane = Lane::start(
            threads,
            threads * QUEUED_PER_THREAD,
            "npa-hash",
            lower_priority,
        );
        Self {
            limits,
            lane: Arc::new(lane),
            computed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many hashes (bcrypt/argon2, including the dummy one for unknown users) were computed.
    pub fn hashes_computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// Verifies `password` against a stored hash, or against the fallback hash when the user does
    /// not exist (`hash = None`; the result is then always false), in `key`'s share of the lane.
    /// Gives up with `Busy` when the check cannot start before `deadline`, and with `QueueFull`
    /// when `key` already has its share of checks waiting.
    pub async fn verify(
        &self,
        password: SecretString,
        hash: Option<String>,
        key: LaneKey,
        deadline: Instant,
    ) -> Result<bool, HashError> {
        // Before queueing: an out-of-bounds hash costs nothing.
        if let Some(problem) = hash.as_deref().and_then(|h| self.limits.problem(h)) {
            return Err(HashError::OutOfBounds(problem));
        }
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| FALLBACK_BCRYPT.to_owned());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let limits = self.limits;
        let computed = self.computed.clone();
        let job = Job {
            deadline,
            work: Box::new(move |go| {
                // The caller gave up (its deadline passed): nothing to hash for.
                if go == Go::Expired || tx.is_closed() {
                    let _ = tx.send(Err(HashError::Busy));
                    return;
                }
                computed.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(verify_within(password.expose_secret(), &hash, &limits));
            }),
        };
        match self.lane.submit(key, job) {
            Ok(()) => {}
            Err(lane::Refused::QueueFull) => return Err(HashError::QueueFull),
            Err(lane::Refused::Closed) => return Err(HashError::Worker),
        }
        // Past the deadline the server has given up: stop waiting (the job, if not started,
        // sees the closed channel and is dropped without hashing).
        let ok = match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => return Err(HashError::Busy),
            // A panicking job drops `tx`: reported as Worker.
            Ok(r) => r.map_err(|_| HashError::Worker)??,
        };
        Ok(ok && known)
    }
}

/// Synchronous check under the default [`HashLimits`]; public for benchmarks.
pub fn verify_blocking(password: &str, hash: &str) -> Result<bool, HashError> {
    verify_within(password, hash, &HashLimits::default())
}

/// Synchronous check; never calls bcrypt/argon2 with parameters outside `limits`.
pub fn verify_within(password: &str, hash: &str, limits: &HashLimits) -> Result<bool, HashError> {
    if let Some(problem) = limits.problem(hash) {
        return Err(HashError::OutOfBounds(problem));
    }
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

    /// A hash sets its own work factor: outside the limits it is refused before bcrypt/argon2
    /// runs. Without the check, `$2b$31$` takes a day and `m=4294967295` aborts the process.
    #[test]
    fn out_of_bounds_work_factors_are_refused_without_hashing() {
        let limits = HashLimits::default();
        let salt_and_hash = "Y5b1dW8Oq8N3Tbq7u3jY1eE8m4C7wWl6o5v9X0xH0x7h3lQe6dG1K";
        let started = std::time::Instant::now();
        for cost in ["31", "15", "13", "03", "99", "+9", "1x"] {
            let h = format!("$2b${cost}${salt_and_hash}");
            assert!(
                matches!(
                    verify_within("x", &h, &limits),
                    Err(HashError::OutOfBounds(_))
                ),
                "{h}"
            );
        }
        for params in [
            "m=4294967295,t=1,p=1",
            "m=1048577,t=1,p=1",
            "m=65537,t=1,p=1",
            "m=19456,t=9,p=1",
            "m=19456,t=2,p=17",
            "m=19456,t=0,p=1",
        ] {
            let h = format!("$argon2id$v=19${params}$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA");
            let got = verify_within("x", &h, &limits);
            assert!(
                matches!(got, Err(HashError::OutOfBounds(_))),
                "{h}: {got:?}"
            );
        }
        let huge =
            "$argon2id$v=19$m=99999999999999999999999,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert!(verify_within("x", huge, &limits).is_err());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "nothing was hashed"
        );
        // The message says which parameter and which flag.
        let Err(HashError::OutOfBounds(why)) =
            verify_within("x", &format!("$2b$31${salt_and_hash}"), &limits)
        else {
            panic!("refused")
        };
        assert!(
            why.contains("cost 31") && why.contains("--max-bcrypt-cost"),
            "{why}"
        );

        // Within the limits they are verified as before; a lower limit refuses them.
        let h = bcrypt::hash("s3cret", 5).unwrap();
        assert_eq!(verify_within("s3cret", &h, &limits), Ok(true));
        let strict = HashLimits {
            max_bcrypt_cost: 4,
            max_argon2_memory_kib: 1024,
            ..limits
        };
        assert!(matches!(
            verify_within("s3cret", &h, &strict),
            Err(HashError::OutOfBounds(_))
        ));
        use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
        let a = argon2::Argon2::default()
            .hash_password(b"s3cret", &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string(); // m=19456,t=2,p=1
        assert_eq!(verify_within("s3cret", &a, &limits), Ok(true));
        assert!(matches!(
            verify_within("s3cret", &a, &strict),
            Err(HashError::OutOfBounds(_))
        ));
    }

    #[tokio::test]
    async fn the_lane_refuses_out_of_bounds_hashes_without_computing() {
        let v = PasswordVerifier::with_limits(
            1,
            HashLimits {
                max_bcrypt_cost: 5,
                ..HashLimits::default()
            },
        );
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let h6 = bcrypt::hash("pw", 6).unwrap();
        let got = v
            .verify(
                SecretString::from("pw".to_owned()),
                Some(h6),
                LaneKey::Unknown,
                deadline,
            )
            .await;
        assert!(matches!(got, Err(HashError::OutOfBounds(_))), "{got:?}");
        assert_eq!(v.hashes_computed(), 0);
        let h5 = bcrypt::hash("pw", 5).unwrap();
        let got = v
            .verify(
                SecretString::from("pw".to_owned()),
                Some(h5),
                LaneKey::Unknown,
                deadline,
            )
            .await;
        assert_eq!(got, Ok(true));
        assert_eq!(v.hashes_computed(), 1);
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
