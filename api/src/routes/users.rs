//! User administration, service API keys and the audit log (admin only; every change audited):
//!
//! - `GET /v1/admin/users?after=&limit=`, `POST /v1/admin/users`, `GET /v1/admin/users/{id}`,
//!   `PATCH /v1/admin/users/{id}` (JSON Merge Patch, RFC 7386, of `{role, status, tier}`),
//!   `DELETE /v1/admin/users/{id}`, `POST /v1/admin/users/{id}/password`;
//! - `GET /v1/admin/keys`, `POST /v1/admin/keys`, `POST /v1/admin/keys/{id}/rotate`,
//!   `DELETE /v1/admin/keys/{id}`;
//! - `GET /v1/admin/audit?action=&actor=&before=&limit=`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::auth::{AuthUser, Role};
use crate::error::{ApiError, ApiResult, Problem};
use crate::identity::audit::{self, AuditEntry};
use crate::identity::keys::{self, ApiKey, KeyError, NewApiKey};
use crate::identity::users::{self, User, UserError, UserPatch};
use crate::identity::{Actor, HashError};
use crate::json::{Json, Query as CheckedQuery};
use crate::state::AppState;

impl From<UserError> for ApiError {
    fn from(error: UserError) -> Self {
        match error {
            UserError::InvalidUsername => ApiError::invalid("username", error.to_string()),
            UserError::WeakPassword => ApiError::invalid("password", error.to_string()),
            UserError::Exists(_) => ApiError::Exists(error.to_string()),
            UserError::NotFound => ApiError::NotFound,
            UserError::Deleted => ApiError::StateConflict(error.to_string()),
            UserError::Concurrent => ApiError::Conflict(error.to_string()),
            UserError::LastAdmin => ApiError::StateConflict(error.to_string()),
            UserError::Busy(HashError::Failed(e)) => ApiError::Internal(e),
            UserError::Busy(e) => ApiError::Busy(e.to_string(), 1),
            UserError::Other(e) => ApiError::Internal(e),
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(error: KeyError) -> Self {
        match error {
            KeyError::NoUser => ApiError::invalid("user_id", "no such user"),
            KeyError::NotService => ApiError::invalid("user_id", error.to_string()),
            KeyError::BadName => ApiError::invalid("name", error.to_string()),
            KeyError::NotFound => ApiError::NotFound,
            KeyError::Revoked => ApiError::StateConflict(error.to_string()),
            KeyError::Store(e) => ApiError::Internal(e.into()),
            KeyError::Other(e) => ApiError::Internal(e),
        }
    }
}

/// The caller of an admin route: an authenticated admin (401, 403 otherwise), and the audit
/// log's actor for what it does (with the client's address).
pub(super) struct Admin {
    actor: Actor,
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        user.require(&[Role::Admin], "admin")?;
        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(address)| address.ip());
        Ok(Self {
            actor: Actor::user(&user, client),
        })
    }
}

fn created<T: Serialize>(location: String, body: T) -> Response {
    let mut response = (StatusCode::CREATED, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A page of users.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct UserPage {
    items: Vec<User>,
    /// Pass as `after` for the next page; absent on the last.
    next_cursor: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct UserListQuery {
    /// The last username of the previous page.
    after: Option<String>,
    /// 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

fn limit(value: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    let limit = value.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_query(
            "limit",
            format!("must be from 1 to {max}"),
        ))
    }
}

#[utoipa::path(get, path = "/v1/admin/users", tag = "admin", params(UserListQuery),
    description = "Admin role.",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "Users in username order, deleted ones included", body = UserPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn list_users(
    State(state): State<AppState>,
    _admin: Admin,
    CheckedQuery(query): CheckedQuery<UserListQuery>,
) -> ApiResult<axum::Json<UserPage>> {
    let limit = limit(query.limit, 100, 500)?;
    let mut items = users::list(state.storage.pool(), query.after.as_deref(), limit + 1).await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|u| u.username.clone())
    } else {
        None
    };
    Ok(axum::Json(UserPage { items, next_cursor }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"username": "ada", "role": "teacher", "password": "correct horse battery staple"}))]
pub(super) struct NewUser {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    username: String,
    role: Role,
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
}

#[utoipa::path(post, path = "/v1/admin/users", tag = "admin", request_body = NewUser,
    description = "Admin role.",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, description = "Created (audited as user.create)", body = User, headers(("Location" = String))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The username is taken (by a deleted user too)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The hashing queue is full", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn create_user(
    State(state): State<AppState>,
    admin: Admin,
    Json(body): Json<NewUser>,
) -> ApiResult<Response> {
    let created_user = users::create(
        state.storage.pool(),
        state.identity.hasher(),
        &admin.actor,
        &body.username,
        body.role,
        &body.password,
    )
    .await?;
    Ok(created(
        format!("/v1/admin/users/{}", created_user.id),
        created_user,
    ))
}

#[utoipa::path(get, path = "/v1/admin/users/{id}", tag = "admin",
    params(("id" = uuid::Uuid, Path, description = "the user's id")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = User),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn get_user(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<User>> {
    let found = users::get(state.storage.pool(), &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(axum::Json(found))
}

#[utoipa::path(patch, path = "/v1/admin/users/{id}", tag = "admin",
    params(("id" = uuid::Uuid, Path, description = "the user's id")),
    request_body(content = UserPatch, content_type = "application/merge-patch+json",
        description = "JSON Merge Patch (RFC 7386): `role` and/or `status` (`active` or `disabled`) and/or `tier` (a configured rate-limit tier, or `null` for the default tier; docs/rate-limits.md). A role change or a disable takes effect on the user's next request and closes their WebSocket connections (4403); a tier change keeps sessions and applies from the next request."),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "The user after the change (audited as user.update)", body = User),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The user is deleted", body = Problem, content_type = "application/problem+json"),
        (status = 415, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A value out of range, or a tier that is not configured (field `tier`)", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn patch_user(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> ApiResult<axum::Json<User>> {
    // RFC 7386: `null` removes a member; role and status cannot be removed.
    for field in ["role", "status"] {
        if body.get(field).is_some_and(serde_json::Value::is_null) {
            return Err(ApiError::invalid(field, "cannot be removed (null)"));
        }
    }
    let patch: UserPatch = crate::json::parse(body.to_string().as_bytes())?;
    if let Some(Some(tier)) = &patch.tier
        && !state.limits.has_tier(tier)
    {
        return Err(ApiError::invalid(
            "tier",
            format!(
                "not a configured tier (configured: {})",
                state.limits.tier_names().join(", ")
            ),
        ));
    }
    if patch.status == Some(users::UserStatus::Deleted) {
        return Err(ApiError::invalid(
            "status",
            "must be active or disabled (delete with DELETE)",
        ));
    }
    let updated = users::update(state.storage.pool(), &admin.actor, &id, &patch).await?;
    state.identity.changed_user(&id);
    Ok(axum::Json(updated))
}

#[utoipa::path(delete, path = "/v1/admin/users/{id}", tag = "admin",
    params(("id" = uuid::Uuid, Path, description = "the user's id")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 204, description = "Deleted (audited as user.delete): the user can no longer log in, their sessions and keys are revoked, their batches stay readable by admins"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn delete_user(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    users::delete(state.storage.pool(), &admin.actor, &id).await?;
    state.identity.changed_user(&id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"password": "another long passphrase"}))]
pub(super) struct NewPassword {
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
}

#[utoipa::path(post, path = "/v1/admin/users/{id}/password", tag = "admin",
    params(("id" = uuid::Uuid, Path, description = "the user's id")),
    request_body = NewPassword,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 204, description = "Set (audited as user.password); every session and token of the user stops working"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The user is deleted", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The hashing queue is full", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn reset_password(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    Json(body): Json<NewPassword>,
) -> ApiResult<StatusCode> {
    users::reset_password(
        state.storage.pool(),
        state.identity.hasher(),
        &admin.actor,
        &id,
        &body.password,
    )
    .await?;
    state.identity.changed_user(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// Every API key (never their secrets).
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct KeyList {
    items: Vec<ApiKey>,
}

#[utoipa::path(get, path = "/v1/admin/keys", tag = "admin",
    description = "Admin role.",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "API keys, newest first (at most 1 000)", body = KeyList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn list_keys(
    State(state): State<AppState>,
    _admin: Admin,
) -> ApiResult<axum::Json<KeyList>> {
    Ok(axum::Json(KeyList {
        items: keys::list(state.storage.pool(), 1000).await?,
    }))
}

/// A key to make. `name` may not hold U+0000 and may not be blank.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user_id": "0b0d7e8a-4f5e-4f53-9a43-8f7d0c1e2a3b", "name": "spellcheck processor"}))]
pub(super) struct NewKey {
    /// A user of the service role (422 naming `user_id` for a user that does not exist or is
    /// not of the service role).
    #[schema(format = Uuid)]
    user_id: String,
    /// What the key is for.
    #[schema(min_length = 1, max_length = 100)]
    name: String,
}

#[utoipa::path(post, path = "/v1/admin/keys", tag = "admin", request_body = NewKey,
    description = "Admin role.",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, description = "The key, shown this once (audited as key.create)", body = NewApiKey, headers(("Location" = String))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No such user, not a service user, or a bad name", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn create_key(
    State(state): State<AppState>,
    admin: Admin,
    Json(body): Json<NewKey>,
) -> ApiResult<Response> {
    let key = keys::create(
        state.storage.pool(),
        &admin.actor,
        &body.user_id,
        &body.name,
    )
    .await?;
    Ok(created(format!("/v1/admin/keys/{}", key.info.id), key))
}

#[utoipa::path(post, path = "/v1/admin/keys/{id}/rotate", tag = "admin",
    params(("id" = String, Path, pattern = "^[0-9A-Fa-f]{16}$", description = "the key's id (the 16 hex characters after `efk_`)")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, description = "The new key, shown this once; the old one works until its `expires_at` (the grace period) (audited as key.rotate)", body = NewApiKey, headers(("Location" = String))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The key is revoked", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn rotate_key(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let key = keys::rotate(
        state.storage.pool(),
        &admin.actor,
        &id,
        state.identity.options().key_rotation_grace,
    )
    .await?;
    state.identity.changed_user(&key.info.user_id);
    Ok(created(format!("/v1/admin/keys/{}", key.info.id), key))
}

#[utoipa::path(delete, path = "/v1/admin/keys/{id}", tag = "admin",
    params(("id" = String, Path, pattern = "^[0-9A-Fa-f]{16}$", description = "the key's id (the 16 hex characters after `efk_`)")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 204, description = "Revoked at once (audited as key.revoke); revoking a revoked key changes nothing"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn revoke_key(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let key = keys::revoke(state.storage.pool(), &admin.actor, &id).await?;
    state.identity.changed_user(&key.user_id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    /// Only this action (for example `login.failed`, `user.update`).
    action: Option<String>,
    /// Only this actor (a username, `cli:<user>`, `anonymous` for refused requests without
    /// a valid credential, `system`).
    actor: Option<String>,
    /// Only this outcome.
    #[param(inline)]
    outcome: Option<AuditOutcome>,
    /// Only records at or after this instant (RFC 3339, for example `2026-11-30T08:00:00Z`).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Records older than this id (the last id of the previous page).
    before: Option<i64>,
    /// 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

/// An audit record's outcome.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum AuditOutcome {
    Ok,
    Refused,
    Failed,
}

impl AuditOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// A page of the audit log, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AuditPage {
    items: Vec<AuditEntry>,
    /// Pass as `before` for the next page; absent on the last.
    next_cursor: Option<i64>,
}

#[utoipa::path(get, path = "/v1/admin/audit", tag = "admin", params(AuditQuery),
    description = "Admin role.",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "Audit records, newest first", body = AuditPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn audit_log(
    State(state): State<AppState>,
    _admin: Admin,
    CheckedQuery(query): CheckedQuery<AuditQuery>,
) -> ApiResult<axum::Json<AuditPage>> {
    let limit = limit(query.limit, 100, 500)?;
    let storable = |s: &Option<String>| s.as_deref().is_none_or(users::is_storable);
    if !storable(&query.action) || !storable(&query.actor) {
        return Ok(axum::Json(AuditPage {
            items: Vec::new(),
            next_cursor: None,
        }));
    }
    let since = query
        .since
        .as_deref()
        .map(|since| {
            chrono::DateTime::parse_from_rfc3339(since)
                .map(|t| t.timestamp_millis())
                .map_err(|_| {
                    ApiError::bad_query(
                        "since",
                        "must be an RFC 3339 date-time, like 2026-11-30T08:00:00Z",
                    )
                })
        })
        .transpose()?;
    let mut items = audit::list(
        state.storage.pool(),
        &audit::Filter {
            action: query.action,
            actor: query.actor,
            outcome: query.outcome.map(|o| o.as_str().to_owned()),
            since,
            before: query.before,
            limit: limit + 1,
        },
    )
    .await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|e| e.id)
    } else {
        None
    };
    Ok(axum::Json(AuditPage { items, next_cursor }))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/users", get(list_users).post(create_user))
        .route(
            "/v1/admin/users/{id}",
            get(get_user).patch(patch_user).delete(delete_user),
        )
        .route("/v1/admin/users/{id}/password", post(reset_password))
        .route("/v1/admin/keys", get(list_keys).post(create_key))
        .route("/v1/admin/keys/{id}", axum::routing::delete(revoke_key))
        .route("/v1/admin/keys/{id}/rotate", post(rotate_key))
        .route("/v1/admin/audit", get(audit_log))
}
