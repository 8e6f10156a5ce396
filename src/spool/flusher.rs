//! The process-wide flusher: one thread that makes the spool durable, on
//! behalf of every shard at once.
//!
//! Two kinds of flush (see `docs/spool.md` "Durability"):
//!
//! * a **journal** flush: `fdatasync` of the body segments written since
//!   the last flush (and of `bodies/` when a segment was created). A
//!   segment record holds a message's envelope and body, so this alone
//!   makes a stored message durable: what sled lost, the start-up replay
//!   restores from the segments (see [`super::bodies`]). This is the flush
//!   behind every `250`.
//! * a **full** flush: the same, then sled's `flush` (it writes its
//!   buffers and ends with `sync_file_range`, which is not durable on its
//!   own), then `fdatasync` of sled's log file. Segments first: once a
//!   pointer is durable, its body is.
//!
//! Group commit: a write is durable once a flush of the kind it needs that
//! *started after it was applied* has finished. Every writer takes a
//! ticket; tickets taken while a flush runs are served by the next one, all
//! together, so under load N writers share one flush, without any timer.
//!
//! Full flushes are rare: asked for by writes that must be in sled itself
//! (an update, a removal that spools a DSN), by shutdown, and at the latest
//! the lazy interval after a write that only asked to be flushed "soon"
//! (a store, a delivered message's removal); that bound is
//! `[spool] index_flush_interval_ms`. sled's flush covers the whole
//! `Db`, and its own periodic flusher is off (it would not sync segments
//! first), so this thread is the only one that ever makes sled durable.
//!
//! Both kinds block, so they run on this thread, never on a shard; shards
//! await a [`FlushFuture`], woken across threads.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The default lazy interval: the longest a write that did not ask for a
/// full flush waits for one. It is the window in which a crash can make the
/// start-up replay restore a message that was already delivered (a
/// duplicate, never a loss), and how long a delivered message's body space
/// stays reserved.
pub const DEFAULT_INDEX_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// What a flush makes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Body segments only.
    Journal,
    /// Body segments, then sled.
    Full,
}

#[derive(Default)]
struct State {
    /// See [`DEFAULT_INDEX_FLUSH_INTERVAL`].
    lazy_interval: Duration,
    /// Journal tickets handed out; every one up to `journal_done` is settled
    /// (both kinds of flush settle them).
    journal_requested: u64,
    journal_done: u64,
    /// Full flushes started and finished. A full ticket taken when
    /// `full_started` was `n` is settled once `full_finished > n`.
    full_started: u64,
    full_finished: u64,
    /// A waiter needs a full flush as soon as possible.
    full_wanted: bool,
    /// The oldest write waiting for a full flush "soon".
    lazy_since: Option<Instant>,
    /// Sticky: once a flush failed, sled is wedged for this process.
    error: Option<sled::Error>,
    /// (waiter id, ticket number, waker), per kind: a journal flush only
    /// looks at its own (many delivered messages may wait for the next full
    /// flush meanwhile). Ids are unique; full ticket numbers are not.
    journal_waiters: Vec<Waiter>,
    full_waiters: Vec<Waiter>,
    next_waiter: u64,
    stop: bool,
    /// Counters for tests and metrics.
    flushes: u64,
    covered: u64,
    max_batch: u64,
}

type Waiter = (u64, u64, Waker);

/// What a waiter waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ticket {
    Journal(u64),
    /// Settled once this many full flushes have finished.
    Full(u64),
}

impl State {
    fn waiters(&mut self, t: Ticket) -> &mut Vec<Waiter> {
        match t {
            Ticket::Journal(_) => &mut self.journal_waiters,
            Ticket::Full(_) => &mut self.full_waiters,
        }
    }

    fn settled(&self, t: Ticket) -> bool {
        match t {
            Ticket::Journal(n) => self.journal_done >= n,
            Ticket::Full(n) => self.full_finished >= n,
        }
    }

    /// The flush to start now, if any.
    fn due(&self, now: Instant) -> Option<Kind> {
        let lazy_due = self
            .lazy_since
            .is_some_and(|t| self.stop || now.duration_since(t) >= self.lazy_interval);
        if self.full_wanted || lazy_due {
            Some(Kind::Full)
        } else if self.journal_requested > self.journal_done {
            Some(Kind::Journal)
        } else {
            None
        }
    }
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
    /// `lazy`: the lazy interval (see [`DEFAULT_INDEX_FLUSH_INTERVAL`]). A
    /// failed flush marks `health` failed at once, also when nobody waits
    /// for it (a lazy one), so `/metrics` and the next writer see it.
    pub(crate) fn start(
        db: sled::Db,
        path: &Path,
        bodies: Arc<super::bodies::Dirty>,
        lazy: Duration,
        health: Arc<super::health::Health>,
    ) -> std::io::Result<Flusher> {
        let log = std::fs::File::open(path.join(SLED_LOG_FILE))?;
        let spool = path.to_path_buf();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lazy_interval: lazy,
                ..State::default()
            }),
            wake: Condvar::new(),
        });
        let (exited_tx, exited) = std::sync::mpsc::channel();
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("sluice-spool-flush".into())
            .spawn(move || {
                run(&s, |kind| {
                    let flushed = (|| {
                        bodies.sync(&spool)?;
                        if kind == Kind::Full {
                            db.flush()?;
                            log.sync_data()?;
                        }
                        Ok(())
                    })();
                    if let Err(e) = &flushed {
                        health.fail(e);
                    }
                    flushed
                });
                drop(db);
                let _ = exited_tx.send(());
            })?;
        Ok(Flusher {
            shared,
            exited: Mutex::new(exited),
        })
    }

    /// Resolves once a flush of `kind` that started after this call has
    /// finished (a full flush also settles journal tickets).
    pub(crate) fn flush(self: &Arc<Self>, kind: Kind) -> FlushFuture {
        FlushFuture {
            flusher: Arc::clone(self),
            kind,
            lazy: false,
            ticket: None,
        }
    }

    /// Like a full [`Flusher::flush`], but does not hurry it: resolves after
    /// the next full flush, which starts within the lazy interval.
    pub(crate) fn full_flush_soon(self: &Arc<Self>) -> FlushFuture {
        FlushFuture {
            flusher: Arc::clone(self),
            kind: Kind::Full,
            lazy: true,
            ticket: None,
        }
    }

    /// Asks for a full flush within the lazy interval without waiting
    /// for it (a write whose durability in sled may lag).
    pub(crate) fn note_lazy_write(&self) {
        let mut st = lock(&self.shared);
        if st.lazy_since.is_none() {
            st.lazy_since = Some(Instant::now());
            self.shared.wake.notify_one();
        }
    }

    /// Flushes completed so far (each covering one or more writes).
    pub(crate) fn flush_count(&self) -> u64 {
        lock(&self.shared).flushes
    }

    /// Full flushes completed so far.
    #[cfg(test)]
    pub(crate) fn full_flush_count(&self) -> u64 {
        lock(&self.shared).full_finished
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
        // The thread still runs a full flush owed to lazy writes first.
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

/// The thread: wait until a flush is due, run it, settle every ticket taken
/// before it started, repeat.
fn run(shared: &Shared, mut flush: impl FnMut(Kind) -> Result<(), sled::Error>) {
    loop {
        let (kind, journal_target) = {
            let mut st = lock(shared);
            let kind = loop {
                let now = Instant::now();
                if let Some(kind) = st.due(now) {
                    break kind;
                }
                if st.stop {
                    return; // nothing owed
                }
                st = match st.lazy_since {
                    Some(t) => {
                        let left = st.lazy_interval.saturating_sub(now.duration_since(t));
                        shared
                            .wake
                            .wait_timeout(st, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None => shared.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
                };
            };
            if kind == Kind::Full {
                st.full_started += 1;
                st.full_wanted = false;
                st.lazy_since = None;
            }
            (kind, st.journal_requested)
        };
        let started = Instant::now();
        let result = if lock(shared).error.is_some() {
            Ok(()) // wedged: settle with the sticky error, touch nothing
        } else {
            flush(kind)
        };
        let label = match kind {
            Kind::Journal => "journal",
            Kind::Full => "full",
        };
        metrics::histogram!("sluice_spool_flush_seconds", "kind" => label)
            .record(started.elapsed().as_secs_f64());
        let ready: Vec<Waker> = {
            let mut st = lock(shared);
            let mut batch = journal_target - st.journal_done;
            st.journal_done = journal_target;
            if kind == Kind::Full {
                st.full_finished += 1;
                let done = st.full_finished;
                batch += st.full_waiters.iter().filter(|w| w.1 <= done).count() as u64;
            }
            metrics::histogram!("sluice_spool_flush_batch_size", "kind" => label)
                .record(batch as f64);
            st.flushes += 1;
            st.covered += batch;
            st.max_batch = st.max_batch.max(batch);
            if let Err(e) = result {
                tracing::error!(error = %e, "spool flush failed");
                st.error.get_or_insert(e);
            }
            let mut ready = Vec::new();
            let journal_done = st.journal_done;
            take_settled(&mut st.journal_waiters, journal_done, &mut ready);
            if kind == Kind::Full {
                let full_done = st.full_finished;
                take_settled(&mut st.full_waiters, full_done, &mut ready);
            }
            ready
        };
        for w in ready {
            w.wake();
        }
    }
}

/// Moves the wakers of `waiters` whose ticket number is `done` or less into
/// `ready`.
fn take_settled(waiters: &mut Vec<Waiter>, done: u64, ready: &mut Vec<Waker>) {
    let mut i = 0;
    while i < waiters.len() {
        if waiters[i].1 <= done {
            ready.push(waiters.swap_remove(i).2);
        } else {
            i += 1;
        }
    }
}

/// See [`Flusher::flush`].
pub(crate) struct FlushFuture {
    flusher: Arc<Flusher>,
    kind: Kind,
    lazy: bool,
    /// (waiter id, ticket) once registered.
    ticket: Option<(u64, Ticket)>,
}

impl Future for FlushFuture {
    /// `usize` for symmetry with sled's `flush_async` (always 0 here).
    type Output = Result<usize, sled::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shared = Arc::clone(&self.flusher.shared);
        let mut st = lock(&shared);
        let (id, ticket, first_poll) = match self.ticket {
            Some((id, t)) => (id, t, false),
            None => {
                let t = match self.kind {
                    Kind::Journal => {
                        st.journal_requested += 1;
                        Ticket::Journal(st.journal_requested)
                    }
                    Kind::Full => {
                        if self.lazy {
                            st.lazy_since.get_or_insert_with(Instant::now);
                        } else {
                            st.full_wanted = true;
                        }
                        Ticket::Full(st.full_started + 1)
                    }
                };
                st.next_waiter += 1;
                let id = st.next_waiter;
                self.ticket = Some((id, t));
                shared.wake.notify_one();
                (id, t, true)
            }
        };
        if st.settled(ticket) {
            return Poll::Ready(match &st.error {
                Some(e) => Err(e.clone()),
                None => Ok(0),
            });
        }
        let n = match ticket {
            Ticket::Journal(n) | Ticket::Full(n) => n,
        };
        let waiters = st.waiters(ticket);
        // Only a repeated poll can find itself registered already.
        match (!first_poll)
            .then(|| waiters.iter_mut().find(|w| w.0 == id))
            .flatten()
        {
            Some(w) => w.2.clone_from(cx.waker()),
            None => waiters.push((id, n, cx.waker().clone())),
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
        flush: impl FnMut(Kind) -> Result<(), sled::Error> + Send + 'static,
    ) -> Arc<Flusher> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lazy_interval: DEFAULT_INDEX_FLUSH_INTERVAL,
                ..State::default()
            }),
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

    /// Counts the flushes of each kind.
    fn counting() -> (Arc<Flusher>, Arc<[AtomicU64; 2]>) {
        let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let c = Arc::clone(&counts);
        let f = flusher_with(move |kind| {
            c[usize::from(kind == Kind::Full)].fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        (f, counts)
    }

    #[test]
    fn requests_during_a_flush_share_the_next_one() {
        // The first flush blocks until released, so requests pile up.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let calls = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&calls);
        let f = flusher_with(move |_| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                release_rx.recv().unwrap();
            }
            Ok(())
        });
        let first = std::thread::spawn({
            let f = Arc::clone(&f);
            move || block_on(f.flush(Kind::Journal))
        });
        // Wait until the first flush runs.
        while calls.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let later: Vec<_> = (0..8)
            .map(|_| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || block_on(f.flush(Kind::Journal)))
            })
            .collect();
        // All eight registered before the release.
        while lock(&f.shared).journal_requested < 9 {
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
    fn journal_requests_never_flush_sled_and_full_ones_settle_both() {
        let (f, counts) = counting();
        for _ in 0..3 {
            block_on(f.flush(Kind::Journal)).unwrap();
        }
        assert_eq!(
            counts[1].load(Ordering::SeqCst),
            0,
            "no full flush asked for"
        );
        assert_eq!(counts[0].load(Ordering::SeqCst), 3);
        block_on(f.flush(Kind::Full)).unwrap();
        assert_eq!(counts[1].load(Ordering::SeqCst), 1);
        assert_eq!(f.full_flush_count(), 1);
    }

    #[test]
    fn a_lazy_write_gets_a_full_flush_without_anyone_asking() {
        let (f, counts) = counting();
        let asked = Instant::now();
        f.note_lazy_write();
        // Nobody waits: the flusher's own deadline runs the full flush.
        // (Generous bound: a loaded machine may deschedule the thread.)
        let deadline = asked + Duration::from_secs(30);
        while counts[1].load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "no full flush after a lazy write"
            );
            std::thread::yield_now();
        }
        assert!(
            asked.elapsed() >= DEFAULT_INDEX_FLUSH_INTERVAL,
            "not before the deadline"
        );
        assert_eq!(counts[0].load(Ordering::SeqCst), 0);
        // A waiter for "soon" is served by the next full flush.
        block_on(f.full_flush_soon()).unwrap();
        assert_eq!(counts[1].load(Ordering::SeqCst), 2);
    }

    #[test]
    fn dropping_the_flusher_runs_the_full_flush_owed_to_lazy_writes() {
        let (f, counts) = counting();
        f.note_lazy_write();
        drop(Arc::into_inner(f).expect("one handle"));
        assert_eq!(counts[1].load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failed_flush_fails_its_requests_and_every_later_one() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&calls);
        let f = flusher_with(move |_| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(sled::Error::Io(std::io::Error::other("EIO")))
            } else {
                Ok(())
            }
        });
        assert!(block_on(f.flush(Kind::Journal)).is_err());
        assert!(block_on(f.flush(Kind::Journal)).is_err(), "sticky");
        assert!(block_on(f.flush(Kind::Full)).is_err(), "sticky");
    }
}
