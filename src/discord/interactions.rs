//! `POST /discord/interactions`: verify, then PING, `/ask`, `/reset` or `/quota`.
//!
//! - Every request is checked first (Ed25519 over the timestamp and the raw body, the
//!   timestamp within 5 minutes); a request that fails gets 401 and changes nothing.
//! - `/ask prompt [personality]` answers `{"type": 5}` (deferred: Discord shows "thinking…")
//!   before any upstream call. The job is the Discord user's, in the guild, in the channel's
//!   conversation, through the same admission (limit, quota), validation and cache as any
//!   submission; its delivery is in the store's outbox before the job is pushed, so a reply
//!   is never lost to a restart (`crate::outbox` edits the response when the job is done).
//! - A refusal (validation, rate limit, quota) answers at once, ephemeral: type 4, flags 64.
//! - `/reset` forgets the channel's conversation; `/quota` tells the caller what is left.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::domain::{Delivery, DeliveryState, GLOBAL_GUILD, Target, utc_day_start};
use crate::http::error::ApiError;
use crate::http::submission::{self, Content, SubmitRequest};
use crate::http::{AppState, jobs};

/// An interaction token is valid this long after the interaction.
pub const TOKEN_LIFETIME_MS: u64 = 15 * 60_000;

#[derive(Debug, Deserialize)]
struct Interaction {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    guild_id: Option<String>,
    #[serde(default)]
    channel_id: Option<String>,
    #[serde(default)]
    member: Option<Member>,
    #[serde(default)]
    user: Option<User>,
    #[serde(default)]
    data: Option<CommandData>,
}

#[derive(Debug, Deserialize)]
struct Member {
    user: User,
}

#[derive(Debug, Deserialize)]
struct User {
    id: String,
}

#[derive(Debug, Deserialize)]
struct CommandData {
    name: String,
    #[serde(default)]
    options: Vec<CommandOption>,
}

#[derive(Debug, Deserialize)]
struct CommandOption {
    name: String,
    #[serde(default)]
    value: Option<Value>,
}

impl CommandData {
    fn text(&self, name: &str) -> Option<String> {
        self.options
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| o.value.as_ref())
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// An answer only the caller sees.
fn ephemeral(content: impl Into<String>) -> Response {
    Json(json!({"type": 4, "data": {"content": content.into(), "flags": 64, "allowed_mentions": {"parse": []}}}))
        .into_response()
}

fn refusal(error: &ApiError) -> Response {
    ephemeral(error.body().message().to_owned())
}

fn bad_request(message: &str) -> Response {
    ApiError::bad_request("invalid_interaction", message, None).into_response()
}

/// `POST /discord/interactions`
#[utoipa::path(post, path = "/discord/interactions", tag = "discord",
    request_body(content = Object, description = "A Discord interaction, signed by Discord"),
    responses(
        (status = 200, description = "PONG, a deferred response, or an ephemeral refusal", body = Object),
        (status = 400, description = "Not an interaction", body = crate::http::error::ErrorBody),
        (status = 401, description = "A missing, wrong or stale signature", body = crate::http::error::ErrorBody),
        (status = 404, description = "Discord is not configured", body = crate::http::error::ErrorBody),
        (status = 413, description = "Body over the limit", body = crate::http::error::ErrorBody),
        (status = 408, description = "The request took too long", body = crate::http::error::ErrorBody),
        (status = 500, description = "Internal failure", body = crate::http::error::ErrorBody),
        (status = 503, description = "The store cannot take it now", body = crate::http::error::ErrorBody)))]
pub async fn interactions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(discord) = state.config.discord.clone() else {
        return ApiError::NotFound {
            message: "Discord interactions are off: start chatq with --discord-public-key"
                .to_owned(),
            code: "not_found",
        }
        .into_response();
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now_secs = state.clock.now_ms() / 1_000;
    if let Err(refused) = discord.public_key.verify(
        header("x-signature-ed25519"),
        header("x-signature-timestamp"),
        &body,
        now_secs,
    ) {
        tracing::warn!(reason = %refused, "a Discord interaction was refused");
        return ApiError::Unauthorized.into_response();
    }
    let Ok(interaction) = serde_json::from_slice::<Interaction>(&body) else {
        return bad_request("The body is not a Discord interaction");
    };
    match interaction.kind {
        1 => Json(json!({"type": 1})).into_response(),
        2 => match command(&state, &discord.application_id, interaction).await {
            Ok(response) | Err(response) => response,
        },
        _ => bad_request("Only PING and application commands are handled"),
    }
}

async fn command(
    state: &AppState,
    application_id: &str,
    interaction: Interaction,
) -> Result<Response, Response> {
    let Some(data) = &interaction.data else {
        return Err(bad_request("An application command without data"));
    };
    let user = interaction
        .member
        .as_ref()
        .map(|m| m.user.id.clone())
        .or_else(|| interaction.user.as_ref().map(|u| u.id.clone()))
        .ok_or_else(|| bad_request("An interaction without a user"))?;
    let guild = interaction.guild_id.clone();
    let store_failed = |e: ApiError| e.into_response();
    match data.name.as_str() {
        "ask" => ask(state, application_id, &interaction, data, user, guild).await,
        "reset" => {
            let Some(channel) = &interaction.channel_id else {
                return Ok(ephemeral("There is no conversation here to forget."));
            };
            let removed = state
                .store
                .forget(guild.as_deref().unwrap_or(GLOBAL_GUILD), channel)
                .await
                .map_err(|e| store_failed(e.into()))?;
            Ok(ephemeral(format!(
                "Forgot this channel's conversation ({removed} exchanges)."
            )))
        }
        "quota" => {
            let settings = match &guild {
                Some(g) => state
                    .store
                    .guild(g)
                    .await
                    .map_err(|e| store_failed(e.into()))?,
                None => None,
            };
            let (Some(guild), Some(quota)) = (
                guild.as_deref(),
                settings.and_then(|g| g.settings.daily_token_quota),
            ) else {
                return Ok(ephemeral("There is no daily token quota here."));
            };
            let used = state
                .store
                .tokens_spent(guild, &user, utc_day_start(state.clock.now_ms()))
                .await
                .map_err(|e| store_failed(e.into()))?;
            Ok(ephemeral(format!(
                "You have {} of {quota} tokens left today (resets at 00:00 UTC).",
                quota.saturating_sub(used)
            )))
        }
        other => Ok(ephemeral(format!("Unknown command /{other}."))),
    }
}

async fn ask(
    state: &AppState,
    application_id: &str,
    interaction: &Interaction,
    data: &CommandData,
    user: String,
    guild: Option<String>,
) -> Result<Response, Response> {
    let Some(token) = interaction.token.clone() else {
        return Err(bad_request("An interaction without a token"));
    };
    let (admission, allowed) = submission::admit(state, &user, guild.as_deref())
        .await
        .map_err(IntoResponse::into_response)?;
    if let Err(refused) = allowed {
        return Ok(refusal(&refused));
    }
    let id = Uuid::new_v4();
    let mut request = SubmitRequest::new(
        user,
        Content::Prompt {
            prompt: data.text("prompt").unwrap_or_default(),
            history: Vec::new(),
        },
    );
    request.guild_id = guild.map(|g| (g, "guild_id"));
    request.conversation_id = interaction.channel_id.clone();
    request.personality = data.text("personality");
    request.id = Some(id);
    let settings = admission.settings();
    let mut new = match submission::parse(state, request, settings) {
        Ok(new) => new,
        Err(refused) => return Ok(refusal(&refused)),
    };
    submission::fill_history(state, settings, &mut new)
        .await
        .map_err(IntoResponse::into_response)?;
    let now = state.clock.now_ms();
    // The delivery first: once the job exists, its reply has somewhere to go, whatever
    // happens to this process.
    let delivery = Delivery {
        id: Uuid::new_v4(),
        job_id: id,
        target: Target::Discord {
            application_id: application_id.to_owned(),
            token,
        },
        state: DeliveryState::Pending,
        attempts: 0,
        sent: 0,
        created_at: now,
        next_at: now,
        expires_at: now + TOKEN_LIFETIME_MS,
        last_error: None,
        fallback: false,
    };
    state
        .store
        .add_delivery(&delivery)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    let (_, hit) = jobs::consult_cache(state, &new, settings).await;
    jobs::push(state, new, hit)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(Json(json!({"type": 5})).into_response())
}
