//! Prometheus metrics: the recorder, per-shard cached handles, and the small
//! admin HTTP endpoint (`/metrics`, `/queue`, `/health`).
//!
//! The endpoint is plain std HTTP/1.1 on a control thread, never on a shard:
//! rendering and spool listing are slow next to an SMTP command, and the
//! exporter's own HTTP listener would pull in tokio.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use ::metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Connections accepted (counter, label `shard`).
pub const CONNECTIONS_TOTAL: &str = "sluice_connections_total";
/// Connections open now (gauge, label `shard`).
pub const CONNECTIONS_ACTIVE: &str = "sluice_connections_active";
/// Connections refused (counter, label `reason`).
pub const CONNECTIONS_REJECTED: &str = "sluice_connections_rejected_total";
/// Sessions closed by the total session deadline (counter).
pub const SESSIONS_TIMED_OUT: &str = "sluice_sessions_timed_out_total";
/// Messages acknowledged with 250 after a durable store (counter).
pub const MESSAGES_ACCEPTED: &str = "sluice_messages_accepted_total";
/// Messages answered 452 because the spool write failed (counter).
pub const MESSAGES_SPOOL_FAILED: &str = "sluice_messages_spool_failed_total";
/// Recipients accepted (counter).
pub const RECIPIENTS_ACCEPTED: &str = "sluice_recipients_accepted_total";
/// Recipients refused by relay policy (counter).
pub const RELAY_DENIED: &str = "sluice_relay_denied_total";
/// 4xx/5xx replies sent (counter, labels `stage`, `class`).
pub const REJECTIONS: &str = "sluice_rejections_total";
/// Octets read from clients (counter).
pub const BYTES_RECEIVED: &str = "sluice_bytes_received_total";
/// Size of accepted messages (histogram, octets).
pub const MESSAGE_SIZE: &str = "sluice_message_size_bytes";
/// Time from end of DATA to the durable store (histogram, seconds).
pub const STORE_LATENCY: &str = "sluice_store_seconds";

/// Installs the global Prometheus recorder and returns the handle used to
/// render it. Histograms ending in `_seconds` get latency buckets (the spool's
/// write and flush latencies included), `_bytes` size buckets, `batch` count
/// buckets.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let seconds = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ];
    let bytes = [
        1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
    ];
    let batch = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
    // Time in the queue spans milliseconds (delivered at once) to days
    // (retried until max_age).
    let queue_time = [
        0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
        432000.0,
    ];
    let per_connection = [
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
    ];
    let handle = PrometheusBuilder::new()
        // Full matchers are checked before suffix ones.
        .set_buckets_for_metric(
            Matcher::Full(crate::delivery::metrics::QUEUE_TIME.into()),
            &queue_time,
        )?
        .set_buckets_for_metric(Matcher::Suffix("_per_connection".into()), &per_connection)?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &bytes)?
        .set_buckets_for_metric(Matcher::Suffix("batch_size".into()), &batch)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// `# HELP` text for every series Sluice exports (`promtool check metrics`
/// flags a series without one). Described once, after the recorder is
/// installed (descriptions given to no recorder are lost).
fn describe() {
    use crate::delivery::{dns, log, metrics as d, route};
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CONNECTIONS_TOTAL, "SMTP connections accepted");
    describe_gauge!(CONNECTIONS_ACTIVE, "SMTP sessions open now");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Connections refused at connect (421), by reason"
    );
    describe_counter!(
        SESSIONS_TIMED_OUT,
        "Sessions closed by the total session deadline"
    );
    describe_counter!(
        MESSAGES_ACCEPTED,
        "Messages answered 250 after a durable store"
    );
    describe_counter!(
        MESSAGES_SPOOL_FAILED,
        "Messages answered 452 because the spool refused or failed"
    );
    describe_counter!(RECIPIENTS_ACCEPTED, "Recipients accepted");
    describe_counter!(RELAY_DENIED, "Recipients refused by relay policy");
    describe_counter!(REJECTIONS, "4xx/5xx replies sent, by stage and class");
    describe_counter!(BYTES_RECEIVED, Unit::Bytes, "Octets read from clients");
    describe_histogram!(MESSAGE_SIZE, Unit::Bytes, "Size of accepted messages");
    describe_histogram!(
        STORE_LATENCY,
        Unit::Seconds,
        "End of DATA to the durable store"
    );
    describe_histogram!(
        "sluice_spool_write_seconds",
        Unit::Seconds,
        "Spool store call including its flush"
    );
    describe_histogram!(
        "sluice_spool_flush_seconds",
        Unit::Seconds,
        "One group-commit flush (fsync)"
    );
    describe_histogram!(
        "sluice_spool_flush_batch_size",
        "Writes made durable by one flush"
    );
    describe_gauge!("sluice_spool_messages", "Messages in the spool");
    describe_gauge!(
        "sluice_spool_writable",
        "1 while the spool takes writes, 0 when stalled or failed"
    );
    describe_counter!(
        "sluice_spool_refused_total",
        "Stores refused without writing, by reason"
    );
    describe_counter!(
        d::RECIPIENTS,
        "Delivery outcomes of recipients, by result and class of the deciding reply"
    );
    describe_histogram!(
        d::ATTEMPT_SECONDS,
        Unit::Seconds,
        "One delivery transaction on an open connection"
    );
    describe_histogram!(
        d::QUEUE_TIME,
        Unit::Seconds,
        "Reception to the final outcome of a recipient"
    );
    describe_gauge!(d::CONNECTIONS_OPEN, "Outbound connections open now");
    describe_counter!(
        d::CONNECTIONS_OPENED,
        "Outbound connections that reached a usable session"
    );
    describe_counter!(
        d::CONNECT_FAILURES,
        "Failed connection attempts to one host, by reason"
    );
    describe_counter!(
        d::DESTINATIONS_HELD,
        "Destinations backed off as a whole because no host could be reached"
    );
    describe_histogram!(
        d::MESSAGES_PER_CONNECTION,
        "Messages an outbound connection carried, at its end"
    );
    describe_gauge!(d::QUEUE_READY, "Delivery queue entries due now");
    describe_gauge!(
        d::QUEUE_SCHEDULED,
        "Delivery queue entries waiting for a retry"
    );
    describe_counter!(d::BOUNCES, "DSNs (bounces) spooled");
    describe_counter!(
        d::COMPLETED,
        "Messages removed from the spool with every recipient final"
    );
    describe_counter!(
        d::SPOOL_ERRORS,
        "Delivery outcomes that could not be written to the spool"
    );
    describe_counter!(
        dns::DNS_LOOKUPS,
        "DNS lookups delivery asked for (cache hits included), by type and result"
    );
    describe_histogram!(
        dns::DNS_LOOKUP_LATENCY,
        Unit::Seconds,
        "DNS lookup time, by type"
    );
    describe_counter!(
        route::DESTINATION_FAILURES,
        "Destinations that could not be routed, by reason"
    );
    describe_histogram!(
        route::DESTINATION_LATENCY,
        Unit::Seconds,
        "Time to find the hosts of a destination, by source"
    );
    describe_counter!(log::LOG_RECORDS, "Accounting log records written");
    describe_counter!(
        log::LOG_DROPPED,
        "Accounting log records dropped because the writer fell behind"
    );
    describe_counter!(
        log::LOG_WRITE_ERRORS,
        "Accounting log writes or flushes that failed"
    );
}

/// Metric handles one shard uses on its hot paths, resolved once (a cached
/// handle costs ~15 ns per update, a macro lookup ~100 ns).
#[derive(Clone)]
pub struct ShardMetrics {
    shard: String,
    /// See [`CONNECTIONS_TOTAL`].
    pub connections_total: Counter,
    /// See [`CONNECTIONS_ACTIVE`].
    pub connections_active: Gauge,
    /// See [`MESSAGES_ACCEPTED`].
    pub messages_accepted: Counter,
    /// See [`MESSAGES_SPOOL_FAILED`].
    pub messages_spool_failed: Counter,
    /// See [`RECIPIENTS_ACCEPTED`].
    pub recipients_accepted: Counter,
    /// See [`RELAY_DENIED`].
    pub relay_denied: Counter,
    /// See [`BYTES_RECEIVED`].
    pub bytes_received: Counter,
    /// See [`MESSAGE_SIZE`].
    pub message_size: Histogram,
    /// See [`STORE_LATENCY`].
    pub store_latency: Histogram,
    /// See [`SESSIONS_TIMED_OUT`].
    pub sessions_timed_out: Counter,
}

impl ShardMetrics {
    /// Handles labelled with `shard`.
    pub fn new(shard: usize) -> Self {
        let s = shard.to_string();
        ShardMetrics {
            connections_total: counter!(CONNECTIONS_TOTAL, "shard" => s.clone()),
            connections_active: gauge!(CONNECTIONS_ACTIVE, "shard" => s.clone()),
            messages_accepted: counter!(MESSAGES_ACCEPTED, "shard" => s.clone()),
            messages_spool_failed: counter!(MESSAGES_SPOOL_FAILED, "shard" => s.clone()),
            recipients_accepted: counter!(RECIPIENTS_ACCEPTED, "shard" => s.clone()),
            relay_denied: counter!(RELAY_DENIED, "shard" => s.clone()),
            bytes_received: counter!(BYTES_RECEIVED, "shard" => s.clone()),
            message_size: histogram!(MESSAGE_SIZE),
            store_latency: histogram!(STORE_LATENCY),
            sessions_timed_out: counter!(SESSIONS_TIMED_OUT, "shard" => s.clone()),
            shard: s,
        }
    }

    /// A refused connection (rare: a macro lookup is fine).
    pub fn connection_rejected(&self, reason: &'static str) {
        counter!(CONNECTIONS_REJECTED, "reason" => reason, "shard" => self.shard.clone())
            .increment(1);
    }

    /// A 4xx/5xx reply at `stage` (label text from the session's Stage).
    pub fn rejection(&self, stage: &'static str, code: u16) {
        let class = if code >= 500 { "5xx" } else { "4xx" };
        counter!(REJECTIONS, "stage" => stage, "class" => class).increment(1);
    }
}

/// What the admin endpoint answers to `GET /queue?limit=N`.
pub type QueueRenderer = Arc<dyn Fn(usize) -> Result<String, String> + Send + Sync>;

/// Serves the admin endpoint on `listener` from a new thread, plus an upkeep
/// thread that drains histogram buffers every five seconds.
pub fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    queue: QueueRenderer,
) -> std::io::Result<()> {
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("sluice-metrics-upkeep".into())
        .spawn(move || loop {
            // Periodic housekeeping, not synchronisation.
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })?;
    std::thread::Builder::new()
        .name("sluice-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer(conn, &handle, &queue) {
                    tracing::debug!(error = %e, "admin request failed");
                }
            }
        })?;
    Ok(())
}

fn answer(
    mut conn: TcpStream,
    handle: &PrometheusHandle,
    queue: &QueueRenderer,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers; the body (if any) is ignored.
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            handle.run_upkeep();
            ("200 OK", "text/plain; version=0.0.4", handle.render())
        }
        ("GET", "/health") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/queue") => {
            let limit = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            match queue(limit) {
                Ok(text) => ("200 OK", "text/plain", text),
                Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
            }
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

/// Fetches `path` from a running server's admin endpoint (used by
/// `sluice queue`). Errors if nothing listens there.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "admin endpoint answered: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_owned())
}
