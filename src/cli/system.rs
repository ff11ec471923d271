//! Talking to nats-server as the service's system user (`connections`) or minting a
//! short-lived one (`export-context`): both read the system account's identities from Postgres,
//! so they need `DATABASE_URL` and the at-rest key `serve` uses.

use std::time::Duration;

use nkeys::KeyPair;

use super::CliError;
use crate::config::{CommonArgs, NatsTlsArgs};
use crate::db::identities::IdentityKind;
use crate::init::ServiceIdentities;

/// The pool and the service identities of an initialised database.
pub async fn identities(
    common: &CommonArgs,
) -> Result<(sqlx::PgPool, ServiceIdentities), CliError> {
    let pool = super::admin_pool(common).await?;
    let ids = ServiceIdentities::load(&pool).await?;
    Ok((pool, ids))
}

/// A connection to nats-server as the service's system user (`nats-pg-auth-system`).
pub async fn connect(
    common: &CommonArgs,
    ids: &ServiceIdentities,
    nats_url: &str,
    tls: &NatsTlsArgs,
) -> Result<async_nats::Client, CliError> {
    tls.validate()?;
    let key = ids
        .keypair(&common.cipher()?, IdentityKind::SysUser)
        .map_err(|e| {
            super::usage(format!(
                "cannot open the system user's seed: {e} (give the --encryption-key `serve` uses)"
            ))
        })?;
    let opts = crate::app::jwt_login(ids.jwt(IdentityKind::SysUser).to_owned(), key);
    tls.apply(opts)
        .name("nats-pg-auth")
        .connection_timeout(Duration::from_secs(5))
        .connect(nats_url)
        .await
        .map_err(|e| match e.kind() {
            async_nats::ConnectErrorKind::AuthorizationViolation => CliError::Refused(format!(
                "nats-server at {nats_url} refused the system user: is it configured with this database's `init` fragment (`nats-pg-auth export-config`)?"
            )),
            _ => CliError::Unavailable(format!("cannot reach nats-server at {nats_url}: {e}")),
        })
}

/// A fresh system-account user that expires after `ttl`: (its JWT, its seed). Signed by the
/// system account's key, named `name`; nothing is stored, so it ends by itself.
pub fn mint_user(
    common: &CommonArgs,
    ids: &ServiceIdentities,
    name: &str,
    ttl: Duration,
) -> Result<(String, String), CliError> {
    use crate::jwt::{self, claims::UserClaims, Claims};
    let sys = ids
        .keypair(&common.cipher()?, IdentityKind::SysAccount)
        .map_err(|e| {
            super::usage(format!(
                "cannot open the system account's seed: {e} (give the --encryption-key `serve` uses)"
            ))
        })?;
    let user = KeyPair::new_user();
    let now = jwt::now_unix();
    let claims = Claims::user_for(user.public_key(), name, now, ttl, UserClaims::default());
    let token = jwt::encode(&claims, &sys)
        .map_err(|e| CliError::Other(format!("cannot sign the system user JWT: {e}")))?;
    let seed = user
        .seed()
        .map_err(|e| CliError::Other(format!("cannot encode the new seed: {e}")))?;
    Ok((token, seed))
}
