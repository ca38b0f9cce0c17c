//! The HTTP edge: every layer between a connection's request and the routes.
//!
//! From the outside in (the order of [`apply`]):
//! 1. `X-Request-ID`: a client's id (1 to 128 visible ASCII characters) is kept, otherwise a
//!    UUID is made; it is echoed on the answer beside `X-Correlation-Id` (tower-http
//!    `request_id`).
//! 2. The correlation id and its tracing span ([`crate::telemetry`]), then the request
//!    metrics ([`crate::metrics::track`]: duration by method, route template and status, with
//!    the correlation id as exemplar; requests in flight), so that every refusal of the layers
//!    below is counted.
//! 3. CORS for the configured origins only (tower-http `cors`; none by default).
//! 4. Security headers (tower-http `set_header`): `X-Content-Type-Options: nosniff`,
//!    `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer`, a `Content-Security-Policy`
//!    (`default-src 'none'; frame-ancestors 'none'` for the API; the docs UI sets its own),
//!    `Strict-Transport-Security` when serving TLS, and `Cache-Control: no-store` on every
//!    answer without an `ETag` (`private, no-cache` with one: revalidate, then use the 304).
//! 5. Compression of answers of at least `compression_min_bytes` by `Accept-Encoding`
//!    (gzip, br, zstd; tower-http `compression`); a compressed answer's `ETag` is made weak.
//! 6. [`problem::problemize`]: an error status that a layer answered without a body (the
//!    timeout, for example) becomes an RFC 9457 problem with `Retry-After` where it applies.
//! 7. Load shedding: at most `max_in_flight` requests at once per node; past it, 503
//!    `overloaded` with `Retry-After: 1` at once (tower `load_shed` and
//!    `GlobalConcurrencyLimit`).
//! 8. The request timeout: 503 `timeout` after `request_timeout_secs` (tower-http `timeout`).
//! 9. Rate limiting ([`ratelimit`]) and the database circuit breaker ([`breaker`]).
//! 10. [`body::refuse_oversized`]: a `Content-Length` over the limit is refused with 413
//!     before the body is read (no `100 Continue`).
//! 11. The audit of refusals ([`crate::identity::audit::note_refusals`]): an answer that
//!     refused a credential (401) or an access (403, or a 404 for someone else's batch) is
//!     tallied for the audit log.
//!
//! Between 6 and 7, [`body::linger`] drains (within a bound) the unread body of any request
//! refused by an inner layer, so that a client still sending reads its answer instead of a
//! reset.
//!
//! Connection-level limits (header-read and idle timeouts, the connection cap, the shutdown
//! drain) are in [`crate::server`].

pub mod body;
pub mod breaker;
pub mod problem;
pub mod ratelimit;

use std::time::Duration;

use anyhow::bail;
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;

use crate::error::ApiError;
use crate::json::BODY_LIMIT;
use crate::state::AppState;

/// `X-Request-ID`.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest `X-Request-ID` kept from a client; a longer or non-visible-ASCII one is
/// replaced by a new UUID.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The content security policy of every API answer: it loads nothing and may not be framed.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Wraps the routes in the edge's layers (see the module documentation for the order).
pub fn apply(routes: Router<AppState>, state: AppState) -> Router {
    let http = &state.settings.http;
    let timeout = Duration::from_secs(http.request_timeout_secs);
    let shed = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::Overloaded
        }))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::new(http.max_in_flight));
    let compression = CompressionLayer::new().compress_when(
        SizeAbove::new(http.compression_min_bytes)
            .and(NotForContentType::GRPC)
            .and(NotForContentType::IMAGES)
            .and(NotForContentType::SSE)
            .and(HasBody),
    );
    let hsts = (state.settings.tls_cert.is_some() && http.hsts_max_age_secs > 0).then(|| {
        SetResponseHeaderLayer::if_not_present(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_str(&format!("max-age={}", http.hsts_max_age_secs))
                .unwrap_or(HeaderValue::from_static("max-age=31536000")),
        )
    });
    let cors = cors(&state.settings.http);
    let routes = routes
        .route_layer(axum::middleware::from_fn(crate::metrics::matched_route))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state.clone());
    // Around the whole router once (not `Router::layer`, which wraps every route on its own and
    // re-boxes it between layers): a request crosses one stack, whose layers hold each other
    // by value.
    let stack = ServiceBuilder::new()
        .layer(axum::middleware::map_request(drop_unusable_request_id))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::telemetry::correlate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .option_layer(cors)
        .option_layer(hsts)
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(API_CSP),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            cache_control,
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::ETAG,
            weak_etag_when_encoded,
        ))
        .layer(compression)
        .layer(axum::middleware::from_fn(problem::problemize))
        .layer(axum::middleware::from_fn(body::linger))
        .layer(shed)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ratelimit::rate_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            breaker::guard,
        ))
        .layer(axum::middleware::from_fn(body::refuse_oversized))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::identity::audit::note_refusals,
        ))
        .service(routes);
    Router::new().fallback_service(stack)
}

/// Whether an `If-None-Match` header (RFC 9110 section 13.1.2) matches `etag` (a quoted entity
/// tag, `"5"`): `*`, or one of its entity tags compared weakly (`W/"5"` matches `"5"`), as a
/// GET's conditional must be. Used by every answer that has an `ETag`.
pub fn none_match(headers: &axum::http::HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

/// `Cache-Control` for an answer that did not set one: `private, no-cache` when it has an
/// `ETag` (a client may keep it but must revalidate, and gets a 304), `no-store` otherwise
/// (answers are per user and often carry tokens).
fn cache_control<B>(response: &Response<B>) -> Option<HeaderValue> {
    Some(if response.headers().contains_key(header::ETAG) {
        HeaderValue::from_static("private, no-cache")
    } else {
        HeaderValue::from_static("no-store")
    })
}

/// A compressed answer's strong `ETag` made weak (`W/"5"`): a strong validator names one exact
/// byte sequence, and the gzip, br, zstd and identity variants differ (RFC 9110 section
/// 8.8.1). `If-None-Match` compares weakly, so 304s work the same. `None` leaves it as it is.
fn weak_etag_when_encoded<B>(response: &Response<B>) -> Option<HeaderValue> {
    let etag = response.headers().get(header::ETAG)?;
    if !response.headers().contains_key(header::CONTENT_ENCODING)
        || etag.as_bytes().starts_with(b"W/")
    {
        return None;
    }
    let mut weak = b"W/".to_vec();
    weak.extend_from_slice(etag.as_bytes());
    HeaderValue::from_bytes(&weak).ok()
}

/// Compress only answers that have a body: not `101 Switching Protocols`, `204` or `304`.
#[derive(Clone, Copy)]
struct HasBody;

impl Predicate for HasBody {
    fn should_compress<B>(&self, response: &axum::http::Response<B>) -> bool
    where
        B: http_body::Body,
    {
        let status = response.status();
        !status.is_informational()
            && status != StatusCode::NO_CONTENT
            && status != StatusCode::NOT_MODIFIED
    }
}

/// Removes an `X-Request-ID` that is empty, longer than [`MAX_REQUEST_ID_LEN`] or not
/// visible ASCII, so that a new one is made instead of logging and echoing it.
async fn drop_unusable_request_id<B>(mut request: Request<B>) -> Request<B> {
    let usable = request.headers().get(&REQUEST_ID).is_none_or(|v| {
        let bytes = v.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID_LEN
            && bytes.iter().all(|b| b.is_ascii_graphic())
    });
    if !usable {
        request.headers_mut().remove(&REQUEST_ID);
    }
    request
}

/// The configured CORS origins, checked: each is `scheme://host[:port]` with no path, and `*`
/// is refused (the API's answers are per user).
pub fn cors_origins(origins: &[String]) -> anyhow::Result<Vec<HeaderValue>> {
    origins
        .iter()
        .map(|origin| {
            let origin = origin.trim().trim_end_matches('/');
            let lower = origin.to_ascii_lowercase();
            let rest = lower
                .strip_prefix("https://")
                .or_else(|| lower.strip_prefix("http://"));
            match rest {
                Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', '*', ' ']) => {
                    HeaderValue::from_str(&lower).map_err(|_| {
                        anyhow::anyhow!("cors_origins: {origin:?} is not a valid origin")
                    })
                }
                _ => bail!(
                    "cors_origins: {origin:?} is not an origin like https://app.example.org \
                     (scheme and host, no path, no wildcard)"
                ),
            }
        })
        .collect()
}

/// The CORS layer for the configured origins, or none when no origin is configured (then
/// browsers on other origins get no `Access-Control-Allow-Origin` and cannot read answers).
fn cors(http: &crate::settings::HttpSettings) -> Option<CorsLayer> {
    let origins = cors_origins(&http.cors_origins).ok()?;
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_NONE_MATCH,
                HeaderName::from_static("x-api-key"),
                REQUEST_ID,
                HeaderName::from_static(crate::telemetry::CORRELATION_HEADER),
            ])
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static("ratelimit"),
                HeaderName::from_static("ratelimit-policy"),
                REQUEST_ID,
                HeaderName::from_static(crate::telemetry::CORRELATION_HEADER),
            ])
            .max_age(Duration::from_secs(http.cors_max_age_secs)),
    )
}

#[cfg(test)]
mod tests {
    use super::cors_origins;

    #[test]
    fn cors_origins_must_be_scheme_and_host() {
        let ok = cors_origins(&[
            "https://App.example.org/".into(),
            "http://localhost:5173".into(),
        ])
        .expect("valid");
        assert_eq!(ok[0], "https://app.example.org");
        assert_eq!(ok[1], "http://localhost:5173");
        for bad in [
            "*",
            "app.example.org",
            "https://a.org/path",
            "https://*.a.org",
            "ftp://a",
        ] {
            assert!(cors_origins(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
