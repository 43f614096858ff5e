//! Durable storage: the job queue and the interaction log, behind narrow async traits.
//!
//! The rest of chatq (front door, workers, admin routes, metrics) holds an
//! `Arc<dyn Store>` and never names a backend type or error. The traits split by concern:
//!
//! - [`JobStore`]: push, claim (with a [`Lease`] carrying a fencing token), heartbeat,
//!   complete and fail (taking that lease), cancel, retry, pause, reads and counts;
//! - [`InteractionLog`]: queries of the log, which complete and fail write;
//! - [`Maintenance`]: retention and a final sync;
//! - [`StoreHealth`]: whether new jobs are taken now, and the backend's status;
//! - [`RateLimits`]: per-user limits that every process sharing the store counts against;
//! - [`ReplyCache`]: the response cache's entries;
//! - [`Guilds`]: guild settings; [`Conversations`]: the turns of server-side conversations,
//!   which a completion of a job with a conversation id appends (in the same write as its log
//!   entry, so a turn is appended exactly once).
//!
//! The promises, for every backend (the contract suite in `contract.rs` checks them): a push,
//! cancel, retry or pause that returned `Ok` is durable (in [`Durability::Strict`]); a
//! completion and its log entry are durable before anyone is told ([`JobNotifier`]); a
//! complete or fail whose lease is no longer held changes nothing and returns
//! [`StoreError::LeaseLost`], so a job has at most one recorded outcome.
//!
//! Two backends: [`embedded`] (sled in a local directory, one process) and [`postgres`] (one
//! database that replicas share), chosen by [`StoreOptions::backend`].
//!
//! This module knows nothing of HTTP.
//! In-process signalling (wake-ups, long-polls, token streams) lives in [`crate::signals`];
//! a store only calls the [`JobNotifier`] it was opened with.

#[cfg(test)]
mod contract;
pub mod embedded;
pub mod postgres;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::clock::{Millis, SharedClock};
use crate::domain::{
    CacheKey, CachedReply, Delivery, Guild, GuildSettings, Job, JobError, JobResult, JobState,
    LogPage, LogQuery, NewJob, QueueCounts, Turn, UsageQuery, UsageRow,
};
use crate::secret::Secret;
pub use crate::signals::JobNotifier;

/// Any backend's own error, kept as the source of a [`StoreError`] for the log.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge after the write is durable (group commit).
    #[default]
    Strict,
    /// Acknowledge before the write is durable: a crash or power loss can lose the last
    /// moments of acknowledged work (the embedded store flushes every 500 ms by itself).
    Relaxed,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Relaxed => "relaxed",
        }
    }
}

/// Retention for the interaction log; off by default.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogRetention {
    pub max_entries: Option<u64>,
    pub max_age_ms: Option<u64>,
}

/// How the store is opened: what every backend honours, and which backend.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub durability: Durability,
    /// Completed job records to keep (newest first); older ones are pruned.
    pub keep_completed: u64,
    /// Failed job records to keep; cancelled records are kept by the same number.
    pub keep_failed: u64,
    pub log_retention: LogRetention,
    /// Response-cache entries to keep at most; the oldest go first.
    pub cache_max_entries: u64,
    /// Conversation turns older than this are forgotten.
    pub conversation_max_age_ms: u64,
    pub backend: Backend,
}

/// Which backend holds the data.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The embedded database in a local directory, owned by one process.
    Embedded(EmbeddedOptions),
    /// A PostgreSQL database that every replica pointed at it shares.
    Postgres(PostgresOptions),
}

/// The shared store's settings.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgres://…`; may hold a password, so it never prints.
    pub url: Secret,
    /// How long a claim holds without a heartbeat; a dead replica's jobs come back after it.
    pub lease: Duration,
    /// This replica's name on its claims (for the operator reading the table).
    pub replica: String,
    /// Connections this replica keeps to the database.
    pub pool_size: usize,
    /// Certificates the server's must chain to (TLS then required and verified); without,
    /// libpq's `sslmode` meanings: encryption when offered, no verification.
    pub ca_file: Option<PathBuf>,
}

/// The embedded store's own settings.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub path: PathBuf,
    /// The database's page cache, in bytes (default [`DEFAULT_CACHE_BYTES`]).
    pub cache_capacity: u64,
    /// New jobs are refused while the data directory's file system has less free space than
    /// this, so the disk never fills under the database's feet.
    pub min_free_bytes: u64,
}

/// The embedded store's page cache: records beyond it are read back from the file (in the
/// kernel's page cache) when touched. 8 MiB holds every live record of a store kept small by
/// retention; why not more is in `BENCHMARKS.md` ("sled page cache").
pub const DEFAULT_CACHE_BYTES: u64 = 8 * 1024 * 1024;

impl StoreOptions {
    /// The documented defaults, on the embedded store in `path`.
    pub fn embedded(path: impl Into<PathBuf>) -> Self {
        Self {
            durability: Durability::Strict,
            keep_completed: crate::defaults::KEEP_COMPLETED,
            keep_failed: crate::defaults::KEEP_FAILED,
            log_retention: LogRetention::default(),
            cache_max_entries: crate::defaults::CACHE_MAX_ENTRIES,
            conversation_max_age_ms: crate::defaults::CONVERSATION_MAX_AGE_DAYS * 86_400_000,
            backend: Backend::Embedded(EmbeddedOptions {
                path: path.into(),
                cache_capacity: DEFAULT_CACHE_BYTES,
                min_free_bytes: crate::defaults::MIN_FREE_DISK_MB * 1024 * 1024,
            }),
        }
    }

    /// The documented defaults, on the PostgreSQL database `pg` names.
    pub fn postgres(pg: PostgresOptions) -> Self {
        Self {
            backend: Backend::Postgres(pg),
            ..Self::embedded(crate::defaults::DATA_DIR)
        }
    }

    /// Where the data lives, for the start-up log (never a secret).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Embedded(e) => format!("embedded store in {}", e.path.display()),
            Backend::Postgres(pg) => format!(
                "PostgreSQL store (replica {}, lease {} s)",
                pg.replica,
                pg.lease.as_secs()
            ),
        }
    }

    /// Whether other processes share this store (so finishes and new work can come from
    /// elsewhere, and waiting must not rely on this process's signals alone).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }
}

/// Opens the store `options` name, reporting to `notifier`.
pub async fn open(
    options: StoreOptions,
    clock: SharedClock,
    notifier: Arc<dyn JobNotifier>,
) -> Result<Arc<dyn Store>, StoreError> {
    match &options.backend {
        Backend::Embedded(embedded) => {
            let embedded = embedded.clone();
            // Opening replays the database's log and scans every record: blocking work.
            let store = tokio::task::spawn_blocking(move || {
                embedded::ResilientQueue::open(options, embedded, clock, notifier)
            })
            .await
            .map_err(|e| StoreError::Backend(Box::new(e)))??;
            Ok(Arc::new(store))
        }
        Backend::Postgres(pg) => {
            let pg = pg.clone();
            Ok(Arc::new(
                postgres::PgStore::open(options, &pg, clock, notifier).await?,
            ))
        }
    }
}

/// Failures of a store. "Someone else got there first" ([`StoreError::Conflict`],
/// [`StoreError::LeaseLost`], [`StoreError::NotFound`]) is kept apart from "the store cannot
/// do it now" ([`StoreError::Unavailable`]) and "the store failed" ([`StoreError::Backend`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job {0} not found")]
    NotFound(Uuid),
    #[error("job {id} is {state}; {action} needs it {allowed}")]
    Conflict {
        id: Uuid,
        state: &'static str,
        action: &'static str,
        allowed: &'static str,
    },
    /// The claim behind this lease is gone (recovered after a crash or an expiry, maybe
    /// claimed again): the caller must record nothing.
    #[error("the lease on job {0} is no longer held")]
    LeaseLost(Uuid),
    #[error("the cursor was not made by this store")]
    InvalidCursor,
    /// The store cannot take this now; trying again later may work.
    #[error("{0}")]
    Unavailable(Unavailable),
    /// Another process holds the store (the embedded store has one owner).
    #[error("{what} is already in use by another chatq process; {hint} ({detail})")]
    InUse {
        what: String,
        hint: &'static str,
        detail: String,
    },
    #[error("{what}")]
    Open {
        what: String,
        #[source]
        source: BoxError,
    },
    #[error("storage failure: {0}")]
    Backend(#[source] BoxError),
    #[error("a stored record is unreadable: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// A push with a pre-assigned id that another job already has.
    pub fn id_taken(id: Uuid) -> Self {
        Self::Conflict {
            id,
            state: "taken",
            action: "push",
            allowed: "a fresh id",
        }
    }
}

/// Why a store cannot take work now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error(
        "the disk holding {path} has {free_mib} MiB free, below the {reserve_mib} MiB reserve (--min-free-disk-mb); new jobs are refused until space is freed",
        free_mib = free / MIB,
        reserve_mib = reserve / MIB
    )]
    DiskFull {
        path: PathBuf,
        free: u64,
        reserve: u64,
    },
    #[error("the store hit a disk error ({cause}) and is reopening")]
    Recovering { cause: Arc<str> },
    #[error("the database is unreachable: {cause}")]
    Unreachable { cause: String },
    #[error("the store is closed")]
    Closed,
}

const MIB: u64 = 1024 * 1024;

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub job: Job,
    /// `false` when an idempotency key matched an existing job, which is returned instead.
    pub created: bool,
}

/// A claim on one job: the right to record its outcome while the lease is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub job_id: Uuid,
    /// The fencing token: unique per claim, so an outcome from an older claim of the same
    /// job is recognised and refused.
    pub token: u64,
}

/// A claimed job and its lease.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: Job,
    pub lease: Lease,
}

/// What a failed attempt led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// The job will run again at this time.
    Retrying { at: Millis },
    /// The job is finished as `failed`.
    Failed,
}

/// The queue.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Adds a job (or returns the job its idempotency key already names). Durable on `Ok`;
    /// reports work to the notifier.
    async fn push(&self, job: NewJob) -> Result<Pushed, StoreError>;
    /// Adds a job already claimed by this process, for a caller that must run it here (a
    /// streamed reply runs where its client listens). Durable on `Ok`; no idempotency key.
    /// `None` while the queue is paused (nothing is claimed then: push it the ordinary way).
    /// If this process dies, the claim is recovered like any other and the job runs
    /// elsewhere.
    async fn push_claimed(&self, job: NewJob) -> Result<Option<Claimed>, StoreError>;
    /// Adds a job that is already finished: `completed` with `result` (a reply from the
    /// cache), and its interaction-log entry, without any claim. Durable on `Ok`, announced
    /// to the notifier; an idempotency key that names an existing job returns that job, as
    /// [`JobStore::push`] does. Paused or not: a finished job needs no worker.
    async fn push_finished(&self, job: NewJob, result: JobResult) -> Result<Pushed, StoreError>;
    /// Hands the next due job to exactly one caller, marking it `active` under a fresh lease;
    /// `None` when nothing is due or the queue is paused.
    async fn claim(&self) -> Result<Option<Claimed>, StoreError>;
    /// Renews `leases`; returns those still held (a lease missing from the answer is lost:
    /// stop the attempt and record nothing).
    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<Lease>, StoreError>;
    /// Finishes a claimed job with its result and writes its interaction-log entry; both are
    /// durable before the notifier hears of it.
    async fn complete(&self, lease: &Lease, result: JobResult) -> Result<Job, StoreError>;
    /// Records a failed attempt. With `retry_in`, the job runs again after that many
    /// milliseconds if it has attempts left; otherwise it fails for good (and is logged).
    async fn fail(
        &self,
        lease: &Lease,
        error: JobError,
        retry_in: Option<u64>,
    ) -> Result<(Job, FailOutcome), StoreError>;
    /// Cancels a queued or delayed job.
    async fn cancel(&self, id: Uuid) -> Result<Job, StoreError>;
    /// Puts a failed job back in the queue with a fresh set of attempts.
    async fn retry(&self, id: Uuid) -> Result<Job, StoreError>;
    /// Stops or resumes claims; jobs already claimed are not affected. Durable on `Ok`.
    async fn set_paused(&self, paused: bool) -> Result<(), StoreError>;
    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError>;
    /// Jobs in `state`, in queue order for waiting states and newest first for finished ones.
    async fn list(&self, state: JobState, limit: usize) -> Result<Vec<Job>, StoreError>;
    async fn counts(&self) -> Result<QueueCounts, StoreError>;
    /// The due time of the earliest delayed job.
    async fn next_due(&self) -> Result<Option<Millis>, StoreError>;
}

/// The interaction log (written by [`JobStore::complete`] and [`JobStore::fail`]).
#[async_trait]
pub trait InteractionLog: Send + Sync {
    /// Reads the log, newest first.
    async fn query(&self, query: &LogQuery) -> Result<LogPage, StoreError>;
    /// Totals of the entries `query` selects, one row per group, ordered by key.
    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError>;
    /// What a daily token quota counts: the prompt and completion tokens of `user_id`'s
    /// entries in `guild_id` in the UTC day that starts at `day_start`. Asked on every
    /// submit in a guild with a quota, so a backend may keep it rather than add it up.
    async fn tokens_spent(
        &self,
        guild_id: &str,
        user_id: &str,
        day_start: Millis,
    ) -> Result<u64, StoreError> {
        let rows = self
            .usage(&UsageQuery::day_of(guild_id, user_id, day_start))
            .await?;
        Ok(rows.iter().map(UsageRow::tokens).sum())
    }
}

/// Most turns a conversation keeps; older ones go as new ones come.
pub const MAX_TURNS: usize = 200;

/// Guild settings (DESIGN §15). A write is durable on `Ok` and seen by the next read of
/// every process sharing the store.
#[async_trait]
pub trait Guilds: Send + Sync {
    async fn guild(&self, guild_id: &str) -> Result<Option<Guild>, StoreError>;
    /// Every guild with settings, by id.
    async fn guilds(&self) -> Result<Vec<Guild>, StoreError>;
    /// Replaces the guild's settings.
    async fn put_guild(
        &self,
        guild_id: &str,
        settings: &GuildSettings,
    ) -> Result<Guild, StoreError>;
    /// Removes the guild's settings (its requests get the server's again); `false` if it had
    /// none.
    async fn delete_guild(&self, guild_id: &str) -> Result<bool, StoreError>;
}

/// Server-side conversations, keyed by (guild, conversation id): the same id in two guilds is
/// two conversations. Jobs outside any guild keep theirs under
/// [`crate::domain::GLOBAL_GUILD`]. Each keeps its newest [`MAX_TURNS`] turns, none older
/// than [`StoreOptions::conversation_max_age_ms`] (removed by [`Maintenance::prune`]).
#[async_trait]
pub trait Conversations: Send + Sync {
    /// The newest `limit` turns, oldest first.
    async fn turns(
        &self,
        guild_id: &str,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<Turn>, StoreError>;
    /// Forgets every turn (durable on `Ok`); returns how many.
    async fn forget(&self, guild_id: &str, conversation_id: &str) -> Result<u64, StoreError>;
}

/// Upkeep the app runs in the background and at shutdown.
#[async_trait]
pub trait Maintenance: Send + Sync {
    /// Applies retention to finished jobs and the interaction log; returns records removed.
    async fn prune(&self) -> Result<u64, StoreError>;
    /// Waits until everything written so far is durable.
    async fn sync(&self) -> Result<(), StoreError>;
    /// Writes a snapshot of everything the store holds to `out` while it keeps serving
    /// (blocking: run it off the async threads). `None` when the backend is backed up by its
    /// own tools (PostgreSQL: `pg_dump`).
    fn backup(&self, out: &mut dyn std::io::Write) -> Result<Option<BackupSummary>, StoreError>;
}

/// What a backup or a restore moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackupSummary {
    pub trees: u64,
    pub entries: u64,
    pub bytes: u64,
}

/// What the store can say about itself.
#[async_trait]
pub trait StoreHealth: Send + Sync {
    /// `Ok` while a push could be accepted; otherwise the error a push would get.
    async fn accepting(&self) -> Result<(), StoreError>;
    async fn status(&self) -> Result<StoreStatus, StoreError>;
}

/// Per-user rate limits kept by the store, for limits that must hold across every process
/// that shares it.
#[async_trait]
pub trait RateLimits: Send + Sync {
    /// Counts one request of `key` against `limit` per `window` (GCRA, full burst allowed).
    /// `None` when this store keeps no limits: it has one process, whose own limiter is exact.
    async fn take(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<Option<RateTake>, StoreError>;
}

/// What a [`RateLimits::take`] found, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateTake {
    pub allowed: bool,
    /// Requests left in the burst after this one (0 when refused).
    pub remaining: u32,
    /// Until the burst is whole again.
    pub reset_ms: u64,
    /// Until the next request is allowed (when refused).
    pub retry_after_ms: u64,
}

/// The response cache's entries (DESIGN §14). Entries are soft state: a write is not made
/// durable before it returns (an entry lost in a crash is one miss), and [`Maintenance::prune`]
/// removes expired ones.
#[async_trait]
pub trait ReplyCache: Send + Sync {
    /// The reply stored under `key`, unless it has expired or was stored `max_age_ms` or
    /// more ago (a guild's TTL may have been shortened since).
    async fn cache_get(
        &self,
        key: &CacheKey,
        max_age_ms: u64,
    ) -> Result<Option<CachedReply>, StoreError>;
    /// Stores `reply` under `key` for `ttl_ms`, replacing what was there, then removes the
    /// oldest entries beyond [`StoreOptions::cache_max_entries`].
    async fn cache_put(
        &self,
        key: &CacheKey,
        guild_id: &str,
        reply: &CachedReply,
        ttl_ms: u64,
    ) -> Result<(), StoreError>;
    /// Removes every entry, or those of one guild; returns how many.
    async fn cache_clear(&self, guild_id: Option<&str>) -> Result<u64, StoreError>;
    /// Entries stored (expired ones included until maintenance removes them).
    async fn cache_len(&self) -> Result<u64, StoreError>;
}

/// The delivery outbox (DESIGN §16). Every write is durable on `Ok`. A claim leases the
/// deliveries it returns (their `next_at` moves to the lease's end), so two processes sharing
/// the store never attempt one delivery at the same time, and one that died mid-attempt is
/// picked up again when its lease ends.
#[async_trait]
pub trait Outbox: Send + Sync {
    async fn add_delivery(&self, delivery: &Delivery) -> Result<(), StoreError>;
    /// Up to `limit` open deliveries (pending or waiting) due now, soonest first, leased for
    /// `lease_ms`: each comes back `Pending` with `next_at` at the lease's end.
    async fn claim_deliveries(
        &self,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<Delivery>, StoreError>;
    /// Makes the `Waiting` deliveries of `job_id` due now (`Pending`); returns how many. A
    /// delivery under a claim's lease is `Pending` and left alone, so a wake-up never hands
    /// one delivery to two claimers.
    async fn wake_deliveries(&self, job_id: Uuid) -> Result<u64, StoreError>;
    /// Records what an attempt did (replaces the delivery).
    async fn save_delivery(&self, delivery: &Delivery) -> Result<(), StoreError>;
    /// A job's deliveries, oldest first.
    async fn deliveries(&self, job_id: Uuid) -> Result<Vec<Delivery>, StoreError>;
}

/// Everything chatq needs of a backend.
pub trait Store:
    JobStore
    + InteractionLog
    + Maintenance
    + StoreHealth
    + RateLimits
    + ReplyCache
    + Guilds
    + Conversations
    + Outbox
{
}

impl<
    T: JobStore
        + InteractionLog
        + Maintenance
        + StoreHealth
        + RateLimits
        + ReplyCache
        + Guilds
        + Conversations
        + Outbox,
> Store for T
{
}

/// What [`StoreHealth::status`] reports.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    /// The backend's name, for the stats page: `embedded` or `postgres`.
    pub backend: &'static str,
    pub durability: Durability,
    /// Interaction entries that could not be written (their jobs finished all the same).
    pub log_failures: u64,
    /// Group commits (flushes or transactions) made durable so far.
    pub commits: u64,
    /// The local disk, for a store that keeps its data on one.
    pub disk: Option<DiskStatus>,
}

/// The local disk of an embedded store.
#[derive(Debug, Clone, Default)]
pub struct DiskStatus {
    /// Free bytes on the data directory's file system at the last measurement.
    pub free_bytes: Option<u64>,
    /// Below this, new jobs are refused.
    pub reserve_bytes: u64,
    /// The disk error the store is recovering from, if any.
    pub failure: Option<Arc<str>>,
    /// Times the store was reopened after a disk error.
    pub reopens: u64,
}

/// `e` and its sources, as one line (for the log: a backend error's cause is in its source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Wrappers that already print their cause (`storage failure: {0}`) would say it twice.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
