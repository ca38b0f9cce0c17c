//! Rebuilding a projection beside its live model, then swapping the two.
//!
//! A rebuild folds the log from event zero into *shadow* tables (`<table>__shadow`, the same
//! shape as the live ones; see [`Space`]) with the same [`Worker`] code that keeps the live
//! model, while the live model goes on serving queries and streaming changes. The shadow never
//! passes the live model's checkpoint; once it has caught up, one transaction holds the live
//! worker off (by locking its checkpoint row), applies the last few events to the shadow, and
//! renames the shadow tables into place. The retired tables are dropped afterwards.
//!
//! Guarantees:
//! - **No window.** Readers see the old tables until the swap commits and the new ones after:
//!   never nothing, never an older state (both models stand at the same checkpoint at the
//!   swap). On PostgreSQL a reader waits for the (short) swap transaction; on SQLite it reads
//!   its snapshot.
//! - **No gap for live clients.** The live worker's next page applies to the swapped tables
//!   from the same checkpoint. After the swap the feed tells every node to send its clients a
//!   fresh snapshot of the projection's topics ([`crate::Feed::reset`]), so that even a model
//!   whose fold changed is never patched from the old one.
//! - **One at a time, resumable.** A rebuild holds a lease in `projection_rebuilds`, renewed as
//!   it goes. A crash leaves the live model untouched and the shadow with its checkpoint; once
//!   the lease runs out, [`Rebuild::claim`] (an admin, `essayflow replay`, or a server's
//!   [`interrupted`] check) resumes from that checkpoint.

use std::time::{Duration, Instant};

use commands::checkpoint::{advance_checkpoint, ensure_checkpoint};
use commands::{Engine, EventLog, LogPosition, Storage};
use serde::Serialize;
use sqlx::{AnyConnection, Row};
use tokio_util::sync::CancellationToken;

use crate::worker::{Step, Worker, WorkerOptions, load_checkpoint};
use crate::{Feed, Projection, ProjectionError, Space};

/// How a rebuild runs.
#[derive(Debug, Clone, Copy)]
pub struct RebuildOptions {
    /// Events per shadow page.
    pub page_size: i64,
    /// How long a rebuild's claim lasts without being renewed; a rebuild whose process died is
    /// resumed by another once this has passed.
    pub lease: Duration,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            page_size: 5000,
            lease: Duration::from_secs(30),
        }
    }
}

/// Where a rebuild stands, reported after every page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RebuildProgress {
    /// Events folded into the shadow, this run and any earlier run it resumed.
    pub done: u64,
    /// Events up to the live model's checkpoint (it grows while the live model moves on).
    pub total: u64,
    /// Events the shadow already had when this run started (0 unless it resumed).
    pub resumed_from: u64,
    pub elapsed: Duration,
}

impl RebuildProgress {
    /// This run's speed.
    pub fn events_per_second(&self) -> f64 {
        (self.done - self.resumed_from) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The time left at this run's speed, if it has one yet.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.events_per_second();
        (rate > 0.0)
            .then(|| Duration::from_secs_f64(self.total.saturating_sub(self.done) as f64 / rate))
    }
}

/// A projection's current or last rebuild, as `GET /v1/admin/projections` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RebuildStatus {
    /// `building` (the shadow is filling), `done`, or `failed` (see `error`; a new request
    /// resumes it).
    pub state: String,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: Option<String>,
    pub events_done: i64,
    /// Events up to the live model's checkpoint when last reported.
    pub events_total: i64,
    pub events_per_second: i64,
    /// Estimated seconds left, while building.
    pub eta_seconds: Option<f64>,
    pub error: Option<String>,
    /// RFC 3339: until when the process running it holds it; past this, another one resumes it.
    pub lease_until: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("a rebuild of {name} is already running (since {since})")]
    AlreadyRunning { name: String, since: String },
    #[error("the rebuild was stopped before it finished; it resumes when claimed again")]
    Cancelled,
    #[error("another process took the rebuild over")]
    LostLease,
    #[error("readers kept the live tables busy; the swap gave up after {0:?} of tries")]
    Busy(Duration),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

impl From<sqlx::Error> for RebuildError {
    fn from(error: sqlx::Error) -> Self {
        Self::Projection(error.into())
    }
}

impl From<commands::LogError> for RebuildError {
    fn from(error: commands::LogError) -> Self {
        Self::Projection(error.into())
    }
}

/// Whether a swap gave up waiting for a lock (PostgreSQL `lock_not_available`, SQLite busy).
fn is_lock_timeout(error: &RebuildError) -> bool {
    let database = match error {
        RebuildError::Projection(ProjectionError::Database(sqlx::Error::Database(e))) => e,
        _ => return false,
    };
    matches!(
        database.code().as_deref(),
        Some("55P03") | Some("5") | Some("6")
    )
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339())
}

/// A claimed rebuild of one projection: run it with [`Rebuild::run`].
pub struct Rebuild<P> {
    projection: P,
    storage: Storage,
    options: RebuildOptions,
    /// This claim's id: the lease is renewed only while the row still names it.
    owner: String,
    resumed_from: u64,
    /// Events up to the live checkpoint when claimed, and the live model's count then.
    total_at_claim: u64,
    live_applied_at_claim: i64,
}

/// The live checkpoint of `name`, with its count of events applied.
async fn live_checkpoint(
    storage: &Storage,
    name: &str,
) -> Result<(LogPosition, i64), ProjectionError> {
    ensure_checkpoint(storage.pool(), name).await?;
    let row = sqlx::query(
        "SELECT tx, position, events_applied FROM projection_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_one(storage.pool())
    .await?;
    Ok((
        LogPosition {
            tx: row.try_get("tx")?,
            position: row.try_get("position")?,
        },
        row.try_get("events_applied")?,
    ))
}

/// Whether a table exists.
pub(crate) async fn table_exists(
    conn: &mut AnyConnection,
    engine: Engine,
    table: &str,
) -> Result<bool, ProjectionError> {
    let sql = match engine {
        Engine::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables
              WHERE table_schema = current_schema() AND table_name = $1"
        }
        Engine::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
    };
    let n: i64 = sqlx::query_scalar(sql)
        .bind(table)
        .fetch_one(&mut *conn)
        .await?;
    Ok(n > 0)
}

/// Creates `copy`, empty, with the columns and primary key of `live` (`table`), but not its
/// other indexes: a table filled from scratch is filled faster without them, and
/// [`create_indexes_like`] adds them in one pass once it is full.
pub(crate) async fn create_like(
    conn: &mut AnyConnection,
    engine: Engine,
    table: &crate::Table,
    copy: &str,
) -> Result<(), ProjectionError> {
    let live = table.name;
    match engine {
        Engine::Postgres => {
            sqlx::query(&format!(
                "CREATE TABLE {copy} (LIKE {live} INCLUDING DEFAULTS, PRIMARY KEY ({}))",
                table.key.join(", ")
            ))
            .execute(&mut *conn)
            .await?;
        }
        Engine::Sqlite => {
            let corrupt = |reason: &str| ProjectionError::Corrupt {
                key: live.to_owned(),
                reason: reason.to_owned(),
            };
            let sql: String = sqlx::query_scalar(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = $1",
            )
            .bind(live)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| corrupt("no such table"))?;
            // The primary key is part of the table's definition.
            let body = &sql[sql.find('(').ok_or_else(|| corrupt("unexpected schema"))?..];
            sqlx::query(&format!("CREATE TABLE \"{copy}\" {body}"))
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// The definitions of `table`'s indexes other than its primary key, each as the text after
/// `ON <table>` (`USING btree (owner_id, created_position)` on PostgreSQL,
/// `(owner_id, created_position)` on SQLite), whether it is unique, and its name.
async fn secondary_indexes(
    conn: &mut AnyConnection,
    engine: Engine,
    table: &str,
) -> Result<Vec<(String, bool, String)>, ProjectionError> {
    let corrupt = |reason: String| ProjectionError::Corrupt {
        key: table.to_owned(),
        reason,
    };
    let sql = match engine {
        Engine::Postgres => {
            "SELECT ci.relname::text AS name, pg_get_indexdef(i.indexrelid) AS definition
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_class ci ON ci.oid = i.indexrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relname = $1 AND n.nspname = current_schema() AND NOT i.indisprimary
              ORDER BY ci.relname"
        }
        Engine::Sqlite => {
            "SELECT name, sql AS definition FROM sqlite_master
              WHERE type = 'index' AND tbl_name = $1 AND sql IS NOT NULL ORDER BY name"
        }
    };
    let rows = sqlx::query(sql).bind(table).fetch_all(&mut *conn).await?;
    let mut indexes = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get("name")?;
        let definition: String = row.try_get("definition")?;
        let upper = definition.to_ascii_uppercase();
        let unique = upper.trim_start().starts_with("CREATE UNIQUE");
        let rest = match engine {
            Engine::Postgres => upper.find(" USING ").map(|at| &definition[at + 1..]),
            Engine::Sqlite => upper
                .find(" ON ")
                .and_then(|on| definition[on..].find('(').map(|p| &definition[on + p..])),
        };
        let rest = rest.ok_or_else(|| corrupt(format!("unexpected index {definition:?}")))?;
        indexes.push((rest.to_owned(), unique, name));
    }
    Ok(indexes)
}

/// A PostgreSQL table's indexes (its primary key's included) by name, each with its definition
/// after `ON <table>` and whether it is the primary key.
async fn named_indexes(
    conn: &mut AnyConnection,
    table: &str,
) -> Result<Vec<(String, String)>, ProjectionError> {
    let rows = sqlx::query(
        "SELECT ci.relname::text AS name, pg_get_indexdef(i.indexrelid) AS definition,
                i.indisprimary AS primary_key
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indrelid
           JOIN pg_class ci ON ci.oid = i.indexrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relname = $1 AND n.nspname = current_schema()",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let mut indexes = Vec::with_capacity(rows.len());
    for row in rows {
        let definition: String = row.try_get("definition")?;
        let primary: bool = row.try_get("primary_key")?;
        let rest = definition
            .find(" USING ")
            .map(|at| definition[at..].to_owned())
            .unwrap_or_default();
        indexes.push((
            row.try_get("name")?,
            format!("{}{rest}", if primary { "primary" } else { "" }),
        ));
    }
    Ok(indexes)
}

/// Gives `copy` the indexes of `live` other than the primary key, unless it has exactly those
/// already (a resumed rebuild may have made them before); a copy with others (a crash half-way
/// through making them) has them dropped and made again, so no index is ever doubled.
pub(crate) async fn create_indexes_like(
    conn: &mut AnyConnection,
    engine: Engine,
    live: &str,
    copy: &str,
) -> Result<bool, ProjectionError> {
    let wanted = secondary_indexes(conn, engine, live).await?;
    let have = secondary_indexes(conn, engine, copy).await?;
    let definitions = |indexes: &[(String, bool, String)]| {
        let mut definitions: Vec<(String, bool)> =
            indexes.iter().map(|(d, u, _)| (d.clone(), *u)).collect();
        definitions.sort();
        definitions
    };
    if definitions(&wanted) == definitions(&have) {
        return Ok(false);
    }
    for (_, _, name) in &have {
        sqlx::query(&format!("DROP INDEX IF EXISTS {name}"))
            .execute(&mut *conn)
            .await?;
    }
    // Index names are global per schema: each copy's get a suffix of their own.
    let stamp = now_ms();
    for (i, (definition, unique, _)) in wanted.iter().enumerate() {
        let unique = if *unique { "UNIQUE " } else { "" };
        sqlx::query(&format!(
            "CREATE {unique}INDEX IF NOT EXISTS {copy}_i{i}_{stamp} ON {copy} {definition}"
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(true)
}

impl<P: Projection + Clone> Rebuild<P> {
    /// Claims the projection's rebuild: a new one, or the one a dead process left (its shadow
    /// and checkpoint are kept and it goes on from there). Refused while another process holds
    /// an unexpired claim.
    pub async fn claim(
        projection: P,
        storage: &Storage,
        options: RebuildOptions,
    ) -> Result<Self, RebuildError> {
        let name = projection.name();
        let owner = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let stamp = chrono::Utc::now().to_rfc3339();
        sqlx::query(
            "INSERT INTO projection_rebuilds (name, state, started_at, events_total, events_done,
                 events_per_second, owner, lease_until, updated_at)
             VALUES ($1, 'idle', $2, 0, 0, 0, NULL, 0, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(&stamp)
        .execute(storage.pool())
        .await?;
        let claimed = sqlx::query(
            "UPDATE projection_rebuilds
                SET state = 'building', owner = $2, lease_until = $3, started_at = $4,
                    finished_at = NULL, error = NULL, events_per_second = 0, updated_at = $4
              WHERE name = $1 AND (state <> 'building' OR lease_until < $5)",
        )
        .bind(name)
        .bind(&owner)
        .bind(now + options.lease.as_millis() as i64)
        .bind(&stamp)
        .bind(now)
        .execute(storage.pool())
        .await?;
        if claimed.rows_affected() != 1 {
            let since: String =
                sqlx::query_scalar("SELECT started_at FROM projection_rebuilds WHERE name = $1")
                    .bind(name)
                    .fetch_one(storage.pool())
                    .await?;
            return Err(RebuildError::AlreadyRunning {
                name: name.to_owned(),
                since,
            });
        }
        let shadow_checkpoint = Space::Shadow.table(name);
        let mut conn = storage.pool().acquire().await?;
        let mut shadow_complete = true;
        for table in projection.tables() {
            shadow_complete &= table_exists(
                &mut conn,
                storage.engine(),
                &Space::Shadow.table(table.name),
            )
            .await?;
        }
        let resumed: Option<i64> =
            sqlx::query_scalar("SELECT events_applied FROM projection_checkpoints WHERE name = $1")
                .bind(&shadow_checkpoint)
                .fetch_optional(&mut *conn)
                .await?;
        let resumed_from = match resumed {
            Some(done) if shadow_complete => done.max(0) as u64,
            _ => {
                let _turn = storage.write_turn().await;
                // The checkpoint first: a crash before the tables are made leaves it at zero,
                // and a resume then finds them missing and starts afresh.
                ensure_checkpoint(storage.pool(), &shadow_checkpoint).await?;
                sqlx::query(
                    "UPDATE projection_checkpoints SET tx = 0, position = 0, events_applied = 0
                      WHERE name = $1",
                )
                .bind(&shadow_checkpoint)
                .execute(&mut *conn)
                .await?;
                for table in projection.tables() {
                    let shadow = Space::Shadow.table(table.name);
                    sqlx::query(&format!("DROP TABLE IF EXISTS {shadow}"))
                        .execute(&mut *conn)
                        .await?;
                    create_like(&mut conn, storage.engine(), table, &shadow).await?;
                }
                0
            }
        };
        drop(conn);
        let (live, live_applied) = live_checkpoint(storage, name).await?;
        let log = EventLog::new(storage.clone());
        let total = (log.count().await? - log.count_after(live).await?).max(0) as u64;
        let rebuild = Self {
            projection,
            storage: storage.clone(),
            options,
            owner,
            resumed_from,
            total_at_claim: total,
            live_applied_at_claim: live_applied,
        };
        rebuild.report(resumed_from, total, 0).await?;
        tracing::info!(
            projection = name,
            resumed_from,
            events = total,
            "rebuild claimed"
        );
        Ok(rebuild)
    }

    /// How many events this run started from (more than 0 when it resumed a rebuild).
    pub fn resumed_from(&self) -> u64 {
        self.resumed_from
    }

    /// Records progress and renews the lease; fails if another process took the claim.
    async fn report(&self, done: u64, total: u64, rate: i64) -> Result<(), RebuildError> {
        let renewed = sqlx::query(
            "UPDATE projection_rebuilds
                SET events_done = $2, events_total = $3, events_per_second = $4,
                    lease_until = $5, updated_at = $6
              WHERE name = $1 AND owner = $7 AND state = 'building'",
        )
        .bind(self.projection.name())
        .bind(done as i64)
        .bind(total as i64)
        .bind(rate)
        .bind(now_ms() + self.options.lease.as_millis() as i64)
        .bind(chrono::Utc::now().to_rfc3339())
        .bind(&self.owner)
        .execute(self.storage.pool())
        .await?;
        if renewed.rows_affected() == 1 {
            Ok(())
        } else {
            Err(RebuildError::LostLease)
        }
    }

    /// Renews the lease every third of its length until `stop`; sets `lost` (and stops) if
    /// another process holds it.
    fn heartbeat(
        &self,
        lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (storage, name, owner, lease) = (
            self.storage.clone(),
            self.projection.name(),
            self.owner.clone(),
            self.options.lease,
        );
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(lease / 3) => {}
                }
                let renewed = sqlx::query(
                    "UPDATE projection_rebuilds SET lease_until = $3
                      WHERE name = $1 AND owner = $2 AND state = 'building'",
                )
                .bind(name)
                .bind(&owner)
                .bind(now_ms() + lease.as_millis() as i64)
                .execute(storage.pool())
                .await;
                match renewed {
                    Ok(done) if done.rows_affected() == 1 => {}
                    Ok(_) => {
                        lost.store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    // A passing database error: the next beat tries again.
                    Err(error) => tracing::warn!(%error, "could not renew a rebuild's lease"),
                }
            }
        }
    }

    async fn fail(&self, error: &RebuildError) {
        let recorded = sqlx::query(
            "UPDATE projection_rebuilds SET state = 'failed', error = $2, owner = NULL,
                    lease_until = 0, updated_at = $3
              WHERE name = $1 AND owner = $4",
        )
        .bind(self.projection.name())
        .bind(error.to_string())
        .bind(chrono::Utc::now().to_rfc3339())
        .bind(&self.owner)
        .execute(self.storage.pool())
        .await;
        if let Err(error) = recorded {
            tracing::warn!(%error, "could not record a failed rebuild");
        }
    }

    /// Fills the shadow up to the live model, swaps, and tells live clients to take fresh
    /// snapshots (through `feed` in this process; other nodes are notified on PostgreSQL).
    /// Calls `progress` after every page. On cancellation the claim is kept until its lease
    /// runs out, and the rebuild resumes from its checkpoint when claimed again; on a failure
    /// it is recorded as `failed`.
    pub async fn run(
        self,
        feed: Option<&Feed>,
        mut progress: impl FnMut(&RebuildProgress),
        cancel: &CancellationToken,
    ) -> Result<RebuildProgress, RebuildError> {
        let result = self.fill_and_swap(feed, &mut progress, cancel).await;
        match &result {
            Ok(report) => tracing::info!(
                projection = self.projection.name(),
                events = report.done,
                seconds = report.elapsed.as_secs_f64(),
                "rebuild swapped in"
            ),
            Err(RebuildError::Cancelled) => {}
            Err(error) => {
                tracing::error!(projection = self.projection.name(), %error, "rebuild failed");
                self.fail(error).await;
            }
        }
        result
    }

    async fn fill_and_swap(
        &self,
        feed: Option<&Feed>,
        progress: &mut impl FnMut(&RebuildProgress),
        cancel: &CancellationToken,
    ) -> Result<RebuildProgress, RebuildError> {
        let name = self.projection.name();
        let worker = Worker::new(
            self.projection.clone(),
            &self.storage,
            WorkerOptions {
                page_size: self.options.page_size,
                ..WorkerOptions::default()
            },
        )
        .in_space(Space::Shadow);
        let started = Instant::now();
        let mut report = RebuildProgress {
            done: self.resumed_from,
            total: self.total_at_claim.max(self.resumed_from),
            resumed_from: self.resumed_from,
            elapsed: Duration::ZERO,
        };
        let mut reported = Instant::now();
        // Renews the lease on its own, so that a long step (making the indexes, a swap that
        // waits) cannot let it run out; it stops with this run.
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heartbeat = CancellationToken::new();
        let _stop_heartbeat = heartbeat.clone().drop_guard();
        tokio::spawn(self.heartbeat(lost.clone(), heartbeat));
        let mut busy_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            if cancel.is_cancelled() {
                return Err(RebuildError::Cancelled);
            }
            if lost.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(RebuildError::LostLease);
            }
            let (live, live_applied) = live_checkpoint(&self.storage, name).await?;
            let step = tokio::select! {
                _ = cancel.cancelled() => return Err(RebuildError::Cancelled),
                step = worker.step_until(live) => step?,
            };
            report.elapsed = started.elapsed();
            report.total = (self.total_at_claim as i64 + live_applied - self.live_applied_at_claim)
                .max(report.done as i64) as u64;
            match step {
                Step::Applied(n) => report.done += n as u64,
                // Caught up: the shadow gets its secondary indexes in one pass each (then
                // catches up again with what arrived meanwhile), and is swapped in.
                Step::Idle if self.index_shadow().await? => continue,
                Step::Idle => match self.swap(report.done).await {
                    Ok(done) => {
                        report.done = done;
                        break;
                    }
                    // Readers (a long verification, say) held the tables: fill what arrived
                    // meanwhile and try again, for a while.
                    Err(error) if is_lock_timeout(&error) => {
                        let since = *busy_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(300) {
                            return Err(RebuildError::Busy(since.elapsed()));
                        }
                        tracing::info!(projection = name, retry_in = ?backoff, "the live tables are busy; the swap tries again");
                        tokio::select! {
                            _ = cancel.cancelled() => return Err(RebuildError::Cancelled),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    Err(error) => return Err(error),
                },
                Step::Superseded => return Err(RebuildError::LostLease),
            }
            report.total = report.total.max(report.done);
            progress(&report);
            if reported.elapsed() >= self.options.lease / 6 {
                self.report(report.done, report.total, report.events_per_second() as i64)
                    .await?;
                reported = Instant::now();
            }
        }
        if let Some(feed) = feed {
            feed.announce_reset(name);
        }
        report.total = report.done;
        report.elapsed = started.elapsed();
        progress(&report);
        self.drop_retired().await;
        Ok(report)
    }

    /// Creates the shadow tables' secondary indexes if they are missing; whether it did.
    async fn index_shadow(&self) -> Result<bool, RebuildError> {
        let mut conn = self.storage.pool().acquire().await?;
        let mut created = false;
        for table in self.projection.tables() {
            let shadow = Space::Shadow.table(table.name);
            created |=
                create_indexes_like(&mut conn, self.storage.engine(), table.name, &shadow).await?;
        }
        Ok(created)
    }

    /// Holds the live worker off, brings the shadow to the live checkpoint, and renames the
    /// shadow tables into place, in one transaction. Returns the events the new model holds.
    async fn swap(&self, mut done: u64) -> Result<u64, RebuildError> {
        let name = self.projection.name();
        let shadow_checkpoint = Space::Shadow.table(name);
        let log = EventLog::new(self.storage.clone());
        let _turn = self.storage.write_turn().await;
        let mut tx = match self.storage.engine() {
            Engine::Postgres => self.storage.pool().begin().await?,
            Engine::Sqlite => self.storage.pool().begin_with("BEGIN IMMEDIATE").await?,
        };
        let lock = match self.storage.engine() {
            Engine::Postgres => {
                // Short: while the swap waits for a lock, readers queue behind it. It gives up
                // quickly and tries again a little later instead (see `fill_and_swap`).
                sqlx::query("SET LOCAL lock_timeout = '500ms'")
                    .execute(&mut *tx)
                    .await?;
                " FOR UPDATE"
            }
            Engine::Sqlite => "",
        };
        // The live worker's next page waits on this row until the swap has committed.
        let row = sqlx::query(&format!(
            "SELECT tx, position FROM projection_checkpoints WHERE name = $1{lock}"
        ))
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        let live = LogPosition {
            tx: row.try_get("tx")?,
            position: row.try_get("position")?,
        };
        let mut at = load_checkpoint(self.storage.pool(), &shadow_checkpoint).await?;
        loop {
            let mut events = log.read_after(at, self.options.page_size).await?;
            let within = events.partition_point(|e| e.at <= live);
            events.truncate(within);
            let Some(last) = events.last().map(|e| e.at) else {
                break;
            };
            self.projection
                .apply(&mut tx, Space::Shadow, &events, None)
                .await?;
            if !advance_checkpoint(&mut *tx, &shadow_checkpoint, at, last, events.len()).await? {
                return Err(RebuildError::LostLease);
            }
            done += events.len() as u64;
            at = last;
        }
        if self.storage.engine() == Engine::Postgres {
            // The live tables, in the order every reader takes them: a reader holding one of
            // them finishes first, and none can hold a later one while waiting for ours. (A
            // read transaction's first statement touches the first table, so its snapshot is
            // taken after this swap, never before it with the new tables read after.)
            let names: Vec<&str> = self.projection.tables().iter().map(|t| t.name).collect();
            sqlx::query(&format!(
                "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                names.join(", ")
            ))
            .execute(&mut *tx)
            .await?;
        }
        for table in self.projection.tables() {
            let retired = format!("{}__retired", table.name);
            sqlx::query(&format!("DROP TABLE IF EXISTS {retired}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("ALTER TABLE {} RENAME TO {retired}", table.name))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "ALTER TABLE {} RENAME TO {}",
                Space::Shadow.table(table.name),
                table.name
            ))
            .execute(&mut *tx)
            .await?;
        }
        if self.storage.engine() == Engine::Postgres {
            self.rename_indexes(&mut tx).await?;
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE name = $1")
            .bind(&shadow_checkpoint)
            .execute(&mut *tx)
            .await?;
        // A new model: its changes are of a new generation, and patches of the old one never
        // apply to its documents (nor the other way round).
        sqlx::query(
            "UPDATE projection_checkpoints SET events_applied = $2, generation = generation + 1
              WHERE name = $1",
        )
        .bind(name)
        .bind(done as i64)
        .execute(&mut *tx)
        .await?;
        // Other nodes hear of it when (and only if) the swap commits, in commit order with the
        // live changes: a node sends its clients fresh snapshots.
        crate::feed::queue_reset_notification(&mut tx, self.storage.engine(), name).await?;
        let finished = sqlx::query(
            "UPDATE projection_rebuilds
                SET state = 'done', finished_at = $2, events_done = $3, events_total = $3,
                    owner = NULL, lease_until = 0, updated_at = $2
              WHERE name = $1 AND owner = $4",
        )
        .bind(name)
        .bind(chrono::Utc::now().to_rfc3339())
        .bind(done as i64)
        .bind(&self.owner)
        .execute(&mut *tx)
        .await?;
        if finished.rows_affected() != 1 {
            return Err(RebuildError::LostLease);
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Gives the swapped-in tables' indexes the names the old tables' had (PostgreSQL; in the
    /// swap's transaction), so that index names stay those of the migrations. (SQLite cannot
    /// rename an index: there, a rebuilt table's indexes keep their generated names.)
    async fn rename_indexes(&self, tx: &mut AnyConnection) -> Result<(), RebuildError> {
        for table in self.projection.tables() {
            let retired = format!("{}__retired", table.name);
            let old = named_indexes(tx, &retired).await?;
            let new = named_indexes(tx, table.name).await?;
            for (name, definition) in &old {
                sqlx::query(&format!("ALTER INDEX {name} RENAME TO {name}__retired"))
                    .execute(&mut *tx)
                    .await?;
                if let Some((generated, _)) = new.iter().find(|(_, d)| d == definition) {
                    sqlx::query(&format!("ALTER INDEX {generated} RENAME TO {name}"))
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Drops the tables the swap retired (best effort: a leftover is dropped by the next swap).
    async fn drop_retired(&self) {
        let _turn = self.storage.write_turn().await;
        for table in self.projection.tables() {
            let dropped = sqlx::query(&format!("DROP TABLE IF EXISTS {}__retired", table.name))
                .execute(self.storage.pool())
                .await;
            if let Err(error) = dropped {
                tracing::warn!(%error, table = table.name, "could not drop a retired table");
            }
        }
    }
}

/// The current or last rebuild of `name`, if there ever was one.
pub async fn status(
    storage: &Storage,
    name: &str,
) -> Result<Option<RebuildStatus>, ProjectionError> {
    let row = sqlx::query(
        "SELECT state, started_at, finished_at, events_total, events_done, events_per_second,
                error, lease_until
           FROM projection_rebuilds WHERE name = $1 AND state <> 'idle'",
    )
    .bind(name)
    .fetch_optional(storage.pool())
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let state: String = row.try_get("state")?;
    let (done, total, rate): (i64, i64, i64) = (
        row.try_get("events_done")?,
        row.try_get("events_total")?,
        row.try_get("events_per_second")?,
    );
    let lease_until: i64 = row.try_get("lease_until")?;
    let building = state == "building";
    Ok(Some(RebuildStatus {
        eta_seconds: (building && rate > 0).then(|| (total - done).max(0) as f64 / rate as f64),
        lease_until: if building { rfc3339(lease_until) } else { None },
        state,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        events_done: done,
        events_total: total,
        events_per_second: rate,
        error: row.try_get("error")?,
    }))
}

/// The projections whose rebuild was left building by a process that is gone (its lease ran
/// out): claim them to resume.
pub async fn interrupted(storage: &Storage) -> Result<Vec<String>, ProjectionError> {
    Ok(sqlx::query_scalar(
        "SELECT name FROM projection_rebuilds WHERE state = 'building' AND lease_until < $1
          ORDER BY name",
    )
    .bind(now_ms())
    .fetch_all(storage.pool())
    .await?)
}
