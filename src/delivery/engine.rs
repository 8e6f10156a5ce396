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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_lite::future;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};

use super::accounting::Accounting;
use super::backoff::{RetryPolicy, RetryVerdict};
use super::dns::{DnsError, Resolver};
use super::dsn::{self, Action, DsnInput, DsnRecipient};
use super::log::BounceReason;
use super::metrics::{DeliveryMetrics, OutcomeKind};
use super::notify::Notify;
use super::plan::{self, RcptResult};
use super::queue::{DomainCounts, Placed, QueueEntry, Queues};
use super::route::{Destination, Routes};
use crate::config::Config;
use crate::server::{date, shard_for};
use crate::smtp::client::{ClientConfig, ClientTimeouts};
use crate::smtp::{EnhancedCode, Reply};
use crate::spool::{
    Envelope, Partition, PartitionReader, RecipientState, Spool, SpoolId, SpoolIdGenerator,
};

/// A message between shards.
#[derive(Debug)]
pub enum MeshMsg {
    /// Home -> owner: queue this entry, due at this time (Unix ms).
    Entry(QueueEntry, u64),
    /// Owner -> home: apply these results.
    Outcome(Outcome),
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

/// How often a shard publishes its per-domain counts for `/queue`.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Domains listed per shard in the snapshot.
const SNAPSHOT_DOMAINS: usize = 100;

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
    shards: usize,
    pub(super) enabled: bool,
    pub(super) config: Arc<Config>,
    pub(super) policy: RetryPolicy,
    pub(super) client_config: Arc<ClientConfig>,
    spool: Spool,
    /// Partitions this shard writes: its own and adopted ones.
    partitions: HashMap<u16, Partition>,
    readers: RefCell<HashMap<u16, PartitionReader>>,
    ids: Rc<RefCell<SpoolIdGenerator>>,
    senders: Option<Senders<MeshMsg>>,
    /// Mesh peer id of each shard.
    peer_of: Vec<usize>,
    pub(super) queues: RefCell<Queues>,
    dests: RefCell<HashMap<String, Rc<Dest>>>,
    timer: Notify,
    pub(super) resolver: Resolver,
    pub(super) routes: Routes,
    pub(super) log: Accounting,
    /// Messages whose completion (DSN + remove) is being written: a late
    /// outcome must not complete them twice.
    completing: RefCell<HashSet<SpoolId>>,
    pub(super) metrics: DeliveryMetrics,
    stopping: Cell<bool>,
    /// Signalled at shutdown (idle connections QUIT).
    pub(super) shutdown: Notify,
    connections: Cell<usize>,
    /// Signalled when a connection task ends.
    connection_ended: Notify,
    snapshot: QueueSnapshot,
    not_before: Option<SpoolId>,
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

    fn receive(self: &Rc<Self>, msg: MeshMsg) {
        match msg {
            MeshMsg::Entry(entry, due) => self.enqueue(entry, due),
            MeshMsg::Outcome(o) => self.spawn_apply(o),
        }
    }

    /// Sends `msg` to shard `to` (not this one). Tries without waiting
    /// first; a full channel hands the send to a task.
    fn send(self: &Rc<Self>, to: usize, msg: MeshMsg) {
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

    // ------------------------------------------------------------------
    // Home side.

    /// A message was stored and acknowledged on this shard: log it and
    /// queue it. Never fails: whatever cannot be queued now is in the spool
    /// and is queued again at the next start.
    pub fn accepted(self: &Rc<Self>, partition: u16, envelope: &Envelope) {
        self.log.reception(envelope);
        if !self.enabled {
            return;
        }
        let max = self.config.delivery.max_recipients_per_transaction;
        let (entries, unroutable) = plan::entries_for_new(envelope, partition, max);
        let now = now_ms();
        for entry in entries {
            self.dispatch(entry, now);
        }
        if !unroutable.is_empty() {
            self.fail_local(
                envelope.id,
                partition,
                &unroutable,
                &Reply::new(
                    550,
                    EnhancedCode::new(5, 1, 3),
                    "Recipient address has no domain",
                ),
            );
        }
    }

    /// Sends `entry` to the shard owning its domain.
    pub(super) fn dispatch(self: &Rc<Self>, entry: QueueEntry, due_ms: u64) {
        let owner = shard_for(&entry.domain, self.shards);
        if owner == self.index {
            self.enqueue(entry, due_ms);
        } else {
            self.send(owner, MeshMsg::Entry(entry, due_ms));
        }
    }

    /// Sends `outcome` to its message's home shard.
    pub(super) fn report(self: &Rc<Self>, outcome: Outcome) {
        if outcome.results.is_empty() {
            return;
        }
        let home = usize::from(outcome.partition) % self.shards;
        if home == self.index {
            self.spawn_apply(outcome);
        } else {
            self.send(home, MeshMsg::Outcome(outcome));
        }
    }

    fn fail_local(self: &Rc<Self>, id: SpoolId, partition: u16, rcpts: &[u16], reply: &Reply) {
        let at_ms = now_ms();
        self.metrics
            .outcome(OutcomeKind::Failed, reply.code(), false, rcpts.len() as u64);
        let results = rcpts
            .iter()
            .map(|&index| RcptResult {
                index,
                state: RecipientState::Failed {
                    at_ms,
                    reply: reply.to_string(),
                },
                remote_mta: None,
            })
            .collect();
        self.report(Outcome {
            id,
            partition,
            results,
        });
    }

    fn spawn_apply(self: &Rc<Self>, outcome: Outcome) {
        let e = Rc::clone(self);
        glommio::spawn_local(async move { e.apply(outcome).await }).detach();
    }

    /// Applies an outcome to the stored envelope. Everything from reading
    /// the envelope to handing the new one to the spool runs without a
    /// yield, so outcomes for the same message (several domains) never
    /// overwrite each other; only the flush is awaited.
    async fn apply(self: Rc<Self>, outcome: Outcome) {
        let Some(part) = self.partitions.get(&outcome.partition).cloned() else {
            tracing::error!(partition = outcome.partition, id = %outcome.id, "outcome for a partition this shard does not own");
            return;
        };
        if self.completing.borrow().contains(&outcome.id) {
            return;
        }
        let mut env = match part.load_envelope(outcome.id) {
            Ok(Some(env)) => env,
            // Already completed (a repeated outcome after a restart).
            Ok(None) => return,
            Err(e) => {
                self.metrics.spool_errors.increment(1);
                tracing::error!(id = %outcome.id, error = %e, "cannot read envelope to apply an outcome");
                return;
            }
        };
        if plan::apply_results(&mut env, &outcome.results) == 0 {
            return;
        }
        if env.is_done() {
            self.finish(&part, env).await;
        } else if let Err(e) = part.update(&env).await {
            self.metrics.spool_errors.increment(1);
            tracing::error!(id = %env.id, error = %e, "cannot store delivery outcome; recipients will be retried after a restart");
        }
    }

    /// Every recipient of `env` is final: store the DSN if one is owed and
    /// remove the message, in one batch; then queue the DSN.
    async fn finish(self: &Rc<Self>, part: &Partition, env: Envelope) {
        let id = env.id;
        if !self.completing.borrow_mut().insert(id) {
            return;
        }
        let dsn = self.build_dsn(part, &env);
        let dsn_rcpts = dsn::recipients_to_report(&env, Action::Failed).len();
        let result = part
            .complete(id, dsn.as_ref().map(|(e, b)| (e, b.as_slice())))
            .await;
        self.completing.borrow_mut().remove(&id);
        match result {
            Ok(()) => {
                self.metrics.completed.increment(1);
                tracing::debug!(%id, "message complete");
                if let Some((denv, _)) = dsn {
                    self.metrics.bounces.increment(1);
                    self.log.dsn(&env, &denv, dsn_rcpts);
                    tracing::info!(%id, dsn = %denv.id, to = %denv.recipients[0].address, "bounce queued");
                    self.accepted_dsn(part.shard(), &denv);
                }
            }
            Err(e) => {
                self.metrics.spool_errors.increment(1);
                tracing::error!(%id, error = %e, "cannot complete message; it is finished again after a restart");
            }
        }
    }

    /// Queues a DSN this shard just stored (not logged as a reception).
    fn accepted_dsn(self: &Rc<Self>, partition: u16, env: &Envelope) {
        let max = self.config.delivery.max_recipients_per_transaction;
        let (entries, _) = plan::entries_for_new(env, partition, max);
        let now = now_ms();
        for entry in entries {
            self.dispatch(entry, now);
        }
    }

    /// The DSN owed for `env` (envelope and message), if any.
    fn build_dsn(&self, part: &Partition, env: &Envelope) -> Option<(Envelope, Vec<u8>)> {
        let indexes = dsn::recipients_to_report(env, Action::Failed);
        if indexes.is_empty() {
            return None;
        }
        let recipients: Vec<DsnRecipient> = indexes
            .iter()
            .filter_map(|&i| {
                let r = &env.recipients[i];
                let mut d = DsnRecipient::from_spool(r)?;
                d.remote_host = r.remote_mta.clone();
                // A recipient failed with a transient reply was never
                // refused: it ran out of time (RFC 3463 4.4.7).
                if let RecipientState::Failed { reply, .. } = &r.state {
                    if !reply.starts_with('5') {
                        d.status = Some(EnhancedCode::new(4, 4, 7));
                    }
                }
                Some(d)
            })
            .collect();
        let original = match part.reader().load_body(env.id) {
            Ok(Some(b)) => b,
            Ok(None) => sled::IVec::default(),
            Err(e) => {
                tracing::warn!(id = %env.id, error = %e, "cannot read the original for the DSN; headers omitted");
                sled::IVec::default()
            }
        };
        let now = SystemTime::now();
        let now_ms = date::unix_ms(now);
        let dsn_id = self.ids.borrow_mut().next(now_ms);
        let built = dsn::build(&DsnInput {
            hostname: &self.config.server.hostname,
            dsn_id,
            date: now,
            envelope: env,
            recipients: &recipients,
            original: &original,
            return_size_limit: self.config.delivery.bounce_size_limit,
        })?;
        let denv = built.envelope(dsn_id, now_ms, &env.sender);
        Some((denv, built.message))
    }

    /// Re-queues everything in this shard's partitions that was stored
    /// before this start (messages accepted since queue themselves), and
    /// finishes messages that were complete but not yet removed.
    pub async fn rebuild(self: Rc<Self>) {
        if !self.enabled {
            return;
        }
        let Some(limit) = self.not_before else {
            return;
        };
        let started = Instant::now();
        let max = self.config.delivery.max_recipients_per_transaction;
        let mut parts: Vec<Partition> = self.partitions.values().cloned().collect();
        parts.sort_by_key(|p| p.shard());
        let (mut messages, mut entries, mut finished) = (0usize, 0usize, 0usize);
        for part in parts {
            // Collect the envelopes first: completing messages while a sled
            // iterator is open over the same tree is allowed, but a snapshot
            // keeps the walk simple to reason about.
            let envelopes: Vec<Envelope> = part
                .envelopes()
                .filter_map(|r| match r {
                    Ok(env) => Some(env),
                    Err(e) => {
                        tracing::error!(partition = part.shard(), error = %e, "unreadable envelope skipped");
                        None
                    }
                })
                .filter(|env| env.id <= limit)
                .collect();
            for env in envelopes {
                if self.stopping() {
                    return;
                }
                messages += 1;
                if env.is_done() {
                    finished += 1;
                    self.finish(&part, env).await;
                    continue;
                }
                let now = now_ms();
                let (list, unroutable) = plan::entries_for_restart(&env, part.shard(), max, now);
                entries += list.len();
                for (entry, due) in list {
                    self.dispatch(entry, due);
                }
                if !unroutable.is_empty() {
                    self.fail_local(
                        env.id,
                        part.shard(),
                        &unroutable,
                        &Reply::new(
                            550,
                            EnhancedCode::new(5, 1, 3),
                            "Recipient address has no domain",
                        ),
                    );
                }
                glommio::yield_if_needed().await;
            }
        }
        tracing::info!(
            shard = self.index,
            messages,
            entries,
            finished,
            secs = started.elapsed().as_secs_f64(),
            "queues rebuilt from the spool"
        );
    }

    // ------------------------------------------------------------------
    // Delivery side.

    /// Queues an entry this shard owns.
    pub(super) fn enqueue(self: &Rc<Self>, entry: QueueEntry, due_ms: u64) {
        if !self.enabled || self.stopping() {
            // The spool has it; the next start queues it again.
            return;
        }
        let domain = entry.domain.clone();
        let placed = self.queues.borrow_mut().push(entry, due_ms, now_ms());
        match placed {
            Placed::Ready => self.kick(&domain),
            Placed::Scheduled(_) => self.timer.notify_all(),
        }
        self.update_gauges();
    }

    /// Puts an entry back at once, without counting an attempt (its
    /// connection went away before it was tried).
    pub(super) fn requeue_untried(self: &Rc<Self>, entry: QueueEntry) {
        if self.stopping() {
            return;
        }
        let now = now_ms();
        let _ = self.queues.borrow_mut().push(entry, now, now);
        self.update_gauges();
    }

    pub(super) fn update_gauges(&self) {
        let q = self.queues.borrow();
        self.metrics.queue_ready.set(q.ready_total() as f64);
        self.metrics.queue_scheduled.set(q.scheduled_total() as f64);
    }

    pub(super) fn dest(&self, domain: &str) -> Rc<Dest> {
        let mut dests = self.dests.borrow_mut();
        if let Some(d) = dests.get(domain) {
            return Rc::clone(d);
        }
        let d = Rc::new(Dest {
            domain: domain.to_owned(),
            conns: Cell::new(0),
            starting: Cell::new(0),
            idle: Cell::new(0),
            work: Notify::new(),
            failures: Cell::new(0),
            resolved: RefCell::new(None),
        });
        dests.insert(domain.to_owned(), Rc::clone(&d));
        d
    }

    /// Ready work for `domain`: wake its idle connections and open new ones
    /// (up to `max_connections`) for what they cannot take.
    pub(super) fn kick(self: &Rc<Self>, domain: &str) {
        if self.stopping() {
            return;
        }
        let ready = self.queues.borrow().ready_len(domain);
        if ready == 0 {
            return;
        }
        let dest = self.dest(domain);
        if dest.idle.get() > 0 {
            dest.work.notify_all();
        }
        let spare = dest.idle.get() + dest.starting.get();
        let mut want = ready.saturating_sub(spare);
        let max = self.config.delivery.max_connections;
        while want > 0 && dest.conns.get() < max {
            want -= 1;
            dest.conns.set(dest.conns.get() + 1);
            dest.starting.set(dest.starting.get() + 1);
            self.connections.set(self.connections.get() + 1);
            let guard = ConnectionGuard {
                engine: Rc::clone(self),
                dest: Rc::clone(&dest),
                starting: Cell::new(true),
            };
            glommio::spawn_local(super::worker::connection(guard)).detach();
        }
    }

    /// The next ready entry of `domain`.
    pub(super) fn pop_ready(&self, domain: &str) -> Option<QueueEntry> {
        let e = self.queues.borrow_mut().pop_ready(domain);
        if e.is_some() {
            self.update_gauges();
        }
        e
    }

    pub(super) fn ready_len(&self, domain: &str) -> usize {
        self.queues.borrow().ready_len(domain)
    }

    /// A read handle on `partition` (opened once, then cached).
    pub(super) fn reader(
        &self,
        partition: u16,
    ) -> Result<PartitionReader, crate::spool::SpoolError> {
        if let Some(r) = self.readers.borrow().get(&partition) {
            return Ok(r.clone());
        }
        let r = self.spool.reader(partition)?;
        self.readers.borrow_mut().insert(partition, r.clone());
        Ok(r)
    }

    /// Results for `rcpts` of `entry` after a temporary failure with
    /// `reply`: deferred with backoff (and the entry scheduled again), or
    /// failed once the message is older than `max_age`.
    pub(super) fn temporary_failure(
        self: &Rc<Self>,
        entry: &QueueEntry,
        rcpts: Vec<u16>,
        reply: &Reply,
        remote_mta: Option<String>,
        remote: bool,
        results: &mut Vec<RcptResult>,
    ) {
        if rcpts.is_empty() {
            return;
        }
        let now = now_ms();
        let attempts = entry.attempts.saturating_add(1);
        let verdict =
            self.policy
                .after_failure(now, entry.received_at_ms, attempts, rand::random::<f64>());
        let n = rcpts.len() as u64;
        match verdict {
            RetryVerdict::RetryAt(next) => {
                self.metrics
                    .outcome(OutcomeKind::Deferred, reply.code(), remote, n);
                for &index in &rcpts {
                    results.push(RcptResult {
                        index,
                        state: RecipientState::Deferred {
                            attempts,
                            last_reply: reply.to_string(),
                            next_attempt_ms: next,
                        },
                        remote_mta: remote_mta.clone(),
                    });
                }
                self.log.deferral(
                    entry,
                    &self.addresses(entry, &rcpts),
                    reply,
                    remote_mta.as_deref(),
                    next,
                );
                let again = QueueEntry {
                    rcpts,
                    attempts,
                    ..entry.clone()
                };
                self.enqueue(again, next);
            }
            RetryVerdict::Expired => {
                self.metrics
                    .outcome(OutcomeKind::Failed, reply.code(), remote, n);
                self.metrics
                    .queue_time
                    .record(now.saturating_sub(entry.received_at_ms) as f64 / 1000.0);
                tracing::info!(id = %entry.id, domain = %entry.domain, attempts, "expired: failing with 4.4.7");
                for &index in &rcpts {
                    results.push(RcptResult {
                        index,
                        state: RecipientState::Failed {
                            at_ms: now,
                            reply: reply.to_string(),
                        },
                        remote_mta: remote_mta.clone(),
                    });
                }
                self.log.failure(
                    entry,
                    &self.addresses(entry, &rcpts),
                    reply,
                    remote_mta.as_deref(),
                    BounceReason::Expired,
                );
            }
        }
    }

    /// Results for `rcpts` of `entry` after a permanent failure.
    pub(super) fn permanent_failure(
        &self,
        entry: &QueueEntry,
        rcpts: &[u16],
        reply: &Reply,
        remote_mta: Option<String>,
        reason: BounceReason,
        results: &mut Vec<RcptResult>,
    ) {
        if rcpts.is_empty() {
            return;
        }
        let remote = reason == BounceReason::Remote;
        let now = now_ms();
        self.metrics.outcome(
            OutcomeKind::Failed,
            reply.code(),
            remote,
            rcpts.len() as u64,
        );
        self.metrics
            .queue_time
            .record(now.saturating_sub(entry.received_at_ms) as f64 / 1000.0);
        for &index in rcpts {
            results.push(RcptResult {
                index,
                state: RecipientState::Failed {
                    at_ms: now,
                    reply: reply.to_string(),
                },
                remote_mta: remote_mta.clone(),
            });
        }
        self.log.failure(
            entry,
            &self.addresses(entry, rcpts),
            reply,
            remote_mta.as_deref(),
            reason,
        );
    }

    /// The addresses of `rcpts` of `entry`, for the accounting log (read
    /// only when the log is on).
    fn addresses(&self, entry: &QueueEntry, rcpts: &[u16]) -> Vec<String> {
        if !self.log.is_enabled() {
            return Vec::new();
        }
        let env = self
            .reader(entry.partition)
            .ok()
            .and_then(|r| r.load_envelope(entry.id).ok().flatten());
        rcpts
            .iter()
            .map(|&i| {
                env.as_ref()
                    .and_then(|e| e.recipients.get(usize::from(i)))
                    .map_or_else(|| format!("#{i}"), |r| r.address.clone())
            })
            .collect()
    }

    /// No host of `dest` could be reached (or DNS failed temporarily): back
    /// the destination off as a whole and defer everything ready for it.
    pub(super) fn destination_unreachable(self: &Rc<Self>, dest: &Dest, reply: &Reply) {
        let failures = dest.failures.get().saturating_add(1);
        dest.failures.set(failures);
        let until = now_ms() + self.policy.delay_ms(failures, rand::random::<f64>());
        let taken = self.queues.borrow_mut().hold(&dest.domain, until);
        self.metrics.destinations_held.increment(1);
        tracing::info!(
            domain = %dest.domain,
            failures,
            entries = taken.len(),
            hold_secs = until.saturating_sub(now_ms()) / 1000,
            reply = %reply,
            "destination unreachable: backed off"
        );
        for entry in taken {
            let mut results = Vec::new();
            self.temporary_failure(
                &entry,
                entry.rcpts.clone(),
                reply,
                None,
                false,
                &mut results,
            );
            self.report(Outcome {
                id: entry.id,
                partition: entry.partition,
                results,
            });
        }
        self.update_gauges();
    }

    /// A routing failure for `dest`.
    pub(super) fn dns_failure(self: &Rc<Self>, dest: &Dest, error: &DnsError) {
        let reply = error.reply();
        if !error.is_permanent() {
            self.destination_unreachable(dest, &reply);
            return;
        }
        let taken = self.queues.borrow_mut().take_ready(&dest.domain);
        tracing::info!(domain = %dest.domain, entries = taken.len(), error = %error, "destination cannot be routed: failing");
        for entry in taken {
            let mut results = Vec::new();
            self.permanent_failure(
                &entry,
                &entry.rcpts,
                &reply,
                None,
                BounceReason::Dns,
                &mut results,
            );
            self.report(Outcome {
                id: entry.id,
                partition: entry.partition,
                results,
            });
        }
        self.update_gauges();
    }

    async fn timer_task(self: Rc<Self>) {
        loop {
            if self.stopping() {
                return;
            }
            let woke = self.queues.borrow_mut().promote(now_ms());
            for domain in woke {
                self.kick(&domain);
            }
            self.update_gauges();
            let wait = match self.queues.borrow().next_due() {
                Some(t) => Duration::from_millis(t.saturating_sub(now_ms()).max(1)),
                None => Duration::from_secs(3600),
            };
            future::or(self.timer.notified(), glommio::timer::sleep(wait)).await;
        }
    }

    async fn snapshot_task(self: Rc<Self>) {
        loop {
            let now = now_ms();
            let snap = {
                let q = self.queues.borrow();
                ShardQueueSnapshot {
                    ready: q.ready_total(),
                    scheduled: q.scheduled_total(),
                    connections: self.connections.get(),
                    domains: q.domain_counts(now, SNAPSHOT_DOMAINS),
                }
            };
            // Forget destinations with nothing queued and no connection
            // (one that is failing keeps its failure count, so its backoff
            // keeps growing).
            let idle: Vec<String> = self
                .dests
                .borrow()
                .iter()
                .filter(|(name, d)| {
                    d.conns.get() == 0
                        && d.failures.get() == 0
                        && self.queues.borrow().ready_len(name) == 0
                })
                .map(|(name, _)| name.clone())
                .collect();
            for name in idle {
                let mut q = self.queues.borrow_mut();
                q.forget_if_idle(&name, now);
                if q.held_until(&name, now).is_none() {
                    self.dests.borrow_mut().remove(&name);
                }
            }
            if let Ok(mut all) = self.snapshot.lock() {
                if let Some(slot) = all.get_mut(self.index) {
                    *slot = snap;
                }
            }
            if self.stopping() {
                return;
            }
            future::or(
                self.shutdown.notified(),
                glommio::timer::sleep(SNAPSHOT_EVERY),
            )
            .await;
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

    /// Waits until every connection task has ended, at most until `deadline`.
    /// Returns how many are still running.
    pub async fn drain(&self, deadline: Instant) -> usize {
        while self.connections.get() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            future::or(
                self.connection_ended.notified(),
                glommio::timer::sleep(left),
            )
            .await;
        }
        self.connections.get()
    }
}

/// Held by a connection task: its end updates the counts (whatever way it
/// ends, a drop included) and opens a replacement if work is left.
pub(super) struct ConnectionGuard {
    pub engine: Rc<Engine>,
    pub dest: Rc<Dest>,
    starting: Cell<bool>,
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
