//! The domain model: what a chat job, a message and a logged interaction are. Every layer
//! (front door, bot, workers, stores) speaks these types; none of them knows a backend.

pub mod cache;
pub mod delivery;
pub mod guild;
pub mod interaction;
pub mod job;

pub use cache::{CacheEntry, CacheKey, CachedReply};
pub use delivery::{Delivery, DeliveryState, Target};
pub use guild::{
    GroupBy, Guild, GuildSettings, RateLimitSetting, Turn, UsageQuery, UsageRow, time_key,
    utc_day_start,
};
pub use interaction::{Action, Cursor, GLOBAL_GUILD, Interaction, LogPage, LogQuery};
pub use job::{
    ChatRequest, Job, JobError, JobResult, JobState, Message, NewJob, QueueCounts, Role, Usage,
};
