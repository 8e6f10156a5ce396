//! Counting and reporting: per-worker tallies (merged at the end), live counters for the
//! progress display, and the final report (text and JSON).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Counters the progress display reads while the run goes on.
#[derive(Debug, Default)]
pub struct Live {
    /// Transactions started.
    pub attempted: AtomicU64,
    /// Messages answered 2xx at the end.
    pub accepted: AtomicU64,
    /// Messages refused by a reply code.
    pub rejected: AtomicU64,
    /// Messages lost to connection errors.
    pub errors: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Failed connection attempts.
    pub connect_errors: AtomicU64,
}

impl Live {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads one.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Latencies are recorded in microseconds, 1 µs .. 1 hour, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

/// Microseconds in `d`, at least 1 (the histogram's floor).
pub fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// One worker's view of the run.
#[derive(Debug)]
pub struct Tally {
    pub attempted: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub errors: u64,
    pub rcpt_rejected: u64,
    pub connections_opened: u64,
    pub connect_errors: u64,
    pub connection_errors: u64,
    pub pipelined_connections: u64,
    pub chunked_messages: u64,
    pub bytes_accepted: u64,
    pub queue_ids_captured: u64,
    /// Deciding reply code per message that got one.
    pub codes: BTreeMap<u16, u64>,
    /// Refusal codes per recipient.
    pub rcpt_codes: BTreeMap<u16, u64>,
    /// Error message -> count (bounded in distinct messages).
    pub error_samples: BTreeMap<String, u64>,
    /// Intended send time -> final reply (accepted messages).
    pub latency: Histogram<u64>,
    /// First command written -> final reply (accepted messages).
    pub transaction: Histogram<u64>,
    /// Last message byte written -> final reply (accepted messages).
    pub dot_to_reply: Histogram<u64>,
    /// When the last transaction ended.
    pub last_end: Option<Instant>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            attempted: 0,
            accepted: 0,
            rejected: 0,
            errors: 0,
            rcpt_rejected: 0,
            connections_opened: 0,
            connect_errors: 0,
            connection_errors: 0,
            pipelined_connections: 0,
            chunked_messages: 0,
            bytes_accepted: 0,
            queue_ids_captured: 0,
            codes: BTreeMap::new(),
            rcpt_codes: BTreeMap::new(),
            error_samples: BTreeMap::new(),
            latency: new_hist(),
            transaction: new_hist(),
            dot_to_reply: new_hist(),
            last_end: None,
        }
    }
}

const MAX_ERROR_KINDS: usize = 32;

impl Tally {
    /// Remembers an error message (the first few kinds, with counts).
    pub fn note_error(&mut self, what: String) {
        if let Some(n) = self.error_samples.get_mut(&what) {
            *n += 1;
        } else if self.error_samples.len() < MAX_ERROR_KINDS {
            self.error_samples.insert(what, 1);
        } else {
            *self
                .error_samples
                .entry("(other errors)".into())
                .or_insert(0) += 1;
        }
    }

    /// Adds another worker's tally to this one.
    pub fn merge(&mut self, o: Tally) {
        self.attempted += o.attempted;
        self.accepted += o.accepted;
        self.rejected += o.rejected;
        self.errors += o.errors;
        self.rcpt_rejected += o.rcpt_rejected;
        self.connections_opened += o.connections_opened;
        self.connect_errors += o.connect_errors;
        self.connection_errors += o.connection_errors;
        self.pipelined_connections += o.pipelined_connections;
        self.chunked_messages += o.chunked_messages;
        self.bytes_accepted += o.bytes_accepted;
        self.queue_ids_captured += o.queue_ids_captured;
        for (k, v) in o.codes {
            *self.codes.entry(k).or_insert(0) += v;
        }
        for (k, v) in o.rcpt_codes {
            *self.rcpt_codes.entry(k).or_insert(0) += v;
        }
        for (k, v) in o.error_samples {
            if let Some(n) = self.error_samples.get_mut(&k) {
                *n += v;
            } else if self.error_samples.len() < MAX_ERROR_KINDS {
                self.error_samples.insert(k, v);
            } else {
                *self
                    .error_samples
                    .entry("(other errors)".into())
                    .or_insert(0) += v;
            }
        }
        let _ = self.latency.add(&o.latency);
        let _ = self.transaction.add(&o.transaction);
        let _ = self.dot_to_reply.add(&o.dot_to_reply);
        self.last_end = match (self.last_end, o.last_end) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Percentiles of one latency histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LatencyMs {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencyMs {
    fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencyMs::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencyMs {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// The latency section of the report.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latencies {
    /// From the message's intended send time (open loop: its slot in the schedule; closed
    /// loop: when a connection took it) to the final reply. The headline number.
    pub from_intended: LatencyMs,
    /// From the first command of the transaction written to the final reply.
    pub transaction: LatencyMs,
    /// From the last message byte written to the final reply (the server's
    /// make-it-durable-and-answer time).
    pub dot_to_reply: LatencyMs,
}

/// The final report; field names are a contract for scripts (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    pub run_id: String,
    pub target: String,
    pub connections: usize,
    pub threads: usize,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Open loop: the requested messages per second.
    pub rate_target: Option<f64>,
    pub messages_requested: Option<u64>,
    pub duration_requested_s: Option<f64>,
    /// Transactions started (`accepted + rejected + errors`).
    pub attempted: u64,
    /// Messages with a 2xx final reply.
    pub accepted: u64,
    /// Messages refused by a reply code.
    pub rejected: u64,
    /// Messages lost to I/O or protocol errors (including the ones aborted at the end).
    pub errors: u64,
    /// Messages of a count-bounded run that never started (no connection left).
    pub not_attempted: u64,
    /// Messages by class of their deciding reply code (`2xx`, `4xx`, `5xx`).
    pub replies: BTreeMap<String, u64>,
    /// Messages by deciding reply code (the final reply, or the MAIL/RCPT/DATA refusal).
    pub codes: BTreeMap<String, u64>,
    /// `codes` without the 2xx ones.
    pub rejected_by_code: BTreeMap<String, u64>,
    /// Individual recipients refused.
    pub rcpt_rejected: u64,
    /// Refused recipients by code.
    pub rcpt_codes: BTreeMap<String, u64>,
    /// Successful connections (including reconnects).
    pub connections_opened: u64,
    /// Failed attempts to connect, or to get through greeting and EHLO.
    pub connect_errors: u64,
    /// Established connections lost to an error (reset, timeout, bad reply).
    pub connection_errors: u64,
    /// Error message -> count.
    pub error_samples: BTreeMap<String, u64>,
    pub pipelined_connections: u64,
    pub chunked_messages: u64,
    /// Mean canonical size of accepted messages in bytes.
    pub message_size: u64,
    pub bytes_accepted: u64,
    pub queue_ids_captured: u64,
    pub stopped_by_duration_limit: bool,
    /// Stopped by SIGINT/SIGTERM.
    pub interrupted: bool,
    /// From the start of the measured window (all connections up) to the last
    /// transaction's end.
    pub elapsed_s: f64,
    /// Before the window: preparing bodies and establishing the connections.
    pub setup_s: f64,
    /// After the window: QUIT on every connection and the workers' exit.
    pub wind_down_s: f64,
    /// `accepted / elapsed_s`.
    pub messages_per_s: f64,
    /// `attempted / elapsed_s`: the offered rate (open loop: compare with `rate_target`).
    pub attempted_per_s: f64,
    pub mb_per_s: f64,
    pub latency_ms: Latencies,
}

/// What `build` needs besides the tally.
pub struct RunFacts {
    pub run_id: String,
    pub target: String,
    pub connections: usize,
    pub threads: usize,
    pub rate: Option<f64>,
    pub messages: Option<u64>,
    pub duration: Option<Duration>,
    pub elapsed: Duration,
    pub setup: Duration,
    pub wind_down: Duration,
    pub stopped_by_duration_limit: bool,
    pub interrupted: bool,
}

/// Assembles the report.
pub fn build(t: &Tally, f: RunFacts) -> SendReport {
    let secs = f.elapsed.as_secs_f64().max(1e-9);
    let mut replies = BTreeMap::new();
    let mut codes = BTreeMap::new();
    let mut rejected_by_code = BTreeMap::new();
    for (&code, &n) in &t.codes {
        *replies.entry(format!("{}xx", code / 100)).or_insert(0) += n;
        codes.insert(code.to_string(), n);
        if !(200..300).contains(&code) {
            rejected_by_code.insert(code.to_string(), n);
        }
    }
    SendReport {
        run_id: f.run_id,
        target: f.target,
        connections: f.connections,
        threads: f.threads,
        mode: if f.rate.is_some() { "open" } else { "closed" },
        rate_target: f.rate,
        messages_requested: f.messages,
        duration_requested_s: f.duration.map(|d| d.as_secs_f64()),
        attempted: t.attempted,
        accepted: t.accepted,
        rejected: t.rejected,
        errors: t.errors,
        not_attempted: f.messages.map_or(0, |m| m.saturating_sub(t.attempted)),
        replies,
        codes,
        rejected_by_code,
        rcpt_rejected: t.rcpt_rejected,
        rcpt_codes: t
            .rcpt_codes
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        connections_opened: t.connections_opened,
        connect_errors: t.connect_errors,
        connection_errors: t.connection_errors,
        error_samples: t.error_samples.clone(),
        pipelined_connections: t.pipelined_connections,
        chunked_messages: t.chunked_messages,
        message_size: t.bytes_accepted.checked_div(t.accepted).unwrap_or(0),
        bytes_accepted: t.bytes_accepted,
        queue_ids_captured: t.queue_ids_captured,
        stopped_by_duration_limit: f.stopped_by_duration_limit,
        interrupted: f.interrupted,
        elapsed_s: secs,
        setup_s: f.setup.as_secs_f64(),
        wind_down_s: f.wind_down.as_secs_f64(),
        messages_per_s: t.accepted as f64 / secs,
        attempted_per_s: t.attempted as f64 / secs,
        mb_per_s: t.bytes_accepted as f64 / 1e6 / secs,
        latency_ms: Latencies {
            from_intended: LatencyMs::from_hist(&t.latency),
            transaction: LatencyMs::from_hist(&t.transaction),
            dot_to_reply: LatencyMs::from_hist(&t.dot_to_reply),
        },
    }
}

/// The human-readable report.
pub fn render_text(r: &SendReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let mode = match r.rate_target {
        Some(rate) => format!("open loop at {rate}/s"),
        None => "closed loop".into(),
    };
    let _ = writeln!(
        s,
        "sluice-load send: {} via {} connections ({} threads), {mode}, run {}",
        r.target, r.connections, r.threads, r.run_id
    );
    let _ = writeln!(
        s,
        "  messages:   {} attempted, {} accepted, {} rejected, {} errors{}",
        r.attempted,
        r.accepted,
        r.rejected,
        r.errors,
        if r.not_attempted > 0 {
            format!(", {} not attempted", r.not_attempted)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "  throughput: {:.0} msg/s accepted ({:.0} offered), {:.1} MB/s, {:.2} s \
         (+{:.2} s setup, +{:.2} s wind-down), mean size {} B",
        r.messages_per_s,
        r.attempted_per_s,
        r.mb_per_s,
        r.elapsed_s,
        r.setup_s,
        r.wind_down_s,
        r.message_size
    );
    let lat = |name: &str, l: &LatencyMs, s: &mut String| {
        let _ = writeln!(
            s,
            "  {name:<13} p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms  (n={})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        );
    };
    lat("latency:", &r.latency_ms.from_intended, &mut s);
    lat("transaction:", &r.latency_ms.transaction, &mut s);
    lat("dot-to-reply:", &r.latency_ms.dot_to_reply, &mut s);
    let classes: Vec<String> = r.replies.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let codes: Vec<String> = r.codes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let _ = writeln!(
        s,
        "  replies:    {} ({})",
        if classes.is_empty() {
            "none".into()
        } else {
            classes.join(", ")
        },
        codes.join(", ")
    );
    if r.rcpt_rejected > 0 {
        let codes: Vec<String> = r
            .rcpt_codes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(
            s,
            "  recipients refused: {} ({})",
            r.rcpt_rejected,
            codes.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "  connections: {} opened, {} connect errors, {} lost; {} pipelined, {} messages by BDAT",
        r.connections_opened,
        r.connect_errors,
        r.connection_errors,
        r.pipelined_connections,
        r.chunked_messages
    );
    for (e, n) in &r.error_samples {
        let _ = writeln!(s, "  error: {n} x {e}");
    }
    if r.stopped_by_duration_limit {
        let _ = writeln!(s, "  (stopped by the duration limit)");
    }
    if r.interrupted {
        let _ = writeln!(s, "  (interrupted)");
    }
    s
}
