//! A single-threaded wake-up signal for tasks of one shard (glommio has
//! semaphores and channels, but no plain "something changed, look again").
//!
//! [`Notify::notified`] resolves once [`Notify::notify_all`] is called after
//! the future was created. Waiters re-check their condition after waking, so
//! a spurious wake is harmless and no permit is ever stored.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// See the module documentation.
#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify")
            .field("generation", &self.generation.get())
            .field("waiters", &self.waiters.borrow().len())
            .finish()
    }
}

impl Notify {
    /// A signal nobody waits on yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes every task waiting now.
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        for w in self.waiters.take() {
            w.wake();
        }
    }

    /// Resolves at the next [`notify_all`](Self::notify_all).
    pub fn notified(&self) -> Notified<'_> {
        Notified {
            notify: self,
            generation: self.generation.get(),
        }
    }
}

/// The future of [`Notify::notified`].
#[derive(Debug)]
#[must_use = "a wake-up signal does nothing unless awaited"]
pub struct Notified<'a> {
    notify: &'a Notify,
    generation: u64,
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut waiters = self.notify.waiters.borrow_mut();
        // A task polled many times between signals registers once.
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn wakes_only_after_a_signal_following_creation() {
        block_on(async {
            let n = Notify::new();
            n.notify_all(); // before: does not count
            let mut a = Box::pin(n.notified());
            let mut b = Box::pin(n.notified());
            assert!(poll_once(&mut a).await.is_none());
            assert!(poll_once(&mut a).await.is_none());
            assert!(poll_once(&mut b).await.is_none());
            assert_eq!(n.waiters.borrow().len(), 1, "same task registers once");
            n.notify_all();
            assert!(poll_once(&mut a).await.is_some());
            assert!(poll_once(&mut b).await.is_some());
            assert!(n.waiters.borrow().is_empty());
        });
    }
}
