//! The SMTP client session: a sans-IO state machine for outbound delivery
//! (RFC 5321, 2920 PIPELINING, 1870 SIZE, 6152 8BITMIME, 3030 CHUNKING,
//! 6531 SMTPUTF8, 3461 DSN, 2034 enhanced codes, 3207 STARTTLS seam).
//!
//! # Driving it
//!
//! The core owns no socket and reads no clock; like the server session (and
//! quinn-proto) it is fed bytes and time, and the driver moves bytes:
//!
//! ```text
//! let mut s = ClientSession::new(config, now);      // expects the 220 greeting
//! s.send_message(now, message)?;                    // may be queued before Ready
//! loop {
//!     while s.has_output() {                        // commands, then body pieces
//!         buf.clear();
//!         s.write_output(now, &mut buf);
//!         socket.write_all(&buf)  (bounded by poll_timeout())
//!     }
//!     while let Some(ev) = s.poll_event() {
//!         Ready | TransactionDone(r) => send the next message, or s.quit(now)
//!         StartTls => handshake, then s.answer_starttls(now, ok)
//!         Closed { reason, unsent } => flush output, close the socket, stop
//!     }
//!     match read(socket) racing poll_timeout() {
//!         n > 0   => s.handle_input(now, &bytes[..n]),
//!         EOF     => s.handle_eof(now),
//!         timeout => s.handle_timeout(now),
//!     }
//! }
//! ```
//!
//! Every wait is bounded: [`ClientSession::poll_timeout`] is the deadline of
//! the reply awaited (per-command timeouts of RFC 5321 §4.5.3.2 in
//! [`ClientTimeouts`]) or, while message data is still being handed out,
//! `data_block` after the last [`ClientSession::write_output`] call: the
//! driver bounds its socket writes by the same deadline. An idle session
//! has no deadline (the pool's idle timeout is the driver's).
//!
//! # Transactions
//!
//! A session carries any number of transactions in turn. With PIPELINING
//! (offered and enabled) MAIL, every RCPT and DATA go out in one write
//! (RFC 2920), bounded by `max_pipelined_commands`; otherwise one command
//! per round trip. The body follows the `354` dot-stuffed with a final
//! `CRLF.CRLF`, or, with CHUNKING offered and `use_chunking` on, in `BDAT`
//! chunks after the envelope replies (pipelined when PIPELINING is offered).
//! RSET is sent only after a transaction that ended without its data being
//! accepted (MAIL accepted, then every recipient or DATA refused, the data
//! refused, or a BDAT chunk refused), so the server's state is clean for the
//! next one. RFC 5321 §4.1.1.4 says any reply to the data ends the
//! transaction, but servers exist (aiosmtpd's `500 Error: strict ASCII mode`)
//! that keep the envelope after refusing the data and then answer the next
//! `MAIL` with `503 nested MAIL command`; one RSET after a refusal costs a
//! round trip only on the rare failed transaction.
//!
//! Per-recipient results ([`RecipientResult`]): a refused RCPT keeps its own
//! reply; MAIL refused, DATA refused and the reply to the data apply to every
//! recipient still open. When the connection fails (timeout, EOF, malformed
//! reply, `421`) every open recipient gets a transient reply and the session
//! closes: local failures are `451 4.4.2` (timeout), `421 4.4.2` (connection
//! lost), `451 4.5.0` (protocol error); a `421` from the server is passed on
//! as it came. A failure after the final dot went out may mean the message
//! was delivered anyway: the relay then sends it again (a duplicate, never a
//! loss; RFC 5321 §6.1).
//!
//! When the server answers `354` to a pipelined DATA although no recipient
//! was accepted, the client sends the lone `.` that ends the (empty) data, as
//! RFC 2920 §3.1 requires and Postfix does, and ignores its reply.
//!
//! # Messages the server cannot take (checked before anything is sent)
//!
//! | message | server lacks | result for every recipient |
//! |---|---|---|
//! | body larger than the server's `SIZE` limit | room | `552 5.3.4` (RFC 1870) |
//! | `BODY=8BITMIME` and the body really has 8-bit octets | 8BITMIME | `554 5.6.3` with [`EightBitPolicy::Reject`] (default); sent as is with `SendAnyway` |
//! | `BODY=BINARYMIME` | BINARYMIME + CHUNKING in use | `554 5.6.3` |
//! | a non-ASCII envelope address, or `SMTPUTF8` declared and a non-ASCII header | SMTPUTF8 | `554 5.6.7` (RFC 6531 §3.2) |
//!
//! 8-bit policy, and why: RFC 6152 §3 lets a client that cannot convert an
//! 8-bit body to 7 bits only return it as undeliverable; converting
//! (to quoted-printable / base64, as sendmail does) means rewriting MIME
//! structure, which breaks DKIM signatures and is a large, risky piece of
//! code for a path modern servers almost never take. Postfix sends such
//! bodies anyway by default, betting that the server is 8-bit clean; that
//! bet is available as [`EightBitPolicy::SendAnyway`], but the default is a
//! clean `5.6.3` bounce the sender can understand. A message declared 8-bit
//! whose body is plain ASCII (common) is sent without the parameter.
//!
//! # STARTTLS seam
//!
//! With [`StartTlsPolicy::Opportunistic`] the session sends STARTTLS after
//! EHLO when offered; on `220` it emits [`ClientEvent::StartTls`], takes no
//! input until [`ClientSession::answer_starttls`], then sends EHLO again and
//! forgets the plaintext extensions (RFC 3207 §4.2). Bytes received after the
//! `220` and before the handshake are an injection attempt (CVE-2011-0411)
//! and close the session. A refused STARTTLS continues in plain text. The
//! default policy is `Disabled` until a driver implements TLS.
//!
//! # Body precondition
//!
//! The body must use CRLF line endings only, as the spool stores it (the
//! server normalises or rejects bare CR/LF). Dot-stuffing scans for `LF "."`,
//! so even a stray bare LF followed by a dot is stuffed; a stray bare CR is
//! not looked at.

mod body;
mod config;
mod extensions;
mod types;

#[cfg(test)]
mod tests;

#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzz_harness;

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use body::BodyStream;
pub use config::{ClientConfig, ClientTimeouts, EightBitPolicy, StartTlsPolicy};
pub use extensions::Extensions;
pub use types::{
    ClientEvent, CloseKind, CloseReason, OutgoingMessage, Phase, RecipientResult, SessionClosed,
    TransactionId, TransactionResult,
};

use crate::reply;
use crate::smtp::address::{ForwardPath, ReversePath};
use crate::smtp::command::{xtext_encode, BodyType, RcptTo, Ret};
use crate::smtp::reply::{Reply, MAX_REPLY_LINE};

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for the `220`.
    Greeting,
    /// EHLO / HELO / STARTTLS in flight.
    Hello,
    /// `220` to STARTTLS received; the driver is handshaking.
    AwaitTls,
    /// Ready: transactions (and RSETs) run here.
    Open,
    /// QUIT sent.
    Quitting,
    /// Over.
    Closed,
}

/// A reply the session is waiting for, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Mail,
    Rcpt(usize),
    Data,
    EndOfData,
    /// The lone "." after a 354 with no accepted recipient.
    EmptyData,
    /// The replies to the current transaction's BDAT chunks: one entry for
    /// all of them (the transaction counts), so a tiny chunk size cannot
    /// grow this queue.
    Bdat,
    Rset,
    Quit,
}

impl Expect {
    fn phase(self) -> Phase {
        match self {
            Expect::Greeting => Phase::Greeting,
            Expect::Ehlo => Phase::Ehlo,
            Expect::Helo => Phase::Helo,
            Expect::StartTls => Phase::StartTls,
            Expect::Mail => Phase::Mail,
            Expect::Rcpt(_) => Phase::Rcpt,
            Expect::Data => Phase::Data,
            Expect::EndOfData | Expect::EmptyData => Phase::EndOfData,
            Expect::Bdat => Phase::Bdat,
            Expect::Rset => Phase::Rset,
            Expect::Quit => Phase::Quit,
        }
    }
}

/// How a message goes out on this connection: decided once, before MAIL.
#[derive(Clone, Copy, Debug)]
struct Plan {
    pipelining: bool,
    chunking: bool,
    size: bool,
    body: Option<BodyType>,
    smtputf8: bool,
    dsn: bool,
}

/// The transaction in progress.
#[derive(Debug)]
struct Transaction {
    id: TransactionId,
    message: OutgoingMessage,
    plan: Plan,
    results: Vec<Option<RecipientResult>>,
    mail_sent: bool,
    mail_accepted: bool,
    mail_failed: bool,
    /// Next recipient whose RCPT is still to be sent.
    next_rcpt: usize,
    accepted: usize,
    /// DATA sent, or the BDAT stream started.
    data_sent: bool,
    /// The server accepted the data: its transaction state is reset (a
    /// refused data is followed by RSET, see the module documentation).
    data_done: bool,
    bdat_chunks: usize,
    bdat_replies: usize,
    /// The first refused BDAT chunk: its reply decides the message.
    bdat_failure: Option<Reply>,
}

impl Transaction {
    /// Gives `reply` to every recipient without a result yet.
    fn settle_open(&mut self, reply: &Reply, phase: Phase, remote: bool) {
        for r in self.results.iter_mut().filter(|r| r.is_none()) {
            *r = Some(RecipientResult {
                reply: reply.clone(),
                phase,
                remote,
            });
        }
    }

    fn all_settled(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }

    fn into_result(self) -> TransactionResult {
        TransactionResult {
            id: self.id,
            recipients: self
                .results
                .into_iter()
                .map(|r| r.expect("every recipient settled"))
                .collect(),
            remote_dsn: self.plan.dsn,
            message: self.message,
        }
    }
}

/// An outbound SMTP session on one connection. See the module docs.
#[derive(Debug)]
pub struct ClientSession {
    config: Arc<ClientConfig>,
    state: State,
    expect: VecDeque<Expect>,
    deadline: Option<Instant>,
    /// A reply split across reads (bounded by `Reply::parse`'s limits).
    input: Vec<u8>,
    /// Commands to write, before any body bytes.
    out: Vec<u8>,
    body: Option<BodyStream>,
    events: VecDeque<ClientEvent>,
    greeting: Option<Reply>,
    extensions: Extensions,
    esmtp: bool,
    tls: bool,
    queue: VecDeque<(TransactionId, OutgoingMessage)>,
    tx: Option<Transaction>,
    next_id: u64,
    quit_requested: bool,
    transactions: u64,
}

impl ClientSession {
    /// A session on a freshly connected socket: it waits for the greeting.
    pub fn new(config: Arc<ClientConfig>, now: Instant) -> ClientSession {
        let mut s = ClientSession {
            config,
            state: State::Greeting,
            expect: VecDeque::new(),
            deadline: None,
            input: Vec::new(),
            out: Vec::with_capacity(512),
            body: None,
            events: VecDeque::new(),
            greeting: None,
            extensions: Extensions::default(),
            esmtp: false,
            tls: false,
            queue: VecDeque::new(),
            tx: None,
            next_id: 0,
            quit_requested: false,
            transactions: 0,
        };
        s.push_expect(now, Expect::Greeting);
        s
    }

    // ---------------------------------------------------------------------
    // Driver interface.

    /// Queues a message. Its transaction starts once the session is ready
    /// and every earlier message is done; its result comes back as
    /// [`ClientEvent::TransactionDone`] with the returned id (or, if the
    /// connection fails before it starts, in [`ClientEvent::Closed`]'s
    /// `unsent`). Refused once the session is closed or [`quit`](Self::quit)
    /// was called.
    pub fn send_message(
        &mut self,
        now: Instant,
        message: OutgoingMessage,
    ) -> Result<TransactionId, SessionClosed> {
        if self.state == State::Closed || self.state == State::Quitting || self.quit_requested {
            return Err(SessionClosed(Box::new(message)));
        }
        let id = TransactionId(self.next_id);
        self.next_id += 1;
        self.queue.push_back((id, message));
        self.advance(now);
        Ok(id)
    }

    /// Ends the session politely once every queued message is done: QUIT,
    /// then [`ClientEvent::Closed`] with [`CloseKind::Quit`].
    pub fn quit(&mut self, now: Instant) {
        self.quit_requested = true;
        self.advance(now);
    }

    /// Feeds bytes read from the socket. All of them are taken: a partial
    /// reply is kept (bounded by [`Reply::parse`]'s limits).
    pub fn handle_input(&mut self, now: Instant, input: &[u8]) {
        match self.state {
            State::Closed => return,
            State::AwaitTls => {
                if !input.is_empty() {
                    self.plaintext_after_starttls(now);
                }
                return;
            }
            _ => {}
        }
        // Parse straight from `input` when nothing is buffered (the common
        // case: one whole reply per read); otherwise append, and parse again
        // only once a line is complete, so a reply dripping in byte by byte
        // costs one parse per line, not per byte.
        let mut buffer = std::mem::take(&mut self.input);
        let from_buffer = !buffer.is_empty();
        if from_buffer {
            buffer.extend_from_slice(input);
            let line_len = memchr::memrchr(b'\n', &buffer[..buffer.len() - input.len()])
                .map_or(buffer.len(), |lf| buffer.len() - lf - 1);
            if memchr::memchr(b'\n', input).is_none() && line_len < MAX_REPLY_LINE {
                self.input = buffer;
                return;
            }
        }
        let data: &[u8] = if from_buffer { &buffer } else { input };
        let mut pos = 0;
        while pos < data.len() && !matches!(self.state, State::Closed | State::AwaitTls) {
            match Reply::parse(&data[pos..]) {
                Ok(Some((reply, used))) => {
                    pos += used;
                    self.on_reply(now, reply);
                }
                Ok(None) => break,
                Err(e) => {
                    let phase = self.current_phase();
                    let what = format!("Malformed reply to {}", phase.command());
                    self.protocol_error(now, phase, &what, &e.to_string());
                    return;
                }
            }
        }
        if self.state == State::Closed {
            return;
        }
        // Keep what is left: a partial reply, or (after the 220 to STARTTLS)
        // bytes that answer_starttls will refuse.
        if from_buffer {
            buffer.drain(..pos);
        } else {
            buffer.extend_from_slice(&input[pos..]);
        }
        self.input = buffer;
    }

    /// The server closed the connection (read returned 0).
    pub fn handle_eof(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Quitting => self.close(CloseKind::Quit, Phase::Quit, None),
            _ => {
                let phase = self.current_phase();
                let text = format!("Connection lost {}", waiting_for(phase));
                self.fail(
                    now,
                    CloseKind::ConnectionLost,
                    phase,
                    reply!(421, 4, 4, 2, text),
                    false,
                );
            }
        }
    }

    /// Time passed: fails the session if the deadline of
    /// [`poll_timeout`](Self::poll_timeout) is reached. Harmless to call early.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_none_or(|d| now < d) {
            return;
        }
        if self.state == State::Quitting {
            self.close(CloseKind::Quit, Phase::Quit, None);
            return;
        }
        let phase = self.current_phase();
        let text = if self.body.as_ref().is_some_and(BodyStream::has_output) {
            "Timeout while sending message data".to_string()
        } else {
            format!("Timeout {}", waiting_for(phase))
        };
        self.fail(
            now,
            CloseKind::Timeout,
            phase,
            reply!(451, 4, 4, 2, text),
            false,
        );
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, if
    /// the session is waiting for anything.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Appends bytes to write to `out`: pending commands, then at most
    /// `max_write_chunk` octets of message data (plus framing). Returns how
    /// many bytes were appended. Call until [`has_output`](Self::has_output)
    /// is false; each call with message data restarts the `data_block` timer,
    /// and handing out the end of the data starts the `final_dot` one.
    pub fn write_output(&mut self, now: Instant, out: &mut Vec<u8>) -> usize {
        let before = out.len();
        out.append(&mut self.out);
        if let Some(body) = &mut self.body {
            if body.emit(out, self.config.max_write_chunk) {
                if body.is_finished() {
                    self.body = None;
                }
                self.refresh_deadline(now);
            }
        }
        out.len() - before
    }

    /// There is something to write.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || self.body.as_ref().is_some_and(BodyStream::has_output)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The driver finished the TLS handshake after [`ClientEvent::StartTls`]:
    /// `ok` resumes with a fresh EHLO over TLS; a failed handshake closes the
    /// session ([`CloseKind::TlsFailed`]; an opportunistic driver may then
    /// reconnect without TLS).
    pub fn answer_starttls(&mut self, now: Instant, ok: bool) {
        if self.state != State::AwaitTls {
            return;
        }
        if !self.input.is_empty() {
            self.plaintext_after_starttls(now);
            return;
        }
        if !ok {
            self.fail(
                now,
                CloseKind::TlsFailed,
                Phase::StartTls,
                reply!(451, 4, 7, 5, "TLS handshake failed"),
                false,
            );
            return;
        }
        // RFC 3207 §4.2: forget everything learned in plain text.
        self.tls = true;
        self.esmtp = false;
        self.extensions = Extensions::default();
        self.state = State::Hello;
        self.write_hello(now, true);
    }

    // ---------------------------------------------------------------------
    // State the driver may look at (metrics, logs, pool decisions).

    /// The session is over (after [`ClientEvent::Closed`]).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Ready, with no transaction running, queued or being reset: a
    /// connection the pool can hand out.
    pub fn is_idle(&self) -> bool {
        self.state == State::Open
            && self.tx.is_none()
            && self.expect.is_empty()
            && self.queue.is_empty()
            && !self.quit_requested
    }

    /// Extensions the server offered (all false before EHLO or after HELO).
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The server's greeting, once received.
    pub fn greeting(&self) -> Option<&Reply> {
        self.greeting.as_ref()
    }

    /// EHLO succeeded (false after a HELO fallback).
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
    }

    /// STARTTLS completed on this connection.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Transactions started (MAIL sent) on this connection.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// Messages queued and not yet started.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    // ---------------------------------------------------------------------
    // Replies.

    fn on_reply(&mut self, now: Instant, reply: Reply) {
        let Some(expect) = self.expect.pop_front() else {
            // Nothing asked: only a 421 (the server going away while we are
            // idle) is legitimate.
            let phase = self.current_phase();
            if reply.code() == 421 {
                self.fail(now, CloseKind::ServerClosing, phase, reply, true);
            } else {
                self.unexpected(now, phase, &reply);
            }
            return;
        };
        let phase = expect.phase();
        tracing::trace!(
            phase = phase.as_str(),
            code = reply.code(),
            "smtp client: reply"
        );
        if reply.code() == 421 && expect != Expect::Quit {
            self.fail(now, CloseKind::ServerClosing, phase, reply, true);
            return;
        }
        match expect {
            Expect::Greeting => {
                if reply.is_positive() {
                    self.greeting = Some(reply);
                    self.state = State::Hello;
                    self.write_hello(now, true);
                } else {
                    self.fail(now, CloseKind::Refused, phase, reply, true);
                    return;
                }
            }
            Expect::Ehlo | Expect::Helo => {
                if reply.is_positive() {
                    if expect == Expect::Ehlo {
                        self.extensions = Extensions::from_ehlo(&reply);
                        self.esmtp = true;
                    }
                    self.after_hello(now);
                } else if expect == Expect::Ehlo && reply.is_permanent() {
                    // RFC 5321 §3.2: an old server; fall back to HELO.
                    self.write_hello(now, false);
                } else {
                    self.fail(now, CloseKind::Refused, phase, reply, true);
                    return;
                }
            }
            Expect::StartTls => {
                if reply.is_positive() {
                    self.state = State::AwaitTls;
                    self.events.push_back(ClientEvent::StartTls);
                } else {
                    // Opportunistic: refused TLS means plain text (RFC 3207 §4).
                    self.become_ready();
                }
            }
            Expect::Rset => {
                if !reply.is_positive() {
                    self.fail(now, CloseKind::Refused, phase, reply, true);
                    return;
                }
            }
            Expect::Quit => {
                self.close(CloseKind::Quit, Phase::Quit, None);
                return;
            }
            Expect::Mail
            | Expect::Rcpt(_)
            | Expect::Data
            | Expect::EndOfData
            | Expect::EmptyData
            | Expect::Bdat => {
                if !self.on_transaction_reply(now, expect, reply) {
                    return;
                }
            }
        }
        self.advance(now);
        self.refresh_deadline(now);
    }

    /// A reply within a transaction. Returns false when the session closed.
    fn on_transaction_reply(&mut self, now: Instant, expect: Expect, reply: Reply) -> bool {
        let phase = expect.phase();
        let Some(tx) = self.tx.as_mut() else {
            self.unexpected(now, phase, &reply);
            return false;
        };
        // 3yz is an answer only to DATA; 2yz to DATA is none.
        let nonsense = if expect == Expect::Data {
            reply.is_positive()
        } else {
            reply.is_intermediate() && expect != Expect::EmptyData
        };
        if nonsense {
            self.unexpected(now, phase, &reply);
            return false;
        }
        match expect {
            Expect::Mail => {
                if reply.is_positive() {
                    tx.mail_accepted = true;
                } else {
                    tx.mail_failed = true;
                    tx.settle_open(&reply, phase, true);
                }
            }
            Expect::Rcpt(i) => {
                // After a refused MAIL the pipelined RCPT replies mean nothing.
                if !tx.mail_failed {
                    if reply.is_positive() {
                        tx.accepted += 1;
                    } else {
                        tx.results[i] = Some(RecipientResult {
                            reply,
                            phase,
                            remote: true,
                        });
                    }
                }
            }
            Expect::Data => {
                if reply.is_intermediate() {
                    if tx.accepted > 0 && !tx.mail_failed {
                        self.body = Some(BodyStream::dot(tx.message.body.clone()));
                        self.expect.push_back(Expect::EndOfData);
                    } else {
                        // RFC 2920 §3.1: the server wants data nobody will
                        // receive; end it at once.
                        self.out.extend_from_slice(b".\r\n");
                        self.expect.push_back(Expect::EmptyData);
                    }
                } else {
                    tx.settle_open(&reply, phase, true);
                }
            }
            Expect::EndOfData => {
                if self.body.is_some() {
                    return self.premature_reply(now, phase, reply);
                }
                tx.data_done = reply.is_positive();
                tx.settle_open(&reply, phase, true);
            }
            Expect::EmptyData => tx.data_done = reply.is_positive(),
            Expect::Bdat => {
                let emitted = self
                    .body
                    .as_ref()
                    .map_or(tx.bdat_chunks, BodyStream::chunks_emitted);
                if tx.bdat_replies >= emitted {
                    return self.premature_reply(now, phase, reply);
                }
                tx.bdat_replies += 1;
                let last = tx.bdat_replies == tx.bdat_chunks;
                if !reply.is_positive() && tx.bdat_failure.is_none() {
                    tx.bdat_failure = Some(reply.clone());
                }
                if last {
                    tx.data_done = true;
                    let decisive = tx.bdat_failure.take().unwrap_or(reply);
                    tx.settle_open(&decisive, phase, true);
                    // Keep the mark: a refused chunk leaves the server's
                    // state unclear, so the transaction ends with RSET.
                    tx.bdat_failure = Some(decisive).filter(|r| !r.is_positive());
                } else {
                    if !tx.plan.pipelining {
                        if reply.is_positive() {
                            if let Some(b) = self.body.as_mut() {
                                b.resume();
                            }
                        } else {
                            // Lock-step: stop at the first refused chunk.
                            self.body = None;
                            tx.settle_open(&reply, phase, true);
                            return true;
                        }
                    }
                    self.expect.push_front(Expect::Bdat);
                }
            }
            _ => unreachable!("not a transaction reply"),
        }
        true
    }

    /// The server answered before the data was complete. A refusal decides
    /// the open recipients; either way the dialogue is out of step.
    fn premature_reply(&mut self, now: Instant, phase: Phase, reply: Reply) -> bool {
        if let Some(tx) = self.tx.as_mut() {
            if !reply.is_positive() {
                tx.settle_open(&reply, phase, true);
            }
        }
        self.protocol_error(
            now,
            phase,
            "Server replied before the end of the data",
            &reply.to_string(),
        );
        false
    }

    fn unexpected(&mut self, now: Instant, phase: Phase, reply: &Reply) {
        let what = format!("Unexpected reply to {}", phase.command());
        self.protocol_error(now, phase, &what, &reply.to_string());
    }

    /// The dialogue is out of step: fails the session as a protocol error
    /// with `451 4.5.0 <what>: <detail>` (the server's words in `detail`,
    /// shortened and made printable), the one shape all three causes share.
    fn protocol_error(&mut self, now: Instant, phase: Phase, what: &str, detail: &str) {
        let text = format!("{what}: {}", printable(detail, 120));
        self.fail(
            now,
            CloseKind::ProtocolError,
            phase,
            reply!(451, 4, 5, 0, text),
            false,
        );
    }

    fn plaintext_after_starttls(&mut self, now: Instant) {
        self.input.clear();
        self.fail(
            now,
            CloseKind::ProtocolError,
            Phase::StartTls,
            reply!(
                451,
                4,
                5,
                0,
                "Server sent plaintext after its reply to STARTTLS"
            ),
            false,
        );
    }

    // ---------------------------------------------------------------------
    // Connection set-up.

    fn write_hello(&mut self, now: Instant, ehlo: bool) {
        self.out
            .extend_from_slice(if ehlo { b"EHLO " } else { b"HELO " });
        // Our name comes from the config: keep it to one token of visible
        // ASCII so it cannot break the command line.
        let name: Vec<u8> = self
            .config
            .ehlo_name
            .bytes()
            .filter(u8::is_ascii_graphic)
            .collect();
        if name.is_empty() {
            self.out.extend_from_slice(b"localhost");
        } else {
            self.out.extend_from_slice(&name);
        }
        self.out.extend_from_slice(b"\r\n");
        self.push_expect(now, if ehlo { Expect::Ehlo } else { Expect::Helo });
    }

    fn after_hello(&mut self, now: Instant) {
        let want_tls = self.config.starttls == StartTlsPolicy::Opportunistic;
        if want_tls && self.extensions.starttls && !self.tls {
            self.out.extend_from_slice(b"STARTTLS\r\n");
            self.push_expect(now, Expect::StartTls);
        } else {
            self.become_ready();
        }
    }

    fn become_ready(&mut self) {
        self.state = State::Open;
        self.events.push_back(ClientEvent::Ready);
    }

    // ---------------------------------------------------------------------
    // Transactions.

    /// Moves the dialogue forward as far as it can go without a reply:
    /// sends what may be sent, finishes a settled transaction, starts the
    /// next one or QUIT.
    fn advance(&mut self, now: Instant) {
        while self.state == State::Open {
            if let Some(mut tx) = self.tx.take() {
                self.drive(now, &mut tx);
                if !(self.expect.is_empty() && self.body.is_none() && tx.all_settled()) {
                    self.tx = Some(tx);
                    return;
                }
                // Reset the server's transaction state unless the data was
                // answered (which resets it already).
                let need_rset = (tx.mail_accepted && !tx.data_done) || tx.bdat_failure.is_some();
                self.events
                    .push_back(ClientEvent::TransactionDone(Box::new(tx.into_result())));
                if need_rset {
                    self.out.extend_from_slice(b"RSET\r\n");
                    self.push_expect(now, Expect::Rset);
                }
                continue;
            }
            if !self.expect.is_empty() {
                return; // RSET in flight
            }
            if let Some((id, message)) = self.queue.pop_front() {
                self.start(id, message);
                continue;
            }
            if self.quit_requested {
                self.out.extend_from_slice(b"QUIT\r\n");
                self.state = State::Quitting;
                self.push_expect(now, Expect::Quit);
            }
            return;
        }
    }

    /// Begins a transaction, or settles it at once when the server cannot
    /// take the message.
    fn start(&mut self, id: TransactionId, message: OutgoingMessage) {
        let n = message.recipients.len();
        let mut tx = Transaction {
            id,
            plan: Plan {
                pipelining: false,
                chunking: false,
                size: false,
                body: None,
                smtputf8: false,
                dsn: false,
            },
            message,
            results: vec![None; n],
            mail_sent: false,
            mail_accepted: false,
            mail_failed: false,
            next_rcpt: 0,
            accepted: 0,
            data_sent: false,
            data_done: false,
            bdat_chunks: 0,
            bdat_replies: 0,
            bdat_failure: None,
        };
        match self.plan(&tx.message) {
            Ok(plan) if n > 0 => {
                tx.plan = plan;
                self.transactions += 1;
            }
            Ok(_) => {} // no recipients: nothing to do, an empty result
            Err(reply) => tx.settle_open(&reply, Phase::Mail, false),
        }
        self.tx = Some(tx);
    }

    /// Decides the parameters, or why the server cannot take the message.
    fn plan(&self, m: &OutgoingMessage) -> Result<Plan, Reply> {
        let ext = &self.extensions;
        let chunking = ext.chunking && self.config.use_chunking;
        let len = m.body.len() as u64;
        if let Some(limit) = ext.size_limit {
            if len > limit {
                let text = format!(
                    "Message size ({len} octets) exceeds the remote server's limit of {limit} octets"
                );
                return Err(reply!(552, 5, 3, 4, text));
            }
        }
        let body = match m.body_type {
            None => None,
            Some(BodyType::SevenBit) => ext.eight_bit_mime.then_some(BodyType::SevenBit),
            Some(BodyType::EightBitMime) => {
                if ext.eight_bit_mime {
                    Some(BodyType::EightBitMime)
                } else if m.body.is_ascii() || self.config.eight_bit == EightBitPolicy::SendAnyway {
                    None
                } else {
                    return Err(reply!(
                        554,
                        5,
                        6,
                        3,
                        "Message has 8-bit content but the remote server does not support 8BITMIME"
                    ));
                }
            }
            Some(BodyType::BinaryMime) => {
                if chunking && ext.binary_mime {
                    Some(BodyType::BinaryMime)
                } else {
                    return Err(reply!(
                        554,
                        5,
                        6,
                        3,
                        "Message has binary content but the remote server does not take BINARYMIME with BDAT"
                    ));
                }
            }
        };
        let utf8_envelope = matches!(&m.sender, ReversePath::Address(a) if a.needs_smtputf8())
            || m.recipients
                .iter()
                .any(|r| matches!(&r.to, ForwardPath::Address(a) if a.needs_smtputf8()));
        if !ext.smtputf8 && (utf8_envelope || (m.smtputf8 && !header_is_ascii(&m.body))) {
            return Err(reply!(
                554,
                5,
                6,
                7,
                "Message needs SMTPUTF8 but the remote server does not support it"
            ));
        }
        Ok(Plan {
            pipelining: ext.pipelining && self.config.use_pipelining,
            chunking,
            size: ext.size,
            body,
            smtputf8: ext.smtputf8 && (m.smtputf8 || utf8_envelope),
            dsn: ext.dsn,
        })
    }

    /// Sends the commands the transaction may send now.
    fn drive(&mut self, now: Instant, tx: &mut Transaction) {
        if tx.all_settled() && !tx.mail_sent {
            return; // settled locally: nothing goes out
        }
        let window = if tx.plan.pipelining {
            self.config.max_pipelined_commands.max(1)
        } else {
            1
        };
        if !tx.mail_sent {
            tx.mail_sent = true;
            write_mail(&mut self.out, &tx.message, &tx.plan);
            self.push_expect(now, Expect::Mail);
        }
        let n = tx.message.recipients.len();
        while !tx.mail_failed && tx.next_rcpt < n && self.expect.len() < window {
            let i = tx.next_rcpt;
            write_rcpt(&mut self.out, &tx.message.recipients[i], tx.plan.dsn);
            self.push_expect(now, Expect::Rcpt(i));
            tx.next_rcpt += 1;
        }
        if tx.mail_failed || tx.next_rcpt < n || tx.data_sent {
            return;
        }
        // Every RCPT is out; the envelope is settled once its replies are in.
        let envelope_known = self.expect.is_empty();
        if envelope_known && tx.accepted == 0 {
            return; // every recipient refused: no data
        }
        if tx.plan.chunking {
            // BDAT waits for the envelope replies: sending a whole body to a
            // server that refused every recipient wastes it.
            if envelope_known {
                tx.data_sent = true;
                let chunk = self.config.bdat_chunk_size.max(1);
                tx.bdat_chunks = BodyStream::bdat_chunks(tx.message.body.len(), chunk);
                self.body = Some(BodyStream::bdat(
                    tx.message.body.clone(),
                    chunk,
                    !tx.plan.pipelining,
                ));
                self.expect.push_back(Expect::Bdat);
                self.refresh_deadline(now);
            }
        } else if envelope_known || self.expect.len() < window {
            tx.data_sent = true;
            self.out.extend_from_slice(b"DATA\r\n");
            self.push_expect(now, Expect::Data);
        }
    }

    // ---------------------------------------------------------------------
    // Bookkeeping.

    fn push_expect(&mut self, now: Instant, e: Expect) {
        let was_waiting = !self.expect.is_empty() || self.body.is_some();
        self.expect.push_back(e);
        if !was_waiting {
            self.deadline = Some(now + self.timeout_for(e));
        }
    }

    fn timeout_for(&self, e: Expect) -> Duration {
        let t = &self.config.timeouts;
        match e {
            Expect::Greeting => t.greeting,
            Expect::Ehlo | Expect::Helo => t.ehlo,
            Expect::StartTls => t.starttls,
            Expect::Mail => t.mail,
            Expect::Rcpt(_) => t.rcpt,
            Expect::Data => t.data_init,
            Expect::EndOfData | Expect::EmptyData => t.final_dot,
            Expect::Bdat => match &self.tx {
                Some(tx) if tx.bdat_replies + 1 < tx.bdat_chunks => t.data_block,
                _ => t.final_dot,
            },
            Expect::Rset => t.rset,
            Expect::Quit => t.quit,
        }
    }

    /// The deadline after progress: `data_block` while message data is
    /// still to be handed out, else the timeout of the oldest awaited reply.
    fn refresh_deadline(&mut self, now: Instant) {
        if self.state == State::Closed {
            self.deadline = None;
        } else if self.body.as_ref().is_some_and(BodyStream::has_output) {
            self.deadline = Some(now + self.config.timeouts.data_block);
        } else {
            self.deadline = self.expect.front().map(|&e| now + self.timeout_for(e));
        }
    }

    fn current_phase(&self) -> Phase {
        match self.expect.front() {
            Some(e) => e.phase(),
            None if self.state == State::AwaitTls => Phase::StartTls,
            None => Phase::Idle,
        }
    }

    /// The session fails: open recipients get `reply`, the transaction is
    /// reported, queued messages are handed back.
    fn fail(&mut self, _now: Instant, kind: CloseKind, phase: Phase, reply: Reply, remote: bool) {
        if let Some(mut tx) = self.tx.take() {
            tx.settle_open(&reply, phase, remote);
            self.events
                .push_back(ClientEvent::TransactionDone(Box::new(tx.into_result())));
        }
        self.out.clear();
        self.body = None;
        if kind == CloseKind::Refused {
            // RFC 5321 §3.1 / §4.1.1.10: say goodbye to a server that
            // refused us; it is still listening.
            self.out.extend_from_slice(b"QUIT\r\n");
        }
        self.close(kind, phase, Some(reply));
    }

    fn close(&mut self, kind: CloseKind, phase: Phase, reply: Option<Reply>) {
        if let Some(mut tx) = self.tx.take() {
            // Only reachable for Quit, where no transaction runs; settle
            // defensively so no recipient is ever lost.
            let r = reply!(451, 4, 4, 2, "Session closed");
            tx.settle_open(&r, phase, false);
            self.events
                .push_back(ClientEvent::TransactionDone(Box::new(tx.into_result())));
        }
        tracing::debug!(
            kind = kind.as_str(),
            phase = phase.as_str(),
            code = reply.as_ref().map(Reply::code),
            transactions = self.transactions,
            "smtp client: session closed"
        );
        self.state = State::Closed;
        self.deadline = None;
        self.expect.clear();
        self.input = Vec::new();
        let unsent = self.queue.drain(..).collect();
        self.events.push_back(ClientEvent::Closed {
            reason: CloseReason { kind, phase, reply },
            unsent,
        });
    }
}

/// "waiting for the reply to RCPT TO command", for failure texts.
fn waiting_for(phase: Phase) -> String {
    match phase {
        Phase::Greeting => "waiting for the initial greeting".into(),
        Phase::Idle => "while idle".into(),
        p => format!("waiting for the reply to {}", p.command()),
    }
}

/// Remote text in our replies: printable ASCII, bounded.
fn printable(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { ' ' })
        .take(max)
        .collect()
}

/// True when the header section (up to the first empty line) is ASCII.
fn header_is_ascii(body: &[u8]) -> bool {
    let end = memchr::memmem::find(body, b"\r\n\r\n").map_or(body.len(), |i| i + 2);
    body[..end].is_ascii()
}

fn write_mail(out: &mut Vec<u8>, m: &OutgoingMessage, plan: &Plan) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "MAIL FROM:{}", m.sender);
    if plan.size {
        let _ = write!(out, " SIZE={}", m.body.len());
    }
    if let Some(body) = plan.body {
        let _ = write!(out, " BODY={}", body.as_str());
    }
    if plan.smtputf8 {
        out.extend_from_slice(b" SMTPUTF8");
    }
    if plan.dsn {
        match m.ret {
            Some(Ret::Full) => out.extend_from_slice(b" RET=FULL"),
            Some(Ret::Headers) => out.extend_from_slice(b" RET=HDRS"),
            None => {}
        }
        if let Some(envid) = m.envid.as_deref().filter(|e| !e.is_empty()) {
            let mut e = String::with_capacity(envid.len());
            xtext_encode(envid, &mut e);
            let _ = write!(out, " ENVID={e}");
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn write_rcpt(out: &mut Vec<u8>, r: &RcptTo, dsn: bool) {
    let _ = write!(out, "RCPT TO:{}", r.to);
    if dsn {
        if let Some(n) = r
            .notify
            .filter(|n| n.never || n.success || n.failure || n.delay)
        {
            let _ = write!(out, " NOTIFY={n}");
        }
        if let Some(o) = &r.orcpt {
            // addr-type is an atom (RFC 3461 §4.2); anything else would
            // break the command, so such an ORCPT is left out.
            let type_ok = !o.addr_type.is_empty()
                && o.addr_type
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-');
            if type_ok && !o.address.is_empty() {
                let mut e = String::with_capacity(o.address.len());
                xtext_encode(&o.address, &mut e);
                let _ = write!(out, " ORCPT={};{e}", o.addr_type);
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}
