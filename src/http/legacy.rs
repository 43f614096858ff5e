//! The replaced Node.js system's routes, with its request and response shapes, so its
//! clients keep working: `POST /api/chat/bot` and `GET /api/chat/jobs/{id}`.
//!
//! It took camelCase fields (`userId`, `guildId`) and answered `{ok, jobId, status}`; job
//! states use BullMQ's names (`waiting` for queued). Errors use chatq's one error shape,
//! with the codes the old system used (`job_not_found`, `missing_prompt`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ApiError, ApiJson};
use super::jobs::{self, ResultView, SubmitBody};
use super::state::AppState;
use crate::domain::JobState;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LegacyBody {
    #[serde(alias = "user_id")]
    #[serde(rename = "userId")]
    user_id: String,
    #[serde(default, alias = "guild_id", rename = "guildId")]
    guild_id: Option<String>,
    #[serde(default, alias = "message")]
    prompt: Option<String>,
    #[serde(default)]
    personality: Option<String>,
    #[serde(default)]
    history: Option<Vec<Value>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegacyAccepted {
    ok: bool,
    job_id: String,
    status: &'static str,
}

/// `POST /api/chat/bot`
#[utoipa::path(post, path = "/api/chat/bot", tag = "legacy", request_body = LegacyBody, security((), ("bearer" = [])),
    responses((status = 202, body = LegacyAccepted), crate::http::error::ApiErrors))]
pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LegacyBody>,
) -> Result<Response, ApiError> {
    let submission = SubmitBody {
        user_id: body.user_id,
        guild_id: body.guild_id,
        prompt: Some(body.prompt.unwrap_or_default()),
        history: body.history,
        personality: body.personality,
        ..SubmitBody::default()
    };
    let (admission, pushed) = jobs::submit_job(&state, submission, "userId", &headers).await?;
    let result = pushed.map(|(pushed, verdict)| {
        let response = (
            StatusCode::ACCEPTED,
            Json(LegacyAccepted {
                ok: true,
                job_id: pushed.job.id.to_string(),
                // What the replaced system said of every new job; `completed` when the reply
                // came from the cache.
                status: if pushed.job.state == JobState::Completed {
                    "completed"
                } else {
                    "queued"
                },
            }),
        );
        jobs::with_cache_header(response.into_response(), verdict)
    });
    Ok(admission.headers(result.into_response()))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegacyJob {
    ok: bool,
    job_id: String,
    state: &'static str,
    attempts_made: u32,
    result: Option<ResultView>,
    failed_reason: Option<String>,
    timestamp: u64,
    processed_on: Option<u64>,
    finished_on: Option<u64>,
}

fn bullmq_state(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "waiting",
        JobState::Delayed => "delayed",
        JobState::Active => "active",
        JobState::Completed => "completed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// `GET /api/chat/jobs/{id}`
#[utoipa::path(get, path = "/api/chat/jobs/{id}", tag = "legacy", security((), ("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses((status = 200, body = LegacyJob), crate::http::error::ApiErrors))]
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = jobs::parse_job_id(&id)?;
    let job = state
        .store
        .get(id)
        .await?
        .ok_or_else(ApiError::job_not_found)?;
    Ok(Json(LegacyJob {
        ok: true,
        job_id: job.id.to_string(),
        state: bullmq_state(job.state),
        attempts_made: job.attempts,
        result: job.result.as_ref().map(ResultView::from_result),
        failed_reason: job.error.as_ref().map(|e| e.message.clone()),
        timestamp: job.created_at,
        processed_on: job.started_at,
        finished_on: job.finished_at,
    })
    .into_response())
}
