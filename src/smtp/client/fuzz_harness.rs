//! A driver for fuzzing the client session (cargo-fuzz target
//! `client_session`, and a proptest in the unit tests): the input is a
//! script of server replies, raw bytes and driver actions. Compiled only for
//! tests and `cfg(fuzzing)`.
//!
//! Script tokens, one byte each:
//! - `0xF0..=0xFF`: a driver action (time passes, EOF, send, quit, write);
//! - `0xC0..=0xEF`: raw bytes: the next `token - 0xBF` input bytes, as is;
//! - anything else: a canned reply (plausible ones reach deep states).
//!
//! Invariants checked (a panic is a finding): every message handed to the
//! session comes back exactly once, in a `TransactionDone` with one result
//! per recipient or in `Closed::unsent`; `Closed` comes once and nothing
//! after it; a session that is neither idle nor closed always has a
//! deadline (no wait is unbounded); `write_output` returns what it appended
//! and respects `max_write_chunk`; after EOF the session is closed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::smtp::address::{Address, ForwardPath, ReversePath};
use crate::smtp::command::{Notify, RcptTo};

const CANNED: &[&[u8]] = &[
    b"220 mx ESMTP\r\n",
    b"250 ok\r\n",
    b"250 2.1.5 ok\r\n",
    b"354 go\r\n",
    b"250-mx\r\n250-PIPELINING\r\n250-SIZE 100\r\n250-8BITMIME\r\n250 DSN\r\n",
    b"250-mx\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250 SMTPUTF8\r\n",
    b"250-mx\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 STARTTLS\r\n",
    b"250-mx\r\n250 STARTTLS\r\n",
    b"220 2.0.0 go ahead\r\n",
    b"421 4.3.2 bye\r\n",
    b"450 4.2.0 later\r\n",
    b"451 4.3.0 error\r\n",
    b"452 4.3.1 full\r\n",
    b"500 5.5.1 what\r\n",
    b"502 5.5.1 no\r\n",
    b"503 5.5.1 sequence\r\n",
    b"550 5.1.1 unknown\r\n",
    b"552 5.3.4 big\r\n",
    b"554 5.7.1 no\r\n",
    b"221 2.0.0 bye\r\n",
    b"250-partial\r\n",
    b"250 ",
    b"\r\n",
    b"\n",
    b"999 x\r\n",
    b"25",
];

fn addr(s: &str) -> Address {
    Address::parse(s).expect("valid test address")
}

/// The messages the harness sends, chosen by a byte.
fn message(pick: u8) -> OutgoingMessage {
    let rcpts = 1 + usize::from(pick % 3);
    let recipients = (0..rcpts)
        .map(|i| RcptTo {
            to: ForwardPath::Address(addr(&format!("r{i}@y.test"))),
            notify: (pick & 8 != 0).then_some(Notify {
                failure: true,
                ..Notify::default()
            }),
            orcpt: None,
        })
        .collect();
    let body: &[u8] = match (pick >> 4) % 4 {
        0 => b"",
        1 => b".start\r\n.\r\nmiddle\r\n..\r\nend",
        2 => b"caf\xc3\xa9 8-bit\r\n",
        _ => b"Subject: x\r\n\r\nplain body line that is a bit longer than a chunk\r\n",
    };
    let mut m = OutgoingMessage::new(ReversePath::Address(addr("s@x.test")), recipients, body);
    if pick & 0x40 != 0 {
        m.body_type = Some(BodyType::EightBitMime);
    }
    if pick & 0x80 != 0 {
        m.smtputf8 = true;
    }
    m
}

/// Runs one script; panics when an invariant breaks.
pub fn run(data: &[u8]) {
    let Some((&ctl, script)) = data.split_first() else {
        return;
    };
    let config = ClientConfig {
        use_pipelining: ctl & 1 != 0,
        use_chunking: ctl & 2 != 0,
        bdat_chunk_size: 1 + usize::from(ctl >> 5),
        max_write_chunk: 1 + usize::from((ctl >> 2) & 7) * 3,
        max_pipelined_commands: 1 + usize::from(ctl >> 6),
        eight_bit: if ctl & 0x10 != 0 {
            EightBitPolicy::SendAnyway
        } else {
            EightBitPolicy::Reject
        },
        starttls: if ctl & 0x20 != 0 {
            StartTlsPolicy::Opportunistic
        } else {
            StartTlsPolicy::Disabled
        },
        ..ClientConfig::default()
    };
    let max_write = config.max_write_chunk;
    let mut now = Instant::now();
    let mut s = ClientSession::new(Arc::new(config), now);
    let mut outstanding: BTreeSet<TransactionId> = BTreeSet::new();
    let mut closed = false;
    let mut out = Vec::new();

    fn send(
        s: &mut ClientSession,
        now: Instant,
        outstanding: &mut BTreeSet<TransactionId>,
        pick: u8,
    ) {
        if let Ok(id) = s.send_message(now, message(pick)) {
            assert!(outstanding.insert(id), "ids are unique");
        }
    }
    send(&mut s, now, &mut outstanding, ctl);

    let mut i = 0;
    while i < script.len() {
        let t = script[i];
        i += 1;
        match t {
            0xF0 => {
                now += Duration::from_secs(61);
                s.handle_timeout(now);
            }
            0xF1 => {
                if let Some(d) = s.poll_timeout() {
                    now = now.max(d);
                    s.handle_timeout(now);
                    assert!(s.is_closed(), "a reached deadline closes the session");
                }
            }
            0xF2 => s.handle_eof(now),
            0xF3 | 0xF4 => {
                let pick = script.get(i).copied().unwrap_or(t);
                send(&mut s, now, &mut outstanding, pick);
            }
            0xF5 => s.quit(now),
            0xF6..=0xFF => {
                // Take some output, as a slow socket would.
                let before = out.len();
                let n = s.write_output(now, &mut out);
                assert_eq!(n, out.len() - before);
            }
            0xC0..=0xEF => {
                let len = usize::from(t - 0xBF).min(script.len() - i);
                s.handle_input(now, &script[i..i + len]);
                i += len;
            }
            _ => s.handle_input(now, CANNED[usize::from(t) % CANNED.len()]),
        }
        // Drain: writes bounded, events consistent.
        while s.has_output() {
            out.clear();
            let n = s.write_output(now, &mut out);
            assert_eq!(n, out.len());
            assert!(n > 0, "has_output promised bytes");
            // Commands are unbounded but short here; body pieces bounded.
            assert!(n <= max_write + 4096, "write piece of {n} octets");
        }
        out.clear();
        while let Some(ev) = s.poll_event() {
            assert!(!closed, "no event after Closed");
            match ev {
                ClientEvent::Ready => {}
                ClientEvent::StartTls => s.answer_starttls(now, t & 1 == 0),
                ClientEvent::TransactionDone(r) => {
                    assert!(
                        outstanding.remove(&r.id),
                        "result for a known message, once"
                    );
                    assert_eq!(r.recipients.len(), r.message.recipients.len());
                }
                ClientEvent::Closed { unsent, .. } => {
                    closed = true;
                    for (id, _) in unsent {
                        assert!(outstanding.remove(&id), "unsent message known, once");
                    }
                }
            }
        }
        assert_eq!(closed, s.is_closed());
        if !closed && !s.is_idle() {
            assert!(s.poll_timeout().is_some(), "a wait without a deadline");
        }
    }
    s.handle_eof(now);
    while let Some(ev) = s.poll_event() {
        assert!(!closed, "no event after Closed");
        match ev {
            ClientEvent::TransactionDone(r) => assert!(outstanding.remove(&r.id)),
            ClientEvent::Closed { unsent, .. } => {
                closed = true;
                for (id, _) in unsent {
                    assert!(outstanding.remove(&id));
                }
            }
            ClientEvent::Ready | ClientEvent::StartTls => {}
        }
    }
    assert!(s.is_closed() && closed, "EOF closes the session");
    assert!(outstanding.is_empty(), "messages lost: {outstanding:?}");
    assert_eq!(s.poll_timeout(), None);
}
