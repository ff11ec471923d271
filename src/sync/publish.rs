//! Talking to the resolver: `$SYS.REQ.CLAIMS.UPDATE`, `…DELETE`, `…LIST`, account lookup.
//!
//! A 200 reply only means "stored" (protocol doc §2.3); trust and ordering are checked before
//! we push, so here we only need to tell "stored" from "refused" from "nobody answered".

use std::time::Duration;

use async_nats::Client;
use serde::Deserialize;

use crate::db::accounts::AccountRow;

pub const CLAIMS_UPDATE: &str = "$SYS.REQ.CLAIMS.UPDATE";
pub const CLAIMS_DELETE: &str = "$SYS.REQ.CLAIMS.DELETE";
pub const CLAIMS_LIST: &str = "$SYS.REQ.CLAIMS.LIST";

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("no nats-server answered {0} (is the service's system user connected?)")]
    NoResponders(&'static str),
    #[error("nats-server did not answer {0} in time")]
    Timeout(&'static str),
    #[error("request failed: {0}")]
    Request(String),
    #[error("nats-server refused the JWT: {0}")]
    Refused(String),
    #[error("unexpected reply from nats-server: {0}")]
    BadReply(String),
    #[error("refused to push: {0}")]
    Forbidden(String),
    #[error("cannot check the JWT before pushing it: {0}")]
    Check(String),
}

#[derive(Debug, Deserialize)]
struct ServerReply {
    #[serde(default)]
    data: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<ReplyError>,
}

#[derive(Debug, Deserialize)]
struct ReplyError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    description: String,
}

async fn request(
    client: &Client,
    subject: &'static str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<ServerReply, PushError> {
    let reply = tokio::time::timeout(timeout, client.request(subject, payload.into()))
        .await
        .map_err(|_| PushError::Timeout(subject))?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => PushError::NoResponders(subject),
            async_nats::RequestErrorKind::TimedOut => PushError::Timeout(subject),
            _ => PushError::Request(e.to_string()),
        })?;
    let parsed: ServerReply = serde_json::from_slice(&reply.payload).map_err(|_| {
        PushError::BadReply(
            String::from_utf8_lossy(&reply.payload)
                .chars()
                .take(200)
                .collect(),
        )
    })?;
    if let Some(err) = parsed.error {
        return Err(PushError::Refused(format!(
            "{} (code {})",
            err.description, err.code
        )));
    }
    Ok(parsed)
}

/// Sends a JWT to a claims subject; Ok only on a `code: 200` reply.
async fn expect_200(
    client: &Client,
    subject: &'static str,
    jwt: &str,
    timeout: Duration,
) -> Result<(), PushError> {
    let reply = request(client, subject, jwt.as_bytes().to_vec(), timeout).await?;
    match reply
        .data
        .as_ref()
        .and_then(|d| d.get("code"))
        .and_then(|c| c.as_i64())
    {
        Some(200) => Ok(()),
        _ => Err(PushError::BadReply(format!("{:?}", reply.data))),
    }
}

/// Pushes one account JWT.
pub async fn update(client: &Client, jwt: &str, timeout: Duration) -> Result<(), PushError> {
    expect_200(client, CLAIMS_UPDATE, jwt, timeout).await
}

/// Pushes the JWT of the tenant account `row`, after checking that its subject is that
/// account's own identity key (`nats.account_keys`, kind `identity`) and not a key of the
/// service (operator, SYS, AUTH, ...). `nats.accounts.public_key` is only a copy: whoever could
/// point it at the AUTH account would otherwise have the sync push an AUTH JWT without its
/// `authorization` block (the callout off for everyone), or make the account's signing keys SYS
/// signing keys. Both facts come with the row (`db::accounts::load`): no extra query.
pub async fn update_account(
    row: &AccountRow,
    client: &Client,
    jwt: &str,
    settings: &super::SyncSettings,
) -> Result<(), PushError> {
    let subject = crate::jwt::decode_unverified::<serde_json::Value>(jwt)
        .map_err(|e| PushError::Check(e.to_string()))?
        .sub;
    check_account_subject(row, &subject)?;
    update(client, jwt, settings.push_timeout).await
}

/// Ok when `subject` may be the subject of the JWT of the account `row` (see `update_account`).
pub fn check_account_subject(row: &AccountRow, subject: &str) -> Result<(), PushError> {
    let service_kind = row
        .public_key_service_kind
        .as_deref()
        .filter(|_| row.public_key.as_deref() == Some(subject));
    if let Some(kind) = service_kind {
        return Err(PushError::Forbidden(format!(
            "the account's public_key {subject} is the service's own {kind} key; \
             nats.accounts.public_key must be the account's identity key (nats.account_keys)"
        )));
    }
    match row.identity_key.as_deref() {
        Some(identity) if identity == subject => Ok(()),
        Some(identity) => Err(PushError::Forbidden(format!(
            "the account's public_key {subject} is not its identity key {identity} \
             (nats.accounts.public_key is written by the service only)"
        ))),
        None => Err(PushError::Forbidden(format!(
            "the account has no identity key in nats.account_keys, so {subject} cannot be its key"
        ))),
    }
}

/// Deletes accounts with a generic JWT signed by the operator (built by the caller).
pub async fn delete(client: &Client, delete_jwt: &str, timeout: Duration) -> Result<(), PushError> {
    expect_200(client, CLAIMS_DELETE, delete_jwt, timeout).await
}

/// The account keys the answering server holds.
pub async fn list(client: &Client, timeout: Duration) -> Result<Vec<String>, PushError> {
    let reply = request(client, CLAIMS_LIST, Vec::new(), timeout).await?;
    serde_json::from_value(reply.data.unwrap_or_default())
        .map_err(|e| PushError::BadReply(e.to_string()))
}

/// The JWT the server serves for an account, or None when it has none.
pub async fn lookup(
    client: &Client,
    account: &str,
    timeout: Duration,
) -> Result<Option<String>, PushError> {
    let subject = format!("$SYS.REQ.ACCOUNT.{account}.CLAIMS.LOOKUP");
    let reply = tokio::time::timeout(timeout, client.request(subject, Vec::new().into()))
        .await
        .map_err(|_| PushError::Timeout("CLAIMS.LOOKUP"))?
        .map_err(|e| PushError::Request(e.to_string()))?;
    let body = String::from_utf8_lossy(&reply.payload).trim().to_owned();
    Ok((!body.is_empty()).then_some(body))
}

/// Whether the server applied an account's JetStream limits (`mem`/`disk` from its JWT; 0 means
/// JetStream off, -1 unlimited). A server that cannot grant them (more than its
/// `max_memory_store`/`max_file_store` minus what other accounts reserve) still accepts the JWT
/// and only logs the error; its `$SYS.REQ.ACCOUNT.<key>.JSZ` then says the account is not
/// JetStream enabled, or reports the limits it kept. `Err` is the reason, for `sync_error`;
/// anything this cannot tell (no JetStream on the answering server, account not loaded there,
/// no answer) is `Ok`.
pub async fn jetstream_applied(
    client: &Client,
    account: &str,
    mem: i64,
    disk: i64,
    timeout: Duration,
) -> Result<(), String> {
    if mem == 0 && disk == 0 {
        return Ok(());
    }
    let subject = format!("$SYS.REQ.ACCOUNT.{account}.JSZ");
    let Ok(Ok(reply)) = tokio::time::timeout(timeout, client.request(subject, "{}".into())).await
    else {
        return Ok(());
    };
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&reply.payload) else {
        return Ok(());
    };
    let advice = "the JetStream limits (max_jetstream_memory_storage, max_jetstream_disk_storage) are more than nats-server can grant: lower them, or raise max_memory_store / max_file_store in nats-server's jetstream block (other accounts' limits count against them too)";
    if let Some(desc) = body.pointer("/error/description").and_then(|d| d.as_str()) {
        if desc.contains("not jetstream enabled") {
            return Err(format!(
                "nats-server did not enable JetStream for this account; {advice}"
            ));
        }
        return Ok(());
    }
    let reserved = |field: &str| {
        body.pointer(&format!("/data/{field}"))
            .and_then(|v| v.as_i64())
    };
    let (Some(got_mem), Some(got_disk)) =
        (reserved("reserved_memory"), reserved("reserved_storage"))
    else {
        return Ok(());
    };
    if (mem > 0 && got_mem != mem) || (disk > 0 && got_disk != disk) {
        return Err(format!(
            "nats-server kept other JetStream limits for this account (memory {got_mem} bytes for {mem} asked, storage {got_disk} for {disk}); {advice}"
        ));
    }
    Ok(())
}
