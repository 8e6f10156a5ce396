//! Pure planning on envelopes (sans-IO): which queue entries a message
//! makes, how per-recipient results change its envelope, and who is owed a
//! bounce.

use super::queue::QueueEntry;
use crate::spool::{Envelope, RecipientState};

/// The destination of `address`: its domain ASCII-lowercased, or the address
/// literal (`[192.0.2.1]`, `[IPv6:...]`) as its own destination. The last `@`
/// splits (a quoted local part may contain `@`). `None` without a domain.
pub fn destination_of(address: &str) -> Option<String> {
    let (_, domain) = address.rsplit_once('@')?;
    if domain.is_empty() {
        return None;
    }
    Some(domain.to_ascii_lowercase())
}

/// Groups `indexes` of `env`'s recipients by destination domain (first
/// appearance order) and cuts each group into entries of at most
/// `max_rcpts`. Recipients without a domain are returned apart: they cannot
/// be routed and fail at once.
fn group(
    env: &Envelope,
    partition: u16,
    indexes: impl Iterator<Item = usize>,
    max_rcpts: usize,
    attempts: u32,
) -> (Vec<QueueEntry>, Vec<u16>) {
    let max_rcpts = max_rcpts.max(1);
    let mut by_domain: Vec<(String, Vec<u16>)> = Vec::new();
    let mut unroutable = Vec::new();
    for i in indexes {
        let Ok(index) = u16::try_from(i) else {
            // The server caps recipients far below this (max_recipients).
            continue;
        };
        match destination_of(&env.recipients[i].address) {
            Some(d) => match by_domain.iter_mut().find(|(name, _)| *name == d) {
                Some((_, v)) => v.push(index),
                None => by_domain.push((d, vec![index])),
            },
            None => unroutable.push(index),
        }
    }
    let mut entries = Vec::new();
    for (domain, rcpts) in by_domain {
        for chunk in rcpts.chunks(max_rcpts) {
            entries.push(QueueEntry {
                id: env.id,
                partition,
                domain: domain.clone(),
                rcpts: chunk.to_vec(),
                attempts,
                received_at_ms: env.received_at_ms,
            });
        }
    }
    (entries, unroutable)
}

/// The entries of a newly accepted message: every pending recipient, due
/// now. The second value lists recipients that have no domain.
pub fn entries_for_new(
    env: &Envelope,
    partition: u16,
    max_rcpts: usize,
) -> (Vec<QueueEntry>, Vec<u16>) {
    let pending = env
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.state, RecipientState::Pending))
        .map(|(i, _)| i);
    group(env, partition, pending, max_rcpts, 0)
}

/// The entries that rebuild the queues from a stored envelope after a
/// restart, each with its due time (Unix ms): pending recipients now,
/// deferred ones at their `next_attempt_ms`. Deferred recipients that
/// shared a transaction share `next_attempt_ms` and `attempts`, so they are
/// grouped back together.
pub fn entries_for_restart(
    env: &Envelope,
    partition: u16,
    max_rcpts: usize,
    now_ms: u64,
) -> (Vec<(QueueEntry, u64)>, Vec<u16>) {
    let (pending, mut unroutable) = entries_for_new(env, partition, max_rcpts);
    let mut out: Vec<(QueueEntry, u64)> = pending.into_iter().map(|e| (e, now_ms)).collect();
    let mut keys: Vec<(u64, u32)> = env
        .recipients
        .iter()
        .filter_map(|r| match r.state {
            RecipientState::Deferred {
                attempts,
                next_attempt_ms,
                ..
            } => Some((next_attempt_ms, attempts)),
            _ => None,
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    for (due, attempts) in keys {
        let same = env.recipients.iter().enumerate().filter(|(_, r)| {
            matches!(r.state, RecipientState::Deferred { attempts: a, next_attempt_ms: t, .. }
                if a == attempts && t == due)
        });
        let (entries, bad) = group(env, partition, same.map(|(i, _)| i), max_rcpts, attempts);
        out.extend(entries.into_iter().map(|e| (e, due)));
        unroutable.extend(bad);
    }
    (out, unroutable)
}

/// One recipient's outcome, sent from the delivery shard to the home shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptResult {
    /// Index into the envelope's recipients.
    pub index: u16,
    /// The new state.
    pub state: RecipientState,
    /// The host that answered, for the DSN's Remote-MTA.
    pub remote_mta: Option<String>,
}

/// Applies `results` to `env`. A recipient already final never changes
/// again (a delivered recipient is never sent twice, and a late or repeated
/// result cannot undo a verdict). Returns how many results were applied.
pub fn apply_results(env: &mut Envelope, results: &[RcptResult]) -> usize {
    let mut applied = 0;
    for r in results {
        let Some(rcpt) = env.recipients.get_mut(usize::from(r.index)) else {
            continue;
        };
        if rcpt.state.is_final() {
            continue;
        }
        rcpt.state = r.state.clone();
        rcpt.remote_mta = r.remote_mta.clone();
        applied += 1;
    }
    applied
}

/// Whether the DSN `NOTIFY` value asks for failure reports. Absent means the
/// default, which includes failures (RFC 3461 §4.1); `NEVER` means none.
pub fn notify_on_failure(notify: Option<&str>) -> bool {
    match notify {
        None => true,
        Some(n) => n
            .split(',')
            .any(|k| k.trim().eq_ignore_ascii_case("FAILURE")),
    }
}

/// The recipients a failure DSN must name: failed, with NOTIFY allowing it,
/// and never for a message from the null sender (RFC 5321 §4.5.5: no
/// bounce loops).
pub fn bounce_recipients(env: &Envelope) -> Vec<usize> {
    if env.sender.is_empty() {
        return Vec::new();
    }
    env.recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            matches!(r.state, RecipientState::Failed { .. })
                && notify_on_failure(r.notify.as_deref())
        })
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Recipient, SpoolIdGenerator, ID_EPOCH_UNIX_MS};

    fn env(rcpts: &[&str]) -> Envelope {
        Envelope {
            id: SpoolIdGenerator::new(0, None).next(ID_EPOCH_UNIX_MS + 5),
            sender: "s@src.test".into(),
            recipients: rcpts
                .iter()
                .map(|a| Recipient {
                    address: (*a).into(),
                    notify: None,
                    orcpt: None,
                    state: RecipientState::Pending,
                    remote_mta: None,
                })
                .collect(),
            received_at_ms: 1234,
            size: 10,
            body_8bit: false,
            smtputf8: false,
            ret_full: None,
            envid: None,
            client_ip: None,
            helo: None,
        }
    }

    #[test]
    fn destinations() {
        assert_eq!(
            destination_of("a@Example.TEST").as_deref(),
            Some("example.test")
        );
        assert_eq!(destination_of("\"a@b\"@c.test").as_deref(), Some("c.test"));
        assert_eq!(
            destination_of("u@[IPv6:::1]").as_deref(),
            Some("[ipv6:::1]")
        );
        assert_eq!(
            destination_of("u@[127.0.0.2]").as_deref(),
            Some("[127.0.0.2]")
        );
        assert_eq!(destination_of("nodomain"), None);
        assert_eq!(destination_of("x@"), None);
    }

    #[test]
    fn new_message_splits_by_domain_then_by_limit() {
        let e = env(&[
            "a@x.test", "b@Y.test", "c@x.test", "d@x.test", "e@y.test", "bad",
        ]);
        let (entries, bad) = entries_for_new(&e, 3, 2);
        let got: Vec<(&str, Vec<u16>)> = entries
            .iter()
            .map(|q| (q.domain.as_str(), q.rcpts.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("x.test", vec![0, 2]),
                ("x.test", vec![3]),
                ("y.test", vec![1, 4])
            ]
        );
        assert_eq!(bad, vec![5]);
        assert!(entries
            .iter()
            .all(|q| q.partition == 3 && q.attempts == 0 && q.received_at_ms == 1234));
    }

    #[test]
    fn restart_requeues_pending_now_and_deferred_at_their_time() {
        let mut e = env(&["a@x.test", "b@x.test", "c@x.test", "d@y.test", "f@x.test"]);
        let deferred = |attempts, next| RecipientState::Deferred {
            attempts,
            last_reply: "451 4.3.0 later".into(),
            next_attempt_ms: next,
        };
        e.recipients[0].state = RecipientState::Delivered {
            at_ms: 1,
            reply: "250 ok".into(),
        };
        e.recipients[1].state = deferred(2, 9_000);
        e.recipients[2].state = deferred(2, 9_000);
        e.recipients[3].state = deferred(1, 5_000);
        let (out, bad) = entries_for_restart(&e, 0, 100, 7_000);
        assert!(bad.is_empty());
        let got: Vec<(&str, Vec<u16>, u32, u64)> = out
            .iter()
            .map(|(q, due)| (q.domain.as_str(), q.rcpts.clone(), q.attempts, *due))
            .collect();
        assert_eq!(
            got,
            vec![
                ("x.test", vec![4], 0, 7_000),
                ("y.test", vec![3], 1, 5_000),
                ("x.test", vec![1, 2], 2, 9_000),
            ]
        );
    }

    #[test]
    fn results_apply_once_and_final_states_stick() {
        let mut e = env(&["a@x.test", "b@x.test"]);
        let delivered = RcptResult {
            index: 0,
            state: RecipientState::Delivered {
                at_ms: 5,
                reply: "250 2.0.0 ok".into(),
            },
            remote_mta: Some("mx.x.test".into()),
        };
        let deferred = RcptResult {
            index: 1,
            state: RecipientState::Deferred {
                attempts: 1,
                last_reply: "451".into(),
                next_attempt_ms: 10,
            },
            remote_mta: None,
        };
        let out_of_range = RcptResult {
            index: 9,
            ..deferred.clone()
        };
        assert_eq!(
            apply_results(&mut e, &[delivered.clone(), deferred, out_of_range]),
            2
        );
        assert!(!e.is_done());
        // A late deferral of the delivered recipient is ignored.
        let late = RcptResult {
            index: 0,
            state: RecipientState::Failed {
                at_ms: 6,
                reply: "550".into(),
            },
            remote_mta: None,
        };
        assert_eq!(apply_results(&mut e, &[late]), 0);
        assert_eq!(e.recipients[0].state, delivered.state);
        assert_eq!(e.recipients[0].remote_mta.as_deref(), Some("mx.x.test"));
    }

    #[test]
    fn who_gets_a_bounce() {
        let failed = RecipientState::Failed {
            at_ms: 1,
            reply: "550 5.1.1 no".into(),
        };
        let mut e = env(&["a@x.test", "b@x.test", "c@x.test", "d@x.test", "e@x.test"]);
        for r in &mut e.recipients {
            r.state = failed.clone();
        }
        e.recipients[1].notify = Some("NEVER".into());
        e.recipients[2].notify = Some("SUCCESS,DELAY".into());
        e.recipients[3].notify = Some("success,failure".into());
        e.recipients[4].state = RecipientState::Delivered {
            at_ms: 1,
            reply: "250".into(),
        };
        assert_eq!(bounce_recipients(&e), vec![0, 3]);
        e.sender.clear();
        assert!(bounce_recipients(&e).is_empty(), "never bounce <>");
    }
}
