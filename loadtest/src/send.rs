//! `send`: N connections, each running SMTP transactions until the shared message budget
//! (or the duration limit) is used up. One OS thread per connection: send is meant for tens
//! to a few hundred connections, where blocking I/O is the simplest correct design.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, LineWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::body::{build_message, dot_stuff_into, BodyTemplate};
use crate::client::{read_reply, Reply};

/// How to use PIPELINING (RFC 2920).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pipelining {
    /// Pipeline when the server advertises PIPELINING.
    Auto,
    /// Always pipeline, even if not advertised (tests server robustness).
    On,
    /// Never pipeline: one command, one reply.
    Off,
}

/// Everything `send` needs; built from the command line.
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// Server to drive.
    pub target: SocketAddr,
    /// Concurrent connections (one thread each).
    pub connections: usize,
    /// Total messages to attempt over all connections.
    pub messages: u64,
    /// Approximate message size in bytes.
    pub size: usize,
    /// Recipients per message.
    pub recipients: usize,
    /// Number of distinct recipient domains, used round-robin.
    pub domains: u64,
    /// Envelope sender.
    pub from: String,
    /// Recipient template with `{n}` (global recipient counter) and `{domain}`.
    pub rcpt_template: String,
    /// PIPELINING policy.
    pub pipelining: Pipelining,
    /// Use BDAT when the server offers CHUNKING.
    pub chunking: bool,
    /// BDAT chunk size.
    pub chunk_size: usize,
    /// Reconnect after this many messages (0 = never).
    pub messages_per_connection: u64,
    /// Stop starting new transactions after this long.
    pub duration_limit: Option<Duration>,
    /// Socket read/write/connect timeout.
    pub io_timeout: Duration,
    /// Name sent in EHLO.
    pub helo: String,
    /// Where to append `queue-id<TAB>message-id` lines.
    pub ids_file: Option<PathBuf>,
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    fn from_hist(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles {
                count: 0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                max: 0.0,
            };
        }
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// Latencies reported by `send`.
#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    /// From the last byte of the message (final dot or BDAT LAST chunk) written to the
    /// final reply read: the server's "make it durable and answer" time.
    pub dot_to_reply: Percentiles,
    /// From MAIL written to final reply read: the whole transaction.
    pub transaction: Percentiles,
}

/// The `send` report (printed as one JSON object with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    /// Target address.
    pub target: String,
    /// Connections requested.
    pub connections: usize,
    /// Messages requested.
    pub messages_requested: u64,
    /// Transactions started (accepted + rejected + errors).
    pub attempted: u64,
    /// Messages with a 2xx final reply.
    pub accepted: u64,
    /// Messages refused by a reply code (MAIL, all RCPTs, DATA/BDAT, or final reply).
    pub rejected: u64,
    /// `rejected`, split by the refusing reply code.
    pub rejected_by_code: BTreeMap<u16, u64>,
    /// Individual recipients refused (in accepted or rejected messages).
    pub rcpt_rejected: u64,
    /// Transactions lost to I/O or protocol errors.
    pub errors: u64,
    /// First few distinct error messages with counts.
    pub error_samples: BTreeMap<String, u64>,
    /// TCP connections opened successfully.
    pub connections_opened: u64,
    /// Failed connection attempts (connect, greeting or EHLO).
    pub connect_errors: u64,
    /// Connections on which commands were pipelined.
    pub pipelined_connections: u64,
    /// Messages sent with BDAT.
    pub chunked_messages: u64,
    /// Size of each message in bytes (canonical, before stuffing).
    pub message_size: u64,
    /// Canonical bytes of accepted messages.
    pub bytes_accepted: u64,
    /// Queue ids captured from final replies.
    pub queue_ids_captured: u64,
    /// True if `--duration-limit` stopped the run before all messages were attempted.
    pub stopped_by_duration_limit: bool,
    /// Wall time of the run.
    pub elapsed_s: f64,
    /// Accepted messages per second.
    pub messages_per_s: f64,
    /// Accepted megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Latency percentiles in milliseconds.
    pub latency_ms: Latencies,
}

struct Shared {
    cfg: SendConfig,
    next: AtomicU64,
    next_rcpt: AtomicU64,
    deadline: Option<Instant>,
    hit_deadline: AtomicBool,
    ids: Option<Mutex<LineWriter<File>>>,
    run_id: String,
    tpl: BodyTemplate,
}

struct Worker {
    accepted: u64,
    rejected_by_code: BTreeMap<u16, u64>,
    rcpt_rejected: u64,
    errors: u64,
    error_samples: BTreeMap<String, u64>,
    connections_opened: u64,
    connect_errors: u64,
    pipelined_connections: u64,
    chunked_messages: u64,
    bytes_accepted: u64,
    queue_ids: u64,
    dot: Histogram<u64>,
    txn: Histogram<u64>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 10 min at 3 significant digits; values beyond saturate.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

impl Worker {
    fn new() -> Self {
        Worker {
            accepted: 0,
            rejected_by_code: BTreeMap::new(),
            rcpt_rejected: 0,
            errors: 0,
            error_samples: BTreeMap::new(),
            connections_opened: 0,
            connect_errors: 0,
            pipelined_connections: 0,
            chunked_messages: 0,
            bytes_accepted: 0,
            queue_ids: 0,
            dot: new_hist(),
            txn: new_hist(),
        }
    }

    fn note_error(&mut self, what: &str, e: &io::Error) {
        let key = format!("{what}: {e}");
        if self.error_samples.len() < 16 || self.error_samples.contains_key(&key) {
            *self.error_samples.entry(key).or_insert(0) += 1;
        }
    }

    fn merge(&mut self, o: Worker) {
        self.accepted += o.accepted;
        for (k, v) in o.rejected_by_code {
            *self.rejected_by_code.entry(k).or_insert(0) += v;
        }
        self.rcpt_rejected += o.rcpt_rejected;
        self.errors += o.errors;
        for (k, v) in o.error_samples {
            if self.error_samples.len() < 16 || self.error_samples.contains_key(&k) {
                *self.error_samples.entry(k).or_insert(0) += v;
            }
        }
        self.connections_opened += o.connections_opened;
        self.connect_errors += o.connect_errors;
        self.pipelined_connections += o.pipelined_connections;
        self.chunked_messages += o.chunked_messages;
        self.bytes_accepted += o.bytes_accepted;
        self.queue_ids += o.queue_ids;
        let _ = self.dot.add(&o.dot);
        let _ = self.txn.add(&o.txn);
    }
}

/// A connection after EHLO, with what the server offered.
struct Conn {
    reader: BufReader<TcpStream>,
    pipelining: bool,
    chunking: bool,
    size_ext: bool,
}

impl Conn {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.reader.get_ref().write_all(data)
    }

    fn reply(&mut self) -> io::Result<Reply> {
        read_reply(&mut self.reader)
    }

    fn cmd(&mut self, line: &str) -> io::Result<Reply> {
        self.write_all(line.as_bytes())?;
        self.reply()
    }
}

/// How a transaction ended (I/O errors are the `Err` case).
enum Outcome {
    Accepted { queue_id: Option<String> },
    Rejected { code: u16 },
}

/// Per-transaction timing and side counts.
struct TxnInfo {
    outcome: Outcome,
    rcpt_rejected: u64,
    dot_us: Option<u64>,
    /// Server said 421: it is closing the connection.
    closing: bool,
}

fn connect(shared: &Shared) -> io::Result<Conn> {
    let cfg = &shared.cfg;
    let stream = TcpStream::connect_timeout(&cfg.target, cfg.io_timeout)?;
    stream.set_read_timeout(Some(cfg.io_timeout))?;
    stream.set_write_timeout(Some(cfg.io_timeout))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let greet = read_reply(&mut reader)?;
    if greet.code != 220 {
        return Err(io::Error::other(format!(
            "greeting {} {}",
            greet.code,
            greet.lines.join(" ")
        )));
    }
    let mut conn = Conn {
        reader,
        pipelining: false,
        chunking: false,
        size_ext: false,
    };
    let ehlo = conn.cmd(&format!("EHLO {}\r\n", cfg.helo))?;
    if ehlo.code != 250 {
        return Err(io::Error::other(format!(
            "EHLO {} {}",
            ehlo.code,
            ehlo.lines.join(" ")
        )));
    }
    conn.pipelining = match cfg.pipelining {
        Pipelining::Auto => ehlo.has_extension("PIPELINING"),
        Pipelining::On => true,
        Pipelining::Off => false,
    };
    conn.chunking = cfg.chunking && ehlo.has_extension("CHUNKING");
    conn.size_ext = ehlo.has_extension("SIZE");
    Ok(conn)
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Runs one transaction. `raw` is the canonical message; `stuffed` its DATA form.
fn transaction(
    conn: &mut Conn,
    cfg: &SendConfig,
    rcpts: &[String],
    raw: &[u8],
    stuffed: &mut Vec<u8>,
) -> io::Result<TxnInfo> {
    let mut mail = format!("MAIL FROM:<{}>", cfg.from);
    if conn.size_ext {
        mail.push_str(&format!(" SIZE={}", raw.len()));
    }
    mail.push_str("\r\n");
    let rcpt_lines: Vec<String> = rcpts.iter().map(|r| format!("RCPT TO:<{r}>\r\n")).collect();
    let mut info = TxnInfo {
        outcome: Outcome::Rejected { code: 0 },
        rcpt_rejected: 0,
        dot_us: None,
        closing: false,
    };
    // First refusing code decides how a rejected message is classified.
    let mut first_refusal: Option<u16> = None;
    let mut refuse = |code: u16, info: &mut TxnInfo| {
        if code == 421 {
            info.closing = true;
        }
        first_refusal.get_or_insert(code);
    };

    // Envelope phase. Pipelined: MAIL + RCPTs (+ DATA) in one write, replies read in order.
    let mail_ok;
    let mut rcpt_ok = 0usize;
    if conn.pipelining {
        let mut batch = mail.clone().into_bytes();
        for l in &rcpt_lines {
            batch.extend_from_slice(l.as_bytes());
        }
        if !conn.chunking {
            batch.extend_from_slice(b"DATA\r\n");
        }
        conn.write_all(&batch)?;
        let r = conn.reply()?;
        mail_ok = r.is_positive();
        if !mail_ok {
            refuse(r.code, &mut info);
        }
        for _ in rcpts {
            let r = conn.reply()?;
            if r.is_positive() {
                rcpt_ok += 1;
            } else {
                info.rcpt_rejected += 1;
                if mail_ok {
                    refuse(r.code, &mut info);
                }
            }
        }
    } else {
        let r = conn.cmd(&mail)?;
        mail_ok = r.is_positive();
        if !mail_ok {
            refuse(r.code, &mut info);
        } else {
            for l in &rcpt_lines {
                let r = conn.cmd(l)?;
                if r.is_positive() {
                    rcpt_ok += 1;
                } else {
                    info.rcpt_rejected += 1;
                    refuse(r.code, &mut info);
                    if info.closing {
                        break;
                    }
                }
            }
        }
    }
    let envelope_ok = mail_ok && rcpt_ok > 0;

    let final_reply: Option<Reply>;
    if conn.chunking {
        // BDAT: the canonical bytes, no stuffing. Pipelined: chunks go out right behind the
        // envelope; the server must consume (and refuse) them if the envelope failed.
        if !envelope_ok && !conn.pipelining {
            final_reply = None;
        } else {
            let chunks: Vec<&[u8]> = if raw.is_empty() {
                vec![&[][..]]
            } else {
                raw.chunks(cfg.chunk_size.max(1)).collect()
            };
            let last_idx = chunks.len() - 1;
            let mut last = None;
            let mut t_dot = Instant::now();
            for (i, c) in chunks.iter().enumerate() {
                let hdr = if i == last_idx {
                    format!("BDAT {} LAST\r\n", c.len())
                } else {
                    format!("BDAT {}\r\n", c.len())
                };
                conn.write_all(hdr.as_bytes())?;
                conn.write_all(c)?;
                if i == last_idx {
                    t_dot = Instant::now();
                }
                if !conn.pipelining {
                    let r = conn.reply()?;
                    let ok = r.is_positive();
                    last = Some(r);
                    if !ok {
                        break;
                    }
                }
            }
            if conn.pipelining {
                // Keep the first refusal; otherwise the LAST chunk's reply is the final one.
                for _ in 0..chunks.len() {
                    let r = conn.reply()?;
                    if last.as_ref().is_none_or(Reply::is_positive) {
                        last = Some(r);
                    }
                }
            }
            info.dot_us = Some(micros(t_dot.elapsed()));
            final_reply = last;
        }
    } else if conn.pipelining {
        let r = conn.reply()?; // DATA reply
        if r.code == 354 {
            if envelope_ok {
                stuffed.clear();
                dot_stuff_into(raw, stuffed);
                conn.write_all(stuffed)?;
            } else {
                // Server accepted DATA with no valid recipient; end it empty (RFC 2920 3.1).
                conn.write_all(b".\r\n")?;
            }
            let t_dot = Instant::now();
            let fin = conn.reply()?;
            if envelope_ok {
                info.dot_us = Some(micros(t_dot.elapsed()));
            }
            final_reply = Some(fin);
        } else {
            final_reply = Some(r);
        }
    } else if envelope_ok {
        let r = conn.cmd("DATA\r\n")?;
        if r.code == 354 {
            stuffed.clear();
            dot_stuff_into(raw, stuffed);
            conn.write_all(stuffed)?;
            let t_dot = Instant::now();
            let fin = conn.reply()?;
            info.dot_us = Some(micros(t_dot.elapsed()));
            final_reply = Some(fin);
        } else {
            final_reply = Some(r);
        }
    } else {
        final_reply = None;
    }

    match final_reply {
        Some(r) if r.is_positive() && envelope_ok => {
            info.outcome = Outcome::Accepted {
                queue_id: r.queue_id(),
            };
        }
        Some(r) => {
            if !r.is_positive() {
                refuse(r.code, &mut info);
            }
            info.outcome = Outcome::Rejected {
                code: first_refusal.unwrap_or(r.code),
            };
        }
        None => {
            info.outcome = Outcome::Rejected {
                code: first_refusal.unwrap_or(0),
            };
        }
    }
    if matches!(info.outcome, Outcome::Rejected { .. }) && !info.closing {
        // Leave the session clean for the next transaction.
        let r = conn.cmd("RSET\r\n")?;
        if r.code == 421 {
            info.closing = true;
        }
    }
    Ok(info)
}

fn rcpt_for(template: &str, n: u64, domain: u64) -> String {
    template
        .replace("{n}", &n.to_string())
        .replace("{domain}", &domain.to_string())
}

fn run_worker(shared: Arc<Shared>, worker_idx: usize) -> Worker {
    let cfg = &shared.cfg;
    let mut w = Worker::new();
    let mut stuffed = Vec::new();
    let mut consecutive_connect_failures = 0u32;
    let mut done = false;
    while !done {
        if shared.next.load(Ordering::Relaxed) >= cfg.messages {
            break;
        }
        if shared.deadline.is_some_and(|d| Instant::now() >= d) {
            shared.hit_deadline.store(true, Ordering::Relaxed);
            break;
        }
        let mut conn = match connect(&shared) {
            Ok(c) => {
                consecutive_connect_failures = 0;
                w.connections_opened += 1;
                c
            }
            Err(e) => {
                w.connect_errors += 1;
                w.note_error("connect", &e);
                consecutive_connect_failures += 1;
                if consecutive_connect_failures >= 5 {
                    break;
                }
                // Brief back-off so a refusing server is not hammered; bounded by the count above.
                std::thread::sleep(Duration::from_millis(
                    50 * u64::from(consecutive_connect_failures),
                ));
                continue;
            }
        };
        if conn.pipelining {
            w.pipelined_connections += 1;
        }
        let mut on_this_conn = 0u64;
        let mut healthy = true;
        loop {
            if cfg.messages_per_connection > 0 && on_this_conn >= cfg.messages_per_connection {
                break;
            }
            if shared.deadline.is_some_and(|d| Instant::now() >= d) {
                shared.hit_deadline.store(true, Ordering::Relaxed);
                done = true;
                break;
            }
            let seq = shared.next.fetch_add(1, Ordering::Relaxed);
            if seq >= cfg.messages {
                done = true;
                break;
            }
            on_this_conn += 1;
            let base = shared
                .next_rcpt
                .fetch_add(cfg.recipients as u64, Ordering::Relaxed);
            let rcpts: Vec<String> = (0..cfg.recipients as u64)
                .map(|j| {
                    let n = base + j;
                    rcpt_for(&cfg.rcpt_template, n, n % cfg.domains.max(1))
                })
                .collect();
            let message_id = format!("{}.{}.{}@sluice-load.test", shared.run_id, worker_idx, seq);
            let msg = build_message(&shared.tpl, &cfg.from, &rcpts, message_id, seq);
            if conn.chunking {
                w.chunked_messages += 1;
            }
            let t0 = Instant::now();
            match transaction(&mut conn, cfg, &rcpts, &msg.raw, &mut stuffed) {
                Ok(info) => {
                    let txn_us = micros(t0.elapsed());
                    w.rcpt_rejected += info.rcpt_rejected;
                    match info.outcome {
                        Outcome::Accepted { queue_id } => {
                            w.accepted += 1;
                            w.bytes_accepted += msg.raw.len() as u64;
                            w.txn.saturating_record(txn_us.max(1));
                            if let Some(us) = info.dot_us {
                                w.dot.saturating_record(us.max(1));
                            }
                            if let Some(id) = queue_id {
                                w.queue_ids += 1;
                                if let Some(f) = &shared.ids {
                                    let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                                    let _ = writeln!(f, "{id}\t{}", msg.message_id);
                                }
                            }
                        }
                        Outcome::Rejected { code } => {
                            *w.rejected_by_code.entry(code).or_insert(0) += 1;
                        }
                    }
                    if info.closing {
                        healthy = false;
                        break;
                    }
                }
                Err(e) => {
                    w.errors += 1;
                    w.note_error("transaction", &e);
                    healthy = false;
                    break;
                }
            }
        }
        if healthy {
            // Polite close; its outcome does not affect the counts.
            let _ = conn.cmd("QUIT\r\n");
        }
    }
    w
}

/// Runs `send` and returns its report.
pub fn run(cfg: SendConfig) -> io::Result<SendReport> {
    let ids = match &cfg.ids_file {
        Some(p) => Some(Mutex::new(LineWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ))),
        None => None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        tpl: BodyTemplate::new(cfg.size),
        next: AtomicU64::new(0),
        next_rcpt: AtomicU64::new(0),
        deadline: cfg.duration_limit.map(|d| Instant::now() + d),
        hit_deadline: AtomicBool::new(false),
        ids,
        run_id: format!("{:x}.{:x}", now.as_nanos() as u64, std::process::id()),
        cfg: cfg.clone(),
    });
    let start = Instant::now();
    let mut handles = Vec::with_capacity(cfg.connections);
    for i in 0..cfg.connections.max(1) {
        let sh = Arc::clone(&shared);
        let h = std::thread::Builder::new()
            .name(format!("send-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || run_worker(sh, i))?;
        handles.push(h);
    }
    let mut total = Worker::new();
    for h in handles {
        match h.join() {
            Ok(w) => total.merge(w),
            Err(_) => total.errors += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let rejected: u64 = total.rejected_by_code.values().sum();
    Ok(SendReport {
        target: cfg.target.to_string(),
        connections: cfg.connections,
        messages_requested: cfg.messages,
        attempted: total.accepted + rejected + total.errors,
        accepted: total.accepted,
        rejected,
        rejected_by_code: total.rejected_by_code,
        rcpt_rejected: total.rcpt_rejected,
        errors: total.errors,
        error_samples: total.error_samples,
        connections_opened: total.connections_opened,
        connect_errors: total.connect_errors,
        pipelined_connections: total.pipelined_connections,
        chunked_messages: total.chunked_messages,
        message_size: total
            .bytes_accepted
            .checked_div(total.accepted)
            .unwrap_or(0),
        bytes_accepted: total.bytes_accepted,
        queue_ids_captured: total.queue_ids,
        stopped_by_duration_limit: shared.hit_deadline.load(Ordering::Relaxed)
            && shared.next.load(Ordering::Relaxed) < cfg.messages,
        elapsed_s: elapsed,
        messages_per_s: total.accepted as f64 / elapsed,
        mb_per_s: total.bytes_accepted as f64 / 1e6 / elapsed,
        latency_ms: Latencies {
            dot_to_reply: Percentiles::from_hist(&total.dot),
            transaction: Percentiles::from_hist(&total.txn),
        },
    })
}

/// Human-readable rendering of a report.
pub fn print_human(r: &SendReport) {
    println!("target            {}", r.target);
    println!(
        "messages          {} requested, {} attempted, {} accepted, {} rejected, {} errors",
        r.messages_requested, r.attempted, r.accepted, r.rejected, r.errors
    );
    if !r.rejected_by_code.is_empty() {
        let parts: Vec<String> = r
            .rejected_by_code
            .iter()
            .map(|(c, n)| format!("{c}: {n}"))
            .collect();
        println!("rejected by code  {}", parts.join(", "));
    }
    if r.rcpt_rejected > 0 {
        println!("rcpt rejected     {}", r.rcpt_rejected);
    }
    println!(
        "connections       {} opened, {} connect errors, {} pipelined; {} messages via BDAT",
        r.connections_opened, r.connect_errors, r.pipelined_connections, r.chunked_messages
    );
    println!(
        "throughput        {:.1} msg/s, {:.2} MB/s over {:.2} s (message size {} B)",
        r.messages_per_s, r.mb_per_s, r.elapsed_s, r.message_size
    );
    for (name, p) in [
        ("dot->reply ms", &r.latency_ms.dot_to_reply),
        ("transaction ms", &r.latency_ms.transaction),
    ] {
        println!(
            "{name:<17} p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  (n={})",
            p.p50, p.p90, p.p99, p.max, p.count
        );
    }
    if r.stopped_by_duration_limit {
        println!("note              stopped by --duration-limit");
    }
    for (e, n) in &r.error_samples {
        println!("error             {n} x {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcpt_template() {
        assert_eq!(rcpt_for("user{n}@d{domain}.test", 12, 3), "user12@d3.test");
        assert_eq!(rcpt_for("fixed@x.test", 12, 3), "fixed@x.test");
    }
}
