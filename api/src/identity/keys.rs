//! API keys for service accounts, presented as `X-API-Key: efk_<id>_<secret>`.
//!
//! The id (16 hex characters) is visible: lists show it, logs may name it. The key is shown
//! once, at creation or rotation, and stored only as its SHA-256. A key belongs to a user of
//! the `service` role and acts with that user's rights. Rotation issues a new key and keeps the
//! old one valid for the grace period; revocation stops a key at once (on every node within
//! one identity poll). The last use is recorded at most once a minute per key and node.

use std::time::Duration;

use serde::Serialize;
use sqlx::{AnyPool, Row};

use super::audit::{self, Record};
use super::users::{self, UserStatus};
use super::{Actor, Role, now_ms, random_secret, record_change, rfc3339, token_hash};

/// The prefix of every key.
pub const KEY_PREFIX: &str = "efk_";

/// The id of a presented key, if it has the shape of one.
pub fn parse(key: &str) -> Option<&str> {
    let (id, secret) = key.strip_prefix(KEY_PREFIX)?.split_once('_')?;
    let id_ok = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = (32..=128).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some(id)
}

/// A key, as listed (never with its secret).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    /// The visible id: the key starts with `efk_<id>_`.
    pub id: String,
    pub user_id: String,
    pub username: String,
    pub name: String,
    /// RFC 3339 times; `expires_at` is set on a rotated key (the end of its grace period).
    pub created_at: String,
    pub created_by: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub last_used_at: Option<String>,
    /// The key that replaced this one by rotation.
    pub replaced_by: Option<String>,
}

/// A key just made: the only time its secret is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewApiKey {
    #[serde(flatten)]
    pub info: ApiKey,
    /// The whole key, to send as `X-API-Key`. Shown once.
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no such user")]
    NoUser,
    #[error("API keys belong to users of the service role")]
    NotService,
    #[error("name must be 1 to 100 characters")]
    BadName,
    #[error("no such key")]
    NotFound,
    #[error("the key is revoked, expired or already rotated")]
    Revoked,
    #[error(transparent)]
    Store(#[from] sqlx::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

fn new_key() -> (String, String) {
    use rand::Rng;
    let id: [u8; 8] = rand::rng().random();
    let id = hex::encode(id);
    let key = format!("{KEY_PREFIX}{id}_{}", random_secret());
    (id, key)
}

const SELECT: &str = "SELECT k.id, k.user_id, u.username, k.name, k.created_at, k.created_by,
    k.expires_at, k.revoked_at, k.last_used_at, k.replaced_by
    FROM api_keys k JOIN users u ON u.id = k.user_id";

fn from_row(row: &sqlx::any::AnyRow) -> Result<ApiKey, sqlx::Error> {
    let time = |name: &str| -> Result<Option<String>, sqlx::Error> {
        Ok(row.try_get::<Option<i64>, _>(name)?.map(rfc3339))
    };
    Ok(ApiKey {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        username: row.try_get("username")?,
        name: row.try_get("name")?,
        created_at: rfc3339(row.try_get("created_at")?),
        created_by: row.try_get("created_by")?,
        expires_at: time("expires_at")?,
        revoked_at: time("revoked_at")?,
        last_used_at: time("last_used_at")?,
        replaced_by: row.try_get("replaced_by")?,
    })
}

/// One key by id.
pub async fn get(pool: &AnyPool, id: &str) -> Result<Option<ApiKey>, sqlx::Error> {
    if !users::is_storable(id) {
        return Ok(None);
    }
    let row = sqlx::query(&format!("{SELECT} WHERE k.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// Every key, newest first, at most `limit`.
pub async fn list(pool: &AnyPool, limit: i64) -> Result<Vec<ApiKey>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "{SELECT} ORDER BY k.created_at DESC, k.id LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect()
}

async fn insert(
    conn: &mut sqlx::AnyConnection,
    user_id: &str,
    name: &str,
    actor: &Actor,
) -> Result<(String, String), sqlx::Error> {
    let (id, key) = new_key();
    sqlx::query(
        "INSERT INTO api_keys (id, user_id, name, key_hash, created_at, created_by)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(user_id)
    .bind(name)
    .bind(token_hash(&key))
    .bind(now_ms())
    .bind(&actor.name)
    .execute(conn)
    .await?;
    Ok((id, key))
}

/// Creates a key for the service user `user_id` (audited as `key.create`).
pub async fn create(
    pool: &AnyPool,
    actor: &Actor,
    user_id: &str,
    name: &str,
) -> Result<NewApiKey, KeyError> {
    // 1 to 100 characters, not blank, no U+0000 (the published schema says the same).
    if name.trim().is_empty() || name.chars().count() > 100 || name.contains('\0') {
        return Err(KeyError::BadName);
    }
    let user = users::get(pool, user_id).await?.ok_or(KeyError::NoUser)?;
    if user.status == UserStatus::Deleted {
        return Err(KeyError::NoUser);
    }
    if user.role != Role::Service {
        return Err(KeyError::NotService);
    }
    let mut tx = pool.begin().await?;
    let (id, key) = insert(&mut tx, user_id, name, actor).await?;
    audit::record(
        &mut tx,
        &Record {
            actor,
            action: "key.create",
            target: Some(&id),
            outcome: "ok",
            detail: serde_json::json!({ "user_id": user_id, "username": user.username, "name": name }),
        },
    )
    .await?;
    tx.commit().await?;
    let info = get(pool, &id).await?.ok_or(KeyError::NotFound)?;
    Ok(NewApiKey { info, key })
}

/// Replaces key `id` with a new one of the same user and name; the old key keeps working for
/// `grace` (audited as `key.rotate`).
pub async fn rotate(
    pool: &AnyPool,
    actor: &Actor,
    id: &str,
    grace: Duration,
) -> Result<NewApiKey, KeyError> {
    let old = get(pool, id).await?.ok_or(KeyError::NotFound)?;
    if old.revoked_at.is_some() || old.replaced_by.is_some() {
        return Err(KeyError::Revoked);
    }
    // A key past its grace period, or of a user who may no longer hold keys, is not renewed.
    let expired = sqlx::query("SELECT expires_at FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await?
        .try_get::<Option<i64>, _>("expires_at")?
        .is_some_and(|at| at <= now_ms());
    if expired {
        return Err(KeyError::Revoked);
    }
    let user = users::get(pool, &old.user_id)
        .await?
        .ok_or(KeyError::NoUser)?;
    if user.status != UserStatus::Active {
        return Err(KeyError::NoUser);
    }
    if user.role != Role::Service {
        return Err(KeyError::NotService);
    }
    let mut tx = pool.begin().await?;
    let (new_id, key) = insert(&mut tx, &old.user_id, &old.name, actor).await?;
    let ends = now_ms() + grace.as_millis() as i64;
    // Conditional: of two concurrent rotations of one key, one wins; the other rolls back.
    let replaced = sqlx::query(
        "UPDATE api_keys SET replaced_by = $1,
                expires_at = CASE WHEN expires_at IS NULL OR expires_at > $2 THEN $2 ELSE expires_at END
         WHERE id = $3 AND replaced_by IS NULL AND revoked_at IS NULL",
    )
    .bind(&new_id)
    .bind(ends)
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if replaced == 0 {
        return Err(KeyError::Revoked);
    }
    audit::record(
        &mut tx,
        &Record {
            actor,
            action: "key.rotate",
            target: Some(id),
            outcome: "ok",
            detail: serde_json::json!({ "replaced_by": new_id, "grace_seconds": grace.as_secs() }),
        },
    )
    .await?;
    record_change(&mut tx, &old.user_id).await?;
    tx.commit().await?;
    let info = get(pool, &new_id).await?.ok_or(KeyError::NotFound)?;
    Ok(NewApiKey { info, key })
}

/// Revokes key `id` at once (audited as `key.revoke`); revoking a revoked key changes nothing.
pub async fn revoke(pool: &AnyPool, actor: &Actor, id: &str) -> Result<ApiKey, KeyError> {
    let key = get(pool, id).await?.ok_or(KeyError::NotFound)?;
    let mut tx = pool.begin().await?;
    let changed =
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if changed > 0 {
        audit::record(
            &mut tx,
            &Record {
                actor,
                action: "key.revoke",
                target: Some(id),
                outcome: "ok",
                detail: serde_json::json!({ "user_id": key.user_id, "name": key.name }),
            },
        )
        .await?;
        record_change(&mut tx, &key.user_id).await?;
    }
    tx.commit().await?;
    get(pool, id).await?.ok_or(KeyError::NotFound)
}

/// Records a key's last use.
pub async fn touch(pool: &AnyPool, id: &str, at: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
        .bind(at)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_the_shape_of_a_key_parses() {
        let (id, key) = new_key();
        assert_eq!(parse(&key), Some(id.as_str()));
        assert_eq!(key.len(), 4 + 16 + 1 + 43);
        for bad in [
            "",
            "efk_",
            "efk_0123456789abcdef",
            "efk_0123456789abcdef_short",
            "efk_0123456789abcdeg_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "EFK_0123456789abcdef_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "efk_0123456789abcdef_aaaaaaaaaaaaaaaaaaaaaaa\0aaaaaaaaaaaaaaaaaaa",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
