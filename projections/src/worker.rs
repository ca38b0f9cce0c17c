//! The checkpointed catch-up worker that keeps one projection up to date.
//!
//! Guarantees:
//! - **Exactly-once effect.** Each page of events is applied in one database transaction that
//!   also moves the projection's checkpoint. The transaction's first statement is a
//!   compare-and-set on the checkpoint, so a page is applied at most once even if two workers
//!   (two nodes, or a replay beside a live worker) race: the loser rolls back and reads again.
//!   A crash before commit leaves both the rows and the checkpoint as they were.
//! - **No gaps.** Pages come from [`EventLog::read_after`], which never passes an event whose
//!   transaction may still commit behind it.
//! - **Liveness.** The worker sleeps until the storage's append signal fires (in-process, or
//!   PostgreSQL `LISTEN` for other nodes' appends), with a polling fallback; errors are logged,
//!   counted and retried with backoff, never swallowed.

use std::time::Duration;

use commands::leadership::{Lead, Leadership};
use commands::{EventLog, LogPosition, Storage};
use sqlx::{Acquire, AnyConnection, AnyPool};
use tokio_util::sync::CancellationToken;

use crate::{Feed, Projection, ProjectionError, Space};

/// How a worker pages through the log.
#[derive(Debug, Clone, Copy)]
pub struct WorkerOptions {
    pub page_size: i64,
    /// How often to look for new events when no signal arrives.
    pub poll_interval: Duration,
    /// After a page that was not full, wait this long so that the next page gathers more
    /// events (fewer, larger transactions), at the cost of this much extra delay.
    pub gather: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            page_size: 500,
            poll_interval: Duration::from_millis(500),
            gather: Duration::from_millis(10),
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// This many events were applied and committed.
    Applied(usize),
    /// Nothing new in the log.
    Idle,
    /// Another worker moved the checkpoint first; nothing was applied.
    Superseded,
}

/// A hook run after a page is applied and before it commits; an error rolls the page back.
/// Tests use it to crash a worker at the worst moment.
pub type BeforeCommit<'a> =
    &'a (dyn Fn(&[commands::StoredEvent]) -> Result<(), ProjectionError> + Sync);

pub struct Worker<P> {
    projection: P,
    /// Which of the projection's table sets this worker keeps, and its checkpoint's name there.
    space: Space,
    checkpoint_name: String,
    log: EventLog,
    options: WorkerOptions,
    /// This projection's series of the metrics; `None` records nothing (shadow and scratch
    /// workers, tests).
    metrics: Option<crate::metrics::ProjectionSeries>,
    /// The checkpoint this worker last committed; `None` until read, and after it lost a
    /// compare-and-set (another worker or a reset moved it).
    checkpoint: std::sync::Mutex<Option<LogPosition>>,
    /// Where committed changes go for live clients; `None` for a rebuild, which changes
    /// nothing a client could see once it is done.
    feed: Option<Feed>,
}

impl<P: Projection> Worker<P> {
    pub fn new(projection: P, storage: &Storage, options: WorkerOptions) -> Self {
        Self {
            checkpoint_name: projection.name().to_owned(),
            space: Space::Live,
            projection,
            log: EventLog::new(storage.clone()),
            options,
            metrics: None,
            checkpoint: std::sync::Mutex::new(None),
            feed: None,
        }
    }

    /// Records every change this worker commits in the live feed and publishes it after the
    /// commit (see [`crate::feed`]).
    pub fn with_feed(mut self, feed: Feed) -> Self {
        self.feed = Some(feed);
        self
    }

    /// A worker that keeps the projection's tables in `space` instead of the live ones (a
    /// rebuild's shadow, a verification's scratch), with a checkpoint of its own.
    pub fn in_space(mut self, space: Space) -> Self {
        self.space = space;
        self.checkpoint_name = space.table(self.projection.name());
        self
    }

    pub fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// The name of this worker's checkpoint row (the projection's name in its space).
    pub fn checkpoint_name(&self) -> &str {
        &self.checkpoint_name
    }

    /// Records this worker's pages, events applied and failed steps in `metrics` (under its
    /// projection's name).
    pub fn with_metrics(mut self, metrics: &crate::metrics::ProjectionMetrics) -> Self {
        self.metrics = Some(metrics.of(self.projection.name()));
        self
    }

    fn pool(&self) -> &AnyPool {
        self.log.storage().pool()
    }

    /// Runs until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let name = self.name();
        let mut wake = self.log.storage().appended();
        let mut backoff = Duration::from_millis(100);
        tracing::info!(projection = name, "projection worker started");
        // On PostgreSQL one worker per projection is active across all nodes: the holder of a
        // session advisory lock. The others wait to take over. (The checkpoint compare-and-set
        // keeps pages exactly-once even without it; the lock saves the others' wasted reads.)
        let mut leadership =
            Leadership::new(self.log.storage().clone(), "essayflow.projection", name);
        while !cancel.is_cancelled() {
            match leadership.ensure().await {
                Ok(Lead::Held) => {}
                Ok(Lead::Taken) => {
                    tracing::info!(projection = name, "this node now runs the projection");
                    *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                Ok(Lead::Standby) => {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(self.options.poll_interval * 4) => continue,
                    }
                }
                Err(error) => {
                    tracing::warn!(projection = name, error = %error, "could not take the projection lock");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
            }
            match self.step().await {
                Ok(Step::Applied(n)) => {
                    backoff = Duration::from_millis(100);
                    if (n as i64) < self.options.page_size && !self.options.gather.is_zero() {
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(self.options.gather) => {}
                        }
                    }
                }
                Ok(Step::Superseded) => backoff = Duration::from_millis(100),
                Ok(Step::Idle) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = wake.changed() => {}
                        _ = tokio::time::sleep(self.options.poll_interval) => {}
                    }
                }
                Err(error) => {
                    // The lock lives on its connection: after a database error, prove
                    // leadership again rather than assume the session survived.
                    leadership.release();
                    if let Some(metrics) = &self.metrics {
                        metrics.errors.inc();
                    }
                    tracing::error!(projection = name, error = %error, retry_in = ?backoff, "projection step failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::info!(projection = name, "projection worker stopped");
    }

    /// Takes this projection's advisory lock (see [`Storage::try_lead`]).
    pub async fn try_lead(&self) -> Result<Option<AnyConnection>, ProjectionError> {
        Ok(self
            .log
            .storage()
            .try_lead("essayflow.projection", self.name())
            .await?)
    }

    /// Applies the next page, if any.
    pub async fn step(&self) -> Result<Step, ProjectionError> {
        self.step_with(&|_| Ok(())).await
    }

    /// Applies the next page, running `before_commit` just before the commit.
    pub async fn step_with(
        &self,
        before_commit: BeforeCommit<'_>,
    ) -> Result<Step, ProjectionError> {
        self.step_inner(before_commit, None).await
    }

    /// Applies the next page, but no event after `limit`: [`Step::Idle`] once the checkpoint
    /// is at `limit` (a rebuild's shadow follows the live model's checkpoint this way).
    pub async fn step_until(&self, limit: LogPosition) -> Result<Step, ProjectionError> {
        self.step_inner(&|_| Ok(()), Some(limit)).await
    }

    async fn step_inner(
        &self,
        before_commit: BeforeCommit<'_>,
        limit: Option<LogPosition>,
    ) -> Result<Step, ProjectionError> {
        let name = self.checkpoint_name.as_str();
        let known = *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
        let checkpoint = match known {
            Some(checkpoint) => checkpoint,
            None => load_checkpoint(self.pool(), name).await?,
        };
        let started = std::time::Instant::now();
        let mut events = self
            .log
            .read_after(checkpoint, self.options.page_size)
            .await?;
        if let Some(limit) = limit {
            // The log is in order: what is past the limit is a tail.
            let within = events.partition_point(|e| e.at <= limit);
            events.truncate(within);
        }
        let Some(last) = events.last().map(|e| e.at) else {
            return Ok(Step::Idle);
        };
        let read = started.elapsed();
        // Live pages only: a rebuild's or verification's fold is not part of any request.
        let _spans = if self.space == Space::Live {
            apply_spans(self.projection.name(), &events)
        } else {
            Vec::new()
        };
        let _turn = self.log.storage().write_turn().await;
        let mut conn = self.pool().acquire().await?;
        let mut tx = conn.begin().await?;
        let claimed = commands::checkpoint::advance_checkpoint(
            &mut *tx,
            name,
            checkpoint,
            last,
            events.len(),
        )
        .await?;
        if !claimed {
            tx.rollback().await?;
            *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Ok(Step::Superseded);
        }
        let mut changes = Vec::new();
        match &self.feed {
            Some(feed) if self.space == Space::Live => {
                self.projection
                    .apply(&mut tx, self.space, &events, Some(&mut changes))
                    .await?;
                // Read after the compare-and-set: a swap that raised it has committed by now.
                let generation = crate::feed::generation(&mut *tx, name).await?;
                for change in &mut changes {
                    change.generation = generation;
                }
                feed.record(&mut tx, &changes).await?;
            }
            _ => {
                self.projection
                    .apply(&mut tx, self.space, &events, None)
                    .await?
            }
        }
        before_commit(&events)?;
        let applied = started.elapsed();
        tx.commit().await?;
        if let Some(feed) = &self.feed {
            feed.publish(changes);
        }
        if let Some(metrics) = &self.metrics {
            metrics
                .page_duration
                .observe(started.elapsed().as_secs_f64());
            metrics.events_applied.inc_by(events.len() as u64);
        }
        tracing::debug!(
            projection = name,
            events = events.len(),
            read_ms = read.as_secs_f64() * 1e3,
            applied_ms = applied.as_secs_f64() * 1e3,
            committed_ms = started.elapsed().as_secs_f64() * 1e3,
            "page applied"
        );
        *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = Some(last);
        self.log.storage().checkpoints().publish(name, last);
        Ok(Step::Applied(events.len()))
    }
}

/// Makes sure a projection has a checkpoint row (at the start of the log).
pub async fn ensure_checkpoint(pool: &AnyPool, name: &str) -> Result<(), ProjectionError> {
    Ok(commands::checkpoint::ensure_checkpoint(pool, name).await?)
}

/// A projection's checkpoint: every event at or before it has been applied.
pub async fn load_checkpoint(pool: &AnyPool, name: &str) -> Result<LogPosition, ProjectionError> {
    Ok(commands::checkpoint::load_checkpoint(pool, name).await?)
}

/// One `projection.apply` span per event whose trace context is sampled, when spans are
/// exported ([`commands::trace::spans_for`]), each a child of its event's stored context; they
/// end when dropped, after the page's commit. None otherwise: the cost is bounded by one span
/// per event applied, and nothing when export is off.
fn apply_spans(projection: &'static str, events: &[commands::StoredEvent]) -> Vec<tracing::Span> {
    if !commands::trace::exporting() {
        return Vec::new();
    }
    events
        .iter()
        .filter_map(|event| {
            let parent = event.metadata.trace()?;
            if !parent.is_sampled() {
                return None;
            }
            let span = tracing::info_span!(
                "projection.apply",
                projection,
                "event.type" = %event.event_type,
                "event.position" = event.at.position,
                "batch.id" = %event.batch_id,
                "event.sequence" = event.sequence,
            );
            parent.adopt(&span);
            Some(span)
        })
        .collect()
}
