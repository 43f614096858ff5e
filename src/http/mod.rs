//! The HTTP front door: routes, one file per resource, and the layers every request passes.
//!
//! Layers, outermost first: request id (taken from `x-request-id` or generated) → tracing
//! span carrying it → echo of the id on the response → error-body normalisation (anything
//! that answers 4xx/5xx without a body gets the one error shape) → per-route metrics →
//! request timeout → concurrency bound → body limit → the route (with its auth layer).

mod admin;
mod auth;
mod completions;
mod conversations;
pub mod error;
mod guilds;
mod jobs;
mod legacy;
mod messages;
mod pages;
mod state;
pub mod submission;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tower::ServiceBuilder;
use tower::limit::ConcurrencyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use jobs::{JobView, MAX_WAIT_SECS};
pub use state::{AppState, Shared};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds the router over `state`.
pub fn router(state: AppState) -> Router {
    let client = Router::new()
        .route("/v1/chat/jobs", post(jobs::submit))
        .route(
            "/v1/chat/jobs/{id}",
            get(jobs::get_job).delete(jobs::cancel_job),
        )
        .route("/v1/messages/validate", post(messages::validate_one))
        .route("/v1/messages/validate/bulk", post(messages::validate_bulk))
        .route("/api/chat/bot", post(legacy::submit))
        .route("/api/chat/jobs/{id}", get(legacy::get_job))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/models", get(completions::models))
        .route(
            "/v1/conversations/{id}",
            get(conversations::get).delete(conversations::forget),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_client,
        ));
    let admin = Router::new()
        .route("/v1/chat/jobs/{id}/retry", post(jobs::retry_job))
        .route("/v1/jobs", get(jobs::list_jobs))
        .route("/v1/queue/stats", get(admin::stats))
        .route("/v1/queue/pause", post(admin::pause))
        .route("/v1/queue/resume", post(admin::resume))
        .route("/v1/interactions", get(admin::interactions))
        .route("/v1/cache", delete(admin::clear_cache))
        .route("/v1/usage", get(admin::usage))
        .route("/v1/backup", get(admin::backup))
        .route("/v1/guilds", get(guilds::list))
        .route(
            "/v1/guilds/{guild_id}",
            get(guilds::get).put(guilds::put).delete(guilds::delete),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    let open = Router::new()
        .route("/", get(pages::chat_page))
        .route("/admin", get(pages::admin_page))
        .route("/assets/{file}", get(pages::asset_file))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let timeout = state.config.request_timeout;
    let concurrency = state.config.max_concurrent_requests;
    let body_limit = state.config.body_limit;
    Router::new()
        .merge(client)
        .merge(admin)
        .merge(open)
        .fallback(not_found)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(make_span))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(middleware::map_response(normalise_errors))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    record_metrics,
                ))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    timeout,
                ))
                .layer(ConcurrencyLimitLayer::new(concurrency))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(state)
}

fn make_span(request: &Request<Body>) -> tracing::Span {
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %request_id,
    )
}

async fn record_metrics(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state
        .metrics
        .http_request(&route, response.status().as_u16());
    response
}

/// Answers that carry an error status but no body (axum's 405, the timeout's 408) get the
/// one error shape too.
async fn normalise_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let error = match status {
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => ApiError::Timeout,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::NOT_FOUND => ApiError::NotFound {
            message: "No such route".to_owned(),
            code: "not_found",
        },
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
        s if s.is_server_error() => ApiError::Internal,
        _ => ApiError::bad_request(
            "bad_request",
            status.canonical_reason().unwrap_or("Bad request"),
            None,
        ),
    };
    let (mut parts, _) = response.into_parts();
    let mut fresh = error.into_response();
    // Keep headers such as `Allow` and the request id.
    for (name, value) in fresh.headers_mut().drain() {
        if let Some(name) = name {
            parts.headers.insert(name, value);
        }
    }
    Response::from_parts(parts, fresh.into_body())
}

async fn not_found() -> ApiError {
    ApiError::NotFound {
        message: "No such route".to_owned(),
        code: "not_found",
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    if !state.is_ready() {
        return Err(ApiError::Unavailable {
            message: "Not ready: the workers are not running".to_owned(),
        });
    }
    // The store answers reads and takes new jobs.
    state.store.counts().await?;
    state.store.accepting().await?;
    Ok("ready")
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(state.store.as_ref()).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
