//! `status`: is the service healthy, as a user needs to know it, and if not, what is wrong.
//!
//! Everything comes from Postgres: each replica's own report in `nats.replicas` (readiness as
//! its `/readyz` computes it, NATS connection, mode, build; see [`crate::replica`] for why a row
//! rather than asking the replicas), the advisory lock of the sync leader (`pg_locks`), the
//! outbox and kick backlog, and the sync errors of accounts and imports.
//!
//! Exit codes (a script can act on them): 0 healthy; 69 (EX_UNAVAILABLE) when no replica
//! reports, a replica is not ready, answers from its copy because its Postgres is gone, or has
//! not been heard from for [`crate::replica::SILENT_AFTER`], or no replica leads the sync; 65
//! (EX_DATAERR) when the replicas are fine but nats-server refused an account or an import
//! (`sync_error`). The report is printed either way; the reason is the one line on stderr.

use std::time::Duration;

use serde_json::json;

use super::admin::{print_json, table};
use super::{out, CliError};
use crate::db::admin::{self, ImportError, Status};
use crate::db::replicas::Replica;

fn age(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string()
}

/// What makes the service unavailable (exit 69), in the words `status` prints.
fn problems(replicas: &[Replica], leader_held: bool) -> Vec<String> {
    let silent = crate::replica::SILENT_AFTER.as_secs_f64();
    let mut found = Vec::new();
    if replicas.is_empty() {
        found.push(
            "no replica reports in nats.replicas: is `nats-pg-auth serve` running against this database?"
                .to_owned(),
        );
    }
    for r in replicas {
        if r.seen_seconds_ago > silent {
            found.push(format!(
                "replica {} not heard from for {} (stopped without deregistering, or cut off from Postgres)",
                r.name,
                age(r.seen_seconds_ago)
            ));
        } else if !r.ready {
            found.push(format!("replica {} not ready: {}", r.name, r.readiness));
        } else if r.mode.as_deref().is_some_and(|m| m.starts_with("outage")) {
            found.push(format!(
                "replica {} answers logins from its copy: {}",
                r.name,
                r.mode.as_deref().unwrap_or_default()
            ));
        }
    }
    let sync_replicas = replicas
        .iter()
        .any(|r| r.sync && r.seen_seconds_ago <= silent);
    if sync_replicas && !leader_held {
        found.push("no replica leads the sync: account changes wait (nothing is lost)".to_owned());
    }
    found
}

/// The replica holding the sync lock, as its own row names it (else the lock connection).
fn leader_line(s: &Status, replicas: &[Replica]) -> String {
    let Some(l) = &s.leader else {
        return "sync leader: none (no replica holds the sync lock: changes wait, nothing is lost)\n"
            .to_owned();
    };
    let named: Vec<&str> = replicas
        .iter()
        .filter(|r| r.leader)
        .map(|r| r.name.as_str())
        .collect();
    let who = match named.as_slice() {
        [one] => format!("replica {one}"),
        _ => "a replica that has not reported yet".to_owned(),
    };
    format!(
        "sync leader: {who} ({}, {}) since {}\n",
        l.application_name,
        l.client_addr.as_deref().unwrap_or("local socket"),
        l.since
    )
}

fn replica_rows(replicas: &[Replica]) -> String {
    if replicas.is_empty() {
        return String::new();
    }
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                if r.ready {
                    "ready".to_owned()
                } else {
                    format!("not ready: {}", r.readiness)
                },
                r.mode.clone().unwrap_or_else(|| "-".into()),
                if r.nats_connected { "up" } else { "down" }.into(),
                if r.leader { "yes" } else { "no" }.into(),
                format!("{} ago", age(r.seen_seconds_ago)),
                format!("{} (git {})", r.version, r.git_sha),
            ]
        })
        .collect();
    table(
        &[
            "REPLICA",
            "STATE",
            "MODE",
            "NATS",
            "LEADER",
            "LAST SEEN",
            "BUILD",
        ],
        &rows,
    ) + "\n"
}

fn import_rows(errors: &[ImportError]) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let rows: Vec<Vec<String>> = errors
        .iter()
        .map(|e| vec![e.account.clone(), e.import.clone(), e.sync_error.clone()])
        .collect();
    "\n".to_owned() + &table(&["ACCOUNT", "IMPORT", "SYNC ERROR"], &rows)
}

pub async fn status(pool: &sqlx::PgPool, json: bool) -> Result<(), CliError> {
    use crate::db::identities::IdentityKind;
    let q = super::sql_error;
    let identities = crate::init::ServiceIdentities::load(pool).await?;
    let s = admin::status(pool, crate::sync::leader::SYNC_LOCK_KEY)
        .await
        .map_err(q)?;
    let replicas = crate::db::replicas::list(pool).await.map_err(q)?;
    let imports = admin::import_errors(pool).await.map_err(q)?;
    let unavailable = problems(&replicas, s.leader.is_some());
    let refused_accounts = s.accounts.iter().filter(|a| a.sync_error.is_some()).count();
    let build = json!({
        "version": crate::build_info::VERSION,
        "git_sha": crate::build_info::GIT_SHA,
    });
    if json {
        let mut leader = serde_json::to_value(&s.leader).unwrap_or_default();
        if let Some(l) = leader.as_object_mut() {
            let named = replicas.iter().find(|r| r.leader).map(|r| r.name.clone());
            l.insert("replica".into(), json!(named));
        }
        print_json(&json!({
            "build": build,
            "healthy": unavailable.is_empty() && refused_accounts == 0 && imports.is_empty(),
            "problems": unavailable,
            "operator": {
                "name": identities.operator_name(),
                "public_key": identities.public_key(IdentityKind::Operator),
            },
            "leader": leader,
            "replicas": replicas,
            "outbox": s.outbox,
            "kicks_pending": s.kicks_pending,
            "accounts": s.accounts,
            "import_errors": imports,
        }))?;
    } else {
        let mut text = format!(
            "nats-pg-auth {} (this command)\noperator {:?} {}\n",
            crate::build_info::text(),
            identities.operator_name(),
            identities.public_key(IdentityKind::Operator)
        );
        if unavailable.is_empty() {
            text += "health: ok\n";
        } else {
            text += "health: UNHEALTHY\n";
            for p in &unavailable {
                text += &format!("  - {p}\n");
            }
        }
        text += &leader_line(&s, &replicas);
        text += "\n";
        text += &replica_rows(&replicas);
        text += &format!(
            "{} accounts, {} pending sync rows ({} bulk), oldest {}; {} pending kick requests\n\n",
            s.accounts.len(),
            s.outbox.pending,
            s.outbox.bulk,
            super::admin::secs_text(s.outbox.oldest_age_seconds),
            s.kicks_pending
        );
        let rows: Vec<Vec<String>> = s
            .accounts
            .iter()
            .map(|a| {
                vec![
                    a.name.clone(),
                    if a.active { "active" } else { "inactive" }.into(),
                    a.public_key
                        .clone()
                        .unwrap_or_else(|| "(no key yet)".into()),
                    a.synced_at.clone().unwrap_or_else(|| "never synced".into()),
                    a.sync_error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        text += &table(
            &["ACCOUNT", "STATE", "PUBLIC KEY", "SYNCED AT", "SYNC ERROR"],
            &rows,
        );
        text += &import_rows(&imports);
        out(&text)?;
    }
    if !unavailable.is_empty() {
        return Err(CliError::Unavailable(format!(
            "unhealthy: {}",
            unavailable.join("; ")
        )));
    }
    if refused_accounts > 0 || !imports.is_empty() {
        return Err(CliError::Data(format!(
            "nats-server refused {refused_accounts} account(s) and left out {} import(s): see SYNC ERROR above",
            imports.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, ready: bool, seen: f64) -> Replica {
        Replica {
            name: name.into(),
            host: None,
            pid: None,
            version: "0".into(),
            git_sha: "x".into(),
            started_at: String::new(),
            seen_seconds_ago: seen,
            ready,
            readiness: if ready {
                "ready"
            } else {
                "callout connection to NATS is down"
            }
            .into(),
            mode: ready.then(|| "live".into()),
            nats_connected: ready,
            sync: true,
            leader: false,
        }
    }

    #[test]
    fn every_unhealthy_replica_is_named() {
        assert!(problems(&[replica("a", true, 1.0)], true).is_empty());
        assert_eq!(problems(&[], false).len(), 1);
        let p = problems(
            &[
                replica("a", true, 1.0),
                replica("b", false, 1.0),
                replica("c", true, 60.0),
            ],
            true,
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("replica b not ready: callout connection to NATS is down"));
        assert!(p[1].contains("replica c not heard from for 1m"));
        let p = problems(&[replica("a", true, 1.0)], false);
        assert!(p[0].contains("no replica leads the sync"), "{p:?}");
        let mut outage = replica("a", true, 1.0);
        outage.mode = Some("outage, from snapshot taken 2m ago".into());
        assert!(problems(&[outage], true)[0].contains("from snapshot taken 2m ago"));
    }
}
