//! The HTTP routes: one module per feature, each exporting `router()`; this file only merges.

mod admin;
mod auth;
mod batches;
pub mod contract;
mod dashboard;
mod docs;
mod health;
mod internal;
pub mod page;
mod pipelines;
mod users;
mod ws;

use axum::Router;

use crate::error::ApiError;
use crate::state::AppState;

pub(crate) use docs::ApiDoc;
pub(crate) use health::ops_router;

/// The OpenAPI document a node with `settings` publishes at `/openapi.json`, built without
/// connecting to anything (`essayflow openapi`; the TypeScript client is generated from it).
///
/// # Errors
/// An unreadable or invalid pipeline file, or invalid rate-limit tiers.
pub fn openapi_document(settings: &crate::settings::Settings) -> anyhow::Result<serde_json::Value> {
    let pipelines = crate::startup::pipelines(settings)?;
    let limits = crate::edge::ratelimit::Limits::new(&settings.rate_limit)?;
    Ok(docs::document_for(&docs::runtime(&pipelines, &limits)))
}

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
        .merge(page::router())
        .merge(pipelines::router())
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}
