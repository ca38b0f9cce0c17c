//! Oversized request bodies are refused before they are read.
//!
//! A request whose `Content-Length` is over [`BODY_LIMIT`] is answered 413 problem+json
//! without reading its body, so a client that sent `Expect: 100-continue` is never told to go
//! on. A client that did not ask is probably sending the body already; closing the
//! connection with its bytes unread would make the kernel reset it, and the client would see
//! a broken pipe instead of the 413. So, as mature servers do with a lingering close, up to
//! [`DRAIN_BYTES`] are read and thrown away (for at most [`DRAIN_TIME`]) before answering.
//! A chunked body has no length to check: it is cut at the limit by the JSON extractor, which
//! answers the same 413, with `Connection: close` (the rest of the body is never read).

use std::time::Duration;

use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::error::ApiError;
use crate::json::BODY_LIMIT;

/// The most bytes of an oversized body read (and discarded) before the 413 is sent.
pub const DRAIN_BYTES: u64 = 32 * 1024 * 1024;

/// The longest time spent draining an oversized body.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Refuses a declared `Content-Length` over [`BODY_LIMIT`] with 413, before the handler and
/// without a `100 Continue`; other requests pass.
pub async fn refuse_oversized(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_none_or(|length| length <= BODY_LIMIT as u64) {
        let mut response = next.run(request).await;
        // A chunked body cut at the limit was not read to its end: the connection cannot
        // carry another request, and the client must not try.
        if response.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        return response;
    }
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut refused = ApiError::TooLarge(BODY_LIMIT).into_response();
    // Reading the body is what makes hyper send `100 Continue`: a client that waits for it
    // has sent nothing, and is answered at once.
    let drained = !expects_continue && drain(request.into_body()).await;
    if !drained {
        refused.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    refused
}

/// Reads and discards a body, within [`DRAIN_BYTES`] and [`DRAIN_TIME`]; whether it was read
/// to its end.
async fn drain(mut body: axum::body::Body) -> bool {
    let read = async {
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                total += data.len() as u64;
                if total > DRAIN_BYTES {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIME, read)
        .await
        .unwrap_or(false)
}
