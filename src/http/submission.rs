//! One submission, parsed once: every route that submits work (`/v1/chat/jobs`,
//! `/api/chat/bot`, `/v1/chat/completions`) phrases its body as a [`SubmitRequest`] and turns
//! it into a checked [`NewJob`] here, so a rule, its order and its message exist once.
//!
//! Order of the checks (the first failure wins): the ids (guild, conversation, idempotency
//! key), the content (prompt or messages, each message by the rules of `validate.rs`), the
//! sampling parameters, the personality, then the queue options (priority, delay, attempts).
//! The user id is checked by the route before the rate limit, since it is the limit's key.
//!
//! The whole flow, shared by the routes: check the user id → [`admit`] (load the guild's
//! settings, count the request against the rate limit, the guild's own or the server's, and
//! check the user's daily token quota in the guild) → [`parse`] (with the guild's defaults
//! and allowed personalities) → [`fill_history`] (a server-side conversation's turns) → the
//! response cache → push.

use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use serde_json::Value;
use uuid::Uuid;

use super::error::ApiError;
use super::state::AppState;
use crate::domain::{
    ChatRequest, GLOBAL_GUILD, Guild, GuildSettings, Message, NewJob, Role, utc_day_start,
};
use crate::limiter::{Decision, GuildLimiters};
use crate::validate::ValidationError;

/// Longest user, guild, conversation id and idempotency key, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// BullMQ's largest priority.
pub const MAX_PRIORITY: u32 = 2_097_152;
/// Longest accepted delay: one week.
pub const MAX_DELAY_MS: u64 = 7 * 24 * 3_600 * 1_000;
/// Largest `max_tokens` a request may ask for.
pub const MAX_TOKENS: u32 = 32_768;

/// What the user asks, in one of the two forms the routes accept.
#[derive(Debug)]
pub enum Content {
    /// A prompt (at most `--max-prompt-chars`) and, optionally, the conversation before it.
    Prompt { prompt: String, history: Vec<Value> },
    /// A conversation whose last message is the user's prompt.
    Messages(Vec<Value>),
}

/// A submission as a route phrases it, before any check but the user id's.
#[derive(Debug)]
pub struct SubmitRequest {
    pub user_id: String,
    /// The guild id, and the name it had in the request (`guild_id`, `X-Guild-Id`).
    pub guild_id: Option<(String, &'static str)>,
    pub conversation_id: Option<String>,
    pub content: Content,
    pub personality: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    pub priority: Option<u32>,
    pub delay_ms: Option<u64>,
    pub idempotency_key: Option<String>,
    pub max_attempts: Option<u32>,
    /// Accept `system` messages from the client (the OpenAI route, unless refused).
    pub allow_system: bool,
    /// A pre-assigned job id (a streaming client listens before the push).
    pub id: Option<Uuid>,
    pub request_id: Option<String>,
}

impl SubmitRequest {
    /// A submission of `content` for `user_id` with every option at its default.
    pub fn new(user_id: String, content: Content) -> Self {
        Self {
            user_id,
            guild_id: None,
            conversation_id: None,
            content,
            personality: None,
            temperature: None,
            max_tokens: None,
            priority: None,
            delay_ms: None,
            idempotency_key: None,
            max_attempts: None,
            allow_system: false,
            id: None,
            request_id: None,
        }
    }
}

/// Checks an id-like field: 1 to 128 characters, no control characters.
pub fn check_id(param: &str, value: &str) -> Result<(), ApiError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ApiError::bad_request(
            "missing_field",
            format!("{param} is required"),
            Some(param),
        ));
    }
    if value.chars().count() > MAX_ID_CHARS
        || value.chars().any(char::is_control)
        || trimmed != value
    {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!(
                "{param} must be 1 to {MAX_ID_CHARS} characters without control characters or surrounding spaces"
            ),
            Some(param),
        ));
    }
    Ok(())
}

fn check_optional_id(param: &str, value: Option<&str>) -> Result<(), ApiError> {
    value.map_or(Ok(()), |v| check_id(param, v))
}

fn missing_prompt() -> ApiError {
    ApiError::bad_request("missing_prompt", "A prompt is required", Some("prompt"))
}

fn invalid_field(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_field", message, Some(param))
}

/// What [`admit`] found before the request is parsed.
#[derive(Debug)]
pub struct Admission {
    /// The settings of the request's guild, if it has any.
    pub guild: Option<Guild>,
    /// The rate limiter's verdict, for the headers of whatever the route answers.
    pub decision: Decision,
    /// Tokens the user has left today in the guild, when the guild sets a quota.
    pub quota_remaining: Option<u64>,
}

impl Admission {
    pub fn settings(&self) -> Option<&GuildSettings> {
        self.guild.as_ref().map(|g| &g.settings)
    }

    /// Adds the rate-limit headers and `X-Quota-Remaining` to an answer.
    pub fn headers(&self, response: Response) -> Response {
        const QUOTA: HeaderName = HeaderName::from_static("x-quota-remaining");
        let mut response = super::jobs::with_rate_headers(response, &self.decision);
        if let Some(left) = self.quota_remaining {
            response
                .headers_mut()
                .insert(QUOTA, HeaderValue::from(left));
        }
        response
    }
}

/// Loads the guild's settings, counts one request of `user` against the rate limit (the
/// guild's own, or the server's) and checks the user's daily token quota in the guild. The
/// outer error is a store that cannot be asked; the inner one says why the request is
/// refused (and goes out with the admission's headers).
pub async fn admit(
    state: &AppState,
    user: &str,
    guild_id: Option<&str>,
) -> Result<(Admission, Result<(), ApiError>), ApiError> {
    // An invalid guild id is refused by `parse`; it has no settings to load.
    let guild = match guild_id.filter(|g| check_id("guild_id", g).is_ok()) {
        Some(id) => state.store.guild(id).await?,
        None => None,
    };
    let settings = guild.as_ref().map(|g| &g.settings);
    let decision = match (guild_id, settings.and_then(|s| s.rate_limit)) {
        (Some(id), Some(own)) => {
            let limit = NonZeroU32::new(own.limit).unwrap_or(NonZeroU32::MIN);
            let window = Duration::from_secs(own.window_secs);
            let key = GuildLimiters::key(id, user);
            match state.store.take(&key, limit.get(), window).await? {
                Some(take) => Decision::from_take(&take, limit.get()),
                None => state.guild_limiters.check(id, user, limit, window),
            }
        }
        _ => {
            let limit = state.config.rate_limit.get();
            match state
                .store
                .take(user, limit, state.config.rate_window)
                .await?
            {
                Some(take) => Decision::from_take(&take, limit),
                None => state.limiter.check(user),
            }
        }
    };
    let mut admission = Admission {
        guild: None,
        decision,
        quota_remaining: None,
    };
    if let Some(retry_after) = decision.retry_after_secs.filter(|_| !decision.allowed) {
        state.metrics.rate_limited.inc();
        admission.guild = guild;
        return Ok((admission, Err(ApiError::RateLimited { retry_after })));
    }
    let mut verdict = Ok(());
    if let (Some(id), Some(quota)) = (guild_id, settings.and_then(|s| s.daily_token_quota)) {
        let now = state.clock.now_ms();
        let day = utc_day_start(now);
        let used = state.store.tokens_spent(id, user, day).await?;
        let left = quota.saturating_sub(used);
        admission.quota_remaining = Some(left);
        if left == 0 {
            let midnight = day + 86_400_000;
            verdict = Err(ApiError::QuotaExceeded {
                quota,
                retry_after: (midnight - now).div_ceil(1_000).max(1),
            });
        }
    }
    admission.guild = guild;
    Ok((admission, verdict))
}

/// The personality a request gets in a guild: the one it named, else the guild's, else (when
/// the guild allows only some) the first it allows; refused when it names one the guild does
/// not allow.
pub fn guild_personality(
    guild: Option<&GuildSettings>,
    named: Option<String>,
    param: &str,
) -> Result<Option<String>, ApiError> {
    let Some(guild) = guild else {
        return Ok(named);
    };
    let allowed = guild.allowed_personalities.as_deref();
    let Some(name) = named else {
        return Ok(guild
            .personality
            .clone()
            .or_else(|| allowed.and_then(|a| a.first().cloned())));
    };
    if let Some(allowed) = allowed {
        if !allowed.contains(&name) {
            return Err(ApiError::Validation {
                message: format!(
                    "The personality {name:?} is not allowed in this guild; allowed: {}",
                    allowed.join(", ")
                ),
                code: "personality_not_allowed",
                param: Some(param.to_owned()),
            });
        }
    }
    Ok(Some(name))
}

/// For a job of a server-side conversation that brought no history of its own: the last
/// exchanges of that conversation in its guild (the guild's `history_turns`, else 10).
pub async fn fill_history(
    state: &AppState,
    guild: Option<&GuildSettings>,
    new: &mut NewJob,
) -> Result<(), ApiError> {
    let Some(conversation) = &new.conversation_id else {
        return Ok(());
    };
    if new.request.history.iter().any(|m| m.role != Role::System) {
        return Ok(());
    }
    let turns = guild
        .and_then(|g| g.history_turns)
        .unwrap_or(crate::defaults::HISTORY_TURNS) as usize;
    if turns == 0 {
        return Ok(());
    }
    let guild_id = new.guild_id.as_deref().unwrap_or(GLOBAL_GUILD);
    let stored = state.store.turns(guild_id, conversation, turns).await?;
    for turn in stored {
        new.request.conversation.push(Message {
            role: Role::User,
            content: turn.prompt,
        });
        new.request.conversation.push(Message {
            role: Role::Assistant,
            content: turn.reply,
        });
    }
    Ok(())
}

/// Turns a submission into a job for the queue, or says what is wrong with it; `guild` is the
/// request's guild's settings, whose defaults and rules apply.
pub fn parse(
    state: &AppState,
    request: SubmitRequest,
    guild: Option<&GuildSettings>,
) -> Result<NewJob, ApiError> {
    if let Some((guild, param)) = &request.guild_id {
        check_id(param, guild)?;
    }
    check_optional_id("conversation_id", request.conversation_id.as_deref())?;
    check_optional_id("idempotency_key", request.idempotency_key.as_deref())?;
    let rejected = |e: ValidationError, param: String| {
        state.metrics.validation_rejected.inc();
        ApiError::validation(e, Some(param))
    };
    let validate_list = |list: &[Value], name: &str| -> Result<Vec<Message>, ApiError> {
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                state
                    .validator
                    .message_parts(v, request.allow_system)
                    .map(|(role, content)| Message {
                        role,
                        content: content.to_owned(),
                    })
                    .map_err(|e| rejected(e, format!("{name}[{i}]")))
            })
            .collect()
    };
    let (prompt, history) = match &request.content {
        Content::Prompt { prompt, history } => {
            let trimmed = prompt.trim();
            if trimmed.is_empty() {
                return Err(missing_prompt());
            }
            let max = state.config.max_prompt_chars;
            if prompt.len() > max && prompt.chars().count() > max {
                state.metrics.validation_rejected.inc();
                return Err(ApiError::Validation {
                    message: format!("Prompt too long (max {max} characters)"),
                    code: "prompt_too_long",
                    param: Some("prompt".to_owned()),
                });
            }
            if state.validator.is_unsafe(prompt) {
                return Err(rejected(ValidationError::Unsafe, "prompt".to_owned()));
            }
            (trimmed.to_owned(), validate_list(history, "history")?)
        }
        Content::Messages(messages) => {
            let mut messages = validate_list(messages, "messages")?;
            match messages.pop() {
                Some(last) if last.role == Role::User => (last.content, messages),
                _ => {
                    return Err(ApiError::bad_request(
                        "missing_prompt",
                        "The last message must be the user's prompt",
                        Some("messages"),
                    ));
                }
            }
        }
    };
    if request
        .temperature
        .is_some_and(|t| !(0.0..=2.0).contains(&t))
    {
        return Err(invalid_field(
            "temperature",
            "temperature must be between 0 and 2",
        ));
    }
    if request
        .max_tokens
        .is_some_and(|m| !(1..=MAX_TOKENS).contains(&m))
    {
        return Err(invalid_field(
            "max_tokens",
            format!("max_tokens must be between 1 and {MAX_TOKENS}"),
        ));
    }
    if let Some(name) = &request.personality {
        let personalities = state.bot.personalities();
        if personalities.get(name).is_none() {
            let known: Vec<_> = personalities.names().collect();
            return Err(ApiError::bad_request(
                "unknown_personality",
                format!("Unknown personality {name:?}; known: {}", known.join(", ")),
                Some("personality"),
            ));
        }
    }
    let priority = request.priority.unwrap_or(0);
    if priority > MAX_PRIORITY {
        return Err(invalid_field(
            "priority",
            format!("priority must be between 0 and {MAX_PRIORITY}"),
        ));
    }
    let delay_ms = request.delay_ms.unwrap_or(0);
    if delay_ms > MAX_DELAY_MS {
        return Err(invalid_field(
            "delay_ms",
            format!("delay_ms must be at most {MAX_DELAY_MS} (one week)"),
        ));
    }
    let max_attempts = request.max_attempts.unwrap_or(state.config.max_attempts);
    if !(1..=100).contains(&max_attempts) {
        return Err(invalid_field(
            "max_attempts",
            "max_attempts must be between 1 and 100",
        ));
    }
    let personality = guild_personality(guild, request.personality, "personality")?;
    Ok(NewJob {
        id: request.id,
        user_id: request.user_id,
        guild_id: request.guild_id.map(|(guild, _)| guild),
        conversation_id: request.conversation_id,
        request: ChatRequest {
            prompt,
            history,
            personality,
            temperature: request.temperature.or(guild.and_then(|g| g.temperature)),
            max_tokens: request.max_tokens.or(guild.and_then(|g| g.max_tokens)),
            model: guild.and_then(|g| g.model.clone()),
            instructions: guild.and_then(|g| g.instructions.clone()),
            conversation: Vec::new(),
        },
        priority,
        delay_ms,
        max_attempts,
        idempotency_key: request.idempotency_key,
        request_id: request.request_id,
    })
}
