//! The live change feed: what WebSocket clients see (`GET /v1/ws`).
//!
//! A *topic* is one thing a client may watch: `batch:<id>` (the batch's `batch_state` view) or
//! `dashboard:<owner>` (a teacher's dashboard; clients call it `dashboard`). Every change of a
//! topic has a version one above the previous one: for a batch, the batch's version (the
//! sequence of its last event, one change per event); for a dashboard, a counter kept in
//! `live_topics`, one change per committed page that touched the owner. A change carries a
//! JSON Patch (RFC 6902) from the previous version's document to its own, made by the
//! projection from what the page wrote ([`crate::patch`]): its size follows the change, not the
//! topic. [`Feed::snapshot`] gives a topic's whole document at one exact version.
//!
//! Guarantees:
//! - **After commit, never before.** A projection worker writes its changes to `live_changes`
//!   in the transaction that applies the page and moves its checkpoint, and publishes them only
//!   once that transaction has committed: a client never sees a change that a query would not
//!   show, and a rolled-back page shows nothing.
//! - **Every node sees every change.** This process's changes go out on a broadcast channel
//!   ([`Feed::subscribe`]). On PostgreSQL the page id is also sent with `NOTIFY` inside the
//!   transaction (delivered on commit); every other node fetches the page's rows and broadcasts
//!   them in turn. A node that lost its `LISTEN` connection (or whose receiver fell behind)
//!   gets [`FeedEvent::Resync`] and must check its topics against [`Feed::history`].
//! - **Resumable.** `live_changes` keeps each change for the retention period, so a client that
//!   reconnects with the last version it saw gets exactly the changes it missed
//!   ([`Feed::history`]); past the retention it gets a fresh snapshot instead.

use std::sync::Arc;
use std::time::Duration;

use commands::Storage;
use sqlx::{AnyConnection, Row};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ProjectionError;
use crate::docs::placeholders;

/// The PostgreSQL notification channel; the payload is `<node id> <page id>`.
pub const NOTIFY_CHANNEL: &str = "essayflow_live";

/// One change of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `batch:<id>` or `dashboard:<owner>`.
    pub topic: String,
    pub version: i64,
    /// A JSON Patch (RFC 6902) from the topic's document at `version - 1` to its document at
    /// `version`, as JSON text (an array of operations).
    pub patch: String,
    /// The generation of the read model that made it (raised by each rebuild's swap): a patch
    /// applies only to a document of the same generation.
    pub generation: i64,
    /// The W3C trace context of the event that made the change (for a dashboard, the last of
    /// the page's events of that teacher), if it had one: the WebSocket `change` is sent in a
    /// span of that trace. Kept with the change in `live_changes` (its `traceparent` only).
    pub trace: Option<commands::TraceContext>,
}

impl Change {
    /// The topic of a batch.
    pub fn batch_topic(batch_id: &str) -> String {
        format!("batch:{batch_id}")
    }

    /// The topic of a teacher's dashboard.
    pub fn dashboard_topic(owner_id: &str) -> String {
        format!("dashboard:{owner_id}")
    }
}

/// A topic's whole document at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Whose it is (a batch's owner; a dashboard's teacher).
    pub owner_id: String,
    pub version: i64,
    /// The generation of the read model it was read from.
    pub generation: i64,
    /// The document at exactly `version`, as JSON text: applying the changes after `version`
    /// to it, in order, gives each later version's document.
    pub data: String,
}

/// What a feed subscriber receives.
#[derive(Debug, Clone)]
pub enum FeedEvent {
    /// Changes committed together, in order.
    Changes(Arc<[Change]>),
    /// Changes may have been missed (a lost `LISTEN` connection, a receiver that fell behind):
    /// compare every watched topic with the store.
    Resync,
    /// A rebuild replaced this projection's tables: send every watched topic of it afresh (a
    /// snapshot), since its documents may differ from what the old model's patches built.
    Reset(Arc<str>),
}

/// The change feed of this process (cheap to clone).
#[derive(Clone)]
pub struct Feed {
    storage: Storage,
    node: Arc<str>,
    sender: broadcast::Sender<FeedEvent>,
}

/// How long changes are kept for resuming clients, and how often old ones are deleted.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub keep: Duration,
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep: Duration::from_secs(15 * 60),
            every: Duration::from_secs(60),
        }
    }
}

impl Feed {
    /// A feed whose broadcast channel holds `capacity` pages for slow receivers.
    pub fn new(storage: Storage, capacity: usize) -> Self {
        Self {
            storage,
            node: uuid::Uuid::new_v4().to_string().into(),
            sender: broadcast::channel(capacity.max(16)).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.sender.subscribe()
    }

    /// Stores a page's changes inside the projection's transaction and, on PostgreSQL, queues
    /// the notification that other nodes get when the transaction commits.
    pub(crate) async fn record(
        &self,
        conn: &mut AnyConnection,
        changes: &[Change],
    ) -> Result<(), ProjectionError> {
        if changes.is_empty() {
            return Ok(());
        }
        let page = uuid::Uuid::new_v4().to_string();
        let now = chrono::Utc::now().timestamp_millis();
        let runs = runs(changes);
        const COLUMNS: usize = 8;
        for chunk in runs.chunks(200) {
            let values = (0..chunk.len())
                .map(|i| format!("({})", placeholders(1 + i * COLUMNS, COLUMNS)))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO live_changes
                     (page, topic, version, last_version, patches, created_at, generation, traces)
                 VALUES {values} ON CONFLICT (topic, version) DO NOTHING"
            );
            let mut query = sqlx::query(&sql);
            for run in chunk {
                query = query
                    .bind(page.as_str())
                    .bind(run.topic)
                    .bind(run.first)
                    .bind(run.last)
                    .bind(run.patches.as_str())
                    .bind(now)
                    .bind(run.generation)
                    .bind(run.traces());
            }
            query.execute(&mut *conn).await?;
        }
        if self.storage.engine() == commands::Engine::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(format!("{} {page}", self.node))
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// Tells this process's subscribers that `projection`'s tables were replaced by a rebuild
    /// (other nodes hear of it from the swap's own notification; see
    /// [`queue_reset_notification`]).
    pub fn announce_reset(&self, projection: &str) {
        let _ = self.sender.send(FeedEvent::Reset(projection.into()));
    }

    /// Hands committed changes to this process's subscribers.
    pub(crate) fn publish(&self, changes: Vec<Change>) {
        if !changes.is_empty() {
            // No receiver (a worker-only process) is fine: other nodes read the table.
            let _ = self.sender.send(FeedEvent::Changes(changes.into()));
        }
    }

    /// The stored changes of `topic` with versions from `from` to `to` (both included), oldest
    /// first: what is still in the history of that range (it may have gaps where the
    /// retention pruned). Reads only the rows that hold that range.
    pub async fn history(
        &self,
        topic: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<Change>, ProjectionError> {
        let rows = sqlx::query(
            "SELECT topic, version, last_version, patches, generation, traces FROM live_changes
              WHERE topic = $1 AND last_version >= $2 AND version <= $3 ORDER BY version",
        )
        .bind(topic)
        .bind(from)
        .bind(to)
        .fetch_all(self.storage.pool())
        .await?;
        let mut changes = Vec::new();
        for row in &rows {
            changes.extend(
                changes_from(row)?
                    .into_iter()
                    .filter(|c| (from..=to).contains(&c.version)),
            );
        }
        Ok(changes)
    }

    /// A topic's current version and its model's generation, without its document (one small
    /// row); `None` if there is no such topic.
    pub async fn current(&self, topic: &str) -> Result<Option<(i64, i64)>, ProjectionError> {
        let (projection, version) = if let Some(id) = topic.strip_prefix("batch:") {
            let version: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT version FROM {} WHERE id = $1",
                crate::batch_state::TABLE
            ))
            .bind(id)
            .fetch_optional(self.storage.pool())
            .await?;
            match version {
                Some(version) => ("batch_state", version),
                None => return Ok(None),
            }
        } else if topic.starts_with("dashboard:") {
            let version: Option<i64> =
                sqlx::query_scalar("SELECT version FROM live_topics WHERE topic = $1")
                    .bind(topic)
                    .fetch_optional(self.storage.pool())
                    .await?;
            ("dashboard", version.unwrap_or(0))
        } else {
            return Ok(None);
        };
        let generation = generation(self.storage.pool(), projection).await?;
        Ok(Some((version, generation)))
    }

    /// A topic's current document and its exact version; `None` if there is no such topic
    /// (no such batch, or a malformed name).
    ///
    /// Read in one snapshot ([`crate::docs::snapshot`]): the projection writes a topic's rows
    /// and its version in one transaction, so the document is exactly that version's, and the
    /// next change's patch applies to it.
    pub async fn snapshot(&self, topic: &str) -> Result<Option<Snapshot>, ProjectionError> {
        let first_table = if topic.starts_with("batch:") {
            crate::batch_state::TABLE
        } else {
            crate::dashboard::OWNERS
        };
        let mut tx = crate::docs::snapshot(&self.storage, first_table).await?;
        let snapshot = if let Some(id) = topic.strip_prefix("batch:") {
            match crate::queries::batch_json_on(&mut tx, id).await? {
                Some((summary, data)) => Some(Snapshot {
                    owner_id: summary.owner_id,
                    version: summary.version,
                    generation: generation(&mut *tx, "batch_state").await?,
                    data,
                }),
                None => None,
            }
        } else if let Some(owner) = topic.strip_prefix("dashboard:") {
            let dashboard = crate::queries::dashboard_on(&mut tx, owner).await?;
            let version: Option<i64> =
                sqlx::query_scalar("SELECT version FROM live_topics WHERE topic = $1")
                    .bind(topic)
                    .fetch_optional(&mut *tx)
                    .await?;
            Some(Snapshot {
                owner_id: owner.to_owned(),
                version: version.unwrap_or(0),
                generation: generation(&mut *tx, "dashboard").await?,
                data: crate::docs::to_doc(owner, &dashboard)?,
            })
        } else {
            None
        };
        tx.commit().await?;
        Ok(snapshot)
    }

    /// On PostgreSQL, receives other nodes' pages (a node that serves WebSocket clients).
    pub fn spawn_listener(&self, cancel: CancellationToken, tracker: &TaskTracker) {
        if self.storage.engine() == commands::Engine::Postgres {
            tracker.spawn(self.clone().listen(cancel));
        }
    }

    /// Deletes changes older than the retention, now and then (any node may; it is idempotent).
    pub fn spawn_pruner(
        &self,
        retention: Retention,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) {
        tracker.spawn(self.clone().prune(retention, cancel));
    }

    async fn listen(self, cancel: CancellationToken) {
        while !cancel.is_cancelled() {
            let mut listener = match self.storage.listen(NOTIFY_CHANNEL).await {
                Ok(Some(listener)) => listener,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "could not listen for other nodes' live changes; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            // Whatever was notified while we were not listening (before the first connection,
            // or while it was down) is lost: sessions compare their topics with the store.
            let _ = self.sender.send(FeedEvent::Resync);
            loop {
                // `try_recv`, not `recv`: `recv` reconnects by itself and hides the gap.
                let notification = tokio::select! {
                    _ = cancel.cancelled() => return,
                    received = listener.try_recv() => match received {
                        Ok(Some(notification)) => notification,
                        Ok(None) => {
                            tracing::warn!("lost the live-change LISTEN connection; reconnecting");
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "lost the live-change LISTEN connection; reconnecting");
                            break;
                        }
                    },
                };
                let Some((node, page)) = notification.payload().split_once(' ') else {
                    continue;
                };
                if node == &*self.node {
                    continue;
                }
                if let Some(projection) = page.strip_prefix(RESET) {
                    let _ = self.sender.send(FeedEvent::Reset(projection.into()));
                    continue;
                }
                match self.page(page).await {
                    Ok(changes) => self.publish(changes),
                    Err(error) => {
                        tracing::warn!(%error, page, "could not read another node's live changes");
                        let _ = self.sender.send(FeedEvent::Resync);
                    }
                }
            }
        }
    }

    async fn page(&self, page: &str) -> Result<Vec<Change>, ProjectionError> {
        let rows = sqlx::query(
            "SELECT topic, version, last_version, patches, generation, traces FROM live_changes
              WHERE page = $1 ORDER BY id",
        )
        .bind(page)
        .fetch_all(self.storage.pool())
        .await?;
        let mut changes = Vec::new();
        for row in &rows {
            changes.extend(changes_from(row)?);
        }
        Ok(changes)
    }

    async fn prune(self, retention: Retention, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(retention.every) => {}
            }
            let before = chrono::Utc::now().timestamp_millis()
                - i64::try_from(retention.keep.as_millis()).unwrap_or(i64::MAX);
            match sqlx::query("DELETE FROM live_changes WHERE created_at < $1")
                .bind(before)
                .execute(self.storage.pool())
                .await
            {
                Ok(done) if done.rows_affected() > 0 => {
                    tracing::debug!(deleted = done.rows_affected(), "pruned live changes");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "could not prune live changes"),
            }
        }
    }
}

/// The generation of a projection's live model (0 until its first rebuild).
pub(crate) async fn generation<'c, E>(executor: E, projection: &str) -> Result<i64, ProjectionError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    let generation: Option<i64> =
        sqlx::query_scalar("SELECT generation FROM projection_checkpoints WHERE name = $1")
            .bind(projection)
            .fetch_optional(executor)
            .await?;
    Ok(generation.unwrap_or(0))
}

/// The notification payload's prefix for a projection whose tables a rebuild replaced.
const RESET: &str = "reset:";

/// Queues, in the swap's transaction, the notification that tells every node (on PostgreSQL)
/// that `projection`'s tables were replaced; PostgreSQL delivers it only if the swap commits,
/// in commit order with the pages' notifications. (On SQLite there is one node per database
/// file in practice; a process that is not the one swapping learns of it from the new
/// generation of the changes it reads.)
pub(crate) async fn queue_reset_notification(
    conn: &mut AnyConnection,
    engine: commands::Engine,
    projection: &str,
) -> Result<(), ProjectionError> {
    if engine == commands::Engine::Postgres {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(format!("- {RESET}{projection}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// A run of one topic's consecutive changes, as one `live_changes` row stores it.
struct Run<'a> {
    topic: &'a str,
    first: i64,
    last: i64,
    generation: i64,
    /// `[patch, patch, ...]`: the runs' patches, in version order.
    patches: String,
    /// Each change's `traceparent`, in the same order.
    traces: Vec<Option<String>>,
}

impl Run<'_> {
    /// The `traces` column: a JSON array of each change's `traceparent` or `null`; NULL when
    /// no change of the run has one.
    fn traces(&self) -> Option<String> {
        self.traces
            .iter()
            .any(Option::is_some)
            .then(|| serde_json::to_string(&self.traces).unwrap_or_default())
    }
}

fn traceparent(change: &Change) -> Option<String> {
    change.trace.as_ref().map(|t| t.to_headers().0)
}

/// A page's changes as runs: per topic, each stretch of consecutive versions (in the page's
/// order, which is each topic's version order).
fn runs(changes: &[Change]) -> Vec<Run<'_>> {
    let mut runs: Vec<Run<'_>> = Vec::new();
    let mut open: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for change in changes {
        if let Some(&i) = open.get(change.topic.as_str())
            && runs[i].last + 1 == change.version
            && runs[i].generation == change.generation
        {
            let run = &mut runs[i];
            run.last = change.version;
            run.patches.pop();
            run.patches.push(',');
            run.patches.push_str(&change.patch);
            run.patches.push(']');
            run.traces.push(traceparent(change));
            continue;
        }
        open.insert(change.topic.as_str(), runs.len());
        runs.push(Run {
            topic: &change.topic,
            first: change.version,
            last: change.version,
            generation: change.generation,
            patches: format!("[{}]", change.patch),
            traces: vec![traceparent(change)],
        });
    }
    runs
}

/// The changes of one `live_changes` row.
fn changes_from(row: &sqlx::any::AnyRow) -> Result<Vec<Change>, ProjectionError> {
    let topic: String = row.try_get("topic")?;
    let first: i64 = row.try_get("version")?;
    let last: i64 = row.try_get("last_version")?;
    let patches: String = row.try_get("patches")?;
    let generation: i64 = row.try_get("generation")?;
    let traces: Option<String> = row.try_get("traces")?;
    let corrupt = |reason: String| ProjectionError::Corrupt {
        key: format!("{topic}@{first}"),
        reason,
    };
    let patches: Vec<&serde_json::value::RawValue> =
        serde_json::from_str(&patches).map_err(|e| corrupt(e.to_string()))?;
    if patches.len() as i64 != last - first + 1 {
        return Err(corrupt(format!(
            "{} patches for versions {first} to {last}",
            patches.len()
        )));
    }
    // Traces are a diagnostic: an unreadable list only loses them.
    let traces: Vec<Option<String>> = traces
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    Ok(patches
        .into_iter()
        .zip(first..)
        .enumerate()
        .map(|(i, (patch, version))| Change {
            topic: topic.clone(),
            version,
            patch: patch.get().to_owned(),
            generation,
            trace: traces
                .get(i)
                .and_then(Option::as_deref)
                .and_then(|t| commands::TraceContext::parse(t, None)),
        })
        .collect())
}

/// Moves a dashboard topic to its next version with `patch`, returning the change.
pub(crate) async fn next_version(
    conn: &mut AnyConnection,
    topic: String,
    patch: String,
) -> Result<Change, ProjectionError> {
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO live_topics (topic, version) VALUES ($1, 1)
         ON CONFLICT (topic) DO UPDATE SET version = live_topics.version + 1
         RETURNING version",
    )
    .bind(topic.as_str())
    .fetch_one(&mut *conn)
    .await?;
    Ok(Change {
        topic,
        version,
        patch,
        generation: 0,
        trace: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(topic: &str, version: i64) -> Change {
        Change {
            topic: topic.to_owned(),
            version,
            patch: format!(r#"[{{"op":"replace","path":"/version","value":{version}}}]"#),
            generation: 0,
            trace: None,
        }
    }

    #[test]
    fn a_page_is_stored_as_one_run_per_topic_stretch() {
        let page = [
            change("batch:a", 4),
            change("batch:b", 1),
            change("batch:a", 5),
            change("dashboard:u", 9),
            change("batch:a", 6),
        ];
        let runs = runs(&page);
        let shape: Vec<(&str, i64, i64)> =
            runs.iter().map(|r| (r.topic, r.first, r.last)).collect();
        assert_eq!(
            shape,
            [("batch:a", 4, 6), ("batch:b", 1, 1), ("dashboard:u", 9, 9)]
        );
        let patches: Vec<serde_json::Value> =
            serde_json::from_str(&runs[0].patches).unwrap_or_default();
        assert_eq!(patches.len(), 3);
        assert_eq!(patches[2][0]["value"], 6);
    }
}
