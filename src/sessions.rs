//! Session control: closes live connections whose rights changed, on whichever server holds
//! them (protocol doc §5.1: `$SYS.REQ.SERVER.PING.CONNZ` to find them, `…<server>.KICK` to
//! close them). Run by the sync leader only, so each change is acted on once.
//!
//! Triggers send `NOTIFY nats_pg_auth_kick` with the user (or role, or token owner) whose
//! rights changed. A kicked client reconnects through the callout and comes back with current
//! rights, or not at all. Kicks are rate-limited so a role change for 10,000 users does not
//! stampede the servers or the callout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio::time::Instant;

pub const KICK_CHANNEL: &str = "nats_pg_auth_kick";

/// What a trigger asks for.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum KickRequest {
    User { account_id: i64, username: String },
    Role { role_id: i64 },
    TokenOwner { user_id: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum KickError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("nats: {0}")]
    Nats(String),
}

pub struct Sessions {
    pool: PgPool,
    client: Client,
    /// Earliest time the next kick may be sent (token bucket of one, refilled at `rate`).
    next_slot: Mutex<Instant>,
    interval: Duration,
    /// How long to collect CONNZ replies from the servers of a cluster.
    gather: Duration,
}

#[derive(Debug, Deserialize)]
struct ConnzReply {
    server: ServerInfo,
    #[serde(default)]
    data: Option<ConnzData>,
}

#[derive(Debug, Deserialize)]
struct ServerInfo {
    id: String,
}

#[derive(Debug, Deserialize)]
struct ConnzData {
    #[serde(default)]
    connections: Vec<Conn>,
}

#[derive(Debug, Deserialize)]
struct Conn {
    cid: u64,
    #[serde(default)]
    authorized_user: Option<String>,
}

impl Sessions {
    /// `kicks_per_second` bounds how fast connections are closed.
    pub fn new(pool: PgPool, client: Client, kicks_per_second: u32) -> Self {
        Self {
            pool,
            client,
            next_slot: Mutex::new(Instant::now()),
            interval: Duration::from_secs(1) / kicks_per_second.max(1),
            gather: Duration::from_millis(250),
        }
    }

    /// Receives kick requests until `stop`, on a connection of its own: a long sync burst on
    /// the leader must not hold a revocation back. Each request is handled in its own task.
    pub async fn listen(self: std::sync::Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let connected = async {
                let mut l = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
                l.listen(KICK_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = match connected.await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot LISTEN for kick requests; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    n = listener.try_recv() => match n {
                        Ok(Some(note)) => {
                            let this = self.clone();
                            let payload = note.payload().to_owned();
                            tokio::spawn(async move { this.on_notification(&payload).await });
                        }
                        // Reconnected by sqlx; kicks sent meanwhile are lost (the JWT TTL bounds
                        // how long a missed one matters).
                        Ok(None) => tracing::warn!("kick listener reconnected; kick requests sent meanwhile were missed"),
                        Err(e) => {
                            tracing::warn!(error = %e, "kick listener lost; reconnecting");
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Handles one notification payload; errors are logged, never fatal.
    pub async fn on_notification(&self, payload: &str) {
        let request: KickRequest = match serde_json::from_str(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring malformed kick notification");
                return;
            }
        };
        match self.kick(&request).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(
                    ?request,
                    connections = n,
                    "closed connections whose rights changed"
                );
                let subject = match &request {
                    KickRequest::User { username, .. } => format!("user:{username}"),
                    KickRequest::Role { role_id } => format!("role:{role_id}"),
                    KickRequest::TokenOwner { user_id } => format!("user_id:{user_id}"),
                };
                let mut detail = serde_json::json!({ "connections": n });
                if matches!(request, KickRequest::TokenOwner { .. }) {
                    detail["because"] = "token changed".into();
                }
                crate::db::audit::record(
                    &self.pool,
                    crate::db::audit::kind::SESSIONS_KICKED,
                    &subject,
                    detail,
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(?request, error = %e, "could not close connections; they keep their rights until their JWT expires")
            }
        }
    }

    /// Closes the affected connections; returns how many were kicked.
    pub async fn kick(&self, request: &KickRequest) -> Result<usize, KickError> {
        // account public key -> usernames
        let mut targets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let rows: Vec<(String, String)> = match request {
            KickRequest::User { account_id, username } => {
                sqlx::query_as("SELECT public_key, $2::text FROM nats.accounts WHERE id = $1 AND public_key IS NOT NULL")
                    .bind(account_id)
                    .bind(username)
                    .fetch_all(&self.pool)
                    .await?
            }
            KickRequest::Role { role_id } => self.users_where(Some(*role_id), None).await?,
            KickRequest::TokenOwner { user_id } => self.users_where(None, Some(*user_id)).await?,
        };
        for (account, user) in rows {
            targets.entry(account).or_default().insert(user);
        }
        let mut kicked = 0;
        for (account, users) in targets {
            for (server, cid) in self.find(&account, &users).await? {
                self.wait_for_slot().await;
                if self.kick_one(&server, cid).await {
                    kicked += 1;
                }
            }
        }
        Ok(kicked)
    }

    /// (account key, username) of the users holding a role, or of one user.
    async fn users_where(
        &self,
        role_id: Option<i64>,
        user_id: Option<i64>,
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT a.public_key, u.username FROM nats.users u JOIN nats.accounts a ON a.id = u.account_id \
             WHERE a.public_key IS NOT NULL AND ($1::bigint IS NULL OR u.role_id = $1) \
               AND ($2::bigint IS NULL OR u.id = $2)",
        )
        .bind(role_id)
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Asks every server for the account's connections and keeps those of `users`.
    async fn find(
        &self,
        account: &str,
        users: &BTreeSet<String>,
    ) -> Result<Vec<(String, u64)>, KickError> {
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| KickError::Nats(e.to_string()))?;
        let body =
            serde_json::json!({"account": account, "auth": true, "limit": 100_000}).to_string();
        self.client
            .publish_with_reply("$SYS.REQ.SERVER.PING.CONNZ", inbox, body.into())
            .await
            .map_err(|e| KickError::Nats(e.to_string()))?;
        let mut found = Vec::new();
        let deadline = Instant::now() + self.gather;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
            let Ok(reply) = serde_json::from_slice::<ConnzReply>(&msg.payload) else {
                continue;
            };
            for conn in reply.data.map(|d| d.connections).unwrap_or_default() {
                if conn
                    .authorized_user
                    .as_ref()
                    .is_some_and(|u| users.contains(u))
                {
                    found.push((reply.server.id.clone(), conn.cid));
                }
            }
        }
        let _ = sub.unsubscribe().await;
        Ok(found)
    }

    async fn kick_one(&self, server: &str, cid: u64) -> bool {
        let subject = format!("$SYS.REQ.SERVER.{server}.KICK");
        let body = serde_json::json!({ "cid": cid }).to_string();
        match tokio::time::timeout(
            Duration::from_secs(2),
            self.client.request(subject, body.into()),
        )
        .await
        {
            Ok(Ok(reply)) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&reply.payload).unwrap_or_default();
                // "no such client" means it is already gone: nothing to do.
                v.get("error").is_none()
            }
            _ => false,
        }
    }

    async fn wait_for_slot(&self) {
        let mut next = self.next_slot.lock().await;
        let now = Instant::now();
        let at = (*next).max(now);
        *next = at + self.interval;
        drop(next);
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::KickRequest;

    #[test]
    fn trigger_payloads_parse() {
        assert_eq!(
            serde_json::from_str::<KickRequest>(r#"{"account_id":3,"username":"alice"}"#).unwrap(),
            KickRequest::User {
                account_id: 3,
                username: "alice".into()
            }
        );
        assert_eq!(
            serde_json::from_str::<KickRequest>(r#"{"role_id":7}"#).unwrap(),
            KickRequest::Role { role_id: 7 }
        );
        assert_eq!(
            serde_json::from_str::<KickRequest>(r#"{"user_id":9}"#).unwrap(),
            KickRequest::TokenOwner { user_id: 9 }
        );
        assert!(serde_json::from_str::<KickRequest>(r#"{"bogus":1}"#).is_err());
    }
}
