//! Thin entry point: parse, set up logging, run, map errors to one line and an exit code.

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use nats_pg_auth::config::{Cli, Command};
use nats_pg_auth::telemetry::say;
use nats_pg_auth::{cli, telemetry};

#[tokio::main]
async fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => exit_usage(e),
    };
    match &cli.command {
        // try-login reports in its own words; the NATS client's log would repeat it.
        Command::TryLogin(_) => telemetry::init_with(cli.common.log_format, "warn,async_nats=off"),
        _ => telemetry::init(cli.common.log_format),
    }
    // Before any seed or key is read (see src/hardening.rs).
    if let Err(why) = nats_pg_auth::hardening::forbid_core_dumps() {
        tracing::warn!("core dumps may still be written: {why}");
    }
    // Installed before anything runs, so an early SIGTERM is a clean stop, not a kill.
    let mut signals = Signals::install();
    // `serve` bounds its own stop by --shutdown-timeout; this is the backstop for anything that
    // ignores the token.
    let hard_stop = match &cli.command {
        Command::Serve(args) => Some(args.shutdown_timeout + Duration::from_secs(5)),
        _ => None,
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        signals.next().await;
        tracing::info!("signal received; stopping");
        signal.cancel();
        let overrun = async {
            match hard_stop {
                Some(bound) => tokio::time::sleep(bound).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signals.next() => {
                say(format_args!("error: second signal received; exiting without finishing"));
                std::process::exit(130);
            }
            _ = overrun => {
                say(format_args!("error: did not stop within --shutdown-timeout (+5s); exiting"));
                std::process::exit(70);
            }
        }
    });
    if let Err(e) = cli::run(cli, shutdown).await {
        say(format_args!("error: {e}"));
        std::process::exit(e.exit_code());
    }
}

/// `--help` and `--version` print and exit 0; any other command line error is one line and
/// exit 64 (EX_USAGE), not clap's 2.
fn exit_usage(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        std::process::exit(
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                64
            } else {
                0
            },
        );
    }
    let text = e.render().to_string();
    // What clap says before its usage block, on one line.
    let first = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let first = first.strip_prefix("error: ").unwrap_or(&first);
    say(format_args!(
        "error: {first} (`nats-pg-auth help` and `nats-pg-auth VERB --help` list the verbs and flags)"
    ));
    std::process::exit(64);
}

/// SIGTERM and SIGINT (Ctrl-C).
struct Signals {
    #[cfg(unix)]
    unix: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let unix = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            Signals { unix }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.unix {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
