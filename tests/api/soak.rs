//! Soak: the real binary under steady load (submitters → queue → 8 workers answering with
//! fallback replies), its memory and its data directory sampled every second.
//!
//! Short form (CI, 20 s): retention holds at the end (at most `--keep-completed` completed
//! records, at most `--log-max-entries` interactions) and the samples are printed.
//! Long form, on demand, also asserts that RSS and disk stay flat once warm (the last quarter's
//! median within 25% of the second quarter's):
//! `CHATQ_SOAK_SECS=1800 cargo test --release --test api soak -- --nocapture`

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::binary::{get_json, proc_status_kib, start_chatq_with_env};
use crate::helpers::wait_until_drained;

const KEEP_COMPLETED: u64 = 50;
const LOG_MAX: u64 = 2_000;

/// Bytes allocated to the files under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() {
            disk_usage(&entry.path())
        } else {
            meta.blocks() * 512
        };
    }
    total
}

struct Sample {
    at: Duration,
    rss: u64,
    disk: u64,
    accepted: u64,
}

fn peak(samples: &[Sample], f: impl Fn(&Sample) -> u64) -> u64 {
    samples.iter().map(f).max().unwrap_or(0)
}

fn median(samples: &[Sample], f: impl Fn(&Sample) -> u64) -> u64 {
    let mut values: Vec<u64> = samples.iter().map(f).collect();
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_disk_stay_bounded_under_steady_load() {
    let secs = std::env::var("CHATQ_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("db");
    let keep = KEEP_COMPLETED.to_string();
    let log_max = LOG_MAX.to_string();
    let args = [
        "--rate-limit",
        "1000000",
        "--workers",
        "8",
        "--keep-completed",
        &keep,
        "--log-max-entries",
        &log_max,
    ];
    let (mut child, base) = start_chatq_with_env(&data, &args, &[]);
    let pid = child.id();
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let submitters: Vec<_> = (0..8)
        .map(|s| {
            let (http, base, stop, accepted) =
                (http.clone(), base.clone(), stop.clone(), accepted.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = json!({
                        "user_id": format!("soak-{s}-{}", n % 500),
                        "guild_id": format!("guild-{}", n % 7),
                        "prompt": format!("message {n}: how is everyone doing today?"),
                    });
                    let r = http
                        .post(format!("{base}/v1/chat/jobs"))
                        .json(&body)
                        .send()
                        .await
                        .expect("chatq answers under load");
                    assert_eq!(r.status(), 202, "{:?}", r.text().await);
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(Sample {
            at: started.elapsed(),
            rss: proc_status_kib(&pid.to_string(), "VmRSS:") * 1024,
            disk: disk_usage(&data),
            accepted: accepted.load(Ordering::Relaxed),
        });
    }
    stop.store(true, Ordering::Relaxed);
    for s in submitters {
        s.await.unwrap();
    }
    wait_until_drained(&http, &base, 120).await;
    // One retention pass runs every second.
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let step = (samples.len() / 10).max(1);
    println!("soak: {secs} s, {} jobs", accepted.load(Ordering::Relaxed));
    println!("  time     jobs   RSS MiB   disk MiB");
    for s in samples.iter().step_by(step) {
        println!(
            "  {:>4.0} s {:>8} {:>9.1} {:>10.1}",
            s.at.as_secs_f64(),
            s.accepted,
            mib(s.rss),
            mib(s.disk)
        );
    }

    let stats = get_json(&http, &format!("{base}/v1/queue/stats")).await;
    assert!(
        stats["completed"].as_u64().unwrap() <= KEEP_COMPLETED,
        "completed records pruned to --keep-completed: {stats}"
    );
    let mut logged = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/interactions?limit=500");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = get_json(&http, &url).await;
        logged += page["data"].as_array().unwrap().len() as u64;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert!(
        logged <= LOG_MAX,
        "interactions pruned to --log-max-entries: {logged}"
    );
    assert!(
        accepted.load(Ordering::Relaxed) > LOG_MAX,
        "the load outgrew retention"
    );

    if secs >= 120 {
        let quarter = samples.len() / 4;
        let second = &samples[quarter..2 * quarter];
        let last = &samples[3 * quarter..];
        for (what, f) in [
            ("RSS", (|s: &Sample| s.rss) as fn(&Sample) -> u64),
            ("disk", |s: &Sample| s.disk),
        ] {
            let (warm, end) = (median(second, f), median(last, f));
            println!(
                "  {what}: median {:.1} MiB in the second quarter, {:.1} MiB in the last (peaks {:.1}, {:.1})",
                mib(warm),
                mib(end),
                mib(peak(second, f)),
                mib(peak(last, f))
            );
            // Medians: sled's file breathes by several MiB from one second to the next as it
            // reclaims segments, so single peaks say little about a trend.
            assert!(
                end as f64 <= warm as f64 * 1.25,
                "{what} grew: median {:.1} MiB → {:.1} MiB",
                mib(warm),
                mib(end)
            );
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
