//! Batch commands (answered 202 once their events are durable) and batch queries.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use commands::{Accepted, CommandContext};
use domain::values::{
    BatchId, ClassDesignation, CourseCode, EssayId, EssayText, EssayTitle, ExpectedEssayCount,
    Phase, RequestId, Title, ValidationError,
};
use domain::{BatchCommand, BatchStatus, Essay};
use projections::{BatchSummary, BatchView, Page, Reached};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::{AuthUser, Role};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::json::{self, Json, Query};
use crate::state::AppState;
use crate::telemetry::CorrelationId;

// ---- request bodies -------------------------------------------------------------------------

/// A batch to register. Text fields may not hold U+0000 and may not be blank (the `pattern`s
/// say both).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"title": "Persuasive essays", "course_code": "EN-101", "expected_essay_count": 25, "class_designation": "9B"}))]
pub(super) struct RegisterBatchRequest {
    /// The batch's id, if the client chooses it (a retry with the same id is answered 409
    /// `batch-exists`); a new one otherwise.
    batch_id: Option<Uuid>,
    #[schema(min_length = 1, max_length = 200)]
    title: String,
    #[schema(min_length = 1, max_length = 32, pattern = "^[A-Za-z0-9_-]+$")]
    course_code: String,
    #[schema(minimum = 1, maximum = 1000)]
    #[serde(deserialize_with = "crate::json::integer")]
    expected_essay_count: i64,
    #[schema(min_length = 1, max_length = 64)]
    class_designation: Option<String>,
}

/// One essay. `title` and `text` may not hold U+0000 and may not be blank.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EssayInput {
    /// Unique within the batch; a UUID is made when absent.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.:-]+$")]
    essay_id: Option<String>,
    #[schema(min_length = 1, max_length = 200)]
    title: String,
    #[schema(min_length = 1, max_length = 100000)]
    text: String,
}

/// Essays to add, at most the batch's expected count in all.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"essays": [{"essay_id": "ada-1", "title": "On rhetoric", "text": "Persuasion is ..."}]}))]
pub(super) struct AddEssaysRequest {
    #[schema(min_items = 1, max_items = 1000)]
    essays: Vec<EssayInput>,
}

/// A pipeline to run: one of the configured pipelines (the `enum`).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"pipeline": "spellcheck"}))]
pub(super) struct RequestPipelineRequest {
    pipeline: String,
    /// The request's id (idempotency: the same id again is not a second run); a new one
    /// otherwise.
    request_id: Option<Uuid>,
}

/// Why the batch is cancelled (optional; the body may be left out).
#[derive(Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"reason": "uploaded to the wrong course"}))]
pub(super) struct CancelRequest {
    #[schema(max_length = 500)]
    reason: Option<String>,
}

/// Collects every field error of a body, so that a client sees them all at once.
#[derive(Default)]
struct Fields(Vec<FieldError>);

impl Fields {
    fn check<T>(&mut self, prefix: Option<&str>, parsed: Result<T, ValidationError>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(e) => {
                let e = match prefix {
                    Some(p) => e.within(p),
                    None => e,
                };
                self.0.push(e.into());
                None
            }
        }
    }

    fn finish<T>(self, value: Option<T>) -> ApiResult<T> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            _ => Err(ApiError::Invalid(self.0)),
        }
    }
}

// ---- responses ------------------------------------------------------------------------------

/// A command accepted: its events are durable.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"batch_id": "9d7c1a52-3b8e-4f6a-9c1d-2e5f7a8b9c0d", "correlation_id": "0e8f6c3a-1b2d-4e5f-8a9b-7c6d5e4f3a2b", "position": 1042, "version": 3}))]
pub(super) struct AcceptedResponse {
    batch_id: String,
    correlation_id: String,
    /// The consistency token: pass as `min_position` to read this write.
    position: i64,
    version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
}

fn accepted(
    accepted: Accepted,
    correlation: CorrelationId,
    request_id: Option<RequestId>,
) -> Response {
    let location = format!("/v1/batches/{}", accepted.batch_id);
    let body = AcceptedResponse {
        batch_id: accepted.batch_id.to_string(),
        correlation_id: correlation.0.to_string(),
        position: accepted.position.position,
        version: accepted.version,
        request_id: request_id.map(|r| r.to_string()),
    };
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

async fn execute(
    state: &AppState,
    user: &AuthUser,
    correlation: CorrelationId,
    batch_id: BatchId,
    command: BatchCommand,
    owner_only: bool,
) -> ApiResult<Accepted> {
    let context = CommandContext {
        correlation_id: correlation.0,
        causation_id: None,
        user_id: Some(user.id.to_string()),
        require_owner: owner_only.then_some(user.id),
        // The request span's context (see `commands::trace`).
        trace: None,
    };
    let name = command.name();
    let result = state.commands.execute(batch_id, command, &context).await;
    match &result {
        Ok(a) => {
            tracing::info!(command = name, %batch_id, events = a.events, position = a.position.position, "command accepted")
        }
        Err(e) => tracing::info!(command = name, %batch_id, error = %e, "command not accepted"),
    }
    Ok(result?)
}

fn batch_id(raw: &str) -> ApiResult<BatchId> {
    raw.parse().map_err(|_| ApiError::NotFound)
}

// ---- commands -------------------------------------------------------------------------------

#[utoipa::path(post, path = "/v1/batches", tag = "batches", request_body = RegisterBatchRequest,
    description = "Registers a batch owned by the caller (teacher or admin role).",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, description = "Registered; the event is durable", body = AcceptedResponse, headers(("Location" = String, description = "The batch: `/v1/batches/{id}`"))),
        (status = 409, description = "`batch-exists`: the `batch_id` is taken (by anyone)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation`: a field out of range; `errors` lists each", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn register_batch(
    State(state): State<AppState>,
    user: AuthUser,
    Extension(correlation): Extension<CorrelationId>,
    Json(body): Json<RegisterBatchRequest>,
) -> ApiResult<Response> {
    user.require(&[Role::Teacher, Role::Admin], "teacher")?;
    let mut fields = Fields::default();
    let title = fields.check(None, Title::parse(body.title));
    let course_code = fields.check(None, CourseCode::parse(body.course_code));
    let expected = fields.check(None, ExpectedEssayCount::parse(body.expected_essay_count));
    let class_designation = match body.class_designation {
        Some(c) => fields.check(None, ClassDesignation::parse(c)).map(Some),
        None => Some(None),
    };
    let batch_id = body.batch_id.map_or_else(BatchId::new, BatchId::from_uuid);
    let command = fields.finish((|| {
        Some(BatchCommand::RegisterBatch {
            batch_id,
            owner_id: user.id,
            title: title?,
            course_code: course_code?,
            class_designation: class_designation?,
            expected_essay_count: expected?,
        })
    })())?;
    let done = execute(&state, &user, correlation, batch_id, command, false).await?;
    Ok(accepted(done, correlation, None))
}

#[utoipa::path(post, path = "/v1/batches/{id}/essays", tag = "batches", request_body = AddEssaysRequest,
    description = "Adds essays to the caller's batch (all or none).",
    params(("id" = Uuid, Path, description = "Batch id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, description = "Added; the event is durable", body = AcceptedResponse, headers(("Location" = String, description = "The batch"))),
        (status = 404, description = "`not-found`: no such batch, or another user's", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`too-many-essays`, `duplicate-essay`, `batch-cancelled`, `pipeline-in-progress`, `concurrent-modification`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation`: a field out of range; `errors` lists each (`essays[3].text`)", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn add_essays(
    State(state): State<AppState>,
    user: AuthUser,
    Extension(correlation): Extension<CorrelationId>,
    Path(id): Path<String>,
    Json(body): Json<AddEssaysRequest>,
) -> ApiResult<Response> {
    let batch_id = batch_id(&id)?;
    let mut fields = Fields::default();
    if body.essays.is_empty() {
        fields.0.push(FieldError {
            field: "essays".into(),
            reason: "must contain at least one essay".into(),
        });
    }
    if body.essays.len() > ExpectedEssayCount::MAX as usize {
        fields.0.push(FieldError {
            field: "essays".into(),
            reason: format!("must contain at most {} essays", ExpectedEssayCount::MAX),
        });
    }
    let mut essays = Vec::with_capacity(body.essays.len());
    for (i, essay) in body.essays.into_iter().enumerate() {
        let prefix = format!("essays[{i}]");
        let essay_id = match essay.essay_id {
            Some(raw) => fields.check(Some(&prefix), EssayId::parse(raw)),
            None => EssayId::parse(Uuid::new_v4().to_string()).ok(),
        };
        let title = fields.check(Some(&prefix), EssayTitle::parse(essay.title));
        let text = fields.check(Some(&prefix), EssayText::parse(essay.text));
        if let (Some(essay_id), Some(title), Some(text)) = (essay_id, title, text) {
            essays.push(Essay {
                essay_id,
                title,
                text,
            });
        }
    }
    let command = fields.finish(Some(BatchCommand::AddEssays { essays }))?;
    let done = execute(&state, &user, correlation, batch_id, command, true).await?;
    Ok(accepted(done, correlation, None))
}

#[utoipa::path(post, path = "/v1/batches/{id}/pipelines", tag = "batches", request_body = RequestPipelineRequest,
    description = "Requests a pipeline for the caller's batch: its phases run in dependency order, processors answer through the results topic or POST /v1/internal/results.",
    params(("id" = Uuid, Path, description = "Batch id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, description = "Requested; the event is durable", body = AcceptedResponse, headers(("Location" = String, description = "The batch"))),
        (status = 404, description = "`not-found`: no such batch, or another user's", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`no-essays`, `essays-incomplete`, `pipeline-in-progress`, `unknown-pipeline`, `batch-cancelled`, `concurrent-modification`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation`: `pipeline` is not configured, or a field has the wrong type", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn request_pipeline(
    State(state): State<AppState>,
    user: AuthUser,
    Extension(correlation): Extension<CorrelationId>,
    Path(id): Path<String>,
    Json(body): Json<RequestPipelineRequest>,
) -> ApiResult<Response> {
    let batch_id = batch_id(&id)?;
    let mut fields = Fields::default();
    let pipeline = fields.check(None, Phase::parse(body.pipeline));
    if let Some(p) = &pipeline
        && !state.commands.services().pipelines.contains(p)
    {
        let known: Vec<String> = state
            .commands
            .services()
            .pipelines
            .phases()
            .map(|p| p.to_string())
            .collect();
        fields.0.push(FieldError {
            field: "pipeline".into(),
            reason: format!("unknown pipeline; expected one of {}", known.join(", ")),
        });
    }
    let request_id = body
        .request_id
        .map_or_else(RequestId::new, RequestId::from_uuid);
    let command = fields.finish(pipeline.map(|pipeline| BatchCommand::RequestPipeline {
        request_id,
        pipeline,
    }))?;
    let done = execute(&state, &user, correlation, batch_id, command, true).await?;
    Ok(accepted(done, correlation, Some(request_id)))
}

#[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "batches", request_body(content = Option<CancelRequest>),
    description = "Cancels the caller's batch; the body is optional.",
    params(("id" = Uuid, Path, description = "Batch id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, description = "Cancelled; the event is durable", body = AcceptedResponse, headers(("Location" = String, description = "The batch"))),
        (status = 404, description = "`not-found`: no such batch, or another user's", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`batch-cancelled`: already cancelled; `concurrent-modification`", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn cancel_batch(
    State(state): State<AppState>,
    user: AuthUser,
    Extension(correlation): Extension<CorrelationId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let batch_id = batch_id(&id)?;
    let body = body.map_err(json::body_rejection)?;
    let body: CancelRequest = if body.is_empty() {
        CancelRequest::default()
    } else {
        json::require_json(&headers)?;
        json::parse(&body)?
    };
    if let Some(reason) = &body.reason
        && let Err(e) = domain::values::check_no_nul("reason", reason)
    {
        return Err(ApiError::invalid(e.field, e.reason));
    }
    if let Some(reason) = &body.reason
        && reason.chars().count() > 500
    {
        return Err(ApiError::invalid(
            "reason",
            "must be at most 500 characters",
        ));
    }
    let command = BatchCommand::CancelBatch {
        reason: body.reason,
    };
    let done = execute(&state, &user, correlation, batch_id, command, true).await?;
    Ok(accepted(done, correlation, None))
}

// ---- queries --------------------------------------------------------------------------------

/// `min_position`: wait until the read model has applied this consistency token.
#[derive(Deserialize)]
pub struct Consistency {
    pub min_position: Option<i64>,
}

pub async fn wait_until_applied(
    state: &AppState,
    projection: &str,
    min_position: Option<i64>,
) -> ApiResult<()> {
    let Some(position) = min_position else {
        return Ok(());
    };
    if position <= 0 {
        return Ok(());
    }
    match state
        .reads
        .wait_for(projection, position, state.settings.consistency_wait())
        .await?
    {
        Reached::Yes => Ok(()),
        Reached::TimedOut => Err(ApiError::NotYetConsistent(position)),
        Reached::UnknownPosition => Err(ApiError::BadQuery(FieldError {
            field: "min_position".into(),
            reason: "no event has this position".into(),
        })),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchQuery {
    at_version: Option<i64>,
    min_position: Option<i64>,
}

async fn visible_summary(state: &AppState, user: &AuthUser, id: &str) -> ApiResult<BatchSummary> {
    let id = batch_id(id)?;
    match state.reads.batch_summary(&id.to_string()).await? {
        Some(summary) if user.may_read(&summary.owner_id) => Ok(summary),
        Some(_) => Err(ApiError::Hidden(SOMEONE_ELSES)),
        None => Err(ApiError::NotFound),
    }
}

#[utoipa::path(get, path = "/v1/batches/{id}", tag = "batches",
    description = "The whole batch: summary, essays and outcomes. Answers `If-None-Match` with 304.",
    params(("id" = Uuid, Path, description = "Batch id"),
        ("at_version" = Option<i64>, Query, minimum = 1, description = "The batch as it was after this event, rebuilt from the log (400 `invalid-query` past the batch's latest version)"),
        ("min_position" = Option<i64>, Query, description = "Wait until the read model has applied this position (a command's `position`); 400 for a position no event has, 503 `not-yet-consistent` if not reached in time"),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` of an earlier answer: 304 if the batch is unchanged")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "The batch", body = BatchView, headers(("ETag" = String, description = "The batch's version, `\"<version>\"` (weak, `W/`, when compressed)"))),
        (status = 304, description = "Unchanged since If-None-Match", headers(("ETag" = String))),
        (status = 404, description = "`not-found`: no such batch, or another user's", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`not-yet-consistent`: `min_position` not reached in time; or the edge's 503s", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn get_batch(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Query(query): Query<BatchQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if let Some(version) = query.at_version {
        return batch_at_version(&state, &user, &id, version).await;
    }
    wait_until_applied(&state, "batch_state", query.min_position).await?;
    let etag_of = |version: i64| format!("\"{version}\"");
    let with_etag = |mut response: Response, etag: &str| {
        if let Ok(value) = HeaderValue::from_str(etag) {
            response.headers_mut().insert(header::ETAG, value);
        }
        response
    };
    // A conditional request is answered from the summary row alone: a client that holds the
    // current version never costs the batch's essays and outcomes.
    if headers.contains_key(header::IF_NONE_MATCH) {
        let summary = visible_summary(&state, &user, &id).await?;
        let etag = etag_of(summary.version);
        if crate::edge::none_match(&headers, &etag) {
            return Ok(with_etag(StatusCode::NOT_MODIFIED.into_response(), &etag));
        }
    }
    let batch_id = batch_id(&id)?;
    let (summary, json) = match state.reads.batch_json(&batch_id.to_string()).await? {
        Some((summary, json)) if user.may_read(&summary.owner_id) => (summary, json),
        Some(_) => return Err(ApiError::Hidden(SOMEONE_ELSES)),
        None => return Err(ApiError::NotFound),
    };
    let etag = etag_of(summary.version);
    let response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response();
    Ok(with_etag(response, &etag))
}

/// A batch's events up to `max_sequence`, if the caller may see the batch: the owner comes from
/// its first event, so history reads need no read model. Anyone else gets a 404.
/// Whether the caller may read the batch, from its first event (no read model needed, so a
/// batch registered a moment ago is found); anyone else gets a 404, before any history is
/// read.
async fn check_owner(state: &AppState, user: &AuthUser, batch_id: BatchId) -> ApiResult<()> {
    match state.log.batch_owner(batch_id).await? {
        Some(owner) if user.may_read(&owner.to_string()) => Ok(()),
        Some(_) => Err(ApiError::Hidden(SOMEONE_ELSES)),
        None => Err(ApiError::NotFound),
    }
}

/// The audit reason of a 404 for a batch that exists but is someone else's.
const SOMEONE_ELSES: &str = "another user's batch";

/// The batch as it was after event `version`, folded from the event log.
async fn batch_at_version(
    state: &AppState,
    user: &AuthUser,
    id: &str,
    version: i64,
) -> ApiResult<Response> {
    let batch_id = batch_id(id)?;
    if version < 1 {
        return Err(ApiError::BadQuery(FieldError {
            field: "at_version".into(),
            reason: "must be 1 or more".into(),
        }));
    }
    check_owner(state, user, batch_id).await?;
    // Folded page by page: one batch's history is read at most once, and held a page at a
    // time (a page is bounded in events and bytes), not whole.
    let (mut view, mut latest) = (None, 0);
    while latest < version {
        let page = state
            .log
            .read_batch_page(batch_id, latest, 500, commands::HISTORY_PAGE_BYTES)
            .await?;
        let Some(last) = page.events.last().map(|e| e.sequence) else {
            break;
        };
        view = page
            .events
            .iter()
            .take_while(|e| e.sequence <= version)
            .fold(view, BatchView::fold);
        latest = last;
    }
    if latest < version {
        return Err(ApiError::BadQuery(FieldError {
            field: "at_version".into(),
            reason: format!("the batch's latest version is {latest}"),
        }));
    }
    Ok(axum::Json(view).into_response())
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct BatchStatusResponse {
    batch_id: String,
    status: String,
    version: i64,
    essays_added: u32,
    expected_essay_count: u32,
    pipeline: Option<projections::batch_state::PipelineView>,
    phases: std::collections::BTreeMap<String, projections::PhaseCounts>,
}

#[utoipa::path(get, path = "/v1/batches/{id}/status", tag = "batches",
    description = "The batch's status and per-phase counts, without essays.",
    params(("id" = Uuid, Path, description = "Batch id"), ("min_position" = Option<i64>, Query, description = "Wait until the read model has applied this position")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "The batch's status", body = BatchStatusResponse),
        (status = 404, description = "`not-found`: no such batch, or another user's", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn get_status(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Query(consistency): Query<Consistency>,
) -> ApiResult<axum::Json<BatchStatusResponse>> {
    wait_until_applied(&state, "batch_state", consistency.min_position).await?;
    let summary = visible_summary(&state, &user, &id).await?;
    let phases = state.reads.phase_counts(&summary.batch_id).await?;
    Ok(axum::Json(BatchStatusResponse {
        batch_id: summary.batch_id,
        status: summary.status,
        version: summary.version,
        essays_added: summary.essay_count,
        expected_essay_count: summary.expected_essay_count,
        pipeline: summary.pipeline,
        phases,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
    min_position: Option<i64>,
}

#[utoipa::path(get, path = "/v1/batches", tag = "batches",
    description = "The caller's batches (every batch for an admin), newest first, in pages.",
    params(("status" = Option<String>, Query, description = "Only batches in this status"), ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "1 to 100, default 20"),
        ("cursor" = Option<String>, Query, max_length = 18, pattern = "^[0-9]+$", description = "next_cursor of the previous page"), ("min_position" = Option<i64>, Query, description = "Wait until the read model has applied this position")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "Batch summaries (no essays or outcomes: GET /v1/batches/{id} has them)", body = Page<BatchSummary>),
        (status = 400, description = "`invalid-query`: a bad `status`, `limit`, `cursor` or `min_position`", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn list_batches(
    State(state): State<AppState>,
    user: AuthUser,
    Query(query): Query<ListQuery>,
) -> ApiResult<axum::Json<Page<BatchSummary>>> {
    let bad = ApiError::bad_query;
    if let Some(status) = &query.status
        && BatchStatus::parse(status).is_none()
    {
        return Err(bad("status", "unknown status"));
    }
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(bad("limit", "must be between 1 and 100"));
    }
    let cursor = match &query.cursor {
        Some(c) => Some(
            parse_cursor(c).ok_or_else(|| bad("cursor", "not a cursor from a previous page"))?,
        ),
        None => None,
    };
    wait_until_applied(&state, "batch_state", query.min_position).await?;
    let owner = (!user.is_admin()).then(|| user.id.to_string());
    Ok(axum::Json(
        state
            .reads
            .list_batches(owner.as_deref(), query.status.as_deref(), limit, cursor)
            .await?,
    ))
}

/// A cursor as the service makes them: 1 to 18 ASCII digits (the published `pattern`), so
/// that a cursor is never refused for its size and nothing else (a sign, spaces) passes.
fn parse_cursor(raw: &str) -> Option<i64> {
    if (1..=18).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_digit()) {
        raw.parse().ok()
    } else {
        None
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct EventResponse {
    sequence: i64,
    position: i64,
    event_type: String,
    event_version: String,
    occurred_at: chrono::DateTime<chrono::Utc>,
    correlation_id: Uuid,
    causation_id: Option<Uuid>,
    user_id: Option<String>,
    payload: serde_json::Value,
}

/// The largest `limit` of `GET /v1/batches/{id}/events`, and the default.
const EVENTS_MAX_LIMIT: i64 = 1000;
const EVENTS_DEFAULT_LIMIT: i64 = 100;

/// `GET /v1/batches/{id}/events?after=&limit=`. Both are taken as text and parsed here, so that
/// a bad value is a 400 naming its field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// One page of a batch's history, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct EventPage {
    /// Events in sequence order, continuing exactly where the previous page ended.
    items: Vec<EventResponse>,
    /// Pass back as `after` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

impl EventsQuery {
    /// `(after, limit)`: the sequence to continue after (0 from the start) and the page size.
    fn parse(&self) -> ApiResult<(i64, i64)> {
        let limit = match &self.limit {
            None => EVENTS_DEFAULT_LIMIT,
            Some(raw) => raw
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=EVENTS_MAX_LIMIT).contains(l))
                .ok_or_else(|| {
                    ApiError::bad_query(
                        "limit",
                        format!("must be a whole number from 1 to {EVENTS_MAX_LIMIT}"),
                    )
                })?,
        };
        // The cursor is the last sequence of the previous page; clients treat it as opaque.
        let after = match &self.after {
            None => 0,
            Some(raw) => parse_cursor(raw)
                .ok_or_else(|| ApiError::bad_query("after", "not a cursor from a previous page"))?,
        };
        Ok((after, limit))
    }
}

#[utoipa::path(get, path = "/v1/batches/{id}/events", tag = "batches",
    description = "The batch's events, oldest first, in pages.",
    params(("id" = Uuid, Path, description = "Batch id"),
        ("after" = Option<String>, Query, max_length = 18, pattern = "^[0-9]+$", description = "next_cursor of the previous page; absent for the first page"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Events per page, 1 to 1000, default 100. A page also ends early once its payloads reach 4 MiB (always at least one event)")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "One page of the batch's events, oldest first", body = EventPage),
        (status = 400, description = "Bad limit or after", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn batch_events(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> ApiResult<axum::Json<EventPage>> {
    let batch_id = batch_id(&id)?;
    let (after, limit) = query.parse()?;
    check_owner(&state, &user, batch_id).await?;
    let page = state
        .log
        .read_batch_page(batch_id, after, limit, commands::HISTORY_PAGE_BYTES)
        .await?;
    let next_cursor = page
        .more
        .then(|| page.events.last().map(|e| e.sequence.to_string()))
        .flatten();
    Ok(axum::Json(EventPage {
        items: page.events.into_iter().map(event_response).collect(),
        next_cursor,
    }))
}

/// An event as the API shows it: the stored form is `{"EventType": {...}}`; `payload` is the
/// inner object.
fn event_response(e: commands::StoredEvent) -> EventResponse {
    let payload = match serde_json::to_value(&e.event) {
        Ok(serde_json::Value::Object(map)) if map.len() == 1 => {
            map.into_iter().next().map(|(_, v)| v).unwrap_or_default()
        }
        Ok(other) => other,
        Err(_) => serde_json::Value::Null,
    };
    EventResponse {
        sequence: e.sequence,
        position: e.at.position,
        event_type: e.event_type,
        event_version: e.event_version,
        occurred_at: e.metadata.occurred_at,
        correlation_id: e.metadata.correlation_id,
        causation_id: e.metadata.causation_id,
        user_id: e.metadata.user_id,
        payload,
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/batches", post(register_batch).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/status", get(get_status))
        .route("/v1/batches/{id}/events", get(batch_events))
        .route("/v1/batches/{id}/essays", post(add_essays))
        .route("/v1/batches/{id}/pipelines", post(request_pipeline))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
}
