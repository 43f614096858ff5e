//! Group commit: one thread flushes sled for every caller waiting at that moment.
//!
//! Callers that need durability call [`Flusher::flush`]; their request joins the batch that
//! the flusher thread takes next. One flush then answers the whole batch, so N concurrent
//! writers cost one fsync, not N. Requests that arrive while a flush is running wait for the
//! next one: a flush that started before a caller's write finished might not include it.
//!
//! A flush is `db.flush()` and then `fdatasync` of sled's log file. sled 0.34's own flush
//! writes its buffers with `sync_file_range`, which waits for the data to reach the device
//! but neither asks the device to empty its write cache nor records a grown file's new
//! length, so on its own it survives a crash of chatq or of the kernel, not a power cut;
//! sled's full `fsync` comes only from its background thread, every 500 ms. The
//! `fdatasync` makes an acknowledged write survive a power cut too (on hardware that honours
//! it). Its cost on the development machine is in `BENCHMARKS.md`.
//!
//! Why a dedicated OS thread and a std `Mutex`/`Condvar` rather than a tokio task: the flush
//! is a blocking syscall; calling sled's `flush_async` from many tasks at once was seen to
//! hang on a 2-thread runtime, and `spawn_blocking` per batch adds a pool hop. The mutex is
//! held only to push or take the waiter list, never across an await or the flush.
//!
//! Lifecycle: the thread is owned by [`Flusher`]; dropping it (when its [`super::SledQueue`]
//! goes) sets `shutdown`, wakes the thread, which answers whoever is still waiting with a
//! final flush, and joins it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), FlushError>>;

/// Why a flush did not make the writes before it durable. Cloned to every caller of the
/// batch; the kind of the IO error is kept (a full disk and a failing one differ).
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlushError {
    #[error("flushing the store failed: {0}")]
    Flush(Arc<sled::Error>),
    #[error("syncing the store's log file failed: {0}")]
    Sync(Arc<std::io::Error>),
    #[error("the store is shutting down")]
    ShuttingDown,
}

#[derive(Default)]
struct State {
    waiters: Vec<Waiter>,
    shutdown: bool,
    /// The flusher thread is parked on the condvar (not flushing). Only then does a new
    /// waiter need to wake it: a busy flusher looks for waiters again after each flush, and
    /// skipping the wake-up saves a futex syscall per request under load.
    idle: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    flushes: AtomicU64,
    flushed_requests: AtomicU64,
    flush_nanos: AtomicU64,
}

pub(crate) struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Counters for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlushStats {
    /// fsyncs performed.
    pub flushes: u64,
    /// Durability requests answered by them.
    pub requests: u64,
    /// Time spent inside `flush`, in nanoseconds.
    pub flush_nanos: u64,
}

impl Flusher {
    /// Starts the flusher thread for `db`, whose log file is `log_file`.
    pub(crate) fn start(db: sled::Db, log_file: std::fs::File) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            flushes: AtomicU64::new(0),
            flushed_requests: AtomicU64::new(0),
            flush_nanos: AtomicU64::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("chatq-flusher".into())
            .spawn(move || run(&db, &log_file, &thread_shared))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Waits until everything written before this call is on disk.
    pub(crate) async fn flush(&self) -> Result<(), FlushError> {
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut state = lock(&self.shared.state);
            if state.shutdown {
                return Err(FlushError::ShuttingDown);
            }
            state.waiters.push(tx);
            std::mem::take(&mut state.idle)
        };
        if wake {
            self.shared.wake.notify_one();
        }
        rx.await.unwrap_or(Err(FlushError::ShuttingDown))
    }

    pub(crate) fn stats(&self) -> FlushStats {
        FlushStats {
            flushes: self.shared.flushes.load(Ordering::Relaxed),
            requests: self.shared.flushed_requests.load(Ordering::Relaxed),
            flush_nanos: self.shared.flush_nanos.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A poisoned lock only means another thread panicked while pushing to a Vec; the data is
/// still a valid Vec, so keep going.
fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes out what sled buffers and makes it durable.
pub(crate) fn flush(db: &sled::Db, log_file: &std::fs::File) -> Result<(), FlushError> {
    db.flush().map_err(|e| FlushError::Flush(Arc::new(e)))?;
    log_file
        .sync_data()
        .map_err(|e| FlushError::Sync(Arc::new(e)))
}

fn run(db: &sled::Db, log_file: &std::fs::File, shared: &Shared) {
    loop {
        let batch = {
            let mut state = lock(&shared.state);
            while state.waiters.is_empty() && !state.shutdown {
                state.idle = true;
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.idle = false;
            if state.waiters.is_empty() && state.shutdown {
                break;
            }
            std::mem::take(&mut state.waiters)
        };
        let started = std::time::Instant::now();
        let result = flush(db, log_file);
        if let Err(e) = &result {
            tracing::error!(error = %e, "flushing the store failed");
        }
        shared
            .flush_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        shared.flushes.fetch_add(1, Ordering::Relaxed);
        shared
            .flushed_requests
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for waiter in batch {
            // A waiter that gave up (its request was dropped) is fine to skip.
            let _ = waiter.send(result.clone());
        }
    }
    // Shutdown: whatever sled still buffers goes to disk.
    if let Err(e) = flush(db, log_file) {
        tracing::error!(error = %e, "final flush of the store failed");
    }
}
