//! The [`AuthUser`] extractor and the `Authorization` header. The identity lifecycle (users,
//! sessions, tokens, keys, audit) lives in [`crate::identity`]; its names are re-exported here.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

pub use crate::identity::users::{User, UserError, add_user, find_user};
pub use crate::identity::{AuthUser, Claims, Credential, Role, TokenKeys};

use crate::error::ApiError;
use crate::identity::audit::CallerSlot;
use crate::state::AppState;

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    /// An `X-API-Key`, or an `Authorization: Bearer` access token; 401 otherwise. The rate
    /// limit ([`crate::edge::ratelimit`]) has usually authenticated the request already and
    /// left the caller in the request's extensions: then that one, without checking again.
    ///
    /// The caller is also left in the audit layer's slot, so that a refusal later in the
    /// request names who was refused ([`crate::identity::audit::note_refusals`]).
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = match parts.extensions.get::<AuthUser>() {
            Some(user) => user.clone(),
            None => state.identity.authenticate(&parts.headers).await?,
        };
        if let Some(slot) = parts.extensions.get::<CallerSlot>() {
            slot.fill(user.id.to_string(), user.username.clone());
        }
        Ok(user)
    }
}

/// Whether the request presents a credential in its headers (`Authorization` or `X-API-Key`),
/// valid or not.
pub fn has_credential(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION) || headers.contains_key("x-api-key")
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive,
/// RFC 9110 section 11.1; spaces after it are skipped); `None` without the header, an error
/// for another scheme or an empty token.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    const WRONG: ApiError = ApiError::Unauthorized("use Authorization: Bearer <token>");
    let value = value.to_str().map_err(|_| WRONG)?;
    let (scheme, token) = value.trim_start().split_once(' ').ok_or(WRONG)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(WRONG);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(WRONG);
    }
    Ok(Some(token))
}

/// A token offered as a WebSocket subprotocol `bearer.<token>` (the prefix is matched without
/// regard to case, like the HTTP scheme).
pub fn subprotocol_token(protocol: &str) -> Option<&str> {
    let protocol = protocol.trim();
    let prefix = protocol.get(..7)?;
    prefix
        .eq_ignore_ascii_case("bearer.")
        .then(|| &protocol[7..])
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_nothing_else_passes() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR   abc "] {
            assert_eq!(bearer_token(&with(value)).unwrap(), Some("abc"), "{value}");
        }
        for value in [
            "Basic abc",
            "Bearer",
            "Bearer ",
            "Bearerabc",
            "Token abc",
            "",
        ] {
            assert!(bearer_token(&with(value)).is_err(), "{value:?}");
        }
        assert_eq!(bearer_token(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn the_subprotocol_prefix_is_case_insensitive() {
        assert_eq!(subprotocol_token("bearer.abc"), Some("abc"));
        assert_eq!(subprotocol_token(" Bearer.abc"), Some("abc"));
        assert_eq!(subprotocol_token("BEARER.abc"), Some("abc"));
        assert_eq!(subprotocol_token("bearer."), None);
        assert_eq!(subprotocol_token("essayflow.v1"), None);
        assert_eq!(subprotocol_token("bé"), None);
    }
}
