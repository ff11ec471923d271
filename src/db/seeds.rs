//! Re-encrypting every stored seed (identities and account keys) under another at-rest key, and
//! telling which key the database's seeds are under now.

use std::collections::BTreeMap;

use sqlx::PgPool;

use crate::keys::{self, SealedWith, SeedCipher};

#[derive(Debug, thiserror::Error)]
pub enum ReencryptError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot open the seed of {0}: {1}")]
    Open(String, keys::KeyError),
    #[error("cannot encrypt the seed of {0}: {1}")]
    Seal(String, keys::KeyError),
}

/// Opens every seed with `old` and stores it sealed by `new`, in one transaction (all or
/// nothing). With `only_plain`, rows already sealed with `new`'s main key are left alone: plain
/// seeds (the upgrade path from a keyless start) and seeds under a previous key `new` also
/// opens (finishing a rotation) are rewritten. Returns how many rows were rewritten.
pub async fn reencrypt(
    pool: &PgPool,
    old: &SeedCipher,
    new: &SeedCipher,
    only_plain: bool,
) -> Result<u64, ReencryptError> {
    rewrite(pool, old, new, |stored, public_key| {
        only_plain && new.is_current(stored, public_key)
    })
    .await
}

/// `serve` with `--old-encryption-key`: seeds still sealed with the previous key are sealed
/// with the current one. Plain seeds are left alone (see [`encrypt_keyless_start`]), and so are
/// seeds an earlier release sealed with the current key (`enc:v1:`, no key id): rewriting them
/// at every upgrade would make them unreadable to the replicas not yet upgraded.
pub async fn reseal_previous_key(
    pool: &PgPool,
    cipher: &SeedCipher,
) -> Result<u64, ReencryptError> {
    rewrite(pool, cipher, cipher, |stored, public_key| {
        stored.starts_with('S') || cipher.writes_like(stored, public_key)
    })
    .await
}

/// The advisory lock between sealing seeds and changing the key: a re-seal of every seed
/// (`rotate-encryption-key`, `serve`'s start-up re-seal and first encryption) takes it
/// exclusively, a transaction that inserts seeds takes it shared ([`lock_and_check`]). An
/// in-memory lock: no row is written, however many accounts get keys at once.
pub const SEED_KEY_LOCK: i64 = 0x6e61_7473_7067_0003; // "natspg" + 3

/// Whether `cipher` still seals as the database's seeds are sealed: None when it does (or the
/// database has no operator yet), else what the operator's seed is sealed with. The operator's
/// seed stands for the database because every change of key re-seals it.
pub async fn superseded_by(
    conn: impl sqlx::PgExecutor<'_>,
    cipher: &SeedCipher,
) -> Result<Option<SealedWith>, sqlx::Error> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT public_key, seed FROM nats.service_identities WHERE kind = 'operator'",
    )
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some((public_key, seed)) if !cipher.writes_like(&seed, &public_key) => {
            Some(keys::sealed_with(&seed))
        }
        _ => None,
    })
}

/// [`superseded_by`] in a transaction about to insert seeds, holding [`SEED_KEY_LOCK`] shared
/// until it ends: it either commits before a re-seal starts (which then re-seals its seeds
/// too), or reads what the re-seal committed and inserts nothing.
pub async fn lock_and_check(
    conn: &mut sqlx::PgConnection,
    cipher: &SeedCipher,
) -> Result<Option<SealedWith>, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(SEED_KEY_LOCK)
        .execute(&mut *conn)
        .await?;
    superseded_by(&mut *conn, cipher).await
}

/// For the CLI verbs that seal seeds (`init` under an imported operator, `import` of keys,
/// `rotate-operator-key`), in their transaction: refuses, with the line to show, when `cipher`
/// does not seal like the database (an operator shell still holding the previous key would
/// otherwise leave seeds the next start cannot open).
pub async fn refuse_unless_current(
    conn: &mut sqlx::PgConnection,
    cipher: &SeedCipher,
) -> Result<Result<(), String>, sqlx::Error> {
    let Some(found) = lock_and_check(conn, cipher).await? else {
        return Ok(Ok(()));
    };
    let mine = match cipher.key_id() {
        Some(id) => format!("key id {id}"),
        None => "no key".to_owned(),
    };
    Ok(Err(format!(
        "the stored seeds are sealed with {found}, but NATS_PG_AUTH_ENCRYPTION_KEY is {mine}: set it to the database's current key (`nats-pg-auth key-id` prints a key's id); nothing was changed"
    )))
}

/// The stored seeds a cipher cannot open, counted by the key they are sealed with.
#[derive(Debug, Default)]
pub struct Census {
    pub total: usize,
    pub unopenable: BTreeMap<SealedWith, usize>,
}

/// Opens every stored seed with `cipher` (only on the way to an error: a start that cannot
/// open the seeds), and counts the ones it cannot by key.
pub async fn census(pool: &PgPool, cipher: &SeedCipher) -> Result<Census, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT public_key, seed FROM nats.service_identities
         UNION ALL SELECT public_key, seed FROM nats.account_keys WHERE seed IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    let mut census = Census {
        total: rows.len(),
        ..Default::default()
    };
    for (public_key, seed) in rows {
        if cipher.open(&seed, &public_key).is_err() {
            *census
                .unopenable
                .entry(keys::sealed_with(&seed))
                .or_default() += 1;
        }
    }
    Ok(census)
}

impl Census {
    /// One line for an operator whose replica cannot open the seeds: how many, under which
    /// keys, and the command that fixes it. Key ids only, never a key.
    pub fn explain(&self, cipher: &SeedCipher) -> String {
        let bad: usize = self.unopenable.values().sum();
        let mine = match cipher.key_id() {
            Some(id) => format!("this replica's encryption key (id {id})"),
            None => "this replica, which has no encryption key,".to_owned(),
        };
        let olds = cipher.old_key_ids();
        let olds = if olds.is_empty() {
            String::new()
        } else {
            format!(
                " or NATS_PG_AUTH_OLD_ENCRYPTION_KEY (id {})",
                olds.join(", ")
            )
        };
        let under = self
            .unopenable
            .iter()
            .map(|(with, n)| format!("{n} under {with}"))
            .collect::<Vec<_>>()
            .join(", ");
        let other = self.unopenable.keys().find_map(|w| match w {
            SealedWith::Key(id) => Some(format!("the key whose id is {id}")),
            _ => None,
        });
        let other = other.unwrap_or_else(|| "the previous key".to_owned());
        if cipher.key_id().is_none() {
            return format!(
                "{bad} of the {} stored seeds are encrypted ({under}) but {mine} cannot open them: set NATS_PG_AUTH_ENCRYPTION_KEY (or --encryption-key-file) to {other}",
                self.total
            );
        }
        if bad == self.total {
            return format!(
                "none of the {} stored seeds opens with {mine}{olds}: {under}. NATS_PG_AUTH_ENCRYPTION_KEY is not the key this database is sealed with (it was rotated, or this is another database): set it to {other}; `nats-pg-auth key-id` prints the id of a key",
                self.total
            );
        }
        let verb = if bad == 1 { "does" } else { "do" };
        format!(
            "{bad} of the {} stored seeds {verb} not open with {mine}{olds}: {under}. A replica that still ran with {other} after `rotate-encryption-key` sealed them. Fix: NATS_PG_AUTH_OLD_ENCRYPTION_KEY=<{other}> nats-pg-auth rotate-encryption-key (with this replica's DATABASE_URL and NATS_PG_AUTH_ENCRYPTION_KEY; `nats-pg-auth key-id` prints the id of a key), or start serve once with NATS_PG_AUTH_OLD_ENCRYPTION_KEY set to that key",
            self.total
        )
    }
}

/// Opens with `old` and seals with `new` every seed that `skip` does not leave alone, in one
/// transaction.
async fn rewrite(
    pool: &PgPool,
    old: &SeedCipher,
    new: &SeedCipher,
    skip: impl Fn(&str, &str) -> bool,
) -> Result<u64, ReencryptError> {
    let mut tx = pool.begin().await?;
    // On `serve`'s pool every session gives up on a lock after `db::LOCK_TIMEOUT`; replicas
    // starting together take these row locks one after the other, so wait longer here (this
    // runs once at start, never on a login).
    sqlx::query("SET LOCAL lock_timeout = '60s'")
        .execute(&mut *tx)
        .await?;
    // Waits for every transaction that checked the key and is inserting seeds (they hold the
    // lock shared, see [`lock_and_check`]), and keeps new ones out until this one commits.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SEED_KEY_LOCK)
        .execute(&mut *tx)
        .await?;
    let mut n = 0;
    for table in ["nats.service_identities", "nats.account_keys"] {
        let rows: Vec<(String, String)> =
            // An imported account key may have no seed (migration 0012): nothing to re-seal.
            sqlx::query_as(&format!(
                "SELECT public_key, seed FROM {table} WHERE seed IS NOT NULL FOR UPDATE"
            ))
                .fetch_all(&mut *tx)
                .await?;
        for (public_key, stored) in rows {
            if skip(&stored, &public_key) {
                continue;
            }
            let seed = old
                .open(&stored, &public_key)
                .map_err(|e| ReencryptError::Open(public_key.clone(), e))?;
            let sealed = new
                .seal(secrecy::ExposeSecret::expose_secret(&seed), &public_key)
                .map_err(|e| ReencryptError::Seal(public_key.clone(), e))?;
            sqlx::query(&format!(
                "UPDATE {table} SET seed = $2 WHERE public_key = $1"
            ))
            .bind(&public_key)
            .bind(sealed)
            .execute(&mut *tx)
            .await?;
            n += 1;
        }
    }
    tx.commit().await?;
    Ok(n)
}

/// What [`encrypt_keyless_start`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum PlainSeeds {
    /// No seed was encrypted yet (a keyless start, or pb-nats): this many plain ones were
    /// encrypted now.
    Encrypted(u64),
    /// Some seeds were already encrypted, so these plain ones (public keys) were written by
    /// someone other than this service with its key. Left as they are.
    Foreign(Vec<String>),
}

/// `serve`'s start with a key. The first time (no seed encrypted anywhere) every plain seed is
/// encrypted: the upgrade from a keyless start. After that the service only writes encrypted
/// seeds, so a plain one is foreign: it is reported, not encrypted (encrypting would make an
/// injected seed look like the service's own), and a cipher refusing plain seeds will not use it.
pub async fn encrypt_keyless_start(
    pool: &PgPool,
    cipher: &SeedCipher,
) -> Result<PlainSeeds, ReencryptError> {
    let (encrypted, plain): (i64, Vec<String>) = sqlx::query_as(
        "WITH s AS (SELECT public_key, seed FROM nats.service_identities
                    UNION ALL SELECT public_key, seed FROM nats.account_keys)
         SELECT count(*) FILTER (WHERE seed LIKE 'enc:%'),
                coalesce(array_agg(public_key ORDER BY public_key) FILTER (WHERE seed NOT LIKE 'enc:%'), '{}')
         FROM s",
    )
    .fetch_one(pool)
    .await?;
    if plain.is_empty() {
        return Ok(PlainSeeds::Encrypted(0));
    }
    if encrypted > 0 {
        return Ok(PlainSeeds::Foreign(plain));
    }
    Ok(PlainSeeds::Encrypted(
        reencrypt(pool, cipher, cipher, true).await?,
    ))
}
