//! essayflow's read side.
//!
//! - [`Projection`] is what a read model implements: fold a page of [`StoredEvent`]s into its
//!   tables inside the worker's transaction.
//! - [`Worker`] is the checkpointed catch-up loop that keeps one projection current
//!   (exactly-once effect; see [`worker`]).
//! - [`BatchStateProjection`] (`batch_state`) and [`DashboardProjection`] (`dashboard`) are the
//!   two read models.
//! - [`ReadModels`] answers queries; [`replay::rebuild`] rebuilds a projection from event zero.

pub mod batch_state;
pub mod dashboard;
mod docs;
pub mod feed;
pub mod queries;
pub mod replay;
pub mod worker;

use std::future::Future;

use commands::{LogError, StoredEvent};
use sqlx::AnyConnection;

pub use batch_state::{BatchStateProjection, BatchView};
pub use dashboard::DashboardProjection;
pub use docs::DocRow;
pub use feed::{Change, Feed, FeedEvent, Snapshot};
pub use queries::{Dashboard, Page, ProjectionStatus, Reached, ReadModels};
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

/// A read model kept by a [`Worker`].
pub trait Projection: Send + Sync + 'static {
    /// The stable name, also the checkpoint's key.
    fn name(&self) -> &'static str;
    /// The tables this projection owns (emptied by a rebuild).
    fn tables(&self) -> &'static [&'static str];
    /// Applies a page of events, in log order, inside the caller's transaction. Must be
    /// idempotent per event (rows remember the version they applied). With `changes`, also
    /// lists the live changes the page makes (see [`feed`]), in order; only events that
    /// changed a row make one.
    fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[StoredEvent],
        changes: Option<&mut Vec<Change>>,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// Reads every row of a projection's tables, ordered, for comparing a live model with a
/// rebuilt one.
pub async fn dump(
    storage: &commands::Storage,
    projection: &str,
) -> Result<Vec<(String, DocRow)>, ProjectionError> {
    let tables: &[&str] = match projection {
        "batch_state" => &[batch_state::TABLE],
        "dashboard" => &[dashboard::BATCHES, dashboard::OWNERS],
        other => return Err(ProjectionError::Unknown(other.to_owned())),
    };
    let mut rows = Vec::new();
    for table in tables {
        let found = sqlx::query(&format!(
            "SELECT {} FROM {table} ORDER BY id",
            docs::ROW_COLUMNS
        ))
        .fetch_all(storage.pool())
        .await?;
        for row in found {
            rows.push(((*table).to_owned(), docs::row_from(&row)?));
        }
    }
    Ok(rows)
}
