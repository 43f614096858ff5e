//! Bearer-token checks for the client and admin route groups.
//!
//! No client token configured: the chat routes are open. Admin routes need the admin token
//! when one is set; without one they are open only when chatq listens on loopback, and
//! refused (403) otherwise. The admin token also opens the client routes.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::state::AppState;
use crate::secret::Secret;

fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
fn same(given: &str, secret: &Secret) -> bool {
    let (a, b) = (given.as_bytes(), secret.expose().as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn require_client(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(client) = &state.config.api_token {
        let given = bearer(&request).ok_or(ApiError::Unauthorized)?;
        let admin_ok = state
            .config
            .admin_token
            .as_ref()
            .is_some_and(|t| same(given, t));
        if !same(given, client) && !admin_ok {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

pub async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.config.admin_enabled() {
        return Err(ApiError::Forbidden {
            message:
                "Admin routes are disabled: chatq listens on a public address without --admin-token"
                    .to_owned(),
            code: "admin_disabled",
        });
    }
    if let Some(admin) = &state.config.admin_token {
        let given = bearer(&request).ok_or(ApiError::Unauthorized)?;
        if !same(given, admin) {
            let is_client = state
                .config
                .api_token
                .as_ref()
                .is_some_and(|t| same(given, t));
            return Err(if is_client {
                ApiError::Forbidden {
                    message: "This route needs the admin token".to_owned(),
                    code: "admin_required",
                }
            } else {
                ApiError::Unauthorized
            });
        }
    }
    Ok(next.run(request).await)
}
