//! The auth callout: answers nats-server's `$SYS.REQ.USER.AUTH` for every client login.
//!
//! Every replica subscribes in one queue group, so any replica answers any server. Each request
//! is handled in its own task; a semaphore bounds how many run at once (below the Postgres pool
//! size), and a request that cannot start before the server's auth timeout is denied rather
//! than queued forever.

mod backlog;
pub mod certificate;
pub mod credentials;
pub mod deadline;
mod doors;
mod lag;
pub mod lane;
pub mod lockout;
pub mod login;
pub mod mint;
pub mod nkey;
pub mod outage_logins;
pub mod permissions;
pub mod request;
pub mod xbox;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Message};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use nkeys::{KeyPair, XKey};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::copy::{CacheSettings, LoginCache, TokenLookup, UserLookup};
use crate::db;
use crate::db::logins::LoginRow;
use crate::jwt;
use crate::keys::SeedCipher;
use credentials::PasswordVerifier;
use login::{Login, Signing};
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
    /// An MQTT client of an account without JetStream file storage (nats-server keeps MQTT
    /// sessions and QoS 1 messages in file streams, and fails such a login obscurely).
    MqttNeedsJetstream,
    /// An MQTT client id not in the user's `mqtt_client_ids`.
    MqttClientIdNotAllowed,
    LockedOut,
    Overloaded,
    Internal,
    /// nkey logins (see [`nkey`]).
    UnknownNkey,
    BadNkey,
    BadSignature,
    /// Certificate logins (see [`certificate`]).
    UnknownCertificate,
    CertificateNotVerified,
    CertificateExpired,
    BadCertificate,
    AmbiguousCertificate,
}

impl DenyReason {
    /// Every reason, for documentation checks and dashboards.
    pub const ALL: [DenyReason; 24] = [
        DenyReason::NoCredentials,
        DenyReason::UnknownUser,
        DenyReason::BadPassword,
        DenyReason::UnknownToken,
        DenyReason::TokenExpired,
        DenyReason::TokenRevoked,
        DenyReason::InactiveUser,
        DenyReason::InactiveAccount,
        DenyReason::AccountNotReady,
        DenyReason::SourceNotAllowed,
        DenyReason::ConnectionTypeNotAllowed,
        DenyReason::MqttNeedsJetstream,
        DenyReason::MqttClientIdNotAllowed,
        DenyReason::LockedOut,
        DenyReason::Overloaded,
        DenyReason::Internal,
        DenyReason::UnknownNkey,
        DenyReason::BadNkey,
        DenyReason::BadSignature,
        DenyReason::UnknownCertificate,
        DenyReason::CertificateNotVerified,
        DenyReason::CertificateExpired,
        DenyReason::BadCertificate,
        DenyReason::AmbiguousCertificate,
    ];

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
            DenyReason::MqttNeedsJetstream => "mqtt_needs_jetstream",
            DenyReason::MqttClientIdNotAllowed => "mqtt_client_id_not_allowed",
            DenyReason::LockedOut => "locked_out",
            DenyReason::Overloaded => "overloaded",
            DenyReason::Internal => "internal_error",
            DenyReason::UnknownNkey => "unknown_nkey",
            DenyReason::BadNkey => "bad_nkey",
            DenyReason::BadSignature => "bad_signature",
            DenyReason::UnknownCertificate => "unknown_certificate",
            DenyReason::CertificateNotVerified => "certificate_not_verified",
            DenyReason::CertificateExpired => "certificate_expired",
            DenyReason::BadCertificate => "bad_certificate",
            DenyReason::AmbiguousCertificate => "ambiguous_certificate",
        }
    }
}

/// A refusal with a detail for the log line. The detail never holds a secret.
#[derive(Debug)]
pub struct Deny {
    pub reason: DenyReason,
    pub detail: String,
    /// The user the credential identified (a token's, an nkey's), for the log line: the
    /// request itself names no user then.
    pub user: Option<String>,
}

impl Deny {
    pub(crate) fn new(reason: DenyReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            user: None,
        }
    }

    /// The same denial, naming the user it is about.
    fn of(mut self, username: &str) -> Self {
        self.user.get_or_insert_with(|| username.to_owned());
        self
    }
}

/// The connection a login is checked against: the request's `client_info`, or what `explain`
/// is asked about.
pub struct Door<'a> {
    pub host: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub client_type: Option<&'a str>,
    /// The MQTT client id; `None` when not known (`explain`): the id binding is then not
    /// checked.
    pub mqtt_id: Option<&'a str>,
}

/// The checks every identified login passes before a JWT is minted, in this order: active user
/// and account, the role's account, its sources and connection types (nats-server does not
/// enforce them for callout users), an MQTT client's id binding and its account's JetStream
/// file storage, and a signing key the server has. Returns that key. The callout and `explain`
/// both decide with it.
pub fn admit<'l>(login: &'l Login, door: &Door) -> Result<&'l Arc<login::Issuer>, Deny> {
    if !login.user_active {
        return Err(Deny::new(
            DenyReason::InactiveUser,
            format!("user {:?} is inactive", login.username),
        ));
    }
    let shape = &login.shape;
    if !shape.account_active {
        return Err(Deny::new(
            DenyReason::InactiveAccount,
            format!("account {:?} is inactive", shape.account_name),
        ));
    }
    if shape.foreign_role {
        // The schema refuses this; deny rather than hand out another tenant's role.
        return Err(Deny::new(
            DenyReason::Internal,
            format!(
                "role {:?} of user {:?} belongs to another account",
                shape.role_id, login.username
            ),
        ));
    }
    let door_type = permissions::connection_type(door.kind, door.client_type);
    permissions::check_connection(
        shape.allowed_sources.as_deref(),
        shape.allowed_connection_types.as_deref(),
        door.host,
        door.kind,
        door.client_type,
    )
    .map_err(|rule| match rule {
        permissions::ConnectionRule::SourceNotAllowed => Deny::new(
            DenyReason::SourceNotAllowed,
            format!(
                "source {} not in the role's allowed_sources",
                door.host.unwrap_or("(unknown)")
            ),
        ),
        permissions::ConnectionRule::ConnectionTypeNotAllowed => Deny::new(
            DenyReason::ConnectionTypeNotAllowed,
            format!("connection type {door_type} not in the role's allowed_connection_types"),
        ),
    })?;
    let mqtt = door_type == "MQTT";
    if let (true, Some(id)) = (mqtt && !login.mqtt_client_ids.is_empty(), door.mqtt_id) {
        if !login.mqtt_client_ids.iter().any(|allowed| &**allowed == id) {
            return Err(Deny::new(
                DenyReason::MqttClientIdNotAllowed,
                format!(
                    "MQTT client id {:?} is not in nats.users.mqtt_client_ids of {:?}",
                    id.chars().take(200).collect::<String>(),
                    login.username
                ),
            ));
        }
    }
    if mqtt && !shape.account_jetstream_disk {
        return Err(Deny::new(
            DenyReason::MqttNeedsJetstream,
            format!(
                "MQTT needs JetStream file storage in account {:?} (nats-server keeps MQTT sessions and QoS 1 messages in file streams): set nats.accounts.max_jetstream_disk_storage (bytes, -1 unlimited); it is 0",
                shape.account_name
            ),
        ));
    }
    match &shape.signing {
        Signing::Ready(issuer) => Ok(issuer),
        Signing::NotReady => Err(Deny::new(
            DenyReason::AccountNotReady,
            format!(
                "account {0:?} is not on the server yet (sync pending; see nats.accounts.sync_error, or `nats-pg-auth account show {0}`)",
                shape.account_name
            ),
        )),
        Signing::Unusable(e) => Err(Deny::new(
            DenyReason::Internal,
            format!("signing key of account {:?} unusable: {e}", shape.account_name),
        )),
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
    /// Work factors a stored password hash may ask for (`--max-bcrypt-cost`, `--max-argon2-*`).
    pub hash_limits: credentials::HashLimits,
    pub lockout: lockout::LockoutSettings,
    /// Clock difference with nats-server tolerated on request expiry (`--clock-skew`).
    pub clock_skew: Duration,
    /// This replica's name (`--replica-name`): recorded with the lockouts it starts.
    pub replica: String,
    /// nats-server's auth timeout (`--auth-timeout`): how long it waits for an answer when a
    /// request does not say (`exp - iat`), and for requests not opened yet.
    pub auth_timeout: Duration,
    /// Skip requests nats-server has stopped waiting for, and serve the newest first when the
    /// backlog is deep (see [`backlog`]). Off only to measure the difference.
    pub shed_expired: bool,
}

impl Default for CalloutSettings {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(86400),
            defaults: Defaults::default(),
            concurrency: 12,
            hash_threads: 3,
            hash_limits: credentials::HashLimits::default(),
            lockout: lockout::LockoutSettings::default(),
            clock_skew: request::DEFAULT_CLOCK_SKEW,
            replica: crate::replica::name(None),
            auth_timeout: request::DEFAULT_AUTH_TIMEOUT,
            shed_expired: true,
        }
    }
}

/// Requests handled at once; more wait in the [`backlog::Backlog`], where the order is ours.
/// Large enough that requests waiting on Postgres or the hashing lane (each lane key queues a
/// bounded number, each wait ends at the deadline) do not hold up the others; small enough that
/// what is started is a few milliseconds of CPU, so the backlog decides who is served.
const IN_FLIGHT: usize = 256;

/// Starts requests of the backlog while fewer than [`IN_FLIGHT`] are being answered; what
/// waited past the server's patience is dropped (and counted) on the way.
fn start_from_backlog<F>(
    backlog: &mut backlog::Backlog<Message>,
    running: &mut FuturesUnordered<F>,
    answer: &impl Fn(backlog::Queued<Message>) -> F,
    metrics: &crate::metrics::Metrics,
) {
    while running.len() < IN_FLIGHT && !backlog.is_empty() {
        let (next, dropped) = backlog.pop(Instant::now());
        metrics.count_skipped("queued", dropped as u64);
        if let Some(q) = next {
            running.push(answer(q));
        }
    }
}

/// Why `Callout::run` stopped serving without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the auth callout cannot subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("the auth callout's subscription ended (the NATS client closed it); this replica answers no logins")]
    SubscriptionEnded,
}

/// The AUTH identity the callout answers as.
pub struct AuthIdentity {
    pub account_public_key: String,
    pub signer: KeyPair,
    pub xkey: XKey,
}

/// The task keeping the login copy current, for as long as the callout runs.
struct CopyListener {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl CopyListener {
    fn start(callout: &Arc<Callout>, shutdown: &CancellationToken) -> Self {
        let stop = shutdown.child_token();
        let task = tokio::spawn(callout.clone().keep_copy(stop.clone()));
        Self { stop, task }
    }

    /// Every way out of `Callout::run` ends the listener and waits for it.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Shared state of the callout handlers.
pub struct Callout {
    pub(crate) pool: PgPool,
    auth: AuthIdentity,
    cipher: SeedCipher,
    settings: CalloutSettings,
    /// Bounds the requests that read Postgres at once (below the pool size). Cache hits do not
    /// take a slot.
    limiter: Arc<Semaphore>,
    passwords: PasswordVerifier,
    /// Shared with the unlock that reads a username from Postgres (`lift_lockout`).
    lockout: Arc<lockout::Lockout>,
    pub(crate) cache: Arc<LoginCache>,
    boxes: Option<xbox::ServerBoxes>,
    /// The servers' signing keys, parsed once.
    servers: jwt::IssuerKeys,
    /// Subscribed and answering (set after the copy is loaded and the subscription is in place).
    serving: std::sync::atomic::AtomicBool,
    /// Requests arriving already expired: a clock off from the servers'.
    clock: request::ClockWatch,
    /// Connections admitted from the copy during a Postgres outage (for `connections`).
    outage_logins: Arc<outage_logins::OutageLogins>,
    /// Per-server clock offset bounds, to tell when a server stops waiting (see [`deadline`]).
    clocks: deadline::ServerClocks,
    /// `settings.shed_expired`, switchable at run time (benchmarks compare both on one replica).
    shedding: std::sync::atomic::AtomicBool,
    pub metrics: crate::metrics::Metrics,
}

/// A successful decision: the user JWT plus who it is for (for the log line).
struct Grant {
    user_jwt: String,
    username: String,
    account: String,
}

/// The credential `decide` checks.
enum Credential {
    Password,
    Token,
}

impl Callout {
    pub fn new(
        pool: PgPool,
        auth: AuthIdentity,
        cipher: SeedCipher,
        settings: CalloutSettings,
        metrics: crate::metrics::Metrics,
    ) -> Arc<Self> {
        Self::with_cache(
            pool,
            auth,
            cipher,
            settings,
            CacheSettings::default(),
            metrics,
        )
    }

    /// As `new`, with explicit cache settings.
    pub fn with_cache(
        pool: PgPool,
        auth: AuthIdentity,
        cipher: SeedCipher,
        settings: CalloutSettings,
        cache: CacheSettings,
        metrics: crate::metrics::Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            limiter: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            passwords: PasswordVerifier::with_limits(settings.hash_threads, settings.hash_limits),
            lockout: Arc::new(lockout::Lockout::new(&settings.lockout)),
            cache: Arc::new(LoginCache::new(cache)),
            boxes: xbox::ServerBoxes::new(&auth.xkey),
            servers: jwt::IssuerKeys::default(),
            serving: std::sync::atomic::AtomicBool::new(false),
            clock: request::ClockWatch::default(),
            outage_logins: Default::default(),
            clocks: deadline::ServerClocks::default(),
            shedding: std::sync::atomic::AtomicBool::new(settings.shed_expired),
            pool,
            auth,
            cipher,
            settings,
            metrics,
        })
    }

    /// True while the callout subscription is in place (the copy is loaded).
    pub fn is_serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Skip what nats-server stopped waiting for, newest first when requests pile up (the
    /// default); off: every request answered in arrival order, as before `--auth-timeout`
    /// (benchmarks measure the difference on one replica).
    pub fn set_shedding(&self, on: bool) {
        self.shedding
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn shedding(&self) -> bool {
        self.shedding.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The login caches (stats, run-time switches).
    pub fn cache(&self) -> &Arc<LoginCache> {
        &self.cache
    }

    /// The connections admitted from the copy during a Postgres outage.
    pub fn outage_logins(&self) -> &Arc<outage_logins::OutageLogins> {
        &self.outage_logins
    }

    /// How many password hashes this callout computed (cache misses and unknown users).
    pub fn password_hashes_computed(&self) -> u64 {
        self.passwords.hashes_computed()
    }

    /// Loads the login copy, then subscribes and serves until `shutdown`. Then it stops taking
    /// callouts first (UNSUB, flushed, so nats-server routes new requests to the other replicas
    /// of the queue group), answers what was already delivered, and returns once every answer
    /// is sent. An error when the subscription ends without `shutdown`. Keeps the login copy
    /// current for as long as it serves.
    ///
    /// Answers go out over `repliers` in turn (the subscription's connection when there are
    /// none, or shedding is off): nats-server checks every answer (opens it, verifies both
    /// JWTs, registers the user) on the reading goroutine of the connection it came on, one
    /// after the other, so one connection caps a storm at what one of its cores verifies, and
    /// answers queue there until the clients' auth timeout has passed.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        repliers: Vec<Client>,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        // The copy first: a replica answers nothing until it holds every login (it may have to
        // answer them without Postgres).
        let listener = CopyListener::start(&self, &shutdown);
        if !self.cache.wait_loaded(&shutdown).await {
            listener.stop().await;
            return Ok(());
        }
        let mut sub = client
            .queue_subscribe(AUTH_SUBJECT, QUEUE_GROUP.into())
            .await?;
        // The server must have the subscription before anyone relies on it being there: the
        // client sends it on (re)connecting, before the PING of a flush, so a flush answered
        // while connected means the server holds it. Until then NATS is unreachable: say so
        // once, and keep trying (the client reconnects by itself).
        let mut warned = false;
        loop {
            let connected = client.connection_state() == async_nats::connection::State::Connected;
            if connected
                && matches!(
                    tokio::time::timeout(Duration::from_secs(2), client.flush()).await,
                    Ok(Ok(()))
                )
            {
                break;
            }
            if !warned {
                tracing::warn!(
                    "NATS is unreachable: the auth callout subscribes as soon as it connects (retrying; this replica answers no logins meanwhile)"
                );
                warned = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    listener.stop().await;
                    return Ok(());
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        self.serving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(
            subject = AUTH_SUBJECT,
            queue = QUEUE_GROUP,
            "auth callout listening"
        );
        let mut backlog = backlog::Backlog::new(self.settings.auth_timeout);
        // Where answers go out, each with how far behind nats-server is with it.
        let outs: Vec<(Client, lag::Lag)> = if repliers.is_empty() {
            vec![(client.clone(), lag::Lag::default())]
        } else {
            repliers
                .iter()
                .map(|c| (c.clone(), lag::Lag::default()))
                .collect()
        };
        let measuring = shutdown.child_token();
        // Labelled as the operator counts them: 0 is the connection requests come in on, the
        // reply connections are 1…N.
        let first_label = usize::from(!repliers.is_empty());
        for (i, (c, l)) in outs.iter().enumerate() {
            tokio::spawn(l.clone().keep_measuring(
                c.clone(),
                first_label + i,
                self.metrics.clone(),
                measuring.clone(),
            ));
        }
        let next_out = std::sync::atomic::AtomicUsize::new(0);
        // The requests being answered are polled here, in this task, not spawned: a spawn per
        // request woke the runtime's other worker for each (a futex wake and a context switch,
        // a fifth of the service's CPU per login in the profile), and a warm login is ~100 µs of
        // CPU, so one task keeps up with what a nats-server can ask. Waits (Postgres, the
        // hashing lane) still overlap: each answer is its own future.
        let answer = |q: backlog::Queued<Message>| {
            let this = self.clone();
            let (client, lag) = if self.shedding() {
                outs[next_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % outs.len()]
                    .clone()
            } else {
                (client.clone(), lag::Lag::default())
            };
            async move { this.handle(client, &lag, q.item, q.received).await }
        };
        let mut running = FuturesUnordered::new();
        // Shedding off: every request at once, in arrival order (the behaviour before).
        let receive = |backlog: &mut backlog::Backlog<Message>, msg: Message| {
            let received = Instant::now();
            if self.shedding() {
                backlog.push(msg, received);
                None
            } else {
                Some(backlog::Queued {
                    item: msg,
                    received,
                })
            }
        };
        enum Event {
            Stop,
            Answered,
            Request(Message),
            Ended,
        }
        let ended = loop {
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Event::Stop,
                Some(()) = running.next(), if !running.is_empty() => Event::Answered,
                msg = sub.next() => msg.map_or(Event::Ended, Event::Request),
            };
            match event {
                Event::Stop => break false,
                Event::Ended => break true,
                Event::Answered => {}
                Event::Request(msg) => {
                    if let Some(q) = receive(&mut backlog, msg) {
                        running.push(answer(q));
                    }
                }
            }
            start_from_backlog(&mut backlog, &mut running, &answer, &self.metrics);
        };
        if !ended {
            // UNSUB and flush; the stream then yields what was delivered before and ends.
            // (The caller bounds how long this may take, e.g. when NATS is unreachable.)
            tracing::info!("auth callout unsubscribed; answering the requests in flight");
            if sub.drain().await.is_ok() {
                let _ = client.flush().await;
                while let Some(msg) = sub.next().await {
                    if let Some(q) = receive(&mut backlog, msg) {
                        running.push(answer(q));
                    }
                }
            }
        }
        loop {
            start_from_backlog(&mut backlog, &mut running, &answer, &self.metrics);
            if running.next().await.is_none() {
                break;
            }
        }
        self.serving
            .store(false, std::sync::atomic::Ordering::SeqCst);
        measuring.cancel();
        let _ = client.flush().await;
        for replier in &repliers {
            let _ = replier.flush().await;
        }
        listener.stop().await;
        if ended && !shutdown.is_cancelled() {
            return Err(RunError::SubscriptionEnded);
        }
        Ok(())
    }

    async fn handle(&self, client: Client, lag: &lag::Lag, msg: Message, received: Instant) {
        let Some(reply) = msg.reply.clone() else {
            tracing::warn!("authorization request without a reply subject; ignored");
            return;
        };
        if let Some((bytes, deadline)) = self.answer_by(&msg, received, lag).await {
            if let Err(e) = client.publish(reply, bytes.into()).await {
                tracing::warn!(error = %e, "could not publish the authorization response; the server will time the client out");
            }
            if deadline.passed(Instant::now()) {
                self.metrics.count_late_answer();
            }
        }
        self.metrics.observe_decision(received.elapsed());
    }

    /// Decodes, decides and builds the sealed response. `None` when the request cannot be
    /// answered at all (it is not a verifiable request from a server) or nats-server has
    /// stopped waiting for it.
    pub async fn answer(&self, msg: &Message, received: Instant) -> Option<Vec<u8>> {
        self.answer_by(msg, received, &lag::Lag::default())
            .await
            .map(|(bytes, _)| bytes)
    }

    /// As `answer`, with the moment the server stops waiting for the answer. `lag`: how long an
    /// answer waits in nats-server before it is looked at (see [`lag`]).
    async fn answer_by(
        &self,
        msg: &Message,
        received: Instant,
        lag: &lag::Lag,
    ) -> Option<(Vec<u8>, deadline::Deadline)> {
        let shed = self.shedding();
        // Not opened yet: only the receive time tells (the request's own window is inside).
        if shed
            && deadline::Deadline::received(received, self.settings.auth_timeout)
                .passed(Instant::now())
        {
            self.metrics.count_skipped("queued", 1);
            return None;
        }
        let now_ms = deadline::now_unix_ms();
        let now = now_ms.div_euclid(1000);
        let header = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(SERVER_XKEY_HEADER))
            .map(|v| v.as_str().to_owned());
        let req = match request::verify_skewed(
            &msg.payload,
            header.as_deref(),
            &self.auth.xkey,
            self.boxes.as_ref(),
            &self.servers,
            &self.auth.account_public_key,
            now,
            self.settings.clock_skew,
        ) {
            Ok(req) => req,
            Err(e) => {
                self.metrics.count_bad_request(e.as_str());
                if let request::RequestError::Expired { by_secs } = e {
                    if let Some(warning) = self.clock.expired(by_secs, received) {
                        tracing::warn!("{warning}");
                    }
                    return None;
                }
                tracing::warn!(kind = e.as_str(), "refusing authorization request: {e}");
                return None;
            }
        };
        // When the server stops waiting: from our receive time and from the request's `iat`
        // (which also sees the time the request spent before it reached us).
        let window = req.window(self.settings.auth_timeout);
        let at = Instant::now();
        let mut deadline = deadline::Deadline::received(received, window);
        if req.claims.iat > 0 {
            let offset = self
                .clocks
                .observe(req.server_id(), req.claims.iat, now_ms, at);
            deadline = deadline.with_iat(req.claims.iat, window, offset, at, now_ms);
        }
        // Also when nats-server would reach the answer only after it stopped waiting.
        if shed && deadline.passed(at + lag.expected(at)) {
            self.metrics.count_skipped("verified", 1);
            return None;
        }
        // Anything that waits (a Postgres slot, a hashing slot) waits at most until the server
        // gives up on us, minus a margin to send the reply.
        let (waits, gives_up) = if shed {
            (
                deadline.for_waits(request::REPLY_MARGIN, at),
                Some(deadline.gives_up),
            )
        } else {
            (received + req.budget(), None)
        };
        let decision = self.decide(&req, now, waits, gives_up).await;
        let decided = Instant::now();
        if shed && deadline.passed(decided + lag.expected(decided)) {
            // Decided too late to be used (the wait for a hashing slot or Postgres ended with
            // the server's patience, or the decision itself was cut short before minting).
            self.metrics.count_skipped("decided", 1);
            return None;
        }
        let client = &req.claims.nats.client_info;
        let host = client.host.as_deref().unwrap_or("");
        let door =
            permissions::connection_type(client.kind.as_deref(), client.client_type.as_deref());
        let outcome = match &decision {
            Ok(grant) => {
                self.metrics.count_allow();
                tracing::info!(user = %grant.username, account = %grant.account, host, door, "login allowed");
                Ok(grant.user_jwt.as_str())
            }
            Err(deny) => {
                self.metrics.count_deny(deny.reason.as_str());
                // The user the credential named, else the one the client sent (a password
                // login's, even unknown), else nothing (an unknown token or nkey).
                let user = deny
                    .user
                    .as_deref()
                    .or(req.claims.nats.connect_opts.user.as_deref())
                    .unwrap_or("");
                tracing::warn!(
                    reason = deny.reason.as_str(),
                    user,
                    host,
                    door,
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
        let sealed = mint::seal_for(&req, response, &self.auth.xkey);
        if sealed.is_none() {
            tracing::error!("cannot seal the authorization response");
        }
        sealed.map(|bytes| (bytes, deadline))
    }

    /// `deadline` bounds every wait; past `gives_up` (when shedding) nothing is minted.
    async fn decide(
        &self,
        req: &VerifiedRequest,
        now: i64,
        deadline: Instant,
        gives_up: Option<Instant>,
    ) -> Result<Grant, Deny> {
        let opts = &req.claims.nats.connect_opts;
        let token = opts
            .auth_token
            .expose()
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        // nats-server copies an MQTT CONNECT's password into `auth_token` too, so user + pass is
        // a password login (its failures count toward the lockout) whatever the token says;
        // except an MQTT token in the password field (see `password_or_token`).
        let token = match self.password_or_token(req, now, deadline).await? {
            Credential::Password => None,
            Credential::Token => token,
        };
        // A token with an expiry (or a revocation in the future) caps the JWT's lifetime, so the
        // server itself disconnects the client at that moment (no UPDATE, hence no kick, happens
        // then).
        let mut not_after = None;
        let (login, from_copy) = if let Some(token) = token {
            let (login, expires, from_copy) = self
                .check_token(SecretString::from(token), now, deadline)
                .await?;
            not_after = expires;
            (login, from_copy)
        } else {
            let user = opts.user.as_deref().filter(|u| !u.is_empty());
            let pass = opts.pass.expose().map(str::to_owned);
            match (user, pass) {
                (Some(user), Some(pass)) => {
                    self.check_password(user, SecretString::from(pass), deadline)
                        .await?
                }
                // Neither token nor user/password: an nkey, else a client certificate.
                _ => self.check_nkey_or_certificate(req, now, deadline).await?,
            }
        };
        if from_copy {
            // Rights read from the copy may be out of date once Postgres is back: a short JWT
            // brings the client back through the callout soon after.
            let cap = now.saturating_add(self.cache.settings().outage_ttl.as_secs().max(1) as i64);
            not_after = Some(not_after.map_or(cap, |t: i64| t.min(cap)));
        }
        if gives_up.is_some_and(|g| Instant::now() >= g) {
            // The server stopped waiting while we looked the user up: mint nothing.
            return Err(Deny::new(
                DenyReason::Overloaded,
                "nats-server stopped waiting before the JWT was minted",
            )
            .of(&login.username));
        }
        self.authorize(req, &login, now, not_after, from_copy)
            .map_err(|d| d.of(&login.username))
    }

    /// Which credential of the request to check. User + password is a password login, even
    /// with a token beside it (MQTT: the server copies the password into `auth_token`).
    ///
    /// Except for MQTT devices with a token: MQTT has no token field and nats-server wants a
    /// username with a password, so such a device sends its token as the password with a
    /// username that is not a user. When the username names no user and the password is a
    /// token we know, it is a token login. A valid token is tried before the username's
    /// lockout, so bad tokens sent under a shared device username cannot lock the good ones
    /// out; anything else goes on as a password login of an unknown user (a dummy hash, so
    /// timing does not tell known usernames apart, and a lockout failure, like over TCP).
    async fn password_or_token(
        &self,
        req: &VerifiedRequest,
        now: i64,
        deadline: Instant,
    ) -> Result<Credential, Deny> {
        let opts = &req.claims.nats.connect_opts;
        let user = opts.user.as_deref().filter(|u| !u.is_empty());
        let (Some(user), true) = (user, opts.pass.expose().is_some()) else {
            return Ok(Credential::Token);
        };
        let client = &req.claims.nats.client_info;
        let mqtt =
            permissions::connection_type(client.kind.as_deref(), client.client_type.as_deref())
                == "MQTT";
        let token = opts.auth_token.expose().filter(|t| !t.is_empty());
        if let (true, Some(token)) = (mqtt, token) {
            if self.find_user(user, deadline).await?.value.is_none() {
                match self
                    .check_token(SecretString::from(token.to_owned()), now, deadline)
                    .await
                {
                    // Expired or revoked: say so (a token it is).
                    Ok(_) => return Ok(Credential::Token),
                    Err(deny) if deny.reason != DenyReason::UnknownToken => {
                        return Ok(Credential::Token)
                    }
                    Err(_) => {}
                }
            }
        }
        Ok(Credential::Password)
    }

    /// A slot for reading Postgres, or `Overloaded` when none frees up before the deadline.
    pub(crate) async fn db_slot(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, Deny> {
        match tokio::time::timeout_at(deadline.into(), self.limiter.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Deny::new(
                DenyReason::Overloaded,
                "no free callout slot before the auth timeout",
            )),
        }
    }

    /// Turns a row into a login (parsed signing key and interned permissions from the cache).
    pub(crate) fn prepare(&self, row: LoginRow) -> Login {
        let signing = match (
            row.account_public_key.as_deref(),
            row.signing_public_key.as_deref(),
            row.signing_seed.as_deref(),
        ) {
            (Some(account), Some(public), Some(seed)) => {
                match self.cache.issuer(&self.cipher, account, public, seed) {
                    Ok(issuer) => Signing::Ready(issuer),
                    Err(e) => Signing::Unusable(e.to_string()),
                }
            }
            _ => Signing::NotReady,
        };
        Login::prepare(
            row,
            &self.settings.defaults,
            self.settings.default_ttl,
            self.settings.max_ttl,
            signing,
            |m| self.cache.intern(m),
            |shape| self.cache.intern_shape(shape),
        )
    }

    /// The password check behind the lockout: a locked-out username is refused without hashing,
    /// and every check that hashes is counted before it runs (see [`lockout::Lockout`]).
    async fn check_password(
        &self,
        username: &str,
        password: SecretString,
        deadline: Instant,
    ) -> Result<(Arc<Login>, bool), Deny> {
        if self.lockout.is_locked(username) {
            return Err(self.locked_out());
        }
        let found = self.find_user(username, deadline).await?;
        let from_copy = found.from_copy;
        let login = found.value;
        let hash = login.as_ref().and_then(|l| l.password_hash.as_deref());
        let key = self
            .cache
            .credential_key(username, password.expose_secret());
        if let (Some(login), Some(hash)) = (&login, hash) {
            if self.cache.credential_verified(&key, hash) {
                self.lockout.succeeded(username);
                return Ok((login.clone(), from_copy));
            }
        }
        let attempt =
            match self.lockout.attempt(username, deadline).await {
                Ok(a) => a,
                Err(lockout::Refused::Locked) => return Err(self.locked_out()),
                Err(lockout::Refused::Busy) => return Err(Deny::new(
                    DenyReason::Overloaded,
                    "other password checks of this username were in flight until the auth timeout",
                )),
            };
        // A check of the same password that finished while this one waited for its slot (a
        // reconnect storm of clients sharing a username) makes hashing again unnecessary.
        if let (true, Some(login), Some(hash)) = (attempt.waited(), &login, hash) {
            if self.cache.credential_verified(&key, hash) {
                attempt.succeeded();
                return Ok((login.clone(), from_copy));
            }
        }
        // Each account gets its share of the hashing lane; unknown usernames share one.
        let lane_key = match &login {
            Some(login) => lane::LaneKey::Account(login.shape.account_id),
            None => lane::LaneKey::Unknown,
        };
        let ok = match self
            .passwords
            .verify(password, hash.map(str::to_owned), lane_key, deadline)
            .await
        {
            Ok(ok) => ok,
            // Dropping `attempt` gives its slot back: not a wrong password.
            Err(credentials::HashError::Busy) => {
                return Err(Deny::new(
                    DenyReason::Overloaded,
                    "no free password hashing slot before the auth timeout",
                ))
            }
            Err(credentials::HashError::QueueFull) => {
                let whose = match lane_key {
                    lane::LaneKey::Account(_) => "this user's account",
                    lane::LaneKey::Unknown => "unknown usernames",
                };
                return Err(Deny::new(
                    DenyReason::Overloaded,
                    format!("{whose} already had its share of password checks waiting in the hashing lane"),
                ));
            }
            Err(credentials::HashError::OutOfBounds(why)) => {
                return Err(Deny::new(
                    DenyReason::Internal,
                    format!("password hash of user {username:?} refused without hashing: {why}; replace nats.users.password_hash"),
                ))
            }
            Err(e) => {
                return Err(Deny::new(
                    DenyReason::Internal,
                    format!("password hash of user {username:?} cannot be checked ({e:?}); fix nats.users.password_hash"),
                ))
            }
        };
        match (&login, hash) {
            (Some(login), Some(hash)) if ok => {
                attempt.succeeded();
                self.cache.put_credential(key, hash);
                Ok((login.clone(), from_copy))
            }
            (None, _) => {
                self.count_failure(username, None, attempt);
                Err(Deny::new(DenyReason::UnknownUser, "no such user"))
            }
            _ => {
                self.count_failure(username, login.as_ref().map(|l| l.user_id), attempt);
                Err(Deny::new(
                    DenyReason::BadPassword,
                    "password does not match",
                ))
            }
        }
    }

    fn locked_out(&self) -> Deny {
        let lock = &self.settings.lockout;
        Deny::new(
            DenyReason::LockedOut,
            format!(
                "{} wrong passwords within {}; refused until that time has passed",
                lock.failures,
                humantime::format_duration(lock.duration)
            ),
        )
    }

    /// A wrong password or unknown user; the one that starts a lockout is logged and audited,
    /// and, for a user that exists, recorded in `nats.lockouts` with this replica's name and
    /// when it ends (best effort: `explain` and `user show` report it from there).
    fn count_failure(&self, username: &str, user_id: Option<i64>, attempt: lockout::Attempt) {
        if !attempt.failed() {
            return;
        }
        let lock = &self.settings.lockout;
        let pool = self.pool.clone();
        // The client picks the username (up to 4 KB); the audit row keeps a prefix.
        let user: String = username.chars().take(200).collect();
        let failures = lock.failures;
        let seconds = lock.duration.as_secs();
        let left = self.lockout.remaining(username).unwrap_or(lock.duration);
        let replica = self.settings.replica.clone();
        tokio::spawn(async move {
            if let Some(id) = user_id {
                let recorded =
                    crate::db::lockouts::record(&pool, id, &replica, failures, left.as_secs_f64())
                        .await;
                if let Err(e) = recorded {
                    tracing::warn!(user, error = %e, "cannot record the lockout in nats.lockouts (it holds all the same; `explain` and `user show` will not show it)");
                }
            }
            crate::db::audit::record(
                &pool,
                crate::db::audit::kind::USER_LOCKED_OUT,
                &user,
                serde_json::json!({ "failures": failures, "seconds": seconds, "replica": replica }),
            )
            .await
        });
        tracing::warn!(
            user = username,
            failures = lock.failures,
            "user locked out for {} after repeated wrong passwords (its logins are refused without checking; see --lockout-failures)",
            humantime::format_duration(lock.duration)
        );
    }

    /// The change log's `unlock:<user id>` (`user unlock`, `nats.unlock_requests`): lifts that
    /// user's lockout on this replica. True when `scope` was one (it concerns no copied row).
    pub(crate) fn lift_lockout(&self, scope: &str) -> bool {
        let Some(id) = scope.strip_prefix("unlock:") else {
            return false;
        };
        let Ok(id) = id.parse::<i64>() else {
            return true;
        };
        if let Some(name) = self.cache.username_of(id) {
            self.lockout.lift(&name);
            tracing::info!(user = %name, "lockout lifted (user unlock)");
            return true;
        }
        // Not in the copy (not loaded yet, or just created): ask Postgres for the name.
        let pool = self.pool.clone();
        let lockout = self.lockout.clone();
        tokio::spawn(async move {
            if let Ok(Some(name)) = crate::db::logins::username_of(&pool, id).await {
                lockout.lift(&name);
                tracing::info!(user = %name, "lockout lifted (user unlock)");
            }
        });
        true
    }

    /// After a full load of the copy: unlocks logged while this replica was not following the
    /// change log (its listener was down) are not read from it; replay those of the lockout
    /// window from `nats.unlock_requests` (in the background; best effort).
    pub(crate) fn replay_unlocks(&self) {
        let window = self.settings.lockout.duration.as_secs_f64();
        if self.settings.lockout.failures == 0 || window == 0.0 {
            return;
        }
        let (pool, lockout) = (self.pool.clone(), self.lockout.clone());
        tokio::spawn(async move {
            match crate::db::lockouts::unlocked_since(&pool, window).await {
                Ok(unlocks) => {
                    for (name, ago) in unlocks {
                        let ago = Duration::try_from_secs_f64(ago).unwrap_or_default();
                        lockout.lift_if_started_before(&name, ago);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot read recent unlocks"),
            }
        });
    }

    /// The login of a username: from the copy when it is current, else from Postgres, else
    /// (Postgres unreachable) from the copy within the outage grace.
    async fn find_user(
        &self,
        username: &str,
        deadline: Instant,
    ) -> Result<crate::copy::Found<Arc<Login>>, Deny> {
        let live = |value| crate::copy::Found {
            value,
            from_copy: false,
        };
        match self.cache.user(username) {
            UserLookup::Hit(login) => return Ok(live(Some(login))),
            UserLookup::Unknown => return Ok(live(None)),
            UserLookup::Miss => {}
        }
        let ticket = self.cache.ticket();
        let read = self
            .read_or_copy(
                deadline,
                db::logins::by_username(&self.pool, username),
                || self.cache.copy_user(username),
            )
            .await?;
        match read {
            crate::copy::Read::Postgres(Some(row)) => {
                let login = Arc::new(self.prepare(row));
                self.cache.put_user(username, ticket, &login);
                Ok(live(Some(login)))
            }
            crate::copy::Read::Postgres(None) => {
                self.cache.put_unknown_user(username, ticket);
                Ok(live(None))
            }
            crate::copy::Read::Copy(found) => Ok(found),
        }
    }

    /// A Postgres read bounded by the client's deadline (and at most 1 s, leaving time to
    /// answer from the copy when it fails).
    pub(crate) async fn db_read<T>(
        &self,
        deadline: Instant,
        read: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let limit = left
            .saturating_sub(Duration::from_millis(100))
            .min(Duration::from_secs(1));
        match tokio::time::timeout(limit, read).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
        }
    }

    async fn check_token(
        &self,
        token: SecretString,
        now: i64,
        deadline: Instant,
    ) -> Result<(Arc<Login>, Option<i64>, bool), Deny> {
        let digest = credentials::token_digest(token.expose_secret());
        let found = match self.cache.token(&digest) {
            TokenLookup::Hit(login, tok) => crate::copy::Found {
                value: Some((login, tok)),
                from_copy: false,
            },
            TokenLookup::Unknown => crate::copy::Found {
                value: None,
                from_copy: false,
            },
            TokenLookup::Miss => {
                let ticket = self.cache.ticket();
                let read = self
                    .read_or_copy(deadline, db::logins::by_token(&self.pool, &digest), || {
                        self.cache.copy_token(&digest)
                    })
                    .await?;
                match read {
                    crate::copy::Read::Postgres(found) => {
                        if found.is_none() {
                            self.cache.put_unknown_token(digest, ticket);
                        }
                        crate::copy::Found {
                            value: found.map(|(row, tok)| {
                                let login = Arc::new(self.prepare(row));
                                self.cache.put_token(digest, ticket, &login, &tok);
                                (login, tok)
                            }),
                            from_copy: false,
                        }
                    }
                    crate::copy::Read::Copy(found) => found,
                }
            }
        };
        let from_copy = found.from_copy;
        let found = found.value;
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
            )
            .of(&login.username));
        }
        if tok.token_expires_at.is_some_and(|t| t.timestamp() <= now) {
            return Err(Deny::new(
                DenyReason::TokenExpired,
                format!(
                    "token {} of user {:?} has expired",
                    tok.token_id, login.username
                ),
            )
            .of(&login.username));
        }
        if self.cache.should_touch_token(tok.token_id) {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                if let Err(e) = db::logins::touch_token(&pool, tok.token_id).await {
                    tracing::debug!(error = %e, "could not record token use");
                }
            });
        }
        // A revocation or expiry set in the future ends the JWT then: no UPDATE (hence no kick)
        // happens at that moment, so the server must disconnect the client by itself.
        let ends = [tok.token_expires_at, tok.token_revoked_at]
            .into_iter()
            .flatten()
            .map(|t| t.timestamp())
            .min();
        Ok((login, ends, from_copy))
    }

    /// Checks that the now-identified user may log in here, and mints its JWT.
    fn authorize(
        &self,
        req: &VerifiedRequest,
        login: &Login,
        now: i64,
        not_after: Option<i64>,
        from_copy: bool,
    ) -> Result<Grant, Deny> {
        let client = &req.claims.nats.client_info;
        let issuer = admit(
            login,
            &Door {
                host: client.host.as_deref(),
                kind: client.kind.as_deref(),
                client_type: client.client_type.as_deref(),
                // nats-server sends no id for a client that has none: that is no id.
                mqtt_id: Some(client.mqtt_id.as_deref().unwrap_or("")),
            },
        )?;
        let ttl = match not_after {
            Some(t) => login
                .shape
                .ttl
                .min(Duration::from_secs((t - now).max(1) as u64)),
            None => login.shape.ttl,
        };
        // MQTT `X/#` needs `X` too; computed per MQTT login so the shared shapes stay as they are.
        let mqtt =
            permissions::connection_type(client.kind.as_deref(), client.client_type.as_deref())
                == "MQTT";
        let mqtt_rights = mqtt
            .then(|| permissions::for_mqtt(&login.shape.merged))
            .flatten();
        let user_jwt = mint::user_jwt(
            req,
            &login.username,
            mqtt_rights.as_ref().unwrap_or(&login.shape.merged),
            ttl,
            &issuer.account,
            &issuer.keypair,
            now,
        )
        .map_err(|e| Deny::new(DenyReason::Internal, format!("cannot mint user JWT: {e}")))?;
        if from_copy {
            self.outage_logins.record(
                outage_logins::Entry {
                    server_id: req.server_id().to_owned(),
                    cid: client.id,
                    user: login.username.to_string(),
                    expires: now + ttl.as_secs() as i64,
                },
                now,
            );
        }
        Ok(Grant {
            user_jwt,
            username: login.username.to_string(),
            account: login.shape.account_name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DenyReason;

    /// `DenyReason::ALL` must hold every variant, in order. This match has no wildcard, so a new
    /// variant does not compile until it is given an index here: the reminder to add it to
    /// `ALL` (and to the docs, which `observability::every_deny_reason_is_documented` checks).
    #[test]
    fn all_lists_every_reason() {
        fn index(r: DenyReason) -> usize {
            use DenyReason::*;
            match r {
                NoCredentials => 0,
                UnknownUser => 1,
                BadPassword => 2,
                UnknownToken => 3,
                TokenExpired => 4,
                TokenRevoked => 5,
                InactiveUser => 6,
                InactiveAccount => 7,
                AccountNotReady => 8,
                SourceNotAllowed => 9,
                ConnectionTypeNotAllowed => 10,
                MqttNeedsJetstream => 11,
                MqttClientIdNotAllowed => 12,
                LockedOut => 13,
                Overloaded => 14,
                Internal => 15,
                UnknownNkey => 16,
                BadNkey => 17,
                BadSignature => 18,
                UnknownCertificate => 19,
                CertificateNotVerified => 20,
                CertificateExpired => 21,
                BadCertificate => 22,
                AmbiguousCertificate => 23,
            }
        }
        for (i, r) in DenyReason::ALL.iter().enumerate() {
            assert_eq!(index(*r), i, "{r:?} out of place in ALL");
        }
    }
}
