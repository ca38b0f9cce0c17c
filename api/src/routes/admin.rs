//! `GET /v1/admin/projections`: each projection's checkpoint, lag and state.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use projections::{PROJECTIONS, ProjectionStatus};

use crate::auth::{AuthUser, Role};
use crate::error::{ApiResult, Problem};
use crate::state::AppState;

#[utoipa::path(get, path = "/v1/admin/projections", tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, description = "Each projection's checkpoint, lag and state", body = Vec<ProjectionStatus>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn projections(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<axum::Json<Vec<ProjectionStatus>>> {
    user.require(&[Role::Admin], "admin")?;
    Ok(axum::Json(state.reads.projections(&PROJECTIONS).await?))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/admin/projections", get(projections))
}
