//! The chatq binary as a process, for the tests and benchmarks that need the real thing
//! (crashes, signals, load). Also included by `benches/http.rs` through `#[path]`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// A running chatq, killed (SIGKILL) when dropped: a test that fails halfway leaves no server
/// behind holding its port and database connections (left running, they once used up
/// PostgreSQL's connections for every test after them). Use it as the `Child` it holds.
pub struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Already gone (a test killed or stopped it): both just fail.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `chatq serve` on a free loopback port over `data_dir`, with `extra` flags and `env`
/// variables (no API key unless `env` sets one), and returns it with the base URL read from
/// its `listening on` line.
pub fn start_chatq_with_env(
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, String)],
) -> (Running, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatq"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env_remove("OPENAI_API_KEY")
        .env("RUST_LOG", "warn,chatq::app=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = Running(command.spawn().expect("start chatq"));
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("chatq exited before listening")
            .expect("read chatq's log");
        if let Some(pos) = line.find("listening on http://") {
            break line[pos + "listening on ".len()..].trim().to_owned();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

/// `GET url` and its JSON body.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url)
        .send()
        .await
        .expect("request sent")
        .json()
        .await
        .expect("a JSON body")
}

/// A memory figure (`VmRSS:`, `VmHWM:`) of process `pid` (or `self`) in KiB; 0 if unreadable.
pub fn proc_status_kib(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
}
