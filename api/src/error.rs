//! The API's one error type. Every variant documents its status; rejections become
//! `application/problem+json` (RFC 9457) with a stable `type`; internal failures become an
//! opaque 500 that is logged with its cause.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use commands::CommandError;
use domain::BatchError;
use domain::values::ValidationError;
use serde::Serialize;

use crate::identity::audit::Refusal;

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl From<ValidationError> for FieldError {
    fn from(e: ValidationError) -> Self {
        Self {
            field: e.field,
            reason: e.reason,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// 400: a query parameter is invalid.
    #[error("{}: {}", .0.field, .0.reason)]
    BadQuery(FieldError),
    /// 401: no valid access token (or bad credentials at login).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403: the user's role may not do this.
    #[error("this action needs the {0} role")]
    Forbidden(&'static str),
    /// 404: missing, or someone else's.
    #[error("not found")]
    NotFound,
    /// 404, answered exactly like [`ApiError::NotFound`] (a caller cannot tell that the
    /// resource exists), for a resource that exists but is someone else's: audited as
    /// `access.denied` with this reason.
    #[error("not found")]
    Hidden(&'static str),
    /// 404: no such route.
    #[error("no such resource")]
    NoRoute,
    /// 405: the route exists, the method does not.
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    /// 409: the batch's state does not allow the command.
    #[error(transparent)]
    Rejected(BatchError),
    /// 409: other commands kept changing the batch.
    #[error("{0}")]
    Conflict(String),
    /// 409: a rebuild or verification of this projection is already running.
    #[error("{0}")]
    JobRunning(String),
    /// 409: a user (or another named thing) of that name already exists.
    #[error("{0}")]
    Exists(String),
    /// 409: the resource's state does not allow this (for example a deleted user).
    #[error("{0}")]
    StateConflict(String),
    /// 429: too many failed logins for this account or from this address; retry after the
    /// given seconds (also in `Retry-After`).
    #[error("too many failed logins; retry in {0} s")]
    Throttled(u64),
    /// 503: the service is saturated (for example the password-hashing queue is full); retry
    /// after the given seconds (also in `Retry-After`).
    #[error("{0}")]
    Busy(String, u64),
    /// 413: the body is over the size limit.
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// 415: the body is not declared as JSON.
    #[error("expected a body of type application/json")]
    UnsupportedMediaType,
    /// 422: the body has the wrong shape or values out of range.
    #[error("the request is invalid")]
    Invalid(Vec<FieldError>),
    /// 503: the read model did not reach the requested position in time.
    #[error("the read model has not yet reached position {0}; retry shortly")]
    NotYetConsistent(i64),
    /// 500: anything else; the cause is logged, not shown.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
    /// 503: this node is handling as many requests as it may (`max_in_flight`); retry after
    /// a second (`Retry-After: 1`).
    #[error("the service is handling as many requests as it can; retry shortly")]
    Overloaded,
    /// 503: this node has as many connections open as it may (`max_connections`); the
    /// connection is closed after this answer.
    #[error("the server has as many connections open as it may; retry shortly")]
    TooManyConnections,
    /// 429 (this user's limit) or 503 (this node's): too many WebSocket connections.
    #[error("too many WebSocket connections {}; close one or retry later", if *.0 { "for this user" } else { "on this node" })]
    TooManyWebSockets(bool),
    /// An error status answered by a layer without a body (for example 503 after the request
    /// timeout): the problem of that status.
    #[error("{}", status_detail(*.0))]
    Status(StatusCode),
    /// An error status answered with a plain-text reason (one of axum's extractor rejections,
    /// for example a path that is not UTF-8 once decoded): the problem of that status, the
    /// reason as `detail`.
    #[error("{1}")]
    Refused(StatusCode, String),
    /// 429 `rate-limited`: over a rate-limit budget of this node (`api::edge::ratelimit`,
    /// docs/rate-limits.md): `detail` names the budget's class (`login`, `read`, `command`),
    /// what it is counted against (`user`, `API key`, `address`) and its size (`100/hour`);
    /// retry after `retry_after` seconds (also in `Retry-After`, at least 1). (One string, so
    /// that the error stays small: it sits in every handler's and session's future.)
    #[error("{detail}")]
    RateLimited { detail: String, retry_after: u64 },
    /// 503: the database cannot be reached (the circuit breaker is open, or this request
    /// failed to reach it); retry after `Retry-After` ([`crate::edge::breaker`]).
    #[error("the database cannot be reached at the moment; retry shortly")]
    DatabaseUnavailable,
    /// 426: `GET /v1/ws` without a WebSocket upgrade.
    #[error("this endpoint speaks WebSocket only: {0}")]
    UpgradeRequired(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldError {
            field: field.into(),
            reason: reason.into(),
        }])
    }

    /// A 400 for a query parameter.
    pub fn bad_query(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::BadQuery(FieldError {
            field: field.into(),
            reason: reason.into(),
        })
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed-json"),
            Self::BadQuery(_) => (StatusCode::BAD_REQUEST, "invalid-query"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound | Self::Hidden(_) => (StatusCode::NOT_FOUND, "not-found"),
            Self::NoRoute => (StatusCode::NOT_FOUND, "no-route"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
            Self::Rejected(BatchError::NotFound) => (StatusCode::NOT_FOUND, "not-found"),
            Self::Rejected(e) => (StatusCode::CONFLICT, e.code()),
            Self::Conflict(_) => (StatusCode::CONFLICT, "concurrent-modification"),
            Self::JobRunning(_) => (StatusCode::CONFLICT, "job-running"),
            Self::Exists(_) => (StatusCode::CONFLICT, "already-exists"),
            Self::StateConflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Throttled(_) => (StatusCode::TOO_MANY_REQUESTS, "login-throttled"),
            Self::Busy(..) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large"),
            Self::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
            }
            Self::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
            Self::NotYetConsistent(_) => (StatusCode::SERVICE_UNAVAILABLE, "not-yet-consistent"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            Self::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::TooManyConnections => (StatusCode::SERVICE_UNAVAILABLE, "too-many-connections"),
            Self::TooManyWebSockets(true) => (StatusCode::TOO_MANY_REQUESTS, "too-many-websockets"),
            Self::TooManyWebSockets(false) => {
                (StatusCode::SERVICE_UNAVAILABLE, "too-many-websockets")
            }
            Self::Status(status) | Self::Refused(status, _) => (*status, status_code(*status)),
            Self::DatabaseUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "database-unavailable"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate-limited"),
            Self::UpgradeRequired(_) => {
                (StatusCode::UPGRADE_REQUIRED, "websocket-upgrade-required")
            }
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            // Exactly the answer of every other 404, whatever found the batch missing.
            CommandError::Rejected(BatchError::NotFound) => Self::NotFound,
            CommandError::Rejected(e) => Self::Rejected(e),
            e @ CommandError::Conflict { .. } => Self::Conflict(e.to_string()),
            CommandError::Storage(e) => Self::Internal(anyhow::anyhow!(e)),
        }
    }
}

impl From<projections::ProjectionError> for ApiError {
    fn from(error: projections::ProjectionError) -> Self {
        Self::Internal(error.into())
    }
}

impl From<commands::LogError> for ApiError {
    fn from(error: commands::LogError) -> Self {
        Self::Internal(error.into())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        Self::Internal(error.into())
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A failure to reach the database is a 503 with `Retry-After`, reported to the
        // circuit breaker, not an opaque 500.
        if let Self::Internal(cause) = &self
            && let Some(failure) = crate::edge::breaker::DatabaseFailure::of_anyhow(cause)
        {
            return failure.into_response();
        }
        let (status, code) = self.parts();
        if let Self::Internal(cause) = &self {
            tracing::error!(error = ?cause, "request failed");
        }
        let errors = match &self {
            Self::Invalid(errors) => errors.clone(),
            Self::BadQuery(e) => vec![e.clone()],
            _ => Vec::new(),
        };
        let problem = Problem {
            kind: format!("urn:essayflow:problem:{code}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            errors,
        };
        let mut response = (status, axum::Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        let refusal = match &self {
            Self::Unauthorized(reason) => Some(Refusal {
                action: "auth.refused",
                reason,
            }),
            Self::Forbidden(role) => Some(Refusal {
                action: "access.denied",
                reason: role,
            }),
            Self::Hidden(reason) => Some(Refusal {
                action: "access.denied",
                reason,
            }),
            _ => None,
        };
        if let Some(refusal) = refusal {
            response.extensions_mut().insert(refusal);
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        let retry_after = match &self {
            Self::Throttled(secs)
            | Self::Busy(_, secs)
            | Self::RateLimited {
                retry_after: secs, ..
            } => Some(*secs),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The problem `type` suffix of a status answered by a layer.
fn status_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::REQUEST_TIMEOUT | StatusCode::SERVICE_UNAVAILABLE => "timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
        StatusCode::TOO_MANY_REQUESTS => "rate-limited",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::NOT_FOUND => "no-route",
        s if s.is_server_error() => "unavailable",
        _ => "bad-request",
    }
}

fn status_detail(status: StatusCode) -> String {
    match status {
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::REQUEST_TIMEOUT => {
            "the request was not answered within the request timeout; retry shortly".to_owned()
        }
        s => s.canonical_reason().unwrap_or("error").to_owned(),
    }
}
