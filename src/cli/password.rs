//! Reading a password for `user create`, `user set-password` and `hash-password`: piped on
//! standard input for scripts, or typed at a prompt on a terminal with echo off (twice, so a
//! typo does not lock the user out).

use std::io::{BufRead as _, Read as _, Write as _};

use super::CliError;
use crate::config::ConfigError;

/// The password: typed on the terminal at `ask` (e.g. `Password for user "alice": `) when
/// standard input is one, else read to the end of standard input (without its trailing
/// newline).
pub fn read(ask: &str) -> Result<String, CliError> {
    let stdin = std::io::stdin();
    let typed = rustix::termios::isatty(&stdin);
    let pw = if typed {
        let first = prompt(ask)?;
        let again = prompt("Again: ")?;
        if first != again {
            return Err(ConfigError::Invalid(
                "the two passwords differ; nothing was changed".into(),
            )
            .into());
        }
        first
    } else {
        let mut pw = String::new();
        stdin
            .lock()
            .read_to_string(&mut pw)
            .map_err(|e| CliError::Other(format!("cannot read standard input: {e}")))?;
        pw.trim_end_matches(['\n', '\r']).to_owned()
    };
    if pw.is_empty() {
        return Err(ConfigError::Invalid(if typed {
            "no password typed; nothing was changed".into()
        } else {
            "no password on standard input: pipe it in, e.g. `printf %s \"$PASSWORD\" | nats-pg-auth user create …`, or run it on a terminal to be asked".into()
        })
        .into());
    }
    Ok(pw)
}

/// One line typed on the terminal with echo off; the prompt goes to stderr (stdout stays for
/// what the verb prints). Echo is restored even when reading fails.
fn prompt(text: &str) -> Result<String, CliError> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let stdin = std::io::stdin();
    // Echo off before the prompt shows, so nothing typed after it is ever echoed.
    let saved = tcgetattr(&stdin).ok();
    if let Some(saved) = &saved {
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        quiet.local_modes.insert(LocalModes::ECHONL);
        let _ = tcsetattr(&stdin, OptionalActions::Now, &quiet);
    }
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "{text}");
    let _ = stderr.flush();
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(saved) = &saved {
        let _ = tcsetattr(&stdin, OptionalActions::Now, saved);
    }
    read.map_err(|e| CliError::Other(format!("cannot read the password: {e}")))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}
