//! The SMTP server session: a sans-IO state machine (RFC 5321, 2920, 1870,
//! 6152, 3030, 6531, 3207, 2034/3463).
//!
//! The driver feeds it bytes and the current time ([`Session::handle_input`],
//! [`Session::handle_timeout`]) and takes replies ([`Session::write_output`])
//! and events ([`Session::poll_event`]) out of it. A state that waits for the
//! driver's decision (is this recipient allowed? is the message stored?)
//! consumes no input until the driver answers, like rustls waiting for a
//! certificate: the asynchronous work stays outside the state machine.
//!
//! Replies to a pipelined batch accumulate in one buffer so the driver writes
//! them in one go (RFC 2920 §3.2).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::reply;
use crate::smtp::address::{ForwardPath, ReversePath};
use crate::smtp::command::{parse_command, utf8_error_reply, BodyType, Command, MailFrom, RcptTo};
use crate::smtp::data::{DataLimits, DataScanner, LineEndingPolicy};
use crate::smtp::reply::Reply;

/// Limits and identity for sessions; built once per shard from the config and
/// shared by every session of that shard.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Our name in the greeting, EHLO reply and `Received:` header.
    pub hostname: String,
    /// SIZE advertised and enforced, in octets of stored body.
    pub max_message_size: u64,
    /// Recipients accepted per message; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Longest command line in octets, CRLF included (RFC 5321 §4.5.3.1.4: 512).
    pub max_command_line: usize,
    /// Error replies allowed per session before `421 4.7.0` and close.
    pub max_errors: u32,
    /// Longest body line in octets, CRLF excluded (RFC 5322 §2.1.1: 998).
    pub max_line_length: usize,
    /// What happens to bare CR / bare LF in a body.
    pub line_endings: LineEndingPolicy,
    /// How long we wait for the next command (RFC 5321 §4.5.3.2.7: 5 minutes).
    pub command_timeout: Duration,
    /// How long we wait for more message data (RFC 5321 §4.5.3.2.5-6: 3 minutes).
    pub data_timeout: Duration,
    /// Hold the greeting this long; a client that talks first is an early
    /// talker (a spam-bot habit) and is disconnected. Zero greets at once.
    pub greeting_delay: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_command_line: 512,
            max_errors: 20,
            max_line_length: 998,
            line_endings: LineEndingPolicy::Normalize,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            greeting_delay: Duration::ZERO,
        }
    }
}

/// Per-connection facts the driver knows.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The client's address.
    pub addr: SocketAddr,
    /// Whether STARTTLS may be advertised (a certificate is configured).
    pub starttls_available: bool,
    /// SASL mechanisms to advertise; empty = AUTH not offered.
    pub auth_mechanisms: Vec<String>,
    /// The connection is already encrypted (implicit TLS or after STARTTLS).
    pub tls_active: bool,
}

impl PeerInfo {
    /// A plain-text connection with neither STARTTLS nor AUTH.
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            starttls_available: false,
            auth_mechanisms: Vec::new(),
            tls_active: false,
        }
    }
}

/// Where in the dialogue a rejection happened (for metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Greeting / connection level (early talker, timeout, too many errors).
    Connect,
    /// EHLO / HELO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// DATA / BDAT and the end of the message.
    Data,
    /// Anything else (unknown commands, syntax errors, ...).
    Other,
}

impl Stage {
    /// A short label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Other => "other",
        }
    }
}

/// Something the driver must act on.
#[derive(Debug)]
pub enum Event {
    /// Needs [`Session::answer_recipient`] before more input is consumed.
    CheckRecipient {
        /// The transaction's sender.
        sender: ReversePath,
        /// The recipient and its DSN parameters.
        recipient: RcptTo,
    },
    /// A complete message; needs [`Session::answer_message`].
    Message(Box<IncomingMessage>),
    /// The `220` to STARTTLS is queued: flush it, handshake, then call
    /// [`Session::answer_starttls`].
    StartTls,
    /// A 4xx/5xx reply was sent.
    Rejected {
        /// Where.
        stage: Stage,
        /// The reply code.
        code: u16,
    },
}

/// A message accepted by the protocol, waiting to be made durable.
#[derive(Debug)]
pub struct IncomingMessage {
    /// Sender and MAIL parameters.
    pub mail: MailFrom,
    /// The accepted recipients, in order.
    pub recipients: Vec<RcptTo>,
    /// CRLF-only, dot-unstuffed body, without our `Received:` header.
    pub body: Vec<u8>,
    /// The client's HELO/EHLO argument.
    pub helo: String,
    /// The client's address.
    pub peer: SocketAddr,
    /// RFC 3848 protocol name for the `with` clause.
    pub protocol: &'static str,
}

impl IncomingMessage {
    /// The RFC 5321 §4.4 trace header (ends with CRLF). `date` is RFC 5322
    /// date-time text formatted by the driver from the wall clock.
    pub fn received_header(&self, by_host: &str, queue_id: &str, date: &str) -> String {
        let ip = match self.peer.ip() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!("IPv6:{v6}"),
            },
        };
        // The HELO argument is client-controlled: keep it to printable ASCII
        // and a sane length so it cannot break the header.
        let helo: String = self
            .helo
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        // RFC 5321 4.4: the From-domain must be a Domain or an address
        // literal. Anything else (`a(b`, `x;y`) would open a comment or end
        // the header's tokens early; it goes into an escaped comment instead.
        let helo_is_host = crate::smtp::address::Address::parse(&format!("x@{helo}")).is_ok();
        let from = if helo_is_host {
            format!("{helo} ([{ip}])")
        } else {
            let escaped: String = helo
                .chars()
                .flat_map(|c| {
                    let esc = matches!(c, '(' | ')' | '\\').then_some('\\');
                    esc.into_iter().chain(std::iter::once(c))
                })
                .collect();
            format!("[{ip}] ([{ip}] helo={escaped})")
        };
        let mut h = format!(
            "Received: from {from}\r\n\tby {by_host} (Sluice) with {} id {queue_id}",
            self.protocol
        );
        // Name the recipient only when there is one, as Postfix does: with
        // several, listing them would disclose Bcc recipients to each other.
        if let [only] = self.recipients.as_slice() {
            if let ForwardPath::Address(a) = &only.to {
                h.push_str(&format!("\r\n\tfor <{a}>"));
            }
        }
        h.push_str(&format!(";\r\n\t{date}\r\n"));
        h
    }
}

/// What the session is doing.
#[derive(Debug)]
enum State {
    /// Holding the greeting until the delay passes.
    Greeting { until: Instant },
    /// Reading command lines.
    Command,
    /// Waiting for the driver's verdict on a recipient.
    AwaitRecipient(RcptTo),
    /// Reading a DATA body.
    Data(Box<DataScanner>),
    /// Reading a BDAT chunk of which `remaining` octets are still to come.
    Bdat {
        remaining: u64,
        last: bool,
        chunk: u64,
    },
    /// Swallowing a BDAT chunk that has already failed; `reply` goes out when it ends.
    BdatDiscard { remaining: u64, reply: Reply },
    /// Waiting for the driver to store the message.
    AwaitMessage,
    /// Waiting for the driver's TLS handshake.
    AwaitStartTls,
    /// Done: the driver flushes the output and closes.
    Closed,
}

/// One MAIL transaction.
#[derive(Debug)]
struct Transaction {
    mail: MailFrom,
    recipients: Vec<RcptTo>,
    body: Vec<u8>,
    /// BDAT used: DATA is no longer allowed, and the raw scanner lives here.
    bdat: Option<Box<DataScanner>>,
}

/// An SMTP server session. See the module docs.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    peer: PeerInfo,
    state: State,
    out: Vec<u8>,
    events: VecDeque<Event>,
    /// A command line split across reads (bounded by `max_command_line`).
    line: Vec<u8>,
    /// The current line is over the limit: drop bytes until its LF.
    discarding_line: bool,
    deadline: Option<Instant>,
    errors: u32,
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    shutting_down: bool,
}

impl Session {
    /// A new session. Unless a greeting delay is configured, the `220`
    /// greeting is already queued as output.
    pub fn new(config: Arc<SessionConfig>, peer: PeerInfo, now: Instant) -> Session {
        let mut s = Session {
            state: State::Command,
            peer,
            out: Vec::with_capacity(512),
            events: VecDeque::new(),
            line: Vec::new(),
            discarding_line: false,
            deadline: None,
            errors: 0,
            helo: None,
            esmtp: false,
            tx: None,
            shutting_down: false,
            config,
        };
        if s.config.greeting_delay.is_zero() {
            s.greet(now);
        } else {
            s.state = State::Greeting {
                until: now + s.config.greeting_delay,
            };
        }
        s
    }

    fn greet(&mut self, now: Instant) {
        let text = format!("{} ESMTP Sluice", self.config.hostname);
        Reply::plain(220, text).write_to(&mut self.out);
        self.state = State::Command;
        self.deadline = Some(now + self.config.command_timeout);
    }

    /// Feeds bytes read from the socket and returns how many were consumed.
    /// Fewer than given are consumed only while an event awaits the driver's
    /// answer, or once the session is closed: keep the rest and feed it again.
    pub fn handle_input(&mut self, now: Instant, input: &[u8]) -> usize {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            match &mut self.state {
                State::Greeting { .. } => {
                    // RFC 5321 §3.1: the client waits for the greeting.
                    self.fatal(
                        Stage::Connect,
                        reply!(
                            554,
                            5,
                            5,
                            0,
                            "Error: SMTP protocol violation: talked before greeting"
                        ),
                    );
                    return input.len();
                }
                State::Command => {
                    pos += self.read_command(now, rest);
                }
                State::Data(scanner) => {
                    let tx = self.tx.as_mut().expect("DATA without transaction");
                    pos += scanner.feed(rest, &mut tx.body);
                    self.deadline = Some(now + self.config.data_timeout);
                    if scanner.is_finished() {
                        self.end_of_data(now);
                    }
                }
                State::Bdat {
                    remaining,
                    last,
                    chunk,
                } => {
                    let take =
                        usize::try_from(*remaining).map_or(rest.len(), |r| r.min(rest.len()));
                    *remaining -= take as u64;
                    let (done, last, chunk) = (*remaining == 0, *last, *chunk);
                    let tx = self.tx.as_mut().expect("BDAT without transaction");
                    let scanner = tx.bdat.as_mut().expect("BDAT scanner");
                    let consumed = scanner.feed(&rest[..take], &mut tx.body);
                    debug_assert_eq!(consumed, take, "raw mode consumes all");
                    pos += take;
                    self.deadline = Some(now + self.config.data_timeout);
                    if done {
                        self.end_of_chunk(now, chunk, last);
                    }
                }
                State::BdatDiscard { remaining, .. } => {
                    let take =
                        usize::try_from(*remaining).map_or(rest.len(), |r| r.min(rest.len()));
                    *remaining -= take as u64;
                    pos += take;
                    self.deadline = Some(now + self.config.data_timeout);
                    if *remaining == 0 {
                        let State::BdatDiscard { reply, .. } =
                            std::mem::replace(&mut self.state, State::Command)
                        else {
                            unreachable!()
                        };
                        self.reject(Stage::Data, reply);
                        self.after_transaction(now);
                    }
                }
                State::AwaitRecipient(_)
                | State::AwaitMessage
                | State::AwaitStartTls
                | State::Closed => break,
            }
        }
        pos
    }

    /// Splits one command line off `input` (or buffers a partial one) and
    /// executes it. Returns the bytes consumed.
    fn read_command(&mut self, now: Instant, input: &[u8]) -> usize {
        self.deadline = Some(now + self.config.command_timeout);
        let limit = self.config.max_command_line;
        let Some(lf) = memchr::memchr(b'\n', input) else {
            // A partial line: keep it only while it can still be legal, so a
            // client sending megabytes without CRLF costs us nothing.
            if self.discarding_line || self.line.len() + input.len() > limit {
                self.discarding_line = true;
                self.line.clear();
            } else {
                self.line.extend_from_slice(input);
            }
            return input.len();
        };
        let consumed = lf + 1;
        let more_pending = consumed < input.len();
        if self.discarding_line || self.line.len() + consumed > limit {
            self.discarding_line = false;
            self.line.clear();
            let text = format!("Error: command line too long (limit {limit} octets)");
            self.reject(Stage::Other, reply!(500, 5, 5, 2, text));
            return consumed;
        }
        let mut owned = std::mem::take(&mut self.line);
        let line: &[u8] = if owned.is_empty() {
            &input[..consumed]
        } else {
            owned.extend_from_slice(&input[..consumed]);
            &owned
        };
        // Commands may end in a bare LF (lenient, as Postfix is); only the
        // message body is strict about line endings.
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        self.execute(now, line, more_pending);
        owned.clear();
        self.line = owned;
        consumed
    }

    fn execute(&mut self, now: Instant, line: &[u8], more_pending: bool) {
        let command = match parse_command(line) {
            Ok(c) => c,
            Err(e) => {
                let stage = stage_of_line(line);
                self.reject(stage, e.reply());
                return;
            }
        };
        if self.shutting_down && self.tx.is_none() && !matches!(command, Command::Quit) {
            self.shutdown_now();
            return;
        }
        match command {
            Command::Ehlo(arg) => self.hello(arg, true),
            Command::Helo(arg) => self.hello(arg, false),
            Command::Mail(mail) => self.mail(mail),
            Command::Rcpt(rcpt) => self.rcpt(rcpt),
            Command::Data => self.data(now, more_pending),
            Command::Bdat { size, last } => self.bdat(now, size, last),
            Command::Rset => {
                self.tx = None;
                self.ok(reply!(250, 2, 0, 0, "Ok"));
            }
            Command::Noop => self.ok(reply!(250, 2, 0, 0, "Ok")),
            Command::Quit => {
                reply!(221, 2, 0, 0, "Bye").write_to(&mut self.out);
                self.close();
            }
            Command::Vrfy(_) => self.ok(reply!(
                252,
                2,
                5,
                0,
                "Cannot VRFY user, but will accept message and attempt delivery"
            )),
            Command::Expn(_) => self.reject(
                Stage::Other,
                reply!(502, 5, 5, 1, "Error: EXPN not supported"),
            ),
            Command::Help(_) => {
                // Name only what this session offers, as EHLO does.
                let mut text = String::from(
                    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
                );
                if self.peer.starttls_available && !self.peer.tls_active {
                    text.push_str(" STARTTLS");
                }
                if !self.peer.auth_mechanisms.is_empty() {
                    text.push_str(" AUTH");
                }
                text.push_str(" (see RFC 5321)");
                self.ok(reply!(214, 2, 0, 0, text))
            }
            Command::StartTls => self.starttls(more_pending),
            Command::Auth { .. } => {
                let r = if self.peer.auth_mechanisms.is_empty() {
                    reply!(503, 5, 5, 1, "Error: authentication not enabled")
                } else {
                    reply!(
                        504,
                        5,
                        5,
                        4,
                        "Error: authentication mechanism not supported"
                    )
                };
                self.reject(Stage::Other, r);
            }
        }
    }

    fn hello(&mut self, arg: String, esmtp: bool) {
        // RFC 5321 §4.1.4: EHLO/HELO resets any transaction.
        self.tx = None;
        self.esmtp = esmtp;
        let host = &self.config.hostname;
        let reply = if esmtp {
            let mut lines: Vec<std::borrow::Cow<'static, str>> = vec![
                host.clone().into(),
                "PIPELINING".into(),
                format!("SIZE {}", self.config.max_message_size).into(),
                "8BITMIME".into(),
                "ENHANCEDSTATUSCODES".into(),
                "CHUNKING".into(),
                "SMTPUTF8".into(),
                "DSN".into(),
            ];
            if self.peer.starttls_available && !self.peer.tls_active {
                lines.push("STARTTLS".into());
            }
            if !self.peer.auth_mechanisms.is_empty() {
                lines.push(format!("AUTH {}", self.peer.auth_mechanisms.join(" ")).into());
            }
            Reply::multiline(250, lines)
        } else {
            Reply::plain(250, host.clone())
        };
        self.helo = Some(arg);
        reply.write_to(&mut self.out);
    }

    fn mail(&mut self, mail: MailFrom) {
        if self.helo.is_none() {
            return self.reject(
                Stage::Mail,
                reply!(503, 5, 5, 1, "Error: send HELO/EHLO first"),
            );
        }
        if self.tx.is_some() {
            return self.reject(
                Stage::Mail,
                reply!(503, 5, 5, 1, "Error: nested MAIL command"),
            );
        }
        if let Some(size) = mail.size {
            if size > self.config.max_message_size {
                return self.reject(
                    Stage::Mail,
                    reply!(
                        552,
                        5,
                        3,
                        4,
                        "Message size exceeds fixed maximum message size"
                    ),
                );
            }
        }
        if mail.body == Some(BodyType::BinaryMime) {
            // We do not advertise BINARYMIME (RFC 3030 §3).
            return self.reject(
                Stage::Mail,
                reply!(555, 5, 5, 4, "BODY=BINARYMIME not supported"),
            );
        }
        self.tx = Some(Transaction {
            mail,
            recipients: Vec::new(),
            body: Vec::new(),
            bdat: None,
        });
        self.ok(reply!(250, 2, 1, 0, "Ok"));
    }

    fn rcpt(&mut self, rcpt: RcptTo) {
        let Some(tx) = &self.tx else {
            return self.reject(
                Stage::Rcpt,
                reply!(503, 5, 5, 1, "Error: need MAIL command"),
            );
        };
        if tx.bdat.is_some() {
            return self.reject(Stage::Rcpt, reply!(503, 5, 5, 1, "Error: RCPT after BDAT"));
        }
        if tx.recipients.len() >= self.config.max_recipients {
            return self.reject(
                Stage::Rcpt,
                reply!(452, 4, 5, 3, "Error: too many recipients"),
            );
        }
        if let ForwardPath::Address(a) = &rcpt.to {
            if a.needs_smtputf8() && !tx.mail.smtputf8 {
                return self.reject(Stage::Rcpt, utf8_error_reply());
            }
        }
        let sender = tx.mail.from.clone();
        self.events.push_back(Event::CheckRecipient {
            sender,
            recipient: rcpt.clone(),
        });
        self.state = State::AwaitRecipient(rcpt);
        self.deadline = None;
    }

    /// The driver's verdict on the recipient of the last
    /// [`Event::CheckRecipient`]: `Ok` accepts it (`250 2.1.5`), `Err` sends
    /// that reply (for example `554 5.7.1` relay access denied).
    pub fn answer_recipient(&mut self, now: Instant, verdict: Result<(), Reply>) {
        let State::AwaitRecipient(rcpt) = std::mem::replace(&mut self.state, State::Command) else {
            debug_assert!(false, "answer_recipient without a pending recipient");
            return;
        };
        self.deadline = Some(now + self.config.command_timeout);
        match verdict {
            Ok(()) => {
                if let Some(tx) = &mut self.tx {
                    tx.recipients.push(rcpt);
                }
                self.ok(reply!(250, 2, 1, 5, "Ok"));
            }
            Err(reply) => self.reject(Stage::Rcpt, reply),
        }
    }

    fn data(&mut self, now: Instant, more_pending: bool) {
        let Some(tx) = &self.tx else {
            return self.reject(
                Stage::Data,
                reply!(503, 5, 5, 1, "Error: need MAIL command"),
            );
        };
        if tx.bdat.is_some() {
            return self.reject(Stage::Data, reply!(503, 5, 5, 1, "Error: DATA after BDAT"));
        }
        if tx.recipients.is_empty() {
            return self.reject(
                Stage::Data,
                reply!(554, 5, 5, 1, "Error: no valid recipients"),
            );
        }
        if more_pending {
            // RFC 2920 §3.1: DATA ends a pipelined group; text sent before our
            // 354 means the client is not listening (or is smuggling).
            return self.fatal(
                Stage::Data,
                reply!(
                    554,
                    5,
                    5,
                    0,
                    "Error: improper use of SMTP command pipelining"
                ),
            );
        }
        Reply::plain(354, "End data with <CR><LF>.<CR><LF>").write_to(&mut self.out);
        self.state = State::Data(Box::new(DataScanner::dot(self.data_limits())));
        self.deadline = Some(now + self.config.data_timeout);
    }

    fn data_limits(&self) -> DataLimits {
        DataLimits {
            max_line_length: self.config.max_line_length,
            max_size: Some(self.config.max_message_size),
            line_endings: self.config.line_endings,
        }
    }

    fn end_of_data(&mut self, now: Instant) {
        let State::Data(mut scanner) = std::mem::replace(&mut self.state, State::Command) else {
            unreachable!("end_of_data outside DATA")
        };
        let mut tx = self.tx.take().expect("DATA without transaction");
        match scanner.finish(&mut tx.body) {
            Ok(()) => self.submit(now, tx),
            Err(e) => {
                let reply = e.reply(&self.data_limits());
                self.reject(Stage::Data, reply);
                self.after_transaction(now);
            }
        }
    }

    fn bdat(&mut self, now: Instant, size: u64, last: bool) {
        let failure = match &self.tx {
            None => Some(reply!(503, 5, 5, 1, "Error: need MAIL command")),
            Some(tx) if tx.recipients.is_empty() => {
                Some(reply!(554, 5, 5, 1, "Error: no valid recipients"))
            }
            Some(_) => None,
        };
        self.deadline = Some(now + self.config.data_timeout);
        if let Some(reply) = failure {
            // RFC 3030 §2: the chunk is read and discarded all the same, so
            // its octets are not taken for commands.
            self.tx = None;
            if size == 0 {
                self.reject(Stage::Data, reply);
            } else {
                self.state = State::BdatDiscard {
                    remaining: size,
                    reply,
                };
            }
            return;
        }
        let limits = self.data_limits();
        let tx = self.tx.as_mut().expect("checked above");
        tx.bdat
            .get_or_insert_with(|| Box::new(DataScanner::raw(limits)));
        if size == 0 {
            self.end_of_chunk(now, 0, last);
        } else {
            self.state = State::Bdat {
                remaining: size,
                last,
                chunk: size,
            };
        }
    }

    fn end_of_chunk(&mut self, now: Instant, chunk: u64, last: bool) {
        self.state = State::Command;
        let tx = self.tx.as_mut().expect("BDAT without transaction");
        let scanner = tx.bdat.as_mut().expect("BDAT scanner");
        if let Some(e) = scanner.error() {
            // RFC 3030 §2: after a failed chunk the transaction is over.
            let reply = e.reply(&self.data_limits());
            self.tx = None;
            self.reject(Stage::Data, reply);
            self.after_transaction(now);
            return;
        }
        if !last {
            let text = format!("Ok: {chunk} octets received");
            self.ok(reply!(250, 2, 0, 0, text));
            return;
        }
        let mut tx = self.tx.take().expect("checked above");
        let mut scanner = tx.bdat.take().expect("checked above");
        match scanner.finish(&mut tx.body) {
            Ok(()) => self.submit(now, tx),
            Err(e) => {
                let reply = e.reply(&self.data_limits());
                self.reject(Stage::Data, reply);
                self.after_transaction(now);
            }
        }
    }

    fn submit(&mut self, _now: Instant, tx: Transaction) {
        let protocol = self.protocol(tx.mail.smtputf8);
        self.events
            .push_back(Event::Message(Box::new(IncomingMessage {
                mail: tx.mail,
                recipients: tx.recipients,
                body: tx.body,
                helo: self.helo.clone().unwrap_or_default(),
                peer: self.peer.addr,
                protocol,
            })));
        self.state = State::AwaitMessage;
        self.deadline = None;
    }

    fn protocol(&self, utf8: bool) -> &'static str {
        match (self.esmtp, utf8, self.peer.tls_active) {
            (false, _, false) => "SMTP",
            (false, _, true) => "SMTPS",
            (true, false, false) => "ESMTP",
            (true, false, true) => "ESMTPS",
            (true, true, false) => "UTF8SMTP",
            (true, true, true) => "UTF8SMTPS",
        }
    }

    /// The driver's verdict on the message of the last [`Event::Message`]:
    /// `Ok(queue id)` once it is durable, or the reply to send (for example
    /// `452 4.3.1` when the spool cannot take it).
    pub fn answer_message(&mut self, now: Instant, verdict: Result<String, Reply>) {
        if !matches!(self.state, State::AwaitMessage) {
            debug_assert!(false, "answer_message without a pending message");
            return;
        }
        self.state = State::Command;
        match verdict {
            Ok(id) => self.ok(reply!(250, 2, 0, 0, format!("Ok: queued as {id}"))),
            Err(reply) => self.reject(Stage::Data, reply),
        }
        self.after_transaction(now);
    }

    /// After a transaction ends (either way): a pending shutdown takes effect.
    fn after_transaction(&mut self, now: Instant) {
        self.deadline = Some(now + self.config.command_timeout);
        if self.shutting_down && !self.is_closed() {
            self.shutdown_now();
        }
    }

    fn starttls(&mut self, more_pending: bool) {
        if !self.peer.starttls_available || self.peer.tls_active {
            return self.reject(
                Stage::Other,
                reply!(502, 5, 5, 1, "Error: STARTTLS not available"),
            );
        }
        if !self.esmtp {
            return self.reject(Stage::Other, reply!(503, 5, 5, 1, "Error: send EHLO first"));
        }
        if self.tx.is_some() {
            return self.reject(
                Stage::Other,
                reply!(
                    503,
                    5,
                    5,
                    1,
                    "Error: STARTTLS not allowed during a transaction"
                ),
            );
        }
        if more_pending {
            // CVE-2011-0411: plaintext pipelined after STARTTLS would be
            // taken as if it came over TLS.
            return self.fatal(
                Stage::Other,
                reply!(
                    554,
                    5,
                    5,
                    0,
                    "Error: improper use of SMTP command pipelining"
                ),
            );
        }
        reply!(220, 2, 0, 0, "Ready to start TLS").write_to(&mut self.out);
        self.events.push_back(Event::StartTls);
        self.state = State::AwaitStartTls;
        self.deadline = None;
    }

    /// The outcome of the TLS handshake after [`Event::StartTls`]. On success
    /// the session forgets everything the client said in plaintext (RFC 3207
    /// §4.2) and expects a new EHLO.
    pub fn answer_starttls(&mut self, now: Instant, ok: bool) {
        if !matches!(self.state, State::AwaitStartTls) {
            debug_assert!(false, "answer_starttls without STARTTLS");
            return;
        }
        if ok {
            self.state = State::Command;
            self.peer.tls_active = true;
            self.helo = None;
            self.esmtp = false;
            self.tx = None;
            self.deadline = Some(now + self.config.command_timeout);
        } else {
            self.close();
        }
    }

    /// Graceful shutdown: a transaction in flight may finish; an idle session
    /// is told `421 4.3.2` now, a busy one after its transaction.
    pub fn shutdown(&mut self, _now: Instant) {
        if self.shutting_down || self.is_closed() {
            return;
        }
        self.shutting_down = true;
        let idle = matches!(self.state, State::Command | State::Greeting { .. })
            && self.tx.is_none()
            && self.line.is_empty();
        if idle {
            self.shutdown_now();
        }
    }

    fn shutdown_now(&mut self) {
        let text = format!(
            "{} Service shutting down, closing transmission channel",
            self.config.hostname
        );
        reply!(421, 4, 3, 2, text).write_to(&mut self.out);
        self.close();
    }

    /// The client closed its side of the connection.
    pub fn handle_eof(&mut self, _now: Instant) {
        self.close();
    }

    /// Call once `poll_timeout()` has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        if let State::Greeting { .. } = self.state {
            self.greet(now);
            return;
        }
        let text = format!("{} Error: timeout exceeded", self.config.hostname);
        self.fatal(Stage::Connect, reply!(421, 4, 4, 2, text));
    }

    /// When [`Session::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Greeting { until } => Some(until),
            State::Closed => None,
            _ => self.deadline,
        }
    }

    /// The next event for the driver, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Appends pending reply bytes to `out`. Write them in one go once the
    /// session has consumed all the input you had (RFC 2920 §3.2).
    pub fn write_output(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() {
            // Hand the buffer over instead of copying it: the session keeps
            // the caller's (empty) one, so a long pipelined burst of replies
            // does not leave a large buffer behind in every idle session.
            std::mem::swap(out, &mut self.out);
        } else {
            out.append(&mut self.out);
        }
    }

    /// Whether replies are waiting to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// True once the session is finished: write the remaining output, then
    /// close the connection.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether the session would consume input now (false while it awaits
    /// the driver or is closed).
    pub fn wants_input(&self) -> bool {
        !matches!(
            self.state,
            State::AwaitRecipient(_) | State::AwaitMessage | State::AwaitStartTls | State::Closed
        )
    }

    /// Whether a transaction (MAIL given, not yet finished) is in progress.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some() || matches!(self.state, State::AwaitMessage)
    }

    fn ok(&mut self, reply: Reply) {
        reply.write_to(&mut self.out);
    }

    /// Sends an error reply, counting it; past the limit the session ends.
    fn reject(&mut self, stage: Stage, reply: Reply) {
        self.events.push_back(Event::Rejected {
            stage,
            code: reply.code(),
        });
        reply.write_to(&mut self.out);
        self.errors += 1;
        if self.errors >= self.config.max_errors && !self.is_closed() {
            let text = format!("{} Error: too many errors", self.config.hostname);
            self.fatal(Stage::Connect, reply!(421, 4, 7, 0, text));
        }
    }

    /// Sends a reply and closes the session.
    fn fatal(&mut self, stage: Stage, reply: Reply) {
        self.events.push_back(Event::Rejected {
            stage,
            code: reply.code(),
        });
        reply.write_to(&mut self.out);
        self.close();
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.tx = None;
        self.deadline = None;
        self.line = Vec::new();
    }
}

/// Which stage a command line that failed to parse belongs to (metrics only).
fn stage_of_line(line: &[u8]) -> Stage {
    let verb = line.get(..4).unwrap_or(line);
    if verb.eq_ignore_ascii_case(b"MAIL") {
        Stage::Mail
    } else if verb.eq_ignore_ascii_case(b"RCPT") {
        Stage::Rcpt
    } else if verb.eq_ignore_ascii_case(b"EHLO") || verb.eq_ignore_ascii_case(b"HELO") {
        Stage::Helo
    } else if verb.eq_ignore_ascii_case(b"DATA") || verb.eq_ignore_ascii_case(b"BDAT") {
        Stage::Data
    } else {
        Stage::Other
    }
}

#[cfg(test)]
mod tests;
