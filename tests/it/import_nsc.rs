//! `nats-pg-auth import nsc` (issue 16): an operator-mode deployment managed with nsc moves to
//! the service, and every existing `.creds` file keeps working through the cut-over.
//!
//! The fixture is an nsc store as nsc writes it (no nsc binary here: the test signs the JWTs
//! with the project's encoder and writes nsc's layout): an operator with a signing key, its
//! system account, account A (a signing key, a private service export, a revoked user) and
//! account B (importing the service with an activation token; its seed is left out of the keys
//! directory), users with `.creds` files. The same checks run against nats-server on the store
//! (memory resolver, as `nsc generate config --mem-resolver` writes it), then against the
//! server on the fragment `init` writes after the import, with the callout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use base64::Engine as _;
use nats_pg_auth::jwt::claims::{
    AccountClaims, ActivationClaims, Export, ExportType, Import, OperatorClaims, Permission,
    ResponsePermission, UserClaims,
};
use nats_pg_auth::jwt::{encode, Claims};
use nkeys::KeyPair;
use tokio::sync::mpsc;

use crate::common::imports::*;
use crate::common::*;

const KEY: [u8; 32] = [9; 32];

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

fn user_claims(publish: Permission, subscribe: Permission) -> UserClaims {
    let mut u = UserClaims::default();
    u.permissions.publish = publish;
    u.permissions.subscribe = subscribe;
    u.limits.subs = -1;
    u.limits.data = -1;
    u.limits.payload = -1;
    u
}

fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The store as nsc leaves it, and what the test needs to know about it.
struct Store {
    root: PathBuf,
    nkeys: PathBuf,
    operator: KeyPair,
    sys: KeyPair,
    a: KeyPair,
    b: KeyPair,
    operator_jwt: String,
    /// SYS, A, B account JWTs (the old server's preload).
    account_jwts: Vec<(String, String)>,
}

impl Store {
    fn account_dir(&self, name: &str) -> PathBuf {
        self.root.join("OP").join("accounts").join(name)
    }

    fn creds(&self, account: &str, user: &str) -> String {
        std::fs::read_to_string(
            self.nkeys
                .join("creds")
                .join("OP")
                .join(account)
                .join(format!("{user}.creds")),
        )
        .unwrap()
    }

    fn seed_path(&self, public_key: &str) -> PathBuf {
        self.nkeys
            .join("keys")
            .join(&public_key[..1])
            .join(&public_key[1..3])
            .join(format!("{public_key}.nk"))
    }
}

fn write_seed(nkeys: &Path, kp: &KeyPair) {
    let pk = kp.public_key();
    let dir = nkeys.join("keys").join(&pk[..1]).join(&pk[1..3]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{pk}.nk")), kp.seed().unwrap()).unwrap();
}

fn write_store(dir: &Path) -> Store {
    let root = dir.join("stores");
    let nkeys = dir.join("nkeys");
    let op_dir = root.join("OP");
    let operator = KeyPair::new_operator();
    let operator_signing = KeyPair::new_operator();
    let sys = KeyPair::new_account();
    let a = KeyPair::new_account();
    let a_signing = KeyPair::new_account();
    let b = KeyPair::new_account();

    let op = OperatorClaims {
        signing_keys: vec![operator_signing.public_key()],
        system_account: Some(sys.public_key()),
        ..Default::default()
    };
    let operator_jwt = encode(&named(&operator.public_key(), "OP", op), &operator).unwrap();

    // SYS, as `nsc add operator --sys` makes it (signed by the operator identity).
    let sys_jwt = encode(
        &named(&sys.public_key(), "SYS", AccountClaims::default()),
        &operator,
    )
    .unwrap();

    let mallory = KeyPair::new_user();
    let mut a_claims = AccountClaims {
        signing_keys: vec![a_signing.public_key()],
        exports: vec![Export {
            name: "echo".into(),
            subject: "svc.echo".into(),
            export_type: ExportType::Service,
            token_req: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    a_claims.limits.conn = 50;
    // Mallory's JWTs are revoked (`nsc revocations add-user`).
    a_claims
        .revocations
        .insert(mallory.public_key(), nats_pg_auth::jwt::now_unix() + 5);
    let a_jwt = encode(&named(&a.public_key(), "A", a_claims), &operator_signing).unwrap();

    let activation = encode(
        &named(
            &b.public_key(),
            "echo",
            ActivationClaims::new("svc.echo", ExportType::Service, None),
        ),
        &a,
    )
    .unwrap();
    let b_claims = AccountClaims {
        imports: vec![Import {
            name: "echo".into(),
            subject: "svc.echo".into(),
            account: a.public_key(),
            token: Some(activation),
            local_subject: Some("echo".into()),
            import_type: ExportType::Service,
            share: false,
            allow_trace: false,
        }],
        ..Default::default()
    };
    let b_jwt = encode(&named(&b.public_key(), "B", b_claims), &operator).unwrap();

    for (name, jwt) in [("SYS", &sys_jwt), ("A", &a_jwt), ("B", &b_jwt)] {
        let d = op_dir.join("accounts").join(name);
        std::fs::create_dir_all(d.join("users")).unwrap();
        std::fs::write(d.join(format!("{name}.jwt")), jwt).unwrap();
    }
    std::fs::write(op_dir.join("OP.jwt"), &operator_jwt).unwrap();

    // Users: alice signed by A's signing key, ann by A's identity key, bob by B's, mallory
    // (revoked) by A's.
    let mut alice = user_claims(
        perm(&["a.>"], &["a.secret"]),
        perm(&["svc.>", "a.>", "_INBOX.>"], &[]),
    );
    alice.issuer_account = Some(a.public_key());
    alice.permissions.response = Some(ResponsePermission { max: 1, ttl: 0 });
    let bob = user_claims(
        perm(&["echo", "_INBOX.>"], &[]),
        perm(&["_INBOX.>", "b.>"], &["b.hidden"]),
    );
    let users: [(&str, &str, UserClaims, &KeyPair, KeyPair); 4] = [
        ("A", "alice", alice, &a_signing, KeyPair::new_user()),
        (
            "A",
            "ann",
            user_claims(perm(&[], &[]), perm(&[], &[])),
            &a,
            KeyPair::new_user(),
        ),
        (
            "A",
            "mallory",
            user_claims(perm(&[], &[]), perm(&[], &[])),
            &a,
            mallory,
        ),
        ("B", "bob", bob, &b, KeyPair::new_user()),
    ];
    for (account, name, claims, signer, kp) in users {
        let jwt = encode(&named(&kp.public_key(), name, claims), signer).unwrap();
        std::fs::write(
            op_dir
                .join("accounts")
                .join(account)
                .join("users")
                .join(format!("{name}.jwt")),
            &jwt,
        )
        .unwrap();
        let creds_dir = nkeys.join("creds").join("OP").join(account);
        std::fs::create_dir_all(&creds_dir).unwrap();
        std::fs::write(
            creds_dir.join(format!("{name}.creds")),
            creds(&jwt, &kp.seed().unwrap()),
        )
        .unwrap();
        write_seed(&nkeys, &kp);
    }
    // B's identity seed is not in the keys directory (kept elsewhere, say).
    for kp in [&operator, &operator_signing, &sys, &a, &a_signing] {
        write_seed(&nkeys, kp);
    }
    Store {
        root,
        nkeys,
        account_jwts: vec![
            (sys.public_key(), sys_jwt),
            (a.public_key(), a_jwt),
            (b.public_key(), b_jwt),
        ],
        operator,
        sys,
        a,
        b,
        operator_jwt,
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

async fn user(
    url: &str,
    store: &Store,
    account: &str,
    name: &str,
) -> (Client, mpsc::UnboundedReceiver<Event>) {
    connect_creds(url, &store.creds(account, name))
        .await
        .unwrap_or_else(|e| panic!("{name}'s .creds logs in at {url}: {e}"))
}

/// `sql` on the row of `user` (account, name) cuts its live `.creds` connection off within
/// 10 s (`cut` names it), and its `.creds` is refused from then on (`logs_in` is the panic).
async fn row_cuts_creds_off(
    env: &TestEnv,
    store: &Store,
    (account, name): (&str, &str),
    sql: &str,
    cut: &str,
    logs_in: &str,
) {
    let (client, mut events) = user(&env.url(), store, account, name).await;
    settle(&client).await;
    let start = std::time::Instant::now();
    env.sql(sql).await;
    disconnected_by(&mut events, start, Duration::from_secs(10), cut).await;
    let Err(refused) = connect_creds(&env.url(), &store.creds(account, name)).await else {
        panic!("{logs_in}");
    };
    assert!(is_auth_refusal(&refused), "{refused}");
}

/// The store's rights, as its `.creds` users see them.
async fn same_rights(url: &str, what: &str, store: &Store) {
    // The revoked user stays out.
    let refused = connect_creds(url, &store.creds("A", "mallory"))
        .await
        .err()
        .unwrap_or_else(|| panic!("{what}: mallory's revoked JWT logged in"));
    assert!(is_auth_refusal(&refused), "{what}: {refused}");

    let (alice, mut alice_events) = user(url, store, "A", "alice").await;
    let (ann, _ann_events) = user(url, store, "A", "ann").await;
    let (bob, mut bob_events) = user(url, store, "B", "bob").await;

    // Allowed publish delivered.
    let mut watch = ann.subscribe("a.>").await.unwrap();
    settle(&ann).await;
    alice.publish("a.hello", "hi".into()).await.unwrap();
    delivered_on(&mut watch, "a.hello", what, "alice's allowed publish").await;

    // Denied publish refused; bob's subscribe deny.
    publish_is_violation(&alice, &mut alice_events, "a.secret", "no").await;
    let _hidden = subscribe_is_violation(&bob, &mut bob_events, "b.hidden").await;

    // The cross-account service answers (B imports A's private export with its activation).
    service_answers(&alice, &bob, what, false).await;
    publish_is_violation(&bob, &mut bob_events, "a.hello", "x").await;
}

/// Every row an import writes, to prove a run changed nothing.
async fn snapshot(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar(
        "SELECT concat_ws(' | ',
            (SELECT string_agg(to_jsonb(s)::text, ',' ORDER BY kind) FROM (SELECT kind, name, public_key, jwt FROM nats.service_identities) s),
            (SELECT string_agg(to_jsonb(a)::text, ',' ORDER BY id) FROM (SELECT id, name, public_key, updated_at, max_connections FROM nats.accounts) a),
            (SELECT string_agg(to_jsonb(k)::text, ',' ORDER BY id) FROM (SELECT id, account_id, kind, public_key, seed IS NULL AS no_seed FROM nats.account_keys) k),
            (SELECT string_agg(to_jsonb(r)::text, ',' ORDER BY public_key) FROM nats.account_revocations r),
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

fn import(db: &str, store: &Store, extra: &[&str]) -> (Option<i32>, String, String) {
    import_at(db, &store.root, &store.nkeys, extra)
}

fn import_at(db: &str, root: &Path, nkeys: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let key = key_flag();
    let mut args = vec![
        "--encryption-key",
        key.as_str(),
        "import",
        "nsc",
        "--store",
        root.to_str().unwrap(),
        "--keys",
        nkeys.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_cli(&args, Some(db), "")
}

fn old_server_conf(port: u16, store: &Store) -> String {
    let preload: String = store
        .account_jwts
        .iter()
        .map(|(k, j)| format!("  {k}: {j}\n"))
        .collect();
    format!(
        "listen: 127.0.0.1:{port}\noperator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n{preload}}}\n",
        store.operator_jwt,
        store.sys.public_key()
    )
}

fn no_secret(store: &Store, out: &str) {
    for kp in [&store.operator, &store.sys, &store.a] {
        let seed = kp.seed().unwrap();
        assert!(!out.contains(&seed), "a seed was printed: {out}");
    }
}

#[tokio::test]
async fn an_nsc_deployment_moves_and_every_creds_file_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(dir.path());

    // Before: nats-server on the store's JWTs.
    let port = free_port();
    let old_dir = dir.path().join("old");
    let mut old = NatsServer::start_plain(port, &old_dir, &old_server_conf(port, &store)).await;
    same_rights(&old.url(), "the old server", &store).await;
    old.stop();

    // The dry run, then the import, into the fresh database (before `init`).
    let outputs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let before_init: BeforeInit = {
        let outputs = outputs.clone();
        let (root, nkeys) = (store.root.clone(), store.nkeys.clone());
        Box::new(move |db: &str| {
            let dry = import_at(db, &root, &nkeys, &["--dry-run"]);
            let real = import_at(db, &root, &nkeys, &[]);
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
    assert!(
        out.contains("create                   operator OP"),
        "{out}"
    );
    assert!(
        out.contains("create                   user A/A/alice"),
        "{out}"
    );
    no_secret(&store, out);
    let (code, out, err) = &runs[1];
    assert_eq!(*code, Some(0), "{err}");
    // The dry run wrote nothing: the real run still creates the operator.
    assert!(out.starts_with("imported in one transaction"), "{out}");
    assert!(out.contains("operators                   1"), "{out}");
    no_secret(&store, out);
    no_secret(&store, err);

    // `init` adopted the operator and the system account: the servers' trust is unchanged.
    let fragment = std::fs::read_to_string(env.dir.path().join("fragment.conf")).unwrap();
    assert!(
        fragment.contains(&format!("system_account: {}", store.sys.public_key())),
        "{fragment}"
    );
    let op_line = fragment
        .lines()
        .find_map(|l| l.strip_prefix("operator: "))
        .unwrap();
    let op: Claims<OperatorClaims> = nats_pg_auth::jwt::decode_verified(op_line).unwrap();
    assert_eq!(op.sub, store.operator.public_key());
    assert_eq!(op.iss, store.operator.public_key());
    // The accounts keep their keys.
    assert_eq!(env.account_key("A").await, store.a.public_key());
    assert_eq!(env.account_key("B").await, store.b.public_key());
    env.wait_synced("A").await;
    env.wait_synced("B").await;
    // Imported seeds are sealed like the service's own; B's identity seed was not in the keys
    // directory, so B's key has none (B signs with the service's key it got beside it).
    let plain = crate::common::imports::unsealed_seeds(&env).await;
    assert_eq!(plain, 0, "a seed is stored unsealed");
    let b_seed: Option<String> =
        sqlx::query_scalar("SELECT seed FROM nats.account_keys WHERE public_key = $1")
            .bind(store.b.public_key())
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(b_seed.is_none());

    // After: the same .creds, the same rights.
    same_rights(&env.url(), "the server on the fragment", &store).await;

    // A user inserted with SQL logs in to an imported account through the callout.
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
    assert_eq!(user_info(&carol).await["account"], store.a.public_key());

    // Deactivating ann's row cuts her .creds connection off, and refuses it from then on.
    row_cuts_creds_off(
        &env,
        &store,
        ("A", "ann"),
        "UPDATE nats.users SET active = false WHERE username = 'A/ann'",
        "ann's .creds connection after her row was deactivated",
        "ann's .creds logs in although her row is inactive",
    )
    .await;
    // Reactivated, the same .creds logs in again.
    env.sql("UPDATE nats.users SET active = true WHERE username = 'A/ann'")
        .await;
    let mut back = None;
    let start = std::time::Instant::now();
    while back.is_none() && start.elapsed() < Duration::from_secs(10) {
        back = connect_creds(&env.url(), &store.creds("A", "ann"))
            .await
            .ok();
    }
    back.expect("ann's .creds logs in again once reactivated");

    // A second run changes nothing and says so; so does a dry run.
    let before = snapshot(&env.pool).await;
    let (code, out, err) = import(&env.database_url, &store, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("nothing to do: the database already matches the source"),
        "{out}"
    );
    let (code, out, err) = import(&env.database_url, &store, &["--dry-run", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(json["unchanged"], true, "{out}");
    assert_eq!(
        snapshot(&env.pool).await,
        before,
        "a run changed the database"
    );

    // B's seed turns up later: a run names the differing key and changes nothing; --update
    // stores it (sealed); .creds users are unaffected either way.
    write_seed(&store.nkeys, &store.b);
    let (code, _, err) = import(&env.database_url, &store, &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!(
            "1 row(s) exist and differ from the source (key B identity key {}: seed)",
            store.b.public_key()
        )),
        "{err}"
    );
    assert_eq!(
        snapshot(&env.pool).await,
        before,
        "a refused run changed the database"
    );
    let (code, _, err) = import(&env.database_url, &store, &["--update"]);
    assert_eq!(code, Some(0), "{err}");
    no_secret(&store, &err);
    let b_seed: Option<String> =
        sqlx::query_scalar("SELECT seed FROM nats.account_keys WHERE public_key = $1")
            .bind(store.b.public_key())
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(
        b_seed.is_some_and(|s| s.starts_with("enc:")),
        "B's seed is stored sealed"
    );
    let (code, out, err) = import(&env.database_url, &store, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("nothing to do"), "{out}");

    // `init` again with another operator name is refused with one line.
    let (code, _, err) = run_cli(
        &[
            "--encryption-key",
            &key_flag(),
            "init",
            "--operator-name",
            "other",
            "--resolver-dir",
            dir.path().join("jwt2").to_str().unwrap(),
            "--out",
            "-",
        ],
        Some(&env.database_url),
        "",
    );
    assert_eq!(code, Some(64), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("\"OP\""), "{err}");

    // Deleting an imported user's row revokes its JWT for good (not only while a row says so).
    row_cuts_creds_off(
        &env,
        &store,
        ("B", "bob"),
        "DELETE FROM nats.users WHERE username = 'B/bob'",
        "bob's .creds connection after his row was deleted",
        "bob's .creds logs in although his row was deleted",
    )
    .await;
}

#[tokio::test]
async fn corrupt_stores_and_colliding_accounts_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(dir.path());
    let db = fresh_database().await;
    let pool = nats_pg_auth::db::connect(&db, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    let empty = snapshot(&pool).await;
    let refused = |what: &str, want: &str| {
        let (code, out, err) = import(&db, &store, &[]);
        refused_with_one_line(what, code, &out, &err, want);
        no_secret(&store, &err);
    };

    // `init` on a database without an operator still needs its name.
    let (code, _, err) = run_cli(
        &[
            "init",
            "--resolver-dir",
            dir.path().join("jwt").to_str().unwrap(),
            "--out",
            "-",
        ],
        Some(&db),
        "",
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--operator-name is required"), "{err}");
    // The operator's folder and `keys/` itself are accepted as well as the stores root and
    // NKEYS_PATH.
    let (code, out, err) = import_at(
        &db,
        &store.root.join("OP"),
        &store.nkeys.join("keys"),
        &["--dry-run"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("create                   key A signing key"),
        "{out}"
    );

    // A seed that is not the seed of its key (A's file holds another account's seed).
    let a_seed = store.seed_path(&store.a.public_key());
    let good = std::fs::read_to_string(&a_seed).unwrap();
    std::fs::write(&a_seed, KeyPair::new_account().seed().unwrap()).unwrap();
    refused(
        "a wrong seed",
        &format!(
            "{}: the seed does not match its public key",
            a_seed.display()
        ),
    );
    std::fs::write(&a_seed, good).unwrap();

    // A malformed account JWT.
    let b_jwt = store.account_dir("B").join("B.jwt");
    let good = std::fs::read_to_string(&b_jwt).unwrap();
    std::fs::write(&b_jwt, "eyJhbGciOi.not-a-jwt").unwrap();
    refused(
        "a malformed JWT",
        &format!("{}: not a valid NATS JWT", b_jwt.display()),
    );
    // A JWT whose signature does not verify (a byte of the payload changed).
    let mut tampered = good.clone().into_bytes();
    let dot = good.find('.').unwrap() + 5;
    tampered[dot] = if tampered[dot] == b'A' { b'B' } else { b'A' };
    std::fs::write(&b_jwt, tampered).unwrap();
    refused(
        "a tampered JWT",
        &format!("{}: not a valid NATS JWT", b_jwt.display()),
    );
    // Account claims the service would drop and that change rights are refused, not dropped:
    // default permissions (users without permissions would get everything).
    let mut b_claims: Claims<AccountClaims> = nats_pg_auth::jwt::decode_verified(&good).unwrap();
    b_claims.nats.default_permissions = Some(Default::default());
    b_claims.nats.default_permissions.as_mut().unwrap().publish = perm(&["b.>"], &[]);
    std::fs::write(&b_jwt, encode(&b_claims, &store.operator).unwrap()).unwrap();
    refused(
        "default permissions",
        &format!(
            "{}: account \"B\" sets `default_permissions`",
            b_jwt.display()
        ),
    );
    // An activation token signed by someone other than the exporter is not turned into a grant.
    let mut b_claims: Claims<AccountClaims> = nats_pg_auth::jwt::decode_verified(&good).unwrap();
    let forged = encode(
        &named(
            &store.b.public_key(),
            "echo",
            ActivationClaims::new("svc.echo", ExportType::Service, None),
        ),
        &KeyPair::new_account(),
    )
    .unwrap();
    b_claims.nats.imports[0].token = Some(forged);
    std::fs::write(&b_jwt, encode(&b_claims, &store.operator).unwrap()).unwrap();
    refused(
        "a forged activation",
        "the activation token of import \"echo\" is not issued by the exporting account \"A\"",
    );
    std::fs::write(&b_jwt, good).unwrap();
    assert_eq!(
        snapshot(&pool).await,
        empty,
        "a refused run changed the database"
    );

    // Keys are service-owned: an administrator cannot import them.
    let (_, admin_url) = create_login_role(&pool, &db, "nats_pg_auth_admin").await;
    let (code, _, err) = import(&admin_url, &store, &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("only the schema owner may write"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A name colliding with a different existing account.
    sqlx::query("INSERT INTO nats.accounts (name) VALUES ('A')")
        .execute(&pool)
        .await
        .unwrap();
    let before = snapshot(&pool).await;
    refused("a colliding account", "account \"A\" already exists");
    assert_eq!(
        snapshot(&pool).await,
        before,
        "a refused run changed the database"
    );
}

/// Issue 18 item 6: an import run with a key that is not the one the database's seeds are
/// sealed with now (a shell still holding the previous key after `rotate-encryption-key`) is
/// refused before it seals anything: the next start could not open those seeds.
#[tokio::test]
async fn an_import_with_a_key_that_is_not_the_databases_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(dir.path());
    let db = fresh_database().await;
    let pool = nats_pg_auth::db::connect(&db, 2).await.unwrap();
    nats_pg_auth::db::migrate(&pool).await.unwrap();
    // The database's seeds are under another key than the import's (KEY).
    let other = [7u8; 32];
    let (code, out, err) = import(&db, &store, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = run_cli(
        &[
            "--encryption-key",
            &key_flag(),
            "rotate-encryption-key",
            "--new-key",
            &base64::engine::general_purpose::STANDARD.encode(other),
        ],
        Some(&db),
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let before = snapshot(&pool).await;
    let (code, out, err) = import(&db, &store, &["--update"]);
    refused_with_one_line(
        "a stale key",
        code,
        &out,
        &err,
        &format!(
            "the stored seeds are sealed with key id {}, but NATS_PG_AUTH_ENCRYPTION_KEY is key id {}",
            nats_pg_auth::keys::key_id(&other),
            nats_pg_auth::keys::key_id(&KEY)
        ),
    );
    assert_eq!(snapshot(&pool).await, before, "nothing changed");
}
