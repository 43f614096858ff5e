//! Wiring: opens the store, builds the signals, chat bot, limiter and metrics, starts the
//! workers and background upkeep, and serves the router until the shutdown token fires.
//!
//! Shutdown phases, in order (all driven by one `CancellationToken`):
//! 1. The token fires (SIGINT/SIGTERM in `main`, or a test). The HTTP server stops accepting
//!    connections and finishes the requests in flight; long-polls and streamed replies end at
//!    once. At the same moment the workers stop claiming.
//! 2. Jobs in flight get up to the shutdown timeout to finish; any still running then are
//!    aborted and stay `active` on disk, to be recovered at the next start.
//! 3. Background upkeep (retention, limiter pruning) stops; so does the deliverer, which
//!    kept sending the replies of jobs that finished in phase 2 (it waits up to 5 s for the
//!    attempts in flight).
//! 4. A final sync; the store closes when the last handle drops.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bot::{ChatBot, Personalities, Upstream};
use crate::cache::ResponseCache;
use crate::clock::{self, SharedClock};
use crate::config::Config;
use crate::http::{self, AppState, Shared};
use crate::limiter::{GuildLimiters, UserLimiter};
use crate::metrics::Metrics;
use crate::signals::Signals;
use crate::store;
use crate::validate::Validator;
use crate::worker::{Worker, WorkerPool};

/// How often retention runs. Often, so little is ever waiting to be pruned: what piles up
/// between passes is what the embedded store has to hold and later reclaim (measured in
/// `BENCHMARKS.md`, "retention cadence"). An idle pass costs microseconds.
const PRUNE_EVERY: Duration = Duration::from_millis(100);
/// How often idle rate-limit keys are dropped.
const LIMITER_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A started chatq: state, workers and background tasks.
pub struct App {
    state: AppState,
    pool: WorkerPool,
    background: JoinSet<()>,
    shutdown: CancellationToken,
    /// Stops the deliverer, after the workers: replies of the jobs that finish while the
    /// workers drain still go out.
    stop_delivering: CancellationToken,
}

impl App {
    /// Opens the store and starts the workers, on `clock` (tests pass a manual one).
    pub async fn start(
        config: Config,
        clock: SharedClock,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let signals = Arc::new(Signals::default());
        let store = store::open(config.store.clone(), clock.clone(), signals.clone())
            .await
            .context("opening the store")?;
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
            config.model.clone(),
        ));
        let metrics = Arc::new(Metrics::new());
        let limiter = Arc::new(UserLimiter::new(config.rate_limit, config.rate_window));
        let config = Arc::new(config);
        let cache = Arc::new(ResponseCache::new(
            Arc::clone(&store),
            Arc::clone(&bot),
            Arc::clone(&metrics),
            clock.clone(),
            config.cache_ttl,
        ));
        let worker = Arc::new(Worker::new(
            Arc::clone(&store),
            Arc::clone(&signals),
            Arc::clone(&bot),
            Arc::clone(&cache),
            Arc::clone(&metrics),
            clock.clone(),
            config.worker.clone(),
        ));
        let pool = WorkerPool::spawn(worker, shutdown.child_token());
        let state = AppState(Arc::new(Shared {
            store,
            signals,
            handoff: pool.handoff(),
            validator: Validator::new(),
            limiter,
            guild_limiters: GuildLimiters::default(),
            clock,
            metrics,
            bot,
            cache,
            config,
            workers_running: AtomicBool::new(true),
            shutdown: shutdown.clone(),
        }));
        let mut background = JoinSet::new();
        background.spawn(prune_store(state.clone(), shutdown.clone()));
        background.spawn(prune_limiter(state.clone(), shutdown.clone()));
        // Every process sends deliveries (a claim leases each to one); without Discord
        // configured, a Discord delivery waits and is given up when its token expires.
        let stop_delivering = CancellationToken::new();
        background.spawn(crate::outbox::run(state.clone(), stop_delivering.clone()));
        Ok(Self {
            state,
            pool,
            background,
            shutdown,
            stop_delivering,
        })
    }

    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// Phases 2 to 4 of shutdown (see the module docs). Fires the token if nobody did.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let aborted = self.pool.shutdown(self.state.config.shutdown_timeout).await;
        self.state.set_workers_running(false);
        self.stop_delivering.cancel();
        if aborted > 0 {
            tracing::warn!(
                aborted,
                "jobs still running at the shutdown deadline were left active; they will run again at the next start"
            );
        }
        while self.background.join_next().await.is_some() {}
        self.state.store.sync().await.context("final sync")?;
        Ok(())
    }
}

async fn prune_store(state: AppState, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        match state.store.prune().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "retention pruned old records"),
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
    }
}

async fn prune_limiter(state: AppState, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LIMITER_PRUNE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        let keys = state.limiter.prune() + state.guild_limiters.prune();
        tracing::debug!(keys, "rate-limit keys pruned");
    }
}

/// Serves chatq on `listener` until `shutdown` fires, then shuts down in order.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_clock(listener, config, clock::system(), shutdown).await
}

/// [`run`] on `clock` (tests drive backoff and due times with a manual clock).
pub async fn run_with_clock(
    listener: TcpListener,
    config: Config,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("reading the bound address")?;
    let admin_enabled = config.admin_enabled();
    let has_upstream = config.upstream.is_some();
    let model = config.model.clone();
    let store = config.store.describe();
    let app = App::start(config, clock, shutdown.clone()).await?;
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
    tracing::info!(store = %store, "store open");
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
