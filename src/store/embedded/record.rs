//! What the embedded store writes: job records with the store's own bookkeeping beside the
//! domain [`Job`], interaction entries, and the keys of the log and its indexes.
//!
//! # Job record versions
//!
//! | version | layout (bincode, positional) |
//! |---|---|
//! | 1 | the job's fields, `seq`, `log_pending` (the job type carried both) |
//! | 2 | the job's fields, `seq`, `log_pending`, `lease` |
//! | 3 | the same, with `model`, `instructions` and `conversation` at the end of the request and `cached` at the end of the result |
//!
//! Version 2 added the fencing token of the current claim; version 3 a guild's model and
//! instructions on the request and the result's `cached` flag. Older records read as version 3
//! ones with `lease` 0 (no claim was ever fenced), no model, instructions or conversation
//! (there were no guild settings or server-side conversations) and `cached` false (there was no cache), through the layouts in [`before_v3`], so a data
//! directory written by an earlier release opens unchanged; a record is rewritten as version
//! 3 when its job next changes. A change to the domain types' fields changes this layout: the
//! test `a_version_3_record_has_this_exact_layout` fails until a new version is added here.
//!
//! # Interaction entries
//!
//! Version 1 is the entry without `cached`, version 2 with it (after `usage`); version 1
//! entries read with `cached` false.
//!
//! # Guilds and conversation turns
//!
//! A guild's settings are one [`Guild`] under its id (version 1). A turn is one [`Turn`]
//! (version 1) under `guild ++ 0x00 ++ conversation ++ 0x00 ++ at (u64 BE) ++ seq (u64 BE)`:
//! one conversation's turns are a prefix, in time order; the finished time and the job's seq
//! make the key of a job's turn the same however often it is written (recovery rewrites it).
//!
//! # Cache entries
//!
//! Keyed by the 32-byte [`CacheKey`]; the value is [`StoredCacheEntry`], version 1, whose
//! `seq` orders entries by age for the bound on their number.
//!
//! # Log keys
//!
//! The log is keyed by time (`timestamp_ms ++ seq`, big-endian, so keys sort by time) with
//! two secondary indexes, by user and by guild, whose keys are `id ++ 0x00 ++ log key`: one
//! user's newest entries are a reverse prefix scan, not a scan of the log. User and guild ids
//! never contain control characters (the front door checks), so the 0x00 separator cannot
//! collide. A page's cursor is the hex of the last log key it returned.

use serde::{Deserialize, Serialize};

use super::codec::{self, CodecError};
use crate::clock::Millis;
use crate::domain::{CacheEntry, CacheKey, CachedReply, Cursor, Guild, Interaction, Job, Turn};

/// The job record version this release writes.
pub const JOB_VERSION: u8 = 3;
/// The interaction entry version this release writes.
pub const INTERACTION_VERSION: u8 = 2;
/// The cache entry version this release writes.
pub const CACHE_VERSION: u8 = 1;
/// The guild settings version this release writes.
pub const GUILD_VERSION: u8 = 1;
/// The conversation turn version this release writes.
pub const TURN_VERSION: u8 = 1;
/// The delivery version this release writes.
pub const DELIVERY_VERSION: u8 = 1;

/// A job as the embedded store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredJob {
    pub job: Job,
    /// Ordering key inside the ready, delayed or finished index (unique in the store).
    pub seq: u64,
    /// The job is finished but its interaction-log entry is not confirmed written yet; the
    /// next start writes it if a crash came in between.
    pub log_pending: bool,
    /// The fencing token of the claim that made the job `active` (0: never claimed). Drawn
    /// from the same counter as `seq`, so it is unique in the store across reopens.
    pub lease: u64,
}

/// Version 1: the job of [`before_v3`], `seq`, `log_pending`.
#[derive(Deserialize)]
struct StoredJobV1 {
    job: before_v3::Job,
    seq: u64,
    log_pending: bool,
}

/// Version 2: version 1 and `lease`.
#[derive(Deserialize)]
struct StoredJobV2 {
    job: before_v3::Job,
    seq: u64,
    log_pending: bool,
    lease: u64,
}

/// The domain types as records before version 3 (and interaction entries before version 2)
/// laid them out: without the request's `model`, `instructions` and `conversation` and the
/// result's `cached`. Read-only; each converts into today's type.
mod before_v3 {
    use serde::Deserialize;
    use uuid::Uuid;

    use crate::clock::Millis;
    use crate::domain::{self, JobError, JobState, Message, Usage};

    #[derive(Deserialize)]
    pub struct ChatRequest {
        prompt: String,
        history: Vec<Message>,
        personality: Option<String>,
        temperature: Option<f32>,
        max_tokens: Option<u32>,
    }

    impl From<ChatRequest> for domain::ChatRequest {
        fn from(r: ChatRequest) -> Self {
            Self {
                prompt: r.prompt,
                history: r.history,
                personality: r.personality,
                temperature: r.temperature,
                max_tokens: r.max_tokens,
                model: None,
                instructions: None,
                conversation: Vec::new(),
            }
        }
    }

    #[derive(Deserialize)]
    pub struct JobResult {
        reply: String,
        used_fallback: bool,
        model: String,
        usage: Option<Usage>,
        processed_at: Millis,
        upstream_latency_ms: Option<u64>,
    }

    impl From<JobResult> for domain::JobResult {
        fn from(r: JobResult) -> Self {
            Self {
                reply: r.reply,
                used_fallback: r.used_fallback,
                model: r.model,
                usage: r.usage,
                processed_at: r.processed_at,
                upstream_latency_ms: r.upstream_latency_ms,
                cached: false,
            }
        }
    }

    #[derive(Deserialize)]
    pub struct Job {
        id: Uuid,
        user_id: String,
        guild_id: Option<String>,
        conversation_id: Option<String>,
        request: ChatRequest,
        priority: u32,
        attempts: u32,
        max_attempts: u32,
        state: JobState,
        created_at: Millis,
        started_at: Option<Millis>,
        finished_at: Option<Millis>,
        run_at: Millis,
        result: Option<JobResult>,
        error: Option<JobError>,
        idempotency_key: Option<String>,
        request_id: Option<String>,
    }

    impl From<Job> for domain::Job {
        fn from(j: Job) -> Self {
            Self {
                id: j.id,
                user_id: j.user_id,
                guild_id: j.guild_id,
                conversation_id: j.conversation_id,
                request: j.request.into(),
                priority: j.priority,
                attempts: j.attempts,
                max_attempts: j.max_attempts,
                state: j.state,
                created_at: j.created_at,
                started_at: j.started_at,
                finished_at: j.finished_at,
                run_at: j.run_at,
                result: j.result.map(Into::into),
                error: j.error,
                idempotency_key: j.idempotency_key,
                request_id: j.request_id,
            }
        }
    }

    #[derive(Deserialize)]
    pub struct Interaction {
        id: String,
        job_id: Uuid,
        request_id: Option<String>,
        user_id: String,
        guild_id: String,
        action: domain::Action,
        personality: Option<String>,
        prompt: String,
        reply: Option<String>,
        error: Option<String>,
        error_code: Option<String>,
        used_fallback: bool,
        model: Option<String>,
        upstream_latency_ms: Option<u64>,
        usage: Option<Usage>,
        attempts: u32,
        timestamp: Millis,
    }

    impl From<Interaction> for domain::Interaction {
        fn from(e: Interaction) -> Self {
            Self {
                id: e.id,
                job_id: e.job_id,
                request_id: e.request_id,
                user_id: e.user_id,
                guild_id: e.guild_id,
                action: e.action,
                personality: e.personality,
                prompt: e.prompt,
                reply: e.reply,
                error: e.error,
                error_code: e.error_code,
                used_fallback: e.used_fallback,
                model: e.model,
                upstream_latency_ms: e.upstream_latency_ms,
                usage: e.usage,
                cached: false,
                attempts: e.attempts,
                timestamp: e.timestamp,
            }
        }
    }
}

pub fn encode_job(record: &StoredJob) -> Result<Vec<u8>, CodecError> {
    codec::encode(JOB_VERSION, record)
}

/// Reads a job record of any version this release knows.
pub fn decode_job(bytes: &[u8]) -> Result<StoredJob, CodecError> {
    match codec::split(bytes)? {
        (1, body) => {
            let old: StoredJobV1 = codec::decode_body(body)?;
            Ok(StoredJob {
                job: old.job.into(),
                seq: old.seq,
                log_pending: old.log_pending,
                lease: 0,
            })
        }
        (2, body) => {
            let old: StoredJobV2 = codec::decode_body(body)?;
            Ok(StoredJob {
                job: old.job.into(),
                seq: old.seq,
                log_pending: old.log_pending,
                lease: old.lease,
            })
        }
        (JOB_VERSION, body) => codec::decode_body(body),
        (found, _) => Err(CodecError::UnknownVersion {
            found,
            newest: JOB_VERSION,
        }),
    }
}

/// Writes `record` the way the previous release did (version 2), for tests that open a data
/// directory of that release.
#[cfg(test)]
pub fn encode_version_2(record: &StoredJob) -> Result<Vec<u8>, CodecError> {
    use crate::domain::{JobError, JobState, Message, Usage};
    #[derive(Serialize)]
    struct Request<'a> {
        prompt: &'a str,
        history: &'a [Message],
        personality: &'a Option<String>,
        temperature: Option<f32>,
        max_tokens: Option<u32>,
    }
    #[derive(Serialize)]
    struct Result<'a> {
        reply: &'a str,
        used_fallback: bool,
        model: &'a str,
        usage: Option<Usage>,
        processed_at: Millis,
        upstream_latency_ms: Option<u64>,
    }
    #[derive(Serialize)]
    struct V2Job<'a> {
        id: uuid::Uuid,
        user_id: &'a str,
        guild_id: &'a Option<String>,
        conversation_id: &'a Option<String>,
        request: Request<'a>,
        priority: u32,
        attempts: u32,
        max_attempts: u32,
        state: JobState,
        created_at: Millis,
        started_at: Option<Millis>,
        finished_at: Option<Millis>,
        run_at: Millis,
        result: Option<Result<'a>>,
        error: &'a Option<JobError>,
        idempotency_key: &'a Option<String>,
        request_id: &'a Option<String>,
    }
    #[derive(Serialize)]
    struct V2<'a> {
        job: V2Job<'a>,
        seq: u64,
        log_pending: bool,
        lease: u64,
    }
    let j = &record.job;
    let r = &j.request;
    let v2 = V2 {
        job: V2Job {
            id: j.id,
            user_id: &j.user_id,
            guild_id: &j.guild_id,
            conversation_id: &j.conversation_id,
            request: Request {
                prompt: &r.prompt,
                history: &r.history,
                personality: &r.personality,
                temperature: r.temperature,
                max_tokens: r.max_tokens,
            },
            priority: j.priority,
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            state: j.state,
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            run_at: j.run_at,
            result: j.result.as_ref().map(|x| Result {
                reply: &x.reply,
                used_fallback: x.used_fallback,
                model: &x.model,
                usage: x.usage,
                processed_at: x.processed_at,
                upstream_latency_ms: x.upstream_latency_ms,
            }),
            error: &j.error,
            idempotency_key: &j.idempotency_key,
            request_id: &j.request_id,
        },
        seq: record.seq,
        log_pending: record.log_pending,
        lease: record.lease,
    };
    codec::encode(2, &v2)
}

pub fn encode_interaction(entry: &Interaction) -> Result<Vec<u8>, CodecError> {
    codec::encode(INTERACTION_VERSION, entry)
}

/// Reads an interaction entry of any version this release knows.
pub fn decode_interaction(bytes: &[u8]) -> Result<Interaction, CodecError> {
    match codec::split(bytes)? {
        (1, body) => Ok(codec::decode_body::<before_v3::Interaction>(body)?.into()),
        (INTERACTION_VERSION, body) => codec::decode_body(body),
        (found, _) => Err(CodecError::UnknownVersion {
            found,
            newest: INTERACTION_VERSION,
        }),
    }
}

/// A cache entry as the embedded store keeps it (the key is the tree's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCacheEntry {
    pub guild_id: String,
    pub reply: String,
    pub model: String,
    pub stored_at: Millis,
    pub expires_at: Millis,
    /// Age order, for the bound on entries: drawn from the job counter, so unique.
    pub seq: u64,
}

impl StoredCacheEntry {
    pub fn into_entry(self, key: CacheKey) -> CacheEntry {
        CacheEntry {
            key,
            guild_id: self.guild_id,
            reply: CachedReply {
                reply: self.reply,
                model: self.model,
            },
            stored_at: self.stored_at,
            expires_at: self.expires_at,
        }
    }
}

pub fn encode_cache_entry(entry: &StoredCacheEntry) -> Result<Vec<u8>, CodecError> {
    codec::encode(CACHE_VERSION, entry)
}

pub fn decode_cache_entry(bytes: &[u8]) -> Result<StoredCacheEntry, CodecError> {
    codec::decode(CACHE_VERSION, bytes)
}

pub fn encode_guild(guild: &Guild) -> Result<Vec<u8>, CodecError> {
    codec::encode(GUILD_VERSION, guild)
}

pub fn decode_guild(bytes: &[u8]) -> Result<Guild, CodecError> {
    codec::decode(GUILD_VERSION, bytes)
}

pub fn encode_delivery(delivery: &crate::domain::Delivery) -> Result<Vec<u8>, CodecError> {
    codec::encode(DELIVERY_VERSION, delivery)
}

pub fn decode_delivery(bytes: &[u8]) -> Result<crate::domain::Delivery, CodecError> {
    codec::decode(DELIVERY_VERSION, bytes)
}

pub fn encode_turn(turn: &Turn) -> Result<Vec<u8>, CodecError> {
    codec::encode(TURN_VERSION, turn)
}

pub fn decode_turn(bytes: &[u8]) -> Result<Turn, CodecError> {
    codec::decode(TURN_VERSION, bytes)
}

/// The key prefix of one conversation's turns.
pub fn conversation_prefix(guild_id: &str, conversation_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(guild_id.len() + conversation_id.len() + 18);
    key.extend_from_slice(guild_id.as_bytes());
    key.push(0);
    key.extend_from_slice(conversation_id.as_bytes());
    key.push(0);
    key
}

pub fn turn_key(guild_id: &str, conversation_id: &str, at: Millis, seq: u64) -> Vec<u8> {
    let mut key = conversation_prefix(guild_id, conversation_id);
    key.extend_from_slice(&log_key(at, seq));
    key
}

/// The time in a turn key (its last 16 bytes are time and seq).
pub fn turn_time(key: &[u8]) -> Option<Millis> {
    let tail = key.len().checked_sub(16)?;
    Some(timestamp_of(&key[tail..]))
}

pub fn log_key(timestamp: Millis, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&timestamp.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub fn timestamp_of(log_key: &[u8]) -> Millis {
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&log_key[..8]);
    Millis::from_be_bytes(ts)
}

pub fn cursor_of(key: &[u8]) -> Cursor {
    Cursor::from_client(key.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads a cursor back into a log key; `None` if this store did not make it.
pub fn parse_cursor(cursor: &Cursor) -> Option<[u8; 16]> {
    let text = cursor.as_str();
    if text.len() != 32 || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

pub fn index_key(id: &str, log_key: &[u8]) -> Vec<u8> {
    let mut key = index_prefix(id);
    key.extend_from_slice(log_key);
    key
}

pub fn index_prefix(id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 17);
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ChatRequest, JobResult, JobState, Message, Role, Usage};

    fn sample() -> StoredJob {
        StoredJob {
            job: Job {
                id: uuid::Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10),
                user_id: "u".into(),
                guild_id: Some("g".into()),
                conversation_id: None,
                request: ChatRequest {
                    prompt: "hi".into(),
                    history: vec![Message {
                        role: Role::Assistant,
                        content: "yo".into(),
                    }],
                    personality: Some("helpful".into()),
                    temperature: Some(0.5),
                    max_tokens: None,
                    model: None,
                    instructions: None,
                    conversation: Vec::new(),
                },
                priority: 2,
                attempts: 1,
                max_attempts: 3,
                state: JobState::Completed,
                created_at: 1,
                started_at: Some(2),
                finished_at: Some(3),
                run_at: 1,
                result: Some(JobResult {
                    reply: "ok".into(),
                    used_fallback: false,
                    model: "m".into(),
                    usage: Some(Usage {
                        prompt_tokens: 4,
                        completion_tokens: 5,
                        total_tokens: 9,
                    }),
                    processed_at: 3,
                    upstream_latency_ms: Some(7),
                    cached: false,
                }),
                error: None,
                idempotency_key: Some("k".into()),
                request_id: None,
            },
            seq: 300,
            log_pending: true,
            lease: 299,
        }
    }

    /// The bytes of `sample()` up to the end of its result's latency, as every version so far
    /// writes them (the version byte aside).
    const REQUEST_OF_EVERY_VERSION: &str = concat!(
        "10", // id: length 16, then the bytes
        "0102030405060708090a0b0c0d0e0f10",
        "0175",
        "010167",
        "00", // user "u", guild Some("g"), conversation
        "026869",
        "0102",
        "02796f", // prompt, history [assistant "yo"]
        "010768656c7066756c",
        "010000003f",
        "00", // personality, temperature 0.5, max_tokens
    );
    /// From the priority to the end of the result's latency.
    const FIELDS_BEFORE_CACHED: &str = concat!(
        "02",
        "01",
        "03",
        "03", // priority, attempts, max, state completed
        "01",
        "0102",
        "0103",
        "01",                           // created, started, finished, run_at
        "01026f6b00016d01040509030107", // result: reply, fallback, model, usage, at, latency
    );
    /// What follows the result: error, idempotency key, request id, then `seq` and
    /// `log_pending`.
    const FIELDS_AFTER_RESULT: &str = concat!("00", "01016b", "00", "fb2c01", "01");

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn a_version_3_record_has_this_exact_layout() {
        // If this fails, the stored layout changed: add a version above instead of editing
        // these bytes, and a reader for the old one.
        let mut record = sample();
        if let Some(result) = record.job.result.as_mut() {
            result.cached = true;
        }
        record.job.request.model = Some("m2".into());
        let bytes = encode_job(&record).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let expected = [
            "03", // record version
            REQUEST_OF_EVERY_VERSION,
            "01026d32", // request: model Some("m2")
            "00",       // request: instructions
            "00",       // request: conversation []
            FIELDS_BEFORE_CACHED,
            "01", // result: cached
            FIELDS_AFTER_RESULT,
            "fb2b01", // lease 299
        ]
        .concat();
        assert_eq!(hex, expected);
        assert_eq!(decode_job(&bytes).unwrap(), record);
    }

    #[test]
    fn version_1_and_2_records_still_read() {
        // The bytes those releases wrote, pinned when they were current.
        let v2 = unhex(
            &[
                "02",
                REQUEST_OF_EVERY_VERSION,
                FIELDS_BEFORE_CACHED,
                FIELDS_AFTER_RESULT,
                "fb2b01",
            ]
            .concat(),
        );
        assert_eq!(decode_job(&v2).unwrap(), sample(), "cached reads as false");
        assert_eq!(
            encode_version_2(&sample()).unwrap(),
            v2,
            "the tests' writer of v2"
        );
        let v1 = unhex(
            &[
                "01",
                REQUEST_OF_EVERY_VERSION,
                FIELDS_BEFORE_CACHED,
                FIELDS_AFTER_RESULT,
            ]
            .concat(),
        );
        let read = decode_job(&v1).unwrap();
        assert_eq!(read.job, sample().job);
        assert_eq!((read.seq, read.log_pending, read.lease), (300, true, 0));
        let mut unknown = encode_job(&sample()).unwrap();
        unknown[0] = 4;
        assert!(matches!(
            decode_job(&unknown),
            Err(CodecError::UnknownVersion {
                found: 4,
                newest: 3
            })
        ));
    }

    #[test]
    fn interaction_entries_of_version_1_read_as_not_cached() {
        let mut job = sample().job;
        let mut entry = Interaction::for_finished(&job);
        assert!(!entry.cached);
        // Version 1 is today's entry without `cached`, which sits between usage and attempts.
        let v2 = encode_interaction(&entry).unwrap();
        #[derive(Serialize)]
        struct V1<'a> {
            id: &'a str,
            job_id: uuid::Uuid,
            request_id: &'a Option<String>,
            user_id: &'a str,
            guild_id: &'a str,
            action: crate::domain::Action,
            personality: &'a Option<String>,
            prompt: &'a str,
            reply: &'a Option<String>,
            error: &'a Option<String>,
            error_code: &'a Option<String>,
            used_fallback: bool,
            model: &'a Option<String>,
            upstream_latency_ms: Option<u64>,
            usage: Option<Usage>,
            attempts: u32,
            timestamp: Millis,
        }
        let e = &entry;
        let v1 = codec::encode(
            1,
            &V1 {
                id: &e.id,
                job_id: e.job_id,
                request_id: &e.request_id,
                user_id: &e.user_id,
                guild_id: &e.guild_id,
                action: e.action,
                personality: &e.personality,
                prompt: &e.prompt,
                reply: &e.reply,
                error: &e.error,
                error_code: &e.error_code,
                used_fallback: e.used_fallback,
                model: &e.model,
                upstream_latency_ms: e.upstream_latency_ms,
                usage: e.usage,
                attempts: e.attempts,
                timestamp: e.timestamp,
            },
        )
        .unwrap();
        assert_eq!(v1.len() + 1, v2.len(), "one byte more: the flag");
        assert_eq!(decode_interaction(&v1).unwrap(), entry);
        if let Some(result) = job.result.as_mut() {
            result.cached = true;
        }
        entry = Interaction::for_finished(&job);
        assert!(entry.cached);
        let bytes = encode_interaction(&entry).unwrap();
        assert_eq!(bytes[0], INTERACTION_VERSION);
        assert_eq!(decode_interaction(&bytes).unwrap(), entry);
    }

    #[test]
    fn a_cache_entry_round_trips() {
        let stored = StoredCacheEntry {
            guild_id: "g".into(),
            reply: "Read #rules.".into(),
            model: "m".into(),
            stored_at: 5,
            expires_at: 9,
            seq: 7,
        };
        let bytes = encode_cache_entry(&stored).unwrap();
        assert_eq!(
            bytes,
            unhex("0101670c52656164202372756c65732e016d050907"),
            "version, guild, reply, model, stored, expires, seq"
        );
        let key = CacheKey([3; 32]);
        let entry = decode_cache_entry(&bytes).unwrap().into_entry(key);
        assert_eq!(
            (entry.key, entry.reply.reply.as_str()),
            (key, "Read #rules.")
        );
        assert_eq!((entry.stored_at, entry.expires_at), (5, 9));
    }

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let key = log_key(1_700_000_000_123, 42);
        assert_eq!(parse_cursor(&cursor_of(&key)), Some(key));
        for bad in ["xyz".to_owned(), "g".repeat(32), "é".repeat(16)] {
            assert_eq!(parse_cursor(&Cursor::from_client(bad)), None);
        }
    }

    #[test]
    fn log_keys_sort_by_time_then_sequence() {
        assert!(log_key(1, 9) < log_key(2, 0));
        assert!(log_key(2, 0) < log_key(2, 1));
    }
}
