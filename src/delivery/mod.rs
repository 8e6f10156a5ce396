//! Delivery: per-domain queues on the owning shard, MX resolution, pooled
//! outbound connections driven by the sans-IO [`crate::smtp::client`] core,
//! retry with backoff, and RFC 3464 bounces.

pub mod accounting;
pub mod backoff;
pub mod dns;
pub mod dsn;
pub mod engine;
mod home;
pub mod log;
pub mod metrics;
pub mod notify;
mod owner;
pub mod plan;
pub mod queue;
pub mod route;
mod worker;
