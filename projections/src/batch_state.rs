//! The `batch_state` read model: per batch, its status, essays, the outcome of every phase for
//! every essay, and the pipeline's resolved steps. The conductor decides from it; the API
//! serves it as `GET /v1/batches/{id}` and `/status`, and the live feed as `batch:<id>`.
//!
//! Layout: a batch's [`BatchSummary`] is one row of `batch_state`; each essay is a row of
//! `batch_state_essays` and each (phase, essay) outcome a row of `batch_state_outcomes`. An
//! event writes the summary and its own rows only, so a page costs what it changed, not what
//! the batch holds; [`crate::ReadModels::batch`] puts a [`BatchView`] back together.
//!
//! Guarantees:
//! - **Exactly-once effect.** A page of events and the checkpoint that covers it are committed
//!   in one transaction (see [`crate::worker`]).
//! - **Changes are patches.** With a feed, every event that moves a batch to a new version
//!   lists one [`Change`] whose JSON Patch (RFC 6902) turns the view at the previous version
//!   into the view at this one: the summary's diff plus one operation per row written.
//!
//! Replay: `essayflow replay --projection batch_state` rebuilds it beside the live model
//! (see [`crate::rebuild`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use commands::StoredEvent;
use domain::{BatchEvent, BatchStatus, PipelineOutcome};
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;

use crate::docs::{self, Cell, DocRow};
use crate::feed::Change;
use crate::patch;
use crate::{Projection, ProjectionError};

/// Batch summaries, one row per batch (the shared document-table shape of [`crate::docs`]).
pub const TABLE: &str = "batch_state";
/// `(batch_id, ordinal) -> essay_id, doc`: a batch's essays in the order they were added.
pub const ESSAYS: &str = "batch_state_essays";
/// `(batch_id, phase, essay_id) -> outcome, doc`: the latest outcome of an essay in a phase.
pub const OUTCOMES: &str = "batch_state_outcomes";

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

/// A batch without its essays and outcomes: one row, small whatever the batch's size. It is
/// what `GET /v1/batches` lists, and the top level of a [`BatchView`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchSummary {
    pub batch_id: String,
    pub owner_id: String,
    pub title: String,
    pub course_code: String,
    pub class_designation: Option<String>,
    pub expected_essay_count: u32,
    /// Essays added so far.
    pub essay_count: u32,
    pub status: String,
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

/// One batch as the conductor and the owner see it: its summary's fields, then its essays and
/// its outcomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchView {
    #[serde(flatten)]
    pub summary: BatchSummary,
    /// In the order they were added.
    pub essays: Vec<EssayView>,
    /// phase -> essay id -> latest outcome.
    pub phases: BTreeMap<String, BTreeMap<String, EssayOutcomeView>>,
}

/// A row an event writes besides the summary.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchRow {
    /// The essay at `ordinal` (0-based, in the order added).
    Essay { ordinal: u32, essay: EssayView },
    /// The latest outcome of `essay_id` in `phase` (replacing an earlier run's).
    Outcome {
        phase: String,
        essay_id: String,
        outcome: EssayOutcomeView,
    },
}

impl BatchSummary {
    /// Folds one event into the summary (`None` before the batch's first event), pushing the
    /// rows it writes onto `rows`. Events this summary has already applied (by version) are
    /// ignored and write nothing, which keeps the fold idempotent.
    pub fn fold(
        view: Option<Self>,
        stored: &StoredEvent,
        rows: &mut Vec<BatchRow>,
    ) -> Option<Self> {
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
                essay_count: 0,
                status: BatchStatus::Registered.as_str().to_owned(),
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
                for essay in essays {
                    rows.push(BatchRow::Essay {
                        ordinal: view.essay_count,
                        essay: EssayView {
                            essay_id: essay.essay_id.to_string(),
                            title: essay.title.to_string(),
                            characters: essay.text.as_str().chars().count(),
                        },
                    });
                    view.essay_count += 1;
                }
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
            } => rows.push(BatchRow::Outcome {
                phase: phase.to_string(),
                essay_id: essay_id.to_string(),
                outcome: EssayOutcomeView {
                    outcome: "succeeded".to_owned(),
                    request_id: request_id.to_string(),
                    message_id: message_id.to_string(),
                    result: Some(result.clone()),
                    error: None,
                    recorded_at: stored.metadata.occurred_at,
                },
            }),
            BatchEvent::EssayPhaseFailed {
                request_id,
                essay_id,
                phase,
                message_id,
                error,
            } => rows.push(BatchRow::Outcome {
                phase: phase.to_string(),
                essay_id: essay_id.to_string(),
                outcome: EssayOutcomeView {
                    outcome: "failed".to_owned(),
                    request_id: request_id.to_string(),
                    message_id: message_id.to_string(),
                    result: None,
                    error: Some(error.clone()),
                    recorded_at: stored.metadata.occurred_at,
                },
            }),
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
}

impl BatchView {
    /// Folds one event into the whole view, in memory (`GET /v1/batches/{id}?at_version=`, and
    /// verification): the summary's fold, with the rows it writes applied to the essays and
    /// outcomes.
    pub fn fold(view: Option<Self>, stored: &StoredEvent) -> Option<Self> {
        let (summary, mut essays, mut phases) = match view {
            Some(view) => (Some(view.summary), view.essays, view.phases),
            None => (None, Vec::new(), BTreeMap::new()),
        };
        let mut rows = Vec::new();
        let summary = BatchSummary::fold(summary, stored, &mut rows)?;
        for row in rows {
            match row {
                BatchRow::Essay { essay, .. } => essays.push(essay),
                BatchRow::Outcome {
                    phase,
                    essay_id,
                    outcome,
                } => {
                    phases.entry(phase).or_default().insert(essay_id, outcome);
                }
            }
        }
        Some(Self {
            summary,
            essays,
            phases,
        })
    }
}

/// What `batch_state.doc` holds: the summary, and the phases that have outcome rows (so that a
/// patch knows whether `/phases/<phase>` exists yet without reading them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredBatch {
    #[serde(flatten)]
    pub summary: BatchSummary,
    #[serde(default)]
    pub outcome_phases: BTreeSet<String>,
}

/// A batch as a page folds it.
struct Folding {
    created_position: i64,
    stored: Option<StoredBatch>,
    /// The summary as JSON at its current version, kept for the next event's diff.
    json: Option<serde_json::Value>,
}

fn json_of(summary: &BatchSummary) -> Result<serde_json::Value, ProjectionError> {
    docs::to_value(&summary.batch_id, summary)
}

/// The patch of one event: the summary's diff, then one operation per row. `phases` are the
/// phases with outcomes before the event; the ones it adds are inserted.
fn event_patch(
    before: Option<&serde_json::Value>,
    after: &serde_json::Value,
    rows: &[BatchRow],
    phases: &BTreeSet<String>,
) -> Result<Vec<json_patch::PatchOperation>, ProjectionError> {
    let root = patch::pointer([]);
    let mut ops = Vec::new();
    let Some(before) = before else {
        // The batch's first event: its whole (small) view replaces the empty document.
        let view = BatchView {
            summary: serde_json::from_value(after.clone()).map_err(|e| {
                ProjectionError::Corrupt {
                    key: String::new(),
                    reason: e.to_string(),
                }
            })?,
            essays: Vec::new(),
            phases: BTreeMap::new(),
        };
        ops.push(patch::add(
            root,
            docs::to_value(&view.summary.batch_id, &view)?,
        ));
        return Ok(ops);
    };
    patch::diff_at(&root, before, after, &mut ops);
    let mut present = phases.clone();
    for row in rows {
        match row {
            BatchRow::Essay { ordinal, essay } => ops.push(patch::add(
                patch::at_index(&patch::pointer(["essays"]), *ordinal as usize),
                docs::to_value(&essay.essay_id, essay)?,
            )),
            BatchRow::Outcome {
                phase,
                essay_id,
                outcome,
            } => {
                if present.contains(phase) {
                    ops.push(patch::add(
                        patch::pointer(["phases", phase, essay_id]),
                        docs::to_value(essay_id, outcome)?,
                    ));
                } else {
                    let mut first = serde_json::Map::new();
                    first.insert(essay_id.clone(), docs::to_value(essay_id, outcome)?);
                    ops.push(patch::add(
                        patch::pointer(["phases", phase]),
                        serde_json::Value::Object(first),
                    ));
                    present.insert(phase.clone());
                }
            }
        }
    }
    Ok(ops)
}

/// The tables of this projection, in the order readers take them (the summary first: see
/// `queries::batch_on`), which a swap follows too, so that the two never wait on each other.
const TABLES: &[crate::Table] = &[
    crate::Table::document(TABLE, crate::Scope::Batch),
    crate::Table {
        name: ESSAYS,
        key: &["batch_id", "ordinal"],
        values: &["essay_id", "doc"],
        scope: crate::Scope::Batch,
    },
    crate::Table {
        name: OUTCOMES,
        key: &["batch_id", "phase", "essay_id"],
        values: &["outcome", "doc"],
        scope: crate::Scope::Batch,
    },
];

/// The batch_state projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchStateProjection;

impl Projection for BatchStateProjection {
    fn name(&self) -> &'static str {
        "batch_state"
    }

    fn tables(&self) -> &'static [crate::Table] {
        TABLES
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        space: crate::Space,
        events: &[StoredEvent],
        mut changes: Option<&mut Vec<Change>>,
    ) -> Result<(), ProjectionError> {
        let (table, essays_table, outcomes_table) = (
            space.table(TABLE),
            space.table(ESSAYS),
            space.table(OUTCOMES),
        );
        let mut ids: Vec<String> = events.iter().map(|e| e.batch_id.to_string()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut batches: HashMap<String, Folding> =
            docs::load_many::<StoredBatch>(conn, &table, &ids)
                .await?
                .into_iter()
                .map(|(id, (row, stored))| {
                    let folding = Folding {
                        created_position: row.created_position,
                        stored: Some(stored),
                        json: None,
                    };
                    (id, folding)
                })
                .collect();
        let mut essays: Vec<Vec<Cell>> = Vec::new();
        // Keyed, so that a page recording an essay's outcome twice writes it once.
        let mut outcomes: BTreeMap<(String, String, String), (String, String)> = BTreeMap::new();
        let mut rows = Vec::new();
        for event in events {
            let id = event.batch_id.to_string();
            let batch = batches.entry(id.clone()).or_insert(Folding {
                created_position: event.at.position,
                stored: None,
                json: None,
            });
            let (summary, phases) = match batch.stored.take() {
                Some(stored) => (Some(stored.summary), stored.outcome_phases),
                None => (None, BTreeSet::new()),
            };
            let was = summary.as_ref().map(|s| s.version);
            if changes.is_some() && batch.json.is_none() {
                batch.json = summary.as_ref().map(json_of).transpose()?;
            }
            rows.clear();
            let Some(summary) = BatchSummary::fold(summary, event, &mut rows) else {
                continue;
            };
            if was != Some(summary.version)
                && let Some(changes) = changes.as_deref_mut()
            {
                let after = json_of(&summary)?;
                let ops = event_patch(batch.json.as_ref(), &after, &rows, &phases)?;
                changes.push(Change {
                    topic: Change::batch_topic(&id),
                    version: summary.version,
                    patch: docs::to_doc(&id, &ops)?,
                    // Set by the worker, which knows the model's generation.
                    generation: 0,
                    trace: event.metadata.trace(),
                });
                batch.json = Some(after);
            }
            let mut phases = phases;
            for row in rows.drain(..) {
                match row {
                    BatchRow::Essay { ordinal, essay } => essays.push(vec![
                        Cell::Text(id.clone()),
                        Cell::Int(i64::from(ordinal)),
                        Cell::Text(essay.essay_id.clone()),
                        Cell::Text(docs::to_doc(&id, &essay)?),
                    ]),
                    BatchRow::Outcome {
                        phase,
                        essay_id,
                        outcome,
                    } => {
                        let doc = docs::to_doc(&id, &outcome)?;
                        phases.insert(phase.clone());
                        outcomes.insert((id.clone(), phase, essay_id), (outcome.outcome, doc));
                    }
                }
            }
            batch.stored = Some(StoredBatch {
                summary,
                outcome_phases: phases,
            });
        }
        let mut summaries = Vec::with_capacity(batches.len());
        for (id, batch) in &batches {
            if let Some(stored) = &batch.stored {
                summaries.push(DocRow {
                    id: id.clone(),
                    owner_id: stored.summary.owner_id.clone(),
                    status: stored.summary.status.clone(),
                    created_position: batch.created_position,
                    version: stored.summary.version,
                    position: stored.summary.position,
                    doc: docs::to_doc(id, stored)?,
                });
            }
        }
        docs::upsert_many(conn, &table, &summaries).await?;
        docs::upsert_rows(
            conn,
            &essays_table,
            &["batch_id", "ordinal", "essay_id", "doc"],
            &["batch_id", "ordinal"],
            &essays,
        )
        .await?;
        let outcomes: Vec<Vec<Cell>> = outcomes
            .into_iter()
            .map(|((batch, phase, essay), (outcome, doc))| {
                vec![
                    Cell::Text(batch),
                    Cell::Text(phase),
                    Cell::Text(essay),
                    Cell::Text(outcome),
                    Cell::Text(doc),
                ]
            })
            .collect();
        docs::upsert_rows(
            conn,
            &outcomes_table,
            &["batch_id", "phase", "essay_id", "outcome", "doc"],
            &["batch_id", "phase", "essay_id"],
            &outcomes,
        )
        .await?;
        Ok(())
    }
}
