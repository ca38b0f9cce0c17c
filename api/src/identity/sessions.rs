//! Login sessions and their refresh tokens (OAuth 2.0 Security BCP, RFC 9700, section 4.14.2:
//! refresh token rotation with reuse detection).
//!
//! A session is one family of refresh tokens. Each refresh token is opaque (`efr_` and 43
//! base64url characters of randomness), stored only as its SHA-256, spent by its first use:
//! [`rotate`] marks it used and issues the next one of the family, in one transaction. A spent
//! token presented again means that two parties hold the family (one of them stole it), so the
//! whole session is revoked: both parties must log in again. A token unused for the idle
//! lifetime lapses; no session outlives its absolute lifetime.

use std::time::Duration;

use sqlx::{AnyPool, Row};

use super::users::is_storable;
use super::{now_ms, random_secret, record_change, token_hash};

/// The prefix of every refresh token (so that secret scanners can recognise one).
pub const REFRESH_PREFIX: &str = "efr_";

/// A new session's or refresh's refresh token and the session it belongs to.
pub struct Issued {
    pub session_id: String,
    pub user_id: String,
    pub refresh_token: String,
}

/// Why a refresh token was refused (every one answers 401).
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("the refresh token is unknown, expired or revoked")]
    Invalid,
    /// An already-spent token: its session is now revoked.
    #[error("the refresh token was already used; the session is revoked")]
    Reused { session_id: String, user_id: String },
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

fn new_refresh_token() -> String {
    format!("{REFRESH_PREFIX}{}", random_secret())
}

/// Opens a session for `user_id` with its first refresh token, if the user is still active
/// at `token_version` (`None` when a change to the user, such as a password reset, committed
/// since the caller read it: the session would outlive the change).
pub async fn start(
    pool: &AnyPool,
    user_id: &str,
    token_version: i64,
    idle: Duration,
    absolute: Duration,
) -> Result<Option<Issued>, sqlx::Error> {
    let now = now_ms();
    let session_id = uuid::Uuid::new_v4().to_string();
    let refresh_token = new_refresh_token();
    let mut tx = pool.begin().await?;
    let started = sqlx::query(
        "INSERT INTO auth_sessions (id, user_id, token_version, created_at, expires_at, last_used_at)
         SELECT $1, id, token_version, $3, $4, $3 FROM users
         WHERE id = $2 AND token_version = $5 AND status = 'active'",
    )
    .bind(&session_id)
    .bind(user_id)
    .bind(now)
    .bind(now + absolute.as_millis() as i64)
    .bind(token_version)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if started == 0 {
        return Ok(None);
    }
    insert_token(&mut tx, &refresh_token, &session_id, now, idle).await?;
    tx.commit().await?;
    Ok(Some(Issued {
        session_id,
        user_id: user_id.to_owned(),
        refresh_token,
    }))
}

async fn insert_token(
    conn: &mut sqlx::AnyConnection,
    token: &str,
    session_id: &str,
    now: i64,
    idle: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, session_id, issued_at, idle_expires_at)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(token_hash(token))
    .bind(session_id)
    .bind(now)
    .bind(now + idle.as_millis() as i64)
    .execute(conn)
    .await?;
    Ok(())
}

/// Spends `token` and issues the next refresh token of its session. The user's state is
/// checked by the caller (it issues the access token).
pub async fn rotate(pool: &AnyPool, token: &str, idle: Duration) -> Result<Issued, RefreshError> {
    if !token.starts_with(REFRESH_PREFIX) || !is_storable(token) {
        return Err(RefreshError::Invalid);
    }
    let hash = token_hash(token);
    let now = now_ms();
    let mut tx = pool.begin().await?;
    // Spending first, conditionally, makes two concurrent uses of one token see each other:
    // exactly one spends it, the other finds it spent. A lapsed token is not spent (it is
    // simply refused, then and later, and never taken for a reuse).
    let spent = sqlx::query(
        "UPDATE refresh_tokens SET used_at = $1
         WHERE token_hash = $2 AND used_at IS NULL AND idle_expires_at > $1",
    )
    .bind(now)
    .bind(&hash)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let row = sqlx::query(
        "SELECT t.session_id, t.used_at, s.user_id, s.expires_at, s.revoked_at,
                s.token_version AS session_version, u.token_version AS user_version, u.status
         FROM refresh_tokens t JOIN auth_sessions s ON s.id = t.session_id
         JOIN users u ON u.id = s.user_id
         WHERE t.token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(RefreshError::Invalid);
    };
    let session_id: String = row.try_get("session_id")?;
    let user_id: String = row.try_get("user_id")?;
    let revoked = row.try_get::<Option<i64>, _>("revoked_at")?.is_some();
    let expires: i64 = row.try_get("expires_at")?;
    let current = row.try_get::<i64, _>("session_version")?
        == row.try_get::<i64, _>("user_version")?
        && row.try_get::<String, _>("status")? == "active";
    let live = !revoked && expires > now && current;
    if spent == 0 {
        let used = row.try_get::<Option<i64>, _>("used_at")?.is_some();
        if used && live {
            // A spent token of a live session: two parties hold this family.
            revoke_in(&mut tx, &session_id, "refresh token reuse").await?;
            record_change(&mut tx, &user_id).await?;
            tx.commit().await?;
            return Err(RefreshError::Reused {
                session_id,
                user_id,
            });
        }
        return Err(RefreshError::Invalid);
    }
    if !live {
        tx.commit().await?;
        return Err(RefreshError::Invalid);
    }
    let refresh_token = new_refresh_token();
    insert_token(&mut tx, &refresh_token, &session_id, now, idle).await?;
    sqlx::query("UPDATE auth_sessions SET last_used_at = $1 WHERE id = $2")
        .bind(now)
        .bind(&session_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Issued {
        session_id,
        user_id,
        refresh_token,
    })
}

/// The session and user of a refresh token, spent or not (for logout).
pub async fn owner_of(
    pool: &AnyPool,
    token: &str,
) -> Result<Option<(String, String)>, sqlx::Error> {
    if !token.starts_with(REFRESH_PREFIX) || !is_storable(token) {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT t.session_id, s.user_id FROM refresh_tokens t
         JOIN auth_sessions s ON s.id = t.session_id WHERE t.token_hash = $1",
    )
    .bind(token_hash(token))
    .fetch_optional(pool)
    .await?;
    row.map(|row| Ok((row.try_get("session_id")?, row.try_get("user_id")?)))
        .transpose()
}

async fn revoke_in(
    conn: &mut sqlx::AnyConnection,
    session_id: &str,
    reason: &str,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE auth_sessions SET revoked_at = $1, revoked_reason = $2
         WHERE id = $3 AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(reason)
    .bind(session_id)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Revokes one session of `user_id` (logout), with the identity-change row.
pub async fn revoke(
    pool: &AnyPool,
    session_id: &str,
    user_id: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    if revoke_in(&mut tx, session_id, reason).await? > 0 {
        record_change(&mut tx, user_id).await?;
    }
    tx.commit().await
}

/// Revokes every open session of a user (in the caller's transaction).
pub async fn revoke_all(
    conn: &mut sqlx::AnyConnection,
    user_id: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE auth_sessions SET revoked_at = $1, revoked_reason = $2
         WHERE user_id = $3 AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(reason)
    .bind(user_id)
    .execute(conn)
    .await?;
    Ok(())
}
