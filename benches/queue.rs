//! Benchmarks of the embedded store alone (no HTTP): durable pushes per second with 1, 16 and 64 concurrent
//! pushers, group commit against one flush per push, claim+complete per second, bytes on
//! disk per stored job and per interaction entry, the cost of one delivery-outbox claim and of
//! one daily-quota check.
//!
//! Run with `cargo bench --bench queue`. Each figure is one timed run on a fresh store in a
//! temporary directory; compare ratios within one run, not absolute numbers across machines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatq::clock;
use chatq::domain::{JobResult, NewJob};
use chatq::signals::Signals;
use chatq::store::embedded::{SledQueue, record};
use chatq::store::{Backend, Durability, InteractionLog, JobStore, Maintenance, StoreOptions};

fn open(dir: &std::path::Path, durability: Durability) -> Arc<SledQueue> {
    let mut options = StoreOptions::embedded(dir);
    options.durability = durability;
    options.keep_completed = u64::MAX;
    let Backend::Embedded(embedded) = options.backend.clone() else {
        unreachable!("built as embedded")
    };
    let queue = SledQueue::open(
        options,
        &embedded,
        clock::system(),
        Arc::new(Signals::default()),
    );
    Arc::new(queue.expect("open store"))
}

/// A job of about 200 bytes encoded, like a short chat prompt.
fn job(i: usize) -> NewJob {
    let mut new = NewJob::prompt(
        "bench-user-0001",
        &format!("{i:06} what is the capital of France, and why is it there?"),
    );
    new.guild_id = Some("guild-123456".into());
    new
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Acknowledged before any flush (`--durability relaxed`).
    Relaxed,
    GroupCommit,
    /// Each push calls sled's `flush()` itself (from `spawn_blocking`), the obvious design
    /// without a flusher. sled lets concurrent `flush()` calls share an fsync, so this is not
    /// one fsync per push.
    FlushPerPush,
    /// Strictly one fsync per push: push and flush under one lock, so no fsync covers two.
    FsyncPerPush,
}

async fn pushes(pushers: usize, total: usize, mode: Mode) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let durability = match mode {
        Mode::GroupCommit => Durability::Strict,
        Mode::FlushPerPush | Mode::FsyncPerPush | Mode::Relaxed => Durability::Relaxed,
    };
    let queue = open(dir.path(), durability);
    let per = total / pushers;
    let serial = Arc::new(tokio::sync::Mutex::new(()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..pushers)
        .map(|p| {
            let queue = Arc::clone(&queue);
            let serial = Arc::clone(&serial);
            tokio::spawn(async move {
                for i in 0..per {
                    if mode == Mode::FsyncPerPush {
                        let _one_at_a_time = serial.lock().await;
                        queue.push(job(p * per + i)).await.expect("push");
                        let q = Arc::clone(&queue);
                        tokio::task::spawn_blocking(move || q.flush_direct())
                            .await
                            .expect("join")
                            .expect("flush");
                        continue;
                    }
                    queue.push(job(p * per + i)).await.expect("push");
                    if mode == Mode::FlushPerPush {
                        let q = Arc::clone(&queue);
                        tokio::task::spawn_blocking(move || q.flush_direct())
                            .await
                            .expect("join")
                            .expect("flush");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = queue.flush_stats();
    if stats.flushes > 0 {
        eprintln!(
            "  [{pushers} pushers] {} flushes, {:.2} ms each, {:.1} requests per flush, busy {:.0}% of {elapsed:.1}s",
            stats.flushes,
            stats.flush_nanos as f64 / stats.flushes as f64 / 1e6,
            stats.requests as f64 / stats.flushes as f64,
            stats.flush_nanos as f64 / 1e9 / elapsed * 100.0
        );
    }
    ((per * pushers) as f64 / elapsed, stats.flushes)
}

async fn claim_complete(total: usize, workers: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Durability::Strict);
    let fill: Vec<_> = (0..64)
        .map(|p| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                for i in 0..total / 64 {
                    queue.push(job(p * 1000 + i)).await.unwrap();
                }
            })
        })
        .collect();
    for t in fill {
        t.await.unwrap();
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                let mut n = 0usize;
                while let Some(claimed) = queue.claim().await.unwrap() {
                    let result = JobResult {
                        reply: "Paris, because the Seine made it a crossroads.".into(),
                        used_fallback: false,
                        model: "bench".into(),
                        usage: None,
                        processed_at: 0,
                        upstream_latency_ms: Some(1),
                        cached: false,
                    };
                    queue.complete(&claimed.lease, result).await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    done as f64 / started.elapsed().as_secs_f64()
}

async fn bytes_per_record(n: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Durability::Strict);
    let empty = dir_size(dir.path());
    for i in 0..n {
        queue.push(job(i)).await.unwrap();
    }
    queue.sync().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let with_jobs = dir_size(dir.path());
    let per_job = (with_jobs.saturating_sub(empty)) as f64 / n as f64;
    // Complete them all: adds the result to each job and one interaction entry each.
    while let Some(claimed) = queue.claim().await.unwrap() {
        let result = JobResult {
            reply: "Paris, because the Seine made it a crossroads.".into(),
            used_fallback: false,
            model: "gpt-4o-mini".into(),
            usage: None,
            processed_at: 0,
            upstream_latency_ms: Some(120),
            cached: false,
        };
        queue.complete(&claimed.lease, result).await.unwrap();
    }
    queue.sync().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let with_log = dir_size(dir.path());
    let page = queue
        .query(&chatq::domain::LogQuery {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    if let Some(entry) = page.entries.first() {
        let job = queue.get(entry.job_id).await.unwrap().unwrap();
        let stored = record::StoredJob {
            job,
            seq: 1,
            log_pending: false,
            lease: 1,
        };
        println!(
            "encoded sizes: completed job record {} bytes, interaction entry {} bytes",
            record::encode_job(&stored).unwrap().len(),
            record::encode_interaction(entry).unwrap().len()
        );
    }
    // The completed job records grow too; attribute the whole growth to the log as an upper
    // bound, and report the job record growth separately below.
    let per_entry = (with_log.saturating_sub(with_jobs)) as f64 / n as f64;
    (per_job, per_entry)
}

/// One outbox claim (what the deliverer does every 200 ms) with `ended` delivered deliveries
/// kept (retention keeps them a day) and 8 due ones: microseconds per claim, averaged.
async fn outbox_claim(ended: usize) -> f64 {
    use chatq::domain::{Delivery, DeliveryState, Target};
    use chatq::store::Outbox;
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Durability::Relaxed);
    let delivery = |state: DeliveryState| Delivery {
        id: uuid::Uuid::new_v4(),
        job_id: uuid::Uuid::new_v4(),
        target: Target::Webhook {
            url: "https://hooks.example/chatq".into(),
        },
        state,
        attempts: 1,
        sent: 1,
        created_at: 0,
        next_at: 0,
        expires_at: u64::MAX / 2,
        last_error: None,
        fallback: false,
    };
    for _ in 0..ended {
        queue
            .add_delivery(&delivery(DeliveryState::Delivered))
            .await
            .unwrap();
    }
    let rounds = 200;
    let mut spent = Duration::ZERO;
    for _ in 0..rounds {
        for _ in 0..8 {
            queue
                .add_delivery(&delivery(DeliveryState::Pending))
                .await
                .unwrap();
        }
        let started = Instant::now();
        let claimed = queue.claim_deliveries(32, 60_000).await.unwrap();
        spent += started.elapsed();
        assert_eq!(claimed.len(), 8);
        for mut d in claimed {
            d.state = DeliveryState::Delivered;
            queue.save_delivery(&d).await.unwrap();
        }
    }
    spent.as_secs_f64() * 1e6 / f64::from(rounds)
}

/// A daily quota check for a user with `entries` log entries today in the guild: the scan of
/// those entries (what every submit did before) and the kept total (now). Microseconds per
/// check, averaged.
async fn quota_check(entries: usize) -> (f64, f64) {
    use chatq::domain::{GroupBy, Usage, UsageQuery, UsageRow, utc_day_start};
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Durability::Relaxed);
    for i in 0..entries {
        queue.push(job(i)).await.unwrap();
        let claimed = queue.claim().await.unwrap().unwrap();
        let result = JobResult {
            reply: "Paris.".into(),
            used_fallback: false,
            model: "gpt-4o-mini".into(),
            usage: Some(Usage {
                prompt_tokens: 20,
                completion_tokens: 5,
                total_tokens: 25,
            }),
            processed_at: 0,
            upstream_latency_ms: Some(120),
            cached: false,
        };
        queue.complete(&claimed.lease, result).await.unwrap();
    }
    let day = utc_day_start(clock::system().now_ms());
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        let rows = queue
            .usage(&UsageQuery {
                guild_id: Some("guild-123456".into()),
                user_id: Some("bench-user-0001".into()),
                since: Some(day),
                until: None,
                group_by: GroupBy::User,
            })
            .await
            .unwrap();
        assert_eq!(
            rows.iter().map(UsageRow::tokens).sum::<u64>(),
            25 * entries as u64
        );
    }
    let scan = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    // The day's first check scans once; the bench times the checks after it.
    queue
        .tokens_spent("guild-123456", "bench-user-0001", day)
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..rounds {
        let spent = queue
            .tokens_spent("guild-123456", "bench-user-0001", day)
            .await
            .unwrap();
        assert_eq!(spent, 25 * entries as u64);
    }
    let kept = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    (scan, kept)
}

fn dir_size(path: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if meta.is_dir() {
                total += dir_size(&entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

fn main() {
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    runtime.block_on(async {
        println!("| benchmark | pushers | jobs/s | fsyncs |");
        println!("|---|---:|---:|---:|");
        for (pushers, total) in [(1, 3_000), (16, 30_000), (64, 100_000)] {
            if wanted("push") {
                let (rate, flushes) = pushes(pushers, total, Mode::GroupCommit).await;
                println!("| durable push, group commit | {pushers} | {rate:.0} | {flushes} |");
                let (rate, _) = pushes(pushers, total.min(20_000), Mode::FlushPerPush).await;
                println!("| durable push, one flush per push | {pushers} | {rate:.0} | {} |", total.min(20_000));
                let (rate, _) = pushes(pushers, total.min(10_000), Mode::FsyncPerPush).await;
                println!("| durable push, strictly one fsync per push | {pushers} | {rate:.0} | {} |", total.min(10_000));
                let (rate, _) = pushes(pushers, total, Mode::Relaxed).await;
                println!("| push, relaxed (no flush wait) | {pushers} | {rate:.0} | - |");
            }
        }
        if wanted("claim") {
            for workers in [1, 5, 64] {
                let rate = claim_complete(50_000, workers).await;
                println!("| claim + durable complete | {workers} workers | {rate:.0} | - |");
            }
        }
        if wanted("outbox") {
            println!();
            println!("| outbox claim (8 due) | ended deliveries kept | µs per claim |");
            println!("|---|---:|---:|");
            for ended in [0, 10_000, 100_000] {
                let micros = outbox_claim(ended).await;
                println!("| outbox claim | {ended} | {micros:.0} |");
            }
        }
        if wanted("quota") {
            println!();
            println!("| quota check | entries today | scan µs | kept µs |");
            println!("|---|---:|---:|---:|");
            for entries in [100, 1_000, 10_000] {
                let (scan, kept) = quota_check(entries).await;
                println!("| quota check | {entries} | {scan:.1} | {kept:.2} |");
            }
        }
        if wanted("bytes") {
            let (per_job, per_entry) = bytes_per_record(20_000).await;
            println!();
            println!("bytes on disk per queued job: {per_job:.0}");
            println!("bytes on disk added by completing a job (result + interaction entry + indexes): {per_entry:.0}");
        }
    });
}
