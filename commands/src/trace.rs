//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) across the hops a command takes
//! after its request: the event store, the bus, the processors' results, the read models and
//! the WebSocket change.
//!
//! A [`TraceContext`] is the context of one span: what the `traceparent` and `tracestate`
//! headers carry. It is read and written only by OpenTelemetry's `TraceContextPropagator`, so
//! every string essayflow stores or sends is a valid W3C header (version `00`), and anything
//! else a client or a processor sends is ignored as if absent.
//!
//! Where it travels:
//! - HTTP: the request span continues the client's `traceparent` (`api::telemetry`).
//! - Events: the command service stamps the context of the span that issued the command into
//!   [`crate::EventMetadata`] (`traceparent`, `tracestate`; older events have neither).
//! - Bus: the relay sends the event's context and its correlation id as message headers
//!   ([`TRACEPARENT`], [`TRACESTATE`], [`CORRELATION_ID`]) with the event and with every phase
//!   request it causes; processors echo them on their results, and the ingress continues both.
//! - Read side: a projection's live change remembers the context of the event that made it,
//!   so the WebSocket `change` is sent inside a span of the same trace.
//!
//! Cost: the spans of background work (the relay's publishes, a projection's applies, a
//! WebSocket change, a result recorded) are made only when spans are exported
//! ([`exporting`]) and the causing context was sampled ([`spans_for`]); otherwise the context
//! is passed on as it came, which costs a header's worth of text and no span.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C `traceparent` header (also a Kafka message header of that name).
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header (also a Kafka message header of that name).
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` carried on, in bytes: the 512 characters W3C Trace Context
/// (section 3.3.1.5) asks every platform to propagate at least.
pub const MAX_TRACESTATE: usize = 512;
/// The correlation id's header on HTTP and on Kafka messages: a UUID.
pub const CORRELATION_ID: &str = "x-correlation-id";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Says whether spans leave this process (an OTLP endpoint is configured). Set once at start-up
/// by `api::telemetry::init`.
pub fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

/// Whether spans leave this process.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Whether work caused by `parent` gets a span of its own: only when spans are exported and
/// `parent` is sampled (a span under an unsampled parent would be dropped anyway).
pub fn spans_for(parent: Option<&TraceContext>) -> bool {
    exporting() && parent.is_some_and(TraceContext::is_sampled)
}

/// The trace context of one span (W3C `traceparent` and `tracestate`). Cheap to clone (a few
/// integers, and the trace state if there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext(SpanContext);

impl TraceContext {
    /// The context of `span`, if it has a valid one (the OpenTelemetry layer is installed and
    /// the span is enabled).
    pub fn of(span: &tracing::Span) -> Option<Self> {
        let context = span.context();
        let span_context = context.span().span_context().clone();
        span_context.is_valid().then_some(Self(span_context))
    }

    /// The context of the current span, if any.
    pub fn current() -> Option<Self> {
        Self::of(&tracing::Span::current())
    }

    /// Reads `traceparent` and `tracestate` through `get` (header lookup by lower-case name);
    /// `None` when there is no valid `traceparent`. A `tracestate` longer than
    /// [`MAX_TRACESTATE`] is dropped (the trace continues without it): it is stored with every
    /// event and sent with every message, so a client cannot make that cost grow.
    pub fn extract<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Self> {
        let carrier = Carrier {
            traceparent: get(TRACEPARENT),
            tracestate: get(TRACESTATE).filter(|s| s.len() <= MAX_TRACESTATE),
        };
        let context = TraceContextPropagator::new().extract(&carrier);
        let span_context = context.span().span_context().clone();
        span_context.is_valid().then_some(Self(span_context))
    }

    /// The context written as `traceparent` (and `tracestate`, if any).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        Self::extract(|name| match name {
            TRACEPARENT => Some(traceparent),
            TRACESTATE => tracestate,
            _ => None,
        })
    }

    /// The `traceparent` and `tracestate` header values (the latter only when not empty).
    pub fn to_headers(&self) -> (String, Option<String>) {
        let mut setter = Setter::default();
        let context = opentelemetry::Context::new().with_remote_span_context(self.0.clone());
        TraceContextPropagator::new().inject_context(&context, &mut setter);
        (
            setter.traceparent.unwrap_or_default(),
            setter.tracestate.filter(|s| !s.is_empty()),
        )
    }

    /// Adds `traceparent` (and `tracestate`) to a list of message headers.
    pub fn add_to(&self, headers: &mut Vec<(String, String)>) {
        let (traceparent, tracestate) = self.to_headers();
        headers.push((TRACEPARENT.to_owned(), traceparent));
        if let Some(tracestate) = tracestate {
            headers.push((TRACESTATE.to_owned(), tracestate));
        }
    }

    /// The trace id: 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        self.0.trace_id().to_string()
    }

    /// The span id: 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        self.0.span_id().to_string()
    }

    /// Whether the trace is sampled (the `sampled` flag of `traceparent`).
    pub fn is_sampled(&self) -> bool {
        self.0.is_sampled()
    }

    /// The OpenTelemetry span context.
    pub fn span_context(&self) -> &SpanContext {
        &self.0
    }

    /// Makes `span` a child of this context (before it is first entered; later it is too late
    /// and nothing changes).
    pub fn adopt(&self, span: &tracing::Span) {
        let context = opentelemetry::Context::new().with_remote_span_context(self.0.clone());
        let _ = span.set_parent(context);
    }
}

/// The context to carry on for work `span` does on behalf of `parent`: `span`'s own when it has
/// one, else `parent` as it came.
pub fn continued(span: &tracing::Span, parent: Option<&TraceContext>) -> Option<TraceContext> {
    TraceContext::of(span).or_else(|| parent.cloned())
}

/// Looks a header up in a list of message headers, ignoring the case of its name.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

struct Carrier<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent,
            TRACESTATE => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

#[derive(Default)]
struct Setter {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Setter {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE => self.tracestate = Some(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn an_oversized_tracestate_is_dropped_and_the_trace_goes_on() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let long = format!("vendor={}", "a".repeat(MAX_TRACESTATE));
        let context = TraceContext::parse(traceparent, Some(&long)).expect("valid");
        let (sent, state) = context.to_headers();
        assert_eq!(sent, traceparent);
        assert_eq!(state, None);
    }

    #[test]
    fn a_traceparent_round_trips_with_its_tracestate() {
        let context = TraceContext::parse(PARENT, Some("vendor=abc,other=1")).expect("valid");
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id(), "00f067aa0ba902b7");
        assert!(context.is_sampled());
        let (traceparent, tracestate) = context.to_headers();
        assert_eq!(traceparent, PARENT);
        assert_eq!(tracestate.as_deref(), Some("vendor=abc,other=1"));
    }

    #[test]
    fn malformed_or_all_zero_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn message_headers_are_found_whatever_the_case_of_their_name() {
        let headers = vec![("TraceParent".to_owned(), PARENT.to_owned())];
        assert_eq!(header(&headers, TRACEPARENT), Some(PARENT));
        assert_eq!(header(&headers, TRACESTATE), None);
    }

    #[test]
    fn no_span_is_made_for_unsampled_or_missing_contexts() {
        let unsampled = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            None,
        );
        assert!(!spans_for(unsampled.as_ref()));
        assert!(!spans_for(None));
    }
}
