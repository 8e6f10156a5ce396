//! The message body on its way out: dot-stuffed for DATA (RFC 5321 §4.5.2)
//! or framed in BDAT chunks (RFC 3030), emitted in bounded pieces straight
//! from the shared body buffer, so a big message is copied once (into the
//! driver's write buffer) and never held twice.

use std::sync::OnceLock;

use bytes::Bytes;
use memchr::memmem::Finder;

/// `"\n."`: every dot at the start of a line follows an LF. The body is
/// CRLF-only (the spool guarantees it), so this finds exactly the `CRLF "."`
/// sequences that need stuffing; searching for the LF alone makes a stray
/// bare LF followed by a dot stuffed too, so even a malformed body can never
/// carry a `<LF>.<CRLF>` that a lenient server might take for the end of data
/// (SMTP smuggling).
fn line_dot_finder() -> &'static Finder<'static> {
    static FINDER: OnceLock<Finder<'static>> = OnceLock::new();
    FINDER.get_or_init(|| Finder::new(b"\n."))
}

/// Index of the first dot at the start of a line at or after `from`.
fn find_line_dot(body: &[u8], from: usize) -> Option<usize> {
    if from == 0 && body.first() == Some(&b'.') {
        return Some(0);
    }
    // A "\n." whose dot is at `from` or later has its LF at `from - 1` or later.
    let start = from.saturating_sub(1);
    line_dot_finder()
        .find(&body[start..])
        .map(|p| start + p + 1)
}

/// How a body is framed.
#[derive(Debug)]
enum Framing {
    /// DATA: dot-stuffing, then `CRLF.CRLF`.
    Dot {
        /// The next line-start dot at or after `pos` that still needs its
        /// extra dot (found lazily, once: the searches never overlap).
        next_dot: Option<usize>,
    },
    /// BDAT chunks.
    Bdat {
        chunk_size: usize,
        /// Wait for each chunk's reply before sending the next (no PIPELINING).
        lock_step: bool,
        /// Inside a chunk whose command is out: its data ends here.
        chunk_end: Option<usize>,
        /// The chunk being sent is the LAST one.
        last: bool,
        /// Lock-step: waiting for the previous chunk's reply.
        paused: bool,
        /// Chunks whose data has been emitted completely.
        chunks_emitted: usize,
    },
}

/// A body being emitted.
#[derive(Debug)]
pub(super) struct BodyStream {
    body: Bytes,
    pos: usize,
    finished: bool,
    framing: Framing,
}

impl BodyStream {
    /// DATA framing.
    pub(super) fn dot(body: Bytes) -> Self {
        let next_dot = find_line_dot(&body, 0);
        Self {
            body,
            pos: 0,
            finished: false,
            framing: Framing::Dot { next_dot },
        }
    }

    /// BDAT framing in chunks of `chunk_size` octets (at least 1).
    pub(super) fn bdat(body: Bytes, chunk_size: usize, lock_step: bool) -> Self {
        Self {
            body,
            pos: 0,
            finished: false,
            framing: Framing::Bdat {
                chunk_size: chunk_size.max(1),
                lock_step,
                chunk_end: None,
                last: false,
                paused: false,
                chunks_emitted: 0,
            },
        }
    }

    /// How many BDAT chunks a body of `len` octets takes: an empty body is
    /// still one (`BDAT 0 LAST`).
    pub(super) fn bdat_chunks(len: usize, chunk_size: usize) -> usize {
        len.div_ceil(chunk_size.max(1)).max(1)
    }

    /// Everything, terminator or last chunk included, has been emitted.
    pub(super) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Something can be emitted now.
    pub(super) fn has_output(&self) -> bool {
        !self.finished && !matches!(self.framing, Framing::Bdat { paused: true, .. })
    }

    /// BDAT chunks completely emitted (0 for DATA framing).
    pub(super) fn chunks_emitted(&self) -> usize {
        match self.framing {
            Framing::Bdat { chunks_emitted, .. } => chunks_emitted,
            Framing::Dot { .. } => 0,
        }
    }

    /// Lock-step BDAT: the previous chunk was accepted, go on.
    pub(super) fn resume(&mut self) {
        if let Framing::Bdat { paused, .. } = &mut self.framing {
            *paused = false;
        }
    }

    /// Appends up to about `budget` body octets (framing excluded) to `out`.
    /// Returns whether anything was appended.
    pub(super) fn emit(&mut self, out: &mut Vec<u8>, budget: usize) -> bool {
        let before = out.len();
        let mut budget = budget.max(1);
        let body: &[u8] = &self.body;
        let len = body.len();
        match &mut self.framing {
            Framing::Dot { next_dot } => {
                while !self.finished {
                    if self.pos == len {
                        // RFC 5321 §4.1.1.4: the data ends with CRLF "." CRLF;
                        // a body not ending in CRLF gets one (an empty body
                        // is just the dot line).
                        let tail: &[u8] = if len == 0 || body.ends_with(b"\r\n") {
                            b".\r\n"
                        } else {
                            b"\r\n.\r\n"
                        };
                        out.extend_from_slice(tail);
                        self.finished = true;
                        break;
                    }
                    if budget == 0 {
                        break;
                    }
                    if *next_dot == Some(self.pos) {
                        // Stuff: an extra dot; the original one follows as
                        // the first octet of the next run.
                        out.push(b'.');
                        budget -= 1;
                        *next_dot = find_line_dot(body, self.pos + 1);
                        continue;
                    }
                    let end = next_dot.unwrap_or(len).min(self.pos + budget);
                    out.extend_from_slice(&body[self.pos..end]);
                    budget -= end - self.pos;
                    self.pos = end;
                }
            }
            Framing::Bdat {
                chunk_size,
                lock_step,
                chunk_end,
                last,
                paused,
                chunks_emitted,
            } => {
                while !self.finished && !*paused {
                    let end = match *chunk_end {
                        Some(end) => end,
                        None => {
                            let n = (*chunk_size).min(len - self.pos);
                            *last = self.pos + n == len;
                            out.extend_from_slice(b"BDAT ");
                            out.extend_from_slice(n.to_string().as_bytes());
                            out.extend_from_slice(if *last { b" LAST\r\n" } else { b"\r\n" });
                            *chunk_end = Some(self.pos + n);
                            self.pos + n
                        }
                    };
                    let upto = end.min(self.pos + budget);
                    out.extend_from_slice(&body[self.pos..upto]);
                    budget -= upto - self.pos;
                    self.pos = upto;
                    if self.pos == end {
                        *chunk_end = None;
                        *chunks_emitted += 1;
                        if *last {
                            self.finished = true;
                        } else if *lock_step {
                            *paused = true;
                        }
                    }
                    if budget == 0 {
                        break;
                    }
                }
            }
        }
        out.len() > before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything a stream emits with a given budget per call.
    fn drain(mut s: BodyStream, budget: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut calls = 0;
        while s.has_output() {
            assert!(s.emit(&mut out, budget), "progress on every call");
            calls += 1;
            assert!(calls < 1_000_000);
            if let Framing::Bdat { paused: true, .. } = s.framing {
                s.resume();
            }
        }
        assert!(s.is_finished());
        out
    }

    /// Reference dot-stuffing, one line at a time.
    fn reference_stuff(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at_line_start = true;
        for &b in body {
            if at_line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            at_line_start = b == b'\n';
        }
        if body.is_empty() || body.ends_with(b"\r\n") {
            out.extend_from_slice(b".\r\n");
        } else {
            out.extend_from_slice(b"\r\n.\r\n");
        }
        out
    }

    #[test]
    fn dot_stuffing_table() {
        let table: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b".a\r\n.b\r\n", b"..a\r\n..b\r\n.\r\n"),
            (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n..\r\n", b"a\r\n...\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
            (b"\r\n.", b"\r\n..\r\n.\r\n"),
            // A stray bare LF followed by a dot is stuffed too.
            (b"a\n.\r\n", b"a\n..\r\n.\r\n"),
        ];
        for &(body, want) in table {
            for budget in [1, 2, 3, 7, 1 << 20] {
                let got = drain(BodyStream::dot(Bytes::copy_from_slice(body)), budget);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(want),
                    "body {:?} budget {budget}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn dot_stuffing_matches_reference_on_generated_bodies() {
        // Deterministic pseudo-random bodies dense in dots and line breaks.
        let mut seed = 0x1234_5678_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..300 {
            let len = (next() % 200) as usize;
            let body: Vec<u8> = (0..len)
                .map(|_| match next() % 5 {
                    0 => b'.',
                    1 => b'\r',
                    2 => b'\n',
                    _ => b'x',
                })
                .collect();
            let budget = 1 + (next() % 17) as usize;
            let got = drain(BodyStream::dot(Bytes::from(body.clone())), budget);
            assert_eq!(got, reference_stuff(&body), "{body:?}");
        }
    }

    #[test]
    fn dot_budget_bounds_each_call() {
        let body = Bytes::from(vec![b'x'; 10_000]);
        let mut s = BodyStream::dot(body);
        let mut out = Vec::new();
        s.emit(&mut out, 4096);
        assert_eq!(out.len(), 4096);
        s.emit(&mut out, 4096);
        s.emit(&mut out, 4096);
        assert_eq!(out.len(), 10_000 + 5, "rest plus CRLF.CRLF");
        assert!(s.is_finished());
    }

    #[test]
    fn bdat_framing() {
        let cases: &[(&[u8], usize, &[u8])] = &[
            (b"", 4, b"BDAT 0 LAST\r\n"),
            (b"abc", 4, b"BDAT 3 LAST\r\nabc"),
            (b"abcd", 4, b"BDAT 4 LAST\r\nabcd"),
            (b"abcdefgh", 4, b"BDAT 4\r\nabcdBDAT 4 LAST\r\nefgh"),
            (
                b"abcdefghi",
                4,
                b"BDAT 4\r\nabcdBDAT 4\r\nefghBDAT 1 LAST\r\ni",
            ),
            // No stuffing with BDAT.
            (b".\r\n", 10, b"BDAT 3 LAST\r\n.\r\n"),
        ];
        for &(body, chunk, want) in cases {
            assert_eq!(
                BodyStream::bdat_chunks(body.len(), chunk),
                want.windows(4).filter(|w| w == b"BDAT").count()
            );
            for lock_step in [false, true] {
                for budget in [1, 3, 100] {
                    let s = BodyStream::bdat(Bytes::copy_from_slice(body), chunk, lock_step);
                    assert_eq!(
                        String::from_utf8_lossy(&drain(s, budget)),
                        String::from_utf8_lossy(want)
                    );
                }
            }
        }
    }

    #[test]
    fn bdat_lock_step_pauses_after_each_chunk() {
        let mut s = BodyStream::bdat(Bytes::from_static(b"abcdefghi"), 4, true);
        let mut out = Vec::new();
        assert!(s.emit(&mut out, 100));
        assert_eq!(out, b"BDAT 4\r\nabcd");
        assert!(!s.has_output());
        assert!(!s.emit(&mut out, 100));
        assert_eq!(s.chunks_emitted(), 1);
        s.resume();
        s.emit(&mut out, 100);
        s.resume();
        s.emit(&mut out, 100);
        assert!(s.is_finished());
        assert_eq!(s.chunks_emitted(), 3);
    }
}
