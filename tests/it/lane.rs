//! The hashing lane and the credential reads a hostile tenant admin can make the service pay for
//! (issue 15, finding 2 and finding 7's unknown tokens): work factors the service can afford,
//! a lane shared fairly between accounts, and no Postgres query per made-up token. The tenant
//! writes its rows as a real LOGIN role of `nats_pg_auth_tenant`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::ConnectOptions;
use sqlx::PgPool;

use crate::common::{client_options, is_auth_refusal, EnvOptions, TestEnv};

/// A tenant account with a LOGIN role administering it; returns a pool connected as that role.
async fn tenant_account(env: &TestEnv, account: &str) -> PgPool {
    env.sql(&format!(
        "INSERT INTO nats.accounts (name, max_connections) VALUES ('{account}', 1000)"
    ))
    .await;
    let (_, tenant) = crate::common::tenant_admin(env, account).await;
    env.wait_synced(account).await;
    tenant
}

/// `n` users `{prefix}{i}` of the tenant's account sharing one stored hash (computed once: each
/// row may have its own salt, but the cost is what matters here).
async fn add_users(t: &PgPool, account: &str, prefix: &str, n: usize, bcrypt_cost: u32) {
    sqlx::raw_sql(&format!(
        "WITH h AS (SELECT crypt('pw', gen_salt('bf', {bcrypt_cost})) AS hash)
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT a.id, '{prefix}' || i, h.hash
           FROM nats.accounts a, h, generate_series(0, {n} - 1) AS i WHERE a.name = '{account}'"
    ))
    .execute(t)
    .await
    .unwrap_or_else(|e| panic!("the tenant admin adds {prefix}*: {e}"));
}

/// A row above the bounds (written before migration 0010 lowered them, or by the schema owner
/// replacing `nats.password_hash_limits()`) is refused at login without hashing: argon2id with
/// m = 128 MiB and bcrypt cost 13. Tenants can no longer write such a row.
#[tokio::test]
async fn hashes_above_the_bounds_are_refused_at_login_without_hashing_and_tenants_cannot_write_them(
) {
    let env = TestEnv::start().await;
    let t = tenant_account(&env, "acme").await;

    // As a tenant admin: the schema refuses argon2id above 64 MiB, bcrypt above 12.
    let argon = |user: &str, m: u32| {
        format!(
            "INSERT INTO nats.users (account_id, username, password_hash)
               SELECT id, '{user}', '$argon2id$v=19$m={m},t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA'
               FROM nats.accounts WHERE name = 'acme'"
        )
    };
    for (sql, why) in [
        (
            argon("big", 65537),
            "memory m=65537 KiB is outside 8..65536",
        ),
        (
            argon("huge", 1_048_576),
            "memory m=1048576 KiB is outside 8..65536",
        ),
        (
            "INSERT INTO nats.users (account_id, username, password_hash)
               SELECT id, 'slow', '$2b$13$Y5b1dW8Oq8N3Tbq7u3jY1eE8m4C7wWl6o5v9X0xH0x7h3lQe6dG1K'
               FROM nats.accounts WHERE name = 'acme'"
                .to_owned(),
            "bcrypt cost 13 is outside 4..12",
        ),
    ] {
        let err = sqlx::raw_sql(&sql)
            .execute(&t)
            .await
            .expect_err("the tenant's row is refused");
        assert!(err.to_string().contains(why), "{err}");
    }
    sqlx::raw_sql(&argon("fits", 65536))
        .execute(&t)
        .await
        .expect("m = 64 MiB is within the bounds");

    // Rows written under the old bounds (0004's: bcrypt 14, m 1 GiB), as the schema owner.
    env.sql(
        "CREATE OR REPLACE FUNCTION nats.password_hash_limits(
           OUT bcrypt_min_cost integer, OUT bcrypt_max_cost integer, OUT argon2_max_memory_kib bigint,
           OUT argon2_max_iterations integer, OUT argon2_max_parallelism integer)
         LANGUAGE sql IMMUTABLE AS $$ SELECT 4, 14, 1048576::bigint, 10, 16 $$;",
    )
    .await;
    let big = {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let params = argon2::Params::new(131_072, 1, 1, None).unwrap();
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(b"pw", &SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap())
            .unwrap()
            .to_string()
    };
    env.sql(&format!(
        "INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'old-argon', '{big}' FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'old-bcrypt', crypt('pw', gen_salt('bf', 13)) FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.users (account_id, username, password_hash)
           SELECT id, 'current', crypt('pw', gen_salt('bf', 10)) FROM nats.accounts WHERE name = 'acme';"
    ))
    .await;
    let callout = env.callout.clone().unwrap();
    let hashes = callout.password_hashes_computed();
    for user in ["old-argon", "old-bcrypt"] {
        // The right password: refused all the same, since checking it is what costs.
        let err = env.connect_user(user, "pw").await.expect_err("refused");
        assert!(is_auth_refusal(&err), "{user}: {err}");
    }
    assert_eq!(env.metrics.denied("internal_error"), 2);
    assert_eq!(
        callout.password_hashes_computed(),
        hashes,
        "neither argon2 nor bcrypt ran for the out-of-bounds hashes"
    );
    env.connect_user("current", "pw")
        .await
        .expect("a hash within the bounds logs in");
}

/// Tenant A's admin gives 24 users the most expensive hash allowed (bcrypt 12) and floods wrong
/// passwords for them over 24 parallel connections (lockout off: the attacker spreads over
/// enough users and addresses that it never triggers). Tenant B's users log in for the first
/// time meanwhile (bcrypt 10, not in the credential cache): every one gets in. With one FIFO
/// for everyone, each of B's checks waited behind A's ~22 queued checks (~4 s of hashing on two
/// threads) and was refused at the 2 s auth timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flooding_wrong_passwords_does_not_starve_another_tenants_cold_logins() {
    const FLOODERS: usize = 24;
    let env = TestEnv::start_with(EnvOptions {
        tweak: |args| args.lockout_failures = 0,
        ..Default::default()
    })
    .await;
    let a = tenant_account(&env, "flooder").await;
    let b = tenant_account(&env, "bystander").await;
    add_users(&a, "flooder", "a", FLOODERS, 12).await;
    add_users(&b, "bystander", "b", 10, 10).await;
    env.wait_login("a0", "pw", Duration::from_secs(10), "the flooder's users")
        .await;
    let callout = env.callout.clone().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..FLOODERS {
        let (stop, attempts, url) = (stop.clone(), attempts.clone(), env.url());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let opts = ConnectOptions::with_user_and_password(format!("a{i}"), "wrong".into());
                let _ = client_options(opts).connect(&url).await;
                attempts.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // The flood saturates the lane before B's first login: some of A's checks already waited
    // until the auth timeout.
    let busy_from = callout.password_hashes_computed();
    let metrics = env.metrics.clone();
    crate::common::wait_until(
        Duration::from_secs(30),
        "the flood to saturate the lane",
        || {
            let metrics = metrics.clone();
            async move { metrics.denied("overloaded") >= 1 }
        },
    )
    .await;

    let mut refused = Vec::new();
    // One retry each, as a client library reconnects: a shared 2-core machine can stall one
    // check past the auth timeout; a starved lane refuses every attempt (each waits behind the
    // whole flood again), so the retry does not hide starvation.
    for i in 0..10 {
        let mut last = None;
        for _ in 0..2 {
            match env.connect_user(&format!("b{i}"), "pw").await {
                Ok(client) => {
                    drop(client);
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            refused.push(format!("b{i}: {e}"));
        }
    }
    let hashed_during = callout.password_hashes_computed() - busy_from;
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        let _ = f.await;
    }
    assert!(
        refused.is_empty(),
        "{} of tenant B's 10 cold logins were refused during tenant A's flood ({} attempts, {} hashes): {refused:?}",
        refused.len(),
        attempts.load(Ordering::Relaxed),
        hashed_during,
    );
    // The flood competed for the lane: some of its checks were hashed (and refused). Under a
    // loaded machine most of them expire in the queue and are dropped unhashed (a check whose
    // request nats-server stopped waiting for is not hashed), so only a few may be.
    assert!(
        env.metrics.denied("bad_password") >= 1,
        "the flood was hashed (and refused) meanwhile"
    );
}

/// A flood of made-up tokens (each one different, so the 2 s "no such token" memory never
/// hits) does not cost a Postgres query each: beyond `--unknown-reads-per-second` the live
/// copy's "no such token" answers. A token the tenant admin inserts meanwhile still logs in:
/// its notification puts it in the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_tokens_is_answered_by_the_copy_and_a_new_token_still_logs_in() {
    const FLOOD: usize = 120;
    let env = TestEnv::start_with(EnvOptions {
        tweak: |args| args.unknown_reads_per_second = 2,
        ..Default::default()
    })
    .await;
    let t = tenant_account(&env, "acme").await;
    add_users(&t, "acme", "dev", 1, 4).await;
    let callout = env.callout.clone().unwrap();
    let stats = callout.cache().stats();
    let reads_before = stats.absent_reads.load(Ordering::Relaxed);

    let mut flood = Vec::new();
    for worker in 0..8 {
        let url = env.url();
        flood.push(tokio::spawn(async move {
            for i in (worker..FLOOD).step_by(8) {
                let opts =
                    ConnectOptions::with_token(format!("made-up-{i}-{}", uuid::Uuid::new_v4()));
                let err = client_options(opts)
                    .connect(&url)
                    .await
                    .expect_err("an unknown token is refused");
                assert!(is_auth_refusal(&err), "{err}");
            }
        }));
    }
    for f in flood {
        f.await.unwrap();
    }
    assert_eq!(env.metrics.denied("unknown_token"), FLOOD as u64);
    let reads = stats.absent_reads.load(Ordering::Relaxed) - reads_before;
    assert!(
        reads < FLOOD as u64 / 2,
        "{reads} Postgres reads for {FLOOD} made-up tokens"
    );
    let metrics = nats_pg_auth::metrics::render_cache(callout.cache());
    assert!(
        metrics.contains("cache=\"absent_credentials\",result=\"hit\"}"),
        "{metrics}"
    );

    // The budget is spent: a token inserted now is found through its notification.
    sqlx::raw_sql(
        "INSERT INTO nats.user_tokens (user_id, token_sha256)
           SELECT id, digest('fresh-token', 'sha256') FROM nats.users WHERE username = 'dev0'",
    )
    .execute(&t)
    .await
    .expect("the tenant admin adds a token");
    let url = env.url();
    crate::common::wait_until(Duration::from_secs(5), "the new token to log in", || {
        let url = url.clone();
        async move {
            client_options(ConnectOptions::with_token("fresh-token".into()))
                .connect(url)
                .await
                .is_ok()
        }
    })
    .await;
}
