//! `/healthz` (liveness), `/readyz` (readiness) and `/metrics`, on the main listener and on
//! the operations listener (`ops.bind`; docs/operations-endpoints.md).
//!
//! On the main listener `/healthz` is open; `/readyz` without credentials answers only
//! `{"status":"ready"}` (200) or `{"status":"unavailable"}` (503), for load balancers, and
//! with an admin's token or key the detailed document; `/metrics` needs the admin role. On
//! the operations listener all three are open. The expensive parts of the detailed `/readyz`
//! and of `/metrics` come from the shared [`crate::ops::OpsCache`] snapshot.

use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::users::Admin;
use crate::error::ApiError;
use crate::ops::{DatabaseCheck, Snapshot};
use crate::state::AppState;

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "Alive")))]
pub(super) async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Whether a request carries credentials (then `/readyz` answers the detailed document, to
/// an admin only).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    description = "Without credentials: only `{\"status\":\"ready\"}` (200) or `{\"status\":\"unavailable\"}` (503), for load balancers. With an admin's token or API key: the detailed document (database and its circuit breaker, projections, pipeline workers). Also open on the operations listener (`ESSAYFLOW_OPS_BIND`).",
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Ready (with an admin's credentials: `ready` or `degraded`, with dependency detail)"),
        (status = 503, description = "The database cannot be reached"),
        (status = 401, description = "Credentials were sent and are not valid"),
        (status = 403, description = "Credentials of a user who is not an admin"),
    )
)]
pub(super) async fn readyz(State(state): State<AppState>, request: Request) -> Response {
    if crate::auth::has_credential(request.headers()) {
        let (mut parts, _) = request.into_parts();
        if let Err(refused) = Admin::from_request_parts(&mut parts, &state).await {
            return refused.into_response();
        }
        return detailed_readiness(&state).await.into_response();
    }
    let ready = !matches!(state.ops.database(&state).await, DatabaseCheck::Down(_));
    if ready {
        (StatusCode::OK, axum::Json(json!({ "status": "ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "unavailable" })),
        )
            .into_response()
    }
}

/// `/readyz` on the operations listener: always the detailed document.
async fn ops_readyz(State(state): State<AppState>) -> Response {
    detailed_readiness(&state).await.into_response()
}

/// The detailed readiness document: `ready`, `degraded` (a pipeline worker is failing:
/// commands are still accepted, so 200) or `unavailable` (503: the database cannot be
/// reached); the database with its circuit breaker, the projections and the pipeline
/// workers, and the age of the snapshot they were read from.
async fn detailed_readiness(state: &AppState) -> (StatusCode, axum::Json<Value>) {
    let database = state.ops.database(state).await;
    let snapshot = state.ops.get(state).await;
    let ready = !matches!(database, DatabaseCheck::Down(_));
    let pipeline = pipeline_health(state, &snapshot);
    let degraded = pipeline["status"] != "ok";
    let (status, error) = match &database {
        DatabaseCheck::Up => ("ok", None),
        DatabaseCheck::Busy => ("busy", None),
        DatabaseCheck::Down(reason) => ("down", Some(reason.clone())),
    };
    let body = json!({
        "status": match (ready, degraded) {
            (false, _) => "unavailable",
            (true, true) => "degraded",
            (true, false) => "ready",
        },
        "checks": {
            "database": {
                "engine": state.storage.engine().name(),
                "status": status,
                "error": error,
                "breaker": state.breaker.report(),
            },
            "projections": snapshot.projections.as_ref().ok(),
            "pipeline": pipeline,
        },
        "snapshot": {
            "taken_at": snapshot.taken_at_text(),
            "age_ms": snapshot.age().as_millis() as u64,
            "max_age_ms": state.settings.ops.cache_ms,
            "error": snapshot.projections.as_ref().err(),
        },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

/// The pipeline workers' health. Commands are still accepted while the broker is down, so a
/// failing relay makes the node `degraded`, not unready. Lags come from the snapshot.
fn pipeline_health(state: &AppState, snapshot: &Snapshot) -> Value {
    let p = &state.pipeline;
    let worker = |status: &Option<std::sync::Arc<commands::follower::FollowerStatus>>,
                  lag: Option<i64>| match status {
        None => json!({ "status": "not running on this node" }),
        Some(s) => {
            let error = s.last_error();
            json!({
                "status": if error.is_some() { "failing" } else { "ok" },
                "lag": lag,
                "consecutive_failures": s.failing.load(Ordering::Relaxed),
                "error": error,
            })
        }
    };
    let relay = worker(&p.relay, snapshot.relay_lag);
    let conductor = worker(&p.conductor, snapshot.conductor_lag);
    let ok = relay["status"] != "failing" && conductor["status"] != "failing";
    json!({
        "status": if ok { "ok" } else { "degraded" },
        "bus": p.bus,
        "topic_prefix": p.topics.prefix(),
        "relay": relay,
        "conductor": conductor,
        "ingress": {
            "lag": p.ingress_lag.get(),
            "dead_lettered": p.ingress.dead_lettered.load(Ordering::Relaxed),
        },
    })
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    description = "OpenMetrics 1.0 text (`application/openmetrics-text; version=1.0.0`), whatever `Accept` asks; the metrics are listed in docs/metrics.md. Needs the admin role here; open on the operations listener (`ESSAYFLOW_OPS_BIND`).",
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "OpenMetrics 1.0 text", content_type = "application/openmetrics-text"),
        (status = 401, description = "No valid credentials"),
        (status = 403, description = "Not an admin"),
    )
)]
pub(super) async fn metrics(_admin: Admin, State(state): State<AppState>) -> Response {
    metrics_answer(&state).await
}

/// `/metrics` on the operations listener: no authentication.
async fn ops_metrics(State(state): State<AppState>) -> Response {
    metrics_answer(&state).await
}

async fn metrics_answer(state: &AppState) -> Response {
    crate::metrics::answer(state).await
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The operations listener's routes: `/healthz`, the detailed `/readyz` and `/metrics`,
/// without authentication; anything else 404.
pub fn ops_router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(ops_readyz))
        .route("/metrics", get(ops_metrics))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}
