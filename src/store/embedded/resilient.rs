//! Keeps the queue serving through disk trouble.
//!
//! Two things go wrong with a disk: it fills up, and it fails a write. [`ResilientQueue`] wraps
//! the [`SledQueue`] and handles both.
//!
//! - **A reserve.** A monitor thread measures the free space of the data directory's file
//!   system every second. Below [`StoreOptions::min_free_bytes`], pushes are refused with
//!   [`StoreError::DiskFull`] while everything else goes on (workers finishing jobs, cancels,
//!   reads, retention), so the queue drains and the disk does not fill under sled. Pushes are
//!   accepted again at the first measurement that finds the space back.
//! - **Reopen after a failed write.** sled 0.34 remembers the first IO error of a database and
//!   fails every later write with it, for good. When an operation fails that way the queue is
//!   marked broken: pushes get [`StoreError::Reopening`] at once, claims find nothing, and the
//!   monitor reopens the store as soon as the reserve is free again. It waits for in-flight
//!   calls to let go of the broken handle, drops it, and opens the directory afresh. sled's
//!   recovery reads back everything that reached the disk (every acknowledged job did: it was
//!   flushed before its acknowledgement); jobs that were `active` go back to the queue
//!   (at-least-once), and waiting workers are woken.
//!
//! A reopen that fails (the directory became unreadable, say) is retried with a backoff from
//! 250 ms up to 30 s.
//!
//! Each incarnation of the store reports to the same [`JobNotifier`] (the app's signals), so
//! long-polls and idle workers carry on across a reopen.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use uuid::Uuid;

use super::{SledQueue, is_disk_failure};
use crate::clock::{Millis, SharedClock};
use crate::domain::{
    CacheKey, CachedReply, Guild, GuildSettings, Job, JobError, JobResult, JobState, LogPage,
    LogQuery, NewJob, QueueCounts, Turn, UsageQuery, UsageRow,
};
use crate::signals::JobNotifier;
use crate::store::{
    Claimed, Conversations, DiskStatus, EmbeddedOptions, FailOutcome, Guilds, InteractionLog,
    JobStore, Lease, Maintenance, Pushed, RateLimits, RateTake, ReplyCache, StoreError,
    StoreHealth, StoreOptions, StoreStatus, Unavailable,
};

/// How often the monitor measures free space and, when broken, tries to reopen.
const TICK: Duration = Duration::from_millis(250);
/// How long a reopen waits for in-flight calls to let go of the broken store.
const DRAIN: Duration = Duration::from_secs(5);
/// How long a reopen retries while sled still holds the directory's lock after the drop.
const RELOCK: Duration = Duration::from_secs(2);
/// Failed reopens are retried at most this far apart.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// `free` before the first measurement, or when measuring fails: do not refuse on a guess.
const UNKNOWN: u64 = u64::MAX;

struct Shared {
    options: StoreOptions,
    embedded: EmbeddedOptions,
    clock: SharedClock,
    notifier: Arc<dyn JobNotifier>,
    current: RwLock<Option<Arc<SledQueue>>>,
    /// Why the store stopped writing; `None` while it is healthy.
    broken: Mutex<Option<Arc<str>>>,
    free: AtomicU64,
    reopens: AtomicU64,
    stop: Mutex<bool>,
    tick: Condvar,
    /// Failed reopens back off: (earliest next attempt, current delay).
    retry: Mutex<(Instant, Duration)>,
}

/// The embedded store chatq runs on: a [`SledQueue`] with a free-space reserve and a reopen
/// after disk errors.
pub struct ResilientQueue {
    shared: Arc<Shared>,
    monitor: Option<JoinHandle<()>>,
}

impl ResilientQueue {
    /// Opens the store and starts the disk monitor thread.
    pub fn open(
        options: StoreOptions,
        embedded: EmbeddedOptions,
        clock: SharedClock,
        notifier: Arc<dyn JobNotifier>,
    ) -> Result<Self, StoreError> {
        let queue = SledQueue::open(options.clone(), &embedded, clock.clone(), notifier.clone())?;
        let shared = Arc::new(Shared {
            options,
            embedded,
            clock,
            notifier,
            current: RwLock::new(Some(Arc::new(queue))),
            broken: Mutex::new(None),
            free: AtomicU64::new(UNKNOWN),
            reopens: AtomicU64::new(0),
            stop: Mutex::new(false),
            tick: Condvar::new(),
            retry: Mutex::new((Instant::now(), TICK)),
        });
        shared.measure();
        let thread_shared = Arc::clone(&shared);
        let monitor = std::thread::Builder::new()
            .name("chatq-disk".into())
            .spawn(move || thread_shared.monitor())
            .map_err(|e| StoreError::Open {
                what: "could not start the disk monitor thread".to_owned(),
                source: Box::new(e),
            })?;
        Ok(Self {
            shared,
            monitor: Some(monitor),
        })
    }

    fn queue(&self) -> Result<Arc<SledQueue>, StoreError> {
        self.shared.queue()
    }

    /// Notes a disk failure in `result` (the store is then reopened by the monitor).
    fn watch<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result {
            if is_disk_failure(e) {
                self.shared.mark_broken(e);
            }
        }
        result
    }
}

impl Drop for ResilientQueue {
    fn drop(&mut self) {
        *lock(&self.shared.stop) = true;
        self.shared.tick.notify_all();
        if let Some(monitor) = self.monitor.take() {
            let _ = monitor.join();
        }
    }
}

/// Every lock here guards a plain value (a flag, an `Option`, a pair) that a panicking
/// holder cannot leave half-written, so a poisoned lock is taken as it is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn queue(&self) -> Result<Arc<SledQueue>, StoreError> {
        match &*read(&self.current) {
            Some(queue) => Ok(Arc::clone(queue)),
            None => Err(StoreError::Unavailable(match self.broken() {
                Some(cause) => Unavailable::Recovering { cause },
                None => Unavailable::Closed,
            })),
        }
    }

    fn broken(&self) -> Option<Arc<str>> {
        lock(&self.broken).clone()
    }

    fn mark_broken(&self, e: &StoreError) {
        let mut broken = lock(&self.broken);
        if broken.is_none() {
            tracing::error!(
                data_dir = %self.embedded.path.display(),
                error = %e,
                "the store failed a write; refusing new jobs and reopening it once the disk has room"
            );
            *broken = Some(e.to_string().into());
        }
    }

    fn reserve_ok(&self) -> Result<(), StoreError> {
        let free = self.free.load(Ordering::Relaxed);
        if free < self.embedded.min_free_bytes {
            return Err(StoreError::Unavailable(Unavailable::DiskFull {
                path: self.embedded.path.clone(),
                free,
                reserve: self.embedded.min_free_bytes,
            }));
        }
        Ok(())
    }

    fn measure(&self) {
        let before = self.free.load(Ordering::Relaxed);
        let free = match available_space(&self.embedded.path) {
            Ok(free) => free,
            Err(e) => {
                if before != UNKNOWN {
                    tracing::warn!(data_dir = %self.embedded.path.display(), error = %e, "cannot measure free disk space");
                }
                UNKNOWN
            }
        };
        self.free.store(free, Ordering::Relaxed);
        let reserve = self.embedded.min_free_bytes;
        if free < reserve && before >= reserve {
            tracing::warn!(
                data_dir = %self.embedded.path.display(),
                free_mib = free / (1024 * 1024),
                reserve_mib = reserve / (1024 * 1024),
                "disk nearly full: new jobs are refused until space is freed (--min-free-disk-mb)"
            );
        } else if free >= reserve && before < reserve {
            tracing::info!(data_dir = %self.embedded.path.display(), free_mib = free / (1024 * 1024), "disk space is back: accepting new jobs");
        }
    }

    fn monitor(&self) {
        loop {
            {
                let stop = lock(&self.stop);
                if *stop {
                    return;
                }
                let (stop, _) = self
                    .tick
                    .wait_timeout(stop, TICK)
                    .unwrap_or_else(|p| p.into_inner());
                if *stop {
                    return;
                }
            }
            self.measure();
            self.maybe_reopen();
        }
    }

    /// Reopens a broken store once the reserve is free.
    fn maybe_reopen(&self) {
        let Some(cause) = self.broken() else {
            return;
        };
        if self.reserve_ok().is_err() || Instant::now() < lock(&self.retry).0 {
            return;
        }
        let old = write(&self.current).take();
        if let Some(old) = old {
            if let Err(old) = let_go(old) {
                tracing::warn!("the broken store is still in use; trying again at the next tick");
                *write(&self.current) = Some(old);
                return;
            }
        }
        let deadline = Instant::now() + RELOCK;
        loop {
            match SledQueue::open(
                self.options.clone(),
                &self.embedded,
                self.clock.clone(),
                Arc::clone(&self.notifier),
            ) {
                Ok(queue) => {
                    *write(&self.current) = Some(Arc::new(queue));
                    *lock(&self.broken) = None;
                    *lock(&self.retry) = (Instant::now(), TICK);
                    self.reopens.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(data_dir = %self.embedded.path.display(), after = %cause, "store reopened; accepting new jobs");
                    self.notifier.work_available_for_all();
                    return;
                }
                Err(e) if Instant::now() < deadline && matches!(e, StoreError::InUse { .. }) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    let mut retry = lock(&self.retry);
                    let delay = retry.1;
                    *retry = (Instant::now() + delay, (delay * 2).min(MAX_RETRY));
                    tracing::error!(
                        error = %crate::store::error_chain(&e),
                        retry_in_ms = delay.as_millis() as u64,
                        "reopening the store failed"
                    );
                    return;
                }
            }
        }
    }
}

/// Drops `queue` once in-flight calls have let go of it, or gives it back after [`DRAIN`].
fn let_go(mut queue: Arc<SledQueue>) -> Result<(), Arc<SledQueue>> {
    let deadline = Instant::now() + DRAIN;
    loop {
        match Arc::try_unwrap(queue) {
            Ok(queue) => {
                drop(queue);
                return Ok(());
            }
            Err(still_used) if Instant::now() < deadline => {
                queue = still_used;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(still_used) => return Err(still_used),
        }
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `path` (or its
/// nearest existing ancestor).
fn available_space(path: &Path) -> std::io::Result<u64> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("."));
    fs2::available_space(existing)
}

#[async_trait]
impl JobStore for ResilientQueue {
    async fn push(&self, job: NewJob) -> Result<Pushed, StoreError> {
        self.accepting_now()?;
        let queue = self.queue()?;
        self.watch(queue.push(job).await)
    }

    async fn push_claimed(&self, job: NewJob) -> Result<Option<Claimed>, StoreError> {
        self.accepting_now()?;
        let queue = self.queue()?;
        self.watch(queue.push_claimed(job).await)
    }

    async fn push_finished(&self, job: NewJob, result: JobResult) -> Result<Pushed, StoreError> {
        self.accepting_now()?;
        let queue = self.queue()?;
        self.watch(queue.push_finished(job, result).await)
    }

    async fn claim(&self) -> Result<Option<Claimed>, StoreError> {
        // A broken store cannot mark a job active; the reopen wakes the workers.
        if self.shared.broken().is_some() {
            return Ok(None);
        }
        let queue = self.queue()?;
        self.watch(queue.claim().await)
    }

    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<Lease>, StoreError> {
        self.queue()?.heartbeat(leases).await
    }

    async fn complete(&self, lease: &Lease, result: JobResult) -> Result<Job, StoreError> {
        let queue = self.queue()?;
        self.watch(queue.complete(lease, result).await)
    }

    async fn fail(
        &self,
        lease: &Lease,
        error: JobError,
        retry_in: Option<u64>,
    ) -> Result<(Job, FailOutcome), StoreError> {
        let queue = self.queue()?;
        self.watch(queue.fail(lease, error, retry_in).await)
    }

    async fn cancel(&self, id: Uuid) -> Result<Job, StoreError> {
        let queue = self.queue()?;
        self.watch(queue.cancel(id).await)
    }

    async fn retry(&self, id: Uuid) -> Result<Job, StoreError> {
        let queue = self.queue()?;
        self.watch(queue.retry(id).await)
    }

    async fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        let queue = self.queue()?;
        self.watch(queue.set_paused(paused).await)
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        self.queue()?.get(id).await
    }

    async fn list(&self, state: JobState, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.queue()?.list(state, limit).await
    }

    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        // While the store reopens there is no count to give: an error, not zeros.
        self.queue()?.counts().await
    }

    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        self.queue()?.next_due().await
    }
}

#[async_trait]
impl InteractionLog for ResilientQueue {
    async fn query(&self, query: &LogQuery) -> Result<LogPage, StoreError> {
        self.queue()?.query(query).await
    }

    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let queue = self.queue()?;
        let query = query.clone();
        // A scan of (part of) the log: off the async threads.
        tokio::task::spawn_blocking(move || queue.usage_sync(&query))
            .await
            .map_err(|e| StoreError::Backend(Box::new(e)))?
    }

    async fn tokens_spent(
        &self,
        guild_id: &str,
        user_id: &str,
        day_start: Millis,
    ) -> Result<u64, StoreError> {
        let queue = self.queue()?;
        if let Some(tokens) = queue.tokens_spent_known(guild_id, user_id, day_start) {
            return Ok(tokens);
        }
        // The day's first question for this pair scans their entries: off the async threads.
        let (guild, user) = (guild_id.to_owned(), user_id.to_owned());
        tokio::task::spawn_blocking(move || queue.tokens_spent_sync(&guild, &user, day_start))
            .await
            .map_err(|e| StoreError::Backend(Box::new(e)))?
    }
}

#[async_trait]
impl Guilds for ResilientQueue {
    async fn guild(&self, guild_id: &str) -> Result<Option<Guild>, StoreError> {
        self.queue()?.guild(guild_id).await
    }

    async fn guilds(&self) -> Result<Vec<Guild>, StoreError> {
        self.queue()?.guilds().await
    }

    async fn put_guild(
        &self,
        guild_id: &str,
        settings: &GuildSettings,
    ) -> Result<Guild, StoreError> {
        let queue = self.queue()?;
        self.watch(queue.put_guild(guild_id, settings).await)
    }

    async fn delete_guild(&self, guild_id: &str) -> Result<bool, StoreError> {
        let queue = self.queue()?;
        self.watch(queue.delete_guild(guild_id).await)
    }
}

#[async_trait]
impl crate::store::Outbox for ResilientQueue {
    async fn add_delivery(&self, delivery: &crate::domain::Delivery) -> Result<(), StoreError> {
        let queue = self.queue()?;
        self.watch(queue.add_delivery(delivery).await)
    }

    async fn claim_deliveries(
        &self,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<crate::domain::Delivery>, StoreError> {
        if self.shared.broken().is_some() {
            return Ok(Vec::new());
        }
        let queue = self.queue()?;
        self.watch(queue.claim_deliveries(limit, lease_ms).await)
    }

    async fn wake_deliveries(&self, job_id: Uuid) -> Result<u64, StoreError> {
        let queue = self.queue()?;
        self.watch(queue.wake_deliveries(job_id).await)
    }

    async fn save_delivery(&self, delivery: &crate::domain::Delivery) -> Result<(), StoreError> {
        let queue = self.queue()?;
        self.watch(queue.save_delivery(delivery).await)
    }

    async fn deliveries(&self, job_id: Uuid) -> Result<Vec<crate::domain::Delivery>, StoreError> {
        self.queue()?.deliveries(job_id).await
    }
}

#[async_trait]
impl Conversations for ResilientQueue {
    async fn turns(
        &self,
        guild_id: &str,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<Turn>, StoreError> {
        self.queue()?.turns(guild_id, conversation_id, limit).await
    }

    async fn forget(&self, guild_id: &str, conversation_id: &str) -> Result<u64, StoreError> {
        let queue = self.queue()?;
        self.watch(queue.forget(guild_id, conversation_id).await)
    }
}

#[async_trait]
impl Maintenance for ResilientQueue {
    async fn prune(&self) -> Result<u64, StoreError> {
        if self.shared.broken().is_some() {
            return Ok(0);
        }
        let queue = self.queue()?;
        // Thousands of sled removals after a busy spell: off the async threads.
        let pruned = tokio::task::spawn_blocking(move || queue.prune_sync())
            .await
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        self.watch(pruned)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let queue = self.queue()?;
        self.watch(queue.sync().await)
    }

    fn backup(
        &self,
        out: &mut dyn std::io::Write,
    ) -> Result<Option<crate::store::BackupSummary>, StoreError> {
        self.queue()?.backup(out)
    }
}

#[async_trait]
impl StoreHealth for ResilientQueue {
    async fn accepting(&self) -> Result<(), StoreError> {
        self.accepting_now()
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        let free = self.shared.free.load(Ordering::Relaxed);
        let disk = DiskStatus {
            free_bytes: (free != UNKNOWN).then_some(free),
            reserve_bytes: self.shared.embedded.min_free_bytes,
            failure: self.shared.broken(),
            reopens: self.shared.reopens.load(Ordering::Relaxed),
        };
        // The counters of the current incarnation; zero while it reopens.
        let (log_failures, commits) = self
            .queue()
            .map(|q| (q.log_failures(), q.flush_stats().flushes))
            .unwrap_or_default();
        Ok(StoreStatus {
            backend: "embedded",
            durability: self.shared.options.durability,
            log_failures,
            commits,
            disk: Some(disk),
        })
    }
}

#[async_trait]
impl RateLimits for ResilientQueue {
    async fn take(
        &self,
        _key: &str,
        _limit: u32,
        _window: Duration,
    ) -> Result<Option<RateTake>, StoreError> {
        // One process owns the directory: the app's in-process limiter is exact.
        Ok(None)
    }
}

#[async_trait]
impl ReplyCache for ResilientQueue {
    async fn cache_get(
        &self,
        key: &CacheKey,
        max_age_ms: u64,
    ) -> Result<Option<CachedReply>, StoreError> {
        self.queue()?.cache_get(key, max_age_ms).await
    }

    async fn cache_put(
        &self,
        key: &CacheKey,
        guild_id: &str,
        reply: &CachedReply,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        // Below the reserve, the disk is kept for jobs.
        self.accepting_now()?;
        let queue = self.queue()?;
        self.watch(queue.cache_put(key, guild_id, reply, ttl_ms).await)
    }

    async fn cache_clear(&self, guild_id: Option<&str>) -> Result<u64, StoreError> {
        let queue = self.queue()?;
        self.watch(queue.cache_clear(guild_id).await)
    }

    async fn cache_len(&self) -> Result<u64, StoreError> {
        self.queue()?.cache_len().await
    }
}

impl ResilientQueue {
    fn accepting_now(&self) -> Result<(), StoreError> {
        if let Some(cause) = self.shared.broken() {
            return Err(StoreError::Unavailable(Unavailable::Recovering { cause }));
        }
        self.shared.reserve_ok()
    }
}
