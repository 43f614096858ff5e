//! `POST /v1/chat/completions` and `GET /v1/models`: the OpenAI protocol, so any OpenAI client
//! or SDK can use chatq unmodified, through the same validation, per-user limit, durable
//! queue, retries, fallback and interaction log as the job routes.
//!
//! - The guild comes from `X-Guild-Id` (its settings apply as on the job routes) and a
//!   server-side conversation from `X-Conversation-Id`.
//! - The per-user key is `user`, else the `X-User-Id` header, else one shared key for the
//!   client token (or for anonymous callers when no token is set). The token itself is never
//!   used as an id, so it never reaches the log.
//! - `model`: `chatq-<personality>` selects a personality (`GET /v1/models` lists them); any
//!   other name uses the default personality and the configured upstream model.
//! - Client `system` messages are accepted after chatq's own system prompt, unless the
//!   operator passed `--refuse-client-system`.
//! - Non-streaming: the request waits for the job and answers a `chat.completion`.
//! - `stream: true`: the job is registered for deltas *before* it is pushed, already claimed
//!   by this process and handed to its own workers (so the deltas reach this client when
//!   replicas share the store; ahead of queued jobs, since its client is watching), the worker
//!   asks the upstream to stream, and each delta is forwarded as a `chat.completion.chunk` event as
//!   it arrives, ending with `data: [DONE]`. The response body is a stream over (deltas, the
//!   job's finish) that owns both registrations: a client that disconnects drops it, and the
//!   job goes on and is logged. Keep-alive comments go out while the first token is awaited,
//!   so a proxy does not take a slow upstream for an idle connection.
//! - A response-cache hit (`crate::cache`) is answered in the same shapes: the job is added
//!   completed, and the stream (or the completion) carries the stored reply; every answer
//!   says `x-chatq-cache: hit | miss | off`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::error::{ApiError, ApiJson};
use super::jobs;
use super::state::AppState;
use super::submission::{self, Content, SubmitRequest, check_id};
use crate::domain::{GuildSettings, Job, JobResult, JobState, NewJob, Usage};
use crate::signals::{StreamRegistration, Subscription};

/// Prefix of the model aliases that select a personality.
pub const ALIAS_PREFIX: &str = "chatq-";

#[derive(Debug, Deserialize, utoipa::ToSchema)]
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

/// The body as a checked job, and the model name to answer with.
fn build(
    state: &AppState,
    body: CompletionBody,
    headers: &HeaderMap,
    user: String,
    id: Uuid,
    guild: Option<&GuildSettings>,
) -> Result<(NewJob, Option<String>), ApiError> {
    let Some(Value::Array(messages)) = body.messages else {
        return Err(ApiError::bad_request(
            "invalid_request",
            "messages must be a non-empty array",
            Some("messages"),
        ));
    };
    let mut request = SubmitRequest::new(user, Content::Messages(messages));
    request.allow_system = !state.config.refuse_client_system;
    request.temperature = body.temperature;
    request.max_tokens = body.max_completion_tokens.or(body.max_tokens);
    request.guild_id = header(headers, "x-guild-id").map(|g| (g.to_owned(), "X-Guild-Id"));
    request.conversation_id = header(headers, "x-conversation-id").map(str::to_owned);
    request.id = Some(id);
    request.request_id = jobs::request_id(headers);
    let mut new = submission::parse(state, request, guild)?;
    // The personality comes from the model alias, checked after the content as before; the
    // guild's default and allowed list apply to it as to a named personality.
    let (personality, label) = personality_of(state, body.model.as_deref())?;
    new.request.personality = submission::guild_personality(guild, personality, "model")?;
    Ok((new, label))
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

fn too_long(id: Uuid) -> ApiError {
    ApiError::Unavailable {
        message: format!("The reply is taking too long; the job goes on: GET /v1/chat/jobs/{id}"),
    }
}

/// `POST /v1/chat/completions`
#[utoipa::path(post, path = "/v1/chat/completions", tag = "completions", request_body = CompletionBody, security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A chat.completion, or with `stream: true` server-sent chat.completion.chunk events ending with `data: [DONE]`",
            content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream"))), crate::http::error::ApiErrors))]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CompletionBody>,
) -> Result<Response, ApiError> {
    let user = user_of(&state, &body, &headers)?;
    let guild_id = header(&headers, "x-guild-id");
    let (admission, allowed) = submission::admit(&state, &user, guild_id).await?;
    let result = async {
        allowed?;
        let id = Uuid::new_v4();
        let stream = body.stream.unwrap_or(false);
        let guild = admission.settings();
        let (mut new, label) = build(&state, body, &headers, user, id, guild)?;
        submission::fill_history(&state, guild, &mut new).await?;
        let (verdict, hit) = jobs::consult_cache(&state, &new, guild).await;
        let response = if stream {
            stream_reply(&state, new, label, hit).await?
        } else {
            wait(&state, new, label, hit).await?
        };
        Ok::<_, ApiError>(jobs::with_cache_header(response, verdict))
    }
    .await;
    Ok(admission.headers(result.into_response()))
}

fn with_job_header(mut response: Response, id: Uuid) -> Response {
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert("x-chatq-job-id", v);
    }
    response
}

/// Pushes the job (or, on a cache hit, adds it completed) and answers once it is finished.
async fn wait(
    state: &AppState,
    new: NewJob,
    label: Option<String>,
    hit: Option<JobResult>,
) -> Result<Response, ApiError> {
    let id = new.id.unwrap_or_else(Uuid::new_v4);
    let mut finished = state.signals.finished.subscribe(id);
    let pushed = jobs::push(state, new, hit).await?;
    let job = if pushed.job.state.is_terminal() {
        pushed.job
    } else {
        let deadline = state
            .config
            .request_timeout
            .saturating_sub(Duration::from_secs(5));
        jobs::await_finish(state, &mut finished, id, deadline).await?
    };
    Ok(completion(&job, label))
}

/// The `chat.completion` of a finished job, or the error it ended with.
fn completion(job: &Job, label: Option<String>) -> Response {
    let id = job.id;
    let Some(result) = job
        .result
        .as_ref()
        .filter(|_| job.state == JobState::Completed)
    else {
        let error = if job.state.is_terminal() {
            job_failure(job)
        } else {
            too_long(id)
        };
        return with_job_header(error.into_response(), id);
    };
    let body = ChatCompletion {
        id: completion_id(id),
        object: "chat.completion",
        created: result.processed_at / 1000,
        model: label.unwrap_or_else(|| result.model.clone()),
        choices: vec![CompletionChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: result.reply.clone(),
                refusal: None,
            },
            finish_reason: "stop",
            logprobs: None,
        }],
        usage: result.usage,
        system_fingerprint: None,
        chatq: ChatqExtras {
            job_id: id,
            used_fallback: result.used_fallback,
            cached: result.cached,
        },
    };
    with_job_header(Json(body).into_response(), id)
}

/// A `chat.completion`, with every field OpenAI's published schema requires.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatCompletion {
    id: String,
    /// `chat.completion`
    object: &'static str,
    /// Unix seconds.
    created: u64,
    model: String,
    choices: Vec<CompletionChoice>,
    /// `null` for a fallback reply (no upstream call).
    usage: Option<Usage>,
    system_fingerprint: Option<String>,
    /// chatq's own: the job behind the answer.
    chatq: ChatqExtras,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompletionChoice {
    index: u32,
    message: AssistantMessage,
    /// `stop`
    finish_reason: &'static str,
    logprobs: Option<Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssistantMessage {
    /// `assistant`
    role: &'static str,
    content: String,
    /// Always `null`: chatq's replies are not refusals in OpenAI's sense.
    refusal: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatqExtras {
    job_id: Uuid,
    used_fallback: bool,
    cached: bool,
}

/// One `chat.completion.chunk` event of a streamed reply (the stream ends with
/// `data: [DONE]`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatCompletionChunk {
    id: String,
    /// `chat.completion.chunk`
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<ChunkChoice>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChunkChoice {
    index: u32,
    delta: Delta,
    /// `stop` on the last chunk, `null` before.
    finish_reason: Option<&'static str>,
    logprobs: Option<Value>,
}

/// What a chunk adds: the role (first chunk), a piece of content, or nothing (last chunk).
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

fn chunk(id: Uuid, created: u64, model: &str, delta: Delta, finish: Option<&'static str>) -> Event {
    let body = ChatCompletionChunk {
        id: completion_id(id),
        object: "chat.completion.chunk",
        created,
        model: model.to_owned(),
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason: finish,
            logprobs: None,
        }],
    };
    // Serialising plain structs of strings and numbers cannot fail.
    Event::default().data(serde_json::to_string(&body).unwrap_or_default())
}

fn error_event(error: &ApiError) -> Event {
    Event::default().data(json!({"error": error.body()}).to_string())
}

/// Where a streamed reply is.
enum Phase {
    /// The opening chunk (the assistant's role) is next.
    Opening,
    /// Deltas are forwarded until the job finishes, the deadline passes or shutdown begins.
    Relaying,
    /// Only the queued closing events are left.
    Closing,
}

/// The state of one streamed reply: it owns the delta registration and the finish
/// subscription, so dropping the response body (the client left) unregisters both.
struct Relay {
    state: AppState,
    id: Uuid,
    created: u64,
    model: String,
    deltas: StreamRegistration,
    finished: Subscription,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// How often to look in the store for the job's finish (a shared store), if at all.
    poll: Option<Duration>,
    /// The job, when it was finished before the stream began (a reply from the cache).
    done: Option<Job>,
    /// The reply text forwarded so far.
    sent: String,
    phase: Phase,
    closing: VecDeque<Event>,
}

impl Relay {
    async fn next_event(&mut self) -> Option<Event> {
        match self.phase {
            Phase::Opening => {
                self.phase = Phase::Relaying;
                let opening = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                };
                Some(self.chunk(opening, None))
            }
            Phase::Relaying => {
                if let Some(job) = self.done.take() {
                    self.close(Some(job)).await;
                    return self.closing.pop_front();
                }
                let job = loop {
                    let poll = tokio::time::sleep(self.poll.unwrap_or(Duration::MAX));
                    tokio::select! {
                        biased;
                        Some(delta) = self.deltas.rx.recv() => return Some(self.delta(delta)),
                        job = self.finished.finished() => break job,
                        _ = &mut self.deadline => break None,
                        _ = self.state.shutdown.cancelled() => break None,
                        // On a shared store another replica's worker may run the job; its
                        // finish is only in the store.
                        _ = poll, if self.poll.is_some() => {
                            if let Ok(Some(job)) = self.state.store.get(self.id).await {
                                if job.state.is_terminal() {
                                    break Some(job);
                                }
                            }
                        }
                    }
                };
                self.close(job).await;
                self.closing.pop_front()
            }
            Phase::Closing => self.closing.pop_front(),
        }
    }

    fn chunk(&self, delta: Delta, finish: Option<&'static str>) -> Event {
        chunk(self.id, self.created, &self.model, delta, finish)
    }

    fn delta(&mut self, delta: String) -> Event {
        self.sent.push_str(&delta);
        let content = Delta {
            content: Some(delta),
            ..Delta::default()
        };
        self.chunk(content, None)
    }

    /// Queues what is left to say: deltas still buffered, the rest of the reply, the final
    /// chunk or the error, then `[DONE]`.
    async fn close(&mut self, finished: Option<Job>) {
        self.phase = Phase::Closing;
        while let Ok(delta) = self.deltas.rx.try_recv() {
            let event = self.delta(delta);
            self.closing.push_back(event);
        }
        let job = match finished {
            Some(job) => Ok(Some(job)),
            None => self.state.store.get(self.id).await,
        };
        let last = match job {
            Ok(Some(job)) if job.state == JobState::Completed => {
                let reply = job.result.as_ref().map_or("", |r| r.reply.as_str());
                // Text the worker did not stream (a placeholder for an empty reply) goes now.
                if let Some(rest) = reply
                    .strip_prefix(self.sent.as_str())
                    .filter(|r| !r.is_empty())
                {
                    let rest = Delta {
                        content: Some(rest.to_owned()),
                        ..Delta::default()
                    };
                    let event = self.chunk(rest, None);
                    self.closing.push_back(event);
                }
                self.chunk(Delta::default(), Some("stop"))
            }
            Ok(Some(job)) if job.state.is_terminal() => error_event(&job_failure(&job)),
            Ok(_) => error_event(&too_long(self.id)),
            Err(e) => error_event(&ApiError::from(e)),
        };
        self.closing.push_back(last);
        self.closing.push_back(Event::default().data("[DONE]"));
    }
}

/// Streams the job's reply: as the worker produces it, or, on a cache hit (`hit`), the
/// stored reply in the same chunks a fresh one ends with.
async fn stream_reply(
    state: &AppState,
    new: NewJob,
    label: Option<String>,
    hit: Option<JobResult>,
) -> Result<Response, ApiError> {
    let id = new.id.unwrap_or_else(Uuid::new_v4);
    // Both registrations come before the push: the worker cannot start before we listen.
    let deltas = state.signals.streams.listen(id);
    let finished = state.signals.finished.subscribe(id);
    let mut done = None;
    if hit.is_some() {
        done = Some(jobs::push(state, new, hit).await?.job);
    } else {
        // The job is claimed here and run by this process's workers, so its deltas reach
        // this client whichever replicas share the store. Paused, it waits in the queue like
        // any job.
        match state.store.push_claimed(new.clone()).await? {
            Some(claimed) => {
                if state.handoff.run(claimed).is_err() {
                    // Only at shutdown; the claim is recovered and the job runs after all.
                    tracing::warn!(job_id = %id, "the workers have stopped; the streamed job runs after recovery");
                }
            }
            None => {
                state.store.push(new).await?;
            }
        }
        state.metrics.jobs_accepted.inc();
    }
    let relay = Relay {
        state: state.clone(),
        id,
        created: unix_secs(),
        model: label.unwrap_or_else(|| state.bot.model().to_owned()),
        deltas,
        finished,
        deadline: Box::pin(tokio::time::sleep(state.config.request_timeout)),
        poll: state.config.worker.poll,
        done,
        sent: String::new(),
        phase: Phase::Opening,
        closing: VecDeque::new(),
    };
    let body = futures_util::stream::unfold(relay, |mut relay| async move {
        let event = relay.next_event().await?;
        Some((Ok::<_, Infallible>(event), relay))
    });
    let mut response = Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response();
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    Ok(with_job_header(response, id))
}

/// The model list, as OpenAI's `GET /v1/models` answers it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// `list`
    object: &'static str,
    data: Vec<Model>,
    chatq: ModelsExtras,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Model {
    id: String,
    /// `model`
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    description: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelsExtras {
    /// `openai` or `fallback` (offline).
    upstream: &'static str,
}

/// `GET /v1/models`: the configured model and one alias per personality.
#[utoipa::path(get, path = "/v1/models", tag = "completions", security((), ("bearer" = [])),
    responses((status = 200, body = ModelList), crate::http::error::ApiErrors))]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let model = |id: String, description: String| Model {
        id,
        object: "model",
        created: 0,
        owned_by: "chatq",
        description,
    };
    let mut data = vec![model(
        state.bot.model().to_owned(),
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
    Json(ModelList {
        object: "list",
        data,
        chatq: ModelsExtras { upstream },
    })
}
