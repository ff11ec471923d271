//! nats-pg-auth: Postgres as the single source of truth for NATS identities.
//!
//! The service answers nats-server's auth callout with short-lived user JWTs (`callout`) and
//! keeps every account JWT on the server in step with the database (`sync`).
#![forbid(unsafe_code)]

/// mimalloc instead of the system allocator: the login caches hold many small long-lived
/// entries among short-lived request buffers. With glibc malloc the process held 127-158 MiB
/// after 100,000 logins, varying from run to run with fragmentation (MALLOC_ARENA_MAX=2 made it
/// worse); with mimalloc 104 MiB (BENCHMARKS.md, scenario 9).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod app;
pub mod build_info;
pub mod callout;
pub mod cli;
pub mod config;
pub mod copy;
pub mod db;
pub mod hardening;
pub mod http;
pub mod import;
pub mod init;
pub mod jwt;
pub mod key_watch;
pub mod keys;
pub mod metrics;
pub mod operator;
pub mod replica;
pub mod sessions;
pub mod sync;
pub mod telemetry;
