//! The database: which engine, its pools, its migrations, and the wake-up signal that tells
//! readers of the event log that something was appended.
//!
//! Two pools are kept. cqrs-es's repositories (postgres-es, sqlite-es) need a typed pool; every
//! other query (the event log, read models, users) goes through one `AnyPool`, so that the same
//! SQL serves both engines and engine differences stay in [`Engine`]'s few dialect methods.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AnyPool, Executor, PgPool, SqlitePool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::log::LogPosition;

/// The channel on which appends are announced to other nodes.
const NOTIFY_CHANNEL: &str = "essayflow_events";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    Sqlite,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("unsupported database URL {0:?}: use postgres://... or sqlite:...")]
    UnsupportedUrl(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// How to open the database.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    pub url: String,
    /// Connections for the command path (the typed pool).
    pub max_write_connections: u32,
    /// Connections for reads, projections and everything else (the `AnyPool`).
    pub max_read_connections: u32,
    /// SQLite only: `true` fsyncs the WAL on every append (durable across power loss);
    /// `false` is durable across process crashes only.
    pub sqlite_sync_full: bool,
    /// The longest any pool waits for a connection (an idle one, or a new one being opened)
    /// before failing with `PoolTimedOut`: the bound on how long a request waits when the
    /// database cannot be reached.
    pub acquire_timeout: Duration,
}

impl StorageOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_write_connections: 32,
            max_read_connections: 16,
            sqlite_sync_full: true,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
pub(crate) enum TypedPool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// A connected, migrated database. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    engine: Engine,
    typed: TypedPool,
    any: AnyPool,
    appends: AnyPool,
    /// Wakes readers: bumped by local appends and by other nodes' notifications.
    appended: Arc<watch::Sender<u64>>,
    /// Bumped by local appends only; the announcer relays these to other nodes.
    local_appends: Arc<watch::Sender<u64>>,
    checkpoints: CheckpointBoard,
    /// SQLite only: one writer at a time within this process. SQLite admits one writer anyway,
    /// and a writer that finds the lock taken backs off with sleeps of up to 100 ms; queueing
    /// here instead keeps appends and projection pages from stalling each other.
    write_gate: Option<Arc<tokio::sync::Mutex<()>>>,
}

/// The checkpoints this process's projection workers committed, so that a read waiting for
/// its own write (`min_position`) is woken without asking the database.
#[derive(Clone, Default)]
pub struct CheckpointBoard(Arc<std::sync::Mutex<HashMap<String, watch::Sender<LogPosition>>>>);

impl CheckpointBoard {
    fn sender(&self, name: &str) -> watch::Sender<LogPosition> {
        let mut board = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        board
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(LogPosition::default()).0)
            .clone()
    }

    /// Records that `name` committed everything up to `at`.
    pub fn publish(&self, name: &str, at: LogPosition) {
        self.sender(name).send_if_modified(|current| {
            let newer = at > *current;
            if newer {
                *current = at;
            }
            newer
        });
    }

    pub fn subscribe(&self, name: &str) -> watch::Receiver<LogPosition> {
        self.sender(name).subscribe()
    }
}

/// The URL with its scheme in lower case: schemes are case-insensitive (RFC 3986 section 3.1),
/// so `SQLite:data.db` and `POSTGRES://...` name the same engines as their lower-case forms.
pub fn normalize_scheme(url: &str) -> String {
    match url.split_once(':') {
        Some((scheme, rest))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            format!("{}:{rest}", scheme.to_ascii_lowercase())
        }
        _ => url.to_owned(),
    }
}

impl Storage {
    /// Connects (creating an SQLite file if needed) and runs the migrations.
    pub async fn connect(options: &StorageOptions) -> Result<Self, StorageError> {
        sqlx::any::install_default_drivers();
        let url = normalize_scheme(&options.url);
        let url = url.as_str();
        let (engine, typed) = if url.starts_with("postgres://") || url.starts_with("postgresql://")
        {
            let pool = PgPoolOptions::new()
                .max_connections(options.max_write_connections)
                .acquire_timeout(options.acquire_timeout)
                .connect(url)
                .await?;
            sqlx::migrate!("../migrations/postgres").run(&pool).await?;
            (Engine::Postgres, TypedPool::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let synchronous = if options.sqlite_sync_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            };
            let connect = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(synchronous)
                .busy_timeout(Duration::from_secs(30));
            let pool = SqlitePoolOptions::new()
                .max_connections(options.max_write_connections.min(8))
                .acquire_timeout(options.acquire_timeout)
                .connect_with(connect)
                .await?;
            sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
            (Engine::Sqlite, TypedPool::Sqlite(pool))
        } else {
            return Err(StorageError::UnsupportedUrl(url.to_owned()));
        };
        // Read models and users: on SQLite `synchronous = NORMAL`, which keeps every commit
        // atomic and loses at most the last ones on power loss; a projection then re-applies
        // them, because its rows and its checkpoint always commit together.
        let any = any_pool(url, options.max_read_connections, "NORMAL", false, options).await?;
        // Appends: `FULL` by default, so that a 202 means the events survive power loss. WAL
        // order makes durability monotone: an fsynced append also makes earlier commits durable.
        let append_sync = if options.sqlite_sync_full {
            "FULL"
        } else {
            "NORMAL"
        };
        let appends = any_pool(url, 4, append_sync, true, options).await?;
        Ok(Self {
            engine,
            typed,
            any,
            appends,
            appended: Arc::new(watch::channel(0).0),
            local_appends: Arc::new(watch::channel(0).0),
            checkpoints: CheckpointBoard::default(),
            write_gate: (engine == Engine::Sqlite).then(|| Arc::new(tokio::sync::Mutex::new(()))),
        })
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The pool for everything but cqrs-es's own queries.
    pub fn pool(&self) -> &AnyPool {
        &self.any
    }

    /// The pool the appender writes events through.
    pub(crate) fn appends(&self) -> &AnyPool {
        &self.appends
    }

    pub(crate) fn typed(&self) -> &TypedPool {
        &self.typed
    }

    /// Waits for this process's turn to write (SQLite; PostgreSQL has no such gate). Hold the
    /// guard from `BEGIN` until the commit.
    pub async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.write_gate {
            Some(gate) => Some(gate.clone().lock_owned().await),
            None => None,
        }
    }

    /// This process's projection checkpoints.
    pub fn checkpoints(&self) -> &CheckpointBoard {
        &self.checkpoints
    }

    /// Tells this node's readers that events were appended.
    pub fn announce_append(&self) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
        self.local_appends.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever events were appended (on this node, or on any node
    /// when PostgreSQL is used and [`Storage::spawn_signals`] runs).
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// On PostgreSQL, relays append announcements between nodes: local appends are announced
    /// with `NOTIFY` (coalesced, and outside the append transactions, whose commits would
    /// otherwise serialise on the notification queue lock), and other nodes' are received
    /// with `LISTEN`. Readers keep a polling fallback, so a lost notification only delays them.
    pub fn spawn_signals(&self, cancel: CancellationToken, tracker: &TaskTracker) {
        let TypedPool::Postgres(pool) = &self.typed else {
            return;
        };
        // Notifications carry this process's id, so that it ignores its own echo: its local
        // readers were already woken when the append happened.
        let node_out = uuid::Uuid::new_v4().to_string();
        let node_in = node_out.clone();
        let (pool_out, mut local, token) =
            (pool.clone(), self.local_appends.subscribe(), cancel.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    changed = local.changed() => if changed.is_err() { return },
                }
                if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(NOTIFY_CHANNEL)
                    .bind(node_out.as_str())
                    .execute(&pool_out)
                    .await
                {
                    tracing::warn!(%error, "could not announce appended events");
                }
                // Coalesce bursts: at most a hundred notifications a second.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let (pool_in, sender, token) = (pool.clone(), self.appended.clone(), cancel);
        tracker.spawn(async move {
            while !token.is_cancelled() {
                let mut listener = match PgListener::connect_with(&pool_in).await {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::warn!(%error, "could not listen for appended events; retrying");
                        tokio::select! {
                            _ = token.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                };
                if let Err(error) = listener.listen(NOTIFY_CHANNEL).await {
                    tracing::warn!(%error, "LISTEN failed; retrying");
                    continue;
                }
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        received = listener.recv() => match received {
                            Ok(notification) if notification.payload() == node_in => {}
                            Ok(_) => sender.send_modify(|n| *n = n.wrapping_add(1)),
                            Err(error) => {
                                tracing::warn!(%error, "lost the LISTEN connection; reconnecting");
                                break;
                            }
                        },
                    };
                }
            }
        });
    }

    /// Takes the PostgreSQL advisory lock `(kind, name)` on a dedicated connection, if no other
    /// session holds it: the way one worker of each kind is active across nodes. The lock is
    /// held for as long as the returned connection lives: it is detached from the pool, so
    /// dropping it closes the session and releases the lock.
    pub async fn try_lead(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<sqlx::AnyConnection>, sqlx::Error> {
        let mut connection = self.any.acquire().await?.detach();
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))")
                .bind(kind)
                .bind(name)
                .fetch_one(&mut connection)
                .await?;
        Ok(locked.then_some(connection))
    }

    /// On PostgreSQL, a connection listening on `channel` (its own session, outside the pools'
    /// limits); `None` on SQLite.
    pub async fn listen(&self, channel: &str) -> Result<Option<PgListener>, sqlx::Error> {
        let TypedPool::Postgres(pool) = &self.typed else {
            return Ok(None);
        };
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(channel).await?;
        Ok(Some(listener))
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.any).await.map(|_| ())
    }

    /// Closes both pools.
    pub async fn close(&self) {
        self.any.close().await;
        self.appends.close().await;
        match &self.typed {
            TypedPool::Postgres(pool) => pool.close().await,
            TypedPool::Sqlite(pool) => pool.close().await,
        }
    }
}

/// An `AnyPool`. On SQLite, `synchronous` sets the pragma; on PostgreSQL a pool that need not be
/// `durable` commits without waiting for its WAL flush (`synchronous_commit = off`: a crash can
/// lose its last commits, never corrupt or reorder them). It waits at most
/// `options.acquire_timeout` for a connection.
async fn any_pool(
    url: &str,
    max_connections: u32,
    synchronous: &'static str,
    durable: bool,
    options: &StorageOptions,
) -> Result<AnyPool, sqlx::Error> {
    AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(options.acquire_timeout)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if conn.backend_name() == "SQLite" {
                    conn.execute(
                        format!("PRAGMA synchronous = {synchronous}; PRAGMA busy_timeout = 30000;")
                            .as_str(),
                    )
                    .await?;
                } else if !durable {
                    conn.execute("SET synchronous_commit = off").await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn url_schemes_are_matched_in_any_case() {
        assert_eq!(normalize_scheme("SQLite:data/x.db"), "sqlite:data/x.db");
        assert_eq!(
            normalize_scheme("POSTGRES://User:Pw@Host/Db"),
            "postgres://User:Pw@Host/Db"
        );
        assert_eq!(normalize_scheme("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(normalize_scheme("no scheme here"), "no scheme here");
    }

    #[tokio::test]
    async fn an_upper_case_sqlite_url_connects() {
        let dir = std::env::temp_dir().join(format!("essayflow-scheme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("SQLITE:{}", dir.join("x.db").display());
        let storage = Storage::connect(&StorageOptions::new(url)).await.unwrap();
        assert_eq!(storage.engine(), Engine::Sqlite);
        storage.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
