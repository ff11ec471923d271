//! A config-mode nats.conf as a [`Plan`], read the way nats-server's server/opts.go reads
//! `accounts`, `authorization`, `users`, `permissions`, `exports`/`imports`, `limits` and
//! `jetstream`.
//!
//! Mapping:
//! - every `accounts { NAME { … } }` is an account (the sync gives it new keys: config-mode
//!   clients never see account keys); the `system_account` is left out (the service runs its own);
//! - the top-level `authorization { users | user/password | token }` is the account named by
//!   `--global-account`; a lone `token` becomes a token of the user `<GLOBAL>-token`;
//! - a user keeps its password (bcrypt copied, plain text hashed on import) and its permissions
//!   (its own, else the account's `default_permissions`, as nats-server applies them) as
//!   per-user lists. A user without any permissions gets `>` to publish and subscribe written
//!   out, so the service's configurable defaults can never narrow or widen it;
//! - `allow_responses` and `allowed_connection_types` live on roles in this schema: such a user
//!   gets a role of its own, `user:<username>`, holding only those (the lists stay on the user);
//! - exports with an `accounts` list are private exports (`token_req`) with a grant per listed
//!   account; imports name their exporter by account; a stream `prefix` becomes the local subject
//!   `prefix.subject`;
//! - `limits` and `jetstream` set the account's limit columns; an account without `jetstream`
//!   has JetStream off (as in config mode when other accounts have it).
//!
//! Anything that would change who may do what and has no column here is refused with its file
//! and line (mappings, `proxy_required`, response permissions without expiry, bcrypt tokens,
//! users without a password, …); things that do not change rights are reported as notes.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::natsconf::{self, Map, Node, Value};
use super::{
    Account, Export, Import, ImportError, Kind, Limits, Password, Permissions, Plan, Response,
    Role, Secret, User,
};

/// nats-server's defaults for `allow_responses: true`.
const DEFAULT_RESPONSE_MAX: i32 = 1;
const DEFAULT_RESPONSE_TTL_MS: i64 = 2 * 60 * 1000;
/// `nats.roles.allow_response_ttl` is at most one day (migration 0004).
const MAX_RESPONSE_TTL_MS: i64 = 24 * 3600 * 1000;
/// The bcrypt costs `nats.password_hash_limits()` and the service accept (the service's defaults
/// are the schema's bounds).
fn bcrypt_costs() -> std::ops::RangeInclusive<u32> {
    crate::callout::credentials::MIN_BCRYPT_COST
        ..=crate::callout::credentials::HashLimits::default().max_bcrypt_cost
}
const CONNECTION_TYPES: [&str; 7] = [
    "STANDARD",
    "WEBSOCKET",
    "LEAFNODE",
    "LEAFNODE_WS",
    "MQTT",
    "MQTT_WS",
    "IN_PROCESS",
];

fn refuse<T>(node: &Node, message: impl Into<String>) -> Result<T, ImportError> {
    Err(ImportError::Refused {
        at: node.at(),
        message: message.into(),
    })
}

/// Reads `path` and plans its accounts and users.
pub fn plan(path: &Path, global_account: Option<&str>) -> Result<Plan, ImportError> {
    let root = natsconf::parse_file(path)?;
    plan_from(&root, &path.display().to_string(), global_account)
}

/// The permissions nats-server gives a user: none (everything), or these.
#[derive(Debug, Clone, Default)]
struct Perms {
    publish: Option<(Vec<String>, Vec<String>)>,
    subscribe: Option<(Vec<String>, Vec<String>)>,
    response: Option<Response>,
}

struct Planner {
    notes: Vec<String>,
    usernames: HashSet<String>,
}

pub fn plan_from(root: &Map, source: &str, global: Option<&str>) -> Result<Plan, ImportError> {
    let mut p = Planner {
        notes: Vec::new(),
        usernames: HashSet::new(),
    };
    let mut system_account = None;
    for (key, node) in root.iter() {
        match key.to_ascii_lowercase().as_str() {
            "system_account" | "system" => system_account = node.as_str().map(str::to_owned),
            "operator" | "operators" | "trusted" | "trusted_keys" | "resolver" => {
                return refuse(
                    node,
                    format!("`{key}`: this server runs in operator mode (JWTs); `import nats-conf` reads config-mode users and accounts only"),
                )
            }
            "no_auth_user" => p.notes.push(format!(
                "{}: no_auth_user is not carried over: with the auth callout every client must log in",
                node.at()
            )),
            "websocket" | "mqtt" | "leafnodes" | "leaf"
                if node.as_map().is_some_and(|m| m.get("authorization").is_some()) =>
            {
                p.notes.push(format!(
                    "{}: the `authorization` block inside `{key}` is not imported (only the top-level one and `accounts`)",
                    node.at()
                ))
            }
            _ => {}
        }
    }
    let mut accounts: Vec<Account> = Vec::new();
    let mut names: HashMap<String, Node> = HashMap::new();
    // Raw account maps, kept for the exports/imports pass (they need every account's name).
    let mut raw: Vec<(String, Map)> = Vec::new();
    if let Some(node) = root.get("accounts") {
        match &node.value {
            Value::Array(items) => {
                for item in items {
                    let Some(name) = item.as_str() else {
                        return refuse(
                            item,
                            format!("an account name must be a string, got {}", item.kind()),
                        );
                    };
                    p.account_name(item, name, &names)?;
                    names.insert(name.to_owned(), item.clone());
                    raw.push((name.to_owned(), Map::default()));
                }
            }
            Value::Map(map) => {
                for (name, acc) in map.iter() {
                    if acc.used_as_variable() {
                        continue; // a variable defined inside `accounts`, as nats-server skips it
                    }
                    let Some(m) = acc.as_map() else {
                        return refuse(
                            acc,
                            format!("account {name:?} must be a map, got {}", acc.kind()),
                        );
                    };
                    if system_account.as_deref() == Some(name) {
                        p.notes.push(format!(
                            "{}: account {name:?} is the system_account: left out (the service runs its own system account; its users are not imported)",
                            acc.at()
                        ));
                        continue;
                    }
                    p.account_name(acc, name, &names)?;
                    names.insert(name.to_owned(), acc.clone());
                    raw.push((name.to_owned(), m.clone()));
                }
            }
            _ => {
                return refuse(
                    node,
                    format!("`accounts` must be a map or a list, got {}", node.kind()),
                )
            }
        }
    }
    for (name, m) in &raw {
        accounts.push(p.account(name, m)?);
    }
    // The global account: the top-level authorization block.
    if let Some(auth) = root.get("authorization") {
        let Some(m) = auth.as_map() else {
            return refuse(
                auth,
                format!("`authorization` must be a map, got {}", auth.kind()),
            );
        };
        if let Some(mut account) = p.global(auth, m, global, &names)? {
            // nats-server with JetStream on and no `accounts` gives the global account
            // JetStream without limits; with `accounts`, only those that ask for it.
            if names.is_empty() && server_jetstream(root) {
                let l = &mut account.limits;
                l.max_jetstream_memory_storage = Some(-1);
                l.max_jetstream_disk_storage = Some(-1);
                l.max_jetstream_streams = Some(-1);
                l.max_jetstream_consumers = Some(-1);
            }
            accounts.push(account);
        }
    } else if let Some(g) = global {
        p.notes.push(format!(
            "--global-account {g}: the file has no top-level authorization block; no such account was planned"
        ));
    }
    // Exports and imports, now that every account is known.
    let known: HashSet<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
    let mut links: Vec<(Vec<Export>, Vec<Import>)> = Vec::new();
    for (name, m) in &raw {
        links.push(p.links(name, m, &known, system_account.as_deref())?);
    }
    for ((exports, imports), account) in links.into_iter().zip(accounts.iter_mut()) {
        account.exports = exports;
        account.imports = imports;
    }
    Ok(Plan {
        source: format!("nats.conf {source}"),
        accounts,
        operator: None,
        notes: p.notes,
    })
}

/// What the schema's `nats.subject_problem` would say about a permission subject (it is
/// stricter than nats-server in one way: `foo*` is refused, not taken as a literal token), so
/// the refusal names the file and line instead of coming back from a trigger.
fn subject_problem(s: &str, queue: bool) -> Option<String> {
    let parts: Vec<&str> = s.split(' ').collect();
    let parts = match (parts.len(), queue) {
        (1, _) => parts,
        (2, true) => parts,
        (_, false) => {
            return Some(
                "it contains white space (a queue group is only allowed in subscribe permissions)"
                    .into(),
            )
        }
        _ => {
            return Some("only one space is allowed, between the subject and the queue name".into())
        }
    };
    for part in parts {
        let tokens: Vec<&str> = part.split('.').collect();
        for (i, t) in tokens.iter().enumerate() {
            if t.is_empty() {
                return Some("it has an empty token (a leading, trailing or double dot)".into());
            }
            if t.chars().any(char::is_whitespace) {
                return Some("it contains white space".into());
            }
            if t.len() > 1 && (t.contains('*') || t.contains('>')) {
                return Some(format!("token {t:?} mixes a wildcard with other characters; '*' and '>' must be whole tokens"));
            }
            if *t == ">" && i + 1 != tokens.len() {
                return Some("'>' must be the last token".into());
            }
        }
    }
    None
}

/// Whether the server itself runs JetStream (`jetstream: enabled`, `true`, or a map without
/// `enabled: false`).
fn server_jetstream(root: &Map) -> bool {
    let Some((_, node)) = root.iter().find(|(k, _)| lower_key(k) == "jetstream") else {
        return false;
    };
    match &node.value {
        Value::Bool(b) => *b,
        Value::Str(s) => matches!(s.to_ascii_lowercase().as_str(), "enabled" | "enable"),
        Value::Map(m) => !m
            .iter()
            .any(|(k, v)| lower_key(k) == "enabled" && matches!(v.value, Value::Bool(false))),
        _ => false,
    }
}

fn lower_key(k: &str) -> String {
    k.to_ascii_lowercase()
}

fn int(node: &Node, what: &str) -> Result<i64, ImportError> {
    match node.value {
        Value::Int(i) => Ok(i),
        _ => refuse(
            node,
            format!("{what} must be a number, got {}", node.kind()),
        ),
    }
}

fn boolean(node: &Node, what: &str) -> Result<bool, ImportError> {
    match node.value {
        Value::Bool(b) => Ok(b),
        _ => refuse(
            node,
            format!("{what} must be true or false, got {}", node.kind()),
        ),
    }
}

fn string<'a>(node: &'a Node, what: &str) -> Result<&'a str, ImportError> {
    node.as_str().ok_or_else(|| ImportError::Refused {
        at: node.at(),
        message: format!("{what} must be a string, got {}", node.kind()),
    })
}

/// A Go duration (`2m`, `1.5s`, `500ms`, `1h30m`) in milliseconds; negative allowed.
fn go_duration_ms(s: &str) -> Option<i64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let ms = match &rest[..u] {
            "ns" => 1e-6,
            "us" | "µs" | "μs" => 1e-3,
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return None,
        };
        rest = &rest[u..];
        total += value * ms;
    }
    let ms = total.round() as i64;
    Some(if neg { -ms } else { ms })
}

impl Planner {
    fn account_name(
        &self,
        node: &Node,
        name: &str,
        seen: &HashMap<String, Node>,
    ) -> Result<(), ImportError> {
        if name.starts_with('$') {
            return refuse(node, format!("{name:?} is a reserved account"));
        }
        let ok = name.len() <= 64
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return refuse(
                node,
                format!("account name {name:?} cannot be kept: nats.accounts.name is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"),
            );
        }
        if let Some(first) = seen.get(name) {
            return refuse(
                node,
                format!(
                    "account {name:?} is defined twice (first at {})",
                    first.at()
                ),
            );
        }
        Ok(())
    }

    fn account(&mut self, name: &str, m: &Map) -> Result<Account, ImportError> {
        let mut account = Account {
            name: name.to_owned(),
            ..Account::default()
        };
        // JetStream off unless the account says otherwise (the column default, said explicitly
        // so an existing account is compared on it too).
        account.limits.max_jetstream_memory_storage = Some(0);
        account.limits.max_jetstream_disk_storage = Some(0);
        let defaults = match m
            .iter()
            .find(|(k, _)| lower_key(k) == "default_permissions")
        {
            Some((_, node)) => Some(self.permissions(node)?),
            None => None,
        };
        let mut users_node = None;
        for (key, node) in m.iter() {
            match lower_key(key).as_str() {
                "users" => users_node = Some(node),
                "default_permissions" | "exports" | "imports" => {}
                "jetstream" => self.jetstream(node, &mut account.limits)?,
                "limits" => self.limits(node, &mut account.limits)?,
                "nkey" => self.notes.push(format!(
                    "{}: the account nkey of {name:?} is not kept: the service gives the account new keys (config-mode clients never see them)",
                    node.at()
                )),
                "msg_trace" | "trace_dest" => self.notes.push(format!(
                    "{}: `{key}` of account {name:?} is not carried over (no column for it)",
                    node.at()
                )),
                "mappings" | "maps" => {
                    return refuse(
                        node,
                        format!("`{key}` of account {name:?}: subject mappings are not carried over (the schema has no mappings); remove them from the file to import the rest, and re-create them on the server"),
                    )
                }
                _ if node.used_as_variable() => {}
                _ => return refuse(node, format!("unknown field {key:?} in account {name:?}")),
            }
        }
        if let Some(node) = users_node {
            self.users(node, &mut account, defaults.as_ref())?;
        }
        Ok(account)
    }

    fn limits(&mut self, node: &Node, limits: &mut Limits) -> Result<(), ImportError> {
        let Some(m) = node.as_map() else {
            return refuse(
                node,
                format!("account limits must be a map, got {}", node.kind()),
            );
        };
        for (key, v) in m.iter() {
            let slot = match lower_key(key).as_str() {
                "max_connections" | "max_conn" => &mut limits.max_connections,
                "max_subscriptions" | "max_subs" => &mut limits.max_subscriptions,
                "max_payload" | "max_pay" => &mut limits.max_payload,
                "max_leafnodes" | "max_leafs" => &mut limits.max_leafnodes,
                _ if v.used_as_variable() => continue,
                _ => return refuse(v, format!("unknown field {key:?} in account limits")),
            };
            // nats-server stores these as int32; negative means unlimited.
            *slot = Some(int(v, key)?.clamp(-1, i64::from(i32::MAX)));
        }
        Ok(())
    }

    fn jetstream(&mut self, node: &Node, limits: &mut Limits) -> Result<(), ImportError> {
        let enabled = |l: &mut Limits, on: bool| {
            let v = if on { -1 } else { 0 };
            l.max_jetstream_memory_storage = Some(v);
            l.max_jetstream_disk_storage = Some(v);
            l.max_jetstream_streams = Some(-1);
            l.max_jetstream_consumers = Some(-1);
        };
        match &node.value {
            Value::Bool(b) => enabled(limits, *b),
            Value::Str(s) => match s.to_ascii_lowercase().as_str() {
                "enabled" | "enable" => enabled(limits, true),
                "disabled" | "disable" => enabled(limits, false),
                _ => {
                    return refuse(
                        node,
                        format!("expected 'enabled' or 'disabled' for jetstream, got {s:?}"),
                    )
                }
            },
            Value::Map(m) => {
                enabled(limits, true);
                for (key, v) in m.iter() {
                    let slot = match lower_key(key).as_str() {
                        "max_memory" | "max_mem" | "mem" | "memory" => {
                            &mut limits.max_jetstream_memory_storage
                        }
                        "max_store" | "max_file" | "max_disk" | "store" | "disk" => {
                            &mut limits.max_jetstream_disk_storage
                        }
                        "max_streams" | "streams" => &mut limits.max_jetstream_streams,
                        "max_consumers" | "consumers" => &mut limits.max_jetstream_consumers,
                        "max_bytes_required" | "max_stream_bytes" | "max_bytes" => {
                            if boolean(v, key)? {
                                return refuse(v, format!("jetstream `{key}: true` is not carried over (no column for it)"));
                            }
                            continue;
                        }
                        "cluster_traffic" => {
                            if string(v, key)? == "owner" {
                                return refuse(v, "jetstream `cluster_traffic: owner` is not carried over (no column for it)");
                            }
                            continue;
                        }
                        _ if v.used_as_variable() => continue,
                        other => {
                            return refuse(v, format!("jetstream `{other}` is not carried over (no column for it); remove it to import the rest"))
                        }
                    };
                    *slot = Some(int(v, key)?.max(-1));
                }
            }
            _ => {
                return refuse(
                    node,
                    format!(
                        "jetstream must be a map, a boolean or a string, got {}",
                        node.kind()
                    ),
                )
            }
        }
        Ok(())
    }

    fn users(
        &mut self,
        node: &Node,
        account: &mut Account,
        defaults: Option<&Perms>,
    ) -> Result<(), ImportError> {
        let Value::Array(items) = &node.value else {
            return refuse(node, format!("`users` must be a list, got {}", node.kind()));
        };
        for item in items {
            let Some(m) = item.as_map() else {
                return refuse(item, format!("a user must be a map, got {}", item.kind()));
            };
            let mut username = None;
            let mut password = None;
            let mut nkey = None;
            let mut perms = None;
            let mut types = Vec::new();
            for (key, v) in m.iter() {
                match lower_key(key).as_str() {
                    "user" | "username" => username = Some(string(v, key)?.to_owned()),
                    "pass" | "password" => password = Some((string(v, key)?.to_owned(), v)),
                    "nkey" => nkey = Some(string(v, key)?.to_owned()),
                    "permission" | "permissions" | "authorization" => {
                        perms = Some(self.permissions(v)?)
                    }
                    "allowed_connection_types" | "connection_types" | "clients" => {
                        types = self.connection_types(v)?
                    }
                    "proxy_required" => {
                        if boolean(v, key)? {
                            return refuse(v, "`proxy_required: true` is not carried over (the schema has no such rule)");
                        }
                    }
                    _ if v.used_as_variable() => {}
                    _ => return refuse(v, format!("unknown field {key:?} in a user")),
                }
            }
            let (username, password, nkey) = match (username, nkey) {
                (Some(_), Some(_)) => {
                    return refuse(item, "nkey users do not take usernames or passwords")
                }
                (None, Some(nk)) => {
                    if password.is_some() {
                        return refuse(item, "nkey users do not take usernames or passwords");
                    }
                    if !(nk.len() == 56
                        && nk.starts_with('U')
                        && nk
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c)))
                    {
                        return refuse(item, format!("{nk:?} is not a public user nkey"));
                    }
                    // The nkey is the login; it is also the row's username (unique, no spaces).
                    (nk.clone(), None, Some(nk))
                }
                (Some(u), None) => {
                    let Some((pw, at)) = password else {
                        return refuse(
                            item,
                            format!(
                                "user {u:?} has no password: the schema has no password-less users"
                            ),
                        );
                    };
                    (u, Some(self.password(&pw, at)?), None)
                }
                (None, None) => {
                    return refuse(item, "a user needs `user` (with `password`) or `nkey`")
                }
            };
            self.username(item, &username)?;
            // nats-server: a user without permissions of its own gets the defaults.
            let perms = perms.or_else(|| defaults.cloned());
            account.push_user(item, username, password, nkey, perms, types)?;
        }
        Ok(())
    }

    fn username(&mut self, node: &Node, name: &str) -> Result<(), ImportError> {
        if name.is_empty() || name.chars().any(char::is_whitespace) || name.chars().count() > 256 {
            return refuse(node, format!("username {name:?} cannot be kept: nats.users.username is 1 to 256 characters without white space"));
        }
        if !self.usernames.insert(name.to_owned()) {
            return refuse(node, format!("duplicate user {name:?}"));
        }
        Ok(())
    }

    fn password(&mut self, pw: &str, node: &Node) -> Result<Password, ImportError> {
        // nats-server treats a password as bcrypt when it looks like one: ^\$2[abxy]\$\d{2}\$.
        let b = pw.as_bytes();
        let looks_bcrypt = b.len() > 7
            && pw.starts_with("$2")
            && matches!(b[2], b'a' | b'b' | b'x' | b'y')
            && b[3] == b'$'
            && b[4].is_ascii_digit()
            && b[5].is_ascii_digit()
            && b[6] == b'$';
        if !looks_bcrypt {
            if pw.is_empty() {
                return refuse(node, "an empty password cannot be kept");
            }
            return Ok(Password::Plain(Secret::new(pw)));
        }
        let cost: u32 = pw[4..6].parse().unwrap_or(0);
        let rest = &pw[7..];
        if rest.len() != 53
            || !rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '/')
        {
            // Never quote it: it may be a password that happens to start like a hash.
            return refuse(node, "a password that starts like a bcrypt hash is not a complete one (expected 53 characters of salt and hash after the cost)");
        }
        let costs = bcrypt_costs();
        if !costs.contains(&cost) {
            return refuse(node, format!("bcrypt cost {cost} is outside {}..{} (nats.password_hash_limits()); re-hash it with a lower cost", costs.start(), costs.end()));
        }
        Ok(Password::Hash(Secret::new(pw)))
    }

    fn connection_types(&mut self, node: &Node) -> Result<Vec<String>, ImportError> {
        let list = match &node.value {
            Value::Str(s) => vec![(s.clone(), node)],
            Value::Array(items) => items
                .iter()
                .map(|i| string(i, "a connection type").map(|s| (s.to_owned(), i)))
                .collect::<Result<_, _>>()?,
            _ => {
                return refuse(
                    node,
                    format!(
                        "allowed connection types must be a list, got {}",
                        node.kind()
                    ),
                )
            }
        };
        let mut out = Vec::new();
        for (t, at) in list {
            let up = t.to_ascii_uppercase();
            if !CONNECTION_TYPES.contains(&up.as_str()) {
                return refuse(
                    at,
                    format!(
                        "unknown connection type {t:?} (known: {})",
                        CONNECTION_TYPES.join(", ")
                    ),
                );
            }
            out.push(up);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// `permissions { publish, subscribe, allow_responses }`.
    fn permissions(&mut self, node: &Node) -> Result<Perms, ImportError> {
        let Some(m) = node.as_map() else {
            return refuse(
                node,
                format!("permissions must be a map, got {}", node.kind()),
            );
        };
        let mut p = Perms::default();
        for (key, v) in m.iter() {
            match lower_key(key).as_str() {
                "pub" | "publish" | "import" => p.publish = self.subject_permission(v, false)?,
                "sub" | "subscribe" | "export" => p.subscribe = self.subject_permission(v, true)?,
                "publish_allow_responses" | "allow_responses" => p.response = self.response(v)?,
                _ if v.used_as_variable() => {}
                _ => return refuse(v, format!("unknown field {key:?} in permissions")),
            }
        }
        Ok(p)
    }

    /// A subject, a list, or `{allow, deny}`. `None`: no restriction.
    #[allow(clippy::type_complexity)]
    fn subject_permission(
        &mut self,
        node: &Node,
        queue: bool,
    ) -> Result<Option<(Vec<String>, Vec<String>)>, ImportError> {
        match &node.value {
            Value::Map(m) => {
                if m.is_empty() {
                    return Ok(None);
                }
                let mut allow = Vec::new();
                let mut deny = Vec::new();
                for (key, v) in m.iter() {
                    match lower_key(key).as_str() {
                        "allow" => allow = self.subjects(v, queue)?,
                        "deny" => deny = self.subjects(v, queue)?,
                        _ if v.used_as_variable() => {}
                        _ => return refuse(v, format!("unknown field {key:?} in subject permissions, only 'allow' or 'deny' are permitted")),
                    }
                }
                Ok(Some((allow, deny)))
            }
            _ => Ok(Some((self.subjects(node, queue)?, Vec::new()))),
        }
    }

    fn subjects(&mut self, node: &Node, queue: bool) -> Result<Vec<String>, ImportError> {
        let items: Vec<(&str, &Node)> = match &node.value {
            Value::Str(s) => vec![(s.as_str(), node)],
            Value::Array(items) => items
                .iter()
                .map(|i| string(i, "a subject in permissions").map(|s| (s, i)))
                .collect::<Result<_, _>>()?,
            _ => {
                return refuse(
                    node,
                    format!(
                        "expected a subject or a list of subjects, got {}",
                        node.kind()
                    ),
                )
            }
        };
        let mut out = Vec::new();
        for (s, at) in items {
            // Queue permissions are "subject queue" with exactly one space in the schema.
            let s = if queue {
                s.split_whitespace().collect::<Vec<_>>().join(" ")
            } else {
                s.to_owned()
            };
            if let Some(problem) = subject_problem(&s, queue) {
                return refuse(at, format!("subject {s:?} cannot be kept: {problem}"));
            }
            out.push(s);
        }
        Ok(out)
    }

    fn response(&mut self, node: &Node) -> Result<Option<Response>, ImportError> {
        let mut r = Response {
            max: DEFAULT_RESPONSE_MAX,
            ttl_ms: DEFAULT_RESPONSE_TTL_MS,
        };
        match &node.value {
            Value::Bool(false) => return Ok(None),
            Value::Bool(true) => {}
            Value::Map(m) => {
                for (key, v) in m.iter() {
                    match lower_key(key).as_str() {
                        "max" | "max_msgs" | "max_messages" | "max_responses" => {
                            // Negative: unlimited; 0: the default.
                            match int(v, key)? {
                                0 => {}
                                n if n < 0 => r.max = -1,
                                n => r.max = i32::try_from(n).unwrap_or(i32::MAX),
                            }
                        }
                        "expires" | "expiration" | "ttl" => {
                            let s = string(v, key)?;
                            let Some(ms) = go_duration_ms(s) else {
                                return refuse(
                                    v,
                                    format!("{key}: {s:?} is not a duration like 1m or 500ms"),
                                );
                            };
                            if ms < 0 {
                                return refuse(v, "allow_responses with a negative expiry (never expires) cannot be kept: roles.allow_response_ttl is at most 1 day");
                            }
                            if ms > MAX_RESPONSE_TTL_MS {
                                return refuse(v, "allow_responses expiry above 1 day cannot be kept (roles.allow_response_ttl is at most 1 day)");
                            }
                            if ms > 0 {
                                r.ttl_ms = ms;
                            }
                        }
                        _ if v.used_as_variable() => {}
                        _ => return refuse(v, format!("unknown field {key:?} in allow_responses")),
                    }
                }
            }
            _ => {
                return refuse(
                    node,
                    format!(
                        "allow_responses must be a boolean or a map, got {}",
                        node.kind()
                    ),
                )
            }
        }
        Ok(Some(r))
    }

    /// The top-level `authorization` block as the global account.
    fn global(
        &mut self,
        auth: &Node,
        m: &Map,
        global: Option<&str>,
        names: &HashMap<String, Node>,
    ) -> Result<Option<Account>, ImportError> {
        let mut single_user = None;
        let mut single_pass = None;
        let mut token = None;
        let mut users = None;
        let mut defaults = None;
        for (key, v) in m.iter() {
            match lower_key(key).as_str() {
                "user" | "username" => single_user = Some((string(v, key)?.to_owned(), v)),
                "pass" | "password" => single_pass = Some((string(v, key)?.to_owned(), v)),
                "token" => token = Some((string(v, key)?.to_owned(), v)),
                "users" => users = Some(v),
                "default_permission" | "default_permissions" | "permissions" => {
                    defaults = Some(self.permissions(v)?)
                }
                "timeout" => {}
                "auth_callout" | "auth_hook" => {
                    return refuse(v, "this server already uses an auth callout; there are no config-mode users to import here")
                }
                "proxy_required" => {
                    if boolean(v, key)? {
                        return refuse(v, "`proxy_required: true` is not carried over (the schema has no such rule)");
                    }
                }
                _ if v.used_as_variable() => {}
                _ => return refuse(v, format!("unknown field {key:?} in authorization")),
            }
        }
        if single_user.is_none() && single_pass.is_none() && token.is_none() && users.is_none() {
            return Ok(None);
        }
        let Some(name) = global else {
            return refuse(auth, "the top-level authorization block has users or a token: name the account they move to with --global-account NAME");
        };
        if let Some(first) = names.get(name) {
            return refuse(auth, format!("--global-account {name}: the file already defines an account {name:?} (at {}); choose another name", first.at()));
        }
        self.account_name(auth, name, names)
            .map_err(|_| ImportError::Usage(format!("--global-account {name:?}: an account name is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")))?;
        if (single_user.is_some() || single_pass.is_some()) && token.is_some() {
            return refuse(auth, "cannot have a user/pass and token");
        }
        let mut account = Account {
            name: name.to_owned(),
            ..Account::default()
        };
        account.limits.max_jetstream_memory_storage = Some(0);
        account.limits.max_jetstream_disk_storage = Some(0);
        if let Some(node) = users {
            if single_user.is_some() || token.is_some() {
                return refuse(
                    node,
                    "cannot have a single user/pass or a token and a users array",
                );
            }
            self.users(node, &mut account, defaults.as_ref())?;
        }
        if let Some((user, at)) = single_user {
            let Some((pw, pw_at)) = single_pass else {
                return refuse(at, format!("user {user:?} has no password"));
            };
            self.username(at, &user)?;
            let password = self.password(&pw, pw_at)?;
            // nats-server gives the single user no permissions: everything.
            account.push_user(at, user, Some(password), None, None, vec![])?;
        } else if let Some((_, at)) = single_pass {
            return refuse(at, "a password without a user");
        }
        if let Some((tok, at)) = token {
            if tok.starts_with("$2") {
                return refuse(at, "the token is stored as a bcrypt hash: the service stores tokens as SHA-256 digests of the token itself, which cannot be derived from a hash; issue a new token (`nats-pg-auth add-token`) instead");
            }
            if tok.is_empty() {
                return refuse(at, "an empty token cannot be kept");
            }
            let username = format!("{name}-token");
            self.username(at, &username)?;
            account.push_user(at, username.clone(), None, None, None, vec![])?;
            account
                .users
                .last_mut()
                .expect("just pushed")
                .tokens
                .push(Secret::new(tok));
        }
        Ok(Some(account))
    }

    /// Exports and imports of one account (every account name known by now).
    fn links(
        &mut self,
        name: &str,
        m: &Map,
        known: &HashSet<&str>,
        system: Option<&str>,
    ) -> Result<(Vec<Export>, Vec<Import>), ImportError> {
        let mut exports = Vec::new();
        let mut imports = Vec::new();
        for (key, node) in m.iter() {
            match lower_key(key).as_str() {
                "exports" => {
                    let Value::Array(items) = &node.value else {
                        return refuse(
                            node,
                            format!("exports must be a list, got {}", node.kind()),
                        );
                    };
                    for item in items {
                        exports.push(self.export(name, item, known, system, &exports)?);
                    }
                }
                "imports" => {
                    let Value::Array(items) = &node.value else {
                        return refuse(
                            node,
                            format!("imports must be a list, got {}", node.kind()),
                        );
                    };
                    for item in items {
                        if let Some(i) = self.import(name, item, known, system, &imports)? {
                            imports.push(i);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok((exports, imports))
    }

    fn export(
        &mut self,
        account: &str,
        item: &Node,
        known: &HashSet<&str>,
        system: Option<&str>,
        so_far: &[Export],
    ) -> Result<Export, ImportError> {
        let Some(m) = item.as_map() else {
            return refuse(
                item,
                format!(
                    "an export must be a map with `stream` or `service`, got {}",
                    item.kind()
                ),
            );
        };
        let mut kind = None;
        let mut subject = None;
        let mut grants = None;
        let mut private = false;
        let mut response_type = None;
        let mut threshold = None;
        let mut position = None;
        let mut allow_trace = false;
        for (key, v) in m.iter() {
            match lower_key(key).as_str() {
                "stream" | "service" => {
                    if kind.is_some() {
                        return refuse(v, "an export is a stream or a service, not both");
                    }
                    kind = Some(if lower_key(key) == "stream" { Kind::Stream } else { Kind::Service });
                    subject = Some(string(v, key)?.to_owned());
                }
                "accounts" => {
                    let Value::Array(list) = &v.value else {
                        return refuse(v, format!("`accounts` must be a list, got {}", v.kind()));
                    };
                    let mut names = Vec::new();
                    private = !list.is_empty();
                    for a in list {
                        let n = string(a, "an account name")?;
                        if system == Some(n) {
                            self.notes.push(format!(
                                "{}: the grant of an export of {account:?} to the system account is not carried over",
                                a.at()
                            ));
                            continue;
                        }
                        if !known.contains(n) {
                            return refuse(a, format!("{n:?} account not defined for export"));
                        }
                        names.push(n.to_owned());
                    }
                    grants = Some(names);
                }
                "response" | "response_type" => {
                    let s = string(v, key)?;
                    response_type = Some(match s.to_ascii_lowercase().as_str() {
                        "single" | "singleton" => "Singleton",
                        "stream" => "Stream",
                        "chunk" | "chunked" => "Chunked",
                        _ => return refuse(v, format!("unknown response type {s:?}")),
                    });
                }
                "threshold" | "response_threshold" | "response_max_time" | "response_time" => {
                    let s = string(v, key)?;
                    match go_duration_ms(s) {
                        Some(ms) if ms > 0 && ms <= 24 * 3600 * 1000 => threshold = Some(ms),
                        _ => return refuse(v, format!("response threshold {s:?} must be a duration above 0 and at most 1 day")),
                    }
                }
                "account_token_position" => {
                    let n = int(v, key)?;
                    if n > 0 {
                        position = Some(i32::try_from(n).map_err(|_| ImportError::Refused {
                            at: v.at(),
                            message: "account_token_position is too large".into(),
                        })?);
                    }
                }
                "allow_trace" => allow_trace = boolean(v, key)?,
                "latency" => self.notes.push(format!(
                    "{}: service latency tracking of an export of {account:?} is not carried over (no column for it)",
                    v.at()
                )),
                _ if v.used_as_variable() => {}
                _ => return refuse(v, format!("unknown field {key:?} in an export")),
            }
        }
        let (Some(kind), Some(subject)) = (kind, subject) else {
            return refuse(item, "an export needs `stream` or `service`");
        };
        if kind == Kind::Stream && (response_type.is_some() || threshold.is_some() || allow_trace) {
            return refuse(
                item,
                "response settings and allow_trace are for service exports only",
            );
        }
        let mut name = subject.clone();
        if so_far.iter().any(|e| e.name == name) {
            name = format!("{subject} ({})", kind.as_str());
        }
        let grants = grants.unwrap_or_default();
        Ok(Export {
            name,
            subject,
            kind,
            // Private when nats.conf lists accounts, even if none of them carries over.
            token_req: private,
            response_type: response_type.map(str::to_owned),
            response_threshold_ms: threshold,
            account_token_position: position,
            allow_trace,
            grants,
        })
    }

    fn import(
        &mut self,
        account: &str,
        item: &Node,
        known: &HashSet<&str>,
        system: Option<&str>,
        so_far: &[Import],
    ) -> Result<Option<Import>, ImportError> {
        let Some(m) = item.as_map() else {
            return refuse(
                item,
                format!(
                    "an import must be a map with `stream` or `service`, got {}",
                    item.kind()
                ),
            );
        };
        let mut kind = None;
        let mut source = None;
        let mut prefix = None;
        let mut to = None;
        let mut share = false;
        let mut allow_trace = false;
        for (key, v) in m.iter() {
            match lower_key(key).as_str() {
                "stream" | "service" => {
                    if kind.is_some() {
                        return refuse(v, "an import is a stream or a service, not both");
                    }
                    kind = Some(if lower_key(key) == "stream" {
                        Kind::Stream
                    } else {
                        Kind::Service
                    });
                    let Some(am) = v.as_map() else {
                        return refuse(
                            v,
                            format!(
                                "`{key}` must be a map with `account` and `subject`, got {}",
                                v.kind()
                            ),
                        );
                    };
                    let acc = am
                        .get("account")
                        .map(|n| string(n, "account"))
                        .transpose()?;
                    let sub = am
                        .get("subject")
                        .map(|n| string(n, "subject"))
                        .transpose()?;
                    match (acc, sub) {
                        (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => {
                            source = Some((a.to_owned(), s.to_owned(), v))
                        }
                        _ => return refuse(v, "expected an account name and a subject"),
                    }
                }
                "prefix" => prefix = Some(string(v, key)?.to_owned()),
                "to" => to = Some(string(v, key)?.to_owned()),
                "share" => share = boolean(v, key)?,
                "allow_trace" => allow_trace = boolean(v, key)?,
                _ if v.used_as_variable() => {}
                _ => return refuse(v, format!("unknown field {key:?} in an import")),
            }
        }
        let (Some(kind), Some((exporter, subject, at))) = (kind, source) else {
            return refuse(item, "an import needs `stream` or `service`");
        };
        if system == Some(exporter.as_str()) {
            self.notes.push(format!(
                "{}: the import of {subject:?} from the system account into {account:?} is not carried over",
                at.at()
            ));
            return Ok(None);
        }
        if !known.contains(exporter.as_str()) {
            return refuse(at, format!("{exporter:?} account not defined for import"));
        }
        if exporter == account {
            return refuse(at, "an account cannot import from itself");
        }
        let local_subject = match kind {
            Kind::Stream => {
                if prefix.is_some() && to.is_some() {
                    return refuse(
                        item,
                        "stream import can not have a 'prefix' and a 'to' property",
                    );
                }
                if share {
                    return refuse(item, "`share` is for service imports only");
                }
                match (prefix, to) {
                    (Some(p), None) => Some(format!("{p}.{subject}")),
                    (None, to) => to,
                    _ => None,
                }
            }
            Kind::Service => {
                if prefix.is_some() {
                    return refuse(item, "`prefix` is for stream imports only");
                }
                if allow_trace {
                    return refuse(item, "allow_trace is for stream imports only");
                }
                to.filter(|t| *t != subject)
            }
        };
        let mut name = format!("{exporter}:{subject}");
        let base = name.clone();
        let mut n = 2;
        while so_far.iter().any(|i| i.name == name) {
            name = format!("{base} #{n}");
            n += 1;
        }
        Ok(Some(Import {
            name,
            subject,
            exporter,
            local_subject,
            kind,
            share,
            allow_trace,
        }))
    }
}

impl Account {
    /// Adds a user with its effective permissions (see the module comment).
    fn push_user(
        &mut self,
        at: &Node,
        username: String,
        password: Option<Password>,
        nkey: Option<String>,
        perms: Option<Perms>,
        connection_types: Vec<String>,
    ) -> Result<(), ImportError> {
        let everything = || vec![">".to_string()];
        let (permissions, response) = match perms {
            None => (
                Permissions {
                    publish_allow: everything(),
                    subscribe_allow: everything(),
                    ..Permissions::default()
                },
                None,
            ),
            Some(p) => {
                let (publish_allow, publish_deny) = p.publish.unwrap_or_default();
                let (subscribe_allow, subscribe_deny) = p.subscribe.unwrap_or_default();
                let mut perms = Permissions {
                    publish_allow,
                    publish_deny,
                    subscribe_allow,
                    subscribe_deny,
                };
                if perms.is_empty() {
                    // Nothing restricted. Said explicitly: with all four lists empty the service
                    // would apply its configured defaults instead. With a response permission,
                    // publishing stays empty: nats-server then allows replies only, in config
                    // mode and in the minted JWT alike.
                    perms.subscribe_allow = everything();
                    if p.response.is_none() {
                        perms.publish_allow = everything();
                    }
                }
                (perms, p.response)
            }
        };
        let role = if response.is_some() || !connection_types.is_empty() {
            let name = format!("user:{username}");
            if self.roles.iter().any(|r| r.name == name) {
                return refuse(at, format!("role {name:?} is planned twice"));
            }
            self.roles.push(Role {
                name: name.clone(),
                permissions: Permissions::default(),
                response,
                allowed_connection_types: connection_types,
                ..Role::default()
            });
            Some(name)
        } else {
            None
        };
        self.users.push(User {
            username,
            password,
            nkey,
            role,
            permissions: permissions.normalised(),
            tokens: Vec::new(),
            inactive: false,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(text: &str, global: Option<&str>) -> Result<Plan, ImportError> {
        let root = natsconf::parse_str(text, Path::new("/n.conf"), &|_| None)?;
        plan_from(&root, "/n.conf", global)
    }

    const HASH: &str = "$2a$11$PWIFAL8RsWyGI3jVZtO9Nu8.6jOxzxfZo7c/W0eLk017hjgUKWrhy";

    #[test]
    fn accounts_users_permissions_and_links() {
        let text = format!(
            r#"
accounts {{
  A {{
    jetstream {{ max_mem: 1GB, max_file: 512MB }}
    limits {{ max_connections: 10 }}
    users [
      {{ user: alice, password: "{HASH}", permissions {{ publish {{ allow: ["a.>"], deny: "a.secret" }}, subscribe: ["svc.>", "_INBOX.>"], allow_responses: {{ max: 2, expires: "1m" }} }} }}
      {{ user: ann, password: plain-pw }}
    ]
    exports [ {{ service: svc.echo, accounts: [B] }}, {{ stream: "public.>" }} ]
  }}
  B {{
    default_permissions {{ publish: "b.>" }}
    users = [ {{ user: bob, password: pw2 }} ]
    imports [ {{ service: {{ account: A, subject: svc.echo }}, to: echo }}, {{ stream: {{ account: A, subject: "public.>" }}, prefix: from_a }} ]
  }}
}}
"#
        );
        let plan = plan_of(&text, None).unwrap();
        let a = &plan.accounts[0];
        assert_eq!(a.limits.max_jetstream_memory_storage, Some(1 << 30));
        assert_eq!(a.limits.max_jetstream_disk_storage, Some(512 << 20));
        assert_eq!(a.limits.max_jetstream_streams, Some(-1));
        assert_eq!(a.limits.max_connections, Some(10));
        let alice = &a.users[0];
        assert!(matches!(&alice.password, Some(Password::Hash(h)) if h.expose() == HASH));
        assert_eq!(alice.permissions.publish_allow, vec!["a.>"]);
        assert_eq!(alice.permissions.publish_deny, vec!["a.secret"]);
        assert_eq!(alice.permissions.subscribe_allow, vec!["_INBOX.>", "svc.>"]);
        assert_eq!(alice.role.as_deref(), Some("user:alice"));
        assert_eq!(
            a.roles[0].response,
            Some(Response {
                max: 2,
                ttl_ms: 60_000
            })
        );
        let ann = &a.users[1];
        assert!(matches!(&ann.password, Some(Password::Plain(_))));
        assert_eq!(ann.permissions.publish_allow, vec![">"]);
        assert_eq!(ann.permissions.subscribe_allow, vec![">"]);
        assert_eq!(a.exports[0].grants, vec!["B"]);
        assert!(a.exports[0].token_req);
        assert!(!a.exports[1].token_req);
        let b = &plan.accounts[1];
        assert_eq!(b.limits.max_jetstream_memory_storage, Some(0));
        // Default permissions apply to users without their own.
        assert_eq!(b.users[0].permissions.publish_allow, vec!["b.>"]);
        assert!(b.users[0].permissions.subscribe_allow.is_empty());
        assert_eq!(b.imports[0].local_subject.as_deref(), Some("echo"));
        assert_eq!(
            b.imports[1].local_subject.as_deref(),
            Some("from_a.public.>")
        );
        // Secrets stay out of Debug output.
        assert!(!format!("{plan:?}").contains("plain-pw"));
        assert!(!format!("{plan:?}").contains(HASH));
    }

    #[test]
    fn the_global_account_needs_a_name_and_a_token_becomes_a_token_user() {
        let e = plan_of("authorization {\n token: s3cret\n}\n", None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/n.conf:1: the top-level authorization block"),
            "{e}"
        );
        let plan = plan_of("authorization {\n token: s3cret\n}\n", Some("G")).unwrap();
        let g = &plan.accounts[0];
        assert_eq!(g.name, "G");
        assert_eq!(g.users[0].username, "G-token");
        assert_eq!(g.users[0].tokens[0].expose(), "s3cret");
        assert!(g.users[0].password.is_none());
    }

    #[test]
    fn a_global_only_server_with_jetstream_gives_the_global_account_jetstream() {
        let text = "jetstream { store_dir: /data }\nauthorization { users [ { user: u, password: p } ] }\n";
        let plan = plan_of(text, Some("G")).unwrap();
        assert_eq!(plan.accounts[0].limits.max_jetstream_disk_storage, Some(-1));
        let text = "jetstream: enabled\naccounts { A {} }\nauthorization { users [ { user: u, password: p } ] }\n";
        let plan = plan_of(text, Some("G")).unwrap();
        assert_eq!(plan.accounts[1].limits.max_jetstream_disk_storage, Some(0));
    }

    #[test]
    fn the_system_account_is_left_out_and_exports_to_it_stay_private() {
        let text = "system_account: SYS\naccounts {\n SYS { users [ { user: admin, password: p } ] }\n A { exports [ { service: s.x, accounts: [SYS] } ]\n imports [ { service: { account: SYS, subject: \"$SYS.REQ.SERVER.PING\" } } ] }\n}\n";
        let plan = plan_of(text, None).unwrap();
        assert_eq!(plan.accounts.len(), 1);
        let a = &plan.accounts[0];
        assert!(a.exports[0].token_req && a.exports[0].grants.is_empty());
        assert!(a.imports.is_empty());
        assert_eq!(plan.notes.len(), 3, "{:?}", plan.notes);
    }

    #[test]
    fn responses_only_leave_publishing_to_replies() {
        let plan = plan_of(
            "accounts { A { users [ { user: r, password: p, permissions { allow_responses: true } } ] } }",
            None,
        )
        .unwrap();
        let r = &plan.accounts[0].users[0];
        assert!(r.permissions.publish_allow.is_empty());
        assert_eq!(r.permissions.subscribe_allow, vec![">"]);
        assert_eq!(
            plan.accounts[0].roles[0].response,
            Some(Response {
                max: 1,
                ttl_ms: 120_000
            })
        );
    }

    #[test]
    fn what_cannot_be_kept_is_refused_with_the_line() {
        let cases = [
            ("accounts {\n A {\n mappings { a: b }\n }\n}", "/n.conf:3: `mappings`"),
            ("accounts {\n A { users [\n { user: x } ] }\n}", "/n.conf:3: user \"x\" has no password"),
            ("authorization {\n token: \"$2a$11$PWIFAL8RsWyGI3jVZtO9Nu8.6jOxzxfZo7c/W0eLk017hjgUKWrhy\"\n}", "/n.conf:2: the token is stored as a bcrypt hash"),
            ("accounts {\n A { users [\n { user: x, password: p, permissions { allow_responses { expires: \"-1s\" } } } ] }\n}", "/n.conf:3: allow_responses with a negative expiry"),
            ("accounts {\n \"bad name\" {}\n}", "/n.conf:2: account name \"bad name\""),
            ("accounts {\n A { users [ { user: x, password: p } ] }\n B { users [\n { user: x, password: q } ] }\n}", "/n.conf:4: duplicate user \"x\""),
            ("accounts {\n A { imports [\n { service: { account: Z, subject: s } } ] }\n}", "/n.conf:3: \"Z\" account not defined"),
            ("operator: /x/op.jwt\n", "/n.conf:1: `operator`"),
            ("accounts {\n A { users [ { user: x, password: p,\n permissions { publish: [\"ok.>\", \"foo*\"] } } ] }\n}", "/n.conf:3: subject \"foo*\" cannot be kept"),
            ("accounts {\n A { users [\n { user: x, password: \"$2a$15$PWIFAL8RsWyGI3jVZtO9Nu8.6jOxzxfZo7c/W0eLk017hjgUKWrhy\" } ] }\n}", "/n.conf:3: bcrypt cost 15"),
        ];
        for (text, want) in cases {
            let e = plan_of(text, Some("G")).expect_err(text).to_string();
            assert!(e.starts_with(want), "{text:?}: got {e:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration_ms("2m"), Some(120_000));
        assert_eq!(go_duration_ms("1.5s"), Some(1500));
        assert_eq!(go_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(go_duration_ms("500ms"), Some(500));
        assert_eq!(go_duration_ms("-1s"), Some(-1000));
        assert_eq!(go_duration_ms("5"), None);
    }
}
