//! Value objects. Each one parses its raw input once, at the edge, so that an invalid value
//! cannot be represented inside the domain.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a raw input was refused: the field it came from and a human reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error reported under a path prefix, e.g. `essays[3].text`.
    pub fn within(self, prefix: &str) -> Self {
        Self {
            field: format!("{prefix}.{}", self.field),
            reason: self.reason,
        }
    }
}

/// Refuses U+0000 (NUL): no database text column takes it (PostgreSQL's `text` and `jsonb`
/// refuse it outright), so a value holding one could never be stored.
pub fn check_no_nul(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.contains('\0') {
        return Err(ValidationError::new(field, "must not contain U+0000 (NUL)"));
    }
    Ok(())
}

fn check_len(field: &str, value: &str, min: usize, max: usize) -> Result<(), ValidationError> {
    check_no_nul(field, value)?;
    let chars = value.chars().count();
    if chars < min || chars > max {
        return Err(ValidationError::new(
            field,
            format!("must be {min} to {max} characters long, got {chars}"),
        ));
    }
    Ok(())
}

/// Declares a string newtype whose constructor is `parse`, checked by the given function.
macro_rules! string_value {
    ($(#[$meta:meta])* $name:ident, $field:literal, $check:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const FIELD: &'static str = $field;

            pub fn parse(raw: impl Into<String>) -> Result<Self, ValidationError> {
                let raw: String = raw.into();
                let check: fn(&str) -> Result<(), ValidationError> = $check;
                check(&raw)?;
                Ok(Self(raw))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

fn not_blank(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be blank"));
    }
    Ok(())
}

fn identifier(field: &str, value: &str, max: usize, extra: &[char]) -> Result<(), ValidationError> {
    check_len(field, value, 1, max)?;
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || extra.contains(c)))
    {
        return Err(ValidationError::new(
            field,
            format!("may contain only letters, digits, '_' and '-', found {bad:?}"),
        ));
    }
    Ok(())
}

string_value!(
    /// A batch title: 1 to 200 characters, not blank.
    Title,
    "title",
    |v| {
        check_len("title", v, 1, 200)?;
        not_blank("title", v)
    }
);

string_value!(
    /// A course code: 1 to 32 characters of `[A-Za-z0-9_-]`.
    CourseCode,
    "course_code",
    |v| identifier("course_code", v, 32, &[])
);

string_value!(
    /// An optional class designation, e.g. "9B": 1 to 64 characters, not blank.
    ClassDesignation,
    "class_designation",
    |v| {
        check_len("class_designation", v, 1, 64)?;
        not_blank("class_designation", v)
    }
);

string_value!(
    /// An essay title: 1 to 200 characters, not blank.
    EssayTitle,
    "title",
    |v| {
        check_len("title", v, 1, 200)?;
        not_blank("title", v)
    }
);

string_value!(
    /// An essay's text: 1 to 100 000 characters, not blank.
    EssayText,
    "text",
    |v| {
        check_len("text", v, 1, 100_000)?;
        not_blank("text", v)
    }
);

string_value!(
    /// An essay id, unique within its batch: 1 to 64 characters of `[A-Za-z0-9_.:-]`.
    /// Clients may choose it; the server generates a UUID otherwise.
    EssayId,
    "essay_id",
    |v| identifier("essay_id", v, 64, &['.', ':'])
);

string_value!(
    /// The name of a processing phase (and of the pipeline that ends with it), e.g.
    /// `spellcheck`: 1 to 32 characters of `[a-z0-9_]`. Which phases exist is configuration
    /// (see [`crate::PipelineCatalog`]), not code.
    Phase,
    "pipeline",
    |v| {
        check_len("pipeline", v, 1, 32)?;
        if v.chars().any(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')) {
            return Err(ValidationError::new(
                "pipeline",
                "may contain only lowercase letters, digits and '_'",
            ));
        }
        Ok(())
    }
);

string_value!(
    /// A processor's message id, used to recognise a redelivered result: 1 to 128 printable
    /// ASCII characters.
    MessageId,
    "message_id",
    |v| {
        check_len("message_id", v, 1, 128)?;
        if v.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(ValidationError::new(
                "message_id",
                "may contain only printable ASCII characters",
            ));
        }
        Ok(())
    }
);

/// The number of essays a batch expects: 1 to 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExpectedEssayCount(u32);

impl ExpectedEssayCount {
    pub const MAX: u32 = 1000;

    pub fn parse(raw: i64) -> Result<Self, ValidationError> {
        if !(1..=i64::from(Self::MAX)).contains(&raw) {
            return Err(ValidationError::new(
                "expected_essay_count",
                format!("must be between 1 and {}, got {raw}", Self::MAX),
            ));
        }
        Ok(Self(raw as u32))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// Declares a UUID newtype.
macro_rules! uuid_value {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            pub fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_value!(
    /// The id of a batch (the aggregate id).
    BatchId
);
uuid_value!(
    /// The id of a user; the owner of a batch.
    UserId
);
uuid_value!(
    /// The id of one pipeline request; processors echo it back through phase requests.
    RequestId
);

/// The outcome a processor reports for one essay in one phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_course_code_with_a_space_is_refused_with_its_field() {
        let err = CourseCode::parse("EN 101").unwrap_err();
        assert_eq!(err.field, "course_code");
    }

    #[test]
    fn a_title_of_201_characters_is_refused_and_200_accepted() {
        assert!(Title::parse("x".repeat(201)).is_err());
        assert!(Title::parse("x".repeat(200)).is_ok());
    }

    #[test]
    fn a_blank_title_is_refused() {
        assert!(Title::parse("   ").is_err());
    }

    #[test]
    fn the_expected_essay_count_is_bounded_by_1_and_1000() {
        assert!(ExpectedEssayCount::parse(0).is_err());
        assert!(ExpectedEssayCount::parse(1001).is_err());
        assert_eq!(ExpectedEssayCount::parse(1000).map(|c| c.get()), Ok(1000));
    }

    #[test]
    fn an_essay_text_of_100_001_characters_is_refused() {
        assert!(EssayText::parse("a".repeat(100_001)).is_err());
        assert!(EssayText::parse("a".repeat(100_000)).is_ok());
    }

    #[test]
    fn phase_names_are_lowercase_identifiers() {
        assert!(Phase::parse("ai_feedback").is_ok());
        assert!(Phase::parse("AI").is_err());
        assert!(Phase::parse("").is_err());
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        assert!(Title::parse("é".repeat(200)).is_ok());
    }
}
