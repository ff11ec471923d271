//! `connections`: every live client connection on every nats-server, from CONNZ
//! (`$SYS.REQ.SERVER.PING.CONNZ` with `auth: true`, asked as the service's system user), with
//! the account's name from Postgres and whether the connection's JWT was minted from the login
//! copy during a Postgres outage (each `serve` replica remembers those and answers on
//! [`outage_logins::SUBJECT`]: nats-server shows no claim of a callout-minted JWT).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt as _;
use serde::Serialize;
use serde_json::{json, Value};

use super::{out, system, CliError};
use crate::callout::{outage_logins, permissions};
use crate::config::{parse_duration, CommonArgs, NatsTlsArgs};

/// CONNZ's page size (nats-server's default limit).
const PAGE: u64 = 1024;

#[derive(Debug, Args, Clone)]
pub struct ConnectionsArgs {
    /// nats-server URL (any server of the cluster: every server answers).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[command(flatten)]
    pub tls: NatsTlsArgs,
    /// Only the connections of this account (its name).
    #[arg(long)]
    pub account: Option<String>,
    /// Only the connections of this user (its username).
    #[arg(long)]
    pub user: Option<String>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the servers' answers (the last server to answer ends the wait
    /// early once the others have been quiet for a moment).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// One connection, as printed.
#[derive(Debug, Serialize)]
struct Connection {
    server: String,
    server_id: String,
    cid: u64,
    user: Option<String>,
    /// The account's name (ours, or SYS/AUTH), else its public key.
    account: String,
    account_public_key: String,
    /// tcp, ws, mqtt, mqtt-ws, leaf, leaf-ws or in-process.
    door: String,
    ip: Option<String>,
    /// When it connected (RFC 3339, as nats-server reports it).
    since: Option<String>,
    client_name: Option<String>,
    mqtt_client_id: Option<String>,
    /// Its JWT was minted from the login copy while Postgres was unreachable: its rights may
    /// be out of date until it reconnects (the JWT lasts at most `--db-outage-ttl`).
    outage_copy: bool,
}

pub async fn run(common: &CommonArgs, args: ConnectionsArgs) -> Result<(), CliError> {
    let (pool, ids) = system::identities(common).await?;
    let names = account_names(&pool, &ids).await?;
    let account_key = match &args.account {
        None => None,
        Some(name) => Some(
            names
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(k, _)| k.clone())
                .ok_or_else(|| super::usage(format!("no account {name:?}")))?,
        ),
    };
    let client = system::connect(common, &ids, &args.nats_url, &args.tls).await?;
    let mut filter = json!({"auth": true, "limit": PAGE});
    if let Some(key) = &account_key {
        filter["acc"] = json!(key);
    }
    if let Some(user) = &args.user {
        filter["user"] = json!(user);
    }
    let pages = connz_everywhere(&client, &filter, args.timeout).await?;
    let outage: HashSet<(String, u64)> =
        ask_everyone(&client, outage_logins::SUBJECT, "", args.timeout)
            .await?
            .into_iter()
            .filter_map(|v| serde_json::from_value::<Vec<outage_logins::Entry>>(v).ok())
            .flatten()
            .map(|e| (e.server_id, e.cid))
            .collect();
    let _ = client.drain().await;
    let mut rows: Vec<Connection> = pages
        .iter()
        .flat_map(|(server, conns)| conns.iter().map(|c| connection(server, c, &names, &outage)))
        // The server filters too; this keeps the answer right whatever the server supports.
        .filter(|c| {
            account_key
                .as_ref()
                .is_none_or(|k| *k == c.account_public_key)
        })
        .filter(|c| args.user.is_none() || c.user == args.user)
        .collect();
    rows.sort_by(|a, b| {
        (&a.account, &a.user, &a.server, a.cid).cmp(&(&b.account, &b.user, &b.server, b.cid))
    });
    if args.json {
        let text = serde_json::to_string_pretty(&rows)
            .map_err(|e| CliError::Other(format!("cannot write JSON: {e}")))?;
        return out(&(text + "\n"));
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|c| {
            vec![
                c.user.clone().unwrap_or_else(|| "-".into()),
                c.account.clone(),
                c.door.clone(),
                c.server.clone(),
                c.cid.to_string(),
                c.ip.clone().unwrap_or_else(|| "-".into()),
                c.since.clone().unwrap_or_else(|| "-".into()),
                if c.outage_copy { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    out(&super::admin::table(
        &[
            "USER",
            "ACCOUNT",
            "DOOR",
            "SERVER",
            "CID",
            "FROM",
            "SINCE",
            "OUTAGE COPY",
        ],
        &cells,
    ))
}

/// Public key → name of every account: ours, and the service's SYS and AUTH.
async fn account_names(
    pool: &sqlx::PgPool,
    ids: &crate::init::ServiceIdentities,
) -> Result<HashMap<String, String>, CliError> {
    use crate::db::identities::IdentityKind;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT public_key, name FROM nats.accounts WHERE public_key IS NOT NULL")
            .fetch_all(pool)
            .await
            .map_err(super::sql_error)?;
    let mut names: HashMap<String, String> = rows.into_iter().collect();
    for kind in [IdentityKind::SysAccount, IdentityKind::AuthAccount] {
        let row = ids.get(kind);
        names.insert(row.public_key.clone(), row.name.clone());
    }
    Ok(names)
}

fn connection(
    (server, server_id): &(String, String),
    c: &Value,
    names: &HashMap<String, String>,
    outage: &HashSet<(String, u64)>,
) -> Connection {
    let text = |k: &str| c[k].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let key = text("account").unwrap_or_default();
    let cid = c["cid"].as_u64().unwrap_or_default();
    Connection {
        server: server.clone(),
        server_id: server_id.clone(),
        cid,
        user: text("authorized_user"),
        account: names.get(&key).cloned().unwrap_or_else(|| key.clone()),
        account_public_key: key,
        door: door(c["kind"].as_str(), c["type"].as_str()),
        ip: text("ip"),
        since: text("start"),
        client_name: text("name"),
        mqtt_client_id: text("mqtt_client"),
        outage_copy: outage.contains(&(server_id.clone(), cid)),
    }
}

/// The door's short name, from CONNZ's `kind` and `type`.
fn door(kind: Option<&str>, client_type: Option<&str>) -> String {
    match permissions::connection_type(kind.or(Some("Client")), client_type.or(Some("nats"))) {
        "STANDARD" => "tcp",
        "WEBSOCKET" => "ws",
        "MQTT" => "mqtt",
        "MQTT_WS" => "mqtt-ws",
        "LEAFNODE" => "leaf",
        "LEAFNODE_WS" => "leaf-ws",
        "IN_PROCESS" => "in-process",
        other => return other.to_lowercase(),
    }
    .to_owned()
}

/// Publishes one request and collects every answer: each server (or replica) answers once, so
/// after the first answer a short quiet spell means the others have answered too (`timeout`
/// bounds the whole wait, e.g. for one that never does).
async fn ask_everyone(
    client: &async_nats::Client,
    subject: &str,
    payload: &str,
    timeout: Duration,
) -> Result<Vec<Value>, CliError> {
    let unavailable = |e: &dyn std::fmt::Display| CliError::Unavailable(format!("{subject}: {e}"));
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| unavailable(&e))?;
    client
        .publish_with_reply(subject.to_owned(), inbox, payload.to_owned().into())
        .await
        .map_err(|e| unavailable(&e))?;
    client.flush().await.map_err(|e| unavailable(&e))?;
    let quiet = Duration::from_millis(500);
    let deadline = Instant::now() + timeout;
    let mut answers = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = if answers.is_empty() {
            left
        } else {
            left.min(quiet)
        };
        match tokio::time::timeout(wait, replies.next()).await {
            Ok(Some(msg)) => {
                if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) {
                    answers.push(v);
                }
            }
            _ => break,
        }
    }
    Ok(answers)
}

/// CONNZ of every server: ((server name, server id), its connections). A server with more than
/// a page is asked again, by its id, for the rest.
async fn connz_everywhere(
    client: &async_nats::Client,
    filter: &Value,
    timeout: Duration,
) -> Result<Vec<((String, String), Vec<Value>)>, CliError> {
    let unavailable = |e: &dyn std::fmt::Display| CliError::Unavailable(format!("CONNZ: {e}"));
    let pages = ask_everyone(
        client,
        "$SYS.REQ.SERVER.PING.CONNZ",
        &filter.to_string(),
        timeout,
    )
    .await?;
    if pages.is_empty() {
        return Err(CliError::Unavailable(format!(
            "no nats-server answered CONNZ within {}",
            humantime::format_duration(timeout)
        )));
    }
    let mut servers = Vec::new();
    for page in pages {
        if let Some(e) = page.get("error") {
            return Err(CliError::Unavailable(format!("CONNZ refused: {e}")));
        }
        let name = page["server"]["name"].as_str().unwrap_or("?").to_owned();
        let id = page["server"]["id"].as_str().unwrap_or_default().to_owned();
        let data = &page["data"];
        let total = data["total"].as_u64().unwrap_or_default();
        let mut conns: Vec<Value> = data["connections"].as_array().cloned().unwrap_or_default();
        // The rest of a busy server, page by page. `total` counts every connection of the
        // server, filtered or not: a page that adds nothing new is the end.
        while (conns.len() as u64) < total && !id.is_empty() {
            let mut ask = filter.clone();
            ask["offset"] = json!(conns.len());
            let reply = tokio::time::timeout(
                timeout,
                client.request(
                    format!("$SYS.REQ.SERVER.{id}.CONNZ"),
                    ask.to_string().into(),
                ),
            )
            .await
            .map_err(|_| CliError::Unavailable(format!("server {name} did not answer CONNZ")))?
            .map_err(|e| unavailable(&e))?;
            let v: Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
            let more = v["data"]["connections"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let before = conns.len();
            for c in more {
                if !conns.iter().any(|k| k["cid"] == c["cid"]) {
                    conns.push(c);
                }
            }
            if conns.len() == before {
                break;
            }
        }
        servers.push(((name, id), conns));
    }
    Ok(servers)
}
