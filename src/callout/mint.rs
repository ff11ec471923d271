//! Minting the user JWT and wrapping it in an authorization response.

use std::time::Duration;

use nkeys::{KeyPair, XKey};

use super::permissions::Merged;
use super::request::VerifiedRequest;
use crate::jwt::claims::{AuthorizationResponse, Permission, ResponsePermission, UserClaims};
use crate::jwt::{self, Claims, JwtError};

/// A user JWT for the request's `user_nkey`, signed by the account's signing key with
/// `issuer_account` set (the setup the server places by signer, protocol doc §3.7).
pub fn user_jwt(
    req: &VerifiedRequest,
    name: &str,
    merged: &Merged,
    ttl: Duration,
    account_public_key: &str,
    signer: &KeyPair,
    now: i64,
) -> Result<String, JwtError> {
    let mut nats = UserClaims::default();
    nats.permissions.publish = Permission {
        allow: merged.publish.allow.clone(),
        deny: merged.publish.deny.clone(),
    };
    nats.permissions.subscribe = Permission {
        allow: merged.subscribe.allow.clone(),
        deny: merged.subscribe.deny.clone(),
    };
    nats.permissions.response = merged.response.map(|r| ResponsePermission {
        max: r.max,
        ttl: i64::try_from(r.ttl.as_nanos()).unwrap_or(i64::MAX),
    });
    nats.limits.subs = merged.max_subscriptions;
    nats.limits.data = merged.max_data;
    nats.limits.payload = merged.max_payload;
    nats.issuer_account = Some(account_public_key.to_owned());
    jwt::encode(
        &Claims::user_for(req.user_nkey(), name, now, ttl, nats),
        signer,
    )
}

/// The response JWT: `aud` = this request's server, `sub` = its user nkey, signed by AUTH.
/// Exactly one of `user_jwt` / `error` is set.
pub fn response(
    req: &VerifiedRequest,
    outcome: Result<&str, &str>,
    auth_signer: &KeyPair,
    now: i64,
) -> Result<String, JwtError> {
    let mut nats = AuthorizationResponse::default();
    match outcome {
        Ok(user_jwt) => nats.jwt = Some(user_jwt.to_owned()),
        Err(reason) => nats.error = Some(reason.to_owned()),
    }
    let claims = Claims {
        aud: Some(req.server_id().to_owned()),
        exp: None,
        jti: String::new(),
        iat: now,
        iss: String::new(),
        name: None,
        nbf: None,
        sub: req.user_nkey().to_owned(),
        nats,
    };
    jwt::encode(&claims, auth_signer)
}

/// Seals the response for `req`: with its precomputed box when there is one, else as `seal`.
pub fn seal_for(req: &VerifiedRequest, response: String, ours: &XKey) -> Option<Vec<u8>> {
    match &req.server_box {
        Some(b) => super::xbox::seal(b, response.as_bytes()),
        None => seal(response, ours, req.server_xkey.as_ref()).ok(),
    }
}

/// Seals the response to the server's curve key when the request came sealed.
pub fn seal(
    response: String,
    ours: &XKey,
    server: Option<&XKey>,
) -> Result<Vec<u8>, nkeys::error::Error> {
    match server {
        Some(server) => ours.seal(response.as_bytes(), server),
        None => Ok(response.into_bytes()),
    }
}
