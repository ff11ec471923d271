//! The CLI verbs other than `serve`'s long-running part: each returns a one-line error for
//! `main` to print.

use std::io::Read as _;

use tokio_util::sync::CancellationToken;

use crate::app::{AppError, Application, ServeConfig};
use crate::config::{Cli, Command, ConfigError};
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
    /// Postgres unreachable, with what that means for logins.
    #[error("{0} Meanwhile every `serve` replica answers known users from its in-memory copy for --db-outage-grace (default 1h) after Postgres went away (see each replica's /readyz). Bring Postgres back before then, and do not restart replicas meanwhile: a restarted replica has no copy.")]
    PostgresDown(DbError),
}

impl CliError {
    /// sysexits: 64 usage/config, 69 unavailable service, 70 internal.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) => 64,
            CliError::Init(
                InitError::OtherOperator { .. } | InitError::BadName | InitError::NotInitialised,
            ) => 64,
            CliError::App(AppError::NatsUrl { .. } | AppError::Key(_) | AppError::Init(_)) => 64,
            CliError::Db(DbError::Unreachable { .. })
            | CliError::PostgresDown(_)
            | CliError::App(AppError::Db(DbError::Unreachable { .. })) => 69,
            _ => 70,
        }
    }
}

/// name, active, public key, synced at, sync error
type StatusRow = (
    String,
    bool,
    Option<String>,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<String>,
);

/// A database error as the one line Postgres wrote for it (our triggers explain bad rows).
fn sql_error(e: sqlx::Error) -> CliError {
    match e.as_database_error() {
        Some(d) => CliError::Other(d.message().to_owned()),
        None => CliError::Db(DbError::from(e)),
    }
}

fn read_stdin_line() -> Result<String, CliError> {
    let mut pw = String::new();
    std::io::stdin()
        .read_to_string(&mut pw)
        .map_err(|e| CliError::Other(format!("cannot read standard input: {e}")))?;
    let pw = pw.trim_end_matches(['\n', '\r']).to_owned();
    if pw.is_empty() {
        return Err(CliError::Other("no password on standard input".into()));
    }
    Ok(pw)
}

fn bcrypt_hash(password: &str, cost: u32) -> Result<String, CliError> {
    if !(4..=31).contains(&cost) {
        return Err(ConfigError::Invalid("--cost must be between 4 and 31".into()).into());
    }
    bcrypt::hash(password, cost).map_err(|e| CliError::Other(e.to_string()))
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<(), CliError> {
    let common = &cli.common;
    match cli.command {
        Command::GenerateKey => {
            println!("{}", crate::keys::generate_key());
            Ok(())
        }
        Command::HashPassword(args) => {
            let pw = read_stdin_line()?;
            println!("{}", bcrypt_hash(&pw, args.cost)?);
            Ok(())
        }
        Command::Migrate => {
            let pool = db::connect(common.database_url()?, 2).await?;
            db::migrate(&pool).await?;
            eprintln!("schema `nats` is up to date");
            Ok(())
        }
        Command::Init(args) => {
            let cipher = common.cipher()?;
            let pool = db::connect(common.database_url()?, 2).await?;
            db::ensure_migrated(&pool).await?;
            let report = init::init(&pool, &cipher, &args.operator_name).await?;
            init::write_fragment(
                &report.identities,
                &args.fragment.resolver_dir,
                &args.fragment.out,
            )?;
            eprintln!(
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
        Command::Status => {
            let pool = match db::connect(common.database_url()?, 2).await {
                Err(e @ DbError::Unreachable { .. }) => return Err(CliError::PostgresDown(e)),
                other => other?,
            };
            let identities = ServiceIdentities::load(&pool).await?;
            println!(
                "operator {:?} {}",
                identities.operator_name(),
                identities.public_key(db::identities::IdentityKind::Operator)
            );
            let rows: Vec<StatusRow> = sqlx::query_as(
                "SELECT name, active, public_key, synced_at, sync_error FROM nats.accounts ORDER BY name",
            )
            .fetch_all(&pool)
            .await
            .map_err(DbError::from)?;
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM nats.sync_outbox")
                .fetch_one(&pool)
                .await
                .map_err(DbError::from)?;
            println!("{} accounts, {} pending sync rows", rows.len(), pending);
            for (name, active, pk, synced, err) in rows {
                println!(
                    "{name}\t{}\t{}\t{}\t{}",
                    if active { "active" } else { "inactive" },
                    pk.unwrap_or_else(|| "(no key yet)".into()),
                    synced
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_else(|| "never synced".into()),
                    err.unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::AddAccount(args) => {
            let pool = db::connect(common.database_url()?, 2).await?;
            sqlx::query("INSERT INTO nats.accounts (name, max_connections) VALUES ($1, $2)")
                .bind(&args.name)
                .bind(args.max_connections)
                .execute(&pool)
                .await
                .map_err(sql_error)?;
            eprintln!(
                "account {:?} added; the sync pushes it within a second",
                args.name
            );
            Ok(())
        }
        Command::AddUser(args) => {
            let hash = bcrypt_hash(&read_stdin_line()?, args.cost)?;
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
                return Err(CliError::Other(format!(
                    "no account {:?}{}",
                    args.account,
                    args.role
                        .as_ref()
                        .map(|r| format!(" with a role {r:?}"))
                        .unwrap_or_default()
                )));
            }
            eprintln!(
                "user {:?} added to account {:?}",
                args.username, args.account
            );
            Ok(())
        }
        Command::AddToken(args) => {
            use rand::RngCore;
            let mut raw = [0u8; 24];
            rand::thread_rng().fill_bytes(&mut raw);
            let token = data_encoding::BASE32_NOPAD.encode(&raw).to_lowercase();
            let pool = db::connect(common.database_url()?, 2).await?;
            let done = sqlx::query(
                "INSERT INTO nats.user_tokens (user_id, token_sha256, description, expires_at) \
                 SELECT id, $2, $3, now() + make_interval(secs => $4) FROM nats.users WHERE username = $1",
            )
            .bind(&args.username)
            .bind(crate::callout::credentials::token_digest(&token).to_vec())
            .bind(&args.description)
            .bind(args.expires_in.map(|d| d.as_secs_f64()))
            .execute(&pool)
            .await
            .map_err(sql_error)?;
            if done.rows_affected() == 0 {
                return Err(CliError::Other(format!("no user {:?}", args.username)));
            }
            // The only time the token is shown: stdout, so it can be captured by a script.
            println!("{token}");
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
            eprintln!(
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
                crate::operator::Step::Begun { next } => eprintln!(
                    "step 1 of 2: operator JWT now also trusts {next}; fragment written to {}. Restart nats-server with it, then run `nats-pg-auth rotate-operator-key --finish`",
                    args.fragment.out.display()
                ),
                crate::operator::Step::Finished { signing, queued } => eprintln!(
                    "step 2 of 2: {signing} now signs; {queued} accounts queued for re-signing. When `nats-pg-auth status` shows 0 pending rows, restart nats-server with {}",
                    args.fragment.out.display()
                ),
            }
            Ok(())
        }
        Command::RotateEncryptionKey(args) => {
            let old = common.cipher()?;
            let new_args = crate::config::CommonArgs {
                encryption_key: args.new_key.clone(),
                encryption_key_file: args.new_key_file.clone(),
                ..common.clone()
            };
            let new = new_args.cipher()?;
            if !new.has_key() {
                return Err(ConfigError::Invalid(
                    "give the new key with --new-key or --new-key-file".into(),
                )
                .into());
            }
            let pool = db::connect(common.database_url()?, 2).await?;
            let n = db::seeds::reencrypt(&pool, &old, &new, false)
                .await
                .map_err(|e| CliError::Other(format!("{e}; nothing was changed")))?;
            eprintln!("re-encrypted {n} seeds; restart every `serve` with the new key");
            Ok(())
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
