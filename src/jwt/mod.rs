//! NATS JWTs: encode + sign with an nkey, decode + verify (protocol doc §1.2, §1.3).
//!
//! Generic JWT crates cannot write NATS's `ed25519-nkey` header, so this is a small encoder over
//! `nkeys` signatures. It owns the wire layout (header, base64url, signature input) and the
//! `jti` recipe of the Go library; the claim bodies live in [`claims`].
//!
//! Errors never carry a signature, a seed or a value from the payload: serde's messages quote
//! offending values (a password in `connect_opts`, say), so they are reduced to their position.

pub mod claims;

use base64::alphabet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use nkeys::{KeyPair, KeyPairType};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512_256};

pub use claims::Claims;

/// The only header NATS v2 writes.
const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;
const ALG: &str = "ed25519-nkey";
/// Largest token the server accepts.
pub const MAX_TOKEN_LEN: usize = 1 << 20;

/// Reads base64url with or without padding; we always write it without.
const B64_READ: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// [`JwtError`] without its data: for matching and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtErrorKind {
    Malformed,
    BadHeader,
    BadSignature,
    BadIssuer,
    Json,
    Sign,
}

impl JwtErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JwtErrorKind::Malformed => "malformed",
            JwtErrorKind::BadHeader => "bad_header",
            JwtErrorKind::BadSignature => "bad_signature",
            JwtErrorKind::BadIssuer => "bad_issuer",
            JwtErrorKind::Json => "json",
            JwtErrorKind::Sign => "sign",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a NATS JWT: {0}")]
    Malformed(&'static str),
    #[error("unsupported JWT header (want typ JWT, alg ed25519-nkey)")]
    BadHeader,
    #[error("JWT signature does not verify against its issuer")]
    BadSignature,
    #[error("JWT issuer is not a public operator, account, user or server nkey")]
    BadIssuer,
    #[error("JWT claims do not parse: {0}")]
    Json(String),
    #[error("cannot sign JWT: {0}")]
    Sign(&'static str),
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

/// Keeps serde's message only when it cannot quote a value (missing/duplicate field, our own
/// type/version markers); otherwise only the category and position.
fn json_error(e: serde_json::Error) -> JwtError {
    let msg = e.to_string();
    let safe = [
        "missing field",
        "duplicate field",
        "claim type is not",
        "claim version is not",
    ];
    if safe.iter().any(|p| msg.starts_with(p)) {
        JwtError::Json(msg)
    } else {
        JwtError::Json(format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    }
}

/// Current Unix time in seconds (0 if the clock is before 1970).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The standard claims as they go on the wire: Go field order, zero and empty values left out
/// (Go `omitempty`). The same view feeds the `jti` hash, so hash and payload cannot disagree.
#[derive(Serialize)]
struct Wire<'a, T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    #[serde(skip_serializing_if = "str::is_empty")]
    jti: &'a str,
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
    nats: &'a T,
}

impl<'a, T> Wire<'a, T> {
    fn new(claims: &'a Claims<T>, iss: &'a str, iat: i64) -> Self {
        let nonzero = |n: Option<i64>| n.filter(|n| *n != 0);
        Wire {
            aud: claims.aud.as_deref().filter(|s| !s.is_empty()),
            exp: nonzero(claims.exp),
            jti: "",
            iat: nonzero(Some(iat)),
            iss,
            name: claims.name.as_deref().filter(|s| !s.is_empty()),
            nbf: nonzero(claims.nbf),
            sub: &claims.sub,
            nats: &claims.nats,
        }
    }

    /// What Go's `json.Marshal(ClaimsData)` writes with `jti` empty: the `jti` hash input.
    /// Written by hand because Go escapes `<`, `>`, `&`, U+2028 and U+2029, serde_json not.
    fn go_hash_input(&self) -> String {
        enum V<'v> {
            Str(&'v str),
            Num(i64),
        }
        // Go field order: aud, exp, (jti: empty, so omitted), iat, iss, name, nbf, sub.
        let fields = [
            ("aud", self.aud.map(V::Str)),
            ("exp", self.exp.map(V::Num)),
            ("iat", self.iat.map(V::Num)),
            ("iss", Some(self.iss).filter(|s| !s.is_empty()).map(V::Str)),
            ("name", self.name.map(V::Str)),
            ("nbf", self.nbf.map(V::Num)),
            ("sub", Some(self.sub).filter(|s| !s.is_empty()).map(V::Str)),
        ];
        let mut out = String::from("{");
        for (name, value) in fields {
            let Some(value) = value else { continue };
            if out.len() > 1 {
                out.push(',');
            }
            out.push('"');
            out.push_str(name);
            out.push_str("\":");
            match value {
                V::Str(s) => push_go_string(&mut out, s),
                V::Num(n) => out.push_str(&n.to_string()),
            }
        }
        out.push('}');
        out
    }

    fn jti(&self) -> String {
        data_encoding::BASE32_NOPAD.encode(&Sha512_256::digest(self.go_hash_input()))
    }
}

/// A JSON string as Go's `encoding/json` writes it (HTML-safe escaping, Go ≥ 1.22 short forms).
fn push_go_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' || matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}') => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The `jti` the Go library would give `claims` (protocol doc §1.3): SHA-512/256 over the
/// standard claims only (`nats` not covered, `jti` empty), base32 without padding: 52 chars.
/// Uses `claims.iss` and `claims.iat` as they are.
pub fn compute_jti<T>(claims: &Claims<T>) -> String {
    Wire::new(claims, &claims.iss, claims.iat).jti()
}

/// Signs `claims` with `signer` and returns the token.
///
/// `claims` is borrowed and left untouched; the token carries `iss` = the signer's public key,
/// the computed `jti`, and `iat` = now when `claims.iat` is 0. Every other field is written as
/// given, so the caller controls `iat` (sync keeps it strictly increasing) and `exp`.
pub fn encode<T: Serialize>(claims: &Claims<T>, signer: &KeyPair) -> Result<String, JwtError> {
    if signer.key_pair_type() == KeyPairType::Curve {
        return Err(JwtError::Sign("a curve (xkey) key cannot sign JWTs"));
    }
    let iss = signer.public_key();
    let iat = if claims.iat == 0 {
        now_unix()
    } else {
        claims.iat
    };
    let mut wire = Wire::new(claims, &iss, iat);
    let jti = wire.jti();
    wire.jti = &jti;
    let payload = serde_json::to_vec(&wire).map_err(json_error)?;
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let sig = signer
        .sign(signing_input.as_bytes())
        .map_err(|_| JwtError::Sign("signer has no seed"))?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

struct Parts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    /// `header.payload`: what the signature covers.
    signed: &'a str,
}

fn split(token: &str) -> Result<Parts<'_>, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed("larger than 1 MiB"));
    }
    let mut it = token.splitn(3, '.');
    let (Some(header), Some(payload), Some(signature)) = (it.next(), it.next(), it.next()) else {
        return Err(JwtError::Malformed("expected 3 dot-separated parts"));
    };
    if signature.contains('.') {
        return Err(JwtError::Malformed("expected 3 dot-separated parts"));
    }
    if header.is_empty() || payload.is_empty() || signature.is_empty() {
        return Err(JwtError::Malformed("empty part"));
    }
    let signed = &token[..header.len() + 1 + payload.len()];
    Ok(Parts {
        header,
        payload,
        signature,
        signed,
    })
}

fn check_header(header: &str) -> Result<(), JwtError> {
    #[derive(Deserialize)]
    struct Header {
        #[serde(default)]
        typ: String,
        #[serde(default)]
        alg: String,
    }
    let bytes = B64_READ.decode(header).map_err(|_| JwtError::BadHeader)?;
    let h: Header = serde_json::from_slice(&bytes).map_err(|_| JwtError::BadHeader)?;
    // As the Go library: case-insensitive, and v1's plain "ed25519" is not accepted.
    if h.typ.eq_ignore_ascii_case("JWT") && h.alg.eq_ignore_ascii_case(ALG) {
        Ok(())
    } else {
        Err(JwtError::BadHeader)
    }
}

/// Splits, checks the header and returns the decoded payload bytes.
fn open(token: &str) -> Result<(Parts<'_>, Vec<u8>), JwtError> {
    let parts = split(token)?;
    check_header(parts.header)?;
    let payload = B64_READ
        .decode(parts.payload)
        .map_err(|_| JwtError::Malformed("payload is not base64url"))?;
    Ok((parts, payload))
}

/// Decodes `token` and verifies its signature against its own `iss`. The claims are parsed
/// into `T` only after the signature checks out.
///
/// Says nothing about whether the issuer is *trusted*: callers check `iss` (and its prefix)
/// against what they expect.
pub fn decode_verified<T: DeserializeOwned>(token: &str) -> Result<Claims<T>, JwtError> {
    verify_then_parse(token, |iss| issuer_key(iss).map(std::sync::Arc::new))
}

/// The verifying key of an issuer: a public operator, account, user or server nkey.
fn issuer_key(iss: &str) -> Result<KeyPair, JwtError> {
    let issuer = KeyPair::from_public_key(iss).map_err(|_| JwtError::BadIssuer)?;
    if issuer.key_pair_type() == KeyPairType::Curve {
        return Err(JwtError::BadIssuer);
    }
    Ok(issuer)
}

/// Splits, reads `iss`, verifies the signature with `key(iss)`, then parses the claims.
fn verify_then_parse<T: DeserializeOwned>(
    token: &str,
    key: impl FnOnce(&str) -> Result<std::sync::Arc<KeyPair>, JwtError>,
) -> Result<Claims<T>, JwtError> {
    #[derive(Deserialize)]
    struct Issuer {
        #[serde(default)]
        iss: String,
    }
    let (parts, payload) = open(token)?;
    let Issuer { iss } = serde_json::from_slice(&payload).map_err(json_error)?;
    let issuer = key(&iss)?;
    let sig = B64_READ
        .decode(parts.signature)
        .map_err(|_| JwtError::BadSignature)?;
    issuer
        .verify(parts.signed.as_bytes(), &sig)
        .map_err(|_| JwtError::BadSignature)?;
    serde_json::from_slice(&payload).map_err(json_error)
}

/// Public keys of recent issuers, parsed once: parsing a key decompresses a curve point (about a
/// tenth of an ed25519 verification), and a callout sees the same few servers' keys on every
/// request.
pub struct IssuerKeys {
    keys: moka::sync::Cache<String, std::sync::Arc<KeyPair>>,
}

impl Default for IssuerKeys {
    fn default() -> Self {
        Self {
            keys: moka::sync::Cache::builder()
                .max_capacity(1024)
                .time_to_idle(std::time::Duration::from_secs(3600))
                .build(),
        }
    }
}

impl IssuerKeys {
    fn get(&self, iss: &str) -> Result<std::sync::Arc<KeyPair>, JwtError> {
        if let Some(k) = self.keys.get(iss) {
            return Ok(k);
        }
        let issuer = std::sync::Arc::new(issuer_key(iss)?);
        self.keys.insert(iss.to_owned(), issuer.clone());
        Ok(issuer)
    }
}

/// As [`decode_verified`], with the issuer's parsed key from `keys`.
pub fn decode_verified_by<T: DeserializeOwned>(
    token: &str,
    keys: &IssuerKeys,
) -> Result<Claims<T>, JwtError> {
    verify_then_parse(token, |iss| keys.get(iss))
}

/// Decodes `token` without checking the signature: only for tokens we stored ourselves, or
/// for reading fields before deciding whom to trust.
pub fn decode_unverified<T: DeserializeOwned>(token: &str) -> Result<Claims<T>, JwtError> {
    let (_, payload) = open(token)?;
    serde_json::from_slice(&payload).map_err(json_error)
}

/// The `iat` of a token, unverified; `None` when it is not a NATS JWT or has no `iat`.
/// Used by sync to keep an account's `iat` strictly increasing.
pub fn iat_of(token: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct Iat {
        iat: Option<i64>,
    }
    let (_, payload) = open(token).ok()?;
    serde_json::from_slice::<Iat>(&payload).ok()?.iat
}

#[cfg(test)]
mod tests {
    use super::claims::*;
    use super::*;
    use serde_json::{json, Value};

    const SERVER: &str = "NB2KC7IXFYTDWVSRYAVJXCOTIII4AAQTV5H5AWSQNZF5WKMTG72U6D5T";
    const AUTH: &str = "ADZRBPFGL6NPOMDL5YRFI57FUGFEYZGPVX6G2WVSRHXL5ZQDUYPNM4NB";

    /// The standard claims of a real request observed from nats-server (protocol doc §3.4).
    fn observed_request() -> Claims<AuthorizationRequest> {
        Claims {
            aud: Some("nats-authorization-request".into()),
            exp: Some(1_795_347_113),
            iat: 1_795_347_111,
            iss: SERVER.into(),
            ..Claims::new(AUTH, AuthorizationRequest::default())
        }
    }

    fn user_claims(sub: &str) -> Claims<UserClaims> {
        let mut nats = UserClaims::default();
        nats.permissions.publish.allow = vec!["app.ok".into()];
        nats.permissions.subscribe.deny = vec!["app.secret".into()];
        nats.permissions.response = Some(ResponsePermission {
            max: 1,
            ttl: 5_000_000_000,
        });
        nats.issuer_account = Some(AUTH.into());
        Claims {
            exp: Some(2_000_000_000),
            iat: 1_795_347_111,
            name: Some("alice".into()),
            ..Claims::new(sub, nats)
        }
    }

    fn parts(token: &str) -> Vec<String> {
        token.split('.').map(String::from).collect()
    }

    fn raw_payload(token: &str) -> Value {
        let bytes = B64_READ.decode(&parts(token)[1]).expect("base64");
        serde_json::from_slice(&bytes).expect("json")
    }

    #[test]
    fn jti_recipe_on_the_observed_request() {
        let c = observed_request();
        let wire = Wire::new(&c, &c.iss, c.iat);
        assert_eq!(
            wire.go_hash_input(),
            r#"{"aud":"nats-authorization-request","exp":1795347113,"iat":1795347111,"iss":"NB2KC7IXFYTDWVSRYAVJXCOTIII4AAQTV5H5AWSQNZF5WKMTG72U6D5T","sub":"ADZRBPFGL6NPOMDL5YRFI57FUGFEYZGPVX6G2WVSRHXL5ZQDUYPNM4NB"}"#
        );
        let jti = compute_jti(&c);
        assert_eq!(jti.len(), 52);
        assert!(jti
            .chars()
            .all(|ch| ch.is_ascii_uppercase() || ('2'..='7').contains(&ch)));
        assert_eq!(jti, compute_jti(&observed_request()), "deterministic");
        // The doc quotes the server's jti for this request shortened to "6SQ2BV…": a partial
        // golden value (30 bits) for the recipe.
        assert!(jti.starts_with("6SQ2BV"), "{jti}");
        // Same for the observed response (doc §3.5, "L3CCIS…"): no exp, aud = the server.
        let response = Claims {
            aud: Some(SERVER.into()),
            iat: 1_795_347_111,
            iss: AUTH.into(),
            ..Claims::new(
                "UCQSE6ISPNNUPQCYSCECATMPR6QXJTYDV67KWVWEXG3I2I6VGW47P2EN",
                (),
            )
        };
        assert!(compute_jti(&response).starts_with("L3CCIS"));
        // A jti already present is not part of its own hash.
        assert_eq!(
            jti,
            compute_jti(&Claims {
                jti: "X".into(),
                ..observed_request()
            })
        );
    }

    #[test]
    fn jti_covers_standard_claims_only() {
        let c = observed_request();
        let mut body = observed_request();
        body.nats.user_nkey = "UOTHER".into();
        body.nats.connect_opts.user = Some("bob".into());
        assert_eq!(compute_jti(&c), compute_jti(&body));
        for changed in [
            Claims {
                iat: c.iat + 1,
                ..observed_request()
            },
            Claims {
                exp: None,
                ..observed_request()
            },
            Claims {
                name: Some("n".into()),
                ..observed_request()
            },
            Claims {
                sub: "AOTHER".into(),
                ..observed_request()
            },
        ] {
            assert_ne!(compute_jti(&c), compute_jti(&changed));
        }
        // Empty and zero values are omitted, as Go's omitempty does.
        let empty = Claims {
            name: Some(String::new()),
            nbf: Some(0),
            ..observed_request()
        };
        assert_eq!(compute_jti(&c), compute_jti(&empty));
    }

    #[test]
    fn jti_hash_input_escapes_like_go() {
        let c = Claims {
            name: Some("a<b>&c\"\\\n\u{1}\u{2028}é".into()),
            ..Claims::new("", ())
        };
        let wire = Wire::new(&c, "", 0);
        assert_eq!(
            wire.go_hash_input(),
            r#"{"name":"a\u003cb\u003e\u0026c\"\\\n\u0001\u2028é"}"#
        );
        assert_eq!(Wire::new(&Claims::new("", ()), "", 0).go_hash_input(), "{}");
    }

    #[test]
    fn encoded_jti_recomputes_after_decode() {
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let token = encode(&user_claims(&user.public_key()), &account).expect("signs");
        let back: Claims<UserClaims> = decode_verified(&token).expect("verifies");
        assert_eq!(back.jti.len(), 52);
        assert_eq!(back.jti, compute_jti(&back));
        // The payload is exactly the wire view: jti sits between exp and iat, as in Go.
        let raw =
            String::from_utf8(B64_READ.decode(&parts(&token)[1]).expect("b64")).expect("utf8");
        assert!(
            raw.starts_with(&format!(
                r#"{{"exp":2000000000,"jti":"{}","iat":1795347111,"iss":""#,
                back.jti
            )),
            "{raw}"
        );
    }

    #[test]
    fn round_trip_user_jwt() {
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let claims = user_claims(&user.public_key());
        let token = encode(&claims, &account).expect("signs");
        assert_eq!(
            B64_READ.decode(&parts(&token)[0]).expect("b64"),
            HEADER.as_bytes()
        );
        assert!(!token.contains('='), "no padding");
        let back: Claims<UserClaims> = decode_verified(&token).expect("verifies");
        assert_eq!(back.iss, account.public_key());
        assert_eq!(back.sub, user.public_key());
        assert_eq!(
            Claims {
                iss: String::new(),
                jti: String::new(),
                ..back
            },
            claims
        );
        // The caller's claims were not touched.
        assert!(claims.iss.is_empty() && claims.jti.is_empty());
    }

    #[test]
    fn user_jwt_wire_fields() {
        let account = KeyPair::new_account();
        let token = encode(&user_claims("UX"), &account).expect("signs");
        let n = &raw_payload(&token)["nats"];
        assert_eq!(n["type"], "user");
        assert_eq!(n["version"], 2);
        assert_eq!(n["pub"], json!({"allow":["app.ok"]}));
        assert_eq!(n["sub"], json!({"deny":["app.secret"]}));
        assert_eq!(
            n["resp"],
            json!({"max":1,"ttl":5_000_000_000i64}),
            "ttl in nanoseconds"
        );
        assert_eq!(
            (&n["subs"], &n["data"], &n["payload"]),
            (&json!(-1), &json!(-1), &json!(-1))
        );
        assert_eq!(n["issuer_account"], AUTH);
        assert!(n.get("bearer_token").is_none());
    }

    #[test]
    fn account_jwt_writes_every_limit() {
        let op = KeyPair::new_operator();
        let acc = KeyPair::new_account();
        let c = Claims {
            name: Some("acme".into()),
            iat: 7,
            ..Claims::new(acc.public_key(), AccountClaims::default())
        };
        let token = encode(&c, &op).expect("signs");
        let raw = raw_payload(&token);
        let limits = raw["nats"]["limits"].as_object().expect("limits object");
        for key in [
            "subs",
            "data",
            "payload",
            "imports",
            "exports",
            "wildcards",
            "disallow_bearer",
            "conn",
            "leaf",
            "mem_storage",
            "disk_storage",
            "streams",
            "consumer",
            "max_ack_pending",
            "mem_max_stream_bytes",
            "disk_max_stream_bytes",
            "max_bytes_required",
        ] {
            assert!(limits.contains_key(key), "limit {key} written");
        }
        assert_eq!(limits.len(), 17);
        for key in [
            "conn", "leaf", "subs", "payload", "data", "imports", "exports",
        ] {
            assert_eq!(limits[key], -1, "{key} unlimited by default");
        }
        assert_eq!(raw["nats"]["type"], "account");
        assert_eq!(raw["nats"]["version"], 2);
        assert_eq!(iat_of(&token), Some(7));
        let back: Claims<AccountClaims> = decode_verified(&token).expect("verifies");
        assert_eq!(back.nats, AccountClaims::default());
    }

    #[test]
    fn tampered_payload_is_bad_signature() {
        let account = KeyPair::new_account();
        let token = encode(&user_claims("UX"), &account).expect("signs");
        let mut p = parts(&token);
        let mut claims = raw_payload(&token);
        claims["nats"]["pub"]["allow"] = json!([">"]);
        p[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"));
        let err = decode_verified::<UserClaims>(&p.join(".")).expect_err("tampered");
        assert_eq!(err.kind(), JwtErrorKind::BadSignature);
        assert!(
            !err.to_string().contains(&p[2]),
            "no signature in the message"
        );
        // Claiming another issuer does not help either.
        claims["iss"] = KeyPair::new_account().public_key().into();
        p[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"));
        assert_eq!(
            decode_verified::<UserClaims>(&p.join("."))
                .expect_err("x")
                .kind(),
            JwtErrorKind::BadSignature
        );
        // Nor does a mangled signature.
        let mut p = parts(&token);
        p[2] = URL_SAFE_NO_PAD.encode([0u8; 64]);
        assert_eq!(
            decode_verified::<UserClaims>(&p.join("."))
                .expect_err("x")
                .kind(),
            JwtErrorKind::BadSignature
        );
        // Unverified decoding does not look at the signature.
        assert!(decode_unverified::<UserClaims>(&p.join(".")).is_ok());
    }

    #[test]
    fn wrong_header_is_bad_header() {
        let token = encode(&user_claims("UX"), &KeyPair::new_account()).expect("signs");
        for header in [
            r#"{"typ":"JWT","alg":"HS256"}"#,
            r#"{"typ":"JWT","alg":"ed25519"}"#,
            r#"{"alg":"ed25519-nkey"}"#,
            r#"not json"#,
        ] {
            let mut p = parts(&token);
            p[0] = URL_SAFE_NO_PAD.encode(header);
            let err = decode_verified::<UserClaims>(&p.join(".")).expect_err(header);
            assert_eq!(err.kind(), JwtErrorKind::BadHeader, "{header}");
        }
        let mut p = parts(&token);
        p[0] = URL_SAFE_NO_PAD.encode(r#"{"typ":"jwt","alg":"ED25519-NKEY"}"#);
        assert_eq!(
            decode_unverified::<UserClaims>(&p.join(".")).map(|c| c.sub),
            Ok("UX".to_owned())
        );
    }

    #[test]
    fn malformed_tokens() {
        for bad in [
            "",
            "garbage",
            "a.b",
            "a.b.c.d",
            "..",
            "eyJ0eXAiOiJKV1QifQ..sig",
        ] {
            assert_eq!(
                decode_verified::<Value>(bad).expect_err(bad).kind(),
                JwtErrorKind::Malformed,
                "{bad}"
            );
        }
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            decode_unverified::<Value>(&huge).expect_err("huge").kind(),
            JwtErrorKind::Malformed
        );
        assert_eq!(iat_of("garbage"), None);
    }

    #[test]
    fn issuer_must_be_a_signing_nkey() {
        let token = encode(&user_claims("UX"), &KeyPair::new_account()).expect("signs");
        for iss in ["", "not-a-key", &nkeys::XKey::new().public_key()] {
            let mut p = parts(&token);
            let mut claims = raw_payload(&token);
            claims["iss"] = iss.into();
            p[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"));
            assert_eq!(
                decode_verified::<UserClaims>(&p.join("."))
                    .expect_err(iss)
                    .kind(),
                JwtErrorKind::BadIssuer
            );
        }
    }

    #[test]
    fn json_errors_do_not_quote_values() {
        let server = KeyPair::new_server();
        let body = json!({"user_nkey":"U","connect_opts":{"pass":"hunter2","protocol":"s3cr3t-value"},
                          "type":"authorization_request","version":2});
        let token = encode(&Claims::new(AUTH, body), &server).expect("signs");
        let err =
            decode_verified::<AuthorizationRequest>(&token).expect_err("protocol is a number");
        assert_eq!(err.kind(), JwtErrorKind::Json);
        let msg = err.to_string();
        assert!(!msg.contains("s3cr3t") && !msg.contains("hunter2"), "{msg}");
        // Missing fields are named: that helps and cannot leak.
        let token = encode(&Claims::new(AUTH, json!({"version":2})), &server).expect("signs");
        assert!(decode_verified::<UserClaims>(&token)
            .expect_err("no type")
            .to_string()
            .contains("missing field `type`"));
    }

    #[test]
    fn request_from_a_server_verifies_and_redacts() {
        let server = KeyPair::new_server();
        let body = json!({"server_id":{"id":server.public_key(),"name":"n1"},"user_nkey":"UCQ",
                          "connect_opts":{"user":"alice","pass":"hunter2"},
                          "type":"authorization_request","version":2});
        let mut c = Claims::new(AUTH, body);
        c.aud = Some("nats-authorization-request".into());
        let token = encode(&c, &server).expect("signs");
        let req: Claims<AuthorizationRequest> = decode_verified(&token).expect("verifies");
        assert_eq!(req.iss, server.public_key());
        assert_eq!(req.nats.connect_opts.user.as_deref(), Some("alice"));
        assert!(!format!("{req:?}").contains("hunter2"));
    }

    #[test]
    fn zero_iat_is_filled_and_public_keys_cannot_sign() {
        let account = KeyPair::new_account();
        let before = now_unix();
        let token = encode(&Claims::new("UX", UserClaims::default()), &account).expect("signs");
        assert!(iat_of(&token).is_some_and(|iat| iat >= before && iat <= now_unix()));
        let public_only = KeyPair::from_public_key(&account.public_key()).expect("public");
        let err =
            encode(&Claims::new("UX", UserClaims::default()), &public_only).expect_err("no seed");
        assert_eq!(err.kind(), JwtErrorKind::Sign);
    }

    #[test]
    fn delete_request_is_self_signed_generic_claim() {
        let op = KeyPair::new_operator();
        let c = Claims {
            iat: 1_795_347_093,
            ..Claims::new(
                op.public_key(),
                DeleteAccountsClaims {
                    accounts: vec![AUTH.into()],
                },
            )
        };
        let raw = raw_payload(&encode(&c, &op).expect("signs"));
        assert_eq!(raw["iss"], raw["sub"]);
        assert_eq!(raw["nats"], json!({"accounts":[AUTH]}));
        assert!(raw.get("aud").is_none() && raw.get("exp").is_none() && raw.get("name").is_none());
    }
}
