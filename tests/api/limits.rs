//! The per-user rate limit and bearer-token auth, through the HTTP API.

use serde_json::json;

use crate::helpers::spawn_app;
use chatq::config::Secret;

#[tokio::test]
async fn eleventh_request_in_a_window_is_refused_and_other_users_pass() {
    let app = spawn_app(|_| {}).await;
    for i in 0..10 {
        let a = app
            .post(
                "/v1/chat/jobs",
                &json!({"user_id": "chatty", "prompt": format!("msg {i}")}),
            )
            .await;
        assert_eq!(a.status, 202, "request {i}");
        assert_eq!(a.header("x-ratelimit-limit"), Some("10"));
        assert_eq!(
            a.header("x-ratelimit-remaining"),
            Some((9 - i).to_string().as_str())
        );
        assert!(a.header("x-ratelimit-reset").is_some());
    }
    let refused = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "chatty", "prompt": "one more"}),
        )
        .await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.error_code(), "rate_limited");
    assert_eq!(refused.body["error"]["type"], "rate_limit_error");
    assert_eq!(refused.header("retry-after"), Some("6"));
    assert_eq!(refused.header("x-ratelimit-remaining"), Some("0"));
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("6 seconds")
    );
    // Invalid requests count too, and still get the headers.
    let other = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "quiet", "prompt": "hello"}),
        )
        .await;
    assert_eq!(other.status, 202, "another user is not affected");
    assert_eq!(other.header("x-ratelimit-remaining"), Some("9"));
    // The legacy route shares the same limit.
    let legacy = app
        .post(
            "/api/chat/bot",
            &json!({"userId": "chatty", "prompt": "hi"}),
        )
        .await;
    assert_eq!(legacy.status, 429);
    let stats = app.get("/v1/queue/stats").await;
    let metrics = app.get("/metrics").await;
    assert!(
        metrics
            .body
            .as_str()
            .unwrap()
            .contains("chatq_rate_limited_requests_total 2")
    );
    assert_eq!(
        stats.body["completed"].as_u64().unwrap()
            + stats.body["waiting"].as_u64().unwrap()
            + stats.body["active"].as_u64().unwrap(),
        11,
        "refused requests stored nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn tokens_guard_client_and_admin_routes() {
    let mut app = spawn_app(|c| {
        c.api_token = Some(Secret::new("client-token"));
        c.admin_token = Some(Secret::new("admin-token"));
    })
    .await;
    // No token.
    let a = app
        .post("/v1/chat/jobs", &json!({"user_id": "u", "prompt": "hi"}))
        .await;
    assert_eq!(a.status, 401);
    assert_eq!(a.error_code(), "invalid_token");
    assert_eq!(a.header("www-authenticate"), Some("Bearer"));
    assert_eq!(app.get("/v1/queue/stats").await.status, 401);
    // Wrong token.
    app.token = Some("nope".into());
    assert_eq!(app.get("/v1/queue/stats").await.status, 401);
    assert_eq!(
        app.post("/v1/chat/jobs", &json!({"user_id": "u", "prompt": "hi"}))
            .await
            .status,
        401
    );
    // Client token: chat routes yes, admin routes no.
    app.token = Some("client-token".into());
    let id = app.submit("u", "hi").await;
    let stats = app.get("/v1/queue/stats").await;
    assert_eq!(stats.status, 403);
    assert_eq!(stats.error_code(), "admin_required");
    assert_eq!(
        app.post(&format!("/v1/chat/jobs/{id}/retry"), &json!({}))
            .await
            .status,
        403
    );
    assert_eq!(app.get("/v1/interactions").await.status, 403);
    assert_eq!(app.post("/v1/queue/pause", &json!({})).await.status, 403);
    // Admin token: both.
    app.token = Some("admin-token".into());
    assert_eq!(app.get("/v1/queue/stats").await.status, 200);
    assert_eq!(app.get(&format!("/v1/chat/jobs/{id}")).await.status, 200);
    // Health and metrics stay open.
    app.token = None;
    assert_eq!(app.get("/healthz").await.status, 200);
    assert_eq!(app.get("/metrics").await.status, 200);
    app.stop().await;
}

#[tokio::test]
async fn admin_routes_are_off_on_a_public_address_without_an_admin_token() {
    let app = spawn_app(|c| {
        // Bound to loopback by the test, but configured as if public.
        c.listen = "0.0.0.0:0".parse().unwrap();
    })
    .await;
    let a = app.get("/v1/queue/stats").await;
    assert_eq!(a.status, 403);
    assert_eq!(a.error_code(), "admin_disabled");
    assert_eq!(
        app.post("/v1/chat/jobs", &json!({"user_id": "u", "prompt": "hi"}))
            .await
            .status,
        202
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_from_one_user_get_exactly_the_quota() {
    let app = spawn_app(|c| {
        c.rate_limit = std::num::NonZeroU32::new(10).unwrap();
    })
    .await;
    let app = std::sync::Arc::new(app);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let app = std::sync::Arc::clone(&app);
            tokio::spawn(async move {
                app.post(
                    "/v1/chat/jobs",
                    &json!({"user_id": "burst", "prompt": format!("m{i}"), "delay_ms": 60000}),
                )
                .await
                .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 40);
    let stats = app.get("/v1/queue/stats").await;
    assert_eq!(stats.body["delayed"], 10);
    if let Ok(app) = std::sync::Arc::try_unwrap(app) {
        app.stop().await;
    }
}
