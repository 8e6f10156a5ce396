use super::*;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Runs `f` on a fresh glommio executor with a small io_memory (RLIMIT_MEMLOCK
/// is 8 MiB here; the default would register 10 MiB).
fn run<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(f)
        .expect("executor starts")
        .join()
        .expect("executor joins")
}

fn ms(y2020_offset: u64) -> u64 {
    ID_EPOCH_UNIX_MS + y2020_offset
}

fn envelope(id: SpoolId, size: u64) -> Envelope {
    Envelope {
        id,
        sender: "a@example.org".into(),
        recipients: vec![
            Recipient {
                address: "b@example.net".into(),
                notify: Some("SUCCESS,FAILURE".into()),
                orcpt: Some("rfc822;b@example.net".into()),
                state: RecipientState::Pending,
                remote_mta: None,
            },
            Recipient {
                address: "c@example.net".into(),
                notify: None,
                orcpt: None,
                state: RecipientState::Pending,
                remote_mta: None,
            },
        ],
        received_at_ms: id.timestamp_ms(),
        size,
        body_8bit: true,
        smtputf8: false,
        ret_full: Some(false),
        envid: Some("env-1".into()),
        client_ip: Some("192.0.2.1".into()),
        helo: Some("client.example.org".into()),
    }
}

/// A body that identifies its message, so a mixed-up load cannot pass.
fn body_for(id: SpoolId, len: usize) -> Vec<u8> {
    let line = format!("Subject: {id}\r\n");
    line.bytes().cycle().take(len).collect()
}

/// Opens `path`, waiting out `Locked` for a while: a child that another
/// test forks copies every open descriptor, sled's lock included, until it
/// execs, so a spool closed a moment ago can still look locked.
fn open_when_unlocked_with(path: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match Spool::open_with(path, options.clone()) {
            Err(SpoolError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other,
        }
    }
}

fn open_when_unlocked(path: &Path) -> Spool {
    open_when_unlocked_with(path, SpoolOptions::default()).unwrap()
}

// ---------------------------------------------------------------- ids

#[test]
fn id_fields_round_trip() {
    let cases = [
        (0u64, 0u8, 0u16),
        (1, 1, 1),
        (123_456_789, 7, 16_383),
        ((1 << 42) - 1, 255, 16_383),
    ];
    for (epoch_ms, shard, seq) in cases {
        let id = SpoolId::from_parts(epoch_ms, shard, seq);
        assert_eq!(id.shard(), shard);
        assert_eq!(id.sequence(), seq);
        assert_eq!(id.timestamp_ms(), ID_EPOCH_UNIX_MS + epoch_ms);
        assert_eq!(SpoolId::from_u64(id.as_u64()), id);
        assert_eq!(u64::from_be_bytes(id.to_be_bytes()), id.as_u64());
    }
}

#[test]
fn id_text_round_trip_and_order() {
    let ids = [
        0u64,
        1,
        31,
        32,
        u64::MAX,
        u64::MAX - 1,
        1 << 63,
        0x0123_4567_89ab_cdef,
    ];
    for raw in ids {
        let id = SpoolId::from_u64(raw);
        let text = id.to_string();
        assert_eq!(text.len(), ID_TEXT_LEN, "{text}");
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()));
        assert_eq!(text.parse::<SpoolId>(), Ok(id), "{text}");
        assert_eq!(text.to_ascii_lowercase().parse::<SpoolId>(), Ok(id));
    }
    assert_eq!(SpoolId::from_u64(0).to_string(), "0000000000000");
    assert_eq!(SpoolId::from_u64(u64::MAX).to_string(), "FZZZZZZZZZZZZ");
    // Text order equals numeric order.
    let mut g = SpoolIdGenerator::new(3, None);
    let mut prev = g.next(ms(5));
    for i in 0..20_000u64 {
        let id = g.next(ms(5 + i / 3));
        assert!(id.to_string() > prev.to_string());
        prev = id;
    }
}

#[test]
fn id_parse_errors() {
    let cases: [(&str, ParseSpoolIdError); 4] = [
        ("", ParseSpoolIdError::Length(0)),
        ("00000000000000", ParseSpoolIdError::Length(14)),
        ("000000000000U", ParseSpoolIdError::Char('U')),
        ("G000000000000", ParseSpoolIdError::Overflow),
    ];
    for (text, err) in cases {
        assert_eq!(text.parse::<SpoolId>(), Err(err), "{text:?}");
    }
    // Crockford aliases.
    assert_eq!("OOOOOOOOOOOOI".parse::<SpoolId>(), Ok(SpoolId::from_u64(1)));
}

#[test]
fn generator_is_monotonic_and_unique() {
    // (description, clock readings)
    let cases: [(&str, Vec<u64>); 4] = [
        ("advancing clock", (0..1000).map(|i| ms(1000 + i)).collect()),
        ("same ms", vec![ms(50); 1000]),
        (
            "clock steps back",
            vec![ms(100), ms(101), ms(90), ms(90), ms(50), ms(102), ms(101)],
        ),
        ("before the epoch", vec![0, 0, ID_EPOCH_UNIX_MS - 1, ms(0)]),
    ];
    for (what, clock) in cases {
        let mut g = SpoolIdGenerator::new(9, None);
        let mut prev: Option<SpoolId> = None;
        for now in clock {
            let id = g.next(now);
            assert_eq!(id.shard(), 9, "{what}");
            if let Some(p) = prev {
                assert!(id > p, "{what}: {id} after {p}");
            }
            prev = Some(id);
        }
    }
}

#[test]
fn generator_borrows_from_the_future_on_sequence_overflow() {
    let mut g = SpoolIdGenerator::new(1, None);
    let mut seen = HashSet::new();
    let mut last = None;
    for _ in 0..16_384 * 2 + 5 {
        let id = g.next(ms(1_000));
        assert!(seen.insert(id), "duplicate {id}");
        if let Some(p) = last {
            assert!(id > p);
        }
        last = Some(id);
    }
    let last = last.unwrap();
    // 2 full milliseconds of sequence used, so the last id is 2 ms ahead.
    assert_eq!(last.timestamp_ms(), ms(1_002));
    assert_eq!(last.sequence(), 4);
    // When the clock catches up past the borrowed ms, it resumes at seq 0.
    let id = g.next(ms(1_010));
    assert_eq!((id.timestamp_ms(), id.sequence()), (ms(1_010), 0));
}

#[test]
fn generator_seeded_after_restart_never_reissues() {
    // (our shard, not_before) - the clock is behind not_before (stepped back).
    let seeds = [
        (2u8, SpoolId::from_parts(500, 2, 7)),
        (2, SpoolId::from_parts(500, 200, 16_383)),
        (200, SpoolId::from_parts(500, 2, 0)),
        (2, SpoolId::from_parts(500, 2, 16_383)),
    ];
    for (shard, seed) in seeds {
        let mut g = SpoolIdGenerator::new(shard, Some(seed));
        let first = g.next(ms(10));
        assert!(first > seed, "{first:?} <= {seed:?}");
        assert_eq!(first.shard(), shard);
        // Any id this shard issued before the restart is <= seed: the first id
        // must exceed the largest possible one in seed's millisecond, unless
        // seed is our own (then seed itself was our largest).
        if seed.shard() != shard {
            assert!(first.timestamp_ms() > seed.timestamp_ms());
        }
    }
}

// ---------------------------------------------------------------- store

#[test]
fn store_load_update_remove_enumerate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let spool = open_when_unlocked(&path);
        let p = spool.partition(0).unwrap();
        let mut g = SpoolIdGenerator::new(0, None);
        let ids: Vec<SpoolId> = (0..5).map(|i| g.next(ms(1_000 + i))).collect();
        for (i, &id) in ids.iter().enumerate() {
            let body = body_for(id, 100 + i * 1000);
            p.store(&envelope(id, body.len() as u64), &body)
                .await
                .unwrap();
        }
        assert_eq!(p.len(), 5);
        for (i, &id) in ids.iter().enumerate() {
            let (env, body) = p.load(id).unwrap().expect("stored");
            assert_eq!(env, envelope(id, (100 + i * 1000) as u64));
            assert_eq!(body, body_for(id, 100 + i * 1000));
        }
        let missing = g.next(ms(9_999));
        assert_eq!(p.load(missing).unwrap(), None);
        assert!(matches!(
            p.update(&envelope(missing, 1)).await,
            Err(SpoolError::NotFound(_))
        ));

        // update
        let mut env = p.load_envelope(ids[1]).unwrap().unwrap();
        env.recipients[0].state = RecipientState::Delivered {
            at_ms: 5,
            reply: "250 ok".into(),
        };
        env.recipients[1].state = RecipientState::Deferred {
            attempts: 1,
            last_reply: "451 later".into(),
            next_attempt_ms: 99,
        };
        p.update(&env).await.unwrap();
        assert_eq!(p.load_envelope(ids[1]).unwrap(), Some(env.clone()));
        assert_eq!(p.load(ids[1]).unwrap().unwrap().1, body_for(ids[1], 1100));

        // remove (twice: idempotent)
        p.remove(ids[2]).await.unwrap();
        p.remove(ids[2]).await.unwrap();
        assert_eq!(p.load(ids[2]).unwrap(), None);
        assert_eq!(p.len(), 4);

        // enumerate: id order, updated state visible, removed one gone
        let listed: Vec<Envelope> = p.envelopes().collect::<Result<_, _>>().unwrap();
        let listed_ids: Vec<SpoolId> = listed.iter().map(|e| e.id).collect();
        assert_eq!(listed_ids, vec![ids[0], ids[1], ids[3], ids[4]]);
        assert_eq!(listed[1], env);
        assert_eq!(spool.count().unwrap(), 4);
        assert_eq!(spool.max_id().unwrap(), Some(ids[4]));
        assert_eq!(
            spool
                .list(2)
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect::<Vec<_>>(),
            vec![ids[0], ids[1]]
        );
    });
}

#[test]
fn concurrent_stores_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let (stores, flushes, covered, max_batch) = run(move || async move {
        let spool = open_when_unlocked(&path);
        let p = spool.partition(4).unwrap();
        let mut g = SpoolIdGenerator::new(4, None);
        let n = 200;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let p = p.clone();
                let id = g.next(ms(i));
                glommio::spawn_local(async move {
                    let body = body_for(id, 2048);
                    p.store(&envelope(id, 2048), &body).await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        assert_eq!(p.len(), n as usize);
        (n, p.flush_count(), p.flushed_writes(), p.max_flush_batch())
    });
    assert_eq!(
        covered, stores,
        "every store is covered by exactly one flush"
    );
    assert!(
        flushes < stores && max_batch > 1,
        "{flushes} flushes for {stores} stores, max batch {max_batch}"
    );
}

#[test]
fn reopen_sees_everything_and_partitions_of_gone_shards() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let stored: Vec<(u16, SpoolId)> = run({
        let path = path.clone();
        move || async move {
            let spool = open_when_unlocked(&path);
            let mut out = vec![];
            for shard in [0u16, 1, 7] {
                let p = spool.partition(shard).unwrap();
                let mut g = SpoolIdGenerator::new(shard as u8, None);
                for i in 0..3 {
                    let id = g.next(ms(100 + i));
                    p.store(&envelope(id, 10), &body_for(id, 10)).await.unwrap();
                    out.push((shard, id));
                }
            }
            out
        }
    });
    // Second opener while the first is alive is refused with a clear error.
    {
        let first = open_when_unlocked(&path);
        let err = Spool::open(&path).unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("is locked by another process"));
        drop(first);
    }
    // Restart "with one shard": partitions() still finds 1 and 7.
    let spool = open_when_unlocked(&path);
    assert_eq!(spool.partitions().unwrap(), vec![0, 1, 7]);
    assert_eq!(spool.count().unwrap(), 9);
    for (shard, id) in &stored {
        let p = spool.partition(*shard).unwrap();
        assert_eq!(p.len(), 3);
        let (env, body) = p.load(*id).unwrap().expect("survives reopen");
        assert_eq!(env.id, *id);
        assert_eq!(body, body_for(*id, 10));
    }
    let max = stored.iter().map(|(_, id)| *id).max();
    assert_eq!(spool.max_id().unwrap(), max);
    let listed: Vec<SpoolId> = spool.list(100).unwrap().iter().map(|e| e.id).collect();
    let mut expected: Vec<SpoolId> = stored.iter().map(|(_, id)| *id).collect();
    expected.sort();
    assert_eq!(listed, expected);
}

#[test]
fn errors_map_to_transient_storage_reply() {
    let e = SpoolError::Storage(sled::Error::Io(std::io::Error::other("disk full")));
    let r = e.reply();
    assert_eq!(
        (r.code(), r.enhanced()),
        (452, Some(EnhancedCode::new(4, 3, 1)))
    );
    assert!(r.is_transient());
    let c = SpoolError::Corrupt {
        what: "x".into(),
        reason: "y".into(),
    };
    assert!(c.reply().is_transient());
}

// ---------------------------------------------------------------- child processes

const CHILD_DIR: &str = "SLUICE_SPOOL_TEST_CHILD_DIR";
const CHILD_BODY: &str = "SLUICE_SPOOL_TEST_CHILD_BODY";

/// Spawns this test binary running only `test`, with the child env set.
fn spawn_child(
    test: &str,
    dir: &Path,
    body: usize,
    shell_prefix: Option<&str>,
) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let args = [test, "--exact", "--nocapture", "--test-threads=1"];
    let mut cmd = match shell_prefix {
        Some(prefix) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{prefix}; exec \"$0\" \"$@\""))
                .arg(&exe)
                .args(args);
            c
        }
        None => {
            let mut c = Command::new(&exe);
            c.args(args);
            c
        }
    };
    cmd.env(CHILD_DIR, dir)
        .env(CHILD_BODY, body.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Child side: stores messages from 16 concurrent tasks forever (until
/// killed or until a store fails), printing `STORED <id>` after each `Ok`
/// and `ERR <reply>` on the first error. Does nothing when run normally.
#[test]
fn child_store_forever() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let body_len: usize = std::env::var(CHILD_BODY).unwrap().parse().unwrap();
    let path = PathBuf::from(dir);
    run(move || async move {
        use std::io::Write;
        let spool = match open_when_unlocked_with(&path, SpoolOptions::default()) {
            Ok(s) => s,
            Err(e) => {
                println!("ERR {}", e.reply());
                return;
            }
        };
        let p = spool.partition(0).unwrap();
        let g = Rc::new(std::cell::RefCell::new(SpoolIdGenerator::new(
            0,
            spool.max_id().unwrap(),
        )));
        let failed = Rc::new(Cell::new(false));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (p, g, failed) = (p.clone(), g.clone(), failed.clone());
                glommio::spawn_local(async move {
                    // Bounded so an orphaned child cannot run forever.
                    for _ in 0..20_000 {
                        if failed.get() {
                            return;
                        }
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_millis() as u64;
                        let id = g.borrow_mut().next(now);
                        let body = body_for(id, body_len);
                        match p.store(&envelope(id, body_len as u64), &body).await {
                            Ok(()) => {
                                let mut out = std::io::stdout().lock();
                                writeln!(out, "STORED {id}").unwrap();
                                out.flush().unwrap();
                            }
                            Err(e) => {
                                if !failed.replace(true) {
                                    println!("ERR {} ({e})", e.reply());
                                }
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        println!("DONE");
    });
}

fn verify_loadable(path: &Path, ids: &[SpoolId], body_len: usize) {
    let spool = open_when_unlocked(path);
    let p = spool.partition(0).unwrap();
    for id in ids {
        let (env, body) = p
            .load(*id)
            .unwrap()
            .unwrap_or_else(|| panic!("{id} was acknowledged but is missing after SIGKILL"));
        assert_eq!(env.id, *id);
        assert_eq!(body, body_for(*id, body_len), "{id} body");
    }
}

#[test]
fn acknowledged_stores_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let body_len = 4096;
    let mut all = Vec::new();
    for round in 0..3 {
        let mut child = spawn_child(
            "spool::tests::child_store_forever",
            dir.path(),
            body_len,
            None,
        );
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let kill_after = 150 + round * 97;
        let mut acked = Vec::new();
        let mut killed = false;
        for line in stdout.lines() {
            let line = line.unwrap();
            if let Some(id) = line.strip_prefix("STORED ") {
                acked.push(id.parse::<SpoolId>().unwrap());
            }
            assert!(!line.starts_with("ERR"), "child failed: {line}");
            if acked.len() == kill_after && !killed {
                // SIGKILL mid-stream; keep reading what it printed before dying.
                child.kill().unwrap();
                killed = true;
            }
        }
        child.wait().unwrap();
        assert!(
            killed && acked.len() >= kill_after,
            "round {round}: child ended early"
        );
        verify_loadable(dir.path(), &acked, body_len);
        all.extend(acked);
    }
    // Earlier rounds' messages are still there too, and ids never repeated.
    verify_loadable(dir.path(), &all, body_len);
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), all.len());
}

const CHILD_REMOVE: &str = "SLUICE_SPOOL_TEST_CHILD_REMOVE";

/// Child side of `sled_lost_in_a_crash_is_restored_from_the_body_log`: with
/// sled flushed only when asked (index flush interval of a minute), stores
/// 40 messages, completes (removes) the first `CHILD_REMOVE` of them and
/// flushes everything, then stores 40 more that only reach the body log.
/// Prints `STORED`/`REMOVED` lines, then `READY`, then waits to be killed.
#[test]
fn child_store_remove_store_then_wait() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let remove: usize = std::env::var(CHILD_REMOVE).unwrap().parse().unwrap();
    let path = PathBuf::from(dir);
    run(move || async move {
        let options = SpoolOptions {
            index_flush_interval: std::time::Duration::from_secs(60),
            ..SpoolOptions::default()
        };
        let spool = open_when_unlocked_with(&path, options).unwrap();
        let p = spool.partition(0).unwrap();
        let mut g = SpoolIdGenerator::new(0, spool.max_id().unwrap());
        let mut ids = vec![];
        for i in 0..80 {
            if i == 40 {
                for id in &ids[..remove] {
                    p.complete(*id, None).await.unwrap();
                    println!("REMOVED {id}");
                }
                spool.flush_blocking().unwrap();
            }
            let id = g.next(ms(1000 + i));
            p.store(&envelope(id, 300), &body_for(id, 300))
                .await
                .unwrap();
            println!("STORED {id}");
            ids.push(id);
        }
        println!("READY");
        // Bounded, in case the parent is gone.
        glommio::timer::sleep(std::time::Duration::from_secs(60)).await;
    });
}

#[test]
fn sled_lost_in_a_crash_is_restored_from_the_body_log() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "spool::tests::child_store_remove_store_then_wait",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .env(CHILD_REMOVE, "10")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stored = vec![];
    let mut removed = HashSet::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // The harness's "test <name> ... " has no newline: the first line
        // of the child's output follows it.
        let line = line.rsplit(" ... ").next().unwrap_or_default();
        if let Some(id) = line.strip_prefix("STORED ") {
            stored.push(id.parse::<SpoolId>().unwrap());
        } else if let Some(id) = line.strip_prefix("REMOVED ") {
            removed.insert(id.parse::<SpoolId>().unwrap());
        } else if line == "READY" {
            child.kill().unwrap();
        }
    }
    child.wait().unwrap();
    assert_eq!(
        (stored.len(), removed.len()),
        (80, 10),
        "child ran to READY"
    );

    // Tear the tail too: half a record appended after the last one, as if
    // the process died inside a write.
    let bodies = dir.path().join(bodies::BODIES_DIR);
    let mut segments: Vec<_> = std::fs::read_dir(&bodies)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let last = segments.last().unwrap();
    let mut data = std::fs::read(last).unwrap();
    let torn = data[bodies::SEGMENT_MAGIC.len()..bodies::SEGMENT_MAGIC.len() + 50].to_vec();
    data.extend_from_slice(&torn);
    std::fs::write(last, data).unwrap();

    let spool = open_when_unlocked(dir.path());
    // The last 40 were never in sled on disk: all of them came back from
    // the body log. The 10 removed (durably) stayed removed; the other 30
    // of the first 40 were in sled already.
    assert_eq!(spool.restored(), 40);
    let p = spool.partition(0).unwrap();
    assert_eq!(p.len(), 70);
    for id in &stored {
        let loaded = p.load(*id).unwrap();
        if removed.contains(id) {
            assert!(
                loaded.is_none(),
                "{id} was removed durably, must stay removed"
            );
        } else {
            let (env, body) = loaded.unwrap_or_else(|| panic!("{id} acknowledged but lost"));
            assert_eq!(env, envelope(*id, 300));
            assert_eq!(body, body_for(*id, 300));
        }
    }
    // The replay is idempotent and new stores go on after the torn tail.
    drop(p);
    drop(spool);
    let spool = open_when_unlocked(dir.path());
    assert_eq!(spool.restored(), 0, "second open: sled has them now");
    assert_eq!(spool.count().unwrap(), 70);
}

#[test]
fn store_fails_when_the_disk_is_full() {
    // RLIMIT_FSIZE stands in for a full disk (we run as root, so a read-only
    // directory would not stop us). `trap '' XFSZ` makes the over-limit write
    // fail with EFBIG instead of killing the process; both survive exec.
    // dash counts `ulimit -f` in 512-byte blocks: 8192 = 4 MiB.
    let dir = tempfile::tempdir().unwrap();
    let body_len = 64 << 10;
    let mut child = spawn_child(
        "spool::tests::child_store_forever",
        dir.path(),
        body_len,
        Some("trap '' XFSZ; ulimit -f 8192"),
    );
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut acked = Vec::new();
    let mut err = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(id) = line.strip_prefix("STORED ") {
            acked.push(id.parse::<SpoolId>().unwrap());
        } else if line.starts_with("ERR ") {
            err = Some(line);
        }
    }
    child.wait().unwrap();
    let err = err.expect("storing past the file size limit must fail");
    assert!(err.starts_with("ERR 452 4.3.1"), "{err}");
    // Nothing acknowledged before the failure was lost.
    verify_loadable(dir.path(), &acked, body_len);
}

// ---------------------------------------------------------------- health

fn health(timeout_ms: u64) -> Arc<Health> {
    Arc::new(Health::new(
        PathBuf::from("/nonexistent"),
        SpoolOptions {
            min_free_space: 0,
            flush_timeout: std::time::Duration::from_millis(timeout_ms),
            ..SpoolOptions::default()
        },
    ))
}

#[test]
fn stalled_flush_answers_at_the_timeout_and_clears_when_it_completes() {
    run(|| async {
        let h = health(50);
        let gate = Rc::new(Cell::new(false));
        let g = gate.clone();
        let slow = std::future::poll_fn(move |cx| {
            if g.get() {
                std::task::Poll::Ready(Ok(1))
            } else {
                // Re-polled by the timer below; no busy loop.
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        });
        let started = std::time::Instant::now();
        let r = watched_flush(slow, Arc::clone(&h)).await;
        assert!(r.is_err(), "timed out flush is an error for its writers");
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        assert_eq!(h.state(), WriteState::Stalled);
        gate.set(true);
        // The background task sees the flush finish and clears the stall.
        for _ in 0..1000 {
            if h.state() == WriteState::Ok {
                break;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(h.state(), WriteState::Ok);
    });
}

#[test]
fn failed_flush_marks_the_spool_failed_for_good() {
    run(|| async {
        let h = health(1000);
        let r = watched_flush(
            async { Err(sled::Error::Io(std::io::Error::other("ENOSPC"))) },
            Arc::clone(&h),
        )
        .await;
        assert!(r.is_err());
        assert_eq!(h.state(), WriteState::Failed);
        h.unstall();
        assert_eq!(h.state(), WriteState::Failed, "only a restart clears it");
        let ok = watched_flush(async { Ok(0) }, Arc::clone(&h)).await;
        assert!(ok.is_ok());
        assert_eq!(h.state(), WriteState::Failed);
    });
}

#[test]
fn unwritable_spool_refuses_stores_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    run(move || async move {
        let spool = open_when_unlocked(&path);
        let p = spool.partition(0).unwrap();
        spool.health.stall();
        let id = SpoolIdGenerator::new(0, None).next(ms(1));
        let e = p.store(&envelope(id, 3), b"abc").await.unwrap_err();
        assert!(
            matches!(e, SpoolError::Unavailable(WriteState::Stalled)),
            "{e}"
        );
        assert_eq!(e.reply().code(), 452);
        assert!(p.load(id).unwrap().is_none(), "nothing written");
        assert!(spool.flush_blocking().is_err(), "no blocking flush either");
        spool.health.unstall();
        p.store(&envelope(id, 3), b"abc").await.unwrap();
    });
}

#[test]
fn reserve_refuses_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    run(move || async move {
        // A reserve larger than any disk: always refused.
        let spool = Spool::open_with(
            &path,
            SpoolOptions {
                min_free_space: u64::MAX / 2,
                ..SpoolOptions::default()
            },
        )
        .unwrap();
        let p = spool.partition(0).unwrap();
        let id = SpoolIdGenerator::new(0, None).next(ms(1));
        let e = p.store(&envelope(id, 3), b"abc").await.unwrap_err();
        assert!(matches!(e, SpoolError::InsufficientSpace { .. }), "{e}");
        assert_eq!(e.reply().to_string().get(..9), Some("452 4.3.1"));
        assert!(p.load(id).unwrap().is_none());
        assert_eq!(spool.write_state(), WriteState::Ok, "not a failure");
    });
}

#[test]
fn bodies_of_every_size_round_trip_through_the_body_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    run(move || async move {
        let spool = open_when_unlocked(&path);
        let p = spool.partition(0).unwrap();
        let mut g = SpoolIdGenerator::new(0, None);
        let sizes = [0, 1, 4095, 65536, 100 << 10, 1 << 20, (5 << 20) + 17];
        let mut ids = Vec::new();
        for (i, len) in sizes.into_iter().enumerate() {
            let id = g.next(ms(i as u64));
            let body = body_for(id, len);
            p.store(&envelope(id, len as u64), &body).await.unwrap();
            ids.push((id, body));
        }
        // Many 100 KiB messages, stored concurrently (a few group commits).
        let tasks: Vec<_> = (0..60)
            .map(|i| {
                let id = g.next(ms(100 + i));
                let p = p.clone();
                glommio::spawn_local(async move {
                    let body = body_for(id, 100 << 10);
                    p.store_parts(&envelope(id, 100 << 10), &[&body[..10], &body[10..]])
                        .await
                        .unwrap();
                    (id, body)
                })
            })
            .collect();
        for t in tasks {
            ids.push(t.await);
        }
        for (id, body) in &ids {
            let (_, got) = p.load(*id).unwrap().unwrap();
            assert!(got == *body, "{id}: {} vs {} octets", got.len(), body.len());
        }
        // sled never wrote a blob file (it would not fsync it).
        let blobs = path.join("blobs");
        let n = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        assert_eq!(n, 0, "sled wrote unsynced blob files");
        // Bodies are in the body log; removing every message deletes every
        // segment but the one still open for appends.
        assert!(!p.inner.bodies.live_segments().is_empty());
        for (id, _) in &ids {
            p.remove(*id).await.unwrap();
        }
        let left = std::fs::read_dir(path.join(bodies::BODIES_DIR))
            .unwrap()
            .count();
        assert!(left <= 1, "{left} segments left");
    });
}

#[test]
fn body_log_survives_reopen_and_drops_unreferenced_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let (kept, gone) = run({
        let path = path.clone();
        move || async move {
            let spool = open_when_unlocked(&path);
            let p = spool.partition(1).unwrap();
            let mut g = SpoolIdGenerator::new(1, None);
            let kept = g.next(ms(1));
            let gone = g.next(ms(2));
            p.store(&envelope(kept, 9), b"kept body").await.unwrap();
            p.store(&envelope(gone, 9), b"gone body").await.unwrap();
            p.remove(gone).await.unwrap();
            (kept, gone)
        }
    });
    // An orphan segment (a body whose envelope never became durable).
    std::fs::write(
        path.join(bodies::BODIES_DIR)
            .join("00001-999999999999.body"),
        b"x",
    )
    .unwrap();
    run(move || async move {
        let spool = open_when_unlocked(&path);
        let p = spool.partition(1).unwrap();
        assert_eq!(p.load(kept).unwrap().unwrap().1, b"kept body");
        assert!(p.load(gone).unwrap().is_none());
        assert!(!path
            .join(bodies::BODIES_DIR)
            .join("00001-999999999999.body")
            .exists());
        // New appends go to a new segment, after the highest seen.
        let mut g = SpoolIdGenerator::new(1, Some(kept));
        let id = g.next(ms(3));
        p.store(&envelope(id, 3), b"new").await.unwrap();
        assert_eq!(p.load(id).unwrap().unwrap().1, b"new");
    });
}

#[test]
fn a_pointer_without_its_envelope_is_dropped_and_new_segments_number_above_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let (a, b) = run({
        let path = path.clone();
        move || async move {
            let spool = open_when_unlocked(&path);
            let p = spool.partition(2).unwrap();
            let mut g = SpoolIdGenerator::new(2, None);
            let (a, b) = (g.next(ms(1)), g.next(ms(2)));
            p.store(&envelope(a, 1), b"a").await.unwrap();
            p.store(&envelope(b, 1), b"b").await.unwrap();
            // A crash between a removal's two writes: the envelope is
            // gone, the pointer is not.
            p.inner.tree.remove(key(ENVELOPE_PREFIX, a)).unwrap();
            // Partition 3: its only message removed, so its segment goes at
            // the next start, while its watermark still points into it.
            let p3 = spool.partition(3).unwrap();
            let c = SpoolIdGenerator::new(3, None).next(ms(3));
            p3.store(&envelope(c, 1), b"c").await.unwrap();
            p3.remove(c).await.unwrap();
            spool.flush_blocking().unwrap();
            (a, b)
        }
    });
    let segments = |shard: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(path.join(bodies::BODIES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(shard))
            .collect();
        v.sort();
        v
    };
    assert_eq!(segments("00003-"), ["00003-000000000001.body"]);
    run({
        let path = path.clone();
        move || async move {
            let spool = open_when_unlocked(&path);
            let p = spool.partition(2).unwrap();
            assert!(p.inner.tree.get(key(POINTER_PREFIX, a)).unwrap().is_none());
            assert!(p.load(a).unwrap().is_none());
            assert_eq!(p.load(b).unwrap().unwrap().1, b"b");
            assert_eq!(p.len(), 1);
            // Opening partition 3 deletes its empty segment; nothing is
            // stored in it this time.
            spool.partition(3).unwrap();
        }
    });
    assert!(segments("00003-").is_empty());
    run({
        let path = path.clone();
        move || async move {
            let spool = open_when_unlocked(&path);
            let p3 = spool.partition(3).unwrap();
            let d = SpoolIdGenerator::new(3, None).next(ms(4));
            p3.store(&envelope(d, 1), b"d").await.unwrap();
        }
    });
    // The watermark still points into segment 1, which no longer exists:
    // the new segment is numbered above it, or a replay from the watermark
    // would start in the middle of the new segment 1 and skip its first
    // records.
    assert_eq!(segments("00003-"), ["00003-000000000002.body"]);
}

// ---------------------------------------------------------------- delivery

#[test]
fn complete_swaps_original_for_dsn_atomically_and_readers_see_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let spool = open_when_unlocked(&path);
        let p = spool.partition(0).unwrap();
        let mut g = SpoolIdGenerator::new(0, None);
        let (a, b, dsn_id) = (g.next(ms(1)), g.next(ms(2)), g.next(ms(3)));
        for id in [a, b] {
            let body = body_for(id, 300);
            p.store(&envelope(id, 300), &body).await.unwrap();
        }
        // A reader on another thread sees envelope and body.
        let reader = spool.reader(0).unwrap();
        let got = std::thread::spawn(move || {
            (
                reader.load_envelope(a).unwrap(),
                reader.load_body(a).unwrap().map(|b| b.to_vec()),
                reader.load_body(dsn_id).unwrap(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(got.0, Some(envelope(a, 300)));
        assert_eq!(got.1, Some(body_for(a, 300)));
        assert_eq!(got.2, None);

        // complete with a DSN: original gone, DSN present, count unchanged.
        let mut dsn = envelope(dsn_id, 8);
        dsn.sender = String::new();
        p.complete(a, Some((&dsn, b"dsn body"))).await.unwrap();
        assert_eq!(p.load(a).unwrap(), None);
        assert_eq!(p.load(dsn_id).unwrap(), Some((dsn, b"dsn body".to_vec())));
        assert_eq!(
            p.reader().load_body(dsn_id).unwrap().as_deref(),
            Some(&b"dsn body"[..])
        );
        assert_eq!(p.len(), 2);
        // complete without a DSN is a remove; twice is harmless.
        p.complete(b, None).await.unwrap();
        p.complete(b, None).await.unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(spool.count().unwrap(), 1);
        assert_eq!(p.reader().load_body(b).unwrap(), None);
    });
}

#[test]
fn envelopes_without_remote_mta_still_decode() {
    let id = SpoolIdGenerator::new(0, None).next(ms(5));
    let env = envelope(id, 10);
    let json = String::from_utf8(env.encode()[1..].to_vec()).unwrap();
    assert!(!json.contains("remote_mta"), "None is not written: {json}");
    let mut stored = vec![1u8];
    stored.extend_from_slice(json.as_bytes());
    assert_eq!(Envelope::decode(&stored).unwrap(), env);
}
