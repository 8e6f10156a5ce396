//! SMTP replies (RFC 5321 §4.2) with RFC 3463 enhanced status codes.
//!
//! A [`Reply`] is the unit every protocol component speaks: the server session
//! answers with them, parse errors carry them, and the client session reads
//! them back from remote servers.

use std::borrow::Cow;
use std::fmt;

/// An RFC 3463 enhanced status code: `class.subject.detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    /// 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub class: u8,
    /// Subject (0..=999).
    pub subject: u16,
    /// Detail (0..=999).
    pub detail: u16,
}

impl EnhancedCode {
    /// Builds a code; callers use constants, so no validation beyond debug asserts.
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Self {
            class,
            subject,
            detail,
        }
    }

    /// Parses `"5.1.1"`-style text.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
            return None;
        }
        Some(Self::new(class, subject, detail))
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// An SMTP reply: a three-digit code, an optional enhanced status code and one
/// or more lines of text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    enhanced: Option<EnhancedCode>,
    lines: Vec<Cow<'static, str>>,
}

impl Reply {
    /// A single-line reply with an enhanced status code whose class matches the code's.
    pub fn new(code: u16, enhanced: EnhancedCode, text: impl Into<Cow<'static, str>>) -> Self {
        debug_assert!((200..600).contains(&code));
        debug_assert_eq!(
            u16::from(enhanced.class),
            code / 100,
            "enhanced class must match"
        );
        Self {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced code: the greeting and the EHLO/HELO answers
    /// (RFC 2034 only requires enhanced codes after EHLO negotiated them).
    pub fn plain(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply without enhanced codes (EHLO keywords).
    pub fn multiline(code: u16, lines: Vec<Cow<'static, str>>) -> Self {
        assert!(!lines.is_empty(), "a reply has at least one line");
        Self {
            code,
            enhanced: None,
            lines,
        }
    }

    /// Builds a reply from parts received from a remote server.
    pub fn from_parts(code: u16, enhanced: Option<EnhancedCode>, lines: Vec<String>) -> Self {
        let lines = if lines.is_empty() {
            vec![Cow::Borrowed("")]
        } else {
            lines.into_iter().map(Cow::Owned).collect()
        };
        Self {
            code,
            enhanced,
            lines,
        }
    }

    /// The three-digit reply code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The enhanced status code, if any.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        self.enhanced
    }

    /// The text lines (without code prefixes).
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|l| l.as_ref())
    }

    /// The text of all lines joined by a space (for logs and DSN diagnostics).
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(|l| l.as_ref())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// 2yz.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3yz (354 and AUTH challenges).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4yz: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5yz: do not retry.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// Appends the wire form (`250-a\r\n250 b\r\n`) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len() - 1;
        for (i, line) in self.lines.iter().enumerate() {
            out.extend_from_slice(itoa3(self.code).as_slice());
            out.push(if i == last { b' ' } else { b'-' });
            if let Some(e) = self.enhanced {
                out.extend_from_slice(e.to_string().as_bytes());
                if !line.is_empty() {
                    out.push(b' ');
                }
            }
            // Reply text must never break the framing: strip CR/LF from text.
            out.extend(line.bytes().filter(|&b| b != b'\r' && b != b'\n'));
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        self.write_to(&mut v);
        v
    }
}

/// Longest reply line we accept from a remote server, CRLF included. RFC 5321
/// §4.5.3.1.5 sets 512; real servers exceed it a little, so allow more but
/// stay bounded so a hostile peer cannot grow our memory.
pub const MAX_REPLY_LINE: usize = 2048;

/// Most lines in one reply (EHLO answers have a dozen or so).
pub const MAX_REPLY_LINES: usize = 128;

/// A remote server sent something that is not an SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyParseError {
    /// A line without a three-digit code and a separator.
    #[error("malformed reply line: {0:?}")]
    Malformed(String),
    /// The lines of a multi-line reply carry different codes.
    #[error("reply code changed within a multi-line reply ({first} then {then})")]
    MixedCodes {
        /// The first line's code.
        first: u16,
        /// The offending line's code.
        then: u16,
    },
    /// A line longer than [`MAX_REPLY_LINE`] or more than [`MAX_REPLY_LINES`] lines.
    #[error("reply too long")]
    TooLong,
}

impl Reply {
    /// Parses one complete reply from the front of `input` (the bytes a
    /// server sent). Returns `Ok(None)` when more input is needed, or the
    /// reply and how many bytes it took. Incremental by re-parsing: replies
    /// are short, and a client holds at most one partial reply.
    ///
    /// Lines may end in CRLF or, leniently, a bare LF (some servers do). An
    /// enhanced status code (RFC 2034) is recognised when the first line's
    /// text starts with one whose class matches the reply code; it is then
    /// stripped from every line that repeats it.
    pub fn parse(input: &[u8]) -> Result<Option<(Reply, usize)>, ReplyParseError> {
        let mut pos = 0;
        let mut code = None;
        let mut raw_lines: Vec<Cow<'_, [u8]>> = Vec::new();
        loop {
            let rest = &input[pos..];
            let Some(lf) = memchr::memchr(b'\n', rest) else {
                if rest.len() >= MAX_REPLY_LINE {
                    return Err(ReplyParseError::TooLong);
                }
                return Ok(None);
            };
            if lf + 1 > MAX_REPLY_LINE {
                return Err(ReplyParseError::TooLong);
            }
            let mut line = &rest[..lf];
            if let [head @ .., b'\r'] = line {
                line = head;
            }
            pos += lf + 1;
            let malformed =
                || ReplyParseError::Malformed(String::from_utf8_lossy(line).into_owned());
            if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                return Err(malformed());
            }
            let this = u16::from(line[0] - b'0') * 100
                + u16::from(line[1] - b'0') * 10
                + u16::from(line[2] - b'0');
            if !(200..600).contains(&this) {
                return Err(malformed());
            }
            match code {
                None => code = Some(this),
                Some(first) if first != this => {
                    return Err(ReplyParseError::MixedCodes { first, then: this })
                }
                Some(_) => {}
            }
            let (last, text) = match line.get(3) {
                None => (true, &line[3..]),
                Some(b' ') => (true, &line[4..]),
                Some(b'-') => (false, &line[4..]),
                Some(_) => return Err(malformed()),
            };
            // A CR inside the text is dropped here, as `write_to` drops it on
            // the way out: the text kept is the text that would be relayed
            // (into DSNs and logs), so it never carries a line break, and the
            // enhanced code is recognised on exactly that text.
            let text = if text.contains(&b'\r') {
                Cow::Owned(text.iter().copied().filter(|&b| b != b'\r').collect())
            } else {
                Cow::Borrowed(text)
            };
            raw_lines.push(text);
            if last {
                break;
            }
            if raw_lines.len() >= MAX_REPLY_LINES {
                return Err(ReplyParseError::TooLong);
            }
        }
        let code = code.expect("at least one line was parsed");
        let enhanced = raw_lines
            .first()
            .and_then(|t| leading_enhanced_code(t))
            .filter(|(e, _)| u16::from(e.class) == code / 100)
            .map(|(e, _)| e);
        let lines = raw_lines
            .iter()
            .map(|t| {
                let t: &[u8] = t;
                let t = match (enhanced, leading_enhanced_code(t)) {
                    (Some(e), Some((here, rest))) if here == e => rest,
                    _ => t,
                };
                String::from_utf8_lossy(t).into_owned()
            })
            .collect();
        Ok(Some((Reply::from_parts(code, enhanced, lines), pos)))
    }
}

/// `"5.1.1 text"` -> (5.1.1, `"text"`).
fn leading_enhanced_code(text: &[u8]) -> Option<(EnhancedCode, &[u8])> {
    let end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
    let code = EnhancedCode::parse(std::str::from_utf8(&text[..end]).ok()?)?;
    let rest = text.get(end + 1..).unwrap_or(&[]);
    Some((code, rest))
}

fn itoa3(code: u16) -> [u8; 3] {
    [
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(String::from_utf8_lossy(&self.to_bytes()).trim_end())
    }
}

/// Shorthand used by the protocol cores: `reply!(250, 2,0,0, "Ok")`.
#[macro_export]
macro_rules! reply {
    ($code:expr, $c:expr, $s:expr, $d:expr, $text:expr) => {
        $crate::smtp::reply::Reply::new(
            $code,
            $crate::smtp::reply::EnhancedCode::new($c, $s, $d),
            $text,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_enhanced_code() {
        let r = Reply::new(250, EnhancedCode::new(2, 1, 0), "Ok");
        assert_eq!(r.to_bytes(), b"250 2.1.0 Ok\r\n");
        assert!(r.is_positive() && !r.is_transient() && !r.is_permanent());
    }

    #[test]
    fn multiline_renders_dashes_then_space() {
        let r = Reply::multiline(
            250,
            vec!["mx.example".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(
            r.to_bytes(),
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }

    #[test]
    fn classes() {
        assert!(Reply::new(451, EnhancedCode::new(4, 3, 0), "x").is_transient());
        assert!(Reply::new(550, EnhancedCode::new(5, 1, 1), "x").is_permanent());
        assert!(Reply::plain(354, "go").is_intermediate());
    }

    #[test]
    fn text_cannot_inject_lines() {
        let r = Reply::new(550, EnhancedCode::new(5, 0, 0), "a\r\n250 b".to_string());
        assert_eq!(r.to_bytes(), b"550 5.0.0 a250 b\r\n");
    }

    #[test]
    fn enhanced_code_parse() {
        assert_eq!(
            EnhancedCode::parse("5.1.10"),
            Some(EnhancedCode::new(5, 1, 10))
        );
        assert_eq!(EnhancedCode::parse("3.1.1"), None);
        assert_eq!(EnhancedCode::parse("5.1"), None);
    }

    #[test]
    fn parse_replies() {
        type Want = (u16, Option<&'static str>, &'static [&'static str], usize);
        let table: &[(&[u8], Option<Want>)] = &[
            (b"250 2.1.0 Ok\r\n", Some((250, Some("2.1.0"), &["Ok"], 14))),
            (
                b"220 mx ESMTP\r\nrest",
                Some((220, None, &["mx ESMTP"], 14)),
            ),
            (
                b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n",
                Some((250, None, &["mx", "PIPELINING", "SIZE 10"], 37)),
            ),
            (
                b"550-5.1.1 no\r\n550 5.1.1 such user\r\n",
                Some((550, Some("5.1.1"), &["no", "such user"], 35)),
            ),
            (b"451 4.3.0\r\n", Some((451, Some("4.3.0"), &[""], 11))),
            (b"250\r\n", Some((250, None, &[""], 5))),
            (b"250 ok\n", Some((250, None, &["ok"], 7))),
            // A mismatched class is text, not an enhanced code.
            (b"250 5.0.0 odd\r\n", Some((250, None, &["5.0.0 odd"], 15))),
            // A CR inside the text is dropped (as rendering drops it), before
            // the enhanced code is looked for.
            (
                b"250 2.0\r.0 a\rb\r\r\n",
                Some((250, Some("2.0.0"), &["ab"], 17)),
            ),
            (b"250-mx\r\n250 SIZE", None),
            (b"25", None),
            (b"", None),
        ];
        for &(input, want) in table {
            let got = Reply::parse(input).unwrap();
            let name = String::from_utf8_lossy(input).escape_debug().to_string();
            match (got, want) {
                (None, None) => {}
                (Some((r, n)), Some((code, enh, lines, used))) => {
                    assert_eq!(r.code(), code, "{name}");
                    assert_eq!(
                        r.enhanced().map(|e| e.to_string()).as_deref(),
                        enh,
                        "{name}"
                    );
                    assert_eq!(r.lines().collect::<Vec<_>>(), lines, "{name}");
                    assert_eq!(n, used, "{name}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn parse_round_trips_what_we_write() {
        for r in [
            Reply::new(250, EnhancedCode::new(2, 0, 0), "Ok: queued as X"),
            Reply::multiline(250, vec!["a".into(), "b c".into()]),
            Reply::new(554, EnhancedCode::new(5, 7, 1), "Relay access denied"),
        ] {
            let bytes = r.to_bytes();
            assert_eq!(Reply::parse(&bytes).unwrap(), Some((r, bytes.len())));
        }
    }

    #[test]
    fn parse_rejects_garbage_and_bounds_memory() {
        for bad in [
            &b"hello\r\n"[..],
            b"2500 x\r\n",
            b"099 x\r\n",
            b"250-a\r\n251 b\r\n",
            b"250_x\r\n",
        ] {
            assert!(
                Reply::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = vec![b'2'; MAX_REPLY_LINE];
        assert_eq!(Reply::parse(&long), Err(ReplyParseError::TooLong));
        let many = b"250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        assert_eq!(Reply::parse(&many), Err(ReplyParseError::TooLong));
    }
}
