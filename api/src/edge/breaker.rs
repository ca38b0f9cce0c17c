//! The database circuit breaker: when the database cannot be reached, requests that need it
//! are answered `503` problem+json (`urn:essayflow:problem:database-unavailable`,
//! `Retry-After: 1`) at once instead of each waiting for the pool, and service resumes by
//! itself, without a restart, when the database answers again.
//!
//! - **Closed** (normal): every request goes through. A request that fails on the database
//!   with a connectivity error (sqlx `Io`, `Tls`, `Protocol`, `PoolClosed`, `PoolTimedOut`,
//!   a worker crash, or a server error of class `08` or `57P01`..`57P03`) is answered `503`
//!   itself ([`DatabaseFailure`], through [`crate::error::ApiError`]) and reported here. A
//!   report does not open the breaker on its own: the prober first checks the database with
//!   a `SELECT 1` on a connection of its own, outside the pools, within
//!   `db_probe_timeout_ms`; the breaker opens only if that fails. So a `PoolTimedOut` under
//!   heavy load with a healthy database (every pooled connection busy) leaves it closed.
//! - **Open**: every request but the exempt ones (`/healthz`, `/readyz`, `/metrics`, the API
//!   documentation) is answered `503` at once, and requests already waiting on the database
//!   are answered `503` the moment it opens. The prober tries the database every
//!   `db_probe_interval_ms`.
//! - **Half-open**: a probe answered. Requests go through again; the first one that completes
//!   without a database failure (or the next successful probe) closes the breaker, and one
//!   that fails to reach the database opens it again at once.
//!
//! The state, since when, the last error (in words, without addresses or credentials) and the
//! number of openings are on `/readyz` (`checks.database.breaker`) and `/metrics`
//! (`essayflow_db_breaker_state`, `essayflow_db_breaker_opened_total`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use commands::Storage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ApiError;
use crate::state::AppState;

/// The operations settings: the database's fail-fast bounds and the operations endpoints
/// (`[ops]` in the configuration file; environment variables named on each field).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsSettings {
    /// `ESSAYFLOW_OPS_BIND`: an address (`127.0.0.1:9090`) on which a second, plain-HTTP
    /// listener serves `/metrics`, the detailed `/readyz` and `/healthz` without
    /// authentication, for Prometheus and the orchestrator. Empty (the default): none, and
    /// those need the admin role on the main listener.
    pub bind: String,
    /// `ESSAYFLOW_OPS_CACHE_MS`: the expensive parts of `/readyz` and `/metrics` (projection
    /// statuses, follower lags) are read at most this often (5 000 ms by default); scrapes in
    /// between share the last reading. 0: read on every scrape (concurrent scrapes still share
    /// one reading).
    pub cache_ms: u64,
    /// `ESSAYFLOW_OPS_DB_ACQUIRE_TIMEOUT_MS`: the longest a request waits for a database
    /// connection (1 000 ms by default); past it, 503 `database-unavailable`.
    pub db_acquire_timeout_ms: u64,
    /// `ESSAYFLOW_OPS_DB_PROBE_INTERVAL_MS`: how often an open breaker checks the database
    /// (500 ms by default).
    pub db_probe_interval_ms: u64,
    /// `ESSAYFLOW_OPS_DB_PROBE_TIMEOUT_MS`: how long a probe (connect and `SELECT 1`) may take
    /// before it counts as failed (1 000 ms by default).
    pub db_probe_timeout_ms: u64,
}

impl Default for OpsSettings {
    fn default() -> Self {
        Self {
            bind: String::new(),
            cache_ms: 5_000,
            db_acquire_timeout_ms: 1_000,
            db_probe_interval_ms: 500,
            db_probe_timeout_ms: 1_000,
        }
    }
}

impl OpsSettings {
    /// Refuses values that cannot work.
    pub fn check(&self) -> anyhow::Result<()> {
        for (name, value) in [
            ("db_acquire_timeout_ms", self.db_acquire_timeout_ms),
            ("db_probe_interval_ms", self.db_probe_interval_ms),
            ("db_probe_timeout_ms", self.db_probe_timeout_ms),
        ] {
            if !(50..=600_000).contains(&value) {
                anyhow::bail!("ops: {name} must be from 50 to 600000");
            }
        }
        Ok(())
    }

    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.db_acquire_timeout_ms)
    }

    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.db_probe_interval_ms)
    }

    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.db_probe_timeout_ms)
    }

    pub fn cache(&self) -> Duration {
        Duration::from_millis(self.cache_ms)
    }
}

/// The breaker's state; its number is the value of `essayflow_db_breaker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl BreakerState {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }

    /// `closed`, `open` or `half-open`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// What kind of database failure a request met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The database could not be reached, or the connection broke.
    Unreachable,
    /// No pooled connection within the acquire timeout: the database is down, or every
    /// connection is busy (a probe tells which).
    PoolTimedOut,
}

/// A request's failure to reach the database: answered 503 `database-unavailable`, and
/// carried in the answer's extensions to [`guard`], which reports it to the [`Breaker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseFailure {
    pub kind: FailureKind,
    /// In words, without addresses or credentials.
    pub reason: String,
}

/// The prefixes of sqlx's messages for connectivity failures, for errors that reached the
/// API as text (`CommandError::Storage`, the appender's errors) or behind a wrapper whose
/// `source` skips the `sqlx::Error` itself (`#[error(transparent)]`).
const UNREACHABLE_TEXTS: [(&str, &str); 5] = [
    (
        "error communicating with database",
        "the connection to the database failed",
    ),
    (
        "error occurred while attempting to establish a TLS connection",
        "the TLS handshake with the database failed",
    ),
    (
        "attempted to acquire a connection on a closed pool",
        "the connection pool is closed",
    ),
    (
        "encountered unexpected or invalid data",
        "the database connection broke (unexpected data)",
    ),
    (
        "attempted to communicate with a crashed background worker",
        "the database driver's worker stopped",
    ),
];
const POOL_TIMED_OUT_TEXT: &str = "pool timed out while waiting for an open connection";
const POOL_TIMED_OUT_REASON: &str = "no database connection within the acquire timeout";

impl DatabaseFailure {
    fn unreachable(reason: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Unreachable,
            reason: reason.into(),
        }
    }

    /// The failure an sqlx error stands for, if it is one of connectivity.
    pub fn of_sqlx(error: &sqlx::Error) -> Option<Self> {
        match error {
            sqlx::Error::Io(e) => Some(Self::unreachable(format!(
                "the connection to the database failed: {}",
                e.kind()
            ))),
            sqlx::Error::Tls(_) => Some(Self::unreachable(
                "the TLS handshake with the database failed",
            )),
            sqlx::Error::Protocol(_) => Some(Self::unreachable(
                "the database connection broke (unexpected data)",
            )),
            sqlx::Error::PoolClosed => Some(Self::unreachable("the connection pool is closed")),
            sqlx::Error::WorkerCrashed => {
                Some(Self::unreachable("the database driver's worker stopped"))
            }
            sqlx::Error::PoolTimedOut => Some(Self {
                kind: FailureKind::PoolTimedOut,
                reason: POOL_TIMED_OUT_REASON.to_owned(),
            }),
            sqlx::Error::Database(e) => {
                let code = e.code()?;
                // Connection exceptions, and the server shutting down or starting up.
                (code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03"))
                    .then(|| {
                        Self::unreachable(format!(
                            "the database closed the connection (SQLSTATE {code})"
                        ))
                    })
            }
            _ => None,
        }
    }

    /// The failure an error's message stands for (see [`UNREACHABLE_TEXTS`]).
    fn of_text(text: &str) -> Option<Self> {
        if text.contains(POOL_TIMED_OUT_TEXT) {
            return Some(Self {
                kind: FailureKind::PoolTimedOut,
                reason: POOL_TIMED_OUT_REASON.to_owned(),
            });
        }
        UNREACHABLE_TEXTS
            .iter()
            .find(|(pattern, _)| text.contains(pattern))
            .map(|(_, reason)| Self::unreachable(*reason))
    }

    /// The connectivity failure somewhere in an error's chain of causes, if any.
    pub fn of_error(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut next = Some(error);
        while let Some(cause) = next {
            if let Some(sqlx) = cause.downcast_ref::<sqlx::Error>() {
                if let Some(failure) = Self::of_sqlx(sqlx) {
                    return Some(failure);
                }
            } else if let Some(failure) = Self::of_text(&cause.to_string()) {
                return Some(failure);
            }
            next = cause.source();
        }
        None
    }

    /// The connectivity failure somewhere in an `anyhow` error's chain, if any.
    pub fn of_anyhow(error: &anyhow::Error) -> Option<Self> {
        Self::of_error(error.as_ref())
    }
}

impl IntoResponse for DatabaseFailure {
    /// 503 `database-unavailable` with `Retry-After`, carrying the failure for [`guard`].
    fn into_response(self) -> Response {
        tracing::warn!(reason = %self.reason, "a request could not reach the database");
        let mut response = ApiError::DatabaseUnavailable.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

/// What `/readyz` shows of the breaker.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BreakerReport {
    /// `closed`, `open` or `half-open`.
    pub state: &'static str,
    /// When it entered that state (RFC 3339).
    pub since: String,
    /// How many times it opened since start.
    pub opened_total: u64,
    /// The last database failure seen, in words, and when.
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

/// The labels of a breaker transition: the states' names (`closed`, `open`, `half-open`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransitionLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Debug)]
struct Inner {
    since: DateTime<Utc>,
    last_error: Option<(String, DateTime<Utc>)>,
}

/// The circuit breaker on the database (see the module documentation). One per process,
/// in [`AppState`].
#[derive(Debug)]
pub struct Breaker {
    state: AtomicU8,
    inner: Mutex<Inner>,
    opened_total: AtomicU64,
    /// `essayflow_db_breaker_transitions_total{from,to}`.
    transitions: Family<TransitionLabels, Counter>,
    /// Tells waiting requests the state changed (they give up when it opens).
    changes: watch::Sender<BreakerState>,
    /// Wakes the prober of a closed breaker to confirm a reported failure.
    suspect: Notify,
    probe_interval: Duration,
    probe_timeout: Duration,
}

impl Breaker {
    pub fn new(settings: &OpsSettings) -> Self {
        Self {
            state: AtomicU8::new(BreakerState::Closed as u8),
            inner: Mutex::new(Inner {
                since: Utc::now(),
                last_error: None,
            }),
            opened_total: AtomicU64::new(0),
            transitions: Family::default(),
            changes: watch::channel(BreakerState::Closed).0,
            suspect: Notify::new(),
            probe_interval: settings.probe_interval(),
            probe_timeout: settings.probe_timeout(),
        }
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether requests that need the database are refused now.
    pub fn is_open(&self) -> bool {
        self.state() == BreakerState::Open
    }

    /// Registers `essayflow_db_breaker_transitions_total{from,to}` (state changes; the four
    /// possible ones present from the start) in `registry`. The state itself and the openings
    /// are read at scrape time ([`crate::metrics::PartsCollector`]).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        use BreakerState::{Closed, HalfOpen, Open};
        for (from, to) in [
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Closed),
            (HalfOpen, Open),
        ] {
            let _ = self.transitions.get_or_create(&TransitionLabels {
                from: from.name(),
                to: to.name(),
            });
        }
        registry.register(
            "db_breaker_transitions",
            "State changes of the database circuit breaker",
            self.transitions.clone(),
        );
    }

    /// How many times the breaker opened since start.
    pub fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves from `from` to `to` (no-op if the state is no longer `from`); true if it moved.
    fn transition(&self, from: BreakerState, to: BreakerState) -> bool {
        let mut inner = self.inner();
        if self
            .state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        inner.since = Utc::now();
        drop(inner);
        if to == BreakerState::Open {
            self.opened_total.fetch_add(1, Ordering::Relaxed);
        }
        self.transitions
            .get_or_create(&TransitionLabels {
                from: from.name(),
                to: to.name(),
            })
            .inc();
        self.changes.send_replace(to);
        match to {
            BreakerState::Open => {
                tracing::warn!(reason = ?self.last_error(), "database circuit breaker opened: refusing requests that need the database");
            }
            BreakerState::HalfOpen => {
                tracing::info!("database circuit breaker half-open: the database answered a probe");
            }
            BreakerState::Closed => tracing::info!("database circuit breaker closed"),
        }
        true
    }

    fn note(&self, reason: &str) {
        self.inner().last_error = Some((reason.to_owned(), Utc::now()));
    }

    fn last_error(&self) -> Option<String> {
        self.inner().last_error.as_ref().map(|(e, _)| e.clone())
    }

    /// Reports a request's (or a readiness check's) failure to reach the database. Closed:
    /// the prober confirms with a probe before opening. Half-open: a connection failure opens
    /// it again at once.
    pub fn record_failure(&self, failure: &DatabaseFailure) {
        self.note(&failure.reason);
        match self.state() {
            BreakerState::Closed => self.suspect.notify_one(),
            BreakerState::HalfOpen => {
                if failure.kind == FailureKind::Unreachable {
                    self.transition(BreakerState::HalfOpen, BreakerState::Open);
                } else {
                    self.suspect.notify_one();
                }
            }
            BreakerState::Open => {}
        }
    }

    /// Reports a request that completed without a database failure: closes a half-open
    /// breaker.
    pub fn record_success(&self) {
        if self.state() == BreakerState::HalfOpen {
            self.transition(BreakerState::HalfOpen, BreakerState::Closed);
        }
    }

    /// The state for `/readyz`.
    pub fn report(&self) -> BreakerReport {
        let inner = self.inner();
        let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        BreakerReport {
            state: self.state().name(),
            since: time(&inner.since),
            opened_total: self.opened_total(),
            last_error: inner.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_at: inner.last_error.as_ref().map(|(_, t)| time(t)),
        }
    }

    /// Checks that the database answers: connect on a connection of the probe's own (outside
    /// the pools, so a busy pool does not count as a dead database) and run `SELECT 1`,
    /// within the probe timeout. A database that answers with an error of its own (too many
    /// connections, say) is reachable.
    pub async fn probe(&self, storage: &Storage) -> Result<(), DatabaseFailure> {
        let options = storage.pool().connect_options();
        let attempt = async move {
            let mut connection = options.connect().await?;
            let answered = sqlx::query("SELECT 1").execute(&mut connection).await;
            let _ = connection.close().await;
            answered.map(|_| ())
        };
        match tokio::time::timeout(self.probe_timeout, attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => match DatabaseFailure::of_sqlx(&error) {
                Some(failure) => Err(failure),
                None if matches!(error, sqlx::Error::Database(_)) => Ok(()),
                None => Err(DatabaseFailure::unreachable(
                    "the database did not answer the probe",
                )),
            },
            Err(_) => Err(DatabaseFailure::unreachable(format!(
                "the database did not answer within {} ms",
                self.probe_timeout.as_millis()
            ))),
        }
    }

    /// Spawns the prober: while closed it waits for a reported failure and confirms it;
    /// while open or half-open it probes every `db_probe_interval_ms`.
    pub fn spawn_prober(
        self: &std::sync::Arc<Self>,
        storage: Storage,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let breaker = self.clone();
        tracker.spawn(async move {
            loop {
                let state = breaker.state();
                if state == BreakerState::Closed {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = breaker.suspect.notified() => {}
                    }
                } else {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(breaker.probe_interval) => {}
                    }
                }
                let probed = tokio::select! {
                    _ = cancel.cancelled() => return,
                    probed = breaker.probe(&storage) => probed,
                };
                match (breaker.state(), probed) {
                    (BreakerState::Closed, Ok(())) => {
                        tracing::debug!(
                            "a database failure was reported but the database answers a probe"
                        );
                        // A busy pool can report failures continuously: confirm at most once
                        // an interval, not back to back.
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(breaker.probe_interval) => {}
                        }
                    }
                    (BreakerState::Closed, Err(failure)) => {
                        breaker.note(&failure.reason);
                        breaker.transition(BreakerState::Closed, BreakerState::Open);
                    }
                    (BreakerState::Open, Ok(())) => {
                        breaker.transition(BreakerState::Open, BreakerState::HalfOpen);
                    }
                    (BreakerState::HalfOpen, Ok(())) => {
                        breaker.transition(BreakerState::HalfOpen, BreakerState::Closed);
                    }
                    (BreakerState::Open, Err(failure)) => breaker.note(&failure.reason),
                    (BreakerState::HalfOpen, Err(failure)) => {
                        breaker.note(&failure.reason);
                        breaker.transition(BreakerState::HalfOpen, BreakerState::Open);
                    }
                }
            }
        });
    }
}

/// Paths answered whatever the database does: liveness, readiness and metrics (which say why
/// the database is unavailable), the API documentation (Swagger UI and Redoc) and the web page
/// (which then shows the 503s of its API calls). None of them reads the database.
fn exempt(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json")
        || ["/docs", "/redoc"].iter().any(|p| {
            path == *p
                || path
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        || crate::routes::page::is_page_path(path)
}

/// The breaker middleware: while open, answers 503 `database-unavailable` at once; while a
/// request runs, answers it 503 the moment the breaker opens; reports what the request met.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if exempt(request.uri().path()) {
        return next.run(request).await;
    }
    let breaker = &state.breaker;
    if breaker.is_open() {
        return ApiError::DatabaseUnavailable.into_response();
    }
    // A request already running is left to finish: cancelling it could answer 503 for a
    // command whose append had committed. It meets the database's failure itself (within the
    // pool's acquire timeout) and is answered 503 by the error mapping.
    let response = next.run(request).await;
    match response.extensions().get::<DatabaseFailure>() {
        Some(failure) => breaker.record_failure(failure),
        // Only a success closes a half-open breaker: an error answer (a 404 for an unknown
        // route, say) may never have reached the database.
        None if response.status().is_success() => breaker.record_success(),
        None => {}
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connectivity_errors_are_told_apart_from_others() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(
            DatabaseFailure::of_sqlx(&io).map(|f| f.kind),
            Some(FailureKind::Unreachable)
        );
        assert_eq!(
            DatabaseFailure::of_sqlx(&sqlx::Error::PoolTimedOut).map(|f| f.kind),
            Some(FailureKind::PoolTimedOut)
        );
        assert!(DatabaseFailure::of_sqlx(&sqlx::Error::RowNotFound).is_none());
        // Through anyhow, and through text (a `CommandError::Storage` carries the message).
        let wrapped = anyhow::Error::new(io).context("loading the batch");
        assert!(DatabaseFailure::of_anyhow(&wrapped).is_some());
        let text = commands::CommandError::Storage(
            "error communicating with database: Connection reset by peer (os error 104)".to_owned(),
        );
        let failure = DatabaseFailure::of_anyhow(&anyhow::Error::new(text)).expect("classified");
        assert_eq!(failure.kind, FailureKind::Unreachable);
        let other = anyhow::anyhow!("event at position 3 cannot be read: bad json");
        assert!(DatabaseFailure::of_anyhow(&other).is_none());
    }

    #[test]
    fn docs_health_and_metrics_are_exempt() {
        for path in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/docs",
            "/docs/index.html",
            "/redoc",
            "/redoc/start.js",
            "/",
            "/assets/index-1a2b.js",
        ] {
            assert!(exempt(path), "{path}");
        }
        for path in ["/v1/batches", "/docsx", "/redocx", "/v1/auth/login"] {
            assert!(!exempt(path), "{path}");
        }
    }

    #[test]
    fn transitions_count_openings_and_tell_waiters() {
        let breaker = Breaker::new(&OpsSettings::default());
        let mut changes = breaker.changes.subscribe();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.transition(BreakerState::Closed, BreakerState::Open));
        assert!(!breaker.transition(BreakerState::Closed, BreakerState::Open));
        assert!(breaker.is_open());
        assert_eq!(*changes.borrow_and_update(), BreakerState::Open);
        breaker.record_success();
        assert!(
            breaker.is_open(),
            "a success does not close an open breaker"
        );
        assert!(breaker.transition(BreakerState::Open, BreakerState::HalfOpen));
        breaker.record_failure(&DatabaseFailure::unreachable("reset"));
        assert!(
            breaker.is_open(),
            "a failure while half-open opens it again"
        );
        assert!(breaker.transition(BreakerState::Open, BreakerState::HalfOpen));
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.opened_total(), 2);
        assert_eq!(breaker.report().last_error.as_deref(), Some("reset"));
    }
}
