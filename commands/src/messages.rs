//! The Kafka contract: the shapes of the messages essayflow publishes and consumes.
//!
//! These are a persisted, versioned contract (the `.v1` in every topic name), shared with the
//! processing services. Ids that a consumer de-duplicates on are derived deterministically from
//! what the event log stores, so that a message published twice (the relay is at-least-once)
//! carries the same id both times.

use chrono::{DateTime, Utc};
use domain::values::{BatchId, EssayId, MessageId, Outcome, Phase, RequestId, ValidationError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::log::StoredEvent;

/// The namespace of every id essayflow derives (UUID version 5).
const NAMESPACE: Uuid = Uuid::from_u128(0x6b1d_4f0e_9a57_4c1b_8e2f_5d0c_3a9e_7f41);

/// The stable id of a stored event: the same on every read and every node.
pub fn event_id(batch_id: BatchId, sequence: i64) -> Uuid {
    Uuid::new_v5(
        &NAMESPACE,
        format!("event/{batch_id}/{sequence}").as_bytes(),
    )
}

/// The stable id of the request sent to a processor for one essay in one phase of one pipeline.
pub fn phase_request_id(pipeline_request_id: RequestId, phase: &Phase, essay_id: &EssayId) -> Uuid {
    Uuid::new_v5(
        &NAMESPACE,
        format!("phase-request/{pipeline_request_id}/{phase}/{essay_id}").as_bytes(),
    )
}

/// The causation id of the commands a result message causes: stable per message id.
pub fn result_causation_id(message_id: &MessageId) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("result/{message_id}").as_bytes())
}

/// What `essayflow.events.v1` carries: one domain event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventEnvelope {
    /// Stable per event: consumers de-duplicate on it.
    pub event_id: Uuid,
    pub event_type: String,
    pub event_version: String,
    pub batch_id: Uuid,
    /// The event's sequence within its batch (1-based).
    pub sequence: i64,
    /// The event's global position in the log.
    pub position: i64,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    /// The event itself, as stored: `{"<EventType>": {...}}`.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

impl EventEnvelope {
    pub fn new(event: &StoredEvent) -> Self {
        Self {
            event_id: event_id(event.batch_id, event.sequence),
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            batch_id: event.batch_id.as_uuid(),
            sequence: event.sequence,
            position: event.at.position,
            occurred_at: event.metadata.occurred_at,
            correlation_id: event.metadata.correlation_id,
            causation_id: event.metadata.causation_id,
            payload: serde_json::to_value(&event.event).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// What `essayflow.phase.<phase>.requested.v1` carries: one essay to process in one phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseRequest {
    /// Stable per (pipeline request, phase, essay): a processor may de-duplicate on it.
    pub request_id: Uuid,
    pub batch_id: Uuid,
    pub essay_id: String,
    pub phase: String,
    pub pipeline_request_id: Uuid,
    pub text: String,
}

/// What processors send back, on `essayflow.results.v1` or to `POST /v1/internal/results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"message_id": "spellcheck-7f3a-0001", "batch_id": "9d7c1a52-3b8e-4f6a-9c1d-2e5f7a8b9c0d", "essay_id": "ada-1", "phase": "spellcheck", "outcome": "succeeded", "result": {"errors": 3}, "pipeline_request_id": "1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b"}))]
pub struct ResultMessage {
    /// The processor's id for this message: a redelivered message keeps it, and is recorded once.
    pub message_id: String,
    pub batch_id: Uuid,
    pub essay_id: String,
    pub phase: String,
    /// `succeeded` or `failed`.
    #[schema(value_type = String, example = "succeeded")]
    pub outcome: Outcome,
    /// The processor's output (any JSON object); stored with the essay's outcome.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub result: Option<serde_json::Value>,
    /// Why processing failed (for `failed`).
    #[serde(default)]
    pub error: Option<String>,
    /// The `pipeline_request_id` of the phase request answered. Optional, but processors should
    /// echo it: an answer to an earlier run of the same phase is then recognised as stale even
    /// under a new message id.
    #[serde(default)]
    pub pipeline_request_id: Option<Uuid>,
}

/// A result whose every field has been checked: what `RecordEssayResult` is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidResult {
    pub batch_id: BatchId,
    pub essay_id: EssayId,
    pub phase: Phase,
    pub outcome: Outcome,
    pub message_id: MessageId,
    pub result: serde_json::Value,
    pub error: Option<String>,
    pub pipeline_request_id: Option<RequestId>,
}

/// The longest `error` text a result may carry.
pub const MAX_ERROR_CHARS: usize = 2000;

/// The default largest `result`, in bytes of compact JSON (`ESSAYFLOW_MAX_RESULT_BYTES`): 64 KiB.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024;

/// The smallest `max_result_bytes` a deployment may configure; the development processor's
/// results stay below it.
pub const MIN_MAX_RESULT_BYTES: usize = 256;

/// The length in bytes of `value` serialised as compact JSON, counted without building it.
pub fn compact_json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

impl ResultMessage {
    /// Parses a message body, naming the offending field when it does not fit the contract.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ValidationError> {
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "body".to_owned() } else { path };
            ValidationError::new(field, e.into_inner().to_string())
        })
    }

    /// Checks every field: the value objects' own rules, and the result's shape and size:
    /// `result` must be a JSON object of at most `max_result_bytes` bytes as compact JSON
    /// ([`compact_json_len`]); a larger one is refused with field `result`, so it is never
    /// stored (HTTP: 422; Kafka: dead-lettered).
    pub fn validate(self, max_result_bytes: usize) -> Result<ValidResult, Vec<ValidationError>> {
        let mut errors = Vec::new();
        let message_id = MessageId::parse(self.message_id)
            .map_err(|e| errors.push(e))
            .ok();
        let essay_id = EssayId::parse(self.essay_id)
            .map_err(|e| errors.push(e))
            .ok();
        let phase = Phase::parse(self.phase)
            .map_err(|e| errors.push(ValidationError::new("phase", e.reason)))
            .ok();
        let result = match self.result {
            None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
            Some(object @ serde_json::Value::Object(_)) => {
                let size = compact_json_len(&object);
                if size > max_result_bytes {
                    errors.push(ValidationError::new(
                        "result",
                        format!(
                            "must be at most {max_result_bytes} bytes as compact JSON; this one is {size}"
                        ),
                    ));
                }
                object
            }
            Some(_) => {
                errors.push(ValidationError::new("result", "must be a JSON object"));
                serde_json::Value::Null
            }
        };
        if result_has_nul(&result) {
            errors.push(ValidationError::new(
                "result",
                "must not contain U+0000 (NUL) in any string or key",
            ));
        }
        if let Some(error) = &self.error
            && let Err(e) = domain::values::check_no_nul("error", error)
        {
            errors.push(e);
        }
        if let Some(error) = &self.error
            && error.chars().count() > MAX_ERROR_CHARS
        {
            errors.push(ValidationError::new(
                "error",
                format!("must be at most {MAX_ERROR_CHARS} characters"),
            ));
        }
        match (message_id, essay_id, phase) {
            (Some(message_id), Some(essay_id), Some(phase)) if errors.is_empty() => {
                Ok(ValidResult {
                    batch_id: BatchId::from_uuid(self.batch_id),
                    essay_id,
                    phase,
                    outcome: self.outcome,
                    message_id,
                    result,
                    error: self.error,
                    pipeline_request_id: self.pipeline_request_id.map(RequestId::from_uuid),
                })
            }
            _ => Err(errors),
        }
    }
}

/// Whether any string or key of a JSON value holds U+0000 (which PostgreSQL's `jsonb` refuses).
fn result_has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(result_has_nul),
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || result_has_nul(value)),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_anywhere_in_a_result_is_found() {
        use serde_json::json;
        assert!(!result_has_nul(&json!({"a": ["b", {"c": 1}]})));
        assert!(result_has_nul(&json!({"a": ["b\u{0}", {"c": 1}]})));
        assert!(result_has_nul(&json!({"a": {"k\u{0}": 1}})));
        assert!(result_has_nul(&json!({"a": {"k": "\u{0}"}})));
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let batch = BatchId::new();
        assert_eq!(event_id(batch, 3), event_id(batch, 3));
        assert_ne!(event_id(batch, 3), event_id(batch, 4));
        let request = RequestId::new();
        let phase = Phase::parse("nlp").unwrap();
        let a = EssayId::parse("a").unwrap();
        let b = EssayId::parse("b").unwrap();
        assert_eq!(
            phase_request_id(request, &phase, &a),
            phase_request_id(request, &phase, &a)
        );
        assert_ne!(
            phase_request_id(request, &phase, &a),
            phase_request_id(request, &phase, &b)
        );
    }

    #[test]
    fn a_result_names_the_field_that_does_not_fit() {
        let wrong_type = br#"{"message_id":"m","batch_id":"x","essay_id":"e","phase":"nlp","outcome":"succeeded"}"#;
        assert_eq!(
            ResultMessage::from_slice(wrong_type).unwrap_err().field,
            "batch_id"
        );
        let bad_outcome = format!(
            r#"{{"message_id":"m","batch_id":"{}","essay_id":"e","phase":"nlp","outcome":"maybe"}}"#,
            Uuid::new_v4()
        );
        assert_eq!(
            ResultMessage::from_slice(bad_outcome.as_bytes())
                .unwrap_err()
                .field,
            "outcome"
        );
        assert_eq!(
            ResultMessage::from_slice(b"not json").unwrap_err().field,
            "body"
        );
    }

    #[test]
    fn validation_reports_every_bad_field() {
        let message = ResultMessage {
            message_id: String::new(),
            batch_id: Uuid::new_v4(),
            essay_id: "has space".into(),
            phase: "NLP".into(),
            outcome: Outcome::Succeeded,
            result: Some(serde_json::json!([1])),
            error: None,
            pipeline_request_id: None,
        };
        let fields: Vec<String> = message
            .validate(DEFAULT_MAX_RESULT_BYTES)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["message_id", "essay_id", "phase", "result"]);
    }

    #[test]
    fn a_result_over_the_size_limit_is_refused_and_one_at_the_limit_is_not() {
        // {"blob":"xx...x"} is 11 bytes of JSON around the x's.
        let sized = |bytes: usize| ResultMessage {
            message_id: "m".into(),
            batch_id: Uuid::new_v4(),
            essay_id: "e".into(),
            phase: "nlp".into(),
            outcome: Outcome::Succeeded,
            result: Some(serde_json::json!({ "blob": "x".repeat(bytes - 11) })),
            error: None,
            pipeline_request_id: None,
        };
        let limit = 1000;
        assert_eq!(
            compact_json_len(sized(limit).result.as_ref().unwrap()),
            limit
        );
        assert!(sized(limit).validate(limit).is_ok());
        let refused = sized(limit + 1).validate(limit).unwrap_err();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].field, "result");
        assert!(
            refused[0].reason.contains("at most 1000 bytes"),
            "{refused:?}"
        );
        assert!(refused[0].reason.contains("1001"), "{refused:?}");
    }
}
