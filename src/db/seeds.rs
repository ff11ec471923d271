//! Re-encrypting every stored seed (identities and account keys) under another at-rest key.

use sqlx::PgPool;

use crate::keys::{self, SeedCipher};

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
/// with the current one. Plain seeds are left alone (see [`encrypt_keyless_start`]).
pub async fn reseal_previous_key(
    pool: &PgPool,
    cipher: &SeedCipher,
) -> Result<u64, ReencryptError> {
    rewrite(pool, cipher, cipher, |stored, public_key| {
        stored.starts_with('S') || cipher.is_current(stored, public_key)
    })
    .await
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
