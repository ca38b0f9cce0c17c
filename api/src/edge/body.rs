//! Request bodies at the edge: oversized ones are refused before they are read, and any
//! refusal leaves the client able to read it.
//!
//! - [`refuse_oversized`]: a request whose `Content-Length` is over [`BODY_LIMIT`] is
//!   answered 413 problem+json without reading its body, so a client that sent
//!   `Expect: 100-continue` is never told to go on. A chunked body has no length to check: it
//!   is cut at the limit by the JSON extractor, which answers the same 413.
//! - [`linger`]: whatever refuses a request before its body is read to the end (the 413s,
//!   a 429 of the rate limiter, a 503 of load shedding, the breaker or the timeout), a client
//!   that is still sending would have its connection reset if the server closed it with bytes
//!   unread, and would see a broken pipe instead of the answer. So, as web servers do with a
//!   lingering close, the rest of the body is read and thrown away, up to [`DRAIN_BYTES`],
//!   for at most [`DRAIN_TIME`] and while bytes keep coming ([`DRAIN_IDLE`]), before the
//!   answer goes out; when the whole body was drained,
//!   the connection stays usable. A client that asked for `100 Continue` has sent nothing and
//!   is answered at once.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::json::BODY_LIMIT;

/// The most bytes of a refused request's body read (and discarded) before its answer is sent.
pub const DRAIN_BYTES: u64 = 32 * 1024 * 1024;

/// The longest time spent draining a refused request's body.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// The longest wait for the next bytes of a refused request's body: a client that has
/// stopped sending is not waited for (its answer goes out, and the connection closes).
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Refuses a declared `Content-Length` over [`BODY_LIMIT`] with 413, before the handler and
/// without reading the body; other requests pass.
pub async fn refuse_oversized(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_none_or(|length| length <= BODY_LIMIT as u64) {
        return next.run(request).await;
    }
    ApiError::TooLarge(BODY_LIMIT).into_response()
}

/// Drains, within a bound, the unread rest of the body of a request that was answered with
/// an error before its body was read to the end (see the module documentation).
pub async fn linger(request: Request, next: Next) -> Response {
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (parts, body) = request.into_parts();
    let (returned, mut unread) = oneshot::channel();
    let body = Body::new(ReturnedOnDrop {
        inner: Some(body),
        back: Some(returned),
        ended: false,
    });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    // Dropped unfinished by whoever refused the request (the inner service has returned, so
    // it no longer holds the body unless it moved it elsewhere: then it is left alone).
    let Ok(rest) = unread.try_recv() else {
        return response;
    };
    // Reading is what makes hyper send `100 Continue`: a client that waits for it has sent
    // nothing, and is answered at once.
    if expects_continue || !drain(rest).await {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// A request body that hands its unread rest back when it is dropped before its end.
struct ReturnedOnDrop {
    inner: Option<Body>,
    back: Option<oneshot::Sender<Body>>,
    ended: bool,
}

impl http_body::Body for ReturnedOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            || self
                .inner
                .as_ref()
                .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            http_body::Body::size_hint,
        )
    }
}

impl Drop for ReturnedOnDrop {
    fn drop(&mut self) {
        if let (false, Some(inner), Some(back)) = (self.ended, self.inner.take(), self.back.take())
            && !http_body::Body::is_end_stream(&inner)
        {
            let _ = back.send(inner);
        }
    }
}

/// Reads and discards a body, within [`DRAIN_BYTES`], [`DRAIN_TIME`] and [`DRAIN_IDLE`];
/// whether it was read to its end.
async fn drain(mut body: Body) -> bool {
    let read = async {
        let mut total = 0u64;
        loop {
            let frame = match tokio::time::timeout(DRAIN_IDLE, body.frame()).await {
                Err(_) => return false,
                Ok(None) => return true,
                Ok(Some(frame)) => frame,
            };
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                total += data.len() as u64;
                if total > DRAIN_BYTES {
                    return false;
                }
            }
        }
    };
    tokio::time::timeout(DRAIN_TIME, read)
        .await
        .unwrap_or(false)
}
