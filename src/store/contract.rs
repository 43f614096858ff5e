//! The store contract: the promises of DESIGN §2–§3 as one suite of tests, written against
//! the traits only. Every backend runs all of it with one line:
//!
//! ```ignore
//! crate::store::contract::store_contract!(my_backend::test_backend().await);
//! ```
//!
//! where the expression gives an `Option` of a [`Backend`] (`None`: the backend's service is
//! not configured here, and the test passes after the backend said so once). A backend opens
//! the store over its data, fresh the first time, the same data after that. The tests drive time with a
//! [`ManualClock`] the store is opened with, and simulate a crash by dropping the store
//! without a shutdown and opening it again ([`Harness::reopen`]). A claim that a crash left
//! behind is released either at the next open (the embedded store, which one process owns)
//! or when its lease runs out (a shared store): the tests let [`RECOVERY_MS`] pass and run
//! maintenance before they expect the job back, so both ways pass.
//!
//! A backend opens with the response cache bounded at [`CACHE_BOUND`] entries.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use crate::clock::{ManualClock, SharedClock};
use crate::domain::{Action, JobError, JobResult, JobState, LogQuery, NewJob, Usage};
use crate::signals::{JobNotifier, Signals};
use crate::store::{Claimed, FailOutcome, Lease, Store, StoreError};

/// The time the tests start at.
pub const T0: u64 = 1_800_000_000_000;
/// Longer than any lease a backend is tested with.
pub const RECOVERY_MS: u64 = 120_000;
/// The `cache_max_entries` a backend opens with.
pub const CACHE_BOUND: u64 = 5;

/// What a backend gives the suite.
pub trait Backend: Send + Sync {
    /// Opens the store over this backend's data: empty the first time, what the previous
    /// store left after that. Retention: 3 completed, 2 failed (and cancelled); the log's own
    /// retention off; at most [`CACHE_BOUND`] cache entries.
    fn open(
        &self,
        clock: SharedClock,
        notifier: Arc<dyn JobNotifier>,
    ) -> BoxFuture<'_, Arc<dyn Store>>;
}

/// A store under test, its clock and the signals it reports to.
pub struct Harness {
    backend: Box<dyn Backend>,
    store: Option<Arc<dyn Store>>,
    pub clock: Arc<ManualClock>,
    pub signals: Arc<Signals>,
}

impl Harness {
    pub async fn new(backend: Box<dyn Backend>) -> Self {
        let clock = ManualClock::new(T0);
        let signals = Arc::new(Signals::default());
        let store = backend.open(clock.clone(), signals.clone()).await;
        Self {
            backend,
            store: Some(store),
            clock,
            signals,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        self.store.as_ref().expect("a store is open")
    }

    /// Drops the store as a crash would (no shutdown) and opens the same data again.
    pub async fn reopen(&mut self) {
        let store = self.store.take().expect("a store is open");
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "the test holds no other handle"
        );
        drop(store);
        let store = self
            .backend
            .open(self.clock.clone(), self.signals.clone())
            .await;
        self.store = Some(store);
    }

    /// Lets every claim a crash left behind go, whichever way the backend does it.
    pub async fn recover_abandoned_claims(&self) {
        self.clock.advance(RECOVERY_MS);
        self.store().prune().await.expect("maintenance runs");
    }

    async fn push(&self, new: NewJob) -> crate::domain::Job {
        self.store().push(new).await.expect("push").job
    }

    async fn claim(&self) -> Claimed {
        self.store()
            .claim()
            .await
            .expect("claim")
            .expect("a job is due")
    }

    async fn claim_none(&self) -> bool {
        self.store().claim().await.expect("claim").is_none()
    }

    async fn all_log(&self) -> Vec<crate::domain::Interaction> {
        self.store()
            .query(&LogQuery {
                limit: 500,
                ..Default::default()
            })
            .await
            .expect("query")
            .entries
    }
}

/// Declares every contract test for `$backend` (an expression giving an `Option` of a
/// [`Backend`]).
macro_rules! store_contract {
    ($backend:expr) => {
        $crate::store::contract::store_contract!(@each $backend;
            push_is_durable_and_found_after_reopen,
            push_is_readable_and_counted,
            claims_by_priority_then_fifo,
            delayed_jobs_become_due_in_due_time_order,
            idempotency_key_returns_the_first_job_for_the_same_user,
            cancel_only_while_queued_or_delayed,
            cancelled_queued_job_is_never_claimed,
            complete_records_result_and_one_interaction,
            a_finish_is_announced_after_it_is_stored,
            failures_retry_until_max_attempts_then_fail_and_log,
            permanent_failure_fails_at_once,
            admin_retry_requeues_a_failed_job_with_fresh_attempts,
            pause_stops_claims_and_survives_reopen,
            retention_keeps_exactly_the_newest_n,
            log_query_filters_and_paginates_newest_first,
            a_cursor_the_store_did_not_make_is_refused,
            abandoned_claims_come_back_with_their_attempts,
            a_stale_lease_cannot_complete_or_fail,
            heartbeats_keep_only_held_leases,
            a_job_pushed_claimed_is_this_callers_alone_and_recovered_like_any_claim,
            concurrent_claims_hand_out_each_job_exactly_once,
            pushes_racing_claims_lose_nothing_and_one_idempotency_key_makes_one_job,
            a_job_pushed_finished_is_completed_logged_and_announced_even_while_paused,
            cache_entries_are_served_until_they_expire_and_survive_reopen,
            the_cache_keeps_at_most_its_bound_newest_first_and_clears_by_guild,
            guild_settings_are_stored_replaced_listed_and_removed,
            a_completed_job_of_a_conversation_adds_its_turn_once,
            a_conversation_keeps_its_newest_turns_and_forgets_old_ones,
            usage_totals_are_the_logs_grouped,
            deliveries_are_leased_once_retried_after_the_lease_and_kept,
            a_jobs_finish_wakes_its_waiting_deliveries_never_a_leased_one,
            tokens_spent_is_the_days_log_of_that_user_in_that_guild,
        );
    };
    (@each $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(backend) = $backend else {
                    return;
                };
                let harness = $crate::store::contract::Harness::new(Box::new(backend)).await;
                $crate::store::contract::$name(harness).await;
            }
        )*
    };
}
pub(crate) use store_contract;

pub fn result(reply: &str) -> JobResult {
    JobResult {
        reply: reply.into(),
        used_fallback: false,
        model: "m".into(),
        usage: Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            total_tokens: 7,
        }),
        processed_at: T0,
        upstream_latency_ms: Some(5),
        cached: false,
    }
}

pub fn err(code: &str) -> JobError {
    JobError {
        code: code.into(),
        message: format!("{code} happened"),
        status: Some(500),
    }
}

pub async fn push_is_durable_and_found_after_reopen(mut h: Harness) {
    let mut new = NewJob::prompt("u1", "hello");
    new.guild_id = Some("g".into());
    new.priority = 3;
    let job = h.push(new).await;
    h.reopen().await;
    let found = h
        .store()
        .get(job.id)
        .await
        .unwrap()
        .expect("the acknowledged job survives");
    assert_eq!(found, job);
    assert_eq!(h.store().counts().await.unwrap().queued, 1);
}

pub async fn push_is_readable_and_counted(h: Harness) {
    let job = h.push(NewJob::prompt("u1", "hello")).await;
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(h.store().get(job.id).await.unwrap().unwrap(), job);
    assert_eq!(h.store().counts().await.unwrap().queued, 1);
    assert!(h.store().get(uuid::Uuid::new_v4()).await.unwrap().is_none());
}

pub async fn claims_by_priority_then_fifo(h: Harness) {
    let mut low = NewJob::prompt("u", "low");
    low.priority = 5;
    let low = h.push(low).await;
    let a = h.push(NewJob::prompt("u", "a")).await;
    let mut high = NewJob::prompt("u", "one");
    high.priority = 1;
    let one = h.push(high).await;
    let b = h.push(NewJob::prompt("u", "b")).await;
    let mut order = Vec::new();
    while let Some(claimed) = h.store().claim().await.unwrap() {
        assert_eq!(claimed.job.state, JobState::Active);
        order.push(claimed.job.id);
    }
    assert_eq!(order, vec![a.id, b.id, one.id, low.id]);
    let c = h.store().counts().await.unwrap();
    assert_eq!((c.active, c.queued), (4, 0));
}

pub async fn delayed_jobs_become_due_in_due_time_order(h: Harness) {
    let mut late = NewJob::prompt("u", "late");
    late.delay_ms = 5_000;
    let late = h.push(late).await;
    let mut soon = NewJob::prompt("u", "soon");
    soon.delay_ms = 1_000;
    let soon = h.push(soon).await;
    assert_eq!(late.state, JobState::Delayed);
    assert_eq!(late.run_at, T0 + 5_000);
    assert_eq!(h.store().counts().await.unwrap().delayed, 2);
    assert_eq!(h.store().next_due().await.unwrap(), Some(T0 + 1_000));
    assert!(h.claim_none().await, "nothing is due yet");
    h.clock.advance(999);
    assert!(h.claim_none().await);
    h.clock.advance(1);
    assert_eq!(h.claim().await.job.id, soon.id);
    assert!(h.claim_none().await);
    h.clock.advance(10_000);
    assert_eq!(h.claim().await.job.id, late.id);
    assert_eq!(h.store().counts().await.unwrap().delayed, 0);
}

pub async fn idempotency_key_returns_the_first_job_for_the_same_user(h: Harness) {
    let mut first = NewJob::prompt("u1", "hi");
    first.idempotency_key = Some("k".into());
    let a = h.store().push(first.clone()).await.unwrap();
    assert!(a.created);
    let mut again = first.clone();
    again.request.prompt = "different".into();
    let b = h.store().push(again).await.unwrap();
    assert!(!b.created);
    assert_eq!(b.job.id, a.job.id);
    assert_eq!(b.job.request.prompt, "hi");
    let mut other_user = first;
    other_user.user_id = "u2".into();
    let c = h.store().push(other_user).await.unwrap();
    assert!(c.created);
    assert_ne!(c.job.id, a.job.id);
    assert_eq!(h.store().counts().await.unwrap().queued, 2);
}

pub async fn cancel_only_while_queued_or_delayed(h: Harness) {
    let queued = h.push(NewJob::prompt("u", "q")).await;
    let mut d = NewJob::prompt("u", "d");
    d.delay_ms = 60_000;
    let delayed = h.push(d).await;
    let cancelled = h.store().cancel(delayed.id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(
        h.store().next_due().await.unwrap(),
        None,
        "delayed entry removed"
    );

    let active = h.claim().await;
    assert_eq!(active.job.id, queued.id);
    match h.store().cancel(active.job.id).await {
        Err(StoreError::Conflict { state, .. }) => assert_eq!(state, "active"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    h.store()
        .complete(&active.lease, result("ok"))
        .await
        .unwrap();
    assert!(matches!(
        h.store().cancel(active.job.id).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        h.store().cancel(cancelled.id).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        h.store().cancel(uuid::Uuid::new_v4()).await,
        Err(StoreError::NotFound(_))
    ));
    let c = h.store().counts().await.unwrap();
    assert_eq!(
        (c.cancelled, c.completed, c.queued, c.delayed),
        (1, 1, 0, 0)
    );
}

pub async fn cancelled_queued_job_is_never_claimed(h: Harness) {
    let a = h.push(NewJob::prompt("u", "a")).await;
    let b = h.push(NewJob::prompt("u", "b")).await;
    h.store().cancel(a.id).await.unwrap();
    assert_eq!(h.claim().await.job.id, b.id);
    assert!(h.claim_none().await);
}

pub async fn complete_records_result_and_one_interaction(mut h: Harness) {
    let mut new = NewJob::prompt("alice", "hello");
    new.guild_id = Some("g1".into());
    new.request_id = Some("req-1".into());
    new.request.personality = Some("helpful".into());
    let job = h.push(new).await;
    let claimed = h.claim().await;
    h.clock.advance(7);
    let done = h
        .store()
        .complete(&claimed.lease, result("hi there"))
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.attempts, 1);
    assert_eq!(done.finished_at, Some(T0 + 7));
    assert_eq!(done.result.as_ref().unwrap().reply, "hi there");
    // Completing twice is refused, not a second log entry.
    assert!(matches!(
        h.store().complete(&claimed.lease, result("again")).await,
        Err(StoreError::LeaseLost(_))
    ));
    // Nothing of it is lost with the process, and the entry is not written again.
    h.reopen().await;
    assert_eq!(h.store().get(job.id).await.unwrap().unwrap(), done);
    let entries = h.all_log().await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.job_id, job.id);
    assert_eq!(e.user_id, "alice");
    assert_eq!(e.guild_id, "g1");
    assert_eq!(e.request_id.as_deref(), Some("req-1"));
    assert_eq!(e.action, Action::ChatBotInteraction);
    assert_eq!(e.personality.as_deref(), Some("helpful"));
    assert_eq!(e.prompt, "hello");
    assert_eq!(e.reply.as_deref(), Some("hi there"));
    assert_eq!(e.upstream_latency_ms, Some(5));
    assert_eq!(e.usage.map(|u| u.total_tokens), Some(7));
    assert_eq!((e.attempts, e.timestamp), (1, T0 + 7));
    assert!(!e.id.is_empty(), "every entry carries its cursor");
}

pub async fn a_finish_is_announced_after_it_is_stored(h: Harness) {
    let job = h.push(NewJob::prompt("u", "x")).await;
    let mut finished = h.signals.finished.subscribe(job.id);
    let claimed = h.claim().await;
    h.store()
        .complete(&claimed.lease, result("done"))
        .await
        .unwrap();
    let announced = tokio::time::timeout(Duration::from_secs(5), finished.finished())
        .await
        .expect("the finish was announced")
        .expect("with the job");
    assert_eq!(announced.state, JobState::Completed);
    let stored = h.store().get(job.id).await.unwrap().unwrap();
    assert_eq!(stored, announced, "what is announced is what is stored");
    // A cancel is a finish too.
    let other = h.push(NewJob::prompt("u", "y")).await;
    let mut cancelled = h.signals.finished.subscribe(other.id);
    h.store().cancel(other.id).await.unwrap();
    let announced = tokio::time::timeout(Duration::from_secs(5), cancelled.finished())
        .await
        .expect("the cancel was announced");
    assert_eq!(announced.map(|j| j.state), Some(JobState::Cancelled));
}

pub async fn failures_retry_until_max_attempts_then_fail_and_log(h: Harness) {
    let job = h.push(NewJob::prompt("bob", "hi")).await;
    let lease = h.claim().await.lease;
    let (j, outcome) = h
        .store()
        .fail(&lease, err("openai_error"), Some(2_000))
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::Retrying { at: T0 + 2_000 });
    assert_eq!(j.state, JobState::Delayed);
    assert_eq!(j.attempts, 1);
    assert_eq!(j.error.as_ref().unwrap().code, "openai_error");
    assert!(h.claim_none().await, "not before the backoff");
    assert!(
        h.all_log().await.is_empty(),
        "a retried attempt is not logged"
    );
    h.clock.advance(2_000);
    let lease = h.claim().await.lease;
    let (_, outcome) = h
        .store()
        .fail(&lease, err("openai_error"), Some(4_000))
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::Retrying { at: T0 + 6_000 });
    h.clock.advance(4_000);
    let lease = h.claim().await.lease;
    let (j, outcome) = h
        .store()
        .fail(&lease, err("openai_error"), Some(8_000))
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::Failed, "third attempt was the last");
    assert_eq!(j.attempts, 3);
    assert_eq!(j.state, JobState::Failed);
    let page = h
        .store()
        .query(&LogQuery {
            user_id: Some("bob".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].job_id, job.id);
    assert_eq!(page.entries[0].action, Action::ChatBotError);
    assert_eq!(page.entries[0].error_code.as_deref(), Some("openai_error"));
    assert_eq!(page.entries[0].attempts, 3);
}

pub async fn permanent_failure_fails_at_once(h: Harness) {
    h.push(NewJob::prompt("u", "x")).await;
    let lease = h.claim().await.lease;
    let (j, outcome) = h
        .store()
        .fail(&lease, err("bad_request"), None)
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::Failed);
    assert_eq!(j.attempts, 1);
    assert_eq!(h.store().counts().await.unwrap().failed, 1);
}

pub async fn admin_retry_requeues_a_failed_job_with_fresh_attempts(h: Harness) {
    let job = h.push(NewJob::prompt("u", "x")).await;
    assert!(matches!(
        h.store().retry(job.id).await,
        Err(StoreError::Conflict { .. })
    ));
    let lease = h.claim().await.lease;
    h.store().fail(&lease, err("e"), None).await.unwrap();
    let again = h.store().retry(job.id).await.unwrap();
    assert_eq!(again.state, JobState::Queued);
    assert_eq!(again.attempts, 0);
    assert!(again.error.is_none());
    assert_eq!(h.store().counts().await.unwrap().failed, 0);
    let claimed = h.claim().await;
    assert_eq!(claimed.job.id, job.id);
    assert_ne!(claimed.lease, lease, "a new claim, a new token");
    assert!(
        h.store()
            .list(JobState::Failed, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        h.store().retry(uuid::Uuid::new_v4()).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn pause_stops_claims_and_survives_reopen(mut h: Harness) {
    h.push(NewJob::prompt("u", "x")).await;
    h.store().set_paused(true).await.unwrap();
    assert!(h.claim_none().await);
    assert!(h.store().counts().await.unwrap().paused);
    h.reopen().await;
    assert!(h.store().counts().await.unwrap().paused);
    assert!(h.claim_none().await);
    h.store().set_paused(false).await.unwrap();
    assert!(!h.store().counts().await.unwrap().paused);
    h.claim().await;
}

pub async fn retention_keeps_exactly_the_newest_n(h: Harness) {
    // The backend keeps 3 completed and 2 failed.
    let mut completed = Vec::new();
    for i in 0..7 {
        let mut new = NewJob::prompt("u", &format!("c{i}"));
        new.idempotency_key = Some(format!("key-{i}"));
        let job = h.push(new).await;
        let lease = h.claim().await.lease;
        h.clock.advance(10);
        h.store().complete(&lease, result("ok")).await.unwrap();
        completed.push(job.id);
    }
    let mut failed = Vec::new();
    for i in 0..4 {
        let job = h.push(NewJob::prompt("u", &format!("f{i}"))).await;
        let lease = h.claim().await.lease;
        h.clock.advance(10);
        h.store().fail(&lease, err("e"), None).await.unwrap();
        failed.push(job.id);
    }
    assert_eq!(h.store().prune().await.unwrap(), 4 + 2);
    let c = h.store().counts().await.unwrap();
    assert_eq!((c.completed, c.failed), (3, 2));
    for id in &completed[..4] {
        assert!(
            h.store().get(*id).await.unwrap().is_none(),
            "old completed job pruned"
        );
    }
    for id in &completed[4..] {
        assert!(
            h.store().get(*id).await.unwrap().is_some(),
            "newest completed job kept"
        );
    }
    assert!(h.store().get(failed[1]).await.unwrap().is_none());
    assert!(h.store().get(failed[2]).await.unwrap().is_some());
    let listed: Vec<_> = h
        .store()
        .list(JobState::Completed, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(listed, vec![completed[6], completed[5], completed[4]]);
    // The pruned job's idempotency key is free again.
    let mut reuse = NewJob::prompt("u", "again");
    reuse.idempotency_key = Some("key-0".into());
    assert!(h.store().push(reuse).await.unwrap().created);
    // The interaction log is not pruned by job retention.
    assert_eq!(h.all_log().await.len(), 11);
    assert_eq!(h.store().prune().await.unwrap(), 0);
}

pub async fn log_query_filters_and_paginates_newest_first(h: Harness) {
    for i in 0..25 {
        let mut new = NewJob::prompt(if i % 5 == 0 { "ann" } else { "ben" }, &format!("p{i}"));
        new.guild_id = (i % 2 == 0).then(|| "g".to_string());
        h.push(new).await;
        let lease = h.claim().await.lease;
        h.clock.advance(1_000);
        h.store().complete(&lease, result("r")).await.unwrap();
    }
    let store = h.store();
    let query = |f: LogQuery| async move { store.query(&f).await.unwrap() };
    let ann = query(LogQuery {
        user_id: Some("ann".into()),
        limit: 50,
        ..Default::default()
    })
    .await;
    let prompts: Vec<_> = ann.entries.iter().map(|e| e.prompt.as_str()).collect();
    assert_eq!(prompts, ["p20", "p15", "p10", "p5", "p0"]);
    assert!(ann.next_cursor.is_none());

    let ann_in_g = query(LogQuery {
        user_id: Some("ann".into()),
        guild_id: Some("g".into()),
        limit: 50,
        ..Default::default()
    })
    .await;
    let prompts: Vec<_> = ann_in_g.entries.iter().map(|e| e.prompt.as_str()).collect();
    assert_eq!(prompts, ["p20", "p10", "p0"]);

    let global = query(LogQuery {
        guild_id: Some("global".into()),
        limit: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(global.entries.len(), 12);

    // Time window: entries finished in [T0+5s, T0+10s).
    let window = query(LogQuery {
        since: Some(T0 + 5_000),
        until: Some(T0 + 10_000),
        limit: 50,
        ..Default::default()
    })
    .await;
    let prompts: Vec<_> = window.entries.iter().map(|e| e.prompt.as_str()).collect();
    assert_eq!(prompts, ["p8", "p7", "p6", "p5", "p4"]);

    // Cursor pagination covers everything exactly once, also under a filter.
    for (user, expected) in [
        (
            None,
            (0..25).rev().map(|i| format!("p{i}")).collect::<Vec<_>>(),
        ),
        (
            Some("ben"),
            (0..25)
                .rev()
                .filter(|i| i % 5 != 0)
                .map(|i| format!("p{i}"))
                .collect(),
        ),
    ] {
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = query(LogQuery {
                user_id: user.map(str::to_owned),
                cursor: cursor.clone(),
                limit: 7,
                ..Default::default()
            })
            .await;
            assert!(page.entries.len() <= 7);
            seen.extend(page.entries.iter().map(|e| e.prompt.clone()));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, expected, "user {user:?}");
    }
}

pub async fn a_cursor_the_store_did_not_make_is_refused(h: Harness) {
    for text in ["", "nope", "0000", "zz".repeat(16).as_str()] {
        let q = LogQuery {
            cursor: Some(crate::domain::Cursor::from_client(text.to_owned())),
            limit: 10,
            ..Default::default()
        };
        assert!(
            matches!(h.store().query(&q).await, Err(StoreError::InvalidCursor)),
            "cursor {text:?}"
        );
    }
}

pub async fn abandoned_claims_come_back_with_their_attempts(mut h: Harness) {
    let job = h.push(NewJob::prompt("u", "x")).await;
    let lease = h.claim().await.lease;
    h.store().fail(&lease, err("e"), Some(1)).await.unwrap();
    h.clock.advance(1);
    let again = h.claim().await;
    assert_eq!(again.job.state, JobState::Active);
    let mut d = NewJob::prompt("u", "later");
    d.delay_ms = 30_000 + RECOVERY_MS;
    let delayed = h.push(d).await;
    h.store().sync().await.unwrap();
    // Dropped while active: as after a crash.
    h.reopen().await;
    h.recover_abandoned_claims().await;
    let recovered = h.store().get(job.id).await.unwrap().unwrap();
    assert_eq!(recovered.state, JobState::Queued);
    assert_eq!(
        recovered.attempts, 1,
        "the interrupted attempt is not counted"
    );
    let c = h.store().counts().await.unwrap();
    assert_eq!((c.queued, c.active, c.delayed), (1, 0, 1));
    assert_eq!(h.claim().await.job.id, job.id);
    // The delayed job kept its due time across the restart.
    assert_eq!(
        h.store().next_due().await.unwrap(),
        Some(T0 + 1 + 30_000 + RECOVERY_MS)
    );
    h.clock.advance(30_000);
    assert_eq!(h.claim().await.job.id, delayed.id);
}

pub async fn a_stale_lease_cannot_complete_or_fail(mut h: Harness) {
    let job = h.push(NewJob::prompt("u", "x")).await;
    let stale = h.claim().await.lease;
    let forged = Lease {
        job_id: job.id,
        token: stale.token.wrapping_add(1),
    };
    assert!(matches!(
        h.store().complete(&forged, result("forged")).await,
        Err(StoreError::LeaseLost(_))
    ));
    h.reopen().await;
    h.recover_abandoned_claims().await;
    let current = h.claim().await;
    assert_eq!(current.job.id, job.id);
    assert_ne!(
        current.lease.token, stale.token,
        "each claim has its own token"
    );
    for outcome in [
        h.store().complete(&stale, result("late")).await.map(|_| ()),
        h.store().fail(&stale, err("late"), None).await.map(|_| ()),
        h.store()
            .fail(&stale, err("late"), Some(10))
            .await
            .map(|_| ()),
    ] {
        assert!(
            matches!(outcome, Err(StoreError::LeaseLost(_))),
            "{outcome:?}"
        );
    }
    let still = h.store().get(job.id).await.unwrap().unwrap();
    assert_eq!(
        (still.state, still.attempts),
        (JobState::Active, 0),
        "nothing recorded"
    );
    let done = h
        .store()
        .complete(&current.lease, result("right"))
        .await
        .unwrap();
    assert_eq!(done.result.unwrap().reply, "right");
    assert!(matches!(
        h.store().complete(&stale, result("late")).await,
        Err(StoreError::LeaseLost(_))
    ));
    let log = h.all_log().await;
    assert_eq!(log.len(), 1, "one recorded outcome");
    assert_eq!(log[0].reply.as_deref(), Some("right"));
}

pub async fn heartbeats_keep_only_held_leases(h: Harness) {
    for i in 0..3 {
        h.push(NewJob::prompt("u", &format!("{i}"))).await;
    }
    let a = h.claim().await.lease;
    let b = h.claim().await.lease;
    let c = h.claim().await.lease;
    h.store().complete(&b, result("done")).await.unwrap();
    let forged = Lease {
        job_id: c.job_id,
        token: c.token.wrapping_add(7),
    };
    let held = h.store().heartbeat(&[a, b, c, forged]).await.unwrap();
    assert_eq!(held, vec![a, c]);
    assert!(h.store().heartbeat(&[]).await.unwrap().is_empty());
}

pub async fn a_job_pushed_claimed_is_this_callers_alone_and_recovered_like_any_claim(
    mut h: Harness,
) {
    let queued = h.push(NewJob::prompt("u", "queued first")).await;
    h.store().set_paused(true).await.unwrap();
    assert!(
        h.store()
            .push_claimed(NewJob::prompt("u", "paused"))
            .await
            .unwrap()
            .is_none(),
        "nothing is claimed while paused, this way either"
    );
    assert_eq!(
        h.store().counts().await.unwrap().queued,
        1,
        "and nothing stored"
    );
    h.store().set_paused(false).await.unwrap();
    let mine = h
        .store()
        .push_claimed(NewJob::prompt("u", "streamed"))
        .await
        .unwrap()
        .expect("claimed while running");
    assert_eq!(mine.job.state, JobState::Active);
    assert_eq!(mine.lease.job_id, mine.job.id);
    let first = h.claim().await;
    assert_eq!(first.job.id, queued.id, "claims skip it");
    assert!(h.claim_none().await);
    let c = h.store().counts().await.unwrap();
    assert_eq!((c.active, c.queued), (2, 0));
    h.store()
        .complete(&first.lease, result("first"))
        .await
        .unwrap();
    let done = h
        .store()
        .complete(&mine.lease, result("streamed reply"))
        .await
        .unwrap();
    assert_eq!((done.state, done.attempts), (JobState::Completed, 1));
    // One whose process died before it ran comes back for anyone, its lease no longer good.
    let abandoned = h
        .store()
        .push_claimed(NewJob::prompt("u", "orphan"))
        .await
        .unwrap()
        .expect("claimed");
    h.reopen().await;
    h.recover_abandoned_claims().await;
    let again = h.claim().await;
    assert_eq!((again.job.id, again.job.attempts), (abandoned.job.id, 0));
    assert!(matches!(
        h.store().complete(&abandoned.lease, result("late")).await,
        Err(StoreError::LeaseLost(_))
    ));
}

pub async fn concurrent_claims_hand_out_each_job_exactly_once(h: Harness) {
    const JOBS: usize = 400;
    const CLAIMERS: usize = 64;
    let mut pushed = HashSet::new();
    for i in 0..JOBS {
        pushed.insert(h.push(NewJob::prompt("u", &format!("{i}"))).await.id);
    }
    let mut tasks = Vec::new();
    for _ in 0..CLAIMERS {
        let store = Arc::clone(h.store());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(claimed) = store.claim().await.unwrap() {
                mine.push(claimed.job.id);
                store.complete(&claimed.lease, result("ok")).await.unwrap();
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
    assert_eq!(h.store().counts().await.unwrap().completed, JOBS as u64);
    assert_eq!(h.all_log().await.len(), JOBS, "one entry per job");
}

/// Pushes racing claimers must still hand every job out exactly once, and racing pushes
/// with one idempotency key must still make one job.
pub async fn pushes_racing_claims_lose_nothing_and_one_idempotency_key_makes_one_job(h: Harness) {
    const PUSHERS: usize = 8;
    const EACH: usize = 100;
    let claimed_total = Arc::new(AtomicUsize::new(0));
    let claimers: Vec<_> = (0..8)
        .map(|_| {
            let (store, claimed_total) = (Arc::clone(h.store()), Arc::clone(&claimed_total));
            tokio::spawn(async move {
                let mut mine = Vec::new();
                let give_up = Instant::now() + Duration::from_secs(30);
                while claimed_total.load(Ordering::SeqCst) < PUSHERS * EACH
                    && Instant::now() < give_up
                {
                    match store.claim().await.unwrap() {
                        Some(claimed) => {
                            claimed_total.fetch_add(1, Ordering::SeqCst);
                            mine.push(claimed.job.id);
                            store.complete(&claimed.lease, result("ok")).await.unwrap();
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
            let store = Arc::clone(h.store());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..EACH {
                    let new = NewJob::prompt("u", &format!("{p}-{i}"));
                    ids.push(store.push(new).await.unwrap().job.id);
                }
                ids
            })
        })
        .collect();
    let same_key: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(h.store());
            let mut new = NewJob::prompt("u", &format!("keyed {i}"));
            new.idempotency_key = Some("one".into());
            tokio::spawn(async move { store.push(new).await.unwrap() })
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
    let left = h.store().claim().await.unwrap().map(|c| c.job.id);
    let mut all = unique.clone();
    all.extend(left);
    assert_eq!(all, pushed, "every pushed job claimable exactly once");
    assert!(h.claim_none().await);
}

pub async fn a_job_pushed_finished_is_completed_logged_and_announced_even_while_paused(
    mut h: Harness,
) {
    h.store().set_paused(true).await.unwrap();
    let mut new = NewJob::prompt("u", "what are the rules?");
    new.guild_id = Some("g".into());
    new.id = Some(uuid::Uuid::new_v4());
    let mut finished = h.signals.finished.subscribe(new.id.unwrap());
    let mut hit = result("Be kind.");
    hit.cached = true;
    hit.usage = Some(Usage::default());
    let pushed = h.store().push_finished(new, hit.clone()).await.unwrap();
    assert!(pushed.created);
    let job = pushed.job;
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.result.as_ref(), Some(&hit));
    assert_eq!(job.attempts, 0, "no attempt was made");
    assert_eq!(job.finished_at, Some(T0));
    let announced = tokio::time::timeout(Duration::from_secs(5), finished.finished())
        .await
        .expect("the finish was announced")
        .expect("with the job");
    assert_eq!(announced, job);
    let counts = h.store().counts().await.unwrap();
    assert_eq!((counts.completed, counts.queued, counts.active), (1, 0, 0));
    let log = h.all_log().await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].job_id, job.id);
    assert_eq!(log[0].action, Action::ChatBotInteraction);
    assert!(log[0].cached, "the log says the reply came from the cache");
    assert_eq!(log[0].reply.as_deref(), Some("Be kind."));
    assert_eq!(log[0].guild_id, "g");

    // Nothing for a worker to do, before or after a restart; the job and its entry stay.
    h.reopen().await;
    h.store().set_paused(false).await.unwrap();
    assert!(h.claim_none().await);
    assert_eq!(h.store().get(job.id).await.unwrap(), Some(job.clone()));
    assert_eq!(h.all_log().await.len(), 1);

    // An idempotency key that names a job returns it, whatever state it is in.
    let mut keyed = NewJob::prompt("u", "again");
    keyed.idempotency_key = Some("k".into());
    let first = h.push(keyed.clone()).await;
    let again = h.store().push_finished(keyed, hit).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.job.id, first.id);
    assert_eq!(again.job.state, JobState::Queued);
    // A pre-assigned id that is taken is refused.
    let mut taken = NewJob::prompt("u", "x");
    taken.id = Some(job.id);
    assert!(matches!(
        h.store().push_finished(taken, result("y")).await,
        Err(StoreError::Conflict { .. })
    ));
}

fn cache_key(n: u8) -> crate::domain::CacheKey {
    crate::domain::CacheKey([n; 32])
}

fn reply(text: &str) -> crate::domain::CachedReply {
    crate::domain::CachedReply {
        reply: text.into(),
        model: "m".into(),
    }
}

pub async fn cache_entries_are_served_until_they_expire_and_survive_reopen(mut h: Harness) {
    let store = h.store().clone();
    assert_eq!(store.cache_get(&cache_key(1), 10_000).await.unwrap(), None);
    store
        .cache_put(&cache_key(1), "g", &reply("Read #rules."), 10_000)
        .await
        .unwrap();
    assert_eq!(
        store.cache_get(&cache_key(1), 10_000).await.unwrap(),
        Some(reply("Read #rules."))
    );
    assert_eq!(store.cache_get(&cache_key(2), 10_000).await.unwrap(), None);
    assert_eq!(store.cache_len().await.unwrap(), 1);
    // A put under the same key replaces the entry (and restarts its time).
    h.clock.advance(1_000);
    store
        .cache_put(&cache_key(1), "g", &reply("See #rules."), 10_000)
        .await
        .unwrap();
    assert_eq!(store.cache_len().await.unwrap(), 1);
    drop(store);
    // Entries are not made durable on every put; a clean sync is what a shutdown does.
    h.store().sync().await.unwrap();
    h.reopen().await;
    let store = h.store().clone();
    assert_eq!(
        store.cache_get(&cache_key(1), 10_000).await.unwrap(),
        Some(reply("See #rules.")),
        "the cache survives a restart"
    );
    h.clock.advance(9_999);
    assert!(
        store
            .cache_get(&cache_key(1), 10_000)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        store.cache_get(&cache_key(1), 5_000).await.unwrap(),
        None,
        "a shorter TTL asked now wins over the one stored"
    );
    h.clock.advance(1);
    assert_eq!(
        store.cache_get(&cache_key(1), 60_000).await.unwrap(),
        None,
        "expired at its TTL"
    );
    assert_eq!(store.cache_len().await.unwrap(), 1, "until maintenance");
    store.prune().await.unwrap();
    assert_eq!(store.cache_len().await.unwrap(), 0);
}

pub async fn the_cache_keeps_at_most_its_bound_newest_first_and_clears_by_guild(h: Harness) {
    let store = h.store();
    let over = CACHE_BOUND as u8 + 3;
    for n in 1..=over {
        store
            .cache_put(&cache_key(n), "g1", &reply(&format!("r{n}")), 60_000)
            .await
            .unwrap();
        h.clock.advance(1);
        assert!(store.cache_len().await.unwrap() <= CACHE_BOUND);
    }
    assert_eq!(store.cache_len().await.unwrap(), CACHE_BOUND);
    for n in 1..=over {
        let found = store.cache_get(&cache_key(n), 60_000).await.unwrap();
        assert_eq!(
            found.is_some(),
            u64::from(n) > u64::from(over) - CACHE_BOUND,
            "entry {n}: the oldest went first"
        );
    }
    // Replacing an entry keeps the bound and the new reply.
    store
        .cache_put(&cache_key(over), "g1", &reply("fresh"), 60_000)
        .await
        .unwrap();
    assert!(store.cache_len().await.unwrap() <= CACHE_BOUND);
    assert_eq!(
        store.cache_get(&cache_key(over), 60_000).await.unwrap(),
        Some(reply("fresh"))
    );
    assert!(
        store
            .cache_get(&cache_key(over - 1), 60_000)
            .await
            .unwrap()
            .is_some()
    );

    store.cache_clear(None).await.unwrap();
    assert_eq!(store.cache_len().await.unwrap(), 0);
    for (n, guild) in [(1, "g1"), (2, "g2"), (3, "g1")] {
        store
            .cache_put(&cache_key(n), guild, &reply("r"), 60_000)
            .await
            .unwrap();
    }
    assert_eq!(store.cache_clear(Some("g1")).await.unwrap(), 2);
    assert_eq!(store.cache_get(&cache_key(1), 60_000).await.unwrap(), None);
    assert!(
        store
            .cache_get(&cache_key(2), 60_000)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(store.cache_clear(Some("nobody")).await.unwrap(), 0);
    assert_eq!(store.cache_clear(None).await.unwrap(), 1);
    assert_eq!(store.cache_len().await.unwrap(), 0);
}

pub async fn guild_settings_are_stored_replaced_listed_and_removed(mut h: Harness) {
    use crate::domain::{GuildSettings, RateLimitSetting};
    let store = h.store().clone();
    assert_eq!(store.guild("g1").await.unwrap(), None);
    let settings = GuildSettings {
        personality: Some("technical".into()),
        instructions: Some("Answer in French.".into()),
        model: Some("m-large".into()),
        temperature: Some(0.25),
        max_tokens: Some(99),
        rate_limit: Some(RateLimitSetting {
            limit: 3,
            window_secs: 30,
        }),
        daily_token_quota: Some(1_000),
        cache_ttl_secs: Some(0),
        history_turns: Some(4),
        allowed_personalities: Some(vec!["technical".into(), "helpful".into()]),
    };
    let stored = store.put_guild("g1", &settings).await.unwrap();
    assert_eq!(
        (
            stored.guild_id.as_str(),
            &stored.settings,
            stored.updated_at
        ),
        ("g1", &settings, T0)
    );
    store
        .put_guild("a0", &GuildSettings::default())
        .await
        .unwrap();
    h.clock.advance(5);
    let replaced = GuildSettings {
        history_turns: Some(0),
        ..GuildSettings::default()
    };
    store.put_guild("g1", &replaced).await.unwrap();
    drop(store);
    h.reopen().await;
    let store = h.store().clone();
    let g1 = store.guild("g1").await.unwrap().expect("settings survive");
    assert_eq!(
        (g1.settings, g1.updated_at),
        (replaced, T0 + 5),
        "a put replaces"
    );
    let ids: Vec<String> = store
        .guilds()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.guild_id)
        .collect();
    assert_eq!(ids, ["a0", "g1"], "by id");
    assert!(store.delete_guild("g1").await.unwrap());
    assert!(!store.delete_guild("g1").await.unwrap());
    assert_eq!(store.guild("g1").await.unwrap(), None);
    assert_eq!(store.guilds().await.unwrap().len(), 1);
}

fn in_conversation(guild: Option<&str>, conversation: &str, prompt: &str) -> NewJob {
    let mut new = NewJob::prompt("u", prompt);
    new.guild_id = guild.map(str::to_owned);
    new.conversation_id = Some(conversation.to_owned());
    new
}

pub async fn a_completed_job_of_a_conversation_adds_its_turn_once(mut h: Harness) {
    use crate::domain::GLOBAL_GUILD;
    let job = h.push(in_conversation(Some("g"), "c", "hi")).await;
    let claimed = h.claim().await;
    h.store()
        .complete(&claimed.lease, result("hello"))
        .await
        .unwrap();
    h.clock.advance(1);
    // Another guild's conversation of the same id, one outside any guild, a failed job and
    // a reply from the cache.
    h.push(in_conversation(Some("other"), "c", "elsewhere"))
        .await;
    let claimed = h.claim().await;
    h.store()
        .complete(&claimed.lease, result("there"))
        .await
        .unwrap();
    h.push(in_conversation(None, "c", "no guild")).await;
    let claimed = h.claim().await;
    h.store()
        .complete(&claimed.lease, result("global"))
        .await
        .unwrap();
    h.push(in_conversation(Some("g"), "c", "fails")).await;
    let claimed = h.claim().await;
    h.store()
        .fail(&claimed.lease, err("bad_request"), None)
        .await
        .unwrap();
    h.clock.advance(1);
    let mut hit = result("hello again");
    hit.cached = true;
    h.store()
        .push_finished(in_conversation(Some("g"), "c", "hi again"), hit)
        .await
        .unwrap();

    h.reopen().await;
    let store = h.store().clone();
    let turns = store.turns("g", "c", 10).await.unwrap();
    let said: Vec<(&str, &str)> = turns
        .iter()
        .map(|t| (t.prompt.as_str(), t.reply.as_str()))
        .collect();
    assert_eq!(
        said,
        [("hi", "hello"), ("hi again", "hello again")],
        "oldest first"
    );
    assert_eq!(turns[0].job_id, job.id);
    assert_eq!((turns[0].at, turns[0].user_id.as_str()), (T0, "u"));
    assert_eq!(
        store.turns("g", "c", 1).await.unwrap()[0].prompt,
        "hi again"
    );
    assert_eq!(store.turns("other", "c", 10).await.unwrap().len(), 1);
    assert_eq!(
        store.turns(GLOBAL_GUILD, "c", 10).await.unwrap()[0].reply,
        "global"
    );
    assert!(store.turns("g", "nope", 10).await.unwrap().is_empty());

    assert_eq!(store.forget("g", "c").await.unwrap(), 2);
    assert!(store.turns("g", "c", 10).await.unwrap().is_empty());
    assert_eq!(store.turns("other", "c", 10).await.unwrap().len(), 1);
    drop(store);
    h.reopen().await;
    assert!(
        h.store().turns("g", "c", 10).await.unwrap().is_empty(),
        "forgotten for good"
    );
}

pub async fn a_conversation_keeps_its_newest_turns_and_forgets_old_ones(h: Harness) {
    use crate::store::MAX_TURNS;
    let store = h.store();
    let n = MAX_TURNS + 5;
    for i in 0..n {
        store
            .push_finished(
                in_conversation(Some("g"), "long", &format!("p{i}")),
                result("r"),
            )
            .await
            .unwrap();
        h.clock.advance(1);
    }
    let turns = store.turns("g", "long", 1_000).await.unwrap();
    assert_eq!(turns.len(), MAX_TURNS);
    assert_eq!(turns[0].prompt, "p5", "the oldest went first");
    assert_eq!(turns[MAX_TURNS - 1].prompt, format!("p{}", n - 1));
    // 30 days (the contract's backends keep the default age).
    h.clock.advance(30 * 86_400_000 - 100);
    store
        .push_finished(in_conversation(Some("g"), "fresh", "new"), result("r"))
        .await
        .unwrap();
    h.clock.advance(200);
    store.prune().await.unwrap();
    assert!(store.turns("g", "long", 1_000).await.unwrap().is_empty());
    assert_eq!(store.turns("g", "fresh", 10).await.unwrap().len(), 1);
}

pub async fn usage_totals_are_the_logs_grouped(h: Harness) {
    use crate::domain::{GroupBy, UsageQuery, UsageRow, time_key};
    let store = h.store();
    let finish = |user: &str, guild: Option<&str>| {
        let mut new = NewJob::prompt(user, "q");
        new.guild_id = guild.map(str::to_owned);
        new
    };
    // Day one: u1 completes twice in g1 (once from the cache), u2 fails in g1.
    for (user, guild, outcome) in [
        ("u1", Some("g1"), "ok"),
        ("u2", Some("g1"), "fail"),
        ("u1", Some("g1"), "cached"),
    ] {
        if outcome == "cached" {
            let mut hit = result("r");
            hit.cached = true;
            hit.usage = Some(Usage::default());
            store.push_finished(finish(user, guild), hit).await.unwrap();
            continue;
        }
        h.push(finish(user, guild)).await;
        let claimed = h.claim().await;
        if outcome == "ok" {
            store.complete(&claimed.lease, result("r")).await.unwrap();
        } else {
            store
                .fail(&claimed.lease, err("bad_request"), None)
                .await
                .unwrap();
        }
    }
    // Day two: u2 gets a fallback reply outside any guild.
    h.clock.advance(86_400_000);
    h.push(finish("u2", None)).await;
    let claimed = h.claim().await;
    let mut fallback = result("canned");
    fallback.used_fallback = true;
    fallback.usage = None;
    store.complete(&claimed.lease, fallback).await.unwrap();

    let query = |group_by, guild_id: Option<&str>, user_id: Option<&str>, since| UsageQuery {
        guild_id: guild_id.map(str::to_owned),
        user_id: user_id.map(str::to_owned),
        since,
        until: None,
        group_by,
    };
    let row =
        |key: &str, requests, completed, failed, fallback, cached, tokens: (u64, u64)| UsageRow {
            key: key.to_owned(),
            requests,
            completed,
            failed,
            fallback,
            cached,
            prompt_tokens: tokens.0,
            completion_tokens: tokens.1,
        };
    let by_user = store
        .usage(&query(GroupBy::User, None, None, None))
        .await
        .unwrap();
    assert_eq!(
        by_user,
        [
            row("u1", 2, 2, 0, 0, 1, (3, 4)),
            row("u2", 2, 1, 1, 1, 0, (0, 0))
        ]
    );
    let by_guild = store
        .usage(&query(GroupBy::Guild, None, None, None))
        .await
        .unwrap();
    assert_eq!(
        by_guild,
        [
            row("g1", 3, 2, 1, 0, 1, (3, 4)),
            row("global", 1, 1, 0, 1, 0, (0, 0))
        ]
    );
    let by_day = store
        .usage(&query(GroupBy::Day, None, None, None))
        .await
        .unwrap();
    let keys: Vec<&str> = by_day.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            time_key(GroupBy::Day, T0).as_str(),
            time_key(GroupBy::Day, T0 + 86_400_000).as_str()
        ]
    );
    assert_eq!(by_day[0].requests, 3);
    // Filters: one user in one guild, and a time range.
    let one = store
        .usage(&query(GroupBy::User, Some("g1"), Some("u2"), None))
        .await
        .unwrap();
    assert_eq!(one, [row("u2", 1, 0, 1, 0, 0, (0, 0))]);
    let later = store
        .usage(&query(GroupBy::Guild, None, None, Some(T0 + 1)))
        .await
        .unwrap();
    assert_eq!(later, [row("global", 1, 1, 0, 1, 0, (0, 0))]);
    // The totals are the log's.
    let log = h.all_log().await;
    let mut from_log = UsageRow::default();
    log.iter().for_each(|e| from_log.add(e));
    let total = by_user.iter().fold(UsageRow::default(), |mut t, r| {
        t.requests += r.requests;
        t.prompt_tokens += r.prompt_tokens;
        t.completion_tokens += r.completion_tokens;
        t.cached += r.cached;
        t
    });
    assert_eq!(
        (
            total.requests,
            total.prompt_tokens,
            total.completion_tokens,
            total.cached
        ),
        (
            from_log.requests,
            from_log.prompt_tokens,
            from_log.completion_tokens,
            from_log.cached
        )
    );
}

pub async fn deliveries_are_leased_once_retried_after_the_lease_and_kept(mut h: Harness) {
    use crate::domain::{Delivery, DeliveryState, Target};
    let job = uuid::Uuid::new_v4();
    let delivery = |due: u64, state: DeliveryState| Delivery {
        id: uuid::Uuid::new_v4(),
        job_id: job,
        target: Target::Discord {
            application_id: "app".into(),
            token: "tok".into(),
        },
        state,
        attempts: 0,
        sent: 0,
        created_at: T0,
        next_at: due,
        expires_at: T0 + 900_000,
        last_error: None,
        fallback: false,
    };
    let now = delivery(T0, DeliveryState::Pending);
    let later = delivery(T0 + 1_000, DeliveryState::Pending);
    let done = delivery(T0, DeliveryState::Delivered);
    for d in [&now, &later, &done] {
        h.store().add_delivery(d).await.unwrap();
    }
    let claimed = h.store().claim_deliveries(10, 30_000).await.unwrap();
    assert_eq!(claimed.len(), 1, "only what is pending and due");
    assert_eq!(
        (claimed[0].id, claimed[0].next_at),
        (now.id, T0 + 30_000),
        "leased"
    );
    assert!(
        h.store()
            .claim_deliveries(10, 30_000)
            .await
            .unwrap()
            .is_empty(),
        "held by the lease"
    );
    h.clock.advance(1_000);
    let claimed = h.store().claim_deliveries(10, 30_000).await.unwrap();
    assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), [later.id]);
    // An attempt's outcome is kept; a lease that ran out (its claimer died) frees the delivery.
    let mut delivered = now.clone();
    delivered.state = DeliveryState::Delivered;
    delivered.attempts = 1;
    delivered.sent = 2;
    h.store().save_delivery(&delivered).await.unwrap();
    h.reopen().await;
    h.clock.advance(30_000);
    let again = h.store().claim_deliveries(10, 30_000).await.unwrap();
    assert_eq!(again.iter().map(|d| d.id).collect::<Vec<_>>(), [later.id]);
    let all = h.store().deliveries(job).await.unwrap();
    assert_eq!(all.len(), 3);
    let kept = all.iter().find(|d| d.id == now.id).unwrap();
    assert_eq!(
        (kept.state, kept.attempts, kept.sent),
        (DeliveryState::Delivered, 1, 2)
    );
    assert!(
        h.store()
            .deliveries(uuid::Uuid::new_v4())
            .await
            .unwrap()
            .is_empty()
    );

    // Claims racing each other hand out each delivery once.
    for _ in 0..20 {
        let mut d = delivery(T0, DeliveryState::Pending);
        d.next_at = crate::clock::Clock::now_ms(h.clock.as_ref());
        h.store().add_delivery(&d).await.unwrap();
    }
    h.clock.advance(40_000);
    let (a, b) = tokio::join!(
        h.store().claim_deliveries(15, 60_000),
        h.store().claim_deliveries(15, 60_000)
    );
    let mut ids: Vec<_> = a
        .unwrap()
        .into_iter()
        .chain(b.unwrap())
        .map(|d| d.id)
        .collect();
    let claimed = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), claimed, "no delivery claimed twice");
    assert_eq!(
        claimed, 21,
        "the twenty new ones and the one whose lease ran out"
    );
}

pub async fn a_jobs_finish_wakes_its_waiting_deliveries_never_a_leased_one(mut h: Harness) {
    use crate::domain::{Delivery, DeliveryState, Target};
    let delivery = |job: uuid::Uuid, due: u64, state: DeliveryState| Delivery {
        id: uuid::Uuid::new_v4(),
        job_id: job,
        target: Target::Webhook {
            url: "http://hooks.test/in".into(),
        },
        state,
        attempts: 0,
        sent: 0,
        created_at: T0,
        next_at: due,
        expires_at: T0 + 86_400_000,
        last_error: None,
        fallback: false,
    };
    let (job, other) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let parked = delivery(job, T0 + 30_000, DeliveryState::Waiting);
    let due = delivery(job, T0, DeliveryState::Pending);
    let elsewhere = delivery(other, T0 + 30_000, DeliveryState::Waiting);
    for d in [&parked, &due, &elsewhere] {
        h.store().add_delivery(d).await.unwrap();
    }
    let claimed = h.store().claim_deliveries(10, 60_000).await.unwrap();
    assert_eq!(
        claimed.iter().map(|d| d.id).collect::<Vec<_>>(),
        [due.id],
        "a waiting delivery is not due before its backstop"
    );
    assert_eq!(
        h.store().wake_deliveries(job).await.unwrap(),
        1,
        "the waiting one, not the one under a lease"
    );
    let claimed = h.store().claim_deliveries(10, 60_000).await.unwrap();
    assert_eq!(
        claimed.iter().map(|d| d.id).collect::<Vec<_>>(),
        [parked.id]
    );
    assert_eq!(
        (claimed[0].state, claimed[0].next_at),
        (DeliveryState::Pending, T0 + 60_000),
        "claimed: pending under the lease"
    );
    assert_eq!(
        h.store().wake_deliveries(job).await.unwrap(),
        0,
        "nothing waits now: both are leased"
    );
    // Waiting survives a reopen, and so does the wake-up's effect.
    h.reopen().await;
    let kept = h.store().deliveries(other).await.unwrap();
    assert_eq!(kept[0].state, DeliveryState::Waiting);
    assert!(
        h.store()
            .claim_deliveries(10, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(h.store().wake_deliveries(other).await.unwrap(), 1);
    h.reopen().await;
    let claimed = h.store().claim_deliveries(10, 60_000).await.unwrap();
    assert_eq!(
        claimed.iter().map(|d| d.id).collect::<Vec<_>>(),
        [elsewhere.id]
    );
    // A waiting delivery whose wake-up never came is due at its backstop.
    let lost = delivery(uuid::Uuid::new_v4(), T0 + 5_000, DeliveryState::Waiting);
    h.store().add_delivery(&lost).await.unwrap();
    h.clock.advance(5_000);
    let claimed = h.store().claim_deliveries(10, 60_000).await.unwrap();
    assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), [lost.id]);
    assert_eq!(claimed[0].state, DeliveryState::Pending);
    // Ended deliveries are never claimed or woken.
    let mut ended = delivery(job, T0, DeliveryState::Delivered);
    h.store().add_delivery(&ended).await.unwrap();
    ended.state = DeliveryState::Failed;
    h.store().save_delivery(&ended).await.unwrap();
    assert_eq!(h.store().wake_deliveries(job).await.unwrap(), 0);
    h.clock.advance(120_000);
    let claimed = h.store().claim_deliveries(10, 60_000).await.unwrap();
    assert!(
        claimed.iter().all(|d| d.id != ended.id),
        "an ended delivery is never claimed"
    );
    assert_eq!(claimed.len(), 4, "the four open ones, their leases over");
}

pub async fn tokens_spent_is_the_days_log_of_that_user_in_that_guild(mut h: Harness) {
    use crate::domain::{GroupBy, UsageQuery, UsageRow, utc_day_start};
    let day = utc_day_start(crate::clock::Clock::now_ms(h.clock.as_ref()));
    let store = h.store().clone();
    let spent = |store: Arc<dyn Store>, guild: &'static str, user: &'static str, day| async move {
        store.tokens_spent(guild, user, day).await.unwrap()
    };
    // Asked before anything was spent (a backend that keeps totals starts keeping one here).
    assert_eq!(spent(store.clone(), "g1", "u1", day).await, 0);
    let finish = |user: &str, guild: Option<&str>| {
        let mut new = NewJob::prompt(user, "q");
        new.guild_id = guild.map(str::to_owned);
        new
    };
    for (user, guild) in [("u1", Some("g2")), ("u2", Some("g1")), ("u1", None)] {
        h.push(finish(user, guild)).await;
        let claimed = h.claim().await;
        store.complete(&claimed.lease, result("r")).await.unwrap();
    }
    assert_eq!(
        spent(store.clone(), "g1", "u1", day).await,
        0,
        "others' tokens"
    );
    // First checks of the day racing completions (20 users, one job each): every job
    // counted once, none missed, whichever comes first.
    for i in 0..20 {
        h.push(finish(&format!("r{i}"), Some("g1"))).await;
    }
    let mut tasks = Vec::new();
    for i in 0..20 {
        let worker = store.clone();
        tasks.push(tokio::spawn(async move {
            let claimed = worker.claim().await.unwrap().unwrap();
            worker.complete(&claimed.lease, result("r")).await.unwrap();
        }));
        let checker = store.clone();
        tasks.push(tokio::spawn(async move {
            checker
                .tokens_spent("g1", &format!("r{i}"), day)
                .await
                .unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for i in 0..20 {
        let user = format!("r{i}");
        assert_eq!(
            store.tokens_spent("g1", &user, day).await.unwrap(),
            7,
            "{user}"
        );
    }
    for _ in 0..20 {
        h.push(finish("u1", Some("g1"))).await;
        let claimed = h.claim().await;
        store.complete(&claimed.lease, result("r")).await.unwrap();
    }
    // A failure spends nothing; a hit from the cache spends its usage (zero).
    h.push(finish("u1", Some("g1"))).await;
    let claimed = h.claim().await;
    store
        .fail(&claimed.lease, err("bad_request"), None)
        .await
        .unwrap();
    let from_log: u64 = store
        .usage(&UsageQuery {
            guild_id: Some("g1".into()),
            user_id: Some("u1".into()),
            since: Some(day),
            until: None,
            group_by: GroupBy::User,
        })
        .await
        .unwrap()
        .iter()
        .map(UsageRow::tokens)
        .sum();
    assert_eq!(from_log, 20 * 7);
    assert_eq!(spent(store.clone(), "g1", "u1", day).await, from_log);
    drop(store);
    h.reopen().await;
    assert_eq!(spent(h.store().clone(), "g1", "u1", day).await, from_log);
    // The next day starts from zero; yesterday's total stays what it was.
    h.clock.advance(86_400_000);
    let tomorrow = day + 86_400_000;
    assert_eq!(spent(h.store().clone(), "g1", "u1", tomorrow).await, 0);
    h.push(finish("u1", Some("g1"))).await;
    let claimed = h.claim().await;
    h.store()
        .complete(&claimed.lease, result("r"))
        .await
        .unwrap();
    assert_eq!(spent(h.store().clone(), "g1", "u1", tomorrow).await, 7);
    assert_eq!(spent(h.store().clone(), "g1", "u1", day).await, from_log);
}
