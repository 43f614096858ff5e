//! The per-user rate limit (governor, keyed by user id, in process). A store that replicas
//! share keeps the limit itself, so it holds across them ([`crate::store::RateLimits`]);
//! [`Decision::from_take`] gives its verdict the same numbers.
//!
//! Quota: `limit` requests per `window`, with the full burst allowed (GCRA: one request's
//! worth of capacity comes back every `window / limit`). Each answer of a limited route
//! reports `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds until
//! the burst is full again); a refusal also carries `Retry-After` (seconds until the next
//! request is allowed). Other users never share a key, so they are never affected.
//!
//! The limiter reads time from tokio's clock ([`TokioClock`]), so tests drive it with a
//! paused clock. The key map is pruned by [`UserLimiter::prune`], which the app calls in the
//! background: keys whose state is indistinguishable from a fresh one are dropped, so a
//! million one-off users do not grow memory for good.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

/// Governor's clock on top of tokio's (pausable) clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = Instant;

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

type Keyed = RateLimiter<String, DashMapStateStore<String>, TokioClock, StateInformationMiddleware>;

/// The limiter's verdict and the numbers for the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the full burst is available again.
    pub reset_secs: u64,
    /// Seconds until the next request is allowed (only when refused).
    pub retry_after_secs: Option<u64>,
}

impl Decision {
    /// The verdict of a limit a shared store keeps ([`crate::store::RateLimits`]), in the
    /// same numbers as the in-process limiter's.
    pub fn from_take(take: &crate::store::RateTake, limit: u32) -> Self {
        let secs = |ms: u64| Duration::from_millis(ms);
        Self {
            allowed: take.allowed,
            limit,
            remaining: take.remaining,
            reset_secs: ceil_secs(secs(take.reset_ms)),
            retry_after_secs: (!take.allowed).then(|| ceil_secs(secs(take.retry_after_ms)).max(1)),
        }
    }
}

pub struct UserLimiter {
    limiter: Keyed,
    limit: u32,
    per_request: Duration,
}

impl std::fmt::Debug for UserLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserLimiter")
            .field("limit", &self.limit)
            .field("keys", &self.limiter.len())
            .finish()
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl UserLimiter {
    /// `limit` requests per `window` per user.
    pub fn new(limit: NonZeroU32, window: Duration) -> Self {
        let per_request = (window / limit.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(per_request)
            .unwrap_or_else(|| Quota::per_second(limit))
            .allow_burst(limit);
        let limiter = RateLimiter::dashmap_with_clock(quota, TokioClock)
            .with_middleware::<StateInformationMiddleware>();
        Self {
            limiter,
            limit: limit.get(),
            per_request,
        }
    }

    /// Counts one request from `user` and says whether it may go ahead.
    pub fn check(&self, user: &str) -> Decision {
        // The key is owned by the map; looking it up needs an owned String. One allocation per
        // request is small next to the JSON parsing that produced `user`.
        match self.limiter.check_key(&user.to_owned()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit: self.limit,
                    remaining,
                    reset_secs: ceil_secs(self.per_request * (self.limit - remaining)),
                    retry_after_secs: None,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(TokioClock.now());
                Decision {
                    allowed: false,
                    limit: self.limit,
                    remaining: 0,
                    reset_secs: ceil_secs(self.per_request * self.limit),
                    retry_after_secs: Some(ceil_secs(wait).max(1)),
                }
            }
        }
    }

    /// Drops keys that are back to a full burst; returns how many keys remain.
    pub fn prune(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limiter.len()
    }

    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// The limits guilds set for themselves (DESIGN §15), in process: one keyed limiter per
/// distinct (limit, window), created when a guild first uses it. A guild's users are counted
/// under `guild ++ 0x00 ++ user`, apart from the server's own limit and from other guilds.
#[derive(Debug, Default)]
pub struct GuildLimiters {
    by_quota: std::sync::Mutex<std::collections::HashMap<(u32, u64), std::sync::Arc<UserLimiter>>>,
}

impl GuildLimiters {
    /// The key `guild`'s limit counts `user` under (the shared store's limits use it too).
    pub fn key(guild: &str, user: &str) -> String {
        format!("{guild}\u{0}{user}")
    }

    /// Counts one request of `user` in `guild` against `limit` per `window`.
    pub fn check(&self, guild: &str, user: &str, limit: NonZeroU32, window: Duration) -> Decision {
        let limiter = {
            let mut map = self.by_quota.lock().unwrap_or_else(|p| p.into_inner());
            std::sync::Arc::clone(
                map.entry((limit.get(), window.as_millis() as u64))
                    .or_insert_with(|| std::sync::Arc::new(UserLimiter::new(limit, window))),
            )
        };
        limiter.check(&Self::key(guild, user))
    }

    /// Prunes every limiter; drops those left without keys. Returns the keys that remain.
    pub fn prune(&self) -> usize {
        let mut map = self.by_quota.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, limiter| limiter.prune() > 0);
        map.values().map(|l| l.keys()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_guilds_limit_counts_its_users_apart() {
        let guilds = GuildLimiters::default();
        let two = NonZeroU32::new(2).unwrap();
        let window = Duration::from_secs(60);
        assert!(guilds.check("g1", "u", two, window).allowed);
        assert!(guilds.check("g1", "u", two, window).allowed);
        let refused = guilds.check("g1", "u", two, window);
        assert!(!refused.allowed);
        assert_eq!(refused.limit, 2);
        assert!(
            guilds.check("g2", "u", two, window).allowed,
            "another guild"
        );
        assert!(guilds.check("g1", "v", two, window).allowed, "another user");
        assert_eq!(guilds.prune(), 3, "three keys in use");
        tokio::time::advance(Duration::from_secs(121)).await;
        assert_eq!(guilds.prune(), 0, "idle keys and then empty limiters go");
    }

    fn limiter(n: u32, secs: u64) -> UserLimiter {
        UserLimiter::new(NonZeroU32::new(n).unwrap(), Duration::from_secs(secs))
    }

    #[tokio::test(start_paused = true)]
    async fn full_burst_then_refusal_with_retry_after_and_other_users_unaffected() {
        let l = limiter(10, 60);
        for i in 0..10 {
            let d = l.check("alice");
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 9 - i);
            assert_eq!(d.limit, 10);
        }
        let refused = l.check("alice");
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(
            refused.retry_after_secs,
            Some(6),
            "one request back every 6 s"
        );
        assert!(l.check("bob").allowed, "another user is not affected");
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_comes_back_with_time() {
        let l = limiter(10, 60);
        for _ in 0..10 {
            assert!(l.check("u").allowed);
        }
        assert!(!l.check("u").allowed);
        tokio::time::advance(Duration::from_millis(5_900)).await;
        assert!(!l.check("u").allowed, "not before 6 s");
        tokio::time::advance(Duration::from_millis(100)).await;
        let d = l.check("u");
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(l.check("u").remaining, 9, "full burst after a whole window");
    }

    #[tokio::test(start_paused = true)]
    async fn prune_drops_idle_keys() {
        let l = limiter(10, 60);
        for i in 0..1_000 {
            l.check(&format!("user-{i}"));
        }
        assert_eq!(l.keys(), 1_000);
        tokio::time::advance(Duration::from_secs(61)).await;
        l.check("active");
        assert_eq!(l.prune(), 1, "only the recently active key is kept");
    }
}
