//! `POST /v1/auth/login`, `POST /v1/auth/refresh`, `POST /v1/auth/logout` (the flows:
//! README.md, "Authentication"; the rules: `crate::identity`).

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use serde::Deserialize;

use crate::auth::AuthUser;
use crate::error::{ApiResult, Problem};
use crate::identity::flows::TokenPair;
use crate::json::Json;
use crate::state::AppState;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"username": "ada", "password": "correct horse battery staple"}))]
pub(super) struct LoginRequest {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    username: String,
    #[schema(min_length = 1, max_length = 1024)]
    password: String,
}

#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    description = "Starts a session. Open: no credential needed.",
    security(()),
    responses((status = 200, description = "A session: a short-lived access token and a refresh token", body = TokenPair,
            example = json!({"access_token": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIuLi4ifQ.c2lnbmF0dXJl", "refresh_token": "efr_K7gNU3sdo-OL0wNhqoVWhr3g6s1xYv72ol_pe_Unols", "token_type": "Bearer", "expires_in": 900})),
        (status = 401, description = "Unknown username or wrong password (the same answer, in the same time, for both)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed logins for this account or from this address; see Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "seconds"))),
        (status = 503, description = "Too many logins at once; see Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "seconds")))))]
pub(super) async fn login(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Json(body): Json<LoginRequest>,
) -> ApiResult<impl IntoResponse> {
    let pair = state
        .identity
        .login(&body.username, &body.password, client.ip())
        .await?;
    Ok(axum::Json(pair))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"refresh_token": "efr_K7gNU3sdo-OL0wNhqoVWhr3g6s1xYv72ol_pe_Unols"}))]
pub(super) struct RefreshRequest {
    /// The refresh token of the last login or refresh (spent by this call).
    #[schema(min_length = 1, max_length = 256)]
    refresh_token: String,
}

#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    description = "The next token pair for a refresh token, which is spent. Open: the refresh token is the credential.",
    security(()),
    responses((status = 200, description = "The next pair; the refresh token presented no longer works", body = TokenPair),
        (status = 401, description = "Unknown, expired or revoked refresh token; or one already used, which revokes its whole session", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn refresh(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Json(body): Json<RefreshRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(
        state
            .identity
            .refresh(&body.refresh_token, client.ip())
            .await?,
    ))
}

#[derive(Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"refresh_token": "efr_K7gNU3sdo-OL0wNhqoVWhr3g6s1xYv72ol_pe_Unols"}))]
pub(super) struct LogoutRequest {
    /// The session's refresh token (optional: the access token already names the session).
    #[schema(max_length = 256)]
    #[serde(default)]
    refresh_token: Option<String>,
}

#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", request_body(content = Option<LogoutRequest>, description = "Optional: none, or `{\"refresh_token\": ...}`"),
    description = "Ends the caller's session (and the session of the refresh token given, if it is the caller's).",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 204, description = "The session is revoked: its refresh and access tokens stop working and its WebSocket connections close (4403)"),
        (status = 401, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn logout(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    user: AuthUser,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    // The body is optional: none, or a JSON one.
    let body = body.map_err(crate::json::body_rejection)?;
    let body: LogoutRequest = if body.is_empty() {
        LogoutRequest::default()
    } else {
        crate::json::require_json(&headers)?;
        crate::json::parse(&body)?
    };
    state
        .identity
        .logout(&user, body.refresh_token.as_deref(), client.ip())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/refresh", post(refresh))
        .route("/v1/auth/logout", post(logout))
}
