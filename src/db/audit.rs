//! `nats.audit_log`: what the service itself did to identities, for the operator who asks
//! later "when was acme's key rotated, who got kicked, why was bob locked out?".
//!
//! Rows hold names, public keys and counts, never a secret. Writing one is best effort: a
//! failed audit write is logged and the action it records still stands. Old rows are pruned by
//! the schema owner (`DELETE FROM nats.audit_log WHERE at < now() - interval '90 days'`): the
//! admin and tenant roles cannot write this table.

use sqlx::PgPool;

/// Kinds of audit rows.
pub mod kind {
    pub const SIGNING_KEY_ROTATED: &str = "signing_key_rotated";
    pub const ACCOUNT_DELETED: &str = "account_deleted";
    pub const OPERATOR_KEY_ADOPTED: &str = "operator_signing_key_adopted";
    pub const SESSIONS_KICKED: &str = "sessions_kicked";
    pub const USER_LOCKED_OUT: &str = "user_locked_out";
    pub const ACCOUNT_DELETE_REFUSED: &str = "account_delete_refused";
    pub const ENCRYPTION_KEY_ROTATED: &str = "encryption_key_rotated";
}

pub async fn record(pool: &PgPool, kind: &str, subject: &str, detail: serde_json::Value) {
    let written =
        sqlx::query("INSERT INTO nats.audit_log (kind, subject, detail) VALUES ($1, $2, $3)")
            .bind(kind)
            .bind(subject)
            .bind(detail)
            .execute(pool)
            .await;
    if let Err(e) = written {
        tracing::warn!(kind, subject, error = %e, "cannot write the audit log row; the action itself went through");
    }
}
