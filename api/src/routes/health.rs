//! `/healthz` (liveness), `/readyz` (readiness) and `/metrics`, on the main listener and on
//! the operations listener (`ops.bind`; docs/operations-endpoints.md).
//!
//! On the main listener `/healthz` is open; `/readyz` without credentials answers only
//! `{"status":"ready"}` (200) or `{"status":"unavailable"}` (503), for load balancers, and
//! with an admin's token or key the detailed document; `/metrics` needs the admin role. On
//! the operations listener all three are open. The expensive parts of the detailed `/readyz`
//! and of `/metrics` come from the shared [`crate::ops::OpsCache`] snapshot.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{StatusCode, header};
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

/// Writes metrics without labels, each with its `HELP` and `TYPE` lines (Prometheus text
/// format 0.0.4).
fn write_family<'a>(
    out: &mut String,
    kind: &str,
    metrics: impl IntoIterator<Item = (&'a str, &'a str, u64)>,
) {
    for (name, help, value) in metrics {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    description = "Prometheus text format. Needs the admin role here; open on the operations listener (`ESSAYFLOW_OPS_BIND`).",
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain"),
        (status = 401, description = "No valid credentials"),
        (status = 403, description = "Not an admin"),
    )
)]
pub(super) async fn metrics(_admin: Admin, State(state): State<AppState>) -> impl IntoResponse {
    metrics_answer(&state).await
}

/// `/metrics` on the operations listener: no authentication.
async fn ops_metrics(State(state): State<AppState>) -> impl IntoResponse {
    metrics_answer(&state).await
}

async fn metrics_answer(state: &AppState) -> impl IntoResponse + use<> {
    let snapshot = state.ops.get(state).await;
    let out = metrics_text(state, &snapshot);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The metrics in Prometheus text format 0.0.4: counters and gauges kept in memory, and the
/// database-derived gauges of `snapshot`.
fn metrics_text(state: &AppState, snapshot: &Snapshot) -> String {
    let m = &state.metrics;
    let mut out = String::new();
    let counters = [
        (
            "essayflow_commands_accepted_total",
            "Commands accepted",
            m.commands_accepted.load(Ordering::Relaxed),
        ),
        (
            "essayflow_commands_rejected_total",
            "Commands refused by the domain",
            m.commands_rejected.load(Ordering::Relaxed),
        ),
        (
            "essayflow_commands_conflicted_total",
            "Commands that gave up after repeated conflicts",
            m.commands_conflicted.load(Ordering::Relaxed),
        ),
        (
            "essayflow_commands_failed_total",
            "Commands that failed on storage",
            m.commands_failed.load(Ordering::Relaxed),
        ),
        (
            "essayflow_http_requests_total",
            "HTTP requests answered",
            m.http_requests.load(Ordering::Relaxed),
        ),
        (
            "essayflow_http_server_errors_total",
            "HTTP requests answered with 5xx",
            m.http_server_errors.load(Ordering::Relaxed),
        ),
    ];
    let id = state.identity.stats();
    let hashing = &state.identity.hasher().stats;
    let identity_counters = [
        (
            "essayflow_logins_total",
            "Successful logins",
            id.logins.load(Ordering::Relaxed),
        ),
        (
            "essayflow_login_failures_total",
            "Logins refused for wrong credentials",
            id.login_failures.load(Ordering::Relaxed),
        ),
        (
            "essayflow_logins_throttled_total",
            "Logins refused by the failed-login throttle (429)",
            id.logins_throttled.load(Ordering::Relaxed),
        ),
        (
            "essayflow_refresh_token_reuse_total",
            "Spent refresh tokens presented again (their sessions were revoked)",
            id.refresh_reuse.load(Ordering::Relaxed),
        ),
        (
            "essayflow_ws_sessions_revoked_total",
            "WebSocket sessions closed because their user or credential lost access",
            id.sessions_closed.load(Ordering::Relaxed),
        ),
        (
            "essayflow_password_hashes_total",
            "Password hashes computed",
            hashing.completed.load(Ordering::Relaxed),
        ),
        (
            "essayflow_password_hash_refused_busy_total",
            "Logins refused because the hashing queue was full (503)",
            hashing.refused_busy.load(Ordering::Relaxed),
        ),
        (
            "essayflow_password_hash_refused_deadline_total",
            "Logins refused after waiting past the hashing deadline (503)",
            hashing.refused_deadline.load(Ordering::Relaxed),
        ),
    ];
    write_family(
        &mut out,
        "counter",
        counters.into_iter().chain(identity_counters),
    );
    let limits = state.identity.hasher().limits();
    let identity_gauges = [
        (
            "essayflow_password_hashing",
            "Password hashes running now",
            hashing.in_progress.load(Ordering::SeqCst),
        ),
        (
            "essayflow_password_hashing_peak",
            "The most password hashes that ran at once since start",
            hashing.peak.load(Ordering::SeqCst),
        ),
        (
            "essayflow_password_hashing_waiting",
            "Logins waiting for a hashing worker",
            hashing.waiting.load(Ordering::SeqCst),
        ),
        (
            "essayflow_password_hash_workers",
            "Hashing workers (the bound on hashes at once)",
            limits.workers,
        ),
    ];
    write_family(
        &mut out,
        "gauge",
        identity_gauges.map(|(name, help, value)| (name, help, value as u64)),
    );
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
    if let Ok(statuses) = &snapshot.projections {
        let _ = writeln!(
            out,
            "# HELP essayflow_projection_lag_events Events not yet applied (counted up to 1000000)\n# TYPE essayflow_projection_lag_events gauge"
        );
        for s in statuses {
            let _ = writeln!(
                out,
                "essayflow_projection_lag_events{{projection=\"{}\"}} {}",
                s.name, s.lag
            );
        }
        let verified: Vec<_> = statuses
            .iter()
            .filter_map(|s| s.verification.as_ref().map(|v| (&s.name, v)))
            .collect();
        let _ = writeln!(
            out,
            "# HELP essayflow_projection_verified_timestamp_seconds When the projection was last verified against a fold of the log (Unix time)\n# TYPE essayflow_projection_verified_timestamp_seconds gauge"
        );
        for (name, v) in &verified {
            let at = chrono::DateTime::parse_from_rfc3339(&v.verified_at)
                .map(|t| t.timestamp())
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "essayflow_projection_verified_timestamp_seconds{{projection=\"{name}\"}} {at}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP essayflow_projection_verify_rows_differing Rows that differed at the last verification\n# TYPE essayflow_projection_verify_rows_differing gauge"
        );
        for (name, v) in &verified {
            let _ = writeln!(
                out,
                "essayflow_projection_verify_rows_differing{{projection=\"{name}\"}} {}",
                v.rows_differing
            );
        }
        let _ = writeln!(
            out,
            "# HELP essayflow_projection_rebuild_running Whether a rebuild beside the live model is running (1) or not (0)\n# TYPE essayflow_projection_rebuild_running gauge"
        );
        for s in statuses {
            let running = s.rebuild.as_ref().is_some_and(|r| r.state == "building");
            let _ = writeln!(
                out,
                "essayflow_projection_rebuild_running{{projection=\"{}\"}} {}",
                s.name,
                u8::from(running)
            );
        }
    }
    pipeline_metrics(state, snapshot, &mut out);
    live_metrics(state, &mut out);
    state.limits.write_metrics(&mut out);
    edge_metrics(state, snapshot, &mut out);
    out
}

/// The database circuit breaker, the connection layer, the WebSocket slots and the age of the
/// snapshot.
fn edge_metrics(state: &AppState, snapshot: &Snapshot, out: &mut String) {
    let breaker = &state.breaker;
    write_family(
        out,
        "gauge",
        [
            (
                "essayflow_db_breaker_state",
                "The database circuit breaker: 0 closed, 1 open (requests refused with 503), 2 half-open",
                breaker.state() as u64,
            ),
            (
                "essayflow_http_connections",
                "Open HTTP connections (upgraded WebSockets not counted)",
                state.connections.open.load(Ordering::Relaxed),
            ),
            (
                "essayflow_ws_connection_slots",
                "WebSocket connections holding a place under the per-node and per-user caps",
                state.live.slots.total() as u64,
            ),
            (
                "essayflow_ops_snapshot_age_milliseconds",
                "Age of the cached reading of projection statuses and follower lags",
                snapshot.age().as_millis() as u64,
            ),
        ],
    );
    write_family(
        out,
        "counter",
        [
            (
                "essayflow_db_breaker_opened_total",
                "Times the database circuit breaker opened",
                breaker.opened_total(),
            ),
            (
                "essayflow_http_connections_refused_total",
                "Connections refused at the connection cap",
                state.connections.refused.load(Ordering::Relaxed),
            ),
        ],
    );
}

fn live_metrics(state: &AppState, out: &mut String) {
    let m = &state.live.hub.metrics;
    let rows: [(&str, &str, &str, &std::sync::atomic::AtomicU64); 8] = [
        (
            "essayflow_ws_connections",
            "gauge",
            "Open WebSocket connections",
            &m.connections,
        ),
        (
            "essayflow_ws_subscriptions",
            "gauge",
            "Live topic subscriptions",
            &m.subscriptions,
        ),
        (
            "essayflow_ws_changes_sent_total",
            "counter",
            "Changes sent to clients",
            &m.changes_sent,
        ),
        (
            "essayflow_ws_snapshots_sent_total",
            "counter",
            "Snapshots sent to clients",
            &m.snapshots_sent,
        ),
        (
            "essayflow_ws_dropped_total",
            "counter",
            "Changes dropped from full send buffers",
            &m.dropped,
        ),
        (
            "essayflow_ws_lagged_total",
            "counter",
            "Subscriptions ended with a lagged message",
            &m.lagged,
        ),
        (
            "essayflow_ws_refused_total",
            "counter",
            "Client messages refused",
            &m.refused,
        ),
        (
            "essayflow_ws_resyncs_total",
            "counter",
            "Times this node checked every topic after possibly missing changes",
            &m.resyncs,
        ),
    ];
    for (name, kind, help, value) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            value.load(Ordering::Relaxed)
        );
    }
}

fn pipeline_metrics(state: &AppState, snapshot: &Snapshot, out: &mut String) {
    let p = &state.pipeline;
    let i = &p.ingress;
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, i64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as i64;
    let errors = |s: &Option<std::sync::Arc<commands::follower::FollowerStatus>>| {
        s.as_ref().map_or(0, |s| load(&s.errors))
    };
    let relay_lag = snapshot.relay_lag.unwrap_or(-1);
    let conductor_lag = snapshot.conductor_lag.unwrap_or(-1);
    metric(
        "essayflow_relay_lag_events",
        "gauge",
        "Events not yet acknowledged by the broker (counted up to 1000000; -1: unknown)",
        &[("", relay_lag)],
    );
    metric(
        "essayflow_relay_published_total",
        "counter",
        "Messages the broker acknowledged",
        &[("", load(&p.relay_published))],
    );
    metric(
        "essayflow_relay_published_bytes_total",
        "counter",
        "Payload bytes the broker acknowledged",
        &[("", load(&p.relay_published_bytes))],
    );
    metric(
        "essayflow_relay_errors_total",
        "counter",
        "Failed relay attempts (retried)",
        &[("", errors(&p.relay))],
    );
    metric(
        "essayflow_conductor_lag_events",
        "gauge",
        "Events the conductor has not yet handled (counted up to 1000000; -1: unknown)",
        &[("", conductor_lag)],
    );
    metric(
        "essayflow_conductor_commands_total",
        "counter",
        "Conductor commands that moved a pipeline on",
        &[("", load(&p.conductor_issued))],
    );
    metric(
        "essayflow_conductor_errors_total",
        "counter",
        "Failed conductor attempts (retried)",
        &[("", errors(&p.conductor))],
    );
    metric(
        "essayflow_ingress_lag_messages",
        "gauge",
        "Results waiting to be recorded (-1: not yet known)",
        &[("", p.ingress_lag.get())],
    );
    metric(
        "essayflow_ingress_results_total",
        "counter",
        "Results taken from the results topic or its HTTP twin",
        &[
            ("{outcome=\"recorded\"}", load(&i.recorded)),
            ("{outcome=\"duplicate\"}", load(&i.duplicates)),
        ],
    );
    metric(
        "essayflow_ingress_dead_lettered_total",
        "counter",
        "Results sent to the dead-letter topic",
        &[("", load(&i.dead_lettered))],
    );
    metric(
        "essayflow_ingress_retries_total",
        "counter",
        "Result attempts retried after a transient failure",
        &[("", load(&i.retried))],
    );
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
