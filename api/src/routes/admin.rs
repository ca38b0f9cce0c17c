//! `GET /v1/admin/projections`: each projection's checkpoint, lag and state.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use projections::{PROJECTIONS, ProjectionStatus};

use crate::auth::{AuthUser, Role};
use crate::error::ApiResult;
use crate::state::AppState;

async fn projections(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<axum::Json<Vec<ProjectionStatus>>> {
    user.require(&[Role::Admin], "admin")?;
    Ok(axum::Json(state.reads.projections(&PROJECTIONS).await?))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/admin/projections", get(projections))
}
