//! Every default of `chatq serve`, defined once. The clap attributes (`cli.rs`),
//! [`crate::config::Config::new`] (what tests build on) and the parts' own `Default`s all read
//! these, and `config.rs` tests that the two ways to a `Config` agree.

/// `--listen`
pub const LISTEN: &str = "127.0.0.1:8080";
/// `--data-dir`
pub const DATA_DIR: &str = "data/db";
/// `--workers`
pub const WORKERS: u32 = 5;
/// `--max-attempts`
pub const MAX_ATTEMPTS: u32 = 3;
/// `--backoff-ms`: the first retry delay; it doubles per attempt.
pub const BACKOFF_MS: u64 = 2_000;
/// The longest retry delay, whatever the backoff or an upstream `Retry-After` asks.
pub const BACKOFF_CAP_SECS: u64 = 60;
/// `--keep-completed`
pub const KEEP_COMPLETED: u64 = 50;
/// `--keep-failed` (cancelled records are kept by the same number).
pub const KEEP_FAILED: u64 = 100;
/// `--min-free-disk-mb`
pub const MIN_FREE_DISK_MB: u64 = 64;
/// `--rate-limit`
pub const RATE_LIMIT: u32 = 10;
/// `--rate-window-secs`
pub const RATE_WINDOW_SECS: u64 = 60;
/// `--max-prompt-chars`
pub const MAX_PROMPT_CHARS: u32 = 2_000;
/// `--upstream-timeout-secs`
pub const UPSTREAM_TIMEOUT_SECS: u64 = 60;
/// `--shutdown-timeout-secs`
pub const SHUTDOWN_TIMEOUT_SECS: u64 = 30;
/// `--body-limit-bytes`
pub const BODY_LIMIT_BYTES: u64 = 65_536;
/// `--openai-base-url` (`OPENAI_BASE_URL`)
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// `--openai-model` (`OPENAI_MODEL`)
pub const MODEL: &str = "gpt-4o-mini";
/// `--max-concurrent-requests`
pub const MAX_CONCURRENT_REQUESTS: u32 = 1_024;
/// `--request-timeout-secs`
pub const REQUEST_TIMEOUT_SECS: u64 = 90;
/// `--lease-secs`: how long a claim holds without a heartbeat (renewed every third of it).
pub const LEASE_SECS: u64 = 30;
/// `--database-pool-size`: connections per replica to a shared store.
pub const DATABASE_POOL_SIZE: u32 = 16;
/// `--cache-ttl-secs`: 0 leaves the response cache off.
pub const CACHE_TTL_SECS: u64 = 0;
/// `--cache-max-entries`
pub const CACHE_MAX_ENTRIES: u64 = 10_000;
/// `--discord-api-base`
pub const DISCORD_API_BASE: &str = "https://discord.com/api/v10";
/// `--conversation-max-age-days`
pub const CONVERSATION_MAX_AGE_DAYS: u64 = 30;
/// A conversation's exchanges sent upstream unless its guild says otherwise.
pub const HISTORY_TURNS: u32 = 10;
