//! The chat bot: turns a job into a reply.
//!
//! [`ChatBot::ask`] builds the prompt (guild-aware system prompt, personality, last 10
//! messages), calls the OpenAI-compatible [`Upstream`] when a key is configured, and
//! otherwise answers with the personality's canned fallback reply. It does not retry and does
//! not touch the store: the worker decides what an error means for the job.

pub mod fallback;
pub mod personality;
pub mod prompt;
pub mod upstream;

use std::time::Duration;

use crate::clock::SharedClock;
use crate::domain::{ChatRequest, Job, JobError, JobResult};
use crate::signals::DeltaSender;
pub use personality::{Personalities, Personality};
pub use upstream::{Upstream, UpstreamConfig, UpstreamError};

/// `max_tokens` sent upstream unless a request sets its own.
pub const DEFAULT_MAX_TOKENS: u32 = 180;

/// Why the bot could not answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BotError {
    #[error("The prompt is empty")]
    MissingPrompt,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream failed after part of the reply had been streamed to the client: not
    /// retried, since the client already saw text from this attempt.
    #[error("{0} (after part of the reply was streamed)")]
    MidStream(UpstreamError),
}

impl BotError {
    pub fn is_transient(&self) -> bool {
        match self {
            Self::MissingPrompt | Self::MidStream(_) => false,
            Self::Upstream(e) => e.is_transient(),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::MissingPrompt | Self::MidStream(_) => None,
            Self::Upstream(e) => e.retry_after(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingPrompt => "missing_prompt",
            Self::Upstream(_) | Self::MidStream(_) => "openai_error",
        }
    }

    pub fn upstream(&self) -> Option<&UpstreamError> {
        match self {
            Self::MissingPrompt => None,
            Self::Upstream(e) | Self::MidStream(e) => Some(e),
        }
    }

    /// The error as recorded in the job and the interaction log.
    pub fn to_job_error(&self) -> JobError {
        JobError {
            code: self.code().to_owned(),
            message: self.to_string(),
            status: self.upstream().and_then(UpstreamError::status),
        }
    }
}

/// What one job asks of the upstream (see [`ChatBot::plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamPlan {
    /// The personality's name, after resolving the default.
    pub personality: String,
    pub model: String,
    /// The system prompt first, then history and the prompt, as sent.
    pub messages: Vec<prompt::WireMessage>,
    pub max_tokens: u32,
    pub temperature: f32,
}

/// The chat bot. Build once; share behind an `Arc`.
#[derive(Debug)]
pub struct ChatBot {
    upstream: Option<Upstream>,
    personalities: Personalities,
    clock: SharedClock,
    /// The model asked for upstream, and named in `/v1/models` and the stats even offline.
    model: String,
}

impl ChatBot {
    /// `upstream` is `None` when no API key is configured: every job gets a fallback reply.
    pub fn new(
        upstream: Option<Upstream>,
        personalities: Personalities,
        clock: SharedClock,
        model: impl Into<String>,
    ) -> Self {
        Self {
            upstream,
            personalities,
            clock,
            model: model.into(),
        }
    }

    pub fn personalities(&self) -> &Personalities {
        &self.personalities
    }

    /// True when replies come from an upstream model, false in offline fallback mode.
    pub fn has_upstream(&self) -> bool {
        self.upstream.is_some()
    }

    /// The configured model name (also offline, where replies name
    /// [`fallback::FALLBACK_MODEL`] as the model that answered).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The canned reply for a job (offline mode, or after the upstream gave up for good when
    /// the operator chose to fall back).
    pub fn fallback_result(&self, job: &Job) -> JobResult {
        let personality = self
            .personalities
            .resolve(job.request.personality.as_deref());
        JobResult {
            reply: fallback::reply_for(personality).to_owned(),
            used_fallback: true,
            model: fallback::FALLBACK_MODEL.to_owned(),
            usage: None,
            processed_at: self.clock.now_ms(),
            upstream_latency_ms: None,
            cached: false,
        }
    }

    /// What `request` in `guild_id` asks of the upstream, decided before any call: the
    /// personality, model, sampling and the full message list. [`ChatBot::ask`] sends exactly
    /// this, and the response cache keys on it, so the two cannot disagree about what shapes
    /// a reply.
    pub fn plan(&self, guild_id: Option<&str>, request: &ChatRequest) -> UpstreamPlan {
        let personality = self.personalities.resolve(request.personality.as_deref());
        UpstreamPlan {
            personality: personality.name.clone(),
            model: request.model.clone().unwrap_or_else(|| self.model.clone()),
            messages: prompt::build_messages(guild_id, personality, request),
            max_tokens: request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: request.temperature.unwrap_or(personality.temperature),
        }
    }

    /// Answers one job. With `sink`, the reply is also sent piece by piece as it is
    /// produced (a send to a client that went away is ignored).
    pub async fn ask(&self, job: &Job, sink: Option<&DeltaSender>) -> Result<JobResult, BotError> {
        // Submissions arrive trimmed (`http::submission`); a job stored by hand may not.
        if job.request.prompt.trim().is_empty() {
            return Err(BotError::MissingPrompt);
        }
        let Some(upstream) = &self.upstream else {
            let result = self.fallback_result(job);
            if let Some(sink) = sink {
                // Fallback replies stream too, a word at a time.
                for word in result.reply.split_inclusive(' ') {
                    let _ = sink.send(word.to_owned());
                }
            }
            return Ok(result);
        };
        let plan = self.plan(job.guild_id.as_deref(), &job.request);
        let mut call = upstream::CompletionRequest {
            model: &plan.model,
            messages: &plan.messages,
            max_tokens: plan.max_tokens,
            temperature: plan.temperature,
            user: Some(&job.user_id),
            stream: false,
        };
        let reply = match sink {
            None => upstream.complete(&call).await?,
            Some(sink) => {
                call.stream = true;
                let mut forward = |delta: &str| {
                    let _ = sink.send(delta.to_owned());
                };
                upstream
                    .complete_streaming(&call, &mut forward)
                    .await
                    .map_err(|f| {
                        if f.streamed {
                            BotError::MidStream(f.error)
                        } else {
                            BotError::Upstream(f.error)
                        }
                    })?
            }
        };
        let text = reply
            .content
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| fallback::EMPTY_REPLY_PLACEHOLDER.to_owned());
        Ok(JobResult {
            reply: text,
            used_fallback: false,
            model: reply.model,
            usage: reply.usage,
            processed_at: self.clock.now_ms(),
            upstream_latency_ms: Some(reply.latency.as_millis() as u64),
            cached: false,
        })
    }
}
