//! `GET /v1/ws`: the upgrade to a live projection stream (protocol: docs/websocket.md).
//!
//! The credential is checked before the upgrade, from (in this order) `X-API-Key` (service
//! accounts), `Authorization: Bearer <token>` (the scheme in any case), a
//! `Sec-WebSocket-Protocol` entry `bearer.<token>` (browsers cannot set headers; offer
//! `essayflow.v1` beside it, which the server selects), or `?access_token=`. A missing,
//! forged, expired or revoked credential gets 401 problem+json and no upgrade.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::get;
use serde::Deserialize;
use tokio::time::Instant;

use crate::auth::{bearer_token, subprotocol_token};
use crate::error::{ApiError, ApiResult};
use crate::json::Query;
use crate::live::{PROTOCOL, session};
use crate::state::AppState;

#[derive(Deserialize)]
pub(super) struct WsQuery {
    access_token: Option<String>,
}

/// The token the client presented, if any.
fn presented_token(headers: &HeaderMap, query: &WsQuery) -> Result<String, ApiError> {
    if let Some(token) = bearer_token(headers)? {
        return Ok(token.to_owned());
    }
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for protocol in offered {
        if let Some(token) = subprotocol_token(protocol) {
            return Ok(token.to_owned());
        }
    }
    query
        .access_token
        .clone()
        .ok_or(ApiError::Unauthorized("an access token is required"))
}

#[utoipa::path(get, path = "/v1/ws", tag = "live",
    params(("access_token" = Option<String>, Query, description = "for browsers; or `Authorization: Bearer`, or a `bearer.<token>` WebSocket subprotocol, or `X-API-Key`")),
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 101, description = "switched to the WebSocket protocol of docs/websocket.md"),
        (status = 401, description = "missing, forged, expired or revoked credential", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 429, description = "this user has `ws.max_connections_per_user` WebSocket connections open on this node (`too-many-websockets`)", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "this node has `ws.max_connections` WebSocket connections open (`too-many-websockets`), with Retry-After", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 426, description = "not a WebSocket upgrade (`websocket-upgrade-required`)", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(super) async fn ws(
    State(state): State<AppState>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let (user, left) = if headers.contains_key("x-api-key") {
        // A key lasts until its grace period ends (a rotated key) or, else, indefinitely;
        // revoking it closes the connection at once.
        let user = state.identity.authenticate(&headers).await?;
        let left = user
            .credential_expires_at
            .map_or(10 * 365 * 24 * 3600, |at| {
                u64::try_from((at - chrono::Utc::now().timestamp_millis()) / 1000).unwrap_or(0)
            });
        (user, left)
    } else {
        let token = presented_token(&headers, &query)?;
        let (user, claims) = state.identity.authenticate_token(&token).await?;
        let left = u64::try_from(claims.exp - chrono::Utc::now().timestamp()).unwrap_or(0);
        (user, left)
    };
    let upgrade = upgrade.map_err(|e| ApiError::UpgradeRequired(e.body_text()))?;
    let limits = &state.settings.ws;
    // Held by the session (or dropped with the closure if the upgrade never happens).
    let slot = state
        .live
        .slots
        .take(
            user.id,
            limits.max_connections,
            limits.max_connections_per_user,
        )
        .inspect_err(|refused| {
            if let ApiError::TooManyWebSockets(per_user) = refused {
                let cap = if *per_user { "user" } else { "node" };
                state
                    .metrics
                    .ws_refused
                    .get_or_create(&crate::metrics::CapLabels { cap })
                    .inc();
            }
        })?;
    let expires_at = Instant::now() + Duration::from_secs(left);
    let tracker = state.live.tracker.clone();
    let connect = session::Connect {
        user: Box::new(user),
        expires_at,
        live: state.live.clone(),
    };
    Ok(upgrade
        .protocols([PROTOCOL])
        // Small buffers: most connections are idle, and memory per connection is what limits
        // how many one node holds.
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(limits.max_message_bytes)
        .max_frame_size(limits.max_message_bytes)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                let _slot = slot;
                session::run(connect, socket).await
            })
        }))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/ws", get(ws))
}
