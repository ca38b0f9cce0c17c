//! Telemetry: the global `tracing` subscriber, whose spans make both the log lines and the
//! OpenTelemetry trace spans; the request's correlation id and W3C trace context; and the
//! export of spans over OTLP (docs/tracing.md).
//!
//! - Logs: `ESSAYFLOW_LOG` (or `RUST_LOG`) filters them, `info` by default;
//!   `ESSAYFLOW_LOG_FORMAT=json` for JSON lines. A request's lines carry its span's
//!   `correlation_id` and `trace_id`.
//! - Traces: the spans of essayflow's own crates go through `tracing-opentelemetry` to the
//!   OpenTelemetry SDK, always (so that the W3C context a client sent is continued and passed
//!   on), and are exported only when an OTLP endpoint is configured ([`TelemetrySettings`],
//!   or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`):
//!   OTLP over HTTP with protobuf bodies, through a batch span processor whose queue is
//!   bounded (`max_queue_size`; a span that finds it full is dropped and counted, never
//!   waited for) and whose exports run on a thread of their own, so exporting never holds a
//!   request up. [`Telemetry::shutdown`] flushes what is queued within a bound.

use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use commands::TraceContext;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use serde::Deserialize;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use uuid::Uuid;

use crate::state::AppState;

/// The correlation id's header, on requests, answers and Kafka messages.
pub const CORRELATION_HEADER: &str = commands::trace::CORRELATION_ID;

/// The request's correlation id: the client's `X-Correlation-Id` if it is a UUID, else new.
#[derive(Debug, Clone, Copy)]
pub struct CorrelationId(pub Uuid);

/// The request's W3C trace id (32 lower-case hex digits), in the request's extensions when the
/// request span has a trace context: the client's `traceparent`'s trace id, or a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceId(pub String);

/// Trace export (`[telemetry]`). The standard OpenTelemetry variables win over these:
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the whole URL) or `OTEL_EXPORTER_OTLP_ENDPOINT` (a
/// base, `/v1/traces` appended) over `otlp_endpoint`; `OTEL_SERVICE_NAME` over
/// `service_name`; `OTEL_TRACES_SAMPLER` (and `_ARG`) over `sample_ratio`;
/// `OTEL_BSP_MAX_QUEUE_SIZE` over `max_queue_size`; `OTEL_EXPORTER_OTLP_TIMEOUT` over
/// `export_timeout_ms`; `OTEL_SDK_DISABLED=true` turns export off.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// The OTLP/HTTP collector's base URL (`http://collector:4318`); spans go to
    /// `<otlp_endpoint>/v1/traces`. Empty: spans are not exported
    /// (`ESSAYFLOW_TELEMETRY_OTLP_ENDPOINT`).
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute (`ESSAYFLOW_TELEMETRY_SERVICE_NAME`).
    pub service_name: String,
    /// The share of new traces sampled, from 0 to 1; a trace a client or processor started
    /// follows its own `sampled` flag (parent-based sampling)
    /// (`ESSAYFLOW_TELEMETRY_SAMPLE_RATIO`).
    pub sample_ratio: f64,
    /// Spans waiting for export, at most; past it spans are dropped (and counted in the
    /// SDK's log at shutdown) (`ESSAYFLOW_TELEMETRY_MAX_QUEUE_SIZE`).
    pub max_queue_size: usize,
    /// How long one export may take, in milliseconds (`ESSAYFLOW_TELEMETRY_EXPORT_TIMEOUT_MS`).
    pub export_timeout_ms: u64,
    /// How long shutting down waits for the queued spans to be exported, in milliseconds
    /// (`ESSAYFLOW_TELEMETRY_SHUTDOWN_TIMEOUT_MS`).
    pub shutdown_timeout_ms: u64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "essayflow".to_owned(),
            sample_ratio: 1.0,
            max_queue_size: 2048,
            export_timeout_ms: 10_000,
            shutdown_timeout_ms: 5_000,
        }
    }
}

impl TelemetrySettings {
    /// Refuses values that cannot work, with the setting's name.
    pub fn check(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            bail!("telemetry: sample_ratio must be from 0 to 1");
        }
        if !(1..=1_000_000).contains(&self.max_queue_size) {
            bail!("telemetry: max_queue_size must be from 1 to 1000000");
        }
        if !(1..=600_000).contains(&self.export_timeout_ms)
            || !(1..=600_000).contains(&self.shutdown_timeout_ms)
        {
            bail!("telemetry: export_timeout_ms and shutdown_timeout_ms must be from 1 to 600000");
        }
        if self.service_name.trim().is_empty() {
            bail!("telemetry: service_name must not be empty");
        }
        if !self.otlp_endpoint.is_empty() {
            http_url(&self.otlp_endpoint).context("telemetry: otlp_endpoint")?;
        }
        Ok(())
    }
}

fn http_url(url: &str) -> anyhow::Result<()> {
    let uri: axum::http::Uri = url.parse().context("not a URL")?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        bail!("{url:?} must be an http:// or https:// URL with a host");
    }
    Ok(())
}

/// Where spans are exported: the OTLP/HTTP traces URL, from the standard variables first, then
/// the settings; `None` when export is off.
pub fn traces_endpoint(
    settings: &TelemetrySettings,
    var: &impl Fn(&str) -> Option<String>,
) -> Option<String> {
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    let nonempty = |name: &str| {
        var(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if let Some(url) = nonempty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Some(url);
    }
    let base = nonempty("OTEL_EXPORTER_OTLP_ENDPOINT")
        .or_else(|| Some(settings.otlp_endpoint.clone()).filter(|e| !e.is_empty()))?;
    Some(format!("{}/v1/traces", base.trim_end_matches('/')))
}

/// What [`init`] set up. Keep it until the process ends, then call [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: SdkTracerProvider,
    endpoint: Option<String>,
    shutdown_timeout: Duration,
}

impl Telemetry {
    /// The OTLP traces URL spans go to; `None` when export is off.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Exports the spans still queued, waiting at most `shutdown_timeout_ms`.
    pub fn shutdown(self) {
        if self.endpoint.is_none() {
            return;
        }
        if let Err(error) = self.provider.shutdown_with_timeout(self.shutdown_timeout) {
            tracing::warn!(%error, "could not flush the trace spans at shutdown");
        }
    }
}

/// Installs the global subscriber (logs, and spans to OpenTelemetry) and, when an endpoint is
/// configured, the OTLP exporter. Nothing is installed if a global subscriber already exists
/// (the returned [`Telemetry`] then exports nothing this process makes). An endpoint that is
/// not a URL is an error; a collector that is down is not (its spans are dropped, and the SDK
/// logs the failed exports).
pub fn init(settings: &TelemetrySettings) -> anyhow::Result<Telemetry> {
    let env = |name: &str| std::env::var(name).ok();
    let endpoint = traces_endpoint(settings, &env);
    let provider = match &endpoint {
        None => SdkTracerProvider::builder()
            // No exporter: spans carry context (a client's `sampled` flag is kept) but are
            // recorded only under a sampled parent, and go nowhere.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
            .build(),
        Some(url) => exporting_provider(settings, url, &env)?,
    };
    let filter = EnvFilter::try_from_env("ESSAYFLOW_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = std::env::var("ESSAYFLOW_LOG_FORMAT").is_ok_and(|f| f == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    // Only essayflow's own spans (and its warnings and errors, as span events) become trace
    // spans, whatever the log filter: a library's spans would cost without telling more.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("essayflow"))
        .with_tracked_inactivity(false)
        .with_threads(false)
        // Contexts are taken from the spans themselves (`OpenTelemetrySpanExt::context`), not
        // from OpenTelemetry's thread-local current context: no attach and detach on every
        // poll of an entered span.
        .with_context_activation(false)
        .with_filter(filter_fn(|metadata| {
            let target = metadata.target();
            let krate = target.split("::").next().unwrap_or(target);
            matches!(krate, "api" | "commands" | "projections")
                && (metadata.is_span() || *metadata.level() <= tracing::Level::WARN)
        }));
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if installed {
        opentelemetry::global::set_tracer_provider(provider.clone());
        commands::trace::set_exporting(endpoint.is_some());
        if let Some(url) = &endpoint {
            tracing::info!(endpoint = %url, "exporting trace spans over OTLP/HTTP");
        }
    }
    Ok(Telemetry {
        provider,
        endpoint: endpoint.filter(|_| installed),
        shutdown_timeout: Duration::from_millis(settings.shutdown_timeout_ms),
    })
}

fn exporting_provider(
    settings: &TelemetrySettings,
    url: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    http_url(url).context("the OTLP traces endpoint")?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url);
    if env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").is_none()
        && env("OTEL_EXPORTER_OTLP_TIMEOUT").is_none()
    {
        exporter = exporter.with_timeout(Duration::from_millis(settings.export_timeout_ms));
    }
    let exporter = exporter
        .build()
        .context("building the OTLP span exporter")?;
    let mut batch = BatchConfigBuilder::default();
    if env("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
        batch = batch.with_max_queue_size(settings.max_queue_size);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let service_name = env("OTEL_SERVICE_NAME")
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| settings.service_name.clone());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    let mut provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource);
    // With `OTEL_TRACES_SAMPLER` set, the SDK's own reading of it stands.
    if env("OTEL_TRACES_SAMPLER").is_none() {
        let root = if settings.sample_ratio >= 1.0 {
            Sampler::AlwaysOn
        } else {
            Sampler::TraceIdRatioBased(settings.sample_ratio)
        };
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(root)));
    }
    Ok(provider.build())
}

/// The labels of the exemplar a request leaves on the request-duration histogram
/// ([`crate::metrics::track`]): `correlation_id` and, when the request has a trace context,
/// `trace_id` (both set by [`correlate`]), so that a metric leads to the request's log lines
/// and its trace. OpenMetrics caps an exemplar's label set at 128 characters (names and
/// values); `correlation_id` and a `trace_id` of 32 hex digits take 90.
pub fn exemplar_labels(extensions: &axum::http::Extensions) -> Vec<(String, String)> {
    let mut labels = Vec::with_capacity(2);
    if let Some(CorrelationId(id)) = extensions.get::<CorrelationId>() {
        labels.push(("correlation_id".to_owned(), id.to_string()));
    }
    if let Some(TraceId(id)) = extensions.get::<TraceId>() {
        labels.push(("trace_id".to_owned(), id.clone()));
    }
    labels
}

/// Gives every request a correlation id and a span that carries it.
pub async fn correlate(
    axum::extract::State(_state): axum::extract::State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = request
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
        .unwrap_or_else(Uuid::new_v4);
    request.extensions_mut().insert(CorrelationId(id));
    // Set (kept from the client, or made) by the edge's request-id layer, outside this one.
    let request_id = request
        .headers()
        .get(&crate::edge::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let span = tracing::info_span!(
        "request",
        "otel.kind" = "server",
        correlation_id = %id,
        trace_id = tracing::field::Empty,
        request_id = %request_id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    // W3C Trace Context: continue the client's trace, else start one.
    if let Some(parent) =
        TraceContext::extract(|name| request.headers().get(name).and_then(|v| v.to_str().ok()))
    {
        parent.adopt(&span);
    }
    if !span.is_disabled() {
        span.set_attribute("http.request.method", request.method().to_string());
        span.set_attribute("url.path", request.uri().path().to_owned());
    }
    if let Some(own) = TraceContext::of(&span) {
        let trace_id = own.trace_id();
        span.record("trace_id", trace_id.as_str());
        request.extensions_mut().insert(TraceId(trace_id));
    }
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(status = response.status().as_u16(), "answered");
    });
    if !span.is_disabled() {
        span.set_attribute(
            "http.response.status_code",
            i64::from(response.status().as_u16()),
        );
        if response.status().is_server_error() {
            span.set_status(opentelemetry::trace::Status::error(""));
        }
    }
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    response
}
