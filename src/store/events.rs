//! In-process notifications about jobs: "a job finished" for long-polling waiters, and the
//! reply deltas of a job for a client that streams it.
//!
//! A waiter subscribes to one job id *before* reading the job (so a completion between the
//! read and the wait is not missed), and its [`Subscription`] removes itself when dropped, so
//! a request that gives up leaves nothing behind. The map is guarded by a std `Mutex`: it is
//! held only to insert or remove an entry, never across an await.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::store::job::Job;

type Waiters = HashMap<Uuid, Vec<(u64, oneshot::Sender<Job>)>>;

#[derive(Default)]
pub struct JobEvents {
    next_token: AtomicU64,
    waiters: Mutex<Waiters>,
    /// Streaming listeners, by job id.
    pub streams: DeltaStreams,
}

impl JobEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers interest in `id` finishing.
    pub fn subscribe(&self, id: Uuid) -> Subscription<'_> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().entry(id).or_default().push((token, tx));
        Subscription {
            events: self,
            id,
            token,
            rx: Some(rx),
        }
    }

    /// Wakes every waiter of `job.id` with the finished job.
    pub fn finished(&self, job: &Job) {
        let waiters = self.lock().remove(&job.id);
        for (_, tx) in waiters.into_iter().flatten() {
            let _ = tx.send(job.clone());
        }
    }

    /// Number of jobs with at least one waiter (for tests and metrics).
    pub fn watched(&self) -> usize {
        self.lock().len()
    }
}

pub struct Subscription<'a> {
    events: &'a JobEvents,
    id: Uuid,
    token: u64,
    rx: Option<oneshot::Receiver<Job>>,
}

impl Subscription<'_> {
    /// Waits for the job to finish; `None` if the event source went away.
    pub async fn finished(&mut self) -> Option<Job> {
        let rx = self.rx.as_mut()?;
        let job = rx.await.ok();
        self.rx = None;
        job
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut map = self.events.lock();
        if let Some(list) = map.get_mut(&self.id) {
            list.retain(|(token, _)| *token != self.token);
            if list.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

/// Reply text as it streams from the worker to a waiting client.
pub type DeltaSender = tokio::sync::mpsc::UnboundedSender<String>;
pub type DeltaReceiver = tokio::sync::mpsc::UnboundedReceiver<String>;

/// Where a worker finds the client waiting for a job's deltas.
///
/// A streaming request registers its channel under the job id *before* the job is pushed, so
/// the worker cannot start before the client listens. The registration removes itself when
/// dropped (the client went away); a worker whose sends fail just keeps going, and the job
/// still completes and is logged.
#[derive(Default)]
pub struct DeltaStreams {
    sinks: Mutex<HashMap<Uuid, DeltaSender>>,
}

impl DeltaStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, DeltaSender>> {
        self.sinks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a listener for `id`'s deltas.
    pub fn listen(&self, id: Uuid) -> StreamRegistration<'_> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.lock().insert(id, tx);
        StreamRegistration {
            streams: self,
            id,
            rx,
        }
    }

    /// The sender for `id`, if a client is listening.
    pub fn sink(&self, id: Uuid) -> Option<DeltaSender> {
        self.lock().get(&id).cloned()
    }

    pub fn listening(&self) -> usize {
        self.lock().len()
    }
}

pub struct StreamRegistration<'a> {
    streams: &'a DeltaStreams,
    id: Uuid,
    pub rx: DeltaReceiver,
}

impl Drop for StreamRegistration<'_> {
    fn drop(&mut self) {
        self.streams.lock().remove(&self.id);
    }
}
