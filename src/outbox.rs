//! The deliverer: takes due deliveries from the store's outbox and sends their job's reply:
//! to Discord (below) or to a webhook (`crate::webhook`: the finished job view, signed, retried
//! on any failure for 24 hours, up to 10 minutes apart).
//!
//! A Discord delivery edits the interaction's original response
//! (`PATCH {api}/webhooks/{application}/{token}/messages/@original`) with the first 2,000
//! characters and posts the rest as follow-ups (`POST {api}/webhooks/{application}/{token}`),
//! each with `allowed_mentions: {"parse": []}` so a reply never pings anyone. After each piece
//! the delivery records how many were sent, so a retry (after a restart too) goes on from
//! the next one: at least once, a piece is repeated only if chatq died between Discord's
//! answer and that record.
//!
//! - A job not finished 13 minutes after its interaction gets its personality's fallback
//!   reply, marked as such: Discord's token dies at 15.
//! - 429: retried after Discord's `retry_after`; 5xx and network errors: after a backoff
//!   (1 s, doubling, at most 60 s); any other refusal gives up; so does the token's expiry.
//! - Claims are leased (`Outbox::claim_deliveries`), so replicas sharing a store never send
//!   one delivery twice at once, and one that died mid-attempt is taken up after the lease.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bot::fallback;
use crate::clock::Millis;
use crate::domain::{Delivery, DeliveryState, Job, JobState, Target};
use crate::http::AppState;
use crate::signals::Subscription;

/// Discord's longest message.
pub const MAX_MESSAGE_CHARS: usize = 2_000;
/// A job still running this long after its interaction gets the fallback reply.
pub const FALLBACK_AFTER_MS: u64 = 13 * 60_000;
/// How often the outbox is looked at (besides when a job with a parked delivery finishes).
const TICK: Duration = Duration::from_millis(200);
/// Attempts at once: one slow target does not hold the others up.
const MAX_IN_FLIGHT: usize = 32;
/// How long one finish subscription of a parked delivery lasts (a wake-up after it is
/// harmless: a delivery whose job is still running is parked again).
const WATCH_FOR: Duration = Duration::from_secs(15 * 60);
/// How long shutdown waits for attempts in flight.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// A claim holds a delivery this long (an attempt is a few HTTP requests of at most 10 s).
const LEASE_MS: u64 = 60_000;
const BACKOFF_CAP_MS: u64 = 60_000;
/// Webhooks are retried for a day: at most this far apart.
const WEBHOOK_BACKOFF_CAP_MS: u64 = 10 * 60_000;

/// Splits `text` into pieces of at most [`MAX_MESSAGE_CHARS`] characters, at a line break or
/// a space when there is one in the last quarter of a piece.
pub fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest: Vec<char> = text.chars().collect();
    while rest.len() > MAX_MESSAGE_CHARS {
        let window = &rest[..MAX_MESSAGE_CHARS];
        let cut = window
            .iter()
            .rposition(|c| *c == '\n')
            .or_else(|| window.iter().rposition(|c| *c == ' '))
            .filter(|i| *i >= MAX_MESSAGE_CHARS * 3 / 4)
            .map_or(MAX_MESSAGE_CHARS, |i| i + 1);
        out.push(rest[..cut].iter().collect());
        rest.drain(..cut);
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(rest.into_iter().collect());
    }
    out
}

/// What a finished job says in Discord.
fn reply_of(job: &Job) -> String {
    match (job.state, &job.result, &job.error) {
        (JobState::Completed, Some(result), _) => result.reply.clone(),
        (JobState::Cancelled, _, _) => "The request was cancelled.".to_owned(),
        (_, _, Some(error)) => format!("Sorry, I could not answer this time ({}).", error.message),
        _ => "Sorry, I could not answer this time.".to_owned(),
    }
}

/// Why an attempt stopped.
enum Stop {
    /// Try again after this many milliseconds.
    Retry(u64, String),
    /// Give up.
    GiveUp(String),
}

/// A delivery parked on its job: wakes it when the job finishes.
pub struct Parked {
    job_id: Uuid,
    finish: Subscription,
}

/// Runs until `stop` fires, then lets the attempts in flight end (for at most
/// [`STOP_WAIT`]) and wakes what it parked, so the next start, or another replica, takes
/// those deliveries up at once.
pub async fn run(state: AppState, stop: CancellationToken) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client for deliveries; none will be sent");
            return;
        }
    };
    let mut in_flight: JoinSet<Option<Parked>> = JoinSet::new();
    let mut parked = ParkedJobs::default();
    let mut claim_now = true;
    loop {
        let room = MAX_IN_FLIGHT.saturating_sub(in_flight.len());
        if claim_now && room > 0 {
            match state.store.claim_deliveries(room, LEASE_MS).await {
                Ok(due) => {
                    for delivery in due {
                        in_flight.spawn(attempt(state.clone(), http.clone(), delivery));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the delivery outbox failed"),
            }
        }
        claim_now = false;
        tokio::select! {
            () = tokio::time::sleep(TICK) => claim_now = true,
            Some(ended) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Ok(Some(parked_on)) = ended {
                    parked.add(parked_on);
                }
            }
            Some(job_id) = parked.next(), if !parked.is_empty() => {
                wake(&state, job_id).await;
                claim_now = true;
            }
            () = stop.cancelled() => break,
        }
    }
    let ended = tokio::time::timeout(STOP_WAIT, async {
        while let Some(ended) = in_flight.join_next().await {
            if let Ok(Some(parked_on)) = ended {
                parked.add(parked_on);
            }
        }
    })
    .await;
    if ended.is_err() {
        tracing::warn!(
            attempts = in_flight.len(),
            "deliveries still being attempted at shutdown were left leased; they are tried again when the lease ends"
        );
    }
    for job_id in parked.jobs {
        wake(&state, job_id).await;
    }
}

/// The jobs this process has parked deliveries on: one finish subscription per job (a
/// oneshot and a timer), not a task or a poll each.
#[derive(Default)]
struct ParkedJobs {
    finishes: FuturesUnordered<BoxFuture<'static, Uuid>>,
    jobs: HashSet<Uuid>,
}

impl ParkedJobs {
    /// Watches the job (once: a delivery parked again keeps the first subscription), for at
    /// most [`WATCH_FOR`]: a job that never finishes here must not hold a subscription for
    /// good; the parked delivery's backstop claim watches it afresh.
    fn add(&mut self, Parked { job_id, mut finish }: Parked) {
        if self.jobs.insert(job_id) {
            self.finishes.push(
                async move {
                    let _ = tokio::time::timeout(WATCH_FOR, finish.finished()).await;
                    job_id
                }
                .boxed(),
            );
        }
    }

    fn is_empty(&self) -> bool {
        self.finishes.is_empty()
    }

    /// The next watched job that finished.
    async fn next(&mut self) -> Option<Uuid> {
        let job_id = self.finishes.next().await?;
        self.jobs.remove(&job_id);
        Some(job_id)
    }
}

async fn wake(state: &AppState, job_id: Uuid) {
    if let Err(e) = state.store.wake_deliveries(job_id).await {
        // The backstop (`park_for`) takes the delivery up later.
        tracing::warn!(job_id = %job_id, error = %e, "waking a job's deliveries failed");
    }
}

async fn save(state: &AppState, delivery: &Delivery) {
    if let Err(e) = state.store.save_delivery(delivery).await {
        // The lease runs out and the delivery is attempted again: at least once.
        tracing::warn!(delivery = %delivery.id, error = %e, "recording a delivery failed");
    }
}

/// How long a delivery waits parked on its unfinished job before it is looked at again
/// anyway: as long as it has waited so far, from 1 s up to a cap (30 s for Discord, whose
/// reply is owed within 15 minutes; 5 minutes for a webhook), and never past Discord's
/// fallback moment. Its job's finish wakes it before that; this only bounds how long a lost
/// wake-up (the process that parked it died) can hold a reply back.
pub fn park_for(delivery: &Delivery, now: Millis) -> Millis {
    let (cap, deadline) = match delivery.target {
        Target::Discord { .. } => (30_000, delivery.created_at + FALLBACK_AFTER_MS),
        Target::Webhook { .. } => (5 * 60_000, delivery.expires_at),
    };
    let waited = now.saturating_sub(delivery.created_at);
    (now + waited.clamp(1_000, cap)).min(deadline.max(now))
}

/// Parks `delivery` until its job finishes: subscribes first, then records it waiting, then
/// reads the job once more, so a finish at any moment in between still wakes it.
async fn park(state: &AppState, mut delivery: Delivery) -> Option<Parked> {
    let finish = state.signals.finished.subscribe(delivery.job_id);
    let now = state.clock.now_ms();
    delivery.state = DeliveryState::Waiting;
    delivery.next_at = park_for(&delivery, now);
    if let Err(e) = state.store.save_delivery(&delivery).await {
        tracing::warn!(delivery = %delivery.id, error = %e, "parking a delivery failed");
        return None;
    }
    match state.store.get(delivery.job_id).await {
        Ok(Some(job)) if job.state.is_terminal() => {
            wake(state, delivery.job_id).await;
            None
        }
        _ => Some(Parked {
            job_id: delivery.job_id,
            finish,
        }),
    }
}

/// One attempt at one claimed delivery; `Some` when it was parked on its unfinished job.
async fn attempt(state: AppState, http: reqwest::Client, mut delivery: Delivery) -> Option<Parked> {
    let state = &state;
    let now = state.clock.now_ms();
    if now >= delivery.expires_at {
        let why = format!(
            "given up: the {} delivery could not be made in time",
            delivery.target.kind()
        );
        give_up(state, delivery, why).await;
        return None;
    }
    let discord = matches!(delivery.target, Target::Discord { .. });
    // Only Discord's short-lived token calls for a stand-in reply.
    let late = discord && now >= delivery.created_at + FALLBACK_AFTER_MS;
    let job = match state.store.get(delivery.job_id).await {
        Ok(Some(job)) if job.state.is_terminal() || late => job,
        // Not done yet (or, just after the request, not pushed yet): wait for it.
        Ok(Some(_)) => return park(state, delivery).await,
        Ok(None) if now < delivery.created_at + 60_000 => return park(state, delivery).await,
        Ok(None) => {
            give_up(state, delivery, "the job is gone".to_owned()).await;
            return None;
        }
        Err(e) => {
            delivery.next_at = now + 1_000;
            delivery.last_error = Some(e.to_string());
            save(state, &delivery).await;
            return None;
        }
    };
    let outcome = match delivery.target.clone() {
        Target::Discord {
            application_id,
            token,
        } => {
            let text = if job.state.is_terminal() {
                reply_of(&job)
            } else {
                delivery.fallback = true;
                let personality = state
                    .bot
                    .personalities()
                    .resolve(job.request.personality.as_deref());
                format!(
                    "{}\n\n(chatq: the answer is taking too long, so this is a canned reply.)",
                    fallback::reply_for(personality)
                )
            };
            discord_pieces(state, &http, &mut delivery, &application_id, &token, &text).await
        }
        Target::Webhook { url } => webhook(state, &http, &mut delivery, &url, &job).await,
    };
    match outcome {
        Ok(()) => {
            state.metrics.delivery(delivery.target.kind(), "delivered");
            delivery.state = DeliveryState::Delivered;
            delivery.last_error = None;
            delivery.next_at = state.clock.now_ms();
            save(state, &delivery).await;
        }
        Err(Stop::Retry(after_ms, why)) => {
            tracing::warn!(job_id = %delivery.job_id, target = delivery.target.kind(), error = %why, retry_in_ms = after_ms, "a delivery will be retried");
            state.metrics.delivery(delivery.target.kind(), "retried");
            delivery.next_at = state.clock.now_ms() + after_ms;
            delivery.last_error = Some(why);
            save(state, &delivery).await;
        }
        Err(Stop::GiveUp(why)) => give_up(state, delivery, why).await,
    }
    None
}

/// Ends a delivery as failed (expired, its job gone, or refused for good), counted and kept.
async fn give_up(state: &AppState, mut delivery: Delivery, why: String) {
    tracing::warn!(job_id = %delivery.job_id, target = delivery.target.kind(), error = %why, "a delivery was given up");
    state.metrics.delivery(delivery.target.kind(), "failed");
    delivery.state = DeliveryState::Failed;
    delivery.next_at = state.clock.now_ms();
    delivery.last_error = Some(why);
    save(state, &delivery).await;
}

/// The Discord reply: the edit, then follow-ups, from the first piece not yet sent; each
/// one sent is recorded at once.
async fn discord_pieces(
    state: &AppState,
    http: &reqwest::Client,
    delivery: &mut Delivery,
    application_id: &str,
    token: &str,
    text: &str,
) -> Result<(), Stop> {
    let Some(discord) = state.config.discord.as_ref() else {
        return Err(Stop::Retry(
            60_000,
            "Discord is not configured on this server".to_owned(),
        ));
    };
    let hook = format!("{}/webhooks/{application_id}/{token}", discord.api_base);
    for (i, piece) in pieces(text).iter().enumerate().skip(delivery.sent as usize) {
        let body = json!({"content": piece, "allowed_mentions": {"parse": []}});
        let request = if i == 0 {
            http.patch(format!("{hook}/messages/@original"))
        } else {
            http.post(hook.as_str())
        };
        delivery.attempts += 1;
        send(
            request.json(&body),
            delivery.attempts,
            BACKOFF_CAP_MS,
            false,
        )
        .await?;
        delivery.sent += 1;
        save(state, delivery).await;
    }
    Ok(())
}

/// The webhook: the finished job view, signed; retried on any failure until it expires.
async fn webhook(
    state: &AppState,
    http: &reqwest::Client,
    delivery: &mut Delivery,
    url: &str,
    job: &Job,
) -> Result<(), Stop> {
    let Some(secret) = state.config.webhook.secret.as_ref() else {
        return Err(Stop::Retry(
            60_000,
            "webhooks need --webhook-secret on this server".to_owned(),
        ));
    };
    let body = serde_json::to_vec(&crate::http::JobView::from(job)).unwrap_or_default();
    let id = format!("msg_{}", delivery.id.simple());
    let timestamp = state.clock.now_ms() / 1_000;
    let request = http
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", secret.sign(&id, timestamp, &body))
        .body(body);
    delivery.attempts += 1;
    send(request, delivery.attempts, WEBHOOK_BACKOFF_CAP_MS, true).await?;
    delivery.sent = 1;
    Ok(())
}

/// One request; `always_retry`: a refusal (4xx) is retried too (a webhook receiver's
/// trouble is usually passing), where Discord's 4xx means the token or message is gone.
async fn send(
    request: reqwest::RequestBuilder,
    attempts: u32,
    cap_ms: u64,
    always_retry: bool,
) -> Result<(), Stop> {
    let backoff = (1_000u64 << attempts.saturating_sub(1).min(20)).min(cap_ms);
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => return Err(Stop::Retry(backoff, format!("unreachable: {e}"))),
    };
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let header_wait = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok());
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.as_u16() == 429 {
        // Discord says how long in the body (seconds, fractional); others in Retry-After.
        let secs = body["retry_after"].as_f64().or(header_wait).unwrap_or(1.0);
        let wait = (secs.max(0.0) * 1_000.0).ceil() as u64;
        return Err(Stop::Retry(
            wait.clamp(1, cap_ms),
            "answered 429".to_owned(),
        ));
    }
    if status.is_server_error() || always_retry {
        return Err(Stop::Retry(backoff, format!("answered {status}")));
    }
    Err(Stop::GiveUp(format!("answered {status}: {body}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_delivery_is_looked_at_again_after_as_long_as_it_waited_within_its_bounds() {
        const T: Millis = 1_800_000_000_000;
        let delivery = |target: Target| Delivery {
            id: Uuid::nil(),
            job_id: Uuid::nil(),
            target,
            state: DeliveryState::Pending,
            attempts: 0,
            sent: 0,
            created_at: T,
            next_at: T,
            expires_at: T + 86_400_000,
            last_error: None,
            fallback: false,
        };
        let discord = delivery(Target::Discord {
            application_id: "a".into(),
            token: "t".into(),
        });
        let webhook = delivery(Target::Webhook {
            url: "http://h/".into(),
        });
        let near = T + FALLBACK_AFTER_MS - 5_000;
        for (delivery, now, due, why) in [
            (&discord, T, T + 1_000, "at least a second"),
            (&discord, T + 10_000, T + 20_000, "as long as it waited"),
            (&discord, T + 100_000, T + 130_000, "Discord: 30 s at most"),
            (
                &discord,
                near,
                T + FALLBACK_AFTER_MS,
                "never past the fallback",
            ),
            (&webhook, T + 3_600_000, T + 3_900_000, "webhook: 5 minutes"),
            (
                &webhook,
                T + 86_390_000,
                T + 86_400_000,
                "never past the expiry",
            ),
            (
                &webhook,
                T + 90_000_000,
                T + 90_000_000,
                "expired: due at once",
            ),
        ] {
            assert_eq!(park_for(delivery, now), due, "{why}");
        }
    }

    #[test]
    fn replies_are_cut_into_discord_sized_pieces_at_a_space_when_there_is_one() {
        assert_eq!(pieces("short"), ["short"]);
        assert_eq!(pieces(""), [""]);
        let words = "word ".repeat(600); // 3,000 characters
        let cut = pieces(&words);
        assert_eq!(cut.len(), 2);
        assert!(cut.iter().all(|p| p.chars().count() <= MAX_MESSAGE_CHARS));
        assert!(cut[0].ends_with(' '), "cut after a space");
        assert_eq!(cut.concat(), words, "nothing lost");
        let solid = "é".repeat(4_500);
        let cut = pieces(&solid);
        assert_eq!(
            cut.iter().map(|p| p.chars().count()).collect::<Vec<_>>(),
            [2_000, 2_000, 500]
        );
    }
}
