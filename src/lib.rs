//! Sluice: a high-throughput outbound SMTP relay.
//!
//! The protocol cores under [`smtp`] are sans-IO state machines; the glommio
//! drivers that feed them live beside them and stay thin.
#![warn(missing_docs)]
// `unsafe` is denied everywhere but in one module, the DATA scanner's SIMD
// block kernel (src/smtp/data/kernel.rs), which allows it for run-time CPU
// feature dispatch, unaligned SIMD loads/stores and `Vec::set_len`.
#![deny(unsafe_code)]

pub mod config;
pub mod delivery;
pub mod metrics;
pub mod server;
pub mod smtp;
pub mod spool;
