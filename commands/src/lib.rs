//! essayflow's write side.
//!
//! - [`Storage`] opens the database chosen by its URL (PostgreSQL or SQLite), runs the
//!   migrations of `migrations/` and carries the "events appended" signal.
//! - [`EventRepository`] is cqrs-es's event repository over postgres-es or sqlite-es.
//! - [`CommandService`] loads a batch, decides a command and appends the events, retrying on
//!   optimistic-concurrency conflicts; it stamps every event with [`EventMetadata`].
//! - [`EventLog`] reads every event in global commit order, for the read side.

mod appender;
mod log;
mod repository;
mod service;
mod storage;

pub use appender::{AppendError, Appender};
pub use log::{EventLog, EventMetadata, LogError, LogPosition, StoredEvent};
pub use repository::EventRepository;
pub use service::{Accepted, CommandContext, CommandError, CommandService};
pub use storage::{CheckpointBoard, Engine, Storage, StorageError, StorageOptions};

/// The upcasters applied to stored events before they are deserialised. Empty while every
/// event is at its first version; a changed event shape adds one here.
pub fn upcasters() -> Vec<Box<dyn cqrs_es::persist::EventUpcaster>> {
    Vec::new()
}
