//! The README's quick start cannot drift (issue 10): dev.sh's demo tenant and then every SQL
//! block of README.md, in order, run on one freshly `init`ed stack; `try-login` as the quick start
//! shows it. Fails on what a reader would see go wrong (issue 18 item 7): an error, a statement
//! that changes nothing, the quick start's tenant gone, a sync_error, nats-server refusing a JWT.

use std::process::Command;
use std::time::Duration;

use crate::common::TestEnv;

const README: &str = include_str!("../../README.md");
const DEV_SH: &str = include_str!("../../scripts/dev.sh");
const ADMIN_GUIDE: &str = include_str!("../../docs/admin-guide.md");

/// The bodies of the README's ```sql blocks.
fn sql_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = vec![];
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```sql") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.push(current.take().unwrap()),
            (Some(body), _) => {
                body.push_str(line);
                body.push('\n');
            }
            _ => {}
        }
    }
    assert!(current.is_none(), "an unterminated ```sql block");
    blocks
}

/// The demo tenant dev.sh inserts (its `psql … <<'SQL'` heredoc).
fn dev_sh_sql() -> String {
    let start = DEV_SH
        .find("<<'SQL'\n")
        .expect("dev.sh has a <<'SQL' heredoc")
        + "<<'SQL'\n".len();
    let len = DEV_SH[start..].find("\nSQL\n").expect("end of the heredoc");
    DEV_SH[start..start + len].to_owned()
}

fn try_login(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nats-pg-auth"))
        .arg("try-login")
        .args(args)
        .env("NATS_URL", env.url())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_and_every_readme_sql_block_run_on_a_fresh_stack() {
    // The server dev.sh starts: JetStream (acme hosts MQTT clients) and a WebSocket listener.
    let ws_port = crate::common::free_port();
    let env = TestEnv::start_with(crate::common::EnvOptions {
        nats_extra: format!(
            "jetstream: {{ store_dir: \"js\", max_memory_store: 268435456, max_file_store: 1073741824 }}\n\
             websocket: {{ listen: \"127.0.0.1:{ws_port}\", no_tls: true }}"
        ),
        ..Default::default()
    })
    .await;
    env.sql(&dev_sh_sql()).await;
    env.wait_synced("acme").await;
    env.wait_login("alice", "s3cret", Duration::from_secs(10), "alice logs in")
        .await;

    // The quick start's try-login lines.
    let (code, out, err) = try_login(
        &env,
        &[
            "--user",
            "alice",
            "--password",
            "s3cret",
            "--publish",
            "sensors.t1",
            "--payload",
            "21.5",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let acme = env.account_key("acme").await;
    assert!(out.contains(&acme), "names the account: {out}");
    assert!(
        out.contains("publish allow:") && out.contains("sensors.>"),
        "{out}"
    );
    assert!(out.contains("publish sensors.t1: allowed"), "{out}");
    let (code, out, err) = try_login(&env, &["--token", "demo-token", "--publish", "other.x"]);
    assert_eq!(code, Some(78), "a refused publish is exit 78: {out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("publish other.x: refused"), "{err}");
    let (code, out, err) = try_login(&env, &["--user", "alice", "--password", "wrong"]);
    assert_eq!(code, Some(77), "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // dev.sh's WebSocket line: the same row, the same account, through the other door.
    let ws = format!("ws://127.0.0.1:{ws_port}");
    let (code, out, err) = try_login(
        &env,
        &["--nats-url", &ws, "--user", "alice", "--password", "s3cret"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&acme), "over WebSocket too: {out}");

    let blocks = unique_roles(sql_blocks(README));
    assert!(blocks.len() >= 4, "found {} SQL blocks", blocks.len());
    for (i, block) in blocks.iter().enumerate() {
        run_as_a_reader(&env, &format!("README SQL block {}", i + 1), block).await;
        // The first block's tenant is on the server before the next block changes it.
        if i == 0 {
            env.wait_synced("globex").await;
        }
    }
    // The admin guide's nkey and certificate examples (user device-17), on the same stack.
    for block in sql_blocks(ADMIN_GUIDE)
        .iter()
        .filter(|b| b.contains("device-17"))
    {
        run_as_a_reader(&env, "admin guide SQL block", block).await;
    }
    // What a reader would see go wrong after running them all (issue 18 item 7).
    settled(&env).await;
    let problems: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT 'account ' || name, sync_error FROM nats.accounts WHERE sync_error IS NOT NULL
         UNION ALL SELECT 'import ' || name, sync_error FROM nats.account_imports WHERE sync_error IS NOT NULL",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(
        problems.is_empty(),
        "sync errors left by the README: {problems:?}"
    );
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "the quick start's tenant still works after the README's SQL",
    )
    .await;
    // Every client reconnects (a server restart): nats-server must not refuse a JWT the
    // README's rows made.
    let mut env = env;
    env.nats.restart(false).await;
    env.wait_login(
        "alice",
        "s3cret",
        Duration::from_secs(10),
        "after the restart",
    )
    .await;
    settled(&env).await;
    let log = env.nats.log();
    assert!(
        !log.contains("jwt validation failed") && !log.contains("validation errors"),
        "nats-server refuses a JWT made from the README's rows:\n{}",
        log.lines()
            .filter(|l| l.contains("validation"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Runs `block` statement by statement as a reader pasting it into psql would, failing on what
/// they would see go wrong: an error, or an INSERT/UPDATE that changes nothing (a silent no-op:
/// the example names a row that does not exist).
async fn run_as_a_reader(env: &TestEnv, what: &str, block: &str) {
    for statement in statements(block) {
        let done = sqlx::raw_sql(&statement)
            .execute(&env.pool)
            .await
            .unwrap_or_else(|e| panic!("{what} fails: {e}\n{statement}"));
        let verb = statement.split_whitespace().next().unwrap_or("");
        if matches!(verb.to_ascii_uppercase().as_str(), "INSERT" | "UPDATE") {
            assert!(
                done.rows_affected() > 0,
                "{what}: this statement changes no row:\n{statement}"
            );
        }
    }
}

/// The statements of a SQL block, without their `--` comments (the README's statements end a
/// line with `;`; no string in them holds `--` or `;`).
fn statements(block: &str) -> Vec<String> {
    let mut out = vec![];
    let mut current = String::new();
    for line in block.lines() {
        let code = line.split("--").next().unwrap_or("").trim_end();
        if code.trim().is_empty() {
            continue;
        }
        current.push_str(code);
        current.push('\n');
        if code.ends_with(';') {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.trim().is_empty() {
        out.push(current);
    }
    out
}

/// Nothing queued that was not tried yet, and every account pushed or failed with a reason.
async fn settled(env: &TestEnv) {
    env.wait_sql(
        // Every outbox row done, or failed with its error recorded: a row claimed and still
        // being pushed (attempts 1, no error) is not settled. (Counting only unclaimed rows let
        // a CI run under load look while an importer's re-push, queued when its exporter got
        // its keys, was still in flight, and see the import's old "no keys yet" error.)
        "SELECT NOT EXISTS (SELECT 1 FROM nats.sync_outbox WHERE last_error IS NULL)
            AND NOT EXISTS (SELECT 1 FROM nats.accounts WHERE synced_at IS NULL AND sync_error IS NULL)",
        Duration::from_secs(20),
        "every account pushed",
    )
    .await;
}

/// Roles are cluster-wide and the suite shares one cluster: the roles the README creates get a
/// suffix of this run (every whole-word use of their names, so `nats_pg_auth_service` stays).
fn unique_roles(blocks: Vec<String>) -> Vec<String> {
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let names: Vec<String> = blocks
        .iter()
        .flat_map(|b| b.split("CREATE ROLE ").skip(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|n| n.trim_end_matches(';').to_owned())
        .collect();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    blocks
        .into_iter()
        .map(|mut block| {
            for name in &names {
                let mut out = String::with_capacity(block.len());
                let mut rest = block.as_str();
                while let Some(at) = rest.find(name.as_str()) {
                    let before = rest[..at].chars().next_back();
                    let after = rest[at + name.len()..].chars().next();
                    out.push_str(&rest[..at]);
                    out.push_str(name);
                    if !before.is_some_and(word) && !after.is_some_and(word) {
                        out.push('_');
                        out.push_str(&suffix);
                    }
                    rest = &rest[at + name.len()..];
                }
                out.push_str(rest);
                block = out;
            }
            block
        })
        .collect()
}
