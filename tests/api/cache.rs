//! The response cache (DESIGN §14) through the front door: hits, what is never stored, one
//! upstream call for identical requests in flight, streamed hits, restart, expiry on a
//! controlled clock, the bound, the rate limit and clearing.

use std::time::Duration;

use chatq::clock::ManualClock;
use chatq::config::Config;
use serde_json::{Value, json};

use crate::completions::{content_of, post_completion, sse_events};
use crate::helpers::{Answer, MockUpstream, Reply, TestApp, spawn_app, spawn_app_on, test_config};

const T0: u64 = 1_800_000_000_000;

fn with_cache(config: &mut Config, upstream: &MockUpstream) {
    config.upstream = Some(upstream.config(Duration::from_secs(5)));
    config.cache_ttl = Duration::from_secs(3_600);
    config.rate_limit = std::num::NonZeroU32::new(1_000).unwrap();
}

async fn submit(app: &TestApp, body: Value) -> Answer {
    let a = app.post("/v1/chat/jobs", &body).await;
    assert!(a.status == 202 || a.status == 200, "{a:?}");
    a
}

/// Submits `body` and waits for its job; returns the verdict header and the finished job.
async fn ask(app: &TestApp, body: Value) -> (String, Value) {
    let a = submit(app, body).await;
    let verdict = a
        .header("x-chatq-cache")
        .expect("the cache header")
        .to_owned();
    let job = app.wait_job(a.body["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    (verdict, job)
}

async fn cache_entries(app: &TestApp) -> u64 {
    app.get("/v1/queue/stats").await.body["cache"]["entries"]
        .as_u64()
        .unwrap()
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line_start} in /metrics:\n{text}"))
}

#[tokio::test]
async fn a_repeated_prompt_in_one_guild_is_answered_from_the_cache_and_anything_else_misses() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::text("Be kind, no spam."));
    let app = spawn_app(|c| with_cache(c, &upstream)).await;
    let rules = json!({"user_id": "u1", "guild_id": "g1", "prompt": "What are the rules?"});

    let (verdict, first) = ask(&app, rules.clone()).await;
    assert_eq!(verdict, "miss");
    assert_eq!(first["result"]["cached"], false);
    // Another user of the same guild asks the same thing.
    let mut same = rules.clone();
    same["user_id"] = json!("u2");
    let a = submit(&app, same).await;
    assert_eq!(a.header("x-chatq-cache"), Some("hit"));
    assert_eq!(a.status, 202);
    assert_eq!(
        a.body["status"], "completed",
        "a hit is finished when accepted"
    );
    let second = app.wait_job(a.body["id"].as_str().unwrap()).await;
    assert_eq!(second["result"]["cached"], true);
    assert_eq!(second["result"]["reply"], first["result"]["reply"]);
    assert_eq!(second["result"]["usage"]["total_tokens"], 0);
    assert_eq!(second["attempts"], 0);
    assert_eq!(upstream.request_count(), 1, "the upstream saw one call");

    let log = app.get("/v1/interactions?limit=10").await.body;
    assert_eq!(log["data"][0]["cached"], true);
    assert_eq!(log["data"][0]["user_id"], "u2");
    assert_eq!(log["data"][1]["cached"], false);

    // Whatever shapes the reply makes it another entry.
    let mut other_guild = rules.clone();
    other_guild["guild_id"] = json!("g2");
    let mut no_guild = rules.clone();
    no_guild.as_object_mut().unwrap().remove("guild_id");
    let mut personality = rules.clone();
    personality["personality"] = json!("technical");
    let mut history = rules.clone();
    history["history"] =
        json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]);
    for (n, body) in [other_guild, no_guild, personality, history]
        .into_iter()
        .enumerate()
    {
        let (verdict, job) = ask(&app, body.clone()).await;
        assert_eq!(
            (verdict.as_str(), &job["result"]["cached"]),
            ("miss", &json!(false)),
            "{body}"
        );
        assert_eq!(upstream.request_count(), 2 + n);
    }

    // Temperature and max tokens come through the OpenAI-compatible route.
    let completion = |extra: Value| {
        let mut body =
            json!({"messages": [{"role": "user", "content": "How do I join?"}], "user": "u1"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let calls = upstream.request_count();
    for (n, (extra, expected)) in [
        (json!({}), "miss"),
        (json!({}), "hit"),
        (json!({"temperature": 0.2}), "miss"),
        (json!({"max_tokens": 50}), "miss"),
        (json!({"temperature": 0.2}), "hit"),
    ]
    .into_iter()
    .enumerate()
    {
        let a = app
            .post("/v1/chat/completions", &completion(extra.clone()))
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(
            a.header("x-chatq-cache"),
            Some(expected),
            "request {n}: {extra}"
        );
        assert_eq!(
            a.body["choices"][0]["message"]["content"],
            "Be kind, no spam."
        );
        assert_eq!(a.body["chatq"]["cached"], expected == "hit");
    }
    assert_eq!(upstream.request_count(), calls + 3);

    let metrics = app.get("/metrics").await.body.as_str().unwrap().to_owned();
    assert_eq!(
        metric(&metrics, "chatq_cache_requests_total{result=\"hit\"}"),
        3.0
    );
    assert_eq!(
        metric(&metrics, "chatq_cache_requests_total{result=\"miss\"}"),
        8.0
    );
    assert_eq!(metric(&metrics, "chatq_cache_entries"), 8.0);
    app.stop().await;
}

#[tokio::test]
async fn fallback_replies_are_never_stored() {
    // Offline: every reply is the personality's canned one.
    let offline = spawn_app(|c| c.cache_ttl = Duration::from_secs(3_600)).await;
    let body = json!({"user_id": "u", "guild_id": "g", "prompt": "hello"});
    for _ in 0..2 {
        let (verdict, job) = ask(&offline, body.clone()).await;
        assert_eq!(verdict, "miss");
        assert_eq!(job["result"]["used_fallback"], true);
        assert_eq!(job["result"]["cached"], false);
    }
    assert_eq!(cache_entries(&offline).await, 0);
    offline.stop().await;

    // With an upstream that gave up, under --on-upstream-failure fallback.
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::status(400, "bad request"));
    let app = spawn_app(|c| {
        with_cache(c, &upstream);
        c.worker.on_upstream_failure = chatq::worker::FailurePolicy::Fallback;
    })
    .await;
    for n in 1..=2 {
        let (verdict, job) = ask(&app, body.clone()).await;
        assert_eq!(verdict, "miss");
        assert_eq!(job["result"]["used_fallback"], true);
        assert_eq!(upstream.request_count(), n, "each went upstream");
    }
    assert_eq!(cache_entries(&app).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn upstream_errors_are_never_stored() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::status(400, "no")]);
    upstream.set_default(Reply::text("now it works"));
    let app = spawn_app(|c| with_cache(c, &upstream)).await;
    let body = json!({"user_id": "u", "guild_id": "g", "prompt": "hello"});
    let a = submit(&app, body.clone()).await;
    let failed = app.wait_job(a.body["id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(cache_entries(&app).await, 0);
    // The same request again is a miss that goes upstream, and its reply is what is stored.
    let (verdict, job) = ask(&app, body.clone()).await;
    assert_eq!(
        (verdict.as_str(), &job["result"]["reply"]),
        ("miss", &json!("now it works"))
    );
    assert_eq!(upstream.request_count(), 2);
    let (verdict, job) = ask(&app, body).await;
    assert_eq!(
        (verdict.as_str(), &job["result"]["reply"]),
        ("hit", &json!("now it works"))
    );
    assert_eq!(upstream.request_count(), 2);
    app.stop().await;
}

#[tokio::test]
async fn empty_content_replies_are_never_stored() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::Empty]);
    upstream.set_default(Reply::text("a real answer"));
    let app = spawn_app(|c| with_cache(c, &upstream)).await;
    let body = json!({"user_id": "u", "guild_id": "g", "prompt": "hello"});
    let (_, placeholder) = ask(&app, body.clone()).await;
    assert_eq!(placeholder["result"]["used_fallback"], false);
    assert_eq!(
        placeholder["result"]["reply"],
        chatq::bot::fallback::EMPTY_REPLY_PLACEHOLDER
    );
    assert_eq!(cache_entries(&app).await, 0);
    let (verdict, job) = ask(&app, body).await;
    assert_eq!(verdict, "miss", "the placeholder was not replayed");
    assert_eq!(job["result"]["reply"], "a real answer");
    assert_eq!(upstream.request_count(), 2);
    app.stop().await;
}

#[tokio::test]
async fn twenty_identical_requests_at_once_make_one_upstream_call() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::slow("Welcome aboard!", Duration::from_millis(400)));
    let app = spawn_app(|c| with_cache(c, &upstream)).await;
    let submits = (0..20).map(|n| {
        let app = &app;
        async move {
            let body =
                json!({"user_id": format!("u{n}"), "guild_id": "g", "prompt": "How do I join?"});
            submit(app, body).await.body["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    });
    let ids = futures_util::future::join_all(submits).await;
    let mut cached = 0;
    for id in &ids {
        let job = app.wait_job(id).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["result"]["reply"], "Welcome aboard!");
        cached += usize::from(job["result"]["cached"] == true);
    }
    assert_eq!(
        upstream.request_count(),
        1,
        "one upstream call for all twenty"
    );
    assert_eq!(cached, 19, "the others finished from its result");
    app.stop().await;
}

#[tokio::test]
async fn a_streamed_hit_is_chunks_and_done_with_the_same_text() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::text("Read the pinned message."));
    let app = spawn_app(|c| with_cache(c, &upstream)).await;
    let body =
        json!({"messages": [{"role": "user", "content": "where are the rules?"}], "stream": true});
    let first = post_completion(&app, body.clone()).await;
    assert_eq!(first.headers()["x-chatq-cache"], "miss");
    let fresh = sse_events(first).await;
    let second = post_completion(&app, body.clone()).await;
    assert_eq!(second.headers()["x-chatq-cache"], "hit");
    let events = sse_events(second).await;
    assert_eq!(upstream.request_count(), 1);
    assert_eq!(content_of(&events), "Read the pinned message.");
    assert_eq!(content_of(&events), content_of(&fresh));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "role, content, finish: {events:?}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert!(chunk["id"].as_str().unwrap().starts_with("chatcmpl-"));
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    app.stop().await;
}

#[tokio::test]
async fn entries_survive_a_restart_expire_after_the_ttl_and_stay_within_the_bound() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::text("answer"));
    let clock = ManualClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let configure = |dir: &std::path::Path| {
        let mut c = test_config(dir);
        with_cache(&mut c, &upstream);
        c.cache_ttl = Duration::from_secs(60);
        c.store.cache_max_entries = 2;
        c
    };
    let prompt = |p: &str| json!({"user_id": "u", "guild_id": "g", "prompt": p});
    let config = configure(dir.path());
    let app = spawn_app_on(dir, config, clock.clone()).await;
    assert_eq!(ask(&app, prompt("one")).await.0, "miss");
    let dir = app.stop().await;

    let config = configure(dir.path());
    let app = spawn_app_on(dir, config, clock.clone()).await;
    assert_eq!(
        ask(&app, prompt("one")).await.0,
        "hit",
        "kept across the restart"
    );
    clock.advance(59_999);
    assert_eq!(ask(&app, prompt("one")).await.0, "hit");
    clock.advance(1);
    assert_eq!(ask(&app, prompt("one")).await.0, "miss", "expired at 60 s");
    assert_eq!(upstream.request_count(), 2);

    // Two entries at most: a third pushes out the oldest.
    assert_eq!(ask(&app, prompt("two")).await.0, "miss");
    assert_eq!(ask(&app, prompt("three")).await.0, "miss");
    assert_eq!(cache_entries(&app).await, 2);
    assert_eq!(ask(&app, prompt("three")).await.0, "hit");
    assert_eq!(ask(&app, prompt("two")).await.0, "hit");
    assert_eq!(ask(&app, prompt("one")).await.0, "miss", "the oldest went");
    assert_eq!(cache_entries(&app).await, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_hit_still_counts_against_the_rate_limit() {
    let upstream = MockUpstream::start().await;
    let app = spawn_app(|c| {
        with_cache(c, &upstream);
        c.rate_limit = std::num::NonZeroU32::new(2).unwrap();
    })
    .await;
    let body = json!({"user_id": "u", "prompt": "hi"});
    let (verdict, _) = ask(&app, body.clone()).await;
    assert_eq!(verdict, "miss");
    let hit = submit(&app, body.clone()).await;
    assert_eq!(hit.header("x-chatq-cache"), Some("hit"));
    assert_eq!(hit.header("x-ratelimit-remaining"), Some("0"));
    let refused = app.post("/v1/chat/jobs", &body).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.error_code(), "rate_limited");
    app.stop().await;
}

#[tokio::test]
async fn delete_v1_cache_forgets_every_entry_or_one_guilds() {
    let upstream = MockUpstream::start().await;
    let app = spawn_app(|c| with_cache(c, &upstream)).await;
    let in_guild = |g: &str| json!({"user_id": "u", "guild_id": g, "prompt": "hi"});
    for guild in ["g1", "g2"] {
        ask(&app, in_guild(guild)).await;
    }
    let outside = json!({"user_id": "u", "prompt": "hi"});
    ask(&app, outside.clone()).await;
    assert_eq!(cache_entries(&app).await, 3);

    let bad = app.delete("/v1/cache?guild_id=%01").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["error"]["param"], "guild_id");
    assert_eq!(
        cache_entries(&app).await,
        3,
        "a refused clear changes nothing"
    );

    let cleared = app.delete("/v1/cache?guild_id=g1").await;
    assert_eq!(
        (cleared.status, &cleared.body),
        (200, &json!({"removed": 1}))
    );
    assert_eq!(ask(&app, in_guild("g1")).await.0, "miss");
    assert_eq!(ask(&app, in_guild("g2")).await.0, "hit");
    let cleared = app.delete("/v1/cache?guild_id=global").await;
    assert_eq!(
        cleared.body,
        json!({"removed": 1}),
        "requests outside any guild"
    );
    let cleared = app.delete("/v1/cache").await;
    assert_eq!(cleared.body, json!({"removed": 2}));
    assert_eq!(cache_entries(&app).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn with_the_cache_off_the_header_says_so_and_nothing_is_stored() {
    let upstream = MockUpstream::start().await;
    let app = spawn_app(|c| c.upstream = Some(upstream.config(Duration::from_secs(5)))).await;
    let body = json!({"user_id": "u", "prompt": "hi"});
    for _ in 0..2 {
        assert_eq!(ask(&app, body.clone()).await.0, "off");
    }
    assert_eq!(upstream.request_count(), 2);
    assert_eq!(cache_entries(&app).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_guilds_own_ttl_turns_the_cache_on_or_off_there() {
    let upstream = MockUpstream::start().await;
    let app = spawn_app(|c| {
        c.upstream = Some(upstream.config(Duration::from_secs(5)));
    })
    .await;
    for (guild, ttl) in [("on", 600), ("off", 0)] {
        let put = app
            .send(
                app.http
                    .put(app.url(&format!("/v1/guilds/{guild}")))
                    .json(&json!({"cache_ttl_secs": ttl})),
            )
            .await;
        assert_eq!(put.status, 200, "{put:?}");
    }
    let in_guild = |g: &str| json!({"user_id": "u", "guild_id": g, "prompt": "hi"});
    assert_eq!(ask(&app, in_guild("on")).await.0, "miss");
    assert_eq!(ask(&app, in_guild("on")).await.0, "hit", "on in its guild");
    assert_eq!(
        ask(&app, in_guild("plain")).await.0,
        "off",
        "the server's is off"
    );
    app.stop().await;

    let upstream = MockUpstream::start().await;
    let app = spawn_app(|c| with_cache(c, &upstream)).await;
    let put = app
        .send(
            app.http
                .put(app.url("/v1/guilds/off"))
                .json(&json!({"cache_ttl_secs": 0})),
        )
        .await;
    assert_eq!(put.status, 200);
    for _ in 0..2 {
        assert_eq!(ask(&app, in_guild("off")).await.0, "off");
    }
    assert_eq!(
        upstream.request_count(),
        2,
        "no entry in a guild with the cache off"
    );
    assert_eq!(ask(&app, in_guild("plain")).await.0, "miss");
    assert_eq!(ask(&app, in_guild("plain")).await.0, "hit");
    app.stop().await;
}
