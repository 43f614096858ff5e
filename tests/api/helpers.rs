//! Test helpers: a chatq server on port 0 with a temporary data dir, and a scriptable mock
//! OpenAI-compatible upstream (a real HTTP server on loopback).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chatq::bot::UpstreamConfig;
use chatq::config::{Config, Secret};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::binary::get_json;

pub const TEST_KEY: &str = "sk-test-key-0123456789";

/// One scripted answer of the mock upstream.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this content after `delay`.
    Text { content: String, delay: Duration },
    /// 200 with no content.
    Empty,
    /// An error status with a body and optional `Retry-After`.
    Status {
        status: u16,
        body: String,
        retry_after: Option<String>,
    },
    /// Never answers.
    Hang,
    /// Streams these pieces (when asked to stream), then cuts the connection without `[DONE]`.
    CutOff(Vec<String>),
}

impl Reply {
    pub fn text(content: &str) -> Self {
        Self::Text {
            content: content.to_owned(),
            delay: Duration::ZERO,
        }
    }

    pub fn slow(content: &str, delay: Duration) -> Self {
        Self::Text {
            content: content.to_owned(),
            delay,
        }
    }

    pub fn status(status: u16, body: &str) -> Self {
        Self::Status {
            status,
            body: body.to_owned(),
            retry_after: None,
        }
    }
}

#[derive(Default)]
struct MockState {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    requests: Mutex<Vec<(HeaderMap, Value)>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Stream chunks written so far (to check that chatq forwards before the end).
    chunks_sent: AtomicUsize,
}

/// A mock OpenAI-compatible upstream.
#[derive(Clone)]
pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<MockState>,
}

struct InFlight<'a>(&'a MockState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn chat_completions(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(&state);
    state.requests.lock().unwrap().push((headers, body.clone()));
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| state.default.lock().unwrap().clone())
        .unwrap_or_else(|| Reply::text("mock reply"));
    let model = body["model"].as_str().unwrap_or("mock").to_owned();
    let ok = |content: Value| {
        Json(json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        }))
        .into_response()
    };
    let streamable = matches!(reply, Reply::Text { .. } | Reply::Empty | Reply::CutOff(_));
    if body["stream"] == true && streamable {
        return stream_reply(state.clone(), model, reply, _guard_owned(&state));
    }
    match reply {
        Reply::Text { content, delay } => {
            tokio::time::sleep(delay).await;
            ok(Value::from(content))
        }
        Reply::CutOff(parts) => ok(Value::from(parts.concat())),
        Reply::Empty => ok(Value::Null),
        Reply::Status {
            status,
            body,
            retry_after,
        } => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            if let Some(ra) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", ra.parse().unwrap());
            }
            response
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3_600)).await;
            ok(Value::from("too late"))
        }
    }
}

/// Keeps the in-flight count up while a streamed body is being written.
struct StreamGuard(Arc<MockState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn _guard_owned(state: &Arc<MockState>) -> StreamGuard {
    state.in_flight.fetch_add(1, Ordering::SeqCst);
    StreamGuard(Arc::clone(state))
}

/// An SSE answer: one chunk per word (`delay` apart), then `[DONE]` (or a cut for `CutOff`).
fn stream_reply(
    state: Arc<MockState>,
    model: String,
    reply: Reply,
    guard: StreamGuard,
) -> Response {
    let (pieces, delay, cut): (Vec<String>, Duration, bool) = match reply {
        Reply::Text { content, delay } => (
            content.split_inclusive(' ').map(str::to_owned).collect(),
            delay,
            false,
        ),
        Reply::Empty => (Vec::new(), Duration::ZERO, false),
        Reply::CutOff(parts) => (parts, Duration::from_millis(20), true),
        Reply::Status { .. } | Reply::Hang => unreachable!("answered before streaming"),
    };
    let frame = move |content: &str| {
        let chunk = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]
        });
        format!("data: {chunk}\n\n")
    };
    let stream = futures_util::stream::unfold((0usize, guard), move |(i, guard)| {
        let state = Arc::clone(&state);
        let piece = pieces.get(i).cloned();
        let frame = frame.clone();
        let last = i == pieces.len();
        async move {
            if i > 0 {
                tokio::time::sleep(delay).await;
            }
            match piece {
                Some(p) => {
                    state.chunks_sent.fetch_add(1, Ordering::SeqCst);
                    Some((Ok::<_, std::io::Error>(frame(&p)), (i + 1, guard)))
                }
                None if last && !cut => Some((Ok("data: [DONE]\n\n".to_owned()), (i + 1, guard))),
                None if last => {
                    Some((Err(std::io::Error::other("connection cut")), (i + 1, guard)))
                }
                None => None,
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(stream))
        .unwrap()
}

impl MockUpstream {
    pub async fn start() -> Self {
        let state = Arc::new(MockState::default());
        let router = axum::Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { addr, state }
    }

    /// Queues replies, answered in order; after them the default reply.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn set_default(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = Some(reply);
    }

    pub fn requests(&self) -> Vec<(HeaderMap, Value)> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    pub fn chunks_sent(&self) -> usize {
        self.state.chunks_sent.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// The environment that points a `chatq serve` process at this mock.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("OPENAI_API_KEY", "test-key".to_owned()),
            ("OPENAI_BASE_URL", format!("http://{}/v1", self.addr)),
        ]
    }

    pub fn config(&self, timeout: Duration) -> UpstreamConfig {
        UpstreamConfig {
            base_url: format!("http://{}/v1", self.addr),
            api_key: Secret::new(TEST_KEY),
            timeout,
        }
    }
}

/// A running chatq.
pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub dir: tempfile::TempDir,
    pub token: Option<String>,
}

/// A config for a test: temporary data dir, no upstream, fast backoff.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::new(dir.join("db"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.worker.backoff_base = Duration::from_millis(10);
    config.shutdown_timeout = Duration::from_secs(5);
    config
}

/// Starts chatq on port 0; `configure` adjusts the test config first.
pub async fn spawn_app(configure: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    configure(&mut config);
    spawn_app_in(dir, config).await
}

pub async fn spawn_app_in(dir: tempfile::TempDir, config: Config) -> TestApp {
    spawn_app_on(dir, config, chatq::clock::system()).await
}

/// Starts chatq on `clock` (a test drives expiry and due times with a manual one).
pub async fn spawn_app_on(
    dir: tempfile::TempDir,
    config: Config,
    clock: chatq::clock::SharedClock,
) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(chatq::app::run_with_clock(
        listener,
        config,
        clock,
        shutdown.clone(),
    ));
    TestApp {
        addr,
        http: reqwest::Client::new(),
        shutdown,
        server,
        dir,
        token: None,
    }
}

/// A parsed answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the one error shape and returns the code.
    pub fn error_code(&self) -> &str {
        let e = &self.body["error"];
        assert!(e["message"].is_string(), "error shape: {}", self.body);
        assert!(e["type"].is_string(), "error shape: {}", self.body);
        assert!(e.get("param").is_some(), "error shape: {}", self.body);
        e["code"].as_str().expect("error code")
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let request = match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        };
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.send(self.http.delete(self.url(path))).await
    }

    /// Submits a prompt for `user` and returns the job id.
    pub async fn submit(&self, user: &str, prompt: &str) -> String {
        let a = self
            .post("/v1/chat/jobs", &json!({"user_id": user, "prompt": prompt}))
            .await;
        assert_eq!(a.status, 202, "{:?}", a.body);
        a.body["id"].as_str().unwrap().to_owned()
    }

    /// Waits (long-poll) for a job to finish and returns it.
    pub async fn wait_job(&self, id: &str) -> Value {
        let a = self.get(&format!("/v1/chat/jobs/{id}?wait=30")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a.body
    }

    /// Waits until the job's first delivery is recorded as delivered and returns the job.
    /// The receiver sees a delivery a moment before chatq records Discord's or the
    /// webhook's answer, so a test that saw the call must still wait for the record.
    pub async fn wait_delivered(&self, id: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let job = self.get(&format!("/v1/chat/jobs/{id}")).await.body;
            if job["deliveries"][0]["state"] == "delivered" {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the delivery was not recorded as delivered: {job}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        self.server.await.unwrap().unwrap();
        self.dir
    }
}

/// Waits until the chatq at `base` has no waiting, active or delayed job, for at most `secs`.
pub async fn wait_until_drained(http: &reqwest::Client, base: &str, secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let stats = get_json(http, &format!("{base}/v1/queue/stats")).await;
        let open: u64 = ["waiting", "active", "delayed"]
            .iter()
            .map(|k| stats[k].as_u64().unwrap_or_default())
            .sum();
        if open == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs still open after {secs} s: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP client for load against a chatq that the test kills: each request gives up after
/// 10 s. After its server died, hyper's connection pool can leave a request waiting for a
/// pooled connection that never comes back (hyperium/hyper#2312); without a timeout that
/// request, and the test awaiting it, hang for good (seen once in the chaos test: no socket
/// open, no timer pending).
pub fn client_for_killed_server() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a reqwest client")
}
