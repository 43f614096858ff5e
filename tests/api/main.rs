//! Integration tests through the real front door (and the real binary for crash tests).

mod binary;
mod helpers;
mod hostile;

mod admin;
mod backup;
mod browser;
mod cache;
mod chaos;
mod completions;
mod crash;
mod discord;
mod disk;
mod guilds;
mod jobs;
mod limits;
mod openapi;
mod postgres;
mod python;
mod python_sdk;
mod service;
mod soak;
mod webhooks;
mod worker;
