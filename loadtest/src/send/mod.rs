//! `send`: the load generator.
//!
//! A few event-loop threads (mio/epoll, nonblocking sockets) share the connections; each
//! connection is a small state machine (`conn.rs`) that parses replies with Sluice's
//! [`Reply::parse`](sluice::smtp::Reply::parse). Messages come from a shared [`Schedule`]
//! (closed loop, or open loop at `--rate` with latency from the intended send time) and a
//! prepared [`Corpus`]. The clock starts once the connections are up, so connection setup
//! is not part of the measured window.

mod conn;
pub mod report;
pub mod schedule;

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};

use crate::message::{BodyKind, Corpus, SizeDist};
use conn::{Conn, Local, Phase};
use report::{Live, RunFacts, SendReport, Tally};
use schedule::{Next, Schedule};

/// When to use PIPELINING.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pipelining {
    /// When the server offers it.
    Auto,
    /// Always (a robustness test for servers that do not offer it).
    On,
    /// Never: one command, one reply.
    Off,
}

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A live bar on a terminal, plain lines otherwise.
    Auto,
    /// Always the live bar.
    Bar,
    /// Always plain lines.
    Lines,
    /// Nothing.
    Off,
}

/// Everything `send` needs; built from the command line.
#[derive(Debug, Clone)]
pub struct SendConfig {
    pub target: SocketAddr,
    pub connections: usize,
    pub threads: usize,
    pub messages: Option<u64>,
    pub duration: Option<Duration>,
    pub rate: Option<f64>,
    pub sizes: SizeDist,
    pub body: BodyKind,
    pub recipients: usize,
    pub domains: u64,
    pub from: String,
    pub rcpt_template: String,
    pub pipelining: Pipelining,
    pub chunking: bool,
    pub chunk_size: usize,
    pub messages_per_connection: u64,
    pub io_timeout: Duration,
    pub connect_attempts: u32,
    pub helo: String,
    pub acked: Option<PathBuf>,
    pub ids_file: Option<PathBuf>,
    pub run_id: Option<String>,
    pub progress: ProgressMode,
    pub progress_interval: Duration,
}

/// What every worker thread shares.
pub struct Shared {
    cfg: SendConfig,
    corpus: Corpus,
    schedule: Schedule,
    live: Live,
    acked: Option<Mutex<File>>,
    ids_file: Option<Mutex<File>>,
    run_id: String,
    /// Connection slots that gave up before the run ended (could not connect).
    slots_given_up: AtomicUsize,
}

/// How the main thread and the workers coordinate.
struct Control {
    /// Workers that have finished.
    finished: AtomicUsize,
    /// Wakes each worker's poll.
    wakers: Mutex<Vec<Arc<Waker>>>,
}

const WAKER: Token = Token(usize::MAX);
/// How often each worker checks its connections' timers.
const TIMER_TICK: Duration = Duration::from_millis(20);

fn open_append(p: &PathBuf) -> io::Result<Mutex<File>> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map(Mutex::new)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// A short run id, unique enough across runs on one machine (time and pid mixed).
fn new_run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let x = crate::message::splitmix64(t ^ (u64::from(std::process::id()) << 32));
    format!("{:08x}", x as u32)
}

/// Runs the generator to the end and returns its report.
pub fn run(cfg: SendConfig) -> io::Result<SendReport> {
    let launched = Instant::now();
    let _ = crate::sys::raise_nofile(cfg.connections as u64 + 64);
    let run_id = cfg.run_id.clone().unwrap_or_else(new_run_id);
    let acked = cfg.acked.as_ref().map(open_append).transpose()?;
    let ids_file = cfg.ids_file.as_ref().map(open_append).transpose()?;
    let corpus = Corpus::new(
        cfg.sizes.clone(),
        cfg.body,
        crate::message::splitmix64(run_id.len() as u64 ^ 0x5eed),
    );
    let threads = cfg.threads.clamp(1, cfg.connections.max(1));
    let shared = Arc::new(Shared {
        schedule: Schedule::new(cfg.messages, cfg.duration, cfg.rate),
        corpus,
        live: Live::default(),
        acked,
        ids_file,
        run_id: run_id.clone(),
        slots_given_up: AtomicUsize::new(0),
        cfg,
    });
    let ctl = Arc::new(Control {
        finished: AtomicUsize::new(0),
        wakers: Mutex::new(Vec::new()),
    });
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let (sh, flag) = (Arc::clone(&shared), Arc::clone(&interrupted));
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        thread::Builder::new()
            .name("send-signals".into())
            .spawn(move || {
                for _ in signals.forever() {
                    flag.store(true, Ordering::Relaxed);
                    sh.schedule.stop();
                }
            })?;
    }
    let n = shared.cfg.connections;
    let mut handles = Vec::new();
    for t in 0..threads {
        let slots = (n * t / threads)..(n * (t + 1) / threads);
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        ctl.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(waker);
        let (sh, c) = (Arc::clone(&shared), Arc::clone(&ctl));
        handles.push(
            thread::Builder::new()
                .name(format!("send-worker-{t}"))
                .spawn(move || {
                    let tally = worker(&sh, poll, slots.len());
                    c.finished.fetch_add(1, Ordering::Release);
                    if let Some(w) = c.wakers.lock().unwrap_or_else(|p| p.into_inner()).first() {
                        let _ = w.wake();
                    }
                    tally
                })?,
        );
    }
    let start = supervise(&shared, &ctl, threads);
    let mut tally = Tally::default();
    for h in handles {
        match h.join() {
            Ok(t) => tally.merge(t),
            Err(_) => return Err(io::Error::other("a worker thread panicked")),
        }
    }
    let all_done = Instant::now();
    let end = tally.last_end.unwrap_or(all_done).max(start);
    let cfg = &shared.cfg;
    let facts = RunFacts {
        run_id,
        target: cfg.target.to_string(),
        connections: cfg.connections,
        threads,
        rate: cfg.rate,
        messages: cfg.messages,
        duration: cfg.duration,
        elapsed: end.duration_since(start),
        setup: start.duration_since(launched),
        wind_down: all_done.saturating_duration_since(end),
        stopped_by_duration_limit: cfg.duration.is_some()
            && cfg.messages.is_some_and(|m| tally.attempted < m),
        interrupted: interrupted.load(Ordering::Relaxed),
    };
    Ok(report::build(&tally, facts))
}

/// The main thread: starts the clock once the connections are up (or given up), then shows
/// progress until every worker is done. Returns the start of the measured window.
fn supervise(sh: &Shared, ctl: &Control, threads: usize) -> Instant {
    let cfg = &sh.cfg;
    let tty = io::stderr().is_terminal();
    let mode = match cfg.progress {
        ProgressMode::Auto if tty => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::Lines,
        m => m,
    };
    // Warm-up: every connection established or given up, bounded by the time a slot
    // needs to give up (connect attempts with backoff, each bounded by --io-timeout).
    let warmup_limit =
        Instant::now() + cfg.io_timeout * cfg.connect_attempts.max(1) + Duration::from_secs(2);
    loop {
        let up = Live::get(&sh.live.connections) as usize;
        let failed_slots = sh.slots_given_up.load(Ordering::Relaxed);
        let done = ctl.finished.load(Ordering::Acquire) == threads;
        if up + failed_slots >= cfg.connections || done || Instant::now() >= warmup_limit {
            break;
        }
        if sh.schedule.is_stopped() {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let start = Instant::now();
    sh.schedule.begin(start);
    for w in ctl.wakers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = w.wake();
    }
    let mut progress = Progress::new(mode, cfg, start);
    let tick = match mode {
        ProgressMode::Bar => Duration::from_millis(200),
        _ => cfg.progress_interval,
    };
    let mut next = start + tick;
    while ctl.finished.load(Ordering::Acquire) < threads {
        thread::sleep(Duration::from_millis(10).min(tick));
        let now = Instant::now();
        if now >= next {
            progress.show(sh, now);
            next = now + tick;
        }
    }
    progress.finish(sh);
    start
}

/// The progress display on stderr.
struct Progress {
    mode: ProgressMode,
    start: Instant,
    total: Option<u64>,
    duration: Option<Duration>,
    last: (Instant, u64),
    drew_bar: bool,
}

impl Progress {
    fn new(mode: ProgressMode, cfg: &SendConfig, start: Instant) -> Self {
        let total = match (cfg.messages, cfg.rate, cfg.duration) {
            (Some(m), _, _) => Some(m),
            (None, Some(r), Some(d)) => Some((r * d.as_secs_f64()).ceil() as u64),
            _ => None,
        };
        Progress {
            mode,
            start,
            total,
            duration: cfg.duration,
            last: (start, 0),
            drew_bar: false,
        }
    }

    fn show(&mut self, sh: &Shared, now: Instant) {
        if self.mode == ProgressMode::Off {
            return;
        }
        let l = &sh.live;
        let (att, acc, rej, err) = (
            Live::get(&l.attempted),
            Live::get(&l.accepted),
            Live::get(&l.rejected),
            Live::get(&l.errors),
        );
        let done = acc + rej + err;
        let dt = now.duration_since(self.last.0).as_secs_f64().max(1e-9);
        let rate = done.saturating_sub(self.last.1) as f64 / dt;
        self.last = (now, done);
        let elapsed = now.duration_since(self.start).as_secs_f64();
        let frac = match (self.total, self.duration) {
            (Some(t), _) if t > 0 => Some(done as f64 / t as f64),
            (_, Some(d)) => Some(elapsed / d.as_secs_f64().max(1e-9)),
            _ => None,
        }
        .map(|f| f.clamp(0.0, 1.0));
        let text = format!(
            "{done}{} done ({acc} ok, {rej} refused, {err} errors), {} in flight, {rate:.0} msg/s, \
             {} conns, {elapsed:.1}s",
            self.total.map_or(String::new(), |t| format!("/{t}")),
            att.saturating_sub(done),
            Live::get(&l.connections),
        );
        let mut err_out = io::stderr().lock();
        if self.mode == ProgressMode::Bar {
            let width = 30;
            let bar = match frac {
                Some(f) => {
                    let full = (f * width as f64).round() as usize;
                    format!(
                        "[{}{}] {:3.0}% ",
                        "#".repeat(full),
                        " ".repeat(width - full),
                        f * 100.0
                    )
                }
                None => String::new(),
            };
            let _ = write!(err_out, "\r\x1b[2K{bar}{text}");
            self.drew_bar = true;
        } else {
            let _ = writeln!(err_out, "send: {text}");
        }
        let _ = err_out.flush();
    }

    fn finish(&mut self, sh: &Shared) {
        if self.mode == ProgressMode::Bar {
            self.show(sh, Instant::now());
        }
        if self.drew_bar {
            eprintln!();
        }
    }
}

/// One event loop over its share of the connections; returns its tally.
fn worker(sh: &Shared, mut poll: Poll, n: usize) -> Tally {
    let registry = match poll.registry().try_clone() {
        Ok(r) => r,
        Err(e) => {
            let mut t = Tally::default();
            t.note_error(format!("poll: {e}"));
            return t;
        }
    };
    let now = Instant::now();
    let mut conns: Vec<Conn> = (0..n)
        .map(|i| Conn::new(Token(i), sh.cfg.target, now))
        .collect();
    let mut w = Local::new();
    let mut ready: Vec<usize> = Vec::with_capacity(n);
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut next_tick = now;
    let mut winding = false;
    let mut hard_stop: Option<Instant> = None;
    let mut given_up = vec![false; n];
    loop {
        let now = Instant::now();
        if now >= next_tick || std::mem::take(&mut w.kick) {
            next_tick = now + TIMER_TICK;
            for (i, c) in conns.iter_mut().enumerate() {
                c.on_timer(sh, &mut w, &registry, now);
                c.flush_pending(sh, &mut w, &registry);
                if c.phase == Phase::Done && !given_up[i] {
                    given_up[i] = true;
                    if !winding {
                        sh.slots_given_up.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let mut wake = next_tick;
        if sh.schedule.started().is_some() && !winding {
            while let Some(&i) = ready.last() {
                if conns[i].phase != Phase::Ready {
                    ready.pop();
                    continue;
                }
                match sh.schedule.claim(Instant::now()) {
                    Next::Go(claim) => {
                        ready.pop();
                        conns[i].start(sh, &mut w, claim, Instant::now());
                        conns[i].flush_pending(sh, &mut w, &registry);
                    }
                    Next::Wait(t) => {
                        wake = wake.min(t);
                        break;
                    }
                    Next::Done => {
                        winding = true;
                        break;
                    }
                }
            }
            if sh.schedule.is_stopped() {
                winding = true;
            }
        }
        if winding {
            if hard_stop.is_none() {
                // In-flight messages get one --io-timeout to finish, QUIT included.
                hard_stop = Some(now + sh.cfg.io_timeout + Duration::from_secs(1));
                for c in conns.iter_mut() {
                    c.wind_down(sh, &registry, now);
                    c.flush_pending(sh, &mut w, &registry);
                }
            }
            for i in ready.drain(..) {
                conns[i].wind_down(sh, &registry, now);
                conns[i].flush_pending(sh, &mut w, &registry);
            }
            if hard_stop.is_some_and(|h| now >= h) {
                for c in conns.iter_mut() {
                    c.abort(sh, &mut w, &registry, now);
                }
            }
        }
        // Done: after winding down, or because every slot gave up connecting (then nothing
        // more can be sent from this thread; other threads may go on).
        if conns.iter().all(|c| c.phase == Phase::Done) {
            break;
        }
        let timeout = wake.saturating_duration_since(Instant::now());
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                w.tally.note_error(format!("poll: {e}"));
                thread::sleep(Duration::from_millis(10));
            }
        }
        for ev in events.iter() {
            if ev.token() == WAKER {
                continue;
            }
            let i = ev.token().0;
            if let Some(c) = conns.get_mut(i) {
                c.on_event(sh, &mut w, &registry, &mut ready, ev, &mut buf);
            }
        }
        write_lines(&sh.acked, &mut w.acked, "--acked");
        write_lines(&sh.ids_file, &mut w.ids, "--ids-file");
    }
    write_lines(&sh.acked, &mut w.acked, "--acked");
    write_lines(&sh.ids_file, &mut w.ids, "--ids-file");
    w.tally
}

/// Appends complete lines to a shared file (one `write` per batch, so lines never tear).
fn write_lines(file: &Option<Mutex<File>>, buf: &mut Vec<u8>, what: &str) {
    if buf.is_empty() {
        return;
    }
    if let Some(f) = file {
        let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(buf) {
            eprintln!("send: writing {what}: {e}");
        }
    }
    buf.clear();
}
