//! The durable spool: a plain store of accepted messages (KumoMTA style).
//!
//! The spool only stores, loads, updates, removes and enumerates messages by
//! their time-ordered [`SpoolId`]; scheduling lives in the queue, which is
//! rebuilt from [`Partition::envelopes`] at start-up.
//!
//! Storage: one sled [`sled::Db`] per process (sled holds a file lock), one
//! tree `shard-N` per glommio shard, and per shard a body log (append-only
//! segment files under `bodies/`, see [`bodies`]) holding one record per
//! message: envelope and body. Inside a tree a message is these keys:
//!
//! * `b'E' ++ id (8 bytes BE)` -> [`Envelope`] record (format byte + JSON)
//! * `b'P' ++ id (8 bytes BE)` -> where the body is in the shard's body log
//! * `b'B' ++ id` -> the body itself, in spools written by earlier builds
//!   (still read and removed)
//!
//! and `b"W"`, the shard's watermark in its body log. The prefixes keep all
//! envelopes contiguous, so enumerating for the queue rebuild, counting and
//! `max_id` never read a body. See `docs/spool.md` for the layout.
//!
//! Durability (see [`flusher`]): a store resolves `Ok` once its record is
//! `fdatasync`ed (a group-committed *journal* flush); sled, only in memory
//! until flushed, follows within `SpoolOptions::index_flush_interval`, and
//! what it lost in a crash is replayed from the body log at open. Updates,
//! removals and bounce swaps await a *full* flush (segments, then sled's
//! `flush` and an `fdatasync` of its log), except a delivered message's
//! removal, which is not waited for. A failed flush surfaces as
//! [`SpoolError`], whose [`SpoolError::reply`] is the transient `452 4.3.1`
//! to send instead of `250`.

mod bodies;
mod envelope;
mod flusher;
mod health;
mod id;
#[cfg(test)]
mod tests;

/// Entry points for the `spool_segment` fuzz target (`cfg(fuzzing)` only).
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzz_harness {
    /// Parses `data` as a body-log segment and checks the invariants of
    /// `bodies::fuzz_segment`; panics on a violation.
    pub fn segment(data: &[u8]) {
        super::bodies::fuzz_segment(data);
    }
}

pub use envelope::{Envelope, Recipient, RecipientState};
pub use health::{SpoolOptions, WriteState};
pub use id::{ParseSpoolIdError, SpoolId, SpoolIdGenerator, ID_EPOCH_UNIX_MS, ID_TEXT_LEN};

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bodies::{BodyLog, BodyRef, Dirty, Position, SegmentReader};
use flusher::{Flusher, Kind};
use health::{Health, SpaceCheck};

use crate::smtp::reply::{EnhancedCode, Reply};

const ENVELOPE_PREFIX: u8 = b'E';
const BODY_PREFIX: u8 = b'B';
/// Where the body lives in the body log: `b'P' ++ id` -> [`BodyRef`].
const POINTER_PREFIX: u8 = b'P';
/// The shard's watermark in its body log: every record before it went into
/// sled (see [`bodies`]; the start-up replay begins there).
const WATERMARK_KEY: &[u8] = b"W";
/// sled's segment (and log buffer) size. sled writes any log item over a
/// quarter of a segment - a whole tree node when it consolidates one - to a
/// `blobs/` file it never fsyncs. A leaf holds at most 17 entries; with the
/// bodies elsewhere (see [`bodies`]) they are envelopes (about 100 KiB at
/// 1000 recipients) and 28-octet pointers, so a node stays under the 2 MiB
/// limit of 8 MiB segments. sled's default is 512 KiB.
const SEGMENT_SIZE: usize = 8 << 20;
const TREE_PREFIX: &str = "shard-";

fn key(prefix: u8, id: SpoolId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn id_from_key(k: &[u8]) -> Result<SpoolId, SpoolError> {
    let raw: [u8; 8] = k
        .get(1..9)
        .and_then(|s| s.try_into().ok())
        .filter(|_| k.len() == 9)
        .ok_or_else(|| SpoolError::Corrupt {
            what: "key".into(),
            reason: format!("unexpected key length {}", k.len()),
        })?;
    Ok(SpoolId::from_u64(u64::from_be_bytes(raw)))
}

/// Everything that can go wrong in the spool. All variants are transient from
/// the client's point of view: the message was *not* accepted.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process holds the sled lock on this directory.
    #[error("spool {} is locked by another process", path.display())]
    Locked {
        /// The spool directory.
        path: PathBuf,
    },
    /// The directory cannot be created or written.
    #[error("spool {} is not writable: {source}", path.display())]
    NotWritable {
        /// The spool directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// sled reported an error (I/O failure, full disk, failed flush).
    #[error("spool storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A record could not be decoded.
    #[error("corrupt spool record ({what}): {reason}")]
    Corrupt {
        /// Which kind of record.
        what: String,
        /// Decoder message.
        reason: String,
    },
    /// `update` of a message that is not in the spool.
    #[error("message {0} is not in the spool")]
    NotFound(SpoolId),
    /// Writing the message would leave less than `spool.min_free_space` on
    /// the spool's file system (nothing was written).
    #[error("spool file system has {free} octets free, {needed} needed with the reserve")]
    InsufficientSpace {
        /// Free octets seen.
        free: u64,
        /// Octets needed: the message plus the reserve.
        needed: u64,
    },
    /// Writes are refused: a flush stalled or failed (see [`WriteState`]).
    #[error("spool is not writable ({})", .0.as_str())]
    Unavailable(WriteState),
}

impl SpoolError {
    /// The SMTP reply to send instead of accepting the message.
    pub fn reply(&self) -> Reply {
        match self {
            Self::Locked { .. }
            | Self::NotWritable { .. }
            | Self::Storage(_)
            | Self::InsufficientSpace { .. }
            | Self::Unavailable(_) => Reply::new(
                452,
                EnhancedCode::new(4, 3, 1),
                "Insufficient system storage, try again later",
            ),
            Self::Corrupt { .. } | Self::NotFound(_) => Reply::new(
                451,
                EnhancedCode::new(4, 3, 0),
                "Local error in processing, try again later",
            ),
        }
    }

    fn from_open(path: &Path, e: sled::Error) -> Self {
        match e {
            // sled reports the flock failure as a formatted Io error.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                Self::Locked {
                    path: path.to_path_buf(),
                }
            }
            sled::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                Self::NotWritable {
                    path: path.to_path_buf(),
                    source: io,
                }
            }
            other => Self::Storage(other),
        }
    }
}

/// The process-wide store (Clone + Send + Sync; wraps `sled::Db`). One per
/// process: opening a locked spool is an error with a clear message.
#[derive(Clone)]
pub struct Spool {
    db: sled::Db,
    path: PathBuf,
    health: Arc<Health>,
    flusher: Arc<Flusher>,
    dirty: Arc<Dirty>,
    /// Messages the start-up replay put back into sled.
    restored: usize,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish()
    }
}

impl Spool {
    /// Opens (creating if needed) the spool directory with default
    /// [`SpoolOptions`] (no free-space reserve).
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        Self::open_with(path, SpoolOptions::default())
    }

    /// Opens (creating if needed) the spool directory.
    pub fn open_with(path: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(path).map_err(|source| SpoolError::NotWritable {
            path: path.to_path_buf(),
            source,
        })?;
        let segment_size = match stored_segment_size(path) {
            Some(old) if old != SEGMENT_SIZE => {
                tracing::warn!(
                    path = %path.display(),
                    segment_size = old,
                    "spool created by an older sluice with small sled segments: messages \
                     over about 100 KiB are not safe from power loss in it; drain it and \
                     start on a fresh spool directory"
                );
                old
            }
            _ => SEGMENT_SIZE,
        };
        let db = sled::Config::new()
            .path(path)
            .segment_size(segment_size)
            // Only our flusher makes sled durable: it syncs the body
            // segments first, so a durable pointer always has its body.
            .flush_every_ms(None)
            .open()
            .map_err(|e| SpoolError::from_open(path, e))?;
        let restored = restore_from_segments(&db, path)?;
        tracing::debug!(path = %path.display(), recovered = db.was_recovered(), restored, "spool opened");
        // The directory entries of the spool (and of sled's files in it) must
        // survive power loss too; sled does not sync directories.
        sync_dir(path).map_err(|source| SpoolError::NotWritable {
            path: path.to_path_buf(),
            source,
        })?;
        let dirty = Arc::new(Dirty::default());
        let lazy = options.index_flush_interval;
        let health = Arc::new(Health::new(path.to_path_buf(), options));
        let flusher = Flusher::start(
            db.clone(),
            path,
            Arc::clone(&dirty),
            lazy,
            Arc::clone(&health),
        )
        .map_err(|source| SpoolError::NotWritable {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Spool {
            db,
            path: path.to_path_buf(),
            health,
            flusher: Arc::new(flusher),
            dirty,
            restored,
        })
    }

    /// Messages that sled had lost in a crash and the start-up replay of
    /// the body log restored when this spool was opened.
    pub fn restored(&self) -> usize {
        self.restored
    }

    /// Whether writes are accepted (process-wide).
    pub fn write_state(&self) -> WriteState {
        self.health.state()
    }

    /// The spool directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The partition of `shard`. Open it once per shard and share it (it is
    /// cheap to clone): the group commit and the message count live in it.
    pub fn partition(&self, shard: u16) -> Result<Partition, SpoolError> {
        let tree = self.db.open_tree(format!("{TREE_PREFIX}{shard}"))?;
        let mut len = 0usize;
        for k in tree.scan_prefix([ENVELOPE_PREFIX]).keys() {
            k?;
            len += 1;
        }
        // Which body segments are still referenced, and by how many messages.
        // A pointer without its envelope (a crash between a removal's two
        // writes, see `remove_keys`) is dropped.
        let mut live = std::collections::HashMap::new();
        for kv in tree.scan_prefix([POINTER_PREFIX]) {
            let (k, v) = kv?;
            let id = id_from_key(&k)?;
            if !tree.contains_key(key(ENVELOPE_PREFIX, id))? {
                tree.remove(&k)?;
                continue;
            }
            *live.entry(BodyRef::decode(&v)?.segment).or_insert(0u64) += 1;
        }
        let watermark = watermark(&tree)?;
        let bodies = BodyLog::open(&self.path, shard, live, watermark, Arc::clone(&self.dirty))?;
        let label = shard.to_string();
        metrics::gauge!("sluice_spool_messages", "shard" => label.clone()).set(len as f64);
        // Again here: `open` may run before the metrics recorder exists.
        self.health.publish(self.health.state());
        Ok(Partition {
            inner: Rc::new(PartitionInner {
                tree,
                shard,
                len: Cell::new(len),
                label,
                health: Arc::clone(&self.health),
                space: SpaceCheck::default(),
                flusher: Arc::clone(&self.flusher),
                bodies,
            }),
        })
    }

    /// Which shard trees exist, ascending (a restart with fewer shards must
    /// still find every message).
    pub fn partitions(&self) -> Result<Vec<u16>, SpoolError> {
        let mut shards: Vec<u16> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|n| {
                std::str::from_utf8(n)
                    .ok()?
                    .strip_prefix(TREE_PREFIX)?
                    .parse()
                    .ok()
            })
            .collect();
        shards.sort_unstable();
        Ok(shards)
    }

    fn trees(&self) -> Result<Vec<sled::Tree>, SpoolError> {
        self.partitions()?
            .into_iter()
            .map(|s| Ok(self.db.open_tree(format!("{TREE_PREFIX}{s}"))?))
            .collect()
    }

    /// Messages across all partitions (walks the envelope keys: CLI use).
    pub fn count(&self) -> Result<u64, SpoolError> {
        let mut n = 0u64;
        for tree in self.trees()? {
            for k in tree.scan_prefix([ENVELOPE_PREFIX]).keys() {
                k?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Up to `limit` envelopes across partitions, in id order (oldest first).
    pub fn list(&self, limit: usize) -> Result<Vec<Envelope>, SpoolError> {
        let mut all = Vec::new();
        for tree in self.trees()? {
            // Each tree is id-ordered, so its first `limit` are the only
            // candidates for the global first `limit`.
            for item in tree.scan_prefix([ENVELOPE_PREFIX]).values().take(limit) {
                all.push(Envelope::decode(&item?)?);
            }
        }
        all.sort_by_key(|e| e.id);
        all.truncate(limit);
        Ok(all)
    }

    /// The highest id in the spool, to seed [`SpoolIdGenerator::new`] after a
    /// restart.
    pub fn max_id(&self) -> Result<Option<SpoolId>, SpoolError> {
        let mut max = None;
        for tree in self.trees()? {
            if let Some(k) = tree.scan_prefix([ENVELOPE_PREFIX]).keys().next_back() {
                max = max.max(Some(id_from_key(&k?)?));
            }
        }
        Ok(max)
    }

    /// A read-only handle on partition `partition` (Send + Sync), for the
    /// delivery shard that reads bodies from their home shard's tree and body
    /// log. It never writes, so the home shard stays the only writer.
    pub fn reader(&self, partition: u16) -> Result<PartitionReader, SpoolError> {
        let tree = self.db.open_tree(format!("{TREE_PREFIX}{partition}"))?;
        Ok(PartitionReader {
            tree,
            partition,
            bodies: Arc::new(SegmentReader::new(
                self.path.join(bodies::BODIES_DIR),
                partition,
            )),
        })
    }

    /// Blocking flush for shutdown / CLI only: never call on a shard. Refused
    /// when a flush stalled or failed (sled would hang).
    pub fn flush_blocking(&self) -> Result<(), SpoolError> {
        match self.health.state() {
            WriteState::Ok => {}
            other => return Err(SpoolError::Unavailable(other)),
        }
        futures_lite::future::block_on(self.flusher.flush(Kind::Full))?;
        Ok(())
    }
}

/// The watermark of a shard's tree (the start of its segments if none).
fn watermark(tree: &sled::Tree) -> Result<Position, SpoolError> {
    match tree.get(WATERMARK_KEY)? {
        Some(v) => bodies::decode_position(&v),
        None => Ok((0, 0)),
    }
}

/// The start-up replay: puts back into sled every message whose record is
/// after its shard's watermark and that sled lost (a crash between the
/// journal flush that acknowledged it and the next full flush). Idempotent:
/// a message sled has is left alone. Returns how many were restored.
fn restore_from_segments(db: &sled::Db, path: &Path) -> Result<usize, SpoolError> {
    let mut restored = 0;
    for shard in bodies::shards_with_segments(path)? {
        let tree = db.open_tree(format!("{TREE_PREFIX}{shard}"))?;
        let records = bodies::replay(path, shard, watermark(&tree)?)?;
        let Some(last) = records.last().map(|r| r.end) else {
            continue;
        };
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for r in records.iter().filter(|r| r.restore) {
            let ekey = key(ENVELOPE_PREFIX, r.id);
            if tree.contains_key(ekey)? {
                continue;
            }
            Envelope::decode(&r.envelope)?; // never restore what cannot be read
            batch.insert(&ekey[..], &r.envelope[..]);
            batch.insert(&key(POINTER_PREFIX, r.id)[..], &r.body.encode()[..]);
            n += 1;
        }
        batch.insert(WATERMARK_KEY, &bodies::encode_position(last)[..]);
        tree.apply_batch(batch)?;
        if n > 0 {
            tracing::info!(
                shard,
                messages = n,
                "restored from the body log what sled lost in a crash"
            );
        }
        restored += n;
    }
    Ok(restored)
}

/// The segment size an existing sled database was created with (sled refuses
/// to open it with another), from its `conf` file.
fn stored_segment_size(path: &Path) -> Option<usize> {
    let conf = std::fs::read_to_string(path.join("conf")).ok()?;
    conf.lines()
        .find_map(|l| l.strip_prefix("segment_size:"))
        .and_then(|v| v.trim().parse().ok())
}

/// fsyncs a directory and its parent, so entries created in it are durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// One sled flush under the watchdog of [`health`]: a failure marks the
/// spool failed; a flush past `flush_timeout` answers its writers with an
/// error at once, marks the spool stalled, and is left to finish in the
/// background (clearing the stall if it succeeds).
async fn watched_flush<F>(flush: F, health: Arc<Health>) -> Result<usize, sled::Error>
where
    F: std::future::Future<Output = Result<usize, sled::Error>> + 'static,
{
    use futures_lite::future;
    let mut flush = Box::pin(flush);
    let timeout = health.options.flush_timeout;
    let finished = future::or(async { Some((&mut flush).await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await;
    match finished {
        Some(Ok(n)) => Ok(n),
        Some(Err(e)) => {
            health.fail(&e);
            Err(e)
        }
        None => {
            health.stall();
            glommio::spawn_local(async move {
                match flush.await {
                    Ok(_) => health.unstall(),
                    Err(e) => health.fail(&e),
                }
            })
            .detach();
            Err(sled::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("spool flush did not finish within {timeout:?}"),
            )))
        }
    }
}

struct PartitionInner {
    tree: sled::Tree,
    shard: u16,
    len: Cell<usize>,
    label: String,
    health: Arc<Health>,
    space: SpaceCheck,
    flusher: Arc<Flusher>,
    bodies: BodyLog,
}

/// One shard's partition. Used from one glommio executor (`!Send`); clone it
/// to share between that shard's tasks. Writes are durable when the future
/// resolves `Ok`.
#[derive(Clone)]
pub struct Partition {
    inner: Rc<PartitionInner>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("shard", &self.inner.shard)
            .field("len", &self.inner.len.get())
            .finish()
    }
}

impl Partition {
    /// The shard this partition belongs to.
    pub fn shard(&self) -> u16 {
        self.inner.shard
    }

    fn set_len(&self, len: usize) {
        self.inner.len.set(len);
        metrics::gauge!("sluice_spool_messages", "shard" => self.inner.label.clone())
            .set(len as f64);
    }

    /// sled's I/O errors are sticky (its "global error"): every later write
    /// fails or hangs, so the spool is marked failed.
    fn write_error(&self, e: sled::Error) -> SpoolError {
        if matches!(e, sled::Error::Io(_)) {
            self.inner.health.fail(&e);
        }
        SpoolError::Storage(e)
    }

    /// Refuses at once when the spool is not writable: sled would hang.
    fn check_writable(&self) -> Result<(), SpoolError> {
        match self.inner.health.state() {
            WriteState::Ok => Ok(()),
            other => {
                metrics::counter!("sluice_spool_refused_total", "reason" => other.as_str())
                    .increment(1);
                Err(SpoolError::Unavailable(other))
            }
        }
    }

    /// Awaits a flush of `kind` (see [`flusher`]) under the watchdog.
    async fn commit(&self, kind: Kind) -> Result<(), SpoolError> {
        self.check_writable()?;
        watched_flush(
            self.inner.flusher.flush(kind),
            Arc::clone(&self.inner.health),
        )
        .await?;
        Ok(())
    }

    /// Stores envelope and body atomically, then waits for a group-committed
    /// flush. `Ok` means the message is on disk and `250` may be sent.
    ///
    /// Refused with nothing written when the spool is not writable or the
    /// file system would keep less than `min_free_space` (see [`health`]).
    pub async fn store(&self, envelope: &Envelope, body: &[u8]) -> Result<(), SpoolError> {
        self.store_parts(envelope, &[body]).await
    }

    /// [`Partition::store`] with the body given in pieces (e.g. a trace
    /// header and the message), written as their concatenation without an
    /// extra copy.
    pub async fn store_parts(
        &self,
        envelope: &Envelope,
        parts: &[&[u8]],
    ) -> Result<(), SpoolError> {
        let started = Instant::now();
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        let id = envelope.id;
        self.check_writable()?;
        let record = envelope.encode();
        let needed = (record.len() + body_len) as u64;
        if let Err(free) = self.inner.space.check(&self.inner.health, needed) {
            metrics::counter!("sluice_spool_refused_total", "reason" => "low_space").increment(1);
            let needed = needed.saturating_add(self.inner.health.options.min_free_space);
            tracing::warn!(
                shard = self.inner.shard,
                free,
                needed,
                "spool file system below the reserve; refusing with 452 4.3.1"
            );
            return Err(SpoolError::InsufficientSpace { free, needed });
        }
        let tree = &self.inner.tree;
        let ekey = key(ENVELOPE_PREFIX, id);
        let existed = tree.contains_key(ekey)?;
        if existed {
            // Ids are unique; storing one twice would orphan a body.
            return Err(SpoolError::Corrupt {
                what: "store".into(),
                reason: format!("message {id} is already in the spool"),
            });
        }
        // Record, pointer and watermark without a yield in between, so the
        // watermark never passes a record that is not in sled.
        let (body, end) = match self.inner.bodies.append(id, &record, parts, true) {
            Ok(appended) => appended,
            Err(e) => {
                // Settle sled before the client hears 452 (a full disk hits
                // its pending writes too, and sled cannot recover from that
                // in-process): the spool's state is then known, not left to
                // a lazy flush that may fail a moment later.
                let _ = self.commit(Kind::Full).await;
                return Err(e);
            }
        };
        let pkey = key(POINTER_PREFIX, id);
        // Three plain inserts, not a sled `Batch`: every batch makes sled
        // write and `sync_file_range` its log buffer twice on its thread
        // pool (`pin_log`), which cost more CPU than the rest of a store.
        // Atomicity comes from the order instead: sled recovers a prefix
        // of its operations, and with pointer, envelope, watermark in this
        // order every prefix is either complete or repaired by the replay
        // (envelope missing: restored) or at start-up (pointer alone:
        // dropped, see `Spool::partition`).
        let inserted = tree
            .insert(pkey, &body.encode()[..])
            .and_then(|_| tree.insert(ekey, record))
            .and_then(|_| tree.insert(WATERMARK_KEY, &bodies::encode_position(end)[..]));
        if let Err(e) = inserted {
            self.inner.bodies.release(body.segment);
            return Err(self.write_error(e));
        }
        self.set_len(self.inner.len.get() + 1);
        // The record alone makes the message durable (the replay restores
        // what sled loses); sled itself follows within the index flush
        // interval.
        self.inner.flusher.note_lazy_write();
        if let Err(e) = self.commit(Kind::Journal).await {
            tracing::warn!(shard = self.inner.shard, %id, error = %e, "spool store failed");
            // The caller answers 4xx and the client retries: take the
            // not-durable copy out again so a later flush cannot turn it into
            // a duplicate delivery. Best effort: sled may refuse everything now.
            let mut undo = sled::Batch::default();
            undo.remove(&ekey[..]);
            undo.remove(&pkey[..]);
            if tree.apply_batch(undo).is_ok() {
                self.set_len(self.inner.len.get().saturating_sub(1));
                self.inner.bodies.release(body.segment);
            }
            return Err(e);
        }
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!("sluice_spool_write_seconds", "shard" => self.inner.label.clone())
            .record(secs);
        tracing::debug!(shard = self.inner.shard, %id, size = body_len, secs, "spooled");
        Ok(())
    }

    /// Envelope and body of `id`, if present.
    pub fn load(&self, id: SpoolId) -> Result<Option<(Envelope, Vec<u8>)>, SpoolError> {
        let Some(envelope) = self.load_envelope(id)? else {
            return Ok(None);
        };
        let tree = &self.inner.tree;
        if let Some(p) = tree.get(key(POINTER_PREFIX, id))? {
            let body = self.inner.bodies.read(id, &BodyRef::decode(&p)?)?;
            return Ok(Some((envelope, body)));
        }
        // Spools written before the body log kept bodies in sled.
        let first = tree
            .get(key(BODY_PREFIX, id))?
            .ok_or_else(|| SpoolError::Corrupt {
                what: "body".into(),
                reason: format!("message {id} has an envelope but no body"),
            })?;
        let mut body = Vec::with_capacity(usize::try_from(envelope.size).unwrap_or(0));
        body.extend_from_slice(&first);
        Ok(Some((envelope, body)))
    }

    /// The envelope of `id` alone (no body read).
    pub fn load_envelope(&self, id: SpoolId) -> Result<Option<Envelope>, SpoolError> {
        match self.inner.tree.get(key(ENVELOPE_PREFIX, id))? {
            Some(v) => Ok(Some(Envelope::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Replaces the envelope (recipient states) of a stored message; durable
    /// when it resolves `Ok`. Errors with [`SpoolError::NotFound`] if the
    /// message is not stored.
    pub async fn update(&self, envelope: &Envelope) -> Result<(), SpoolError> {
        let ekey = key(ENVELOPE_PREFIX, envelope.id);
        let tree = &self.inner.tree;
        // compare_and_swap would be exact, but only this shard writes this
        // tree, so check-then-insert cannot race.
        if !tree.contains_key(ekey)? {
            return Err(SpoolError::NotFound(envelope.id));
        }
        tree.insert(ekey, envelope.encode())
            .map_err(|e| self.write_error(e))?;
        self.commit(Kind::Full).await?;
        tracing::debug!(shard = self.inner.shard, id = %envelope.id, "spool updated");
        Ok(())
    }

    /// Removes `id`'s keys, envelope first (see `store_parts` for why not a
    /// `Batch`; a pointer left alone by a crash is dropped at start-up).
    fn remove_keys(&self, id: SpoolId) -> Result<(), sled::Error> {
        let tree = &self.inner.tree;
        tree.remove(key(ENVELOPE_PREFIX, id))?;
        tree.remove(key(POINTER_PREFIX, id))?;
        tree.remove(key(BODY_PREFIX, id))?;
        Ok(())
    }

    /// Removes a message (no-op if absent); durable when it resolves `Ok`.
    pub async fn remove(&self, id: SpoolId) -> Result<(), SpoolError> {
        let tree = &self.inner.tree;
        let ekey = key(ENVELOPE_PREFIX, id);
        let existed = tree.contains_key(ekey)?;
        let pkey = key(POINTER_PREFIX, id);
        let body = match tree.get(pkey)? {
            Some(p) => Some(BodyRef::decode(&p)?),
            None => None,
        };
        self.remove_keys(id).map_err(|e| self.write_error(e))?;
        if existed {
            self.set_len(self.inner.len.get().saturating_sub(1));
        }
        self.commit(Kind::Full).await?;
        // Durably gone: its bytes in the body log may go too.
        if let Some(b) = body {
            self.inner.bodies.release(b.segment);
        }
        tracing::debug!(shard = self.inner.shard, %id, "spool removed");
        Ok(())
    }

    /// Finishes a message whose recipients are all final, in ONE sled batch:
    /// removes `original` and, if given, stores its DSN (envelope + body) as
    /// a new message. A crash leaves either the original (the DSN is built
    /// again after the restart) or the DSN alone, never both and never
    /// neither.
    ///
    /// With a DSN it is durable when it resolves `Ok` (a full flush: the DSN
    /// exists only in sled, its record is not replayed). Without one it
    /// resolves at once and reaches the disk with the next full flush,
    /// within `SpoolOptions::index_flush_interval`: losing it in a crash means one
    /// more delivery of a delivered message (a duplicate, never a loss), as
    /// with any crash mid-delivery. The original's body space is released
    /// only once the removal is durable.
    pub async fn complete(
        &self,
        original: SpoolId,
        dsn: Option<(&Envelope, &[u8])>,
    ) -> Result<(), SpoolError> {
        let tree = &self.inner.tree;
        let okey = key(ENVELOPE_PREFIX, original);
        let existed = tree.contains_key(okey)?;
        let obody = match tree.get(key(POINTER_PREFIX, original))? {
            Some(p) => Some(BodyRef::decode(&p)?),
            None => None,
        };
        let Some((env, body)) = dsn else {
            self.remove_keys(original)
                .map_err(|e| self.write_error(e))?;
            if existed {
                self.set_len(self.inner.len.get() - 1);
            }
            let part = self.clone();
            let durable = self.inner.flusher.full_flush_soon();
            glommio::spawn_local(async move {
                // A failed flush wedges the spool: the space is then kept,
                // and the next start finds the message again.
                if durable.await.is_ok() {
                    if let Some(b) = obody {
                        part.inner.bodies.release(b.segment);
                    }
                }
            })
            .detach();
            tracing::debug!(shard = self.inner.shard, id = %original, "spool completed");
            return Ok(());
        };
        self.check_writable()?;
        let mut batch = sled::Batch::default();
        batch.remove(&okey[..]);
        batch.remove(&key(POINTER_PREFIX, original)[..]);
        batch.remove(&key(BODY_PREFIX, original)[..]);
        let record = env.encode();
        // Durable with the same (full) flush as the batch below.
        let (b, _) = self.inner.bodies.append(env.id, &record, &[body], false)?;
        batch.insert(&key(ENVELOPE_PREFIX, env.id)[..], record);
        batch.insert(&key(POINTER_PREFIX, env.id)[..], &b.encode()[..]);
        if let Err(e) = tree.apply_batch(batch) {
            self.inner.bodies.release(b.segment);
            return Err(self.write_error(e));
        }
        self.set_len(self.inner.len.get() + 1 - usize::from(existed));
        self.commit(Kind::Full).await?;
        if let Some(b) = obody {
            self.inner.bodies.release(b.segment);
        }
        tracing::debug!(shard = self.inner.shard, id = %original, dsn = %env.id, "spool completed");
        Ok(())
    }

    /// A read-only, `Send` handle on this partition.
    pub fn reader(&self) -> PartitionReader {
        PartitionReader {
            tree: self.inner.tree.clone(),
            partition: self.inner.shard,
            bodies: Arc::new(SegmentReader::new(
                self.inner.bodies.dir().to_path_buf(),
                self.inner.shard,
            )),
        }
    }

    /// Every envelope in id order, for the queue rebuild (bodies not read).
    pub fn envelopes(&self) -> impl Iterator<Item = Result<Envelope, SpoolError>> + '_ {
        self.inner
            .tree
            .scan_prefix([ENVELOPE_PREFIX])
            .values()
            .map(|v| Envelope::decode(&v?))
    }

    /// Messages in this partition.
    pub fn len(&self) -> usize {
        self.inner.len.get()
    }

    /// No messages in this partition.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flushes the spool has completed (process-wide: one flush serves
    /// every shard). Each covers one or more writes: with concurrent writers
    /// this is less than the number of writes.
    pub fn flush_count(&self) -> u64 {
        self.inner.flusher.flush_count()
    }

    /// Writes made durable by those flushes; `flushed_writes() /
    /// flush_count()` is the mean group-commit batch size.
    pub fn flushed_writes(&self) -> u64 {
        self.inner.flusher.covered_writes()
    }

    /// The largest number of writes one flush covered.
    pub fn max_flush_batch(&self) -> u64 {
        self.inner.flusher.max_batch()
    }
}

/// Read access to one partition from any thread (a delivery shard reading a
/// message from its home shard's partition). Cheap to clone; holds no body.
#[derive(Clone)]
pub struct PartitionReader {
    tree: sled::Tree,
    partition: u16,
    bodies: Arc<SegmentReader>,
}

impl std::fmt::Debug for PartitionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionReader")
            .field("partition", &self.partition)
            .finish()
    }
}

impl PartitionReader {
    /// The partition read.
    pub fn partition(&self) -> u16 {
        self.partition
    }

    /// The envelope of `id`, if stored.
    pub fn load_envelope(&self, id: SpoolId) -> Result<Option<Envelope>, SpoolError> {
        match self.tree.get(key(ENVELOPE_PREFIX, id))? {
            Some(v) => Ok(Some(Envelope::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The body of `id`, if stored: from the body log (a blocking `pread`,
    /// like a sled read that misses its cache), or, in spools from before the
    /// body log, the sled value itself (no copy).
    pub fn load_body(&self, id: SpoolId) -> Result<Option<bytes::Bytes>, SpoolError> {
        if let Some(p) = self.tree.get(key(POINTER_PREFIX, id))? {
            let body = self.bodies.read(id, &BodyRef::decode(&p)?)?;
            return Ok(Some(bytes::Bytes::from(body)));
        }
        Ok(self
            .tree
            .get(key(BODY_PREFIX, id))?
            .map(bytes::Bytes::from_owner))
    }
}
