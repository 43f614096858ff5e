//! A chat job and its states: what every part of chatq (front door, workers, stores) agrees a
//! job is. Storage keeps its own bookkeeping (ordering keys, repair flags, leases) beside it.
//!
//! The structs are plain (no `skip_serializing_if`, no untagged enums): the sled store encodes
//! them positionally with bincode, so a field added, removed or reordered here changes its
//! record layout and needs a new record version there (`store/sled/record.rs` pins the bytes).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// In the ready queue, waiting for a worker.
    Queued,
    /// Waiting for a retry or a requested delay to pass.
    Delayed,
    /// Claimed by a worker.
    Active,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delayed => "delayed",
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `name` (as [`JobState::as_str`] spells it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub const ALL: [JobState; 6] = [
        Self::Queued,
        Self::Delayed,
        Self::Active,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];
}

/// Who wrote a message in a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// What the chat bot is asked: the user's prompt and the conversation before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The user's message, already trimmed.
    pub prompt: String,
    /// Earlier messages of the conversation, oldest first (the bot keeps the last 10).
    pub history: Vec<Message>,
    /// Personality preset name; `None` means the default.
    pub personality: Option<String>,
    /// Overrides the personality's temperature.
    pub temperature: Option<f32>,
    /// Overrides the default `max_tokens`.
    pub max_tokens: Option<u32>,
    /// The model to ask (a guild's setting); `None`: the server's.
    #[serde(default)]
    pub model: Option<String>,
    /// The guild's instructions, added to the system prompt.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Earlier exchanges of the server-side conversation, oldest first, loaded at submission
    /// (already bounded by the guild's `history_turns`; `history` is the client's own).
    #[serde(default)]
    pub conversation: Vec<Message>,
}

/// Token usage of one reply, as chatq records it (the upstream's wire type is separate, in
/// `bot::upstream`, so a new field there changes no stored layout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

/// The outcome of a completed job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub reply: String,
    pub used_fallback: bool,
    pub model: String,
    pub usage: Option<Usage>,
    pub processed_at: Millis,
    /// Time spent waiting for the upstream on the successful attempt.
    pub upstream_latency_ms: Option<u64>,
    /// The reply came from the response cache: no upstream call was made for this job, so
    /// its usage is zero. (`default`: results the shared store wrote as JSON before the
    /// cache existed read as not cached; the embedded store's positional records are
    /// versioned instead.)
    #[serde(default)]
    pub cached: bool,
}

/// Why an attempt (or the whole job) failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    /// Machine-readable code, such as `openai_error` or `missing_prompt`.
    pub code: String,
    pub message: String,
    /// The upstream HTTP status, when there was one.
    pub status: Option<u16>,
}

/// One chat job, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    pub user_id: String,
    pub guild_id: Option<String>,
    pub conversation_id: Option<String>,
    pub request: ChatRequest,
    /// BullMQ semantics: 0 (the default) runs first, then 1, 2, ...; FIFO within a priority.
    pub priority: u32,
    /// Attempts that ended with an outcome (success or error). An attempt cut short by a crash
    /// does not count, so a recovered job keeps this number.
    pub attempts: u32,
    pub max_attempts: u32,
    pub state: JobState,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// When a delayed job becomes due.
    pub run_at: Millis,
    pub result: Option<JobResult>,
    /// The last attempt's error (kept while retrying) or the final error.
    pub error: Option<JobError>,
    pub idempotency_key: Option<String>,
    /// The `x-request-id` of the submitting request.
    pub request_id: Option<String>,
}

/// What a caller asks the queue to run.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// A pre-assigned id (a streaming client registers for the job's deltas before the push);
    /// `None` lets the queue pick one.
    pub id: Option<Uuid>,
    pub user_id: String,
    pub guild_id: Option<String>,
    pub conversation_id: Option<String>,
    pub request: ChatRequest,
    pub priority: u32,
    pub delay_ms: u64,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    pub request_id: Option<String>,
}

impl NewJob {
    /// A job for `user_id` asking `prompt`, with default options; handy in tests and tools.
    pub fn prompt(user_id: &str, prompt: &str) -> Self {
        Self {
            id: None,
            user_id: user_id.to_owned(),
            guild_id: None,
            conversation_id: None,
            request: ChatRequest {
                prompt: prompt.to_owned(),
                history: Vec::new(),
                personality: None,
                temperature: None,
                max_tokens: None,
                model: None,
                instructions: None,
                conversation: Vec::new(),
            },
            priority: 0,
            delay_ms: 0,
            max_attempts: crate::defaults::MAX_ATTEMPTS,
            idempotency_key: None,
            request_id: None,
        }
    }
}

impl NewJob {
    /// The job this submission becomes when a store accepts it at `now` under `id`: every
    /// backend builds it here, so a fresh job looks the same on each.
    pub fn to_job(&self, id: Uuid, now: Millis) -> Job {
        Job {
            id,
            user_id: self.user_id.clone(),
            guild_id: self.guild_id.clone(),
            conversation_id: self.conversation_id.clone(),
            request: self.request.clone(),
            priority: self.priority,
            attempts: 0,
            max_attempts: self.max_attempts.max(1),
            state: if self.delay_ms > 0 {
                JobState::Delayed
            } else {
                JobState::Queued
            },
            created_at: now,
            started_at: None,
            finished_at: None,
            run_at: now.saturating_add(self.delay_ms),
            result: None,
            error: None,
            idempotency_key: self.idempotency_key.clone(),
            request_id: self.request_id.clone(),
        }
    }
}

/// Counts of jobs per state, under the states' own names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueCounts {
    pub queued: u64,
    pub active: u64,
    pub completed: u64,
    pub failed: u64,
    pub delayed: u64,
    pub cancelled: u64,
    pub paused: bool,
}
