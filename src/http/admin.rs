//! Admin routes: queue stats, pause and resume, and the interaction log.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiQuery};
use super::state::AppState;
use crate::store::{Interaction, LogQuery, QueueCounts};

#[derive(Debug, Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub counts: QueueCounts,
    pub workers: usize,
    pub durability: &'static str,
    pub upstream: &'static str,
    pub model: String,
}

/// `GET /v1/queue/stats`
pub async fn stats(State(state): State<AppState>) -> Json<Stats> {
    Json(Stats {
        counts: state.queue.counts(),
        workers: state.config.worker.workers,
        durability: match state.config.store.durability {
            crate::store::Durability::Strict => "strict",
            crate::store::Durability::Relaxed => "relaxed",
        },
        upstream: if state.bot.has_upstream() {
            "openai"
        } else {
            "fallback"
        },
        model: state.bot.model().to_owned(),
    })
}

#[derive(Debug, Serialize)]
pub struct Paused {
    pub paused: bool,
}

/// `POST /v1/queue/pause`
pub async fn pause(State(state): State<AppState>) -> Result<Json<Paused>, ApiError> {
    state.queue.set_paused(true).await?;
    tracing::info!("queue paused");
    Ok(Json(Paused { paused: true }))
}

/// `POST /v1/queue/resume`
pub async fn resume(State(state): State<AppState>) -> Result<Json<Paused>, ApiError> {
    state.queue.set_paused(false).await?;
    tracing::info!("queue resumed");
    Ok(Json(Paused { paused: false }))
}

#[derive(Debug, Default, Deserialize)]
pub struct InteractionsQuery {
    user_id: Option<String>,
    guild_id: Option<String>,
    /// RFC 3339 or milliseconds since the epoch.
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct InteractionPage {
    pub data: Vec<Interaction>,
    pub next_cursor: Option<String>,
}

/// Parses a time given as RFC 3339 or as milliseconds since the epoch.
pub fn parse_time(param: &str, value: &str) -> Result<u64, ApiError> {
    if let Ok(ms) = value.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(value)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("{param} must be an RFC 3339 time or milliseconds since the epoch"),
                Some(param),
            )
        })
}

/// `GET /v1/interactions?user_id=&guild_id=&since=&until=&cursor=&limit=`
pub async fn interactions(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<InteractionsQuery>,
) -> Result<Json<InteractionPage>, ApiError> {
    if let Some(cursor) = &q.cursor {
        if crate::store::interaction::parse_cursor(cursor).is_none() {
            return Err(ApiError::bad_request(
                "invalid_cursor",
                "cursor must be a next_cursor from an earlier page",
                Some("cursor"),
            ));
        }
    }
    let query = LogQuery {
        user_id: q.user_id.filter(|s| !s.is_empty()),
        guild_id: q.guild_id.filter(|s| !s.is_empty()),
        since: q
            .since
            .as_deref()
            .map(|v| parse_time("since", v))
            .transpose()?,
        until: q
            .until
            .as_deref()
            .map(|v| parse_time("until", v))
            .transpose()?,
        cursor: q.cursor,
        limit: q.limit.unwrap_or(50).clamp(1, 500),
    };
    let page = state.queue.query_log(&query)?;
    Ok(Json(InteractionPage {
        data: page.entries,
        next_cursor: page.next_cursor,
    }))
}
