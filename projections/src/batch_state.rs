//! The `batch_state` read model: per batch, its status, essays, the outcome of every phase for
//! every essay, and the pipeline's resolved steps. The conductor decides from it; the API
//! serves it as `GET /v1/batches/{id}` and `/status`.
//!
//! Guarantee: exactly-once effect. A page of events and the checkpoint that covers it are
//! committed in one transaction (see [`crate::worker`]). Replay: `essayflow replay
//! --projection batch_state` empties the table and folds the log again from the start.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use commands::StoredEvent;
use domain::{BatchEvent, BatchStatus, PipelineOutcome};
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;

use crate::docs::{self, DocRow};
use crate::feed::Change;
use crate::{Projection, ProjectionError};

pub const TABLE: &str = "batch_state";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EssayView {
    pub essay_id: String,
    pub title: String,
    pub characters: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EssayOutcomeView {
    /// `succeeded` or `failed`.
    pub outcome: String,
    pub request_id: String,
    pub message_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub recorded_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PipelineView {
    pub request_id: String,
    pub requested: String,
    /// `requested`, `running`, `completed`, `completed_with_failures` or `rejected`.
    pub state: String,
    pub steps: Vec<String>,
    pub pruned: Vec<String>,
    pub current_phase: Option<String>,
    pub completed_phases: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One batch as the conductor and the owner see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchView {
    pub batch_id: String,
    pub owner_id: String,
    pub title: String,
    pub course_code: String,
    pub class_designation: Option<String>,
    pub expected_essay_count: u32,
    pub status: String,
    pub essays: Vec<EssayView>,
    /// phase -> essay id -> latest outcome.
    pub phases: BTreeMap<String, BTreeMap<String, EssayOutcomeView>>,
    pub pipeline: Option<PipelineView>,
    pub pipelines_requested: u32,
    /// The status to return to if the pending request is rejected.
    pub status_before_request: Option<String>,
    pub cancel_reason: Option<String>,
    /// The batch's version: the sequence of the last event applied.
    pub version: i64,
    /// The global position of the last event applied.
    pub position: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl BatchView {
    /// Folds one event into the view (`None` before the batch's first event). Events of a
    /// batch this view has already applied (by version) are ignored, which keeps the fold
    /// idempotent.
    pub fn fold(view: Option<Self>, stored: &StoredEvent) -> Option<Self> {
        if let BatchEvent::BatchRegistered {
            batch_id,
            owner_id,
            title,
            course_code,
            class_designation,
            expected_essay_count,
        } = &stored.event
        {
            if view.is_some() {
                return view;
            }
            return Some(Self {
                batch_id: batch_id.to_string(),
                owner_id: owner_id.to_string(),
                title: title.to_string(),
                course_code: course_code.to_string(),
                class_designation: class_designation.as_ref().map(ToString::to_string),
                expected_essay_count: expected_essay_count.get(),
                status: BatchStatus::Registered.as_str().to_owned(),
                essays: Vec::new(),
                phases: BTreeMap::new(),
                pipeline: None,
                pipelines_requested: 0,
                status_before_request: None,
                cancel_reason: None,
                version: stored.sequence,
                position: stored.at.position,
                created_at: stored.metadata.occurred_at,
                updated_at: stored.metadata.occurred_at,
            });
        }
        let mut view = view?;
        if stored.sequence <= view.version {
            return Some(view);
        }
        view.version = stored.sequence;
        view.position = stored.at.position;
        view.updated_at = stored.metadata.occurred_at;
        let set_status = |view: &mut Self, status: BatchStatus| {
            if view.status != BatchStatus::Cancelled.as_str() {
                view.status = status.as_str().to_owned();
            }
        };
        match &stored.event {
            BatchEvent::BatchRegistered { .. } => {}
            BatchEvent::EssaysAdded { essays } => {
                view.essays.extend(essays.iter().map(|e| EssayView {
                    essay_id: e.essay_id.to_string(),
                    title: e.title.to_string(),
                    characters: e.text.as_str().chars().count(),
                }));
            }
            BatchEvent::BatchReadyForProcessing { .. } => set_status(&mut view, BatchStatus::Ready),
            BatchEvent::PipelineRequested {
                request_id,
                pipeline,
            } => {
                view.pipelines_requested += 1;
                view.status_before_request = Some(view.status.clone());
                view.pipeline = Some(PipelineView {
                    request_id: request_id.to_string(),
                    requested: pipeline.to_string(),
                    state: "requested".to_owned(),
                    steps: Vec::new(),
                    pruned: Vec::new(),
                    current_phase: None,
                    completed_phases: Vec::new(),
                    reason: None,
                });
                set_status(&mut view, BatchStatus::Processing);
            }
            BatchEvent::PipelineResolved { steps, pruned, .. } => {
                if let Some(p) = view.pipeline.as_mut() {
                    p.steps = steps.iter().map(ToString::to_string).collect();
                    p.pruned = pruned.iter().map(ToString::to_string).collect();
                    p.state = "running".to_owned();
                }
            }
            BatchEvent::PipelineRejected { reason, .. } => {
                if let Some(p) = view.pipeline.as_mut() {
                    p.state = "rejected".to_owned();
                    p.reason = Some(reason.clone());
                }
                if view.status == BatchStatus::Processing.as_str()
                    && let Some(previous) = view.status_before_request.clone()
                {
                    view.status = previous;
                }
            }
            BatchEvent::PhaseStarted { phase, .. } => {
                if let Some(p) = view.pipeline.as_mut() {
                    p.current_phase = Some(phase.to_string());
                }
            }
            BatchEvent::EssayPhaseCompleted {
                request_id,
                essay_id,
                phase,
                message_id,
                result,
            } => {
                view.phases.entry(phase.to_string()).or_default().insert(
                    essay_id.to_string(),
                    EssayOutcomeView {
                        outcome: "succeeded".to_owned(),
                        request_id: request_id.to_string(),
                        message_id: message_id.to_string(),
                        result: Some(result.clone()),
                        error: None,
                        recorded_at: stored.metadata.occurred_at,
                    },
                );
            }
            BatchEvent::EssayPhaseFailed {
                request_id,
                essay_id,
                phase,
                message_id,
                error,
            } => {
                view.phases.entry(phase.to_string()).or_default().insert(
                    essay_id.to_string(),
                    EssayOutcomeView {
                        outcome: "failed".to_owned(),
                        request_id: request_id.to_string(),
                        message_id: message_id.to_string(),
                        result: None,
                        error: Some(error.clone()),
                        recorded_at: stored.metadata.occurred_at,
                    },
                );
            }
            BatchEvent::PhaseCompleted { phase, .. } => {
                if let Some(p) = view.pipeline.as_mut() {
                    p.completed_phases.push(phase.to_string());
                }
            }
            BatchEvent::PipelineCompleted { outcome, .. } => {
                let (state, status) = match outcome {
                    PipelineOutcome::Completed => ("completed", BatchStatus::Completed),
                    PipelineOutcome::CompletedWithFailures => (
                        "completed_with_failures",
                        BatchStatus::CompletedWithFailures,
                    ),
                };
                if let Some(p) = view.pipeline.as_mut() {
                    p.state = state.to_owned();
                    p.current_phase = None;
                }
                set_status(&mut view, status);
            }
            BatchEvent::BatchCancelled { reason } => {
                view.status = BatchStatus::Cancelled.as_str().to_owned();
                view.cancel_reason = reason.clone();
            }
        }
        Some(view)
    }

    pub fn to_row(&self) -> Result<DocRow, ProjectionError> {
        Ok(DocRow {
            id: self.batch_id.clone(),
            owner_id: self.owner_id.clone(),
            status: self.status.clone(),
            // The position of the batch's first event; `apply_page` sets it.
            created_position: 0,
            version: self.version,
            position: self.position,
            doc: docs::to_doc(&self.batch_id, self)?,
        })
    }
}

/// A read-model row that remembers the version of the last event it applied.
pub(crate) trait Versioned {
    fn version(&self) -> i64;
}

impl Versioned for BatchView {
    fn version(&self) -> i64 {
        self.version
    }
}

/// Folds a page of events into the rows of the batches they touch, calling `changed` with
/// each new version of a row.
pub(crate) async fn apply_page<V>(
    conn: &mut AnyConnection,
    table: &str,
    events: &[StoredEvent],
    fold: impl Fn(Option<V>, &StoredEvent) -> Option<V>,
    to_row: impl Fn(&V) -> Result<DocRow, ProjectionError>,
    mut changed: impl FnMut(&V) -> Result<(), ProjectionError>,
) -> Result<HashMap<String, V>, ProjectionError>
where
    V: serde::de::DeserializeOwned + Versioned,
{
    let mut ids: Vec<String> = events.iter().map(|e| e.batch_id.to_string()).collect();
    ids.sort_unstable();
    ids.dedup();
    let existing = docs::load_many::<V>(conn, table, &ids).await?;
    let mut created: HashMap<String, i64> = HashMap::new();
    let mut views: HashMap<String, Option<V>> = HashMap::with_capacity(ids.len());
    for (id, (row, view)) in existing {
        created.insert(id.clone(), row.created_position);
        views.insert(id, Some(view));
    }
    for event in events {
        let id = event.batch_id.to_string();
        created.entry(id.clone()).or_insert(event.at.position);
        let before = views.remove(&id).flatten();
        let was = before.as_ref().map(Versioned::version);
        let view = fold(before, event);
        if let Some(view) = &view
            && was != Some(view.version())
        {
            changed(view)?;
        }
        views.insert(id, view);
    }
    let views: HashMap<String, V> = views
        .into_iter()
        .filter_map(|(id, view)| view.map(|v| (id, v)))
        .collect();
    let mut rows = Vec::with_capacity(views.len());
    for (id, view) in &views {
        let mut row = to_row(view)?;
        row.created_position = created.get(id).copied().unwrap_or(row.position);
        rows.push(row);
    }
    docs::upsert_many(conn, table, &rows).await?;
    Ok(views)
}

/// The batch_state projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchStateProjection;

impl Projection for BatchStateProjection {
    fn name(&self) -> &'static str {
        "batch_state"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[TABLE]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[StoredEvent],
        changes: Option<&mut Vec<Change>>,
    ) -> Result<(), ProjectionError> {
        let mut changes = changes;
        // One change per event that moved a batch to a new version: the whole view after it.
        let changed = |view: &BatchView| {
            if let Some(changes) = changes.as_deref_mut() {
                changes.push(Change {
                    topic: Change::batch_topic(&view.batch_id),
                    version: view.version,
                    data: docs::to_doc(&view.batch_id, view)?,
                });
            }
            Ok(())
        };
        apply_page(
            conn,
            TABLE,
            events,
            BatchView::fold,
            BatchView::to_row,
            changed,
        )
        .await?;
        Ok(())
    }
}
