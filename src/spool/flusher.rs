//! The process-wide flusher: one thread that makes the whole spool durable,
//! on behalf of every shard at once.
//!
//! Group commit: a write is durable once a flush that *started after it was
//! applied* has finished. Every writer takes a ticket; a ticket taken while a
//! flush runs is served by the next one, together with every other ticket
//! taken meanwhile, so under load N writers share one `fsync` pair, without
//! any timer. sled's flush covers the whole `Db`, not one tree, so one
//! flusher serves every shard: one flush in flight for the process, and a
//! flush started for shard 0's writers also settles shard 1's.
//!
//! A flush is `fdatasync` of the body segments written since the last one
//! (see [`super::bodies`]), then sled's `flush` (write its buffers; it ends
//! with `sync_file_range`, which is not durable on its own), then
//! `fdatasync` of sled's log file. Both block, so they run on this thread,
//! never on a shard; shards await a [`FlushFuture`], woken across threads.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// Tickets handed out (a ticket = "durable once a flush that started
    /// after me has finished").
    requested: u64,
    /// Every ticket up to this one is settled.
    done: u64,
    /// Sticky: once a flush failed, sled is wedged for this process.
    error: Option<sled::Error>,
    waiters: Vec<(u64, Waker)>,
    stop: bool,
    /// Counters for tests and metrics.
    flushes: u64,
    covered: u64,
    max_batch: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// Owner of the flusher thread; stops it when dropped (the last `Spool`
/// clone goes), without waiting for a flush that may never end.
pub(crate) struct Flusher {
    shared: Arc<Shared>,
    exited: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher").finish_non_exhaustive()
    }
}

/// The log file sled 0.34 writes everything inline into.
pub(crate) const SLED_LOG_FILE: &str = "db";

impl Flusher {
    /// Starts the thread for `db`, whose directory is `path`.
    pub(crate) fn start(
        db: sled::Db,
        path: &Path,
        bodies: Arc<super::bodies::Dirty>,
    ) -> std::io::Result<Flusher> {
        let log = std::fs::File::open(path.join(SLED_LOG_FILE))?;
        let spool = path.to_path_buf();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let (exited_tx, exited) = std::sync::mpsc::channel();
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("sluice-spool-flush".into())
            .spawn(move || {
                run(&s, || {
                    // Bodies first: once a pointer is durable, its body is.
                    bodies.sync(&spool)?;
                    db.flush()?;
                    log.sync_data()?;
                    Ok(())
                });
                drop(db);
                let _ = exited_tx.send(());
            })?;
        Ok(Flusher {
            shared,
            exited: Mutex::new(exited),
        })
    }

    /// Resolves once a flush that started after this call has finished.
    pub(crate) fn flush(self: &Arc<Self>) -> FlushFuture {
        FlushFuture {
            flusher: Arc::clone(self),
            ticket: None,
        }
    }

    /// Flushes completed so far (each covering one or more writes).
    pub(crate) fn flush_count(&self) -> u64 {
        lock(&self.shared).flushes
    }

    /// Writes settled by those flushes.
    pub(crate) fn covered_writes(&self) -> u64 {
        lock(&self.shared).covered
    }

    /// The most writes one flush settled.
    pub(crate) fn max_batch(&self) -> u64 {
        lock(&self.shared).max_batch
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.wake.notify_all();
        // Wait a little so sled's file lock is released when the spool is
        // reopened at once (tests, CLI); not forever: a flush may be stuck
        // in a wedged sled, and then the process must still be able to exit.
        if let Ok(rx) = self.exited.lock() {
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The thread: wait for requests, flush, settle every request made before
/// the flush started, repeat.
fn run(shared: &Shared, mut flush: impl FnMut() -> Result<(), sled::Error>) {
    loop {
        let target = {
            let mut st = lock(shared);
            while st.requested == st.done && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.requested == st.done {
                return; // stopping, nothing pending
            }
            st.requested
        };
        let started = Instant::now();
        let result = flush();
        metrics::histogram!("sluice_spool_flush_seconds").record(started.elapsed().as_secs_f64());
        let ready: Vec<Waker> = {
            let mut st = lock(shared);
            let batch = target - st.done;
            metrics::histogram!("sluice_spool_flush_batch_size").record(batch as f64);
            st.done = target;
            st.flushes += 1;
            st.covered += batch;
            st.max_batch = st.max_batch.max(batch);
            if let Err(e) = result {
                tracing::error!(error = %e, "spool flush failed");
                st.error.get_or_insert(e);
            }
            let (ready, waiting) = std::mem::take(&mut st.waiters)
                .into_iter()
                .partition(|(t, _)| *t <= target);
            st.waiters = waiting;
            ready.into_iter().map(|(_, w)| w).collect()
        };
        for w in ready {
            w.wake();
        }
    }
}

/// See [`Flusher::flush`].
pub(crate) struct FlushFuture {
    flusher: Arc<Flusher>,
    ticket: Option<u64>,
}

impl Future for FlushFuture {
    /// `usize` for symmetry with sled's `flush_async` (always 0 here).
    type Output = Result<usize, sled::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shared = Arc::clone(&self.flusher.shared);
        let mut st = lock(&shared);
        let ticket = match self.ticket {
            Some(t) => t,
            None => {
                st.requested += 1;
                let t = st.requested;
                self.ticket = Some(t);
                shared.wake.notify_one();
                t
            }
        };
        if st.done >= ticket {
            return Poll::Ready(match &st.error {
                Some(e) => Err(e.clone()),
                None => Ok(0),
            });
        }
        match st.waiters.iter_mut().find(|(t, _)| *t == ticket) {
            Some((_, w)) => w.clone_from(cx.waker()),
            None => st.waiters.push((ticket, cx.waker().clone())),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn flusher_with(
        flush: impl FnMut() -> Result<(), sled::Error> + Send + 'static,
    ) -> Arc<Flusher> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let (tx, exited) = std::sync::mpsc::channel();
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            run(&s, flush);
            let _ = tx.send(());
        });
        Arc::new(Flusher {
            shared,
            exited: Mutex::new(exited),
        })
    }

    #[test]
    fn requests_during_a_flush_share_the_next_one() {
        // The first flush blocks until released, so requests pile up.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let calls = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&calls);
        let f = flusher_with(move || {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                release_rx.recv().unwrap();
            }
            Ok(())
        });
        let first = std::thread::spawn({
            let f = Arc::clone(&f);
            move || block_on(f.flush())
        });
        // Wait until the first flush runs.
        while calls.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let later: Vec<_> = (0..8)
            .map(|_| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || block_on(f.flush()))
            })
            .collect();
        // All eight registered before the release.
        while lock(&f.shared).requested < 9 {
            std::thread::yield_now();
        }
        release_tx.send(()).unwrap();
        first.join().unwrap().unwrap();
        for t in later {
            t.join().unwrap().unwrap();
        }
        assert_eq!(f.flush_count(), 2, "eight requests, one more flush");
    }

    #[test]
    fn a_failed_flush_fails_its_requests_and_every_later_one() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&calls);
        let f = flusher_with(move || {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(sled::Error::Io(std::io::Error::other("EIO")))
            } else {
                Ok(())
            }
        });
        assert!(block_on(f.flush()).is_err());
        assert!(block_on(f.flush()).is_err(), "sticky");
    }
}
