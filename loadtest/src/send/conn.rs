//! One client connection of the generator: a nonblocking socket and the SMTP dialogue as a
//! small state machine over an expectation queue. Replies are parsed by Sluice's own
//! [`Reply::parse`]; commands are formatted here (formatting is not parsing), message bytes
//! come prepared (and dot-stuffed) from the corpus.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use sluice::smtp::Reply;

use super::report::{micros, Live, Tally};
use super::schedule::Claim;
use super::{Pipelining, Shared};
use crate::message::{write_headers, Body, Headers};

/// The reply the next one from the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    Rset,
    Mail,
    Rcpt,
    Data,
    Bdat { last: bool },
    Final,
    Quit,
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting to (re)connect.
    Backoff(Instant),
    /// TCP connect in progress.
    Connecting,
    /// Greeting / EHLO.
    Handshake,
    /// Established and idle: ready for a message.
    Ready,
    /// A transaction is in flight.
    Busy,
    /// QUIT sent.
    Quitting,
    /// Closed for good.
    Done,
}

/// Server extensions that change how we talk.
#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    pipelining: bool,
    chunking: bool,
    size: bool,
}

/// One message in flight.
struct Tx {
    claim: Claim,
    id: String,
    started: Instant,
    dot_at: Option<Instant>,
    /// The last message byte is queued but not yet handed to the kernel.
    dot_queued: bool,
    rcpts: Vec<String>,
    next_rcpt: usize,
    mail_sent: bool,
    accepted_rcpts: usize,
    mail_fail: Option<u16>,
    rcpt_fail: Option<u16>,
    data_fail: Option<u16>,
    /// Header block, then `body`: the canonical message.
    headers: Vec<u8>,
    body: Arc<Body>,
    /// BDAT: the canonical message and how much of it has been sent.
    chunked: Option<(Vec<u8>, usize)>,
}

impl Tx {
    fn size(&self) -> usize {
        self.headers.len() + self.body.raw.len()
    }
}

/// Per-worker mutable state the connections share.
pub struct Local {
    /// This worker's counts and histograms.
    pub tally: Tally,
    /// `--acked` lines not yet written.
    pub acked: Vec<u8>,
    /// `--ids-file` lines not yet written.
    pub ids: Vec<u8>,
    /// RFC 5322 date of the current second (formatting it per message would be waste).
    date: (u64, String),
    /// A connection wants to reconnect now: run the timers at once, not at the next tick.
    pub kick: bool,
}

impl Local {
    /// Fresh state.
    pub fn new() -> Self {
        Local {
            tally: Tally::default(),
            acked: Vec::new(),
            ids: Vec::new(),
            date: (u64::MAX, String::new()),
            kick: false,
        }
    }

    fn date(&mut self) -> &str {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.date.0 != secs {
            self.date = (secs, crate::util::rfc5322_date(secs));
        }
        &self.date.1
    }
}

/// One connection slot: it connects, runs transactions, and reconnects after failures or
/// after `--messages-per-connection`, until the run ends or it gives up.
pub struct Conn {
    token: Token,
    target: SocketAddr,
    stream: Option<TcpStream>,
    pub phase: Phase,
    input: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    expect: VecDeque<Expect>,
    caps: Caps,
    pipelining: bool,
    tx: Option<Tx>,
    /// Transactions on the current connection.
    on_this_connection: u64,
    /// A failed transaction may have left server state behind: RSET before the next MAIL.
    needs_rset: bool,
    /// Consecutive failures to establish a connection.
    failures: u32,
    /// When we give up waiting for the server.
    deadline: Option<Instant>,
    established: bool,
    /// The run is ending: no reconnects.
    finishing: bool,
}

impl Conn {
    /// A slot that connects at once.
    pub fn new(token: Token, target: SocketAddr, now: Instant) -> Conn {
        Conn {
            token,
            target,
            stream: None,
            phase: Phase::Backoff(now),
            input: Vec::with_capacity(1024),
            out: Vec::with_capacity(8192),
            out_pos: 0,
            expect: VecDeque::new(),
            caps: Caps::default(),
            pipelining: false,
            tx: None,
            on_this_connection: 0,
            needs_rset: false,
            failures: 0,
            deadline: None,
            established: false,
            finishing: false,
        }
    }

    /// Starts a TCP connect (nonblocking).
    pub fn connect(&mut self, sh: &Shared, w: &mut Local, registry: &Registry, now: Instant) {
        self.reset_connection_state();
        let result = TcpStream::connect(self.target).and_then(|mut s| {
            registry.register(&mut s, self.token, Interest::READABLE | Interest::WRITABLE)?;
            Ok(s)
        });
        match result {
            Ok(s) => {
                self.stream = Some(s);
                self.phase = Phase::Connecting;
                self.deadline = Some(now + sh.cfg.io_timeout);
            }
            Err(e) => self.connect_failed(sh, w, registry, now, format!("connect: {e}")),
        }
    }

    fn reset_connection_state(&mut self) {
        self.input.clear();
        self.out.clear();
        self.out_pos = 0;
        self.expect.clear();
        self.caps = Caps::default();
        self.pipelining = false;
        self.on_this_connection = 0;
        self.needs_rset = false;
        self.established = false;
    }

    fn close_socket(&mut self, registry: &Registry) {
        if let Some(mut s) = self.stream.take() {
            let _ = registry.deregister(&mut s);
        }
        self.deadline = None;
    }

    /// Could not get a usable connection: retry with backoff, or give up.
    fn connect_failed(
        &mut self,
        sh: &Shared,
        w: &mut Local,
        registry: &Registry,
        now: Instant,
        why: String,
    ) {
        self.close_socket(registry);
        w.tally.connect_errors += 1;
        Live::inc(&sh.live.connect_errors);
        w.tally.note_error(format!("{}: {why}", self.target));
        self.failures += 1;
        if self.failures >= sh.cfg.connect_attempts {
            self.phase = Phase::Done;
        } else {
            let backoff = Duration::from_millis(100 << (self.failures - 1).min(4));
            self.phase = Phase::Backoff(now + backoff);
        }
    }

    /// An established connection broke: the message in flight is lost (counted as an
    /// error) and the slot reconnects.
    fn connection_lost(
        &mut self,
        sh: &Shared,
        w: &mut Local,
        registry: &Registry,
        now: Instant,
        why: String,
    ) {
        if !self.established {
            return self.connect_failed(sh, w, registry, now, why);
        }
        self.close_socket(registry);
        self.established = false;
        sh.live
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        w.tally.connection_errors += 1;
        if let Some(tx) = self.tx.take() {
            w.tally.errors += 1;
            Live::inc(&sh.live.errors);
            w.tally.last_end = Some(now);
            w.tally
                .note_error(format!("{why} (message {} lost)", tx.claim.idx));
        } else {
            w.tally.note_error(why);
        }
        self.phase = Phase::Backoff(now);
        w.kick = true;
    }

    /// Handles readiness of this connection's socket.
    pub fn on_event(
        &mut self,
        sh: &Shared,
        w: &mut Local,
        registry: &Registry,
        ready: &mut Vec<usize>,
        ev: &mio::event::Event,
        buf: &mut [u8],
    ) {
        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
        // A FIN behind the data raises no new edge: read to the end then.
        let drain = ev.is_read_closed() || ev.is_error();
        let writable = ev.is_writable();
        let now = Instant::now();
        if self.phase == Phase::Connecting {
            let Some(s) = &self.stream else { return };
            if !(writable || readable) {
                return;
            }
            match s.take_error() {
                Ok(Some(e)) | Err(e) => {
                    return self.connect_failed(sh, w, registry, now, format!("connect: {e}"))
                }
                Ok(None) => {}
            }
            match s.peer_addr() {
                Ok(_) => {
                    let _ = s.set_nodelay(true);
                    self.phase = Phase::Handshake;
                    self.expect.push_back(Expect::Greeting);
                    self.deadline = Some(now + sh.cfg.io_timeout);
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // not yet
                Err(e) => {
                    return self.connect_failed(sh, w, registry, now, format!("connect: {e}"))
                }
            }
        }
        if writable && self.has_output() {
            self.flush(sh, w, registry, now);
        }
        if readable {
            self.read(sh, w, registry, ready, buf, drain);
        }
    }

    fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Reads what the socket has, handling every complete reply. A short read drained the
    /// socket (later data raises a new edge), so the read that would only say EAGAIN is
    /// skipped unless `drain` is set.
    fn read(
        &mut self,
        sh: &Shared,
        w: &mut Local,
        registry: &Registry,
        ready: &mut Vec<usize>,
        buf: &mut [u8],
        drain: bool,
    ) {
        loop {
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            match s.read(buf) {
                Ok(0) => {
                    let now = Instant::now();
                    if self.phase == Phase::Quitting {
                        return self.quit_done(sh, w, registry, now);
                    }
                    let what = self
                        .expect
                        .front()
                        .map_or("idle".to_string(), |e| format!("waiting for {e:?} reply"));
                    return self.connection_lost(
                        sh,
                        w,
                        registry,
                        now,
                        format!("connection closed by the server ({what})"),
                    );
                }
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    if !self.parse_replies(sh, w, registry, ready) {
                        return;
                    }
                    if n < buf.len() && !drain {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let now = Instant::now();
                    if self.phase == Phase::Quitting {
                        return self.quit_done(sh, w, registry, now);
                    }
                    return self.connection_lost(sh, w, registry, now, format!("read: {e}"));
                }
            }
        }
        if self.has_output() {
            self.flush(sh, w, registry, Instant::now());
        }
    }

    /// Handles the complete replies in the input buffer. Returns false once the connection
    /// was closed.
    fn parse_replies(
        &mut self,
        sh: &Shared,
        w: &mut Local,
        registry: &Registry,
        ready: &mut Vec<usize>,
    ) -> bool {
        let mut pos = 0;
        let mut alive = true;
        while alive {
            match Reply::parse(&self.input[pos..]) {
                Ok(Some((reply, n))) => {
                    pos += n;
                    alive = self.on_reply(sh, w, registry, ready, reply);
                }
                Ok(None) => break,
                Err(e) => {
                    let now = Instant::now();
                    self.connection_lost(sh, w, registry, now, format!("bad reply: {e}"));
                    alive = false;
                }
            }
        }
        if alive {
            self.input.drain(..pos);
        }
        alive
    }

    /// One reply. Returns false once the connection was closed.
    fn on_reply(
        &mut self,
        sh: &Shared,
        w: &mut Local,
        registry: &Registry,
        ready: &mut Vec<usize>,
        r: Reply,
    ) -> bool {
        let now = Instant::now();
        let Some(exp) = self.expect.pop_front() else {
            self.connection_lost(
                sh,
                w,
                registry,
                now,
                format!("unexpected reply {} {}", r.code(), r.text()),
            );
            return false;
        };
        let code = r.code();
        let ok = r.is_positive();
        if code == 421 && exp != Expect::Quit {
            // The server is closing the channel (RFC 5321 §3.8): whatever was in flight got
            // its answer, the connection is done.
            if self.tx.is_some() {
                self.finish(sh, w, code, None, false, now);
            }
            w.tally
                .note_error(format!("{}: 421 {}", self.target, r.text()));
            self.close_socket(registry);
            if self.established {
                self.established = false;
                sh.live
                    .connections
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                self.phase = Phase::Backoff(now + Duration::from_millis(50));
            } else {
                w.tally.connect_errors += 1;
                Live::inc(&sh.live.connect_errors);
                self.failures += 1;
                self.phase = if self.failures >= sh.cfg.connect_attempts {
                    Phase::Done
                } else {
                    Phase::Backoff(now + Duration::from_millis(100))
                };
            }
            return false;
        }
        match exp {
            Expect::Greeting => {
                if code != 220 {
                    self.connect_failed(
                        sh,
                        w,
                        registry,
                        now,
                        format!("greeting {code} {}", r.text()),
                    );
                    return false;
                }
                let _ = write!(self.out, "EHLO {}\r\n", sh.cfg.helo);
                self.expect.push_back(Expect::Ehlo);
            }
            Expect::Ehlo | Expect::Helo => {
                if !ok {
                    if exp == Expect::Ehlo {
                        let _ = write!(self.out, "HELO {}\r\n", sh.cfg.helo);
                        self.expect.push_back(Expect::Helo);
                    } else {
                        self.connect_failed(
                            sh,
                            w,
                            registry,
                            now,
                            format!("HELO refused: {code} {}", r.text()),
                        );
                        return false;
                    }
                } else {
                    if exp == Expect::Ehlo {
                        self.caps = caps_of(&r);
                    }
                    self.pipelining = match sh.cfg.pipelining {
                        Pipelining::Auto => self.caps.pipelining,
                        Pipelining::On => true,
                        Pipelining::Off => false,
                    };
                    self.established = true;
                    self.failures = 0;
                    w.tally.connections_opened += 1;
                    Live::inc(&sh.live.connections);
                    if self.pipelining {
                        w.tally.pipelined_connections += 1;
                    }
                    self.phase = Phase::Ready;
                    ready.push(self.token.0);
                }
            }
            Expect::Rset => {
                if let Some(tx) = &self.tx {
                    if !tx.mail_sent {
                        self.send_envelope(sh);
                    }
                }
            }
            Expect::Mail => {
                let sequential = !self.pipelining;
                if let Some(tx) = self.tx.as_mut() {
                    if !ok {
                        tx.mail_fail = Some(code);
                    }
                    if sequential {
                        if ok {
                            self.send_next_rcpt();
                        } else {
                            self.finish(sh, w, code, None, false, now);
                            self.after_tx(sh, ready, now);
                        }
                    }
                }
            }
            Expect::Rcpt => {
                let sequential = !self.pipelining;
                if !ok {
                    w.tally.rcpt_rejected += 1;
                    *w.tally.rcpt_codes.entry(code).or_insert(0) += 1;
                }
                if let Some(tx) = self.tx.as_mut() {
                    if ok {
                        tx.accepted_rcpts += 1;
                    } else {
                        tx.rcpt_fail.get_or_insert(code);
                    }
                    if sequential {
                        if tx.next_rcpt < tx.rcpts.len() {
                            self.send_next_rcpt();
                        } else if tx.accepted_rcpts > 0 {
                            self.send_data_phase(sh);
                        } else {
                            self.finish(sh, w, code, None, true, now);
                            self.after_tx(sh, ready, now);
                        }
                    }
                }
            }
            Expect::Data => {
                if let Some(tx) = self.tx.as_mut() {
                    if code == 354 {
                        if tx.accepted_rcpts > 0 && tx.mail_fail.is_none() {
                            self.out.extend_from_slice(&tx.headers);
                            self.out.extend_from_slice(&tx.body.stuffed);
                        }
                        // RFC 2920 §3.1: after 354 the client must send a message, if
                        // only an empty one when every recipient was refused.
                        self.out.extend_from_slice(b".\r\n");
                        tx.dot_queued = true;
                        self.expect.push_back(Expect::Final);
                        self.deadline = Some(now + sh.cfg.io_timeout);
                    } else {
                        tx.data_fail.get_or_insert(code);
                        self.finish(sh, w, code, None, true, now);
                        self.after_tx(sh, ready, now);
                    }
                }
            }
            Expect::Bdat { last } => {
                let sequential = !self.pipelining;
                if let Some(tx) = self.tx.as_mut() {
                    if !ok {
                        tx.data_fail.get_or_insert(code);
                    }
                    if last {
                        let q = if sh.ids_file.is_some() {
                            r.lines().find_map(queue_id)
                        } else {
                            None
                        };
                        self.finish(sh, w, code, q, false, now);
                        self.after_tx(sh, ready, now);
                    } else if sequential {
                        if ok {
                            self.send_chunk(sh);
                        } else {
                            self.finish(sh, w, code, None, true, now);
                            self.after_tx(sh, ready, now);
                        }
                    }
                }
            }
            Expect::Final => {
                let q = if sh.ids_file.is_some() {
                    r.lines().find_map(queue_id)
                } else {
                    None
                };
                self.finish(sh, w, code, q, false, now);
                self.after_tx(sh, ready, now);
            }
            Expect::Quit => {
                self.quit_done(sh, w, registry, now);
                return false;
            }
        }
        // Waiting for the server again (or not): a silent server is cut off after
        // --io-timeout of silence, not of total transaction time.
        self.deadline =
            (!self.expect.is_empty() || self.has_output()).then(|| now + sh.cfg.io_timeout);
        true
    }

    /// Takes a message: formats its envelope and headers and sends what the dialogue allows.
    pub fn start(&mut self, sh: &Shared, w: &mut Local, claim: Claim, now: Instant) {
        let cfg = &sh.cfg;
        let body = Arc::clone(sh.corpus.body_for(claim.idx));
        let id = format!("{}-{}", sh.run_id, claim.idx);
        let rcpts: Vec<String> = (0..cfg.recipients as u64)
            .map(|k| {
                let n = claim.idx * cfg.recipients as u64 + k;
                rcpt_for(&cfg.rcpt_template, n, n % cfg.domains)
            })
            .collect();
        let mut headers = Vec::with_capacity(crate::message::HEADER_ESTIMATE);
        let date = w.date().to_string();
        write_headers(
            &mut headers,
            &Headers {
                from: &cfg.from,
                to: &rcpts,
                id: &id,
                seq: claim.idx,
                date: &date,
            },
            &body,
        );
        let chunking = cfg.chunking && self.caps.chunking;
        let mut tx = Tx {
            claim,
            id,
            started: now,
            dot_at: None,
            dot_queued: false,
            rcpts,
            next_rcpt: 0,
            mail_sent: false,
            accepted_rcpts: 0,
            mail_fail: None,
            rcpt_fail: None,
            data_fail: None,
            headers,
            body,
            chunked: None,
        };
        if chunking {
            let mut m = Vec::with_capacity(tx.size());
            m.extend_from_slice(&tx.headers);
            m.extend_from_slice(&tx.body.raw);
            tx.chunked = Some((m, 0));
            w.tally.chunked_messages += 1;
        }
        w.tally.attempted += 1;
        Live::inc(&sh.live.attempted);
        self.tx = Some(tx);
        self.phase = Phase::Busy;
        self.on_this_connection += 1;
        self.deadline = Some(now + cfg.io_timeout);
        if std::mem::take(&mut self.needs_rset) {
            self.out.extend_from_slice(b"RSET\r\n");
            self.expect.push_back(Expect::Rset);
            if !self.pipelining {
                return; // MAIL follows the RSET reply
            }
        }
        self.send_envelope(sh);
    }

    /// MAIL (and, pipelined, everything up to DATA or all of BDAT).
    fn send_envelope(&mut self, sh: &Shared) {
        let size_param = self.caps.size;
        let Some(tx) = self.tx.as_mut() else { return };
        tx.mail_sent = true;
        let _ = write!(self.out, "MAIL FROM:<{}>", sh.cfg.from);
        if size_param {
            let _ = write!(self.out, " SIZE={}", tx.size());
        }
        self.out.extend_from_slice(b"\r\n");
        self.expect.push_back(Expect::Mail);
        if !self.pipelining {
            return;
        }
        while tx.next_rcpt < tx.rcpts.len() {
            let _ = write!(self.out, "RCPT TO:<{}>\r\n", tx.rcpts[tx.next_rcpt]);
            tx.next_rcpt += 1;
            self.expect.push_back(Expect::Rcpt);
        }
        self.send_data_phase(sh);
    }

    fn send_next_rcpt(&mut self) {
        let Some(tx) = self.tx.as_mut() else { return };
        let _ = write!(self.out, "RCPT TO:<{}>\r\n", tx.rcpts[tx.next_rcpt]);
        tx.next_rcpt += 1;
        self.expect.push_back(Expect::Rcpt);
    }

    /// DATA, or the BDAT chunks (all of them when pipelining, else the first).
    fn send_data_phase(&mut self, sh: &Shared) {
        let chunked = self.tx.as_ref().is_some_and(|t| t.chunked.is_some());
        if !chunked {
            self.out.extend_from_slice(b"DATA\r\n");
            self.expect.push_back(Expect::Data);
            return;
        }
        self.send_chunk(sh);
        if self.pipelining {
            while self
                .tx
                .as_ref()
                .is_some_and(|t| t.chunked.as_ref().is_some_and(|(m, off)| *off < m.len()))
            {
                self.send_chunk(sh);
            }
        }
    }

    /// The next BDAT chunk (`LAST` on the final one; an empty message is one `BDAT 0 LAST`).
    fn send_chunk(&mut self, sh: &Shared) {
        let Some(tx) = self.tx.as_mut() else { return };
        let Some((m, off)) = tx.chunked.as_mut() else {
            return;
        };
        let n = (m.len() - *off).min(sh.cfg.chunk_size);
        let last = *off + n == m.len();
        let _ = write!(self.out, "BDAT {n}{}\r\n", if last { " LAST" } else { "" });
        self.out.extend_from_slice(&m[*off..*off + n]);
        *off += n;
        self.expect.push_back(Expect::Bdat { last });
        if last {
            tx.dot_queued = true;
        }
    }

    /// Ends the transaction in flight with its deciding code: the MAIL refusal, else the
    /// first RCPT refusal when no recipient was accepted, else the first data-stage
    /// refusal, else the final reply. `unfinished`: the server may still hold transaction
    /// state, so RSET comes before the next MAIL.
    fn finish(
        &mut self,
        sh: &Shared,
        w: &mut Local,
        final_code: u16,
        queue: Option<&str>,
        unfinished: bool,
        now: Instant,
    ) {
        let Some(tx) = self.tx.take() else { return };
        let deciding = tx
            .mail_fail
            .or(if tx.accepted_rcpts == 0 {
                tx.rcpt_fail
            } else {
                None
            })
            .or(tx.data_fail)
            .unwrap_or(final_code);
        let accepted = (200..300).contains(&deciding) && tx.accepted_rcpts > 0;
        *w.tally.codes.entry(deciding).or_insert(0) += 1;
        w.tally.last_end = Some(now);
        if accepted {
            w.tally.accepted += 1;
            Live::inc(&sh.live.accepted);
            w.tally.bytes_accepted += tx.size() as u64;
            let _ = w
                .tally
                .latency
                .record(micros(now.saturating_duration_since(tx.claim.intended)));
            let _ = w
                .tally
                .transaction
                .record(micros(now.saturating_duration_since(tx.started)));
            let dot = tx.dot_at.unwrap_or(now);
            let _ = w
                .tally
                .dot_to_reply
                .record(micros(now.saturating_duration_since(dot)));
            if sh.acked.is_some() {
                w.acked.extend_from_slice(tx.id.as_bytes());
                w.acked.push(b'\n');
            }
        } else {
            w.tally.rejected += 1;
            Live::inc(&sh.live.rejected);
            self.needs_rset |= unfinished && tx.mail_fail.is_none();
        }
        if accepted {
            if let (Some(_), Some(q)) = (&sh.ids_file, queue) {
                w.tally.queue_ids_captured += 1;
                let _ = writeln!(w.ids, "{q}\t{}@sluice-load.test", tx.id);
            }
        }
    }

    /// After a transaction: the next message, QUIT after `--messages-per-connection`, or
    /// more replies still to come for this one (pipelined refusals).
    fn after_tx(&mut self, sh: &Shared, ready: &mut Vec<usize>, now: Instant) {
        if !self.expect.is_empty() {
            // Pipelined replies to a refused transaction are still on their way; they are
            // matched against their expectations and then ignored (no tx in flight).
            self.phase = Phase::Busy;
            return;
        }
        let per_conn = sh.cfg.messages_per_connection;
        if per_conn > 0 && self.on_this_connection >= per_conn {
            self.quit(sh, now);
        } else {
            self.phase = Phase::Ready;
            ready.push(self.token.0);
        }
    }

    /// Sends QUIT.
    pub fn quit(&mut self, sh: &Shared, now: Instant) {
        self.out.extend_from_slice(b"QUIT\r\n");
        self.expect.push_back(Expect::Quit);
        self.phase = Phase::Quitting;
        self.deadline = Some(now + sh.cfg.io_timeout);
    }

    /// The server answered QUIT (or closed): reconnect if the run goes on.
    fn quit_done(&mut self, sh: &Shared, w: &mut Local, registry: &Registry, now: Instant) {
        self.close_socket(registry);
        if self.established {
            self.established = false;
            sh.live
                .connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.phase = if self.finishing || sh.schedule.is_exhausted(now) {
            Phase::Done
        } else {
            // --messages-per-connection: the next connection starts at once.
            w.kick = true;
            Phase::Backoff(now)
        };
    }

    /// The run has nothing more to send: QUIT when idle, give up when not connected.
    pub fn wind_down(&mut self, sh: &Shared, registry: &Registry, now: Instant) {
        self.finishing = true;
        match self.phase {
            Phase::Ready => self.quit(sh, now),
            Phase::Backoff(_) | Phase::Connecting | Phase::Handshake => {
                if self.established {
                    self.established = false;
                    sh.live
                        .connections
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.close_socket(registry);
                self.phase = Phase::Done;
            }
            Phase::Busy | Phase::Quitting | Phase::Done => {}
        }
    }

    /// The hard end of the run: whatever is still in flight is counted as an error.
    pub fn abort(&mut self, sh: &Shared, w: &mut Local, registry: &Registry, now: Instant) {
        if let Some(tx) = self.tx.take() {
            w.tally.errors += 1;
            Live::inc(&sh.live.errors);
            w.tally.last_end = Some(now);
            w.tally.note_error(format!(
                "still in flight at the end of the run (message {})",
                tx.claim.idx
            ));
        }
        if self.established {
            self.established = false;
            sh.live
                .connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.close_socket(registry);
        self.phase = Phase::Done;
    }

    /// Timers: reconnect after a backoff, give up on a silent server.
    pub fn on_timer(&mut self, sh: &Shared, w: &mut Local, registry: &Registry, now: Instant) {
        match self.phase {
            Phase::Backoff(t) if t <= now => {
                if self.finishing {
                    self.phase = Phase::Done;
                } else {
                    self.connect(sh, w, registry, now);
                }
            }
            Phase::Done | Phase::Backoff(_) | Phase::Ready => {}
            _ => {
                if self.deadline.is_some_and(|d| d <= now) {
                    let what = match self.phase {
                        Phase::Connecting => "connect".to_string(),
                        _ => self
                            .expect
                            .front()
                            .map_or("write".into(), |e| format!("{e:?} reply")),
                    };
                    let why = format!("timeout after {:?} waiting for {what}", sh.cfg.io_timeout);
                    if self.phase == Phase::Quitting {
                        w.tally.note_error(why);
                        self.quit_done(sh, w, registry, now);
                    } else {
                        self.connection_lost(sh, w, registry, now, why);
                    }
                }
            }
        }
    }

    /// Writes queued bytes; records when the last byte of a message left.
    pub fn flush(&mut self, sh: &Shared, w: &mut Local, registry: &Registry, now: Instant) {
        while self.out_pos < self.out.len() {
            let Some(s) = self.stream.as_mut() else {
                self.out.clear();
                self.out_pos = 0;
                return;
            };
            match s.write(&self.out[self.out_pos..]) {
                Ok(0) => {
                    return self.connection_lost(sh, w, registry, now, "write: zero".into());
                }
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.deadline = Some(now + sh.cfg.io_timeout);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if self.phase == Phase::Quitting {
                        return self.quit_done(sh, w, registry, now);
                    }
                    return self.connection_lost(sh, w, registry, now, format!("write: {e}"));
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if let Some(tx) = self.tx.as_mut() {
            if std::mem::take(&mut tx.dot_queued) {
                tx.dot_at = Some(Instant::now());
            }
        }
    }

    /// Flushes if anything is queued (after `start` or `wind_down`).
    pub fn flush_pending(&mut self, sh: &Shared, w: &mut Local, registry: &Registry) {
        if self.has_output() {
            self.flush(sh, w, registry, Instant::now());
        }
    }
}

/// The extensions an EHLO reply offers (first word of each line after the first).
fn caps_of(r: &Reply) -> Caps {
    let mut caps = Caps::default();
    for line in r.lines().skip(1) {
        let kw = line.split_whitespace().next().unwrap_or("");
        if kw.eq_ignore_ascii_case("PIPELINING") {
            caps.pipelining = true;
        } else if kw.eq_ignore_ascii_case("CHUNKING") {
            caps.chunking = true;
        } else if kw.eq_ignore_ascii_case("SIZE") {
            caps.size = true;
        }
    }
    caps
}

/// The id in a `250 ... queued as ID` reply (Postfix, Sluice and the sink all say so).
pub fn queue_id(text: &str) -> Option<&str> {
    let at = text.find("queued as ")?;
    let id = text[at + 10..].split_whitespace().next()?;
    let id = id.trim_end_matches([',', ';', '.', ')']);
    (!id.is_empty()).then_some(id)
}

/// Expands the recipient template: `{n}` is the recipient number, `{domain}` its domain
/// number (`n mod --domains`).
pub fn rcpt_for(template: &str, n: u64, domain: u64) -> String {
    template
        .replace("{n}", &n.to_string())
        .replace("{i}", &n.to_string())
        .replace("{domain}", &domain.to_string())
        .replace("{j}", &domain.to_string())
}
