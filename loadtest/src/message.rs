//! Realistic test messages: RFC 5322 headers with a unique `X-Sluice-Load-Id`, and MIME
//! bodies of three kinds (plain text, multipart/alternative text + HTML, multipart/mixed
//! with a base64 attachment) at fixed sizes or drawn from a size distribution.
//!
//! Bodies are built once per (size, kind) before the run, both canonical (for BDAT) and
//! dot-stuffed (for DATA), so sending a message costs one header format and a memcpy. Every
//! body has lines beginning with `.` so every DATA transfer exercises dot-stuffing.

use std::fmt::Write as _;
use std::sync::Arc;

/// Lines placed in every text part so even tiny messages exercise stuffing: a lone dot
/// (would end DATA if not stuffed), a lone double dot, and dotted text.
const DOT_LINES: [&str; 4] = [
    ".",
    "..",
    ".leading dot line: must arrive with exactly one dot",
    "..two leading dots: must arrive with exactly two dots",
];

const WORDS: [&str; 24] = [
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
    "invoice",
    "newsletter",
    "account",
    "receipt",
    "shipping",
    "order",
    "welcome",
    "password",
];

/// Room the per-message header block takes (measured: ~420-520 bytes with one recipient);
/// the body is sized so headers + body land near the requested size.
pub const HEADER_ESTIMATE: usize = 480;

/// The MIME structure of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BodyKind {
    /// `text/plain`, 7bit.
    Plain,
    /// `multipart/alternative`: a text/plain and a text/html part.
    Alternative,
    /// `multipart/mixed`: a short text part and a base64 `application/pdf` attachment.
    Attachment,
    /// Per message: plain 50%, alternative 30%, attachment 20%.
    Mixed,
}

/// A weighted list of message sizes, e.g. `2k:50,20k:40,200k:10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeDist {
    /// (size in bytes, weight); weights need not sum to 100.
    pub entries: Vec<(usize, u32)>,
}

impl SizeDist {
    /// One fixed size.
    pub fn fixed(size: usize) -> Self {
        SizeDist {
            entries: vec![(size, 1)],
        }
    }

    /// Parses `SIZE:WEIGHT,SIZE:WEIGHT,...` (a bare `SIZE` has weight 1).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (size, weight) = match part.split_once(':') {
                Some((a, b)) => (
                    a,
                    b.trim()
                        .parse::<u32>()
                        .map_err(|_| format!("bad weight in {part:?}"))?,
                ),
                None => (part, 1),
            };
            let size = crate::util::parse_size(size)?;
            if weight > 0 {
                entries.push((size, weight));
            }
        }
        if entries.is_empty() {
            return Err(format!("empty size distribution {s:?}"));
        }
        Ok(SizeDist { entries })
    }

    /// The entry a uniform 64-bit draw selects.
    fn pick(&self, draw: u64) -> usize {
        let total: u64 = self.entries.iter().map(|e| u64::from(e.1)).sum();
        let mut x = draw % total;
        for (i, e) in self.entries.iter().enumerate() {
            if x < u64::from(e.1) {
                return i;
            }
            x -= u64::from(e.1);
        }
        self.entries.len() - 1
    }
}

/// A prepared body: its MIME header lines and its bytes in both transfer forms.
#[derive(Debug)]
pub struct Body {
    /// `MIME-Version` and `Content-*` header lines, each ending in CRLF.
    pub mime_headers: String,
    /// Canonical bytes (CRLF lines), as the receiver must store them.
    pub raw: Vec<u8>,
    /// Dot-stuffed for DATA, without the terminating `.CRLF`.
    pub stuffed: Vec<u8>,
}

/// Everything needed to produce the messages of a run.
#[derive(Debug)]
pub struct Corpus {
    dist: SizeDist,
    kind: BodyKind,
    /// `bodies[size index][kind index]` (kind index: plain, alternative, attachment).
    bodies: Vec<[Arc<Body>; 3]>,
    seed: u64,
}

impl Corpus {
    /// Builds the bodies for every size of `dist`.
    pub fn new(dist: SizeDist, kind: BodyKind, seed: u64) -> Self {
        let bodies = dist
            .entries
            .iter()
            .map(|&(size, _)| {
                let target = size.saturating_sub(HEADER_ESTIMATE);
                [
                    Arc::new(prepare(plain_body(target))),
                    Arc::new(prepare(alternative_body(target))),
                    Arc::new(prepare(attachment_body(target, size as u64))),
                ]
            })
            .collect();
        Corpus {
            dist,
            kind,
            bodies,
            seed,
        }
    }

    /// The body of message number `idx` (deterministic per run seed).
    pub fn body_for(&self, idx: u64) -> &Arc<Body> {
        let draw = splitmix64(idx ^ self.seed);
        let size_ix = self.dist.pick(draw);
        let kind_ix = match self.kind {
            BodyKind::Plain => 0,
            BodyKind::Alternative => 1,
            BodyKind::Attachment => 2,
            BodyKind::Mixed => match (draw >> 32) % 10 {
                0..=4 => 0,
                5..=7 => 1,
                _ => 2,
            },
        };
        &self.bodies[size_ix][kind_ix]
    }
}

/// A 64-bit mix (splitmix64 finaliser): spreads consecutive indexes over the draw space.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The envelope-dependent part of one message.
pub struct Headers<'a> {
    /// `From:` address.
    pub from: &'a str,
    /// `To:` addresses (the first few are listed).
    pub to: &'a [String],
    /// The unique id (`X-Sluice-Load-Id`; also the local part of `Message-ID`).
    pub id: &'a str,
    /// Message number within the run.
    pub seq: u64,
    /// RFC 5322 date text.
    pub date: &'a str,
}

/// Appends the header block (through the empty line) to `out`. No header line starts with
/// `.`, so the block needs no dot-stuffing.
pub fn write_headers(out: &mut Vec<u8>, h: &Headers<'_>, body: &Body) {
    let mut s = String::with_capacity(HEADER_ESTIMATE);
    let _ = write!(s, "From: Sluice Load <{}>\r\nTo: ", h.from);
    for (i, t) in h.to.iter().take(3).enumerate() {
        if i > 0 {
            s.push_str(",\r\n ");
        }
        let _ = write!(s, "<{t}>");
    }
    if h.to.len() > 3 {
        let _ = write!(s, ",\r\n undisclosed-recipients-{}:;", h.to.len() - 3);
    }
    if h.to.is_empty() {
        s.push_str("undisclosed-recipients:;");
    }
    let _ = write!(
        s,
        "\r\nSubject: Your order {seq} has shipped (sluice-load)\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}@sluice-load.test>\r\n\
         X-Sluice-Load-Id: {id}\r\n\
         X-Mailer: sluice-load\r\n\
         {mime}\r\n",
        seq = h.seq,
        date = h.date,
        id = h.id,
        mime = body.mime_headers,
    );
    out.extend_from_slice(s.as_bytes());
}

fn prepare((mime_headers, raw): (String, Vec<u8>)) -> Body {
    let mut stuffed = Vec::with_capacity(raw.len() + raw.len() / 64 + 8);
    dot_stuff_into(&raw, &mut stuffed);
    Body {
        mime_headers,
        raw,
        stuffed,
    }
}

/// Text lines of 60-78 characters until `out` has grown by about `budget` bytes. Every
/// 9th line starts with a dot.
fn text_lines(out: &mut String, budget: usize, salt: usize) {
    let end = out.len() + budget;
    let mut n = salt;
    while out.len() + 80 <= end {
        let mut line = String::with_capacity(80);
        if n % 9 == 8 {
            line.push('.');
        }
        let mut w = n;
        let width = 60 + (n * 7) % 19;
        while line.len() < width {
            if !line.is_empty() && !line.ends_with('.') {
                line.push(' ');
            }
            line.push_str(WORDS[w % WORDS.len()]);
            w = w.wrapping_mul(7).wrapping_add(3);
        }
        line.truncate(width);
        let line = line.trim_end();
        out.push_str(line);
        out.push_str("\r\n");
        n += 1;
    }
}

fn dot_lines(out: &mut String) {
    for l in DOT_LINES {
        out.push_str(l);
        out.push_str("\r\n");
    }
}

fn signature(out: &mut String) {
    out.push_str("-- \r\nsent by sluice-load\r\n");
}

fn plain_body(target: usize) -> (String, Vec<u8>) {
    let mut b = String::with_capacity(target + 128);
    b.push_str("Hello,\r\n\r\n");
    dot_lines(&mut b);
    let reserve = 30;
    let budget = target.saturating_sub(b.len() + reserve);
    text_lines(&mut b, budget, 0);
    signature(&mut b);
    (
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\
         Content-Transfer-Encoding: 7bit\r\n"
            .into(),
        b.into_bytes(),
    )
}

const BOUNDARY_ALT: &str = "=_sluice-load-alt-7f3a";
const BOUNDARY_MIX: &str = "=_sluice-load-mix-91c2";

fn alternative_body(target: usize) -> (String, Vec<u8>) {
    let mut b = String::with_capacity(target + 256);
    let overhead = 400;
    let half = target.saturating_sub(overhead) / 2;
    b.push_str("This is a multi-part message in MIME format.\r\n\r\n");
    let _ = write!(
        b,
        "--{BOUNDARY_ALT}\r\nContent-Type: text/plain; charset=us-ascii\r\n\
         Content-Transfer-Encoding: 7bit\r\n\r\n"
    );
    dot_lines(&mut b);
    text_lines(&mut b, half, 1);
    signature(&mut b);
    let _ = write!(
        b,
        "\r\n--{BOUNDARY_ALT}\r\nContent-Type: text/html; charset=us-ascii\r\n\
         Content-Transfer-Encoding: 7bit\r\n\r\n<html><body>\r\n<p>\r\n"
    );
    text_lines(&mut b, half.saturating_sub(40), 2);
    let _ = write!(b, "</p>\r\n</body></html>\r\n\r\n--{BOUNDARY_ALT}--\r\n");
    (
        format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n \
             boundary=\"{BOUNDARY_ALT}\"\r\n"
        ),
        b.into_bytes(),
    )
}

fn attachment_body(target: usize, seed: u64) -> (String, Vec<u8>) {
    let mut b = String::with_capacity(target + 256);
    b.push_str("This is a multi-part message in MIME format.\r\n\r\n");
    let _ = write!(
        b,
        "--{BOUNDARY_MIX}\r\nContent-Type: text/plain; charset=us-ascii\r\n\
         Content-Transfer-Encoding: 7bit\r\n\r\nYour invoice is attached.\r\n\r\n"
    );
    dot_lines(&mut b);
    text_lines(&mut b, (target / 10).min(800), 3);
    signature(&mut b);
    let _ = write!(
        b,
        "\r\n--{BOUNDARY_MIX}\r\nContent-Type: application/pdf; name=\"invoice.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"invoice.pdf\"\r\n\r\n"
    );
    let closing = BOUNDARY_MIX.len() + 10;
    // base64: 4 characters per 3 bytes, lines of 76 characters + CRLF.
    let room = target.saturating_sub(b.len() + closing);
    let raw_len = room * 3 * 76 / (4 * 78);
    let mut data = Vec::with_capacity(raw_len + 8);
    data.extend_from_slice(b"%PDF-1.4\n");
    let mut x = seed | 1;
    while data.len() < raw_len.max(16) {
        x = splitmix64(x);
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(raw_len.max(16));
    base64_lines(&data, &mut b);
    let _ = write!(b, "\r\n--{BOUNDARY_MIX}--\r\n");
    (
        format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n \
             boundary=\"{BOUNDARY_MIX}\"\r\n"
        ),
        b.into_bytes(),
    )
}

/// Standard base64 (RFC 2045) in lines of 76 characters, each ending in CRLF.
fn base64_lines(data: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut col = 0;
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = [
            ALPHABET[(n >> 18) as usize & 63],
            ALPHABET[(n >> 12) as usize & 63],
            if chunk.len() > 1 {
                ALPHABET[(n >> 6) as usize & 63]
            } else {
                b'='
            },
            if chunk.len() > 2 {
                ALPHABET[n as usize & 63]
            } else {
                b'='
            },
        ];
        for c in chars {
            out.push(c as char);
            col += 1;
            if col == 76 {
                out.push_str("\r\n");
                col = 0;
            }
        }
    }
    if col > 0 {
        out.push_str("\r\n");
    }
}

/// Dot-stuffs `raw` (CRLF lines) for DATA: a `.` is added before every line starting with
/// `.`; a final line without CRLF gets one. The terminating `.CRLF` is not added.
pub fn dot_stuff_into(raw: &[u8], out: &mut Vec<u8>) {
    out.reserve(raw.len() + raw.len() / 64 + 8);
    let mut at_line_start = true;
    let mut rest = raw;
    while !rest.is_empty() {
        if at_line_start && rest[0] == b'.' {
            out.push(b'.');
        }
        let line_end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        out.extend_from_slice(&rest[..line_end]);
        at_line_start = rest[line_end - 1] == b'\n';
        rest = &rest[line_end..];
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_ok(b: &[u8]) {
        assert!(b.ends_with(b"\r\n"));
        for line in b.split(|&c| c == b'\n') {
            if line.is_empty() {
                continue;
            }
            assert!(line.ends_with(b"\r"), "bare LF in body");
            assert!(line.len() <= 79, "line too long: {}", line.len());
        }
    }

    #[test]
    fn bodies_have_sane_lines_and_sizes() {
        for size in [600usize, 1000, 2048, 5120, 20_480, 204_800] {
            let c = Corpus::new(SizeDist::fixed(size), BodyKind::Plain, 1);
            for body in &c.bodies[0] {
                lines_ok(&body.raw);
                let total = body.raw.len() + HEADER_ESTIMATE;
                if size >= 5120 {
                    let err = total.abs_diff(size) as f64 / size as f64;
                    assert!(err < 0.05, "size {size} got {total}");
                }
                let text = String::from_utf8(body.raw.clone()).unwrap();
                assert!(text.lines().any(|l| l == "."), "no lone dot line");
            }
        }
    }

    #[test]
    fn whole_message_size_is_close() {
        let c = Corpus::new(SizeDist::fixed(5120), BodyKind::Mixed, 1);
        for idx in 0..20 {
            let body = c.body_for(idx);
            let mut m = Vec::new();
            let to = ["user1@d0.test".to_string()];
            let h = Headers {
                from: "load@sluice-load.test",
                to: &to,
                id: "0123abcd-17",
                seq: idx,
                date: "Tue, 01 Jul 2025 12:00:00 +0000",
            };
            write_headers(&mut m, &h, body);
            m.extend_from_slice(&body.raw);
            assert!(m.len().abs_diff(5120) < 256, "{}", m.len());
            let s = String::from_utf8(m).unwrap();
            assert!(s.contains("\r\nX-Sluice-Load-Id: 0123abcd-17\r\n"));
            assert!(s.contains("\r\nMessage-ID: <0123abcd-17@sluice-load.test>\r\n"));
        }
    }

    #[test]
    fn mixed_uses_every_kind_and_dist_every_size() {
        let dist = SizeDist::parse("2k:50,20k:40,200k:10").unwrap();
        assert_eq!(dist.entries, vec![(2048, 50), (20_480, 40), (204_800, 10)]);
        let c = Corpus::new(dist, BodyKind::Mixed, 9);
        let mut sizes = std::collections::BTreeMap::new();
        let mut kinds = std::collections::BTreeSet::new();
        for idx in 0..2000 {
            let b = c.body_for(idx);
            *sizes.entry(b.raw.len() / 10_000).or_insert(0) += 1;
            kinds.insert(b.mime_headers.clone());
        }
        assert_eq!(kinds.len(), 3);
        let small = sizes[&0];
        assert!((900..1100).contains(&small), "{sizes:?}");
        assert!(SizeDist::parse("").is_err());
        assert!(SizeDist::parse("5k:x").is_err());
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (raw, want) in [
            ("", ""),
            ("f", "Zg==\r\n"),
            ("fo", "Zm8=\r\n"),
            ("foo", "Zm9v\r\n"),
            ("foobar", "Zm9vYmFy\r\n"),
        ] {
            let mut s = String::new();
            base64_lines(raw.as_bytes(), &mut s);
            assert_eq!(s, want);
        }
        let mut s = String::new();
        base64_lines(&[0u8; 114], &mut s);
        assert_eq!(s.lines().map(str::len).collect::<Vec<_>>(), vec![76, 76]);
    }

    #[test]
    fn stuffing_table() {
        for (raw, want) in [
            (&b"a\r\n"[..], &b"a\r\n"[..]),
            (b".\r\n", b"..\r\n"),
            (b"x\r\n.y\r\n..\r\n", b"x\r\n..y\r\n...\r\n"),
            (b"no newline", b"no newline\r\n"),
            (b"a.b\r\n", b"a.b\r\n"),
            (b".", b"..\r\n"),
        ] {
            let mut out = Vec::new();
            dot_stuff_into(raw, &mut out);
            assert_eq!(out, want, "{:?}", String::from_utf8_lossy(raw));
        }
    }
}
