//! `nats-pg-auth import pb-nats` (issue 16): a pb-nats deployment moves to the service; its
//! `.creds` files keep working and its users log in with the passwords they already have.
//!
//! The fixture is a PocketBase database as pb-nats' README describes it (no PocketBase here: the
//! test writes the SQLite tables itself): the operator with a signing key and its system account
//! ("System Account"), account "Acme Corp" with its seeds encrypted under a pb-nats key
//! (`enc::`, its signing keys as one encrypted JSON string) and a service export, account
//! "plain" with plain seeds importing the service, two roles, users with bcrypt passwords
//! (PocketBase's `password`), public nkeys and `.creds` (JWTs signed by the account's signing
//! key, as pb-nats issues them), one inactive user. The `.creds` users run against nats-server
//! on the pb-nats JWTs first, then against the server on the fragment `init` writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use async_nats::{Client, ConnectOptions, Event};
use base64::Engine as _;
use nats_pg_auth::jwt::claims::{
    AccountClaims, Export, ExportType, Import, OperatorClaims, Permission, ResponsePermission,
    UserClaims,
};
use nats_pg_auth::jwt::{encode, Claims};
use nkeys::KeyPair;
use tokio::sync::mpsc;

use crate::common::imports::*;
use crate::common::*;

const KEY: [u8; 32] = [11; 32];
/// pb-nats' `EncryptionKey` (32 characters).
const PB_KEY: &str = "pb-nats-encryption-key-32-chars!";

fn named<T>(sub: &str, name: &str, nats: T) -> Claims<T> {
    Claims {
        name: Some(name.into()),
        ..Claims::new(sub, nats)
    }
}

fn perm(allow: &[&str], deny: &[&str]) -> Permission {
    Permission {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        deny: deny.iter().map(|s| s.to_string()).collect(),
    }
}

/// As PocketBase's `security.Encrypt` with pb-nats' key: `enc::` base64(nonce ‖ ciphertext).
fn enc(plain: &str) -> String {
    let cipher = Aes256Gcm::new_from_slice(PB_KEY.as_bytes()).unwrap();
    let nonce: [u8; 12] = rand::random();
    let mut raw = nonce.to_vec();
    raw.extend(
        cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
            .unwrap(),
    );
    format!(
        "enc::{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

/// A `nats_users` row of the fixture: id, name, account, role, public key, seed, JWT, creds,
/// active, publish and subscribe additions.
type UserRow<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    String,
    &'a str,
    &'a str,
    &'a str,
    bool,
    &'a str,
    &'a str,
);

/// The fixture: the database file and what the test needs to know about it.
struct Fixture {
    db: PathBuf,
    operator: KeyPair,
    sys: KeyPair,
    acme: KeyPair,
    acme_signing: KeyPair,
    plain: KeyPair,
    operator_jwt: String,
    account_jwts: Vec<(String, String)>,
    alice_creds: String,
    bob_creds: String,
}

fn signing_json(keys: &[&KeyPair]) -> (String, String) {
    let public: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| serde_json::json!({"public_key": k.public_key(), "created_at": "2026-01-01T00:00:00Z"}))
        .collect();
    let private: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            serde_json::json!({"public_key": k.public_key(), "private_key": "", "seed": k.seed().unwrap(), "created_at": "2026-01-01T00:00:00Z"})
        })
        .collect();
    (
        serde_json::Value::Array(public).to_string(),
        serde_json::Value::Array(private).to_string(),
    )
}

fn write_fixture(dir: &Path) -> Fixture {
    let db = dir.join("data.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    // PocketBase's layout: one table per collection, `id` a 15-character text, relation fields
    // as record ids, booleans as 0/1, JSON fields as JSON text.
    conn.execute_batch(
        "CREATE TABLE nats_system_operator (id TEXT PRIMARY KEY, name TEXT, public_key TEXT,
            private_key TEXT, seed TEXT, signing_keys JSON, signing_keys_private JSON, jwt TEXT,
            system_account_id TEXT, created TEXT, updated TEXT);
         CREATE TABLE nats_accounts (id TEXT PRIMARY KEY, name TEXT, description TEXT,
            public_key TEXT, private_key TEXT, seed TEXT, signing_keys JSON,
            signing_keys_private JSON, jwt TEXT, active BOOLEAN, add_signing_key BOOLEAN,
            remove_signing_key TEXT, rotate_keys BOOLEAN, max_connections NUMERIC,
            max_subscriptions NUMERIC, max_data NUMERIC, max_payload NUMERIC,
            max_jetstream_disk_storage NUMERIC, max_jetstream_memory_storage NUMERIC);
         CREATE TABLE nats_account_exports (id TEXT PRIMARY KEY, account_id TEXT, name TEXT,
            subject TEXT, type TEXT, token_req BOOLEAN, response_type TEXT,
            response_threshold NUMERIC, account_token_position NUMERIC, advertise BOOLEAN,
            allow_trace BOOLEAN, description TEXT);
         CREATE TABLE nats_account_imports (id TEXT PRIMARY KEY, account_id TEXT, name TEXT,
            subject TEXT, account TEXT, token TEXT, local_subject TEXT, type TEXT,
            share BOOLEAN, allow_trace BOOLEAN, description TEXT);
         CREATE TABLE nats_roles (id TEXT PRIMARY KEY, name TEXT, description TEXT,
            is_default BOOLEAN, publish_permissions JSON, subscribe_permissions JSON,
            publish_deny_permissions JSON, subscribe_deny_permissions JSON,
            allow_response BOOLEAN, allow_response_max NUMERIC, allow_response_ttl NUMERIC,
            max_subscriptions NUMERIC, max_data NUMERIC, max_payload NUMERIC);
         CREATE TABLE nats_users (id TEXT PRIMARY KEY, email TEXT, emailVisibility BOOLEAN,
            verified BOOLEAN, password TEXT, tokenKey TEXT, nats_username TEXT,
            description TEXT, account_id TEXT, role_id TEXT, public_key TEXT, private_key TEXT,
            seed TEXT, jwt TEXT, creds_file TEXT, bearer_token BOOLEAN, jwt_expires_at TEXT,
            regenerate BOOLEAN, active BOOLEAN, publish_permissions JSON,
            subscribe_permissions JSON, publish_deny_permissions JSON,
            subscribe_deny_permissions JSON);",
    )
    .unwrap();

    let operator = KeyPair::new_operator();
    let operator_signing = KeyPair::new_operator();
    let sys = KeyPair::new_account();
    let acme = KeyPair::new_account();
    let acme_signing = KeyPair::new_account();
    let plain = KeyPair::new_account();
    let plain_signing = KeyPair::new_account();

    let operator_jwt = encode(
        &named(
            &operator.public_key(),
            "pbop",
            OperatorClaims {
                signing_keys: vec![operator_signing.public_key()],
                system_account: Some(sys.public_key()),
                ..Default::default()
            },
        ),
        &operator,
    )
    .unwrap();
    // pb-nats signs account JWTs with the operator's signing key.
    let sys_jwt = encode(
        &named(
            &sys.public_key(),
            "System Account",
            AccountClaims::default(),
        ),
        &operator_signing,
    )
    .unwrap();
    let mut acme_claims = AccountClaims {
        signing_keys: vec![acme_signing.public_key()],
        exports: vec![Export {
            name: "echo".into(),
            subject: "svc.echo".into(),
            export_type: ExportType::Service,
            ..Default::default()
        }],
        ..Default::default()
    };
    acme_claims.limits.conn = 40;
    let acme_jwt = encode(
        &named(&acme.public_key(), "Acme Corp", acme_claims),
        &operator_signing,
    )
    .unwrap();
    let plain_jwt = encode(
        &named(
            &plain.public_key(),
            "plain",
            AccountClaims {
                signing_keys: vec![plain_signing.public_key()],
                imports: vec![Import {
                    name: "echo".into(),
                    subject: "svc.echo".into(),
                    account: acme.public_key(),
                    token: None,
                    local_subject: Some("echo".into()),
                    import_type: ExportType::Service,
                    share: false,
                    allow_trace: false,
                }],
                ..Default::default()
            },
        ),
        &operator_signing,
    )
    .unwrap();

    let (op_sk, op_sk_private) = signing_json(&[&operator_signing]);
    conn.execute(
        "INSERT INTO nats_system_operator VALUES ('opr000000000001', 'pbop', ?1, '', ?2, ?3, ?4, ?5, 'acc00000000sys0', '', '')",
        rusqlite::params![
            operator.public_key(),
            enc(&operator.seed().unwrap()),
            op_sk,
            serde_json::Value::String(enc(&op_sk_private)).to_string(),
            operator_jwt
        ],
    )
    .unwrap();
    let (acme_sk, acme_sk_private) = signing_json(&[&acme_signing]);
    let (plain_sk, plain_sk_private) = signing_json(&[&plain_signing]);
    let (sys_sk, sys_sk_private) = signing_json(&[]);
    let accounts = [
        (
            "acc00000000sys0",
            "System Account",
            &sys,
            enc(&sys.seed().unwrap()),
            sys_sk,
            serde_json::Value::String(enc(&sys_sk_private)).to_string(),
            &sys_jwt,
            -1,
        ),
        (
            "acc00000000acme",
            "Acme Corp",
            &acme,
            enc(&acme.seed().unwrap()),
            acme_sk,
            // Encrypted: the whole list is one `enc::` string, stored as a JSON string.
            serde_json::Value::String(enc(&acme_sk_private)).to_string(),
            &acme_jwt,
            40,
        ),
        (
            "acc0000000plain",
            "plain",
            &plain,
            plain.seed().unwrap(),
            plain_sk,
            plain_sk_private,
            &plain_jwt,
            -1,
        ),
    ];
    for (id, name, kp, seed, sk, skp, jwt, conns) in accounts {
        conn.execute(
            "INSERT INTO nats_accounts VALUES (?1, ?2, '', ?3, '', ?4, ?5, ?6, ?7, 1, 0, '', 0, ?8, -1, -1, -1, 0, 0)",
            rusqlite::params![id, name, kp.public_key(), seed, sk, skp, jwt, conns],
        )
        .unwrap();
    }
    conn.execute(
        "INSERT INTO nats_account_exports VALUES ('exp000000000001', 'acc00000000acme', 'echo', 'svc.echo', 'service', 0, 'Singleton', 0, 0, 0, 0, '')",
        [],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO nats_account_imports VALUES ('imp000000000001', 'acc0000000plain', 'echo', 'svc.echo', ?1, '', 'echo', 'service', 0, 0, '')",
        [acme.public_key()],
    )
    .unwrap();
    conn.execute_batch(
        r#"INSERT INTO nats_roles VALUES ('rol00000writer0', 'writer', 'writes a.>', 0,
              '["a.>", "_INBOX.>"]', '["a.>", "svc.>", "_INBOX.>"]', '["a.secret"]', '[]', 1, 1, 30, -1, -1, -1);
           INSERT INTO nats_roles VALUES ('rol00000client0', 'client', '', 1,
              '["echo", "_INBOX.>"]', '["_INBOX.>"]', '[]', '[]', 0, 0, 0, -1, -1, -1);
           INSERT INTO nats_roles VALUES ('rol000000unused', 'unused', '', 0, '[]', '[]', '[]', '[]', 0, 0, 0, -1, -1, -1);"#,
    )
    .unwrap();

    // Users: alice (Acme, .creds signed by Acme's signing key, and a password), ann (Acme,
    // password only), bob (plain, .creds and a password, per-user additions), eve (inactive).
    let alice = KeyPair::new_user();
    let bob = KeyPair::new_user();
    let mut alice_claims = UserClaims {
        issuer_account: Some(acme.public_key()),
        ..Default::default()
    };
    alice_claims.permissions.publish = perm(&["a.>", "_INBOX.>"], &["a.secret"]);
    alice_claims.permissions.subscribe = perm(&["a.>", "svc.>", "_INBOX.>"], &[]);
    alice_claims.permissions.response = Some(ResponsePermission {
        max: 1,
        ttl: 30_000_000_000,
    });
    let alice_jwt = encode(
        &named(&alice.public_key(), "alice", alice_claims),
        &acme_signing,
    )
    .unwrap();
    let mut bob_claims = UserClaims {
        issuer_account: Some(plain.public_key()),
        ..Default::default()
    };
    bob_claims.permissions.publish = perm(&["echo", "_INBOX.>", "b.>"], &[]);
    bob_claims.permissions.subscribe = perm(&["_INBOX.>", "b.>"], &[]);
    let bob_jwt = encode(&named(&bob.public_key(), "bob", bob_claims), &plain_signing).unwrap();
    let alice_creds = creds(&alice_jwt, &alice.seed().unwrap());
    let bob_creds = creds(&bob_jwt, &bob.seed().unwrap());
    let hash = |pw: &str| bcrypt::hash(pw, 4).unwrap();
    let users: [UserRow; 4] = [
        (
            "usr00000000alic",
            "alice",
            "acc00000000acme",
            "rol00000writer0",
            alice.public_key(),
            &enc(&alice.seed().unwrap()),
            &alice_jwt,
            &alice_creds,
            true,
            "[]",
            "[]",
        ),
        (
            "usr000000000ann",
            "ann",
            "acc00000000acme",
            "rol00000writer0",
            String::new(),
            "",
            "",
            "",
            true,
            "[]",
            "[]",
        ),
        (
            "usr000000000bob",
            "bob",
            "acc0000000plain",
            "rol00000client0",
            bob.public_key(),
            &bob.seed().unwrap(),
            &bob_jwt,
            &bob_creds,
            true,
            r#"["b.>"]"#,
            r#"["b.>"]"#,
        ),
        (
            "usr000000000eve",
            "eve",
            "acc00000000acme",
            "rol00000writer0",
            String::new(),
            "",
            "",
            "",
            false,
            "[]",
            "[]",
        ),
    ];
    for (id, name, account, role, pk, seed, jwt, creds_file, active, pubs, subs) in users {
        conn.execute(
            "INSERT INTO nats_users VALUES (?1, ?2 || '@example.com', 0, 1, ?3, 'tk', ?2, '', ?4, ?5, ?6, '', ?7, ?8, ?9, 0, '', 0, ?10, ?11, ?12, '[]', '[]')",
            rusqlite::params![
                id,
                name,
                hash(&format!("{name}-pw")),
                account,
                role,
                pk,
                seed,
                jwt,
                creds_file,
                active,
                pubs,
                subs
            ],
        )
        .unwrap();
    }
    drop(conn);
    Fixture {
        db,
        account_jwts: vec![
            (sys.public_key(), sys_jwt),
            (acme.public_key(), acme_jwt),
            (plain.public_key(), plain_jwt),
        ],
        operator,
        sys,
        acme,
        acme_signing,
        plain,
        operator_jwt,
        alice_creds,
        bob_creds,
    }
}

async fn connect_creds(
    url: &str,
    creds: &str,
) -> Result<(Client, mpsc::UnboundedReceiver<Event>), async_nats::ConnectError> {
    let (opts, rx) = with_events(client_options(
        ConnectOptions::with_credentials(creds).expect("a .creds file"),
    ));
    Ok((opts.connect(url).await?, rx))
}

async fn delivered(watch: &mut async_nats::Subscriber, subject: &str, what: &str) {
    delivered_on(
        watch,
        subject,
        what,
        &format!("the allowed publish on {subject}"),
    )
    .await;
}

/// What the `.creds` users can do, on any server.
async fn creds_rights(url: &str, what: &str, f: &Fixture) {
    let (alice, mut alice_events) = connect_creds(url, &f.alice_creds)
        .await
        .unwrap_or_else(|e| panic!("{what}: alice's .creds: {e}"));
    let (bob, mut bob_events) = connect_creds(url, &f.bob_creds)
        .await
        .unwrap_or_else(|e| panic!("{what}: bob's .creds: {e}"));
    let mut watch = alice.subscribe("a.>").await.unwrap();
    settle(&alice).await;
    alice.publish("a.hello", "hi".into()).await.unwrap();
    delivered(&mut watch, "a.hello", what).await;
    publish_is_violation(&alice, &mut alice_events, "a.secret", "no").await;
    service_answers(&alice, &bob, what, true).await;
    publish_is_violation(&bob, &mut bob_events, "a.hello", "x").await;
}

async fn snapshot(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar(
        "SELECT concat_ws(' | ',
            (SELECT string_agg(to_jsonb(s)::text, ',' ORDER BY kind) FROM (SELECT kind, name, public_key, jwt FROM nats.service_identities) s),
            (SELECT string_agg(to_jsonb(a)::text, ',' ORDER BY id) FROM (SELECT id, name, public_key, active, updated_at, max_connections FROM nats.accounts) a),
            (SELECT string_agg(to_jsonb(k)::text, ',' ORDER BY id) FROM (SELECT id, account_id, kind, public_key, seed IS NULL AS no_seed FROM nats.account_keys) k),
            (SELECT string_agg(to_jsonb(u)::text, ',' ORDER BY id) FROM nats.users u),
            (SELECT string_agg(to_jsonb(r)::text, ',' ORDER BY id) FROM nats.roles r),
            (SELECT string_agg(to_jsonb(e)::text, ',' ORDER BY id) FROM nats.account_exports e),
            (SELECT string_agg(to_jsonb(g)::text, ',' ORDER BY id) FROM nats.account_export_grants g),
            (SELECT string_agg(to_jsonb(i)::text, ',' ORDER BY id) FROM (SELECT id, name, subject, exporter_account_id, local_subject, updated_at FROM nats.account_imports) i))",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

fn key_flag() -> String {
    base64::engine::general_purpose::STANDARD.encode(KEY)
}

fn import_with(
    db_url: &str,
    file: &Path,
    pb_key: Option<&str>,
    extra: &[&str],
) -> (Option<i32>, String, String) {
    let key = key_flag();
    let mut args = vec![
        "--encryption-key",
        key.as_str(),
        "import",
        "pb-nats",
        "--db",
        file.to_str().unwrap(),
    ];
    if let Some(k) = pb_key {
        args.extend(["--pb-encryption-key", k]);
    }
    args.extend_from_slice(extra);
    run_cli(&args, Some(db_url), "")
}

fn import(db_url: &str, f: &Fixture, extra: &[&str]) -> (Option<i32>, String, String) {
    import_with(db_url, &f.db, Some(PB_KEY), extra)
}

fn old_server_conf(port: u16, f: &Fixture) -> String {
    let preload: String = f
        .account_jwts
        .iter()
        .map(|(k, j)| format!("  {k}: {j}\n"))
        .collect();
    format!(
        "listen: 127.0.0.1:{port}\noperator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n{preload}}}\n",
        f.operator_jwt,
        f.sys.public_key()
    )
}

fn no_secret(f: &Fixture, out: &str) {
    for kp in [&f.operator, &f.sys, &f.acme, &f.acme_signing, &f.plain] {
        assert!(
            !out.contains(&kp.seed().unwrap()),
            "a seed was printed: {out}"
        );
    }
    assert!(!out.contains("$2b$"), "a password hash was printed: {out}");
    assert!(!out.contains(PB_KEY), "the pb-nats key was printed: {out}");
}

#[tokio::test]
async fn a_pb_nats_deployment_moves_with_its_creds_and_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_fixture(dir.path());

    // Before: nats-server on pb-nats' JWTs, the .creds users as pb-nats issued them.
    let port = free_port();
    let mut old =
        NatsServer::start_plain(port, &dir.path().join("old"), &old_server_conf(port, &f)).await;
    creds_rights(&old.url(), "the old server", &f).await;
    old.stop();

    // The dry run, then the import, into the fresh database (before `init`).
    let outputs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let before_init: BeforeInit = {
        let outputs = outputs.clone();
        let file = f.db.clone();
        Box::new(move |db: &str| {
            let dry = import_with(db, &file, Some(PB_KEY), &["--dry-run"]);
            let real = import_with(db, &file, Some(PB_KEY), &[]);
            assert_eq!(real.0, Some(0), "the import: {}{}", real.1, real.2);
            outputs.lock().unwrap().extend([dry, real]);
        })
    };
    let env = TestEnv::start_with(EnvOptions {
        encryption_key: Some(KEY),
        before_init: Some(before_init),
        ..Default::default()
    })
    .await;
    let runs = outputs.lock().unwrap().clone();
    let (code, out, err) = &runs[0];
    assert_eq!(*code, Some(0), "{err}");
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert!(out.contains("operator pbop"), "{out}");
    assert!(out.contains("user Acme-Corp/alice"), "{out}");
    no_secret(&f, out);
    let (code, out, err) = &runs[1];
    assert_eq!(*code, Some(0), "{err}");
    assert!(out.starts_with("imported in one transaction"), "{out}");
    no_secret(&f, out);
    no_secret(&f, err);

    // The servers' trust is unchanged; the accounts keep their keys.
    let fragment = std::fs::read_to_string(env.dir.path().join("fragment.conf")).unwrap();
    assert!(
        fragment.contains(&format!("system_account: {}", f.sys.public_key())),
        "{fragment}"
    );
    assert_eq!(env.account_key("Acme-Corp").await, f.acme.public_key());
    assert_eq!(env.account_key("plain").await, f.plain.public_key());
    env.wait_synced("Acme-Corp").await;
    env.wait_synced("plain").await;
    let plain_seeds = crate::common::imports::unsealed_seeds(&env).await;
    assert_eq!(plain_seeds, 0, "a seed is stored unsealed");
    // The encrypted signing key's seed was decrypted and kept.
    let has_seed: bool =
        sqlx::query_scalar("SELECT seed IS NOT NULL FROM nats.account_keys WHERE public_key = $1")
            .bind(f.acme_signing.public_key())
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(has_seed);

    // After: the same .creds, the same rights.
    creds_rights(&env.url(), "the server on the fragment", &f).await;

    // The same users log in with their PocketBase passwords and their role's rights.
    env.wait_login("ann", "ann-pw", Duration::from_secs(10), "ann's password")
        .await;
    let (ann, mut ann_events) = env.connect_user_events("ann", "ann-pw").await.unwrap();
    let (alice, _alice_events) = env.connect_user_events("alice", "alice-pw").await.unwrap();
    let mut watch = alice.subscribe("a.>").await.unwrap();
    settle(&alice).await;
    ann.publish("a.from-ann", "hi".into()).await.unwrap();
    delivered(&mut watch, "a.from-ann", "ann's password login").await;
    publish_is_violation(&ann, &mut ann_events, "a.secret", "no").await;
    // bob: the role's rights plus his own additions, and the service through the import.
    let (bob, mut bob_events) = env.connect_user_events("bob", "bob-pw").await.unwrap();
    let mut mine = bob.subscribe("b.>").await.unwrap();
    settle(&bob).await;
    bob.publish("b.note", "x".into()).await.unwrap();
    delivered(&mut mine, "b.note", "bob's own addition").await;
    service_answers(&alice, &bob, "password logins", true).await;
    publish_is_violation(&bob, &mut bob_events, "a.hello", "x").await;
    // eve was inactive in pb-nats: she stays out.
    let Err(refused) = env.connect_user("eve", "eve-pw").await else {
        panic!("eve logs in although she was inactive in pb-nats");
    };
    assert!(is_auth_refusal(&refused), "{refused}");
    // A wrong password is still wrong.
    let Err(refused) = env.connect_user("ann", "alice-pw").await else {
        panic!("ann logs in with a wrong password");
    };
    assert!(is_auth_refusal(&refused), "{refused}");

    // A user inserted with SQL logs in to an imported account.
    env.sql(
        "INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'carol', crypt('carol-pw', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'plain'",
    )
    .await;
    let carol = env
        .connect_user("carol", "carol-pw")
        .await
        .expect("carol logs in");
    assert_eq!(user_info(&carol).await["account"], f.plain.public_key());

    // A second run changes nothing and says so; so does a dry run.
    let before = snapshot(&env.pool).await;
    let (code, out, err) = import(&env.database_url, &f, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("nothing to do: the database already matches the source"),
        "{out}"
    );
    let (code, out, err) = import(&env.database_url, &f, &["--dry-run", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(json["unchanged"], true, "{out}");
    no_secret(&f, &out);
    assert_eq!(
        snapshot(&env.pool).await,
        before,
        "a run changed the database"
    );

    // Deactivating alice's row cuts her .creds connection off and keeps it out.
    let (alice_c, mut alice_c_events) = connect_creds(&env.url(), &f.alice_creds).await.unwrap();
    settle(&alice_c).await;
    let start = std::time::Instant::now();
    env.sql("UPDATE nats.users SET active = false WHERE username = 'alice'")
        .await;
    disconnected_by(
        &mut alice_c_events,
        start,
        Duration::from_secs(10),
        "alice's .creds connection after her row was deactivated",
    )
    .await;
    let Err(refused) = connect_creds(&env.url(), &f.alice_creds).await else {
        panic!("alice's .creds logs in although her row is inactive");
    };
    assert!(is_auth_refusal(&refused), "{refused}");
}

#[tokio::test]
async fn corrupt_pb_nats_databases_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_fixture(dir.path());
    let db = fresh_database().await;
    let pool = nats_pg_auth::db::connect(&db, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    let empty = snapshot(&pool).await;
    let refused = |file: &Path, pb_key: Option<&str>, what: &str, want: &str| {
        let (code, out, err) = import_with(&db, file, pb_key, &[]);
        refused_with_one_line(what, code, &out, &err, want);
        no_secret(&f, &err);
    };
    // A wrong pb-nats key; none at all.
    refused(
        &f.db,
        Some("another-key-of-32-characters-000"),
        "a wrong key",
        "nats_system_operator record opr000000000001: `seed` does not decrypt with --pb-encryption-key",
    );
    refused(
        &f.db,
        None,
        "no key",
        "`seed` is encrypted (enc::): pass pb-nats' EncryptionKey with --pb-encryption-key",
    );
    refused(&f.db, Some("short"), "a short key", "exactly 32 characters");

    // A seed that is not the seed of its key (plain's seed replaced by another account's).
    let copy = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy(&f.db, &p).unwrap();
        (rusqlite::Connection::open(&p).unwrap(), p)
    };
    let (conn, wrong_seed) = copy("wrong-seed.db");
    conn.execute(
        "UPDATE nats_accounts SET seed = ?1 WHERE id = 'acc0000000plain'",
        [KeyPair::new_account().seed().unwrap()],
    )
    .unwrap();
    drop(conn);
    refused(
        &wrong_seed,
        Some(PB_KEY),
        "a wrong seed",
        &format!(
            "nats_accounts record acc0000000plain: `seed`: the seed does not match its public key {}",
            f.plain.public_key()
        ),
    );

    // A missing table; not a database at all.
    let (conn, no_users) = copy("no-users.db");
    conn.execute("DROP TABLE nats_users", []).unwrap();
    drop(conn);
    refused(
        &no_users,
        Some(PB_KEY),
        "a missing table",
        "no `nats_users` table",
    );
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, "not sqlite at all, not even close........").unwrap();
    refused(
        &junk,
        Some(PB_KEY),
        "not SQLite",
        &junk.display().to_string(),
    );

    // A malformed JSON field.
    let (conn, bad_json) = copy("bad-json.db");
    conn.execute(
        "UPDATE nats_roles SET publish_permissions = '[\"a.>\"' WHERE id = 'rol00000writer0'",
        [],
    )
    .unwrap();
    drop(conn);
    refused(
        &bad_json,
        Some(PB_KEY),
        "malformed JSON",
        "nats_roles record rol00000writer0: `publish_permissions` is not a JSON list of subjects",
    );
    assert_eq!(
        snapshot(&pool).await,
        empty,
        "a refused run changed the database"
    );

    // A name colliding with a different existing account.
    sqlx::query("INSERT INTO nats.accounts (name) VALUES ('plain')")
        .execute(&pool)
        .await
        .unwrap();
    let before = snapshot(&pool).await;
    refused(
        &f.db,
        Some(PB_KEY),
        "a colliding account",
        "account \"plain\" already exists",
    );
    assert_eq!(
        snapshot(&pool).await,
        before,
        "a refused run changed the database"
    );
}

/// BENCHMARKS.md "Importing 10,000 users (`import pb-nats`)": the fixture plus 10 accounts ×
/// 1,000 users (bcrypt hash, public nkey, per-user lists), timed by hand; no assertion on time.
/// `cargo test --test it import_pbnats::ten_thousand_users -- --ignored --nocapture`
#[tokio::test]
#[ignore]
async fn ten_thousand_users() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_fixture(dir.path());
    let conn = rusqlite::Connection::open(&f.db).unwrap();
    let hash = bcrypt::hash("pw", 10).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    for a in 0..10 {
        let kp = KeyPair::new_account();
        let sk = KeyPair::new_account();
        let (pubs, privs) = signing_json(&[&sk]);
        let id = format!("accbench{a:07}");
        conn.execute(
            "INSERT INTO nats_accounts VALUES (?1, ?2, '', ?3, '', ?4, ?5, ?6, '', 1, 0, '', 0, -1, -1, -1, -1, 0, 0)",
            rusqlite::params![id, format!("bench{a}"), kp.public_key(), enc(&kp.seed().unwrap()), pubs, serde_json::Value::String(enc(&privs)).to_string()],
        )
        .unwrap();
        for u in 0..1000 {
            conn.execute(
                "INSERT INTO nats_users VALUES (?1, '', 0, 1, ?2, 'tk', ?3, '', ?4, 'rol00000writer0', ?5, '', '', '', '', 0, '', 0, 1, ?6, ?7, ?8, '[]')",
                rusqlite::params![
                    format!("usrb{a:03}{u:08}"),
                    hash,
                    format!("b{a}_{u}"),
                    id,
                    KeyPair::new_user().public_key(),
                    format!(r#"["b{a}.{u}.>"]"#),
                    format!(r#"["b{a}.{u}.>", "_INBOX.>"]"#),
                    format!(r#"["b{a}.{u}.secret"]"#),
                ],
            )
            .unwrap();
        }
    }
    conn.execute_batch("COMMIT").unwrap();
    drop(conn);
    if let Ok(keep) = std::env::var("PBNATS_BENCH_COPY") {
        std::fs::copy(&f.db, keep).unwrap();
    }
    let db = fresh_database().await;
    let pool = nats_pg_auth::db::connect(&db, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    for what in [&["--dry-run"][..], &[], &[]] {
        let start = std::time::Instant::now();
        let (code, out, err) = import(&db, &f, what);
        assert_eq!(code, Some(0), "{err}");
        println!(
            "{what:?}: {:.1} s, {}",
            start.elapsed().as_secs_f64(),
            out.lines().next().unwrap_or_default()
        );
    }
}

/// Older pb-nats (its older README): one signing key per record (`signing_public_key`,
/// `signing_seed`), no `system_account_id`, no deny lists, no exports or imports tables. The
/// reader takes missing columns as their defaults and finds "System Account" by name.
#[tokio::test]
async fn an_older_pb_nats_layout_is_read_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old.db");
    let conn = rusqlite::Connection::open(&file).unwrap();
    conn.execute_batch(
        "CREATE TABLE nats_system_operator (id TEXT PRIMARY KEY, name TEXT, public_key TEXT,
            private_key TEXT, seed TEXT, signing_public_key TEXT, signing_private_key TEXT,
            signing_seed TEXT, jwt TEXT, created TEXT, updated TEXT);
         CREATE TABLE nats_accounts (id TEXT PRIMARY KEY, name TEXT, description TEXT,
            public_key TEXT, private_key TEXT, seed TEXT, signing_public_key TEXT,
            signing_private_key TEXT, signing_seed TEXT, jwt TEXT, active BOOLEAN,
            max_connections NUMERIC);
         CREATE TABLE nats_roles (id TEXT PRIMARY KEY, name TEXT, description TEXT,
            publish_permissions TEXT, subscribe_permissions TEXT, max_subscriptions NUMERIC,
            max_data NUMERIC, max_payload NUMERIC);
         CREATE TABLE nats_users (id TEXT PRIMARY KEY, email TEXT, password TEXT, verified BOOLEAN,
            nats_username TEXT, account_id TEXT, role_id TEXT, public_key TEXT, seed TEXT,
            jwt TEXT, active BOOLEAN);",
    )
    .unwrap();
    let op = KeyPair::new_operator();
    let op_signing = KeyPair::new_operator();
    let sys = KeyPair::new_account();
    let acct = KeyPair::new_account();
    let acct_signing = KeyPair::new_account();
    let op_jwt = encode(
        &named(
            &op.public_key(),
            "old-op",
            OperatorClaims {
                signing_keys: vec![op_signing.public_key()],
                system_account: Some(sys.public_key()),
                ..Default::default()
            },
        ),
        &op,
    )
    .unwrap();
    let sys_jwt = encode(
        &named(
            &sys.public_key(),
            "System Account",
            AccountClaims::default(),
        ),
        &op_signing,
    )
    .unwrap();
    conn.execute(
        "INSERT INTO nats_system_operator VALUES ('opr', 'old-op', ?1, '', ?2, ?3, '', ?4, ?5, '', '')",
        rusqlite::params![
            op.public_key(),
            op.seed().unwrap(),
            op_signing.public_key(),
            op_signing.seed().unwrap(),
            op_jwt
        ],
    )
    .unwrap();
    for (id, name, kp, sk) in [
        ("accsys", "System Account", &sys, None),
        ("accold", "legacy", &acct, Some(&acct_signing)),
    ] {
        conn.execute(
            "INSERT INTO nats_accounts VALUES (?1, ?2, '', ?3, '', ?4, ?5, '', ?6, ?7, 1, 25)",
            rusqlite::params![
                id,
                name,
                kp.public_key(),
                kp.seed().unwrap(),
                sk.map(|k| k.public_key()),
                sk.map(|k| k.seed().unwrap()),
                if id == "accsys" {
                    sys_jwt.clone()
                } else {
                    String::new()
                }
            ],
        )
        .unwrap();
    }
    conn.execute_batch(
        r#"INSERT INTO nats_roles VALUES ('rol', 'reader', '', '["r.>"]', '["r.>", "_INBOX.>"]', 100, -1, -1);"#,
    )
    .unwrap();
    conn.execute(
        "INSERT INTO nats_users VALUES ('usr', 'x@example.com', ?1, 1, 'olduser', 'accold', 'rol', ?2, '', '', 1)",
        rusqlite::params![bcrypt::hash("pw", 4).unwrap(), KeyPair::new_user().public_key()],
    )
    .unwrap();
    drop(conn);

    let db = fresh_database().await;
    let pool = nats_pg_auth::db::connect(&db, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    let (code, out, err) = import_with(&db, &file, None, &["--dry-run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("system account System Account"), "{out}");
    assert!(out.contains("key legacy signing key"), "{out}");
    assert!(out.contains("user legacy/olduser"), "{out}");
    let (code, out, err) = import_with(&db, &file, None, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (sys_key, max_conns, max_subs, signing_seeded): (String, i64, i64, bool) = sqlx::query_as(
        "SELECT (SELECT public_key FROM nats.service_identities WHERE kind = 'sys_account'),
                (SELECT max_connections FROM nats.accounts WHERE name = 'legacy'),
                (SELECT max_subscriptions FROM nats.roles WHERE name = 'reader'),
                (SELECT seed IS NOT NULL FROM nats.account_keys WHERE public_key = $1)",
    )
    .bind(acct_signing.public_key())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(sys_key, sys.public_key());
    assert_eq!(max_conns, 25);
    assert_eq!(max_subs, 100);
    assert!(signing_seeded);
    let (code, out, err) = import_with(&db, &file, None, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("nothing to do"), "{out}");
}
