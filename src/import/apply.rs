//! The one applier: diffs a [`Plan`] against the database and applies it in one transaction.
//!
//! Every row of the plan is looked up by its natural key (account name; role name in its
//! account; username; token digest; export and import name in their account; grant by export
//! and importer) and is created, left alone (equal to the source) or changed (differs: only with
//! `--update`, else the whole import is refused and nothing is written). Rows the source does
//! not mention are never touched: an import only adds and updates.
//!
//! A dry run does exactly the same work, schema checks included, and rolls back.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool, Row as _};

use super::{Account, ImportError, Key, Operator, Password, Plan};
use crate::db::identities::{self, IdentityKind, IdentityRow};
use crate::keys::SeedCipher;

/// How to apply.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub dry_run: bool,
    pub update: bool,
    /// bcrypt cost for plain-text passwords.
    pub bcrypt_cost: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Create,
    /// The columns that differ (names only: never values, some are secrets).
    Change(Vec<&'static str>),
    Keep,
}

impl Action {
    /// What an existing row needs, from the columns found to differ from the source.
    fn compared(differ: Vec<&'static str>) -> Action {
        if differ.is_empty() {
            Action::Keep
        } else {
            Action::Change(differ)
        }
    }
}

/// One row of the plan and what happens to it.
#[derive(Debug, Clone)]
pub struct Change {
    /// `account`, `role`, `user`, `token`, `export`, `grant`, `import`.
    pub kind: &'static str,
    /// How a person finds the row (`A/bob`, `token of bob`); never a secret.
    pub name: String,
    pub action: Action,
}

impl Change {
    pub fn describe(&self) -> String {
        match &self.action {
            Action::Create => format!("{} {} (new)", self.kind, self.name),
            Action::Keep => format!("{} {} (unchanged)", self.kind, self.name),
            Action::Change(cols) => format!("{} {}: {}", self.kind, self.name, cols.join(", ")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub source: String,
    pub dry_run: bool,
    /// Whether the transaction was committed.
    pub committed: bool,
    pub changes: Vec<Change>,
    pub notes: Vec<String>,
}

impl Report {
    /// Nothing created or changed.
    pub fn unchanged(&self) -> bool {
        self.changes.iter().all(|c| c.action == Action::Keep)
    }
}

/// `cipher` seals the seeds a plan brings (nsc); a plan without keys never uses it.
pub async fn apply(
    pool: &PgPool,
    plan: &Plan,
    opts: &Options,
    cipher: &SeedCipher,
) -> Result<Report, ImportError> {
    check_plan(plan)?;
    let hashes = hash_new_passwords(pool, plan, opts.bcrypt_cost).await?;
    let mut tx = pool.begin().await?;
    // Seeds sealed with a key that is no longer the database's would not open at the next
    // start (issue 18 item 6).
    let seals = plan.operator.is_some()
        || plan.accounts.iter().any(|a| {
            a.identity
                .iter()
                .chain(&a.signing_keys)
                .any(|k| k.seed.is_some())
        });
    if seals {
        crate::db::seeds::refuse_unless_current(&mut tx, cipher)
            .await?
            .map_err(ImportError::Usage)?;
    }
    let mut run = Run {
        changes: Vec::new(),
        update: opts.update,
        account_ids: HashMap::new(),
        hashes,
        source: plan.source.clone(),
    };
    if let Some(op) = &plan.operator {
        run.operator(&mut tx, op, cipher).await?;
    }
    for account in &plan.accounts {
        run.account(&mut tx, account).await?;
        run.keys(&mut tx, account, cipher).await?;
        run.revocations(&mut tx, account).await?;
    }
    for account in &plan.accounts {
        run.roles_and_users(&mut tx, account).await?;
    }
    let mut export_ids = HashMap::new();
    for account in &plan.accounts {
        run.exports(&mut tx, account, &mut export_ids).await?;
    }
    for account in &plan.accounts {
        run.grants(&mut tx, account, &export_ids).await?;
        run.imports(&mut tx, account).await?;
    }
    let differing: Vec<Change> = run
        .changes
        .iter()
        .filter(|c| matches!(c.action, Action::Change(_)))
        .cloned()
        .collect();
    if !opts.update && !opts.dry_run && !differing.is_empty() {
        tx.rollback().await?;
        return Err(ImportError::Differs(differing));
    }
    let changed = run.changes.iter().any(|c| c.action != Action::Keep);
    let committed = !opts.dry_run && changed;
    if committed {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(Report {
        source: plan.source.clone(),
        dry_run: opts.dry_run,
        committed,
        changes: run.changes,
        notes: plan.notes.clone(),
    })
}

/// Names the applier relies on: accounts once, roles/exports/imports once per account,
/// usernames once, every grant and import naming an account of the plan.
fn check_plan(plan: &Plan) -> Result<(), ImportError> {
    let mut accounts = std::collections::HashSet::new();
    let mut users = std::collections::HashSet::new();
    for a in &plan.accounts {
        if !accounts.insert(a.name.as_str()) {
            return Err(ImportError::Usage(format!(
                "account {:?} is planned twice",
                a.name
            )));
        }
        for u in &a.users {
            if !users.insert(u.username.as_str()) {
                return Err(ImportError::Usage(format!(
                    "user {:?} is planned twice",
                    u.username
                )));
            }
        }
    }
    for a in &plan.accounts {
        let grants = a.exports.iter().flat_map(|e| e.grants.iter());
        let exporters = a.imports.iter().map(|i| &i.exporter);
        if let Some(missing) = grants
            .chain(exporters)
            .find(|n| !accounts.contains(n.as_str()))
        {
            return Err(ImportError::Usage(format!(
                "account {:?} refers to account {missing:?}, which is not in the import",
                a.name
            )));
        }
    }
    Ok(())
}

/// bcrypt work for plain-text passwords, before the transaction (it is slow: about 50 ms a
/// password at cost 10), on every core. A user that already exists keeps its stored hash when
/// the password still verifies against it; only new or changed passwords are hashed.
async fn hash_new_passwords(
    pool: &PgPool,
    plan: &Plan,
    cost: u32,
) -> Result<HashMap<String, String>, ImportError> {
    let plain: Vec<(String, String)> = plan
        .accounts
        .iter()
        .flat_map(|a| &a.users)
        .filter_map(|u| match &u.password {
            Some(Password::Plain(p)) => Some((u.username.clone(), p.expose().to_owned())),
            _ => None,
        })
        .collect();
    if plain.is_empty() {
        return Ok(HashMap::new());
    }
    let names: Vec<&str> = plain.iter().map(|(u, _)| u.as_str()).collect();
    let stored: HashMap<String, String> = sqlx::query(
        "SELECT username, password_hash FROM nats.users WHERE username = ANY($1) AND password_hash IS NOT NULL",
    )
    .bind(&names)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.get("username"), r.get("password_hash")))
    .collect();
    let work: Vec<(String, String, Option<String>)> = plain
        .into_iter()
        .map(|(u, p)| {
            let s = stored.get(&u).cloned();
            (u, p, s)
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunk = work.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = work
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(user, pw, stored)| {
                                let keep = stored.as_ref().filter(|h| {
                                    h.starts_with("$2") && bcrypt::verify(pw, h).unwrap_or(false)
                                });
                                let hash = match keep {
                                    Some(h) => h.clone(),
                                    None => bcrypt::hash(pw, cost).map_err(|e| {
                                        ImportError::Usage(format!(
                                            "cannot hash the password of user {user:?}: {e}"
                                        ))
                                    })?,
                                };
                                Ok((user.clone(), hash))
                            })
                            .collect::<Result<Vec<_>, ImportError>>()
                    })
                })
                .collect();
            let mut out = HashMap::new();
            for h in handles {
                out.extend(h.join().expect("hashing thread")?);
            }
            Ok(out)
        })
    })
    .await
    .expect("hashing task")
}

struct Run {
    changes: Vec<Change>,
    update: bool,
    account_ids: HashMap<String, i64>,
    /// username → the bcrypt hash of its plain-text password.
    hashes: HashMap<String, String>,
    /// What was read, for refusals that are about the source as a whole.
    source: String,
}

fn nkeys_error(e: nkeys::error::Error) -> ImportError {
    // The nkeys text is not passed on: it may quote part of its input.
    let _ = e;
    ImportError::Usage("cannot generate or use an nkey".into())
}

/// A fresh key pair of the service, sealed: (public key, stored seed).
fn sealed_new(cipher: &SeedCipher, kp: &nkeys::KeyPair) -> Result<(String, String), ImportError> {
    crate::keys::seal_keypair(cipher, kp).map_err(|e| ImportError::Usage(e.to_string()))
}

fn seal(cipher: &SeedCipher, key: &Key) -> Result<Option<String>, ImportError> {
    key.seed
        .as_ref()
        .map(|s| cipher.seal(s.expose(), &key.public_key))
        .transpose()
        .map_err(|e| ImportError::Usage(e.to_string()))
}

/// `nats.roles` per-user limit columns, in `Role::user_limits` order.
const LIMIT_COLUMNS: [&str; 3] = ["max_subscriptions", "max_data", "max_payload"];

/// Sorted copy, to compare a stored array with a planned (sorted) list as sets.
fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

impl Run {
    fn refuse<T>(&self, message: String) -> Result<T, ImportError> {
        Err(ImportError::Refused {
            at: self.source.clone(),
            message,
        })
    }

    /// Adopts the operator the servers trust (and its system account) as the service's own:
    /// `init` then adds AUTH, the service user and the sentinel under them. The operator JWT is
    /// re-issued by the same identity key with one signing key of the service added (the
    /// service signs account JWTs with it; every other claim, and every listed key, stays).
    async fn operator(
        &mut self,
        tx: &mut PgConnection,
        op: &Operator,
        cipher: &SeedCipher,
    ) -> Result<(), ImportError> {
        let existing = identities::all_in(&mut *tx).await?;
        let find = |kind: IdentityKind| existing.iter().find(|r| r.kind == kind.as_str());
        let sys = &op.system_account;
        if let Some(row) = find(IdentityKind::Operator) {
            if row.public_key != op.identity.public_key {
                return self.refuse(format!(
                    "the database already has operator {:?} ({}), not this store's operator {:?} ({}); import into a fresh database (before `init`)",
                    row.name, row.public_key, op.name, op.identity.public_key
                ));
            }
            match find(IdentityKind::SysAccount) {
                Some(s) if s.public_key == sys.identity.public_key => {}
                Some(s) => {
                    return self.refuse(format!(
                        "the database's system account is {}, not this store's {} ({})",
                        s.public_key, sys.name, sys.identity.public_key
                    ))
                }
                None => {
                    return self.refuse(
                        "the database has this operator but no system account; import into a fresh database".into(),
                    )
                }
            }
            self.record("operator", op.name.clone(), Action::Keep);
            self.record("system account", sys.name.clone(), Action::Keep);
            return Ok(());
        }
        let Some(op_seed) = seal(cipher, &op.identity)? else {
            return self.refuse(format!(
                "the keys directory has no seed for operator {:?} ({}): the service must re-issue the operator JWT with its signing key (pass --keys with the directory holding keys/O/…)",
                op.name, op.identity.public_key
            ));
        };
        let Some(sys_seed) = seal(cipher, &sys.identity)? else {
            return self.refuse(format!(
                "the keys directory has no seed for the system account {:?} ({}): the service's system user is issued by it",
                sys.name, sys.identity.public_key
            ));
        };
        let identity = op
            .identity
            .seed
            .as_ref()
            .map(|s| nkeys::KeyPair::from_seed(s.expose()))
            .transpose()
            .map_err(nkeys_error)?
            .expect("sealed above");
        let signing = nkeys::KeyPair::new_operator();
        let mut claims: crate::jwt::Claims<serde_json::Value> =
            crate::jwt::decode_verified(&op.jwt).map_err(|e| ImportError::Refused {
                at: self.source.clone(),
                message: format!("the operator JWT: {e}"),
            })?;
        let keys = claims
            .nats
            .as_object_mut()
            .ok_or_else(|| ImportError::Usage("the operator JWT has no nats claims".into()))?
            .entry("signing_keys")
            .or_insert_with(|| serde_json::Value::Array(vec![]));
        match keys {
            serde_json::Value::Array(list) => {
                list.push(serde_json::Value::String(signing.public_key()))
            }
            _ => {
                return self.refuse("the operator JWT's signing_keys is not a list".into());
            }
        }
        claims.iat = crate::jwt::now_unix().max(claims.iat + 1);
        let jwt = crate::jwt::encode(&claims, &identity)
            .map_err(|e| ImportError::Usage(format!("cannot re-issue the operator JWT: {e}")))?;
        let (signing_pk, signing_seed) = sealed_new(cipher, &signing)?;
        for row in [
            IdentityRow {
                kind: IdentityKind::Operator.as_str().into(),
                name: op.name.clone(),
                public_key: op.identity.public_key.clone(),
                seed: op_seed,
                jwt: Some(jwt),
            },
            IdentityRow {
                kind: IdentityKind::OperatorSigning.as_str().into(),
                name: op.name.clone(),
                public_key: signing_pk,
                seed: signing_seed,
                jwt: None,
            },
            IdentityRow {
                kind: IdentityKind::SysAccount.as_str().into(),
                name: sys.name.clone(),
                public_key: sys.identity.public_key.clone(),
                seed: sys_seed,
                jwt: Some(sys.jwt.clone()),
            },
        ] {
            identities::insert(&mut *tx, &row).await?;
        }
        self.record("operator", op.name.clone(), Action::Create);
        self.record("system account", sys.name.clone(), Action::Create);
        Ok(())
    }

    /// An account's existing keys (nsc): its identity key (the account's `public_key`) and
    /// signing keys, with their seeds sealed when the source has them; plus one signing key of
    /// the service, newer than the imported ones, so the callout and activations can sign even
    /// when no imported seed was found.
    async fn keys(
        &mut self,
        tx: &mut PgConnection,
        a: &Account,
        cipher: &SeedCipher,
    ) -> Result<(), ImportError> {
        let Some(identity) = &a.identity else {
            return Ok(());
        };
        let account_id = self.account_ids[&a.name];
        let planned = std::iter::once(("identity", identity))
            .chain(a.signing_keys.iter().map(|k| ("signing", k)));
        for (kind, key) in planned {
            let row = sqlx::query(
                "SELECT id, account_id, kind, seed IS NOT NULL AS has_seed FROM nats.account_keys WHERE public_key = $1",
            )
            .bind(&key.public_key)
            .fetch_optional(&mut *tx)
            .await?;
            let name = format!("{} {kind} key {}", a.name, key.public_key);
            match row {
                None => {
                    self.record("key", name, Action::Create);
                    sqlx::query(
                        "INSERT INTO nats.account_keys (account_id, kind, public_key, seed) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(account_id)
                    .bind(kind)
                    .bind(&key.public_key)
                    .bind(seal(cipher, key)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Some(row) => {
                    if row.get::<i64, _>("account_id") != account_id
                        || row.get::<String, _>("kind") != kind
                    {
                        return self.refuse(format!(
                            "key {} of account {:?} is already another key of this database",
                            key.public_key, a.name
                        ));
                    }
                    let action = if !row.get::<bool, _>("has_seed") && key.seed.is_some() {
                        Action::Change(vec!["seed"])
                    } else {
                        Action::Keep
                    };
                    if self.record("key", name, action) {
                        sqlx::query("UPDATE nats.account_keys SET seed = $2 WHERE id = $1")
                            .bind(row.get::<i64, _>("id"))
                            .bind(seal(cipher, key)?)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
        }
        let own: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM nats.account_keys WHERE account_id = $1 AND kind = 'signing' \
                AND seed IS NOT NULL AND NOT public_key = ANY($2))",
        )
        .bind(account_id)
        .bind(a.signing_keys.iter().map(|k| k.public_key.clone()).collect::<Vec<_>>())
        .fetch_one(&mut *tx)
        .await?;
        if !own {
            let kp = nkeys::KeyPair::new_account();
            let (pk, seed) = sealed_new(cipher, &kp)?;
            self.record(
                "key",
                format!("{} signing key of the service", a.name),
                Action::Create,
            );
            sqlx::query(
                "INSERT INTO nats.account_keys (account_id, kind, public_key, seed) VALUES ($1, 'signing', $2, $3)",
            )
            .bind(account_id)
            .bind(pk)
            .bind(seed)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// The user JWTs the source's account JWT revokes.
    async fn revocations(&mut self, tx: &mut PgConnection, a: &Account) -> Result<(), ImportError> {
        let account_id = self.account_ids[&a.name];
        for (key, before) in &a.revocations {
            let stored: Option<i64> = sqlx::query_scalar(
                "SELECT revoked_before FROM nats.account_revocations WHERE account_id = $1 AND public_key = $2",
            )
            .bind(account_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            let name = format!("{} revokes {key}", a.name);
            let action = match stored {
                None => Action::Create,
                Some(t) if t == *before => Action::Keep,
                Some(_) => Action::Change(vec!["revoked_before"]),
            };
            if self.record("revocation", name, action) {
                sqlx::query(
                    "INSERT INTO nats.account_revocations (account_id, public_key, revoked_before) VALUES ($1, $2, $3) \
                     ON CONFLICT (account_id, public_key) DO UPDATE SET revoked_before = EXCLUDED.revoked_before",
                )
                .bind(account_id)
                .bind(key)
                .bind(before)
                .execute(&mut *tx)
                .await?;
            }
        }
        Ok(())
    }

    fn record(&mut self, kind: &'static str, name: String, action: Action) -> bool {
        let write = match &action {
            Action::Create => true,
            Action::Change(_) => self.update,
            Action::Keep => false,
        };
        self.changes.push(Change { kind, name, action });
        write
    }

    async fn account(&mut self, tx: &mut PgConnection, a: &Account) -> Result<(), ImportError> {
        let row = sqlx::query(
            "SELECT id, public_key, active, max_connections, max_leafnodes, max_subscriptions, max_payload, \
                    max_data, max_jetstream_memory_storage, max_jetstream_disk_storage, \
                    max_jetstream_streams, max_jetstream_consumers, max_imports, max_exports \
               FROM nats.accounts WHERE name = $1",
        )
        .bind(&a.name)
        .fetch_optional(&mut *tx)
        .await?;
        let limits = a.limits.columns();
        let public_key = a.identity.as_ref().map(|k| k.public_key.as_str());
        let id: i64 = match row {
            None => {
                self.record("account", a.name.clone(), Action::Create);
                match public_key {
                    // With its existing key (nsc): the sync then keeps it instead of making
                    // one. Only the schema owner may write it (an admin imports nats.conf).
                    Some(key) => sqlx::query_scalar(
                        "INSERT INTO nats.accounts (name, public_key) VALUES ($1, $2) RETURNING id",
                    )
                    .bind(&a.name)
                    .bind(key),
                    None => sqlx::query_scalar(
                        "INSERT INTO nats.accounts (name) VALUES ($1) RETURNING id",
                    )
                    .bind(&a.name),
                }
                .fetch_one(&mut *tx)
                .await?
            }
            Some(row) => {
                let id: i64 = row.get("id");
                let stored: Option<String> = row.get("public_key");
                if let Some(want) = public_key.filter(|k| stored.as_deref() != Some(*k)) {
                    return self.refuse(format!(
                        "account {:?} already exists with {} (not this store's key {want}): a different account of the same name; rename one of them",
                        a.name,
                        stored.as_deref().map_or("no key yet".to_string(), |k| format!("key {k}"))
                    ));
                }
                let mut differ: Vec<&'static str> = limits
                    .iter()
                    .filter(|(col, v)| row.get::<i64, _>(*col) != *v)
                    .map(|(col, _)| *col)
                    .collect();
                if row.get::<bool, _>("active") == a.inactive {
                    differ.push("active");
                }
                let action = Action::compared(differ);
                if !self.record("account", a.name.clone(), action) {
                    self.account_ids.insert(a.name.clone(), id);
                    return Ok(());
                }
                id
            }
        };
        if !limits.is_empty() {
            // Column names come from `Limits::columns`, never from input.
            let sets: Vec<String> = limits
                .iter()
                .enumerate()
                .map(|(i, (col, _))| format!("{col} = ${}", i + 2))
                .collect();
            let sql = format!("UPDATE nats.accounts SET {} WHERE id = $1", sets.join(", "));
            let mut q = sqlx::query(&sql).bind(id);
            for (_, v) in &limits {
                q = q.bind(*v);
            }
            q.execute(&mut *tx).await?;
        }
        sqlx::query(
            "UPDATE nats.accounts SET active = $2 WHERE id = $1 AND active IS DISTINCT FROM $2",
        )
        .bind(id)
        .bind(!a.inactive)
        .execute(&mut *tx)
        .await?;
        self.account_ids.insert(a.name.clone(), id);
        Ok(())
    }

    async fn roles_and_users(
        &mut self,
        tx: &mut PgConnection,
        a: &Account,
    ) -> Result<(), ImportError> {
        let account_id = self.account_ids[&a.name];
        let mut role_ids: HashMap<&str, i64> = HashMap::new();
        for role in &a.roles {
            let name = format!("{}/{}", a.name, role.name);
            let row = sqlx::query(
                "SELECT id, publish_permissions, publish_deny_permissions, subscribe_permissions, \
                        subscribe_deny_permissions, allow_response, allow_response_max, \
                        (EXTRACT(EPOCH FROM allow_response_ttl) * 1000)::bigint AS ttl_ms, \
                        allowed_connection_types, max_subscriptions, max_data, max_payload \
                   FROM nats.roles WHERE account_id = $1 AND name = $2",
            )
            .bind(account_id)
            .bind(&role.name)
            .fetch_optional(&mut *tx)
            .await?;
            let user_limits = role.user_limits.unwrap_or([-1; 3]);
            let (resp, max, ttl) = match role.response {
                Some(r) => (true, r.max, Some(r.ttl_ms)),
                None => (false, 1, None),
            };
            let p = &role.permissions;
            let id = match row {
                None => {
                    self.record("role", name, Action::Create);
                    sqlx::query_scalar(
                        "INSERT INTO nats.roles (account_id, name, description, publish_permissions, \
                            publish_deny_permissions, subscribe_permissions, subscribe_deny_permissions, \
                            allow_response, allow_response_max, allow_response_ttl, allowed_connection_types) \
                         VALUES ($1, $2, coalesce($11, 'imported: the response permission and connection types of one user'), \
                                 $3, $4, $5, $6, $7, $8, make_interval(secs => $9::float8 / 1000), $10) RETURNING id",
                    )
                    .bind(account_id)
                    .bind(&role.name)
                    .bind(&p.publish_allow)
                    .bind(&p.publish_deny)
                    .bind(&p.subscribe_allow)
                    .bind(&p.subscribe_deny)
                    .bind(resp)
                    .bind(max)
                    .bind(ttl.map(|t| t as f64))
                    .bind(&role.allowed_connection_types)
                    .bind(&role.description)
                    .fetch_one(&mut *tx)
                    .await?
                }
                Some(row) => {
                    let id: i64 = row.get("id");
                    let mut differ = Vec::new();
                    for (col, want) in [
                        ("publish_permissions", &p.publish_allow),
                        ("publish_deny_permissions", &p.publish_deny),
                        ("subscribe_permissions", &p.subscribe_allow),
                        ("subscribe_deny_permissions", &p.subscribe_deny),
                        ("allowed_connection_types", &role.allowed_connection_types),
                    ] {
                        if sorted(row.get(col)) != sorted(want.clone()) {
                            differ.push(col);
                        }
                    }
                    if row.get::<bool, _>("allow_response") != resp {
                        differ.push("allow_response");
                    }
                    if resp && row.get::<i32, _>("allow_response_max") != max {
                        differ.push("allow_response_max");
                    }
                    if resp && row.get::<Option<i64>, _>("ttl_ms") != ttl {
                        differ.push("allow_response_ttl");
                    }
                    for (col, want) in LIMIT_COLUMNS.iter().zip(user_limits) {
                        if row.get::<i64, _>(*col) != want {
                            differ.push(col);
                        }
                    }
                    let action = Action::compared(differ);
                    if self.record("role", name, action) {
                        sqlx::query(
                            "UPDATE nats.roles SET publish_permissions = $2, publish_deny_permissions = $3, \
                                subscribe_permissions = $4, subscribe_deny_permissions = $5, allow_response = $6, \
                                allow_response_max = $7, allow_response_ttl = make_interval(secs => $8::float8 / 1000), \
                                allowed_connection_types = $9 WHERE id = $1",
                        )
                        .bind(id)
                        .bind(&p.publish_allow)
                        .bind(&p.publish_deny)
                        .bind(&p.subscribe_allow)
                        .bind(&p.subscribe_deny)
                        .bind(resp)
                        .bind(max)
                        .bind(ttl.map(|t| t as f64))
                        .bind(&role.allowed_connection_types)
                        .execute(&mut *tx)
                        .await?;
                    }
                    id
                }
            };
            {
                // Per-user limits (pb-nats roles; -1 for other sources). A differing row only
                // gets here with --update or in a run that is rolled back.
                sqlx::query(
                    "UPDATE nats.roles SET max_subscriptions = $2, max_data = $3, max_payload = $4 \
                      WHERE id = $1 AND (max_subscriptions, max_data, max_payload) IS DISTINCT FROM ($2, $3, $4)",
                )
                .bind(id)
                .bind(user_limits[0])
                .bind(user_limits[1])
                .bind(user_limits[2])
                .execute(&mut *tx)
                .await?;
            }
            role_ids.insert(role.name.as_str(), id);
        }
        self.users(tx, a, account_id, &role_ids).await
    }

    async fn users(
        &mut self,
        tx: &mut PgConnection,
        a: &Account,
        account_id: i64,
        role_ids: &HashMap<&str, i64>,
    ) -> Result<(), ImportError> {
        let names: Vec<&str> = a.users.iter().map(|u| u.username.as_str()).collect();
        let existing: HashMap<String, sqlx::postgres::PgRow> = sqlx::query(
            "SELECT id, username, account_id, role_id, password_hash, nkey, active, \
                    publish_permissions, publish_deny_permissions, subscribe_permissions, \
                    subscribe_deny_permissions \
               FROM nats.users WHERE username = ANY($1)",
        )
        .bind(&names)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.get::<String, _>("username"), r))
        .collect();
        let mut new_rows = Vec::new();
        let mut user_ids: HashMap<&str, i64> = HashMap::new();
        for u in &a.users {
            let role_id = match &u.role {
                Some(r) => Some(*role_ids.get(r.as_str()).ok_or_else(|| {
                    ImportError::Usage(format!(
                        "user {:?} names role {r:?}, which account {:?} does not plan",
                        u.username, a.name
                    ))
                })?),
                None => None,
            };
            let hash: Option<String> = match &u.password {
                Some(Password::Hash(h)) => Some(h.expose().to_owned()),
                Some(Password::Plain(_)) => Some(self.hashes[&u.username].clone()),
                None => None,
            };
            let p = &u.permissions;
            let name = format!("{}/{}", a.name, u.username);
            match existing.get(&u.username) {
                None => {
                    self.record("user", name, Action::Create);
                    new_rows.push(serde_json::json!({
                        "username": u.username,
                        "role_id": role_id,
                        "password_hash": hash,
                        "nkey": u.nkey,
                        "active": !u.inactive,
                        "publish_permissions": p.publish_allow,
                        "publish_deny_permissions": p.publish_deny,
                        "subscribe_permissions": p.subscribe_allow,
                        "subscribe_deny_permissions": p.subscribe_deny,
                    }));
                }
                Some(row) => {
                    let id: i64 = row.get("id");
                    user_ids.insert(u.username.as_str(), id);
                    let mut differ = Vec::new();
                    if row.get::<i64, _>("account_id") != account_id {
                        differ.push("account_id");
                    }
                    if row.get::<Option<i64>, _>("role_id") != role_id {
                        differ.push("role_id");
                    }
                    if row.get::<Option<String>, _>("password_hash") != hash {
                        differ.push("password_hash");
                    }
                    if row.get::<Option<String>, _>("nkey") != u.nkey {
                        differ.push("nkey");
                    }
                    if row.get::<bool, _>("active") == u.inactive {
                        differ.push("active");
                    }
                    for (col, want) in [
                        ("publish_permissions", &p.publish_allow),
                        ("publish_deny_permissions", &p.publish_deny),
                        ("subscribe_permissions", &p.subscribe_allow),
                        ("subscribe_deny_permissions", &p.subscribe_deny),
                    ] {
                        if sorted(row.get(col)) != *want {
                            differ.push(col);
                        }
                    }
                    let action = Action::compared(differ);
                    if self.record("user", name, action) {
                        sqlx::query(
                            "UPDATE nats.users SET account_id = $2, role_id = $3, password_hash = $4, nkey = $5, \
                                active = $10, publish_permissions = $6, publish_deny_permissions = $7, \
                                subscribe_permissions = $8, subscribe_deny_permissions = $9 WHERE id = $1",
                        )
                        .bind(id)
                        .bind(account_id)
                        .bind(role_id)
                        .bind(&hash)
                        .bind(&u.nkey)
                        .bind(&p.publish_allow)
                        .bind(&p.publish_deny)
                        .bind(&p.subscribe_allow)
                        .bind(&p.subscribe_deny)
                        .bind(!u.inactive)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
        }
        if !new_rows.is_empty() {
            // One statement for all new users of the account (10,000 single INSERTs are slow).
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "INSERT INTO nats.users (account_id, role_id, username, password_hash, nkey, active, \
                    publish_permissions, publish_deny_permissions, subscribe_permissions, \
                    subscribe_deny_permissions, description) \
                 SELECT $1, r.role_id, r.username, r.password_hash, r.nkey, r.active, \
                        ARRAY(SELECT jsonb_array_elements_text(r.publish_permissions)), \
                        ARRAY(SELECT jsonb_array_elements_text(r.publish_deny_permissions)), \
                        ARRAY(SELECT jsonb_array_elements_text(r.subscribe_permissions)), \
                        ARRAY(SELECT jsonb_array_elements_text(r.subscribe_deny_permissions)), \
                        'imported' \
                   FROM jsonb_to_recordset($2) AS r(username text, role_id bigint, password_hash text, \
                        nkey text, active boolean, publish_permissions jsonb, publish_deny_permissions jsonb, \
                        subscribe_permissions jsonb, subscribe_deny_permissions jsonb) \
                 RETURNING username, id",
            )
            .bind(account_id)
            .bind(serde_json::Value::Array(new_rows))
            .fetch_all(&mut *tx)
            .await?;
            let ids: HashMap<String, i64> = rows.into_iter().collect();
            for u in &a.users {
                if let Some(id) = ids.get(&u.username) {
                    user_ids.insert(u.username.as_str(), *id);
                }
            }
        }
        self.tokens(tx, a, &user_ids).await
    }

    async fn tokens(
        &mut self,
        tx: &mut PgConnection,
        a: &Account,
        user_ids: &HashMap<&str, i64>,
    ) -> Result<(), ImportError> {
        for u in &a.users {
            let user_id = user_ids[u.username.as_str()];
            for token in &u.tokens {
                let digest = crate::callout::credentials::token_digest(token.expose()).to_vec();
                let row = sqlx::query(
                    "SELECT id, user_id, revoked_at IS NOT NULL AS revoked, \
                            expires_at IS NOT NULL AS expires FROM nats.user_tokens WHERE token_sha256 = $1",
                )
                .bind(&digest)
                .fetch_optional(&mut *tx)
                .await?;
                let name = format!("token of {}/{}", a.name, u.username);
                match row {
                    None => {
                        self.record("token", name, Action::Create);
                        sqlx::query(
                            "INSERT INTO nats.user_tokens (user_id, token_sha256, description) VALUES ($1, $2, 'imported')",
                        )
                        .bind(user_id)
                        .bind(&digest)
                        .execute(&mut *tx)
                        .await?;
                    }
                    Some(row) => {
                        let mut differ = Vec::new();
                        if row.get::<i64, _>("user_id") != user_id {
                            differ.push("user_id");
                        }
                        if row.get::<bool, _>("revoked") {
                            differ.push("revoked_at");
                        }
                        if row.get::<bool, _>("expires") {
                            differ.push("expires_at");
                        }
                        let action = Action::compared(differ);
                        if self.record("token", name, action) {
                            sqlx::query(
                                "UPDATE nats.user_tokens SET user_id = $2, revoked_at = NULL, expires_at = NULL WHERE id = $1",
                            )
                            .bind(row.get::<i64, _>("id"))
                            .bind(user_id)
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn exports(
        &mut self,
        tx: &mut PgConnection,
        a: &Account,
        export_ids: &mut HashMap<(String, String), i64>,
    ) -> Result<(), ImportError> {
        let account_id = self.account_ids[&a.name];
        for e in &a.exports {
            let row = sqlx::query(
                "SELECT id, subject, type, token_req, response_type, \
                        (EXTRACT(EPOCH FROM response_threshold) * 1000)::bigint AS threshold_ms, \
                        account_token_position, allow_trace \
                   FROM nats.account_exports WHERE account_id = $1 AND name = $2",
            )
            .bind(account_id)
            .bind(&e.name)
            .fetch_optional(&mut *tx)
            .await?;
            let name = format!("{}/{}", a.name, e.name);
            let id = match row {
                None => {
                    self.record("export", name, Action::Create);
                    sqlx::query_scalar(
                        "INSERT INTO nats.account_exports (account_id, name, subject, type, token_req, \
                            response_type, response_threshold, account_token_position, allow_trace, description) \
                         VALUES ($1, $2, $3, $4, $5, $6, make_interval(secs => $7::float8 / 1000), $8, $9, 'imported') \
                         RETURNING id",
                    )
                    .bind(account_id)
                    .bind(&e.name)
                    .bind(&e.subject)
                    .bind(e.kind.as_str())
                    .bind(e.token_req)
                    .bind(&e.response_type)
                    .bind(e.response_threshold_ms.map(|t| t as f64))
                    .bind(e.account_token_position)
                    .bind(e.allow_trace)
                    .fetch_one(&mut *tx)
                    .await?
                }
                Some(row) => {
                    let id: i64 = row.get("id");
                    let mut differ = Vec::new();
                    if row.get::<String, _>("subject") != e.subject {
                        differ.push("subject");
                    }
                    if row.get::<String, _>("type") != e.kind.as_str() {
                        differ.push("type");
                    }
                    if row.get::<bool, _>("token_req") != e.token_req {
                        differ.push("token_req");
                    }
                    if row.get::<Option<String>, _>("response_type") != e.response_type {
                        differ.push("response_type");
                    }
                    if row.get::<Option<i64>, _>("threshold_ms") != e.response_threshold_ms {
                        differ.push("response_threshold");
                    }
                    if row.get::<Option<i32>, _>("account_token_position")
                        != e.account_token_position
                    {
                        differ.push("account_token_position");
                    }
                    if row.get::<bool, _>("allow_trace") != e.allow_trace {
                        differ.push("allow_trace");
                    }
                    let action = Action::compared(differ);
                    if self.record("export", name, action) {
                        sqlx::query(
                            "UPDATE nats.account_exports SET subject = $2, type = $3, token_req = $4, \
                                response_type = $5, response_threshold = make_interval(secs => $6::float8 / 1000), \
                                account_token_position = $7, allow_trace = $8 WHERE id = $1",
                        )
                        .bind(id)
                        .bind(&e.subject)
                        .bind(e.kind.as_str())
                        .bind(e.token_req)
                        .bind(&e.response_type)
                        .bind(e.response_threshold_ms.map(|t| t as f64))
                        .bind(e.account_token_position)
                        .bind(e.allow_trace)
                        .execute(&mut *tx)
                        .await?;
                    }
                    id
                }
            };
            export_ids.insert((a.name.clone(), e.name.clone()), id);
        }
        Ok(())
    }

    async fn grants(
        &mut self,
        tx: &mut PgConnection,
        a: &Account,
        export_ids: &HashMap<(String, String), i64>,
    ) -> Result<(), ImportError> {
        for e in &a.exports {
            let export_id = export_ids[&(a.name.clone(), e.name.clone())];
            for importer in &e.grants {
                let importer_id = self.account_ids[importer];
                let exists: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM nats.account_export_grants WHERE export_id = $1 AND importer_account_id = $2)",
                )
                .bind(export_id)
                .bind(importer_id)
                .fetch_one(&mut *tx)
                .await?;
                let name = format!("{}/{} to {importer}", a.name, e.name);
                if exists {
                    self.record("grant", name, Action::Keep);
                } else {
                    self.record("grant", name, Action::Create);
                    sqlx::query(
                        "INSERT INTO nats.account_export_grants (export_id, importer_account_id, description) VALUES ($1, $2, 'imported')",
                    )
                    .bind(export_id)
                    .bind(importer_id)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn imports(&mut self, tx: &mut PgConnection, a: &Account) -> Result<(), ImportError> {
        let account_id = self.account_ids[&a.name];
        for i in &a.imports {
            let exporter_id = self.account_ids[&i.exporter];
            let row = sqlx::query(
                "SELECT id, subject, exporter_account_id, exporter_public_key, local_subject, type, \
                        share, allow_trace, token \
                   FROM nats.account_imports WHERE account_id = $1 AND name = $2",
            )
            .bind(account_id)
            .bind(&i.name)
            .fetch_optional(&mut *tx)
            .await?;
            let name = format!("{}/{}", a.name, i.name);
            match row {
                None => {
                    self.record("import", name, Action::Create);
                    sqlx::query(
                        "INSERT INTO nats.account_imports (account_id, name, subject, exporter_account_id, \
                            local_subject, type, share, allow_trace, description) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'imported')",
                    )
                    .bind(account_id)
                    .bind(&i.name)
                    .bind(&i.subject)
                    .bind(exporter_id)
                    .bind(&i.local_subject)
                    .bind(i.kind.as_str())
                    .bind(i.share)
                    .bind(i.allow_trace)
                    .execute(&mut *tx)
                    .await?;
                }
                Some(row) => {
                    let mut differ = Vec::new();
                    if row.get::<String, _>("subject") != i.subject {
                        differ.push("subject");
                    }
                    if row.get::<Option<i64>, _>("exporter_account_id") != Some(exporter_id)
                        || row
                            .get::<Option<String>, _>("exporter_public_key")
                            .is_some()
                    {
                        differ.push("exporter_account_id");
                    }
                    if row.get::<Option<String>, _>("local_subject") != i.local_subject {
                        differ.push("local_subject");
                    }
                    if row.get::<String, _>("type") != i.kind.as_str() {
                        differ.push("type");
                    }
                    if row.get::<bool, _>("share") != i.share {
                        differ.push("share");
                    }
                    if row.get::<bool, _>("allow_trace") != i.allow_trace {
                        differ.push("allow_trace");
                    }
                    if row.get::<Option<String>, _>("token").is_some() {
                        differ.push("token");
                    }
                    let action = Action::compared(differ);
                    if self.record("import", name, action) {
                        sqlx::query(
                            "UPDATE nats.account_imports SET subject = $2, exporter_account_id = $3, \
                                exporter_public_key = NULL, local_subject = $4, type = $5, share = $6, \
                                allow_trace = $7, token = NULL WHERE id = $1",
                        )
                        .bind(row.get::<i64, _>("id"))
                        .bind(&i.subject)
                        .bind(exporter_id)
                        .bind(&i.local_subject)
                        .bind(i.kind.as_str())
                        .bind(i.share)
                        .bind(i.allow_trace)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
        }
        Ok(())
    }
}
