//! Typed envelope addresses (RFC 5321 §4.1.2, §4.1.3; RFC 6531 for UTF-8).
//!
//! Everything here validates once at the protocol edge so the rest of the
//! relay (spool, routing, delivery) handles typed values, never raw strings.
//! The parsers work on bytes with a lookup table: they sit on the MAIL/RCPT
//! hot path and must not allocate beyond the owned strings they return.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};

/// RFC 5321 §4.5.3.1.1: local part at most 64 octets.
pub const MAX_LOCAL_PART_LEN: usize = 64;
/// RFC 5321 §4.5.3.1.2: domain at most 255 octets.
pub const MAX_DOMAIN_LEN: usize = 255;
/// RFC 1035 §2.3.4: a label is at most 63 octets.
pub const MAX_LABEL_LEN: usize = 63;

/// Why an address, domain or path was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing where an address or domain was expected.
    #[error("empty address")]
    Empty,
    /// The local part is empty or contains a character not allowed by RFC 5321.
    #[error("invalid local part")]
    InvalidLocalPart,
    /// A quoted local part has no closing quote.
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    /// Local part longer than 64 octets.
    #[error("local part exceeds 64 octets")]
    LocalPartTooLong,
    /// No `@` between local part and domain.
    #[error("missing @")]
    MissingAt,
    /// Domain longer than 255 octets.
    #[error("domain exceeds 255 octets")]
    DomainTooLong,
    /// A domain label longer than 63 octets.
    #[error("domain label exceeds 63 octets")]
    LabelTooLong,
    /// Empty label: leading, doubled or trailing dot.
    #[error("empty domain label")]
    EmptyLabel,
    /// A label starts or ends with a hyphen.
    #[error("domain label starts or ends with a hyphen")]
    HyphenAtLabelEdge,
    /// A character that cannot appear in a domain.
    #[error("invalid character in domain")]
    InvalidDomainChar,
    /// Malformed `[...]` address literal (unterminated, bad tag or content).
    #[error("invalid address literal")]
    InvalidLiteral,
    /// `[a.b.c.d]` whose content is not a dotted quad.
    #[error("invalid IPv4 address literal")]
    InvalidIpv4,
    /// `[IPv6:...]` whose content is not an IPv6 address.
    #[error("invalid IPv6 address literal")]
    InvalidIpv6,
    /// A malformed `@a,@b:` source route.
    #[error("invalid source route")]
    InvalidSourceRoute,
    /// Characters after a complete address.
    #[error("unexpected characters after address")]
    TrailingCharacters,
}

/// A validated domain name (RFC 5321 §4.1.2 Domain; U-labels allowed, flagged by
/// `is_ascii() == false`). Equality and Hash are ASCII-case-insensitive;
/// [`Domain::as_str`] keeps the original spelling; a trailing dot is not accepted.
#[derive(Clone)]
pub struct Domain {
    /// The domain, from `start` on. A domain parsed as part of an
    /// [`Address`] carries the address's local part and `@` in front of it:
    /// the address then needs one allocation, not two.
    text: Box<str>,
    start: u32,
    ascii: bool,
}

impl Domain {
    /// Parses and validates a domain (no brackets, no trailing dot).
    pub fn parse(s: &str) -> Result<Domain, AddressError> {
        let b = s.as_bytes();
        if b.is_empty() {
            return Err(AddressError::Empty);
        }
        let (end, ascii) = scan_domain(b, 0)?;
        if end != b.len() {
            return Err(AddressError::InvalidDomainChar);
        }
        Ok(Domain {
            text: Box::from(s),
            start: 0,
            ascii,
        })
    }

    /// The domain as written by the client.
    pub fn as_str(&self) -> &str {
        &self.text[self.start as usize..]
    }

    /// What is stored in front of the domain (`local@` for one parsed with
    /// an address, else nothing).
    fn prefix(&self) -> &str {
        &self.text[..self.start as usize]
    }

    /// False when the domain has U-labels (needs SMTPUTF8 / IDNA to relay).
    pub fn is_ascii(&self) -> bool {
        self.ascii
    }

    /// ASCII-lowercased copy: the key for routing tables and per-domain queues.
    pub fn to_lowercase(&self) -> String {
        self.as_str().to_ascii_lowercase()
    }
}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Domain").field(&self.as_str()).finish()
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Domain {
    fn eq(&self, other: &Self) -> bool {
        self.as_str().eq_ignore_ascii_case(other.as_str())
    }
}

impl Eq for Domain {}

impl Hash for Domain {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must agree with the case-insensitive Eq: hash the lowercased bytes,
        // in chunks through a stack buffer so hashing does not allocate.
        let mut buf = [0u8; 64];
        for chunk in self.as_str().as_bytes().chunks(buf.len()) {
            let out = &mut buf[..chunk.len()];
            out.copy_from_slice(chunk);
            out.make_ascii_lowercase();
            state.write(out);
        }
        // Terminator, like `str`'s Hash, keeps the encoding prefix-free.
        state.write_u8(0xff);
    }
}

/// An address literal: `[1.2.3.4]`, `[IPv6:...]` or `[tag:content]`
/// (RFC 5321 §4.1.3).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AddressLiteral {
    /// `[a.b.c.d]`.
    Ipv4(Ipv4Addr),
    /// `[IPv6:...]` (tag matched case-insensitively).
    Ipv6(Ipv6Addr),
    /// A General-address-literal: `[tag:content]` with a tag other than IPv6.
    General {
        /// Standardized-tag (Ldh-str).
        tag: String,
        /// dcontent as written.
        content: String,
    },
}

impl AddressLiteral {
    /// Parses the text between the brackets.
    fn parse_inner(inner: &str) -> Result<AddressLiteral, AddressError> {
        match inner.find(':') {
            None => parse_ipv4(inner.as_bytes())
                .map(AddressLiteral::Ipv4)
                .ok_or(AddressError::InvalidIpv4),
            Some(colon) => {
                let (tag, content) = (&inner[..colon], &inner[colon + 1..]);
                if tag.eq_ignore_ascii_case("IPv6") {
                    return content
                        .parse::<Ipv6Addr>()
                        .map(AddressLiteral::Ipv6)
                        .map_err(|_| AddressError::InvalidIpv6);
                }
                // Standardized-tag = Ldh-str: letters/digits/hyphens, ending in a let-dig.
                let tb = tag.as_bytes();
                let tag_ok = !tb.is_empty()
                    && tb.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
                    && tb[tb.len() - 1] != b'-';
                // dcontent = %d33-90 / %d94-126 (printable except "[", "\", "]").
                let content_ok =
                    !content.is_empty() && content.bytes().all(|c| matches!(c, 33..=90 | 94..=126));
                if tag_ok && content_ok {
                    Ok(AddressLiteral::General {
                        tag: tag.to_owned(),
                        content: content.to_owned(),
                    })
                } else {
                    Err(AddressError::InvalidLiteral)
                }
            }
        }
    }
}

impl fmt::Display for AddressLiteral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressLiteral::Ipv4(a) => write!(f, "[{a}]"),
            AddressLiteral::Ipv6(a) => write!(f, "[IPv6:{a}]"),
            AddressLiteral::General { tag, content } => write!(f, "[{tag}:{content}]"),
        }
    }
}

/// The part after `@`: a domain or an address literal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A domain name.
    Domain(Domain),
    /// A bracketed address literal.
    Literal(AddressLiteral),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(d) => d.fmt(f),
            Host::Literal(l) => l.fmt(f),
        }
    }
}

/// A mailbox `local-part@host`. The local part is kept exactly as written on the
/// wire (quoted string form included) so what is relayed goes to exactly the
/// address given: `"u@evil"@ok` has local part `"u@evil"` and host `ok`, and
/// `u%evil@ok` / `evil!u@ok` stay literal local parts.
///
/// Equality and Hash: the local part exactly, the host as [`Host`] compares
/// (domains ASCII-case-insensitively).
#[derive(Clone)]
pub struct Address {
    /// The local part, unless it is stored in front of the domain (see
    /// [`Domain`]): only addresses with an address literal keep it here.
    local: Option<Box<str>>,
    host: Host,
    /// Non-ASCII somewhere (found while parsing).
    utf8: bool,
}

impl Address {
    /// Parses a mailbox without angle brackets. UTF-8 is accepted (RFC 6531);
    /// [`Address::needs_smtputf8`] reports it.
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        let (addr, end) = parse_mailbox(s, 0)?;
        if end != s.len() {
            return Err(AddressError::TrailingCharacters);
        }
        Ok(addr)
    }

    /// The local part exactly as written (quotes and quoted pairs included).
    pub fn local_part(&self) -> &str {
        match (&self.local, &self.host) {
            (Some(local), _) => local,
            // `local@` in front of the domain.
            (None, Host::Domain(d)) => {
                let prefix = d.prefix();
                &prefix[..prefix.len().saturating_sub(1)]
            }
            (None, Host::Literal(_)) => unreachable!("an address literal keeps its local part"),
        }
    }

    /// The host part.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The domain, unless the host is an address literal.
    pub fn domain(&self) -> Option<&Domain> {
        match &self.host {
            Host::Domain(d) => Some(d),
            Host::Literal(_) => None,
        }
    }

    /// True when the address has non-ASCII characters, so it may only be used
    /// in a transaction that declared SMTPUTF8 (RFC 6531 §3.4).
    pub fn needs_smtputf8(&self) -> bool {
        self.utf8
    }
}

impl PartialEq for Address {
    fn eq(&self, other: &Self) -> bool {
        self.local_part() == other.local_part() && self.host == other.host
    }
}

impl Eq for Address {}

impl Hash for Address {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.local_part().hash(state);
        self.host.hash(state);
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Address")
            .field("local", &self.local_part())
            .field("host", &self.host)
            .finish()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local_part(), self.host)
    }
}

/// The argument of MAIL FROM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReversePath {
    /// `<>`: bounces and other DSNs (RFC 5321 §4.5.5).
    Null,
    /// A sender mailbox.
    Address(Address),
}

impl fmt::Display for ReversePath {
    /// The wire form with angle brackets: `<>` or `<a@b>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Address(a) => write!(f, "<{a}>"),
        }
    }
}

/// The argument of RCPT TO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardPath {
    /// Bare `<Postmaster>` (RFC 5321 §4.5.1, case-insensitive), which every
    /// server must accept without a domain.
    Postmaster,
    /// A recipient mailbox.
    Address(Address),
}

impl fmt::Display for ForwardPath {
    /// The wire form with angle brackets: `<Postmaster>` or `<a@b>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("<Postmaster>"),
            ForwardPath::Address(a) => write!(f, "<{a}>"),
        }
    }
}

// ---------------------------------------------------------------------------
// Byte-level scanners shared with the command parser.

const ATEXT: u8 = 1; // RFC 5322 atext, plus UTF8-non-ascii (RFC 6531)
const QTEXT: u8 = 2; // RFC 5321 qtextSMTP, plus UTF8-non-ascii
const LETDIG: u8 = 4; // ALPHA / DIGIT, plus UTF8-non-ascii for U-labels
const LDH: u8 = 8; // LETDIG or "-": what a domain label is made of

static CLASS: [u8; 256] = build_class_table();

const fn build_class_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let mut v = 0;
        if c.is_ascii_alphanumeric() || c >= 0x80 {
            v |= ATEXT | LETDIG | LDH;
        }
        if c == b'-' {
            v |= LDH;
        }
        if matches!(
            c,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'/'
                | b'='
                | b'?'
                | b'^'
                | b'_'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
                | b'~'
        ) {
            v |= ATEXT;
        }
        // qtextSMTP = %d32-33 / %d35-91 / %d93-126 (no `"` or `\`).
        if matches!(c, 32..=33 | 35..=91 | 93..=126) || c >= 0x80 {
            v |= QTEXT;
        }
        t[i] = v;
        i += 1;
    }
    t
}

#[inline]
fn class(c: u8) -> u8 {
    CLASS[c as usize]
}

/// Scans a Domain starting at `start`; returns the index just past it and
/// whether it is all ASCII. The caller decides whether the following byte is
/// acceptable.
pub(crate) fn scan_domain(b: &[u8], start: usize) -> Result<(usize, bool), AddressError> {
    let mut i = start;
    loop {
        let label_start = i;
        while i < b.len() && class(b[i]) & LDH != 0 {
            i += 1;
        }
        let len = i - label_start;
        if len == 0 {
            return Err(if i == start && b.get(i).is_some_and(|&c| c != b'.') {
                AddressError::InvalidDomainChar
            } else if i == start && i == b.len() {
                AddressError::Empty
            } else {
                AddressError::EmptyLabel
            });
        }
        if len > MAX_LABEL_LEN {
            return Err(AddressError::LabelTooLong);
        }
        if b[label_start] == b'-' || b[i - 1] == b'-' {
            return Err(AddressError::HyphenAtLabelEdge);
        }
        if i < b.len() && b[i] == b'.' {
            i += 1;
        } else {
            break;
        }
    }
    if i - start > MAX_DOMAIN_LEN {
        return Err(AddressError::DomainTooLong);
    }
    // One pass a word at a time, cheaper than tracking it per byte above.
    Ok((i, b[start..i].is_ascii()))
}

/// Scans a local part (Dot-string or Quoted-string) starting at `start`;
/// returns the index just past it and whether it is all ASCII.
fn scan_local_part(b: &[u8], start: usize) -> Result<(usize, bool), AddressError> {
    let mut i = start;
    if b.get(i) == Some(&b'"') {
        i += 1;
        loop {
            match b.get(i) {
                None => return Err(AddressError::UnterminatedQuote),
                Some(b'"') => {
                    i += 1;
                    break;
                }
                // quoted-pairSMTP = %d92 %d32-126
                Some(b'\\') => match b.get(i + 1) {
                    Some(32..=126) => i += 2,
                    None => return Err(AddressError::UnterminatedQuote),
                    Some(_) => return Err(AddressError::InvalidLocalPart),
                },
                Some(&c) if class(c) & QTEXT != 0 => i += 1,
                Some(_) => return Err(AddressError::InvalidLocalPart),
            }
        }
    } else {
        // Dot-string = Atom *("." Atom): no empty atoms.
        loop {
            let atom_start = i;
            while i < b.len() && class(b[i]) & ATEXT != 0 {
                i += 1;
            }
            if i == atom_start {
                return Err(AddressError::InvalidLocalPart);
            }
            if i < b.len() && b[i] == b'.' {
                i += 1;
            } else {
                break;
            }
        }
    }
    if i - start > MAX_LOCAL_PART_LEN {
        return Err(AddressError::LocalPartTooLong);
    }
    Ok((i, b[start..i].is_ascii()))
}

/// Parses `local@host` starting at `start`; returns the address and the index
/// just past it (the caller checks what follows: end of string or `>`).
/// One allocation for an address with a domain: the local part, `@` and the
/// domain, as written, in one buffer (see [`Domain`]).
pub(crate) fn parse_mailbox(s: &str, start: usize) -> Result<(Address, usize), AddressError> {
    let b = s.as_bytes();
    let (local_end, local_ascii) = scan_local_part(b, start)?;
    match b.get(local_end) {
        Some(b'@') => {}
        None | Some(b'>') => return Err(AddressError::MissingAt),
        // A dot-string stopped on a character it cannot hold (e.g. a space):
        // the local part is what is wrong, not the missing `@`.
        Some(_) => return Err(AddressError::InvalidLocalPart),
    }
    let host_start = local_end + 1;
    if b.get(host_start) == Some(&b'[') {
        let close = b[host_start..]
            .iter()
            .position(|&c| c == b']')
            .map(|p| host_start + p)
            .ok_or(AddressError::InvalidLiteral)?;
        let lit = AddressLiteral::parse_inner(&s[host_start + 1..close])?;
        let addr = Address {
            local: Some(Box::from(&s[start..local_end])),
            host: Host::Literal(lit),
            utf8: !local_ascii,
        };
        return Ok((addr, close + 1));
    }
    let (end, domain_ascii) = scan_domain(b, host_start)?;
    let domain = Domain {
        text: Box::from(&s[start..end]),
        // The local part is at most 64 octets (checked above).
        start: (host_start - start) as u32,
        ascii: domain_ascii,
    };
    let addr = Address {
        local: None,
        host: Host::Domain(domain),
        utf8: !(local_ascii && domain_ascii),
    };
    Ok((addr, end))
}

/// Skips an RFC 5321 A-d-l source route (`@a,@b:`) starting at `start` (on the
/// first `@`); returns the index after the `:`. The route is validated and
/// dropped, as Appendix C requires of receivers.
pub(crate) fn skip_source_route(b: &[u8], start: usize) -> Result<usize, AddressError> {
    let mut i = start;
    loop {
        if b.get(i) != Some(&b'@') {
            return Err(AddressError::InvalidSourceRoute);
        }
        i = scan_domain(b, i + 1)
            .map_err(|_| AddressError::InvalidSourceRoute)?
            .0;
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b':') => return Ok(i + 1),
            _ => return Err(AddressError::InvalidSourceRoute),
        }
    }
}

/// IPv4-address-literal = Snum 3("." Snum), Snum = 1*3DIGIT with value 0-255.
/// Hand-written because std rejects leading zeros, which the RFC grammar allows.
fn parse_ipv4(b: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut i = 0;
    for (n, octet) in octets.iter_mut().enumerate() {
        if n > 0 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let digits_start = i;
        let mut v: u16 = 0;
        while i < b.len() && b[i].is_ascii_digit() && i - digits_start < 3 {
            v = v * 10 + u16::from(b[i] - b'0');
            i += 1;
        }
        if i == digits_start || v > 255 {
            return None;
        }
        *octet = v as u8;
    }
    (i == b.len()).then(|| Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;

    fn hash_of<T: Hash>(v: &T) -> u64 {
        let mut h = DefaultHasher::new();
        v.hash(&mut h);
        h.finish()
    }

    #[test]
    fn domains() {
        let label63 = "a".repeat(63);
        let label64 = "a".repeat(64);
        // 4 labels of 63 + 3 dots = 255; one more label char makes 256.
        let d255 = format!("{l}.{l}.{l}.{l}", l = label63);
        let d256 = format!("{l}.{l}.{l}.{l}a", l = label63);
        let cases: Vec<(&str, Result<bool, AddressError>)> = vec![
            ("example.com", Ok(true)),
            ("EXAMPLE.com", Ok(true)),
            ("a", Ok(true)),
            ("a-b.c-d.e", Ok(true)),
            ("1.2.3.4", Ok(true)),
            ("xn--bcher-kva.example", Ok(true)),
            ("bücher.example", Ok(false)),
            ("例え.jp", Ok(false)),
            (&label63, Ok(true)),
            (&d255, Ok(true)),
            ("", Err(AddressError::Empty)),
            ("example.com.", Err(AddressError::EmptyLabel)),
            (".example.com", Err(AddressError::EmptyLabel)),
            ("a..b", Err(AddressError::EmptyLabel)),
            ("-a.b", Err(AddressError::HyphenAtLabelEdge)),
            ("a-.b", Err(AddressError::HyphenAtLabelEdge)),
            ("a_b.c", Err(AddressError::InvalidDomainChar)),
            ("a b", Err(AddressError::InvalidDomainChar)),
            ("[1.2.3.4]", Err(AddressError::InvalidDomainChar)),
            (&label64, Err(AddressError::LabelTooLong)),
            (&d256, Err(AddressError::LabelTooLong)),
        ];
        for (input, want) in cases {
            let got = Domain::parse(input).map(|d| {
                assert_eq!(d.as_str(), input);
                d.is_ascii()
            });
            assert_eq!(got, want, "{input:?}");
        }
        let too_long = format!("{l}.{l}.{l}.{l}.a", l = label63);
        assert_eq!(Domain::parse(&too_long), Err(AddressError::DomainTooLong));
    }

    #[test]
    fn domain_eq_hash_case_insensitive() {
        let a = Domain::parse("Example.COM").unwrap();
        let b = Domain::parse("example.com").unwrap();
        assert_eq!(a, b);
        assert_eq!(hash_of(&a), hash_of(&b));
        assert_eq!(a.as_str(), "Example.COM");
        assert_eq!(a.to_lowercase(), "example.com");
        assert_ne!(a, Domain::parse("example.org").unwrap());
        let long_a = Domain::parse(&format!("{}.Example.com", "X".repeat(63))).unwrap();
        let long_b = Domain::parse(&format!("{}.example.COM", "x".repeat(63))).unwrap();
        assert_eq!(hash_of(&long_a), hash_of(&long_b));
    }

    /// Expected (local part, host as displayed) or the error.
    type AddrCase<'a> = Result<(&'a str, &'a str), AddressError>;

    #[test]
    fn addresses() {
        let l64 = "a".repeat(64);
        let l65 = "a".repeat(65);
        let ok64 = format!("{l64}@x");
        let bad65 = format!("{l65}@x");
        let quoted64 = format!("\"{}\"@x", "a".repeat(62));
        let quoted65 = format!("\"{}\"@x", "a".repeat(63));
        // (input, Ok((local part, host display)) or error)
        let cases: Vec<(&str, AddrCase)> = vec![
            ("user@example.com", Ok(("user", "example.com"))),
            (
                "First.Last+tag@Example.COM",
                Ok(("First.Last+tag", "Example.COM")),
            ),
            ("!#$%&'*+-/=?^_`{|}~@x", Ok(("!#$%&'*+-/=?^_`{|}~", "x"))),
            // Relay tricks stay literal local parts.
            ("u%evil@ok", Ok(("u%evil", "ok"))),
            ("evil!u@ok", Ok(("evil!u", "ok"))),
            ("\"u@evil\"@ok", Ok(("\"u@evil\"", "ok"))),
            ("\"a b\"@x", Ok(("\"a b\"", "x"))),
            ("\"a\\\"b\\\\c\"@x", Ok(("\"a\\\"b\\\\c\"", "x"))),
            ("\"\"@x", Ok(("\"\"", "x"))),
            ("u@[192.0.2.1]", Ok(("u", "[192.0.2.1]"))),
            ("u@[001.002.003.004]", Ok(("u", "[1.2.3.4]"))),
            ("u@[IPv6:2001:db8::1]", Ok(("u", "[IPv6:2001:db8::1]"))),
            ("u@[ipv6:::1]", Ok(("u", "[IPv6:::1]"))),
            (
                "u@[IPv6:::ffff:1.2.3.4]",
                Ok(("u", "[IPv6:::ffff:1.2.3.4]")),
            ),
            ("u@[x-tag:some-thing]", Ok(("u", "[x-tag:some-thing]"))),
            ("用户@例え.jp", Ok(("用户", "例え.jp"))),
            ("\"ü x\"@x", Ok(("\"ü x\"", "x"))),
            (&ok64, Ok((&l64, "x"))),
            (&quoted64, Ok((&quoted64[..64], "x"))),
            ("", Err(AddressError::Empty)),
            ("user", Err(AddressError::MissingAt)),
            ("user@", Err(AddressError::Empty)),
            ("@x", Err(AddressError::InvalidLocalPart)),
            (".u@x", Err(AddressError::InvalidLocalPart)),
            ("u.@x", Err(AddressError::InvalidLocalPart)),
            ("u..v@x", Err(AddressError::InvalidLocalPart)),
            ("a b@x", Err(AddressError::InvalidLocalPart)),
            ("a(b)@x", Err(AddressError::InvalidLocalPart)),
            ("a@b@c", Err(AddressError::TrailingCharacters)),
            ("\"abc@x", Err(AddressError::UnterminatedQuote)),
            ("\"a\\", Err(AddressError::UnterminatedQuote)),
            ("\"a\tb\"@x", Err(AddressError::InvalidLocalPart)),
            ("\"a\\\u{7f}\"@x", Err(AddressError::InvalidLocalPart)),
            ("\"a\"b@x", Err(AddressError::InvalidLocalPart)),
            (&bad65, Err(AddressError::LocalPartTooLong)),
            (&quoted65, Err(AddressError::LocalPartTooLong)),
            ("u@x.", Err(AddressError::EmptyLabel)),
            ("u@-x", Err(AddressError::HyphenAtLabelEdge)),
            ("u@x_y", Err(AddressError::TrailingCharacters)),
            ("u@[1.2.3.4", Err(AddressError::InvalidLiteral)),
            ("u@[1.2.3]", Err(AddressError::InvalidIpv4)),
            ("u@[1.2.3.256]", Err(AddressError::InvalidIpv4)),
            ("u@[1.2.3.4.5]", Err(AddressError::InvalidIpv4)),
            ("u@[1.2.3.0004]", Err(AddressError::InvalidIpv4)),
            ("u@[]", Err(AddressError::InvalidIpv4)),
            ("u@[IPv6:1.2.3.4]", Err(AddressError::InvalidIpv6)),
            ("u@[IPv6:fe80::1%eth0]", Err(AddressError::InvalidIpv6)),
            ("u@[tag-:x]", Err(AddressError::InvalidLiteral)),
            ("u@[:x]", Err(AddressError::InvalidLiteral)),
            ("u@[tag:]", Err(AddressError::InvalidLiteral)),
            ("u@[tag:a b]", Err(AddressError::InvalidLiteral)),
            ("u@[tag:a\\b]", Err(AddressError::InvalidLiteral)),
            ("u@[1.2.3.4]x", Err(AddressError::TrailingCharacters)),
        ];
        for (input, want) in cases {
            let got = Address::parse(input);
            let got = got
                .as_ref()
                .map(|a| (a.local_part(), a.host().to_string()))
                .map_err(Clone::clone);
            let want = want.map(|(l, h)| (l, h.to_string()));
            assert_eq!(got, want, "{input:?}");
        }
    }

    #[test]
    fn literals_are_typed() {
        let a = Address::parse("u@[192.0.2.1]").unwrap();
        assert_eq!(
            a.host(),
            &Host::Literal(AddressLiteral::Ipv4(Ipv4Addr::new(192, 0, 2, 1)))
        );
        assert_eq!(a.domain(), None);
        let a = Address::parse("u@[IPv6:::1]").unwrap();
        assert_eq!(
            a.host(),
            &Host::Literal(AddressLiteral::Ipv6(Ipv6Addr::LOCALHOST))
        );
        let a = Address::parse("u@[x:y]").unwrap();
        assert_eq!(
            a.host(),
            &Host::Literal(AddressLiteral::General {
                tag: "x".into(),
                content: "y".into()
            })
        );
    }

    #[test]
    fn smtputf8_detection() {
        for (input, needs) in [
            ("u@x", false),
            ("ü@x", true),
            ("u@bücher.de", true),
            ("\"ü\"@x", true),
            ("u@[1.2.3.4]", false),
        ] {
            assert_eq!(
                Address::parse(input).unwrap().needs_smtputf8(),
                needs,
                "{input}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for input in [
            "user@example.com",
            "\"a\\\"b\"@Example.COM",
            "u@[1.2.3.4]",
            "u@[IPv6:2001:db8::1]",
            "u@[tag:c]",
            "ü@bücher.de",
        ] {
            let a = Address::parse(input).unwrap();
            assert_eq!(Address::parse(&a.to_string()).unwrap(), a, "{input}");
        }
        assert_eq!(
            Address::parse("u@[010.0.0.1]").unwrap().to_string(),
            "u@[10.0.0.1]"
        );
    }

    #[test]
    fn address_eq_case_insensitive_domain_only() {
        let a = Address::parse("User@EXAMPLE.com").unwrap();
        assert_eq!(a, Address::parse("User@example.COM").unwrap());
        assert_eq!(
            hash_of(&a),
            hash_of(&Address::parse("User@example.COM").unwrap())
        );
        // Local parts are case-sensitive (RFC 5321 §2.4).
        assert_ne!(a, Address::parse("user@example.com").unwrap());
    }

    #[test]
    fn paths_display() {
        assert_eq!(ReversePath::Null.to_string(), "<>");
        assert_eq!(ForwardPath::Postmaster.to_string(), "<Postmaster>");
        let a = Address::parse("a@b").unwrap();
        assert_eq!(ReversePath::Address(a.clone()).to_string(), "<a@b>");
        assert_eq!(ForwardPath::Address(a).to_string(), "<a@b>");
    }

    #[test]
    fn source_routes() {
        let cases: [(&str, Result<usize, AddressError>); 6] = [
            ("@a:", Ok(3)),
            ("@a.b,@c:", Ok(8)),
            ("@a", Err(AddressError::InvalidSourceRoute)),
            ("@a,c:", Err(AddressError::InvalidSourceRoute)),
            ("@:", Err(AddressError::InvalidSourceRoute)),
            ("@a;", Err(AddressError::InvalidSourceRoute)),
        ];
        for (input, want) in cases {
            assert_eq!(skip_source_route(input.as_bytes(), 0), want, "{input}");
        }
    }
}
