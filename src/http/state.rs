//! The state every handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bot::ChatBot;
use crate::config::Config;
use crate::limiter::UserLimiter;
use crate::metrics::Metrics;
use crate::store::JobQueue;
use crate::validate::Validator;

pub struct Inner {
    pub queue: Arc<dyn JobQueue>,
    pub validator: Validator,
    pub limiter: Arc<UserLimiter>,
    pub metrics: Arc<Metrics>,
    pub bot: Arc<ChatBot>,
    pub config: Arc<Config>,
    /// Set while the workers run; `/readyz` reports it.
    pub workers_running: AtomicBool,
    /// Fired at shutdown; long-polls return early.
    pub shutdown: CancellationToken,
    /// Request-scoped background tasks (streaming relays); shutdown waits for them.
    pub tasks: TaskTracker,
}

/// Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
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
