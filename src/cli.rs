//! Command-line arguments (clap). Argument structs only: every `serve` flag has an
//! environment fallback, and numbers are range-checked here so a bad value is refused at
//! start with the flag's name. Turning them into a [`crate::config::Config`] happens there.
//!
//! This module depends on nothing else of chatq but [`crate::defaults`]: its enums are
//! argument spellings, mapped to the parts' own types in `config.rs` and `main.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::defaults;

#[derive(Debug, Parser)]
#[command(
    name = "chatq",
    version,
    about = "A chat bot backend in one binary: HTTP API, durable job queue, workers, OpenAI-compatible upstream"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, env = "CHATQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter, such as `info` or `chatq=debug` (RUST_LOG takes precedence when set).
    #[arg(long, env = "CHATQ_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailurePolicyArg {
    /// End the job `failed` with `openai_error`.
    Fail,
    /// Complete the job with the canned fallback reply.
    Fallback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    /// Acknowledge a job only once it is flushed to disk.
    Strict,
    /// Acknowledge before the flush; a crash can lose the last ~0.5 s of acknowledged jobs.
    Relaxed,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: HTTP API, queue and workers.
    Serve(Box<ServeArgs>),
    /// Apply the database schema's migrations (`serve` also does at start).
    Migrate(MigrateArgs),
    /// Discord: register the slash commands (/ask, /reset, /quota) with the bot token.
    #[command(subcommand)]
    Discord(DiscordCommand),
    /// Submit a chat job to a running server and print it.
    Submit(SubmitArgs),
    /// Show one job.
    Job(JobArgs),
    /// Show the queue counts (admin).
    Stats(ClientArgs),
    /// Validate a message with the server's rules.
    Validate(ValidateArgs),
    /// Export the interaction log as JSON lines (admin).
    Interactions(InteractionsArgs),
    /// Take a backup of a running server's embedded store into a file (admin).
    Backup(BackupArgs),
    /// Restore a backup into a new data directory (then `serve --data-dir` it).
    Restore(RestoreArgs),
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The file to write; it appears only once the whole backup is in and checked.
    #[arg(long)]
    pub to: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A file `chatq backup` wrote.
    #[arg(long)]
    pub from: PathBuf,
    /// An empty (or absent) directory to restore into.
    #[arg(long)]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the log says which).
    #[arg(long, env = "CHATQ_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Directory of the embedded database (unused with --database-url).
    #[arg(long, env = "CHATQ_DATA_DIR", default_value = defaults::DATA_DIR)]
    pub data_dir: PathBuf,
    /// A PostgreSQL database (`postgres://user:password@host/db`) that replicas share: one
    /// queue, one log, one pause state. Without it, the embedded store in --data-dir.
    #[arg(long, env = "CHATQ_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// How long a job's claim holds without a heartbeat (renewed every third of it); a
    /// crashed replica's jobs run elsewhere after it.
    #[arg(long, env = "CHATQ_LEASE_SECS", default_value_t = defaults::LEASE_SECS, value_parser = clap::value_parser!(u64).range(3..=3_600))]
    pub lease_secs: u64,
    /// This replica's name on its claims (default: host name and process id).
    #[arg(long, env = "CHATQ_REPLICA_NAME")]
    pub replica_name: Option<String>,
    /// Verify the database's TLS certificate against the PEM certificates in this file (and
    /// require TLS); without it, `sslmode` in the URL decides, as for libpq.
    #[arg(long, env = "CHATQ_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
    /// Connections this replica keeps to the database.
    #[arg(long, env = "CHATQ_DATABASE_POOL_SIZE", default_value_t = defaults::DATABASE_POOL_SIZE, value_parser = clap::value_parser!(u32).range(2..=1_000))]
    pub database_pool_size: u32,
    /// Number of workers calling the upstream at once.
    #[arg(long, env = "CHATQ_WORKERS", default_value_t = defaults::WORKERS, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
    /// Attempts per job before it fails.
    #[arg(long, env = "CHATQ_MAX_ATTEMPTS", default_value_t = defaults::MAX_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles with each attempt (capped at 60 s).
    #[arg(long, env = "CHATQ_BACKOFF_MS", default_value_t = defaults::BACKOFF_MS, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub backoff_ms: u64,
    /// Completed job records to keep.
    #[arg(long, env = "CHATQ_KEEP_COMPLETED", default_value_t = defaults::KEEP_COMPLETED)]
    pub keep_completed: u64,
    /// Failed (and cancelled) job records to keep.
    #[arg(long, env = "CHATQ_KEEP_FAILED", default_value_t = defaults::KEEP_FAILED)]
    pub keep_failed: u64,
    /// Free space (MiB) to keep on the data directory's disk: below it new jobs get 503 while
    /// queued work still finishes; 0 turns the reserve off.
    #[arg(long, env = "CHATQ_MIN_FREE_DISK_MB", default_value_t = defaults::MIN_FREE_DISK_MB, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub min_free_disk_mb: u64,
    /// Requests per user per window.
    #[arg(long, env = "CHATQ_RATE_LIMIT", default_value_t = defaults::RATE_LIMIT, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit: u32,
    /// Rate-limit window in seconds.
    #[arg(long, env = "CHATQ_RATE_WINDOW_SECS", default_value_t = defaults::RATE_WINDOW_SECS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub rate_window_secs: u64,
    /// Longest prompt accepted by the chat-job routes, in characters.
    #[arg(long, env = "CHATQ_MAX_PROMPT_CHARS", default_value_t = defaults::MAX_PROMPT_CHARS, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_prompt_chars: u32,
    /// Upstream request timeout in seconds.
    #[arg(long, env = "CHATQ_UPSTREAM_TIMEOUT_SECS", default_value_t = defaults::UPSTREAM_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub upstream_timeout_secs: u64,
    /// How long shutdown waits for jobs in flight, in seconds.
    #[arg(long, env = "CHATQ_SHUTDOWN_TIMEOUT_SECS", default_value_t = defaults::SHUTDOWN_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(0..=3_600))]
    pub shutdown_timeout_secs: u64,
    /// When a submitted job is acknowledged.
    #[arg(long, env = "CHATQ_DURABILITY", value_enum, default_value_t = DurabilityArg::Strict)]
    pub durability: DurabilityArg,
    /// Largest request body in bytes.
    #[arg(long, env = "CHATQ_BODY_LIMIT_BYTES", default_value_t = defaults::BODY_LIMIT_BYTES, value_parser = clap::value_parser!(u64).range(1024..=16_777_216))]
    pub body_limit_bytes: u64,
    /// Bearer token required on the chat routes (none: open).
    #[arg(long, env = "CHATQ_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Bearer token required on the admin routes.
    #[arg(long, env = "CHATQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// API key of the OpenAI-compatible upstream; without one, replies are canned fallbacks.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Base URL of the OpenAI-compatible API.
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = defaults::OPENAI_BASE_URL
    )]
    pub openai_base_url: String,
    /// Model name sent upstream.
    #[arg(long, env = "OPENAI_MODEL", default_value = defaults::MODEL)]
    pub openai_model: String,
    /// What a job whose upstream keeps failing becomes.
    #[arg(long, env = "CHATQ_ON_UPSTREAM_FAILURE", value_enum, default_value_t = FailurePolicyArg::Fail)]
    pub on_upstream_failure: FailurePolicyArg,
    /// Keep at most this many interaction-log entries (default: no limit).
    #[arg(long, env = "CHATQ_LOG_MAX_ENTRIES")]
    pub log_max_entries: Option<u64>,
    /// Drop interaction-log entries older than this many days (default: keep).
    #[arg(long, env = "CHATQ_LOG_MAX_AGE_DAYS")]
    pub log_max_age_days: Option<u64>,
    /// The Discord application's public key (hex, from the Developer Portal): turns on
    /// `POST /discord/interactions`.
    #[arg(long, env = "CHATQ_DISCORD_PUBLIC_KEY")]
    pub discord_public_key: Option<String>,
    /// The Discord application id.
    #[arg(long, env = "CHATQ_DISCORD_APPLICATION_ID")]
    pub discord_application_id: Option<String>,
    /// The Discord bot token (for `chatq discord register`).
    #[arg(long, env = "CHATQ_DISCORD_BOT_TOKEN", hide_env_values = true)]
    pub discord_bot_token: Option<String>,
    /// Discord's API.
    #[arg(long, env = "CHATQ_DISCORD_API_BASE", default_value = defaults::DISCORD_API_BASE)]
    pub discord_api_base: String,
    /// A host a job's `callback_url` may point at (repeat, or separate with commas); none by
    /// default, so chatq posts nowhere it was not told to.
    #[arg(
        long = "webhook-allow-host",
        env = "CHATQ_WEBHOOK_ALLOW_HOST",
        value_delimiter = ','
    )]
    pub webhook_allow_hosts: Vec<String>,
    /// The key webhooks are signed with: `whsec_` and at least 24 bytes in base64 (the
    /// Standard Webhooks form).
    #[arg(long, env = "CHATQ_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Conversation turns older than this many days are forgotten.
    #[arg(long, env = "CHATQ_CONVERSATION_MAX_AGE_DAYS", default_value_t = defaults::CONVERSATION_MAX_AGE_DAYS, value_parser = clap::value_parser!(u64).range(1..=3_650))]
    pub conversation_max_age_days: u64,
    /// How long a reply stays in the response cache, in seconds; 0 (the default) leaves the
    /// cache off. Identical requests in a guild within it are answered without an upstream call.
    #[arg(long, env = "CHATQ_CACHE_TTL_SECS", default_value_t = defaults::CACHE_TTL_SECS, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub cache_ttl_secs: u64,
    /// Replies the response cache keeps at most; the oldest go first.
    #[arg(long, env = "CHATQ_CACHE_MAX_ENTRIES", default_value_t = defaults::CACHE_MAX_ENTRIES, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub cache_max_entries: u64,
    /// Requests handled at once; more wait their turn.
    #[arg(long, env = "CHATQ_MAX_CONCURRENT_REQUESTS", default_value_t = defaults::MAX_CONCURRENT_REQUESTS, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_requests: u32,
    /// Refuse `system` messages from OpenAI-compatible clients (with "Invalid message role").
    #[arg(long, env = "CHATQ_REFUSE_CLIENT_SYSTEM")]
    pub refuse_client_system: bool,
    /// Per-request time limit in seconds (long-polls end earlier, at 60 s).
    #[arg(long, env = "CHATQ_REQUEST_TIMEOUT_SECS", default_value_t = defaults::REQUEST_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(61..=3_600))]
    pub request_timeout_secs: u64,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The PostgreSQL database to migrate.
    #[arg(long, env = "CHATQ_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// As for `serve`.
    #[arg(long, env = "CHATQ_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DiscordCommand {
    /// Registers /ask, /reset and /quota: globally, or in one guild (at once, for testing).
    Register(RegisterArgs),
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The Discord application id.
    #[arg(long, env = "CHATQ_DISCORD_APPLICATION_ID")]
    pub discord_application_id: String,
    /// The bot token (Developer Portal, Bot).
    #[arg(long, env = "CHATQ_DISCORD_BOT_TOKEN", hide_env_values = true)]
    pub discord_bot_token: String,
    /// Discord's API.
    #[arg(long, env = "CHATQ_DISCORD_API_BASE", default_value = defaults::DISCORD_API_BASE)]
    pub discord_api_base: String,
    /// Register in this guild only (commands appear at once; global ones can take a while).
    #[arg(long)]
    pub guild: Option<String>,
}

/// Where a client subcommand finds the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the chatq server.
    #[arg(long, env = "CHATQ_URL", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Client bearer token.
    #[arg(long, env = "CHATQ_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Admin bearer token (for stats and interactions).
    #[arg(long, env = "CHATQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The user the job is for (rate limits are per user).
    #[arg(long, default_value = "cli")]
    pub user: String,
    /// Guild (community) id.
    #[arg(long)]
    pub guild: Option<String>,
    /// Personality preset.
    #[arg(long)]
    pub personality: Option<String>,
    /// Priority: 0 runs first, higher numbers later.
    #[arg(long)]
    pub priority: Option<u32>,
    /// Run no sooner than this many milliseconds from now.
    #[arg(long)]
    pub delay_ms: Option<u64>,
    /// Submitting the same key again returns the first job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait up to this many seconds for the answer.
    #[arg(long)]
    pub wait: Option<u64>,
    /// The prompt.
    pub prompt: String,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Wait up to this many seconds for the job to finish.
    #[arg(long)]
    pub wait: Option<u64>,
    /// The job id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Message role.
    #[arg(long, default_value = "user")]
    pub role: String,
    /// The message text.
    pub text: String,
}

#[derive(Debug, Args)]
pub struct InteractionsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub guild: Option<String>,
    /// Only entries at or after this time (RFC 3339 or milliseconds since the epoch).
    #[arg(long)]
    pub since: Option<String>,
    /// Only entries before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Stop after this many entries (default: all).
    #[arg(long)]
    pub max: Option<usize>,
}
