//! The conductor: the process manager that drives pipelines.
//!
//! It follows the event log (a checkpointed [`Follower`]) and answers two events with commands:
//! - `PipelineRequested` -> `ResolvePipeline`: the aggregate resolves the request against the
//!   batch's own state (prerequisites in dependency order, steps already done for every essay
//!   pruned, an unknown pipeline rejected with its reason) and starts the first phase;
//! - `PhaseCompleted` -> `AdvancePhase`: the next step starts (the aggregate itself records
//!   `PipelineCompleted` with the last phase's completion, and a cancelled batch starts nothing).
//!
//! Both commands are idempotent in the aggregate (a request already resolved, a phase already
//! advanced, changes nothing), so a replayed or restarted conductor never issues a command twice
//! in effect. Each command carries the triggering event's correlation id and trace context, and
//! the event's id as its causation id.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use domain::values::BatchId;
use domain::{BatchCommand, BatchEvent};
use futures::StreamExt;

use crate::follower::{Follower, FollowerError};
use crate::log::StoredEvent;
use crate::messages::event_id;
use crate::service::{CommandContext, CommandError, CommandService};

/// The user id stamped on the conductor's commands.
pub const CONDUCTOR_USER: &str = "system:conductor";

/// How many batches the conductor drives at once within a page.
const CONCURRENCY: usize = 16;

/// The conductor's [`Follower`]: answers `PipelineRequested` and `PhaseCompleted` with commands.
pub struct Conductor {
    commands: CommandService,
    issued: Arc<AtomicU64>,
}

impl Conductor {
    pub fn new(commands: CommandService) -> Self {
        Self {
            commands,
            issued: Arc::default(),
        }
    }

    /// Commands that appended events (a repeat that changed nothing is not counted).
    pub fn issued(&self) -> Arc<AtomicU64> {
        self.issued.clone()
    }

    /// The command an event calls for, if any.
    pub fn reaction(event: &BatchEvent) -> Option<BatchCommand> {
        match event {
            BatchEvent::PipelineRequested { request_id, .. } => {
                Some(BatchCommand::ResolvePipeline {
                    request_id: *request_id,
                })
            }
            BatchEvent::PhaseCompleted {
                request_id, phase, ..
            } => Some(BatchCommand::AdvancePhase {
                request_id: *request_id,
                completed_phase: phase.clone(),
            }),
            _ => None,
        }
    }

    async fn drive(
        &self,
        batch_id: BatchId,
        events: Vec<&StoredEvent>,
    ) -> Result<(), FollowerError> {
        for event in events {
            let Some(command) = Self::reaction(&event.event) else {
                continue;
            };
            let context = CommandContext {
                correlation_id: event.metadata.correlation_id,
                causation_id: Some(event_id(event.batch_id, event.sequence)),
                user_id: Some(CONDUCTOR_USER.to_owned()),
                require_owner: None,
                // The follow-up's events continue the trace of the event that called for it.
                trace: event.metadata.trace(),
            };
            let name = command.name();
            match self.commands.execute(batch_id, command, &context).await {
                Ok(accepted) => {
                    if accepted.events > 0 {
                        self.issued.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%batch_id, command = name, events = accepted.events, "conductor moved the pipeline on");
                    }
                }
                // The aggregate refuses nothing the conductor asks on a well-formed log; if it
                // ever does, retrying would not change the answer: record it and go on.
                Err(CommandError::Rejected(error)) => {
                    tracing::error!(%batch_id, command = name, %error, "the conductor's command was refused");
                }
                Err(error) => return Err(FollowerError::Downstream(error.to_string())),
            }
        }
        Ok(())
    }
}

impl Follower for Conductor {
    fn name(&self) -> &'static str {
        "conductor"
    }

    async fn handle(&self, events: &[StoredEvent]) -> Result<(), FollowerError> {
        // Per batch in log order; different batches at once.
        let mut by_batch: BTreeMap<BatchId, Vec<usize>> = BTreeMap::new();
        for (i, event) in events.iter().enumerate() {
            if Self::reaction(&event.event).is_some() {
                by_batch.entry(event.batch_id).or_default().push(i);
            }
        }
        let results: Vec<Result<(), FollowerError>> = futures::stream::iter(by_batch)
            .map(|(batch_id, indices)| {
                self.drive(batch_id, indices.into_iter().map(|i| &events[i]).collect())
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }
}
