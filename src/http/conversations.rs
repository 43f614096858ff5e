//! Server-side conversations (DESIGN §15), client routes: `GET /v1/conversations/{id}` lists
//! a conversation's turns, `DELETE` forgets them. `?guild_id=` names the guild (none: the
//! conversations outside any guild); the same id in two guilds is two conversations.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiQuery};
use super::jobs::rfc3339;
use super::state::AppState;
use super::submission::check_id;
use crate::domain::GLOBAL_GUILD;
use crate::store::MAX_TURNS;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConversationQuery {
    guild_id: Option<String>,
}

impl ConversationQuery {
    /// The guild the conversation lives in, checked like a submission's.
    fn guild(&self) -> Result<&str, ApiError> {
        match self.guild_id.as_deref().filter(|g| !g.is_empty()) {
            Some(guild) => {
                check_id("guild_id", guild)?;
                Ok(guild)
            }
            None => Ok(GLOBAL_GUILD),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TurnView {
    pub job_id: uuid::Uuid,
    pub user_id: String,
    pub prompt: String,
    pub reply: String,
    pub at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConversationView {
    pub conversation_id: String,
    pub guild_id: String,
    /// Oldest first.
    pub turns: Vec<TurnView>,
}

/// `GET /v1/conversations/{id}?guild_id=`
#[utoipa::path(get, path = "/v1/conversations/{id}", tag = "conversations", security((), ("bearer" = [])),
    params(("id" = String, Path, description = "The conversation id"), ConversationQuery),
    responses((status = 200, body = ConversationView), crate::http::error::ApiErrors))]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ConversationQuery>,
) -> Result<Json<ConversationView>, ApiError> {
    check_id("conversation_id", &id)?;
    let guild = q.guild()?;
    let turns = state.store.turns(guild, &id, MAX_TURNS).await?;
    Ok(Json(ConversationView {
        conversation_id: id,
        guild_id: guild.to_owned(),
        turns: turns
            .into_iter()
            .map(|t| TurnView {
                job_id: t.job_id,
                user_id: t.user_id,
                prompt: t.prompt,
                reply: t.reply,
                at: rfc3339(t.at),
            })
            .collect(),
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Forgotten {
    pub removed: u64,
}

/// `DELETE /v1/conversations/{id}?guild_id=`: no later prompt sees these turns (the
/// interaction log keeps its own retention).
#[utoipa::path(delete, path = "/v1/conversations/{id}", tag = "conversations", security((), ("bearer" = [])),
    params(("id" = String, Path, description = "The conversation id"), ConversationQuery),
    responses((status = 200, body = Forgotten), crate::http::error::ApiErrors))]
pub async fn forget(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ConversationQuery>,
) -> Result<Json<Forgotten>, ApiError> {
    check_id("conversation_id", &id)?;
    let guild = q.guild()?;
    let removed = state.store.forget(guild, &id).await?;
    tracing::info!(conversation_id = %id, guild_id = %guild, removed, "conversation forgotten");
    Ok(Json(Forgotten { removed }))
}
