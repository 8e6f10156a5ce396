//! The scanner's block test: does a 64-byte block of body need a closer look?
//!
//! A block is *plain* when, for every position `p` in it (looking at the byte
//! after the block too):
//! - `input[p] == CR` exactly when `input[p + 1] == LF` (so no bare CR and no
//!   bare LF can start or end in the block), and
//! - in DATA mode, no `LF` at `p` is followed by a `.` (no stuffed dot and no
//!   terminator).
//!
//! A run of plain blocks is stored unchanged. The test is branch-free: the
//! block and the same bytes shifted by one are compared with CR / LF / `.`
//! and the disagreements are OR-ed together, one `movemask` per block at the
//! end. It also reports whether the block holds an LF, which bounds the line
//! length without finding every line end.
//!
//! Two implementations give identical answers (tests check it, and the
//! scanner's tests run with both): SSE2 on x86_64 (baseline there, so no
//! runtime detection; through `safe_arch`'s safe wrappers, the library stays
//! `forbid(unsafe_code)`), and a portable SWAR one on 64-bit words for every
//! other target. AVX2 would need runtime detection, which safe code cannot
//! dispatch on; measured, the scan runs at about 20 GB/s with SSE2 here, so
//! storing the body (a memcpy) is of the same order.

/// Bytes a block covers; the test reads one more.
pub(super) const BLOCK: usize = 64;

/// What a block test found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BlockFlags {
    /// Not plain: a bare CR / LF, or (DATA mode) a line-start dot, is in the block.
    pub needs_attention: bool,
    /// The block holds at least one LF.
    pub has_lf: bool,
}

/// A way of testing a block. `window` is the 64 bytes of the block followed
/// by the first byte after it.
pub(super) trait BlockTest {
    fn test<const DOT: bool>(window: &[u8; BLOCK + 1]) -> BlockFlags;
}

/// The block test this build uses.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
pub(super) type Native = Sse2;
/// The block test this build uses.
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
pub(super) type Native = Swar;

/// 16 bytes at a time with SSE2 (x86_64 baseline).
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
pub(super) struct Sse2;

#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
impl BlockTest for Sse2 {
    #[inline(always)]
    fn test<const DOT: bool>(window: &[u8; BLOCK + 1]) -> BlockFlags {
        use safe_arch::{
            cmp_eq_mask_i8_m128i as eq, load_unaligned_m128i as load, move_mask_i8_m128i,
            set_splat_i8_m128i as splat, zeroed_m128i,
        };
        let cr = splat(b'\r' as i8);
        let lf = splat(b'\n' as i8);
        let dot = splat(b'.' as i8);
        let mut bad = zeroed_m128i();
        let mut any_lf = zeroed_m128i();
        for k in 0..BLOCK / 16 {
            let here: &[u8; 16] = window[16 * k..16 * k + 16].try_into().expect("16 bytes");
            let next: &[u8; 16] = window[16 * k + 1..16 * k + 17]
                .try_into()
                .expect("16 bytes");
            let (here, next) = (load(here), load(next));
            let lf_here = eq(here, lf);
            // CR at p exactly when LF at p + 1.
            bad |= eq(here, cr) ^ eq(next, lf);
            if DOT {
                bad |= lf_here & eq(next, dot);
            }
            any_lf |= lf_here;
        }
        BlockFlags {
            needs_attention: move_mask_i8_m128i(bad) != 0,
            has_lf: move_mask_i8_m128i(any_lf) != 0,
        }
    }
}

/// Portable: 8 bytes at a time in a `u64` (SIMD within a register).
#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
pub(super) struct Swar;

#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
const ONES: u64 = 0x0101_0101_0101_0101;

#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
/// 0x80 in every byte of `word` that equals `byte`, 0 elsewhere. Exact (no
/// false positives from borrows, unlike the classic `haszero` trick).
#[inline(always)]
fn eq_bytes(word: u64, byte: u8) -> u64 {
    let x = word ^ (ONES * u64::from(byte));
    // High bit set in a byte iff that byte of x is non-zero.
    let nonzero = ((x & LO7) + LO7) | x;
    !nonzero & !LO7
}

impl BlockTest for Swar {
    #[inline(always)]
    fn test<const DOT: bool>(window: &[u8; BLOCK + 1]) -> BlockFlags {
        let word = |at: usize| -> u64 {
            u64::from_le_bytes(window[at..at + 8].try_into().expect("8 bytes"))
        };
        let mut bad = 0u64;
        let mut any_lf = 0u64;
        for k in 0..BLOCK / 8 {
            let (here, next) = (word(8 * k), word(8 * k + 1));
            let lf_here = eq_bytes(here, b'\n');
            bad |= eq_bytes(here, b'\r') ^ eq_bytes(next, b'\n');
            if DOT {
                bad |= lf_here & eq_bytes(next, b'.');
            }
            any_lf |= lf_here;
        }
        BlockFlags {
            needs_attention: bad != 0,
            has_lf: any_lf != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, one byte at a time.
    fn scalar<const DOT: bool>(w: &[u8; BLOCK + 1]) -> BlockFlags {
        let mut needs_attention = false;
        for p in 0..BLOCK {
            needs_attention |= (w[p] == b'\r') != (w[p + 1] == b'\n');
            needs_attention |= DOT && w[p] == b'\n' && w[p + 1] == b'.';
        }
        BlockFlags {
            needs_attention,
            has_lf: w[..BLOCK].contains(&b'\n'),
        }
    }

    fn all_agree(w: &[u8; BLOCK + 1]) {
        for dot in [false, true] {
            let want = if dot {
                scalar::<true>(w)
            } else {
                scalar::<false>(w)
            };
            let swar = if dot {
                Swar::test::<true>(w)
            } else {
                Swar::test::<false>(w)
            };
            assert_eq!(swar, want, "swar, dot {dot}, {w:?}");
            let native = if dot {
                Native::test::<true>(w)
            } else {
                Native::test::<false>(w)
            };
            assert_eq!(native, want, "native, dot {dot}, {w:?}");
            #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
            {
                let sse2 = if dot {
                    Sse2::test::<true>(w)
                } else {
                    Sse2::test::<false>(w)
                };
                assert_eq!(sse2, want, "sse2, dot {dot}, {w:?}");
            }
        }
    }

    #[test]
    fn every_special_byte_at_every_position() {
        let mut base = [b'a'; BLOCK + 1];
        all_agree(&base);
        for p in 0..=BLOCK {
            for pattern in [
                &b"\r"[..],
                b"\n",
                b"\r\n",
                b"\n.",
                b"\r\n.",
                b".",
                b"\n\r",
                b"\x8d",
                b"\x8a",
            ] {
                let mut w = base;
                for (k, &b) in pattern.iter().enumerate() {
                    if p + k <= BLOCK {
                        w[p + k] = b;
                    }
                }
                all_agree(&w);
            }
        }
        // A plain block full of CRLFs, and one whose last CR pairs with the byte after.
        for (i, b) in base.iter_mut().enumerate() {
            *b = if i % 2 == 0 { b'\r' } else { b'\n' };
        }
        all_agree(&base);
        assert!(!Native::test::<true>(&base).needs_attention);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn implementations_agree(
            bytes in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'x'), any::<u8>()],
                BLOCK + 1,
            )
        ) {
            let w: [u8; BLOCK + 1] = bytes.try_into().unwrap();
            all_agree(&w);
        }
    }
}
