//! What every handler shares.

use std::sync::Arc;

use commands::ingress::Ingress;
use commands::{CommandService, EventLog, Storage};
use projections::ReadModels;

use crate::identity::Identity;
use crate::pipeline::PipelineStatus;
use crate::settings::Settings;

/// Handed to every handler and middleware: one `Arc`, so that a request's clones (one per
/// stateful layer and for the handler) cost one reference count each, not one per service.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// Everything the handlers share (reached through [`AppState`]).
pub struct Services {
    pub storage: Storage,
    pub commands: CommandService,
    pub reads: ReadModels,
    pub log: EventLog,
    /// Users, sessions, tokens, API keys and the audit log.
    pub identity: Identity,
    pub settings: Arc<Settings>,
    /// This instance's metrics registry and the API's families ([`crate::metrics`]).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Records processors' results (the HTTP twin of the results topic).
    pub ingress: Ingress,
    pub pipeline: Arc<PipelineStatus>,
    /// Live projection streams (`GET /v1/ws`).
    pub live: Arc<crate::live::Live>,
    /// Rebuilds and verifications of the read models.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Open and refused HTTP connections ([`crate::server`]).
    pub connections: Arc<crate::server::ConnectionStats>,
    /// The database circuit breaker ([`crate::edge::breaker`]).
    pub breaker: Arc<crate::edge::breaker::Breaker>,
    /// The cached reading behind `/readyz` and `/metrics` ([`crate::ops`]).
    pub ops: Arc<crate::ops::OpsCache>,
    /// This node's HTTP rate limiters ([`crate::edge::ratelimit`]).
    pub limits: Arc<crate::edge::ratelimit::Limits>,
}
