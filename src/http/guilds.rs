//! Guild settings (DESIGN §15), admin: `GET /v1/guilds`, `GET`/`PUT`/`DELETE
//! /v1/guilds/{guild_id}`.
//!
//! A `PUT` replaces the guild's settings with the body: every field optional, `null` or
//! absent meaning "the server's flag". Each field is checked (a wrong type, an out-of-range
//! value, an unknown personality or field: 422 naming the `param`) before anything is
//! written. Settings live in the store, so the next request on every replica sees them.

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::{ApiError, ApiJson};
use super::jobs::rfc3339;
use super::state::AppState;
use super::submission::{MAX_TOKENS, check_id};
use crate::domain::{Guild, GuildSettings, RateLimitSetting};

/// Longest guild instructions, in characters.
pub const MAX_INSTRUCTIONS_CHARS: usize = 2_000;
/// Most exchanges of a conversation a guild may send upstream.
pub const MAX_HISTORY_TURNS: u64 = 50;
/// Longest model name.
const MAX_MODEL_CHARS: usize = 128;

/// A guild as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GuildView {
    pub guild_id: String,
    pub settings: GuildSettings,
    pub updated_at: String,
}

impl From<Guild> for GuildView {
    fn from(g: Guild) -> Self {
        Self {
            guild_id: g.guild_id,
            settings: g.settings,
            updated_at: rfc3339(g.updated_at),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GuildList {
    pub data: Vec<GuildView>,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::Validation {
        message: message.into(),
        code: "invalid_setting",
        param: Some(param.to_owned()),
    }
}

fn integer(value: &Value, param: &str, min: u64, max: u64) -> Result<u64, ApiError> {
    value
        .as_u64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            invalid(
                param,
                format!("{param} must be a whole number from {min} to {max}"),
            )
        })
}

fn text<'a>(value: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    value
        .as_str()
        .ok_or_else(|| invalid(param, format!("{param} must be a string")))
}

/// Checks a `PUT` body and turns it into settings.
pub fn settings_from(
    state: &AppState,
    body: Map<String, Value>,
) -> Result<GuildSettings, ApiError> {
    let known = |name: &str| state.bot.personalities().get(name).is_some();
    let personality_names = || {
        state
            .bot
            .personalities()
            .names()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut settings = GuildSettings::default();
    for (field, value) in &body {
        if value.is_null() {
            continue;
        }
        let field = field.as_str();
        match field {
            "personality" => {
                let name = text(value, field)?;
                if !known(name) {
                    return Err(invalid(
                        field,
                        format!(
                            "Unknown personality {name:?}; known: {}",
                            personality_names()
                        ),
                    ));
                }
                settings.personality = Some(name.to_owned());
            }
            "instructions" => {
                let instructions = text(value, field)?;
                if instructions.chars().count() > MAX_INSTRUCTIONS_CHARS {
                    return Err(invalid(
                        field,
                        format!("instructions must be at most {MAX_INSTRUCTIONS_CHARS} characters"),
                    ));
                }
                let trimmed = instructions.trim();
                settings.instructions = (!trimmed.is_empty()).then(|| trimmed.to_owned());
            }
            "model" => {
                let model = text(value, field)?;
                if model.is_empty()
                    || model.chars().count() > MAX_MODEL_CHARS
                    || model.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(invalid(
                        field,
                        format!("model must be 1 to {MAX_MODEL_CHARS} characters without spaces"),
                    ));
                }
                settings.model = Some(model.to_owned());
            }
            "temperature" => {
                let t = value
                    .as_f64()
                    .filter(|t| (0.0..=2.0).contains(t))
                    .ok_or_else(|| invalid(field, "temperature must be a number from 0 to 2"))?;
                settings.temperature = Some(t as f32);
            }
            "max_tokens" => {
                settings.max_tokens = Some(integer(value, field, 1, u64::from(MAX_TOKENS))? as u32);
            }
            "rate_limit" => {
                let Some(limit) = value.as_object() else {
                    return Err(invalid(field, "rate_limit must be {limit, window_secs}"));
                };
                if let Some(other) = limit
                    .keys()
                    .find(|k| !["limit", "window_secs"].contains(&k.as_str()))
                {
                    return Err(invalid(
                        &format!("rate_limit.{other}"),
                        "rate_limit has only limit and window_secs",
                    ));
                }
                let get = |name: &str| limit.get(name).unwrap_or(&Value::Null);
                settings.rate_limit = Some(RateLimitSetting {
                    limit: integer(get("limit"), "rate_limit.limit", 1, 1_000_000)? as u32,
                    window_secs: integer(get("window_secs"), "rate_limit.window_secs", 1, 86_400)?,
                });
            }
            "daily_token_quota" => {
                settings.daily_token_quota = Some(integer(value, field, 1, 1_000_000_000_000)?);
            }
            "cache_ttl_secs" => {
                settings.cache_ttl_secs = Some(integer(value, field, 0, 31_536_000)?);
            }
            "history_turns" => {
                settings.history_turns = Some(integer(value, field, 0, MAX_HISTORY_TURNS)? as u32);
            }
            "allowed_personalities" => {
                let Some(list) = value.as_array().filter(|l| !l.is_empty()) else {
                    return Err(invalid(
                        field,
                        "allowed_personalities must be a non-empty list of personality names",
                    ));
                };
                let mut names = Vec::with_capacity(list.len());
                for (i, name) in list.iter().enumerate() {
                    let param = format!("allowed_personalities[{i}]");
                    let name = text(name, &param)?;
                    if !known(name) {
                        return Err(invalid(
                            &param,
                            format!(
                                "Unknown personality {name:?}; known: {}",
                                personality_names()
                            ),
                        ));
                    }
                    if !names.iter().any(|n| n == name) {
                        names.push(name.to_owned());
                    }
                }
                settings.allowed_personalities = Some(names);
            }
            other => {
                return Err(ApiError::Validation {
                    message: format!("Unknown setting {other:?}"),
                    code: "unknown_setting",
                    param: Some(other.to_owned()),
                });
            }
        }
    }
    if let (Some(default), Some(allowed)) = (&settings.personality, &settings.allowed_personalities)
    {
        if !allowed.contains(default) {
            return Err(invalid(
                "personality",
                "personality must be one of allowed_personalities",
            ));
        }
    }
    Ok(settings)
}

fn guild_not_found(guild_id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("Guild {guild_id:?} has no settings; PUT them to create them"),
        code: "guild_not_found",
    }
}

/// `GET /v1/guilds`
#[utoipa::path(get, path = "/v1/guilds", tag = "guilds", security((), ("bearer" = [])),
    responses((status = 200, body = GuildList), crate::http::error::ApiErrors))]
pub async fn list(State(state): State<AppState>) -> Result<Json<GuildList>, ApiError> {
    let guilds = state.store.guilds().await?;
    Ok(Json(GuildList {
        data: guilds.into_iter().map(GuildView::from).collect(),
    }))
}

/// `GET /v1/guilds/{guild_id}`
#[utoipa::path(get, path = "/v1/guilds/{guild_id}", tag = "guilds", security((), ("bearer" = [])),
    params(("guild_id" = String, Path, description = "The guild id")),
    responses((status = 200, body = GuildView), crate::http::error::ApiErrors))]
pub async fn get(
    State(state): State<AppState>,
    Path(guild_id): Path<String>,
) -> Result<Json<GuildView>, ApiError> {
    check_id("guild_id", &guild_id)?;
    let guild = state
        .store
        .guild(&guild_id)
        .await?
        .ok_or_else(|| guild_not_found(&guild_id))?;
    Ok(Json(guild.into()))
}

/// `PUT /v1/guilds/{guild_id}`
#[utoipa::path(put, path = "/v1/guilds/{guild_id}", tag = "guilds", security((), ("bearer" = [])),
    params(("guild_id" = String, Path, description = "The guild id")), request_body = GuildSettings,
    responses((status = 200, body = GuildView), crate::http::error::ApiErrors))]
pub async fn put(
    State(state): State<AppState>,
    Path(guild_id): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<GuildView>, ApiError> {
    check_id("guild_id", &guild_id)?;
    let Value::Object(body) = body else {
        return Err(ApiError::bad_request(
            "invalid_request",
            "The settings must be a JSON object",
            None,
        ));
    };
    let settings = settings_from(&state, body)?;
    let guild = state.store.put_guild(&guild_id, &settings).await?;
    tracing::info!(guild_id = %guild_id, "guild settings saved");
    Ok(Json(guild.into()))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Deleted {
    pub deleted: bool,
}

/// `DELETE /v1/guilds/{guild_id}`
#[utoipa::path(delete, path = "/v1/guilds/{guild_id}", tag = "guilds", security((), ("bearer" = [])),
    params(("guild_id" = String, Path, description = "The guild id")),
    responses((status = 200, body = Deleted), crate::http::error::ApiErrors))]
pub async fn delete(
    State(state): State<AppState>,
    Path(guild_id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    check_id("guild_id", &guild_id)?;
    if !state.store.delete_guild(&guild_id).await? {
        return Err(guild_not_found(&guild_id));
    }
    tracing::info!(guild_id = %guild_id, "guild settings removed");
    Ok(Json(Deleted { deleted: true }))
}
