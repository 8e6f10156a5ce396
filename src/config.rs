//! The TOML configuration: typed sections, embedded defaults, validation.
//!
//! Every key is documented in `docs/configuration.md`. Unknown keys are errors
//! (`deny_unknown_fields`) so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("invalid config{}: {}", path_suffix(.path), one_line(.message))]
    Parse {
        /// The file, if any.
        path: Option<PathBuf>,
        /// The parser's message.
        message: String,
    },
    /// The values parse but make no sense together.
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

/// The toml crate produces multi-line messages with a source excerpt; startup
/// errors must be one line, so the lines are joined.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "|")
        .collect::<Vec<_>>()
        .join(" ")
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: listeners, identity, limits.
    pub server: ServerConfig,
    /// `[relay]`: who may relay.
    pub relay: RelayConfig,
    /// `[spool]`: where accepted mail is stored.
    pub spool: SpoolConfig,
    /// `[metrics]`: Prometheus / admin HTTP endpoint.
    pub metrics: MetricsConfig,
    /// `[dns]`: resolver settings for delivery.
    pub dns: DnsConfig,
    /// `[delivery]`: queues, outbound connections, retries, bounces.
    pub delivery: DeliveryConfig,
    /// `[log]`: the accounting log.
    pub log: LogConfig,
    /// `[[route]]`: static routes that override MX lookups.
    #[serde(rename = "route", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
}

/// Most shards a server runs: spool ids name their shard in 8 bits.
pub const MAX_SHARDS: usize = 256;

/// `[server]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Addresses every shard binds (SO_REUSEPORT). Port 0 picks a free port
    /// once, shared by all shards.
    pub listen: Vec<SocketAddr>,
    /// Name in the greeting, EHLO and `Received:`.
    pub hostname: String,
    /// Number of shards (executors); 0 = one per CPU core.
    pub shards: usize,
    /// Largest accepted message in octets (advertised with SIZE).
    pub max_message_size: u64,
    /// Recipients per message.
    pub max_recipients: usize,
    /// Open connections over all shards.
    pub max_connections: usize,
    /// Open connections from one client IP.
    pub max_connections_per_ip: usize,
    /// Seconds to wait for a command line.
    pub command_timeout: u64,
    /// Seconds to wait for the next DATA bytes.
    pub data_timeout: u64,
    /// Seconds a session may last in total, however slowly it trickles.
    pub session_timeout: u64,
    /// Errors per session before it is closed.
    pub max_errors: u32,
    /// Longest command line in octets including CRLF.
    pub max_command_line: usize,
    /// Size of each session's read buffer in octets.
    pub read_buffer_size: usize,
    /// Memory each shard registers with io_uring, in octets.
    pub io_memory: usize,
    /// Seconds in-flight transactions get to finish after SIGTERM.
    pub shutdown_grace: u64,
    /// Milliseconds to hold the greeting; a client that talks first is
    /// disconnected as an early talker. 0 greets at once.
    pub greeting_delay_ms: u64,
    /// Longest message body line in octets, CRLF excluded (RFC 5322: 998).
    pub max_line_length: usize,
    /// What a bare CR or bare LF in a message body gets.
    pub line_endings: LineEndings,
}

/// Bare CR / bare LF in message bodies (`[server] line_endings`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LineEndings {
    /// Rewritten to CRLF in what is stored (as Postfix 3.9 does).
    #[default]
    Normalize,
    /// The message is refused with `550 5.6.0` after the final dot.
    Reject,
}

impl From<LineEndings> for crate::smtp::data::LineEndingPolicy {
    fn from(l: LineEndings) -> Self {
        match l {
            LineEndings::Normalize => Self::Normalize,
            LineEndings::Reject => Self::Reject,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            hostname: system_hostname(),
            shards: 0,
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_connections: 10_000,
            max_connections_per_ip: 100,
            command_timeout: 300,
            data_timeout: 180,
            session_timeout: 1800,
            max_errors: 20,
            max_command_line: 512,
            read_buffer_size: 64 * 1024,
            io_memory: 1024 * 1024,
            shutdown_grace: 30,
            greeting_delay_ms: 0,
            max_line_length: 998,
            line_endings: LineEndings::Normalize,
        }
    }
}

impl ServerConfig {
    /// The command timeout as a duration.
    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout)
    }
    /// The data timeout as a duration.
    pub fn data_timeout(&self) -> Duration {
        Duration::from_secs(self.data_timeout)
    }
    /// The total session deadline as a duration.
    pub fn session_timeout(&self) -> Duration {
        Duration::from_secs(self.session_timeout)
    }
    /// The shutdown grace period as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace)
    }
    /// The number of shards to run: the configured value, or the core count
    /// (at most [`MAX_SHARDS`]).
    pub fn effective_shards(&self) -> usize {
        if self.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(MAX_SHARDS)
        } else {
            self.shards
        }
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// `[relay]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Client networks allowed to relay; everyone else gets `554 5.7.1`.
    pub allow_networks: Vec<IpNet>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            allow_networks: vec![
                "127.0.0.0/8".parse().expect("literal network"),
                "::1/128".parse().expect("literal network"),
            ],
        }
    }
}

impl RelayConfig {
    /// Whether a client at `ip` may relay. IPv4-mapped IPv6 peers (seen on a
    /// dual-stack `[::]` listener) are checked as the IPv4 address they are.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow_networks.iter().any(|n| n.contains(&ip))
    }
}

/// `[spool]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// Octets that must stay free on the spool's file system; below that new
    /// messages get `452 4.3.1`. 0 disables the check.
    pub min_free_space: u64,
    /// Seconds a spool flush may take before its messages get `452 4.3.1`
    /// and new ones are refused until it completes.
    pub flush_timeout: u64,
    /// Milliseconds by which sled (envelopes, delivery state) may lag the
    /// body log, which alone makes an accepted message durable.
    pub index_flush_interval_ms: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: PathBuf::from("./sluice-spool"),
            min_free_space: 256 * 1024 * 1024,
            flush_timeout: 10,
            index_flush_interval_ms: 100,
        }
    }
}

impl SpoolConfig {
    /// The spool's runtime options.
    pub fn options(&self) -> crate::spool::SpoolOptions {
        crate::spool::SpoolOptions {
            min_free_space: self.min_free_space,
            flush_timeout: Duration::from_secs(self.flush_timeout),
            index_flush_interval: Duration::from_millis(self.index_flush_interval_ms),
        }
    }
}

/// `[metrics]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Whether the HTTP endpoint runs at all.
    pub enabled: bool,
    /// Address of the HTTP endpoint (`/metrics`, `/queue`, `/health`).
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9525)),
        }
    }
}

/// `[dns]`: the resolver used for MX and address lookups (see
/// [`crate::delivery::dns`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Recursive resolvers to ask (`"IP:port"`); empty = those of
    /// `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// Milliseconds to wait for one answer before the query counts as failed.
    pub timeout_ms: u64,
    /// Tries per query (first try included) before a temporary failure.
    pub attempts: usize,
    /// Answers kept in the cache (one per name and type).
    pub cache_size: u64,
    /// Lower bound in seconds on the time any answer is cached.
    pub min_ttl: u64,
    /// Upper bound in seconds on the time a positive answer is cached.
    pub max_ttl: u64,
    /// Upper bound in seconds on the time a negative answer (NXDOMAIN, no
    /// records of the type) is cached.
    pub negative_max_ttl: u64,
    /// Lookups resolved at the same time; more wait in line.
    pub max_in_flight: usize,
    /// Name servers asked in parallel for one query when several are listed.
    pub parallel_nameservers: usize,
    /// MX hosts (after sorting) whose addresses are looked up per domain.
    pub max_mx_hosts: usize,
    /// Which address families to use and in what order for each host.
    pub ip_order: IpOrder,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout_ms: 5000,
            attempts: 2,
            cache_size: 65_536,
            min_ttl: 0,
            max_ttl: 86_400,
            negative_max_ttl: 300,
            max_in_flight: 512,
            parallel_nameservers: 2,
            max_mx_hosts: 10,
            ip_order: IpOrder::Ipv4First,
        }
    }
}

impl DnsConfig {
    /// The per-query timeout as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        for ns in &self.nameservers {
            if ns.port() == 0 || ns.ip().is_unspecified() || ns.ip().is_multicast() {
                return Err(ConfigError::Invalid(format!(
                    "dns.nameservers: {ns} is not a usable server address"
                )));
            }
        }
        if self.timeout_ms < 10 || self.timeout_ms > 60_000 {
            return bad("dns.timeout_ms must be between 10 and 60000");
        }
        if !(1..=10).contains(&self.attempts) {
            return bad("dns.attempts must be between 1 and 10");
        }
        if self.max_ttl < self.min_ttl || self.negative_max_ttl < self.min_ttl {
            return bad("dns.max_ttl and dns.negative_max_ttl must be at least dns.min_ttl");
        }
        if self.max_ttl > u64::from(u32::MAX) {
            return bad("dns.max_ttl must fit in 32 bits (RFC 2181 8)");
        }
        if self.max_in_flight == 0 || self.max_in_flight > 65_536 {
            return bad("dns.max_in_flight must be between 1 and 65536");
        }
        if self.parallel_nameservers == 0 || self.parallel_nameservers > 16 {
            return bad("dns.parallel_nameservers must be between 1 and 16");
        }
        if self.max_mx_hosts == 0 || self.max_mx_hosts > 100 {
            return bad("dns.max_mx_hosts must be between 1 and 100");
        }
        Ok(())
    }
}

/// Address families to use for a host, and their order (`[dns] ip_order`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IpOrder {
    /// IPv4 addresses, then IPv6 addresses (the default: bulk receivers hold
    /// IPv6 senders to stricter rules, and IPv4 reputation is what most
    /// senders have built).
    Ipv4First,
    /// IPv6 addresses, then IPv4 addresses.
    Ipv6First,
    /// IPv4 only (no AAAA queries).
    Ipv4Only,
    /// IPv6 only (no A queries).
    Ipv6Only,
}

impl IpOrder {
    /// Whether A records are looked up at all.
    pub fn wants_ipv4(self) -> bool {
        self != IpOrder::Ipv6Only
    }
    /// Whether AAAA records are looked up at all.
    pub fn wants_ipv6(self) -> bool {
        self != IpOrder::Ipv4Only
    }
}

/// `[delivery]`: the outbound side (queues, connections, retries, bounces).
///
/// Durations are whole seconds, like the rest of the file; tests use 1 s
/// retry intervals and a few seconds of `max_age`, which whole seconds cover.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Deliver at all. `false` accepts and spools only (maintenance, or a
    /// hold queue while the outbound path is being fixed); nothing is lost,
    /// delivery resumes when it is turned back on and the server restarts.
    pub enabled: bool,
    /// TCP port of remote MX hosts (routes name their own ports).
    pub port: u16,
    /// Outbound connections per destination domain, on its owning shard.
    pub max_connections: usize,
    /// Messages one connection carries (RSET between) before it QUITs.
    pub max_messages_per_connection: usize,
    /// Recipients of one message batched into one transaction.
    pub max_recipients_per_transaction: usize,
    /// Seconds an unused pooled connection stays open waiting for work.
    pub idle_timeout: u64,
    /// Seconds for the TCP connect to one host.
    pub connect_timeout: u64,
    /// Seconds for the 220 greeting (RFC 5321 4.5.3.2.1: 5 minutes).
    pub greeting_timeout: u64,
    /// Seconds for the EHLO/HELO reply (same as the greeting's).
    pub helo_timeout: u64,
    /// Seconds for the MAIL reply (RFC 5321 4.5.3.2.2: 5 minutes).
    pub mail_timeout: u64,
    /// Seconds for each RCPT reply (RFC 5321 4.5.3.2.3: 5 minutes).
    pub rcpt_timeout: u64,
    /// Seconds for the 354 after DATA (RFC 5321 4.5.3.2.4: 2 minutes).
    pub data_timeout: u64,
    /// Seconds for each block of the body to be taken by the server
    /// (RFC 5321 4.5.3.2.5: 3 minutes).
    pub data_block_timeout: u64,
    /// Seconds for the reply to the final dot or last BDAT chunk
    /// (RFC 5321 4.5.3.2.6: 10 minutes).
    pub data_end_timeout: u64,
    /// Seconds for RSET and QUIT replies (not in RFC 5321; Postfix uses 20 s
    /// for RSET: a server that cannot answer RSET quickly is not worth reusing).
    pub rset_timeout: u64,
    /// Seconds before the first retry of a deferred recipient.
    pub retry_initial: u64,
    /// Longest gap between retries; the interval doubles up to this.
    pub retry_max: u64,
    /// Random spread of each retry interval: 0.2 = up to 20 % either way, so
    /// a burst deferred together does not come back together.
    pub retry_jitter: f64,
    /// Seconds after reception when a still-deferred recipient fails with
    /// `4.4.7` and is bounced.
    pub max_age: u64,
    /// With `RET=FULL`, bounces return the whole original message only up
    /// to this many octets; beyond it only its headers.
    pub bounce_size_limit: usize,
    /// Send bodies with `BDAT` (RFC 3030 CHUNKING) to servers that offer it;
    /// `false` always uses `DATA`.
    pub chunking: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            enabled: true,
            port: 25,
            max_connections: 32,
            max_messages_per_connection: 1000,
            max_recipients_per_transaction: 100,
            idle_timeout: 30,
            connect_timeout: 30,
            greeting_timeout: 300,
            helo_timeout: 300,
            mail_timeout: 300,
            rcpt_timeout: 300,
            data_timeout: 120,
            data_block_timeout: 180,
            data_end_timeout: 600,
            rset_timeout: 20,
            retry_initial: 300,
            retry_max: 4 * 3600,
            retry_jitter: 0.2,
            max_age: 5 * 24 * 3600,
            bounce_size_limit: 50_000,
            chunking: true,
        }
    }
}

impl DeliveryConfig {
    /// `idle_timeout` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout)
    }
    /// `connect_timeout` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout)
    }
    /// `retry_initial` as a duration.
    pub fn retry_initial(&self) -> Duration {
        Duration::from_secs(self.retry_initial)
    }
    /// `retry_max` as a duration.
    pub fn retry_max(&self) -> Duration {
        Duration::from_secs(self.retry_max)
    }
    /// `max_age` as a duration.
    pub fn max_age(&self) -> Duration {
        Duration::from_secs(self.max_age)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.port == 0 {
            return bad("delivery.port must not be 0");
        }
        if self.max_connections == 0
            || self.max_messages_per_connection == 0
            || self.max_recipients_per_transaction == 0
        {
            return bad("delivery.max_connections, max_messages_per_connection and max_recipients_per_transaction must be positive");
        }
        if self.max_recipients_per_transaction > u16::MAX as usize {
            return bad("delivery.max_recipients_per_transaction must be at most 65535");
        }
        if [
            self.connect_timeout,
            self.greeting_timeout,
            self.helo_timeout,
            self.mail_timeout,
            self.rcpt_timeout,
            self.data_timeout,
            self.data_block_timeout,
            self.data_end_timeout,
            self.rset_timeout,
        ]
        .contains(&0)
        {
            return bad("delivery timeouts must be positive");
        }
        if self.retry_initial == 0 || self.retry_max < self.retry_initial {
            return bad("delivery.retry_initial must be positive and at most retry_max");
        }
        if !(0.0..=1.0).contains(&self.retry_jitter) {
            return bad("delivery.retry_jitter must be between 0 and 1");
        }
        if self.max_age == 0 {
            return bad("delivery.max_age must be positive");
        }
        Ok(())
    }
}

/// `[log]`: the accounting log.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// JSON-lines file of every reception, delivery, deferral and bounce
    /// (appended; rotate with copytruncate or a restart). Empty = off.
    pub accounting_file: PathBuf,
}

/// One `[[route]]`: mail for `domain` goes to `hosts` instead of the
/// domain's MX hosts (like Postfix's transport map, or its relayhost for `*`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// What the route covers: an exact domain (`example.test`), every
    /// subdomain of one (`.example.test`), an address literal
    /// (`[192.0.2.1]`), or `*` for everything not matched otherwise.
    /// Case-insensitive.
    pub domain: String,
    /// Hosts to try in order.
    pub hosts: Vec<RouteHost>,
}

/// A `[[route]] hosts` entry: `"IP:port"`, `"[IPv6]:port"`, `"name:port"`, or
/// any of these without the port (then `[delivery] port` applies). Names are
/// resolved with A/AAAA lookups, never MX.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub struct RouteHost {
    /// The address or name.
    pub host: RouteHostName,
    /// The TCP port, if given.
    pub port: Option<u16>,
}

/// The host part of a [`RouteHost`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteHostName {
    /// An IP address: no DNS lookup.
    Ip(std::net::IpAddr),
    /// A host name (ASCII-lowercased, no trailing dot), resolved by A/AAAA.
    Name(String),
}

impl From<SocketAddr> for RouteHost {
    fn from(addr: SocketAddr) -> Self {
        RouteHost {
            host: RouteHostName::Ip(addr.ip()),
            port: Some(addr.port()),
        }
    }
}

impl std::str::FromStr for RouteHost {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        use std::net::IpAddr;
        let bad = |why: &str| Err(format!("route host {s:?}: {why}"));
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return bad("port 0");
            }
            return Ok(addr.into());
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(RouteHost {
                host: RouteHostName::Ip(ip),
                port: None,
            });
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            return match inner.parse::<std::net::Ipv6Addr>() {
                Ok(ip) => Ok(RouteHost {
                    host: RouteHostName::Ip(IpAddr::V6(ip)),
                    port: None,
                }),
                Err(_) => bad("not an IPv6 address in brackets"),
            };
        }
        let (name, port) = match s.rsplit_once(':') {
            Some((name, port)) => match port.parse::<u16>() {
                Ok(p) if p != 0 => (name, Some(p)),
                _ => return bad("invalid port"),
            },
            None => (s, None),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.parse::<IpAddr>().is_ok() {
            return bad("IPv6 addresses with a port need brackets: \"[::1]:25\"");
        }
        if !is_host_name(name) {
            return bad("not an IP address or host name");
        }
        Ok(RouteHost {
            host: RouteHostName::Name(name.to_ascii_lowercase()),
            port,
        })
    }
}

impl TryFrom<String> for RouteHost {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<RouteHost> for String {
    fn from(h: RouteHost) -> String {
        h.to_string()
    }
}

impl std::fmt::Display for RouteHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.host, self.port) {
            (RouteHostName::Ip(ip), Some(p)) => SocketAddr::new(*ip, p).fmt(f),
            (RouteHostName::Ip(std::net::IpAddr::V6(ip)), None) => write!(f, "[{ip}]"),
            (RouteHostName::Ip(ip), None) => ip.fmt(f),
            (RouteHostName::Name(n), Some(p)) => write!(f, "{n}:{p}"),
            (RouteHostName::Name(n), None) => f.write_str(n),
        }
    }
}

/// An LDH host name of at most 253 octets with labels of 1..=63 octets
/// (underscores allowed: they occur in real internal names).
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl RouteConfig {
    /// Checks the domain pattern (the hosts were checked when parsed).
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: &str| {
            Err(ConfigError::Invalid(format!(
                "[[route]] domain {:?}: {why}",
                self.domain
            )))
        };
        if self.hosts.is_empty() {
            return bad("needs at least one host");
        }
        let d = self.domain.as_str();
        if d == "*" {
            return Ok(());
        }
        if d.starts_with('[') {
            return match crate::delivery::route::parse_address_literal(d) {
                Some(_) => Ok(()),
                None => bad("not an IPv4 or IPv6 address literal"),
            };
        }
        let name = d.strip_prefix('.').unwrap_or(d);
        if name.ends_with('.') || !is_host_name(name) {
            return bad("must be a domain, .domain (its subdomains), [address literal] or *");
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: Some(path.to_owned()),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: None,
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if s.listen.is_empty() {
            return bad("server.listen must name at least one address");
        }
        if s.hostname.is_empty() || s.hostname.contains(char::is_whitespace) {
            return bad("server.hostname must be a non-empty name without spaces");
        }
        if s.shards > MAX_SHARDS {
            // Spool ids carry the shard in 8 bits: shard 256 would reuse
            // shard 0's ids, and a duplicate id overwrites a stored message.
            return bad("server.shards must be at most 256");
        }
        if s.max_message_size == 0 {
            return bad("server.max_message_size must be positive");
        }
        if s.max_recipients == 0 {
            return bad("server.max_recipients must be positive");
        }
        if s.max_connections == 0 || s.max_connections_per_ip == 0 {
            return bad("server.max_connections and max_connections_per_ip must be positive");
        }
        if s.command_timeout == 0 || s.data_timeout == 0 || s.session_timeout == 0 {
            return bad("server timeouts must be positive");
        }
        if s.max_command_line < 512 {
            return bad("server.max_command_line must be at least 512 (RFC 5321 4.5.3.1.4)");
        }
        if s.max_line_length < 998 {
            return bad("server.max_line_length must be at least 998 (RFC 5322 2.1.1)");
        }
        if s.read_buffer_size < 1024 || s.read_buffer_size > 16 * 1024 * 1024 {
            return bad("server.read_buffer_size must be between 1024 and 16777216");
        }
        if s.io_memory < 64 * 1024 {
            return bad("server.io_memory must be at least 65536");
        }
        if self.spool.path.as_os_str().is_empty() {
            return bad("spool.path must not be empty");
        }
        self.delivery.validate()?;
        if self.spool.flush_timeout == 0 {
            return bad("spool.flush_timeout must be positive");
        }
        if self.spool.index_flush_interval_ms > 60_000 {
            return bad("spool.index_flush_interval_ms must be at most 60000");
        }
        self.dns.validate()?;
        let mut seen = std::collections::HashSet::new();
        for r in &self.routes {
            r.validate()?;
            if !seen.insert(r.domain.to_ascii_lowercase()) {
                return Err(ConfigError::Invalid(format!(
                    "[[route]] domain {:?} is listed twice",
                    r.domain
                )));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML (defaults filled in, shards
    /// resolved), as printed by `sluice check-config`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.server.shards = self.server.effective_shards();
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.spool.path, PathBuf::from("./sluice-spool"));
        assert!(c.relay.allows("127.0.0.1".parse().unwrap()));
        assert!(c.relay.allows("::ffff:127.0.0.9".parse().unwrap()));
        assert!(!c.relay.allows("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn fixed_keys_parse() {
        let c = Config::parse(
            r#"
            [server]
            listen = ["127.0.0.1:0", "[::1]:2526"]
            hostname = "mx.example.test"
            shards = 2
            max_message_size = 1000
            max_recipients = 3
            [relay]
            allow_networks = ["10.0.0.0/8"]
            [spool]
            path = "/tmp/x"
            [metrics]
            listen = "127.0.0.1:0"
            [dns]
            nameservers = ["127.0.0.1:5353"]
            [delivery]
            port = 2525
            [[route]]
            domain = "example.test"
            hosts = ["127.0.0.2:2526"]
            "#,
        )
        .unwrap();
        assert_eq!(c.server.shards, 2);
        assert_eq!(c.routes.len(), 1);
        assert!(!c.relay.allows("127.0.0.1".parse().unwrap()));
        // The printed effective config parses back to the same thing.
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }

    /// Every key of the effective config is documented, and the annotated
    /// production example is valid.
    #[test]
    fn body_policy_keys_parse() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.line_endings, LineEndings::Normalize);
        assert_eq!(c.server.max_line_length, 998);
        let c =
            Config::parse("[server]\nline_endings = \"reject\"\nmax_line_length = 2000\n").unwrap();
        assert_eq!(c.server.line_endings, LineEndings::Reject);
        assert_eq!(c.server.max_line_length, 2000);
        assert!(Config::parse("[server]\nline_endings = \"keep\"\n").is_err());
        assert!(Config::parse("[server]\nmax_line_length = 500\n").is_err());
    }

    /// Regression: up to 1024 shards were allowed, but spool ids hold the
    /// shard in 8 bits, so shard 256 would have reused shard 0's ids.
    #[test]
    fn shards_fit_in_spool_ids() {
        assert!(Config::parse("[server]\nshards = 256\n").is_ok());
        assert!(Config::parse("[server]\nshards = 257\n").is_err());
        assert!(Config::default().server.effective_shards() <= MAX_SHARDS);
    }

    #[test]
    fn documented_and_example_valid() {
        let docs = include_str!("../docs/configuration.md");
        let mut c = Config::default();
        c.routes.push(RouteConfig {
            domain: "x".into(),
            hosts: vec!["127.0.0.1:25".parse().unwrap()],
        });
        for line in c.to_toml().lines() {
            let line = line.trim();
            if line.starts_with('[') {
                let section = line.trim_matches(|ch| ch == '[' || ch == ']');
                assert!(
                    docs.contains(&format!("`[{section}]`"))
                        || docs.contains(&format!("`[[{section}]]`")),
                    "{section}"
                );
            } else if let Some((key, _)) = line.split_once(" = ") {
                assert!(
                    docs.contains(&format!("| `{key}` |")),
                    "key {key} undocumented"
                );
            }
        }
        let example = Config::parse(include_str!("../deploy/sluice.toml")).unwrap();
        assert_eq!(example.spool.path, PathBuf::from("/var/lib/sluice/spool"));
    }

    #[test]
    fn dns_keys_parse_and_round_trip() {
        let c = Config::parse(
            r#"
            [dns]
            nameservers = ["127.0.0.1:5353", "[::1]:53"]
            timeout_ms = 250
            attempts = 1
            cache_size = 100
            min_ttl = 1
            max_ttl = 60
            negative_max_ttl = 10
            max_in_flight = 64
            parallel_nameservers = 1
            max_mx_hosts = 3
            ip_order = "ipv6_first"
            "#,
        )
        .unwrap();
        assert_eq!(c.dns.timeout(), Duration::from_millis(250));
        assert_eq!(c.dns.ip_order, IpOrder::Ipv6First);
        assert_eq!(c.dns.nameservers.len(), 2);
        assert_eq!(Config::parse(&c.to_toml()).unwrap().dns, c.dns);
        assert_eq!(Config::parse("").unwrap().dns, DnsConfig::default());
    }

    #[test]
    fn bad_dns_values_are_refused() {
        for bad in [
            "[dns]\ntimeout_ms = 0",
            "[dns]\nattempts = 0",
            "[dns]\nattempts = 11",
            "[dns]\nmin_ttl = 10\nmax_ttl = 5",
            "[dns]\nmin_ttl = 10\nnegative_max_ttl = 5",
            "[dns]\nmax_in_flight = 0",
            "[dns]\nparallel_nameservers = 0",
            "[dns]\nmax_mx_hosts = 0",
            "[dns]\nnameservers = [\"0.0.0.0:53\"]",
            "[dns]\nnameservers = [\"127.0.0.1:0\"]",
            "[dns]\nnameservers = [\"localhost:53\"]",
            "[dns]\nip_order = \"ipv5\"",
            "[dns]\nretries = 3",
        ] {
            let e = Config::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid config"), "{bad:?} -> {e}");
            assert!(!e.contains('\n'), "{bad:?} -> {e:?}");
        }
    }

    #[test]
    fn route_hosts_parse() {
        use std::net::IpAddr;
        let ip = |s: &str| RouteHostName::Ip(s.parse::<IpAddr>().unwrap());
        let name = |s: &str| RouteHostName::Name(s.to_owned());
        for (text, host, port, shown) in [
            (
                "127.0.0.2:2526",
                ip("127.0.0.2"),
                Some(2526),
                "127.0.0.2:2526",
            ),
            ("127.0.0.2", ip("127.0.0.2"), None, "127.0.0.2"),
            ("[::1]:25", ip("::1"), Some(25), "[::1]:25"),
            ("[::1]", ip("::1"), None, "[::1]"),
            ("::1", ip("::1"), None, "[::1]"),
            (
                "MX.Example.Test:25",
                name("mx.example.test"),
                Some(25),
                "mx.example.test:25",
            ),
            (
                "mx.example.test.",
                name("mx.example.test"),
                None,
                "mx.example.test",
            ),
            (
                "relay_1.internal",
                name("relay_1.internal"),
                None,
                "relay_1.internal",
            ),
        ] {
            let h: RouteHost = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(h.host, host, "{text}");
            assert_eq!(h.port, port, "{text}");
            assert_eq!(h.to_string(), shown, "{text}");
            assert_eq!(shown.parse::<RouteHost>().unwrap(), h, "{text}");
        }
        for bad in [
            "",
            "127.0.0.2:0",
            "host:0",
            "host:99999",
            "host:",
            "::1:25x",
            "[nonsense]:25",
            "a..b",
            "-a.test",
            "a b",
            "user@host",
        ] {
            assert!(bad.parse::<RouteHost>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn route_domains_validate() {
        let route = |domain: &str| {
            format!("[[route]]\ndomain = \"{domain}\"\nhosts = [\"127.0.0.2:25\"]\n")
        };
        for good in [
            "example.test",
            "Example.TEST",
            ".example.test",
            "*",
            "[127.0.0.2]",
            "[IPv6:::1]",
        ] {
            Config::parse(&route(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..example.test",
            "example.test.",
            "*.example.test",
            "[1.2.3]",
            "[tag:x]",
            "exa mple.test",
        ] {
            let e = Config::parse(&route(bad)).unwrap_err().to_string();
            assert!(e.contains("[[route]]"), "{bad:?} -> {e}");
        }
        let twice = format!("{}{}", route("a.test"), route("A.test"));
        assert!(Config::parse(&twice)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let no_hosts = "[[route]]\ndomain = \"a.test\"\nhosts = []\n";
        assert!(Config::parse(no_hosts).is_err());
        let bad_host = "[[route]]\ndomain = \"a.test\"\nhosts = [\"x:0\"]\n";
        let e = Config::parse(bad_host).unwrap_err().to_string();
        assert!(e.contains("route host"), "{e}");
        assert!(!e.contains('\n'), "{e:?}");
    }

    #[test]
    fn errors_are_one_line() {
        for bad in [
            "[server]\nlisten = [\"nonsense\"]",
            "[server]\nlistne = []",
            "[server]\nlisten = []",
            "[relay]\nallow_networks = [\"10.0.0.0/33\"]",
            "[server]\nshards = -1",
            "[server]\nmax_recipients = 0",
        ] {
            let e = Config::parse(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{bad:?} -> {e:?}");
            assert!(e.starts_with("invalid config"), "{e}");
        }
    }
}
