//! The write side's metric families (the `prometheus-client` crate's OpenMetrics types).
//!
//! Each family is made unregistered by `Default` (recording into it costs the same, it is just
//! not exported) and joins a service instance's registry with `register`; the `api` crate
//! builds one [`Registry`] per running service and hands clones of these structs to the parts
//! that record into them ([`crate::CommandService::with_metrics`],
//! [`crate::relay::Relay::with_metrics`]). There are no global statics: several services in
//! one process (the tests run many) each export only their own.
//!
//! Every label is of a bounded set: a command's name (the [`domain::BatchCommand`] variants)
//! and its [`Outcome`]; never a batch, user or correlation id. Names, units and help texts are
//! listed in `docs/metrics.md`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Bucket bounds in seconds for the latency histograms of this crate and the `api` crate: 1 ms
/// to 10 s (a command answers in milliseconds; past 10 s a client has given up).
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds of events per append: 1 to 1 024 (a command appends a few; one group of
/// results from the ingress up to 64 commands' worth).
pub const APPEND_EVENT_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// How a command ended (the `outcome` label of `essayflow_commands_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Decided and its events durable (or a repeat that appended nothing).
    Accepted,
    /// Refused by the domain ([`crate::CommandError::Rejected`]).
    Rejected,
    /// Gave up after repeated optimistic-concurrency conflicts ([`crate::CommandError::Conflict`]).
    Conflicted,
    /// The event store failed ([`crate::CommandError::Storage`]).
    Failed,
}

impl Outcome {
    /// Every outcome, in the order above.
    pub const ALL: [Self; 4] = [
        Self::Accepted,
        Self::Rejected,
        Self::Conflicted,
        Self::Failed,
    ];

    /// The label value: `accepted`, `rejected`, `conflicted` or `failed`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Conflicted => "conflicted",
            Self::Failed => "failed",
        }
    }

    /// The outcome of a command's result.
    pub fn of<T>(result: &Result<T, crate::CommandError>) -> Self {
        match result {
            Ok(_) => Self::Accepted,
            Err(crate::CommandError::Rejected(_)) => Self::Rejected,
            Err(crate::CommandError::Conflict { .. }) => Self::Conflicted,
            Err(crate::CommandError::Storage(_)) => Self::Failed,
        }
    }
}

/// Labels of a command's latency: its name (`RegisterBatch`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CommandLabels {
    pub command: &'static str,
}

/// Labels of a command's outcome: its name and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub command: &'static str,
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The command service's families (see `docs/metrics.md`):
/// - `essayflow_command_duration_seconds{command}` (histogram): from the call into the service
///   to its answer (decide, append with retries, durable);
/// - `essayflow_commands_total{command,outcome}` (counter);
/// - `essayflow_append_events` (histogram): events per append (one command, or one group of
///   commands for one batch appended together).
#[derive(Debug, Clone)]
pub struct CommandMetrics {
    pub duration: Family<CommandLabels, Histogram, fn() -> Histogram>,
    pub outcomes: Family<OutcomeLabels, Counter>,
    pub append_events: Histogram,
}

impl Default for CommandMetrics {
    fn default() -> Self {
        Self {
            duration: Family::new_with_constructor(latency_histogram),
            outcomes: Family::default(),
            append_events: Histogram::new(APPEND_EVENT_BUCKETS),
        }
    }
}

impl CommandMetrics {
    /// New families, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register_with_unit(
            "command_duration",
            "Time from a command's arrival at the command service to its answer",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "commands",
            "Commands handled by the command service, by name and outcome",
            metrics.outcomes.clone(),
        );
        registry.register(
            "append_events",
            "Events written per append (one command, or a group of one batch's commands)",
            metrics.append_events.clone(),
        );
        metrics
    }

    /// Records one command: its latency and outcome.
    pub fn record(&self, command: &'static str, outcome: Outcome, seconds: f64) {
        self.duration
            .get_or_create(&CommandLabels { command })
            .observe(seconds);
        self.outcomes
            .get_or_create(&OutcomeLabels {
                command,
                outcome: outcome.name(),
            })
            .inc();
    }
}

/// The relay's families:
/// - `essayflow_relay_publish_duration_seconds` (histogram): one page's messages from the
///   first send to the broker's last acknowledgement;
/// - `essayflow_relay_last_event_timestamp_seconds` (gauge): when the last event the broker
///   acknowledged happened (Unix time), so `time() - ...` is the age of what consumers saw
///   last.
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    pub publish_duration: Histogram,
    pub last_event_timestamp:
        prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self {
            publish_duration: Histogram::new(
                LATENCY_BUCKETS
                    .into_iter()
                    .chain([30.0])
                    .collect::<Vec<_>>(),
            ),
            last_event_timestamp: Default::default(),
        }
    }
}

impl RelayMetrics {
    /// New families, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register_with_unit(
            "relay_publish_duration",
            "Time to publish one page of the log to the broker, until every message was acknowledged",
            Unit::Seconds,
            metrics.publish_duration.clone(),
        );
        registry.register_with_unit(
            "relay_last_event_timestamp",
            "When the last event the broker acknowledged from the relay happened (Unix time)",
            Unit::Seconds,
            metrics.last_event_timestamp.clone(),
        );
        metrics
    }
}
