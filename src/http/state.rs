//! The state every handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::bot::ChatBot;
use crate::cache::ResponseCache;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::limiter::{GuildLimiters, UserLimiter};
use crate::metrics::Metrics;
use crate::signals::Signals;
use crate::store::Store;
use crate::validate::Validator;
use crate::worker::Handoff;

/// What the handlers share, behind [`AppState`].
pub struct Shared {
    pub store: Arc<dyn Store>,
    /// Long-poll and stream registrations; the store reports finishes into them.
    pub signals: Arc<Signals>,
    /// This process's workers, for jobs that must run here (streamed replies).
    pub handoff: Handoff,
    pub validator: Validator,
    pub limiter: Arc<UserLimiter>,
    /// The limits guilds set for themselves, when the store keeps none.
    pub guild_limiters: GuildLimiters,
    /// The time as the store sees it (quotas reset at its UTC midnight).
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    pub bot: Arc<ChatBot>,
    pub cache: Arc<ResponseCache>,
    pub config: Arc<Config>,
    /// Set while the workers run; `/readyz` reports it.
    pub workers_running: AtomicBool,
    /// Fired at shutdown; long-polls and streams return early.
    pub shutdown: CancellationToken,
}

/// Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn set_workers_running(&self, running: bool) {
        self.workers_running.store(running, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.workers_running.load(Ordering::Acquire) && !self.shutdown.is_cancelled()
    }
}
