//! End-to-end benchmarks of the real binary (issues 5 and 7).
//!
//! `cargo bench --bench http` starts `chatq serve` (the release binary) against a fast mock
//! OpenAI-compatible upstream on loopback, drives it with a concurrent HTTP load generator in
//! this process (so the figures include the generator's CPU on the same 2 cores), and prints
//! a table. The throughput and latency runs use a lean keep-alive HTTP/1.1 generator
//! (`RawConnection`, pre-encoded requests) so that most of the shared CPU goes to chatq, and
//! report chatq's own CPU time per job, which moves far less than throughput on a shared
//! machine. Pass a word to run only the benchmarks whose name contains it
//! (`cargo bench --bench http -- accept`).

use std::net::SocketAddr;

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
    /// Killed when dropped.
    child: binary::Running,
    base: String,
    _dir: Option<tempfile::TempDir>,
}

impl Chatq {
    fn start(data: &std::path::Path, upstream: Option<SocketAddr>, args: &[&str]) -> Self {
        let mut flags = vec!["--rate-limit", "1000000", "--keep-completed", "10000000"];
        flags.extend_from_slice(args);
        // chatq's default log level (info), as it runs for its users; CHATQ_BENCH_LOG picks
        // another (`RUST_LOG` syntax). `chatq::app` stays at info: its "listening on" line
        // is how the bench learns the port.
        let log = std::env::var("CHATQ_BENCH_LOG").map_or_else(
            |_| String::new(),
            |filter| format!("{filter},chatq::app=info"),
        );
        let mut env = vec![("RUST_LOG", log)];
        if let Some(addr) = upstream {
            env.push(("OPENAI_API_KEY", "bench-key".to_owned()));
            env.push(("OPENAI_BASE_URL", format!("http://{addr}/v1")));
        }
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

/// CPU time (user + system) process `pid` has used so far, read from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the first; utime and
    // stime are the 12th and 13th, in clock ticks (USER_HZ, 100 on Linux).
    let after_name = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// CPU time all PostgreSQL server processes on this machine have used so far.
fn postgres_cpu_time() -> Duration {
    let mut total = Duration::ZERO;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains("(postgres)") {
            total += cpu_time(pid);
        }
    }
    total
}

/// A fresh database on the server `CHATQ_BENCH_DATABASE_URL` (or `CHATQ_TEST_DATABASE_URL`)
/// names, for one PostgreSQL run.
async fn bench_database() -> Option<String> {
    let admin = std::env::var("CHATQ_BENCH_DATABASE_URL")
        .or_else(|_| std::env::var("CHATQ_TEST_DATABASE_URL"))
        .ok()?;
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("the bench database server answers");
    tokio::spawn(connection);
    let name = format!("chatq_bench_{}", std::process::id());
    // Two statements: a multi-statement string runs as one transaction, and neither may.
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        client.batch_execute(&sql).await.unwrap();
    }
    let mut url = reqwest::Url::parse(&admin).unwrap();
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}

/// Accept and drain on PostgreSQL with one and three replicas.
async fn postgres(upstream: SocketAddr) {
    for replicas in [1, 3] {
        let Some(url) = bench_database().await else {
            println!("| PostgreSQL runs skipped: CHATQ_BENCH_DATABASE_URL is unset | | | |");
            return;
        };
        pg_accept(&url, replicas).await;
        let url = bench_database().await.unwrap_or(url);
        pg_drain(&url, upstream, replicas).await;
    }
}

fn pg_replicas(
    url: &str,
    upstream: Option<SocketAddr>,
    replicas: usize,
    workers: usize,
) -> Vec<Chatq> {
    let workers = workers.to_string();
    (0..replicas)
        .map(|_| Chatq::fresh(upstream, &["--database-url", url, "--workers", &workers]))
        .collect()
}

async fn pg_accept(url: &str, replicas: usize) {
    let chatqs = pg_replicas(url, None, replicas, 1);
    let http = client();
    http.post(format!("{}/v1/queue/pause", chatqs[0].base))
        .send()
        .await
        .unwrap();
    let pids: Vec<u32> = chatqs.iter().map(|c| c.child.id()).collect();
    let cpu_before: Duration = pids.iter().map(|p| cpu_time(*p)).sum();
    let pg_before = postgres_cpu_time();
    let started = Instant::now();
    let bases: Vec<String> = chatqs.iter().map(|c| c.base.clone()).collect();
    let (accepted, all) = accept_load(&bases, Duration::from_secs(5)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu: Duration = pids.iter().map(|p| cpu_time(*p)).sum::<Duration>() - cpu_before;
    let pg = postgres_cpu_time() - pg_before;
    let accepted = accepted.max(1);
    row(
        &format!("PostgreSQL: accepted jobs/s, 64 connections, {replicas} replica(s), strict"),
        format!("{:.0}", accepted as f64 / elapsed),
        Some(percentile(&all, 0.5)),
        Some(percentile(&all, 0.99)),
    );
    row(
        &format!("PostgreSQL: CPU per accepted job, chatq / postgres, {replicas} replica(s)"),
        format!(
            "{:.0} / {:.0} µs",
            cpu.as_secs_f64() * 1e6 / accepted as f64,
            pg.as_secs_f64() * 1e6 / accepted as f64
        ),
        None,
        None,
    );
}

async fn pg_drain(url: &str, upstream: SocketAddr, replicas: usize) {
    let n = 20_000usize;
    // 64 workers in all, spread over the replicas.
    let chatqs = pg_replicas(url, Some(upstream), replicas, 64 / replicas);
    let http = client();
    http.post(format!("{}/v1/queue/pause", chatqs[0].base))
        .send()
        .await
        .unwrap();
    let bases: Vec<String> = chatqs.iter().map(|c| c.base.clone()).collect();
    let total = fill(&bases, n).await;
    let pids: Vec<u32> = chatqs.iter().map(|c| c.child.id()).collect();
    let cpu_before: Duration = pids.iter().map(|p| cpu_time(*p)).sum();
    let pg_before = postgres_cpu_time();
    let started = Instant::now();
    http.post(format!("{}/v1/queue/resume", chatqs[0].base))
        .send()
        .await
        .unwrap();
    // The replicas' counts may be a second old (they are cached): ask the database itself.
    let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    loop {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'completed'),
                        count(*) FILTER (WHERE state = 'failed') FROM chatq_jobs",
                &[],
            )
            .await
            .unwrap();
        let (completed, failed): (i64, i64) = (row.get(0), row.get(1));
        if (completed + failed) as u64 >= total {
            assert_eq!(failed, 0);
            break;
        }
        // Counting is a scan of the table: not too often.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu: Duration = pids.iter().map(|p| cpu_time(*p)).sum::<Duration>() - cpu_before;
    let pg = postgres_cpu_time() - pg_before;
    row(
        &format!("PostgreSQL: drained jobs/s, 64 workers, {replicas} replica(s)"),
        format!("{:.0}", total as f64 / elapsed),
        None,
        None,
    );
    row(
        &format!("PostgreSQL: CPU per drained job, chatq / postgres, {replicas} replica(s)"),
        format!(
            "{:.0} / {:.0} µs",
            cpu.as_secs_f64() * 1e6 / total as f64,
            pg.as_secs_f64() * 1e6 / total as f64
        ),
        None,
        None,
    );
}

// ---------------------------------------------------------------- a lean load generator

/// One keep-alive HTTP/1.1 connection that writes a pre-encoded request and reads the whole
/// answer. It costs the generator a few microseconds per request where a full client
/// (reqwest) costs several times more, and the generator shares the 2 cores with chatq.
struct RawConnection {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawConnection {
    async fn open(base: &str) -> Self {
        let stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
            .await
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends `request` and returns the answer's status and body.
    async fn send(&mut self, request: &[u8]) -> (u16, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(request).await.unwrap();
        loop {
            if let Some((status, head, total)) = parse_head(&self.buf)
                && self.buf.len() >= total
            {
                let body = self.buf[head..total].to_vec();
                self.buf.drain(..total);
                return (status, body);
            }
            let n = self.stream.read_buf(&mut self.buf).await.unwrap();
            assert!(n > 0, "the server closed the connection");
        }
    }
}

/// For a complete response head at the start of `buf`: the status, the head's length and the
/// response's total length (every answer measured here carries a `Content-Length`).
fn parse_head(buf: &[u8]) -> Option<(u16, usize, usize)> {
    let head_len = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_len]).expect("an ASCII response head");
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .expect("a Content-Length header");
    Some((status, head_len, head_len + length))
}

/// `method path` with `body` (JSON) as HTTP/1.1 bytes for `RawConnection::send`.
fn raw_request(method: &str, base: &str, path: &str, body: Option<&Value>) -> Vec<u8> {
    let host = base.trim_start_matches("http://");
    match body {
        Some(body) => {
            let body = body.to_string();
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }
        None => format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    }
    .into_bytes()
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

/// 64 keep-alive connections spread over `bases` submit for `run_for`; returns how many
/// jobs were accepted and every latency, sorted.
async fn accept_load(bases: &[String], run_for: Duration) -> (u64, Vec<Duration>) {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|c| {
            let base = bases[c % bases.len()].clone();
            let (stop, count) = (stop.clone(), count.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(8192);
                let body = json!({"user_id": format!("user-{c}"), "prompt": "What is the capital of France?"});
                let request = raw_request("POST", &base, "/v1/chat/jobs", Some(&body));
                let mut connection = RawConnection::open(&base).await;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let (status, _) = connection.send(&request).await;
                    assert_eq!(status, 202);
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
    all.sort();
    (count.load(Ordering::Relaxed), all)
}

/// Submits `n` jobs (rounded down to a multiple of 64) over 64 connections spread over
/// `bases`; returns how many.
async fn fill(bases: &[String], n: usize) -> u64 {
    let tasks: Vec<_> = (0..64)
        .map(|c| {
            let base = bases[c % bases.len()].clone();
            tokio::spawn(async move {
                let body = json!({"user_id": format!("user-{c}"), "prompt": "What is the capital of France?"});
                let request = raw_request("POST", &base, "/v1/chat/jobs", Some(&body));
                let mut connection = RawConnection::open(&base).await;
                for _ in 0..n / 64 {
                    assert_eq!(connection.send(&request).await.0, 202);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (n / 64 * 64) as u64
}

async fn accept(durability: &str) {
    let chatq = Chatq::fresh(None, &["--durability", durability, "--workers", "1"]);
    let http = client();
    // Paused, so this measures accepting alone, not the workers competing for the CPU.
    http.post(format!("{}/v1/queue/pause", chatq.base))
        .send()
        .await
        .unwrap();
    let run_for = Duration::from_secs(5);
    let pid = chatq.child.id();
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let (accepted, all) = accept_load(std::slice::from_ref(&chatq.base), run_for).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time(pid) - cpu_before;
    row(
        &format!("accepted jobs/s, 64 connections, {durability}"),
        format!("{:.0}", accepted as f64 / elapsed),
        Some(percentile(&all, 0.5)),
        Some(percentile(&all, 0.99)),
    );
    row(
        &format!("chatq's CPU per accepted job, {durability}"),
        format!("{:.0} µs", cpu.as_secs_f64() * 1e6 / accepted.max(1) as f64),
        None,
        None,
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
    let total = fill(std::slice::from_ref(&chatq.base), n).await;
    let pid = chatq.child.id();
    let cpu_before = cpu_time(pid);
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
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time(pid) - cpu_before;
    row(
        &format!("drained jobs/s end to end, {workers} workers, zero-latency upstream"),
        format!("{:.0}", total as f64 / elapsed),
        None,
        None,
    );
    row(
        &format!("chatq's CPU per drained job, {workers} workers"),
        format!("{:.0} µs", cpu.as_secs_f64() * 1e6 / total as f64),
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
    let mock_base = format!("http://{upstream}");
    let mut to_mock = RawConnection::open(&mock_base).await;
    let mut to_chatq = RawConnection::open(&chatq.base).await;
    let direct_call = raw_request(
        "POST",
        &mock_base,
        "/v1/chat/completions",
        Some(&completion),
    );
    let submit = raw_request("POST", &chatq.base, "/v1/chat/jobs", Some(&body));
    let relayed_call = raw_request(
        "POST",
        &chatq.base,
        "/v1/chat/completions",
        Some(&completion),
    );
    for i in 0..n + 100 {
        let t = Instant::now();
        assert_eq!(to_mock.send(&direct_call).await.0, 200);
        let d = t.elapsed();
        let t = Instant::now();
        let (status, answer) = to_chatq.send(&submit).await;
        assert_eq!(status, 202);
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        let id = answer["id"].as_str().unwrap();
        let wait = raw_request(
            "GET",
            &chatq.base,
            &format!("/v1/chat/jobs/{id}?wait=10"),
            None,
        );
        let (status, job) = to_chatq.send(&wait).await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_slice::<Value>(&job).unwrap()["status"],
            "completed"
        );
        let j = t.elapsed();
        let t = Instant::now();
        assert_eq!(to_chatq.send(&relayed_call).await.0, 200);
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

/// Submit-and-wait round trips with the response cache on: a miss (a prompt never asked
/// before: queue, worker, upstream) and a hit (the same prompt again: answered at the front
/// door), alternating in one run. The mock answers at once, so a miss here costs only
/// chatq's own path; a real upstream adds its whole latency to every miss and none to a hit.
async fn cache_round_trips(upstream: SocketAddr) {
    let chatq = Chatq::fresh(
        Some(upstream),
        &["--cache-ttl-secs", "3600", "--cache-max-entries", "100000"],
    );
    let n = 2_000;
    let mut conn = RawConnection::open(&chatq.base).await;
    let mut round_trip = async |prompt: String, expected: &str| -> Duration {
        let body = json!({"user_id": "rt", "guild_id": "g", "prompt": prompt});
        let submit = raw_request("POST", &chatq.base, "/v1/chat/jobs", Some(&body));
        let t = Instant::now();
        let (status, answer) = conn.send(&submit).await;
        assert_eq!(status, 202);
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["status"], expected, "{answer}");
        let id = answer["id"].as_str().unwrap();
        let wait = raw_request(
            "GET",
            &chatq.base,
            &format!("/v1/chat/jobs/{id}?wait=10"),
            None,
        );
        let (status, job) = conn.send(&wait).await;
        assert_eq!(status, 200);
        let job: Value = serde_json::from_slice(&job).unwrap();
        assert_eq!(job["result"]["cached"], expected == "completed", "{job}");
        t.elapsed()
    };
    let repeated = "What is the capital of France?".to_owned();
    round_trip(repeated.clone(), "queued").await;
    let (mut misses, mut hits) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + 100 {
        let miss = round_trip(format!("What is the capital of country {i}?"), "queued").await;
        let hit = round_trip(repeated.clone(), "completed").await;
        if i >= 100 {
            misses.push(miss);
            hits.push(hit);
        }
    }
    latency_row(
        "cache miss: submit-and-wait round trip (new prompt, upstream called)",
        &format!("{n} jobs"),
        &mut misses,
    );
    latency_row(
        "cache hit: submit-and-wait round trip (same prompt, no worker, no upstream)",
        &format!("{n} jobs"),
        &mut hits,
    );
    row(
        "hit / miss (p50)",
        format!("{:.2}", percentile(&hits, 0.5) / percentile(&misses, 0.5)),
        None,
        None,
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
    use chatq::domain::NewJob;
    use chatq::store::{Durability, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("db");
    {
        let mut options = StoreOptions::embedded(&data);
        options.durability = Durability::Relaxed;
        let queue = chatq::store::open(
            options,
            chatq::clock::system(),
            Arc::new(chatq::signals::Signals::default()),
        )
        .await
        .unwrap();
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
        if wanted("cache") {
            cache_round_trips(upstream).await;
        }
        if wanted("ready") {
            time_to_ready().await;
        }
        if wanted("postgres") {
            postgres(upstream).await;
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
