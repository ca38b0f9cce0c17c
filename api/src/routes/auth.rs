//! `POST /v1/auth/login`.

use axum::extract::State;
use axum::routing::post;
use axum::{Router, response::IntoResponse};
use serde::{Deserialize, Serialize};

use crate::auth::authenticate;
use crate::error::{ApiError, ApiResult, Problem};
use crate::json::Json;
use crate::state::AppState;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginRequest {
    username: String,
    password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
}

#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, description = "An access token", body = TokenResponse),
        (status = 401, description = "Unknown username or wrong password", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn login(
    State(state): State<AppState>,
    Json(body): Json<LoginRequest>,
) -> ApiResult<impl IntoResponse> {
    let user = authenticate(state.storage.pool(), &body.username, &body.password)
        .await?
        .ok_or(ApiError::Unauthorized("unknown username or wrong password"))?;
    Ok(axum::Json(TokenResponse {
        access_token: state.tokens.issue(&user)?,
        token_type: "Bearer",
        expires_in: state.tokens.ttl_secs,
    }))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/auth/login", post(login))
}
