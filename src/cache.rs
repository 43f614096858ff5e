//! The response cache (DESIGN §14): a reply worth serving again is stored under a key that
//! covers everything that shapes it, and an identical request later is answered from it with
//! no worker and no upstream call.
//!
//! Right by construction:
//!
//! - **The key** is a SHA-256 over a length-prefixed encoding of the guild, the personality
//!   and the [`UpstreamPlan`] the bot would send (the full system prompt, model, temperature,
//!   max tokens and every message, history included). The plan is the bot's own
//!   ([`ChatBot::plan`]), the very one [`ChatBot::ask`] sends, so nothing that reaches the
//!   upstream can be left out of the key. The encoding has one form per request (no JSON, no
//!   float formatting), so the same request always hashes the same; guild `None` and any
//!   named guild differ in a tag byte, so no two guilds share an entry.
//! - **What is stored**: only a reply the upstream gave, with content ([`storable`]): never
//!   an error (there is no result), a fallback reply, the empty-content placeholder or a
//!   reply that itself came from the cache.
//! - **Identical requests in flight** share one upstream call: the first worker to run one
//!   leads ([`Flight::Lead`]); the others follow and finish from what it lands. If it lands
//!   nothing worth storing (it failed, fell back, or the process lost it), they look again and
//!   one of them leads. This is per process; across replicas of a shared store the cache
//!   itself catches every identical job that starts after the first finished.
//! - **A hit still counts against the rate limit**: the front door takes the limit before it
//!   consults the cache.
//!
//! `chatq_cache_requests_total{result}` counts each job the cache had a say in once: `hit`
//! when its reply came from the cache (at submission, or when a worker found it or shared an
//! identical request's call), `miss` when it went upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::bot::fallback::EMPTY_REPLY_PLACEHOLDER;
use crate::bot::{ChatBot, UpstreamPlan};
use crate::clock::SharedClock;
use crate::domain::{
    CacheKey, CachedReply, ChatRequest, GLOBAL_GUILD, GuildSettings, JobResult, Usage,
};
use crate::metrics::Metrics;
use crate::store::Store;

/// The `x-chatq-cache` header.
pub const HEADER: &str = "x-chatq-cache";

/// What the cache did for a request, as the `x-chatq-cache` header says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Answered from the cache.
    Hit,
    /// Not in the cache (or not looked up yet: a delayed job is looked up when it runs).
    Miss,
    /// The cache is off for this request's guild.
    Off,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Off => "off",
        }
    }
}

/// How the cache applies to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    pub key: CacheKey,
    /// The guild the entry is filed under (for clearing one guild's entries).
    pub guild_id: String,
    pub ttl_ms: u64,
}

/// Whether `result` may be served again to someone else.
pub fn storable(result: &JobResult) -> bool {
    !result.used_fallback
        && !result.cached
        && !result.reply.trim().is_empty()
        && result.reply != EMPTY_REPLY_PLACEHOLDER
}

/// The cache key of `plan` in `guild_id` (see the module docs for what it covers).
pub fn key(guild_id: Option<&str>, plan: &UpstreamPlan) -> CacheKey {
    fn text(hash: &mut Sha256, bytes: &[u8]) {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    }
    let mut hash = Sha256::new();
    // The encoding's own version: a change to it must not meet entries of the old one.
    hash.update(b"chatq response cache 1\0");
    match guild_id {
        None => hash.update([0]),
        Some(guild) => {
            hash.update([1]);
            text(&mut hash, guild.as_bytes());
        }
    }
    text(&mut hash, plan.personality.as_bytes());
    text(&mut hash, plan.model.as_bytes());
    // -0.0 and 0.0 ask the same thing; every other value has one bit pattern.
    let temperature = if plan.temperature == 0.0 {
        0.0f32
    } else {
        plan.temperature
    };
    hash.update(temperature.to_bits().to_be_bytes());
    hash.update(plan.max_tokens.to_be_bytes());
    hash.update((plan.messages.len() as u64).to_be_bytes());
    for message in &plan.messages {
        text(&mut hash, message.role.as_bytes());
        text(&mut hash, message.content.as_bytes());
    }
    CacheKey(hash.finalize().into())
}

/// What a flight's leader lands: the reply to share, or nothing worth sharing.
type Landing = Option<CachedReply>;

/// Requests in flight in this process, by key.
#[derive(Default)]
pub struct Flights(Mutex<HashMap<CacheKey, watch::Receiver<Option<Landing>>>>);

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<CacheKey, watch::Receiver<Option<Landing>>>> {
        // Held for one map operation; a panic cannot leave the map half-changed.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the flight of `key`: lead it, or follow the request already leading it.
    pub fn join(&self, key: CacheKey) -> Flight<'_> {
        let mut flights = self.lock();
        if let Some(rx) = flights.get(&key) {
            return Flight::Follow(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key, rx);
        Flight::Lead(Leader {
            flights: self,
            key,
            tx,
        })
    }
}

/// A worker's part in the flight of its request's key.
pub enum Flight<'a> {
    /// No identical request is in flight here: this one calls the upstream.
    Lead(Leader<'a>),
    /// One is: wait for what it lands ([`follow`]).
    Follow(watch::Receiver<Option<Landing>>),
}

/// The lead of a flight; dropping it without [`Leader::land`] tells followers to look again.
pub struct Leader<'a> {
    flights: &'a Flights,
    key: CacheKey,
    tx: watch::Sender<Option<Landing>>,
}

impl Leader<'_> {
    /// Hands followers the reply (or that there is none to share).
    pub fn land(self, landing: Landing) {
        self.tx.send_replace(Some(landing));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock();
        if flights
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            flights.remove(&self.key);
        }
    }
}

/// What the leader followed landed; `None` when it landed nothing to share or went away.
pub async fn follow(mut rx: watch::Receiver<Option<Landing>>) -> Option<CachedReply> {
    match rx.wait_for(Option::is_some).await {
        Ok(landing) => landing.clone().flatten(),
        Err(_) => None,
    }
}

/// The cache as the front door and the workers use it.
pub struct ResponseCache {
    store: Arc<dyn Store>,
    bot: Arc<ChatBot>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    /// `--cache-ttl-secs`; zero: off.
    ttl: Duration,
    flights: Flights,
}

impl ResponseCache {
    pub fn new(
        store: Arc<dyn Store>,
        bot: Arc<ChatBot>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        ttl: Duration,
    ) -> Self {
        Self {
            store,
            bot,
            metrics,
            clock,
            ttl,
            flights: Flights::default(),
        }
    }

    /// `--cache-ttl-secs`.
    pub fn server_ttl(&self) -> Duration {
        self.ttl
    }

    /// How long entries live for requests of a guild with `settings`: its own TTL, else the
    /// server's; zero: the cache is off there.
    pub fn ttl_for(&self, settings: Option<&GuildSettings>) -> Duration {
        settings
            .and_then(|s| s.cache_ttl_secs)
            .map_or(self.ttl, Duration::from_secs)
    }

    /// The cache's terms for a job as a worker runs it: its guild's settings are read now.
    /// A store that cannot say leaves the cache out of this job (it goes upstream).
    pub async fn terms_for(&self, guild_id: Option<&str>, request: &ChatRequest) -> Option<Terms> {
        let settings = match guild_id {
            Some(id) => match self.store.guild(id).await {
                Ok(guild) => guild.map(|g| g.settings),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the guild's settings failed; the cache is left out");
                    return None;
                }
            },
            None => None,
        };
        self.terms(settings.as_ref(), guild_id, request)
    }

    /// The cache's terms for `request` in `guild_id`, whose settings are `settings`; `None`
    /// when the cache is off there.
    pub fn terms(
        &self,
        settings: Option<&GuildSettings>,
        guild_id: Option<&str>,
        request: &ChatRequest,
    ) -> Option<Terms> {
        let ttl_ms = u64::try_from(self.ttl_for(settings).as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return None;
        }
        let plan = self.bot.plan(guild_id, request);
        Some(Terms {
            key: key(guild_id, &plan),
            guild_id: guild_id.unwrap_or(GLOBAL_GUILD).to_owned(),
            ttl_ms,
        })
    }

    /// The stored reply for `terms`, as the result of a job answered from it. A store that
    /// cannot be read is a miss (and logged): the request goes upstream instead.
    pub async fn lookup(&self, terms: &Terms) -> Option<JobResult> {
        match self.store.cache_get(&terms.key, terms.ttl_ms).await {
            Ok(found) => found.map(|reply| self.result_from(reply)),
            Err(e) => {
                tracing::warn!(error = %e, "reading the response cache failed; treated as a miss");
                None
            }
        }
    }

    /// A job's result made of a cached reply: no upstream call, so no latency and no tokens.
    pub fn result_from(&self, reply: CachedReply) -> JobResult {
        JobResult {
            reply: reply.reply,
            used_fallback: false,
            model: reply.model,
            usage: Some(Usage::default()),
            processed_at: self.clock.now_ms(),
            upstream_latency_ms: None,
            cached: true,
        }
    }

    /// Stores `result` under `terms` if it is worth serving again; returns what followers
    /// may share. A failed write is logged: the next identical request is a miss.
    pub async fn keep(&self, terms: &Terms, result: &JobResult) -> Landing {
        if !storable(result) {
            return None;
        }
        let reply = CachedReply {
            reply: result.reply.clone(),
            model: result.model.clone(),
        };
        if let Err(e) = self
            .store
            .cache_put(&terms.key, &terms.guild_id, &reply, terms.ttl_ms)
            .await
        {
            tracing::warn!(error = %e, "storing a reply in the response cache failed");
        }
        Some(reply)
    }

    /// Joins the flight of `key` in this process (see [`Flights::join`]).
    pub fn join(&self, key: CacheKey) -> Flight<'_> {
        self.flights.join(key)
    }

    /// Counts a job the cache had a say in.
    pub fn count(&self, verdict: Verdict) {
        if verdict != Verdict::Off {
            self.metrics.cache_request(verdict.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bot::prompt::WireMessage;

    fn plan() -> UpstreamPlan {
        UpstreamPlan {
            personality: "helpful".into(),
            model: "m".into(),
            messages: vec![
                WireMessage {
                    role: "system",
                    content: "be brief".into(),
                },
                WireMessage {
                    role: "user",
                    content: "what are the rules?".into(),
                },
            ],
            max_tokens: 180,
            temperature: 0.7,
        }
    }

    #[test]
    fn the_key_changes_with_everything_that_shapes_a_reply_and_nothing_else() {
        let base = key(Some("g1"), &plan());
        assert_eq!(
            base,
            key(Some("g1"), &plan()),
            "the same request hashes the same"
        );
        let mut variants = vec![key(Some("g2"), &plan()), key(None, &plan())];
        let changes: [fn(&mut UpstreamPlan); 7] = [
            |p| p.personality = "technical".into(),
            |p| p.model = "n".into(),
            |p| p.temperature = 0.8,
            |p| p.max_tokens = 181,
            |p| p.messages[0].content.push('!'),
            |p| p.messages[1].role = "assistant",
            |p| {
                p.messages.insert(
                    1,
                    WireMessage {
                        role: "user",
                        content: "hi".into(),
                    },
                )
            },
        ];
        for change in changes {
            let mut p = plan();
            change(&mut p);
            variants.push(key(Some("g1"), &p));
        }
        for v in &variants {
            assert_ne!(*v, base);
        }
        // Lengths are part of the encoding: moving text across a boundary is another key.
        let mut a = plan();
        a.messages[0].content = "be".into();
        a.messages[1].content = " briefwhat are the rules?".into();
        assert_ne!(key(Some("g1"), &a), base);
        assert_ne!(key(Some(""), &plan()), key(None, &plan()));
        let (mut zero, mut negative) = (plan(), plan());
        zero.temperature = 0.0;
        negative.temperature = -0.0;
        assert_eq!(key(None, &zero), key(None, &negative));
    }

    #[test]
    fn only_upstream_replies_with_content_are_storable() {
        let good = JobResult {
            reply: "Be kind.".into(),
            used_fallback: false,
            model: "m".into(),
            usage: None,
            processed_at: 0,
            upstream_latency_ms: Some(5),
            cached: false,
        };
        assert!(storable(&good));
        for bad in [
            JobResult {
                used_fallback: true,
                ..good.clone()
            },
            JobResult {
                cached: true,
                ..good.clone()
            },
            JobResult {
                reply: EMPTY_REPLY_PLACEHOLDER.into(),
                ..good.clone()
            },
            JobResult {
                reply: "  ".into(),
                ..good.clone()
            },
        ] {
            assert!(!storable(&bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn one_flight_per_key_and_followers_get_what_it_lands() {
        let flights = Flights::default();
        let (a, b) = (CacheKey([1; 32]), CacheKey([2; 32]));
        let Flight::Lead(leader) = flights.join(a) else {
            panic!("the first request leads");
        };
        let Flight::Follow(follower) = flights.join(a) else {
            panic!("an identical one follows");
        };
        let Flight::Lead(other) = flights.join(b) else {
            panic!("another key is another flight");
        };
        let reply = CachedReply {
            reply: "r".into(),
            model: "m".into(),
        };
        leader.land(Some(reply.clone()));
        assert_eq!(follow(follower).await, Some(reply));
        assert!(
            matches!(flights.join(a), Flight::Lead(_)),
            "a landed flight is over: the next request leads (and finds the cache)"
        );

        // A leader that goes away without landing sends its followers back to look again.
        let Flight::Follow(follower) = flights.join(b) else {
            panic!("b is in flight");
        };
        drop(other);
        assert_eq!(follow(follower).await, None);
        // And one that lands nothing worth sharing, the same.
        let Flight::Lead(leader) = flights.join(b) else {
            panic!("b is free again");
        };
        let Flight::Follow(follower) = flights.join(b) else {
            panic!("b is in flight");
        };
        leader.land(None);
        assert_eq!(follow(follower).await, None);
    }
}
