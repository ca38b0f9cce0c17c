//! Checkpoints of the log's readers (projections, the conductor, the relay): one row each in
//! `projection_checkpoints`, naming the last log position the reader finished with.

use chrono::Utc;
use sqlx::AnyPool;
use sqlx::Row;

use crate::log::LogPosition;

/// Makes sure a reader has a checkpoint row (at the start of the log).
pub async fn ensure_checkpoint(pool: &AnyPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, tx, position, events_applied, updated_at)
         VALUES ($1, 0, 0, 0, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(Utc::now().to_rfc3339())
    .execute(pool)
    .await?;
    Ok(())
}

/// A reader's checkpoint: every event at or before it has been handled.
pub async fn load_checkpoint(pool: &AnyPool, name: &str) -> Result<LogPosition, sqlx::Error> {
    let row = sqlx::query("SELECT tx, position FROM projection_checkpoints WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await?;
    match row {
        Some(row) => Ok(LogPosition {
            tx: row.try_get("tx")?,
            position: row.try_get("position")?,
        }),
        None => {
            ensure_checkpoint(pool, name).await?;
            Ok(LogPosition::default())
        }
    }
}

/// A reader's checkpoint as stored, without creating a missing row (read only: for status
/// pages and metrics); `None` when the reader has none yet.
pub async fn peek_checkpoint(
    pool: &AnyPool,
    name: &str,
) -> Result<Option<LogPosition>, sqlx::Error> {
    let row = sqlx::query("SELECT tx, position FROM projection_checkpoints WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await?;
    row.map(|row| {
        Ok(LogPosition {
            tx: row.try_get("tx")?,
            position: row.try_get("position")?,
        })
    })
    .transpose()
}

/// Moves a checkpoint from `from` to `to` if it is still at `from` (compare-and-set), counting
/// `events` more handled. Returns whether it moved: `false` means another reader (or a reset)
/// moved it first.
pub async fn advance_checkpoint<'c, E>(
    executor: E,
    name: &str,
    from: LogPosition,
    to: LogPosition,
    events: usize,
) -> Result<bool, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    let moved = sqlx::query(
        "UPDATE projection_checkpoints
            SET tx = $1, position = $2, events_applied = events_applied + $3, updated_at = $4
          WHERE name = $5 AND tx = $6 AND position = $7",
    )
    .bind(to.tx)
    .bind(to.position)
    .bind(events as i64)
    .bind(Utc::now().to_rfc3339())
    .bind(name)
    .bind(from.tx)
    .bind(from.position)
    .execute(executor)
    .await?;
    Ok(moved.rows_affected() == 1)
}
