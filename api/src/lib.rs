//! essayflow's API process: the axum HTTP server, authentication, configuration and the
//! command-line entry points.
//!
//! - [`startup::Application`] builds everything from [`settings::Settings`] and serves.
//! - [`routes`] has one module per feature; [`error::ApiError`] is the one error type
//!   (problem+json); [`auth`] is the request extractor; [`identity`] holds users, sessions
//!   with rotating refresh tokens, access tokens, API keys, password hashing, login
//!   throttling and the audit log.
//! - [`pipeline`] starts the conductor, the relay, the results ingress and the development
//!   processor simulator.
//! - [`live`] streams projection changes to WebSocket clients (`GET /v1/ws`); [`tls`] serves
//!   HTTPS and WSS.
//! - [`server`] accepts connections within their limits (header-read timeout, connection
//!   cap, shutdown); [`edge`] is every layer in front of the routes (rate limits, load
//!   shedding, timeouts, CORS, security headers, compression, the database circuit breaker).
//! - [`ops`] is what `/readyz` and `/metrics` read (a cached snapshot) and the operations
//!   listener; the database circuit breaker is [`edge::breaker`]. [`metrics`] is the
//!   instance's OpenMetrics registry, the HTTP metrics layer and the `/metrics` encoding.
//! - Only this crate knows HTTP.

pub mod auth;
pub mod cli;
pub mod edge;
pub mod error;
pub mod identity;
pub mod jobs;
pub mod json;
pub mod live;
pub mod metrics;
pub mod ops;
pub mod pipeline;
mod routes;
pub mod server;
pub mod settings;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod tls;
