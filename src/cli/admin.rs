//! The noun-verb admin commands (`account|role|user|token list|show|…`) and `explain`.
//!
//! Listings and `show` print a table with headers for people, or with `--json` a JSON array
//! (list) or object (show) and nothing else on stdout. A wrong name is one line and exit 64.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::{admin_pool as pool, out, usage, CliError};
use crate::callout::login::{Login, Signing};
use crate::callout::permissions;
use crate::callout::DenyReason;
use crate::config::{
    AccountCommand, CommonArgs, ExplainArgs, RoleCommand, TokenCommand, UserCommand,
};
use crate::db::{self, admin};

fn q(e: sqlx::Error) -> CliError {
    super::sql_error(e)
}

/// Columns padded to their widest cell, two spaces apart.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                s += cell;
            } else {
                s += &format!("{cell:<w$}  ");
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut text = line(headers.to_vec());
    for row in rows {
        text += &line(row.iter().map(String::as_str).collect());
    }
    text
}

/// `show`: one FIELD / VALUE row per field of the JSON object.
fn fields(value: &serde_json::Value) -> String {
    let rows: Vec<Vec<String>> = value
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    // Seconds read better as a duration too: `900 (15m)`.
                    let text = match v.as_i64() {
                        Some(n) if k.ends_with("_secs") && n > 0 => format!(
                            "{n} ({})",
                            humantime::format_duration(Duration::from_secs(n as u64))
                        ),
                        _ => cell(v),
                    };
                    vec![k.clone(), text]
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    table(&["FIELD", "VALUE"], &rows)
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) if a.is_empty() => "-".into(),
        serde_json::Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), T::to_string)
}

fn list_cell(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn state(active: bool) -> String {
    if active { "active" } else { "inactive" }.into()
}

pub(super) fn secs_text(s: Option<f64>) -> String {
    permissions::secs(s).map_or("-".into(), |d| {
        humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
    })
}

pub(super) fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Other(format!("cannot write JSON: {e}")))?;
    out(&(text + "\n"))
}

fn print_show<T: Serialize>(value: &T, json: bool) -> Result<(), CliError> {
    if json {
        print_json(value)
    } else {
        let v = serde_json::to_value(value)
            .map_err(|e| CliError::Other(format!("cannot write JSON: {e}")))?;
        out(&fields(&v))
    }
}

pub async fn account(common: &CommonArgs, cmd: AccountCommand) -> Result<(), CliError> {
    let pool = pool(common).await?;
    match cmd {
        AccountCommand::List(o) => {
            let rows = admin::accounts(&pool).await.map_err(q)?;
            // Imports the server left out count as their account's sync error.
            let imports = admin::import_errors(&pool).await.map_err(q)?;
            let import_errors = |account: &str| -> Vec<&admin::ImportError> {
                imports.iter().filter(|i| i.account == account).collect()
            };
            if o.json {
                let listed: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|a| {
                        let mut v = serde_json::to_value(a).unwrap_or_default();
                        if let Some(o) = v.as_object_mut() {
                            o.insert("import_errors".into(), json!(import_errors(&a.name)));
                        }
                        v
                    })
                    .collect();
                return print_json(&listed);
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        state(a.active),
                        a.users.to_string(),
                        a.roles.to_string(),
                        a.max_connections.to_string(),
                        a.synced_at.clone().unwrap_or_else(|| "never".into()),
                        sync_errors(a, &import_errors(&a.name)),
                    ]
                })
                .collect();
            out(&table(
                &[
                    "NAME",
                    "STATE",
                    "USERS",
                    "ROLES",
                    "MAX CONN",
                    "SYNCED AT",
                    "SYNC ERROR",
                ],
                &cells,
            ))
        }
        AccountCommand::Show(a) => show_account(&pool, &a.name, a.output.json).await,
        AccountCommand::Disable(a) => set_account_active(&pool, &a.name, false).await,
        AccountCommand::Enable(a) => set_account_active(&pool, &a.name, true).await,
        AccountCommand::Create(_) => unreachable!("`run` handles it as add-account"),
        AccountCommand::Delete(_) => unreachable!("`run` sends it to `edit`"),
    }
}

/// An account's SYNC ERROR cell: its own error, then each import the server left out.
fn sync_errors(a: &admin::Account, imports: &[&admin::ImportError]) -> String {
    let all: Vec<String> = a
        .sync_error
        .iter()
        .cloned()
        .chain(
            imports
                .iter()
                .map(|i| format!("import {}: {}", i.import, i.sync_error)),
        )
        .collect();
    if all.is_empty() {
        "-".into()
    } else {
        all.join("; ")
    }
}

/// `account disable|enable`.
async fn set_account_active(pool: &sqlx::PgPool, name: &str, active: bool) -> Result<(), CliError> {
    if !admin::set_account_active(pool, name, active)
        .await
        .map_err(super::sql_error)?
    {
        return Err(usage(format!("no account {name:?}")));
    }
    crate::telemetry::say(format_args!(
        "account {name:?} {}",
        if active {
            "enabled"
        } else {
            "disabled: its users are refused (inactive_account)"
        }
    ));
    Ok(())
}

/// `account show`: the account's row (limits, JetStream limits included), its exports and its
/// imports.
async fn show_account(pool: &sqlx::PgPool, name: &str, json: bool) -> Result<(), CliError> {
    let Some(row) = admin::account(pool, name).await.map_err(q)? else {
        return Err(usage(format!("no account {name:?}")));
    };
    let exports = admin::exports(pool, name).await.map_err(q)?;
    let imports = admin::imports(pool, name).await.map_err(q)?;
    let mut v = to_value(&row)?;
    if json {
        v["exports"] = to_value(&exports)?;
        v["imports"] = to_value(&imports)?;
        return print_json(&v);
    }
    v["exports"] = json!(exports
        .iter()
        .map(|e| format!(
            "{} {} ({}{})",
            e.name,
            e.subject,
            e.kind,
            if e.token_req { ", private" } else { "" }
        ))
        .collect::<Vec<_>>());
    v["imports"] = json!(imports
        .iter()
        .map(|i| format!(
            "{} {} from {} ({}{}){}",
            i.name,
            i.subject,
            i.exporter,
            i.kind,
            i.local_subject
                .as_ref()
                .map(|l| format!(", as {l}"))
                .unwrap_or_default(),
            i.sync_error
                .as_ref()
                .map(|e| format!(" LEFT OUT: {e}"))
                .unwrap_or_default()
        ))
        .collect::<Vec<_>>());
    out(&fields(&v))
}

/// `user show`: the user's row (nkey and MQTT client ids included) and its certificate
/// mappings. Never its password hash.
async fn show_user(pool: &sqlx::PgPool, name: &str, json: bool) -> Result<(), CliError> {
    let Some(row) = admin::user(pool, name).await.map_err(q)? else {
        return Err(usage(format!("no user {name:?}")));
    };
    let certificates = admin::certificates(pool, name).await.map_err(q)?;
    let mut v = to_value(&row)?;
    super::lockouts::add_to_show(pool, name, &mut v, json).await?;
    if json {
        v["certificates"] = to_value(&certificates)?;
        return print_json(&v);
    }
    v["certificates"] = json!(certificates
        .iter()
        .map(|c| {
            let parts: Vec<String> = [
                c.fingerprint_sha256.as_ref().map(|f| format!("sha256 {f}")),
                c.subject_dn.as_ref().map(|d| format!("subject {d}")),
                c.san.clone(),
            ]
            .into_iter()
            .flatten()
            .collect();
            format!("#{} {}", c.id, parts.join(" + "))
        })
        .collect::<Vec<_>>());
    out(&fields(&v))
}

fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<serde_json::Value, CliError> {
    serde_json::to_value(value).map_err(|e| CliError::Other(format!("cannot write JSON: {e}")))
}

pub async fn role(common: &CommonArgs, cmd: RoleCommand) -> Result<(), CliError> {
    let pool = pool(common).await?;
    match cmd {
        RoleCommand::List(a) => {
            if let Some(acc) = &a.account {
                if !admin::account_exists(&pool, acc).await.map_err(q)? {
                    return Err(usage(format!("no account {acc:?}")));
                }
            }
            let rows = admin::roles(&pool, a.account.as_deref()).await.map_err(q)?;
            if a.output.json {
                return print_json(&rows);
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        r.account.clone().unwrap_or_else(|| "(global)".into()),
                        r.users.to_string(),
                        list_cell(&r.publish_allow),
                        list_cell(&r.subscribe_allow),
                        secs_text(r.user_jwt_ttl_secs.map(|s| s as f64)),
                    ]
                })
                .collect();
            out(&table(
                &[
                    "NAME",
                    "ACCOUNT",
                    "USERS",
                    "PUBLISH",
                    "SUBSCRIBE",
                    "JWT TTL",
                ],
                &cells,
            ))
        }
        RoleCommand::Show(a) => {
            let mut rows = admin::roles_named(&pool, &a.name, a.account.as_deref())
                .await
                .map_err(q)?;
            match rows.len() {
                0 => Err(usage(format!(
                    "no role {:?}{}",
                    a.name,
                    a.account
                        .as_ref()
                        .map(|acc| format!(" in account {acc:?} or global"))
                        .unwrap_or_default()
                ))),
                1 => print_show(&rows.remove(0), a.output.json),
                n => {
                    // An account's own role wins over a global one of the same name (as
                    // `add-user --role` picks it); without --account the name is ambiguous.
                    if a.account.is_some() {
                        print_show(&rows.remove(0), a.output.json)
                    } else {
                        Err(usage(format!(
                            "{n} roles are named {:?}; give --account",
                            a.name
                        )))
                    }
                }
            }
        }
        RoleCommand::Create(_) => unreachable!("`run` sends it to `edit`"),
    }
}

pub async fn user(common: &CommonArgs, cmd: UserCommand) -> Result<(), CliError> {
    let pool = pool(common).await?;
    match cmd {
        UserCommand::List(a) => {
            if let Some(acc) = &a.account {
                if !admin::account_exists(&pool, acc).await.map_err(q)? {
                    return Err(usage(format!("no account {acc:?}")));
                }
            }
            let rows = admin::users(&pool, a.account.as_deref()).await.map_err(q)?;
            if a.output.json {
                return print_json(&rows);
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|u| {
                    vec![
                        u.username.clone(),
                        u.account.clone(),
                        opt(&u.role),
                        state(u.active),
                        if u.has_password { "yes" } else { "no" }.into(),
                        u.active_tokens.to_string(),
                    ]
                })
                .collect();
            out(&table(
                &["USERNAME", "ACCOUNT", "ROLE", "STATE", "PASSWORD", "TOKENS"],
                &cells,
            ))
        }
        UserCommand::Show(a) => show_user(&pool, &a.name, a.output.json).await,
        UserCommand::Unlock(a) => super::lockouts::unlock(&pool, &a.name).await,
        UserCommand::Disable(a) => set_user_active(&pool, &a.name, false).await,
        UserCommand::Enable(a) => set_user_active(&pool, &a.name, true).await,
        UserCommand::Create(_) => unreachable!("`run` handles it as add-user"),
        UserCommand::Delete(_) | UserCommand::SetPassword(_) | UserCommand::SetRole(_) => {
            unreachable!("`run` sends it to `edit`")
        }
    }
}

/// `user disable|enable`.
async fn set_user_active(pool: &sqlx::PgPool, name: &str, active: bool) -> Result<(), CliError> {
    if !admin::set_user_active(pool, name, active)
        .await
        .map_err(super::sql_error)?
    {
        return Err(usage(format!("no user {name:?}")));
    }
    crate::telemetry::say(format_args!(
        "user {name:?} {}",
        if active {
            "enabled"
        } else {
            "disabled: its logins are refused (inactive_user)"
        }
    ));
    Ok(())
}

pub async fn token(common: &CommonArgs, cmd: TokenCommand) -> Result<(), CliError> {
    let pool = pool(common).await?;
    match cmd {
        TokenCommand::List(a) => {
            if let Some(u) = &a.user {
                if !admin::user_exists(&pool, u).await.map_err(q)? {
                    return Err(usage(format!("no user {u:?}")));
                }
            }
            let rows = admin::tokens(&pool, a.user.as_deref()).await.map_err(q)?;
            if a.output.json {
                return print_json(&rows);
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|t| {
                    vec![
                        t.id.to_string(),
                        t.username.clone(),
                        t.state.clone(),
                        t.expires_at.clone().unwrap_or_else(|| "never".into()),
                        t.last_used_at.clone().unwrap_or_else(|| "never".into()),
                        opt(&t.description),
                    ]
                })
                .collect();
            out(&table(
                &[
                    "ID",
                    "USER",
                    "STATE",
                    "EXPIRES AT",
                    "LAST USED",
                    "DESCRIPTION",
                ],
                &cells,
            ))
        }
        TokenCommand::Revoke(a) => match admin::revoke_token(&pool, a.id).await.map_err(q)? {
            admin::Revoked::Now => {
                crate::telemetry::say(format_args!(
                    "token {} revoked; connections it opened are closed",
                    a.id
                ));
                Ok(())
            }
            admin::Revoked::Already => {
                crate::telemetry::say(format_args!("token {} was already revoked", a.id));
                Ok(())
            }
            admin::Revoked::NoSuchToken => Err(usage(format!("no token {}", a.id))),
        },
        TokenCommand::Create(_) => unreachable!("`run` handles it as add-token"),
    }
}

// ---- explain ---------------------------------------------------------------------------------

/// The request fields `check_connection` reads, for a connection-type name.
fn client_kind(connection_type: &str) -> Option<(&'static str, &'static str)> {
    let (kind, ty) = match connection_type.to_ascii_uppercase().as_str() {
        "STANDARD" => ("Client", "nats"),
        "WEBSOCKET" => ("Client", "websocket"),
        "MQTT" => ("Client", "mqtt"),
        "MQTT_WS" => ("Client", "mqtt_ws"),
        "IN_PROCESS" => ("Client", "in_process"),
        "LEAFNODE" => ("Leafnode", "nats"),
        "LEAFNODE_WS" => ("Leafnode", "websocket"),
        _ => return None,
    };
    debug_assert_eq!(
        permissions::connection_type(Some(kind), Some(ty)),
        connection_type.to_ascii_uppercase()
    );
    Some((kind, ty))
}

fn from(user: bool, role: bool, other: &'static str) -> &'static str {
    match (user, role) {
        (true, true) => "role+user",
        (true, false) => "user",
        (false, true) => "role",
        _ => other,
    }
}

/// Why `explain` found no login: (what was asked for, deny reason, detail).
type NotFound = (String, &'static str, String);

/// The login `explain` is about: by username, by nkey, or by a certificate's mapping (the
/// callout's own rules; the nonce signature and the chain verification are the client's and
/// nats-server's part and are not simulated).
async fn find_login(
    pool: &sqlx::PgPool,
    args: &ExplainArgs,
) -> Result<Result<db::logins::LoginRow, NotFound>, CliError> {
    use crate::callout::certificate;
    if let Some(user) = &args.user {
        return Ok(db::logins::by_username(pool, user)
            .await
            .map_err(q)?
            .ok_or_else(|| {
                (
                    user.clone(),
                    DenyReason::UnknownUser.as_str(),
                    format!("no user {user:?}"),
                )
            }));
    }
    if let Some(key) = &args.nkey {
        if !nkeys::KeyPair::from_public_key(key)
            .is_ok_and(|k| matches!(k.key_pair_type(), nkeys::KeyPairType::User))
        {
            return Ok(Err((
                key.clone(),
                DenyReason::BadNkey.as_str(),
                format!("{key:?} is not a user public nkey"),
            )));
        }
        return Ok(db::logins::by_nkey(pool, key)
            .await
            .map_err(q)?
            .ok_or_else(|| {
                (
                    key.clone(),
                    DenyReason::UnknownNkey.as_str(),
                    format!("no user has nkey {key:?}"),
                )
            }));
    }
    let path = args
        .certificate
        .as_ref()
        .expect("clap requires one of the three");
    let pem = std::fs::read_to_string(path).map_err(|e| {
        usage(format!(
            "--certificate {}: cannot read it: {e}",
            path.display()
        ))
    })?;
    let tls = json!({ "verified_chains": [[pem]] });
    let shown = path.display().to_string();
    let presented = match certificate::presented(Some(&tls), crate::jwt::now_unix()) {
        Ok(p) => p,
        Err(certificate::CertError::OutsideValidity { .. }) => {
            return Ok(Err((
                shown,
                DenyReason::CertificateExpired.as_str(),
                "the certificate is not valid now".into(),
            )))
        }
        Err(e) => return Err(usage(format!("--certificate {shown}: {e}"))),
    };
    let who = format!(
        "{} (sha256 {})",
        presented.subject_dn,
        presented.fingerprint_hex()
    );
    let rows = db::logins::by_certificate(
        pool,
        &presented.fingerprint,
        &presented.sans,
        &presented.subject_loose(),
    )
    .await
    .map_err(q)?;
    let candidates = rows
        .into_iter()
        .filter_map(|(row, part)| Some((row, certificate::Mapping::from_part(&part)?)))
        .collect();
    Ok(
        match certificate::choose(candidates, &presented, |r| r.user_id) {
            certificate::Choice::One(row, _) => Ok(row),
            certificate::Choice::Nothing => Err((
                who.clone(),
                DenyReason::UnknownCertificate.as_str(),
                format!("{who} is mapped to no user"),
            )),
            certificate::Choice::Ambiguous(users) => Err((
                who.clone(),
                DenyReason::AmbiguousCertificate.as_str(),
                format!("{who} matches equally specific mappings of users {users:?}"),
            )),
        },
    )
}

/// `explain --user U`: what a login of U would get now, decided by the callout's own code.
pub async fn explain(common: &CommonArgs, args: ExplainArgs) -> Result<(), CliError> {
    if args.user.is_none() && args.nkey.is_none() && args.certificate.is_none() {
        return Err(usage(
            "say whose login to explain: --user NAME, --nkey U… (a user public nkey) or --certificate FILE.pem".into(),
        ));
    }
    let Some((kind, client_type)) = client_kind(&args.connection_type) else {
        return Err(usage(format!(
            "--connection-type {:?} is not one of STANDARD, WEBSOCKET, LEAFNODE, LEAFNODE_WS, MQTT, MQTT_WS, IN_PROCESS",
            args.connection_type
        )));
    };
    if let Some(src) = &args.source {
        if src
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_err()
        {
            return Err(usage(format!(
                "--source {src:?} is not an IP address like 10.1.2.3"
            )));
        }
    }
    let cipher = common.cipher()?;
    let pool = pool(common).await?;
    let row = match find_login(&pool, &args).await? {
        Ok(row) => row,
        Err((who, reason, detail)) => {
            return report(
                &args,
                json!({
                    "user": who,
                    "allowed": false,
                    "deny_reason": reason,
                    "detail": detail,
                }),
            )
        }
    };
    let role = match row.role_id {
        Some(id) => admin::role_name(&pool, id).await.map_err(q)?,
        None => None,
    };
    let defaults = args.login.permissions();
    // Where each part comes from (the same precedence `merge` and `ttl` apply).
    let any_rights = !row.user_pub_allow.is_empty()
        || !row.user_pub_deny.is_empty()
        || !row.user_sub_allow.is_empty()
        || !row.user_sub_deny.is_empty()
        || [
            &row.role_pub_allow,
            &row.role_pub_deny,
            &row.role_sub_allow,
            &row.role_sub_deny,
        ]
        .iter()
        .any(|l| l.as_ref().is_some_and(|l| !l.is_empty()));
    let nonempty = |l: &Option<Vec<String>>| l.as_ref().is_some_and(|l| !l.is_empty());
    let perm_from = |user: &[String], role: &Option<Vec<String>>| {
        if any_rights {
            from(!user.is_empty(), nonempty(role), "-")
        } else {
            "default"
        }
    };
    let limit_from = |user: Option<i64>, role: Option<i64>| {
        if user.is_some() {
            "user"
        } else if role.is_some() {
            "role"
        } else {
            "default (unlimited)"
        }
    };
    let chosen_ttl = [
        ("user", row.user_ttl_secs),
        ("role", row.role_ttl_secs),
        ("account", row.account_ttl_secs),
    ]
    .into_iter()
    .find_map(|(who, s)| permissions::secs(s).map(|d| (who, d)));
    let ttl_from = match chosen_ttl {
        Some((_, d)) if d > args.login.max_ttl => "max-ttl (cap)",
        Some((who, _)) => who,
        None if args.login.default_ttl > args.login.max_ttl => "max-ttl (cap)",
        None => "default-ttl",
    };
    let origins = json!({
        "publish_allow": perm_from(&row.user_pub_allow, &row.role_pub_allow),
        "publish_deny": perm_from(&row.user_pub_deny, &row.role_pub_deny),
        "subscribe_allow": perm_from(&row.user_sub_allow, &row.role_sub_allow),
        "subscribe_deny": perm_from(&row.user_sub_deny, &row.role_sub_deny),
        "response": if row.role_allow_response == Some(true) { "role" } else { "-" },
        "max_subscriptions": limit_from(row.user_max_subscriptions, row.role_max_subscriptions),
        "max_data": limit_from(row.user_max_data, row.role_max_data),
        "max_payload": limit_from(row.user_max_payload, row.role_max_payload),
        "jwt_ttl": ttl_from,
    });
    let signing = match (
        row.account_public_key.as_deref(),
        row.signing_public_key.as_deref(),
        row.signing_seed.as_deref(),
    ) {
        (Some(account), Some(public), Some(seed)) => {
            match crate::keys::keypair_from_stored(&cipher, seed, public) {
                Ok(keypair) => Signing::Ready(Arc::new(crate::callout::login::Issuer {
                    account: account.to_owned(),
                    signing_public_key: public.to_owned(),
                    keypair,
                })),
                Err(e) => Signing::Unusable(e.to_string()),
            }
        }
        _ => Signing::NotReady,
    };
    let login = Login::prepare(
        row,
        &defaults,
        args.login.default_ttl,
        args.login.max_ttl,
        signing,
        Arc::new,
        Arc::new,
    );
    let shape = &login.shape;
    let m = &shape.merged;
    let mut report_value = json!({
        "user": login.username.as_ref(),
        "account": shape.account_name.as_ref(),
        "role": role,
        "publish": {"allow": m.publish.allow, "deny": m.publish.deny},
        "subscribe": {"allow": m.subscribe.allow, "deny": m.subscribe.deny},
        "response": m.response.map(|r| json!({"max": r.max, "ttl_secs": r.ttl.as_millis().div_ceil(1000) as u64})),
        "limits": {
            "max_subscriptions": m.max_subscriptions,
            "max_data": m.max_data,
            "max_payload": m.max_payload,
        },
        "jwt_ttl_secs": shape.ttl.as_secs(),
        "allowed_sources": shape.allowed_sources.as_ref().map(|s| s.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
        "allowed_connection_types": shape.allowed_connection_types,
        "from": origins,
    });
    // The callout's own checks; only a source the caller did not give is said differently.
    let deny: Option<(&str, String)> = match crate::callout::admit(
        &login,
        &crate::callout::Door {
            host: args.source.as_deref(),
            kind: Some(kind),
            client_type: Some(client_type),
            mqtt_id: None,
        },
    ) {
        Ok(_) => None,
        Err(d) if d.reason == DenyReason::SourceNotAllowed && args.source.is_none() => Some((
            d.reason.as_str(),
            "the role has allowed_sources; give --source to check an address".to_owned(),
        )),
        Err(d) => Some((d.reason.as_str(), d.detail)),
    };
    // A password login is also refused while a replica holds a lockout of the username.
    let locked = match &args.user {
        Some(user) => super::lockouts::in_force(&pool, user).await?,
        None => None,
    };
    let deny = deny.or_else(|| {
        locked
            .as_ref()
            .map(|(_, why)| (DenyReason::LockedOut.as_str(), why.clone()))
    });
    let obj = report_value.as_object_mut().expect("an object");
    obj.insert(
        "lockouts".into(),
        json!(locked.map(|(l, _)| l).unwrap_or_default()),
    );
    obj.insert("allowed".into(), json!(deny.is_none()));
    obj.insert("deny_reason".into(), json!(deny.as_ref().map(|d| d.0)));
    obj.insert("detail".into(), json!(deny.as_ref().map(|d| &d.1)));
    report(&args, report_value)
}

/// Prints the report; a login that would be refused is also an error (exit 77, as
/// `try-login`'s refused login), so a script can tell without parsing the report.
fn report(args: &ExplainArgs, v: serde_json::Value) -> Result<(), CliError> {
    print_report(args, &v)?;
    if v["allowed"] == json!(true) {
        return Ok(());
    }
    Err(CliError::WouldRefuse(format!(
        "the login of {} would be refused: {}",
        cell(&v["user"]),
        cell(&v["deny_reason"])
    )))
}

fn print_report(args: &ExplainArgs, v: &serde_json::Value) -> Result<(), CliError> {
    if args.output.json {
        return print_json(v);
    }
    let mut text = String::new();
    let line = |text: &mut String, k: &str, val: String| *text += &format!("{k:<20}{val}\n");
    line(&mut text, "user:", cell(&v["user"]));
    if v["allowed"] == json!(true) {
        line(&mut text, "result:", "allowed".into());
    } else {
        line(
            &mut text,
            "result:",
            format!(
                "denied: {} ({})",
                cell(&v["deny_reason"]),
                cell(&v["detail"])
            ),
        );
    }
    if v.get("account").is_none() {
        return out(&text);
    }
    let f = &v["from"];
    line(&mut text, "account:", cell(&v["account"]));
    line(&mut text, "role:", cell(&v["role"]));
    for (k, path, origin) in [
        ("publish allow:", "/publish/allow", "publish_allow"),
        ("publish deny:", "/publish/deny", "publish_deny"),
        ("subscribe allow:", "/subscribe/allow", "subscribe_allow"),
        ("subscribe deny:", "/subscribe/deny", "subscribe_deny"),
    ] {
        let val = v.pointer(path).map(cell).unwrap_or_default();
        line(&mut text, k, format!("{val}  [{}]", cell(&f[origin])));
    }
    let response = match &v["response"] {
        serde_json::Value::Null => "-".to_owned(),
        r => format!(
            "max {} within {}",
            cell(&r["max"]),
            secs_text(r["ttl_secs"].as_f64())
        ),
    };
    line(&mut text, "response:", response);
    for k in ["max_subscriptions", "max_data", "max_payload"] {
        line(
            &mut text,
            &format!("{k}:"),
            format!("{}  [{}]", cell(&v["limits"][k]), cell(&f[k])),
        );
    }
    line(
        &mut text,
        "jwt lifetime:",
        format!(
            "{}  [{}]",
            secs_text(v["jwt_ttl_secs"].as_f64()),
            cell(&f["jwt_ttl"])
        ),
    );
    line(&mut text, "allowed sources:", cell(&v["allowed_sources"]));
    line(
        &mut text,
        "connection types:",
        cell(&v["allowed_connection_types"]),
    );
    out(&text)
}
