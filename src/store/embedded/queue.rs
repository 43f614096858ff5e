//! The store traits on an embedded sled database.
//!
//! # What is on disk
//!
//! | tree | key | value |
//! |---|---|---|
//! | `jobs` | job id (16 bytes) | encoded [`StoredJob`]: the whole truth about a job |
//! | `log` | finished ms (u64 BE) ++ job seq (u64 BE) | encoded [`Interaction`] |
//! | `log_by_user`, `log_by_guild` | id ++ 0x00 ++ log key | empty |
//! | `meta` | name | value (the paused flag) |
//! | `cache` | cache key (32 bytes) | encoded [`StoredCacheEntry`](record::StoredCacheEntry) |
//! | `guilds` | guild id | encoded [`Guild`] |
//! | `turns` | guild ++ 0 ++ conversation ++ 0 ++ at ++ seq | encoded [`Turn`] |
//! | `outbox` | delivery id | encoded [`Delivery`](crate::domain::Delivery) |
//! | `outbox_by_job` | job id ++ delivery id | empty |
//!
//! Cache entries have their own small in-memory index (by age, for the bound on entries, and
//! by expiry, for maintenance), rebuilt at open like the job index and kept under its own
//! lock: a cache write never waits for a push or a claim.
//!
//! Every state transition of a job is **one write of its record**, which sled applies
//! atomically: a push, a claim, a retry, a cancel or a completion either happened or did
//! not. A claim writes a fresh fencing token into the record; a completion or failure is
//! written only if the record is still `active` under the caller's token, checked under the
//! index lock that serialises every record write, so a stale claim records nothing.
//!
//! The queue's orderings (ready by priority then FIFO, delayed by due time, finished by age
//! for retention) and the idempotency keys are an in-memory [`Index`] derived from the
//! records: rebuilt by one scan at open, and updated under the same lock that serialises the
//! record writes, so index and records never disagree while the process runs.
//!
//! Why not sled transactions or batches across trees (the usual habit): in sled 0.34 the first
//! transaction or batch switches the whole database to a global reader-writer lock, and
//! `flush` holds the read side for the whole fsync, so every transaction waits out every
//! fsync: 4-tree transactions were an order of magnitude slower than single writes with 64
//! durable pushers (figures in `BENCHMARKS.md`, "History"); single-record writes let writers proceed during the
//! fsync, which is what makes group commit pay.
//!
//! A completion writes the finished record first (with `log_pending`), then its interaction
//! entry under a key derived from the record (finished time ++ seq) and, for a completed job
//! of a conversation, its turn under a key derived the same way, then clears the flag. A crash
//! in between is repaired at open: both are rebuilt from the record under the same keys, so
//! each is written exactly once. A logging failure leaves the job finished and is
//! counted.
//!
//! The index lock is a std `Mutex`: it is held for in-memory work and single sled writes
//! (microseconds), never across an await or a flush. The async methods run that work inline
//! on the caller's thread: each is a few sled operations, cheaper than a hop to the blocking
//! pool; the one that could grow (promoting due delayed jobs) is bounded per claim. Retention,
//! which can remove thousands of records after a busy spell, runs on the blocking pool.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use uuid::Uuid;

use super::flusher::{self, FlushError, FlushStats, Flusher};
use super::record::{self, StoredJob};
use super::spent::Spent;
use crate::clock::{Millis, SharedClock};
use crate::domain::interaction::MAX_PAGE;
use crate::domain::{
    CacheKey, CachedReply, GLOBAL_GUILD, GroupBy, Guild, GuildSettings, Interaction, Job, JobError,
    JobResult, JobState, LogPage, LogQuery, NewJob, QueueCounts, Turn, UsageQuery, UsageRow,
    time_key,
};
use crate::signals::JobNotifier;
use crate::store::{
    Claimed, Conversations, Durability, EmbeddedOptions, FailOutcome, Guilds, InteractionLog,
    JobStore, Lease, LogRetention, MAX_TURNS, Maintenance, Outbox, Pushed, ReplyCache, StoreError,
    StoreHealth, StoreOptions, StoreStatus,
};

const PAUSED_KEY: &[u8] = b"paused";
/// Log retention removes at most this many entries per pass.
const LOG_PRUNE_CHUNK: usize = 1024;
/// Job retention removes at most this many records per hold of the index lock (~1 ms).
const JOB_PRUNE_CHUNK: u64 = 256;
/// Conversation turns and ended deliveries are checked for age at most this often (each a
/// scan of its tree).
const TURN_PRUNE_EVERY_MS: u64 = 60_000;
/// A claim moves at most this many due delayed jobs to the ready queue (one sled write
/// each, under the index lock); the rest move at the next claims.
const PROMOTE_PER_CLAIM: usize = 64;

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
    /// The last sequence number or fencing token handed out.
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

    /// Files `record` under its current state.
    fn add(&mut self, record: &StoredJob) {
        let job = &record.job;
        self.next_seq = self.next_seq.max(record.seq).max(record.lease);
        match job.state {
            JobState::Queued => {
                self.ready.insert((job.priority, record.seq), job.id);
            }
            JobState::Delayed => {
                self.delayed.insert((job.run_at, record.seq), job.id);
            }
            JobState::Active => {
                self.active.insert(job.id);
            }
            JobState::Completed | JobState::Failed | JobState::Cancelled => {
                let at = job.finished_at.unwrap_or_default();
                if let Some(map) = self.finished(job.state) {
                    map.insert((at, record.seq), job.id);
                }
            }
        }
        if let Some(key) = &job.idempotency_key {
            self.idempotency
                .insert((job.user_id.clone(), key.clone()), job.id);
        }
    }

    /// Removes `record` from the ordering of its current state (not from the idempotency map).
    fn remove(&mut self, record: &StoredJob) {
        let job = &record.job;
        match job.state {
            JobState::Queued => {
                self.ready.remove(&(job.priority, record.seq));
            }
            JobState::Delayed => {
                self.delayed.remove(&(job.run_at, record.seq));
            }
            JobState::Active => {
                self.active.remove(&job.id);
            }
            JobState::Completed | JobState::Failed | JobState::Cancelled => {
                let at = job.finished_at.unwrap_or_default();
                if let Some(map) = self.finished(job.state) {
                    map.remove(&(at, record.seq));
                }
            }
        }
    }
}

/// A range of the log or of one of its indexes, from [`SledQueue::log_range`].
struct LogRange<'a> {
    tree: &'a sled::Tree,
    /// Index keys are `id ++ 0x00 ++ log key`; 0 for the log itself.
    prefix_len: usize,
    /// The guild an entry must be of (a user index holds every guild's).
    filter_guild: Option<String>,
    lower: Vec<u8>,
    upper: Vec<u8>,
}

impl LogRange<'_> {
    /// The log key and entry an item of the range stands for; `None` when it is an index
    /// entry whose log entry is gone (retention removes the entry first) or of another guild.
    fn entry<'k>(
        &self,
        queue: &SledQueue,
        key: &'k [u8],
        value: sled::IVec,
    ) -> Result<Option<(&'k [u8], Interaction)>, StoreError> {
        let log_key = &key[self.prefix_len..];
        let bytes = if self.prefix_len == 0 {
            value
        } else {
            match queue.log.get(log_key)? {
                Some(bytes) => bytes,
                None => return Ok(None),
            }
        };
        let entry = record::decode_interaction(&bytes)?;
        if self
            .filter_guild
            .as_ref()
            .is_some_and(|g| *g != entry.guild_id)
        {
            return Ok(None);
        }
        Ok(Some((log_key, entry)))
    }
}

/// The cache entries' orderings, derived from their records.
#[derive(Default)]
struct CacheIndex {
    /// key → (seq, expires at) of the entry stored under it.
    entries: HashMap<CacheKey, (u64, Millis)>,
    /// seq → key: oldest first.
    by_age: BTreeMap<u64, CacheKey>,
    /// (expires at, seq) → key: soonest first.
    by_expiry: BTreeMap<(Millis, u64), CacheKey>,
    next_seq: u64,
}

impl CacheIndex {
    fn insert(&mut self, key: CacheKey, seq: u64, expires_at: Millis) {
        self.remove(&key);
        self.next_seq = self.next_seq.max(seq);
        self.entries.insert(key, (seq, expires_at));
        self.by_age.insert(seq, key);
        self.by_expiry.insert((expires_at, seq), key);
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some((seq, expires_at)) = self.entries.remove(key) {
            self.by_age.remove(&seq);
            self.by_expiry.remove(&(expires_at, seq));
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
    cache: sled::Tree,
    cache_index: Mutex<CacheIndex>,
    guilds: sled::Tree,
    turns: sled::Tree,
    outbox: sled::Tree,
    outbox_by_job: sled::Tree,
    /// The open deliveries by due time, so a claim (every 200 ms) reads only what is due,
    /// not the whole outbox with a day of ended deliveries. Every outbox write goes through
    /// it ([`SledQueue::write_delivery`]), which also serialises claims.
    outbox_due: Mutex<DueIndex>,
    /// Tokens spent today per (guild, user), for quotas.
    spent: Spent,
    /// When conversation turns were last checked for age (store clock).
    turns_pruned_at: AtomicU64,
    options: StoreOptions,
    clock: SharedClock,
    notifier: Arc<dyn JobNotifier>,
    index: Mutex<Index>,
    log_entries: AtomicU64,
    log_failures: AtomicU64,
    paused: AtomicBool,
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
    pub fn open(
        options: StoreOptions,
        embedded: &EmbeddedOptions,
        clock: SharedClock,
        notifier: Arc<dyn JobNotifier>,
    ) -> Result<Self, StoreError> {
        let path = embedded.path.clone();
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(embedded.cache_capacity)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|source| match source {
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::InUse {
                        what: format!("the data directory {}", path.display()),
                        hint: "stop it or pass another --data-dir",
                        detail: io.to_string(),
                    }
                }
                source => StoreError::Open {
                    what: format!("could not open the data directory {}", path.display()),
                    source: Box::new(source),
                },
            })?;
        // sled's log file, synced after each flush (see `flusher.rs`).
        let opened = std::fs::File::open(path.join("db")).and_then(|file| {
            let flusher = Flusher::start(db.clone(), file.try_clone()?)?;
            Ok((file, flusher))
        });
        let (log_file, flusher) = opened.map_err(|e| StoreError::Open {
            what: format!(
                "could not start syncing the store's log file in {}",
                path.display()
            ),
            source: Box::new(e),
        })?;
        let queue = Self {
            jobs: db.open_tree("jobs")?,
            log: db.open_tree("log")?,
            log_user: db.open_tree("log_by_user")?,
            log_guild: db.open_tree("log_by_guild")?,
            meta: db.open_tree("meta")?,
            cache: db.open_tree("cache")?,
            cache_index: Mutex::new(CacheIndex::default()),
            guilds: db.open_tree("guilds")?,
            turns: db.open_tree("turns")?,
            outbox: db.open_tree("outbox")?,
            outbox_by_job: db.open_tree("outbox_by_job")?,
            outbox_due: Mutex::new(DueIndex::default()),
            spent: Spent::default(),
            turns_pruned_at: AtomicU64::new(0),
            db,
            log_file,
            options,
            clock,
            notifier,
            index: Mutex::new(Index::default()),
            log_entries: AtomicU64::new(0),
            log_failures: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            flusher,
        };
        queue.recover()?;
        queue.index_cache()?;
        queue.index_outbox()?;
        Ok(queue)
    }

    fn cache_lock(&self) -> MutexGuard<'_, CacheIndex> {
        // Only in-memory maps and single sled calls happen under it; see `lock`.
        self.cache_index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Rebuilds the cache index from its records. An unreadable entry is dropped: the cache
    /// is soft state, and a miss costs one upstream call.
    fn index_cache(&self) -> Result<(), StoreError> {
        let mut index = self.cache_lock();
        for item in self.cache.iter() {
            let (key, bytes) = item?;
            match (
                CacheKey::from_slice(&key),
                record::decode_cache_entry(&bytes),
            ) {
                (Some(cache_key), Ok(entry)) => {
                    index.insert(cache_key, entry.seq, entry.expires_at);
                }
                (_, decoded) => {
                    let error = decoded.err().map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(error = %error, "dropped an unreadable response-cache entry");
                    self.cache.remove(key)?;
                }
            }
        }
        Ok(())
    }

    /// The index lock. A panic while holding it can only come between a record write and
    /// the index update that follows (both are plain in-memory or single sled calls); the
    /// worst it leaves is an index entry pointing at a record in another state, which every
    /// reader of the index already checks against the record and skips. So keep serving.
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self, id: Uuid) -> Result<Option<StoredJob>, StoreError> {
        match self.jobs.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(record::decode_job(&bytes)?)),
            None => Ok(None),
        }
    }

    fn write(&self, record: &StoredJob) -> Result<(), StoreError> {
        self.jobs
            .insert(record.job.id.as_bytes(), record::encode_job(record)?)?;
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
            let record = record::decode_job(&bytes)?;
            if record.job.state == JobState::Active {
                interrupted.push(record);
                continue;
            }
            if record.log_pending {
                unlogged.push(record.clone());
            }
            index.add(&record);
        }
        for mut record in interrupted {
            // Back to the ready queue with its place (priority, seq) and its attempt count.
            // Its lease stays in the record: the counter never hands that token out again.
            record.job.state = JobState::Queued;
            self.write(&record)?;
            index.add(&record);
            tracing::warn!(job_id = %record.job.id, attempts = record.job.attempts, "recovered a job interrupted by a restart");
        }
        drop(index);
        for mut record in unlogged {
            if self.append_log(&record) {
                record.log_pending = false;
                self.write(&record)?;
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
            Durability::Strict => Ok(self.flusher.flush().await?),
            Durability::Relaxed => Ok(()),
        }
    }

    /// Adds `new`, queued or (with `finished`) already completed with that result.
    fn push_sync(&self, new: &NewJob, finished: Option<&JobResult>) -> Result<Pushed, StoreError> {
        let now = self.clock.now_ms();
        let id = new.id.unwrap_or_else(Uuid::new_v4);
        let mut record = StoredJob {
            job: new.to_job(id, now),
            seq: 0,
            log_pending: false,
            lease: 0,
        };
        if let Some(result) = finished {
            let job = &mut record.job;
            job.state = JobState::Completed;
            job.started_at = Some(now);
            job.finished_at = Some(now);
            job.result = Some(result.clone());
            record.log_pending = true;
        }
        let mut index = self.lock();
        if let Some(key) = &new.idempotency_key {
            let existing = index
                .idempotency
                .get(&(new.user_id.clone(), key.clone()))
                .copied();
            if let Some(existing) = existing {
                if let Some(found) = self.read(existing)? {
                    return Ok(Pushed {
                        job: found.job,
                        created: false,
                    });
                }
            }
        }
        if new.id.is_some() && self.jobs.contains_key(id.as_bytes())? {
            return Err(StoreError::id_taken(id));
        }
        record.seq = index.seq();
        if new.id.is_none() && new.idempotency_key.is_none() {
            // A fresh random id that no other call can know before this one returns: nothing
            // can read or move the job meanwhile, so the record is written outside the index
            // lock (held across sled's insert, it made concurrent pushes and claims queue
            // behind each other). The job joins the index once its record is written.
            drop(index);
            self.write(&record)?;
            self.lock().add(&record);
        } else {
            self.write(&record)?;
            index.add(&record);
            drop(index);
        }
        if finished.is_some() {
            self.log_finished(&mut record)?;
        } else {
            // Wake a worker now: it may start on the job while the flush runs. If the process
            // dies before the flush, the job was never acknowledged, so nothing promised is
            // lost.
            self.notifier.work_available();
        }
        Ok(Pushed {
            job: record.job,
            created: true,
        })
    }

    fn push_claimed_sync(&self, new: &NewJob) -> Result<Option<Claimed>, StoreError> {
        if self.paused.load(Ordering::Acquire) {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        let id = new.id.unwrap_or_else(Uuid::new_v4);
        let mut job = new.to_job(id, now);
        job.idempotency_key = None;
        job.state = JobState::Active;
        job.started_at = Some(now);
        let mut index = self.lock();
        if self.jobs.contains_key(id.as_bytes())? {
            return Err(StoreError::id_taken(id));
        }
        let seq = index.seq();
        let lease = index.seq();
        let record = StoredJob {
            job,
            seq,
            log_pending: false,
            lease,
        };
        self.write(&record)?;
        index.add(&record);
        Ok(Some(Claimed {
            lease: Lease {
                job_id: id,
                token: lease,
            },
            job: record.job,
        }))
    }

    /// Moves up to [`PROMOTE_PER_CLAIM`] delayed jobs whose time has come into the ready queue.
    fn promote_due(&self, index: &mut Index) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        for _ in 0..PROMOTE_PER_CLAIM {
            let Some((&(due, seq), &id)) = index.delayed.first_key_value() else {
                break;
            };
            if due > now {
                break;
            }
            index.delayed.remove(&(due, seq));
            let Some(mut record) = self.read(id)? else {
                continue;
            };
            if record.job.state != JobState::Delayed {
                continue;
            }
            record.job.state = JobState::Queued;
            record.seq = index.seq();
            self.write(&record)?;
            index.add(&record);
        }
        Ok(())
    }

    fn claim_sync(&self) -> Result<Option<Claimed>, StoreError> {
        if self.paused.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut index = self.lock();
        self.promote_due(&mut index)?;
        while let Some(((priority, seq), id)) = index.ready.pop_first() {
            let Some(mut record) = self.read(id)? else {
                tracing::error!(job_id = %id, "ready entry without a job record; skipped");
                continue;
            };
            if record.job.state != JobState::Queued
                || (record.job.priority, record.seq) != (priority, seq)
            {
                tracing::error!(job_id = %id, state = record.job.state.as_str(), "stale ready entry; skipped");
                continue;
            }
            record.job.state = JobState::Active;
            record.job.started_at = Some(self.clock.now_ms());
            record.lease = index.seq();
            if let Err(e) = self.write(&record) {
                // Put it back: the job is still queued on disk.
                index.ready.insert((priority, seq), id);
                return Err(e);
            }
            index.active.insert(id);
            let lease = Lease {
                job_id: id,
                token: record.lease,
            };
            return Ok(Some(Claimed {
                job: record.job,
                lease,
            }));
        }
        Ok(None)
    }

    /// Reads the job `lease` claims, for a finishing transition: still active under that
    /// very claim, or the lease is lost.
    fn leased(&self, lease: &Lease) -> Result<StoredJob, StoreError> {
        let record = self
            .read(lease.job_id)?
            .ok_or(StoreError::NotFound(lease.job_id))?;
        if record.job.state != JobState::Active || record.lease != lease.token {
            return Err(StoreError::LeaseLost(lease.job_id));
        }
        Ok(record)
    }

    /// Writes `record`, which was `before` on disk, and moves it in the index to match.
    fn rewrite(
        &self,
        index: &mut Index,
        before: &StoredJob,
        record: &StoredJob,
    ) -> Result<(), StoreError> {
        self.write(record)?;
        index.remove(before);
        index.add(record);
        Ok(())
    }

    /// Writes the interaction entry of a finished job (and its conversation turn) under keys
    /// derived from the record; idempotent. Returns whether both were written; a failure is
    /// logged and counted, never raised.
    fn append_log(&self, record: &StoredJob) -> bool {
        if let Err(e) = self.append_turn(record) {
            self.log_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(job_id = %record.job.id, error = %e, "the conversation turn could not be written; the job is finished");
            return false;
        }
        let entry = Interaction::for_finished(&record.job);
        let key = record::log_key(entry.timestamp, record.seq);
        // Counted as the usage scan counts it, so a kept total and a scan always agree.
        let mut counted = UsageRow::default();
        counted.add(&entry);
        let tokens = counted.tokens();
        let written = self.spent.record(
            &entry.guild_id,
            &entry.user_id,
            entry.timestamp,
            tokens,
            || -> Result<bool, StoreError> {
                let bytes = record::encode_interaction(&entry)?;
                let fresh = self.log.insert(key, bytes)?.is_none();
                self.log_user
                    .insert(record::index_key(&entry.user_id, &key), &[])?;
                self.log_guild
                    .insert(record::index_key(&entry.guild_id, &key), &[])?;
                Ok(fresh)
            },
        );
        match written {
            Ok(fresh) => {
                if fresh {
                    self.log_entries.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(e) => {
                self.log_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(job_id = %record.job.id, error = %e, "the interaction-log entry could not be written; the job is finished");
                false
            }
        }
    }

    /// The turn a completed job of a conversation adds, then the conversation cut to its
    /// newest [`MAX_TURNS`].
    fn append_turn(&self, record: &StoredJob) -> Result<(), StoreError> {
        let job = &record.job;
        let (Some(conversation), Some(result), JobState::Completed) =
            (&job.conversation_id, &job.result, job.state)
        else {
            return Ok(());
        };
        let guild = job.guild_id.as_deref().unwrap_or(GLOBAL_GUILD);
        let at = job.finished_at.unwrap_or_default();
        let turn = Turn {
            job_id: job.id,
            user_id: job.user_id.clone(),
            prompt: job.request.prompt.clone(),
            reply: result.reply.clone(),
            at,
        };
        self.turns.insert(
            record::turn_key(guild, conversation, at, record.seq),
            record::encode_turn(&turn)?,
        )?;
        let prefix = record::conversation_prefix(guild, conversation);
        for old in self.turns.scan_prefix(&prefix).keys().rev().skip(MAX_TURNS) {
            self.turns.remove(old?)?;
        }
        Ok(())
    }

    /// Drops deliveries that ended (delivered or given up) a day ago.
    fn prune_outbox(&self) -> Result<u64, StoreError> {
        let cutoff = self.clock.now_ms().saturating_sub(86_400_000);
        let mut removed = 0;
        for bytes in self.outbox.iter().values() {
            let delivery = record::decode_delivery(&bytes?)?;
            if !delivery.state.is_open() && delivery.next_at < cutoff {
                self.outbox_by_job.remove(Self::by_job_key(&delivery))?;
                self.outbox.remove(delivery.id.as_bytes())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The retention passes that scan a whole tree (turns, the outbox), at most every
    /// [`TURN_PRUNE_EVERY_MS`] of the store's clock rather than every 100 ms.
    fn prune_slow(&self) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let last = self.turns_pruned_at.load(Ordering::Relaxed);
        if now < last.saturating_add(TURN_PRUNE_EVERY_MS) {
            return Ok(0);
        }
        self.turns_pruned_at.store(now, Ordering::Relaxed);
        self.spent.forget_before(crate::domain::utc_day_start(now));
        Ok(self.prune_turns(now)? + self.prune_outbox()?)
    }

    /// Forgets turns older than the conversations' age limit.
    fn prune_turns(&self, now: Millis) -> Result<u64, StoreError> {
        let cutoff = now.saturating_sub(self.options.conversation_max_age_ms);
        let mut removed = 0;
        for key in self.turns.iter().keys() {
            let key = key?;
            if record::turn_time(&key).is_some_and(|at| at < cutoff) {
                self.turns.remove(&key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The tokens `user_id` spent in `guild_id` on the day from `day_start`, if kept (no I/O).
    pub fn tokens_spent_known(
        &self,
        guild_id: &str,
        user_id: &str,
        day_start: Millis,
    ) -> Option<u64> {
        self.spent.known(guild_id, user_id, day_start)
    }

    /// The tokens `user_id` spent in `guild_id` on the day from `day_start`: kept, or one scan
    /// of their entries of that day (see `spent.rs`).
    pub fn tokens_spent_sync(
        &self,
        guild_id: &str,
        user_id: &str,
        day_start: Millis,
    ) -> Result<u64, StoreError> {
        self.spent.get_or_scan(guild_id, user_id, day_start, || {
            let rows = self.usage_sync(&UsageQuery::day_of(guild_id, user_id, day_start))?;
            Ok(rows.iter().map(UsageRow::tokens).sum())
        })
    }

    pub fn usage_sync(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let range = self.log_range(&q.user_id, &q.guild_id, q.since, q.until, None);
        let mut rows: BTreeMap<String, UsageRow> = BTreeMap::new();
        for item in range
            .tree
            .range(range.lower.as_slice()..range.upper.as_slice())
        {
            let (key, value) = item?;
            let Some((_, entry)) = range.entry(self, &key, value)? else {
                continue;
            };
            let group = match q.group_by {
                GroupBy::User => entry.user_id.clone(),
                GroupBy::Guild => entry.guild_id.clone(),
                GroupBy::Day | GroupBy::Hour => time_key(q.group_by, entry.timestamp),
            };
            rows.entry(group.clone())
                .or_insert_with(|| UsageRow {
                    key: group,
                    ..UsageRow::default()
                })
                .add(&entry);
        }
        Ok(rows.into_values().collect())
    }

    /// The part of the log (or of one of its indexes) that entries of `user` and `guild`
    /// between `since` and `until` (and before `before`, a log key) are under: the user index
    /// when a user is named (the guild then filtered), else the guild index, else the log.
    fn log_range(
        &self,
        user: &Option<String>,
        guild: &Option<String>,
        since: Option<Millis>,
        until: Option<Millis>,
        before: Option<[u8; 16]>,
    ) -> LogRange<'_> {
        let (tree, prefix, filter_guild) = match (user, guild) {
            (Some(user), guild) => (&self.log_user, record::index_prefix(user), guild.clone()),
            (None, Some(guild)) => (&self.log_guild, record::index_prefix(guild), None),
            (None, None) => (&self.log, Vec::new(), None),
        };
        let bound = |key: [u8; 16]| {
            let mut v = prefix.clone();
            v.extend_from_slice(&key);
            v
        };
        let lower = bound(record::log_key(since.unwrap_or(0), 0));
        let mut upper = bound(until.map_or([0xff; 16], |until| record::log_key(until, 0)));
        if let Some(key) = before {
            upper = upper.min(bound(key));
        }
        LogRange {
            tree,
            prefix_len: prefix.len(),
            filter_guild,
            lower,
            upper,
        }
    }

    /// After a finished record is written: its log entry, then the flag cleared.
    fn log_finished(&self, record: &mut StoredJob) -> Result<(), StoreError> {
        if self.append_log(record) {
            record.log_pending = false;
            let mut index = self.lock();
            // Only clear the flag if nothing else rewrote or removed the record meanwhile (an
            // admin retry gives it a new seq, retention drops it): the index still files it
            // under the same finished state, time and seq. Cheaper than reading it back.
            let at = (record.job.finished_at.unwrap_or_default(), record.seq);
            if index
                .finished(record.job.state)
                .is_some_and(|map| map.get(&at) == Some(&record.job.id))
            {
                self.write(record)?;
            }
        }
        Ok(())
    }

    fn complete_sync(&self, lease: &Lease, result: &JobResult) -> Result<Job, StoreError> {
        let now = self.clock.now_ms();
        let mut record = {
            let mut index = self.lock();
            let before = self.leased(lease)?;
            let mut record = before.clone();
            let job = &mut record.job;
            job.attempts += 1;
            job.state = JobState::Completed;
            job.finished_at = Some(now);
            job.result = Some(result.clone());
            job.error = None;
            record.log_pending = true;
            self.rewrite(&mut index, &before, &record)?;
            record
        };
        self.log_finished(&mut record)?;
        Ok(record.job)
    }

    fn fail_sync(
        &self,
        lease: &Lease,
        error: &JobError,
        retry_in: Option<u64>,
    ) -> Result<(Job, FailOutcome), StoreError> {
        let now = self.clock.now_ms();
        let mut index = self.lock();
        let before = self.leased(lease)?;
        let mut record = before.clone();
        record.job.attempts += 1;
        record.job.error = Some(error.clone());
        if let Some(delay) = retry_in.filter(|_| record.job.attempts < record.job.max_attempts) {
            record.job.state = JobState::Delayed;
            record.job.run_at = now.saturating_add(delay);
            record.seq = index.seq();
            self.rewrite(&mut index, &before, &record)?;
            drop(index);
            // A sleeping worker may be waiting for a later due time.
            self.notifier.work_available();
            let at = record.job.run_at;
            return Ok((record.job, FailOutcome::Retrying { at }));
        }
        record.job.state = JobState::Failed;
        record.job.finished_at = Some(now);
        record.log_pending = true;
        self.rewrite(&mut index, &before, &record)?;
        drop(index);
        self.log_finished(&mut record)?;
        Ok((record.job, FailOutcome::Failed))
    }

    fn cancel_sync(&self, id: Uuid) -> Result<Job, StoreError> {
        let mut index = self.lock();
        let before = self.read(id)?.ok_or(StoreError::NotFound(id))?;
        if !matches!(before.job.state, JobState::Queued | JobState::Delayed) {
            return Err(conflict(&before.job, "cancel", "queued or delayed"));
        }
        let mut record = before.clone();
        record.job.state = JobState::Cancelled;
        record.job.finished_at = Some(self.clock.now_ms());
        self.rewrite(&mut index, &before, &record)?;
        Ok(record.job)
    }

    fn retry_sync(&self, id: Uuid) -> Result<Job, StoreError> {
        let mut index = self.lock();
        let before = self.read(id)?.ok_or(StoreError::NotFound(id))?;
        if before.job.state != JobState::Failed {
            return Err(conflict(&before.job, "retry", "failed"));
        }
        let mut record = before.clone();
        let job = &mut record.job;
        job.state = JobState::Queued;
        job.attempts = 0;
        job.error = None;
        job.started_at = None;
        job.finished_at = None;
        record.log_pending = false;
        record.seq = index.seq();
        self.rewrite(&mut index, &before, &record)?;
        drop(index);
        self.notifier.work_available();
        Ok(record.job)
    }

    fn heartbeat_sync(&self, leases: &[Lease]) -> Result<Vec<Lease>, StoreError> {
        let mut held = Vec::with_capacity(leases.len());
        for lease in leases {
            match self.leased(lease) {
                Ok(_) => held.push(*lease),
                Err(StoreError::LeaseLost(_) | StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(held)
    }

    /// Removes the oldest records of `state` beyond the newest `keep`, [`JOB_PRUNE_CHUNK`] at
    /// a time: the index lock is let go between chunks so pushes and claims are not held up
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
        while removed < JOB_PRUNE_CHUNK {
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
                if let Ok(record) = record::decode_job(&bytes) {
                    if let Some(key) = record.job.idempotency_key {
                        let k = (record.job.user_id, key);
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
                let old = cutoff.is_some_and(|c| key.len() >= 8 && record::timestamp_of(&key) < c);
                if batch.len() >= LOG_PRUNE_CHUNK || !(old || (batch.len() as u64) < over) {
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
                if let Ok(entry) = record::decode_interaction(bytes) {
                    self.log_user
                        .remove(record::index_key(&entry.user_id, key))?;
                    self.log_guild
                        .remove(record::index_key(&entry.guild_id, key))?;
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

    /// Retention for jobs and the log: blocking work, run off the async threads.
    pub fn prune_sync(&self) -> Result<u64, StoreError> {
        let mut removed = self.prune_finished(JobState::Completed, self.options.keep_completed)?;
        removed += self.prune_finished(JobState::Failed, self.options.keep_failed)?;
        removed += self.prune_finished(JobState::Cancelled, self.options.keep_failed)?;
        removed += self.prune_log(self.options.log_retention)?;
        removed += self.prune_cache()?;
        removed += self.prune_slow()?;
        Ok(removed)
    }

    /// Removes expired cache entries.
    fn prune_cache(&self) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let mut index = self.cache_lock();
        let mut removed = 0;
        while let Some((&(expires_at, _), &key)) = index.by_expiry.first_key_value() {
            if expires_at > now {
                break;
            }
            self.cache.remove(key.as_bytes())?;
            index.remove(&key);
            removed += 1;
        }
        Ok(removed)
    }

    fn cache_put_sync(
        &self,
        key: &CacheKey,
        guild_id: &str,
        reply: &CachedReply,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let mut index = self.cache_lock();
        index.next_seq += 1;
        let entry = record::StoredCacheEntry {
            guild_id: guild_id.to_owned(),
            reply: reply.reply.clone(),
            model: reply.model.clone(),
            stored_at: now,
            expires_at: now.saturating_add(ttl_ms),
            seq: index.next_seq,
        };
        self.cache
            .insert(key.as_bytes(), record::encode_cache_entry(&entry)?)?;
        index.insert(*key, entry.seq, entry.expires_at);
        while index.entries.len() as u64 > self.options.cache_max_entries {
            let Some((_, oldest)) = index.by_age.pop_first() else {
                break;
            };
            self.cache.remove(oldest.as_bytes())?;
            index.remove(&oldest);
        }
        Ok(())
    }

    fn cache_clear_sync(&self, guild_id: Option<&str>) -> Result<u64, StoreError> {
        let mut index = self.cache_lock();
        let mut removed = 0;
        for item in self.cache.iter() {
            let (key, bytes) = item?;
            let theirs = match guild_id {
                None => true,
                Some(guild) => {
                    record::decode_cache_entry(&bytes).is_ok_and(|e| e.guild_id == guild)
                }
            };
            if theirs {
                self.cache.remove(&key)?;
                if let Some(cache_key) = CacheKey::from_slice(&key) {
                    index.remove(&cache_key);
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn query_log_sync(&self, q: &LogQuery) -> Result<LogPage, StoreError> {
        let limit = q.limit.clamp(1, MAX_PAGE);
        let cursor = match &q.cursor {
            Some(cursor) => Some(record::parse_cursor(cursor).ok_or(StoreError::InvalidCursor)?),
            None => None,
        };
        let range = self.log_range(&q.user_id, &q.guild_id, q.since, q.until, cursor);
        let mut entries: Vec<Interaction> = Vec::with_capacity(limit);
        let mut last_key = None;
        let mut next_cursor = None;
        for item in range
            .tree
            .range(range.lower.as_slice()..range.upper.as_slice())
            .rev()
        {
            let (key, value) = item?;
            let Some((log_key, mut entry)) = range.entry(self, &key, value)? else {
                continue;
            };
            if entries.len() == limit {
                next_cursor = last_key.map(|k: Vec<u8>| record::cursor_of(&k));
                break;
            }
            entry.id = record::cursor_of(log_key).as_str().to_owned();
            last_key = Some(log_key.to_vec());
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
            if let Some(record) = self.read(id)? {
                jobs.push(record.job);
            }
        }
        Ok(jobs)
    }

    fn counts_now(&self) -> QueueCounts {
        let index = self.lock();
        QueueCounts {
            queued: index.ready.len() as u64,
            active: index.active.len() as u64,
            completed: index.completed.len() as u64,
            failed: index.failed.len() as u64,
            delayed: index.delayed.len() as u64,
            cancelled: index.cancelled.len() as u64,
            paused: self.paused.load(Ordering::Acquire),
        }
    }

    /// Group-commit counters.
    pub fn flush_stats(&self) -> FlushStats {
        self.flusher.stats()
    }

    pub fn log_failures(&self) -> u64 {
        self.log_failures.load(Ordering::Relaxed)
    }

    /// Flushes sled and syncs its log file directly, bypassing group commit: a blocking call.
    /// Only for measuring what group commit saves (`benches/queue.rs`); chatq never calls it.
    pub fn flush_direct(&self) -> Result<(), FlushError> {
        flusher::flush(&self.db, &self.log_file)
    }
}

#[async_trait]
impl JobStore for SledQueue {
    async fn push(&self, job: NewJob) -> Result<Pushed, StoreError> {
        let pushed = self.push_sync(&job, None)?;
        if pushed.created {
            self.durable().await?;
        }
        Ok(pushed)
    }

    async fn push_finished(&self, job: NewJob, result: JobResult) -> Result<Pushed, StoreError> {
        let pushed = self.push_sync(&job, Some(&result))?;
        if pushed.created {
            self.durable().await?;
            self.notifier.job_finished(&pushed.job);
        }
        Ok(pushed)
    }

    async fn push_claimed(&self, job: NewJob) -> Result<Option<Claimed>, StoreError> {
        let claimed = self.push_claimed_sync(&job)?;
        self.durable().await?;
        Ok(claimed)
    }

    async fn claim(&self) -> Result<Option<Claimed>, StoreError> {
        self.claim_sync()
    }

    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<Lease>, StoreError> {
        // One process owns the directory, so a lease is lost only when a reopen recovered
        // its job; nothing expires by time here.
        self.heartbeat_sync(leases)
    }

    async fn complete(&self, lease: &Lease, result: JobResult) -> Result<Job, StoreError> {
        let job = self.complete_sync(lease, &result)?;
        self.durable().await?;
        self.notifier.job_finished(&job);
        Ok(job)
    }

    async fn fail(
        &self,
        lease: &Lease,
        error: JobError,
        retry_in: Option<u64>,
    ) -> Result<(Job, FailOutcome), StoreError> {
        let (job, outcome) = self.fail_sync(lease, &error, retry_in)?;
        self.durable().await?;
        if outcome == FailOutcome::Failed {
            self.notifier.job_finished(&job);
        }
        Ok((job, outcome))
    }

    async fn cancel(&self, id: Uuid) -> Result<Job, StoreError> {
        let job = self.cancel_sync(id)?;
        self.durable().await?;
        self.notifier.job_finished(&job);
        Ok(job)
    }

    async fn retry(&self, id: Uuid) -> Result<Job, StoreError> {
        let job = self.retry_sync(id)?;
        self.durable().await?;
        Ok(job)
    }

    async fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        self.meta.insert(PAUSED_KEY, &[u8::from(paused)])?;
        self.paused.store(paused, Ordering::Release);
        if !paused {
            self.notifier.work_available_for_all();
        }
        self.durable().await
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        Ok(self.read(id)?.map(|record| record.job))
    }

    async fn list(&self, state: JobState, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.list_sync(state, limit)
    }

    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        Ok(self.counts_now())
    }

    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self
            .lock()
            .delayed
            .first_key_value()
            .map(|(&(due, _), _)| due))
    }
}

#[async_trait]
impl InteractionLog for SledQueue {
    async fn query(&self, query: &LogQuery) -> Result<LogPage, StoreError> {
        self.query_log_sync(query)
    }

    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        // Called directly only in tests; `ResilientQueue` runs the scan on the blocking pool.
        self.usage_sync(query)
    }

    async fn tokens_spent(
        &self,
        guild_id: &str,
        user_id: &str,
        day_start: Millis,
    ) -> Result<u64, StoreError> {
        self.tokens_spent_sync(guild_id, user_id, day_start)
    }
}

#[async_trait]
impl Guilds for SledQueue {
    async fn guild(&self, guild_id: &str) -> Result<Option<Guild>, StoreError> {
        match self.guilds.get(guild_id.as_bytes())? {
            Some(bytes) => Ok(Some(record::decode_guild(&bytes)?)),
            None => Ok(None),
        }
    }

    async fn guilds(&self) -> Result<Vec<Guild>, StoreError> {
        self.guilds
            .iter()
            .values()
            .map(|bytes| Ok(record::decode_guild(&bytes?)?))
            .collect()
    }

    async fn put_guild(
        &self,
        guild_id: &str,
        settings: &GuildSettings,
    ) -> Result<Guild, StoreError> {
        let guild = Guild {
            guild_id: guild_id.to_owned(),
            settings: settings.clone(),
            updated_at: self.clock.now_ms(),
        };
        self.guilds
            .insert(guild_id.as_bytes(), record::encode_guild(&guild)?)?;
        self.durable().await?;
        Ok(guild)
    }

    async fn delete_guild(&self, guild_id: &str) -> Result<bool, StoreError> {
        let existed = self.guilds.remove(guild_id.as_bytes())?.is_some();
        self.durable().await?;
        Ok(existed)
    }
}

/// The open deliveries by due time. Only in-memory maps change under its lock, plus the
/// single sled call that writes the record.
#[derive(Default)]
struct DueIndex {
    by_due: std::collections::BTreeSet<(Millis, Uuid)>,
    due_of: HashMap<Uuid, Millis>,
}

impl DueIndex {
    fn forget(&mut self, id: Uuid) {
        if let Some(old) = self.due_of.remove(&id) {
            self.by_due.remove(&(old, id));
        }
    }

    fn file(&mut self, delivery: &crate::domain::Delivery) {
        self.forget(delivery.id);
        if delivery.state.is_open() {
            self.due_of.insert(delivery.id, delivery.next_at);
            self.by_due.insert((delivery.next_at, delivery.id));
        }
    }
}

impl SledQueue {
    fn outbox_lock(&self) -> MutexGuard<'_, DueIndex> {
        // A panic under it can only come between a record write and its filing; the next
        // open rebuilds the index from the records.
        self.outbox_due
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes a delivery's record and files it by due time (the caller holds the lock).
    fn write_delivery(
        &self,
        due: &mut DueIndex,
        delivery: &crate::domain::Delivery,
    ) -> Result<(), StoreError> {
        self.outbox
            .insert(delivery.id.as_bytes(), record::encode_delivery(delivery)?)?;
        due.file(delivery);
        Ok(())
    }

    fn read_delivery(&self, id: &[u8]) -> Result<Option<crate::domain::Delivery>, StoreError> {
        match self.outbox.get(id)? {
            Some(bytes) => Ok(Some(record::decode_delivery(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The `outbox_by_job` key of a delivery: its job's id, then its own.
    fn by_job_key(delivery: &crate::domain::Delivery) -> Vec<u8> {
        let mut key = delivery.job_id.as_bytes().to_vec();
        key.extend_from_slice(delivery.id.as_bytes());
        key
    }

    /// A job's deliveries, in `outbox_by_job` order.
    fn job_deliveries(&self, job_id: Uuid) -> Result<Vec<crate::domain::Delivery>, StoreError> {
        let mut found = Vec::new();
        for key in self.outbox_by_job.scan_prefix(job_id.as_bytes()).keys() {
            if let Some(delivery) = self.read_delivery(&key?[16..])? {
                found.push(delivery);
            }
        }
        Ok(found)
    }

    /// Rebuilds the due index from the records, at open.
    fn index_outbox(&self) -> Result<(), StoreError> {
        let mut due = self.outbox_lock();
        for bytes in self.outbox.iter().values() {
            due.file(&record::decode_delivery(&bytes?)?);
        }
        Ok(())
    }
}

#[async_trait]
impl Outbox for SledQueue {
    async fn add_delivery(&self, delivery: &crate::domain::Delivery) -> Result<(), StoreError> {
        self.outbox_by_job.insert(Self::by_job_key(delivery), &[])?;
        self.write_delivery(&mut self.outbox_lock(), delivery)?;
        self.durable().await
    }

    async fn claim_deliveries(
        &self,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<crate::domain::Delivery>, StoreError> {
        let now = self.clock.now_ms();
        let mut claimed = Vec::new();
        {
            let mut due = self.outbox_lock();
            let ids: Vec<Uuid> = due
                .by_due
                .range(..=(now, Uuid::max()))
                .take(limit)
                .map(|(_, id)| *id)
                .collect();
            for id in ids {
                let Some(mut delivery) = self.read_delivery(id.as_bytes())? else {
                    due.forget(id);
                    continue;
                };
                delivery.state = crate::domain::DeliveryState::Pending;
                delivery.next_at = now.saturating_add(lease_ms);
                self.write_delivery(&mut due, &delivery)?;
                claimed.push(delivery);
            }
        }
        // Leases need no flush of their own: a lease lost in a crash only makes the delivery
        // due again at once, which is what a restart wants.
        Ok(claimed)
    }

    async fn wake_deliveries(&self, job_id: Uuid) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let mut woken = 0;
        {
            let mut due = self.outbox_lock();
            for mut delivery in self.job_deliveries(job_id)? {
                if delivery.state == crate::domain::DeliveryState::Waiting {
                    delivery.state = crate::domain::DeliveryState::Pending;
                    delivery.next_at = now;
                    self.write_delivery(&mut due, &delivery)?;
                    woken += 1;
                }
            }
        }
        if woken > 0 {
            self.durable().await?;
        }
        Ok(woken)
    }

    async fn save_delivery(&self, delivery: &crate::domain::Delivery) -> Result<(), StoreError> {
        self.write_delivery(&mut self.outbox_lock(), delivery)?;
        self.durable().await
    }

    async fn deliveries(&self, job_id: Uuid) -> Result<Vec<crate::domain::Delivery>, StoreError> {
        let mut found = self.job_deliveries(job_id)?;
        found.sort_by_key(|d| d.created_at);
        Ok(found)
    }
}

#[async_trait]
impl Conversations for SledQueue {
    async fn turns(
        &self,
        guild_id: &str,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<Turn>, StoreError> {
        let prefix = record::conversation_prefix(guild_id, conversation_id);
        let mut turns = self
            .turns
            .scan_prefix(&prefix)
            .values()
            .rev()
            .take(limit)
            .map(|bytes| Ok(record::decode_turn(&bytes?)?))
            .collect::<Result<Vec<_>, StoreError>>()?;
        turns.reverse();
        Ok(turns)
    }

    async fn forget(&self, guild_id: &str, conversation_id: &str) -> Result<u64, StoreError> {
        let prefix = record::conversation_prefix(guild_id, conversation_id);
        let mut removed = 0;
        for key in self.turns.scan_prefix(&prefix).keys() {
            self.turns.remove(key?)?;
            removed += 1;
        }
        self.durable().await?;
        Ok(removed)
    }
}

#[async_trait]
impl Maintenance for SledQueue {
    async fn prune(&self) -> Result<u64, StoreError> {
        // Called directly only in tests; the app prunes through `ResilientQueue`, which moves
        // the work to the blocking pool.
        self.prune_sync()
    }

    async fn sync(&self) -> Result<(), StoreError> {
        Ok(self.flusher.flush().await?)
    }

    fn backup(
        &self,
        out: &mut dyn std::io::Write,
    ) -> Result<Option<crate::store::BackupSummary>, StoreError> {
        super::backup::write(&self.db, out).map(Some)
    }
}

#[async_trait]
impl StoreHealth for SledQueue {
    async fn accepting(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        Ok(StoreStatus {
            backend: "embedded",
            durability: self.options.durability,
            log_failures: self.log_failures(),
            commits: self.flusher.stats().flushes,
            disk: None,
        })
    }
}

#[async_trait]
impl ReplyCache for SledQueue {
    async fn cache_get(
        &self,
        key: &CacheKey,
        max_age_ms: u64,
    ) -> Result<Option<CachedReply>, StoreError> {
        let Some(bytes) = self.cache.get(key.as_bytes())? else {
            return Ok(None);
        };
        let entry = record::decode_cache_entry(&bytes)?;
        let now = self.clock.now_ms();
        if now >= entry.expires_at || now >= entry.stored_at.saturating_add(max_age_ms) {
            return Ok(None);
        }
        Ok(Some(entry.into_entry(*key).reply))
    }

    async fn cache_put(
        &self,
        key: &CacheKey,
        guild_id: &str,
        reply: &CachedReply,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        // Not flushed here: an entry lost in a crash is one miss (and the next group commit
        // or the 500 ms background flush takes it along anyway).
        self.cache_put_sync(key, guild_id, reply, ttl_ms)
    }

    async fn cache_clear(&self, guild_id: Option<&str>) -> Result<u64, StoreError> {
        let removed = self.cache_clear_sync(guild_id)?;
        // An admin asked for these to be gone: that holds across a crash too.
        self.durable().await?;
        Ok(removed)
    }

    async fn cache_len(&self) -> Result<u64, StoreError> {
        Ok(self.cache_lock().entries.len() as u64)
    }
}

#[cfg(test)]
impl SledQueue {
    pub(crate) fn jobs_tree_for_tests(&self) -> &sled::Tree {
        &self.jobs
    }
}
