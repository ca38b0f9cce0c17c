//! Operators' jobs on the read models, run in the background of a serving node: rebuilds beside
//! the live model (`POST /v1/admin/projections/{name}/rebuild`), verifications
//! (`POST /v1/admin/projections/{name}/verify`, and on a schedule), and resuming a rebuild
//! that a dead process left (every node that runs workers looks for one now and then).
//!
//! The work itself is `projections::rebuild` and `projections::verify`; this module owns only
//! where it runs: on the application's task tracker, stopped by its cancellation token (a
//! stopped rebuild resumes from its checkpoint when claimed again).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commands::Storage;
use commands::leadership::{Lead, Leadership};
use projections::rebuild::{Rebuild, RebuildError, RebuildOptions};
use projections::verify::{VerifyOptions, verify};
use projections::{AnyProjection, Feed, PROJECTIONS, Projection, ProjectionError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs rebuilds and verifications for this node. Cheap to share.
pub struct Jobs {
    storage: Storage,
    feed: Feed,
    cancel: CancellationToken,
    tracker: TaskTracker,
    rebuild: RebuildOptions,
    verify: VerifyOptions,
    /// Projections being verified by this process (a second request waits its turn).
    verifying: Mutex<HashSet<&'static str>>,
}

/// A rebuild that was claimed and runs in the background.
#[derive(Debug, Clone)]
pub struct Started {
    pub projection: &'static str,
    /// Events the shadow already held (more than 0 when an interrupted rebuild resumes).
    pub resumed_from: u64,
}

/// Why a job could not start.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    #[error("a verification of {0} is already running")]
    Verifying(String),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

impl Jobs {
    pub fn new(
        storage: Storage,
        feed: Feed,
        cancel: CancellationToken,
        tracker: TaskTracker,
        rebuild: RebuildOptions,
        verify: VerifyOptions,
    ) -> Self {
        Self {
            storage,
            feed,
            cancel,
            tracker,
            rebuild,
            verify,
            verifying: Mutex::default(),
        }
    }

    /// Claims a rebuild of `name` and runs it in the background; refused while one runs.
    pub async fn rebuild(self: &Arc<Self>, name: &str) -> Result<Started, JobError> {
        let projection = AnyProjection::named(name)?;
        let claimed = Rebuild::claim(projection, &self.storage, self.rebuild).await?;
        let started = Started {
            projection: projection.name(),
            resumed_from: claimed.resumed_from(),
        };
        let jobs = self.clone();
        self.tracker.spawn(async move {
            let _ = claimed.run(Some(&jobs.feed), |_| {}, &jobs.cancel).await;
        });
        Ok(started)
    }

    /// Verifies `name` in the background; refused while this process verifies it already.
    pub fn verify(self: &Arc<Self>, name: &str) -> Result<&'static str, JobError> {
        let projection = AnyProjection::named(name)?;
        let name = projection.name();
        if !self
            .verifying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name)
        {
            return Err(JobError::Verifying(name.to_owned()));
        }
        let jobs = self.clone();
        self.tracker.spawn(async move {
            jobs.run_verify(projection).await;
            jobs.verifying
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
        });
        Ok(name)
    }

    async fn run_verify(&self, projection: AnyProjection) {
        let name = projection.name();
        match verify(projection, &self.storage, self.verify, |_| {}, &self.cancel).await {
            Ok(report) if report.rows_differing == 0 => {
                tracing::info!(
                    projection = name,
                    rows = report.rows_compared,
                    "the live model equals a fold of the log"
                )
            }
            Ok(report) => tracing::error!(
                projection = name,
                rows = report.rows_compared,
                differing = report.rows_differing,
                first = ?report.differences.first(),
                "the live model differs from a fold of the log"
            ),
            Err(error) => tracing::warn!(projection = name, %error, "verification failed"),
        }
    }

    /// Every `every`, resumes the rebuilds that a dead process left (their lease ran out).
    pub fn spawn_resumer(self: &Arc<Self>, every: Duration) {
        let jobs = self.clone();
        self.tracker.spawn(async move {
            loop {
                match projections::rebuild::interrupted(&jobs.storage).await {
                    Ok(names) => {
                        for name in names {
                            match jobs.rebuild(&name).await {
                                Ok(started) => tracing::info!(
                                    projection = started.projection,
                                    resumed_from = started.resumed_from,
                                    "resuming an interrupted rebuild"
                                ),
                                // Another node was faster: fine.
                                Err(JobError::Rebuild(RebuildError::AlreadyRunning { .. })) => {}
                                Err(error) => {
                                    tracing::warn!(projection = name, %error, "could not resume a rebuild")
                                }
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%error, "could not look for interrupted rebuilds"),
                }
                tokio::select! {
                    _ = jobs.cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
    }

    /// Every `every`, verifies every projection (on one node at a time).
    pub fn spawn_verifier(self: &Arc<Self>, every: Duration) {
        let jobs = self.clone();
        self.tracker.spawn(async move {
            let mut leadership = Leadership::new(jobs.storage.clone(), "essayflow.verifier", "all");
            loop {
                tokio::select! {
                    _ = jobs.cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match leadership.ensure().await {
                    Ok(Lead::Held | Lead::Taken) => {}
                    Ok(Lead::Standby) => continue,
                    Err(error) => {
                        tracing::warn!(%error, "could not take the verifier lock");
                        continue;
                    }
                }
                for name in PROJECTIONS {
                    if let Ok(projection) = AnyProjection::named(name) {
                        jobs.run_verify(projection).await;
                    }
                }
            }
        });
    }
}
