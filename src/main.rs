//! Thin entry point: parse, set up logging, run, map errors to one line and an exit code.

use clap::Parser;
use tokio_util::sync::CancellationToken;

use nats_pg_auth::{cli, config::Cli, telemetry};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    telemetry::init(cli.common.log_format);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; stopping");
        signal.cancel();
    });
    if let Err(e) = cli::run(cli, shutdown).await {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
