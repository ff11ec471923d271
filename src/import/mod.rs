//! Adopting a running deployment (issue 16). Each source reads its own format into one
//! [`Plan`] (accounts with their limits, roles, users, tokens, exports, imports and export
//! grants); one applier ([`apply`]) diffs the plan against the database and applies it in one
//! transaction. A source never writes SQL; the applier never knows where a plan came from.
//!
//! Sources: `nats-conf` ([`from_natsconf`], a config-mode nats.conf: every planned account
//! gets new keys from the sync) and `nsc` ([`nsc`], an nsc operator store: the operator, the
//! system account and every account keep their keys, so existing user JWTs keep verifying).
//! `pb-nats` ([`pbnats`], a pb-nats PocketBase database: keys and seeds kept as for nsc, users
//! keep their PocketBase password hashes and public nkeys).

pub mod apply;
pub mod from_natsconf;
pub mod natsconf;
pub mod nsc;
pub mod pbnats;
mod report;

use crate::cli::CliError;
use crate::config::{CommonArgs, ConfigError, ImportCommand};
use crate::db;

pub use apply::{apply, Action, Change, Options, Report};

/// A secret (password, hash, token): never printed, never logged, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Everything a source wants in the database.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// What was read (`nats.conf /etc/nats/nats.conf`), for the report.
    pub source: String,
    pub accounts: Vec<Account>,
    /// The operator the servers already trust, with its system account (nsc); None: the
    /// service's own (`init` creates it).
    pub operator: Option<Operator>,
    /// What the source holds that is not carried over (reported, not refused).
    pub notes: Vec<String>,
}

/// A public key with its seed, when the source has it (checked to match the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub public_key: String,
    pub seed: Option<Secret>,
}

/// An operator to adopt: the servers trust its JWT, so the service signs with its keys.
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
    /// Its seed is required: the service re-issues the operator JWT with a signing key of its
    /// own added (every other claim kept).
    pub identity: Key,
    /// The operator JWT as the source wrote it.
    pub jwt: String,
    pub system_account: SystemAccount,
}

/// The operator's system account: adopted as the service's SYS (not a tenant account).
#[derive(Debug, Clone)]
pub struct SystemAccount {
    pub name: String,
    /// Its seed is required: the service's system user is issued by it.
    pub identity: Key,
    /// The account JWT as the source wrote it (the servers already have it).
    pub jwt: String,
}

/// Account limits the source sets; `None` leaves the column as it is (its default on insert).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: Option<i64>,
    pub max_leafnodes: Option<i64>,
    pub max_subscriptions: Option<i64>,
    pub max_payload: Option<i64>,
    pub max_data: Option<i64>,
    pub max_jetstream_memory_storage: Option<i64>,
    pub max_jetstream_disk_storage: Option<i64>,
    pub max_jetstream_streams: Option<i64>,
    pub max_jetstream_consumers: Option<i64>,
    pub max_imports: Option<i64>,
    pub max_exports: Option<i64>,
}

impl Limits {
    /// (column, value) for every limit the source sets, in column order.
    pub fn columns(&self) -> Vec<(&'static str, i64)> {
        [
            ("max_connections", self.max_connections),
            ("max_leafnodes", self.max_leafnodes),
            ("max_subscriptions", self.max_subscriptions),
            ("max_payload", self.max_payload),
            ("max_data", self.max_data),
            (
                "max_jetstream_memory_storage",
                self.max_jetstream_memory_storage,
            ),
            (
                "max_jetstream_disk_storage",
                self.max_jetstream_disk_storage,
            ),
            ("max_jetstream_streams", self.max_jetstream_streams),
            ("max_jetstream_consumers", self.max_jetstream_consumers),
            ("max_imports", self.max_imports),
            ("max_exports", self.max_exports),
        ]
        .into_iter()
        .filter_map(|(c, v)| v.map(|v| (c, v)))
        .collect()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Account {
    pub name: String,
    /// The account's existing identity key (nsc); None: the sync gives it new keys.
    pub identity: Option<Key>,
    /// Its existing signing keys (listed in its JWT; only those with a seed can sign).
    pub signing_keys: Vec<Key>,
    /// User JWTs its JWT revokes: user public key (or `*`) → JWTs issued at or before it.
    pub revocations: Vec<(String, i64)>,
    pub limits: Limits,
    pub roles: Vec<Role>,
    pub users: Vec<User>,
    pub exports: Vec<Export>,
    pub imports: Vec<Import>,
    /// Disabled in the source (pb-nats `active` false): imported with `active` false.
    pub inactive: bool,
}

/// Subject lists, sorted and without duplicates (so plans compare with rows as sets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish_allow: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe_allow: Vec<String>,
    pub subscribe_deny: Vec<String>,
}

impl Permissions {
    pub fn normalised(mut self) -> Permissions {
        for l in [
            &mut self.publish_allow,
            &mut self.publish_deny,
            &mut self.subscribe_allow,
            &mut self.subscribe_deny,
        ] {
            l.sort();
            l.dedup();
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.publish_allow.is_empty()
            && self.publish_deny.is_empty()
            && self.subscribe_allow.is_empty()
            && self.subscribe_deny.is_empty()
    }
}

/// Response permission (`allow_responses`): how many replies, for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// -1 unlimited.
    pub max: i32,
    pub ttl_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct Role {
    pub name: String,
    pub permissions: Permissions,
    pub response: Option<Response>,
    /// Upper case, as `nats.roles.allowed_connection_types` holds them; empty: any.
    pub allowed_connection_types: Vec<String>,
    /// What the role is for; None: the applier's note on a role made for one user.
    pub description: Option<String>,
    /// Per-user limits (`max_subscriptions`, `max_data`, `max_payload`); None: unlimited (-1).
    pub user_limits: Option<[i64; 3]>,
}

#[derive(Debug, Clone)]
pub enum Password {
    /// A bcrypt (or argon2id) hash, stored as it is.
    Hash(Secret),
    /// Plain text, hashed with bcrypt on import.
    Plain(Secret),
}

#[derive(Debug, Clone, Default)]
pub struct User {
    pub username: String,
    pub password: Option<Password>,
    /// Public user nkey (`U…`).
    pub nkey: Option<String>,
    /// A role of the same account, by name.
    pub role: Option<String>,
    pub permissions: Permissions,
    /// Bearer tokens (stored as SHA-256 digests).
    pub tokens: Vec<Secret>,
    /// Disabled in the source (pb-nats `active` false): imported with `active` false, so its
    /// JWT stays revoked and its password refused.
    pub inactive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stream,
    Service,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Stream => "stream",
            Kind::Service => "service",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub subject: String,
    pub kind: Kind,
    /// Private: importable only by the accounts in `grants`.
    pub token_req: bool,
    /// `Singleton`, `Stream` or `Chunked` (services only).
    pub response_type: Option<String>,
    pub response_threshold_ms: Option<i64>,
    pub account_token_position: Option<i32>,
    pub allow_trace: bool,
    /// Accounts (by name, all in the plan or the database) granted a private export.
    pub grants: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Import {
    pub name: String,
    /// The exporter's subject.
    pub subject: String,
    /// The exporting account, by name.
    pub exporter: String,
    pub local_subject: Option<String>,
    pub kind: Kind,
    pub share: bool,
    pub allow_trace: bool,
}

/// Why an import did not happen. Every message is one line and names no secret.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read as nats.conf.
    #[error(transparent)]
    Parse(#[from] natsconf::ParseError),
    /// Read, but holds something that cannot be carried over faithfully.
    #[error("{at}: {message}")]
    Refused { at: String, message: String },
    /// A usage problem (a missing flag).
    #[error("{0}")]
    Usage(String),
    /// Rows that exist and differ from the source, without --update.
    #[error("{}", differs_line(.0))]
    Differs(Vec<Change>),
    /// The schema refused a row (its trigger says which and why).
    #[error("the database refused the import, nothing was changed: {0}")]
    Schema(String),
    #[error(transparent)]
    Db(#[from] db::DbError),
}

fn differs_line(rows: &[Change]) -> String {
    let shown: Vec<String> = rows.iter().take(5).map(Change::describe).collect();
    format!(
        "{} row(s) exist and differ from the source ({}{}); nothing was changed. Run again with --update to overwrite them, or with --dry-run to list every row",
        rows.len(),
        shown.join("; "),
        if rows.len() > shown.len() { "; …" } else { "" }
    )
}

impl From<sqlx::Error> for ImportError {
    fn from(e: sqlx::Error) -> Self {
        match e.as_database_error() {
            // Constraint and trigger errors: the row is wrong, not the database.
            Some(d)
                if d.code()
                    .is_some_and(|c| c.starts_with("23") || c == "P0001") =>
            {
                ImportError::Schema(d.message().to_owned())
            }
            _ => ImportError::Db(db::DbError::from(e)),
        }
    }
}

impl From<ImportError> for CliError {
    fn from(e: ImportError) -> Self {
        match e {
            ImportError::Db(e) => CliError::Db(e),
            // Bad input, refused content, conflicts: the user's to fix (exit 64).
            other => CliError::Config(ConfigError::Invalid(other.to_string())),
        }
    }
}

/// `nats-pg-auth import …`.
pub async fn run(common: &CommonArgs, command: ImportCommand) -> Result<(), CliError> {
    let (plan, options, json) = match command {
        ImportCommand::NatsConf(args) => (
            from_natsconf::plan(&args.config, args.global_account.as_deref())?,
            Options {
                dry_run: args.dry_run,
                update: args.update,
                bcrypt_cost: args.cost,
            },
            args.json,
        ),
        ImportCommand::PbNats(args) => (
            pbnats::plan(&args.db, args.pb_encryption_key.as_deref())?,
            Options {
                dry_run: args.dry_run,
                update: args.update,
                bcrypt_cost: 10,
            },
            args.json,
        ),
        ImportCommand::Nsc(args) => (
            nsc::plan(&args.store, args.keys.as_deref())?,
            Options {
                dry_run: args.dry_run,
                update: args.update,
                bcrypt_cost: 10,
            },
            args.json,
        ),
    };
    let cipher = common.cipher()?;
    let pool = db::connect(common.database_url()?, 2).await?;
    // Not `ensure_migrated`: an import may run as nats_pg_auth_admin, which cannot run (or
    // even read) migrations; it only needs the tables.
    let ready: bool = sqlx::query_scalar(
        "SELECT to_regclass('nats.account_export_grants') IS NOT NULL \
            AND to_regclass('nats.user_certificates') IS NOT NULL \
            AND to_regclass('nats.account_revocations') IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .map_err(db::DbError::from)?;
    if !ready {
        return Err(ConfigError::Invalid(
            "the nats schema is missing or older than this binary: run `nats-pg-auth migrate` (as the schema owner) first".into(),
        )
        .into());
    }
    if plan.operator.is_some() || plan.accounts.iter().any(|a| a.identity.is_some()) {
        // Keys and identities are service-owned: an administrator cannot write them.
        let owner: bool = sqlx::query_scalar(
            "SELECT has_table_privilege('nats.service_identities', 'INSERT') \
                AND has_table_privilege('nats.account_keys', 'INSERT') \
                AND has_column_privilege('nats.accounts', 'public_key', 'INSERT')",
        )
        .fetch_one(&pool)
        .await
        .map_err(db::DbError::from)?;
        if !owner {
            return Err(ConfigError::Invalid(
                "this import keeps the source's keys, which only the schema owner may write: run it as the role that runs `nats-pg-auth migrate`".into(),
            )
            .into());
        }
    }
    let report = apply(&pool, &plan, &options, &cipher).await?;
    let text = if json {
        report::json(&report)
    } else {
        report::table(&report)
    };
    crate::cli::out(&text)?;
    Ok(())
}
