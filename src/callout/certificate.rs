//! Client-certificate logins: the leaf certificate of a chain nats-server verified, and the
//! `nats.user_certificates` rows that map it to a user.
//!
//! nats-server puts `client_tls.verified_chains` in the request only when its TLS handshake
//! verified the chain (tls `verify: true`); without verification it sends the peer's `certs`,
//! which anyone can present, so those never identify anyone here. The leaf is the first
//! certificate of the first verified chain. Its validity window is checked again here (the
//! server's clock and ours may differ; an expired certificate must not log in either way).
//!
//! A mapping row sets any of: the SHA-256 fingerprint of the DER, the subject DN (RFC 2253, as
//! `openssl x509 -noout -subject -nameopt RFC2253` prints it), one subjectAltName (`email:…`,
//! `uri:…`, `dns:…`). It matches when every column it sets matches. When several rows match:
//! the most specific wins (a fingerprint row over any other, then the row with more columns);
//! rows of different users equally specific refuse the login (ambiguous).

use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

use crate::db::logins::CertPart;

/// Why a certificate cannot identify anyone. No variant holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("the client sent no certificate")]
    None,
    #[error("TLS client without a certificate chain verified by nats-server (tls `verify: true` is off for this listener), and without any other credential")]
    NotVerified,
    #[error("the verified leaf certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("certificate {subject:?} is not valid now (valid from {not_before} to {not_after}, unix seconds)")]
    OutsideValidity {
        subject: String,
        not_before: i64,
        not_after: i64,
    },
}

/// What a verified client certificate offers as identity (normalized for comparison).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub fingerprint: [u8; 32],
    /// RFC 2253, normalized with [`normalize_dn`].
    pub subject_dn: String,
    /// `email:…`, `uri:…`, `dns:…`, normalized with [`normalize_san`].
    pub sans: Vec<String>,
}

impl Presented {
    /// The fingerprint as lowercase hex (for logs: public).
    pub fn fingerprint_hex(&self) -> String {
        to_hex(self.fingerprint)
    }

    /// The index keys under which a matching mapping can be filed.
    pub fn keys(&self) -> Vec<CertKey> {
        let mut keys = Vec::with_capacity(2 + self.sans.len());
        keys.push(CertKey::Fingerprint(self.fingerprint));
        keys.push(CertKey::Subject(self.subject_dn.as_str().into()));
        keys.extend(self.sans.iter().map(|s| CertKey::San(s.as_str().into())));
        keys
    }

    /// The subject DN folded as the Postgres lookup folds it (`nats.dn_loose`, migration
    /// 0009): ASCII whitespace removed, ASCII letters lower-cased. ASCII only, so the fold does
    /// not depend on the database's collation.
    pub fn subject_loose(&self) -> String {
        self.subject_dn
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .map(|c| c.to_ascii_lowercase())
            .collect()
    }
}

/// The first identity column a mapping sets: where the login copy files it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertKey {
    Fingerprint([u8; 32]),
    Subject(Box<str>),
    San(Box<str>),
}

/// A `nats.user_certificates` row, normalized for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub cert_id: i64,
    pub fingerprint: Option<[u8; 32]>,
    pub subject_dn: Option<Box<str>>,
    pub san: Option<Box<str>>,
}

impl Mapping {
    /// None for a row that sets no usable identity (the schema refuses those).
    pub fn from_part(part: &CertPart) -> Option<Mapping> {
        let fingerprint = match &part.fingerprint_sha256 {
            Some(f) => Some(<[u8; 32]>::try_from(f.as_slice()).ok()?),
            None => None,
        };
        let m = Mapping {
            cert_id: part.cert_id,
            fingerprint,
            subject_dn: part.subject_dn.as_deref().map(|d| normalize_dn(d).into()),
            san: part.san.as_deref().map(|s| normalize_san(s).into()),
        };
        (m.fingerprint.is_some() || m.subject_dn.is_some() || m.san.is_some()).then_some(m)
    }

    /// None for a mapping without identity (`from_part` never makes one).
    pub fn key(&self) -> Option<CertKey> {
        match (&self.fingerprint, &self.subject_dn, &self.san) {
            (Some(f), _, _) => Some(CertKey::Fingerprint(*f)),
            (None, Some(d), _) => Some(CertKey::Subject(d.clone())),
            (None, None, Some(s)) => Some(CertKey::San(s.clone())),
            (None, None, None) => None,
        }
    }

    /// Every identity column the row sets matches the certificate.
    pub fn matches(&self, p: &Presented) -> bool {
        self.fingerprint
            .is_none_or(|f| bool::from(subtle::ConstantTimeEq::ct_eq(&f[..], &p.fingerprint[..])))
            && self.subject_dn.as_deref().is_none_or(|d| d == p.subject_dn)
            && self
                .san
                .as_deref()
                .is_none_or(|s| p.sans.iter().any(|x| x == s))
    }

    /// Higher is more specific: a fingerprint first, then the number of columns set.
    fn specificity(&self) -> (bool, u8) {
        let n = self.fingerprint.is_some() as u8
            + self.subject_dn.is_some() as u8
            + self.san.is_some() as u8;
        (self.fingerprint.is_some(), n)
    }
}

/// Outcome of choosing among matching mappings.
#[derive(Debug)]
pub enum Choice<T> {
    One(T, Mapping),
    Nothing,
    /// Equally specific rows of different users match (their user ids).
    Ambiguous(Vec<i64>),
}

/// The most specific matching mapping; `user_of` names the owner of a candidate.
pub fn choose<T>(
    candidates: Vec<(T, Mapping)>,
    presented: &Presented,
    user_of: impl Fn(&T) -> i64,
) -> Choice<T> {
    let mut matching: Vec<(T, Mapping)> = candidates
        .into_iter()
        .filter(|(_, m)| m.matches(presented))
        .collect();
    let Some(best) = matching.iter().map(|(_, m)| m.specificity()).max() else {
        return Choice::Nothing;
    };
    matching.retain(|(_, m)| m.specificity() == best);
    let mut users: Vec<i64> = matching.iter().map(|(t, _)| user_of(t)).collect();
    users.sort_unstable();
    users.dedup();
    if users.len() > 1 {
        return Choice::Ambiguous(users);
    }
    // Same user, several rows: the lowest id, for a stable log line.
    matching.sort_by_key(|(_, m)| m.cert_id);
    let (t, m) = matching.into_iter().next().expect("non-empty");
    Choice::One(t, m)
}

/// The verified leaf certificate of the request's `client_tls`, checked for validity at `now`.
pub fn presented(client_tls: Option<&serde_json::Value>, now: i64) -> Result<Presented, CertError> {
    let tls = client_tls.ok_or(CertError::None)?;
    let leaf = tls
        .get("verified_chains")
        .and_then(|c| c.as_array())
        .and_then(|chains| chains.first())
        .and_then(|chain| chain.as_array())
        .and_then(|chain| chain.first())
        .and_then(|pem| pem.as_str());
    // A TLS client without a verified chain: either the listener does not verify (then
    // nats-server 2.x does not even ask for a certificate, so neither `certs` nor
    // `verified_chains` is set), or it sent unverified `certs`. Either way no certificate can
    // identify it; saying so points the admin at `verify: true` rather than at the client.
    let Some(leaf) = leaf else {
        return Err(CertError::NotVerified);
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.as_bytes())
        .map_err(|e| CertError::Unparsable(format!("PEM: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CertError::Unparsable(format!("X.509: {e}")))?;
    let subject_dn = normalize_dn(&rfc2253(&cert));
    let validity = cert.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if now < not_before || now > not_after {
        return Err(CertError::OutsideValidity {
            subject: subject_dn,
            not_before,
            not_after,
        });
    }
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            let san = match name {
                GeneralName::RFC822Name(s) => format!("email:{s}"),
                GeneralName::URI(s) => format!("uri:{s}"),
                GeneralName::DNSName(s) => format!("dns:{s}"),
                _ => continue,
            };
            sans.push(normalize_san(&san));
        }
    }
    Ok(Presented {
        fingerprint: Sha256::digest(&pem.contents).into(),
        subject_dn,
        sans,
    })
}

/// OpenSSL's short names for the attribute types `-nameopt RFC2253` prints by name.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.15" => "businessCategory",
        "2.5.4.17" => "postalCode",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "2.5.4.97" => "organizationIdentifier",
        "1.2.840.113549.1.9.1" => "emailAddress",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        _ => return None,
    })
}

/// The subject as `openssl x509 -noout -subject -nameopt RFC2253` prints it: RDNs last to
/// first, separated by `,`, multi-valued RDNs joined by `+`, RFC 2253 escapes, bytes above
/// 0x7f as `\XX`, unknown attribute types as a dotted OID with `#` and the DER in hex.
fn rfc2253(cert: &X509Certificate<'_>) -> String {
    use x509_parser::asn1_rs::ToDer;
    let rdns: Vec<String> = cert
        .subject()
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let oid = attr.attr_type().to_id_string();
                    match (short_name(&oid), attr.as_str()) {
                        (Some(name), Ok(value)) => format!("{name}={}", escape_value(value)),
                        _ => {
                            let der = attr.attr_value().to_der_vec().unwrap_or_default();
                            format!("{oid}=#{}", to_hex(der).to_uppercase())
                        }
                    }
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// Lowercase hex (fingerprints in logs, unknown DN attributes).
pub fn to_hex(bytes: impl AsRef<[u8]>) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.as_ref().len() * 2);
    for b in bytes.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn escape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.len().saturating_sub(1);
    for (i, b) in v.bytes().enumerate() {
        match b {
            b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';' => {
                out.push('\\');
                out.push(b as char);
            }
            b'#' if i == 0 => out.push_str("\\#"),
            b' ' if i == 0 || i == last => out.push_str("\\ "),
            0..0x20 | 0x7f.. => out.push_str(&format!("\\{b:02X}")),
            _ => out.push(b as char),
        }
    }
    out
}

/// Compares what admins type with what the certificate says: attribute types in upper case,
/// whitespace around `,` `+` `=` removed, `\xx` hex escapes in upper case, the values of a
/// multi-valued RDN in one order. Values keep their case (OpenSSL prints them as stored).
pub fn normalize_dn(dn: &str) -> String {
    let mut rdns: Vec<String> = Vec::new();
    for rdn in split_unescaped(dn, ',') {
        let mut attrs: Vec<String> = split_unescaped(&rdn, '+')
            .into_iter()
            .map(|attr| match split_once_unescaped(&attr, '=') {
                Some((t, v)) => {
                    format!(
                        "{}={}",
                        t.trim().to_uppercase(),
                        upper_hex_escapes(trim_unescaped(&v))
                    )
                }
                None => attr.trim().to_owned(),
            })
            .collect();
        // The values of one RDN are a set: OpenSSL prints them in reverse DER order under
        // RFC2253 (it reverses entries, not RDNs), others in DER order.
        attrs.sort();
        rdns.push(attrs.join("+"));
    }
    rdns.join(",")
}

/// `email:` and `dns:` compare without ASCII case; `uri:` as written. The prefix without ASCII
/// case; surrounding ASCII whitespace ignored. The same rule as `nats.san_folded` (migration
/// 0009), which the Postgres lookup uses: both paths must find the same rows. ASCII only on
/// purpose: these SANs are IA5String (ASCII) in a certificate, and Unicode folding would make a
/// row match here that SQL (whose `lower()` depends on the collation) does not find, or the
/// reverse (U+212A KELVIN SIGN lower-cases to `k`).
pub fn normalize_san(san: &str) -> String {
    let trim = |s: &str| s.trim_matches(|c: char| c.is_ascii_whitespace()).to_owned();
    match san.split_once(':') {
        Some((kind, value)) => {
            let kind = trim(kind).to_ascii_lowercase();
            let value = trim(value);
            if kind == "uri" {
                format!("{kind}:{value}")
            } else {
                format!("{kind}:{}", value.to_ascii_lowercase())
            }
        }
        None => trim(san),
    }
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
            continue;
        }
        parts.last_mut().expect("never empty").push(c);
    }
    parts
}

fn split_once_unescaped(s: &str, sep: char) -> Option<(String, String)> {
    let parts = split_unescaped(s, sep);
    if parts.len() < 2 {
        return None;
    }
    let value = parts[1..].join(&sep.to_string());
    Some((parts[0].clone(), value))
}

/// Leading whitespace, and trailing whitespace that is not escaped (`\ ` stays).
fn trim_unescaped(v: &str) -> &str {
    let v = v.trim_start();
    let mut end = v.len();
    while end > 0 && v[..end].ends_with(char::is_whitespace) {
        if v[..end - 1].ends_with('\\') {
            break;
        }
        end -= v[..end].chars().next_back().map_or(1, char::len_utf8);
    }
    &v[..end]
}

fn upper_hex_escapes(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = String::with_capacity(v.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            out.push('\\');
            out.push(b[i + 1].to_ascii_uppercase() as char);
            out.push(b[i + 2].to_ascii_uppercase() as char);
            i += 3;
            continue;
        }
        if b[i] == b'\\' && i + 1 < b.len() {
            // An escaped special character: keep the pair as is.
            out.push('\\');
            let c = v[i + 1..].chars().next().expect("in bounds");
            out.push(c);
            i += 1 + c.len_utf8();
            continue;
        }
        let c = v[i..].chars().next().expect("in bounds");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_normalization_folds_type_case_and_spaces_only() {
        assert_eq!(
            normalize_dn("cn = alice , o=Acme Inc\\, Ltd, c=DE"),
            "CN=alice,O=Acme Inc\\, Ltd,C=DE"
        );
        assert_eq!(normalize_dn("CN=a+uid=b,DC=x"), "CN=a+UID=b,DC=x");
        assert_eq!(normalize_dn("UID=b+CN=a,DC=x"), "CN=a+UID=b,DC=x");
        assert_eq!(normalize_dn("CN=caf\\c3\\a9"), "CN=caf\\C3\\A9");
        assert_ne!(normalize_dn("CN=Alice"), normalize_dn("CN=alice"));
        assert_eq!(escape_value(" #a,b "), "\\ #a\\,b\\ ");
        assert_eq!(escape_value("#a"), "\\#a");
        assert_eq!(escape_value("café"), "caf\\C3\\A9");
    }

    #[test]
    fn sans_compare_email_and_dns_without_case() {
        assert_eq!(
            normalize_san("EMAIL:Alice@Example.COM"),
            "email:alice@example.com"
        );
        assert_eq!(normalize_san("uri:spiffe://Acme/x"), "uri:spiffe://Acme/x");
    }

    fn mapping(id: i64, fp: Option<u8>, dn: Option<&str>, san: Option<&str>) -> Mapping {
        Mapping {
            cert_id: id,
            fingerprint: fp.map(|b| [b; 32]),
            subject_dn: dn.map(Into::into),
            san: san.map(Into::into),
        }
    }

    #[test]
    fn every_column_must_match_and_the_most_specific_row_wins() {
        let p = Presented {
            fingerprint: [1; 32],
            subject_dn: "CN=alice".into(),
            sans: vec!["email:alice@x".into()],
        };
        assert!(mapping(1, Some(1), None, None).matches(&p));
        assert!(mapping(1, None, Some("CN=alice"), Some("email:alice@x")).matches(&p));
        assert!(!mapping(1, Some(1), Some("CN=bob"), None).matches(&p));
        assert!(!mapping(1, None, None, Some("email:bob@x")).matches(&p));
        // A fingerprint row of user 20 beats a subject row of user 10.
        let c = choose(
            vec![
                (10, mapping(1, None, Some("CN=alice"), None)),
                (20, mapping(2, Some(1), None, None)),
            ],
            &p,
            |u| *u,
        );
        assert!(matches!(c, Choice::One(20, _)));
        let c = choose(
            vec![
                (10, mapping(1, None, Some("CN=alice"), None)),
                (20, mapping(2, None, None, Some("email:alice@x"))),
            ],
            &p,
            |u| *u,
        );
        assert!(matches!(c, Choice::Ambiguous(ref u) if u == &[10, 20]));
        let c = choose(vec![(10, mapping(1, Some(2), None, None))], &p, |u| *u);
        assert!(matches!(c, Choice::Nothing));
    }

    #[test]
    fn unverified_or_missing_certificates_identify_nobody() {
        let now = 1_700_000_000;
        assert_eq!(presented(None, now), Err(CertError::None));
        let v = serde_json::json!({"version": "1.3", "certs": ["-----BEGIN CERTIFICATE-----"]});
        assert_eq!(presented(Some(&v), now), Err(CertError::NotVerified));
        let v = serde_json::json!({"version": "1.3", "cipher": "TLS_AES_128_GCM_SHA256"});
        assert_eq!(presented(Some(&v), now), Err(CertError::NotVerified));
        let v = serde_json::json!({"version": "1.3", "verified_chains": [["garbage"]]});
        assert!(matches!(
            presented(Some(&v), now),
            Err(CertError::Unparsable(_))
        ));
    }
}
