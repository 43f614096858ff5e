//! The worker pool: claim a job, ask the chat bot, complete or fail it, repeat.
//!
//! [`Worker::process_next`] is one step (claim, run, record) that tests can drive directly.
//! [`WorkerPool`] runs N loops of it. An idle worker waits on the queue's notification or on
//! a timer for the earliest delayed job, never on a polling sleep.
//!
//! Leases: a claim comes with a lease; while the bot works, the worker renews it every third
//! of `lease` ([`crate::store::JobStore::heartbeat`]). A lease found lost (the job was
//! recovered elsewhere) stops the attempt at once and records nothing: the store would refuse
//! the outcome anyway, and the upstream call is not worth finishing.
//!
//! Retries: only transient errors (upstream 408/429/5xx, connect errors, timeouts) are
//! retried, after an exponential backoff from `backoff_base` (2 s, 4 s, ...); an upstream
//! `Retry-After` longer than that wins; both are capped at `backoff_cap` (60 s). The store
//! enforces `max_attempts`. The decision is [`decide`], a pure function.
//!
//! The response cache (`crate::cache`): before a job goes upstream, the worker looks for its
//! reply in the cache, and joins the flight of its key: an identical job already running in
//! this process leads, this one waits (holding its lease) and finishes from what the leader
//! landed. A leader whose reply is worth keeping stores it before anyone is told.
//!
//! When the upstream gives up for good, [`FailurePolicy`] decides: `Fail` (the default, as the
//! replaced system did) ends the job `failed` with `openai_error`; `Fallback` completes it with
//! the personality's canned reply, marked `used_fallback: true`.
//!
//! Shutdown: the pool's cancellation token stops the loops from claiming; a job already
//! claimed runs to its end. [`WorkerPool::shutdown`] waits for that up to a deadline and then
//! aborts what is left; those jobs stay `active` on disk and are recovered at the next start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::bot::{BotError, ChatBot, UpstreamError};
use crate::cache::{self, Flight, ResponseCache, Terms, Verdict};
use crate::clock::{Millis, SharedClock};
use crate::domain::{Job, JobResult};
use crate::metrics::Metrics;
use crate::signals::Signals;
use crate::store::{Claimed, FailOutcome, Lease, Store, StoreError};

/// What to do when the upstream keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// End the job `failed` with `openai_error`.
    #[default]
    Fail,
    /// Complete the job with the canned fallback reply.
    Fallback,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub workers: usize,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub on_upstream_failure: FailurePolicy,
    /// How long a claim holds without renewal; renewed every third of it.
    pub lease: Duration,
    /// Look for work at least this often even without a wake-up: a shared store gets new work
    /// from other replicas, which this process's signals do not hear of.
    pub poll: Option<Duration>,
}

/// How long a claim holds without a heartbeat.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(crate::defaults::LEASE_SECS);

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            workers: crate::defaults::WORKERS as usize,
            backoff_base: Duration::from_millis(crate::defaults::BACKOFF_MS),
            backoff_cap: Duration::from_secs(crate::defaults::BACKOFF_CAP_SECS),
            on_upstream_failure: FailurePolicy::Fail,
            lease: DEFAULT_LEASE,
            poll: None,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone)]
pub enum Processed {
    /// Nothing was due (or the queue is paused).
    Empty,
    Completed(Job),
    /// The attempt failed and the job runs again at `at`.
    Retried {
        job: Job,
        at: Millis,
    },
    Failed(Job),
    /// The claim was lost while the job ran (it was recovered, maybe claimed again):
    /// nothing was recorded.
    LeaseLost(Uuid),
}

/// The delay before the next attempt, after `attempts_made` attempts.
pub fn backoff_delay(
    base: Duration,
    cap: Duration,
    attempts_made: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = attempts_made.saturating_sub(1).min(20);
    let exponential = base.saturating_mul(1 << exponent);
    exponential.max(retry_after.unwrap_or_default()).min(cap)
}

/// What a failed attempt becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run again after this delay.
    Retry(Duration),
    /// Complete with the personality's fallback reply.
    Fallback,
    /// Fail for good.
    Fail,
}

/// Decides what a failed attempt becomes: transient errors with attempts left are retried
/// after the backoff; an upstream that gave up for good falls back if the policy says so.
pub fn decide(
    error: &BotError,
    attempts_made: u32,
    max_attempts: u32,
    config: &WorkerConfig,
) -> Decision {
    if error.is_transient() && attempts_made < max_attempts {
        return Decision::Retry(backoff_delay(
            config.backoff_base,
            config.backoff_cap,
            attempts_made,
            error.retry_after(),
        ));
    }
    if config.on_upstream_failure == FailurePolicy::Fallback
        && matches!(error, BotError::Upstream(_))
    {
        return Decision::Fallback;
    }
    Decision::Fail
}

/// One worker's logic, shared by every loop of the pool.
pub struct Worker {
    store: Arc<dyn Store>,
    signals: Arc<Signals>,
    bot: Arc<ChatBot>,
    cache: Arc<ResponseCache>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    config: WorkerConfig,
}

fn upstream_status_label(result: &Result<JobResult, BotError>) -> Option<String> {
    match result {
        Ok(r) if r.used_fallback => None,
        Ok(_) => Some("200".to_owned()),
        Err(BotError::MissingPrompt) => None,
        Err(BotError::Upstream(e) | BotError::MidStream(e)) => Some(match e {
            UpstreamError::Status { status, .. } => status.to_string(),
            UpstreamError::Timeout(_) => "timeout".to_owned(),
            UpstreamError::Connect(_) => "connect_error".to_owned(),
            UpstreamError::InvalidResponse(_) => "invalid_response".to_owned(),
        }),
    }
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        signals: Arc<Signals>,
        bot: Arc<ChatBot>,
        cache: Arc<ResponseCache>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        config: WorkerConfig,
    ) -> Self {
        Self {
            store,
            signals,
            bot,
            cache,
            metrics,
            clock,
            config,
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Claims one due job, runs it and records the outcome.
    pub async fn process_next(&self) -> Result<Processed, StoreError> {
        let Some(claimed) = self.store.claim().await? else {
            return Ok(Processed::Empty);
        };
        self.process(claimed).await
    }

    /// Runs a job already claimed and records the outcome.
    pub async fn process(&self, claimed: Claimed) -> Result<Processed, StoreError> {
        let Claimed { job, lease } = claimed;
        let span = tracing::info_span!(
            "job",
            job_id = %job.id,
            user_id = %job.user_id,
            attempt = job.attempts + 1,
            request_id = job.request_id.as_deref().unwrap_or("-"),
        );
        let id = job.id;
        match self.run(job, lease).instrument(span).await {
            Err(StoreError::LeaseLost(_)) => Ok(self.lost(id)),
            other => other,
        }
    }

    fn lost(&self, id: Uuid) -> Processed {
        tracing::warn!(job_id = %id, "the job's lease was lost; its outcome is not recorded here");
        Processed::LeaseLost(id)
    }

    /// Renews `lease` every third of the lease time; returns when it is lost.
    async fn hold(&self, lease: Lease) {
        let every = (self.config.lease / 3).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            match self.store.heartbeat(&[lease]).await {
                Ok(held) if held.contains(&lease) => {}
                Ok(_) => return,
                // The store is unreachable for a moment: keep the attempt going; if the lease
                // runs out meanwhile, the next heartbeat or the outcome says so.
                Err(e) => tracing::warn!(error = %e, "renewing the job's lease failed"),
            }
        }
    }

    async fn run(&self, job: Job, lease: Lease) -> Result<Processed, StoreError> {
        let now = self.clock.now_ms();
        let due = job.run_at.max(job.created_at);
        self.metrics
            .queue_wait
            .observe(now.saturating_sub(due) as f64 / 1_000.0);
        let terms = if self.cache_may_apply(job.guild_id.is_some()) {
            self.cache
                .terms_for(job.guild_id.as_deref(), &job.request)
                .await
        } else {
            None
        };
        let mut leader = None;
        if let Some(terms) = &terms {
            match self.consult(terms, lease).await {
                Consulted::Hit(result) => return self.complete_cached(&lease, result).await,
                Consulted::Lead(lead) => leader = Some(lead),
                Consulted::Lost => return Ok(self.lost(job.id)),
            }
        }
        let started = Instant::now();
        let sink = self.signals.streams.sink(job.id);
        let outcome = tokio::select! {
            outcome = self.bot.ask(&job, sink.as_ref()) => outcome,
            () = self.hold(lease) => return Ok(self.lost(job.id)),
        };
        let elapsed = started.elapsed();
        self.metrics.job_duration.observe(elapsed.as_secs_f64());
        if let Some(status) = upstream_status_label(&outcome) {
            // The upstream's own latency when it answered; the attempt's when it failed.
            let latency = match &outcome {
                Ok(r) => r.upstream_latency_ms.map_or(elapsed, Duration::from_millis),
                Err(_) => elapsed,
            };
            self.metrics
                .upstream_request(&status, latency.as_secs_f64());
        }
        if let (Some(terms), Some(leader), Ok(result)) = (&terms, leader, &outcome) {
            // Stored before the job completes, so whoever hears of the completion finds it.
            leader.land(self.cache.keep(terms, result).await);
        }
        let error = match outcome {
            Ok(result) => return self.complete(&lease, result).await,
            Err(error) => error,
        };
        match decide(&error, job.attempts + 1, job.max_attempts, &self.config) {
            Decision::Retry(delay) => {
                let (job, outcome) = self
                    .store
                    .fail(&lease, error.to_job_error(), Some(delay.as_millis() as u64))
                    .await?;
                if let FailOutcome::Retrying { at } = outcome {
                    self.metrics.jobs_retried.inc();
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "attempt failed; will retry");
                    return Ok(Processed::Retried { job, at });
                }
                Ok(self.failed(job))
            }
            Decision::Fallback => {
                tracing::warn!(error = %error, "upstream gave up; answering with the fallback reply");
                let result = self.bot.fallback_result(&job);
                self.complete(&lease, result).await
            }
            Decision::Fail => {
                tracing::warn!(error = %error, "job failed");
                let (job, _) = self.store.fail(&lease, error.to_job_error(), None).await?;
                Ok(self.failed(job))
            }
        }
    }

    /// Whether the cache can have a say in a job: on for the server, or the job is in a guild
    /// (which may turn it on for itself). Spares a job outside any guild the lookup otherwise.
    fn cache_may_apply(&self, in_guild: bool) -> bool {
        in_guild || !self.cache.server_ttl().is_zero()
    }

    /// Looks for the job's reply in the cache, then in this process's flights: a hit, the
    /// lead of the key's flight, or the lease lost while following another's.
    async fn consult(&self, terms: &Terms, lease: Lease) -> Consulted<'_> {
        loop {
            if let Some(result) = self.cache.lookup(terms).await {
                self.cache.count(Verdict::Hit);
                return Consulted::Hit(result);
            }
            match self.cache.join(terms.key) {
                Flight::Lead(leader) => {
                    self.cache.count(Verdict::Miss);
                    return Consulted::Lead(leader);
                }
                Flight::Follow(rx) => {
                    let landed = tokio::select! {
                        landed = cache::follow(rx) => landed,
                        () = self.hold(lease) => return Consulted::Lost,
                    };
                    if let Some(reply) = landed {
                        self.cache.count(Verdict::Hit);
                        return Consulted::Hit(self.cache.result_from(reply));
                    }
                    // The call it followed left nothing to share: look again, maybe lead.
                }
            }
        }
    }

    async fn complete_cached(
        &self,
        lease: &Lease,
        result: JobResult,
    ) -> Result<Processed, StoreError> {
        let done = self.store.complete(lease, result).await?;
        self.metrics.job_completed(false);
        tracing::info!("job completed from the response cache");
        Ok(Processed::Completed(done))
    }

    async fn complete(&self, lease: &Lease, result: JobResult) -> Result<Processed, StoreError> {
        let used_fallback = result.used_fallback;
        let done = self.store.complete(lease, result).await?;
        self.metrics.job_completed(used_fallback);
        tracing::info!(used_fallback, "job completed");
        Ok(Processed::Completed(done))
    }

    fn failed(&self, job: Job) -> Processed {
        let code = job.error.as_ref().map_or("unknown", |e| e.code.as_str());
        self.metrics.job_failed(code);
        Processed::Failed(job)
    }

    /// How long an idle worker may sleep before a delayed job is due.
    async fn idle_wait(&self) -> Option<Duration> {
        match self.store.next_due().await {
            Ok(Some(due)) => Some(Duration::from_millis(
                due.saturating_sub(self.clock.now_ms()),
            )),
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "reading the delayed queue failed");
                Some(Duration::from_secs(1))
            }
        }
    }
}

/// What [`Worker::consult`] found.
enum Consulted<'a> {
    Hit(JobResult),
    Lead(cache::Leader<'a>),
    Lost,
}

/// Jobs claimed elsewhere in this process for the pool to run (a streamed reply's: it runs
/// where its client listens). Cheap to clone.
#[derive(Clone)]
pub struct Handoff(mpsc::UnboundedSender<Claimed>);

/// The pool has stopped (shutdown): a job handed now stays claimed in the store and is
/// recovered like any interrupted job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the worker pool has stopped")]
pub struct PoolStopped;

impl Handoff {
    /// Gives `claimed` to the next free worker loop.
    pub fn run(&self, claimed: Claimed) -> Result<(), PoolStopped> {
        self.0.send(claimed).map_err(|_| PoolStopped)
    }
}

/// The receiving end, shared by the loops: an idle loop waits on it holding the lock, so a
/// handed job goes to exactly one loop. A tokio `Mutex`: held across that wait.
type HandedJobs = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Claimed>>>;

/// N worker loops and the token that stops them.
pub struct WorkerPool {
    tasks: JoinSet<()>,
    stop: CancellationToken,
    handoff: Handoff,
}

impl WorkerPool {
    /// Starts `worker.config().workers` loops; they stop claiming when `stop` is cancelled.
    pub fn spawn(worker: Arc<Worker>, stop: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let handed: HandedJobs = Arc::new(tokio::sync::Mutex::new(rx));
        let mut tasks = JoinSet::new();
        for n in 0..worker.config.workers.max(1) {
            let (worker, handed) = (Arc::clone(&worker), Arc::clone(&handed));
            let stop = stop.clone();
            tasks.spawn(async move { run_loop(n, &worker, &handed, &stop).await });
        }
        Self {
            tasks,
            stop,
            handoff: Handoff(tx),
        }
    }

    /// Where to hand jobs this process claimed for the pool to run.
    pub fn handoff(&self) -> Handoff {
        self.handoff.clone()
    }

    /// Stops claiming, waits up to `deadline` for jobs in flight, then aborts the rest.
    /// Returns how many loops had to be aborted (their jobs are recovered at the next start).
    pub async fn shutdown(mut self, deadline: Duration) -> usize {
        self.stop.cancel();
        let drained = tokio::time::timeout(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_ok() {
            return 0;
        }
        let left = self.tasks.len();
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        left
    }
}

/// The next handed job; never ends while the pool (which holds a sender) exists.
async fn next_handed(handed: &HandedJobs) -> Claimed {
    match handed.lock().await.recv().await {
        Some(claimed) => claimed,
        None => std::future::pending().await,
    }
}

async fn run_loop(n: usize, worker: &Worker, handed: &HandedJobs, stop: &CancellationToken) {
    tracing::debug!(worker = n, "worker started");
    while !stop.is_cancelled() {
        // Register for the wake-up before looking for work, so a push that lands between an
        // empty claim and the wait is not missed.
        let notified = worker.signals.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // A handed job first: it is claimed already, and its client is watching.
        let waiting = handed.try_lock().ok().and_then(|mut rx| rx.try_recv().ok());
        let step = match waiting {
            Some(claimed) => worker.process(claimed).await,
            None => worker.process_next().await,
        };
        match step {
            Ok(Processed::Empty) => {
                let timer = async {
                    let due = worker.idle_wait().await;
                    match due.into_iter().chain(worker.config.poll).min() {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = &mut notified => {}
                    _ = timer => {}
                    claimed = next_handed(handed) => {
                        if let Err(e) = worker.process(claimed).await {
                            tracing::error!(worker = n, error = %e, "running a handed job failed");
                        }
                    }
                    _ = stop.cancelled() => break,
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(worker = n, error = %e, "worker step failed; pausing for a second");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    tracing::debug!(worker = n, "worker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_retry_while_attempts_last_then_fail_or_fall_back() {
        let transient = BotError::Upstream(UpstreamError::Status {
            status: 503,
            body: String::new(),
            retry_after: Some(Duration::from_secs(5)),
        });
        let permanent = BotError::Upstream(UpstreamError::Status {
            status: 400,
            body: String::new(),
            retry_after: None,
        });
        let config = WorkerConfig::default();
        assert_eq!(
            decide(&transient, 1, 3, &config),
            Decision::Retry(Duration::from_secs(5))
        );
        assert_eq!(
            decide(&transient, 2, 3, &config),
            Decision::Retry(Duration::from_secs(5))
        );
        assert_eq!(decide(&transient, 3, 3, &config), Decision::Fail);
        assert_eq!(decide(&permanent, 1, 3, &config), Decision::Fail);
        assert_eq!(
            decide(&BotError::MissingPrompt, 1, 3, &config),
            Decision::Fail
        );
        let fallback = WorkerConfig {
            on_upstream_failure: FailurePolicy::Fallback,
            ..config
        };
        assert_eq!(decide(&transient, 3, 3, &fallback), Decision::Fallback);
        assert_eq!(decide(&permanent, 1, 3, &fallback), Decision::Fallback);
        assert_eq!(
            decide(&BotError::MissingPrompt, 1, 3, &fallback),
            Decision::Fail,
            "a bad job is not the upstream's fault"
        );
        assert_eq!(
            decide(
                &BotError::MidStream(UpstreamError::Timeout(Duration::ZERO)),
                1,
                3,
                &fallback
            ),
            Decision::Fail,
            "the client already saw part of a reply"
        );
    }

    #[test]
    fn backoff_doubles_from_the_base_and_retry_after_wins_up_to_the_cap() {
        let base = Duration::from_secs(2);
        let cap = Duration::from_secs(60);
        assert_eq!(backoff_delay(base, cap, 1, None), Duration::from_secs(2));
        assert_eq!(backoff_delay(base, cap, 2, None), Duration::from_secs(4));
        assert_eq!(backoff_delay(base, cap, 3, None), Duration::from_secs(8));
        assert_eq!(
            backoff_delay(base, cap, 1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            backoff_delay(base, cap, 2, Some(Duration::from_secs(1))),
            Duration::from_secs(4),
            "a shorter Retry-After does not shorten the backoff"
        );
        assert_eq!(
            backoff_delay(base, cap, 1, Some(Duration::from_secs(600))),
            cap
        );
        assert_eq!(backoff_delay(base, cap, 40, None), cap);
    }
}
