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
}
