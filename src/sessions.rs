//! Session control: closes live connections whose rights changed, on whichever server holds
//! them (protocol doc §5.1: `$SYS.REQ.SERVER.PING.CONNZ` to find them, `…<server>.KICK` to
//! close them). Run by the sync leader only, so each change is acted on once.
//!
//! Triggers insert a row into `nats.kick_requests` (the user, role or token owner whose rights
//! changed; migration 0003) and `NOTIFY nats_pg_auth_kick` to wake the leader. The leader reads
//! pending rows in id order when it starts, on every wake-up (and after its listener
//! reconnects), and every [`POLL`]; a row is deleted only once it has been carried out, so a
//! change made while no replica leads is acted on when one does. A kicked client reconnects
//! through the callout and comes back with current rights, or not at all. Kicks are
//! rate-limited so a role change for 10,000 users does not stampede the servers or the callout.
//!
//! **Logins in flight.** A login whose callout read the row before the change committed, but
//! whose connection was admitted after the kick scanned CONNZ, would keep the old rights for a
//! whole JWT lifetime. Such a connection started before the scan (its callout read the row
//! before the commit, and the scan runs after it) and is admitted within the auth timeout of
//! its start. So each request is scanned once more [`RESCAN_AFTER`] (auth timeout 2 s plus a
//! margin) after its first scan, kicking only the target's connections that **started before
//! the first scan** on that server (the server's own `now` from the first CONNZ reply, so no
//! clock skew between the service and the servers enters). A client kicked by the first scan
//! reconnects after it, so its fresh connection (current rights) is left alone; a connection
//! that was still in its callout during the first scan is kicked, whichever rights it got
//! (harmless: it reconnects). The row is deleted after the re-scan.
//!
//! **Batches.** The rows read at one look form one batch: every target they name is resolved
//! to (account, usernames) from this replica's login copy, not from `nats.users`/`nats.roles`,
//! which a tenant admin can lock (see `Sessions::targets`), each account is scanned once (at most [`SCANS_AT_ONCE`] CONNZ
//! scans in flight over all batches), and the batch gets one re-scan. A burst (10,000 users
//! deactivated) is a few batches, not 10,000 scans. At most [`MAX_IN_PROGRESS`] rows are
//! being carried out at a time; more wait in the table.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use chrono::{DateTime, FixedOffset};
use futures::StreamExt;
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::copy::{KickUser, LoginCache};
use crate::db::notify;

pub const KICK_CHANNEL: &str = "nats_pg_auth_kick";
/// Pending kick requests are also looked for this often (a request whose scan failed, e.g.
/// while NATS was away, is retried then).
pub const POLL: Duration = Duration::from_secs(5);
/// The second scan of a request: the default auth timeout (2 s) plus a margin.
pub const RESCAN_AFTER: Duration = Duration::from_millis(2500);
/// At most this many request rows are being carried out (scanned, waiting for their re-scan).
pub const MAX_IN_PROGRESS: usize = 10_000;
/// Account scans (CONNZ on every server, then the kicks) running at once, over all batches.
pub const SCANS_AT_ONCE: usize = 32;
/// Rows read per look at the table.
const PICK_UP: i64 = 1000;

/// What a trigger asks for.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(untagged)]
pub enum KickRequest {
    User { account_id: i64, username: String },
    Role { role_id: i64 },
    TokenOwner { user_id: i64 },
}

impl KickRequest {
    /// From a `nats.kick_requests` row (the table's check allows exactly one shape).
    fn from_row(
        account_id: Option<i64>,
        username: Option<String>,
        role_id: Option<i64>,
        user_id: Option<i64>,
    ) -> Option<Self> {
        match (account_id, username, role_id, user_id) {
            (Some(account_id), Some(username), _, _) => Some(KickRequest::User {
                account_id,
                username,
            }),
            (_, _, Some(role_id), _) => Some(KickRequest::Role { role_id }),
            (_, _, _, Some(user_id)) => Some(KickRequest::TokenOwner { user_id }),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KickError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("nats: {0}")]
    Nats(String),
}

/// Per server (id): the server's clock at the first scan of a request.
type ScanTimes = HashMap<String, DateTime<FixedOffset>>;

pub struct Sessions {
    pool: PgPool,
    client: Client,
    /// Earliest time the next kick may be sent (token bucket of one, refilled at `rate`).
    next_slot: Mutex<Instant>,
    interval: Duration,
    /// How long to collect CONNZ replies from the servers of a cluster.
    gather: Duration,
    /// Request rows this leader is carrying out (not read again until done).
    in_progress: std::sync::Mutex<HashSet<i64>>,
    scans: Semaphore,
    /// This replica's login copy: who holds a role, whose token it is (see [`Self::targets`]).
    copy: Option<Arc<LoginCache>>,
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
    now: Option<String>,
    #[serde(default)]
    connections: Vec<Conn>,
}

#[derive(Debug, Deserialize)]
struct Conn {
    cid: u64,
    #[serde(default)]
    authorized_user: Option<String>,
    #[serde(default)]
    start: Option<String>,
}

/// A connection of a target user.
#[derive(Debug)]
struct Found {
    server: String,
    cid: u64,
    user: String,
    start: Option<DateTime<FixedOffset>>,
}

#[derive(sqlx::FromRow)]
struct RequestRow {
    id: i64,
    account_id: Option<i64>,
    username: Option<String>,
    role_id: Option<i64>,
    user_id: Option<i64>,
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
            in_progress: Default::default(),
            scans: Semaphore::new(SCANS_AT_ONCE),
            copy: None,
        }
    }

    /// Resolves kicks from this login copy (the callout's, in the same process).
    pub fn with_copy(mut self, copy: Arc<LoginCache>) -> Self {
        self.copy = Some(copy);
        self
    }

    /// Carries out kick requests until `stop` (the end of this replica's leadership). Listens
    /// on a connection of its own: a long sync burst on the leader must not hold a revocation
    /// back. Each request is handled in its own task.
    pub async fn run(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let mut events = notify::spawn(
            &self.pool,
            notify::ListenSettings {
                name: "nats-pg-auth kicks",
                channels: &[KICK_CHANNEL],
                health_interval: Duration::from_secs(5),
            },
            stop.clone(),
        );
        // State of an earlier term of leadership (its tasks ended with it): its rows are still
        // in the table and are carried out again, in full.
        self.lock_in_progress().clear();
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = events.recv() => match event {
                    // (Re)connected: requests made while nobody listened are in the table.
                    Some(notify::Event::Connected) | Some(notify::Event::Notes(_)) => {
                        self.pick_up(&stop).await
                    }
                    // The poll below carries on meanwhile.
                    Some(notify::Event::Disconnected(_)) => {}
                    None => return,
                },
                _ = poll.tick() => self.pick_up(&stop).await,
            }
        }
    }

    /// Starts the pending requests not already being carried out, as one batch.
    async fn pick_up(self: &std::sync::Arc<Self>, stop: &CancellationToken) {
        let busy: Vec<i64> = self.in_progress_ids();
        let room = MAX_IN_PROGRESS.saturating_sub(busy.len()) as i64;
        if room == 0 {
            return;
        }
        let rows: Vec<RequestRow> = match sqlx::query_as(
            "SELECT id, account_id, username, role_id, user_id FROM nats.kick_requests \
             WHERE NOT (id = ANY($1)) ORDER BY id LIMIT $2",
        )
        .bind(&busy)
        .bind(PICK_UP.min(room))
        .fetch_all(&self.pool)
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read kick requests; retrying");
                return;
            }
        };
        let mut requests = Vec::new();
        let mut ids = Vec::new();
        let mut malformed = Vec::new();
        for row in rows {
            match KickRequest::from_row(row.account_id, row.username, row.role_id, row.user_id) {
                Some(r) => {
                    if !requests.contains(&r) {
                        requests.push(r);
                    }
                    ids.push(row.id);
                }
                None => malformed.push(row.id),
            }
        }
        if !malformed.is_empty() {
            let _ = self.delete_rows(&malformed).await;
        }
        if ids.is_empty() {
            return;
        }
        self.lock_in_progress().extend(ids.iter().copied());
        let this = self.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = this.carry_out(requests, ids) => {}
            }
        });
    }

    /// First scan of a batch, its re-scan after the auth timeout, then the rows are deleted.
    async fn carry_out(&self, requests: Vec<KickRequest>, ids: Vec<i64>) {
        let times = match self.scan_and_kick(&requests, None).await {
            Ok((kicked, times)) => {
                self.report(kicked, false).await;
                times
            }
            Err(e) => {
                tracing::warn!(?requests, error = %e, "could not close connections; retrying in a few seconds");
                self.release(&ids);
                return;
            }
        };
        tokio::time::sleep(RESCAN_AFTER).await;
        match self.scan_and_kick(&requests, Some(&times)).await {
            Ok((kicked, _)) => self.report(kicked, true).await,
            // The first scan was done; a login in flight keeps its rights until its JWT ends.
            Err(e) => {
                tracing::warn!(?requests, error = %e, "could not re-scan for logins that were in flight")
            }
        }
        self.settle(&ids).await;
    }

    /// Deletes carried-out request rows.
    async fn settle(&self, ids: &[i64]) {
        if let Err(e) = self.delete_rows(ids).await {
            tracing::warn!(error = %e, "cannot delete carried-out kick requests; they will be carried out again");
        }
        self.release(ids);
    }

    async fn delete_rows(&self, ids: &[i64]) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM nats.kick_requests WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn lock_in_progress(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.in_progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_progress_ids(&self) -> Vec<i64> {
        self.lock_in_progress().iter().copied().collect()
    }

    fn release(&self, ids: &[i64]) {
        let mut in_progress = self.lock_in_progress();
        for id in ids {
            in_progress.remove(id);
        }
    }

    async fn report(&self, kicked: BTreeMap<KickRequest, usize>, rescan: bool) {
        for (request, n) in kicked {
            if n == 0 {
                continue;
            }
            tracing::info!(
                ?request,
                connections = n,
                rescan,
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
            if rescan {
                detail["logins_in_flight"] = true.into();
            }
            crate::db::audit::record(
                &self.pool,
                crate::db::audit::kind::SESSIONS_KICKED,
                &subject,
                detail,
            )
            .await;
        }
    }

    /// Closes the connections the requests concern; returns how many were kicked per request
    /// and, per server, its clock when it answered. Each account is scanned once, accounts
    /// concurrently. With `before` (a re-scan), only connections that started before the given
    /// time on their server are kicked (a server missing from it: its clock minus
    /// [`RESCAN_AFTER`]).
    async fn scan_and_kick(
        &self,
        requests: &[KickRequest],
        before: Option<&ScanTimes>,
    ) -> Result<(BTreeMap<KickRequest, usize>, ScanTimes), KickError> {
        let targets = self.targets(requests).await?;
        let scans: Vec<Result<(Vec<usize>, ScanTimes), KickError>> = futures::stream::iter(targets)
            .map(|(account, users)| async move {
                let _permit = self.scans.acquire().await;
                let names: BTreeSet<String> = users.keys().cloned().collect();
                let (found, now) = self.find(&account, &names).await?;
                let mut kicked = Vec::new();
                for conn in found {
                    if let Some(before) = before {
                        if !started_before(&conn, before, &now) {
                            continue;
                        }
                    }
                    self.wait_for_slot().await;
                    if self.kick_one(&conn.server, conn.cid).await {
                        if let Some(request) = users.get(&conn.user) {
                            kicked.push(*request);
                        }
                    }
                }
                Ok((kicked, now))
            })
            .buffer_unordered(SCANS_AT_ONCE)
            .collect()
            .await;
        let mut counts: BTreeMap<KickRequest, usize> = BTreeMap::new();
        let mut times = ScanTimes::new();
        for scan in scans {
            let (kicked, now) = scan?;
            for index in kicked {
                *counts.entry(requests[index].clone()).or_default() += 1;
            }
            for (server, at) in now {
                let e = times.entry(server).or_insert(at);
                *e = (*e).min(at);
            }
        }
        Ok((counts, times))
    }

    /// Resolves requests to account public key -> username -> the (first) request that names
    /// it, by index. Users come from this replica's login copy (see
    /// [`LoginCache::kick_view`]), not from `nats.users` / `nats.roles`: a tenant admin can
    /// `LOCK TABLE` those, and a kick must not wait for it. Postgres is asked too only when the
    /// copy cannot vouch for its answer (not loaded or not live, a named user missing or
    /// changed since its read, a user change not re-read yet while roles are asked for), bounded
    /// by `db::LOCK_TIMEOUT`; if Postgres cannot answer, the copy's answer is used. Account keys
    /// the copy does not have are read from `nats.accounts`, which tenants cannot lock (they
    /// hold only column privileges there, and `LOCK TABLE` needs table-level ones).
    async fn targets(
        &self,
        requests: &[KickRequest],
    ) -> Result<BTreeMap<String, BTreeMap<String, usize>>, KickError> {
        let mut roles = HashSet::new();
        let mut owners = HashSet::new();
        for r in requests {
            match r {
                KickRequest::Role { role_id } => {
                    roles.insert(*role_id);
                }
                KickRequest::TokenOwner { user_id } => {
                    owners.insert(*user_id);
                }
                KickRequest::User { .. } => {}
            }
        }
        let copy = self.copy.as_ref().filter(|c| c.is_loaded());
        let (mut users, mut account_keys, complete) = match copy {
            Some(c) => {
                let v = c.kick_view(&roles, &owners);
                (v.users, v.account_keys, v.complete)
            }
            None => (Vec::new(), HashMap::new(), false),
        };
        let asks_users = !roles.is_empty() || !owners.is_empty();
        if asks_users && !complete {
            match self.users_where(&roles, &owners).await {
                Ok(rows) => {
                    for u in rows {
                        if !users.contains(&u) {
                            users.push(u);
                        }
                    }
                }
                // Without a copy there is nothing to go by: the batch is retried.
                Err(e) if copy.is_none() => return Err(e.into()),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot read the users of a kick from Postgres; going by the login copy"
                ),
            }
        }
        // (account id, username) -> the first request naming it
        let mut wanted: BTreeMap<(i64, String), usize> = BTreeMap::new();
        for (index, request) in requests.iter().enumerate() {
            match request {
                KickRequest::User {
                    account_id,
                    username,
                } => {
                    wanted
                        .entry((*account_id, username.clone()))
                        .or_insert(index);
                }
                KickRequest::Role { role_id } => {
                    for u in users.iter().filter(|u| u.role_id == Some(*role_id)) {
                        wanted
                            .entry((u.account_id, u.username.to_string()))
                            .or_insert(index);
                    }
                }
                KickRequest::TokenOwner { user_id } => {
                    for u in users.iter().filter(|u| u.user_id == *user_id) {
                        wanted
                            .entry((u.account_id, u.username.to_string()))
                            .or_insert(index);
                    }
                }
            }
        }
        let unknown: Vec<i64> = wanted
            .keys()
            .map(|(a, _)| *a)
            .filter(|a| !account_keys.contains_key(a))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !unknown.is_empty() {
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT id, public_key FROM nats.accounts WHERE id = ANY($1) AND public_key IS NOT NULL",
            )
            .bind(&unknown)
            .fetch_all(&self.pool)
            .await?;
            account_keys.extend(rows);
        }
        let mut targets: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for ((account_id, username), index) in wanted {
            // No identity key: the account never reached the servers, so nobody is connected.
            if let Some(key) = account_keys.get(&account_id) {
                targets
                    .entry(key.clone())
                    .or_default()
                    .entry(username)
                    .or_insert(index);
            }
        }
        Ok(targets)
    }

    /// The users holding one of `roles`, and the users `ids`, from Postgres.
    async fn users_where(
        &self,
        roles: &HashSet<i64>,
        ids: &HashSet<i64>,
    ) -> Result<Vec<KickUser>, sqlx::Error> {
        let roles: Vec<i64> = roles.iter().copied().collect();
        let ids: Vec<i64> = ids.iter().copied().collect();
        let rows: Vec<(i64, Option<i64>, i64, String)> = sqlx::query_as(
            "SELECT u.id, u.role_id, u.account_id, u.username FROM nats.users u \
             WHERE u.role_id = ANY($1) OR u.id = ANY($2)",
        )
        .bind(&roles)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user_id, role_id, account_id, username)| KickUser {
                user_id,
                role_id,
                account_id,
                username: username.into(),
            })
            .collect())
    }

    /// Asks every server for the account's connections and keeps those of `users`; also
    /// returns each answering server's clock.
    async fn find(
        &self,
        account: &str,
        users: &BTreeSet<String>,
    ) -> Result<(Vec<Found>, ScanTimes), KickError> {
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
        let mut times = ScanTimes::new();
        let deadline = Instant::now() + self.gather;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
            let Ok(reply) = serde_json::from_slice::<ConnzReply>(&msg.payload) else {
                continue;
            };
            let Some(data) = reply.data else { continue };
            if let Some(now) = data.now.as_deref().and_then(parse_time) {
                times.insert(reply.server.id.clone(), now);
            }
            for conn in data.connections {
                if let Some(user) = conn.authorized_user.filter(|u| users.contains(u)) {
                    found.push(Found {
                        server: reply.server.id.clone(),
                        cid: conn.cid,
                        user,
                        start: conn.start.as_deref().and_then(parse_time),
                    });
                }
            }
        }
        let _ = sub.unsubscribe().await;
        Ok((found, times))
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

fn parse_time(s: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(s).ok()
}

/// Whether a connection found by a re-scan started before the first scan on its server (see
/// the module notes). Unknown start: kicked (it reconnects).
fn started_before(conn: &Found, first_scan: &ScanTimes, now: &ScanTimes) -> bool {
    let Some(start) = conn.start else {
        return true;
    };
    let threshold = first_scan.get(&conn.server).copied().or_else(|| {
        now.get(&conn.server)
            .map(|n| *n - chrono::Duration::from_std(RESCAN_AFTER).unwrap_or_default())
    });
    threshold.is_none_or(|t| start < t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_rows_map_to_requests() {
        assert_eq!(
            KickRequest::from_row(Some(3), Some("alice".into()), None, None),
            Some(KickRequest::User {
                account_id: 3,
                username: "alice".into()
            })
        );
        assert_eq!(
            KickRequest::from_row(None, None, Some(7), None),
            Some(KickRequest::Role { role_id: 7 })
        );
        assert_eq!(
            KickRequest::from_row(None, None, None, Some(9)),
            Some(KickRequest::TokenOwner { user_id: 9 })
        );
        assert_eq!(KickRequest::from_row(None, None, None, None), None);
    }

    #[test]
    fn a_rescan_kicks_only_connections_older_than_the_first_scan() {
        let t = |s: &str| parse_time(s).unwrap();
        // CONNZ reports local time with an offset; comparisons are by instant.
        let first: ScanTimes = [("N1".to_owned(), t("2026-11-24T05:00:00.500+01:00"))].into();
        let now: ScanTimes = [
            ("N1".to_owned(), t("2026-11-24T04:00:03Z")),
            ("N2".to_owned(), t("2026-11-24T04:00:03Z")),
        ]
        .into();
        let conn = |server: &str, start: Option<&str>| Found {
            server: server.into(),
            cid: 1,
            user: "alice".into(),
            start: start.map(t),
        };
        // In flight during the first scan (started before it): kicked.
        assert!(started_before(
            &conn("N1", Some("2026-11-24T04:00:00.100Z")),
            &first,
            &now
        ));
        // The user's reconnect after the first kick: left alone.
        assert!(!started_before(
            &conn("N1", Some("2026-11-24T04:00:01Z")),
            &first,
            &now
        ));
        // A server that did not answer the first scan: its clock now minus RESCAN_AFTER.
        assert!(started_before(
            &conn("N2", Some("2026-11-24T04:00:00.400Z")),
            &first,
            &now
        ));
        assert!(!started_before(
            &conn("N2", Some("2026-11-24T04:00:00.600Z")),
            &first,
            &now
        ));
        assert!(started_before(&conn("N1", None), &first, &now));
    }
}
