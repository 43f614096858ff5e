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
    /// Due for its (next) attempt at `next_at`, or being attempted under a claim's lease.
    Pending,
    Delivered,
    /// Given up: the target expired or refused for good.
    Failed,
    /// Parked until its job finishes: the job's finish wakes it
    /// ([`Outbox::wake_deliveries`](crate::store::Outbox::wake_deliveries)); `next_at` is
    /// only a backstop for a wake-up that never came (the process that would have sent it
    /// died), or Discord's fallback moment.
    Waiting,
}

impl DeliveryState {
    /// Whether the delivery is still owed (a claim may take it when it is due).
    pub fn is_open(self) -> bool {
        matches!(self, Self::Pending | Self::Waiting)
    }
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
