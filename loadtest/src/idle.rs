//! `idle`: open many SMTP connections from one thread (nonblocking sockets + poll(2)),
//! bring each to the post-EHLO idle state, hold them, then QUIT. A thread per connection
//! would cost more memory than the server under test, which is what this mode measures.

use sluice::smtp::Reply;
use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::sys;
use crate::util::write_atomic;

/// Everything `idle` needs; built from the command line.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    /// Server to connect to.
    pub target: SocketAddr,
    /// Connections to open.
    pub connections: usize,
    /// How long to hold them once all are set up.
    pub hold: Duration,
    /// Upper bound on the setup phase (connect + greeting + EHLO for all).
    pub setup_timeout: Duration,
    /// Most handshakes in flight at once.
    pub batch: usize,
    /// Receives a JSON line once setup is done and the hold begins.
    pub ready_file: Option<PathBuf>,
    /// Name sent in EHLO.
    pub helo: String,
}

/// The `idle` report.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Target address.
    pub target: String,
    /// Connections requested.
    pub requested: usize,
    /// Connections that reached the idle state (greeting 220 and EHLO 250).
    pub established: usize,
    /// Connections that failed to connect or to complete greeting/EHLO.
    pub failed: usize,
    /// Idle connections closed by the server (or erroring) during the hold.
    pub dropped_during_hold: usize,
    /// Connections still idle at the end of the hold.
    pub held_at_end: usize,
    /// Connections that got 221 to QUIT.
    pub quit_ok: usize,
    /// Errors by kind, with counts.
    pub errors: BTreeMap<String, u64>,
    /// Seconds the setup phase took.
    pub setup_s: f64,
    /// Seconds the connections were held.
    pub held_s: f64,
    /// Why the hold ended: `duration` or `stdin-closed`.
    pub hold_ended_by: String,
    /// RLIMIT_NOFILE soft limit in effect.
    pub nofile_limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Connecting,
    Greeting,
    Ehlo,
    Idle,
    Quitting,
    Closed,
}

struct Conn {
    stream: TcpStream,
    st: St,
    buf: Vec<u8>,
}

/// Takes one complete reply off the front of `buf` (parsed by Sluice's [`Reply::parse`])
/// and returns its code; `None` while the reply is incomplete.
fn take_reply(buf: &mut Vec<u8>) -> Option<Result<u16, String>> {
    match Reply::parse(buf) {
        Ok(Some((reply, n))) => {
            buf.drain(..n);
            Some(Ok(reply.code()))
        }
        Ok(None) => None,
        Err(e) => {
            buf.clear();
            Some(Err(format!("bad reply: {e}")))
        }
    }
}

struct Run {
    conns: Vec<Conn>,
    errors: BTreeMap<String, u64>,
    established: usize,
    failed: usize,
    dropped: usize,
    quit_ok: usize,
}

impl Run {
    fn err(&mut self, key: String) {
        *self.errors.entry(key).or_insert(0) += 1;
    }

    fn fail(&mut self, i: usize, key: String) {
        match self.conns[i].st {
            St::Idle => self.dropped += 1,
            St::Quitting => {}
            _ => self.failed += 1,
        }
        self.conns[i].st = St::Closed;
        let _ = self.conns[i].stream.shutdown(std::net::Shutdown::Both);
        self.err(key);
    }

    fn in_handshake(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| matches!(c.st, St::Connecting | St::Greeting | St::Ehlo))
            .count()
    }

    /// Polls all live connections (plus `extra_fd`) once; advances state machines.
    /// Returns the revents of `extra_fd`.
    fn poll_once(
        &mut self,
        timeout: Duration,
        extra_fd: Option<i32>,
        helo: &str,
    ) -> io::Result<i16> {
        let mut fds = Vec::with_capacity(self.conns.len() + 1);
        let mut idx = Vec::with_capacity(self.conns.len());
        for (i, c) in self.conns.iter().enumerate() {
            let events = match c.st {
                St::Connecting => libc::POLLOUT,
                St::Closed => continue,
                _ => libc::POLLIN,
            };
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
            idx.push(i);
        }
        if let Some(fd) = extra_fd {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        sys::poll(&mut fds, timeout)?;
        let extra = if extra_fd.is_some() {
            fds.pop().map_or(0, |f| f.revents)
        } else {
            0
        };
        for (k, f) in fds.iter().enumerate() {
            if f.revents != 0 {
                self.advance(idx[k], f.revents, helo);
            }
        }
        Ok(extra)
    }

    fn advance(&mut self, i: usize, revents: i16, helo: &str) {
        if self.conns[i].st == St::Connecting {
            let sock = socket2::SockRef::from(&self.conns[i].stream);
            match sock.take_error() {
                Ok(None) if revents & (libc::POLLERR | libc::POLLHUP) == 0 => {
                    self.conns[i].st = St::Greeting;
                }
                Ok(Some(e)) | Err(e) => return self.fail(i, format!("connect: {e}")),
                Ok(None) => return self.fail(i, "connect: hangup".into()),
            }
            return;
        }
        // Read whatever is there (nonblocking).
        let mut tmp = [0u8; 4096];
        loop {
            match self.conns[i].stream.read(&mut tmp) {
                Ok(0) => {
                    let what = match self.conns[i].st {
                        St::Quitting => {
                            self.conns[i].st = St::Closed;
                            return;
                        }
                        St::Idle => "closed by server during hold",
                        _ => "closed by server during setup",
                    };
                    return self.fail(i, what.into());
                }
                Ok(n) => {
                    self.conns[i].buf.extend_from_slice(&tmp[..n]);
                    if n < tmp.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(i, format!("read: {e}")),
            }
        }
        while let Some(rep) = take_reply(&mut self.conns[i].buf) {
            let code = match rep {
                Ok(c) => c,
                Err(e) => return self.fail(i, e),
            };
            match (self.conns[i].st, code) {
                (St::Greeting, 220) => {
                    let cmd = format!("EHLO {helo}\r\n");
                    // A few bytes into an empty socket buffer: a short write would be a bug
                    // in the kernel's accounting, so treat it as an error.
                    match self.conns[i].stream.write(cmd.as_bytes()) {
                        Ok(n) if n == cmd.len() => self.conns[i].st = St::Ehlo,
                        Ok(_) => return self.fail(i, "short write of EHLO".into()),
                        Err(e) => return self.fail(i, format!("write EHLO: {e}")),
                    }
                }
                (St::Ehlo, 250) => {
                    self.conns[i].st = St::Idle;
                    self.established += 1;
                }
                (St::Quitting, 221) => {
                    self.quit_ok += 1;
                    self.conns[i].st = St::Closed;
                    let _ = self.conns[i].stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
                (st, code) => {
                    if st == St::Idle {
                        self.established -= 1;
                    }
                    return self.fail(i, format!("unexpected reply {code} in state {st:?}"));
                }
            }
        }
    }
}

fn open(target: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    match sock.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

/// The stdin fd to watch for EOF, if stdin is a pipe, socket or terminal. /dev/null or a
/// file (e.g. under CI) would read EOF at once and must not end the hold.
fn watchable_stdin() -> Option<i32> {
    let stdin = io::stdin();
    if stdin.is_terminal() {
        return Some(0);
    }
    let fd = std::os::fd::AsFd::as_fd(&stdin).try_clone_to_owned().ok()?;
    let ft = std::fs::File::from(fd).metadata().ok()?.file_type();
    (ft.is_fifo() || ft.is_socket()).then_some(0)
}

/// Runs `idle` and returns its report.
pub fn run(cfg: IdleConfig) -> io::Result<IdleReport> {
    let nofile = sys::raise_nofile(cfg.connections as u64 + 64)?;
    let mut run = Run {
        conns: Vec::with_capacity(cfg.connections),
        errors: BTreeMap::new(),
        established: 0,
        failed: 0,
        dropped: 0,
        quit_ok: 0,
    };
    let t_setup = Instant::now();
    let setup_deadline = t_setup + cfg.setup_timeout;
    let mut opened = 0usize;
    while Instant::now() < setup_deadline {
        // Keep at most `batch` handshakes in flight so the server's accept queue is not
        // flooded (which would turn into SYN retransmits and 1 s stalls).
        let mut room = cfg.batch.saturating_sub(run.in_handshake());
        while room > 0 && opened < cfg.connections {
            opened += 1;
            room -= 1;
            match open(cfg.target) {
                Ok(stream) => run.conns.push(Conn {
                    stream,
                    st: St::Connecting,
                    buf: Vec::new(),
                }),
                Err(e) => {
                    run.failed += 1;
                    run.err(format!("connect: {e}"));
                }
            }
        }
        if opened >= cfg.connections && run.in_handshake() == 0 {
            break;
        }
        let left = setup_deadline.saturating_duration_since(Instant::now());
        run.poll_once(left.min(Duration::from_millis(200)), None, &cfg.helo)?;
    }
    // Whatever is still mid-handshake at the deadline counts as failed.
    for i in 0..run.conns.len() {
        if matches!(run.conns[i].st, St::Connecting | St::Greeting | St::Ehlo) {
            run.fail(i, "setup timeout".into());
        }
    }
    run.failed += cfg.connections - opened;
    let setup_s = t_setup.elapsed().as_secs_f64();
    eprintln!(
        "idle: {} of {} connections established in {:.2}s; holding for {:?}",
        run.established, cfg.connections, setup_s, cfg.hold
    );
    if let Some(p) = &cfg.ready_file {
        let j = serde_json::json!({ "established": run.established, "failed": run.failed });
        write_atomic(p, format!("{j}\n").as_bytes())?;
    }

    let stdin_fd = watchable_stdin();
    let t_hold = Instant::now();
    let hold_deadline = t_hold + cfg.hold;
    let mut ended_by = "duration";
    while Instant::now() < hold_deadline {
        let left = hold_deadline.saturating_duration_since(Instant::now());
        let rev = run.poll_once(left.min(Duration::from_secs(1)), stdin_fd, &cfg.helo)?;
        if rev != 0 {
            // Readable or hung up: EOF (or an error) ends the hold, other input is ignored.
            let mut b = [0u8; 1024];
            if matches!(io::stdin().read(&mut b), Ok(0) | Err(_)) {
                ended_by = "stdin-closed";
                break;
            }
        }
    }
    let held_s = t_hold.elapsed().as_secs_f64();
    let held_at_end = run.conns.iter().filter(|c| c.st == St::Idle).count();

    // QUIT everything still idle; wait (bounded) for 221s.
    for i in 0..run.conns.len() {
        if run.conns[i].st == St::Idle {
            match run.conns[i].stream.write(b"QUIT\r\n") {
                Ok(6) => run.conns[i].st = St::Quitting,
                Ok(_) => run.fail(i, "short write of QUIT".into()),
                Err(e) => run.fail(i, format!("write QUIT: {e}")),
            }
        }
    }
    let quit_deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < quit_deadline && run.conns.iter().any(|c| c.st == St::Quitting) {
        let left = quit_deadline.saturating_duration_since(Instant::now());
        run.poll_once(left.min(Duration::from_millis(200)), None, &cfg.helo)?;
    }
    let quit_pending = run.conns.iter().filter(|c| c.st == St::Quitting).count();
    if quit_pending > 0 {
        run.err("no reply to QUIT".into());
    }
    Ok(IdleReport {
        target: cfg.target.to_string(),
        requested: cfg.connections,
        established: run.established,
        failed: run.failed,
        dropped_during_hold: run.dropped,
        held_at_end,
        quit_ok: run.quit_ok,
        errors: run.errors,
        setup_s,
        held_s,
        hold_ended_by: ended_by.into(),
        nofile_limit: nofile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        for (input, want) in [
            (&b"220 hi\r\n"[..], Some(Ok(220))),
            (b"250-a\r\n250-b\r\n250 c\r\n", Some(Ok(250))),
            (b"250-a\r\n250-b", None),
            (b"221\r\n", Some(Ok(221))),
            (b"hello\r\n", Some(Err(()))),
        ] {
            let mut b = input.to_vec();
            let got = take_reply(&mut b).map(|r| r.map_err(|_| ()));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(input));
        }
    }
}
