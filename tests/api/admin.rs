//! Admin routes, health, metrics.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{MockUpstream, Reply, spawn_app};

#[tokio::test]
async fn pause_stops_processing_and_resume_restarts_it() {
    let app = spawn_app(|_| {}).await;
    let p = app.post("/v1/queue/pause", &json!({})).await;
    assert_eq!(p.status, 200);
    assert_eq!(p.body["paused"], true);
    let id = app.submit("u", "hello").await;
    let job = app.get(&format!("/v1/chat/jobs/{id}?wait=1")).await;
    assert_eq!(job.body["status"], "queued", "paused: not processed");
    let stats = app.get("/v1/queue/stats").await;
    assert_eq!(stats.body["paused"], true);
    assert_eq!(stats.body["waiting"], 1);
    assert_eq!(
        app.post("/v1/queue/resume", &json!({})).await.body["paused"],
        false
    );
    assert_eq!(app.wait_job(&id).await["status"], "completed");
    app.stop().await;
}

#[tokio::test]
async fn failed_job_can_be_retried_by_an_admin() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::status(400, "bad request from upstream")]);
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(5)))).await;
    let id = app.submit("u", "hi").await;
    let failed = app.wait_job(&id).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "openai_error");
    assert_eq!(failed["error"]["status"], 400);
    let list = app.get("/v1/jobs?state=failed").await;
    assert_eq!(list.body["data"][0]["id"], id.as_str());
    let retried = app
        .post(&format!("/v1/chat/jobs/{id}/retry"), &json!({}))
        .await;
    assert_eq!(retried.status, 200);
    assert_eq!(retried.body["status"], "queued");
    let done = app.wait_job(&id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"]["reply"], "mock reply");
    let not_failed = app
        .post(&format!("/v1/chat/jobs/{id}/retry"), &json!({}))
        .await;
    assert_eq!(not_failed.status, 409);
    let bad_state = app.get("/v1/jobs?state=bogus").await;
    assert_eq!(bad_state.status, 400);
    assert_eq!(bad_state.error_code(), "invalid_query");
    app.stop().await;
}

#[tokio::test]
async fn interaction_log_filters_and_paginates() {
    let app = spawn_app(|c| c.rate_limit = std::num::NonZeroU32::new(100).unwrap()).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let user = if i % 2 == 0 { "ann" } else { "bob" };
        let body = if i < 3 {
            json!({"user_id": user, "prompt": format!("p{i}"), "guild_id": "g1"})
        } else {
            json!({"user_id": user, "prompt": format!("p{i}")})
        };
        let a = app.post("/v1/chat/jobs", &body).await;
        let id = a.body["id"].as_str().unwrap().to_owned();
        app.wait_job(&id).await;
        ids.push(id);
    }
    let ann = app.get("/v1/interactions?user_id=ann").await;
    let prompts: Vec<_> = ann.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(prompts, ["p6", "p4", "p2", "p0"]);
    let entry = &ann.body["data"][0];
    assert_eq!(entry["action"], "chat_bot_interaction");
    assert_eq!(entry["guild_id"], "global");
    assert_eq!(entry["used_fallback"], true);
    assert!(entry.get("reply").is_some() && entry.get("timestamp").is_some());
    let g1 = app.get("/v1/interactions?guild_id=g1").await;
    assert_eq!(g1.body["data"].as_array().unwrap().len(), 3);
    let page1 = app.get("/v1/interactions?limit=4").await;
    assert_eq!(page1.body["data"].as_array().unwrap().len(), 4);
    let cursor = page1.body["next_cursor"].as_str().unwrap();
    let page2 = app
        .get(&format!("/v1/interactions?limit=4&cursor={cursor}"))
        .await;
    assert_eq!(page2.body["data"].as_array().unwrap().len(), 3);
    assert!(page2.body["next_cursor"].is_null());
    assert_eq!(page2.body["data"][2]["prompt"], "p0");
    let future = app.get("/v1/interactions?since=2999-01-01T00:00:00Z").await;
    assert!(future.body["data"].as_array().unwrap().is_empty());
    let bad = app.get("/v1/interactions?cursor=zzz").await;
    assert_eq!(bad.error_code(), "invalid_cursor");
    let bad_time = app.get("/v1/interactions?since=yesterday").await;
    assert_eq!(bad_time.status, 400);
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_and_prometheus_metrics_that_move() {
    let app = spawn_app(|_| {}).await;
    assert_eq!(app.get("/healthz").await.status, 200);
    assert_eq!(app.get("/readyz").await.status, 200);
    let scrape = |text: String| {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        prometheus_parse::Scrape::parse(lines).expect("a Prometheus parser accepts /metrics")
    };
    let value = |s: &prometheus_parse::Scrape, name: &str| -> f64 {
        s.samples
            .iter()
            .filter(|x| x.metric == name)
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let before = scrape(app.get("/metrics").await.body.as_str().unwrap().to_owned());
    assert_eq!(value(&before, "chatq_jobs_accepted_total"), 0.0);
    let id = app.submit("m", "count me").await;
    app.wait_job(&id).await;
    app.post(
        "/v1/messages/validate",
        &json!({"role": "nobody", "content": "x"}),
    )
    .await;
    // Counters are recorded by the worker just after the completion wakes waiters, so give
    // the scrape a moment to see them.
    let mut response = app.get("/metrics").await;
    for _ in 0..100 {
        let scraped = scrape(response.body.as_str().unwrap().to_owned());
        if value(&scraped, "chatq_jobs_completed_total") >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        response = app.get("/metrics").await;
    }
    assert!(
        response
            .header("content-type")
            .unwrap()
            .contains("openmetrics-text")
    );
    let text = response.body.as_str().unwrap().to_owned();
    let after = scrape(text.clone());
    assert_eq!(value(&after, "chatq_jobs_accepted_total"), 1.0);
    assert_eq!(value(&after, "chatq_jobs_completed_total"), 1.0);
    assert_eq!(
        value(&after, "chatq_validation_rejected_requests_total"),
        1.0
    );
    assert!(value(&after, "chatq_http_requests_total") >= 3.0);
    assert!(
        text.contains("chatq_queue_depth{state=\"completed\"} 1"),
        "{text}"
    );
    assert!(text.contains("chatq_job_duration_seconds_count 1"));
    assert!(text.contains("route=\"/v1/chat/jobs\""));
    assert!(!text.contains("user_id"), "no per-user labels");
    app.stop().await;
}

#[tokio::test]
async fn interaction_times_are_rfc3339_like_the_job_views() {
    let app = spawn_app(|_| {}).await;
    let id = app.submit("timely", "hi").await;
    let job = app.wait_job(&id).await;
    let log = app.get("/v1/interactions?user_id=timely").await;
    let entry = &log.body["data"][0];
    assert_eq!(entry["timestamp"], job["finished_at"]);
    assert!(entry["timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
    app.stop().await;
}

#[tokio::test]
async fn a_fresh_servers_metrics_have_every_family_with_zeros() {
    let app = spawn_app(|_| {}).await;
    let text = app.get("/metrics").await.body.as_str().unwrap().to_owned();
    // Every family, before any request: dashboards and alerts see series from the start.
    for family in [
        "chatq_jobs_accepted",
        "chatq_jobs_completed",
        "chatq_jobs_failed",
        "chatq_jobs_retried",
        "chatq_queue_depth",
        "chatq_queue_wait_seconds",
        "chatq_job_duration_seconds",
        "chatq_upstream_requests",
        "chatq_upstream_latency_seconds",
        "chatq_rate_limited_requests",
        "chatq_validation_rejected_requests",
        "chatq_http_requests",
        "chatq_interaction_log_failures",
        "chatq_store_flushes",
        "chatq_disk_free_bytes",
        "chatq_disk_accepting_jobs",
        "chatq_store_up",
        "chatq_store_reopens",
        "chatq_cache_requests",
        "chatq_cache_entries",
        "chatq_deliveries",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family}:\n{text}"
        );
    }
    // With their known label values at 0.
    for series in [
        "chatq_jobs_completed_total{fallback=\"false\"} 0",
        "chatq_jobs_completed_total{fallback=\"true\"} 0",
        "chatq_jobs_failed_total{code=\"openai_error\"} 0",
        "chatq_jobs_failed_total{code=\"missing_prompt\"} 0",
        "chatq_upstream_requests_total{status=\"200\"} 0",
        "chatq_upstream_requests_total{status=\"timeout\"} 0",
        "chatq_queue_depth{state=\"failed\"} 0",
        "chatq_cache_requests_total{result=\"hit\"} 0",
        "chatq_jobs_accepted_total 0",
        "chatq_jobs_retried_total 0",
        "chatq_rate_limited_requests_total 0",
        "chatq_cache_entries 0",
        "chatq_deliveries_total{kind=\"discord\",result=\"failed\"} 0",
        "chatq_deliveries_total{kind=\"webhook\",result=\"delivered\"} 0",
    ] {
        assert!(text.contains(series), "{series}:\n{text}");
    }
    app.stop().await;
}
