//! The HTTP routes: one module per feature, each exporting `router()`; this file only merges.

mod admin;
mod auth;
mod batches;
pub mod contract;
mod dashboard;
mod docs;
mod health;
mod internal;
mod users;
mod ws;

use axum::Router;

use crate::error::ApiError;
use crate::state::AppState;

pub(crate) use docs::ApiDoc;
pub(crate) use health::ops_router;

/// Every route; the OpenAPI document is built here, from the configuration in `state`.
pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .merge(auth::router())
        .merge(batches::router())
        .merge(dashboard::router())
        .merge(admin::router())
        .merge(users::router())
        .merge(health::router())
        .merge(internal::router())
        .merge(ws::router())
        .merge(docs::router(state))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}
