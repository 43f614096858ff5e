//! The real binary on the PostgreSQL store: two replicas on one database share the queue,
//! the jobs, the log and the pause state, and what one acknowledged survives a SIGKILL.
//! Needs `CHATQ_TEST_DATABASE_URL` (`.ci/run` sets it); unset, the test says so and passes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::binary::{get_json, start_chatq_with_env};
use crate::helpers::wait_until_drained;

/// A database of its own for this test, dropped at the end.
struct Database {
    admin: tokio_postgres::Client,
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var("CHATQ_TEST_DATABASE_URL") else {
            // Straight to stderr: the test harness captures `println!` of passing tests.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "PostgreSQL end-to-end test skipped: CHATQ_TEST_DATABASE_URL is unset"
            );
            return None;
        };
        let (admin, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .expect("the test database server answers");
        tokio::spawn(connection);
        let name = format!("chatq_e2e_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut url = reqwest::Url::parse(&admin_url).unwrap();
        url.set_path(&format!("/{name}"));
        Some(Self {
            admin,
            name,
            url: url.to_string(),
        })
    }

    async fn drop_it(self) {
        let _ = self
            .admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = http.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_queue_log_and_pause_state_across_a_sigkill() {
    let Some(db) = Database::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let args = ["--database-url", db.url.as_str(), "--lease-secs", "3"];
    let (mut a, base_a) = start_chatq_with_env(&dir.path().join("a"), &args, &[]);
    let (mut b, base_b) = start_chatq_with_env(&dir.path().join("b"), &args, &[]);
    let http = reqwest::Client::new();

    // A job accepted by A is visible on B, and B's long-poll sees it finish wherever it ran.
    let (status, accepted) = post(
        &http,
        &format!("{base_a}/v1/chat/jobs"),
        &json!({"user_id": "ann", "guild_id": "g1", "prompt": "hello there"}),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_str().unwrap().to_owned();
    let job = get_json(&http, &format!("{base_b}/v1/chat/jobs/{id}?wait=10")).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["result"]["used_fallback"], true);

    let stats = get_json(&http, &format!("{base_b}/v1/queue/stats")).await;
    assert_eq!(stats["backend"], "postgres", "{stats}");
    assert_eq!(stats["completed"], 1, "{stats}");
    assert!(stats["disk"].is_null(), "{stats}");
    let log = get_json(&http, &format!("{base_a}/v1/interactions?user_id=ann")).await;
    assert_eq!(log["data"].as_array().unwrap().len(), 1, "{log}");
    assert_eq!(log["data"][0]["job_id"], id.as_str());

    // Streamed replies end, whichever replica's worker ran the job.
    let streaming = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for i in 0..6 {
        let response = streaming
            .post(format!("{base_b}/v1/chat/completions"))
            .json(
                &json!({"model": "chatq-helpful", "stream": true, "user": format!("s{i}"),
                "messages": [{"role": "user", "content": "stream me"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("the stream ends in time");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
    }

    // Pausing through one replica pauses them all.
    let (status, _) = post(&http, &format!("{base_a}/v1/queue/pause"), &json!({})).await;
    assert_eq!(status, 200);
    let (status, queued) = post(
        &http,
        &format!("{base_b}/v1/chat/jobs"),
        &json!({"user_id": "ben", "prompt": "while paused"}),
    )
    .await;
    assert_eq!(status, 202, "{queued}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stats = get_json(&http, &format!("{base_a}/v1/queue/stats")).await;
    assert_eq!(
        (stats["paused"].clone(), stats["queued"].clone()),
        (json!(true), json!(1)),
        "{stats}"
    );

    // With A killed, B runs the shared queue alone; a restarted A reads the same store.
    a.kill().unwrap();
    a.wait().unwrap();
    let (status, _) = post(&http, &format!("{base_b}/v1/queue/resume"), &json!({})).await;
    assert_eq!(status, 200);
    wait_until_drained(&http, &base_b, 20).await;
    let queued_id = queued["id"].as_str().unwrap();
    let job = get_json(&http, &format!("{base_b}/v1/chat/jobs/{queued_id}")).await;
    assert_eq!(job["status"], "completed", "{job}");
    let (mut a, base_a) = start_chatq_with_env(&dir.path().join("a"), &args, &[]);
    let job = get_json(&http, &format!("{base_a}/v1/chat/jobs/{id}")).await;
    assert_eq!(
        job["status"], "completed",
        "the restarted replica reads the same store"
    );
    let log = get_json(&http, &format!("{base_a}/v1/interactions")).await;
    assert_eq!(log["data"].as_array().unwrap().len(), 8, "{log}");

    for child in [&mut a, &mut b] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    db.drop_it().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_limit_holds_exactly_across_three_replicas() {
    let Some(db) = Database::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let args = ["--database-url", db.url.as_str(), "--rate-limit", "10"];
    let replicas: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| start_chatq_with_env(&dir.path().join(name), &args, &[]))
        .collect();
    let http = reqwest::Client::new();
    let submits: Vec<_> = (0..30)
        .map(|i| {
            let url = format!("{}/v1/chat/jobs", replicas[i % 3].1);
            let http = http.clone();
            tokio::spawn(async move {
                let response = http
                    .post(url)
                    .json(&json!({"user_id": "carol", "prompt": format!("question {i}")}))
                    .send()
                    .await
                    .unwrap();
                let retry_after = response.headers().get("retry-after").is_some();
                (response.status().as_u16(), retry_after)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for s in submits {
        answers.push(s.await.unwrap());
    }
    let accepted = answers.iter().filter(|(s, _)| *s == 202).count();
    let refused = answers.iter().filter(|(s, ra)| *s == 429 && *ra).count();
    assert_eq!((accepted, refused), (10, 20), "{answers:?}");
    // Another user is not affected, on any replica.
    let (status, _) = post(
        &http,
        &format!("{}/v1/chat/jobs", replicas[2].1),
        &json!({"user_id": "dave", "prompt": "hi"}),
    )
    .await;
    assert_eq!(status, 202);
    for (mut child, _) in replicas {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    db.drop_it().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_reply_runs_on_the_replica_that_accepted_it() {
    use crate::helpers::{MockUpstream, Reply};
    let Some(db) = Database::create().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    // The first request holds B's only worker for 2 s; everything after answers at once.
    upstream.script([Reply::slow("slow one", Duration::from_secs(2))]);
    let env = upstream.env();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--database-url", db.url.as_str(), "--workers", "1"];
    let (mut b, base_b) = start_chatq_with_env(&dir.path().join("b"), &args, &env);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let (status, _) = post(
        &http,
        &format!("{base_b}/v1/chat/jobs"),
        &json!({"user_id": "u", "prompt": "take your time"}),
    )
    .await;
    assert_eq!(status, 202);
    while upstream.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A's worker is free, B's busy: a job any replica could claim would go to A and reach
    // B's client whole, at the end. The streamed one is B's to run.
    let (mut a, _base_a) = start_chatq_with_env(&dir.path().join("a"), &args, &env);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = http
        .post(format!("{base_b}/v1/chat/completions"))
        .json(&json!({"stream": true, "messages": [{"role": "user", "content": "quick"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("the stream ends");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let pieces: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        pieces,
        ["mock ", "reply"],
        "streamed piece by piece: {text}"
    );
    let requests = upstream.requests();
    assert_eq!(
        requests.last().unwrap().1["stream"],
        true,
        "asked upstream to stream"
    );
    for child in [&mut a, &mut b] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    db.drop_it().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_hears_of_another_replicas_finish_within_200_ms() {
    use crate::helpers::{MockUpstream, Reply};
    let Some(db) = Database::create().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::slow("slow one", Duration::from_secs(20))]);
    let env = upstream.env();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--database-url", db.url.as_str(), "--workers", "1"];
    let (mut a, base_a) = start_chatq_with_env(&dir.path().join("a"), &args, &env);
    let http = reqwest::Client::new();
    let (status, _) = post(
        &http,
        &format!("{base_a}/v1/chat/jobs"),
        &json!({"user_id": "hold", "prompt": "keep a's worker busy"}),
    )
    .await;
    assert_eq!(status, 202);
    while upstream.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // From now on only B's worker is free: jobs submitted to A run on B.
    let (mut b, _base_b) = start_chatq_with_env(&dir.path().join("b"), &args, &env);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..5 {
        let (status, accepted) = post(
            &http,
            &format!("{base_a}/v1/chat/jobs"),
            &json!({"user_id": format!("u{i}"), "prompt": "quick"}),
        )
        .await;
        assert_eq!(status, 202);
        let id = accepted["id"].as_str().unwrap().to_owned();
        let job = get_json(&http, &format!("{base_a}/v1/chat/jobs/{id}?wait=10")).await;
        let heard = std::time::SystemTime::now();
        assert_eq!(job["status"], "completed", "{job}");
        let finished = humantime::parse_rfc3339(job["finished_at"].as_str().unwrap()).unwrap();
        let lag = heard.duration_since(finished).unwrap_or_default();
        println!("job {i}: A heard of B's finish after {lag:?}");
        assert!(lag < Duration::from_millis(200), "job {i}: {lag:?}");
    }
    for child in [&mut a, &mut b] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    db.drop_it().await;
}

/// A TCP proxy to the test database that can be cut (every connection closed, new ones
/// refused) and restored: a database outage for one chatq, not for the other tests.
struct Proxy {
    addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<tokio::sync::Notify>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let cut = std::sync::Arc::new(tokio::sync::Notify::new());
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let cut = cut2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        Self { addr, up, cut }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_gives_documented_503s_and_everything_acknowledged_finishes() {
    use std::sync::{Arc, Mutex};
    let Some(db) = Database::create().await else {
        return;
    };
    let mut through = reqwest::Url::parse(&db.url).unwrap();
    let target = format!(
        "{}:{}",
        through.host_str().unwrap(),
        through.port().unwrap_or(5432)
    );
    let target: std::net::SocketAddr = tokio::net::lookup_host(target)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start(target).await;
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.addr.port())).unwrap();
    let url = through.to_string();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--database-url",
        url.as_str(),
        "--lease-secs",
        "3",
        "--rate-limit",
        "1000000",
        "--keep-completed",
        "1000000",
    ];
    let (mut chatq, base) = start_chatq_with_env(&dir.path().join("a"), &args, &[]);
    let http = crate::helpers::client_for_killed_server();
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let answers = Arc::new(Mutex::new(Vec::<(u16, String)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pushers: Vec<_> = (0..4)
        .map(|p| {
            let (http, base) = (http.clone(), base.clone());
            let (acknowledged, answers, stop) =
                (acknowledged.clone(), answers.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 2_000 {
                    let sent = http
                        .post(format!("{base}/v1/chat/jobs"))
                        .json(&json!({"user_id": format!("p{p}"), "prompt": format!("job {n}")}))
                        .send()
                        .await;
                    let response = sent.expect("chatq itself stays up and answers");
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    if status == 202 {
                        acknowledged
                            .lock()
                            .unwrap()
                            .push(body["id"].as_str().unwrap().to_owned());
                    } else {
                        let code = body["error"]["code"].as_str().unwrap_or("-").to_owned();
                        answers.lock().unwrap().push((status, code));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    n += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status().as_u16(),
        503,
        "/readyz says the store is gone"
    );
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for p in pushers {
        p.await.unwrap();
    }
    let refused = answers.lock().unwrap().clone();
    assert!(!refused.is_empty(), "the outage was seen by the submitters");
    for (status, code) in &refused {
        assert_eq!(
            (*status, code.as_str()),
            (503, "store_unavailable"),
            "{refused:?}"
        );
    }
    let acked = acknowledged.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "jobs were accepted before and after: {}",
        acked.len()
    );
    // Everything acknowledged finishes once the database is back (jobs cut off mid-run come
    // back when their 3 s lease runs out).
    crate::helpers::wait_until_drained(&http, &base, 30).await;
    for id in &acked {
        let job = get_json(&http, &format!("{base}/v1/chat/jobs/{id}")).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    // A push whose commit reached the server while the cut took its answer got a 503 and
    // ran anyway: the ambiguity of any commit over a network (a retry with the same
    // idempotency_key makes it harmless). Only those can be extra.
    let stats = get_json(&http, &format!("{base}/v1/queue/stats")).await;
    let completed = stats["completed"].as_u64().unwrap() as usize;
    assert!(
        completed >= acked.len() && completed - acked.len() <= refused.len(),
        "{completed} completed, {} acknowledged: {stats}",
        acked.len()
    );
    let (admin, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let entries: i64 = admin
        .query_one("SELECT count(DISTINCT job_id) FROM chatq_interactions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(entries as usize, completed, "one log entry per job");
    println!(
        "{} acknowledged, {} refused with 503 store_unavailable during the outage, {} of those committed all the same",
        acked.len(),
        refused.len(),
        completed - acked.len()
    );
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "ready again by itself");
    chatq.kill().unwrap();
    chatq.wait().unwrap();
    db.drop_it().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_killed_mid_run_lose_nothing_and_log_each_job_once() {
    use crate::helpers::{MockUpstream, Reply};
    use std::sync::{Arc, Mutex};
    let Some(db) = Database::create().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    // Slow enough that jobs are in flight on every replica when one dies.
    upstream.set_default(Reply::slow("done", Duration::from_millis(40)));
    let env = upstream.env();
    let dir = tempfile::tempdir().unwrap();
    let lease_secs = 3;
    let start = |name: &str| {
        let lease = lease_secs.to_string();
        let args = [
            "--database-url",
            db.url.as_str(),
            "--lease-secs",
            lease.as_str(),
            "--replica-name",
            name,
            "--rate-limit",
            "1000000",
            "--keep-completed",
            "1000000",
            "--workers",
            "8",
        ];
        start_chatq_with_env(&dir.path().join(name), &args, &env)
    };
    let mut replicas = vec![start("a"), start("b"), start("c")];
    let bases: Vec<String> = replicas.iter().map(|(_, base)| base.clone()).collect();
    let http = crate::helpers::client_for_killed_server();
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let submitters: Vec<_> = (0..64)
        .map(|s| {
            let (http, base) = (http.clone(), bases[s % 3].clone());
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                for n in 0..25 {
                    let sent = http
                        .post(format!("{base}/v1/chat/jobs"))
                        .json(&json!({"user_id": format!("s{s}"), "prompt": format!("job {n}")}))
                        .send()
                        .await;
                    // Submitters of the killed replica see it go: those requests were never
                    // acknowledged.
                    let Ok(response) = sent else { continue };
                    if response.status() == 202 {
                        let body: Value = response.json().await.unwrap();
                        acknowledged
                            .lock()
                            .unwrap()
                            .push(body["id"].as_str().unwrap().to_owned());
                    }
                }
            })
        })
        .collect();
    // Kill A once it runs jobs.
    let (admin, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    loop {
        let running: i64 = admin
            .query_one(
                "SELECT count(*) FROM chatq_jobs WHERE state = 'active' AND lease_owner = 'a'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replicas[0].0.kill().unwrap();
    replicas[0].0.wait().unwrap();
    let killed_at = std::time::SystemTime::now();
    for s in submitters {
        s.await.unwrap();
    }
    replicas[0] = start("a");
    let acked = acknowledged.lock().unwrap().clone();
    assert!(acked.len() > 500, "{} acknowledged", acked.len());
    crate::helpers::wait_until_drained(&http, &bases[1], 60).await;

    // Every acknowledged job finished, each with exactly one log entry, and nothing else ran
    // twice to the log.
    let rows = admin
        .query(
            "SELECT j.id::text, j.state, j.rescues, j.finished_at,
                    (SELECT count(*) FROM chatq_interactions i WHERE i.job_id = j.id)
             FROM chatq_jobs j",
            &[],
        )
        .await
        .unwrap();
    let mut states = std::collections::HashMap::new();
    let mut rescued_finish = Vec::new();
    for row in &rows {
        let (id, state, rescues, finished_at, entries): (String, String, i32, Option<i64>, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(entries, 1, "job {id} ({state}) has {entries} log entries");
        if rescues > 0 {
            rescued_finish.push(finished_at.unwrap_or_default());
        }
        states.insert(id, state);
    }
    for id in &acked {
        let state = states.get(id).map(String::as_str);
        assert!(
            matches!(state, Some("completed") | Some("failed")),
            "acknowledged job {id} is {state:?}"
        );
    }
    assert!(!rescued_finish.is_empty(), "A died with jobs in flight");
    let killed_ms = killed_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let slowest = rescued_finish.iter().max().unwrap() - killed_ms;
    println!(
        "{} acknowledged, {} of A's jobs finished elsewhere, the last {slowest} ms after the kill",
        acked.len(),
        rescued_finish.len()
    );
    // Rescued by the lease's end, not by a replica that happened to look much later: the
    // margin is generous because a loaded machine (CI) runs the other replicas slowly too,
    // while a rescue that waited for something else would take far longer than this.
    assert!(
        slowest < (lease_secs as i64 + 30) * 1_000,
        "A's jobs finished {slowest} ms after the kill; the lease is {lease_secs} s"
    );
    for (child, _) in &mut replicas {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    db.drop_it().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_response_cache_across_a_sigkill() {
    use crate::helpers::{MockUpstream, Reply};
    let Some(db) = Database::create().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::text("Pinned in #welcome."));
    let env = upstream.env();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--database-url", db.url.as_str(), "--cache-ttl-secs", "600"];
    let (mut a, base_a) = start_chatq_with_env(&dir.path().join("a"), &args, &env);
    let (mut b, base_b) = start_chatq_with_env(&dir.path().join("b"), &args, &env);
    let http = reqwest::Client::new();
    let ask = |base: String| {
        let http = http.clone();
        async move {
            let response = http
                .post(format!("{base}/v1/chat/jobs"))
                .json(&json!({"user_id": "u", "guild_id": "g", "prompt": "Where are the rules?"}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            let verdict = response.headers()["x-chatq-cache"]
                .to_str()
                .unwrap()
                .to_owned();
            let id = response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned();
            let job = get_json(&http, &format!("{base}/v1/chat/jobs/{id}?wait=10")).await;
            assert_eq!(job["status"], "completed", "{job}");
            (verdict, job)
        }
    };
    let (verdict, first) = ask(base_a.clone()).await;
    assert_eq!(verdict, "miss");
    // The replica that stored it dies; the entry is the database's.
    a.kill().unwrap();
    a.wait().unwrap();
    let (verdict, second) = ask(base_b.clone()).await;
    assert_eq!(verdict, "hit", "B answers from the entry A stored");
    assert_eq!(second["result"]["cached"], true);
    assert_eq!(second["result"]["reply"], first["result"]["reply"]);
    assert_eq!(upstream.request_count(), 1);
    let stats = get_json(&http, &format!("{base_b}/v1/queue/stats")).await;
    assert_eq!(stats["cache"]["entries"], 1, "{stats}");
    b.kill().unwrap();
    b.wait().unwrap();
    db.drop_it().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_settings_and_conversations_are_shared_by_replicas() {
    use crate::helpers::{MockUpstream, Reply};
    let Some(db) = Database::create().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let env = upstream.env();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--database-url", db.url.as_str()];
    let (mut a, base_a) = start_chatq_with_env(&dir.path().join("a"), &args, &env);
    let (mut b, base_b) = start_chatq_with_env(&dir.path().join("b"), &args, &env);
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{base_a}/v1/guilds/g1"))
        .json(&json!({"model": "guild-model", "instructions": "Speak like a pirate.", "daily_token_quota": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let ask = |base: &str, prompt: &str| {
        let (http, url) = (http.clone(), format!("{base}/v1/chat/jobs"));
        let body =
            json!({"user_id": "ann", "guild_id": "g1", "conversation_id": "c", "prompt": prompt});
        async move {
            let response = http.post(&url).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            let quota = response
                .headers()
                .get("x-quota-remaining")
                .map(|v| v.to_str().unwrap().to_owned());
            let accepted: Value = response.json().await.unwrap();
            (status, quota, accepted)
        }
    };
    upstream.script([Reply::text("Ahoy, Ann!")]);
    let (status, quota, accepted) = ask(&base_a, "I am Ann.").await;
    assert_eq!((status, quota.as_deref()), (202, Some("20")), "{accepted}");
    let id = accepted["id"].as_str().unwrap();
    let job = get_json(&http, &format!("{base_a}/v1/chat/jobs/{id}?wait=10")).await;
    assert_eq!(job["status"], "completed", "{job}");
    // B: the settings A saved, the conversation A's job continued, the tokens it spent.
    let (status, quota, accepted) = ask(&base_b, "Who am I?").await;
    assert_eq!(
        (status, quota.as_deref()),
        (202, Some("2")),
        "18 of 20 tokens spent on A"
    );
    let id = accepted["id"].as_str().unwrap();
    get_json(&http, &format!("{base_b}/v1/chat/jobs/{id}?wait=10")).await;
    let sent = upstream.requests().last().unwrap().1.clone();
    assert_eq!(sent["model"], "guild-model");
    assert!(
        sent["messages"][0]["content"]
            .as_str()
            .unwrap()
            .ends_with("Speak like a pirate.")
    );
    assert_eq!(sent["messages"][1]["content"], "I am Ann.");
    assert_eq!(sent["messages"][2]["content"], "Ahoy, Ann!");
    let (status, _, refused) = ask(&base_a, "again").await;
    assert_eq!(
        status, 429,
        "the quota is one count across replicas: {refused}"
    );
    assert_eq!(refused["error"]["code"], "quota_exceeded");
    for child in [&mut a, &mut b] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    db.drop_it().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discord_reply_owed_by_a_killed_replica_is_delivered_once_by_another() {
    use crate::discord::{FakeDiscord, ask, binary_flags, interact_with, now_secs};
    use crate::helpers::{MockUpstream, Reply};
    let Some(db) = Database::create().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    // Still running when the replica that took the interaction dies.
    upstream.set_default(Reply::slow(
        "Shared, like the queue.",
        Duration::from_millis(1_500),
    ));
    let (fake, api) = FakeDiscord::start().await;
    let env = upstream.env();
    let dir = tempfile::tempdir().unwrap();
    let discord = binary_flags(&api);
    let start = |name: &str| {
        let mut args = vec![
            "--database-url",
            db.url.as_str(),
            "--lease-secs",
            "3",
            "--replica-name",
            name,
        ];
        args.extend(discord.iter().map(String::as_str));
        start_chatq_with_env(&dir.path().join(name), &args, &env)
    };
    let (mut a, base_a) = start("a");
    let (mut b, base_b) = start("b");
    let http = crate::helpers::client_for_killed_server();
    let (status, body) = interact_with(&http, &base_a, &ask("tok-pg", "hello"), now_secs()).await;
    assert_eq!((status, body), (200, json!({"type": 5})));
    // A has taken the delivery up and parked it on the unfinished job; then it dies.
    let stats = loop {
        let stats = get_json(&http, &format!("{base_b}/v1/jobs?state=active")).await;
        if !stats["data"].as_array().unwrap().is_empty() {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let id = stats["data"][0]["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(400)).await;
    a.kill().unwrap();
    a.wait().unwrap();
    assert!(fake.calls().is_empty(), "nothing sent before the reply");
    // B finishes the job (its own or, after A's lease, A's) and sends the reply.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let job = loop {
        let job = get_json(&http, &format!("{base_b}/v1/chat/jobs/{id}")).await;
        if job["deliveries"][0]["state"] == "delivered" {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "not delivered: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["status"], "completed");
    let calls = fake.calls();
    assert_eq!(calls.len(), 1, "one edit, sent once: {calls:?}");
    assert_eq!(calls[0].1, "app-1/tok-pg/original");
    assert_eq!(calls[0].2["content"], "Shared, like the queue.");
    b.kill().unwrap();
    b.wait().unwrap();
    db.drop_it().await;
}
