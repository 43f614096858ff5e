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
pub mod jobs;
mod legacy;
mod messages;
mod pages;
mod state;
pub mod submission;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use tower::ServiceBuilder;
use tower::limit::ConcurrencyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::ApiError;
pub use jobs::{JobView, MAX_WAIT_SECS};
pub use state::{AppState, Shared};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The API document's top: title, version, the bearer scheme.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "chatq",
        description = "A chat bot backend: a durable job queue, an OpenAI-compatible route, guilds, conversations and a response cache. Every error is `{\"error\": {\"message\", \"type\", \"code\", \"param\"}}`."
    ),
    modifiers(&BearerAuth),
    components(schemas(error::ErrorBody))
)]
struct ApiDoc;

/// Adds the bearer scheme the client and admin routes take (`--api-token`, `--admin-token`).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route, with its part of the API document: a route exists only through `routes!`,
/// so the router and the document cannot disagree (`tests/api/openapi.rs` checks both ways).
fn api(state: &AppState) -> OpenApiRouter<AppState> {
    let client = OpenApiRouter::new()
        .routes(routes!(jobs::submit))
        .routes(routes!(jobs::get_job, jobs::cancel_job))
        .routes(routes!(messages::validate_one))
        .routes(routes!(messages::validate_bulk))
        .routes(routes!(legacy::submit))
        .routes(routes!(legacy::get_job))
        .routes(routes!(completions::chat_completions))
        .routes(routes!(completions::models))
        .routes(routes!(conversations::get, conversations::forget))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_client,
        ));
    let admin = OpenApiRouter::new()
        .routes(routes!(jobs::retry_job))
        .routes(routes!(jobs::list_jobs))
        .routes(routes!(admin::stats))
        .routes(routes!(admin::pause))
        .routes(routes!(admin::resume))
        .routes(routes!(admin::interactions))
        .routes(routes!(admin::clear_cache))
        .routes(routes!(admin::usage))
        .routes(routes!(admin::backup))
        .routes(routes!(guilds::list))
        .routes(routes!(guilds::get, guilds::put, guilds::delete))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    let open = OpenApiRouter::new()
        .routes(routes!(pages::chat_page))
        .routes(routes!(pages::admin_page))
        .routes(routes!(pages::asset_file))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(crate::discord::interactions::interactions));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(client)
        .merge(admin)
        .merge(open)
}

/// Builds the router over `state`.
pub fn router(state: AppState) -> Router {
    let (routes, document) = api(&state).split_for_parts();
    // Rendered once: the document does not change while the server runs.
    let document: Arc<str> = document
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".to_owned())
        .into();
    let timeout = state.config.request_timeout;
    let concurrency = state.config.max_concurrent_requests;
    let body_limit = state.config.body_limit;
    routes
        .fallback(not_found)
        .layer(Extension(OpenApiDocument(document)))
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

/// The rendered API document, shared by the `/openapi.json` handler.
#[derive(Clone)]
struct OpenApiDocument(Arc<str>);

/// `GET /openapi.json`: this API's OpenAPI 3.1 document, generated from the handlers' own
/// request and response types.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
async fn openapi_json(Extension(document): Extension<OpenApiDocument>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.0.to_string(),
    )
        .into_response()
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

/// `GET /healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "ok", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: the store answers and takes new jobs, and the workers run.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "ready", content_type = "text/plain", body = String),
        (status = 503, description = "Not ready, and why", body = error::ErrorBody)))]
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

/// `GET /metrics`: Prometheus metrics, all `chatq_*`.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
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
