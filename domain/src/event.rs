//! The events of the Batch aggregate: a persisted contract.
//!
//! Every event has a stable `event_type` (its variant name) and an `event_version`. Old payloads
//! are never edited: a change of shape gets a new version and a cqrs-es upcaster.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::values::{
    BatchId, ClassDesignation, CourseCode, EssayId, EssayText, EssayTitle, ExpectedEssayCount,
    MessageId, Phase, RequestId, Title, UserId,
};

/// One essay as it was added to a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Essay {
    pub essay_id: EssayId,
    pub title: EssayTitle,
    pub text: EssayText,
}

/// How a finished pipeline ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineOutcome {
    Completed,
    CompletedWithFailures,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BatchEvent {
    BatchRegistered {
        batch_id: BatchId,
        owner_id: UserId,
        title: Title,
        course_code: CourseCode,
        class_designation: Option<ClassDesignation>,
        expected_essay_count: ExpectedEssayCount,
    },
    EssaysAdded {
        essays: Vec<Essay>,
    },
    BatchReadyForProcessing {
        essay_count: u32,
    },
    PipelineRequested {
        request_id: RequestId,
        pipeline: Phase,
    },
    /// The conductor resolved a request into ordered steps.
    PipelineResolved {
        request_id: RequestId,
        requested: Phase,
        steps: Vec<Phase>,
        pruned: Vec<Phase>,
    },
    /// The conductor could not resolve a request (e.g. the pipeline was removed from the
    /// configuration after it was requested); the batch returns to its previous status.
    PipelineRejected {
        request_id: RequestId,
        reason: String,
    },
    PhaseStarted {
        request_id: RequestId,
        phase: Phase,
        essays: Vec<EssayId>,
    },
    EssayPhaseCompleted {
        request_id: RequestId,
        essay_id: EssayId,
        phase: Phase,
        message_id: MessageId,
        result: serde_json::Value,
    },
    EssayPhaseFailed {
        request_id: RequestId,
        essay_id: EssayId,
        phase: Phase,
        message_id: MessageId,
        error: String,
    },
    PhaseCompleted {
        request_id: RequestId,
        phase: Phase,
        succeeded: u32,
        failed: u32,
    },
    PipelineCompleted {
        request_id: RequestId,
        outcome: PipelineOutcome,
    },
    BatchCancelled {
        reason: Option<String>,
    },
}

impl BatchEvent {
    /// Every event type, as stored in the event log.
    pub const TYPES: [&'static str; 12] = [
        "BatchRegistered",
        "EssaysAdded",
        "BatchReadyForProcessing",
        "PipelineRequested",
        "PipelineResolved",
        "PipelineRejected",
        "PhaseStarted",
        "EssayPhaseCompleted",
        "EssayPhaseFailed",
        "PhaseCompleted",
        "PipelineCompleted",
        "BatchCancelled",
    ];

    pub fn event_type_str(&self) -> &'static str {
        match self {
            Self::BatchRegistered { .. } => "BatchRegistered",
            Self::EssaysAdded { .. } => "EssaysAdded",
            Self::BatchReadyForProcessing { .. } => "BatchReadyForProcessing",
            Self::PipelineRequested { .. } => "PipelineRequested",
            Self::PipelineResolved { .. } => "PipelineResolved",
            Self::PipelineRejected { .. } => "PipelineRejected",
            Self::PhaseStarted { .. } => "PhaseStarted",
            Self::EssayPhaseCompleted { .. } => "EssayPhaseCompleted",
            Self::EssayPhaseFailed { .. } => "EssayPhaseFailed",
            Self::PhaseCompleted { .. } => "PhaseCompleted",
            Self::PipelineCompleted { .. } => "PipelineCompleted",
            Self::BatchCancelled { .. } => "BatchCancelled",
        }
    }
}

/// The version of every event's current payload shape.
pub const EVENT_VERSION: &str = "1.0";

impl DomainEvent for BatchEvent {
    fn event_type(&self) -> String {
        self.event_type_str().to_owned()
    }

    fn event_version(&self) -> String {
        EVENT_VERSION.to_owned()
    }
}
