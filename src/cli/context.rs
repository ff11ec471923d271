//! `export-context`: a `nats` CLI context for an operator (`nats --context NAME server report
//! connections`): `NAME.json` as the nats CLI reads it from `~/.config/nats/context/`, and
//! beside it `NAME.creds`, a system-account user that expires after `--ttl` (nothing is stored:
//! it ends by itself). Both files are written with mode 0600; the directory, when created,
//! 0700.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde_json::json;

use super::{system, CliError};
use crate::config::{parse_duration, CommonArgs, ConfigError, NatsTlsArgs};

#[derive(Debug, Args, Clone)]
pub struct ExportContextArgs {
    /// The context's name (`nats --context NAME …`).
    #[arg(long, default_value = "nats-pg-auth")]
    pub name: String,
    /// nats-server URL the context connects to.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// TLS files, copied into the context as paths.
    #[command(flatten)]
    pub tls: NatsTlsArgs,
    /// How long the credential works.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// The nats CLI's context directory (default `$XDG_CONFIG_HOME/nats/context`, else
    /// `~/.config/nats/context`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub async fn run(common: &CommonArgs, args: ExportContextArgs) -> Result<(), CliError> {
    if args.name.is_empty()
        || !args
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || args.name.starts_with('.')
    {
        return Err(ConfigError::Invalid(format!(
            "--name {:?}: use letters, digits, '-', '_' or '.' (it names a file)",
            args.name
        ))
        .into());
    }
    if args.ttl.is_zero() || args.ttl > Duration::from_secs(366 * 86400) {
        return Err(ConfigError::Invalid("--ttl must be between 1s and 366d".into()).into());
    }
    args.tls.validate()?;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => default_dir()?,
    };
    let (_pool, ids) = system::identities(common).await?;
    let (jwt, seed) = system::mint_user(common, &ids, "nats-pg-auth-operator", args.ttl)?;
    create_dir(&dir)?;
    let creds_path = dir.join(format!("{}.creds", args.name));
    write_private(&creds_path, &creds(&jwt, &seed))?;
    let path_text = |p: &Option<PathBuf>| -> Result<String, CliError> {
        match p {
            None => Ok(String::new()),
            Some(p) => Ok(std::fs::canonicalize(p)
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", p.display())))?
                .display()
                .to_string()),
        }
    };
    let context = json!({
        "description": format!("nats-pg-auth system user (expires in {})", humantime::format_duration(args.ttl)),
        "url": args.nats_url,
        "token": "",
        "user": "",
        "password": "",
        "creds": creds_path.display().to_string(),
        "nkey": "",
        "cert": path_text(&args.tls.nats_cert_file)?,
        "key": path_text(&args.tls.nats_key_file)?,
        "ca": path_text(&args.tls.nats_ca_file)?,
        "nsc": "",
        "jetstream_domain": "",
        "jetstream_api_prefix": "",
        "jetstream_event_prefix": "",
        "inbox_prefix": "",
        "user_jwt": "",
    });
    let context_path = dir.join(format!("{}.json", args.name));
    let text = serde_json::to_string_pretty(&context)
        .map_err(|e| CliError::Other(format!("cannot write JSON: {e}")))?;
    write_private(&context_path, &(text + "\n"))?;
    crate::telemetry::say(format_args!(
        "wrote {} and {} (system user, expires in {}); try `nats --context {} server report connections`",
        context_path.display(),
        creds_path.display(),
        humantime::format_duration(args.ttl),
        args.name
    ));
    Ok(())
}

fn default_dir() -> Result<PathBuf, CliError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".config"),
            None => {
                return Err(
                    ConfigError::Invalid("no HOME or XDG_CONFIG_HOME: give --dir".into()).into(),
                )
            }
        },
    };
    Ok(base.join("nats").join("context"))
}

/// A `.creds` file as nsc and the NATS clients read it.
fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

fn create_dir(dir: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            CliError::Config(ConfigError::Invalid(format!(
                "cannot create {}: {e}",
                dir.display()
            )))
        })
}

/// Writes `text` to `path` readable by its owner only, also when the file existed with a wider
/// mode (it is replaced, never written in place).
fn write_private(path: &Path, text: &str) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let fail = |e: std::io::Error| {
        CliError::Config(ConfigError::Invalid(format!(
            "cannot write {}: {e}",
            path.display()
        )))
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}
