//! One submission, parsed once: every route that submits work (`/v1/chat/jobs`,
//! `/api/chat/bot`, `/v1/chat/completions`) phrases its body as a [`SubmitRequest`] and turns
//! it into a checked [`NewJob`] here, so a rule, its order and its message exist once.
//!
//! Order of the checks (the first failure wins): the ids (guild, conversation, idempotency
//! key), the content (prompt or messages, each message by the rules of `validate.rs`), the
//! sampling parameters, the personality, then the queue options (priority, delay, attempts).
//! The user id is checked by the route before the rate limit, since it is the limit's key.

use serde_json::Value;
use uuid::Uuid;

use super::error::ApiError;
use super::state::AppState;
use crate::domain::{ChatRequest, Message, NewJob, Role};
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

/// Turns a submission into a job for the queue, or says what is wrong with it.
pub fn parse(state: &AppState, request: SubmitRequest) -> Result<NewJob, ApiError> {
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
    Ok(NewJob {
        id: request.id,
        user_id: request.user_id,
        guild_id: request.guild_id.map(|(guild, _)| guild),
        conversation_id: request.conversation_id,
        request: ChatRequest {
            prompt,
            history,
            personality: request.personality,
            temperature: request.temperature,
            max_tokens: request.max_tokens,
            model: None,
            instructions: None,
        },
        priority,
        delay_ms,
        max_attempts,
        idempotency_key: request.idempotency_key,
        request_id: request.request_id,
    })
}
