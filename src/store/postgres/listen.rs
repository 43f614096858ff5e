//! Cross-replica wake-ups over LISTEN/NOTIFY: what another replica finished or pushed reaches
//! this replica's long-polls and idle workers within milliseconds, not at the next poll.
//!
//! - **Announcing** ([`Announcer`]): after a commit, the store notes "new work" or "job X
//!   finished"; one task sends them as `NOTIFY`s on its own statements, at most one batch per
//!   [`THROTTLE`]. A NOTIFY inside each committing transaction would take PostgreSQL's
//!   cluster-wide notification lock at every commit and serialise them (River dropped its
//!   per-insert trigger for this reason); ids only, many per payload, each payload under 8000
//!   bytes.
//! - **Listening** ([`listen`]): one connection of its own (not from the pool) runs
//!   `LISTEN chatq_work; LISTEN chatq_done`. New work wakes every idle worker; a finished id
//!   that this replica has waiters for is read back and announced to them. Notifications sent
//!   while the connection was down are lost: after each reconnect the workers are woken (they
//!   look for work), and long-polls re-read their job every second anyway.
//!
//! Both tasks belong to the store: they stop when it is dropped ([`Tasks`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::signals::JobNotifier;

/// At most one batch of notifications per replica this often.
pub const THROTTLE: Duration = Duration::from_millis(20);
/// Reconnects of the listening connection back off up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Ids per NOTIFY payload: 36 characters and a comma each, well under the 8000-byte limit.
const IDS_PER_PAYLOAD: usize = 150;

pub const WORK: &str = "chatq_work";
pub const DONE: &str = "chatq_done";

/// Stops the store's background tasks when the store goes.
pub struct Tasks {
    stop: CancellationToken,
}

impl Tasks {
    pub fn new() -> (Self, CancellationToken) {
        let stop = CancellationToken::new();
        (Self { stop: stop.clone() }, stop)
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Default)]
struct Pending {
    work: bool,
    done: Vec<Uuid>,
}

/// What this replica has to tell the others.
#[derive(Default)]
pub struct Announcer {
    pending: Mutex<Pending>,
    wake: Notify,
}

impl Announcer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Only a flag and a list are behind it: a panicking holder leaves nothing half done.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// New work was committed (a push, a retry, a resume, a rescue).
    pub fn work(&self) {
        self.lock().work = true;
        self.wake.notify_one();
    }

    /// Job `id` reached a final state (committed).
    pub fn done(&self, id: Uuid) {
        self.lock().done.push(id);
        self.wake.notify_one();
    }

    /// Sends what is pending, at most once per [`THROTTLE`], until `stop`.
    pub async fn run(self: Arc<Self>, pool: deadpool_postgres::Pool, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = stop.cancelled() => return,
            }
            let pending = std::mem::take(&mut *self.lock());
            if let Err(e) = send(&pool, &pending).await {
                // The others learn of it at their next poll (within a second).
                tracing::debug!(error = %e, "could not notify the other replicas");
            }
            tokio::select! {
                _ = tokio::time::sleep(THROTTLE) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

async fn send(
    pool: &deadpool_postgres::Pool,
    pending: &Pending,
) -> Result<(), crate::store::StoreError> {
    if !pending.work && pending.done.is_empty() {
        return Ok(());
    }
    let client = pool.get().await?;
    if pending.work {
        client.execute("SELECT pg_notify($1, '')", &[&WORK]).await?;
    }
    for ids in pending.done.chunks(IDS_PER_PAYLOAD) {
        let payload = ids
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(",");
        client
            .execute("SELECT pg_notify($1, $2)", &[&DONE, &payload])
            .await?;
    }
    Ok(())
}

/// What the listener does with a finished id it has waiters for: read the job, announce it.
pub type ReadFinished =
    Arc<dyn Fn(Vec<Uuid>) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// Listens on its own connection until `stop`, reconnecting with a backoff.
pub async fn listen(
    config: tokio_postgres::Config,
    tls: super::tls::MakeRustlsConnect,
    notifier: Arc<dyn JobNotifier>,
    read_finished: ReadFinished,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            outcome = listen_once(&config, &tls, &notifier, &read_finished) => outcome,
            _ = stop.cancelled() => return,
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %crate::store::error_chain(&e), retry_in_ms = backoff.as_millis() as u64,
                "the listening connection to the database is down; other replicas' work is seen by polling meanwhile");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &super::tls::MakeRustlsConnect,
    notifier: &Arc<dyn JobNotifier>,
    read_finished: &ReadFinished,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls.clone()).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection does its IO only while polled: drive it here and hand notifications on.
    let driver = async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    let handle = async {
        client
            .batch_execute(&format!("LISTEN {WORK}; LISTEN {DONE}"))
            .await?;
        tracing::debug!("listening for other replicas' work and finishes");
        // Whatever was announced while nobody listened is lost: look for work now.
        notifier.work_available_for_all();
        while let Some((channel, payload)) = rx.recv().await {
            if channel == WORK {
                notifier.work_available_for_all();
            } else if channel == DONE {
                let wanted: Vec<Uuid> = payload
                    .split(',')
                    .filter_map(|id| Uuid::parse_str(id).ok())
                    .filter(|id| notifier.is_watched(*id))
                    .collect();
                if !wanted.is_empty() {
                    read_finished(wanted).await;
                }
            }
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    // Whichever ends first: the connection (an error) or the handling (its channel closed).
    tokio::select! {
        driven = driver => driven,
        handled = handle => handled,
    }
}
