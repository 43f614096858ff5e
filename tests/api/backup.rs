//! `chatq backup` against a running server under load, `chatq restore` into a new directory,
//! and `serve` on it: every job acknowledged before the backup began is there, with the
//! interaction log, guild settings and conversations.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::binary::{get_json, start_chatq_with_env};
use crate::helpers::{MockUpstream, Reply};

fn chatq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chatq"))
        .args(args)
        .output()
        .expect("run chatq")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_acknowledged_job_and_the_log() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::slow("answer", Duration::from_millis(5)));
    let env = upstream.env();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--workers",
        "2",
        "--rate-limit",
        "1000000",
        "--keep-completed",
        "100000",
    ];
    let (mut server, base) = start_chatq_with_env(&dir.path().join("live"), &args, &env);
    let http = reqwest::Client::new();
    let submit = {
        let (http, base) = (http.clone(), base.clone());
        move |user: String, extra: Value| {
            let (http, url) = (http.clone(), format!("{base}/v1/chat/jobs"));
            async move {
                let mut body = json!({"user_id": user, "guild_id": "g1", "prompt": "hello"});
                body.as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                let response = http.post(&url).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 202);
                response.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
        }
    };
    let put = http
        .put(format!("{base}/v1/guilds/g1"))
        .json(&json!({"model": "kept-model", "history_turns": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let first = submit(
        "ann".into(),
        json!({"conversation_id": "c1", "prompt": "I am Ann."}),
    )
    .await;
    get_json(&http, &format!("{base}/v1/chat/jobs/{first}?wait=10")).await;
    let mut acknowledged = vec![first];
    for i in 0..300 {
        acknowledged.push(submit(format!("u{i}"), json!({})).await);
    }
    // Load goes on while the backup is taken.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let stop = stop.clone();
        let submit = submit.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                submit(format!("load{n}"), json!({})).await;
                n += 1;
            }
            n
        })
    };
    let finished_before: Vec<Value> = get_json(&http, &format!("{base}/v1/interactions?limit=500"))
        .await["data"]
        .as_array()
        .unwrap()
        .clone();
    let file = dir.path().join("chatq.backup");
    let backup = tokio::task::spawn_blocking({
        let (base, file) = (base.clone(), file.clone());
        move || chatq(&["backup", "--server", &base, "--to", file.to_str().unwrap()])
    })
    .await
    .unwrap();
    stop.cancel();
    let submitted_during = load.await.unwrap();
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let summary: Value = serde_json::from_slice(&backup.stdout).unwrap();
    assert!(summary["entries"].as_u64().unwrap() > 300, "{summary}");
    assert!(!dir.path().join("chatq.partial").exists());
    server.kill().unwrap();
    server.wait().unwrap();

    let restored_dir = dir.path().join("restored");
    let restored_dir_text = restored_dir.to_str().unwrap();
    let restore = chatq(&[
        "restore",
        "--from",
        file.to_str().unwrap(),
        "--data-dir",
        restored_dir_text,
    ]);
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    let again = chatq(&[
        "restore",
        "--from",
        file.to_str().unwrap(),
        "--data-dir",
        restored_dir_text,
    ]);
    assert!(!again.status.success(), "a non-empty directory is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    let (mut restored, base) = start_chatq_with_env(&restored_dir, &args, &env);
    for id in &acknowledged {
        let job = get_json(&http, &format!("{base}/v1/chat/jobs/{id}?wait=30")).await;
        assert_eq!(
            job["status"], "completed",
            "acknowledged before the backup: {job}"
        );
    }
    let log: Vec<Value> = {
        let mut entries = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{base}/v1/interactions?limit=500");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page = get_json(&http, &url).await;
            entries.extend(page["data"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break entries,
            }
        }
    };
    let logged: HashSet<&str> = log.iter().map(|e| e["job_id"].as_str().unwrap()).collect();
    for entry in &finished_before {
        assert!(
            logged.contains(entry["job_id"].as_str().unwrap()),
            "a log entry written before the backup is in it: {entry}"
        );
    }
    for id in &acknowledged {
        assert!(
            logged.contains(id.as_str()),
            "every acknowledged job is logged once it finished"
        );
    }
    let guild = get_json(&http, &format!("{base}/v1/guilds/g1")).await;
    assert_eq!(guild["settings"]["model"], "kept-model");
    let conversation = get_json(&http, &format!("{base}/v1/conversations/c1?guild_id=g1")).await;
    assert_eq!(conversation["turns"][0]["prompt"], "I am Ann.");
    println!(
        "backup of {} entries while {submitted_during} jobs were submitted",
        summary["entries"]
    );
    restored.kill().unwrap();
    restored.wait().unwrap();
}
