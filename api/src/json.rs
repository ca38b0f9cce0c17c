//! A JSON body extractor whose every failure is a problem+json answer naming the field.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 4 * 1024 * 1024;

pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        require_json(req.headers())?;
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        parse(&bytes).map(Json)
    }
}

/// Whether a media type (a `Content-Type` value, parameters allowed) is JSON:
/// `application/json` or any `application/*+json`, compared without regard to case as
/// RFC 9110 section 8.3.1 requires.
pub fn is_json_media_type(value: &str) -> bool {
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Refuses a body not declared as JSON (`application/json` or any `+json` type).
pub fn require_json(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_media_type);
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// The problem for a body that could not be read: 413 when it is over [`BODY_LIMIT`].
pub fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(BODY_LIMIT)
    } else {
        ApiError::MalformedJson(rejection.body_text())
    }
}

/// Parses a body, telling syntax errors (400) from shape errors (422, with the field's path).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // The whole body's syntax first (UTF-8 and trailing characters included), so that a body
    // that is not JSON is a 400 whatever its shape, and never half-read.
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ApiError::MalformedJson(format!("the body is not UTF-8: {e}")))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    // Every request body is a JSON object (serde would otherwise read an array as the
    // object's fields in order, and a merge patch that is not an object replaces the target).
    if !text.trim_start().starts_with('{') {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = if path == "." { "body".to_owned() } else { path };
                ApiError::invalid(field, strip_position(&inner.to_string()))
            }
            _ => ApiError::MalformedJson(inner.to_string()),
        }
    })
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// A query-string extractor whose failures are problem+json 400s.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|rejection| {
                let text = rejection.body_text();
                let reason = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text)
                    .to_owned();
                let field = reason
                    .split(':')
                    .next()
                    .filter(|f| !f.contains(' '))
                    .unwrap_or("query")
                    .to_owned();
                ApiError::BadQuery(crate::error::FieldError { field, reason })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::is_json_media_type;

    #[test]
    fn json_media_types_match_without_regard_to_case() {
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=UTF-8",
            "APPLICATION/JSON;charset=utf-8",
            "application/merge-patch+json",
            "Application/Merge-Patch+JSON",
            " application/problem+json ",
        ] {
            assert!(is_json_media_type(yes), "{yes}");
        }
        for no in [
            "text/plain",
            "application/xml",
            "text/json+xml",
            "",
            "json",
            "text/x+json",
        ] {
            assert!(!is_json_media_type(no), "{no}");
        }
    }
}
