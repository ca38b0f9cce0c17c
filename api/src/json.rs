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

/// Deserialises a JSON number whose value is an integer, however it is spelled (`25`, `25.0`,
/// `2.5e1`): JSON Schema's `integer` (draft 2020-12, section 6.1.1) is any number with a zero
/// fractional part, and the published contract says `integer`. Anything else is refused with
/// serde's error (a 422 naming the field).
pub fn integer<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    use serde::Deserialize;
    use serde::de::Error;
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(value) = number.as_i64() {
        return Ok(value);
    }
    // Within i64 (2^63 is exactly representable, so `<` excludes it), and whole.
    match number.as_f64() {
        Some(value)
            if value.fract() == 0.0 && value >= -(2f64.powi(63)) && value < 2f64.powi(63) =>
        {
            Ok(value as i64)
        }
        _ => Err(D::Error::custom(format!(
            "invalid value: {number}, expected an integer"
        ))),
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
    fn integers_may_be_spelled_as_whole_floats() {
        #[derive(serde::Deserialize)]
        struct Count {
            #[serde(deserialize_with = "super::integer")]
            n: i64,
        }
        let parse = |text: &str| serde_json::from_str::<Count>(text).map(|c| c.n);
        assert_eq!(parse(r#"{"n": 25}"#).ok(), Some(25));
        assert_eq!(parse(r#"{"n": 25.0}"#).ok(), Some(25));
        assert_eq!(parse(r#"{"n": 2.5e1}"#).ok(), Some(25));
        assert_eq!(parse(r#"{"n": -3.0}"#).ok(), Some(-3));
        for bad in [
            r#"{"n": 2.5}"#,
            r#"{"n": "25"}"#,
            r#"{"n": 1e300}"#,
            r#"{"n": 9223372036854775808}"#,
            r#"{"n": null}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

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
