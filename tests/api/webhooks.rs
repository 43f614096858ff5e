//! Webhooks (DESIGN §16): a job's `callback_url` gets the finished job, signed per the
//! Standard Webhooks specification (verified here with the specification's algorithm),
//! only for allowed hosts, retried across a restart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chatq::webhook::{Secret, WebhookConfig};
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, spawn_app_in, test_config};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the receiver was sent: headers and body of each request.
type Received = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

#[derive(Clone, Default)]
struct Receiver {
    got: Received,
    statuses: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let receiver = Self::default();
        let router = axum::Router::new()
            .route(
                "/hook",
                post(
                    |State(r): State<Receiver>, headers: HeaderMap, body: axum::body::Bytes| async move {
                        r.got.lock().unwrap().push((headers, body.to_vec()));
                        let status = r.statuses.lock().unwrap().pop_front().unwrap_or(204);
                        StatusCode::from_u16(status).unwrap()
                    },
                ),
            )
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (receiver, url)
    }

    async fn wait_for(&self, n: usize) -> Vec<(HeaderMap, Vec<u8>)> {
        for _ in 0..500 {
            let got = self.got.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the receiver did not get {n} deliveries");
    }
}

fn webhooks(c: &mut chatq::config::Config) {
    c.webhook = WebhookConfig {
        allow_hosts: vec!["127.0.0.1".into()],
        secret: Some(Secret::parse(SECRET).unwrap()),
    };
}

/// The Standard Webhooks verification, written from the specification: HMAC-SHA256 with the
/// base64-decoded key (after `whsec_`) over `id.timestamp.body`, base64, after `v1,`.
fn verify(headers: &HeaderMap, body: &[u8]) {
    let header = |n: &str| headers.get(n).unwrap().to_str().unwrap().to_owned();
    let (id, timestamp, signatures) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let key = STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    assert!(
        signatures.split(' ').any(|s| s == expected),
        "{signatures} carries {expected}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(timestamp.parse::<u64>().unwrap().abs_diff(now) < 300);
}

async fn submit(app: &TestApp, callback: &str) -> crate::helpers::Answer {
    app.post(
        "/v1/chat/jobs",
        &json!({"user_id": "u", "prompt": "hi", "callback_url": callback}),
    )
    .await
}

#[tokio::test]
async fn a_webhook_to_an_allowed_host_arrives_signed_and_a_host_not_allowed_is_refused() {
    let (receiver, url) = Receiver::start().await;
    let app = spawn_app(webhooks).await;
    let accepted = submit(&app, &url).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    let got = receiver.wait_for(1).await;
    let (headers, body) = &got[0];
    verify(headers, body);
    let view = app
        .wait_delivered(accepted.body["id"].as_str().unwrap())
        .await;
    let delivery = &view["deliveries"][0];
    assert_eq!(delivery["next_attempt_at"], Value::Null, "ended: {view}");
    let at = |v: &Value| humantime::parse_rfc3339(v.as_str().unwrap()).unwrap();
    // The delivery is recorded a moment before its job.
    let retried_for = at(&delivery["expires_at"])
        .duration_since(at(&view["created_at"]))
        .unwrap_or_default();
    assert!(
        retried_for.as_secs().abs_diff(86_400) < 60,
        "retried for a day: {view}"
    );
    let job: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(job["id"], accepted.body["id"]);
    assert_eq!(job["status"], "completed");
    assert!(headers["webhook-id"].to_str().unwrap().starts_with("msg_"));

    for bad in [
        "http://evil.example/hook",
        "ftp://127.0.0.1/hook",
        "nonsense",
    ] {
        let refused = submit(&app, bad).await;
        assert_eq!(refused.status, 422, "{bad}: {refused:?}");
        assert_eq!(refused.body["error"]["param"], "callback_url");
    }
    let stats = app.get("/v1/queue/stats").await.body;
    assert_eq!(
        stats["completed"], 1,
        "refused callbacks made no job: {stats}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_failed_webhook_is_retried_across_a_restart_under_one_id() {
    let (receiver, url) = Receiver::start().await;
    receiver
        .statuses
        .lock()
        .unwrap()
        .extend([500, 503, 500, 500, 500]);
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    webhooks(&mut config);
    let app = spawn_app_in(dir, config).await;
    let accepted = submit(&app, &url).await;
    assert_eq!(accepted.status, 202);
    let id = accepted.body["id"].as_str().unwrap().to_owned();
    receiver.wait_for(1).await;
    let dir = app.stop().await;
    receiver.statuses.lock().unwrap().clear();
    let mut config = test_config(dir.path());
    webhooks(&mut config);
    let app = spawn_app_in(dir, config).await;
    let before = receiver.got.lock().unwrap().len();
    let got = receiver.wait_for(before + 1).await;
    let ids: Vec<&str> = got
        .iter()
        .map(|(h, _)| h["webhook-id"].to_str().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one id on every attempt: {ids:?}"
    );
    verify(&got.last().unwrap().0, &got.last().unwrap().1);
    let job = app.wait_delivered(&id).await;
    let delivery = &job["deliveries"][0];
    assert_eq!(delivery["kind"], "webhook");
    assert!(delivery["attempts"].as_u64().unwrap() >= 2, "{job}");
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_sends_one_webhook_and_leaves_nothing_owed() {
    let (receiver, url) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    webhooks(&mut config);
    let app = spawn_app_in(dir, config).await;
    let body =
        json!({"user_id": "u", "prompt": "hi", "callback_url": url, "idempotency_key": "once"});
    let send = || app.post("/v1/chat/jobs", &body);
    let first = send().await;
    let again = send().await;
    assert_eq!((first.status, again.status), (202, 200), "{again:?}");
    assert_eq!(first.body["id"], again.body["id"]);
    let id = first.body["id"].as_str().unwrap().to_owned();
    let job = app.wait_delivered(&id).await;
    assert_eq!(job["deliveries"].as_array().unwrap().len(), 1, "{job}");
    assert_eq!(receiver.got.lock().unwrap().len(), 1);
    // In the store: nothing is still owed, not even for the repeat (an hour on, every open
    // delivery would be due).
    let dir = app.stop().await;
    let later: chatq::clock::SharedClock =
        chatq::clock::ManualClock::new(chatq::clock::system().now_ms() + 3_600_000);
    let store = crate::worker::open_store(
        &dir.path().join("db"),
        later,
        std::sync::Arc::new(chatq::signals::Signals::default()),
    )
    .await;
    let owed = store.claim_deliveries(100, 60_000).await.unwrap();
    assert!(owed.is_empty(), "{owed:?}");
}
