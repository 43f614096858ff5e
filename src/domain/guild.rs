//! Guilds and conversations (DESIGN §15): a guild's settings, the turns of a conversation
//! kept on the server, and the usage figures read from the interaction log.

use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// A guild's own rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RateLimitSetting {
    /// Requests per user per window.
    pub limit: u32,
    pub window_secs: u64,
}

/// What an admin set for one guild. Every field is optional: unset, the server's flag applies.
/// (Plain fields, no `skip_serializing_if`: the embedded store encodes them positionally.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuildSettings {
    /// The personality a request that names none gets.
    pub personality: Option<String>,
    /// Added to the system prompt of every request in the guild (at most 2,000 characters).
    pub instructions: Option<String>,
    /// The model asked for upstream.
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    pub rate_limit: Option<RateLimitSetting>,
    /// Upstream tokens one user may spend per UTC day in this guild.
    pub daily_token_quota: Option<u64>,
    /// How long replies stay in the response cache (0: off in this guild).
    pub cache_ttl_secs: Option<u64>,
    /// Exchanges of a server-side conversation sent upstream (0–50; default 10).
    pub history_turns: Option<u32>,
    /// The personalities a request may name (unset: all).
    pub allowed_personalities: Option<Vec<String>>,
}

/// A guild's settings as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guild {
    pub guild_id: String,
    pub settings: GuildSettings,
    pub updated_at: Millis,
}

/// One exchange of a conversation: what the user said and what the bot answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub job_id: uuid::Uuid,
    pub user_id: String,
    pub prompt: String,
    pub reply: String,
    pub at: Millis,
}

/// How `/v1/usage` groups the interaction log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    User,
    Guild,
    /// UTC days, `YYYY-MM-DD`.
    Day,
    /// UTC hours (`YYYY-MM-DDTHH:00Z`), for the admin page's charts.
    Hour,
}

/// A usage query; every filter optional.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub guild_id: Option<String>,
    pub user_id: Option<String>,
    /// Entries at or after this time.
    pub since: Option<Millis>,
    /// Entries before this time.
    pub until: Option<Millis>,
    pub group_by: GroupBy,
}

impl UsageQuery {
    /// The entries a daily quota counts: `user_id`'s in `guild_id` on the UTC day that starts
    /// at `day_start`.
    pub fn day_of(guild_id: &str, user_id: &str, day_start: Millis) -> Self {
        Self {
            guild_id: Some(guild_id.to_owned()),
            user_id: Some(user_id.to_owned()),
            since: Some(day_start),
            until: Some(day_start + 86_400_000),
            group_by: GroupBy::User,
        }
    }
}

/// The totals of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// The user id, guild id, day or hour of the group.
    pub key: String,
    /// Finished jobs (completed or failed).
    pub requests: u64,
    pub completed: u64,
    pub failed: u64,
    /// Completed with a fallback reply.
    pub fallback: u64,
    /// Completed from the response cache.
    pub cached: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The start of the UTC day holding `ms`.
pub fn utc_day_start(ms: Millis) -> Millis {
    ms - ms % 86_400_000
}

/// The group key of an entry at `ms` (days and hours in UTC).
pub fn time_key(group_by: GroupBy, ms: Millis) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let text = humantime::format_rfc3339_seconds(t).to_string();
    match group_by {
        GroupBy::Hour => format!("{}:00Z", &text[..13]),
        _ => text[..10].to_owned(),
    }
}

impl UsageRow {
    /// Prompt and completion tokens: what a quota counts.
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// Adds one interaction-log entry to the totals.
    pub fn add(&mut self, entry: &crate::domain::Interaction) {
        self.requests += 1;
        match entry.action {
            crate::domain::Action::ChatBotInteraction => self.completed += 1,
            crate::domain::Action::ChatBotError => self.failed += 1,
        }
        self.fallback += u64::from(entry.used_fallback);
        self.cached += u64::from(entry.cached);
        if let Some(usage) = entry.usage {
            self.prompt_tokens += u64::from(usage.prompt_tokens);
            self.completion_tokens += u64::from(usage.completion_tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_hours_are_utc() {
        let ms = 1_800_000_000_000; // 2027-01-15T08:00:00Z
        assert_eq!(utc_day_start(ms), ms - 8 * 3_600_000);
        assert_eq!(time_key(GroupBy::Day, ms), "2027-01-15");
        assert_eq!(
            time_key(GroupBy::Hour, ms + 59 * 60_000),
            "2027-01-15T08:00Z"
        );
        assert_eq!(time_key(GroupBy::Day, utc_day_start(ms) - 1), "2027-01-14");
    }
}
