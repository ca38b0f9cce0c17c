//! The commands the Batch aggregate handles. Every field is an already-parsed value object.

use crate::event::Essay;
use crate::values::{
    BatchId, ClassDesignation, CourseCode, EssayId, ExpectedEssayCount, MessageId, Outcome, Phase,
    RequestId, Title, UserId,
};

#[derive(Debug, Clone, PartialEq)]
pub enum BatchCommand {
    RegisterBatch {
        batch_id: BatchId,
        owner_id: UserId,
        title: Title,
        course_code: CourseCode,
        class_designation: Option<ClassDesignation>,
        expected_essay_count: ExpectedEssayCount,
    },
    AddEssays {
        essays: Vec<Essay>,
    },
    /// Asks for a pipeline. A repeated `request_id` is accepted and changes nothing.
    RequestPipeline {
        request_id: RequestId,
        pipeline: Phase,
    },
    /// Issued by the conductor: resolve the pending request and start its first phase.
    /// Idempotent: a request already resolved (or not pending) changes nothing.
    ResolvePipeline {
        request_id: RequestId,
    },
    /// A processor's result for one essay in one phase. A duplicate changes nothing.
    RecordEssayResult {
        essay_id: EssayId,
        phase: Phase,
        outcome: Outcome,
        message_id: MessageId,
        result: serde_json::Value,
        error: Option<String>,
        /// The pipeline request the processor answered (echoed from the phase request), when it
        /// says: an answer to another request than the running one is stale and changes nothing.
        pipeline_request_id: Option<RequestId>,
    },
    /// Issued by the conductor after `completed_phase` completed: start the next step.
    /// Idempotent: if the next step already started, this changes nothing.
    AdvancePhase {
        request_id: RequestId,
        completed_phase: Phase,
    },
    CancelBatch {
        reason: Option<String>,
    },
}

impl BatchCommand {
    /// A stable name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::RegisterBatch { .. } => "RegisterBatch",
            Self::AddEssays { .. } => "AddEssays",
            Self::RequestPipeline { .. } => "RequestPipeline",
            Self::ResolvePipeline { .. } => "ResolvePipeline",
            Self::RecordEssayResult { .. } => "RecordEssayResult",
            Self::AdvancePhase { .. } => "AdvancePhase",
            Self::CancelBatch { .. } => "CancelBatch",
        }
    }
}
