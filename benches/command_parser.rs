//! MAIL/RCPT parsing throughput: sluice's `parse_command` against smtp-proto's
//! `Request::parse` (the current 0.2 release, which borrows its strings, and
//! the 0.1 line, which allocates them) on the same realistic mix of lines, in
//! the same run. Run: `cargo bench --bench command_parser`.
//!
//! Each iteration parses the whole mix; throughput is reported per command.
//! sluice's parser takes the line without CRLF (the session has already
//! framed it); smtp-proto's needs the CRLF to find the end, so it gets it.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sluice::smtp::command::parse_command;
use smtp_proto::Request;

/// A relay's typical envelope traffic: mostly plain RCPTs, MAILs with and
/// without SIZE/BODY, some DSN parameters, one null sender.
const LINES: &[&str] = &[
    "MAIL FROM:<bounce-1234567@mailer.example.com>",
    "MAIL FROM:<newsletter@lists.example.org> SIZE=48213 BODY=8BITMIME",
    "MAIL FROM:<> SIZE=2048",
    "MAIL FROM:<billing@shop.example> RET=HDRS ENVID=QQ314159",
    "MAIL FROM:<alice.smith@example.net> SIZE=1048576",
    "RCPT TO:<bob@example.com>",
    "RCPT TO:<carol.jones@mail.example.org>",
    "RCPT TO:<dave+tag@sub.example.co.uk> NOTIFY=SUCCESS,FAILURE",
    "RCPT TO:<erin@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;erin@example.net",
    "RCPT TO:<frank_1980@example.com>",
    "RCPT TO:<Grace.Hopper@Navy.Example.MIL>",
    "RCPT TO:<h@x.io>",
];

fn bench(c: &mut Criterion) {
    let ours: Vec<Vec<u8>> = LINES.iter().map(|l| l.as_bytes().to_vec()).collect();
    let theirs: Vec<Vec<u8>> = LINES
        .iter()
        .map(|l| format!("{l}\r\n").into_bytes())
        .collect();

    // Both parsers must accept every line, or the comparison is meaningless.
    for (a, b) in ours.iter().zip(&theirs) {
        parse_command(a).unwrap_or_else(|e| panic!("sluice rejects {a:?}: {e:?}"));
        Request::parse(&mut b.iter()).unwrap_or_else(|e| panic!("smtp-proto rejects {b:?}: {e:?}"));
        smtp_proto_latest::Request::parse(&mut b.iter())
            .unwrap_or_else(|e| panic!("smtp-proto 0.2 rejects {b:?}: {e:?}"));
    }

    // The machine is shared and noisy and criterion reports means: first the
    // best of many interleaved rounds, which is robust to load.
    const ROUNDS: usize = 20000;
    let mut best = [f64::MAX; 3];
    for _ in 0..ROUNDS {
        let t = std::time::Instant::now();
        for line in &ours {
            black_box(parse_command(black_box(line)).ok());
        }
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        for line in &theirs {
            black_box(smtp_proto_latest::Request::parse(&mut black_box(line).iter()).ok());
        }
        best[1] = best[1].min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        for line in &theirs {
            black_box(Request::parse(&mut black_box(line).iter()).ok());
        }
        best[2] = best[2].min(t.elapsed().as_secs_f64());
    }
    let per = |t: f64| t * 1e9 / LINES.len() as f64;
    println!(
        "best of {ROUNDS} interleaved rounds, ns per command: sluice {:.1}; smtp_proto_0_2 {:.1} (sluice x{:.2} as fast); smtp_proto_0_1 {:.1} (x{:.2})",
        per(best[0]),
        per(best[1]),
        best[1] / best[0],
        per(best[2]),
        best[2] / best[0]
    );

    let mut g = c.benchmark_group("command_parser");
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(LINES.len() as u64));
    g.bench_function("sluice", |bench| {
        bench.iter(|| {
            for line in &ours {
                black_box(parse_command(black_box(line)).ok());
            }
        })
    });
    g.bench_function("smtp_proto_0_2", |bench| {
        bench.iter(|| {
            for line in &theirs {
                black_box(smtp_proto_latest::Request::parse(&mut black_box(line).iter()).ok());
            }
        })
    });
    g.bench_function("smtp_proto_0_1", |bench| {
        bench.iter(|| {
            for line in &theirs {
                black_box(Request::parse(&mut black_box(line).iter()).ok());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
