//! Test harness: a real Postgres database per test, a real nats-server in operator mode
//! configured with `init`'s fragment, and the real service started in-process.
//!
//! Postgres comes from `NATS_PG_AUTH_TEST_DATABASE_URL` (an admin URL; `scripts/test.sh` starts a
//! throwaway cluster and sets it). nats-server comes from `NATS_SERVER_BIN` or PATH.

#![allow(dead_code)]

pub mod failover;
pub mod imports;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, Event};
use nats_pg_auth::app::{Application, ServeConfig};
use nats_pg_auth::config::ServeArgs;
use nats_pg_auth::keys::SeedCipher;
use nats_pg_auth::metrics::Metrics;
use nats_pg_auth::{db, init};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub fn admin_url() -> String {
    std::env::var("NATS_PG_AUTH_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .expect("set NATS_PG_AUTH_TEST_DATABASE_URL to a Postgres admin URL, or run ./scripts/test.sh which starts one")
}

/// Creates a fresh database and returns its URL.
pub async fn fresh_database() -> String {
    let admin = admin_url();
    let pool = PgPool::connect(&admin)
        .await
        .expect("connect to the admin database");
    let name = format!("npa_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .expect("create database");
    pool.close().await;
    let (base, _) = admin.rsplit_once('/').expect("admin URL ends with /dbname");
    let query = admin
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{base}/{name}{query}")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into())
}

/// SIGKILL a child process (if any) and reap it.
fn kill_and_reap(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A nats-server process on a free loopback port, killed on drop.
pub struct NatsServer {
    pub port: u16,
    pub dir: PathBuf,
    pub resolver_dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server that includes `fragment` (from `init`). `extra` is appended to nats.conf.
    pub async fn start(dir: &Path, resolver_dir: &Path, extra: &str) -> NatsServer {
        Self::start_on(free_port(), dir, resolver_dir, extra).await
    }

    /// Like `start`, on a given client port (a cluster's members must know each other's ports
    /// before the first one starts).
    pub async fn start_on(port: u16, dir: &Path, resolver_dir: &Path, extra: &str) -> NatsServer {
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "server_name: test_{port}\nlisten: 127.0.0.1:{port}\ninclude \"fragment.conf\"\n{extra}\n"
            ),
        )
        .unwrap();
        let mut s = NatsServer {
            port,
            dir: dir.to_path_buf(),
            resolver_dir: resolver_dir.to_path_buf(),
            child: None,
        };
        s.spawn().await;
        s
    }

    /// A server with exactly this config (no operator, no `fragment.conf`): a leaf node, say.
    /// `conf` must make it listen on `port`.
    pub async fn start_plain(port: u16, dir: &Path, conf: &str) -> NatsServer {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("nats.conf"), conf).unwrap();
        let mut s = NatsServer {
            port,
            dir: dir.to_path_buf(),
            resolver_dir: dir.to_path_buf(),
            child: None,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .unwrap();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            // Relative paths in the config (a JetStream store_dir, say) land in the test dir.
            .current_dir(&self.dir)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start nats-server (install it with ./scripts/setup.sh)");
        self.child = Some(child);
        let port = self.port;
        wait_until(
            Duration::from_secs(10),
            "nats-server to listen",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stop(&mut self) {
        kill_and_reap(self.child.take());
    }

    /// Restarts on the same port, optionally with an emptied resolver directory (a server that
    /// lost its disk).
    pub async fn restart(&mut self, empty_resolver: bool) {
        self.stop();
        if empty_resolver {
            let _ = std::fs::remove_dir_all(&self.resolver_dir);
            std::fs::create_dir_all(&self.resolver_dir).unwrap();
        }
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `cond` until it is true or the deadline passes (then panics with `what`).
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn serve_args(nats_url: String) -> ServeArgs {
    ServeArgs {
        nats_url,
        nats_tls: Default::default(),
        login: nats_pg_auth::config::LoginDefaults {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(86400),
            default_publish: vec![">".into()],
            default_subscribe: vec![">".into()],
        },
        db_pool_size: 8,
        callout_concurrency: 6,
        hash_threads: 2,
        max_bcrypt_cost: 12,
        max_argon2_memory_kib: 65_536,
        max_argon2_iterations: 8,
        max_argon2_parallelism: 16,
        sync: true,
        reconcile_interval: Duration::from_secs(60),
        kicks_per_second: 500,
        http_listen: "off".into(),
        login_cache: true,
        db_outage_grace: Duration::from_secs(3600),
        db_outage_ttl: Duration::from_secs(300),
        snapshot_dir: None,
        snapshot_jetstream: true,
        snapshot_replicas: 0,
        credential_cache: true,
        credential_cache_ttl: Duration::from_secs(600),
        unknown_reads_per_second: 50,
        lockout_failures: 10,
        lockout_duration: Duration::from_secs(300),
        shutdown_timeout: Duration::from_secs(10),
        clock_skew: Duration::from_secs(5),
        replica_name: None,
        auth_timeout: Duration::from_secs(2),
        reply_connections: 0,
        no_shedding: false,
        copy_resume_window: Duration::from_secs(60),
    }
}

/// One complete deployment: database, nats-server and the service.
pub struct TestEnv {
    pub database_url: String,
    /// What the service connects with: `database_url`, or a login role of
    /// `nats_pg_auth_service` (`EnvOptions::service_role`).
    pub service_url: String,
    pub pool: PgPool,
    pub nats: NatsServer,
    pub metrics: Metrics,
    pub callout: Option<std::sync::Arc<nats_pg_auth::callout::Callout>>,
    /// The HTTP endpoints, when the test turned them on (`http_listen: "127.0.0.1:0"`).
    pub http: Option<std::net::SocketAddr>,
    pub cipher: SeedCipher,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    service: Option<tokio::task::JoinHandle<()>>,
}

pub struct EnvOptions {
    pub encryption_key: Option<[u8; 32]>,
    pub nats_extra: String,
    pub tweak: fn(&mut ServeArgs),
    /// Run `init` and `serve` as a login role granted `nats_pg_auth_service` (not superuser).
    pub service_role: bool,
    /// TLS towards nats-server for the service (when `nats_extra` has a `tls {}` block).
    pub nats_tls: nats_pg_auth::config::NatsTlsArgs,
    /// Runs on the migrated database (its URL) before `init`: an import that brings its own
    /// operator, which `init` then adopts (no operator name given).
    pub before_init: Option<BeforeInit>,
}

/// See [`EnvOptions::before_init`].
pub type BeforeInit = Box<dyn FnOnce(&str) + Send>;

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            encryption_key: None,
            nats_extra: String::new(),
            tweak: |_| {},
            service_role: false,
            nats_tls: Default::default(),
            before_init: None,
        }
    }
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        Self::start_with(EnvOptions::default()).await
    }

    pub async fn start_with(opts: EnvOptions) -> TestEnv {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let database_url = fresh_database().await;
        let pool = db::connect(&database_url, 4)
            .await
            .expect("connect test database");
        db::migrate(&pool).await.expect("migrate");
        let service_url = if opts.service_role {
            create_login_role(&pool, &database_url, "nats_pg_auth_service")
                .await
                .1
        } else {
            database_url.clone()
        };
        let cipher = SeedCipher::new(opts.encryption_key);
        let operator_name = match opts.before_init {
            Some(prepare) => {
                prepare(&database_url);
                None
            }
            None => Some("test-operator"),
        };
        let init_pool = db::connect(&service_url, 2)
            .await
            .expect("connect for init");
        let report = init::init(&init_pool, &cipher, operator_name)
            .await
            .expect("init");
        init_pool.close().await;
        let dir = tempfile::tempdir().unwrap();
        let resolver_dir = dir.path().join("jwt");
        init::write_fragment(
            &report.identities,
            &resolver_dir,
            &dir.path().join("fragment.conf"),
        )
        .expect("fragment");
        let nats = NatsServer::start(dir.path(), &resolver_dir, &opts.nats_extra).await;
        let mut args = serve_args(nats.url());
        args.nats_tls = opts.nats_tls.clone();
        (opts.tweak)(&mut args);
        let mut env = TestEnv {
            database_url,
            service_url,
            pool,
            nats,
            metrics: Metrics::default(),
            callout: None,
            http: None,
            cipher,
            dir,
            shutdown: CancellationToken::new(),
            service: None,
        };
        env.start_service(args).await;
        env
    }

    pub async fn start_service(&mut self, args: ServeArgs) {
        let config = ServeConfig {
            database_url: self.service_url.clone(),
            cipher: self.cipher.clone(),
            args,
        };
        let app = Application::build(config).await.expect("build the service");
        self.metrics = app.metrics();
        self.callout = Some(app.callout());
        self.http = app.http_addr();
        self.shutdown = CancellationToken::new();
        let token = self.shutdown.clone();
        self.service = Some(tokio::spawn(async move {
            app.run_until_stopped(token).await.expect("service run");
        }));
        // Logins are answered once the copy is loaded and the callout subscribed.
        let callout = self.callout.clone().expect("callout");
        wait_until(Duration::from_secs(10), "the callout to serve", || {
            let callout = callout.clone();
            async move { callout.is_serving() }
        })
        .await;
    }

    pub async fn stop_service(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.service.take() {
            let _ = h.await;
        }
    }

    pub async fn sql(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"));
    }

    /// Waits until `sql` (one boolean value) is true, e.g. `SELECT count(*) = 0 FROM …`.
    pub async fn wait_sql(&self, sql: &'static str, deadline: Duration, what: &str) {
        let pool = self.pool.clone();
        wait_until(deadline, what, || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, bool>(sql)
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(false)
            }
        })
        .await;
    }

    pub async fn sql_err(&self, sql: &str) -> String {
        match sqlx::raw_sql(sql).execute(&self.pool).await {
            Ok(_) => panic!("SQL unexpectedly succeeded:\n{sql}"),
            Err(e) => e.to_string(),
        }
    }

    /// Inserts the design.md example tenant: account acme, role sensor, user alice/s3cret.
    pub async fn acme(&self) {
        self.sql(
            "INSERT INTO nats.accounts (name, max_connections) VALUES ('acme', 100);
             INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
               SELECT id, 'sensor', '{sensors.>}', '{sensors.>,_INBOX.>}' FROM nats.accounts WHERE name = 'acme';
             INSERT INTO nats.users (account_id, role_id, username, password_hash)
               SELECT a.id, r.id, 'alice', crypt('s3cret', gen_salt('bf', 10))
               FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id WHERE a.name = 'acme';",
        )
        .await;
        self.wait_synced("acme").await;
    }

    /// Waits until the account's JWT is on the server.
    pub async fn wait_synced(&self, account: &str) {
        let pool = self.pool.clone();
        let name = account.to_owned();
        wait_until(Duration::from_secs(10), &format!("account {account} to sync"), || {
            let pool = pool.clone();
            let name = name.clone();
            async move {
                sqlx::query_scalar::<_, bool>("SELECT synced_at IS NOT NULL AND sync_error IS NULL FROM nats.accounts WHERE name = $1")
                    .bind(&name)
                    .fetch_optional(&pool)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(false)
            }
        })
        .await;
    }

    pub async fn account_key(&self, name: &str) -> String {
        sqlx::query_scalar("SELECT public_key FROM nats.accounts WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    pub async fn connect_user(
        &self,
        user: &str,
        pass: &str,
    ) -> Result<Client, async_nats::ConnectError> {
        client_options(ConnectOptions::with_user_and_password(
            user.into(),
            pass.into(),
        ))
        .connect(self.url())
        .await
    }

    pub async fn connect_token(&self, token: &str) -> Result<Client, async_nats::ConnectError> {
        client_options(ConnectOptions::with_token(token.into()))
            .connect(self.url())
            .await
    }

    /// Waits until `user` can log in (the account reached the server, the callout is back...).
    pub async fn wait_login(&self, user: &str, pass: &str, deadline: Duration, what: &str) {
        let url = self.url();
        wait_until(deadline, what, || {
            let opts = ConnectOptions::with_user_and_password(user.into(), pass.into());
            let url = url.clone();
            async move { client_options(opts).connect(url).await.is_ok() }
        })
        .await;
    }

    /// Connects and also returns the client's events (disconnects, permission errors).
    pub async fn connect_user_events(
        &self,
        user: &str,
        pass: &str,
    ) -> Result<(Client, mpsc::UnboundedReceiver<Event>), async_nats::ConnectError> {
        self.connect_events(ConnectOptions::with_user_and_password(
            user.into(),
            pass.into(),
        ))
        .await
    }

    /// Token login that also returns the client's events.
    pub async fn connect_token_events(
        &self,
        token: &str,
    ) -> Result<(Client, mpsc::UnboundedReceiver<Event>), async_nats::ConnectError> {
        self.connect_events(ConnectOptions::with_token(token.into()))
            .await
    }

    /// Any login (`opts` carries the credentials) that also returns the client's events.
    pub async fn connect_events(
        &self,
        opts: ConnectOptions,
    ) -> Result<(Client, mpsc::UnboundedReceiver<Event>), async_nats::ConnectError> {
        let (opts, rx) = with_events(client_options(opts));
        Ok((opts.connect(self.url()).await?, rx))
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `opts` with the client's events (disconnects, server errors, …) sent to the receiver.
pub fn with_events(opts: ConnectOptions) -> (ConnectOptions, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let opts = opts.event_callback(move |e| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(e);
        }
    });
    (opts, rx)
}

/// Waits for the client's disconnect event until `limit` after `start`; returns how long
/// after `start` it came. Panics (naming `what`) when it does not.
pub async fn disconnected_by(
    events: &mut mpsc::UnboundedReceiver<Event>,
    start: Instant,
    limit: Duration,
    what: &str,
) -> Duration {
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), events.recv()).await {
            Ok(Some(Event::Disconnected)) => return start.elapsed(),
            Ok(Some(_)) => continue,
            _ => panic!("{what}: not disconnected within {limit:?}"),
        }
    }
}

/// Waits (3 s at most) for the server's permissions-violation error about `subject`.
pub async fn expect_violation(events: &mut mpsc::UnboundedReceiver<Event>, subject: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no permissions violation for {subject}"))
            .expect("event stream open");
        if let Event::ServerError(err) = &e {
            let text = err.to_string().to_lowercase();
            if text.contains("permissions violation") && text.contains(&subject.to_lowercase()) {
                return;
            }
        }
    }
}

pub fn client_options(opts: ConnectOptions) -> ConnectOptions {
    opts.connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 50).min(500)))
}

impl TestEnv {
    /// A client in the system account, as the service's own system user.
    pub async fn system_client(&self) -> Client {
        let ids = nats_pg_auth::init::ServiceIdentities::load(&self.pool)
            .await
            .unwrap();
        let kind = nats_pg_auth::db::identities::IdentityKind::SysUser;
        let key = std::sync::Arc::new(ids.keypair(&self.cipher, kind).unwrap());
        ConnectOptions::with_jwt(ids.jwt(kind).to_owned(), move |nonce| {
            let key = key.clone();
            async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
        })
        .connect(self.url())
        .await
        .expect("system user connects")
    }

    /// The users connected to an account, as nats-server reports them (CONNZ, auth=true).
    pub async fn connected_users(&self, account: &str) -> Vec<String> {
        let sys = self.system_client().await;
        let key = self.account_key(account).await;
        let reply = sys
            .request(
                format!("$SYS.REQ.ACCOUNT.{key}.CONNZ"),
                r#"{"auth":true}"#.into(),
            )
            .await
            .expect("CONNZ");
        let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        v["data"]["connections"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["authorized_user"].as_str().map(String::from))
            .collect()
    }

    /// Adds a user with no role and no permissions (so the defaults, `>`) to an account.
    pub async fn add_watcher(&self, account: &str, username: &str) {
        self.sql(&format!(
            "INSERT INTO nats.users (account_id, username, password_hash)
               SELECT id, '{username}', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = '{account}'"
        ))
        .await;
    }
}

/// What `$SYS.REQ.USER.INFO` says about the calling connection.
pub async fn user_info(client: &Client) -> serde_json::Value {
    let reply = client
        .request("$SYS.REQ.USER.INFO", "".into())
        .await
        .expect("USER.INFO");
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).expect("USER.INFO json");
    v["data"].clone()
}

/// True when `err` is nats-server refusing the login (as opposed to a network problem).
pub fn is_auth_refusal(err: &async_nats::ConnectError) -> bool {
    matches!(
        err.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation
    ) || err.to_string().to_lowercase().contains("authorization")
}

/// Returns once the server has processed everything `client` sent before (its SUBs included).
/// `flush` is not enough: it only drains the client's socket, and the server reads each
/// connection on its own, so another client's PUB can still overtake a flushed SUB. A message
/// to the client's own inbox comes back only after every earlier command was handled. Needs a
/// user allowed to publish and subscribe on `_INBOX.>` (the default permissions are).
pub async fn settle(client: &Client) {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut probe = client.subscribe(inbox.clone()).await.unwrap();
    client.publish(inbox, "".into()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), probe.next())
        .await
        .expect("own inbox message comes back")
        .expect("probe subscription open");
}

/// GET over plain HTTP/1.1; returns (status line, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("HTTP GET {addr}{path}: {e}"))
}

/// GET over plain HTTP/1.1 (`Connection: close`, 5 s at most); returns (status line, body), or
/// why there is no answer (nothing listening, say).
pub async fn try_http_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<(String, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5s".to_owned())?
        .map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Ok((
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    ))
}

/// Waits for an audit row of `kind` about `subject` and returns its detail.
pub async fn audit_row(env: &TestEnv, kind: &str, subject: &str) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let row: Option<serde_json::Value> = sqlx::query_scalar(
            "SELECT detail FROM nats.audit_log WHERE kind = $1 AND subject = $2 ORDER BY id DESC LIMIT 1",
        )
        .bind(kind)
        .bind(subject)
        .fetch_optional(&env.pool)
        .await
        .unwrap();
        if let Some(detail) = row {
            return detail;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no audit row {kind} for {subject}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// nats-servers on loopback forming one cluster: a full mesh of routes, each member with its
/// own directory, resolver directory and `init` fragment.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` members under `base` (`base/nats<i>`). `fragment(i, resolver_dir, out)` writes
    /// member `i`'s configuration fragment (what `init` / `export-config` produce) to `out`.
    pub async fn start(
        base: &Path,
        n: usize,
        fragment: impl FnMut(usize, &Path, &Path),
    ) -> NatsCluster {
        Self::start_with(base, n, "", fragment).await
    }

    /// As [`NatsCluster::start`], with `extra` added to every member's nats.conf (relative
    /// paths in it land in the member's directory), e.g. a `jetstream {}` block.
    pub async fn start_with(
        base: &Path,
        n: usize,
        extra: &str,
        mut fragment: impl FnMut(usize, &Path, &Path),
    ) -> NatsCluster {
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let dir = base.join(format!("nats{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let resolver_dir = dir.join("jwt");
            fragment(i, &resolver_dir, &dir.join("fragment.conf"));
            let routes = route_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(", ");
            let extra = format!(
                "cluster {{\n  name: test_cluster\n  listen: 127.0.0.1:{}\n  routes: [{routes}]\n}}\n{extra}",
                route_ports[i]
            );
            servers.push(NatsServer::start_on(client_ports[i], &dir, &resolver_dir, &extra).await);
        }
        NatsCluster { servers }
    }

    /// Every member's URL, comma separated (what `--nats-url` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A Postgres cluster of the test's own (`scripts/pg.sh`), for tests that stop and start it;
/// the suite's shared Postgres must never be stopped. Stopped (and its directory removed) on drop.
pub struct PgProcess {
    pub port: u16,
    dir: tempfile::TempDir,
}

impl PgProcess {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh")
    }

    /// Creates and starts a cluster on a free port, in a fresh directory directly under /tmp
    /// (as root, pg.sh hands that directory to the `postgres` user, who must reach it).
    pub async fn start() -> PgProcess {
        let dir = tempfile::Builder::new()
            .prefix("npa-pg.")
            .tempdir_in("/tmp")
            .unwrap();
        let pg = PgProcess {
            port: free_port(),
            dir,
        };
        pg.start_again().await;
        pg
    }

    /// Starts the (stopped) cluster again on the same port.
    pub async fn start_again(&self) {
        let out = tokio::process::Command::new(Self::script())
            .arg("start")
            .arg(self.dir.path())
            .arg(self.port.to_string())
            .output()
            .await
            .expect("run scripts/pg.sh");
        assert!(
            out.status.success(),
            "pg.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops it (fast shutdown: connections are closed at once).
    pub async fn stop(&self) {
        let out = tokio::process::Command::new(Self::script())
            .arg("stop")
            .arg(self.dir.path())
            .output()
            .await
            .expect("run scripts/pg.sh");
        assert!(
            out.status.success(),
            "pg.sh stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgProcess {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .arg("stop")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The real `nats-pg-auth serve` binary as a child process (so it can be SIGKILLed or
/// SIGTERMed), logging to `<dir>/<name>.log`, its HTTP endpoints on a fixed free port.
/// Killed on drop.
pub struct ServiceProcess {
    pub name: String,
    pub http: std::net::SocketAddr,
    log: PathBuf,
    database_url: String,
    args: Vec<String>,
    /// Extra environment (e.g. an encryption key).
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl ServiceProcess {
    /// Starts `serve --nats-url <nats_urls> --http-listen <free port> <extra...>`.
    pub fn start(
        name: &str,
        dir: &Path,
        database_url: &str,
        nats_urls: &str,
        extra: &[&str],
    ) -> ServiceProcess {
        let mut p = Self::new(name, dir, database_url, nats_urls, extra);
        p.spawn();
        p
    }

    fn new(
        name: &str,
        dir: &Path,
        database_url: &str,
        nats_urls: &str,
        extra: &[&str],
    ) -> ServiceProcess {
        let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args = vec![
            "serve".to_owned(),
            "--nats-url".to_owned(),
            nats_urls.to_owned(),
            "--http-listen".to_owned(),
            http.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        ServiceProcess {
            name: name.to_owned(),
            http,
            log: dir.join(format!("{name}.log")),
            database_url: database_url.to_owned(),
            args,
            env: Vec::new(),
            child: None,
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nats-pg-auth"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("DATABASE_URL", &self.database_url)
            .env(
                "RUST_LOG",
                std::env::var("NATS_PG_AUTH_TEST_SERVICE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start nats-pg-auth serve");
        self.child = Some(child);
    }

    /// Starts it again with the same arguments (and HTTP port) after it exited or was killed.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        kill_and_reap(self.child.take());
    }

    /// Sends a signal (SIGTERM, say) without waiting.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = self.pid().expect("process running") as i32;
        rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), signal)
            .expect("signal the service");
    }

    /// The exit status once it has exited; None while it runs (or when it was never started).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.is_some() && self.try_exit().is_none()
    }

    /// Waits (up to `deadline`) for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "{} did not exit within {deadline:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `/readyz`: Ok(body) on 200, Err(status line and body, or why nothing answered).
    pub async fn readyz(&self) -> Result<String, String> {
        match try_http_get(self.http, "/readyz").await {
            Ok((status, body)) if status.contains(" 200 ") => Ok(body),
            Ok((status, body)) => Err(format!("{status}: {}", body.trim())),
            Err(e) => Err(e),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `serve` against `env`'s database and nats-server, sized like the in-process service.
    pub fn for_env(env: &TestEnv, name: &str) -> ServiceProcess {
        Self::for_env_with(env, name, &[])
    }

    /// As [`ServiceProcess::for_env`], with extra environment variables.
    pub fn for_env_with(env: &TestEnv, name: &str, vars: &[(&str, &str)]) -> ServiceProcess {
        let mut p = Self::new(
            name,
            env.dir.path(),
            &env.database_url,
            &env.url(),
            &["--db-pool-size", "8", "--callout-concurrency", "6"],
        );
        p.env = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.spawn();
        p
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, deadline: Duration) {
        let http = self.http;
        wait_until(deadline, &format!("{} to be ready", self.name), || async move {
            matches!(try_http_get(http, "/readyz").await, Ok((status, _)) if status.contains(" 200 "))
        })
        .await;
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Takes the test database away from every client (the service's pool and listener included)
/// until `end` gives it back.
pub struct DbOutage {
    admin: sqlx::PgPool,
    db: String,
}

impl DbOutage {
    pub async fn begin(env: &TestEnv) -> DbOutage {
        let db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        Self::begin_on(db).await
    }

    /// The same for the database `db` of the shared Postgres (a test without a `TestEnv`).
    pub async fn begin_on(db: String) -> DbOutage {
        let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
        sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
            .execute(&admin)
            .await
            .unwrap();
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(&db)
            .execute(&admin)
            .await
            .unwrap();
        DbOutage { admin, db }
    }

    pub async fn end(self) {
        sqlx::query(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.db
        ))
        .execute(&self.admin)
        .await
        .unwrap();
    }
}

/// `url` with its user replaced (and a password added), e.g. for a login role made by a test.
pub fn url_with_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
    let host_part = rest.split_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}:{password}@{host_part}")
}

/// Creates a LOGIN role (cluster-wide, unique name) granted `member_of`; returns its name and a
/// URL of `database_url`'s database that connects as it.
pub async fn create_login_role(
    admin: &PgPool,
    database_url: &str,
    member_of: &str,
) -> (String, String) {
    let name = format!("npa_role_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {name} LOGIN PASSWORD 'pw' IN ROLE {member_of}"
    ))
    .execute(admin)
    .await
    .expect("create a login role");
    let url = url_with_user(database_url, &name, "pw");
    (name, url)
}

/// Runs the real binary to completion: (exit code, stdout, stderr). `stdin` is written and
/// closed; the caller's environment is kept except what would change the verb's behaviour
/// (encryption key, TTL and default-permission variables). Bounded: a verb that should end at
/// once must not hang the test (a `serve` that accepted its flags would wait for Postgres).
pub fn run_cli(
    args: &[&str],
    database_url: Option<&str>,
    stdin: &str,
) -> (Option<i32>, String, String) {
    use std::io::Write as _;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nats-pg-auth"));
    cmd.args(args);
    for var in [
        "NATS_PG_AUTH_ENCRYPTION_KEY",
        "NATS_PG_AUTH_ENCRYPTION_KEY_FILE",
        "NATS_PG_AUTH_DEFAULT_TTL",
        "NATS_PG_AUTH_MAX_TTL",
        "NATS_PG_AUTH_DEFAULT_PUBLISH",
        "NATS_PG_AUTH_DEFAULT_SUBSCRIBE",
    ] {
        cmd.env_remove(var);
    }
    match database_url {
        Some(url) => cmd.env("DATABASE_URL", url),
        None => cmd.env_remove("DATABASE_URL"),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nats-pg-auth");
    // A verb that does not read stdin may exit first: a broken pipe here is not an error.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("wait for nats-pg-auth"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("nats-pg-auth {args:?} still running after 30s");
        }
    };
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A LOGIN role administering `account` as a tenant: (its name, a pool connected as it).
pub async fn tenant_admin(env: &TestEnv, account: &str) -> (String, PgPool) {
    let (role, url) = create_login_role(&env.pool, &env.database_url, "nats_pg_auth_tenant").await;
    env.sql(&format!(
        "INSERT INTO nats.account_admins (account_id, role_name) SELECT id, '{role}' FROM nats.accounts WHERE name = '{account}'"
    ))
    .await;
    (
        role,
        PgPool::connect(&url)
            .await
            .expect("connect as the tenant admin"),
    )
}

/// `run_cli` off the runtime's thread (the in-process service keeps running meanwhile).
pub async fn run_cli_async(
    args: &[&str],
    database_url: &str,
    stdin: &str,
) -> (Option<i32>, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (url, stdin) = (database_url.to_owned(), stdin.to_owned());
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&args, Some(&url), &stdin)
    })
    .await
    .expect("run the CLI")
}

/// Waits until `nats-pg-auth status` says healthy (exit 0): every replica has reported ready
/// and one leads the sync.
pub async fn wait_healthy(database_url: &str) {
    wait_until(Duration::from_secs(15), "status to say healthy", || async {
        run_cli_async(&["status"], database_url, "").await.0 == Some(0)
    })
    .await;
}
