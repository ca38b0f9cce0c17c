//! Authentication: users with argon2id password hashes, HS256 access tokens with a pinned
//! algorithm, issuer, audience and expiry, and the [`AuthUser`] extractor.

use std::sync::Arc;

use anyhow::Context;
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use chrono::Utc;
use domain::values::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row};

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Teacher,
    Admin,
    Service,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "teacher" => Some(Self::Teacher),
            "admin" => Some(Self::Admin),
            "service" => Some(Self::Service),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Admin => "admin",
            Self::Service => "service",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub name: String,
    pub role: Role,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

/// Signs and checks access tokens.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Arc<Validation>,
    issuer: String,
    audience: String,
    pub ttl_secs: u64,
}

impl TokenKeys {
    pub fn new(secret: &[u8], issuer: &str, audience: &str, ttl_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation: Arc::new(validation),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl_secs,
        }
    }

    pub fn issue(&self, user: &User) -> anyhow::Result<String> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: user.id.to_string(),
            name: user.username.clone(),
            role: user.role,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + self.ttl_secs as i64,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .context("signing an access token")
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| {
                tracing::debug!(error = %e, "access token refused");
                ApiError::Unauthorized("the access token is invalid or expired")
            })
    }
}

/// A stored user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: UserId,
    pub username: String,
    pub role: Role,
    password_hash: String,
}

/// At most this many argon2 computations at once (each takes about 19 MiB and a core for tens
/// of milliseconds); further logins queue instead of exhausting memory.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Hashes a password with argon2id (slow on purpose: run it off the async threads).
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    let _permit = HASHING.acquire().await?;
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
    })
    .await?
}

async fn verify_password(password: String, hash: String) -> bool {
    let Ok(_permit) = HASHING.acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .verify_password(password.as_bytes(), hash.as_str())
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// A valid hash of a random password, checked when the username is unknown so that a login's
/// timing does not tell whether a user exists.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Jv0NnQd5m0t2Ff3d1m4u8qg0QvPp0o2lCqz6cS0E1mI";

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("username must be 1 to 64 characters of letters, digits, '.', '_' or '-'")]
    InvalidUsername,
    #[error("password must be at least 8 characters")]
    WeakPassword,
    #[error("user {0} already exists")]
    Exists(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub async fn add_user(
    pool: &AnyPool,
    username: &str,
    role: Role,
    password: &str,
) -> Result<User, UserError> {
    let valid = (1..=64).contains(&username.len())
        && username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(UserError::InvalidUsername);
    }
    if password.chars().count() < 8 {
        return Err(UserError::WeakPassword);
    }
    let hash = hash_password(password.to_owned()).await?;
    let user = User {
        id: UserId::new(),
        username: username.to_owned(),
        role,
        password_hash: hash,
    };
    let inserted = sqlx::query(
        "INSERT INTO users (id, username, role, password_hash, created_at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (username) DO NOTHING",
    )
    .bind(user.id.to_string())
    .bind(&user.username)
    .bind(role.as_str())
    .bind(&user.password_hash)
    .bind(Utc::now().to_rfc3339())
    .execute(pool)
    .await
    .context("storing a user")?;
    if inserted.rows_affected() == 0 {
        return Err(UserError::Exists(username.to_owned()));
    }
    Ok(user)
}

pub async fn find_user(pool: &AnyPool, username: &str) -> anyhow::Result<Option<User>> {
    let row =
        sqlx::query("SELECT id, username, role, password_hash FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(pool)
            .await
            .context("reading a user")?;
    row.map(|row| -> anyhow::Result<User> {
        let id: String = row.try_get("id")?;
        let role: String = row.try_get("role")?;
        Ok(User {
            id: id.parse().context("user id")?,
            username: row.try_get("username")?,
            role: Role::parse(&role).context("user role")?,
            password_hash: row.try_get("password_hash")?,
        })
    })
    .transpose()
}

/// Checks a username and password; `None` when either is wrong.
pub async fn authenticate(
    pool: &AnyPool,
    username: &str,
    password: &str,
) -> anyhow::Result<Option<User>> {
    let user = find_user(pool, username).await?;
    let hash = user
        .as_ref()
        .map_or(DUMMY_HASH.to_owned(), |u| u.password_hash.clone());
    let ok = verify_password(password.to_owned(), hash).await;
    Ok(user.filter(|_| ok))
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: UserId,
    pub username: String,
    pub role: Role,
}

impl AuthUser {
    /// The caller a verified token names.
    pub fn from_claims(claims: Claims) -> Result<Self, ApiError> {
        Ok(Self {
            id: claims
                .sub
                .parse()
                .map_err(|_| ApiError::Unauthorized("the access token is invalid or expired"))?,
            username: claims.name,
            role: claims.role,
        })
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Refuses callers whose role is not one of `allowed`.
    pub fn require(&self, allowed: &[Role], name: &'static str) -> Result<(), ApiError> {
        if allowed.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(name))
        }
    }

    /// Whether this caller may see a batch owned by `owner_id`.
    pub fn may_read(&self, owner_id: &str) -> bool {
        self.is_admin() || self.id.to_string() == owner_id
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?
            .ok_or(ApiError::Unauthorized("an access token is required"))?;
        Self::from_claims(state.tokens.verify(token)?)
    }
}

/// The token of an `Authorization: Bearer <token>` header; `None` without the header, an error
/// for another scheme.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|token| Some(token.trim()))
        .ok_or(ApiError::Unauthorized("use Authorization: Bearer <token>"))
}
