//! Differential fuzzing of the DATA/BDAT scanner against the byte-at-a-time
//! reference decoder (`sluice::smtp::data::reference`).
//!
//! The first bytes pick the mode (DATA or BDAT), the limits (line length,
//! size, bare CR/LF policy) and up to eight chunk boundaries; the rest is the
//! body. The scanner is fed the body in those chunks, the reference the whole
//! body at once, and every observable must agree: bytes consumed (where the
//! terminator ends), the stored body, the first violation and the size count.
//! This holds for every block kernel the CPU has (AVX2, SSE2, portable) and
//! for both ways of storing (fused into a `Vec`, or `extend_body`).
//! On top of the equality, nothing with a bare CR or LF may reach the sink,
//! nor more than `max_size` octets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::smtp::data::reference::{self, Mode, Reference};
use sluice::smtp::data::{BodySink, DataLimits, DataScanner, Kernel, LineEndingPolicy};

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
    // Every block kernel this CPU has, with a `Vec` sink (the fused copy)
    // and with a sink that is not a `Vec` (scan, then `extend_body`).
    for kernel in Kernel::available() {
        let got = run(mode, limits, kernel, body, &cuts, &mut Vec::new());
        assert_eq!(got, want, "kernel {} (Vec sink)", kernel.name());
        let got = run(mode, limits, kernel, body, &cuts, &mut Opaque(Vec::new()));
        assert_eq!(got, want, "kernel {} (opaque sink)", kernel.name());
    }
});

/// A sink that is not a `Vec`.
struct Opaque(Vec<u8>);

impl BodySink for Opaque {
    fn extend_body(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

trait Bytes: BodySink {
    fn bytes(&mut self) -> Vec<u8>;
}

impl Bytes for Vec<u8> {
    fn bytes(&mut self) -> Vec<u8> {
        std::mem::take(self)
    }
}

impl Bytes for Opaque {
    fn bytes(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

fn run<S: Bytes>(
    mode: Mode,
    limits: DataLimits,
    kernel: Kernel,
    body: &[u8],
    cuts: &[usize],
    sink: &mut S,
) -> Reference {
    let s = match mode {
        Mode::Dot => DataScanner::dot(limits),
        Mode::Raw => DataScanner::raw(limits),
    };
    let mut s = s.with_kernel(kernel);
    let mut consumed = 0;
    let mut last = 0;
    for &end in cuts.iter().chain(std::iter::once(&body.len())) {
        let chunk = &body[last..end];
        last = end;
        let n = s.feed(chunk, sink);
        assert!(n <= chunk.len());
        consumed += n;
        if s.is_finished() {
            break;
        }
        assert_eq!(n, chunk.len(), "stopped early without the terminator");
    }
    let finished = mode == Mode::Raw || s.is_finished();
    if finished {
        let r = s.finish(sink);
        assert_eq!(r.err(), s.error());
    }
    let stored = sink.bytes();
    for (i, &b) in stored.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(stored.get(i + 1), Some(&b'\n'), "bare CR stored at {i}");
        }
        if b == b'\n' {
            assert!(i > 0 && stored[i - 1] == b'\r', "bare LF stored at {i}");
        }
    }
    if let Some(max) = limits.max_size {
        assert!(stored.len() as u64 <= max, "sink grew past max_size");
    }
    Reference {
        consumed: finished.then_some(consumed),
        body: stored,
        error: s.error(),
        size: s.size(),
    }
}
