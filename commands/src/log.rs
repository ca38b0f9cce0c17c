//! The global event log: every event of every batch, in commit order.
//!
//! Readers (projection workers, and later the conductor and the relay) page through it with a
//! [`LogPosition`] checkpoint. On PostgreSQL the order is `(transaction_id, global_position)`
//! and a page never goes past the oldest transaction still running, so an event whose
//! transaction commits late is never skipped; on SQLite (one writer) it is `global_position`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use domain::BatchEvent;
use domain::values::{BatchId, UserId};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

use crate::storage::{Engine, Storage};
use crate::trace::TraceContext;

/// A reader's place in the log: everything at or before it has been read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogPosition {
    /// The PostgreSQL transaction id (xid8) of the event; always 0 on SQLite.
    pub tx: i64,
    /// The event's global position.
    pub position: i64,
}

/// What the command service stamps on every event it appends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub user_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub command: String,
    /// The W3C `traceparent` of the span that issued the command (absent on events stored
    /// before tracing, and when nothing traced the command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that went with it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl EventMetadata {
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            ("correlation_id".to_owned(), self.correlation_id.to_string()),
            ("occurred_at".to_owned(), self.occurred_at.to_rfc3339()),
            ("command".to_owned(), self.command.clone()),
        ]);
        if let Some(causation) = self.causation_id {
            map.insert("causation_id".to_owned(), causation.to_string());
        }
        if let Some(user) = &self.user_id {
            map.insert("user_id".to_owned(), user.clone());
        }
        if let Some(traceparent) = &self.traceparent {
            map.insert("traceparent".to_owned(), traceparent.clone());
        }
        if let Some(tracestate) = &self.tracestate {
            map.insert("tracestate".to_owned(), tracestate.clone());
        }
        map
    }

    /// Stamps `trace` (the context of the span that issued the command) on the event.
    pub fn traced(mut self, trace: Option<&TraceContext>) -> Self {
        if let Some(trace) = trace {
            let (traceparent, tracestate) = trace.to_headers();
            self.traceparent = Some(traceparent);
            self.tracestate = tracestate;
        }
        self
    }

    /// The trace context the event was stamped with, if it has a valid one.
    pub fn trace(&self) -> Option<TraceContext> {
        TraceContext::parse(self.traceparent.as_deref()?, self.tracestate.as_deref())
    }

    pub fn from_json(value: &serde_json::Value) -> Result<Self, LogError> {
        let field = |name: &str| value.get(name).and_then(|v| v.as_str());
        let uuid = |name: &str| field(name).and_then(|s| Uuid::parse_str(s).ok());
        Ok(Self {
            correlation_id: uuid("correlation_id").unwrap_or_default(),
            causation_id: uuid("causation_id"),
            user_id: field("user_id").map(str::to_owned),
            occurred_at: field("occurred_at")
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default(),
            command: field("command").unwrap_or_default().to_owned(),
            traceparent: field("traceparent").map(str::to_owned),
            tracestate: field("tracestate").map(str::to_owned),
        })
    }
}

/// One event as read from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub at: LogPosition,
    pub batch_id: BatchId,
    /// The event's sequence within its batch (1-based): the batch's version after it.
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub event: BatchEvent,
    pub metadata: EventMetadata,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("event at position {position} cannot be read: {reason}")]
    Corrupt { position: i64, reason: String },
}

/// Reads the global event log.
#[derive(Clone)]
pub struct EventLog {
    storage: Storage,
    upcasters: std::sync::Arc<Vec<Box<dyn EventUpcaster>>>,
}

/// Payload bytes after which [`EventLog::read_after`] ends a page early.
pub const PAGE_BYTES: usize = 16 * 1024 * 1024;

/// The most events a status lag counts ([`EventLog::count_after_at_most`] on `/readyz` and
/// `/metrics`): past it a lag is reported as this many, meaning "at least".
pub const LAG_COUNT_LIMIT: i64 = 1_000_000;

/// Payload bytes after which a page of one batch's history (`GET /v1/batches/{id}/events`,
/// [`EventLog::read_batch_page`]) ends early: 4 MiB. An essay may be 100 000 characters and
/// one `EssaysAdded` may carry many, so a count alone would not bound a page.
pub const HISTORY_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// A page of one batch's history, from [`EventLog::read_batch_page`].
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPage {
    /// Events in sequence order, with no gap between them.
    pub events: Vec<StoredEvent>,
    /// Whether the batch had events after the last of `events` when the page was read.
    /// Always `false` when `events` is empty.
    pub more: bool,
}

const COLUMNS: &str = "global_position, aggregate_id, sequence, event_type, event_version";

impl EventLog {
    pub fn new(storage: Storage) -> Self {
        Self {
            storage,
            upcasters: std::sync::Arc::new(crate::upcasters()),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Up to `limit` events after `after`, in log order, and at most about [`PAGE_BYTES`] of
    /// payload (always at least one event), so that a page of large essays cannot exhaust memory.
    pub async fn read_after(
        &self,
        after: LogPosition,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, LogError> {
        let postgres = format!(
            "SELECT {COLUMNS}, transaction_id::text AS tx, payload::text AS payload,
                    metadata::text AS metadata
               FROM events
              WHERE (transaction_id, global_position) > ($1::text::xid8, $2)
                AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY transaction_id, global_position
              LIMIT $3"
        );
        let sqlite = format!(
            "SELECT {COLUMNS}, '0' AS tx, payload, metadata
               FROM events
              WHERE global_position > $1
              ORDER BY global_position
              LIMIT $2"
        );
        let query = match self.storage.engine() {
            Engine::Postgres => sqlx::query(&postgres).bind(after.tx.to_string()),
            Engine::Sqlite => sqlx::query(&sqlite),
        };
        let mut rows = query
            .bind(after.position)
            .bind(limit)
            .fetch(self.storage.pool());
        let mut events = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.try_next().await? {
            let payload: String = row.try_get("payload")?;
            bytes += payload.len();
            events.push(self.decode_with(&row, payload)?);
            if bytes >= PAGE_BYTES {
                break;
            }
        }
        Ok(events)
    }

    /// Every event of one batch, in sequence order, up to `max_sequence` when given.
    pub async fn read_batch(
        &self,
        batch_id: BatchId,
        max_sequence: Option<i64>,
    ) -> Result<Vec<StoredEvent>, LogError> {
        let rows = sqlx::query(&format!(
            "{select}
              WHERE aggregate_type = 'Batch' AND aggregate_id = $1 AND sequence <= $2
              ORDER BY sequence",
            select = self.select_events(),
        ))
        .bind(batch_id.to_string())
        .bind(max_sequence.unwrap_or(i64::MAX))
        .fetch_all(self.storage.pool())
        .await?;
        rows.iter().map(|row| self.decode(row)).collect()
    }

    /// The events of one batch of the given types, in sequence order, up to `max_sequence`
    /// when given: what a reader needs of a long history (the essays, the phases started)
    /// without decoding or transferring the rest.
    pub async fn read_batch_of_types(
        &self,
        batch_id: BatchId,
        max_sequence: Option<i64>,
        types: &[&str],
    ) -> Result<Vec<StoredEvent>, LogError> {
        let types = types
            .iter()
            .filter(|t| BatchEvent::TYPES.contains(t))
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        if types.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&format!(
            "{select}
              WHERE aggregate_type = 'Batch' AND aggregate_id = $1 AND sequence <= $2
                AND event_type IN ({types})
              ORDER BY sequence",
            select = self.select_events(),
        ))
        .bind(batch_id.to_string())
        .bind(max_sequence.unwrap_or(i64::MAX))
        .fetch_all(self.storage.pool())
        .await?;
        rows.iter().map(|row| self.decode(row)).collect()
    }

    /// A page of one batch's history: up to `limit` events with a sequence above `after`, in
    /// sequence order, ending early once the payloads read reach `max_bytes` (stored text,
    /// in bytes; always at least one event, however large). The work is bounded by the page,
    /// not by the batch: rows come by the primary key `(aggregate_type, aggregate_id,
    /// sequence)`, and whether more follow is one more index lookup, made only for a page that
    /// stopped at `limit` or `max_bytes`.
    ///
    /// A batch's sequences have no gaps among committed events (sequence `n + 1` is appended
    /// by a writer that read `n`), so a reader that passes the last sequence of one page as
    /// `after` of the next sees every event once. An `after` at or past the batch's last
    /// sequence, or a batch with no events, gives an empty page.
    pub async fn read_batch_page(
        &self,
        batch_id: BatchId,
        after: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<BatchPage, LogError> {
        let query = format!(
            "{select}
              WHERE aggregate_type = 'Batch' AND aggregate_id = $1 AND sequence > $2
              ORDER BY sequence
              LIMIT $3",
            select = self.select_events(),
        );
        let mut rows = sqlx::query(&query)
            .bind(batch_id.to_string())
            .bind(after)
            .bind(limit)
            .fetch(self.storage.pool());
        let mut events = Vec::new();
        let mut bytes = 0usize;
        let mut full = false;
        while let Some(row) = rows.try_next().await? {
            let payload: String = row.try_get("payload")?;
            bytes += payload.len();
            events.push(self.decode_with(&row, payload)?);
            if bytes >= max_bytes {
                full = true;
                break;
            }
        }
        drop(rows);
        let Some(last) = events.last().map(|e| e.sequence) else {
            return Ok(BatchPage {
                events,
                more: false,
            });
        };
        let more = if full || events.len() as i64 >= limit {
            sqlx::query(
                "SELECT sequence FROM events
                  WHERE aggregate_type = 'Batch' AND aggregate_id = $1 AND sequence > $2
                  ORDER BY sequence
                  LIMIT 1",
            )
            .bind(batch_id.to_string())
            .bind(last)
            .fetch_optional(self.storage.pool())
            .await?
            .is_some()
        } else {
            false
        };
        Ok(BatchPage { events, more })
    }

    /// The owner of a batch, from its first event (`BatchRegistered`, sequence 1): one small
    /// row, whatever the batch's length. `None` when the batch does not exist.
    pub async fn batch_owner(&self, batch_id: BatchId) -> Result<Option<UserId>, LogError> {
        let row = sqlx::query(&format!(
            "{select}
              WHERE aggregate_type = 'Batch' AND aggregate_id = $1 AND sequence = 1",
            select = self.select_events(),
        ))
        .bind(batch_id.to_string())
        .fetch_optional(self.storage.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        match self.decode(&row)? {
            StoredEvent {
                event: BatchEvent::BatchRegistered { owner_id, .. },
                ..
            } => Ok(Some(owner_id)),
            other => Err(LogError::Corrupt {
                position: other.at.position,
                reason: format!(
                    "the first event of batch {batch_id} is {}, not BatchRegistered",
                    other.event_type
                ),
            }),
        }
    }

    /// The log position of one appended event.
    pub async fn position_of(
        &self,
        batch_id: BatchId,
        sequence: i64,
    ) -> Result<Option<LogPosition>, LogError> {
        let row = sqlx::query(&format!(
            "SELECT global_position, {tx} AS tx FROM events
              WHERE aggregate_type = 'Batch' AND aggregate_id = $1 AND sequence = $2",
            tx = self.text_expr("transaction_id", "'0'"),
        ))
        .bind(batch_id.to_string())
        .bind(sequence)
        .fetch_optional(self.storage.pool())
        .await?;
        row.map(|row| position_from_row(&row)).transpose()
    }

    /// The log position of the event at a global position, if it exists.
    pub async fn locate(&self, position: i64) -> Result<Option<LogPosition>, LogError> {
        let row = sqlx::query(&format!(
            "SELECT global_position, {tx} AS tx FROM events WHERE global_position = $1",
            tx = self.text_expr("transaction_id", "'0'"),
        ))
        .bind(position)
        .fetch_optional(self.storage.pool())
        .await?;
        row.map(|row| position_from_row(&row)).transpose()
    }

    /// The number of events in the log.
    pub async fn count(&self) -> Result<i64, LogError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM events")
            .fetch_one(self.storage.pool())
            .await?)
    }

    /// Events after `after` (what a reader at `after` has still to read).
    pub async fn count_after(&self, after: LogPosition) -> Result<i64, LogError> {
        let query = match self.storage.engine() {
            Engine::Postgres => sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM events
                  WHERE (transaction_id, global_position) > ($1::text::xid8, $2)",
            )
            .bind(after.tx.to_string())
            .bind(after.position),
            Engine::Sqlite => sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM events WHERE global_position > $1",
            )
            .bind(after.position),
        };
        Ok(query.fetch_one(self.storage.pool()).await?)
    }

    /// Events after `after`, counted up to `limit` at most (a bounded scan of the rows after
    /// the position, for status pages and metrics): a result of `limit` means "at least".
    pub async fn count_after_at_most(
        &self,
        after: LogPosition,
        limit: i64,
    ) -> Result<i64, LogError> {
        let query = match self.storage.engine() {
            Engine::Postgres => sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM (SELECT 1 FROM events
                  WHERE (transaction_id, global_position) > ($1::text::xid8, $2) LIMIT $3) AS lag",
            )
            .bind(after.tx.to_string())
            .bind(after.position)
            .bind(limit),
            Engine::Sqlite => sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE global_position > $1 LIMIT $2)",
            )
            .bind(after.position)
            .bind(limit),
        };
        Ok(query.fetch_one(self.storage.pool()).await?)
    }

    /// `SELECT <every column decode needs> FROM events`, for reads by batch.
    fn select_events(&self) -> String {
        format!(
            "SELECT {COLUMNS}, {tx} AS tx, {payload} AS payload, {metadata} AS metadata
               FROM events",
            tx = self.text_expr("transaction_id", "'0'"),
            payload = self.text_expr("payload", "payload"),
            metadata = self.text_expr("metadata", "metadata"),
        )
    }

    fn text_expr(&self, pg_column: &str, sqlite_expr: &str) -> String {
        match self.storage.engine() {
            Engine::Postgres => format!("{pg_column}::text"),
            Engine::Sqlite => sqlite_expr.to_owned(),
        }
    }

    fn decode(&self, row: &AnyRow) -> Result<StoredEvent, LogError> {
        let payload: String = row.try_get("payload")?;
        self.decode_with(row, payload)
    }

    fn decode_with(&self, row: &AnyRow, payload: String) -> Result<StoredEvent, LogError> {
        let at = position_from_row(row)?;
        let corrupt = |reason: String| LogError::Corrupt {
            position: at.position,
            reason,
        };
        let aggregate_id: String = row.try_get("aggregate_id")?;
        let batch_id = aggregate_id
            .parse()
            .map_err(|e| corrupt(format!("aggregate id {aggregate_id:?}: {e}")))?;
        let metadata: String = row.try_get("metadata")?;
        let payload: serde_json::Value =
            serde_json::from_str(&payload).map_err(|e| corrupt(e.to_string()))?;
        let metadata: serde_json::Value =
            serde_json::from_str(&metadata).map_err(|e| corrupt(e.to_string()))?;
        let sequence: i64 = row.try_get("sequence")?;
        let mut serialized = SerializedEvent::new(
            aggregate_id,
            sequence as usize,
            "Batch".to_owned(),
            row.try_get("event_type")?,
            row.try_get("event_version")?,
            payload,
            metadata.clone(),
        );
        for upcaster in self.upcasters.iter() {
            if upcaster.can_upcast(&serialized.event_type, &serialized.event_version) {
                serialized = upcaster.upcast(serialized);
            }
        }
        let event: BatchEvent =
            serde_json::from_value(serialized.payload).map_err(|e| corrupt(e.to_string()))?;
        Ok(StoredEvent {
            at,
            batch_id,
            sequence,
            event_type: serialized.event_type,
            event_version: serialized.event_version,
            event,
            metadata: EventMetadata::from_json(&metadata)?,
        })
    }
}

fn position_from_row(row: &AnyRow) -> Result<LogPosition, LogError> {
    let position: i64 = row.try_get("global_position")?;
    let tx: String = row.try_get("tx")?;
    let tx = tx.parse().map_err(|_| LogError::Corrupt {
        position,
        reason: format!("transaction id {tx:?} is not a number"),
    })?;
    Ok(LogPosition { tx, position })
}
