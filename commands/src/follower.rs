//! A checkpointed reader of the event log that acts on what it reads: the conductor (issues
//! commands) and the relay (publishes to the broker) are followers.
//!
//! Unlike a projection, a follower's effect happens outside the database transaction that moves
//! its checkpoint, so delivery is **at least once**: a page is handled, then the checkpoint moves
//! (compare-and-set). A crash in between hands the same page over again, so every follower's
//! effect must be idempotent (the conductor's commands are; the relay's messages carry stable
//! ids that consumers de-duplicate on). On PostgreSQL one follower of each name is active across
//! all nodes (an advisory lock); the others wait to take over.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::checkpoint::{advance_checkpoint, load_checkpoint};
use crate::leadership::{Lead, Leadership};
use crate::log::{EventLog, LogPosition, StoredEvent};
use crate::storage::Storage;

/// What a follower does with each page of the log.
pub trait Follower: Send + Sync + 'static {
    /// The stable name, also the checkpoint's key.
    fn name(&self) -> &'static str;
    /// Handles a page, in log order. Must be idempotent: after a crash or an error the same
    /// events are handed over again. An error leaves the checkpoint where it was.
    fn handle(
        &self,
        events: &[StoredEvent],
    ) -> impl Future<Output = Result<(), FollowerError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    /// The follower's effect failed (the broker did not take a page, or a command could not
    /// be stored); retried with backoff.
    #[error("{0}")]
    Downstream(String),
}

/// How a follower is doing, for `/readyz` and `/metrics`.
#[derive(Debug, Default)]
pub struct FollowerStatus {
    /// Events handled since start.
    pub handled: AtomicU64,
    /// Failed steps since start.
    pub errors: AtomicU64,
    /// Consecutive failed steps (0 when the last step succeeded).
    pub failing: AtomicU64,
    /// The global position of the checkpoint this follower last committed (-1 before).
    pub checkpoint: AtomicI64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl FollowerStatus {
    pub fn new() -> Arc<Self> {
        let status = Self::default();
        status.checkpoint.store(-1, Ordering::Relaxed);
        Arc::new(status)
    }

    /// The last error, while the follower is failing.
    pub fn last_error(&self) -> Option<String> {
        if self.failing.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn failed(&self, error: &FollowerError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.failing.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
    }

    fn succeeded(&self) {
        self.failing.store(0, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct FollowOptions {
    /// At most this many events per page.
    pub page_size: i64,
    /// How often to look for new events when no append signal arrives.
    pub poll_interval: Duration,
    /// The longest wait between retries of a failing page.
    pub max_backoff: Duration,
}

impl Default for FollowOptions {
    fn default() -> Self {
        Self {
            page_size: 500,
            poll_interval: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowStep {
    /// This many events were handled and the checkpoint moved past them.
    Handled(usize),
    /// Nothing new in the log.
    Idle,
    /// Another reader (or a reset) moved the checkpoint; the page will be read again from it.
    Superseded,
}

/// Runs `follower` until `cancel` fires: wakes on appends (with a polling fallback), handles a
/// page, moves the checkpoint; retries failed pages with exponential backoff.
pub struct Follow<F> {
    follower: F,
    log: EventLog,
    options: FollowOptions,
    status: Arc<FollowerStatus>,
    /// The checkpoint this loop last committed; `None` until read, and whenever another
    /// reader may have moved it (a lost compare-and-set, a change of leader, a failure).
    checkpoint: std::sync::Mutex<Option<LogPosition>>,
}

impl<F: Follower> Follow<F> {
    /// A loop that will run `follower` from its checkpoint (created at the log's start).
    pub fn new(follower: F, storage: &Storage, options: FollowOptions) -> Self {
        Self {
            follower,
            log: EventLog::new(storage.clone()),
            options,
            status: FollowerStatus::new(),
            checkpoint: std::sync::Mutex::new(None),
        }
    }

    fn forget_checkpoint(&self) {
        *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn status(&self) -> Arc<FollowerStatus> {
        self.status.clone()
    }

    /// Runs until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let name = self.follower.name();
        let storage = self.log.storage().clone();
        let mut wake = storage.appended();
        let mut backoff = Duration::from_millis(100);
        let mut leadership = Leadership::new(storage.clone(), "essayflow.follower", name);
        tracing::info!(worker = name, "worker started");
        while !cancel.is_cancelled() {
            match leadership.ensure().await {
                Ok(Lead::Held) => {}
                Ok(Lead::Taken) => {
                    tracing::info!(worker = name, "this node now runs the worker");
                    self.forget_checkpoint();
                }
                Ok(Lead::Standby) => {
                    // Another node runs it: this one is a healthy standby.
                    self.status.succeeded();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(self.options.poll_interval * 4) => continue,
                    }
                }
                Err(error) => {
                    let error = FollowerError::from(error);
                    self.status.failed(&error);
                    tracing::warn!(worker = name, %error, "could not take the worker lock");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
            }
            match self.step().await {
                Ok(FollowStep::Handled(_)) | Ok(FollowStep::Superseded) => {
                    backoff = Duration::from_millis(100);
                }
                Ok(FollowStep::Idle) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = wake.changed() => {}
                        _ = tokio::time::sleep(self.options.poll_interval) => {}
                    }
                }
                Err(error) => {
                    // The lock lives on its connection, which the failure may have taken
                    // down: prove leadership again (one query) before the next page.
                    leadership.release();
                    self.forget_checkpoint();
                    self.status.failed(&error);
                    tracing::warn!(worker = name, %error, retry_in = ?backoff, "worker step failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
        tracing::info!(worker = name, "worker stopped");
    }

    /// Handles the next page, if any, and moves the checkpoint past it.
    pub async fn step(&self) -> Result<FollowStep, FollowerError> {
        let name = self.follower.name();
        let pool = self.log.storage().pool();
        let known = *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
        let checkpoint = match known {
            Some(checkpoint) => checkpoint,
            None => load_checkpoint(pool, name).await?,
        };
        let events = self
            .log
            .read_after(checkpoint, self.options.page_size)
            .await?;
        let Some(last) = events.last().map(|e| e.at) else {
            // Idle: read the checkpoint afresh next time, so that a checkpoint moved from
            // outside (an operator rewinding the worker) is seen.
            self.forget_checkpoint();
            self.status.succeeded();
            self.publish(checkpoint);
            return Ok(FollowStep::Idle);
        };
        self.follower.handle(&events).await?;
        let moved = {
            let _turn = self.log.storage().write_turn().await;
            advance_checkpoint(pool, name, checkpoint, last, events.len()).await?
        };
        self.status.succeeded();
        if !moved {
            self.forget_checkpoint();
            return Ok(FollowStep::Superseded);
        }
        *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = Some(last);
        self.status
            .handled
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.publish(last);
        Ok(FollowStep::Handled(events.len()))
    }

    fn publish(&self, at: LogPosition) {
        self.status.checkpoint.store(at.position, Ordering::Relaxed);
        self.log
            .storage()
            .checkpoints()
            .publish(self.follower.name(), at);
    }
}
