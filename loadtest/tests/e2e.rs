//! End-to-end tests: `sink` and `send`/`idle` against each other on loopback.
//! Every spawned process is owned by a guard that kills it on drop; synchronisation is by
//! the ready file and stats polling with generous deadlines, never by fixed sleeps.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-load");
const DEADLINE: Duration = Duration::from_secs(60);
/// Pause between polls of a file another process writes; the deadline is what bounds it.
const POLL: Duration = Duration::from_millis(10);

/// Kills (and reaps) the child when dropped, so a failing test leaks no process.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Sink {
    proc: Proc,
    addr: SocketAddr,
    stats: PathBuf,
    /// Keeps the ready/stats files alive for the sink's lifetime.
    _dir: tempfile::TempDir,
}

fn poll_until<T>(what: &str, proc: Option<&mut Proc>, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut proc = proc;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if let Some(p) = proc.as_deref_mut() {
            if let Ok(Some(st)) = p.0.try_wait() {
                panic!("process exited ({st}) while waiting for {what}");
            }
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

fn start_sink(extra: &[&str]) -> Sink {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let stats = dir.path().join("stats.json");
    let child = Command::new(BIN)
        .args(["sink", "--listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .arg("--stats-file")
        .arg(&stats)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let addr = poll_until("sink ready file", Some(&mut proc), || {
        fs::read_to_string(&ready)
            .ok()?
            .trim()
            .parse::<SocketAddr>()
            .ok()
    });
    Sink {
        proc,
        addr,
        stats,
        _dir: dir,
    }
}

impl Sink {
    fn stats(&self) -> Option<Value> {
        serde_json::from_slice(&fs::read(&self.stats).ok()?).ok()
    }

    /// Polls the stats file until `pred` holds; returns those stats.
    fn wait_stats(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let path = self.stats.clone();
        let mut last = None;
        let start = Instant::now();
        loop {
            if let Some(s) = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if let Ok(Some(st)) = self.proc.0.try_wait() {
                panic!("sink exited ({st}) while waiting for {what}");
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; last stats {last:?}"
            );
            std::thread::sleep(POLL);
        }
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `send --json` against `addr` and returns its report.
fn send(addr: SocketAddr, extra: &[&str]) -> Value {
    let target = addr.to_string();
    let mut args = vec![
        "send",
        "--json",
        "--target",
        &target,
        "--io-timeout",
        "20s",
        "--duration-limit",
        "120s",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(
        out.status.success(),
        "send failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("missing {k} in {v}"))
}

#[test]
fn counts_match() {
    let mut sink = start_sink(&[]);
    let r = send(
        sink.addr,
        &[
            "--connections",
            "4",
            "--messages",
            "300",
            "--recipients",
            "2",
            "--domains",
            "3",
            "--size",
            "5k",
        ],
    );
    assert_eq!(u(&r, "accepted"), 300, "{r}");
    assert_eq!(u(&r, "rejected"), 0);
    assert_eq!(u(&r, "errors"), 0);
    assert_eq!(u(&r, "attempted"), 300);
    // A late-starting worker may find the budget already used up, so not necessarily all 4.
    assert!((1..=4).contains(&u(&r, "connections_opened")), "{r}");
    assert!(u(&r, "message_size").abs_diff(5120) < 200, "{r}");
    assert_eq!(r["latency_ms"]["transaction"]["count"], 300);
    assert_eq!(r["latency_ms"]["dot_to_reply"]["count"], 300);
    let p = &r["latency_ms"]["transaction"];
    assert!(p["p50"].as_f64().unwrap() <= p["p99"].as_f64().unwrap());
    assert!(p["p99"].as_f64().unwrap() <= p["max"].as_f64().unwrap());
    assert!(r["messages_per_s"].as_f64().unwrap() > 0.0);
    let bytes = u(&r, "bytes_accepted");
    let s = sink.wait_stats("300 messages", |s| {
        s["messages"] == 300 && s["connections_current"] == 0
    });
    assert_eq!(u(&s, "recipients"), 600);
    // Byte-exact after stuffing and unstuffing.
    assert_eq!(u(&s, "bytes"), bytes);
    assert_eq!(u(&s, "connections_total"), u(&r, "connections_opened"));
    assert_eq!(u(&s, "data_transfers"), 300);
}

fn stored(dir: &Path) -> Vec<(Value, Vec<u8>)> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|j| {
            let env: Value = serde_json::from_slice(&fs::read(&j).unwrap()).unwrap();
            let eml = fs::read(j.with_extension("eml")).unwrap();
            (env, eml)
        })
        .collect()
}

fn body_of(eml: &[u8]) -> &[u8] {
    let pos = eml
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header/body separator");
    &eml[pos + 4..]
}

#[test]
fn dot_stuffed_lines_arrive_intact() {
    for transfer in [&[][..], &["--chunking", "--chunk-size", "1000"][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let mut sink = start_sink(&["--store", store.to_str().unwrap()]);
        let mut args = vec![
            "--connections",
            "1",
            "--messages",
            "5",
            "--size",
            "3k",
            "--from",
            "sender@src.test",
        ];
        args.extend_from_slice(transfer);
        let r = send(sink.addr, &args);
        assert_eq!(u(&r, "accepted"), 5, "{r}");
        sink.wait_stats("5 messages", |s| s["messages"] == 5);
        let msgs = stored(&store);
        assert_eq!(msgs.len(), 5);
        let mut ids = HashSet::new();
        let mut total = 0u64;
        for (env, eml) in &msgs {
            total += eml.len() as u64;
            assert_eq!(env["mail_from"], "sender@src.test");
            assert_eq!(env["rcpt_to"].as_array().unwrap().len(), 1);
            let expect_transfer = if transfer.is_empty() { "DATA" } else { "BDAT" };
            assert_eq!(env["transfer"], expect_transfer);
            let body = body_of(eml);
            // The generator puts these lines first; each must arrive with exactly the dots it had.
            assert!(
                body.starts_with(
                    b".\r\n..\r\n.leading dot line: must arrive with exactly one dot\r\n\
                      ..two leading dots: must arrive with exactly two dots\r\n"
                ),
                "{}",
                String::from_utf8_lossy(&body[..200.min(body.len())])
            );
            // No line may have gained a dot: the only lines starting with ".." are the two above.
            let text = String::from_utf8_lossy(body);
            let double = text.split("\r\n").filter(|l| l.starts_with("..")).count();
            assert_eq!(double, 2, "unstuffing left extra dots");
            let single = text
                .split("\r\n")
                .filter(|l| l.starts_with('.') && !l.starts_with(".."))
                .count();
            assert!(single >= 3, "dotted body lines lost: {single}");
            assert!(eml.ends_with(b"sent by sluice-load\r\n"));
            let mid = String::from_utf8_lossy(eml)
                .lines()
                .find_map(|l| l.strip_prefix("Message-ID: ").map(str::to_string))
                .expect("Message-ID header");
            assert!(ids.insert(mid), "duplicate Message-ID");
        }
        assert_eq!(total, u(&r, "bytes_accepted"));
    }
}

#[test]
fn fail_first_gives_451_then_accepts() {
    let mut sink = start_sink(&["--fail-first", "5"]);
    let r = send(sink.addr, &["--connections", "1", "--messages", "20"]);
    assert_eq!(u(&r, "accepted"), 15, "{r}");
    assert_eq!(u(&r, "rejected"), 5);
    assert_eq!(r["rejected_by_code"]["451"], 5);
    assert_eq!(u(&r, "errors"), 0);
    let s = sink.wait_stats("15 messages", |s| {
        s["messages"] == 15 && s["connections_current"] == 0
    });
    assert_eq!(u(&s, "fail_first_used"), 5);
    assert_eq!(u(&s, "messages_rejected"), 5);
}

#[test]
fn configured_refusals_are_classified_by_code() {
    // (sink flags, send flags, rejected code, rcpt_rejected per message)
    let cases: &[(&[&str], &[&str], &str, u64)] = &[
        (&["--reply-rcpt", "550"], &[], "550", 1),
        (&["--reply-rcpt", "450"], &["--pipelining", "off"], "450", 1),
        (&["--reply-data", "554"], &[], "554", 0),
        (&["--reply-data", "451"], &["--chunking"], "451", 0),
        (&["--reply-rcpt", "550"], &["--chunking"], "550", 1),
    ];
    for (sink_flags, send_flags, code, rr) in cases {
        let mut sink = start_sink(sink_flags);
        let mut args = vec!["--connections", "2", "--messages", "10"];
        args.extend_from_slice(send_flags);
        let r = send(sink.addr, &args);
        assert_eq!(u(&r, "accepted"), 0, "{sink_flags:?} {send_flags:?}: {r}");
        assert_eq!(
            r["rejected_by_code"][*code], 10,
            "{sink_flags:?} {send_flags:?}: {r}"
        );
        assert_eq!(u(&r, "rcpt_rejected"), 10 * rr);
        assert_eq!(u(&r, "errors"), 0, "{r}");
        let s = sink.wait_stats("idle", |s| {
            s["connections_current"] == 0 && s["connections_total"] == r["connections_opened"]
        });
        assert_eq!(u(&s, "messages"), 0);
        assert_eq!(u(&s, "connection_errors"), 0, "{s}");
    }
}

#[test]
fn pipelining_modes() {
    // (sink flags, --pipelining, expect pipelined)
    let cases: &[(&[&str], &str, bool)] = &[
        (&[], "on", true),
        (&[], "off", false),
        (&[], "auto", true),
        (&["--no-pipelining"], "auto", false),
        (&["--no-pipelining"], "on", true),
    ];
    for (sink_flags, mode, pipelined) in cases {
        let mut sink = start_sink(sink_flags);
        let r = send(
            sink.addr,
            &[
                "--connections",
                "3",
                "--messages",
                "60",
                "--recipients",
                "3",
                "--pipelining",
                mode,
            ],
        );
        assert_eq!(u(&r, "accepted"), 60, "{mode}: {r}");
        assert_eq!(u(&r, "errors"), 0);
        let want = if *pipelined {
            u(&r, "connections_opened")
        } else {
            0
        };
        assert_eq!(
            u(&r, "pipelined_connections"),
            want,
            "{sink_flags:?} {mode}"
        );
        let s = sink.wait_stats("60 messages", |s| {
            s["messages"] == 60 && s["connections_current"] == 0
        });
        assert_eq!(u(&s, "recipients"), 180);
        // Seen from the server side: commands arrived before earlier replies were sent.
        assert_eq!(
            u(&s, "pipelined_commands") > 0,
            *pipelined,
            "{sink_flags:?} {mode}: {s}"
        );
    }
}

#[test]
fn bdat_path() {
    for mode in ["on", "off"] {
        let mut sink = start_sink(&[]);
        let r = send(
            sink.addr,
            &[
                "--connections",
                "2",
                "--messages",
                "40",
                "--size",
                "10k",
                "--chunking",
                "--chunk-size",
                "3k",
                "--pipelining",
                mode,
            ],
        );
        assert_eq!(u(&r, "accepted"), 40, "{mode}: {r}");
        assert_eq!(u(&r, "chunked_messages"), 40);
        assert_eq!(r["latency_ms"]["dot_to_reply"]["count"], 40);
        let s = sink.wait_stats("40 messages", |s| s["messages"] == 40);
        assert_eq!(u(&s, "bdat_transfers"), 40);
        assert_eq!(u(&s, "data_transfers"), 0);
        assert_eq!(u(&s, "bytes"), u(&r, "bytes_accepted"));
    }
    // CHUNKING not offered: --chunking falls back to DATA.
    let mut sink = start_sink(&["--no-chunking"]);
    let r = send(
        sink.addr,
        &["--connections", "1", "--messages", "5", "--chunking"],
    );
    assert_eq!(u(&r, "accepted"), 5);
    assert_eq!(u(&r, "chunked_messages"), 0);
    let s = sink.wait_stats("5 messages", |s| s["messages"] == 5);
    assert_eq!(u(&s, "data_transfers"), 5);
}

#[test]
fn ids_file_records_queue_ids() {
    let mut sink = start_sink(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.tsv");
    let r = send(
        sink.addr,
        &[
            "--connections",
            "3",
            "--messages",
            "50",
            "--messages-per-connection",
            "7",
            "--ids-file",
            ids.to_str().unwrap(),
        ],
    );
    assert_eq!(u(&r, "accepted"), 50);
    assert_eq!(u(&r, "queue_ids_captured"), 50);
    // 50 messages in batches of at most 7 per connection.
    assert!(u(&r, "connections_opened") >= 8, "{r}");
    let text = fs::read_to_string(&ids).unwrap();
    let mut qids = HashSet::new();
    let mut mids = HashSet::new();
    for line in text.lines() {
        let (q, m) = line.split_once('\t').expect("tab-separated");
        assert!(q.starts_with("SINK"), "{q}");
        assert!(qids.insert(q.to_string()));
        assert!(mids.insert(m.to_string()));
    }
    assert_eq!(qids.len(), 50);
    let s = sink.wait_stats("connections", |s| {
        s["connections_current"] == 0 && s["messages"] == 50
    });
    assert_eq!(u(&s, "connections_total"), u(&r, "connections_opened"));
}

#[test]
fn idle_holds_connections() {
    let mut sink = start_sink(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let ready = tmp.path().join("idle-ready");
    let target = sink.addr.to_string();
    let child = Command::new(BIN)
        .args([
            "idle",
            "--json",
            "--connections",
            "200",
            "--hold",
            "300s",
            "--batch",
            "50",
            "--target",
            &target,
        ])
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut idle = Proc(child);
    let r: Value = poll_until("idle ready file", Some(&mut idle), || {
        serde_json::from_slice(&fs::read(&ready).ok()?).ok()
    });
    assert_eq!(r["established"], 200, "{r}");
    let s = sink.wait_stats("200 connections", |s| s["connections_current"] == 200);
    assert_eq!(u(&s, "connections_peak"), 200);
    // Closing stdin ends the hold early: QUIT all, report, exit.
    drop(idle.0.stdin.take());
    let mut out = String::new();
    idle.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let st = idle.0.wait().unwrap();
    assert!(st.success());
    let rep: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(rep["established"], 200, "{rep}");
    assert_eq!(rep["held_at_end"], 200);
    assert_eq!(rep["quit_ok"], 200);
    assert_eq!(rep["failed"], 0);
    assert_eq!(rep["hold_ended_by"], "stdin-closed");
    sink.wait_stats("all closed", |s| {
        s["connections_current"] == 0 && s["connections_total"] == 200
    });
}

#[test]
fn sink_max_connections_refuses_excess() {
    let mut sink = start_sink(&["--max-connections", "5"]);
    let target = sink.addr.to_string();
    let out = run(&[
        "idle",
        "--json",
        "--connections",
        "12",
        "--hold",
        "0s",
        "--target",
        &target,
    ]);
    assert!(out.status.success());
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["established"], 5, "{rep}");
    assert_eq!(rep["failed"], 7, "{rep}");
    let s = sink.wait_stats("refusals", |s| {
        s["connections_refused"] == 7 && s["connections_current"] == 0
    });
    assert_eq!(u(&s, "connections_peak"), 5);
}

#[test]
fn sink_writes_stats_on_sigterm() {
    let mut sink = start_sink(&[]);
    let r = send(sink.addr, &["--connections", "1", "--messages", "3"]);
    assert_eq!(u(&r, "accepted"), 3);
    sink.wait_stats("3 messages", |s| {
        s["messages"] == 3 && s["connections_current"] == 0
    });
    fs::remove_file(&sink.stats).unwrap();
    let pid = sink.proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let st = sink.proc.0.wait().unwrap();
    assert!(st.success(), "{st}");
    let s = sink.stats().expect("stats rewritten on SIGTERM");
    assert_eq!(s["messages"], 3);
}

#[test]
fn refuses_non_loopback_and_honours_duration_limit() {
    for args in [
        &["send", "--target", "10.1.2.3:25", "--messages", "1"][..],
        &["sink", "--listen", "0.0.0.0:0"],
        &["idle", "--target", "192.168.0.1:25", "--connections", "1"],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("loopback"),
            "{args:?}"
        );
    }
    let sink = start_sink(&[]);
    let target = sink.addr.to_string();
    let out = run(&[
        "send",
        "--json",
        "--target",
        &target,
        "--messages",
        "100",
        "--duration-limit",
        "0s",
    ]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["attempted"], 0, "{r}");
    assert_eq!(r["stopped_by_duration_limit"], true);
}
