//! Tests of the sled queue and interaction log, driven step by step with a manual clock.

use std::collections::HashSet;
use std::sync::Arc;

use super::*;
use crate::clock::{ManualClock, SharedClock};

const T0: u64 = 1_800_000_000_000;

/// Opens the store in `dir`. A store dropped a moment ago may still be closing its files on
/// sled's background threads, so a reopen in the same process retries briefly.
fn open_at(dir: &std::path::Path, clock: SharedClock) -> SledQueue {
    for _ in 0..100 {
        match SledQueue::open(StoreOptions::new(dir), clock.clone()) {
            Err(StoreError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.expect("open store"),
        }
    }
    panic!("store still locked after 2 s")
}

fn setup() -> (tempfile::TempDir, Arc<ManualClock>, SledQueue) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let queue = open_at(dir.path(), clock.clone());
    (dir, clock, queue)
}

fn result(reply: &str) -> JobResult {
    JobResult {
        reply: reply.into(),
        used_fallback: false,
        model: "m".into(),
        usage: None,
        processed_at: T0,
        upstream_latency_ms: Some(5),
    }
}

fn err(code: &str) -> JobError {
    JobError {
        code: code.into(),
        message: format!("{code} happened"),
        status: Some(500),
    }
}

async fn push(q: &SledQueue, new: NewJob) -> Job {
    q.push(new).await.unwrap().job
}

#[tokio::test]
async fn push_is_readable_and_counted() {
    let (_dir, _clock, q) = setup();
    let job = push(&q, NewJob::prompt("u1", "hello")).await;
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(q.get(job.id).unwrap().unwrap(), job);
    assert_eq!(q.counts().waiting, 1);
    assert!(q.get(uuid::Uuid::new_v4()).unwrap().is_none());
}

#[tokio::test]
async fn claims_by_priority_then_fifo() {
    let (_dir, _clock, q) = setup();
    let mut low = NewJob::prompt("u", "low");
    low.priority = 5;
    let low = push(&q, low).await;
    let a = push(&q, NewJob::prompt("u", "a")).await;
    let mut high = NewJob::prompt("u", "one");
    high.priority = 1;
    let one = push(&q, high).await;
    let b = push(&q, NewJob::prompt("u", "b")).await;
    let order: Vec<_> = std::iter::from_fn(|| q.claim().unwrap().map(|j| j.id)).collect();
    assert_eq!(order, vec![a.id, b.id, one.id, low.id]);
    assert_eq!(q.counts().active, 4);
    assert_eq!(q.counts().waiting, 0);
}

#[tokio::test]
async fn delayed_jobs_become_due_in_due_time_order() {
    let (_dir, clock, q) = setup();
    let mut late = NewJob::prompt("u", "late");
    late.delay_ms = 5_000;
    let late = push(&q, late).await;
    let mut soon = NewJob::prompt("u", "soon");
    soon.delay_ms = 1_000;
    let soon = push(&q, soon).await;
    assert_eq!(late.state, JobState::Delayed);
    assert_eq!(q.counts().delayed, 2);
    assert_eq!(q.next_due().unwrap(), Some(T0 + 1_000));
    assert!(q.claim().unwrap().is_none(), "nothing is due yet");
    clock.advance(999);
    assert!(q.claim().unwrap().is_none());
    clock.advance(1);
    assert_eq!(q.claim().unwrap().unwrap().id, soon.id);
    assert!(q.claim().unwrap().is_none());
    clock.advance(10_000);
    assert_eq!(q.claim().unwrap().unwrap().id, late.id);
    assert_eq!(q.counts().delayed, 0);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_job_for_the_same_user() {
    let (_dir, _clock, q) = setup();
    let mut first = NewJob::prompt("u1", "hi");
    first.idempotency_key = Some("k".into());
    let a = q.push(first.clone()).await.unwrap();
    assert!(a.created);
    let mut again = first.clone();
    again.request.prompt = "different".into();
    let b = q.push(again).await.unwrap();
    assert!(!b.created);
    assert_eq!(b.job.id, a.job.id);
    assert_eq!(b.job.request.prompt, "hi");
    let mut other_user = first;
    other_user.user_id = "u2".into();
    let c = q.push(other_user).await.unwrap();
    assert!(c.created);
    assert_ne!(c.job.id, a.job.id);
    assert_eq!(q.counts().waiting, 2);
}

#[tokio::test]
async fn cancel_only_while_queued_or_delayed() {
    let (_dir, _clock, q) = setup();
    let queued = push(&q, NewJob::prompt("u", "q")).await;
    let mut d = NewJob::prompt("u", "d");
    d.delay_ms = 60_000;
    let delayed = push(&q, d).await;
    let cancelled = q.cancel(delayed.id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(q.next_due().unwrap(), None, "delayed entry removed");

    let active = q.claim().unwrap().unwrap();
    assert_eq!(active.id, queued.id);
    match q.cancel(active.id).await {
        Err(StoreError::Conflict { state, .. }) => assert_eq!(state, "active"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    q.complete(active.id, result("ok")).await.unwrap();
    assert!(matches!(
        q.cancel(active.id).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        q.cancel(cancelled.id).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        q.cancel(uuid::Uuid::new_v4()).await,
        Err(StoreError::NotFound(_))
    ));
    let c = q.counts();
    assert_eq!(
        (c.cancelled, c.completed, c.waiting, c.delayed),
        (1, 1, 0, 0)
    );
}

#[tokio::test]
async fn cancelled_queued_job_is_never_claimed() {
    let (_dir, _clock, q) = setup();
    let a = push(&q, NewJob::prompt("u", "a")).await;
    let b = push(&q, NewJob::prompt("u", "b")).await;
    q.cancel(a.id).await.unwrap();
    assert_eq!(q.claim().unwrap().unwrap().id, b.id);
    assert!(q.claim().unwrap().is_none());
}

#[tokio::test]
async fn complete_records_result_and_one_interaction() {
    let (_dir, _clock, q) = setup();
    let mut new = NewJob::prompt("alice", "hello");
    new.guild_id = Some("g1".into());
    new.request_id = Some("req-1".into());
    let job = push(&q, new).await;
    q.claim().unwrap().unwrap();
    let done = q.complete(job.id, result("hi there")).await.unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.attempts, 1);
    assert_eq!(done.result.as_ref().unwrap().reply, "hi there");
    let page = q
        .query_log(&LogQuery {
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(page.entries.len(), 1);
    let e = &page.entries[0];
    assert_eq!(e.job_id, job.id);
    assert_eq!(e.user_id, "alice");
    assert_eq!(e.guild_id, "g1");
    assert_eq!(e.request_id.as_deref(), Some("req-1"));
    assert_eq!(e.action, interaction::Action::ChatBotInteraction);
    assert_eq!(e.reply.as_deref(), Some("hi there"));
    assert_eq!(e.upstream_latency_ms, Some(5));
    assert!(
        !q.get(job.id).unwrap().unwrap().log_pending,
        "the stored record says its entry is written, so a reopen does not write it again"
    );
    // Completing twice is a conflict, not a second log entry.
    assert!(matches!(
        q.complete(job.id, result("again")).await,
        Err(StoreError::Conflict { .. })
    ));
}

#[tokio::test]
async fn failures_retry_until_max_attempts_then_fail_and_log() {
    let (_dir, clock, q) = setup();
    let job = push(&q, NewJob::prompt("bob", "hi")).await;
    q.claim().unwrap().unwrap();
    let (j, outcome) = q
        .fail(job.id, err("openai_error"), Some(2_000))
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::Retrying { at: T0 + 2_000 });
    assert_eq!(j.state, JobState::Delayed);
    assert_eq!(j.attempts, 1);
    assert_eq!(j.error.as_ref().unwrap().code, "openai_error");
    assert!(q.claim().unwrap().is_none(), "not before the backoff");
    clock.advance(2_000);
    q.claim().unwrap().unwrap();
    let (_, outcome) = q
        .fail(job.id, err("openai_error"), Some(4_000))
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::Retrying { at: T0 + 6_000 });
    clock.advance(4_000);
    q.claim().unwrap().unwrap();
    let (j, outcome) = q
        .fail(job.id, err("openai_error"), Some(8_000))
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::Failed, "third attempt was the last");
    assert_eq!(j.attempts, 3);
    assert_eq!(j.state, JobState::Failed);
    let page = q
        .query_log(&LogQuery {
            user_id: Some("bob".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].action, interaction::Action::ChatBotError);
    assert_eq!(page.entries[0].error_code.as_deref(), Some("openai_error"));
    assert_eq!(page.entries[0].attempts, 3);
    assert!(!q.get(job.id).unwrap().unwrap().log_pending);
}

#[tokio::test]
async fn permanent_failure_fails_at_once() {
    let (_dir, _clock, q) = setup();
    let job = push(&q, NewJob::prompt("u", "x")).await;
    q.claim().unwrap().unwrap();
    let (j, outcome) = q.fail(job.id, err("bad_request"), None).await.unwrap();
    assert_eq!(outcome, FailOutcome::Failed);
    assert_eq!(j.attempts, 1);
}

#[tokio::test]
async fn admin_retry_requeues_a_failed_job_with_fresh_attempts() {
    let (_dir, _clock, q) = setup();
    let job = push(&q, NewJob::prompt("u", "x")).await;
    assert!(matches!(
        q.retry(job.id).await,
        Err(StoreError::Conflict { .. })
    ));
    q.claim().unwrap().unwrap();
    q.fail(job.id, err("e"), None).await.unwrap();
    let again = q.retry(job.id).await.unwrap();
    assert_eq!(again.state, JobState::Queued);
    assert_eq!(again.attempts, 0);
    assert!(again.error.is_none());
    assert_eq!(q.counts().failed, 0);
    assert_eq!(q.claim().unwrap().unwrap().id, job.id);
    assert!(q.list(JobState::Failed, 10).unwrap().is_empty());
}

#[tokio::test]
async fn pause_stops_claims_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    {
        let q = open_at(dir.path(), clock.clone());
        push(&q, NewJob::prompt("u", "x")).await;
        q.set_paused(true).await.unwrap();
        assert!(q.claim().unwrap().is_none());
        assert!(q.counts().paused);
    }
    let q = open_at(dir.path(), clock);
    assert!(q.counts().paused);
    assert!(q.claim().unwrap().is_none());
    q.set_paused(false).await.unwrap();
    assert!(q.claim().unwrap().is_some());
}

#[tokio::test]
async fn retention_keeps_exactly_the_newest_n() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let mut options = StoreOptions::new(dir.path());
    options.keep_completed = 3;
    options.keep_failed = 2;
    let q = SledQueue::open(options, clock.clone()).unwrap();
    let mut completed = Vec::new();
    for i in 0..7 {
        let mut new = NewJob::prompt("u", &format!("c{i}"));
        new.idempotency_key = Some(format!("key-{i}"));
        let job = push(&q, new).await;
        q.claim().unwrap().unwrap();
        clock.advance(10);
        q.complete(job.id, result("ok")).await.unwrap();
        completed.push(job.id);
    }
    let mut failed = Vec::new();
    for i in 0..4 {
        let job = push(&q, NewJob::prompt("u", &format!("f{i}"))).await;
        q.claim().unwrap().unwrap();
        clock.advance(10);
        q.fail(job.id, err("e"), None).await.unwrap();
        failed.push(job.id);
    }
    assert_eq!(q.prune().unwrap(), 4 + 2);
    let c = q.counts();
    assert_eq!((c.completed, c.failed), (3, 2));
    for id in &completed[..4] {
        assert!(q.get(*id).unwrap().is_none(), "old completed job pruned");
    }
    for id in &completed[4..] {
        assert!(q.get(*id).unwrap().is_some(), "newest completed job kept");
    }
    assert!(q.get(failed[1]).unwrap().is_none());
    assert!(q.get(failed[2]).unwrap().is_some());
    let listed: Vec<_> = q
        .list(JobState::Completed, 10)
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(listed, vec![completed[6], completed[5], completed[4]]);
    // The pruned job's idempotency key is free again.
    let mut reuse = NewJob::prompt("u", "again");
    reuse.idempotency_key = Some("key-0".into());
    assert!(q.push(reuse).await.unwrap().created);
    // The interaction log is not pruned by job retention.
    let page = q
        .query_log(&LogQuery {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(page.entries.len(), 11);
    assert_eq!(q.prune().unwrap(), 0);
}

#[tokio::test]
async fn log_retention_by_count_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let mut options = StoreOptions::new(dir.path());
    options.log_retention = LogRetention {
        max_entries: Some(5),
        max_age_ms: Some(60_000),
    };
    let q = SledQueue::open(options, clock.clone()).unwrap();
    for i in 0..8 {
        let job = push(&q, NewJob::prompt(&format!("u{}", i % 2), "x")).await;
        q.claim().unwrap().unwrap();
        clock.advance(1_000);
        q.complete(job.id, result("ok")).await.unwrap();
    }
    assert_eq!(q.prune().unwrap(), 3);
    let all = |q: &SledQueue| {
        q.query_log(&LogQuery {
            limit: 100,
            ..Default::default()
        })
        .unwrap()
        .entries
    };
    assert_eq!(all(&q).len(), 5);
    let by_user = q
        .query_log(&LogQuery {
            user_id: Some("u0".into()),
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        by_user.entries.len(),
        2,
        "index entries pruned with the log"
    );
    // Now T0+65.5 s: the remaining entries are from T0+4 s .. T0+8 s, and those older than
    // 60 s (T0+4 s and T0+5 s) go.
    clock.advance(57_500);
    assert_eq!(q.prune().unwrap(), 2);
    assert_eq!(all(&q).len(), 3);
}

#[tokio::test]
async fn log_query_filters_and_paginates_newest_first() {
    let (_dir, clock, q) = setup();
    for i in 0..25 {
        let mut new = NewJob::prompt(if i % 5 == 0 { "ann" } else { "ben" }, &format!("p{i}"));
        new.guild_id = (i % 2 == 0).then(|| "g".to_string());
        let job = push(&q, new).await;
        q.claim().unwrap().unwrap();
        clock.advance(1_000);
        q.complete(job.id, result("r")).await.unwrap();
    }
    let query = |q: &SledQueue, f: LogQuery| q.query_log(&f).unwrap();
    let ann = query(
        &q,
        LogQuery {
            user_id: Some("ann".into()),
            limit: 50,
            ..Default::default()
        },
    );
    let prompts: Vec<_> = ann.entries.iter().map(|e| e.prompt.as_str()).collect();
    assert_eq!(prompts, ["p20", "p15", "p10", "p5", "p0"]);
    assert!(ann.next_cursor.is_none());

    let ann_in_g = query(
        &q,
        LogQuery {
            user_id: Some("ann".into()),
            guild_id: Some("g".into()),
            limit: 50,
            ..Default::default()
        },
    );
    let prompts: Vec<_> = ann_in_g.entries.iter().map(|e| e.prompt.as_str()).collect();
    assert_eq!(prompts, ["p20", "p10", "p0"]);

    let global = query(
        &q,
        LogQuery {
            guild_id: Some("global".into()),
            limit: 50,
            ..Default::default()
        },
    );
    assert_eq!(global.entries.len(), 12);

    // Time window: entries finished in [T0+5s, T0+10s).
    let window = query(
        &q,
        LogQuery {
            since: Some(T0 + 5_000),
            until: Some(T0 + 10_000),
            limit: 50,
            ..Default::default()
        },
    );
    let prompts: Vec<_> = window.entries.iter().map(|e| e.prompt.as_str()).collect();
    assert_eq!(prompts, ["p8", "p7", "p6", "p5", "p4"]);

    // Cursor pagination covers everything exactly once.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = query(
            &q,
            LogQuery {
                cursor: cursor.clone(),
                limit: 10,
                ..Default::default()
            },
        );
        seen.extend(page.entries.iter().map(|e| e.prompt.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let expected: Vec<_> = (0..25).rev().map(|i| format!("p{i}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn active_jobs_are_recovered_on_reopen_with_their_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (id, delayed_id) = {
        let q = open_at(dir.path(), clock.clone());
        let job = push(&q, NewJob::prompt("u", "x")).await;
        q.claim().unwrap().unwrap();
        q.fail(job.id, err("e"), Some(1)).await.unwrap();
        clock.advance(1);
        let again = q.claim().unwrap().unwrap();
        assert_eq!(again.state, JobState::Active);
        let mut d = NewJob::prompt("u", "later");
        d.delay_ms = 30_000;
        let delayed = push(&q, d).await;
        q.sync().await.unwrap();
        (job.id, delayed.id)
        // Dropped while active: as after a crash.
    };
    let q = open_at(dir.path(), clock.clone());
    let job = q.get(id).unwrap().unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.attempts, 1, "the interrupted attempt is not counted");
    let c = q.counts();
    assert_eq!((c.waiting, c.active, c.delayed), (1, 0, 1));
    assert_eq!(q.claim().unwrap().unwrap().id, id);
    // The delayed job kept its due time across the restart.
    assert_eq!(q.next_due().unwrap(), Some(T0 + 1 + 30_000));
    clock.advance(30_000);
    assert_eq!(q.claim().unwrap().unwrap().id, delayed_id);
}

#[tokio::test]
async fn large_records_stored_as_sled_blobs_survive_a_reopen() {
    // Values and nodes over ~128 KiB go to separate blob files, which chatq's copy of sled syncs
    // (vendor/sled/CHATQ-PATCH.md); make sure that path stores and reads back.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let prompts: Vec<String> = (0..4).map(|i| format!("{i}").repeat(200_000)).collect();
    let ids: Vec<_> = {
        let q = open_at(dir.path(), clock.clone());
        let mut ids = Vec::new();
        for prompt in &prompts {
            ids.push(push(&q, NewJob::prompt("u", prompt)).await.id);
        }
        ids
    };
    let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
    assert!(blobs > 0, "the records were large enough to become blobs");
    let q = open_at(dir.path(), clock);
    for (id, prompt) in ids.iter().zip(&prompts) {
        assert_eq!(&q.get(*id).unwrap().unwrap().request.prompt, prompt);
    }
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused_clearly() {
    let (dir, clock, _q) = setup();
    match SledQueue::open(StoreOptions::new(dir.path()), clock) {
        Err(e @ StoreError::Locked { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
            assert!(msg.contains("already in use"), "{msg}");
        }
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("expected Locked, got a second handle"),
    }
}

#[tokio::test]
async fn an_unreadable_record_is_an_error_not_a_panic() {
    let (_dir, _clock, q) = setup();
    let job = push(&q, NewJob::prompt("u", "x")).await;
    q.trees_for_tests()
        .insert(job.id.as_bytes(), &[42u8, 1, 2, 3][..])
        .unwrap();
    assert!(matches!(q.get(job.id), Err(StoreError::Codec(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_hand_out_each_job_exactly_once() {
    let (_dir, _clock, q) = setup();
    let q = Arc::new(q);
    const JOBS: usize = 400;
    let mut pushed = HashSet::new();
    for i in 0..JOBS {
        pushed.insert(push(&q, NewJob::prompt("u", &format!("{i}"))).await.id);
    }
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let q = Arc::clone(&q);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(job) = q.claim().unwrap() {
                mine.push(job.id);
                q.complete(job.id, result("ok")).await.unwrap();
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), JOBS, "no job handed out twice");
    assert_eq!(unique, pushed, "no job skipped");
    assert_eq!(q.counts().completed, JOBS as u64);
}

/// Fresh pushes write their record outside the index lock; racing them against claimers
/// must still hand every job out exactly once, and racing pushes with one idempotency key
/// (which keep the lock) must still make one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_racing_claims_lose_nothing_and_one_idempotency_key_makes_one_job() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    let (_dir, _clock, q) = setup();
    let q = Arc::new(q);
    const PUSHERS: usize = 8;
    const EACH: usize = 100;
    let claimed_total = Arc::new(AtomicUsize::new(0));
    let claimers: Vec<_> = (0..8)
        .map(|_| {
            let (q, claimed_total) = (Arc::clone(&q), Arc::clone(&claimed_total));
            tokio::spawn(async move {
                let mut mine = Vec::new();
                let give_up = Instant::now() + Duration::from_secs(30);
                while claimed_total.load(Ordering::SeqCst) < PUSHERS * EACH
                    && Instant::now() < give_up
                {
                    match q.claim().unwrap() {
                        Some(job) => {
                            claimed_total.fetch_add(1, Ordering::SeqCst);
                            mine.push(job.id);
                            q.complete(job.id, result("ok")).await.unwrap();
                        }
                        None => tokio::task::yield_now().await,
                    }
                }
                mine
            })
        })
        .collect();
    let pushers: Vec<_> = (0..PUSHERS)
        .map(|p| {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..EACH {
                    ids.push(push(&q, NewJob::prompt("u", &format!("{p}-{i}"))).await.id);
                }
                ids
            })
        })
        .collect();
    let same_key: Vec<_> = (0..16)
        .map(|i| {
            let q = Arc::clone(&q);
            let mut new = NewJob::prompt("u", &format!("keyed {i}"));
            new.idempotency_key = Some("one".into());
            tokio::spawn(async move { q.push(new).await.unwrap() })
        })
        .collect();
    let mut pushed = HashSet::new();
    for t in pushers {
        pushed.extend(t.await.unwrap());
    }
    let mut keyed = Vec::new();
    for t in same_key {
        keyed.push(t.await.unwrap());
    }
    assert_eq!(keyed.iter().filter(|p| p.created).count(), 1);
    assert!(keyed.iter().all(|p| p.job.id == keyed[0].job.id));
    // The keyed job is queued too; the claimers stop after the fresh ones' count, so it may
    // or may not be among what they took.
    pushed.insert(keyed[0].job.id);
    let mut claimed = Vec::new();
    for t in claimers {
        claimed.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = claimed.iter().copied().collect();
    assert_eq!(unique.len(), claimed.len(), "no job handed out twice");
    assert!(unique.is_subset(&pushed), "only pushed jobs handed out");
    let left = q.claim().unwrap().map(|j| j.id);
    let mut all = unique.clone();
    all.extend(left);
    assert_eq!(all, pushed, "every pushed job claimable exactly once");
    assert!(q.claim().unwrap().is_none());
}

#[tokio::test]
async fn long_poll_subscription_wakes_on_completion_and_cleans_up() {
    let (_dir, _clock, q) = setup();
    let job = push(&q, NewJob::prompt("u", "x")).await;
    let mut sub = q.events().subscribe(job.id);
    assert_eq!(q.events().watched(), 1);
    q.claim().unwrap().unwrap();
    q.complete(job.id, result("done")).await.unwrap();
    let finished = sub.finished().await.unwrap();
    assert_eq!(finished.state, JobState::Completed);
    drop(sub);
    let _abandoned = q.events().subscribe(job.id);
    drop(_abandoned);
    assert_eq!(q.events().watched(), 0);
}

#[tokio::test]
async fn group_commit_answers_concurrent_pushes_with_fewer_flushes() {
    let (_dir, _clock, q) = setup();
    let q = Arc::new(q);
    let before = q.flush_stats();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.push(NewJob::prompt("u", &format!("{i}"))).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let after = q.flush_stats();
    assert_eq!(after.requests - before.requests, 64);
    assert!(after.flushes - before.flushes <= 64);
}

#[tokio::test]
async fn a_completion_whose_log_entry_was_cut_off_is_logged_once_at_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let id = {
        let q = open_at(dir.path(), clock.clone());
        let job = push(&q, NewJob::prompt("carol", "hi")).await;
        q.claim().unwrap().unwrap();
        // As if the process died after writing the finished record and before its entry.
        let mut finished = q.get(job.id).unwrap().unwrap();
        finished.state = JobState::Completed;
        finished.attempts = 1;
        finished.finished_at = Some(T0 + 5);
        finished.result = Some(result("cut off"));
        finished.log_pending = true;
        q.trees_for_tests()
            .insert(job.id.as_bytes(), codec::encode(&finished).unwrap())
            .unwrap();
        q.sync().await.unwrap();
        job.id
    };
    for _ in 0..2 {
        let q = open_at(dir.path(), clock.clone());
        let page = q
            .query_log(&LogQuery {
                user_id: Some("carol".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            page.entries.len(),
            1,
            "written once, and not again on the next open"
        );
        assert_eq!(page.entries[0].job_id, id);
        assert_eq!(page.entries[0].reply.as_deref(), Some("cut off"));
        assert!(!q.get(id).unwrap().unwrap().log_pending);
        assert_eq!(q.counts().completed, 1);
    }
}

#[tokio::test]
async fn below_the_free_space_reserve_pushes_are_refused_and_nothing_else_is() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let mut options = StoreOptions::new(dir.path());
    let q = ResilientQueue::open(options.clone(), clock.clone()).unwrap();
    let queued = q.push(NewJob::prompt("u", "before")).await.unwrap().job;
    let claimed = q.claim().unwrap().unwrap();
    assert_eq!(claimed.id, queued.id);
    drop(q);

    // No disk has this much free: the reserve is always short.
    options.min_free_bytes = u64::MAX - 1;
    let q = loop {
        match ResilientQueue::open(options.clone(), clock.clone()) {
            Err(StoreError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => break other.unwrap(),
        }
    };
    assert!(matches!(q.accepting(), Err(StoreError::DiskFull { .. })));
    let refused = q.push(NewJob::prompt("u", "after")).await.unwrap_err();
    assert!(
        refused.to_string().contains("below the") && refused.to_string().contains("reserve"),
        "{refused}"
    );
    assert_eq!(q.counts().waiting, 1, "the refused push stored nothing");
    // Work already queued still runs and finishes.
    let job = q.claim().unwrap().unwrap();
    assert_eq!(job.id, queued.id, "recovered after the reopen");
    let done = q.complete(job.id, result("ok")).await.unwrap();
    assert_eq!(done.state, JobState::Completed);
    let status = q.disk();
    assert_eq!(status.reserve_bytes, u64::MAX - 1);
    assert!(
        status.free_bytes.is_some(),
        "the data dir's disk was measured"
    );
    assert!(status.failure.is_none());
}
