//! `GET /v1/dashboard`: the caller's totals by status, active batches and recent activity.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use projections::Dashboard;

use crate::auth::AuthUser;
use crate::error::ApiResult;
use crate::json::Query;
use crate::routes::batches::{Consistency, wait_until_applied};
use crate::state::AppState;

#[utoipa::path(get, path = "/v1/dashboard", tag = "dashboard",
    description = "The caller's own dashboard (whatever the role).",
    params(("min_position" = Option<i64>, Query, description = "Wait until the read model has applied this position")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "The caller's totals by status, active batches and recent activity", body = Dashboard)))]
pub(super) async fn dashboard(
    State(state): State<AppState>,
    user: AuthUser,
    Query(consistency): Query<Consistency>,
) -> ApiResult<axum::Json<Dashboard>> {
    wait_until_applied(&state, "dashboard", consistency.min_position).await?;
    Ok(axum::Json(
        state.reads.dashboard(&user.id.to_string()).await?,
    ))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/dashboard", get(dashboard))
}
