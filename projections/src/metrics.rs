//! The read side's metric families (the `prometheus-client` crate's OpenMetrics types): per
//! projection, the time a page takes, the events applied and the failed steps.
//!
//! [`ProjectionMetrics::register`] makes them in a service instance's registry (the `api` crate
//! keeps one per running service); the live workers get a clone with
//! [`crate::Worker::with_metrics`]. A rebuild's shadow worker and a verification's scratch
//! worker record nothing (they are not the live model). The `projection` label is one of
//! [`crate::PROJECTIONS`]: bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Bucket bounds in seconds of a page's time: 1 ms to 10 s.
pub const PAGE_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `projection` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProjectionLabels {
    pub projection: &'static str,
}

fn page_histogram() -> Histogram {
    Histogram::new(PAGE_BUCKETS)
}

/// The families:
/// - `essayflow_projection_page_duration_seconds{projection}` (histogram): one page from the
///   read of the log to the commit of its rows and checkpoint;
/// - `essayflow_projection_events_applied_total{projection}` (counter);
/// - `essayflow_projection_errors_total{projection}` (counter): failed steps (retried).
#[derive(Debug, Clone)]
pub struct ProjectionMetrics {
    pub page_duration: Family<ProjectionLabels, Histogram, fn() -> Histogram>,
    pub events_applied: Family<ProjectionLabels, Counter>,
    pub errors: Family<ProjectionLabels, Counter>,
}

impl Default for ProjectionMetrics {
    fn default() -> Self {
        Self {
            page_duration: Family::new_with_constructor(page_histogram),
            events_applied: Family::default(),
            errors: Family::default(),
        }
    }
}

impl ProjectionMetrics {
    /// New families registered in `registry`, with a series for each of
    /// [`crate::PROJECTIONS`] from the start (so that a rate over them is defined before the
    /// first page).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        for projection in crate::PROJECTIONS {
            let labels = ProjectionLabels { projection };
            let _ = metrics.page_duration.get_or_create(&labels);
            let _ = metrics.events_applied.get_or_create(&labels);
            let _ = metrics.errors.get_or_create(&labels);
        }
        registry.register_with_unit(
            "projection_page_duration",
            "Time to apply one page of events to a projection, from reading the log to the commit",
            Unit::Seconds,
            metrics.page_duration.clone(),
        );
        registry.register(
            "projection_events_applied",
            "Events applied to a projection's live tables",
            metrics.events_applied.clone(),
        );
        registry.register(
            "projection_errors",
            "Failed projection steps (retried with backoff)",
            metrics.errors.clone(),
        );
        metrics
    }

    /// One projection's series.
    pub fn of(&self, projection: &'static str) -> ProjectionSeries {
        let labels = ProjectionLabels { projection };
        ProjectionSeries {
            page_duration: self.page_duration.get_or_create_owned(&labels),
            events_applied: self.events_applied.get_or_create_owned(&labels),
            errors: self.errors.get_or_create_owned(&labels),
        }
    }
}

/// One projection's series of [`ProjectionMetrics`], looked up once (no map lookup per page).
#[derive(Debug, Clone)]
pub struct ProjectionSeries {
    pub page_duration: Histogram,
    pub events_applied: Counter,
    pub errors: Counter,
}
