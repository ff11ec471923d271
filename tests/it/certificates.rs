//! Client-certificate logins through the real callout: nats-server with `tls { verify: true }`
//! verifies the chain, the service maps the leaf to a user by fingerprint, subject DN or SAN.
//! Certificates are made with the `openssl` CLI (3.0 is enough) in the test's directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::ConnectOptions;
use futures::StreamExt;

use crate::common::{
    client_options, disconnected_by, is_auth_refusal, user_info, wait_until, with_events, DbOutage,
    EnvOptions, TestEnv,
};
use nats_pg_auth::callout::certificate::{self, CertError};
use nats_pg_auth::config::NatsTlsArgs;

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A CA, nats-server's certificate (127.0.0.1/localhost), the service's client certificate and
/// user certificates, in `dir`.
struct Pki {
    dir: PathBuf,
}

const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";

impl Pki {
    fn new(dir: &Path) -> Pki {
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "30",
                "-subj",
                "/CN=nats-pg-auth test CA",
            ],
        );
        pki.leaf(
            "server",
            "/CN=localhost",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        );
        pki.leaf("service", "/CN=nats-pg-auth service", CLIENT_EXT);
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A new key `name.key` and its signing request for `subject`; returns the request's file
    /// and the certificate file to write (`name.csr`, `name.pem`).
    fn key_and_request(&self, name: &str, subject: &str) -> (String, String) {
        let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                subject,
            ],
        );
        (csr, format!("{name}.pem"))
    }

    /// `name.key` and `name.pem`, signed by the CA, valid for two days.
    fn leaf(&self, name: &str, subject: &str, ext: &str) {
        let (csr, pem) = self.key_and_request(name, subject);
        let extfile = format!("{name}.ext");
        std::fs::write(self.dir.join(&extfile), ext).unwrap();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &extfile,
            ],
        );
    }

    /// A client certificate that expired in 2020 (`openssl ca` takes explicit dates; `x509
    /// -req` only has -days before OpenSSL 3.4).
    fn expired(&self, name: &str, subject: &str) {
        let d = &self.dir;
        std::fs::create_dir_all(d.join("newcerts")).unwrap();
        std::fs::write(d.join("index.txt"), "").unwrap();
        std::fs::write(d.join("serial"), "1000\n").unwrap();
        std::fs::write(
            d.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = CA_default\n[CA_default]\ndir = {dir}\ndatabase = {dir}/index.txt\n\
                 new_certs_dir = {dir}/newcerts\nserial = {dir}/serial\ndefault_md = sha256\n\
                 policy = policy_any\nunique_subject = no\nx509_extensions = client_ext\n\
                 [policy_any]\ncommonName = supplied\n[client_ext]\n{CLIENT_EXT}",
                dir = d.display()
            ),
        )
        .unwrap();
        let (csr, pem) = self.key_and_request(name, subject);
        openssl(
            d,
            &[
                "ca",
                "-batch",
                "-notext",
                "-config",
                "ca.cnf",
                "-cert",
                "ca.pem",
                "-keyfile",
                "ca.key",
                "-in",
                &csr,
                "-out",
                &pem,
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200102000000Z",
            ],
        );
    }

    /// What `openssl x509 -noout <what>` prints about `name.pem`.
    fn print(&self, name: &str, what: &[&str]) -> String {
        let pem = format!("{name}.pem");
        let mut args = vec!["x509", "-noout"];
        args.extend_from_slice(what);
        args.extend(["-in", pem.as_str()]);
        openssl(&self.dir, &args)
    }

    /// The SHA-256 fingerprint as `openssl x509 -fingerprint` prints it, as hex for SQL.
    fn fingerprint_hex(&self, name: &str) -> String {
        let out = self.print(name, &["-fingerprint", "-sha256"]);
        out.trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_lowercase()
    }

    /// The subject as the admin guide says to read it.
    fn subject(&self, name: &str) -> String {
        let out = self.print(name, &["-subject", "-nameopt", "RFC2253"]);
        out.trim().strip_prefix("subject=").unwrap().to_owned()
    }

    fn tls_block(&self, verify: bool) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {verify}\n  timeout: 2\n}}\n",
            self.path("server.pem").display(),
            self.path("server.key").display(),
            self.path("ca.pem").display()
        )
    }

    fn service_tls(&self) -> NatsTlsArgs {
        NatsTlsArgs {
            nats_ca_file: Some(self.path("ca.pem")),
            nats_cert_file: Some(self.path("service.pem")),
            nats_key_file: Some(self.path("service.key")),
        }
    }

    fn client(&self, name: Option<&str>, opts: ConnectOptions) -> ConnectOptions {
        let opts = client_options(opts)
            .add_root_certificates(self.path("ca.pem"))
            .require_tls(true);
        match name {
            Some(n) => opts.add_client_certificate(
                self.path(&format!("{n}.pem")),
                self.path(&format!("{n}.key")),
            ),
            None => opts,
        }
    }
}

async fn start(pki: &Pki, verify: bool) -> TestEnv {
    start_tweaked(pki, verify, |_| {}).await
}

/// `start` with every login read from Postgres (`--login-cache false`; the copy is still kept
/// and answers while Postgres is away).
async fn start_reading_postgres(pki: &Pki) -> TestEnv {
    start_tweaked(pki, true, |args| args.login_cache = false).await
}

async fn start_tweaked(
    pki: &Pki,
    verify: bool,
    tweak: fn(&mut nats_pg_auth::config::ServeArgs),
) -> TestEnv {
    let env = TestEnv::start_with(EnvOptions {
        nats_extra: pki.tls_block(verify),
        nats_tls: pki.service_tls(),
        tweak,
        ..Default::default()
    })
    .await;
    env.acme().await;
    env.sql(
        "INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
           SELECT id, 'device', '{sensors.>,$SYS.REQ.USER.INFO}', '{sensors.>,_INBOX.>}'
           FROM nats.accounts WHERE name = 'acme';
         INSERT INTO nats.users (account_id, role_id, username)
           SELECT a.id, r.id, u FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id AND r.name = 'device',
             unnest(ARRAY['dev-fp', 'dev-dn', 'dev-email', 'dev-uri']) AS u WHERE a.name = 'acme';
         UPDATE nats.users SET publish_permissions = '{$SYS.REQ.USER.INFO}' WHERE username = 'alice';",
    )
    .await;
    env
}

/// `start`, with certificate `fp` (made in a new temporary directory) mapped to `dev-fp` by
/// its fingerprint. The directory lives as long as the returned guard.
async fn fingerprint_mapped(verify: bool) -> (tempfile::TempDir, Pki, TestEnv) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.leaf("fp", "/CN=device by fingerprint", CLIENT_EXT);
    let env = start(&pki, verify).await;
    env.sql(&format!(
        "INSERT INTO nats.user_certificates (user_id, fingerprint_sha256)
           SELECT id, decode('{}', 'hex') FROM nats.users WHERE username = 'dev-fp'",
        pki.fingerprint_hex("fp")
    ))
    .await;
    (dir, pki, env)
}

/// A client presenting `cert` alone is refused with `Authorization Violation` (`what` says why
/// it must be).
async fn refused(env: &TestEnv, pki: &Pki, cert: &str, what: &str) {
    let err = pki
        .client(Some(cert), ConnectOptions::new())
        .connect(env.url())
        .await
        .expect_err(what);
    assert!(is_auth_refusal(&err), "{what}: {err}");
}

/// `who` logs in with `cert` alone, is that user, and has its role's rights.
async fn logs_in_as(env: &TestEnv, pki: &Pki, cert: &str, who: &str) {
    let client = pki
        .client(Some(cert), ConnectOptions::new())
        .connect(env.url())
        .await
        .unwrap_or_else(|e| panic!("{cert} logs in: {e}"));
    let info = user_info(&client).await;
    assert_eq!(info["user"].as_str(), Some(who), "{cert}: {info}");
    let mut sub = client.subscribe("sensors.>").await.unwrap();
    client.publish("sensors.t1", "1".into()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .expect("allowed subject delivered")
        .unwrap();
}

#[tokio::test]
async fn verified_certificates_map_to_users_by_fingerprint_subject_or_san() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.leaf("fp", "/CN=device by fingerprint", CLIENT_EXT);
    pki.leaf("dn", "/C=DE/O=Acme, Inc./CN=dev-dn", CLIENT_EXT);
    pki.leaf(
        "email",
        "/CN=mailer",
        &format!("{CLIENT_EXT}subjectAltName=email:Dev@Acme.example\n"),
    );
    pki.leaf(
        "uri",
        "/CN=workload",
        &format!("{CLIENT_EXT}subjectAltName=URI:spiffe://acme/dev-uri\n"),
    );
    pki.leaf("stranger", "/CN=stranger", CLIENT_EXT);
    pki.expired("expired", "/CN=device by fingerprint");
    let subject = pki.subject("dn");
    assert_eq!(subject, "CN=dev-dn,O=Acme\\, Inc.,C=DE");

    let env = start(&pki, true).await;
    env.sql(&format!(
        "INSERT INTO nats.user_certificates (user_id, fingerprint_sha256, description)
           SELECT id, decode('{fp}', 'hex'), 'fingerprint' FROM nats.users WHERE username = 'dev-fp';
         INSERT INTO nats.user_certificates (user_id, subject_dn)
           SELECT id, '{dn}' FROM nats.users WHERE username = 'dev-dn';
         INSERT INTO nats.user_certificates (user_id, san)
           SELECT id, 'email:dev@acme.example' FROM nats.users WHERE username = 'dev-email';
         INSERT INTO nats.user_certificates (user_id, san, subject_dn)
           SELECT id, 'uri:spiffe://acme/dev-uri', 'cn = workload' FROM nats.users WHERE username = 'dev-uri';
         INSERT INTO nats.user_certificates (user_id, fingerprint_sha256)
           SELECT id, decode('{expired}', 'hex') FROM nats.users WHERE username = 'dev-fp';",
        fp = pki.fingerprint_hex("fp"),
        // As an admin might type it: other case and spacing.
        dn = subject.replace("CN=", "cn = ").replace(',', ", ").replace("\\, ", "\\,"),
        expired = pki.fingerprint_hex("expired"),
    ))
    .await;

    logs_in_as(&env, &pki, "fp", "dev-fp").await;
    logs_in_as(&env, &pki, "dn", "dev-dn").await;
    logs_in_as(&env, &pki, "email", "dev-email").await;
    logs_in_as(&env, &pki, "uri", "dev-uri").await;

    // A user/password wins over the certificate.
    let alice = pki
        .client(
            Some("fp"),
            ConnectOptions::with_user_and_password("alice".into(), "s3cret".into()),
        )
        .connect(env.url())
        .await
        .expect("alice logs in over TLS");
    assert_eq!(user_info(&alice).await["user"].as_str(), Some("alice"));

    refused(&env, &pki, "stranger", "an unmapped certificate is refused").await;
    assert_eq!(env.metrics.denied("unknown_certificate"), 1);

    // nats-server refuses an expired certificate in the handshake; the service would too.
    let expired = pki
        .client(Some("expired"), ConnectOptions::new())
        .connect(env.url())
        .await;
    assert!(expired.is_err(), "an expired certificate gets nowhere");
    let pem = std::fs::read_to_string(pki.path("expired.pem")).unwrap();
    let tls = serde_json::json!({"version": "1.3", "verified_chains": [[pem]]});
    assert!(matches!(
        certificate::presented(Some(&tls), nats_pg_auth::jwt::now_unix()),
        Err(CertError::OutsideValidity { .. })
    ));

    // `explain --certificate` applies the same mapping rules.
    let explain = |file: &str| {
        let path = pki.path(file);
        let (code, out, err) = crate::common::run_cli(
            &["explain", "--json", "--certificate", path.to_str().unwrap()],
            Some(&env.database_url),
            "",
        );
        let v = serde_json::from_str::<serde_json::Value>(&out).unwrap();
        let refused = v["allowed"] != true;
        assert_eq!(code, Some(if refused { 77 } else { 0 }), "{err}");
        v
    };
    for (file, user) in [
        ("fp.pem", "dev-fp"),
        ("dn.pem", "dev-dn"),
        ("uri.pem", "dev-uri"),
    ] {
        let v = explain(file);
        assert_eq!(
            (v["user"].as_str(), v["allowed"].as_bool()),
            (Some(user), Some(true)),
            "{v}"
        );
    }
    assert_eq!(
        explain("stranger.pem")["deny_reason"],
        "unknown_certificate"
    );
    assert_eq!(explain("expired.pem")["deny_reason"], "certificate_expired");

    // Postgres away: the mapping is answered from the login copy.
    let fp_pem = std::fs::read_to_string(pki.path("fp.pem")).unwrap();
    let tls = serde_json::json!({"version": "1.3", "verified_chains": [[fp_pem]]});
    let presented = certificate::presented(Some(&tls), nats_pg_auth::jwt::now_unix()).unwrap();
    let cache = env.callout.as_ref().unwrap().cache().clone();
    wait_until(
        Duration::from_secs(5),
        "the copy to hold the mapping",
        || {
            let (cache, presented) = (cache.clone(), presented.clone());
            async move {
                cache.is_live()
                    && matches!(
                        cache.copy_certificate(&presented),
                        nats_pg_auth::copy::CopyLookup::Found(_)
                    )
            }
        },
    )
    .await;
    let outage = DbOutage::begin(&env).await;
    logs_in_as(&env, &pki, "fp", "dev-fp").await;
    refused(&env, &pki, "stranger", "still refused without Postgres").await;
    assert!(cache.in_outage(), "answered from the copy");
    outage.end().await;
}

/// A SAN mapping typed with capitals matches the same certificates whether the login reads
/// Postgres (first login, `explain`) or the login copy (Postgres away): email and DNS SANs
/// compare without ASCII case on both paths, URIs exactly.
#[tokio::test]
async fn san_mappings_compare_the_same_from_postgres_and_from_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.leaf(
        "email",
        "/CN=mailer",
        &format!("{CLIENT_EXT}subjectAltName=email:dev@acme.example\n"),
    );
    pki.leaf(
        "dns",
        "/CN=box",
        &format!("{CLIENT_EXT}subjectAltName=DNS:box-7.acme.example\n"),
    );
    pki.leaf(
        "uri",
        "/CN=workload",
        &format!("{CLIENT_EXT}subjectAltName=URI:spiffe://acme/dev-uri\n"),
    );
    let env = start_reading_postgres(&pki).await;
    env.sql(
        "INSERT INTO nats.user_certificates (user_id, san)
           SELECT id, 'email:Dev@ACME.example' FROM nats.users WHERE username = 'dev-email';
         INSERT INTO nats.user_certificates (user_id, san)
           SELECT id, 'dns:Box-7.Acme.Example' FROM nats.users WHERE username = 'dev-dn';
         INSERT INTO nats.user_certificates (user_id, san)
           SELECT id, 'uri:spiffe://ACME/dev-uri' FROM nats.users WHERE username = 'dev-uri';",
    )
    .await;
    // From Postgres: logins (the copy does not answer while Postgres is up), and explain.
    logs_in_as(&env, &pki, "email", "dev-email").await;
    let explain = |file: &str| {
        let path = pki.path(file);
        let (code, out, err) = crate::common::run_cli(
            &["explain", "--json", "--certificate", path.to_str().unwrap()],
            Some(&env.database_url),
            "",
        );
        let v = serde_json::from_str::<serde_json::Value>(&out).unwrap();
        let refused = v["allowed"] != true;
        assert_eq!(code, Some(if refused { 77 } else { 0 }), "{err}");
        v
    };
    assert_eq!(explain("email.pem")["user"], "dev-email");
    assert_eq!(explain("dns.pem")["user"], "dev-dn");
    assert_eq!(explain("uri.pem")["deny_reason"], "unknown_certificate");
    refused(&env, &pki, "uri", "a URI compares exactly (from Postgres)").await;

    // From the copy: Postgres away, a certificate that never logged in before.
    let pem = std::fs::read_to_string(pki.path("dns.pem")).unwrap();
    let tls = serde_json::json!({"version": "1.3", "verified_chains": [[pem]]});
    let presented = certificate::presented(Some(&tls), nats_pg_auth::jwt::now_unix()).unwrap();
    let cache = env.callout.as_ref().unwrap().cache().clone();
    wait_until(
        Duration::from_secs(5),
        "the copy to hold the mapping",
        || {
            let (cache, presented) = (cache.clone(), presented.clone());
            async move {
                cache.is_live()
                    && matches!(
                        cache.copy_certificate(&presented),
                        nats_pg_auth::copy::CopyLookup::Found(_)
                    )
            }
        },
    )
    .await;
    let outage = DbOutage::begin(&env).await;
    logs_in_as(&env, &pki, "dns", "dev-dn").await;
    refused(&env, &pki, "uri", "a URI compares exactly (from the copy)").await;
    assert!(cache.in_outage(), "answered from the copy");
    outage.end().await;
}

/// The Postgres lookup is bounded (100 rows); the most specific mapping must not be the one
/// cut off. A certificate with 120 SANs, each mapped to one of two users (at most 100 mappings
/// per user), and its fingerprint mapped to a third user: the fingerprint row wins.
#[tokio::test]
async fn the_fingerprint_mapping_wins_among_more_than_100_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let sans: Vec<String> = (1..=120)
        .map(|i| format!("DNS:d{i}.acme.example"))
        .collect();
    pki.leaf(
        "many",
        "/CN=many names",
        &format!("{CLIENT_EXT}subjectAltName={}\n", sans.join(",")),
    );
    let env = start_reading_postgres(&pki).await;
    env.sql(&format!(
        "INSERT INTO nats.user_certificates (user_id, san)
           SELECT u.id, 'dns:d' || g || '.acme.example' FROM nats.users u, generate_series(1, 120) g
           WHERE u.username = CASE WHEN g % 2 = 0 THEN 'dev-dn' ELSE 'dev-email' END;
         INSERT INTO nats.users (account_id, role_id, username)
           SELECT account_id, role_id, 'dev-late' FROM nats.users WHERE username = 'dev-fp';
         INSERT INTO nats.user_certificates (user_id, fingerprint_sha256)
           SELECT id, decode('{}', 'hex') FROM nats.users WHERE username = 'dev-late';",
        pki.fingerprint_hex("many")
    ))
    .await;
    // The user and its row come last in every table, so an unordered bound cuts them off
    // whichever way Postgres joins.
    logs_in_as(&env, &pki, "many", "dev-late").await;
}

#[tokio::test]
async fn deleting_a_certificate_mapping_closes_the_connection() {
    let (_dir, pki, env) = fingerprint_mapped(true).await;
    let (opts, mut events) = with_events(pki.client(Some("fp"), ConnectOptions::new()));
    let _client = opts.connect(env.url()).await.expect("certificate login");
    let start = std::time::Instant::now();
    env.sql("DELETE FROM nats.user_certificates").await;
    let took = disconnected_by(
        &mut events,
        start,
        Duration::from_secs(2),
        "mapping deleted",
    )
    .await;
    eprintln!("revocation delay (mapping deleted): {took:?}");
    refused(&env, &pki, "fp", "the certificate no longer logs in").await;
}

#[tokio::test]
async fn without_verify_a_certificate_identifies_nobody() {
    let (_dir, pki, env) = fingerprint_mapped(false).await;
    refused(&env, &pki, "fp", "refused: the chain was not verified").await;
    // nats-server without `verify` does not ask for a client certificate at all: the request
    // has `client_tls` with neither `certs` nor `verified_chains`.
    assert_eq!(env.metrics.denied("certificate_not_verified"), 1);
    // Over the same listener, passwords work as ever.
    pki.client(
        None,
        ConnectOptions::with_user_and_password("alice".into(), "s3cret".into()),
    )
    .connect(env.url())
    .await
    .expect("password login over TLS");
}

#[test]
fn bad_nats_tls_files_are_one_line_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    for (args, says) in [
        (
            &["serve", "--nats-ca-file", "/nonexistent/ca.pem"][..],
            "--nats-ca-file /nonexistent/ca.pem: cannot read it",
        ),
        (&["serve", "--nats-ca-file", not_pem][..], "no PEM block"),
        (
            &[
                "serve",
                "--nats-cert-file",
                not_pem,
                "--nats-key-file",
                not_pem,
            ][..],
            "--nats-cert-file",
        ),
        // A certificate without its key: clap says which flag is missing.
        (
            &["serve", "--nats-cert-file", not_pem][..],
            "--nats-key-file",
        ),
        (
            &[
                "try-login",
                "--user",
                "a",
                "--password",
                "b",
                "--nats-ca-file",
                "/nonexistent",
            ][..],
            "--nats-ca-file /nonexistent: cannot read it",
        ),
    ] {
        let (code, _, err) =
            crate::common::run_cli(args, Some("postgres://nobody@127.0.0.1:1/none"), "");
        assert_eq!(code, Some(64), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    }
}

/// The service reads a subject exactly as `openssl x509 -noout -subject -nameopt RFC2253`
/// prints it (what the admin guide tells admins to store): escapes, UTF-8, multi-valued RDNs.
#[test]
fn the_subject_dn_is_what_openssl_prints() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    for (name, subject) in [
        ("plain", "/C=DE/O=Acme/CN=dev"),
        (
            "tricky",
            "/DC=org/DC=acme/O=Café \"Bar\" #1; x<y>, z/OU=a\\+b/CN=dev+UID=42/emailAddress=Dev@Acme.example/serialNumber= 7 ",
        ),
    ] {
        // -utf8 and -multivalue-rdn are `req` options: make the CSR by hand.
        openssl(
            dir.path(),
            &[
                "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-utf8", "-multivalue-rdn", "-keyout", &format!("{name}.key"), "-out",
                &format!("{name}.csr"), "-subj", subject,
            ],
        );
        std::fs::write(dir.path().join("c.ext"), CLIENT_EXT).unwrap();
        openssl(
            dir.path(),
            &[
                "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey",
                "ca.key", "-CAcreateserial", "-days", "1", "-out", &format!("{name}.pem"),
                "-extfile", "c.ext",
            ],
        );
        let printed = pki.subject(name);
        let pem = std::fs::read_to_string(pki.path(&format!("{name}.pem"))).unwrap();
        let tls = serde_json::json!({"verified_chains": [[pem]]});
        let presented =
            certificate::presented(Some(&tls), nats_pg_auth::jwt::now_unix()).unwrap();
        assert_eq!(
            presented.subject_dn,
            certificate::normalize_dn(&printed),
            "openssl printed {printed}"
        );
        assert_eq!(presented.fingerprint_hex(), pki.fingerprint_hex(name));
    }
}
