//! The durable spool: a plain store of accepted messages (KumoMTA style).
//!
//! The spool only stores, loads, updates, removes and enumerates messages by
//! their time-ordered [`SpoolId`]; scheduling lives in the queue, which is
//! rebuilt from [`Partition::envelopes`] at start-up.
//!
//! Storage: one sled [`sled::Db`] per process (sled holds a file lock), one
//! tree `shard-N` per glommio shard. Inside a tree each message is two keys,
//! written atomically by one `Batch`:
//!
//! * `b'E' ++ id (8 bytes BE)` -> [`Envelope`] record (format byte + JSON)
//! * `b'B' ++ id (8 bytes BE)` -> body bytes
//!
//! The prefixes keep all envelopes contiguous, so enumerating for the queue
//! rebuild, counting and `max_id` never read a body. See `docs/spool.md` for
//! why bodies live in sled and the measurements behind it.
//!
//! Durability: `insert` in sled is only in memory until a flush, so every
//! mutating call awaits a group-committed `flush_async` (see
//! [`group_commit`]) before resolving `Ok`. A failed flush surfaces as
//! [`SpoolError`], whose [`SpoolError::reply`] is the transient `452 4.3.1`
//! to send instead of `250`.

mod envelope;
mod group_commit;
mod id;
#[cfg(test)]
mod tests;

pub use envelope::{Envelope, Recipient, RecipientState};
pub use id::{ParseSpoolIdError, SpoolId, SpoolIdGenerator, ID_EPOCH_UNIX_MS, ID_TEXT_LEN};

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use group_commit::GroupCommit;

use crate::smtp::reply::{EnhancedCode, Reply};

const ENVELOPE_PREFIX: u8 = b'E';
const BODY_PREFIX: u8 = b'B';
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
}

impl SpoolError {
    /// The SMTP reply to send instead of accepting the message.
    pub fn reply(&self) -> Reply {
        match self {
            Self::Locked { .. } | Self::NotWritable { .. } | Self::Storage(_) => Reply::new(
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
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish()
    }
}

impl Spool {
    /// Opens (creating if needed) the spool directory.
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(path).map_err(|source| SpoolError::NotWritable {
            path: path.to_path_buf(),
            source,
        })?;
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|e| SpoolError::from_open(path, e))?;
        tracing::debug!(path = %path.display(), recovered = db.was_recovered(), "spool opened");
        Ok(Spool {
            db,
            path: path.to_path_buf(),
        })
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
        let label = shard.to_string();
        metrics::gauge!("sluice_spool_messages", "shard" => label.clone()).set(len as f64);
        Ok(Partition {
            inner: Rc::new(PartitionInner {
                tree,
                shard,
                gc: GroupCommit::new(shard),
                len: Cell::new(len),
                label,
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
    /// delivery shard that reads bodies from their home shard's tree. It never
    /// writes, so the home shard stays the only writer of its partition.
    pub fn reader(&self, partition: u16) -> Result<PartitionReader, SpoolError> {
        let tree = self.db.open_tree(format!("{TREE_PREFIX}{partition}"))?;
        Ok(PartitionReader { tree, partition })
    }

    /// Blocking flush for shutdown / CLI only: never call on a shard.
    pub fn flush_blocking(&self) -> Result<(), SpoolError> {
        self.db.flush()?;
        Ok(())
    }
}

struct PartitionInner {
    tree: sled::Tree,
    shard: u16,
    gc: GroupCommit,
    len: Cell<usize>,
    label: String,
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

    async fn commit(&self) -> Result<(), SpoolError> {
        let tree = &self.inner.tree;
        self.inner
            .gc
            .commit(|| {
                let tree = tree.clone();
                async move { tree.flush_async().await }
            })
            .await?;
        Ok(())
    }

    /// Stores envelope and body atomically, then waits for a group-committed
    /// flush. `Ok` means the message is on disk and `250` may be sent.
    pub async fn store(&self, envelope: &Envelope, body: &[u8]) -> Result<(), SpoolError> {
        let started = Instant::now();
        let id = envelope.id;
        let tree = &self.inner.tree;
        let ekey = key(ENVELOPE_PREFIX, id);
        let existed = tree.contains_key(ekey)?;
        let mut batch = sled::Batch::default();
        batch.insert(&ekey[..], envelope.encode());
        batch.insert(&key(BODY_PREFIX, id)[..], body);
        tree.apply_batch(batch)?;
        if !existed {
            self.set_len(self.inner.len.get() + 1);
        }
        if let Err(e) = self.commit().await {
            tracing::warn!(shard = self.inner.shard, %id, error = %e, "spool store failed");
            // The caller answers 4xx and the client retries: take the
            // not-durable copy out again so a later flush cannot turn it into
            // a duplicate delivery. Best effort: sled may refuse everything now.
            if !existed {
                let mut undo = sled::Batch::default();
                undo.remove(&ekey[..]);
                undo.remove(&key(BODY_PREFIX, id)[..]);
                if tree.apply_batch(undo).is_ok() {
                    self.set_len(self.inner.len.get().saturating_sub(1));
                }
            }
            return Err(e);
        }
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!("sluice_spool_write_seconds", "shard" => self.inner.label.clone())
            .record(secs);
        tracing::debug!(shard = self.inner.shard, %id, size = body.len(), secs, "spooled");
        Ok(())
    }

    /// Envelope and body of `id`, if present.
    pub fn load(&self, id: SpoolId) -> Result<Option<(Envelope, Vec<u8>)>, SpoolError> {
        let Some(envelope) = self.load_envelope(id)? else {
            return Ok(None);
        };
        let body =
            self.inner
                .tree
                .get(key(BODY_PREFIX, id))?
                .ok_or_else(|| SpoolError::Corrupt {
                    what: "body".into(),
                    reason: format!("message {id} has an envelope but no body"),
                })?;
        Ok(Some((envelope, body.to_vec())))
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
        tree.insert(ekey, envelope.encode())?;
        self.commit().await?;
        tracing::debug!(shard = self.inner.shard, id = %envelope.id, "spool updated");
        Ok(())
    }

    /// Removes a message (no-op if absent); durable when it resolves `Ok`.
    pub async fn remove(&self, id: SpoolId) -> Result<(), SpoolError> {
        let tree = &self.inner.tree;
        let ekey = key(ENVELOPE_PREFIX, id);
        let existed = tree.contains_key(ekey)?;
        let mut batch = sled::Batch::default();
        batch.remove(&ekey[..]);
        batch.remove(&key(BODY_PREFIX, id)[..]);
        tree.apply_batch(batch)?;
        if existed {
            self.set_len(self.inner.len.get().saturating_sub(1));
        }
        self.commit().await?;
        tracing::debug!(shard = self.inner.shard, %id, "spool removed");
        Ok(())
    }

    /// Finishes a message whose recipients are all final, in ONE atomic batch:
    /// removes `original` and, if given, stores its DSN (envelope + body) as
    /// a new message. A crash leaves either the original (the DSN is built
    /// again after the restart) or the DSN alone, never both and never
    /// neither. Durable when it resolves `Ok`.
    pub async fn complete(
        &self,
        original: SpoolId,
        dsn: Option<(&Envelope, &[u8])>,
    ) -> Result<(), SpoolError> {
        let tree = &self.inner.tree;
        let okey = key(ENVELOPE_PREFIX, original);
        let mut len = self.inner.len.get();
        let mut batch = sled::Batch::default();
        if tree.contains_key(okey)? {
            len = len.saturating_sub(1);
        }
        batch.remove(&okey[..]);
        batch.remove(&key(BODY_PREFIX, original)[..]);
        if let Some((env, body)) = dsn {
            let dkey = key(ENVELOPE_PREFIX, env.id);
            if !tree.contains_key(dkey)? {
                len += 1;
            }
            batch.insert(&dkey[..], env.encode());
            batch.insert(&key(BODY_PREFIX, env.id)[..], body);
        }
        tree.apply_batch(batch)?;
        self.set_len(len);
        self.commit().await?;
        tracing::debug!(
            shard = self.inner.shard,
            id = %original,
            dsn = ?dsn.map(|(e, _)| e.id),
            "spool completed"
        );
        Ok(())
    }

    /// Applies `change` to the stored envelope of `id` and writes it back,
    /// without yielding in between (so no other task on this shard can
    /// interleave a change to the same envelope), then waits for the group
    /// commit. Returns the envelope as written, or `None` if the message is
    /// gone (already completed).
    pub async fn modify(
        &self,
        id: SpoolId,
        change: impl FnOnce(&mut Envelope),
    ) -> Result<Option<Envelope>, SpoolError> {
        let Some(mut env) = self.load_envelope(id)? else {
            return Ok(None);
        };
        change(&mut env);
        self.inner
            .tree
            .insert(key(ENVELOPE_PREFIX, id), env.encode())?;
        self.commit().await?;
        Ok(Some(env))
    }

    /// A read-only, `Send` handle on this partition's tree.
    pub fn reader(&self) -> PartitionReader {
        PartitionReader {
            tree: self.inner.tree.clone(),
            partition: self.inner.shard,
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

    /// Flushes this partition has completed (each covering one or more
    /// writes): with concurrent writers this is less than the number of writes.
    pub fn flush_count(&self) -> u64 {
        self.inner.gc.flush_count()
    }

    /// Writes made durable by those flushes; `flushed_writes() /
    /// flush_count()` is the mean group-commit batch size.
    pub fn flushed_writes(&self) -> u64 {
        self.inner.gc.covered_writes()
    }

    /// The largest number of writes one flush covered.
    pub fn max_flush_batch(&self) -> u64 {
        self.inner.gc.max_batch()
    }
}

/// Read access to one partition from any thread (a delivery shard reading a
/// body from its home shard's tree). Cheap to clone; holds no body.
#[derive(Clone)]
pub struct PartitionReader {
    tree: sled::Tree,
    partition: u16,
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

    /// The body of `id`, if stored. `sled::IVec` is reference-counted: no
    /// copy of the stored bytes is made here.
    pub fn load_body(&self, id: SpoolId) -> Result<Option<sled::IVec>, SpoolError> {
        Ok(self.tree.get(key(BODY_PREFIX, id))?)
    }
}
