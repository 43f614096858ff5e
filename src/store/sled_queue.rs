//! [`JobQueue`] on an embedded sled database.
//!
//! Trees (all keys big-endian so that byte order is the order that matters):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `jobs` | job id (16 bytes) | encoded [`Job`] |
//! | `ready` | priority (u32) ++ seq (u64) | job id |
//! | `delayed` | due time ms (u64) ++ seq (u64) | job id |
//! | `idempotency` | user id ++ 0x00 ++ key | job id |
//! | `finished` | kind byte ++ finished ms (u64) ++ seq (u64) | job id (retention order) |
//! | `log` | timestamp ms (u64) ++ seq (u64) | encoded [`Interaction`] |
//! | `log_by_user`, `log_by_guild` | id ++ 0x00 ++ log key | empty |
//! | `meta` | name | value (the paused flag) |
//!
//! Every state transition is one sled transaction over the trees it touches, which either
//! commits whole or aborts with the reason ([`Abort`]): "the job was not in the state this
//! transition needs" is an abort, a disk failure is a storage error. Durability comes after
//! the commit from the shared [`Flusher`] (group commit).
//!
//! Claims are serialised by `claim_lock` (a std `Mutex`, held for one short transaction and
//! never across an await): without it every idle worker would race for the first ready key
//! and all but one would abort and retry. Per-state counts live in memory, are rebuilt from
//! the `jobs` tree at open, and are updated only after a transaction commits.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures_util::future::BoxFuture;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tokio::sync::Notify;
use uuid::Uuid;

use super::codec::{self, CodecError};
use super::events::JobEvents;
use super::flusher::{FlushStats, Flusher};
use super::interaction::{
    self, Action, GLOBAL_GUILD, Interaction, LogPage, LogQuery, LogRetention,
};
use super::job::{Job, JobError, JobResult, JobState, NewJob, QueueCounts};
use super::{Durability, FailOutcome, JobQueue, Pushed, StoreError, StoreOptions};
use crate::clock::{Millis, SharedClock};

const PAUSED_KEY: &[u8] = b"paused";
/// Retention and promotion work in bounded chunks so no transaction grows without limit.
const CHUNK: usize = 256;

#[derive(Debug)]
enum Abort {
    NotFound,
    State(JobState),
    Codec(CodecError),
    /// The ready entry was taken by someone else between the read and the transaction.
    Gone,
}

type TxResult<T> = Result<T, ConflictableTransactionError<Abort>>;

fn abort<T>(reason: Abort) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(reason))
}

struct Trees {
    jobs: sled::Tree,
    ready: sled::Tree,
    delayed: sled::Tree,
    idem: sled::Tree,
    finished: sled::Tree,
    log: sled::Tree,
    log_user: sled::Tree,
    log_guild: sled::Tree,
    meta: sled::Tree,
}

/// The transactional view of the trees a finishing transition touches.
struct FinishTx<'a> {
    jobs: &'a TransactionalTree,
    ready: &'a TransactionalTree,
    delayed: &'a TransactionalTree,
    finished: &'a TransactionalTree,
    log: &'a TransactionalTree,
    log_user: &'a TransactionalTree,
    log_guild: &'a TransactionalTree,
}

pub struct SledQueue {
    db: sled::Db,
    trees: Trees,
    options: StoreOptions,
    clock: SharedClock,
    counts: [AtomicU64; 6],
    log_entries: AtomicU64,
    log_failures: AtomicU64,
    paused: AtomicBool,
    claim_lock: Mutex<()>,
    work: Notify,
    events: JobEvents,
    // Declared last: dropped after everything above, so its final flush sees every write.
    flusher: Flusher,
}

fn ready_key(priority: u32, seq: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&priority.to_be_bytes());
    key[4..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn delayed_key(due: Millis, seq: u64) -> [u8; 16] {
    interaction::log_key(due, seq)
}

fn finished_kind(state: JobState) -> u8 {
    match state {
        JobState::Completed => b'c',
        JobState::Failed => b'f',
        _ => b'x',
    }
}

fn finished_key(state: JobState, at: Millis, seq: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = finished_kind(state);
    key[1..9].copy_from_slice(&at.to_be_bytes());
    key[9..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn idem_key(user_id: &str, key: &str) -> Vec<u8> {
    interaction::index_key(user_id, key.as_bytes())
}

fn due_of(delayed_key: &[u8]) -> Millis {
    let mut due = [0u8; 8];
    due.copy_from_slice(&delayed_key[..8]);
    Millis::from_be_bytes(due)
}

fn parse_id(bytes: &[u8]) -> Option<Uuid> {
    Uuid::from_slice(bytes).ok()
}

fn read_job(jobs: &TransactionalTree, id: Uuid) -> TxResult<Job> {
    match jobs.get(id.as_bytes())? {
        Some(bytes) => codec::decode(&bytes).or_else(|e| abort(Abort::Codec(e))),
        None => abort(Abort::NotFound),
    }
}

fn write_job(jobs: &TransactionalTree, job: &Job) -> TxResult<()> {
    let bytes = codec::encode(job).or_else(|e| abort(Abort::Codec(e)))?;
    jobs.insert(job.id.as_bytes(), bytes)?;
    Ok(())
}

/// Removes a waiting job's entry from the ready or delayed index.
fn unlist(tx: &FinishTx<'_>, job: &Job) -> TxResult<()> {
    match job.state {
        JobState::Queued => {
            tx.ready.remove(&ready_key(job.priority, job.seq))?;
        }
        JobState::Delayed => {
            tx.delayed.remove(&delayed_key(job.run_at, job.seq))?;
        }
        _ => {}
    }
    Ok(())
}

impl SledQueue {
    /// Opens (or creates) the store and recovers jobs a crash left `active`.
    pub fn open(options: StoreOptions, clock: SharedClock) -> Result<Self, StoreError> {
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
        let open = |name: &str| db.open_tree(name);
        let trees = Trees {
            jobs: open("jobs")?,
            ready: open("ready")?,
            delayed: open("delayed")?,
            idem: open("idempotency")?,
            finished: open("finished")?,
            log: open("log")?,
            log_user: open("log_by_user")?,
            log_guild: open("log_by_guild")?,
            meta: open("meta")?,
        };
        let flusher =
            Flusher::start(db.clone()).map_err(|e| StoreError::Flush(e.to_string().into()))?;
        let paused = trees
            .meta
            .get(PAUSED_KEY)?
            .is_some_and(|v| v.as_ref() == [1]);
        let queue = Self {
            db,
            trees,
            options,
            clock,
            counts: Default::default(),
            log_entries: AtomicU64::new(0),
            log_failures: AtomicU64::new(0),
            paused: AtomicBool::new(paused),
            claim_lock: Mutex::new(()),
            work: Notify::new(),
            events: JobEvents::default(),
            flusher,
        };
        queue.recover()?;
        Ok(queue)
    }

    /// Rebuilds the counts and puts every `active` job (interrupted by a crash) back in the
    /// ready queue, keeping its attempt count.
    fn recover(&self) -> Result<(), StoreError> {
        let mut interrupted = Vec::new();
        for entry in self.trees.jobs.iter() {
            let (_, bytes) = entry?;
            let job: Job = codec::decode(&bytes)?;
            if job.state == JobState::Active {
                interrupted.push(job);
            } else {
                self.counts[job.state.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
        for mut job in interrupted {
            job.state = JobState::Queued;
            job.seq = self.db.generate_id()?;
            let bytes = codec::encode(&job)?;
            (&self.trees.jobs, &self.trees.ready)
                .transaction(|(jobs, ready)| {
                    jobs.insert(job.id.as_bytes(), bytes.as_slice())?;
                    ready.insert(&ready_key(job.priority, job.seq), job.id.as_bytes())?;
                    Ok::<_, ConflictableTransactionError<Abort>>(())
                })
                .map_err(map_tx_error(job.id, "recover"))?;
            self.counts[JobState::Queued.index()].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job_id = %job.id, attempts = job.attempts, "recovered a job interrupted by a restart");
        }
        if self.options.log_retention.max_entries.is_some() {
            self.log_entries
                .store(self.trees.log.len() as u64, Ordering::Relaxed);
        }
        self.db.flush()?;
        Ok(())
    }

    fn moved(&self, from: JobState, to: JobState) {
        self.counts[from.index()].fetch_sub(1, Ordering::Relaxed);
        self.counts[to.index()].fetch_add(1, Ordering::Relaxed);
    }

    async fn durable(&self) -> Result<(), StoreError> {
        match self.options.durability {
            Durability::Strict => self.flusher.flush().await.map_err(StoreError::Flush),
            Durability::Relaxed => Ok(()),
        }
    }

    fn finish_tx<R>(
        &self,
        f: impl Fn(&FinishTx<'_>) -> TxResult<R>,
    ) -> Result<R, TransactionError<Abort>> {
        let t = &self.trees;
        (
            &t.jobs,
            &t.ready,
            &t.delayed,
            &t.finished,
            &t.log,
            &t.log_user,
            &t.log_guild,
        )
            .transaction(
                |(jobs, ready, delayed, finished, log, log_user, log_guild)| {
                    f(&FinishTx {
                        jobs,
                        ready,
                        delayed,
                        finished,
                        log,
                        log_user,
                        log_guild,
                    })
                },
            )
    }

    fn push_sync(&self, new: &NewJob) -> Result<Pushed, StoreError> {
        let now = self.clock.now_ms();
        let id = Uuid::new_v4();
        let seq = self.db.generate_id()?;
        let delayed = new.delay_ms > 0;
        let job = Job {
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
            seq,
        };
        let bytes = codec::encode(&job)?;
        let idem = new
            .idempotency_key
            .as_deref()
            .map(|key| idem_key(&new.user_id, key));
        let t = &self.trees;
        let existing = (&t.jobs, &t.ready, &t.delayed, &t.idem)
            .transaction(|(jobs, ready, delayed_tree, idem_tree)| {
                if let Some(idem) = &idem {
                    if let Some(previous) = idem_tree.get(idem)? {
                        if let Some(prev_id) = parse_id(&previous) {
                            if jobs.get(prev_id.as_bytes())?.is_some() {
                                return Ok(Some(read_job(jobs, prev_id)?));
                            }
                        }
                    }
                    idem_tree.insert(idem.as_slice(), id.as_bytes())?;
                }
                jobs.insert(id.as_bytes(), bytes.as_slice())?;
                if delayed {
                    delayed_tree.insert(&delayed_key(job.run_at, seq), id.as_bytes())?;
                } else {
                    ready.insert(&ready_key(job.priority, seq), id.as_bytes())?;
                }
                Ok(None)
            })
            .map_err(map_tx_error(id, "push"))?;
        if let Some(existing) = existing {
            return Ok(Pushed {
                job: existing,
                created: false,
            });
        }
        self.counts[job.state.index()].fetch_add(1, Ordering::Relaxed);
        // Wake a worker now: it may start on the job while the flush runs. If the process
        // dies before the flush, the job was never acknowledged, so nothing promised is lost.
        self.work.notify_one();
        Ok(Pushed { job, created: true })
    }

    /// Moves delayed jobs whose time has come into the ready queue.
    fn promote_due(&self) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let due: Vec<(sled::IVec, Uuid)> = self
            .trees
            .delayed
            .range(..delayed_key(now.saturating_add(1), 0))
            .take(CHUNK)
            .filter_map(|entry| match entry {
                Ok((key, value)) => parse_id(&value).map(|id| Ok((key, id))),
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?;
        for (key, id) in due {
            let seq = self.db.generate_id()?;
            let t = &self.trees;
            let promoted = (&t.jobs, &t.ready, &t.delayed).transaction(|(jobs, ready, delayed)| {
                if delayed.remove(&key)?.is_none() {
                    return abort(Abort::Gone);
                }
                let mut job = read_job(jobs, id)?;
                if job.state != JobState::Delayed {
                    return abort(Abort::State(job.state));
                }
                job.state = JobState::Queued;
                job.seq = seq;
                write_job(jobs, &job)?;
                ready.insert(&ready_key(job.priority, seq), id.as_bytes())?;
                Ok(())
            });
            match promoted {
                Ok(()) => self.moved(JobState::Delayed, JobState::Queued),
                Err(TransactionError::Abort(Abort::Gone)) => {}
                Err(e) => return Err(map_tx_error(id, "promote")(e)),
            }
        }
        Ok(())
    }

    fn claim_sync(&self) -> Result<Option<Job>, StoreError> {
        if self.paused.load(Ordering::Acquire) {
            return Ok(None);
        }
        let _guard = self
            .claim_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.promote_due()?;
        loop {
            let Some((key, value)) = self.trees.ready.first()? else {
                return Ok(None);
            };
            let Some(id) = parse_id(&value) else {
                // A damaged index entry: drop it rather than wedge every worker on it.
                tracing::error!(key = ?key, "dropping an unreadable ready-queue entry");
                self.trees.ready.remove(&key)?;
                continue;
            };
            let now = self.clock.now_ms();
            let claimed = (&self.trees.jobs, &self.trees.ready).transaction(|(jobs, ready)| {
                if ready.remove(&key)?.is_none() {
                    return abort(Abort::Gone);
                }
                let mut job = read_job(jobs, id)?;
                if job.state != JobState::Queued {
                    return abort(Abort::State(job.state));
                }
                job.state = JobState::Active;
                job.started_at = Some(now);
                write_job(jobs, &job)?;
                Ok(job)
            });
            match claimed {
                Ok(job) => {
                    self.moved(JobState::Queued, JobState::Active);
                    return Ok(Some(job));
                }
                Err(TransactionError::Abort(Abort::Gone)) => continue,
                Err(TransactionError::Abort(Abort::NotFound | Abort::State(_))) => {
                    // The index pointed at a job that is not waiting: remove the stale entry.
                    tracing::error!(job_id = %id, "dropping a stale ready-queue entry");
                    self.trees.ready.remove(&key)?;
                    continue;
                }
                Err(e) => return Err(map_tx_error(id, "claim")(e)),
            }
        }
    }

    fn interaction_for(&self, job: &Job, now: Millis, action: Action) -> Interaction {
        let result = job.result.as_ref();
        let error = if action == Action::ChatBotError {
            job.error.as_ref()
        } else {
            None
        };
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
            timestamp: now,
        }
    }

    /// Writes `job` as finished, with its retention entry and its interaction-log entry.
    /// Returns whether the log entry was written.
    fn write_finished(
        &self,
        tx: &FinishTx<'_>,
        job: &Job,
        log_seq: u64,
        action: Option<Action>,
    ) -> TxResult<bool> {
        let at = job.finished_at.unwrap_or_default();
        tx.finished
            .insert(&finished_key(job.state, at, job.seq), job.id.as_bytes())?;
        write_job(tx.jobs, job)?;
        let Some(action) = action else {
            return Ok(false);
        };
        let entry = self.interaction_for(job, at, action);
        let Ok(bytes) = codec::encode(&entry) else {
            return Ok(false);
        };
        let key = interaction::log_key(at, log_seq);
        tx.log.insert(&key, bytes)?;
        tx.log_user
            .insert(interaction::index_key(&entry.user_id, &key), &[])?;
        tx.log_guild
            .insert(interaction::index_key(&entry.guild_id, &key), &[])?;
        Ok(true)
    }

    fn after_log(&self, logged: bool) {
        if logged {
            self.log_entries.fetch_add(1, Ordering::Relaxed);
        } else {
            self.log_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!("an interaction-log entry could not be written; the job is finished");
        }
    }

    fn complete_sync(&self, id: Uuid, result: &JobResult) -> Result<Job, StoreError> {
        let now = self.clock.now_ms();
        let log_seq = self.db.generate_id()?;
        let (job, logged) = self
            .finish_tx(|tx| {
                let mut job = read_job(tx.jobs, id)?;
                if job.state != JobState::Active {
                    return abort(Abort::State(job.state));
                }
                job.attempts += 1;
                job.state = JobState::Completed;
                job.finished_at = Some(now);
                job.result = Some(result.clone());
                job.error = None;
                let logged =
                    self.write_finished(tx, &job, log_seq, Some(Action::ChatBotInteraction))?;
                Ok((job, logged))
            })
            .map_err(map_tx_error(id, "complete"))?;
        self.moved(JobState::Active, JobState::Completed);
        self.after_log(logged);
        Ok(job)
    }

    fn fail_sync(
        &self,
        id: Uuid,
        error: &JobError,
        retry_in: Option<u64>,
    ) -> Result<(Job, FailOutcome), StoreError> {
        let now = self.clock.now_ms();
        let seq = self.db.generate_id()?;
        let log_seq = self.db.generate_id()?;
        let (job, outcome, logged) = self
            .finish_tx(|tx| {
                let mut job = read_job(tx.jobs, id)?;
                if job.state != JobState::Active {
                    return abort(Abort::State(job.state));
                }
                job.attempts += 1;
                job.error = Some(error.clone());
                match retry_in {
                    Some(delay) if job.attempts < job.max_attempts => {
                        job.state = JobState::Delayed;
                        job.run_at = now.saturating_add(delay);
                        job.seq = seq;
                        write_job(tx.jobs, &job)?;
                        tx.delayed
                            .insert(&delayed_key(job.run_at, seq), id.as_bytes())?;
                        Ok((job.clone(), FailOutcome::Retrying { at: job.run_at }, true))
                    }
                    _ => {
                        job.state = JobState::Failed;
                        job.finished_at = Some(now);
                        let logged =
                            self.write_finished(tx, &job, log_seq, Some(Action::ChatBotError))?;
                        Ok((job, FailOutcome::Failed, logged))
                    }
                }
            })
            .map_err(map_tx_error(id, "fail"))?;
        match outcome {
            FailOutcome::Retrying { .. } => {
                self.moved(JobState::Active, JobState::Delayed);
                // A sleeping worker may be waiting for a later due time.
                self.work.notify_one();
            }
            FailOutcome::Failed => {
                self.moved(JobState::Active, JobState::Failed);
                self.after_log(logged);
            }
        }
        Ok((job, outcome))
    }

    fn cancel_sync(&self, id: Uuid) -> Result<(Job, JobState), StoreError> {
        let now = self.clock.now_ms();
        self.finish_tx(|tx| {
            let mut job = read_job(tx.jobs, id)?;
            let before = job.state;
            if !matches!(before, JobState::Queued | JobState::Delayed) {
                return abort(Abort::State(before));
            }
            unlist(tx, &job)?;
            job.state = JobState::Cancelled;
            job.finished_at = Some(now);
            self.write_finished(tx, &job, 0, None)?;
            Ok((job, before))
        })
        .map_err(map_tx_error(id, "cancel"))
    }

    fn retry_sync(&self, id: Uuid) -> Result<Job, StoreError> {
        let seq = self.db.generate_id()?;
        let job = self
            .finish_tx(|tx| {
                let mut job = read_job(tx.jobs, id)?;
                if job.state != JobState::Failed {
                    return abort(Abort::State(job.state));
                }
                tx.finished.remove(&finished_key(
                    JobState::Failed,
                    job.finished_at.unwrap_or_default(),
                    job.seq,
                ))?;
                job.state = JobState::Queued;
                job.attempts = 0;
                job.error = None;
                job.started_at = None;
                job.finished_at = None;
                job.seq = seq;
                write_job(tx.jobs, &job)?;
                tx.ready
                    .insert(&ready_key(job.priority, seq), id.as_bytes())?;
                Ok(job)
            })
            .map_err(map_tx_error(id, "retry"))?;
        self.moved(JobState::Failed, JobState::Queued);
        self.work.notify_one();
        Ok(job)
    }

    /// Removes the oldest finished records of one kind beyond `keep`.
    fn prune_finished(&self, state: JobState, keep: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let count = self.counts[state.index()].load(Ordering::Relaxed);
            if count <= keep {
                return Ok(removed);
            }
            let excess = ((count - keep) as usize).min(CHUNK);
            let oldest: Vec<(sled::IVec, sled::IVec)> = self
                .trees
                .finished
                .scan_prefix([finished_kind(state)])
                .take(excess)
                .collect::<Result<_, _>>()?;
            if oldest.is_empty() {
                return Ok(removed);
            }
            let t = &self.trees;
            let n = (&t.jobs, &t.finished, &t.idem)
                .transaction(|(jobs, finished, idem)| {
                    let mut n = 0u64;
                    for (key, id) in &oldest {
                        if finished.remove(key)?.is_none() {
                            continue;
                        }
                        if let Some(bytes) = jobs.remove(id)? {
                            if let Ok(job) = codec::decode::<Job>(&bytes) {
                                if let Some(k) = &job.idempotency_key {
                                    idem.remove(idem_key(&job.user_id, k))?;
                                }
                            }
                            n += 1;
                        }
                    }
                    Ok::<_, ConflictableTransactionError<Abort>>(n)
                })
                .map_err(map_tx_error(Uuid::nil(), "prune"))?;
            self.counts[state.index()].fetch_sub(n, Ordering::Relaxed);
            removed += n;
            if n == 0 {
                return Ok(removed);
            }
        }
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
            for entry in self.trees.log.iter() {
                let (key, bytes) = entry?;
                let old = cutoff.is_some_and(|c| key.len() >= 8 && due_of(&key) < c);
                if batch.len() >= CHUNK || !(old || (batch.len() as u64) < over) {
                    break;
                }
                batch.push((key, bytes));
            }
            if batch.is_empty() {
                return Ok(removed);
            }
            let t = &self.trees;
            (&t.log, &t.log_user, &t.log_guild)
                .transaction(|(log, by_user, by_guild)| {
                    for (key, bytes) in &batch {
                        log.remove(key)?;
                        if let Ok(entry) = codec::decode::<Interaction>(bytes) {
                            by_user.remove(interaction::index_key(&entry.user_id, key))?;
                            by_guild.remove(interaction::index_key(&entry.guild_id, key))?;
                        }
                    }
                    Ok::<_, ConflictableTransactionError<Abort>>(())
                })
                .map_err(map_tx_error(Uuid::nil(), "prune log"))?;
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
                &self.trees.log_user,
                interaction::index_prefix(user),
                guild.clone(),
            ),
            (None, Some(guild)) => (
                &self.trees.log_guild,
                interaction::index_prefix(guild),
                None,
            ),
            (None, None) => (&self.trees.log, Vec::new(), None),
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
        let mut entries = Vec::with_capacity(limit);
        let mut next_cursor = None;
        for item in self.trees_range(tree, lower, upper) {
            let (key, value) = item?;
            let log_key = &key[prefix.len()..];
            let bytes = if prefix.is_empty() {
                value
            } else {
                match self.trees.log.get(log_key)? {
                    Some(bytes) => bytes,
                    None => continue,
                }
            };
            let mut entry: Interaction = codec::decode(&bytes)?;
            if filter_guild.as_ref().is_some_and(|g| *g != entry.guild_id) {
                continue;
            }
            if entries.len() == limit {
                next_cursor = entries.last().map(|e: &Interaction| e.id.clone());
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

    fn trees_range(
        &self,
        tree: &sled::Tree,
        lower: Vec<u8>,
        upper: Vec<u8>,
    ) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> {
        tree.range(lower..upper).rev()
    }

    fn list_sync(&self, state: JobState, limit: usize) -> Result<Vec<Job>, StoreError> {
        let ids: Vec<sled::IVec> = match state {
            JobState::Queued => self
                .trees
                .ready
                .iter()
                .values()
                .take(limit)
                .collect::<Result<_, _>>()?,
            JobState::Delayed => self
                .trees
                .delayed
                .iter()
                .values()
                .take(limit)
                .collect::<Result<_, _>>()?,
            JobState::Completed | JobState::Failed | JobState::Cancelled => self
                .trees
                .finished
                .scan_prefix([finished_kind(state)])
                .values()
                .rev()
                .take(limit)
                .collect::<Result<_, _>>()?,
            JobState::Active => {
                let mut jobs = Vec::new();
                for entry in self.trees.jobs.iter().values() {
                    let job: Job = codec::decode(&entry?)?;
                    if job.state == JobState::Active {
                        jobs.push(job);
                        if jobs.len() == limit {
                            break;
                        }
                    }
                }
                return Ok(jobs);
            }
        };
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(bytes) = self.trees.jobs.get(&id)? {
                jobs.push(codec::decode(&bytes)?);
            }
        }
        Ok(jobs)
    }

    /// Bytes sled uses on disk (for benchmarks).
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

fn map_tx_error(id: Uuid, action: &'static str) -> impl Fn(TransactionError<Abort>) -> StoreError {
    move |e| match e {
        TransactionError::Storage(e) => StoreError::Storage(e),
        TransactionError::Abort(Abort::Codec(e)) => StoreError::Codec(e),
        TransactionError::Abort(Abort::NotFound | Abort::Gone) => StoreError::NotFound(id),
        TransactionError::Abort(Abort::State(state)) => StoreError::Conflict {
            id,
            state: state.as_str(),
            action,
            allowed: match action {
                "cancel" => "queued or delayed",
                "retry" => "failed",
                _ => "active",
            },
        },
    }
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
            let (job, before) = self.cancel_sync(id)?;
            self.moved(before, JobState::Cancelled);
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
            self.trees.meta.insert(PAUSED_KEY, &[u8::from(paused)])?;
            self.paused.store(paused, Ordering::Release);
            if !paused {
                self.work.notify_waiters();
            }
            self.durable().await
        })
    }

    fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        match self.trees.jobs.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn list(&self, state: JobState, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.list_sync(state, limit)
    }

    fn counts(&self) -> QueueCounts {
        let get = |s: JobState| self.counts[s.index()].load(Ordering::Relaxed);
        QueueCounts {
            waiting: get(JobState::Queued),
            active: get(JobState::Active),
            completed: get(JobState::Completed),
            failed: get(JobState::Failed),
            delayed: get(JobState::Delayed),
            cancelled: get(JobState::Cancelled),
            paused: self.paused.load(Ordering::Acquire),
        }
    }

    fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self.trees.delayed.first()?.map(|(key, _)| due_of(&key)))
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
        &self.trees.jobs
    }
}
