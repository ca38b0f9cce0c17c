//! `GET /v1/pipelines`: the pipeline catalog this node is configured with (`config/pipelines.toml`
//! or `ESSAYFLOW_PIPELINES`), so that a client can offer what `POST /v1/batches/{id}/pipelines`
//! accepts without hard-coding it.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::auth::AuthUser;
use crate::state::AppState;

/// One pipeline of the catalog.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PipelineDefinition {
    /// The name to request (`POST /v1/batches/{id}/pipelines {"pipeline": name}`).
    #[schema(example = "nlp")]
    pub name: String,
    /// The pipelines that run before it (unless they already succeeded for every essay), as
    /// configured; the steps of a request are resolved from these.
    #[schema(example = json!(["spellcheck"]))]
    pub requires: Vec<String>,
}

/// The catalog, in name order.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PipelineCatalogView {
    pub items: Vec<PipelineDefinition>,
}

#[utoipa::path(get, path = "/v1/pipelines", tag = "batches",
    description = "The pipelines this service is configured with, each with its prerequisites, in name order (any role).",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "The pipeline catalog", body = PipelineCatalogView)))]
pub(super) async fn list_pipelines(
    State(state): State<AppState>,
    _user: AuthUser,
) -> Json<PipelineCatalogView> {
    let catalog = &state.commands.services().pipelines;
    Json(PipelineCatalogView {
        items: catalog
            .phases()
            .map(|phase| PipelineDefinition {
                name: phase.to_string(),
                requires: catalog
                    .prerequisites(phase)
                    .unwrap_or_default()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            })
            .collect(),
    })
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/pipelines", get(list_pipelines))
}
