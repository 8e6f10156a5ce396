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
    /// `[dns]`: resolver settings (used by delivery, a later issue).
    pub dns: DnsConfig,
    /// `[delivery]`: outbound settings (a later issue).
    pub delivery: DeliveryConfig,
    /// `[[route]]`: static routes (a later issue).
    #[serde(rename = "route", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
}

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
    /// The number of shards to run: the configured value, or the core count.
    pub fn effective_shards(&self) -> usize {
        if self.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
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
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: PathBuf::from("./sluice-spool"),
            min_free_space: 256 * 1024 * 1024,
            flush_timeout: 10,
        }
    }
}

impl SpoolConfig {
    /// The spool's runtime options.
    pub fn options(&self) -> crate::spool::SpoolOptions {
        crate::spool::SpoolOptions {
            min_free_space: self.min_free_space,
            flush_timeout: Duration::from_secs(self.flush_timeout),
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

/// `[dns]` (used by delivery, a later issue).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Recursive resolvers to ask; empty = those of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
}

/// `[delivery]` (a later issue).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// TCP port of remote MX hosts.
    pub port: u16,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig { port: 25 }
    }
}

/// One `[[route]]` (a later issue): mail for `domain` goes to `hosts`
/// instead of the domain's MX.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Recipient domain (exact, case-insensitive).
    pub domain: String,
    /// Hosts to try in order.
    pub hosts: Vec<SocketAddr>,
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
        if s.shards > 1024 {
            return bad("server.shards must be at most 1024");
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
        if s.read_buffer_size < 1024 || s.read_buffer_size > 16 * 1024 * 1024 {
            return bad("server.read_buffer_size must be between 1024 and 16777216");
        }
        if s.io_memory < 64 * 1024 {
            return bad("server.io_memory must be at least 65536");
        }
        if self.spool.path.as_os_str().is_empty() {
            return bad("spool.path must not be empty");
        }
        if self.spool.flush_timeout == 0 {
            return bad("spool.flush_timeout must be positive");
        }
        for r in &self.routes {
            if r.domain.is_empty() || r.hosts.is_empty() {
                return bad("every [[route]] needs a domain and at least one host");
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
