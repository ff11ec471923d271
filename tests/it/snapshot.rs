//! Issue 17 (1): a replica that restarts while Postgres is unreachable answers from its sealed
//! snapshot of the login copy (`--snapshot-dir`), as the copy would, and nothing else does.

use std::path::Path;
use std::time::Duration;

use async_nats::ConnectOptions;
use base64::Engine as _;
use nkeys::KeyPair;

use crate::common::{
    client_options, http_get, is_auth_refusal, user_info, wait_until, DbOutage, EnvOptions,
    ServiceProcess, TestEnv,
};

const KEY: [u8; 32] = [7; 32];

fn b64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// acme with: alice (password), bob (password, a token, a revoked token), carol (inactive),
/// device-1 (nkey).
async fn tenants(env: &TestEnv, device: &KeyPair) {
    env.acme().await;
    env.sql(&format!(
        "INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
           SELECT id, 'ops', '{{ops.>,$SYS.REQ.USER.INFO}}', '{{_INBOX.>}}' FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.users (account_id, role_id, username, password_hash, active, nkey)
           SELECT a.id, r.id, u.name, crypt('pw', gen_salt('bf', 4)), u.active, u.nkey
           FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id AND r.name = 'ops',
                (VALUES ('bob', true, NULL), ('carol', false, NULL), ('device-1', true, '{}'))
                  AS u(name, active, nkey)
           WHERE a.name = 'acme';
         INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('bobs-token', 'sha256') FROM nats.users WHERE username = 'bob';
         INSERT INTO nats.user_tokens (user_id, token_sha256, revoked_at)
           SELECT id, digest('revoked-token', 'sha256'), now() FROM nats.users WHERE username = 'bob';",
        device.public_key()
    ))
    .await;
}

fn replica(env: &TestEnv, name: &str, key: Option<&[u8; 32]>, dir: &Path) -> ServiceProcess {
    let dir = dir.display().to_string();
    let key = key.map(b64);
    let mut vars = vec![("NATS_PG_AUTH_SNAPSHOT_DIR", dir.as_str())];
    if let Some(k) = &key {
        vars.push(("NATS_PG_AUTH_ENCRYPTION_KEY", k.as_str()));
    }
    ServiceProcess::for_env_with(env, name, &vars)
}

async fn wait_log(p: &ServiceProcess, what: &'static str, deadline: Duration) {
    wait_until(
        deadline,
        &format!("{}: {what:?} in its log", p.name),
        || {
            let log = p.log();
            async move { log.contains(what) }
        },
    )
    .await;
}

/// The value of an unlabelled gauge on the replica's /metrics.
async fn metric(p: &ServiceProcess, name: &str) -> u64 {
    let (_, body) = http_get(p.http, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics of {}", p.name))
}

async fn login(env: &TestEnv, opts: ConnectOptions) -> Result<(), async_nats::ConnectError> {
    client_options(opts).connect(env.url()).await.map(|_| ())
}

fn password(user: &str, pass: &str) -> ConnectOptions {
    ConnectOptions::with_user_and_password(user.into(), pass.into())
}

#[tokio::test]
async fn replicas_restarted_during_an_outage_answer_from_their_snapshots() {
    let mut env = TestEnv::start_with(EnvOptions {
        encryption_key: Some(KEY),
        ..Default::default()
    })
    .await;
    let device = KeyPair::new_user();
    tenants(&env, &device).await;
    // Only the two replicas answer logins in this test.
    env.stop_service().await;
    let dirs = [env.dir.path().join("snap-a"), env.dir.path().join("snap-b")];
    let mut replicas = [
        replica(&env, "a", Some(&KEY), &dirs[0]),
        replica(&env, "b", Some(&KEY), &dirs[1]),
    ];
    for r in &replicas {
        wait_log(
            r,
            "wrote the login copy's snapshot",
            Duration::from_secs(20),
        )
        .await;
        let stamp = metric(r, "nats_pg_auth_copy_snapshot_timestamp_seconds").await;
        assert!(stamp > 1_700_000_000, "{}: {stamp}", r.name);
    }

    // This nats-server runs no JetStream: the sync leader says so once and keeps the directory.
    let no_jetstream = "JetStream is not available for the login copy's snapshot";
    wait_until(
        Duration::from_secs(10),
        "the leader to say JetStream is not available",
        || {
            let said = replicas.iter().any(|r| r.log().contains(no_jetstream));
            async move { said }
        },
    )
    .await;

    let outage = DbOutage::begin(&env).await;
    for r in &mut replicas {
        r.kill();
        r.restart();
    }
    for r in &replicas {
        wait_log(
            r,
            "answering from a snapshot taken",
            Duration::from_secs(15),
        )
        .await;
        r.wait_ready(Duration::from_secs(10)).await;
        let body = r.readyz().await.expect("ready from the snapshot");
        assert!(
            body.contains("mode: outage, from snapshot taken"),
            "{}: {body}",
            r.name
        );
        assert_eq!(metric(r, "nats_pg_auth_copy_from_snapshot").await, 1);
    }
    // Known users log in, with every kind of credential.
    wait_until(
        Duration::from_secs(5),
        "alice logs in from a snapshot",
        || {
            let env = &env;
            async move { login(env, password("alice", "s3cret")).await.is_ok() }
        },
    )
    .await;
    // With the outage rules: JWT lifetime capped by --db-outage-ttl (5m), not the role's 1h.
    let bob = client_options(password("bob", "pw"))
        .connect(env.url())
        .await
        .expect("bob's password");
    let info = user_info(&bob).await;
    let expires_ns = info["expires"].as_i64().expect("the JWT expires");
    assert!(
        expires_ns > 0 && expires_ns <= 300_000_000_000,
        "JWT lifetime capped by --db-outage-ttl: {expires_ns} ns"
    );
    login(&env, ConnectOptions::with_token("bobs-token".into()))
        .await
        .expect("bob's token");
    login(&env, ConnectOptions::with_nkey(device.seed().unwrap()))
        .await
        .expect("device-1's nkey");
    // Nothing the copy refused before the outage gets in from the snapshot.
    for (what, opts) in [
        ("unknown user", password("mallory", "pw")),
        ("wrong password", password("bob", "not-pw")),
        ("inactive user", password("carol", "pw")),
        (
            "revoked token",
            ConnectOptions::with_token("revoked-token".into()),
        ),
        (
            "unknown nkey",
            ConnectOptions::with_nkey(KeyPair::new_user().seed().unwrap()),
        ),
    ] {
        let err = login(&env, opts).await.expect_err(what);
        assert!(is_auth_refusal(&err), "{what}: {err}");
    }

    let said: usize = replicas
        .iter()
        .map(|r| r.log().matches(no_jetstream).count())
        .sum();
    assert_eq!(
        said, 1,
        "said once, by the leader (no one leads during the outage)"
    );
    // Postgres back: both leave outage mode, and a change made now takes effect.
    outage.end().await;
    for r in &replicas {
        wait_until(
            Duration::from_secs(20),
            &format!("{} live again", r.name),
            || async { r.readyz().await.is_ok_and(|b| b.contains("mode: live")) },
        )
        .await;
        assert!(
            r.log().contains("leaving outage mode"),
            "{}:\n{}",
            r.name,
            r.log()
        );
        assert_eq!(metric(r, "nats_pg_auth_copy_from_snapshot").await, 0);
    }
    env.sql("UPDATE nats.users SET password_hash = crypt('pw2', gen_salt('bf', 4)) WHERE username = 'bob'")
        .await;
    wait_until(Duration::from_secs(5), "bob's new password works", || {
        let env = &env;
        async move { login(env, password("bob", "pw2")).await.is_ok() }
    })
    .await;
    let err = login(&env, password("bob", "pw"))
        .await
        .expect_err("the old password no longer works");
    assert!(is_auth_refusal(&err), "{err}");
}

#[tokio::test]
async fn an_altered_or_foreign_snapshot_is_refused_and_the_replica_answers_nothing() {
    let mut env = TestEnv::start_with(EnvOptions {
        encryption_key: Some(KEY),
        ..Default::default()
    })
    .await;
    tenants(&env, &KeyPair::new_user()).await;
    env.stop_service().await;
    let sealed = env.dir.path().join("sealed");
    let mut a = replica(&env, "a", Some(&KEY), &sealed);
    wait_log(
        &a,
        "wrote the login copy's snapshot",
        Duration::from_secs(20),
    )
    .await;
    let path = sealed.join(nats_pg_auth::copy::snapshot::FILE_NAME);
    let good = std::fs::read(&path).unwrap();

    let outage = DbOutage::begin(&env).await;
    a.kill();
    // One bit of the body flipped: refused, said once, and the replica answers nothing (it
    // waits for Postgres, as without a snapshot).
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    a.restart();
    wait_log(&a, "login copy snapshot refused", Duration::from_secs(15)).await;
    wait_log(&a, "answers no logins until", Duration::from_secs(5)).await;
    let err = login(&env, password("alice", "s3cret"))
        .await
        .expect_err("nothing answers from an altered snapshot");
    assert!(is_auth_refusal(&err), "{err}");
    assert!(a.readyz().await.is_err());
    let log = a.log();
    assert_eq!(
        log.matches("login copy snapshot refused").count(),
        1,
        "said once, not once per retry:\n{log}"
    );
    assert!(!log.contains("answering from a snapshot"), "{log}");
    a.kill();

    // The intact file, but another key: refused the same way.
    std::fs::write(&path, &good).unwrap();
    let other = replica(&env, "other-key", Some(&[8; 32]), &sealed);
    wait_log(
        &other,
        "login copy snapshot refused",
        Duration::from_secs(15),
    )
    .await;
    let err = login(&env, password("alice", "s3cret"))
        .await
        .expect_err("nothing answers from a snapshot of another key");
    assert!(is_auth_refusal(&err), "{err}");
    drop(other);
    outage.end().await;
}

/// Without an encryption key the seeds would be on disk in plain text: no snapshot, said once.
#[tokio::test]
async fn a_replica_without_an_encryption_key_writes_no_snapshot() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.stop_service().await;
    let dir = env.dir.path().join("snap");
    let r = replica(&env, "keyless", None, &dir);
    wait_log(
        &r,
        "no snapshot of the login copy is written",
        Duration::from_secs(20),
    )
    .await;
    r.wait_ready(Duration::from_secs(10)).await;
    login(&env, password("alice", "s3cret"))
        .await
        .expect("it serves");
    assert!(
        !dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none(),
        "nothing written"
    );
    assert_eq!(
        r.log()
            .matches("no snapshot of the login copy is written")
            .count(),
        1
    );
}

/// The "pod moved to another node" case (issue 17): a 3-server cluster with JetStream and a
/// replica beside each server, none with a local snapshot directory. Postgres goes away; one
/// server and its replica are SIGKILLed and start again on a new, empty data directory
/// (resolver and JetStream store gone). The replica finds the snapshot the sync leader keeps in
/// JetStream and answers logins through its server alone (the other replicas are killed
/// first), with the snapshot's refusals; when Postgres is back it leaves outage mode.
#[tokio::test]
async fn a_replica_moved_to_a_new_node_answers_from_the_snapshot_in_jetstream() {
    use crate::common::{fresh_database, run_cli, NatsCluster};
    let database_url = fresh_database().await;
    let pool = nats_pg_auth::db::connect(&database_url, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = b64(&KEY);
    let mut cluster = NatsCluster::start_with(
        dir.path(),
        3,
        "jetstream {\n  store_dir: \"js\"\n}",
        |i, resolver_dir, out| {
            let verb: &[&str] = if i == 0 {
                &["init", "--operator-name", "moved"]
            } else {
                &["export-config"]
            };
            let mut args = verb.to_vec();
            args.extend([
                "--encryption-key",
                &key,
                "--resolver-dir",
                resolver_dir.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]);
            let (code, _, err) = run_cli(&args, Some(&database_url), "");
            assert_eq!(code, Some(0), "{verb:?}: {err}");
        },
    )
    .await;
    // The JetStream meta group has a leader (the bucket can be created).
    wait_until(
        Duration::from_secs(20),
        "a JetStream metadata leader",
        || {
            let logs: Vec<String> = cluster.servers.iter().map(|s| s.log()).collect();
            async move {
                logs.iter().any(|l| {
                    l.contains("new JetStream cluster metadata leader")
                        || l.contains("cluster new metadata leader")
                })
            }
        },
    )
    .await;
    sqlx::raw_sql(
        "INSERT INTO nats.accounts (name) VALUES ('acme');
         INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
           SELECT id, 'ops', '{ops.>}', '{_INBOX.>}' FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.users (account_id, role_id, username, password_hash)
           SELECT a.id, r.id, u.name, crypt('pw', gen_salt('bf', 4))
           FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id,
                (VALUES ('alice'), ('bob')) AS u(name);
         INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('bobs-token', 'sha256') FROM nats.users WHERE username = 'bob';
         INSERT INTO nats.user_tokens (user_id, token_sha256, revoked_at)
           SELECT id, digest('revoked-token', 'sha256'), now() FROM nats.users WHERE username = 'bob';",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut replicas: Vec<ServiceProcess> = cluster
        .servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            ServiceProcess::start(
                &format!("replica{i}"),
                dir.path(),
                &database_url,
                &s.url(),
                &[
                    "--encryption-key",
                    &key,
                    "--db-pool-size",
                    "6",
                    "--callout-concurrency",
                    "4",
                ],
            )
        })
        .collect();
    let moved = cluster.servers[2].url();
    let login_via = |opts: ConnectOptions| {
        let url = moved.clone();
        async move { client_options(opts).connect(url).await.map(|_| ()) }
    };
    wait_until(
        Duration::from_secs(20),
        "alice logs in through the third server",
        || async { login_via(password("alice", "pw")).await.is_ok() },
    )
    .await;
    // The first snapshot was taken before the sync made acme's keys, and a change is written
    // at most every 30 s: the replicas start again (Postgres up), so the new leader writes one
    // after its full load.
    for r in &mut replicas {
        r.kill();
    }
    let logged: Vec<usize> = replicas.iter().map(|r| r.log().len()).collect();
    for r in &mut replicas {
        r.restart();
    }
    wait_until(
        Duration::from_secs(20),
        "the new sync leader's snapshot in JetStream",
        || {
            let fresh = replicas.iter().zip(&logged).any(|(r, n)| {
                r.log()[*n..].contains("wrote the login copy's snapshot to JetStream")
            });
            async move { fresh }
        },
    )
    .await;

    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    let outage = DbOutage::begin_on(db).await;
    // The pod moves: its server and replica die, the server comes back on empty disks.
    replicas[2].kill();
    let server = &mut cluster.servers[2];
    server.stop();
    std::fs::remove_dir_all(server.dir.join("js")).unwrap();
    server.restart(true).await;
    replicas[2].restart();
    wait_log(
        &replicas[2],
        "answering from a snapshot taken",
        Duration::from_secs(20),
    )
    .await;
    replicas[2].wait_ready(Duration::from_secs(10)).await;
    let body = replicas[2].readyz().await.expect("ready from the snapshot");
    assert!(body.contains("mode: outage, from snapshot taken"), "{body}");
    // Only the moved replica answers from here on.
    replicas[0].kill();
    replicas[1].kill();

    wait_until(
        Duration::from_secs(15),
        "alice logs in through the moved server",
        || async { login_via(password("alice", "pw")).await.is_ok() },
    )
    .await;
    login_via(ConnectOptions::with_token("bobs-token".into()))
        .await
        .expect("bob's token");
    for (what, opts) in [
        ("unknown user", password("mallory", "pw")),
        ("wrong password", password("bob", "not-pw")),
        (
            "token revoked before the snapshot",
            ConnectOptions::with_token("revoked-token".into()),
        ),
    ] {
        let err = login_via(opts).await.expect_err(what);
        assert!(is_auth_refusal(&err), "{what}: {err}");
    }

    outage.end().await;
    wait_until(
        Duration::from_secs(20),
        "the moved replica live again",
        || async {
            replicas[2]
                .readyz()
                .await
                .is_ok_and(|b| b.contains("mode: live"))
        },
    )
    .await;
}
