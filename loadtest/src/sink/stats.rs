//! The sink's counters: lock-free while serving, written to the stats file (coalesced) and
//! printed once per second while they change, and once more at exit.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::util::write_atomic;

/// Counters shared by the acceptor and all workers (relaxed atomics: exact totals, no
/// ordering between them needed). Each has the meaning of the [`SinkStats`] field of the
/// same name.
#[derive(Debug, Default)]
#[allow(missing_docs)]
pub struct Counters {
    pub connections_current: AtomicU64,
    pub connections_peak: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub transactions: AtomicU64,
    pub messages: AtomicU64,
    pub recipients: AtomicU64,
    pub recipients_seen: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_in: AtomicU64,
    pub messages_rejected: AtomicU64,
    pub fail_first_used: AtomicU64,
    pub tempfail_injected: AtomicU64,
    pub permfail_injected: AtomicU64,
    pub dropped: AtomicU64,
    pub rcpt_rejected: AtomicU64,
    pub rcpt_tempfail_injected: AtomicU64,
    pub rcpt_permfail_injected: AtomicU64,
    pub data_transfers: AtomicU64,
    pub bdat_transfers: AtomicU64,
    pub pipelined_commands: AtomicU64,
    pub connection_errors: AtomicU64,
    pub store_errors: AtomicU64,
    pub messages_without_id: AtomicU64,
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Stats file contents. The field names are a contract (tests and scripts read them).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SinkStats {
    /// First listen address (`listens` has them all).
    pub listen: String,
    /// Every bound listen address.
    pub listens: Vec<String>,
    /// Connections open now.
    pub connections_current: u64,
    /// Highest `connections_current` seen.
    pub connections_peak: u64,
    /// Connections accepted in total (including refused ones).
    pub connections_total: u64,
    /// Connections answered 421 because of `--max-connections`.
    pub connections_refused: u64,
    /// Transactions that reached the end of their data (accepted, refused or dropped).
    pub transactions: u64,
    /// Messages accepted (answered 250).
    pub messages: u64,
    /// Recipients of accepted messages.
    pub recipients: u64,
    /// Recipients accepted at RCPT time (whatever became of their message).
    pub recipients_seen: u64,
    /// Bytes of accepted messages (after dot-unstuffing).
    pub bytes: u64,
    /// Bytes read from all connections.
    pub bytes_in: u64,
    /// Messages refused at the data stage (injected, configured, too big, no recipients).
    pub messages_rejected: u64,
    /// Of those, refused by `--fail-first`.
    pub fail_first_used: u64,
    /// Of those, refused by `--tempfail-rate`.
    pub tempfail_injected: u64,
    /// Of those, refused by `--permfail-rate`.
    pub permfail_injected: u64,
    /// Connections closed instead of answering the final dot (`--drop-rate`).
    pub dropped: u64,
    /// RCPT commands refused (any reason).
    pub rcpt_rejected: u64,
    /// Of those, `tempfail-N@` addresses within their first N attempts.
    pub rcpt_tempfail_injected: u64,
    /// Of those, `permfail@` addresses.
    pub rcpt_permfail_injected: u64,
    /// Messages that ended with DATA.
    pub data_transfers: u64,
    /// Messages that ended with BDAT.
    pub bdat_transfers: u64,
    /// Replies produced for commands that arrived together with earlier ones in one read
    /// (the client pipelined).
    pub pipelined_commands: u64,
    /// Connections that ended with an I/O error.
    pub connection_errors: u64,
    /// Accepted messages that could not be stored (answered 451 instead).
    pub store_errors: u64,
    /// Accepted messages with neither `X-Sluice-Load-Id` nor `Message-ID` (`-` in `--received`).
    pub messages_without_id: u64,
    /// Seconds since the sink started.
    pub uptime_s: f64,
}

/// Counters plus what it takes to publish them.
#[derive(Debug)]
pub struct Stats {
    pub c: Counters,
    listens: Vec<String>,
    started: Instant,
    dirty: AtomicBool,
    writer: OnceLock<Thread>,
}

impl Stats {
    /// Counters for a sink listening on `listens`.
    pub fn new(listens: Vec<String>) -> Self {
        Stats {
            c: Counters::default(),
            listens,
            started: Instant::now(),
            dirty: AtomicBool::new(true),
            writer: OnceLock::new(),
        }
    }

    /// Tells the publisher something changed. Cheap when it already knows.
    pub fn touch(&self) {
        if !self.dirty.swap(true, Ordering::AcqRel) {
            if let Some(t) = self.writer.get() {
                t.unpark();
            }
        }
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> SinkStats {
        let c = &self.c;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SinkStats {
            listen: self.listens.first().cloned().unwrap_or_default(),
            listens: self.listens.clone(),
            connections_current: g(&c.connections_current),
            connections_peak: g(&c.connections_peak),
            connections_total: g(&c.connections_total),
            connections_refused: g(&c.connections_refused),
            transactions: g(&c.transactions),
            messages: g(&c.messages),
            recipients: g(&c.recipients),
            recipients_seen: g(&c.recipients_seen),
            bytes: g(&c.bytes),
            bytes_in: g(&c.bytes_in),
            messages_rejected: g(&c.messages_rejected),
            fail_first_used: g(&c.fail_first_used),
            tempfail_injected: g(&c.tempfail_injected),
            permfail_injected: g(&c.permfail_injected),
            dropped: g(&c.dropped),
            rcpt_rejected: g(&c.rcpt_rejected),
            rcpt_tempfail_injected: g(&c.rcpt_tempfail_injected),
            rcpt_permfail_injected: g(&c.rcpt_permfail_injected),
            data_transfers: g(&c.data_transfers),
            bdat_transfers: g(&c.bdat_transfers),
            pipelined_commands: g(&c.pipelined_commands),
            connection_errors: g(&c.connection_errors),
            store_errors: g(&c.store_errors),
            messages_without_id: g(&c.messages_without_id),
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// Writes the stats JSON atomically (temporary file + rename).
pub fn write_stats(path: &Path, s: &SinkStats) -> io::Result<()> {
    let mut json = serde_json::to_vec_pretty(s).map_err(io::Error::other)?;
    json.push(b'\n');
    write_atomic(path, &json)
}

/// One line of the per-second (and final) console report.
pub fn line(s: &SinkStats, prev: Option<&SinkStats>, dt: f64) -> String {
    let rate = |now: u64, before: u64| (now.saturating_sub(before)) as f64 / dt.max(1e-9);
    let (tps, mbps) = match prev {
        Some(p) => (
            format!(" ({:.0}/s)", rate(s.messages, p.messages)),
            format!(" ({:.1} MB/s)", rate(s.bytes, p.bytes) / 1e6),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "sink: conns {} (peak {}, total {}) tx {} msgs {}{tps} rcpts {} bytes {:.1} MB{mbps} \
         rejected {} rcpt-rejected {} dropped {}",
        s.connections_current,
        s.connections_peak,
        s.connections_total,
        s.transactions,
        s.messages,
        s.recipients,
        s.bytes as f64 / 1e6,
        s.messages_rejected,
        s.rcpt_rejected,
        s.dropped,
    )
}

/// Keeps the stats file current (at most ~50 writes/s, so it never competes with serving)
/// and prints a console line each second while anything changes. Runs forever.
pub fn publisher(stats: Arc<Stats>, path: Option<PathBuf>, quiet: bool) {
    let _ = stats.writer.set(std::thread::current());
    let mut last_print = Instant::now();
    let mut printed: Option<SinkStats> = None;
    let mut last_seen: Option<SinkStats> = None;
    loop {
        std::thread::park_timeout(Duration::from_millis(1000));
        let dirty = stats.dirty.swap(false, Ordering::AcqRel);
        let now = Instant::now();
        if dirty {
            let snap = stats.snapshot();
            if let Some(p) = &path {
                if let Err(e) = write_stats(p, &snap) {
                    eprintln!("sink: writing stats: {e}");
                }
            }
            last_seen = Some(snap);
        }
        if !quiet && now.duration_since(last_print) >= Duration::from_secs(1) {
            if let Some(snap) = &last_seen {
                let changed = printed.as_ref().is_none_or(|p| !same_counts(p, snap));
                if changed {
                    let dt = now.duration_since(last_print).as_secs_f64();
                    eprintln!("{}", line(snap, printed.as_ref(), dt));
                    printed = Some(snap.clone());
                }
            }
            last_print = now;
        }
        // Coalesce: under load the counters change constantly; one write per 20 ms is
        // prompt for a poller and costs nothing measurable.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn same_counts(a: &SinkStats, b: &SinkStats) -> bool {
    SinkStats {
        uptime_s: 0.0,
        ..a.clone()
    } == SinkStats {
        uptime_s: 0.0,
        ..b.clone()
    }
}
