//! Queries over the read models, for the API (and later the aggregator and the conductor).

use std::time::{Duration, Instant};

use commands::{EventLog, LogPosition, Storage};
use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::ProjectionError;
use crate::batch_state::{self, BatchView};
use crate::dashboard::{self, Activity, DashboardBatch, OwnerDashboard};
use crate::docs::{ROW_COLUMNS, row_from};
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
    /// Events in the log not yet applied.
    pub lag: i64,
    /// `live` when nothing is left to apply, `catching_up` otherwise.
    pub state: String,
    pub updated_at: String,
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

    pub async fn batch(&self, id: &str) -> Result<Option<BatchView>, ProjectionError> {
        let row = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM {} WHERE id = $1",
            batch_state::TABLE
        ))
        .bind(id)
        .fetch_optional(self.storage.pool())
        .await?;
        row.map(|row| row_from(&row)?.parse()).transpose()
    }

    /// Batches newest first, optionally of one owner and one status. The cursor is the
    /// opaque `next_cursor` of the previous page.
    pub async fn list_batches(
        &self,
        owner: Option<&str>,
        status: Option<&str>,
        limit: u32,
        cursor: Option<i64>,
    ) -> Result<Page<BatchView>, ProjectionError> {
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
        let rows = query.fetch_all(self.storage.pool()).await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in rows.iter().take(limit as usize) {
            let row = row_from(row)?;
            last = Some(row.created_position);
            items.push(row.parse()?);
        }
        let next_cursor = (rows.len() > limit as usize)
            .then_some(last)
            .flatten()
            .map(|p| p.to_string());
        Ok(Page { items, next_cursor })
    }

    pub async fn dashboard(&self, owner: &str) -> Result<Dashboard, ProjectionError> {
        let mut conn = self.storage.pool().acquire().await?;
        dashboard_on(&mut conn, owner).await
    }

    pub async fn projections(
        &self,
        names: &[&str],
    ) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let mut statuses = Vec::with_capacity(names.len());
        for name in names {
            crate::worker::ensure_checkpoint(self.storage.pool(), name).await?;
            let row = sqlx::query(
                "SELECT tx, position, events_applied, updated_at
                   FROM projection_checkpoints WHERE name = $1",
            )
            .bind(*name)
            .fetch_one(self.storage.pool())
            .await?;
            let at = LogPosition {
                tx: row.try_get("tx")?,
                position: row.try_get("position")?,
            };
            let lag = self.log.count_after(at).await?;
            statuses.push(ProjectionStatus {
                name: (*name).to_owned(),
                checkpoint: at.position,
                events_applied: row.try_get("events_applied")?,
                lag,
                state: if lag == 0 { "live" } else { "catching_up" }.to_owned(),
                updated_at: row.try_get("updated_at")?,
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

/// An owner's dashboard, read on `conn` (a projection worker reads it inside its transaction).
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
    let active_batches = owner_batches(
        conn,
        owner,
        "('registered', 'ready', 'processing')",
        "created_position",
        50,
    )
    .await?;
    let recently_finished = owner_batches(
        conn,
        owner,
        "('completed', 'completed_with_failures', 'cancelled')",
        "position",
        dashboard::RECENT,
    )
    .await?;
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

/// An owner's dashboard rows whose status is in `statuses` (an SQL list of literals), the
/// greatest `order_by` first.
async fn owner_batches(
    conn: &mut AnyConnection,
    owner: &str,
    statuses: &'static str,
    order_by: &'static str,
    limit: usize,
) -> Result<Vec<DashboardBatch>, ProjectionError> {
    let rows = sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM {} WHERE owner_id = $1 AND status IN {statuses}
          ORDER BY {order_by} DESC LIMIT {limit}",
        dashboard::BATCHES
    ))
    .bind(owner)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|row| row_from(row)?.parse()).collect()
}
