//! The interaction log's record and query types.
//!
//! One [`Interaction`] is written per finished attempt chain, in the same transaction that
//! finishes the job. The log is keyed by time (`timestamp_ms ++ seq`, big-endian, so keys
//! sort by time) with two secondary indexes, by user and by guild, whose keys are
//! `id ++ 0x00 ++ log key`: one user's newest entries are a reverse prefix scan, not a scan
//! of the log. User and guild ids never contain control characters (the front door checks),
//! so the 0x00 separator cannot collide.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::store::job::Usage;

/// The guild id recorded for interactions outside any guild.
pub const GLOBAL_GUILD: &str = "global";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    ChatBotInteraction,
    ChatBotError,
}

/// One logged interaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// The cursor of this entry (hex of its log key); filled in when read.
    pub id: String,
    pub job_id: Uuid,
    pub request_id: Option<String>,
    pub user_id: String,
    /// The guild id, or `global`.
    pub guild_id: String,
    pub action: Action,
    pub personality: Option<String>,
    pub prompt: String,
    pub reply: Option<String>,
    pub error: Option<String>,
    pub error_code: Option<String>,
    pub used_fallback: bool,
    pub model: Option<String>,
    pub upstream_latency_ms: Option<u64>,
    pub usage: Option<Usage>,
    pub attempts: u32,
    pub timestamp: Millis,
}

/// A query of the interaction log; every filter is optional. Results are newest first.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub user_id: Option<String>,
    pub guild_id: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<Millis>,
    /// Only entries before this time.
    pub until: Option<Millis>,
    /// Continue after this entry (the `next_cursor` of the previous page).
    pub cursor: Option<String>,
    pub limit: usize,
}

/// One page of a log query.
#[derive(Debug, Clone, Serialize)]
pub struct LogPage {
    pub entries: Vec<Interaction>,
    /// Pass as `cursor` to read the next (older) page; `None` at the end.
    pub next_cursor: Option<String>,
}

/// Retention for the interaction log; off by default.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogRetention {
    pub max_entries: Option<u64>,
    pub max_age_ms: Option<u64>,
}

pub(crate) fn log_key(timestamp: Millis, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&timestamp.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub(crate) fn cursor_of(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a cursor back into a log key; `None` if it is not one.
pub fn parse_cursor(cursor: &str) -> Option<[u8; 16]> {
    if cursor.len() != 32 || !cursor.is_ascii() {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&cursor[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

pub(crate) fn index_key(id: &str, log_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1 + log_key.len());
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key.extend_from_slice(log_key);
    key
}

pub(crate) fn index_prefix(id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1);
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let key = log_key(1_700_000_000_123, 42);
        assert_eq!(parse_cursor(&cursor_of(&key)), Some(key));
        assert_eq!(parse_cursor("xyz"), None);
        assert_eq!(parse_cursor(&"g".repeat(32)), None);
        assert_eq!(parse_cursor(&"é".repeat(16)), None);
    }

    #[test]
    fn log_keys_sort_by_time_then_sequence() {
        assert!(log_key(1, 9) < log_key(2, 0));
        assert!(log_key(2, 0) < log_key(2, 1));
    }
}
