//! Verification: the live read model compared, row by row, with a fold of the whole log.
//!
//! [`verify`] folds the log from event zero into scratch tables (`<table>__scratch`, with the
//! same [`Worker`] code that keeps the live model) up to the live model's checkpoint, then
//! compares every table of the two in one consistent read: a row only one side has, or a
//! column whose values differ, is a difference. Rows of batches (and teachers) that received
//! events while the comparison ran are left out of the count (`rows_skipped`): the live model
//! moved past the point the fold stopped at. The result is kept in `projection_verifications`
//! (shown by `GET /v1/admin/projections` and `/metrics`), the scratch tables are dropped.
//!
//! "Replay equals live" is then an operational check that can run at any time beside the live
//! model, not only a test.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use commands::checkpoint::ensure_checkpoint;
use commands::{EventLog, LogPosition, Storage};
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::rebuild::create_like;
use crate::worker::{Step, Worker, WorkerOptions, load_checkpoint};
use crate::{Projection, ProjectionError, Scope, Space, Table};

/// How a verification runs.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Events per page of the fold.
    pub page_size: i64,
    /// Differences described in the report (all are counted).
    pub max_reported: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            page_size: 5000,
            max_reported: 50,
        }
    }
}

/// One row that differs between the live model and the fold of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Difference {
    pub table: String,
    /// The row's key columns' values.
    pub key: Vec<String>,
    /// `missing` (the fold has the row, the live model not), `unexpected` (the other way), or
    /// `differs`.
    pub kind: String,
    /// The columns whose values differ, with JSON Pointers (RFC 6901) into a JSON document
    /// column where the difference is (`doc: /status`).
    pub columns: Vec<String>,
}

/// What one verification found.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct VerifyReport {
    pub projection: String,
    /// RFC 3339.
    pub verified_at: String,
    /// The global position of the live checkpoint the fold stopped at.
    pub checkpoint: i64,
    /// Events folded.
    pub events: i64,
    pub rows_compared: i64,
    pub rows_differing: i64,
    /// Differing rows left out because their batch (or teacher) received events while the
    /// comparison ran.
    pub rows_skipped: i64,
    /// The first differences (at most `max_reported`).
    pub differences: Vec<Difference>,
}

/// Folds the whole log into scratch tables up to the live checkpoint, compares them with the
/// live tables row by row, records the report and returns it. `progress` gets the events
/// folded after every page. On PostgreSQL one verification of a projection runs at a time
/// (an advisory lock); a second one waits for the first.
pub async fn verify<P: Projection + Clone>(
    projection: P,
    storage: &Storage,
    options: VerifyOptions,
    mut progress: impl FnMut(u64),
    cancel: &CancellationToken,
) -> Result<VerifyReport, ProjectionError> {
    let name = projection.name();
    let _lock = match storage.engine() {
        commands::Engine::Sqlite => None,
        commands::Engine::Postgres => loop {
            if let Some(lock) = storage.try_lead("essayflow.verify", name).await? {
                break Some(lock);
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(ProjectionError::Injected("cancelled".into())),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        },
    };
    let scratch_checkpoint = Space::Scratch.table(name);
    prepare_scratch(&projection, storage, &scratch_checkpoint).await?;
    let result =
        fold_and_compare(projection.clone(), storage, options, &mut progress, cancel).await;
    drop_scratch(&projection, storage, &scratch_checkpoint).await;
    let report = result?;
    save(storage, &report).await?;
    Ok(report)
}

async fn prepare_scratch<P: Projection>(
    projection: &P,
    storage: &Storage,
    checkpoint: &str,
) -> Result<(), ProjectionError> {
    let _turn = storage.write_turn().await;
    let mut conn = storage.pool().acquire().await?;
    for table in projection.tables() {
        let scratch = Space::Scratch.table(table.name);
        sqlx::query(&format!("DROP TABLE IF EXISTS {scratch}"))
            .execute(&mut *conn)
            .await?;
        create_like(&mut conn, storage.engine(), table, &scratch).await?;
    }
    ensure_checkpoint(storage.pool(), checkpoint).await?;
    sqlx::query(
        "UPDATE projection_checkpoints SET tx = 0, position = 0, events_applied = 0 WHERE name = $1",
    )
    .bind(checkpoint)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn drop_scratch<P: Projection>(projection: &P, storage: &Storage, checkpoint: &str) {
    let _turn = storage.write_turn().await;
    for table in projection.tables() {
        let dropped = sqlx::query(&format!(
            "DROP TABLE IF EXISTS {}",
            Space::Scratch.table(table.name)
        ))
        .execute(storage.pool())
        .await;
        if let Err(error) = dropped {
            tracing::warn!(%error, table = table.name, "could not drop a scratch table");
        }
    }
    let _ = sqlx::query("DELETE FROM projection_checkpoints WHERE name = $1")
        .bind(checkpoint)
        .execute(storage.pool())
        .await;
}

async fn fold_and_compare<P: Projection + Clone>(
    projection: P,
    storage: &Storage,
    options: VerifyOptions,
    progress: &mut impl FnMut(u64),
    cancel: &CancellationToken,
) -> Result<VerifyReport, ProjectionError> {
    let name = projection.name();
    let tables = projection.tables();
    let fold_until = load_checkpoint(storage.pool(), name).await?;
    let worker = Worker::new(
        projection,
        storage,
        WorkerOptions {
            page_size: options.page_size,
            ..WorkerOptions::default()
        },
    )
    .in_space(Space::Scratch);
    let started = Instant::now();
    let mut events = 0u64;
    loop {
        let step = tokio::select! {
            _ = cancel.cancelled() => return Err(ProjectionError::Injected("cancelled".into())),
            step = worker.step_until(fold_until) => step?,
        };
        match step {
            Step::Applied(n) => {
                events += n as u64;
                progress(events);
            }
            Step::Idle => break,
            Step::Superseded => {
                return Err(ProjectionError::Injected(
                    "another verification moved the scratch checkpoint".into(),
                ));
            }
        }
    }
    tracing::debug!(
        projection = name,
        events,
        seconds = started.elapsed().as_secs_f64(),
        "folded for verification"
    );

    let mut tx = crate::docs::snapshot(storage, tables[0].name).await?;
    let live_now: LogPosition = {
        let row = sqlx::query("SELECT tx, position FROM projection_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        LogPosition {
            tx: row.try_get("tx")?,
            position: row.try_get("position")?,
        }
    };
    // What moved on since the fold stopped: those batches' rows (and their teachers') are not
    // comparable.
    let mut moved: HashSet<String> = HashSet::new();
    let log = EventLog::new(storage.clone());
    let mut at = fold_until;
    while at < live_now {
        let page = log.read_after(at, 5000).await?;
        let within = page.partition_point(|e| e.at <= live_now);
        for event in &page[..within] {
            moved.insert(event.batch_id.to_string());
        }
        match page[..within].last() {
            Some(last) => at = last.at,
            None => break,
        }
    }
    let mut moved_owners: HashSet<String> = HashSet::new();
    for table in tables
        .iter()
        .filter(|t| t.key == ["id"] && t.scope == Scope::Batch)
    {
        for id in &moved {
            for space in [Space::Live, Space::Scratch] {
                let owner: Option<String> = sqlx::query_scalar(&format!(
                    "SELECT owner_id FROM {} WHERE id = $1",
                    space.table(table.name)
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                moved_owners.extend(owner);
            }
        }
    }

    let mut report = VerifyReport {
        projection: name.to_owned(),
        verified_at: chrono::Utc::now().to_rfc3339(),
        checkpoint: fold_until.position,
        events: events as i64,
        rows_compared: 0,
        rows_differing: 0,
        rows_skipped: 0,
        differences: Vec::new(),
    };
    for table in tables {
        compare(
            &mut tx,
            table,
            |key: &str| match table.scope {
                Scope::Batch => moved.contains(key),
                Scope::Owner => moved_owners.contains(key),
            },
            options.max_reported,
            &mut report,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// Compares one live table with its scratch copy inside `tx`, adding to `report`.
async fn compare(
    tx: &mut sqlx::AnyConnection,
    table: &Table,
    moved: impl Fn(&str) -> bool,
    max_reported: usize,
    report: &mut VerifyReport,
) -> Result<(), ProjectionError> {
    let scratch = Space::Scratch.table(table.name);
    let text = |side: &str, column: &str| format!("CAST({side}.{column} AS TEXT)");
    let mut columns = Vec::new();
    for column in table.key.iter().chain(table.values) {
        columns.push(text("l", column));
        columns.push(text("s", column));
    }
    let join = table
        .key
        .iter()
        .map(|k| format!("l.{k} = s.{k}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let differs = table
        .values
        .iter()
        .map(|v| format!("l.{v} IS DISTINCT FROM s.{v}"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let first_key = table.key[0];
    let sql = format!(
        "SELECT {} FROM {} AS l FULL OUTER JOIN {scratch} AS s ON {join}
          WHERE l.{first_key} IS NULL OR s.{first_key} IS NULL OR {differs}",
        columns.join(", "),
        table.name
    );
    let mut rows = sqlx::query(&sql).fetch(&mut *tx);
    let width = table.key.len() + table.values.len();
    while let Some(row) = rows.try_next().await? {
        let mut live = Vec::with_capacity(width);
        let mut expected = Vec::with_capacity(width);
        for i in 0..width {
            live.push(row.try_get::<Option<String>, _>(2 * i)?);
            expected.push(row.try_get::<Option<String>, _>(2 * i + 1)?);
        }
        let key: Vec<String> = live[..table.key.len()]
            .iter()
            .zip(&expected[..table.key.len()])
            .map(|(l, e)| l.clone().or_else(|| e.clone()).unwrap_or_default())
            .collect();
        if moved(&key[0]) {
            report.rows_skipped += 1;
            continue;
        }
        report.rows_differing += 1;
        if report.differences.len() >= max_reported {
            continue;
        }
        let (kind, columns) = match (&live[0], &expected[0]) {
            (None, _) => ("missing", Vec::new()),
            (_, None) => ("unexpected", Vec::new()),
            _ => {
                let mut columns = Vec::new();
                for (i, column) in table.values.iter().enumerate() {
                    let (l, e) = (&live[table.key.len() + i], &expected[table.key.len() + i]);
                    if l == e {
                        continue;
                    }
                    columns.extend(describe(column, l.as_deref(), e.as_deref()));
                }
                ("differs", columns)
            }
        };
        report.differences.push(Difference {
            table: table.name.to_owned(),
            key,
            kind: kind.to_owned(),
            columns,
        });
    }
    drop(rows);
    let live: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}", table.name))
        .fetch_one(&mut *tx)
        .await?;
    report.rows_compared += live;
    Ok(())
}

/// A differing column: its name, or for JSON documents each JSON Pointer that differs.
fn describe(column: &str, live: Option<&str>, expected: Option<&str>) -> Vec<String> {
    let parse = |text: Option<&str>| text.and_then(|t| serde_json::from_str(t).ok());
    match (parse(live), parse(expected)) {
        (Some(l @ serde_json::Value::Object(_)), Some(e @ serde_json::Value::Object(_))) => {
            let paths: Vec<String> = json_patch::diff(&l, &e)
                .0
                .iter()
                .map(|op| format!("{column}: {}", op.path()))
                .take(10)
                .collect();
            if paths.is_empty() {
                vec![column.to_owned()]
            } else {
                paths
            }
        }
        _ => vec![column.to_owned()],
    }
}

async fn save(storage: &Storage, report: &VerifyReport) -> Result<(), ProjectionError> {
    let differences = serde_json::to_string(&report.differences).unwrap_or_default();
    sqlx::query(
        "INSERT INTO projection_verifications (name, verified_at, checkpoint, events,
             rows_compared, rows_differing, rows_skipped, differences)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (name) DO UPDATE SET verified_at = excluded.verified_at,
             checkpoint = excluded.checkpoint, events = excluded.events,
             rows_compared = excluded.rows_compared, rows_differing = excluded.rows_differing,
             rows_skipped = excluded.rows_skipped, differences = excluded.differences",
    )
    .bind(&report.projection)
    .bind(&report.verified_at)
    .bind(report.checkpoint)
    .bind(report.events)
    .bind(report.rows_compared)
    .bind(report.rows_differing)
    .bind(report.rows_skipped)
    .bind(differences)
    .execute(storage.pool())
    .await?;
    Ok(())
}

/// The last verification of `name`, if any.
pub async fn last(storage: &Storage, name: &str) -> Result<Option<VerifyReport>, ProjectionError> {
    let row = sqlx::query(
        "SELECT verified_at, checkpoint, events, rows_compared, rows_differing, rows_skipped,
                differences
           FROM projection_verifications WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(storage.pool())
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let differences: String = row.try_get("differences")?;
    Ok(Some(VerifyReport {
        projection: name.to_owned(),
        verified_at: row.try_get("verified_at")?,
        checkpoint: row.try_get("checkpoint")?,
        events: row.try_get("events")?,
        rows_compared: row.try_get("rows_compared")?,
        rows_differing: row.try_get("rows_differing")?,
        rows_skipped: row.try_get("rows_skipped")?,
        differences: serde_json::from_str(&differences).unwrap_or_default(),
    }))
}
