//! Message records in append-only segment files, one series per shard: the
//! spool's journal.
//!
//! Why not in sled: sled 0.34 rewrites a whole B-tree node (up to 17
//! values) every 10th update of it and on every split. With bodies as
//! values that meant 594 KB written to disk per 100 KiB message and 40 KB per
//! 5 KiB one (measured with `/proc/PID/io`), and the disk, not the CPU,
//! limited throughput. Here a message is written once: one record (header,
//! envelope, body) appended to the shard's current segment
//! (`bodies/SSSSS-NNNNNNNNNNNN.body`); sled keeps the envelope and a small
//! pointer (`b'P' ++ id` -> segment, offset, length, CRC-32) to the body.
//!
//! Why the envelope is in the record too: it makes the segments a journal.
//! A store is durable once its segment is `fdatasync`ed (a *journal* flush,
//! see [`super::flusher`]); sled is made durable lazily, at most
//! `index_flush_interval` later, instead of once per group commit (sled's
//! flush costs a thread hand-off and a `sync_file_range` round trip on top
//! of our `fdatasync`, and was a third of the CPU at full load). What sled
//! lost in a crash, the start-up [`replay`] restores from the records after
//! the shard's watermark (`b'W'` in its tree: the end of the last record
//! whose envelope and pointer went into sled, inserted right after them).
//!
//! Appends are a plain `pwrite` from the shard into the page cache (tens of
//! microseconds for 100 KiB; measured cheaper than an io_uring write, which
//! ext4 hands to a kernel worker thread). Being synchronous, they finish in
//! the order their ranges were reserved, so a torn record can only be the
//! last one of a segment, and a failed write closes its segment: the replay
//! stops at the first invalid record of a segment and loses nothing
//! acknowledged. A segment from an earlier build (no [`SEGMENT_MAGIC`]) holds
//! bare bodies; it is read through pointers and never replayed.
//!
//! Space: a segment is deleted once every message in it was removed (live
//! counts are rebuilt from the pointers at start-up); a restart starts a new
//! segment and deletes segments no pointer refers to.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{SpoolError, SpoolId};

/// Segments are closed for appends at this size (a message larger than
/// the remaining space starts a new segment; one larger than this gets a
/// segment of its own).
const SEGMENT_BYTES: u64 = 64 << 20;

/// Sub-directory of the spool holding the segments.
pub(crate) const BODIES_DIR: &str = "bodies";

/// Where a body lives: the `P` record in sled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BodyRef {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

impl BodyRef {
    const ENCODED: usize = 28;

    pub(crate) fn encode(&self) -> [u8; Self::ENCODED] {
        let mut b = [0u8; Self::ENCODED];
        b[..8].copy_from_slice(&self.segment.to_be_bytes());
        b[8..16].copy_from_slice(&self.offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.len.to_be_bytes());
        b[24..].copy_from_slice(&self.crc.to_be_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<BodyRef, SpoolError> {
        let corrupt = || SpoolError::Corrupt {
            what: "body pointer".into(),
            reason: format!("{} octets, expected {}", b.len(), Self::ENCODED),
        };
        let b: &[u8; Self::ENCODED] = b.try_into().map_err(|_| corrupt())?;
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        Ok(BodyRef {
            segment: u64_at(0),
            offset: u64_at(8),
            len: u64_at(16),
            crc: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }
}

/// The first octets of every segment that holds records.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"SLUICEJ1";
const RECORD_MAGIC: u32 = 0x534c_5231; // "SLR1"
/// magic u32, flags u8, 3 zero octets, id u64, envelope length u32, body
/// CRC-32 u32, body length u64, header CRC-32 u32 (over the 32 octets
/// before it and the envelope); big-endian.
const RECORD_HEADER: usize = 36;
/// Record flag: restore the message at start-up if sled lost it. DSNs are
/// written without it: they go into sled in the same batch that removes
/// their original, with a full flush, and restoring one alone would leave
/// both.
const FLAG_REPLAY: u8 = 1;

/// A position in a shard's segment series: (segment, offset). The `W`
/// watermark in sled is the end of the last record applied to sled.
pub(crate) type Position = (u64, u64);

pub(crate) fn encode_position(p: Position) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&p.0.to_be_bytes());
    b[8..].copy_from_slice(&p.1.to_be_bytes());
    b
}

pub(crate) fn decode_position(b: &[u8]) -> Result<Position, SpoolError> {
    let b: &[u8; 16] = b.try_into().map_err(|_| SpoolError::Corrupt {
        what: "watermark".into(),
        reason: format!("{} octets, expected 16", b.len()),
    })?;
    let (seq, off) = b.split_at(8);
    Ok((
        u64::from_be_bytes(seq.try_into().expect("8 octets")),
        u64::from_be_bytes(off.try_into().expect("8 octets")),
    ))
}

/// One record as written (see [`BodyLog::append`]).
fn encode_record(id: SpoolId, flags: u8, envelope: &[u8], parts: &[&[u8]]) -> (Vec<u8>, u32) {
    let body_len: usize = parts.iter().map(|p| p.len()).sum();
    let mut buf = Vec::with_capacity(RECORD_HEADER + envelope.len() + body_len);
    buf.resize(RECORD_HEADER, 0);
    buf.extend_from_slice(envelope);
    let mut body_crc = crc32fast::Hasher::new();
    for p in parts {
        body_crc.update(p);
        buf.extend_from_slice(p);
    }
    let body_crc = body_crc.finalize();
    let env_len = u32::try_from(envelope.len()).expect("an envelope is far below 4 GiB");
    buf[..4].copy_from_slice(&RECORD_MAGIC.to_be_bytes());
    buf[4] = flags;
    buf[8..16].copy_from_slice(&id.to_be_bytes());
    buf[16..20].copy_from_slice(&env_len.to_be_bytes());
    buf[20..24].copy_from_slice(&body_crc.to_be_bytes());
    buf[24..32].copy_from_slice(&(body_len as u64).to_be_bytes());
    let head_crc = header_crc(&buf[..32], envelope);
    buf[32..36].copy_from_slice(&head_crc.to_be_bytes());
    (buf, body_crc)
}

fn header_crc(head: &[u8], envelope: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(envelope);
    h.finalize()
}

/// A record found by [`replay`].
#[derive(Debug)]
pub(crate) struct Replayed {
    pub id: SpoolId,
    /// Whether to restore it if sled lost it ([`FLAG_REPLAY`]).
    pub restore: bool,
    pub envelope: Vec<u8>,
    pub body: BodyRef,
    /// Where the record ends.
    pub end: Position,
}

/// Every valid record of `shard`'s segments at or after `from`, in order.
/// Reads a segment up to its first invalid record (a torn tail: never
/// acknowledged, see the module docs). Segments without [`SEGMENT_MAGIC`]
/// are skipped.
pub(crate) fn replay(
    spool: &Path,
    shard: u16,
    from: Position,
) -> Result<Vec<Replayed>, SpoolError> {
    let dir = spool.join(BODIES_DIR);
    let mut out = Vec::new();
    for (_, seq) in list_segments(&dir)?
        .into_iter()
        .filter(|&(s, seq)| s == shard && seq >= from.0)
    {
        let data = std::fs::read(dir.join(segment_name(shard, seq))).map_err(io_err)?;
        if !data.starts_with(SEGMENT_MAGIC) {
            continue;
        }
        let start = if seq == from.0 { from.1 } else { 0 };
        let at = records_in(&data, seq, start, &mut out);
        if at < data.len() {
            tracing::info!(
                shard,
                segment = seq,
                offset = at,
                tail = data.len() - at,
                "segment ends in a record that was never completed (not acknowledged); ignored"
            );
        }
    }
    Ok(out)
}

/// Appends the valid records of segment `seq` (whole file in `data`) from
/// offset `start` on to `out`; returns where parsing stopped (the length of
/// `data` when it ends in a complete record).
pub(crate) fn records_in(data: &[u8], seq: u64, start: u64, out: &mut Vec<Replayed>) -> usize {
    let mut at = usize::try_from(start)
        .unwrap_or(usize::MAX)
        .max(SEGMENT_MAGIC.len());
    while let Some((rec, next)) = parse_record(data, at, seq) {
        out.push(rec);
        at = next;
    }
    at
}

/// The record at `at` in segment `seq`'s `data`, and where the next begins.
fn parse_record(data: &[u8], at: usize, seq: u64) -> Option<(Replayed, usize)> {
    let head = data.get(at..at.checked_add(RECORD_HEADER)?)?;
    let u32_at = |i: usize| u32::from_be_bytes(head[i..i + 4].try_into().expect("4 octets"));
    let u64_at = |i: usize| u64::from_be_bytes(head[i..i + 8].try_into().expect("8 octets"));
    if u32_at(0) != RECORD_MAGIC {
        return None;
    }
    let env_len = u32_at(16) as usize;
    let body_crc = u32_at(20);
    let body_len = usize::try_from(u64_at(24)).ok()?;
    let env_at = at + RECORD_HEADER;
    let envelope = data.get(env_at..env_at.checked_add(env_len)?)?;
    if header_crc(&head[..32], envelope) != u32_at(32) {
        return None;
    }
    let body_at = env_at + env_len;
    let end = body_at.checked_add(body_len)?;
    if crc32fast::hash(data.get(body_at..end)?) != body_crc {
        return None;
    }
    Some((
        Replayed {
            id: SpoolId::from_u64(u64_at(8)),
            restore: head[4] & FLAG_REPLAY != 0,
            envelope: envelope.to_vec(),
            body: BodyRef {
                segment: seq,
                offset: body_at as u64,
                len: body_len as u64,
                crc: body_crc,
            },
            end: (seq, end as u64),
        },
        end,
    ))
}

/// Segment files written since the last flush, shared by every shard and
/// the flusher thread (which syncs and clears them).
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    inner: Mutex<DirtyInner>,
}

#[derive(Debug, Default)]
struct DirtyInner {
    files: HashMap<(u16, u64), Arc<std::fs::File>>,
    /// A segment was created: the directory entry must be synced too.
    dir: bool,
}

impl Dirty {
    fn mark(&self, key: (u16, u64), file: &Arc<std::fs::File>, new_segment: bool) {
        let mut d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        d.files.entry(key).or_insert_with(|| Arc::clone(file));
        d.dir |= new_segment;
    }

    /// Syncs what was written before this call. Called by the flusher
    /// before sled's flush.
    pub(crate) fn sync(&self, spool: &Path) -> std::io::Result<()> {
        let (files, dir) = {
            let mut d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut d.files), std::mem::take(&mut d.dir))
        };
        let restore = |files: HashMap<(u16, u64), Arc<std::fs::File>>| {
            // Keep them dirty: the next flush must try again.
            let mut d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            d.files.extend(files);
            d.dir |= dir;
        };
        for f in files.values() {
            if let Err(e) = f.sync_data() {
                restore(files);
                return Err(e);
            }
        }
        if dir {
            if let Err(e) = std::fs::File::open(spool.join(BODIES_DIR)).and_then(|d| d.sync_all()) {
                restore(files);
                return Err(e);
            }
        }
        Ok(())
    }
}

struct Segment {
    seq: u64,
    /// For appends (`pwrite`), the flusher's fdatasync and reads.
    file: Arc<std::fs::File>,
    len: u64,
}

/// One shard's segments. Single-threaded (lives in its partition).
pub(crate) struct BodyLog {
    dir: PathBuf,
    shard: u16,
    current: RefCell<Option<Segment>>,
    next_seq: std::cell::Cell<u64>,
    /// Messages per segment still in the spool.
    live: RefCell<HashMap<u64, u64>>,
    /// Read handles, opened on demand.
    readers: RefCell<HashMap<u64, Arc<std::fs::File>>>,
    dirty: Arc<Dirty>,
}

impl std::fmt::Debug for BodyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyLog")
            .field("shard", &self.shard)
            .field("live", &self.live.borrow())
            .finish_non_exhaustive()
    }
}

fn segment_name(shard: u16, seq: u64) -> String {
    format!("{shard:05}-{seq:012}.body")
}

fn parse_segment_name(name: &str) -> Option<(u16, u64)> {
    let stem = name.strip_suffix(".body")?;
    let (shard, seq) = stem.split_once('-')?;
    Some((shard.parse().ok()?, seq.parse().ok()?))
}

/// The shards that have segments under `spool` (their trees may not have
/// reached sled's disk before a crash).
pub(crate) fn shards_with_segments(spool: &Path) -> Result<Vec<u16>, SpoolError> {
    let mut shards: Vec<u16> = list_segments(&spool.join(BODIES_DIR))?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    shards.dedup();
    Ok(shards)
}

/// Every segment in `dir` as (shard, segment number), sorted; none if the
/// directory does not exist. Other files are ignored.
fn list_segments(dir: &Path) -> Result<Vec<(u16, u64)>, SpoolError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(e)),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let name = entry.map_err(io_err)?.file_name();
        if let Some(seg) = name.to_str().and_then(parse_segment_name) {
            segments.push(seg);
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

fn io_err(e: std::io::Error) -> SpoolError {
    SpoolError::Storage(sled::Error::Io(e))
}

impl BodyLog {
    /// Opens `shard`'s series under `spool`, given the segments its
    /// pointers refer to (`live`: segment -> messages) and its watermark.
    /// Deletes this shard's segments nothing refers to (records of messages
    /// never acknowledged, or all removed). Appends go to a new segment,
    /// numbered above every segment and the watermark (a number below the
    /// watermark would never be replayed).
    pub(crate) fn open(
        spool: &Path,
        shard: u16,
        live: HashMap<u64, u64>,
        watermark: Position,
        dirty: Arc<Dirty>,
    ) -> Result<BodyLog, SpoolError> {
        let dir = spool.join(BODIES_DIR);
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let mut max_seq = live.keys().copied().max().unwrap_or(0).max(watermark.0);
        for (_, seq) in list_segments(&dir)?
            .into_iter()
            .filter(|&(s, _)| s == shard)
        {
            max_seq = max_seq.max(seq);
            if !live.contains_key(&seq) {
                tracing::debug!(shard, seq, "removing unreferenced body segment");
                std::fs::remove_file(dir.join(segment_name(shard, seq))).map_err(io_err)?;
            }
        }
        Ok(BodyLog {
            dir,
            shard,
            current: RefCell::new(None),
            next_seq: std::cell::Cell::new(max_seq + 1),
            live: RefCell::new(live),
            readers: RefCell::new(HashMap::new()),
            dirty,
        })
    }

    /// Appends one record: `envelope` and the body `parts` (concatenated).
    /// `restore`: the start-up replay restores it if sled lost it. Durable
    /// with the next flush of the spool; returns where the body is and
    /// where the record ends. On error nothing refers to the bytes written.
    ///
    /// Synchronous on purpose (see the module docs): no other task of the
    /// shard runs between the reservation and the write, so records finish
    /// in order, and the caller can put the pointer and watermark into sled
    /// before anything else appends.
    pub(crate) fn append(
        &self,
        id: SpoolId,
        envelope: &[u8],
        parts: &[&[u8]],
        restore: bool,
    ) -> Result<(BodyRef, Position), SpoolError> {
        let flags = if restore { FLAG_REPLAY } else { 0 };
        let (record, crc) = encode_record(id, flags, envelope, parts);
        let total = record.len() as u64;
        let new_segment = self.ensure_room(total)?;
        let mut cur = self.current.borrow_mut();
        let seg = cur.as_mut().expect("ensure_room opened a segment");
        let offset = seg.len;
        if let Err(e) = seg.file.write_all_at(&record, offset) {
            // Part of it may be on disk: nothing may follow it in this
            // segment (the replay reads a segment up to its first invalid
            // record). Appends go to a new one.
            let seq = seg.seq;
            drop(cur);
            self.close_current();
            tracing::warn!(shard = self.shard, segment = seq, error = %e, "body segment write failed; starting a new segment");
            return Err(io_err(e));
        }
        seg.len += total;
        *self.live.borrow_mut().entry(seg.seq).or_insert(0) += 1;
        self.dirty
            .mark((self.shard, seg.seq), &seg.file, new_segment);
        let body_len = total - (RECORD_HEADER + envelope.len()) as u64;
        Ok((
            BodyRef {
                segment: seg.seq,
                offset: offset + total - body_len,
                len: body_len,
                crc,
            },
            (seg.seq, offset + total),
        ))
    }

    /// Closes the current segment for appends (deleted if nothing in it
    /// is live).
    fn close_current(&self) {
        let old = self.current.borrow_mut().take();
        if let Some(old) = old {
            self.maybe_delete(old.seq);
        }
    }

    /// Makes sure the current segment can take `len` more octets; returns
    /// whether a segment was created.
    fn ensure_room(&self, len: u64) -> Result<bool, SpoolError> {
        let magic = SEGMENT_MAGIC.len() as u64;
        let fits = self
            .current
            .borrow()
            .as_ref()
            .is_some_and(|seg| seg.len == magic || seg.len + len <= SEGMENT_BYTES);
        if fits {
            return Ok(false);
        }
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        let path = self.dir.join(segment_name(self.shard, seq));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err)?;
        if let Err(e) = file.write_all_at(SEGMENT_MAGIC, 0) {
            let _ = std::fs::remove_file(&path);
            return Err(io_err(e));
        }
        self.close_current();
        *self.current.borrow_mut() = Some(Segment {
            seq,
            file: Arc::new(file),
            len: magic,
        });
        Ok(true)
    }

    /// The body at `r`, checked against its CRC.
    pub(crate) fn read(&self, id: SpoolId, r: &BodyRef) -> Result<Vec<u8>, SpoolError> {
        let file = self.reader(r.segment)?;
        let mut buf = vec![0u8; r.len as usize];
        file.read_exact_at(&mut buf, r.offset).map_err(io_err)?;
        if crc32fast::hash(&buf) != r.crc {
            return Err(SpoolError::Corrupt {
                what: "body".into(),
                reason: format!("message {id}: CRC mismatch in segment {}", r.segment),
            });
        }
        Ok(buf)
    }

    fn reader(&self, seq: u64) -> Result<Arc<std::fs::File>, SpoolError> {
        if let Some(seg) = self.current.borrow().as_ref().filter(|s| s.seq == seq) {
            return Ok(Arc::clone(&seg.file));
        }
        if let Some(f) = self.readers.borrow().get(&seq) {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(
            std::fs::File::open(self.dir.join(segment_name(self.shard, seq))).map_err(io_err)?,
        );
        self.readers.borrow_mut().insert(seq, Arc::clone(&f));
        Ok(f)
    }

    /// The segment directory (for [`SegmentReader`]s on other threads).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// A message whose body is in `seq` left the spool (durably).
    pub(crate) fn release(&self, seq: u64) {
        let remaining = {
            let mut live = self.live.borrow_mut();
            let n = live.entry(seq).or_insert(1);
            *n = n.saturating_sub(1);
            *n
        };
        if remaining == 0 {
            self.maybe_delete(seq);
        }
    }

    fn maybe_delete(&self, seq: u64) {
        let is_current = self.current.borrow().as_ref().is_some_and(|s| s.seq == seq);
        let empty = self.live.borrow().get(&seq).is_none_or(|n| *n == 0);
        if is_current || !empty {
            return;
        }
        self.live.borrow_mut().remove(&seq);
        self.readers.borrow_mut().remove(&seq);
        let path = self.dir.join(segment_name(self.shard, seq));
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!(shard = self.shard, seq, "body segment deleted"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete body segment")
            }
        }
    }

    /// Segments with live messages (tests).
    #[cfg(test)]
    pub(crate) fn live_segments(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.live.borrow().keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Reads bodies of one shard's series from any thread (the delivery shard
/// reading a body its home shard wrote). Keeps the last segment it read open:
/// reads mostly hit the current segment. Never writes or deletes.
#[derive(Debug)]
pub(crate) struct SegmentReader {
    dir: PathBuf,
    shard: u16,
    last: Mutex<Option<(u64, Arc<std::fs::File>)>>,
}

impl SegmentReader {
    pub(crate) fn new(dir: PathBuf, shard: u16) -> Self {
        SegmentReader {
            dir,
            shard,
            last: Mutex::new(None),
        }
    }

    /// The body at `r`, checked against its CRC. A segment deleted meanwhile
    /// (its messages all completed) reads as an I/O error.
    pub(crate) fn read(&self, id: SpoolId, r: &BodyRef) -> Result<Vec<u8>, SpoolError> {
        let file = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            match last.as_ref() {
                Some((seq, f)) if *seq == r.segment => Arc::clone(f),
                _ => {
                    let f = Arc::new(
                        std::fs::File::open(self.dir.join(segment_name(self.shard, r.segment)))
                            .map_err(io_err)?,
                    );
                    *last = Some((r.segment, Arc::clone(&f)));
                    f
                }
            }
        };
        let mut buf = vec![0u8; r.len as usize];
        file.read_exact_at(&mut buf, r.offset).map_err(io_err)?;
        if crc32fast::hash(&buf) != r.crc {
            return Err(SpoolError::Corrupt {
                what: "body".into(),
                reason: format!("message {id}: CRC mismatch in segment {}", r.segment),
            });
        }
        Ok(buf)
    }
}

/// Checks for the `spool_segment` fuzz target (and a unit test): arbitrary
/// bytes parsed as a segment never panic and yield only records that lie
/// inside it, in order, with a body matching its CRC; and records encoded
/// from those bytes parse back to exactly what was written, even with the
/// bytes appended as a torn tail.
#[cfg(any(test, fuzzing))]
pub(crate) fn fuzz_segment(data: &[u8]) {
    let mut out = Vec::new();
    let stop = records_in(data, 7, 0, &mut out);
    assert!(stop <= data.len().max(SEGMENT_MAGIC.len()));
    let mut prev_end = SEGMENT_MAGIC.len() as u64;
    for r in &out {
        assert!(r.body.offset >= prev_end && r.end.1 >= r.body.offset + r.body.len);
        assert!(r.end.1 <= data.len() as u64);
        let body = &data[r.body.offset as usize..(r.body.offset + r.body.len) as usize];
        assert_eq!(crc32fast::hash(body), r.body.crc);
        prev_end = r.end.1;
    }
    // Round trip: the input split into envelope and body, twice, then the
    // input itself as garbage after them.
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (envelope, body) = data.split_at(cut);
    let mut segment = SEGMENT_MAGIC.to_vec();
    let mut written = Vec::new();
    for (i, restore) in [(1u64, true), (2, false)] {
        let (rec, crc) = encode_record(SpoolId::from_u64(i), u8::from(restore), envelope, &[body]);
        let at = segment.len() as u64;
        segment.extend_from_slice(&rec);
        written.push((i, restore, at, crc, segment.len() as u64));
    }
    let complete = segment.len();
    segment.extend_from_slice(data);
    let mut back = Vec::new();
    let stop = records_in(&segment, 7, 0, &mut back);
    assert!(stop >= complete, "the two records written are read back");
    for ((i, restore, at, crc, end), r) in written.iter().zip(&back) {
        assert_eq!(r.id, SpoolId::from_u64(*i));
        assert_eq!(r.restore, *restore);
        assert_eq!(r.envelope, envelope);
        assert_eq!(r.body.crc, *crc);
        assert_eq!(r.body.offset, at + (RECORD_HEADER + envelope.len()) as u64);
        assert_eq!(r.end, (7, *end));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_damaged_one_ends_the_segment() {
        fuzz_segment(b"");
        fuzz_segment(b"\x05envelope then body");
        let mut seg = SEGMENT_MAGIC.to_vec();
        for id in 1..=3u64 {
            let (rec, _) =
                encode_record(SpoolId::from_u64(id), FLAG_REPLAY, b"{}", &[b"ab", b"cd"]);
            seg.extend_from_slice(&rec);
        }
        let mut out = Vec::new();
        assert_eq!(records_in(&seg, 1, 0, &mut out), seg.len());
        assert_eq!(out.len(), 3);
        // Starting at the second record's offset skips the first.
        let mut tail = Vec::new();
        records_in(&seg, 1, out[0].end.1, &mut tail);
        assert_eq!(
            tail.iter().map(|r| r.id).collect::<Vec<_>>(),
            [2, 3].map(SpoolId::from_u64)
        );
        // One flipped bit in the second record's body: only the first
        // survives (nothing after a torn record is trusted).
        let body_at = out[1].body.offset as usize;
        seg[body_at] ^= 1;
        let mut damaged = Vec::new();
        assert_eq!(records_in(&seg, 1, 0, &mut damaged), out[0].end.1 as usize);
        assert_eq!(damaged.len(), 1);
        // So does a truncated one, and a damaged header.
        let mut short = Vec::new();
        records_in(&seg[..out[2].end.1 as usize - 1], 1, 0, &mut short);
        assert_eq!(short.len(), 1);
        seg[body_at] ^= 1;
        seg[out[0].end.1 as usize + 17] ^= 0x80; // second record's envelope length
        let mut bad_header = Vec::new();
        records_in(&seg, 1, 0, &mut bad_header);
        assert_eq!(bad_header.len(), 1);
    }

    #[test]
    fn body_ref_round_trip_and_names() {
        let r = BodyRef {
            segment: 7,
            offset: 1 << 40,
            len: 12345,
            crc: 0xdead_beef,
        };
        assert_eq!(BodyRef::decode(&r.encode()).unwrap(), r);
        assert!(BodyRef::decode(&[1, 2, 3]).is_err());
        assert_eq!(parse_segment_name(&segment_name(3, 42)), Some((3, 42)));
        assert_eq!(parse_segment_name("x.body"), None);
    }
}
