//! Error answers made by layers (tower and tower-http) come without a body; this gives them
//! the same RFC 9457 problem documents as the handlers' errors.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Turns a 4xx or 5xx answer that has no `Content-Type` into a problem+json document of its
/// status (keeping its other headers, and adding `Retry-After: 1` to a 503 without one).
pub async fn problemize(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let (parts, _) = response.into_parts();
    let mut problem = ApiError::Status(status).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH && !problem.headers().contains_key(name) {
            problem.headers_mut().insert(name.clone(), value.clone());
        }
    }
    if status == StatusCode::SERVICE_UNAVAILABLE
        && !problem.headers().contains_key(header::RETRY_AFTER)
    {
        problem
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    problem
}
