//! The delivery engine of one shard: both of its roles.
//!
//! * **Home shard** of the messages it accepted (and of the partitions it
//!   adopted): splits each message into queue entries and sends each to the
//!   owner of its destination domain; applies per-recipient outcomes that
//!   come back to the envelope; when every recipient is final, stores the
//!   DSN (if one is owed) and removes the message in one batch; rebuilds
//!   everything from the spool at start-up.
//! * **Delivery shard** of the domains `shard_for` gives it: keeps their
//!   ready and scheduled queues, wakes for the next scheduled entry, and runs
//!   the connection tasks ([`super::worker`]).
//!
//! Shards talk over a glommio channel mesh: home -> owner carries queue
//! entries, owner -> home carries outcomes. Each shard drains its receivers
//! in tasks that never block on anything else, so two shards sending to each
//! other with full channels cannot deadlock.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_lite::future;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};

use super::accounting::Accounting;
use super::backoff::RetryPolicy;
use super::dns::Resolver;
use super::metrics::DeliveryMetrics;
use super::notify::Notify;
use super::plan::RcptResult;
use super::queue::{DomainCounts, QueueEntry, Queues};
use super::route::{Destination, Routes};
use crate::config::Config;
use crate::server::date;
use crate::smtp::client::{ClientConfig, ClientTimeouts};
use crate::spool::{Partition, PartitionReader, Spool, SpoolId, SpoolIdGenerator};

/// A message between shards.
#[derive(Debug)]
pub enum MeshMsg {
    /// Home -> owner: queue this entry, due at this time (Unix ms).
    Entry(QueueEntry, u64),
    /// Owner -> home: apply these results.
    Outcome(Outcome, InFlight),
}

/// Counts one piece of delivery work in flight across the process (an open
/// connection, an outcome not yet written to the spool) until dropped. At
/// shutdown every shard waits for the count to reach zero (within the grace
/// period), so a shard never exits while another still owes it an outcome.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more.
    pub fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-recipient results of one attempt (or of a local verdict) for one
/// message, to be applied by its home shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The message.
    pub id: SpoolId,
    /// Its partition.
    pub partition: u16,
    /// The results.
    pub results: Vec<RcptResult>,
}

/// Bounded channel size between two shards. A full channel makes the sender
/// wait (in its own task), never the receiver.
const MESH_CHANNEL: usize = 4096;

/// The queue state each shard publishes for the admin endpoint (the admin
/// thread cannot look into a shard's `Rc` state).
#[derive(Clone, Debug, Default)]
pub struct ShardQueueSnapshot {
    /// Entries due now.
    pub ready: usize,
    /// Entries waiting for a retry.
    pub scheduled: usize,
    /// Open outbound connections.
    pub connections: usize,
    /// The busiest domains.
    pub domains: Vec<DomainCounts>,
}

/// All shards' snapshots, indexed by shard.
pub type QueueSnapshot = Arc<Mutex<Vec<ShardQueueSnapshot>>>;

/// Built once in `server::serve` and cloned into every shard.
#[derive(Clone)]
pub struct DeliveryShared {
    /// The whole configuration.
    pub config: Arc<Config>,
    /// The process's spool.
    pub spool: Spool,
    /// The mesh every shard joins (None with one shard or delivery off).
    pub mesh: Option<MeshBuilder<MeshMsg, Full>>,
    /// Executor ids by shard index, to map shards to mesh peers.
    pub executor_ids: Arc<Mutex<Vec<Option<usize>>>>,
    /// The DNS resolver (its own thread).
    pub resolver: Resolver,
    /// Static routes.
    pub routes: Routes,
    /// The accounting log.
    pub log: Accounting,
    /// Published queue counts.
    pub snapshot: QueueSnapshot,
    /// The highest id in the spool at start-up: messages up to it are
    /// re-queued by the rebuild, later ones by their reception.
    pub not_before: Option<SpoolId>,
    /// Every partition in the spool at start-up.
    pub partitions: Vec<u16>,
    /// Delivery work in flight over all shards (see [`InFlight`]).
    pub in_flight: Arc<AtomicUsize>,
}

impl DeliveryShared {
    /// A mesh for `shards` shards (none needed for one).
    pub fn mesh_for(shards: usize, enabled: bool) -> Option<MeshBuilder<MeshMsg, Full>> {
        (enabled && shards > 1).then(|| MeshBuilder::full(shards, MESH_CHANNEL))
    }
}

/// The client core's settings from `[delivery]`.
pub fn client_config(config: &Config) -> ClientConfig {
    let d = &config.delivery;
    let s = Duration::from_secs;
    ClientConfig {
        ehlo_name: config.server.hostname.clone(),
        timeouts: ClientTimeouts {
            greeting: s(d.greeting_timeout),
            ehlo: s(d.helo_timeout),
            mail: s(d.mail_timeout),
            rcpt: s(d.rcpt_timeout),
            data_init: s(d.data_timeout),
            data_block: s(d.data_block_timeout),
            final_dot: s(d.data_end_timeout),
            rset: s(d.rset_timeout),
            quit: s(d.rset_timeout),
            ..ClientTimeouts::default()
        },
        use_chunking: d.chunking,
        ..ClientConfig::default()
    }
}

/// Per-destination runtime state on the owning shard.
pub(super) struct Dest {
    pub domain: String,
    /// Connection tasks alive (connecting, busy or idle).
    pub conns: Cell<usize>,
    /// Of those, still connecting (they will take work once ready).
    pub starting: Cell<usize>,
    /// Of those, idle and waiting on `work`.
    pub idle: Cell<usize>,
    /// Signalled when ready work arrives for an idle connection.
    pub work: Notify,
    /// Consecutive times no host could be reached.
    pub failures: Cell<u32>,
    /// The last routing answer, reused until it expires.
    pub resolved: RefCell<Option<Destination>>,
}

/// Unix milliseconds now.
pub(super) fn now_ms() -> u64 {
    date::unix_ms(SystemTime::now())
}

/// One shard's delivery engine. See the module documentation.
pub struct Engine {
    pub(super) index: usize,
    pub(super) shards: usize,
    pub(super) enabled: bool,
    pub(super) config: Arc<Config>,
    pub(super) policy: RetryPolicy,
    pub(super) client_config: Arc<ClientConfig>,
    pub(super) spool: Spool,
    /// Partitions this shard writes: its own and adopted ones.
    pub(super) partitions: HashMap<u16, Partition>,
    pub(super) readers: RefCell<HashMap<u16, PartitionReader>>,
    pub(super) ids: Rc<RefCell<SpoolIdGenerator>>,
    pub(super) senders: Option<Senders<MeshMsg>>,
    /// Mesh peer id of each shard.
    pub(super) peer_of: Vec<usize>,
    pub(super) queues: RefCell<Queues>,
    pub(super) dests: RefCell<HashMap<String, Rc<Dest>>>,
    pub(super) timer: Notify,
    pub(super) resolver: Resolver,
    pub(super) routes: Routes,
    pub(super) log: Accounting,
    /// Messages whose completion (DSN + remove) is being written: a late
    /// outcome must not complete them twice.
    pub(super) completing: RefCell<HashSet<SpoolId>>,
    pub(super) metrics: DeliveryMetrics,
    pub(super) stopping: Cell<bool>,
    /// Signalled at shutdown (idle connections QUIT).
    pub(super) shutdown: Notify,
    pub(super) connections: Cell<usize>,
    /// Signalled when a connection task ends.
    pub(super) connection_ended: Notify,
    pub(super) snapshot: QueueSnapshot,
    pub(super) not_before: Option<SpoolId>,
    pub(super) in_flight: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("shard", &self.index)
            .field("enabled", &self.enabled)
            .finish()
    }
}

/// How often a shard waiting for the mesh looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

impl Engine {
    /// Sets up the engine of shard `index`: opens adopted partitions, joins
    /// the mesh (every shard must; gives up if `stop` is raised meanwhile,
    /// e.g. because another shard failed to start), and starts the receiver,
    /// timer and snapshot tasks. Call [`Engine::rebuild`] once the shard is
    /// serving.
    pub async fn start(
        shared: DeliveryShared,
        index: usize,
        shards: usize,
        own: Partition,
        ids: Rc<RefCell<SpoolIdGenerator>>,
        stop: Arc<AtomicBool>,
    ) -> Result<Rc<Engine>, String> {
        let mut partitions = HashMap::new();
        partitions.insert(own.shard(), own);
        for &p in &shared.partitions {
            if usize::from(p) >= shards && usize::from(p) % shards == index {
                let part = shared
                    .spool
                    .partition(p)
                    .map_err(|e| format!("cannot open spool partition {p}: {e}"))?;
                tracing::info!(
                    shard = index,
                    partition = p,
                    messages = part.len(),
                    "adopted orphan spool partition"
                );
                partitions.insert(p, part);
            }
        }
        let enabled = shared.config.delivery.enabled;
        let (senders, receivers, peer_of) = match shared.mesh.clone() {
            Some(mesh) => {
                shared.executor_ids.lock().map_err(|_| "poisoned")?[index] =
                    Some(glommio::executor().id());
                let joined = future::or(async { Some(mesh.join().await) }, async {
                    while !stop.load(Ordering::Acquire) {
                        glommio::timer::sleep(STOP_POLL).await;
                    }
                    None
                })
                .await;
                let (senders, receivers) = match joined {
                    Some(Ok(pair)) => pair,
                    Some(Err(e)) => return Err(format!("cannot join the shard mesh: {e}")),
                    None => return Err(format!("shard {index} stopped before the mesh formed")),
                };
                // Peers are ordered by executor id; every shard wrote its id
                // before joining, and the join completes only after all did.
                let exec: Vec<usize> = shared
                    .executor_ids
                    .lock()
                    .map_err(|_| "poisoned")?
                    .iter()
                    .map(|e| e.unwrap_or(usize::MAX))
                    .collect();
                let peer_of = exec
                    .iter()
                    .map(|&mine| exec.iter().filter(|&&other| other < mine).count())
                    .collect();
                (Some(senders), Some(receivers), peer_of)
            }
            None => (None, None, (0..shards).collect()),
        };
        {
            let mut snap = shared.snapshot.lock().map_err(|_| "poisoned")?;
            if snap.len() < shards {
                snap.resize(shards, ShardQueueSnapshot::default());
            }
        }
        let engine = Rc::new(Engine {
            index,
            shards,
            enabled,
            policy: RetryPolicy::from_config(&shared.config.delivery),
            client_config: Arc::new(client_config(&shared.config)),
            config: shared.config,
            spool: shared.spool,
            partitions,
            readers: RefCell::new(HashMap::new()),
            ids,
            senders,
            peer_of,
            queues: RefCell::new(Queues::new()),
            dests: RefCell::new(HashMap::new()),
            timer: Notify::new(),
            resolver: shared.resolver,
            routes: shared.routes,
            log: shared.log,
            completing: RefCell::new(HashSet::new()),
            metrics: DeliveryMetrics::new(index),
            stopping: Cell::new(false),
            shutdown: Notify::new(),
            connections: Cell::new(0),
            connection_ended: Notify::new(),
            snapshot: shared.snapshot,
            not_before: shared.not_before,
            in_flight: shared.in_flight,
        });
        if let Some(mut receivers) = receivers {
            for (peer, rx) in receivers.streams() {
                let e = Rc::clone(&engine);
                glommio::spawn_local(async move {
                    while let Some(msg) = rx.recv().await {
                        e.receive(msg);
                    }
                    tracing::debug!(shard = e.index, peer, "mesh channel closed");
                })
                .detach();
            }
        }
        if enabled {
            glommio::spawn_local(Rc::clone(&engine).timer_task()).detach();
            glommio::spawn_local(Rc::clone(&engine).snapshot_task()).detach();
        }
        Ok(engine)
    }

    /// This shard's index.
    pub fn shard(&self) -> usize {
        self.index
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.get()
    }

    pub(super) fn receive(self: &Rc<Self>, msg: MeshMsg) {
        match msg {
            MeshMsg::Entry(entry, due) => self.enqueue(entry, due),
            MeshMsg::Outcome(o, token) => self.spawn_apply(o, token),
        }
    }

    /// Sends `msg` to shard `to` (not this one). Tries without waiting
    /// first; a full channel hands the send to a task.
    pub(super) fn send(self: &Rc<Self>, to: usize, msg: MeshMsg) {
        let Some(senders) = &self.senders else {
            tracing::error!(to, "no mesh to send over");
            return;
        };
        let peer = self.peer_of[to];
        match senders.try_send_to(peer, msg) {
            Ok(()) => {}
            Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(msg))) => {
                let e = Rc::clone(self);
                glommio::spawn_local(async move {
                    if let Some(s) = &e.senders {
                        if let Err(err) = s.send_to(peer, msg).await {
                            // Only at shutdown: the spool still has the
                            // state, a restart redoes it.
                            tracing::warn!(to, error = %err, "mesh send failed");
                        }
                    }
                })
                .detach();
            }
            Err(err) => tracing::warn!(to, error = %err, "mesh send failed"),
        }
    }

    /// Stops taking new work: idle connections QUIT, busy ones QUIT after
    /// their transaction, the timer stops. Queued entries stay in the spool.
    pub fn begin_shutdown(&self) {
        self.stopping.set(true);
        self.shutdown.notify_all();
        self.timer.notify_all();
        for d in self.dests.borrow().values() {
            d.work.notify_all();
        }
    }

    /// Waits until every connection task of this shard has ended and no
    /// outcome is in flight anywhere in the process, at most until
    /// `deadline`. Returns whether everything settled.
    pub async fn drain(&self, deadline: Instant) -> bool {
        while self.connections.get() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            future::or(
                self.connection_ended.notified(),
                glommio::timer::sleep(left),
            )
            .await;
        }
        // Other shards' connections report outcomes to this one, and this
        // one's to them: all stay until the process-wide count is zero. The
        // count lives across threads, so poll it (only during shutdown).
        while self.in_flight.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// Held by a connection task: its end updates the counts (whatever way it
/// ends, a drop included) and opens a replacement if work is left.
pub(super) struct ConnectionGuard {
    pub engine: Rc<Engine>,
    pub dest: Rc<Dest>,
    pub starting: Cell<bool>,
    pub _in_flight: InFlight,
}

impl ConnectionGuard {
    /// The connection is ready (or gave up connecting): no longer starting.
    pub fn started(&self) {
        if self.starting.replace(false) {
            let s = &self.dest.starting;
            s.set(s.get().saturating_sub(1));
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.started();
        let d = &self.dest;
        d.conns.set(d.conns.get().saturating_sub(1));
        let e = &self.engine;
        e.connections.set(e.connections.get().saturating_sub(1));
        e.connection_ended.notify_all();
        if !e.stopping() && e.ready_len(&d.domain) > 0 {
            e.kick(&d.domain);
        }
    }
}
