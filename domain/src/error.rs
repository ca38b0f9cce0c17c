//! Why the Batch aggregate refuses a command. Storage failures are not here: they belong to
//! the write side (`commands`), so "rejected" and "could not record" never mix.

use crate::values::{EssayId, Phase, RequestId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch not found")]
    NotFound,
    #[error("batch already exists")]
    AlreadyRegistered,
    #[error("batch is cancelled")]
    Cancelled,
    #[error("no essays given")]
    NoEssays,
    #[error("batch expects {expected} essays; {added} are added and {adding} more would exceed it")]
    TooManyEssays {
        expected: u32,
        added: u32,
        adding: u32,
    },
    #[error("essay {0} is already in the batch")]
    DuplicateEssay(EssayId),
    #[error("only {added} of the {expected} expected essays are added")]
    EssaysIncomplete { added: u32, expected: u32 },
    #[error("pipeline request {0} is still running")]
    PipelineInProgress(RequestId),
    #[error("unknown pipeline {0}")]
    UnknownPipeline(Phase),
    #[error("essay {0} is not in the batch")]
    UnknownEssay(EssayId),
    #[error("no result for phase {phase} of essay {essay_id} is expected now")]
    ResultNotExpected { essay_id: EssayId, phase: Phase },
}

impl BatchError {
    /// A stable, URL-safe name for the rejection, used as the problem `type` by the API.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "not-found",
            Self::AlreadyRegistered => "batch-exists",
            Self::Cancelled => "batch-cancelled",
            Self::NoEssays => "no-essays",
            Self::TooManyEssays { .. } => "too-many-essays",
            Self::DuplicateEssay(_) => "duplicate-essay",
            Self::EssaysIncomplete { .. } => "essays-incomplete",
            Self::PipelineInProgress(_) => "pipeline-in-progress",
            Self::UnknownPipeline(_) => "unknown-pipeline",
            Self::UnknownEssay(_) => "unknown-essay",
            Self::ResultNotExpected { .. } => "result-not-expected",
        }
    }
}
