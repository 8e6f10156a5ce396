//! `sink`: a fast SMTP server standing in for remote MX hosts.
//!
//! Each connection runs through Sluice's sans-IO server [`Session`] (see `conn.rs`), so the
//! sink speaks the same ESMTP as our server: PIPELINING, 8BITMIME, SIZE, CHUNKING, SMTPUTF8,
//! ENHANCEDSTATUSCODES, DSN. Threads: one acceptor (all listen sockets, one `epoll`), a few
//! event-loop workers (mio/epoll, nonblocking sockets; connections handed out round-robin),
//! one publisher (stats file and console), one signal handler.
//!
//! Faults are injected by rate, by recipient local part and by fixed codes (`faults.rs`);
//! accepted messages are counted, optionally logged by id (`--received`) and stored
//! (`--store`).
//!
//! [`Session`]: sluice::smtp::server::Session

mod conn;
pub mod faults;
mod record;
mod stats;

use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use std::{cmp::Reverse, thread};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use sluice::smtp::data::LineEndingPolicy;
use sluice::smtp::server::SessionConfig;

use crate::util::write_atomic;
use conn::{Conn, WorkerCtx};
use faults::{FaultConfig, Faults, Rng};
use record::{ReceivedLog, Store};
use stats::{add, Stats};

/// Everything `sink` needs; built from the command line.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Addresses to listen on (port 0 picks a free port).
    pub listen: Vec<SocketAddr>,
    /// Receives the bound addresses, one per line, once all are listening.
    pub ready_file: Option<PathBuf>,
    /// One line per accepted message: its `X-Sluice-Load-Id`, else its `Message-ID`.
    pub received: Option<PathBuf>,
    /// Directory for `NNNNNNNN.eml` + `NNNNNNNN.json` per accepted message.
    pub store: Option<PathBuf>,
    /// Where stats JSON is written (atomically).
    pub stats_file: Option<PathBuf>,
    /// Fault injection settings.
    pub faults: FaultConfig,
    /// How long the answer to the end of each message is held back.
    pub delay: Duration,
    /// Most concurrent connections; more are answered 421 and closed.
    pub max_connections: usize,
    /// SIZE limit advertised and enforced.
    pub max_message_size: u64,
    /// Recipients accepted per message.
    pub max_recipients: usize,
    /// Idle (command and data) timeout per connection.
    pub idle_timeout: Duration,
    /// Hostname in greeting and EHLO.
    pub hostname: String,
    /// Do not advertise PIPELINING.
    pub no_pipelining: bool,
    /// Do not advertise CHUNKING.
    pub no_chunking: bool,
    /// Event-loop worker threads.
    pub threads: usize,
    /// No console lines (the stats file is still written).
    pub quiet: bool,
}

/// State every thread of the sink shares.
pub struct Shared {
    cfg: SinkConfig,
    session_config: Arc<SessionConfig>,
    faults: Faults,
    stats: Arc<Stats>,
    store: Option<Store>,
    received: Option<ReceivedLog>,
    /// Sequence of accepted messages (queue ids, store file names).
    seq: AtomicU64,
    /// EHLO lines removed from the session's answer (`--no-pipelining`, `--no-chunking`).
    hidden_ehlo_lines: Vec<&'static [u8]>,
}

const WAKER: Token = Token(usize::MAX);

/// How the acceptor reaches a worker: a queue of new connections and the worker's waker.
type WorkerHandle = (mpsc::Sender<(TcpStream, SocketAddr)>, Arc<Waker>);
const READ_BUF: usize = 64 * 1024;

/// Runs the sink until SIGTERM/SIGINT, then writes final stats and exits the process.
pub fn run(cfg: SinkConfig) -> io::Result<()> {
    // One descriptor per connection plus files: make room up front.
    let _ = crate::sys::raise_nofile(cfg.max_connections as u64 + 256);
    let mut listeners = Vec::new();
    let mut bound = Vec::new();
    for addr in &cfg.listen {
        let l = bind(*addr).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
        bound.push(l.local_addr()?);
        listeners.push(l);
    }
    let session_config = Arc::new(SessionConfig {
        hostname: cfg.hostname.clone(),
        max_message_size: cfg.max_message_size,
        max_recipients: cfg.max_recipients,
        // Lenient like a real MX: long MAIL lines with many parameters are fine.
        max_command_line: 4096,
        // Injected faults produce many error replies; never hang up because of them.
        max_errors: u32::MAX,
        // A sink stores what it gets; it is not the place to police line length.
        max_line_length: usize::MAX,
        line_endings: LineEndingPolicy::Normalize,
        command_timeout: cfg.idle_timeout,
        data_timeout: cfg.idle_timeout,
        greeting_delay: Duration::ZERO,
    });
    let mut hidden_ehlo_lines: Vec<&'static [u8]> = Vec::new();
    if cfg.no_pipelining {
        hidden_ehlo_lines.push(b"250-PIPELINING\r\n");
    }
    if cfg.no_chunking {
        hidden_ehlo_lines.push(b"250-CHUNKING\r\n");
    }
    let stats = Arc::new(Stats::new(bound.iter().map(|a| a.to_string()).collect()));
    let shared = Arc::new(Shared {
        session_config,
        faults: Faults::new(cfg.faults.clone()),
        stats: Arc::clone(&stats),
        store: cfg.store.as_deref().map(Store::open).transpose()?,
        received: cfg.received.as_deref().map(ReceivedLog::open).transpose()?,
        seq: AtomicU64::new(0),
        hidden_ehlo_lines,
        cfg,
    });
    if let Some(p) = &shared.cfg.stats_file {
        stats::write_stats(p, &stats.snapshot())?;
    }
    {
        let (st, path, quiet) = (
            Arc::clone(&stats),
            shared.cfg.stats_file.clone(),
            shared.cfg.quiet,
        );
        thread::Builder::new()
            .name("sink-stats".into())
            .spawn(move || stats::publisher(st, path, quiet))?;
    }
    {
        let sh = Arc::clone(&shared);
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        thread::Builder::new()
            .name("sink-signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    let snap = sh.stats.snapshot();
                    if let Some(p) = &sh.cfg.stats_file {
                        let _ = stats::write_stats(p, &snap);
                    }
                    if !sh.cfg.quiet {
                        eprintln!("{} (exit)", stats::line(&snap, None, 1.0));
                    }
                    std::process::exit(0);
                }
            })?;
    }
    let mut workers = Vec::new();
    for i in 0..shared.cfg.threads.max(1) {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel::<(TcpStream, SocketAddr)>();
        let sh = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("sink-worker-{i}"))
            .spawn(move || worker(sh, poll, rx, i as u64))?;
        workers.push((tx, waker));
    }
    // Ready only after signal handler, stats file and workers are in place, so whoever saw
    // the ready file can connect at once and rely on SIGTERM producing final stats.
    if let Some(p) = &shared.cfg.ready_file {
        let text: String = bound.iter().map(|a| format!("{a}\n")).collect();
        write_atomic(p, text.as_bytes())?;
    }
    if !shared.cfg.quiet {
        for a in &bound {
            eprintln!("sink: listening on {a}");
        }
    }
    acceptor(&shared, listeners, &workers)
}

/// A nonblocking listen socket with a deep backlog (bursts of connects must not overflow
/// into SYN retransmits, which would show up as seconds of latency in a benchmark).
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    sock.set_nonblocking(true)?;
    Ok(TcpListener::from_std(sock.into()))
}

/// Accepts on every listener and hands connections to the workers round-robin.
fn acceptor(
    shared: &Shared,
    mut listeners: Vec<TcpListener>,
    workers: &[WorkerHandle],
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    for (i, l) in listeners.iter_mut().enumerate() {
        poll.registry().register(l, Token(i), Interest::READABLE)?;
    }
    let c = &shared.stats.c;
    let mut events = Events::with_capacity(64);
    let mut next = 0usize;
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            let l = &listeners[ev.token().0];
            loop {
                let (stream, peer) = match l.accept() {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning; the pending
                        // connection stays in the backlog and raises a new event later.
                        eprintln!("sink: accept: {e}");
                        thread::sleep(Duration::from_millis(10));
                        break;
                    }
                };
                add(&c.connections_total, 1);
                let current = c.connections_current.load(Ordering::Relaxed);
                if current as usize >= shared.cfg.max_connections {
                    add(&c.connections_refused, 1);
                    let mut s = stream;
                    let _ = s.write(b"421 4.7.0 sink: too many connections, try later\r\n");
                    shared.stats.touch();
                    continue;
                }
                let now = c.connections_current.fetch_add(1, Ordering::Relaxed) + 1;
                c.connections_peak.fetch_max(now, Ordering::Relaxed);
                shared.stats.touch();
                let _ = stream.set_nodelay(true);
                let (tx, waker) = &workers[next % workers.len()];
                next = next.wrapping_add(1);
                if tx.send((stream, peer)).is_ok() {
                    let _ = waker.wake();
                }
            }
        }
    }
}

/// One event loop: serves its connections until the process exits.
fn worker(
    shared: Arc<Shared>,
    mut poll: Poll,
    rx: mpsc::Receiver<(TcpStream, SocketAddr)>,
    n: u64,
) {
    let mut ctx = WorkerCtx {
        rng: Rng::new(shared.cfg.faults.seed ^ n.wrapping_mul(0x9E37_79B9)),
        shared,
        received: Vec::new(),
        touched: false,
    };
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut flush_list: Vec<usize> = Vec::new();
    // Delayed answers by due time; entries are checked against the connection on expiry.
    let mut timers: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; READ_BUF];
    let mut next_tick = Instant::now() + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        let mut wake = next_tick;
        if let Some(Reverse((t, _))) = timers.peek() {
            wake = wake.min(*t);
        }
        if let Err(e) = poll.poll(&mut events, Some(wake.saturating_duration_since(now))) {
            if e.kind() != io::ErrorKind::Interrupted {
                eprintln!("sink: poll: {e}");
                thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        for ev in events.iter() {
            if ev.token() == WAKER {
                while let Ok((mut stream, peer)) = rx.try_recv() {
                    let idx = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    let registered = poll.registry().register(
                        &mut stream,
                        Token(idx),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    if registered.is_err() {
                        add(&ctx.shared.stats.c.connection_errors, 1);
                        ctx.shared
                            .stats
                            .c
                            .connections_current
                            .fetch_sub(1, Ordering::Relaxed);
                        free.push(idx);
                        continue;
                    }
                    let mut c = Conn::new(stream, peer, &ctx, Instant::now());
                    c.flush_queued = true;
                    flush_list.push(idx);
                    conns[idx] = Some(c);
                }
                continue;
            }
            let idx = ev.token().0;
            let Some(c) = conns.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                c.on_readable(&mut ctx, &mut buf, ev.is_read_closed() || ev.is_error());
                if c.held_due().is_some() {
                    timers.push(Reverse((c.held_due().unwrap_or(now), idx)));
                }
            }
            if (c.has_output() || c.closing) && !c.flush_queued {
                c.flush_queued = true;
                flush_list.push(idx);
            }
        }
        let now = Instant::now();
        while let Some(Reverse((due, idx))) = timers.peek().copied() {
            if due > now {
                break;
            }
            timers.pop();
            let Some(c) = conns.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            if c.held_due() != Some(due) {
                continue; // stale entry
            }
            c.release(&mut ctx, now, &mut buf);
            if let Some(t) = c.held_due() {
                timers.push(Reverse((t, idx)));
            }
            if (c.has_output() || c.closing) && !c.flush_queued {
                c.flush_queued = true;
                flush_list.push(idx);
            }
        }
        if now >= next_tick {
            next_tick = now + Duration::from_secs(1);
            for (idx, slot) in conns.iter_mut().enumerate() {
                if let Some(c) = slot {
                    c.tick(&ctx, now);
                    if (c.has_output() || c.closing) && !c.flush_queued {
                        c.flush_queued = true;
                        flush_list.push(idx);
                    }
                }
            }
        }
        // The ids of accepted messages reach the --received file before their 250s leave.
        if !ctx.received.is_empty() {
            if let Some(log) = &ctx.shared.received {
                if let Err(e) = log.append(&ctx.received) {
                    eprintln!("sink: writing --received: {e}");
                }
            }
            ctx.received.clear();
        }
        for idx in flush_list.drain(..) {
            let Some(c) = conns.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            c.flush_queued = false;
            if !c.flush() {
                continue; // the writable event brings it back
            }
            if c.finished() {
                let mut c = conns[idx].take().expect("checked above");
                let _ = poll.registry().deregister(&mut c.stream);
                let st = &ctx.shared.stats.c;
                st.connections_current.fetch_sub(1, Ordering::Relaxed);
                if c.failed {
                    add(&st.connection_errors, 1);
                }
                ctx.touched = true;
                free.push(idx);
            }
        }
        if std::mem::take(&mut ctx.touched) {
            ctx.shared.stats.touch();
        }
    }
}
