//! The login copy: every replica's in-memory copy of what logins need (users, roles, accounts,
//! tokens, nkeys, certificate mappings, signing keys), so logins are answered without Postgres
//! and survive its outages.
//!
//! - [`table`]: what the copy holds and how a login is looked up in it (plus the short-lived
//!   caches beside it), the outage rules, kicks resolved from it;
//! - [`feed`]: its maintainer: the full load on every (re)connect, the change feed that keeps
//!   it current (change log read by snapshot, woken by notifications), reading Postgres or the
//!   copy per login;
//! - [`snapshot`]: its sealed snapshot on disk, from which a replica (re)started while Postgres
//!   is down answers;
//! - [`snapshot_jetstream`]: the same snapshot kept in JetStream by the sync leader, for a
//!   replica that starts on a new node with no local snapshot.

pub mod feed;
pub mod snapshot;
pub mod snapshot_jetstream;
pub mod table;

pub(crate) use feed::{Found, Read};
pub use table::*;
