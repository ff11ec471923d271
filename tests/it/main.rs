//! Integration tests: real Postgres, real nats-server, the real service, async-nats clients.

mod bounds;
mod cache;
mod certificates;
mod chaos;
mod cli;
mod cli_admin;
mod common;
mod compose;
mod doors;
mod init;
mod login;
mod manifests;
mod nkeys;
mod observability;
mod outage;
mod protocol;
mod readme;
mod resilience;
mod rotation;
mod schema;
mod security;
mod sessions;
mod shutdown;
mod sync;
mod sync_errors;
mod tenancy;
