//! Spool write throughput on one glommio executor: 50 concurrent `store`s per
//! iteration, 5 KiB and 100 KiB bodies, two body layouts:
//!
//! * `sled`: body as a value in the shard's tree (what `Partition::store` does).
//! * `file+sled`: body in its own file (glommio `BufferedFile`, write +
//!   fdatasync + directory fsync), then the envelope alone in sled through the
//!   same group-committed `store` (empty body value).
//!
//! Criterion reports elements/s = stores/s. The mean group-commit batch size
//! (writes per flush) is printed to stderr after each benchmark.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::spool::{
    Envelope, Partition, Recipient, RecipientState, Spool, SpoolId, SpoolIdGenerator,
};

const CONCURRENCY: usize = 50;

#[derive(Clone, Copy, Debug)]
enum Layout {
    Sled,
    FilePlusSled,
}

fn envelope(id: SpoolId, size: u64) -> Envelope {
    Envelope {
        id,
        sender: "bounce@example.org".into(),
        recipients: vec![Recipient {
            address: "user@example.net".into(),
            notify: None,
            orcpt: None,
            state: RecipientState::Pending,
            remote_mta: None,
        }],
        received_at_ms: id.timestamp_ms(),
        size,
        body_8bit: false,
        smtputf8: false,
        ret_full: None,
        envid: None,
        client_ip: Some("192.0.2.1".into()),
        helo: Some("client.example.org".into()),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn store_one(
    layout: Layout,
    p: &Partition,
    bodies: &Path,
    dir: &glommio::io::Directory,
    id: SpoolId,
    body: Rc<Vec<u8>>,
) {
    let env = envelope(id, body.len() as u64);
    match layout {
        Layout::Sled => p.store(&env, &body).await.unwrap(),
        Layout::FilePlusSled => {
            let f = glommio::io::BufferedFile::create(bodies.join(id.to_string()))
                .await
                .unwrap();
            f.write_at(body.to_vec(), 0).await.unwrap();
            f.fdatasync().await.unwrap();
            f.close().await.unwrap();
            dir.sync().await.unwrap();
            p.store(&env, &[]).await.unwrap();
        }
    }
}

async fn remove_one(layout: Layout, p: &Partition, bodies: &Path, id: SpoolId) {
    p.remove(id).await.unwrap();
    if let Layout::FilePlusSled = layout {
        std::fs::remove_file(bodies.join(id.to_string())).unwrap();
    }
}

fn bench_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("spool_store_50_concurrent");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(CONCURRENCY as u64));

    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 << 10)
        .make()
        .unwrap();

    for body_len in [5 << 10, 100 << 10] {
        for layout in [Layout::Sled, Layout::FilePlusSled] {
            // A fresh spool per case so one case's garbage does not slow the next.
            let tmp = tempfile::tempdir().unwrap();
            let spool = Spool::open(&tmp.path().join("spool")).unwrap();
            let bodies: PathBuf = tmp.path().join("bodies");
            std::fs::create_dir_all(&bodies).unwrap();
            let body = Rc::new(vec![b'x'; body_len]);
            let name = match layout {
                Layout::Sled => "sled",
                Layout::FilePlusSled => "file+sled",
            };
            let p = spool.partition(0).unwrap();
            let dir = Rc::new(ex.run(glommio::io::Directory::open(&bodies)).unwrap());
            let gen = Rc::new(RefCell::new(SpoolIdGenerator::new(0, None)));
            let (flushes0, covered0) = (p.flush_count(), p.flushed_writes());
            let mut stores = 0u64;
            group.bench_with_input(BenchmarkId::new(name, body_len), &body_len, |b, _| {
                b.iter_custom(|iters| {
                    ex.run(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let ids: Vec<SpoolId> = (0..CONCURRENCY)
                                .map(|_| gen.borrow_mut().next(now_ms()))
                                .collect();
                            let start = Instant::now();
                            let tasks: Vec<_> = ids
                                .iter()
                                .map(|&id| {
                                    let (p, bodies, dir, body) =
                                        (p.clone(), bodies.clone(), dir.clone(), body.clone());
                                    glommio::spawn_local(async move {
                                        store_one(layout, &p, &bodies, &dir, id, body).await
                                    })
                                })
                                .collect();
                            for t in tasks {
                                t.await;
                            }
                            total += start.elapsed();
                            stores += CONCURRENCY as u64;
                            // Untimed clean-up keeps the disk footprint bounded.
                            let tasks: Vec<_> = ids
                                .iter()
                                .map(|&id| {
                                    let (p, bodies) = (p.clone(), bodies.clone());
                                    glommio::spawn_local(async move {
                                        remove_one(layout, &p, &bodies, id).await
                                    })
                                })
                                .collect();
                            for t in tasks {
                                t.await;
                            }
                        }
                        total
                    })
                })
            });
            // Removes are group-committed too; report stores and flushes of
            // both, i.e. the batch size the shard saw.
            let flushes = p.flush_count() - flushes0;
            let covered = p.flushed_writes() - covered0;
            eprintln!(
                "{name}/{body_len}: {stores} stores (+ as many removes), {flushes} flushes, \
                 mean batch {:.1} writes/flush, max batch {}",
                covered as f64 / flushes.max(1) as f64,
                p.max_flush_batch()
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
