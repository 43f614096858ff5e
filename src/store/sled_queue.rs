//! [`JobQueue`] on an embedded sled database.
//!
//! # What is on disk
//!
//! | tree | key | value |
//! |---|---|---|
//! | `jobs` | job id (16 bytes) | encoded [`Job`]: the whole truth about a job |
//! | `log` | finished ms (u64 BE) ++ job seq (u64 BE) | encoded [`Interaction`] |
//! | `log_by_user`, `log_by_guild` | id ++ 0x00 ++ log key | empty |
//! | `meta` | name | value (the paused flag) |
//!
//! Every state transition of a job is **one write of its record**, which sled applies
//! atomically: a push, a claim, a retry, a cancel or a completion either happened or did
//! not. The queue's orderings (ready by priority then FIFO, delayed by due time, finished by
//! age for retention) and the idempotency keys are an in-memory [`Index`] derived from the
//! records: rebuilt by one scan at open, and updated under the same lock that serialises the
//! record writes, so index and records never disagree while the process runs.
//!
//! Why not sled transactions or batches across trees (the usual habit): in sled 0.34 the first
//! transaction or batch switches the whole database to a global reader-writer lock, and
//! `flush` holds the read side for the whole fsync, so every transaction waits out every
//! fsync. Measured here (64 pushers, 2 cores): 4-tree transactions gave ~5,000 durable
//! pushes/s with group commit averaging 12 requests per fsync; single-record writes let
//! writers proceed during the fsync, which is what makes group commit pay.
//!
//! A completion writes the finished record first (with `log_pending`), then its interaction
//! entry under a key derived from the record (finished time ++ seq), then clears the flag.
//! A crash in between is repaired at open: the entry is rebuilt from the record under the
//! same key, so it is written exactly once. A logging failure leaves the job finished and is
//! counted.
//!
//! The index lock is a std `Mutex`: it is held for in-memory work and single sled writes
//! (microseconds), never across an await or a flush.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use uuid::Uuid;

use super::codec;
use super::events::JobEvents;
use super::flusher::{self, FlushStats, Flusher};
use super::interaction::{
    self, Action, GLOBAL_GUILD, Interaction, LogPage, LogQuery, LogRetention,
};
use super::job::{Job, JobError, JobResult, JobState, NewJob, QueueCounts};
use super::{Durability, FailOutcome, JobQueue, Pushed, StoreError, StoreOptions};
use crate::clock::{Millis, SharedClock};

const PAUSED_KEY: &[u8] = b"paused";
/// Log retention removes at most this many entries per pass.
const CHUNK: usize = 1024;
/// Job retention removes at most this many records per hold of the index lock (~1 ms).
const PRUNE_CHUNK: u64 = 256;

/// The in-memory orderings, derived from the job records.
#[derive(Default)]
struct Index {
    /// (priority, seq) → id: lowest priority number first, then FIFO.
    ready: BTreeMap<(u32, u64), Uuid>,
    /// (due ms, seq) → id.
    delayed: BTreeMap<(Millis, u64), Uuid>,
    active: HashSet<Uuid>,
    /// (finished ms, seq) → id, oldest first, per finished state.
    completed: BTreeMap<(Millis, u64), Uuid>,
    failed: BTreeMap<(Millis, u64), Uuid>,
    cancelled: BTreeMap<(Millis, u64), Uuid>,
    /// (user id, idempotency key) → id.
    idempotency: HashMap<(String, String), Uuid>,
    next_seq: u64,
}

impl Index {
    fn finished(&mut self, state: JobState) -> Option<&mut BTreeMap<(Millis, u64), Uuid>> {
        match state {
            JobState::Completed => Some(&mut self.completed),
            JobState::Failed => Some(&mut self.failed),
            JobState::Cancelled => Some(&mut self.cancelled),
            JobState::Queued | JobState::Delayed | JobState::Active => None,
        }
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Files `job` under its current state.
    fn add(&mut self, job: &Job) {
        self.next_seq = self.next_seq.max(job.seq);
        match job.state {
            JobState::Queued => {
                self.ready.insert((job.priority, job.seq), job.id);
            }
            JobState::Delayed => {
                self.delayed.insert((job.run_at, job.seq), job.id);
            }
            JobState::Active => {
                self.active.insert(job.id);
            }
            JobState::Completed | JobState::Failed | JobState::Cancelled => {
                let at = job.finished_at.unwrap_or_default();
                if let Some(map) = self.finished(job.state) {
                    map.insert((at, job.seq), job.id);
                }
            }
        }
        if let Some(key) = &job.idempotency_key {
            self.idempotency
                .insert((job.user_id.clone(), key.clone()), job.id);
        }
    }

    /// Removes `job` from the ordering of its current state (not from the idempotency map).
    fn remove(&mut self, job: &Job) {
        match job.state {
            JobState::Queued => {
                self.ready.remove(&(job.priority, job.seq));
            }
            JobState::Delayed => {
                self.delayed.remove(&(job.run_at, job.seq));
            }
            JobState::Active => {
                self.active.remove(&job.id);
            }
            JobState::Completed | JobState::Failed | JobState::Cancelled => {
                let at = job.finished_at.unwrap_or_default();
                if let Some(map) = self.finished(job.state) {
                    map.remove(&(at, job.seq));
                }
            }
        }
    }
}

pub struct SledQueue {
    db: sled::Db,
    /// sled's log file, for `fdatasync` after a flush.
    log_file: std::fs::File,
    jobs: sled::Tree,
    log: sled::Tree,
    log_user: sled::Tree,
    log_guild: sled::Tree,
    meta: sled::Tree,
    options: StoreOptions,
    clock: SharedClock,
    index: Mutex<Index>,
    log_entries: AtomicU64,
    log_failures: AtomicU64,
    paused: AtomicBool,
    work: Arc<Notify>,
    events: Arc<JobEvents>,
    // Declared last: dropped after everything above, so its final flush sees every write.
    flusher: Flusher,
}

fn conflict(job: &Job, action: &'static str, allowed: &'static str) -> StoreError {
    StoreError::Conflict {
        id: job.id,
        state: job.state.as_str(),
        action,
        allowed,
    }
}

impl SledQueue {
    /// Opens (or creates) the store, rebuilds the index, recovers jobs a crash left `active`
    /// and writes interaction entries a crash left pending.
    pub fn open(options: StoreOptions, clock: SharedClock) -> Result<Self, StoreError> {
        Self::open_with_signals(options, clock, Arc::default(), Arc::default())
    }

    /// [`SledQueue::open`] with the work signal and job events of a previous incarnation, so
    /// waiting workers and long-polls carry on across a reopen ([`super::ResilientQueue`]).
    pub(crate) fn open_with_signals(
        options: StoreOptions,
        clock: SharedClock,
        work: Arc<Notify>,
        events: Arc<JobEvents>,
    ) -> Result<Self, StoreError> {
        let path = options.path.clone();
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_capacity)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|source| match source {
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked {
                        path: path.clone(),
                        detail: io.to_string(),
                    }
                }
                source => StoreError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        // sled's log file, synced after each flush (see `flusher.rs`).
        let log_file = std::fs::File::open(path.join("db"))
            .map_err(|e| StoreError::Flush(format!("opening the store's log file: {e}").into()))?;
        let flusher = log_file
            .try_clone()
            .and_then(|file| Flusher::start(db.clone(), file))
            .map_err(|e| StoreError::Flush(e.to_string().into()))?;
        let queue = Self {
            jobs: db.open_tree("jobs")?,
            log: db.open_tree("log")?,
            log_user: db.open_tree("log_by_user")?,
            log_guild: db.open_tree("log_by_guild")?,
            meta: db.open_tree("meta")?,
            db,
            log_file,
            options,
            clock,
            index: Mutex::new(Index::default()),
            log_entries: AtomicU64::new(0),
            log_failures: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            work,
            events,
            flusher,
        };
        queue.recover()?;
        Ok(queue)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // matters more than losing the queue: keep serving.
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        match self.jobs.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn write(&self, job: &Job) -> Result<(), StoreError> {
        self.jobs.insert(job.id.as_bytes(), codec::encode(job)?)?;
        Ok(())
    }

    fn recover(&self) -> Result<(), StoreError> {
        self.paused.store(
            self.meta
                .get(PAUSED_KEY)?
                .is_some_and(|v| v.as_ref() == [1]),
            Ordering::Release,
        );
        let mut index = self.lock();
        let mut interrupted = Vec::new();
        let mut unlogged = Vec::new();
        for entry in self.jobs.iter() {
            let (_, bytes) = entry?;
            let job: Job = codec::decode(&bytes)?;
            if job.state == JobState::Active {
                interrupted.push(job);
                continue;
            }
            if job.log_pending {
                unlogged.push(job.clone());
            }
            index.add(&job);
        }
        for mut job in interrupted {
            // Back to the ready queue with its place (priority, seq) and its attempt count.
            job.state = JobState::Queued;
            self.write(&job)?;
            index.add(&job);
            tracing::warn!(job_id = %job.id, attempts = job.attempts, "recovered a job interrupted by a restart");
        }
        drop(index);
        for mut job in unlogged {
            if self.append_log(&job) {
                job.log_pending = false;
                self.write(&job)?;
            }
        }
        if self.options.log_retention.max_entries.is_some() {
            self.log_entries
                .store(self.log.len() as u64, Ordering::Relaxed);
        }
        self.db.flush()?;
        Ok(())
    }

    async fn durable(&self) -> Result<(), StoreError> {
        match self.options.durability {
            Durability::Strict => self.flusher.flush().await.map_err(StoreError::Flush),
            Durability::Relaxed => Ok(()),
        }
    }

    fn push_sync(&self, new: &NewJob) -> Result<Pushed, StoreError> {
        let now = self.clock.now_ms();
        let id = new.id.unwrap_or_else(Uuid::new_v4);
        let delayed = new.delay_ms > 0;
        let mut job = Job {
            id,
            user_id: new.user_id.clone(),
            guild_id: new.guild_id.clone(),
            conversation_id: new.conversation_id.clone(),
            request: new.request.clone(),
            priority: new.priority,
            attempts: 0,
            max_attempts: new.max_attempts.max(1),
            state: if delayed {
                JobState::Delayed
            } else {
                JobState::Queued
            },
            created_at: now,
            started_at: None,
            finished_at: None,
            run_at: now.saturating_add(new.delay_ms),
            result: None,
            error: None,
            idempotency_key: new.idempotency_key.clone(),
            request_id: new.request_id.clone(),
            seq: 0,
            log_pending: false,
        };
        let mut index = self.lock();
        if let Some(key) = &new.idempotency_key {
            let existing = index
                .idempotency
                .get(&(new.user_id.clone(), key.clone()))
                .copied();
            if let Some(existing) = existing {
                if let Some(job) = self.read(existing)? {
                    return Ok(Pushed {
                        job,
                        created: false,
                    });
                }
            }
        }
        if new.id.is_some() && self.jobs.contains_key(id.as_bytes())? {
            return Err(StoreError::Conflict {
                id,
                state: "taken",
                action: "push",
                allowed: "a fresh id",
            });
        }
        job.seq = index.seq();
        if new.id.is_none() && new.idempotency_key.is_none() {
            // A fresh random id that no other call can know before this one returns: nothing
            // can read or move the job meanwhile, so the record is written outside the index
            // lock (held across sled's insert, it made concurrent pushes and claims queue
            // behind each other). The job joins the index once its record is written.
            drop(index);
            self.write(&job)?;
            self.lock().add(&job);
        } else {
            self.write(&job)?;
            index.add(&job);
            drop(index);
        }
        // Wake a worker now: it may start on the job while the flush runs. If the process
        // dies before the flush, the job was never acknowledged, so nothing promised is lost.
        self.work.notify_one();
        Ok(Pushed { job, created: true })
    }

    /// Moves delayed jobs whose time has come into the ready queue.
    fn promote_due(&self, index: &mut Index) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        while let Some((&(due, seq), &id)) = index.delayed.first_key_value() {
            if due > now {
                break;
            }
            index.delayed.remove(&(due, seq));
            let Some(mut job) = self.read(id)? else {
                continue;
            };
            if job.state != JobState::Delayed {
                continue;
            }
            job.state = JobState::Queued;
            job.seq = index.seq();
            self.write(&job)?;
            index.add(&job);
        }
        Ok(())
    }

    fn claim_sync(&self) -> Result<Option<Job>, StoreError> {
        if self.paused.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut index = self.lock();
        self.promote_due(&mut index)?;
        while let Some(((priority, seq), id)) = index.ready.pop_first() {
            let Some(mut job) = self.read(id)? else {
                tracing::error!(job_id = %id, "ready entry without a job record; skipped");
                continue;
            };
            if job.state != JobState::Queued || (job.priority, job.seq) != (priority, seq) {
                tracing::error!(job_id = %id, state = job.state.as_str(), "stale ready entry; skipped");
                continue;
            }
            job.state = JobState::Active;
            job.started_at = Some(self.clock.now_ms());
            if let Err(e) = self.write(&job) {
                // Put it back: the job is still queued on disk.
                index.ready.insert((priority, seq), id);
                return Err(e);
            }
            index.active.insert(id);
            return Ok(Some(job));
        }
        Ok(None)
    }

    /// Reads an active job for a finishing transition.
    fn active_job(&self, id: Uuid, action: &'static str) -> Result<Job, StoreError> {
        let job = self.read(id)?.ok_or(StoreError::NotFound(id))?;
        if job.state != JobState::Active {
            return Err(conflict(&job, action, "active"));
        }
        Ok(job)
    }

    /// Writes `job`, which was `before` on disk, and moves it in the index to match.
    fn rewrite(&self, index: &mut Index, before: &Job, job: &Job) -> Result<(), StoreError> {
        self.write(job)?;
        index.remove(before);
        index.add(job);
        Ok(())
    }

    /// Moves `job` (already updated in memory from `before`) to a finished state.
    fn finish(
        &self,
        index: &mut Index,
        before: &Job,
        job: &mut Job,
        logged: bool,
    ) -> Result<(), StoreError> {
        job.log_pending = logged;
        self.rewrite(index, before, job)
    }

    fn interaction_for(job: &Job) -> Interaction {
        let result = job.result.as_ref();
        let action = if job.state == JobState::Completed {
            Action::ChatBotInteraction
        } else {
            Action::ChatBotError
        };
        let error = job
            .error
            .as_ref()
            .filter(|_| action == Action::ChatBotError);
        Interaction {
            id: String::new(),
            job_id: job.id,
            request_id: job.request_id.clone(),
            user_id: job.user_id.clone(),
            guild_id: job
                .guild_id
                .clone()
                .unwrap_or_else(|| GLOBAL_GUILD.to_owned()),
            action,
            personality: job.request.personality.clone(),
            prompt: job.request.prompt.clone(),
            reply: result.map(|r| r.reply.clone()),
            error: error.map(|e| e.message.clone()),
            error_code: error.map(|e| e.code.clone()),
            used_fallback: result.is_some_and(|r| r.used_fallback),
            model: result.map(|r| r.model.clone()),
            upstream_latency_ms: result.and_then(|r| r.upstream_latency_ms),
            usage: result.and_then(|r| r.usage),
            attempts: job.attempts,
            timestamp: job.finished_at.unwrap_or_default(),
        }
    }

    /// Writes the interaction entry of a finished job under its derived key; idempotent.
    /// Returns whether it was written; a failure is logged and counted, never raised.
    fn append_log(&self, job: &Job) -> bool {
        let entry = Self::interaction_for(job);
        let key = interaction::log_key(entry.timestamp, job.seq);
        let written = (|| -> Result<bool, StoreError> {
            let bytes = codec::encode(&entry)?;
            let fresh = self.log.insert(key, bytes)?.is_none();
            self.log_user
                .insert(interaction::index_key(&entry.user_id, &key), &[])?;
            self.log_guild
                .insert(interaction::index_key(&entry.guild_id, &key), &[])?;
            Ok(fresh)
        })();
        match written {
            Ok(fresh) => {
                if fresh {
                    self.log_entries.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(e) => {
                self.log_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(job_id = %job.id, error = %e, "the interaction-log entry could not be written; the job is finished");
                false
            }
        }
    }

    /// After a finished record is written: its log entry, then the flag cleared.
    fn log_finished(&self, job: &mut Job) -> Result<(), StoreError> {
        if self.append_log(job) {
            job.log_pending = false;
            let mut index = self.lock();
            // Only clear the flag if nothing else rewrote or removed the record meanwhile (an
            // admin retry gives it a new seq, retention drops it): the index still files it
            // under the same finished state, time and seq. Cheaper than reading it back.
            let at = (job.finished_at.unwrap_or_default(), job.seq);
            if index
                .finished(job.state)
                .is_some_and(|map| map.get(&at) == Some(&job.id))
            {
                self.write(job)?;
            }
        }
        Ok(())
    }

    fn complete_sync(&self, id: Uuid, result: &JobResult) -> Result<Job, StoreError> {
        let now = self.clock.now_ms();
        let mut job = {
            let mut index = self.lock();
            let before = self.active_job(id, "complete")?;
            let mut job = before.clone();
            job.attempts += 1;
            job.state = JobState::Completed;
            job.finished_at = Some(now);
            job.result = Some(result.clone());
            job.error = None;
            self.finish(&mut index, &before, &mut job, true)?;
            job
        };
        self.log_finished(&mut job)?;
        Ok(job)
    }

    fn fail_sync(
        &self,
        id: Uuid,
        error: &JobError,
        retry_in: Option<u64>,
    ) -> Result<(Job, FailOutcome), StoreError> {
        let now = self.clock.now_ms();
        let mut index = self.lock();
        let before = self.active_job(id, "fail")?;
        let mut job = before.clone();
        job.attempts += 1;
        job.error = Some(error.clone());
        if let Some(delay) = retry_in.filter(|_| job.attempts < job.max_attempts) {
            job.state = JobState::Delayed;
            job.run_at = now.saturating_add(delay);
            job.seq = index.seq();
            self.rewrite(&mut index, &before, &job)?;
            drop(index);
            // A sleeping worker may be waiting for a later due time.
            self.work.notify_one();
            let at = job.run_at;
            return Ok((job, FailOutcome::Retrying { at }));
        }
        job.state = JobState::Failed;
        job.finished_at = Some(now);
        self.finish(&mut index, &before, &mut job, true)?;
        drop(index);
        self.log_finished(&mut job)?;
        Ok((job, FailOutcome::Failed))
    }

    fn cancel_sync(&self, id: Uuid) -> Result<Job, StoreError> {
        let mut index = self.lock();
        let before = self.read(id)?.ok_or(StoreError::NotFound(id))?;
        if !matches!(before.state, JobState::Queued | JobState::Delayed) {
            return Err(conflict(&before, "cancel", "queued or delayed"));
        }
        let mut job = before.clone();
        job.state = JobState::Cancelled;
        job.finished_at = Some(self.clock.now_ms());
        self.finish(&mut index, &before, &mut job, false)?;
        Ok(job)
    }

    fn retry_sync(&self, id: Uuid) -> Result<Job, StoreError> {
        let mut index = self.lock();
        let before = self.read(id)?.ok_or(StoreError::NotFound(id))?;
        if before.state != JobState::Failed {
            return Err(conflict(&before, "retry", "failed"));
        }
        let mut job = before.clone();
        job.state = JobState::Queued;
        job.attempts = 0;
        job.error = None;
        job.started_at = None;
        job.finished_at = None;
        job.log_pending = false;
        job.seq = index.seq();
        self.rewrite(&mut index, &before, &job)?;
        drop(index);
        self.work.notify_one();
        Ok(job)
    }

    /// Removes the oldest records of `state` beyond the newest `keep`, [`PRUNE_CHUNK`] at a
    /// time: the index lock is let go between chunks so pushes and claims are not held up
    /// behind a long prune.
    fn prune_finished(&self, state: JobState, keep: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let (n, done) = self.prune_finished_chunk(state, keep)?;
            removed += n;
            if done {
                return Ok(removed);
            }
        }
    }

    fn prune_finished_chunk(&self, state: JobState, keep: u64) -> Result<(u64, bool), StoreError> {
        let mut removed = 0;
        let mut index = self.lock();
        while removed < PRUNE_CHUNK {
            let Some(map) = index.finished(state) else {
                return Ok((removed, true));
            };
            if map.len() as u64 <= keep {
                return Ok((removed, true));
            }
            let Some((_, id)) = map.pop_first() else {
                return Ok((removed, true));
            };
            if let Some(bytes) = self.jobs.remove(id.as_bytes())? {
                if let Ok(job) = codec::decode::<Job>(&bytes) {
                    if let Some(key) = job.idempotency_key {
                        let k = (job.user_id, key);
                        if index.idempotency.get(&k) == Some(&id) {
                            index.idempotency.remove(&k);
                        }
                    }
                }
            }
            removed += 1;
        }
        Ok((removed, false))
    }

    fn prune_log(&self, retention: LogRetention) -> Result<u64, StoreError> {
        if retention.max_entries.is_none() && retention.max_age_ms.is_none() {
            return Ok(0);
        }
        let cutoff = retention
            .max_age_ms
            .map(|age| self.clock.now_ms().saturating_sub(age));
        let mut removed = 0;
        loop {
            let over = retention.max_entries.map_or(0, |max| {
                self.log_entries.load(Ordering::Relaxed).saturating_sub(max)
            });
            let mut batch = Vec::new();
            for entry in self.log.iter() {
                let (key, bytes) = entry?;
                let old = cutoff.is_some_and(|c| key.len() >= 8 && timestamp_of(&key) < c);
                if batch.len() >= CHUNK || !(old || (batch.len() as u64) < over) {
                    break;
                }
                batch.push((key, bytes));
            }
            if batch.is_empty() {
                return Ok(removed);
            }
            for (key, bytes) in &batch {
                // The entry first: an index entry left by a crash here points at nothing and
                // is skipped by queries.
                self.log.remove(key)?;
                if let Ok(entry) = codec::decode::<Interaction>(bytes) {
                    self.log_user
                        .remove(interaction::index_key(&entry.user_id, key))?;
                    self.log_guild
                        .remove(interaction::index_key(&entry.guild_id, key))?;
                }
            }
            let n = batch.len() as u64;
            let _ = self
                .log_entries
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(n))
                });
            removed += n;
        }
    }

    fn query_log_sync(&self, q: &LogQuery) -> Result<LogPage, StoreError> {
        let limit = q.limit.clamp(1, 500);
        let (tree, prefix, filter_guild) = match (&q.user_id, &q.guild_id) {
            (Some(user), guild) => (
                &self.log_user,
                interaction::index_prefix(user),
                guild.clone(),
            ),
            (None, Some(guild)) => (&self.log_guild, interaction::index_prefix(guild), None),
            (None, None) => (&self.log, Vec::new(), None),
        };
        let bound = |key: [u8; 16]| {
            let mut v = prefix.clone();
            v.extend_from_slice(&key);
            v
        };
        let lower = bound(interaction::log_key(q.since.unwrap_or(0), 0));
        let mut upper = match q.until {
            Some(until) => bound(interaction::log_key(until, 0)),
            None => bound([0xff; 16]),
        };
        if let Some(cursor) = &q.cursor {
            let key = interaction::parse_cursor(cursor).unwrap_or([0; 16]);
            upper = upper.min(bound(key));
        }
        let mut entries: Vec<Interaction> = Vec::with_capacity(limit);
        let mut next_cursor = None;
        for item in tree.range(lower..upper).rev() {
            let (key, value) = item?;
            let log_key = &key[prefix.len()..];
            let bytes = if prefix.is_empty() {
                value
            } else {
                match self.log.get(log_key)? {
                    Some(bytes) => bytes,
                    None => continue,
                }
            };
            let mut entry: Interaction = codec::decode(&bytes)?;
            if filter_guild.as_ref().is_some_and(|g| *g != entry.guild_id) {
                continue;
            }
            if entries.len() == limit {
                next_cursor = entries.last().map(|e| e.id.clone());
                break;
            }
            entry.id = interaction::cursor_of(log_key);
            entries.push(entry);
        }
        Ok(LogPage {
            entries,
            next_cursor,
        })
    }

    fn list_sync(&self, state: JobState, limit: usize) -> Result<Vec<Job>, StoreError> {
        let ids: Vec<Uuid> = {
            let mut index = self.lock();
            match state {
                JobState::Queued => index.ready.values().take(limit).copied().collect(),
                JobState::Delayed => index.delayed.values().take(limit).copied().collect(),
                JobState::Active => index.active.iter().take(limit).copied().collect(),
                JobState::Completed | JobState::Failed | JobState::Cancelled => index
                    .finished(state)
                    .map(|m| m.values().rev().take(limit).copied().collect())
                    .unwrap_or_default(),
            }
        };
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(job) = self.read(id)? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    /// Flushes sled and syncs its log file directly, bypassing group commit: a blocking call.
    /// Only for measuring what group commit saves (`benches/queue.rs`); chatq never calls it.
    pub fn flush_direct(&self) -> Result<(), StoreError> {
        flusher::flush(&self.db, &self.log_file).map_err(|e| StoreError::Flush(e.into()))
    }
}

fn timestamp_of(log_key: &[u8]) -> Millis {
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&log_key[..8]);
    Millis::from_be_bytes(ts)
}

impl JobQueue for SledQueue {
    fn push(&self, job: NewJob) -> BoxFuture<'_, Result<Pushed, StoreError>> {
        Box::pin(async move {
            let pushed = self.push_sync(&job)?;
            if pushed.created {
                self.durable().await?;
            }
            Ok(pushed)
        })
    }

    fn claim(&self) -> Result<Option<Job>, StoreError> {
        self.claim_sync()
    }

    fn complete(&self, id: Uuid, result: JobResult) -> BoxFuture<'_, Result<Job, StoreError>> {
        Box::pin(async move {
            let job = self.complete_sync(id, &result)?;
            self.durable().await?;
            self.events.finished(&job);
            Ok(job)
        })
    }

    fn fail(
        &self,
        id: Uuid,
        error: JobError,
        retry_in: Option<u64>,
    ) -> BoxFuture<'_, Result<(Job, FailOutcome), StoreError>> {
        Box::pin(async move {
            let (job, outcome) = self.fail_sync(id, &error, retry_in)?;
            self.durable().await?;
            if outcome == FailOutcome::Failed {
                self.events.finished(&job);
            }
            Ok((job, outcome))
        })
    }

    fn cancel(&self, id: Uuid) -> BoxFuture<'_, Result<Job, StoreError>> {
        Box::pin(async move {
            let job = self.cancel_sync(id)?;
            self.durable().await?;
            self.events.finished(&job);
            Ok(job)
        })
    }

    fn retry(&self, id: Uuid) -> BoxFuture<'_, Result<Job, StoreError>> {
        Box::pin(async move {
            let job = self.retry_sync(id)?;
            self.durable().await?;
            Ok(job)
        })
    }

    fn set_paused(&self, paused: bool) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.meta.insert(PAUSED_KEY, &[u8::from(paused)])?;
            self.paused.store(paused, Ordering::Release);
            if !paused {
                self.work.notify_waiters();
            }
            self.durable().await
        })
    }

    fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        self.read(id)
    }

    fn list(&self, state: JobState, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.list_sync(state, limit)
    }

    fn counts(&self) -> QueueCounts {
        let index = self.lock();
        QueueCounts {
            waiting: index.ready.len() as u64,
            active: index.active.len() as u64,
            completed: index.completed.len() as u64,
            failed: index.failed.len() as u64,
            delayed: index.delayed.len() as u64,
            cancelled: index.cancelled.len() as u64,
            paused: self.paused.load(Ordering::Acquire),
        }
    }

    fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self
            .lock()
            .delayed
            .first_key_value()
            .map(|(&(due, _), _)| due))
    }

    fn work_signal(&self) -> &Notify {
        &self.work
    }

    fn events(&self) -> &JobEvents {
        &self.events
    }

    fn query_log(&self, query: &LogQuery) -> Result<LogPage, StoreError> {
        self.query_log_sync(query)
    }

    fn prune(&self) -> Result<u64, StoreError> {
        let mut removed = self.prune_finished(JobState::Completed, self.options.keep_completed)?;
        removed += self.prune_finished(JobState::Failed, self.options.keep_failed)?;
        removed += self.prune_finished(JobState::Cancelled, self.options.keep_failed)?;
        removed += self.prune_log(self.options.log_retention)?;
        Ok(removed)
    }

    fn sync(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.flusher.flush().await.map_err(StoreError::Flush) })
    }

    fn log_failures(&self) -> u64 {
        self.log_failures.load(Ordering::Relaxed)
    }

    fn flush_stats(&self) -> FlushStats {
        self.flusher.stats()
    }
}

#[cfg(test)]
impl SledQueue {
    pub(crate) fn trees_for_tests(&self) -> &sled::Tree {
        &self.jobs
    }
}
