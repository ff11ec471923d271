//! `nats.service_identities`: the keys and JWTs the service owns (operator, SYS, AUTH, ...).

use sqlx::{PgConnection, PgPool};

/// What an identity row is for. The string forms are the `kind` column values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    Operator,
    OperatorSigning,
    SysAccount,
    SysUser,
    AuthAccount,
    AuthXkey,
    ServiceUser,
    Sentinel,
}

impl IdentityKind {
    pub const ALL: [IdentityKind; 8] = [
        IdentityKind::Operator,
        IdentityKind::OperatorSigning,
        IdentityKind::SysAccount,
        IdentityKind::SysUser,
        IdentityKind::AuthAccount,
        IdentityKind::AuthXkey,
        IdentityKind::ServiceUser,
        IdentityKind::Sentinel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Operator => "operator",
            IdentityKind::OperatorSigning => "operator_signing",
            IdentityKind::SysAccount => "sys_account",
            IdentityKind::SysUser => "sys_user",
            IdentityKind::AuthAccount => "auth_account",
            IdentityKind::AuthXkey => "auth_xkey",
            IdentityKind::ServiceUser => "service_user",
            IdentityKind::Sentinel => "sentinel",
        }
    }
}

/// A stored identity. `seed` is as stored (maybe encrypted); open it with `SeedCipher`.
#[derive(Clone, sqlx::FromRow)]
pub struct IdentityRow {
    pub kind: String,
    pub name: String,
    pub public_key: String,
    pub seed: String,
    pub jwt: Option<String>,
}

impl std::fmt::Debug for IdentityRow {
    // The seed column must never reach a log, even encrypted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityRow")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

pub async fn all(pool: &PgPool) -> Result<Vec<IdentityRow>, sqlx::Error> {
    sqlx::query_as("SELECT kind, name, public_key, seed, jwt FROM nats.service_identities")
        .fetch_all(pool)
        .await
}

pub async fn all_in(conn: &mut PgConnection) -> Result<Vec<IdentityRow>, sqlx::Error> {
    sqlx::query_as("SELECT kind, name, public_key, seed, jwt FROM nats.service_identities")
        .fetch_all(conn)
        .await
}

pub async fn insert(conn: &mut PgConnection, row: &IdentityRow) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO nats.service_identities (kind, name, public_key, seed, jwt) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&row.kind)
    .bind(&row.name)
    .bind(&row.public_key)
    .bind(&row.seed)
    .bind(&row.jwt)
    .execute(conn)
    .await?;
    Ok(())
}

/// Replaces the JWT of an identity (`init` re-issuing AUTH's JWT).
pub async fn set_jwt(
    conn: &mut PgConnection,
    kind: IdentityKind,
    jwt: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE nats.service_identities SET jwt = $2 WHERE kind = $1")
        .bind(kind.as_str())
        .bind(jwt)
        .execute(conn)
        .await?;
    Ok(())
}
