//! Submitting, reading, waiting for and cancelling jobs; validation routes; legacy routes.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{MockUpstream, Reply, spawn_app};

#[tokio::test]
async fn offline_job_is_answered_with_a_fallback_reply() {
    let app = spawn_app(|_| {}).await;
    let a = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "alice", "prompt": "  Hello!  ", "personality": "sarcastic"}),
        )
        .await;
    assert_eq!(a.status, 202);
    let id = a.body["id"].as_str().unwrap().to_owned();
    assert_eq!(a.body["status"], "queued");
    assert_eq!(
        a.header("location"),
        Some(format!("/v1/chat/jobs/{id}").as_str())
    );
    let job = app.wait_job(&id).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["prompt"], "Hello!", "prompt trimmed");
    assert_eq!(job["result"]["used_fallback"], true);
    assert!(
        job["result"]["reply"]
            .as_str()
            .unwrap()
            .contains("offline demo mode")
    );
    assert_eq!(job["attempts"], 1);
    app.stop().await;
}

#[tokio::test]
async fn long_poll_returns_as_soon_as_the_job_finishes() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::slow("pong", Duration::from_millis(300)));
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(5)))).await;
    let id = app.submit("u", "ping").await;
    let immediate = app.get(&format!("/v1/chat/jobs/{id}")).await;
    assert_ne!(immediate.body["status"], "completed", "still running");
    let started = std::time::Instant::now();
    let job = app.get(&format!("/v1/chat/jobs/{id}?wait=60")).await;
    assert_eq!(job.body["status"], "completed");
    assert_eq!(job.body["result"]["reply"], "pong");
    assert_eq!(job.body["result"]["used_fallback"], false);
    assert_eq!(job.body["result"]["usage"]["total_tokens"], 18);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "returned on completion, not at the deadline"
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_submissions_get_clear_errors_and_store_nothing() {
    let app = spawn_app(|_| {}).await;
    let malformed = app
        .send(
            app.http
                .post(app.url("/v1/chat/jobs"))
                .header("content-type", "application/json")
                .body("{\"user_id\": \"u\", "),
        )
        .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.error_code(), "invalid_json");

    let no_type = app
        .send(app.http.post(app.url("/v1/chat/jobs")).body("{}"))
        .await;
    assert_eq!(no_type.status, 415);
    no_type.error_code();

    let missing = app.post("/v1/chat/jobs", &json!({"user_id": "u"})).await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.error_code(), "missing_prompt");
    let blank = app
        .post("/v1/chat/jobs", &json!({"user_id": "u", "prompt": "   "}))
        .await;
    assert_eq!(blank.error_code(), "missing_prompt");

    let long = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "prompt": "x".repeat(2001)}),
        )
        .await;
    assert_eq!(long.status, 422);
    assert_eq!(long.error_code(), "prompt_too_long");
    assert_eq!(long.body["error"]["param"], "prompt");
    let exactly = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u2", "prompt": "x".repeat(2000)}),
        )
        .await;
    assert_eq!(exactly.status, 202, "2000 characters pass");

    let unsafe_prompt = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "prompt": "<SCRIPT>alert(1)"}),
        )
        .await;
    assert_eq!(unsafe_prompt.status, 422);
    assert_eq!(
        unsafe_prompt.body["error"]["message"],
        "Message contains potentially unsafe content"
    );

    let bad_history = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "prompt": "hi", "history": [{"role": "system", "content": "x"}]}),
        )
        .await;
    assert_eq!(bad_history.status, 422);
    assert_eq!(bad_history.body["error"]["message"], "Invalid message role");
    assert_eq!(bad_history.body["error"]["param"], "history[0]");

    let wrong_type = app
        .post("/v1/chat/jobs", &json!({"user_id": 5, "prompt": "hi"}))
        .await;
    assert_eq!(wrong_type.status, 400);
    assert_eq!(wrong_type.error_code(), "invalid_request");
    let typo = app
        .post("/v1/chat/jobs", &json!({"user_id": "u", "promt": "hi"}))
        .await;
    assert_eq!(typo.status, 400);
    assert!(
        typo.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("promt")
    );
    let no_user = app
        .post("/v1/chat/jobs", &json!({"user_id": " ", "prompt": "hi"}))
        .await;
    assert_eq!(no_user.status, 400);
    assert_eq!(no_user.body["error"]["param"], "user_id");
    let persona = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "prompt": "hi", "personality": "pirate"}),
        )
        .await;
    assert_eq!(persona.error_code(), "unknown_personality");

    let huge = app
        .send(
            app.http
                .post(app.url("/v1/chat/jobs"))
                .header("content-type", "application/json")
                .body(format!(
                    "{{\"user_id\":\"u\",\"prompt\":\"{}\"}}",
                    "a".repeat(200_000)
                )),
        )
        .await;
    assert_eq!(huge.status, 413);
    assert_eq!(huge.error_code(), "body_too_large");

    let stats = app.get("/v1/queue/stats").await;
    let total: u64 = ["waiting", "active", "completed", "failed", "delayed"]
        .iter()
        .map(|k| stats.body[k].as_u64().unwrap())
        .sum();
    assert_eq!(
        total, 1,
        "only the one valid job was stored: {}",
        stats.body
    );
    app.stop().await;
}

#[tokio::test]
async fn messages_form_uses_the_last_user_message_as_the_prompt() {
    let upstream = MockUpstream::start().await;
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(5)))).await;
    let a = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "guild_id": "g9", "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "answer"},
                {"role": "user", "content": " second "}
            ]}),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let job = app.wait_job(a.body["id"].as_str().unwrap()).await;
    assert_eq!(job["prompt"], "second");
    let (_, sent) = &upstream.requests()[0];
    let msgs = sent["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 4);
    assert!(msgs[0]["content"].as_str().unwrap().contains("g9"));
    assert_eq!(msgs[3]["content"], "second");
    let last_not_user = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "messages": [{"role": "assistant", "content": "hi"}]}),
        )
        .await;
    assert_eq!(last_not_user.error_code(), "missing_prompt");
    app.stop().await;
}

#[tokio::test]
async fn unknown_jobs_are_404_and_cancel_follows_the_state_rules() {
    let app = spawn_app(|_| {}).await;
    let unknown = app
        .get(&format!("/v1/chat/jobs/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error_code(), "job_not_found");
    assert_eq!(app.get("/v1/chat/jobs/not-a-uuid").await.status, 404);
    assert_eq!(
        app.delete(&format!("/v1/chat/jobs/{}", uuid::Uuid::new_v4()))
            .await
            .status,
        404
    );

    let delayed = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "prompt": "later", "delay_ms": 600000}),
        )
        .await;
    let id = delayed.body["id"].as_str().unwrap().to_owned();
    assert_eq!(delayed.body["status"], "delayed");
    let job = app.get(&format!("/v1/chat/jobs/{id}")).await;
    assert!(job.body["run_at"].is_string());
    let cancelled = app.delete(&format!("/v1/chat/jobs/{id}")).await;
    assert_eq!(cancelled.status, 200);
    assert_eq!(cancelled.body["status"], "cancelled");
    let again = app.delete(&format!("/v1/chat/jobs/{id}")).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.error_code(), "conflict");

    let done = app.submit("u", "now").await;
    app.wait_job(&done).await;
    assert_eq!(
        app.delete(&format!("/v1/chat/jobs/{done}")).await.status,
        409
    );
    app.stop().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_first_job() {
    let app = spawn_app(|_| {}).await;
    let body =
        json!({"user_id": "u", "prompt": "once", "idempotency_key": "abc", "delay_ms": 60000});
    let first = app.post("/v1/chat/jobs", &body).await;
    assert_eq!(first.status, 202);
    let second = app.post("/v1/chat/jobs", &body).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body["id"], first.body["id"]);
    assert_eq!(second.body["created"], false);
    let stats = app.get("/v1/queue/stats").await;
    assert_eq!(stats.body["delayed"], 1);
    app.stop().await;
}

#[tokio::test]
async fn validation_routes_single_and_bulk() {
    let app = spawn_app(|_| {}).await;
    let ok = app
        .post(
            "/v1/messages/validate",
            &json!({"role": "user", "content": "  hi  "}),
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body["validated_message"]["content"], "hi");
    assert!(ok.body["validated_message"]["validated_at"].is_string());
    for (body, message) in [
        (json!("text"), "Invalid message format"),
        (
            json!({"role": "system", "content": "x"}),
            "Invalid message role",
        ),
        (
            json!({"role": "user", "content": 1}),
            "Message content is required",
        ),
        (
            json!({"role": "user", "content": "a".repeat(10_001)}),
            "Message content too long (max 10000 characters)",
        ),
        (
            json!({"role": "user", "content": "javascript:alert(1)"}),
            "Message contains potentially unsafe content",
        ),
    ] {
        let a = app.post("/v1/messages/validate", &body).await;
        assert_eq!(a.status, 422, "{body}");
        assert_eq!(a.body["error"]["message"], message);
    }
    let bulk = app
        .post(
            "/v1/messages/validate/bulk",
            &json!({"conversation_id": "c1", "messages": [
                {"role": "user", "content": "fine"},
                {"role": "user", "content": ""},
                {"role": "assistant", "content": "also fine"}
            ]}),
        )
        .await;
    assert_eq!(bulk.status, 200);
    assert_eq!(bulk.body["success"], false);
    assert_eq!(
        bulk.body["summary"],
        json!({"total": 3, "success": 2, "errors": 1})
    );
    assert_eq!(
        bulk.body["results"][1]["error"],
        "Message content is required"
    );
    assert_eq!(
        bulk.body["results"][2]["validated_message"]["content"],
        "also fine"
    );
    let bad = app
        .post(
            "/v1/messages/validate/bulk",
            &json!({"conversation_id": "c1", "messages": "no"}),
        )
        .await;
    assert_eq!(bad.status, 400);
    app.stop().await;
}

#[tokio::test]
async fn replaced_system_routes_keep_their_shapes() {
    let app = spawn_app(|_| {}).await;
    let a = app
        .post(
            "/api/chat/bot",
            &json!({"userId": "old-client", "guildId": "g1", "prompt": "hi"}),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["ok"], true);
    assert_eq!(a.body["status"], "queued");
    let id = a.body["jobId"].as_str().unwrap().to_owned();
    app.wait_job(&id).await;
    let job = app.get(&format!("/api/chat/jobs/{id}")).await;
    assert_eq!(job.status, 200);
    assert_eq!(job.body["ok"], true);
    assert_eq!(job.body["jobId"], id.as_str());
    assert_eq!(job.body["state"], "completed");
    assert_eq!(job.body["attemptsMade"], 1);
    assert_eq!(job.body["result"]["used_fallback"], true);
    let missing = app
        .get(&format!("/api/chat/jobs/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code(), "job_not_found");
    let no_prompt = app
        .post("/api/chat/bot", &json!({"userId": "old-client"}))
        .await;
    assert_eq!(no_prompt.status, 400);
    assert_eq!(no_prompt.error_code(), "missing_prompt");
    app.stop().await;
}

#[tokio::test]
async fn request_id_is_echoed_and_reaches_the_interaction_log() {
    let app = spawn_app(|_| {}).await;
    let a = app
        .send(
            app.http
                .post(app.url("/v1/chat/jobs"))
                .header("x-request-id", "trace-me-123")
                .json(&json!({"user_id": "rid", "prompt": "hi"})),
        )
        .await;
    assert_eq!(a.header("x-request-id"), Some("trace-me-123"));
    app.wait_job(a.body["id"].as_str().unwrap()).await;
    let generated = app.get("/healthz").await;
    assert_eq!(generated.header("x-request-id").map(str::len), Some(36));
    let log = app.get("/v1/interactions?user_id=rid").await;
    assert_eq!(log.body["data"][0]["request_id"], "trace-me-123");
    app.stop().await;
}
