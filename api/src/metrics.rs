//! `/metrics`: one OpenMetrics registry per running service, its HTTP metrics layer, and the
//! encoding of a scrape (the operator's guide is `docs/metrics.md`).
//!
//! - **One registry per service instance** ([`Metrics::build`]), built at start-up and kept in
//!   [`crate::state::Services`]; several services in one process (the tests) never share a
//!   series. The families are the `prometheus-client` crate's typed metrics, handed to the
//!   parts that record them where the thing happens: [`commands::metrics::CommandMetrics`]
//!   to the command service, [`commands::metrics::RelayMetrics`] to the relay,
//!   [`projections::metrics::ProjectionMetrics`] to the projection workers, the rate limiter's
//!   and the breaker's own families ([`crate::edge::ratelimit::Limits::register_metrics`],
//!   [`crate::edge::breaker::Breaker::register_metrics`]), and [`HttpMetrics`] to [`track`].
//!   Counters that other parts already keep as atomics (WebSocket hub, identity, hashing,
//!   connections, pipeline workers) are read at scrape time by [`PartsCollector`]: a fixed
//!   number of loads, whatever the number of connections or users.
//! - **The snapshot.** Projection lags, verification results, rebuilds and follower lags come
//!   from the cached [`crate::ops::Snapshot`] (read at most every `ops.cache_ms`, writing
//!   nothing), handed to [`SnapshotCollector`] just before each encoding.
//! - **Encoding.** OpenMetrics 1.0 text (`application/openmetrics-text; version=1.0.0`), the
//!   only text format `prometheus-client` writes; it is served whatever the `Accept` header
//!   asks (Prometheus asks for it first; exemplars exist only in it). Names follow the
//!   Prometheus conventions: `essayflow_` prefix, base units in the name (`_seconds`,
//!   `_bytes`), `_total` on counters.
//! - **Labels are bounded sets**: method (nine names or `other`), route template, status
//!   code, command name, outcome, projection, budget, key kind; never an id.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use crate::ops::Snapshot;
use crate::state::AppState;

/// The content type of every `/metrics` answer (OpenMetrics 1.0 text).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The prefix of every essayflow metric (`essayflow_...`).
pub const PREFIX: &str = "essayflow";

/// The longest an exemplar's label set may be: names and values together, in UTF-8 characters
/// (OpenMetrics 1.0, "Exemplars"). A longer set is not attached.
pub const EXEMPLAR_MAX_CHARS: usize = 128;

/// Bucket bounds in seconds of the HTTP request duration.
pub const HTTP_BUCKETS: [f64; 13] = commands::metrics::LATENCY_BUCKETS;

/// The labels of an HTTP request's duration.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpLabels {
    /// The method (`GET`, `HEAD`, `POST`, `PUT`, `PATCH`, `DELETE`, `OPTIONS`, `CONNECT`,
    /// `TRACE`), or `other`.
    pub method: &'static str,
    /// The route template (`/v1/batches/{id}`), or `unmatched`.
    pub route: String,
    /// The status code answered.
    pub status: u16,
}

/// An exemplar's label set: `correlation_id` (and, with tracing, `trace_id`).
pub type ExemplarLabels = Vec<(String, String)>;

type DurationHistogram = HistogramWithExemplars<ExemplarLabels>;

fn duration_histogram() -> DurationHistogram {
    HistogramWithExemplars::new(HTTP_BUCKETS.into_iter())
}

/// The HTTP families, recorded by [`track`]:
/// - `essayflow_http_request_duration_seconds{method,route,status}` (histogram, with an
///   exemplar per bucket: the correlation id of the last request counted in it);
/// - `essayflow_http_requests_in_flight` (gauge).
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    pub duration: Family<HttpLabels, DurationHistogram, fn() -> DurationHistogram>,
    pub in_flight: Gauge,
}

impl HttpMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            duration: Family::new_with_constructor(duration_histogram),
            in_flight: Gauge::default(),
        };
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's arrival at the edge to its answer's head, by method, route template and status (edge refusals included)",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "Requests inside the edge now (WebSockets count only until they upgrade)",
            metrics.in_flight.clone(),
        );
        metrics
    }
}

/// The `cap` label of `essayflow_ws_connections_refused_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CapLabels {
    /// `node` (`ws.max_connections`, 503) or `user` (`ws.max_connections_per_user`, 429).
    pub cap: &'static str,
}

/// A service instance's registry and the families the API records in.
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    /// WebSocket handshakes refused at a cap, by cap.
    pub ws_refused: Family<CapLabels, Counter>,
    snapshot: Arc<SnapshotCollector>,
    /// Route templates for requests answered before the router ran (edge refusals).
    routes: matchit::Router<Arc<str>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The families made before the services exist, to be handed to them; [`Metrics::build`]
/// finishes the registry once they do.
pub struct Families {
    root: Registry,
    pub commands: commands::metrics::CommandMetrics,
    pub relay: commands::metrics::RelayMetrics,
    pub projections: projections::metrics::ProjectionMetrics,
}

impl Families {
    /// A new registry with the write side's, the relay's and the projections' families, and
    /// `process_start_time_seconds` (the standard name, without the prefix).
    pub fn new() -> Self {
        let mut root = Registry::default();
        let started: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        started.set(since_epoch);
        root.register_with_unit(
            "process_start_time",
            "When this service instance started (Unix time)",
            Unit::Seconds,
            started,
        );
        let registry = root.sub_registry_with_prefix(PREFIX);
        let commands = commands::metrics::CommandMetrics::register(registry);
        let relay = commands::metrics::RelayMetrics::register(registry);
        let projections = projections::metrics::ProjectionMetrics::register(registry);
        Self {
            root,
            commands,
            relay,
            projections,
        }
    }
}

impl Default for Families {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`Metrics::build`] reads at scrape time.
pub struct Parts {
    pub live: Arc<crate::live::Live>,
    pub identity: crate::identity::Identity,
    pub connections: Arc<crate::server::ConnectionStats>,
    pub breaker: Arc<crate::edge::breaker::Breaker>,
    pub limits: Arc<crate::edge::ratelimit::Limits>,
    pub pipeline: Arc<crate::pipeline::PipelineStatus>,
}

impl Metrics {
    /// Finishes the registry of `families`: the API's own families, the rate limiter's and the
    /// breaker's, and the collectors of `parts` and of the snapshot.
    pub fn build(families: Families, parts: Parts) -> Self {
        let Families { mut root, .. } = families;
        let registry = root.sub_registry_with_prefix(PREFIX);
        let http = HttpMetrics::register(registry);
        let ws_refused = Family::<CapLabels, Counter>::default();
        for cap in ["node", "user"] {
            let _ = ws_refused.get_or_create(&CapLabels { cap });
        }
        registry.register(
            "ws_connections_refused",
            "WebSocket handshakes refused at a connection cap (node: 503, user: 429)",
            ws_refused.clone(),
        );
        parts.limits.register_metrics(registry);
        parts.breaker.register_metrics(registry);
        let snapshot = Arc::new(SnapshotCollector::default());
        registry.register_collector(Box::new(snapshot.clone()));
        registry.register_collector(Box::new(PartsCollector(parts)));
        Self {
            registry: root,
            http,
            ws_refused,
            snapshot,
            routes: route_templates(),
        }
    }

    /// The OpenMetrics text of every family, the values of `snapshot` included.
    pub fn encode(&self, snapshot: Arc<Snapshot>) -> String {
        self.snapshot.set(snapshot);
        let mut text = String::with_capacity(32 * 1024);
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            // Writing to a String fails only if a label value's encoder does; never expected.
            tracing::error!(%error, "encoding the metrics failed");
        }
        text
    }

    /// The route template of a request the router did not see (refused at the edge), from
    /// the documented paths; `None` when none matches.
    pub fn template_of(&self, path: &str) -> Option<&Arc<str>> {
        self.routes.at(path).ok().map(|m| m.value)
    }
}

/// Every documented path template (the OpenAPI document's), for [`Metrics::template_of`].
fn route_templates() -> matchit::Router<Arc<str>> {
    use utoipa::OpenApi;
    let mut routes = matchit::Router::new();
    for path in crate::routes::ApiDoc::openapi().paths.paths.keys() {
        if let Err(error) = routes.insert(path.as_str(), Arc::from(path.as_str())) {
            tracing::debug!(%error, path, "route template not usable for metrics");
        }
    }
    routes
}

/// The `/metrics` answer: the snapshot (cached; no database write), then the encoding.
pub async fn answer(state: &AppState) -> Response {
    let snapshot = state.ops.get(state).await;
    let text = state.metrics.encode(snapshot);
    ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
}

// ---- the HTTP layer -------------------------------------------------------------------------

/// The method label: the standard methods by name, anything else `other` (so a client cannot
/// make new series).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Decrements the in-flight gauge when the request ends (answered, or dropped).
struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The edge's metrics layer (inside [`crate::telemetry::correlate`], outside every layer that
/// may refuse): counts every request in flight and observes its duration by method, route
/// template and status, with the request's exemplar labels
/// ([`crate::telemetry::exemplar_labels`]). The route is the router's [`MatchedPath`] (which
/// [`matched_route`] puts on the answer), else, for an answer made before routing (a 413,
/// 429 or 503 of the edge, a timeout), the documented template the path matches, else
/// `unmatched`.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let http = &state.metrics.http;
    let method = method_label(request.method());
    let uri = request.uri().clone();
    let exemplar = crate::telemetry::exemplar_labels(request.extensions());
    http.in_flight.inc();
    let in_flight = InFlight(http.in_flight.clone());
    let started = Instant::now();
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    drop(in_flight);
    let route = match response.extensions().get::<MatchedPath>() {
        Some(matched) => matched.as_str().to_owned(),
        None => state
            .metrics
            .template_of(uri.path())
            .map_or_else(|| "unmatched".to_owned(), |t| t.to_string()),
    };
    let labels = HttpLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    let size: usize = exemplar.iter().map(|(k, v)| k.len() + v.len()).sum();
    let exemplar = (!exemplar.is_empty() && size <= EXEMPLAR_MAX_CHARS).then_some(exemplar);
    http.duration
        .get_or_create(&labels)
        .observe(seconds, exemplar, Some(SystemTime::now()));
    response
}

/// A route layer: puts the router's [`MatchedPath`] on the answer, where [`track`] reads it.
pub async fn matched_route(matched: MatchedPath, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    response.extensions_mut().insert(matched);
    response
}

// ---- collectors -----------------------------------------------------------------------------

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn load(value: &std::sync::atomic::AtomicU64) -> u64 {
    value.load(std::sync::atomic::Ordering::Relaxed)
}

fn load_usize(value: &std::sync::atomic::AtomicUsize) -> i64 {
    value.load(std::sync::atomic::Ordering::Relaxed) as i64
}

/// The values of the last [`Snapshot`] a scrape read: follower and projection lags, the last
/// verification, rebuilds, and the snapshot's age.
#[derive(Debug, Default)]
pub struct SnapshotCollector {
    latest: Mutex<Option<Arc<Snapshot>>>,
}

impl SnapshotCollector {
    fn set(&self, snapshot: Arc<Snapshot>) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot);
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(snapshot) = self
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let age = ConstGauge::new(snapshot.age().as_secs_f64());
        age.encode(encoder.encode_descriptor(
            "ops_snapshot_age",
            "Age of the cached reading of projection statuses and follower lags",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)?;
        gauge(
            &mut encoder,
            "relay_lag_events",
            "Events not yet acknowledged by the broker (counted up to 1000000; -1: unknown)",
            snapshot.relay_lag.unwrap_or(-1),
        )?;
        gauge(
            &mut encoder,
            "conductor_lag_events",
            "Events the conductor has not yet handled (counted up to 1000000; -1: unknown)",
            snapshot.conductor_lag.unwrap_or(-1),
        )?;
        let Ok(statuses) = &snapshot.projections else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "projection_lag_events",
            "Events not yet applied to a projection (counted up to 1000000)",
            None,
            MetricType::Gauge,
        )?;
        for s in statuses {
            ConstGauge::new(s.lag).encode(family.encode_family(&[("projection", &*s.name)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "projection_rebuild_running",
            "Whether a rebuild beside the live model is running (1) or not (0)",
            None,
            MetricType::Gauge,
        )?;
        for s in statuses {
            let running = s.rebuild.as_ref().is_some_and(|r| r.state == "building");
            ConstGauge::new(i64::from(running))
                .encode(family.encode_family(&[("projection", &*s.name)])?)?;
        }
        let verified: Vec<_> = statuses
            .iter()
            .filter_map(|s| s.verification.as_ref().map(|v| (&*s.name, v)))
            .collect();
        if verified.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "projection_verified_timestamp",
            "When the projection was last verified against a fold of the log (Unix time)",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (name, v) in &verified {
            let at = chrono::DateTime::parse_from_rfc3339(&v.verified_at)
                .map(|t| t.timestamp())
                .unwrap_or(0);
            ConstGauge::new(at).encode(family.encode_family(&[("projection", *name)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "projection_verify_rows_differing",
            "Rows that differed at the last verification",
            None,
            MetricType::Gauge,
        )?;
        for (name, v) in &verified {
            ConstGauge::new(v.rows_differing)
                .encode(family.encode_family(&[("projection", *name)])?)?;
        }
        Ok(())
    }
}

/// Counters and gauges that other parts keep as atomics, read at scrape time (a fixed number
/// of loads: the cost does not grow with connections or users).
pub struct PartsCollector(Parts);

impl fmt::Debug for PartsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartsCollector").finish_non_exhaustive()
    }
}

impl Collector for PartsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let parts = &self.0;
        let e = &mut encoder;
        // Identity and password hashing.
        let id = parts.identity.stats();
        counter(e, "logins", "Successful logins", load(&id.logins))?;
        counter(
            e,
            "login_failures",
            "Logins refused for wrong credentials",
            load(&id.login_failures),
        )?;
        counter(
            e,
            "logins_throttled",
            "Logins refused by the failed-login throttle (429)",
            load(&id.logins_throttled),
        )?;
        counter(
            e,
            "refresh_token_reuse",
            "Spent refresh tokens presented again (their sessions were revoked)",
            load(&id.refresh_reuse),
        )?;
        counter(
            e,
            "ws_sessions_revoked",
            "WebSocket sessions closed because their user or credential lost access",
            load(&id.sessions_closed),
        )?;
        let hasher = parts.identity.hasher();
        let hashing = &hasher.stats;
        counter(
            e,
            "password_hashes",
            "Password hashes computed",
            load(&hashing.completed),
        )?;
        counter(
            e,
            "password_hash_refused_busy",
            "Logins refused because the hashing queue was full (503)",
            load(&hashing.refused_busy),
        )?;
        counter(
            e,
            "password_hash_refused_deadline",
            "Logins refused after waiting past the hashing deadline (503)",
            load(&hashing.refused_deadline),
        )?;
        gauge(
            e,
            "password_hashing",
            "Password hashes running now",
            load_usize(&hashing.in_progress),
        )?;
        gauge(
            e,
            "password_hashing_peak",
            "The most password hashes that ran at once since start",
            load_usize(&hashing.peak),
        )?;
        gauge(
            e,
            "password_hashing_waiting",
            "Logins waiting for a hashing worker",
            load_usize(&hashing.waiting),
        )?;
        gauge(
            e,
            "password_hash_workers",
            "Hashing workers (the bound on hashes at once)",
            hasher.limits().workers as i64,
        )?;
        // WebSockets.
        let live = &parts.live.hub.metrics;
        gauge(
            e,
            "ws_connections",
            "Open WebSocket connections",
            load(&live.connections) as i64,
        )?;
        gauge(
            e,
            "ws_subscriptions",
            "Live topic subscriptions",
            load(&live.subscriptions) as i64,
        )?;
        gauge(
            e,
            "ws_connection_slots",
            "WebSocket connections holding a place under the per-node and per-user caps",
            parts.live.slots.total() as i64,
        )?;
        counter(
            e,
            "ws_changes_sent",
            "Change messages sent to clients",
            load(&live.changes_sent),
        )?;
        counter(
            e,
            "ws_snapshots_sent",
            "Snapshot messages sent to clients",
            load(&live.snapshots_sent),
        )?;
        counter(
            e,
            "ws_dropped",
            "Changes dropped from full send buffers",
            load(&live.dropped),
        )?;
        counter(
            e,
            "ws_lagged",
            "Lagged messages sent (subscriptions ended after dropped changes)",
            load(&live.lagged),
        )?;
        counter(
            e,
            "ws_refused",
            "Client messages refused",
            load(&live.refused),
        )?;
        counter(
            e,
            "ws_resyncs",
            "Times this node checked every topic after possibly missing changes",
            load(&live.resyncs),
        )?;
        // Connections and the breaker.
        gauge(
            e,
            "http_connections",
            "Open HTTP connections (upgraded WebSockets not counted)",
            load(&parts.connections.open) as i64,
        )?;
        counter(
            e,
            "http_connections_refused",
            "Connections refused at the connection cap",
            load(&parts.connections.refused),
        )?;
        gauge(
            e,
            "db_breaker_state",
            "The database circuit breaker: 0 closed, 1 open (requests refused with 503), 2 half-open",
            parts.breaker.state() as i64,
        )?;
        counter(
            e,
            "db_breaker_opened",
            "Times the database circuit breaker opened",
            parts.breaker.opened_total(),
        )?;
        gauge(
            e,
            "rate_limit_keys",
            "Users, API keys and addresses with rate-limit state on this node",
            parts.limits.tracked_keys() as i64,
        )?;
        // The pipeline workers.
        let p = &parts.pipeline;
        let errors = |s: &Option<Arc<commands::follower::FollowerStatus>>| {
            s.as_ref().map_or(0, |s| load(&s.errors))
        };
        counter(
            e,
            "relay_published",
            "Messages the broker acknowledged",
            load(&p.relay_published),
        )?;
        let bytes = ConstCounter::new(load(&p.relay_published_bytes));
        bytes.encode(e.encode_descriptor(
            "relay_published",
            "Payload bytes the broker acknowledged",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?)?;
        counter(
            e,
            "relay_errors",
            "Failed relay attempts (retried)",
            errors(&p.relay),
        )?;
        counter(
            e,
            "conductor_commands",
            "Conductor commands that moved a pipeline on",
            load(&p.conductor_issued),
        )?;
        counter(
            e,
            "conductor_errors",
            "Failed conductor attempts (retried)",
            errors(&p.conductor),
        )?;
        gauge(
            e,
            "ingress_lag_messages",
            "Results waiting to be recorded (-1: not yet known)",
            p.ingress_lag.get(),
        )?;
        let i = &p.ingress;
        let mut family = e.encode_descriptor(
            "ingress_results",
            "Results taken from the results topic or its HTTP twin, by outcome",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(load(&i.recorded))
            .encode(family.encode_family(&[("outcome", "recorded")])?)?;
        ConstCounter::new(load(&i.duplicates))
            .encode(family.encode_family(&[("outcome", "duplicate")])?)?;
        counter(
            e,
            "ingress_dead_lettered",
            "Results sent to the dead-letter topic",
            load(&i.dead_lettered),
        )?;
        counter(
            e,
            "ingress_retries",
            "Result attempts retried after a transient failure",
            load(&i.retried),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_standard_ones_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::DELETE), "DELETE");
        let odd = Method::from_bytes(b"BREW").expect("a method");
        assert_eq!(method_label(&odd), "other");
    }

    #[test]
    fn a_path_answered_before_routing_gets_its_documented_template() {
        let routes = route_templates();
        let template = |path: &str| routes.at(path).ok().map(|m| m.value.to_string());
        assert_eq!(
            template("/v1/batches/0b6c1c9e-8a8c-4d4e-9b1e-3f2a1c0d9e8f/essays").as_deref(),
            Some("/v1/batches/{id}/essays")
        );
        assert_eq!(template("/v1/batches").as_deref(), Some("/v1/batches"));
        assert_eq!(template("/v1/no-such-thing"), None);
    }
}
