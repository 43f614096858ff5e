//! Hostile input on every POST route: random JSON shapes, wrong types, huge and deeply nested
//! values, invalid UTF-8, empty and truncated bodies. Only documented 4xx answers (or a 2xx
//! for input that happens to be valid), never a 5xx or a dropped connection, and the store
//! holds exactly the jobs that were acknowledged.

use serde_json::{Map, Value, json};

use crate::helpers::spawn_app;

/// A deterministic xorshift generator, so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn string(&mut self) -> String {
        const PIECES: [&str; 16] = [
            "",
            " ",
            "user",
            "assistant",
            "system",
            "<script>",
            "javascript:",
            "é",
            "🦀",
            "\u{0}",
            "\t",
            "&#106;",
            "prompt",
            "x",
            "\u{202e}",
            "\\",
        ];
        let n = self.below(4);
        (0..n)
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect()
    }

    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 3 { 6 } else { 9 }) {
            0 => Value::Null,
            1 => Value::Bool(self.below(2) == 0),
            2 => json!(self.next() as i64),
            3 => json!(f64::from(self.below(1000) as u32) / 7.0),
            4 | 5 => Value::String(self.string()),
            6 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            _ => {
                const KEYS: [&str; 14] = [
                    "user_id",
                    "userId",
                    "prompt",
                    "messages",
                    "role",
                    "content",
                    "guild_id",
                    "personality",
                    "priority",
                    "delay_ms",
                    "conversation_id",
                    "stream",
                    "model",
                    "history",
                ];
                let mut map = Map::new();
                for _ in 0..self.below(5) {
                    let key = KEYS[self.below(KEYS.len() as u64) as usize].to_owned();
                    map.insert(key, self.value(depth + 1));
                }
                Value::Object(map)
            }
        }
    }
}

const ROUTES: [&str; 5] = [
    "/v1/chat/jobs",
    "/v1/messages/validate",
    "/v1/messages/validate/bulk",
    "/v1/chat/completions",
    "/api/chat/bot",
];

fn raw_bodies() -> Vec<Vec<u8>> {
    vec![
        Vec::new(),
        b"{".to_vec(),
        b"{\"user_id\": \"u\", \"prompt\": \"hi\"".to_vec(),
        vec![0xff, 0xfe, 0xfd],
        b"{\"user_id\": \"\xff\xfe\", \"prompt\": \"hi\"}".to_vec(),
        "[".repeat(100_000).into_bytes(),
        format!("{{\"user_id\": \"u\", \"prompt\": {}}}", "[".repeat(5_000)).into_bytes(),
        b"null".to_vec(),
        b"123456789012345678901234567890".to_vec(),
        b"\"just a string\"".to_vec(),
        format!(
            "{{\"user_id\": \"{}\", \"prompt\": \"hi\"}}",
            "u".repeat(60_000)
        )
        .into_bytes(),
    ]
}

#[tokio::test]
async fn random_and_malformed_bodies_get_documented_4xx_and_change_nothing() {
    let app = spawn_app(|c| c.rate_limit = std::num::NonZeroU32::new(1_000_000).unwrap()).await;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("hostile input seed: {seed}");
    let mut rng = Rng(seed);
    let mut bodies: Vec<Vec<u8>> = raw_bodies();
    for _ in 0..400 {
        bodies.push(serde_json::to_vec(&rng.value(0)).unwrap());
    }
    let mut accepted = 0u64;
    for route in ROUTES {
        for body in &bodies {
            let content_type = if rng.below(10) == 0 {
                "text/plain"
            } else {
                "application/json"
            };
            let response = app
                .http
                .post(app.url(route))
                .header("content-type", content_type)
                .header("x-user-id", "hostile")
                .body(body.clone())
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "{route}: connection dropped for {:?}: {e}",
                        String::from_utf8_lossy(&body[..body.len().min(80)])
                    )
                });
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
            assert!(status < 500, "{route}: {status} for {shown:?}: {text}");
            match status {
                200 | 202 => {
                    if route != "/v1/messages/validate" && route != "/v1/messages/validate/bulk" {
                        accepted += 1;
                    }
                }
                400 | 404 | 413 | 415 | 422 => {
                    let parsed: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|_| panic!("{route}: error body is JSON: {text}"));
                    assert!(parsed["error"]["message"].is_string(), "{route}: {text}");
                    assert!(parsed["error"]["code"].is_string(), "{route}: {text}");
                }
                other => panic!("{route}: undocumented status {other} for {shown:?}: {text}"),
            }
        }
    }
    let stats = app.get("/v1/queue/stats").await;
    let stored: u64 = [
        "waiting",
        "active",
        "completed",
        "failed",
        "delayed",
        "cancelled",
    ]
    .iter()
    .map(|k| stats.body[k].as_u64().unwrap())
    .sum();
    assert_eq!(
        stored, accepted,
        "the store holds exactly the acknowledged jobs"
    );
    app.stop().await;
}

#[tokio::test]
async fn odd_paths_methods_and_headers_are_answered_in_the_error_shape() {
    let app = spawn_app(|_| {}).await;
    for path in [
        "/v1/chat/jobs/%00",
        "/v1/chat/jobs/../../etc/passwd",
        "/v1/chat/jobs/00000000-0000-0000-0000-000000000000",
        "/v1/interactions?limit=-1",
        "/v1/interactions?since=99999999999999999999999",
        "/v1/jobs?state=active&limit=abc",
        "/nope",
        "/assets/../Cargo.toml",
    ] {
        let a = app.get(path).await;
        assert!((400..500).contains(&a.status), "{path}: {}", a.status);
        a.error_code();
    }
    let a = app
        .send(
            app.http
                .post(app.url("/v1/chat/jobs"))
                .header("content-type", "application/json; charset=utf-16")
                .header(
                    "x-request-id",
                    reqwest::header::HeaderValue::from_bytes(b"bad\xff\xfe").unwrap(),
                )
                .body("{}"),
        )
        .await;
    assert!((400..500).contains(&a.status), "{}", a.status);
    let patch = app.send(app.http.patch(app.url("/v1/chat/jobs"))).await;
    assert_eq!(patch.status, 405);
    patch.error_code();
    app.stop().await;
}
