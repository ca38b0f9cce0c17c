//! cqrs-es's event repository over the engine chosen at run time.
//!
//! Reads delegate to postgres-es or sqlite-es (their repositories are not dyn-compatible, so an
//! enum holds whichever the database URL selected). Appends go through the [`Appender`], which
//! commits the appends of concurrent commands together (group commit) and reports each event's
//! log position through [`RECEIPT`].

use cqrs_es::Aggregate;
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlite_es::SqliteEventRepository;

use crate::appender::{AppendError, Appender};
use crate::log::LogPosition;
use crate::storage::{Storage, TypedPool};

tokio::task_local! {
    /// Set by the command service around a commit: the appended events' log positions.
    pub(crate) static RECEIPT: std::cell::RefCell<Vec<LogPosition>>;
}

enum Reader {
    Postgres(PostgresEventRepository),
    Sqlite(SqliteEventRepository),
}

pub struct EventRepository {
    reader: Reader,
    appender: Appender,
}

impl EventRepository {
    /// Opens the repository and starts its appender tasks; they stop when the repository is
    /// dropped (and with it the last sender).
    pub fn new(storage: &Storage) -> Self {
        let reader = match storage.typed() {
            TypedPool::Postgres(pool) => {
                Reader::Postgres(PostgresEventRepository::new(pool.clone()))
            }
            TypedPool::Sqlite(pool) => Reader::Sqlite(SqliteEventRepository::new(pool.clone())),
        };
        Self {
            reader,
            // SQLite has one writer: more appender tasks would only queue for it.
            appender: Appender::spawn(
                storage.clone(),
                match storage.engine() {
                    crate::Engine::Postgres => 4,
                    crate::Engine::Sqlite => 1,
                },
            ),
        }
    }
}

/// Forwards one call to the selected repository.
macro_rules! delegate {
    ($self:ident, $repo:ident => $call:expr) => {
        match &$self.reader {
            Reader::Postgres($repo) => $call.await,
            Reader::Sqlite($repo) => $call.await,
        }
    };
}

impl EventRepository {
    /// The appender this repository writes through (for appends that build their own
    /// serialized events: [`crate::CommandService::execute_many`]).
    pub fn appender(&self) -> Appender {
        self.appender.clone()
    }
}

impl PersistedEventRepository for EventRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        delegate!(self, repo => repo.get_events::<A>(aggregate_id))
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        delegate!(self, repo => repo.get_last_events::<A>(aggregate_id, last_sequence))
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        delegate!(self, repo => repo.get_snapshot::<A>(aggregate_id))
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if snapshot_update.is_some() {
            return Err(PersistenceError::UnknownError(
                "snapshots are not supported: essayflow runs cqrs-es in event-store mode".into(),
            ));
        }
        match self.appender.append(events.to_vec()).await {
            Ok(positions) => {
                let _ = RECEIPT.try_with(|receipt| *receipt.borrow_mut() = positions);
                Ok(())
            }
            Err(AppendError::Conflict) => Err(PersistenceError::OptimisticLockError),
            Err(error) => Err(PersistenceError::ConnectionError(Box::new(error))),
        }
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        delegate!(self, repo => repo.stream_events::<A>(aggregate_id))
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        delegate!(self, repo => repo.stream_all_events::<A>())
    }
}
