//! The chat page (`/`) and the admin dashboard (`/admin`), served from the binary.
//!
//! The assets in `assets/` are compiled in: no CDN, no build step, works offline. Every
//! answer carries a Content-Security-Policy that allows only chatq's own origin and no inline
//! script, so even a bug that put bot text into the page as HTML could not run it; the pages
//! themselves only ever use `textContent` for user and bot text.

use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`
#[utoipa::path(get, path = "/", tag = "pages",
    responses((status = 200, description = "The chat page", content_type = "text/html", body = String)))]
pub async fn chat_page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("../../assets/index.html"),
    )
}

/// `GET /admin`
#[utoipa::path(get, path = "/admin", tag = "pages",
    responses((status = 200, description = "The admin dashboard", content_type = "text/html", body = String)))]
pub async fn admin_page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("../../assets/admin.html"),
    )
}

/// `GET /assets/{file}`
#[utoipa::path(get, path = "/assets/{file}", tag = "pages",
    params(("file" = String, Path, description = "style.css, chat.js, admin.js or icon.svg")),
    responses(
        (status = 200, description = "The asset",
            content((String = "text/css"), (String = "text/javascript"), (String = "image/svg+xml"))),
        (status = 404, description = "No such asset", body = crate::http::error::ErrorBody)))]
pub async fn asset_file(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (content_type, body) = match file.as_str() {
        "style.css" => (
            "text/css; charset=utf-8",
            include_str!("../../assets/style.css"),
        ),
        "chat.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../../assets/chat.js"),
        ),
        "admin.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../../assets/admin.js"),
        ),
        "icon.svg" => ("image/svg+xml", include_str!("../../assets/icon.svg")),
        _ => {
            return Err(ApiError::NotFound {
                message: "No such asset".to_owned(),
                code: "not_found",
            });
        }
    };
    Ok(asset(content_type, body))
}
