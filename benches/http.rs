//! End-to-end benchmarks of the real binary (issues 5 and 7).
//!
//! `cargo bench --bench http` starts `chatq serve` (the release binary) against a fast mock
//! OpenAI-compatible upstream on loopback, drives it with a concurrent HTTP load generator in
//! this process (so the figures include the generator's CPU on the same 2 cores), and prints
//! a table. Pass a word to run only the benchmarks whose name contains it
//! (`cargo bench --bench http -- accept`).

use std::net::SocketAddr;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

#[path = "../tests/api/binary.rs"]
mod binary;

use binary::{get_json, proc_status_kib};

// ---------------------------------------------------------------- the mock upstream

#[derive(Default)]
struct Mock {
    /// When the current streamed answer wrote its first chunk.
    first_chunk_at: Mutex<Option<Instant>>,
}

async fn upstream(State(mock): State<Arc<Mock>>, Json(body): Json<Value>) -> Response {
    if body["stream"] != true {
        return Json(json!({
            "id": "x", "object": "chat.completion", "created": 0, "model": "bench",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
        }))
        .into_response();
    }
    let frame = |content: &str| {
        let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "bench",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
        format!("data: {chunk}\n\n")
    };
    let pieces = vec![
        frame("Par"),
        frame("is"),
        frame("."),
        "data: [DONE]\n\n".to_owned(),
    ];
    let stream =
        futures_util::stream::unfold((0usize, pieces, mock), |(i, pieces, mock)| async move {
            let piece = pieces.get(i)?.clone();
            if i == 0 {
                *mock.first_chunk_at.lock().unwrap() = Some(Instant::now());
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Some((Ok::<_, std::io::Error>(piece), (i + 1, pieces, mock)))
        });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(stream))
        .unwrap()
}

async fn start_mock() -> (SocketAddr, Arc<Mock>) {
    let mock = Arc::new(Mock::default());
    let router = axum::Router::new()
        .route("/v1/chat/completions", post(upstream))
        .with_state(Arc::clone(&mock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // MOCK_NODELAY=1 sets TCP_NODELAY on the mock's connections; see BENCHMARKS.md for why
    // that matters to the streaming figure.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(std::env::var("MOCK_NODELAY").is_ok());
    });
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (addr, mock)
}

// ---------------------------------------------------------------- chatq as a process

struct Chatq {
    child: Child,
    base: String,
    _dir: Option<tempfile::TempDir>,
}

impl Chatq {
    fn start(data: &std::path::Path, upstream: Option<SocketAddr>, args: &[&str]) -> Self {
        let mut flags = vec!["--rate-limit", "1000000", "--keep-completed", "10000000"];
        flags.extend_from_slice(args);
        let env: Vec<(&str, String)> = match upstream {
            Some(addr) => vec![
                ("OPENAI_API_KEY", "bench-key".to_owned()),
                ("OPENAI_BASE_URL", format!("http://{addr}/v1")),
            ],
            None => Vec::new(),
        };
        let (child, base) = binary::start_chatq_with_env(data, &flags, &env);
        Self {
            child,
            base,
            _dir: None,
        }
    }

    fn fresh(upstream: Option<SocketAddr>, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut chatq = Self::start(&dir.path().join("db"), upstream, args);
        chatq._dir = Some(dir);
        chatq
    }

    /// Peak resident memory of the chatq process, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        proc_status_mib(&self.child.id().to_string(), "VmHWM:")
    }
}

impl Drop for Chatq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// A row with the p50 and p99 of `samples` (sorted here).
fn latency_row(name: &str, value: &str, samples: &mut [Duration]) {
    samples.sort();
    row(
        name,
        value.to_owned(),
        Some(percentile(samples, 0.5)),
        Some(percentile(samples, 0.99)),
    );
}

fn row(name: &str, value: String, p50: Option<f64>, p99: Option<f64>) {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2} ms"));
    println!("| {name} | {value} | {} | {} |", ms(p50), ms(p99));
}

// ---------------------------------------------------------------- benchmarks

async fn accept(durability: &str) {
    let chatq = Chatq::fresh(None, &["--durability", durability, "--workers", "1"]);
    let http = client();
    // Paused, so this measures accepting alone, not the workers competing for the CPU.
    http.post(format!("{}/v1/queue/pause", chatq.base))
        .send()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_secs(5);
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|c| {
            let (http, base, stop, count) = (http.clone(), chatq.base.clone(), stop.clone(), count.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(8192);
                let body = json!({"user_id": format!("user-{c}"), "prompt": "What is the capital of France?"});
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = http.post(format!("{base}/v1/chat/jobs")).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 202);
                    let _ = r.bytes().await;
                    latencies.push(t.elapsed());
                    count.fetch_add(1, Ordering::Relaxed);
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(run_for).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    row(
        &format!("accepted jobs/s, 64 connections, {durability}"),
        format!("{:.0}", count.load(Ordering::Relaxed) as f64 / elapsed),
        Some(percentile(&all, 0.5)),
        Some(percentile(&all, 0.99)),
    );
    row(
        &format!("peak RSS of chatq during the {durability} accept run"),
        format!("{:.1} MiB", chatq.peak_rss_mib()),
        None,
        None,
    );
}

async fn drain(upstream: SocketAddr, workers: usize) {
    let n = 20_000usize;
    let workers_arg = workers.to_string();
    let chatq = Chatq::fresh(Some(upstream), &["--workers", &workers_arg]);
    let http = client();
    http.post(format!("{}/v1/queue/pause", chatq.base))
        .send()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|c| {
            let (http, base) = (http.clone(), chatq.base.clone());
            tokio::spawn(async move {
                let body = json!({"user_id": format!("user-{c}"), "prompt": "What is the capital of France?"});
                for _ in 0..n / 64 {
                    let r = http.post(format!("{base}/v1/chat/jobs")).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 202);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let total = (n / 64 * 64) as u64;
    let started = Instant::now();
    http.post(format!("{}/v1/queue/resume", chatq.base))
        .send()
        .await
        .unwrap();
    loop {
        let stats = get_json(&http, &format!("{}/v1/queue/stats", chatq.base)).await;
        if stats["completed"].as_u64().unwrap_or(0) + stats["failed"].as_u64().unwrap_or(0) >= total
        {
            assert_eq!(stats["failed"], 0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    row(
        &format!("drained jobs/s end to end, {workers} workers, zero-latency upstream"),
        format!("{:.0}", total as f64 / started.elapsed().as_secs_f64()),
        None,
        None,
    );
}

async fn round_trips(upstream: SocketAddr, mock: &Mock) {
    let chatq = Chatq::fresh(Some(upstream), &[]);
    let http = client();
    let n = 2_000;
    let body = json!({"user_id": "rt", "prompt": "What is the capital of France?"});
    let completion = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "user": "rt"});
    let mut direct = Vec::with_capacity(n);
    let mut jobs = Vec::with_capacity(n);
    let mut completions = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t = Instant::now();
        let r = http
            .post(format!("http://{upstream}/v1/chat/completions"))
            .json(&completion)
            .send()
            .await
            .unwrap();
        let _ = r.bytes().await;
        let d = t.elapsed();
        let t = Instant::now();
        let r: Value = http
            .post(format!("{}/v1/chat/jobs", chatq.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["id"].as_str().unwrap().to_owned();
        let job = get_json(&http, &format!("{}/v1/chat/jobs/{id}?wait=10", chatq.base)).await;
        assert_eq!(job["status"], "completed");
        let j = t.elapsed();
        let t = Instant::now();
        let r = http
            .post(format!("{}/v1/chat/completions", chatq.base))
            .json(&completion)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
        let c = t.elapsed();
        if i >= 100 {
            // The first 100 warm up connections and caches.
            direct.push(d);
            jobs.push(j);
            completions.push(c);
        }
    }
    latency_row(
        "direct call to the mock upstream (baseline)",
        &format!("{n} calls"),
        &mut direct,
    );
    latency_row(
        "submit-and-wait round trip (POST job + GET ?wait)",
        &format!("{n} jobs"),
        &mut jobs,
    );
    latency_row(
        "non-streamed /v1/chat/completions round trip",
        &format!("{n} calls"),
        &mut completions,
    );
    row(
        "overhead chatq adds to a non-streamed call (p50 difference)",
        format!(
            "{:.2} ms",
            percentile(&completions, 0.5) - percentile(&direct, 0.5)
        ),
        None,
        None,
    );

    // Baseline: time to the first content chunk streaming straight from the mock.
    let mut direct_first = Vec::with_capacity(500);
    for i in 0..600 {
        let t = Instant::now();
        let body = json!({"messages": [{"role": "user", "content": "capital of France?"}], "stream": true});
        let at = first_delta_at(
            &http,
            &format!("http://{upstream}/v1/chat/completions"),
            &body,
        )
        .await;
        if i >= 100 {
            direct_first.push(at.duration_since(t));
        }
    }
    latency_row(
        "streaming straight from the mock: request → first chunk (baseline)",
        "500 streams",
        &mut direct_first,
    );
    let mut first_chunk = Vec::with_capacity(500);
    for i in 0..600 {
        *mock.first_chunk_at.lock().unwrap() = None;
        let body = json!({"messages": [{"role": "user", "content": "capital of France?"}], "user": "st", "stream": true});
        let at = first_delta_at(&http, &format!("{}/v1/chat/completions", chatq.base), &body).await;
        let upstream_first = mock
            .first_chunk_at
            .lock()
            .unwrap()
            .expect("the mock streamed");
        if i >= 100 {
            first_chunk.push(at.duration_since(upstream_first));
        }
    }
    latency_row(
        "streaming: upstream's first chunk → client's first chunk",
        "500 streams",
        &mut first_chunk,
    );
}

/// Streams `body` to `url`, reads the whole answer, and returns when the first delta came.
async fn first_delta_at(http: &reqwest::Client, url: &str, body: &Value) -> Instant {
    use futures_util::StreamExt;
    let r = http.post(url).json(body).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut seen = String::new();
    let mut at = None;
    while let Some(bytes) = stream.next().await {
        seen.push_str(&String::from_utf8_lossy(&bytes.unwrap()));
        if at.is_none() && seen.contains("\"content\":\"Par\"") {
            at = Some(Instant::now());
        }
    }
    at.expect("saw the first delta")
}

async fn time_to_ready() {
    use chatq::store::{Durability, JobQueue, NewJob, SledQueue, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("db");
    {
        let mut options = StoreOptions::new(&data);
        options.durability = Durability::Relaxed;
        let queue = Arc::new(SledQueue::open(options, chatq::clock::system()).unwrap());
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move {
                    for i in 0..12_500 {
                        let mut job = NewJob::prompt(
                            &format!("user-{t}"),
                            &format!("{i} What is the capital of France?"),
                        );
                        job.guild_id = Some("guild-1".into());
                        queue.push(job).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        queue.sync().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // let sled close its files
    let http = client();
    let started = Instant::now();
    let chatq = Chatq::start(&data, None, &["--workers", "1"]);
    loop {
        if let Ok(r) = http.get(format!("{}/readyz", chatq.base)).send().await {
            if r.status() == 200 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ready = started.elapsed();
    let stats = get_json(&http, &format!("{}/v1/queue/stats", chatq.base)).await;
    let queued = stats["waiting"].as_u64().unwrap()
        + stats["active"].as_u64().unwrap()
        + stats["completed"].as_u64().unwrap();
    assert!(queued >= 100_000, "{stats}");
    row(
        "start-up to ready with 100,000 queued jobs",
        format!("{:.0} ms", ready.as_secs_f64() * 1000.0),
        None,
        None,
    );
}

fn validations() {
    let v = chatq::validate::Validator::new();
    let content = "Hello there, I have a question about the weekend plans. ".repeat(18);
    let message = json!({"role": "user", "content": &content[..1000]});
    let n = 500_000;
    let started = Instant::now();
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(v.message(std::hint::black_box(&message)).is_ok());
    }
    assert_eq!(ok, n);
    row(
        "validations/s of 1 kB messages, one core",
        format!("{:.0}", n as f64 / started.elapsed().as_secs_f64()),
        None,
        None,
    );
    // With a `:` and a `<` in the text the pattern set has to run (no fast path).
    let content = "Note: meet at 10:30, bring snacks < 5 EUR each. ".repeat(25);
    let message = json!({"role": "user", "content": &content[..1000]});
    let started = Instant::now();
    for _ in 0..n {
        ok += usize::from(v.message(std::hint::black_box(&message)).is_ok());
    }
    assert_eq!(ok, 2 * n);
    row(
        "validations/s of 1 kB messages containing `:` and `<`, one core",
        format!("{:.0}", n as f64 / started.elapsed().as_secs_f64()),
        None,
        None,
    );
}

fn limiter_checks() {
    let limiter = chatq::limiter::UserLimiter::new(
        std::num::NonZeroU32::new(10).unwrap(),
        Duration::from_secs(60),
    );
    let users: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    let n = 2_000_000;
    let started = Instant::now();
    let mut allowed = 0u64;
    for i in 0..n {
        allowed += u64::from(limiter.check(&users[i % users.len()]).allowed);
    }
    std::hint::black_box(allowed);
    row(
        "rate-limit checks/s, 10,000 users, one core",
        format!("{:.0}", n as f64 / started.elapsed().as_secs_f64()),
        None,
        None,
    );
}

/// A memory figure (`VmRSS:`, `VmHWM:`) of process `pid` (or `self`) in MiB; 0 if unreadable.
fn proc_status_mib(pid: &str, field: &str) -> f64 {
    proc_status_kib(pid, field) as f64 / 1024.0
}

fn rss_mib() -> f64 {
    proc_status_mib("self", "VmRSS:")
}

/// Memory of the limiter's key map with a million distinct users, and after pruning.
fn limiter_memory() {
    let limiter = chatq::limiter::UserLimiter::new(
        std::num::NonZeroU32::new(10).unwrap(),
        Duration::from_secs(1),
    );
    let before = rss_mib();
    for i in 0..1_000_000 {
        limiter.check(&format!("user-{i:07}"));
    }
    let full = rss_mib();
    std::thread::sleep(Duration::from_millis(1_100));
    let left = limiter.prune();
    let pruned = rss_mib();
    row(
        "limiter memory: 1,000,000 distinct users (process RSS growth)",
        format!("{:.0} MiB", full - before),
        None,
        None,
    );
    row(
        "limiter after pruning idle keys (keys left, RSS above start)",
        format!("{left} keys, {:.0} MiB", pruned - before),
        None,
        None,
    );
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("| benchmark | value | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    runtime.block_on(async {
        let (upstream, mock) = start_mock().await;
        if wanted("accept") {
            accept("strict").await;
            accept("relaxed").await;
        }
        if wanted("drain") {
            drain(upstream, 5).await;
            drain(upstream, 64).await;
        }
        if wanted("roundtrip") {
            round_trips(upstream, &mock).await;
        }
        if wanted("ready") {
            time_to_ready().await;
        }
    });
    if wanted("validate") {
        validations();
    }
    if wanted("limiter") {
        limiter_checks();
        limiter_memory();
    }
}
