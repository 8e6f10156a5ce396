//! Realistic message generation: RFC 5322 headers, 78-character body lines, and a fixed
//! set of lines that begin with `.` so every DATA transfer exercises dot-stuffing.

use crate::util::rfc5322_now;

/// Lines placed at the top of every body so even tiny messages exercise stuffing:
/// a lone dot (would end DATA if not stuffed), a lone double dot, and dotted text.
const DOT_LINES: [&str; 4] = [
    ".",
    "..",
    ".leading dot line: must arrive with exactly one dot",
    "..two leading dots: must arrive with exactly two dots",
];

const WORDS: [&str; 16] = [
    "sluice",
    "relay",
    "queue",
    "spool",
    "deliver",
    "domain",
    "mailbox",
    "envelope",
    "header",
    "throughput",
    "latency",
    "pipeline",
    "chunk",
    "message",
    "transfer",
    "loopback",
];

/// The part of a message shared by all messages of a run: the body after the headers.
#[derive(Debug, Clone)]
pub struct BodyTemplate {
    /// Canonical (unstuffed) body, CRLF line endings, ends with CRLF.
    body: Vec<u8>,
}

/// Approximate size of the generated header block, used to size the body.
const HEADER_ESTIMATE: usize = 380;

impl BodyTemplate {
    /// Builds a body so that header block + body is about `total_size` bytes.
    pub fn new(total_size: usize) -> Self {
        let target = total_size.saturating_sub(HEADER_ESTIMATE);
        let mut body = Vec::with_capacity(target + 512);
        for l in DOT_LINES {
            body.extend_from_slice(l.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        let mut n = 0usize;
        while body.len() + 80 <= target {
            let mut line = String::with_capacity(80);
            // Every 9th line starts with a dot, the rest with text; all are 78 chars.
            if n % 9 == 8 {
                line.push('.');
            }
            let mut w = n;
            while line.len() < 78 {
                if !line.is_empty() && !line.ends_with('.') {
                    line.push(' ');
                }
                line.push_str(WORDS[w % WORDS.len()]);
                w = w.wrapping_mul(7).wrapping_add(3);
            }
            line.truncate(78);
            // A line must not end in a space for some strict checkers; swap it for a letter.
            if line.ends_with(' ') {
                line.pop();
                line.push('x');
            }
            body.extend_from_slice(line.as_bytes());
            body.extend_from_slice(b"\r\n");
            n += 1;
        }
        // Pad with a final short line to land close to the requested size.
        let rest = target.saturating_sub(body.len());
        if rest > 2 {
            body.extend(std::iter::repeat_n(b'z', rest - 2));
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"-- \r\nsent by sluice-load\r\n");
        BodyTemplate { body }
    }

    /// The canonical body bytes.
    #[cfg(test)]
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

/// One generated message, canonical form (what the receiver must store) and its
/// dot-stuffed form for DATA (without the terminating `.CRLF`).
pub struct Message {
    /// Unique Message-ID (without angle brackets).
    pub message_id: String,
    /// Canonical message bytes.
    pub raw: Vec<u8>,
}

/// Builds a message: headers for this envelope, then the shared body.
pub fn build_message(
    tpl: &BodyTemplate,
    from: &str,
    rcpts: &[String],
    message_id: String,
    seq: u64,
) -> Message {
    let mut raw = Vec::with_capacity(tpl.body.len() + HEADER_ESTIMATE + 64);
    let to = rcpts.first().map(String::as_str).unwrap_or("undisclosed");
    let extra = if rcpts.len() > 1 {
        format!(" (+{} more)", rcpts.len() - 1)
    } else {
        String::new()
    };
    let headers = format!(
        "Return-Path: <{from}>\r\n\
         From: Sluice Load <{from}>\r\n\
         To: <{to}>\r\n\
         Subject: sluice-load message {seq}{extra}\r\n\
         Date: {date}\r\n\
         Message-ID: <{message_id}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         Content-Transfer-Encoding: 7bit\r\n\
         X-Sluice-Load: seq={seq}\r\n\
         \r\n",
        date = rfc5322_now(),
    );
    raw.extend_from_slice(headers.as_bytes());
    raw.extend_from_slice(&tpl.body);
    Message { message_id, raw }
}

/// Dot-stuffs `raw` (CRLF lines) for DATA: a `.` is added before every line starting with
/// `.`. Appends the terminating `.CRLF`.
pub fn dot_stuff_into(raw: &[u8], out: &mut Vec<u8>) {
    out.reserve(raw.len() + raw.len() / 64 + 8);
    let mut at_line_start = true;
    for &b in raw {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_lines_are_at_most_78_and_crlf() {
        for size in [0usize, 100, 1000, 5120, 100_000] {
            let t = BodyTemplate::new(size);
            let b = t.body();
            assert!(b.ends_with(b"\r\n"));
            for line in b.split(|&c| c == b'\n') {
                if line.is_empty() {
                    continue;
                }
                assert!(line.ends_with(b"\r"), "bare LF in body");
                assert!(line.len() <= 79, "line too long: {}", line.len());
            }
            if size >= 5120 {
                let total = b.len() + HEADER_ESTIMATE;
                assert!(total.abs_diff(size) < 200, "size {size} got {total}");
            }
        }
    }

    #[test]
    fn body_contains_dot_lines() {
        let t = BodyTemplate::new(5000);
        let text = String::from_utf8(t.body().to_vec()).unwrap();
        let dotted = text.lines().filter(|l| l.starts_with('.')).count();
        assert!(dotted >= 8, "{dotted}");
        assert!(text.starts_with(".\r\n..\r\n"));
    }

    #[test]
    fn stuffing_table() {
        for (raw, want) in [
            (&b"a\r\n"[..], &b"a\r\n.\r\n"[..]),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"x\r\n.y\r\n..\r\n", b"x\r\n..y\r\n...\r\n.\r\n"),
            (b"no newline", b"no newline\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
        ] {
            let mut out = Vec::new();
            dot_stuff_into(raw, &mut out);
            assert_eq!(out, want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn message_has_headers_and_unique_id() {
        let t = BodyTemplate::new(2000);
        let m = build_message(&t, "a@b.test", &["c@d.test".into()], "id1@x".into(), 7);
        let s = String::from_utf8(m.raw).unwrap();
        assert!(s.contains("Message-ID: <id1@x>\r\n"));
        assert!(s.contains("To: <c@d.test>\r\n"));
        assert!(s.contains("\r\n\r\n.\r\n"));
    }
}
