//! The audit log: who did what, when, from where, and with what outcome. One row per
//! authentication event (`login`, `login.failed`, `refresh.reuse`, `logout`) and per
//! administrative action (`user.create`, `user.update`, `user.delete`, `user.password`,
//! `key.create`, `key.rotate`, `key.revoke`). Read with `GET /v1/admin/audit` or
//! `essayflow audit`.

use serde::Serialize;
use sqlx::{AnyPool, Row};

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

/// Which records to read: newest first, at most `limit`, before id `before`.
#[derive(Debug, Default)]
pub struct Filter {
    pub action: Option<String>,
    pub actor: Option<String>,
    pub before: Option<i64>,
    pub limit: i64,
}

/// Reads a page of records, newest first.
pub async fn list(pool: &AnyPool, filter: &Filter) -> Result<Vec<AuditEntry>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, at, actor_id, actor, action, target, outcome, client, detail FROM audit_log
         WHERE ($1 IS NULL OR action = $1) AND ($2 IS NULL OR actor = $2) AND id < $3
         ORDER BY id DESC LIMIT $4",
    )
    .bind(filter.action.as_deref())
    .bind(filter.actor.as_deref())
    .bind(filter.before.unwrap_or(i64::MAX))
    .bind(filter.limit)
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
