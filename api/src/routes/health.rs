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
    let pipeline = pipeline_health(&state, database.is_ok()).await;
    let degraded = pipeline["status"] != "ok";
    let body = json!({
        "status": match (ready, degraded) {
            (false, _) => "unavailable",
            (true, true) => "degraded",
            (true, false) => "ready",
        },
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
            "pipeline": pipeline,
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

/// Events a log follower (`relay`, `conductor`) has still to handle; `None` when unknown.
async fn follower_lag(state: &AppState, name: &str) -> Option<i64> {
    let at = commands::checkpoint::load_checkpoint(state.storage.pool(), name)
        .await
        .ok()?;
    state.log.count_after(at).await.ok()
}

/// The pipeline workers' health. Commands are still accepted while the broker is down, so a
/// failing relay makes the node `degraded`, not unready.
async fn pipeline_health(state: &AppState, database_up: bool) -> serde_json::Value {
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
    let (relay_lag, conductor_lag) = if database_up {
        (
            follower_lag(state, "relay").await,
            follower_lag(state, "conductor").await,
        )
    } else {
        (None, None)
    };
    let relay = worker(&p.relay, relay_lag);
    let conductor = worker(&p.conductor, conductor_lag);
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

#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
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
    if let Ok(statuses) = state.reads.projections(&PROJECTIONS).await {
        let _ = writeln!(
            out,
            "# HELP essayflow_projection_lag_events Events not yet applied\n# TYPE essayflow_projection_lag_events gauge"
        );
        for s in &statuses {
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
        for s in &statuses {
            let running = s.rebuild.as_ref().is_some_and(|r| r.state == "building");
            let _ = writeln!(
                out,
                "essayflow_projection_rebuild_running{{projection=\"{}\"}} {}",
                s.name,
                u8::from(running)
            );
        }
    }
    pipeline_metrics(&state, &mut out).await;
    live_metrics(&state, &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
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

async fn pipeline_metrics(state: &AppState, out: &mut String) {
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
    let relay_lag = follower_lag(state, "relay").await.unwrap_or(-1);
    let conductor_lag = follower_lag(state, "conductor").await.unwrap_or(-1);
    metric(
        "essayflow_relay_lag_events",
        "gauge",
        "Events not yet acknowledged by the broker",
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
        "Events the conductor has not yet handled",
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
