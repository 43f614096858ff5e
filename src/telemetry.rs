//! Tracing setup: human-readable text by default, JSON lines with `--log-format json`.
//! `RUST_LOG` wins over `--log-level` when set. Logs go to stderr, so client subcommands can
//! print their JSON on stdout.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

pub fn init(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            EnvFilter::try_new(v).map_err(|e| anyhow::anyhow!("invalid value for RUST_LOG: {e}"))?
        }
        _ => EnvFilter::try_new(level)
            .map_err(|e| anyhow::anyhow!("invalid value for --log-level: {e}"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("starting the logger: {e}"))
}
