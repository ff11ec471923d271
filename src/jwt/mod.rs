//! NATS JWTs: encode + sign with an nkey, decode + verify.
//!
//! jwt-simple and friends cannot write NATS's `ed25519-nkey` header, so this is a small
//! encoder over `nkeys` signatures. The `jti` recipe is the Go library's (protocol doc §1.3).

pub mod claims;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha512_256};

pub use claims::Claims;

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;
/// Largest token the server accepts.
const MAX_TOKEN: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtErrorKind {
    Malformed,
    BadHeader,
    BadSignature,
    BadIssuer,
    Json,
    Sign,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT: {0}")]
    Malformed(&'static str),
    #[error("unsupported JWT header (want alg ed25519-nkey)")]
    BadHeader,
    #[error("signature does not verify")]
    BadSignature,
    #[error("issuer is not a valid public nkey")]
    BadIssuer,
    #[error("claims do not parse: {0}")]
    Json(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

impl JwtError {
    pub fn kind(&self) -> JwtErrorKind {
        match self {
            JwtError::Malformed(_) => JwtErrorKind::Malformed,
            JwtError::BadHeader => JwtErrorKind::BadHeader,
            JwtError::BadSignature => JwtErrorKind::BadSignature,
            JwtError::BadIssuer => JwtErrorKind::BadIssuer,
            JwtError::Json(_) => JwtErrorKind::Json,
            JwtError::Sign(_) => JwtErrorKind::Sign,
        }
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The standard claims only, in Go order with empty fields left out, for the `jti` hash.
#[derive(Serialize)]
struct StandardForHash<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    #[serde(skip_serializing_if = "str::is_empty")]
    iss: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    #[serde(skip_serializing_if = "str::is_empty")]
    sub: &'a str,
}

/// SHA-512/256 over the standard claims (jti empty, `nats` not covered), base32 without padding.
pub fn compute_jti<T>(claims: &Claims<T>) -> String {
    let std = StandardForHash {
        aud: claims.aud.as_deref().filter(|s| !s.is_empty()),
        exp: claims.exp.filter(|e| *e != 0),
        iat: Some(claims.iat).filter(|i| *i != 0),
        iss: &claims.iss,
        name: claims.name.as_deref().filter(|s| !s.is_empty()),
        nbf: claims.nbf.filter(|n| *n != 0),
        sub: &claims.sub,
    };
    // Serializing plain strings and integers cannot fail.
    let bytes = serde_json::to_vec(&std).unwrap_or_default();
    data_encoding::BASE32_NOPAD.encode(&Sha512_256::digest(bytes))
}

/// Signs `claims` with `signer`. `iss` is set to the signer's public key and `jti` computed;
/// the other fields are taken as given.
pub fn encode<T: Serialize + Clone>(claims: &Claims<T>, signer: &nkeys::KeyPair) -> Result<String, JwtError> {
    let mut c = claims.clone();
    c.iss = signer.public_key();
    c.jti = String::new();
    c.jti = compute_jti(&c);
    let payload = serde_json::to_vec(&c).map_err(|e| JwtError::Json(e.to_string()))?;
    let signing_input = format!("{}.{}", B64.encode(HEADER), B64.encode(payload));
    let sig = signer.sign(signing_input.as_bytes()).map_err(|e| JwtError::Sign(e.to_string()))?;
    Ok(format!("{signing_input}.{}", B64.encode(sig)))
}

struct Parts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
}

fn split(token: &str) -> Result<Parts<'_>, JwtError> {
    if token.len() > MAX_TOKEN {
        return Err(JwtError::Malformed("larger than 1 MiB"));
    }
    let mut it = token.split('.');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(header), Some(payload), Some(signature), None) => Ok(Parts { header, payload, signature }),
        _ => Err(JwtError::Malformed("expected 3 dot-separated parts")),
    }
}

fn decode_payload<T: DeserializeOwned>(payload: &str) -> Result<Claims<T>, JwtError> {
    let bytes = B64.decode(payload).map_err(|_| JwtError::Malformed("payload is not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|e| JwtError::Json(e.to_string()))
}

fn check_header(header: &str) -> Result<(), JwtError> {
    let bytes = B64.decode(header).map_err(|_| JwtError::BadHeader)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| JwtError::BadHeader)?;
    if v.get("alg").and_then(|a| a.as_str()) != Some("ed25519-nkey") {
        return Err(JwtError::BadHeader);
    }
    Ok(())
}

/// Decodes and verifies the signature against the token's own `iss`.
pub fn decode_verified<T: DeserializeOwned>(token: &str) -> Result<Claims<T>, JwtError> {
    let parts = split(token)?;
    check_header(parts.header)?;
    let claims: Claims<T> = decode_payload(parts.payload)?;
    let issuer = nkeys::KeyPair::from_public_key(&claims.iss).map_err(|_| JwtError::BadIssuer)?;
    let sig = B64.decode(parts.signature).map_err(|_| JwtError::BadSignature)?;
    let signed = &token[..parts.header.len() + 1 + parts.payload.len()];
    issuer.verify(signed.as_bytes(), &sig).map_err(|_| JwtError::BadSignature)?;
    Ok(claims)
}

/// Decodes without checking the signature (for our own stored JWTs and for tests).
pub fn decode_unverified<T: DeserializeOwned>(token: &str) -> Result<Claims<T>, JwtError> {
    let parts = split(token)?;
    check_header(parts.header)?;
    decode_payload(parts.payload)
}

/// The `iat` of a token, without verifying it.
pub fn iat_of(token: &str) -> Option<i64> {
    decode_unverified::<serde_json::Value>(token).ok().map(|c| c.iat)
}

#[cfg(test)]
mod tests {
    use super::claims::*;
    use super::*;
    use nkeys::KeyPair;

    fn user_claims(sub: &str) -> Claims<UserClaims> {
        let mut nats = UserClaims::default();
        nats.permissions.publish.allow = vec!["app.ok".into()];
        nats.permissions.subscribe.deny = vec!["app.secret".into()];
        nats.permissions.response = Some(ResponsePermission { max: 1, ttl: 5_000_000_000 });
        nats.issuer_account = Some("AAAA".into());
        Claims { aud: None, exp: Some(2_000_000_000), jti: String::new(), iat: 1_795_347_111, iss: String::new(), name: Some("alice".into()), nbf: None, sub: sub.into(), nats }
    }

    #[test]
    fn round_trip_and_wire_fields() {
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let token = encode(&user_claims(&user.public_key()), &account).unwrap();
        let header = B64.decode(token.split('.').next().unwrap()).unwrap();
        assert_eq!(header, HEADER.as_bytes());
        let back: Claims<UserClaims> = decode_verified(&token).unwrap();
        assert_eq!(back.iss, account.public_key());
        assert_eq!(back.jti.len(), 52);
        assert_eq!(back.jti, compute_jti(&Claims { jti: String::new(), ..back.clone() }));
        // Field names exactly as nats-io/jwt writes them.
        let raw: Claims<serde_json::Value> = decode_unverified(&token).unwrap();
        let n = &raw.nats;
        assert_eq!(n["type"], "user");
        assert_eq!(n["version"], 2);
        assert_eq!(n["pub"]["allow"], serde_json::json!(["app.ok"]));
        assert_eq!(n["sub"]["deny"], serde_json::json!(["app.secret"]));
        assert_eq!(n["resp"]["ttl"], 5_000_000_000i64);
        assert_eq!((n["subs"].as_i64(), n["data"].as_i64(), n["payload"].as_i64()), (Some(-1), Some(-1), Some(-1)));
        assert_eq!(n["issuer_account"], "AAAA");
        assert!(n.get("bearer_token").is_none());
    }

    #[test]
    fn jti_covers_standard_claims_only() {
        let c = user_claims("UX");
        let mut other_body = c.clone();
        other_body.nats.permissions.publish.allow = vec!["x".into()];
        assert_eq!(compute_jti(&c), compute_jti(&other_body));
        let mut later = c.clone();
        later.iat += 1;
        assert_ne!(compute_jti(&c), compute_jti(&later));
    }

    #[test]
    fn jti_matches_go_layout() {
        // The hash input is the Go struct's JSON: field order aud, exp, iat, iss, name, nbf, sub.
        let c: Claims<()> = Claims {
            aud: Some("nats-authorization-request".into()),
            exp: Some(1795347113),
            jti: String::new(),
            iat: 1795347111,
            iss: "NB2KC7IXFYTDWVSRYAVJXCOTIII4AAQTV5H5AWSQNZF5WKMTG72U6D5T".into(),
            name: None,
            nbf: None,
            sub: "ADZRBPFGL6NPOMDL5YRFI57FUGFEYZGPVX6G2WVSRHXL5ZQDUYPNM4NB".into(),
            nats: (),
        };
        let expected_input = r#"{"aud":"nats-authorization-request","exp":1795347113,"iat":1795347111,"iss":"NB2KC7IXFYTDWVSRYAVJXCOTIII4AAQTV5H5AWSQNZF5WKMTG72U6D5T","sub":"ADZRBPFGL6NPOMDL5YRFI57FUGFEYZGPVX6G2WVSRHXL5ZQDUYPNM4NB"}"#;
        let expected = data_encoding::BASE32_NOPAD.encode(&Sha512_256::digest(expected_input));
        assert_eq!(compute_jti(&c), expected);
    }

    #[test]
    fn tampering_and_bad_headers_are_caught() {
        let account = KeyPair::new_account();
        let token = encode(&user_claims("UX"), &account).unwrap();
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let mut claims: serde_json::Value = serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
        claims["name"] = "mallory".into();
        parts[1] = B64.encode(serde_json::to_vec(&claims).unwrap());
        let tampered = parts.join(".");
        assert_eq!(decode_verified::<UserClaims>(&tampered).unwrap_err().kind(), JwtErrorKind::BadSignature);
        let mut bad_alg = token.split('.').map(String::from).collect::<Vec<_>>();
        bad_alg[0] = B64.encode(r#"{"typ":"JWT","alg":"HS256"}"#);
        assert_eq!(decode_verified::<UserClaims>(&bad_alg.join(".")).unwrap_err().kind(), JwtErrorKind::BadHeader);
        assert_eq!(decode_verified::<UserClaims>("garbage").unwrap_err().kind(), JwtErrorKind::Malformed);
        assert_eq!(decode_verified::<UserClaims>("a.b.c.d").unwrap_err().kind(), JwtErrorKind::Malformed);
    }

    #[test]
    fn account_jwt_writes_every_limit() {
        let op = KeyPair::new_operator();
        let acc = KeyPair::new_account();
        let c = Claims { aud: None, exp: None, jti: String::new(), iat: 1, iss: String::new(), name: Some("acme".into()), nbf: None, sub: acc.public_key(), nats: AccountClaims::default() };
        let raw: Claims<serde_json::Value> = decode_unverified(&encode(&c, &op).unwrap()).unwrap();
        for key in [
            "subs", "data", "payload", "imports", "exports", "wildcards", "disallow_bearer", "conn", "leaf", "mem_storage",
            "disk_storage", "streams", "consumer", "max_ack_pending", "mem_max_stream_bytes", "disk_max_stream_bytes",
            "max_bytes_required",
        ] {
            assert!(raw.nats["limits"].get(key).is_some(), "limit {key} written");
        }
        assert_eq!(raw.nats["limits"]["conn"], -1);
        assert_eq!(raw.nats["type"], "account");
        assert_eq!(raw.nats["version"], 2);
        assert_eq!(iat_of(&encode(&c, &op).unwrap()), Some(1));
    }

    #[test]
    fn secrets_in_requests_are_redacted_in_debug() {
        let req: AuthorizationRequest = serde_json::from_str(
            r#"{"user_nkey":"U","connect_opts":{"user":"alice","pass":"hunter2","auth_token":"tok"},"type":"authorization_request","version":2}"#,
        )
        .unwrap();
        let dbg = format!("{req:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("tok\""), "{dbg}");
        assert_eq!(req.connect_opts.pass.expose(), Some("hunter2"));
    }
}
