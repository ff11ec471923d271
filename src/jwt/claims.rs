//! Serde types for every NATS claim the service reads or writes, with the field names of the
//! nats-io/jwt v2 library (protocol doc §3.4–3.5, §6).
//!
//! `type` and `version` of the typed bodies are zero-sized markers ([`UserType`], [`Version2`],
//! …): they serialize to the one right value and refuse any other on decode, so a body can
//! neither forget them nor carry the wrong ones. A body without them is rejected by the server
//! (protocol doc §1.2). The incoming [`AuthorizationRequest`] is the exception: it keeps them as
//! plain values so the callout can say *why* a request is refused.
//!
//! Secrets that arrive from the wire (`connect_opts.pass`, `connect_opts.auth_token`) are
//! [`Secret`]s (zeroizing, `Debug` prints `[redacted]`), so `{:?}` on a request never prints them.

use std::collections::BTreeMap;
use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// The claim version this library writes and accepts.
pub const VERSION: i64 = 2;

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_none_or_empty(s: &Option<String>) -> bool {
    s.as_deref().is_none_or(str::is_empty)
}

/// Standard claims in Go field order (aud, exp, jti, iat, iss, name, nbf, sub), then `nats`.
///
/// Zero and empty values are left out, as Go's `omitempty` does. [`super::encode`] fills in
/// `iss` and `jti` (and `iat` when it is 0); whatever the caller put there is ignored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims<T> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    /// Unix seconds; revocations are compared against it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub iat: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iss: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sub: String,
    pub nats: T,
}

impl<T> Claims<T> {
    /// Claims for `sub` with everything else empty; `iss`, `jti` (and a zero `iat`) are filled
    /// in by [`super::encode`].
    pub fn new(sub: impl Into<String>, nats: T) -> Self {
        Self {
            aud: None,
            exp: None,
            jti: String::new(),
            iat: 0,
            iss: String::new(),
            name: None,
            nbf: None,
            sub: sub.into(),
            nats,
        }
    }

    /// A user's claims named `name`, issued at `now` and expiring `ttl` later: what the callout
    /// mints for a login and the CLI for its short-lived system user.
    pub fn user_for(
        sub: impl Into<String>,
        name: &str,
        now: i64,
        ttl: std::time::Duration,
        nats: T,
    ) -> Self {
        Self {
            exp: Some(now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2)),
            iat: now,
            name: Some(name.to_owned()),
            ..Self::new(sub, nats)
        }
    }
}

/// Defines a zero-sized `type` marker that serializes to one string and decodes only from it.
macro_rules! claim_type {
    ($(#[$doc:meta])* $name:ident = $tag:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $name;

        impl $name {
            pub const TAG: &'static str = $tag;

            pub fn as_str(&self) -> &'static str {
                $tag
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($tag)
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                *other == $tag
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($tag)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let got = String::deserialize(d)?;
                if got == $tag {
                    Ok($name)
                } else {
                    Err(de::Error::custom(concat!("claim type is not \"", $tag, "\"")))
                }
            }
        }
    };
}

claim_type!(
    /// `"type":"user"`.
    UserType = "user"
);
claim_type!(
    /// `"type":"account"`.
    AccountType = "account"
);
claim_type!(
    /// `"type":"operator"`.
    OperatorType = "operator"
);
claim_type!(
    /// `"type":"activation"`.
    ActivationType = "activation"
);
claim_type!(
    /// `"type":"authorization_response"`.
    AuthorizationResponseType = "authorization_response"
);

/// `"version":2`, the only version written or accepted on typed bodies.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Version2;

impl Version2 {
    pub fn get(&self) -> i64 {
        VERSION
    }
}

impl fmt::Debug for Version2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{VERSION}")
    }
}

impl Serialize for Version2 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(VERSION)
    }
}

impl<'de> Deserialize<'de> for Version2 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if i64::deserialize(d)? == VERSION {
            Ok(Version2)
        } else {
            Err(de::Error::custom("claim version is not 2"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Users (protocol doc §6.1)
// ---------------------------------------------------------------------------------------------

/// One direction of permissions. A subscribe entry may be `"subject queue"`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Permission {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl Permission {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// `resp`: at most `max` replies within `ttl` **nanoseconds** (Go `time.Duration`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResponsePermission {
    #[serde(default)]
    pub max: i64,
    #[serde(default)]
    pub ttl: i64,
}

/// `pub`, `sub`, `resp`: flattened into user bodies, also the account's `default_permissions`.
///
/// `pub`/`sub` are always written, as Go does (`omitempty` does not apply to structs); both
/// empty means "use the account's default permissions".
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Permissions {
    #[serde(rename = "pub", default)]
    pub publish: Permission,
    #[serde(rename = "sub", default)]
    pub subscribe: Permission,
    #[serde(rename = "resp", default, skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponsePermission>,
}

/// `subs`, `data`, `payload`. Always written: an omitted one decodes as 0, which the server
/// enforces as "none allowed"; -1 is unlimited (protocol doc §6.1). Default: all -1.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserLimits {
    #[serde(default)]
    pub subs: i64,
    #[serde(default)]
    pub data: i64,
    #[serde(default)]
    pub payload: i64,
}

impl Default for UserLimits {
    fn default() -> Self {
        Self {
            subs: -1,
            data: -1,
            payload: -1,
        }
    }
}

/// A connect-time window, 24 h `HH:MM:SS`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimeRange {
    pub start: String,
    pub end: String,
}

/// The `nats` body of a user JWT. `UserClaims::default()` is an unrestricted user with
/// unlimited `subs`/`data`/`payload`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserClaims {
    #[serde(flatten)]
    pub permissions: Permissions,
    #[serde(flatten)]
    pub limits: UserLimits,
    /// CIDRs. Not enforced by the server for callout users (protocol doc §3.7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub times: Vec<TimeRange>,
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub times_location: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub bearer_token: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_connection_types: Vec<String>,
    /// The account a signing key signs for; required when the signer is not the identity key.
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub issuer_account: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(rename = "type")]
    pub claim_type: UserType,
    pub version: Version2,
}

// Written out rather than derived: the defaults are part of the contract (unlimited user
// limits), and callers build bodies as `default()` + field assignments.
impl Default for UserClaims {
    fn default() -> Self {
        Self {
            permissions: Permissions::default(),
            limits: UserLimits::default(),
            src: Vec::new(),
            times: Vec::new(),
            times_location: None,
            bearer_token: false,
            allowed_connection_types: Vec::new(),
            issuer_account: None,
            tags: Vec::new(),
            claim_type: UserType,
            version: Version2,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accounts (protocol doc §6.2)
// ---------------------------------------------------------------------------------------------

/// Account limits, NATS and JetStream. Every field is always serialized: an omitted limit means
/// 0 and 0 is enforced (an omitted `conn` locks the account, protocol doc §6.2).
///
/// Default: NATS unlimited, JetStream off (`mem_storage`/`disk_storage` 0).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountLimits {
    #[serde(default)]
    pub subs: i64,
    #[serde(default)]
    pub data: i64,
    #[serde(default)]
    pub payload: i64,
    #[serde(default)]
    pub imports: i64,
    #[serde(default)]
    pub exports: i64,
    #[serde(default)]
    pub wildcards: bool,
    #[serde(default)]
    pub disallow_bearer: bool,
    #[serde(default)]
    pub conn: i64,
    #[serde(default)]
    pub leaf: i64,
    #[serde(default)]
    pub mem_storage: i64,
    #[serde(default)]
    pub disk_storage: i64,
    #[serde(default)]
    pub streams: i64,
    #[serde(default)]
    pub consumer: i64,
    #[serde(default)]
    pub max_ack_pending: i64,
    #[serde(default)]
    pub mem_max_stream_bytes: i64,
    #[serde(default)]
    pub disk_max_stream_bytes: i64,
    #[serde(default)]
    pub max_bytes_required: bool,
}

impl AccountLimits {
    /// What the server reads from an empty `limits` object: nothing allowed.
    pub fn zero() -> Self {
        Self {
            subs: 0,
            data: 0,
            payload: 0,
            imports: 0,
            exports: 0,
            wildcards: false,
            disallow_bearer: false,
            conn: 0,
            leaf: 0,
            mem_storage: 0,
            disk_storage: 0,
            streams: 0,
            consumer: 0,
            max_ack_pending: 0,
            mem_max_stream_bytes: 0,
            disk_max_stream_bytes: 0,
            max_bytes_required: false,
        }
    }
}

impl Default for AccountLimits {
    fn default() -> Self {
        Self {
            subs: -1,
            data: -1,
            payload: -1,
            imports: -1,
            exports: -1,
            wildcards: true,
            disallow_bearer: false,
            conn: -1,
            leaf: -1,
            mem_storage: 0,
            disk_storage: 0,
            streams: -1,
            consumer: -1,
            max_ack_pending: -1,
            mem_max_stream_bytes: 0,
            disk_max_stream_bytes: 0,
            max_bytes_required: false,
        }
    }
}

/// Export / import / activation kind.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ExportType {
    #[default]
    Stream,
    Service,
}

/// How many replies a service export answers with (services only).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum ResponseType {
    #[default]
    Singleton,
    Stream,
    Chunked,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Export {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub subject: String,
    #[serde(rename = "type")]
    pub export_type: ExportType,
    #[serde(default, skip_serializing_if = "is_false")]
    pub token_req: bool,
    /// Importing account key → Unix seconds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revocations: BTreeMap<String, i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_type: Option<ResponseType>,
    /// Nanoseconds (Go `time.Duration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_threshold: Option<i64>,
    /// 1-based position of the `*` token that must equal the importer's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_token_position: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub advertise: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_trace: bool,
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Import {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub subject: String,
    /// The exporting account.
    pub account: String,
    /// Activation JWT for a `token_req` export.
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub local_subject: Option<String>,
    #[serde(rename = "type")]
    pub import_type: ExportType,
    #[serde(default, skip_serializing_if = "is_false")]
    pub share: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_trace: bool,
}

/// `authorization` of the callout account (AUTH).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExternalAuthorization {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth_users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_accounts: Vec<String>,
    /// Curve public key the server seals requests to.
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub xkey: Option<String>,
}

/// The `nats` body of an account JWT. `AccountClaims::default()` has unlimited NATS limits and
/// no JetStream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountClaims {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<Import>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<Export>,
    /// A missing `limits` object decodes as all-zero, which is what the server enforces.
    #[serde(default = "AccountLimits::zero")]
    pub limits: AccountLimits,
    /// Plain signing keys. Scoped entries (objects) decode to their `key`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "signing_keys"
    )]
    pub signing_keys: Vec<String>,
    /// User key (or `"*"`) → Unix seconds; JWTs with `iat` at or before it are revoked.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revocations: BTreeMap<String, i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_permissions: Option<Permissions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<ExternalAuthorization>,
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub description: Option<String>,
    #[serde(rename = "type")]
    pub claim_type: AccountType,
    pub version: Version2,
}

impl Default for AccountClaims {
    fn default() -> Self {
        Self {
            imports: Vec::new(),
            exports: Vec::new(),
            limits: AccountLimits::default(),
            signing_keys: Vec::new(),
            revocations: BTreeMap::new(),
            default_permissions: None,
            authorization: None,
            description: None,
            claim_type: AccountType,
            version: Version2,
        }
    }
}

/// Accepts both forms of a signing key entry: `"A…"` and `{"kind":"user_scope","key":"A…",…}`.
fn signing_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Plain(String),
        Scoped { key: String },
    }
    let entries = Option::<Vec<Entry>>::deserialize(d)?.unwrap_or_default();
    Ok(entries
        .into_iter()
        .map(|e| match e {
            Entry::Plain(k) | Entry::Scoped { key: k } => k,
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Operator, activation, delete
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OperatorClaims {
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "signing_keys"
    )]
    pub signing_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub system_account: Option<String>,
    /// Account JWTs must then be signed by a signing key, not the identity key.
    #[serde(default, skip_serializing_if = "is_false")]
    pub strict_signing_key_usage: bool,
    #[serde(rename = "type")]
    pub claim_type: OperatorType,
    pub version: Version2,
}

impl Default for OperatorClaims {
    fn default() -> Self {
        Self {
            signing_keys: Vec::new(),
            system_account: None,
            strict_signing_key_usage: false,
            claim_type: OperatorType,
            version: Version2,
        }
    }
}

/// Activation token for a `token_req` export: issued by the exporter, `sub` = the importer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActivationClaims {
    /// The subject the importer may import; must contain the import's subject.
    pub subject: String,
    /// Must equal the import's `type`.
    pub kind: ExportType,
    /// The exporting account, when signed by one of its signing keys.
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub issuer_account: Option<String>,
    #[serde(rename = "type")]
    pub claim_type: ActivationType,
    pub version: Version2,
}

impl ActivationClaims {
    pub fn new(
        subject: impl Into<String>,
        kind: ExportType,
        issuer_account: Option<String>,
    ) -> Self {
        Self {
            subject: subject.into(),
            kind,
            issuer_account,
            ..Self::default()
        }
    }
}

/// Body of the generic claim sent to `$SYS.REQ.CLAIMS.DELETE`: self-signed by the operator (or
/// one of its signing keys), no `type` needed (protocol doc §2.4).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeleteAccountsClaims {
    pub accounts: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Auth callout (protocol doc §3.4, §3.5)
// ---------------------------------------------------------------------------------------------

/// An optional secret from the wire (`connect_opts.pass`, `connect_opts.auth_token`).
///
/// `Debug` prints `[redacted]`; the value is only reachable through [`Secret::expose`], and it
/// is zeroized on drop. Absent and `null` decode as none.
#[derive(Clone, Default)]
pub struct Secret(Option<SecretString>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Some(SecretString::from(value.into())))
    }

    pub fn none() -> Self {
        Self(None)
    }

    /// The secret in clear. Keep the borrow short; never log it.
    pub fn expose(&self) -> Option<&str> {
        self.0.as_ref().map(|s| s.expose_secret())
    }

    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

impl From<Option<String>> for Secret {
    fn from(v: Option<String>) -> Self {
        Self(v.map(SecretString::from))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_some() { "[redacted]" } else { "None" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Option::<String>::deserialize(d)?.into())
    }
}

impl Serialize for Secret {
    // Only tests and tools build requests; they need the value on the wire.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.expose().serialize(s)
    }
}

/// `server_id` of a request: the server that asks. `id` is the `aud` of the response.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerId {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub version: String,
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The server's curve key; present only when AUTH has an `xkey`.
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub xkey: Option<String>,
}

/// `client_info`. Every field is optional: what is filled depends on the server version and the
/// connection kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Connection id (needed for `$SYS.REQ.SERVER.<id>.KICK`).
    #[serde(default)]
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_tag: Option<String>,
    /// `Client`, `Leafnode`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `nats`, `mqtt`, `websocket`, …
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub client_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_id: Option<String>,
    /// Filled only when the client sent `sig`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// `connect_opts`: what the client sent in CONNECT. `pass` and `auth_token` are secrets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectOpts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    #[serde(default, skip_serializing_if = "Secret::is_none")]
    pub auth_token: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Secret::is_none")]
    pub pass: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<i64>,
}

/// The `nats` body of a request from the server (issuer: a server `N…` key).
///
/// Decoding is tolerant: unknown fields are ignored and missing ones default, so a newer or
/// older server does not break the callout. `claim_type`/`version` are kept as received for the
/// caller to check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorizationRequest {
    #[serde(default)]
    pub server_id: ServerId,
    #[serde(default)]
    pub user_nkey: String,
    #[serde(default)]
    pub client_info: ClientInfo,
    #[serde(default)]
    pub connect_opts: ConnectOpts,
    /// `{version, cipher, certs[] | verified_chains[][]}`; only for TLS clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_nonce: Option<String>,
    #[serde(rename = "type", default)]
    pub claim_type: String,
    #[serde(default)]
    pub version: i64,
}

impl AuthorizationRequest {
    pub const TYPE: &'static str = "authorization_request";
}

impl Default for AuthorizationRequest {
    fn default() -> Self {
        Self {
            server_id: ServerId::default(),
            user_nkey: String::new(),
            client_info: ClientInfo::default(),
            connect_opts: ConnectOpts::default(),
            client_tls: None,
            request_nonce: None,
            claim_type: Self::TYPE.to_owned(),
            version: VERSION,
        }
    }
}

/// The `nats` body of our answer (issuer: AUTH). Exactly one of `jwt` / `error` must be set;
/// use [`AuthorizationResponse::allow`] / [`AuthorizationResponse::deny`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthorizationResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// AUTH's identity key, when the response is signed by an AUTH signing key.
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub issuer_account: Option<String>,
    #[serde(rename = "type")]
    pub claim_type: AuthorizationResponseType,
    pub version: Version2,
}

impl AuthorizationResponse {
    pub fn allow(user_jwt: impl Into<String>) -> Self {
        Self {
            jwt: Some(user_jwt.into()),
            ..Self::default()
        }
    }

    pub fn deny(reason: impl Into<String>) -> Self {
        Self {
            error: Some(reason.into()),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn to_value<T: Serialize>(t: &T) -> Value {
        serde_json::to_value(t).expect("serializable")
    }

    #[test]
    fn typed_bodies_always_carry_type_and_version() {
        for (body, tag) in [
            (to_value(&UserClaims::default()), "user"),
            (to_value(&AccountClaims::default()), "account"),
            (to_value(&OperatorClaims::default()), "operator"),
            (
                to_value(&ActivationClaims::new("a.b", ExportType::Service, None)),
                "activation",
            ),
            (
                to_value(&AuthorizationResponse::deny("no")),
                "authorization_response",
            ),
        ] {
            assert_eq!(body["type"], tag);
            assert_eq!(body["version"], 2);
        }
    }

    #[test]
    fn wrong_type_or_version_does_not_decode() {
        let user = json!({"pub":{},"sub":{},"subs":-1,"data":-1,"payload":-1});
        let with = |t: &str, v: i64| {
            let mut u = user.clone();
            u["type"] = t.into();
            u["version"] = v.into();
            serde_json::from_value::<UserClaims>(u)
        };
        assert!(with("user", 2).is_ok());
        assert!(with("account", 2).is_err());
        assert!(with("user", 1).is_err());
        assert!(
            serde_json::from_value::<UserClaims>(user).is_err(),
            "type is mandatory"
        );
    }

    #[test]
    fn user_body_wire_names() {
        let mut u = UserClaims::default();
        u.permissions.publish.allow = vec!["app.ok".into()];
        u.permissions.response = Some(ResponsePermission {
            max: 1,
            ttl: 5_000_000_000,
        });
        u.bearer_token = true;
        u.times = vec![TimeRange {
            start: "08:00:00".into(),
            end: "18:00:00".into(),
        }];
        let v = to_value(&u);
        assert_eq!(v["pub"], json!({"allow":["app.ok"]}));
        assert_eq!(v["sub"], json!({}), "pub/sub always written, like Go");
        assert_eq!(v["resp"], json!({"max":1,"ttl":5_000_000_000i64}));
        assert_eq!(
            (&v["subs"], &v["data"], &v["payload"]),
            (&json!(-1), &json!(-1), &json!(-1))
        );
        assert_eq!(v["bearer_token"], true);
        assert_eq!(v["times"][0]["start"], "08:00:00");
        for absent in [
            "src",
            "times_location",
            "allowed_connection_types",
            "issuer_account",
            "tags",
        ] {
            assert!(v.get(absent).is_none(), "{absent} skipped when empty");
        }
        let back: UserClaims = serde_json::from_value(v).expect("decodes");
        assert_eq!(back, u);
    }

    #[test]
    fn account_body_wire_names() {
        let a = AccountClaims {
            signing_keys: vec!["ASIGN".into()],
            exports: vec![Export {
                name: "echo".into(),
                subject: "svc.echo.*".into(),
                export_type: ExportType::Service,
                token_req: true,
                response_type: Some(ResponseType::Singleton),
                response_threshold: Some(2_000_000_000),
                account_token_position: Some(3),
                ..Export::default()
            }],
            imports: vec![Import {
                name: "echo".into(),
                subject: "svc.echo.AIMP".into(),
                account: "AEXP".into(),
                local_subject: Some("echo".into()),
                import_type: ExportType::Service,
                ..Import::default()
            }],
            authorization: Some(ExternalAuthorization {
                auth_users: vec!["UAUTH".into()],
                allowed_accounts: vec!["*".into()],
                xkey: Some("XKEY".into()),
            }),
            ..AccountClaims::default()
        };
        let v = to_value(&a);
        assert_eq!(
            v["exports"][0],
            json!({"name":"echo","subject":"svc.echo.*","type":"service","token_req":true,
                   "response_type":"Singleton","response_threshold":2_000_000_000i64,
                   "account_token_position":3})
        );
        assert_eq!(
            v["imports"][0],
            json!({"name":"echo","subject":"svc.echo.AIMP","account":"AEXP",
                   "local_subject":"echo","type":"service"})
        );
        assert_eq!(
            v["authorization"],
            json!({"auth_users":["UAUTH"],"allowed_accounts":["*"],"xkey":"XKEY"})
        );
        assert!(v.get("revocations").is_none() && v.get("description").is_none());
        let back: AccountClaims = serde_json::from_value(v).expect("decodes");
        assert_eq!(back, a);
    }

    #[test]
    fn scoped_signing_keys_decode_to_their_key() {
        let v = json!({"limits":{},"signing_keys":["APLAIN",{"kind":"user_scope","key":"ASCOPED",
                       "role":"std","template":{}}],"type":"account","version":2});
        let a: AccountClaims = serde_json::from_value(v).expect("decodes");
        assert_eq!(
            a.signing_keys,
            vec!["APLAIN".to_owned(), "ASCOPED".to_owned()]
        );
    }

    #[test]
    fn request_decodes_as_observed_and_tolerates_unknown_fields() {
        // The request of protocol doc §3.4, plus fields a newer server might add.
        let v = json!({
            "server_id":{"name":"proto1","host":"127.0.0.1","id":"NB2KC7","version":"2.15.1",
                         "xkey":"XA3F6X","future":1},
            "user_nkey":"UCQSE6",
            "client_info":{"host":"127.0.0.1","id":10,"user":"alice","name_tag":"sentinel",
                           "kind":"Client","type":"nats","start":"2026-01-01T00:00:00Z"},
            "connect_opts":{"jwt":"eyJ0","user":"alice","pass":"secret","lang":"python3",
                            "version":"2.16.0","protocol":1,"echo":true},
            "type":"authorization_request","version":2,"something_new":{"x":[1]}});
        let r: AuthorizationRequest = serde_json::from_value(v).expect("decodes");
        assert_eq!(r.server_id.xkey.as_deref(), Some("XA3F6X"));
        assert_eq!(r.client_info.id, 10);
        assert_eq!(r.client_info.client_type.as_deref(), Some("nats"));
        assert_eq!(r.connect_opts.pass.expose(), Some("secret"));
        assert!(r.connect_opts.auth_token.is_none());
        assert_eq!(r.claim_type, AuthorizationRequest::TYPE);
        // A minimal request (an older server) still decodes.
        let min: AuthorizationRequest =
            serde_json::from_value(json!({"user_nkey":"U"})).expect("decodes");
        assert_eq!(min.client_info.host, None);
    }

    #[test]
    fn secrets_in_requests_are_redacted_in_debug() {
        let r: AuthorizationRequest = serde_json::from_str(
            r#"{"user_nkey":"U","connect_opts":{"user":"alice","pass":"hunter2","auth_token":"t0ken-xyz"},
                "type":"authorization_request","version":2}"#,
        )
        .expect("decodes");
        let dbg = format!("{r:?} {:?}", r.connect_opts);
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("t0ken-xyz"),
            "{dbg}"
        );
        assert!(dbg.contains("alice"));
        assert_eq!(r.connect_opts.auth_token.expose(), Some("t0ken-xyz"));
    }

    #[test]
    fn response_has_exactly_one_outcome() {
        let ok = to_value(&AuthorizationResponse::allow("eyJ"));
        assert_eq!(
            ok,
            json!({"jwt":"eyJ","type":"authorization_response","version":2})
        );
        let no = to_value(&AuthorizationResponse::deny("bad password"));
        assert_eq!(
            no,
            json!({"error":"bad password","type":"authorization_response","version":2})
        );
    }

    #[test]
    fn delete_accounts_is_a_generic_claim() {
        let v = to_value(&DeleteAccountsClaims {
            accounts: vec!["ADHG".into()],
        });
        assert_eq!(v, json!({"accounts":["ADHG"]}));
    }
}
