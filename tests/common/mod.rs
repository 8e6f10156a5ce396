//! Test harness: the built `sluice` binary as a child process with a temp
//! config, ports picked by the server (port 0) and read from `--ready-file`.
#![allow(dead_code)]

pub mod dns;
pub mod sink;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// Generous deadline for anything that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `f` until it returns Some or the deadline passes.
pub fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running server; killed on drop.
pub struct Server {
    pub child: Child,
    pub smtp: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: PathBuf,
    pub log: PathBuf,
}

/// Config text with port-0 listeners, the spool in `dir`, plus `extra`
/// appended to `[server]` and `tail` appended at the end. Delivery is off
/// (mail stays in the spool, as these tests inspect it) unless `tail` has
/// its own `[delivery]` section.
pub fn config(dir: &Path, server_extra: &str, tail: &str) -> String {
    let hold = if tail.contains("[delivery]") {
        ""
    } else {
        "[delivery]\nenabled = false\n"
    };
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\nshards = 2\n{server_extra}\n\
         [spool]\npath = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n{hold}{tail}\n",
        dir.join("spool").display()
    )
}

impl Server {
    /// Starts a server with `config_text` in `dir`; panics (with the log) if
    /// it does not become ready.
    pub fn start(dir: &Path, config_text: &str) -> Server {
        match Server::try_start(dir, config_text) {
            Ok(s) => s,
            Err((status, log)) => panic!("server did not start ({status:?}): {log}"),
        }
    }

    /// Starts a server; on failure returns its exit status and log.
    pub fn try_start(dir: &Path, config_text: &str) -> Result<Server, (ExitStatus, String)> {
        let cfg = dir.join("sluice.toml");
        std::fs::write(&cfg, config_text).unwrap();
        let ready = dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let log = dir.join(format!("log-{}", std::process::id()));
        let log = unique(&log);
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            smtp: "0.0.0.0:0".parse().unwrap(),
            metrics: "0.0.0.0:0".parse().unwrap(),
            dir: dir.to_owned(),
            log,
        };
        let outcome = poll("ready file", || {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                return Some(Ok(text));
            }
            server.child.try_wait().unwrap().map(Err)
        });
        match outcome {
            Ok(text) => {
                for line in text.lines() {
                    let (kind, addr) = line.split_once(' ').unwrap();
                    match kind {
                        "smtp" => server.smtp = addr.parse().unwrap(),
                        "metrics" => server.metrics = addr.parse().unwrap(),
                        _ => {}
                    }
                }
                Ok(server)
            }
            Err(status) => Err((status, server.log_text())),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::connect(self.smtp)
    }

    /// Sends a signal with the `kill` command (no unsafe in tests).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        poll("server exit", || self.child.try_wait().unwrap())
    }

    /// `GET path` on the admin endpoint.
    pub fn http(&self, path: &str) -> String {
        http_get(self.metrics, path)
    }

    /// Queue ids from `GET /queue`.
    pub fn queue(&self) -> Vec<QueueEntry> {
        parse_queue(&self.http("/queue?limit=1000000"))
    }
}

fn unique(p: &Path) -> PathBuf {
    let mut n = 0;
    loop {
        let c = p.with_extension(n.to_string());
        if !c.exists() {
            return c;
        }
        n += 1;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- server log {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueEntry {
    pub id: String,
    pub size: u64,
    pub sender: String,
    pub recipients: Vec<String>,
    /// Per recipient: the state line after the address
    /// (`pending`, `deferred\tattempts=1\t...`).
    pub states: Vec<String>,
}

/// Parses the `/queue` listing (see `src/server/queue.rs`); the `queue` and
/// `domain` summary lines are skipped.
pub fn parse_queue(text: &str) -> Vec<QueueEntry> {
    let mut lines = text.lines();
    let count: usize = lines
        .next()
        .and_then(|l| l.strip_prefix("count "))
        .expect("count line")
        .parse()
        .unwrap();
    let mut entries: Vec<QueueEntry> = Vec::new();
    for l in lines {
        if let Some(rest) = l.strip_prefix('\t') {
            let (_, state) = rest.split_once('\t').unwrap();
            entries.last_mut().unwrap().states.push(state.to_owned());
            continue;
        }
        if l.starts_with("queue\t") || l.starts_with("domain\t") {
            continue;
        }
        let f: Vec<&str> = l.split('\t').collect();
        entries.push(QueueEntry {
            id: f[0].to_owned(),
            size: f[1].parse().unwrap(),
            sender: f[2].to_owned(),
            recipients: f[3].split(' ').map(str::to_owned).collect(),
            states: Vec::new(),
        });
    }
    assert_eq!(count, entries.len(), "listing limit too small for the test");
    entries
}

/// A minimal SMTP client over std TCP.
pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub stream: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    /// Reads one (possibly multi-line) reply; "" at EOF.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    pub fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    /// Sends a command line and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n"));
        self.reply()
    }

    /// Greeting + EHLO.
    pub fn hello(&mut self) {
        let g = self.reply();
        assert!(g.starts_with("220 "), "{g}");
        let e = self.cmd("EHLO client.test");
        assert!(e.starts_with("250"), "{e}");
    }

    /// A whole transaction; returns the final reply to the data.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250"), "{r}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert!(r.starts_with("250"), "{r}");
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "{r}");
        self.send(body);
        self.send(if body.ends_with("\r\n") {
            ".\r\n"
        } else {
            "\r\n.\r\n"
        });
        self.reply()
    }

    /// True once the server closed the connection (EOF), polling reads.
    pub fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }
}

/// The id from `250 2.0.0 Ok: queued as ID`.
pub fn queued_id(reply: &str) -> String {
    let id = reply
        .trim_end()
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("not a queued reply: {reply:?}"));
    id.to_owned()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sluice-it")
        .tempdir()
        .unwrap()
}

/// Load for the kill -9 tests: on one connection, sends messages until
/// `stop` or until the connection breaks (the server is killed under us, so
/// I/O errors end the loop quietly). `message(n)` gives the n-th message
/// (1-based) as (the MAIL, RCPT and DATA lines, pipelined; the content
/// with its final `.` line); `acked(n, reply)` sees every final reply that
/// starts with `250 `. Any other final reply must be a 4xx.
pub fn send_until_killed(
    addr: SocketAddr,
    stop: &std::sync::atomic::AtomicBool,
    mut message: impl FnMut(u64) -> (String, String),
    mut acked: impl FnMut(u64, &str),
) {
    let mut run = || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(DEADLINE))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        let mut reply = |r: &mut BufReader<TcpStream>| -> std::io::Result<String> {
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Ok(line.clone());
                }
            }
        };
        reply(&mut r)?;
        s.write_all(b"EHLO crash.test\r\n")?;
        reply(&mut r)?;
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let (envelope, content) = message(n);
            s.write_all(envelope.as_bytes())?;
            for _ in 0..3 {
                reply(&mut r)?;
            }
            s.write_all(content.as_bytes())?;
            let done = reply(&mut r)?;
            if done.starts_with("250 ") {
                acked(n, &done);
            } else {
                assert!(done.starts_with('4'), "unexpected reply {done:?}");
            }
        }
        Ok(())
    };
    let _ = run();
}
