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
//! `cargo bench --bench snapshot` (`SNAPSHOT_USERS=100000` for a quick run; `SNAPSHOT_DIR` to
//! write somewhere else than a temporary directory under target/).

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
}
