//! The admin verbs that change rows (issue 18 item 8), run as the real binary against a
//! TestEnv: `role create`, `user set-role|set-password|delete`, `account delete`,
//! `token create --json`, the fuller `account show` / `user show`, whole-second TTLs, exit codes
//! (64 a wrong name, 65 a row the database refuses), and what logins see afterwards.

use std::time::Duration;

use serde_json::Value;

use crate::common::{is_auth_refusal, wait_until, TestEnv};

fn run(env: &TestEnv, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    crate::common::run_cli(args, Some(&env.database_url), stdin)
}

/// Succeeds; returns stdout.
fn ok(env: &TestEnv, args: &[&str], stdin: &str) -> String {
    let (code, out, err) = run(env, args, stdin);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    out
}

fn json(env: &TestEnv, args: &[&str]) -> Value {
    let out = ok(env, args, "");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// Fails with `code`, one line on stderr containing `says`, nothing on stdout.
fn fails(env: &TestEnv, args: &[&str], stdin: &str, code: i32, says: &str) {
    let (got, out, err) = run(env, args, stdin);
    assert_eq!(got, Some(code), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    assert!(err.contains(says), "{args:?}: {err}");
    assert!(out.is_empty(), "{args:?}: {out}");
}

/// Waits until a password login of `user` is refused (a change reaches every cache at once,
/// through Postgres' notification; this bounds it).
async fn wait_refused(env: &TestEnv, user: &str, pass: &str) {
    let url = env.url();
    wait_until(
        Duration::from_secs(10),
        &format!("{user}/{pass} to be refused"),
        || {
            let url = url.clone();
            let opts = async_nats::ConnectOptions::with_user_and_password(user.into(), pass.into());
            async move {
                matches!(crate::common::client_options(opts).connect(url).await, Err(e) if is_auth_refusal(&e))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn roles_passwords_and_deletions_change_what_logins_get() {
    let env = TestEnv::start().await;
    env.acme().await;

    // role create: an account's role, with a TTL that prints as whole seconds.
    ok(
        &env,
        &[
            "role",
            "create",
            "reader",
            "--account",
            "acme",
            "--subscribe",
            "sensors.>",
            "--subscribe",
            "_INBOX.>",
            "--publish",
            "$SYS.REQ.USER.INFO",
            "--publish-deny",
            "sensors.secret",
            "--jwt-ttl",
            "15m",
            "--description",
            "read only",
        ],
        "",
    );
    let role = json(
        &env,
        &["role", "show", "reader", "--account", "acme", "--json"],
    );
    assert_eq!(role["account"], "acme");
    assert_eq!(
        role["subscribe_allow"],
        serde_json::json!(["sensors.>", "_INBOX.>"])
    );
    assert_eq!(role["publish_deny"], serde_json::json!(["sensors.secret"]));
    assert_eq!(role["user_jwt_ttl_secs"], 900, "an integer: {role}");
    let table = ok(&env, &["role", "show", "reader", "--account", "acme"], "");
    assert!(
        table.contains("900 (15m)") && !table.contains("900.0"),
        "{table}"
    );
    let list = ok(&env, &["role", "list"], "");
    assert!(list.contains("15m") && !list.contains("900.0"), "{list}");
    // A global role; the same name twice is refused (65), an unknown account is a wrong name (64).
    ok(
        &env,
        &["role", "create", "everyone", "--subscribe", "public.>"],
        "",
    );
    assert_eq!(
        json(&env, &["role", "show", "everyone", "--json"])["account"],
        Value::Null
    );
    fails(
        &env,
        &["role", "create", "reader", "--account", "acme"],
        "",
        65,
        "already exists",
    );
    fails(
        &env,
        &["role", "create", "everyone"],
        "",
        65,
        "already exists",
    );
    fails(
        &env,
        &["role", "create", "x", "--account", "nope"],
        "",
        64,
        "no account \"nope\"",
    );
    fails(
        &env,
        &["role", "create", "x", "--publish", "bad subject"],
        "",
        65,
        "publish",
    );

    // user set-role: alice now gets the reader role's rights at her next login.
    ok(&env, &["user", "set-role", "alice", "reader"], "");
    assert_eq!(
        json(&env, &["user", "show", "alice", "--json"])["role"],
        "reader"
    );
    let url = env.url();
    wait_until(
        Duration::from_secs(10),
        "alice's JWT to carry the reader role",
        || {
            let url = url.clone();
            async move {
                let Ok(c) = crate::common::client_options(
                    async_nats::ConnectOptions::with_user_and_password(
                        "alice".into(),
                        "s3cret".into(),
                    ),
                )
                .connect(url)
                .await
                else {
                    return false;
                };
                let info = crate::common::user_info(&c).await;
                info["permissions"]["publish"]["deny"] == serde_json::json!(["sensors.secret"])
            }
        },
    )
    .await;
    ok(&env, &["user", "set-role", "alice", "everyone"], "");
    assert_eq!(
        json(&env, &["user", "show", "alice", "--json"])["role"],
        "everyone"
    );
    ok(&env, &["user", "set-role", "alice", "--none"], "");
    assert_eq!(
        json(&env, &["user", "show", "alice", "--json"])["role"],
        Value::Null
    );
    fails(
        &env,
        &["user", "set-role", "alice", "nope"],
        "",
        64,
        "no role \"nope\" in account \"acme\"",
    );
    fails(
        &env,
        &["user", "set-role", "nobody", "reader"],
        "",
        64,
        "no user \"nobody\"",
    );
    let (code, _, err) = run(&env, &["user", "set-role", "alice"], "");
    assert_eq!(code, Some(64), "a role or --none: {err}");

    // user set-password: the new password logs in, the old one is refused.
    ok(
        &env,
        &["user", "set-password", "alice", "--cost", "4"],
        "n3w-secret\n",
    );
    env.wait_login(
        "alice",
        "n3w-secret",
        Duration::from_secs(10),
        "the new password",
    )
    .await;
    wait_refused(&env, "alice", "s3cret").await;
    fails(
        &env,
        &["user", "set-password", "nobody"],
        "pw\n",
        64,
        "no user \"nobody\"",
    );
    fails(
        &env,
        &["user", "set-password", "alice"],
        "",
        64,
        "no password",
    );

    // user create of a taken name: 65; token create --json.
    fails(
        &env,
        &[
            "user",
            "create",
            "--account",
            "acme",
            "--username",
            "alice",
            "--cost",
            "4",
        ],
        "pw\n",
        65,
        "already exists",
    );
    ok(
        &env,
        &[
            "user",
            "create",
            "--account",
            "acme",
            "--username",
            "bob",
            "--cost",
            "4",
        ],
        "pw\n",
    );
    let made = json(
        &env,
        &[
            "token",
            "create",
            "--user",
            "bob",
            "--expires-in",
            "1d",
            "--json",
        ],
    );
    let keys: Vec<&str> = made
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["expires_at", "id", "token", "user"], "{made}");
    assert_eq!(made["user"], "bob");
    assert!(
        made["expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{made}"
    );
    let listed = json(&env, &["token", "list", "--user", "bob", "--json"]);
    assert_eq!(listed[0]["id"], made["id"], "{listed}");
    let forever = json(&env, &["token", "create", "--user", "bob", "--json"]);
    assert_eq!(forever["expires_at"], Value::Null);
    env.connect_token(made["token"].as_str().unwrap())
        .await
        .expect("the token from --json logs in");
    fails(
        &env,
        &["token", "create", "--user", "nobody", "--json"],
        "",
        64,
        "no user",
    );

    // user delete: bob's password and tokens stop working.
    ok(&env, &["user", "delete", "bob"], "");
    wait_refused(&env, "bob", "pw").await;
    assert!(env
        .connect_token(made["token"].as_str().unwrap())
        .await
        .is_err());
    fails(&env, &["user", "show", "bob"], "", 64, "no user \"bob\"");
    fails(&env, &["user", "delete", "bob"], "", 64, "no user \"bob\"");

    // account delete: its users can no longer log in, and it is gone from every listing.
    ok(&env, &["account", "create", "initech"], "");
    ok(
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
        "tps\n",
    );
    env.wait_synced("initech").await;
    env.wait_login("peter", "tps", Duration::from_secs(10), "peter")
        .await;
    ok(&env, &["account", "delete", "initech"], "");
    wait_refused(&env, "peter", "tps").await;
    fails(
        &env,
        &["account", "show", "initech"],
        "",
        64,
        "no account \"initech\"",
    );
    fails(
        &env,
        &["account", "delete", "initech"],
        "",
        64,
        "no account \"initech\"",
    );
    assert!(!ok(&env, &["user", "list"], "").contains("peter"));
}

#[tokio::test]
async fn account_and_user_show_include_what_they_used_to_omit() {
    let env = TestEnv::start().await;
    env.acme().await;
    let nkey = nkeys::KeyPair::new_user().public_key();
    env.sql(&format!(
        "UPDATE nats.accounts SET max_jetstream_disk_storage = 1048576, max_jetstream_streams = 5,
                user_jwt_ttl = '2 hours' WHERE name = 'acme';
         INSERT INTO nats.accounts (name) VALUES ('initech');
         INSERT INTO nats.account_exports (account_id, name, subject, type)
           SELECT id, 'readings', 'sensors.>', 'stream' FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.account_imports (account_id, name, subject, type, exporter_account_id, local_subject)
           SELECT i.id, 'acme-readings', 'sensors.>', 'stream', a.id, 'acme.sensors.>'
           FROM nats.accounts i, nats.accounts a WHERE i.name = 'initech' AND a.name = 'acme';
         UPDATE nats.users SET nkey = '{nkey}', mqtt_client_ids = '{{dev-1,dev-2}}' WHERE username = 'alice';
         INSERT INTO nats.user_certificates (user_id, subject_dn, san)
           SELECT id, 'CN=alice,O=Acme', 'email:alice@acme.test' FROM nats.users WHERE username = 'alice';"
    ))
    .await;

    let acme = json(&env, &["account", "show", "acme", "--json"]);
    assert_eq!(acme["max_jetstream_disk_storage"], 1048576);
    assert_eq!(acme["max_jetstream_memory_storage"], 0);
    assert_eq!(acme["max_jetstream_streams"], 5);
    assert_eq!(acme["max_jetstream_consumers"], -1);
    assert_eq!(acme["user_jwt_ttl_secs"], 7200);
    assert_eq!(acme["exports"][0]["name"], "readings");
    assert_eq!(acme["exports"][0]["type"], "stream");
    assert_eq!(acme["imports"], serde_json::json!([]));
    let initech = json(&env, &["account", "show", "initech", "--json"]);
    assert_eq!(initech["imports"][0]["exporter"], "acme", "{initech}");
    assert_eq!(initech["imports"][0]["local_subject"], "acme.sensors.>");
    let table = ok(&env, &["account", "show", "acme"], "");
    assert!(table.contains("max_jetstream_disk_storage"), "{table}");
    assert!(table.contains("readings sensors.> (stream)"), "{table}");
    assert!(table.contains("7200 (2h)"), "{table}");
    let table = ok(&env, &["account", "show", "initech"], "");
    assert!(
        table.contains("acme-readings sensors.> from acme"),
        "{table}"
    );

    let alice = json(&env, &["user", "show", "alice", "--json"]);
    assert_eq!(alice["nkey"], nkey.as_str());
    assert_eq!(
        alice["mqtt_client_ids"],
        serde_json::json!(["dev-1", "dev-2"])
    );
    assert_eq!(alice["certificates"][0]["subject_dn"], "CN=alice,O=Acme");
    assert_eq!(alice["certificates"][0]["san"], "email:alice@acme.test");
    let table = ok(&env, &["user", "show", "alice"], "");
    for text in [
        nkey.as_str(),
        "dev-1,dev-2",
        "subject CN=alice,O=Acme + email:alice@acme.test",
    ] {
        assert!(table.contains(text), "{text}: {table}");
    }
    assert!(!table.contains("$2"), "no password hash: {table}");

    // `explain`'s durations are whole seconds too.
    env.sql(
        "UPDATE nats.roles SET allow_response = true, allow_response_ttl = '5 seconds' WHERE name = 'sensor'",
    )
    .await;
    let why = json(&env, &["explain", "--user", "alice", "--json"]);
    assert_eq!(why["response"]["ttl_secs"], 5, "an integer: {why}");
    let text = ok(&env, &["explain", "--user", "alice"], "");
    assert!(text.contains("within 5s"), "{text}");
}

/// What a terminal showed, read from the pseudo-terminal's master side in a thread.
struct Terminal {
    master: std::fs::File,
    shown: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Terminal {
    /// A pseudo-terminal; returns it and its slave side (the child's terminal).
    fn open() -> (Terminal, std::fs::File) {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .expect("open the pty's slave side");
        let master = std::fs::File::from(master);
        let shown = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut reader, into) = (master.try_clone().unwrap(), shown.clone());
        std::thread::spawn(move || {
            use std::io::Read as _;
            let mut buf = [0u8; 1024];
            // Ends with EIO once the child has exited and every slave side is closed.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (Terminal { master, shown }, slave)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.shown.lock().unwrap()).into_owned()
    }

    /// Waits (bounded) until the terminal shows `what`, then types `line`.
    async fn answer(&mut self, what: &str, line: &str) {
        use std::io::Write as _;
        let shown = self.shown.clone();
        let what_owned = what.to_owned();
        wait_until(
            Duration::from_secs(10),
            &format!("the prompt {what:?}"),
            || {
                let shown = shown.clone();
                let what = what_owned.clone();
                async move { String::from_utf8_lossy(&shown.lock().unwrap()).contains(&what) }
            },
        )
        .await;
        self.master.write_all(line.as_bytes()).unwrap();
    }
}

/// `user create` on a terminal asks for the password (twice) and does not echo it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_create_on_a_terminal_prompts_without_echo() {
    let env = TestEnv::start().await;
    env.acme().await;
    let (mut tty, slave) = Terminal::open();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nats-pg-auth"))
        .args([
            "user",
            "create",
            "--account",
            "acme",
            "--username",
            "tina",
            "--cost",
            "4",
        ])
        .env("DATABASE_URL", &env.database_url)
        .stdin(slave.try_clone().unwrap())
        .stderr(slave)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run nats-pg-auth");
    tty.answer("Password for user \"tina\": ", "typed-secret\r")
        .await;
    tty.answer("Again: ", "typed-secret\r").await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", tty.text());
    let shown = tty.text();
    assert!(
        !shown.contains("typed-secret"),
        "the password was echoed: {shown:?}"
    );
    env.wait_synced("acme").await;
    env.connect_user("tina", "typed-secret")
        .await
        .expect("the typed password logs in");
}
