//! Group commit: many writers on one shard share one `flush_async`.
//!
//! A flush makes durable everything written *before it started*. So a writer
//! joins the "next" flush slot after applying its write; if no flush is in
//! flight it leads (starts that flush), otherwise it waits. When the in-flight
//! flush completes, the writers that piled up meanwhile all sit in the next
//! slot, and one of them leads a single flush for all of them. Under load this
//! turns N fsyncs into roughly N / (writes per flush time) fsyncs without any
//! timer or extra task.
//!
//! Single-threaded by design (`Rc`/`Cell`): one instance per glommio shard.
//! The flush itself runs on sled's thread pool, so the shard never blocks.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tracing::Instrument;

/// What happened to the flush a slot's writers were waiting for.
#[derive(Clone)]
enum Outcome {
    Done(Result<(), sled::Error>),
    /// The leading writer's future was dropped mid-flush: nobody knows whether
    /// the flush covered these writes, so they must join a later flush.
    Abandoned,
}

#[derive(Default)]
struct Slot {
    outcome: RefCell<Option<Outcome>>,
    waiters: RefCell<Vec<Waker>>,
    writers: Cell<u64>,
}

impl Slot {
    fn wake_all(&self) {
        for w in self.waiters.take() {
            w.wake();
        }
    }
}

/// Per-shard group-commit state and counters.
pub(crate) struct GroupCommit {
    in_flight: Cell<bool>,
    next: RefCell<Rc<Slot>>,
    flushes: Cell<u64>,
    covered: Cell<u64>,
    max_batch: Cell<u64>,
    shard_label: String,
}

impl GroupCommit {
    pub(crate) fn new(shard: u16) -> Self {
        Self {
            in_flight: Cell::new(false),
            next: RefCell::new(Rc::new(Slot::default())),
            flushes: Cell::new(0),
            covered: Cell::new(0),
            max_batch: Cell::new(0),
            shard_label: shard.to_string(),
        }
    }

    /// Flushes completed so far.
    pub(crate) fn flush_count(&self) -> u64 {
        self.flushes.get()
    }

    /// Writers made durable by those flushes (sum of batch sizes).
    pub(crate) fn covered_writes(&self) -> u64 {
        self.covered.get()
    }

    /// Largest number of writers one flush covered.
    pub(crate) fn max_batch(&self) -> u64 {
        self.max_batch.get()
    }

    fn join(&self) -> Rc<Slot> {
        let slot = self.next.borrow().clone();
        slot.writers.set(slot.writers.get() + 1);
        slot
    }

    /// Call after the write was applied to the tree; resolves once a flush
    /// that started after that point has completed, with its result.
    /// `flush` is only called if this writer ends up leading a flush.
    pub(crate) async fn commit<F, Fut>(&self, flush: F) -> Result<(), sled::Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<usize, sled::Error>>,
    {
        let mut slot = self.join();
        let mut flush = Some(flush);
        loop {
            let outcome = slot.outcome.borrow().clone();
            match outcome {
                Some(Outcome::Done(r)) => return r,
                Some(Outcome::Abandoned) => {
                    slot = self.join();
                    continue;
                }
                None => {}
            }
            if !self.in_flight.get() {
                // Our slot has no outcome and no flush runs, so ours is the
                // next slot (slots are only taken by a leader): lead it.
                debug_assert!(Rc::ptr_eq(&slot, &self.next.borrow()));
                let Some(f) = flush.take() else {
                    // Unreachable: a writer leads at most once, and returns
                    // when its flush finishes. Be safe rather than panic.
                    return Err(sled::Error::ReportableBug("group commit led twice".into()));
                };
                return self.lead(f).await;
            }
            Wait {
                slot: &slot,
                in_flight: &self.in_flight,
            }
            .await;
        }
    }

    async fn lead<F, Fut>(&self, flush: F) -> Result<(), sled::Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<usize, sled::Error>>,
    {
        let taken = self.next.replace(Rc::new(Slot::default()));
        self.in_flight.set(true);
        let mut guard = LeadGuard {
            gc: self,
            slot: &taken,
            finished: false,
        };
        let batch = taken.writers.get();
        let started = Instant::now();
        let span = tracing::debug_span!("spool_flush", shard = %self.shard_label, batch);
        let result = flush().instrument(span).await.map(|_| ());
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!("sluice_spool_flush_seconds", "shard" => self.shard_label.clone())
            .record(secs);
        metrics::histogram!("sluice_spool_flush_batch_size", "shard" => self.shard_label.clone())
            .record(batch as f64);
        self.flushes.set(self.flushes.get() + 1);
        self.covered.set(self.covered.get() + batch);
        self.max_batch.set(self.max_batch.get().max(batch));
        match &result {
            Ok(()) => tracing::debug!(shard = %self.shard_label, batch, secs, "spool flush"),
            Err(e) => {
                tracing::warn!(shard = %self.shard_label, batch, error = %e, "spool flush failed")
            }
        }
        guard.finish(Outcome::Done(result.clone()));
        result
    }
}

/// Resolves the leader's slot even if the leader's future is dropped, so the
/// waiters never hang on a flush nobody will report.
struct LeadGuard<'a> {
    gc: &'a GroupCommit,
    slot: &'a Rc<Slot>,
    finished: bool,
}

impl LeadGuard<'_> {
    fn finish(&mut self, outcome: Outcome) {
        self.finished = true;
        *self.slot.outcome.borrow_mut() = Some(outcome);
        self.gc.in_flight.set(false);
        self.slot.wake_all();
        // Writers that arrived during the flush wait in the next slot: wake
        // them so one of them leads the next flush.
        self.gc.next.borrow().wake_all();
    }
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(Outcome::Abandoned);
        }
    }
}

/// Pending until the slot has an outcome or no flush is in flight (then the
/// waiter may have to lead).
struct Wait<'a> {
    slot: &'a Rc<Slot>,
    in_flight: &'a Cell<bool>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.slot.outcome.borrow().is_some() || !self.in_flight.get() {
            return Poll::Ready(());
        }
        // Drained on every wake, so spurious polls cannot grow it for long.
        self.slot.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};
    use std::rc::Rc;

    /// A flush that stays pending until the test sets its result.
    fn gated(
        gate: &Rc<RefCell<Option<Result<usize, sled::Error>>>>,
    ) -> impl Future<Output = Result<usize, sled::Error>> {
        let gate = gate.clone();
        std::future::poll_fn(move |_| match gate.borrow_mut().take() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        })
    }

    #[test]
    fn writer_joining_during_a_flush_needs_the_next_flush() {
        block_on(async {
            let gc = GroupCommit::new(0);
            let gate = Rc::new(RefCell::new(None));
            let mut a = Box::pin(gc.commit(|| gated(&gate)));
            assert!(poll_once(&mut a).await.is_none(), "a leads, flush pending");
            // b and c write while a's flush is in flight.
            let b_called = Cell::new(false);
            let mut b = Box::pin(gc.commit(|| {
                b_called.set(true);
                async { Ok(0) }
            }));
            let mut c = Box::pin(gc.commit(|| async { Ok(0) }));
            assert!(poll_once(&mut b).await.is_none());
            assert!(poll_once(&mut c).await.is_none());
            *gate.borrow_mut() = Some(Ok(1));
            assert!(matches!(poll_once(&mut a).await, Some(Ok(()))));
            // a's flush started before b/c wrote: it must not release them.
            assert_eq!(gc.flush_count(), 1);
            assert!(
                matches!(poll_once(&mut b).await, Some(Ok(()))),
                "b leads flush 2"
            );
            assert!(b_called.get());
            assert!(
                matches!(poll_once(&mut c).await, Some(Ok(()))),
                "c covered by flush 2"
            );
            assert_eq!(
                (gc.flush_count(), gc.covered_writes(), gc.max_batch()),
                (2, 3, 2)
            );
        });
    }

    #[test]
    fn flush_error_reaches_every_covered_writer() {
        block_on(async {
            let gc = GroupCommit::new(0);
            let gate = Rc::new(RefCell::new(None));
            let mut a = Box::pin(gc.commit(|| gated(&gate)));
            assert!(poll_once(&mut a).await.is_none());
            // b and c both wait for the next flush, which b will lead.
            let mut b = Box::pin(gc.commit(|| gated(&gate)));
            let mut c = Box::pin(gc.commit(|| async { Ok(0) }));
            assert!(poll_once(&mut b).await.is_none());
            assert!(poll_once(&mut c).await.is_none());
            *gate.borrow_mut() = Some(Ok(1));
            assert!(matches!(poll_once(&mut a).await, Some(Ok(()))));
            assert!(poll_once(&mut b).await.is_none(), "b's flush pending");
            assert!(poll_once(&mut c).await.is_none(), "c waits for b's flush");
            *gate.borrow_mut() = Some(Err(sled::Error::Io(std::io::Error::other("ENOSPC"))));
            assert!(matches!(poll_once(&mut b).await, Some(Err(_))));
            assert!(
                matches!(poll_once(&mut c).await, Some(Err(_))),
                "c shares b's failure"
            );
            assert_eq!(gc.flush_count(), 2);
        });
    }

    #[test]
    fn dropped_leader_does_not_strand_waiters() {
        block_on(async {
            let gc = GroupCommit::new(0);
            let mut a = Box::pin(gc.commit(std::future::pending));
            assert!(poll_once(&mut a).await.is_none());
            let mut b = Box::pin(gc.commit(|| async { Ok(0) }));
            assert!(poll_once(&mut b).await.is_none());
            drop(a);
            // b cannot know whether a's flush covered it, so it flushes itself.
            assert!(matches!(poll_once(&mut b).await, Some(Ok(()))));
            assert_eq!(gc.flush_count(), 1);
        });
    }
}
