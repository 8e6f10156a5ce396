//! Blocking SMTP client pieces for `send`: reading (possibly multi-line) replies with
//! bounded line length and count.

use std::io::{self, BufRead, Read};

/// Longest reply line accepted; RFC 5321 says 512, we allow slack for chatty servers.
const MAX_LINE: u64 = 8192;
/// Most lines in one multi-line reply (EHLO replies are the longest in practice).
const MAX_LINES: usize = 200;

/// One SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Text of each line, without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// True for 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The queue id from a `... queued as ID` reply, as Sluice and Postfix both word it.
    pub fn queue_id(&self) -> Option<String> {
        for l in &self.lines {
            let lower = l.to_ascii_lowercase();
            if let Some(pos) = lower.find("queued as ") {
                let id: String = l[pos + 10..]
                    .trim_start()
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                let id = id.trim_matches(|c: char| matches!(c, '<' | '>' | '.' | ',' | ')' | '('));
                if !id.is_empty() {
                    return Some(id.to_string());
                }
            }
        }
        None
    }

    /// True if an EHLO reply advertises `keyword` (case-insensitive, first word of a line).
    pub fn has_extension(&self, keyword: &str) -> bool {
        self.lines.iter().skip(1).any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
        })
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one complete reply.
pub fn read_reply<R: BufRead>(r: &mut R) -> io::Result<Reply> {
    let mut lines = Vec::new();
    let mut buf = Vec::with_capacity(128);
    loop {
        buf.clear();
        let n = Read::take(&mut *r, MAX_LINE).read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed while waiting for reply",
            ));
        }
        if buf.last() != Some(&b'\n') {
            return Err(bad("reply line too long or truncated"));
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        if buf.len() < 3 || !buf[..3].iter().all(u8::is_ascii_digit) {
            return Err(bad(format!(
                "malformed reply line {:?}",
                String::from_utf8_lossy(&buf)
            )));
        }
        let code =
            (buf[0] - b'0') as u16 * 100 + (buf[1] - b'0') as u16 * 10 + (buf[2] - b'0') as u16;
        let sep = buf.get(3).copied();
        let text = if buf.len() > 4 {
            String::from_utf8_lossy(&buf[4..]).into_owned()
        } else {
            String::new()
        };
        lines.push(text);
        match sep {
            None | Some(b' ') => return Ok(Reply { code, lines }),
            Some(b'-') if lines.len() < MAX_LINES => {}
            Some(b'-') => return Err(bad("reply has too many lines")),
            Some(_) => return Err(bad("malformed reply separator")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_table() {
        for (input, want) in [
            (&b"250 ok\r\n"[..], Some((250, vec!["ok"]))),
            (
                b"250-a\r\n250-PIPELINING\r\n250 SIZE 10\r\n",
                Some((250, vec!["a", "PIPELINING", "SIZE 10"])),
            ),
            (b"354\r\n", Some((354, vec![""]))),
            (b"2x0 ok\r\n", None),
            (b"250-a\r\n", None),
            (b"", None),
        ] {
            let got = read_reply(&mut &input[..]).ok();
            let want = want.map(|(c, l)| Reply {
                code: c,
                lines: l.into_iter().map(String::from).collect(),
            });
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn queue_ids() {
        for (text, want) in [
            ("2.0.0 Ok: queued as 4XyZ12", Some("4XyZ12")),
            ("2.0.0 OK queued as <01HX>", Some("01HX")),
            ("2.0.0 Queued as abc.", Some("abc")),
            ("2.0.0 accepted", None),
        ] {
            let r = Reply {
                code: 250,
                lines: vec![text.into()],
            };
            assert_eq!(r.queue_id().as_deref(), want, "{text}");
        }
    }

    #[test]
    fn extensions() {
        let r = Reply {
            code: 250,
            lines: vec![
                "host".into(),
                "PIPELINING".into(),
                "chunking".into(),
                "SIZE 100".into(),
            ],
        };
        assert!(r.has_extension("pipelining"));
        assert!(r.has_extension("CHUNKING"));
        assert!(r.has_extension("SIZE"));
        assert!(!r.has_extension("SMTPUTF8"));
    }
}
