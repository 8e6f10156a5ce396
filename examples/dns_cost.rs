//! Instruction count of warm-cache DNS lookups, for callgrind (stable on a
//! noisy machine, unlike wall time). Runs `N` lookups in bursts of 100:
//! `none` (start-up only), `base` (the bare channel + oneshot round trip to a
//! tokio thread), `mx` (`Resolver::mx` served from hickory's cache) or `mx1`
//! (the same, one at a time instead of bursts).
//! Per-lookup cost = (Ir(mode, N2) - Ir(mode, N1)) / (N2 - N1):
//!
//! ```text
//! cargo build --release --example dns_cost
//! valgrind --tool=callgrind target/release/examples/dns_cost mx 1000
//! valgrind --tool=callgrind target/release/examples/dns_cost mx 11000
//! ```

#[allow(dead_code)]
#[path = "../tests/common/dns.rs"]
mod test_dns;

use futures_lite::future::block_on;
use sluice::config::DnsConfig;
use sluice::delivery::dns::Resolver;
use tokio::sync::{mpsc, oneshot};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().expect("mode: none | base | mx");
    let n: usize = args.next().expect("count").parse().expect("a number");
    let mut zone = test_dns::Zone::new();
    zone.ttl(3600).mx("example.test", 10, "mx1.example.test");
    let dns = test_dns::TestDns::start(zone);
    let resolver = Resolver::new(&DnsConfig {
        nameservers: vec![dns.addr()],
        ..DnsConfig::default()
    })
    .expect("resolver");
    block_on(resolver.mx("example.test")).expect("warm-up lookup");
    let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<u64>>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            while let Some(reply) = rx.recv().await {
                tokio::spawn(async move {
                    let _ = reply.send(42);
                });
            }
        });
    });
    for _ in 0..n / 100 {
        match mode.as_str() {
            "mx" => {
                let pending: Vec<_> = (0..100).map(|_| resolver.mx("example.test")).collect();
                for p in pending {
                    block_on(p).expect("cached answer");
                }
            }
            "mx1" => {
                for _ in 0..100 {
                    block_on(resolver.mx("example.test")).expect("cached answer");
                }
            }
            "base" => {
                let pending: Vec<_> = (0..100)
                    .map(|_| {
                        let (t, r) = oneshot::channel();
                        tx.send(t).expect("echo thread");
                        r
                    })
                    .collect();
                for p in pending {
                    block_on(p).expect("echo");
                }
            }
            _ => {}
        }
    }
    assert_eq!(dns.queries(), 1, "all but the warm-up served from cache");
}
