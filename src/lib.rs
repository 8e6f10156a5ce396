//! Sluice: a high-throughput outbound SMTP relay.
//!
//! The protocol cores under [`smtp`] are sans-IO state machines; the glommio
//! drivers that feed them live beside them and stay thin.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
pub mod delivery;
pub mod metrics;
pub mod server;
pub mod smtp;
pub mod spool;
