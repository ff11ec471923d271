//! The admin verbs that change or remove rows: `account delete`, `role create`, `user delete`,
//! `user set-password`, `user set-role`. (Creating accounts, users and tokens is in `mod.rs`,
//! as the older `add-*` verbs.) A wrong name is one line and exit 64; a row the database
//! refuses (a name taken, a value a constraint forbids), exit 65.

use super::{admin_pool as pool, bcrypt_hash, password, sql_error, usage, CliError};
use crate::config::{CommonArgs, NameOnly, RoleCreateArgs, SetPasswordArgs, SetRoleArgs};
use crate::db::admin;

pub async fn delete_account(common: &CommonArgs, a: NameOnly) -> Result<(), CliError> {
    let pool = pool(common).await?;
    match admin::delete_account(&pool, &a.name)
        .await
        .map_err(sql_error)?
    {
        None => Err(usage(format!("no account {:?}", a.name))),
        Some(gone) => {
            say!(
                "account {:?} deleted with its {} users and {} roles; the sync removes it from nats-server and its connections are closed",
                a.name,
                gone.users,
                gone.roles
            );
            Ok(())
        }
    }
}

pub async fn create_role(common: &CommonArgs, a: RoleCreateArgs) -> Result<(), CliError> {
    let pool = pool(common).await?;
    let row = admin::NewRole {
        name: &a.name,
        account: a.account.as_deref(),
        publish: &a.publish,
        subscribe: &a.subscribe,
        publish_deny: &a.publish_deny,
        subscribe_deny: &a.subscribe_deny,
        jwt_ttl_secs: a.jwt_ttl.map(|d| d.as_secs_f64()),
        description: a.description.as_deref(),
    };
    let created = admin::create_role(&pool, &row).await.map_err(|e| {
        match e.as_database_error().and_then(|d| d.constraint()) {
            Some("role_name_unique_per_account") => CliError::Data(format!(
                "a role {:?} already exists {}",
                a.name,
                a.account
                    .as_ref()
                    .map_or("among the global roles".to_owned(), |acc| format!(
                        "in account {acc:?}"
                    ))
            )),
            _ => sql_error(e),
        }
    })?;
    if !created {
        return Err(usage(format!(
            "no account {:?}",
            a.account.unwrap_or_default()
        )));
    }
    say!(
        "role {:?} added {}",
        a.name,
        a.account.map_or(
            "as a global role (usable by every account)".to_owned(),
            |acc| format!("to account {acc:?}")
        )
    );
    Ok(())
}

pub async fn delete_user(common: &CommonArgs, a: NameOnly) -> Result<(), CliError> {
    let pool = pool(common).await?;
    if !admin::delete_user(&pool, &a.name)
        .await
        .map_err(sql_error)?
    {
        return Err(usage(format!("no user {:?}", a.name)));
    }
    say!(
        "user {:?} deleted with its tokens and certificate mappings; its connections are closed",
        a.name
    );
    Ok(())
}

pub async fn set_password(common: &CommonArgs, a: SetPasswordArgs) -> Result<(), CliError> {
    // The name is checked first, so nobody types a password twice for a user that is not there.
    let pool = pool(common).await?;
    if !admin::user_exists(&pool, &a.name)
        .await
        .map_err(sql_error)?
    {
        return Err(usage(format!("no user {:?}", a.name)));
    }
    let hash = bcrypt_hash(
        &password::read(&format!("New password for user {:?}: ", a.name))?,
        a.cost,
    )?;
    if !admin::set_password_hash(&pool, &a.name, &hash)
        .await
        .map_err(sql_error)?
    {
        return Err(usage(format!("no user {:?}", a.name)));
    }
    say!(
        "password of user {:?} changed; its connections are closed and the old password is refused",
        a.name
    );
    Ok(())
}

pub async fn set_role(common: &CommonArgs, a: SetRoleArgs) -> Result<(), CliError> {
    let pool = pool(common).await?;
    let role = if a.none { None } else { a.role.as_deref() };
    match admin::set_role(&pool, &a.name, role).await.map_err(sql_error)? {
        admin::RoleChange::Done => {
            say!(
                "user {:?} {}; its connections are closed and log in again with the new rights",
                a.name,
                role.map_or("has no role now".to_owned(), |r| format!("has role {r:?} now"))
            );
            Ok(())
        }
        admin::RoleChange::NoSuchUser => Err(usage(format!("no user {:?}", a.name))),
        admin::RoleChange::NoSuchRole { account } => Err(usage(format!(
            "no role {:?} in account {account:?} nor a global one (see `nats-pg-auth role list --account {account}`)",
            role.unwrap_or_default()
        ))),
    }
}
