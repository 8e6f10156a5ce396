//! Crash test for delivery: `kill -9` while messages are being received AND
//! delivered, restart on the same spool, and every message that was
//! answered 250 must reach the remote MX at least once (duplicates are
//! allowed: a transaction cut by the kill is retried).

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::sink::Sink;
use common::*;

/// Sends messages until the connection breaks or `stop`; pushes the
/// Message-ID of each message answered 250 into `acked` as soon as the
/// reply is read.
fn load(addr: SocketAddr, tag: String, acked: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    let run = || -> std::io::Result<()> {
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
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let msgid = format!("<{tag}.{n}@crash>");
            s.write_all(b"MAIL FROM:<c@src.test>\r\nRCPT TO:<r@dest.test>\r\nDATA\r\n")?;
            for _ in 0..3 {
                reply(&mut r)?;
            }
            s.write_all(
                format!(
                    "Message-ID: {msgid}\r\nSubject: {tag}/{n}\r\n\r\n{}\r\n.\r\n",
                    "z".repeat(900)
                )
                .as_bytes(),
            )?;
            let done = reply(&mut r)?;
            if done.starts_with("250 ") {
                acked.lock().unwrap().push(msgid);
            } else {
                assert!(done.starts_with('4'), "unexpected reply {done:?}");
            }
        }
        Ok(())
    };
    // Errors are expected: the server is killed under us.
    let _ = run();
}

#[test]
fn kill_9_mid_delivery_every_acknowledged_message_is_delivered() {
    let dir = tempdir();
    let sink = Sink::start(dir.path(), "mx", &["127.0.0.2:0"], &[]);
    let tail = format!(
        "[delivery]\nretry_initial = 1\nretry_max = 1\nidle_timeout = 5\n\
         [dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout_ms = 200\nattempts = 1\n\
         [[route]]\ndomain = \"dest.test\"\nhosts = [\"{}\"]\n",
        sink.addr()
    );
    let cfg = config(dir.path(), "", &tail);
    let mut all_acked: Vec<String> = Vec::new();
    for round in 0..3 {
        let mut server = Server::start(dir.path(), &cfg);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..4)
            .map(|i| {
                let (a, s) = (Arc::clone(&acked), Arc::clone(&stop));
                let addr = server.smtp;
                let tag = format!("r{round}c{i}");
                std::thread::spawn(move || load(addr, tag, a, s))
            })
            .collect();
        // Kill while both sides are busy: enough acknowledged, and the sink
        // has been receiving during this round.
        let delivered_before = sink.received().len();
        let want = 40 + round * 20;
        poll("load and deliveries", || {
            (acked.lock().unwrap().len() >= want && sink.received().len() >= delivered_before + 10)
                .then_some(())
        });
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        all_acked.extend(acked.lock().unwrap().iter().cloned());
    }
    // The last start delivers whatever the kills left in the spool.
    let server = Server::start(dir.path(), &cfg);
    let received = poll("every acknowledged message at the sink", || {
        let got: HashSet<String> = sink.received().into_iter().collect();
        all_acked.iter().all(|id| got.contains(id)).then_some(got)
    });
    poll("empty spool", || server.queue().is_empty().then_some(()));
    let missing: Vec<&String> = all_acked
        .iter()
        .filter(|id| !received.contains(*id))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let total = sink.received().len();
    eprintln!(
        "acknowledged {}, received {} lines ({} duplicates from cut transactions)",
        all_acked.len(),
        total,
        total.saturating_sub(received.len())
    );
}
