//! Discord HTTP interactions (DESIGN §16) against a local fake of Discord's API: requests
//! signed with a real Ed25519 key pair (the test holds the private key, chatq the public one),
//! deferred answers, edits and follow-ups, retries, refusals, and a reply that survives a
//! SIGKILL.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{patch, post, put};
use chatq::clock::ManualClock;
use chatq::config::{Config, DiscordConfig};
use chatq::discord::verify::PublicKey;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};

use crate::helpers::{MockUpstream, Reply, TestApp, spawn_app, spawn_app_on, test_config};

pub const APP: &str = "app-1";

/// What the fake Discord was sent: (method, path, body).
pub type Calls = Arc<Mutex<Vec<(String, String, Value)>>>;

#[derive(Clone, Default)]
pub struct FakeDiscord {
    pub calls: Calls,
    /// Answers to give, in order; then 200.
    pub script: Arc<Mutex<VecDeque<(u16, Value)>>>,
}

async fn webhook(
    State(fake): State<FakeDiscord>,
    method: axum::http::Method,
    Path(path): Path<Vec<String>>,
    axum::Json(body): axum::Json<Value>,
) -> impl IntoResponse {
    fake.calls
        .lock()
        .unwrap()
        .push((method.to_string(), path.join("/"), body));
    let (status, answer) = fake
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((200, json!({"id": "m1"})));
    (StatusCode::from_u16(status).unwrap(), axum::Json(answer))
}

impl FakeDiscord {
    pub async fn start() -> (Self, String) {
        let fake = Self::default();
        let router = axum::Router::new()
            .route(
                "/webhooks/{app}/{token}/messages/@original",
                patch(
                    |state, method, Path((app, token)): Path<(String, String)>, body| {
                        webhook(
                            state,
                            method,
                            Path(vec![app, token, "original".into()]),
                            body,
                        )
                    },
                ),
            )
            .route(
                "/webhooks/{app}/{token}",
                post(
                    |state, method, Path((app, token)): Path<(String, String)>, body| {
                        webhook(state, method, Path(vec![app, token]), body)
                    },
                ),
            )
            .route(
                "/applications/{app}/guilds/{guild}/commands",
                put(
                    |State(fake): State<FakeDiscord>,
                     Path((app, guild)): Path<(String, String)>,
                     headers: axum::http::HeaderMap,
                     axum::Json(body): axum::Json<Value>| async move {
                        let auth = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        fake.calls.lock().unwrap().push((
                            "PUT".into(),
                            format!("applications/{app}/guilds/{guild}/commands"),
                            json!({"authorization": auth, "body": body.clone()}),
                        ));
                        axum::Json(body)
                    },
                ),
            )
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (fake, base)
    }

    pub fn calls(&self) -> Vec<(String, String, Value)> {
        self.calls.lock().unwrap().clone()
    }

    pub async fn wait_for_calls(&self, n: usize, secs: u64) -> Vec<(String, String, Value)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let calls = self.calls();
            if calls.len() >= n {
                return calls;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Discord got {} calls, not {n}: {calls:?}",
                calls.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn discord_config(api: &str) -> DiscordConfig {
    DiscordConfig {
        public_key: PublicKey::from_hex(&hex::encode(signing_key().verifying_key().as_bytes()))
            .unwrap(),
        application_id: APP.to_owned(),
        bot_token: None,
        api_base: api.to_owned(),
    }
}

/// The flags that make the real binary answer Discord for [`APP`] with the test's key,
/// sending to the fake at `api`.
pub fn binary_flags(api: &str) -> [String; 6] {
    [
        "--discord-public-key".to_owned(),
        hex::encode(signing_key().verifying_key().as_bytes()),
        "--discord-application-id".to_owned(),
        APP.to_owned(),
        "--discord-api-base".to_owned(),
        api.to_owned(),
    ]
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Posts `body` to `/discord/interactions`, signed at `at` (Unix seconds).
async fn interact(app: &TestApp, body: &Value, at: u64) -> (u16, Value) {
    interact_with(&app.http, &app.url(""), body, at).await
}

pub async fn interact_with(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    at: u64,
) -> (u16, Value) {
    let body = body.to_string();
    let ts = at.to_string();
    let signature = hex::encode(
        signing_key()
            .sign(format!("{ts}{body}").as_bytes())
            .to_bytes(),
    );
    let response = http
        .post(format!("{base}/discord/interactions"))
        .header("content-type", "application/json")
        .header("x-signature-ed25519", signature)
        .header("x-signature-timestamp", ts)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub fn ask(token: &str, prompt: &str) -> Value {
    json!({
        "type": 2, "id": "i1", "application_id": APP, "token": token,
        "guild_id": "g1", "channel_id": "chan-1",
        "member": {"user": {"id": "discord-user-7", "username": "ann"}},
        "data": {"name": "ask", "options": [{"name": "prompt", "type": 3, "value": prompt}]}
    })
}

fn command(name: &str) -> Value {
    json!({
        "type": 2, "id": "i2", "application_id": APP, "token": "tok-cmd",
        "guild_id": "g1", "channel_id": "chan-1",
        "member": {"user": {"id": "discord-user-7"}},
        "data": {"name": name}
    })
}

async fn job_count(app: &TestApp) -> u64 {
    let stats = app.get("/v1/queue/stats").await.body;
    [
        "queued",
        "active",
        "delayed",
        "completed",
        "failed",
        "cancelled",
    ]
    .iter()
    .map(|k| stats[k].as_u64().unwrap())
    .sum()
}

fn with_discord(c: &mut Config, upstream: &MockUpstream, api: &str) {
    c.upstream = Some(upstream.config(Duration::from_secs(5)));
    c.discord = Some(discord_config(api));
}

#[tokio::test]
async fn only_signed_fresh_requests_get_in_and_ping_answers_pong() {
    let upstream = MockUpstream::start().await;
    let (_fake, api) = FakeDiscord::start().await;
    let app = spawn_app(|c| with_discord(c, &upstream, &api)).await;
    let (status, body) = interact(&app, &json!({"type": 1}), now_secs()).await;
    assert_eq!((status, body), (200, json!({"type": 1})));

    let body = ask("tok", "hello").to_string();
    let ts = now_secs().to_string();
    let good = hex::encode(
        signing_key()
            .sign(format!("{ts}{body}").as_bytes())
            .to_bytes(),
    );
    let forged = hex::encode(
        SigningKey::from_bytes(&[1; 32])
            .sign(format!("{ts}{body}").as_bytes())
            .to_bytes(),
    );
    let stale_ts = (now_secs() - 301).to_string();
    let stale = hex::encode(
        signing_key()
            .sign(format!("{stale_ts}{body}").as_bytes())
            .to_bytes(),
    );
    for (signature, timestamp, what) in [
        (Some(forged.as_str()), Some(ts.as_str()), "another key"),
        (None, Some(ts.as_str()), "no signature"),
        (Some(good.as_str()), None, "no timestamp"),
        (
            Some(stale.as_str()),
            Some(stale_ts.as_str()),
            "a stale timestamp",
        ),
        (Some("not-hex"), Some(ts.as_str()), "garbage"),
    ] {
        let mut request = app
            .http
            .post(app.url("/discord/interactions"))
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(s) = signature {
            request = request.header("x-signature-ed25519", s);
        }
        if let Some(t) = timestamp {
            request = request.header("x-signature-timestamp", t);
        }
        let answer = app.send(request).await;
        assert_eq!(answer.status, 401, "{what}");
    }
    // The signature covers the body: a changed body is refused too.
    let answer = app
        .send(
            app.http
                .post(app.url("/discord/interactions"))
                .header("x-signature-ed25519", &good)
                .header("x-signature-timestamp", &ts)
                .body(ask("tok", "changed").to_string()),
        )
        .await;
    assert_eq!(answer.status, 401);
    assert_eq!(job_count(&app).await, 0, "no refused request made a job");
    assert_eq!(upstream.request_count(), 0);
    app.stop().await;
}

#[tokio::test]
async fn ask_defers_at_once_then_the_reply_is_edited_in_and_a_long_one_continues() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::slow(
        "Read #rules, then say hi.",
        Duration::from_millis(1_000),
    )]);
    let (fake, api) = FakeDiscord::start().await;
    let app = spawn_app(|c| with_discord(c, &upstream, &api)).await;
    let (status, body) = interact(&app, &ask("tok-a", "How do I join?"), now_secs()).await;
    assert_eq!((status, body), (200, json!({"type": 5})));
    // The job is queued before the answer goes out, so a worker may already have called
    // the upstream; what the deferral guarantees is that nobody waited for its reply.
    assert!(
        fake.calls().is_empty() && app.get("/v1/queue/stats").await.body["completed"] == 0,
        "deferred before the upstream answered"
    );
    let calls = fake.wait_for_calls(1, 10).await;
    let (method, path, sent) = &calls[0];
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("PATCH", "app-1/tok-a/original")
    );
    assert_eq!(sent["content"], "Read #rules, then say hi.");
    assert_eq!(
        sent["allowed_mentions"]["parse"],
        json!([]),
        "the reply pings nobody"
    );
    // The job is the Discord user's, in the guild and the channel's conversation.
    let log = app.get("/v1/interactions?limit=5").await.body;
    assert_eq!(log["data"][0]["user_id"], "discord-user-7");
    assert_eq!(log["data"][0]["guild_id"], "g1");
    let job = app
        .wait_delivered(log["data"][0]["job_id"].as_str().unwrap())
        .await;
    assert_eq!(job["conversation_id"], "chan-1");
    assert_eq!(job["deliveries"][0]["attempts"], 1);

    // 3,000 characters: the edit, then a follow-up.
    let long = "word ".repeat(600);
    upstream.script([Reply::text(long.trim_end())]);
    let (status, _) = interact(&app, &ask("tok-b", "Tell me everything"), now_secs()).await;
    assert_eq!(status, 200);
    let calls = fake.wait_for_calls(3, 10).await;
    assert_eq!(
        (calls[1].0.as_str(), calls[1].1.as_str()),
        ("PATCH", "app-1/tok-b/original")
    );
    assert_eq!(
        (calls[2].0.as_str(), calls[2].1.as_str()),
        ("POST", "app-1/tok-b")
    );
    let first = calls[1].2["content"].as_str().unwrap();
    let second = calls[2].2["content"].as_str().unwrap();
    assert!(first.chars().count() <= 2_000 && second.chars().count() <= 2_000);
    assert_eq!(format!("{first}{second}"), long.trim_end());
    assert_eq!(calls[2].2["allowed_mentions"]["parse"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn a_refused_delivery_is_retried_after_the_backoff_and_discords_retry_after() {
    let upstream = MockUpstream::start().await;
    let (fake, api) = FakeDiscord::start().await;
    fake.script.lock().unwrap().extend([
        (500, json!({"message": "oops"})),
        (
            429,
            json!({"message": "slow down", "retry_after": 0.3, "global": false}),
        ),
    ]);
    let app = spawn_app(|c| with_discord(c, &upstream, &api)).await;
    let (status, _) = interact(&app, &ask("tok-r", "hi"), now_secs()).await;
    assert_eq!(status, 200);
    let calls = fake.wait_for_calls(3, 15).await;
    assert!(
        calls.iter().all(|c| c.0 == "PATCH"),
        "the same edit, three times: {calls:?}"
    );
    let log = app.get("/v1/interactions?limit=1").await.body;
    let job = app
        .wait_delivered(log["data"][0]["job_id"].as_str().unwrap())
        .await;
    assert_eq!(job["deliveries"][0]["attempts"], 3, "{job}");
    let metrics = app.get("/metrics").await.body;
    let text = metrics.as_str().unwrap();
    for series in [
        "chatq_deliveries_total{kind=\"discord\",result=\"retried\"} 2",
        "chatq_deliveries_total{kind=\"discord\",result=\"delivered\"} 1",
        "chatq_deliveries_total{kind=\"discord\",result=\"failed\"} 0",
    ] {
        assert!(text.contains(series), "{series}:\n{text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn refusals_answer_at_once_only_to_the_caller_and_reset_and_quota_work() {
    let upstream = MockUpstream::start().await;
    let (fake, api) = FakeDiscord::start().await;
    let app = spawn_app(|c| {
        with_discord(c, &upstream, &api);
        c.rate_limit = std::num::NonZeroU32::new(3).unwrap();
    })
    .await;
    let ephemeral = |body: &Value| {
        assert_eq!(body["type"], 4, "{body}");
        assert_eq!(body["data"]["flags"], 64, "{body}");
        body["data"]["content"].as_str().unwrap().to_owned()
    };
    // Validation.
    let (_, body) = interact(&app, &ask("t1", "<script>alert(1)</script>"), now_secs()).await;
    assert!(ephemeral(&body).contains("unsafe"), "{body}");
    // Quota, set for the guild: none spent yet, then used up.
    let put = app
        .send(
            app.http
                .put(app.url("/v1/guilds/g1"))
                .json(&json!({"daily_token_quota": 10})),
        )
        .await;
    assert_eq!(put.status, 200);
    let (_, body) = interact(&app, &command("quota"), now_secs()).await;
    assert!(ephemeral(&body).contains("10 of 10"), "{body}");
    let (_, body) = interact(&app, &ask("t2", "hello"), now_secs()).await;
    assert_eq!(body, json!({"type": 5}));
    fake.wait_for_calls(1, 10).await;
    let (_, body) = interact(&app, &ask("t3", "again"), now_secs()).await;
    assert!(ephemeral(&body).contains("quota"), "{body}");
    // Rate limit (3 per window: the unsafe one, hello, again).
    let (_, body) = interact(&app, &ask("t4", "more"), now_secs()).await;
    assert!(ephemeral(&body).contains("Rate limit"), "{body}");
    // /reset forgets the channel's conversation.
    let turns = app.get("/v1/conversations/chan-1?guild_id=g1").await.body;
    assert_eq!(turns["turns"].as_array().unwrap().len(), 1);
    let (_, body) = interact(&app, &command("reset"), now_secs()).await;
    assert!(ephemeral(&body).contains("Forgot"), "{body}");
    let turns = app.get("/v1/conversations/chan-1?guild_id=g1").await.body;
    assert!(turns["turns"].as_array().unwrap().is_empty());
    assert_eq!(
        fake.calls().len(),
        1,
        "refusals sent nothing to Discord later"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_job_not_done_in_13_minutes_gets_the_fallback_reply_marked_as_such() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::Hang);
    let (fake, api) = FakeDiscord::start().await;
    let clock = ManualClock::new(1_800_000_000_000);
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    with_discord(&mut config, &upstream, &api);
    let app = spawn_app_on(dir, config, clock.clone()).await;
    let (status, _) = interact(&app, &ask("tok-slow", "think hard"), 1_800_000_000).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        fake.calls().is_empty(),
        "nothing before the job is done or late"
    );
    let active = app.get("/v1/jobs?state=active").await.body;
    let id = active["data"][0]["id"].as_str().unwrap().to_owned();
    let job = app.get(&format!("/v1/chat/jobs/{id}")).await.body;
    assert_eq!(
        job["deliveries"][0]["state"], "waiting",
        "parked on its job: {job}"
    );
    assert_eq!(job["deliveries"][0]["next_attempt_at"], Value::Null);
    clock.advance(13 * 60_000);
    let calls = fake.wait_for_calls(1, 10).await;
    let content = calls[0].2["content"].as_str().unwrap();
    assert!(content.contains("canned reply"), "{content}");
    assert_eq!(calls[0].1, "app-1/tok-slow/original");
    let job = app.wait_delivered(&id).await;
    assert_eq!(job["deliveries"][0]["fallback"], true, "{job}");
    app.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_owed_when_chatq_is_killed_is_delivered_after_the_restart() {
    use crate::binary::start_chatq_with_env;
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::text("Worth the wait."));
    let (fake, api) = FakeDiscord::start().await;
    // Discord is down: every edit fails until it is back.
    fake.script.lock().unwrap().extend(std::iter::repeat_n(
        (502, json!({"message": "bad gateway"})),
        1_000,
    ));
    let dir = tempfile::tempdir().unwrap();
    let flags = binary_flags(&api);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let env = upstream.env();
    let (mut chatq, base) = start_chatq_with_env(&dir.path().join("db"), &args, &env);
    let http = reqwest::Client::new();
    let (status, body) = interact_with(&http, &base, &ask("tok-k", "hello"), now_secs()).await;
    assert_eq!((status, body), (200, json!({"type": 5})));
    // The job is done and its first edit failed; then chatq dies without a word.
    fake.wait_for_calls(1, 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    chatq.kill().unwrap();
    chatq.wait().unwrap();
    fake.script.lock().unwrap().clear();
    let before = fake.calls().len();
    let (mut chatq, _base) = start_chatq_with_env(&dir.path().join("db"), &args, &env);
    let calls = fake.wait_for_calls(before + 1, 20).await;
    let last = calls.last().unwrap();
    assert_eq!(last.1, "app-1/tok-k/original");
    assert_eq!(
        last.2["content"], "Worth the wait.",
        "delivered after the restart"
    );
    assert_eq!(upstream.request_count(), 1, "the job was not run again");
    chatq.kill().unwrap();
    chatq.wait().unwrap();
}

#[tokio::test]
async fn register_sends_the_command_definitions_with_the_bot_token() {
    let (fake, api) = FakeDiscord::start().await;
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_chatq"))
            .args([
                "discord",
                "register",
                "--guild",
                "g1",
                "--discord-application-id",
                APP,
                "--discord-bot-token",
                "bot-secret",
                "--discord-api-base",
                &api,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains("registered 3 commands (ask, reset, quota) in guild g1")
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    let (method, path, sent) = &calls[0];
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("PUT", "applications/app-1/guilds/g1/commands")
    );
    assert_eq!(sent["authorization"], "Bot bot-secret");
    let commands = sent["body"].as_array().unwrap();
    let names: Vec<&str> = commands
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ask", "reset", "quota"]);
    let prompt = &commands[0]["options"][0];
    assert_eq!(
        (prompt["name"].as_str(), prompt["required"].as_bool()),
        (Some("prompt"), Some(true))
    );
    assert!(
        commands[0]["options"][1]["choices"]
            .as_array()
            .unwrap()
            .len()
            >= 5
    );
}
