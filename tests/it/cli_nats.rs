//! The NATS-side views of the CLI (issue 18 items 8–10), run as the real binary against a real
//! nats-server: `connections` (CONNZ of every server, through the system user), `export-context`
//! (a `nats` CLI context whose credential works), `try-login --nkey-seed-file` and a token login
//! named by its user, in `try-login`'s report and in the `serve` log.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use async_nats::ConnectOptions;
use serde_json::Value;

use crate::common::{
    client_options, free_port, wait_until, DbOutage, EnvOptions, NatsServer, ServiceProcess,
    TestEnv,
};

fn run(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    crate::common::run_cli(args, Some(&env.database_url), "")
}

fn ok(env: &TestEnv, args: &[&str]) -> String {
    let (code, out, err) = run(env, args);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    out
}

/// `connections --json` with extra flags.
fn connections(env: &TestEnv, extra: &[&str]) -> Vec<Value> {
    let url = env.url();
    let mut args = vec![
        "connections",
        "--nats-url",
        url.as_str(),
        "--json",
        "--timeout",
        "5s",
    ];
    args.extend_from_slice(extra);
    let out = ok(env, &args);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    v.as_array().expect("a JSON array").clone()
}

fn of_user<'a>(rows: &'a [Value], user: &str) -> Vec<&'a Value> {
    rows.iter().filter(|r| r["user"] == user).collect()
}

// Multi-threaded: the in-process service must answer logins while the test thread waits for
// the CLI process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_lists_every_live_connection_with_user_account_door_and_outage_mark() {
    let (ws, leaf) = (free_port(), free_port());
    let env = TestEnv::start_with(EnvOptions {
        nats_extra: format!(
            "websocket {{\n  listen: \"127.0.0.1:{ws}\"\n  no_tls: true\n}}\n\
             leafnodes {{ listen: \"127.0.0.1:{leaf}\" }}\n"
        ),
        ..Default::default()
    })
    .await;
    env.acme().await;
    env.add_watcher("acme", "bob").await;

    let _tcp = env
        .connect_user("alice", "s3cret")
        .await
        .expect("alice over TCP");
    let _ws = client_options(ConnectOptions::with_user_and_password(
        "alice".into(),
        "s3cret".into(),
    ))
    .connect(format!("ws://127.0.0.1:{ws}"))
    .await
    .expect("alice over WebSocket");
    // A leaf node server whose remote logs in as alice.
    let leaf_port = free_port();
    let _leaf_server = NatsServer::start_plain(
        leaf_port,
        &env.dir.path().join("leaf"),
        &format!(
            "server_name: edge\nlisten: 127.0.0.1:{leaf_port}\n\
             leafnodes {{ reconnect: \"250ms\", remotes = [ {{ url: \"nats-leaf://alice:s3cret@127.0.0.1:{leaf}\" }} ] }}\n"
        ),
    )
    .await;
    let sys = env.system_client().await;
    wait_until(Duration::from_secs(10), "the leaf node to join", || {
        let sys = sys.clone();
        async move {
            let Ok(r) = sys.request("$SYS.REQ.SERVER.PING.LEAFZ", "{}".into()).await else {
                return false;
            };
            let v: Value = serde_json::from_slice(&r.payload).unwrap_or_default();
            v["data"]["leafs"].as_array().is_some_and(|l| !l.is_empty())
        }
    })
    .await;
    // Bob logs in while Postgres is away: from the copy, and his JWT says so.
    let outage = DbOutage::begin(&env).await;
    // Once the service knows Postgres is away, logins come from the copy (before, the copy
    // still counts as current and its answers as live ones).
    let cache = env
        .callout
        .as_ref()
        .expect("in-process service")
        .cache()
        .clone();
    wait_until(
        Duration::from_secs(10),
        "the copy to stop being current",
        || {
            let cache = cache.clone();
            async move { !cache.is_live() }
        },
    )
    .await;
    let _bob = env
        .connect_user("bob", "pw")
        .await
        .expect("bob from the copy");
    outage.end().await;

    let all = connections(&env, &[]);
    // Alice three times: TCP, WebSocket and the leaf node (CONNZ lists leaf connections too).
    let alice = of_user(&all, "alice");
    let mut doors: Vec<&str> = alice.iter().map(|r| r["door"].as_str().unwrap()).collect();
    doors.sort();
    assert_eq!(doors, ["leaf", "tcp", "ws"], "{alice:?}");
    for r in &alice {
        assert_eq!(r["account"], "acme", "{r}");
        assert!(
            r["account_public_key"].as_str().unwrap().starts_with('A'),
            "{r}"
        );
        assert!(r["server"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
        assert!(
            r["since"].as_str().is_some_and(|s| s.starts_with("20")),
            "{r}"
        );
        assert_eq!(r["outage_copy"], false, "{r}");
    }
    let bob = of_user(&all, "bob");
    assert_eq!(bob.len(), 1, "{all:?}");
    assert_eq!(bob[0]["outage_copy"], true, "{all:?}");
    let leaf = alice.iter().find(|r| r["door"] == "leaf").unwrap();
    assert_eq!(
        leaf["client_name"], "edge",
        "the leaf server's name: {leaf}"
    );
    // The service's own connections show under their account's name too.
    assert!(all.iter().any(|r| r["account"] == "AUTH"), "{all:?}");

    // Filters.
    let only_bob = connections(&env, &["--user", "bob"]);
    assert_eq!(only_bob.len(), 1, "{only_bob:?}");
    let acme = connections(&env, &["--account", "acme"]);
    assert_eq!(acme.len(), 4, "alice three times and bob: {acme:?}");
    assert!(acme.iter().all(|r| r["account"] == "acme"));
    let (code, out, err) = run(
        &env,
        &["connections", "--nats-url", &env.url(), "--account", "nope"],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("no account \"nope\"") && out.is_empty(),
        "{err}"
    );

    // The table.
    let table = ok(
        &env,
        &["connections", "--nats-url", &env.url(), "--account", "acme"],
    );
    let header = table.lines().next().unwrap();
    for h in ["USER", "ACCOUNT", "DOOR", "SERVER", "SINCE", "OUTAGE COPY"] {
        assert!(header.contains(h), "{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("bob") && l.trim_end().ends_with("yes")),
        "{table}"
    );

    // nats-server away: exit 69.
    let (code, _, err) = run(
        &env,
        &[
            "connections",
            "--nats-url",
            &format!("nats://127.0.0.1:{}", free_port()),
        ],
    );
    assert_eq!(code, Some(69), "{err}");
}

// Multi-threaded: the in-process service must answer logins while the test thread waits for
// the CLI process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_context_writes_a_private_nats_context_whose_credential_works() {
    let env = TestEnv::start().await;
    env.acme().await;
    let _alice = env.connect_user("alice", "s3cret").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctx_dir = dir.path().join("nats").join("context");
    let (code, out, err) = run(
        &env,
        &[
            "export-context",
            "--name",
            "ops",
            "--nats-url",
            &env.url(),
            "--ttl",
            "10m",
            "--dir",
            ctx_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("nats --context ops server report connections"),
        "{err}"
    );
    let context_file = ctx_dir.join("ops.json");
    let creds_file = ctx_dir.join("ops.creds");
    for f in [&context_file, &creds_file] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let context: Value = serde_json::from_slice(&std::fs::read(&context_file).unwrap()).unwrap();
    assert_eq!(context["url"], env.url());
    assert_eq!(context["creds"], creds_file.to_str().unwrap());
    let creds = std::fs::read_to_string(&creds_file).unwrap();
    assert!(
        creds.contains("-----BEGIN NATS USER JWT-----")
            && creds.contains("-----BEGIN USER NKEY SEED-----")
    );

    // The credential is a system user that expires: it sees every connection.
    let sys = ConnectOptions::with_credentials_file(&creds_file)
        .await
        .expect("a .creds file the client reads")
        .connect(env.url())
        .await
        .expect("the exported credential logs in");
    let reply = sys
        .request("$SYS.REQ.SERVER.PING.CONNZ", r#"{"auth":true}"#.into())
        .await
        .expect("CONNZ as the system user");
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    let users: Vec<&str> = v["data"]["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["authorized_user"].as_str())
        .collect();
    assert!(users.contains(&"alice"), "{v}");
    let info = crate::common::user_info(&sys).await;
    let expires_ns = info["expires"].as_i64().unwrap_or_default();
    assert!(
        expires_ns > 0 && expires_ns <= 600_000_000_000,
        "expires within --ttl: {info}"
    );

    // Running it again replaces the files, still private, even when one was made readable.
    std::fs::set_permissions(&creds_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    ok(
        &env,
        &[
            "export-context",
            "--name",
            "ops",
            "--nats-url",
            &env.url(),
            "--dir",
            ctx_dir.to_str().unwrap(),
        ],
    );
    let mode = std::fs::metadata(&creds_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (code, _, err) = run(
        &env,
        &[
            "export-context",
            "--name",
            "../x",
            "--dir",
            ctx_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(64), "{err}");
}

// Multi-threaded: the in-process service must answer logins while the test thread waits for
// the CLI process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_login_by_nkey_seed_file_and_by_token_names_the_user() {
    let env = TestEnv::start().await;
    env.acme().await;
    // No role: the default rights (`>`), so USER.INFO answers and names the user.
    env.add_watcher("acme", "carol").await;
    let key = nkeys::KeyPair::new_user();
    env.sql(&format!(
        "UPDATE nats.users SET nkey = '{}' WHERE username = 'carol'",
        key.public_key()
    ))
    .await;
    env.sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, sha256(convert_to('carols-token', 'UTF8')) FROM nats.users WHERE username = 'carol'",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("carol.nk");
    std::fs::write(&seed_file, format!("{}\n", key.seed().unwrap())).unwrap();

    let url = env.url();
    let out = ok(
        &env,
        &[
            "try-login",
            "--nats-url",
            &url,
            "--nkey-seed-file",
            seed_file.to_str().unwrap(),
        ],
    );
    assert!(out.starts_with("logged in as user \"carol\""), "{out}");
    assert!(out.contains("account:"), "{out}");
    let out = ok(
        &env,
        &["try-login", "--nats-url", &url, "--token", "carols-token"],
    );
    assert!(
        out.starts_with("logged in as user \"carol\" (token)"),
        "{out}"
    );
    assert!(!out.contains("as the token"), "{out}");

    // An nkey nobody has: refused (77); a file without a seed: a usage error (64).
    let stranger = dir.path().join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let (code, _, err) = run(
        &env,
        &[
            "try-login",
            "--nats-url",
            &url,
            "--nkey-seed-file",
            stranger.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(77), "{err}");
    let empty = dir.path().join("empty.nk");
    std::fs::write(&empty, "nothing here\n").unwrap();
    let (code, _, err) = run(
        &env,
        &[
            "try-login",
            "--nats-url",
            &url,
            "--nkey-seed-file",
            empty.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("no user nkey seed"), "{err}");
    let (code, _, err) = run(&env, &["try-login", "--nats-url", &url]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--nkey-seed-file"), "{err}");
}

/// A refused token login names the token's user in the `serve` log line (it said `user=""`).
// Multi-threaded: the in-process service must answer logins while the test thread waits for
// the CLI process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_login_logs_the_tokens_user() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256, revoked_at)
           SELECT id, sha256(convert_to('old-token', 'UTF8')), now() FROM nats.users WHERE username = 'alice'",
    )
    .await;
    // Only the real binary answers (its log is the one checked).
    env.stop_service().await;
    let serve = ServiceProcess::for_env(&env, "serve");
    serve.wait_ready(Duration::from_secs(20)).await;
    assert!(env.connect_token("old-token").await.is_err());
    wait_until(Duration::from_secs(10), "the denial in the log", || {
        let log = serve.log();
        async move { log.contains("token_revoked") }
    })
    .await;
    let log = strip_colours(&serve.log());
    let line = log.lines().find(|l| l.contains("token_revoked")).unwrap();
    assert!(
        line.contains("user=\"alice\"") || line.contains("user=alice"),
        "{line}"
    );
    env.connect_token("no-such-token").await.unwrap_err();
}

/// The log without its ANSI colour sequences (`ESC [ … m`).
fn strip_colours(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
