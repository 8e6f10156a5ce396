//! Crash test for delivery: `kill -9` while messages are being received AND
//! delivered, restart on the same spool, and every message that was
//! answered 250 must reach the remote MX at least once (duplicates are
//! allowed: a transaction cut by the kill is retried).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::sink::Sink;
use common::*;

/// Sends messages until the connection breaks or `stop`; pushes the
/// Message-ID of each message answered 250 into `acked` as soon as the
/// reply is read.
fn load(addr: SocketAddr, tag: String, acked: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    let msgid = |n: u64| format!("<{tag}.{n}@crash>");
    send_until_killed(
        addr,
        &stop,
        |n| {
            (
                "MAIL FROM:<c@src.test>\r\nRCPT TO:<r@dest.test>\r\nDATA\r\n".to_owned(),
                format!(
                    "Message-ID: {}\r\nSubject: {tag}/{n}\r\n\r\n{}\r\n.\r\n",
                    msgid(n),
                    "z".repeat(900)
                ),
            )
        },
        |n, _| acked.lock().unwrap().push(msgid(n)),
    );
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
