//! Integration tests: real Postgres, real nats-server, the real service, async-nats clients.

mod bounds;
mod cache;
mod chaos;
mod common;
mod compose;
mod init;
mod login;
mod manifests;
mod outage;
mod protocol;
mod resilience;
mod schema;
mod security;
mod sessions;
mod shutdown;
mod sync;
mod tenancy;
