//! The command service: decide a command against a batch's state and append its events, with
//! optimistic concurrency.
//!
//! The state comes from the event store in cqrs-es's event-store mode (its snapshot and
//! aggregate-store modes apply new events twice in 0.5), or from a cache of the states this
//! service itself committed. The append fails if another command appended to the same batch
//! since that state (the appender checks every sequence number); the service then reloads from
//! the store and decides again, a bounded number of times, before giving up with
//! [`CommandError::Conflict`]. A rejection or a no-op decided on cached state is re-checked on
//! loaded state before it is answered, so a stale cache (another node wrote) can delay a command
//! but never change its outcome. An accepted command's events are durable when
//! [`CommandService::execute`] returns.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventStore, SerializedEvent};
use cqrs_es::{AggregateError, EventEnvelope, EventStore};
use domain::values::BatchId;
use domain::{Batch, BatchCommand, BatchError, BatchServices};
use rand::Rng;
use tracing::Instrument;
use uuid::Uuid;

use crate::appender::{AppendError, Appender};
use crate::log::{EventLog, EventMetadata, LogError, LogPosition};
use crate::metrics::{CommandMetrics, Outcome};
use crate::repository::{EventRepository, RECEIPT};
use crate::storage::Storage;
use crate::trace::TraceContext;

/// Who asked, and why: stamped on every event a command appends.
#[derive(Debug, Clone, Default)]
pub struct CommandContext {
    pub correlation_id: Uuid,
    /// The event or message that caused this command, if any.
    pub causation_id: Option<Uuid>,
    pub user_id: Option<String>,
    /// When set, the command applies only to a batch this user owns; any other batch is
    /// answered as [`BatchError::NotFound`], exactly like a missing one.
    pub require_owner: Option<domain::values::UserId>,
    /// The trace context to stamp on the events (W3C; see [`crate::trace`]). `None`: the
    /// context of the span the command is executed in, if it has one.
    pub trace: Option<TraceContext>,
}

/// What an accepted command did.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub batch_id: BatchId,
    /// How many events the command appended (0 when it was a repeat that changed nothing).
    pub events: usize,
    /// The batch's version (its last event's sequence) after the command.
    pub version: i64,
    /// The log position of the batch's last event: a consistency token for reads.
    pub position: LogPosition,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The domain refused the command; nothing was appended.
    #[error(transparent)]
    Rejected(#[from] BatchError),
    /// Other commands kept appending to the same batch; nothing was appended.
    #[error("the batch kept changing; gave up after {attempts} attempts")]
    Conflict { attempts: u32 },
    /// The event store could not be read or written; the command may not have been recorded.
    #[error("the event store failed: {0}")]
    Storage(String),
}

impl From<LogError> for CommandError {
    fn from(error: LogError) -> Self {
        Self::Storage(error.to_string())
    }
}

#[derive(Clone)]
pub struct CommandService {
    store: Arc<PersistedEventStore<EventRepository, Batch>>,
    /// The store's appender, for groups of commands ([`CommandService::execute_many`]).
    appender: Appender,
    /// Recently written batches at their version, so that most commands need no load. Only
    /// states this service itself committed go in; see `execute` for how staleness is caught.
    cache: moka::sync::Cache<BatchId, Arc<(usize, Batch)>>,
    log: EventLog,
    services: BatchServices,
    max_attempts: u32,
    /// Latency, outcomes and append sizes ([`crate::metrics`]); unregistered by default.
    metrics: CommandMetrics,
}

impl CommandService {
    pub fn new(storage: &Storage, services: BatchServices) -> Self {
        let repository = EventRepository::new(storage);
        let appender = repository.appender();
        let store =
            PersistedEventStore::new_event_store(repository).with_upcasters(crate::upcasters());
        Self {
            store: Arc::new(store),
            appender,
            cache: moka::sync::Cache::new(100_000),
            log: EventLog::new(storage.clone()),
            services,
            max_attempts: 25,
            metrics: CommandMetrics::default(),
        }
    }

    /// Records every command's latency and outcome, and every append's size, in `metrics`
    /// (families registered in the service instance's registry).
    pub fn with_metrics(mut self, metrics: CommandMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn services(&self) -> &BatchServices {
        &self.services
    }

    /// Decides `command` against the current state of `batch_id` and appends its events.
    ///
    /// When spans are exported and the command's trace is sampled, this runs in a
    /// `command.execute` span (a child of the command's trace context), whose context the
    /// events are stamped with; otherwise they carry the command's context as it came.
    pub async fn execute(
        &self,
        batch_id: BatchId,
        command: BatchCommand,
        context: &CommandContext,
    ) -> Result<Accepted, CommandError> {
        let name = command.name();
        let started = Instant::now();
        let result = self.execute_traced(batch_id, command, context).await;
        self.metrics
            .record(name, Outcome::of(&result), started.elapsed().as_secs_f64());
        result
    }

    /// [`CommandService::execute`] in its `command.execute` span, when one is exported.
    async fn execute_traced(
        &self,
        batch_id: BatchId,
        command: BatchCommand,
        context: &CommandContext,
    ) -> Result<Accepted, CommandError> {
        let parent = context.trace.clone().or_else(TraceContext::current);
        if !crate::trace::spans_for(parent.as_ref()) {
            return self.execute_in(batch_id, command, context, parent).await;
        }
        let span = tracing::info_span!(
            "command.execute",
            command = command.name(),
            batch_id = %batch_id,
            correlation_id = %context.correlation_id,
        );
        if let Some(parent) = &parent {
            parent.adopt(&span);
        }
        let trace = crate::trace::continued(&span, parent.as_ref());
        self.execute_in(batch_id, command, context, trace)
            .instrument(span)
            .await
    }

    async fn execute_in(
        &self,
        batch_id: BatchId,
        command: BatchCommand,
        context: &CommandContext,
        trace: Option<TraceContext>,
    ) -> Result<Accepted, CommandError> {
        let aggregate_id = batch_id.to_string();
        let metadata = EventMetadata {
            correlation_id: context.correlation_id,
            causation_id: context.causation_id,
            user_id: context.user_id.clone(),
            occurred_at: Utc::now(),
            command: command.name().to_owned(),
            traceparent: None,
            tracestate: None,
        }
        .traced(trace.as_ref())
        .to_map();
        // The first attempt decides on the cached state, if any; a stale cache (another node
        // appended) shows up as an append conflict, and a rejection is only believed once it
        // holds on state loaded from the store.
        let mut trust_cache = true;
        for attempt in 1..=self.max_attempts {
            let cached = trust_cache.then(|| self.cache.get(&batch_id)).flatten();
            let from_cache = cached.is_some();
            let loaded = match cached {
                Some(entry) => EventStoreAggregateContext {
                    aggregate_id: aggregate_id.clone(),
                    aggregate: entry.1.clone(),
                    current_sequence: entry.0,
                    current_snapshot: None,
                },
                None => self
                    .store
                    .load_aggregate(&aggregate_id)
                    .await
                    .map_err(storage_error)?,
            };
            let version = loaded.current_sequence;
            if let Some(owner) = context.require_owner
                && version > 0
                && loaded.aggregate.owner() != Some(owner)
            {
                if from_cache {
                    trust_cache = false;
                    continue;
                }
                return Err(CommandError::Rejected(BatchError::NotFound));
            }
            let events = match loaded.aggregate.decide(command.clone(), &self.services) {
                Ok(events) if !events.is_empty() => events,
                // A rejection or a no-op decided on cached state is checked on fresh state.
                _ if from_cache => {
                    trust_cache = false;
                    continue;
                }
                Ok(_) => return self.accepted(batch_id, 0, version).await,
                Err(rejected) => return Err(rejected.into()),
            };
            let count = events.len();
            let mut next = loaded.aggregate.clone();
            for event in &events {
                next.apply_event(event.clone());
            }
            let commit = self.store.commit(events, loaded, metadata.clone());
            let (committed, receipt) = RECEIPT
                .scope(RefCell::new(Vec::new()), async {
                    let committed = commit.await;
                    (committed, RECEIPT.with(|r| r.take()))
                })
                .await;
            match committed {
                Ok(_) => {
                    self.metrics.append_events.observe(count as f64);
                    self.cache
                        .insert(batch_id, Arc::new((version + count, next)));
                    let Some(position) = receipt.last().copied() else {
                        return self.accepted(batch_id, count, version + count).await;
                    };
                    return Ok(Accepted {
                        batch_id,
                        events: count,
                        version: (version + count) as i64,
                        position,
                    });
                }
                Err(AggregateError::AggregateConflict) => {
                    tracing::debug!(%batch_id, attempt, "append conflict; retrying");
                    self.cache.invalidate(&batch_id);
                    trust_cache = false;
                    // Jittered backoff so that competing writers stop colliding.
                    let cap = 1u64 << attempt.min(6);
                    let wait = rand::rng().random_range(0..=cap);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(error) => {
                    self.cache.invalidate(&batch_id);
                    return Err(storage_error(error));
                }
            }
        }
        Err(CommandError::Conflict {
            attempts: self.max_attempts,
        })
    }

    /// Decides `commands` for one batch in order, each against the state the ones before it
    /// left, and appends all their events in one append (one transaction: one flush for the
    /// group instead of one per command). Each command has its own answer: accepted (with no
    /// events when it was a repeat) or rejected (it appends nothing; the others still do). The
    /// outer error means nothing was appended: the store failed, or other writers kept the
    /// batch changing. Every event carries the metadata of the command that caused it.
    pub async fn execute_many(
        &self,
        batch_id: BatchId,
        commands: &[(BatchCommand, CommandContext)],
    ) -> Result<Vec<Result<Accepted, BatchError>>, CommandError> {
        let started = Instant::now();
        let result = self.execute_many_once(batch_id, commands).await;
        // Each command of the group waited for the whole group.
        let seconds = started.elapsed().as_secs_f64();
        for (i, (command, _)) in commands.iter().enumerate() {
            let outcome = match &result {
                Ok(answers) => match answers.get(i) {
                    Some(Err(_)) => Outcome::Rejected,
                    _ => Outcome::Accepted,
                },
                Err(error) => match error {
                    CommandError::Rejected(_) => Outcome::Rejected,
                    CommandError::Conflict { .. } => Outcome::Conflicted,
                    CommandError::Storage(_) => Outcome::Failed,
                },
            };
            self.metrics.record(command.name(), outcome, seconds);
        }
        result
    }

    async fn execute_many_once(
        &self,
        batch_id: BatchId,
        commands: &[(BatchCommand, CommandContext)],
    ) -> Result<Vec<Result<Accepted, BatchError>>, CommandError> {
        let aggregate_id = batch_id.to_string();
        let now = Utc::now();
        let current = TraceContext::current();
        let metadata: Vec<serde_json::Value> = commands
            .iter()
            .map(|(command, context)| {
                serde_json::to_value(
                    EventMetadata {
                        correlation_id: context.correlation_id,
                        causation_id: context.causation_id,
                        user_id: context.user_id.clone(),
                        occurred_at: now,
                        command: command.name().to_owned(),
                        traceparent: None,
                        tracestate: None,
                    }
                    .traced(context.trace.as_ref().or(current.as_ref()))
                    .to_map(),
                )
                .unwrap_or_default()
            })
            .collect();
        let mut trust_cache = true;
        for attempt in 1..=self.max_attempts {
            let cached = trust_cache.then(|| self.cache.get(&batch_id)).flatten();
            let from_cache = cached.is_some();
            let (start, mut state) = match cached {
                Some(entry) => (entry.0, entry.1.clone()),
                None => {
                    let loaded = self
                        .store
                        .load_aggregate(&aggregate_id)
                        .await
                        .map_err(storage_error)?;
                    (loaded.current_sequence, loaded.aggregate)
                }
            };
            // Per command: its events' range in the append, or its rejection.
            let mut decided: Vec<Result<std::ops::Range<usize>, BatchError>> =
                Vec::with_capacity(commands.len());
            let mut serialized: Vec<SerializedEvent> = Vec::new();
            let mut doubt = false;
            for ((command, context), metadata) in commands.iter().zip(&metadata) {
                let owned = context.require_owner.is_none_or(|owner| {
                    start + serialized.len() == 0 || state.owner() == Some(owner)
                });
                let outcome = if owned {
                    state.decide(command.clone(), &self.services)
                } else {
                    Err(BatchError::NotFound)
                };
                match outcome {
                    Ok(events) => {
                        doubt |= events.is_empty();
                        let first = serialized.len();
                        for event in events {
                            let envelope = EventEnvelope::<Batch> {
                                aggregate_id: aggregate_id.clone(),
                                sequence: start + serialized.len() + 1,
                                payload: event.clone(),
                                metadata: Default::default(),
                            };
                            let mut event_row = SerializedEvent::try_from(&envelope)
                                .map_err(|e| CommandError::Storage(e.to_string()))?;
                            event_row.metadata = metadata.clone();
                            serialized.push(event_row);
                            state.apply_event(event);
                        }
                        decided.push(Ok(first..serialized.len()));
                    }
                    Err(rejected) => {
                        doubt = true;
                        decided.push(Err(rejected));
                    }
                }
            }
            // A rejection or a no-op decided on cached state is checked on fresh state.
            if doubt && from_cache {
                trust_cache = false;
                continue;
            }
            let positions = if serialized.is_empty() {
                Vec::new()
            } else {
                match self.appender.append(serialized.clone()).await {
                    Ok(positions) => {
                        self.metrics.append_events.observe(serialized.len() as f64);
                        positions
                    }
                    Err(AppendError::Conflict) => {
                        tracing::debug!(%batch_id, attempt, "append conflict; retrying the group");
                        self.cache.invalidate(&batch_id);
                        trust_cache = false;
                        let cap = 1u64 << attempt.min(6);
                        let wait = rand::rng().random_range(0..=cap);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        continue;
                    }
                    Err(error) => {
                        self.cache.invalidate(&batch_id);
                        return Err(CommandError::Storage(error.to_string()));
                    }
                }
            };
            let end = start + serialized.len();
            if !serialized.is_empty() {
                self.cache.insert(batch_id, Arc::new((end, state)));
            }
            // The position of the batch's latest event before this group, for repeats that come
            // before any new event.
            let before = if start > 0 && decided.iter().any(|d| matches!(d, Ok(r) if r.is_empty()))
            {
                self.accepted(batch_id, 0, start).await?.position
            } else {
                LogPosition::default()
            };
            let mut answers = Vec::with_capacity(decided.len());
            for decision in decided {
                answers.push(decision.map(|range| {
                    // A repeat answers with the batch as it stood after the commands before it.
                    let last = range.end;
                    Accepted {
                        batch_id,
                        events: range.len(),
                        version: (start + last) as i64,
                        position: match last.checked_sub(1) {
                            Some(i) => positions.get(i).copied().unwrap_or(before),
                            None => before,
                        },
                    }
                }));
            }
            return Ok(answers);
        }
        Err(CommandError::Conflict {
            attempts: self.max_attempts,
        })
    }

    async fn accepted(
        &self,
        batch_id: BatchId,
        events: usize,
        version: usize,
    ) -> Result<Accepted, CommandError> {
        let version = version as i64;
        let position = if version == 0 {
            LogPosition::default()
        } else {
            self.log
                .position_of(batch_id, version)
                .await?
                .ok_or_else(|| CommandError::Storage(format!("event {version} not found")))?
        };
        Ok(Accepted {
            batch_id,
            events,
            version,
            position,
        })
    }
}

fn storage_error(error: AggregateError<BatchError>) -> CommandError {
    match error {
        AggregateError::UserError(rejected) => CommandError::Rejected(rejected),
        AggregateError::AggregateConflict => CommandError::Conflict { attempts: 1 },
        other => CommandError::Storage(other.to_string()),
    }
}
