//! Rows and races that could hurt the service (issue 8), proved at login against a real
//! nats-server: hash work factors refused before hashing, a graceful signing-key rotation that
//! keeps logins working, a future revocation that ends the JWT, a lockout that a parallel burst
//! cannot overrun, plain seeds refused once seeds are encrypted, and a huge response threshold
//! that no longer stops pushes.

use std::time::Duration;

use crate::common::{is_auth_refusal, user_info, wait_until, EnvOptions, TestEnv};

/// A stored hash above the service's own bounds is refused without hashing, with a clear log
/// line (deny reason internal_error), even when the table accepted it.
#[tokio::test]
async fn a_hash_above_the_service_bounds_is_refused_without_hashing() {
    let env = TestEnv::start_with(EnvOptions {
        tweak: |args| args.max_bcrypt_cost = 5,
        ..Default::default()
    })
    .await;
    env.acme().await;
    env.sql(
        "INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'slow', crypt('pw', gen_salt('bf', 6)) FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'fast', crypt('pw', gen_salt('bf', 5)) FROM nats.accounts WHERE name = 'acme';",
    )
    .await;
    let callout = env.callout.clone().unwrap();
    let hashes = callout.password_hashes_computed();
    let err = env.connect_user("slow", "pw").await.expect_err("refused");
    assert!(is_auth_refusal(&err), "{err}");
    assert_eq!(env.metrics.denied("internal_error"), 1);
    assert_eq!(
        callout.password_hashes_computed(),
        hashes,
        "bcrypt never ran for the out-of-bounds hash"
    );
    env.connect_user("fast", "pw")
        .await
        .expect("a hash within the bounds logs in");
}

/// A graceful rotation gives the old signing key a `retired_at` in the future. Until the push
/// with the new key lands, the old key must keep signing: it is still in the server's JWT.
#[tokio::test]
async fn a_graceful_rotation_keeps_logins_working_until_the_push_lands() {
    let env = TestEnv::start().await;
    env.acme().await;
    let old_key: String = sqlx::query_scalar(
        "SELECT k.public_key FROM nats.account_keys k JOIN nats.accounts a ON a.id = k.account_id
         WHERE a.name = 'acme' AND k.kind = 'signing'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    // Hold the push open: recording it (`synced_at`) needs this row lock. Key writes only take
    // a KEY SHARE lock, which FOR NO KEY UPDATE does not block, so the rotation itself runs.
    let mut hold = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM nats.accounts WHERE name = 'acme' FOR NO KEY UPDATE")
        .execute(&mut *hold)
        .await
        .unwrap();
    env.sql("SELECT nats.rotate_signing_key('acme')").await;
    env.wait_sql(
        "SELECT count(*) = 2 AND count(*) FILTER (WHERE retired_at > now()) = 1
         FROM nats.account_keys k JOIN nats.accounts a ON a.id = k.account_id
         WHERE a.name = 'acme' AND k.kind = 'signing'",
        Duration::from_secs(5),
        "the rotation to add a key and retire the old one in the future",
    )
    .await;
    let client = env
        .connect_user("alice", "s3cret")
        .await
        .expect("logins keep working while the rotation's push is pending");
    drop(client);
    assert_eq!(env.metrics.denied("account_not_ready"), 0);
    hold.rollback().await.unwrap();

    // Once the push landed, the new key signs.
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(5), "the new key to be on the server", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT a.synced_at >= max(k.created_at) FROM nats.account_keys k JOIN nats.accounts a ON a.id = k.account_id
                 WHERE a.name = 'acme' AND k.kind = 'signing' GROUP BY a.synced_at",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(false)
        }
    })
    .await;
    env.connect_user("alice", "s3cret")
        .await
        .expect("logins after the push");
    let retired: bool = sqlx::query_scalar(
        "SELECT retired_at > now() FROM nats.account_keys WHERE public_key = $1",
    )
    .bind(&old_key)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(retired, "the old key stays until its grace ends");
}

/// A `revoked_at` in the future is honoured at login, and now also on live connections: the
/// JWT ends at that moment (nothing UPDATEs the row then, so no kick would come).
#[tokio::test]
async fn a_future_revocation_ends_the_jwt_then() {
    let env = TestEnv::start().await;
    env.acme().await;
    // A user with the default permissions (`>`), so it may ask USER.INFO.
    env.add_watcher("acme", "watcher").await;
    env.sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256, revoked_at)
           SELECT id, digest('tok-later', 'sha256'), now() + interval '30 seconds' FROM nats.users WHERE username = 'watcher';",
    )
    .await;
    let client = env
        .connect_token("tok-later")
        .await
        .expect("not revoked yet");
    let expires_ns = user_info(&client).await["expires"]
        .as_i64()
        .expect("the JWT expires");
    assert!(
        expires_ns > 0 && expires_ns <= 30_000_000_000,
        "JWT ends when the token is revoked (30 s), not after the default TTL: {expires_ns} ns"
    );
}

/// Check-then-act let a parallel burst past the lockout: every attempt looked before any had
/// failed. Now at most --lockout-failures wrong passwords are checked.
#[tokio::test]
async fn a_parallel_burst_of_wrong_passwords_gets_at_most_the_limit_checked() {
    let env = TestEnv::start_with(EnvOptions {
        tweak: |args| {
            args.lockout_failures = 3;
            args.lockout_duration = Duration::from_secs(60);
        },
        ..Default::default()
    })
    .await;
    env.acme().await;
    let callout = env.callout.clone().unwrap();
    let hashes = callout.password_hashes_computed();
    let attempts = (0..12).map(|i| {
        let url = env.url();
        async move {
            crate::common::client_options(async_nats::ConnectOptions::with_user_and_password(
                "alice".into(),
                format!("guess-{i}"),
            ))
            .connect(url)
            .await
            .is_ok()
        }
    });
    let results = futures::future::join_all(attempts).await;
    assert!(results.iter().all(|ok| !ok), "no guess got in");
    assert!(
        callout.password_hashes_computed() - hashes <= 3,
        "at most 3 guesses were checked, not {}",
        callout.password_hashes_computed() - hashes
    );
    // On a busy machine a counted attempt may run out of time before its check ends
    // (`overloaded`), so the wrong passwords seen are at most, not exactly, the limit.
    let bad = env.metrics.denied("bad_password");
    assert!((1..=3).contains(&bad), "{bad} wrong passwords checked");
    assert!(env.metrics.denied("locked_out") >= 1);
}

/// With an encryption key, the service only ever writes encrypted seeds. A plain one written
/// later (an admin pasting a seed they know) must not sign logins, and a restart must not
/// encrypt it (that would make it look like the service's own).
#[tokio::test]
async fn a_plain_seed_written_under_an_encryption_key_is_refused() {
    let mut env = TestEnv::start_with(EnvOptions {
        encryption_key: Some([9u8; 32]),
        ..Default::default()
    })
    .await;
    env.acme().await;
    env.connect_user("alice", "s3cret")
        .await
        .expect("alice logs in while every seed is encrypted");
    let kp = nats_pg_auth::keys::new_account();
    sqlx::query(
        "INSERT INTO nats.account_keys (account_id, kind, public_key, seed)
         SELECT id, 'signing', $1, $2 FROM nats.accounts WHERE name = 'acme'",
    )
    .bind(kp.public_key())
    .bind(kp.seed().unwrap())
    .execute(&env.pool)
    .await
    .unwrap();
    // The push lists it; from then on it would be the key that signs acme's logins.
    env.wait_sql(
        "SELECT a.synced_at >= k.created_at FROM nats.account_keys k JOIN nats.accounts a ON a.id = k.account_id
         WHERE k.seed NOT LIKE 'enc:%'",
        Duration::from_secs(5),
        "the account with the plain key to be pushed",
    )
    .await;
    let refused = |env: &TestEnv| {
        let url = env.url();
        async move {
            let err = crate::common::client_options(
                async_nats::ConnectOptions::with_user_and_password("alice".into(), "s3cret".into()),
            )
            .connect(url)
            .await
            .expect_err("no login signed by a plain seed");
            assert!(is_auth_refusal(&err), "{err}");
        }
    };
    refused(&env).await;
    assert!(env.metrics.denied("internal_error") >= 1);

    env.stop_service().await;
    env.start_service(crate::common::serve_args(env.url()))
        .await;
    let plain: i64 =
        sqlx::query_scalar("SELECT count(*) FROM nats.account_keys WHERE seed NOT LIKE 'enc:%'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(plain, 1, "a restart does not encrypt a foreign plain seed");
    refused(&env).await;
}

/// A response threshold of centuries overflowed the nanosecond conversion (in SQL) and failed
/// the push of the exporter and of every importer. Rows older than the new bound are kept (the
/// constraint is added NOT VALID); dropping it here stands for such a row.
#[tokio::test]
async fn a_huge_response_threshold_no_longer_stops_the_pushes() {
    let env = TestEnv::start().await;
    env.sql("INSERT INTO nats.accounts (name) VALUES ('exporter'), ('importer')")
        .await;
    env.wait_synced("exporter").await;
    env.wait_synced("importer").await;
    env.sql(
        "ALTER TABLE nats.account_exports DROP CONSTRAINT export_response_threshold_at_most_1_day;
         ALTER TABLE nats.account_exports DISABLE TRIGGER exports_explain_checks; -- it says why (0016)
         INSERT INTO nats.account_exports (account_id, name, subject, type, response_type, response_threshold)
           SELECT id, 'echo', 'svc.echo', 'service', 'Singleton', interval '1000 years' FROM nats.accounts WHERE name = 'exporter';
         INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, type)
           SELECT i.id, 'echo', 'svc.echo', e.id, 'service' FROM nats.accounts e, nats.accounts i
           WHERE e.name = 'exporter' AND i.name = 'importer';",
    )
    .await;
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(10),
        "both accounts pushed with the export and the import",
        || {
            let pool = pool.clone();
            async move {
                let jwts: Vec<(String, Option<String>)> = sqlx::query_as(
                    "SELECT name, jwt FROM nats.accounts WHERE name IN ('exporter', 'importer') AND sync_error IS NULL",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                let claims = |name: &str| {
                    jwts.iter()
                        .find(|(n, _)| n == name)
                        .and_then(|(_, j)| j.as_deref())
                        .and_then(|j| {
                            nats_pg_auth::jwt::decode_unverified::<serde_json::Value>(j).ok()
                        })
                        .map(|c| c.nats)
                };
                let exported = claims("exporter").is_some_and(|n| {
                    n["exports"][0]["response_threshold"] == serde_json::json!(i64::MAX)
                });
                let imported = claims("importer")
                    .is_some_and(|n| n["imports"][0]["name"] == "echo");
                exported && imported
            }
        },
    )
    .await;
}

/// `'infinity'` timestamps cannot be represented by the service's clock types (decoding one
/// panicked). New rows are refused by the schema; rows older than that bound are read as what
/// they mean: never (expires/revoked), or long ago for `'-infinity'`.
#[tokio::test]
async fn infinite_token_timestamps_from_before_the_bound_are_read_as_never_or_long_ago() {
    let env = TestEnv::start().await;
    env.acme().await;
    env.sql(
        "ALTER TABLE nats.user_tokens DROP CONSTRAINT token_expires_at_finite;
         ALTER TABLE nats.user_tokens DROP CONSTRAINT token_revoked_at_finite;
         ALTER TABLE nats.user_tokens DISABLE TRIGGER user_tokens_explain_checks; -- it says why (0016)
         INSERT INTO nats.user_tokens (user_id, token_sha256, expires_at, revoked_at)
           SELECT id, digest('tok-forever', 'sha256'), 'infinity', 'infinity' FROM nats.users WHERE username = 'alice';
         INSERT INTO nats.user_tokens (user_id, token_sha256, revoked_at)
           SELECT id, digest('tok-revoked-always', 'sha256'), '-infinity' FROM nats.users WHERE username = 'alice';",
    )
    .await;
    env.connect_token("tok-forever")
        .await
        .expect("'infinity' means never expires, never revoked");
    let err = env
        .connect_token("tok-revoked-always")
        .await
        .expect_err("'-infinity' revoked means revoked");
    assert!(is_auth_refusal(&err), "{err}");
    // A fresh copy (as after a restart) reads them too.
    let mut env = env;
    env.stop_service().await;
    env.start_service(crate::common::serve_args(env.url()))
        .await;
    env.connect_token("tok-forever")
        .await
        .expect("the copy's load reads 'infinity' too");
}
