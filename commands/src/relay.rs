//! The relay (transactional-outbox style): follows the event log and publishes
//! - every event to `<prefix>.events.v1` (key: batch id; an [`EventEnvelope`]), and
//! - for each `PhaseStarted`, one [`PhaseRequest`] per essay to
//!   `<prefix>.phase.<phase>.requested.v1` (key: batch id).
//!
//! A page's messages are sent together and the checkpoint moves only after the broker
//! acknowledged every one of them: delivery is at least once, in log order per batch (one key,
//! one partition, an idempotent producer). While the broker is down commands are still accepted
//! (the event store is the outbox); the relay retries with backoff and `/readyz` reports it.
//!
//! Every message carries the correlation id of its event (header `x-correlation-id`) and its
//! W3C trace context (`traceparent`, `tracestate`); see [`crate::trace`].

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use domain::BatchEvent;
use domain::values::{BatchId, EssayId};

use crate::bus::{Bus, OutMessage, Topics};
use crate::follower::{Follower, FollowerError};
use crate::log::{EventLog, StoredEvent};
use crate::messages::{EventEnvelope, PhaseRequest, phase_request_id};
use crate::trace::{CORRELATION_ID, TraceContext};

/// The relay's [`Follower`]: turns each page of the log into messages and publishes them.
pub struct Relay {
    bus: Bus,
    topics: Topics,
    /// Every topic to create before the first publish.
    all_topics: Vec<String>,
    topics_ready: AtomicBool,
    log: EventLog,
    published: Arc<AtomicU64>,
    published_bytes: Arc<AtomicU64>,
    /// `messaging.system` of the publish spans: `kafka`, or `essayflow.in_process`.
    system: &'static str,
    metrics: crate::metrics::RelayMetrics,
}

impl Relay {
    pub fn new(bus: Bus, topics: Topics, all_topics: Vec<String>, log: EventLog) -> Self {
        Self {
            topics,
            all_topics,
            topics_ready: AtomicBool::new(false),
            log,
            published: Arc::default(),
            published_bytes: Arc::default(),
            system: match bus {
                Bus::Kafka(_) => "kafka",
                Bus::Memory(_) => "essayflow.in_process",
            },
            bus,
            metrics: Default::default(),
        }
    }

    /// Records publish durations and the time of the last acknowledged event in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::RelayMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Messages acknowledged by the broker since start.
    pub fn published(&self) -> Arc<AtomicU64> {
        self.published.clone()
    }

    /// Payload bytes of those messages.
    pub fn published_bytes(&self) -> Arc<AtomicU64> {
        self.published_bytes.clone()
    }

    /// The messages one page of events becomes.
    pub async fn messages(&self, events: &[StoredEvent]) -> Result<Vec<OutMessage>, FollowerError> {
        Ok(self.traced_messages(events).await?.0)
    }

    /// The messages one page of events becomes, and the `relay.publish` span of each message
    /// that has one (see [`crate::trace::spans_for`]); the spans end when they are dropped,
    /// once the broker has acknowledged the page.
    ///
    /// Every message carries its event's correlation id ([`CORRELATION_ID`]) and trace context
    /// (`traceparent`, `tracestate`): the publish span's when there is one, else the event's
    /// own. A phase request carries those of the `PhaseStarted` event that caused it.
    async fn traced_messages(
        &self,
        events: &[StoredEvent],
    ) -> Result<(Vec<OutMessage>, Vec<tracing::Span>), FollowerError> {
        let mut texts: HashMap<BatchId, HashMap<EssayId, String>> = HashMap::new();
        let mut messages = Vec::with_capacity(events.len());
        let mut spans = Vec::new();
        for event in events {
            let key = event.batch_id.to_string();
            let envelope = EventEnvelope::new(event);
            let trace = event.metadata.trace();
            let correlation_id = event.metadata.correlation_id.to_string();
            let mut message = OutMessage {
                topic: self.topics.events(),
                key: key.clone(),
                payload: json(&envelope)?,
                headers: vec![
                    ("event_id".to_owned(), envelope.event_id.to_string()),
                    ("event_type".to_owned(), envelope.event_type.clone()),
                    ("event_version".to_owned(), envelope.event_version.clone()),
                ],
            };
            let id = envelope.event_id.to_string();
            self.trace(
                &mut message,
                &id,
                &correlation_id,
                trace.as_ref(),
                &mut spans,
            );
            messages.push(message);
            let BatchEvent::PhaseStarted {
                request_id,
                phase,
                essays,
            } = &event.event
            else {
                continue;
            };
            let batch_texts = match texts.entry(event.batch_id) {
                Entry::Occupied(known) => known.into_mut(),
                Entry::Vacant(slot) => {
                    slot.insert(self.essay_texts(event.batch_id, event.sequence).await?)
                }
            };
            let topic = self.topics.phase_requested(phase);
            for essay_id in essays {
                let request = PhaseRequest {
                    request_id: phase_request_id(*request_id, phase, essay_id),
                    batch_id: event.batch_id.as_uuid(),
                    essay_id: essay_id.to_string(),
                    phase: phase.to_string(),
                    pipeline_request_id: request_id.as_uuid(),
                    text: batch_texts.get(essay_id).cloned().unwrap_or_default(),
                };
                let id = request.request_id.to_string();
                let mut message = OutMessage {
                    topic: topic.clone(),
                    key: key.clone(),
                    payload: json(&request)?,
                    headers: vec![("request_id".to_owned(), id.clone())],
                };
                self.trace(
                    &mut message,
                    &id,
                    &correlation_id,
                    trace.as_ref(),
                    &mut spans,
                );
                messages.push(message);
            }
        }
        Ok((messages, spans))
    }

    /// Adds the correlation id and the trace context to `message`, opening its `relay.publish`
    /// span (OpenTelemetry messaging conventions: a producer span named after the operation,
    /// with the system, the destination, the key and the message id) when it gets one.
    fn trace(
        &self,
        message: &mut OutMessage,
        message_id: &str,
        correlation_id: &str,
        parent: Option<&TraceContext>,
        spans: &mut Vec<tracing::Span>,
    ) {
        message
            .headers
            .push((CORRELATION_ID.to_owned(), correlation_id.to_owned()));
        let mut context = parent.cloned();
        if crate::trace::spans_for(parent) {
            let span = tracing::info_span!(
                "relay.publish",
                "otel.kind" = "producer",
                "messaging.system" = self.system,
                "messaging.operation.type" = "send",
                "messaging.operation.name" = "publish",
                "messaging.destination.name" = %message.topic,
                "messaging.kafka.message.key" = %message.key,
                "messaging.message.id" = message_id,
                correlation_id,
            );
            if let Some(parent) = parent {
                parent.adopt(&span);
            }
            context = crate::trace::continued(&span, parent);
            spans.push(span);
        }
        if let Some(context) = context {
            context.add_to(&mut message.headers);
        }
    }

    /// The in-process bus keeps nothing across restarts: phase requests that were published
    /// but not yet answered when the process stopped are gone. This publishes again the requests
    /// of every phase still running (according to the log), once the batch-state model has
    /// caught up with what the relay had published. Answers to requests that were already
    /// answered are duplicates, which the ingress recognises. Returns how many phases.
    pub async fn republish_running_phases(&self) -> Result<usize, FollowerError> {
        let pool = self.log.storage().pool();
        let relayed = crate::checkpoint::load_checkpoint(pool, self.name()).await?;
        while crate::checkpoint::load_checkpoint(pool, "batch_state").await? < relayed {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let running: Vec<String> =
            sqlx::query_scalar("SELECT id FROM batch_state WHERE status = 'processing'")
                .fetch_all(pool)
                .await?;
        let mut phases = 0;
        for id in running {
            let Ok(batch_id) = id.parse::<BatchId>() else {
                continue;
            };
            let events = self
                .log
                .read_batch_of_types(batch_id, None, &["PhaseStarted", "PipelineCompleted"])
                .await?;
            let Some(started) = events
                .iter()
                .rev()
                .take_while(|e| !matches!(e.event, BatchEvent::PipelineCompleted { .. }))
                .find(|e| matches!(e.event, BatchEvent::PhaseStarted { .. }))
            else {
                continue;
            };
            // Only what the relay had already published: the rest it publishes in turn.
            if started.at > relayed {
                continue;
            }
            let requests: Vec<OutMessage> = self
                .messages(std::slice::from_ref(started))
                .await?
                .into_iter()
                .filter(|m| m.topic != self.topics.events())
                .collect();
            self.bus
                .publish(&requests)
                .await
                .map_err(|e| FollowerError::Downstream(e.to_string()))?;
            phases += 1;
        }
        Ok(phases)
    }

    /// The texts of a batch's essays, as added up to `sequence`.
    async fn essay_texts(
        &self,
        batch_id: BatchId,
        sequence: i64,
    ) -> Result<HashMap<EssayId, String>, FollowerError> {
        let events = self
            .log
            .read_batch_of_types(batch_id, Some(sequence), &["EssaysAdded"])
            .await?;
        Ok(events
            .into_iter()
            .filter_map(|e| match e.event {
                BatchEvent::EssaysAdded { essays } => Some(essays),
                _ => None,
            })
            .flatten()
            .map(|essay| (essay.essay_id, essay.text.as_str().to_owned()))
            .collect())
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, FollowerError> {
    serde_json::to_vec(value).map_err(|e| FollowerError::Downstream(e.to_string()))
}

impl Follower for Relay {
    fn name(&self) -> &'static str {
        "relay"
    }

    async fn handle(&self, events: &[StoredEvent]) -> Result<(), FollowerError> {
        // Create the topics before the first publish. A broker without the admin API (or
        // with topics managed elsewhere) refuses: publishing then tells whether they exist.
        if !self.topics_ready.load(Ordering::Relaxed) {
            match self.bus.ensure_topics(&self.all_topics).await {
                Ok(()) => self.topics_ready.store(true, Ordering::Relaxed),
                Err(error) => {
                    tracing::warn!(%error, "could not create the topics; publishing anyway")
                }
            }
        }
        let (messages, _spans) = self.traced_messages(events).await?;
        let started = std::time::Instant::now();
        self.bus
            .publish(&messages)
            .await
            .map_err(|e| FollowerError::Downstream(e.to_string()))?;
        let metrics = &self.metrics;
        metrics
            .publish_duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(last) = events.last() {
            let at = last.metadata.occurred_at.timestamp_millis() as f64 / 1000.0;
            metrics.last_event_timestamp.set(at);
        }
        self.topics_ready.store(true, Ordering::Relaxed);
        self.published
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
        self.published_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(())
    }
}
