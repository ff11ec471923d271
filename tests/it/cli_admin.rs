//! The noun-verb admin CLI and `explain` (issue 9, "Operate"), run as the real binary against
//! a TestEnv's database: every verb in table and `--json` form, wrong names, and `explain` for an
//! allowed login and each deny reason, checked against real logins where the server can tell.

use serde_json::Value;

use crate::common::TestEnv;

/// Runs the binary against the env's database: (exit code, stdout, stderr).
fn run(env: &TestEnv, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    crate::common::run_cli(args, Some(&env.database_url), stdin)
}

/// Succeeds and prints something.
fn ok(env: &TestEnv, args: &[&str]) -> String {
    let (code, out, err) = run(env, args, "");
    assert_eq!(code, Some(0), "{args:?}: {err}");
    out
}

/// Succeeds with JSON, and only JSON, on stdout.
fn json(env: &TestEnv, args: &[&str]) -> Value {
    let out = ok(env, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// Fails with exit 64 and one line on stderr that contains `says`, nothing on stdout.
fn refused(env: &TestEnv, args: &[&str], says: &str) {
    let (code, out, err) = run(env, args, "");
    assert_eq!(code, Some(64), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    assert!(err.contains(says), "{args:?}: {err}");
    assert!(out.is_empty(), "{args:?}: {out}");
}

fn names(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|o| o[key].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn account_role_and_user_verbs_in_table_and_json() {
    let env = TestEnv::start().await;
    env.acme().await;

    // account
    ok(
        &env,
        &["account", "create", "initech", "--max-connections", "5"],
    );
    let table = ok(&env, &["account", "list"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("NAME") && header.contains("STATE"),
        "{table}"
    );
    assert!(
        table.contains("acme") && table.contains("initech"),
        "{table}"
    );
    let list = json(&env, &["account", "list", "--json"]);
    assert_eq!(names(&list, "name"), ["acme", "initech"]);
    let show = json(&env, &["account", "show", "initech", "--json"]);
    assert_eq!(show["name"], "initech");
    assert_eq!(show["max_connections"], 5);
    assert_eq!(show["active"], true);
    let table = ok(&env, &["account", "show", "acme"]);
    assert!(
        table.starts_with("FIELD") && table.contains("public_key"),
        "{table}"
    );
    refused(&env, &["account", "show", "nope"], "no account \"nope\"");
    refused(&env, &["account", "show", "nope", "--json"], "no account");
    ok(&env, &["account", "disable", "initech"]);
    assert_eq!(
        json(&env, &["account", "show", "initech", "--json"])["active"],
        false
    );
    ok(&env, &["account", "enable", "initech"]);
    assert_eq!(
        json(&env, &["account", "show", "initech", "--json"])["active"],
        true
    );
    refused(&env, &["account", "disable", "nope"], "no account");
    refused(&env, &["account", "enable", "nope"], "no account");
    // `create` keeps add-account's checks.
    let (code, _, err) = run(&env, &["account", "create", "initech"], "");
    assert_ne!(code, Some(0));
    assert!(err.contains("already exists"), "{err}");

    // role
    let table = ok(&env, &["role", "list"]);
    assert!(
        table.lines().next().unwrap().contains("NAME") && table.contains("sensor"),
        "{table}"
    );
    let list = json(&env, &["role", "list", "--json"]);
    assert_eq!(names(&list, "name"), ["sensor"]);
    assert_eq!(list[0]["account"], "acme");
    let list = json(&env, &["role", "list", "--account", "initech", "--json"]);
    assert_eq!(list, Value::Array(vec![]));
    refused(&env, &["role", "list", "--account", "nope"], "no account");
    let show = json(&env, &["role", "show", "sensor", "--json"]);
    assert_eq!(show["publish_allow"], serde_json::json!(["sensors.>"]));
    assert_eq!(show["users"], 1);
    let table = ok(&env, &["role", "show", "sensor", "--account", "acme"]);
    assert!(table.contains("sensors.>"), "{table}");
    refused(&env, &["role", "show", "nope"], "no role \"nope\"");

    // user
    let (code, _, err) = run(
        &env,
        &[
            "user",
            "create",
            "--account",
            "initech",
            "--username",
            "peter",
            "--cost",
            "4",
        ],
        "tps-report\n",
    );
    assert_eq!(code, Some(0), "{err}");
    let table = ok(&env, &["user", "list"]);
    assert!(
        table.lines().next().unwrap().contains("USERNAME")
            && table.contains("alice")
            && table.contains("peter"),
        "{table}"
    );
    let list = json(&env, &["user", "list", "--json"]);
    assert_eq!(names(&list, "username"), ["alice", "peter"]);
    let list = json(&env, &["user", "list", "--account", "initech", "--json"]);
    assert_eq!(names(&list, "username"), ["peter"]);
    refused(&env, &["user", "list", "--account", "nope"], "no account");
    let show = json(&env, &["user", "show", "alice", "--json"]);
    assert_eq!(show["account"], "acme");
    assert_eq!(show["role"], "sensor");
    assert_eq!(show["has_password"], true);
    let table = ok(&env, &["user", "show", "alice"]);
    for text in [
        table,
        show.to_string(),
        ok(&env, &["user", "list", "--json"]),
    ] {
        assert!(!text.contains("$2"), "no password hash: {text}");
        assert!(!text.contains("password_hash"), "{text}");
    }
    refused(&env, &["user", "show", "nope"], "no user \"nope\"");
    ok(&env, &["user", "disable", "peter"]);
    assert_eq!(
        json(&env, &["user", "show", "peter", "--json"])["active"],
        false
    );
    ok(&env, &["user", "enable", "peter"]);
    assert_eq!(
        json(&env, &["user", "show", "peter", "--json"])["active"],
        true
    );
    refused(&env, &["user", "disable", "nope"], "no user");

    // No seed anywhere in what the verbs print.
    for args in [
        &["account", "list", "--json"][..],
        &["account", "show", "acme", "--json"],
        &["role", "list", "--json"],
    ] {
        let text = ok(&env, args);
        assert!(
            !text
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w.starts_with('S') && w.len() == 58),
            "{args:?}: {text}"
        );
    }

    env.wait_synced("initech").await;
    env.connect_user("peter", "tps-report")
        .await
        .expect("the created user logs in");
}

#[tokio::test]
async fn token_verbs_create_list_and_revoke() {
    let env = TestEnv::start().await;
    env.acme().await;
    let (code, token, err) = run(
        &env,
        &[
            "token",
            "create",
            "--user",
            "alice",
            "--expires-in",
            "30d",
            "--description",
            "laptop",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let token = token.trim().to_owned();
    assert!(
        token.len() >= 32 && !token.contains(char::is_whitespace),
        "{token}"
    );
    // Only the SHA-256 is stored.
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nats.user_tokens WHERE token_sha256 = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(&token)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(stored, 1);
    env.connect_token(&token)
        .await
        .expect("the new token logs in");
    // The old verb still works.
    let second = ok(&env, &["add-token", "--username", "alice"]);
    assert_ne!(second.trim(), token);

    let table = ok(&env, &["token", "list"]);
    assert!(
        table.lines().next().unwrap().starts_with("ID") && table.contains("laptop"),
        "{table}"
    );
    assert!(!table.contains(&token), "the token is never shown again");
    let list = json(&env, &["token", "list", "--user", "alice", "--json"]);
    let tokens = list.as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    let laptop = tokens
        .iter()
        .find(|t| t["description"] == "laptop")
        .unwrap();
    assert_eq!(laptop["state"], "active");
    assert!(laptop["expires_at"].is_string());
    let id = laptop["id"].as_i64().unwrap().to_string();
    refused(&env, &["token", "list", "--user", "nope"], "no user");
    refused(&env, &["token", "create", "--user", "nope"], "no user");

    ok(&env, &["token", "revoke", &id]);
    let list = json(&env, &["token", "list", "--json"]);
    let laptop = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["description"] == "laptop")
        .unwrap();
    assert_eq!(laptop["state"], "revoked");
    ok(&env, &["token", "revoke", &id]); // again: says so, still fine
    refused(&env, &["token", "revoke", "999999"], "no token 999999");
    refused(&env, &["token", "revoke", "abc"], "abc");
    assert!(
        env.connect_token(&token).await.is_err(),
        "a revoked token is refused"
    );
}

/// `explain --json --user …`: the report on stdout; exit 0 if the login would be allowed,
/// 77 if it would be refused.
fn explain(env: &TestEnv, args: &[&str]) -> Value {
    let mut all = vec!["explain", "--json", "--user"];
    all.extend_from_slice(args);
    let (code, out, err) = run(env, &all, "");
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{all:?}: not JSON ({e}): {out}"));
    let refused = v["allowed"] != true;
    assert_eq!(code, Some(if refused { 77 } else { 0 }), "{all:?}: {err}");
    v
}

fn denied(v: &Value, reason: &str) {
    assert_eq!(v["allowed"], false, "{v}");
    assert_eq!(v["deny_reason"], reason, "{v}");
    assert!(v["detail"].is_string(), "{v}");
}

#[tokio::test]
async fn explain_says_what_a_login_would_get_or_why_not() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.sql(
        "INSERT INTO nats.roles (account_id, name, publish_permissions, allowed_sources)
           SELECT id, 'office', '{office.>}', '{10.0.0.0/8}' FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.roles (account_id, name, subscribe_permissions, allowed_connection_types,
                                 allow_response, user_jwt_ttl)
           SELECT id, 'browser', '{web.>}', '{WEBSOCKET}', true, '10 minutes' FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.users (account_id, role_id, username, password_hash, publish_deny_permissions, max_payload)
           SELECT a.id, r.id, 'carol', crypt('pw', gen_salt('bf', 4)), '{office.secret}', 512
           FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id AND r.name = 'office' WHERE a.name = 'acme';
         INSERT INTO nats.users (account_id, role_id, username, password_hash)
           SELECT a.id, r.id, 'dave', crypt('pw', gen_salt('bf', 4))
           FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id AND r.name = 'browser' WHERE a.name = 'acme';
         INSERT INTO nats.users (account_id, username, password_hash, active)
           SELECT id, 'erin', crypt('pw', gen_salt('bf', 4)), false FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'frank', crypt('pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'acme';",
    )
    .await;

    // Allowed: the role's rights, where they came from, the default lifetime.
    let v = explain(&env, &["alice"]);
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["deny_reason"], Value::Null);
    assert_eq!(v["account"], "acme");
    assert_eq!(v["role"], "sensor");
    assert_eq!(v["publish"]["allow"], serde_json::json!(["sensors.>"]));
    assert_eq!(
        v["subscribe"]["allow"],
        serde_json::json!(["_INBOX.>", "sensors.>"])
    );
    assert_eq!(v["from"]["publish_allow"], "role");
    assert_eq!(v["response"], Value::Null);
    assert_eq!(v["limits"]["max_payload"], -1);
    assert_eq!(v["jwt_ttl_secs"], 3600);
    assert_eq!(v["from"]["jwt_ttl"], "default-ttl");
    env.connect_user("alice", "s3cret")
        .await
        .expect("alice logs in, as explained");
    let table = ok(&env, &["explain", "--user", "alice"]);
    assert!(
        table.contains("allowed") && table.contains("sensors.>") && table.contains("[role]"),
        "{table}"
    );

    // No role, no rights: the configured defaults.
    let v = explain(&env, &["frank"]);
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["publish"]["allow"], serde_json::json!([">"]));
    assert_eq!(v["from"]["publish_allow"], "default");
    let v = explain(
        &env,
        &["frank", "--default-publish", "a.>,b", "--max-ttl", "5m"],
    );
    assert_eq!(v["publish"]["allow"], serde_json::json!(["a.>", "b"]));
    assert_eq!(v["jwt_ttl_secs"], 300);
    assert_eq!(v["from"]["jwt_ttl"], "max-ttl (cap)");

    // User overrides merged with the role; allowed sources.
    let v = explain(&env, &["carol", "--source", "10.1.2.3"]);
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["publish"]["deny"], serde_json::json!(["office.secret"]));
    assert_eq!(v["from"]["publish_deny"], "user");
    assert_eq!(v["limits"]["max_payload"], 512);
    assert_eq!(v["from"]["max_payload"], "user");
    denied(
        &explain(&env, &["carol", "--source", "127.0.0.1"]),
        "source_not_allowed",
    );
    denied(&explain(&env, &["carol"]), "source_not_allowed");
    assert!(
        env.connect_user("carol", "pw").await.is_err(),
        "and the server refuses carol from 127.0.0.1"
    );

    // Connection types, response permission, role TTL.
    denied(&explain(&env, &["dave"]), "connection_type_not_allowed");
    assert!(env.connect_user("dave", "pw").await.is_err());
    let v = explain(&env, &["dave", "--connection-type", "websocket"]);
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["response"]["max"], 1);
    assert_eq!(v["jwt_ttl_secs"], 600);
    assert_eq!(v["from"]["jwt_ttl"], "role");

    // Inactive user, unknown user.
    denied(&explain(&env, &["erin"]), "inactive_user");
    assert!(env.connect_user("erin", "pw").await.is_err());
    denied(&explain(&env, &["ghost"]), "unknown_user");
    let (code, out, err) = run(&env, &["explain", "--user", "ghost"], "");
    assert_eq!(code, Some(77), "a refused login is exit 77: {err}");
    assert!(out.contains("unknown_user"), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("would be refused: unknown_user"), "{err}");

    // Bad values.
    refused(
        &env,
        &["explain", "--user", "alice", "--connection-type", "PIGEON"],
        "--connection-type",
    );
    refused(
        &env,
        &["explain", "--user", "alice", "--source", "not-an-ip"],
        "--source",
    );

    // Inactive account; an account the sync has not pushed yet (the service is stopped).
    ok(&env, &["account", "disable", "acme"]);
    denied(&explain(&env, &["alice"]), "inactive_account");
    ok(&env, &["account", "enable", "acme"]);
    env.stop_service().await;
    env.sql(
        "INSERT INTO nats.accounts (name) VALUES ('pending');
         INSERT INTO nats.users (account_id, username)
           SELECT id, 'gina' FROM nats.accounts WHERE name = 'pending';",
    )
    .await;
    let v = explain(&env, &["gina"]);
    denied(&v, "account_not_ready");
    assert_eq!(v["account"], "pending");
    let (code, table, err) = run(&env, &["explain", "--user", "gina"], "");
    assert_eq!(code, Some(77), "{err}");
    assert!(table.contains("denied: account_not_ready"), "{table}");
}

/// `status` names the sync leader and the backlog, as a table and as JSON; with no replica
/// running it says no one leads.
#[tokio::test]
async fn status_shows_the_leader_the_backlog_and_every_account() {
    let mut env = TestEnv::start().await;
    env.acme().await;
    env.wait_sql(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        std::time::Duration::from_secs(10),
        "a replica to lead",
    )
    .await;
    crate::common::wait_healthy(&env.database_url).await;
    let text = ok(&env, &["status"]);
    assert!(text.contains("sync leader: replica "), "{text}");
    assert!(text.contains("(nats-pg-auth sync leader, "), "{text}");
    assert!(text.contains("ACCOUNT") && text.contains("acme"), "{text}");
    assert!(text.contains("pending kick requests"), "{text}");
    let v: Value = serde_json::from_str(&ok(&env, &["status", "--json"])).expect("JSON only");
    assert_eq!(v["leader"]["application_name"], "nats-pg-auth sync leader");
    assert!(v["outbox"]["pending"].is_i64(), "{v}");
    assert!(v["kicks_pending"].is_i64(), "{v}");
    let accounts = v["accounts"].as_array().unwrap();
    let acme = accounts.iter().find(|a| a["name"] == "acme").expect("acme");
    assert_eq!(acme["active"], true);
    assert!(acme["synced_at"].is_string(), "{acme}");

    env.stop_service().await;
    env.sql("UPDATE nats.accounts SET max_connections = 7 WHERE name = 'acme'")
        .await;
    // No replica runs: the report is printed, and the exit code says unavailable (69).
    let (code, out, err) = run(&env, &["status", "--json"], "");
    assert_eq!(code, Some(69), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["leader"].is_null(), "{v}");
    assert!(v["outbox"]["pending"].as_i64().unwrap() >= 1, "{v}");
    assert!(v["outbox"]["oldest_age_seconds"].as_f64().is_some(), "{v}");
    let (code, text, err) = run(&env, &["status"], "");
    assert_eq!(code, Some(69), "{err}");
    assert!(text.contains("sync leader: none"), "{text}");
    assert!(err.contains("no replica reports"), "{err}");
}

/// Fails with `code` and one line on stderr that contains each of `says` and shows no
/// password hash (bcrypt's `$2`) or Postgres DETAIL (which holds the whole row).
fn fails_with(env_url: &str, args: &[&str], stdin: &str, code: i32, says: &[&str]) {
    let (got, _, err) = crate::common::run_cli(args, Some(env_url), stdin);
    assert_eq!(got, Some(code), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    for s in says {
        assert!(err.contains(s), "{args:?}: says {s:?}: {err}");
    }
    assert!(!err.contains("$2"), "{args:?}: no password hash: {err}");
    assert!(!err.contains("Failing row"), "{args:?}: no row: {err}");
    assert!(
        !err.contains("violates"),
        "{args:?}: not Postgres's raw words: {err}"
    );
}

/// Issue 18 items 2 and 3: refused input is exit 65 (EX_DATAERR) and configuration exit 64,
/// each with one line that says what is wrong and what to do; never 70 (a bug), never the row.
#[tokio::test]
async fn refused_input_and_configuration_say_what_is_wrong_with_their_exit_code() {
    let env = TestEnv::start().await;
    env.acme().await;
    let url = env.database_url.as_str();

    // A name that exists: 65.
    fails_with(
        url,
        &["account", "create", "acme"],
        "",
        65,
        &["account acme already exists"],
    );
    fails_with(
        url,
        &["user", "create", "--account", "acme", "--username", "alice"],
        "pw\n",
        65,
        &["a user with that username already exists"],
    );
    // A value a constraint forbids: what is allowed, not the row (with its hash).
    fails_with(
        url,
        &["user", "create", "--account", "acme", "--username", "a b"],
        "pw\n",
        65,
        &["username_not_blank", "without spaces"],
    );
    // No password on stdin: usage, and how to give one.
    fails_with(
        url,
        &["user", "create", "--account", "acme", "--username", "bob"],
        "",
        64,
        &["no password on standard input", "printf"],
    );

    // A database without the schema: run `migrate`.
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let empty = format!("{db}_empty");
    sqlx::raw_sql(&format!("CREATE DATABASE {empty}"))
        .execute(&env.pool)
        .await
        .unwrap();
    let empty_url = format!("{}/{empty}", url.rsplit_once('/').unwrap().0);
    for args in [&["account", "list"][..], &["account", "create", "x"][..]] {
        fails_with(
            &empty_url,
            args,
            "",
            64,
            &["no nats schema", "nats-pg-auth migrate"],
        );
    }
    sqlx::raw_sql(&format!("DROP DATABASE {empty}"))
        .execute(&env.pool)
        .await
        .unwrap();
    // Not a Postgres URL: said up front, not tried as Postgres.
    fails_with(
        "mysql://root@127.0.0.1:1/db",
        &["account", "list"],
        "",
        64,
        &["must be a Postgres URL"],
    );

    // Missing credentials name every way to give them.
    fails_with(
        url,
        &["explain"],
        "",
        64,
        &["--user", "--nkey", "--certificate"],
    );
    fails_with(
        url,
        &["try-login"],
        "",
        64,
        &["--user", "--password", "--token"],
    );
}
