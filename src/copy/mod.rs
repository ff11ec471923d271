//! The login copy's room. For now it holds the copy's sealed snapshot ([`snapshot`]); the table
//! (`crate::cache`) and its maintainer (`crate::callout::copy`) are to move here too (issue 17).

pub mod snapshot;
