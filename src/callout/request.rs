//! Turning a `$SYS.REQ.USER.AUTH` message into a verified authorization request.
//!
//! Order matters: open the xkey box (if any), then verify the JWT signature against its issuer
//! (a server key), then the claims. Nothing from the request is trusted before the signature.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crypto_box::SalsaBox;
use nkeys::XKey;

use super::xbox::{self, ServerBoxes};

use crate::jwt::{self, claims::AuthorizationRequest, Claims};

/// Header carrying the server's curve key when AUTH has an `xkey` (protocol doc §3.4).
pub const SERVER_XKEY_HEADER: &str = "Nats-Server-Xkey";
const XKV1: &[u8] = b"xkv1";

/// Clock difference with nats-server tolerated by `verify` and `verify_with` (`--clock-skew`).
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(5);
/// nats-server's default auth timeout (`authorization { timeout }`): how long a request may
/// take to answer when it does not say (`--auth-timeout`).
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Kept free at the end of the window to send the reply.
pub const REPLY_MARGIN: Duration = Duration::from_millis(250);

/// Why a request was refused before any credential was looked at. `Copy` so it doubles as a
/// metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request is sealed but has no Nats-Server-Xkey header")]
    MissingServerXkey,
    #[error("Nats-Server-Xkey header is not a curve public key")]
    BadServerXkey,
    #[error("cannot open the sealed request (wrong xkey or corrupt payload)")]
    Decrypt,
    #[error("payload is not a valid signed JWT")]
    BadJwt,
    #[error("issuer is not a server key")]
    IssuerNotServer,
    #[error("audience is not nats-authorization-request")]
    BadAudience,
    #[error("request expired {by_secs}s before it arrived, beyond the clock-skew tolerance")]
    Expired { by_secs: u64 },
    #[error("request is for another callout account")]
    WrongAccount,
    #[error("claims are not an authorization request")]
    WrongType,
    #[error("user_nkey or server id is missing or malformed")]
    MissingFields,
}

impl RequestError {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestError::MissingServerXkey => "missing_server_xkey",
            RequestError::BadServerXkey => "bad_server_xkey",
            RequestError::Decrypt => "decrypt",
            RequestError::BadJwt => "bad_jwt",
            RequestError::IssuerNotServer => "issuer_not_server",
            RequestError::BadAudience => "bad_audience",
            RequestError::Expired { .. } => "expired",
            RequestError::WrongAccount => "wrong_account",
            RequestError::WrongType => "wrong_type",
            RequestError::MissingFields => "missing_fields",
        }
    }
}

/// A request that passed every check.
pub struct VerifiedRequest {
    pub claims: Claims<AuthorizationRequest>,
    /// The server's curve key, when the request came sealed; the reply is sealed to it.
    pub server_xkey: Option<XKey>,
    /// The precomputed box shared with that server, when `verify_with` had one.
    pub server_box: Option<Arc<SalsaBox>>,
}

impl VerifiedRequest {
    pub fn user_nkey(&self) -> &str {
        &self.claims.nats.user_nkey
    }
    pub fn server_id(&self) -> &str {
        &self.claims.nats.server_id.id
    }

    /// How long anything may wait for this request, counted from when it was received here.
    /// nats-server waits its auth timeout (`exp - iat`, both its own clock) from when it sent the
    /// request, so that length is used rather than `exp - now`, which a clock off by a few
    /// seconds would shrink to nothing (or stretch). Minus a margin to send the reply.
    pub fn budget(&self) -> Duration {
        self.window(DEFAULT_AUTH_TIMEOUT)
            .saturating_sub(REPLY_MARGIN)
            .max(REPLY_MARGIN)
    }

    /// How long the server waits for the answer from when it sent the request: `exp - iat`
    /// (both its own clock), else `auth_timeout` (the configured one).
    pub fn window(&self, auth_timeout: Duration) -> Duration {
        match self.claims.exp {
            Some(exp) if self.claims.iat > 0 && exp > self.claims.iat => {
                Duration::from_secs((exp - self.claims.iat) as u64).min(Duration::from_secs(60))
            }
            _ => auth_timeout,
        }
    }
}

/// Requests that arrive already expired beyond the tolerance mean this host's clock is off from
/// nats-server's (or replies are badly late). Counts them and says so in the log: at once, then
/// at most once per `every`.
pub struct ClockWatch {
    every: Duration,
    expired: AtomicU64,
    /// When the last warning was logged, and how many expired requests came since.
    last: Mutex<(Option<Instant>, u64)>,
}

impl Default for ClockWatch {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl ClockWatch {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            expired: AtomicU64::new(0),
            last: Mutex::new((None, 0)),
        }
    }

    /// Records a request that was `by_secs` past its `exp` on arrival. Returns the warning to
    /// log, when one is due.
    pub fn expired(&self, by_secs: u64, at: Instant) -> Option<String> {
        self.expired.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.1 += 1;
        if last.0.is_some_and(|t| at.duration_since(t) < self.every) {
            return None;
        }
        let count = std::mem::take(&mut last.1);
        last.0 = Some(at);
        Some(format!(
            "authorization requests arrive already expired by {by_secs}s: this host's clock is off \
             from nats-server's; fix NTP (they get no answer; {count} since the last warning; \
             tolerance --clock-skew)"
        ))
    }

    /// Requests refused because they arrived expired beyond the tolerance.
    pub fn expired_total(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }
}

/// Decodes and verifies one request. `auth_account` is our AUTH account's public key: a request
/// for another callout account (misrouted config) is refused.
pub fn verify(
    payload: &[u8],
    server_xkey_header: Option<&str>,
    our_xkey: &XKey,
    auth_account: &str,
    now: i64,
) -> Result<VerifiedRequest, RequestError> {
    verify_with(
        payload,
        server_xkey_header,
        our_xkey,
        None,
        auth_account,
        now,
    )
}

/// As `verify`, opening sealed requests with a precomputed box when `boxes` is given.
pub fn verify_with(
    payload: &[u8],
    server_xkey_header: Option<&str>,
    our_xkey: &XKey,
    boxes: Option<&ServerBoxes>,
    auth_account: &str,
    now: i64,
) -> Result<VerifiedRequest, RequestError> {
    static KEYS: std::sync::OnceLock<jwt::IssuerKeys> = std::sync::OnceLock::new();
    verify_skewed(
        payload,
        server_xkey_header,
        our_xkey,
        boxes,
        KEYS.get_or_init(Default::default),
        auth_account,
        now,
        DEFAULT_CLOCK_SKEW,
    )
}

/// As `verify_with`, tolerating `skew` between our clock and the server's when checking `exp`.
#[allow(clippy::too_many_arguments)]
pub fn verify_skewed(
    payload: &[u8],
    server_xkey_header: Option<&str>,
    our_xkey: &XKey,
    boxes: Option<&ServerBoxes>,
    servers: &jwt::IssuerKeys,
    auth_account: &str,
    now: i64,
    skew: Duration,
) -> Result<VerifiedRequest, RequestError> {
    let mut server_box = None;
    let (token, server_xkey) = if payload.starts_with(XKV1) {
        let header = server_xkey_header.ok_or(RequestError::MissingServerXkey)?;
        let server =
            XKey::from_public_key(header.trim()).map_err(|_| RequestError::BadServerXkey)?;
        server_box = boxes.and_then(|b| b.with(&server));
        let opened = match &server_box {
            Some(b) => xbox::open(b, payload).ok_or(RequestError::Decrypt)?,
            None => our_xkey
                .open(payload, &server)
                .map_err(|_| RequestError::Decrypt)?,
        };
        (opened, Some(server))
    } else {
        // Plain requests happen when AUTH has no xkey; we always configure one, but accept
        // plain ones so a hand-edited AUTH JWT does not lock everyone out.
        (payload.to_vec(), None)
    };
    let token = std::str::from_utf8(&token).map_err(|_| RequestError::BadJwt)?;
    let claims: Claims<AuthorizationRequest> =
        jwt::decode_verified_by(token.trim(), servers).map_err(|_| RequestError::BadJwt)?;
    if !claims.iss.starts_with('N') {
        return Err(RequestError::IssuerNotServer);
    }
    if claims.aud.as_deref() != Some("nats-authorization-request") {
        return Err(RequestError::BadAudience);
    }
    // `exp` is nats-server's clock, `now` ours: tolerate `skew` between them, and at least one
    // second for clock granularity (iat/exp are whole seconds). `iat` is not checked: a server
    // clock ahead of ours is harmless, and `budget` does not depend on it. nats-server sets no
    // `nbf` on requests.
    let tolerance = i64::try_from(skew.as_secs_f64().ceil() as u64)
        .unwrap_or(i64::MAX)
        .max(1);
    if let Some(exp) = claims.exp {
        if now.saturating_sub(exp) > tolerance {
            return Err(RequestError::Expired {
                by_secs: now.saturating_sub(exp) as u64,
            });
        }
    }
    if claims.sub != auth_account {
        return Err(RequestError::WrongAccount);
    }
    if claims.nats.claim_type != "authorization_request" {
        return Err(RequestError::WrongType);
    }
    // A well-formed user key (prefix and checksum): it is only copied into the answer, so the
    // curve point it encodes is not parsed (that costs about a tenth of a verification).
    const USER_PREFIX: u8 = 20 << 3;
    let nkey_ok = nkeys::from_public_key(&claims.nats.user_nkey)
        .is_ok_and(|(prefix, _)| prefix == USER_PREFIX);
    if !nkey_ok || !claims.nats.server_id.id.starts_with('N') {
        return Err(RequestError::MissingFields);
    }
    // A sealed request must name the same server key inside as in the header.
    if let (Some(server), Some(inner)) = (&server_xkey, claims.nats.server_id.xkey.as_deref()) {
        if !inner.is_empty() && server.public_key() != inner {
            return Err(RequestError::BadServerXkey);
        }
    }
    Ok(VerifiedRequest {
        claims,
        server_xkey,
        server_box,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nkeys::KeyPair;

    /// A plain request from a server whose clock reads `server_now`, with a 2 s auth timeout.
    fn request(auth: &str, server_now: i64) -> Vec<u8> {
        let server = KeyPair::new_server();
        let mut nats = AuthorizationRequest::default();
        nats.server_id.id = server.public_key();
        nats.user_nkey = KeyPair::new_user().public_key();
        let claims = Claims {
            aud: Some("nats-authorization-request".into()),
            exp: Some(server_now + 2),
            jti: String::new(),
            iat: server_now,
            iss: String::new(),
            name: None,
            nbf: None,
            sub: auth.to_owned(),
            nats,
        };
        jwt::encode(&claims, &server).unwrap().into_bytes()
    }

    fn check(server_clock_behind: i64, skew: Duration) -> Result<VerifiedRequest, RequestError> {
        let auth = KeyPair::new_account().public_key();
        let now = 1_800_000_000;
        let payload = request(&auth, now - server_clock_behind);
        let keys = jwt::IssuerKeys::default();
        verify_skewed(&payload, None, &XKey::new(), None, &keys, &auth, now, skew)
    }

    #[test]
    fn skew_within_tolerance_is_accepted() {
        // The server's clock is 6 s behind ours: its request expired 4 s ago by our clock.
        let req = check(6, Duration::from_secs(5)).expect("within --clock-skew");
        // The budget comes from the server's own window, not from `exp - now`.
        assert_eq!(req.budget(), Duration::from_millis(1750));
        // A server clock ahead of ours is fine too (iat in our future).
        assert!(check(-30, Duration::from_secs(5)).is_ok());
        // Default tolerance of `verify`.
        assert!(check(6, DEFAULT_CLOCK_SKEW).is_ok());
    }

    #[test]
    fn skew_beyond_tolerance_is_refused_and_counted() {
        let err = check(20, Duration::from_secs(5)).err().expect("refused");
        assert_eq!(err, RequestError::Expired { by_secs: 18 });
        assert_eq!(err.as_str(), "expired");
        // A zero tolerance still allows a second of granularity, no more.
        assert!(check(3, Duration::ZERO).is_ok());
        assert_eq!(
            check(4, Duration::ZERO).err(),
            Some(RequestError::Expired { by_secs: 2 })
        );

        let watch = ClockWatch::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let first = watch.expired(18, t0).expect("the first one is logged");
        assert!(first.starts_with(
            "authorization requests arrive already expired by 18s: this host's clock is off from nats-server's; fix NTP"
        ));
        assert!(watch.expired(18, t0 + Duration::from_secs(1)).is_none());
        assert!(watch.expired(19, t0 + Duration::from_secs(59)).is_none());
        let again = watch
            .expired(19, t0 + Duration::from_secs(61))
            .expect("again after a minute");
        assert!(again.contains("3 since the last warning"), "{again}");
        assert_eq!(watch.expired_total(), 4);
    }

    #[test]
    fn budget_without_a_window_is_the_default_auth_timeout() {
        let auth = KeyPair::new_account().public_key();
        let now = 1_800_000_000;
        let mut req = verify_skewed(
            &request(&auth, now),
            None,
            &XKey::new(),
            None,
            &jwt::IssuerKeys::default(),
            &auth,
            now,
            DEFAULT_CLOCK_SKEW,
        )
        .unwrap();
        req.claims.exp = None;
        assert_eq!(req.budget(), Duration::from_millis(1750));
        req.claims.exp = Some(now + 5);
        assert_eq!(req.budget(), Duration::from_millis(4750));
    }
}
