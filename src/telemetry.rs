//! Logging setup: plain or JSON lines on stderr, level from `RUST_LOG` (default `info`).
//!
//! Nothing in this crate logs a password, token, seed or JWT signature; the only JWTs that are
//! logged are never, so there is nothing to filter here.
//!
//! Logging never takes the service down: a log line that cannot be written (stderr a pipe whose
//! reader went away, a full disk) is dropped and counted (`dropped_log_lines`), never retried and
//! never reported on stderr itself (which is what made tracing-subscriber panic: its report of a
//! failed write is an `eprintln!`).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines that could not be written since the process started.
pub fn dropped_log_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// stderr, but a failed write is counted and reported as done.
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Writes one line to stderr outside the log (the CLI's messages), never panicking.
pub fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(LossyStderr, "{line}");
}

/// Installs the global subscriber. Safe to call more than once (later calls are ignored), which
/// lets tests start several services in one process.
pub fn init(format: LogFormat) {
    init_with(format, "info,sqlx=warn,async_nats=warn")
}

/// Like [`init`], with another default filter (when `RUST_LOG` is not set).
pub fn init_with(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Plain => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
