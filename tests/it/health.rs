//! `status` tells the truth (issue 18, items 4 and 11): it exits non-zero and names the problem
//! when a replica cannot serve (nats-server down), names each replica and the one that leads,
//! shows the imports nats-server left out (also in `account list`), and shows the build that
//! runs (also `nats_pg_auth_build_info` on /metrics).

use std::time::Duration;

use serde_json::Value;

use crate::common::{
    http_get, run_cli_async, wait_healthy, wait_until, EnvOptions, ServiceProcess, TestEnv,
};

async fn status(env: &TestEnv, json: bool) -> (Option<i32>, String, String) {
    let args: &[&str] = if json {
        &["status", "--json"]
    } else {
        &["status"]
    };
    run_cli_async(args, &env.database_url, "").await
}

fn named_a() -> EnvOptions {
    EnvOptions {
        tweak: |a| a.replica_name = Some("replica-a".into()),
        ..Default::default()
    }
}

/// With nats-server down every replica's /readyz is 503: `status` says which replica and why,
/// and exits 69 (it used to print a leader and nothing pending, and exit 0).
#[tokio::test]
async fn status_exits_69_and_names_the_replica_that_lost_nats() {
    let mut env = TestEnv::start_with(named_a()).await;
    env.acme().await;
    wait_healthy(&env.database_url).await;
    let (_, text, _) = status(&env, false).await;
    assert!(text.contains("health: ok"), "{text}");
    assert!(text.contains("replica-a  ready  live  up"), "{text}");

    env.nats.stop();
    let db = env.database_url.clone();
    wait_until(
        Duration::from_secs(15),
        "status to report nats-server down",
        || {
            let db = db.clone();
            async move { run_cli_async(&["status"], &db, "").await.0 == Some(69) }
        },
    )
    .await;
    let (code, text, err) = status(&env, false).await;
    assert_eq!(code, Some(69), "{err}");
    assert!(text.contains("health: UNHEALTHY"), "{text}");
    assert!(
        text.contains("replica replica-a not ready: callout connection to NATS is down")
            || text.contains("replica replica-a not ready: system connection to NATS is down"),
        "{text}"
    );
    assert!(text.contains("down"), "the NATS column: {text}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("unhealthy: replica replica-a not ready:") && err.contains("NATS is down"),
        "{err}"
    );
    let (code, out, _) = status(&env, true).await;
    assert_eq!(code, Some(69));
    let v: Value = serde_json::from_str(&out).expect("JSON only on stdout");
    assert_eq!(v["healthy"], false);
    assert_eq!(v["replicas"][0]["name"], "replica-a");
    assert_eq!(v["replicas"][0]["ready"], false);
    assert_eq!(v["replicas"][0]["nats_connected"], false);
}

/// Two replicas: each under its own name (`--replica-name`, else `host:pid`), the leader
/// named, and a replica stopped with SIGTERM leaves the list (it is not reported as silent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_are_named_apart_and_the_leader_is_named() {
    let env = TestEnv::start_with(named_a()).await;
    env.acme().await;
    wait_healthy(&env.database_url).await;
    let mut b = ServiceProcess::for_env(&env, "b");
    b.wait_ready(Duration::from_secs(15)).await;
    let b_name = format!(
        "{}:{}",
        nats_pg_auth::replica::host_name().expect("a host name"),
        b.pid().unwrap()
    );
    let db = env.database_url.clone();
    wait_until(Duration::from_secs(15), "both replicas to report", || {
        let db = db.clone();
        async move {
            let (code, out, _) = run_cli_async(&["status", "--json"], &db, "").await;
            code == Some(0)
                && serde_json::from_str::<Value>(&out).is_ok_and(|v| {
                    v["replicas"]
                        .as_array()
                        .is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["mode"] == "live"))
                })
        }
    })
    .await;
    let (code, out, err) = status(&env, true).await;
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let replica = |name: &str| {
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no replica {name}: {v}"))
            .clone()
    };
    // The in-process replica started first and holds the lock.
    assert_eq!(v["leader"]["replica"], "replica-a", "{v}");
    assert_eq!(replica("replica-a")["leader"], true);
    assert_eq!(replica(&b_name)["leader"], false);
    assert_eq!(replica(&b_name)["pid"], b.pid().unwrap());
    let (_, text, _) = status(&env, false).await;
    assert!(text.contains("sync leader: replica replica-a ("), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(&b_name))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("  ready  live  up    no "), "{row}");

    b.signal(rustix::process::Signal::TERM);
    assert!(b.wait_exit(Duration::from_secs(15)).await.success());
    let (code, out, err) = status(&env, true).await;
    assert_eq!(
        code,
        Some(0),
        "a replica stopped on purpose is no problem: {err}"
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["replicas"].as_array().unwrap().len(), 1, "{v}");
}

/// An import nats-server refused is left out of its account's JWT with a `sync_error`: `status`
/// and `account list` show it, and `status` exits 65 (data error).
#[tokio::test]
async fn an_import_left_out_shows_in_status_and_account_list() {
    let env = TestEnv::start().await;
    for (account, user) in [("provider", "prov"), ("consumer", "cons")] {
        env.sql(&format!(
            "INSERT INTO nats.accounts (name) VALUES ('{account}')"
        ))
        .await;
        env.add_watcher(account, user).await;
        env.wait_synced(account).await;
    }
    let stranger = nkeys::KeyPair::new_account().public_key();
    env.sql(&format!(
        "INSERT INTO nats.account_imports (account_id, name, subject, exporter_public_key, type, token)
           SELECT id, 'remote', 'feed.>', '{stranger}', 'stream', 'eyJ0eXAiOiJKV1QifQ.bad.bad'
           FROM nats.accounts WHERE name = 'consumer'"
    ))
    .await;
    env.wait_sql(
        "SELECT sync_error IS NOT NULL FROM nats.account_imports WHERE name = 'remote'",
        Duration::from_secs(20),
        "the import to be left out",
    )
    .await;
    wait_until(Duration::from_secs(15), "status to say 65", || async {
        status(&env, false).await.0 == Some(65)
    })
    .await;
    let (code, text, err) = status(&env, false).await;
    assert_eq!(code, Some(65), "{err}");
    assert!(text.contains("health: ok"), "the replicas are fine: {text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("consumer") && l.contains("remote"))
        .unwrap_or_else(|| panic!("an import row: {text}"));
    assert!(line.contains("refuses"), "{line}");
    assert!(err.contains("left out 1 import"), "{err}");
    let (_, out, _) = status(&env, true).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["import_errors"][0]["account"], "consumer");
    assert_eq!(v["import_errors"][0]["import"], "remote");

    let (code, list, err) = run_cli_async(&["account", "list"], &env.database_url, "").await;
    assert_eq!(code, Some(0), "{err}");
    let row = list
        .lines()
        .find(|l| l.starts_with("consumer"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains("import remote: "), "{row}");
    let (_, out, _) = run_cli_async(&["account", "list", "--json"], &env.database_url, "").await;
    let v: Value = serde_json::from_str(&out).unwrap();
    let consumer = v
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "consumer")
        .unwrap();
    assert_eq!(
        consumer["import_errors"][0]["import"], "remote",
        "{consumer}"
    );
}

/// `nats_pg_auth_build_info{version, git_sha}` on /metrics, and the same build in `status`
/// (for the command itself and for each replica).
#[tokio::test]
async fn build_info_is_on_metrics_and_in_status() {
    let env = TestEnv::start_with(EnvOptions {
        tweak: |a| {
            a.http_listen = "127.0.0.1:0".into();
            a.replica_name = Some("replica-a".into());
        },
        ..Default::default()
    })
    .await;
    let (_, metrics) = http_get(env.http.expect("HTTP on"), "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("nats_pg_auth_build_info{"))
        .unwrap_or_else(|| panic!("no build info: {metrics}"));
    let version = env!("CARGO_PKG_VERSION");
    let prefix = format!("nats_pg_auth_build_info{{version=\"{version}\",git_sha=\"");
    let sha = line
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix("\"} 1"))
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        sha == "unknown" || (sha.len() == 12 && sha.chars().all(|c| c.is_ascii_hexdigit())),
        "{sha}"
    );
    wait_healthy(&env.database_url).await;
    let build = format!("{version} (git {sha})");
    let (_, text, _) = status(&env, false).await;
    assert!(
        text.starts_with(&format!("nats-pg-auth {build} (this command)")),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("replica-a"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.ends_with(&build), "{row}");
    let (_, out, _) = status(&env, true).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["build"]["version"], version);
    assert_eq!(v["build"]["git_sha"], sha);
    assert_eq!(v["replicas"][0]["git_sha"], sha);
}
