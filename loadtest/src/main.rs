//! `sluice-load`: load generator (`send`), SMTP sink (`sink`), delivery check (`verify`) and
//! idle-connection holder (`idle`) for driving Sluice (or Postfix) end to end.
//!
//! The SMTP protocol core is Sluice's own (`sluice::smtp`): the sink runs each connection
//! through the server `Session`, the generator parses replies with `Reply::parse`. Nothing
//! here parses SMTP a second time.

mod idle;
mod message;
mod send;
mod sink;
mod sys;
mod util;
mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use util::{
    check_loopback, parse_addr, parse_duration, parse_loopback_addr, parse_probability, parse_size,
};

#[derive(Parser, Debug)]
#[command(
    name = "sluice-load",
    version,
    about = "Load generator and SMTP sink for Sluice (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Send messages over N concurrent connections and report throughput and latency.
    Send(SendArgs),
    /// Run an SMTP server that accepts (or refuses, as told) everything and counts it.
    Sink(SinkArgs),
    /// Open N connections, EHLO, hold them idle, then QUIT.
    Idle(IdleArgs),
    /// Compare `send --acked` with `sink --received`: lost and duplicated messages.
    Verify(VerifyArgs),
}

#[derive(clap::Args, Debug)]
struct SendArgs {
    /// Server to drive (loopback only unless --allow-non-loopback).
    #[arg(long, default_value = "127.0.0.1:2525", value_parser = parse_addr)]
    target: SocketAddr,
    /// Concurrent connections.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    connections: u64,
    /// Total messages (default 10000 when neither this nor --duration is given).
    #[arg(long)]
    messages: Option<u64>,
    /// Run for this long (e.g. 30s); with --messages, whichever ends first.
    #[arg(long, visible_alias = "duration-limit", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Open loop: schedule N messages per second (e.g. 500 or 500/s); latency is measured
    /// from each message's scheduled time.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Message size, headers included (e.g. 5k, 1m).
    #[arg(long, default_value = "5k", value_parser = parse_size, conflicts_with = "size_dist")]
    size: usize,
    /// Size distribution SIZE:WEIGHT,... (e.g. 2k:50,20k:40,200k:10).
    #[arg(long)]
    size_dist: Option<String>,
    /// Body structure.
    #[arg(long, value_enum, default_value_t = message::BodyKind::Mixed)]
    body: message::BodyKind,
    /// Recipients per message.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    recipients: u64,
    /// Distinct recipient domains: recipient number n goes to domain d(n mod N).test.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    domains: u64,
    /// Envelope and From: sender.
    #[arg(long, default_value = "load@sluice-load.test")]
    from: String,
    /// Recipient template: the placeholders n (or i) = recipient number and domain (or j) =
    /// n mod --domains, each in braces.
    #[arg(long, default_value = "user{n}@d{domain}.test")]
    rcpt_template: String,
    /// PIPELINING use: auto (when offered), on (always), off (never).
    #[arg(long, value_enum, default_value_t = send::Pipelining::Auto)]
    pipelining: send::Pipelining,
    /// Use BDAT (CHUNKING) when the server offers it.
    #[arg(long)]
    chunking: bool,
    /// BDAT chunk size.
    #[arg(long, default_value = "64k", value_parser = parse_size)]
    chunk_size: usize,
    /// Reconnect after this many messages (0 = keep the connection).
    #[arg(long, default_value_t = 0)]
    messages_per_connection: u64,
    /// Give up on a server silent for this long (connect, each reply, each write).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    io_timeout: Duration,
    /// Attempts to establish each connection before its slot gives up.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connect_attempts: u32,
    /// EHLO name.
    #[arg(long, default_value = "load.sluice-load.test")]
    helo: String,
    /// Append the id of every message answered 2xx to this file (for `verify`).
    #[arg(long)]
    acked: Option<PathBuf>,
    /// Append `QUEUE-ID<TAB>MESSAGE-ID` for every accepted message whose reply names a queue id.
    #[arg(long)]
    ids_file: Option<PathBuf>,
    /// Run id (the prefix of every X-Sluice-Load-Id); random by default.
    #[arg(long)]
    run_id: Option<String>,
    /// Event-loop threads (default: one per CPU, at most 4).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
    /// Write the report as JSON to FILE (`-` or no value: stdout instead of the text report).
    #[arg(long, num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
    /// Progress on stderr: auto (bar on a terminal, lines otherwise), bar, lines, off.
    #[arg(long, value_enum, default_value_t = send::ProgressMode::Auto)]
    progress: send::ProgressMode,
    /// Seconds between progress lines (when not a bar).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    progress_interval: Duration,
    /// Allow a target outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    allow_non_loopback: bool,
}

#[derive(clap::Args, Debug)]
struct VerifyArgs {
    /// The generator's --acked file.
    #[arg(long)]
    acked: PathBuf,
    /// The sink's --received file.
    #[arg(long)]
    received: PathBuf,
    /// Also fail (exit 1) when an id was received more than once.
    #[arg(long)]
    fail_on_duplicates: bool,
    /// Write the result as JSON to FILE (`-` or no value: stdout).
    #[arg(long, num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct SinkArgs {
    /// Address to listen on; repeat for several (loopback only; port 0 = any free port).
    #[arg(long, value_parser = parse_addr)]
    listen: Vec<SocketAddr>,
    /// Written atomically with every bound address, one per line, once all are listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Append one line per accepted message: its X-Sluice-Load-Id, else its Message-ID.
    #[arg(long)]
    received: Option<PathBuf>,
    /// Store each accepted message as DIR/NNNNNNNN.eml plus DIR/NNNNNNNN.json (envelope).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Write stats JSON here (atomically) as they change and on SIGTERM.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Share of messages answered 451 4.3.0 at the end of data (0..1 or N%).
    #[arg(long, default_value = "0", value_parser = parse_probability)]
    tempfail_rate: f64,
    /// Share of messages answered 554 5.6.0 at the end of data.
    #[arg(long, default_value = "0", value_parser = parse_probability)]
    permfail_rate: f64,
    /// Share of messages whose connection is closed instead of answering the final dot.
    #[arg(long, default_value = "0", value_parser = parse_probability)]
    drop_rate: f64,
    /// Hold back the answer to the end of every message this long (e.g. 200ms).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    delay: Duration,
    /// Reply code for every RCPT not decided by its local part (e.g. 250, 450, 550).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u16).range(200..=599))]
    reply_rcpt: u16,
    /// Final reply code after the data when no fault fires (e.g. 250, 451, 554).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u16).range(200..=599))]
    reply_data: u16,
    /// The first N messages get 451 at end of data, later ones the normal reply.
    #[arg(long, default_value_t = 0)]
    fail_first: u64,
    /// Most concurrent connections; more get 421 and are closed.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// SIZE limit advertised and enforced.
    #[arg(long, default_value = "100m", value_parser = parse_size)]
    max_message_size: usize,
    /// Recipients accepted per message (more get 452 4.5.3).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_recipients: u64,
    /// Close a connection idle for this long.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Hostname in the greeting.
    #[arg(long, default_value = "sink.sluice-load.test")]
    hostname: String,
    /// Do not advertise PIPELINING.
    #[arg(long)]
    no_pipelining: bool,
    /// Do not advertise CHUNKING.
    #[arg(long)]
    no_chunking: bool,
    /// Event-loop threads (default: one per CPU, at most 4).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
    /// Seed for the fault-rate random streams.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No console lines (per second and at exit).
    #[arg(long)]
    quiet: bool,
    /// Allow listening on addresses outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    allow_non_loopback: bool,
}

#[derive(clap::Args, Debug)]
struct IdleArgs {
    /// Server to connect to (loopback only).
    #[arg(long, default_value = "127.0.0.1:2525", value_parser = parse_loopback_addr)]
    target: SocketAddr,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=200_000))]
    connections: u64,
    /// How long to hold the connections (ends early when a piped stdin closes).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    hold: Duration,
    /// Upper bound on connecting + greeting + EHLO for all connections.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    setup_timeout: Duration,
    /// Most handshakes in flight at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,
    /// Write `{"established":N,"failed":M}` here when the hold begins.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// EHLO name.
    #[arg(long, default_value = "idle.sluice-load.test")]
    helo: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Send(a) => run_send(a),
        Cmd::Verify(a) => run_verify(a),
        Cmd::Sink(a) => {
            let listen = if a.listen.is_empty() {
                vec![SocketAddr::from(([127, 0, 0, 1], 2526))]
            } else {
                a.listen
            };
            for l in &listen {
                if let Err(e) = check_loopback(*l, a.allow_non_loopback) {
                    eprintln!("sluice-load sink: {e}");
                    return ExitCode::from(2);
                }
            }
            if a.tempfail_rate + a.permfail_rate + a.drop_rate > 1.0 {
                eprintln!(
                    "sluice-load sink: --tempfail-rate + --permfail-rate + --drop-rate exceed 1"
                );
                return ExitCode::from(2);
            }
            let cfg = sink::SinkConfig {
                listen,
                ready_file: a.ready_file,
                received: a.received,
                store: a.store,
                stats_file: a.stats_file,
                faults: sink::faults::FaultConfig {
                    reply_rcpt: a.reply_rcpt,
                    reply_data: a.reply_data,
                    fail_first: a.fail_first,
                    tempfail_rate: a.tempfail_rate,
                    permfail_rate: a.permfail_rate,
                    drop_rate: a.drop_rate,
                    seed: a.seed,
                },
                delay: a.delay,
                max_connections: a.max_connections as usize,
                max_message_size: a.max_message_size as u64,
                max_recipients: a.max_recipients as usize,
                idle_timeout: a.idle_timeout,
                hostname: a.hostname,
                no_pipelining: a.no_pipelining,
                no_chunking: a.no_chunking,
                threads: a.threads.map_or_else(default_threads, |t| t as usize),
                quiet: a.quiet,
            };
            match sink::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice-load sink: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Idle(a) => {
            let json = a.json;
            let cfg = idle::IdleConfig {
                target: a.target,
                connections: a.connections as usize,
                hold: a.hold,
                setup_timeout: a.setup_timeout,
                batch: a.batch as usize,
                ready_file: a.ready_file,
                helo: a.helo,
            };
            match idle::run(cfg) {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else {
                        println!(
                            "idle: {} requested, {} established, {} failed, {} dropped during hold, \
                             {} held at end, {} QUIT ok; setup {:.2}s, held {:.2}s ({}), nofile {}",
                            r.requested,
                            r.established,
                            r.failed,
                            r.dropped_during_hold,
                            r.held_at_end,
                            r.quit_ok,
                            r.setup_s,
                            r.held_s,
                            r.hold_ended_by,
                            r.nofile_limit
                        );
                        for (e, n) in &r.errors {
                            println!("error: {n} x {e}");
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sluice-load idle: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// One event-loop thread per CPU, at most 4: more threads than cores only add switching.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4)
}

/// `500`, `500/s`, `30000/m`: messages per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, per) = match t.split_once('/') {
        Some((n, u)) => (n.trim(), u.trim()),
        None => (t, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad rate {s:?}"))?;
    let secs = match per {
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        u => return Err(format!("bad rate unit {u:?} in {s:?}")),
    };
    let r = n / secs;
    if !(r.is_finite() && r > 0.0 && r <= 10_000_000.0) {
        return Err(format!("rate out of range: {s:?}"));
    }
    Ok(r)
}

/// Writes `text` to FILE, or stdout for `-`.
fn emit(target: &std::path::Path, text: &str) -> std::io::Result<()> {
    if target.as_os_str() == "-" {
        println!("{text}");
        Ok(())
    } else {
        util::write_atomic(target, format!("{text}\n").as_bytes())
    }
}

fn run_send(a: SendArgs) -> ExitCode {
    if let Err(e) = check_loopback(a.target, a.allow_non_loopback) {
        eprintln!("sluice-load send: {e}");
        return ExitCode::from(2);
    }
    let sizes = match &a.size_dist {
        Some(d) => match message::SizeDist::parse(d) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("sluice-load send: --size-dist: {e}");
                return ExitCode::from(2);
            }
        },
        None => message::SizeDist::fixed(a.size),
    };
    let messages = match (a.messages, a.duration) {
        (None, None) => Some(10_000),
        (m, _) => m,
    };
    let cfg = send::SendConfig {
        target: a.target,
        connections: a.connections as usize,
        threads: a.threads.map_or_else(default_threads, |t| t as usize),
        messages,
        duration: a.duration,
        rate: a.rate,
        sizes,
        body: a.body,
        recipients: a.recipients as usize,
        domains: a.domains,
        from: a.from,
        rcpt_template: a.rcpt_template,
        pipelining: a.pipelining,
        chunking: a.chunking,
        chunk_size: a.chunk_size.max(1),
        messages_per_connection: a.messages_per_connection,
        io_timeout: a.io_timeout,
        connect_attempts: a.connect_attempts,
        helo: a.helo,
        acked: a.acked,
        ids_file: a.ids_file,
        run_id: a.run_id,
        progress: a.progress,
        progress_interval: a.progress_interval,
    };
    let report = match send::run(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-load send: {e}");
            return ExitCode::from(1);
        }
    };
    let stdout_json = a.json.as_deref().is_some_and(|p| p.as_os_str() == "-");
    if !stdout_json {
        print!("{}", send::report::render_text(&report));
    }
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = emit(p, &text) {
            eprintln!("sluice-load send: writing --json: {e}");
            return ExitCode::from(1);
        }
    }
    // Not a single connection: a setup problem (bad target), not a measurement.
    if report.connections_opened == 0 {
        let why = report
            .error_samples
            .keys()
            .next()
            .cloned()
            .unwrap_or_else(|| "no connection".into());
        eprintln!(
            "sluice-load send: could not open any connection to {}: {why}",
            report.target
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn run_verify(a: VerifyArgs) -> ExitCode {
    let r = match verify::run(&a.acked, &a.received) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-load verify: {e}");
            return ExitCode::from(2);
        }
    };
    let stdout_json = a.json.as_deref().is_some_and(|p| p.as_os_str() == "-");
    if !stdout_json {
        print!("{}", verify::render_text(&r));
    }
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&r).unwrap_or_default();
        if let Err(e) = emit(p, &text) {
            eprintln!("sluice-load verify: writing --json: {e}");
            return ExitCode::from(2);
        }
    }
    if r.lost > 0 || (a.fail_on_duplicates && r.duplicated > 0) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
