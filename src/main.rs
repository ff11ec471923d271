//! Thin entry point: parse, set up logging, run, map errors to one line and an exit code.

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use nats_pg_auth::config::{Cli, Command};
use nats_pg_auth::{cli, telemetry};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    telemetry::init(cli.common.log_format);
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
                eprintln!("error: second signal received; exiting without finishing");
                std::process::exit(130);
            }
            _ = overrun => {
                eprintln!("error: did not stop within --shutdown-timeout (+5s); exiting");
                std::process::exit(70);
            }
        }
    });
    if let Err(e) = cli::run(cli, shutdown).await {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
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
