//! What goes into a client session (messages) and what comes out (events,
//! per-recipient results, close reasons).

use std::fmt;

use bytes::Bytes;

use crate::smtp::address::ReversePath;
use crate::smtp::command::{BodyType, RcptTo, Ret};
use crate::smtp::reply::Reply;

/// One message to send on a connection: the envelope, its ESMTP parameters
/// and the body.
///
/// Parameters the server does not support are left out (DSN `RET`, `ENVID`,
/// `NOTIFY`, `ORCPT` without DSN) or make the transaction fail locally
/// (8-bit, binary, SMTPUTF8 and SIZE rules: see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// MAIL FROM (`<>` for DSNs).
    pub sender: ReversePath,
    /// RCPT TO with their DSN `NOTIFY` / `ORCPT`, in the order to send.
    pub recipients: Vec<RcptTo>,
    /// The message: headers and body, CRLF line endings only, *not*
    /// dot-stuffed. Cheap to clone; the session emits slices of it (use
    /// `Bytes::from(vec)` or `Bytes::from_owner(sled_ivec)`, both zero-copy).
    pub body: Bytes,
    /// `BODY=` as declared by the original sender.
    pub body_type: Option<BodyType>,
    /// The original sender declared `SMTPUTF8`.
    pub smtputf8: bool,
    /// DSN `RET=` (RFC 3461).
    pub ret: Option<Ret>,
    /// DSN `ENVID=`, plain text (xtext-encoded on the wire).
    pub envid: Option<String>,
}

impl OutgoingMessage {
    /// A message without ESMTP parameters.
    pub fn new(sender: ReversePath, recipients: Vec<RcptTo>, body: impl Into<Bytes>) -> Self {
        Self {
            sender,
            recipients,
            body: body.into(),
            body_type: None,
            smtputf8: false,
            ret: None,
            envid: None,
        }
    }
}

/// A connection-local sequence number for a message handed to
/// [`ClientSession::send_message`](super::ClientSession::send_message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransactionId(pub u64);

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tx{}", self.0)
    }
}

/// The step of the SMTP dialogue a reply answered (or a failure happened in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Waiting for the `220` greeting.
    Greeting,
    /// EHLO.
    Ehlo,
    /// HELO (after EHLO was refused).
    Helo,
    /// STARTTLS and the TLS handshake.
    StartTls,
    /// MAIL FROM (also: checks made before sending anything).
    Mail,
    /// RCPT TO.
    Rcpt,
    /// The DATA command.
    Data,
    /// Sending the message data and the final dot.
    EndOfData,
    /// BDAT chunks.
    Bdat,
    /// RSET.
    Rset,
    /// QUIT.
    Quit,
    /// No command outstanding.
    Idle,
}

impl Phase {
    /// A short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Greeting => "greeting",
            Phase::Ehlo => "ehlo",
            Phase::Helo => "helo",
            Phase::StartTls => "starttls",
            Phase::Mail => "mail",
            Phase::Rcpt => "rcpt",
            Phase::Data => "data",
            Phase::EndOfData => "end_of_data",
            Phase::Bdat => "bdat",
            Phase::Rset => "rset",
            Phase::Quit => "quit",
            Phase::Idle => "idle",
        }
    }

    /// What a reply in this phase answers, for humans: DSN texts say
    /// "(in reply to RCPT TO command)" as Postfix does.
    pub fn command(self) -> &'static str {
        match self {
            Phase::Greeting => "initial greeting",
            Phase::Ehlo => "EHLO command",
            Phase::Helo => "HELO command",
            Phase::StartTls => "STARTTLS command",
            Phase::Mail => "MAIL FROM command",
            Phase::Rcpt => "RCPT TO command",
            Phase::Data => "DATA command",
            Phase::EndOfData => "end of DATA command",
            Phase::Bdat => "BDAT command",
            Phase::Rset => "RSET command",
            Phase::Quit => "QUIT command",
            Phase::Idle => "no command (idle connection)",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientResult {
    /// The reply that decides this recipient: its RCPT reply if that
    /// refused it, else the reply that ended the transaction (MAIL or DATA
    /// refusal, the final reply to the data), or a local reply (timeout,
    /// lost connection, a message the server cannot take). 2xx: delivered;
    /// 4xx: try again later; 5xx: failed.
    pub reply: Reply,
    /// Where in the dialogue it came from.
    pub phase: Phase,
    /// True when the remote server sent `reply`; false when this client
    /// made it up (a DSN then has no `Diagnostic-Code: smtp;` for it).
    pub remote: bool,
}

impl RecipientResult {
    /// The remote server took responsibility for the message (2xx).
    pub fn is_delivered(&self) -> bool {
        self.reply.is_positive()
    }

    /// Try again later (4xx, or anything that is neither 2xx nor 5xx).
    pub fn is_transient(&self) -> bool {
        !self.reply.is_positive() && !self.reply.is_permanent()
    }

    /// Do not retry (5xx).
    pub fn is_permanent(&self) -> bool {
        self.reply.is_permanent()
    }
}

/// The end of one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionResult {
    /// What [`send_message`](super::ClientSession::send_message) returned.
    pub id: TransactionId,
    /// The message, handed back.
    pub message: OutgoingMessage,
    /// One result per `message.recipients` entry, same order.
    pub recipients: Vec<RecipientResult>,
    /// The server offered DSN, so NOTIFY/ORCPT/RET/ENVID went with the
    /// message. When false, a NOTIFY=SUCCESS recipient that was delivered is
    /// owed a "relayed" DSN by us (RFC 3461 §4.1).
    pub remote_dsn: bool,
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseKind {
    /// Orderly: QUIT was sent (its reply, or its absence, does not matter).
    Quit,
    /// The server refused us at connection level: a 4xx/5xx greeting, EHLO
    /// and HELO refused, RSET refused. Try the next MX host.
    Refused,
    /// The server sent `421` (RFC 5321 §3.8): it is closing the connection.
    ServerClosing,
    /// A reply did not come in time (RFC 5321 §4.5.3.2).
    Timeout,
    /// The connection closed (EOF) before the dialogue ended.
    ConnectionLost,
    /// Malformed or oversized reply, a reply nothing was waiting for, a
    /// reply code that makes no sense where it came, plaintext after the
    /// `220` to STARTTLS.
    ProtocolError,
    /// The driver reported a failed TLS handshake.
    TlsFailed,
}

impl CloseKind {
    /// A short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseKind::Quit => "quit",
            CloseKind::Refused => "refused",
            CloseKind::ServerClosing => "server_closing",
            CloseKind::Timeout => "timeout",
            CloseKind::ConnectionLost => "connection_lost",
            CloseKind::ProtocolError => "protocol_error",
            CloseKind::TlsFailed => "tls_failed",
        }
    }
}

/// Why and where a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    /// Why.
    pub kind: CloseKind,
    /// Where: the phase whose reply was awaited.
    pub phase: Phase,
    /// The reply given to unfinished recipients: the server's for `Refused`
    /// and `ServerClosing`, ours (always 4xx) for the failures; `None` for `Quit`.
    pub reply: Option<Reply>,
}

impl CloseReason {
    /// The session failed before the first transaction could start
    /// (greeting, EHLO/HELO, STARTTLS): the host is unusable now; the
    /// driver should try the next MX host with the unsent messages.
    pub fn is_connection_failure(&self) -> bool {
        self.kind != CloseKind::Quit
            && matches!(
                self.phase,
                Phase::Greeting | Phase::Ehlo | Phase::Helo | Phase::StartTls
            )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.kind.as_str(), self.phase)?;
        if let Some(r) = &self.reply {
            write!(f, ": {r}")?;
        }
        Ok(())
    }
}

/// Something the driver must act on.
#[derive(Debug)]
pub enum ClientEvent {
    /// Greeting, EHLO (or HELO) and STARTTLS are done, the extensions are
    /// known ([`ClientSession::extensions`](super::ClientSession::extensions)):
    /// queued messages start now. Emitted once per connection.
    Ready,
    /// The server said `220` to STARTTLS: flush the output, run the TLS
    /// handshake on the socket (bounded by `timeouts.starttls`), then call
    /// [`ClientSession::answer_starttls`](super::ClientSession::answer_starttls).
    /// Feed no input until then.
    StartTls,
    /// A transaction ended; every recipient has its result.
    TransactionDone(Box<TransactionResult>),
    /// The session is over: write what [`has_output`](super::ClientSession::has_output)
    /// still holds (a QUIT, maybe), then close the socket.
    Closed {
        /// Why.
        reason: CloseReason,
        /// Messages handed to `send_message` whose transaction never
        /// started (no MAIL sent): not an attempt; send them elsewhere.
        unsent: Vec<(TransactionId, OutgoingMessage)>,
    },
}

/// [`send_message`](super::ClientSession::send_message) on a session that is
/// closed or quitting; the message is handed back.
#[derive(Debug, thiserror::Error)]
#[error("SMTP client session is closed or quitting")]
pub struct SessionClosed(pub Box<OutgoingMessage>);
