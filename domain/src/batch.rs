//! The Batch aggregate: a teacher's batch of essays and the pipelines run over it.
//!
//! `decide` is a pure function of the state, the command and the pipeline catalog; `apply` is
//! pure and total (it never fails, whatever the order of well-formed events it is given).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::{Deserialize, Serialize};

use crate::command::BatchCommand;
use crate::error::BatchError;
use crate::event::{BatchEvent, PipelineOutcome};
use crate::pipeline::PipelineCatalog;
use crate::values::{BatchId, EssayId, MessageId, Outcome, Phase, RequestId, UserId};

/// Where a batch stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// Not registered yet (no events). Never seen outside the aggregate.
    #[default]
    New,
    Registered,
    Ready,
    Processing,
    Completed,
    CompletedWithFailures,
    Cancelled,
}

impl BatchStatus {
    pub const VISIBLE: [BatchStatus; 6] = [
        Self::Registered,
        Self::Ready,
        Self::Processing,
        Self::Completed,
        Self::CompletedWithFailures,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Registered => "registered",
            Self::Ready => "ready",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::CompletedWithFailures => "completed_with_failures",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::VISIBLE.into_iter().find(|v| v.as_str() == s)
    }
}

/// What the aggregate needs besides its own state: the configured pipelines.
#[derive(Debug, Clone)]
pub struct BatchServices {
    pub pipelines: Arc<PipelineCatalog>,
}

/// The pipeline currently requested or running (or the last one, once finished).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct PipelineRun {
    request_id: Option<RequestId>,
    requested: Option<Phase>,
    /// Empty until resolved.
    steps: Vec<Phase>,
    resolved: bool,
    finished: bool,
    /// Index into `steps` of the phase that started last.
    current: Option<usize>,
    /// Essays sent to the current phase, and the outcomes reported so far.
    phase_essays: BTreeSet<EssayId>,
    outcomes: BTreeMap<EssayId, Outcome>,
    phase_completed: bool,
    /// Every (phase, essay) result recorded in this run, to recognise duplicates.
    recorded: BTreeSet<(Phase, EssayId)>,
    /// Essays that failed a phase of this run: later phases skip them.
    failed: BTreeSet<EssayId>,
}

impl PipelineRun {
    fn active(&self) -> bool {
        self.request_id.is_some() && !self.finished
    }

    fn current_phase(&self) -> Option<&Phase> {
        self.current.and_then(|i| self.steps.get(i))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    id: Option<BatchId>,
    owner: Option<UserId>,
    expected: u32,
    essays: Vec<EssayId>,
    status: BatchStatus,
    /// The status to return to when a requested pipeline is rejected.
    status_before_request: BatchStatus,
    run: PipelineRun,
    /// Every request id ever accepted, so a retried request is recognised.
    request_ids: BTreeSet<RequestId>,
    /// Per phase, the essays that ever succeeded in it (drives pruning).
    succeeded: BTreeMap<Phase, BTreeSet<EssayId>>,
    /// Every result message ever recorded. A result names no pipeline request, so its message
    /// id is what recognises a redelivery that arrives after a later pipeline started.
    #[serde(default)]
    recorded_messages: BTreeSet<MessageId>,
}

impl Batch {
    pub fn id(&self) -> Option<BatchId> {
        self.id
    }

    pub fn owner(&self) -> Option<UserId> {
        self.owner
    }

    pub fn status(&self) -> BatchStatus {
        self.status
    }

    pub fn essay_count(&self) -> usize {
        self.essays.len()
    }

    /// The request id of the pipeline that is requested or running, if any.
    pub fn active_request(&self) -> Option<RequestId> {
        self.run.active().then_some(self.run.request_id).flatten()
    }

    fn registered(&self) -> Result<(), BatchError> {
        if self.status == BatchStatus::New {
            return Err(BatchError::NotFound);
        }
        Ok(())
    }

    fn not_cancelled(&self) -> Result<(), BatchError> {
        if self.status == BatchStatus::Cancelled {
            return Err(BatchError::Cancelled);
        }
        Ok(())
    }

    fn done_for_every_essay(&self, phase: &Phase) -> bool {
        self.succeeded
            .get(phase)
            .is_some_and(|done| self.essays.iter().all(|e| done.contains(e)))
    }

    /// Decides which events a command produces. Pure: no I/O, no clock, no randomness.
    pub fn decide(
        &self,
        command: BatchCommand,
        services: &BatchServices,
    ) -> Result<Vec<BatchEvent>, BatchError> {
        match command {
            BatchCommand::RegisterBatch {
                batch_id,
                owner_id,
                title,
                course_code,
                class_designation,
                expected_essay_count,
            } => {
                if self.status != BatchStatus::New {
                    return Err(BatchError::AlreadyRegistered);
                }
                Ok(vec![BatchEvent::BatchRegistered {
                    batch_id,
                    owner_id,
                    title,
                    course_code,
                    class_designation,
                    expected_essay_count,
                }])
            }
            BatchCommand::AddEssays { essays } => {
                self.registered()?;
                self.not_cancelled()?;
                if essays.is_empty() {
                    return Err(BatchError::NoEssays);
                }
                let added = self.essays.len() as u32;
                let adding = essays.len() as u32;
                if added + adding > self.expected {
                    return Err(BatchError::TooManyEssays {
                        expected: self.expected,
                        added,
                        adding,
                    });
                }
                let mut seen: BTreeSet<&EssayId> = self.essays.iter().collect();
                if let Some(dup) = essays.iter().find(|e| !seen.insert(&e.essay_id)) {
                    return Err(BatchError::DuplicateEssay(dup.essay_id.clone()));
                }
                let mut events = vec![BatchEvent::EssaysAdded { essays }];
                if added + adding == self.expected {
                    events.push(BatchEvent::BatchReadyForProcessing {
                        essay_count: self.expected,
                    });
                }
                Ok(events)
            }
            BatchCommand::RequestPipeline {
                request_id,
                pipeline,
            } => {
                self.registered()?;
                if self.request_ids.contains(&request_id) {
                    return Ok(vec![]);
                }
                self.not_cancelled()?;
                if (self.essays.len() as u32) < self.expected {
                    return Err(BatchError::EssaysIncomplete {
                        added: self.essays.len() as u32,
                        expected: self.expected,
                    });
                }
                if let Some(running) = self.active_request() {
                    return Err(BatchError::PipelineInProgress(running));
                }
                if !services.pipelines.contains(&pipeline) {
                    return Err(BatchError::UnknownPipeline(pipeline));
                }
                Ok(vec![BatchEvent::PipelineRequested {
                    request_id,
                    pipeline,
                }])
            }
            BatchCommand::ResolvePipeline { request_id } => {
                self.registered()?;
                let pending = self.run.active()
                    && !self.run.resolved
                    && self.run.request_id == Some(request_id);
                if !pending || self.status == BatchStatus::Cancelled {
                    return Ok(vec![]);
                }
                let Some(requested) = self.run.requested.clone() else {
                    return Ok(vec![]);
                };
                match services
                    .pipelines
                    .resolve(&requested, |p| self.done_for_every_essay(p))
                {
                    Err(e) => Ok(vec![BatchEvent::PipelineRejected {
                        request_id,
                        reason: e.to_string(),
                    }]),
                    Ok(resolution) => {
                        let first = resolution.steps[0].clone();
                        Ok(vec![
                            BatchEvent::PipelineResolved {
                                request_id,
                                requested,
                                steps: resolution.steps,
                                pruned: resolution.pruned,
                            },
                            BatchEvent::PhaseStarted {
                                request_id,
                                phase: first,
                                essays: self.essays.clone(),
                            },
                        ])
                    }
                }
            }
            BatchCommand::RecordEssayResult {
                essay_id,
                phase,
                outcome,
                message_id,
                result,
                error,
                pipeline_request_id,
            } => {
                self.registered()?;
                if !self.essays.contains(&essay_id) {
                    return Err(BatchError::UnknownEssay(essay_id));
                }
                let stale = pipeline_request_id.is_some_and(|answered| {
                    self.request_ids.contains(&answered) && self.run.request_id != Some(answered)
                });
                if stale
                    || self.recorded_messages.contains(&message_id)
                    || self
                        .run
                        .recorded
                        .contains(&(phase.clone(), essay_id.clone()))
                {
                    return Ok(vec![]);
                }
                let expected = self.run.active()
                    && self.run.current_phase() == Some(&phase)
                    && self.run.phase_essays.contains(&essay_id);
                let Some(request_id) = self.run.request_id.filter(|_| expected) else {
                    return Err(BatchError::ResultNotExpected { essay_id, phase });
                };
                let mut events = vec![match outcome {
                    Outcome::Succeeded => BatchEvent::EssayPhaseCompleted {
                        request_id,
                        essay_id: essay_id.clone(),
                        phase: phase.clone(),
                        message_id,
                        result,
                    },
                    Outcome::Failed => BatchEvent::EssayPhaseFailed {
                        request_id,
                        essay_id: essay_id.clone(),
                        phase: phase.clone(),
                        message_id,
                        error: error.unwrap_or_else(|| "processing failed".to_owned()),
                    },
                }];
                // A cancelled batch records late results, but they change nothing else.
                if self.status == BatchStatus::Cancelled {
                    return Ok(events);
                }
                let reported = self.run.outcomes.len() + 1;
                if reported < self.run.phase_essays.len() {
                    return Ok(events);
                }
                let failed_now = self
                    .run
                    .outcomes
                    .values()
                    .filter(|o| **o == Outcome::Failed)
                    .count()
                    + usize::from(outcome == Outcome::Failed);
                events.push(BatchEvent::PhaseCompleted {
                    request_id,
                    phase,
                    succeeded: (reported - failed_now) as u32,
                    failed: failed_now as u32,
                });
                let any_failed = !self.run.failed.is_empty() || failed_now > 0;
                let last_step = self.run.current.map(|i| i + 1) == Some(self.run.steps.len());
                let none_left = reported == failed_now;
                if last_step || none_left {
                    events.push(BatchEvent::PipelineCompleted {
                        request_id,
                        outcome: if any_failed {
                            PipelineOutcome::CompletedWithFailures
                        } else {
                            PipelineOutcome::Completed
                        },
                    });
                }
                Ok(events)
            }
            BatchCommand::AdvancePhase {
                request_id,
                completed_phase,
            } => {
                self.registered()?;
                let run = &self.run;
                let due = run.active()
                    && run.request_id == Some(request_id)
                    && run.phase_completed
                    && run.current_phase() == Some(&completed_phase)
                    && self.status != BatchStatus::Cancelled;
                let next = run.current.and_then(|i| run.steps.get(i + 1));
                match next.filter(|_| due) {
                    None => Ok(vec![]),
                    Some(next) => Ok(vec![BatchEvent::PhaseStarted {
                        request_id,
                        phase: next.clone(),
                        essays: self
                            .essays
                            .iter()
                            .filter(|e| !run.failed.contains(*e))
                            .cloned()
                            .collect(),
                    }]),
                }
            }
            BatchCommand::CancelBatch { reason } => {
                self.registered()?;
                self.not_cancelled()?;
                Ok(vec![BatchEvent::BatchCancelled { reason }])
            }
        }
    }

    /// Folds one event into the state. Total: it never fails.
    pub fn apply_event(&mut self, event: BatchEvent) {
        match event {
            BatchEvent::BatchRegistered {
                batch_id,
                owner_id,
                expected_essay_count,
                ..
            } => {
                self.id = Some(batch_id);
                self.owner = Some(owner_id);
                self.expected = expected_essay_count.get();
                self.status = BatchStatus::Registered;
            }
            BatchEvent::EssaysAdded { essays } => {
                self.essays.extend(essays.into_iter().map(|e| e.essay_id));
            }
            BatchEvent::BatchReadyForProcessing { .. } => {
                if self.status == BatchStatus::Registered {
                    self.status = BatchStatus::Ready;
                }
            }
            BatchEvent::PipelineRequested {
                request_id,
                pipeline,
            } => {
                self.request_ids.insert(request_id);
                self.run = PipelineRun {
                    request_id: Some(request_id),
                    requested: Some(pipeline),
                    ..PipelineRun::default()
                };
                if self.status != BatchStatus::Cancelled {
                    self.status_before_request = self.status;
                    self.status = BatchStatus::Processing;
                }
            }
            BatchEvent::PipelineResolved { steps, .. } => {
                self.run.steps = steps;
                self.run.resolved = true;
            }
            BatchEvent::PipelineRejected { .. } => {
                self.run.finished = true;
                if self.status == BatchStatus::Processing {
                    self.status = self.status_before_request;
                }
            }
            BatchEvent::PhaseStarted { phase, essays, .. } => {
                self.run.current = self.run.steps.iter().position(|p| *p == phase);
                self.run.phase_essays = essays.into_iter().collect();
                self.run.outcomes.clear();
                self.run.phase_completed = false;
            }
            BatchEvent::EssayPhaseCompleted {
                essay_id,
                phase,
                message_id,
                ..
            } => {
                self.recorded_messages.insert(message_id);
                self.run.recorded.insert((phase.clone(), essay_id.clone()));
                self.run
                    .outcomes
                    .insert(essay_id.clone(), Outcome::Succeeded);
                self.succeeded.entry(phase).or_default().insert(essay_id);
            }
            BatchEvent::EssayPhaseFailed {
                essay_id,
                phase,
                message_id,
                ..
            } => {
                self.recorded_messages.insert(message_id);
                self.run.recorded.insert((phase, essay_id.clone()));
                self.run.outcomes.insert(essay_id.clone(), Outcome::Failed);
                self.run.failed.insert(essay_id);
            }
            BatchEvent::PhaseCompleted { .. } => {
                self.run.phase_completed = true;
            }
            BatchEvent::PipelineCompleted { outcome, .. } => {
                self.run.finished = true;
                if self.status != BatchStatus::Cancelled {
                    self.status = match outcome {
                        PipelineOutcome::Completed => BatchStatus::Completed,
                        PipelineOutcome::CompletedWithFailures => {
                            BatchStatus::CompletedWithFailures
                        }
                    };
                }
            }
            BatchEvent::BatchCancelled { .. } => {
                self.status = BatchStatus::Cancelled;
            }
        }
    }
}

impl Aggregate for Batch {
    const TYPE: &'static str = "Batch";
    type Command = BatchCommand;
    type Event = BatchEvent;
    type Error = BatchError;
    type Services = BatchServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command, services)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.apply_event(event);
    }
}
