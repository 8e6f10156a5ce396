//! One sink connection: a nonblocking socket driven through Sluice's own sans-IO server
//! [`Session`], so the sink speaks exactly the ESMTP our server speaks (same parser, same
//! replies, same DATA/BDAT scanner). This driver only moves bytes and answers the session's
//! events with fault-injection decisions.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use sluice::smtp::address::{ForwardPath, ReversePath};
use sluice::smtp::server::{Event, IncomingMessage, PeerInfo, Session, Stage};
use sluice::smtp::{EnhancedCode, Reply};

use super::faults::{MessageFault, MessageVerdict, RcptFault, Rng};
use super::record::{message_id, StoredEnvelope};
use super::stats::add;
use super::Shared;

/// Per-worker state the connections of that worker share.
pub struct WorkerCtx {
    /// Everything global.
    pub shared: Arc<Shared>,
    /// This worker's random stream (fault rates).
    pub rng: Rng,
    /// `--received` lines produced in this loop iteration, written before any reply goes out.
    pub received: Vec<u8>,
    /// Something countable happened in this iteration (the stats file needs a rewrite).
    pub touched: bool,
}

/// An end-of-data decision waiting for `--delay` to pass.
struct Held {
    due: Instant,
    verdict: MessageVerdict,
    message: Box<IncomingMessage>,
    transfer: &'static str,
}

/// One client connection.
pub struct Conn {
    /// The socket (registered with the worker's poll under this connection's token).
    pub stream: TcpStream,
    session: Session,
    /// Replies not yet written; `out_pos` bytes of it are already sent.
    out: Vec<u8>,
    out_pos: usize,
    /// Input the session has not consumed because it awaits a delayed answer.
    pending_in: Vec<u8>,
    held: Option<Held>,
    /// A `354` went out since the last message: it ended with DATA, not BDAT.
    data_started: bool,
    /// Flush what is queued, then close.
    pub closing: bool,
    /// When `closing` was set (a client that never reads its replies is cut off).
    closing_since: Option<Instant>,
    /// The connection ended with an I/O error.
    pub failed: bool,
    /// Queued in the worker's flush list.
    pub flush_queued: bool,
}

impl Conn {
    /// Wraps an accepted socket; the greeting is queued at once.
    pub fn new(stream: TcpStream, peer: SocketAddr, ctx: &WorkerCtx, now: Instant) -> Conn {
        let session = Session::new(
            Arc::clone(&ctx.shared.session_config),
            PeerInfo::plain(peer),
            now,
        );
        let mut c = Conn {
            stream,
            session,
            out: Vec::with_capacity(256),
            out_pos: 0,
            pending_in: Vec::new(),
            held: None,
            data_started: false,
            closing: false,
            closing_since: None,
            failed: false,
            flush_queued: false,
        };
        c.pull_output(ctx, &mut 0);
        c
    }

    /// When a delayed answer is due, if one is held.
    pub fn held_due(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| h.due)
    }

    /// Whether replies wait to be written.
    pub fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    fn close(&mut self, now: Instant) {
        if !self.closing {
            self.closing = true;
            self.closing_since = Some(now);
        }
    }

    /// Reads what the socket has (edge-triggered readiness), feeding the session. A read
    /// that does not fill the buffer drained the socket: any later data raises a new edge,
    /// so the extra read that would only say EAGAIN is skipped (a third of all syscalls)
    /// unless `drain` is set (the peer half-closed: a FIN behind the data raises no new
    /// edge; or we stopped reading for a while). Stops early while an answer is held back:
    /// the unread input waits in the kernel.
    pub fn on_readable(&mut self, ctx: &mut WorkerCtx, buf: &mut [u8], drain: bool) {
        while self.held.is_none() && !self.closing {
            match self.stream.read(buf) {
                Ok(0) => {
                    let now = Instant::now();
                    self.session.handle_eof(now);
                    self.pull_output(ctx, &mut 0);
                    self.close(now);
                }
                Ok(n) => {
                    add(&ctx.shared.stats.c.bytes_in, n as u64);
                    self.feed(ctx, n, buf);
                    if n < buf.len() && !drain {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.failed = true;
                    self.close(Instant::now());
                }
            }
        }
    }

    /// Feeds `buf[..n]` to the session until consumed, answering events as they come.
    fn feed(&mut self, ctx: &mut WorkerCtx, n: usize, buf: &[u8]) {
        let mut input = &buf[..n];
        let mut replies = 0u64;
        while !input.is_empty() {
            let now = Instant::now();
            let used = self.session.handle_input(now, input);
            input = &input[used..];
            self.pull_output(ctx, &mut replies);
            let answered = self.drain_events(ctx, now, &mut replies);
            if self.session.is_closed() {
                self.close(now);
                break;
            }
            if self.held.is_some() {
                self.pending_in.extend_from_slice(input);
                break;
            }
            if used == 0 && !answered {
                // Cannot happen with a live session; never spin on it.
                self.close(now);
                break;
            }
        }
        // Replies produced by one read beyond the first answer commands the client sent
        // without waiting: proof, from this side, that it pipelined.
        if replies > 1 {
            add(&ctx.shared.stats.c.pipelined_commands, replies - 1);
        }
    }

    /// Moves the session's replies to our output buffer, noting `354`s (DATA in progress)
    /// and counting complete replies; hides extensions the sink was told not to offer.
    fn pull_output(&mut self, ctx: &WorkerCtx, replies: &mut u64) {
        if !self.session.has_output() {
            return;
        }
        let start = self.out.len();
        self.session.write_output(&mut self.out);
        for hidden in &ctx.shared.hidden_ehlo_lines {
            // A continuation line of the EHLO reply (the hostname comes first and DSN last,
            // so these are never the first or final line); once per EHLO in the batch.
            while let Some(at) = memchr::memmem::find(&self.out[start..], hidden) {
                let at = start + at;
                self.out.drain(at..at + hidden.len());
            }
        }
        let mut line_start = start;
        while line_start < self.out.len() {
            let rest = &self.out[line_start..];
            if rest.len() >= 4 && rest[3] == b' ' {
                *replies += 1;
                if rest.starts_with(b"354 ") {
                    self.data_started = true;
                }
            }
            match memchr::memchr(b'\n', rest) {
                Some(i) => line_start += i + 1,
                None => break,
            }
        }
    }

    /// Answers every pending event; returns whether there was any.
    fn drain_events(&mut self, ctx: &mut WorkerCtx, now: Instant, replies: &mut u64) -> bool {
        let mut any = false;
        while let Some(event) = self.session.poll_event() {
            any = true;
            ctx.touched = true;
            let c = &ctx.shared.stats.c;
            match event {
                Event::CheckRecipient { recipient, .. } => {
                    let verdict = match &recipient.to {
                        ForwardPath::Postmaster => {
                            ctx.shared.faults.recipient("postmaster", "Postmaster")
                        }
                        ForwardPath::Address(a) => {
                            ctx.shared.faults.recipient(a.local_part(), &a.to_string())
                        }
                    };
                    let verdict = match verdict {
                        Ok(()) => {
                            add(&c.recipients_seen, 1);
                            Ok(())
                        }
                        Err((reply, why)) => {
                            match why {
                                RcptFault::TempFail => add(&c.rcpt_tempfail_injected, 1),
                                RcptFault::PermFail => add(&c.rcpt_permfail_injected, 1),
                                RcptFault::Configured => {}
                            }
                            Err(reply)
                        }
                    };
                    self.session.answer_recipient(now, verdict);
                }
                Event::Message(message) => {
                    add(&c.transactions, 1);
                    let transfer = if std::mem::take(&mut self.data_started) {
                        add(&c.data_transfers, 1);
                        "DATA"
                    } else {
                        add(&c.bdat_transfers, 1);
                        "BDAT"
                    };
                    let verdict = ctx.shared.faults.message(ctx.rng.next_f64());
                    let delay = ctx.shared.cfg.delay;
                    if delay.is_zero() {
                        self.apply(ctx, now, verdict, message, transfer);
                    } else {
                        self.held = Some(Held {
                            due: now + delay,
                            verdict,
                            message,
                            transfer,
                        });
                    }
                }
                Event::StartTls => {
                    // Never advertised (PeerInfo::plain), but answer it all the same.
                    self.session.answer_starttls(now, false);
                }
                Event::Rejected { stage, .. } => match stage {
                    Stage::Rcpt => add(&c.rcpt_rejected, 1),
                    Stage::Data => add(&c.messages_rejected, 1),
                    _ => {}
                },
            }
            self.pull_output(ctx, replies);
        }
        any
    }

    /// Carries out an end-of-data decision.
    fn apply(
        &mut self,
        ctx: &mut WorkerCtx,
        now: Instant,
        verdict: MessageVerdict,
        message: Box<IncomingMessage>,
        transfer: &'static str,
    ) {
        let c = &ctx.shared.stats.c;
        let answer = match verdict {
            MessageVerdict::Drop => {
                // Whatever replies precede the final dot still go out; the final one never does.
                add(&c.dropped, 1);
                self.close(now);
                return;
            }
            MessageVerdict::Refuse { reply, why } => {
                match why {
                    MessageFault::TempFailRate => add(&c.tempfail_injected, 1),
                    MessageFault::PermFailRate => add(&c.permfail_injected, 1),
                    MessageFault::FailFirst => add(&c.fail_first_used, 1),
                    MessageFault::Configured => {}
                }
                Err(reply)
            }
            MessageVerdict::Accept => accept(ctx, &message, transfer),
        };
        self.session.answer_message(now, answer);
        let mut replies = 0;
        self.pull_output(ctx, &mut replies);
        self.drain_events(ctx, now, &mut replies);
    }

    /// `--delay` has passed: send the held answer and go on with the input that waited.
    pub fn release(&mut self, ctx: &mut WorkerCtx, now: Instant, buf: &mut [u8]) {
        let Some(held) = self.held.take() else {
            return;
        };
        ctx.touched = true;
        self.apply(ctx, now, held.verdict, held.message, held.transfer);
        if self.closing {
            return;
        }
        let pending = std::mem::take(&mut self.pending_in);
        let mut at = 0;
        while at < pending.len() && self.held.is_none() && !self.closing {
            let n = (pending.len() - at).min(buf.len());
            buf[..n].copy_from_slice(&pending[at..at + n]);
            at += n;
            self.feed(ctx, n, buf);
        }
        if self.held.is_some() {
            // Held again: what was not fed yet goes back in front of what feed() stashed.
            let mut rest = pending[at..].to_vec();
            rest.append(&mut self.pending_in);
            self.pending_in = rest;
            return;
        }
        // Edge-triggered: input that arrived while we held back raises no new event.
        self.on_readable(ctx, buf, true);
    }

    /// The once-a-second check: idle/data timeouts, and cutting off a closing connection
    /// whose client stopped reading.
    pub fn tick(&mut self, ctx: &WorkerCtx, now: Instant) {
        if let Some(since) = self.closing_since {
            if now.duration_since(since) > Duration::from_secs(10) {
                self.out_pos = self.out.len();
            }
            return;
        }
        if self.session.poll_timeout().is_some_and(|t| t <= now) {
            self.session.handle_timeout(now);
            self.pull_output(ctx, &mut 0);
            if self.session.is_closed() {
                self.close(now);
            }
        }
    }

    /// Writes queued replies. Returns `false` when the socket would block (wait for
    /// writability) and `true` when everything is out or the connection failed.
    pub fn flush(&mut self) -> bool {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => {
                    self.failed = true;
                    self.close(Instant::now());
                    self.out_pos = self.out.len();
                }
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.failed = true;
                    self.close(Instant::now());
                    self.out_pos = self.out.len();
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
        true
    }

    /// Whether the connection can be dropped now.
    pub fn finished(&self) -> bool {
        self.closing && !self.has_output()
    }
}

/// Accepts a message for good: store it, log its id, count it, name its queue id. A message
/// that cannot be stored is answered `451 4.3.0`, never acknowledged.
fn accept(
    ctx: &mut WorkerCtx,
    m: &IncomingMessage,
    transfer: &'static str,
) -> Result<String, Reply> {
    let sh = &ctx.shared;
    let c = &sh.stats.c;
    let seq = sh.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let queue_id = format!("SINK{seq:08}");
    let id = if sh.received.is_some() || sh.store.is_some() {
        message_id(&m.body)
    } else {
        None
    };
    if let Some(store) = &sh.store {
        let env = StoredEnvelope {
            seq,
            queue_id: &queue_id,
            helo: &m.helo,
            mail_from: match &m.mail.from {
                ReversePath::Null => String::new(),
                ReversePath::Address(a) => a.to_string(),
            },
            rcpt_to: m
                .recipients
                .iter()
                .map(|r| match &r.to {
                    ForwardPath::Postmaster => "Postmaster".to_string(),
                    ForwardPath::Address(a) => a.to_string(),
                })
                .collect(),
            transfer,
            size: m.body.len(),
            id: id.as_deref(),
        };
        if let Err(e) = store.put(&env, &m.body) {
            add(&c.store_errors, 1);
            eprintln!("sink: storing message {seq}: {e}");
            return Err(Reply::new(
                451,
                EnhancedCode::new(4, 3, 0),
                "sink: cannot store the message",
            ));
        }
    }
    if sh.received.is_some() {
        match &id {
            Some(id) => ctx.received.extend_from_slice(id.as_bytes()),
            None => {
                add(&c.messages_without_id, 1);
                ctx.received.push(b'-');
            }
        }
        ctx.received.push(b'\n');
    }
    add(&c.messages, 1);
    add(&c.recipients, m.recipients.len() as u64);
    add(&c.bytes, m.body.len() as u64);
    Ok(queue_id)
}
