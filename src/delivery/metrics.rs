//! Delivery metrics: names and the per-shard cached handles (a cached handle
//! costs ~15 ns per update, a macro lookup ~100 ns; see `src/metrics.rs`).

use ::metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

/// Recipients by outcome (counter; labels `shard`, `result` =
/// delivered/deferred/failed, `class` = 2xx/4xx/5xx of the deciding reply,
/// or `local` when the reply is ours: DNS, connection failures, expiry).
pub const RECIPIENTS: &str = "sluice_delivery_recipients_total";
/// Duration of one transaction on an open connection (histogram, seconds).
pub const ATTEMPT_SECONDS: &str = "sluice_delivery_attempt_seconds";
/// Time from reception to the final outcome of a recipient (histogram,
/// seconds; delivered or failed).
pub const QUEUE_TIME: &str = "sluice_delivery_queue_time_seconds";
/// Outbound connections open now (gauge, label `shard`).
pub const CONNECTIONS_OPEN: &str = "sluice_delivery_connections_open";
/// Outbound connections that reached a usable session (counter).
pub const CONNECTIONS_OPENED: &str = "sluice_delivery_connections_opened_total";
/// Connection attempts to one host that failed (counter, label `reason` =
/// refused/timeout/greeting/error).
pub const CONNECT_FAILURES: &str = "sluice_delivery_connect_failures_total";
/// Destinations backed off as a whole because no host could be reached
/// (counter).
pub const DESTINATIONS_HELD: &str = "sluice_delivery_destinations_held_total";
/// Messages carried per connection, recorded when it closes (histogram).
pub const MESSAGES_PER_CONNECTION: &str = "sluice_delivery_messages_per_connection";
/// Queue entries due now (gauge, label `shard`).
pub const QUEUE_READY: &str = "sluice_delivery_queue_ready";
/// Queue entries waiting for a retry (gauge, label `shard`).
pub const QUEUE_SCHEDULED: &str = "sluice_delivery_queue_scheduled";
/// DSNs (bounces) spooled (counter).
pub const BOUNCES: &str = "sluice_delivery_bounces_total";
/// Messages removed from the spool with every recipient final (counter).
pub const COMPLETED: &str = "sluice_delivery_messages_completed_total";
/// Outcomes that could not be written to the spool (counter); the message
/// is retried after a restart.
pub const SPOOL_ERRORS: &str = "sluice_delivery_spool_errors_total";

/// Handles one shard uses.
#[derive(Clone)]
pub struct DeliveryMetrics {
    shard: String,
    delivered: [Counter; 2],
    deferred: [Counter; 2],
    failed: [Counter; 3],
    /// See [`ATTEMPT_SECONDS`].
    pub attempt_seconds: Histogram,
    /// See [`QUEUE_TIME`].
    pub queue_time: Histogram,
    /// See [`CONNECTIONS_OPEN`].
    pub connections_open: Gauge,
    /// See [`CONNECTIONS_OPENED`].
    pub connections_opened: Counter,
    /// See [`MESSAGES_PER_CONNECTION`].
    pub messages_per_connection: Histogram,
    /// See [`QUEUE_READY`].
    pub queue_ready: Gauge,
    /// See [`QUEUE_SCHEDULED`].
    pub queue_scheduled: Gauge,
    /// See [`BOUNCES`].
    pub bounces: Counter,
    /// See [`COMPLETED`].
    pub completed: Counter,
    /// See [`SPOOL_ERRORS`].
    pub spool_errors: Counter,
    /// See [`DESTINATIONS_HELD`].
    pub destinations_held: Counter,
}

/// Which counter a recipient outcome goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeKind {
    /// Accepted by the next hop.
    Delivered,
    /// Will be retried.
    Deferred,
    /// Failed for good.
    Failed,
}

impl DeliveryMetrics {
    /// Handles labelled with `shard`.
    pub fn new(shard: usize) -> Self {
        let s = shard.to_string();
        let c = |result: &'static str, class: &'static str| counter!(RECIPIENTS, "shard" => s.clone(), "result" => result, "class" => class);
        DeliveryMetrics {
            delivered: [c("delivered", "2xx"), c("delivered", "local")],
            deferred: [c("deferred", "4xx"), c("deferred", "local")],
            failed: [c("failed", "5xx"), c("failed", "4xx"), c("failed", "local")],
            attempt_seconds: histogram!(ATTEMPT_SECONDS),
            queue_time: histogram!(QUEUE_TIME),
            connections_open: gauge!(CONNECTIONS_OPEN, "shard" => s.clone()),
            connections_opened: counter!(CONNECTIONS_OPENED, "shard" => s.clone()),
            messages_per_connection: histogram!(MESSAGES_PER_CONNECTION),
            queue_ready: gauge!(QUEUE_READY, "shard" => s.clone()),
            queue_scheduled: gauge!(QUEUE_SCHEDULED, "shard" => s.clone()),
            bounces: counter!(BOUNCES, "shard" => s.clone()),
            completed: counter!(COMPLETED, "shard" => s.clone()),
            spool_errors: counter!(SPOOL_ERRORS, "shard" => s.clone()),
            destinations_held: counter!(DESTINATIONS_HELD, "shard" => s.clone()),
            shard: s,
        }
    }

    /// Counts `n` recipients with `kind`; `code` is the deciding reply's
    /// code and `remote` whether a remote server sent it.
    pub fn outcome(&self, kind: OutcomeKind, code: u16, remote: bool, n: u64) {
        let counter = match kind {
            OutcomeKind::Delivered => &self.delivered[usize::from(!remote)],
            OutcomeKind::Deferred => &self.deferred[usize::from(!remote)],
            OutcomeKind::Failed if !remote => &self.failed[2],
            OutcomeKind::Failed if code < 500 => &self.failed[1],
            OutcomeKind::Failed => &self.failed[0],
        };
        counter.increment(n);
    }

    /// A failed connection attempt to one host (rare: macro lookup is fine).
    pub fn connect_failure(&self, reason: &'static str) {
        counter!(CONNECT_FAILURES, "shard" => self.shard.clone(), "reason" => reason).increment(1);
    }
}
