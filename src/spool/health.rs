//! Whether the spool may take writes: the free-space reserve and the state
//! of sled's flushes, shared by every partition of a process.
//!
//! Why this exists (measured with sled 0.34.7 on a full tmpfs): once a write
//! fails with ENOSPC, sled keeps a sticky error, every later `flush` /
//! `flush_async` *hangs forever* even after space returns, and dropping the
//! `Db` does not release its file lock, so it cannot be reopened inside the
//! process. Hence two layers:
//!
//! 1. **Reserve.** Before a message is written, the file system must have
//!    `min_free_space` plus the message left (like Postfix's `queue_minfree`).
//!    Below that the message is refused `452 4.3.1` *without touching sled*,
//!    so a filling disk never wedges it, and mail is accepted again as soon as
//!    space returns.
//! 2. **Flush watchdog.** A flush that fails, or does not finish within
//!    `flush_timeout`, answers its writers `452 4.3.1` and marks the spool
//!    `Stalled`: later writes are refused at once instead of hanging. A stalled
//!    flush that completes after all clears the state (a slow disk); one that
//!    fails marks the spool `Failed`, which only a restart clears (sled cannot
//!    recover in-process; see above). Every message acknowledged before is on
//!    disk either way.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use std::cell::Cell;

/// Tuning of the spool's safety checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Octets that must stay free on the spool's file system after a message
    /// is written; below that new messages get `452 4.3.1`. 0 disables the
    /// check.
    pub min_free_space: u64,
    /// A flush taking longer than this fails its writers with `452 4.3.1`
    /// and stops new writes until it completes.
    pub flush_timeout: Duration,
    /// How soon sled (envelopes, pointers, delivery state) follows a write
    /// that only needed the body log to be durable (see `docs/spool.md`).
    pub index_flush_interval: Duration,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            min_free_space: 0,
            flush_timeout: Duration::from_secs(10),
            index_flush_interval: super::flusher::DEFAULT_INDEX_FLUSH_INTERVAL,
        }
    }
}

/// The write state of the whole spool (all partitions share one sled `Db`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteState {
    /// Writes are accepted.
    Ok,
    /// A flush has run past `flush_timeout`; writes are refused until it ends.
    Stalled,
    /// A flush failed: sled cannot write again in this process.
    Failed,
}

impl WriteState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => WriteState::Ok,
            1 => WriteState::Stalled,
            _ => WriteState::Failed,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            WriteState::Ok => 0,
            WriteState::Stalled => 1,
            WriteState::Failed => 2,
        }
    }

    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteState::Ok => "ok",
            WriteState::Stalled => "stalled",
            WriteState::Failed => "failed",
        }
    }
}

/// Process-wide, shared by `Spool` clones (`Send + Sync`).
#[derive(Debug)]
pub(crate) struct Health {
    state: AtomicU8,
    pub(crate) options: SpoolOptions,
    pub(crate) path: PathBuf,
}

impl Health {
    pub(crate) fn new(path: PathBuf, options: SpoolOptions) -> Self {
        let h = Health {
            state: AtomicU8::new(WriteState::Ok.as_u8()),
            options,
            path,
        };
        h.publish(WriteState::Ok);
        h
    }

    pub(crate) fn state(&self) -> WriteState {
        WriteState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// A flush ran past the timeout (unless the spool already failed).
    pub(crate) fn stall(&self) {
        if self
            .state
            .compare_exchange(
                WriteState::Ok.as_u8(),
                WriteState::Stalled.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            tracing::error!(
                path = %self.path.display(),
                timeout_s = self.options.flush_timeout.as_secs_f64(),
                "spool flush stalled: refusing new mail with 452 4.3.1 until it completes"
            );
            self.publish(WriteState::Stalled);
        }
    }

    /// The stalled flush completed after all.
    pub(crate) fn unstall(&self) {
        if self
            .state
            .compare_exchange(
                WriteState::Stalled.as_u8(),
                WriteState::Ok.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            tracing::warn!(path = %self.path.display(), "spool flush completed; accepting mail again");
            self.publish(WriteState::Ok);
        }
    }

    /// A flush failed: permanent for this process.
    pub(crate) fn fail(&self, error: &dyn std::fmt::Display) {
        if self
            .state
            .swap(WriteState::Failed.as_u8(), Ordering::AcqRel)
            != WriteState::Failed.as_u8()
        {
            tracing::error!(
                path = %self.path.display(),
                %error,
                "spool write failed: refusing all new mail with 452 4.3.1; \
                 free the disk / fix the device, then restart sluice \
                 (every message acknowledged so far is on disk)"
            );
            self.publish(WriteState::Failed);
        }
    }

    pub(crate) fn publish(&self, state: WriteState) {
        metrics::gauge!("sluice_spool_writable").set(if state == WriteState::Ok {
            1.0
        } else {
            0.0
        });
    }
}

/// How long a free-space reading stays fresh, and how many octets may be
/// written on its strength before it is read again.
const SPACE_FRESH: Duration = Duration::from_millis(50);
const SPACE_FRESH_BYTES: u64 = 4 << 20;

/// One partition's cached view of the free space (a `statvfs` per message
/// would be cheap, but this is cheaper still and just as safe: the reading
/// is refreshed after 50 ms or 4 MiB written, far inside any sane reserve).
#[derive(Debug, Default)]
pub(crate) struct SpaceCheck {
    read_at: Cell<Option<Instant>>,
    free: Cell<u64>,
    written_since: Cell<u64>,
}

impl SpaceCheck {
    /// `Ok` if `needed` octets can be written leaving `min_free` free;
    /// otherwise the free space seen. Errors reading the file system count
    /// as "no space" (refuse rather than risk sled's wedge).
    pub(crate) fn check(&self, health: &Health, needed: u64) -> Result<(), u64> {
        let min_free = health.options.min_free_space;
        if min_free == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let stale = self
            .read_at
            .get()
            .is_none_or(|t| now.duration_since(t) >= SPACE_FRESH)
            || self.written_since.get() >= SPACE_FRESH_BYTES;
        if stale {
            let free = fs2::available_space(&health.path).unwrap_or(0);
            self.free.set(free);
            self.read_at.set(Some(now));
            self.written_since.set(0);
        }
        let free = self.free.get().saturating_sub(self.written_since.get());
        if free >= min_free.saturating_add(needed) {
            self.written_since
                .set(self.written_since.get().saturating_add(needed));
            Ok(())
        } else {
            // Read again next time: space may come back any moment.
            self.read_at.set(None);
            Err(free)
        }
    }
}
