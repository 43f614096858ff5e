//! The interaction log's entry and query types, as every backend shows them.
//!
//! One [`Interaction`] is written per finished attempt chain (completed or failed for good).
//! How a backend keys and indexes entries is its own business: a page of results carries an
//! opaque [`Cursor`] that only the backend that made it can read.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::domain::job::Usage;

/// The guild id recorded for interactions outside any guild.
pub const GLOBAL_GUILD: &str = "global";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    ChatBotInteraction,
    ChatBotError,
}

/// One logged interaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// The entry's cursor: pass it to continue after this entry. Filled in when read.
    pub id: String,
    pub job_id: Uuid,
    pub request_id: Option<String>,
    pub user_id: String,
    /// The guild id, or `global`.
    pub guild_id: String,
    pub action: Action,
    pub personality: Option<String>,
    pub prompt: String,
    pub reply: Option<String>,
    pub error: Option<String>,
    pub error_code: Option<String>,
    pub used_fallback: bool,
    pub model: Option<String>,
    pub upstream_latency_ms: Option<u64>,
    pub usage: Option<Usage>,
    /// The reply came from the response cache.
    pub cached: bool,
    pub attempts: u32,
    pub timestamp: Millis,
}

/// Where a page of the log ends: opaque outside the store that made it. A client passes back
/// the text it was given; a store that cannot read it answers `StoreError::InvalidCursor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = String)]
pub struct Cursor(String);

impl Cursor {
    /// Wraps text a client sent back (checked by the store when used).
    pub fn from_client(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A query of the interaction log; every filter is optional. Results are newest first.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub user_id: Option<String>,
    pub guild_id: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<Millis>,
    /// Only entries before this time.
    pub until: Option<Millis>,
    /// Continue after this entry (the `next_cursor` of the previous page).
    pub cursor: Option<Cursor>,
    pub limit: usize,
}

/// The largest page a log query returns.
pub const MAX_PAGE: usize = 500;

/// One page of a log query.
#[derive(Debug, Clone, Serialize)]
pub struct LogPage {
    pub entries: Vec<Interaction>,
    /// Pass as `cursor` to read the next (older) page; `None` at the end.
    pub next_cursor: Option<Cursor>,
}

impl Interaction {
    /// The entry a finished job leaves in the log. Every backend builds it here, so the
    /// fields mean the same everywhere.
    pub fn for_finished(job: &crate::domain::Job) -> Self {
        use crate::domain::JobState;
        let result = job.result.as_ref();
        let action = if job.state == JobState::Completed {
            Action::ChatBotInteraction
        } else {
            Action::ChatBotError
        };
        let error = job
            .error
            .as_ref()
            .filter(|_| action == Action::ChatBotError);
        Self {
            id: String::new(),
            job_id: job.id,
            request_id: job.request_id.clone(),
            user_id: job.user_id.clone(),
            guild_id: job
                .guild_id
                .clone()
                .unwrap_or_else(|| GLOBAL_GUILD.to_owned()),
            action,
            personality: job.request.personality.clone(),
            prompt: job.request.prompt.clone(),
            reply: result.map(|r| r.reply.clone()),
            error: error.map(|e| e.message.clone()),
            error_code: error.map(|e| e.code.clone()),
            used_fallback: result.is_some_and(|r| r.used_fallback),
            model: result.map(|r| r.model.clone()),
            upstream_latency_ms: result.and_then(|r| r.upstream_latency_ms),
            usage: result.and_then(|r| r.usage),
            cached: result.is_some_and(|r| r.cached),
            attempts: job.attempts,
            timestamp: job.finished_at.unwrap_or_default(),
        }
    }
}
