//! Disk trouble, through the real binary on a small tmpfs:
//! - below the free-space reserve new jobs get 503 with a clear message while queued work
//!   still finishes, and they are accepted again as soon as space returns;
//! - with the reserve off, a write that fails with ENOSPC gives 503, no acknowledged job is
//!   lost, and the store is reopened (no restart) when space returns.
//!
//! Mounting the tmpfs needs root, which CI has; elsewhere the test says it was skipped.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::binary::{get_json, start_chatq_with_env};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Tmpfs {
    fn mount(size_mib: u64) -> Option<Self> {
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !root {
            eprintln!("disk trouble test skipped: mounting a tmpfs needs root (CI runs as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&mnt)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self { _dir: dir, mnt })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Fills the file system of `path` with a filler file, then gives back `leave` bytes.
fn fill_leaving(path: &Path, leave: u64) {
    let mut file = File::create(path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    let _ = file.flush();
    file.set_len(written.saturating_sub(leave)).unwrap();
}

async fn submit(http: &reqwest::Client, base: &str, n: usize) -> (u16, Value) {
    let r = http
        .post(format!("{base}/v1/chat/jobs"))
        .json(&json!({"user_id": format!("disk-{n}"), "prompt": "x".repeat(1900)}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Polls `check` every 50 ms until it holds, for at most `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_of(http: &reqwest::Client, url: &str) -> u16 {
    http.get(url).send().await.unwrap().status().as_u16()
}

async fn post(http: &reqwest::Client, url: &str) {
    let r = http.post(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_jobs_and_recovers_when_space_returns() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let data = fs.mnt.join("db");
    let filler = fs.mnt.join("filler");
    let http = reqwest::Client::new();

    // The reserve: refuse below it, keep finishing queued work, accept again when space returns.
    let args = ["--rate-limit", "1000000", "--min-free-disk-mb", "8"];
    let (mut child, base) = start_chatq_with_env(&data, &args, &[]);
    post(&http, &format!("{base}/v1/queue/pause")).await;
    let mut queued = Vec::new();
    for n in 0..5 {
        let (status, body) = submit(&http, &base, n).await;
        assert_eq!(status, 202, "{body}");
        queued.push(body["id"].as_str().unwrap().to_owned());
    }
    fill_leaving(&filler, 4 * 1024 * 1024);
    eventually(5, "the reserve is noticed", || async {
        let stats = get_json(&http, &format!("{base}/v1/queue/stats")).await;
        stats["disk"]["accepting_jobs"] == false
    })
    .await;
    let (status, body) = submit(&http, &base, 100).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "service_unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("disk is nearly full"), "{message}");
    assert!(message.contains("MiB kept in reserve"), "{message}");
    assert_eq!(status_of(&http, &format!("{base}/readyz")).await, 503);
    let stats = get_json(&http, &format!("{base}/v1/queue/stats")).await;
    assert_eq!(
        stats["waiting"], 5,
        "the refused job changed nothing: {stats}"
    );
    // Queued work still finishes below the reserve.
    post(&http, &format!("{base}/v1/queue/resume")).await;
    for id in &queued {
        let job = get_json(&http, &format!("{base}/v1/chat/jobs/{id}?wait=20")).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    std::fs::remove_file(&filler).unwrap();
    eventually(5, "new jobs accepted once space is back", || async {
        submit(&http, &base, 101).await.0 == 202
    })
    .await;
    assert_eq!(status_of(&http, &format!("{base}/readyz")).await, 200);
    child.kill().unwrap();
    child.wait().unwrap();

    // No reserve: sled itself hits ENOSPC. 503, nothing acknowledged lost, reopened in place.
    let args = ["--rate-limit", "1000000", "--min-free-disk-mb", "0"];
    let (mut child, base) = start_chatq_with_env(&data, &args, &[]);
    post(&http, &format!("{base}/v1/queue/pause")).await;
    fill_leaving(&filler, 256 * 1024);
    let mut acked = Vec::new();
    let refused = loop {
        assert!(acked.len() < 20_000, "the disk never filled");
        let (status, body) = submit(&http, &base, 1_000 + acked.len()).await;
        match status {
            202 => acked.push(body["id"].as_str().unwrap().to_owned()),
            503 => break body,
            other => panic!("a full disk answered {other}: {body}"),
        }
    };
    assert!(!acked.is_empty(), "some jobs fit before the disk filled");
    assert_eq!(refused["error"]["code"], "service_unavailable", "{refused}");
    let (status, body) = submit(&http, &base, 99_999).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("recovering"),
        "{body}"
    );
    assert_eq!(status_of(&http, &format!("{base}/readyz")).await, 503);
    let stats = get_json(&http, &format!("{base}/v1/queue/stats")).await;
    assert!(
        stats["disk"]["failure"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{stats}"
    );
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let (status, body) = submit(&http, &base, 100_000).await;
        if status == 202 {
            break body["id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the store did not reopen once space was back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    acked.push(after);
    let stats = get_json(&http, &format!("{base}/v1/queue/stats")).await;
    assert_eq!(stats["disk"]["reopens"], 1, "{stats}");
    assert_eq!(stats["disk"]["failure"], Value::Null, "{stats}");
    assert_eq!(status_of(&http, &format!("{base}/readyz")).await, 200);
    for id in &acked {
        let job = get_json(&http, &format!("{base}/v1/chat/jobs/{id}")).await;
        assert_eq!(job["status"], "queued", "acknowledged job {id} kept: {job}");
    }

    // And all of it is on disk: a crash now loses nothing.
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, base) = start_chatq_with_env(&data, &args, &[]);
    for id in &acked {
        let job = get_json(&http, &format!("{base}/v1/chat/jobs/{id}")).await;
        assert_eq!(
            job["id"],
            id.as_str(),
            "acknowledged job {id} survives a crash"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
