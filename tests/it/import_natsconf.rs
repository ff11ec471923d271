//! `nats-pg-auth import nats-conf` (issue 16): a config-mode deployment moves to the callout and
//! every client keeps its credentials and its rights.
//!
//! The fixture follows nats-server's configuration documentation: two accounts, a bcrypt and
//! plain-text passwords (one through a `$VARIABLE`), allow/deny permissions, a response
//! permission, a private service export with its import, an `include`d file, size suffixes. The
//! same checks run against nats-server on that file, then against the operator-mode server with
//! the callout after the import.

use std::path::Path;

use async_nats::{Client, ConnectOptions, Event};
use tokio::sync::mpsc;

use crate::common::imports::*;
use crate::common::*;

const ALICE_PW: &str = "alice-Secret-1";
const ANN_PW: &str = "ann-plain-pw";
const BOB_PW: &str = "bob-plain-pw";

/// Writes the fixture (nats.conf + b.conf) into `dir`; `listen` is the old server's port line.
fn write_fixture(dir: &Path, port: u16, device: &nkeys::KeyPair) {
    let device_key = device.public_key();
    // A hash as `nats server passwd` writes it (cost 4 keeps the test fast; any 4..14 works).
    let alice_hash = bcrypt::hash(ALICE_PW, 4).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("nats.conf"),
        format!(
            r#"listen: 127.0.0.1:{port}
# plain-text password, through a variable
ANN_PW = "{ANN_PW}"

accounts {{
  A: {{
    limits {{ max_connections: 50 }}
    jetstream {{ max_mem: 64MB, max_file: 1GB }}
    users: [
      {{
        user: alice
        password: "{alice_hash}"
        permissions: {{
          publish: {{ allow: ["a.>"], deny: ["a.secret"] }}
          subscribe: ["svc.>", "a.>"]
          allow_responses: true
        }}
      }},
      {{ user: ann, password: $ANN_PW }}   // no permissions: everything
      {{ nkey: {device_key}, permissions: {{ publish: ["a.device.>", "_INBOX.>"], subscribe: "_INBOX.>" }} }}
    ]
    exports = [
      {{ service: "svc.echo", accounts: [B] }}
    ]
  }}
  include 'b.conf'
}}
"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("b.conf"),
        format!(
            r#"B {{
  users = [
    {{ user: bob, password: "{BOB_PW}",
       permissions {{
         publish = "echo"
         subscribe {{ allow: ["_INBOX.>", "b.>"], deny: "b.hidden" }}
       }} }}
  ]
  imports [
    {{ service: {{ account: A, subject: "svc.echo" }}, to: echo }}
  ]
}}
"#
        ),
    )
    .unwrap();
}

async fn connect(
    url: &str,
    opts: ConnectOptions,
) -> Result<(Client, mpsc::UnboundedReceiver<Event>), async_nats::ConnectError> {
    let (opts, rx) = with_events(client_options(opts));
    Ok((opts.connect(url).await?, rx))
}

async fn user(url: &str, name: &str, pw: &str) -> (Client, mpsc::UnboundedReceiver<Event>) {
    connect(
        url,
        ConnectOptions::with_user_and_password(name.into(), pw.into()),
    )
    .await
    .unwrap_or_else(|e| panic!("{name} logs in at {url}: {e}"))
}

/// The fixture's rights, as its clients see them.
async fn same_rights(url: &str, what: &str, device: &nkeys::KeyPair) {
    // Wrong passwords are refused.
    let wrong = connect(
        url,
        ConnectOptions::with_user_and_password("alice".into(), "nope".into()),
    )
    .await
    .err()
    .unwrap_or_else(|| panic!("{what}: a wrong password logged in"));
    assert!(is_auth_refusal(&wrong), "{what}: {wrong}");

    let (alice, mut alice_events) = user(url, "alice", ALICE_PW).await;
    let (ann, _ann_events) = user(url, "ann", ANN_PW).await;
    let (bob, mut bob_events) = user(url, "bob", BOB_PW).await;

    // Allowed publish delivered (ann, without permissions, may subscribe to anything).
    let mut watch = ann.subscribe("a.>").await.unwrap();
    settle(&ann).await;
    alice.publish("a.hello", "hi".into()).await.unwrap();
    delivered_on(&mut watch, "a.hello", what, "alice's allowed publish").await;

    // The nkey user signs in with its seed and publishes where it may.
    let (dev, mut dev_events) = connect(url, ConnectOptions::with_nkey(device.seed().unwrap()))
        .await
        .unwrap_or_else(|e| panic!("{what}: the nkey user logs in: {e}"));
    settle(&dev).await;
    dev.publish("a.device.1", "t".into()).await.unwrap();
    delivered_on(&mut watch, "a.device.1", what, "the nkey user's publish").await;
    publish_is_violation(&dev, &mut dev_events, "a.other", "t").await;

    // Denied publish refused (and not delivered).
    publish_is_violation(&alice, &mut alice_events, "a.secret", "no").await;
    // Bob's subscribe deny.
    let _hidden = subscribe_is_violation(&bob, &mut bob_events, "b.hidden").await;

    // The cross-account service answers: alice (allow_responses) serves svc.echo in A, bob
    // requests `echo` in B. Retried until alice's subscription is in place (bounded).
    service_answers(&alice, &bob, what, false).await;
    // Bob may not publish outside his list.
    publish_is_violation(&bob, &mut bob_events, "a.hello", "x").await;
}

/// Rows of the admin tables, to prove a run changed nothing.
async fn snapshot(env: &TestEnv) -> String {
    sqlx::query_scalar(
        "SELECT concat_ws(' | ',
            (SELECT string_agg(to_jsonb(a)::text, ',' ORDER BY id) FROM (SELECT id, name, updated_at, max_connections, max_jetstream_memory_storage FROM nats.accounts) a),
            (SELECT string_agg(to_jsonb(u)::text, ',' ORDER BY id) FROM nats.users u),
            (SELECT string_agg(to_jsonb(r)::text, ',' ORDER BY id) FROM nats.roles r),
            (SELECT string_agg(to_jsonb(t)::text, ',' ORDER BY id) FROM (SELECT id, user_id, token_sha256, revoked_at FROM nats.user_tokens) t),
            (SELECT string_agg(to_jsonb(e)::text, ',' ORDER BY id) FROM nats.account_exports e),
            (SELECT string_agg(to_jsonb(g)::text, ',' ORDER BY id) FROM nats.account_export_grants g),
            (SELECT string_agg(to_jsonb(i)::text, ',' ORDER BY id) FROM (SELECT id, name, subject, exporter_account_id, local_subject, updated_at FROM nats.account_imports) i))",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

fn import(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["import", "nats-conf"];
    all.extend_from_slice(args);
    run_cli(&all, Some(&env.database_url), "")
}

#[tokio::test]
async fn a_config_mode_deployment_moves_with_its_credentials_and_rights() {
    let old_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let device = nkeys::KeyPair::new_user();
    write_fixture(old_dir.path(), port, &device);
    let conf = old_dir.path().join("nats.conf");
    let conf_s = conf.to_str().unwrap();

    // Before: nats-server on the file itself.
    let mut old = NatsServer::start_plain(
        port,
        old_dir.path(),
        &std::fs::read_to_string(&conf).unwrap(),
    )
    .await;
    same_rights(&old.url(), "the old server", &device).await;
    old.stop();

    let env = TestEnv::start().await;
    let empty = snapshot(&env).await;

    // The dry run lists what it would do and changes nothing.
    let (code, out, err) = import(&env, &["--config", conf_s, "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert!(
        out.contains("create                   user A/alice"),
        "{out}"
    );
    assert!(
        out.contains("create                   grant A/svc.echo to B"),
        "{out}"
    );
    assert_eq!(
        snapshot(&env).await,
        empty,
        "the dry run changed the database"
    );

    // The import.
    let (code, out, err) = import(&env, &["--config", conf_s]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("imported in one transaction"), "{out}");
    // Secrets never appear in the output.
    for secret in [ALICE_PW, ANN_PW, BOB_PW, "$2"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} printed: {out}{err}"
        );
    }
    env.wait_synced("A").await;
    env.wait_synced("B").await;

    // After: the same clients, the same credentials, the same rights, through the callout.
    same_rights(&env.url(), "the callout after the import", &device).await;

    // A user inserted with SQL logs in to an imported account.
    env.sql(
        "INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'carol', crypt('carol-pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'A'",
    )
    .await;
    let carol = env
        .connect_user("carol", "carol-pw")
        .await
        .expect("carol logs in");
    settle(&carol).await;

    // A second run changes nothing and says so.
    let before = snapshot(&env).await;
    let (code, out, err) = import(&env, &["--config", conf_s]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("nothing to do: the database already matches the source"),
        "{out}"
    );
    assert_eq!(
        snapshot(&env).await,
        before,
        "the second run changed the database"
    );

    // A changed password is refused without --update (nothing written), applied with it.
    let b = std::fs::read_to_string(old_dir.path().join("b.conf")).unwrap();
    std::fs::write(
        old_dir.path().join("b.conf"),
        b.replace(BOB_PW, "bob-new-pw"),
    )
    .unwrap();
    let (code, _, err) = import(&env, &["--config", conf_s]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("1 row(s) exist and differ from the source (user B/bob: password_hash)"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(
        snapshot(&env).await,
        before,
        "a refused run changed the database"
    );
    let (code, out, err) = import(&env, &["--config", conf_s, "--dry-run", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(json["summary"]["users"]["change"], 1, "{out}");
    assert_eq!(json["committed"], false);
    assert_eq!(
        snapshot(&env).await,
        before,
        "the dry run changed the database"
    );
    let (code, _, err) = import(&env, &["--config", conf_s, "--update"]);
    assert_eq!(code, Some(0), "{err}");
    env.connect_user("bob", "bob-new-pw")
        .await
        .expect("bob's new password");
    let Err(refused) = env.connect_user("bob", BOB_PW).await else {
        panic!("bob's old password still logs in");
    };
    assert!(is_auth_refusal(&refused), "{refused}");
}

#[tokio::test]
async fn a_lone_authorization_token_becomes_a_token_of_the_global_account() {
    let old_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = old_dir.path().join("nats.conf");
    let token = "legacy-Token-s3cret";
    let text = format!("listen: 127.0.0.1:{port}\nauthorization {{\n  token: \"{token}\"\n}}\n");
    let mut old = NatsServer::start_plain(port, old_dir.path(), &text).await;
    let (client, _) = connect(&old.url(), ConnectOptions::with_token(token.into()))
        .await
        .expect("the token logs in to the old server");
    settle(&client).await;
    old.stop();

    let env = TestEnv::start().await;
    let conf_s = conf.to_str().unwrap();
    // Run as an administrator (nats_pg_auth_admin), not as the schema owner.
    let (_, admin_url) =
        create_login_role(&env.pool, &env.database_url, "nats_pg_auth_admin").await;
    let import = |_: &TestEnv, args: &[&str]| {
        let mut all = vec!["import", "nats-conf"];
        all.extend_from_slice(args);
        run_cli(&all, Some(&admin_url), "")
    };
    // The global account must be named.
    let (code, _, err) = import(&env, &["--config", conf_s]);
    assert_eq!(code, Some(64), "{err}");
    assert_eq!(
        err.trim(),
        format!("error: {conf_s}:2: the top-level authorization block has users or a token: name the account they move to with --global-account NAME")
    );
    let (code, out, err) = import(&env, &["--config", conf_s, "--global-account", "LEGACY"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !out.contains(token) && !err.contains(token),
        "the token was printed"
    );
    env.wait_synced("LEGACY").await;
    let client = env
        .connect_token(token)
        .await
        .expect("the same token logs in");
    // Everything allowed, as before.
    settle(&client).await;
    let (code, out, _) = import(&env, &["--config", conf_s, "--global-account", "LEGACY"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("nothing to do"), "{out}");
}

#[tokio::test]
async fn malformed_or_unimportable_files_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "accounts {\n  A {\n    users [ { user: a, password: \"open }\n",
            ":3: the file ends inside a \"…\" string",
        ),
        (
            "accounts {\n  A {\n    users: [ { user: a, password: p } ]\n  }\n",
            ":5: the file ends before the closing '}'",
        ),
        (
            "a = $NOT_DEFINED_ANYWHERE_42\n",
            ":1: variable $NOT_DEFINED_ANYWHERE_42",
        ),
        (
            "accounts {\n  A {\n    mappings { x: y }\n  }\n}\n",
            ":3: `mappings` of account \"A\"",
        ),
        (
            "accounts {\n  A {\n    users [\n      { user: a }\n    ]\n  }\n}\n",
            ":4: user \"a\" has no password",
        ),
    ];
    let db = fresh_database().await;
    let pool = nats_pg_auth::db::connect(&db, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.conf"));
        std::fs::write(&path, text).unwrap();
        let (code, out, err) = run_cli(
            &["import", "nats-conf", "--config", path.to_str().unwrap()],
            Some(&db),
            "",
        );
        assert_eq!(code, Some(64), "{text:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with(&format!("error: {}{want}", path.display())),
            "{text:?}: {err}"
        );
    }
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.accounts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(accounts, 0);
}
