//! essayflow's read side.
//!
//! - [`Projection`] is what a read model implements: fold a page of [`StoredEvent`]s into its
//!   tables inside the worker's transaction.
//! - [`Worker`] is the checkpointed catch-up loop that keeps one projection current
//!   (exactly-once effect; see [`worker`]).
//! - [`BatchStateProjection`] (`batch_state`) and [`DashboardProjection`] (`dashboard`) are the
//!   two read models.
//! - [`ReadModels`] answers queries; [`rebuild::Rebuild`] rebuilds a projection beside the live
//!   model and swaps it in; [`verify`] compares the live model with a fold of the whole log.
//! - [`metrics`]: per projection, page time, events applied and failed steps.

pub mod batch_state;
pub mod dashboard;
mod docs;
pub mod feed;
pub mod metrics;
pub mod patch;
pub mod queries;
pub mod rebuild;
pub mod verify;
pub mod worker;

use std::future::Future;

use commands::{LogError, StoredEvent};
use sqlx::{AnyConnection, Row};

pub use batch_state::{BatchStateProjection, BatchSummary, BatchView};
pub use dashboard::{DashboardBatch, DashboardBatchSummary, DashboardProjection};
pub use docs::DocRow;
pub use feed::{Change, Feed, FeedEvent, Snapshot};
pub use queries::{Dashboard, Page, PhaseCounts, ProjectionStatus, Reached, ReadModels};
pub use worker::{Step, Worker, WorkerOptions};

/// The names of every projection, in the order they are listed to operators.
pub const PROJECTIONS: [&str; 2] = ["batch_state", "dashboard"];

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("read-model row {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("unknown projection {0:?}")]
    Unknown(String),
    #[error("{0}")]
    Injected(String),
}

/// Where a projection's tables are: the live ones that queries read, or a second set beside
/// them with the same shape (`<table>__shadow` for a rebuild that will replace the live ones,
/// `<table>__scratch` for a verification that compares with them). The checkpoint of a
/// projection in a space is named the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    Live,
    Shadow,
    Scratch,
}

impl Space {
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Live => "",
            Self::Shadow => "__shadow",
            Self::Scratch => "__scratch",
        }
    }

    /// The name of `table` (a live table's name) in this space.
    pub fn table(self, table: &str) -> String {
        format!("{table}{}", self.suffix())
    }
}

/// A read model kept by a [`Worker`].
pub trait Projection: Send + Sync + 'static {
    /// The stable name, also the checkpoint's key.
    fn name(&self) -> &'static str;
    /// The tables this projection owns (what a rebuild replaces and verification compares).
    fn tables(&self) -> &'static [Table];
    /// Applies a page of events, in log order, to its tables in `space`, inside the caller's
    /// transaction. Must be idempotent per event (rows remember the version they applied).
    /// With `changes` (live tables only), also lists the live changes the page makes (see
    /// [`feed`]), in order; only events that changed a row make one.
    fn apply(
        &self,
        conn: &mut AnyConnection,
        space: Space,
        events: &[StoredEvent],
        changes: Option<&mut Vec<Change>>,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// One read-model table: its name and columns. Every column is text or a 64-bit integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    /// The primary key's columns, in order.
    pub key: &'static [&'static str],
    /// The other columns.
    pub values: &'static [&'static str],
    /// What the first key column names: whose events change a row.
    pub scope: Scope,
}

/// Whose events change a row: a batch's (the key starts with the batch id), or a teacher's
/// (the key starts with the owner id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Batch,
    Owner,
}

impl Table {
    /// A table of the shared document shape (see [`docs`]).
    pub const fn document(name: &'static str, scope: Scope) -> Self {
        Self {
            name,
            scope,
            key: &["id"],
            values: &[
                "owner_id",
                "status",
                "created_position",
                "version",
                "position",
                "doc",
            ],
        }
    }
}

/// One row of a read-model table, every column as text: its key and its other values.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableRow {
    pub table: &'static str,
    pub key: Vec<String>,
    pub values: Vec<String>,
}

/// Any of the projections, chosen by name at run time (a rebuild or verification an operator
/// asks for).
#[derive(Debug, Clone, Copy)]
pub enum AnyProjection {
    BatchState(BatchStateProjection),
    Dashboard(DashboardProjection),
}

impl AnyProjection {
    /// The projection called `name` (one of [`PROJECTIONS`]).
    pub fn named(name: &str) -> Result<Self, ProjectionError> {
        match name {
            "batch_state" => Ok(Self::BatchState(BatchStateProjection)),
            "dashboard" => Ok(Self::Dashboard(DashboardProjection)),
            other => Err(ProjectionError::Unknown(other.to_owned())),
        }
    }

    /// The live topics whose documents this projection's tables hold (`batch:` or
    /// `dashboard:`, as a prefix).
    pub fn topic_prefix(&self) -> &'static str {
        match self {
            Self::BatchState(_) => "batch:",
            Self::Dashboard(_) => "dashboard:",
        }
    }
}

impl Projection for AnyProjection {
    fn name(&self) -> &'static str {
        match self {
            Self::BatchState(p) => p.name(),
            Self::Dashboard(p) => p.name(),
        }
    }

    fn tables(&self) -> &'static [Table] {
        match self {
            Self::BatchState(p) => p.tables(),
            Self::Dashboard(p) => p.tables(),
        }
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        space: Space,
        events: &[StoredEvent],
        changes: Option<&mut Vec<Change>>,
    ) -> Result<(), ProjectionError> {
        match self {
            Self::BatchState(p) => p.apply(conn, space, events, changes).await,
            Self::Dashboard(p) => p.apply(conn, space, events, changes).await,
        }
    }
}

/// The tables of the projection called `name`.
pub fn tables_of(name: &str) -> Result<&'static [Table], ProjectionError> {
    Ok(AnyProjection::named(name)?.tables())
}

/// Reads every row of a projection's tables, ordered by table and key, for comparing a live
/// model with a rebuilt one.
pub async fn dump(
    storage: &commands::Storage,
    projection: &str,
) -> Result<Vec<TableRow>, ProjectionError> {
    let mut rows = Vec::new();
    for table in tables_of(projection)? {
        let columns: Vec<String> = table
            .key
            .iter()
            .chain(table.values)
            .map(|c| format!("CAST({c} AS TEXT)"))
            .collect();
        let found = sqlx::query(&format!(
            "SELECT {} FROM {} ORDER BY {}",
            columns.join(", "),
            table.name,
            table.key.join(", ")
        ))
        .fetch_all(storage.pool())
        .await?;
        for row in found {
            let mut cells = (0..columns.len())
                .map(|i| row.try_get::<String, _>(i))
                .collect::<Result<Vec<_>, _>>()?;
            let values = cells.split_off(table.key.len());
            rows.push(TableRow {
                table: table.name,
                key: cells,
                values,
            });
        }
    }
    Ok(rows)
}
