//! The authentication flows: login, refresh, logout (sequence and answers: README.md,
//! "Authentication").

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::audit::{self, Record};
use super::sessions::{self, RefreshError};
use super::tokens::Subject;
use super::users::{self, User, UserStatus, valid_username};
use super::{Actor, AuthUser, Credential, HashError, Identity};
use crate::error::ApiError;

/// The answer to a login or a refresh (RFC 6749 section 5.1 names).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenPair {
    /// A JWT to send as `Authorization: Bearer <token>`; valid for `expires_in` seconds.
    pub access_token: String,
    /// Opaque; spend it once on `POST /v1/auth/refresh` for the next pair.
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds the access token is valid for.
    pub expires_in: u64,
}

const WRONG: &str = "unknown username or wrong password";

fn busy(error: HashError) -> ApiError {
    match error {
        HashError::Busy | HashError::Deadline => ApiError::Busy(error.to_string(), 1),
        HashError::Failed(error) => ApiError::Internal(error),
    }
}

impl Identity {
    fn issue(&self, user: &User, session_id: &str) -> Result<TokenPair, ApiError> {
        let access_token = self.tokens().issue(&Subject {
            user_id: &user.id.to_string(),
            username: &user.username,
            role: user.role,
            session_id,
            token_version: user.token_version,
        })?;
        Ok(TokenPair {
            access_token,
            refresh_token: String::new(),
            token_type: "Bearer".to_owned(),
            expires_in: self.tokens().ttl_secs,
        })
    }

    /// Checks a username and password (throttled, on the bounded hashing pool) and opens a
    /// session. Every refusal of credentials is the same 401, in the same time, whether the
    /// username exists or not.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<TokenPair, ApiError> {
        let attempt = self
            .inner
            .throttle
            .begin(username, client)
            .map_err(|wait| {
                self.stats()
                    .logins_throttled
                    .fetch_add(1, Ordering::Relaxed);
                ApiError::Throttled(wait.as_secs_f64().ceil().max(1.0) as u64)
            })?;
        let user = users::find_user(self.pool(), username).await?;
        let usable = user.filter(|u| u.status == UserStatus::Active);
        let hash = usable.as_ref().map(|u| u.password_hash.clone());
        let ok = match self.hasher().verify(password.to_owned(), hash).await {
            Ok(ok) => ok,
            Err(error) => {
                attempt.abandoned();
                return Err(busy(error));
            }
        };
        let actor = Actor {
            id: usable.as_ref().map(|u| u.id.to_string()),
            name: if valid_username(username) {
                username.to_owned()
            } else {
                "<not a username>".to_owned()
            },
            client: Some(client.to_string()),
        };
        let Some(user) = usable.filter(|_| ok) else {
            drop(attempt);
            self.stats().login_failures.fetch_add(1, Ordering::Relaxed);
            audit::record_alone(
                self.pool(),
                &Record {
                    actor: &actor,
                    action: "login.failed",
                    target: None,
                    outcome: "refused",
                    detail: serde_json::json!({}),
                },
            )
            .await?;
            return Err(ApiError::Unauthorized(WRONG));
        };
        attempt.succeeded();
        let options = self.options();
        let session = sessions::start(
            self.pool(),
            &user.id.to_string(),
            user.token_version,
            options.refresh_idle,
            options.refresh_absolute,
        )
        .await?
        // The user changed (a password reset, a disable) between the check and now.
        .ok_or(ApiError::Unauthorized(WRONG))?;
        audit::record_alone(
            self.pool(),
            &Record {
                actor: &actor,
                action: "login",
                target: Some(&session.session_id),
                outcome: "ok",
                detail: serde_json::json!({}),
            },
        )
        .await?;
        self.stats().logins.fetch_add(1, Ordering::Relaxed);
        let mut pair = self.issue(&user, &session.session_id)?;
        pair.refresh_token = session.refresh_token;
        Ok(pair)
    }

    /// Spends a refresh token for a new pair (RFC 9700 rotation); a spent one revokes its
    /// session (reuse detection, logged as a security event and audited).
    pub async fn refresh(&self, token: &str, client: IpAddr) -> Result<TokenPair, ApiError> {
        const REFUSED: &str = "the refresh token is unknown, expired or revoked";
        let options = self.options();
        match sessions::rotate(self.pool(), token, options.refresh_idle).await {
            Ok(issued) => {
                let user = users::get(self.pool(), &issued.user_id)
                    .await?
                    .filter(|u| u.status == UserStatus::Active);
                let Some(user) = user else {
                    return Err(ApiError::Unauthorized(REFUSED));
                };
                let mut pair = self.issue(&user, &issued.session_id)?;
                pair.refresh_token = issued.refresh_token;
                Ok(pair)
            }
            Err(RefreshError::Reused {
                session_id,
                user_id,
            }) => {
                self.stats().refresh_reuse.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    security_event = "refresh_token_reuse",
                    session = %session_id,
                    user = %user_id,
                    %client,
                    "a spent refresh token was presented again; the session is revoked"
                );
                self.changed_user(&user_id);
                let actor = Actor {
                    id: Some(user_id.clone()),
                    name: format!("session:{session_id}"),
                    client: Some(client.to_string()),
                };
                audit::record_alone(
                    self.pool(),
                    &Record {
                        actor: &actor,
                        action: "refresh.reuse",
                        target: Some(&session_id),
                        outcome: "refused",
                        detail: serde_json::json!({ "session_revoked": true }),
                    },
                )
                .await?;
                Err(ApiError::Unauthorized(
                    "the refresh token was already used; the session is revoked, log in again",
                ))
            }
            Err(RefreshError::Invalid) => Err(ApiError::Unauthorized(REFUSED)),
            Err(RefreshError::Store(error)) => Err(error.into()),
        }
    }

    /// Ends the caller's session (and the session of `refresh_token`, if it is the caller's):
    /// its refresh tokens and access tokens stop working, its WebSocket sessions close.
    pub async fn logout(
        &self,
        caller: &AuthUser,
        refresh_token: Option<&str>,
        client: IpAddr,
    ) -> Result<(), ApiError> {
        let user_id = caller.id.to_string();
        let mut ended = Vec::new();
        if let Credential::Session(session) = &caller.credential {
            ended.push(session.clone());
        }
        if let Some(token) = refresh_token
            && let Some((session, owner)) = sessions::owner_of(self.pool(), token).await?
            && owner == user_id
            && !ended.contains(&session)
        {
            ended.push(session);
        }
        for session in &ended {
            sessions::revoke(self.pool(), session, &user_id, "logout").await?;
        }
        self.changed(caller.id);
        audit::record_alone(
            self.pool(),
            &Record {
                actor: &Actor::user(caller, Some(client)),
                action: "logout",
                target: ended.first().map(String::as_str),
                outcome: "ok",
                detail: serde_json::json!({ "sessions": ended }),
            },
        )
        .await?;
        Ok(())
    }

    /// An access token for `username` in a new session, for local use (`essayflow token`).
    pub async fn token_for(&self, username: &str) -> anyhow::Result<String> {
        let user = users::find_user(self.pool(), username)
            .await?
            .filter(|u| u.status == UserStatus::Active)
            .ok_or_else(|| anyhow::anyhow!("no active user {username}"))?;
        let options = self.options();
        let session = sessions::start(
            self.pool(),
            &user.id.to_string(),
            user.token_version,
            options.refresh_idle,
            options.refresh_absolute,
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("{username} changed meanwhile; try again"))?;
        Ok(self
            .issue(&user, &session.session_id)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .access_token)
    }
}
