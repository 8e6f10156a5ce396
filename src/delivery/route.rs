//! Where mail for a destination goes: static `[[route]]`s first, then the
//! domain's MX hosts (RFC 5321 §5.1, RFC 7505), as an ordered list of
//! [`Target`]s to try.
//!
//! Order of precedence for a destination (the queue key: an
//! ASCII-lowercased domain, or an address literal like `[192.0.2.1]`):
//! 1. a route for exactly that domain (or that address literal);
//! 2. the route with the longest `.suffix` the domain ends with (never for
//!    address literals);
//! 3. the `*` route (a smarthost, like Postfix's relayhost; it takes address
//!    literals too);
//! 4. an address literal goes straight to its address, no DNS;
//! 5. the MX records: sorted by preference, equal preferences shuffled, at
//!    most `[dns] max_mx_hosts` hosts, each host's addresses in `[dns]
//!    ip_order`; no MX (NODATA) means the domain's own A/AAAA (implicit MX,
//!    preference 0).
//!
//! Failure policy (the [`DnsError`] variants say the reply):
//! - NXDOMAIN for the domain: permanent `5.1.2`. A null MX (a single MX
//!   whose exchange is `.`, RFC 7505): permanent `556 5.1.10`. No MX and no
//!   A/AAAA: permanent `5.1.2`.
//! - SERVFAIL, REFUSED, timeouts: temporary `4.4.3`.
//! - MX hosts without an address (NODATA, NXDOMAIN or a failed lookup) are
//!   skipped; when none is left the failure is temporary `4.4.4`, as Postfix
//!   does (RFC 5321 leaves it open; a broken MX host is usually fixed soon).
//! - An MX exchange that is an IP address written as a name (`MX 10
//!   192.0.2.1.`) is not a host name (RFC 7505 §3, RFC 2181 §10.3) and is
//!   skipped like a host without address (Exim's default, `allow_mx_to_ip =
//!   false`). A `.` exchange among other MX records is skipped too.
//! - A route host name without an address: skipped; none left is temporary
//!   `4.4.4` (our configuration, never the recipient's fault).
//! - Targets that are Sluice itself (an address:port of `[server] listen`;
//!   with an unspecified listen address, any local address on that port):
//!   for MX hosts, as Postfix does, every host with a preference at or
//!   above our own is dropped; for routes and literals, our addresses are
//!   dropped. None left: permanent `554 5.4.6` ("loops back to myself"),
//!   instead of relaying to ourselves until the message expires.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::dns::{AddressLookup, DnsError, MxRecord, Pending, Resolver, PARTIAL_ANSWER_TTL};
use tracing::Instrument;

use crate::config::{Config, RouteConfig, RouteHost, RouteHostName};

/// Destinations that could not be resolved (counter; label `reason`:
/// `nxdomain`, `null_mx`, `no_address`, `no_usable_mx`, `no_route_address`,
/// `temporary`, `invalid`, `stopped`).
pub const DESTINATION_FAILURES: &str = "sluice_dns_destination_failures_total";
/// Time to resolve a destination, all lookups included (histogram, seconds;
/// label `source`: `route`, `mx`, `implicit_mx`, `literal`).
pub const DESTINATION_LATENCY: &str = "sluice_dns_destination_seconds";

/// How long a destination made only of configured IP addresses (a route, an
/// address literal) may be reused: it never changes while we run.
const STATIC_TTL: Duration = Duration::from_secs(86_400);

/// One address to try, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The host's name for logs, the DSN's Remote-MTA and TLS later: the MX
    /// exchange, the route host as configured, or the address literal.
    pub host_name: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// The MX preference (0 for an implicit MX); None for routes and
    /// address literals.
    pub mx_preference: Option<u16>,
}

/// Where the targets came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A `[[route]]`.
    Route,
    /// The domain's MX records.
    Mx,
    /// The domain's own A/AAAA records (no MX).
    ImplicitMx,
    /// An address literal (`user@[192.0.2.1]`).
    Literal,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Route => "route",
            Source::Mx => "mx",
            Source::ImplicitMx => "implicit_mx",
            Source::Literal => "literal",
        }
    }
}

/// The answer for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Addresses to try, in order; never empty, no address twice.
    pub targets: Vec<Target>,
    /// Until when this answer may be reused (the smallest TTL among the
    /// records used, clamped by `[dns]`; at most [`PARTIAL_ANSWER_TTL`] from
    /// now when part of the answer failed temporarily).
    pub valid_until: Instant,
    /// Where the targets came from.
    pub source: Source,
}

/// The static routes plus the MX port: resolves destinations. Cheap to
/// clone (shared inside), `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Routes {
    inner: Arc<RoutesInner>,
}

#[derive(Clone, Debug)]
struct RoutesInner {
    exact: HashMap<String, Vec<RouteHost>>,
    /// Keyed by the suffix with its leading dot (`.example.test`).
    suffix: HashMap<String, Vec<RouteHost>>,
    literal: HashMap<IpAddr, Vec<RouteHost>>,
    default: Option<Vec<RouteHost>>,
    port: u16,
    shuffle: Shuffle,
    /// Our own SMTP listen addresses (port 0 left out: its real port is
    /// not known here). A target among them hands mail back to us.
    own: Vec<SocketAddr>,
}

/// How MX records of equal preference are ordered.
#[derive(Clone, Debug)]
enum Shuffle {
    /// Randomly (the thread's RNG), as RFC 5321 §5.1 asks, to spread load.
    Random,
    /// From a seeded RNG: reproducible, for tests.
    Seeded(Arc<Mutex<StdRng>>),
}

impl Routes {
    /// Routes from `[[route]]` (validated by [`Config::validate`]) with
    /// `port` (`[delivery] port`) for MX hosts, address literals and route
    /// hosts without a port.
    pub fn new(routes: &[RouteConfig], port: u16) -> Routes {
        let mut inner = RoutesInner {
            exact: HashMap::new(),
            suffix: HashMap::new(),
            literal: HashMap::new(),
            default: None,
            port,
            shuffle: Shuffle::Random,
            own: Vec::new(),
        };
        for r in routes {
            let d = r.domain.to_ascii_lowercase();
            let hosts = r.hosts.clone();
            if d == "*" {
                inner.default = Some(hosts);
            } else if d.starts_with('[') {
                if let Some(ip) = parse_address_literal(&d) {
                    inner.literal.insert(ip, hosts);
                }
            } else if d.starts_with('.') {
                inner.suffix.insert(d, hosts);
            } else {
                inner.exact.insert(d, hosts);
            }
        }
        Routes {
            inner: Arc::new(inner),
        }
    }

    /// Routes from a whole configuration (`[[route]]`, `[delivery] port`,
    /// and `[server] listen` as the addresses that are ourselves).
    pub fn from_config(config: &Config) -> Routes {
        Routes::new(&config.routes, config.delivery.port).with_own_addresses(&config.server.listen)
    }

    /// The same routes, knowing that `listen` (our SMTP addresses) is
    /// ourselves: see the module documentation (mail loops).
    pub fn with_own_addresses(&self, listen: &[SocketAddr]) -> Routes {
        let mut inner = (*self.inner).clone();
        inner.own = listen.iter().copied().filter(|a| a.port() != 0).collect();
        Routes {
            inner: Arc::new(inner),
        }
    }

    /// Whether connecting to `addr` would reach this Sluice.
    fn is_self(&self, addr: SocketAddr) -> bool {
        self.inner.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == addr.ip() || (own.ip().is_unspecified() && is_local_ip(addr.ip())))
        })
    }

    /// Drops the targets that are ourselves (see the module documentation);
    /// none left is [`DnsError::LoopsBack`].
    fn drop_self(&self, domain: &str, mut dest: Destination) -> Result<Destination, DnsError> {
        let Some(first) = dest.targets.iter().position(|t| self.is_self(t.addr)) else {
            return Ok(dest);
        };
        match (dest.source, dest.targets[first].mx_preference) {
            (Source::Mx | Source::ImplicitMx, Some(ours)) => dest
                .targets
                .retain(|t| t.mx_preference.is_some_and(|p| p < ours)),
            _ => dest.targets.retain(|t| !self.is_self(t.addr)),
        }
        if dest.targets.is_empty() {
            return Err(DnsError::LoopsBack {
                domain: domain.to_owned(),
            });
        }
        Ok(dest)
    }

    /// The same routes with equal-preference MX records shuffled by an RNG
    /// seeded with `seed` (reproducible orders for tests).
    pub fn with_shuffle_seed(&self, seed: u64) -> Routes {
        let mut inner = (*self.inner).clone();
        inner.shuffle = Shuffle::Seeded(Arc::new(Mutex::new(StdRng::seed_from_u64(seed))));
        Routes {
            inner: Arc::new(inner),
        }
    }

    /// The port used for MX hosts.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// The configured route for `destination` (a lowercase domain or address
    /// literal), by precedence: exact, longest `.suffix`, `*`.
    pub fn route_for(&self, destination: &str) -> Option<&[RouteHost]> {
        let inner = &*self.inner;
        if destination.starts_with('[') {
            return parse_address_literal(destination)
                .and_then(|ip| inner.literal.get(&ip))
                .or(inner.default.as_ref())
                .map(Vec::as_slice);
        }
        if let Some(hosts) = inner.exact.get(destination) {
            return Some(hosts);
        }
        if !inner.suffix.is_empty() {
            // Every ".rest" of the domain, longest first.
            for (i, _) in destination.match_indices('.') {
                if let Some(hosts) = inner.suffix.get(&destination[i..]) {
                    return Some(hosts);
                }
            }
        }
        inner.default.as_deref()
    }

    /// Resolves `destination` (the queue's key: a domain, ASCII-lowercased,
    /// or an address literal such as `[192.0.2.1]` / `[ipv6:2001:db8::1]`)
    /// to the ordered addresses to try. See the module documentation for the
    /// precedence and the failure policy.
    pub async fn destination(
        &self,
        destination: &str,
        resolver: &Resolver,
    ) -> Result<Destination, DnsError> {
        let started = Instant::now();
        let span = tracing::debug_span!("destination", destination = %destination);
        let result = self
            .resolve(destination, resolver)
            .instrument(span.clone())
            .await;
        let _entered = span.enter();
        match &result {
            Ok(d) => {
                metrics::histogram!(DESTINATION_LATENCY, "source" => d.source.label())
                    .record(started.elapsed().as_secs_f64());
                tracing::debug!(
                    targets = d.targets.len(),
                    source = d.source.label(),
                    "resolved"
                );
            }
            Err(e) => {
                metrics::counter!(DESTINATION_FAILURES, "reason" => failure_label(e)).increment(1);
                tracing::debug!(error = %e, "not resolved");
            }
        }
        result
    }

    async fn resolve(
        &self,
        destination: &str,
        resolver: &Resolver,
    ) -> Result<Destination, DnsError> {
        let found = self.lookup(destination, resolver).await?;
        if self.inner.own.is_empty() {
            return Ok(found);
        }
        self.drop_self(destination, found)
    }

    async fn lookup(
        &self,
        destination: &str,
        resolver: &Resolver,
    ) -> Result<Destination, DnsError> {
        let trimmed = destination.strip_suffix('.').unwrap_or(destination);
        if trimmed.starts_with('[') {
            let ip = parse_address_literal(trimmed).ok_or_else(|| DnsError::InvalidDomain {
                domain: destination.to_owned(),
                reason: "unsupported address literal".into(),
            })?;
            if let Some(hosts) = self.route_for(trimmed) {
                return self.route_targets(trimmed, hosts, resolver).await;
            }
            return Ok(Destination {
                targets: vec![Target {
                    host_name: trimmed.to_owned(),
                    addr: SocketAddr::new(ip, self.inner.port),
                    mx_preference: None,
                }],
                valid_until: Instant::now() + STATIC_TTL,
                source: Source::Literal,
            });
        }
        let domain = normalise_domain(trimmed).ok_or_else(|| DnsError::InvalidDomain {
            domain: destination.to_owned(),
            reason: "not a valid domain name".into(),
        })?;
        if let Some(hosts) = self.route_for(&domain) {
            return self.route_targets(&domain, hosts, resolver).await;
        }
        self.mx_targets(&domain, resolver).await
    }

    async fn route_targets(
        &self,
        domain: &str,
        hosts: &[RouteHost],
        resolver: &Resolver,
    ) -> Result<Destination, DnsError> {
        let now = Instant::now();
        // Send every name lookup first; they run in parallel on the DNS thread.
        let pending: Vec<Option<Pending<AddressLookup>>> = hosts
            .iter()
            .map(|h| match &h.host {
                RouteHostName::Ip(_) => None,
                RouteHostName::Name(n) => Some(resolver.addresses(n)),
            })
            .collect();
        let mut targets = Vec::new();
        let mut valid_until = now + STATIC_TTL;
        let mut problems = Problems::default();
        for (host, pending) in hosts.iter().zip(pending) {
            let port = host.port.unwrap_or(self.inner.port);
            match (&host.host, pending) {
                (RouteHostName::Ip(ip), _) => push_target(
                    &mut targets,
                    Target {
                        host_name: ip.to_string(),
                        addr: SocketAddr::new(*ip, port),
                        mx_preference: None,
                    },
                ),
                (RouteHostName::Name(name), Some(pending)) => match pending.await {
                    Ok(found) if !found.is_empty() => {
                        valid_until = valid_until.min(found.valid_until);
                        for ip in found.ordered(resolver.ip_order()) {
                            push_target(
                                &mut targets,
                                Target {
                                    host_name: name.clone(),
                                    addr: SocketAddr::new(ip, port),
                                    mx_preference: None,
                                },
                            );
                        }
                    }
                    Ok(_) => problems.note(name, "no address"),
                    Err(e) => {
                        if !e.is_permanent() {
                            valid_until = valid_until.min(now + PARTIAL_ANSWER_TTL);
                        }
                        problems.note(name, &short_reason(&e));
                    }
                },
                (RouteHostName::Name(_), None) => unreachable!("a lookup was sent per name"),
            }
        }
        if targets.is_empty() {
            return Err(DnsError::NoRouteAddress {
                domain: domain.to_owned(),
                detail: problems.text(),
            });
        }
        Ok(Destination {
            targets,
            valid_until,
            source: Source::Route,
        })
    }

    async fn mx_targets(&self, domain: &str, resolver: &Resolver) -> Result<Destination, DnsError> {
        let mx = resolver.mx(domain).await?;
        let port = self.inner.port;
        let order = resolver.ip_order();
        if mx.records.is_empty() {
            // RFC 5321 §5.1: no MX, the domain itself is the implicit MX
            // with preference 0.
            let found = resolver.addresses(domain).await?;
            if found.is_empty() {
                return Err(DnsError::NoAddress {
                    domain: domain.to_owned(),
                });
            }
            let mut targets = Vec::new();
            for ip in found.ordered(order) {
                push_target(
                    &mut targets,
                    Target {
                        host_name: domain.to_owned(),
                        addr: SocketAddr::new(ip, port),
                        mx_preference: Some(0),
                    },
                );
            }
            return Ok(Destination {
                targets,
                valid_until: mx.valid_until.min(found.valid_until),
                source: Source::ImplicitMx,
            });
        }
        if is_null_mx(&mx.records) {
            return Err(DnsError::NullMx {
                domain: domain.to_owned(),
            });
        }
        let mut problems = Problems::default();
        let usable: Vec<MxRecord> = mx
            .records
            .into_iter()
            .filter(|r| {
                if r.is_root() {
                    problems.note(".", "null MX among other MX records");
                    false
                } else if r.exchange.parse::<IpAddr>().is_ok() {
                    problems.note(&r.exchange, "IP address instead of a host name");
                    false
                } else {
                    true
                }
            })
            .collect();
        let mut hosts = match &self.inner.shuffle {
            Shuffle::Random => order_mx(usable, &mut rand::thread_rng()),
            Shuffle::Seeded(rng) => {
                order_mx(usable, &mut *rng.lock().unwrap_or_else(|p| p.into_inner()))
            }
        };
        hosts.truncate(resolver.max_mx_hosts());
        let now = Instant::now();
        let pending: Vec<Pending<AddressLookup>> = hosts
            .iter()
            .map(|h| resolver.addresses(&h.exchange))
            .collect();
        let mut targets = Vec::new();
        let mut valid_until = mx.valid_until;
        for (host, pending) in hosts.iter().zip(pending) {
            match pending.await {
                Ok(found) if !found.is_empty() => {
                    valid_until = valid_until.min(found.valid_until);
                    for ip in found.ordered(order) {
                        push_target(
                            &mut targets,
                            Target {
                                host_name: host.exchange.clone(),
                                addr: SocketAddr::new(ip, port),
                                mx_preference: Some(host.preference),
                            },
                        );
                    }
                }
                Ok(_) => {
                    tracing::debug!(mx = %host.exchange, "MX host has no address; skipped");
                    problems.note(&host.exchange, "no address");
                }
                Err(e) => {
                    tracing::debug!(mx = %host.exchange, error = %e, "MX host lookup failed; skipped");
                    if !e.is_permanent() {
                        valid_until = valid_until.min(now + PARTIAL_ANSWER_TTL);
                    }
                    problems.note(&host.exchange, &short_reason(&e));
                }
            }
        }
        if targets.is_empty() {
            return Err(DnsError::NoUsableMx {
                domain: domain.to_owned(),
                detail: problems.text(),
            });
        }
        Ok(Destination {
            targets,
            valid_until,
            source: Source::Mx,
        })
    }
}

/// RFC 7505: a null MX is a single MX record whose exchange is the root.
/// (Its preference should be 0; any preference is taken as null MX, since a
/// `.` exchange can never be delivered to anyway.)
pub fn is_null_mx(records: &[MxRecord]) -> bool {
    records.len() == 1 && records[0].is_root()
}

/// Sorts MX records by preference (lowest first) and shuffles each run of
/// equal preference with `rng` (RFC 5321 §5.1). Duplicate exchanges keep
/// their best preference only.
pub fn order_mx<R: rand::Rng + ?Sized>(mut records: Vec<MxRecord>, rng: &mut R) -> Vec<MxRecord> {
    records.sort_by(|a, b| {
        a.preference
            .cmp(&b.preference)
            .then_with(|| a.exchange.cmp(&b.exchange))
    });
    let mut seen = std::collections::HashSet::new();
    records.retain(|r| seen.insert(r.exchange.clone()));
    let mut start = 0;
    while start < records.len() {
        let pref = records[start].preference;
        let end = records[start..]
            .iter()
            .position(|r| r.preference != pref)
            .map_or(records.len(), |n| start + n);
        records[start..end].shuffle(rng);
        start = end;
    }
    records
}

/// Parses an address literal as used in queue keys: `[192.0.2.1]` or
/// `[IPv6:2001:db8::1]` (tag case-insensitive). General literals
/// (`[tag:content]`) have no address: None.
pub fn parse_address_literal(text: &str) -> Option<IpAddr> {
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    match inner.split_once(':') {
        Some((tag, v6)) if tag.eq_ignore_ascii_case("ipv6") => {
            v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        }
        Some(_) => None,
        None => inner.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// The key used for routes and DNS: ASCII lowercase; a domain with U-labels
/// becomes its A-label form (IDNA), as DNS needs. None when it is not a
/// domain name at all.
fn normalise_domain(domain: &str) -> Option<String> {
    if domain.is_empty() {
        return None;
    }
    if domain.is_ascii() {
        return Some(domain.to_ascii_lowercase());
    }
    let name = hickory_resolver::proto::rr::Name::from_utf8(domain).ok()?;
    let mut ascii = name.to_ascii();
    if ascii.ends_with('.') {
        ascii.pop();
    }
    ascii.make_ascii_lowercase();
    Some(ascii)
}

/// Whether `ip` is an address of this machine: loopback, or one a socket
/// can be bound to (the kernel knows its own addresses; no interface list
/// to keep up to date).
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn push_target(targets: &mut Vec<Target>, target: Target) {
    if !targets.iter().any(|t| t.addr == target.addr) {
        targets.push(target);
    }
}

fn short_reason(e: &DnsError) -> String {
    match e {
        DnsError::NoSuchDomain { .. } => "NXDOMAIN".into(),
        DnsError::Temporary { qtype, reason, .. } => format!("{qtype} {reason}"),
        other => other.to_string(),
    }
}

fn failure_label(e: &DnsError) -> &'static str {
    match e {
        DnsError::NoSuchDomain { .. } => "nxdomain",
        DnsError::NullMx { .. } => "null_mx",
        DnsError::NoAddress { .. } => "no_address",
        DnsError::NoUsableMx { .. } => "no_usable_mx",
        DnsError::NoRouteAddress { .. } => "no_route_address",
        DnsError::Temporary { .. } => "temporary",
        DnsError::InvalidDomain { .. } => "invalid",
        DnsError::LoopsBack { .. } => "loop",
        DnsError::Stopped => "stopped",
    }
}

/// Per-host problems for the error detail, bounded so a domain with many
/// broken MX hosts does not make a huge reply.
#[derive(Default)]
struct Problems {
    items: Vec<String>,
    more: usize,
}

impl Problems {
    const SHOWN: usize = 4;

    fn note(&mut self, host: &str, what: &str) {
        if self.items.len() < Self::SHOWN {
            self.items.push(format!("{host}: {what}"));
        } else {
            self.more += 1;
        }
    }

    fn text(&self) -> String {
        let mut s = if self.items.is_empty() {
            "no MX host left".to_owned()
        } else {
            self.items.join("; ")
        };
        if self.more > 0 {
            s.push_str(&format!("; {} more", self.more));
        }
        s
    }
}

#[cfg(test)]
mod tests;
