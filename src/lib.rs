//! chatq: a chat bot backend in one binary.
//!
//! # Layout
//!
//! - [`cli`]: clap argument structs only (every `serve` flag has an environment fallback).
//! - [`defaults`]: every default of `serve`, defined once.
//! - [`config`]: typed, validated configuration built from the CLI; secrets never print.
//! - [`secret`]: the string type of API keys and tokens, which never prints.
//! - [`app`]: wires store, signals, limiter, bot, workers and router; [`app::run`] serves until
//!   the shutdown token fires, then shuts down in documented phases.
//! - [`clock`]: the time as the queue sees it (injectable for tests).
//! - [`domain`]: what a job, a message and a logged interaction are; every layer speaks it.
//! - [`store`]: the durable queue and interaction log behind [`store::Store`]'s traits; the
//!   embedded backend (sled) in [`store::embedded`], the shared one (PostgreSQL) in
//!   [`store::postgres`].
//! - [`signals`]: in-process wake-ups, long-poll notifications and reply streams.
//! - [`validate`]: message validation rules, single and bulk.
//! - [`limiter`]: the per-user governor limiter and its numbers for the headers.
//! - [`bot`]: the chat bot: prompts, personalities, the OpenAI-compatible client, fallbacks.
//! - [`cache`]: the response cache: its key, what may be stored, one upstream call for
//!   identical requests in flight.
//! - [`worker`]: the worker pool: claim, run, retry with backoff, complete.
//! - [`discord`]: Discord's HTTP interactions (verification, commands, registration);
//!   [`outbox`]: the deliverer that sends finished jobs' replies to Discord and webhooks
//!   ([`webhook`]: allowed hosts and signing).
//! - [`http`]: routes (one file per resource) and the one API error type.
//! - [`metrics`], [`telemetry`]: Prometheus metrics; tracing setup.
//! - [`client`]: the client subcommands (`submit`, `job`, `stats`, `validate`, `interactions`).

pub mod app;
pub mod bot;
pub mod cache;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod defaults;
pub mod discord;
pub mod domain;
pub mod http;
pub mod limiter;
pub mod metrics;
pub mod outbox;
pub mod secret;
pub mod signals;
pub mod store;
pub mod telemetry;
pub mod validate;
pub mod webhook;
pub mod worker;
