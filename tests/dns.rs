//! DNS routing through the public API, with the shared test DNS server
//! (`common::dns`), from a glommio executor as the delivery shards use it.

mod common;

use std::time::Instant;

use common::dns::{TestDns, Zone};
use sluice::config::Config;
use sluice::delivery::dns::{DnsError, Resolver};
use sluice::delivery::route::{Routes, Source};

fn config(dns: &TestDns, tail: &str) -> Config {
    Config::parse(&format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 5000\nattempts = 1\n[delivery]\nport = 2526\n{tail}",
        dns.addr()
    ))
    .unwrap()
}

/// Runs `f` on a glommio executor with small locked memory.
fn on_glommio<T: Send + 'static, Fut: std::future::Future<Output = T> + 'static>(
    f: impl FnOnce() -> Fut + Send + 'static,
) -> T {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(f)
        .expect("executor starts")
        .join()
        .expect("executor joins")
}

#[test]
fn destinations_resolve_from_a_shard() {
    let mut zone = Zone::new();
    zone.mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .a("mx1.example.test", "127.0.0.2")
        .a("mx2.example.test", "127.0.0.3")
        .a("plain.test", "127.0.0.4")
        .null_mx("nomail.test")
        .servfail("broken.test");
    let dns = TestDns::start(zone);
    let config = config(
        &dns,
        "[[route]]\ndomain = \"routed.test\"\nhosts = [\"127.0.0.5:2600\"]\n",
    );
    let resolver = Resolver::new(&config.dns).unwrap();
    let routes = Routes::from_config(&config);
    let results = on_glommio(move || async move {
        let mut out = Vec::new();
        for d in [
            "example.test",
            "plain.test",
            "routed.test",
            "[127.0.0.6]",
            "nomail.test",
            "nowhere.test",
            "broken.test",
        ] {
            out.push(routes.destination(d, &resolver).await);
        }
        out
    });
    let addrs = |i: usize| -> Vec<String> {
        results[i]
            .as_ref()
            .unwrap()
            .targets
            .iter()
            .map(|t| t.addr.to_string())
            .collect()
    };
    assert_eq!(addrs(0), vec!["127.0.0.2:2526", "127.0.0.3:2526"]);
    assert_eq!(results[0].as_ref().unwrap().source, Source::Mx);
    assert!(results[0].as_ref().unwrap().valid_until > Instant::now());
    assert_eq!(addrs(1), vec!["127.0.0.4:2526"]);
    assert_eq!(addrs(2), vec!["127.0.0.5:2600"]);
    assert_eq!(addrs(3), vec!["127.0.0.6:2526"]);
    let err = |i: usize| results[i].as_ref().unwrap_err();
    assert!(matches!(err(4), DnsError::NullMx { .. }));
    assert_eq!(err(4).reply().code(), 556);
    assert!(err(5).is_permanent());
    assert_eq!(err(5).enhanced().to_string(), "5.1.2");
    assert!(!err(6).is_permanent());
    assert_eq!(err(6).enhanced().to_string(), "4.4.3");
}

#[test]
fn first_mx_changes_at_run_time() {
    let mut zone = Zone::new();
    zone.ttl(1)
        .mx("example.test", 10, "mx1.example.test")
        .a("mx1.example.test", "127.0.0.2");
    let dns = TestDns::start(zone);
    let config = config(&dns, "");
    let resolver = Resolver::new(&config.dns).unwrap();
    let routes = Routes::from_config(&config);
    let first = |routes: &Routes, resolver: &Resolver| {
        futures_lite::future::block_on(routes.destination("example.test", resolver))
            .unwrap()
            .targets[0]
            .addr
            .to_string()
    };
    assert_eq!(first(&routes, &resolver), "127.0.0.2:2526");
    dns.update(|z| {
        z.remove_type("example.test", "MX")
            .mx("example.test", 5, "mx0.example.test")
            .a("mx0.example.test", "127.0.0.3");
    });
    common::poll("the new first MX after the 1 s TTL", || {
        (first(&routes, &resolver) == "127.0.0.3:2526").then_some(())
    });
}
