//! What `/readyz` and `/metrics` read, and the operations listener.
//!
//! - [`OpsCache`]: the expensive parts of a scrape (projection statuses, with their rebuild
//!   and verification, and the relay's and conductor's lags) are read at most every
//!   `ops.cache_ms` into a [`Snapshot`] that scrapes share; concurrent scrapes wait for one
//!   reading. A reading writes nothing (no checkpoint row is created) and counts each lag up
//!   to [`commands::LAG_COUNT_LIMIT`] rows at most, so a scrape costs no writes and no full
//!   scans.
//! - [`check_database`]: the live part of readiness: the breaker's state and a `SELECT 1`.
//! - [`spawn_listener`]: with `ops.bind` set, a second plain-HTTP listener serving
//!   `/metrics`, the detailed `/readyz` and `/healthz` without authentication.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use commands::checkpoint::peek_checkpoint;
use commands::{LAG_COUNT_LIMIT, LogPosition};
use projections::{PROJECTIONS, ProjectionStatus};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::edge::breaker::DatabaseFailure;
use crate::state::AppState;

/// The longest one reading of a [`Snapshot`] may take; past it the reading counts as failed.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a failed reading is kept at most (so that a scrape right after the database
/// returns reads again soon, whatever `ops.cache_ms` is).
pub const FAILED_READING_KEPT: Duration = Duration::from_secs(1);

/// One reading of the expensive parts of `/readyz` and `/metrics`.
#[derive(Debug)]
pub struct Snapshot {
    /// When it was read.
    pub taken_at: DateTime<Utc>,
    taken: Instant,
    /// The projections' statuses, or why they could not be read.
    pub projections: Result<Vec<ProjectionStatus>, String>,
    /// Events the relay and the conductor have still to handle (at most
    /// [`LAG_COUNT_LIMIT`]); `None` when unknown.
    pub relay_lag: Option<i64>,
    pub conductor_lag: Option<i64>,
}

impl Snapshot {
    /// How old the reading is.
    pub fn age(&self) -> Duration {
        self.taken.elapsed()
    }

    /// `taken_at` in RFC 3339 with milliseconds.
    pub fn taken_at_text(&self) -> String {
        self.taken_at.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    fn failed(reason: String) -> Self {
        Self {
            taken_at: Utc::now(),
            taken: Instant::now(),
            projections: Err(reason),
            relay_lag: None,
            conductor_lag: None,
        }
    }
}

/// The shared, periodically refreshed [`Snapshot`] (one per process, in [`AppState`]).
#[derive(Debug)]
pub struct OpsCache {
    max_age: Duration,
    slot: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
    /// The last database check and when it was made: every `/readyz` within
    /// [`DATABASE_CHECK_KEPT`] shares it, so a flood of readiness probes costs one `SELECT 1`
    /// a second, never a connection each.
    database: tokio::sync::Mutex<Option<(Instant, DatabaseCheck)>>,
}

/// How long one database check answers every `/readyz`.
pub const DATABASE_CHECK_KEPT: Duration = Duration::from_secs(1);

impl OpsCache {
    /// A cache whose readings are kept for `max_age`.
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            slot: tokio::sync::Mutex::new(None),
            database: tokio::sync::Mutex::new(None),
        }
    }

    /// The database's readiness: down at once while the breaker is open, else the last
    /// [`check_database`] if it is younger than [`DATABASE_CHECK_KEPT`], else a new one
    /// (callers that arrive meanwhile wait for it and share it).
    pub async fn database(&self, state: &AppState) -> DatabaseCheck {
        if state.breaker.is_open() {
            return check_database(state).await;
        }
        let asked = Instant::now();
        let mut slot = self.database.lock().await;
        if let Some((at, check)) = slot.as_ref()
            && (at.elapsed() < DATABASE_CHECK_KEPT || *at >= asked)
        {
            return check.clone();
        }
        let check = check_database(state).await;
        *slot = Some((Instant::now(), check.clone()));
        check
    }

    /// The current reading: the kept one while it is fresh, else a new one. Scrapes that
    /// arrive while a reading is being taken wait for it and share it.
    pub async fn get(&self, state: &AppState) -> Arc<Snapshot> {
        let asked = Instant::now();
        let mut slot = self.slot.lock().await;
        if let Some(snapshot) = slot.as_ref() {
            let kept_for = if snapshot.projections.is_ok() {
                self.max_age
            } else {
                self.max_age.min(FAILED_READING_KEPT)
            };
            // Fresh, or taken while this scrape waited for the lock.
            if snapshot.age() < kept_for || snapshot.taken >= asked {
                return snapshot.clone();
            }
        }
        let snapshot = Arc::new(read(state).await);
        *slot = Some(snapshot.clone());
        snapshot
    }
}

/// Takes a reading (nothing is read while the breaker is open).
async fn read(state: &AppState) -> Snapshot {
    if state.breaker.is_open() {
        return Snapshot::failed("the database cannot be reached".to_owned());
    }
    let reading = async {
        let projections = state.reads.projections(&PROJECTIONS).await;
        let relay_lag = follower_lag(state, "relay").await;
        let conductor_lag = follower_lag(state, "conductor").await;
        (projections, relay_lag, conductor_lag)
    };
    match tokio::time::timeout(REFRESH_TIMEOUT, reading).await {
        Ok((Ok(projections), relay_lag, conductor_lag)) => Snapshot {
            taken_at: Utc::now(),
            taken: Instant::now(),
            projections: Ok(projections),
            relay_lag,
            conductor_lag,
        },
        Ok((Err(error), _, _)) => {
            let failure = DatabaseFailure::of_error(&error);
            if let Some(failure) = &failure {
                state.breaker.record_failure(failure);
            }
            tracing::warn!(%error, "reading the projections' status failed");
            Snapshot::failed(failure.map_or_else(
                || "the projections' status could not be read".to_owned(),
                |f| f.reason,
            ))
        }
        Err(_) => Snapshot::failed(format!(
            "reading the projections' status took over {} s",
            REFRESH_TIMEOUT.as_secs()
        )),
    }
}

/// Events a log follower (`relay`, `conductor`) has still to handle, counted up to
/// [`LAG_COUNT_LIMIT`]; `None` when unknown. Reads only (a follower without a checkpoint row
/// yet is at the start of the log).
async fn follower_lag(state: &AppState, name: &str) -> Option<i64> {
    let at = peek_checkpoint(state.storage.pool(), name).await.ok()?;
    state
        .log
        .count_after_at_most(at.unwrap_or(LogPosition::default()), LAG_COUNT_LIMIT)
        .await
        .ok()
}

/// The database's readiness, now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseCheck {
    /// It answered `SELECT 1`.
    Up,
    /// Every pooled connection is busy, but the database answers a probe on a connection of
    /// its own: ready, under load.
    Busy,
    /// It cannot be reached (why, in words).
    Down(String),
}

/// Checks the database: down at once while the breaker is open; otherwise a `SELECT 1`
/// through the pool within the probe timeout, and if that fails, a probe on a connection of
/// its own tells a busy pool from a database that is down (and reports the latter to the
/// breaker).
pub async fn check_database(state: &AppState) -> DatabaseCheck {
    let breaker = &state.breaker;
    if breaker.is_open() {
        return DatabaseCheck::Down(
            breaker
                .report()
                .last_error
                .unwrap_or_else(|| "the database cannot be reached".to_owned()),
        );
    }
    let timeout = state.settings.ops.probe_timeout();
    if let Ok(Ok(())) = tokio::time::timeout(timeout, state.storage.ping()).await {
        return DatabaseCheck::Up;
    }
    match breaker.probe(&state.storage).await {
        Ok(()) => DatabaseCheck::Busy,
        Err(failure) => {
            breaker.record_failure(&failure);
            DatabaseCheck::Down(failure.reason)
        }
    }
}

/// Serves the operations router on `listener` (plain HTTP, no authentication) until
/// `cancel`; the accept loop and its connections run on `tracker`, so the shutdown drain
/// waits for them.
pub fn spawn_listener(
    listener: TcpListener,
    state: &AppState,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    let router = crate::routes::ops_router()
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(state.settings.http.request_timeout_secs),
        ))
        // The timeout's 503 (and any other body-less error) as a problem with Retry-After.
        .layer(axum::middleware::from_fn(crate::edge::problem::problemize))
        .with_state(state.clone());
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "operations endpoints (/metrics, /readyz, /healthz) are serving");
    }
    let server = crate::server::Server {
        listener,
        tls: None,
        router,
        http: state.settings.http.clone(),
        stats: Arc::default(),
    };
    tracker.spawn(crate::server::serve(server, cancel, tracker.clone()));
}
