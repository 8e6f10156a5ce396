//! DNS resolution for delivery: MX and A/AAAA lookups (RFC 5321 §5.1,
//! RFC 7505) through hickory-resolver running on one dedicated thread.
//!
//! hickory-resolver needs a tokio runtime and `Send` sockets, so it cannot run
//! on a glommio shard. One thread (`sluice-dns`) owns a tokio
//! `current_thread` runtime and the hickory resolver (and its cache). A
//! [`Resolver`] is a cheap handle (`Clone + Send + Sync`): each lookup sends a
//! request over an unbounded channel and returns a [`Pending`] future that
//! resolves through a oneshot. Nothing in the handle is tied to an executor,
//! so glommio tasks (or any executor) can await it: the oneshot wakes the
//! waiting task's waker from the DNS thread.
//!
//! Per request the cost is one small allocation for the oneshot, one channel
//! push and one task spawned on the DNS thread; a cached answer is served by
//! hickory's cache without network I/O (see docs/benchmarks.md, `## DNS`).
//!
//! The thread ends when the last handle is dropped (the request channel
//! closes) or on [`Resolver::stop`]. Lookups still in flight then fail with
//! [`DnsError::Stopped`] (temporary).
//!
//! This module only asks questions and classifies the answers; the RFC 5321
//! policy (sorting, shuffling, implicit MX, null MX, routes) is in
//! [`super::route`].

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::Instrument;

use crate::config::{DnsConfig, IpOrder};
use crate::smtp::reply::{EnhancedCode, Reply};

/// DNS queries answered (counter; labels `type` = `mx`/`a`/`aaaa`, `result`
/// = `ok`, `nodata`, `nxdomain`, `servfail`, `refused`, `timeout`, `error`).
/// Cache hits count too: this is what delivery asked, not what went on the
/// wire. Failures are the rows with `result` other than `ok`.
pub const DNS_LOOKUPS: &str = "sluice_dns_lookups_total";
/// Time to answer one query, cache hits included (histogram, seconds; label
/// `type`).
pub const DNS_LOOKUP_LATENCY: &str = "sluice_dns_lookup_seconds";

/// How long a partial answer (one address family or one MX host failed
/// temporarily, the rest worked) may be reused: long enough not to re-ask a
/// broken server for every message, short enough to pick the failed part up
/// again soon.
pub const PARTIAL_ANSWER_TTL: Duration = Duration::from_secs(30);

/// Why mail for a domain cannot be routed now (temporary) or ever
/// (permanent). Carries what the DSN and the recipient state need:
/// [`DnsError::reply`] / [`DnsError::enhanced`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The domain does not exist (NXDOMAIN): permanent, `550 5.1.2`.
    #[error("Host or domain name not found: {domain} (NXDOMAIN)")]
    NoSuchDomain {
        /// The domain (or host) asked for.
        domain: String,
    },
    /// The domain publishes a null MX (RFC 7505): permanent, `556 5.1.10`.
    #[error("Domain {domain} does not accept mail (null MX, RFC 7505)")]
    NullMx {
        /// The domain.
        domain: String,
    },
    /// The domain exists but has neither MX nor A/AAAA records: permanent,
    /// `550 5.1.2`.
    #[error("Domain {domain} has no MX and no address records")]
    NoAddress {
        /// The domain.
        domain: String,
    },
    /// The domain has MX records but none of its hosts has a usable address
    /// now: temporary, `451 4.4.4` (like Postfix: an MX host without address
    /// records may be a transient mistake of the domain's operator).
    #[error("No MX host of {domain} has a usable address ({detail})")]
    NoUsableMx {
        /// The domain.
        domain: String,
        /// What went wrong per host (bounded).
        detail: String,
    },
    /// No host of a configured `[[route]]` has an address now: temporary,
    /// `451 4.4.4` (our configuration, never the recipient's fault).
    #[error("No host of the route for {domain} has an address ({detail})")]
    NoRouteAddress {
        /// The domain.
        domain: String,
        /// What went wrong per host (bounded).
        detail: String,
    },
    /// SERVFAIL, REFUSED, a timeout or another failure to get an answer:
    /// temporary, `451 4.4.3`.
    #[error("DNS lookup of {name} {qtype} failed: {reason}")]
    Temporary {
        /// The name asked for.
        name: String,
        /// `MX`, `A` or `AAAA`.
        qtype: &'static str,
        /// `SERVFAIL`, `REFUSED`, `timeout` or a short description.
        reason: String,
    },
    /// The destination is not something DNS can answer for (a general
    /// address literal, a name that is not a valid DNS name): permanent,
    /// `550 5.1.2`.
    #[error("Cannot route to {domain}: {reason}")]
    InvalidDomain {
        /// The destination as given.
        domain: String,
        /// Why.
        reason: String,
    },
    /// The destination's best host is Sluice itself (one of `[server]
    /// listen`): delivering would hand the mail back to us in a loop.
    /// Permanent, `554 5.4.6` (Postfix: "mail for X loops back to myself").
    #[error("Mail for {domain} loops back to myself")]
    LoopsBack {
        /// The destination.
        domain: String,
    },
    /// The resolver thread has stopped (shutdown): temporary, `451 4.4.3`.
    #[error("DNS resolver stopped")]
    Stopped,
}

impl DnsError {
    /// True for failures that will not go away by retrying (the recipient
    /// fails at once); false for those that defer.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DnsError::NoSuchDomain { .. }
                | DnsError::NullMx { .. }
                | DnsError::NoAddress { .. }
                | DnsError::InvalidDomain { .. }
                | DnsError::LoopsBack { .. }
        )
    }

    /// The RFC 3463 status for the DSN and the recipient state.
    pub fn enhanced(&self) -> EnhancedCode {
        match self {
            DnsError::NoSuchDomain { .. }
            | DnsError::NoAddress { .. }
            | DnsError::InvalidDomain { .. } => EnhancedCode::new(5, 1, 2),
            DnsError::NullMx { .. } => EnhancedCode::new(5, 1, 10),
            DnsError::LoopsBack { .. } => EnhancedCode::new(5, 4, 6),
            DnsError::NoUsableMx { .. } | DnsError::NoRouteAddress { .. } => {
                EnhancedCode::new(4, 4, 4)
            }
            DnsError::Temporary { .. } | DnsError::Stopped => EnhancedCode::new(4, 4, 3),
        }
    }

    /// The reply code: `556` for a null MX (RFC 7505 §4.3), `554` for a
    /// routing loop, `550` for other permanent failures, `451` for temporary
    /// ones.
    pub fn code(&self) -> u16 {
        match self {
            DnsError::NullMx { .. } => 556,
            DnsError::LoopsBack { .. } => 554,
            e if e.is_permanent() => 550,
            _ => 451,
        }
    }

    /// The failure as an SMTP reply (our own, not a remote server's), for
    /// the recipient state and the DSN's Diagnostic-Code.
    pub fn reply(&self) -> Reply {
        let text: String = self
            .to_string()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        Reply::new(self.code(), self.enhanced(), text)
    }
}

/// Why the resolver could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DnsSetupError {
    /// `/etc/resolv.conf` could not be read or parsed (and `[dns]
    /// nameservers` is empty).
    #[error("cannot read the system resolver configuration (/etc/resolv.conf): {0}")]
    SystemConfig(String),
    /// Neither `[dns] nameservers` nor the system configuration name a server.
    #[error("no DNS nameservers: set [dns] nameservers or fix /etc/resolv.conf")]
    NoNameservers,
    /// The thread or its runtime could not be created.
    #[error("cannot start the DNS thread: {0}")]
    Thread(#[from] std::io::Error),
    /// hickory-resolver refused the configuration.
    #[error("cannot build the DNS resolver: {0}")]
    Build(String),
}

/// One MX record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxRecord {
    /// Lower is preferred.
    pub preference: u16,
    /// The exchange host name, ASCII-lowercased without the trailing dot;
    /// the root name (a null MX's exchange) is `"."`.
    pub exchange: String,
}

impl MxRecord {
    /// Whether the exchange is the root name `"."` (RFC 7505 null MX).
    pub fn is_root(&self) -> bool {
        self.exchange == "."
    }
}

/// The MX records of a domain, as published (not sorted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxLookup {
    /// The records; empty when the domain exists but has no MX (NODATA):
    /// then its own A/AAAA are used (implicit MX).
    pub records: Vec<MxRecord>,
    /// Until when the answer may be reused (TTL, clamped by `[dns]`).
    pub valid_until: Instant,
}

/// The addresses of a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressLookup {
    /// A records in the order the server gave them (empty with `ipv6_only`).
    pub ipv4: Vec<Ipv4Addr>,
    /// AAAA records in the order the server gave them (empty with
    /// `ipv4_only`).
    pub ipv6: Vec<Ipv6Addr>,
    /// Until when the answer may be reused.
    pub valid_until: Instant,
}

impl AddressLookup {
    /// True when the host has no address of the families asked for.
    pub fn is_empty(&self) -> bool {
        self.ipv4.is_empty() && self.ipv6.is_empty()
    }

    /// All addresses in the order `ip_order` asks for.
    pub fn ordered(&self, order: IpOrder) -> Vec<IpAddr> {
        let v4 = self.ipv4.iter().map(|a| IpAddr::V4(*a));
        let v6 = self.ipv6.iter().map(|a| IpAddr::V6(*a));
        match order {
            IpOrder::Ipv6First => v6.chain(v4).collect(),
            _ => v4.chain(v6).collect(),
        }
    }
}

/// A lookup in flight: the request was sent when the lookup method was
/// called; awaiting only waits for the answer. `Send`, `Unpin`, and not tied
/// to any executor.
#[must_use = "a lookup does nothing useful unless its answer is awaited"]
pub struct Pending<T> {
    state: PendingState<T>,
}

enum PendingState<T> {
    Waiting(oneshot::Receiver<Result<T, DnsError>>),
    Done(Option<DnsError>),
}

impl<T> Future for Pending<T> {
    type Output = Result<T, DnsError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.state {
            PendingState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|answer| answer.unwrap_or(Err(DnsError::Stopped))),
            PendingState::Done(err) => Poll::Ready(Err(err.take().unwrap_or(DnsError::Stopped))),
        }
    }
}

impl<T> Pending<T> {
    fn failed(err: DnsError) -> Self {
        Pending {
            state: PendingState::Done(Some(err)),
        }
    }
}

enum Request {
    Mx {
        name: Name,
        reply: oneshot::Sender<Result<MxLookup, DnsError>>,
    },
    Addresses {
        name: Name,
        reply: oneshot::Sender<Result<AddressLookup, DnsError>>,
    },
    Stop,
}

/// Handle to the DNS thread. Clone it freely (one per shard is fine); the
/// thread lives until the last clone is dropped or [`Resolver::stop`].
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::UnboundedSender<Request>,
    thread: Mutex<Option<JoinHandle<()>>>,
    ip_order: IpOrder,
    max_mx_hosts: usize,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("ip_order", &self.inner.ip_order)
            .field("max_mx_hosts", &self.inner.max_mx_hosts)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Starts the DNS thread with `config`. With no `nameservers` the
    /// servers of `/etc/resolv.conf` are used (its options are not: timeouts
    /// and the rest come from `config`). `/etc/hosts` is never consulted.
    pub fn new(config: &DnsConfig) -> Result<Resolver, DnsSetupError> {
        let resolver_config = resolver_config(config)?;
        let opts = resolver_opts(config);
        let bounds = TtlBounds::from_config(config);
        let ip_order = config.ip_order;
        let max_in_flight = config.max_in_flight;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sluice-dns".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(DnsSetupError::Thread(e)));
                        return;
                    }
                };
                let built = {
                    let _guard = runtime.enter();
                    TokioResolver::builder_with_config(
                        resolver_config,
                        TokioRuntimeProvider::default(),
                    )
                    .with_options(opts)
                    .build()
                };
                let hickory = match built {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(DnsSetupError::Build(e.to_string())));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let worker = Arc::new(Worker {
                    hickory,
                    bounds,
                    ip_order,
                    in_flight: Semaphore::new(max_in_flight),
                });
                runtime.block_on(serve(rx, worker));
                // Dropping the runtime cancels lookups still in flight; their
                // oneshot senders drop and the waiting callers see `Stopped`.
                drop(runtime);
                tracing::debug!("DNS thread stopped");
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(DnsSetupError::Build("the DNS thread exited".into()));
            }
        }
        Ok(Resolver {
            inner: Arc::new(Inner {
                tx,
                thread: Mutex::new(Some(thread)),
                ip_order,
                max_mx_hosts: config.max_mx_hosts,
            }),
        })
    }

    /// A resolver without a thread, for a process whose delivery is
    /// disabled: nothing looks anything up, and a broken
    /// `/etc/resolv.conf` must not stop a relay that only spools. Every
    /// lookup fails at once with [`DnsError::Stopped`].
    pub fn disabled(config: &DnsConfig) -> Resolver {
        // The receiver is dropped: sends fail, which `send` maps to Stopped.
        let (tx, _) = mpsc::unbounded_channel();
        Resolver {
            inner: Arc::new(Inner {
                tx,
                thread: Mutex::new(None),
                ip_order: config.ip_order,
                max_mx_hosts: config.max_mx_hosts,
            }),
        }
    }

    /// The MX records of `domain` (no trailing dot needed; U-labels are
    /// converted to A-labels). Errors: [`DnsError::NoSuchDomain`] for
    /// NXDOMAIN, [`DnsError::Temporary`] for SERVFAIL / REFUSED / timeouts,
    /// [`DnsError::InvalidDomain`] for names DNS cannot carry. NODATA is an
    /// empty record list, not an error. The request is sent now.
    pub fn mx(&self, domain: &str) -> Pending<MxLookup> {
        match fqdn(domain) {
            Ok(name) => self.send(|reply| Request::Mx { name, reply }),
            Err(e) => Pending::failed(e),
        }
    }

    /// The A and AAAA records of `host` (only the families `ip_order`
    /// wants, asked in parallel). An empty answer is not an error; NXDOMAIN
    /// is [`DnsError::NoSuchDomain`]. When one family fails temporarily but
    /// the other has addresses, those are returned (valid for at most
    /// [`PARTIAL_ANSWER_TTL`]). The request is sent now.
    pub fn addresses(&self, host: &str) -> Pending<AddressLookup> {
        match fqdn(host) {
            Ok(name) => self.send(|reply| Request::Addresses { name, reply }),
            Err(e) => Pending::failed(e),
        }
    }

    /// `[dns] ip_order`.
    pub fn ip_order(&self) -> IpOrder {
        self.inner.ip_order
    }

    /// `[dns] max_mx_hosts`.
    pub fn max_mx_hosts(&self) -> usize {
        self.inner.max_mx_hosts
    }

    /// Stops the DNS thread now (for every clone) and waits for it to end.
    /// Lookups in flight and later ones fail with [`DnsError::Stopped`].
    /// Blocks briefly: call it from the control thread at shutdown, not from
    /// a shard.
    pub fn stop(&self) {
        let _ = self.inner.tx.send(Request::Stop);
        let handle = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }

    fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, DnsError>>) -> Request,
    ) -> Pending<T> {
        let (reply, rx) = oneshot::channel();
        match self.inner.tx.send(make(reply)) {
            Ok(()) => Pending {
                state: PendingState::Waiting(rx),
            },
            Err(_) => Pending::failed(DnsError::Stopped),
        }
    }

    /// Takes the thread's join handle (tests check that dropping the last
    /// handle ends the thread).
    #[cfg(test)]
    pub(crate) fn take_thread(&self) -> Option<JoinHandle<()>> {
        self.inner.thread.lock().unwrap().take()
    }
}

/// `domain` as a fully qualified DNS name.
fn fqdn(domain: &str) -> Result<Name, DnsError> {
    let invalid = |reason: String| DnsError::InvalidDomain {
        domain: domain.to_owned(),
        reason,
    };
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if trimmed.is_empty() || trimmed.starts_with('[') || trimmed.parse::<IpAddr>().is_ok() {
        return Err(invalid("not a domain name".into()));
    }
    let mut name = Name::from_utf8(trimmed).map_err(|e| invalid(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name)
}

/// A name as we show and compare it: ASCII, lowercase, no trailing dot;
/// the root is `"."`.
fn display_name(name: &Name) -> String {
    if name.is_root() {
        return ".".to_owned();
    }
    let mut s = name.to_ascii();
    if s.ends_with('.') {
        s.pop();
    }
    s.make_ascii_lowercase();
    s
}

fn resolver_config(config: &DnsConfig) -> Result<ResolverConfig, DnsSetupError> {
    if config.nameservers.is_empty() {
        let (system, _opts) = hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| DnsSetupError::SystemConfig(e.to_string()))?;
        if system.name_servers().is_empty() {
            return Err(DnsSetupError::NoNameservers);
        }
        // Only the servers: search domains never apply (we ask FQDNs).
        return Ok(ResolverConfig::from_name_servers(
            system.name_servers().to_vec(),
        ));
    }
    let servers = config
        .nameservers
        .iter()
        .map(|addr| {
            // UDP first; a truncated answer is asked again over TCP.
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        })
        .collect();
    Ok(ResolverConfig::from_name_servers(servers))
}

fn resolver_opts(config: &DnsConfig) -> ResolverOpts {
    let mut opts = ResolverOpts::default();
    opts.timeout = config.timeout();
    // hickory counts retries after the first try.
    opts.attempts = config.attempts.saturating_sub(1);
    opts.cache_size = config.cache_size;
    opts.use_hosts_file = ResolveHosts::Never;
    let min = Duration::from_secs(config.min_ttl);
    opts.positive_min_ttl = Some(min);
    opts.negative_min_ttl = Some(min);
    opts.positive_max_ttl = Some(Duration::from_secs(config.max_ttl));
    opts.negative_max_ttl = Some(Duration::from_secs(config.negative_max_ttl));
    opts.num_concurrent_reqs = config.parallel_nameservers;
    // hickory refuses ("busy") more than this many queries at once on one
    // TCP connection (default 32); our own limit is max_in_flight.
    opts.max_active_requests = config.max_in_flight.max(32);
    opts.edns0 = true;
    opts
}

/// TTL clamps applied to what we report as `valid_until` (hickory applies
/// the same bounds to its cache; a negative answer served from its cache
/// still carries the unclamped SOA TTL, hence this).
#[derive(Clone, Copy, Debug)]
struct TtlBounds {
    min: Duration,
    max: Duration,
    negative_max: Duration,
}

impl TtlBounds {
    fn from_config(config: &DnsConfig) -> Self {
        TtlBounds {
            min: Duration::from_secs(config.min_ttl),
            max: Duration::from_secs(config.max_ttl),
            negative_max: Duration::from_secs(config.negative_max_ttl),
        }
    }

    fn positive(&self, now: Instant, valid_until: Instant) -> Instant {
        let ttl = valid_until.saturating_duration_since(now);
        now + ttl.clamp(self.min, self.max)
    }

    fn negative(&self, now: Instant, ttl_secs: Option<u32>) -> Instant {
        let ttl = Duration::from_secs(u64::from(ttl_secs.unwrap_or(0)));
        now + ttl.clamp(self.min, self.negative_max)
    }
}

/// What one query came back with.
enum Answer {
    Records(Vec<RData>, Instant),
    NoData(Instant),
    NxDomain,
    Failed(&'static str, String),
}

impl Answer {
    fn metric_label(&self) -> &'static str {
        match self {
            Answer::Records(..) => "ok",
            Answer::NoData(_) => "nodata",
            Answer::NxDomain => "nxdomain",
            Answer::Failed(label, _) => label,
        }
    }
}

struct Worker {
    hickory: TokioResolver,
    bounds: TtlBounds,
    ip_order: IpOrder,
    in_flight: Semaphore,
}

async fn serve(mut rx: mpsc::UnboundedReceiver<Request>, worker: Arc<Worker>) {
    while let Some(request) = rx.recv().await {
        let worker = worker.clone();
        match request {
            Request::Stop => break,
            Request::Mx { name, reply } => {
                tokio::spawn(async move {
                    if reply.is_closed() {
                        return; // the caller gave up before we started
                    }
                    let answer = worker.mx(name).await;
                    let _ = reply.send(answer);
                });
            }
            Request::Addresses { name, reply } => {
                tokio::spawn(async move {
                    if reply.is_closed() {
                        return;
                    }
                    let answer = worker.addresses(name).await;
                    let _ = reply.send(answer);
                });
            }
        }
    }
}

impl Worker {
    async fn mx(&self, name: Name) -> Result<MxLookup, DnsError> {
        match self.query(&name, RecordType::MX).await {
            Answer::Records(data, valid_until) => Ok(MxLookup {
                records: data
                    .into_iter()
                    .filter_map(|d| match d {
                        RData::MX(mx) => Some(MxRecord {
                            preference: mx.preference,
                            exchange: display_name(&mx.exchange),
                        }),
                        _ => None,
                    })
                    .collect(),
                valid_until,
            }),
            Answer::NoData(valid_until) => Ok(MxLookup {
                records: Vec::new(),
                valid_until,
            }),
            Answer::NxDomain => Err(DnsError::NoSuchDomain {
                domain: display_name(&name),
            }),
            Answer::Failed(_, reason) => Err(DnsError::Temporary {
                name: display_name(&name),
                qtype: "MX",
                reason,
            }),
        }
    }

    async fn addresses(&self, name: Name) -> Result<AddressLookup, DnsError> {
        let v4 = async {
            if self.ip_order.wants_ipv4() {
                Some(self.query(&name, RecordType::A).await)
            } else {
                None
            }
        };
        let v6 = async {
            if self.ip_order.wants_ipv6() {
                Some(self.query(&name, RecordType::AAAA).await)
            } else {
                None
            }
        };
        let (v4, v6) = tokio::join!(v4, v6);
        let now = Instant::now();
        let mut out = AddressLookup {
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            valid_until: now + self.bounds.max,
        };
        let mut failure = None;
        let mut nxdomain = false;
        for (answer, qtype) in [(v4, "A"), (v6, "AAAA")] {
            match answer {
                None => {}
                Some(Answer::Records(data, until)) => {
                    out.valid_until = out.valid_until.min(until);
                    for d in data {
                        match d {
                            RData::A(a) if usable(IpAddr::V4(a.0)) => out.ipv4.push(a.0),
                            RData::AAAA(a) if usable(IpAddr::V6(a.0)) => out.ipv6.push(a.0),
                            _ => {}
                        }
                    }
                }
                Some(Answer::NoData(until)) => out.valid_until = out.valid_until.min(until),
                Some(Answer::NxDomain) => nxdomain = true,
                Some(Answer::Failed(_, reason)) => {
                    failure.get_or_insert((qtype, reason));
                }
            }
        }
        match failure {
            Some(_) if !out.is_empty() => {
                out.valid_until = out.valid_until.min(now + PARTIAL_ANSWER_TTL);
                Ok(out)
            }
            Some((qtype, reason)) => Err(DnsError::Temporary {
                name: display_name(&name),
                qtype,
                reason,
            }),
            None if nxdomain && out.is_empty() => Err(DnsError::NoSuchDomain {
                domain: display_name(&name),
            }),
            None => Ok(out),
        }
    }

    /// One query through hickory (and its cache), with the concurrency
    /// limit, a debug span, and metrics.
    async fn query(&self, name: &Name, qtype: RecordType) -> Answer {
        let type_label = match qtype {
            RecordType::MX => "mx",
            RecordType::A => "a",
            _ => "aaaa",
        };
        let span = tracing::debug_span!("dns_lookup", name = %name, qtype = %qtype);
        async {
            // The semaphore is never closed, so acquire cannot fail; waiting
            // here is the queue beyond max_in_flight.
            let _permit = self.in_flight.acquire().await.ok();
            let started = Instant::now();
            let result = self.hickory.lookup(name.clone(), qtype).await;
            let now = Instant::now();
            let answer = match result {
                Ok(lookup) => {
                    let data: Vec<RData> = lookup
                        .answers()
                        .iter()
                        .filter(|r| r.record_type() == qtype)
                        .map(|r| r.data.clone())
                        .collect();
                    if data.is_empty() {
                        // Only CNAMEs: the chain ends without a record of the
                        // type, which is NODATA at the chain's end.
                        Answer::NoData(self.bounds.negative(now, None))
                    } else {
                        Answer::Records(data, self.bounds.positive(now, lookup.valid_until()))
                    }
                }
                Err(e) => self.classify(now, e),
            };
            let elapsed = started.elapsed();
            let label = answer.metric_label();
            metrics::counter!(DNS_LOOKUPS, "type" => type_label, "result" => label).increment(1);
            metrics::histogram!(DNS_LOOKUP_LATENCY, "type" => type_label)
                .record(elapsed.as_secs_f64());
            tracing::debug!(
                result = label,
                elapsed_us = elapsed.as_micros() as u64,
                "answered"
            );
            answer
        }
        .instrument(span)
        .await
    }

    fn classify(&self, now: Instant, error: NetError) -> Answer {
        match error {
            NetError::Dns(HickoryDnsError::NoRecordsFound(NoRecords {
                response_code: ResponseCode::NXDomain,
                ..
            })) => Answer::NxDomain,
            NetError::Dns(HickoryDnsError::NoRecordsFound(NoRecords { negative_ttl, .. })) => {
                Answer::NoData(self.bounds.negative(now, negative_ttl))
            }
            NetError::Dns(HickoryDnsError::ResponseCode(ResponseCode::ServFail)) => {
                Answer::Failed("servfail", "SERVFAIL".into())
            }
            NetError::Dns(HickoryDnsError::ResponseCode(ResponseCode::Refused)) => {
                Answer::Failed("refused", "REFUSED".into())
            }
            NetError::Timeout => Answer::Failed("timeout", "timeout".into()),
            other => Answer::Failed("error", other.to_string()),
        }
    }
}

/// Addresses mail can never be delivered to (RFC 5321 does not say; every
/// MTA drops these): unspecified, multicast, and the IPv4 broadcast address.
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// The test DNS server, shared with the integration tests (the file lives in
/// tests/common so both can use it).
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../tests/common/dns.rs"]
pub(crate) mod test_server;

#[cfg(test)]
mod tests;
