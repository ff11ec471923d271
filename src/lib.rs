//! nats-pg-auth: Postgres as the single source of truth for NATS identities.
//!
//! The service answers nats-server's auth callout with short-lived user JWTs (`callout`) and
//! keeps every account JWT on the server in step with the database (`sync`).
#![forbid(unsafe_code)]

pub mod app;
pub mod cache;
pub mod callout;
pub mod cli;
pub mod config;
pub mod db;
pub mod http;
pub mod init;
pub mod jwt;
pub mod keys;
pub mod metrics;
pub mod operator;
pub mod sessions;
pub mod sync;
pub mod telemetry;
