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
use std::time::Duration;

use chrono::Utc;
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventStore};
use cqrs_es::{AggregateError, EventStore};
use domain::values::BatchId;
use domain::{Batch, BatchCommand, BatchError, BatchServices};
use rand::Rng;
use uuid::Uuid;

use crate::log::{EventLog, EventMetadata, LogError, LogPosition};
use crate::repository::{EventRepository, RECEIPT};
use crate::storage::Storage;

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
    /// Recently written batches at their version, so that most commands need no load. Only
    /// states this service itself committed go in; see `execute` for how staleness is caught.
    cache: moka::sync::Cache<BatchId, Arc<(usize, Batch)>>,
    log: EventLog,
    services: BatchServices,
    max_attempts: u32,
}

impl CommandService {
    pub fn new(storage: &Storage, services: BatchServices) -> Self {
        let store = PersistedEventStore::new_event_store(EventRepository::new(storage))
            .with_upcasters(crate::upcasters());
        Self {
            store: Arc::new(store),
            cache: moka::sync::Cache::new(100_000),
            log: EventLog::new(storage.clone()),
            services,
            max_attempts: 25,
        }
    }

    pub fn services(&self) -> &BatchServices {
        &self.services
    }

    /// Decides `command` against the current state of `batch_id` and appends its events.
    pub async fn execute(
        &self,
        batch_id: BatchId,
        command: BatchCommand,
        context: &CommandContext,
    ) -> Result<Accepted, CommandError> {
        let aggregate_id = batch_id.to_string();
        let metadata = EventMetadata {
            correlation_id: context.correlation_id,
            causation_id: context.causation_id,
            user_id: context.user_id.clone(),
            occurred_at: Utc::now(),
            command: command.name().to_owned(),
        }
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
