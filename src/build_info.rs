//! What this binary is: its version and the git commit it was built from (`build.rs`;
//! `unknown` when built without `.git`, e.g. from a tarball). Shown as
//! `nats_pg_auth_build_info` on /metrics, in `status`, and in each replica's `nats.replicas` row.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_SHA: &str = env!("NATS_PG_AUTH_GIT_SHA");

/// `0.1.0 (git 1a2b3c4d5e6f)`.
pub fn text() -> String {
    format!("{VERSION} (git {GIT_SHA})")
}
