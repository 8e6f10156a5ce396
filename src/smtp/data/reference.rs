//! The reference DATA/BDAT body decoder: one byte at a time, as plain as it
//! can be written, so that it can serve as the executable specification the
//! fast [`DataScanner`](super::DataScanner) is tested and fuzzed against.
//!
//! It deliberately shares no code with the scanner: a bug copied into both
//! would make the differential tests useless.

use super::{DataError, DataLimits, LineEndingPolicy};

/// Which framing the body uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// DATA: dot-stuffed, ended by CRLF.CRLF.
    Dot,
    /// BDAT: no stuffing, no terminator; the whole input is the body.
    Raw,
}

/// What the reference decoder made of an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Dot mode: bytes consumed up to and including the terminator, or `None`
    /// if no terminator was seen. Raw mode: always `Some(input.len())`.
    pub consumed: Option<usize>,
    /// The stored body (meaningful only when `error` is `None`).
    pub body: Vec<u8>,
    /// The first violation in stream order.
    pub error: Option<DataError>,
    /// Stored octets, counted even after an error.
    pub size: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Right after CRLF (or at the start of the body), dot mode only.
    LineStart,
    /// Inside a line.
    Mid,
    /// A CR was seen; the next byte decides whether it was bare.
    Cr,
    /// A dot at a line start was seen (and will be dropped unless it is the terminator).
    Dot,
    /// `.` CR at a line start was seen.
    DotCr,
}

struct Decoder<'a> {
    limits: &'a DataLimits,
    body: Vec<u8>,
    error: Option<DataError>,
    size: u64,
    line_len: usize,
}

impl Decoder<'_> {
    fn flag(&mut self, e: DataError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    fn check_size(&mut self) {
        if let Some(max) = self.limits.max_size {
            if self.size > max {
                self.flag(DataError::TooBig);
            }
        }
    }

    /// One stored content octet: line length first, then size.
    fn emit(&mut self, b: u8) {
        self.size += 1;
        self.line_len += 1;
        if self.line_len > self.limits.max_line_length {
            self.flag(DataError::LineTooLong);
        }
        self.check_size();
        if self.error.is_none() {
            self.body.push(b);
        }
    }

    fn emit_crlf(&mut self) {
        self.line_len = 0;
        self.size += 2;
        self.check_size();
        if self.error.is_none() {
            self.body.extend_from_slice(b"\r\n");
        }
    }

    /// A bare CR or LF: flagged under `Reject`, then stored as CRLF either way
    /// (under `Reject` nothing is stored any more, but the size still counts it).
    fn bare(&mut self) {
        if self.limits.line_endings == LineEndingPolicy::Reject {
            self.flag(DataError::BareLineEnding);
        }
        self.emit_crlf();
    }

    /// Processes `b` in the middle of a line; returns the next state.
    fn mid(&mut self, b: u8) -> State {
        match b {
            b'\r' => State::Cr,
            b'\n' => {
                self.bare();
                State::Mid
            }
            _ => {
                self.emit(b);
                State::Mid
            }
        }
    }
}

/// Decodes a whole input at once (raw mode includes the end-of-body step:
/// a trailing CR is bare and a non-empty body gets a final CRLF).
pub fn decode(mode: Mode, limits: &DataLimits, input: &[u8]) -> Reference {
    let mut d = Decoder {
        limits,
        body: Vec::new(),
        error: None,
        size: 0,
        line_len: 0,
    };
    let after_crlf = match mode {
        Mode::Dot => State::LineStart,
        Mode::Raw => State::Mid,
    };
    let mut state = after_crlf;
    let mut consumed = None;
    for (i, &b) in input.iter().enumerate() {
        state = match state {
            State::LineStart if b == b'.' => State::Dot,
            State::LineStart | State::Mid => d.mid(b),
            State::Cr if b == b'\n' => {
                d.emit_crlf();
                after_crlf
            }
            State::Cr => {
                d.bare();
                d.mid(b)
            }
            State::Dot if b == b'\r' => State::DotCr,
            // The stuffed dot is dropped; the byte after it is not at a line start.
            State::Dot => d.mid(b),
            State::DotCr if b == b'\n' => {
                consumed = Some(i + 1);
                break;
            }
            State::DotCr => {
                d.bare();
                d.mid(b)
            }
        };
    }
    if mode == Mode::Raw {
        if state == State::Cr {
            d.bare();
        }
        if d.line_len > 0 {
            d.emit_crlf();
        }
        consumed = Some(input.len());
    }
    Reference {
        consumed,
        body: d.body,
        error: d.error,
        size: d.size,
    }
}
