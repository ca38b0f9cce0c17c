//! Rebuilding a projection from the start of the log.
//!
//! [`rebuild`] empties the projection's tables and resets its checkpoint in one transaction,
//! then applies the whole log page by page through the same [`Worker`] code that runs live, so
//! a rebuilt model is what live application would have produced. A live worker running at the
//! same time is harmless: the checkpoint compare-and-set lets exactly one of them apply each page.

use std::time::{Duration, Instant};

use commands::{EventLog, Storage};
use sqlx::Acquire;

use crate::worker::{Step, Worker, WorkerOptions};
use crate::{Projection, ProjectionError};

/// Progress of a rebuild, reported after every page.
#[derive(Debug, Clone, Copy)]
pub struct ReplayProgress {
    pub applied: u64,
    pub total: u64,
    pub elapsed: Duration,
}

impl ReplayProgress {
    pub fn events_per_second(&self) -> f64 {
        self.applied as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Empties a projection and resets its checkpoint to the start of the log.
pub async fn reset<P: Projection>(
    projection: &P,
    storage: &Storage,
) -> Result<(), ProjectionError> {
    let _turn = storage.write_turn().await;
    let mut conn = storage.pool().acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query(
        "UPDATE projection_checkpoints SET tx = 0, position = 0, events_applied = 0 WHERE name = $1",
    )
    .bind(projection.name())
    .execute(&mut *tx)
    .await?;
    for table in projection.tables() {
        sqlx::query(&format!("DELETE FROM {}", table.name))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Rebuilds `projection` from event zero, calling `progress` after each page.
pub async fn rebuild<P: Projection>(
    projection: P,
    storage: &Storage,
    mut progress: impl FnMut(ReplayProgress),
) -> Result<ReplayProgress, ProjectionError> {
    crate::worker::ensure_checkpoint(storage.pool(), projection.name()).await?;
    reset(&projection, storage).await?;
    let total = EventLog::new(storage.clone()).count().await?.max(0) as u64;
    let worker = Worker::new(
        projection,
        storage,
        WorkerOptions {
            page_size: 5000,
            ..WorkerOptions::default()
        },
    );
    let started = Instant::now();
    let mut report = ReplayProgress {
        applied: 0,
        total,
        elapsed: Duration::ZERO,
    };
    loop {
        match worker.step().await? {
            Step::Applied(n) => report.applied += n as u64,
            Step::Superseded => continue,
            Step::Idle => break,
        }
        report.elapsed = started.elapsed();
        report.total = report.total.max(report.applied);
        progress(report);
    }
    report.elapsed = started.elapsed();
    Ok(report)
}
