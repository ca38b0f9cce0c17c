//! Tracing set-up and the correlation id that every log line of a request carries.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;
use uuid::Uuid;

use crate::state::AppState;

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

/// The labels of the exemplar a request leaves on the request-duration histogram
/// ([`crate::metrics::track`]): `correlation_id` (set by [`correlate`]). OpenMetrics caps an
/// exemplar's label set at 128 characters (names and values); `correlation_id` and a
/// `trace_id` of 32 hex digits take 90.
pub fn exemplar_labels(extensions: &axum::http::Extensions) -> Vec<(String, String)> {
    let mut labels = Vec::with_capacity(2);
    if let Some(CorrelationId(id)) = extensions.get::<CorrelationId>() {
        labels.push(("correlation_id".to_owned(), id.to_string()));
    }
    labels
}

/// Gives every request a correlation id and a span that carries it.
pub async fn correlate(
    axum::extract::State(_state): axum::extract::State<AppState>,
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
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    response
}
