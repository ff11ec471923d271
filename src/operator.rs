//! Operator signing-key rotation, in two steps because the operator JWT lives in nats-server's
//! configuration:
//!
//! 1. `begin`: a new key is made and listed in the operator JWT next to the current one; the
//!    fragment is rewritten. The admin restarts (or reloads) nats-server, which then trusts both.
//! 2. `finish`: the new key becomes the signing key; the operator JWT lists only it; SYS and AUTH
//!    are re-signed; every tenant account is queued, and the sync leader re-signs and pushes all
//!    of them (it notices the new key on its next pass). Once `status` shows no pending rows the
//!    admin restarts nats-server with the new fragment, and the old key is trusted nowhere.

use nkeys::KeyPair;
use sqlx::PgPool;

use crate::db::identities::IdentityKind;
use crate::init::{InitError, ServiceIdentities};
use crate::jwt::claims::{AccountClaims, OperatorClaims};
use crate::jwt::{self, Claims};
use crate::keys::{self, SeedCipher};

const NEXT: &str = "operator_signing_next";

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The new key is listed; restart nats-server, then finish.
    Begun { next: String },
    /// The new key signs; accounts are being re-signed.
    Finished { signing: String, queued: u64 },
}

fn resign<T: serde::Serialize + serde::de::DeserializeOwned>(
    token: &str,
    signer: &KeyPair,
    edit: impl FnOnce(&mut T),
) -> Result<String, InitError> {
    let mut claims: Claims<T> = jwt::decode_unverified(token)?;
    edit(&mut claims.nats);
    claims.iat = jwt::now_unix().max(claims.iat + 1);
    Ok(jwt::encode(&claims, signer)?)
}

async fn set_jwt(tx: &mut sqlx::PgConnection, kind: &str, jwt: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE nats.service_identities SET jwt = $2 WHERE kind = $1")
        .bind(kind)
        .bind(jwt)
        .execute(tx)
        .await?;
    Ok(())
}

/// Step 1 (idempotent: a second call keeps the same next key).
pub async fn begin(pool: &PgPool, cipher: &SeedCipher) -> Result<Step, InitError> {
    let ids = ServiceIdentities::load(pool).await?;
    let operator = ids.keypair(cipher, IdentityKind::Operator)?;
    let current = ids.public_key(IdentityKind::OperatorSigning).to_owned();
    let mut tx = pool.begin().await?;
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT public_key FROM nats.service_identities WHERE kind = $1 FOR UPDATE",
    )
    .bind(NEXT)
    .fetch_optional(&mut *tx)
    .await?;
    let next = match existing {
        Some(pk) => pk,
        None => {
            crate::db::seeds::refuse_unless_current(&mut tx, cipher)
                .await?
                .map_err(InitError::KeyNotCurrent)?;
            let kp = keys::new_operator();
            let (pk, stored) = keys::seal_keypair(cipher, &kp)?;
            sqlx::query("INSERT INTO nats.service_identities (kind, name, public_key, seed) VALUES ($1, $2, $3, $4)")
                .bind(NEXT)
                .bind(ids.operator_name())
                .bind(&pk)
                .bind(stored)
                .execute(&mut *tx)
                .await?;
            pk
        }
    };
    let keys = vec![current, next.clone()];
    let op_jwt = resign::<OperatorClaims>(ids.jwt(IdentityKind::Operator), &operator, |o| {
        o.signing_keys = keys
    })?;
    set_jwt(&mut tx, "operator", &op_jwt).await?;
    tx.commit().await?;
    Ok(Step::Begun { next })
}

/// Step 2.
pub async fn finish(pool: &PgPool, cipher: &SeedCipher) -> Result<Step, InitError> {
    let ids = ServiceIdentities::load(pool).await?;
    let operator = ids.keypair(cipher, IdentityKind::Operator)?;
    let mut tx = pool.begin().await?;
    let next: Option<(String, String)> = sqlx::query_as(
        "SELECT public_key, seed FROM nats.service_identities WHERE kind = $1 FOR UPDATE",
    )
    .bind(NEXT)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((next_pk, next_seed)) = next else {
        return Err(InitError::Rotation(
            "no rotation in progress: run `rotate-operator-key` (without --finish) first".into(),
        ));
    };
    let signer = keys::keypair_from_stored(cipher, &next_seed, &next_pk)?;
    sqlx::query("DELETE FROM nats.service_identities WHERE kind = 'operator_signing'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE nats.service_identities SET kind = 'operator_signing' WHERE kind = $1")
        .bind(NEXT)
        .execute(&mut *tx)
        .await?;
    let only_next = vec![next_pk.clone()];
    let op_jwt = resign::<OperatorClaims>(ids.jwt(IdentityKind::Operator), &operator, |o| {
        o.signing_keys = only_next
    })?;
    set_jwt(&mut tx, "operator", &op_jwt).await?;
    for kind in [IdentityKind::SysAccount, IdentityKind::AuthAccount] {
        let token = resign::<AccountClaims>(ids.jwt(kind), &signer, |_| {})?;
        set_jwt(&mut tx, kind.as_str(), &token).await?;
    }
    let queued = sqlx::query(
        "INSERT INTO nats.sync_outbox (account_id, op, reason, bulk) SELECT id, 'upsert', 'operator signing key rotated', true FROM nats.accounts",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("SELECT pg_notify('nats_pg_auth_sync', 'operator')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Step::Finished {
        signing: next_pk,
        queued,
    })
}
