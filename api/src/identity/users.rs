//! Users: creation, lookup, and the administrative changes (status, role, password, delete),
//! each in one transaction with its audit record and its identity-change row.

use std::sync::LazyLock;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use domain::values::UserId;
use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row};

use super::audit::{self, Record};
use super::{Actor, Hasher, HashingLimits, Role, now_ms, record_change, rfc3339};

/// A user's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    /// Cannot log in or use any token or key; can be enabled again.
    Disabled,
    /// Gone for good: the row stays so that its batches keep their owner and the username is
    /// never reused.
    Deleted,
}

impl UserStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "disabled" => Some(Self::Disabled),
            "deleted" => Some(Self::Deleted),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Deleted => "deleted",
        }
    }
}

/// A stored user.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct User {
    /// UUID.
    #[schema(value_type = String)]
    pub id: UserId,
    pub username: String,
    pub role: Role,
    pub status: UserStatus,
    /// Raised by every change that takes access away; access tokens of an older one fail.
    pub token_version: i64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; absent when never changed.
    pub updated_at: Option<String>,
    /// The rate-limit tier (docs/rate-limits.md); `null`: the configured default tier (as is
    /// a tier that is no longer configured).
    pub tier: Option<String>,
    #[serde(skip)]
    pub(super) password_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("username must be 1 to 64 characters of letters, digits, '.', '_' or '-'")]
    InvalidUsername,
    #[error("password must be 8 to 1024 characters")]
    WeakPassword,
    #[error("user {0} already exists")]
    Exists(String),
    #[error("no such user")]
    NotFound,
    #[error("a deleted user cannot be changed")]
    Deleted,
    #[error("the user changed meanwhile; read it again and retry")]
    Concurrent,
    #[error("this is the last active admin: make another admin first")]
    LastAdmin,
    #[error(transparent)]
    Busy(#[from] super::HashError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<sqlx::Error> for UserError {
    fn from(error: sqlx::Error) -> Self {
        Self::Other(error.into())
    }
}

/// Whether a username has the allowed shape (and so can be stored and looked up).
pub fn valid_username(username: &str) -> bool {
    (1..=64).contains(&username.len())
        && username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Whether a string can be stored in, or compared with, a text column on every engine
/// (PostgreSQL refuses U+0000 in `text`). Every identifier that reaches a query from outside
/// passes this first; one that does not is unknown, never an error.
pub fn is_storable(s: &str) -> bool {
    !s.contains('\0') && s.len() <= 256
}

fn check_password(password: &str) -> Result<(), UserError> {
    if (8..=1024).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(UserError::WeakPassword)
    }
}

/// The hashing pool of code that runs without a server (the CLI, tests' setup).
static STANDALONE: LazyLock<Hasher> = LazyLock::new(|| {
    Hasher::new(HashingLimits {
        workers: 2,
        queue: 1024,
        deadline: Duration::from_secs(60),
        memory_kib: argon2::Params::DEFAULT_M_COST,
        iterations: argon2::Params::DEFAULT_T_COST,
        lanes: argon2::Params::DEFAULT_P_COST,
    })
    .expect("default argon2 parameters")
});

/// Adds a user with the default hashing cost (the CLI's `users add`, tests); audited as the
/// command line.
pub async fn add_user(
    pool: &AnyPool,
    username: &str,
    role: Role,
    password: &str,
) -> Result<User, UserError> {
    create(pool, &STANDALONE, &Actor::cli(), username, role, password).await
}

/// Creates a user (audited as `user.create`).
pub async fn create(
    pool: &AnyPool,
    hasher: &Hasher,
    actor: &Actor,
    username: &str,
    role: Role,
    password: &str,
) -> Result<User, UserError> {
    if !valid_username(username) {
        return Err(UserError::InvalidUsername);
    }
    check_password(password)?;
    let hash = hasher.hash(password.to_owned()).await?;
    let user = User {
        id: UserId::new(),
        username: username.to_owned(),
        role,
        status: UserStatus::Active,
        token_version: 1,
        created_at: Utc::now().to_rfc3339(),
        updated_at: None,
        tier: None,
        password_hash: hash,
    };
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, username, role, password_hash, created_at, status, token_version, updated_at)
         VALUES ($1, $2, $3, $4, $5, 'active', 1, 0) ON CONFLICT (username) DO NOTHING",
    )
    .bind(user.id.to_string())
    .bind(&user.username)
    .bind(role.as_str())
    .bind(&user.password_hash)
    .bind(&user.created_at)
    .execute(&mut *tx)
    .await
    .context("storing a user")?;
    if inserted.rows_affected() == 0 {
        return Err(UserError::Exists(username.to_owned()));
    }
    audit::record(
        &mut tx,
        &Record {
            actor,
            action: "user.create",
            target: Some(&user.id.to_string()),
            outcome: "ok",
            detail: serde_json::json!({ "username": username, "role": role.as_str() }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(user)
}

const COLUMNS: &str =
    "id, username, role, status, token_version, created_at, updated_at, tier, password_hash";

fn from_row(row: &sqlx::any::AnyRow) -> anyhow::Result<User> {
    let id: String = row.try_get("id")?;
    let role: String = row.try_get("role")?;
    let status: String = row.try_get("status")?;
    let updated: i64 = row.try_get("updated_at")?;
    Ok(User {
        id: id.parse().context("user id")?,
        username: row.try_get("username")?,
        role: Role::parse(&role).context("user role")?,
        status: UserStatus::parse(&status).context("user status")?,
        token_version: row.try_get("token_version")?,
        created_at: row.try_get("created_at")?,
        updated_at: (updated > 0).then(|| rfc3339(updated)),
        tier: row.try_get("tier")?,
        password_hash: row.try_get("password_hash")?,
    })
}

/// The user named `username`; `None` for a username that cannot exist (wrong shape, U+0000).
pub async fn find_user(pool: &AnyPool, username: &str) -> anyhow::Result<Option<User>> {
    if !valid_username(username) {
        return Ok(None);
    }
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE username = $1"))
        .bind(username)
        .fetch_optional(pool)
        .await
        .context("reading a user")?;
    row.as_ref().map(from_row).transpose()
}

/// The user with this id (a UUID; anything else is not found).
pub async fn get(pool: &AnyPool, id: &str) -> anyhow::Result<Option<User>> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Ok(None);
    }
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
        .context("reading a user")?;
    row.as_ref().map(from_row).transpose()
}

/// Users in username order, after `after`, at most `limit`.
pub async fn list(pool: &AnyPool, after: Option<&str>, limit: i64) -> anyhow::Result<Vec<User>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM users WHERE username > $1 ORDER BY username LIMIT $2"
    ))
    .bind(after.filter(|a| is_storable(a)).unwrap_or(""))
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing users")?;
    rows.iter().map(from_row).collect()
}

/// A change to a user (JSON Merge Patch, RFC 7386, of `{role, status, tier}`).
#[derive(Debug, Default, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"status": "disabled"}))]
pub struct UserPatch {
    pub role: Option<Role>,
    /// `active` or `disabled` (deleting is `DELETE`).
    pub status: Option<UserStatus>,
    /// The rate-limit tier: the name of a configured tier, or `null` for the default tier
    /// (absent: unchanged). Takes effect on the user's next request, on every node within
    /// one identity poll.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, nullable)]
    pub tier: Option<Option<String>>,
}

/// A merge-patch member that may be `null`: absent is `None`, `null` is `Some(None)`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Applies `patch` to the user `id` (audited as `user.update`). A role change or a disable
/// raises the token version and revokes every session, so access changes on the next request.
/// A tier change keeps sessions; like every change it writes an identity-change row, so every
/// node reads the new tier on the user's next request (within one poll on other nodes). The
/// tier's name is stored as given: callers check it against the configured tiers.
pub async fn update(
    pool: &AnyPool,
    actor: &Actor,
    id: &str,
    patch: &UserPatch,
) -> Result<User, UserError> {
    let before = get(pool, id).await?.ok_or(UserError::NotFound)?;
    if before.status == UserStatus::Deleted {
        return Err(UserError::Deleted);
    }
    let role = patch.role.unwrap_or(before.role);
    let status = patch.status.unwrap_or(before.status);
    let tier = patch.tier.clone().unwrap_or_else(|| before.tier.clone());
    if status == UserStatus::Deleted {
        return Err(UserError::Other(anyhow::anyhow!(
            "use DELETE to delete a user"
        )));
    }
    if role == before.role && status == before.status && tier == before.tier {
        // Nothing to change: nothing written, nothing audited.
        return Ok(before);
    }
    let takes_away = role != before.role
        || (status == UserStatus::Disabled && before.status != UserStatus::Disabled);
    if before.role == Role::Admin && before.status == UserStatus::Active && takes_away {
        refuse_last_admin(pool).await?;
    }
    let detail = serde_json::json!({
        "role": { "from": before.role.as_str(), "to": role.as_str() },
        "status": { "from": before.status.as_str(), "to": status.as_str() },
        "tier": { "from": before.tier, "to": tier },
    });
    let mut tx = pool.begin().await?;
    // Conditional on the state read above: a concurrent change (a delete) is not overwritten.
    let changed = sqlx::query(
        "UPDATE users SET role = $1, status = $2, updated_at = $3,
                token_version = token_version + $4, tier = $9
         WHERE id = $5 AND role = $6 AND status = $7 AND token_version = $8
           AND COALESCE(tier, '') = $10",
    )
    .bind(role.as_str())
    .bind(status.as_str())
    .bind(now_ms())
    .bind(i64::from(takes_away))
    .bind(id)
    .bind(before.role.as_str())
    .bind(before.status.as_str())
    .bind(before.token_version)
    .bind(tier.as_deref())
    .bind(before.tier.as_deref().unwrap_or(""))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 0 {
        return Err(UserError::Concurrent);
    }
    if takes_away {
        super::sessions::revoke_all(&mut tx, id, "user changed").await?;
    }
    finish(tx, actor, &before, "user.update", detail).await?;
    get(pool, id).await?.ok_or(UserError::NotFound)
}

/// Deletes the user `id` (audited as `user.delete`): the row stays with status `deleted`, no
/// password, no sessions and no API keys; its batches stay readable by admins.
pub async fn delete(pool: &AnyPool, actor: &Actor, id: &str) -> Result<(), UserError> {
    let before = get(pool, id).await?.ok_or(UserError::NotFound)?;
    if before.status == UserStatus::Deleted {
        return Ok(());
    }
    if before.role == Role::Admin && before.status == UserStatus::Active {
        refuse_last_admin(pool).await?;
    }
    let mut tx = pool.begin().await?;
    let changed = sqlx::query(
        "UPDATE users SET status = 'deleted', password_hash = '', updated_at = $1,
                token_version = token_version + 1 WHERE id = $2 AND status <> 'deleted'",
    )
    .bind(now_ms())
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 0 {
        return Ok(());
    }
    super::sessions::revoke_all(&mut tx, id, "user deleted").await?;
    sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL")
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
    finish(tx, actor, &before, "user.delete", serde_json::json!({})).await
}

/// Sets a new password for the user `id` (audited as `user.password`); every session and
/// access token of the user stops working.
pub async fn reset_password(
    pool: &AnyPool,
    hasher: &Hasher,
    actor: &Actor,
    id: &str,
    password: &str,
) -> Result<(), UserError> {
    check_password(password)?;
    let before = get(pool, id).await?.ok_or(UserError::NotFound)?;
    if before.status == UserStatus::Deleted {
        return Err(UserError::Deleted);
    }
    let hash = hasher.hash(password.to_owned()).await?;
    let mut tx = pool.begin().await?;
    let changed = sqlx::query(
        "UPDATE users SET password_hash = $1, updated_at = $2,
                token_version = token_version + 1 WHERE id = $3 AND status <> 'deleted'",
    )
    .bind(hash)
    .bind(now_ms())
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 0 {
        return Err(UserError::Deleted);
    }
    super::sessions::revoke_all(&mut tx, id, "password reset").await?;
    finish(tx, actor, &before, "user.password", serde_json::json!({})).await
}

/// Refuses to take away the last active admin (administration over HTTP would be gone; the
/// CLI on the server could still restore it). Two concurrent demotions of the last two admins
/// can both pass this check; the CLI is the way back.
async fn refuse_last_admin(pool: &AnyPool) -> Result<(), UserError> {
    let admins: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM users WHERE role = 'admin' AND status = 'active'")
            .fetch_one(pool)
            .await?
            .try_get("n")?;
    if admins <= 1 {
        return Err(UserError::LastAdmin);
    }
    Ok(())
}

/// Ends a change's transaction with its audit record and identity-change row.
async fn finish(
    mut tx: sqlx::Transaction<'_, sqlx::Any>,
    actor: &Actor,
    user: &User,
    action: &str,
    mut detail: serde_json::Value,
) -> Result<(), UserError> {
    let id = user.id.to_string();
    detail["username"] = serde_json::Value::String(user.username.clone());
    audit::record(
        &mut tx,
        &Record {
            actor,
            action,
            target: Some(&id),
            outcome: "ok",
            detail,
        },
    )
    .await?;
    record_change(&mut tx, &id).await?;
    tx.commit().await?;
    Ok(())
}
