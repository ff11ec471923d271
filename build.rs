//! Rebuild when a migration changes (`sqlx::migrate!` embeds the files at compile time), and
//! record the git commit the binary is built from (`nats_pg_auth_build_info`, `status`).
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Only files that exist: cargo reruns the script on every build for a missing one.
fn rerun_if_changed(path: &str) {
    if std::path::Path::new(path).exists() {
        println!("cargo:rerun-if-changed={path}");
    }
}

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=NATS_PG_AUTH_GIT_SHA");
    // A build without .git (a release tarball, a container build) says `unknown`, unless the
    // builder passes the commit in NATS_PG_AUTH_GIT_SHA (the Dockerfile's GIT_SHA build arg).
    let sha = std::env::var("NATS_PG_AUTH_GIT_SHA")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // It becomes a Prometheus label value: hex digits and the like only.
    let sha: String = sha
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(40)
        .collect();
    println!("cargo:rustc-env=NATS_PG_AUTH_GIT_SHA={sha}");
    // Rebuilt when HEAD moves (a commit, a checkout): the files git changes then.
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            rerun_if_changed(&p);
        }
    }
    if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &head]) {
            rerun_if_changed(&p);
        }
    }
}
