//! chatq: a chat bot backend in one binary.
//!
//! # Layout
//!
//! - [`clock`]: the time as the queue sees it (injectable for tests).
//! - [`store`]: the durable job queue and interaction log on sled, behind [`store::JobQueue`].

pub mod clock;
pub mod store;
