//! The embedded backend: the whole store in one sled database in a local directory, owned
//! by one process.
//!
//! - [`SledQueue`] (`queue.rs`): the queue and the log on sled, with group commit
//!   (`flusher.rs`) and the record layouts of `record.rs`.
//! - [`ResilientQueue`] (`resilient.rs`): what chatq runs: a [`SledQueue`] with a free-space
//!   reserve and a reopen after disk errors.
//!
//! sled's types stay in this directory: its errors become [`StoreError::Backend`] here, and
//! [`is_disk_failure`] reads them back out for the reopen logic.

pub mod backup;
pub mod codec;
mod flusher;
mod queue;
pub mod record;
mod resilient;
mod spent;
#[cfg(test)]
mod tests;

pub use flusher::{FlushError, FlushStats};
pub use queue::SledQueue;
pub use resilient::ResilientQueue;

use super::StoreError;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        Self::Backend(Box::new(e))
    }
}

impl From<codec::CodecError> for StoreError {
    fn from(e: codec::CodecError) -> Self {
        Self::Corrupt(e.to_string())
    }
}

impl From<FlushError> for StoreError {
    fn from(e: FlushError) -> Self {
        match e {
            FlushError::ShuttingDown => Self::Unavailable(super::Unavailable::Closed),
            e => Self::Backend(Box::new(e)),
        }
    }
}

/// The disk failed under a write: sled stops writing after its first IO error, so the
/// store must be reopened ([`ResilientQueue`] does).
pub fn is_disk_failure(e: &StoreError) -> bool {
    let StoreError::Backend(source) = e else {
        return false;
    };
    if let Some(sled::Error::Io(_)) = source.downcast_ref::<sled::Error>() {
        return true;
    }
    source
        .downcast_ref::<FlushError>()
        .is_some_and(|f| !matches!(f, FlushError::ShuttingDown))
}
