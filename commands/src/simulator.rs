//! DEVELOPMENT ONLY: a stand-in for the external processing services.
//!
//! It consumes phase requests from `<prefix>.phase.<phase>.requested.v1` and answers each with a
//! made-up result on `<prefix>.results.v1`, after a configurable latency and with a configurable
//! failure rate: exactly what a real processor would do, over the same topics. It exists so that
//! a newcomer sees a pipeline complete, and so that tests and benchmarks have processors. Its
//! results say `"simulated": true`; never run it against real batches.
//!
//! Its message ids are derived from the request id, so a redelivered request yields a duplicate
//! result that the ingress recognises. It echoes the request's `x-correlation-id`,
//! `traceparent` and `tracestate` headers on its result, as every processor should.

use std::time::Duration;

use domain::values::{Outcome, Phase};
use futures::StreamExt;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, InMessage, OutMessage, Subscription, Topics};
use crate::messages::{PhaseRequest, ResultMessage};
use crate::trace::{CORRELATION_ID, TRACEPARENT, TRACESTATE};

#[derive(Debug, Clone, Copy)]
pub struct SimulatorOptions {
    /// How long each essay takes to "process".
    pub latency: Duration,
    /// The share of essays that fail (0.0 to 1.0).
    pub failure_rate: f64,
    /// How many essays are processed at once.
    pub concurrency: usize,
}

impl Default for SimulatorOptions {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(200),
            failure_rate: 0.0,
            concurrency: 64,
        }
    }
}

/// The topics the simulator consumes for the given phases.
pub fn request_topics<'a>(
    topics: &Topics,
    phases: impl IntoIterator<Item = &'a Phase>,
) -> Vec<String> {
    phases
        .into_iter()
        .map(|p| topics.phase_requested(p))
        .collect()
}

/// The simulated result for one request.
pub fn simulate(request: &PhaseRequest, fail: bool) -> ResultMessage {
    ResultMessage {
        message_id: format!("sim-{}", request.request_id),
        batch_id: request.batch_id,
        essay_id: request.essay_id.clone(),
        phase: request.phase.clone(),
        outcome: if fail {
            Outcome::Failed
        } else {
            Outcome::Succeeded
        },
        result: (!fail).then(|| {
            serde_json::json!({
                "simulated": true,
                "processor": "essayflow simulate-processors",
                "phase": request.phase,
                "words": request.text.split_whitespace().count(),
            })
        }),
        error: fail.then(|| "simulated failure".to_owned()),
        pipeline_request_id: Some(request.pipeline_request_id),
    }
}

/// Consumes `subscription` and answers every request until `cancel` fires.
pub async fn run(
    mut subscription: Subscription,
    bus: Bus,
    topics: Topics,
    options: SimulatorOptions,
    cancel: CancellationToken,
) {
    tracing::warn!(
        latency_ms = options.latency.as_millis() as u64,
        failure_rate = options.failure_rate,
        bus = bus.kind(),
        "DEVELOPMENT processor simulator running: results are made up"
    );
    loop {
        let chunk = tokio::select! {
            _ = cancel.cancelled() => break,
            chunk = subscription.next_chunk(options.concurrency.max(1) * 4) => match chunk {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let chunk_ref = &chunk;
        let (bus, topics, cancel) = (&bus, &topics, &cancel);
        let answered: Vec<bool> = futures::stream::iter(0..chunk.len())
            .map(|i| answer(&chunk_ref[i], bus, topics, options, cancel))
            .buffer_unordered(options.concurrency.max(1))
            .collect()
            .await;
        if answered.iter().all(|a| *a) {
            for message in &chunk {
                subscription.done(message);
            }
        }
    }
    subscription.close().await;
    tracing::info!("processor simulator stopped");
}

async fn answer(
    message: &InMessage,
    bus: &Bus,
    topics: &Topics,
    options: SimulatorOptions,
    cancel: &CancellationToken,
) -> bool {
    let request: PhaseRequest = match serde_json::from_slice(
        message.payload.as_deref().unwrap_or(b""),
    ) {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%error, topic = %message.topic, "simulator: not a phase request; skipped");
            return true;
        }
    };
    if !options.latency.is_zero() {
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(options.latency) => {}
        }
    }
    let fail = options.failure_rate > 0.0 && rand::rng().random_bool(options.failure_rate.min(1.0));
    let result = simulate(&request, fail);
    let out = OutMessage {
        topic: topics.results(),
        key: request.batch_id.to_string(),
        payload: serde_json::to_vec(&result).unwrap_or_default(),
        headers: echoed(message),
    };
    bus.publish_until_taken(std::slice::from_ref(&out), cancel)
        .await
}

/// The headers a processor echoes from a request onto its result: the correlation id and the
/// W3C trace context, so that the result continues the request's correlation and trace (see
/// `docs/tracing.md`).
pub fn echoed(request: &InMessage) -> Vec<(String, String)> {
    [CORRELATION_ID, TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|name| Some((name.to_owned(), request.header(name)?.to_owned())))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::messages::{MIN_MAX_RESULT_BYTES, compact_json_len};

    #[test]
    fn simulated_results_fit_the_smallest_result_limit() {
        // The longest phase name and a long essay: the result's size does not grow with either
        // beyond a few bytes.
        let request = PhaseRequest {
            request_id: uuid::Uuid::new_v4(),
            batch_id: uuid::Uuid::new_v4(),
            essay_id: "e".repeat(64),
            phase: "p".repeat(32),
            pipeline_request_id: uuid::Uuid::new_v4(),
            text: "word ".repeat(100_000 / 5),
        };
        let message = simulate(&request, false);
        let size = compact_json_len(message.result.as_ref().unwrap());
        assert!(size < MIN_MAX_RESULT_BYTES, "{size}");
        assert!(message.validate(MIN_MAX_RESULT_BYTES).is_ok());
    }
}
