//! Tracing set-up and the correlation id that every log line of a request carries.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;
use uuid::Uuid;

use crate::state::{AppState, Metrics};

pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// The request's correlation id: the client's `X-Correlation-Id` if it is a UUID, else new.
#[derive(Debug, Clone, Copy)]
pub struct CorrelationId(pub Uuid);

/// Installs the global subscriber: `ESSAYFLOW_LOG` (or `RUST_LOG`) filters, `info` by default;
/// `ESSAYFLOW_LOG_FORMAT=json` for JSON lines.
pub fn init() {
    let filter = EnvFilter::try_from_env("ESSAYFLOW_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = std::env::var("ESSAYFLOW_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Gives every request a correlation id, a span that carries it, and counts the answer.
pub async fn correlate(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = request
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
        .unwrap_or_else(Uuid::new_v4);
    request.extensions_mut().insert(CorrelationId(id));
    // Set (kept from the client, or made) by the edge's request-id layer, outside this one.
    let request_id = request
        .headers()
        .get(&crate::edge::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let span = tracing::info_span!(
        "request",
        correlation_id = %id,
        request_id = %request_id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(status = response.status().as_u16(), "answered");
    });
    Metrics::inc(&state.metrics.http_requests);
    if response.status().is_server_error() {
        Metrics::inc(&state.metrics.http_server_errors);
    }
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    response
}
