//! SMTP command line parser (RFC 5321 §4.1) with the ESMTP parameters this
//! relay supports: SIZE (RFC 1870), BODY=8BITMIME (RFC 6152) / BINARYMIME and
//! BDAT (RFC 3030), SMTPUTF8 (RFC 6531), STARTTLS (RFC 3207), AUTH (RFC 4954)
//! and DSN (RFC 3461: RET, ENVID, NOTIFY, ORCPT).
//!
//! The parser is on the per-command hot path: no regex, no intermediate
//! allocations, verbs and keywords compared ASCII-case-insensitively on bytes.
//! Only the owned strings of the result are allocated.
//!
//! Choices where the RFCs leave room (all covered by tests):
//! - Invalid UTF-8 anywhere in the line is `501 5.5.2` (checked once, up front,
//!   before the verb is looked at), including inside addresses.
//! - Runs of spaces between verb, path and parameters, spaces after `FROM:` /
//!   `TO:` (as Postfix tolerates) and trailing spaces/tabs are accepted.
//! - Non-ASCII in a MAIL address without the SMTPUTF8 parameter is
//!   `553 5.6.7`; RCPT cannot know the transaction, so the session checks
//!   [`Address::needs_smtputf8`] and answers with [`utf8_error_reply`].
//! - The MAIL `AUTH=` value is validated as xtext and kept as written (it is
//!   relayed, not interpreted). ENVID and ORCPT are xtext-decoded; decoded
//!   control characters are rejected because those values end up in DSN
//!   header fields.

use std::fmt;

use super::address::{
    parse_mailbox, skip_source_route, Address, AddressError, ForwardPath, ReversePath,
};
use super::reply::Reply;
use crate::reply;

/// RFC 3461 §4.4: ENVID is at most 100 characters.
const MAX_ENVID_LEN: usize = 100;
/// RFC 4954 §3: a SASL mechanism name is 1 to 20 characters.
const MAX_SASL_MECH_LEN: usize = 20;

/// One parsed SMTP command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `EHLO <domain or address literal>`, the argument as given (validated
    /// loosely: non-empty, no spaces or control characters; UTF-8 allowed).
    Ehlo(String),
    /// `HELO <domain>`, validated like EHLO.
    Helo(String),
    /// `MAIL FROM:<reverse-path> [params]`.
    Mail(MailFrom),
    /// `RCPT TO:<forward-path> [params]`.
    Rcpt(RcptTo),
    /// `DATA`.
    Data,
    /// `BDAT <size> [LAST]` (RFC 3030).
    Bdat {
        /// Chunk size in octets.
        size: u64,
        /// True for the final chunk.
        last: bool,
    },
    /// `RSET`.
    Rset,
    /// `NOOP [string]` (the argument is ignored).
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY <string>`.
    Vrfy(String),
    /// `EXPN <string>`.
    Expn(String),
    /// `HELP [string]`.
    Help(Option<String>),
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH <mechanism> [initial-response]` (RFC 4954).
    Auth {
        /// SASL mechanism name, upper-cased.
        mechanism: String,
        /// Base64 initial response as sent (`=` for an empty one).
        initial_response: Option<String>,
    },
}

/// RFC 6152 / RFC 3030 BODY parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyType {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
    /// `BODY=BINARYMIME` (requires BDAT).
    BinaryMime,
}

impl BodyType {
    /// The parameter value as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
            BodyType::BinaryMime => "BINARYMIME",
        }
    }
}

/// RFC 3461 RET parameter: how much of the message a DSN returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    /// `RET=FULL`.
    Full,
    /// `RET=HDRS`.
    Headers,
}

/// RFC 3461 NOTIFY parameter. `never` excludes the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Notify {
    /// `NEVER`.
    pub never: bool,
    /// `SUCCESS`.
    pub success: bool,
    /// `FAILURE`.
    pub failure: bool,
    /// `DELAY`.
    pub delay: bool,
}

/// RFC 3461 ORCPT parameter: the original recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orcpt {
    /// Address type as given (usually `rfc822`).
    pub addr_type: String,
    /// The original address, xtext-decoded.
    pub address: String,
}

/// MAIL FROM with its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailFrom {
    /// The reverse path (null for bounces).
    pub from: ReversePath,
    /// `SIZE=` declared message size (RFC 1870).
    pub size: Option<u64>,
    /// `BODY=` (RFC 6152, RFC 3030).
    pub body: Option<BodyType>,
    /// `SMTPUTF8` given (RFC 6531).
    pub smtputf8: bool,
    /// `RET=` (RFC 3461).
    pub ret: Option<Ret>,
    /// `ENVID=`, xtext-decoded (RFC 3461).
    pub envid: Option<String>,
    /// `AUTH=` (RFC 4954), kept as written (xtext), not trusted.
    pub auth: Option<String>,
}

/// RCPT TO with its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptTo {
    /// The forward path.
    pub to: ForwardPath,
    /// `NOTIFY=` (RFC 3461).
    pub notify: Option<Notify>,
    /// `ORCPT=` (RFC 3461).
    pub orcpt: Option<Orcpt>,
}

/// Why a command line was rejected; [`CommandError::reply`] gives the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Empty line (or only spaces): `500 5.5.2`.
    #[error("empty command")]
    Empty,
    /// Verb not recognised: `500 5.5.1`.
    #[error("unknown command")]
    UnknownCommand,
    /// The line is not valid UTF-8: `501 5.5.2`.
    #[error("invalid UTF-8 in command")]
    InvalidUtf8,
    /// Malformed command structure; carries the expected syntax: `501 5.5.2`.
    #[error("syntax error, expected {0}")]
    Syntax(&'static str),
    /// Missing, extra or invalid argument; carries the expected syntax: `501 5.5.4`.
    #[error("invalid argument, expected {0}")]
    InvalidArgument(&'static str),
    /// AUTH initial response is not base64: `501 5.5.2` (RFC 4954 §4).
    #[error("invalid base64 initial response")]
    InvalidInitialResponse,
    /// MAIL FROM address invalid: `501 5.1.7`.
    #[error("bad sender address: {0}")]
    BadSender(AddressError),
    /// RCPT TO address invalid (including `<>`): `501 5.1.3`.
    #[error("bad recipient address: {0}")]
    BadRecipient(AddressError),
    /// `RCPT TO:<>`: `501 5.1.3`.
    #[error("null recipient")]
    NullRecipient,
    /// Malformed `keyword[=value]` parameter: `501 5.5.4`.
    #[error("malformed parameter")]
    MalformedParameter,
    /// Parameter not supported for this command: `555 5.5.4`.
    #[error("unsupported parameter {0}")]
    UnknownParameter(String),
    /// Parameter given twice: `555 5.5.4`.
    #[error("duplicate parameter {0}")]
    DuplicateParameter(&'static str),
    /// Known parameter with an invalid value: `501 5.5.4`.
    #[error("invalid value for {0}")]
    InvalidParameterValue(&'static str),
    /// Non-ASCII MAIL address without SMTPUTF8: `553 5.6.7`.
    #[error("SMTPUTF8 required")]
    Smtputf8Required,
}

/// Longest keyword echoed back in a 555 reply (the rest is cut off).
const MAX_ECHOED_KEYWORD: usize = 32;

impl CommandError {
    /// The reply to send for this error.
    pub fn reply(&self) -> Reply {
        match self {
            CommandError::Empty => reply!(500, 5, 5, 2, "Error: bad syntax"),
            CommandError::UnknownCommand => reply!(500, 5, 5, 1, "Error: command not recognized"),
            CommandError::InvalidUtf8 => reply!(501, 5, 5, 2, "Error: invalid UTF-8 in command"),
            CommandError::Syntax(s) => reply!(501, 5, 5, 2, format!("Syntax: {s}")),
            CommandError::InvalidArgument(s) => reply!(501, 5, 5, 4, format!("Syntax: {s}")),
            CommandError::InvalidInitialResponse => {
                reply!(501, 5, 5, 2, "Cannot Base64-decode initial response")
            }
            CommandError::BadSender(e) => {
                reply!(501, 5, 1, 7, format!("Bad sender address syntax: {e}"))
            }
            CommandError::BadRecipient(e) => {
                reply!(501, 5, 1, 3, format!("Bad recipient address syntax: {e}"))
            }
            CommandError::NullRecipient => {
                reply!(501, 5, 1, 3, "Bad recipient address syntax: null recipient")
            }
            CommandError::MalformedParameter => reply!(501, 5, 5, 4, "Malformed parameter"),
            CommandError::UnknownParameter(k) => {
                let mut k = k.as_str();
                if k.len() > MAX_ECHOED_KEYWORD {
                    k = &k[..MAX_ECHOED_KEYWORD]; // keywords are ASCII: a char boundary
                }
                reply!(555, 5, 5, 4, format!("Unsupported parameter {k}"))
            }
            CommandError::DuplicateParameter(k) => {
                reply!(555, 5, 5, 4, format!("Duplicate parameter {k}"))
            }
            CommandError::InvalidParameterValue(k) => {
                reply!(501, 5, 5, 4, format!("Invalid {k} parameter value"))
            }
            CommandError::Smtputf8Required => utf8_error_reply(),
        }
    }
}

/// The `553 5.6.7` reply for a non-ASCII address in a transaction without
/// SMTPUTF8 (RFC 6531 §3.5). The session uses it for RCPT so both commands
/// answer with the same text.
pub fn utf8_error_reply() -> Reply {
    reply!(553, 5, 6, 7, "SMTPUTF8 required for non-ASCII address")
}

const SYN_EHLO: &str = "EHLO hostname";
const SYN_HELO: &str = "HELO hostname";
const SYN_MAIL: &str = "MAIL FROM:<address> [parameters]";
const SYN_RCPT: &str = "RCPT TO:<address> [parameters]";
const SYN_BDAT: &str = "BDAT size [LAST]";
const SYN_VRFY: &str = "VRFY address";
const SYN_EXPN: &str = "EXPN list";
const SYN_AUTH: &str = "AUTH mechanism [initial-response]";

/// Packs up to 8 verb bytes into a u64 with ASCII letters upper-cased. Masking
/// bit 5 is exact for letters (only `A`/`a` map to `A`, etc.), and every verb
/// is letters only, so a key match plus a length match is an exact
/// case-insensitive match.
#[inline]
const fn verb_key(v: &[u8]) -> u64 {
    let mut k = 0u64;
    let mut i = 0;
    while i < v.len() {
        k |= ((v[i] & 0xDF) as u64) << (8 * i);
        i += 1;
    }
    k
}

const K_EHLO: u64 = verb_key(b"EHLO");
const K_HELO: u64 = verb_key(b"HELO");
const K_MAIL: u64 = verb_key(b"MAIL");
const K_RCPT: u64 = verb_key(b"RCPT");
const K_DATA: u64 = verb_key(b"DATA");
const K_BDAT: u64 = verb_key(b"BDAT");
const K_RSET: u64 = verb_key(b"RSET");
const K_NOOP: u64 = verb_key(b"NOOP");
const K_QUIT: u64 = verb_key(b"QUIT");
const K_VRFY: u64 = verb_key(b"VRFY");
const K_EXPN: u64 = verb_key(b"EXPN");
const K_HELP: u64 = verb_key(b"HELP");
const K_AUTH: u64 = verb_key(b"AUTH");
const K_STARTTLS: u64 = verb_key(b"STARTTLS");

/// Parses one command line WITHOUT its CRLF (the session strips it).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let s = std::str::from_utf8(line).map_err(|_| CommandError::InvalidUtf8)?;
    let b = s.as_bytes();

    // The verb ends at the first space; no verb is longer than 8 bytes, so a
    // longer first word is unknown without scanning the rest of the line.
    let mut verb_end = 0;
    while verb_end < b.len() && b[verb_end] != b' ' {
        if verb_end == 8 {
            return Err(CommandError::UnknownCommand);
        }
        verb_end += 1;
    }
    let verb = &b[..verb_end];
    // Everything after the verb, without surrounding spaces (and trailing tabs).
    let args = s[verb_end..]
        .trim_start_matches(' ')
        .trim_end_matches([' ', '\t']);
    if verb.is_empty() {
        return Err(if args.is_empty() {
            CommandError::Empty
        } else {
            CommandError::UnknownCommand
        });
    }

    let key = verb_key(verb);
    let cmd = match (verb.len(), key) {
        (4, K_MAIL) => return parse_mail(args).map(Command::Mail),
        (4, K_RCPT) => return parse_rcpt(args).map(Command::Rcpt),
        (4, K_EHLO) => Command::Ehlo(hello_arg(args, SYN_EHLO)?),
        (4, K_HELO) => Command::Helo(hello_arg(args, SYN_HELO)?),
        (4, K_DATA) => no_arg(args, "DATA", Command::Data)?,
        (4, K_BDAT) => parse_bdat(args)?,
        (4, K_RSET) => no_arg(args, "RSET", Command::Rset)?,
        (4, K_NOOP) => Command::Noop,
        (4, K_QUIT) => no_arg(args, "QUIT", Command::Quit)?,
        (4, K_VRFY) => Command::Vrfy(required_arg(args, SYN_VRFY)?),
        (4, K_EXPN) => Command::Expn(required_arg(args, SYN_EXPN)?),
        (4, K_HELP) => Command::Help((!args.is_empty()).then(|| args.to_owned())),
        (4, K_AUTH) => parse_auth(args)?,
        (8, K_STARTTLS) => no_arg(args, "STARTTLS", Command::StartTls)?,
        _ => return Err(CommandError::UnknownCommand),
    };
    Ok(cmd)
}

fn no_arg(args: &str, syntax: &'static str, cmd: Command) -> Result<Command, CommandError> {
    if args.is_empty() {
        Ok(cmd)
    } else {
        Err(CommandError::InvalidArgument(syntax))
    }
}

fn required_arg(args: &str, syntax: &'static str) -> Result<String, CommandError> {
    if args.is_empty() {
        Err(CommandError::InvalidArgument(syntax))
    } else {
        Ok(args.to_owned())
    }
}

/// EHLO/HELO argument: one word. Control characters are refused because the
/// name is copied into the Received header field.
fn hello_arg(args: &str, syntax: &'static str) -> Result<String, CommandError> {
    if args.is_empty() || args.bytes().any(|c| c <= b' ' || c == 0x7f) {
        return Err(CommandError::InvalidArgument(syntax));
    }
    Ok(args.to_owned())
}

fn parse_bdat(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .and_then(parse_u64)
        .ok_or(CommandError::InvalidArgument(SYN_BDAT))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(CommandError::InvalidArgument(SYN_BDAT)),
    };
    if words.next().is_some() {
        return Err(CommandError::InvalidArgument(SYN_BDAT));
    }
    Ok(Command::Bdat { size, last })
}

fn parse_auth(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let mech = words
        .next()
        .ok_or(CommandError::InvalidArgument(SYN_AUTH))?;
    // sasl-mech = 1*20(UPPER-ALPHA / DIGIT / "-" / "_"); lower case tolerated.
    if mech.len() > MAX_SASL_MECH_LEN
        || !mech
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        return Err(CommandError::InvalidArgument(SYN_AUTH));
    }
    let initial_response = match words.next() {
        None => None,
        Some(r) if is_base64_or_empty(r) => Some(r.to_owned()),
        Some(_) => return Err(CommandError::InvalidInitialResponse),
    };
    if words.next().is_some() {
        return Err(CommandError::InvalidArgument(SYN_AUTH));
    }
    Ok(Command::Auth {
        mechanism: mech.to_ascii_uppercase(),
        initial_response,
    })
}

/// RFC 4954 initial-response: base64 (padding only at the end) or `=`.
fn is_base64_or_empty(r: &str) -> bool {
    if r == "=" {
        return true;
    }
    let b = r.as_bytes();
    let body = b.iter().rposition(|&c| c != b'=').map_or(0, |p| p + 1);
    let padding = b.len() - body;
    body > 0
        && padding <= 2
        && b.len() % 4 == 0
        && b[..body]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

/// Parses a decimal u64; rejects signs, empty strings and overflow.
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for c in s.bytes() {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(v)
}

/// Checks `prefix` (ASCII, upper case) case-insensitively and returns the rest.
#[inline]
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let n = prefix.len();
    if s.len() >= n && s.as_bytes()[..n].eq_ignore_ascii_case(prefix.as_bytes()) {
        Some(&s[n..])
    } else {
        None
    }
}

/// What a `<...>` path held.
enum Path {
    Null,
    Postmaster,
    Mailbox(Address),
}

/// Where a path failed: structure (5.5.2) or the address itself (5.1.x).
enum PathError {
    Syntax,
    Address(AddressError),
}

/// Parses `<path>` at the start of `s`; returns the path and the rest of the
/// line after `>`. `allow_postmaster` is for RCPT only.
fn parse_path(s: &str, allow_postmaster: bool) -> Result<(Path, &str), PathError> {
    let b = s.as_bytes();
    if b.first() != Some(&b'<') {
        return Err(PathError::Syntax);
    }
    let mut i = 1;
    match b.get(i) {
        None => return Err(PathError::Syntax),
        Some(b'>') => return Ok((Path::Null, &s[2..])),
        Some(b'@') => i = skip_source_route(b, i).map_err(PathError::Address)?,
        Some(_) => {}
    }
    if allow_postmaster
        && i == 1
        && b.len() >= 12
        && b[1..11].eq_ignore_ascii_case(b"postmaster")
        && b[11] == b'>'
    {
        return Ok((Path::Postmaster, &s[12..]));
    }
    let (addr, end) = match parse_mailbox(s, i) {
        Ok(v) => v,
        // `<user>` and `<a@b` ending the line are structural, not address errors.
        Err(AddressError::MissingAt) if !s[i..].contains('>') => return Err(PathError::Syntax),
        Err(e) => return Err(PathError::Address(e)),
    };
    match b.get(end) {
        Some(b'>') => Ok((Path::Mailbox(addr), &s[end + 1..])),
        None => Err(PathError::Syntax),
        Some(_) => Err(PathError::Address(AddressError::TrailingCharacters)),
    }
}

/// Splits the text after the path into `keyword[=value]` parameters. The path
/// must be followed by a space or the end of the line.
fn params<'a>(
    rest: &'a str,
    syntax: &'static str,
) -> Result<impl Iterator<Item = Result<(&'a str, Option<&'a str>), CommandError>>, CommandError> {
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(CommandError::Syntax(syntax));
    }
    Ok(rest.split(' ').filter(|p| !p.is_empty()).map(split_param))
}

/// esmtp-param = esmtp-keyword ["=" esmtp-value] (RFC 5321 §4.1.2).
fn split_param(p: &str) -> Result<(&str, Option<&str>), CommandError> {
    let (kw, value) = match p.find('=') {
        Some(eq) => (&p[..eq], Some(&p[eq + 1..])),
        None => (p, None),
    };
    let kb = kw.as_bytes();
    let kw_ok = !kb.is_empty()
        && kb[0].is_ascii_alphanumeric()
        && kb[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-');
    // esmtp-value = 1*(%d33-60 / %d62-126 / UTF8-non-ascii).
    let value_ok = value.is_none_or(|v| {
        !v.is_empty() && v.bytes().all(|c| matches!(c, 33..=60 | 62..=126 | 0x80..))
    });
    if kw_ok && value_ok {
        Ok((kw, value))
    } else {
        Err(CommandError::MalformedParameter)
    }
}

/// Sets an optional parameter once; a second occurrence is 555 5.5.4.
#[inline]
fn set_once<T>(slot: &mut Option<T>, v: T, name: &'static str) -> Result<(), CommandError> {
    if slot.is_some() {
        return Err(CommandError::DuplicateParameter(name));
    }
    *slot = Some(v);
    Ok(())
}

fn parse_mail(args: &str) -> Result<MailFrom, CommandError> {
    let rest = strip_prefix_ci(args, "FROM:")
        .ok_or(CommandError::Syntax(SYN_MAIL))?
        .trim_start_matches(' ');
    let (path, rest) = match parse_path(rest, false) {
        Ok(v) => v,
        Err(PathError::Syntax) => return Err(CommandError::Syntax(SYN_MAIL)),
        Err(PathError::Address(e)) => return Err(CommandError::BadSender(e)),
    };
    let from = match path {
        Path::Null => ReversePath::Null,
        Path::Mailbox(a) => ReversePath::Address(a),
        Path::Postmaster => unreachable!("postmaster only recognised for RCPT"),
    };
    let mut m = MailFrom {
        from,
        size: None,
        body: None,
        smtputf8: false,
        ret: None,
        envid: None,
        auth: None,
    };
    for p in params(rest, SYN_MAIL)? {
        let (kw, value) = p?;
        if kw.eq_ignore_ascii_case("SIZE") {
            let v = value
                .and_then(parse_u64)
                .ok_or(CommandError::InvalidParameterValue("SIZE"))?;
            set_once(&mut m.size, v, "SIZE")?;
        } else if kw.eq_ignore_ascii_case("BODY") {
            let v = match value {
                Some(v) if v.eq_ignore_ascii_case("8BITMIME") => BodyType::EightBitMime,
                Some(v) if v.eq_ignore_ascii_case("7BIT") => BodyType::SevenBit,
                Some(v) if v.eq_ignore_ascii_case("BINARYMIME") => BodyType::BinaryMime,
                _ => return Err(CommandError::InvalidParameterValue("BODY")),
            };
            set_once(&mut m.body, v, "BODY")?;
        } else if kw.eq_ignore_ascii_case("SMTPUTF8") {
            if value.is_some() {
                return Err(CommandError::InvalidParameterValue("SMTPUTF8"));
            }
            if m.smtputf8 {
                return Err(CommandError::DuplicateParameter("SMTPUTF8"));
            }
            m.smtputf8 = true;
        } else if kw.eq_ignore_ascii_case("RET") {
            let v = match value {
                Some(v) if v.eq_ignore_ascii_case("FULL") => Ret::Full,
                Some(v) if v.eq_ignore_ascii_case("HDRS") => Ret::Headers,
                _ => return Err(CommandError::InvalidParameterValue("RET")),
            };
            set_once(&mut m.ret, v, "RET")?;
        } else if kw.eq_ignore_ascii_case("ENVID") {
            let v = value
                .and_then(xtext_decode)
                .filter(|v| v.len() <= MAX_ENVID_LEN)
                .ok_or(CommandError::InvalidParameterValue("ENVID"))?;
            set_once(&mut m.envid, v, "ENVID")?;
        } else if kw.eq_ignore_ascii_case("AUTH") {
            let v = value
                .filter(|v| is_xtext(v))
                .ok_or(CommandError::InvalidParameterValue("AUTH"))?;
            set_once(&mut m.auth, v.to_owned(), "AUTH")?;
        } else {
            return Err(CommandError::UnknownParameter(kw.to_owned()));
        }
    }
    if !m.smtputf8 {
        if let ReversePath::Address(a) = &m.from {
            if a.needs_smtputf8() {
                return Err(CommandError::Smtputf8Required);
            }
        }
    }
    Ok(m)
}

fn parse_rcpt(args: &str) -> Result<RcptTo, CommandError> {
    let rest = strip_prefix_ci(args, "TO:")
        .ok_or(CommandError::Syntax(SYN_RCPT))?
        .trim_start_matches(' ');
    let (path, rest) = match parse_path(rest, true) {
        Ok(v) => v,
        Err(PathError::Syntax) => return Err(CommandError::Syntax(SYN_RCPT)),
        Err(PathError::Address(e)) => return Err(CommandError::BadRecipient(e)),
    };
    let to = match path {
        Path::Null => return Err(CommandError::NullRecipient),
        Path::Postmaster => ForwardPath::Postmaster,
        Path::Mailbox(a) => ForwardPath::Address(a),
    };
    let mut r = RcptTo {
        to,
        notify: None,
        orcpt: None,
    };
    for p in params(rest, SYN_RCPT)? {
        let (kw, value) = p?;
        if kw.eq_ignore_ascii_case("NOTIFY") {
            let v = value
                .and_then(parse_notify)
                .ok_or(CommandError::InvalidParameterValue("NOTIFY"))?;
            set_once(&mut r.notify, v, "NOTIFY")?;
        } else if kw.eq_ignore_ascii_case("ORCPT") {
            let v = value
                .and_then(parse_orcpt)
                .ok_or(CommandError::InvalidParameterValue("ORCPT"))?;
            set_once(&mut r.orcpt, v, "ORCPT")?;
        } else {
            return Err(CommandError::UnknownParameter(kw.to_owned()));
        }
    }
    Ok(r)
}

/// NOTIFY = "NEVER" / 1#( "SUCCESS" / "FAILURE" / "DELAY" ).
fn parse_notify(v: &str) -> Option<Notify> {
    let mut n = Notify::default();
    if v.eq_ignore_ascii_case("NEVER") {
        n.never = true;
        return Some(n);
    }
    for item in v.split(',') {
        if item.eq_ignore_ascii_case("SUCCESS") {
            n.success = true;
        } else if item.eq_ignore_ascii_case("FAILURE") {
            n.failure = true;
        } else if item.eq_ignore_ascii_case("DELAY") {
            n.delay = true;
        } else {
            // Includes NEVER combined with others and empty items.
            return None;
        }
    }
    Some(n)
}

/// ORCPT = addr-type ";" xtext, addr-type an atom (RFC 3461 §4.2).
fn parse_orcpt(v: &str) -> Option<Orcpt> {
    let semi = v.find(';')?;
    let (addr_type, encoded) = (&v[..semi], &v[semi + 1..]);
    let type_ok = !addr_type.is_empty()
        && addr_type
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-');
    if !type_ok || encoded.is_empty() {
        return None;
    }
    Some(Orcpt {
        addr_type: addr_type.to_owned(),
        address: xtext_decode(encoded)?,
    })
}

/// xchar = any ASCII CHAR between "!" (33) and "~" (126) except "+" and "=".
#[inline]
fn is_xchar(c: u8) -> bool {
    matches!(c, 33..=126) && c != b'+' && c != b'='
}

/// Upper-case hex digit value (RFC 3461 hexchar is `+` 2(0-9 / A-F)).
#[inline]
fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Validates xtext without decoding it.
fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            if b.len() < i + 3 || hex_val(b[i + 1]).is_none() || hex_val(b[i + 2]).is_none() {
                return false;
            }
            i += 3;
        } else if is_xchar(b[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// Decodes RFC 3461 §4 xtext. Rejects malformed `+HH`, lower-case hex,
/// decoded bytes that are not UTF-8, and decoded control characters (the
/// values are copied into DSN header fields, so CR/LF must never appear).
pub fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'+' {
            let hi = hex_val(*b.get(i + 1)?)?;
            let lo = hex_val(*b.get(i + 2)?)?;
            let v = (hi << 4) | lo;
            if v < 0x20 || v == 0x7f {
                return None;
            }
            out.push(v);
            i += 3;
        } else if is_xchar(c) {
            out.push(c);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes a value as RFC 3461 xtext (for relaying ENVID / ORCPT onwards).
pub fn xtext_encode(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &c in s.as_bytes() {
        if is_xchar(c) {
            out.push(c as char);
        } else {
            out.push('+');
            out.push(HEX[usize::from(c >> 4)] as char);
            out.push(HEX[usize::from(c & 0xf)] as char);
        }
    }
}

impl fmt::Display for MailFrom {
    /// The wire form `MAIL FROM:<...> [params]` without CRLF; source routes
    /// are gone (they were dropped on parsing).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MAIL FROM:{}", self.from)?;
        if let Some(size) = self.size {
            write!(f, " SIZE={size}")?;
        }
        if let Some(body) = self.body {
            write!(f, " BODY={}", body.as_str())?;
        }
        if self.smtputf8 {
            f.write_str(" SMTPUTF8")?;
        }
        if let Some(ret) = self.ret {
            f.write_str(match ret {
                Ret::Full => " RET=FULL",
                Ret::Headers => " RET=HDRS",
            })?;
        }
        if let Some(envid) = &self.envid {
            let mut e = String::with_capacity(envid.len());
            xtext_encode(envid, &mut e);
            write!(f, " ENVID={e}")?;
        }
        if let Some(auth) = &self.auth {
            write!(f, " AUTH={auth}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Notify {
    /// The NOTIFY value: `NEVER` or a comma list.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.never {
            return f.write_str("NEVER");
        }
        let mut sep = "";
        for (on, name) in [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ] {
            if on {
                write!(f, "{sep}{name}")?;
                sep = ",";
            }
        }
        Ok(())
    }
}

impl fmt::Display for RcptTo {
    /// The wire form `RCPT TO:<...> [params]` without CRLF.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RCPT TO:{}", self.to)?;
        if let Some(n) = self.notify {
            write!(f, " NOTIFY={n}")?;
        }
        if let Some(o) = &self.orcpt {
            let mut e = String::with_capacity(o.address.len());
            xtext_encode(&o.address, &mut e);
            write!(f, " ORCPT={};{e}", o.addr_type)?;
        }
        Ok(())
    }
}

impl fmt::Display for Command {
    /// The wire form without CRLF; parsing it gives back an equal command
    /// (NOOP's ignored argument excepted).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Ehlo(h) => write!(f, "EHLO {h}"),
            Command::Helo(h) => write!(f, "HELO {h}"),
            Command::Mail(m) => m.fmt(f),
            Command::Rcpt(r) => r.fmt(f),
            Command::Data => f.write_str("DATA"),
            Command::Bdat { size, last } => {
                write!(f, "BDAT {size}{}", if *last { " LAST" } else { "" })
            }
            Command::Rset => f.write_str("RSET"),
            Command::Noop => f.write_str("NOOP"),
            Command::Quit => f.write_str("QUIT"),
            Command::Vrfy(s) => write!(f, "VRFY {s}"),
            Command::Expn(s) => write!(f, "EXPN {s}"),
            Command::Help(None) => f.write_str("HELP"),
            Command::Help(Some(s)) => write!(f, "HELP {s}"),
            Command::StartTls => f.write_str("STARTTLS"),
            Command::Auth {
                mechanism,
                initial_response: None,
            } => write!(f, "AUTH {mechanism}"),
            Command::Auth {
                mechanism,
                initial_response: Some(r),
            } => write!(f, "AUTH {mechanism} {r}"),
        }
    }
}
