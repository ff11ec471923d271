//! Lockouts in the admin CLI: `user unlock`, and what `user show` and `explain` say about a
//! user locked out after wrong passwords (from `nats.lockouts`, where each replica records the
//! lockouts it starts: which replica, until when).

use super::CliError;
use crate::db::lockouts::{self, Lockout};

/// `locked out on r1 until 2026-…Z (10 wrong passwords); on r2 until …`.
fn describe(lockouts: &[Lockout]) -> String {
    let each: Vec<String> = lockouts
        .iter()
        .map(|l| {
            format!(
                "on replica {} until {} ({} wrong passwords)",
                l.replica, l.locked_until, l.failures
            )
        })
        .collect();
    format!("locked out {}", each.join("; "))
}

/// The lockouts of `username` in force, with the one-line reason `explain` gives; None when
/// no replica recorded one.
pub async fn in_force(
    pool: &sqlx::PgPool,
    username: &str,
) -> Result<Option<(Vec<Lockout>, String)>, CliError> {
    let found = lockouts::of_user(pool, username)
        .await
        .map_err(super::sql_error)?;
    if found.is_empty() {
        return Ok(None);
    }
    let why = format!(
        "{}; password logins answered there are refused without checking; `nats-pg-auth user unlock {username}` lifts it",
        describe(&found)
    );
    Ok(Some((found, why)))
}

/// `user show`: adds `lockouts` (a list in JSON, one line in the table; `-` when none).
pub async fn add_to_show(
    pool: &sqlx::PgPool,
    username: &str,
    shown: &mut serde_json::Value,
    json: bool,
) -> Result<(), CliError> {
    let found = lockouts::of_user(pool, username)
        .await
        .map_err(super::sql_error)?;
    let value = match (json, found.is_empty()) {
        (true, _) => serde_json::json!(found),
        (false, true) => serde_json::Value::Null,
        (false, false) => serde_json::json!(describe(&found)),
    };
    if let Some(o) = shown.as_object_mut() {
        o.insert("lockouts".into(), value);
    }
    Ok(())
}

/// `user unlock NAME`: every replica forgets the user's wrong passwords within a second.
pub async fn unlock(pool: &sqlx::PgPool, username: &str) -> Result<(), CliError> {
    match lockouts::unlock(pool, username)
        .await
        .map_err(super::sql_error)?
    {
        None => Err(super::usage(format!("no user {username:?}"))),
        Some(recorded) => {
            crate::telemetry::say(format_args!(
                "user {username:?} unlocked: every replica forgets its wrong passwords within a second ({recorded} recorded lockouts lifted)"
            ));
            Ok(())
        }
    }
}
