//! The scanner's block kernel: the one module of the crate that uses `unsafe`.
//!
//! The kernel walks a body 64 bytes at a time and proves each block *plain*:
//! for every position `p` in the block (looking at the byte after it too),
//! - `src[p] == CR` exactly when `src[p + 1] == LF` (no bare CR, no bare LF),
//! - in DATA mode, no `LF` at `p` is followed by a `.` at `p + 1`,
//! - no line ending in the block, nor the one still open after it, is longer
//!   than the limit.
//!
//! When the scanner's sink is a `Vec`, each block is stored into the vector's
//! spare capacity from the registers it was loaded into for the test (the
//! "fused" copy): a clean body costs one load and one store per byte, instead
//! of a scan followed by a `memcpy` that reads everything again. A
//! line-start dot that is a plain stuffed dot (followed by neither CR nor LF)
//! is removed right here in fused mode (the stores simply continue one byte
//! further back), so dot-stuffed bodies stay on this path. Everything else
//! that is not plain (bare CR/LF, the terminator, a line over the limit)
//! stops the kernel and the scanner's exact paths take over.
//!
//! Two loops share the work (see `drive`): a group loop that tests four
//! blocks with one verdict and bounds line lengths from above, and an exact
//! block loop for whatever the group loop cannot decide.
//!
//! Implementations, picked once at run time (`is_x86_feature_detected!`,
//! cached in a `OnceLock`): AVX2, SSE2 (baseline on x86_64) and a portable
//! SWAR one on `u64` words for other targets. They share the driver and give
//! identical results; the tests run all of them against each other, against
//! a byte-at-a-time definition, and (through the scanner) against the
//! reference decoder. AVX-512BW was measured and left out: on this Zen 4 its
//! group loop ran at 34 GB/s against 36 GB/s for AVX2 (512-bit operations are
//! double-pumped there and every 64-byte load at an odd offset splits a cache
//! line), and it would have raised the MSRV to 1.89.
//!
//! Why `unsafe`, and how it is kept small: calling a `#[target_feature]`
//! function after the run-time check, unaligned SIMD loads and stores
//! through raw pointers, and `Vec::set_len` after the kernel wrote the spare
//! capacity. Every load is within a slice whose length the driver checked
//! first, every store within the capacity reserved for it (the driver never
//! writes past `src.len() - 1` bytes from its start), and a [`Kernel`] can
//! only be obtained through detection, so no kernel runs on a CPU without its
//! features. The public face is the safe [`scan_blocks`].
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::OnceLock;

/// Bytes a block covers.
pub(crate) const BLOCK: usize = 64;
/// Bytes a block test reads: the block and the byte after it.
pub(crate) const WINDOW: usize = BLOCK + 1;
/// Bytes the group loop tests at once (it reads one more).
const GROUP: usize = 4 * BLOCK;

/// A block kernel this CPU can run. Only obtainable through detection
/// ([`Kernel::best`], [`Kernel::available`]), which is what makes running
/// its `#[target_feature]` code sound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel(Imp);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Imp {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Sse2,
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU supports (detected once per process).
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| Kernel::available()[0])
    }

    /// Every kernel this CPU can run, fastest first (the portable one last).
    pub fn available() -> Vec<Kernel> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                v.push(Kernel(Imp::Avx2));
            }
            // SSE2 is part of the x86_64 baseline.
            v.push(Kernel(Imp::Sse2));
        }
        v.push(Kernel(Imp::Portable));
        v
    }

    /// A short name for reports and test messages.
    pub fn name(self) -> &'static str {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Imp::Sse2 => "sse2",
            Imp::Portable => "portable",
        }
    }
}

/// How far a kernel run got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Input bytes consumed. Never ends on a CR (whether it is bare depends
    /// on the byte after it), so the byte before `read` is an LF, a content
    /// byte or a removed stuffed dot.
    pub read: usize,
    /// Body bytes produced (`read` minus the stuffed dots removed).
    pub written: usize,
    /// Stored octets of the line still open at `read`.
    pub open: usize,
}

/// Runs the kernel over `src` from its start, which must be a content byte
/// (not CR, not LF) in the middle of a line, or at a line start but not a
/// dot, with `open` stored octets of the current line before it. Consumes
/// plain blocks while every line stays within `max_line` stored octets
/// (which must be at least [`BLOCK`]); stops before the first block that is
/// not plain or when fewer than [`WINDOW`] bytes are left.
///
/// With `out`, the consumed body is appended to it (in dot mode with plain
/// stuffed dots removed); without, the caller stores `src[..read]` itself
/// (then no dot is removed and `written == read`).
pub(crate) fn scan_blocks(
    kernel: Kernel,
    dot: bool,
    src: &[u8],
    open: usize,
    max_line: usize,
    out: Option<&mut Vec<u8>>,
) -> Progress {
    assert!(
        max_line >= BLOCK,
        "the kernel needs lines of at least a block"
    );
    // A line is fine while `open + position of its LF <= limit` (the CR
    // before the LF is not stored).
    let limit = max_line.saturating_add(1);
    if src.len() < WINDOW {
        return Progress {
            read: 0,
            written: 0,
            open,
        };
    }
    let p = match out {
        Some(vec) => {
            vec.reserve(src.len());
            let len = vec.len();
            let spare = vec.spare_capacity_mut();
            assert!(spare.len() >= src.len());
            let dst = spare.as_mut_ptr().cast::<u8>();
            // SAFETY: `dst` is valid for writes of `src.len()` bytes (the
            // spare capacity, checked above), which is what `dispatch` needs.
            let p = unsafe { dispatch::<true>(kernel, dot, src, dst, open, limit) };
            let p = trim_cr(src, p);
            // SAFETY: `drive` initialised `dst[..p.written]` (its invariant;
            // trimming only shrinks it) and `p.written <= src.len() <=
            // spare.len()`, so `len + p.written` is within the capacity.
            unsafe { vec.set_len(len + p.written) };
            p
        }
        None => {
            // SAFETY: with STORE = false nothing is written through `dst`.
            let p =
                unsafe { dispatch::<false>(kernel, dot, src, std::ptr::null_mut(), open, limit) };
            trim_cr(src, p)
        }
    };
    debug_assert!(p.written <= p.read && p.read <= src.len());
    p
}

/// Gives back a final CR: whether it is bare depends on the byte after it,
/// which the caller's state machine looks at.
#[inline]
fn trim_cr(src: &[u8], mut p: Progress) -> Progress {
    if p.read > 0 && src[p.read - 1] == b'\r' {
        p.read -= 1;
        p.written -= 1;
        p.open -= 1;
    }
    p
}

/// Picks the implementation.
///
/// # Safety
/// With `STORE`, `dst` must be valid for writes of `src.len()` bytes.
#[inline]
unsafe fn dispatch<const STORE: bool>(
    kernel: Kernel,
    dot: bool,
    src: &[u8],
    dst: *mut u8,
    open: usize,
    limit: usize,
) -> Progress {
    // SAFETY (every arm): the caller's guarantee on `dst` is `drive`'s; a
    // `Kernel` other than `Portable` exists only if detection found its
    // features on this CPU (`Kernel::available`).
    unsafe {
        match (kernel.0, dot) {
            #[cfg(target_arch = "x86_64")]
            (Imp::Avx2, true) => x86::avx2::<true, STORE>(src, dst, open, limit),
            #[cfg(target_arch = "x86_64")]
            (Imp::Avx2, false) => x86::avx2::<false, STORE>(src, dst, open, limit),
            #[cfg(target_arch = "x86_64")]
            (Imp::Sse2, true) => drive::<x86::Sse2, true, STORE>(src, dst, open, limit),
            #[cfg(target_arch = "x86_64")]
            (Imp::Sse2, false) => drive::<x86::Sse2, false, STORE>(src, dst, open, limit),
            (Imp::Portable, true) => drive::<Swar, true, STORE>(src, dst, open, limit),
            (Imp::Portable, false) => drive::<Swar, false, STORE>(src, dst, open, limit),
        }
    }
}

/// Bit `i` set when byte `i` of the block is CR / LF / `.`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Masks {
    cr: u64,
    lf: u64,
    dot: u64,
}

/// What the group loop needs to know about four blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Summary {
    /// Some position is not plain (bare CR/LF; in dot mode an LF then a dot).
    bad: bool,
    /// The LF positions of the last block (enough to bound line lengths;
    /// see `drive`).
    last_lf: u64,
}

/// One implementation: how to test (and copy) a block and a group.
trait Lanes {
    /// Loads a block once, stores it (STORE) and compares it.
    ///
    /// # Safety
    /// `src` readable for [`BLOCK`] bytes; with STORE, `dst` writable for
    /// [`BLOCK`] bytes; the CPU has the implementation's features.
    unsafe fn block<const STORE: bool>(src: *const u8, dst: *mut u8) -> Masks;

    /// Four blocks with one verdict; by default from [`Lanes::block`].
    ///
    /// # Safety
    /// `src` readable for [`GROUP`] + 1 bytes; with STORE, `dst` writable for
    /// [`GROUP`] bytes; the CPU has the implementation's features.
    #[inline(always)]
    unsafe fn group<const DOT: bool, const STORE: bool>(src: *const u8, dst: *mut u8) -> Summary {
        // SAFETY: the caller's guarantees cover the four blocks and the byte
        // after them.
        let (m, next) = unsafe {
            let out = |k: usize| if STORE { dst.add(k * BLOCK) } else { dst };
            (
                [
                    Self::block::<STORE>(src, out(0)),
                    Self::block::<STORE>(src.add(BLOCK), out(1)),
                    Self::block::<STORE>(src.add(2 * BLOCK), out(2)),
                    Self::block::<STORE>(src.add(3 * BLOCK), out(3)),
                ],
                *src.add(GROUP),
            )
        };
        let mut bad = 0;
        for k in 0..4 {
            let (next_lf, next_dot) = if k < 3 {
                (m[k + 1].lf & 1, m[k + 1].dot & 1)
            } else {
                (u64::from(next == b'\n'), u64::from(next == b'.'))
            };
            bad |= m[k].cr ^ ((m[k].lf >> 1) | (next_lf << 63));
            if DOT {
                bad |= m[k].lf & ((m[k].dot >> 1) | (next_dot << 63));
            }
        }
        Summary {
            bad: bad != 0,
            last_lf: m[3].lf,
        }
    }

    /// The LF positions of four blocks (nothing stored).
    ///
    /// # Safety
    /// `src` readable for [`GROUP`] bytes; the CPU has the implementation's
    /// features.
    #[inline(always)]
    unsafe fn lf_masks(src: *const u8) -> [u64; 4] {
        let mut lf = [0; 4];
        for (k, bits) in lf.iter_mut().enumerate() {
            // SAFETY: block k is within the GROUP readable bytes.
            *bits = unsafe { Self::block::<false>(src.add(k * BLOCK), std::ptr::null_mut()) }.lf;
        }
        lf
    }
}

/// The driver loop every implementation shares (inlined into each one's
/// `#[target_feature]` entry point, so the lane code is compiled for it).
///
/// The group loop takes four blocks with one verdict and tracks the open
/// line's length only from above: it knows the exact length at a *mark*
/// (after the last LF of a group's last block, or where the block loop left
/// off) and bounds it by `mark_open + (read - mark)`. While that bound plus a
/// group stays within the limit, no line touching the group can be too long
/// (a line wholly inside a group is shorter than the limit, which the group
/// loop requires to exceed a group). The block loop is exact (first and last
/// LF of each block); it takes over, for four blocks, whenever the group loop
/// cannot decide, after recovering the exact length by looking back from
/// `read` for an LF after the mark. It also removes plain stuffed dots.
///
/// Invariant: `dst[..written]` is initialised and `written <= read`; every
/// store covers `dst[written..written + n]` with `read + n < src.len()`, so
/// nothing is written at or beyond `src.len() - 1`.
///
/// # Safety
/// With STORE, `dst` valid for writes of `src.len()` bytes; the CPU has `L`'s
/// features.
#[inline(always)]
unsafe fn drive<L: Lanes, const DOT: bool, const STORE: bool>(
    src: &[u8],
    dst: *mut u8,
    open: usize,
    limit: usize,
) -> Progress {
    let mut read = 0;
    let mut written = 0;
    // The open line has `mark_open` stored octets at `mark`, plus the bytes
    // since unless an LF came after the mark.
    let mut mark: usize = 0;
    let mut mark_open = open;
    // The group path needs every line wholly inside a group to fit, and the
    // bound to leave room for a group after a mark (at most a block before
    // the end of a group).
    let groups = limit > GROUP + BLOCK;
    // A group at `read` needs `read < fast_cap` (GROUP + 1 bytes), and the
    // bound `mark_open + (read - mark) + GROUP + 1 <= limit`, that is
    // `read - mark + mark_open < slack`.
    let fast_cap = src.len().saturating_sub(GROUP);
    let slack = limit.saturating_sub(GROUP);
    'outer: loop {
        if groups {
            // The fast path: four blocks, one verdict, line lengths bounded.
            // (The loop is kept lean: one compare decides whether it may
            // take the next group.)
            let lag = read - written;
            let mut fast_end = match slack.checked_sub(mark_open) {
                Some(room) => fast_cap.min(mark.saturating_add(room)),
                None => 0,
            };
            while read < fast_end {
                // SAFETY: `read < fast_cap`, so GROUP + 1 bytes readable at
                // `src + read`; `read - lag` is `written <= read`, so GROUP
                // bytes writable there (the caller's guarantee); features:
                // the caller's.
                let g = unsafe {
                    let out = if STORE { dst.add(read - lag) } else { dst };
                    L::group::<DOT, STORE>(src.as_ptr().add(read), out)
                };
                if g.bad {
                    break;
                }
                read += GROUP;
                if g.last_lf != 0 {
                    mark = read;
                    mark_open = g.last_lf.leading_zeros() as usize;
                    // `slack > BLOCK > mark_open` (`groups`).
                    fast_end = fast_cap.min(read.saturating_add(slack - mark_open));
                }
            }
            written = read - lag;
        }
        // A long line is open: one group, decided from all of its LFs (and
        // the exact length of the open line if the bound is not good
        // enough). Kept out of the loop above so that loop stays lean; the
        // LFs are found before the group is stored (see the note on
        // `compiler_fence` in `x86`).
        let bound = mark_open.saturating_add(read - mark);
        if groups && read < fast_cap && bound.saturating_add(GROUP + 1) > limit {
            // SAFETY: GROUP + 1 bytes readable at `src + read` (checked just
            // above); features: the caller's.
            let lf = unsafe { L::lf_masks(src[read..].as_ptr()) };
            let first = first_lf(lf);
            if bound.saturating_add(first) <= limit
                || exact_open(src, mark, mark_open, read).saturating_add(first) <= limit
            {
                // SAFETY: as for the fast path.
                let g = unsafe {
                    let out = if STORE { dst.add(written) } else { dst };
                    L::group::<DOT, STORE>(src[read..].as_ptr(), out)
                };
                if !g.bad {
                    read += GROUP;
                    written += GROUP;
                    if let Some(after) = after_last_lf(lf) {
                        mark = read;
                        mark_open = after;
                    }
                    continue 'outer;
                }
            }
        }
        let mut open = exact_open(src, mark, mark_open, read);
        let blocks_end = read + GROUP;
        while read + WINDOW <= src.len() {
            let window = &src[read..read + WINDOW];
            // SAFETY: `window` has WINDOW > BLOCK readable bytes; `written <=
            // read`, so `dst + written` has `src.len() - read > BLOCK`
            // writable bytes (the caller's guarantee); features: the caller's.
            let m = unsafe {
                let out = if STORE { dst.add(written) } else { dst };
                L::block::<STORE>(window.as_ptr(), out)
            };
            let next = window[BLOCK];
            // CR at p exactly when LF at p + 1.
            let mut bad = m.cr ^ ((m.lf >> 1) | (u64::from(next == b'\n') << 63));
            let mut stuffed = 0;
            if DOT {
                stuffed = m.lf & ((m.dot >> 1) | (u64::from(next == b'.') << 63));
                bad |= stuffed;
            }
            // The line the first LF closes has `open + first - 1` stored
            // octets (its CR excluded); with no LF the line stays open and may
            // gain all 64 (65 = 64 + 1 keeps one test for both). Lines wholly
            // inside the block are shorter than the limit (at least a block).
            let first = m.lf.trailing_zeros() as usize + usize::from(m.lf == 0);
            let lines_ok = open.saturating_add(first) <= limit;
            if bad != 0 || !lines_ok {
                if DOT && STORE && bad != 0 && lines_ok {
                    // A plain stuffed dot first: keep the block up to its LF,
                    // drop the dot, go on from the byte after it.
                    let at = bad.trailing_zeros() as usize;
                    if (stuffed >> at) & 1 == 1 {
                        let after = src.get(read + at + 2).copied().unwrap_or(b'\r');
                        if after != b'\r' && after != b'\n' {
                            read += at + 2;
                            written += at + 1;
                            mark = read;
                            mark_open = 0;
                            continue 'outer;
                        }
                    }
                }
                break;
            }
            // Octets after the last LF, or the line grew by the whole block.
            open = m.lf.leading_zeros() as usize + if m.lf == 0 { open } else { 0 };
            read += BLOCK;
            written += BLOCK;
            mark = read;
            mark_open = open;
            if read >= blocks_end {
                continue 'outer;
            }
        }
        return Progress {
            read,
            written,
            open,
        };
    }
}

/// The stored octets of the line open at `read`, given `mark_open` of them
/// at `mark` (see `drive`).
#[inline]
fn exact_open(src: &[u8], mark: usize, mark_open: usize, read: usize) -> usize {
    if mark == read {
        return mark_open;
    }
    match memchr::memrchr(b'\n', &src[mark..read]) {
        Some(lf) => read - (mark + lf + 1),
        None => mark_open.saturating_add(read - mark),
    }
}

/// Position of the first LF in a group ([`GROUP`] + 1 if none: a line that
/// stays open must stay within the limit with all of the group).
#[inline]
fn first_lf(lf: [u64; 4]) -> usize {
    let mut first = GROUP + 1;
    for k in (0..4).rev() {
        if lf[k] != 0 {
            first = k * BLOCK + lf[k].trailing_zeros() as usize;
        }
    }
    first
}

/// Bytes after the last LF of a group, if it has one.
#[inline]
fn after_last_lf(lf: [u64; 4]) -> Option<usize> {
    let mut after = None;
    for (k, &bits) in lf.iter().enumerate() {
        if bits != 0 {
            after = Some((3 - k) * BLOCK + bits.leading_zeros() as usize);
        }
    }
    after
}

/// Portable: 8 bytes at a time in a `u64` (SIMD within a register).
struct Swar;

const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const ONES: u64 = 0x0101_0101_0101_0101;

/// Bit `k` set when byte `k` of `word` (little-endian) equals `byte`.
#[inline(always)]
fn eq_bits(word: u64, byte: u8) -> u64 {
    let x = word ^ (ONES * u64::from(byte));
    // 0x80 in each byte of x that is zero; exact (no borrow between bytes).
    let zero = !(((x & LO7) + LO7) | x) & !LO7;
    // Gather the eight 0x80 bits into one byte: the products land on distinct
    // bit positions, so no carry disturbs the top byte.
    ((zero >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

impl Lanes for Swar {
    #[inline(always)]
    unsafe fn block<const STORE: bool>(src: *const u8, dst: *mut u8) -> Masks {
        // SAFETY: the caller guarantees BLOCK readable bytes at `src`.
        let block: &[u8; BLOCK] = unsafe { &*src.cast::<[u8; BLOCK]>() };
        let mut m = Masks {
            cr: 0,
            lf: 0,
            dot: 0,
        };
        for (k, word) in block.chunks_exact(8).enumerate() {
            let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            m.cr |= eq_bits(w, b'\r') << (8 * k);
            m.lf |= eq_bits(w, b'\n') << (8 * k);
            m.dot |= eq_bits(w, b'.') << (8 * k);
        }
        if STORE {
            // SAFETY: the caller guarantees BLOCK writable bytes at `dst`,
            // which is in a Vec's spare capacity, so disjoint from `src`.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, BLOCK) };
        }
        m
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{compiler_fence, drive, Lanes, Masks, Ordering, Progress, Summary, BLOCK};
    use std::arch::x86_64::*;

    const CR: i8 = b'\r' as i8;
    const LF: i8 = b'\n' as i8;
    const DOT: i8 = b'.' as i8;

    // A note on `compiler_fence` below: without it LLVM turns the
    // load/store pairs of a group into one `memcpy` placed before the
    // shifted loads, which then read bytes just stored to an address with
    // the same low 12 bits (source and sink buffers are often equally
    // aligned): 4K-aliasing stalls, measured 21 GB/s instead of 35. The
    // fence keeps loads before stores, as written; it emits no instruction.

    /// # Safety
    /// As [`drive`], and the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2<const DOT: bool, const STORE: bool>(
        src: &[u8],
        dst: *mut u8,
        open: usize,
        limit: usize,
    ) -> Progress {
        // SAFETY: the caller's guarantees; the features are enabled here.
        unsafe { drive::<Avx2, DOT, STORE>(src, dst, open, limit) }
    }

    pub(super) struct Avx2;

    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn block<const STORE: bool>(src: *const u8, dst: *mut u8) -> Masks {
            // SAFETY: BLOCK = 2 x 32 bytes readable at `src` / writable at
            // `dst` (the caller's guarantee); unaligned load/store
            // intrinsics; the caller runs with AVX2.
            unsafe {
                let a = _mm256_loadu_si256(src.cast());
                let b = _mm256_loadu_si256(src.add(32).cast());
                if STORE {
                    compiler_fence(Ordering::SeqCst);
                    _mm256_storeu_si256(dst.cast(), a);
                    _mm256_storeu_si256(dst.add(32).cast(), b);
                }
                let bits = |c: i8| {
                    let c = _mm256_set1_epi8(c);
                    let lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(a, c)) as u32;
                    let hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(b, c)) as u32;
                    u64::from(lo) | (u64::from(hi) << 32)
                };
                Masks {
                    cr: bits(CR),
                    lf: bits(LF),
                    dot: bits(DOT),
                }
            }
        }

        /// Each 32 bytes are compared with themselves shifted by one byte (a
        /// second, overlapping load); the verdict is OR-ed in a register and
        /// leaves it once per group.
        #[inline(always)]
        unsafe fn group<const DOTS: bool, const STORE: bool>(
            src: *const u8,
            dst: *mut u8,
        ) -> Summary {
            // SAFETY: every load is within the GROUP + 1 readable bytes at
            // `src`, every store within the GROUP writable bytes at `dst`
            // (the caller's guarantee); unaligned intrinsics; the caller runs
            // with AVX2.
            unsafe {
                let cr = _mm256_set1_epi8(CR);
                let lf = _mm256_set1_epi8(LF);
                let dot = _mm256_set1_epi8(DOT);
                let mut bad = _mm256_setzero_si256();
                let mut last_lf = [0u32; 2];
                for k in 0..4 {
                    let at = k * BLOCK;
                    let here = [
                        _mm256_loadu_si256(src.add(at).cast()),
                        _mm256_loadu_si256(src.add(at + 32).cast()),
                    ];
                    let next = [
                        _mm256_loadu_si256(src.add(at + 1).cast()),
                        _mm256_loadu_si256(src.add(at + 33).cast()),
                    ];
                    if STORE {
                        compiler_fence(Ordering::SeqCst);
                        _mm256_storeu_si256(dst.add(at).cast(), here[0]);
                        _mm256_storeu_si256(dst.add(at + 32).cast(), here[1]);
                    }
                    for h in 0..2 {
                        let is_lf = _mm256_cmpeq_epi8(here[h], lf);
                        let pairs = _mm256_xor_si256(
                            _mm256_cmpeq_epi8(here[h], cr),
                            _mm256_cmpeq_epi8(next[h], lf),
                        );
                        bad = _mm256_or_si256(bad, pairs);
                        if DOTS {
                            let stuffed = _mm256_and_si256(is_lf, _mm256_cmpeq_epi8(next[h], dot));
                            bad = _mm256_or_si256(bad, stuffed);
                        }
                        if k == 3 {
                            last_lf[h] = _mm256_movemask_epi8(is_lf) as u32;
                        }
                    }
                }
                Summary {
                    bad: _mm256_movemask_epi8(bad) != 0,
                    last_lf: u64::from(last_lf[0]) | (u64::from(last_lf[1]) << 32),
                }
            }
        }

        #[inline(always)]
        unsafe fn lf_masks(src: *const u8) -> [u64; 4] {
            let mut masks = [0; 4];
            // SAFETY: GROUP readable bytes at `src` (the caller's guarantee);
            // unaligned loads; the caller runs with AVX2.
            unsafe {
                let lf = _mm256_set1_epi8(LF);
                for (k, bits) in masks.iter_mut().enumerate() {
                    let half = |h: usize| {
                        let v = _mm256_loadu_si256(src.add(k * BLOCK + 32 * h).cast());
                        _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, lf)) as u32
                    };
                    *bits = u64::from(half(0)) | (u64::from(half(1)) << 32);
                }
            }
            masks
        }
    }

    /// 16 bytes at a time (x86_64 baseline, no detection needed).
    pub(super) struct Sse2;

    impl Lanes for Sse2 {
        #[inline(always)]
        unsafe fn block<const STORE: bool>(src: *const u8, dst: *mut u8) -> Masks {
            let mut m = Masks {
                cr: 0,
                lf: 0,
                dot: 0,
            };
            for k in 0..BLOCK / 16 {
                // SAFETY: 16 bytes at offset 16k < BLOCK, readable at `src`
                // / writable at `dst` (the caller's guarantee); unaligned
                // load/store; SSE2 is baseline on x86_64.
                unsafe {
                    let v = _mm_loadu_si128(src.add(16 * k).cast());
                    if STORE {
                        compiler_fence(Ordering::SeqCst);
                        _mm_storeu_si128(dst.add(16 * k).cast(), v);
                    }
                    let bits = |c: i8| {
                        let eq = _mm_cmpeq_epi8(v, _mm_set1_epi8(c));
                        u64::from(_mm_movemask_epi8(eq) as u16) << (16 * k)
                    };
                    m.cr |= bits(CR);
                    m.lf |= bits(LF);
                    m.dot |= bits(DOT);
                }
            }
            m
        }

        /// As AVX2's, 16 bytes at a time.
        #[inline(always)]
        unsafe fn group<const DOTS: bool, const STORE: bool>(
            src: *const u8,
            dst: *mut u8,
        ) -> Summary {
            // SAFETY: every load is within the GROUP + 1 readable bytes at
            // `src`, every store within the GROUP writable bytes at `dst`
            // (the caller's guarantee); unaligned intrinsics; SSE2 is
            // baseline on x86_64.
            unsafe {
                let cr = _mm_set1_epi8(CR);
                let lf = _mm_set1_epi8(LF);
                let dot = _mm_set1_epi8(DOT);
                let mut bad = _mm_setzero_si128();
                let mut last_lf = 0;
                for k in 0..4 {
                    let at = k * BLOCK;
                    let mut here = [_mm_setzero_si128(); 4];
                    let mut next = [_mm_setzero_si128(); 4];
                    for q in 0..4 {
                        here[q] = _mm_loadu_si128(src.add(at + 16 * q).cast());
                        next[q] = _mm_loadu_si128(src.add(at + 16 * q + 1).cast());
                    }
                    if STORE {
                        compiler_fence(Ordering::SeqCst);
                        for (q, v) in here.iter().enumerate() {
                            _mm_storeu_si128(dst.add(at + 16 * q).cast(), *v);
                        }
                    }
                    for q in 0..4 {
                        let is_lf = _mm_cmpeq_epi8(here[q], lf);
                        let pairs =
                            _mm_xor_si128(_mm_cmpeq_epi8(here[q], cr), _mm_cmpeq_epi8(next[q], lf));
                        bad = _mm_or_si128(bad, pairs);
                        if DOTS {
                            let stuffed = _mm_and_si128(is_lf, _mm_cmpeq_epi8(next[q], dot));
                            bad = _mm_or_si128(bad, stuffed);
                        }
                        if k == 3 {
                            last_lf |= u64::from(_mm_movemask_epi8(is_lf) as u16) << (16 * q);
                        }
                    }
                }
                Summary {
                    bad: _mm_movemask_epi8(bad) != 0,
                    last_lf,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition of one kernel run, one byte at a time: what the
    /// kernels must all return (and store).
    fn scalar(
        dot: bool,
        store: bool,
        src: &[u8],
        mut open: usize,
        max_line: usize,
    ) -> (Progress, Vec<u8>) {
        let limit = max_line + 1;
        let mut read = 0;
        let mut out = Vec::new();
        while read + WINDOW <= src.len() {
            let w = &src[read..read + WINDOW];
            let mut first_bad = None;
            for p in 0..BLOCK {
                let bare = (w[p] == b'\r') != (w[p + 1] == b'\n');
                let stuffed = dot && w[p] == b'\n' && w[p + 1] == b'.';
                if bare || stuffed {
                    first_bad = Some((p, stuffed));
                    break;
                }
            }
            let first_lf = w[..BLOCK].iter().position(|&b| b == b'\n');
            let lines_ok = match first_lf {
                Some(f) => open + f <= limit,
                None => open + BLOCK < limit,
            };
            match first_bad {
                None if lines_ok => {
                    out.extend_from_slice(&w[..BLOCK]);
                    open = match w[..BLOCK].iter().rposition(|&b| b == b'\n') {
                        Some(l) => BLOCK - 1 - l,
                        None => open + BLOCK,
                    };
                    read += BLOCK;
                }
                Some((at, true))
                    if store
                        && lines_ok
                        && !matches!(src.get(read + at + 2), None | Some(b'\r' | b'\n')) =>
                {
                    out.extend_from_slice(&w[..=at]);
                    read += at + 2;
                    open = 0;
                }
                _ => break,
            }
        }
        if read > 0 && src[read - 1] == b'\r' {
            read -= 1;
            out.pop();
            open -= 1;
        }
        let written = out.len();
        (
            Progress {
                read,
                written,
                open,
            },
            out,
        )
    }

    fn all_agree(dot: bool, src: &[u8], open: usize, max_line: usize) {
        for store in [false, true] {
            let want = scalar(dot, store, src, open, max_line);
            for k in Kernel::available() {
                let mut out = b"prefix".to_vec();
                let got = if store {
                    scan_blocks(k, dot, src, open, max_line, Some(&mut out))
                } else {
                    scan_blocks(k, dot, src, open, max_line, None)
                };
                assert_eq!(got, want.0, "{}, dot {dot}, store {store}", k.name());
                if store {
                    assert_eq!(&out[..6], b"prefix");
                    assert_eq!(&out[6..], want.1, "{}, dot {dot}: stored", k.name());
                } else {
                    assert_eq!(out, b"prefix");
                }
            }
        }
    }

    #[test]
    fn best_is_first_available() {
        let all = Kernel::available();
        assert_eq!(Kernel::best(), all[0]);
        assert_eq!(all.last().map(|k| k.name()), Some("portable"));
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            assert_eq!(Kernel::best().name(), "avx2");
        }
    }

    #[test]
    fn eq_bits_is_exact() {
        for b in 0..=255u8 {
            let mut word = [b'a'; 8];
            for k in 0..8 {
                word[k] = b;
                let w = u64::from_le_bytes(word);
                let want: u64 = (0..8).filter(|&i| word[i] == b).map(|i| 1 << i).sum();
                assert_eq!(eq_bits(w, b), want);
                assert_eq!(
                    eq_bits(w, b'\r'),
                    (0..8)
                        .filter(|&i| word[i] == b'\r')
                        .map(|i| 1 << i)
                        .sum::<u64>()
                );
            }
        }
    }

    /// Two groups, two blocks and a bit of CRLF lines, with every special
    /// pattern at every offset (so at and across block and group
    /// boundaries, and in the byte after a block).
    #[test]
    fn every_special_byte_at_every_offset() {
        let mut base = Vec::new();
        while base.len() < 2 * GROUP + 2 * BLOCK + 7 {
            base.extend_from_slice(b"abcdefghijklmnopqrstuvwxyz0123456789\r\n");
        }
        for dot in [false, true] {
            all_agree(dot, &base, 0, 998);
        }
        let patterns: [&[u8]; 12] = [
            b"\r",
            b"\n",
            b"\r\n",
            b"\n.",
            b"\r\n.",
            b".",
            b"\r\n.\r\n",
            b"\r\n..",
            b"\r\n.x",
            b"\r\n.\n",
            b"\n\r",
            b"\x8d\x8a\xae",
        ];
        for at in 0..base.len() {
            for pattern in patterns {
                let mut src = base.clone();
                for (k, &b) in pattern.iter().enumerate() {
                    if at + k < src.len() {
                        src[at + k] = b;
                    }
                }
                for dot in [false, true] {
                    all_agree(dot, &src, 0, 998);
                    all_agree(dot, &src, 3, 64);
                }
            }
        }
    }

    #[test]
    fn line_lengths_at_the_limit() {
        // Limits below, at and above a group (the group loop needs more than
        // a group), lines around the limit, opened before the run or not,
        // with the long line first, between short ones, and at every phase
        // against the group grid.
        for max_line in [64usize, 65, 100, 255, 256, 257, 300, 998] {
            let lens = (max_line.saturating_sub(3)..=max_line + 3).chain([max_line / 2, 0]);
            for len in lens {
                for open in [0, 1, 60, max_line - 2] {
                    for lead in [0, 1, 37, 63, 64, 200, 255] {
                        let mut src = vec![b'a'; lead];
                        src.extend_from_slice(b"\r\n");
                        src.extend(std::iter::repeat_n(b'x', len));
                        src.extend_from_slice(b"\r\nabc\r\n");
                        src.extend(std::iter::repeat_n(b'y', 2 * GROUP + 10));
                        src.extend_from_slice(b"\r\n");
                        src.extend(std::iter::repeat_n(b'z', len));
                        src.extend_from_slice(b"\r\n");
                        if lead == 0 {
                            src.drain(..2); // start in the long line
                        }
                        for dot in [false, true] {
                            all_agree(dot, &src, open, max_line);
                        }
                    }
                }
            }
        }
    }

    /// Lines of random length (up to past the default limit), sprinkled
    /// with the bytes that matter.
    fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
        let line = (
            prop_oneof![4 => 0usize..100, 1 => 100usize..1100],
            proptest::collection::vec(
                (
                    any::<prop::sample::Index>(),
                    prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), any::<u8>(),],
                ),
                0..3,
            ),
            prop_oneof![8 => Just(false), 1 => Just(true)],
        )
            .prop_map(|(len, specials, stuffed)| {
                let mut l: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                for (at, b) in specials {
                    if !l.is_empty() {
                        let i = at.index(l.len());
                        l[i] = b;
                    }
                }
                if stuffed {
                    l.insert(0, b'.');
                }
                l.extend_from_slice(b"\r\n");
                l
            });
        proptest::collection::vec(line, 0..40).prop_map(|l| l.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn implementations_agree(
            src in body_strategy(),
            skip in any::<prop::sample::Index>(),
            open in prop_oneof![0usize..100, 900usize..1000],
            max_line in prop_oneof![Just(998), 64usize..130, 250usize..270],
        ) {
            // Start anywhere that is a legal start (not CR/LF; the byte
            // before is not an LF if it is a dot).
            let from = skip.index(src.len() + 1);
            let legal = |i: usize| match src.get(i) {
                None => true,
                Some(b'\r' | b'\n') => false,
                Some(b'.') => i == 0 || src[i - 1] != b'\n',
                Some(_) => true,
            };
            if let Some(start) = (from..=src.len()).find(|&i| legal(i)) {
                let open = open.min(max_line);
                for dot in [false, true] {
                    all_agree(dot, &src[start..], open, max_line);
                }
            }
        }
    }
}
