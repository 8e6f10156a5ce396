//! The SMTP client core's cost per message, against the floor a driver pays
//! anyway: copying the body into its write buffer (memcpy in the same
//! bounded pieces). Same run, same bodies, so the ratio is what counts.
//!
//! - `body/*`: one whole transaction on a reused, ready session (MAIL, RCPT,
//!   DATA pipelined; body dot-stuffed; final reply), 5 KiB / 100 KiB / 1 MiB.
//! - `bdat/*`: the same with BDAT chunks (no stuffing).
//! - `memcpy/*`: the baseline.
//! - `session/5k`: a fresh session each time (greeting, EHLO, one message).
//!
//! Building the `OutgoingMessage` (address parsing) is setup, not measured.

use std::sync::Arc;
use std::time::Instant;

use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput,
};
use sluice::smtp::address::{Address, ForwardPath, ReversePath};
use sluice::smtp::client::{ClientConfig, ClientEvent, ClientSession, OutgoingMessage};
use sluice::smtp::command::RcptTo;

const EHLO: &[u8] = b"250-mx.bench\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n\
250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 DSN\r\n";

/// Text with 76-octet lines and a line starting with a dot every ~50 lines.
fn body(len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(len + 100);
    b.extend_from_slice(b"Subject: bench\r\nFrom: a@x.bench\r\n\r\n");
    let mut i = 0;
    while b.len() < len {
        i += 1;
        if i % 50 == 0 {
            b.extend_from_slice(
                b".a line that starts with a dot and must be stuffed on output.....\r\n",
            );
        } else {
            b.extend_from_slice(
                b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n",
            );
        }
    }
    b.truncate(len - 2);
    b.extend_from_slice(b"\r\n");
    b
}

fn message(body: &bytes::Bytes) -> OutgoingMessage {
    OutgoingMessage::new(
        ReversePath::Address(Address::parse("sender@x.bench").unwrap()),
        vec![RcptTo {
            to: ForwardPath::Address(Address::parse("rcpt@y.bench").unwrap()),
            notify: None,
            orcpt: None,
        }],
        body.clone(),
    )
}

/// A ready session.
fn ready(config: &Arc<ClientConfig>, out: &mut Vec<u8>) -> ClientSession {
    let now = Instant::now();
    let mut s = ClientSession::new(config.clone(), now);
    s.handle_input(now, b"220 mx.bench ESMTP\r\n");
    s.write_output(now, out);
    s.handle_input(now, EHLO);
    while s.poll_event().is_some() {}
    out.clear();
    s
}

/// One transaction; the written bytes go to `out` piece by piece, as a
/// driver's write buffer would (cleared after each piece).
fn transaction(s: &mut ClientSession, m: OutgoingMessage, out: &mut Vec<u8>, chunking: bool) {
    let now = Instant::now();
    s.send_message(now, m).unwrap();
    s.write_output(now, out);
    out.clear();
    if chunking {
        s.handle_input(now, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n");
    } else {
        s.handle_input(now, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n");
    }
    while s.has_output() {
        s.write_output(now, out);
        black_box(&out[..]);
        out.clear();
    }
    // One reply per BDAT chunk (the default chunk is 1 MiB, bodies here <= 1 MiB).
    s.handle_input(now, b"250 2.0.0 queued\r\n");
    match s.poll_event() {
        Some(ClientEvent::TransactionDone(r)) => assert!(r.recipients[0].is_delivered()),
        other => panic!("{other:?}"),
    }
}

fn bench(c: &mut Criterion) {
    let data = Arc::new(ClientConfig::default());
    let bdat = Arc::new(ClientConfig {
        use_chunking: true,
        ..ClientConfig::default()
    });
    let mut out = Vec::with_capacity(data.max_write_chunk + 1024);
    let mut g = c.benchmark_group("client");
    for (name, len) in [("5k", 5 * 1024), ("100k", 100 * 1024), ("1m", 1024 * 1024)] {
        let b = bytes::Bytes::from(body(len));
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("memcpy", name), &b, |bench, b| {
            bench.iter(|| {
                for piece in b.chunks(data.max_write_chunk) {
                    out.extend_from_slice(piece);
                    black_box(&out[..]);
                    out.clear();
                }
            })
        });
        let mut s = ready(&data, &mut out);
        g.bench_with_input(BenchmarkId::new("body", name), &b, |bench, b| {
            bench.iter_batched(
                || message(b),
                |m| transaction(&mut s, m, &mut out, false),
                BatchSize::SmallInput,
            )
        });
        let mut s = ready(&bdat, &mut out);
        g.bench_with_input(BenchmarkId::new("bdat", name), &b, |bench, b| {
            bench.iter_batched(
                || message(b),
                |m| transaction(&mut s, m, &mut out, true),
                BatchSize::SmallInput,
            )
        });
    }
    let b = bytes::Bytes::from(body(5 * 1024));
    g.throughput(Throughput::Elements(1));
    g.bench_function("session/5k", |bench| {
        bench.iter_batched(
            || message(&b),
            |m| {
                let mut s = ready(&data, &mut out);
                transaction(&mut s, m, &mut out, false);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
