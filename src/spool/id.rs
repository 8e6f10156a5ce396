//! Time-ordered spool ids.
//!
//! Layout of the 64 bits (most significant first):
//! `42 bits milliseconds since 2020-01-01 UTC | 8 bits shard | 14 bits sequence`.
//! Putting the time first makes numeric order (and therefore the big-endian
//! key order in sled, and the base32 text order) equal to arrival order, so the
//! queue rebuild at start-up walks messages oldest first without sorting.

use std::fmt;
use std::str::FromStr;

/// 2020-01-01T00:00:00Z in Unix milliseconds: the id epoch. A recent epoch
/// leaves 42 bits of milliseconds good until the year 2159.
pub const ID_EPOCH_UNIX_MS: u64 = 1_577_836_800_000;

const SEQ_BITS: u32 = 14;
const SHARD_BITS: u32 = 8;
const MS_BITS: u32 = 42;
const SEQ_MAX: u64 = (1 << SEQ_BITS) - 1;
const MS_MAX: u64 = (1 << MS_BITS) - 1;
const SHARD_SHIFT: u32 = SEQ_BITS;
const MS_SHIFT: u32 = SEQ_BITS + SHARD_BITS;

/// Crockford base32 alphabet: no I, L, O, U, so ids survive being read aloud
/// or retyped, and ASCII order of the digits equals their value order.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Length of the text form: 64 bits / 5 bits per char, rounded up.
pub const ID_TEXT_LEN: usize = 13;

/// Time-ordered, unique across shards and restarts: 64 bits = 42 bits of
/// milliseconds since 2020-01-01 UTC, 8 bits shard, 14 bits sequence.
/// Display: 13 chars Crockford base32 (uppercase, lexicographic order ==
/// numeric order).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct SpoolId(u64);

impl SpoolId {
    /// The raw 64-bit value.
    pub fn as_u64(&self) -> u64 {
        self.0
    }

    /// Rebuilds an id from its raw value (e.g. read back from a key).
    pub fn from_u64(v: u64) -> Self {
        Self(v)
    }

    /// Big-endian bytes: the sled key form, whose byte order is id order.
    pub fn to_be_bytes(&self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// The shard that generated the id.
    pub fn shard(&self) -> u8 {
        (self.0 >> SHARD_SHIFT) as u8
    }

    /// Creation time in Unix milliseconds (may be slightly in the future of
    /// the real time if the generator had to borrow milliseconds).
    pub fn timestamp_ms(&self) -> u64 {
        (self.0 >> MS_SHIFT) + ID_EPOCH_UNIX_MS
    }

    /// The per-millisecond sequence number.
    pub fn sequence(&self) -> u16 {
        (self.0 & SEQ_MAX) as u16
    }

    /// Assembles an id from its parts (`ms` counted from [`ID_EPOCH_UNIX_MS`]).
    pub fn from_parts(epoch_ms: u64, shard: u8, seq: u16) -> Self {
        debug_assert!(epoch_ms <= MS_MAX && u64::from(seq) <= SEQ_MAX);
        Self(
            ((epoch_ms & MS_MAX) << MS_SHIFT)
                | (u64::from(shard) << SHARD_SHIFT)
                | (u64::from(seq) & SEQ_MAX),
        )
    }

    fn epoch_ms(&self) -> u64 {
        self.0 >> MS_SHIFT
    }
}

impl fmt::Display for SpoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; ID_TEXT_LEN];
        // The first char carries only the top 4 bits (13*5 = 65 > 64).
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (ID_TEXT_LEN - 1 - i);
            *slot = ALPHABET[((self.0 >> shift) & 31) as usize];
        }
        // ALPHABET is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

/// Why a text form did not parse as a [`SpoolId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSpoolIdError {
    /// Not exactly 13 characters.
    #[error("spool id must be {ID_TEXT_LEN} characters, got {0}")]
    Length(usize),
    /// A character outside the Crockford base32 alphabet.
    #[error("invalid character {0:?} in spool id")]
    Char(char),
    /// The first character is above `F`, so the value exceeds 64 bits.
    #[error("spool id out of range")]
    Overflow,
}

fn decode_char(c: u8) -> Option<u64> {
    let v = match c.to_ascii_uppercase() {
        b @ b'0'..=b'9' => b - b'0',
        // Crockford's aliases for characters people confuse.
        b'O' => 0,
        b'I' | b'L' => 1,
        b => ALPHABET.iter().position(|&a| a == b)? as u8,
    };
    Some(u64::from(v))
}

impl FromStr for SpoolId {
    type Err = ParseSpoolIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != ID_TEXT_LEN {
            return Err(ParseSpoolIdError::Length(s.chars().count()));
        }
        let mut v: u64 = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let d = decode_char(b)
                .ok_or_else(|| ParseSpoolIdError::Char(s[i..].chars().next().unwrap_or('?')))?;
            if i == 0 && d > 15 {
                return Err(ParseSpoolIdError::Overflow);
            }
            v = (v << 5) | d;
        }
        Ok(Self(v))
    }
}

/// Per-shard generator. Monotonic even if the clock steps back or more than
/// 16384 ids are made in one millisecond (it then borrows from the next
/// millisecond; the clock catches up later).
#[derive(Debug, Clone)]
pub struct SpoolIdGenerator {
    shard: u8,
    /// Last issued (epoch ms, sequence); `None` before the first id.
    last: Option<(u64, u64)>,
}

impl SpoolIdGenerator {
    /// A generator for `shard`. Every id it returns is strictly greater than
    /// `not_before` (pass [`crate::spool::Spool::max_id`] after a restart so
    /// a clock that stepped back cannot reissue an id still in the spool).
    pub fn new(shard: u8, not_before: Option<SpoolId>) -> Self {
        let last = not_before.map(|m| {
            if m.shard() == shard {
                // Our own id: continue its sequence.
                (m.epoch_ms(), u64::from(m.sequence()))
            } else {
                // Another shard's id: ours issued before the restart may have
                // any sequence in that millisecond, so only the next
                // millisecond is certainly fresh.
                (m.epoch_ms(), SEQ_MAX)
            }
        });
        Self { shard, last }
    }

    /// The next id for a message received at `now_unix_ms` (passed in so the
    /// generator stays clock-free and testable).
    pub fn next(&mut self, now_unix_ms: u64) -> SpoolId {
        let now = now_unix_ms.saturating_sub(ID_EPOCH_UNIX_MS).min(MS_MAX);
        let (ms, seq) = match self.last {
            Some((last_ms, last_seq)) if now <= last_ms => {
                // Clock did not advance (or stepped back): continue after the
                // last id, borrowing the next millisecond when the sequence
                // space is used up.
                if last_seq < SEQ_MAX {
                    (last_ms, last_seq + 1)
                } else {
                    ((last_ms + 1).min(MS_MAX), 0)
                }
            }
            _ => (now, 0),
        };
        self.last = Some((ms, seq));
        SpoolId::from_parts(ms, self.shard, seq as u16)
    }
}
