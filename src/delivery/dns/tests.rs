//! Resolver tests against the test DNS server on loopback.

use super::test_server::{Behaviour, TestDns, Zone};
use super::*;
use futures_lite::future::block_on;

/// Generous deadline for anything that should happen "soon" on a loaded
/// 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// Generous per-query timeout: a loaded machine must not turn a slow answer
/// into a timeout. Tests of names that never answer use [`NEVER_ANSWERS_MS`],
/// and [`MIXED_MS`] when other answers must still arrive in time.
fn config(dns: &TestDns) -> DnsConfig {
    DnsConfig {
        nameservers: vec![dns.addr()],
        timeout_ms: 5000,
        attempts: 1,
        ..DnsConfig::default()
    }
}

/// Timeout for resolvers that only ask names which never answer.
const NEVER_ANSWERS_MS: u64 = 300;
/// Timeout when some queries never answer and others must answer in time.
const MIXED_MS: u64 = 2000;

fn start(zone: Zone) -> (TestDns, Resolver) {
    let dns = TestDns::start(zone);
    let resolver = Resolver::new(&config(&dns)).expect("resolver starts");
    (dns, resolver)
}

/// Polls `f` until it returns Some or the deadline passes.
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mx(preference: u16, exchange: &str) -> MxRecord {
    MxRecord {
        preference,
        exchange: exchange.into(),
    }
}

#[test]
fn mx_records_come_back_with_their_ttl() {
    let mut zone = Zone::new();
    zone.ttl(120).mx("example.test", 20, "mx2.example.test").mx(
        "example.test",
        10,
        "MX1.example.test.",
    );
    let (dns, r) = start(zone);
    let before = Instant::now();
    let answer = block_on(r.mx("Example.Test")).unwrap();
    let mut records = answer.records.clone();
    records.sort_by_key(|m| m.preference);
    assert_eq!(
        records,
        vec![mx(10, "mx1.example.test"), mx(20, "mx2.example.test")]
    );
    let ttl = answer.valid_until - before;
    assert!(
        ttl > Duration::from_secs(100) && ttl <= Duration::from_secs(121),
        "{ttl:?}"
    );
    assert_eq!(dns.queries_for("example.test", "MX"), 1);
}

#[test]
fn nodata_is_an_empty_mx_list_and_nxdomain_an_error() {
    let mut zone = Zone::new();
    zone.a("plain.test", "127.0.0.2");
    let (_dns, r) = start(zone);
    let answer = block_on(r.mx("plain.test")).unwrap();
    assert!(answer.records.is_empty());

    let e = block_on(r.mx("nowhere.test")).unwrap_err();
    assert_eq!(
        e,
        DnsError::NoSuchDomain {
            domain: "nowhere.test".into()
        }
    );
    assert!(e.is_permanent());
    let reply = e.reply();
    assert_eq!(reply.code(), 550);
    assert_eq!(reply.enhanced(), Some(EnhancedCode::new(5, 1, 2)));
}

#[test]
fn servfail_refused_and_timeout_are_temporary() {
    let mut zone = Zone::new();
    zone.mx("broken.test", 10, "mx.broken.test")
        .servfail("broken.test")
        .refused("refusing.test")
        .timeout("slow.test");
    let (dns, r) = start(zone);
    let short = Resolver::new(&DnsConfig {
        timeout_ms: NEVER_ANSWERS_MS,
        ..config(&dns)
    })
    .unwrap();
    for (domain, reason, r) in [
        ("broken.test", "SERVFAIL", &r),
        ("refusing.test", "REFUSED", &r),
        ("slow.test", "timeout", &short),
    ] {
        let started = Instant::now();
        let e = block_on(r.mx(domain)).unwrap_err();
        assert_eq!(
            e,
            DnsError::Temporary {
                name: domain.into(),
                qtype: "MX",
                reason: reason.into()
            }
        );
        assert!(!e.is_permanent());
        assert_eq!(e.reply().code(), 451);
        assert_eq!(e.enhanced(), EnhancedCode::new(4, 4, 3));
        assert!(started.elapsed() < DEADLINE, "{domain} took too long");
    }
    // attempts = 1: one query each, no retry.
    assert_eq!(dns.queries_for("slow.test", "MX"), 1);
}

#[test]
fn attempts_retry_failures() {
    let mut zone = Zone::new();
    zone.timeout("slow.test");
    let dns = TestDns::start(zone);
    let r = Resolver::new(&DnsConfig {
        attempts: 3,
        timeout_ms: NEVER_ANSWERS_MS,
        ..config(&dns)
    })
    .unwrap();
    assert!(block_on(r.mx("slow.test")).is_err());
    assert_eq!(dns.queries_for("slow.test", "MX"), 3);
}

#[test]
fn addresses_of_both_families_in_server_order() {
    let mut zone = Zone::new();
    zone.a("mx.test", "127.0.0.3")
        .a("mx.test", "127.0.0.2")
        .aaaa("mx.test", "::1")
        .aaaa("v6only.test", "::2")
        .txt("textonly.test", "hello");
    let (dns, r) = start(zone);
    let found = block_on(r.addresses("mx.test")).unwrap();
    assert_eq!(
        found.ipv4,
        vec![Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 2)]
    );
    assert_eq!(found.ipv6, vec![Ipv6Addr::LOCALHOST]);
    assert_eq!(
        found.ordered(IpOrder::Ipv6First)[0],
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    );
    assert_eq!(
        found.ordered(IpOrder::Ipv4First)[0],
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))
    );
    let v6 = block_on(r.addresses("v6only.test")).unwrap();
    assert!(v6.ipv4.is_empty() && v6.ipv6.len() == 1);
    // A name that exists without addresses: empty, not an error.
    assert!(block_on(r.addresses("textonly.test")).unwrap().is_empty());
    assert_eq!(
        block_on(r.addresses("nowhere.test")).unwrap_err(),
        DnsError::NoSuchDomain {
            domain: "nowhere.test".into()
        }
    );
    assert_eq!(dns.queries_for("mx.test", "A"), 1);
    assert_eq!(dns.queries_for("mx.test", "AAAA"), 1);
}

#[test]
fn ipv4_only_sends_no_aaaa_queries() {
    let mut zone = Zone::new();
    zone.a("mx.test", "127.0.0.2").aaaa("mx.test", "::1");
    let dns = TestDns::start(zone);
    let r = Resolver::new(&DnsConfig {
        ip_order: IpOrder::Ipv4Only,
        ..config(&dns)
    })
    .unwrap();
    let found = block_on(r.addresses("mx.test")).unwrap();
    assert_eq!(found.ipv4.len(), 1);
    assert!(found.ipv6.is_empty());
    assert_eq!(dns.queries_for("mx.test", "AAAA"), 0);
}

#[test]
fn one_family_failing_gives_a_short_lived_partial_answer() {
    let mut zone = Zone::new();
    zone.ttl(3600)
        .a("mx.test", "127.0.0.2")
        .behaviour("mx.test", Some("AAAA"), Behaviour::ServFail)
        .behaviour("dead.test", Some("A"), Behaviour::ServFail)
        .aaaa("dead.test", "::1")
        .behaviour("dead.test", Some("AAAA"), Behaviour::Timeout);
    let dns = TestDns::start(zone);
    let r = Resolver::new(&DnsConfig {
        timeout_ms: MIXED_MS,
        ..config(&dns)
    })
    .unwrap();
    let found = block_on(r.addresses("mx.test")).unwrap();
    assert_eq!(found.ipv4, vec![Ipv4Addr::new(127, 0, 0, 2)]);
    assert!(found.valid_until <= Instant::now() + PARTIAL_ANSWER_TTL);
    // Both families failing is a temporary error.
    let e = block_on(r.addresses("dead.test")).unwrap_err();
    assert!(matches!(e, DnsError::Temporary { .. }), "{e:?}");
}

#[test]
fn unusable_addresses_are_dropped() {
    let mut zone = Zone::new();
    zone.a("mx.test", "0.0.0.0")
        .a("mx.test", "224.0.0.1")
        .a("mx.test", "255.255.255.255")
        .a("mx.test", "127.0.0.2")
        .aaaa("mx.test", "::")
        .aaaa("mx.test", "ff02::1");
    let (_dns, r) = start(zone);
    let found = block_on(r.addresses("mx.test")).unwrap();
    assert_eq!(found.ipv4, vec![Ipv4Addr::new(127, 0, 0, 2)]);
    assert!(found.ipv6.is_empty());
}

#[test]
fn cname_at_the_domain_is_followed() {
    let mut zone = Zone::new();
    zone.cname("alias.test", "chain.test")
        .cname("chain.test", "real.test")
        .mx("real.test", 5, "mx.real.test")
        .a("real.test", "127.0.0.4");
    let (_dns, r) = start(zone);
    let answer = block_on(r.mx("alias.test")).unwrap();
    assert_eq!(answer.records, vec![mx(5, "mx.real.test")]);
    let found = block_on(r.addresses("alias.test")).unwrap();
    assert_eq!(found.ipv4, vec![Ipv4Addr::new(127, 0, 0, 4)]);
}

#[test]
fn null_mx_and_ip_exchanges_come_back_as_written() {
    let mut zone = Zone::new();
    zone.null_mx("nomail.test").mx("ipmx.test", 10, "192.0.2.1");
    let (_dns, r) = start(zone);
    assert_eq!(
        block_on(r.mx("nomail.test")).unwrap().records,
        vec![mx(0, ".")]
    );
    assert!(block_on(r.mx("nomail.test")).unwrap().records[0].is_root());
    assert_eq!(
        block_on(r.mx("ipmx.test")).unwrap().records,
        vec![mx(10, "192.0.2.1")]
    );
}

#[test]
fn truncated_udp_answers_are_retried_over_tcp() {
    let mut zone = Zone::new();
    zone.mx("big.test", 10, "mx.big.test")
        .truncate_udp("big.test");
    let (dns, r) = start(zone);
    let answer = block_on(r.mx("big.test")).unwrap();
    assert_eq!(answer.records, vec![mx(10, "mx.big.test")]);
    assert_eq!(dns.tcp_queries(), 1);
    assert_eq!(dns.queries(), 2, "one UDP (truncated), one TCP");
}

#[test]
fn answers_are_cached_until_their_ttl_expires() {
    let mut zone = Zone::new();
    zone.ttl(1)
        .mx("short.test", 10, "mx.short.test")
        .ttl(3600)
        .mx("long.test", 10, "mx.long.test");
    let (dns, r) = start(zone);
    block_on(r.mx("long.test")).unwrap();
    block_on(r.mx("long.test")).unwrap();
    assert_eq!(dns.queries_for("long.test", "MX"), 1, "served from cache");

    block_on(r.mx("short.test")).unwrap();
    assert_eq!(dns.queries_for("short.test", "MX"), 1);
    // After the 1 s TTL the server is asked again.
    poll("a fresh query after the TTL", || {
        block_on(r.mx("short.test")).unwrap();
        (dns.queries_for("short.test", "MX") > 1).then_some(())
    });
}

#[test]
fn negative_answers_are_cached_failures_are_not() {
    let mut zone = Zone::new();
    zone.negative_ttl(3600)
        .a("exists.test", "127.0.0.2")
        .servfail("broken.test");
    let (dns, r) = start(zone);
    for _ in 0..3 {
        assert!(block_on(r.mx("gone.test")).is_err());
        assert!(block_on(r.mx("exists.test")).unwrap().records.is_empty());
        assert!(block_on(r.mx("broken.test")).is_err());
    }
    assert_eq!(dns.queries_for("gone.test", "MX"), 1, "NXDOMAIN cached");
    assert_eq!(dns.queries_for("exists.test", "MX"), 1, "NODATA cached");
    assert_eq!(
        dns.queries_for("broken.test", "MX"),
        3,
        "SERVFAIL not cached"
    );
}

#[test]
fn negative_ttl_is_capped() {
    let mut zone = Zone::new();
    zone.negative_ttl(3600).a("exists.test", "127.0.0.2");
    let dns = TestDns::start(zone);
    let r = Resolver::new(&DnsConfig {
        negative_max_ttl: 1,
        ..config(&dns)
    })
    .unwrap();
    let answer = block_on(r.mx("exists.test")).unwrap();
    assert!(answer.valid_until <= Instant::now() + Duration::from_secs(1));
    poll("the capped negative answer to expire", || {
        block_on(r.mx("exists.test")).unwrap();
        (dns.queries_for("exists.test", "MX") > 1).then_some(())
    });
}

#[test]
fn zone_changes_show_after_the_cache_expires() {
    let mut zone = Zone::new();
    zone.ttl(1).mx("moving.test", 10, "old.moving.test");
    let (dns, r) = start(zone);
    assert_eq!(
        block_on(r.mx("moving.test")).unwrap().records,
        vec![mx(10, "old.moving.test")]
    );
    dns.update(|z| {
        z.remove("moving.test")
            .mx("moving.test", 10, "new.moving.test");
    });
    poll("the new MX", || {
        let records = block_on(r.mx("moving.test")).unwrap().records;
        (records == vec![mx(10, "new.moving.test")]).then_some(())
    });
}

#[test]
fn invalid_names_fail_without_a_query() {
    let (dns, r) = start(Zone::new());
    for bad in ["", "[127.0.0.1]", "127.0.0.1", "a..b", "."] {
        let e = block_on(r.mx(bad)).unwrap_err();
        assert!(
            matches!(e, DnsError::InvalidDomain { .. }),
            "{bad:?}: {e:?}"
        );
        assert!(e.is_permanent());
    }
    assert_eq!(dns.queries(), 0);
}

#[test]
fn many_concurrent_lookups_beyond_max_in_flight() {
    let mut zone = Zone::new();
    for i in 0..200 {
        zone.mx(&format!("d{i}.test"), 10, &format!("mx.d{i}.test"));
    }
    let dns = TestDns::start(zone);
    let r = Resolver::new(&DnsConfig {
        max_in_flight: 4,
        ..config(&dns)
    })
    .unwrap();
    // All requests are sent before any answer is awaited.
    let pending: Vec<_> = (0..200).map(|i| r.mx(&format!("d{i}.test"))).collect();
    for (i, p) in pending.into_iter().enumerate() {
        let answer = block_on(p).unwrap();
        assert_eq!(answer.records, vec![mx(10, &format!("mx.d{i}.test"))]);
    }
    assert_eq!(dns.queries(), 200);
}

#[test]
fn lookups_work_from_a_glommio_executor() {
    let mut zone = Zone::new();
    zone.mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", "127.0.0.2");
    let (_dns, r) = start(zone);
    let found = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(move || async move {
            // Two tasks waiting at once on the same executor.
            let a = glommio::spawn_local({
                let r = r.clone();
                async move { r.mx("example.test").await }
            });
            let b = glommio::spawn_local({
                let r = r.clone();
                async move { r.addresses("mx.example.test").await }
            });
            (a.await.unwrap().records, b.await.unwrap().ipv4)
        })
        .expect("executor starts")
        .join()
        .expect("executor joins");
    assert_eq!(found.0, vec![mx(10, "mx.example.test")]);
    assert_eq!(found.1, vec![Ipv4Addr::new(127, 0, 0, 2)]);
}

#[test]
fn stop_fails_lookups_in_flight_and_later_ones() {
    let mut zone = Zone::new();
    zone.timeout("slow.test");
    let dns = TestDns::start(zone);
    let r = Resolver::new(&DnsConfig {
        timeout_ms: 60_000,
        ..config(&dns)
    })
    .unwrap();
    let in_flight = r.mx("slow.test");
    poll("the query to reach the server", || {
        (dns.queries_for("slow.test", "MX") == 1).then_some(())
    });
    let clone = r.clone();
    let started = Instant::now();
    r.stop();
    assert_eq!(block_on(in_flight).unwrap_err(), DnsError::Stopped);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not the 60 s timeout"
    );
    assert_eq!(
        block_on(clone.mx("slow.test")).unwrap_err(),
        DnsError::Stopped
    );
    assert!(!DnsError::Stopped.is_permanent());
    r.stop(); // twice is harmless
}

#[test]
fn dropping_the_last_handle_ends_the_thread() {
    let (_dns, r) = start(Zone::new());
    let thread = r.take_thread().expect("thread handle");
    let clone = r.clone();
    drop(r);
    // A clone keeps the request channel, hence the thread, alive.
    assert!(block_on(clone.mx("x.test")).is_err());
    assert!(!thread.is_finished());
    drop(clone);
    poll("the DNS thread to end", || {
        thread.is_finished().then_some(())
    });
    thread.join().unwrap();
}

#[test]
fn system_configuration_is_used_without_nameservers() {
    // Only construction: this machine's resolver is not ours to query.
    match Resolver::new(&DnsConfig::default()) {
        Ok(r) => r.stop(),
        Err(e) => assert!(
            matches!(
                e,
                DnsSetupError::SystemConfig(_) | DnsSetupError::NoNameservers
            ),
            "{e}"
        ),
    }
}

#[test]
fn replies_are_single_line_and_classed() {
    let errors = [
        DnsError::NoSuchDomain {
            domain: "a.test".into(),
        },
        DnsError::NullMx {
            domain: "a.test".into(),
        },
        DnsError::NoAddress {
            domain: "a.test".into(),
        },
        DnsError::NoUsableMx {
            domain: "a.test".into(),
            detail: "mx.a.test: no address\r\nx".into(),
        },
        DnsError::NoRouteAddress {
            domain: "a.test".into(),
            detail: "x".into(),
        },
        DnsError::Temporary {
            name: "a.test".into(),
            qtype: "MX",
            reason: "SERVFAIL".into(),
        },
        DnsError::InvalidDomain {
            domain: "[x:y]".into(),
            reason: "r".into(),
        },
        DnsError::Stopped,
    ];
    let expected = [
        (550, "5.1.2", true),
        (556, "5.1.10", true),
        (550, "5.1.2", true),
        (451, "4.4.4", false),
        (451, "4.4.4", false),
        (451, "4.4.3", false),
        (550, "5.1.2", true),
        (451, "4.4.3", false),
    ];
    for (e, (code, status, permanent)) in errors.iter().zip(expected) {
        let reply = e.reply();
        assert_eq!(reply.code(), code, "{e:?}");
        assert_eq!(reply.enhanced().unwrap().to_string(), status, "{e:?}");
        assert_eq!(e.is_permanent(), permanent, "{e:?}");
        assert_eq!(reply.is_permanent(), permanent, "{e:?}");
        let bytes = reply.to_bytes();
        assert_eq!(
            bytes.iter().filter(|&&b| b == b'\n').count(),
            1,
            "{:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
}

#[test]
fn cache_size_zero_disables_the_cache() {
    let mut zone = Zone::new();
    zone.ttl(3600).mx("example.test", 10, "mx.example.test");
    let dns = TestDns::start(zone);
    let r = Resolver::new(&DnsConfig {
        cache_size: 0,
        ..config(&dns)
    })
    .unwrap();
    for _ in 0..3 {
        block_on(r.mx("example.test")).unwrap();
    }
    assert_eq!(dns.queries_for("example.test", "MX"), 3);
}

#[test]
fn a_disabled_resolver_has_no_thread_and_fails_lookups_at_once() {
    // Nameservers that could never answer: `disabled` must not touch them.
    let config = DnsConfig {
        nameservers: vec!["127.0.0.1:9".parse().unwrap()],
        ..DnsConfig::default()
    };
    let r = Resolver::disabled(&config);
    assert!(r.take_thread().is_none());
    assert!(matches!(
        block_on(r.mx("example.test")).unwrap_err(),
        DnsError::Stopped
    ));
    assert_eq!(r.max_mx_hosts(), config.max_mx_hosts);
    r.stop();
}
