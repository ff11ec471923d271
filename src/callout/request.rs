//! Turning a `$SYS.REQ.USER.AUTH` message into a verified authorization request.
//!
//! Order matters: open the xkey box (if any), then verify the JWT signature against its issuer
//! (a server key), then the claims. Nothing from the request is trusted before the signature.

use std::sync::Arc;

use crypto_box::SalsaBox;
use nkeys::XKey;

use super::xbox::{self, ServerBoxes};

use crate::jwt::{self, claims::AuthorizationRequest, Claims};

/// Header carrying the server's curve key when AUTH has an `xkey` (protocol doc §3.4).
pub const SERVER_XKEY_HEADER: &str = "Nats-Server-Xkey";
const XKV1: &[u8] = b"xkv1";

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
    #[error("request has expired")]
    Expired,
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
            RequestError::Expired => "expired",
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
        jwt::decode_verified(token.trim()).map_err(|_| RequestError::BadJwt)?;
    if !claims.iss.starts_with('N') {
        return Err(RequestError::IssuerNotServer);
    }
    if claims.aud.as_deref() != Some("nats-authorization-request") {
        return Err(RequestError::BadAudience);
    }
    // One second of slack for clock granularity: iat/exp are whole seconds.
    if claims.exp.is_some_and(|exp| exp + 1 < now) {
        return Err(RequestError::Expired);
    }
    if claims.sub != auth_account {
        return Err(RequestError::WrongAccount);
    }
    if claims.nats.claim_type != "authorization_request" {
        return Err(RequestError::WrongType);
    }
    let nkey_ok = nkeys::KeyPair::from_public_key(&claims.nats.user_nkey)
        .map(|k| claims.nats.user_nkey.starts_with('U') && k.public_key() == claims.nats.user_nkey)
        .unwrap_or(false);
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
