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
    // Trailing spaces and tabs (byte loops here and below: `trim_*_matches`
    // with a char pattern costs more than the rest of a short command).
    let mut end = s.len();
    while end > 0 && matches!(s.as_bytes()[end - 1], b' ' | b'\t') {
        end -= 1;
    }
    let s = &s[..end];
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
    // Everything after the verb, without the separating spaces.
    let args = skip_spaces(&s[verb_end..]);
    if verb.is_empty() {
        return Err(if args.is_empty() {
            CommandError::Empty
        } else {
            CommandError::UnknownCommand
        });
    }

    let key = packed_key(b, 0, verb.len());
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
        && b.len().is_multiple_of(4)
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

/// `s` without its leading spaces.
#[inline]
fn skip_spaces(s: &str) -> &str {
    let n = s.bytes().take_while(|&c| c == b' ').count();
    // Spaces are ASCII: a char boundary.
    &s[n..]
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
fn params<'a>(rest: &'a str, syntax: &'static str) -> Result<Params<'a>, CommandError> {
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(CommandError::Syntax(syntax));
    }
    Ok(Params { rest })
}

/// One `esmtp-param = esmtp-keyword ["=" esmtp-value]` (RFC 5321 §4.1.2).
struct Param<'a> {
    keyword: &'a str,
    /// The keyword packed as [`verb_key`] does (0 if longer than 8 bytes):
    /// the known keywords are matched with one comparison.
    key: u64,
    value: Option<&'a str>,
}

/// The space-separated words after the path, each split and validated in
/// one pass over its bytes (no `memchr` or `split` per word: the words are
/// short and those calls cost more than the whole parse).
struct Params<'a> {
    rest: &'a str,
}

/// Byte classes for parameters: keyword bytes, value bytes, delimiters.
const P_KEYWORD: u8 = 1; // ALPHA / DIGIT / "-"
const P_VALUE: u8 = 2; // %d33-60 / %d62-126 / UTF8-non-ascii
const P_STOP: u8 = 4; // " " or "=": ends a keyword

static PARAM_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let mut v = 0;
        if c.is_ascii_alphanumeric() || c == b'-' {
            v |= P_KEYWORD;
        }
        if matches!(c, 33..=60 | 62..=126 | 0x80..) {
            v |= P_VALUE;
        }
        if c == b' ' || c == b'=' {
            v |= P_STOP;
        }
        t[i] = v;
        i += 1;
    }
    t
};

impl<'a> Iterator for Params<'a> {
    type Item = Result<Param<'a>, CommandError>;

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.rest.as_bytes();
        let mut i = 0;
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i == b.len() {
            self.rest = "";
            return None;
        }
        // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
        let start = i;
        let mut ok = b[i].is_ascii_alphanumeric();
        let mut all = P_KEYWORD;
        while let Some(&c) = b.get(i) {
            let class = PARAM_CLASS[usize::from(c)];
            if class & P_STOP != 0 {
                break;
            }
            all &= class;
            i += 1;
        }
        ok &= all & P_KEYWORD != 0;
        let keyword = &b[start..i];
        // esmtp-value = 1*(%d33-60 / %d62-126 / UTF8-non-ascii): no second "=".
        let mut value = None;
        if b.get(i) == Some(&b'=') {
            i += 1;
            let value_start = i;
            let mut all = P_VALUE;
            while let Some(&c) = b.get(i) {
                if c == b' ' {
                    break;
                }
                all &= PARAM_CLASS[usize::from(c)];
                i += 1;
            }
            ok &= all & P_VALUE != 0 && i > value_start;
            // Cut at ASCII bytes (or the end): char boundaries.
            value = Some(&self.rest[value_start..i]);
        }
        let keyword_str = &self.rest[start..start + keyword.len()];
        self.rest = &self.rest[i..];
        if !ok {
            return Some(Err(CommandError::MalformedParameter));
        }
        Some(Ok(Param {
            keyword: keyword_str,
            key: packed_key(b, start, keyword.len()),
            value,
        }))
    }
}

/// A parameter value packed as [`verb_key`] does, 0 if longer than 8 bytes.
/// Together with the length, equal keys mean equal ignoring ASCII case for
/// the letters and digits the known values are made of (a byte differing
/// from one of those in bit 5 only is a control character, which
/// validation has already refused).
#[inline]
fn value_key(v: &str) -> u64 {
    packed_key(v.as_bytes(), 0, v.len())
}

/// [`verb_key`] of `buf[start..start + len]`, 0 if `len` is over 8. Loads
/// one word when the buffer has 8 bytes from `start` (a loop of shifts per
/// byte costs more than the rest of a parameter).
#[inline]
fn packed_key(buf: &[u8], start: usize, len: usize) -> u64 {
    if len > 8 {
        return 0;
    }
    let word = match buf.get(start..start + 8) {
        Some(w) => u64::from_le_bytes(w.try_into().expect("8 bytes")),
        None => verb_key(&buf[start..start + len]),
    };
    let mask = u64::MAX.checked_shr(64 - 8 * len as u32).unwrap_or(0);
    word & mask & 0xDFDF_DFDF_DFDF_DFDF
}

const P_SIZE: u64 = verb_key(b"SIZE");
const P_BODY: u64 = verb_key(b"BODY");
const P_SMTPUTF8: u64 = verb_key(b"SMTPUTF8");
const P_RET: u64 = verb_key(b"RET");
const P_ENVID: u64 = verb_key(b"ENVID");
const P_AUTH: u64 = verb_key(b"AUTH");
const P_NOTIFY: u64 = verb_key(b"NOTIFY");
const P_ORCPT: u64 = verb_key(b"ORCPT");
const V_8BITMIME: u64 = verb_key(b"8BITMIME");
const V_7BIT: u64 = verb_key(b"7BIT");
const V_FULL: u64 = verb_key(b"FULL");
const V_HDRS: u64 = verb_key(b"HDRS");
const V_NEVER: u64 = verb_key(b"NEVER");
const V_SUCCESS: u64 = verb_key(b"SUCCESS");
const V_FAILURE: u64 = verb_key(b"FAILURE");
const V_DELAY: u64 = verb_key(b"DELAY");

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
    let rest = skip_spaces(strip_prefix_ci(args, "FROM:").ok_or(CommandError::Syntax(SYN_MAIL))?);
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
        let p = p?;
        let value = p.value;
        match (p.keyword.len(), p.key) {
            (4, P_SIZE) => {
                let v = value
                    .and_then(parse_u64)
                    .ok_or(CommandError::InvalidParameterValue("SIZE"))?;
                set_once(&mut m.size, v, "SIZE")?;
            }
            (4, P_BODY) => {
                let v = match value.map(|v| (v, v.len(), value_key(v))) {
                    Some((_, 8, V_8BITMIME)) => BodyType::EightBitMime,
                    Some((_, 4, V_7BIT)) => BodyType::SevenBit,
                    Some((v, _, _)) if v.eq_ignore_ascii_case("BINARYMIME") => BodyType::BinaryMime,
                    _ => return Err(CommandError::InvalidParameterValue("BODY")),
                };
                set_once(&mut m.body, v, "BODY")?;
            }
            (8, P_SMTPUTF8) => {
                if value.is_some() {
                    return Err(CommandError::InvalidParameterValue("SMTPUTF8"));
                }
                if m.smtputf8 {
                    return Err(CommandError::DuplicateParameter("SMTPUTF8"));
                }
                m.smtputf8 = true;
            }
            (3, P_RET) => {
                let v = match value.map(|v| (v.len(), value_key(v))) {
                    Some((4, V_FULL)) => Ret::Full,
                    Some((4, V_HDRS)) => Ret::Headers,
                    _ => return Err(CommandError::InvalidParameterValue("RET")),
                };
                set_once(&mut m.ret, v, "RET")?;
            }
            (5, P_ENVID) => {
                let v = value
                    .and_then(xtext_decode)
                    .filter(|v| v.len() <= MAX_ENVID_LEN)
                    .ok_or(CommandError::InvalidParameterValue("ENVID"))?;
                set_once(&mut m.envid, v, "ENVID")?;
            }
            (4, P_AUTH) => {
                let v = value
                    .filter(|v| is_xtext(v))
                    .ok_or(CommandError::InvalidParameterValue("AUTH"))?;
                set_once(&mut m.auth, v.to_owned(), "AUTH")?;
            }
            _ => return Err(CommandError::UnknownParameter(p.keyword.to_owned())),
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
    let rest = skip_spaces(strip_prefix_ci(args, "TO:").ok_or(CommandError::Syntax(SYN_RCPT))?);
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
        let p = p?;
        match (p.keyword.len(), p.key) {
            (6, P_NOTIFY) => {
                let v = p
                    .value
                    .and_then(parse_notify)
                    .ok_or(CommandError::InvalidParameterValue("NOTIFY"))?;
                set_once(&mut r.notify, v, "NOTIFY")?;
            }
            (5, P_ORCPT) => {
                let v = p
                    .value
                    .and_then(parse_orcpt)
                    .ok_or(CommandError::InvalidParameterValue("ORCPT"))?;
                set_once(&mut r.orcpt, v, "ORCPT")?;
            }
            _ => return Err(CommandError::UnknownParameter(p.keyword.to_owned())),
        }
    }
    Ok(r)
}

/// NOTIFY = "NEVER" / 1#( "SUCCESS" / "FAILURE" / "DELAY" ).
fn parse_notify(v: &str) -> Option<Notify> {
    let mut n = Notify::default();
    if v.len() == 5 && value_key(v) == V_NEVER {
        n.never = true;
        return Some(n);
    }
    for item in v.as_bytes().split(|&c| c == b',') {
        match (item.len(), packed_key(item, 0, item.len())) {
            (7, V_SUCCESS) => n.success = true,
            (7, V_FAILURE) => n.failure = true,
            (5, V_DELAY) => n.delay = true,
            // Includes NEVER combined with others and empty items.
            _ => return None,
        }
    }
    Some(n)
}

/// ORCPT = addr-type ";" xtext, addr-type an atom (RFC 3461 §4.2).
fn parse_orcpt(v: &str) -> Option<Orcpt> {
    let semi = v.bytes().position(|c| c == b';')?;
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
    // Without "+HH" escapes the value is its own decoding (xchars are
    // ASCII): one copy, no second UTF-8 check.
    if b.iter().all(|&c| is_xchar(c)) {
        return Some(s.to_owned());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::address::{Address, ForwardPath, ReversePath};
    use crate::smtp::reply::EnhancedCode;

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    fn mail(from: Option<&str>) -> MailFrom {
        MailFrom {
            from: from.map_or(ReversePath::Null, |a| ReversePath::Address(addr(a))),
            size: None,
            body: None,
            smtputf8: false,
            ret: None,
            envid: None,
            auth: None,
        }
    }

    fn rcpt(to: Option<&str>) -> RcptTo {
        RcptTo {
            to: to.map_or(ForwardPath::Postmaster, |a| ForwardPath::Address(addr(a))),
            notify: None,
            orcpt: None,
        }
    }

    fn notify(never: bool, success: bool, failure: bool, delay: bool) -> Notify {
        Notify {
            never,
            success,
            failure,
            delay,
        }
    }

    /// Asserts each line parses to the expected command, and that rendering it
    /// parses back to the same command.
    fn check_ok(cases: Vec<(&[u8], Command)>) {
        for (line, want) in cases {
            let got = parse_command(line);
            assert_eq!(
                got.as_ref(),
                Ok(&want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
            let rendered = want.to_string();
            assert_eq!(
                parse_command(rendered.as_bytes()).as_ref(),
                Ok(&want),
                "re-render {rendered:?}"
            );
        }
    }

    /// (line, reply code, enhanced code).
    type ErrCase<'a> = (&'a [u8], u16, (u8, u16, u16));

    /// Asserts each line fails with the expected reply code and enhanced code.
    fn check_err(cases: &[ErrCase]) {
        for &(line, code, (c, s, d)) in cases {
            let err = match parse_command(line) {
                Ok(cmd) => panic!("{:?} parsed as {cmd:?}", String::from_utf8_lossy(line)),
                Err(e) => e,
            };
            let r = err.reply();
            assert_eq!(
                (r.code(), r.enhanced()),
                (code, Some(EnhancedCode::new(c, s, d))),
                "{:?} -> {err:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn simple_verbs() {
        check_ok(vec![
            (b"DATA", Command::Data),
            (b"data", Command::Data),
            (b"DaTa  ", Command::Data),
            (b"DATA\t", Command::Data),
            (b"RSET", Command::Rset),
            (b"rset", Command::Rset),
            (b"QUIT", Command::Quit),
            (b"Quit", Command::Quit),
            (b"STARTTLS", Command::StartTls),
            (b"starttls", Command::StartTls),
            (b"NOOP", Command::Noop),
            (b"noop anything at all", Command::Noop),
            (b"HELP", Command::Help(None)),
            (b"help mail", Command::Help(Some("mail".into()))),
            (b"VRFY postmaster", Command::Vrfy("postmaster".into())),
            (b"vrfy John Smith", Command::Vrfy("John Smith".into())),
            (b"EXPN staff", Command::Expn("staff".into())),
            (
                b"EHLO mx.example.com",
                Command::Ehlo("mx.example.com".into()),
            ),
            (b"ehlo  [192.0.2.1] ", Command::Ehlo("[192.0.2.1]".into())),
            (b"EHLO [IPv6:::1]", Command::Ehlo("[IPv6:::1]".into())),
            (
                b"EHLO m\xc3\xbcnchen.de",
                Command::Ehlo("münchen.de".into()),
            ),
            (b"HELO localhost", Command::Helo("localhost".into())),
            (b"helo x_y", Command::Helo("x_y".into())),
            (
                b"BDAT 0",
                Command::Bdat {
                    size: 0,
                    last: false,
                },
            ),
            (
                b"BDAT 1000 LAST",
                Command::Bdat {
                    size: 1000,
                    last: true,
                },
            ),
            (
                b"bdat 18446744073709551615 last",
                Command::Bdat {
                    size: u64::MAX,
                    last: true,
                },
            ),
            (
                b"AUTH PLAIN",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial_response: None,
                },
            ),
            (
                b"auth login",
                Command::Auth {
                    mechanism: "LOGIN".into(),
                    initial_response: None,
                },
            ),
            (
                b"AUTH PLAIN AHVzZXIAcGFzcw==",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial_response: Some("AHVzZXIAcGFzcw==".into()),
                },
            ),
            (
                b"AUTH EXTERNAL =",
                Command::Auth {
                    mechanism: "EXTERNAL".into(),
                    initial_response: Some("=".into()),
                },
            ),
            (
                b"AUTH SCRAM-SHA-256",
                Command::Auth {
                    mechanism: "SCRAM-SHA-256".into(),
                    initial_response: None,
                },
            ),
        ]);
    }

    #[test]
    fn simple_verb_errors() {
        check_err(&[
            (b"", 500, (5, 5, 2)),
            (b"   ", 500, (5, 5, 2)),
            (b"FOO", 500, (5, 5, 1)),
            (b"MAILX FROM:<a@b>", 500, (5, 5, 1)),
            (b"STARTTLSX", 500, (5, 5, 1)),
            (b"MAI", 500, (5, 5, 1)),
            (b" DATA", 500, (5, 5, 1)),
            (b"DATA\0", 500, (5, 5, 1)),
            (b"M\xc3\xa4IL", 500, (5, 5, 1)),
            (b"ETRN example.com", 500, (5, 5, 1)),
            (b"MAIL\tFROM:<a@b>", 500, (5, 5, 1)),
            (b"DATA x", 501, (5, 5, 4)),
            (b"RSET x", 501, (5, 5, 4)),
            (b"QUIT now", 501, (5, 5, 4)),
            (b"STARTTLS x", 501, (5, 5, 4)),
            (b"EHLO", 501, (5, 5, 4)),
            (b"EHLO   ", 501, (5, 5, 4)),
            (b"EHLO a b", 501, (5, 5, 4)),
            (b"EHLO a\tb", 501, (5, 5, 4)),
            (b"EHLO a\rb", 501, (5, 5, 4)),
            (b"HELO", 501, (5, 5, 4)),
            (b"VRFY", 501, (5, 5, 4)),
            (b"EXPN ", 501, (5, 5, 4)),
            (b"BDAT", 501, (5, 5, 4)),
            (b"BDAT x", 501, (5, 5, 4)),
            (b"BDAT -1", 501, (5, 5, 4)),
            (b"BDAT +1", 501, (5, 5, 4)),
            (b"BDAT 18446744073709551616", 501, (5, 5, 4)),
            (b"BDAT 10 FIRST", 501, (5, 5, 4)),
            (b"BDAT 10 LAST x", 501, (5, 5, 4)),
            (b"AUTH", 501, (5, 5, 4)),
            (b"AUTH PL@IN", 501, (5, 5, 4)),
            (b"AUTH ABCDEFGHIJKLMNOPQRSTU", 501, (5, 5, 4)),
            (b"AUTH PLAIN abc= x", 501, (5, 5, 4)),
            (b"AUTH PLAIN not*base64", 501, (5, 5, 2)),
            (b"AUTH PLAIN abc", 501, (5, 5, 2)),
            (b"AUTH PLAIN a=bc", 501, (5, 5, 2)),
            (b"AUTH PLAIN a===", 501, (5, 5, 2)),
            // Invalid UTF-8 is rejected before the verb is looked at.
            (b"EHLO \xff", 501, (5, 5, 2)),
            (b"\xc3", 501, (5, 5, 2)),
            (b"MAIL FROM:<\xc3\x28@x> SMTPUTF8", 501, (5, 5, 2)),
            (b"RCPT TO:<a@\xed\xa0\x80>", 501, (5, 5, 2)),
        ]);
    }

    #[test]
    fn mail_from_valid() {
        let with = |f: fn(&mut MailFrom)| {
            let mut m = mail(Some("a@b.c"));
            f(&mut m);
            Command::Mail(m)
        };
        check_ok(vec![
            (b"MAIL FROM:<a@b.c>", Command::Mail(mail(Some("a@b.c")))),
            (b"mail from:<a@b.c>", Command::Mail(mail(Some("a@b.c")))),
            (b"Mail From:<a@B.C>", Command::Mail(mail(Some("a@b.c")))),
            // Postfix-style tolerance: space after the colon, extra spaces.
            (b"MAIL FROM: <a@b.c>", Command::Mail(mail(Some("a@b.c")))),
            (
                b"MAIL  FROM:  <a@b.c>  ",
                Command::Mail(mail(Some("a@b.c"))),
            ),
            (b"MAIL FROM:<>", Command::Mail(mail(None))),
            (
                b"MAIL FROM:<> SIZE=10",
                Command::Mail(MailFrom {
                    size: Some(10),
                    ..mail(None)
                }),
            ),
            // Source routes are accepted and stripped.
            (
                b"MAIL FROM:<@relay.example:a@b.c>",
                Command::Mail(mail(Some("a@b.c"))),
            ),
            (
                b"MAIL FROM:<@r1.example,@r2.example:a@b.c>",
                Command::Mail(mail(Some("a@b.c"))),
            ),
            (
                b"MAIL FROM:<\"a b\"@[192.0.2.1]>",
                Command::Mail(mail(Some("\"a b\"@[192.0.2.1]"))),
            ),
            (
                b"MAIL FROM:<postmaster@b.c>",
                Command::Mail(mail(Some("postmaster@b.c"))),
            ),
            (
                b"MAIL FROM:<a@b.c> SIZE=12345",
                with(|m| m.size = Some(12345)),
            ),
            (b"MAIL FROM:<a@b.c> size=0", with(|m| m.size = Some(0))),
            (
                b"MAIL FROM:<a@b.c> BODY=8BITMIME",
                with(|m| m.body = Some(BodyType::EightBitMime)),
            ),
            (
                b"MAIL FROM:<a@b.c> body=8bitmime",
                with(|m| m.body = Some(BodyType::EightBitMime)),
            ),
            (
                b"MAIL FROM:<a@b.c> BODY=7BIT",
                with(|m| m.body = Some(BodyType::SevenBit)),
            ),
            (
                b"MAIL FROM:<a@b.c> BODY=BINARYMIME",
                with(|m| m.body = Some(BodyType::BinaryMime)),
            ),
            (b"MAIL FROM:<a@b.c> SMTPUTF8", with(|m| m.smtputf8 = true)),
            (
                b"MAIL FROM:<a@b.c> RET=FULL",
                with(|m| m.ret = Some(Ret::Full)),
            ),
            (
                b"MAIL FROM:<a@b.c> ret=hdrs",
                with(|m| m.ret = Some(Ret::Headers)),
            ),
            (
                b"MAIL FROM:<a@b.c> ENVID=QQ314159",
                with(|m| m.envid = Some("QQ314159".into())),
            ),
            (
                b"MAIL FROM:<a@b.c> ENVID=a+2Bb+3Dc+20d",
                with(|m| m.envid = Some("a+b=c d".into())),
            ),
            (
                b"MAIL FROM:<a@b.c> AUTH=<>",
                with(|m| m.auth = Some("<>".into())),
            ),
            (
                b"MAIL FROM:<a@b.c> AUTH=e+2Bf@x.y",
                with(|m| m.auth = Some("e+2Bf@x.y".into())),
            ),
            (
                b"MAIL FROM:<a@b.c> SIZE=1 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x AUTH=<>",
                with(|m| {
                    m.size = Some(1);
                    m.body = Some(BodyType::EightBitMime);
                    m.smtputf8 = true;
                    m.ret = Some(Ret::Headers);
                    m.envid = Some("x".into());
                    m.auth = Some("<>".into());
                }),
            ),
            // UTF-8 addresses with SMTPUTF8.
            (
                "MAIL FROM:<用户@例え.jp> SMTPUTF8".as_bytes(),
                Command::Mail(MailFrom {
                    smtputf8: true,
                    ..mail(Some("用户@例え.jp"))
                }),
            ),
            // Relay tricks stay literal local parts.
            (
                b"MAIL FROM:<u%evil@ok>",
                Command::Mail(mail(Some("u%evil@ok"))),
            ),
        ]);
    }

    #[test]
    fn mail_from_errors() {
        let long_local = format!("MAIL FROM:<{}@x>", "a".repeat(65));
        let long_label = format!("MAIL FROM:<a@{}.x>", "a".repeat(64));
        let long_envid = format!("MAIL FROM:<a@b> ENVID={}", "e".repeat(101));
        check_err(&[
            (b"MAIL", 501, (5, 5, 2)),
            (b"MAIL TO:<a@b>", 501, (5, 5, 2)),
            (b"MAIL FROM", 501, (5, 5, 2)),
            (b"MAIL FROM:", 501, (5, 5, 2)),
            (b"MAIL FROM:a@b", 501, (5, 5, 2)),
            (b"MAIL FROM:<a@b", 501, (5, 5, 2)),
            (b"MAIL FROM:<", 501, (5, 5, 2)),
            (b"MAIL FROM:<a", 501, (5, 5, 2)),
            (b"MAIL FROM:<a@b>SIZE=1", 501, (5, 5, 2)),
            (b"MAIL FROM :<a@b>", 501, (5, 5, 2)),
            (b"MAIL FROM:<a>", 501, (5, 1, 7)),
            (b"MAIL FROM:<@b>", 501, (5, 1, 7)),
            (b"MAIL FROM:<a@>", 501, (5, 1, 7)),
            (b"MAIL FROM:<a b@c>", 501, (5, 1, 7)),
            (b"MAIL FROM:<a@b c>", 501, (5, 1, 7)),
            (b"MAIL FROM:<a..b@c>", 501, (5, 1, 7)),
            (b"MAIL FROM:<a@b..c>", 501, (5, 1, 7)),
            (b"MAIL FROM:<a@b.c.>", 501, (5, 1, 7)),
            (b"MAIL FROM:<a@-b.c>", 501, (5, 1, 7)),
            (b"MAIL FROM:<a@[1.2.3.999]>", 501, (5, 1, 7)),
            (b"MAIL FROM:<a@[IPv6:zz]>", 501, (5, 1, 7)),
            (b"MAIL FROM:<\"a@b>", 501, (5, 1, 7)),
            (b"MAIL FROM:<@r:>", 501, (5, 1, 7)),
            (b"MAIL FROM:<@r,a@b>", 501, (5, 1, 7)),
            (b"MAIL FROM:<Postmaster>", 501, (5, 1, 7)),
            (long_local.as_bytes(), 501, (5, 1, 7)),
            (long_label.as_bytes(), 501, (5, 1, 7)),
            // Parameters.
            (b"MAIL FROM:<a@b> FOO=bar", 555, (5, 5, 4)),
            (b"MAIL FROM:<a@b> NOTIFY=NEVER", 555, (5, 5, 4)),
            (b"MAIL FROM:<a@b> SIZE=1 SIZE=2", 555, (5, 5, 4)),
            (b"MAIL FROM:<a@b> BODY=7BIT BODY=8BITMIME", 555, (5, 5, 4)),
            (b"MAIL FROM:<a@b> SMTPUTF8 SMTPUTF8", 555, (5, 5, 4)),
            (b"MAIL FROM:<a@b> RET=FULL RET=HDRS", 555, (5, 5, 4)),
            (b"MAIL FROM:<a@b> ENVID=x ENVID=y", 555, (5, 5, 4)),
            (b"MAIL FROM:<a@b> AUTH=<> AUTH=<>", 555, (5, 5, 4)),
            (b"MAIL FROM:<a@b> SIZE", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> SIZE=", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> SIZE=abc", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> SIZE=-1", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> SIZE=99999999999999999999", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> BODY=foo", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> BODY", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> SMTPUTF8=yes", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> RET=ALL", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> ENVID=a+2", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> ENVID=a+2b", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> ENVID=a+0D+0Ab", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> ENVID=+FF", 501, (5, 5, 4)),
            (long_envid.as_bytes(), 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> AUTH=a+zz", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> =x", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> -X=1", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> X_Y=1", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> X=a=b", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> SIZE=1\tBODY=7BIT", 501, (5, 5, 4)),
            (b"MAIL FROM:<a@b> ENVID=\xc3\xbc", 501, (5, 5, 4)),
            // UTF-8 address without SMTPUTF8.
            ("MAIL FROM:<用户@x>".as_bytes(), 553, (5, 6, 7)),
            ("MAIL FROM:<u@bücher.de>".as_bytes(), 553, (5, 6, 7)),
            ("MAIL FROM:<\"ü\"@x> SIZE=1".as_bytes(), 553, (5, 6, 7)),
        ]);
    }

    #[test]
    fn rcpt_to_valid() {
        let with = |f: fn(&mut RcptTo)| {
            let mut r = rcpt(Some("a@b.c"));
            f(&mut r);
            Command::Rcpt(r)
        };
        check_ok(vec![
            (b"RCPT TO:<a@b.c>", Command::Rcpt(rcpt(Some("a@b.c")))),
            (b"rcpt to:<a@b.c>", Command::Rcpt(rcpt(Some("a@b.c")))),
            (b"RCPT TO: <a@b.c> ", Command::Rcpt(rcpt(Some("a@b.c")))),
            (b"RCPT TO:<Postmaster>", Command::Rcpt(rcpt(None))),
            (b"RCPT TO:<postmaster>", Command::Rcpt(rcpt(None))),
            (
                b"RCPT TO:<POSTMASTER> NOTIFY=NEVER",
                Command::Rcpt(RcptTo {
                    notify: Some(notify(true, false, false, false)),
                    ..rcpt(None)
                }),
            ),
            (
                b"RCPT TO:<postmaster@b.c>",
                Command::Rcpt(rcpt(Some("postmaster@b.c"))),
            ),
            (
                b"RCPT TO:<@hop1,@hop2:a@b.c>",
                Command::Rcpt(rcpt(Some("a@b.c"))),
            ),
            // Relay tricks: the local part stays literal, the host is the last one.
            (
                b"RCPT TO:<u%evil@ok>",
                Command::Rcpt(rcpt(Some("u%evil@ok"))),
            ),
            (
                b"RCPT TO:<\"u@evil\"@ok>",
                Command::Rcpt(rcpt(Some("\"u@evil\"@ok"))),
            ),
            (
                b"RCPT TO:<evil!u@ok>",
                Command::Rcpt(rcpt(Some("evil!u@ok"))),
            ),
            (
                b"RCPT TO:<u@[IPv6:2001:db8::1]>",
                Command::Rcpt(rcpt(Some("u@[IPv6:2001:db8::1]"))),
            ),
            (
                b"RCPT TO:<u@[x-tag:abc]>",
                Command::Rcpt(rcpt(Some("u@[x-tag:abc]"))),
            ),
            // The parser accepts UTF-8 in RCPT; the session checks needs_smtputf8().
            (
                "RCPT TO:<用户@例え.jp>".as_bytes(),
                Command::Rcpt(rcpt(Some("用户@例え.jp"))),
            ),
            (
                b"RCPT TO:<a@b.c> NOTIFY=NEVER",
                with(|r| r.notify = Some(notify(true, false, false, false))),
            ),
            (
                b"RCPT TO:<a@b.c> notify=success",
                with(|r| r.notify = Some(notify(false, true, false, false))),
            ),
            (
                b"RCPT TO:<a@b.c> NOTIFY=SUCCESS,FAILURE,DELAY",
                with(|r| r.notify = Some(notify(false, true, true, true))),
            ),
            (
                b"RCPT TO:<a@b.c> NOTIFY=DELAY,FAILURE",
                with(|r| r.notify = Some(notify(false, false, true, true))),
            ),
            (
                b"RCPT TO:<a@b.c> ORCPT=rfc822;a+2Bx@b.c",
                with(|r| {
                    r.orcpt = Some(Orcpt {
                        addr_type: "rfc822".into(),
                        address: "a+x@b.c".into(),
                    })
                }),
            ),
            (
                b"RCPT TO:<a@b.c> ORCPT=RFC822;+22a+20b+22@b.c NOTIFY=FAILURE",
                with(|r| {
                    r.orcpt = Some(Orcpt {
                        addr_type: "RFC822".into(),
                        address: "\"a b\"@b.c".into(),
                    });
                    r.notify = Some(notify(false, false, true, false));
                }),
            ),
            (
                b"RCPT TO:<a@b.c> ORCPT=utf-8;u+C3+BC@b.c",
                with(|r| {
                    r.orcpt = Some(Orcpt {
                        addr_type: "utf-8".into(),
                        address: "u\u{fc}@b.c".into(),
                    })
                }),
            ),
        ]);
    }

    #[test]
    fn rcpt_to_errors() {
        let long_domain = format!("RCPT TO:<a@{l}.{l}.{l}.{l}.x>", l = "a".repeat(63));
        check_err(&[
            (b"RCPT", 501, (5, 5, 2)),
            (b"RCPT FROM:<a@b>", 501, (5, 5, 2)),
            (b"RCPT TO:a@b", 501, (5, 5, 2)),
            (b"RCPT TO:<a@b", 501, (5, 5, 2)),
            (b"RCPT TO:<a@b>NOTIFY=NEVER", 501, (5, 5, 2)),
            (b"RCPT TO:<>", 501, (5, 1, 3)),
            (b"RCPT TO:<a>", 501, (5, 1, 3)),
            (b"RCPT TO:<a@b@c>", 501, (5, 1, 3)),
            (b"RCPT TO:<Postmaster >", 501, (5, 1, 3)),
            (b"RCPT TO:<Postmasters>", 501, (5, 1, 3)),
            (b"RCPT TO:<@a:Postmaster>", 501, (5, 1, 3)),
            (b"RCPT TO:<a@b_c>", 501, (5, 1, 3)),
            (b"RCPT TO:<a@[1.2.3.4>", 501, (5, 1, 3)),
            (long_domain.as_bytes(), 501, (5, 1, 3)),
            (b"RCPT TO:<a@b> SIZE=1", 555, (5, 5, 4)),
            (b"RCPT TO:<a@b> NOTIFY=NEVER NOTIFY=NEVER", 555, (5, 5, 4)),
            (
                b"RCPT TO:<a@b> ORCPT=rfc822;x ORCPT=rfc822;y",
                555,
                (5, 5, 4),
            ),
            (b"RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> NOTIFY=SUCCESS,NEVER", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> NOTIFY=SUCCESS,", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> NOTIFY=SOMETIMES", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> NOTIFY", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> ORCPT=rfc822", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> ORCPT=;a@b", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> ORCPT=rfc822;", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> ORCPT=rf.c;a@b", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> ORCPT=rfc822;a+0Ab", 501, (5, 5, 4)),
            (b"RCPT TO:<a@b> ORCPT=rfc822;a+", 501, (5, 5, 4)),
        ]);
    }

    #[test]
    fn unknown_parameter_reply_echoes_bounded_keyword() {
        let line = format!("MAIL FROM:<a@b> {}=1", "K".repeat(100));
        let r = parse_command(line.as_bytes()).unwrap_err().reply();
        assert_eq!(
            r.text(),
            format!("Unsupported parameter {}", "K".repeat(32))
        );
    }

    #[test]
    fn utf8_reply_is_shared() {
        let err = parse_command("MAIL FROM:<ü@x>".as_bytes()).unwrap_err();
        assert_eq!(err, CommandError::Smtputf8Required);
        assert_eq!(err.reply(), utf8_error_reply());
        assert_eq!(
            utf8_error_reply().to_bytes(),
            b"553 5.6.7 SMTPUTF8 required for non-ASCII address\r\n"
        );
    }

    #[test]
    fn relayed_address_is_exactly_as_given() {
        let Ok(Command::Rcpt(r)) = parse_command(b"RCPT TO:<\"u@evil\"@ok.example>") else {
            panic!("should parse");
        };
        let ForwardPath::Address(a) = r.to else {
            panic!("address")
        };
        assert_eq!(a.local_part(), "\"u@evil\"");
        assert_eq!(a.domain().map(|d| d.as_str()), Some("ok.example"));
        assert_eq!(a.to_string(), "\"u@evil\"@ok.example");
    }

    #[test]
    fn xtext_round_trip() {
        for s in ["", "plain", "a+b=c d", "ü<>\"\\", "~!"] {
            let mut e = String::new();
            xtext_encode(s, &mut e);
            assert!(is_xtext(&e), "{e}");
            assert_eq!(xtext_decode(&e).as_deref(), Some(s), "{e}");
        }
        assert_eq!(xtext_decode("+2b"), None, "hex must be upper case");
        assert_eq!(xtext_decode("a=b"), None);
        assert_eq!(xtext_decode("a b"), None);
    }
}
