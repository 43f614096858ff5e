//! Typed, validated configuration.
//!
//! Raw CLI and environment values ([`crate::cli`]) become a [`Config`] whose fields are
//! already checked; an invalid value is refused at start with a message naming the flag.
//! Secrets live in [`Secret`], whose `Debug` and `Display` never show the value. Defaults
//! come from [`crate::defaults`], for both ways to a `Config` (the CLI and [`Config::new`]).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use crate::bot::UpstreamConfig;
use crate::cli::{DurabilityArg, FailurePolicyArg, ServeArgs};
use crate::defaults;
pub use crate::secret::Secret;
use crate::store::{Backend, Durability, LogRetention, PostgresOptions, StoreOptions};
use crate::worker::{FailurePolicy, WorkerConfig};

/// A configuration value that was refused; the message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for {flag}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub reason: String,
}

fn refuse(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        reason: reason.into(),
    }
}

/// How often, on a shared store, idle workers look for work and long-polls and streams look
/// for their job's finish: other replicas' work may not reach this process's signals.
pub const SHARED_POLL: Duration = Duration::from_secs(1);

/// Checks a `--database-url`.
pub fn database_url(url: String) -> Result<Secret, ConfigError> {
    const FLAG: &str = "--database-url (CHATQ_DATABASE_URL)";
    let url = url.trim();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(refuse(
            FLAG,
            "the URL must start with postgres:// or postgresql://",
        ));
    }
    // Parsed the way the store will parse it; the message never repeats the URL (it may
    // hold a password).
    crate::store::postgres::check_url(url).map_err(|reason| refuse(FLAG, reason))?;
    Ok(Secret::new(url))
}

/// This process's name on its claims: the host's name and the process id.
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "chatq".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Everything `chatq serve` needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreOptions,
    pub worker: WorkerConfig,
    pub max_attempts: u32,
    pub rate_limit: NonZeroU32,
    pub rate_window: Duration,
    pub max_prompt_chars: usize,
    pub shutdown_timeout: Duration,
    pub body_limit: usize,
    pub api_token: Option<Secret>,
    pub admin_token: Option<Secret>,
    /// `None` when no API key is configured: offline mode with fallback replies.
    pub upstream: Option<UpstreamConfig>,
    /// The model asked for upstream; named in `/v1/models` and the stats also when offline.
    pub model: String,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
    /// Refuse `system` messages from clients of `/v1/chat/completions`.
    pub refuse_client_system: bool,
    /// How long replies stay in the response cache; zero: off.
    pub cache_ttl: Duration,
    /// Discord's HTTP interactions, when a public key is set.
    pub discord: Option<DiscordConfig>,
    /// Where `callback_url`s may point, and the signing key.
    pub webhook: crate::webhook::WebhookConfig,
}

/// What `POST /discord/interactions` needs.
#[derive(Debug, Clone)]
pub struct DiscordConfig {
    pub public_key: crate::discord::verify::PublicKey,
    pub application_id: String,
    pub bot_token: Option<Secret>,
    /// Discord's API, without a trailing slash (tests point it at a fake).
    pub api_base: String,
}

fn token(flag: &'static str, value: Option<String>) -> Result<Option<Secret>, ConfigError> {
    match value {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Err(refuse(flag, "the token must not be empty")),
        Some(v) if v.chars().any(|c| c.is_whitespace() || c.is_control()) => Err(refuse(
            flag,
            "the token must not contain spaces or control characters",
        )),
        Some(v) => Ok(Some(Secret::new(v))),
    }
}

impl Config {
    /// Defaults for a store in `data_dir`: the documented defaults, no upstream, no tokens.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: defaults::LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            store: StoreOptions::embedded(data_dir),
            worker: WorkerConfig::default(),
            max_attempts: defaults::MAX_ATTEMPTS,
            rate_limit: NonZeroU32::new(defaults::RATE_LIMIT).unwrap_or(NonZeroU32::MIN),
            rate_window: Duration::from_secs(defaults::RATE_WINDOW_SECS),
            max_prompt_chars: defaults::MAX_PROMPT_CHARS as usize,
            shutdown_timeout: Duration::from_secs(defaults::SHUTDOWN_TIMEOUT_SECS),
            body_limit: defaults::BODY_LIMIT_BYTES as usize,
            api_token: None,
            admin_token: None,
            upstream: None,
            model: defaults::MODEL.to_owned(),
            max_concurrent_requests: defaults::MAX_CONCURRENT_REQUESTS as usize,
            request_timeout: Duration::from_secs(defaults::REQUEST_TIMEOUT_SECS),
            refuse_client_system: false,
            cache_ttl: Duration::from_secs(defaults::CACHE_TTL_SECS),
            discord: None,
            webhook: crate::webhook::WebhookConfig::default(),
        }
    }

    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let base_url = reqwest::Url::parse(&args.openai_base_url)
            .map_err(|e| refuse("--openai-base-url (OPENAI_BASE_URL)", e.to_string()))?;
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(refuse(
                "--openai-base-url (OPENAI_BASE_URL)",
                "the URL must start with http:// or https://",
            ));
        }
        if args.openai_model.trim().is_empty() {
            return Err(refuse(
                "--openai-model (OPENAI_MODEL)",
                "the model name is empty",
            ));
        }
        if args.data_dir.as_os_str().is_empty() {
            return Err(refuse("--data-dir", "the path is empty"));
        }
        let timeout = Duration::from_secs(args.upstream_timeout_secs);
        let upstream = args
            .openai_api_key
            .filter(|key| !key.trim().is_empty())
            .map(|key| UpstreamConfig {
                base_url: args.openai_base_url.clone(),
                api_key: Secret::new(key.trim()),
                timeout,
            });
        let discord = match args.discord_public_key {
            None => None,
            Some(key) => {
                const KEY: &str = "--discord-public-key (CHATQ_DISCORD_PUBLIC_KEY)";
                let public_key = crate::discord::verify::PublicKey::from_hex(&key)
                    .map_err(|reason| refuse(KEY, reason))?;
                let application_id = args.discord_application_id.ok_or_else(|| {
                    refuse(
                        "--discord-application-id (CHATQ_DISCORD_APPLICATION_ID)",
                        "required with --discord-public-key",
                    )
                })?;
                Some(DiscordConfig {
                    public_key,
                    application_id,
                    bot_token: token("--discord-bot-token", args.discord_bot_token)?,
                    api_base: args.discord_api_base.trim_end_matches('/').to_owned(),
                })
            }
        };
        let webhook = crate::webhook::WebhookConfig {
            allow_hosts: args
                .webhook_allow_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            secret: args
                .webhook_secret
                .as_deref()
                .map(crate::webhook::Secret::parse)
                .transpose()
                .map_err(|reason| refuse("--webhook-secret (CHATQ_WEBHOOK_SECRET)", reason))?,
        };
        let lease = Duration::from_secs(args.lease_secs);
        let mut store = match args.database_url {
            Some(url) => StoreOptions::postgres(PostgresOptions {
                url: database_url(url)?,
                lease,
                replica: args.replica_name.unwrap_or_else(default_replica_name),
                pool_size: args.database_pool_size as usize,
                ca_file: args.database_ca_file,
            }),
            None => StoreOptions::embedded(args.data_dir),
        };
        store.durability = match args.durability {
            DurabilityArg::Strict => Durability::Strict,
            DurabilityArg::Relaxed => Durability::Relaxed,
        };
        store.keep_completed = args.keep_completed;
        store.keep_failed = args.keep_failed;
        store.cache_max_entries = args.cache_max_entries;
        store.conversation_max_age_ms = args.conversation_max_age_days.saturating_mul(86_400_000);
        if let Backend::Embedded(embedded) = &mut store.backend {
            embedded.min_free_bytes = args.min_free_disk_mb.saturating_mul(1024 * 1024);
        }
        let poll = store.is_shared().then_some(SHARED_POLL);
        store.log_retention = LogRetention {
            max_entries: args.log_max_entries,
            max_age_ms: args.log_max_age_days.map(|d| d.saturating_mul(86_400_000)),
        };
        Ok(Self {
            listen: args.listen,
            store,
            worker: WorkerConfig {
                workers: args.workers as usize,
                backoff_base: Duration::from_millis(args.backoff_ms),
                on_upstream_failure: match args.on_upstream_failure {
                    FailurePolicyArg::Fail => FailurePolicy::Fail,
                    FailurePolicyArg::Fallback => FailurePolicy::Fallback,
                },
                lease,
                poll,
                ..WorkerConfig::default()
            },
            max_attempts: args.max_attempts,
            rate_limit: NonZeroU32::new(args.rate_limit)
                .ok_or_else(|| refuse("--rate-limit", "must be at least 1"))?,
            rate_window: Duration::from_secs(args.rate_window_secs),
            max_prompt_chars: args.max_prompt_chars as usize,
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
            body_limit: args.body_limit_bytes as usize,
            api_token: token("--api-token", args.api_token)?,
            admin_token: token("--admin-token", args.admin_token)?,
            upstream,
            model: args.openai_model,
            max_concurrent_requests: args.max_concurrent_requests as usize,
            request_timeout: Duration::from_secs(args.request_timeout_secs),
            refuse_client_system: args.refuse_client_system,
            cache_ttl: Duration::from_secs(args.cache_ttl_secs),
            discord,
            webhook,
        })
    }

    /// Admin routes are on when an admin token guards them, or when chatq listens only on
    /// loopback (nobody else can reach them).
    pub fn admin_enabled(&self) -> bool {
        self.admin_token.is_some() || self.listen.ip().is_loopback()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["chatq", "serve"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            crate::cli::Command::Serve(a) => Config::from_args(*a).map_err(|e| e.to_string()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        let mut c = Config::new("x");
        c.api_token = Some(s);
        assert!(!format!("{c:?}").contains("sk-very-secret"));
    }

    #[test]
    fn a_database_url_selects_the_shared_store_and_never_prints() {
        let c = parse(&[
            "--database-url",
            "postgres://chatq:hunter2@db.example/chatq",
        ])
        .unwrap();
        assert!(c.store.is_shared());
        assert_eq!(c.worker.poll, Some(SHARED_POLL));
        assert_eq!(c.worker.lease, Duration::from_secs(30));
        assert!(!format!("{c:?}").contains("hunter2"));
        let err = parse(&["--database-url", "mysql://x"]).unwrap_err();
        assert!(err.contains("--database-url"), "{err}");
        let err = parse(&["--database-url", "postgres://u:hunter2@h:notaport/db"]).unwrap_err();
        assert!(err.contains("--database-url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(!parse(&[]).unwrap().store.is_shared());
    }

    #[test]
    fn invalid_values_name_the_flag() {
        let err = parse(&["--workers", "0"]).unwrap_err();
        assert!(err.contains("--workers"), "{err}");
        let err = parse(&["--listen", "nope"]).unwrap_err();
        assert!(err.contains("--listen"), "{err}");
        let err = parse(&["--openai-base-url", "ftp://x"]).unwrap_err();
        assert!(err.contains("--openai-base-url"), "{err}");
        let err = parse(&["--admin-token", " "]).unwrap_err();
        assert!(err.contains("--admin-token"), "{err}");
        let err = parse(&["--durability", "sometimes"]).unwrap_err();
        assert!(err.contains("--durability"), "{err}");
    }

    #[test]
    fn defaults_match_the_design() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.worker.workers, 5);
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.worker.backoff_base, Duration::from_secs(2));
        assert_eq!((c.store.keep_completed, c.store.keep_failed), (50, 100));
        assert_eq!((c.rate_limit.get(), c.rate_window.as_secs()), (10, 60));
        assert_eq!(c.max_prompt_chars, 2000);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.store.durability, Durability::Strict);
        assert_eq!(c.body_limit, 65_536);
        assert_eq!(c.model, "gpt-4o-mini");
        assert!(c.admin_enabled(), "loopback without a token");
        let open = parse(&["--listen", "0.0.0.0:8080"]).unwrap();
        assert!(
            !open.admin_enabled(),
            "public address without an admin token"
        );
    }

    #[test]
    fn the_cli_and_config_new_give_the_same_defaults() {
        // Tests build on `Config::new`; the binary on the CLI. Every field must agree.
        let from_cli = parse(&[]).unwrap();
        let from_new = Config::new(defaults::DATA_DIR);
        assert_eq!(format!("{from_cli:?}"), format!("{from_new:?}"));
    }
}
