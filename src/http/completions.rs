//! `POST /v1/chat/completions` and `GET /v1/models`: the OpenAI protocol, so any OpenAI client
//! or SDK can use chatq unmodified, through the same validation, per-user limit, durable
//! queue, retries, fallback and interaction log as the job routes.
//!
//! - The per-user key is `user`, else the `X-User-Id` header, else one shared key for the
//!   client token (or for anonymous callers when no token is set). The token itself is never
//!   used as an id, so it never reaches the log.
//! - `model`: `chatq-<personality>` selects a personality (`GET /v1/models` lists them); any
//!   other name uses the default personality and the configured upstream model.
//! - Client `system` messages are accepted after chatq's own system prompt, unless the
//!   operator passed `--refuse-client-system`.
//! - Non-streaming: the request waits for the job and answers a `chat.completion`.
//! - `stream: true`: the job is registered for deltas *before* it is pushed, the worker asks
//!   the upstream to stream, and each delta is forwarded as a `chat.completion.chunk` event as
//!   it arrives, ending with `data: [DONE]`. A client that disconnects does not stop the job.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::error::{ApiError, ApiJson};
use super::jobs::{self, check_id};
use super::state::AppState;
use crate::store::job::{ChatRequest, Message, Role};
use crate::store::{Job, JobState, NewJob};

/// Prefix of the model aliases that select a personality.
pub const ALIAS_PREFIX: &str = "chatq-";

#[derive(Debug, Deserialize)]
pub struct CompletionBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    user: Option<String>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The rate-limit key and recorded user id for a request.
fn user_of(
    state: &AppState,
    body: &CompletionBody,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    if let Some(user) = body.user.as_deref().filter(|u| !u.is_empty()) {
        check_id("user", user)?;
        return Ok(user.to_owned());
    }
    if let Some(user) = header(headers, "x-user-id") {
        check_id("X-User-Id", user)?;
        return Ok(user.to_owned());
    }
    Ok(if state.config.api_token.is_some() {
        "api-client".to_owned()
    } else {
        "anonymous".to_owned()
    })
}

/// Resolves `model` to (personality, the model name to answer with).
fn personality_of(
    state: &AppState,
    model: Option<&str>,
) -> Result<(Option<String>, Option<String>), ApiError> {
    match model {
        Some(alias) if alias.starts_with(ALIAS_PREFIX) => {
            let name = &alias[ALIAS_PREFIX.len()..];
            if state.bot.personalities().get(name).is_none() {
                return Err(ApiError::NotFound {
                    message: format!("The model {alias:?} does not exist; see GET /v1/models"),
                    code: "model_not_found",
                });
            }
            Ok((Some(name.to_owned()), Some(alias.to_owned())))
        }
        Some(other) if !other.is_empty() => Ok((None, Some(other.to_owned()))),
        _ => Ok((None, None)),
    }
}

fn build(
    state: &AppState,
    body: &CompletionBody,
    headers: &HeaderMap,
    user: String,
    id: Uuid,
) -> Result<(NewJob, Option<String>), ApiError> {
    let Some(Value::Array(raw)) = &body.messages else {
        return Err(ApiError::bad_request(
            "invalid_request",
            "messages must be a non-empty array",
            Some("messages"),
        ));
    };
    let allow_system = !state.config.refuse_client_system;
    let mut messages = Vec::with_capacity(raw.len());
    for (i, value) in raw.iter().enumerate() {
        let (role, content) = state
            .validator
            .message_parts(value, allow_system)
            .map_err(|e| {
                state.metrics.validation_rejected.inc();
                ApiError::validation(e, Some(format!("messages[{i}]")))
            })?;
        messages.push(Message {
            role,
            content: content.to_owned(),
        });
    }
    let prompt = match messages.pop() {
        Some(last) if last.role == Role::User => last.content,
        _ => {
            return Err(ApiError::bad_request(
                "missing_prompt",
                "The last message must be the user's",
                Some("messages"),
            ));
        }
    };
    if let Some(t) = body.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::bad_request(
                "invalid_field",
                "temperature must be between 0 and 2",
                Some("temperature"),
            ));
        }
    }
    let max_tokens = body.max_completion_tokens.or(body.max_tokens);
    if max_tokens.is_some_and(|m| !(1..=32_768).contains(&m)) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "max_tokens must be between 1 and 32768",
            Some("max_tokens"),
        ));
    }
    let guild_id = header(headers, "x-guild-id").map(str::to_owned);
    if let Some(g) = &guild_id {
        check_id("X-Guild-Id", g)?;
    }
    let (personality, label) = personality_of(state, body.model.as_deref())?;
    let job = NewJob {
        id: Some(id),
        user_id: user,
        guild_id,
        conversation_id: None,
        request: ChatRequest {
            prompt,
            history: messages,
            personality,
            temperature: body.temperature,
            max_tokens,
        },
        priority: 0,
        delay_ms: 0,
        max_attempts: state.config.max_attempts,
        idempotency_key: None,
        request_id: jobs::request_id(headers),
    };
    Ok((job, label))
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn completion_id(id: Uuid) -> String {
    format!("chatcmpl-{}", id.simple())
}

/// The error a finished-but-failed job gives an OpenAI client.
fn job_failure(job: &Job) -> ApiError {
    let message = job
        .error
        .as_ref()
        .map_or_else(|| "The job failed".to_owned(), |e| e.message.clone());
    match job.state {
        JobState::Cancelled => ApiError::Conflict {
            message: "The job was cancelled".to_owned(),
        },
        _ => ApiError::Upstream { message },
    }
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CompletionBody>,
) -> Result<Response, ApiError> {
    let user = user_of(&state, &body, &headers)?;
    let (decision, verdict) = jobs::limit(&state, &user);
    let result = async {
        verdict?;
        let id = Uuid::new_v4();
        let (new, label) = build(&state, &body, &headers, user, id)?;
        if body.stream.unwrap_or(false) {
            stream(&state, new, label).await
        } else {
            wait(&state, new, label).await
        }
    }
    .await;
    Ok(jobs::with_rate_headers(result.into_response(), &decision))
}

fn with_job_header(mut response: Response, id: Uuid) -> Response {
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert("x-chatq-job-id", v);
    }
    response
}

async fn wait(state: &AppState, new: NewJob, label: Option<String>) -> Result<Response, ApiError> {
    let id = new.id.unwrap_or_else(Uuid::new_v4);
    let events = state.queue.events();
    let mut finished = events.subscribe(id);
    state.queue.push(new).await?;
    state.metrics.jobs_accepted.inc();
    let deadline = state
        .config
        .request_timeout
        .saturating_sub(Duration::from_secs(5));
    let job = tokio::select! {
        job = finished.finished() => job,
        _ = tokio::time::sleep(deadline) => None,
        _ = state.shutdown.cancelled() => None,
    };
    let job = match job {
        Some(job) => job,
        None => state.queue.get(id)?.ok_or_else(ApiError::job_not_found)?,
    };
    let Some(result) = job
        .result
        .as_ref()
        .filter(|_| job.state == JobState::Completed)
    else {
        let error = if job.state.is_terminal() {
            job_failure(&job)
        } else {
            ApiError::Unavailable {
                message: format!(
                    "The reply is taking too long; the job goes on: GET /v1/chat/jobs/{id}"
                ),
            }
        };
        return Ok(with_job_header(error.into_response(), id));
    };
    let usage = result.usage.map(|u| {
        json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
    });
    let body = json!({
        "id": completion_id(id),
        "object": "chat.completion",
        "created": result.processed_at / 1000,
        "model": label.unwrap_or_else(|| result.model.clone()),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.reply},
            "finish_reason": "stop",
            "logprobs": null
        }],
        "usage": usage,
        "system_fingerprint": null,
        "chatq": {"job_id": id, "used_fallback": result.used_fallback}
    });
    Ok(with_job_header(Json(body).into_response(), id))
}

fn chunk(id: Uuid, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Event {
    let body = json!({
        "id": completion_id(id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]
    });
    Event::default().data(body.to_string())
}

async fn stream(
    state: &AppState,
    new: NewJob,
    label: Option<String>,
) -> Result<Response, ApiError> {
    let id = new.id.unwrap_or_else(Uuid::new_v4);
    let (events_tx, mut events_rx) = mpsc::channel::<Event>(64);
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), ApiError>>();
    let task_state = state.clone();
    let model = label.unwrap_or_else(|| task_state.bot.model().to_owned());
    // Owned by the app's task tracker, which shutdown waits for. The task ends when the job
    // finishes, the client goes away, the request deadline passes or shutdown begins.
    state.tasks.spawn(async move {
        let state = task_state;
        let events = state.queue.events();
        let mut deltas = events.streams.listen(id);
        let mut finished = events.subscribe(id);
        if let Err(e) = state.queue.push(new).await {
            let _ = ready_tx.send(Err(e.into()));
            return;
        }
        state.metrics.jobs_accepted.inc();
        if ready_tx.send(Ok(())).is_err() {
            return;
        }
        let created = unix_secs();
        let emit = |event: Event| events_tx.send(event);
        if emit(chunk(id, created, &model, json!({"role": "assistant", "content": ""}), None))
            .await
            .is_err()
        {
            return;
        }
        let mut sent = String::new();
        let deadline = tokio::time::sleep(state.config.request_timeout);
        tokio::pin!(deadline);
        let job = loop {
            tokio::select! {
                biased;
                delta = deltas.rx.recv() => {
                    let Some(delta) = delta else { continue };
                    sent.push_str(&delta);
                    if emit(chunk(id, created, &model, json!({"content": delta}), None)).await.is_err() {
                        return; // the client went away; the job goes on and is logged
                    }
                }
                job = finished.finished() => break job,
                _ = &mut deadline => break None,
                _ = state.shutdown.cancelled() => break None,
            }
        };
        while let Ok(delta) = deltas.rx.try_recv() {
            sent.push_str(&delta);
            if emit(chunk(id, created, &model, json!({"content": delta}), None)).await.is_err() {
                return;
            }
        }
        let job = match job {
            Some(job) => Some(job),
            None => state.queue.get(id).ok().flatten(),
        };
        let final_event = match job.as_ref() {
            Some(job) if job.state == JobState::Completed => {
                let reply = job.result.as_ref().map_or("", |r| r.reply.as_str());
                // Text the worker did not stream (a placeholder for an empty reply) goes now.
                if let Some(rest) = reply.strip_prefix(sent.as_str()).filter(|r| !r.is_empty()) {
                    if emit(chunk(id, created, &model, json!({"content": rest}), None)).await.is_err() {
                        return;
                    }
                }
                chunk(id, created, &model, json!({}), Some("stop"))
            }
            Some(job) if job.state.is_terminal() => {
                let error = job_failure(job);
                Event::default().data(json!({"error": error.body()}).to_string())
            }
            _ => {
                let error = ApiError::Unavailable {
                    message: format!("The reply is taking too long; the job goes on: GET /v1/chat/jobs/{id}"),
                };
                Event::default().data(json!({"error": error.body()}).to_string())
            }
        };
        if emit(final_event).await.is_ok() {
            let _ = emit(Event::default().data("[DONE]")).await;
        }
    });
    match ready_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(ApiError::Internal),
    }
    let body = futures_util::stream::poll_fn(move |cx| {
        events_rx
            .poll_recv(cx)
            .map(|event| event.map(Ok::<_, Infallible>))
    });
    let mut response = Sse::new(body).into_response();
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    Ok(with_job_header(response, id))
}

/// `GET /v1/models`: the configured model and one alias per personality.
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let model = |id: String, description: String| json!({"id": id, "object": "model", "created": 0, "owned_by": "chatq", "description": description});
    let mut data = vec![model(
        state.config.model.clone(),
        "The configured model with the default personality".to_owned(),
    )];
    for p in state.bot.personalities().all() {
        data.push(model(
            format!("{ALIAS_PREFIX}{}", p.name),
            p.description.clone(),
        ));
    }
    let upstream = if state.bot.has_upstream() {
        "openai"
    } else {
        "fallback"
    };
    Json(json!({"object": "list", "data": data, "chatq": {"upstream": upstream}}))
}
