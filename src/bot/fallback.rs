//! Canned replies for offline demos: one per personality, always marked as fallback.

use crate::bot::personality::Personality;

/// The model name recorded for fallback replies.
pub const FALLBACK_MODEL: &str = "chatq-fallback";

/// The reply when the upstream answers with no content.
pub const EMPTY_REPLY_PLACEHOLDER: &str = "I'm not sure how to reply just yet, but I'm listening.";

/// The canned reply for a personality.
pub fn reply_for(personality: &Personality) -> &str {
    &personality.fallback
}
