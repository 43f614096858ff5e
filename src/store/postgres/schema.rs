//! The PostgreSQL schema, versioned. [`migrate`] brings a database up to [`VERSION`] under an
//! advisory lock (so replicas starting together apply each step once) and refuses a database
//! whose schema is newer than this release knows.
//!
//! Times are milliseconds since the epoch (`bigint`), like the domain's `Millis`. Which clock
//! gives them is [`NOW`]'s business: the database's, unless the store was opened on a test
//! clock, so replicas whose clocks drift still agree on due times and lease expiries.

use deadpool_postgres::Client;

use crate::store::StoreError;

/// The schema version this release writes and reads.
pub const VERSION: i32 = 3;

/// Taken for the whole migration, so that one replica migrates and the others wait.
const MIGRATION_LOCK: i64 = 0x6368_6174_7100_0001;

/// `chatq_now_ms(given)`: `given` when the caller passes a time (a test clock), the database
/// clock otherwise.
pub const NOW: &str = "chatq_now_ms($1::bigint)";

/// Each migration, in order; migration `n` brings the schema from version `n - 1` to `n`.
const MIGRATIONS: [&str; 3] = [
    r#"
CREATE FUNCTION chatq_now_ms(given bigint) RETURNS bigint LANGUAGE sql VOLATILE AS
  $$ SELECT coalesce(given, (extract(epoch FROM clock_timestamp()) * 1000)::bigint) $$;

CREATE TABLE chatq_meta (
  singleton bool PRIMARY KEY DEFAULT true CHECK (singleton),
  schema_version int NOT NULL,
  paused bool NOT NULL DEFAULT false
);
INSERT INTO chatq_meta (schema_version) VALUES (0);

-- Ordering keys and fencing tokens: one sequence, so a token is never reused.
CREATE SEQUENCE chatq_seq;

CREATE TABLE chatq_jobs (
  id uuid PRIMARY KEY,
  seq bigint NOT NULL,
  user_id text NOT NULL,
  guild_id text,
  conversation_id text,
  request jsonb NOT NULL,
  priority bigint NOT NULL,
  attempts int NOT NULL DEFAULT 0,
  max_attempts int NOT NULL,
  state text NOT NULL
    CHECK (state IN ('queued', 'delayed', 'active', 'completed', 'failed', 'cancelled')),
  created_at bigint NOT NULL,
  run_at bigint NOT NULL,
  started_at bigint,
  finished_at bigint,
  result jsonb,
  error jsonb,
  idempotency_key text,
  request_id text,
  lease_token bigint,
  lease_owner text,
  lease_expires_at bigint,
  rescues int NOT NULL DEFAULT 0
) WITH (fillfactor = 70);
CREATE UNIQUE INDEX chatq_jobs_idempotency ON chatq_jobs (user_id, idempotency_key)
  WHERE idempotency_key IS NOT NULL;
CREATE INDEX chatq_jobs_ready ON chatq_jobs (priority, run_at, seq)
  WHERE state IN ('queued', 'delayed');
CREATE INDEX chatq_jobs_lease ON chatq_jobs (lease_expires_at) WHERE state = 'active';
CREATE INDEX chatq_jobs_done ON chatq_jobs (state, finished_at DESC, seq DESC)
  WHERE state IN ('completed', 'failed', 'cancelled');
-- The table stays small (retention) but churns: vacuum it by row count, not by fraction.
ALTER TABLE chatq_jobs SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);

CREATE TABLE chatq_interactions (
  ts_ms bigint NOT NULL,
  seq bigint GENERATED ALWAYS AS IDENTITY,
  job_id uuid NOT NULL UNIQUE,
  request_id text,
  user_id text NOT NULL,
  guild_id text NOT NULL,
  action text NOT NULL,
  personality text,
  prompt text NOT NULL,
  reply text,
  error text,
  error_code text,
  used_fallback bool NOT NULL,
  model text,
  upstream_latency_ms bigint,
  usage jsonb,
  attempts int NOT NULL,
  PRIMARY KEY (ts_ms, seq)
);
CREATE INDEX chatq_interactions_user ON chatq_interactions (user_id, ts_ms DESC, seq DESC);
CREATE INDEX chatq_interactions_guild ON chatq_interactions (guild_id, ts_ms DESC, seq DESC);
"#,
    r#"
-- Per-user limits shared by every replica: GCRA's theoretical arrival time per key (ms).
-- Rows are rewritten on every request: leave room for HOT updates.
CREATE TABLE chatq_rate (
  key text PRIMARY KEY,
  tat bigint NOT NULL
) WITH (fillfactor = 50);
"#,
    r#"
-- Issues 15 and 16: the response cache, guild settings, conversations.
-- Whether an interaction's reply came from the response cache.
ALTER TABLE chatq_interactions ADD COLUMN cached bool NOT NULL DEFAULT false;

-- The response cache, shared by every replica. `seq` orders entries by age: the bound on
-- entries keeps those among the newest N stored (see `ReplyCache::cache_put`).
CREATE SEQUENCE chatq_cache_seq;
CREATE TABLE chatq_cache (
  key bytea PRIMARY KEY,
  guild_id text NOT NULL,
  reply text NOT NULL,
  model text NOT NULL,
  stored_at bigint NOT NULL,
  expires_at bigint NOT NULL,
  seq bigint NOT NULL
);
CREATE INDEX chatq_cache_age ON chatq_cache (seq);
CREATE INDEX chatq_cache_expiry ON chatq_cache (expires_at);
CREATE INDEX chatq_cache_guild ON chatq_cache (guild_id);

-- Guild settings: one row per guild that has any.
CREATE TABLE chatq_guilds (
  guild_id text PRIMARY KEY,
  settings jsonb NOT NULL,
  updated_at bigint NOT NULL
);

-- Server-side conversations: one row per completed job of a conversation (its turn).
CREATE TABLE chatq_turns (
  guild_id text NOT NULL,
  conversation_id text NOT NULL,
  at bigint NOT NULL,
  seq bigint GENERATED ALWAYS AS IDENTITY,
  job_id uuid NOT NULL UNIQUE,
  user_id text NOT NULL,
  prompt text NOT NULL,
  reply text NOT NULL,
  PRIMARY KEY (guild_id, conversation_id, at, seq)
);
CREATE INDEX chatq_turns_age ON chatq_turns (at);

-- The delivery outbox: a finished job's reply on its way to Discord (or a webhook).
CREATE TABLE chatq_deliveries (
  id uuid PRIMARY KEY,
  job_id uuid NOT NULL,
  record jsonb NOT NULL,
  state text NOT NULL CHECK (state IN ('pending', 'waiting', 'delivered', 'failed')),
  next_at bigint NOT NULL,
  created_at bigint NOT NULL
);
CREATE INDEX chatq_deliveries_due ON chatq_deliveries (next_at)
  WHERE state IN ('pending', 'waiting');
CREATE INDEX chatq_deliveries_job ON chatq_deliveries (job_id);
"#,
];

/// Why a database cannot be used as it is.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database's chatq schema is version {found}, newer than version {VERSION} that this chatq knows; run a chatq release that knows it"
)]
pub struct NewerSchema {
    pub found: i32,
}

/// The schema version of the database `client` is connected to (0: no chatq schema).
pub async fn version(client: &Client) -> Result<i32, StoreError> {
    let row = client
        .query_one("SELECT to_regclass('chatq_meta') IS NOT NULL", &[])
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT schema_version FROM chatq_meta", &[])
        .await?;
    Ok(row.get(0))
}

/// Brings the schema to [`VERSION`]; returns the version found before.
pub async fn migrate(client: &mut Client) -> Result<i32, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let outcome = apply(client).await;
    // Released even when a step failed; a dropped connection releases it too.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let found = outcome?;
    unlocked?;
    Ok(found)
}

async fn apply(client: &mut Client) -> Result<i32, StoreError> {
    let found = version(client).await?;
    if found > VERSION {
        return Err(StoreError::Open {
            what: NewerSchema { found }.to_string(),
            source: Box::new(NewerSchema { found }),
        });
    }
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = step as i32 + 1;
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute("UPDATE chatq_meta SET schema_version = $1", &[&to])
            .await?;
        tx.commit().await?;
        tracing::info!(version = to, "database schema migrated");
    }
    Ok(found)
}
