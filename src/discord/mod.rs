//! chatq as a Discord bot over HTTP interactions (DESIGN §16): Discord posts each slash
//! command to `POST /discord/interactions`; chatq answers "thinking…" at once (a deferred
//! response), runs the job through the same checks, queue and cache as any other, and a
//! delivery in the store's outbox (`crate::outbox`) edits the response with the reply when the job is done.

pub mod interactions;
pub mod register;
pub mod verify;
