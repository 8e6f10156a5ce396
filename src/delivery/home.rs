//! The home shard's side of delivery: the messages this shard accepted (and
//! the partitions it adopted). It splits each message into queue entries
//! for the shards owning their domains, applies the per-recipient outcomes
//! that come back, and when every recipient is final stores the DSN (if one
//! is owed) and removes the message in one batch. At start-up it rebuilds
//! the queues from the spool.

use std::rc::Rc;
use std::time::{Instant, SystemTime};

use super::dsn::{self, Action, DsnInput, DsnRecipient};
use super::engine::{now_ms, Engine, InFlight, MeshMsg, Outcome};
use super::metrics::OutcomeKind;
use super::plan::{self, RcptResult};
use super::queue::QueueEntry;
use crate::server::{date, shard_for};
use crate::smtp::{EnhancedCode, Reply};
use crate::spool::{Envelope, Partition, RecipientState, SpoolId};

impl Engine {
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
        let token = InFlight::new(&self.in_flight);
        let home = usize::from(outcome.partition) % self.shards;
        if home == self.index {
            self.spawn_apply(outcome, token);
        } else {
            self.send(home, MeshMsg::Outcome(outcome, token));
        }
    }

    pub(super) fn fail_local(
        self: &Rc<Self>,
        id: SpoolId,
        partition: u16,
        rcpts: &[u16],
        reply: &Reply,
    ) {
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

    pub(super) fn spawn_apply(self: &Rc<Self>, outcome: Outcome, token: InFlight) {
        let e = Rc::clone(self);
        glommio::spawn_local(async move {
            e.apply(outcome).await;
            drop(token);
        })
        .detach();
    }

    /// Applies an outcome to the stored envelope. Everything from reading
    /// the envelope to handing the new one to the spool runs without a
    /// yield, so outcomes for the same message (several domains) never
    /// overwrite each other; only the flush is awaited.
    pub(super) async fn apply(self: Rc<Self>, outcome: Outcome) {
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
    pub(super) async fn finish(self: &Rc<Self>, part: &Partition, env: Envelope) {
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
    pub(super) fn accepted_dsn(self: &Rc<Self>, partition: u16, env: &Envelope) {
        let max = self.config.delivery.max_recipients_per_transaction;
        let (entries, _) = plan::entries_for_new(env, partition, max);
        let now = now_ms();
        for entry in entries {
            self.dispatch(entry, now);
        }
    }

    /// The DSN owed for `env` (envelope and message), if any.
    pub(super) fn build_dsn(
        &self,
        part: &Partition,
        env: &Envelope,
    ) -> Option<(Envelope, Vec<u8>)> {
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
            Ok(None) => bytes::Bytes::new(),
            Err(e) => {
                tracing::warn!(id = %env.id, error = %e, "cannot read the original for the DSN; headers omitted");
                bytes::Bytes::new()
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
}
