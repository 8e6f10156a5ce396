//! Shard-local read buffers, lent to a session only while it has bytes to
//! process.
//!
//! A session spends nearly all its life waiting for the client. If each one
//! owned a `read_buffer_size` (64 KiB) buffer, 10,000 idle connections would
//! pin 640 MiB. Instead a session borrows a buffer from its shard's pool at
//! the moment the socket has data ([`read_pooled`]) and gives it back once
//! the bytes are consumed, so idle sessions hold none and a shard needs only
//! as many buffers as it has sessions between a read and the end of its
//! processing (those waiting for a spool flush still hold theirs).
//!
//! The hot path stays a plain `recv` into a warm 64 KiB buffer: taking one
//! is a `Vec::pop`, giving it back a `Vec::push`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::AsyncRead;
use glommio::net::TcpStream;

/// Free buffers a shard keeps for reuse; more are freed when returned, so a
/// burst of concurrent reads does not pin memory afterwards.
const MAX_FREE: usize = 64;

/// The pool of one shard (single-threaded: `RefCell`, no locks).
#[derive(Debug)]
pub(crate) struct BufferPool {
    size: usize,
    free: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A pool of buffers of `size` octets each, allocated on first use.
    pub(crate) fn new(size: usize) -> Self {
        BufferPool {
            size,
            free: RefCell::new(Vec::new()),
        }
    }

    /// A buffer, returned to the pool when the loan is dropped.
    pub(crate) fn lend(&self) -> Loan<'_> {
        let buf = self
            .free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0; self.size]);
        Loan { pool: self, buf }
    }

    /// Buffers currently free in the pool.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.free.borrow().len()
    }
}

/// A buffer on loan from a [`BufferPool`].
#[derive(Debug)]
pub(crate) struct Loan<'a> {
    pool: &'a BufferPool,
    buf: Vec<u8>,
}

impl std::ops::Deref for Loan<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for Loan<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Loan<'_> {
    fn drop(&mut self) {
        let mut free = self.pool.free.borrow_mut();
        if free.len() < MAX_FREE {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Reads from `stream` into a buffer borrowed from `pool` only when bytes
/// are there: each poll lends a buffer and, if the read is pending, gives it
/// straight back. Resolves to the loan and the number of octets read (0 at
/// EOF).
///
/// This relies on glommio 0.9's `TcpStream::poll_read` (unbuffered stream)
/// touching the buffer only inside the call: it tries a `recv(MSG_DONTWAIT)`
/// into it and, when nothing is there, arms a readiness poll that holds no
/// reference to the buffer. So a different buffer may be passed on the
/// next poll.
pub(crate) fn read_pooled<'s, 'p>(
    stream: &'s mut TcpStream,
    pool: &'p BufferPool,
) -> ReadPooled<'s, 'p> {
    ReadPooled { stream, pool }
}

/// The future of [`read_pooled`]; the loan it yields borrows only the pool,
/// so the stream is free again once it resolves.
#[derive(Debug)]
pub(crate) struct ReadPooled<'s, 'p> {
    stream: &'s mut TcpStream,
    pool: &'p BufferPool,
}

impl<'p> Future for ReadPooled<'_, 'p> {
    type Output = std::io::Result<(Loan<'p>, usize)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut loan = this.pool.lend();
        match Pin::new(&mut *this.stream).poll_read(cx, &mut loan) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok((loan, n))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // The loan goes back to the pool here.
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loans_are_reused_and_the_free_list_is_bounded() {
        let pool = BufferPool::new(1024);
        let first = pool.lend();
        assert_eq!(first.len(), 1024);
        let addr = first.as_ptr();
        drop(first);
        assert_eq!(pool.free(), 1);
        let again = pool.lend();
        assert_eq!(again.as_ptr(), addr, "the freed buffer is lent again");
        drop(again);
        let many: Vec<_> = (0..MAX_FREE + 10).map(|_| pool.lend()).collect();
        assert_eq!(pool.free(), 0);
        drop(many);
        assert_eq!(pool.free(), MAX_FREE);
    }

    #[test]
    fn idle_reads_hold_no_buffer() {
        use futures_lite::AsyncWriteExt;
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(256 * 1024)
            .make()
            .unwrap()
            .run(async {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let pool = BufferPool::new(4096);
                let client = glommio::spawn_local(async move {
                    let mut c = TcpStream::connect(addr).await.unwrap();
                    c.write_all(b"hello").await.unwrap();
                    c
                });
                let mut server = listener.accept().await.unwrap();
                let mut client = client.await;
                let (loan, n) = read_pooled(&mut server, &pool).await.unwrap();
                assert_eq!(&loan[..n], b"hello");
                drop(loan);
                assert_eq!(pool.free(), 1);
                // Nothing to read: the pending read keeps no buffer out.
                let mut pending = Box::pin(read_pooled(&mut server, &pool));
                assert!(futures_lite::future::poll_once(&mut pending)
                    .await
                    .is_none());
                assert_eq!(pool.free(), 1, "a pending read holds no loan");
                client.write_all(b"more").await.unwrap();
                let (loan, n) = pending.await.unwrap();
                assert_eq!(&loan[..n], b"more");
            });
    }
}
