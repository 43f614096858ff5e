//! `/v1/messages/validate` and `/v1/messages/validate/bulk`.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ApiError, ApiJson};
use super::state::AppState;
use crate::validate::{BulkOutcome, ValidatedMessage};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Validated {
    pub success: bool,
    pub validated_message: ValidatedMessage,
}

/// `POST /v1/messages/validate`: 200 with the trimmed message, or 422 with the rule's message.
#[utoipa::path(post, path = "/v1/messages/validate", tag = "messages", request_body = Object, security((), ("bearer" = [])),
    responses((status = 200, body = Validated), crate::http::error::ApiErrors))]
pub async fn validate_one(
    State(state): State<AppState>,
    ApiJson(value): ApiJson<Value>,
) -> Result<Json<Validated>, ApiError> {
    match state.validator.message(&value) {
        Ok(message) => Ok(Json(Validated {
            success: true,
            validated_message: message,
        })),
        Err(e) => {
            state.metrics.validation_rejected.inc();
            Err(ApiError::validation(e, None))
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct BulkBody {
    conversation_id: Value,
    messages: Value,
}

/// Most messages one bulk request may carry.
pub const MAX_BULK: usize = 1_000;

/// `POST /v1/messages/validate/bulk`: one result per index and a summary; 200 even when some
/// messages fail (the per-message errors are the answer).
#[utoipa::path(post, path = "/v1/messages/validate/bulk", tag = "messages", request_body = BulkBody, security((), ("bearer" = [])),
    responses((status = 200, body = BulkOutcome), crate::http::error::ApiErrors))]
pub async fn validate_bulk(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<BulkBody>,
) -> Result<Json<BulkOutcome>, ApiError> {
    let conversation_id = match body.conversation_id {
        Value::String(s) if !s.trim().is_empty() => s,
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_field",
                "conversation_id is required",
                Some("conversation_id"),
            ));
        }
    };
    let Value::Array(messages) = body.messages else {
        return Err(ApiError::bad_request(
            "invalid_field",
            "messages must be an array",
            Some("messages"),
        ));
    };
    if messages.len() > MAX_BULK {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("at most {MAX_BULK} messages per request"),
            Some("messages"),
        ));
    }
    let outcome = state.validator.bulk(conversation_id, &messages);
    if outcome.summary.errors > 0 {
        state.metrics.validation_rejected.inc();
    }
    Ok(Json(outcome))
}
