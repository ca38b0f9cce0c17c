//! Group commit for appends.
//!
//! Every command's events used to be one transaction of their own: on PostgreSQL four round
//! trips and a WAL flush per command, on SQLite an fsync per command. The appender instead
//! collects the appends that are waiting at the same moment and writes them in one transaction
//! with one multi-row `INSERT ... ON CONFLICT DO NOTHING RETURNING`:
//!
//! - An append whose every event was inserted succeeded; its events' log positions come back in
//!   the same statement (so the consistency token costs no extra query).
//! - An append with any event not inserted lost an optimistic-concurrency race (another command
//!   appended the same sequence number first, possibly in the same statement). Rows it did
//!   insert are deleted before the commit, so an append is all or nothing, and it reports
//!   [`AppendError::Conflict`]; the command service reloads and decides again.
//! - A database error fails every append of that transaction; nothing of it is visible.
//!
//! The append answers only after the commit, so a 202 still means "durable".

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cqrs_es::persist::SerializedEvent;
use sqlx::{Acquire, Row};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::log::LogPosition;
use crate::storage::{Engine, Storage};

/// Appends taken into one transaction at most.
const MAX_BATCH: usize = 256;
/// Events per INSERT statement (8 parameters each; SQLite allows 32 766).
const MAX_ROWS: usize = 1000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    #[error("another command appended to the same batch first")]
    Conflict,
    #[error("the event store failed: {0}")]
    Database(String),
    #[error("the appender is shut down")]
    Closed,
}

struct Request {
    events: Vec<SerializedEvent>,
    reply: oneshot::Sender<Result<Vec<LogPosition>, AppendError>>,
}

/// The handle that command paths append through. Cheap to clone.
#[derive(Clone)]
pub struct Appender {
    sender: mpsc::Sender<Request>,
}

impl Appender {
    /// Starts `writers` appender tasks: while one transaction commits, the next can be filled.
    /// They stop once every handle is dropped and the queue is drained.
    pub fn spawn(storage: Storage, writers: usize) -> Self {
        let (sender, receiver) = mpsc::channel::<Request>(4096);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            let (storage, receiver) = (storage.clone(), receiver.clone());
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut receiver = receiver.lock().await;
                        let Some(first) = receiver.recv().await else {
                            return;
                        };
                        let mut batch = vec![first];
                        while batch.len() < MAX_BATCH {
                            match receiver.try_recv() {
                                Ok(next) => batch.push(next),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    write_batch(&storage, batch).await;
                }
            });
        }
        Self { sender }
    }

    /// Appends one command's events (all of one batch, consecutive sequences) atomically.
    pub async fn append(
        &self,
        events: Vec<SerializedEvent>,
    ) -> Result<Vec<LogPosition>, AppendError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request { events, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        answer.await.map_err(|_| AppendError::Closed)?
    }
}

async fn write_batch(storage: &Storage, batch: Vec<Request>) {
    match insert_all(storage, &batch).await {
        Ok(outcomes) => {
            for (request, outcome) in batch.into_iter().zip(outcomes) {
                let _ = request.reply.send(outcome);
            }
        }
        Err(error) if is_transient(&error) => {
            // A deadlock or serialization failure rolled everything back: each command
            // reloads and tries again, as after any conflict.
            tracing::debug!(error = %error, appends = batch.len(), "append group rolled back; retrying as conflicts");
            for request in batch {
                let _ = request.reply.send(Err(AppendError::Conflict));
            }
        }
        Err(error) => {
            tracing::error!(error = %error, appends = batch.len(), "appending events failed");
            let error = AppendError::Database(error.to_string());
            for request in batch {
                let _ = request.reply.send(Err(error.clone()));
            }
        }
    }
}

/// Deadlock (40P01), serialization failure (40001), or SQLite busy/locked.
fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => matches!(
            e.code().as_deref(),
            Some("40P01" | "40001" | "5" | "6" | "517")
        ),
        _ => false,
    }
}

type Key = (String, i64);

async fn insert_all(
    storage: &Storage,
    batch: &[Request],
) -> Result<Vec<Result<Vec<LogPosition>, AppendError>>, sqlx::Error> {
    let engine = storage.engine();
    let _turn = storage.write_turn().await;
    let mut conn = storage.appends().acquire().await?;
    let mut tx = conn.begin().await?;
    // Two appends of one transaction may claim the same (batch, sequence): RETURNING could not
    // tell which of them got the row, so every claim after the first is a conflict up front.
    let mut claimed: HashSet<(&str, usize)> = HashSet::new();
    let mut contested = vec![false; batch.len()];
    for (i, request) in batch.iter().enumerate() {
        let keys: Vec<(&str, usize)> = request
            .events
            .iter()
            .map(|e| (e.aggregate_id.as_str(), e.sequence))
            .collect();
        if keys.iter().any(|k| claimed.contains(k)) {
            contested[i] = true;
        } else {
            claimed.extend(keys);
        }
    }
    let mut rows: Vec<&SerializedEvent> = batch
        .iter()
        .zip(&contested)
        .filter(|(_, contested)| !**contested)
        .flat_map(|(r, _)| r.events.iter())
        .collect();
    // Concurrent transactions (other appender tasks, other nodes) inserting the same keys wait
    // for each other; taking the keys in one global order means they cannot deadlock.
    rows.sort_unstable_by(|a, b| (&a.aggregate_id, a.sequence).cmp(&(&b.aggregate_id, b.sequence)));
    let mut inserted: HashMap<Key, LogPosition> = HashMap::with_capacity(rows.len());
    for chunk in rows.chunks(MAX_ROWS) {
        let (payload, metadata) = match engine {
            Engine::Postgres => ("::json", "::json"),
            Engine::Sqlite => ("", ""),
        };
        let values = (0..chunk.len())
            .map(|i| {
                let p = i * 7;
                format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}{payload}, ${}{metadata})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5,
                    p + 6,
                    p + 7
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let returning = match engine {
            Engine::Postgres => {
                "aggregate_id, sequence, global_position, transaction_id::text AS tx"
            }
            Engine::Sqlite => "aggregate_id, sequence, rowid AS global_position, '0' AS tx",
        };
        let sql = format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES {values}
             ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING
             RETURNING {returning}"
        );
        let mut query = sqlx::query(&sql);
        for event in chunk {
            query = query
                .bind(event.aggregate_type.as_str())
                .bind(event.aggregate_id.as_str())
                .bind(event.sequence as i64)
                .bind(event.event_type.as_str())
                .bind(event.event_version.as_str())
                .bind(event.payload.to_string())
                .bind(event.metadata.to_string());
        }
        for row in query.fetch_all(&mut *tx).await? {
            let tx_id: String = row.try_get("tx")?;
            inserted.insert(
                (row.try_get("aggregate_id")?, row.try_get("sequence")?),
                LogPosition {
                    tx: tx_id.parse().unwrap_or_default(),
                    position: row.try_get("global_position")?,
                },
            );
        }
    }
    if engine == Engine::Sqlite && !inserted.is_empty() {
        // The trigger numbers rows after RETURNING has reported them: read the numbers back.
        let rowids: Vec<i64> = inserted.values().map(|p| p.position).collect();
        let mut by_rowid = HashMap::with_capacity(rowids.len());
        for chunk in rowids.chunks(MAX_ROWS) {
            let list = (1..=chunk.len())
                .map(|n| format!("${n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql =
                format!("SELECT rowid AS r, global_position FROM events WHERE rowid IN ({list})");
            let mut query = sqlx::query(&sql);
            for rowid in chunk {
                query = query.bind(*rowid);
            }
            for row in query.fetch_all(&mut *tx).await? {
                by_rowid.insert(
                    row.try_get::<i64, _>("r")?,
                    row.try_get::<i64, _>("global_position")?,
                );
            }
        }
        for position in inserted.values_mut() {
            position.position = by_rowid
                .get(&position.position)
                .copied()
                .unwrap_or_default();
        }
    }

    let mut outcomes = Vec::with_capacity(batch.len());
    let mut undo: Vec<Key> = Vec::new();
    for (request, contested) in batch.iter().zip(contested) {
        if contested {
            outcomes.push(Err(AppendError::Conflict));
            continue;
        }
        let keys: Vec<Key> = request
            .events
            .iter()
            .map(|e| (e.aggregate_id.clone(), e.sequence as i64))
            .collect();
        let positions: Vec<Option<LogPosition>> =
            keys.iter().map(|k| inserted.get(k).copied()).collect();
        if positions.iter().all(Option::is_some) {
            outcomes.push(Ok(positions.into_iter().flatten().collect()));
        } else {
            undo.extend(keys.into_iter().filter(|k| inserted.contains_key(k)));
            outcomes.push(Err(AppendError::Conflict));
        }
    }
    for (aggregate_id, sequence) in &undo {
        sqlx::query("DELETE FROM events WHERE aggregate_type = 'Batch' AND aggregate_id = $1 AND sequence = $2")
            .bind(aggregate_id.as_str())
            .bind(*sequence)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if outcomes.iter().any(Result::is_ok) {
        storage.announce_append();
    }
    Ok(outcomes)
}
