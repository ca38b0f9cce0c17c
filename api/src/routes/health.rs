//! `/healthz` (liveness), `/readyz` (readiness with dependency detail), `/metrics`.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use projections::PROJECTIONS;
use serde_json::json;

use crate::state::AppState;

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "Alive")))]
pub(super) async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/readyz", tag = "ops", responses((status = 200, description = "Ready, with dependency detail"), (status = 503, description = "A dependency is down")))]
pub(super) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database = state.storage.ping().await;
    let projections = match &database {
        Ok(()) => state.reads.projections(&PROJECTIONS).await.ok(),
        Err(_) => None,
    };
    let ready = database.is_ok() && projections.is_some();
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "checks": {
            "database": {
                "engine": state.storage.engine().name(),
                "status": if database.is_ok() { "ok" } else { "down" },
                "error": database.err().map(|e| {
                    tracing::warn!(error = %e, "readiness: the database does not answer");
                    "the database does not answer"
                }),
            },
            "projections": projections,
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let m = &state.metrics;
    let mut out = String::new();
    let counters = [
        (
            "essayflow_commands_accepted_total",
            "Commands accepted",
            &m.commands_accepted,
        ),
        (
            "essayflow_commands_rejected_total",
            "Commands refused by the domain",
            &m.commands_rejected,
        ),
        (
            "essayflow_commands_conflicted_total",
            "Commands that gave up after repeated conflicts",
            &m.commands_conflicted,
        ),
        (
            "essayflow_commands_failed_total",
            "Commands that failed on storage",
            &m.commands_failed,
        ),
        (
            "essayflow_http_requests_total",
            "HTTP requests answered",
            &m.http_requests,
        ),
        (
            "essayflow_http_server_errors_total",
            "HTTP requests answered with 5xx",
            &m.http_server_errors,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP essayflow_projection_errors_total Failed projection steps\n# TYPE essayflow_projection_errors_total counter"
    );
    for (name, value) in &m.projection_errors {
        let _ = writeln!(
            out,
            "essayflow_projection_errors_total{{projection=\"{name}\"}} {}",
            value.load(Ordering::Relaxed)
        );
    }
    if let Ok(statuses) = state.reads.projections(&PROJECTIONS).await {
        let _ = writeln!(
            out,
            "# HELP essayflow_projection_lag_events Events not yet applied\n# TYPE essayflow_projection_lag_events gauge"
        );
        for s in statuses {
            let _ = writeln!(
                out,
                "essayflow_projection_lag_events{{projection=\"{}\"}} {}",
                s.name, s.lag
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}
