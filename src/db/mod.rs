//! Postgres access: plain async functions over `&PgPool` / `&mut PgConnection`, one file per
//! table group. SQL lives here and nowhere else.

pub mod accounts;
pub mod admin;
pub mod audit;
pub mod identities;
pub mod logins;
pub mod notify;
pub mod outbox;
pub mod seeds;
pub mod sharing;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Migrations are compiled into the binary so `migrate` needs no files next to it.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    BadUrl(String),
    #[error("cannot reach Postgres at {target}: {source}. Is it running, and are host, port, user and password right?")]
    Unreachable { target: String, source: sqlx::Error },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

/// Opens a pool. `acquire_timeout` is short because a callout that waits longer than the
/// server's auth timeout (2 s) is useless anyway; better to deny and log.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(e.to_string()))?;
    let target = format!(
        "{}:{} (database {})",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("postgres")
    );
    let opts = opts.application_name("nats-pg-auth");
    match PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_millis(1500))
        .connect_with(opts.clone())
        .await
    {
        Ok(pool) => Ok(pool),
        // The pool only says it timed out; one plain connection says why (refused, no such
        // host, wrong password).
        Err(sqlx::Error::PoolTimedOut) => {
            use sqlx::Connection as _;
            let source = match tokio::time::timeout(
                Duration::from_millis(1500),
                sqlx::PgConnection::connect_with(&opts),
            )
            .await
            {
                Ok(Err(e)) => e,
                _ => sqlx::Error::PoolTimedOut,
            };
            Err(DbError::Unreachable { target, source })
        }
        Err(source) => Err(DbError::Unreachable { target, source }),
    }
}

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// For `serve` and `init`: runs the migrations only when some are not applied yet. So the
/// service can run as `nats_pg_auth_service`, which may not run DDL, against a schema that
/// `migrate` (run by the schema owner) brought up to date.
pub async fn ensure_migrated(pool: &PgPool) -> Result<(), DbError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if exists {
        let applied: Result<Vec<i64>, sqlx::Error> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(pool)
                .await;
        if let Ok(applied) = applied {
            if MIGRATOR
                .iter()
                .filter(|m| m.migration_type.is_up_migration())
                .all(|m| applied.contains(&m.version))
            {
                return Ok(());
            }
        }
    }
    migrate(pool).await
}
