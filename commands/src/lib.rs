//! essayflow's write side.
//!
//! - [`Storage`] opens the database chosen by its URL (PostgreSQL or SQLite), runs the
//!   migrations of `migrations/` and carries the "events appended" signal.
//! - [`EventRepository`] is cqrs-es's event repository over postgres-es or sqlite-es.
//! - [`CommandService`] loads a batch, decides a command and appends the events, retrying on
//!   optimistic-concurrency conflicts; it stamps every event with [`EventMetadata`].
//! - [`EventLog`] reads every event in global commit order, for the read side.
//! - The pipeline workers: the [`conductor`] (drives pipelines), the [`relay`] (publishes
//!   events and phase requests to the [`bus`]: Kafka or in process) and the [`ingress`]
//!   (records processors' results). All three follow the log or a topic with a checkpoint
//!   ([`follower`]) and are idempotent, so that at-least-once delivery is exactly once in
//!   effect. [`messages`] is the Kafka contract; [`simulator`] a development stand-in for the
//!   processing services; [`deadletters`] lists and replays the results dead-letter topic.
//! - [`trace`] carries the W3C trace context (and with it the correlation id) from a request
//!   through the event store, the bus and the processors' results.
//! - [`metrics`]: the write side's metric families (commands, appends, the relay), registered
//!   in the registry of the service instance that records into them.

mod appender;
pub mod bus;
pub mod checkpoint;
pub mod conductor;
pub mod deadletters;
pub mod follower;
pub mod ingress;
pub mod leadership;
mod log;
pub mod messages;
pub mod metrics;
pub mod relay;
mod repository;
mod service;
pub mod simulator;
mod storage;
pub mod trace;

pub use appender::{AppendError, Appender};
pub use log::{
    BatchPage, EventLog, EventMetadata, HISTORY_PAGE_BYTES, LAG_COUNT_LIMIT, LogError, LogPosition,
    StoredEvent,
};
pub use repository::EventRepository;
pub use service::{Accepted, CommandContext, CommandError, CommandService};
pub use storage::{
    CheckpointBoard, Engine, Storage, StorageError, StorageOptions, normalize_scheme,
};
pub use trace::TraceContext;

/// The upcasters applied to stored events before they are deserialised. Empty while every
/// event is at its first version; a changed event shape adds one here.
pub fn upcasters() -> Vec<Box<dyn cqrs_es::persist::EventUpcaster>> {
    Vec::new()
}
