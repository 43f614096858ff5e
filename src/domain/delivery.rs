//! The delivery outbox (DESIGN §16): a finished job's reply sent somewhere else (a Discord
//! interaction's response, a webhook), kept as a record in the store so it survives restarts
//! and is retried with backoff until it is delivered or its target expires.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;

/// Where a delivery goes. (Externally tagged: the embedded store encodes it positionally.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// The response of a Discord interaction: edited once the reply is in, with follow-ups
    /// for a reply over 2,000 characters. The token is valid 15 minutes after the interaction.
    Discord {
        application_id: String,
        token: String,
    },
    /// A job's `callback_url`: the finished job view, signed (Standard Webhooks).
    Webhook { url: String },
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Discord { .. } => "discord",
            Self::Webhook { .. } => "webhook",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its job to finish, or for its next attempt.
    Pending,
    Delivered,
    /// Given up: the target expired or refused for good.
    Failed,
}

/// One delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: Uuid,
    pub job_id: Uuid,
    pub target: Target,
    pub state: DeliveryState,
    /// Attempts that reached the target (or failed to).
    pub attempts: u32,
    /// Pieces of the reply already delivered (Discord: the edit, then each follow-up), so a
    /// retry goes on from the next one.
    pub sent: u32,
    pub created_at: Millis,
    /// Not looked at before this time (the next attempt, or a claim's lease).
    pub next_at: Millis,
    /// Given up after this time.
    pub expires_at: Millis,
    pub last_error: Option<String>,
    /// The reply was the personality's fallback because the job was not done in time.
    pub fallback: bool,
}
