//! chatq: a chat bot backend in one binary.
//!
//! # Layout
//!
//! - [`clock`]: the time as the queue sees it (injectable for tests).
//! - [`config`]: typed, validated configuration; secrets that never print.
//! - [`store`]: the durable job queue and interaction log on sled, behind [`store::JobQueue`].
//! - [`validate`]: message validation rules, single and bulk.
//! - [`bot`]: the chat bot: prompts, personalities, the OpenAI-compatible client, fallbacks.

pub mod bot;
pub mod clock;
pub mod config;
pub mod store;
pub mod validate;
pub mod limiter;
pub mod metrics;
pub mod worker;
