//! Command line and environment configuration.
//!
//! Every flag is also an environment variable so the service can be configured the same way in
//! a terminal, a systemd unit and a container. Parsing problems become one clear line and exit
//! code 64 (EX_USAGE) in `main`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::keys::{self, SeedCipher};

#[derive(Debug, Parser)]
#[command(
    name = "nats-pg-auth",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("NATS_PG_AUTH_GIT_SHA"), ")"),
    about = "Postgres as the single source of truth for NATS identities (auth callout + account JWT sync)"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Postgres connection string.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// At-rest key for seeds: 32 random bytes, base64 (see `nats-pg-auth generate-key`).
    #[arg(
        long,
        env = "NATS_PG_AUTH_ENCRYPTION_KEY",
        global = true,
        hide_env_values = true
    )]
    pub encryption_key: Option<String>,

    /// File holding the at-rest key (base64), as an alternative to --encryption-key.
    #[arg(long, env = "NATS_PG_AUTH_ENCRYPTION_KEY_FILE", global = true)]
    pub encryption_key_file: Option<PathBuf>,

    /// The previous at-rest key, while a rotation is being finished: seeds sealed with it are
    /// still read, and `serve` re-seals them with --encryption-key at startup.
    #[arg(
        long,
        env = "NATS_PG_AUTH_OLD_ENCRYPTION_KEY",
        global = true,
        hide_env_values = true
    )]
    pub old_encryption_key: Option<String>,

    /// Log format: `plain` or `json`. The level comes from RUST_LOG (default info).
    #[arg(
        long,
        env = "NATS_PG_AUTH_LOG_FORMAT",
        global = true,
        default_value = "plain"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

// Parsed once per process; boxing `ServeArgs` would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the `nats` schema.
    Migrate,
    /// Create the operator, SYS, AUTH, service user and sentinel (idempotent) and write the
    /// nats-server configuration fragment.
    Init(InitArgs),
    /// Write the nats-server configuration fragment of an initialised database.
    ExportConfig(ExportConfigArgs),
    /// Run the auth callout and the account sync.
    Serve(ServeArgs),
    /// Print a bcrypt hash of a password read from standard input (for `nats.users.password_hash`).
    HashPassword(HashPasswordArgs),
    /// Print a fresh random at-rest encryption key (base64 of 32 bytes).
    GenerateKey,
    /// Is the service healthy? Every replica (ready, NATS, mode, build), the sync leader, the
    /// outbox and kick backlog, and the sync state of every account and import. Exits 69 when a
    /// replica is not ready, silent or missing, 65 when the server refused an account or
    /// import, else 0.
    Status(OutputArgs),
    /// Add an account (plain SQL works the same; this is a convenience).
    AddAccount(AddAccountArgs),
    /// Add a user; the password is read from standard input and stored as bcrypt.
    AddUser(AddUserArgs),
    /// Issue a bearer token for a user; prints the token once (only its SHA-256 is stored).
    AddToken(AddTokenArgs),
    /// Give an account a new signing key (graceful by default; see --emergency).
    RotateSigningKey(RotateSigningKeyArgs),
    /// Rotate the operator signing key in two steps (see README): without --finish, list a new
    /// key in the operator JWT; with --finish, make it the signing key and re-sign every account.
    RotateOperatorKey(RotateOperatorKeyArgs),
    /// Log in to nats-server as a user (password, token or nkey seed) and print what the login
    /// got: the account, the permissions and when the user JWT expires (a quick check of a
    /// tenant, and of the whole chain: nats-server → callout → Postgres).
    TryLogin(TryLoginArgs),
    /// Every live connection on every nats-server: user, account, door, server, since when, and
    /// whether its JWT was minted from the login copy during a Postgres outage (CONNZ, asked as
    /// the service's system user).
    Connections(crate::cli::connections::ConnectionsArgs),
    /// Write a `nats` CLI context (URL and a short-lived system-user credential, mode 0600) so
    /// `nats server report connections` and friends work for an operator.
    ExportContext(crate::cli::context::ExportContextArgs),
    /// Re-encrypt every stored seed under a new at-rest key (the current key comes from
    /// --encryption-key / NATS_PG_AUTH_ENCRYPTION_KEY; none if the seeds are plain). Without
    /// --new-key: seal every seed with the current key, opening those under
    /// NATS_PG_AUTH_OLD_ENCRYPTION_KEY (finishes a rotation that left seeds under the old key).
    RotateEncryptionKey(RotateEncryptionKeyArgs),
    /// Print the id of the at-rest key (--encryption-key / NATS_PG_AUTH_ENCRYPTION_KEY, and of
    /// NATS_PG_AUTH_OLD_ENCRYPTION_KEY): the id the stored seeds and the service's messages name.
    KeyId,
    /// Accounts: list, show, create, delete, disable, enable.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Roles: list, show, create.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Users: list, show, create, delete, set-password, set-role, disable, enable, unlock.
    #[command(subcommand)]
    User(UserCommand),
    /// Bearer tokens: list, create, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// What a login of a user would get right now (no password needed): account, role, merged
    /// permissions, limits and JWT lifetime, or the reason it would be denied.
    Explain(ExplainArgs),
    /// Adopt a running deployment: read its accounts and users into the database, keeping
    /// every client's credentials (`import nats-conf`; try `--dry-run` first).
    #[command(subcommand)]
    Import(ImportCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// A config-mode nats.conf: `accounts { … }` and the top-level `authorization` block, with
    /// passwords (bcrypt kept, plain text hashed), permissions, tokens, exports, imports and
    /// limits. One transaction; a second run changes nothing.
    NatsConf(ImportNatsConfArgs),
    /// An nsc operator store: the operator, its system account and every account keep their
    /// keys (existing user JWTs and `.creds` files keep working); users become rows bound to
    /// their public nkey. Run before `init`, as the schema owner, with the encryption key
    /// `serve` uses. One transaction; a second run changes nothing.
    Nsc(ImportNscArgs),
    /// A pb-nats PocketBase database (`pb_data/data.db`): the operator, its system account and
    /// every account keep their keys and seeds (pb-nats `.creds` files keep working); roles,
    /// users with their PocketBase password hashes and public nkeys, exports and imports. Run
    /// before `init`, as the schema owner, with the encryption key `serve` uses. One
    /// transaction; a second run changes nothing.
    #[command(name = "pb-nats")]
    PbNats(ImportPbNatsArgs),
}

#[derive(Debug, Args, Clone)]
pub struct ImportPbNatsArgs {
    /// PocketBase's SQLite database, usually `pb_data/data.db` (opened read-only).
    #[arg(long)]
    pub db: PathBuf,
    /// pb-nats' `EncryptionKey` (32 characters), when it encrypted seeds (`enc::` values).
    #[arg(long, env = "PB_NATS_ENCRYPTION_KEY", hide_env_values = true)]
    pub pb_encryption_key: Option<String>,
    /// Print what would be created, changed or left alone; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Overwrite rows that exist and differ from the database (without it they are refused).
    #[arg(long)]
    pub update: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ImportNscArgs {
    /// The operator's folder (holding `<Operator>.jwt` and `accounts/`), or the stores root
    /// when it holds one operator.
    #[arg(long)]
    pub store: PathBuf,
    /// nsc's NKEYS_PATH (the folder holding `keys/` and `creds/`), or `keys/` itself: where the
    /// seeds are. The operator's and the system account's seeds are required.
    #[arg(long, env = "NKEYS_PATH")]
    pub keys: Option<PathBuf>,
    /// Print what would be created, changed or left alone; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Overwrite rows that exist and differ from the store (without it they are refused).
    #[arg(long)]
    pub update: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ImportNatsConfArgs {
    /// The nats-server configuration file (its `include`s are followed).
    #[arg(long)]
    pub config: PathBuf,
    /// The account the users of the top-level `authorization` block move to (required when it
    /// has users, a user/password or a token).
    #[arg(long)]
    pub global_account: Option<String>,
    /// Print what would be created, changed or left alone; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Overwrite rows that exist and differ from the file (without it they are refused).
    #[arg(long)]
    pub update: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// bcrypt cost for plain-text passwords.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=12))]
    pub cost: u32,
}

/// `--json`: machine-readable output on stdout (and nothing else there).
#[derive(Debug, Args, Clone)]
pub struct OutputArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// List accounts.
    List(OutputArgs),
    /// Show one account.
    Show(NameArgs),
    /// Add an account (same as `add-account`).
    Create(AddAccountArgs),
    /// Delete an account with its users, roles, tokens, exports and imports; the sync removes
    /// it from nats-server and its connections are closed.
    Delete(NameOnly),
    /// Set an account inactive: its users are refused (`inactive_account`).
    Disable(NameOnly),
    /// Set an account active again.
    Enable(NameOnly),
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// List roles (of one account with --account).
    List(RoleListArgs),
    /// Show one role.
    Show(RoleShowArgs),
    /// Add a role (of one account with --account, else global: usable by every account).
    Create(RoleCreateArgs),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// List users (of one account with --account).
    List(UserListArgs),
    /// Show one user (never its password hash).
    Show(NameArgs),
    /// Add a user; the password is read from standard input, or asked for on a terminal (same
    /// as `add-user`).
    Create(AddUserArgs),
    /// Delete a user with its tokens and certificate mappings; its connections are closed.
    Delete(NameOnly),
    /// Set a user's password (standard input, or asked for on a terminal); its connections are
    /// closed and the old password is refused from then on.
    SetPassword(SetPasswordArgs),
    /// Give a user another role (or none with --none); its connections are closed and log in
    /// again with the new rights.
    SetRole(SetRoleArgs),
    /// Set a user inactive: its logins are refused (`inactive_user`).
    Disable(NameOnly),
    /// Set a user active again.
    Enable(NameOnly),
    /// Lift a user's lockout (wrong passwords) on every replica at once.
    Unlock(NameOnly),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// List tokens (of one user with --user); never the tokens themselves.
    List(TokenListArgs),
    /// Issue a token for a user; prints it once (same as `add-token`).
    Create(AddTokenArgs),
    /// Revoke a token by its id (see `token list`).
    Revoke(TokenRevokeArgs),
}

#[derive(Debug, Args, Clone)]
pub struct NameArgs {
    /// Name.
    pub name: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args, Clone)]
pub struct NameOnly {
    /// Name.
    pub name: String,
}

#[derive(Debug, Args, Clone)]
pub struct RoleListArgs {
    /// Only the roles usable by this account (its own and the global ones).
    #[arg(long)]
    pub account: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args, Clone)]
pub struct RoleCreateArgs {
    /// Role name.
    pub name: String,
    /// The account the role belongs to; without it the role is global (every account's).
    #[arg(long)]
    pub account: Option<String>,
    /// A subject the role may publish to (repeat the flag for more).
    #[arg(long = "publish", value_name = "SUBJECT")]
    pub publish: Vec<String>,
    /// A subject the role may subscribe to (repeat the flag for more).
    #[arg(long = "subscribe", value_name = "SUBJECT")]
    pub subscribe: Vec<String>,
    /// A subject the role may not publish to (wins over --publish).
    #[arg(long = "publish-deny", value_name = "SUBJECT")]
    pub publish_deny: Vec<String>,
    /// A subject the role may not subscribe to (wins over --subscribe).
    #[arg(long = "subscribe-deny", value_name = "SUBJECT")]
    pub subscribe_deny: Vec<String>,
    /// Lifetime of the user JWTs of the role's users, e.g. 15m (default: the account's, else
    /// `serve --default-ttl`).
    #[arg(long, value_parser = parse_duration)]
    pub jwt_ttl: Option<Duration>,
    #[arg(long)]
    pub description: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct SetPasswordArgs {
    /// Login name.
    pub name: String,
    /// bcrypt cost.
    #[arg(long, default_value_t = 10)]
    pub cost: u32,
}

#[derive(Debug, Args, Clone)]
pub struct SetRoleArgs {
    /// Login name.
    pub name: String,
    /// Role name (a role of the user's account, or a global one).
    #[arg(required_unless_present = "none", conflicts_with = "none")]
    pub role: Option<String>,
    /// Take the user's role away (its own permissions, else the defaults, apply).
    #[arg(long)]
    pub none: bool,
}

#[derive(Debug, Args, Clone)]
pub struct RoleShowArgs {
    /// Role name.
    pub name: String,
    /// The account the role belongs to (needed when several accounts have a role of that name).
    #[arg(long)]
    pub account: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args, Clone)]
pub struct UserListArgs {
    /// Only the users of this account.
    #[arg(long)]
    pub account: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args, Clone)]
pub struct TokenListArgs {
    /// Only the tokens of this user.
    #[arg(long)]
    pub user: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args, Clone)]
pub struct TokenRevokeArgs {
    /// Token id (the ID column of `token list`).
    pub id: i64,
}

#[derive(Debug, Args, Clone)]
pub struct ExplainArgs {
    /// Login name.
    // Which one is given is checked by `explain` itself, so the error names all three.
    #[arg(long, conflicts_with_all = ["nkey", "certificate"])]
    pub user: Option<String>,
    /// The user holding this public nkey (`U…`).
    #[arg(long, conflicts_with = "certificate")]
    pub nkey: Option<String>,
    /// The user a client certificate (PEM file; the first certificate is the leaf) maps to, as
    /// if nats-server had verified it.
    #[arg(long)]
    pub certificate: Option<PathBuf>,
    /// Client address to check against the role's allowed_sources.
    #[arg(long)]
    pub source: Option<String>,
    /// Connection type to check against the role's allowed_connection_types (STANDARD,
    /// WEBSOCKET, LEAFNODE, LEAFNODE_WS, MQTT, MQTT_WS, IN_PROCESS).
    #[arg(long, default_value = "STANDARD")]
    pub connection_type: String,
    /// The same flags and variables as `serve`'s, so it explains what `serve` would do.
    #[command(flatten)]
    pub login: LoginDefaults,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args, Clone)]
pub struct InitArgs {
    /// Name of the operator (kept in the operator JWT). Required unless an operator was
    /// imported (`import nsc`): it is then adopted, and another name is refused.
    #[arg(long, env = "NATS_PG_AUTH_OPERATOR_NAME")]
    pub operator_name: Option<String>,
    /// Publish the AUTH account without an xkey: nats-server then sends authorization requests
    /// (passwords and tokens included) and receives the answers unencrypted, saving it two
    /// X25519 operations per login. Only where the callout's NATS connection never leaves the
    /// pod (sidecar on 127.0.0.1) or runs over TLS. On an initialised database, re-issues AUTH's
    /// JWT (restart nats-server with the new fragment). `--xkey` switches back.
    #[arg(long, conflicts_with = "xkey")]
    pub no_xkey: bool,
    /// Publish the AUTH account with the service's xkey (the default for a new database);
    /// re-issues AUTH's JWT on one initialised with `--no-xkey`.
    #[arg(long)]
    pub xkey: bool,
    #[command(flatten)]
    pub fragment: FragmentArgs,
}

impl InitArgs {
    /// The xkey choice made on the command line, if any.
    pub fn xkey_choice(&self) -> Option<bool> {
        match (self.xkey, self.no_xkey) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct ExportConfigArgs {
    #[command(flatten)]
    pub fragment: FragmentArgs,
}

#[derive(Debug, Args, Clone)]
pub struct FragmentArgs {
    /// Directory where nats-server's full resolver keeps account JWTs.
    #[arg(long, env = "NATS_PG_AUTH_RESOLVER_DIR")]
    pub resolver_dir: PathBuf,
    /// Where to write the nats-server configuration fragment (`-` for standard output).
    #[arg(long, env = "NATS_PG_AUTH_CONFIG_OUT")]
    pub out: PathBuf,
}

#[derive(Debug, Args, Clone)]
pub struct AddAccountArgs {
    /// Account name.
    pub name: String,
    /// Maximum connections (-1 unlimited).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub max_connections: i64,
}

#[derive(Debug, Args, Clone)]
pub struct AddUserArgs {
    /// Account name.
    #[arg(long)]
    pub account: String,
    /// Login name.
    #[arg(long)]
    pub username: String,
    /// Role name (a role of the account, or a global one).
    #[arg(long)]
    pub role: Option<String>,
    /// bcrypt cost.
    #[arg(long, default_value_t = 10)]
    pub cost: u32,
}

#[derive(Debug, Args, Clone)]
pub struct AddTokenArgs {
    /// Login name of the token's user.
    #[arg(long, visible_alias = "user")]
    pub username: String,
    /// Lifetime, e.g. 30d; none means until revoked.
    #[arg(long, value_parser = parse_duration)]
    pub expires_in: Option<Duration>,
    #[arg(long)]
    pub description: Option<String>,
    /// Print `{"token", "id", "user", "expires_at"}` as JSON instead of the bare token.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct RotateSigningKeyArgs {
    /// Account name.
    #[arg(long)]
    pub account: String,
    /// Remove the older keys at once: every connection they signed is dropped and comes back
    /// through the callout. Without it, older keys stay valid until their JWTs expired.
    #[arg(long)]
    pub emergency: bool,
}

#[derive(Debug, Args, Clone)]
pub struct RotateOperatorKeyArgs {
    /// Second step: switch to the new key (after nats-server loaded the first step's fragment).
    #[arg(long)]
    pub finish: bool,
    #[command(flatten)]
    pub fragment: FragmentArgs,
}

#[derive(Debug, Args, Clone)]
pub struct RotateEncryptionKeyArgs {
    /// The new key (32 random bytes, base64).
    #[arg(long, env = "NATS_PG_AUTH_NEW_ENCRYPTION_KEY", hide_env_values = true)]
    pub new_key: Option<String>,
    /// File holding the new key.
    #[arg(long)]
    pub new_key_file: Option<PathBuf>,
}

/// TLS towards nats-server, named like the nats CLI's (`NATS_CA`, `NATS_CERT`, `NATS_KEY`).
/// Any of them turns TLS on (required); a server with `verify: true` needs the client pair.
#[derive(Debug, Args, Clone, Default)]
pub struct NatsTlsArgs {
    /// CA certificate(s) (PEM) that signed nats-server's certificate.
    #[arg(long, env = "NATS_CA")]
    pub nats_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to nats-server (with --nats-key-file).
    #[arg(long, env = "NATS_CERT", requires = "nats_key_file")]
    pub nats_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --nats-cert-file.
    #[arg(long, env = "NATS_KEY", requires = "nats_cert_file")]
    pub nats_key_file: Option<PathBuf>,
}

impl NatsTlsArgs {
    /// Checks the files now (the NATS client would only read them when connecting, and retry
    /// forever): readable, and holding what they should.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = |flag: &str, path: &Option<PathBuf>, want: &str| -> Result<(), ConfigError> {
            let Some(path) = path else { return Ok(()) };
            let bytes = std::fs::read(path).map_err(|e| {
                ConfigError::Invalid(format!("{flag} {}: cannot read it: {e}", path.display()))
            })?;
            let found = x509_parser::pem::Pem::iter_from_buffer(&bytes)
                .filter_map(Result::ok)
                .any(|p| p.label.ends_with(want));
            if !found {
                return Err(ConfigError::Invalid(format!(
                    "{flag} {}: no PEM block \"{want}\" in it",
                    path.display()
                )));
            }
            Ok(())
        };
        check("--nats-ca-file", &self.nats_ca_file, "CERTIFICATE")?;
        check("--nats-cert-file", &self.nats_cert_file, "CERTIFICATE")?;
        check("--nats-key-file", &self.nats_key_file, "PRIVATE KEY")?;
        Ok(())
    }

    /// Adds the TLS settings to NATS connect options (the one place every NATS client of the
    /// service gets them).
    pub fn apply(&self, mut opts: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        if let Some(ca) = &self.nats_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.nats_cert_file, &self.nats_key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        if self.nats_ca_file.is_some() || self.nats_cert_file.is_some() {
            opts = opts.require_tls(true);
        }
        opts
    }
}

#[derive(Debug, Args, Clone)]
pub struct TryLoginArgs {
    /// nats-server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[command(flatten)]
    pub tls: NatsTlsArgs,
    /// Username (with --password).
    #[arg(long, requires = "password", conflicts_with_all = ["token", "nkey_seed_file"])]
    pub user: Option<String>,
    /// Password of --user.
    #[arg(long, hide_env_values = true)]
    pub password: Option<String>,
    /// A bearer token instead of --user/--password.
    // `try-login` checks that one way is given, naming all three.
    #[arg(long, conflicts_with = "nkey_seed_file")]
    pub token: Option<String>,
    /// A file holding a user nkey seed (`SU…`, as `nsc generate nkey --user` writes it): log in
    /// as the user whose `nats.users.nkey` is its public key.
    #[arg(long)]
    pub nkey_seed_file: Option<PathBuf>,
    /// Also publish one message to this subject and report whether the server allowed it.
    #[arg(long)]
    pub publish: Option<String>,
    /// The message for --publish.
    #[arg(long, default_value = "")]
    pub payload: String,
}

#[derive(Debug, Args, Clone)]
pub struct HashPasswordArgs {
    /// bcrypt cost.
    #[arg(long, default_value_t = 10)]
    pub cost: u32,
}

/// What a login gets when its rows say nothing: used by `serve` and by `explain`.
#[derive(Debug, Args, Clone)]
pub struct LoginDefaults {
    /// Lifetime of minted user JWTs when neither user, role nor account sets one.
    #[arg(long, env = "NATS_PG_AUTH_DEFAULT_TTL", default_value = "1h", value_parser = parse_duration)]
    pub default_ttl: Duration,

    /// Upper bound for any user JWT lifetime, whatever the rows say.
    #[arg(long, env = "NATS_PG_AUTH_MAX_TTL", default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,

    /// Publish permission given when a user and its role have no permissions at all.
    #[arg(
        long,
        env = "NATS_PG_AUTH_DEFAULT_PUBLISH",
        default_value = ">",
        value_delimiter = ','
    )]
    pub default_publish: Vec<String>,

    /// Subscribe permission given when a user and its role have no permissions at all.
    #[arg(
        long,
        env = "NATS_PG_AUTH_DEFAULT_SUBSCRIBE",
        default_value = ">",
        value_delimiter = ','
    )]
    pub default_subscribe: Vec<String>,
}

impl LoginDefaults {
    /// The permissions granted when a user and its role grant none.
    pub fn permissions(&self) -> crate::callout::permissions::Defaults {
        crate::callout::permissions::Defaults {
            publish: self.default_publish.clone(),
            subscribe: self.default_subscribe.clone(),
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// nats-server URL(s), comma separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    #[command(flatten)]
    pub nats_tls: NatsTlsArgs,

    #[command(flatten)]
    pub login: LoginDefaults,

    /// Maximum Postgres connections of this replica.
    #[arg(long, env = "NATS_PG_AUTH_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: u32,

    /// Callouts handled at once; more wait (up to the server's auth timeout) and are then denied.
    /// Kept below the pool size so the sync always finds a connection.
    #[arg(long, env = "NATS_PG_AUTH_CALLOUT_CONCURRENCY", default_value_t = 12)]
    pub callout_concurrency: usize,

    /// Threads for password hashing (bcrypt/argon2), separate from the async runtime, at low
    /// priority. One account runs at most all but one of them at once (a thread is always there
    /// for the other accounts), so 3 keeps two for a single tenant's reconnect storm.
    #[arg(long, env = "NATS_PG_AUTH_HASH_THREADS", default_value_t = 3)]
    pub hash_threads: usize,

    /// Highest bcrypt cost a stored password hash may ask for (4..31). A hash above it is refused
    /// at login without hashing: a hash sets its own work factor, and one row at cost 31 would
    /// otherwise cost a day of CPU per login attempt. Keep it in step with
    /// `nats.password_hash_limits()` (the schema's bound, 12 unless replaced). Cost 12 takes
    /// ~350 ms per check on a 2-core machine, each further step doubles it (2 s auth timeout).
    #[arg(long, env = "NATS_PG_AUTH_MAX_BCRYPT_COST", default_value_t = 12)]
    pub max_bcrypt_cost: u32,

    /// Highest argon2id memory (`m`, in KiB) a stored password hash may ask for; above it the
    /// login is refused without hashing. Each hashing thread may use this much memory: times
    /// --hash-threads it must stay within half the memory this process may use (its cgroup's
    /// limit, else the machine's), or the service refuses to start.
    #[arg(
        long,
        env = "NATS_PG_AUTH_MAX_ARGON2_MEMORY_KIB",
        default_value_t = 65_536
    )]
    pub max_argon2_memory_kib: u32,

    /// Highest argon2id iteration count (`t`) a stored password hash may ask for.
    #[arg(long, env = "NATS_PG_AUTH_MAX_ARGON2_ITERATIONS", default_value_t = 8)]
    pub max_argon2_iterations: u32,

    /// Highest argon2id parallelism (`p`, lanes) a stored password hash may ask for.
    #[arg(
        long,
        env = "NATS_PG_AUTH_MAX_ARGON2_PARALLELISM",
        default_value_t = 16
    )]
    pub max_argon2_parallelism: u32,

    /// Run the account sync (leader elected by a Postgres advisory lock). Turn off for
    /// callout-only replicas.
    #[arg(long, env = "NATS_PG_AUTH_SYNC", default_value_t = true, action = clap::ArgAction::Set)]
    pub sync: bool,

    /// Address of the HTTP endpoints /metrics, /healthz, /readyz (`off` to disable).
    #[arg(
        long,
        env = "NATS_PG_AUTH_HTTP_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub http_listen: String,

    /// Upper bound on how fast live connections are closed after their rights changed.
    #[arg(long, env = "NATS_PG_AUTH_KICKS_PER_SECOND", default_value_t = 500)]
    pub kicks_per_second: u32,

    /// How often the sync leader compares the server's account list with the database.
    #[arg(long, env = "NATS_PG_AUTH_RECONCILE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// Answer logins from the in-memory copy of the login data while Postgres is up (every
    /// change notifies and is applied at once). `false`: every login reads Postgres; the copy
    /// is still kept, for outages.
    #[arg(long, env = "NATS_PG_AUTH_LOGIN_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub login_cache: bool,

    /// How long after Postgres became unreachable logins are still answered from the copy
    /// (known users with the right password or a valid token; everyone else is refused).
    /// `0` turns it off: no Postgres, no logins.
    #[arg(long, env = "NATS_PG_AUTH_DB_OUTAGE_GRACE", default_value = "1h", value_parser = parse_duration)]
    pub db_outage_grace: Duration,

    /// Longest lifetime of a user JWT minted from the copy during an outage, so rights are
    /// re-read soon after Postgres returns.
    #[arg(long, env = "NATS_PG_AUTH_DB_OUTAGE_TTL", default_value = "5m", value_parser = parse_duration)]
    pub db_outage_ttl: Duration,

    /// Directory where this replica keeps a sealed snapshot of the login copy (written after
    /// each full load, then at most every 30 s when the copy changed), so that it can start and
    /// answer logins while Postgres is unreachable. Needs the encryption key (the snapshot holds
    /// signing seeds): without one nothing is written. Unset: no snapshot.
    #[arg(long, env = "NATS_PG_AUTH_SNAPSHOT_DIR")]
    pub snapshot_dir: Option<std::path::PathBuf>,

    /// Also keep the sealed snapshot in JetStream (written by the sync leader, in an account of
    /// the service's own whose keys derive from the encryption key), so a replica that starts
    /// on a new node without Postgres and without a local snapshot finds it. Needs the
    /// encryption key and JetStream on the servers; without JetStream it says so once and only
    /// `--snapshot-dir` is kept.
    #[arg(long, env = "NATS_PG_AUTH_SNAPSHOT_JETSTREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub snapshot_jetstream: bool,

    /// Replicas of the JetStream snapshot bucket when this service creates it (1..=5); 0: as many
    /// as the cluster allows, up to 3.
    #[arg(long, env = "NATS_PG_AUTH_SNAPSHOT_REPLICAS", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=5))]
    pub snapshot_replicas: u8,

    /// Remember verified passwords (as a keyed hash, in memory only) so a reconnecting client
    /// does not pay bcrypt again. Turn off where a memory dump of the service is a bigger threat
    /// than a reconnect storm; see the trade-off in README.md.
    #[arg(long, env = "NATS_PG_AUTH_CREDENTIAL_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub credential_cache: bool,

    /// Wrong passwords for one username before its logins are refused (`locked_out`) without
    /// checking, for the rest of `--lockout-duration`. 0 turns lockout off.
    #[arg(long, env = "NATS_PG_AUTH_LOCKOUT_FAILURES", default_value_t = 10)]
    pub lockout_failures: u32,

    /// How long wrong passwords are counted, and a lockout lasts (from the first failure).
    #[arg(long, env = "NATS_PG_AUTH_LOCKOUT_DURATION", default_value = "5m", value_parser = parse_duration)]
    pub lockout_duration: Duration,

    /// How long a verified password is remembered.
    #[arg(long, env = "NATS_PG_AUTH_CREDENTIAL_CACHE_TTL", default_value = "10m", value_parser = parse_duration)]
    pub credential_cache_ttl: Duration,

    /// Postgres reads per second (per replica) for usernames, tokens and nkeys the live login copy
    /// does not hold. Such a read only catches a row inserted a moment ago whose notification is
    /// still on its way; beyond this rate the copy's "no such user/token" answers, so a flood of
    /// made-up tokens or names costs no query each. 0: never read (a new row logs in once its
    /// notification has landed, milliseconds after COMMIT).
    #[arg(
        long,
        env = "NATS_PG_AUTH_UNKNOWN_READS_PER_SECOND",
        default_value_t = 50
    )]
    pub unknown_reads_per_second: u32,

    /// On SIGTERM/SIGINT: longest the replica takes to stop taking callouts, answer the ones in
    /// flight and release the sync leadership before it exits anyway.
    #[arg(long, env = "NATS_PG_AUTH_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Difference between this host's clock and nats-server's that is tolerated when checking
    /// an authorization request's expiry. Requests expired beyond it get no answer (and a warning).
    #[arg(long, env = "NATS_PG_AUTH_CLOCK_SKEW", default_value = "5s", value_parser = parse_duration)]
    pub clock_skew: Duration,

    /// This replica's name in `status`, in the lockouts `explain` and `user show` report, and
    /// in `nats.replicas`; give each replica its own (a pod name, a host name). Default: the
    /// host name and process id, `host:pid`.
    #[arg(long, env = "NATS_PG_AUTH_REPLICA_NAME")]
    pub replica_name: Option<String>,

    /// nats-server's auth timeout (`authorization { timeout }`; 2s unless set there). A request
    /// says its own (`exp - iat`); this one is used for requests still waiting to be opened.
    /// Requests the server has stopped waiting for are skipped without any work, and when
    /// requests pile up (a reconnect storm) the newest are answered first.
    #[arg(long, env = "NATS_PG_AUTH_AUTH_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub auth_timeout: Duration,

    /// NATS connections the answers go out on, in turn (besides the one requests come in on).
    /// nats-server checks the answers of one connection one after the other on one core: in a
    /// reconnect storm one connection caps logins at what that core verifies. 0 (default):
    /// answers on the requests' connection — an answer on another connection can go through
    /// another server, and is lost when that one goes away; the gain in storms is not proven
    /// yet (BENCHMARKS.md).
    #[arg(long, env = "NATS_PG_AUTH_REPLY_CONNECTIONS", default_value_t = 0)]
    pub reply_connections: usize,

    /// Answer every request in arrival order on the requests' connection, also those
    /// nats-server has stopped waiting for (the behaviour before `--auth-timeout` and
    /// `--reply-connections`; only to measure the difference).
    #[arg(long, env = "NATS_PG_AUTH_NO_SHEDDING", hide = true)]
    pub no_shedding: bool,

    /// How long after its last read of the change log a replica whose listener reconnects
    /// resumes the log instead of reloading the whole copy (see `copy::feed`). Only tests
    /// change it (0: every reconnect reloads in full).
    #[arg(long, env = "NATS_PG_AUTH_COPY_RESUME_WINDOW", default_value = "60s", value_parser = parse_duration, hide = true)]
    pub copy_resume_window: Duration,
}

impl ServeArgs {
    /// The password hash work factors these flags allow.
    pub fn hash_limits(&self) -> crate::callout::credentials::HashLimits {
        crate::callout::credentials::HashLimits {
            max_bcrypt_cost: self.max_bcrypt_cost,
            max_argon2_memory_kib: self.max_argon2_memory_kib,
            max_argon2_iterations: self.max_argon2_iterations,
            max_argon2_parallelism: self.max_argon2_parallelism,
        }
    }

    /// The cache settings these flags ask for (the rest keep their defaults).
    pub fn cache_settings(&self) -> crate::copy::CacheSettings {
        crate::copy::CacheSettings {
            logins: self.login_cache,
            outage_grace: self.db_outage_grace,
            outage_ttl: self.db_outage_ttl,
            credentials: self.credential_cache,
            credential_ttl: self.credential_cache_ttl,
            unknown_reads_per_second: self.unknown_reads_per_second,
            resume_window: self.copy_resume_window,
            ..Default::default()
        }
    }
}

/// Parses `90s`, `5m`, `1h30m`, `2days` (humantime).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 30s, 5m or 1h: {e}"))
}

/// Errors in configuration: always the user's to fix, reported as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no database given: set DATABASE_URL or pass --database-url postgres://user@host/db")]
    MissingDatabaseUrl,
    #[error("both --encryption-key and --encryption-key-file are set; use one")]
    TwoKeys,
    #[error("cannot read the encryption key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Already says "invalid encryption key: …".
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("{0}")]
    Invalid(String),
}

impl CommonArgs {
    pub fn database_url(&self) -> Result<&str, ConfigError> {
        let url = self
            .database_url
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .ok_or(ConfigError::MissingDatabaseUrl)?;
        // sqlx would try any other scheme (mysql://…) as Postgres and report a refused
        // connection; say what is wrong instead.
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("postgres" | "postgresql")) {
            return Err(ConfigError::Invalid(
                "DATABASE_URL must be a Postgres URL: postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                    .into(),
            ));
        }
        Ok(url)
    }

    /// Builds the seed cipher from the key flag or file; no key means seeds are stored plain.
    pub fn cipher(&self) -> Result<SeedCipher, ConfigError> {
        let encoded = match (&self.encryption_key, &self.encryption_key_file) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoKeys),
            (Some(k), None) => Some(k.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::KeyFile {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let key = match encoded.filter(|k| !k.is_empty()) {
            Some(k) => Some(keys::parse_key(&k)?),
            None => None,
        };
        let cipher = SeedCipher::new(key);
        match self.old_encryption_key.as_deref().map(str::trim) {
            Some(old) if !old.is_empty() => {
                if key.is_none() {
                    return Err(ConfigError::Invalid(
                        "--old-encryption-key needs --encryption-key (the key seeds are sealed with from now on)".into(),
                    ));
                }
                let old = keys::parse_key(old)
                    .map_err(|e| ConfigError::Invalid(format!("--old-encryption-key: {e}")))?;
                Ok(cipher.with_old_key(old))
            }
            _ => Ok(cipher),
        }
    }
}

impl ServeArgs {
    /// The HTTP address, or None when disabled.
    pub fn http_addr(&self) -> Result<Option<std::net::SocketAddr>, std::net::AddrParseError> {
        match self.http_listen.trim() {
            "" | "off" | "none" => Ok(None),
            a => a.parse().map(Some).or_else(|e: std::net::AddrParseError| {
                // `$(POD_IP):9464` in a Kubernetes manifest: an IPv6 pod IP comes unbracketed.
                let (ip, port) = a.rsplit_once(':').ok_or(e.clone())?;
                let ip: std::net::IpAddr = ip.parse().map_err(|_| e.clone())?;
                let port: u16 = port.parse().map_err(|_| e)?;
                Ok(Some(std::net::SocketAddr::new(ip, port)))
            }),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.login.default_ttl.is_zero() || self.login.max_ttl.is_zero() {
            return Err(ConfigError::Invalid(
                "--default-ttl and --max-ttl must be positive".into(),
            ));
        }
        if self.login.default_ttl > self.login.max_ttl {
            return Err(ConfigError::Invalid(format!(
                "--default-ttl ({}) is longer than --max-ttl ({}), which caps every user JWT; lower --default-ttl or raise --max-ttl",
                humantime::format_duration(self.login.default_ttl),
                humantime::format_duration(self.login.max_ttl)
            )));
        }
        if self.callout_concurrency == 0 || self.db_pool_size < 2 || self.hash_threads == 0 {
            return Err(ConfigError::Invalid(
                "--callout-concurrency and --hash-threads must be at least 1 and --db-pool-size at least 2"
                    .into(),
            ));
        }
        if !(4..=31).contains(&self.max_bcrypt_cost) {
            return Err(ConfigError::Invalid(format!(
                "--max-bcrypt-cost {} is not a bcrypt cost (4..31)",
                self.max_bcrypt_cost
            )));
        }
        if self.max_argon2_memory_kib < 8
            || self.max_argon2_iterations == 0
            || self.max_argon2_parallelism == 0
        {
            return Err(ConfigError::Invalid(
                "--max-argon2-memory-kib must be at least 8, --max-argon2-iterations and --max-argon2-parallelism at least 1"
                    .into(),
            ));
        }
        // argon2 allocates `m` KiB per running check and the lane runs --hash-threads at once:
        // a bound that does not fit gets the process OOM-killed by one row a tenant writes.
        let lane_bytes =
            u64::from(self.max_argon2_memory_kib) * 1024 * self.hash_threads.max(1) as u64;
        if let Some(limit) = memory_limit_bytes() {
            if lane_bytes > limit / 2 {
                return Err(ConfigError::Invalid(format!(
                    "--max-argon2-memory-kib ({} KiB) x --hash-threads ({}) = {} MiB is more than half of the {} MiB this process may use (cgroup memory limit, else the machine's memory): lower either, or give the service more memory",
                    self.max_argon2_memory_kib,
                    self.hash_threads,
                    lane_bytes >> 20,
                    limit >> 20
                )));
            }
        }
        if self.http_addr().is_err() {
            return Err(ConfigError::Invalid(format!(
                "--http-listen {:?} is not an address like 127.0.0.1:9464 (or `off`)",
                self.http_listen
            )));
        }
        self.nats_tls.validate()?;
        if let Some(name) = &self.replica_name {
            crate::replica::check_name(name).map_err(ConfigError::Invalid)?;
        }
        if self.callout_concurrency as u32 >= self.db_pool_size {
            return Err(ConfigError::Invalid(format!(
                "--callout-concurrency ({}) must be below --db-pool-size ({}) so the sync and change listener always get a connection",
                self.callout_concurrency, self.db_pool_size
            )));
        }
        Ok(())
    }
}

/// The memory this process may use: its cgroup's limit (v2, else v1), else the machine's
/// (`MemTotal`); None when none can be read.
fn memory_limit_bytes() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|s| s.trim().parse::<u64>().ok());
    let total = read("/proc/meminfo").and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    // cgroup v1 says "no limit" with a huge number; "max" (v2) does not parse.
    match (cgroup, total) {
        (Some(c), Some(t)) => Some(c.min(t)),
        (c, t) => c.or(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_listen_takes_a_pod_ip_of_either_family() {
        let addr = |v: &str| serve(&["--http-listen", v]).http_addr();
        assert_eq!(
            addr("10.1.2.3:9464").unwrap(),
            Some("10.1.2.3:9464".parse().unwrap())
        );
        assert_eq!(
            addr("[fd00::7]:9464").unwrap(),
            Some("[fd00::7]:9464".parse().unwrap())
        );
        // `$(POD_IP):9464` with an IPv6 pod IP
        assert_eq!(
            addr("fd00::7:9464").unwrap(),
            Some("[fd00::7]:9464".parse().unwrap())
        );
        assert_eq!(addr("off").unwrap(), None);
        assert!(addr("localhost:9464").is_err());
        assert!(addr("10.1.2.3").is_err());
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["nats-pg-auth", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn hash_limits_default_to_the_schema_bounds_and_are_validated() {
        let a = serve(&[]);
        assert_eq!(
            a.hash_limits(),
            crate::callout::credentials::HashLimits::default()
        );
        assert_eq!(a.hash_limits().max_bcrypt_cost, 12);
        let a = serve(&[
            "--max-bcrypt-cost",
            "12",
            "--max-argon2-memory-kib",
            "65536",
        ]);
        assert_eq!(a.hash_limits().max_bcrypt_cost, 12);
        assert_eq!(a.hash_limits().max_argon2_memory_kib, 65536);
        a.validate().expect("valid");
        for bad in [
            &["--max-bcrypt-cost", "3"][..],
            &["--max-bcrypt-cost", "32"],
            &["--max-argon2-iterations", "0"],
            &["--max-argon2-parallelism", "0"],
            &["--max-argon2-memory-kib", "4"],
            // 4 TiB per thread fits no machine.
            &["--max-argon2-memory-kib", "4294967295"],
        ] {
            let err = serve(bad).validate().expect_err("refused");
            assert!(err.to_string().contains("--max-"), "{bad:?}: {err}");
        }
    }
}
