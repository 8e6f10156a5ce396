//! A full disk under the spool: `452 4.3.1`, never a 250 followed by loss,
//! the server keeps running, and accepts mail again when space returns.
//!
//! The spool lives on a small tmpfs mounted for the test (needs root or
//! CAP_SYS_ADMIN; skipped with a message where mounting is not allowed).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A tmpfs mounted on a temp dir; unmounted (lazily) on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs {
            path: path.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the file system of `dir` with `filler` until at most `leave`
/// octets are free.
fn fill(filler: &Path, leave: u64) {
    let mut f = std::fs::File::create(filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let len = std::fs::metadata(filler).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(filler)
        .unwrap();
    f.set_len(len.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
}

fn spool_config(dir: &Path, spool: &Path, spool_extra: &str) -> String {
    config(dir, "", "").replace(
        &format!("path = \"{}\"", dir.join("spool").display()),
        &format!("path = \"{}\"\n{spool_extra}", spool.display()),
    )
}

fn try_mail(c: &mut Client, body: &str) -> String {
    let r = c.cmd("MAIL FROM:<a@example.test>");
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd("RCPT TO:<b@example.test>");
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "{r}");
    c.send(body);
    c.send(".\r\n");
    c.reply()
}

#[test]
fn below_the_reserve_452_then_accepts_again_when_space_returns() {
    let dir = tempdir();
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "32m") else {
        eprintln!("cannot mount a tmpfs here (not root?); skipping");
        return;
    };
    let spool = fs.path.join("spool");
    let cfg = spool_config(dir.path(), &spool, "min_free_space = 8388608");
    let mut server = Server::start(dir.path(), &cfg);
    let mut c = server.client();
    c.hello();
    let body = format!(
        "Subject: x\r\n\r\n{}",
        format!("{}\r\n", "y".repeat(100)).repeat(10)
    );
    let first = queued_id(&try_mail(&mut c, &body));

    // 4 MiB left, the reserve is 8 MiB: refused, nothing written.
    let filler = fs.path.join("filler");
    fill(&filler, 4 << 20);
    let r = try_mail(&mut c, &body);
    assert!(r.starts_with("452 4.3.1"), "{r}");
    assert!(c.cmd("NOOP").starts_with("250"), "session goes on");
    let mut other = server.client();
    other.hello();
    let r = try_mail(&mut other, &body);
    assert!(r.starts_with("452 4.3.1"), "{r}");

    // Space returns: accepted again, no restart.
    std::fs::remove_file(&filler).unwrap();
    let second = queued_id(&try_mail(&mut c, &body));
    let m = server.http("/metrics");
    assert!(
        m.contains("sluice_spool_refused_total{reason=\"low_space\"}"),
        "{m}"
    );
    let ids: Vec<String> = server.queue().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![first, second]);
    assert!(c.cmd("QUIT").starts_with("221"));
    server.signal("TERM");
    assert!(server.wait().success());
}

/// With the reserve disabled the disk really fills: the body write or sled
/// itself hits ENOSPC (sled cannot recover from that in-process: its later
/// flushes hang). Every message must still get an answer - 250 only if
/// durable - within the flush timeout, later ones a prompt 452; after a
/// restart with space back everything acknowledged is there.
#[test]
fn sled_out_of_space_answers_452_promptly_and_loses_nothing() {
    let dir = tempdir();
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "16m") else {
        eprintln!("cannot mount a tmpfs here (not root?); skipping");
        return;
    };
    let spool = fs.path.join("spool");
    let cfg = spool_config(dir.path(), &spool, "min_free_space = 0\nflush_timeout = 2");
    let mut server = Server::start(dir.path(), &cfg);
    let filler = fs.path.join("filler");
    fill(&filler, 3 << 20);
    let mut c = server.client();
    c.hello();
    // About 100 KiB per message.
    let body = format!(
        "Subject: x\r\n\r\n{}",
        format!("{}\r\n", "z".repeat(998)).repeat(100)
    );
    let mut acked = Vec::new();
    let mut refused = None;
    for _ in 0..200 {
        let started = Instant::now();
        let r = try_mail(&mut c, &body);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "answer took {:?}",
            started.elapsed()
        );
        if let Some(id) = r.trim_end().strip_prefix("250 2.0.0 Ok: queued as ") {
            acked.push(id.to_owned());
        } else {
            assert!(r.starts_with("452 4.3.1"), "{r}");
            refused = Some(r);
            break;
        }
    }
    assert!(refused.is_some(), "the disk never filled");
    // From now on refusals are immediate, and the server still talks.
    for _ in 0..3 {
        let started = Instant::now();
        let r = try_mail(&mut c, &body);
        assert!(r.starts_with("452 4.3.1"), "{r}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    assert!(c.cmd("NOOP").starts_with("250"));

    // Space back. Usually the body write failed first and sled never saw
    // ENOSPC: then mail is accepted again at once. If sled did, the spool
    // is marked failed (it cannot recover in-process) and keeps answering
    // 452 until a restart.
    std::fs::remove_file(&filler).unwrap();
    let m = server.http("/metrics");
    let r = try_mail(&mut c, &body);
    if m.contains("sluice_spool_writable 0") {
        assert!(r.starts_with("452 4.3.1"), "{r}");
    } else {
        acked.push(queued_id(&r));
    }
    // Restart on the same spool: every acknowledged message is there and
    // mail is accepted.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);
    let server = Server::start(dir.path(), &cfg);
    let present: Vec<String> = server.queue().into_iter().map(|e| e.id).collect();
    for id in &acked {
        assert!(present.contains(id), "acknowledged {id} lost");
    }
    let mut c = server.client();
    c.hello();
    queued_id(&try_mail(&mut c, "Subject: after\r\n\r\nok\r\n"));
}

#[test]
fn startup_error_spool_on_read_only_file_system() {
    let dir = tempdir();
    let mnt = dir.path().join("ro");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("cannot mount a tmpfs here (not root?); skipping");
        return;
    }
    let _fs = Tmpfs { path: mnt.clone() };
    let cfg = spool_config(dir.path(), &mnt.join("spool"), "");
    match Server::try_start(dir.path(), &cfg) {
        Ok(_) => panic!("started on a read-only spool"),
        Err((status, log)) => {
            assert_eq!(status.code(), Some(1), "{log}");
            let last = log.lines().last().unwrap_or("");
            assert!(
                last.starts_with("sluice: error: cannot open spool")
                    && last.contains("not writable"),
                "{log}"
            );
        }
    }
}
