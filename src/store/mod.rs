//! Durable storage: the job queue and the interaction log.
//!
//! [`JobQueue`] is the one interface the rest of chatq uses (the front door, the workers, the
//! admin routes). [`SledQueue`] implements it on an embedded sled database; a shared backend
//! for a community that outgrows one machine (Redis, Postgres) would implement the same trait
//! without touching the front door or the workers.
//!
//! The promise: a push, cancel or retry that returned `Ok` is on disk (in
//! [`Durability::Strict`]); a completion is on disk before any waiter hears of it.
//! This module never calls the network and knows nothing of HTTP.

pub mod codec;
mod events;
mod flusher;
pub mod interaction;
pub mod job;
mod resilient;
mod sled_queue;

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use uuid::Uuid;

pub use events::{DeltaSender, DeltaStreams, JobEvents, StreamRegistration, Subscription};
pub use flusher::FlushStats;
pub use interaction::{Interaction, LogPage, LogQuery, LogRetention};
pub use job::{Job, JobError, JobResult, JobState, NewJob, QueueCounts};
pub use resilient::ResilientQueue;
pub use sled_queue::SledQueue;

use crate::clock::Millis;
use codec::CodecError;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge after the write is flushed to disk (group commit).
    #[default]
    Strict,
    /// Acknowledge once the write is in sled's buffers; sled flushes every 500 ms in the
    /// background, so a crash or power loss can lose the last half second of acknowledged work.
    Relaxed,
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub durability: Durability,
    /// Completed job records to keep (newest first); older ones are pruned.
    pub keep_completed: u64,
    /// Failed job records to keep; cancelled records are kept by the same number.
    pub keep_failed: u64,
    pub log_retention: LogRetention,
    /// sled's page cache, in bytes (default [`DEFAULT_CACHE_BYTES`]).
    pub cache_capacity: u64,
    /// New jobs are refused while the data directory's file system has less free space than
    /// this ([`ResilientQueue`]), so the disk never fills under sled's feet.
    pub min_free_bytes: u64,
}

/// sled's page cache: records beyond it are read back from the file (in the kernel's page
/// cache) when touched. 8 MiB holds every live record of a store kept small by retention.
/// With 64 MiB a backlog held twice the memory (240,000 queued jobs: 124 MiB peak against
/// 65 MiB) for pushes ~7% cheaper through HTTP and drains no faster; see `BENCHMARKS.md`.
pub const DEFAULT_CACHE_BYTES: u64 = 8 * 1024 * 1024;

impl StoreOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::Strict,
            keep_completed: 50,
            keep_failed: 100,
            log_retention: LogRetention::default(),
            cache_capacity: DEFAULT_CACHE_BYTES,
            min_free_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Failures of the store. "Someone else got there first" ([`StoreError::Conflict`],
/// [`StoreError::NotFound`]) is kept apart from "the disk failed" ([`StoreError::Storage`],
/// [`StoreError::Flush`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the data directory {path} is already in use by another chatq process; stop it or pass another --data-dir ({detail})"
    )]
    Locked { path: PathBuf, detail: String },
    #[error("could not open the data directory {path}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("writing to disk failed: {0}")]
    Flush(Arc<str>),
    #[error("a stored record is unreadable: {0}")]
    Codec(#[from] CodecError),
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
    Reopening { cause: Arc<str> },
    #[error("job {0} not found")]
    NotFound(Uuid),
    #[error("job {id} is {state}; {action} needs it {allowed}")]
    Conflict {
        id: Uuid,
        state: &'static str,
        action: &'static str,
        allowed: &'static str,
    },
}

const MIB: u64 = 1024 * 1024;

impl StoreError {
    /// The disk failed under a write: sled stops writing after its first IO error, so the
    /// store must be reopened ([`ResilientQueue`] does).
    pub fn is_disk_failure(&self) -> bool {
        matches!(self, Self::Storage(sled::Error::Io(_)) | Self::Flush(_))
    }
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub job: Job,
    /// `false` when an idempotency key matched an existing job, which is returned instead.
    pub created: bool,
}

/// What a failed attempt led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// The job will run again at this time.
    Retrying { at: Millis },
    /// The job is finished as `failed`.
    Failed,
}

/// The queue and log interface every other part of chatq uses.
pub trait JobQueue: Send + Sync + 'static {
    /// Adds a job (or returns the job its idempotency key already names). Durable on `Ok`.
    fn push(&self, job: NewJob) -> BoxFuture<'_, Result<Pushed, StoreError>>;
    /// Hands the next due job to exactly one caller, marking it `active`; `None` when nothing
    /// is due or the queue is paused.
    fn claim(&self) -> Result<Option<Job>, StoreError>;
    /// Finishes an active job with its result and logs the interaction, atomically; durable
    /// before waiters are woken.
    fn complete(&self, id: Uuid, result: JobResult) -> BoxFuture<'_, Result<Job, StoreError>>;
    /// Records a failed attempt. With `retry_in`, the job runs again after that many
    /// milliseconds if it has attempts left; otherwise it fails for good (and is logged).
    fn fail(
        &self,
        id: Uuid,
        error: JobError,
        retry_in: Option<u64>,
    ) -> BoxFuture<'_, Result<(Job, FailOutcome), StoreError>>;
    /// Cancels a queued or delayed job.
    fn cancel(&self, id: Uuid) -> BoxFuture<'_, Result<Job, StoreError>>;
    /// Puts a failed job back in the queue with a fresh set of attempts.
    fn retry(&self, id: Uuid) -> BoxFuture<'_, Result<Job, StoreError>>;
    /// Stops or resumes claims; jobs already claimed are not affected. Durable on `Ok`.
    fn set_paused(&self, paused: bool) -> BoxFuture<'_, Result<(), StoreError>>;
    fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError>;
    /// Jobs in `state`, in queue order for waiting states and newest first for finished ones.
    fn list(&self, state: JobState, limit: usize) -> Result<Vec<Job>, StoreError>;
    fn counts(&self) -> QueueCounts;
    /// The due time of the earliest delayed job.
    fn next_due(&self) -> Result<Option<Millis>, StoreError>;
    /// Signalled when a job may have become claimable (a push, a retry, a resume).
    fn work_signal(&self) -> &Notify;
    /// Finished-job notifications for long-polling waiters.
    fn events(&self) -> &JobEvents;
    /// Reads the interaction log, newest first.
    fn query_log(&self, query: &LogQuery) -> Result<LogPage, StoreError>;
    /// Applies retention to finished jobs and the interaction log; returns records removed.
    fn prune(&self) -> Result<u64, StoreError>;
    /// Waits until everything written so far is on disk.
    fn sync(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Interaction entries that could not be written (the job itself finished).
    fn log_failures(&self) -> u64;
    /// Group-commit counters.
    fn flush_stats(&self) -> FlushStats;
    /// Free space and disk failures, as far as this queue watches them.
    fn disk(&self) -> DiskStatus {
        DiskStatus::default()
    }
    /// `Ok` while a push could be accepted as far as the disk goes; otherwise the error a
    /// push would get ([`StoreError::DiskFull`], [`StoreError::Reopening`]).
    fn accepting(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// What [`JobQueue::disk`] reports.
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

#[cfg(test)]
mod tests;
