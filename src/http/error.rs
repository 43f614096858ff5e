//! The one API error type. Every failure the HTTP API reports, including axum's own
//! rejections, renders as `{"error": {"message", "type", "code", "param"}}` (the OpenAI
//! shape) with the matching status. Client errors say what was wrong; server errors say
//! little to the client and everything to the log.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::{StoreError, Unavailable};
use crate::validate::ValidationError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the request is malformed or names something that does not exist.
    BadRequest {
        message: String,
        code: &'static str,
        param: Option<String>,
    },
    /// 401: no token, or a token that is not valid here.
    Unauthorized,
    /// 403: a valid token without the right to this route, or admin routes disabled.
    Forbidden { message: String, code: &'static str },
    /// 404: an unknown job or route.
    NotFound { message: String, code: &'static str },
    /// 405
    MethodNotAllowed,
    /// 408: the request took longer than the request timeout.
    Timeout,
    /// 409: the job is not in a state that allows this.
    Conflict { message: String },
    /// 413
    PayloadTooLarge,
    /// 415
    UnsupportedMediaType,
    /// 422: well-formed input that breaks a content rule.
    Validation {
        message: String,
        code: &'static str,
        param: Option<String>,
    },
    /// 429: the per-user limit; `retry_after` in seconds.
    RateLimited { retry_after: u64 },
    /// 429: the user's daily token quota in this guild is spent; `retry_after` in seconds,
    /// until the next UTC midnight.
    QuotaExceeded { quota: u64, retry_after: u64 },
    /// 500
    Internal,
    /// 500: the upstream failed for good while answering (OpenAI-compatible routes).
    Upstream { message: String },
    /// 503: the store cannot write, or chatq is shutting down.
    Unavailable { message: String },
    /// 503: the shared store's database cannot be reached.
    StoreUnreachable,
}

/// Every error the API answers: `{"error": {"message", "type", "code", "param"}}`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct Body<'a> {
    error: Detail<'a>,
}

/// The error body, for the API document.
pub type ErrorBody = Body<'static>;

/// The errors any API route may answer, for the document: every one in the one error shape.
/// Never built (`dead_code`): it only describes responses, for `utoipa::path`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ApiErrors {
    /// Malformed input
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Missing or wrong bearer token
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// A token without the right, or admin routes disabled
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// Not found
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The request took too long
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// The state does not allow it
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// Body over the limit
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Not JSON
    #[response(status = 415)]
    NotJson(ErrorBody),
    /// A content rule or setting refused
    #[response(status = 422)]
    Refused(ErrorBody),
    /// Rate limited or quota used up (Retry-After)
    #[response(status = 429)]
    Limited(ErrorBody),
    /// Internal or upstream failure
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The store cannot take it now, or shutting down
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The inner `{"message", "type", "code", "param"}` object.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorDetail)]
pub struct Detail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    param: Option<&'a str>,
}

impl ApiError {
    pub fn bad_request(
        code: &'static str,
        message: impl Into<String>,
        param: Option<&str>,
    ) -> Self {
        Self::BadRequest {
            message: message.into(),
            code,
            param: param.map(str::to_owned),
        }
    }

    pub fn job_not_found() -> Self {
        Self::NotFound {
            message: "Job not found".to_owned(),
            code: "job_not_found",
        }
    }

    /// A content-rule failure: the validation message verbatim.
    pub fn validation(e: ValidationError, param: Option<String>) -> Self {
        Self::Validation {
            message: e.to_string(),
            code: e.code(),
            param: param.or_else(|| e.param().map(str::to_owned)),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } | Self::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal | Self::Upstream { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable { .. } | Self::StoreUnreachable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn parts(&self) -> (String, &'static str, &str, Option<&str>) {
        match self {
            Self::BadRequest {
                message,
                code,
                param,
            }
            | Self::Validation {
                message,
                code,
                param,
            } => (
                message.clone(),
                "invalid_request_error",
                code,
                param.as_deref(),
            ),
            Self::Unauthorized => (
                "Missing or invalid bearer token".to_owned(),
                "authentication_error",
                "invalid_token",
                None,
            ),
            Self::Forbidden { message, code } => (message.clone(), "permission_error", code, None),
            Self::NotFound { message, code } => {
                (message.clone(), "invalid_request_error", code, None)
            }
            Self::MethodNotAllowed => (
                "Method not allowed on this route".to_owned(),
                "invalid_request_error",
                "method_not_allowed",
                None,
            ),
            Self::Timeout => (
                "The request took too long".to_owned(),
                "timeout_error",
                "request_timeout",
                None,
            ),
            Self::Conflict { message } => {
                (message.clone(), "invalid_request_error", "conflict", None)
            }
            Self::PayloadTooLarge => (
                "Request body is too large".to_owned(),
                "invalid_request_error",
                "body_too_large",
                None,
            ),
            Self::UnsupportedMediaType => (
                "Expected a JSON body with Content-Type: application/json".to_owned(),
                "invalid_request_error",
                "unsupported_media_type",
                None,
            ),
            Self::RateLimited { retry_after } => (
                format!("Rate limit exceeded; try again in {retry_after} seconds"),
                "rate_limit_error",
                "rate_limited",
                None,
            ),
            Self::QuotaExceeded { quota, retry_after } => (
                format!(
                    "Daily token quota of {quota} used up in this guild; it resets at 00:00 UTC, in {retry_after} seconds"
                ),
                "rate_limit_error",
                "quota_exceeded",
                None,
            ),
            Self::Internal => (
                "Internal server error".to_owned(),
                "server_error",
                "internal_error",
                None,
            ),
            Self::Unavailable { message } => {
                (message.clone(), "server_error", "service_unavailable", None)
            }
            Self::Upstream { message } => (message.clone(), "server_error", "openai_error", None),
            Self::StoreUnreachable => (
                "The job store is unreachable; try again".to_owned(),
                "server_error",
                "store_unavailable",
                None,
            ),
        }
    }
}

impl Detail<'_> {
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl ApiError {
    /// The inner `{"message", "type", "code", "param"}` object, also sent as an SSE error event.
    pub fn body(&self) -> Detail<'_> {
        let (message, kind, code, param) = self.parts();
        Detail {
            message,
            kind,
            code,
            param,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, Json(Body { error: self.body() })).into_response();
        match &self {
            Self::RateLimited { retry_after } | Self::QuotaExceeded { retry_after, .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            Self::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

const MIB: u64 = 1024 * 1024;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => Self::job_not_found(),
            StoreError::Conflict { .. } | StoreError::LeaseLost(_) => Self::Conflict {
                message: e.to_string(),
            },
            StoreError::InvalidCursor => Self::bad_request(
                "invalid_cursor",
                "cursor must be a next_cursor from an earlier page",
                Some("cursor"),
            ),
            StoreError::Unavailable(Unavailable::DiskFull { free, reserve, .. }) => {
                Self::Unavailable {
                    // The path stays in the server's log (the monitor names it), not in answers.
                    message: format!(
                        "Not accepting new jobs: the server's disk is nearly full ({} MiB free, {} MiB kept in reserve); try again later",
                        free / MIB,
                        reserve / MIB
                    ),
                }
            }
            StoreError::Unavailable(Unavailable::Recovering { .. }) => Self::Unavailable {
                message: "The job store hit a disk error and is recovering; try again shortly"
                    .to_owned(),
            },
            StoreError::Unavailable(Unavailable::Unreachable { cause }) => {
                tracing::warn!(cause = %cause, "the job store is unreachable");
                Self::StoreUnreachable
            }
            StoreError::Unavailable(Unavailable::Closed) => Self::Unavailable {
                message: "The job store is closed: chatq is shutting down".to_owned(),
            },
            StoreError::InUse { .. } | StoreError::Open { .. } | StoreError::Backend(_) => {
                tracing::error!(error = %crate::store::error_chain(&e), "store failure");
                Self::Unavailable {
                    message: "The job store could not complete the request; try again shortly"
                        .to_owned(),
                }
            }
            StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "unreadable record");
                Self::Internal
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            JsonRejection::JsonSyntaxError(e) => Self::bad_request(
                "invalid_json",
                format!("Malformed JSON: {}", e.body_text()),
                None,
            ),
            JsonRejection::JsonDataError(e) => Self::bad_request(
                "invalid_request",
                format!("Invalid request body: {}", e.body_text()),
                None,
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            other => Self::bad_request("invalid_request", other.body_text(), None),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(
            "invalid_query",
            format!("Invalid query string: {}", rejection.body_text()),
            None,
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(_: PathRejection) -> Self {
        Self::job_not_found()
    }
}

/// `Json<T>` whose rejection is an [`ApiError`].
#[derive(Debug, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `Query<T>` whose rejection is an [`ApiError`].
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);
