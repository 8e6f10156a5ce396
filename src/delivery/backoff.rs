//! Retry schedule: exponential backoff with jitter, capped, and expiry at
//! `max_age` (then the recipient fails with `4.4.7`).
//!
//! Pure arithmetic on Unix milliseconds; the caller passes the time and the
//! random draw, so tests run on a virtual clock with fixed "randomness".

use std::time::Duration;

use crate::config::DeliveryConfig;

/// What to do after a temporary failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryVerdict {
    /// Try again at this time (Unix ms).
    RetryAt(u64),
    /// The message is older than `max_age`: fail it with `4.4.7`.
    Expired,
}

/// The retry settings of `[delivery]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    initial_ms: u64,
    max_ms: u64,
    jitter: f64,
    max_age_ms: u64,
}

impl RetryPolicy {
    /// Builds the policy; `jitter` is clamped to 0..=1.
    pub fn new(initial: Duration, max: Duration, jitter: f64, max_age: Duration) -> Self {
        let initial_ms = (initial.as_millis() as u64).max(1);
        RetryPolicy {
            initial_ms,
            max_ms: (max.as_millis() as u64).max(initial_ms),
            jitter: if jitter.is_finite() {
                jitter.clamp(0.0, 1.0)
            } else {
                0.0
            },
            max_age_ms: max_age.as_millis() as u64,
        }
    }

    /// From the configuration.
    pub fn from_config(c: &DeliveryConfig) -> Self {
        Self::new(
            c.retry_initial(),
            c.retry_max(),
            c.retry_jitter,
            c.max_age(),
        )
    }

    /// The gap after the `attempts`-th failed attempt (1 = the first
    /// failure): `initial * 2^(attempts-1)`, capped at `max`, then spread by
    /// up to `jitter` either way according to `unit` (a uniform draw in
    /// 0..1). Never above `max`, never zero.
    pub fn delay_ms(&self, attempts: u32, unit: f64) -> u64 {
        let doublings = attempts.saturating_sub(1).min(63);
        let base = self
            .initial_ms
            .checked_shl(doublings)
            .filter(|&v| v >> doublings == self.initial_ms)
            .unwrap_or(u64::MAX)
            .min(self.max_ms);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        ((base as f64 * factor) as u64).clamp(1, self.max_ms)
    }

    /// When a message received at `received_at_ms` expires (Unix ms).
    pub fn expires_at(&self, received_at_ms: u64) -> u64 {
        received_at_ms.saturating_add(self.max_age_ms)
    }

    /// The verdict after the `attempts`-th attempt failed temporarily at
    /// `now_ms`. Past the expiry: [`RetryVerdict::Expired`]. Otherwise the
    /// next attempt, but never later than the expiry itself, so the last
    /// attempt is made at `max_age` and the bounce is not late by a whole
    /// backoff interval.
    pub fn after_failure(
        &self,
        now_ms: u64,
        received_at_ms: u64,
        attempts: u32,
        unit: f64,
    ) -> RetryVerdict {
        let expires = self.expires_at(received_at_ms);
        if now_ms >= expires {
            return RetryVerdict::Expired;
        }
        let next = now_ms.saturating_add(self.delay_ms(attempts, unit));
        RetryVerdict::RetryAt(next.min(expires))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: f64) -> RetryPolicy {
        RetryPolicy::new(
            Duration::from_secs(300),
            Duration::from_secs(4 * 3600),
            jitter,
            Duration::from_secs(5 * 86400),
        )
    }

    #[test]
    fn doubles_from_initial_and_caps_at_max() {
        let p = policy(0.0);
        let gaps: Vec<u64> = (1..=8).map(|a| p.delay_ms(a, 0.3) / 1000).collect();
        assert_eq!(gaps, [300, 600, 1200, 2400, 4800, 9600, 14400, 14400]);
        // Huge attempt counts neither overflow nor exceed the cap.
        assert_eq!(p.delay_ms(u32::MAX, 0.9), 14_400_000);
        assert_eq!(p.delay_ms(0, 0.5), 300_000, "0 attempts acts as the first");
    }

    #[test]
    fn jitter_spreads_within_bounds_and_never_exceeds_max() {
        let p = policy(0.2);
        assert_eq!(p.delay_ms(1, 0.0), 240_000);
        assert_eq!(p.delay_ms(1, 0.5), 300_000);
        assert_eq!(p.delay_ms(1, 1.0), 360_000);
        assert_eq!(p.delay_ms(20, 1.0), 14_400_000, "capped after jitter");
        assert_eq!(p.delay_ms(20, 0.0), 11_520_000);
        assert_eq!(p.delay_ms(1, f64::NAN), 300_000);
        // A spread of draws gives a spread of gaps.
        let gaps: std::collections::HashSet<u64> =
            (0..10).map(|i| p.delay_ms(2, i as f64 / 10.0)).collect();
        assert_eq!(gaps.len(), 10);
    }

    #[test]
    fn expiry_caps_the_last_retry_then_expires() {
        let p = RetryPolicy::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            0.0,
            Duration::from_secs(3),
        );
        let t0 = 1_000_000;
        assert_eq!(
            p.after_failure(t0, t0, 1, 0.5),
            RetryVerdict::RetryAt(t0 + 1000)
        );
        assert_eq!(
            p.after_failure(t0 + 1000, t0, 2, 0.5),
            RetryVerdict::RetryAt(t0 + 3000),
            "2 s gap would pass the expiry: last attempt at the expiry"
        );
        assert_eq!(
            p.after_failure(t0 + 3000, t0, 3, 0.5),
            RetryVerdict::Expired
        );
        assert_eq!(
            p.after_failure(t0 + 9999, t0, 1, 0.5),
            RetryVerdict::Expired
        );
    }

    #[test]
    fn virtual_clock_walk_matches_the_schedule() {
        // Walk a recipient that always fails: attempts at 0, 5, 15, 35 min...
        let p = policy(0.0);
        let t0 = 10_000_000;
        let mut now = t0;
        let mut times = vec![];
        let mut attempts = 0;
        loop {
            attempts += 1;
            match p.after_failure(now, t0, attempts, 0.5) {
                RetryVerdict::RetryAt(next) => {
                    times.push((next - t0) / 60_000);
                    now = next;
                }
                RetryVerdict::Expired => break,
            }
        }
        assert_eq!(&times[..6], &[5, 15, 35, 75, 155, 315]);
        assert_eq!(*times.last().unwrap(), 5 * 24 * 60, "last try at max_age");
        assert_eq!(now, p.expires_at(t0));
        // 4 h cap from attempt 7 on: about 35 attempts in 5 days.
        assert!((30..40).contains(&attempts), "{attempts}");
    }
}
