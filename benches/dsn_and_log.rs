//! DSN construction and accounting-log costs.
//!
//! * `dsn_build/*`: `dsn::build` for one failed recipient, RET=HDRS on a 5 KiB
//!   message and RET=FULL on a 48 KiB one (under the 50 000-octet cap);
//!   elements/s = DSNs/s.
//! * `event_log/record_*`: what a shard pays per `EventLog::record` (building
//!   the event and the channel push), disabled log as the baseline. The
//!   writer is synced outside the timed section so the queue never fills.
//! * `event_log/through_writer`: 10 000 records recorded and synced to the
//!   file (writer-thread JSON encoding and the write included); elements/s =
//!   records/s end to end.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::delivery::dsn::{self, Action, DsnInput, DsnRecipient};
use sluice::delivery::log::{Delivery, Event, EventLog, EventLogOptions};
use sluice::smtp::reply::{EnhancedCode, Reply};
use sluice::spool::{Envelope, Recipient, RecipientState, SpoolId};

fn message(size: usize) -> Vec<u8> {
    let mut m = b"Received: from client.example.org ([192.0.2.7])\r\n\tby mx1.sluice.test (Sluice) with ESMTP id 028T5CY4TQKFF\r\nFrom: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\nSubject: Lunch\r\nMessage-ID: <lunch-1@example.org>\r\n\r\n".to_vec();
    while m.len() < size {
        m.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n",
        );
    }
    m
}

fn envelope(ret_full: bool) -> Envelope {
    Envelope {
        id: SpoolId::from_u64(0x0123_4567_89AB_CDEF),
        sender: "alice@example.org".into(),
        recipients: vec![Recipient {
            address: "bob@example.net".into(),
            notify: None,
            orcpt: Some("rfc822;bob@example.net".into()),
            state: RecipientState::Failed {
                at_ms: 1_709_251_000_000,
                reply: "550 5.1.1 <bob@example.net>: Recipient address rejected".into(),
            },
            remote_mta: None,
        }],
        received_at_ms: 1_709_250_000_000,
        size: 0,
        body_8bit: false,
        smtputf8: false,
        ret_full: Some(ret_full),
        envid: Some("QQ314159".into()),
        client_ip: Some("192.0.2.7".into()),
        helo: Some("client.example.org".into()),
    }
}

fn bench_dsn(c: &mut Criterion) {
    let mut g = c.benchmark_group("dsn_build");
    g.throughput(Throughput::Elements(1));
    for (name, ret_full, size) in [("hdrs_5k", false, 5 * 1024), ("full_48k", true, 48 * 1024)] {
        let env = envelope(ret_full);
        let original = message(size);
        let mut r = DsnRecipient::from_spool(&env.recipients[0]).unwrap();
        r.remote_host = Some("mx.example.net".into());
        r.remote_ip = Some("192.0.2.25".parse().unwrap());
        let rcpts = [r];
        let input = DsnInput {
            hostname: "mx1.sluice.test",
            dsn_id: SpoolId::from_u64(42),
            date: UNIX_EPOCH + Duration::from_secs(1_709_251_199),
            envelope: &env,
            recipients: &rcpts,
            original: &original,
            return_size_limit: dsn::DEFAULT_RETURN_SIZE_LIMIT,
        };
        assert_eq!(rcpts[0].action, Action::Failed);
        g.bench_function(name, |b| b.iter(|| dsn::build(&input).unwrap()));
    }
    g.finish();
}

fn event(n: u32) -> Event {
    Event::Delivery(Delivery {
        id: SpoolId::from_u64(u64::from(n)),
        rcpt: "bob@example.net".to_owned(),
        remote_host: "mx.example.net".to_owned(),
        remote_ip: Some("192.0.2.25".parse().unwrap()),
        reply: Reply::new(250, EnhancedCode::new(2, 0, 0), "Ok: queued as 4Xyz"),
        attempt: 1,
        delay: Duration::from_millis(1234),
        conn_reuse: n,
    })
}

fn bench_log(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_with(
        &dir.path().join("events.jsonl"),
        EventLogOptions {
            capacity: usize::MAX,
            ..EventLogOptions::default()
        },
    )
    .unwrap();
    let disabled = EventLog::disabled();
    let mut g = c.benchmark_group("event_log");
    g.throughput(Throughput::Elements(1));
    g.bench_function("record_disabled", |b| {
        b.iter(|| disabled.record(|| event(1)));
    });
    g.bench_function("record_enabled", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for n in 0..iters {
                log.record(|| event(n as u32));
            }
            let took = start.elapsed();
            assert!(log.sync(Duration::from_secs(600)));
            took
        });
    });
    const BATCH: u32 = 10_000;
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    g.bench_function("through_writer", |b| {
        b.iter(|| {
            for n in 0..BATCH {
                log.record_at(SystemTime::now(), || event(n));
            }
            assert!(log.sync(Duration::from_secs(600)));
        });
    });
    g.finish();
    assert_eq!(log.dropped(), 0);
}

criterion_group!(benches, bench_dsn, bench_log);
criterion_main!(benches);
