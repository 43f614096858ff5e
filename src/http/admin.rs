//! Admin routes: queue stats, pause and resume, the interaction log and the response cache.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiQuery};
use super::state::AppState;
use crate::domain::interaction::MAX_PAGE;
use crate::domain::{
    Action, Cursor, GroupBy, Interaction, LogQuery, QueueCounts, Usage, UsageQuery, UsageRow,
};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Stats {
    /// Jobs per state, under the states' names (`queued` as on a job).
    #[serde(flatten)]
    pub counts: QueueCounts,
    /// The same count as `queued`, under BullMQ's name, which DESIGN §3 and dashboards built
    /// for the replaced system read.
    pub waiting: u64,
    pub workers: usize,
    pub durability: &'static str,
    /// Where the data lives: `embedded`.
    pub backend: &'static str,
    pub upstream: &'static str,
    pub model: String,
    /// The local disk of the embedded store (`null` for a store without one).
    pub disk: Option<Disk>,
    pub cache: CacheStats,
}

/// The response cache, on the stats page.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CacheStats {
    /// `--cache-ttl-secs` (0: off, unless a guild turns it on).
    pub ttl_secs: u64,
    pub entries: u64,
    pub max_entries: u64,
}

/// The data directory's disk, as the store sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Disk {
    /// Free bytes at the last measurement (`null` if it could not be measured).
    pub free_bytes: Option<u64>,
    pub reserve_bytes: u64,
    /// `false` while new jobs are refused (disk below the reserve, or recovering from an error).
    pub accepting_jobs: bool,
    /// The disk error the store is recovering from.
    pub failure: Option<String>,
    pub reopens: u64,
}

/// `GET /v1/queue/stats`
#[utoipa::path(get, path = "/v1/queue/stats", tag = "admin", security((), ("bearer" = [])),
    responses((status = 200, body = Stats), crate::http::error::ApiErrors))]
pub async fn stats(State(state): State<AppState>) -> Result<Json<Stats>, ApiError> {
    let counts = state.store.counts().await?;
    let status = state.store.status().await?;
    let accepting_jobs = state.store.accepting().await.is_ok();
    let cache = CacheStats {
        ttl_secs: state.cache.server_ttl().as_secs(),
        entries: state.store.cache_len().await?,
        max_entries: state.config.store.cache_max_entries,
    };
    Ok(Json(Stats {
        waiting: counts.queued,
        counts,
        workers: state.config.worker.workers,
        durability: status.durability.as_str(),
        backend: status.backend,
        upstream: if state.bot.has_upstream() {
            "openai"
        } else {
            "fallback"
        },
        model: state.bot.model().to_owned(),
        disk: status.disk.map(|disk| Disk {
            free_bytes: disk.free_bytes,
            reserve_bytes: disk.reserve_bytes,
            accepting_jobs,
            failure: disk.failure.map(|f| f.to_string()),
            reopens: disk.reopens,
        }),
        cache,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Paused {
    pub paused: bool,
}

/// `POST /v1/queue/pause`
#[utoipa::path(post, path = "/v1/queue/pause", tag = "admin", security((), ("bearer" = [])),
    responses((status = 200, body = Paused), crate::http::error::ApiErrors))]
pub async fn pause(State(state): State<AppState>) -> Result<Json<Paused>, ApiError> {
    state.store.set_paused(true).await?;
    tracing::info!("queue paused");
    Ok(Json(Paused { paused: true }))
}

/// `POST /v1/queue/resume`
#[utoipa::path(post, path = "/v1/queue/resume", tag = "admin", security((), ("bearer" = [])),
    responses((status = 200, body = Paused), crate::http::error::ApiErrors))]
pub async fn resume(State(state): State<AppState>) -> Result<Json<Paused>, ApiError> {
    state.store.set_paused(false).await?;
    tracing::info!("queue resumed");
    Ok(Json(Paused { paused: false }))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InteractionsQuery {
    user_id: Option<String>,
    guild_id: Option<String>,
    /// RFC 3339 or milliseconds since the epoch.
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InteractionPage {
    pub data: Vec<InteractionView>,
    pub next_cursor: Option<Cursor>,
}

/// An interaction-log entry as the API shows it: times in RFC 3339 like the job views, with
/// the millisecond value kept for sorting and export.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InteractionView {
    /// The entry's cursor.
    pub id: String,
    pub job_id: uuid::Uuid,
    pub request_id: Option<String>,
    pub user_id: String,
    pub guild_id: String,
    pub action: Action,
    pub personality: Option<String>,
    pub prompt: String,
    pub reply: Option<String>,
    pub error: Option<String>,
    pub error_code: Option<String>,
    pub used_fallback: bool,
    pub model: Option<String>,
    pub upstream_latency_ms: Option<u64>,
    pub usage: Option<Usage>,
    pub cached: bool,
    pub attempts: u32,
    pub timestamp: String,
    pub timestamp_ms: u64,
}

impl From<Interaction> for InteractionView {
    fn from(e: Interaction) -> Self {
        Self {
            timestamp: super::jobs::rfc3339(e.timestamp),
            timestamp_ms: e.timestamp,
            id: e.id,
            job_id: e.job_id,
            request_id: e.request_id,
            user_id: e.user_id,
            guild_id: e.guild_id,
            action: e.action,
            personality: e.personality,
            prompt: e.prompt,
            reply: e.reply,
            error: e.error,
            error_code: e.error_code,
            used_fallback: e.used_fallback,
            model: e.model,
            upstream_latency_ms: e.upstream_latency_ms,
            usage: e.usage,
            cached: e.cached,
            attempts: e.attempts,
        }
    }
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

/// The `since` and `until` query parameters, each RFC 3339 or milliseconds.
fn time_range(
    since: Option<&str>,
    until: Option<&str>,
) -> Result<(Option<u64>, Option<u64>), ApiError> {
    Ok((
        since.map(|v| parse_time("since", v)).transpose()?,
        until.map(|v| parse_time("until", v)).transpose()?,
    ))
}

/// `GET /v1/interactions?user_id=&guild_id=&since=&until=&cursor=&limit=`
#[utoipa::path(get, path = "/v1/interactions", tag = "admin", security((), ("bearer" = [])), params(InteractionsQuery),
    responses((status = 200, body = InteractionPage), crate::http::error::ApiErrors))]
pub async fn interactions(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<InteractionsQuery>,
) -> Result<Json<InteractionPage>, ApiError> {
    let (since, until) = time_range(q.since.as_deref(), q.until.as_deref())?;
    let query = LogQuery {
        user_id: q.user_id.filter(|s| !s.is_empty()),
        guild_id: q.guild_id.filter(|s| !s.is_empty()),
        since,
        until,
        cursor: q.cursor.map(Cursor::from_client),
        limit: q.limit.unwrap_or(50).clamp(1, MAX_PAGE),
    };
    // The store reads its own cursor (a bad one: 400 `invalid_cursor`).
    let page = state.store.query(&query).await?;
    Ok(Json(InteractionPage {
        data: page
            .entries
            .into_iter()
            .map(InteractionView::from)
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CacheQuery {
    guild_id: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CacheCleared {
    pub removed: u64,
}

/// `DELETE /v1/cache?guild_id=`: forgets every cached reply, or one guild's (`global` names
/// the replies to requests outside any guild).
#[utoipa::path(delete, path = "/v1/cache", tag = "admin", security((), ("bearer" = [])), params(CacheQuery),
    responses((status = 200, body = CacheCleared), crate::http::error::ApiErrors))]
pub async fn clear_cache(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<CacheQuery>,
) -> Result<Json<CacheCleared>, ApiError> {
    let guild = q.guild_id.filter(|g| !g.is_empty());
    if let Some(guild) = &guild {
        super::submission::check_id("guild_id", guild)?;
    }
    let removed = state.store.cache_clear(guild.as_deref()).await?;
    tracing::info!(
        removed,
        guild = guild.as_deref().unwrap_or("*"),
        "response cache cleared"
    );
    Ok(Json(CacheCleared { removed }))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    guild_id: Option<String>,
    user_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    group_by: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub group_by: GroupBy,
    pub data: Vec<UsageRow>,
}

/// `GET /v1/usage?guild_id=&user_id=&since=&until=&group_by=user|guild|day|hour`: totals
/// from the interaction log (never from per-user metric labels), one row per group, by key.
#[utoipa::path(get, path = "/v1/usage", tag = "admin", security((), ("bearer" = [])), params(UsageParams),
    responses((status = 200, body = UsageReport), crate::http::error::ApiErrors))]
pub async fn usage(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<UsageParams>,
) -> Result<Json<UsageReport>, ApiError> {
    let group_by = match q.group_by.as_deref().unwrap_or("guild") {
        "user" => GroupBy::User,
        "guild" => GroupBy::Guild,
        "day" => GroupBy::Day,
        "hour" => GroupBy::Hour,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "group_by must be user, guild, day or hour",
                Some("group_by"),
            ));
        }
    };
    for (param, id) in [("guild_id", &q.guild_id), ("user_id", &q.user_id)] {
        if let Some(id) = id {
            super::submission::check_id(param, id)?;
        }
    }
    let (since, until) = time_range(q.since.as_deref(), q.until.as_deref())?;
    let query = UsageQuery {
        guild_id: q.guild_id,
        user_id: q.user_id,
        since,
        until,
        group_by,
    };
    let data = state.store.usage(&query).await?;
    Ok(Json(UsageReport { group_by, data }))
}

/// Hands what a blocking writer produces to an async response body, in chunks.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<axum::body::Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

const BACKUP_CHUNK: usize = 256 * 1024;

impl std::io::Write for ChannelWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= BACKUP_CHUNK {
            self.flush()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = axum::body::Bytes::from(std::mem::take(&mut self.buf));
        // The client went away: stop reading the store.
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))
    }
}

/// `GET /v1/backup`: a snapshot of the embedded store while it serves (see
/// `store::embedded::backup`), streamed as it is read. `chatq backup --to FILE` calls it and
/// checks the file before keeping it. A shared store is backed up with `pg_dump` instead.
#[utoipa::path(get, path = "/v1/backup", tag = "admin", security((), ("bearer" = [])),
    responses((status = 200, description = "The snapshot (see `chatq backup`)", content_type = "application/octet-stream", body = Vec<u8>), crate::http::error::ApiErrors))]
pub async fn backup(State(state): State<AppState>) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    if state.config.store.is_shared() {
        return Err(ApiError::Conflict {
            message: "This server's store is PostgreSQL: back it up with pg_dump".to_owned(),
        });
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let store = std::sync::Arc::clone(&state.store);
    let errors = tx.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter {
            tx,
            buf: Vec::with_capacity(BACKUP_CHUNK),
        };
        match store.backup(&mut out) {
            Ok(Some(summary)) => {
                tracing::info!(
                    entries = summary.entries,
                    bytes = summary.bytes,
                    "backup taken"
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "the backup failed");
                // Cut the body short: the client's check of the file then fails too.
                let _ = errors.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let filename = format!(
        "attachment; filename=\"chatq-{}.backup\"",
        state.clock.now_ms() / 1000
    );
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_owned(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, filename),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}
