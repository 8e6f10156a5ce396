//! Warm-cache DNS cost as the delivery shards see it: one `mx()` round trip
//! to the DNS thread, a whole `destination()` (MX + A + AAAA), and a burst of
//! 100 lookups in flight at once — against a baseline of the same
//! channel + oneshot round trip to a tokio thread with no hickory behind it.
//!
//! `cargo bench --bench dns`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_lite::future::block_on;
use sluice::config::DnsConfig;
use sluice::delivery::dns::Resolver;
use sluice::delivery::route::Routes;
use tokio::sync::{mpsc, oneshot};

#[allow(dead_code)]
#[path = "../tests/common/dns.rs"]
mod test_dns;

use test_dns::{TestDns, Zone};

/// The floor: request over an unbounded channel to a current_thread tokio
/// runtime on its own thread, a spawned task answering through a oneshot.
fn echo_thread() -> mpsc::UnboundedSender<oneshot::Sender<u64>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<u64>>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            while let Some(reply) = rx.recv().await {
                tokio::spawn(async move {
                    let _ = reply.send(42);
                });
            }
        });
    });
    tx
}

fn bench(c: &mut Criterion) {
    let mut zone = Zone::new();
    zone.ttl(3600)
        .negative_ttl(3600)
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .a("mx1.example.test", "127.0.0.2")
        .a("mx2.example.test", "127.0.0.3");
    let dns = TestDns::start(zone);
    let resolver = Resolver::new(&DnsConfig {
        nameservers: vec![dns.addr()],
        ..DnsConfig::default()
    })
    .unwrap();
    let routes = Routes::new(&[], 25);
    // Warm the cache (AAAA answers are NODATA, cached for the SOA TTL).
    block_on(routes.destination("example.test", &resolver)).unwrap();
    let warm = dns.queries();

    let echo = echo_thread();
    let mut g = c.benchmark_group("dns_warm");
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    g.bench_function("baseline_channel_round_trip", |b| {
        b.iter(|| {
            let (tx, rx) = oneshot::channel();
            echo.send(tx).unwrap();
            block_on(rx).unwrap()
        })
    });
    g.bench_function("mx_cached", |b| {
        b.iter(|| block_on(resolver.mx("example.test")).unwrap())
    });
    g.bench_function("destination_cached", |b| {
        b.iter(|| block_on(routes.destination("example.test", &resolver)).unwrap())
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("baseline_burst_100", |b| {
        b.iter(|| {
            let pending: Vec<_> = (0..100)
                .map(|_| {
                    let (tx, rx) = oneshot::channel();
                    echo.send(tx).unwrap();
                    rx
                })
                .collect();
            for p in pending {
                block_on(p).unwrap();
            }
        })
    });
    g.bench_function("mx_cached_burst_100", |b| {
        b.iter(|| {
            let pending: Vec<_> = (0..100).map(|_| resolver.mx("example.test")).collect();
            for p in pending {
                block_on(p).unwrap();
            }
        })
    });
    g.finish();
    assert_eq!(dns.queries(), warm, "everything was served from the cache");
}

criterion_group!(benches, bench);
criterion_main!(benches);
