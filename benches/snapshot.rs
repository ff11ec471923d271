//! Cost of the login copy's sealed snapshot (`copy::snapshot`, issue 17): one write and one
//! load of a copy of `SNAPSHOT_USERS` users (default 1,000,000), as a replica does it.
//!
//! No Postgres: the copy is filled in memory with rows shaped like production ones (a bcrypt
//! hash per user, usernames like `device-0000001`, 100 roles in 10 accounts, every 5th user with
//! a token, every 10th with an nkey). What is timed is what `serve` does:
//! - write: export the table under its read lock, encode (postcard), seal (AES-256-GCM in
//!   place), write a temporary file, fsync, rename, fsync the directory;
//! - load: read, open, decode, rebuild every login (shapes shared, signing keys parsed once
//!   per shape), install as the copy.
//!
//! Then the same snapshot is put into and read back from JetStream (see `jetstream` below).
//!
//! `cargo bench --bench snapshot` (`SNAPSHOT_USERS=100000` for a quick run; `SNAPSHOT_DIR` to
//! write somewhere else than a temporary directory under target/; `NATS_SERVER_BIN` for the
//! JetStream part).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nats_pg_auth::callout::login::{Issuer, Login, Shape, Signing};
use nats_pg_auth::callout::permissions::{Lists, Merged, Response};
use nats_pg_auth::copy::snapshot::{self, Writer, FILE_NAME};
use nats_pg_auth::copy::{CacheSettings, CopyLookup, LoginCache};
use nats_pg_auth::db::identities::IdentityRow;
use nats_pg_auth::db::logins::TokenPart;
use nats_pg_auth::keys::SeedCipher;

fn shapes() -> Vec<Arc<Shape>> {
    let mut out = Vec::new();
    for account in 0..10i64 {
        let kp = nkeys::KeyPair::new_account();
        let issuer = Arc::new(Issuer {
            account: nkeys::KeyPair::new_account().public_key(),
            signing_public_key: kp.public_key(),
            keypair: kp,
        });
        for role in 0..10i64 {
            let subjects = |p: &str| (0..3).map(|i| format!("{p}.{role}.{i}.>")).collect();
            out.push(Arc::new(Shape {
                role_id: Some(account * 10 + role),
                account_id: account,
                account_name: format!("tenant-{account}").into(),
                account_active: true,
                account_jetstream_disk: false,
                foreign_role: false,
                allowed_sources: None,
                allowed_connection_types: None,
                signing: Signing::Ready(issuer.clone()),
                merged: Arc::new(Merged {
                    publish: Lists {
                        allow: subjects("telemetry"),
                        deny: vec!["telemetry.admin.>".into()],
                    },
                    subscribe: Lists {
                        allow: subjects("commands"),
                        deny: vec![],
                    },
                    response: Some(Response {
                        max: 1,
                        ttl: Duration::from_secs(5),
                    }),
                    max_subscriptions: 100,
                    max_data: -1,
                    max_payload: 1_048_576,
                }),
                ttl: Duration::from_secs(3600),
                signing_key_pending: false,
            }));
        }
    }
    out
}

fn filled(n: usize) -> LoginCache {
    let shapes = shapes();
    let nkey = nkeys::KeyPair::new_user().public_key();
    let cache = LoginCache::new(CacheSettings::default());
    let ticket = cache.load_ticket();
    let mut tokens = Vec::new();
    let mut chunk = Vec::with_capacity(4096);
    for i in 0..n {
        let id = i as i64 + 1;
        chunk.push(Arc::new(Login {
            user_id: id,
            username: Arc::from(format!("device-{i:07}")),
            // A bcrypt hash is 60 characters; each user's is different in production.
            password_hash: Some(format!("$2b$10$N9qo8uLOickgx2ZMRZoMye{i:0>31}").into_boxed_str()),
            nkey: (i % 10 == 0).then(|| format!("{}{i:07}", &nkey[..49]).into_boxed_str()),
            user_active: i % 50 != 0,
            mqtt_client_ids: Box::default(),
            shape: shapes[i % shapes.len()].clone(),
        }));
        if i % 5 == 0 {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&(i as u64).to_le_bytes());
            tokens.push(TokenPart {
                user_id: id,
                token_id: id,
                token_sha256: digest.to_vec(),
                token_expires_at: None,
                token_revoked_at: None,
            });
        }
        if chunk.len() == 4096 {
            cache.load_users(std::mem::take(&mut chunk), ticket);
        }
    }
    cache.load_users(chunk, ticket);
    cache.finish_load(ticket, tokens, vec![]);
    cache.set_live();
    cache
}

fn main() {
    let n: usize = std::env::var("SNAPSHOT_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let tmp;
    let dir = match std::env::var_os("SNAPSHOT_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            std::fs::create_dir_all("target").ok();
            tmp = tempfile::tempdir_in("target").expect("temporary directory");
            tmp.path().to_owned()
        }
    };
    let started = Instant::now();
    let cache = filled(n);
    println!(
        "filled a copy of {} users, {} tokens in {:.2?}",
        cache.copy_size().0,
        cache.copy_size().1,
        started.elapsed()
    );
    let cipher = SeedCipher::new(Some([7; 32]));
    let writer = Writer {
        dir: Some(dir.clone()),
        jetstream: None,
        every: snapshot::REWRITE_EVERY,
        cipher: cipher.clone(),
        operator: nkeys::KeyPair::new_operator().public_key(),
        identities: vec![IdentityRow {
            kind: "operator".into(),
            name: "bench".into(),
            public_key: "O".repeat(56),
            seed: "enc:v1:placeholder".into(),
            jwt: Some("eyJ0eXAiOiJKV1QifQ.e30.sig".into()),
        }],
    };
    for round in 1..=3 {
        let t = Instant::now();
        let export = cache.export();
        let exported = t.elapsed();
        let (_, w) = writer
            .write_now(&export, SystemTime::now())
            .expect("snapshot written");
        drop(export);
        let write = t.elapsed();

        let t = Instant::now();
        let opened = snapshot::open_newest(&dir, &cipher).expect("snapshot opens");
        let restored = LoginCache::new(CacheSettings::default());
        let users = opened.install(&restored).expect("installs").expect("fresh");
        let load = t.elapsed();
        assert_eq!(users, n);
        assert!(matches!(
            restored.copy_user("device-0000001"),
            CopyLookup::Found(_)
        ));
        println!(
            "round {round}: write {:.2?} (export under the read lock {:.0?}, encode+seal+fsync {:.2?}), \
             load {:.2?}; {} bytes = {:.1} bytes/user",
            write,
            exported,
            write - exported,
            load,
            w.bytes,
            w.bytes as f64 / n as f64
        );
        drop(restored);
    }
    println!("file: {}", dir.join(FILE_NAME).display());
    jetstream(&cache, &writer, n, &dir);
}

/// The same snapshot put into and read back from JetStream as the sync leader and a starting
/// replica do (`copy::snapshot_jetstream`: an Object Store bucket, 512 KiB chunks each
/// acknowledged, the previous version's chunks purged), on local nats-servers 2.15.1 with
/// JetStream (file storage): one server (one replica), then a 3-server cluster (3 replicas, what
/// the Kubernetes example runs). Authentication does not change the data path, so the servers
/// run without operator mode. Skipped when no nats-server is found (`NATS_SERVER_BIN`).
fn jetstream(cache: &LoginCache, writer: &Writer, n: usize, dir: &std::path::Path) {
    for servers in [1, 3] {
        if !jetstream_on(cache, writer, n, dir, servers) {
            return;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn jetstream_on(
    cache: &LoginCache,
    writer: &Writer,
    n: usize,
    dir: &std::path::Path,
    servers: usize,
) -> bool {
    use nats_pg_auth::copy::snapshot_jetstream::{self as js, BUCKET, OBJECT};
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let ports: Vec<(u16, u16)> = (0..servers).map(|_| (free_port(), free_port())).collect();
    let mut children = Vec::new();
    for (i, (port, route)) in ports.iter().enumerate() {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
            .args(["-n", &format!("bench-{i}"), "-sd"])
            .arg(dir.join(format!("jetstream-{servers}-{i}")))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if servers > 1 {
            let routes: Vec<String> = ports
                .iter()
                .map(|(_, r)| format!("nats://127.0.0.1:{r}"))
                .collect();
            cmd.args([
                "--cluster_name",
                "bench",
                "--cluster",
                &format!("nats://127.0.0.1:{route}"),
                "--routes",
                &routes.join(","),
            ]);
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(_) => {
                println!("no nats-server ({bin}): JetStream not measured");
                return false;
            }
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("nats://127.0.0.1:{}", ports[0].0);
        let client = loop {
            match async_nats::connect(&url).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let context = async_nats::jetstream::new(client);
        // A cluster elects its JetStream meta leader first: retry until the bucket exists.
        let started = Instant::now();
        let bucket = loop {
            match context
                .create_object_store(async_nats::jetstream::object_store::Config {
                    bucket: BUCKET.into(),
                    num_replicas: servers,
                    ..Default::default()
                })
                .await
            {
                Ok(b) => break b,
                Err(e) if started.elapsed() < Duration::from_secs(30) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("bucket: {e}"),
            }
        };
        for round in 1..=3 {
            let export = cache.export();
            let sealed = snapshot::seal(
                &writer.cipher,
                &writer.operator,
                &writer.identities,
                &export,
                SystemTime::now(),
            )
            .expect("sealed");
            drop(export);
            let t = Instant::now();
            js::put_object(&bucket, OBJECT, &sealed.bytes)
                .await
                .expect("put");
            let put = t.elapsed();
            let t = Instant::now();
            let bytes = js::read_object(&bucket, OBJECT)
                .await
                .expect("get")
                .expect("there");
            let get = t.elapsed();
            let t = Instant::now();
            let opened = snapshot::open_bytes(
                std::path::Path::new("jetstream"),
                secrecy::zeroize::Zeroizing::new(bytes),
                None,
                &writer.cipher,
            )
            .expect("opens");
            let restored = LoginCache::new(CacheSettings::default());
            assert_eq!(opened.install(&restored).unwrap(), Some(n));
            let install = t.elapsed();
            let mut stream = context
                .get_stream(format!("OBJ_{BUCKET}"))
                .await
                .expect("stream");
            let stored = stream.info().await.expect("info").state.bytes;
            println!(
                "jetstream, {servers} server(s), {servers} replica(s), round {round}: seal {:.2?}, put {put:.2?}, \
                 get {get:.2?}, open+install {install:.2?}; object {} bytes, stream holds {stored} bytes after the put",
                sealed.took,
                sealed.bytes.len(),
            );
        }
    });
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    true
}
