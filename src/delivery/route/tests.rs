//! Routing tests: the pure ordering rules, then whole destinations against
//! the test DNS server.

use super::*;
use crate::config::{DnsConfig, IpOrder};
use crate::delivery::dns::test_server::{Behaviour, TestDns, Zone};
use crate::smtp::reply::EnhancedCode;
use futures_lite::future::block_on;

const PORT: u16 = 2525;

fn mx(preference: u16, exchange: &str) -> MxRecord {
    MxRecord {
        preference,
        exchange: exchange.into(),
    }
}

fn route(domain: &str, hosts: &[&str]) -> RouteConfig {
    RouteConfig {
        domain: domain.into(),
        hosts: hosts.iter().map(|h| h.parse().unwrap()).collect(),
    }
}

fn resolver_with(dns: &TestDns, f: impl FnOnce(&mut DnsConfig)) -> Resolver {
    // A generous timeout: a slow answer on a loaded machine must not read
    // as a timeout. Tests of names that never answer set their own.
    let mut c = DnsConfig {
        nameservers: vec![dns.addr()],
        timeout_ms: 5000,
        attempts: 1,
        ..DnsConfig::default()
    };
    f(&mut c);
    Resolver::new(&c).expect("resolver starts")
}

fn start(zone: Zone) -> (TestDns, Resolver) {
    let dns = TestDns::start(zone);
    let r = resolver_with(&dns, |_| {});
    (dns, r)
}

fn addrs(d: &Destination) -> Vec<String> {
    d.targets.iter().map(|t| t.addr.to_string()).collect()
}

fn hosts(d: &Destination) -> Vec<(String, Option<u16>)> {
    d.targets
        .iter()
        .map(|t| (t.host_name.clone(), t.mx_preference))
        .collect()
}

// ---------------------------------------------------------------------------
// Pure rules.

#[test]
fn mx_sorted_by_preference_ties_shuffled() {
    let records = vec![
        mx(20, "c"),
        mx(10, "b"),
        mx(10, "a"),
        mx(30, "d"),
        mx(10, "a"), // duplicate
        mx(40, "b"), // worse duplicate of b
    ];
    let mut first_seen = std::collections::HashSet::new();
    for seed in 0..64 {
        let ordered = order_mx(records.clone(), &mut StdRng::seed_from_u64(seed));
        let prefs: Vec<u16> = ordered.iter().map(|r| r.preference).collect();
        assert_eq!(prefs, vec![10, 10, 20, 30], "seed {seed}");
        let names: Vec<&str> = ordered.iter().map(|r| r.exchange.as_str()).collect();
        assert_eq!(&names[2..], &["c", "d"]);
        first_seen.insert(names[0].to_owned());
    }
    assert_eq!(
        first_seen.len(),
        2,
        "both equal-preference hosts come first sometimes"
    );
    // The same seed gives the same order.
    let a = order_mx(records.clone(), &mut StdRng::seed_from_u64(7));
    let b = order_mx(records, &mut StdRng::seed_from_u64(7));
    assert_eq!(a, b);
}

#[test]
fn null_mx_is_a_single_root_exchange() {
    assert!(is_null_mx(&[mx(0, ".")]));
    assert!(is_null_mx(&[mx(10, ".")]));
    assert!(!is_null_mx(&[mx(0, "."), mx(10, "mx.test")]));
    assert!(!is_null_mx(&[mx(0, "mx.test")]));
    assert!(!is_null_mx(&[]));
}

#[test]
fn address_literals_parse() {
    assert_eq!(
        parse_address_literal("[127.0.0.2]"),
        Some("127.0.0.2".parse().unwrap())
    );
    assert_eq!(
        parse_address_literal("[IPv6:::1]"),
        Some("::1".parse().unwrap())
    );
    assert_eq!(
        parse_address_literal("[ipv6:2001:db8::1]"),
        Some("2001:db8::1".parse().unwrap())
    );
    for bad in [
        "127.0.0.2",
        "[127.0.0]",
        "[::1]",
        "[tag:content]",
        "[ipv6:1.2.3.4]",
        "[]",
    ] {
        assert_eq!(parse_address_literal(bad), None, "{bad}");
    }
}

#[test]
fn most_specific_route_wins() {
    let routes = Routes::new(
        &[
            route("*", &["127.0.0.9:25"]),
            route(".test", &["127.0.0.8:25"]),
            route(".example.test", &["127.0.0.7:25"]),
            route("Example.Test", &["127.0.0.6:25"]),
            route("[127.0.0.5]", &["127.0.0.4:25"]),
        ],
        PORT,
    );
    let first = |d: &str| routes.route_for(d).map(|h| h[0].to_string());
    assert_eq!(first("example.test").unwrap(), "127.0.0.6:25");
    assert_eq!(first("a.example.test").unwrap(), "127.0.0.7:25");
    assert_eq!(first("b.a.example.test").unwrap(), "127.0.0.7:25");
    assert_eq!(first("other.test").unwrap(), "127.0.0.8:25");
    assert_eq!(
        first("test").unwrap(),
        "127.0.0.9:25",
        ".test is subdomains only"
    );
    assert_eq!(first("xexample.test").unwrap(), "127.0.0.8:25");
    assert_eq!(first("example.org").unwrap(), "127.0.0.9:25");
    assert_eq!(first("[127.0.0.5]").unwrap(), "127.0.0.4:25");
    assert_eq!(
        first("[127.0.0.1]").unwrap(),
        "127.0.0.9:25",
        "* takes literals"
    );
    let no_default = Routes::new(&[route(".example.test", &["127.0.0.7:25"])], PORT);
    assert!(no_default.route_for("example.test").is_none());
    assert!(no_default.route_for("[127.0.0.5]").is_none());
    assert!(no_default.route_for("a.example.test").is_some());
}

// ---------------------------------------------------------------------------
// Whole destinations.

#[test]
fn mx_hosts_in_preference_order_with_each_hosts_addresses() {
    let mut zone = Zone::new();
    zone.mx("example.test", 20, "mx3.example.test")
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 10, "mx2.example.test")
        .a("mx1.example.test", "127.0.0.2")
        .aaaa("mx1.example.test", "::2")
        .a("mx2.example.test", "127.0.0.3")
        .a("mx3.example.test", "127.0.0.4");
    let (_dns, r) = start(zone);
    let mut orders = std::collections::HashSet::new();
    for seed in 0..32 {
        let routes = Routes::new(&[], PORT).with_shuffle_seed(seed);
        let d = block_on(routes.destination("example.test", &r)).unwrap();
        assert_eq!(d.source, Source::Mx);
        let a = addrs(&d);
        assert_eq!(a.len(), 4);
        assert_eq!(a[3], "127.0.0.4:2525", "preference 20 last");
        // mx1's IPv4 then its IPv6 address, next to each other.
        let i = a.iter().position(|x| x == "127.0.0.2:2525").unwrap();
        assert_eq!(a[i + 1], "[::2]:2525");
        assert_eq!(d.targets[3].mx_preference, Some(20));
        assert_eq!(d.targets[0].mx_preference, Some(10));
        orders.insert(d.targets[0].host_name.clone());
    }
    assert_eq!(
        orders.len(),
        2,
        "equal preferences are shuffled: {orders:?}"
    );
}

#[test]
fn ip_order_decides_the_family_order() {
    let mut zone = Zone::new();
    zone.mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", "127.0.0.2")
        .aaaa("mx.example.test", "::1");
    let dns = TestDns::start(zone);
    let routes = Routes::new(&[], PORT);
    let expect = [
        (IpOrder::Ipv4First, vec!["127.0.0.2:2525", "[::1]:2525"]),
        (IpOrder::Ipv6First, vec!["[::1]:2525", "127.0.0.2:2525"]),
        (IpOrder::Ipv4Only, vec!["127.0.0.2:2525"]),
        (IpOrder::Ipv6Only, vec!["[::1]:2525"]),
    ];
    for (order, want) in expect {
        let r = resolver_with(&dns, |c| c.ip_order = order);
        let d = block_on(routes.destination("example.test", &r)).unwrap();
        assert_eq!(addrs(&d), want, "{order:?}");
    }
}

#[test]
fn no_mx_falls_back_to_the_domains_own_addresses() {
    let mut zone = Zone::new();
    zone.a("plain.test", "127.0.0.2").aaaa("plain.test", "::1");
    let (_dns, r) = start(zone);
    let d = block_on(Routes::new(&[], PORT).destination("plain.test", &r)).unwrap();
    assert_eq!(d.source, Source::ImplicitMx);
    assert_eq!(addrs(&d), vec!["127.0.0.2:2525", "[::1]:2525"]);
    assert_eq!(
        hosts(&d),
        vec![
            ("plain.test".into(), Some(0)),
            ("plain.test".into(), Some(0))
        ]
    );
}

#[test]
fn no_mx_and_no_address_is_permanent() {
    let mut zone = Zone::new();
    zone.txt("textonly.test", "v=spf1 -all");
    let (_dns, r) = start(zone);
    let e = block_on(Routes::new(&[], PORT).destination("textonly.test", &r)).unwrap_err();
    assert_eq!(
        e,
        DnsError::NoAddress {
            domain: "textonly.test".into()
        }
    );
    assert!(e.is_permanent());
}

#[test]
fn null_mx_fails_with_5_1_10() {
    let mut zone = Zone::new();
    zone.null_mx("nomail.test").a("nomail.test", "127.0.0.2");
    let (dns, r) = start(zone);
    let e = block_on(Routes::new(&[], PORT).destination("nomail.test", &r)).unwrap_err();
    assert_eq!(
        e,
        DnsError::NullMx {
            domain: "nomail.test".into()
        }
    );
    let reply = e.reply();
    assert_eq!(reply.code(), 556);
    assert_eq!(reply.enhanced(), Some(EnhancedCode::new(5, 1, 10)));
    assert!(e.is_permanent());
    assert_eq!(dns.queries_for("nomail.test", "A"), 0, "no implicit MX");
}

#[test]
fn nxdomain_fails_with_5_1_2() {
    let (_dns, r) = start(Zone::new());
    let e = block_on(Routes::new(&[], PORT).destination("nowhere.test", &r)).unwrap_err();
    assert_eq!(e.reply().code(), 550);
    assert_eq!(e.enhanced(), EnhancedCode::new(5, 1, 2));
    assert!(e.is_permanent());
}

#[test]
fn servfail_and_timeout_are_temporary() {
    let mut zone = Zone::new();
    zone.servfail("broken.test").timeout("slow.test");
    let (dns, r) = start(zone);
    let short = resolver_with(&dns, |c| c.timeout_ms = 300);
    let routes = Routes::new(&[], PORT);
    for (domain, r) in [("broken.test", &r), ("slow.test", &short)] {
        let e = block_on(routes.destination(domain, r)).unwrap_err();
        assert!(matches!(e, DnsError::Temporary { .. }), "{domain}: {e:?}");
        assert_eq!(e.enhanced(), EnhancedCode::new(4, 4, 3));
        assert!(!e.is_permanent());
    }
}

#[test]
fn mx_hosts_without_address_are_skipped() {
    let mut zone = Zone::new();
    zone.mx("example.test", 10, "noaddr.example.test")
        .mx("example.test", 20, "gone.example.test")
        .mx("example.test", 30, "broken.example.test")
        .mx("example.test", 40, "192.0.2.1")
        .mx("example.test", 50, "good.example.test")
        .txt("noaddr.example.test", "exists")
        .a("broken.example.test", "127.0.0.9")
        .servfail("broken.example.test")
        .a("good.example.test", "127.0.0.2");
    let (dns, r) = start(zone);
    let d = block_on(Routes::new(&[], PORT).destination("example.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.2:2525"]);
    assert_eq!(hosts(&d), vec![("good.example.test".into(), Some(50))]);
    // A failed host makes the list short-lived.
    assert!(d.valid_until <= Instant::now() + PARTIAL_ANSWER_TTL);
    assert_eq!(
        dns.queries_for("192.0.2.1", "A"),
        0,
        "IP exchange not asked"
    );
}

#[test]
fn no_mx_host_with_an_address_is_temporary() {
    let mut zone = Zone::new();
    zone.mx("example.test", 10, "noaddr.example.test")
        .mx("example.test", 20, "gone.example.test")
        .txt("noaddr.example.test", "exists")
        .mx("ipmx.test", 10, "192.0.2.1")
        .mx("mixed-null.test", 0, ".")
        .mx("mixed-null.test", 10, "gone.mixed-null.test");
    let (_dns, r) = start(zone);
    let routes = Routes::new(&[], PORT);
    let e = block_on(routes.destination("example.test", &r)).unwrap_err();
    match &e {
        DnsError::NoUsableMx { domain, detail } => {
            assert_eq!(domain, "example.test");
            assert!(
                detail.contains("noaddr.example.test: no address"),
                "{detail}"
            );
            assert!(detail.contains("gone.example.test: NXDOMAIN"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.is_permanent());
    assert_eq!(e.reply().code(), 451);
    assert_eq!(e.enhanced(), EnhancedCode::new(4, 4, 4));
    for domain in ["ipmx.test", "mixed-null.test"] {
        let e = block_on(routes.destination(domain, &r)).unwrap_err();
        assert!(matches!(e, DnsError::NoUsableMx { .. }), "{domain}: {e:?}");
    }
}

#[test]
fn cname_at_the_domain_is_followed() {
    let mut zone = Zone::new();
    zone.cname("alias.test", "real.test")
        .mx("real.test", 10, "mx.real.test")
        .cname("mx.real.test", "box.real.test")
        .a("box.real.test", "127.0.0.2");
    let (_dns, r) = start(zone);
    let d = block_on(Routes::new(&[], PORT).destination("alias.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.2:2525"]);
    assert_eq!(d.targets[0].host_name, "mx.real.test");
}

#[test]
fn max_mx_hosts_limits_the_lookups() {
    let mut zone = Zone::new();
    for i in 0..5u16 {
        let host = format!("mx{i}.example.test");
        zone.mx("example.test", 10 * (i + 1), &host)
            .a(&host, &format!("127.0.0.{}", i + 2));
    }
    let dns = TestDns::start(zone);
    let r = resolver_with(&dns, |c| c.max_mx_hosts = 2);
    let d = block_on(Routes::new(&[], PORT).destination("example.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.2:2525", "127.0.0.3:2525"]);
    assert_eq!(dns.queries_for("mx4.example.test", "A"), 0);
}

#[test]
fn duplicate_addresses_are_tried_once() {
    let mut zone = Zone::new();
    zone.mx("example.test", 10, "a.example.test")
        .mx("example.test", 20, "b.example.test")
        .a("a.example.test", "127.0.0.2")
        .a("b.example.test", "127.0.0.2")
        .a("b.example.test", "127.0.0.3");
    let (_dns, r) = start(zone);
    let d = block_on(Routes::new(&[], PORT).destination("example.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.2:2525", "127.0.0.3:2525"]);
}

#[test]
fn valid_until_is_the_smallest_ttl_and_destinations_are_cached() {
    let mut zone = Zone::new();
    zone.ttl(600)
        .mx("example.test", 10, "mx.example.test")
        .ttl(60)
        .a("mx.example.test", "127.0.0.2")
        .ttl(900)
        .aaaa("mx.example.test", "::1");
    let (dns, r) = start(zone);
    let routes = Routes::new(&[], PORT);
    let before = Instant::now();
    let d = block_on(routes.destination("example.test", &r)).unwrap();
    let ttl = d.valid_until - before;
    assert!(
        ttl > Duration::from_secs(50) && ttl <= Duration::from_secs(61),
        "{ttl:?}"
    );
    let asked = dns.queries();
    assert_eq!(asked, 3, "MX, A, AAAA");
    let again = block_on(routes.destination("example.test", &r)).unwrap();
    assert_eq!(again.targets, d.targets);
    assert_eq!(dns.queries(), asked, "second destination served from cache");
}

#[test]
fn routes_override_dns() {
    let mut zone = Zone::new();
    zone.mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", "127.0.0.9")
        .a("relay.internal.test", "127.0.0.5")
        .aaaa("relay.internal.test", "::1");
    let (dns, r) = start(zone);
    let routes = Routes::new(
        &[
            route("example.test", &["127.0.0.2:2526", "127.0.0.3"]),
            route(".sub.test", &["relay.internal.test:2600"]),
            route("*", &["[::1]:2700"]),
        ],
        PORT,
    );
    let d = block_on(routes.destination("Example.Test", &r)).unwrap();
    assert_eq!(d.source, Source::Route);
    assert_eq!(addrs(&d), vec!["127.0.0.2:2526", "127.0.0.3:2525"]);
    assert_eq!(hosts(&d)[0], ("127.0.0.2".into(), None));
    assert_eq!(dns.queries_for("example.test", "MX"), 0, "no MX lookup");

    let d = block_on(routes.destination("a.sub.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.5:2600", "[::1]:2600"]);
    assert_eq!(hosts(&d)[0], ("relay.internal.test".into(), None));
    assert_eq!(
        dns.queries_for("relay.internal.test", "MX"),
        0,
        "A/AAAA only"
    );

    let d = block_on(routes.destination("anything.else", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["[::1]:2700"]);
    assert_eq!(dns.queries_for("anything.else", "MX"), 0);
}

#[test]
fn route_host_without_address_defers() {
    let (_dns, r) = start(Zone::new());
    let routes = Routes::new(
        &[
            route("a.test", &["missing.test:25"]),
            route("b.test", &["missing.test:25", "127.0.0.2:25"]),
        ],
        PORT,
    );
    let e = block_on(routes.destination("a.test", &r)).unwrap_err();
    assert!(matches!(e, DnsError::NoRouteAddress { .. }), "{e:?}");
    assert!(!e.is_permanent(), "our configuration never bounces mail");
    let d = block_on(routes.destination("b.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.2:25"]);
}

#[test]
fn address_literals_go_direct_without_dns() {
    let (dns, r) = start(Zone::new());
    let routes = Routes::new(&[], PORT);
    let d = block_on(routes.destination("[127.0.0.2]", &r)).unwrap();
    assert_eq!(d.source, Source::Literal);
    assert_eq!(addrs(&d), vec!["127.0.0.2:2525"]);
    assert_eq!(hosts(&d), vec![("[127.0.0.2]".into(), None)]);
    let d = block_on(routes.destination("[ipv6:::1]", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["[::1]:2525"]);
    let e = block_on(routes.destination("[tag:content]", &r)).unwrap_err();
    assert!(matches!(e, DnsError::InvalidDomain { .. }), "{e:?}");
    assert!(e.is_permanent());
    assert_eq!(dns.queries(), 0);

    // A literal route, and the smarthost, take literals.
    let routes = Routes::new(
        &[
            route("[127.0.0.2]", &["127.0.0.3:26"]),
            route("*", &["127.0.0.4:27"]),
        ],
        PORT,
    );
    let d = block_on(routes.destination("[127.0.0.2]", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.3:26"]);
    let d = block_on(routes.destination("[127.0.0.5]", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.4:27"]);
}

#[test]
fn international_domains_are_looked_up_as_a_labels() {
    let mut zone = Zone::new();
    zone.mx("xn--bcher-kva.test", 10, "mx.xn--bcher-kva.test")
        .a("mx.xn--bcher-kva.test", "127.0.0.2");
    let (_dns, r) = start(zone);
    let routes = Routes::new(&[route("xn--caf-dma.test", &["127.0.0.7:25"])], PORT);
    let d = block_on(routes.destination("bücher.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.2:2525"]);
    let d = block_on(routes.destination("café.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.7:25"]);
}

#[test]
fn from_config_uses_the_delivery_port() {
    let c = Config::parse(
        "[delivery]\nport = 2600\n[[route]]\ndomain = \"a.test\"\nhosts = [\"127.0.0.2\"]\n",
    )
    .unwrap();
    let routes = Routes::from_config(&c);
    assert_eq!(routes.port(), 2600);
    let (_dns, r) = start(Zone::new());
    let d = block_on(routes.destination("a.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.2:2600"]);
    let d = block_on(routes.destination("[127.0.0.3]", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.3:2600"]);
}

#[test]
fn a_partly_failing_aaaa_keeps_the_ipv4_targets() {
    let mut zone = Zone::new();
    zone.mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", "127.0.0.2")
        .behaviour("mx.example.test", Some("AAAA"), Behaviour::Timeout);
    let dns = TestDns::start(zone);
    let r = resolver_with(&dns, |c| c.timeout_ms = 2000);
    let d = block_on(Routes::new(&[], PORT).destination("example.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.2:2525"]);
    assert!(d.valid_until <= Instant::now() + PARTIAL_ANSWER_TTL);
}

// ---------------------------------------------------------------------------
// Mail loops: targets that are Sluice itself.

#[test]
fn mx_hosts_at_or_above_our_own_preference_are_dropped() {
    let mut zone = Zone::new();
    zone.mx("backup.test", 10, "primary.backup.test")
        .mx("backup.test", 20, "us.backup.test")
        .mx("backup.test", 20, "peer.backup.test")
        .mx("backup.test", 30, "last.backup.test")
        .a("primary.backup.test", "127.0.0.2")
        .a("us.backup.test", "127.0.0.1")
        .a("peer.backup.test", "127.0.0.3")
        .a("last.backup.test", "127.0.0.4")
        .mx("best.test", 10, "us.backup.test")
        .mx("best.test", 20, "primary.backup.test")
        .a("self.test", "127.0.0.1");
    let (_dns, r) = start(zone);
    let us: SocketAddr = format!("127.0.0.1:{PORT}").parse().unwrap();
    let routes = Routes::new(&[], PORT).with_own_addresses(&[us]);
    // We are a backup MX (20): only the better one (10) is tried.
    let d = block_on(routes.destination("backup.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.2:2525"]);
    // We are the best MX: the mail loops (Postfix bounces it the same way).
    for domain in ["best.test", "self.test"] {
        let e = block_on(routes.destination(domain, &r)).unwrap_err();
        assert_eq!(
            e,
            DnsError::LoopsBack {
                domain: domain.into()
            }
        );
        assert!(e.is_permanent());
        assert_eq!(
            e.reply().to_string(),
            format!("554 5.4.6 Mail for {domain} loops back to myself")
        );
    }
    // The same host on another port is not us.
    let other: SocketAddr = "127.0.0.1:2600".parse().unwrap();
    let d = block_on(
        Routes::new(&[], PORT)
            .with_own_addresses(&[other])
            .destination("self.test", &r),
    )
    .unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.1:2525"]);
}

#[test]
fn route_hosts_that_are_ourselves_are_dropped() {
    let (_dns, r) = start(Zone::new());
    // Listening on every address: any local address on that port is us.
    let any: SocketAddr = "0.0.0.0:2525".parse().unwrap();
    let routes = Routes::new(
        &[
            route("loop.test", &["127.0.0.5:2525"]),
            route("half.test", &["127.0.0.5:2525", "127.0.0.6:2526"]),
            route("[127.0.0.7]", &["127.0.0.7:2525"]),
        ],
        PORT,
    )
    .with_own_addresses(&[any]);
    let e = block_on(routes.destination("loop.test", &r)).unwrap_err();
    assert_eq!(e.enhanced(), EnhancedCode::new(5, 4, 6));
    let d = block_on(routes.destination("half.test", &r)).unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.6:2526"]);
    assert!(block_on(routes.destination("[127.0.0.7]", &r)).is_err());
    // Without our addresses (port 0 is not known here) nothing is dropped.
    let unknown: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let d = block_on(
        Routes::new(&[route("loop.test", &["127.0.0.1:2525"])], PORT)
            .with_own_addresses(&[unknown])
            .destination("loop.test", &r),
    )
    .unwrap();
    assert_eq!(addrs(&d), vec!["127.0.0.1:2525"]);
}
