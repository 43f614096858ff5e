//! Group commit for pushes: the pushes waiting at one moment go into the database as one
//! `INSERT … SELECT … FROM unnest(…)`, one transaction and one WAL flush for all of them,
//! as the embedded store's flusher shares one fsync. One task inserts; while a batch is in
//! flight, new pushes gather for the next. A push waits for its batch's commit, so a 2xx
//! still means committed.
//!
//! A row that did not go in (its idempotency key or its pre-assigned id was taken) comes
//! back as `None`; the caller resolves it on its own, as for a single insert.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use tokio::sync::{Notify, oneshot};
use tokio_postgres::types::Json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{JOB_COLUMNS, job_from, schema};
use crate::clock::SharedClock;
use crate::domain::{Job, NewJob};
use crate::store::{StoreError, Unavailable};

/// A batch holds at most this many pushes (one statement's arrays).
const MAX_BATCH: usize = 512;

type Reply = oneshot::Sender<Result<Option<Job>, Arc<StoreError>>>;

#[derive(Default)]
pub struct Batcher {
    waiting: Mutex<Vec<(Uuid, NewJob, Reply)>>,
    wake: Notify,
}

impl Batcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Uuid, NewJob, Reply)>> {
        // A list of waiters is behind it: a panicking holder leaves it whole.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Inserts `new` under `id` with the next batch; `None` if a key or the id was taken.
    pub async fn push(&self, id: Uuid, new: NewJob) -> Result<Option<Job>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.lock().push((id, new, tx));
        self.wake.notify_one();
        match rx.await {
            Ok(Ok(job)) => Ok(job),
            Ok(Err(e)) => Err(share(&e)),
            Err(_) => Err(StoreError::Unavailable(Unavailable::Closed)),
        }
    }

    /// Inserts what waits, batch after batch, until `stop`.
    /// `on_commit` hears how many jobs each committed batch inserted.
    pub async fn run(
        self: Arc<Self>,
        pool: deadpool_postgres::Pool,
        clock: SharedClock,
        on_commit: Arc<dyn Fn(usize) + Send + Sync>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = stop.cancelled() => return,
            }
            loop {
                let batch: Vec<_> = {
                    let mut waiting = self.lock();
                    let n = waiting.len().min(MAX_BATCH);
                    waiting.drain(..n).collect()
                };
                if batch.is_empty() {
                    break;
                }
                // The database's clock, unless the store runs on a test clock.
                let at = (!clock.is_wall_clock()).then(|| clock.now_ms() as i64);
                let outcome = insert(&pool, at, &batch).await;
                match outcome {
                    Ok(mut inserted) => {
                        on_commit(inserted.len());
                        for (id, _, reply) in batch {
                            let _ = reply.send(Ok(inserted.remove(&id)));
                        }
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        for (_, _, reply) in batch {
                            let _ = reply.send(Err(Arc::clone(&e)));
                        }
                    }
                }
            }
        }
    }
}

/// The error of a batch, for each of its pushes.
fn share(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(u) => StoreError::Unavailable(u.clone()),
        StoreError::InvalidCursor => StoreError::InvalidCursor,
        other => StoreError::Backend(other.to_string().into()),
    }
}

async fn insert(
    pool: &deadpool_postgres::Pool,
    now: Option<i64>,
    batch: &[(Uuid, NewJob, Reply)],
) -> Result<HashMap<Uuid, Job>, StoreError> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut users = Vec::with_capacity(batch.len());
    let mut guilds = Vec::with_capacity(batch.len());
    let mut conversations = Vec::with_capacity(batch.len());
    let mut requests = Vec::with_capacity(batch.len());
    let mut priorities = Vec::with_capacity(batch.len());
    let mut max_attempts = Vec::with_capacity(batch.len());
    let mut delays = Vec::with_capacity(batch.len());
    let mut keys = Vec::with_capacity(batch.len());
    let mut request_ids = Vec::with_capacity(batch.len());
    for (id, new, _) in batch {
        ids.push(*id);
        users.push(new.user_id.as_str());
        guilds.push(new.guild_id.as_deref());
        conversations.push(new.conversation_id.as_deref());
        requests.push(Json(&new.request));
        priorities.push(i64::from(new.priority));
        max_attempts.push(new.max_attempts.max(1) as i32);
        delays.push(i64::try_from(new.delay_ms).unwrap_or(i64::MAX));
        keys.push(new.idempotency_key.as_deref());
        request_ids.push(new.request_id.as_deref());
    }
    // In push order: unnest keeps the arrays' order, and the sequence follows it (FIFO).
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO chatq_jobs (id, seq, user_id, guild_id, conversation_id, request,
             priority, max_attempts, state, created_at, run_at, idempotency_key, request_id)
         SELECT u.id, nextval('chatq_seq'), u.user_id, u.guild_id, u.conversation_id,
             u.request, u.priority, u.max_attempts,
             CASE WHEN u.delay > 0 THEN 'delayed' ELSE 'queued' END,
             now.ms, now.ms + u.delay, u.idempotency_key, u.request_id
         FROM (SELECT {now} AS ms) now,
              unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                     $7::bigint[], $8::int[], $9::bigint[], $10::text[], $11::text[])
                WITH ORDINALITY
                AS u(id, user_id, guild_id, conversation_id, request, priority,
                     max_attempts, delay, idempotency_key, request_id, ord)
         ORDER BY u.ord
         ON CONFLICT DO NOTHING
         RETURNING {JOB_COLUMNS}",
            now = schema::NOW
        )
    });
    let client = pool.get().await?;
    let statement = client.prepare_cached(SQL.as_str()).await?;
    let rows = client
        .query(
            &statement,
            &[
                &now,
                &ids,
                &users,
                &guilds,
                &conversations,
                &requests,
                &priorities,
                &max_attempts,
                &delays,
                &keys,
                &request_ids,
            ],
        )
        .await?;
    let mut inserted = HashMap::with_capacity(rows.len());
    for row in &rows {
        let job = job_from(row)?;
        inserted.insert(job.id, job);
    }
    Ok(inserted)
}
