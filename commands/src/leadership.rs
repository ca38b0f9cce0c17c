//! One active worker of each kind across nodes: the holder of a PostgreSQL session advisory lock
//! (see [`Storage::try_lead`]). On SQLite there is one process, which always leads.

use sqlx::AnyConnection;

use crate::storage::{Engine, Storage};

/// Where this node stands after [`Leadership::ensure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lead {
    /// This node took the lock just now: state cached while another node led is stale.
    Taken,
    /// This node already held it (or the engine needs no lock).
    Held,
    /// Another node holds it; wait and try again.
    Standby,
}

/// A worker's claim to run, held as long as its dedicated connection lives.
pub struct Leadership {
    storage: Storage,
    kind: &'static str,
    name: &'static str,
    held: Option<AnyConnection>,
}

impl Leadership {
    pub fn new(storage: Storage, kind: &'static str, name: &'static str) -> Self {
        Self {
            storage,
            kind,
            name,
            held: None,
        }
    }

    /// Takes the lock if this node does not hold it yet.
    pub async fn ensure(&mut self) -> Result<Lead, sqlx::Error> {
        if self.held.is_some() || self.storage.engine() != Engine::Postgres {
            return Ok(Lead::Held);
        }
        match self.storage.try_lead(self.kind, self.name).await? {
            Some(connection) => {
                self.held = Some(connection);
                Ok(Lead::Taken)
            }
            None => Ok(Lead::Standby),
        }
    }

    /// Gives the lock up (after a failure that may have taken its connection down): the next
    /// [`Leadership::ensure`] proves it again.
    pub fn release(&mut self) {
        self.held = None;
    }
}
