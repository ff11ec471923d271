//! Failover to a promoted streaming replica behind the same address (issue 17, part 2): the
//! test's own primary and `pg_basebackup -R` standby, a TCP proxy in front of them (what
//! HAProxy or a Kubernetes Service gives), nats-server, and the real service connected through
//! the proxy. The primary is stopped at once, the standby promoted and the proxy switched; no
//! process of the service is restarted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::ConnectOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::common::failover::Proxy;
use crate::common::{
    client_options, create_login_role, http_get, is_auth_refusal, run_cli, wait_until, NatsServer,
    PgProcess, ServiceProcess,
};

struct Cluster {
    primary: PgProcess,
    standby: PgProcess,
    proxy: Proxy,
    /// The superuser on the primary's database (the tenants' admin in this test).
    primary_db: PgPool,
    nats: NatsServer,
    replicas: Vec<ServiceProcess>,
    sys: (String, Arc<nkeys::KeyPair>),
    _dir: tempfile::TempDir,
}

async fn sql(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"));
}

/// Primary with the schema, the service identities and acme's users; its standby streaming;
/// nats-server; `replicas` service processes connected (as a login role of the service, not
/// a superuser) through the proxy.
async fn cluster(replicas: usize, extra: &[&str]) -> Cluster {
    let primary = PgProcess::start().await;
    {
        let admin = PgPool::connect(&primary.url("postgres")).await.unwrap();
        sql(&admin, "CREATE DATABASE fo").await;
        admin.close().await;
    }
    let primary_db = PgPool::connect(&primary.url("fo")).await.unwrap();
    nats_pg_auth::db::migrate(&primary_db).await.unwrap();
    let (_, direct) =
        create_login_role(&primary_db, &primary.url("fo"), "nats_pg_auth_service").await;
    let proxy = Proxy::start(primary.port).await;
    let service_url = proxy.url(&direct);
    let dir = tempfile::tempdir().unwrap();
    let resolver = dir.path().join("jwt");
    let (code, _, err) = run_cli(
        &[
            "init",
            "--operator-name",
            "failover",
            "--resolver-dir",
            resolver.to_str().unwrap(),
            "--out",
            dir.path().join("fragment.conf").to_str().unwrap(),
        ],
        Some(&service_url),
        "",
    );
    assert_eq!(code, Some(0), "init: {err}");
    let nats = NatsServer::start(dir.path(), &resolver, "").await;
    sql(
        &primary_db,
        "INSERT INTO nats.accounts (name) VALUES ('acme'), ('globex');
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT a.id, u, crypt('pw', gen_salt('bf', 4)) FROM nats.accounts a,
                  unnest('{alice,bob}'::text[]) u WHERE a.name = 'acme';
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'victim', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'globex';
         INSERT INTO nats.users (account_id, username) SELECT id, 'carol' FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('carol-token', 'sha256') FROM nats.users WHERE username = 'carol';",
    )
    .await;
    let sys = {
        let ids = nats_pg_auth::init::ServiceIdentities::load(&primary_db)
            .await
            .unwrap();
        let kind = nats_pg_auth::db::identities::IdentityKind::SysUser;
        let cipher = nats_pg_auth::keys::SeedCipher::new(None);
        (
            ids.jwt(kind).to_owned(),
            Arc::new(ids.keypair(&cipher, kind).unwrap()),
        )
    };
    let standby = primary.standby().await;
    let replicas: Vec<ServiceProcess> = (0..replicas)
        .map(|i| {
            ServiceProcess::start(
                &format!("replica{i}"),
                dir.path(),
                &service_url,
                &nats.url(),
                &[
                    &["--db-pool-size", "5", "--callout-concurrency", "3"],
                    extra,
                ]
                .concat(),
            )
        })
        .collect();
    for r in &replicas {
        let started = Instant::now();
        while r.readyz().await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{} not ready: {:?}\n{}",
                r.name,
                r.readyz().await,
                r.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let c = Cluster {
        primary,
        standby,
        proxy,
        primary_db,
        nats,
        replicas,
        sys,
        _dir: dir,
    };
    c.wait_login("alice", Duration::from_secs(15), "alice to log in")
        .await;
    c
}

impl Cluster {
    async fn login(&self, user: &str) -> Result<(), async_nats::ConnectError> {
        let opts = if user == "carol" {
            ConnectOptions::with_token("carol-token".into())
        } else {
            ConnectOptions::with_user_and_password(user.into(), "pw".into())
        };
        client_options(opts)
            .connect(self.nats.url())
            .await
            .map(drop)
    }

    /// True when the login of `user` is refused (as a refusal, not any error).
    async fn refused(&self, user: &str) -> bool {
        matches!(self.login(user).await, Err(e) if is_auth_refusal(&e))
    }

    async fn wait_login(&self, user: &str, deadline: Duration, what: &str) {
        wait_until(
            deadline,
            what,
            || async move { self.login(user).await.is_ok() },
        )
        .await;
    }

    async fn wait_refused(&self, user: &str, deadline: Duration, what: &str) {
        wait_until(deadline, what, || async move { self.refused(user).await }).await;
    }

    /// Waits until the standby has replayed everything the primary wrote so far.
    async fn standby_caught_up(&self) {
        // The insert position: with synchronous_commit off (scripts/pg.sh) a commit returns
        // before its WAL is written, so the write position may still be before it.
        let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(&self.primary_db)
            .await
            .unwrap();
        let standby = PgPool::connect(&self.standby.url("fo")).await.unwrap();
        wait_until(Duration::from_secs(10), "the standby to replay", || {
            let (standby, lsn) = (standby.clone(), lsn.clone());
            async move {
                sqlx::query_scalar::<_, bool>("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                    .bind(lsn)
                    .fetch_one(&standby)
                    .await
                    .unwrap_or(false)
            }
        })
        .await;
        standby.close().await;
    }

    /// Stops the primary at once, promotes the standby, switches the proxy; returns a pool on
    /// the new primary (as the superuser).
    async fn fail_over(&self) -> PgPool {
        self.primary.stop_immediately();
        let new_primary = self.promote().await;
        self.proxy.switch(self.standby.port);
        new_primary
    }

    /// Promotes the standby (the proxy still points at the old primary).
    async fn promote(&self) -> PgPool {
        self.standby.promote();
        PgPool::connect(&self.standby.url("fo")).await.unwrap()
    }

    /// The account JWT the server holds for `account` (empty when none).
    async fn jwt_on_server(&self, key: &str) -> String {
        let (jwt, seed) = self.sys.clone();
        let Ok(sys) = client_options(ConnectOptions::with_jwt(jwt, move |nonce| {
            let seed = seed.clone();
            async move { seed.sign(&nonce).map_err(async_nats::AuthError::new) }
        }))
        .connect(self.nats.url())
        .await
        else {
            return String::new();
        };
        match sys
            .request(format!("$SYS.REQ.ACCOUNT.{key}.CLAIMS.LOOKUP"), "".into())
            .await
        {
            Ok(m) => String::from_utf8_lossy(&m.payload).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// How many replicas say they lead the sync (`/metrics`).
    async fn leaders(&self) -> usize {
        let mut n = 0;
        for r in &self.replicas {
            n += usize::from(metric(r, "nats_pg_auth_sync_leader").await == "1");
        }
        n
    }
}

/// The value of a gauge or counter on a replica's `/metrics` (empty when absent).
async fn metric(r: &ServiceProcess, name: &str) -> String {
    let (_, body) = http_get(r.http, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
        .unwrap_or_default()
}

/// The claims of a JWT (its middle part).
fn claims(jwt: &str) -> serde_json::Value {
    use base64::Engine as _;
    let part = jwt.split('.').nth(1).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Logins of `user` every 50 ms until `stop`: (accepted, refused).
fn login_loop(c: &Arc<Cluster>, stop: CancellationToken) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (c, ok2, refused2) = (c.clone(), ok.clone(), refused.clone());
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            match c.login("alice").await {
                Ok(()) => ok2.fetch_add(1, Ordering::SeqCst),
                Err(_) => refused2.fetch_add(1, Ordering::SeqCst),
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_behind_the_same_address_is_followed_without_a_restart() {
    let c = Arc::new(cluster(2, &[]).await);
    let key: String =
        sqlx::query_scalar("SELECT public_key FROM nats.accounts WHERE name = 'acme'")
            .fetch_one(&c.primary_db)
            .await
            .unwrap();
    wait_until(Duration::from_secs(10), "one leader", || async {
        c.leaders().await == 1
    })
    .await;
    c.wait_login("carol", Duration::from_secs(10), "carol's token")
        .await;
    let stop = CancellationToken::new();
    let (ok, refused) = login_loop(&c, stop.clone());

    // Committed and replicated before the failover: bob deactivated, carol's token revoked.
    sql(
        &c.primary_db,
        "UPDATE nats.users SET active = false WHERE username = 'bob';
         UPDATE nats.user_tokens SET revoked_at = now();",
    )
    .await;
    c.wait_refused("bob", Duration::from_secs(10), "bob refused")
        .await;
    c.wait_refused("carol", Duration::from_secs(10), "carol refused")
        .await;
    c.standby_caught_up().await;
    let before = c.jwt_on_server(&key).await;
    assert!(!before.is_empty(), "acme's JWT is on the server");

    let failed_at = Instant::now();
    let (ok0, refused0) = (ok.load(Ordering::SeqCst), refused.load(Ordering::SeqCst));
    let new_primary = c.fail_over().await;
    let replicated: bool = sqlx::query_scalar(
        "SELECT NOT u.active AND t.revoked_at IS NOT NULL
           FROM nats.users u, nats.user_tokens t WHERE u.username = 'bob'",
    )
    .fetch_one(&new_primary)
    .await
    .unwrap();
    assert!(replicated, "the new primary has bob's and carol's changes");

    // A change on the new primary: a new user, and acme's connection limit (a new JWT).
    sql(
        &new_primary,
        "INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'dave', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'acme';
         UPDATE nats.accounts SET max_connections = 7 WHERE name = 'acme';",
    )
    .await;
    c.wait_login(
        "dave",
        Duration::from_secs(30),
        "dave (made on the new primary) to log in",
    )
    .await;
    let dave_after = failed_at.elapsed();
    wait_until(
        Duration::from_secs(30),
        "acme's new JWT on the server",
        || async { claims(&c.jwt_on_server(&key).await)["nats"]["limits"]["conn"] == 7 },
    )
    .await;
    let pushed_after = failed_at.elapsed();
    c.wait_login("alice", Duration::from_secs(5), "alice").await;
    for (user, what) in [
        ("bob", "bob, deactivated before the failover, stays refused"),
        (
            "carol",
            "carol's token, revoked before the failover, stays refused",
        ),
    ] {
        let got = c.login(user).await;
        assert!(
            matches!(&got, Err(e) if is_auth_refusal(e)),
            "{what}: {got:?}"
        );
    }
    wait_until(Duration::from_secs(10), "exactly one leader", || async {
        c.leaders().await == 1
    })
    .await;
    let holders: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            .fetch_one(&new_primary)
            .await
            .unwrap();
    assert_eq!(holders, 1, "one sync lock holder on the new primary");
    stop.cancel();
    let (ok1, refused1) = (ok.load(Ordering::SeqCst), refused.load(Ordering::SeqCst));
    eprintln!(
        "failover: {} logins accepted and {} refused since the primary stopped; dave logged in after {dave_after:?}; acme's new JWT on the server after {pushed_after:?}",
        ok1 - ok0,
        refused1 - refused0
    );
    assert!(ok1 > ok0, "logins went on after the failover");
}

/// A transaction the old primary committed but never replicated is lost at the promotion, and
/// the new primary hands out its xid again: a replica resuming the change log from a snapshot
/// of the old primary would take the new commit for one it has seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_reuses_a_lost_xid_after_a_promotion_still_reaches_the_copy() {
    let c = Arc::new(cluster(1, &[]).await);
    c.wait_login("victim", Duration::from_secs(10), "victim")
        .await;
    // The setup is old news: the prune would have taken it from the log (otherwise every
    // account's row is still there, and re-reading them re-reads everyone).
    sql(&c.primary_db, "DELETE FROM nats.changes").await;
    c.standby_caught_up().await;
    c.standby.stop_streaming();
    let standby = PgPool::connect(&c.standby.url("fo")).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the standby to stop streaming",
        || {
            let standby = standby.clone();
            async move {
                sqlx::query_scalar::<_, bool>("SELECT count(*) = 0 FROM pg_stat_wal_receiver")
                    .fetch_one(&standby)
                    .await
                    .unwrap_or(false)
            }
        },
    )
    .await;
    standby.close().await;

    // Lost with the old primary: 3000 xids, then a user the copy reads from the log.
    sql(
        &c.primary_db,
        "DO $$ BEGIN FOR i IN 1..3000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
    )
    .await;
    sql(
        &c.primary_db,
        "INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'ghost', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'globex'",
    )
    .await;
    // Read into the copy (4 users before), not only committed.
    wait_until(Duration::from_secs(10), "ghost in the copy", || async {
        metric(&c.replicas[0], "nats_pg_auth_copy_users").await == "5"
    })
    .await;
    let last_old: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&c.primary_db)
        .await
        .unwrap();
    c.primary.stop_immediately();
    // Answered from the copy (Postgres is down): the replica has read the lost user.
    c.wait_login("ghost", Duration::from_secs(10), "ghost from the copy")
        .await;

    let new_primary = c.promote().await;
    let reused: i64 = sqlx::query_scalar(
        "UPDATE nats.users SET active = false WHERE username = 'victim'
         RETURNING pg_current_xact_id()::text::bigint",
    )
    .fetch_one(&new_primary)
    .await
    .unwrap();
    assert!(
        reused < last_old,
        "the new primary reuses the lost xids ({reused} < {last_old})"
    );
    // The replica reaches the new primary only now: its position in the log is a snapshot of
    // the old primary, in which the revocation's xid looks committed and seen.
    c.proxy.switch(c.standby.port);
    c.wait_login("alice", Duration::from_secs(30), "alice after the failover")
        .await;
    c.wait_refused(
        "victim",
        Duration::from_secs(10),
        "victim, revoked on the new primary, refused",
    )
    .await;
    c.wait_refused(
        "ghost",
        Duration::from_secs(10),
        "ghost, lost with the old primary, refused",
    )
    .await;
}

/// A reconnect of the copy's listener (Postgres restarted, a network blip, a pooler) catches up
/// from the change log instead of reading every user again, and a change made while it was
/// down still applies: the user deactivated meanwhile is refused from the copy once it is live.
#[tokio::test]
async fn a_listener_reconnect_resumes_the_change_log_without_a_reload() {
    use nats_pg_auth::copy::CacheStats;
    let env = crate::common::TestEnv::start().await;
    env.acme().await;
    let cache = env.callout.clone().expect("service").cache().clone();
    wait_until(Duration::from_secs(10), "the copy live", || async {
        cache.is_live()
    })
    .await;
    env.wait_login("alice", "s3cret", Duration::from_secs(10), "alice")
        .await;
    let (reloads, connects) = (
        CacheStats::get(&cache.stats().reloads),
        CacheStats::get(&cache.stats().listener_connects),
    );
    // The listener's session ends and alice changes in the same breath: her notification is
    // lost with it.
    env.sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = '{}' AND datname = current_database();
         UPDATE nats.users SET active = false WHERE username = 'alice';",
        nats_pg_auth::copy::LISTENER_APPLICATION_NAME
    ))
    .await;
    wait_until(
        Duration::from_secs(10),
        "the listener back and the copy live",
        || async {
            cache.is_live() && CacheStats::get(&cache.stats().listener_connects) > connects
        },
    )
    .await;
    wait_until(Duration::from_secs(5), "alice refused", || async {
        matches!(env.connect_user("alice", "s3cret").await, Err(e) if is_auth_refusal(&e))
    })
    .await;
    assert_eq!(
        CacheStats::get(&cache.stats().reloads),
        reloads,
        "the reconnect resumed the change log instead of reloading every user"
    );
}
