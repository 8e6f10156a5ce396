//! RFC 3464 delivery status notifications: bounces, delay warnings and
//! success reports, built as complete RFC 5322 messages ready to spool.
//!
//! The engine decides *when* a DSN is owed ([`recipients_to_report`],
//! [`should_notify`]) and fills a [`DsnInput`] from the spool [`Envelope`],
//! the per-recipient outcomes ([`DsnRecipient`]) and the original message
//! bytes; [`build`] is a pure function of that input (no clock, no
//! randomness), so its output can be compared byte for byte in tests.
//!
//! Shape of the message (RFC 6522 `multipart/report`):
//! 1. `text/plain`: a human-readable explanation naming every recipient and
//!    the reply that decided its fate (in the manner of Postfix's bounces);
//! 2. `message/delivery-status` (RFC 3464 §2): per-message fields, then one
//!    group per recipient;
//! 3. the original: its header section as `text/rfc822-headers` (the default
//!    and RET=HDRS), or the whole message as `message/rfc822` for RET=FULL
//!    when it is at most [`DsnInput::return_size_limit`] octets (Postfix's
//!    `bounce_size_limit`); above it, headers only, and the text says so.
//!
//! Choices where the RFCs leave room:
//! - ENVID and ORCPT are stored xtext-*decoded* by the server (see
//!   `smtp::command`), and RFC 3461 §4.2/§4.4 require the decoded values to be
//!   printable US-ASCII precisely so they can be copied into DSN fields: they
//!   are echoed decoded, as Postfix does. ORCPT is echoed as stored
//!   (`addr-type;address`).
//! - Internationalised mail (RFC 6533): when an address or ENVID we must
//!   print is not ASCII, or the returned headers contain UTF-8 and the
//!   original was sent with SMTPUTF8, the report uses
//!   `message/global-delivery-status` and `message/global` /
//!   `message/global-headers`, non-ASCII recipients are written with address
//!   type `utf-8` in their raw UTF-8 form, and [`Dsn::smtputf8`] asks the
//!   engine to spool the DSN with SMTPUTF8. The multipart `report-type` stays
//!   `delivery-status`, as Postfix sends it.
//! - Any 8-bit octet in a part makes that part `Content-Transfer-Encoding:
//!   8bit` and sets [`Dsn::body_8bit`] (spool with BODY=8BITMIME); nothing is
//!   re-encoded, because `message/rfc822` may not be base64/QP (RFC 2046 §5.2.1).
//! - Text taken from outside (remote replies, HELO, addresses) never breaks
//!   the framing: control characters become spaces, runs of spaces collapse,
//!   non-ASCII becomes `?` unless the report is internationalised, and a
//!   remote reply is cut at [`MAX_DIAGNOSTIC_LEN`] octets (a hostile server
//!   may send 128 lines of 2 KiB per recipient).
//! - Header fields are folded at spaces to 78 columns. A word too long for a
//!   998-octet line (only possible in remote reply text) is split, which adds
//!   a space when the field is unfolded.
//! - The returned original is copied with its line endings normalised to
//!   CRLF and lines over 998 octets split, so the DSN is well formed even if
//!   the spool ever holds a message our server would not have accepted.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::server::date::rfc5322;
use crate::smtp::reply::{EnhancedCode, Reply};
use crate::spool::{Envelope, Recipient, RecipientState, SpoolId};

/// Default cap on the returned original for RET=FULL, in octets (Postfix's
/// `bounce_size_limit`). Larger messages are returned as headers only.
pub const DEFAULT_RETURN_SIZE_LIMIT: usize = 50_000;

/// Longest remote reply text kept per recipient, in octets.
pub const MAX_DIAGNOSTIC_LEN: usize = 2000;

/// Preferred header line width (RFC 5322 §2.1.1 SHOULD).
const FOLD_WIDTH: usize = 78;
/// Hard line limit without CRLF (RFC 5322 §2.1.1 MUST).
const MAX_LINE: usize = 998;
/// Chunk size when a single word has to be split across lines.
const SPLIT_CHUNK: usize = 900;

/// What happened to a recipient (RFC 3464 §2.3.3 `Action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Could not be delivered and will not be retried.
    Failed,
    /// Not delivered yet; still being retried.
    Delayed,
    /// Delivered to a server that took final responsibility (or a mailbox).
    Delivered,
    /// Handed to a server that does not speak DSN: no further reports.
    Relayed,
    /// Delivered and expanded (a list or alias).
    Expanded,
}

impl Action {
    /// The RFC 3464 action value.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
        }
    }

    /// The RFC 3461 NOTIFY keyword that asks for this kind of report.
    fn notify_keyword(self) -> &'static str {
        match self {
            Action::Failed => "FAILURE",
            Action::Delayed => "DELAY",
            Action::Delivered | Action::Relayed | Action::Expanded => "SUCCESS",
        }
    }

    /// Status classes allowed with this action (RFC 3464 §2.3.3/§2.3.4).
    fn status_classes(self) -> &'static [u8] {
        match self {
            Action::Failed => &[5, 4],
            Action::Delayed => &[4],
            Action::Delivered | Action::Relayed | Action::Expanded => &[2],
        }
    }

    fn is_success(self) -> bool {
        matches!(self, Action::Delivered | Action::Relayed | Action::Expanded)
    }
}

/// Whether a recipient whose RCPT carried `notify` (the stored NOTIFY value:
/// `"NEVER"` or a comma list of `SUCCESS`, `FAILURE`, `DELAY`) wants a report
/// for `action`. Without NOTIFY, RFC 3461 §4.1 lets the MTA behave as if
/// `FAILURE,DELAY` was given: failures and delays are reported, successes
/// are not. Whether delay reports are sent at all is the engine's policy.
pub fn should_notify(notify: Option<&str>, action: Action) -> bool {
    match notify {
        None => matches!(action, Action::Failed | Action::Delayed),
        Some(list) => list
            .split(',')
            .any(|k| k.trim().eq_ignore_ascii_case(action.notify_keyword())),
    }
}

/// Indices into `env.recipients` of the recipients a DSN for `action` must
/// name: their state matches (`Failed` for [`Action::Failed`], `Deferred` for
/// [`Action::Delayed`], `Delivered` for the success actions) and their NOTIFY
/// asks for it. Empty for a null-sender message: a bounce is never bounced
/// (RFC 5321 §4.5.5). An empty result means: no DSN.
pub fn recipients_to_report(env: &Envelope, action: Action) -> Vec<usize> {
    if env.sender.is_empty() {
        return Vec::new();
    }
    env.recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            let state_fits = match r.state {
                RecipientState::Failed { .. } => action == Action::Failed,
                RecipientState::Deferred { .. } => action == Action::Delayed,
                RecipientState::Delivered { .. } => action.is_success(),
                RecipientState::Pending => false,
            };
            state_fits && should_notify(r.notify.as_deref(), action)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Turns a reply stored as text in the spool (normally `Reply`'s `Display`
/// form, `"550 5.1.1 text"`, possibly several CRLF-separated lines) back into
/// a [`Reply`]. Text that is not an SMTP reply (a local error message)
/// becomes a reply with code 550 (`permanent`) or 451 and no enhanced code.
pub fn reply_from_text(text: &str, permanent: bool) -> Reply {
    let mut wire = text.trim_end_matches(['\r', '\n']).to_owned();
    wire.push_str("\r\n");
    match Reply::parse(wire.as_bytes()) {
        Ok(Some((reply, used))) if used == wire.len() => reply,
        _ => Reply::from_parts(
            if permanent { 550 } else { 451 },
            None,
            vec![text.trim().to_owned()],
        ),
    }
}

/// One recipient to name in a DSN, with what the engine knows about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The recipient address as given in RCPT TO (`Final-Recipient`).
    pub address: String,
    /// The stored ORCPT, `addr-type;address` (xtext-decoded), echoed as
    /// `Original-Recipient`.
    pub orcpt: Option<String>,
    /// What happened.
    pub action: Action,
    /// The reply that decided it: the remote server's, or a local one (DNS
    /// failure, expiry). Its enhanced code is the `Status` unless
    /// [`DsnRecipient::status`] overrides it.
    pub reply: Reply,
    /// Overrides the status taken from `reply` (e.g. `4.4.7` on expiry while
    /// `reply` is the last remote 4xx). Ignored if its class does not fit the
    /// action.
    pub status: Option<EnhancedCode>,
    /// Host name of the server that sent `reply` (`Remote-MTA`). `None`
    /// means the reply is ours (DNS, expiry, policy): its `Diagnostic-Code`
    /// type is then `X-Sluice` instead of `smtp`.
    pub remote_host: Option<String>,
    /// That server's IP address, shown in the human-readable part.
    pub remote_ip: Option<IpAddr>,
    /// When delivery was last attempted (`Last-Attempt-Date`).
    pub last_attempt: Option<SystemTime>,
    /// For [`Action::Delayed`]: when retries stop (`Will-Retry-Until`).
    pub will_retry_until: Option<SystemTime>,
}

impl DsnRecipient {
    /// A recipient filled from its spool record: `Failed` gives
    /// [`Action::Failed`], `Deferred` [`Action::Delayed`], `Delivered`
    /// [`Action::Delivered`] (set `Relayed` when the next hop did not speak
    /// DSN); `Pending` gives `None`. The stored reply text is parsed with
    /// [`reply_from_text`]. The spool does not keep the remote host, the
    /// time of a deferred attempt or the retry limit: the engine sets
    /// `remote_host`, `remote_ip`, `last_attempt` and `will_retry_until`
    /// when it knows them.
    pub fn from_spool(r: &Recipient) -> Option<Self> {
        let (action, reply, at_ms) = match &r.state {
            RecipientState::Pending => return None,
            RecipientState::Failed { at_ms, reply } => {
                (Action::Failed, reply_from_text(reply, true), Some(*at_ms))
            }
            RecipientState::Deferred { last_reply, .. } => {
                (Action::Delayed, reply_from_text(last_reply, false), None)
            }
            RecipientState::Delivered { at_ms, reply } => (
                Action::Delivered,
                reply_from_text(reply, true),
                Some(*at_ms),
            ),
        };
        Some(Self {
            address: r.address.clone(),
            orcpt: r.orcpt.clone(),
            action,
            reply,
            status: None,
            remote_host: None,
            remote_ip: None,
            last_attempt: at_ms.map(unix_ms),
            will_retry_until: None,
        })
    }

    /// The `Status` value: the override, else the reply's enhanced code,
    /// else `class.0.0` from the reply code (RFC 3463 §3.1), always of a
    /// class that fits the action.
    pub fn status_code(&self) -> EnhancedCode {
        let fits = self.action.status_classes();
        if let Some(s) = self.status.filter(|s| fits.contains(&s.class)) {
            return s;
        }
        if let Some(e) = self.reply.enhanced().filter(|e| fits.contains(&e.class)) {
            return e;
        }
        let code_class = (self.reply.code() / 100) as u8;
        let class = if fits.contains(&code_class) {
            code_class
        } else {
            fits[0]
        };
        EnhancedCode::new(class, 0, 0)
    }
}

/// Everything [`build`] needs. Borrowed, so the engine builds it from what it
/// already holds without copying the message.
#[derive(Clone, Debug)]
pub struct DsnInput<'a> {
    /// Our host name: `Reporting-MTA`, `From: MAILER-DAEMON@...`, Message-ID.
    pub hostname: &'a str,
    /// The spool id the DSN will be stored under (Message-ID and boundary;
    /// unique per host, so both are fresh).
    pub dsn_id: SpoolId,
    /// The `Date:` of the DSN (passed in: `build` reads no clock).
    pub date: SystemTime,
    /// The original message's envelope: sender (the DSN's `To:`), ENVID,
    /// RET, arrival time, SMTPUTF8, client IP and HELO.
    pub envelope: &'a Envelope,
    /// The recipients to name, in order (see [`recipients_to_report`]).
    pub recipients: &'a [DsnRecipient],
    /// The original message as spooled (headers and body, with our
    /// `Received:` on top).
    pub original: &'a [u8],
    /// RET=FULL returns the whole message only up to this many octets.
    pub return_size_limit: usize,
}

/// A built DSN and how to spool it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Dsn {
    /// The complete message: CRLF line endings only, no line over 998 octets.
    pub message: Vec<u8>,
    /// Some part carries 8-bit octets: spool with BODY=8BITMIME.
    pub body_8bit: bool,
    /// The DSN is internationalised (RFC 6533): spool with SMTPUTF8.
    pub smtputf8: bool,
}

impl Dsn {
    /// The spool envelope for this DSN: null sender, one recipient (`to`, the
    /// original sender), no DSN parameters of its own.
    pub fn envelope(&self, id: SpoolId, received_at_ms: u64, to: &str) -> Envelope {
        Envelope {
            id,
            sender: String::new(),
            recipients: vec![Recipient {
                address: to.to_owned(),
                notify: None,
                orcpt: None,
                state: RecipientState::Pending,
                remote_mta: None,
            }],
            received_at_ms,
            size: self.message.len() as u64,
            body_8bit: self.body_8bit,
            smtputf8: self.smtputf8,
            ret_full: None,
            envid: None,
            client_ip: None,
            helo: None,
        }
    }
}

/// Builds the DSN, or `None` when none may be sent: the original sender is
/// `<>` or no recipient is given. The caller chooses the recipients (see
/// [`recipients_to_report`]); they are reported in the order given.
pub fn build(input: &DsnInput<'_>) -> Option<Dsn> {
    let env = input.envelope;
    if env.sender.is_empty() || input.recipients.is_empty() {
        return None;
    }
    let any_failed = input.recipients.iter().any(|r| r.action == Action::Failed);

    // The returned original: whole (RET=FULL on a failure, within the limit)
    // or its header section (itself cut to the limit).
    let wants_full = env.ret_full == Some(true) && any_failed;
    let full = wants_full && input.original.len() <= input.return_size_limit;
    let mut returned = Vec::new();
    let mut headers_truncated = false;
    if full {
        push_normalized(&mut returned, input.original);
    } else {
        let headers = header_section(input.original);
        let kept = truncate_headers(headers, input.return_size_limit);
        headers_truncated = kept.len() < headers.len();
        push_normalized(&mut returned, kept);
    }
    let returned_8bit = !returned.is_ascii();

    // RFC 6533 when something we print needs UTF-8.
    let printed_utf8 = !env.sender.is_ascii()
        || env.envid.as_deref().is_some_and(|e| !e.is_ascii())
        || input
            .recipients
            .iter()
            .any(|r| !r.address.is_ascii() || r.orcpt.as_deref().is_some_and(|o| !o.is_ascii()));
    let returned_headers_utf8 = env.smtputf8 && !header_section(&returned).is_ascii();
    let utf8 = printed_utf8 || returned_headers_utf8;

    let ctx = Ctx {
        utf8,
        hostname: clean(input.hostname, false, true),
    };
    let notification = human_readable(&ctx, input, wants_full && !full, headers_truncated);
    let status = delivery_status(&ctx, input);

    let (returned_type, returned_desc) = match (full, utf8) {
        (true, false) => ("message/rfc822", "Message"),
        (true, true) => ("message/global", "Message"),
        (false, false) => ("text/rfc822-headers", "Message Headers"),
        (false, true) => ("message/global-headers", "Message Headers"),
    };
    let what = if any_failed {
        "Undelivered"
    } else if input.recipients.iter().any(|r| r.action == Action::Delayed) {
        "Delayed"
    } else {
        "Delivered"
    };

    let boundary = choose_boundary(input.dsn_id, &[&notification, &status, &returned]);

    let mut out = Vec::with_capacity(notification.len() + status.len() + returned.len() + 1024);
    let subject = if any_failed {
        "Undelivered Mail Returned to Sender"
    } else if what == "Delayed" {
        "Delivery Status Notification (Delay)"
    } else {
        "Successful Mail Delivery Report"
    };
    push_field(
        &mut out,
        "From",
        &format!("Mail Delivery System <MAILER-DAEMON@{}>", ctx.hostname),
    );
    push_field(&mut out, "To", &format!("<{}>", ctx.exact(&env.sender)));
    push_field(&mut out, "Subject", subject);
    push_field(&mut out, "Date", &rfc5322(input.date));
    push_field(
        &mut out,
        "Message-ID",
        &format!("<{}.dsn@{}>", input.dsn_id, ctx.hostname),
    );
    // RFC 3834 §5: a DSN is an automatic reply; auto-responders must not
    // answer it.
    push_field(&mut out, "Auto-Submitted", "auto-replied");
    push_field(&mut out, "MIME-Version", "1.0");
    out.extend_from_slice(
        b"Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"",
    );
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"\"\r\n\r\nThis is a MIME-encapsulated message.\r\n");

    let text_type = if utf8 {
        "text/plain; charset=utf-8"
    } else {
        "text/plain; charset=us-ascii"
    };
    let status_type = if utf8 {
        "message/global-delivery-status"
    } else {
        "message/delivery-status"
    };
    let returned_description = format!("{what} {returned_desc}");
    let parts: [(&str, &str, &[u8]); 3] = [
        ("Notification", text_type, &notification),
        ("Delivery report", status_type, &status),
        (&returned_description, returned_type, &returned),
    ];
    let mut body_8bit = returned_8bit;
    for (description, content_type, content) in parts {
        let eight = !content.is_ascii();
        body_8bit |= eight;
        out.extend_from_slice(b"\r\n--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\n");
        push_field(&mut out, "Content-Description", description);
        push_field(&mut out, "Content-Type", content_type);
        push_field(
            &mut out,
            "Content-Transfer-Encoding",
            if eight { "8bit" } else { "7bit" },
        );
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(content);
    }
    out.extend_from_slice(b"\r\n--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");

    tracing::debug!(
        original = %env.id,
        dsn = %input.dsn_id,
        recipients = input.recipients.len(),
        returned = if full { "full" } else { "headers" },
        size = out.len(),
        body_8bit,
        smtputf8 = utf8,
        "DSN built"
    );
    Some(Dsn {
        message: out,
        body_8bit,
        smtputf8: utf8,
    })
}

/// Per-build settings for text cleaning.
struct Ctx<'a> {
    /// The report is internationalised: UTF-8 may stay in text.
    utf8: bool,
    hostname: Cow<'a, str>,
}

impl Ctx<'_> {
    /// Free text (reply text, host names): cleaned and collapsed.
    fn text<'s>(&self, s: &'s str) -> Cow<'s, str> {
        clean(s, self.utf8, true)
    }

    /// Values echoed exactly (addresses, ORCPT, ENVID): only made safe.
    fn exact<'s>(&self, s: &'s str) -> Cow<'s, str> {
        clean(s, self.utf8, false)
    }
}

/// Part 1: the explanation for people.
fn human_readable(
    ctx: &Ctx<'_>,
    input: &DsnInput<'_>,
    too_big_for_full: bool,
    headers_truncated: bool,
) -> Vec<u8> {
    let has = |a: fn(Action) -> bool| input.recipients.iter().any(|r| a(r.action));
    let mut p: Vec<String> = Vec::new();
    p.push(format!("This is the mail system at host {}.", ctx.hostname));
    if has(|a| a == Action::Failed) {
        p.push(
            "I'm sorry to have to tell you that your message could not be delivered to one or \
             more recipients. The recipients and the reasons are listed below."
                .to_owned(),
        );
    }
    if has(|a| a == Action::Delayed) {
        let until = input
            .recipients
            .iter()
            .filter_map(|r| r.will_retry_until)
            .max();
        p.push(match until {
            Some(t) => format!(
                "Your message could not be delivered yet to the recipients listed below. The \
                 mail system will keep trying until {}. This is only a warning: you do not \
                 need to send the message again.",
                rfc5322(t)
            ),
            None => "Your message could not be delivered yet to the recipients listed below. \
                     The mail system will keep trying. This is only a warning: you do not need \
                     to send the message again."
                .to_owned(),
        });
    }
    if has(Action::is_success) {
        p.push(
            "Your message was delivered to the destinations listed below. If a destination is \
             a mailbox, you will receive no further notifications; otherwise you may still \
             receive reports from systems further along the way."
                .to_owned(),
        );
    }
    if too_big_for_full {
        p.push(format!(
            "The message was larger than {} octets, so only its headers are returned.",
            input.return_size_limit
        ));
    } else if headers_truncated {
        p.push(format!(
            "The message headers were larger than {} octets, so only their start is returned.",
            input.return_size_limit
        ));
    }
    p.push(format!(
        "For further assistance, please send mail to <postmaster@{}> and include this report.",
        ctx.hostname
    ));
    p.push("                   The mail system".to_owned());

    let mut out = Vec::new();
    for para in &p {
        push_wrapped(&mut out, para, "");
        out.extend_from_slice(b"\r\n");
    }
    for r in input.recipients {
        let mut line = format!("<{}>: ", ctx.exact(&r.address));
        let reply = diagnostic_text(ctx, &r.reply);
        match (&r.remote_host, r.action.is_success()) {
            (Some(host), false) => {
                line.push_str(&format!("host {}", ctx.text(host)));
                if let Some(ip) = r.remote_ip {
                    line.push_str(&format!("[{ip}]"));
                }
                line.push_str(" said: ");
            }
            (Some(host), true) => {
                line.push_str(&format!("{} via {}", r.action.as_str(), ctx.text(host)));
                if let Some(ip) = r.remote_ip {
                    line.push_str(&format!("[{ip}]"));
                }
                line.push_str(": ");
            }
            (None, true) => line.push_str(&format!("{}: ", r.action.as_str())),
            (None, false) => {}
        }
        line.push_str(&reply);
        push_wrapped(&mut out, &line, "    ");
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Part 2: the machine-readable report (RFC 3464 §2.2, §2.3).
fn delivery_status(ctx: &Ctx<'_>, input: &DsnInput<'_>) -> Vec<u8> {
    let env = input.envelope;
    let mut out = Vec::new();
    // RFC 3464 §2.2 order: Original-Envelope-Id, Reporting-MTA,
    // [DSN-Gateway], Received-From-MTA, Arrival-Date, extensions.
    if let Some(envid) = &env.envid {
        push_field(&mut out, "Original-Envelope-Id", &ctx.exact(envid));
    }
    push_field(&mut out, "Reporting-MTA", &format!("dns; {}", ctx.hostname));
    if let Some(helo) = &env.helo {
        let mut v = format!("dns; {}", clean(helo, false, true));
        if let Some(ip) = &env.client_ip {
            v.push_str(&format!(" ([{}])", clean(ip, false, true)));
        }
        push_field(&mut out, "Received-From-MTA", &v);
    }
    push_field(
        &mut out,
        "Arrival-Date",
        &rfc5322(unix_ms(env.received_at_ms)),
    );
    push_field(&mut out, "X-Sluice-Queue-ID", &env.id.to_string());
    push_field(
        &mut out,
        "X-Sluice-Sender",
        &format!("{}; {}", address_type(&env.sender), ctx.exact(&env.sender)),
    );
    for r in input.recipients {
        out.extend_from_slice(b"\r\n");
        if let Some(orcpt) = &r.orcpt {
            let v = if orcpt.contains(';') {
                ctx.exact(orcpt).into_owned()
            } else {
                format!("rfc822;{}", ctx.exact(orcpt))
            };
            push_field(&mut out, "Original-Recipient", &v);
        }
        push_field(
            &mut out,
            "Final-Recipient",
            &format!("{}; {}", address_type(&r.address), ctx.exact(&r.address)),
        );
        push_field(&mut out, "Action", r.action.as_str());
        push_field(&mut out, "Status", &r.status_code().to_string());
        if let Some(host) = &r.remote_host {
            push_field(
                &mut out,
                "Remote-MTA",
                &format!("dns; {}", clean(host, false, true)),
            );
        }
        let kind = if r.remote_host.is_some() {
            "smtp"
        } else {
            "X-Sluice"
        };
        push_field(
            &mut out,
            "Diagnostic-Code",
            &format!("{kind}; {}", diagnostic_text(ctx, &r.reply)),
        );
        if let Some(t) = r.last_attempt {
            push_field(&mut out, "Last-Attempt-Date", &rfc5322(t));
        }
        if r.action == Action::Delayed {
            if let Some(t) = r.will_retry_until {
                push_field(&mut out, "Will-Retry-Until", &rfc5322(t));
            }
        }
    }
    out
}

/// `rfc822` for ASCII addresses, `utf-8` (RFC 6533 §3) otherwise.
fn address_type(addr: &str) -> &'static str {
    if addr.is_ascii() {
        "rfc822"
    } else {
        "utf-8"
    }
}

/// `550 5.1.1 text` from a reply, cleaned and capped.
fn diagnostic_text(ctx: &Ctx<'_>, reply: &Reply) -> String {
    let mut text = ctx.text(&reply.text()).into_owned();
    if text.len() > MAX_DIAGNOSTIC_LEN {
        let mut cut = MAX_DIAGNOSTIC_LEN;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    let mut out = reply.code().to_string();
    if let Some(e) = reply.enhanced() {
        out.push(' ');
        out.push_str(&e.to_string());
    }
    if !text.is_empty() {
        out.push(' ');
        out.push_str(&text);
    }
    out
}

/// Makes outside text safe for a header field or a text line: control
/// characters (CR and LF included) become spaces and non-ASCII becomes `?`
/// unless `utf8`. With `collapse` (free text such as reply text), runs of
/// spaces become one and the ends are trimmed; without it (addresses, ENVID,
/// which must be echoed exactly) spaces are kept.
fn clean(s: &str, utf8: bool, collapse: bool) -> Cow<'_, str> {
    let already = (!collapse || (!s.starts_with(' ') && !s.ends_with(' ') && !s.contains("  ")))
        && s.chars().all(|c| {
            if c.is_ascii() {
                !c.is_ascii_control()
            } else {
                utf8 && !c.is_control()
            }
        });
    if already {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let c = if c.is_control() {
            ' '
        } else if !c.is_ascii() && !utf8 {
            '?'
        } else {
            c
        };
        if collapse && c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    if collapse && out.ends_with(' ') {
        out.pop();
    }
    Cow::Owned(out)
}

/// Appends `Name: value` CRLF, folded at spaces before column 78 and never
/// past 998 octets. `value` must be clean (no CR or LF).
fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    let mut col = name.len() + 1;
    for (i, word) in value.split(' ').enumerate() {
        if word.is_empty() {
            // One of several spaces in a row (kept: addresses are echoed
            // exactly). Never folded here, so no line is only white space;
            // dropped only if a line would pass 998 octets of spaces.
            if i > 0 && col < MAX_LINE {
                out.push(b' ');
                col += 1;
            }
            continue;
        }
        // A fold is CRLF inserted before the space that separates words
        // (RFC 5322 §2.2.3); never before the first word.
        if i > 0 && col + 1 + word.len() > FOLD_WIDTH {
            out.extend_from_slice(b"\r\n");
            col = 0;
        }
        push_word(out, &mut col, word);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends ` word` at column `col`, splitting a word that would pass the
/// hard line limit into continuation lines.
fn push_word(out: &mut Vec<u8>, col: &mut usize, word: &str) {
    let mut rest = word;
    loop {
        let room = MAX_LINE - *col - 1;
        if rest.len() <= room {
            out.push(b' ');
            out.extend_from_slice(rest.as_bytes());
            *col += 1 + rest.len();
            return;
        }
        let mut take = room.min(SPLIT_CHUNK);
        while !rest.is_char_boundary(take) {
            take -= 1;
        }
        out.push(b' ');
        out.extend_from_slice(&rest.as_bytes()[..take]);
        out.extend_from_slice(b"\r\n");
        *col = 0;
        rest = &rest[take..];
    }
}

/// Appends a paragraph wrapped at 78 columns; lines after the first start
/// with `indent`. The text must be clean.
fn push_wrapped(out: &mut Vec<u8>, text: &str, indent: &str) {
    // Leading spaces are layout (the signature line), kept as they are.
    let words = text.trim_start_matches(' ');
    let lead = text.len() - words.len();
    out.extend_from_slice(&text.as_bytes()[..lead]);
    let mut col = lead;
    let mut first_on_line = true;
    for word in words.split(' ').filter(|w| !w.is_empty()) {
        if !first_on_line && col + 1 + word.len() > FOLD_WIDTH {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(indent.as_bytes());
            col = indent.len();
            first_on_line = true;
        }
        let mut rest = word;
        loop {
            let sep = usize::from(!first_on_line);
            let room = MAX_LINE - col - sep;
            if rest.len() <= room {
                if sep == 1 {
                    out.push(b' ');
                }
                out.extend_from_slice(rest.as_bytes());
                col += sep + rest.len();
                first_on_line = false;
                break;
            }
            let mut take = room.min(SPLIT_CHUNK);
            while !rest.is_char_boundary(take) {
                take -= 1;
            }
            if sep == 1 {
                out.push(b' ');
            }
            out.extend_from_slice(&rest.as_bytes()[..take]);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(indent.as_bytes());
            col = indent.len();
            first_on_line = true;
            rest = &rest[take..];
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The header section of a message: everything before the first empty line
/// (CRLF or, leniently, bare LF line endings), including the last header
/// line's line ending. A message without an empty line is all header.
fn header_section(msg: &[u8]) -> &[u8] {
    let mut start = 0;
    while start < msg.len() {
        let end = memchr::memchr(b'\n', &msg[start..]).map(|i| start + i);
        let line_end = end.unwrap_or(msg.len());
        let line = &msg[start..line_end];
        if line.is_empty() || line == b"\r" {
            return &msg[..start];
        }
        match end {
            Some(e) => start = e + 1,
            None => return msg,
        }
    }
    msg
}

/// Cuts a header section to at most `limit` octets at the start of a field
/// (a line not starting with white space), so no field is cut in half.
fn truncate_headers(headers: &[u8], limit: usize) -> &[u8] {
    if headers.len() <= limit {
        return headers;
    }
    let mut cut = 0;
    let mut pos = 0;
    while let Some(i) = memchr::memchr(b'\n', &headers[pos..]) {
        let next = pos + i + 1;
        if next > limit {
            break;
        }
        if !matches!(headers.get(next), Some(b' ' | b'\t')) {
            cut = next;
        }
        pos = next;
    }
    &headers[..cut]
}

/// Appends `src` with every line ending (CRLF, bare CR, bare LF) written as
/// CRLF and lines longer than 998 octets split; non-empty output always
/// ends with CRLF.
fn push_normalized(out: &mut Vec<u8>, src: &[u8]) {
    out.reserve(src.len() + 2);
    let mut col = 0;
    let push_run = |out: &mut Vec<u8>, mut run: &[u8], col: &mut usize| {
        while *col + run.len() > MAX_LINE {
            let take = MAX_LINE - *col;
            out.extend_from_slice(&run[..take]);
            out.extend_from_slice(b"\r\n");
            *col = 0;
            run = &run[take..];
        }
        out.extend_from_slice(run);
        *col += run.len();
    };
    let mut i = 0;
    while i < src.len() {
        match memchr::memchr2(b'\r', b'\n', &src[i..]) {
            Some(off) => {
                push_run(out, &src[i..i + off], &mut col);
                let at = i + off;
                i = if src[at] == b'\r' && src.get(at + 1) == Some(&b'\n') {
                    at + 2
                } else {
                    at + 1
                };
                out.extend_from_slice(b"\r\n");
                col = 0;
            }
            None => {
                push_run(out, &src[i..], &mut col);
                i = src.len();
            }
        }
    }
    if col > 0 {
        out.extend_from_slice(b"\r\n");
    }
}

/// A boundary that occurs in none of the parts: `=_sluice-<dsn id>`, with a
/// counter appended until it is absent. `=_` cannot start a line of
/// quoted-printable text, and the id is unique per host, so the first
/// candidate nearly always fits; the check makes it certain.
fn choose_boundary(dsn_id: SpoolId, parts: &[&[u8]]) -> String {
    let base = format!("=_sluice-{dsn_id}");
    let mut n = 0u32;
    loop {
        let candidate = if n == 0 {
            base.clone()
        } else {
            format!("{base}.{n}")
        };
        let finder = memchr::memmem::Finder::new(candidate.as_bytes());
        if parts.iter().all(|p| finder.find(p).is_none()) {
            return candidate;
        }
        n += 1;
    }
}

fn unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests;
