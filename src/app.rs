//! Wiring: opens the store, builds the chat bot, limiter and metrics, starts the workers and
//! background upkeep, and serves the router until the shutdown token fires.
//!
//! Shutdown phases, in order (all driven by one `CancellationToken`):
//! 1. The token fires (SIGINT/SIGTERM in `main`, or a test). The HTTP server stops accepting
//!    connections and finishes the requests in flight; long-polls return at once. At the
//!    same moment the workers stop claiming.
//! 2. Jobs in flight get up to the shutdown timeout to finish; any still running then are
//!    aborted and stay `active` on disk, to be recovered at the next start.
//! 3. Background upkeep (retention, limiter pruning) stops.
//! 4. A final flush; the store closes when the last handle drops.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bot::{ChatBot, Personalities, Upstream};
use crate::clock::{self, SharedClock};
use crate::config::Config;
use crate::http::{self, AppState, Inner};
use crate::limiter::UserLimiter;
use crate::metrics::Metrics;
use crate::store::{JobQueue, ResilientQueue};
use crate::validate::Validator;
use crate::worker::{Worker, WorkerPool};

/// How often retention runs. Often, so little is ever waiting to be pruned: what piles up
/// between passes is what sled has to hold and later reclaim. Measured with the store alone
/// at ~6,000 jobs/s: a pass every second kept 40–70 MiB on disk, every 100 ms 14–21 MiB. An
/// idle pass costs microseconds.
const PRUNE_EVERY: Duration = Duration::from_millis(100);
/// How often idle rate-limit keys are dropped.
const LIMITER_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A started chatq: state, workers and background tasks.
pub struct App {
    state: AppState,
    pool: WorkerPool,
    background: JoinSet<()>,
    shutdown: CancellationToken,
}

impl App {
    /// Opens the store and starts the workers. Must run inside a tokio runtime.
    pub fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        Self::start_with_clock(config, clock::system(), shutdown)
    }

    pub fn start_with_clock(
        config: Config,
        clock: SharedClock,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let queue: Arc<dyn JobQueue> =
            Arc::new(ResilientQueue::open(config.store.clone(), clock.clone())?);
        let upstream = config
            .upstream
            .clone()
            .map(Upstream::new)
            .transpose()
            .context("building the HTTP client for the upstream")?;
        let bot = Arc::new(ChatBot::new(
            upstream,
            Personalities::builtin(),
            clock.clone(),
        ));
        let metrics = Arc::new(Metrics::new());
        let limiter = Arc::new(UserLimiter::new(config.rate_limit, config.rate_window));
        let config = Arc::new(config);
        let worker = Arc::new(Worker::new(
            Arc::clone(&queue),
            Arc::clone(&bot),
            Arc::clone(&metrics),
            clock,
            config.worker.clone(),
        ));
        let pool = WorkerPool::spawn(worker, shutdown.child_token());
        let state = AppState(Arc::new(Inner {
            queue,
            validator: Validator::new(),
            limiter,
            metrics,
            bot,
            config,
            workers_running: AtomicBool::new(true),
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
        }));
        let mut background = JoinSet::new();
        background.spawn(prune_store(state.clone(), shutdown.clone()));
        background.spawn(prune_limiter(state.clone(), shutdown.clone()));
        Ok(Self {
            state,
            pool,
            background,
            shutdown,
        })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// Phases 2 to 4 of shutdown (see the module docs). Fires the token if nobody did.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let aborted = self.pool.shutdown(self.state.config.shutdown_timeout).await;
        self.state.set_workers_running(false);
        if aborted > 0 {
            tracing::warn!(
                aborted,
                "jobs still running at the shutdown deadline were left active; they will run again at the next start"
            );
        }
        while self.background.join_next().await.is_some() {}
        // Streaming relays end when their job does, or at once on the cancelled token.
        self.state.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("streaming relays still running after 5 s; leaving them");
        }
        self.state.queue.sync().await.context("final flush")?;
        Ok(())
    }
}

async fn prune_store(state: AppState, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        // Thousands of sled removals after a busy spell: off the async threads.
        let queue = Arc::clone(&state.queue);
        match tokio::task::spawn_blocking(move || queue.prune()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(removed = n, "retention pruned old records"),
            Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
            Err(e) => tracing::error!(error = %e, "retention task failed"),
        }
    }
}

async fn prune_limiter(state: AppState, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LIMITER_PRUNE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        let keys = state.limiter.prune();
        tracing::debug!(keys, "rate-limit keys pruned");
    }
}

/// Serves chatq on `listener` until `shutdown` fires, then shuts down in order.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("reading the bound address")?;
    let admin_enabled = config.admin_enabled();
    let has_upstream = config.upstream.is_some();
    let model = config.model.clone();
    let data_dir = config.store.path.clone();
    let app = App::start(config, shutdown.clone())?;
    if !admin_enabled {
        tracing::warn!(
            "admin routes are disabled: listening on a non-loopback address without --admin-token"
        );
    }
    if has_upstream {
        tracing::info!(model = %model, "replies come from the OpenAI-compatible upstream");
    } else {
        tracing::info!("no OPENAI_API_KEY: replies are canned fallbacks (offline demo mode)");
    }
    tracing::info!(data_dir = %data_dir.display(), "store open");
    tracing::info!("listening on http://{addr}");
    let router = app.router();
    // Answers and stream chunks go out as soon as they are written: with Nagle's algorithm
    // on, a small write that follows another still unacknowledged waits for the client's
    // delayed ACK (40 ms on Linux), which stalled a few percent of streamed replies.
    let listener = ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
    });
    let server =
        axum::serve(listener, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let served = server.await;
    // However the server ended, everything else stops too.
    shutdown.cancel();
    let stopped = app.stop().await;
    served.context("the HTTP server failed")?;
    stopped?;
    tracing::info!("shut down cleanly");
    Ok(())
}
