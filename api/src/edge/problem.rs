//! Error answers made by layers (tower and tower-http) come without a body, and axum's own
//! extractor rejections (a path that is not UTF-8 once decoded, for example) with a plain-text
//! one; this gives them the same RFC 9457 problem documents as the handlers' errors.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The longest plain-text reason kept as a problem's `detail`, in bytes.
const MAX_REASON_BYTES: usize = 1024;

/// Turns a 4xx or 5xx answer that is not JSON (no `Content-Type`, or a plain-text reason)
/// into a problem+json document of its status (keeping its other headers, the reason as
/// `detail` when there is a short one, and adding `Retry-After: 1` to a 503 without one).
pub async fn problemize(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or(""));
    if !(status.is_client_error() || status.is_server_error())
        || content_type.is_some_and(crate::json::is_json_media_type)
    {
        return response;
    }
    let has_body = content_type.is_some();
    let (parts, body) = response.into_parts();
    let reason = if has_body {
        axum::body::to_bytes(body, MAX_REASON_BYTES)
            .await
            .ok()
            .and_then(|b| String::from_utf8(b.to_vec()).ok())
            .filter(|r| !r.trim().is_empty())
    } else {
        None
    };
    let mut problem = match reason {
        Some(reason) => ApiError::Refused(status, reason),
        None => ApiError::Status(status),
    }
    .into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH
            && name != header::CONTENT_TYPE
            && !problem.headers().contains_key(name)
        {
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
