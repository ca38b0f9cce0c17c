//! The `dashboard` read model, served to the aggregator: per owner, totals by status and recent
//! activity (`dashboard_owners`), and per batch a progress summary with per-essay outcomes
//! (`dashboard_batches`).
//!
//! Guarantee: exactly-once effect, like every projection: the page and its checkpoint commit
//! together (see [`crate::worker`]). Replay: `essayflow replay --projection dashboard`.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use commands::StoredEvent;
use domain::{BatchEvent, BatchStatus, PipelineOutcome};
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;

use crate::docs::{self, DocRow};
use crate::feed::Change;
use crate::{Projection, ProjectionError};

pub const BATCHES: &str = "dashboard_batches";
pub const OWNERS: &str = "dashboard_owners";

/// How many recent activities an owner's dashboard keeps.
pub const RECENT: usize = 20;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub succeeded: u32,
    pub failed: u32,
    pub total: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DashboardBatch {
    pub batch_id: String,
    pub owner_id: String,
    pub title: String,
    pub course_code: String,
    pub status: String,
    pub essays_added: u32,
    pub expected_essay_count: u32,
    pub pipeline: Option<String>,
    pub steps: Vec<String>,
    pub current_phase: Option<String>,
    pub phases_completed: u32,
    /// Outcomes reported in the current (or last) phase.
    pub phase_progress: Progress,
    /// essay id -> phase -> `succeeded` | `failed`, for the current (or last) pipeline.
    pub essay_outcomes: BTreeMap<String, BTreeMap<String, String>>,
    /// The status to return to if the pending request is rejected.
    pub status_before_request: Option<String>,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Activity {
    pub position: i64,
    pub batch_id: String,
    pub title: String,
    pub event_type: String,
    pub summary: String,
    pub occurred_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerDashboard {
    pub owner_id: String,
    /// status -> number of batches.
    pub totals: BTreeMap<String, u32>,
    /// Newest first, at most [`RECENT`].
    pub recent_activity: Vec<Activity>,
    pub events: i64,
    pub position: i64,
}

impl DashboardBatch {
    fn fold(view: Option<Self>, stored: &StoredEvent) -> Option<Self> {
        if let BatchEvent::BatchRegistered {
            batch_id,
            owner_id,
            title,
            course_code,
            expected_essay_count,
            ..
        } = &stored.event
        {
            return view.or_else(|| {
                Some(Self {
                    batch_id: batch_id.to_string(),
                    owner_id: owner_id.to_string(),
                    title: title.to_string(),
                    course_code: course_code.to_string(),
                    status: BatchStatus::Registered.as_str().to_owned(),
                    essays_added: 0,
                    expected_essay_count: expected_essay_count.get(),
                    pipeline: None,
                    steps: Vec::new(),
                    current_phase: None,
                    phases_completed: 0,
                    phase_progress: Progress::default(),
                    essay_outcomes: BTreeMap::new(),
                    status_before_request: None,
                    version: stored.sequence,
                    updated_at: stored.metadata.occurred_at,
                })
            });
        }
        let mut view = view?;
        if stored.sequence <= view.version {
            return Some(view);
        }
        view.version = stored.sequence;
        view.updated_at = stored.metadata.occurred_at;
        let cancelled = view.status == BatchStatus::Cancelled.as_str();
        if let BatchEvent::PipelineRequested { .. } = stored.event {
            view.status_before_request = Some(view.status.clone());
        }
        let mut status = |s: BatchStatus| {
            if !cancelled {
                view.status = s.as_str().to_owned();
            }
        };
        match &stored.event {
            BatchEvent::BatchRegistered { .. } => {}
            BatchEvent::EssaysAdded { essays } => view.essays_added += essays.len() as u32,
            BatchEvent::BatchReadyForProcessing { .. } => status(BatchStatus::Ready),
            BatchEvent::PipelineRequested { pipeline, .. } => {
                status(BatchStatus::Processing);
                view.pipeline = Some(pipeline.to_string());
                view.steps.clear();
                view.current_phase = None;
                view.phases_completed = 0;
                view.phase_progress = Progress::default();
                view.essay_outcomes.clear();
            }
            BatchEvent::PipelineResolved { steps, .. } => {
                view.steps = steps.iter().map(ToString::to_string).collect();
            }
            BatchEvent::PipelineRejected { .. } => {
                if let Some(previous) = view
                    .status_before_request
                    .as_deref()
                    .and_then(BatchStatus::parse)
                {
                    status(previous);
                }
                view.pipeline = None;
            }
            BatchEvent::PhaseStarted { phase, essays, .. } => {
                view.current_phase = Some(phase.to_string());
                view.phase_progress = Progress {
                    succeeded: 0,
                    failed: 0,
                    total: essays.len() as u32,
                };
            }
            BatchEvent::EssayPhaseCompleted {
                essay_id, phase, ..
            }
            | BatchEvent::EssayPhaseFailed {
                essay_id, phase, ..
            } => {
                let succeeded = matches!(stored.event, BatchEvent::EssayPhaseCompleted { .. });
                if succeeded {
                    view.phase_progress.succeeded += 1;
                } else {
                    view.phase_progress.failed += 1;
                }
                view.essay_outcomes
                    .entry(essay_id.to_string())
                    .or_default()
                    .insert(phase.to_string(), outcome_name(succeeded).to_owned());
            }
            BatchEvent::PhaseCompleted { .. } => view.phases_completed += 1,
            BatchEvent::PipelineCompleted { outcome, .. } => {
                status(match outcome {
                    PipelineOutcome::Completed => BatchStatus::Completed,
                    PipelineOutcome::CompletedWithFailures => BatchStatus::CompletedWithFailures,
                });
                view.current_phase = None;
            }
            BatchEvent::BatchCancelled { .. } => {
                view.status = BatchStatus::Cancelled.as_str().to_owned();
            }
        }
        Some(view)
    }

    fn to_row(&self, created_position: i64, position: i64) -> Result<DocRow, ProjectionError> {
        Ok(DocRow {
            id: self.batch_id.clone(),
            owner_id: self.owner_id.clone(),
            status: self.status.clone(),
            created_position,
            version: self.version,
            position,
            doc: docs::to_doc(&self.batch_id, self)?,
        })
    }
}

fn outcome_name(succeeded: bool) -> &'static str {
    if succeeded { "succeeded" } else { "failed" }
}

fn summary(event: &BatchEvent) -> String {
    match event {
        BatchEvent::BatchRegistered { title, .. } => format!("registered batch \"{title}\""),
        BatchEvent::EssaysAdded { essays } => format!("added {} essays", essays.len()),
        BatchEvent::BatchReadyForProcessing { essay_count } => {
            format!("all {essay_count} essays added; ready for processing")
        }
        BatchEvent::PipelineRequested { pipeline, .. } => format!("requested pipeline {pipeline}"),
        BatchEvent::PipelineResolved { steps, .. } => format!(
            "pipeline resolved: {}",
            steps
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        BatchEvent::PipelineRejected { reason, .. } => format!("pipeline rejected: {reason}"),
        BatchEvent::PhaseStarted { phase, essays, .. } => {
            format!("{phase} started for {} essays", essays.len())
        }
        BatchEvent::EssayPhaseCompleted {
            essay_id, phase, ..
        } => format!("{phase} succeeded for essay {essay_id}"),
        BatchEvent::EssayPhaseFailed {
            essay_id, phase, ..
        } => format!("{phase} failed for essay {essay_id}"),
        BatchEvent::PhaseCompleted {
            phase,
            succeeded,
            failed,
            ..
        } => format!("{phase} completed: {succeeded} succeeded, {failed} failed"),
        BatchEvent::PipelineCompleted { outcome, .. } => match outcome {
            PipelineOutcome::Completed => "pipeline completed".to_owned(),
            PipelineOutcome::CompletedWithFailures => "pipeline completed with failures".to_owned(),
        },
        BatchEvent::BatchCancelled { .. } => "batch cancelled".to_owned(),
    }
}

/// The dashboard projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct DashboardProjection;

impl Projection for DashboardProjection {
    fn name(&self) -> &'static str {
        "dashboard"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[BATCHES, OWNERS]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[StoredEvent],
        changes: Option<&mut Vec<Change>>,
    ) -> Result<(), ProjectionError> {
        let mut ids: Vec<String> = events.iter().map(|e| e.batch_id.to_string()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut batches: HashMap<String, (i64, i64, Option<DashboardBatch>)> =
            docs::load_many::<DashboardBatch>(conn, BATCHES, &ids)
                .await?
                .into_iter()
                .map(|(id, (row, view))| (id, (row.created_position, row.position, Some(view))))
                .collect();

        // Per owner: status deltas and new activities, in log order.
        let mut deltas: HashMap<String, BTreeMap<String, i64>> = HashMap::new();
        let mut activity: HashMap<String, Vec<Activity>> = HashMap::new();
        // Per owner: events applied, and the positions of the first and last of them.
        let mut seen_by_owner: HashMap<String, (i64, i64, i64)> = HashMap::new();
        for event in events {
            let id = event.batch_id.to_string();
            let entry = batches
                .entry(id)
                .or_insert((event.at.position, event.at.position, None));
            let before = entry.2.as_ref().map(|v| (v.status.clone(), v.version));
            let after = DashboardBatch::fold(entry.2.take(), event);
            entry.2 = after;
            let Some(view) = entry.2.as_ref() else {
                continue;
            };
            if before
                .as_ref()
                .is_some_and(|(_, version)| *version >= event.sequence)
            {
                continue;
            }
            entry.1 = event.at.position;
            let owner = view.owner_id.clone();
            let owner_deltas = deltas.entry(owner.clone()).or_default();
            if let Some((old, _)) = &before {
                *owner_deltas.entry(old.clone()).or_default() -= 1;
            }
            *owner_deltas.entry(view.status.clone()).or_default() += 1;
            activity.entry(owner.clone()).or_default().push(Activity {
                position: event.at.position,
                batch_id: view.batch_id.clone(),
                title: view.title.clone(),
                event_type: event.event_type.clone(),
                summary: summary(&event.event),
                occurred_at: event.metadata.occurred_at,
            });
            let seen =
                seen_by_owner
                    .entry(owner)
                    .or_insert((0, event.at.position, event.at.position));
            seen.0 += 1;
            seen.2 = event.at.position;
        }

        let mut rows = Vec::with_capacity(batches.len());
        for (created, position, view) in batches.values() {
            if let Some(view) = view {
                rows.push(view.to_row(*created, *position)?);
            }
        }
        docs::upsert_many(conn, BATCHES, &rows).await?;

        let owners: Vec<String> = deltas.keys().cloned().collect();
        let mut existing = docs::load_many::<OwnerDashboard>(conn, OWNERS, &owners).await?;
        let mut rows = Vec::with_capacity(owners.len());
        for owner in owners {
            let (created, mut dashboard) = match existing.remove(&owner) {
                Some((row, dashboard)) => (row.created_position, dashboard),
                None => (
                    0,
                    OwnerDashboard {
                        owner_id: owner.clone(),
                        totals: BTreeMap::new(),
                        recent_activity: Vec::new(),
                        events: 0,
                        position: 0,
                    },
                ),
            };
            for (status, delta) in &deltas[&owner] {
                let total = dashboard.totals.entry(status.clone()).or_default();
                *total = (i64::from(*total) + delta).max(0) as u32;
            }
            dashboard.totals.retain(|_, n| *n > 0);
            let mut recent = activity.remove(&owner).unwrap_or_default();
            recent.reverse();
            recent.append(&mut dashboard.recent_activity);
            recent.truncate(RECENT);
            dashboard.recent_activity = recent;
            let (count, first, position) = seen_by_owner.get(&owner).copied().unwrap_or_default();
            dashboard.events += count;
            dashboard.position = position;
            rows.push(DocRow {
                id: owner.clone(),
                owner_id: owner.clone(),
                status: String::new(),
                created_position: if created == 0 { first } else { created },
                version: dashboard.events,
                position,
                doc: docs::to_doc(&owner, &dashboard)?,
            });
        }
        docs::upsert_many(conn, OWNERS, &rows).await?;
        if let Some(changes) = changes {
            // One change per owner touched by the page: the whole dashboard, as GET
            // /v1/dashboard answers it once this transaction commits.
            for row in &rows {
                let dashboard = crate::queries::dashboard_on(conn, &row.id).await?;
                let data = docs::to_doc(&row.id, &dashboard)?;
                changes.push(
                    crate::feed::next_version(conn, Change::dashboard_topic(&row.id), data).await?,
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use commands::{EventMetadata, LogPosition, StoredEvent};
    use domain::values::{
        BatchId, CourseCode, EssayId, EssayText, EssayTitle, ExpectedEssayCount, MessageId, Phase,
        RequestId, Title, UserId,
    };
    use domain::{BatchEvent, Essay, PipelineOutcome};

    use super::DashboardBatch;
    use crate::BatchView;

    fn stored(events: Vec<BatchEvent>) -> Vec<StoredEvent> {
        let batch_id = BatchId::new();
        events
            .into_iter()
            .enumerate()
            .map(|(i, event)| StoredEvent {
                at: LogPosition {
                    tx: 0,
                    position: i as i64 + 1,
                },
                batch_id,
                sequence: i as i64 + 1,
                event_type: event.event_type_str().to_owned(),
                event_version: domain::EVENT_VERSION.to_owned(),
                event,
                metadata: EventMetadata {
                    correlation_id: uuid::Uuid::nil(),
                    causation_id: None,
                    user_id: None,
                    occurred_at: chrono::DateTime::UNIX_EPOCH,
                    command: String::new(),
                },
            })
            .collect()
    }

    fn parse<T>(r: Result<T, domain::values::ValidationError>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    /// A batch that completed a pipeline, then had a second request rejected.
    fn completed_then_rejected() -> Vec<StoredEvent> {
        let (first, second) = (RequestId::new(), RequestId::new());
        let spellcheck = parse(Phase::parse("spellcheck"));
        let essay = parse(EssayId::parse("e1"));
        stored(vec![
            BatchEvent::BatchRegistered {
                batch_id: BatchId::new(),
                owner_id: UserId::new(),
                title: parse(Title::parse("t")),
                course_code: parse(CourseCode::parse("C")),
                class_designation: None,
                expected_essay_count: parse(ExpectedEssayCount::parse(1)),
            },
            BatchEvent::EssaysAdded {
                essays: vec![Essay {
                    essay_id: essay.clone(),
                    title: parse(EssayTitle::parse("e")),
                    text: parse(EssayText::parse("text")),
                }],
            },
            BatchEvent::BatchReadyForProcessing { essay_count: 1 },
            BatchEvent::PipelineRequested {
                request_id: first,
                pipeline: spellcheck.clone(),
            },
            BatchEvent::PipelineResolved {
                request_id: first,
                requested: spellcheck.clone(),
                steps: vec![spellcheck.clone()],
                pruned: vec![],
            },
            BatchEvent::PhaseStarted {
                request_id: first,
                phase: spellcheck.clone(),
                essays: vec![essay.clone()],
            },
            BatchEvent::EssayPhaseCompleted {
                request_id: first,
                essay_id: essay,
                phase: spellcheck.clone(),
                message_id: parse(MessageId::parse("m1")),
                result: serde_json::json!({}),
            },
            BatchEvent::PhaseCompleted {
                request_id: first,
                phase: spellcheck.clone(),
                succeeded: 1,
                failed: 0,
            },
            BatchEvent::PipelineCompleted {
                request_id: first,
                outcome: PipelineOutcome::Completed,
            },
            BatchEvent::PipelineRequested {
                request_id: second,
                pipeline: spellcheck,
            },
            BatchEvent::PipelineRejected {
                request_id: second,
                reason: "removed from the configuration".to_owned(),
            },
        ])
    }

    #[test]
    fn a_rejected_request_returns_both_models_to_the_status_before_it() {
        let events = completed_then_rejected();
        let dashboard = events.iter().fold(None, DashboardBatch::fold);
        let view = events.iter().fold(None, BatchView::fold);
        assert_eq!(dashboard.map(|d| d.status).as_deref(), Some("completed"));
        assert_eq!(view.map(|v| v.status).as_deref(), Some("completed"));
    }

    #[test]
    fn folding_an_event_twice_changes_nothing() {
        let events = completed_then_rejected();
        let once = events.iter().fold(None, DashboardBatch::fold);
        let twice = events
            .iter()
            .flat_map(|e| [e, e])
            .fold(None, DashboardBatch::fold);
        assert_eq!(once, twice);
        let once = events.iter().fold(None, BatchView::fold);
        let twice = events
            .iter()
            .flat_map(|e| [e, e])
            .fold(None, BatchView::fold);
        assert_eq!(once, twice);
    }
}
