use super::*;
use crate::smtp::reply::EnhancedCode;
use serde_json::{json, Value};
use std::cell::Cell;

fn t(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn id(n: u64) -> SpoolId {
    SpoolId::from_u64(n)
}

fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(text.is_empty() || text.ends_with('\n'), "whole lines only");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Polls `cond` until it holds or `deadline` passes (no sleeps as
/// synchronisation: a short pause between polls only saves CPU).
fn eventually(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

fn delivery(n: u32) -> Event {
    Event::Delivery(Delivery {
        id: id(u64::from(n)),
        rcpt: format!("r{n}@example.net"),
        remote_host: "mx.example.net".into(),
        remote_ip: None,
        reply: crate::reply!(250, 2, 0, 0, "Ok"),
        attempt: 1,
        delay: Duration::ZERO,
        conn_reuse: n,
    })
}

#[test]
fn every_record_type_is_written_with_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let log = EventLog::open(&path).unwrap();
    assert!(log.is_enabled());
    let at = t(1_709_251_199_123);
    let msg = id(0x0123_4567_89AB_CDEF);
    log.record_at(at, || {
        Event::Reception(Reception {
            id: msg,
            from: "alice@example.org".into(),
            rcpt_count: 2,
            size: 5120,
            client_ip: Some("192.0.2.7".parse().unwrap()),
            helo: Some("client.example.org".into()),
        })
    });
    log.record_at(at, || {
        Event::Delivery(Delivery {
            id: msg,
            rcpt: "bob@example.net".into(),
            remote_host: "mx.example.net".into(),
            remote_ip: Some("2001:db8::25".parse().unwrap()),
            reply: crate::reply!(250, 2, 0, 0, "Ok: queued as 123"),
            attempt: 1,
            delay: Duration::from_millis(1500),
            conn_reuse: 7,
        })
    });
    log.record_at(at, || {
        Event::Deferral(Deferral {
            id: msg,
            rcpt: "carol@example.net".into(),
            remote_host: None,
            remote_ip: None,
            reply: Reply::from_parts(421, None, vec!["try later".into()]),
            attempt: 2,
            next_attempt: t(1_709_251_499_000),
            delay: Duration::from_secs(300),
        })
    });
    log.record_at(at, || {
        Event::Bounce(Bounce {
            id: msg,
            rcpt: "dave@nowhere.test".into(),
            remote_host: None,
            remote_ip: None,
            reply: Reply::new(550, EnhancedCode::new(5, 1, 2), "no such domain"),
            attempt: 0,
            reason: BounceReason::Dns,
            delay: Duration::from_millis(2),
        })
    });
    log.record_at(at, || {
        Event::Dsn(DsnQueued {
            id: msg,
            dsn_id: id(42),
            to: "alice@example.org".into(),
            rcpt_count: 1,
        })
    });
    drop(log);

    let got = lines(&path);
    let ts = "2024-02-29T23:59:59.123Z";
    let mid = msg.to_string();
    let want = [
        json!({"ts": ts, "event": "reception", "id": mid, "from": "alice@example.org",
               "rcpt_count": 2, "size": 5120, "client_ip": "192.0.2.7",
               "helo": "client.example.org"}),
        json!({"ts": ts, "event": "delivery", "id": mid, "rcpt": "bob@example.net",
               "remote_host": "mx.example.net", "remote_ip": "2001:db8::25",
               "reply": {"code": 250, "status": "2.0.0", "text": "Ok: queued as 123"},
               "attempt": 1, "delay_s": 1.5, "conn_reuse": 7}),
        json!({"ts": ts, "event": "deferral", "id": mid, "rcpt": "carol@example.net",
               "remote_host": null, "remote_ip": null,
               "reply": {"code": 421, "status": null, "text": "try later"},
               "attempt": 2, "next_attempt": "2024-03-01T00:04:59.000Z", "delay_s": 300.0}),
        json!({"ts": ts, "event": "bounce", "id": mid, "rcpt": "dave@nowhere.test",
               "remote_host": null, "remote_ip": null,
               "reply": {"code": 550, "status": "5.1.2", "text": "no such domain"},
               "attempt": 0, "reason": "dns", "delay_s": 0.002}),
        json!({"ts": ts, "event": "dsn", "id": mid, "dsn_id": id(42).to_string(),
               "to": "alice@example.org", "rcpt_count": 1}),
    ];
    assert_eq!(got, want);
    // "ts" and "event" lead every line (for grep and eyes).
    let text = std::fs::read_to_string(&path).unwrap();
    for l in text.lines() {
        assert!(
            l.starts_with(&format!("{{\"ts\":\"{ts}\",\"event\":\"")),
            "{l}"
        );
    }
}

#[test]
fn strings_are_escaped_one_record_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let log = EventLog::open(&path).unwrap();
    let nasty = "\"quoted\"@x\r\n{\"event\":\"fake\"}\u{0}\u{e9}";
    log.record(|| {
        Event::Reception(Reception {
            id: id(1),
            from: nasty.into(),
            rcpt_count: 1,
            size: 1,
            client_ip: None,
            helo: Some(nasty.into()),
        })
    });
    drop(log);
    let got = lines(&path);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["from"], nasty);
    assert_eq!(got[0]["event"], "reception");
}

#[test]
fn drop_of_the_last_handle_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    // A long interval: only the drop can have flushed.
    let log = EventLog::open_with(
        &path,
        EventLogOptions {
            flush_interval: Duration::from_secs(3600),
            ..EventLogOptions::default()
        },
    )
    .unwrap();
    let other = log.clone();
    std::thread::spawn(move || {
        other.record(|| delivery(1));
        // `other` dropped here: not the last handle, nothing flushed yet.
    })
    .join()
    .unwrap();
    log.record(|| delivery(2));
    assert!(
        lines(&path).is_empty(),
        "buffered, not yet flushed (3600 s interval)"
    );
    drop(log);
    let got = lines(&path);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["conn_reuse"], 1);
    assert_eq!(got[1]["conn_reuse"], 2);
}

#[test]
fn records_are_flushed_within_the_interval_while_the_log_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let log = EventLog::open_with(
        &path,
        EventLogOptions {
            flush_interval: Duration::from_millis(100),
            ..EventLogOptions::default()
        },
    )
    .unwrap();
    log.record(|| delivery(1));
    assert!(
        eventually(Duration::from_secs(20), || lines(&path).len() == 1),
        "not flushed by the timer"
    );
    // Again after an idle period: the timer re-arms.
    log.record(|| delivery(2));
    assert!(eventually(Duration::from_secs(20), || lines(&path).len() == 2));
    drop(log);
}

#[test]
fn default_interval_flushes_within_about_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let log = EventLog::open(&path).unwrap();
    let started = Instant::now();
    log.record(|| delivery(1));
    assert!(eventually(Duration::from_secs(30), || lines(&path).len() == 1));
    // Not a timing assertion on a loaded machine, only a sanity bound: the
    // buffer would otherwise hold the record until drop.
    assert!(started.elapsed() >= Duration::from_millis(900));
    drop(log);
}

#[test]
fn sync_writes_everything_recorded_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let log = EventLog::open_with(
        &path,
        EventLogOptions {
            flush_interval: Duration::from_secs(3600),
            ..EventLogOptions::default()
        },
    )
    .unwrap();
    for n in 0..100 {
        log.record(|| delivery(n));
    }
    assert!(log.sync(Duration::from_secs(30)));
    assert_eq!(lines(&path).len(), 100);
    drop(log);
}

#[test]
fn disabled_log_builds_nothing() {
    let log = EventLog::disabled();
    assert!(!log.is_enabled());
    let called = Cell::new(false);
    log.record(|| {
        called.set(true);
        delivery(1)
    });
    log.record_at(t(0), || {
        called.set(true);
        delivery(1)
    });
    assert!(!called.get(), "the event closure must not run");
    assert_eq!(log.dropped(), 0);
    assert!(log.sync(Duration::from_secs(1)));
    let default = EventLog::default();
    assert!(!default.is_enabled());
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let (open_gate, gate) = channel::bounded(1);
    let log = EventLog::start(
        &path,
        EventLogOptions {
            capacity: 3,
            ..EventLogOptions::default()
        },
        Some(gate),
    )
    .unwrap();
    // The writer is held at the gate: nothing is consumed.
    for n in 0..10 {
        log.record(|| delivery(n));
    }
    assert_eq!(log.dropped(), 7);
    open_gate.send(()).unwrap();
    drop(log);
    let got = lines(&path);
    let kept: Vec<_> = got
        .iter()
        .map(|v| v["conn_reuse"].as_u64().unwrap())
        .collect();
    assert_eq!(kept, [0, 1, 2]);
}

#[test]
fn many_threads_many_records_no_torn_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let log = EventLog::open(&path).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let log = log.clone();
            std::thread::spawn(move || {
                for n in 0..1000 {
                    log.record(|| delivery(k * 1000 + n));
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(log.dropped(), 0);
    drop(log);
    let mut seen: Vec<u64> = lines(&path)
        .iter()
        .map(|v| v["conn_reuse"].as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..4000).collect::<Vec<_>>());
}

#[test]
fn appends_to_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, "{\"old\":true}\n").unwrap();
    let log = EventLog::open(&path).unwrap();
    log.record(|| delivery(1));
    drop(log);
    let got = lines(&path);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["old"], true);
}

#[test]
fn open_fails_cleanly_on_a_bad_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = EventLog::open(&dir.path().join("missing/dir/events.jsonl")).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
}

#[test]
fn iso8601_known_dates() {
    for (ms, text) in [
        (0, "1970-01-01T00:00:00.000Z"),
        (1_057_056_757_001, "2003-07-01T10:52:37.001Z"),
        (951_782_400_999, "2000-02-29T00:00:00.999Z"),
        (1_709_251_199_123, "2024-02-29T23:59:59.123Z"),
        (4_102_444_800_000, "2100-01-01T00:00:00.000Z"),
    ] {
        assert_eq!(iso8601(t(ms)), text);
    }
}
