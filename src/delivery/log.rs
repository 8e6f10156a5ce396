//! The JSON-lines accounting log: one JSON object per line for every
//! reception, delivery, deferral, bounce and DSN, in the manner of Postfix's
//! maillog or a PowerMTA accounting file. Field names are stable and
//! documented in `docs/delivery-log.md`.
//!
//! Any shard (or thread) records through a cloned [`EventLog`]; one writer
//! thread owns the file. Why this shape:
//! - Shards never block on the log: [`EventLog::record`] is a push onto an
//!   unbounded crossbeam channel guarded by a soft bound
//!   ([`EventLogOptions::capacity`] records waiting). When the writer falls
//!   that far behind (a stalled disk), records are dropped and counted in
//!   [`LOG_DROPPED`] and [`EventLog::dropped`] instead of stalling delivery.
//!   The channel allocates its slots as it fills, so a large bound costs no
//!   memory while the writer keeps up.
//! - Events travel as typed values and are serialised on the writer thread,
//!   so the JSON cost stays off the shards.
//! - The writer buffers (64 KiB) and flushes when a record has waited
//!   [`EventLogOptions::flush_interval`] (1 s by default), on
//!   [`EventLog::sync`], and when the last handle is dropped.
//! - A [`EventLog::disabled`] log holds nothing: `record` returns before
//!   calling its closure, so no event is built, allocated or sent.
//! - No rotation of our own: the file is opened with `O_APPEND`, so
//!   logrotate's `copytruncate` works (writes continue at the new end).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use serde::{Serialize, Serializer};

use crate::smtp::reply::Reply;
use crate::spool::SpoolId;

/// Records written to the file (counter).
pub const LOG_RECORDS: &str = "sluice_log_records_total";
/// Records dropped because the writer was [`EventLogOptions::capacity`]
/// records behind (counter).
pub const LOG_DROPPED: &str = "sluice_log_dropped_total";
/// Failed writes or flushes of the log file (counter).
pub const LOG_WRITE_ERRORS: &str = "sluice_log_write_errors_total";

/// Default for [`EventLogOptions::capacity`].
pub const DEFAULT_CAPACITY: usize = 100_000;
/// Default for [`EventLogOptions::flush_interval`].
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Write buffer of the writer thread.
const BUFFER_SIZE: usize = 64 * 1024;

/// Tuning of an open log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventLogOptions {
    /// Most records waiting for the writer; beyond it new records are
    /// dropped (and counted), never waited for.
    pub capacity: usize,
    /// Longest time a written record stays in the buffer before a flush.
    pub flush_interval: Duration,
}

impl Default for EventLogOptions {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_CAPACITY,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
        }
    }
}

/// One accounting record. Serialised as a JSON object with `"event"` naming
/// the variant (`reception`, `delivery`, `deferral`, `bounce`, `dsn`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A message was accepted and durably spooled.
    Reception(Reception),
    /// A recipient was accepted by the next hop.
    Delivery(Delivery),
    /// A recipient failed temporarily and will be retried.
    Deferral(Deferral),
    /// A recipient failed permanently (remote 5xx, DNS, expiry, local).
    Bounce(Bounce),
    /// A DSN was queued for a message.
    Dsn(DsnQueued),
}

/// See [`Event::Reception`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reception {
    /// Spool id of the message.
    #[serde(serialize_with = "display")]
    pub id: SpoolId,
    /// MAIL FROM address, `""` for the null sender.
    pub from: String,
    /// Number of recipients.
    pub rcpt_count: usize,
    /// Message size in octets, as spooled.
    pub size: u64,
    /// The submitting client's address.
    pub client_ip: Option<IpAddr>,
    /// The client's EHLO/HELO argument.
    pub helo: Option<String>,
}

/// See [`Event::Delivery`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// Spool id of the message.
    #[serde(serialize_with = "display")]
    pub id: SpoolId,
    /// The recipient.
    pub rcpt: String,
    /// Host name of the server that accepted it.
    pub remote_host: String,
    /// Its address.
    pub remote_ip: Option<IpAddr>,
    /// The accepting reply (the final DATA/BDAT reply).
    #[serde(serialize_with = "reply")]
    pub reply: Reply,
    /// Which attempt this was (1 = first).
    pub attempt: u32,
    /// Time from reception to this delivery.
    #[serde(rename = "delay_s", serialize_with = "seconds")]
    pub delay: Duration,
    /// Transactions this connection had carried before this one (0 = a new
    /// connection).
    pub conn_reuse: u32,
}

/// See [`Event::Deferral`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deferral {
    /// Spool id of the message.
    #[serde(serialize_with = "display")]
    pub id: SpoolId,
    /// The recipient.
    pub rcpt: String,
    /// Host name of the server that answered, if one did.
    pub remote_host: Option<String>,
    /// Its address.
    pub remote_ip: Option<IpAddr>,
    /// The reply: the remote's 4xx, or ours (connection failure, DNS).
    #[serde(serialize_with = "reply")]
    pub reply: Reply,
    /// Which attempt this was (1 = first).
    pub attempt: u32,
    /// When the next attempt is due.
    #[serde(serialize_with = "timestamp")]
    pub next_attempt: SystemTime,
    /// Time from reception to this attempt.
    #[serde(rename = "delay_s", serialize_with = "seconds")]
    pub delay: Duration,
}

/// See [`Event::Bounce`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bounce {
    /// Spool id of the message.
    #[serde(serialize_with = "display")]
    pub id: SpoolId,
    /// The recipient.
    pub rcpt: String,
    /// Host name of the server that answered, if one did.
    pub remote_host: Option<String>,
    /// Its address.
    pub remote_ip: Option<IpAddr>,
    /// The reply: the remote's 5xx, or ours (DNS, expiry `4.4.7`).
    #[serde(serialize_with = "reply")]
    pub reply: Reply,
    /// Attempts made (0 if none reached a server).
    pub attempt: u32,
    /// Why it failed.
    pub reason: BounceReason,
    /// Time from reception to the failure.
    #[serde(rename = "delay_s", serialize_with = "seconds")]
    pub delay: Duration,
}

/// Why a recipient failed permanently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BounceReason {
    /// The remote server answered 5xx.
    Remote,
    /// A permanent DNS answer: NXDOMAIN (`5.1.2`) or null MX (`5.1.10`).
    Dns,
    /// Still deferred at `max_age` (`4.4.7`).
    Expired,
    /// Refused by our own policy or limits (e.g. 8-bit to a 7-bit server).
    Local,
}

/// See [`Event::Dsn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DsnQueued {
    /// Spool id of the original message.
    #[serde(serialize_with = "display")]
    pub id: SpoolId,
    /// Spool id of the DSN.
    #[serde(serialize_with = "display")]
    pub dsn_id: SpoolId,
    /// Where the DSN goes (the original sender).
    pub to: String,
    /// Recipients the DSN reports on.
    pub rcpt_count: usize,
}

/// Handle to the accounting log. Cheap to clone (one `Arc`), `Send + Sync`.
/// The writer thread stops, after writing and flushing everything, when the
/// last handle is dropped; that drop waits for it, so let the last handle
/// go at shutdown, not on a busy shard.
#[derive(Clone, Default)]
pub struct EventLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// `Option` only so `Drop` can disconnect the channel before joining.
    tx: Option<Sender<Msg>>,
    capacity: usize,
    dropped: AtomicU64,
    writer: Option<JoinHandle<()>>,
}

enum Msg {
    Record(SystemTime, Event),
    /// Flush, then answer.
    Sync(Sender<()>),
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("enabled", &self.is_enabled())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl EventLog {
    /// A log that records nothing and costs nothing.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Opens (creating, appending to) `path` with default options.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, EventLogOptions::default())
    }

    /// Opens (creating, appending to) `path` and starts the writer thread.
    pub fn open_with(path: &Path, options: EventLogOptions) -> io::Result<Self> {
        Self::start(path, options, None)
    }

    /// `gate`, in tests only: the writer waits for it before its first read,
    /// which makes a full channel deterministic.
    fn start(
        path: &Path,
        options: EventLogOptions,
        gate: Option<Receiver<()>>,
    ) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = channel::unbounded();
        let writer = Writer {
            out: BufWriter::with_capacity(BUFFER_SIZE, file),
            line: Vec::with_capacity(512),
            flush_interval: options.flush_interval,
            records: None,
            errors: None,
            failing: false,
        };
        let handle = std::thread::Builder::new()
            .name("sluice-event-log".into())
            .spawn(move || {
                if let Some(gate) = gate {
                    let _ = gate.recv();
                }
                writer.run(rx)
            })?;
        Ok(Self {
            inner: Some(Arc::new(Inner {
                tx: Some(tx),
                capacity: options.capacity.max(1),
                dropped: AtomicU64::new(0),
                writer: Some(handle),
            })),
        })
    }

    /// Whether records go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Records the event built by `make`, stamped with the current time. On
    /// a disabled log `make` is not called. Never blocks.
    pub fn record(&self, make: impl FnOnce() -> Event) {
        if let Some(inner) = &self.inner {
            inner.send(SystemTime::now(), make());
        }
    }

    /// Like [`EventLog::record`] with an explicit timestamp.
    pub fn record_at(&self, at: SystemTime, make: impl FnOnce() -> Event) {
        if let Some(inner) = &self.inner {
            inner.send(at, make());
        }
    }

    /// Records dropped so far because the writer was too far behind.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.load(Ordering::Relaxed))
    }

    /// Waits until everything recorded before this call is written and
    /// flushed, at most `timeout`; true if it was. This blocks: for shutdown
    /// paths and tests, never on a shard.
    pub fn sync(&self, timeout: Duration) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let Some(tx) = &inner.tx else {
            return false;
        };
        let (ack_tx, ack_rx) = channel::bounded(1);
        tx.send(Msg::Sync(ack_tx)).is_ok() && ack_rx.recv_timeout(timeout).is_ok()
    }
}

impl Inner {
    fn send(&self, at: SystemTime, event: Event) {
        let Some(tx) = &self.tx else { return };
        // Soft bound: concurrent senders may overshoot by a few records,
        // which is harmless; what matters is that nobody waits.
        if tx.len() >= self.capacity || tx.send(Msg::Record(at, event)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            // Looked up here, not at open: the log is opened before the
            // Prometheus recorder is installed, and a handle taken then
            // would count into the void. Drops are rare.
            metrics::counter!(LOG_DROPPED).increment(1);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Disconnect so the writer drains, flushes and exits; then wait for
        // it, so "dropped" means "on disk" (as far as the OS is concerned).
        self.tx.take();
        if let Some(handle) = self.writer.take() {
            if handle.join().is_err() {
                tracing::error!("event log writer thread panicked");
            }
        }
    }
}

/// The writer thread's state.
struct Writer {
    out: BufWriter<File>,
    line: Vec<u8>,
    flush_interval: Duration,
    /// Resolved at the first record, not at open: the log is opened before
    /// the Prometheus recorder is installed, and a handle taken then would
    /// count into the void (the series never appeared in `/metrics`).
    records: Option<metrics::Counter>,
    /// Like `records`.
    errors: Option<metrics::Counter>,
    /// In an error streak: warn once per streak, not once per record.
    failing: bool,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        // When the oldest unflushed record was written.
        let mut dirty_since: Option<Instant> = None;
        loop {
            let msg = match dirty_since {
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
                Some(since) => match rx.recv_deadline(since + self.flush_interval) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            match msg {
                Some(Msg::Record(at, event)) => {
                    self.write(at, &event);
                    dirty_since.get_or_insert_with(Instant::now);
                }
                Some(Msg::Sync(ack)) => {
                    self.flush();
                    dirty_since = None;
                    let _ = ack.send(());
                }
                None => {}
            }
            if dirty_since.is_some_and(|t| t.elapsed() >= self.flush_interval) {
                self.flush();
                dirty_since = None;
            }
        }
        self.flush();
    }

    fn write(&mut self, at: SystemTime, event: &Event) {
        self.line.clear();
        encode(&mut self.line, at, event);
        let result = self.out.write_all(&self.line);
        self.outcome(result, "write");
        self.records
            .get_or_insert_with(|| metrics::counter!(LOG_RECORDS))
            .increment(1);
    }

    fn flush(&mut self) {
        let result = self.out.flush();
        self.outcome(result, "flush");
    }

    fn outcome(&mut self, result: io::Result<()>, what: &str) {
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                self.errors
                    .get_or_insert_with(|| metrics::counter!(LOG_WRITE_ERRORS))
                    .increment(1);
                if !self.failing {
                    tracing::warn!(error = %e, "event log {what} failed");
                    self.failing = true;
                }
            }
        }
    }
}

/// One line: `{"ts":"...",` then the event's own fields, then LF.
fn encode(line: &mut Vec<u8>, at: SystemTime, event: &Event) {
    line.extend_from_slice(b"{\"ts\":\"");
    line.extend_from_slice(iso8601(at).as_bytes());
    line.extend_from_slice(b"\",");
    let start = line.len();
    // Serialising strings, numbers and addresses into a Vec cannot fail.
    serde_json::to_writer(&mut *line, event).expect("event serialises to JSON");
    // The event is an object (it always has "event"): drop its `{`.
    debug_assert_eq!(line[start], b'{');
    line.remove(start);
    line.push(b'\n');
}

fn display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn timestamp<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&iso8601(*t))
}

/// Seconds with millisecond precision.
fn seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_millis() as f64 / 1000.0)
}

/// `{"code":550,"status":"5.1.1","text":"..."}` (`status` null without an
/// enhanced code).
fn reply<S: Serializer>(r: &Reply, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("Reply", 3)?;
    st.serialize_field("code", &r.code())?;
    st.serialize_field("status", &r.enhanced().map(|e| e.to_string()))?;
    st.serialize_field("text", &r.text())?;
    st.end()
}

/// `2024-02-29T23:59:59.123Z`: ISO 8601 / RFC 3339 in UTC, milliseconds.
pub fn iso8601(t: SystemTime) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let secs = ms / 1000;
    let (y, m, d) = crate::server::date::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut s = String::with_capacity(24);
    let _ = write!(
        s,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    );
    s
}

#[cfg(test)]
mod tests;
