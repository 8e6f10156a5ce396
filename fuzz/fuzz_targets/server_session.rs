//! Fuzzes the server session: arbitrary client bytes, split at fuzzer-chosen
//! points, with the driver answering events in fuzzer-chosen ways. The
//! session must never panic, must only consume what it is given, and must
//! keep its buffers bounded.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sluice::smtp::data::LineEndingPolicy;
use sluice::smtp::server::{Event, PeerInfo, Session, SessionConfig};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (ctl, input) = data.split_at(4);
    let config = SessionConfig {
        max_message_size: 64 + u64::from(ctl[0]) * 16,
        max_recipients: 1 + usize::from(ctl[1] % 4),
        max_command_line: 32 + usize::from(ctl[1]),
        max_errors: 1 + u32::from(ctl[2] % 30),
        max_line_length: 8 + usize::from(ctl[2]),
        line_endings: if ctl[3] & 1 == 0 {
            LineEndingPolicy::Normalize
        } else {
            LineEndingPolicy::Reject
        },
        ..Default::default()
    };
    let mut peer = PeerInfo::plain("127.0.0.1:1".parse().unwrap());
    peer.starttls_available = ctl[3] & 2 != 0;
    let mut now = Instant::now();
    let mut s = Session::new(Arc::new(config), peer, now);
    let mut out = Vec::new();
    let step = 1 + usize::from(ctl[3] >> 2);
    let mut answers = input.iter().copied().cycle();
    let mut pending: &[u8] = input;
    let mut rounds = 0;
    while !pending.is_empty() && !s.is_closed() && rounds < 100_000 {
        rounds += 1;
        let take = step.min(pending.len());
        let n = s.handle_input(now, &pending[..take]);
        assert!(n <= take);
        pending = &pending[n..];
        while let Some(ev) = s.poll_event() {
            let a = answers.next().unwrap_or(0);
            match ev {
                Event::CheckRecipient { .. } => {
                    let v = if a % 3 == 0 {
                        Err(sluice::reply!(554, 5, 7, 1, "denied"))
                    } else {
                        Ok(())
                    };
                    s.answer_recipient(now, v);
                }
                Event::Message(m) => {
                    // Nothing with a bare CR or LF is ever stored.
                    let b = &m.body;
                    for (i, &c) in b.iter().enumerate() {
                        if c == b'\n' {
                            assert!(i > 0 && b[i - 1] == b'\r', "bare LF stored");
                        }
                        if c == b'\r' {
                            assert!(b.get(i + 1) == Some(&b'\n'), "bare CR stored");
                        }
                    }
                    let v = if a % 5 == 0 {
                        Err(sluice::reply!(452, 4, 3, 1, "full"))
                    } else {
                        Ok("ID".into())
                    };
                    s.answer_message(now, v);
                }
                Event::StartTls => s.answer_starttls(now, a % 2 == 0),
                Event::Rejected { .. } => {}
            }
        }
        if n == 0 && s.wants_input() {
            break;
        }
        if a_tick(rounds) {
            now += Duration::from_secs(1);
            s.handle_timeout(now);
        }
        s.write_output(&mut out);
        out.clear();
    }
});

fn a_tick(round: usize) -> bool {
    round % 97 == 0
}
