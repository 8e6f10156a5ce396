//! Crash test: `kill -9` under concurrent load, restart on the same spool,
//! and every message that was answered 250 must still be spooled.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;

/// Sends messages until the connection breaks or `stop`; pushes each id
/// answered with 250 into `acked` the moment it is read.
fn load(addr: SocketAddr, client: usize, acked: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    send_until_killed(
        addr,
        &stop,
        |n| {
            (
                format!("MAIL FROM:<c{client}@crash.test>\r\nRCPT TO:<r{n}@dest.test>\r\nDATA\r\n"),
                format!("Subject: {client}/{n}\r\n\r\n{}\r\n.\r\n", "z".repeat(500)),
            )
        },
        |_, done| {
            let id = done
                .trim_end()
                .strip_prefix("250 2.0.0 Ok: queued as ")
                .unwrap_or_else(|| panic!("unexpected reply {done:?}"));
            acked.lock().unwrap().push(id.to_owned());
        },
    );
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_message() {
    let dir = tempdir();
    let cfg = config(dir.path(), "", "");
    let mut all_acked: Vec<String> = Vec::new();
    for round in 0..3 {
        let mut server = Server::start(dir.path(), &cfg);
        // What earlier rounds acknowledged survived the previous kill.
        let present: HashSet<String> = server.queue().into_iter().map(|e| e.id).collect();
        for id in &all_acked {
            assert!(
                present.contains(id),
                "round {round}: acknowledged {id} lost"
            );
        }
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..6)
            .map(|i| {
                let (a, s) = (Arc::clone(&acked), Arc::clone(&stop));
                let addr = server.smtp;
                std::thread::spawn(move || load(addr, i, a, s))
            })
            .collect();
        // Kill mid-load: once a fair number of messages has been acknowledged.
        let want = 50 + round * 25;
        poll("load", || {
            (acked.lock().unwrap().len() >= want).then_some(())
        });
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        assert!(acked.len() >= want);
        all_acked.extend(acked);
    }
    // Final check after the last kill, and ids are unique across restarts.
    let server = Server::start(dir.path(), &cfg);
    let queue = server.queue();
    let present: HashSet<&str> = queue.iter().map(|e| e.id.as_str()).collect();
    let lost: Vec<&String> = all_acked
        .iter()
        .filter(|id| !present.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "lost {} of {}: {lost:?}",
        lost.len(),
        all_acked.len()
    );
    let unique: HashSet<&String> = all_acked.iter().collect();
    assert_eq!(unique.len(), all_acked.len(), "queue ids repeated");
    assert_eq!(
        present.len(),
        queue.len(),
        "queue ids repeated in the spool"
    );
}
