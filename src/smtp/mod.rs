//! SMTP protocol cores: replies, commands, addresses, the DATA scanner and the
//! server session. Nothing in here does I/O or reads the clock.

pub mod address;
pub mod client;
pub mod command;
pub mod data;
pub mod reply;
pub mod server;

pub use reply::{EnhancedCode, Reply};
