//! essayflow's domain: pure, with no I/O of any kind.
//!
//! - [`Batch`] is the one aggregate: a batch of essays and the pipelines run over it. Its
//!   [`Batch::decide`] turns a [`BatchCommand`] into [`BatchEvent`]s or a [`BatchError`].
//! - [`values`] holds the value objects that parse raw input ([`values::Title`],
//!   [`values::CourseCode`], ...), so invalid states cannot be represented.
//! - [`PipelineCatalog`] holds the configured pipelines and resolves a request into steps.
//!
//! The aggregate implements cqrs-es's `Aggregate`; persistence lives in the `commands` crate.

mod batch;
mod command;
mod error;
mod event;
mod pipeline;
pub mod values;

pub use batch::{Batch, BatchServices, BatchStatus};
pub use command::BatchCommand;
pub use error::BatchError;
pub use event::{BatchEvent, EVENT_VERSION, Essay, PipelineOutcome};
pub use pipeline::{
    CatalogError, DEFAULT_PIPELINES_TOML, PipelineCatalog, Resolution, ResolveError,
};
