//! Operators' view and control of the read models: each projection's checkpoint, lag, current
//! or last rebuild and last verification (`GET /v1/admin/projections`); a rebuild beside the
//! live model (`POST .../{name}/rebuild`) and a verification against a fold of the log
//! (`POST .../{name}/verify`), both run in the background and followed on the first.

use axum::Router;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use projections::rebuild::RebuildError;
use projections::{PROJECTIONS, ProjectionError, ProjectionStatus};
use serde::Serialize;

use crate::auth::{AuthUser, Role};
use crate::error::{ApiError, ApiResult, Problem};
use crate::identity::Actor;
use crate::identity::audit;
use crate::jobs::JobError;
use crate::state::AppState;

#[utoipa::path(get, path = "/v1/admin/projections", tag = "admin",
    description = "Admin role.",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "Each projection's checkpoint, lag, state, current or last rebuild (progress, events/s, time left) and last verification", body = Vec<ProjectionStatus>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn projections(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<axum::Json<Vec<ProjectionStatus>>> {
    user.require(&[Role::Admin], "admin")?;
    Ok(axum::Json(state.reads.projections(&PROJECTIONS).await?))
}

/// A job accepted to run in the background.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct JobAccepted {
    projection: String,
    /// `rebuild` or `verify`.
    job: String,
    /// For a rebuild: events the shadow already held (more than 0 when it resumes one that
    /// was interrupted).
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed_from: Option<u64>,
    /// Where to follow it.
    status: String,
}

fn accepted(body: JobAccepted) -> Response {
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_static("/v1/admin/projections"),
    );
    response
}

fn job_error(error: JobError) -> ApiError {
    match error {
        JobError::Projection(ProjectionError::Unknown(_))
        | JobError::Rebuild(RebuildError::Projection(ProjectionError::Unknown(_))) => {
            ApiError::NotFound
        }
        JobError::Rebuild(error @ RebuildError::AlreadyRunning { .. }) => {
            ApiError::JobRunning(error.to_string())
        }
        JobError::Verifying(name) => {
            ApiError::JobRunning(format!("a verification of {name} is already running"))
        }
        other => ApiError::Internal(other.into()),
    }
}

#[utoipa::path(post, path = "/v1/admin/projections/{name}/rebuild", tag = "admin",
    description = "Admin role.",
    params(("name" = String, Path, description = "The projection: `batch_state` or `dashboard` (the `enum`)")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, description = "The rebuild runs beside the live model and swaps it in when caught up; follow it on GET /v1/admin/projections", body = JobAccepted, headers(("Location" = String))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such projection", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A rebuild of it is already running", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn rebuild(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    user: AuthUser,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    user.require(&[Role::Admin], "admin")?;
    let started = state.jobs.rebuild(&name).await;
    audit_job(&state, &user, client, "projection.rebuild", &name, &started).await?;
    let started = started.map_err(job_error)?;
    tracing::info!(projection = started.projection, resumed_from = started.resumed_from, user = %user.id, "rebuild requested");
    Ok(accepted(JobAccepted {
        projection: started.projection.to_owned(),
        job: "rebuild".to_owned(),
        resumed_from: Some(started.resumed_from),
        status: "/v1/admin/projections".to_owned(),
    }))
}

#[utoipa::path(post, path = "/v1/admin/projections/{name}/verify", tag = "admin",
    description = "Admin role.",
    params(("name" = String, Path, description = "The projection: `batch_state` or `dashboard` (the `enum`)")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, description = "The live model is compared, row by row, with a fold of the log; the result appears on GET /v1/admin/projections", body = JobAccepted, headers(("Location" = String))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such projection", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A verification of it is already running", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn verify(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    user: AuthUser,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    user.require(&[Role::Admin], "admin")?;
    let projection = state.jobs.verify(&name);
    audit_job(
        &state,
        &user,
        client,
        "projection.verify",
        &name,
        &projection,
    )
    .await?;
    let projection = projection.map_err(job_error)?;
    tracing::info!(projection, user = %user.id, "verification requested");
    Ok(accepted(JobAccepted {
        projection: projection.to_owned(),
        job: "verify".to_owned(),
        resumed_from: None,
        status: "/v1/admin/projections".to_owned(),
    }))
}

/// Audits a rebuild or verification request: `ok` when it started, `refused` when it could
/// not (unknown projection, one already running), with the reason.
async fn audit_job<T>(
    state: &AppState,
    user: &AuthUser,
    client: SocketAddr,
    action: &str,
    projection: &str,
    started: &Result<T, JobError>,
) -> ApiResult<()> {
    let (outcome, detail) = match started {
        Ok(_) => ("ok", serde_json::json!({})),
        Err(error) => (
            "refused",
            serde_json::json!({ "reason": error.to_string() }),
        ),
    };
    audit::record_alone(
        state.identity.pool(),
        &audit::Record {
            actor: &Actor::user(user, Some(client.ip())),
            action,
            target: Some(projection.get(..64).unwrap_or(projection)),
            outcome,
            detail,
        },
    )
    .await?;
    Ok(())
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/projections", get(projections))
        .route("/v1/admin/projections/{name}/rebuild", post(rebuild))
        .route("/v1/admin/projections/{name}/verify", post(verify))
}
