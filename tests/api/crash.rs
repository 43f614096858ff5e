//! Crash safety with the real binary: concurrent pushers get durable acknowledgements, the
//! process is killed with SIGKILL at a random moment, and every acknowledged job is found
//! after reopening, over several rounds on the same data directory.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatq::clock;

use crate::binary::{Running, get_json, start_chatq_with_env};
use crate::helpers::client_for_killed_server;
use chatq::store::StoreOptions;
use serde_json::json;

/// A small xorshift generator seeded from the time: no extra dependency, a different kill
/// moment each run, and the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn from_time() -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        println!("crash test seed: {seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Starts `chatq serve` without extra environment and returns it with its base URL.
pub fn start_chatq(data_dir: &Path, extra: &[&str]) -> (Running, String) {
    start_chatq_with_env(data_dir, extra, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_jobs_survive_sigkill_at_a_random_moment() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("db");
    let mut rng = Rng::from_time();
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        let (mut child, base) = start_chatq(
            &data,
            &[
                "--rate-limit",
                "1000000",
                "--keep-completed",
                "100000000",
                "--workers",
                "2",
            ],
        );
        let http = client_for_killed_server();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut pushers = Vec::new();
        for p in 0..8 {
            let (http, base, acked, stop) = (
                http.clone(),
                base.clone(),
                acknowledged.clone(),
                stop.clone(),
            );
            pushers.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body =
                        json!({"user_id": format!("r{round}p{p}"), "prompt": format!("job {n}")});
                    let Ok(response) = http
                        .post(format!("{base}/v1/chat/jobs"))
                        .json(&body)
                        .send()
                        .await
                    else {
                        break; // the server is gone
                    };
                    if response.status() == 202 {
                        if let Ok(v) = response.json::<serde_json::Value>().await {
                            acked
                                .lock()
                                .unwrap()
                                .insert(v["id"].as_str().unwrap().to_owned());
                        }
                    }
                    n += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(150 + rng.below(600))).await;
        child.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
        child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for p in pushers {
            p.await.unwrap();
        }
        let acked = acknowledged.lock().unwrap().clone();
        assert!(
            !acked.is_empty(),
            "round {round}: some jobs were acknowledged"
        );
        let queue = chatq::store::open(
            StoreOptions::embedded(&data),
            clock::system(),
            Arc::new(chatq::signals::Signals::default()),
        )
        .await
        .unwrap();
        let mut missing = Vec::new();
        for id in &acked {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            if queue.get(uuid).await.unwrap().is_none() {
                missing.push(id.clone());
            }
        }
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} acknowledged jobs lost",
            missing.len(),
            acked.len()
        );
        println!(
            "round {round}: {} acknowledged jobs all present",
            acked.len()
        );
    }
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("db");
    let (mut first, _) = start_chatq(&data, &[]);
    let second = Command::new(env!("CARGO_BIN_EXE_chatq"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");
    assert!(stderr.contains(&data.display().to_string()), "{stderr}");
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly_and_work_continues_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("db");
    let (mut child, base) = start_chatq(&data, &[]);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/chat/jobs"))
        .json(&json!({"user_id": "t", "prompt": "later", "delay_ms": 1500}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "exit 0 after SIGTERM, got {status}");
    let (mut child, base) = start_chatq(&data, &[]);
    let job = get_json(&http, &format!("{base}/v1/chat/jobs/{id}?wait=30")).await;
    assert_eq!(
        job["status"], "completed",
        "the delayed job kept its due time and ran: {job}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
