//! The response cache's entries, as every backend stores them.
//!
//! A [`CacheKey`] is a SHA-256 over everything that shapes a reply (built by
//! `crate::cache::key`); a backend only compares keys, it never builds one.

use crate::clock::Millis;

/// What names one reply in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads a key back from its bytes (a stored row); `None` unless there are 32.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }
}

/// A reply worth serving again: an upstream's completed answer with content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedReply {
    pub reply: String,
    /// The model that wrote it.
    pub model: String,
}

/// One entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub key: CacheKey,
    /// The guild it belongs to ([`crate::domain::GLOBAL_GUILD`] outside any), so one guild's
    /// entries can be cleared; the key already keeps guilds apart.
    pub guild_id: String,
    pub reply: CachedReply,
    pub stored_at: Millis,
    /// After this the entry is never served, and maintenance removes it.
    pub expires_at: Millis,
}
