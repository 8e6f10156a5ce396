//! The `sluice` command: `serve`, `check-config`, `queue`.

use std::path::PathBuf;
use std::process::ExitCode;

use sluice::config::Config;
use sluice::server::{self, ServeOptions};

const USAGE: &str = "usage:
  sluice serve [--config FILE] [--ready-file FILE]
  sluice check-config FILE
  sluice queue [--config FILE] [--limit N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            // One line, for operators and init systems alike.
            eprintln!("sluice: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Parsed flags of one subcommand.
#[derive(Default)]
struct Flags {
    config: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    limit: Option<usize>,
    positional: Vec<String>,
}

fn parse_flags(args: &[String], allowed: &[&str]) -> Result<Flags, String> {
    let mut flags = Flags::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        if !name.starts_with("--") {
            flags.positional.push(arg.clone());
            continue;
        }
        if !allowed.contains(&name) {
            return Err(format!("unknown option {name}\n{USAGE}"));
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))?,
        };
        match name {
            "--config" => flags.config = Some(value.into()),
            "--ready-file" => flags.ready_file = Some(value.into()),
            "--limit" => {
                flags.limit = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--limit needs a number, got {value:?}"))?,
                )
            }
            _ => unreachable!("checked against allowed"),
        }
    }
    Ok(flags)
}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

/// Writes command output to stdout. A reader that goes away early
/// (`sluice queue | head`) is not an error; `print!` would panic.
fn emit(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write output: {e}"))
        }
        _ => Ok(()),
    }
}

/// Whether `args` ask for help (`sluice serve --help`).
fn wants_help(args: &[String]) -> bool {
    args.iter().any(|a| a == "-h" || a == "--help")
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(args: &[String]) -> Result<(), String> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(format!("no command given\n{USAGE}"));
    };
    if wants_help(rest) {
        return emit(&format!("{USAGE}\n"));
    }
    match cmd.as_str() {
        "serve" => {
            let flags = parse_flags(rest, &["--config", "--ready-file"])?;
            if !flags.positional.is_empty() {
                return Err(format!("unexpected argument {:?}", flags.positional[0]));
            }
            let config = load(flags.config.as_ref())?;
            init_logging();
            server::serve(
                config,
                ServeOptions {
                    ready_file: flags.ready_file,
                },
            )
            .map_err(|e| e.to_string())
        }
        "check-config" => {
            let flags = parse_flags(rest, &[])?;
            let [file] = flags.positional.as_slice() else {
                return Err(format!("check-config takes one FILE\n{USAGE}"));
            };
            let config = Config::load(file.as_ref()).map_err(|e| e.to_string())?;
            emit(&config.to_toml())
        }
        "queue" => {
            let flags = parse_flags(rest, &["--config", "--limit"])?;
            let config = load(flags.config.as_ref())?;
            let limit = flags.limit.unwrap_or(1000);
            // sled locks the spool while the server runs: ask the server
            // first, open the spool directly only when nobody answers.
            if config.metrics.enabled && config.metrics.listen.port() != 0 {
                let path = format!("/queue?limit={limit}");
                if let Ok(text) = sluice::metrics::http_get(config.metrics.listen, &path) {
                    return emit(&text);
                }
            }
            let text = server::queue::render_offline(&config.spool.path, limit)?;
            emit(&text)
        }
        "-h" | "--help" | "help" => emit(&format!("{USAGE}\n")),
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}
