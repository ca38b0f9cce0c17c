//! Document tables: the shared shape of every read-model table (see
//! `migrations/*/0002_read_models.sql`): a JSON document per key with the columns queries
//! filter and sort on.

use std::collections::HashMap;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::{AnyConnection, Row};

use crate::ProjectionError;

/// One row of a document table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRow {
    pub id: String,
    pub owner_id: String,
    pub status: String,
    pub created_position: i64,
    pub version: i64,
    pub position: i64,
    pub doc: String,
}

impl DocRow {
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ProjectionError> {
        serde_json::from_str(&self.doc).map_err(|e| ProjectionError::Corrupt {
            key: self.id.clone(),
            reason: e.to_string(),
        })
    }
}

pub(crate) const ROW_COLUMNS: &str =
    "id, owner_id, status, created_position, version, position, doc";

pub(crate) fn row_from(row: &sqlx::any::AnyRow) -> Result<DocRow, sqlx::Error> {
    Ok(DocRow {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        status: row.try_get("status")?,
        created_position: row.try_get("created_position")?,
        version: row.try_get("version")?,
        position: row.try_get("position")?,
        doc: row.try_get("doc")?,
    })
}

/// Rows per statement; keeps every statement well under SQLite's parameter limit.
const CHUNK: usize = 400;

/// `$first, $first+1, ...` for `count` parameters. (sqlx's `QueryBuilder` writes `?` for the
/// Any driver, which PostgreSQL does not accept, so placeholders are numbered here.)
pub(crate) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Loads the rows of `ids` that exist, parsed.
pub(crate) async fn load_many<T: DeserializeOwned>(
    conn: &mut AnyConnection,
    table: &str,
    ids: &[String],
) -> Result<HashMap<String, (DocRow, T)>, ProjectionError> {
    let mut found = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(CHUNK) {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM {table} WHERE id IN ({})",
            placeholders(1, chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_str());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let row = row_from(&row)?;
            let doc = row.parse()?;
            found.insert(row.id.clone(), (row, doc));
        }
    }
    Ok(found)
}

/// Inserts or replaces rows.
pub(crate) async fn upsert_many(
    conn: &mut AnyConnection,
    table: &str,
    rows: &[DocRow],
) -> Result<(), ProjectionError> {
    const COLUMNS: usize = 7;
    for chunk in rows.chunks(CHUNK) {
        let values = (0..chunk.len())
            .map(|i| format!("({})", placeholders(1 + i * COLUMNS, COLUMNS)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO {table} ({ROW_COLUMNS}) VALUES {values}
             ON CONFLICT (id) DO UPDATE SET owner_id = excluded.owner_id,
             status = excluded.status, created_position = excluded.created_position,
             version = excluded.version, position = excluded.position, doc = excluded.doc"
        );
        let mut query = sqlx::query(&sql);
        for row in chunk {
            query = query
                .bind(row.id.as_str())
                .bind(row.owner_id.as_str())
                .bind(row.status.as_str())
                .bind(row.created_position)
                .bind(row.version)
                .bind(row.position)
                .bind(row.doc.as_str());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A value as JSON (for a patch).
pub(crate) fn to_value<T: Serialize>(
    key: &str,
    value: &T,
) -> Result<serde_json::Value, ProjectionError> {
    serde_json::to_value(value).map_err(|e| ProjectionError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Serialises a document.
pub(crate) fn to_doc<T: Serialize>(key: &str, value: &T) -> Result<String, ProjectionError> {
    serde_json::to_string(value).map_err(|e| ProjectionError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// One value of a row written by [`upsert_rows`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cell {
    Text(String),
    Int(i64),
}

/// Inserts `rows` (each with one value per column of `columns`) into `table`, replacing the
/// other columns of a row whose `key` columns exist already. The statements are chunked under
/// SQLite's parameter limit.
pub(crate) async fn upsert_rows(
    conn: &mut AnyConnection,
    table: &str,
    columns: &[&str],
    key: &[&str],
    rows: &[Vec<Cell>],
) -> Result<(), ProjectionError> {
    if rows.is_empty() {
        return Ok(());
    }
    let width = columns.len();
    let updates = columns
        .iter()
        .filter(|c| !key.contains(c))
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let per_statement = (CHUNK * 7 / width).max(1);
    for chunk in rows.chunks(per_statement) {
        let values = (0..chunk.len())
            .map(|i| format!("({})", placeholders(1 + i * width, width)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO {table} ({}) VALUES {values} ON CONFLICT ({}) DO UPDATE SET {updates}",
            columns.join(", "),
            key.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for row in chunk {
            for cell in row {
                query = match cell {
                    Cell::Text(text) => query.bind(text.as_str()),
                    Cell::Int(n) => query.bind(*n),
                };
            }
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A read-only transaction in which every query sees the same committed state (PostgreSQL:
/// `REPEATABLE READ`; SQLite: a read transaction, whose snapshot is taken at its first read).
/// Views put together from several tables are read in one, so that they are whole and of one
/// version.
///
/// On PostgreSQL the transaction first takes `ACCESS SHARE` on `first_table` (the first table,
/// in the order of [`crate::Projection::tables`], of the projection it reads), before any
/// statement takes the snapshot: a rebuild's swap holds `ACCESS EXCLUSIVE` on those tables
/// while it renames them, so a reader either reads before the swap, or waits and then takes
/// its snapshot after the swap committed. Without it, PostgreSQL may take the snapshot first
/// and wait for the lock after, and then read the new tables as they were before the swap's
/// last writes.
pub(crate) async fn snapshot(
    storage: &commands::Storage,
    first_table: &str,
) -> Result<sqlx::Transaction<'static, sqlx::Any>, ProjectionError> {
    Ok(match storage.engine() {
        commands::Engine::Postgres => {
            let mut tx = storage
                .pool()
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?;
            sqlx::query(&format!("LOCK TABLE {first_table} IN ACCESS SHARE MODE"))
                .execute(&mut *tx)
                .await?;
            tx
        }
        commands::Engine::Sqlite => storage.pool().begin().await?,
    })
}
