//! The runtime of `sluice serve`: startup checks, one glommio shard per core,
//! the session driver, connection limits, signals and graceful shutdown.
//!
//! Startup errors come back as [`StartupError`], one line each; nothing here
//! panics on bad input from the operator.

mod api;
mod buffers;
pub mod date;
pub mod limits;
pub mod queue;
mod session;
mod shard;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::config::Config;
use crate::delivery::accounting::Accounting;
use crate::delivery::dns::Resolver;
use crate::delivery::engine::DeliveryShared;
use crate::delivery::log::EventLog;
use crate::delivery::route::Routes;
use api::{SessionConfig, Spool};

/// A startup failure, rendered as one line for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartupError(pub String);

fn fail<T>(msg: impl Into<String>) -> Result<T, StartupError> {
    Err(StartupError(msg.into()))
}

/// Options of `sluice serve` that are not configuration.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// After every shard is listening, write the bound addresses here
    /// (`smtp ADDR` and `metrics ADDR` lines): lets tests and scripts use
    /// port 0 and find out the real port.
    pub ready_file: Option<PathBuf>,
}

/// The shard that owns delivery for `domain`: FNV-1a (64-bit) of the
/// ASCII-lowercased domain, modulo `shards`. Stable across runs and
/// platforms, so a domain's queue stays on one shard after a restart.
pub fn shard_for(domain: &str, shards: usize) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in domain.bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(PRIME);
    }
    (h % shards.max(1) as u64) as usize
}

/// Locked-memory limit of this process in octets (`None` = unlimited or
/// unknown).
fn memlock_limit() -> Option<u64> {
    let (soft, _) = rlimit::Resource::MEMLOCK.get().ok()?;
    (soft != rlimit::INFINITY).then_some(soft)
}

/// File descriptors beyond the SMTP connections: spool files, io_uring rings
/// and eventfds per shard, the admin endpoint, its clients.
const FD_HEADROOM: u64 = 256;

/// Every connection is a file descriptor, and the usual soft limit (1024)
/// is far below `max_connections`: raise the soft RLIMIT_NOFILE to the hard
/// limit (allowed without privileges). Returns the soft limit in force.
fn raise_nofile_limit() -> Option<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    if soft < hard && rlimit::Resource::NOFILE.set(hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// glommio refuses to start a reactor below this limit.
const MIN_MEMLOCK: u64 = 512 * 1024;

/// The session core's settings from the configuration.
fn session_config(config: &Config) -> SessionConfig {
    let s = &config.server;
    SessionConfig {
        hostname: s.hostname.clone(),
        max_message_size: s.max_message_size,
        max_recipients: s.max_recipients,
        max_command_line: s.max_command_line,
        max_errors: s.max_errors,
        command_timeout: s.command_timeout(),
        data_timeout: s.data_timeout(),
        greeting_delay: Duration::from_millis(s.greeting_delay_ms),
        max_line_length: s.max_line_length,
        line_endings: s.line_endings.into(),
    }
}

/// Checks that `addr` can be listened on and resolves port 0. Returns the
/// address to bind and, for port 0, a bound (not listening) SO_REUSEPORT
/// socket that holds the port until every shard has bound it too.
fn probe_listen(addr: SocketAddr) -> Result<(SocketAddr, Option<socket2::Socket>), StartupError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |e: std::io::Error| StartupError(format!("cannot listen on {addr}: {e}"));
    if addr.port() != 0 {
        // No SO_REUSEPORT here: this bind fails if anything listens on the
        // port, even another process that set SO_REUSEPORT (which would let
        // the shards' binds succeed and silently share the port).
        match std::net::TcpListener::bind(addr) {
            Ok(_) => return Ok((addr, None)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                // It also fails while connections of our previous run linger
                // in TIME_WAIT (glommio's listeners set SO_REUSEPORT but not
                // SO_REUSEADDR, and their accepted sockets inherit that), so a
                // restart would fail for a minute. Bind as the shards will:
                // a listener without SO_REUSEPORT or of another user still
                // conflicts; one that shares the port with us (another sluice)
                // does not, so look for it by connecting.
                let sock =
                    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                        .map_err(err)?;
                sock.set_reuse_port(true).map_err(err)?;
                sock.bind(&addr.into()).map_err(err)?;
                drop(sock);
                // A process that has just exited keeps accepting for some
                // milliseconds (io_uring drops its pending accept, and with
                // it the listener, asynchronously): a restart must not take
                // that for another server, nor share the port with it.
                let until = std::time::Instant::now() + LINGER;
                while someone_listens(addr) {
                    if std::time::Instant::now() >= until {
                        return Err(err(e));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Ok((addr, None));
            }
            Err(e) => return Err(err(e)),
        }
    }
    let sock =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    let bound = sock
        .local_addr()
        .map_err(err)?
        .as_socket()
        .ok_or_else(|| StartupError(format!("cannot listen on {addr}: not an IP socket")))?;
    Ok((bound, Some(sock)))
}

/// How long a listener found at startup may take to go away before the
/// port counts as taken (an exited sluice's lingers ~10 ms).
const LINGER: Duration = Duration::from_secs(2);

/// Whether something accepts TCP connections at `addr` (the unspecified
/// address stands for every local one: loopback is asked).
fn someone_listens(addr: SocketAddr) -> bool {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok()
}

/// The delivery pieces every shard shares: mesh, resolver thread, routes,
/// accounting log, queue snapshot.
fn delivery_shared(
    config: &Arc<Config>,
    spool: &Spool,
    shards: usize,
    not_before: Option<crate::spool::SpoolId>,
    partitions: Vec<u16>,
) -> Result<DeliveryShared, StartupError> {
    let resolver = if config.delivery.enabled {
        Resolver::new(&config.dns)
            .map_err(|e| StartupError(format!("cannot start the DNS resolver: {e}")))?
    } else {
        Resolver::disabled(&config.dns)
    };
    let file = &config.log.accounting_file;
    let log = if file.as_os_str().is_empty() {
        Accounting::disabled()
    } else {
        let log = EventLog::open(file).map_err(|e| {
            resolver.stop();
            StartupError(format!(
                "cannot open accounting log {}: {e}",
                file.display()
            ))
        })?;
        Accounting::new(log)
    };
    Ok(DeliveryShared {
        config: Arc::clone(config),
        spool: spool.clone(),
        mesh: DeliveryShared::mesh_for(shards, config.delivery.enabled),
        executor_ids: Arc::new(std::sync::Mutex::new(vec![None; shards])),
        resolver,
        routes: Routes::from_config(config),
        log,
        snapshot: Arc::new(std::sync::Mutex::new(Vec::new())),
        not_before,
        partitions,
        in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    })
}

/// Runs the server until SIGTERM/SIGINT; returns once every shard has
/// drained and the spool is flushed.
pub fn serve(config: Config, options: ServeOptions) -> Result<(), StartupError> {
    let config = Arc::new(config);
    let shards = config.server.effective_shards();

    if let Some(limit) = memlock_limit() {
        if limit < MIN_MEMLOCK {
            return fail(format!(
                "RLIMIT_MEMLOCK is {} KiB, glommio needs at least {} KiB: raise it (ulimit -l, systemd LimitMEMLOCK=)",
                limit / 1024,
                MIN_MEMLOCK / 1024
            ));
        }
        let wanted = shards as u64 * config.server.io_memory as u64;
        if limit < wanted {
            tracing::warn!(
                limit_kib = limit / 1024,
                wanted_kib = wanted / 1024,
                "RLIMIT_MEMLOCK below shards * server.io_memory: io_uring buffers will not be registered"
            );
        }
    }

    if let Some(nofile) = raise_nofile_limit() {
        let wanted = config.server.max_connections as u64 + FD_HEADROOM;
        if nofile < wanted {
            tracing::warn!(
                nofile,
                wanted,
                "RLIMIT_NOFILE (hard limit) is below server.max_connections plus headroom: \
                 accepts will fail with EMFILE before max_connections is reached \
                 (raise it: ulimit -Hn, systemd LimitNOFILE=)"
            );
        } else {
            tracing::debug!(nofile, "file descriptor limit");
        }
    }

    let mut listen = Vec::new();
    let mut probes = Vec::new();
    for &addr in &config.server.listen {
        let (bound, probe) = probe_listen(addr)?;
        if !listen.contains(&bound) {
            listen.push(bound);
        }
        probes.extend(probe);
    }

    let spool_path = &config.spool.path;
    let spool = Spool::open_with(spool_path, config.spool.options()).map_err(|e| {
        StartupError(format!(
            "cannot open spool at {}: {e}",
            spool_path.display()
        ))
    })?;
    let not_before = spool.max_id().map_err(|e| {
        StartupError(format!(
            "cannot read spool at {}: {e}",
            spool_path.display()
        ))
    })?;

    let partitions = spool.partitions().map_err(|e| {
        StartupError(format!(
            "cannot read spool at {}: {e}",
            spool_path.display()
        ))
    })?;
    let delivery = delivery_shared(&config, &spool, shards, not_before, partitions)?;

    let metrics_addr = if config.metrics.enabled {
        let listener = std::net::TcpListener::bind(config.metrics.listen).map_err(|e| {
            StartupError(format!(
                "cannot listen on {} (metrics): {e}",
                config.metrics.listen
            ))
        })?;
        let bound = listener
            .local_addr()
            .map_err(|e| StartupError(format!("metrics listener: {e}")))?;
        let handle = crate::metrics::install()
            .map_err(|e| StartupError(format!("cannot install metrics recorder: {e}")))?;
        let q = spool.clone();
        let snapshot = Arc::clone(&delivery.snapshot);
        crate::metrics::serve(
            listener,
            handle,
            Arc::new(move |limit| queue::render(&q, limit, Some(&snapshot))),
        )
        .map_err(|e| StartupError(format!("cannot start admin thread: {e}")))?;
        Some(bound)
    } else {
        None
    };

    let stop = Arc::new(AtomicBool::new(false));
    // Shards still finishing their sessions after a stop; see `shard::run`.
    let draining = Arc::new(std::sync::atomic::AtomicUsize::new(shards));
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| StartupError(format!("cannot install signal handlers: {e}")))?;

    let session_config = Arc::new(session_config(&config));
    let limiter = limits::ConnectionLimiter::new(
        config.server.max_connections,
        config.server.max_connections_per_ip,
    );
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut handles = Vec::with_capacity(shards);
    let mut readies = Vec::with_capacity(shards);
    let mut startup: Result<(), StartupError> = Ok(());
    for index in 0..shards {
        let (tx, rx) = std::sync::mpsc::channel();
        let spec = shard::ShardSpec {
            index,
            shards,
            delivery: delivery.clone(),
            listen: listen.clone(),
            config: Arc::clone(&config),
            session_config: Arc::clone(&session_config),
            spool: spool.clone(),
            not_before,
            limiter: Arc::clone(&limiter),
            stop: Arc::clone(&stop),
            draining: Arc::clone(&draining),
            ready: tx,
        };
        let placement = if shards <= cores {
            Placement::Fixed(index)
        } else {
            Placement::Unbound
        };
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("sluice-shard-{index}"))
            .io_memory(config.server.io_memory);
        match builder.spawn(move || shard::run(spec)) {
            Ok(h) => {
                handles.push(h);
                readies.push(rx);
            }
            Err(e) => {
                startup = fail(format!("cannot start shard {index}: {e}"));
                break;
            }
        }
    }
    if startup.is_ok() {
        for (index, rx) in readies.iter().enumerate() {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => {
                    startup = fail(msg);
                    break;
                }
                Err(_) => {
                    // The executor died before its future ran (e.g. the
                    // reactor could not be created); its join has the reason.
                    startup = fail(format!("shard {index} failed to start"));
                    break;
                }
            }
        }
    }
    drop(probes);
    if let Err(e) = startup {
        stop.store(true, Ordering::Release);
        delivery.resolver.stop();
        // Some shards never ran; nobody waits for the others to drain.
        draining.store(0, Ordering::Release);
        let mut detail = None;
        for h in handles {
            if let Err(join_err) = h.join() {
                detail.get_or_insert(join_err.to_string());
            }
        }
        return match detail {
            Some(d) if e.0.ends_with("failed to start") => fail(format!("{e}: {d}")),
            _ => Err(e),
        };
    }

    for addr in &listen {
        tracing::info!(%addr, shards, "listening for SMTP");
    }
    if let Some(addr) = metrics_addr {
        tracing::info!(%addr, "metrics and admin endpoint");
    }
    if let Some(path) = &options.ready_file {
        let mut text = String::new();
        for addr in &listen {
            text.push_str(&format!("smtp {addr}\n"));
        }
        if let Some(addr) = metrics_addr {
            text.push_str(&format!("metrics {addr}\n"));
        }
        // Write then rename so a reader never sees a half-written file.
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write ready file");
        }
    }

    let mut signals = signals;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(
            signal = sig,
            "stopping: no new connections, draining sessions"
        );
    }
    stop.store(true, Ordering::Release);
    for h in handles {
        if let Err(e) = h.join() {
            tracing::error!(error = %e, "shard ended with an error");
        }
    }
    delivery.resolver.stop();
    if !delivery.log.sync(Duration::from_secs(5)) {
        tracing::warn!("accounting log not fully written at exit");
    }
    if let Err(e) = spool.flush_blocking() {
        return fail(format!("final spool flush failed: {e}"));
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_for_is_stable_and_case_insensitive() {
        // FNV-1a test vectors: "" -> offset basis, "a" -> 0xaf63dc4c8601ec8c.
        assert_eq!(
            shard_for("", usize::MAX),
            0xcbf2_9ce4_8422_2325 % usize::MAX
        );
        assert_eq!(
            shard_for("a", usize::MAX),
            (0xaf63_dc4c_8601_ec8c_u64 % usize::MAX as u64) as usize
        );
        for shards in 1..=16 {
            let s = shard_for("Example.TEST", shards);
            assert!(s < shards);
            assert_eq!(s, shard_for("example.test", shards));
        }
        assert_eq!(shard_for("x", 0), 0);
        // Different domains spread.
        let used: std::collections::HashSet<_> = (0..64)
            .map(|i| shard_for(&format!("d{i}.test"), 4))
            .collect();
        assert_eq!(used.len(), 4);
    }
}
