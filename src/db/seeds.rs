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
    let mut tx = pool.begin().await?;
    let mut n = 0;
    for table in ["nats.service_identities", "nats.account_keys"] {
        let rows: Vec<(String, String)> =
            sqlx::query_as(&format!("SELECT public_key, seed FROM {table} FOR UPDATE"))
                .fetch_all(&mut *tx)
                .await?;
        for (public_key, stored) in rows {
            if only_plain && new.is_current(&stored, &public_key) {
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
