//! Which message goes out next, and when it was meant to.
//!
//! Closed loop: a free connection takes the next message at once; its latency starts when
//! it is taken. Open loop (`--rate`): message `i` is due at `start + i / rate` whatever
//! happens to earlier ones; a free connection takes the oldest due message, and latency is
//! measured from its due time. When every connection is busy the backlog grows and shows up
//! in the latency instead of silently slowing the schedule (no coordinated omission).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A message a connection has taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Message number (0-based, unique in the run).
    pub idx: u64,
    /// When it was meant to be sent: latency counts from here.
    pub intended: Instant,
}

/// The answer to "may I send something now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send this one.
    Go(Claim),
    /// Nothing is due before this time.
    Wait(Instant),
    /// The run has nothing more to send.
    Done,
}

/// The shared schedule; every worker thread claims from it.
#[derive(Debug)]
pub struct Schedule {
    /// Set by [`Schedule::begin`] once the connections are up.
    start: OnceLock<Instant>,
    /// Messages in the run, if bounded by count.
    total: Option<u64>,
    /// No message is scheduled (open loop) or started (closed loop) this long after the
    /// start or later.
    duration: Option<Duration>,
    /// Nanoseconds between due times (open loop).
    interval_ns: Option<f64>,
    next: AtomicU64,
    stopped: AtomicBool,
}

impl Schedule {
    /// A schedule that hands out nothing until [`Schedule::begin`]. `rate` in messages per
    /// second makes it open-loop.
    pub fn new(total: Option<u64>, duration: Option<Duration>, rate: Option<f64>) -> Self {
        Schedule {
            start: OnceLock::new(),
            total,
            duration,
            interval_ns: rate.map(|r| 1e9 / r),
            next: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        }
    }

    /// Starts the clock (once; later calls change nothing).
    pub fn begin(&self, start: Instant) {
        let _ = self.start.set(start);
    }

    /// When the clock started, if it has.
    pub fn started(&self) -> Option<Instant> {
        self.start.get().copied()
    }

    /// When message `idx` is due (open loop).
    fn due(start: Instant, idx: u64, interval_ns: f64) -> Instant {
        start + Duration::from_nanos((idx as f64 * interval_ns) as u64)
    }

    /// Stops the run: nothing more is handed out (Ctrl-C, or no connection left).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Whether `stop` was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Whether nothing is left to hand out (a connection need not reconnect for it).
    pub fn is_exhausted(&self, now: Instant) -> bool {
        if self.is_stopped() {
            return true;
        }
        let Some(start) = self.started() else {
            return false;
        };
        let cur = self.next.load(Ordering::Relaxed);
        if self.total.is_some_and(|t| cur >= t) {
            return true;
        }
        let Some(end) = self.duration.map(|d| start + d) else {
            return false;
        };
        match self.interval_ns {
            Some(iv) => Self::due(start, cur, iv) >= end,
            None => now >= end,
        }
    }

    /// Takes the next message if one is due at `now`.
    pub fn claim(&self, now: Instant) -> Next {
        if self.is_stopped() {
            return Next::Done;
        }
        let Some(start) = self.started() else {
            return Next::Wait(now + Duration::from_millis(10));
        };
        let end = self.duration.map(|d| start + d);
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            if self.total.is_some_and(|t| cur >= t) {
                return Next::Done;
            }
            let intended = match self.interval_ns {
                Some(iv) => {
                    let due = Self::due(start, cur, iv);
                    if end.is_some_and(|e| due >= e) {
                        return Next::Done;
                    }
                    if due > now {
                        return Next::Wait(due);
                    }
                    due
                }
                None => {
                    if end.is_some_and(|e| now >= e) {
                        return Next::Done;
                    }
                    now
                }
            };
            match self.next.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Next::Go(Claim { idx: cur, intended }),
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_loop_hands_out_total_then_done() {
        let t0 = Instant::now();
        let s = Schedule::new(Some(3), None, None);
        assert!(matches!(s.claim(t0), Next::Wait(_)), "nothing before begin");
        s.begin(t0);
        for i in 0..3 {
            match s.claim(t0) {
                Next::Go(c) => assert_eq!((c.idx, c.intended), (i, t0)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(s.claim(t0), Next::Done);
    }

    #[test]
    fn closed_loop_duration_ends_claims() {
        let t0 = Instant::now();
        let s = Schedule::new(None, Some(Duration::from_secs(1)), None);
        s.begin(t0);
        assert!(matches!(s.claim(t0), Next::Go(_)));
        assert_eq!(s.claim(t0 + Duration::from_secs(1)), Next::Done);
    }

    #[test]
    fn open_loop_due_times_and_backlog() {
        let t0 = Instant::now();
        let s = Schedule::new(None, Some(Duration::from_secs(1)), Some(10.0));
        s.begin(t0);
        // Message 0 is due at once; message 1 at 100 ms.
        assert!(matches!(s.claim(t0), Next::Go(Claim { idx: 0, .. })));
        assert_eq!(s.claim(t0), Next::Wait(t0 + Duration::from_millis(100)));
        // Late: the backlog is handed out with its original due times.
        let late = t0 + Duration::from_millis(350);
        let mut due = Vec::new();
        while let Next::Go(c) = s.claim(late) {
            due.push(c.intended.duration_since(t0).as_millis());
        }
        assert_eq!(due, vec![100, 200, 300]);
        // The window is one second: 10 messages in all.
        let after = t0 + Duration::from_secs(5);
        let mut n = 4;
        while let Next::Go(_) = s.claim(after) {
            n += 1;
        }
        assert_eq!(n, 10);
        assert_eq!(s.claim(after), Next::Done);
    }

    #[test]
    fn exhaustion() {
        let t0 = Instant::now();
        let s = Schedule::new(Some(1), None, None);
        assert!(!s.is_exhausted(t0), "not started");
        s.begin(t0);
        assert!(!s.is_exhausted(t0));
        assert!(matches!(s.claim(t0), Next::Go(_)));
        assert!(s.is_exhausted(t0));
        let s = Schedule::new(None, Some(Duration::from_secs(1)), Some(2.0));
        s.begin(t0);
        for _ in 0..2 {
            assert!(!s.is_exhausted(t0));
            while !matches!(s.claim(t0 + Duration::from_secs(3)), Next::Go(_)) {}
        }
        assert!(s.is_exhausted(t0));
    }

    #[test]
    fn stop_ends_everything() {
        let t0 = Instant::now();
        let s = Schedule::new(Some(100), None, None);
        s.begin(t0);
        s.stop();
        assert_eq!(s.claim(t0), Next::Done);
    }
}
