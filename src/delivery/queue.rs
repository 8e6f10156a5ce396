//! The delivery shard's queues (sans-IO): per destination domain a ready
//! queue (due now, FIFO) and the scheduled entries (next attempt time), plus
//! a per-domain hold for a destination backed off as a whole.
//!
//! Time is Unix milliseconds passed in by the caller; nothing here sleeps or
//! reads a clock, so the scheduling logic is tested on a virtual clock. The
//! scheduled entries of every domain share one binary heap ordered by due
//! time (one timer per shard wakes for the earliest), and each domain counts
//! its own for the queue gauges and the admin listing.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};

use crate::spool::SpoolId;

/// One unit of delivery work: some recipients (at most
/// `max_recipients_per_transaction`) of one message for one destination
/// domain. Holds no body: the worker reads it from the home partition right
/// before sending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueEntry {
    /// The message.
    pub id: SpoolId,
    /// The spool partition (tree) holding it; its home shard is
    /// `partition % shards`.
    pub partition: u16,
    /// Destination domain, ASCII-lowercased (an address literal is its own
    /// destination, brackets included).
    pub domain: String,
    /// Indexes into the envelope's recipients.
    pub rcpts: Vec<u16>,
    /// Attempts made so far for these recipients.
    pub attempts: u32,
    /// When the message was received (Unix ms): the base of its expiry.
    pub received_at_ms: u64,
}

struct Scheduled {
    due_ms: u64,
    seq: u64,
    entry: QueueEntry,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.due_ms, self.seq) == (other.due_ms, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due_ms, self.seq).cmp(&(other.due_ms, other.seq))
    }
}

#[derive(Default)]
struct Domain {
    ready: VecDeque<QueueEntry>,
    scheduled: usize,
    hold_until_ms: Option<u64>,
}

impl Domain {
    fn held_at(&self, now_ms: u64) -> Option<u64> {
        self.hold_until_ms.filter(|&t| t > now_ms)
    }
}

/// Where [`Queues::push`] put an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Placed {
    /// In the domain's ready queue: a worker should pick it up now.
    Ready,
    /// Scheduled for this time (Unix ms).
    Scheduled(u64),
}

/// Per-domain counts for the admin listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainCounts {
    /// The destination domain.
    pub domain: String,
    /// Entries due now.
    pub ready: usize,
    /// Entries waiting for their next attempt.
    pub scheduled: usize,
    /// The destination is backed off as a whole until then (Unix ms).
    pub held_until_ms: Option<u64>,
}

/// All queues of one delivery shard.
#[derive(Default)]
pub struct Queues {
    domains: HashMap<String, Domain>,
    scheduled: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    ready_total: usize,
}

impl Queues {
    /// Empty queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `entry` to be tried at `due_ms`: ready if that is not after
    /// `now_ms` and its domain is not held, else scheduled (a held domain's
    /// entries wait for the end of the hold).
    pub fn push(&mut self, entry: QueueEntry, due_ms: u64, now_ms: u64) -> Placed {
        let domain = self.domains.entry(entry.domain.clone()).or_default();
        let due_ms = match domain.held_at(now_ms) {
            Some(hold) => due_ms.max(hold),
            None => due_ms,
        };
        if due_ms <= now_ms {
            domain.ready.push_back(entry);
            self.ready_total += 1;
            Placed::Ready
        } else {
            domain.scheduled += 1;
            self.seq += 1;
            self.scheduled.push(Reverse(Scheduled {
                due_ms,
                seq: self.seq,
                entry,
            }));
            Placed::Scheduled(due_ms)
        }
    }

    /// Moves every scheduled entry due at `now_ms` to its domain's ready
    /// queue (or further back, if its domain is held). Returns the domains
    /// that got ready work, each once, in the order they became ready.
    pub fn promote(&mut self, now_ms: u64) -> Vec<String> {
        let mut woke: Vec<String> = Vec::new();
        while self
            .scheduled
            .peek()
            .is_some_and(|Reverse(s)| s.due_ms <= now_ms)
        {
            let Some(Reverse(s)) = self.scheduled.pop() else {
                break;
            };
            let domain = self.domains.entry(s.entry.domain.clone()).or_default();
            domain.scheduled -= 1;
            if let Some(hold) = domain.held_at(now_ms) {
                domain.scheduled += 1;
                self.seq += 1;
                self.scheduled.push(Reverse(Scheduled {
                    due_ms: hold,
                    seq: self.seq,
                    entry: s.entry,
                }));
                continue;
            }
            if !woke.contains(&s.entry.domain) {
                woke.push(s.entry.domain.clone());
            }
            domain.ready.push_back(s.entry);
            self.ready_total += 1;
        }
        woke
    }

    /// The earliest scheduled time, if anything is scheduled.
    pub fn next_due(&self) -> Option<u64> {
        self.scheduled.peek().map(|Reverse(s)| s.due_ms)
    }

    /// The next ready entry of `domain`, FIFO.
    pub fn pop_ready(&mut self, domain: &str) -> Option<QueueEntry> {
        let e = self.domains.get_mut(domain)?.ready.pop_front()?;
        self.ready_total -= 1;
        Some(e)
    }

    /// Ready entries of `domain`.
    pub fn ready_len(&self, domain: &str) -> usize {
        self.domains.get(domain).map_or(0, |d| d.ready.len())
    }

    /// Backs `domain` off as a whole until `until_ms`: takes every ready
    /// entry out (the caller defers them) and keeps new and promoted entries
    /// of the domain scheduled until then.
    pub fn hold(&mut self, domain: &str, until_ms: u64) -> Vec<QueueEntry> {
        let d = self.domains.entry(domain.to_owned()).or_default();
        d.hold_until_ms = Some(d.hold_until_ms.map_or(until_ms, |t| t.max(until_ms)));
        let taken: Vec<QueueEntry> = d.ready.drain(..).collect();
        self.ready_total -= taken.len();
        taken
    }

    /// Whether `domain` is backed off at `now_ms`, and until when.
    pub fn held_until(&self, domain: &str, now_ms: u64) -> Option<u64> {
        self.domains.get(domain)?.held_at(now_ms)
    }

    /// Takes every ready entry of `domain` (a permanent DNS verdict applies
    /// to all of them).
    pub fn take_ready(&mut self, domain: &str) -> Vec<QueueEntry> {
        let Some(d) = self.domains.get_mut(domain) else {
            return Vec::new();
        };
        let taken: Vec<QueueEntry> = d.ready.drain(..).collect();
        self.ready_total -= taken.len();
        taken
    }

    /// Forgets `domain` if it has no entries and no live hold (keeps the map
    /// from growing with every domain ever seen).
    pub fn forget_if_idle(&mut self, domain: &str, now_ms: u64) {
        if self
            .domains
            .get(domain)
            .is_some_and(|d| d.ready.is_empty() && d.scheduled == 0 && d.held_at(now_ms).is_none())
        {
            self.domains.remove(domain);
        }
    }

    /// Entries due now, over all domains.
    pub fn ready_total(&self) -> usize {
        self.ready_total
    }

    /// Entries scheduled for later, over all domains.
    pub fn scheduled_total(&self) -> usize {
        self.scheduled.len()
    }

    /// Counts per domain, busiest first, at most `limit`.
    pub fn domain_counts(&self, now_ms: u64, limit: usize) -> Vec<DomainCounts> {
        let mut all: Vec<DomainCounts> = self
            .domains
            .iter()
            .map(|(name, d)| DomainCounts {
                domain: name.clone(),
                ready: d.ready.len(),
                scheduled: d.scheduled,
                held_until_ms: d.held_at(now_ms),
            })
            .filter(|c| c.ready + c.scheduled > 0 || c.held_until_ms.is_some())
            .collect();
        all.sort_by(|a, b| {
            (b.ready + b.scheduled)
                .cmp(&(a.ready + a.scheduled))
                .then_with(|| a.domain.cmp(&b.domain))
        });
        all.truncate(limit);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolIdGenerator;

    fn entry(n: u64, domain: &str) -> QueueEntry {
        let mut g = SpoolIdGenerator::new(0, None);
        QueueEntry {
            id: g.next(crate::spool::ID_EPOCH_UNIX_MS + n),
            partition: 0,
            domain: domain.into(),
            rcpts: vec![0],
            attempts: 0,
            received_at_ms: n,
        }
    }

    fn ids(q: &mut Queues, domain: &str) -> Vec<u64> {
        std::iter::from_fn(|| q.pop_ready(domain))
            .map(|e| e.received_at_ms)
            .collect()
    }

    #[test]
    fn due_now_is_ready_fifo_later_is_scheduled() {
        let mut q = Queues::new();
        assert_eq!(q.push(entry(1, "a.test"), 100, 100), Placed::Ready);
        assert_eq!(q.push(entry(2, "a.test"), 50, 100), Placed::Ready);
        assert_eq!(q.push(entry(3, "a.test"), 101, 100), Placed::Scheduled(101));
        assert_eq!((q.ready_total(), q.scheduled_total()), (2, 1));
        assert_eq!(q.ready_len("a.test"), 2);
        assert_eq!(ids(&mut q, "a.test"), [1, 2]);
        assert_eq!(q.pop_ready("b.test"), None);
        assert_eq!(q.next_due(), Some(101));
    }

    #[test]
    fn promote_moves_due_entries_in_time_order_and_reports_domains_once() {
        let mut q = Queues::new();
        let _ = q.push(entry(1, "a.test"), 300, 0);
        let _ = q.push(entry(2, "b.test"), 100, 0);
        let _ = q.push(entry(3, "a.test"), 200, 0);
        let _ = q.push(entry(4, "a.test"), 100, 0);
        assert!(q.promote(99).is_empty());
        assert_eq!(q.next_due(), Some(100));
        // Equal due times keep insertion order.
        assert_eq!(
            q.promote(250),
            vec!["b.test".to_owned(), "a.test".to_owned()]
        );
        assert_eq!(ids(&mut q, "a.test"), [4, 3]);
        assert_eq!(ids(&mut q, "b.test"), [2]);
        assert_eq!(q.next_due(), Some(300));
        assert_eq!(q.promote(1_000), vec!["a.test".to_owned()]);
        assert_eq!((q.ready_total(), q.scheduled_total()), (1, 0));
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn hold_defers_the_whole_destination_until_it_ends() {
        let mut q = Queues::new();
        let _ = q.push(entry(1, "down.test"), 0, 0);
        let _ = q.push(entry(2, "down.test"), 0, 0);
        let _ = q.push(entry(3, "down.test"), 500, 0);
        let _ = q.push(entry(4, "up.test"), 0, 0);
        let taken = q.hold("down.test", 1_000);
        assert_eq!(taken.len(), 2);
        assert_eq!(q.ready_total(), 1, "other domains untouched");
        assert_eq!(q.held_until("down.test", 10), Some(1_000));
        // New work for a held domain waits for the hold.
        assert_eq!(
            q.push(entry(5, "down.test"), 10, 10),
            Placed::Scheduled(1_000)
        );
        // A scheduled entry that comes due during the hold is pushed back.
        assert!(q.promote(600).is_empty());
        assert_eq!(q.ready_len("down.test"), 0);
        assert_eq!(q.promote(1_000), vec!["down.test".to_owned()]);
        assert_eq!(ids(&mut q, "down.test"), [5, 3]);
        assert_eq!(q.held_until("down.test", 1_000), None, "hold over");
        assert_eq!(q.push(entry(6, "down.test"), 1_000, 1_000), Placed::Ready);
    }

    #[test]
    fn counts_and_forgetting() {
        let mut q = Queues::new();
        let _ = q.push(entry(1, "a.test"), 0, 0);
        let _ = q.push(entry(2, "b.test"), 0, 0);
        let _ = q.push(entry(3, "b.test"), 10, 0);
        let c = q.domain_counts(0, 10);
        assert_eq!(c[0].domain, "b.test");
        assert_eq!((c[0].ready, c[0].scheduled), (1, 1));
        assert_eq!(c.len(), 2);
        assert_eq!(q.domain_counts(0, 1).len(), 1);
        assert_eq!(q.take_ready("b.test").len(), 1);
        q.forget_if_idle("b.test", 0);
        assert_eq!(q.domain_counts(0, 10).len(), 2, "b has a scheduled entry");
        let _ = q.pop_ready("a.test");
        q.forget_if_idle("a.test", 0);
        assert_eq!(q.domain_counts(0, 10).len(), 1);
        assert_eq!(q.take_ready("nope.test"), vec![]);
    }

    #[test]
    fn many_entries_virtual_clock_never_early_never_lost() {
        // 10 000 entries at pseudo-random due times over 20 domains; walk
        // the clock in uneven steps: each entry becomes ready exactly once,
        // never before its due time.
        let mut q = Queues::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut due = HashMap::new();
        for n in 0..10_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = 1 + x % 100_000;
            let mut e = entry(n, &format!("d{}.test", x % 20));
            e.received_at_ms = n;
            due.insert(n, t);
            assert!(matches!(q.push(e, t, 0), Placed::Scheduled(_)));
        }
        let mut now = 0;
        let mut seen = 0;
        while let Some(next) = q.next_due() {
            now = next.max(now + 777);
            for d in q.promote(now) {
                while let Some(e) = q.pop_ready(&d) {
                    assert!(due[&e.received_at_ms] <= now);
                    assert!(due.remove(&e.received_at_ms).is_some(), "twice");
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 10_000);
        assert!(due.is_empty());
    }
}
