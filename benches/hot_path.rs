//! Micro-benchmarks of the CPU work in one callout decision (issue 4, scenario 8), with real
//! inputs built by the crate's own jwt/keys modules: no Postgres, no network.
//!
//!   cargo bench --bench hot_path            # all
//!   cargo bench --bench hot_path -- merge   # a filter
//!
//! What each measures:
//! - `request/open+verify`: xkey open (curve25519 + xsalsa20poly1305), ed25519 verify of the
//!   server's request JWT, claim checks — every request pays this.
//! - `request/verify (plain)`: the same without the xkey box, to split the two costs.
//! - `permissions/merge`, `login/prepare`: what a login-cache miss adds (the cache stores the
//!   prepared login, so a hit pays neither).
//! - `mint/user jwt+response+seal`: user JWT mint + ed25519 sign, response JWT sign, xkey seal.
//! - `keys/open signing seed`: AES-256-GCM open + seed parse, what the issuer cache saves.
//! - `credentials/hmac+lookup`: a verified-credential cache hit. `credentials/bcrypt cost 10`:
//!   what that hit saves.
//! - `decision/warm cpu`: everything a warm login costs except the NATS hops, as the callout
//!   does it (xkey boxes precomputed per server).
//! - `doors/nkey signature`: what an nkey login adds (ed25519 verify of the client's signature
//!   over the server nonce). `doors/certificate parse+map`: what a certificate login adds (PEM +
//!   X.509 parse of the verified leaf, RFC 2253 subject, SHA-256 fingerprint, validity check);
//!   the certificate is made by `openssl` when the bench starts (skipped without it).

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use nats_pg_auth::callout::login::{Issuer, Login, Signing};
use nats_pg_auth::callout::permissions::{self, Defaults};
use nats_pg_auth::callout::xbox::ServerBoxes;
use nats_pg_auth::callout::{certificate, credentials, mint, nkey, request};
use nats_pg_auth::copy::{CacheSettings, LoginCache};
use nats_pg_auth::jwt;
use nats_pg_auth::keys::{self, SeedCipher};
use nkeys::{KeyPair, XKey};

use common::{Credential, FakeServer};

struct Fixture {
    auth: KeyPair,
    auth_xkey: XKey,
    server: FakeServer,
    sealed: async_nats::Message,
    plain: Vec<u8>,
    cipher: SeedCipher,
    signing: KeyPair,
    stored_seed: String,
    account: KeyPair,
}

fn fixture() -> Fixture {
    let auth = KeyPair::new_account();
    let auth_xkey = XKey::new();
    let server = FakeServer::new(&auth.public_key(), &auth_xkey.public_key());
    let cred = Credential::Password("sensor-0001", "correct horse battery staple");
    let sealed = server.message(&cred);
    let plain = server.request_jwt(&cred).into_bytes();
    let cipher = SeedCipher::new(Some([7u8; 32]));
    let signing = KeyPair::new_account();
    let (_, stored_seed) = keys::seal_keypair(&cipher, &signing).expect("seal seed");
    Fixture {
        auth,
        auth_xkey,
        server,
        sealed,
        plain,
        cipher,
        signing,
        stored_seed,
        account: KeyPair::new_account(),
    }
}

fn header(f: &Fixture) -> String {
    f.server.xkey.public_key()
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    let auth_pk = f.auth.public_key();
    let hdr = header(&f);
    let now = jwt::now_unix();

    c.bench_function("request/open+verify", |b| {
        b.iter(|| {
            request::verify(
                black_box(&f.sealed.payload),
                Some(&hdr),
                &f.auth_xkey,
                &auth_pk,
                now,
            )
            .expect("valid request")
        })
    });
    let boxes = ServerBoxes::new(&f.auth_xkey).expect("seeded xkey");
    c.bench_function("request/open+verify (box cached per server)", |b| {
        b.iter(|| {
            request::verify_with(
                black_box(&f.sealed.payload),
                Some(&hdr),
                &f.auth_xkey,
                Some(&boxes),
                &auth_pk,
                now,
            )
            .expect("valid request")
        })
    });
    c.bench_function("request/verify (plain)", |b| {
        b.iter(|| {
            request::verify(black_box(&f.plain), None, &f.auth_xkey, &auth_pk, now)
                .expect("valid request")
        })
    });

    let row = common::login_row(&f.account.public_key(), &f.signing, &f.stored_seed);
    let defaults = Defaults::default();
    c.bench_function("permissions/merge", |b| {
        b.iter(|| permissions::merge(black_box(&row), &defaults))
    });

    let issuer = Arc::new(Issuer {
        account: f.account.public_key(),
        signing_public_key: f.signing.public_key(),
        keypair: KeyPair::from_seed(&f.signing.seed().unwrap()).unwrap(),
    });
    c.bench_function("login/prepare", |b| {
        b.iter(|| {
            Login::prepare(
                black_box(row.clone()),
                &defaults,
                Duration::from_secs(3600),
                Duration::from_secs(86400),
                Signing::Ready(issuer.clone()),
                Arc::new,
                Arc::new,
            )
        })
    });

    let req = request::verify(&f.sealed.payload, Some(&hdr), &f.auth_xkey, &auth_pk, now)
        .expect("valid request");
    let merged = permissions::merge(&row, &defaults);
    let ttl = Duration::from_secs(3600);
    c.bench_function("mint/user jwt+response+seal", |b| {
        b.iter(|| {
            let user = mint::user_jwt(
                &req,
                "sensor-0001",
                &merged,
                ttl,
                &issuer.account,
                &issuer.keypair,
                now,
            )
            .unwrap();
            let resp = mint::response(&req, Ok(&user), &f.auth, now).unwrap();
            mint::seal(resp, &f.auth_xkey, req.server_xkey.as_ref()).unwrap()
        })
    });
    let req_boxed = request::verify_with(
        &f.sealed.payload,
        Some(&hdr),
        &f.auth_xkey,
        Some(&boxes),
        &auth_pk,
        now,
    )
    .unwrap();
    c.bench_function("mint/user jwt+response+seal (box cached)", |b| {
        b.iter(|| {
            let user = mint::user_jwt(
                &req_boxed,
                "sensor-0001",
                &merged,
                ttl,
                &issuer.account,
                &issuer.keypair,
                now,
            )
            .unwrap();
            let resp = mint::response(&req_boxed, Ok(&user), &f.auth, now).unwrap();
            mint::seal_for(&req_boxed, resp, &f.auth_xkey).unwrap()
        })
    });
    c.bench_function("mint/user jwt only", |b| {
        b.iter(|| {
            mint::user_jwt(
                &req,
                "sensor-0001",
                &merged,
                ttl,
                &issuer.account,
                &issuer.keypair,
                now,
            )
            .unwrap()
        })
    });

    let signing_pk = f.signing.public_key();
    c.bench_function("keys/open signing seed (AES-GCM + parse)", |b| {
        b.iter(|| {
            keys::keypair_from_stored(&f.cipher, black_box(&f.stored_seed), &signing_pk).unwrap()
        })
    });

    let cache = LoginCache::new(CacheSettings::default());
    let hash = row.password_hash.clone().unwrap();
    let key = cache.credential_key("sensor-0001", "correct horse battery staple");
    cache.put_credential(key, &hash);
    c.bench_function("credentials/hmac+lookup (cache hit)", |b| {
        b.iter(|| {
            let k = cache.credential_key(black_box("sensor-0001"), "correct horse battery staple");
            assert!(cache.credential_verified(&k, &hash));
        })
    });

    // The whole warm decision without the NATS hops: open + verify the request, a
    // credential-cache hit, mint, sign the response, seal.
    let login = Login::prepare(
        row.clone(),
        &defaults,
        Duration::from_secs(3600),
        Duration::from_secs(86400),
        Signing::Ready(issuer.clone()),
        Arc::new,
        Arc::new,
    );
    c.bench_function("decision/warm cpu", |b| {
        b.iter(|| {
            let req = request::verify_with(
                black_box(&f.sealed.payload),
                Some(&hdr),
                &f.auth_xkey,
                Some(&boxes),
                &auth_pk,
                now,
            )
            .unwrap();
            let k = cache.credential_key("sensor-0001", "correct horse battery staple");
            assert!(cache.credential_verified(&k, &hash));
            let user = mint::user_jwt(
                &req,
                &login.username,
                &login.shape.merged,
                login.shape.ttl,
                &issuer.account,
                &issuer.keypair,
                now,
            )
            .unwrap();
            let resp = mint::response(&req, Ok(&user), &f.auth, now).unwrap();
            mint::seal_for(&req, resp, &f.auth_xkey).unwrap()
        })
    });

    let user = KeyPair::new_user();
    let user_pk = user.public_key();
    let nonce = "q3bQhbDgK0Q8Ew2a";
    let sig = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(user.sign(nonce.as_bytes()).unwrap())
    };
    c.bench_function("doors/nkey signature", |b| {
        b.iter(|| nkey::verify(black_box(&user_pk), Some(&sig), Some(nonce)).unwrap())
    });
    if let Some(pem) = self_signed_pem() {
        let tls = serde_json::json!({"version": "1.3", "verified_chains": [[pem]]});
        c.bench_function("doors/certificate parse+map", |b| {
            b.iter(|| certificate::presented(Some(black_box(&tls)), jwt::now_unix()).unwrap())
        });
    }

    let bcrypt10 = bcrypt::hash("correct horse battery staple", 10).unwrap();
    let mut slow = c.benchmark_group("credentials");
    slow.sample_size(10);
    slow.bench_function("bcrypt cost 10 (cache miss)", |b| {
        b.iter(|| {
            assert_eq!(
                credentials::verify_blocking("correct horse battery staple", &bcrypt10),
                Ok(true)
            )
        })
    });
    slow.finish();
}

/// A client certificate as nats-server passes it (PEM), made by openssl (None without it).
fn self_signed_pem() -> Option<String> {
    let dir = tempfile::tempdir().ok()?;
    let (key, cert) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/C=DE/O=Acme, Inc./CN=device-17",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .ok()?
        .status
        .success();
    ok.then(|| std::fs::read_to_string(&cert).ok()).flatten()
}

fn config() -> Criterion {
    let quick = std::env::var("LOAD_QUICK").is_ok_and(|v| v == "1");
    let c = Criterion::default();
    if quick {
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
    } else {
        c
    }
}

criterion_group! {
    name = hot_path;
    config = config();
    targets = benches
}
criterion_main!(hot_path);
