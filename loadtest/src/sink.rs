//! `sink`: an SMTP server that accepts (or refuses, as configured) everything, counts what it
//! sees and optionally stores each message. One thread per connection, bounded in number.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::util::write_atomic;

/// Everything `sink` needs; built from the command line.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Receives the bound address once listening.
    pub ready_file: Option<PathBuf>,
    /// Reply code for every RCPT.
    pub reply_rcpt: u16,
    /// Final reply code after the message data.
    pub reply_data: u16,
    /// The first N transactions get 451 at end of data, later ones the normal reply.
    pub fail_first: u64,
    /// Most concurrent connections; more are answered 421 and closed.
    pub max_connections: usize,
    /// Where stats JSON is written (atomically).
    pub stats_file: Option<PathBuf>,
    /// Directory for `NNNNNNNN.eml` + `NNNNNNNN.json` per accepted message.
    pub store: Option<PathBuf>,
    /// SIZE limit advertised and enforced.
    pub max_message_size: u64,
    /// Idle timeout per connection.
    pub idle_timeout: Duration,
    /// Hostname in greeting and EHLO.
    pub hostname: String,
    /// Do not advertise PIPELINING.
    pub no_pipelining: bool,
    /// Do not advertise CHUNKING.
    pub no_chunking: bool,
}

/// Counters written to the stats file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStats {
    /// Address the sink listens on.
    pub listen: String,
    /// Connections open now.
    pub connections_current: u64,
    /// Highest `connections_current` seen.
    pub connections_peak: u64,
    /// Connections accepted in total (including refused ones).
    pub connections_total: u64,
    /// Connections answered 421 because of `--max-connections`.
    pub connections_refused: u64,
    /// Messages accepted (2xx at end of data).
    pub messages: u64,
    /// Recipients of accepted messages.
    pub recipients: u64,
    /// Bytes of accepted messages (after dot-unstuffing).
    pub bytes: u64,
    /// Messages refused at end of data (configured code, --fail-first, or too big).
    pub messages_rejected: u64,
    /// Of those, refused by --fail-first.
    pub fail_first_used: u64,
    /// RCPT commands refused.
    pub rcpt_rejected: u64,
    /// Messages received via DATA.
    pub data_transfers: u64,
    /// Messages received via BDAT.
    pub bdat_transfers: u64,
    /// Commands that arrived while earlier input was still unanswered (pipelined).
    pub pipelined_commands: u64,
    /// Connections that ended with an I/O or protocol error.
    pub connection_errors: u64,
}

struct StatsCell {
    stats: SinkStats,
    dirty: bool,
}

struct Shared {
    cfg: SinkConfig,
    cell: Mutex<StatsCell>,
    cv: Condvar,
    fail_first_left: AtomicU64,
    seq: AtomicU64,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut SinkStats)) {
        let mut c = self.cell.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c.stats);
        c.dirty = true;
        drop(c);
        self.cv.notify_one();
    }

    fn snapshot(&self) -> SinkStats {
        self.cell
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stats
            .clone()
    }
}

/// Writes the stats file whenever something changed. Coalesces bursts: under load the file
/// reflects the newest counts rather than being rewritten once per message.
fn stats_writer(shared: Arc<Shared>, path: PathBuf) {
    loop {
        let snap = {
            let mut c = shared.cell.lock().unwrap_or_else(|p| p.into_inner());
            while !c.dirty {
                c = shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
            }
            c.dirty = false;
            c.stats.clone()
        };
        if let Err(e) = write_stats(&path, &snap) {
            eprintln!("sink: writing stats: {e}");
        }
    }
}

fn write_stats(path: &Path, s: &SinkStats) -> io::Result<()> {
    let mut json = serde_json::to_vec_pretty(s).map_err(io::Error::other)?;
    json.push(b'\n');
    write_atomic(path, &json)
}

/// Runs the sink until SIGTERM/SIGINT (then writes final stats and exits the process).
pub fn run(cfg: SinkConfig) -> io::Result<()> {
    // One descriptor per connection plus store/stats files: make room up front.
    let _ = crate::sys::raise_nofile(2 * cfg.max_connections as u64 + 64);
    let listener = TcpListener::bind(cfg.listen)?;
    let local = listener.local_addr()?;
    let shared = Arc::new(Shared {
        fail_first_left: AtomicU64::new(cfg.fail_first),
        seq: AtomicU64::new(0),
        cell: Mutex::new(StatsCell {
            stats: SinkStats {
                listen: local.to_string(),
                ..Default::default()
            },
            dirty: true,
        }),
        cv: Condvar::new(),
        cfg,
    });
    if let Some(dir) = &shared.cfg.store {
        std::fs::create_dir_all(dir)?;
    }
    if let Some(path) = shared.cfg.stats_file.clone() {
        write_stats(&path, &shared.snapshot())?;
        let sh = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("sink-stats".into())
            .spawn(move || stats_writer(sh, path))?;
    }
    {
        let sh = Arc::clone(&shared);
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        std::thread::Builder::new()
            .name("sink-signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    if let Some(p) = &sh.cfg.stats_file {
                        let _ = write_stats(p, &sh.snapshot());
                    }
                    std::process::exit(0);
                }
            })?;
    }
    // Ready only after signal handlers and stats are in place, so a test that saw the ready
    // file can rely on SIGTERM producing final stats.
    if let Some(p) = &shared.cfg.ready_file {
        write_atomic(p, format!("{local}\n").as_bytes())?;
    }
    eprintln!("sink: listening on {local}");
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("sink: accept: {e}");
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let admitted = {
            let mut c = shared.cell.lock().unwrap_or_else(|p| p.into_inner());
            c.stats.connections_total += 1;
            c.dirty = true;
            if c.stats.connections_current as usize >= shared.cfg.max_connections {
                c.stats.connections_refused += 1;
                false
            } else {
                c.stats.connections_current += 1;
                c.stats.connections_peak =
                    c.stats.connections_peak.max(c.stats.connections_current);
                true
            }
        };
        shared.cv.notify_one();
        if !admitted {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = (&stream).write_all(b"421 4.7.0 too many connections, try later\r\n");
            continue;
        }
        let sh = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("sink-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let res = handle(stream, &sh);
                sh.update(|s| {
                    s.connections_current -= 1;
                    if res.is_err() {
                        s.connection_errors += 1;
                    }
                });
            });
        if let Err(e) = spawned {
            eprintln!("sink: spawn: {e}");
            shared.update(|s| {
                s.connections_current -= 1;
                s.connection_errors += 1;
            });
        }
    }
    Ok(())
}

/// Result of reading one line with a length bound.
enum Line {
    Eof,
    Ok,
    TooLong,
}

/// Reads a line (through LF) into `buf`, at most `max` bytes; longer lines are consumed and
/// dropped so the session can answer 500 and continue.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok(if buf.is_empty() && !too_long {
                Line::Eof
            } else {
                Line::Ok
            });
        }
        let (take, done) = match memchr_lf(avail) {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if !too_long {
            if buf.len() + take > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&avail[..take]);
            }
        }
        r.consume(take);
        if done {
            return Ok(if too_long { Line::TooLong } else { Line::Ok });
        }
    }
}

fn memchr_lf(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Extracts the address between `<` and `>` after `prefix:` (lenient; the sink is not a
/// validator).
fn path_arg(args: &str) -> Option<String> {
    let colon = args.find(':')?;
    let rest = args[colon + 1..].trim_start();
    if let Some(stripped) = rest.strip_prefix('<') {
        let end = stripped.find('>')?;
        Some(stripped[..end].to_string())
    } else {
        rest.split_whitespace().next().map(str::to_string)
    }
}

fn enhanced_for(code: u16) -> String {
    format!("{}.0.0", code / 100)
}

/// Per-connection SMTP state.
struct Session<'a> {
    shared: &'a Shared,
    helo: Option<String>,
    mail_from: Option<String>,
    rcpts: Vec<String>,
    /// BDAT accumulation; `Some` once a BDAT chunk was received in this transaction.
    bdat: Option<Vec<u8>>,
    bdat_too_big: bool,
    out: Vec<u8>,
}

impl Session<'_> {
    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
        self.bdat = None;
        self.bdat_too_big = false;
    }

    /// End of message data: decide, count, store, reply.
    fn finish(&mut self, body: Vec<u8>, too_big: bool, transfer: &'static str) -> io::Result<()> {
        let sh = self.shared;
        let cfg = &sh.cfg;
        if transfer == "DATA" {
            sh.update(|s| s.data_transfers += 1);
        } else {
            sh.update(|s| s.bdat_transfers += 1);
        }
        if too_big {
            sh.update(|s| s.messages_rejected += 1);
            self.reply("552 5.3.4 message exceeds size limit");
        } else if sh
            .fail_first_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            sh.update(|s| {
                s.messages_rejected += 1;
                s.fail_first_used += 1;
            });
            self.reply("451 4.3.0 sink: temporary failure (--fail-first)");
        } else if !(200..300).contains(&cfg.reply_data) {
            sh.update(|s| s.messages_rejected += 1);
            let text = match cfg.reply_data {
                451 => "4.3.0 sink: temporary failure".to_string(),
                554 => "5.6.0 sink: message refused".to_string(),
                c => format!("{} sink: refused", enhanced_for(c)),
            };
            self.reply(&format!("{} {}", cfg.reply_data, text));
        } else {
            let seq = sh.seq.fetch_add(1, Ordering::SeqCst) + 1;
            let queue_id = format!("SINK{seq:08}");
            if let Some(dir) = &cfg.store {
                self.store(dir, seq, &queue_id, &body, transfer)?;
            }
            let n_rcpt = self.rcpts.len() as u64;
            let len = body.len() as u64;
            sh.update(|s| {
                s.messages += 1;
                s.recipients += n_rcpt;
                s.bytes += len;
            });
            self.reply(&format!(
                "{} 2.0.0 Ok: queued as {queue_id}",
                cfg.reply_data
            ));
        }
        self.reset();
        Ok(())
    }

    /// Writes the message bytes exactly as received (unstuffed) and then the envelope, so a
    /// reader that sees `N.json` can rely on `N.eml` being complete.
    fn store(
        &self,
        dir: &Path,
        seq: u64,
        queue_id: &str,
        body: &[u8],
        transfer: &str,
    ) -> io::Result<()> {
        write_atomic(&dir.join(format!("{seq:08}.eml")), body)?;
        let env = serde_json::json!({
            "seq": seq,
            "queue_id": queue_id,
            "helo": self.helo,
            "mail_from": self.mail_from,
            "rcpt_to": self.rcpts,
            "transfer": transfer,
            "size": body.len(),
        });
        let mut j = serde_json::to_vec_pretty(&env).map_err(io::Error::other)?;
        j.push(b'\n');
        write_atomic(&dir.join(format!("{seq:08}.json")), &j)
    }
}

fn flush(stream: &TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        let mut w = stream;
        w.write_all(out)?;
        out.clear();
    }
    Ok(())
}

const MAX_CMD_LINE: usize = 4096;
const MAX_RCPTS: usize = 1000;

fn handle(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let cfg = &shared.cfg;
    stream.set_read_timeout(Some(cfg.idle_timeout))?;
    stream.set_write_timeout(Some(cfg.idle_timeout))?;
    let _ = stream.set_nodelay(true);
    // Read through a shared reference: no try_clone, so one descriptor per connection.
    let mut reader = BufReader::with_capacity(64 * 1024, &stream);
    let mut s = Session {
        shared,
        helo: None,
        mail_from: None,
        rcpts: Vec::new(),
        bdat: None,
        bdat_too_big: false,
        out: Vec::with_capacity(1024),
    };
    s.reply(&format!("220 {} ESMTP sluice-load sink", cfg.hostname));
    let mut line = Vec::with_capacity(512);
    loop {
        // Replies are batched while pipelined input is pending and flushed before blocking
        // (RFC 2920 server behaviour).
        if reader.buffer().is_empty() {
            flush(&stream, &mut s.out)?;
        } else {
            shared.update(|st| st.pipelined_commands += 1);
        }
        match read_line(&mut reader, &mut line, MAX_CMD_LINE)? {
            Line::Eof => return Ok(()),
            Line::TooLong => {
                s.reply("500 5.5.2 line too long");
                continue;
            }
            Line::Ok => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let (verb, args) = match text.find(' ') {
            Some(i) => (&text[..i], text[i + 1..].trim()),
            None => (text, ""),
        };
        let verb = verb.to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                s.reset();
                s.helo = Some(args.to_string());
                let mut lines = vec![format!("{} greets {}", cfg.hostname, args)];
                if !cfg.no_pipelining {
                    lines.push("PIPELINING".into());
                }
                lines.push("8BITMIME".into());
                lines.push("SMTPUTF8".into());
                lines.push(format!("SIZE {}", cfg.max_message_size));
                if !cfg.no_chunking {
                    lines.push("CHUNKING".into());
                }
                lines.push("ENHANCEDSTATUSCODES".into());
                let n = lines.len();
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i + 1 == n { ' ' } else { '-' };
                    s.reply(&format!("250{sep}{l}"));
                }
            }
            "HELO" => {
                s.reset();
                s.helo = Some(args.to_string());
                s.reply(&format!("250 {}", cfg.hostname));
            }
            "MAIL" => {
                if s.helo.is_none() {
                    s.reply("503 5.5.1 send EHLO first");
                } else if s.mail_from.is_some() {
                    s.reply("503 5.5.1 nested MAIL command");
                } else if let Some(addr) = path_arg(args) {
                    s.mail_from = Some(addr);
                    s.reply("250 2.1.0 Ok");
                } else {
                    s.reply("501 5.5.4 syntax: MAIL FROM:<address>");
                }
            }
            "RCPT" => {
                if s.mail_from.is_none() {
                    s.reply("503 5.5.1 need MAIL first");
                } else if s.rcpts.len() >= MAX_RCPTS {
                    s.reply("452 4.5.3 too many recipients");
                } else if let Some(addr) = path_arg(args) {
                    if (200..300).contains(&cfg.reply_rcpt) {
                        s.rcpts.push(addr);
                        s.reply(&format!("{} 2.1.5 Ok", cfg.reply_rcpt));
                    } else {
                        shared.update(|st| st.rcpt_rejected += 1);
                        let text = match cfg.reply_rcpt {
                            450 => "4.2.1 sink: mailbox unavailable".to_string(),
                            550 => "5.1.1 sink: no such user".to_string(),
                            c => format!("{} sink: refused", enhanced_for(c)),
                        };
                        s.reply(&format!("{} {}", cfg.reply_rcpt, text));
                    }
                } else {
                    s.reply("501 5.5.4 syntax: RCPT TO:<address>");
                }
            }
            "DATA" => {
                if s.mail_from.is_none() {
                    s.reply("503 5.5.1 need MAIL first");
                } else if s.rcpts.is_empty() {
                    s.reply("554 5.5.1 no valid recipients");
                } else if s.bdat.is_some() {
                    s.reply("503 5.5.1 DATA after BDAT");
                } else {
                    s.reply("354 End data with <CR><LF>.<CR><LF>");
                    flush(&stream, &mut s.out)?;
                    let (body, too_big) = read_data(&mut reader, cfg.max_message_size)?;
                    s.finish(body, too_big, "DATA")?;
                }
            }
            "BDAT" => {
                let mut it = args.split_whitespace();
                let size: Option<u64> = it.next().and_then(|n| n.parse().ok());
                let last = match it.next() {
                    None => Some(false),
                    Some(w) if w.eq_ignore_ascii_case("LAST") => Some(true),
                    Some(_) => None,
                };
                let (Some(size), Some(last)) = (size, last) else {
                    // Without a valid size the byte stream cannot be resynchronised.
                    s.reply("501 5.5.4 syntax: BDAT size [LAST]; closing");
                    flush(&stream, &mut s.out)?;
                    return Ok(());
                };
                let valid = s.mail_from.is_some() && !s.rcpts.is_empty();
                if !valid {
                    io::copy(&mut (&mut reader).take(size), &mut io::sink())?;
                    s.reply("503 5.5.1 no valid transaction for BDAT");
                    if last {
                        s.reset();
                    }
                    continue;
                }
                let buf = s.bdat.get_or_insert_with(Vec::new);
                let room = cfg.max_message_size.saturating_sub(buf.len() as u64);
                let keep = size.min(room);
                let got = (&mut reader).take(keep).read_to_end(buf)? as u64;
                if got < keep {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "EOF in BDAT chunk",
                    ));
                }
                if size > keep {
                    s.bdat_too_big = true;
                    io::copy(&mut (&mut reader).take(size - keep), &mut io::sink())?;
                }
                if last {
                    let body = s.bdat.take().unwrap_or_default();
                    let too_big = s.bdat_too_big;
                    s.finish(body, too_big, "BDAT")?;
                } else {
                    s.reply(&format!("250 2.0.0 {size} octets received"));
                }
            }
            "RSET" => {
                s.reset();
                s.reply("250 2.0.0 Ok");
            }
            "NOOP" => s.reply("250 2.0.0 Ok"),
            "VRFY" => s.reply("252 2.5.2 cannot verify, will attempt delivery"),
            "HELP" => s.reply("214 2.0.0 sluice-load sink"),
            "QUIT" => {
                s.reply("221 2.0.0 Bye");
                flush(&stream, &mut s.out)?;
                return Ok(());
            }
            "" => s.reply("500 5.5.2 empty command"),
            _ => s.reply("502 5.5.1 command not implemented"),
        }
    }
}

/// Reads DATA content up to the terminating `.` line, removing dot-stuffing. Lines are read
/// in bounded segments; only a segment that starts a line is checked for a leading dot.
/// Returns the body and whether it exceeded `max` (then the excess was discarded).
fn read_data(r: &mut impl BufRead, max: u64) -> io::Result<(Vec<u8>, bool)> {
    let mut body = Vec::with_capacity(8 * 1024);
    let mut seg = Vec::with_capacity(1024);
    let mut at_line_start = true;
    let mut too_big = false;
    loop {
        seg.clear();
        let n = r.by_ref().take(64 * 1024).read_until(b'\n', &mut seg)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in DATA"));
        }
        let mut piece = &seg[..];
        if at_line_start {
            if piece == b".\r\n" || piece == b".\n" {
                return Ok((body, too_big));
            }
            if piece.first() == Some(&b'.') {
                piece = &piece[1..];
            }
        }
        at_line_start = seg.last() == Some(&b'\n');
        if !too_big {
            if body.len() as u64 + piece.len() as u64 > max {
                too_big = true;
                body = Vec::new();
            } else {
                body.extend_from_slice(piece);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unstuffing_table() {
        for (input, want) in [
            (&b"a\r\n.\r\n"[..], Some(&b"a\r\n"[..])),
            (b"..\r\n.\r\n", Some(b".\r\n")),
            (b"...x\r\n.\r\n", Some(b"..x\r\n")),
            (b".y\r\n.\n", Some(b"y\r\n")),
            (b"a.\r\n.b\r\n.\r\n", Some(b"a.\r\nb\r\n")),
            (b"no end\r\n", None),
        ] {
            let got = read_data(&mut &input[..], 1 << 20).ok().map(|(b, _)| b);
            assert_eq!(got.as_deref(), want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn long_lines_are_not_dot_checked_mid_line() {
        let mut input = vec![b'x'; 100 * 1024];
        input.extend_from_slice(b".\r\n.\r\n");
        // The segment boundary falls inside the long line: the '.' there is not a line start.
        let mut with_dot = vec![b'x'; 64 * 1024];
        with_dot.extend_from_slice(b".tail\r\n.\r\n");
        let (b, _) = read_data(&mut &with_dot[..], 1 << 20).unwrap();
        assert_eq!(b.len(), 64 * 1024 + 7);
        let (b, _) = read_data(&mut &input[..], 1 << 20).unwrap();
        assert_eq!(b.len(), 100 * 1024 + 3);
    }

    #[test]
    fn size_limit() {
        let (b, big) = read_data(&mut &b"0123456789\r\n.\r\n"[..], 5).unwrap();
        assert!(big);
        assert!(b.is_empty());
    }

    #[test]
    fn paths() {
        assert_eq!(path_arg("FROM:<a@b> SIZE=10").as_deref(), Some("a@b"));
        assert_eq!(path_arg("FROM:<>").as_deref(), Some(""));
        assert_eq!(path_arg("TO: <c@d>").as_deref(), Some("c@d"));
        assert_eq!(path_arg("TO:c@d").as_deref(), Some("c@d"));
        assert_eq!(path_arg("garbage"), None);
    }

    #[test]
    fn bounded_lines() {
        let mut r = &b"short\r\nwaytoolongline\r\nok\r\n"[..];
        let mut buf = Vec::new();
        assert!(matches!(read_line(&mut r, &mut buf, 8).unwrap(), Line::Ok));
        assert_eq!(buf, b"short\r\n");
        assert!(matches!(
            read_line(&mut r, &mut buf, 8).unwrap(),
            Line::TooLong
        ));
        assert!(matches!(read_line(&mut r, &mut buf, 8).unwrap(), Line::Ok));
        assert_eq!(buf, b"ok\r\n");
        assert!(matches!(read_line(&mut r, &mut buf, 8).unwrap(), Line::Eof));
    }
}
