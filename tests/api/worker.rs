//! The chat bot and worker against a mock upstream, driven step by step with a manual clock
//! (`Worker::process_next`), plus the pool's concurrency bound and shutdown.

use std::sync::Arc;
use std::time::Duration;

use chatq::bot::{ChatBot, Personalities, Upstream};
use chatq::cache::ResponseCache;
use chatq::clock::{self, ManualClock, SharedClock};
use chatq::domain::{JobState, LogQuery, Message, NewJob, Role};
use chatq::metrics::Metrics;
use chatq::signals::Signals;
use chatq::store::{Store, StoreError, StoreOptions};
use chatq::worker::{FailurePolicy, Processed, Worker, WorkerConfig, WorkerPool};
use tokio_util::sync::CancellationToken;

use crate::helpers::{MockUpstream, Reply, TEST_KEY};

const T0: u64 = 1_900_000_000_000;

struct Rig {
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    queue: Arc<dyn Store>,
    worker: Worker,
}

/// Opens the embedded store in `path`, as chatq does. A store dropped a moment ago may still
/// be closing its files on sled's background threads, so this retries briefly.
pub async fn open_store(
    path: &std::path::Path,
    clock: SharedClock,
    signals: Arc<Signals>,
) -> Arc<dyn Store> {
    for _ in 0..100 {
        match chatq::store::open(StoreOptions::embedded(path), clock.clone(), signals.clone()).await
        {
            Err(StoreError::InUse { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
            other => return other.unwrap(),
        }
    }
    panic!("store still locked after 2 s")
}

async fn rig_with(
    upstream: Option<&MockUpstream>,
    timeout: Duration,
    policy: FailurePolicy,
) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let shared: SharedClock = clock.clone();
    let signals = Arc::new(Signals::default());
    let queue = open_store(dir.path(), shared.clone(), signals.clone()).await;
    let upstream = upstream.map(|u| Upstream::new(u.config(timeout)).unwrap());
    let bot = Arc::new(ChatBot::new(
        upstream,
        Personalities::builtin(),
        shared.clone(),
        "mock-model",
    ));
    let config = WorkerConfig {
        on_upstream_failure: policy,
        ..WorkerConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    let cache = cache_off(&queue, &bot, &metrics, &shared);
    let worker = Worker::new(queue.clone(), signals, bot, cache, metrics, shared, config);
    Rig {
        _dir: dir,
        clock,
        queue,
        worker,
    }
}

async fn rig(upstream: &MockUpstream) -> Rig {
    rig_with(Some(upstream), Duration::from_secs(5), FailurePolicy::Fail).await
}

async fn push(rig: &Rig, new: NewJob) -> uuid::Uuid {
    rig.queue.push(new).await.unwrap().job.id
}

#[tokio::test]
async fn request_carries_system_prompt_model_tokens_temperature_and_cut_history() {
    let upstream = MockUpstream::start().await;
    let rig = rig(&upstream).await;
    for (i, (personality, temperature)) in [
        ("helpful", 0.7),
        ("sarcastic", 0.9),
        ("professional", 0.5),
        ("creative", 1.0),
        ("technical", 0.6),
    ]
    .into_iter()
    .enumerate()
    {
        let mut new = NewJob::prompt("u1", "what now?");
        new.guild_id = Some("guild-77".into());
        new.request.personality = Some(personality.into());
        new.request.history = (0..14)
            .map(|n| Message {
                role: if n % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                },
                content: format!("h{n}"),
            })
            .collect();
        push(&rig, new).await;
        let Processed::Completed(job) = rig.worker.process_next().await.unwrap() else {
            panic!("expected completion");
        };
        assert_eq!(job.result.unwrap().reply, "mock reply");
        let (headers, body) = &upstream.requests()[i];
        assert_eq!(
            headers["authorization"].to_str().unwrap(),
            format!("Bearer {TEST_KEY}")
        );
        assert_eq!(body["model"], "mock-model");
        assert_eq!(body["max_tokens"], 180);
        assert!(
            (body["temperature"].as_f64().unwrap() - temperature).abs() < 1e-6,
            "{personality}"
        );
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 12, "system + last 10 history + prompt");
        assert_eq!(msgs[0]["role"], "system");
        let system = msgs[0]["content"].as_str().unwrap();
        assert!(system.contains("guild-77"));
        assert_eq!(msgs[1]["content"], "h4");
        assert_eq!(msgs[11]["content"], "what now?");
    }
    // Without a guild, the generic assistant.
    push(&rig, NewJob::prompt("u1", "hi")).await;
    rig.worker.process_next().await.unwrap();
    let (_, body) = upstream.requests().pop().unwrap();
    let system = body["messages"][0]["content"].as_str().unwrap().to_owned();
    assert!(system.starts_with("You are a concise, helpful assistant."));
    assert!(!system.contains("guild"));
}

#[tokio::test]
async fn a_500_is_retried_with_backoff_then_fails_with_openai_error() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::status(500, "upstream boom"));
    let rig = rig(&upstream).await;
    let id = push(&rig, NewJob::prompt("u", "hi")).await;
    let Processed::Retried { at, job } = rig.worker.process_next().await.unwrap() else {
        panic!("first failure is retried")
    };
    assert_eq!(at, T0 + 2_000);
    assert_eq!(job.attempts, 1);
    assert!(matches!(
        rig.worker.process_next().await.unwrap(),
        Processed::Empty
    ));
    rig.clock.advance(2_000);
    let Processed::Retried { at, .. } = rig.worker.process_next().await.unwrap() else {
        panic!("second failure is retried")
    };
    assert_eq!(at, T0 + 2_000 + 4_000, "backoff doubles");
    rig.clock.advance(4_000);
    let Processed::Failed(job) = rig.worker.process_next().await.unwrap() else {
        panic!("third failure is final")
    };
    assert_eq!(job.attempts, 3);
    let error = job.error.unwrap();
    assert_eq!(error.code, "openai_error");
    assert_eq!(error.status, Some(500));
    assert!(error.message.contains("upstream boom"));
    assert_eq!(upstream.request_count(), 3);
    let log = rig
        .queue
        .query(&LogQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(log.entries.len(), 1, "one entry per attempt chain");
    assert_eq!(log.entries[0].job_id, id);
    assert_eq!(log.entries[0].error_code.as_deref(), Some("openai_error"));
}

#[tokio::test]
async fn a_429_with_retry_after_is_not_retried_before_it() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::Status {
        status: 429,
        body: "slow down".into(),
        retry_after: Some("3".into()),
    }]);
    let rig = rig(&upstream).await;
    push(&rig, NewJob::prompt("u", "hi")).await;
    let Processed::Retried { at, .. } = rig.worker.process_next().await.unwrap() else {
        panic!("429 is transient")
    };
    assert_eq!(at, T0 + 3_000, "Retry-After (3 s) beats the 2 s backoff");
    rig.clock.advance(2_999);
    assert!(matches!(
        rig.worker.process_next().await.unwrap(),
        Processed::Empty
    ));
    assert_eq!(upstream.request_count(), 1, "no retry before 3 s");
    rig.clock.advance(1);
    assert!(matches!(
        rig.worker.process_next().await.unwrap(),
        Processed::Completed(_)
    ));
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn a_400_fails_at_once_and_the_key_never_leaks() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::status(
        401,
        &format!("Incorrect API key provided: {TEST_KEY}"),
    )]);
    let rig = rig(&upstream).await;
    push(&rig, NewJob::prompt("u", "hi")).await;
    let Processed::Failed(job) = rig.worker.process_next().await.unwrap() else {
        panic!("a 4xx is permanent")
    };
    assert_eq!(job.attempts, 1);
    assert_eq!(upstream.request_count(), 1);
    let stored = format!("{job:?}");
    assert!(!stored.contains(TEST_KEY), "{stored}");
    assert!(stored.contains("[redacted]"));
    let log = rig
        .queue
        .query(&LogQuery {
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!format!("{log:?}").contains(TEST_KEY));
}

#[tokio::test]
async fn a_hung_upstream_times_out_and_is_retried() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::Hang]);
    let rig = rig_with(
        Some(&upstream),
        Duration::from_millis(300),
        FailurePolicy::Fail,
    )
    .await;
    push(&rig, NewJob::prompt("u", "hi")).await;
    let Processed::Retried { job, .. } = rig.worker.process_next().await.unwrap() else {
        panic!("a timeout is transient")
    };
    let error = job.error.unwrap();
    assert_eq!(error.code, "openai_error");
    assert!(error.message.contains("timed out"), "{}", error.message);
    rig.clock.advance(2_000);
    assert!(matches!(
        rig.worker.process_next().await.unwrap(),
        Processed::Completed(_)
    ));
}

#[tokio::test]
async fn an_empty_reply_becomes_the_placeholder() {
    let upstream = MockUpstream::start().await;
    upstream.script([Reply::Empty, Reply::text("   ")]);
    let rig = rig(&upstream).await;
    for _ in 0..2 {
        push(&rig, NewJob::prompt("u", "hi")).await;
        let Processed::Completed(job) = rig.worker.process_next().await.unwrap() else {
            panic!()
        };
        let result = job.result.unwrap();
        assert_eq!(
            result.reply,
            "I'm not sure how to reply just yet, but I'm listening."
        );
        assert!(!result.used_fallback);
    }
}

#[tokio::test]
async fn no_key_gives_a_fallback_reply_per_personality() {
    let rig = rig_with(None, Duration::from_secs(1), FailurePolicy::Fail).await;
    let personalities = Personalities::builtin();
    for name in ["helpful", "technical"] {
        let mut new = NewJob::prompt("u", "hi");
        new.request.personality = Some(name.into());
        push(&rig, new).await;
        let Processed::Completed(job) = rig.worker.process_next().await.unwrap() else {
            panic!()
        };
        let result = job.result.unwrap();
        assert!(result.used_fallback);
        assert_eq!(result.reply, personalities.get(name).unwrap().fallback);
    }
}

#[tokio::test]
async fn fallback_policy_completes_a_job_whose_upstream_keeps_failing() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::status(503, "down"));
    let rig = rig_with(
        Some(&upstream),
        Duration::from_secs(5),
        FailurePolicy::Fallback,
    )
    .await;
    push(&rig, NewJob::prompt("u", "hi")).await;
    for _ in 0..2 {
        assert!(matches!(
            rig.worker.process_next().await.unwrap(),
            Processed::Retried { .. }
        ));
        rig.clock.advance(60_000);
    }
    let Processed::Completed(job) = rig.worker.process_next().await.unwrap() else {
        panic!("the last failure falls back")
    };
    assert!(job.result.unwrap().used_fallback);
    assert_eq!(job.attempts, 3);
}

#[tokio::test]
async fn an_empty_prompt_fails_with_missing_prompt() {
    let upstream = MockUpstream::start().await;
    let rig = rig(&upstream).await;
    push(&rig, NewJob::prompt("u", "   ")).await;
    let Processed::Failed(job) = rig.worker.process_next().await.unwrap() else {
        panic!()
    };
    assert_eq!(job.error.unwrap().code, "missing_prompt");
    assert_eq!(upstream.request_count(), 0);
}

/// The response cache as the server has it by default: off.
fn cache_off(
    store: &Arc<dyn Store>,
    bot: &Arc<ChatBot>,
    metrics: &Arc<Metrics>,
    clock: &SharedClock,
) -> Arc<ResponseCache> {
    Arc::new(ResponseCache::new(
        Arc::clone(store),
        Arc::clone(bot),
        Arc::clone(metrics),
        clock.clone(),
        Duration::ZERO,
    ))
}

async fn pool_rig(
    upstream: &MockUpstream,
    workers: usize,
) -> (tempfile::TempDir, Arc<dyn Store>, Arc<Worker>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock::system();
    let signals = Arc::new(Signals::default());
    let queue = open_store(dir.path(), clock.clone(), signals.clone()).await;
    let bot = Arc::new(ChatBot::new(
        Some(Upstream::new(upstream.config(Duration::from_secs(30))).unwrap()),
        Personalities::builtin(),
        clock.clone(),
        "mock-model",
    ));
    let metrics = Arc::new(Metrics::new());
    let cache = cache_off(&queue, &bot, &metrics, &clock);
    let worker = Arc::new(Worker::new(
        queue.clone(),
        signals,
        bot,
        cache,
        metrics,
        clock,
        WorkerConfig {
            workers,
            ..WorkerConfig::default()
        },
    ));
    (dir, queue, worker)
}

async fn wait_until<F: std::future::Future<Output = bool>>(mut cond: impl FnMut() -> F) {
    for _ in 0..2_000 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached in 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_n_jobs_are_in_flight_with_n_workers() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::slow("ok", Duration::from_millis(100)));
    let (_dir, queue, worker) = pool_rig(&upstream, 3).await;
    for i in 0..12 {
        queue
            .push(NewJob::prompt("u", &format!("{i}")))
            .await
            .unwrap();
    }
    let stop = CancellationToken::new();
    let pool = WorkerPool::spawn(worker, stop.clone());
    wait_until(|| async { queue.counts().await.unwrap().completed == 12 }).await;
    assert_eq!(
        upstream.max_in_flight(),
        3,
        "never more than N, and N reached"
    );
    assert_eq!(pool.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_flight_at_shutdown_finish() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::slow("done", Duration::from_millis(400)));
    let (_dir, queue, worker) = pool_rig(&upstream, 2).await;
    let stop = CancellationToken::new();
    let pool = WorkerPool::spawn(worker, stop.clone());
    for i in 0..3 {
        queue
            .push(NewJob::prompt("u", &format!("{i}")))
            .await
            .unwrap();
    }
    wait_until(|| async { upstream.in_flight() == 2 }).await;
    assert_eq!(
        pool.shutdown(Duration::from_secs(10)).await,
        0,
        "nothing aborted"
    );
    let c = queue.counts().await.unwrap();
    assert_eq!(
        (c.completed, c.active, c.queued),
        (2, 0, 1),
        "in-flight finished; no new claims"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_flight_is_recovered_on_restart() {
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::Hang);
    let (dir, queue, worker) = pool_rig(&upstream, 1).await;
    let stop = CancellationToken::new();
    let pool = WorkerPool::spawn(worker.clone(), stop.clone());
    let id = queue
        .push(NewJob::prompt("u", "stuck"))
        .await
        .unwrap()
        .job
        .id;
    wait_until(|| async { upstream.in_flight() == 1 }).await;
    assert_eq!(
        pool.shutdown(Duration::from_millis(200)).await,
        1,
        "aborted at the deadline"
    );
    assert_eq!(
        queue.get(id).await.unwrap().unwrap().state,
        JobState::Active
    );
    drop(worker);
    drop(queue);
    let reopened = open_store(dir.path(), clock::system(), Arc::default()).await;
    let job = reopened.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Queued, "recovered at start");
    assert_eq!(job.attempts, 0);
    assert_eq!(reopened.claim().await.unwrap().unwrap().job.id, id);
}
