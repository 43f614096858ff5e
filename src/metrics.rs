//! Prometheus metrics, all prefixed `chatq_`, none labelled per user.
//!
//! [`Metrics`] owns the registry and typed handles; the rest of chatq records into it.
//! Queue depth is read from the store at scrape time rather than tracked twice; when the store
//! cannot answer, the gauges keep their last values and `chatq_store_up` reads 0.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabel {
    pub fallback: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabel {
    /// `discord` or `webhook`.
    pub kind: &'static str,
    /// `delivered`, `retried` (an attempt that failed and will be tried again) or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
    pub status: u16,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The failure codes a job can end with (`JobError::code`), shown at 0 from the start.
const KNOWN_FAILURE_CODES: [&str; 2] = ["openai_error", "missing_prompt"];
/// The upstream outcomes every deployment sees; other statuses appear when they happen.
const KNOWN_UPSTREAM_STATUSES: [&str; 7] = [
    "200",
    "429",
    "500",
    "503",
    "timeout",
    "connect_error",
    "invalid_response",
];

pub struct Metrics {
    registry: Registry,
    pub jobs_accepted: Counter,
    pub jobs_completed: Family<FallbackLabel, Counter>,
    pub jobs_failed: Family<CodeLabel, Counter>,
    pub jobs_retried: Counter,
    pub queue_depth: Family<StateLabel, Gauge>,
    pub queue_wait: Histogram,
    pub job_duration: Histogram,
    pub upstream_requests: Family<StatusLabel, Counter>,
    pub upstream_latency: Histogram,
    pub rate_limited: Counter,
    pub validation_rejected: Counter,
    pub http_requests: Family<RouteLabel, Counter>,
    pub log_failures: Gauge,
    pub store_flushes: Gauge,
    pub disk_free: Gauge,
    pub disk_accepting: Gauge,
    pub store_reopens: Gauge,
    pub store_up: Gauge,
    pub cache_requests: Family<ResultLabel, Counter>,
    pub cache_entries: Gauge,
    pub deliveries: Family<DeliveryLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chatq");
        let m = Self {
            jobs_accepted: Counter::default(),
            jobs_completed: Family::default(),
            jobs_failed: Family::default(),
            jobs_retried: Counter::default(),
            queue_depth: Family::default(),
            queue_wait: latency_histogram(),
            job_duration: latency_histogram(),
            upstream_requests: Family::default(),
            upstream_latency: latency_histogram(),
            rate_limited: Counter::default(),
            validation_rejected: Counter::default(),
            http_requests: Family::default(),
            log_failures: Gauge::default(),
            store_flushes: Gauge::default(),
            disk_free: Gauge::default(),
            disk_accepting: Gauge::default(),
            store_reopens: Gauge::default(),
            store_up: Gauge::default(),
            cache_requests: Family::default(),
            cache_entries: Gauge::default(),
            deliveries: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "jobs_accepted",
            "Jobs accepted by the front door",
            m.jobs_accepted.clone(),
        );
        registry.register(
            "jobs_completed",
            "Jobs completed, by whether the reply was a fallback",
            m.jobs_completed.clone(),
        );
        registry.register(
            "jobs_failed",
            "Jobs failed for good, by error code",
            m.jobs_failed.clone(),
        );
        registry.register(
            "jobs_retried",
            "Job attempts that failed and were scheduled again",
            m.jobs_retried.clone(),
        );
        registry.register(
            "queue_depth",
            "Jobs in the store by state",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from a job becoming due to a worker claiming it",
            m.queue_wait.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Time a worker spent on one attempt",
            m.job_duration.clone(),
        );
        registry.register(
            "upstream_requests",
            "Upstream chat completion requests by HTTP status (or error kind)",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Upstream chat completion latency",
            m.upstream_latency.clone(),
        );
        registry.register(
            "rate_limited_requests",
            "Requests refused by the per-user rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "validation_rejected_requests",
            "Requests refused by message validation",
            m.validation_rejected.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        registry.register(
            "interaction_log_failures",
            "Interaction-log entries that could not be written",
            m.log_failures.clone(),
        );
        registry.register(
            "store_flushes",
            "Group-commit flushes of the store",
            m.store_flushes.clone(),
        );
        registry.register(
            "disk_free_bytes",
            "Free bytes on the data directory's disk at the last measurement (-1: unknown)",
            m.disk_free.clone(),
        );
        registry.register(
            "disk_accepting_jobs",
            "1 while the disk takes new jobs; 0 below the reserve or while recovering from a disk error",
            m.disk_accepting.clone(),
        );
        registry.register(
            "store_up",
            "1 while the store answers reads; 0 when the last scrape could not read it",
            m.store_up.clone(),
        );
        registry.register(
            "store_reopens",
            "Times the store was reopened after a disk error",
            m.store_reopens.clone(),
        );
        registry.register(
            "cache_requests",
            "Jobs the response cache had a say in, by whether their reply came from it",
            m.cache_requests.clone(),
        );
        registry.register(
            "cache_entries",
            "Replies in the response cache",
            m.cache_entries.clone(),
        );
        registry.register(
            "deliveries",
            "Replies sent to Discord or a webhook, by how each attempt ended",
            m.deliveries.clone(),
        );
        // Every family from the start, with its known label values at 0: a dashboard's rate()
        // and an alert on failures see a series on a fresh server, not nothing.
        for result in ["hit", "miss"] {
            drop(m.cache_requests.get_or_create(&ResultLabel { result }));
        }
        for kind in ["discord", "webhook"] {
            for result in ["delivered", "retried", "failed"] {
                drop(m.deliveries.get_or_create(&DeliveryLabel { kind, result }));
            }
        }
        for fallback in ["false", "true"] {
            drop(m.jobs_completed.get_or_create(&FallbackLabel { fallback }));
        }
        for code in KNOWN_FAILURE_CODES {
            drop(m.jobs_failed.get_or_create(&CodeLabel {
                code: code.to_owned(),
            }));
        }
        for status in KNOWN_UPSTREAM_STATUSES {
            drop(m.upstream_requests.get_or_create(&StatusLabel {
                status: status.to_owned(),
            }));
        }
        // The routes every deployment is probed on; others appear with their first request.
        for route in ["/healthz", "/readyz", "/metrics"] {
            drop(m.http_requests.get_or_create(&RouteLabel {
                route: route.to_owned(),
                status: 200,
            }));
        }
        for state in crate::domain::JobState::ALL {
            drop(m.queue_depth.get_or_create(&StateLabel {
                state: state.as_str(),
            }));
        }
        Self { registry, ..m }
    }

    /// Counts one job's cache result (`hit` or `miss`).
    pub fn cache_request(&self, result: &'static str) {
        self.cache_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts how one delivery attempt ended.
    pub fn delivery(&self, kind: &'static str, result: &'static str) {
        self.deliveries
            .get_or_create(&DeliveryLabel { kind, result })
            .inc();
    }

    pub fn job_completed(&self, used_fallback: bool) {
        self.jobs_completed
            .get_or_create(&FallbackLabel {
                fallback: if used_fallback { "true" } else { "false" },
            })
            .inc();
    }

    pub fn job_failed(&self, code: &str) {
        self.jobs_failed
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
    }

    pub fn upstream_request(&self, status: &str, seconds: f64) {
        self.upstream_requests
            .get_or_create(&StatusLabel {
                status: status.to_owned(),
            })
            .inc();
        self.upstream_latency.observe(seconds);
    }

    pub fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
                status,
            })
            .inc();
    }

    /// Renders the Prometheus text format, reading queue depth and store status first.
    pub async fn render(&self, store: &dyn Store) -> String {
        match store.counts().await {
            Ok(counts) => {
                self.store_up.set(1);
                for (state, n) in [
                    ("queued", counts.queued),
                    ("active", counts.active),
                    ("delayed", counts.delayed),
                    ("completed", counts.completed),
                    ("failed", counts.failed),
                    ("cancelled", counts.cancelled),
                ] {
                    self.queue_depth
                        .get_or_create(&StateLabel { state })
                        .set(n as i64);
                }
            }
            Err(e) => {
                self.store_up.set(0);
                tracing::warn!(error = %e, "metrics: the store could not count its jobs");
            }
        }
        if let Ok(status) = store.status().await {
            self.log_failures.set(status.log_failures as i64);
            self.store_flushes.set(status.commits as i64);
            if let Some(disk) = status.disk {
                self.disk_free.set(
                    disk.free_bytes
                        .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
                );
                self.store_reopens.set(disk.reopens as i64);
            }
        }
        self.disk_accepting
            .set(i64::from(store.accepting().await.is_ok()));
        if let Ok(entries) = store.cache_len().await {
            self.cache_entries
                .set(i64::try_from(entries).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
