//! The CLI verbs other than `serve`'s long-running part: each returns a one-line error for
//! `main` to print. `mod.rs` dispatches and holds the shared output and error helpers;
//! `admin` holds the SQL-convenience verbs that read (list, show, explain), `edit` those that
//! change or delete rows, `password` how a password is typed or piped in; `status` the health
//! report; `lockouts` `user unlock` and the lockout lines of `user show` and `explain`;
//! `connections` and `context` the NATS-side views (CONNZ, a `nats` CLI context) through the
//! system user; `import` (src/import) the adoption of existing deployments.

/// A line on stderr that never panics (a closed stderr must not turn a done job into a crash).
macro_rules! say {
    ($($t:tt)*) => { crate::telemetry::say(format_args!($($t)*)) };
}

mod admin;
pub mod connections;
pub mod context;
mod edit;
mod lockouts;
mod password;
mod status;
mod system;

/// A wrong name or value: one line, exit 64.
fn usage(msg: String) -> CliError {
    CliError::Config(ConfigError::Invalid(msg))
}

/// The small pool an admin verb needs (one statement at a time).
async fn admin_pool(common: &crate::config::CommonArgs) -> Result<sqlx::PgPool, CliError> {
    Ok(db::connect(common.database_url()?, 2).await?)
}

use tokio_util::sync::CancellationToken;

use crate::app::{AppError, Application, ServeConfig};
use crate::config::{
    AccountCommand, Cli, Command, ConfigError, RoleCommand, TokenCommand, UserCommand,
};
use crate::db::{self, DbError};
use crate::init::{self, InitError, ServiceIdentities};

/// Every way a command can fail; `main` maps it to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    App(#[from] AppError),
    #[error("{0}")]
    Other(String),
    /// A login refused by nats-server (`try-login`): exit 77 (EX_NOPERM).
    #[error("{0}")]
    Refused(String),
    /// A service that is down (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// Input the database refuses: a name that already exists, a value a constraint forbids
    /// (exit 65, EX_DATAERR). The message says what is wrong and what is allowed, never the row.
    #[error("{0}")]
    Data(String),
    /// `explain`: the login would be refused (exit 77, like `try-login`'s refused login).
    #[error("{0}")]
    WouldRefuse(String),
    /// `try-login --publish`: logged in, but the server refused the publish (exit 78).
    #[error("{0}")]
    PublishRefused(String),
    /// Postgres unreachable, with what that means for logins.
    #[error("{0} Meanwhile every `serve` replica answers known users from its in-memory copy for --db-outage-grace (default 1h) after Postgres went away (see each replica's /readyz). Bring Postgres back before then; a replica restarted meanwhile answers only from a snapshot of its copy (--snapshot-dir or JetStream, with an encryption key; its /readyz says `from snapshot`).")]
    PostgresDown(DbError),
}

impl CliError {
    /// sysexits: 64 usage/config, 69 unavailable service, 70 internal (a bug).
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) => 64,
            CliError::Init(
                InitError::OtherOperator { .. }
                | InitError::KeyNotCurrent(_)
                | InitError::BadName
                | InitError::NeedName
                | InitError::NotInitialised,
            ) => 64,
            CliError::App(
                AppError::NatsUrl { .. }
                | AppError::NatsTls(_)
                | AppError::Key(_)
                | AppError::SeedKeys(_)
                | AppError::Init(InitError::NotInitialised)
                | AppError::Http(..)
                | AppError::Seeds(db::seeds::ReencryptError::Open(..)),
            ) => 64,
            CliError::Db(e) | CliError::App(AppError::Db(e)) | CliError::PostgresDown(e) => {
                db_exit_code(e)
            }
            CliError::Init(InitError::Db(e)) | CliError::App(AppError::Init(InitError::Db(e))) => {
                sqlx_exit_code(e)
            }
            CliError::App(AppError::Init(_)) => 64,
            CliError::Refused(_) | CliError::WouldRefuse(_) => 77,
            CliError::PublishRefused(_) => 78,
            CliError::Unavailable(_) => 69,
            CliError::Data(_) => 65,
            _ => 70,
        }
    }
}

fn db_exit_code(e: &DbError) -> i32 {
    match e {
        DbError::BadUrl(_) => 64,
        DbError::Unreachable { source, .. } => match sqlx_exit_code(source) {
            70 => 69,
            code => code,
        },
        DbError::Query(e) => sqlx_exit_code(e),
        DbError::Migrate(_) => 70,
    }
}

/// A Postgres error: the connection (69), the configuration (64: wrong password, no such
/// database, no privilege), or anything else (70).
fn sqlx_exit_code(e: &sqlx::Error) -> i32 {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => 69,
        sqlx::Error::Configuration(_) => 64,
        sqlx::Error::Database(d) => match d.code().as_deref() {
            // 42P01/3F000: a database without the nats schema (not migrated).
            Some(c)
                if c.starts_with("28")
                    || c.starts_with("3D")
                    || c == "42501"
                    || c == "42P01"
                    || c == "3F000" =>
            {
                64
            }
            Some(c) if c.starts_with("23") => 65,
            Some(c) if c.starts_with("08") || c.starts_with("57P") || c.starts_with("53") => 69,
            _ => 70,
        },
        _ => 70,
    }
}

/// A database error as one line that says what is wrong. Only Postgres's primary message is
/// used, never its DETAIL: for a constraint violation that is the whole row, password hash and
/// token digest included. Our triggers' messages already explain bad rows; the plain
/// constraints get theirs from [`constraint_message`].
pub(crate) fn sql_error(e: sqlx::Error) -> CliError {
    let Some(d) = e.as_database_error() else {
        return CliError::Db(DbError::from(e));
    };
    match d.code().as_deref() {
        Some("23505") => CliError::Data(match d.constraint() {
            Some("users_username_key") => "a user with that username already exists (usernames are unique across all accounts)".to_owned(),
            Some("accounts_name_key") => "an account with that name already exists".to_owned(),
            Some("users_nkey_unique") => "another user already has that nkey".to_owned(),
            Some(c) => format!("that row already exists (unique constraint {c})"),
            None => "that row already exists".to_owned(),
        }),
        Some("23514") if d.message().contains("violates check constraint") => {
            CliError::Data(constraint_message(d.constraint().unwrap_or("?")))
        }
        Some("42P01" | "3F000") => no_schema(),
        Some(c) if c.starts_with("23") || c == "P0001" => CliError::Data(d.message().to_owned()),
        // Anything else keeps its kind, so the exit code still tells configuration (64) and
        // an unreachable service (69) from a bug (70).
        _ => CliError::Db(DbError::from(e)),
    }
}

/// The database has no `nats` schema (or not this table): it was never migrated.
pub(crate) fn no_schema() -> CliError {
    CliError::Config(ConfigError::Invalid(
        "the database has no nats schema (or an old one): run `nats-pg-auth migrate` against it first, or check DATABASE_URL".into(),
    ))
}

/// What a plain CHECK constraint allows, for the admin who broke it.
fn constraint_message(constraint: &str) -> String {
    let allowed = match constraint {
        "username_not_blank" => "a username is one or more characters without spaces or other whitespace",
        "username_at_most_256_characters" => "a username has at most 256 characters",
        "nkey_is_user_public_key" => "an nkey is a user public key: 'U' followed by 55 characters A-Z and 2-7 (`nsc generate nkey --user` prints one)",
        "account_name_format" => "an account name is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        "certificate_san_prefix" => "a certificate SAN is 'email:', 'uri:' or 'dns:' followed by the value",
        "import_exporter_public_key_format" => "an exporter public key is 'A' followed by 55 characters A-Z and 2-7",
        c if c.ends_with("_at_least_minus_one") => "a limit is -1 (unlimited), 0 or more",
        c if c.ends_with("_positive") => "the value must be greater than zero",
        c if c.contains("_at_most_") || c.ends_with("_bounded") || c.ends_with("_bounds") => {
            "the value is longer than allowed (the constraint's name says the bound)"
        }
        _ => "see the constraint in `\\d nats.TABLE` (psql)",
    };
    format!("refused by constraint {constraint}: {allowed}")
}

/// Writes to stdout. A reader that went away (`status | head -1`) ends the output quietly.
pub(crate) fn out(text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Other(format!(
            "cannot write to standard output: {e}"
        ))),
        _ => Ok(()),
    }
}

fn bcrypt_hash(password: &str, cost: u32) -> Result<String, CliError> {
    if !(4..=31).contains(&cost) {
        return Err(ConfigError::Invalid("--cost must be between 4 and 31".into()).into());
    }
    bcrypt::hash(password, cost).map_err(|e| CliError::Other(e.to_string()))
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<(), CliError> {
    let common = &cli.common;
    // The noun-verb `create`s are the `add-*` verbs under another name.
    let command = match cli.command {
        Command::Account(AccountCommand::Create(a)) => Command::AddAccount(a),
        Command::User(UserCommand::Create(a)) => Command::AddUser(a),
        Command::Token(TokenCommand::Create(a)) => Command::AddToken(a),
        other => other,
    };
    match command {
        Command::Account(AccountCommand::Delete(a)) => edit::delete_account(common, a).await,
        Command::Role(RoleCommand::Create(a)) => edit::create_role(common, a).await,
        Command::User(UserCommand::Delete(a)) => edit::delete_user(common, a).await,
        Command::User(UserCommand::SetPassword(a)) => edit::set_password(common, a).await,
        Command::User(UserCommand::SetRole(a)) => edit::set_role(common, a).await,
        Command::Connections(a) => connections::run(common, a).await,
        Command::ExportContext(a) => context::run(common, a).await,
        Command::Account(c) => admin::account(common, c).await,
        Command::Role(c) => admin::role(common, c).await,
        Command::User(c) => admin::user(common, c).await,
        Command::Token(c) => admin::token(common, c).await,
        Command::Explain(args) => admin::explain(common, args).await,
        Command::Import(c) => crate::import::run(common, c).await,
        Command::GenerateKey => {
            out(&format!("{}\n", crate::keys::generate_key()))?;
            Ok(())
        }
        Command::HashPassword(args) => {
            let pw = password::read("Password to hash: ")?;
            out(&format!("{}\n", bcrypt_hash(&pw, args.cost)?))?;
            Ok(())
        }
        Command::Migrate => {
            let pool = db::connect(common.database_url()?, 2).await?;
            let applied = db::migrate(&pool).await?;
            if applied.is_empty() {
                say!("schema `nats` is up to date: nothing to apply");
            } else {
                let list: Vec<String> =
                    applied.iter().map(|(v, d)| format!("{v:04} {d}")).collect();
                say!(
                    "applied {} migration(s) to schema `nats`: {}; it is up to date",
                    applied.len(),
                    list.join(", ")
                );
            }
            Ok(())
        }
        Command::Init(args) => {
            let cipher = common.cipher()?;
            let pool = db::connect(common.database_url()?, 2).await?;
            db::ensure_migrated(&pool).await?;
            let options = init::InitOptions {
                xkey: args.xkey_choice(),
            };
            let report =
                init::init_with(&pool, &cipher, args.operator_name.as_deref(), options).await?;
            init::write_fragment(
                &report.identities,
                &args.fragment.resolver_dir,
                &args.fragment.out,
            )?;
            say!(
                "{} operator {:?} ({}); nats-server config fragment written to {}",
                if report.created {
                    "created"
                } else {
                    "already initialised:"
                },
                report.identities.operator_name(),
                report
                    .identities
                    .public_key(db::identities::IdentityKind::Operator),
                args.fragment.out.display()
            );
            Ok(())
        }
        Command::ExportConfig(args) => {
            let pool = db::connect(common.database_url()?, 2).await?;
            let identities = ServiceIdentities::load(&pool).await?;
            init::write_fragment(&identities, &args.fragment.resolver_dir, &args.fragment.out)?;
            Ok(())
        }
        Command::Status(args) => {
            let pool = match db::connect(common.database_url()?, 2).await {
                Err(e @ DbError::Unreachable { .. }) => return Err(CliError::PostgresDown(e)),
                other => other?,
            };
            status::status(&pool, args.json).await
        }
        Command::AddAccount(args) => {
            let pool = db::connect(common.database_url()?, 2).await?;
            sqlx::query("INSERT INTO nats.accounts (name, max_connections) VALUES ($1, $2)")
                .bind(&args.name)
                .bind(args.max_connections)
                .execute(&pool)
                .await
                .map_err(|e| {
                    let db = e.as_database_error();
                    match (db.and_then(|d| d.code()).as_deref(), db.and_then(|d| d.constraint())) {
                        (Some("23505"), _) => {
                            CliError::Data(format!("account {} already exists", args.name))
                        }
                        (Some("23514"), Some("account_name_format")) => CliError::Data(format!(
                            "invalid account name {:?}: 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
                            args.name
                        )),
                        _ => sql_error(e),
                    }
                })?;
            say!(
                "account {:?} added; the sync pushes it within a second",
                args.name
            );
            Ok(())
        }
        Command::AddUser(args) => {
            let hash = bcrypt_hash(
                &password::read(&format!("Password for user {:?}: ", args.username))?,
                args.cost,
            )?;
            let pool = db::connect(common.database_url()?, 2).await?;
            let done = sqlx::query(
                "INSERT INTO nats.users (account_id, role_id, username, password_hash) \
                 SELECT a.id, r.id, $2, $4 FROM nats.accounts a \
                 LEFT JOIN nats.roles r ON r.name = $3 AND (r.account_id = a.id OR r.account_id IS NULL) \
                 WHERE a.name = $1 AND ($3::text IS NULL OR r.id IS NOT NULL) \
                 ORDER BY r.account_id NULLS LAST LIMIT 1",
            )
            .bind(&args.account)
            .bind(&args.username)
            .bind(&args.role)
            .bind(&hash)
            .execute(&pool)
            .await
            .map_err(sql_error)?;
            if done.rows_affected() == 0 {
                return Err(ConfigError::Invalid(format!(
                    "no account {:?}{}",
                    args.account,
                    args.role
                        .as_ref()
                        .map(|r| format!(" with a role {r:?}"))
                        .unwrap_or_default()
                ))
                .into());
            }
            say!(
                "user {:?} added to account {:?}",
                args.username,
                args.account
            );
            Ok(())
        }
        Command::AddToken(args) => {
            use rand::RngCore;
            let mut raw = [0u8; 24];
            rand::thread_rng().fill_bytes(&mut raw);
            let token = data_encoding::BASE32_NOPAD.encode(&raw).to_lowercase();
            let pool = db::connect(common.database_url()?, 2).await?;
            let made: Option<(i64, Option<String>)> = sqlx::query_as(
                "INSERT INTO nats.user_tokens (user_id, token_sha256, description, expires_at) \
                 SELECT id, $2, $3, now() + make_interval(secs => $4) FROM nats.users WHERE username = $1 \
                 RETURNING id, to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            )
            .bind(&args.username)
            .bind(crate::callout::credentials::token_digest(&token).to_vec())
            .bind(&args.description)
            .bind(args.expires_in.map(|d| d.as_secs_f64()))
            .fetch_optional(&pool)
            .await
            .map_err(sql_error)?;
            let Some((id, expires_at)) = made else {
                return Err(ConfigError::Invalid(format!("no user {:?}", args.username)).into());
            };
            // The only time the token is shown: stdout, so it can be captured by a script.
            if args.json {
                let v = serde_json::json!({
                    "token": token,
                    "id": id,
                    "user": args.username,
                    "expires_at": expires_at,
                });
                out(&format!("{v}\n"))?;
            } else {
                out(&format!("{token}\n"))?;
            }
            Ok(())
        }
        Command::RotateSigningKey(args) => {
            let pool = db::connect(common.database_url()?, 2).await?;
            sqlx::query("SELECT nats.rotate_signing_key($1, $2)")
                .bind(&args.account)
                .bind(args.emergency)
                .execute(&pool)
                .await
                .map_err(sql_error)?;
            say!(
                "{} rotation of account {:?} queued; the sync leader applies it within a second",
                if args.emergency {
                    "emergency"
                } else {
                    "graceful"
                },
                args.account
            );
            Ok(())
        }
        Command::RotateOperatorKey(args) => {
            let cipher = common.cipher()?;
            let pool = db::connect(common.database_url()?, 2).await?;
            let step = if args.finish {
                crate::operator::finish(&pool, &cipher).await?
            } else {
                crate::operator::begin(&pool, &cipher).await?
            };
            let identities = ServiceIdentities::load(&pool).await?;
            init::write_fragment(&identities, &args.fragment.resolver_dir, &args.fragment.out)?;
            match step {
                crate::operator::Step::Begun { next } => say!(
                    "step 1 of 2: operator JWT now also trusts {next}; fragment written to {}. Restart nats-server with it, then run `nats-pg-auth rotate-operator-key --finish`",
                    args.fragment.out.display()
                ),
                crate::operator::Step::Finished { signing, queued } => say!(
                    "step 2 of 2: {signing} now signs; {queued} accounts queued for re-signing. When `nats-pg-auth status` shows 0 pending rows, restart nats-server with {}",
                    args.fragment.out.display()
                ),
            }
            Ok(())
        }
        Command::TryLogin(args) => try_login(args).await,
        Command::RotateEncryptionKey(args) => {
            let current = common.cipher()?;
            let finishing = args.new_key.is_none() && args.new_key_file.is_none();
            let new = if finishing {
                // No new key: seal everything with the current one (opening with the old one).
                if !current.has_key() {
                    return Err(ConfigError::Invalid(
                        "give the new key with --new-key or --new-key-file (or, to finish a rotation, set NATS_PG_AUTH_ENCRYPTION_KEY to the current key and NATS_PG_AUTH_OLD_ENCRYPTION_KEY to the previous one)".into(),
                    )
                    .into());
                }
                current.clone()
            } else {
                crate::config::CommonArgs {
                    encryption_key: args.new_key.clone(),
                    encryption_key_file: args.new_key_file.clone(),
                    old_encryption_key: None,
                    ..common.clone()
                }
                .cipher()?
            };
            if !new.has_key() {
                return Err(ConfigError::Invalid(
                    "give the new key with --new-key or --new-key-file".into(),
                )
                .into());
            }
            let pool = db::connect(common.database_url()?, 2).await?;
            // Seeds already under the new key (an earlier run, or written by a replica that
            // already runs with it) are opened with it: running this again finishes a rotation.
            let old = current.clone().also_opening(&new);
            let n = db::seeds::reencrypt(&pool, &old, &new, false)
                .await
                .map_err(|e| CliError::Other(format!("{e}; nothing was changed")))?;
            let from: Vec<&str> = current
                .key_id()
                .into_iter()
                .chain(current.old_key_ids())
                .filter(|id| Some(*id) != new.key_id())
                .collect();
            let to = new.key_id().unwrap_or_default();
            db::audit::record(
                &pool,
                db::audit::kind::ENCRYPTION_KEY_ROTATED,
                to,
                serde_json::json!({ "seeds": n, "from_key_ids": from, "to_key_id": to }),
            )
            .await;
            say!("re-encrypted {n} seeds under the key whose id is {to}. Replicas still running with another key stop sealing seeds and fail /readyz until restarted; restart every `serve` with NATS_PG_AUTH_ENCRYPTION_KEY set to the new key (see README, Seeds encrypted at rest)");
            Ok(())
        }
        Command::KeyId => {
            let cipher = common.cipher()?;
            let Some(id) = cipher.key_id() else {
                return Err(ConfigError::Invalid(
                    "no encryption key: set NATS_PG_AUTH_ENCRYPTION_KEY or --encryption-key-file"
                        .into(),
                )
                .into());
            };
            let mut text = format!("{id}\n");
            for old in cipher.old_key_ids() {
                text.push_str(&format!("{old} (NATS_PG_AUTH_OLD_ENCRYPTION_KEY)\n"));
            }
            out(&text)
        }
        Command::Serve(args) => {
            args.validate()?;
            let config = ServeConfig {
                database_url: common.database_url()?.to_owned(),
                cipher: common.cipher()?,
                args,
            };
            // A replica started while Postgres is down waits for it (it has no copy of the login
            // data yet, so it could answer nothing anyway); every other error ends `serve`.
            let mut waiting = false;
            let app = loop {
                match Application::build(config.clone()).await {
                    Err(crate::app::AppError::Db(e @ db::DbError::Unreachable { .. })) => {
                        if !waiting {
                            tracing::warn!("{e} Retrying every 2s; this replica answers no logins until it has loaded a copy of the login data.");
                            waiting = true;
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                        }
                    }
                    other => break other?,
                }
            };
            if waiting {
                tracing::info!("Postgres reachable; starting");
            }
            app.run_until_stopped(shutdown).await?;
            Ok(())
        }
    }
}

/// A user public nkey (`U` + 55 base32 characters), which USER.INFO reports for a user that
/// has no name.
fn looks_like_user_key(s: &str) -> bool {
    s.len() == 56
        && s.starts_with('U')
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// A user nkey seed from a file (`nsc generate nkey --user` output, or a `.nk` file): the first
/// word starting with `SU`.
fn read_nkey_seed(path: &std::path::Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::Invalid(format!(
            "--nkey-seed-file {}: cannot read it: {e}",
            path.display()
        ))
    })?;
    text.split_whitespace()
        .find(|w| w.starts_with("SU"))
        .map(str::to_owned)
        .ok_or_else(|| {
            ConfigError::Invalid(format!(
                "--nkey-seed-file {}: no user nkey seed (a word starting with SU) in it",
                path.display()
            ))
            .into()
        })
}

/// `try-login`: connect as the user, report what the server gave it.
async fn try_login(args: crate::config::TryLoginArgs) -> Result<(), CliError> {
    use std::time::Duration;
    // `who` names the login in messages; a token or an nkey names its user once logged in.
    let (opts, mut who) = match (&args.user, &args.password, &args.token, &args.nkey_seed_file) {
        (Some(u), Some(p), _, _) => (
            async_nats::ConnectOptions::with_user_and_password(u.clone(), p.clone()),
            format!("user {u:?}"),
        ),
        (_, _, Some(t), _) => (
            async_nats::ConnectOptions::with_token(t.clone()),
            "the token".to_owned(),
        ),
        (_, _, _, Some(path)) => {
            let seed = read_nkey_seed(path)?;
            let public = nkeys::KeyPair::from_seed(&seed)
                .map(|k| k.public_key())
                .map_err(|e| {
                    ConfigError::Invalid(format!("--nkey-seed-file {}: {e}", path.display()))
                })?;
            (
                async_nats::ConnectOptions::with_nkey(seed),
                format!("nkey {public}"),
            )
        }
        _ => {
            return Err(ConfigError::Invalid(
                "say how to log in: --user NAME with --password PASSWORD, --token TOKEN, or --nkey-seed-file FILE".into(),
            )
            .into())
        }
    };
    let by_credential = args.user.is_none();
    args.tls.validate()?;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let client = args
        .tls
        .apply(opts)
        .name("nats-pg-auth try-login")
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |e| {
            let tx = events_tx.clone();
            async move {
                let _ = tx.send(e);
            }
        })
        .connect(args.nats_url.as_str())
        .await
        .map_err(|e| match e.kind() {
            async_nats::ConnectErrorKind::AuthorizationViolation => CliError::Refused(format!(
                "{who} was refused by nats-server at {} (Authorization Violation); the reason is in the `serve` log (deny reason) of the replica that answered",
                args.nats_url
            )),
            _ => CliError::Unavailable(format!(
                "cannot reach nats-server at {}: {e}",
                args.nats_url
            )),
        })?;
    let server = client.server_info();
    let info = tokio::time::timeout(
        Duration::from_secs(3),
        client.request("$SYS.REQ.USER.INFO", "".into()),
    )
    .await;
    let data = match info {
        Ok(Ok(reply)) => serde_json::from_slice::<serde_json::Value>(&reply.payload)
            .ok()
            .and_then(|v| v.get("data").cloned()),
        _ => None,
    };
    // A token or nkey login is named by its user: USER.INFO's `user` is the minted JWT's name,
    // the username (`user_name` is the sentinel's; protocol doc §3.6).
    if let Some(name) = data
        .as_ref()
        .and_then(|d| d["user"].as_str())
        .filter(|n| by_credential && !n.is_empty() && !looks_like_user_key(n))
    {
        who = format!("user {name:?} ({})", who.trim_start_matches("the "));
    }
    let mut text = format!(
        "logged in as {who} on {} (nats-server {}, {})\n",
        args.nats_url, server.version, server.server_name
    );
    match data {
        Some(d) => {
            let list = |path: &str| -> String {
                match d.pointer(path).and_then(|v| v.as_array()) {
                    Some(a) if !a.is_empty() => a
                        .iter()
                        .filter_map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                    _ => "-".to_owned(),
                }
            };
            text += &format!(
                "account:          {}\n",
                d["account"].as_str().unwrap_or("?")
            );
            text += &format!("publish allow:    {}\n", list("/permissions/publish/allow"));
            text += &format!("publish deny:     {}\n", list("/permissions/publish/deny"));
            text += &format!(
                "subscribe allow:  {}\n",
                list("/permissions/subscribe/allow")
            );
            text += &format!(
                "subscribe deny:   {}\n",
                list("/permissions/subscribe/deny")
            );
            if let Some(exp) = d["expires"].as_i64().filter(|e| *e > 0) {
                text += &format!(
                    "JWT expires in:   {}\n",
                    humantime::format_duration(Duration::from_secs(
                        (exp as u64 / 1_000_000_000).max(1)
                    ))
                );
            }
        }
        None => {
            text += "account and permissions: not shown: this user may not publish to $SYS.REQ.USER.INFO (add it to the role's publish_permissions to see them here)\n";
        }
    }
    if let Some(subject) = &args.publish {
        while events.try_recv().is_ok() {}
        let sent = client
            .publish(subject.clone(), args.payload.clone().into())
            .await
            .is_ok()
            && client.flush().await.is_ok();
        // A refused publish comes back as an asynchronous -ERR; a round trip lets it arrive.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("$SYS.REQ.USER.INFO", "".into()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut refused = None;
        while let Ok(e) = events.try_recv() {
            if let async_nats::Event::ServerError(e) = e {
                if e.to_string()
                    .to_lowercase()
                    .contains("permissions violation")
                {
                    refused = Some(e.to_string());
                }
            }
        }
        let refusal = match (sent, refused) {
            (true, None) => {
                text += &format!("publish {subject}: allowed\n");
                None
            }
            (_, Some(why)) => Some(CliError::PublishRefused(format!(
                "publish {subject}: refused ({why})"
            ))),
            (false, None) => Some(CliError::Unavailable(format!(
                "publish {subject}: could not be sent"
            ))),
        };
        if let Some(refusal) = refusal {
            // The login's report still goes to stdout; the refusal is the error line and the
            // exit code (78), so a script can tell a refused publish from an allowed one.
            let _ = client.drain().await;
            out(&text)?;
            return Err(refusal);
        }
    }
    let _ = client.drain().await;
    out(&text)
}
