//! The connections this replica admitted from its login copy while Postgres was unreachable
//! (`--db-outage-grace`): their rights may be out of date until they reconnect. nats-server
//! keeps no claim of a callout-minted JWT it could show (no tags in CONNZ for callout users), so
//! each replica remembers them, by server id and connection id, until their JWT expires (at most
//! `--db-outage-ttl`), and answers `nats-pg-auth connections` on [`SUBJECT`] in the system
//! account.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Request subject (system account): every replica answers with its [`Entry`] list.
pub const SUBJECT: &str = "nats-pg-auth.outage-logins";

/// At most this many are remembered (a reconnect storm during a long outage must not grow
/// memory without bound); beyond it new ones are not marked.
const CAP: usize = 100_000;

/// One connection admitted from the copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub server_id: String,
    pub cid: u64,
    pub user: String,
    /// When its JWT expires (Unix seconds).
    pub expires: i64,
}

#[derive(Debug, Default)]
pub struct OutageLogins {
    // std Mutex: held for a map operation, never across an await.
    entries: Mutex<HashMap<(String, u64), Entry>>,
}

impl OutageLogins {
    pub fn record(&self, entry: Entry, now: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CAP {
            entries.retain(|_, e| e.expires > now);
        }
        if entries.len() < CAP {
            entries.insert((entry.server_id.clone(), entry.cid), entry);
        }
    }

    /// The entries whose JWT has not expired yet.
    pub fn current(&self, now: i64) -> Vec<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, e| e.expires > now);
        entries.values().cloned().collect()
    }

    /// Answers [`SUBJECT`] on the system connection until `stop`. Not essential to serving
    /// logins: if the subscription fails, it says so once and `connections` shows no marks.
    pub async fn answer(
        self: std::sync::Arc<Self>,
        client: async_nats::Client,
        stop: CancellationToken,
    ) {
        let mut sub = match client.subscribe(SUBJECT).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(error = %e, "cannot answer {SUBJECT}; `nats-pg-auth connections` will not mark outage logins of this replica");
                return;
            }
        };
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                msg = sub.next() => match msg { Some(m) => m, None => break },
            };
            let Some(reply) = msg.reply else { continue };
            let body =
                serde_json::to_vec(&self.current(crate::jwt::now_unix())).unwrap_or_default();
            let _ = client.publish(reply, body.into()).await;
        }
    }
}
