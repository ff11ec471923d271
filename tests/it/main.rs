//! Integration tests: real Postgres, real nats-server, the real service, async-nats clients.

mod cache;
mod chaos;
mod cli;
mod common;
mod init;
mod login;
mod outage;
mod protocol;
mod readme;
mod resilience;
mod rotation;
mod schema;
mod sessions;
mod shutdown;
mod sync;
mod sync_errors;
mod tenancy;
