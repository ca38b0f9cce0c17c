//! The `dashboard` read model, served to the aggregator: per owner, totals by status and recent
//! activity (`dashboard_owners`), per batch a progress summary (`dashboard_batches`) and its
//! per-essay outcomes in the current (or last) pipeline (`dashboard_outcomes`, one row per
//! essay and phase). A teacher's dashboard (`GET /v1/dashboard`, live topic `dashboard`) is
//! their totals, their newest [`ACTIVE_LIMIT`] active batches, their [`RECENT`] most recently
//! finished ones, and their [`RECENT`] latest activities.
//!
//! Guarantees:
//! - **Exactly-once effect**, like every projection: the page and its checkpoint commit
//!   together (see [`crate::worker`]).
//! - **Cost follows the change.** An event writes its batch's summary row and its own outcome
//!   rows; a page writes each touched owner's row once.
//! - **Changes are patches.** With a feed, each page lists one [`Change`] per owner it touched:
//!   a JSON Patch (RFC 6902) from the owner's dashboard before the page to after it, made of
//!   the totals' diff, the moves that keep both lists of batches in order ([`patch::reorder`]),
//!   the changed batches' own diffs and outcome rows, and the new activities. Only a batch that
//!   enters a list from outside it is sent whole.
//!
//! Replay: `essayflow replay --projection dashboard` rebuilds it beside the live model.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use commands::StoredEvent;
use domain::{BatchEvent, BatchStatus, PipelineOutcome};
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};

use crate::docs::{self, Cell, DocRow, placeholders};
use crate::feed::Change;
use crate::patch;
use crate::{Projection, ProjectionError};

pub const BATCHES: &str = "dashboard_batches";
pub const OWNERS: &str = "dashboard_owners";
/// `(batch_id, essay_id, phase) -> outcome`.
pub const OUTCOMES: &str = "dashboard_outcomes";

/// How many recent activities, and recently finished batches, a dashboard shows.
pub const RECENT: usize = 20;
/// How many active batches a dashboard shows (the newest).
pub const ACTIVE_LIMIT: usize = 50;

/// The statuses of active and of finished batches.
const ACTIVE: [&str; 3] = ["registered", "ready", "processing"];
const FINISHED: [&str; 3] = ["completed", "completed_with_failures", "cancelled"];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub succeeded: u32,
    pub failed: u32,
    pub total: u32,
}

/// A batch on a dashboard, without its per-essay outcomes: one small row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DashboardBatchSummary {
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
    /// The status to return to if the pending request is rejected.
    pub status_before_request: Option<String>,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

/// A batch on a dashboard: its summary's fields and its per-essay outcomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DashboardBatch {
    #[serde(flatten)]
    pub summary: DashboardBatchSummary,
    /// essay id -> phase -> `succeeded` | `failed`, for the current (or last) pipeline.
    pub essay_outcomes: BTreeMap<String, BTreeMap<String, String>>,
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

impl OwnerDashboard {
    fn empty(owner: &str) -> Self {
        Self {
            owner_id: owner.to_owned(),
            totals: BTreeMap::new(),
            recent_activity: Vec::new(),
            events: 0,
            position: 0,
        }
    }
}

/// A row an event writes besides the batch's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DashboardRow {
    /// A new pipeline: the outcomes of the last one are gone.
    Clear,
    Outcome {
        essay_id: String,
        phase: String,
        outcome: &'static str,
    },
}

impl DashboardBatchSummary {
    /// Folds one event (`None` before the batch's first event), pushing the rows it writes
    /// onto `rows`; an event already applied (by version) changes and writes nothing.
    pub fn fold(
        view: Option<Self>,
        stored: &StoredEvent,
        rows: &mut Vec<DashboardRow>,
    ) -> Option<Self> {
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
                rows.push(DashboardRow::Clear);
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
                rows.push(DashboardRow::Outcome {
                    essay_id: essay_id.to_string(),
                    phase: phase.to_string(),
                    outcome: outcome_name(succeeded),
                });
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
}

impl DashboardBatch {
    /// Folds one event into the whole dashboard batch, in memory: the summary's fold, with the
    /// rows it writes applied to the outcomes.
    pub fn fold(view: Option<Self>, stored: &StoredEvent) -> Option<Self> {
        let (summary, mut outcomes) = match view {
            Some(view) => (Some(view.summary), view.essay_outcomes),
            None => (None, BTreeMap::new()),
        };
        let mut rows = Vec::new();
        let summary = DashboardBatchSummary::fold(summary, stored, &mut rows)?;
        for row in rows {
            match row {
                DashboardRow::Clear => outcomes.clear(),
                DashboardRow::Outcome {
                    essay_id,
                    phase,
                    outcome,
                } => {
                    outcomes
                        .entry(essay_id)
                        .or_default()
                        .insert(phase, outcome.to_owned());
                }
            }
        }
        Some(Self {
            summary,
            essay_outcomes: outcomes,
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

/// Which of an owner's batches a dashboard shows, in order.
#[derive(Debug, Default)]
struct Lists {
    active: Vec<String>,
    finished: Vec<String>,
}

/// The query of one of an owner's lists: `columns` of its batches, in the dashboard's order.
/// One index range per status (`(owner_id, status, created_position)` and `(owner_id, status,
/// position)`), each at most the list's length, merged: the cost is the list's, however many
/// batches the teacher has.
pub(crate) fn list_sql(space: crate::Space, columns: &str, finished: bool) -> String {
    let (statuses, order, limit) = if finished {
        (FINISHED, "position", RECENT)
    } else {
        (ACTIVE, "created_position", ACTIVE_LIMIT)
    };
    let table = space.table(BATCHES);
    let parts: Vec<String> = statuses
        .iter()
        .enumerate()
        .map(|(i, status)| {
            format!(
                "SELECT * FROM (SELECT {columns}, {order} AS list_order FROM {table}
                  WHERE owner_id = $1 AND status = '{status}'
                  ORDER BY {order} DESC LIMIT {limit}) AS s{i}"
            )
        })
        .collect();
    format!(
        "{} ORDER BY list_order DESC LIMIT {limit}",
        parts.join(" UNION ALL ")
    )
}

async fn lists(
    conn: &mut AnyConnection,
    space: crate::Space,
    owner: &str,
) -> Result<Lists, ProjectionError> {
    let ids = |rows: Vec<sqlx::any::AnyRow>| -> Result<Vec<String>, ProjectionError> {
        Ok(rows
            .iter()
            .map(|row| row.try_get("id"))
            .collect::<Result<_, _>>()?)
    };
    let active = sqlx::query(&list_sql(space, "id", false))
        .bind(owner)
        .fetch_all(&mut *conn)
        .await?;
    let finished = sqlx::query(&list_sql(space, "id", true))
        .bind(owner)
        .fetch_all(&mut *conn)
        .await?;
    Ok(Lists {
        active: ids(active)?,
        finished: ids(finished)?,
    })
}

/// The outcome rows of `batches`, as each batch's `essay_outcomes`.
pub(crate) async fn outcomes_of(
    conn: &mut AnyConnection,
    space: crate::Space,
    batches: &[String],
) -> Result<HashMap<String, BTreeMap<String, BTreeMap<String, String>>>, ProjectionError> {
    let mut found: HashMap<String, BTreeMap<String, BTreeMap<String, String>>> = HashMap::new();
    for chunk in batches.chunks(400) {
        if chunk.is_empty() {
            continue;
        }
        let sql = format!(
            "SELECT batch_id, essay_id, phase, outcome FROM {} WHERE batch_id IN ({})",
            space.table(OUTCOMES),
            placeholders(1, chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_str());
        }
        for row in query.fetch_all(&mut *conn).await? {
            found
                .entry(row.try_get("batch_id")?)
                .or_default()
                .entry(row.try_get("essay_id")?)
                .or_default()
                .insert(row.try_get("phase")?, row.try_get("outcome")?);
        }
    }
    Ok(found)
}

/// Which of `essays` of a batch have at least one outcome row.
async fn essays_with_outcomes(
    conn: &mut AnyConnection,
    space: crate::Space,
    batch: &str,
    essays: &[&str],
) -> Result<HashSet<String>, ProjectionError> {
    let mut found = HashSet::new();
    for chunk in essays.chunks(400) {
        let sql = format!(
            "SELECT DISTINCT essay_id FROM {} WHERE batch_id = $1 AND essay_id IN ({})",
            space.table(OUTCOMES),
            placeholders(2, chunk.len())
        );
        let mut query = sqlx::query(&sql).bind(batch);
        for essay in chunk {
            query = query.bind(*essay);
        }
        for row in query.fetch_all(&mut *conn).await? {
            found.insert(row.try_get("essay_id")?);
        }
    }
    Ok(found)
}

/// One batch as a dashboard shows it, read back whole (for one entering a list).
async fn whole_batch(
    conn: &mut AnyConnection,
    space: crate::Space,
    id: &str,
) -> Result<serde_json::Value, ProjectionError> {
    let summary =
        docs::load_many::<DashboardBatchSummary>(conn, &space.table(BATCHES), &[id.to_owned()])
            .await?
            .remove(id)
            .map(|(_, summary)| summary)
            .ok_or_else(|| ProjectionError::Corrupt {
                key: id.to_owned(),
                reason: "listed but not found".to_owned(),
            })?;
    let essay_outcomes = outcomes_of(conn, space, &[id.to_owned()])
        .await?
        .remove(id)
        .unwrap_or_default();
    docs::to_value(
        id,
        &DashboardBatch {
            summary,
            essay_outcomes,
        },
    )
}

/// A batch as a page folds it.
struct Folding {
    created_position: i64,
    position: i64,
    /// The summary before the page (`None` for a batch the page registers).
    before: Option<DashboardBatchSummary>,
    now: Option<DashboardBatchSummary>,
    /// Whether the page started a new pipeline, clearing the outcomes.
    cleared: bool,
    /// Outcomes the page wrote (after its last clear): (essay, phase) -> outcome.
    outcomes: BTreeMap<(String, String), &'static str>,
    /// Whether the page applied any event to it.
    changed: bool,
}

impl Folding {
    /// The outcomes the page wrote, as `essay_outcomes` entries.
    fn outcome_map(&self) -> BTreeMap<&str, BTreeMap<&str, &'static str>> {
        let mut map: BTreeMap<&str, BTreeMap<&str, &'static str>> = BTreeMap::new();
        for ((essay, phase), outcome) in &self.outcomes {
            map.entry(essay.as_str())
                .or_default()
                .insert(phase.as_str(), outcome);
        }
        map
    }
}

/// The tables of this projection.
/// In the order readers take them (owners, then batches, then outcomes: see
/// `queries::dashboard_on`), which a swap follows too, so that the two never wait on each other.
const TABLES: &[crate::Table] = &[
    crate::Table::document(OWNERS, crate::Scope::Owner),
    crate::Table::document(BATCHES, crate::Scope::Batch),
    crate::Table {
        name: OUTCOMES,
        key: &["batch_id", "essay_id", "phase"],
        values: &["outcome"],
        scope: crate::Scope::Batch,
    },
];

/// The dashboard projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct DashboardProjection;

impl Projection for DashboardProjection {
    fn name(&self) -> &'static str {
        "dashboard"
    }

    fn tables(&self) -> &'static [crate::Table] {
        TABLES
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        space: crate::Space,
        events: &[StoredEvent],
        changes: Option<&mut Vec<Change>>,
    ) -> Result<(), ProjectionError> {
        let (batches_table, owners_table, outcomes_table) = (
            space.table(BATCHES),
            space.table(OWNERS),
            space.table(OUTCOMES),
        );
        let mut ids: Vec<String> = events.iter().map(|e| e.batch_id.to_string()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut batches: HashMap<String, Folding> =
            docs::load_many::<DashboardBatchSummary>(conn, &batches_table, &ids)
                .await?
                .into_iter()
                .map(|(id, (row, view))| {
                    let folding = Folding {
                        created_position: row.created_position,
                        position: row.position,
                        before: Some(view.clone()),
                        now: Some(view),
                        cleared: false,
                        outcomes: BTreeMap::new(),
                        changed: false,
                    };
                    (id, folding)
                })
                .collect();

        // Per owner: status deltas and new activities, in log order.
        let mut deltas: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        let mut activity: HashMap<String, Vec<Activity>> = HashMap::new();
        // Per owner: events applied, and the positions of the first and last of them.
        let mut seen_by_owner: HashMap<String, (i64, i64, i64)> = HashMap::new();
        // Per owner: the last event applied, whose trace context its live change continues.
        let mut cause: HashMap<String, &StoredEvent> = HashMap::new();
        let mut rows = Vec::new();
        for event in events {
            let id = event.batch_id.to_string();
            let entry = batches.entry(id).or_insert(Folding {
                created_position: event.at.position,
                position: event.at.position,
                before: None,
                now: None,
                cleared: false,
                outcomes: BTreeMap::new(),
                changed: false,
            });
            let was = entry.now.as_ref().map(|v| (v.status.clone(), v.version));
            rows.clear();
            entry.now = DashboardBatchSummary::fold(entry.now.take(), event, &mut rows);
            let Some(view) = entry.now.as_ref() else {
                continue;
            };
            if was
                .as_ref()
                .is_some_and(|(_, version)| *version >= event.sequence)
            {
                continue;
            }
            entry.changed = true;
            entry.position = event.at.position;
            for row in rows.drain(..) {
                match row {
                    DashboardRow::Clear => {
                        entry.cleared = true;
                        entry.outcomes.clear();
                    }
                    DashboardRow::Outcome {
                        essay_id,
                        phase,
                        outcome,
                    } => {
                        entry.outcomes.insert((essay_id, phase), outcome);
                    }
                }
            }
            let owner = view.owner_id.clone();
            let owner_deltas = deltas.entry(owner.clone()).or_default();
            if let Some((old, _)) = &was {
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
            cause.insert(owner.clone(), event);
            let seen =
                seen_by_owner
                    .entry(owner)
                    .or_insert((0, event.at.position, event.at.position));
            seen.0 += 1;
            seen.2 = event.at.position;
        }
        let owners: Vec<String> = deltas.keys().cloned().collect();

        // What the patches need from before the writes: each owner's lists, and which essays
        // already had outcomes in the listed batches the page changed.
        let mut before_lists: HashMap<String, Lists> = HashMap::new();
        let mut present: HashSet<(String, String)> = HashSet::new();
        if changes.is_some() {
            for owner in &owners {
                before_lists.insert(owner.clone(), lists(conn, space, owner).await?);
            }
            let listed: HashSet<&String> = before_lists
                .values()
                .flat_map(|l| l.active.iter().chain(&l.finished))
                .collect();
            for (id, batch) in &batches {
                if batch.cleared || batch.outcomes.is_empty() || !listed.contains(id) {
                    continue;
                }
                let essays: BTreeSet<&str> =
                    batch.outcomes.keys().map(|(e, _)| e.as_str()).collect();
                let essays: Vec<&str> = essays.into_iter().collect();
                for essay in essays_with_outcomes(conn, space, id, &essays).await? {
                    present.insert((id.clone(), essay));
                }
            }
        }

        let mut summaries = Vec::with_capacity(batches.len());
        let mut cleared = Vec::new();
        let mut outcome_rows = Vec::new();
        for (id, batch) in &batches {
            let Some(view) = &batch.now else { continue };
            if !batch.changed {
                continue;
            }
            summaries.push(DocRow {
                id: id.clone(),
                owner_id: view.owner_id.clone(),
                status: view.status.clone(),
                created_position: batch.created_position,
                version: view.version,
                position: batch.position,
                doc: docs::to_doc(id, view)?,
            });
            if batch.cleared {
                cleared.push(id.clone());
            }
            for ((essay, phase), outcome) in &batch.outcomes {
                outcome_rows.push(vec![
                    Cell::Text(id.clone()),
                    Cell::Text(essay.clone()),
                    Cell::Text(phase.clone()),
                    Cell::Text((*outcome).to_owned()),
                ]);
            }
        }
        docs::upsert_many(conn, &batches_table, &summaries).await?;
        for chunk in cleared.chunks(400) {
            let sql = format!(
                "DELETE FROM {outcomes_table} WHERE batch_id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.as_str());
            }
            query.execute(&mut *conn).await?;
        }
        docs::upsert_rows(
            conn,
            &outcomes_table,
            &["batch_id", "essay_id", "phase", "outcome"],
            &["batch_id", "essay_id", "phase"],
            &outcome_rows,
        )
        .await?;

        let mut existing = docs::load_many::<OwnerDashboard>(conn, &owners_table, &owners).await?;
        let mut rows = Vec::with_capacity(owners.len());
        // Per owner: the dashboard before the page, and how many activities the page added.
        let mut befores = Vec::with_capacity(owners.len());
        for owner in &owners {
            let (created, before) = match existing.remove(owner) {
                Some((row, dashboard)) => (row.created_position, dashboard),
                None => (0, OwnerDashboard::empty(owner)),
            };
            let mut dashboard = before.clone();
            for (status, delta) in &deltas[owner] {
                let total = dashboard.totals.entry(status.clone()).or_default();
                *total = (i64::from(*total) + delta).max(0) as u32;
            }
            dashboard.totals.retain(|_, n| *n > 0);
            let mut recent = activity.remove(owner).unwrap_or_default();
            let added = recent.len();
            recent.reverse();
            recent.append(&mut dashboard.recent_activity);
            recent.truncate(RECENT);
            dashboard.recent_activity = recent;
            let (count, first, position) = seen_by_owner.get(owner).copied().unwrap_or_default();
            dashboard.events += count;
            dashboard.position = position;
            rows.push(DocRow {
                id: owner.clone(),
                owner_id: owner.clone(),
                status: String::new(),
                created_position: if created == 0 { first } else { created },
                version: dashboard.events,
                position,
                doc: docs::to_doc(owner, &dashboard)?,
            });
            befores.push((before, dashboard, added));
        }
        docs::upsert_many(conn, &owners_table, &rows).await?;

        let Some(changes) = changes else {
            return Ok(());
        };
        for (owner, (before, after, added)) in owners.iter().zip(befores) {
            let lists_before = before_lists.remove(owner).unwrap_or_default();
            let lists_after = lists(conn, space, owner).await?;
            let mut ops = Vec::new();
            patch::diff_at(
                &patch::pointer(["totals"]),
                &docs::to_value(owner, &before.totals)?,
                &docs::to_value(owner, &after.totals)?,
                &mut ops,
            );
            // The batches that enter a list from outside both are sent whole.
            let listed: HashSet<&String> = lists_before
                .active
                .iter()
                .chain(&lists_before.finished)
                .collect();
            let mut entering = HashMap::new();
            for id in lists_after.active.iter().chain(&lists_after.finished) {
                if !listed.contains(id) {
                    entering.insert(id.clone(), whole_batch(conn, space, id).await?);
                }
            }
            let paths = [
                patch::pointer(["active_batches"]),
                patch::pointer(["recently_finished"]),
            ];
            let specs = [
                patch::List {
                    path: paths[0].clone(),
                    before: &lists_before.active,
                    after: &lists_after.active,
                },
                patch::List {
                    path: paths[1].clone(),
                    before: &lists_before.finished,
                    after: &lists_after.finished,
                },
            ];
            let whole = patch::reorder(&specs, &mut ops, |id| {
                entering.remove(id).ok_or_else(|| ProjectionError::Corrupt {
                    key: id.to_owned(),
                    reason: "a batch entering the dashboard was not read".to_owned(),
                })
            })?;
            // The changed batches that were listed already: their own changes, where they are
            // now.
            for (path, keys) in [
                (&paths[0], &lists_after.active),
                (&paths[1], &lists_after.finished),
            ] {
                for (index, id) in keys.iter().enumerate() {
                    let Some(batch) = batches.get(id) else {
                        continue;
                    };
                    let (Some(was), Some(now)) = (&batch.before, &batch.now) else {
                        continue;
                    };
                    if !batch.changed || whole.contains(id) {
                        continue;
                    }
                    let base = patch::at_index(path, index);
                    patch::diff_at(
                        &base,
                        &docs::to_value(id, was)?,
                        &docs::to_value(id, now)?,
                        &mut ops,
                    );
                    let outcomes = patch::under(&base, ["essay_outcomes"]);
                    if batch.cleared {
                        ops.push(patch::replace(
                            outcomes,
                            docs::to_value(id, &batch.outcome_map())?,
                        ));
                        continue;
                    }
                    for (essay, phases) in batch.outcome_map() {
                        if present.contains(&(id.clone(), essay.to_owned())) {
                            for (phase, outcome) in phases {
                                ops.push(patch::add(
                                    patch::under(&outcomes, [essay, phase]),
                                    serde_json::Value::from(outcome),
                                ));
                            }
                        } else {
                            ops.push(patch::add(
                                patch::under(&outcomes, [essay]),
                                docs::to_value(id, &phases)?,
                            ));
                        }
                    }
                }
            }
            // The page's activities, newest first, in front; the list cut back to RECENT.
            let recent = patch::pointer(["recent_activity"]);
            if added >= RECENT {
                ops.push(patch::replace(
                    recent,
                    docs::to_value(owner, &after.recent_activity)?,
                ));
            } else {
                for (index, item) in after.recent_activity.iter().take(added).enumerate() {
                    ops.push(patch::add(
                        patch::at_index(&recent, index),
                        docs::to_value(owner, item)?,
                    ));
                }
                for _ in RECENT..before.recent_activity.len() + added {
                    ops.push(patch::remove(patch::at_index(&recent, RECENT)));
                }
            }
            let mut change = crate::feed::next_version(
                conn,
                Change::dashboard_topic(owner),
                docs::to_doc(owner, &ops)?,
            )
            .await?;
            change.trace = cause.get(owner).and_then(|e| e.metadata.trace());
            changes.push(change);
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
                    traceparent: None,
                    tracestate: None,
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
        assert_eq!(
            dashboard.map(|d| d.summary.status).as_deref(),
            Some("completed")
        );
        assert_eq!(view.map(|v| v.summary.status).as_deref(), Some("completed"));
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
