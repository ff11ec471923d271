//! Process hardening applied before anything else runs.
//!
//! The service holds decrypted seeds (operator, accounts, the callout's issuer) and the at-rest
//! key in memory. A core dump would write them to disk in plain text, wherever the host's
//! `core_pattern` points (often a world-readable crash collector), and a same-user process
//! could read them through ptrace or `/proc/<pid>/mem`. So every verb starts with core dumps
//! off: the core size limit is 0 (soft and hard, so a child cannot raise it back) and the
//! process is marked not dumpable (`PR_SET_DUMPABLE` 0), which also refuses ptrace attach and
//! `/proc/<pid>/mem` to other processes of the same user. The systemd unit sets `LimitCORE=0`
//! too, for the window before `main` runs.

/// Turns core dumps off for this process; returns what could not be done (the caller warns).
pub fn forbid_core_dumps() -> Result<(), String> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let mut problems = Vec::new();
    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, zero) {
        problems.push(format!("cannot set the core size limit to 0: {e}"));
    }
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        problems.push(format!("cannot mark the process not dumpable: {e}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_ends_up_without_core_dumps() {
        forbid_core_dumps().expect("allowed for an unprivileged process too");
        let core = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((core.current, core.maximum), (Some(0), Some(0)));
        #[cfg(target_os = "linux")]
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
