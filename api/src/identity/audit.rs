//! The audit log: who did what, when, from where, and with what outcome. One row per
//! authentication event (`login`, `login.failed`, `refresh.reuse`, `logout`), per
//! administrative action (`user.create`, `user.update`, `user.delete`, `user.password`,
//! `key.create`, `key.rotate`, `key.revoke`, `projection.rebuild`, `projection.verify`), and
//! per refused request (`auth.refused`: 401, no valid credential; `access.denied`: 403, or a
//! 404 answered for someone else's batch), the refusals tallied (see [`Refusals`]). Read with
//! `GET /v1/admin/audit` or `essayflow audit`; the record schema is in docs/audit-log.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;
use sqlx::{AnyPool, Row};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Actor, now_ms, rfc3339};

/// One audit record, as written.
pub struct Record<'a> {
    pub actor: &'a Actor,
    /// A dotted name, for example `user.update`.
    pub action: &'a str,
    /// What it was done to: a user id, a key id, a session id.
    pub target: Option<&'a str>,
    /// `ok`, `refused` or `failed`.
    pub outcome: &'a str,
    /// Anything else worth keeping, as a JSON object.
    pub detail: serde_json::Value,
}

/// Writes a record (in the caller's transaction, when given one).
pub async fn record(
    conn: &mut sqlx::AnyConnection,
    record: &Record<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor_id, actor, action, target, outcome, client, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(now_ms())
    .bind(record.actor.id.as_deref())
    .bind(record.actor.name.as_str())
    .bind(record.action)
    .bind(record.target)
    .bind(record.outcome)
    .bind(record.actor.client.as_deref())
    .bind(record.detail.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes a record on its own (a failed login, a detected reuse).
pub async fn record_alone(pool: &AnyPool, record: &Record<'_>) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    self::record(&mut conn, record).await
}

/// An audit record, as read.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Increasing; pass the last one as `after` for the next page.
    pub id: i64,
    /// RFC 3339, UTC.
    pub at: String,
    pub actor_id: Option<String>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub client: Option<String>,
    pub detail: serde_json::Value,
}

/// Which records to read: newest first, at most `limit`, before id `before`, optionally only
/// one action, actor or outcome, and only records at or after `since` (milliseconds since the
/// Unix epoch).
#[derive(Debug, Default)]
pub struct Filter {
    pub action: Option<String>,
    pub actor: Option<String>,
    pub outcome: Option<String>,
    pub since: Option<i64>,
    pub before: Option<i64>,
    pub limit: i64,
}

/// Reads a page of records, newest first (an index walk on `id`, filtered; `action` and
/// `actor` have their own indexes).
pub async fn list(pool: &AnyPool, filter: &Filter) -> Result<Vec<AuditEntry>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, at, actor_id, actor, action, target, outcome, client, detail FROM audit_log
         WHERE ($1 IS NULL OR action = $1) AND ($2 IS NULL OR actor = $2) AND id < $3
           AND ($5 IS NULL OR outcome = $5) AND at >= $6
         ORDER BY id DESC LIMIT $4",
    )
    .bind(filter.action.as_deref())
    .bind(filter.actor.as_deref())
    .bind(filter.before.unwrap_or(i64::MAX))
    .bind(filter.limit)
    .bind(filter.outcome.as_deref())
    .bind(filter.since.unwrap_or(i64::MIN))
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let detail: String = row.try_get("detail")?;
            Ok(AuditEntry {
                id: row.try_get("id")?,
                at: rfc3339(row.try_get("at")?),
                actor_id: row.try_get("actor_id")?,
                actor: row.try_get("actor")?,
                action: row.try_get("action")?,
                target: row.try_get("target")?,
                outcome: row.try_get("outcome")?,
                client: row.try_get("client")?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            })
        })
        .collect()
}

/// What a refused answer (401, 403, or a 404 that hides someone else's batch) tells the audit
/// layer: set by [`crate::error::ApiError`] as a response extension.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    /// `auth.refused` or `access.denied`.
    pub action: &'static str,
    /// Why, in a few words (the problem's detail, never a credential).
    pub reason: &'static str,
}

/// Who made a request, once known: the [`crate::auth::AuthUser`] extractor fills the slot the
/// audit layer put in the request's extensions, so that a refusal names its actor.
#[derive(Debug, Clone, Default)]
pub struct CallerSlot(Arc<OnceLock<(String, String)>>);

impl CallerSlot {
    /// Records the caller (user id and username); the first one wins.
    pub fn fill(&self, id: String, name: String) {
        let _ = self.0.set((id, name));
    }
}

/// How long refusals are tallied before they are written: one row per distinct
/// (action, actor, client, method, path, status, reason) per window, with its count.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Distinct refusals tallied per window at most; past it, refusals are only counted (and the
/// count written as one `audit.overflow` record), so a flood of distinct refusals costs a
/// bounded number of rows.
pub const MAX_REFUSAL_KEYS: usize = 10_000;

/// The longest request path kept in a refusal record, in bytes.
const MAX_PATH: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RefusalKey {
    action: &'static str,
    reason: &'static str,
    status: u16,
    actor: Option<(String, String)>,
    client: Option<String>,
    method: Method,
    path: String,
}

#[derive(Debug, Clone, Copy)]
struct Tally {
    first_at: i64,
    last_at: i64,
    count: u64,
}

/// Refused requests, tallied in memory and written every [`REFUSAL_WINDOW`] (and at
/// shutdown): noting one costs a map update, never a database write on the request's path, so
/// a flood of bad credentials cannot turn into a flood of writes. The cost per window is at
/// most [`MAX_REFUSAL_KEYS`] + 1 rows.
#[derive(Debug, Default)]
pub struct Refusals {
    tally: Mutex<HashMap<RefusalKey, Tally>>,
    overflow: AtomicU64,
    /// Refusals noted since start (for metrics and tests).
    pub noted: AtomicU64,
}

impl Refusals {
    fn note(&self, key: RefusalKey, at: i64) {
        self.noted.fetch_add(1, Ordering::Relaxed);
        let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        let full = tally.len() >= MAX_REFUSAL_KEYS;
        match tally.get_mut(&key) {
            Some(t) => {
                t.count += 1;
                t.last_at = at;
            }
            None if full => {
                self.overflow.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                tally.insert(
                    key,
                    Tally {
                        first_at: at,
                        last_at: at,
                        count: 1,
                    },
                );
            }
        }
    }

    /// Writes what was tallied (one transaction); on failure the tally is kept for the next
    /// try, merged with what came since.
    pub async fn flush(&self, pool: &AnyPool) -> Result<usize, sqlx::Error> {
        let taken = std::mem::take(&mut *self.tally.lock().unwrap_or_else(|e| e.into_inner()));
        let overflow = self.overflow.swap(0, Ordering::Relaxed);
        if taken.is_empty() && overflow == 0 {
            return Ok(0);
        }
        match write_refusals(pool, &taken, overflow).await {
            Ok(()) => Ok(taken.len() + usize::from(overflow > 0)),
            Err(error) => {
                let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
                for (key, old) in taken {
                    if tally.len() >= MAX_REFUSAL_KEYS && !tally.contains_key(&key) {
                        self.overflow.fetch_add(old.count, Ordering::Relaxed);
                        continue;
                    }
                    let t = tally.entry(key).or_insert(Tally {
                        first_at: old.first_at,
                        last_at: old.last_at,
                        count: 0,
                    });
                    t.count += old.count;
                    t.first_at = t.first_at.min(old.first_at);
                }
                self.overflow.fetch_add(overflow, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// Flushes every [`REFUSAL_WINDOW`] until `cancel`, then once more.
    pub fn spawn_flusher(
        self: &Arc<Self>,
        pool: AnyPool,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let refusals = self.clone();
        tracker.spawn(async move {
            loop {
                let stop = tokio::select! {
                    _ = cancel.cancelled() => true,
                    _ = tokio::time::sleep(REFUSAL_WINDOW) => false,
                };
                if let Err(error) = refusals.flush(&pool).await {
                    tracing::warn!(%error, "could not write refused requests to the audit log; kept for the next try");
                }
                if stop {
                    return;
                }
            }
        });
    }
}

async fn write_refusals(
    pool: &AnyPool,
    taken: &HashMap<RefusalKey, Tally>,
    overflow: u64,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for (key, tally) in taken {
        let (actor_id, actor) = match &key.actor {
            Some((id, name)) => (Some(id.as_str()), name.as_str()),
            None => (None, "anonymous"),
        };
        sqlx::query(
            "INSERT INTO audit_log (at, actor_id, actor, action, target, outcome, client, detail)
             VALUES ($1, $2, $3, $4, $5, 'refused', $6, $7)",
        )
        .bind(tally.first_at)
        .bind(actor_id)
        .bind(actor)
        .bind(key.action)
        .bind(format!("{} {}", key.method, key.path))
        .bind(key.client.as_deref())
        .bind(
            serde_json::json!({
                "status": key.status,
                "reason": key.reason,
                "count": tally.count,
                "first_at": super::rfc3339(tally.first_at),
                "last_at": super::rfc3339(tally.last_at),
            })
            .to_string(),
        )
        .execute(&mut *tx)
        .await?;
    }
    if overflow > 0 {
        sqlx::query(
            "INSERT INTO audit_log (at, actor_id, actor, action, target, outcome, client, detail)
             VALUES ($1, NULL, 'system', 'audit.overflow', NULL, 'failed', NULL, $2)",
        )
        .bind(super::now_ms())
        .bind(
            serde_json::json!({
                "refusals_not_itemised": overflow,
                "max_distinct_per_window": MAX_REFUSAL_KEYS,
            })
            .to_string(),
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// The audit layer (innermost of the edge stack, [`crate::edge::apply`]): notes every answer
/// that carries a [`Refusal`] in the identity's [`Refusals`], with the caller (if known), the
/// connection's peer address, the method and the path (at most 200 bytes). Logins that fail
/// are audited by the login flow itself (`login.failed`), not here.
pub async fn note_refusals(
    axum::extract::State(state): axum::extract::State<crate::state::AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let slot = CallerSlot::default();
    request.extensions_mut().insert(slot.clone());
    let method = request.method().clone();
    // A `Uri` clone shares its bytes; the path is copied only for a refusal.
    let uri = request.uri().clone();
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip().to_string());
    let response = next.run(request).await;
    let Some(refusal) = response.extensions().get::<Refusal>().copied() else {
        return response;
    };
    if method == Method::POST && uri.path() == "/v1/auth/login" {
        return response;
    }
    let mut path = uri.path().to_owned();
    if path.len() > MAX_PATH {
        let mut end = MAX_PATH;
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        path.truncate(end);
    }
    let status: StatusCode = response.status();
    state.identity.refusals().note(
        RefusalKey {
            action: refusal.action,
            reason: refusal.reason,
            status: status.as_u16(),
            actor: slot.0.get().cloned(),
            client,
            method,
            path,
        },
        super::now_ms(),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: String) -> RefusalKey {
        RefusalKey {
            action: "auth.refused",
            reason: "expired",
            status: 401,
            actor: None,
            client: Some("192.0.2.1".to_owned()),
            method: Method::GET,
            path,
        }
    }

    #[test]
    fn the_same_refusal_is_counted_not_repeated() {
        let refusals = Refusals::default();
        for at in 0..1_000 {
            refusals.note(key("/v1/batches".to_owned()), at);
        }
        let tally = refusals.tally.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(tally.len(), 1);
        let t = tally.values().next().copied().expect("one");
        assert_eq!((t.count, t.first_at, t.last_at), (1_000, 0, 999));
    }

    #[test]
    fn distinct_refusals_past_the_bound_are_only_counted() {
        let refusals = Refusals::default();
        for i in 0..MAX_REFUSAL_KEYS + 25 {
            refusals.note(key(format!("/v1/batches/{i}")), 1);
        }
        assert_eq!(
            refusals
                .tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            MAX_REFUSAL_KEYS
        );
        assert_eq!(refusals.overflow.load(Ordering::Relaxed), 25);
        assert_eq!(
            refusals.noted.load(Ordering::Relaxed),
            (MAX_REFUSAL_KEYS + 25) as u64
        );
    }
}
