//! `POST /v1/internal/results`: the HTTP twin of the Kafka results topic, for processors that
//! do not speak Kafka (and for the embedded default). Same message, same de-duplication.

use axum::Router;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use commands::ingress::IngressError;
use commands::messages::ResultMessage;
use serde::Serialize;

use crate::auth::{AuthUser, Role};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::json::Json;
use crate::state::AppState;
use crate::telemetry::CorrelationId;

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ResultAccepted {
    batch_id: String,
    correlation_id: String,
    /// The consistency token: pass as `min_position` to read this write.
    position: i64,
    version: i64,
    /// `false` when this result was already recorded (a duplicate changes nothing).
    recorded: bool,
}

#[utoipa::path(post, path = "/v1/internal/results", tag = "internal", request_body = ResultMessage,
    description = "Records a processor's result for one essay in one phase (service role; an API key usually). A redelivered message (same `message_id`) is recognised and changes nothing.",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, description = "Recorded (or recognised as a duplicate); durable", body = ResultAccepted),
        (status = 403, description = "Not the service role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such batch", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The batch refuses it: `unknown-essay`, `result-not-expected`, `batch-cancelled`, `concurrent-modification`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation`: a field out of range (`result` over `max_result_bytes`, for example); `errors` lists each", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn post_result(
    State(state): State<AppState>,
    user: AuthUser,
    Extension(correlation): Extension<CorrelationId>,
    Json(body): Json<ResultMessage>,
) -> ApiResult<Response> {
    user.require(&[Role::Service], "service")?;
    let accepted = state
        .ingress
        .record(body, correlation.0, &user.id.to_string())
        .await
        .map_err(|error| match error {
            IngressError::Invalid(errors) => {
                ApiError::Invalid(errors.into_iter().map(FieldError::from).collect())
            }
            IngressError::Command(error) => ApiError::from(error),
        })?;
    tracing::info!(batch_id = %accepted.batch_id, events = accepted.events, "result received over HTTP");
    let body = ResultAccepted {
        batch_id: accepted.batch_id.to_string(),
        correlation_id: correlation.0.to_string(),
        position: accepted.position.position,
        version: accepted.version,
        recorded: accepted.events > 0,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/internal/results", post(post_result))
}
