//! Exports and imports of an account JWT (design §3), with the checks that keep a broken import
//! from breaking the whole account: an import that matches no local export, or needs a token
//! it cannot get, is left out and its row gets a `sync_error` instead.

use nkeys::KeyPair;
use sqlx::PgPool;

use crate::db;
use crate::db::sharing::{self, ExportRow, ImportRow};
use crate::jwt::claims::{ActivationClaims, Export, ExportType, Import, ResponseType};
use crate::jwt::{self, Claims};
use crate::keys::{self, SeedCipher};

fn kind(s: &str) -> ExportType {
    if s == "service" {
        ExportType::Service
    } else {
        ExportType::Stream
    }
}

fn response_type(s: &str) -> Option<ResponseType> {
    match s {
        "Singleton" => Some(ResponseType::Singleton),
        "Stream" => Some(ResponseType::Stream),
        "Chunked" => Some(ResponseType::Chunked),
        _ => None,
    }
}

pub fn export(row: &ExportRow) -> Export {
    Export {
        name: row.name.clone(),
        subject: row.subject.clone(),
        export_type: kind(&row.kind),
        token_req: row.token_req,
        response_type: row.response_type.as_deref().and_then(response_type),
        response_threshold: row.response_threshold_secs.and_then(secs_to_nanos),
        account_token_position: row.account_token_position.map(|p| p as u32),
        advertise: row.advertise,
        allow_trace: row.allow_trace,
        description: row.description.clone(),
        ..Export::default()
    }
}

/// Seconds to nanoseconds, saturating at `i64::MAX` (about 292 years; `'infinity'` on
/// Postgres 17); None for NaN and non-positive values (the schema requires > 0).
pub fn secs_to_nanos(secs: f64) -> Option<i64> {
    if secs.is_nan() || secs <= 0.0 {
        return None;
    }
    // `as` saturates float -> int conversions (and maps +inf to MAX).
    Some((secs * 1e9) as i64)
}

/// True when every subject matched by `inner` is matched by `outer` (NATS wildcards).
pub fn subject_contains(outer: &str, inner: &str) -> bool {
    let o: Vec<&str> = outer.split('.').collect();
    let i: Vec<&str> = inner.split('.').collect();
    for (n, ot) in o.iter().enumerate() {
        if *ot == ">" {
            return i.len() > n;
        }
        let Some(it) = i.get(n) else { return false };
        match (*ot, *it) {
            ("*", ">") => return false,
            ("*", _) => {}
            (a, b) if a == b => {}
            _ => return false,
        }
    }
    o.len() == i.len()
}

/// The imports that can go into the JWT, and per import row the error to record (None = ok).
pub struct ImportPlan {
    pub imports: Vec<Import>,
    pub errors: Vec<(i64, Option<String>)>,
}

/// Resolves every import of the account whose key is `importer`.
pub async fn plan_imports(
    pool: &PgPool,
    cipher: &SeedCipher,
    importer: &str,
    rows: Vec<ImportRow>,
) -> Result<ImportPlan, sqlx::Error> {
    let mut plan = ImportPlan {
        imports: vec![],
        errors: vec![],
    };
    for row in rows {
        match resolve(pool, cipher, importer, &row).await? {
            Ok(import) => {
                plan.imports.push(import);
                plan.errors.push((row.id, None));
            }
            Err(msg) => {
                tracing::warn!(import = %row.name, error = %msg, "import left out of the account JWT");
                plan.errors.push((row.id, Some(msg)));
            }
        }
    }
    Ok(plan)
}

async fn resolve(
    pool: &PgPool,
    cipher: &SeedCipher,
    importer: &str,
    row: &ImportRow,
) -> Result<Result<Import, String>, sqlx::Error> {
    let Some(exporter) = row.exporter_key.clone() else {
        return Ok(Err(
            "the exporting account has no keys yet (its first sync is pending)".into(),
        ));
    };
    let mut import = Import {
        name: row.name.clone(),
        subject: row.subject.clone(),
        account: exporter.clone(),
        token: row.token.clone().filter(|t| !t.is_empty()),
        local_subject: row.local_subject.clone(),
        import_type: kind(&row.kind),
        share: row.share && row.kind == "service",
        allow_trace: row.allow_trace && row.kind == "stream",
    };
    let Some(exporter_id) = row.exporter_account_id else {
        // Another deployment's account: we cannot see its exports; the admin supplies the token.
        return Ok(Ok(import));
    };
    // Only exports this account may see count: public ones (they are in the exporter's JWT
    // anyway) and private ones granted to it. The importer reads this error, so it must not
    // tell a private export that was not granted from no export at all, nor name one.
    let exports = sharing::exports_of(pool, exporter_id).await?;
    let mut matching = None;
    for e in exports
        .iter()
        .filter(|e| e.kind == row.kind && subject_contains(&e.subject, &row.subject))
    {
        if !e.token_req || sharing::granted(pool, e.id, row.id).await? {
            matching = Some(e);
            break;
        }
    }
    let Some(export) = matching else {
        return Ok(Err(format!(
            "no {} export of the exporting account that is public or granted to this account \
             covers subject {:?} (a private export needs a grant from the exporter's side: a row \
             in nats.account_export_grants)",
            row.kind, row.subject
        )));
    };
    if let Some(pos) = export.account_token_position {
        let token = row.subject.split('.').nth(pos as usize - 1);
        if token != Some(importer) {
            let which = if export.token_req {
                format!("the export granted to this account for {:?}", row.subject)
            } else {
                format!("export {:?}", export.name)
            };
            return Ok(Err(format!(
                "{which} requires token {pos} of the subject to be the importing account's key {importer}"
            )));
        }
    }
    if export.token_req && import.token.is_none() {
        match activation(pool, cipher, exporter_id, &exporter, importer, row).await? {
            Ok(token) => import.token = Some(token),
            Err(msg) => return Ok(Err(msg)),
        }
    }
    Ok(Ok(import))
}

/// Mints the activation token a local `token_req` export needs, signed by the exporter's
/// newest signing key. It does not expire: deleting the export (or the import) withdraws it,
/// because both accounts are then pushed again without it.
async fn activation(
    pool: &PgPool,
    cipher: &SeedCipher,
    exporter_id: i64,
    exporter: &str,
    importer: &str,
    row: &ImportRow,
) -> Result<Result<String, String>, sqlx::Error> {
    let keys = db::accounts::live_keys(pool, exporter_id).await?;
    // An imported signing key without its seed cannot sign (the import adds one that can).
    let Some(key) = keys
        .iter()
        .rev()
        .find(|k| k.kind == "signing" && !k.seed.is_empty())
    else {
        return Ok(Err("the exporting account has no signing key yet".into()));
    };
    let signer: KeyPair = match keys::keypair_from_stored(cipher, &key.seed, &key.public_key) {
        Ok(k) => k,
        Err(e) => return Ok(Err(format!("cannot open the exporter's signing key: {e}"))),
    };
    let claims = Claims {
        name: Some(row.name.clone()),
        iat: jwt::now_unix(),
        ..Claims::new(
            importer,
            ActivationClaims::new(
                row.subject.clone(),
                kind(&row.kind),
                Some(exporter.to_owned()),
            ),
        )
    };
    Ok(jwt::encode(&claims, &signer).map_err(|e| format!("cannot sign the activation token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::{export, secs_to_nanos, subject_contains};
    use crate::db::sharing::ExportRow;

    /// A response threshold of centuries (or `'infinity'`) overflowed the nanosecond
    /// conversion in SQL and failed the push of the exporter and of every importer.
    #[test]
    fn response_threshold_saturates() {
        assert_eq!(secs_to_nanos(2.0), Some(2_000_000_000));
        assert_eq!(secs_to_nanos(0.5), Some(500_000_000));
        assert_eq!(secs_to_nanos(3.15576e10), Some(i64::MAX), "1000 years");
        assert_eq!(secs_to_nanos(f64::INFINITY), Some(i64::MAX));
        assert_eq!(secs_to_nanos(f64::NAN), None);
        assert_eq!(secs_to_nanos(-1.0), None);
        let row = ExportRow {
            id: 1,
            name: "e".into(),
            subject: "svc.>".into(),
            kind: "service".into(),
            token_req: false,
            response_type: Some("Singleton".into()),
            response_threshold_secs: Some(f64::INFINITY),
            account_token_position: None,
            advertise: false,
            allow_trace: false,
            description: None,
        };
        assert_eq!(export(&row).response_threshold, Some(i64::MAX));
    }

    #[test]
    fn containment() {
        assert!(subject_contains("svc.>", "svc.echo"));
        assert!(subject_contains("svc.>", "svc.echo.x"));
        assert!(!subject_contains("svc.>", "svc"));
        assert!(subject_contains("svc.*", "svc.echo"));
        assert!(subject_contains("svc.*", "svc.*"));
        assert!(!subject_contains("svc.*", "svc.>"));
        assert!(!subject_contains("svc.*", "svc.echo.x"));
        assert!(subject_contains("svc.echo", "svc.echo"));
        assert!(!subject_contains("svc.echo", "svc.other"));
        assert!(subject_contains(">", "anything.at.all"));
    }
}
