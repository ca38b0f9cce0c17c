//! Access tokens: JWTs (RFC 7519) signed with HS256, the algorithm pinned, with issuer,
//! audience, expiry, not-before, issued-at and a unique id, bound to a login session (`sid`)
//! and to the user's token version (`ver`).

use std::sync::Arc;

use anyhow::Context;
use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::Role;

/// Seconds of clock difference tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 5;

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id (UUID).
    pub sub: String,
    /// The username, for display; the server reads the current one from the store.
    pub name: String,
    /// The role when issued; the server uses the current one (a change raises `ver`).
    pub role: Role,
    pub iss: String,
    pub aud: String,
    /// Issued at, not before, expires at: seconds since the Unix epoch.
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// A unique id (UUID) of this token.
    pub jti: String,
    /// The login session (refresh-token family) the token belongs to; revoking the session
    /// refuses the token at once.
    pub sid: String,
    /// The user's token version when issued; a token of an older version is refused.
    pub ver: i64,
}

/// Why an access token was refused (all answer 401; the reason is logged, not shown).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed, forged, expired or not yet valid: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("the token claims to be issued in the future")]
    IssuedInFuture,
}

/// Signs and checks access tokens (cheap to clone).
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Arc<Validation>,
    issuer: String,
    audience: String,
    /// Lifetime of an access token, in seconds.
    pub ttl_secs: u64,
}

/// What an access token is issued for.
pub struct Subject<'a> {
    pub user_id: &'a str,
    pub username: &'a str,
    pub role: Role,
    pub session_id: &'a str,
    pub token_version: i64,
}

impl TokenKeys {
    pub fn new(secret: &[u8], issuer: &str, audience: &str, ttl_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation: Arc::new(validation),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl_secs,
        }
    }

    /// Signs an access token for `subject`, valid from now for `ttl_secs`.
    pub fn issue(&self, subject: &Subject<'_>) -> anyhow::Result<String> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: subject.user_id.to_owned(),
            name: subject.username.to_owned(),
            role: subject.role,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            nbf: now,
            exp: now + self.ttl_secs as i64,
            jti: uuid::Uuid::new_v4().to_string(),
            sid: subject.session_id.to_owned(),
            ver: subject.token_version,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .context("signing an access token")
    }

    /// Checks the signature, algorithm, issuer, audience, `exp`, `nbf` and `iat` (with
    /// [`LEEWAY_SECS`]); the session and version are checked by the caller against the store.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?.claims;
        if claims.iat > Utc::now().timestamp() + LEEWAY_SECS as i64 {
            return Err(TokenError::IssuedInFuture);
        }
        Ok(claims)
    }
}
