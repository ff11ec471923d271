//! Postgres access: plain async functions over `&PgPool` / `&mut PgConnection`, one file per
//! table group. SQL lives here and nowhere else.

pub mod accounts;
pub mod admin;
pub mod audit;
pub mod changes;
pub mod identities;
pub mod lockouts;
pub mod logins;
pub mod notify;
pub mod outbox;
pub mod replicas;
pub mod seeds;
pub mod sharing;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

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

/// How long a statement of the service may wait for a table or row lock before Postgres gives
/// up on it (`lock_timeout`). A tenant admin may hold `LOCK TABLE nats.roles IN ACCESS
/// EXCLUSIVE MODE` (its table-level UPDATE allows it), and an operator's `ALTER TABLE` holds the
/// same lock: no read of the service may wait for them without bound. 500 ms is well inside
/// nats-server's 2 s auth timeout, so a login's read gives up in time to be answered from the
/// copy (and a user whose change is notified but not re-read is refused: fail closed). Plain
/// reads never wait for row locks, so only such table locks (and the service's few writes
/// meeting a row lock) ever reach this bound.
pub const LOCK_TIMEOUT: Duration = Duration::from_millis(500);
/// The longest any one statement of the service may run (`statement_timeout`): a backstop for
/// whatever is slow without waiting for a lock. A login's read is already abandoned by the
/// callout after at most 1 s (`Callout::db_read`); this frees its connection soon after. The
/// longest regular statements (a bulk re-queue of every account, a partial re-read of a big
/// account) take well under a second at 100,000 rows.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The statement bound inside a full load of the login copy, which streams every user (1M users
/// load in ~4.4 s, BENCHMARKS.md): set with `SET LOCAL` in the load's own transaction.
pub const FULL_LOAD_STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets [`LOCK_TIMEOUT`] and [`STATEMENT_TIMEOUT`] on a session of the service (every pooled
/// connection, every LISTEN connection, the sync leader's lock connection).
pub async fn bound_session<'c, E>(conn: E) -> Result<(), sqlx::Error>
where
    E: Executor<'c, Database = sqlx::Postgres>,
{
    let sql = format!(
        "SELECT set_config('lock_timeout', '{}ms', false), \
                set_config('statement_timeout', '{}ms', false)",
        LOCK_TIMEOUT.as_millis(),
        STATEMENT_TIMEOUT.as_millis()
    );
    conn.execute(sql.as_str()).await?;
    Ok(())
}

/// Opens the pool of `serve`: like [`connect`], and every connection bounded by
/// [`bound_session`] before its first use.
pub async fn connect_service(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    open(url, max_connections, true).await
}

/// The pool of `serve` when Postgres is unreachable at start and the replica answers from its
/// snapshot (`copy::snapshot`): no connection now; each use tries to connect, bounded like
/// [`connect_service`].
pub fn connect_service_lazy(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(e.to_string()))?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_millis(1500))
        .after_connect(|conn, _meta| Box::pin(async move { bound_session(conn).await }))
        .connect_lazy_with(opts.application_name("nats-pg-auth")))
}

/// Opens a pool. `acquire_timeout` is short because a callout that waits longer than the
/// server's auth timeout (2 s) is useless anyway; better to deny and log.
/// Used by the CLI verbs and migrations (unbounded: a migration may rewrite a big table).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    open(url, max_connections, false).await
}

async fn open(url: &str, max_connections: u32, bounded: bool) -> Result<PgPool, DbError> {
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
    let mut options = PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_millis(1500));
    if bounded {
        options =
            options.after_connect(|conn, _meta| Box::pin(async move { bound_session(conn).await }));
    }
    match options.connect_with(opts.clone()).await {
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

/// Applies the pending migrations; returns the ones it applied (version, description), in order.
pub async fn migrate(pool: &PgPool) -> Result<Vec<(i64, String)>, DbError> {
    let before = applied_versions(pool).await;
    MIGRATOR.run(pool).await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !before.contains(&m.version))
        .map(|m| (m.version, m.description.to_string()))
        .collect())
}

/// The migrations recorded as applied (none when the table does not exist yet).
async fn applied_versions(pool: &PgPool) -> Vec<i64> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap_or(false);
    if !exists {
        return vec![];
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

/// For `serve` and `init`: runs the migrations only when some are not applied yet. So the
/// service can run as `nats_pg_auth_service`, which may not run DDL, against a schema that
/// `migrate` (run by the schema owner) brought up to date. The migrator gets a connection of
/// its own, without the service's statement bounds (see [`connect_service`]).
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
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect_with(&pool.connect_options()).await?;
    let migrated = MIGRATOR.run(&mut conn).await;
    let _ = conn.close().await;
    migrated?;
    Ok(())
}
