//! The engine's side of the accounting log: turns what the engine knows
//! (envelopes, queue entries, replies) into [`super::log`] records. When the
//! log is off nothing is built (`EventLog::record` skips the closure).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::log::{Bounce, BounceReason, Deferral, Delivery, DsnQueued, Event, EventLog, Reception};
use super::queue::QueueEntry;
use crate::smtp::Reply;
use crate::spool::Envelope;

/// The server that gave a reply: its name (MX or route host; the DSN's
/// `Remote-MTA`) and the address it was reached at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteMta {
    /// Host name as routed to.
    pub host: String,
    /// The address connected to.
    pub ip: IpAddr,
}

/// A cloneable, `Send` handle (one per process, cloned into every shard).
#[derive(Clone, Debug)]
pub struct Accounting {
    log: EventLog,
}

fn since(received_at_ms: u64, now: SystemTime) -> Duration {
    let received = UNIX_EPOCH + Duration::from_millis(received_at_ms);
    now.duration_since(received).unwrap_or_default()
}

impl Accounting {
    /// Records into `log`.
    pub fn new(log: EventLog) -> Self {
        Accounting { log }
    }

    /// Records nothing.
    pub fn disabled() -> Self {
        Accounting {
            log: EventLog::disabled(),
        }
    }

    /// Whether records are written (callers skip look-ups otherwise).
    pub fn is_enabled(&self) -> bool {
        self.log.is_enabled()
    }

    /// Waits (bounded) until everything recorded so far is written.
    pub fn sync(&self, timeout: Duration) -> bool {
        self.log.sync(timeout)
    }

    /// A message was accepted and spooled.
    pub fn reception(&self, env: &Envelope) {
        self.log.record(|| {
            Event::Reception(Reception {
                id: env.id,
                from: env.sender.clone(),
                rcpt_count: env.recipients.len(),
                size: env.size,
                client_ip: env.client_ip.as_deref().and_then(|ip| ip.parse().ok()),
                helo: env.helo.clone(),
            })
        });
    }

    /// `rcpt` of `entry` was accepted by `host`.
    pub fn delivery(
        &self,
        entry: &QueueEntry,
        rcpt: &str,
        reply: &Reply,
        host: &str,
        ip: Option<IpAddr>,
        conn_reuse: u32,
    ) {
        self.log.record(|| {
            Event::Delivery(Delivery {
                id: entry.id,
                rcpt: rcpt.to_owned(),
                remote_host: host.to_owned(),
                remote_ip: ip,
                reply: reply.clone(),
                attempt: entry.attempts + 1,
                delay: since(entry.received_at_ms, SystemTime::now()),
                conn_reuse,
            })
        });
    }

    /// `rcpts` of `entry` were deferred until `next_ms`.
    pub fn deferral(
        &self,
        entry: &QueueEntry,
        rcpts: &[String],
        reply: &Reply,
        remote: Option<&RemoteMta>,
        next_ms: u64,
    ) {
        if !self.is_enabled() {
            return;
        }
        let now = SystemTime::now();
        for rcpt in rcpts {
            self.log.record_at(now, || {
                Event::Deferral(Deferral {
                    id: entry.id,
                    rcpt: rcpt.clone(),
                    remote_host: remote.map(|r| r.host.clone()),
                    remote_ip: remote.map(|r| r.ip),
                    reply: reply.clone(),
                    attempt: entry.attempts + 1,
                    next_attempt: UNIX_EPOCH + Duration::from_millis(next_ms),
                    delay: since(entry.received_at_ms, now),
                })
            });
        }
    }

    /// `rcpts` of `entry` failed for good.
    pub fn failure(
        &self,
        entry: &QueueEntry,
        rcpts: &[String],
        reply: &Reply,
        remote: Option<&RemoteMta>,
        reason: BounceReason,
    ) {
        if !self.is_enabled() {
            return;
        }
        let now = SystemTime::now();
        for rcpt in rcpts {
            self.log.record_at(now, || {
                Event::Bounce(Bounce {
                    id: entry.id,
                    rcpt: rcpt.clone(),
                    remote_host: remote.map(|r| r.host.clone()),
                    remote_ip: remote.map(|r| r.ip),
                    reply: reply.clone(),
                    attempt: entry.attempts + u32::from(remote.is_some()),
                    reason,
                    delay: since(entry.received_at_ms, now),
                })
            });
        }
    }

    /// A DSN for `original` was spooled as `dsn`.
    pub fn dsn(&self, original: &Envelope, dsn: &Envelope, rcpt_count: usize) {
        self.log.record(|| {
            Event::Dsn(DsnQueued {
                id: original.id,
                dsn_id: dsn.id,
                to: original.sender.clone(),
                rcpt_count,
            })
        });
    }
}
