//! Fault injection: what the sink answers to a recipient and to a complete message.
//!
//! Pure decisions (no I/O) so they are tested without sockets. Faults come from three
//! places: fixed reply codes (`--reply-rcpt`, `--reply-data`, `--fail-first`), random rates
//! per message (`--tempfail-rate`, `--permfail-rate`, `--drop-rate`), and the recipient's
//! local part (`tempfail-N@..`, `permfail@..`), which lets a test aim a fault at one address.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sluice::smtp::{EnhancedCode, Reply};

/// The fault settings from the command line.
#[derive(Debug, Clone)]
pub struct FaultConfig {
    /// Code for every RCPT that no local-part rule decides (2xx = accept).
    pub reply_rcpt: u16,
    /// Final reply code after the data when no other rule decides (2xx = accept).
    pub reply_data: u16,
    /// The first N messages get `451 4.3.0`.
    pub fail_first: u64,
    /// Probability that a message is answered `451 4.3.0`.
    pub tempfail_rate: f64,
    /// Probability that a message is answered `554 5.6.0`.
    pub permfail_rate: f64,
    /// Probability that the connection is closed instead of answering the final dot.
    pub drop_rate: f64,
    /// Seed of the per-thread random streams (runs are repeatable per thread).
    pub seed: u64,
}

/// What a recipient's local part asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalPartFault {
    /// `tempfail-N`: 451 the first N times this exact address is seen, then accepted.
    TempFail(u32),
    /// `permfail`: always 550 5.1.1.
    PermFail,
}

/// Recognises the fault local parts, case-insensitively. Anything else is `None`, including
/// `tempfail-` without a number (so a typo is delivered, not silently refused).
pub fn local_part_fault(local: &str) -> Option<LocalPartFault> {
    let lower = local.to_ascii_lowercase();
    if lower == "permfail" {
        return Some(LocalPartFault::PermFail);
    }
    let n = lower.strip_prefix("tempfail-")?;
    n.parse().ok().map(LocalPartFault::TempFail)
}

/// Why a recipient was refused (for the stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptFault {
    /// `--reply-rcpt` with a 4xx/5xx code.
    Configured,
    /// A `tempfail-N` address within its first N attempts.
    TempFail,
    /// A `permfail` address.
    PermFail,
}

/// What happens at the end of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageVerdict {
    /// Store it and answer `250 2.0.0`.
    Accept,
    /// Answer this refusal; `why` says which rule fired.
    Refuse {
        /// The reply to send.
        reply: Reply,
        /// The rule.
        why: MessageFault,
    },
    /// Close the connection without answering (`--drop-rate`).
    Drop,
}

/// The rule behind a refused message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageFault {
    /// `--tempfail-rate`.
    TempFailRate,
    /// `--permfail-rate`.
    PermFailRate,
    /// `--fail-first`.
    FailFirst,
    /// `--reply-data` with a 4xx/5xx code.
    Configured,
}

/// State shared by every connection: the `--fail-first` budget and how often each
/// `tempfail-N` address has been seen.
#[derive(Debug)]
pub struct Faults {
    cfg: FaultConfig,
    fail_first_left: AtomicU64,
    tempfail_seen: Mutex<HashMap<String, u32>>,
}

impl Faults {
    /// Fresh state for a run.
    pub fn new(cfg: FaultConfig) -> Self {
        Faults {
            fail_first_left: AtomicU64::new(cfg.fail_first),
            tempfail_seen: Mutex::new(HashMap::new()),
            cfg,
        }
    }

    /// The verdict on one recipient: `local` is its local part, `address` the whole address
    /// as given (the key for `tempfail-N` counting: the exact address, so `tempfail-2@a` and
    /// `tempfail-2@b` count separately).
    pub fn recipient(&self, local: &str, address: &str) -> Result<(), (Reply, RcptFault)> {
        match local_part_fault(local) {
            Some(LocalPartFault::PermFail) => {
                return Err((
                    Reply::new(
                        550,
                        EnhancedCode::new(5, 1, 1),
                        "sink: no such user (injected: permfail)",
                    ),
                    RcptFault::PermFail,
                ))
            }
            Some(LocalPartFault::TempFail(n)) => {
                let attempt = {
                    let mut seen = self.tempfail_seen.lock().unwrap_or_else(|p| p.into_inner());
                    let c = seen.entry(address.to_string()).or_insert(0);
                    *c = c.saturating_add(1);
                    *c
                };
                if attempt <= n {
                    let text = format!(
                        "sink: try again later (injected: tempfail-{n}, attempt {attempt})"
                    );
                    return Err((
                        Reply::new(451, EnhancedCode::new(4, 3, 0), text),
                        RcptFault::TempFail,
                    ));
                }
            }
            None => {}
        }
        let code = self.cfg.reply_rcpt;
        if (200..300).contains(&code) {
            return Ok(());
        }
        let class = (code / 100) as u8;
        Err((
            Reply::new(
                code,
                EnhancedCode::new(class, 0, 0),
                "sink: recipient refused (--reply-rcpt)",
            ),
            RcptFault::Configured,
        ))
    }

    /// The verdict on a complete message; `random` is a uniform draw from `[0, 1)`.
    pub fn message(&self, random: f64) -> MessageVerdict {
        let c = &self.cfg;
        if random < c.drop_rate {
            return MessageVerdict::Drop;
        }
        if random < c.drop_rate + c.tempfail_rate {
            return MessageVerdict::Refuse {
                reply: Reply::new(
                    451,
                    EnhancedCode::new(4, 3, 0),
                    "sink: try again later (injected: --tempfail-rate)",
                ),
                why: MessageFault::TempFailRate,
            };
        }
        if random < c.drop_rate + c.tempfail_rate + c.permfail_rate {
            return MessageVerdict::Refuse {
                reply: Reply::new(
                    554,
                    EnhancedCode::new(5, 6, 0),
                    "sink: message refused (injected: --permfail-rate)",
                ),
                why: MessageFault::PermFailRate,
            };
        }
        if self
            .fail_first_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return MessageVerdict::Refuse {
                reply: Reply::new(
                    451,
                    EnhancedCode::new(4, 3, 0),
                    "sink: temporary failure (--fail-first)",
                ),
                why: MessageFault::FailFirst,
            };
        }
        let code = c.reply_data;
        if (200..300).contains(&code) {
            return MessageVerdict::Accept;
        }
        let enhanced = match code {
            451 => EnhancedCode::new(4, 3, 0),
            554 => EnhancedCode::new(5, 6, 0),
            c => EnhancedCode::new((c / 100) as u8, 0, 0),
        };
        MessageVerdict::Refuse {
            reply: Reply::new(code, enhanced, "sink: message refused (--reply-data)"),
            why: MessageFault::Configured,
        }
    }
}

/// A small fast random stream (xorshift64*), one per worker thread: the decisions need
/// speed and repeatability, not cryptographic quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A stream from `seed`; different seeds give unrelated streams (splitmix64 scrambles).
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(z | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FaultConfig {
        FaultConfig {
            reply_rcpt: 250,
            reply_data: 250,
            fail_first: 0,
            tempfail_rate: 0.0,
            permfail_rate: 0.0,
            drop_rate: 0.0,
            seed: 1,
        }
    }

    #[test]
    fn local_parts() {
        let table = [
            ("permfail", Some(LocalPartFault::PermFail)),
            ("PermFail", Some(LocalPartFault::PermFail)),
            ("tempfail-3", Some(LocalPartFault::TempFail(3))),
            ("TEMPFAIL-0", Some(LocalPartFault::TempFail(0))),
            ("tempfail-", None),
            ("tempfail-x", None),
            ("tempfail", None),
            ("permfail2", None),
            ("user1", None),
        ];
        for (local, want) in table {
            assert_eq!(local_part_fault(local), want, "{local}");
        }
    }

    #[test]
    fn tempfail_n_counts_per_exact_address() {
        let f = Faults::new(cfg());
        for attempt in 1..=2 {
            let (reply, why) = f.recipient("tempfail-2", "tempfail-2@a.test").unwrap_err();
            assert_eq!(reply.code(), 451, "attempt {attempt}");
            assert_eq!(why, RcptFault::TempFail);
        }
        assert!(f.recipient("tempfail-2", "tempfail-2@a.test").is_ok());
        assert!(f.recipient("tempfail-2", "tempfail-2@a.test").is_ok());
        // Another domain is another address: its own two failures.
        assert!(f.recipient("tempfail-2", "tempfail-2@b.test").is_err());
    }

    #[test]
    fn permfail_and_configured_codes() {
        let f = Faults::new(FaultConfig {
            reply_rcpt: 450,
            ..cfg()
        });
        let (r, why) = f.recipient("permfail", "permfail@x.test").unwrap_err();
        assert_eq!(
            (r.code(), r.enhanced().unwrap().to_string()),
            (550, "5.1.1".into())
        );
        assert_eq!(why, RcptFault::PermFail);
        let (r, why) = f.recipient("user", "user@x.test").unwrap_err();
        assert_eq!((r.code(), why), (450, RcptFault::Configured));
    }

    #[test]
    fn message_rates_partition_the_unit_interval() {
        let f = Faults::new(FaultConfig {
            drop_rate: 0.1,
            tempfail_rate: 0.2,
            permfail_rate: 0.3,
            ..cfg()
        });
        assert_eq!(f.message(0.05), MessageVerdict::Drop);
        let code = |v: MessageVerdict| match v {
            MessageVerdict::Refuse { reply, .. } => reply.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(code(f.message(0.15)), 451);
        assert_eq!(code(f.message(0.45)), 554);
        assert_eq!(f.message(0.7), MessageVerdict::Accept);
    }

    #[test]
    fn fail_first_then_reply_data() {
        let f = Faults::new(FaultConfig {
            fail_first: 2,
            ..cfg()
        });
        for _ in 0..2 {
            assert!(matches!(
                f.message(0.5),
                MessageVerdict::Refuse {
                    why: MessageFault::FailFirst,
                    ..
                }
            ));
        }
        assert_eq!(f.message(0.5), MessageVerdict::Accept);
        let f = Faults::new(FaultConfig {
            reply_data: 552,
            ..cfg()
        });
        match f.message(0.5) {
            MessageVerdict::Refuse { reply, why } => {
                assert_eq!((reply.code(), why), (552, MessageFault::Configured));
                assert_eq!(reply.enhanced().unwrap().to_string(), "5.0.0");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut r = Rng::new(7);
        let n = 100_000;
        let below = (0..n).filter(|_| r.next_f64() < 0.25).count();
        let share = below as f64 / n as f64;
        assert!((0.24..0.26).contains(&share), "{share}");
    }
}
