//! The embedded store: the contract suite, then what only this backend has (its record
//! bookkeeping, sled's blob files, one owner per directory, group commit, the free-space
//! reserve), driven step by step with a manual clock.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::record;
use super::{ResilientQueue, SledQueue};
use crate::clock::{ManualClock, SharedClock};
use crate::domain::{JobState, LogQuery, NewJob};
use crate::signals::{JobNotifier, Signals};
use crate::store::contract::{self, Backend, T0, err, result};
use crate::store::{
    Backend as StoreBackend, EmbeddedOptions, InteractionLog, JobStore, LogRetention, Maintenance,
    Store, StoreError, StoreHealth, StoreOptions, Unavailable,
};

/// The embedded store in a temporary directory, as chatq opens it.
struct Embedded {
    dir: tempfile::TempDir,
}

impl Embedded {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

fn options(dir: &std::path::Path) -> (StoreOptions, EmbeddedOptions) {
    let mut options = StoreOptions::embedded(dir);
    options.keep_completed = 3;
    options.keep_failed = 2;
    options.cache_max_entries = 5;
    let StoreBackend::Embedded(embedded) = options.backend.clone() else {
        unreachable!("built as embedded")
    };
    (options, embedded)
}

/// Retries an open while a store dropped a moment ago still closes its files on sled's
/// background threads.
fn retry_while_in_use<T>(mut open: impl FnMut() -> Result<T, StoreError>) -> T {
    for _ in 0..100 {
        match open() {
            Err(StoreError::InUse { .. }) => std::thread::sleep(Duration::from_millis(20)),
            other => return other.expect("open store"),
        }
    }
    panic!("store still locked after 2 s")
}

impl Backend for Embedded {
    fn open(
        &self,
        clock: SharedClock,
        notifier: Arc<dyn JobNotifier>,
    ) -> BoxFuture<'_, Arc<dyn Store>> {
        Box::pin(async move {
            let (options, embedded) = options(self.dir.path());
            let store = retry_while_in_use(|| {
                ResilientQueue::open(
                    options.clone(),
                    embedded.clone(),
                    clock.clone(),
                    notifier.clone(),
                )
            });
            Arc::new(store) as Arc<dyn Store>
        })
    }
}

contract::store_contract!(Some(Embedded::new()));

fn open_at(dir: &std::path::Path, clock: SharedClock) -> SledQueue {
    let (options, embedded) = options(dir);
    retry_while_in_use(|| {
        SledQueue::open(
            options.clone(),
            &embedded,
            clock.clone(),
            Arc::new(Signals::default()),
        )
    })
}

fn setup() -> (tempfile::TempDir, Arc<ManualClock>, SledQueue) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let queue = open_at(dir.path(), clock.clone());
    (dir, clock, queue)
}

/// The stored record of `id`, with the store's bookkeeping.
fn stored(q: &SledQueue, id: uuid::Uuid) -> record::StoredJob {
    let bytes = q.jobs_tree_for_tests().get(id.as_bytes()).unwrap().unwrap();
    record::decode_job(&bytes).unwrap()
}

#[tokio::test]
async fn a_finished_record_says_its_log_entry_is_written() {
    let (_dir, _clock, q) = setup();
    let done = q.push(NewJob::prompt("u", "x")).await.unwrap().job;
    let lease = q.claim().await.unwrap().unwrap().lease;
    q.complete(&lease, result("ok")).await.unwrap();
    assert!(
        !stored(&q, done.id).log_pending,
        "the stored record says its entry is written, so a reopen does not write it again"
    );
    let failed = q.push(NewJob::prompt("u", "y")).await.unwrap().job;
    let lease = q.claim().await.unwrap().unwrap().lease;
    q.fail(&lease, err("e"), None).await.unwrap();
    assert!(!stored(&q, failed.id).log_pending);
    assert_eq!(
        stored(&q, failed.id).lease,
        lease.token,
        "the token is on disk"
    );
}

#[tokio::test]
async fn log_retention_by_count_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (mut options, embedded) = options(dir.path());
    options.log_retention = LogRetention {
        max_entries: Some(5),
        max_age_ms: Some(60_000),
    };
    options.keep_completed = 100;
    let q = SledQueue::open(
        options,
        &embedded,
        clock.clone(),
        Arc::new(Signals::default()),
    )
    .unwrap();
    for i in 0..8 {
        q.push(NewJob::prompt(&format!("u{}", i % 2), "x"))
            .await
            .unwrap();
        let lease = q.claim().await.unwrap().unwrap().lease;
        clock.advance(1_000);
        q.complete(&lease, result("ok")).await.unwrap();
    }
    assert_eq!(q.prune().await.unwrap(), 3);
    let query = |user: Option<&str>| LogQuery {
        user_id: user.map(str::to_owned),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(q.query(&query(None)).await.unwrap().entries.len(), 5);
    assert_eq!(
        q.query(&query(Some("u0"))).await.unwrap().entries.len(),
        2,
        "index entries pruned with the log"
    );
    // Now T0+65.5 s: the remaining entries are from T0+4 s .. T0+8 s, and those older than
    // 60 s (T0+4 s and T0+5 s) go.
    clock.advance(57_500);
    assert_eq!(q.prune().await.unwrap(), 2);
    assert_eq!(q.query(&query(None)).await.unwrap().entries.len(), 3);
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
            ids.push(q.push(NewJob::prompt("u", prompt)).await.unwrap().job.id);
        }
        ids
    };
    let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
    assert!(blobs > 0, "the records were large enough to become blobs");
    let q = open_at(dir.path(), clock);
    for (id, prompt) in ids.iter().zip(&prompts) {
        assert_eq!(&q.get(*id).await.unwrap().unwrap().request.prompt, prompt);
    }
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused_clearly() {
    let (dir, clock, _q) = setup();
    let (options, embedded) = options(dir.path());
    match SledQueue::open(options, &embedded, clock, Arc::new(Signals::default())) {
        Err(e @ StoreError::InUse { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
            assert!(msg.contains("already in use"), "{msg}");
        }
        Err(other) => panic!("expected InUse, got {other}"),
        Ok(_) => panic!("expected InUse, got a second handle"),
    }
}

#[tokio::test]
async fn an_unreadable_record_is_an_error_not_a_panic() {
    let (_dir, _clock, q) = setup();
    let job = q.push(NewJob::prompt("u", "x")).await.unwrap().job;
    q.jobs_tree_for_tests()
        .insert(job.id.as_bytes(), &[42u8, 1, 2, 3][..])
        .unwrap();
    assert!(matches!(q.get(job.id).await, Err(StoreError::Corrupt(_))));
}

#[tokio::test]
async fn a_record_of_the_previous_release_opens_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let id = {
        let q = open_at(dir.path(), clock.clone());
        let job = q.push(NewJob::prompt("u", "old")).await.unwrap().job;
        let old = super::record::encode_version_2(&super::record::StoredJob {
            job: job.clone(),
            seq: 1,
            log_pending: false,
            lease: 0,
        })
        .unwrap();
        q.jobs_tree_for_tests()
            .insert(job.id.as_bytes(), old)
            .unwrap();
        q.sync().await.unwrap();
        job.id
    };
    let q = open_at(dir.path(), clock);
    let claimed = q.claim().await.unwrap().unwrap();
    assert_eq!(claimed.job.id, id);
    assert!(
        claimed.lease.token > 1,
        "tokens never reuse a sequence number"
    );
    q.complete(&claimed.lease, result("new")).await.unwrap();
    assert_eq!(stored(&q, id).lease, claimed.lease.token);
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
        let job = q.push(NewJob::prompt("carol", "hi")).await.unwrap().job;
        q.claim().await.unwrap().unwrap();
        // As if the process died after writing the finished record and before its entry.
        let mut finished = stored(&q, job.id);
        finished.job.state = JobState::Completed;
        finished.job.attempts = 1;
        finished.job.finished_at = Some(T0 + 5);
        finished.job.result = Some(result("cut off"));
        finished.log_pending = true;
        q.jobs_tree_for_tests()
            .insert(job.id.as_bytes(), record::encode_job(&finished).unwrap())
            .unwrap();
        q.sync().await.unwrap();
        job.id
    };
    for _ in 0..2 {
        let q = open_at(dir.path(), clock.clone());
        let page = q
            .query(&LogQuery {
                user_id: Some("carol".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            page.entries.len(),
            1,
            "written once, and not again on the next open"
        );
        assert_eq!(page.entries[0].job_id, id);
        assert_eq!(page.entries[0].reply.as_deref(), Some("cut off"));
        assert!(!stored(&q, id).log_pending);
        assert_eq!(q.counts().await.unwrap().completed, 1);
    }
}

#[tokio::test]
async fn below_the_free_space_reserve_pushes_are_refused_and_nothing_else_is() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (options, mut embedded) = options(dir.path());
    let notifier: Arc<dyn JobNotifier> = Arc::new(Signals::default());
    let open = |embedded: &EmbeddedOptions| {
        retry_while_in_use(|| {
            ResilientQueue::open(
                options.clone(),
                embedded.clone(),
                clock.clone(),
                notifier.clone(),
            )
        })
    };
    let q = open(&embedded);
    let queued = q.push(NewJob::prompt("u", "before")).await.unwrap().job;
    let claimed = q.claim().await.unwrap().unwrap();
    assert_eq!(claimed.job.id, queued.id);
    drop(q);

    // No disk has this much free: the reserve is always short.
    embedded.min_free_bytes = u64::MAX - 1;
    let q = open(&embedded);
    assert!(matches!(
        q.accepting().await,
        Err(StoreError::Unavailable(Unavailable::DiskFull { .. }))
    ));
    let refused = q.push(NewJob::prompt("u", "after")).await.unwrap_err();
    assert!(
        refused.to_string().contains("below the") && refused.to_string().contains("reserve"),
        "{refused}"
    );
    assert_eq!(
        q.counts().await.unwrap().queued,
        1,
        "the refused push stored nothing"
    );
    // Work already queued still runs and finishes.
    let claimed = q.claim().await.unwrap().unwrap();
    assert_eq!(claimed.job.id, queued.id, "recovered after the reopen");
    let done = q.complete(&claimed.lease, result("ok")).await.unwrap();
    assert_eq!(done.state, JobState::Completed);
    let status = q.status().await.unwrap().disk.unwrap();
    assert_eq!(status.reserve_bytes, u64::MAX - 1);
    assert!(
        status.free_bytes.is_some(),
        "the data dir's disk was measured"
    );
    assert!(status.failure.is_none());
}
