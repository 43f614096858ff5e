//! Guilds and conversations (DESIGN §15) through the front door: settings that change the
//! next upstream request, server-side conversations, daily token quotas on a controlled
//! clock, and usage read from the interaction log.

use std::time::Duration;

use chatq::clock::ManualClock;
use serde_json::{Value, json};

use crate::helpers::{
    Answer, MockUpstream, Reply, TestApp, spawn_app, spawn_app_in, spawn_app_on, test_config,
};

/// 2027-01-15T08:00:00Z: 16 hours before the next UTC midnight.
const T0: u64 = 1_800_000_000_000;

fn upstream_config(c: &mut chatq::config::Config, upstream: &MockUpstream) {
    c.upstream = Some(upstream.config(Duration::from_secs(5)));
    c.model = "server-model".into();
}

/// Submits and waits; returns the submit's answer and the finished job.
async fn ask(app: &TestApp, body: Value) -> (Answer, Value) {
    let a = app.post("/v1/chat/jobs", &body).await;
    assert_eq!(a.status, 202, "{a:?}");
    let job = app.wait_job(a.body["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    (a, job)
}

fn last_upstream_body(upstream: &MockUpstream) -> Value {
    upstream
        .requests()
        .last()
        .expect("an upstream call")
        .1
        .clone()
}

/// The (role, content) pairs after the system prompt and before the prompt.
fn history_sent(body: &Value) -> Vec<(String, String)> {
    let messages = body["messages"].as_array().unwrap();
    messages[1..messages.len() - 1]
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_guilds_settings_change_its_next_upstream_request_and_survive_a_restart() {
    let upstream = MockUpstream::start().await;
    let app = spawn_app(|c| upstream_config(c, &upstream)).await;
    let settings = json!({
        "personality": "technical",
        "instructions": "Answer like a pirate.",
        "model": "guild-model",
        "temperature": 0.3,
        "max_tokens": 77,
        "rate_limit": {"limit": 2, "window_secs": 60},
        "history_turns": 3
    });
    let put = app
        .send(app.http.put(app.url("/v1/guilds/g1")).json(&settings))
        .await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(put.body["guild_id"], "g1");
    assert_eq!(put.body["settings"]["model"], "guild-model");

    // No restart: the next request in g1 is shaped by them.
    ask(
        &app,
        json!({"user_id": "u", "guild_id": "g1", "prompt": "hi"}),
    )
    .await;
    let sent = last_upstream_body(&upstream);
    assert_eq!(sent["model"], "guild-model");
    assert_eq!(sent["max_tokens"], 77);
    assert!(
        (sent["temperature"].as_f64().unwrap() - 0.3).abs() < 1e-6,
        "{sent}"
    );
    let system = sent["messages"][0]["content"].as_str().unwrap();
    assert!(system.ends_with("Answer like a pirate."), "{system}");
    let technical = chatq::bot::Personalities::builtin();
    assert!(
        system.contains(&technical.resolve(Some("technical")).instructions),
        "the guild's personality: {system}"
    );
    // Another guild keeps the server's.
    ask(
        &app,
        json!({"user_id": "u", "guild_id": "g2", "prompt": "hi"}),
    )
    .await;
    let other = last_upstream_body(&upstream);
    assert_eq!(other["model"], "server-model");
    assert_eq!(other["max_tokens"], 180);
    assert!(
        !other["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("pirate")
    );
    // The guild's own limit: two per minute for each of its users, apart from the server's.
    let second = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "guild_id": "g1", "prompt": "again"}),
        )
        .await;
    assert_eq!(second.status, 202);
    assert_eq!(second.header("x-ratelimit-limit"), Some("2"));
    let third = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "guild_id": "g1", "prompt": "more"}),
        )
        .await;
    assert_eq!((third.status, third.error_code()), (429, "rate_limited"));
    let elsewhere = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "guild_id": "g2", "prompt": "more"}),
        )
        .await;
    assert_eq!(elsewhere.status, 202);
    assert_eq!(elsewhere.header("x-ratelimit-limit"), Some("10"));

    // Invalid values: 422 naming the param, and nothing changes.
    for (body, param) in [
        (json!({"temperature": 3}), "temperature"),
        (json!({"temperature": "warm"}), "temperature"),
        (
            json!({"rate_limit": {"limit": 0, "window_secs": 60}}),
            "rate_limit.limit",
        ),
        (
            json!({"rate_limit": {"limit": 5}}),
            "rate_limit.window_secs",
        ),
        (json!({"personality": "pirate"}), "personality"),
        (json!({"instructions": "x".repeat(2_001)}), "instructions"),
        (json!({"history_turns": 51}), "history_turns"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"daily_token_quota": -1}), "daily_token_quota"),
        (json!({"model": "two words"}), "model"),
        (
            json!({"allowed_personalities": ["helpful", "nope"]}),
            "allowed_personalities[1]",
        ),
        (
            json!({"personality": "sarcastic", "allowed_personalities": ["helpful"]}),
            "personality",
        ),
        (json!({"colour": "red"}), "colour"),
    ] {
        let a = app
            .send(app.http.put(app.url("/v1/guilds/g1")).json(&body))
            .await;
        assert_eq!(a.status, 422, "{body}: {a:?}");
        assert_eq!(a.body["error"]["param"], param, "{body}");
    }
    let still = app.get("/v1/guilds/g1").await;
    assert_eq!(
        still.body["settings"], put.body["settings"],
        "refused PUTs changed nothing"
    );
    assert_eq!(app.get("/v1/guilds/nobody").await.status, 404);

    let dir = app.stop().await;
    let mut config = test_config(dir.path());
    upstream_config(&mut config, &upstream);
    let app = spawn_app_in(dir, config).await;
    let listed = app.get("/v1/guilds").await;
    assert_eq!(
        listed.body["data"][0]["guild_id"], "g1",
        "{:?}",
        listed.body
    );
    assert_eq!(listed.body["data"][0]["settings"]["model"], "guild-model");
    ask(
        &app,
        json!({"user_id": "w", "guild_id": "g1", "prompt": "after"}),
    )
    .await;
    assert_eq!(
        last_upstream_body(&upstream)["model"],
        "guild-model",
        "survived the restart"
    );

    // Allowed personalities: a request that names another is refused; one that names none
    // gets the guild's.
    let put = app
        .send(
            app.http
                .put(app.url("/v1/guilds/g1"))
                .json(&json!({"allowed_personalities": ["professional", "technical"]})),
        )
        .await;
    assert_eq!(put.status, 200, "{put:?}");
    let refused = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "x", "guild_id": "g1", "prompt": "hi", "personality": "sarcastic"}),
        )
        .await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (422, "personality_not_allowed")
    );
    assert_eq!(refused.body["error"]["param"], "personality");
    let (_, job) = ask(
        &app,
        json!({"user_id": "x", "guild_id": "g1", "prompt": "hi"}),
    )
    .await;
    assert_eq!(job["personality"], "professional");
    // Deleting the settings gives the guild the server's again.
    let deleted = app.delete("/v1/guilds/g1").await;
    assert_eq!(
        (deleted.status, &deleted.body),
        (200, &json!({"deleted": true}))
    );
    ask(
        &app,
        json!({"user_id": "y", "guild_id": "g1", "prompt": "hi"}),
    )
    .await;
    assert_eq!(last_upstream_body(&upstream)["model"], "server-model");
    app.stop().await;
}

#[tokio::test]
async fn a_conversation_lives_on_the_server_per_guild_until_forgotten() {
    let upstream = MockUpstream::start().await;
    let app = spawn_app(|c| upstream_config(c, &upstream)).await;
    let said = |prompt: &str, guild: &str| json!({"user_id": "u", "guild_id": guild, "conversation_id": "c1", "prompt": prompt});
    upstream.script([Reply::text("Hello, Ann!")]);
    ask(&app, said("I am Ann.", "g1")).await;
    assert!(history_sent(&last_upstream_body(&upstream)).is_empty());
    upstream.script([Reply::text("You are Ann.")]);
    ask(&app, said("Who am I?", "g1")).await;
    assert_eq!(
        history_sent(&last_upstream_body(&upstream)),
        [
            ("user".to_owned(), "I am Ann.".to_owned()),
            ("assistant".to_owned(), "Hello, Ann!".to_owned())
        ],
        "the second request carries the first exchange"
    );
    // The same id in another guild is another conversation.
    ask(&app, said("Who am I?", "g2")).await;
    assert!(history_sent(&last_upstream_body(&upstream)).is_empty());
    // A client that sends its own history gets that, not the stored one.
    let mut own = said("and now?", "g1");
    own["history"] =
        json!([{"role": "user", "content": "mine"}, {"role": "assistant", "content": "yours"}]);
    ask(&app, own).await;
    assert_eq!(history_sent(&last_upstream_body(&upstream)).len(), 2);
    assert_eq!(history_sent(&last_upstream_body(&upstream))[0].1, "mine");

    // history_turns bounds what is sent.
    let put = app
        .send(
            app.http
                .put(app.url("/v1/guilds/g1"))
                .json(&json!({"history_turns": 1})),
        )
        .await;
    assert_eq!(put.status, 200);
    ask(&app, said("Still there?", "g1")).await;
    let sent = history_sent(&last_upstream_body(&upstream));
    assert_eq!(sent.len(), 2, "one exchange: {sent:?}");
    assert_eq!(sent[0].1, "and now?", "the newest exchange");

    let listed = app.get("/v1/conversations/c1?guild_id=g1").await;
    assert_eq!(listed.status, 200);
    let turns = listed.body["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 4, "{:?}", listed.body);
    assert_eq!(turns[0]["prompt"], "I am Ann.");
    assert_eq!(turns[0]["reply"], "Hello, Ann!");

    // The OpenAI-compatible route takes the conversation from X-Conversation-Id.
    let a = app
        .send(
            app.http
                .post(app.url("/v1/chat/completions"))
                .header("x-guild-id", "g2")
                .header("x-conversation-id", "c1")
                .json(&json!({"messages": [{"role": "user", "content": "From the SDK"}], "user": "u"})),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let sent = history_sent(&last_upstream_body(&upstream));
    assert_eq!(sent[0].1, "Who am I?", "g2's conversation: {sent:?}");

    let forgotten = app.delete("/v1/conversations/c1?guild_id=g1").await;
    assert_eq!(
        (forgotten.status, &forgotten.body),
        (200, &json!({"removed": 4}))
    );
    ask(&app, said("Do you remember me?", "g1")).await;
    assert!(
        history_sent(&last_upstream_body(&upstream)).is_empty(),
        "after DELETE the next request carries none"
    );
    assert_eq!(
        app.get("/v1/conversations/c1?guild_id=g2").await.body["turns"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "the other guild's conversation stays"
    );
    let bad = app.get("/v1/conversations/c1?guild_id=%01").await;
    assert_eq!(
        (bad.status, &bad.body["error"]["param"]),
        (400, &json!("guild_id"))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_daily_token_quota_closes_at_its_total_and_opens_at_utc_midnight() {
    // Each mock reply uses 11 + 7 = 18 tokens.
    let upstream = MockUpstream::start().await;
    let clock = ManualClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    upstream_config(&mut config, &upstream);
    let app = spawn_app_on(dir, config, clock.clone()).await;
    let put = app
        .send(
            app.http
                .put(app.url("/v1/guilds/g1"))
                .json(&json!({"daily_token_quota": 30})),
        )
        .await;
    assert_eq!(put.status, 200);
    let body = json!({"user_id": "u", "guild_id": "g1", "prompt": "hi"});
    let (first, _) = ask(&app, body.clone()).await;
    assert_eq!(first.header("x-quota-remaining"), Some("30"));
    let (second, _) = ask(&app, body.clone()).await;
    assert_eq!(second.header("x-quota-remaining"), Some("12"));
    let over = app.post("/v1/chat/jobs", &body).await;
    assert_eq!((over.status, over.error_code()), (429, "quota_exceeded"));
    assert_eq!(
        over.header("retry-after"),
        Some("57600"),
        "16 h to UTC midnight"
    );
    assert_eq!(over.header("x-quota-remaining"), Some("0"));
    // Another user, another guild: their own count.
    let other_user = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "v", "guild_id": "g1", "prompt": "hi"}),
        )
        .await;
    assert_eq!(other_user.status, 202);
    let other_guild = app
        .post(
            "/v1/chat/jobs",
            &json!({"user_id": "u", "guild_id": "g2", "prompt": "hi"}),
        )
        .await;
    assert_eq!(other_guild.status, 202);
    assert_eq!(
        other_guild.header("x-quota-remaining"),
        None,
        "g2 has no quota"
    );
    // One second before midnight it is still closed; at midnight it opens again.
    clock.advance(57_599_000);
    let still = app.post("/v1/chat/jobs", &body).await;
    assert_eq!(
        (still.status, still.header("retry-after")),
        (429, Some("1"))
    );
    clock.advance(1_000);
    let next_day = app.post("/v1/chat/jobs", &body).await;
    assert_eq!(next_day.status, 202, "{next_day:?}");
    assert_eq!(next_day.header("x-quota-remaining"), Some("30"));
    app.stop().await;
}

#[tokio::test]
async fn usage_totals_equal_what_the_interaction_log_holds() {
    let upstream = MockUpstream::start().await;
    upstream.script([
        Reply::text("one"),
        Reply::status(400, "no"),
        Reply::text("three"),
    ]);
    let app = spawn_app(|c| {
        upstream_config(c, &upstream);
        c.cache_ttl = Duration::from_secs(600);
    })
    .await;
    for (user, guild) in [("u1", "g1"), ("u2", "g1"), ("u1", "g2")] {
        let a = app
            .post("/v1/chat/jobs", &json!({"user_id": user, "guild_id": guild, "prompt": format!("{user} in {guild}")}))
            .await;
        app.wait_job(a.body["id"].as_str().unwrap()).await;
    }
    // A cache hit: no tokens.
    ask(
        &app,
        json!({"user_id": "u3", "guild_id": "g1", "prompt": "u1 in g1"}),
    )
    .await;

    let log = app.get("/v1/interactions?limit=100").await.body;
    let entries = log["data"].as_array().unwrap();
    assert_eq!(entries.len(), 4);
    let tokens = |e: &Value, k: &str| e["usage"][k].as_u64().unwrap_or(0);
    for (group_by, key_of) in [("user", "user_id"), ("guild", "guild_id")] {
        let usage = app.get(&format!("/v1/usage?group_by={group_by}")).await;
        assert_eq!(usage.status, 200, "{usage:?}");
        assert_eq!(usage.body["group_by"], group_by);
        let rows = usage.body["data"].as_array().unwrap();
        for row in rows {
            let mine: Vec<&Value> = entries.iter().filter(|e| e[key_of] == row["key"]).collect();
            assert_eq!(row["requests"], mine.len(), "{row}");
            let completed = mine
                .iter()
                .filter(|e| e["action"] == "chat_bot_interaction")
                .count();
            assert_eq!(row["completed"], completed, "{row}");
            assert_eq!(row["failed"], mine.len() - completed, "{row}");
            assert_eq!(
                row["cached"],
                mine.iter().filter(|e| e["cached"] == true).count()
            );
            assert_eq!(
                row["prompt_tokens"],
                mine.iter().map(|e| tokens(e, "prompt_tokens")).sum::<u64>()
            );
            assert_eq!(
                row["completion_tokens"],
                mine.iter()
                    .map(|e| tokens(e, "completion_tokens"))
                    .sum::<u64>()
            );
        }
        let requests: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
        assert_eq!(requests, 4, "every entry in one group");
    }
    let g1 = app.get("/v1/usage?group_by=user&guild_id=g1").await;
    let keys: Vec<&str> = g1.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["u1", "u2", "u3"]);
    let by_day = app.get("/v1/usage?group_by=day").await;
    assert_eq!(by_day.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        by_day.body["data"][0]["prompt_tokens"], 22,
        "two upstream replies of 11"
    );
    let bad = app.get("/v1/usage?group_by=week").await;
    assert_eq!(
        (bad.status, &bad.body["error"]["param"]),
        (400, &json!("group_by"))
    );
    app.stop().await;
}
