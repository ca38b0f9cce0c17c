//! Access tokens: JWTs (RFC 7519) signed with HS256, the algorithm pinned, with issuer,
//! audience, expiry, not-before, issued-at and a unique id, bound to a login session (`sid`)
//! and to the user's token version (`ver`).
//!
//! Each token names its secret in the JOSE header's `kid` (RFC 7515 section 4.1.4: the first 8
//! bytes of the secret's SHA-256, in hex), so that a rotation can roll out: `jwt_verify_secrets`
//! are accepted on verification and never used to sign (docs/RUNBOOK.md, "Rotate the JWT
//! secret"). A token is checked with the one secret its `kid` names (one HMAC, whatever the
//! number of secrets); a token without `kid` (issued before key ids existed) with the signing
//! secret only.

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
    #[error("the token's key id is not one of this service's secrets")]
    UnknownKey,
}

/// Signs and checks access tokens (cheap to clone).
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    /// The signing secret's key id.
    kid: String,
    /// Every accepted secret by key id, the signing one first.
    decoding: Arc<Vec<(String, DecodingKey)>>,
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

/// The key id (`kid`) of a secret: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(secret: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(secret)[..8])
}

impl TokenKeys {
    /// Keys that sign with `secret` and accept only it.
    pub fn new(secret: &[u8], issuer: &str, audience: &str, ttl_secs: u64) -> Self {
        Self::with_verify_secrets(secret, &[], issuer, audience, ttl_secs)
    }

    /// Keys that sign with `secret` and also accept tokens signed with any of
    /// `verify_secrets` (a rotation in progress).
    pub fn with_verify_secrets(
        secret: &[u8],
        verify_secrets: &[&[u8]],
        issuer: &str,
        audience: &str,
        ttl_secs: u64,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        let decoding = std::iter::once(secret)
            .chain(verify_secrets.iter().copied())
            .map(|s| (key_id(s), DecodingKey::from_secret(s)))
            .collect();
        Self {
            encoding: EncodingKey::from_secret(secret),
            kid: key_id(secret),
            decoding: Arc::new(decoding),
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
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).context("signing an access token")
    }

    /// Checks the signature, algorithm, issuer, audience, `exp`, `nbf` and `iat` (with
    /// [`LEEWAY_SECS`]); the session and version are checked by the caller against the store.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token)?;
        let key = match header.kid {
            Some(kid) => self
                .decoding
                .iter()
                .find(|(id, _)| *id == kid)
                .ok_or(TokenError::UnknownKey)?,
            None => &self.decoding[0],
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key.1, &self.validation)?.claims;
        if claims.iat > Utc::now().timestamp() + LEEWAY_SECS as i64 {
            return Err(TokenError::IssuedInFuture);
        }
        Ok(claims)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const OLD: &[u8] = b"an old secret of at least 32 characters";
    const NEW: &[u8] = b"a new secret, also of at least 32 characters";

    fn subject() -> Subject<'static> {
        Subject {
            user_id: "00000000-0000-4000-8000-000000000001",
            username: "ada",
            role: Role::Teacher,
            session_id: "s1",
            token_version: 1,
        }
    }

    fn keys(secret: &[u8], verify: &[&[u8]]) -> TokenKeys {
        TokenKeys::with_verify_secrets(secret, verify, "essayflow", "essayflow-api", 900)
    }

    #[test]
    fn a_rotation_rolls_out_without_refusing_either_secret() {
        let old_token = keys(OLD, &[]).issue(&subject()).unwrap();
        let header = jsonwebtoken::decode_header(&old_token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(key_id(OLD).as_str()));
        // Step 1: old nodes sign with OLD and accept NEW.
        let step1 = keys(OLD, &[NEW]);
        // Step 2: new nodes sign with NEW and accept OLD.
        let step2 = keys(NEW, &[OLD]);
        let new_token = step2.issue(&subject()).unwrap();
        for (keys, token) in [
            (&step1, &old_token),
            (&step1, &new_token),
            (&step2, &old_token),
            (&step2, &new_token),
        ] {
            assert_eq!(keys.verify(token).unwrap().name, "ada");
        }
        // Step 3: OLD is gone, and so are its tokens.
        let step3 = keys(NEW, &[]);
        assert!(step3.verify(&new_token).is_ok());
        assert!(matches!(
            step3.verify(&old_token),
            Err(TokenError::UnknownKey)
        ));
    }

    #[test]
    fn a_key_id_does_not_let_a_forged_token_through() {
        // A token signed with another secret that claims NEW's key id.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key_id(NEW));
        let forged_claims = keys(NEW, &[]).verify(&keys(NEW, &[]).issue(&subject()).unwrap());
        let forged = jsonwebtoken::encode(
            &header,
            &forged_claims.unwrap(),
            &EncodingKey::from_secret(b"the attacker's secret of 32 characters"),
        )
        .unwrap();
        assert!(matches!(
            keys(NEW, &[OLD]).verify(&forged),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn a_token_without_a_key_id_is_checked_with_the_signing_secret_only() {
        let claims = keys(OLD, &[])
            .verify(&keys(OLD, &[]).issue(&subject()).unwrap())
            .unwrap();
        let legacy = |secret: &[u8]| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(secret),
            )
            .unwrap()
        };
        assert!(keys(OLD, &[]).verify(&legacy(OLD)).is_ok());
        assert!(keys(NEW, &[OLD]).verify(&legacy(OLD)).is_err());
    }
}
