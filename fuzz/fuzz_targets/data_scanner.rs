//! Differential fuzzing of the DATA/BDAT scanner against the byte-at-a-time
//! reference decoder (`sluice::smtp::data::reference`).
//!
//! The first bytes pick the mode (DATA or BDAT), the limits (line length,
//! size, bare CR/LF policy) and up to eight chunk boundaries; the rest is the
//! body. The scanner is fed the body in those chunks, the reference the whole
//! body at once, and every observable must agree: bytes consumed (where the
//! terminator ends), the stored body, the first violation and the size count.
//! On top of the equality, nothing with a bare CR or LF may reach the sink,
//! nor more than `max_size` octets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::smtp::data::reference::{self, Mode, Reference};
use sluice::smtp::data::{DataLimits, DataScanner, LineEndingPolicy};

const HEADER: usize = 12;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let (ctl, body) = data.split_at(HEADER);
    let mode = if ctl[0] & 1 == 0 {
        Mode::Dot
    } else {
        Mode::Raw
    };
    let line_endings = if ctl[0] & 2 == 0 {
        LineEndingPolicy::Normalize
    } else {
        LineEndingPolicy::Reject
    };
    // Small limits make violations (and their ordering) common; 998 is the default.
    let max_line_length = match ctl[1] >> 6 {
        0 => 998,
        _ => usize::from(ctl[1] & 0x3f),
    };
    let max_size = match ctl[2] >> 6 {
        0 => None,
        1 => Some(u64::from(ctl[3])),
        2 => Some(u64::from(ctl[2] & 0x3f) * 256 + u64::from(ctl[3])),
        _ => Some(body.len() as u64 + u64::from(ctl[3] & 7)),
    };
    let limits = DataLimits {
        max_line_length,
        max_size,
        line_endings,
    };
    // Chunk boundaries: up to eight, anywhere in the body (ctl[4] says how many).
    let mut cuts: Vec<usize> = ctl[5..HEADER]
        .iter()
        .chain(std::iter::once(&ctl[4]))
        .take(usize::from(ctl[4] % 9))
        .map(|&c| {
            if body.is_empty() {
                0
            } else {
                usize::from(c) * 131 % (body.len() + 1)
            }
        })
        .collect();
    cuts.sort_unstable();

    let want = reference::decode(mode, &limits, body);

    let mut s = match mode {
        Mode::Dot => DataScanner::dot(limits),
        Mode::Raw => DataScanner::raw(limits),
    };
    let mut sink = Vec::new();
    let mut consumed = 0;
    let mut last = 0;
    for end in cuts.into_iter().chain(std::iter::once(body.len())) {
        let chunk = &body[last..end];
        last = end;
        let n = s.feed(chunk, &mut sink);
        assert!(n <= chunk.len());
        consumed += n;
        if s.is_finished() {
            break;
        }
        assert_eq!(n, chunk.len(), "stopped early without the terminator");
    }
    let finished = mode == Mode::Raw || s.is_finished();
    if finished {
        let r = s.finish(&mut sink);
        assert_eq!(r.err(), s.error());
    }
    for (i, &b) in sink.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(sink.get(i + 1), Some(&b'\n'), "bare CR stored at {i}");
        }
        if b == b'\n' {
            assert!(i > 0 && sink[i - 1] == b'\r', "bare LF stored at {i}");
        }
    }
    if let Some(max) = max_size {
        assert!(sink.len() as u64 <= max, "sink grew past max_size");
    }
    let got = Reference {
        consumed: finished.then_some(consumed),
        body: sink,
        error: s.error(),
        size: s.size(),
    };
    assert_eq!(got, want);
});
