//! `/v1/chat/completions` (plain and streamed) and `/v1/models`.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{MockUpstream, Reply, TestApp, spawn_app};

/// Reads an SSE body into its `data:` payloads, checking the framing on the way.
pub async fn sse_events(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = response.text().await.unwrap();
    assert!(text.ends_with("\n\n"), "events end with a blank line");
    text.split("\n\n")
        .filter(|frame| !frame.is_empty())
        .map(|frame| {
            frame
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("every frame is a data line: {frame:?}"))
                .to_owned()
        })
        .collect()
}

pub fn content_of(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

pub async fn post_completion(app: &TestApp, body: Value) -> reqwest::Response {
    app.http
        .post(app.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn non_streaming_answer_is_a_chat_completion_through_the_queue() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::text("Bonjour!"));
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(5)))).await;
    let a = app
        .send(
            app.http
                .post(app.url("/v1/chat/completions"))
                .header("x-guild-id", "g-5")
                .json(&json!({
                    "model": "chatq-professional",
                    "messages": [
                        {"role": "system", "content": "Answer in French."},
                        {"role": "user", "content": "Hello"}
                    ],
                    "user": "sdk-user",
                    "temperature": 0.2,
                    "max_tokens": 50,
                    "unknown_field": {"ignored": true}
                })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["object"], "chat.completion");
    assert_eq!(a.body["model"], "chatq-professional");
    assert_eq!(a.body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(a.body["choices"][0]["message"]["content"], "Bonjour!");
    assert_eq!(a.body["choices"][0]["finish_reason"], "stop");
    assert_eq!(a.body["usage"]["total_tokens"], 18);
    assert!(a.body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let job_id = a.header("x-chatq-job-id").unwrap().to_owned();
    let (_, sent) = &upstream.requests()[0];
    let msgs = sent["messages"].as_array().unwrap();
    assert!(
        msgs[0]["content"].as_str().unwrap().contains("g-5"),
        "chatq's system prompt first"
    );
    assert_eq!(msgs[1]["content"], "Answer in French.", "then the client's");
    assert_eq!(msgs[2]["content"], "Hello");
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(sent["max_tokens"], 50);
    let job = app.get(&format!("/v1/chat/jobs/{job_id}")).await;
    assert_eq!(job.body["status"], "completed");
    assert_eq!(job.body["user_id"], "sdk-user");
    let log = app.get("/v1/interactions?user_id=sdk-user").await;
    assert_eq!(log.body["data"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn streamed_reply_flows_chunk_by_chunk_and_ends_with_done() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::slow(
        "one two three four",
        Duration::from_millis(150),
    ));
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(10)))).await;
    let response = post_completion(
        &app,
        json!({"messages": [{"role": "user", "content": "count"}], "stream": true, "user": "s1"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let job_id = response.headers()["x-chatq-job-id"]
        .to_str()
        .unwrap()
        .to_owned();
    // The first content delta arrives while the upstream is still producing the rest.
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    let mut chunks_at_first_delta = None;
    while let Some(bytes) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&bytes.unwrap()));
        if chunks_at_first_delta.is_none() && seen.contains("\"content\":\"one \"") {
            chunks_at_first_delta = Some(upstream.chunks_sent());
        }
    }
    let at_first = chunks_at_first_delta.expect("saw the first delta");
    assert!(
        at_first < 4,
        "forwarded before the upstream finished (upstream had sent {at_first} of 4)"
    );
    let events: Vec<String> = seen
        .split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| f.strip_prefix("data: ").unwrap().to_owned())
        .collect();
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(content_of(&events), "one two three four");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        upstream.requests()[0].1["stream"],
        true,
        "the worker asked the upstream to stream"
    );
    let job = app.wait_job(&job_id).await;
    assert_eq!(job["result"]["reply"], "one two three four");
    app.stop().await;
}

#[tokio::test]
async fn fallback_replies_stream_too() {
    let app = spawn_app(|_| {}).await;
    let events = sse_events(
        post_completion(
            &app,
            json!({"model": "chatq-sarcastic", "messages": [{"role": "user", "content": "hi"}], "stream": true}),
        )
        .await,
    )
    .await;
    let deltas = events
        .iter()
        .filter(|e| e.contains("\"content\":\""))
        .count();
    assert!(deltas > 3, "several deltas, not one blob");
    let text = content_of(&events);
    assert!(text.starts_with("Oh, wonderful, a message."), "{text}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let plain = app
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.body["chatq"]["used_fallback"], true);
    app.stop().await;
}

#[tokio::test]
async fn a_mid_stream_failure_ends_the_stream_with_an_error_and_is_not_retried() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::CutOff(vec!["partial ".into(), "answer ".into()])]);
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(5)))).await;
    let response = post_completion(
        &app,
        json!({"messages": [{"role": "user", "content": "go"}], "stream": true}),
    )
    .await;
    let job_id = response.headers()["x-chatq-job-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let events = sse_events(response).await;
    assert_eq!(content_of(&events), "partial answer ");
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "openai_error");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let job = app.wait_job(&job_id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 1, "not retried after text was sent");
    assert_eq!(upstream.request_count(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_failure_before_the_first_delta_is_retried() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::status(503, "busy")]);
    upstream.set_default(Reply::text("second try"));
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(5)))).await;
    let events = sse_events(
        post_completion(
            &app,
            json!({"messages": [{"role": "user", "content": "go"}], "stream": true}),
        )
        .await,
    )
    .await;
    assert_eq!(content_of(&events), "second try");
    assert_eq!(upstream.request_count(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_does_not_stop_the_job() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::slow("a b c d e f", Duration::from_millis(100)));
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(10)))).await;
    let response = post_completion(
        &app,
        json!({"messages": [{"role": "user", "content": "go"}], "stream": true, "user": "leaver"}),
    )
    .await;
    let job_id = response.headers()["x-chatq-job-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let job = app.wait_job(&job_id).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["result"]["reply"], "a b c d e f");
    let log = app.get("/v1/interactions?user_id=leaver").await;
    assert_eq!(log.body["data"][0]["reply"], "a b c d e f");
    app.stop().await;
}

#[tokio::test]
async fn errors_use_the_openai_shape_and_statuses() {
    let app = spawn_app(|c| {
        c.rate_limit = std::num::NonZeroU32::new(2).unwrap();
        c.refuse_client_system = true;
    })
    .await;
    let ok = json!({"messages": [{"role": "user", "content": "hi"}], "user": "limited"});
    assert_eq!(app.post("/v1/chat/completions", &ok).await.status, 200);
    let system = app
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], "user": "limited"}),
        )
        .await;
    assert_eq!(
        system.status, 422,
        "client system messages refused by the flag"
    );
    assert_eq!(system.body["error"]["message"], "Invalid message role");
    let limited = app.post("/v1/chat/completions", &ok).await;
    assert_eq!(limited.status, 429);
    assert!(limited.header("retry-after").is_some());
    assert_eq!(limited.body["error"]["type"], "rate_limit_error");
    let bad = app
        .post(
            "/v1/chat/completions",
            &json!({"messages": "hi", "user": "o1"}),
        )
        .await;
    assert_eq!(bad.status, 400);
    bad.error_code();
    let empty = app
        .post(
            "/v1/chat/completions",
            &json!({"messages": [], "user": "o2"}),
        )
        .await;
    assert_eq!(empty.error_code(), "missing_prompt");
    let unknown = app
        .post(
            "/v1/chat/completions",
            &json!({"model": "chatq-pirate", "messages": [{"role": "user", "content": "hi"}], "user": "o3"}),
        )
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error_code(), "model_not_found");
    let temperature = app
        .post(
            "/v1/chat/completions",
            &json!({"temperature": 5, "messages": [{"role": "user", "content": "hi"}], "user": "o4"}),
        )
        .await;
    assert_eq!(temperature.status, 400);
    app.stop().await;
}

#[tokio::test]
async fn a_failed_upstream_is_a_500_and_a_token_is_required_when_set() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::status(400, "bad model"));
    let mut app = spawn_app(|c| {
        c.upstream = Some(upstream.config(Duration::from_secs(5)));
        c.api_token = Some(chatq::config::Secret::new("tok"));
    })
    .await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(app.post("/v1/chat/completions", &body).await.status, 401);
    app.token = Some("tok".into());
    let failed = app.post("/v1/chat/completions", &body).await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.error_code(), "openai_error");
    assert!(
        failed.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("400")
    );
    let job_id = failed.header("x-chatq-job-id").unwrap();
    assert_eq!(
        app.get(&format!("/v1/chat/jobs/{job_id}")).await.body["status"],
        "failed"
    );
    app.stop().await;
}

#[tokio::test]
async fn models_lists_the_model_and_personality_aliases() {
    let app = spawn_app(|_| {}).await;
    let a = app.get("/v1/models").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["object"], "list");
    let ids: Vec<_> = a.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&"gpt-4o-mini".to_owned()));
    for p in [
        "helpful",
        "sarcastic",
        "professional",
        "creative",
        "technical",
    ] {
        assert!(ids.contains(&format!("chatq-{p}")), "{ids:?}");
    }
    app.stop().await;
}

/// chatq's end of every accepted connection has `TCP_NODELAY`: with Nagle's algorithm a small
/// write (a stream chunk) that follows one the client has not acknowledged yet waits for the
/// client's delayed ACK, 40 ms on Linux; that stalled a few percent of streamed replies.
#[tokio::test]
async fn accepted_connections_send_small_writes_at_once() {
    use std::os::fd::BorrowedFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app(|_| {}).await;
    let mut client = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: chatq\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let ours = client.local_addr().unwrap();
    // chatq runs in this process: its end of the connection is one of our own descriptors.
    let mut server_side = None;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the descriptor is only duplicated, and a number closed meanwhile makes the
        // duplication fail, which is skipped.
        let Ok(owned) = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned() else {
            continue;
        };
        let socket = std::net::TcpStream::from(owned);
        if socket.local_addr().ok() == Some(app.addr) && socket.peer_addr().ok() == Some(ours) {
            server_side = Some(socket);
            break;
        }
    }
    let server_side = server_side.expect("chatq's end of the connection among our descriptors");
    assert!(server_side.nodelay().unwrap(), "TCP_NODELAY is set");
}

/// Every field OpenAI's published schema (openai/openai-openapi) marks required on a chat
/// completion, a chunk, a model list and an error: strict typed clients refuse objects
/// without them.
#[tokio::test]
async fn openai_objects_carry_every_field_the_published_schema_requires() {
    fn has_all(value: &Value, fields: &[&str], what: &str) {
        for field in fields {
            assert!(value.get(field).is_some(), "{what} lacks {field}: {value}");
        }
    }
    let upstream = MockUpstream::start().await;
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(5)))).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let a = app.post("/v1/chat/completions", &body).await;
    assert_eq!(a.status, 200, "{a:?}");
    has_all(
        &a.body,
        &["id", "object", "created", "model", "choices"],
        "chat.completion",
    );
    let choice = &a.body["choices"][0];
    has_all(
        choice,
        &["index", "message", "finish_reason", "logprobs"],
        "choice",
    );
    has_all(
        &choice["message"],
        &["role", "content", "refusal"],
        "message",
    );
    assert!(choice["message"]["refusal"].is_null());
    has_all(
        &a.body["usage"],
        &["prompt_tokens", "completion_tokens", "total_tokens"],
        "usage",
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = sse_events(post_completion(&app, streamed).await).await;
    for event in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        has_all(
            &chunk,
            &["id", "object", "created", "model", "choices"],
            "chunk",
        );
        has_all(
            &chunk["choices"][0],
            &["index", "delta", "finish_reason"],
            "chunk choice",
        );
    }

    let models = app.get("/v1/models").await;
    has_all(&models.body, &["object", "data"], "model list");
    for model in models.body["data"].as_array().unwrap() {
        has_all(model, &["id", "object", "created", "owned_by"], "model");
    }
    let error = app
        .post("/v1/chat/completions", &json!({"messages": []}))
        .await;
    has_all(
        &error.body["error"],
        &["message", "type", "param", "code"],
        "error",
    );
    app.stop().await;
}
