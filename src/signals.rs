//! In-process signals about jobs, owned by the app, not by any store: the workers' wake-up,
//! "a job finished" for long-polling waiters, and the reply deltas of a job for the client
//! that streams it.
//!
//! A store only reports what happened through [`JobNotifier`] (the one thing it knows of
//! this module); [`Signals`] turns that into wake-ups here. A networked store bridges its
//! own notifications (another replica finished a job) into the same two calls.
//!
//! A waiter subscribes to one job id *before* reading the job (so a completion between the
//! read and the wait is not missed), and its [`Subscription`] removes itself when dropped, so
//! a request that gives up leaves nothing behind. Subscriptions and stream registrations own
//! a handle to the maps (`'static`), so a response body can carry them. The maps are guarded
//! by std `Mutex`es, held only to insert or remove an entry, never across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use crate::domain::Job;

/// What a store reports as it changes jobs; called after the change is durable.
pub trait JobNotifier: Send + Sync {
    /// A job may have become claimable (a push, a retry, a due time that moved).
    fn work_available(&self);
    /// Many jobs may have become claimable at once (the queue resumed, the store reopened).
    fn work_available_for_all(&self);
    /// A job reached a final state (completed, failed for good, cancelled).
    fn job_finished(&self, job: &Job);
    /// Whether anyone here waits for `id` to finish (so a store that hears of another
    /// process's finish knows whether reading the job back is worth it).
    fn is_watched(&self, _id: Uuid) -> bool {
        true
    }
}

/// Takes a lock whose data stays valid whatever a panicking holder did: every critical
/// section here is a single map insert, remove or take.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The app's signals. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct Signals {
    /// Idle workers wait on this.
    pub work: Notify,
    pub finished: JobEvents,
    pub streams: DeltaStreams,
}

impl JobNotifier for Signals {
    fn work_available(&self) {
        self.work.notify_one();
    }

    fn work_available_for_all(&self) {
        self.work.notify_waiters();
    }

    fn job_finished(&self, job: &Job) {
        self.finished.finished(job);
    }

    fn is_watched(&self, id: Uuid) -> bool {
        self.finished.is_watched(id)
    }
}

type Waiters = HashMap<Uuid, Vec<(u64, oneshot::Sender<Job>)>>;

#[derive(Default)]
struct EventsInner {
    next_token: AtomicU64,
    waiters: Mutex<Waiters>,
}

/// Finished-job notifications for long-polls. Clones share one map.
#[derive(Clone, Default)]
pub struct JobEvents {
    inner: Arc<EventsInner>,
}

impl JobEvents {
    /// Registers interest in `id` finishing.
    pub fn subscribe(&self, id: Uuid) -> Subscription {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.waiters)
            .entry(id)
            .or_default()
            .push((token, tx));
        Subscription {
            events: self.clone(),
            id,
            token,
            rx: Some(rx),
        }
    }

    /// Wakes every waiter of `job.id` with the finished job.
    pub fn finished(&self, job: &Job) {
        let waiters = lock(&self.inner.waiters).remove(&job.id);
        for (_, tx) in waiters.into_iter().flatten() {
            let _ = tx.send(job.clone());
        }
    }

    /// Whether anyone waits for `id`.
    pub fn is_watched(&self, id: Uuid) -> bool {
        lock(&self.inner.waiters).contains_key(&id)
    }

    /// Number of jobs with at least one waiter (for tests).
    pub fn watched(&self) -> usize {
        lock(&self.inner.waiters).len()
    }
}

/// One waiter's interest in one job; unregisters itself when dropped.
pub struct Subscription {
    events: JobEvents,
    id: Uuid,
    token: u64,
    rx: Option<oneshot::Receiver<Job>>,
}

impl Subscription {
    /// Waits for the job to finish; `None` if it was already reported, or the sender went.
    pub async fn finished(&mut self) -> Option<Job> {
        let rx = self.rx.as_mut()?;
        let job = rx.await.ok();
        self.rx = None;
        job
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = lock(&self.events.inner.waiters);
        if let Some(list) = map.get_mut(&self.id) {
            list.retain(|(token, _)| *token != self.token);
            if list.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

/// Reply text as it streams from the worker to a waiting client.
pub type DeltaSender = mpsc::UnboundedSender<String>;
pub type DeltaReceiver = mpsc::UnboundedReceiver<String>;

/// Where a worker finds the client waiting for a job's deltas. Clones share one map.
///
/// A streaming request registers its channel under the job id *before* the job is pushed, so
/// the worker cannot start before the client listens. The registration removes itself when
/// dropped (the client went away); a worker whose sends fail just keeps going, and the job
/// still completes and is logged.
#[derive(Clone, Default)]
pub struct DeltaStreams {
    sinks: Arc<Mutex<HashMap<Uuid, DeltaSender>>>,
}

impl DeltaStreams {
    /// Registers a listener for `id`'s deltas.
    pub fn listen(&self, id: Uuid) -> StreamRegistration {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.sinks).insert(id, tx);
        StreamRegistration {
            streams: self.clone(),
            id,
            rx,
        }
    }

    /// The sender for `id`, if a client is listening.
    pub fn sink(&self, id: Uuid) -> Option<DeltaSender> {
        lock(&self.sinks).get(&id).cloned()
    }
}

/// A client's registration for one job's deltas; unregisters itself when dropped.
pub struct StreamRegistration {
    streams: DeltaStreams,
    id: Uuid,
    pub rx: DeltaReceiver,
}

impl Drop for StreamRegistration {
    fn drop(&mut self) {
        lock(&self.streams.sinks).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::NewJob;

    fn job(id: Uuid) -> Job {
        let new = NewJob::prompt("u", "p");
        Job {
            id,
            user_id: new.user_id,
            guild_id: None,
            conversation_id: None,
            request: new.request,
            priority: 0,
            attempts: 1,
            max_attempts: 3,
            state: crate::domain::JobState::Completed,
            created_at: 0,
            started_at: None,
            finished_at: Some(1),
            run_at: 0,
            result: None,
            error: None,
            idempotency_key: None,
            request_id: None,
        }
    }

    #[tokio::test]
    async fn a_subscription_wakes_on_finish_and_cleans_up_when_dropped() {
        let signals = Signals::default();
        let id = Uuid::new_v4();
        let mut sub = signals.finished.subscribe(id);
        let dropped = signals.finished.subscribe(id);
        drop(dropped);
        assert_eq!(signals.finished.watched(), 1);
        signals.job_finished(&job(id));
        assert_eq!(sub.finished().await.map(|j| j.id), Some(id));
        assert_eq!(signals.finished.watched(), 0);
        let gone = signals.finished.subscribe(Uuid::new_v4());
        drop(gone);
        assert_eq!(
            signals.finished.watched(),
            0,
            "a dropped waiter leaves nothing"
        );
    }

    #[tokio::test]
    async fn a_stream_registration_is_found_until_dropped() {
        let streams = DeltaStreams::default();
        let id = Uuid::new_v4();
        let mut registration = streams.listen(id);
        streams.sink(id).unwrap().send("hi".into()).unwrap();
        assert_eq!(registration.rx.recv().await.as_deref(), Some("hi"));
        drop(registration);
        assert!(streams.sink(id).is_none());
    }
}
