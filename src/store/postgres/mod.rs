//! The shared backend: the whole store in PostgreSQL, so that every replica pointed at one
//! database shares one queue, one log and one pause state.
//!
//! Each operation is one short transaction, never open across an upstream call:
//!
//! - **push**: one `INSERT … ON CONFLICT DO NOTHING`; when an idempotency key matched, the
//!   existing job is read in a second statement (in the same statement the snapshot can
//!   predate a concurrent inserter's commit and see nothing).
//! - **claim**: the next due job by (priority, due time, sequence), locked with
//!   `FOR UPDATE SKIP LOCKED` in a CTE and leased to this replica with a fresh fencing token
//!   from `chatq_seq`. A claim whose lease runs out (the replica died) is put back by any
//!   replica's maintenance (`prune`): no leader.
//! - **complete / fail**: the job's row is updated only where it is still `active` under the
//!   caller's token; the interaction entry goes in the same transaction (`UNIQUE (job_id)`:
//!   logged exactly once).
//!
//! With `--durability strict` a commit returns once its WAL is on disk (`synchronous_commit`
//! on, PostgreSQL's default); `relaxed` turns it off for this store's connections.
//!
//! - **push_finished** (a reply from the cache): the job inserted `completed`, with its
//!   interaction entry, in one transaction.
//! - **cache**: one row per key in `chatq_cache`; a put upserts and removes what fell out of
//!   the newest `--cache-max-entries` stored (by `seq`, an index range, not a count).
//!
//! Other replicas hear of new work and finished jobs through LISTEN/NOTIFY (`listen.rs`).
//!
//! Times come from the database's clock, unless the store was opened on a test clock (see
//! `schema.rs`). Statements are prepared once per connection (deadpool's statement cache).

mod batch;
mod listen;
mod schema;
#[cfg(test)]
mod tests;
mod tls;

#[cfg(test)]
mod upkeep_tests {
    use super::*;

    #[test]
    fn counts_are_reused_for_a_second_then_taken_again() {
        let cache = CountsCache::default();
        let t0 = std::time::Instant::now();
        assert_eq!(cache.fresh(t0), None, "nothing yet");
        let counts = QueueCounts {
            queued: 3,
            ..QueueCounts::default()
        };
        cache.put(t0, counts);
        assert_eq!(cache.fresh(t0 + Duration::from_millis(999)), Some(counts));
        assert_eq!(
            cache.fresh(t0 + COUNTS_MAX_AGE),
            None,
            "a second old: count again"
        );
        cache.put(t0, counts);
        cache.forget();
        assert_eq!(
            cache.fresh(t0),
            None,
            "forgotten after this replica's pause or resume"
        );
    }

    /// A settable clock that says it is the wall clock.
    #[derive(Debug, Default)]
    struct Wall(AtomicU64);

    impl crate::clock::Clock for Wall {
        fn now_ms(&self) -> Millis {
            self.0.load(Ordering::SeqCst)
        }

        fn is_wall_clock(&self) -> bool {
            true
        }
    }

    #[test]
    fn upkeep_runs_at_its_own_pace_on_the_wall_clock_and_always_on_a_test_clock() {
        let wall = Wall(AtomicU64::new(1_000_000));
        let every = Every::new(7_500);
        assert!(every.due(&wall), "the first time");
        wall.0.fetch_add(7_499, Ordering::SeqCst);
        assert!(!every.due(&wall));
        wall.0.fetch_add(1, Ordering::SeqCst);
        assert!(every.due(&wall), "once the interval has passed");
        assert!(!every.due(&wall));
        let test_clock = crate::clock::ManualClock::new(1_000_000);
        assert!(every.due(test_clock.as_ref()) && every.due(test_clock.as_ref()));
    }
}

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};
use uuid::Uuid;

pub use schema::{NewerSchema, VERSION as SCHEMA_VERSION};

use crate::clock::{Millis, SharedClock};
use crate::domain::interaction::MAX_PAGE;
use crate::domain::{
    Action, CacheKey, CachedReply, ChatRequest, Cursor, GLOBAL_GUILD, GroupBy, Guild,
    GuildSettings, Interaction, Job, JobError, JobResult, JobState, LogPage, LogQuery, NewJob,
    QueueCounts, Turn, Usage, UsageQuery, UsageRow,
};
use crate::signals::JobNotifier;
use crate::store::{
    Claimed, Conversations, Durability, FailOutcome, Guilds, InteractionLog, JobStore, Lease,
    MAX_TURNS, Maintenance, PostgresOptions, Pushed, RateLimits, RateTake, ReplyCache, StoreError,
    StoreHealth, StoreOptions, StoreStatus, Unavailable,
};

/// Taken (per transaction) by the replica that applies retention, so one prunes at a time.
const RETENTION_LOCK: i64 = 0x6368_6174_7100_0002;
/// A maintenance pass puts back at most this many abandoned claims.
const RESCUE_BATCH: i64 = 1_000;
/// Retention runs at most this often, however often maintenance is called.
const RETENTION_EVERY_MS: u64 = 1_000;
/// Counts are one scan of the jobs table; stats pages, `/metrics` and `/readyz` on every
/// replica poll them, so each replica answers from a count at most this old.
const COUNTS_MAX_AGE: Duration = Duration::from_secs(1);

// Statement texts are constant, so each is formatted once (a `static LazyLock` where it is
// used), not per call: they run per job, and deadpool's statement cache is keyed by them.
const JOB_COLUMNS: &str = "id, user_id, guild_id, conversation_id, request, priority, attempts, \
    max_attempts, state, created_at, run_at, started_at, finished_at, result, error, \
    idempotency_key, request_id, lease_token";

const LOG_COLUMNS: &str = "ts_ms, seq, job_id, request_id, user_id, guild_id, action, \
    personality, prompt, reply, error, error_code, used_fallback, model, upstream_latency_ms, \
    usage, cached, attempts";

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // Connection trouble (SQLSTATE class 08), a server shutting down or out of resources
        // (57P0x, 53xxx), a connection that broke or never came: the database is unreachable,
        // for now. Anything else (a bad statement, a value that does not convert) is a fault.
        let unreachable = match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
            }
            None => {
                e.is_closed()
                    || std::error::Error::source(&e)
                        .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
                    || e.to_string().starts_with("timeout")
            }
        };
        if unreachable {
            Self::Unavailable(Unavailable::Unreachable {
                cause: crate::store::error_chain(&e),
            })
        } else {
            Self::Backend(Box::new(e))
        }
    }
}

impl From<PoolError> for StoreError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => e.into(),
            e => Self::Unavailable(Unavailable::Unreachable {
                cause: e.to_string(),
            }),
        }
    }
}

/// Lets a piece of upkeep run at most once per `every_ms` on the wall clock. On a test clock
/// it is always due: tests call maintenance to make it happen.
struct Every {
    every_ms: u64,
    /// When it last ran (ms on the store's clock; 0: never).
    last: AtomicU64,
}

impl Every {
    fn new(every_ms: u64) -> Self {
        Self {
            every_ms,
            last: AtomicU64::new(0),
        }
    }

    fn due(&self, clock: &dyn crate::clock::Clock) -> bool {
        let now = clock.now_ms();
        let last = self.last.load(Ordering::Relaxed);
        if clock.is_wall_clock() && last != 0 && now.saturating_sub(last) < self.every_ms {
            return false;
        }
        self.last.store(now.max(1), Ordering::Relaxed);
        true
    }
}

/// The last counts one replica took, good for [`COUNTS_MAX_AGE`].
#[derive(Default)]
struct CountsCache(std::sync::Mutex<Option<(std::time::Instant, QueueCounts)>>);

impl CountsCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, QueueCounts)>> {
        // A plain copy is behind it: a poisoned lock is taken as it is.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, now: std::time::Instant) -> Option<QueueCounts> {
        let (at, counts) = (*self.lock())?;
        (now.saturating_duration_since(at) < COUNTS_MAX_AGE).then_some(counts)
    }

    fn put(&self, at: std::time::Instant, counts: QueueCounts) {
        *self.lock() = Some((at, counts));
    }

    fn forget(&self) {
        *self.lock() = None;
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn ms(value: i64) -> Millis {
    value.max(0) as Millis
}

fn job_from(row: &Row) -> Result<Job, StoreError> {
    let state: String = row.try_get("state")?;
    let state = JobState::parse(&state).ok_or_else(|| corrupt("job state", &state))?;
    let Json(request): Json<ChatRequest> = row.try_get("request")?;
    let result: Option<Json<JobResult>> = row.try_get("result")?;
    let error: Option<Json<JobError>> = row.try_get("error")?;
    let priority: i64 = row.try_get("priority")?;
    let attempts: i32 = row.try_get("attempts")?;
    let max_attempts: i32 = row.try_get("max_attempts")?;
    let opt_ms = |name: &str| -> Result<Option<Millis>, StoreError> {
        Ok(row.try_get::<_, Option<i64>>(name)?.map(ms))
    };
    Ok(Job {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        guild_id: row.try_get("guild_id")?,
        conversation_id: row.try_get("conversation_id")?,
        request,
        priority: u32::try_from(priority).map_err(|e| corrupt("priority", e))?,
        attempts: u32::try_from(attempts).map_err(|e| corrupt("attempts", e))?,
        max_attempts: u32::try_from(max_attempts).map_err(|e| corrupt("max_attempts", e))?,
        state,
        created_at: ms(row.try_get("created_at")?),
        started_at: opt_ms("started_at")?,
        finished_at: opt_ms("finished_at")?,
        run_at: ms(row.try_get("run_at")?),
        result: result.map(|Json(r)| r),
        error: error.map(|Json(e)| e),
        idempotency_key: row.try_get("idempotency_key")?,
        request_id: row.try_get("request_id")?,
    })
}

fn cursor_for(ts_ms: i64, seq: i64) -> Cursor {
    Cursor::from_client(format!("{ts_ms}.{seq}"))
}

fn parse_cursor(cursor: &Cursor) -> Option<(i64, i64)> {
    let (ts, seq) = cursor.as_str().split_once('.')?;
    Some((ts.parse().ok()?, seq.parse().ok()?))
}

fn interaction_from(row: &Row) -> Result<Interaction, StoreError> {
    let action: String = row.try_get("action")?;
    let action = match action.as_str() {
        "chat_bot_interaction" => Action::ChatBotInteraction,
        "chat_bot_error" => Action::ChatBotError,
        other => return Err(corrupt("interaction action", other)),
    };
    let ts_ms: i64 = row.try_get("ts_ms")?;
    let seq: i64 = row.try_get("seq")?;
    let usage: Option<Json<Usage>> = row.try_get("usage")?;
    let attempts: i32 = row.try_get("attempts")?;
    Ok(Interaction {
        id: cursor_for(ts_ms, seq).as_str().to_owned(),
        job_id: row.try_get("job_id")?,
        request_id: row.try_get("request_id")?,
        user_id: row.try_get("user_id")?,
        guild_id: row.try_get("guild_id")?,
        action,
        personality: row.try_get("personality")?,
        prompt: row.try_get("prompt")?,
        reply: row.try_get("reply")?,
        error: row.try_get("error")?,
        error_code: row.try_get("error_code")?,
        used_fallback: row.try_get("used_fallback")?,
        model: row.try_get("model")?,
        upstream_latency_ms: row
            .try_get::<_, Option<i64>>("upstream_latency_ms")?
            .map(ms),
        usage: usage.map(|Json(u)| u),
        cached: row.try_get("cached")?,
        attempts: u32::try_from(attempts).map_err(|e| corrupt("attempts", e))?,
        timestamp: ms(ts_ms),
    })
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::ChatBotInteraction => "chat_bot_interaction",
        Action::ChatBotError => "chat_bot_error",
    }
}

/// The store on PostgreSQL.
pub struct PgStore {
    pool: Pool,
    /// For the rate-limit takes only: commits that do not wait for the WAL flush (see
    /// [`RateLimits::take`]).
    rate_pool: Pool,
    options: StoreOptions,
    lease_ms: i64,
    replica: String,
    clock: SharedClock,
    notifier: Arc<dyn JobNotifier>,
    commits: Arc<AtomicU64>,
    /// Pushes waiting for the next group commit.
    batcher: Arc<batch::Batcher>,
    /// How often maintenance puts back abandoned claims, and applies retention.
    rescue_every: Every,
    retention_every: Every,
    /// The last counts (only on the wall clock: a test clock gets exact counts every time).
    counts: CountsCache,
    /// What the other replicas are to hear of.
    announce: Arc<listen::Announcer>,
    // Dropped with the store: stops the announcing and listening tasks.
    _tasks: listen::Tasks,
}

impl PgStore {
    /// Connects, applies the schema's migrations and opens the store.
    pub async fn open(
        options: StoreOptions,
        pg: &PostgresOptions,
        clock: SharedClock,
        notifier: Arc<dyn JobNotifier>,
    ) -> Result<Self, StoreError> {
        let rate = PostgresOptions {
            pool_size: (pg.pool_size / 2).max(2),
            ..pg.clone()
        };
        let (rate_pool, _, _) = pool(&rate, Durability::Relaxed)?;
        let (pool, config, tls) = pool(pg, options.durability)?;
        let mut client = pool.get().await.map_err(|e| StoreError::Open {
            what: "could not connect to the database (--database-url)".to_owned(),
            source: Box::new(e),
        })?;
        schema::migrate(&mut client).await?;
        drop(client);
        let announce = Arc::new(listen::Announcer::default());
        let (tasks, stop) = listen::Tasks::new();
        // Both tasks hold only handles (the pool, the notifier) and end when the store is
        // dropped; nothing durable happens in them, so nobody needs to await their end.
        tokio::spawn(Arc::clone(&announce).run(pool.clone(), stop.clone()));
        let commits = Arc::new(AtomicU64::new(0));
        let batcher = Arc::new(batch::Batcher::default());
        let on_commit = {
            let (commits, notifier, announce) = (
                Arc::clone(&commits),
                Arc::clone(&notifier),
                Arc::clone(&announce),
            );
            Arc::new(move |inserted: usize| {
                commits.fetch_add(1, Ordering::Relaxed);
                if inserted > 0 {
                    for _ in 0..inserted {
                        notifier.work_available();
                    }
                    announce.work();
                }
            })
        };
        tokio::spawn(Arc::clone(&batcher).run(
            pool.clone(),
            clock.clone(),
            on_commit,
            stop.clone(),
        ));
        tokio::spawn(listen::listen(
            config,
            tls,
            Arc::clone(&notifier),
            read_finished(pool.clone(), Arc::clone(&notifier)),
            stop,
        ));
        Ok(Self {
            pool,
            rate_pool,
            options,
            lease_ms: pg.lease.as_millis() as i64,
            replica: pg.replica.clone(),
            clock,
            notifier,
            commits,
            batcher,
            // A dead replica's jobs come back within a quarter of the lease after it ran out.
            rescue_every: Every::new(pg.lease.as_millis() as u64 / 4),
            retention_every: Every::new(RETENTION_EVERY_MS),
            counts: CountsCache::default(),
            announce,
            _tasks: tasks,
        })
    }

    /// The time to pass as `$1` of a statement: `None` (the database's clock) unless the store
    /// runs on a test clock.
    fn now(&self) -> Option<i64> {
        (!self.clock.is_wall_clock()).then(|| self.clock.now_ms() as i64)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    fn committed(&self) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    async fn query_jobs(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Job>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        let rows = client.query(&statement, params).await?;
        rows.iter().map(job_from).collect()
    }

    /// Why a transition on `id` found no row to change: the job is gone, or in `state`.
    async fn state_of(&self, id: Uuid) -> Result<Option<JobState>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT state FROM chatq_jobs WHERE id = $1", &[&id])
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let state: String = row.try_get(0)?;
                Ok(Some(
                    JobState::parse(&state).ok_or_else(|| corrupt("job state", &state))?,
                ))
            }
        }
    }

    async fn conflict(&self, id: Uuid, action: &'static str, allowed: &'static str) -> StoreError {
        match self.state_of(id).await {
            Ok(None) => StoreError::NotFound(id),
            Ok(Some(state)) => StoreError::Conflict {
                id,
                state: state.as_str(),
                action,
                allowed,
            },
            Err(e) => e,
        }
    }

    /// An admin transition of job `id` (`sql` takes the time and the id): the job as it is now,
    /// or why the job was not in a state that allows `action`.
    async fn transition(
        &self,
        sql: &str,
        id: Uuid,
        action: &'static str,
        allowed: &'static str,
    ) -> Result<Job, StoreError> {
        let job = self
            .query_jobs(sql, &[&self.now(), &id])
            .await?
            .into_iter()
            .next();
        let Some(job) = job else {
            return Err(self.conflict(id, action, allowed).await);
        };
        self.committed();
        Ok(job)
    }

    /// Finishes the leased job with `update` (which sets its final or retry state) and logs
    /// it when it ended, in one transaction.
    async fn finish(
        &self,
        lease: &Lease,
        update: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Job, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let statement = tx.prepare_cached(update).await?;
        let row = tx.query_opt(&statement, params).await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Err(match self.state_of(lease.job_id).await? {
                None => StoreError::NotFound(lease.job_id),
                Some(_) => StoreError::LeaseLost(lease.job_id),
            });
        };
        let job = job_from(&row)?;
        if job.state.is_terminal() {
            insert_interaction(&tx, &Interaction::for_finished(&job)).await?;
            insert_turn(&tx, &job).await?;
        }
        tx.commit().await?;
        self.committed();
        Ok(job)
    }

    /// Why an insert under `id` changed nothing: the idempotency key `key` of `user_id` names an
    /// existing job (returned, not created), or else the pre-assigned id is taken.
    async fn existing(
        &self,
        id: Uuid,
        user_id: &str,
        key: Option<&str>,
    ) -> Result<Pushed, StoreError> {
        if let Some(key) = key {
            static SQL: LazyLock<String> = LazyLock::new(|| {
                format!(
                    "SELECT {JOB_COLUMNS} FROM chatq_jobs WHERE user_id = $1 AND idempotency_key = $2"
                )
            });
            if let Some(job) = self
                .query_jobs(SQL.as_str(), &[&user_id, &key])
                .await?
                .into_iter()
                .next()
            {
                return Ok(Pushed {
                    job,
                    created: false,
                });
            }
        }
        Err(StoreError::id_taken(id))
    }

    /// Puts back claims whose lease ran out; returns how many.
    async fn rescue(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH now AS (SELECT {now} AS ms),
             stale AS (SELECT id FROM chatq_jobs
                 WHERE state = 'active' AND lease_expires_at < (SELECT ms FROM now)
                 ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE chatq_jobs j SET state = 'queued', rescues = j.rescues + 1,
                 lease_owner = NULL, lease_expires_at = NULL
             FROM stale WHERE j.id = stale.id",
                now = schema::NOW
            )
        });
        let statement = client.prepare_cached(SQL.as_str()).await?;
        let rescued = client
            .execute(&statement, &[&self.now(), &RESCUE_BATCH])
            .await?;
        if rescued > 0 {
            self.committed();
            tracing::warn!(
                jobs = rescued,
                "put back jobs whose claim ran out (a replica died or stalled)"
            );
            self.notifier.work_available_for_all();
            self.announce.work();
        }
        Ok(rescued)
    }

    /// Retention of finished jobs and the log, by one replica at a time.
    async fn retention(&self) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(0);
        }
        let mut removed = 0;
        for (state, keep) in [
            ("completed", self.options.keep_completed),
            ("failed", self.options.keep_failed),
            ("cancelled", self.options.keep_failed),
        ] {
            let keep = i64::try_from(keep).unwrap_or(i64::MAX);
            removed += if keep == 0 {
                tx.execute("DELETE FROM chatq_jobs WHERE state = $1", &[&state])
                    .await?
            } else {
                // From the `chatq_jobs_done` index: the newest `keep` stay.
                tx.execute(
                    "DELETE FROM chatq_jobs WHERE state = $1 AND (finished_at, seq) <
                     (SELECT finished_at, seq FROM chatq_jobs WHERE state = $1
                      ORDER BY finished_at DESC, seq DESC OFFSET $2::bigint - 1 LIMIT 1)",
                    &[&state, &keep],
                )
                .await?
            };
        }
        // Limit keys whose bucket is whole again say nothing a missing key would not.
        let now = self.clock.now_ms() as i64;
        tx.execute("DELETE FROM chatq_rate WHERE tat < $1", &[&now])
            .await?;
        removed += tx
            .execute("DELETE FROM chatq_cache WHERE expires_at <= $1", &[&now])
            .await?;
        let turn_cutoff = now.saturating_sub(
            i64::try_from(self.options.conversation_max_age_ms).unwrap_or(i64::MAX),
        );
        removed += tx
            .execute("DELETE FROM chatq_turns WHERE at < $1", &[&turn_cutoff])
            .await?;
        // Deliveries that ended a day ago.
        removed += tx
            .execute(
                "DELETE FROM chatq_deliveries WHERE state IN ('delivered', 'failed') AND next_at < $1",
                &[&(now - 86_400_000)],
            )
            .await?;
        let retention = self.options.log_retention;
        if let Some(age) = retention.max_age_ms {
            let cutoff = self.clock.now_ms().saturating_sub(age) as i64;
            removed += tx
                .execute(
                    "DELETE FROM chatq_interactions WHERE ts_ms < $1",
                    &[&cutoff],
                )
                .await?;
        }
        if let Some(max) = retention.max_entries {
            let max = i64::try_from(max).unwrap_or(i64::MAX).max(1);
            removed += tx
                .execute(
                    "DELETE FROM chatq_interactions WHERE (ts_ms, seq) <
                     (SELECT ts_ms, seq FROM chatq_interactions
                      ORDER BY ts_ms DESC, seq DESC OFFSET $1::bigint - 1 LIMIT 1)",
                    &[&max],
                )
                .await?;
        }
        tx.commit().await?;
        self.committed();
        Ok(removed)
    }
}

/// Checks that `url` is a connection string this store can use; the reason never repeats
/// the URL, which may hold a password.
pub fn check_url(url: &str) -> Result<(), String> {
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("not a PostgreSQL connection string ({e})"))
}

/// Brings the database `url` names to the current schema (`chatq migrate`); returns the
/// versions before and after.
pub async fn migrate(
    url: &crate::secret::Secret,
    ca_file: Option<std::path::PathBuf>,
) -> Result<(i32, i32), StoreError> {
    let pg = PostgresOptions {
        url: url.clone(),
        lease: Duration::from_secs(crate::defaults::LEASE_SECS),
        replica: "migrate".to_owned(),
        pool_size: 2,
        ca_file,
    };
    let (pool, _, _) = pool(&pg, Durability::Strict)?;
    let mut client = pool.get().await.map_err(|e| StoreError::Open {
        what: "could not connect to the database (--database-url)".to_owned(),
        source: Box::new(e),
    })?;
    let before = schema::migrate(&mut client).await?;
    Ok((before, schema::VERSION))
}

/// How the listener reads back jobs another replica finished, for this replica's waiters.
fn read_finished(pool: Pool, notifier: Arc<dyn JobNotifier>) -> listen::ReadFinished {
    Arc::new(move |ids: Vec<Uuid>| {
        let (pool, notifier) = (pool.clone(), Arc::clone(&notifier));
        Box::pin(async move {
            let read = async {
                let client = pool.get().await?;
                static SQL: LazyLock<String> = LazyLock::new(|| {
                    format!(
                        "SELECT {JOB_COLUMNS} FROM chatq_jobs WHERE id = ANY($1)
                     AND state IN ('completed', 'failed', 'cancelled')"
                    )
                });
                let rows = client.query(SQL.as_str(), &[&ids]).await?;
                rows.iter()
                    .map(job_from)
                    .collect::<Result<Vec<_>, StoreError>>()
            };
            match read.await {
                Ok(jobs) => jobs.iter().for_each(|job| notifier.job_finished(job)),
                // The waiters re-read their job every second anyway.
                Err(e) => tracing::debug!(error = %e, "could not read jobs finished elsewhere"),
            }
        })
    })
}

fn pool(
    pg: &PostgresOptions,
    durability: Durability,
) -> Result<(Pool, tokio_postgres::Config, tls::MakeRustlsConnect), StoreError> {
    let mut config: tokio_postgres::Config =
        pg.url.expose().parse().map_err(|e| StoreError::Open {
            what: "the database URL is not a PostgreSQL connection string (--database-url)"
                .to_owned(),
            source: Box::new(e),
        })?;
    config.application_name("chatq");
    if durability == Durability::Relaxed {
        // A commit returns before its WAL is flushed: the last moments of acknowledged work
        // can be lost if the database server crashes.
        config.options("-c synchronous_commit=off");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if pg.ca_file.is_some() {
        // A certificate to check against means TLS is not optional.
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    let tls = tls::connector(pg.ca_file.as_deref())?;
    let manager = Manager::from_config(
        config.clone(),
        tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(pg.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StoreError::Open {
            what: "could not set up the database connection pool".to_owned(),
            source: Box::new(e),
        })?;
    Ok((pool, config, tls))
}

async fn insert_interaction(
    tx: &deadpool_postgres::Transaction<'_>,
    e: &Interaction,
) -> Result<(), StoreError> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO chatq_interactions (ts_ms, job_id, request_id, user_id, guild_id, action,
                 personality, prompt, reply, error, error_code, used_fallback, model,
                 upstream_latency_ms, usage, attempts, cached)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
             ON CONFLICT (job_id) DO NOTHING",
        )
        .await?;
    let latency = e.upstream_latency_ms.map(|l| l as i64);
    let usage = e.usage.map(Json);
    tx.execute(
        &statement,
        &[
            &(e.timestamp as i64),
            &e.job_id,
            &e.request_id,
            &e.user_id,
            &e.guild_id,
            &action_name(e.action),
            &e.personality,
            &e.prompt,
            &e.reply,
            &e.error,
            &e.error_code,
            &e.used_fallback,
            &e.model,
            &latency,
            &usage,
            &(e.attempts as i32),
            &e.cached,
        ],
    )
    .await?;
    Ok(())
}

#[async_trait]
impl JobStore for PgStore {
    async fn push(&self, new: NewJob) -> Result<Pushed, StoreError> {
        let id = new.id.unwrap_or_else(Uuid::new_v4);
        let (user_id, key) = (new.user_id.clone(), new.idempotency_key.clone());
        // Committed with whatever else is being pushed at this moment (`batch.rs`).
        let Some(job) = self.batcher.push(id, new).await? else {
            return self.existing(id, &user_id, key.as_deref()).await;
        };
        Ok(Pushed { job, created: true })
    }

    async fn push_finished(&self, new: NewJob, result: JobResult) -> Result<Pushed, StoreError> {
        let id = new.id.unwrap_or_else(Uuid::new_v4);
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT INTO chatq_jobs (id, seq, user_id, guild_id, conversation_id, request,
                 priority, max_attempts, state, created_at, run_at, started_at, finished_at,
                 result, idempotency_key, request_id)
             SELECT $2, nextval('chatq_seq'), $3, $4, $5, $6, $7, $8, 'completed',
                 now.ms, now.ms, now.ms, now.ms, $9, $10, $11
             FROM (SELECT {now} AS ms) now
             ON CONFLICT DO NOTHING
             RETURNING {JOB_COLUMNS}",
                now = schema::NOW
            )
        });
        let (request, result) = (Json(&new.request), Json(&result));
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let statement = tx.prepare_cached(SQL.as_str()).await?;
        let row = tx
            .query_opt(
                &statement,
                &[
                    &self.now(),
                    &id,
                    &new.user_id,
                    &new.guild_id,
                    &new.conversation_id,
                    &request,
                    &i64::from(new.priority),
                    &(new.max_attempts.max(1) as i32),
                    &result,
                    &new.idempotency_key,
                    &new.request_id,
                ],
            )
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            drop(client);
            return self
                .existing(id, &new.user_id, new.idempotency_key.as_deref())
                .await;
        };
        let job = job_from(&row)?;
        insert_interaction(&tx, &Interaction::for_finished(&job)).await?;
        insert_turn(&tx, &job).await?;
        tx.commit().await?;
        self.committed();
        self.notifier.job_finished(&job);
        self.announce.done(job.id);
        Ok(Pushed { job, created: true })
    }

    async fn push_claimed(&self, new: NewJob) -> Result<Option<Claimed>, StoreError> {
        let id = new.id.unwrap_or_else(Uuid::new_v4);
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT INTO chatq_jobs (id, seq, user_id, guild_id, conversation_id, request,
                 priority, max_attempts, state, created_at, run_at, started_at, request_id,
                 lease_token, lease_owner, lease_expires_at)
             SELECT $2, nextval('chatq_seq'), $3, $4, $5, $6, $7, $8, 'active',
                 now.ms, now.ms, now.ms, $9, nextval('chatq_seq'), $10, now.ms + $11
             FROM (SELECT {now} AS ms) now
             WHERE NOT (SELECT paused FROM chatq_meta)
             ON CONFLICT DO NOTHING
             RETURNING {JOB_COLUMNS}",
                now = schema::NOW
            )
        });
        let request = Json(&new.request);
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL.as_str()).await?;
        let row = client
            .query_opt(
                &statement,
                &[
                    &self.now(),
                    &id,
                    &new.user_id,
                    &new.guild_id,
                    &new.conversation_id,
                    &request,
                    &i64::from(new.priority),
                    &(new.max_attempts.max(1) as i32),
                    &new.request_id,
                    &self.replica,
                    &self.lease_ms,
                ],
            )
            .await?;
        let Some(row) = row else {
            let paused: bool = client
                .query_one("SELECT paused FROM chatq_meta", &[])
                .await?
                .get(0);
            if paused {
                return Ok(None);
            }
            return Err(StoreError::id_taken(id));
        };
        self.committed();
        let token: i64 = row.try_get("lease_token")?;
        let job = job_from(&row)?;
        let lease = Lease {
            job_id: job.id,
            token: token as u64,
        };
        Ok(Some(Claimed { job, lease }))
    }

    async fn claim(&self) -> Result<Option<Claimed>, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH now AS (SELECT {now} AS ms),
             next AS (SELECT id FROM chatq_jobs
                 WHERE state IN ('queued', 'delayed') AND run_at <= (SELECT ms FROM now)
                   AND NOT (SELECT paused FROM chatq_meta)
                 ORDER BY priority, run_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED)
             UPDATE chatq_jobs j SET state = 'active', started_at = (SELECT ms FROM now),
                 lease_token = nextval('chatq_seq'), lease_owner = $2,
                 lease_expires_at = (SELECT ms FROM now) + $3
             FROM next WHERE j.id = next.id
             RETURNING {columns}",
                now = schema::NOW,
                columns = JOB_COLUMNS
                    .split(", ")
                    .map(|c| format!("j.{}", c.trim()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL.as_str()).await?;
        let row = client
            .query_opt(&statement, &[&self.now(), &self.replica, &self.lease_ms])
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        self.committed();
        let token: i64 = row.try_get("lease_token")?;
        let job = job_from(&row)?;
        let lease = Lease {
            job_id: job.id,
            token: token as u64,
        };
        Ok(Some(Claimed { job, lease }))
    }

    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<Lease>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = leases.iter().map(|l| l.job_id).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| l.token as i64).collect();
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE chatq_jobs j SET lease_expires_at = {now} + $4
             FROM unnest($2::uuid[], $3::bigint[]) AS h(id, token)
             WHERE j.id = h.id AND j.lease_token = h.token AND j.state = 'active'
             RETURNING j.id, j.lease_token",
                now = schema::NOW
            )
        });
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL.as_str()).await?;
        let rows = client
            .query(&statement, &[&self.now(), &ids, &tokens, &self.lease_ms])
            .await?;
        let mut held = std::collections::HashSet::with_capacity(rows.len());
        for row in &rows {
            let id: Uuid = row.try_get(0)?;
            let token: i64 = row.try_get(1)?;
            held.insert((id, token as u64));
        }
        Ok(leases
            .iter()
            .filter(|l| held.contains(&(l.job_id, l.token)))
            .copied()
            .collect())
    }

    async fn complete(&self, lease: &Lease, result: JobResult) -> Result<Job, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE chatq_jobs SET state = 'completed', attempts = attempts + 1,
                 finished_at = {now}, result = $4, error = NULL, lease_expires_at = NULL
             WHERE id = $2 AND state = 'active' AND lease_token = $3
             RETURNING {JOB_COLUMNS}",
                now = schema::NOW
            )
        });
        let result = Json(&result);
        let job = self
            .finish(
                lease,
                SQL.as_str(),
                &[&self.now(), &lease.job_id, &(lease.token as i64), &result],
            )
            .await?;
        self.notifier.job_finished(&job);
        self.announce.done(job.id);
        Ok(job)
    }

    async fn fail(
        &self,
        lease: &Lease,
        error: JobError,
        retry_in: Option<u64>,
    ) -> Result<(Job, FailOutcome), StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
            "UPDATE chatq_jobs SET attempts = attempts + 1, error = $4, lease_expires_at = NULL,
                 state = CASE WHEN $5::bigint IS NOT NULL AND attempts + 1 < max_attempts
                     THEN 'delayed' ELSE 'failed' END,
                 run_at = CASE WHEN $5::bigint IS NOT NULL AND attempts + 1 < max_attempts
                     THEN {now} + $5 ELSE run_at END,
                 finished_at = CASE WHEN $5::bigint IS NOT NULL AND attempts + 1 < max_attempts
                     THEN NULL ELSE {now} END
             WHERE id = $2 AND state = 'active' AND lease_token = $3
             RETURNING {JOB_COLUMNS}",
            now = schema::NOW
        )
        });
        let retry_in = retry_in.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX));
        let error = Json(&error);
        let job = self
            .finish(
                lease,
                SQL.as_str(),
                &[
                    &self.now(),
                    &lease.job_id,
                    &(lease.token as i64),
                    &error,
                    &retry_in,
                ],
            )
            .await?;
        if job.state == JobState::Delayed {
            // A sleeping worker may be waiting for a later due time.
            self.notifier.work_available();
            self.announce.work();
            let at = job.run_at;
            return Ok((job, FailOutcome::Retrying { at }));
        }
        self.notifier.job_finished(&job);
        self.announce.done(job.id);
        Ok((job, FailOutcome::Failed))
    }

    async fn cancel(&self, id: Uuid) -> Result<Job, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE chatq_jobs SET state = 'cancelled', finished_at = {now}
             WHERE id = $2 AND state IN ('queued', 'delayed')
             RETURNING {JOB_COLUMNS}",
                now = schema::NOW
            )
        });
        let job = self
            .transition(SQL.as_str(), id, "cancel", "queued or delayed")
            .await?;
        self.notifier.job_finished(&job);
        self.announce.done(job.id);
        Ok(job)
    }

    async fn retry(&self, id: Uuid) -> Result<Job, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE chatq_jobs SET state = 'queued', attempts = 0, error = NULL,
                 started_at = NULL, finished_at = NULL, run_at = {now},
                 seq = nextval('chatq_seq')
             WHERE id = $2 AND state = 'failed'
             RETURNING {JOB_COLUMNS}",
                now = schema::NOW
            )
        });
        let job = self.transition(SQL.as_str(), id, "retry", "failed").await?;
        self.notifier.work_available();
        self.announce.work();
        Ok(job)
    }

    async fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("UPDATE chatq_meta SET paused = $1", &[&paused])
            .await?;
        self.committed();
        // Whoever paused reads it back at once.
        self.counts.forget();
        if !paused {
            self.notifier.work_available_for_all();
            self.announce.work();
        }
        Ok(())
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        static SQL: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM chatq_jobs WHERE id = $1"));
        Ok(self
            .query_jobs(SQL.as_str(), &[&id])
            .await?
            .into_iter()
            .next())
    }

    async fn list(&self, state: JobState, limit: usize) -> Result<Vec<Job>, StoreError> {
        let order = match state {
            JobState::Queued => "priority, run_at, seq",
            JobState::Delayed => "run_at, seq",
            JobState::Active => "started_at, seq",
            JobState::Completed | JobState::Failed | JobState::Cancelled => {
                "finished_at DESC, seq DESC"
            }
        };
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM chatq_jobs WHERE state = $1 ORDER BY {order} LIMIT $2"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.query_jobs(&sql, &[&state.as_str(), &limit]).await
    }

    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        let now = std::time::Instant::now();
        if self.clock.is_wall_clock() {
            if let Some(counts) = self.counts.fresh(now) {
                return Ok(counts);
            }
        }
        let counts = self.count_now().await?;
        self.counts.put(now, counts);
        Ok(counts)
    }

    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT min(run_at) FROM chatq_jobs WHERE state = 'delayed'",
                &[],
            )
            .await?;
        Ok(row.try_get::<_, Option<i64>>(0)?.map(ms))
    }
}

impl PgStore {
    /// Counts per state, from one scan.
    async fn count_now(&self) -> Result<QueueCounts, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT state, count(*) FROM chatq_jobs GROUP BY state
                 UNION ALL SELECT 'paused', paused::int::bigint FROM chatq_meta",
                &[],
            )
            .await?;
        let mut counts = QueueCounts::default();
        for row in rows {
            let state: String = row.try_get(0)?;
            let n: i64 = row.try_get(1)?;
            let n = n.max(0) as u64;
            match state.as_str() {
                "queued" => counts.queued = n,
                "delayed" => counts.delayed = n,
                "active" => counts.active = n,
                "completed" => counts.completed = n,
                "failed" => counts.failed = n,
                "cancelled" => counts.cancelled = n,
                "paused" => counts.paused = n > 0,
                other => return Err(corrupt("job state", other)),
            }
        }
        Ok(counts)
    }
}

/// The conditions of the log filters that are set, with their parameters appended to
/// `params`: one SQL text per combination, never a catch-all `$1 IS NULL OR …` (which can get
/// a bad generic plan); each an index range scan.
fn log_conditions<'a>(
    user_id: &'a Option<String>,
    guild_id: &'a Option<String>,
    since: &'a Option<i64>,
    until: &'a Option<i64>,
    params: &mut Vec<&'a (dyn ToSql + Sync)>,
) -> Vec<String> {
    let mut conditions = Vec::new();
    for (column, value) in [("user_id", user_id), ("guild_id", guild_id)] {
        if let Some(value) = value {
            params.push(value);
            conditions.push(format!("{column} = ${}", params.len()));
        }
    }
    if let Some(since) = since {
        params.push(since);
        conditions.push(format!("ts_ms >= ${}", params.len()));
    }
    if let Some(until) = until {
        params.push(until);
        conditions.push(format!("ts_ms < ${}", params.len()));
    }
    conditions
}

fn where_clause(conditions: &[String]) -> String {
    if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    }
}

#[async_trait]
impl InteractionLog for PgStore {
    async fn query(&self, q: &LogQuery) -> Result<LogPage, StoreError> {
        let limit = q.limit.clamp(1, MAX_PAGE);
        let cursor = match &q.cursor {
            Some(cursor) => Some(parse_cursor(cursor).ok_or(StoreError::InvalidCursor)?),
            None => None,
        };
        // One SQL text per combination of filters (a catch-all `$1 IS NULL OR …` can get a
        // bad generic plan), each an index range scan newest first.
        let since = q.since.map(|t| t as i64);
        let until = q.until.map(|t| t as i64);
        let (cursor_ts, cursor_seq) = cursor.unzip();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        let mut conditions = log_conditions(&q.user_id, &q.guild_id, &since, &until, &mut params);
        if let (Some(ts), Some(seq)) = (&cursor_ts, &cursor_seq) {
            params.push(ts);
            params.push(seq);
            conditions.push(format!(
                "(ts_ms, seq) < (${}, ${})",
                params.len() - 1,
                params.len()
            ));
        }
        let filter = where_clause(&conditions);
        let sql = format!(
            "SELECT {LOG_COLUMNS} FROM chatq_interactions {filter}
             ORDER BY ts_ms DESC, seq DESC LIMIT {}",
            limit + 1
        );
        let client = self.client().await?;
        let statement = client.prepare_cached(&sql).await?;
        let rows = client.query(&statement, &params).await?;
        let mut entries = rows
            .iter()
            .map(interaction_from)
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map(|e| Cursor::from_client(e.id.clone()))
        } else {
            None
        };
        Ok(LogPage {
            entries,
            next_cursor,
        })
    }

    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let since = q.since.map(|t| t as i64);
        let until = q.until.map(|t| t as i64);
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        let conditions = log_conditions(&q.user_id, &q.guild_id, &since, &until, &mut params);
        let key = match q.group_by {
            GroupBy::User => "user_id",
            GroupBy::Guild => "guild_id",
            GroupBy::Day => {
                "to_char(to_timestamp(ts_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
            GroupBy::Hour => {
                "to_char(to_timestamp(ts_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00\"Z\"')"
            }
        };
        let sql = format!(
            "SELECT {key} AS key, count(*),
                 count(*) FILTER (WHERE action = 'chat_bot_interaction'),
                 count(*) FILTER (WHERE action = 'chat_bot_error'),
                 count(*) FILTER (WHERE used_fallback),
                 count(*) FILTER (WHERE cached),
                 coalesce(sum((usage->>'prompt_tokens')::bigint), 0)::bigint,
                 coalesce(sum((usage->>'completion_tokens')::bigint), 0)::bigint
             FROM chatq_interactions {filter} GROUP BY 1 ORDER BY 1",
            filter = where_clause(&conditions)
        );
        let client = self.client().await?;
        let statement = client.prepare_cached(&sql).await?;
        let rows = client.query(&statement, &params).await?;
        let count = |row: &Row, i: usize| -> Result<u64, StoreError> {
            Ok(row.try_get::<_, i64>(i)?.max(0) as u64)
        };
        rows.iter()
            .map(|row| {
                Ok(UsageRow {
                    key: row.try_get(0)?,
                    requests: count(row, 1)?,
                    completed: count(row, 2)?,
                    failed: count(row, 3)?,
                    fallback: count(row, 4)?,
                    cached: count(row, 5)?,
                    prompt_tokens: count(row, 6)?,
                    completion_tokens: count(row, 7)?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl Guilds for PgStore {
    async fn guild(&self, guild_id: &str) -> Result<Option<Guild>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT guild_id, settings, updated_at FROM chatq_guilds WHERE guild_id = $1",
            )
            .await?;
        let row = client.query_opt(&statement, &[&guild_id]).await?;
        row.as_ref().map(guild_from).transpose()
    }

    async fn guilds(&self) -> Result<Vec<Guild>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT guild_id, settings, updated_at FROM chatq_guilds ORDER BY guild_id",
                &[],
            )
            .await?;
        rows.iter().map(guild_from).collect()
    }

    async fn put_guild(
        &self,
        guild_id: &str,
        settings: &GuildSettings,
    ) -> Result<Guild, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT INTO chatq_guilds (guild_id, settings, updated_at)
                 VALUES ($2, $3, {now})
                 ON CONFLICT (guild_id) DO UPDATE
                   SET settings = excluded.settings, updated_at = excluded.updated_at
                 RETURNING guild_id, settings, updated_at",
                now = schema::NOW
            )
        });
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL.as_str()).await?;
        let row = client
            .query_one(&statement, &[&self.now(), &guild_id, &Json(settings)])
            .await?;
        self.committed();
        guild_from(&row)
    }

    async fn delete_guild(&self, guild_id: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM chatq_guilds WHERE guild_id = $1", &[&guild_id])
            .await?;
        Ok(n > 0)
    }
}

fn guild_from(row: &Row) -> Result<Guild, StoreError> {
    let Json(settings): Json<GuildSettings> = row.try_get("settings")?;
    Ok(Guild {
        guild_id: row.try_get("guild_id")?,
        settings,
        updated_at: ms(row.try_get("updated_at")?),
    })
}

fn state_name(state: crate::domain::DeliveryState) -> &'static str {
    match state {
        crate::domain::DeliveryState::Pending => "pending",
        crate::domain::DeliveryState::Delivered => "delivered",
        crate::domain::DeliveryState::Failed => "failed",
        crate::domain::DeliveryState::Waiting => "waiting",
    }
}

fn delivery_from(row: &Row) -> Result<crate::domain::Delivery, StoreError> {
    let Json(delivery): Json<crate::domain::Delivery> = row.try_get("record")?;
    Ok(delivery)
}

#[async_trait]
impl crate::store::Outbox for PgStore {
    async fn add_delivery(&self, d: &crate::domain::Delivery) -> Result<(), StoreError> {
        self.save_delivery(d).await
    }

    /// One statement: the due rows locked with SKIP LOCKED and leased (their `next_at`, in
    /// the row and in the record) in the same update.
    async fn claim_deliveries(
        &self,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<crate::domain::Delivery>, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH now AS (SELECT {now} AS ms),
             due AS (SELECT id FROM chatq_deliveries
                 WHERE state IN ('pending', 'waiting') AND next_at <= (SELECT ms FROM now)
                 ORDER BY next_at, created_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE chatq_deliveries d SET next_at = (SELECT ms FROM now) + $3, state = 'pending',
                 record = d.record || jsonb_build_object(
                     'next_at', (SELECT ms FROM now) + $3, 'state', 'pending')
             FROM due WHERE d.id = due.id
             RETURNING d.record",
                now = schema::NOW
            )
        });
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let lease = i64::try_from(lease_ms).unwrap_or(i64::MAX / 2);
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL.as_str()).await?;
        let rows = client
            .query(&statement, &[&self.now(), &limit, &lease])
            .await?;
        let mut due = rows
            .iter()
            .map(delivery_from)
            .collect::<Result<Vec<_>, _>>()?;
        due.sort_by_key(|d| (d.next_at, d.created_at));
        Ok(due)
    }

    /// One statement; a row under a claim's lease is `pending`, so it is not touched.
    async fn wake_deliveries(&self, job_id: Uuid) -> Result<u64, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH now AS (SELECT {now} AS ms)
                 UPDATE chatq_deliveries SET state = 'pending', next_at = (SELECT ms FROM now),
                     record = record || jsonb_build_object(
                         'next_at', (SELECT ms FROM now), 'state', 'pending')
                 WHERE job_id = $2 AND state = 'waiting'",
                now = schema::NOW
            )
        });
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL.as_str()).await?;
        let woken = client.execute(&statement, &[&self.now(), &job_id]).await?;
        if woken > 0 {
            self.committed();
        }
        Ok(woken)
    }

    async fn save_delivery(&self, d: &crate::domain::Delivery) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO chatq_deliveries (id, job_id, record, state, next_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET record = excluded.record,
                     state = excluded.state, next_at = excluded.next_at",
            )
            .await?;
        client
            .execute(
                &statement,
                &[
                    &d.id,
                    &d.job_id,
                    &Json(d),
                    &state_name(d.state),
                    &(d.next_at as i64),
                    &(d.created_at as i64),
                ],
            )
            .await?;
        self.committed();
        Ok(())
    }

    async fn deliveries(&self, job_id: Uuid) -> Result<Vec<crate::domain::Delivery>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT record FROM chatq_deliveries WHERE job_id = $1 ORDER BY created_at, id",
                &[&job_id],
            )
            .await?;
        rows.iter().map(delivery_from).collect()
    }
}

#[async_trait]
impl Conversations for PgStore {
    async fn turns(
        &self,
        guild_id: &str,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<Turn>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT job_id, user_id, prompt, reply, at FROM chatq_turns
                 WHERE guild_id = $1 AND conversation_id = $2
                 ORDER BY at DESC, seq DESC LIMIT $3",
            )
            .await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&statement, &[&guild_id, &conversation_id, &limit])
            .await?;
        let mut turns = rows
            .iter()
            .map(|row| {
                Ok(Turn {
                    job_id: row.try_get(0)?,
                    user_id: row.try_get(1)?,
                    prompt: row.try_get(2)?,
                    reply: row.try_get(3)?,
                    at: ms(row.try_get(4)?),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        turns.reverse();
        Ok(turns)
    }

    async fn forget(&self, guild_id: &str, conversation_id: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        Ok(client
            .execute(
                "DELETE FROM chatq_turns WHERE guild_id = $1 AND conversation_id = $2",
                &[&guild_id, &conversation_id],
            )
            .await?)
    }
}

/// Adds the turn of `job` (completed, of a conversation) to its conversation and cuts the
/// conversation to its newest [`MAX_TURNS`], in the caller's transaction.
async fn insert_turn(tx: &deadpool_postgres::Transaction<'_>, job: &Job) -> Result<(), StoreError> {
    let (Some(conversation), Some(result), JobState::Completed) =
        (&job.conversation_id, &job.result, job.state)
    else {
        return Ok(());
    };
    let guild = job.guild_id.as_deref().unwrap_or(GLOBAL_GUILD);
    let insert = tx
        .prepare_cached(
            "INSERT INTO chatq_turns (guild_id, conversation_id, at, job_id, user_id, prompt, reply)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (job_id) DO NOTHING",
        )
        .await?;
    let at = job.finished_at.unwrap_or_default() as i64;
    tx.execute(
        &insert,
        &[
            &guild,
            conversation,
            &at,
            &job.id,
            &job.user_id,
            &job.request.prompt,
            &result.reply,
        ],
    )
    .await?;
    let cut = tx
        .prepare_cached(
            "DELETE FROM chatq_turns WHERE guild_id = $1 AND conversation_id = $2
               AND (at, seq) < (SELECT at, seq FROM chatq_turns
                   WHERE guild_id = $1 AND conversation_id = $2
                   ORDER BY at DESC, seq DESC OFFSET $3::bigint - 1 LIMIT 1)",
        )
        .await?;
    tx.execute(&cut, &[&guild, conversation, &(MAX_TURNS as i64)])
        .await?;
    Ok(())
}

#[async_trait]
impl Maintenance for PgStore {
    async fn prune(&self) -> Result<u64, StoreError> {
        // The app calls this every 100 ms; both steps are queries: run each at its own pace.
        if self.rescue_every.due(self.clock.as_ref()) {
            self.rescue().await?;
        }
        if !self.retention_every.due(self.clock.as_ref()) {
            return Ok(0);
        }
        self.retention().await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // Every acknowledged write was a commit; nothing is buffered here.
        Ok(())
    }

    fn backup(
        &self,
        _out: &mut dyn std::io::Write,
    ) -> Result<Option<crate::store::BackupSummary>, StoreError> {
        // The database is backed up by PostgreSQL's own tools (`pg_dump`), which know how to
        // take a consistent snapshot of a live database.
        Ok(None)
    }
}

#[async_trait]
impl RateLimits for PgStore {
    /// GCRA in one statement, so every replica counts against the same row. Its commit does
    /// not wait for the WAL to reach the disk: limit state is soft, and a crash of the
    /// database server forgetting the last moments of counting lets a few requests through,
    /// while waiting would cost every request a flush of its own. With
    /// T = window / limit and tau = window, a request at `now` is allowed when
    /// max(tat, now) + T - tau <= now, and then moves tat to max(tat, now) + T (the arithmetic of
    /// governor, the in-process limiter). A refused request changes nothing.
    async fn take(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<Option<RateTake>, StoreError> {
        let limit = limit.max(1);
        let tau = (window.as_millis() as i64).max(1);
        let t = (tau / i64::from(limit)).max(1);
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH cur AS (SELECT {now} AS now),
             up AS (INSERT INTO chatq_rate AS r (key, tat)
                    SELECT $2, cur.now + $3 FROM cur
                    ON CONFLICT (key) DO UPDATE
                      SET tat = greatest(r.tat, (SELECT now FROM cur)) + $3
                      WHERE greatest(r.tat, (SELECT now FROM cur)) + $3 - $4
                            <= (SELECT now FROM cur)
                    RETURNING r.tat)
             SELECT (SELECT tat FROM up), (SELECT now FROM cur),
                    (SELECT tat FROM chatq_rate WHERE key = $2)",
                now = schema::NOW
            )
        });
        let client = self.rate_pool.get().await?;
        let statement = client.prepare_cached(SQL.as_str()).await?;
        let row = client
            .query_one(&statement, &[&self.now(), &key, &t, &tau])
            .await?;
        let new_tat: Option<i64> = row.try_get(0)?;
        let now: i64 = row.try_get(1)?;
        // The statement's snapshot predates its own update: this is the tat before it.
        let old_tat: Option<i64> = row.try_get(2)?;
        let take = match new_tat {
            Some(tat) => {
                let remaining = ((now - (tat - tau)) / t).clamp(0, i64::from(limit));
                RateTake {
                    allowed: true,
                    remaining: remaining as u32,
                    reset_ms: (tat - now).max(0) as u64,
                    retry_after_ms: 0,
                }
            }
            None => {
                let tat = old_tat.unwrap_or(now).max(now);
                RateTake {
                    allowed: false,
                    remaining: 0,
                    reset_ms: (tat - now).max(0) as u64,
                    retry_after_ms: (tat + t - tau - now).max(1) as u64,
                }
            }
        };
        Ok(Some(take))
    }
}

#[async_trait]
impl ReplyCache for PgStore {
    async fn cache_get(
        &self,
        key: &CacheKey,
        max_age_ms: u64,
    ) -> Result<Option<CachedReply>, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT reply, model FROM chatq_cache, (SELECT {now} AS ms) now
             WHERE key = $2 AND expires_at > now.ms AND stored_at + $3 > now.ms",
                now = schema::NOW
            )
        });
        let max_age = i64::try_from(max_age_ms).unwrap_or(i64::MAX / 2);
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL.as_str()).await?;
        let row = client
            .query_opt(
                &statement,
                &[&self.now(), &key.as_bytes().as_slice(), &max_age],
            )
            .await?;
        row.map(|row| {
            Ok(CachedReply {
                reply: row.try_get(0)?,
                model: row.try_get(1)?,
            })
        })
        .transpose()
    }

    /// One statement: the upsert, and the removal of entries whose `seq` is not among the
    /// newest `cache_max_entries` handed out. That keeps the bound with an index range
    /// (usually one row) instead of a count per put; entries removed early (expired, cleared,
    /// replaced) leave gaps in that window, so the table can hold fewer than the bound, never
    /// more.
    async fn cache_put(
        &self,
        key: &CacheKey,
        guild_id: &str,
        reply: &CachedReply,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH now AS (SELECT {now} AS ms),
             up AS (INSERT INTO chatq_cache (key, guild_id, reply, model, stored_at,
                        expires_at, seq)
                    SELECT $2, $3, $4, $5, now.ms, now.ms + $6, nextval('chatq_cache_seq')
                    FROM now
                    ON CONFLICT (key) DO UPDATE SET guild_id = excluded.guild_id,
                        reply = excluded.reply, model = excluded.model,
                        stored_at = excluded.stored_at, expires_at = excluded.expires_at,
                        seq = excluded.seq
                    RETURNING seq)
             DELETE FROM chatq_cache WHERE seq <= (SELECT seq FROM up) - $7",
                now = schema::NOW
            )
        });
        let ttl = i64::try_from(ttl_ms).unwrap_or(i64::MAX / 2);
        let max = i64::try_from(self.options.cache_max_entries).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL.as_str()).await?;
        client
            .execute(
                &statement,
                &[
                    &self.now(),
                    &key.as_bytes().as_slice(),
                    &guild_id,
                    &reply.reply,
                    &reply.model,
                    &ttl,
                    &max,
                ],
            )
            .await?;
        Ok(())
    }

    async fn cache_clear(&self, guild_id: Option<&str>) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let removed = match guild_id {
            None => client.execute("DELETE FROM chatq_cache", &[]).await?,
            Some(guild) => {
                client
                    .execute("DELETE FROM chatq_cache WHERE guild_id = $1", &[&guild])
                    .await?
            }
        };
        Ok(removed)
    }

    async fn cache_len(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM chatq_cache", &[])
            .await?
            .get(0);
        Ok(n.max(0) as u64)
    }
}

#[async_trait]
impl StoreHealth for PgStore {
    async fn accepting(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.execute("SELECT 1", &[]).await?;
        Ok(())
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        Ok(StoreStatus {
            backend: "postgres",
            durability: self.options.durability,
            log_failures: 0,
            commits: self.commits.load(Ordering::Relaxed),
            disk: None,
        })
    }
}
