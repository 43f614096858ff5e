//! `/v1/chat/jobs`: submit, read (with long-poll), cancel, admin retry and listing.
//!
//! Submission order: parse the body, check the user id, count the request against the
//! user's limit, validate the rest, push. Nothing is written before every check passed.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::error::{ApiError, ApiJson, ApiQuery};
use super::state::AppState;
use super::submission::{self, Admission, Content, SubmitRequest, check_id};
use crate::cache::{self, Verdict};
use crate::domain::{
    Delivery, DeliveryState, GuildSettings, Job, JobError, JobResult, JobState, NewJob, Usage,
};
use crate::limiter::Decision;
use crate::signals::Subscription;
use crate::store::Pushed;

/// Longest `?wait`, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

/// A chat job submission.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    pub user_id: String,
    #[serde(default)]
    pub guild_id: Option<String>,
    #[serde(default)]
    pub conversation_id: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    /// Alternative to `prompt`: a conversation whose last message is the user's.
    #[serde(default)]
    pub messages: Option<Vec<Value>>,
    /// Earlier messages when `prompt` is used.
    #[serde(default)]
    pub history: Option<Vec<Value>>,
    #[serde(default)]
    pub personality: Option<String>,
    #[serde(default)]
    pub priority: Option<u32>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Where to POST the finished job (signed, Standard Webhooks); its host must be allowed
    /// by `--webhook-allow-host`.
    #[serde(default)]
    pub callback_url: Option<String>,
}

impl SubmitBody {
    /// The body as a submission; `prompt` and `messages` are two forms of one thing.
    pub fn into_request(self, request_id: Option<String>) -> Result<SubmitRequest, ApiError> {
        let content = match (self.prompt, self.messages) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "Give either prompt or messages, not both",
                    Some("messages"),
                ));
            }
            (Some(prompt), None) => Content::Prompt {
                prompt,
                history: self.history.unwrap_or_default(),
            },
            (None, Some(messages)) => {
                if self.history.is_some() {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        "history goes with prompt; with messages, put the history in messages",
                        Some("history"),
                    ));
                }
                Content::Messages(messages)
            }
            (None, None) => {
                return Err(ApiError::bad_request(
                    "missing_prompt",
                    "A prompt is required",
                    Some("prompt"),
                ));
            }
        };
        let mut request = SubmitRequest::new(self.user_id, content);
        request.guild_id = self.guild_id.map(|g| (g, "guild_id"));
        request.conversation_id = self.conversation_id;
        request.personality = self.personality;
        request.priority = self.priority;
        request.delay_ms = self.delay_ms;
        request.idempotency_key = self.idempotency_key;
        request.max_attempts = self.max_attempts;
        request.request_id = request_id;
        Ok(request)
    }
}

/// The request id the front door attached.
pub fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Adds the rate-limit headers to any answer of a limited route.
/// (Named once: a header name given as `&str` is parsed and copied into a new allocation on
/// every insert, three times per answer.)
pub fn with_rate_headers(mut response: Response, decision: &Decision) -> Response {
    const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
    const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
    const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
    let h = response.headers_mut();
    h.insert(LIMIT, HeaderValue::from(decision.limit));
    h.insert(REMAINING, HeaderValue::from(decision.remaining));
    h.insert(RESET, HeaderValue::from(decision.reset_secs));
    response
}

/// Adds `x-chatq-cache` to an answer.
pub fn with_cache_header(mut response: Response, verdict: Verdict) -> Response {
    const CACHE: HeaderName = HeaderName::from_static(cache::HEADER);
    response
        .headers_mut()
        .insert(CACHE, HeaderValue::from_static(verdict.as_str()));
    response
}

/// What the response cache says about `new`: its verdict, and the job's result on a hit. A
/// delayed job is looked up when it runs, not now.
pub async fn consult_cache(
    state: &AppState,
    new: &NewJob,
    guild: Option<&GuildSettings>,
) -> (Verdict, Option<JobResult>) {
    let Some(terms) = state
        .cache
        .terms(guild, new.guild_id.as_deref(), &new.request)
    else {
        return (Verdict::Off, None);
    };
    if new.delay_ms > 0 {
        return (Verdict::Miss, None);
    }
    match state.cache.lookup(&terms).await {
        Some(result) => (Verdict::Hit, Some(result)),
        None => (Verdict::Miss, None),
    }
}

/// Adds `new` to the store: queued, or, when the cache held its reply (`hit`), completed at
/// once with it. Counts what was accepted.
pub async fn push(
    state: &AppState,
    new: NewJob,
    hit: Option<JobResult>,
) -> Result<Pushed, ApiError> {
    let pushed = match hit {
        Some(result) => {
            let pushed = state.store.push_finished(new, result).await?;
            if pushed.created {
                state.cache.count(Verdict::Hit);
                state.metrics.job_completed(false);
            }
            pushed
        }
        None => state.store.push(new).await?,
    };
    if pushed.created {
        state.metrics.jobs_accepted.inc();
    }
    Ok(pushed)
}

/// A job as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub status: JobState,
    pub user_id: String,
    pub guild_id: Option<String>,
    pub conversation_id: Option<String>,
    pub prompt: String,
    pub personality: Option<String>,
    pub priority: u32,
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// When a delayed job is due.
    pub run_at: Option<String>,
    pub result: Option<ResultView>,
    pub error: Option<JobError>,
    /// Where the reply is being sent (a Discord interaction), and how that went.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deliveries: Vec<DeliveryView>,
}

/// A delivery as the job view shows it (never its target's token).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    /// `discord` or `webhook`
    pub kind: &'static str,
    pub state: DeliveryState,
    pub attempts: u32,
    /// Pieces of the reply delivered so far.
    pub sent: u32,
    /// The reply was the fallback: the job took too long.
    pub fallback: bool,
    pub last_error: Option<String>,
    /// `pending`: when the next attempt is due (for one under way, when it counts as lost
    /// and is tried again). Not set while `waiting` (the job's finish sets it) or ended.
    pub next_attempt_at: Option<String>,
    /// When chatq gives up on it (Discord's token expires 15 minutes after the interaction;
    /// a webhook is retried for 24 hours).
    pub expires_at: String,
}

impl From<&Delivery> for DeliveryView {
    fn from(d: &Delivery) -> Self {
        Self {
            kind: d.target.kind(),
            state: d.state,
            attempts: d.attempts,
            sent: d.sent,
            fallback: d.fallback,
            last_error: d.last_error.clone(),
            next_attempt_at: (d.state == DeliveryState::Pending).then(|| rfc3339(d.next_at)),
            expires_at: rfc3339(d.expires_at),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResultView {
    pub reply: String,
    pub used_fallback: bool,
    pub model: String,
    pub usage: Option<Usage>,
    pub processed_at: String,
    /// The reply came from the response cache.
    pub cached: bool,
}

/// Milliseconds since the epoch as RFC 3339.
pub fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

impl ResultView {
    pub fn from_result(r: &JobResult) -> Self {
        Self {
            reply: r.reply.clone(),
            used_fallback: r.used_fallback,
            model: r.model.clone(),
            usage: r.usage,
            processed_at: rfc3339(r.processed_at),
            cached: r.cached,
        }
    }
}

impl From<&Job> for JobView {
    fn from(job: &Job) -> Self {
        Self {
            id: job.id,
            status: job.state,
            user_id: job.user_id.clone(),
            guild_id: job.guild_id.clone(),
            conversation_id: job.conversation_id.clone(),
            prompt: job.request.prompt.clone(),
            personality: job.request.personality.clone(),
            priority: job.priority,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            created_at: rfc3339(job.created_at),
            started_at: job.started_at.map(rfc3339),
            finished_at: job.finished_at.map(rfc3339),
            run_at: (job.state == JobState::Delayed).then(|| rfc3339(job.run_at)),
            result: job.result.as_ref().map(ResultView::from_result),
            error: job.error.clone(),
            deliveries: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    id: Uuid,
    status: JobState,
    /// False when an idempotency key matched an earlier job, which is returned instead.
    created: bool,
}

/// `POST /v1/chat/jobs`
#[utoipa::path(post, path = "/v1/chat/jobs", tag = "jobs", request_body = SubmitBody, security((), ("bearer" = [])),
    responses(
        (status = 202, description = "Accepted (or answered from the cache: `status` completed)", body = Accepted),
        (status = 200, description = "The same idempotency key: the first job", body = Accepted), crate::http::error::ApiErrors))]
pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SubmitBody>,
) -> Result<Response, ApiError> {
    let (admission, pushed) = submit_job(&state, body, "user_id", &headers).await?;
    let result = pushed.map(|(pushed, verdict)| {
        let status = if pushed.created {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
        let location = format!("/v1/chat/jobs/{}", pushed.job.id);
        let mut response = (
            status,
            Json(Accepted {
                id: pushed.job.id,
                status: pushed.job.state,
                created: pushed.created,
            }),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, v);
        }
        with_cache_header(response, verdict)
    });
    Ok(admission.headers(result.into_response()))
}

/// The submit flow both job routes share (see `submission`): check the user id (reported
/// as `user_param`), admit (guild, limit, quota), check the rest, fill a conversation's
/// history, consult the cache, push. Returns the admission, for the headers of whatever the
/// route answers, and the pushed job with the cache's verdict, or why not.
pub async fn submit_job(
    state: &AppState,
    body: SubmitBody,
    user_param: &str,
    headers: &HeaderMap,
) -> Result<(Admission, Result<(Pushed, Verdict), ApiError>), ApiError> {
    check_id(user_param, &body.user_id)?;
    let guild_id = body.guild_id.clone();
    let callback_url = body.callback_url.clone();
    let (admission, allowed) = submission::admit(state, &body.user_id, guild_id.as_deref()).await?;
    let pushed = async {
        allowed?;
        let guild = admission.settings();
        let mut new = submission::parse(state, body.into_request(request_id(headers))?, guild)?;
        let callback =
            match &callback_url {
                Some(url) => Some(state.config.webhook.check(url).map_err(|message| {
                    ApiError::Validation {
                        message,
                        code: "callback_not_allowed",
                        param: Some("callback_url".to_owned()),
                    }
                })?),
                None => None,
            };
        submission::fill_history(state, guild, &mut new).await?;
        let mut owed = None;
        if let Some(url) = callback {
            // The delivery before the job: once the job exists, its callback is owed.
            let id = *new.id.get_or_insert_with(Uuid::new_v4);
            let now = state.clock.now_ms();
            let delivery = Delivery {
                id: Uuid::new_v4(),
                job_id: id,
                target: crate::domain::Target::Webhook {
                    url: url.to_string(),
                },
                state: DeliveryState::Pending,
                attempts: 0,
                sent: 0,
                created_at: now,
                next_at: now,
                expires_at: now + new.delay_ms + crate::webhook::RETRY_FOR_MS,
                last_error: None,
                fallback: false,
            };
            state.store.add_delivery(&delivery).await?;
            owed = Some(delivery);
        }
        let (verdict, hit) = consult_cache(state, &new, guild).await;
        let pushed = push(state, new, hit).await?;
        if let Some(mut delivery) = owed.filter(|_| !pushed.created) {
            // A repeat of an idempotency key makes no job: the first submit's callback is the
            // one owed, and this one is closed at once rather than left to wait for a job
            // that will never exist.
            delivery.state = DeliveryState::Failed;
            delivery.last_error = Some(format!(
                "a repeat of job {}, whose own callback is the one sent",
                pushed.job.id
            ));
            state.store.save_delivery(&delivery).await?;
        }
        Ok((pushed, verdict))
    }
    .await;
    Ok((admission, pushed))
}

pub fn parse_job_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::job_not_found())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Hold the request up to this many seconds (at most 60) until the job is finished.
    #[serde(default)]
    wait: Option<u64>,
}

/// The one long-poll: waits on `subscription` (taken before the job was last read or pushed,
/// so a finish in between is not missed) until job `id` finishes, `wait` passes or shutdown
/// begins, then answers the job as the store has it.
pub async fn await_finish(
    state: &AppState,
    subscription: &mut Subscription,
    id: Uuid,
    wait: Duration,
) -> Result<Job, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    // On a shared store another replica may finish the job, which this process's signals may
    // miss: re-read it as often as the workers look for work.
    let poll = state.config.worker.poll;
    let mut listening = true;
    loop {
        let next = poll.map_or(deadline, |p| deadline.min(tokio::time::Instant::now() + p));
        tokio::select! {
            finished = subscription.finished(), if listening => match finished {
                Some(job) => return Ok(job),
                // Nothing more will come this way; the deadline or a re-read ends the wait.
                None => listening = false,
            },
            _ = tokio::time::sleep_until(next) => {}
            _ = state.shutdown.cancelled() => {}
        }
        let job = state
            .store
            .get(id)
            .await?
            .ok_or_else(ApiError::job_not_found)?;
        if job.state.is_terminal()
            || tokio::time::Instant::now() >= deadline
            || state.shutdown.is_cancelled()
        {
            return Ok(job);
        }
    }
}

/// Reads a job, holding the request up to `wait_secs` (at most 60) until it is finished.
pub async fn wait_for_job(state: &AppState, id: Uuid, wait_secs: u64) -> Result<Job, ApiError> {
    let mut subscription = state.signals.finished.subscribe(id);
    let job = state
        .store
        .get(id)
        .await?
        .ok_or_else(ApiError::job_not_found)?;
    if job.state.is_terminal() || wait_secs == 0 {
        return Ok(job);
    }
    let wait = Duration::from_secs(wait_secs.min(MAX_WAIT_SECS));
    await_finish(state, &mut subscription, id, wait).await
}

/// `GET /v1/chat/jobs/{id}?wait=N`
#[utoipa::path(get, path = "/v1/chat/jobs/{id}", tag = "jobs", security((), ("bearer" = [])),
    params(("id" = String, Path, description = "The job id"), WaitQuery),
    responses((status = 200, body = JobView), crate::http::error::ApiErrors))]
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_job_id(&id)?;
    let job = wait_for_job(&state, id, query.wait.unwrap_or(0)).await?;
    let mut view = JobView::from(&job);
    view.deliveries = state
        .store
        .deliveries(id)
        .await?
        .iter()
        .map(DeliveryView::from)
        .collect();
    Ok(Json(view))
}

/// `DELETE /v1/chat/jobs/{id}`
#[utoipa::path(delete, path = "/v1/chat/jobs/{id}", tag = "jobs", security((), ("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses((status = 200, body = JobView), crate::http::error::ApiErrors))]
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_job_id(&id)?;
    let job = state.store.cancel(id).await?;
    Ok(Json(JobView::from(&job)))
}

/// `POST /v1/chat/jobs/{id}/retry` (admin)
#[utoipa::path(post, path = "/v1/chat/jobs/{id}/retry", tag = "admin", security((), ("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses((status = 200, body = JobView), crate::http::error::ApiErrors))]
pub async fn retry_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_job_id(&id)?;
    let job = state.store.retry(id).await?;
    Ok(Json(JobView::from(&job)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    state: JobState,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobList {
    data: Vec<JobView>,
}

/// `GET /v1/chat/jobs?state=failed&limit=20` (admin)
#[utoipa::path(get, path = "/v1/jobs", tag = "admin", security((), ("bearer" = [])), params(ListQuery),
    responses((status = 200, body = JobList), crate::http::error::ApiErrors))]
pub async fn list_jobs(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<JobList>, ApiError> {
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let jobs = state.store.list(query.state, limit).await?;
    Ok(Json(JobList {
        data: jobs.iter().map(JobView::from).collect(),
    }))
}
