//! The SMTP client core over real TCP on loopback, driven by a small blocking
//! driver: against this repo's server session (run sans-IO in a thread),
//! against Python's aiosmtpd and against Postfix's smtp-sink (servers we did
//! not write; skipped with a note when not installed).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sluice::smtp::address::{Address, ForwardPath, ReversePath};
use sluice::smtp::client::{
    ClientConfig, ClientEvent, ClientSession, CloseKind, CloseReason, OutgoingMessage, Phase,
    TransactionResult,
};
use sluice::smtp::command::{BodyType, Notify, RcptTo, Ret};
use sluice::smtp::server::{Event, IncomingMessage, PeerInfo, Session, SessionConfig};

/// No test waits longer than this for anything.
const DEADLINE: Duration = Duration::from_secs(30);

fn rcpt(a: &str) -> RcptTo {
    RcptTo {
        to: ForwardPath::Address(Address::parse(a).unwrap()),
        notify: None,
        orcpt: None,
    }
}

fn message(to: &[&str], body: Vec<u8>) -> OutgoingMessage {
    OutgoingMessage::new(
        ReversePath::Address(Address::parse("sender@client.test").unwrap()),
        to.iter().map(|a| rcpt(a)).collect(),
        body,
    )
}

/// A body of about `len` bytes with dots at line starts, a leading dot and
/// lines that are only a dot: everything dot-stuffing must get right.
fn dotty_body(len: usize) -> Vec<u8> {
    let mut body = b".leading dot\r\n".to_vec();
    let mut i = 0u64;
    while body.len() < len {
        i += 1;
        match i % 5 {
            0 => body.extend_from_slice(b".\r\n"),
            1 => body.extend_from_slice(b"..two dots\r\n"),
            _ => {
                body.extend_from_slice(format!("line {i} with some text. and a dot\r\n").as_bytes())
            }
        }
    }
    body
}

/// Runs a client session over `stream` to its end: sends every message,
/// then QUIT. Returns the transaction results and the close reason.
fn run_client(
    stream: TcpStream,
    config: ClientConfig,
    messages: Vec<OutgoingMessage>,
) -> (Vec<TransactionResult>, CloseReason) {
    drive(stream, config, messages, false)
}

/// Like [`run_client`] for sessions that end early: unsent messages allowed.
fn run_client_allow_unsent(
    stream: TcpStream,
    config: ClientConfig,
    messages: Vec<OutgoingMessage>,
) -> (Vec<TransactionResult>, CloseReason) {
    drive(stream, config, messages, true)
}

fn drive(
    stream: TcpStream,
    config: ClientConfig,
    messages: Vec<OutgoingMessage>,
    allow_unsent: bool,
) -> (Vec<TransactionResult>, CloseReason) {
    let mut stream = stream;
    let started = Instant::now();
    let mut s = ClientSession::new(Arc::new(config), Instant::now());
    for m in messages {
        s.send_message(Instant::now(), m).unwrap();
    }
    s.quit(Instant::now());
    let mut results = Vec::new();
    let mut wbuf = Vec::with_capacity(256 * 1024);
    let mut rbuf = vec![0u8; 16 * 1024];
    loop {
        assert!(started.elapsed() < DEADLINE, "client session took too long");
        while s.has_output() {
            wbuf.clear();
            s.write_output(Instant::now(), &mut wbuf);
            if stream.write_all(&wbuf).is_err() {
                // The peer is gone (EPIPE / ECONNRESET): same as EOF.
                s.handle_eof(Instant::now());
                break;
            }
        }
        while let Some(ev) = s.poll_event() {
            match ev {
                ClientEvent::Ready | ClientEvent::StartTls => {}
                ClientEvent::TransactionDone(r) => results.push(*r),
                ClientEvent::Closed { reason, unsent } => {
                    assert!(allow_unsent || unsent.is_empty(), "unsent: {unsent:?}");
                    while s.has_output() {
                        wbuf.clear();
                        s.write_output(Instant::now(), &mut wbuf);
                        let _ = stream.write_all(&wbuf);
                    }
                    return (results, reason);
                }
            }
        }
        let wait = s
            .poll_timeout()
            .map_or(DEADLINE, |d| d.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(wait)).unwrap();
        match stream.read(&mut rbuf) {
            Ok(0) => s.handle_eof(Instant::now()),
            Ok(n) => s.handle_input(Instant::now(), &rbuf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                s.handle_timeout(Instant::now())
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => s.handle_eof(Instant::now()),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// This repo's server session on one accepted connection, in a thread.
/// Recipients whose local part starts with "deny" are refused.
fn serve_one(listener: TcpListener) -> thread::JoinHandle<Vec<IncomingMessage>> {
    thread::spawn(move || {
        let (mut sock, peer) = listener.accept().unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        let config = SessionConfig {
            hostname: "mx.server.test".into(),
            ..SessionConfig::default()
        };
        let mut s = Session::new(Arc::new(config), PeerInfo::plain(peer), Instant::now());
        let mut stored = Vec::new();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            s.write_output(&mut out);
            sock.write_all(&out).unwrap();
            out.clear();
            if s.is_closed() {
                return stored;
            }
            let n = sock.read(&mut buf).unwrap();
            if n == 0 {
                return stored;
            }
            let mut pending = &buf[..n];
            loop {
                let used = s.handle_input(Instant::now(), pending);
                pending = &pending[used..];
                let mut answered = false;
                while let Some(ev) = s.poll_event() {
                    answered = true;
                    match ev {
                        Event::CheckRecipient { recipient, .. } => {
                            let deny = matches!(&recipient.to,
                                ForwardPath::Address(a) if a.local_part().starts_with("deny"));
                            let verdict = if deny {
                                Err(sluice::reply!(550, 5, 1, 1, "no such user"))
                            } else {
                                Ok(())
                            };
                            s.answer_recipient(Instant::now(), verdict);
                        }
                        Event::Message(m) => {
                            stored.push(*m);
                            s.answer_message(Instant::now(), Ok("ID".into()));
                        }
                        Event::StartTls | Event::Rejected { .. } => {}
                    }
                }
                if pending.is_empty() || (!answered && used == 0) {
                    break;
                }
            }
        }
    })
}

fn loopback() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[test]
fn against_own_server_with_data_and_pipelining() {
    let (listener, addr) = loopback();
    let server = serve_one(listener);
    let big = dotty_body(2 * 1024 * 1024);
    let mut dsn = message(
        &["dsn@server.test"],
        b"Subject: dsn\r\n\r\nbody\r\n".to_vec(),
    );
    dsn.ret = Some(Ret::Headers);
    dsn.envid = Some("env-1".into());
    dsn.recipients[0].notify = Some(Notify {
        failure: true,
        ..Notify::default()
    });
    let mut eight = message(&["eight@server.test"], "caf\u{e9}\r\n".as_bytes().to_vec());
    eight.body_type = Some(BodyType::EightBitMime);
    let messages = vec![
        message(
            &["a@server.test", "deny-b@server.test", "c@server.test"],
            dotty_body(300),
        ),
        message(&["big@server.test"], big.clone()),
        message(&["deny@server.test"], b"nobody gets this\r\n".to_vec()),
        dsn,
        eight,
        message(&["empty@server.test"], Vec::new()),
    ];
    let config = ClientConfig {
        ehlo_name: "client.test".into(),
        ..ClientConfig::default()
    };
    let (results, reason) = run_client(TcpStream::connect(addr).unwrap(), config, messages.clone());
    assert_eq!(reason.kind, CloseKind::Quit, "{reason}");
    let stored = server.join().unwrap();

    assert_eq!(results.len(), 6);
    let codes: Vec<Vec<u16>> = results
        .iter()
        .map(|r| r.recipients.iter().map(|x| x.reply.code()).collect())
        .collect();
    assert_eq!(
        codes,
        vec![
            vec![250, 550, 250],
            vec![250],
            vec![550],
            vec![250],
            vec![250],
            vec![250]
        ]
    );
    assert_eq!(results[0].recipients[1].phase, Phase::Rcpt);
    assert!(results.iter().all(|r| r.remote_dsn));

    // What the server stored is exactly what we sent (dot-unstuffed again).
    assert_eq!(stored.len(), 5, "the all-refused message is not stored");
    assert_eq!(stored[0].body, messages[0].body.to_vec());
    assert_eq!(stored[0].recipients.len(), 2);
    assert_eq!(stored[1].body, big);
    assert_eq!(stored[1].mail.size, Some(big.len() as u64));
    assert_eq!(stored[2].mail.ret, Some(Ret::Headers));
    assert_eq!(stored[2].mail.envid.as_deref(), Some("env-1"));
    assert!(stored[2].recipients[0].notify.unwrap().failure);
    assert_eq!(stored[3].mail.body, Some(BodyType::EightBitMime));
    assert_eq!(stored[3].body, "caf\u{e9}\r\n".as_bytes());
    assert_eq!(stored[4].body, b"");
}

#[test]
fn against_own_server_with_bdat() {
    for pipelining in [true, false] {
        let (listener, addr) = loopback();
        let server = serve_one(listener);
        let big = dotty_body(1024 * 1024 + 17);
        // Exactly three chunks: 64 KiB of 64-octet lines each.
        let exact = ("x".repeat(62) + "\r\n").repeat(1024 * 3).into_bytes();
        let messages = vec![
            message(&["a@server.test"], big.clone()),
            message(&["b@server.test"], exact.clone()),
            message(&["c@server.test"], Vec::new()),
        ];
        let config = ClientConfig {
            use_chunking: true,
            use_pipelining: pipelining,
            bdat_chunk_size: 64 * 1024,
            ..ClientConfig::default()
        };
        let (results, reason) = run_client(TcpStream::connect(addr).unwrap(), config, messages);
        assert_eq!(reason.kind, CloseKind::Quit, "{reason}");
        let stored = server.join().unwrap();
        for r in &results {
            let x = &r.recipients[0];
            assert!(x.is_delivered() && x.phase == Phase::Bdat, "{:?}", x.reply);
        }
        assert_eq!(stored.len(), 3);
        assert_eq!(stored[0].body, big, "BDAT bodies are sent unstuffed");
        assert_eq!(stored[1].body, exact);
        assert_eq!(stored[2].body, b"");
    }
}

#[test]
fn server_disappearing_mid_transaction_defers() {
    // A scripted server that accepts the envelope and closes during the data.
    let (listener, addr) = loopback();
    let server = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut w = sock.try_clone().unwrap();
        let mut r = BufReader::new(sock);
        let mut line = String::new();
        w.write_all(b"220 scripted ESMTP\r\n").unwrap();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("EHLO "));
        w.write_all(b"250-scripted\r\n250 PIPELINING\r\n").unwrap();
        for _ in 0..3 {
            line.clear();
            r.read_line(&mut line).unwrap();
        }
        assert_eq!(line, "DATA\r\n");
        w.write_all(b"250 ok\r\n250 ok\r\n354 go\r\n").unwrap();
        // Read a little of the body, then vanish.
        let mut some = [0u8; 10];
        r.read_exact(&mut some).unwrap();
    });
    let (results, reason) = run_client(
        TcpStream::connect(addr).unwrap(),
        ClientConfig::default(),
        vec![message(&["a@server.test"], dotty_body(4 * 1024 * 1024))],
    );
    server.join().unwrap();
    assert_eq!(results.len(), 1);
    let r = &results[0].recipients[0];
    assert!(r.is_transient() && !r.remote, "{r:?}");
    assert!(
        matches!(
            reason.kind,
            CloseKind::ConnectionLost | CloseKind::ProtocolError
        ) || reason.kind == CloseKind::Timeout
    );
}

/// Kills and reaps a child process on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const AIOSMTPD_SINK: &str = r#"
import asyncio, base64, json, sys
from aiosmtpd.smtp import SMTP

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("deny"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        print(json.dumps({
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "options": envelope.mail_options,
            "body": base64.b64encode(envelope.original_content).decode(),
        }), flush=True)
        return "250 2.0.0 OK"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Handler(), decode_data=False, enable_SMTPUTF8=True),
        host="127.0.0.1", port=0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

#[test]
fn interop_with_aiosmtpd() {
    let has_aiosmtpd = Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_aiosmtpd {
        eprintln!("SKIPPED: python3 with aiosmtpd not installed (pip install aiosmtpd)");
        return;
    }
    let mut child = ChildGuard(
        Command::new("python3")
            .args(["-c", AIOSMTPD_SINK])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut port = String::new();
    out.read_line(&mut port).unwrap();
    // The sink prints one (big) line per message: read them on a thread so
    // it never blocks on a full pipe while the client waits for its reply.
    let lines = thread::spawn(move || out.lines().map_while(Result::ok).collect::<Vec<_>>());
    let addr: SocketAddr = format!("127.0.0.1:{}", port.trim()).parse().unwrap();

    let mut eight = message(&["eight@server.test"], "caf\u{e9}\r\n".as_bytes().to_vec());
    eight.body_type = Some(BodyType::EightBitMime);
    let messages = vec![
        message(
            &["a@server.test", "deny@server.test"],
            dotty_body(200 * 1024),
        ),
        eight,
    ];
    let (results, reason) = run_client(
        TcpStream::connect(addr).unwrap(),
        ClientConfig::default(),
        messages.clone(),
    );
    assert_eq!(reason.kind, CloseKind::Quit, "{reason}");
    let codes: Vec<Vec<u16>> = results
        .iter()
        .map(|r| r.recipients.iter().map(|x| x.reply.code()).collect())
        .collect();
    assert_eq!(codes, vec![vec![250, 550], vec![250]]);
    drop(child); // ends the sink, and with it the reader thread
    let lines = lines.join().unwrap();
    assert_eq!(lines.len(), messages.len());
    for (i, (m, line)) in messages.iter().zip(&lines).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let body = base64_decode(v["body"].as_str().unwrap());
        assert_eq!(body, m.body.to_vec(), "message {i} arrived intact");
        assert_eq!(
            v["to"][0],
            m.recipients[0].to.to_string().trim_matches(['<', '>'])
        );
    }
}

/// Starts smtp-sink with `flags` on a free loopback port.
fn smtp_sink(flags: &[&str]) -> Option<(ChildGuard, SocketAddr)> {
    let sink = "/usr/sbin/smtp-sink";
    if !std::path::Path::new(sink).exists() {
        eprintln!("SKIPPED: {sink} not installed (Debian package postfix)");
        return None;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    // smtp-sink takes a port, not a socket: find a free one, then retry on
    // the (unlikely) race with another process taking it.
    for _attempt in 0..5 {
        let (probe, addr) = loopback();
        drop(probe);
        let mut cmd = Command::new(sink);
        if root {
            cmd.args(["-u", "nobody"]); // required when run as root
        }
        let child = ChildGuard(
            cmd.args(flags)
                .args([&addr.to_string(), "64"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect(addr).is_ok() {
                return Some((child, addr));
            }
            thread::sleep(Duration::from_millis(10)); // polling a condition
        }
    }
    panic!("smtp-sink did not start");
}

#[test]
fn interop_with_postfix_smtp_sink() {
    // (flags, expected reply code for every recipient, expected close)
    let cases: &[(&[&str], u16, CloseKind)] = &[
        (&[], 250, CloseKind::Quit),             // PIPELINING, DSN, 8BITMIME...
        (&["-p"], 250, CloseKind::Quit),         // no PIPELINING: lock-step
        (&["-e"], 250, CloseKind::Quit),         // no ESMTP: HELO
        (&["-f", "data"], 500, CloseKind::Quit), // DATA refused (5xx) -> RSET, next
        (&["-r", "rcpt"], 450, CloseKind::Quit), // every RCPT deferred -> RSET
        (&["-Q", "rcpt"], 421, CloseKind::ServerClosing),
    ];
    for &(flags, class, close) in cases {
        let Some((_child, addr)) = smtp_sink(flags) else {
            return;
        };
        let messages: Vec<_> = (0..10)
            .map(|i| {
                message(
                    &["a@server.test", "b@server.test"],
                    dotty_body(1000 * i + 1),
                )
            })
            .collect();
        let config = ClientConfig {
            ehlo_name: "client.test".into(),
            ..ClientConfig::default()
        };
        let stream = TcpStream::connect(addr).unwrap();
        let (results, reason) = if close == CloseKind::Quit {
            run_client(stream, config, messages)
        } else {
            run_client_allow_unsent(stream, config, messages)
        };
        assert_eq!(reason.kind, close, "{flags:?}: {reason}");
        let want = if close == CloseKind::Quit { 10 } else { 1 };
        assert_eq!(results.len(), want, "{flags:?}");
        for r in &results {
            for x in &r.recipients {
                assert_eq!(x.reply.code(), class, "{flags:?}: {x:?}");
                assert!(x.remote);
            }
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = T.iter().position(|&t| t == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
