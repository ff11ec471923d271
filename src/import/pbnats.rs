//! A pb-nats PocketBase database ([`plan`]): the operator, its system account and every account
//! with their keys and seeds, roles, users with their PocketBase password hashes and public
//! nkeys, exports and imports.
//!
//! PocketBase keeps each collection in a SQLite table of the same name, one column per field:
//! text and relation fields (record ids) as text, booleans as 0/1, numbers as numbers, JSON
//! fields as JSON text. pb-nats (its README, the only description of the layout) names the
//! collections `nats_system_operator`, `nats_accounts`, `nats_account_exports`,
//! `nats_account_imports`, `nats_roles` and `nats_users`. The reader is tolerant where the
//! README leaves room (a missing optional column takes its default; the older single-signing-key
//! columns `signing_public_key`/`signing_seed` are read too; exports and imports tables are
//! optional, older pb-nats had none) and strict on keys: every seed must be the seed of its
//! public key, every JWT must verify and be the JWT of its key, and an `enc::` value needs the
//! pb-nats key and must decrypt with it.
//!
//! Read by hand (no crate knows the format): the table walk and pb-nats' `enc::` values (base64
//! of a 12-byte nonce ‖ AES-256-GCM ciphertext, the key being the 32 bytes of pb-nats'
//! `EncryptionKey`, as PocketBase's `security.Encrypt` writes them). SQLite is `rusqlite`,
//! AES-GCM `aes-gcm`, JWTs and nkeys the project's decoder and `nkeys`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine as _;
use rusqlite::types::Value;

use super::{
    Account, Export, Import, ImportError, Key, Kind, Limits, Operator, Password, Permissions, Plan,
    Response, Role, Secret, SystemAccount, User,
};
use crate::jwt::claims::{AccountClaims, OperatorClaims};
use crate::jwt::{self, Claims};

const OPERATORS: &str = "nats_system_operator";
const ACCOUNTS: &str = "nats_accounts";
const EXPORTS: &str = "nats_account_exports";
const IMPORTS: &str = "nats_account_imports";
const ROLES: &str = "nats_roles";
const USERS: &str = "nats_users";

/// What pb-nats puts before an encrypted value.
const ENC_PREFIX: &str = "enc::";

/// One PocketBase record: column → value.
struct Record {
    table: &'static str,
    cols: HashMap<String, Value>,
}

impl Record {
    fn id(&self) -> String {
        self.text("id")
    }

    /// Where a refusal points: `nats_accounts record abc123`.
    fn at(&self) -> String {
        format!("{} record {}", self.table, self.id())
    }

    fn refuse<T>(&self, message: impl Into<String>) -> Result<T, ImportError> {
        Err(ImportError::Refused {
            at: self.at(),
            message: message.into(),
        })
    }

    /// Text, trimmed; "" when the column is missing or NULL.
    fn text(&self, col: &str) -> String {
        match self.cols.get(col) {
            Some(Value::Text(s)) => s.trim().to_owned(),
            Some(Value::Integer(i)) => i.to_string(),
            Some(Value::Real(r)) => r.to_string(),
            Some(Value::Blob(b)) => String::from_utf8_lossy(b).trim().to_owned(),
            _ => String::new(),
        }
    }

    /// PocketBase booleans are 0/1; `"true"`/`"false"` are accepted too. Missing: `default`.
    fn bool(&self, col: &str, default: bool) -> bool {
        match self.cols.get(col) {
            Some(Value::Integer(i)) => *i != 0,
            Some(Value::Real(r)) => *r != 0.0,
            Some(Value::Text(s)) => match s.trim() {
                "" => default,
                t => t == "1" || t.eq_ignore_ascii_case("true"),
            },
            _ => default,
        }
    }

    /// A whole number; missing or NULL: None.
    fn number(&self, col: &str) -> Result<Option<i64>, ImportError> {
        match self.cols.get(col) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Integer(i)) => Ok(Some(*i)),
            Some(Value::Real(r)) if r.fract() == 0.0 && r.abs() < 9.0e18 => Ok(Some(*r as i64)),
            Some(Value::Text(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::Text(s)) => match s.trim().parse::<f64>() {
                Ok(r) if r.fract() == 0.0 && r.abs() < 9.0e18 => Ok(Some(r as i64)),
                _ => self.refuse(format!("`{col}` is not a whole number")),
            },
            Some(_) => self.refuse(format!("`{col}` is not a whole number")),
        }
    }

    /// A JSON list of subjects (a JSON field); missing, NULL, "" or `null`: empty.
    fn subjects(&self, col: &str) -> Result<Vec<String>, ImportError> {
        let text = self.text(col);
        if text.is_empty() || text == "null" {
            return Ok(vec![]);
        }
        match serde_json::from_str::<Vec<String>>(&text) {
            Ok(list) => Ok(list
                .into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()),
            Err(_) => self.refuse(format!("`{col}` is not a JSON list of subjects")),
        }
    }
}

/// pb-nats' `EncryptionKey`, when given.
struct Decrypter {
    key: Option<Aes256Gcm>,
}

impl Decrypter {
    fn new(key: Option<&str>) -> Result<Decrypter, ImportError> {
        let key = match key {
            None => None,
            Some(k) if k.len() != 32 => {
                return Err(ImportError::Usage(format!(
                    "--pb-encryption-key must be pb-nats' EncryptionKey, exactly 32 characters (got {})",
                    k.len()
                )))
            }
            Some(k) => Some(Aes256Gcm::new_from_slice(k.as_bytes()).expect("32 bytes")),
        };
        Ok(Decrypter { key })
    }

    /// The value itself, or its plaintext when it carries pb-nats' `enc::` prefix.
    fn open(&self, rec: &Record, col: &str, value: &str) -> Result<String, ImportError> {
        let Some(b64) = value.strip_prefix(ENC_PREFIX) else {
            return Ok(value.to_owned());
        };
        let Some(cipher) = &self.key else {
            return rec.refuse(format!(
                "`{col}` is encrypted (enc::): pass pb-nats' EncryptionKey with --pb-encryption-key"
            ));
        };
        let wrong = || {
            rec.refuse(format!(
                "`{col}` does not decrypt with --pb-encryption-key (a wrong key, or a damaged value)"
            ))
        };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
            return wrong();
        };
        if raw.len() < 12 + 16 {
            return wrong();
        }
        let (nonce, sealed) = raw.split_at(12);
        match cipher.decrypt(Nonce::from_slice(nonce), sealed) {
            Ok(plain) => match String::from_utf8(plain) {
                Ok(s) => Ok(s),
                Err(_) => wrong(),
            },
            Err(_) => wrong(),
        }
    }
}

/// The seed in `rec.col` (decrypted) when present, checked to be the seed of `public_key`.
fn seed_of(
    dec: &Decrypter,
    rec: &Record,
    col: &str,
    public_key: &str,
) -> Result<Option<Secret>, ImportError> {
    let raw = rec.text(col);
    if raw.is_empty() {
        return Ok(None);
    }
    let seed = dec.open(rec, col, &raw)?;
    checked_seed(rec, col, seed.trim(), public_key).map(Some)
}

fn checked_seed(
    rec: &Record,
    what: &str,
    seed: &str,
    public_key: &str,
) -> Result<Secret, ImportError> {
    // The nkeys error text is not passed on: it may quote part of the seed.
    match nkeys::KeyPair::from_seed(seed) {
        Ok(kp) if kp.public_key() == public_key => Ok(Secret::new(seed)),
        Ok(_) => rec.refuse(format!(
            "`{what}`: the seed does not match its public key {public_key}"
        )),
        Err(_) => rec.refuse(format!("`{what}` is not an nkey seed")),
    }
}

/// A public key of the expected kind (`O`, `A`, `U`): 56 characters of base32.
fn public_key(rec: &Record, col: &str, prefix: char) -> Result<String, ImportError> {
    let key = rec.text(col);
    if key.is_empty() {
        return rec.refuse(format!("`{col}` is empty"));
    }
    let ok = key.len() == 56
        && key.starts_with(prefix)
        && key
            .chars()
            .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c))
        && nkeys::KeyPair::from_public_key(&key).is_ok();
    if !ok {
        return rec.refuse(format!("`{col}` is not a public {prefix}… nkey"));
    }
    Ok(key)
}

/// An identity key with its seed (`seed`).
fn identity(dec: &Decrypter, rec: &Record, prefix: char) -> Result<Key, ImportError> {
    let pk = public_key(rec, "public_key", prefix)?;
    let seed = seed_of(dec, rec, "seed", &pk)?;
    Ok(Key {
        public_key: pk,
        seed,
    })
}

/// `signing_keys` (`[{public_key, created_at}]`, or plain strings) with their seeds from
/// `signing_keys_private` (`[{public_key, private_key, seed, created_at}]`, or one `enc::`
/// string holding that list); the older single `signing_public_key`/`signing_seed` too.
fn signing_keys(dec: &Decrypter, rec: &Record, prefix: char) -> Result<Vec<Key>, ImportError> {
    let mut publics: Vec<String> = Vec::new();
    let listed = rec.text("signing_keys");
    if !listed.is_empty() && listed != "null" {
        let Ok(serde_json::Value::Array(items)) = serde_json::from_str(&listed) else {
            return rec.refuse("`signing_keys` is not a JSON list");
        };
        for item in items {
            let pk = match &item {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(m) => m
                    .get("public_key")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                _ => String::new(),
            };
            if pk.is_empty() {
                return rec.refuse("`signing_keys` holds an entry without a public_key");
            }
            publics.push(pk);
        }
    }
    let mut seeds: HashMap<String, String> = HashMap::new();
    let private = rec.text("signing_keys_private");
    if !private.is_empty() && private != "null" {
        // A JSON field: an encrypted list is a JSON string ("enc::…"); tolerate it unquoted.
        let inner = match serde_json::from_str::<serde_json::Value>(&private) {
            Ok(serde_json::Value::String(s)) => dec.open(rec, "signing_keys_private", &s)?,
            Ok(_) => private.clone(),
            Err(_) if private.starts_with(ENC_PREFIX) => {
                dec.open(rec, "signing_keys_private", &private)?
            }
            Err(_) => return rec.refuse("`signing_keys_private` is not JSON"),
        };
        let Ok(serde_json::Value::Array(items)) = serde_json::from_str(&inner) else {
            return rec.refuse("`signing_keys_private` is not a JSON list");
        };
        for item in items {
            let field = |k: &str| {
                item.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            };
            let pk = field("public_key");
            let seed = field("seed");
            if pk.is_empty() {
                return rec.refuse("`signing_keys_private` holds an entry without a public_key");
            }
            if !seed.is_empty() {
                let seed = dec.open(rec, "signing_keys_private", &seed)?;
                seeds.insert(pk.clone(), seed);
            }
            if !publics.contains(&pk) {
                publics.push(pk);
            }
        }
    }
    let old = rec.text("signing_public_key");
    if !old.is_empty() && !publics.contains(&old) {
        let raw = rec.text("signing_seed");
        if !raw.is_empty() {
            seeds.insert(old.clone(), dec.open(rec, "signing_seed", &raw)?);
        }
        publics.push(old);
    }
    let mut keys = Vec::new();
    for pk in publics {
        let valid = pk.len() == 56
            && pk.starts_with(prefix)
            && nkeys::KeyPair::from_public_key(&pk).is_ok();
        if !valid {
            return rec.refuse(format!("signing key {pk:?} is not a public {prefix}… nkey"));
        }
        let seed = match seeds.remove(&pk) {
            Some(s) => Some(checked_seed(rec, "signing_keys_private", s.trim(), &pk)?),
            None => None,
        };
        keys.push(Key {
            public_key: pk,
            seed,
        });
    }
    Ok(keys)
}

fn tables(conn: &rusqlite::Connection) -> rusqlite::Result<BTreeSet<String>> {
    let mut stmt =
        conn.prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
    names.collect()
}

fn records(conn: &rusqlite::Connection, table: &'static str) -> rusqlite::Result<Vec<Record>> {
    // The table name is one of the constants above, never input.
    let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))?;
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let rows = stmt.query_map([], |row| {
        let mut cols = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            cols.insert(n.clone(), row.get::<_, Value>(i)?);
        }
        Ok(Record { table, cols })
    })?;
    rows.collect()
}

/// `nats.accounts.name` allows `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`; pb-nats names are display
/// names ("Acme Corp"): other characters become `-`.
fn account_name(display: &str) -> String {
    let mut name: String = display
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    while name.starts_with(['_', '.', '-']) {
        name.remove(0);
    }
    name.truncate(64);
    name
}

fn kind(rec: &Record) -> Result<Kind, ImportError> {
    match rec.text("type").to_ascii_lowercase().as_str() {
        "stream" | "" => Ok(Kind::Stream),
        "service" => Ok(Kind::Service),
        other => rec.refuse(format!("`type` {other:?} is neither stream nor service")),
    }
}

/// Reads the database into a plan.
pub fn plan(db: &Path, key: Option<&str>) -> Result<Plan, ImportError> {
    let dec = Decrypter::new(key)?;
    let at_db = |message: String| ImportError::Refused {
        at: db.display().to_string(),
        message,
    };
    if !db.is_file() {
        return Err(at_db("no such file".into()));
    }
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| at_db(format!("cannot open as SQLite: {e}")))?;
    let sql = |e: rusqlite::Error| at_db(format!("cannot read: {e}"));
    let present = tables(&conn).map_err(|e| at_db(format!("not a SQLite database: {e}")))?;
    for t in [OPERATORS, ACCOUNTS, ROLES, USERS] {
        if !present.contains(t) {
            return Err(at_db(format!(
                "no `{t}` table: not a pb-nats PocketBase database (pb_data/data.db)"
            )));
        }
    }
    let mut notes = Vec::new();

    // The operator.
    let ops = records(&conn, OPERATORS).map_err(sql)?;
    let op = match ops.as_slice() {
        [op] => op,
        [] => {
            return Err(at_db(format!(
                "`{OPERATORS}` is empty: pb-nats never started"
            )))
        }
        _ => {
            return Err(at_db(format!(
                "`{OPERATORS}` holds {} records; pb-nats keeps one",
                ops.len()
            )))
        }
    };
    let op_key = identity(&dec, op, 'O')?;
    let op_jwt = op.text("jwt");
    let op_claims: Claims<OperatorClaims> = match jwt::decode_verified(&op_jwt) {
        Ok(c) => c,
        Err(e) => return op.refuse(format!("`jwt` is not a valid operator JWT: {e}")),
    };
    if op_claims.sub != op_key.public_key || op_claims.iss != op_key.public_key {
        return op.refuse("`jwt` is not the self-signed JWT of `public_key`");
    }
    let op_signing = signing_keys(&dec, op, 'O')?;
    let op_name = match op.text("name") {
        n if n.is_empty() => op_claims.name.clone().unwrap_or_default(),
        n => n,
    };
    if op_name.is_empty() {
        return op.refuse("the operator has no name");
    }
    let mut trusted: Vec<String> = vec![op_key.public_key.clone()];
    trusted.extend(op_claims.nats.signing_keys.iter().cloned());
    trusted.extend(op_signing.iter().map(|k| k.public_key.clone()));

    // Accounts: record id → (account, public key); the system account apart.
    let sys_id = op.text("system_account_id");
    let mut system: Option<SystemAccount> = None;
    let mut accounts: Vec<Account> = Vec::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut by_key: HashMap<String, String> = HashMap::new();
    let mut sys_record_id = String::new();
    let mut seen_names: HashMap<String, String> = HashMap::new();
    for rec in records(&conn, ACCOUNTS).map_err(sql)? {
        let display = rec.text("name");
        let key = identity(&dec, &rec, 'A')?;
        let token = rec.text("jwt");
        let is_system = if sys_id.is_empty() {
            // Older pb-nats has no `system_account_id`: its system account is named so.
            display == "System Account"
                || op_claims.nats.system_account.as_deref() == Some(key.public_key.as_str())
        } else {
            rec.id() == sys_id
        };
        if is_system {
            let claims: Claims<AccountClaims> = match jwt::decode_verified(&token) {
                Ok(c) => c,
                Err(e) => return rec.refuse(format!("`jwt` is not a valid account JWT: {e}")),
            };
            if claims.sub != key.public_key || !trusted.contains(&claims.iss) {
                return rec.refuse(
                    "`jwt` is not the JWT of `public_key` issued by the operator or its signing keys",
                );
            }
            if op_claims
                .nats
                .system_account
                .as_deref()
                .is_some_and(|k| k != key.public_key)
            {
                return rec.refuse("the operator JWT names another system account");
            }
            sys_record_id = rec.id();
            by_key.insert(key.public_key.clone(), String::new());
            system = Some(SystemAccount {
                name: if display.is_empty() {
                    "SYS".into()
                } else {
                    display
                },
                identity: key,
                jwt: token,
            });
            continue;
        }
        let name = account_name(&display);
        if name.is_empty() {
            return rec.refuse(format!(
                "account name {display:?} has no letter or digit to name a nats.accounts row by"
            ));
        }
        if let Some(other) = seen_names.insert(name.clone(), display.clone()) {
            return rec.refuse(format!(
                "account names {other:?} and {display:?} both become {name:?} (nats.accounts names are [A-Za-z0-9_.-]); rename one in pb-nats first"
            ));
        }
        if name != display {
            notes.push(format!("account {display:?} is named {name:?}"));
        }
        let signing = signing_keys(&dec, &rec, 'A')?;
        let l = |c: &str| rec.number(c);
        let limits = Limits {
            max_connections: l("max_connections")?,
            max_subscriptions: l("max_subscriptions")?,
            max_data: l("max_data")?,
            max_payload: l("max_payload")?,
            max_jetstream_disk_storage: l("max_jetstream_disk_storage")?,
            max_jetstream_memory_storage: l("max_jetstream_memory_storage")?,
            ..Limits::default()
        };
        by_id.insert(rec.id(), accounts.len());
        by_key.insert(key.public_key.clone(), name.clone());
        accounts.push(Account {
            name,
            identity: Some(key),
            signing_keys: signing,
            limits,
            inactive: !rec.bool("active", true),
            ..Account::default()
        });
    }
    let Some(system) = system else {
        return op.refuse(if sys_id.is_empty() {
            "no system account (no `system_account_id`, and no account named \"System Account\")"
                .to_string()
        } else {
            format!("`system_account_id` {sys_id:?} is not a record of {ACCOUNTS}")
        });
    };

    // Roles (shared by every account in pb-nats): copied into each account whose users hold
    // them, since nats.roles belong to one account.
    let mut roles: HashMap<String, Role> = HashMap::new();
    for rec in records(&conn, ROLES).map_err(sql)? {
        let name = rec.text("name");
        if name.is_empty() {
            return rec.refuse("the role has no name");
        }
        let response = if rec.bool("allow_response", false) {
            // As pb-nats writes them into the JWT and nats-server reads them: max 0 is one
            // response, -1 unlimited; ttl 0 is nats-server's default (2 minutes).
            let max = match rec.number("allow_response_max")?.unwrap_or(0) {
                0 => 1,
                n if n < 0 => -1,
                n => i32::try_from(n).unwrap_or(i32::MAX),
            };
            let ttl_s = rec.number("allow_response_ttl")?.unwrap_or(0);
            if !(0..=86_400).contains(&ttl_s) {
                return rec.refuse(
                    "`allow_response_ttl` over a day (or negative) cannot be kept (roles.allow_response_ttl is at most 1 day)",
                );
            }
            Some(Response {
                max,
                ttl_ms: if ttl_s == 0 { 120_000 } else { ttl_s * 1000 },
            })
        } else {
            None
        };
        let lim = |c: &str| -> Result<i64, ImportError> { Ok(rec.number(c)?.unwrap_or(-1)) };
        let role = Role {
            name: name.clone(),
            permissions: Permissions {
                publish_allow: rec.subjects("publish_permissions")?,
                publish_deny: rec.subjects("publish_deny_permissions")?,
                subscribe_allow: rec.subjects("subscribe_permissions")?,
                subscribe_deny: rec.subjects("subscribe_deny_permissions")?,
            }
            .normalised(),
            response,
            allowed_connection_types: vec![],
            description: Some(match rec.text("description") {
                d if d.is_empty() => "imported from pb-nats".to_owned(),
                d => d,
            }),
            user_limits: Some([
                lim("max_subscriptions")?,
                lim("max_data")?,
                lim("max_payload")?,
            ]),
        };
        roles.insert(rec.id(), role);
    }

    // Users.
    let mut sys_users = 0;
    for rec in records(&conn, USERS).map_err(sql)? {
        let account_id = rec.text("account_id");
        if account_id == sys_record_id {
            sys_users += 1;
            continue;
        }
        let Some(&idx) = by_id.get(&account_id) else {
            return rec.refuse(format!(
                "`account_id` {account_id:?} is not a record of {ACCOUNTS}"
            ));
        };
        let username = rec.text("nats_username");
        if username.is_empty() || username.chars().any(char::is_whitespace) {
            return rec.refuse("`nats_username` is empty or holds whitespace");
        }
        let hash = rec.text("password");
        let password = if hash.is_empty() {
            None
        } else if hash.starts_with("$2") && hash.len() == 60 {
            Some(Password::Hash(Secret::new(hash)))
        } else {
            return rec.refuse("`password` is not a bcrypt hash");
        };
        let nkey = match rec.text("public_key") {
            k if k.is_empty() => None,
            _ => Some(public_key(&rec, "public_key", 'U')?),
        };
        let account = &mut accounts[idx];
        let role = match rec.text("role_id") {
            r if r.is_empty() => None,
            r => {
                let Some(role) = roles.get(&r) else {
                    return rec.refuse(format!("`role_id` {r:?} is not a record of {ROLES}"));
                };
                if !account.roles.iter().any(|x| x.name == role.name) {
                    account.roles.push(role.clone());
                }
                Some(role.name.clone())
            }
        };
        if rec.bool("bearer_token", false) {
            notes.push(format!(
                "user {username:?}: its bearer JWT keeps working as it is (same account keys); callout logins are never bearer"
            ));
        }
        account.users.push(User {
            username,
            password,
            nkey,
            role,
            permissions: Permissions {
                publish_allow: rec.subjects("publish_permissions")?,
                publish_deny: rec.subjects("publish_deny_permissions")?,
                subscribe_allow: rec.subjects("subscribe_permissions")?,
                subscribe_deny: rec.subjects("subscribe_deny_permissions")?,
            }
            .normalised(),
            tokens: vec![],
            inactive: !rec.bool("active", true),
        });
    }
    if sys_users > 0 {
        notes.push(format!(
            "{sys_users} user(s) of the system account are not rows (the system account is the service's own); their JWTs keep working"
        ));
    }

    // Exports, then imports (exporters named by public key).
    if present.contains(EXPORTS) {
        for rec in records(&conn, EXPORTS).map_err(sql)? {
            let owner = rec.text("account_id");
            let Some(&idx) = by_id.get(&owner) else {
                if owner == sys_record_id {
                    notes.push(format!(
                        "{} of the system account: left out (the system account keeps its own JWT)",
                        rec.at()
                    ));
                    continue;
                }
                return rec.refuse(format!(
                    "`account_id` {owner:?} is not a record of {ACCOUNTS}"
                ));
            };
            let kind = kind(&rec)?;
            let subject = rec.text("subject");
            let service = kind == Kind::Service;
            let response_type = match rec.text("response_type") {
                t if t.is_empty() || !service => None,
                t => match t.as_str() {
                    "Singleton" | "Stream" | "Chunked" => Some(t),
                    _ => {
                        return rec.refuse(format!(
                            "`response_type` {t:?} is not Singleton, Stream or Chunked"
                        ))
                    }
                },
            };
            accounts[idx].exports.push(Export {
                name: match rec.text("name") {
                    n if n.is_empty() => subject.clone(),
                    n => n,
                },
                subject,
                kind,
                token_req: rec.bool("token_req", false),
                response_type,
                response_threshold_ms: rec
                    .number("response_threshold")?
                    .filter(|ms| *ms > 0 && service),
                account_token_position: rec
                    .number("account_token_position")?
                    .filter(|p| *p > 0)
                    .map(|p| i32::try_from(p).unwrap_or(i32::MAX)),
                allow_trace: service && rec.bool("allow_trace", false),
                grants: vec![],
            });
        }
    }
    if present.contains(IMPORTS) {
        for rec in records(&conn, IMPORTS).map_err(sql)? {
            let owner = rec.text("account_id");
            let Some(&idx) = by_id.get(&owner) else {
                if owner == sys_record_id {
                    notes.push(format!("{} of the system account: left out", rec.at()));
                    continue;
                }
                return rec.refuse(format!(
                    "`account_id` {owner:?} is not a record of {ACCOUNTS}"
                ));
            };
            let importer = accounts[idx].name.clone();
            let subject = rec.text("subject");
            let name = match rec.text("name") {
                n if n.is_empty() => subject.clone(),
                n => n,
            };
            let exporter_key = rec.text("account");
            let exporter = match by_key.get(&exporter_key) {
                Some(n) if !n.is_empty() => n.clone(),
                Some(_) => {
                    notes.push(format!("import {name:?} of account {importer:?} is from the system account: left out (add it by hand as a row with exporter_public_key)"));
                    continue;
                }
                None => {
                    notes.push(format!("import {name:?} of account {importer:?} is from {exporter_key:?}, an account outside this database: left out (add it as a row with exporter_public_key and its token)"));
                    continue;
                }
            };
            let kind = kind(&rec)?;
            // An import of a private export held a token: the exporter's export grants the
            // importer (the service mints the activation from the grant).
            let has_token = !rec.text("token").is_empty();
            let exp_idx = accounts
                .iter()
                .position(|a| a.name == exporter)
                .expect("exporter planned");
            let export = accounts[exp_idx].exports.iter_mut().find(|e| {
                e.kind == kind && crate::sync::sharing::subject_contains(&e.subject, &subject)
            });
            match export {
                Some(e) if e.token_req && has_token => {
                    if !e.grants.contains(&importer) {
                        e.grants.push(importer.clone());
                    }
                }
                Some(e) if e.token_req => notes.push(format!(
                    "import {name:?} of account {importer:?}: the export is private and the import holds no token: no grant (the import stays inactive, as on the server today)"
                )),
                Some(_) => {}
                None => notes.push(format!(
                    "import {name:?} of account {importer:?}: account {exporter:?} exports no such {} subject (kept; inactive until it does)",
                    kind.as_str()
                )),
            }
            accounts[idx].imports.push(Import {
                name,
                subject,
                exporter,
                local_subject: Some(rec.text("local_subject")).filter(|s| !s.is_empty()),
                kind,
                share: kind == Kind::Service && rec.bool("share", false),
                allow_trace: kind == Kind::Stream && rec.bool("allow_trace", false),
            });
        }
    }
    let unused: Vec<&str> = {
        let used: BTreeSet<&str> = accounts
            .iter()
            .flat_map(|a| a.roles.iter().map(|r| r.name.as_str()))
            .collect();
        let mut u: Vec<&str> = roles
            .values()
            .map(|r| r.name.as_str())
            .filter(|n| !used.contains(n))
            .collect();
        u.sort();
        u
    };
    if !unused.is_empty() {
        notes.push(format!(
            "role(s) held by no tenant user, not imported (nats.roles belong to one account): {}",
            unused.join(", ")
        ));
    }
    Ok(Plan {
        source: format!("pb-nats database {}", db.display()),
        accounts,
        operator: Some(Operator {
            name: op_name,
            identity: op_key,
            jwt: op_jwt,
            system_account: system,
        }),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_become_account_names() {
        assert_eq!(account_name("Acme Corp"), "Acme-Corp");
        assert_eq!(account_name("  _x.y "), "x.y");
        assert_eq!(account_name("✓"), "");
    }

    #[test]
    fn enc_values_decrypt_with_the_right_key_only() {
        let key = "0123456789abcdef0123456789abcdef";
        let cipher = Aes256Gcm::new_from_slice(key.as_bytes()).unwrap();
        let nonce = [7u8; 12];
        let mut raw = nonce.to_vec();
        raw.extend(
            cipher
                .encrypt(Nonce::from_slice(&nonce), b"SAplain".as_ref())
                .unwrap(),
        );
        let value = format!(
            "enc::{}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        );
        let rec = Record {
            table: ACCOUNTS,
            cols: HashMap::new(),
        };
        let good = Decrypter::new(Some(key)).unwrap();
        assert_eq!(good.open(&rec, "seed", &value).unwrap(), "SAplain");
        let bad = Decrypter::new(Some("fedcba9876543210fedcba9876543210")).unwrap();
        assert!(bad.open(&rec, "seed", &value).is_err());
        let none = Decrypter::new(None).unwrap();
        assert!(none.open(&rec, "seed", &value).is_err());
        assert_eq!(none.open(&rec, "seed", "SAplain").unwrap(), "SAplain");
    }
}
