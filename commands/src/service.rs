//! The command service: load a batch, decide, append, with optimistic concurrency.
//!
//! Every command is decided against the batch's current state, loaded from the event store in
//! cqrs-es's event-store mode (the snapshot and aggregate-store modes of cqrs-es 0.5 apply new
//! events twice). The append fails if another command appended to the same batch since the
//! load; the service then reloads and decides again, a bounded number of times, before giving
//! up with [`CommandError::Conflict`]. An accepted command's events are durable when
//! [`CommandService::execute`] returns.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cqrs_es::persist::PersistedEventStore;
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
        for attempt in 1..=self.max_attempts {
            let loaded = self
                .store
                .load_aggregate(&aggregate_id)
                .await
                .map_err(storage_error)?;
            let version = loaded.current_sequence;
            if let Some(owner) = context.require_owner
                && version > 0
                && loaded.aggregate.owner() != Some(owner)
            {
                return Err(CommandError::Rejected(BatchError::NotFound));
            }
            let events = loaded.aggregate.decide(command.clone(), &self.services)?;
            if events.is_empty() {
                return self.accepted(batch_id, 0, version).await;
            }
            let count = events.len();
            let commit = self.store.commit(events, loaded, metadata.clone());
            let (committed, receipt) = RECEIPT
                .scope(RefCell::new(Vec::new()), async {
                    let committed = commit.await;
                    (committed, RECEIPT.with(|r| r.take()))
                })
                .await;
            match committed {
                Ok(_) => {
                    self.log.storage().announce_append();
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
                    // Jittered backoff so that competing writers stop colliding.
                    let cap = 1u64 << attempt.min(6);
                    let wait = rand::rng().random_range(0..=cap);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(error) => return Err(storage_error(error)),
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
