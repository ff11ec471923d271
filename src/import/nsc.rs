//! An nsc operator store ([`plan`]): the operator, its system account and every account with
//! their existing keys, and every user as a row bound to its public nkey.
//!
//! The layout is nsc's (`nsc env`): the store holds `<Operator>/<Operator>.jwt` and
//! `<Operator>/accounts/<Account>/<Account>.jwt` and `…/users/<User>.jwt`; the keys directory
//! (`NKEYS_PATH`) holds `keys/<K>/<EY>/<KEY>.nk` (the first character of the public key, the
//! next two, the key) with the seed, and `creds/` (not read: a `.creds` file repeats a user
//! JWT and a user seed, which the service never needs).
//!
//! Every JWT is decoded with the project's own decoder and its signature checked, and it must be
//! issued by the key that should have issued it (the operator, or the account for its users);
//! every seed found must be the seed of its key. Anything that cannot be carried over faithfully
//! is refused (a scoped signing key: its users would lose the scope's limits) or, when the
//! servers keep enforcing it from the JWT anyway, reported as a note.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{
    Account, Export, Import, ImportError, Key, Kind, Limits, Operator, Permissions, Plan, Response,
    Role, Secret, SystemAccount, User,
};
use crate::jwt::claims::{
    AccountClaims, ActivationClaims, ExportType, OperatorClaims, ResponseType, UserClaims,
};
use crate::jwt::{self, Claims};

fn refuse<T>(at: &Path, message: impl Into<String>) -> Result<T, ImportError> {
    Err(ImportError::Refused {
        at: at.display().to_string(),
        message: message.into(),
    })
}

/// The operator folder: `store` itself when it holds `<Op>.jwt` and `accounts/`, else its only
/// subfolder that does (the stores root).
fn operator_dir(store: &Path) -> Result<(PathBuf, PathBuf), ImportError> {
    let jwt_of = |dir: &Path| -> Option<PathBuf> {
        let name = dir.file_name()?.to_str()?;
        let jwt = dir.join(format!("{name}.jwt"));
        (jwt.is_file() && dir.join("accounts").is_dir()).then_some(jwt)
    };
    if let Some(jwt) = jwt_of(store) {
        return Ok((store.to_path_buf(), jwt));
    }
    let entries = match std::fs::read_dir(store) {
        Ok(e) => e,
        Err(e) => return refuse(store, format!("cannot read the store: {e}")),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.is_dir() {
            if let Some(jwt) = jwt_of(&dir) {
                found.push((dir, jwt));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => refuse(
            store,
            "not an nsc operator folder (no <Operator>.jwt beside accounts/) nor a stores root holding one",
        ),
        n => refuse(
            store,
            format!("the stores root holds {n} operators: pass the operator's folder as --store"),
        ),
    }
}

fn read(path: &Path) -> Result<String, ImportError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .or_else(|e| refuse(path, format!("cannot read: {e}")))
}

/// Decodes a JWT and checks its signature; the error names the file, never the token.
fn decode<T: serde::de::DeserializeOwned>(
    path: &Path,
    token: &str,
) -> Result<Claims<T>, ImportError> {
    jwt::decode_verified(token).or_else(|e| refuse(path, format!("not a valid NATS JWT: {e}")))
}

/// Where nsc keeps seeds: `--keys` is NKEYS_PATH (holding `keys/`) or `keys/` itself.
struct Seeds {
    dir: Option<PathBuf>,
}

impl Seeds {
    fn new(keys: Option<&Path>) -> Seeds {
        let dir = keys.map(|k| {
            let inner = k.join("keys");
            if inner.is_dir() {
                inner
            } else {
                k.to_path_buf()
            }
        });
        Seeds { dir }
    }

    /// The seed of `public_key` when the keys directory has it; refused when the file holds the
    /// seed of another key.
    fn get(&self, public_key: &str) -> Result<Option<Secret>, ImportError> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        if public_key.len() < 3 || !public_key.is_ascii() {
            return Ok(None);
        }
        let path = dir
            .join(&public_key[..1])
            .join(&public_key[1..3])
            .join(format!("{public_key}.nk"));
        if !path.is_file() {
            return Ok(None);
        }
        let seed = read(&path)?;
        // The nkeys error text is not passed on: it may quote part of the seed.
        match nkeys::KeyPair::from_seed(&seed) {
            Ok(kp) if kp.public_key() == public_key => Ok(Some(Secret::new(seed))),
            Ok(_) => refuse(&path, "the seed does not match its public key"),
            Err(_) => refuse(&path, "not an nkey seed"),
        }
    }

    fn key(&self, public_key: &str) -> Result<Key, ImportError> {
        Ok(Key {
            public_key: public_key.to_owned(),
            seed: self.get(public_key)?,
        })
    }
}

/// Scoped signing keys are objects in `signing_keys`; the typed claims flatten them to keys.
fn has_scoped_key(token: &str) -> bool {
    jwt::decode_unverified::<serde_json::Value>(token)
        .ok()
        .and_then(|c| c.nats.get("signing_keys").cloned())
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|keys| keys.iter().any(|k| !k.is_string()))
}

/// Account claims the plan does not model. Those that change who may do what are refused
/// (dropping `default_permissions` would give users without permissions everything; dropping
/// `disallow_bearer` would let bearer JWTs in); descriptive ones are reported.
fn unmodelled(
    path: &Path,
    token: &str,
    name: &str,
    notes: &mut Vec<String>,
) -> Result<(), ImportError> {
    let Ok(claims) = jwt::decode_unverified::<serde_json::Value>(token) else {
        return Ok(()); // decoded (and verified) typed before; nothing more to learn
    };
    let present = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    let nats = &claims.nats;
    let limits = nats.get("limits");
    for (what, value) in [
        ("default_permissions", nats.get("default_permissions")),
        ("mappings", nats.get("mappings")),
        ("authorization", nats.get("authorization")),
        ("trace", nats.get("trace")),
        ("tiered_limits", limits.and_then(|l| l.get("tiered_limits"))),
        (
            "disallow_bearer",
            limits.and_then(|l| l.get("disallow_bearer")),
        ),
    ] {
        if present(value) {
            return refuse(
                path,
                format!("account {name:?} sets `{what}`, which the service does not carry over (it would change who may do what); remove it with nsc first, or move the account by hand"),
            );
        }
    }
    let dropped: Vec<&str> = ["description", "info_url", "tags"]
        .into_iter()
        .filter(|k| present(nats.get(*k)))
        .collect();
    if !dropped.is_empty() {
        notes.push(format!(
            "account {name:?}: {} not carried over (descriptive only)",
            dropped.join(", ")
        ));
    }
    Ok(())
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return refuse(dir, format!("cannot read: {e}")),
    };
    out.sort();
    Ok(out)
}

/// Reads the store (and the keys directory) into a plan.
pub fn plan(store: &Path, keys: Option<&Path>) -> Result<Plan, ImportError> {
    let (op_dir, op_path) = operator_dir(store)?;
    let seeds = Seeds::new(keys);
    let op_token = read(&op_path)?;
    let op: Claims<OperatorClaims> = decode(&op_path, &op_token)?;
    if !op.sub.starts_with('O') || op.iss != op.sub {
        return refuse(&op_path, "not a self-signed operator JWT");
    }
    let op_name = op.name.clone().unwrap_or_default();
    if op_name.is_empty() {
        return refuse(&op_path, "the operator JWT has no name");
    }
    let Some(sys_key) = op.nats.system_account.clone() else {
        return refuse(
            &op_path,
            "the operator has no system account (`nsc edit operator --system-account`): the service needs the one the servers use",
        );
    };
    let mut trusted: Vec<&str> = vec![op.sub.as_str()];
    trusted.extend(op.nats.signing_keys.iter().map(String::as_str));
    let mut notes = Vec::new();
    let mut system: Option<SystemAccount> = None;
    // (account path, token, claims), every account read first: imports name exporters by key.
    let mut read_accounts = Vec::new();
    for dir in subdirs(&op_dir.join("accounts"))? {
        if !dir.is_dir() {
            continue;
        }
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let path = dir.join(format!("{name}.jwt"));
        if !path.is_file() {
            return refuse(&dir, format!("no {name}.jwt in the account folder"));
        }
        let token = read(&path)?;
        let claims: Claims<AccountClaims> = decode(&path, &token)?;
        if !claims.sub.starts_with('A') {
            return refuse(
                &path,
                "not an account JWT (its subject is not an account key)",
            );
        }
        if !trusted.contains(&claims.iss.as_str()) {
            return refuse(
                &path,
                format!(
                    "issued by {}, which is neither the operator nor one of its signing keys",
                    claims.iss
                ),
            );
        }
        if has_scoped_key(&token) {
            return refuse(
                &path,
                "the account has a scoped signing key: not carried over (its users would lose the scope's permissions and limits); convert it to a plain signing key with nsc first",
            );
        }
        let name = claims.name.clone().unwrap_or(name);
        if claims.sub == sys_key {
            system = Some(SystemAccount {
                name: name.clone(),
                identity: seeds.key(&claims.sub)?,
                jwt: token.clone(),
            });
            let has_users = subdirs(&dir.join("users"))?
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == "jwt"));
            if has_users {
                notes.push(format!(
                    "the users of system account {name:?} are not rows (the system account is the service's own); their JWTs keep working: its account JWT is kept as it is"
                ));
            }
            continue;
        }
        unmodelled(&path, &token, &name, &mut notes)?;
        read_accounts.push((dir, path, claims, name));
    }
    let Some(system) = system else {
        return refuse(
            &op_path,
            format!("the operator's system account {sys_key} has no folder under accounts/"),
        );
    };
    let names: HashMap<String, String> = read_accounts
        .iter()
        .map(|(_, _, c, name)| (c.sub.clone(), name.clone()))
        .collect();
    let signers: HashMap<String, Vec<String>> = read_accounts
        .iter()
        .map(|(_, _, c, _)| (c.sub.clone(), c.nats.signing_keys.clone()))
        .collect();
    let mut accounts = Vec::new();
    // exporter name → (export subject, kind) → importers granted by an activation token.
    let mut grants: HashMap<String, Vec<(String, ExportType, String)>> = HashMap::new();
    for (dir, path, claims, name) in &read_accounts {
        let mut account = account(&seeds, path, claims, name)?;
        for i in &claims.nats.imports {
            let iname = if i.name.is_empty() {
                i.subject.clone()
            } else {
                i.name.clone()
            };
            let Some(exporter) = names.get(&i.account) else {
                notes.push(if i.account == sys_key {
                    format!("import {iname:?} of account {name:?} is from the system account: left out (the system account is not a tenant account; add it by hand as a row with exporter_public_key)")
                } else {
                    format!(
                        "import {iname:?} of account {name:?} is from {}, an account outside this store: left out (add it as a row with exporter_public_key and its token)",
                        i.account
                    )
                });
                continue;
            };
            if let Some(token) = i.token.as_deref().filter(|t| !t.is_empty()) {
                let act: Claims<ActivationClaims> = match jwt::decode_verified(token) {
                    Ok(c) => c,
                    Err(e) => {
                        return refuse(
                            path,
                            format!("the activation token of import {iname:?}: {e}"),
                        )
                    }
                };
                // Only an activation nats-server would accept becomes a grant: issued by the
                // exporter or one of its signing keys, not expired.
                let exporter_keys = &signers[&i.account];
                let by_exporter = act.iss == i.account
                    || (exporter_keys.contains(&act.iss)
                        && act.nats.issuer_account.as_deref() == Some(i.account.as_str()));
                if !by_exporter {
                    return refuse(
                        path,
                        format!("the activation token of import {iname:?} is not issued by the exporting account {exporter:?} or one of its signing keys"),
                    );
                }
                if act.exp.is_some_and(|exp| exp <= jwt::now_unix()) {
                    notes.push(format!(
                        "the activation token of import {iname:?} of account {name:?} has expired: no grant (the import stays out of the account JWT, as on the server today)"
                    ));
                    account.imports.push(Import {
                        name: iname,
                        subject: i.subject.clone(),
                        exporter: exporter.clone(),
                        local_subject: i.local_subject.clone().filter(|s| !s.is_empty()),
                        kind: kind(i.import_type),
                        share: i.share,
                        allow_trace: i.allow_trace,
                    });
                    continue;
                }
                if act.sub != claims.sub {
                    return refuse(
                        path,
                        format!("the activation token of import {iname:?} was issued to another account ({})", act.sub),
                    );
                }
                grants.entry(exporter.clone()).or_default().push((
                    act.nats.subject.clone(),
                    i.import_type,
                    name.clone(),
                ));
            }
            account.imports.push(Import {
                name: iname,
                subject: i.subject.clone(),
                exporter: exporter.clone(),
                local_subject: i.local_subject.clone().filter(|s| !s.is_empty()),
                kind: kind(i.import_type),
                share: i.share,
                allow_trace: i.allow_trace,
            });
        }
        users(dir, claims, &mut account, &mut notes)?;
        accounts.push(account);
    }
    // An activation token becomes a grant of the export it activates (the service mints its
    // own token from the grant, signed by the exporter's key).
    for account in &mut accounts {
        for (subject, kind, importer) in grants.remove(&account.name).unwrap_or_default() {
            let export = account.exports.iter_mut().find(|e| {
                e.kind.as_str() == self::kind(kind).as_str()
                    && crate::sync::sharing::subject_contains(&e.subject, &subject)
            });
            match export {
                Some(e) if e.token_req => {
                    if !e.grants.contains(&importer) {
                        e.grants.push(importer);
                    }
                }
                Some(_) => {}
                None => notes.push(format!(
                    "account {importer:?} holds an activation for {subject:?} of {:?}, which exports no such subject: left out",
                    account.name
                )),
            }
        }
    }
    Ok(Plan {
        source: format!("nsc store {}", op_dir.display()),
        accounts,
        operator: Some(Operator {
            name: op_name,
            identity: seeds.key(&op.sub)?,
            jwt: op_token,
            system_account: system,
        }),
        notes,
    })
}

fn kind(t: ExportType) -> Kind {
    match t {
        ExportType::Service => Kind::Service,
        _ => Kind::Stream,
    }
}

fn account(
    seeds: &Seeds,
    path: &Path,
    claims: &Claims<AccountClaims>,
    name: &str,
) -> Result<Account, ImportError> {
    let l = &claims.nats.limits;
    let limits = Limits {
        max_connections: Some(l.conn),
        max_leafnodes: Some(l.leaf),
        max_subscriptions: Some(l.subs),
        max_payload: Some(l.payload),
        max_data: Some(l.data),
        max_jetstream_memory_storage: Some(l.mem_storage),
        max_jetstream_disk_storage: Some(l.disk_storage),
        max_jetstream_streams: Some(l.streams),
        max_jetstream_consumers: Some(l.consumer),
        max_imports: Some(l.imports),
        max_exports: Some(l.exports),
    };
    let signing_keys = claims
        .nats
        .signing_keys
        .iter()
        .map(|k| seeds.key(k))
        .collect::<Result<Vec<_>, _>>()?;
    let mut exports = Vec::new();
    for e in &claims.nats.exports {
        exports.push(Export {
            name: if e.name.is_empty() {
                e.subject.clone()
            } else {
                e.name.clone()
            },
            subject: e.subject.clone(),
            kind: kind(e.export_type),
            token_req: e.token_req,
            response_type: e.response_type.map(|r| {
                match r {
                    ResponseType::Singleton => "Singleton",
                    ResponseType::Stream => "Stream",
                    ResponseType::Chunked => "Chunked",
                }
                .to_owned()
            }),
            // nanoseconds in the JWT, milliseconds in the plan
            response_threshold_ms: e
                .response_threshold
                .map(|ns| ns / 1_000_000)
                .filter(|ms| *ms > 0),
            account_token_position: e.account_token_position.map(|p| p as i32),
            allow_trace: e.allow_trace,
            grants: vec![],
        });
        if !e.revocations.is_empty() {
            return refuse(
                path,
                format!("export {:?} revokes activations: not carried over (the service mints activations from grants); remove them with nsc first", e.subject),
            );
        }
    }
    Ok(Account {
        name: name.to_owned(),
        identity: Some(seeds.key(&claims.sub)?),
        signing_keys,
        revocations: claims
            .nats
            .revocations
            .iter()
            .map(|(k, t)| (k.clone(), *t))
            .collect(),
        limits,
        exports,
        ..Account::default()
    })
}

/// `users/<User>.jwt` of an account: rows bound to their public nkey, with their JWT's
/// permissions (a response permission or connection types through a role of their own, as for
/// nats.conf). The JWT itself is not re-issued: its `.creds` keeps working with exactly what
/// it says; the row is what the operator manages from now on (deactivate = revoke).
fn users(
    account_dir: &Path,
    claims: &Claims<AccountClaims>,
    account: &mut Account,
    notes: &mut Vec<String>,
) -> Result<(), ImportError> {
    let account_key = claims.sub.as_str();
    for path in subdirs(&account_dir.join("users"))? {
        if path.extension().and_then(|e| e.to_str()) != Some("jwt") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let token = read(&path)?;
        let user: Claims<UserClaims> = decode(&path, &token)?;
        if !user.sub.starts_with('U') {
            return refuse(&path, "not a user JWT (its subject is not a user key)");
        }
        let issuer_ok = user.iss == account_key
            || (claims.nats.signing_keys.contains(&user.iss)
                && user.nats.issuer_account.as_deref() == Some(account_key));
        if !issuer_ok {
            return refuse(
                &path,
                format!(
                    "issued by {}, which is neither account {:?} nor one of its signing keys",
                    user.iss, account.name
                ),
            );
        }
        let username = format!("{}/{}", account.name, stem);
        if username.chars().any(char::is_whitespace) {
            return refuse(
                &path,
                "user and account names with whitespace cannot be usernames",
            );
        }
        let p = &user.nats.permissions;
        let permissions = Permissions {
            publish_allow: p.publish.allow.clone(),
            publish_deny: p.publish.deny.clone(),
            subscribe_allow: p.subscribe.allow.clone(),
            subscribe_deny: p.subscribe.deny.clone(),
        }
        .normalised();
        // As nats-server reads a JWT's `resp`: 0 messages or 0 expiry mean its defaults
        // (1 message, 2 minutes); a negative max is unlimited.
        let response = match p.response.as_ref() {
            None => None,
            Some(r) if r.ttl < 0 || r.ttl / 1_000_000 > 86_400_000 => {
                return refuse(
                    &path,
                    "a response permission that never expires or lasts over a day cannot be kept (roles.allow_response_ttl is at most 1 day)",
                )
            }
            Some(r) => Some(Response {
                max: match r.max {
                    0 => 1,
                    n if n < 0 => -1,
                    n => i32::try_from(n).unwrap_or(i32::MAX),
                },
                ttl_ms: match r.ttl / 1_000_000 {
                    0 => 120_000,
                    ms => ms,
                },
            }),
        };
        let types: Vec<String> = user
            .nats
            .allowed_connection_types
            .iter()
            .map(|t| t.to_ascii_uppercase())
            .collect();
        let role = (response.is_some() || !types.is_empty()).then(|| {
            let name = format!("user:{stem}");
            account.roles.push(Role {
                name: name.clone(),
                permissions: Permissions::default(),
                response,
                allowed_connection_types: types,
                ..Role::default()
            });
            name
        });
        let u = &user.nats;
        let mut kept_in_jwt = Vec::new();
        if !u.src.is_empty() {
            kept_in_jwt.push("src");
        }
        if !u.times.is_empty() {
            kept_in_jwt.push("times");
        }
        if u.limits.subs != -1 || u.limits.data != -1 || u.limits.payload != -1 {
            kept_in_jwt.push("limits");
        }
        if u.bearer_token {
            kept_in_jwt.push("bearer_token");
        }
        if user.exp.is_some() {
            kept_in_jwt.push("exp");
        }
        if !kept_in_jwt.is_empty() {
            notes.push(format!(
                "user {username:?}: {} stay in its JWT (its .creds keeps them), not in its row",
                kept_in_jwt.join(", ")
            ));
        }
        account.users.push(User {
            username,
            password: None,
            nkey: Some(user.sub.clone()),
            role,
            permissions,
            tokens: vec![],
            inactive: false,
        });
    }
    Ok(())
}
