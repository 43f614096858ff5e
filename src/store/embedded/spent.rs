//! Tokens spent today per (guild, user), kept as the log grows, so that a daily quota check
//! (on every submit in a guild with a quota) is a map read, not a scan of the user's entries
//! for the day (up to ~14,000 at the default rate limit, each a log read and decode).
//!
//! A total is filled by one scan of the log the first time a (guild, user) is asked about on
//! a given day (after a start, too), then kept: every new log entry adds its tokens. The scan
//! and the additions take the same lock (one of [`SHARDS`], by the pair's hash), and an
//! addition covers the log write itself, so an entry is either in the scan or added after
//! it, never both and never neither. Totals of past days are dropped by retention.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use crate::clock::Millis;
use crate::domain::utc_day_start;

/// Locks, so that completions of different users rarely wait for each other.
const SHARDS: usize = 16;

type Totals = HashMap<(String, String), Day>;

/// A pair's total for one UTC day.
#[derive(Clone, Copy)]
struct Day {
    start: Millis,
    tokens: u64,
}

pub struct Spent {
    shards: Vec<Mutex<Totals>>,
    hasher: RandomState,
}

impl Default for Spent {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Spent {
    fn shard(&self, guild: &str, user: &str) -> MutexGuard<'_, Totals> {
        let index = self.hasher.hash_one((guild, user)) as usize % SHARDS;
        // Only map reads and writes, the scan and one log write happen under it; a panic in
        // those leaves at worst a total that the next day replaces.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `write` (which writes one log entry of `user` in `guild` at `at` spending `tokens`,
    /// and says whether the entry is new) and adds a new entry's tokens to the pair's total of
    /// that day, if one is kept.
    pub fn record<E>(
        &self,
        guild: &str,
        user: &str,
        at: Millis,
        tokens: u64,
        write: impl FnOnce() -> Result<bool, E>,
    ) -> Result<bool, E> {
        let mut totals = self.shard(guild, user);
        let fresh = write()?;
        if fresh && tokens > 0 {
            let key = (guild.to_owned(), user.to_owned());
            let day_start = utc_day_start(at);
            if let Some(day) = totals.get_mut(&key).filter(|day| day.start == day_start) {
                day.tokens += tokens;
            }
        }
        Ok(fresh)
    }

    /// The pair's total for the day starting at `day_start`, if kept.
    pub fn known(&self, guild: &str, user: &str, day_start: Millis) -> Option<u64> {
        let key = (guild.to_owned(), user.to_owned());
        self.shard(guild, user)
            .get(&key)
            .filter(|day| day.start == day_start)
            .map(|day| day.tokens)
    }

    /// The pair's total for the day starting at `day_start`: kept, or `scan`ned from the log
    /// (under the lock, so no entry is counted twice or missed) and kept from now on.
    pub fn get_or_scan<E>(
        &self,
        guild: &str,
        user: &str,
        day_start: Millis,
        scan: impl FnOnce() -> Result<u64, E>,
    ) -> Result<u64, E> {
        let key = (guild.to_owned(), user.to_owned());
        let mut totals = self.shard(guild, user);
        if let Some(day) = totals.get(&key).filter(|day| day.start == day_start) {
            return Ok(day.tokens);
        }
        let tokens = scan()?;
        totals.insert(
            key,
            Day {
                start: day_start,
                tokens,
            },
        );
        Ok(tokens)
    }

    /// Drops the totals of days before `day_start`.
    pub fn forget_before(&self, day_start: Millis) {
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .retain(|_, day| day.start >= day_start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Millis = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000;

    #[test]
    fn a_total_is_scanned_once_then_kept_by_new_entries_of_its_day_only() {
        let spent = Spent::default();
        let ok = |fresh: bool| move || Ok::<_, ()>(fresh);
        assert_eq!(spent.known("g", "u", DAY), None);
        // Before anyone asked: nothing is kept, the entry is the scan's to count.
        spent.record("g", "u", DAY + 5, 7, ok(true)).unwrap();
        assert_eq!(spent.get_or_scan("g", "u", DAY, || Ok::<_, ()>(7)), Ok(7));
        spent.record("g", "u", DAY + 10, 3, ok(true)).unwrap();
        spent.record("g", "u", DAY + 11, 4, ok(false)).unwrap();
        spent.record("g", "other", DAY + 12, 5, ok(true)).unwrap();
        spent
            .record("g", "u", DAY + 86_400_000, 100, ok(true))
            .unwrap();
        let rescanned = spent.get_or_scan("g", "u", DAY, || Err("scanned again"));
        assert_eq!(
            rescanned,
            Ok(10),
            "7 + 3: not a repeat, another user or day"
        );
        assert_eq!(spent.known("g", "u", DAY + 86_400_000), None);
        spent.forget_before(DAY + 86_400_000);
        assert_eq!(spent.known("g", "u", DAY), None);
        let failed = spent.record("g", "u", DAY, 1, || Err::<bool, _>("disk"));
        assert_eq!(failed, Err("disk"));
    }
}
