//! Client configuration: identity, per-command timeouts and protocol choices.

use std::time::Duration;

/// How long the client waits for each reply (RFC 5321 §4.5.3.2), plus the
/// commands the RFC leaves open, with Postfix's defaults for those.
///
/// Every wait the core can see is bounded by one of these. The TLS handshake
/// after `STARTTLS` happens in the driver, which bounds it by
/// [`ClientTimeouts::starttls`] itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// The `220` greeting (§4.5.3.2.1: 5 minutes).
    pub greeting: Duration,
    /// The reply to EHLO or HELO (RFC silent; Postfix `smtp_helo_timeout` 300 s).
    pub ehlo: Duration,
    /// The reply to STARTTLS (RFC silent; Postfix `smtp_starttls_timeout` 300 s).
    pub starttls: Duration,
    /// The reply to MAIL FROM (§4.5.3.2.2: 5 minutes).
    pub mail: Duration,
    /// The reply to each RCPT TO (§4.5.3.2.3: 5 minutes).
    pub rcpt: Duration,
    /// The `354` to DATA (§4.5.3.2.4: 2 minutes).
    pub data_init: Duration,
    /// Each block of message data handed to the driver, i.e. each socket
    /// write (§4.5.3.2.5: 3 minutes); also the reply to a non-final BDAT chunk.
    pub data_block: Duration,
    /// The reply after the final dot or the `BDAT LAST` chunk (§4.5.3.2.6:
    /// 10 minutes: the server may be filtering the message).
    pub final_dot: Duration,
    /// The reply to RSET (RFC silent; Postfix `smtp_rset_timeout` 20 s).
    pub rset: Duration,
    /// The reply to QUIT (RFC silent; Postfix `smtp_quit_timeout` 300 s; we
    /// wait less because nothing depends on it any more).
    pub quit: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        const MIN: u64 = 60;
        Self {
            greeting: Duration::from_secs(5 * MIN),
            ehlo: Duration::from_secs(5 * MIN),
            starttls: Duration::from_secs(5 * MIN),
            mail: Duration::from_secs(5 * MIN),
            rcpt: Duration::from_secs(5 * MIN),
            data_init: Duration::from_secs(2 * MIN),
            data_block: Duration::from_secs(3 * MIN),
            final_dot: Duration::from_secs(10 * MIN),
            rset: Duration::from_secs(20),
            quit: Duration::from_secs(MIN),
        }
    }
}

/// What to do with a message declared `BODY=8BITMIME` whose body really has
/// 8-bit octets, when the server does not offer 8BITMIME.
///
/// A body declared 8-bit that is in fact 7-bit clean is always sent (without
/// the `BODY=` parameter): many mail programs declare 8BITMIME for any message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EightBitPolicy {
    /// Fail the transaction with `554 5.6.3` before sending anything, as
    /// RFC 6152 §3 asks of a client that cannot convert the body. The default:
    /// a clear bounce beats a message that is silently mangled on its way.
    #[default]
    Reject,
    /// Send the 8-bit body anyway, without `BODY=8BITMIME` (what Postfix does
    /// by default: most servers that do not say 8BITMIME are 8-bit clean).
    SendAnyway,
}

/// Whether to upgrade connections with STARTTLS (RFC 3207).
///
/// The TLS layer itself belongs to the driver: the core emits
/// [`ClientEvent::StartTls`](super::ClientEvent::StartTls) and resumes with
/// [`ClientSession::answer_starttls`](super::ClientSession::answer_starttls).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StartTlsPolicy {
    /// Never send STARTTLS (the default until a driver implements TLS).
    #[default]
    Disabled,
    /// Send STARTTLS when the server offers it; when the server refuses it
    /// (`454` etc.), continue in plain text.
    Opportunistic,
}

/// Configuration shared by every client session of a shard.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Our name in EHLO / HELO (a FQDN; RFC 5321 §4.1.4).
    pub ehlo_name: String,
    /// Per-command timeouts.
    pub timeouts: ClientTimeouts,
    /// Pipeline MAIL, RCPT and DATA (RFC 2920) when the server offers PIPELINING.
    pub use_pipelining: bool,
    /// Most commands awaiting a reply at once when pipelining. Bounding it
    /// keeps a transaction with very many recipients from filling both
    /// directions' socket buffers at once (RFC 2920 §3.1 deadlock warning).
    pub max_pipelined_commands: usize,
    /// Send the body with BDAT (RFC 3030) when the server offers CHUNKING.
    /// Off by default: DATA is what every server is tested with (Postfix and
    /// KumoMTA send DATA only), and BDAT saves the server's dot scan, not ours.
    pub use_chunking: bool,
    /// Octets per BDAT chunk (at least 1).
    pub bdat_chunk_size: usize,
    /// Most body octets handed out per [`write_output`](super::ClientSession::write_output)
    /// call: bounds the driver's write buffer for big messages.
    pub max_write_chunk: usize,
    /// 8-bit body to a server without 8BITMIME.
    pub eight_bit: EightBitPolicy,
    /// STARTTLS use.
    pub starttls: StartTlsPolicy,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            ehlo_name: "localhost".into(),
            timeouts: ClientTimeouts::default(),
            use_pipelining: true,
            max_pipelined_commands: 256,
            use_chunking: false,
            bdat_chunk_size: 1024 * 1024,
            max_write_chunk: 256 * 1024,
            eight_bit: EightBitPolicy::Reject,
            starttls: StartTlsPolicy::Disabled,
        }
    }
}
