//! One shard: a glommio executor pinned to a core, with its own listeners
//! (SO_REUSEPORT: the kernel spreads connections), spool partition and id
//! generator. Nothing here is shared with other shards except the connection
//! limiter and the stop flag.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::future;
use glommio::net::TcpListener;
use glommio::sync::Semaphore;
use tracing::Instrument;

use super::api::{Partition, SessionConfig, Spool, SpoolId, SpoolIdGenerator};
use super::limits::ConnectionLimiter;
use crate::config::{Config, RelayConfig};
use crate::delivery::engine::{DeliveryShared, Engine};
use crate::metrics::ShardMetrics;

/// Everything a shard needs, built on the main thread and moved to the shard.
pub(crate) struct ShardSpec {
    pub index: usize,
    pub shards: usize,
    pub delivery: DeliveryShared,
    pub listen: Vec<SocketAddr>,
    pub config: Arc<Config>,
    pub session_config: Arc<SessionConfig>,
    pub spool: Spool,
    pub not_before: Option<SpoolId>,
    pub limiter: Arc<ConnectionLimiter>,
    pub stop: Arc<AtomicBool>,
    /// Shards that have not finished draining; each decrements it once.
    pub draining: Arc<AtomicUsize>,
    pub ready: std::sync::mpsc::Sender<Result<(), String>>,
}

/// Shard-local state shared by its tasks.
pub(crate) struct ShardCtx {
    pub index: usize,
    pub hostname: String,
    pub session_config: Arc<SessionConfig>,
    pub relay: RelayConfig,
    pub partition: Partition,
    pub ids: Rc<RefCell<SpoolIdGenerator>>,
    /// Delivery: queues accepted mail, applies outcomes (see `crate::delivery`).
    pub delivery: Rc<Engine>,
    pub metrics: ShardMetrics,
    /// Read buffers, lent to sessions only while they process input.
    pub buffers: super::buffers::BufferPool,
    pub session_timeout: Duration,
    /// Closed (never signalled) at shutdown: every waiter wakes with an error.
    pub shutdown: Semaphore,
    /// Closed when the shutdown grace period is over: sessions still running
    /// are told `421 4.3.2` and closed (RFC 5321 3.8).
    pub cut: Semaphore,
    shutting_down: Cell<bool>,
    active: Cell<usize>,
    /// Signalled when the last session ends during shutdown.
    drained: Semaphore,
}

impl ShardCtx {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }
}

/// How long a session cut at the end of the grace period may take to write
/// its `421` to a client that does not read.
pub(crate) const CUT_WRITE: Duration = Duration::from_secs(1);

/// How often a shard looks at the process-wide stop flag. Signals arrive on
/// the main thread; polling a flag is simpler than a cross-thread waker and
/// costs nothing measurable at this rate.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The shard's main future: set up, report readiness, serve until stopped,
/// then drain within the grace period.
pub(crate) async fn run(spec: ShardSpec) {
    let ShardSpec {
        index,
        shards,
        delivery,
        listen,
        config,
        session_config,
        spool,
        not_before,
        limiter,
        stop,
        draining,
        ready,
    } = spec;
    let mut listeners = Vec::with_capacity(listen.len());
    for addr in &listen {
        match TcpListener::bind(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                let _ = ready.send(Err(format!("cannot listen on {addr}: {e}")));
                return;
            }
        }
    }
    let partition = match spool.partition(index as u16) {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot open spool partition {index}: {e}")));
            return;
        }
    };
    let ids = Rc::new(RefCell::new(SpoolIdGenerator::new(index as u8, not_before)));
    let engine = match Engine::start(
        delivery,
        index,
        shards,
        partition.clone(),
        Rc::clone(&ids),
        Arc::clone(&stop),
    )
    .await
    {
        Ok(e) => e,
        Err(msg) => {
            let _ = ready.send(Err(msg));
            return;
        }
    };
    let ctx = Rc::new(ShardCtx {
        index,
        hostname: config.server.hostname.clone(),
        session_config,
        relay: config.relay.clone(),
        partition,
        ids,
        delivery: Rc::clone(&engine),
        metrics: ShardMetrics::new(index),
        buffers: super::buffers::BufferPool::new(config.server.read_buffer_size),
        session_timeout: config.server.session_timeout(),
        shutdown: Semaphore::new(0),
        cut: Semaphore::new(0),
        shutting_down: Cell::new(false),
        active: Cell::new(0),
        drained: Semaphore::new(0),
    });
    for listener in listeners {
        let ctx = Rc::clone(&ctx);
        let limiter = Arc::clone(&limiter);
        glommio::spawn_local(accept_loop(listener, ctx, limiter)).detach();
    }
    let _ = ready.send(Ok(()));
    drop(ready);
    // Messages spooled before this start are queued again in the background
    // while new mail is accepted.
    glommio::spawn_local(Rc::clone(&engine).rebuild()).detach();

    while !stop.load(Ordering::Acquire) {
        glommio::timer::sleep(STOP_POLL).await;
    }
    tracing::info!(shard = index, "shutting down");
    let grace_end = std::time::Instant::now() + config.server.shutdown_grace();
    ctx.shutting_down.set(true);
    ctx.shutdown.close();
    // Delivery takes no new work; transactions in flight finish (or are
    // cut at the end of the grace period and retried after a restart).
    engine.begin_shutdown();
    // Wait for the last session (it signals `drained`) or the grace period,
    // whichever comes first; no polling timers here.
    if ctx.active.get() > 0 {
        future::or(
            async {
                let _ = ctx.drained.acquire(1).await;
            },
            glommio::timer::sleep(config.server.shutdown_grace()),
        )
        .await;
    }
    if ctx.active.get() > 0 {
        tracing::warn!(
            shard = index,
            sessions = ctx.active.get(),
            "grace period over; closing remaining sessions"
        );
        // Each writes its 421 (bounded by CUT_WRITE) and ends.
        ctx.cut.close();
        future::or(
            async {
                let _ = ctx.drained.acquire(1).await;
            },
            glommio::timer::sleep(CUT_WRITE * 2),
        )
        .await;
    }
    if !engine.drain(grace_end).await {
        tracing::warn!(
            shard = index,
            "grace period over; abandoning outbound transactions (retried after restart)"
        );
    }
    // Stay alive until every shard is done. With SO_REUSEPORT the kernel
    // keeps spreading new connections over every open listener of the port;
    // once this future ends our tasks are never polled again, so a shard that
    // finished early would leave its (still open) listener's share of new
    // connections waiting unanswered. Until the process exits, every shard's
    // accept loop answers them `421 4.3.2`. (Dropping the in-flight accept to
    // close the listener instead is not safe with glommio 0.9: an accept the
    // kernel has already completed would leak the accepted socket.)
    draining.fetch_sub(1, Ordering::AcqRel);
    while draining.load(Ordering::Acquire) > 0 {
        glommio::timer::sleep(STOP_POLL).await;
    }
}

/// Accepts until the executor ends. During shutdown it keeps accepting but
/// answers `421 4.3.2` at once (RFC 5321 3.8), so a client gets a clear
/// answer instead of a hang; the accept in flight is never abandoned (see
/// the end of [`run`]).
async fn accept_loop(listener: TcpListener, ctx: Rc<ShardCtx>, limiter: Arc<ConnectionLimiter>) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if ctx.is_shutting_down() {
            ctx.metrics.connection_rejected("shutdown");
            let line = format!(
                "421 4.3.2 {} Service shutting down, try again later\r\n",
                ctx.hostname
            );
            refuse(stream, line);
            continue;
        }
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        ctx.metrics.connections_total.increment(1);
        match limiter.admit(peer.ip()) {
            Err(refusal) => {
                ctx.metrics.connection_rejected(refusal.label());
                tracing::info!(%peer, reason = refusal.label(), "connection refused");
                refuse(stream, refusal.reply_line(&ctx.hostname));
            }
            Ok(permit) => {
                let ctx2 = Rc::clone(&ctx);
                ctx.active.set(ctx.active.get() + 1);
                ctx.metrics.connections_active.increment(1.0);
                let span = tracing::info_span!("session", %peer, shard = ctx.index);
                glommio::spawn_local(
                    async move {
                        tracing::debug!("connected");
                        super::session::drive(stream, peer, Rc::clone(&ctx2)).await;
                        drop(permit);
                        ctx2.active.set(ctx2.active.get() - 1);
                        if ctx2.active.get() == 0 && ctx2.is_shutting_down() {
                            ctx2.drained.signal(1);
                        }
                        ctx2.metrics.connections_active.decrement(1.0);
                        tracing::debug!("closed");
                    }
                    .instrument(span),
                )
                .detach();
            }
        }
    }
}

/// Writes `line` and closes, in the background, bounded in time.
fn refuse(stream: glommio::net::TcpStream, line: String) {
    glommio::spawn_local(async move {
        use futures_lite::AsyncWriteExt;
        let mut stream = stream;
        let write = async {
            let _ = stream.write_all(line.as_bytes()).await;
        };
        future::or(write, glommio::timer::sleep(Duration::from_secs(5))).await;
        let _ = stream.close().await;
    })
    .detach();
}
