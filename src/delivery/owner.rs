//! The delivery shard's side: the queues of the domains `shard_for` gives
//! this shard, the timer that promotes scheduled entries, the connection
//! pool per destination ([`super::worker`] runs each connection), and the
//! verdicts (delivered / deferred with backoff / failed) it reports back to
//! the home shards.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;

use super::accounting::RemoteMta;
use super::backoff::RetryVerdict;
use super::dns::DnsError;
use super::engine::{now_ms, ConnectionGuard, Dest, Engine, InFlight, Outcome, ShardQueueSnapshot};
use super::log::BounceReason;
use super::metrics::OutcomeKind;
use super::notify::Notify;
use super::plan::RcptResult;
use super::queue::{Placed, QueueEntry};
use crate::smtp::Reply;
use crate::spool::{PartitionReader, RecipientState};

/// How often a shard publishes its per-domain counts for `/queue`.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Domains listed per shard in the snapshot.
const SNAPSHOT_DOMAINS: usize = 100;

impl Engine {
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
                _in_flight: InFlight::new(&self.in_flight),
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
    /// failed once the message is older than `max_age`. `remote`: the
    /// server that gave `reply`, None when Sluice made it.
    pub(super) fn temporary_failure(
        self: &Rc<Self>,
        entry: &QueueEntry,
        rcpts: Vec<u16>,
        reply: &Reply,
        remote: Option<RemoteMta>,
        results: &mut Vec<RcptResult>,
    ) {
        let remote_mta = remote.as_ref().map(|r| r.host.clone());
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
                    .outcome(OutcomeKind::Deferred, reply.code(), remote.is_some(), n);
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
                    remote.as_ref(),
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
                    .outcome(OutcomeKind::Failed, reply.code(), remote.is_some(), n);
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
                    remote.as_ref(),
                    BounceReason::Expired,
                );
            }
        }
    }

    /// Results for `rcpts` of `entry` after a permanent failure (`remote`
    /// as for [`Engine::temporary_failure`]).
    pub(super) fn permanent_failure(
        &self,
        entry: &QueueEntry,
        rcpts: &[u16],
        reply: &Reply,
        remote_mta: Option<RemoteMta>,
        reason: BounceReason,
        results: &mut Vec<RcptResult>,
    ) {
        if rcpts.is_empty() {
            return;
        }
        let remote = reason == BounceReason::Remote;
        let remote_host = remote_mta.as_ref().map(|r| r.host.clone());
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
                remote_mta: remote_host.clone(),
            });
        }
        self.log.failure(
            entry,
            &self.addresses(entry, rcpts),
            reply,
            remote_mta.as_ref(),
            reason,
        );
    }

    /// The addresses of `rcpts` of `entry`, for the accounting log (read
    /// only when the log is on).
    pub(super) fn addresses(&self, entry: &QueueEntry, rcpts: &[u16]) -> Vec<String> {
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
        let now = now_ms();
        let held = self.queues.borrow().held_until(&dest.domain, now);
        let (failures, until) = match held {
            // Another connection of this destination, started in the same
            // round, failed first: one outage counts once. (Counting each of
            // up to max_connections tasks made one short outage of a busy
            // destination hold it for retry_max.)
            Some(until) => (dest.failures.get(), until),
            None => {
                let failures = dest.failures.get().saturating_add(1);
                dest.failures.set(failures);
                self.metrics.destinations_held.increment(1);
                (
                    failures,
                    now + self.policy.delay_ms(failures, rand::random::<f64>()),
                )
            }
        };
        let taken = self.queues.borrow_mut().hold(&dest.domain, until);
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
            self.temporary_failure(&entry, entry.rcpts.clone(), reply, None, &mut results);
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

    pub(super) async fn timer_task(self: Rc<Self>) {
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

    pub(super) async fn snapshot_task(self: Rc<Self>) {
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
}
