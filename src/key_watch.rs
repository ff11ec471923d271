//! Whether this replica's at-rest key is still the database's (issue 18, item 6).
//!
//! `rotate-encryption-key` re-seals every seed while replicas serve. A replica still on the old
//! key must not seal new seeds after that (the keys of a new account, a rotated signing key):
//! the next start with only the new key could not open them. So a replica whose key no longer
//! seals like the database ([`crate::db::seeds::superseded_by`]) creates and rotates no keys,
//! does not lead the sync (a replica with the current key does), fails `/readyz` with the
//! reason, and says so once in the log. The check runs every [`CHECK_EVERY`] and, under
//! [`crate::db::seeds::SEED_KEY_LOCK`], inside every transaction that inserts a seed, so no
//! seed is sealed in between.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::keys::{SealedWith, SeedCipher};

/// How often a replica compares its key with the database's.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Shared between the watch task, the sync and `/readyz`.
#[derive(Clone, Debug, Default)]
pub struct KeyWatch {
    superseded: Arc<RwLock<Option<String>>>,
}

impl KeyWatch {
    /// Why this replica's key is no longer current, or None while it is.
    pub fn superseded(&self) -> Option<String> {
        self.superseded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records what the database's seeds are sealed with now (None: as this replica seals);
    /// logs each change once.
    pub fn record(&self, cipher: &SeedCipher, found: Option<SealedWith>) {
        let why = found.map(|with| reason(cipher, &with));
        let mut slot = self.superseded.write().unwrap_or_else(|p| p.into_inner());
        if *slot == why {
            return;
        }
        match &why {
            Some(why) => tracing::warn!("{why}"),
            None => tracing::info!(
                "this replica's encryption key is current again; it seals seeds and may lead the sync"
            ),
        }
        *slot = why;
    }

    /// Checks every [`CHECK_EVERY`] until `stop`. A failed check changes nothing (Postgres
    /// being away is for the outage handling to report).
    pub async fn run(self, pool: PgPool, cipher: SeedCipher, stop: CancellationToken) {
        loop {
            match crate::db::seeds::superseded_by(&pool, &cipher).await {
                Ok(found) => self.record(&cipher, found),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot compare the encryption key with the database's")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
    }
}

/// The log line and `/readyz` reason. Key ids only.
fn reason(cipher: &SeedCipher, with: &SealedWith) -> String {
    let mine = match cipher.key_id() {
        Some(id) => format!("id {id}"),
        None => "it has none".to_owned(),
    };
    let want = match with {
        SealedWith::Key(id) => format!("the key whose id is {id}"),
        SealedWith::Plain => "no key (the seeds are plain text again)".to_owned(),
        _ => "the new key".to_owned(),
    };
    format!(
        "encryption key not current: the stored seeds are now sealed with {with} (`rotate-encryption-key` ran, or a replica started with a new key), not with this replica's key ({mine}); this replica creates and rotates no keys and leaves the sync to replicas with the current key. Restart it with NATS_PG_AUTH_ENCRYPTION_KEY set to {want}"
    )
}
