//! Queries over the read models, for the API (and later the aggregator and the conductor).

use std::time::{Duration, Instant};

use commands::{EventLog, LogPosition, Storage};
use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::ProjectionError;
use crate::batch_state::{self, BatchSummary, BatchView, StoredBatch};
use crate::dashboard::{self, Activity, DashboardBatch, DashboardBatchSummary, OwnerDashboard};
use crate::docs::{self, ROW_COLUMNS, row_from};
use crate::worker::load_checkpoint;

/// One page of a listing, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass back as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A teacher's dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Dashboard {
    pub totals: std::collections::BTreeMap<String, u32>,
    pub active_batches: Vec<DashboardBatch>,
    /// The last batches whose pipeline ended (or that were cancelled), latest first, with
    /// their per-essay outcomes.
    pub recently_finished: Vec<DashboardBatch>,
    pub recent_activity: Vec<Activity>,
}

/// Where a projection stands.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ProjectionStatus {
    pub name: String,
    pub checkpoint: i64,
    pub events_applied: i64,
    /// Events in the log not yet applied, counted up to `commands::LAG_COUNT_LIMIT`
    /// (1 000 000: that many means at least that many).
    pub lag: i64,
    /// `live` when nothing is left to apply, `catching_up` otherwise.
    pub state: String,
    pub updated_at: String,
    /// The current or last rebuild beside the live model, if any.
    pub rebuild: Option<crate::rebuild::RebuildStatus>,
    /// The last verification against a fold of the log, if any.
    pub verification: Option<crate::verify::VerifyReport>,
}

/// How many essays succeeded and failed in one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PhaseCounts {
    pub succeeded: u32,
    pub failed: u32,
}

/// The outcome of waiting for a projection to reach a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    Yes,
    TimedOut,
    /// No event has that position.
    UnknownPosition,
}

#[derive(Clone)]
pub struct ReadModels {
    storage: Storage,
    log: EventLog,
}

impl ReadModels {
    pub fn new(storage: Storage) -> Self {
        Self {
            log: EventLog::new(storage.clone()),
            storage,
        }
    }

    /// A whole batch: its summary, essays and outcomes, all of one version.
    pub async fn batch(&self, id: &str) -> Result<Option<BatchView>, ProjectionError> {
        self.batch_json(id)
            .await?
            .map(|(_, json)| {
                serde_json::from_str(&json).map_err(|e| ProjectionError::Corrupt {
                    key: id.to_owned(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// A whole batch as the JSON text of its [`BatchView`] (see `batch_json_on`), with its
    /// summary (for the owner check and the ETag), all of one version.
    pub async fn batch_json(
        &self,
        id: &str,
    ) -> Result<Option<(BatchSummary, String)>, ProjectionError> {
        let mut tx = docs::snapshot(&self.storage, batch_state::TABLE).await?;
        let found = batch_json_on(&mut tx, id).await?;
        tx.commit().await?;
        Ok(found)
    }

    /// A batch's summary (one row, whatever the batch's size).
    pub async fn batch_summary(&self, id: &str) -> Result<Option<BatchSummary>, ProjectionError> {
        let mut tx = docs::snapshot(&self.storage, batch_state::TABLE).await?;
        let summary = stored_batch(&mut tx, id).await?.map(|s| s.summary);
        tx.commit().await?;
        Ok(summary)
    }

    /// Per phase, how many of a batch's essays succeeded and failed (their latest outcomes).
    pub async fn phase_counts(
        &self,
        id: &str,
    ) -> Result<std::collections::BTreeMap<String, PhaseCounts>, ProjectionError> {
        let mut tx = docs::snapshot(&self.storage, batch_state::TABLE).await?;
        let rows = sqlx::query(&format!(
            "SELECT phase, outcome, COUNT(*) AS n FROM {} WHERE batch_id = $1
              GROUP BY phase, outcome",
            batch_state::OUTCOMES
        ))
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut counts: std::collections::BTreeMap<String, PhaseCounts> = Default::default();
        for row in rows {
            let entry = counts.entry(row.try_get("phase")?).or_default();
            let n: i64 = row.try_get("n")?;
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            match row.try_get::<String, _>("outcome")?.as_str() {
                "failed" => entry.failed += n,
                _ => entry.succeeded += n,
            }
        }
        Ok(counts)
    }

    /// Batches newest first, optionally of one owner and one status. The cursor is the
    /// opaque `next_cursor` of the previous page.
    pub async fn list_batches(
        &self,
        owner: Option<&str>,
        status: Option<&str>,
        limit: u32,
        cursor: Option<i64>,
    ) -> Result<Page<BatchSummary>, ProjectionError> {
        let mut sql = format!(
            "SELECT {ROW_COLUMNS} FROM {} WHERE created_position < $1",
            batch_state::TABLE
        );
        let mut next = 2;
        for (column, value) in [("owner_id", owner), ("status", status)] {
            if value.is_some() {
                sql.push_str(&format!(" AND {column} = ${next}"));
                next += 1;
            }
        }
        sql.push_str(&format!(" ORDER BY created_position DESC LIMIT ${next}"));
        let mut query = sqlx::query(&sql).bind(cursor.unwrap_or(i64::MAX));
        for value in [owner, status].into_iter().flatten() {
            query = query.bind(value);
        }
        let query = query.bind(i64::from(limit) + 1);
        let mut tx = docs::snapshot(&self.storage, batch_state::TABLE).await?;
        let rows = query.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in rows.iter().take(limit as usize) {
            let row = row_from(row)?;
            last = Some(row.created_position);
            items.push(row.parse::<StoredBatch>()?.summary);
        }
        let next_cursor = (rows.len() > limit as usize)
            .then_some(last)
            .flatten()
            .map(|p| p.to_string());
        Ok(Page { items, next_cursor })
    }

    /// A teacher's dashboard, all of one version.
    pub async fn dashboard(&self, owner: &str) -> Result<Dashboard, ProjectionError> {
        let mut tx = docs::snapshot(&self.storage, dashboard::OWNERS).await?;
        let dashboard = dashboard_on(&mut tx, owner).await?;
        tx.commit().await?;
        Ok(dashboard)
    }

    pub async fn projections(
        &self,
        names: &[&str],
    ) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let mut statuses = Vec::with_capacity(names.len());
        for name in names {
            // Read only: a projection whose worker has not yet made its checkpoint row is at
            // the start of the log (a status read writes nothing).
            let row = sqlx::query(
                "SELECT tx, position, events_applied, updated_at
                   FROM projection_checkpoints WHERE name = $1",
            )
            .bind(*name)
            .fetch_optional(self.storage.pool())
            .await?;
            let (at, events_applied, updated_at) = match row {
                Some(row) => (
                    LogPosition {
                        tx: row.try_get("tx")?,
                        position: row.try_get("position")?,
                    },
                    row.try_get("events_applied")?,
                    row.try_get("updated_at")?,
                ),
                None => (LogPosition::default(), 0, String::new()),
            };
            let lag = self
                .log
                .count_after_at_most(at, commands::LAG_COUNT_LIMIT)
                .await?;
            statuses.push(ProjectionStatus {
                name: (*name).to_owned(),
                checkpoint: at.position,
                events_applied,
                lag,
                state: if lag == 0 { "live" } else { "catching_up" }.to_owned(),
                updated_at,
                rebuild: crate::rebuild::status(&self.storage, name).await?,
                verification: crate::verify::last(&self.storage, name).await?,
            });
        }
        Ok(statuses)
    }

    /// Waits until `projection` has applied the event at global `position`, for at most
    /// `timeout`.
    pub async fn wait_for(
        &self,
        projection: &str,
        position: i64,
        timeout: Duration,
    ) -> Result<Reached, ProjectionError> {
        let Some(target) = self.log.locate(position).await? else {
            return Ok(Reached::UnknownPosition);
        };
        let deadline = Instant::now() + timeout;
        // This node's workers announce their commits; another node's are seen by polling the
        // checkpoint row, at a modest rate so that many waiting readers do not crowd the
        // workers out of the connection pool.
        let mut local = self.storage.checkpoints().subscribe(projection);
        let mut next_poll = Instant::now();
        loop {
            if *local.borrow_and_update() >= target {
                return Ok(Reached::Yes);
            }
            let now = Instant::now();
            if now >= next_poll {
                if load_checkpoint(self.storage.pool(), projection).await? >= target {
                    return Ok(Reached::Yes);
                }
                next_poll = now + Duration::from_millis(100);
            }
            if now >= deadline {
                return Ok(Reached::TimedOut);
            }
            let until = next_poll.min(deadline);
            let _ = tokio::time::timeout_at(until.into(), local.changed()).await;
        }
    }
}

/// A batch's stored summary row.
async fn stored_batch(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<StoredBatch>, ProjectionError> {
    let row = sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM {} WHERE id = $1",
        batch_state::TABLE
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| row_from(&row)?.parse()).transpose()
}

/// A whole batch read on `conn` (one snapshot), as the JSON text of its [`BatchView`], with
/// its summary: the stored documents of its essays and outcomes are spliced in as they are,
/// not parsed and written again, so a 1 000-essay batch costs one pass over its bytes.
pub(crate) async fn batch_json_on(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<(BatchSummary, String)>, ProjectionError> {
    let Some(stored) = stored_batch(conn, id).await? else {
        return Ok(None);
    };
    let corrupt = |reason: String| ProjectionError::Corrupt {
        key: id.to_owned(),
        reason,
    };
    let mut json = docs::to_doc(id, &stored.summary)?;
    if !json.ends_with('}') {
        return Err(corrupt("a summary that is not a JSON object".to_owned()));
    }
    json.pop();
    json.push_str(",\"essays\":[");
    let rows = sqlx::query(&format!(
        "SELECT doc FROM {} WHERE batch_id = $1 ORDER BY ordinal",
        batch_state::ESSAYS
    ))
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&row.try_get::<String, _>("doc")?);
    }
    json.push_str("],\"phases\":{");
    let rows = sqlx::query(&format!(
        "SELECT phase, essay_id, doc FROM {} WHERE batch_id = $1 ORDER BY phase",
        batch_state::OUTCOMES
    ))
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let mut phase: Option<String> = None;
    for row in &rows {
        let this: String = row.try_get("phase")?;
        match &phase {
            Some(open) if *open == this => json.push(','),
            Some(_) => {
                json.push_str("},");
                json.push_str(&serde_json::Value::from(this.as_str()).to_string());
                json.push_str(":{");
            }
            None => {
                json.push_str(&serde_json::Value::from(this.as_str()).to_string());
                json.push_str(":{");
            }
        }
        phase = Some(this);
        let essay: String = row.try_get("essay_id")?;
        json.push_str(&serde_json::Value::from(essay).to_string());
        json.push(':');
        json.push_str(&row.try_get::<String, _>("doc")?);
    }
    if phase.is_some() {
        json.push('}');
    }
    json.push_str("}}");
    Ok(Some((stored.summary, json)))
}

/// An owner's dashboard, read on `conn` (one snapshot: see [`docs::snapshot`]).
pub(crate) async fn dashboard_on(
    conn: &mut AnyConnection,
    owner: &str,
) -> Result<Dashboard, ProjectionError> {
    let row = sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM {} WHERE id = $1",
        dashboard::OWNERS
    ))
    .bind(owner)
    .fetch_optional(&mut *conn)
    .await?;
    let owner_doc: Option<OwnerDashboard> = row.map(|row| row_from(&row)?.parse()).transpose()?;
    let mut lists = Vec::with_capacity(2);
    for finished in [false, true] {
        let rows = sqlx::query(&dashboard::list_sql(
            crate::Space::Live,
            ROW_COLUMNS,
            finished,
        ))
        .bind(owner)
        .fetch_all(&mut *conn)
        .await?;
        let summaries: Vec<DashboardBatchSummary> = rows
            .iter()
            .map(|row| row_from(row)?.parse())
            .collect::<Result<_, _>>()?;
        lists.push(summaries);
    }
    let ids: Vec<String> = lists.iter().flatten().map(|b| b.batch_id.clone()).collect();
    let mut outcomes = dashboard::outcomes_of(conn, crate::Space::Live, &ids).await?;
    let mut whole = |summaries: Vec<DashboardBatchSummary>| -> Vec<DashboardBatch> {
        summaries
            .into_iter()
            .map(|summary| DashboardBatch {
                essay_outcomes: outcomes.remove(&summary.batch_id).unwrap_or_default(),
                summary,
            })
            .collect()
    };
    let recently_finished = whole(lists.pop().unwrap_or_default());
    let active_batches = whole(lists.pop().unwrap_or_default());
    let (totals, recent_activity) = owner_doc
        .map(|d| (d.totals, d.recent_activity))
        .unwrap_or_default();
    Ok(Dashboard {
        totals,
        active_batches,
        recently_finished,
        recent_activity,
    })
}
