//! The auth callout: answers nats-server's `$SYS.REQ.USER.AUTH` for every client login.
//!
//! Every replica subscribes in one queue group, so any replica answers any server. Each request
//! is handled in its own task; a semaphore bounds how many run at once (below the Postgres pool
//! size), and a request that cannot start before the server's auth timeout is denied rather
//! than queued forever.

pub mod credentials;
pub mod mint;
pub mod permissions;
pub mod request;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Message};
use futures::StreamExt;
use nkeys::{KeyPair, XKey};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db;
use crate::db::logins::LoginRow;
use crate::jwt;
use crate::keys::SeedCipher;
use credentials::PasswordVerifier;
use permissions::Defaults;
use request::{VerifiedRequest, SERVER_XKEY_HEADER};

pub const AUTH_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
pub const QUEUE_GROUP: &str = "nats-pg-auth";

/// Why a login was refused. Logged and counted by kind; the client only ever sees
/// `Authorization Violation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    NoCredentials,
    UnknownUser,
    BadPassword,
    UnknownToken,
    TokenExpired,
    TokenRevoked,
    InactiveUser,
    InactiveAccount,
    AccountNotReady,
    SourceNotAllowed,
    ConnectionTypeNotAllowed,
    Overloaded,
    Internal,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoCredentials => "no_credentials",
            DenyReason::UnknownUser => "unknown_user",
            DenyReason::BadPassword => "bad_password",
            DenyReason::UnknownToken => "unknown_token",
            DenyReason::TokenExpired => "token_expired",
            DenyReason::TokenRevoked => "token_revoked",
            DenyReason::InactiveUser => "inactive_user",
            DenyReason::InactiveAccount => "inactive_account",
            DenyReason::AccountNotReady => "account_not_ready",
            DenyReason::SourceNotAllowed => "source_not_allowed",
            DenyReason::ConnectionTypeNotAllowed => "connection_type_not_allowed",
            DenyReason::Overloaded => "overloaded",
            DenyReason::Internal => "internal_error",
        }
    }
}

/// A refusal with a detail for the log line. The detail never holds a secret.
#[derive(Debug)]
pub struct Deny {
    pub reason: DenyReason,
    pub detail: String,
}

impl Deny {
    fn new(reason: DenyReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Tunables of the callout.
#[derive(Debug, Clone)]
pub struct CalloutSettings {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub defaults: Defaults,
    pub concurrency: usize,
    pub hash_threads: usize,
}

/// The AUTH identity the callout answers as.
pub struct AuthIdentity {
    pub account_public_key: String,
    pub signer: KeyPair,
    pub xkey: XKey,
}

/// Shared state of the callout handlers.
pub struct Callout {
    pool: PgPool,
    auth: AuthIdentity,
    cipher: SeedCipher,
    settings: CalloutSettings,
    limiter: Arc<Semaphore>,
    passwords: PasswordVerifier,
    pub metrics: crate::metrics::Metrics,
}

/// A successful decision: the user JWT plus who it is for (for the log line).
struct Grant {
    user_jwt: String,
    username: String,
    account: String,
}

impl Callout {
    pub fn new(
        pool: PgPool,
        auth: AuthIdentity,
        cipher: SeedCipher,
        settings: CalloutSettings,
        metrics: crate::metrics::Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            limiter: Arc::new(Semaphore::new(settings.concurrency)),
            passwords: PasswordVerifier::new(settings.hash_threads),
            pool,
            auth,
            cipher,
            settings,
            metrics,
        })
    }

    /// Subscribes and serves until `shutdown`; in-flight requests are finished before return.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        shutdown: CancellationToken,
    ) -> Result<(), async_nats::SubscribeError> {
        let mut sub = client
            .queue_subscribe(AUTH_SUBJECT, QUEUE_GROUP.into())
            .await?;
        tracing::info!(
            subject = AUTH_SUBJECT,
            queue = QUEUE_GROUP,
            "auth callout listening"
        );
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = sub.next() => match msg {
                    Some(msg) => {
                        let this = self.clone();
                        let client = client.clone();
                        tracker.spawn(async move { this.handle(client, msg).await });
                    }
                    None => break,
                },
            }
        }
        let _ = sub.unsubscribe().await;
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    async fn handle(&self, client: Client, msg: Message) {
        let received = Instant::now();
        let Some(reply) = msg.reply.clone() else {
            tracing::warn!("authorization request without a reply subject; ignored");
            return;
        };
        if let Some(bytes) = self.answer(&msg, received).await {
            if let Err(e) = client.publish(reply, bytes.into()).await {
                tracing::warn!(error = %e, "could not publish the authorization response; the server will time the client out");
            }
        }
        self.metrics.observe_decision(received.elapsed());
    }

    /// Decodes, decides and builds the sealed response. `None` when the request cannot be
    /// answered at all (it is not a verifiable request from a server).
    pub async fn answer(&self, msg: &Message, received: Instant) -> Option<Vec<u8>> {
        let now = jwt::now_unix();
        let header = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(SERVER_XKEY_HEADER))
            .map(|v| v.as_str().to_owned());
        let req = match request::verify(
            &msg.payload,
            header.as_deref(),
            &self.auth.xkey,
            &self.auth.account_public_key,
            now,
        ) {
            Ok(req) => req,
            Err(e) => {
                self.metrics.count_bad_request(e.as_str());
                tracing::warn!(kind = e.as_str(), "refusing authorization request: {e}");
                return None;
            }
        };
        // Wait for a slot at most until the server gives up on us (request exp), minus a
        // margin to send the reply.
        let budget = req
            .claims
            .exp
            .map(|exp| Duration::from_secs((exp - now).max(1) as u64))
            .unwrap_or(Duration::from_secs(2))
            .saturating_sub(Duration::from_millis(250))
            .saturating_sub(received.elapsed());
        let decision = match tokio::time::timeout(budget, self.limiter.acquire()).await {
            Ok(Ok(_permit)) => self.decide(&req, now).await,
            _ => Err(Deny::new(
                DenyReason::Overloaded,
                "no free callout slot before the auth timeout",
            )),
        };
        let client = &req.claims.nats.client_info;
        let host = client.host.as_deref().unwrap_or("");
        let outcome = match &decision {
            Ok(grant) => {
                self.metrics.count_allow();
                tracing::info!(user = %grant.username, account = %grant.account, host, "login allowed");
                Ok(grant.user_jwt.clone())
            }
            Err(deny) => {
                self.metrics.count_deny(deny.reason.as_str());
                let user = req.claims.nats.connect_opts.user.as_deref().unwrap_or("");
                tracing::warn!(
                    reason = deny.reason.as_str(),
                    user,
                    host,
                    "login denied: {}",
                    deny.detail
                );
                Err(deny.reason.as_str())
            }
        };
        let response = match mint::response(&req, outcome, &self.auth.signer, now) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign the authorization response");
                return None;
            }
        };
        match mint::seal(response, &self.auth.xkey, req.server_xkey.as_ref()) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                tracing::error!(error = %e, "cannot seal the authorization response");
                None
            }
        }
    }

    async fn decide(&self, req: &VerifiedRequest, now: i64) -> Result<Grant, Deny> {
        let opts = &req.claims.nats.connect_opts;
        let token = opts
            .auth_token
            .expose()
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        let login = if let Some(token) = token {
            self.check_token(SecretString::from(token), now).await?
        } else {
            let user = opts.user.as_deref().filter(|u| !u.is_empty());
            let pass = opts.pass.expose().map(str::to_owned);
            match (user, pass) {
                (Some(user), Some(pass)) => {
                    self.check_password(user, SecretString::from(pass)).await?
                }
                _ => {
                    return Err(Deny::new(
                        DenyReason::NoCredentials,
                        "client sent neither user/password nor token",
                    ))
                }
            }
        };
        self.authorize(req, &login, now)
    }

    async fn check_password(
        &self,
        username: &str,
        password: SecretString,
    ) -> Result<LoginRow, Deny> {
        let row = db::logins::by_username(&self.pool, username)
            .await
            .map_err(|e| Deny::new(DenyReason::Internal, format!("user lookup failed: {e}")))?;
        let hash = row.as_ref().and_then(|r| r.password_hash.clone());
        let exists = row.is_some();
        let ok = self.passwords.verify(password, hash).await.map_err(|e| {
            Deny::new(DenyReason::Internal, format!("password hash of user {username:?} cannot be checked ({e:?}); fix nats.users.password_hash"))
        })?;
        match row {
            Some(row) if ok => Ok(row),
            _ if !exists => Err(Deny::new(DenyReason::UnknownUser, "no such user")),
            _ => Err(Deny::new(
                DenyReason::BadPassword,
                "password does not match",
            )),
        }
    }

    async fn check_token(&self, token: SecretString, now: i64) -> Result<LoginRow, Deny> {
        let digest = credentials::token_digest(token.expose_secret());
        let found = db::logins::by_token(&self.pool, &digest)
            .await
            .map_err(|e| Deny::new(DenyReason::Internal, format!("token lookup failed: {e}")))?;
        let Some((login, tok)) = found else {
            return Err(Deny::new(DenyReason::UnknownToken, "no such token"));
        };
        if !credentials::digest_matches(&tok.token_sha256, &digest) {
            return Err(Deny::new(DenyReason::UnknownToken, "no such token"));
        }
        if tok.token_revoked_at.is_some_and(|t| t.timestamp() <= now) {
            return Err(Deny::new(
                DenyReason::TokenRevoked,
                format!(
                    "token {} of user {:?} is revoked",
                    tok.token_id, login.username
                ),
            ));
        }
        if tok.token_expires_at.is_some_and(|t| t.timestamp() <= now) {
            return Err(Deny::new(
                DenyReason::TokenExpired,
                format!(
                    "token {} of user {:?} has expired",
                    tok.token_id, login.username
                ),
            ));
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            if let Err(e) = db::logins::touch_token(&pool, tok.token_id).await {
                tracing::debug!(error = %e, "could not record token use");
            }
        });
        Ok(login)
    }

    /// Checks that the now-identified user may log in here, and mints its JWT.
    fn authorize(&self, req: &VerifiedRequest, login: &LoginRow, now: i64) -> Result<Grant, Deny> {
        if !login.user_active {
            return Err(Deny::new(
                DenyReason::InactiveUser,
                format!("user {:?} is inactive", login.username),
            ));
        }
        if !login.account_active {
            return Err(Deny::new(
                DenyReason::InactiveAccount,
                format!("account {:?} is inactive", login.account_name),
            ));
        }
        if login.role_account_id.is_some_and(|a| a != login.account_id) {
            // The schema refuses this; deny rather than hand out another tenant's role.
            return Err(Deny::new(
                DenyReason::Internal,
                format!(
                    "role {:?} of user {:?} belongs to another account",
                    login.role_id, login.username
                ),
            ));
        }
        let client = &req.claims.nats.client_info;
        permissions::check_connection(
            login,
            client.host.as_deref(),
            client.kind.as_deref(),
            client.client_type.as_deref(),
        )
        .map_err(|rule| match rule {
            permissions::ConnectionRule::SourceNotAllowed => Deny::new(
                DenyReason::SourceNotAllowed,
                "source address not in the role's allowed_sources",
            ),
            permissions::ConnectionRule::ConnectionTypeNotAllowed => Deny::new(
                DenyReason::ConnectionTypeNotAllowed,
                "connection type not in the role's allowed_connection_types",
            ),
        })?;
        let (Some(account_key), Some(signing_public), Some(signing_seed)) = (
            login.account_public_key.as_deref(),
            login.signing_public_key.as_deref(),
            login.signing_seed.as_deref(),
        ) else {
            return Err(Deny::new(
                DenyReason::AccountNotReady,
                format!("account {:?} is not on the server yet (sync pending; see nats.accounts.sync_error)", login.account_name),
            ));
        };
        let signer = crate::keys::keypair_from_stored(&self.cipher, signing_seed, signing_public)
            .map_err(|e| {
            Deny::new(
                DenyReason::Internal,
                format!(
                    "signing key of account {:?} unusable: {e}",
                    login.account_name
                ),
            )
        })?;
        let merged = permissions::merge(login, &self.settings.defaults);
        let ttl = permissions::ttl(login, self.settings.default_ttl, self.settings.max_ttl);
        let user_jwt = mint::user_jwt(
            req,
            &login.username,
            &merged,
            ttl,
            account_key,
            &signer,
            now,
        )
        .map_err(|e| Deny::new(DenyReason::Internal, format!("cannot mint user JWT: {e}")))?;
        Ok(Grant {
            user_jwt,
            username: login.username.clone(),
            account: login.account_name.clone(),
        })
    }
}
