//! Message bodies in append-only segment files, one series per shard.
//!
//! Why not in sled: sled 0.34 rewrites a whole B-tree node (up to 17
//! values) every 10th update of it and on every split. With bodies as
//! values that meant 594 KB written to disk per 100 KiB message and 40 KB per
//! 5 KiB one (measured with `/proc/PID/io`), and the disk, not the CPU,
//! limited throughput. Here a body is written once: appended to the shard's
//! current segment (`bodies/SSSSS-NNNNNNNNNNNN.body`) with an io_uring write,
//! so the shard never blocks; sled keeps only a small pointer
//! (`b'P' ++ id` -> segment, offset, length, CRC-32) next to the envelope.
//!
//! Durability: the write is registered with the [`Dirty`] set *before* the
//! writer takes its flush ticket, and the flusher `fdatasync`s every dirty
//! segment (and the directory when a segment was created) before it flushes
//! sled. So when the envelope and pointer are durable, the body is too. A body
//! whose envelope never became durable is garbage, removed with its segment.
//!
//! Space: a segment is deleted once every message in it was removed (live
//! counts are rebuilt from the pointers at start-up); a restart starts a new
//! segment and deletes segments no pointer refers to.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
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
    /// For appends (io_uring; the shard never blocks on them).
    writer: Rc<glommio::io::BufferedFile>,
    /// For the flusher's fdatasync and for reads.
    file: Arc<std::fs::File>,
    len: u64,
}

/// One shard's body segments. Single-threaded (lives in its partition).
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
    /// Serialises segment creation (it awaits the open).
    creating: glommio::sync::Semaphore,
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

fn io_err(e: std::io::Error) -> SpoolError {
    SpoolError::Storage(sled::Error::Io(e))
}

impl BodyLog {
    /// Opens `shard`'s series under `spool`, given the segments its
    /// pointers refer to (`live`: segment -> messages). Deletes this shard's
    /// segments nothing refers to (bodies of messages never acknowledged, or
    /// all removed). Appends go to a new segment.
    pub(crate) fn open(
        spool: &Path,
        shard: u16,
        live: HashMap<u64, u64>,
        dirty: Arc<Dirty>,
    ) -> Result<BodyLog, SpoolError> {
        let dir = spool.join(BODIES_DIR);
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let mut max_seq = live.keys().copied().max().unwrap_or(0);
        for entry in std::fs::read_dir(&dir).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name();
            let Some((s, seq)) = name.to_str().and_then(parse_segment_name) else {
                continue;
            };
            if s != shard {
                continue;
            }
            max_seq = max_seq.max(seq);
            if !live.contains_key(&seq) {
                tracing::debug!(shard, seq, "removing unreferenced body segment");
                std::fs::remove_file(entry.path()).map_err(io_err)?;
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
            creating: glommio::sync::Semaphore::new(1),
        })
    }

    /// Appends `parts` (concatenated) as one body; durable with the next
    /// flush of the spool. On error nothing refers to the bytes written.
    pub(crate) async fn append(&self, parts: &[&[u8]]) -> Result<BodyRef, SpoolError> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut buf = Vec::with_capacity(len as usize);
        for p in parts {
            buf.extend_from_slice(p);
        }
        let crc = crc32fast::hash(&buf);
        let new_segment = self.ensure_room(len).await?;
        let (seq, writer, file, offset) = {
            let mut cur = self.current.borrow_mut();
            let seg = cur.as_mut().expect("ensure_room opened a segment");
            let offset = seg.len;
            // Reserve the range and count the message before the await, so
            // a concurrent append on this shard gets the next range and the
            // segment cannot be deleted under us.
            seg.len += len;
            *self.live.borrow_mut().entry(seg.seq).or_insert(0) += 1;
            (
                seg.seq,
                Rc::clone(&seg.writer),
                Arc::clone(&seg.file),
                offset,
            )
        };
        if let Err(e) = Self::write_all_at(&writer, buf, offset).await {
            self.release(seq);
            return Err(e);
        }
        self.dirty.mark((self.shard, seq), &file, new_segment);
        Ok(BodyRef {
            segment: seq,
            offset,
            len,
            crc,
        })
    }

    async fn write_all_at(
        writer: &glommio::io::BufferedFile,
        buf: Vec<u8>,
        offset: u64,
    ) -> Result<(), SpoolError> {
        let len = buf.len();
        if len == 0 {
            return Ok(());
        }
        let n = writer
            .write_at(buf, offset)
            .await
            .map_err(|e| io_err(e.into()))?;
        // A regular file only writes short when it cannot take more (file
        // size limit, full disk): a failure like any other.
        if n < len {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write to body segment ({n} of {len} octets)"),
            )));
        }
        Ok(())
    }

    /// Makes sure the current segment can take `len` more octets; returns
    /// whether a segment was created. One creation at a time per shard.
    async fn ensure_room(&self, len: u64) -> Result<bool, SpoolError> {
        let fits = |cur: &Option<Segment>| {
            cur.as_ref()
                .is_some_and(|seg| seg.len == 0 || seg.len + len <= SEGMENT_BYTES)
        };
        if fits(&self.current.borrow()) {
            return Ok(false);
        }
        let _permit = self.creating.acquire_permit(1).await;
        if fits(&self.current.borrow()) {
            return Ok(false); // another append created it meanwhile
        }
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        let path = self.dir.join(segment_name(self.shard, seq));
        let writer = glommio::io::OpenOptions::new()
            .write(true)
            .create_new(true)
            .buffered_open(&path)
            .await
            .map_err(|e| io_err(e.into()))?;
        let file = std::fs::File::open(&path).map_err(io_err)?;
        let old = self.current.borrow_mut().replace(Segment {
            seq,
            writer: Rc::new(writer),
            file: Arc::new(file),
            len: 0,
        });
        if let Some(old) = old {
            // Closed for appends; delete it now if everything in it is gone.
            self.maybe_delete(old.seq);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
