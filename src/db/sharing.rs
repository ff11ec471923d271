//! `nats.account_exports` and `nats.account_imports` as the sync reads them.

use sqlx::PgPool;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExportRow {
    pub id: i64,
    pub name: String,
    pub subject: String,
    pub kind: String,
    pub token_req: bool,
    pub response_type: Option<String>,
    /// Seconds, as Postgres computes them; converted to nanoseconds with saturation by the sync
    /// (`interval * 1e9` in SQL overflowed bigint for centuries and failed every importer's push).
    pub response_threshold_secs: Option<f64>,
    pub account_token_position: Option<i32>,
    pub advertise: bool,
    pub allow_trace: bool,
    pub description: Option<String>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ImportRow {
    pub id: i64,
    pub name: String,
    pub subject: String,
    pub exporter_account_id: Option<i64>,
    /// The exporter's key: the local account's, or `exporter_public_key` for a remote one.
    pub exporter_key: Option<String>,
    pub local_subject: Option<String>,
    pub kind: String,
    pub share: bool,
    pub allow_trace: bool,
    pub token: Option<String>,
    pub sync_error: Option<String>,
}

pub async fn exports_of(pool: &PgPool, account_id: i64) -> Result<Vec<ExportRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, name, subject, type AS kind, token_req, response_type, \
                EXTRACT(EPOCH FROM response_threshold)::float8 AS response_threshold_secs, \
                account_token_position, advertise, allow_trace, description \
         FROM nats.account_exports WHERE account_id = $1 ORDER BY name",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await
}

/// Imports of an account. An `exporter_public_key` that is the identity key of an account of
/// this database is treated as that account (`exporter_account_id`): its exports, grants and
/// activation rules apply, so naming a local exporter by key cannot smuggle in a token.
pub async fn imports_of(pool: &PgPool, account_id: i64) -> Result<Vec<ImportRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT i.id, i.name, i.subject, COALESCE(i.exporter_account_id, k.account_id) AS exporter_account_id, \
                COALESCE(e.public_key, i.exporter_public_key) AS exporter_key, \
                i.local_subject, i.type AS kind, i.share, i.allow_trace, i.token, i.sync_error \
         FROM nats.account_imports i LEFT JOIN nats.accounts e ON e.id = i.exporter_account_id \
         LEFT JOIN nats.account_keys k ON k.public_key = i.exporter_public_key AND k.kind = 'identity' \
         WHERE i.account_id = $1 ORDER BY i.name",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await
}

/// True when the exporter granted export `export_id` to the account holding import `import_id`
/// (`nats.account_export_grants`).
pub async fn granted(pool: &PgPool, export_id: i64, import_id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM nats.account_export_grants g \
                        JOIN nats.account_imports i ON i.account_id = g.importer_account_id \
                        WHERE g.export_id = $1 AND i.id = $2)",
    )
    .bind(export_id)
    .bind(import_id)
    .fetch_one(pool)
    .await
}

/// Records (or clears, with None) why an import was left out of the pushed JWT.
pub async fn set_import_error(
    conn: impl sqlx::PgExecutor<'_>,
    import_id: i64,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE nats.account_imports SET sync_error = $2 WHERE id = $1 AND sync_error IS DISTINCT FROM $2")
        .bind(import_id)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(())
}

/// Accounts importing from `exporter`: they must be pushed again when it changes.
pub async fn enqueue_importers(
    pool: &PgPool,
    exporter: i64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO nats.sync_outbox (account_id, op, reason) \
         SELECT DISTINCT account_id, 'upsert', $2 FROM nats.account_imports WHERE exporter_account_id = $1",
    )
    .bind(exporter)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}
