//! The results ingress: turns processors' results into `RecordEssayResult` commands, exactly
//! once in effect.
//!
//! - From Kafka: a consumer group on `<prefix>.results.v1`. An offset is committed only after
//!   the message's command is durable (or the message is dead-lettered), so a crash redelivers
//!   and never loses. A redelivered or duplicated result is recognised by the aggregate (its
//!   message id, and its essay and phase) and changes nothing.
//! - A malformed message, or one the batch refuses (unknown batch or essay, a phase that is not
//!   running), goes to `<prefix>.results.v1.dlq` with headers naming the original topic,
//!   partition, offset and the error; consumption goes on.
//! - A database outage is not the message's fault: the ingress retries the same message with
//!   backoff (and consumes nothing further) until the database is back.
//! - A result larger than the configured limit (`max_result_bytes`, of its `result` as compact
//!   JSON) is refused before anything is appended: dead-lettered from Kafka, 422 over HTTP.
//! - [`Ingress::record`] is also the HTTP twin's entry point (`POST /v1/internal/results`).
//! - A result continues the correlation id and the W3C trace context its processor echoed
//!   (message headers `x-correlation-id`, `traceparent`, `tracestate`; request headers over
//!   HTTP): the events it records carry both. Without them it starts a new correlation id.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use domain::values::{BatchId, ValidationError};
use domain::{BatchCommand, BatchError};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{Bus, InMessage, OutMessage, Subscription, Topics, next_backoff};
use crate::messages::{ResultMessage, ValidResult, result_causation_id};
use crate::service::{Accepted, CommandContext, CommandError, CommandService};
use crate::storage::Storage;
use crate::trace::{CORRELATION_ID, TraceContext};

/// The user id stamped on commands from the results topic.
pub const INGRESS_USER: &str = "system:ingress";

/// How many messages are taken from the broker at once, and how many batches are worked on at
/// once within them (one batch's results are recorded in order).
const CHUNK: usize = 256;
const CONCURRENCY: usize = 16;

/// Results of one batch recorded in one append, by default: large enough that a burst costs
/// few flushes, small enough that, with [`Backpressure`], other batches' events never wait
/// behind more than a short page of it.
pub const DEFAULT_GROUP: usize = 64;

/// Storage failures on one message, with the database answering, before it is dead-lettered.
const STORAGE_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The message does not fit the contract.
    #[error("{}", describe(.0))]
    Invalid(Vec<ValidationError>),
    /// The command failed: refused by the batch, or the store failed.
    #[error(transparent)]
    Command(#[from] CommandError),
}

fn describe(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

impl IngressError {
    /// Whether retrying the same message later can succeed (the database is down, or other
    /// commands kept the batch busy), as opposed to a message that will never be recorded.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Command(CommandError::Storage(_) | CommandError::Conflict { .. })
        )
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct IngressStats {
    /// Results that appended events.
    pub recorded: AtomicU64,
    /// Results already known (a redelivery or a second answer): nothing appended.
    pub duplicates: AtomicU64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Attempts that failed on a transient error and were retried.
    pub retried: AtomicU64,
}

/// Records processors' results: from a subscription ([`Ingress::run`]) or one at a time
/// ([`Ingress::record`], the HTTP twin). Cheap to clone.
#[derive(Clone)]
pub struct Ingress {
    commands: CommandService,
    storage: Storage,
    stats: Arc<IngressStats>,
    max_result_bytes: usize,
    backpressure: Option<Arc<Backpressure>>,
    /// Results of one batch recorded in one append, at most.
    max_group: usize,
}

/// Keeps the ingress from running ahead of the read models: before it records a group of
/// results, it waits until the named projections have applied everything it recorded before
/// (for at most `max_wait`; past that it goes on, so a stopped projection never stops intake).
/// One batch's burst of results then never queues more than a group or so of events ahead of
/// everyone else's changes, whatever its size: the read side's backlog, and so the latency
/// of other teachers' live changes, stays bounded.
pub struct Backpressure {
    pub projections: Vec<&'static str>,
    pub max_wait: Duration,
    /// The log position of the last event this ingress appended.
    last: std::sync::Mutex<crate::log::LogPosition>,
}

impl Backpressure {
    pub fn new(projections: Vec<&'static str>, max_wait: Duration) -> Self {
        Self {
            projections,
            max_wait,
            last: std::sync::Mutex::default(),
        }
    }

    fn appended(&self, at: crate::log::LogPosition) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *last = (*last).max(at);
    }

    /// Waits until every projection has applied the last append, or `max_wait` has passed.
    /// This process's workers announce their checkpoints; another node's are polled.
    async fn wait(&self, storage: &Storage) {
        let target = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        if target == crate::log::LogPosition::default() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.max_wait;
        for name in &self.projections {
            let mut local = storage.checkpoints().subscribe(name);
            loop {
                if *local.borrow_and_update() >= target {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return;
                }
                let poll = tokio::time::Instant::now() + Duration::from_millis(50);
                if tokio::time::timeout_at(poll.min(deadline), local.changed())
                    .await
                    .is_err()
                    && crate::checkpoint::load_checkpoint(storage.pool(), name)
                        .await
                        .is_ok_and(|at| at >= target)
                {
                    break;
                }
            }
        }
    }
}

impl Ingress {
    /// An ingress that refuses results whose `result` is over `max_result_bytes` bytes of
    /// compact JSON (see [`ResultMessage::validate`]).
    pub fn new(commands: CommandService, storage: Storage, max_result_bytes: usize) -> Self {
        Self {
            commands,
            storage,
            stats: Arc::default(),
            max_result_bytes,
            backpressure: None,
            max_group: DEFAULT_GROUP,
        }
    }

    /// Records at most `max_group` results of one batch in one append (at least 1).
    pub fn with_max_group(mut self, max_group: usize) -> Self {
        self.max_group = max_group.max(1);
        self
    }

    /// Records a group of results only once the read models have caught up with the previous
    /// one (see [`Backpressure`]).
    pub fn with_backpressure(mut self, backpressure: Backpressure) -> Self {
        self.backpressure = Some(Arc::new(backpressure));
        self
    }

    pub fn stats(&self) -> Arc<IngressStats> {
        self.stats.clone()
    }

    /// Records one result. `Accepted::events` is 0 for a duplicate. An invalid message
    /// (including a `result` over the size limit) is [`IngressError::Invalid`], with nothing
    /// appended.
    pub async fn record(
        &self,
        message: ResultMessage,
        correlation_id: Uuid,
        user_id: &str,
    ) -> Result<Accepted, IngressError> {
        self.record_with(message, correlation_id, user_id, None)
            .await
    }

    /// [`Ingress::record`] with the trace context to stamp (`None`: the current span's).
    async fn record_with(
        &self,
        message: ResultMessage,
        correlation_id: Uuid,
        user_id: &str,
        trace: Option<TraceContext>,
    ) -> Result<Accepted, IngressError> {
        let result = message
            .validate(self.max_result_bytes)
            .map_err(IngressError::Invalid)?;
        let (batch_id, command, mut context) = command_of(result, correlation_id, user_id);
        context.trace = trace;
        let accepted = self.commands.execute(batch_id, command, &context).await?;
        self.count(&accepted);
        Ok(accepted)
    }

    fn count(&self, accepted: &Accepted) {
        let counter = if accepted.events == 0 {
            &self.stats.duplicates
        } else {
            &self.stats.recorded
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Consumes the results topic until `cancel` fires.
    pub async fn run(self, bus: Bus, topics: Topics, group: String, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let subscription = loop {
            match bus.subscribe(&group, &[topics.results()]) {
                Ok(subscription) => break subscription,
                Err(error) => {
                    tracing::error!(%error, "could not subscribe to the results topic; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = next_backoff(backoff, Duration::from_secs(5));
                }
            }
        };
        self.run_on(subscription, &bus, &topics, &cancel).await;
    }

    /// Consumes an existing subscription (the in-process bus subscribes before the relay starts,
    /// so that no result published in between is missed).
    pub async fn run_on(
        &self,
        mut subscription: Subscription,
        bus: &Bus,
        topics: &Topics,
        cancel: &CancellationToken,
    ) {
        tracing::info!(topic = %topics.results(), bus = bus.kind(), "results ingress started");
        loop {
            let chunk = tokio::select! {
                _ = cancel.cancelled() => break,
                chunk = subscription.next_chunk(CHUNK) => match chunk {
                    Some(chunk) => chunk,
                    None => break,
                },
            };
            // One batch's results in order; different batches at once.
            let mut by_key: BTreeMap<Option<&[u8]>, Vec<usize>> = BTreeMap::new();
            for (i, message) in chunk.iter().enumerate() {
                by_key.entry(message.key.as_deref()).or_default().push(i);
            }
            let chunk_ref = &chunk;
            let handled: Vec<bool> = futures::stream::iter(by_key.into_values())
                .map(|indices| async move {
                    let messages: Vec<&InMessage> =
                        indices.iter().map(|&i| &chunk_ref[i]).collect();
                    self.handle_group(&messages, bus, topics, cancel).await
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            if handled.iter().all(|done| *done) {
                for message in &chunk {
                    subscription.done(message);
                }
            }
        }
        subscription.close().await;
        tracing::info!("results ingress stopped");
    }

    /// Records or dead-letters one key's messages, in order. The results of one batch are
    /// recorded together ([`CommandService::execute_many`]: one append for all of them, not
    /// one per result); a message that does not fit the contract, or that the batch refuses,
    /// is dead-lettered on its own. Transient failures retry the group; a group that keeps
    /// failing on storage while the database answers is taken apart, one message at a time,
    /// so that the one that cannot be recorded is set aside. Returns `false` only when
    /// cancelled before every message was settled.
    async fn handle_group(
        &self,
        messages: &[&InMessage],
        bus: &Bus,
        topics: &Topics,
        cancel: &CancellationToken,
    ) -> bool {
        // Runs of consecutive results for the same batch (a key should hold one batch's), so
        // that whatever is dead-lettered keeps its order among the rest.
        type Run<'m> = (BatchId, Vec<(&'m InMessage, BatchCommand, CommandContext)>);
        let mut run: Option<Run<'_>> = None;
        // The results' `ingress.result` spans, open until the key's results are settled.
        let mut spans = Vec::new();
        for &message in messages {
            let parsed = ResultMessage::from_slice(message.payload.as_deref().unwrap_or(b""))
                .map_err(|error| IngressError::Invalid(vec![error]))
                .and_then(|result| {
                    result
                        .validate(self.max_result_bytes)
                        .map_err(IngressError::Invalid)
                });
            match parsed {
                Ok(result) => {
                    let (correlation_id, trace, span) = continuation(message);
                    let (batch_id, command, mut context) =
                        command_of(result, correlation_id, INGRESS_USER);
                    context.trace = trace;
                    spans.extend(span);
                    match &mut run {
                        Some((id, group)) if *id == batch_id && group.len() < self.max_group => {
                            group.push((message, command, context))
                        }
                        _ => {
                            if let Some((id, group)) = run.take()
                                && !self.record_group(id, &group, bus, topics, cancel).await
                            {
                                return false;
                            }
                            run = Some((batch_id, vec![(message, command, context)]));
                        }
                    }
                }
                Err(error) => {
                    if let Some((id, group)) = run.take()
                        && !self.record_group(id, &group, bus, topics, cancel).await
                    {
                        return false;
                    }
                    let reason = dead_letter_reason(&error);
                    if !self
                        .dead_letter(message, &reason, bus, topics, cancel)
                        .await
                    {
                        return false;
                    }
                }
            }
        }
        match run {
            Some((id, group)) => self.record_group(id, &group, bus, topics, cancel).await,
            None => true,
        }
    }

    async fn record_group(
        &self,
        batch_id: BatchId,
        group: &[(&InMessage, BatchCommand, CommandContext)],
        bus: &Bus,
        topics: &Topics,
        cancel: &CancellationToken,
    ) -> bool {
        let commands: Vec<(BatchCommand, CommandContext)> = group
            .iter()
            .map(|(_, command, context)| (command.clone(), context.clone()))
            .collect();
        let mut backoff = Duration::from_millis(100);
        let mut storage_failures = 0;
        if let Some(backpressure) = &self.backpressure {
            backpressure.wait(&self.storage).await;
        }
        loop {
            let error = match self.commands.execute_many(batch_id, &commands).await {
                Ok(answers) => {
                    if let Some(backpressure) = &self.backpressure
                        && let Some(last) = answers
                            .iter()
                            .filter_map(|a| a.as_ref().ok())
                            .filter(|a| a.events > 0)
                            .map(|a| a.position)
                            .max()
                    {
                        backpressure.appended(last);
                    }
                    for ((message, ..), answer) in group.iter().zip(answers) {
                        match answer {
                            Ok(accepted) => self.count(&accepted),
                            Err(rejected) => {
                                let error = IngressError::Command(CommandError::Rejected(rejected));
                                let reason = dead_letter_reason(&error);
                                if !self
                                    .dead_letter(message, &reason, bus, topics, cancel)
                                    .await
                                {
                                    return false;
                                }
                            }
                        }
                    }
                    return true;
                }
                Err(error) => error,
            };
            if matches!(error, CommandError::Storage(_)) {
                storage_failures += 1;
            }
            if storage_failures >= STORAGE_ATTEMPTS && self.storage.ping().await.is_ok() {
                for (message, ..) in group {
                    if !self.handle(message, bus, topics, cancel).await {
                        return false;
                    }
                }
                return true;
            }
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, results = group.len(), retry_in = ?backoff, "could not record results; retrying");
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = next_backoff(backoff, Duration::from_secs(5));
        }
    }

    /// Records or dead-letters one message, retrying transient failures until they pass.
    /// Returns `false` only when cancelled before the message was settled.
    async fn handle(
        &self,
        message: &InMessage,
        bus: &Bus,
        topics: &Topics,
        cancel: &CancellationToken,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        let mut storage_failures = 0;
        loop {
            let outcome = match ResultMessage::from_slice(message.payload.as_deref().unwrap_or(b""))
            {
                Err(error) => Err(IngressError::Invalid(vec![error])),
                Ok(result) => {
                    let (correlation_id, trace, _span) = continuation(message);
                    self.record_with(result, correlation_id, INGRESS_USER, trace)
                        .await
                }
            };
            if matches!(
                outcome,
                Err(IngressError::Command(CommandError::Storage(_)))
            ) {
                storage_failures += 1;
            }
            // A storage error while the database answers is this batch's (an event that cannot
            // be read, say), not an outage: after a few attempts, set the message aside rather
            // than hold up every other batch's results behind it.
            let stuck = storage_failures >= STORAGE_ATTEMPTS && self.storage.ping().await.is_ok();
            match outcome {
                Ok(_) => return true,
                Err(error) if error.is_transient() && !stuck => {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, retry_in = ?backoff, "could not record a result; retrying");
                }
                Err(error) => {
                    let reason = dead_letter_reason(&error);
                    if self
                        .dead_letter(message, &reason, bus, topics, cancel)
                        .await
                    {
                        return true;
                    }
                    return false;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = next_backoff(backoff, Duration::from_secs(5));
        }
    }

    /// Publishes a message to the dead-letter topic, retrying until the broker takes it.
    async fn dead_letter(
        &self,
        message: &InMessage,
        reason: &str,
        bus: &Bus,
        topics: &Topics,
        cancel: &CancellationToken,
    ) -> bool {
        tracing::warn!(topic = %message.topic, partition = message.partition, offset = message.offset, error = reason, "dead-lettering a result");
        let letter = dead_letter(message, reason, topics);
        let taken = bus
            .publish_until_taken(std::slice::from_ref(&letter), cancel)
            .await;
        if taken {
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }
}

/// How a result from the bus continues what its processor sent: the correlation id of its
/// [`CORRELATION_ID`] header (a new one if it has none, or not a UUID), and the trace context of
/// its `traceparent` and `tracestate` headers, continued by an `ingress.result` span when spans
/// are exported (the events it records are then stamped with that span's context).
fn continuation(message: &InMessage) -> (Uuid, Option<TraceContext>, Option<tracing::Span>) {
    let correlation_id = message
        .header(CORRELATION_ID)
        .and_then(|v| Uuid::parse_str(v.trim()).ok())
        .unwrap_or_else(Uuid::new_v4);
    let parent = TraceContext::extract(|name| message.header(name));
    if !crate::trace::spans_for(parent.as_ref()) {
        return (correlation_id, parent, None);
    }
    let span = tracing::info_span!(
        "ingress.result",
        "otel.kind" = "consumer",
        "messaging.operation.type" = "process",
        "messaging.destination.name" = %message.topic,
        "messaging.kafka.offset" = message.offset,
        "messaging.destination.partition.id" = message.partition,
        correlation_id = %correlation_id,
    );
    if let Some(parent) = &parent {
        parent.adopt(&span);
    }
    let trace = crate::trace::continued(&span, parent.as_ref());
    (correlation_id, trace, Some(span))
}

/// The `RecordEssayResult` command of a checked result, with its context: correlated as given,
/// caused by the result's message id.
fn command_of(
    result: ValidResult,
    correlation_id: Uuid,
    user_id: &str,
) -> (BatchId, BatchCommand, CommandContext) {
    let context = CommandContext {
        correlation_id,
        causation_id: Some(result_causation_id(&result.message_id)),
        user_id: Some(user_id.to_owned()),
        require_owner: None,
        trace: None,
    };
    let command = BatchCommand::RecordEssayResult {
        essay_id: result.essay_id,
        phase: result.phase,
        outcome: result.outcome,
        message_id: result.message_id,
        result: result.result,
        error: result.error,
        pipeline_request_id: result.pipeline_request_id,
    };
    (result.batch_id, command, context)
}

/// Why a result is dead-lettered, as `field: reason` where there is a field.
fn dead_letter_reason(error: &IngressError) -> String {
    match error {
        IngressError::Command(CommandError::Rejected(BatchError::NotFound)) => {
            "batch_id: no such batch".to_owned()
        }
        other => other.to_string(),
    }
}

/// The dead letter for `message`: its key and bytes unchanged, and headers saying where it came
/// from and why it was set aside.
pub fn dead_letter(message: &InMessage, reason: &str, topics: &Topics) -> OutMessage {
    OutMessage {
        topic: topics.dead_letters(),
        key: message
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default(),
        payload: message.payload.clone().unwrap_or_default(),
        headers: vec![
            ("x-original-topic".to_owned(), message.topic.clone()),
            (
                "x-original-partition".to_owned(),
                message.partition.to_string(),
            ),
            ("x-original-offset".to_owned(), message.offset.to_string()),
            ("x-error".to_owned(), reason.to_owned()),
            ("x-dead-lettered-at".to_owned(), Utc::now().to_rfc3339()),
        ],
    }
}
