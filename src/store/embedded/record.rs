//! What the embedded store writes: job records with the store's own bookkeeping beside the
//! domain [`Job`], interaction entries, and the keys of the log and its indexes.
//!
//! # Job record versions
//!
//! | version | layout (bincode, positional) |
//! |---|---|
//! | 1 | the job's fields, `seq`, `log_pending` (the job type carried both) |
//! | 2 | the job's fields, `seq`, `log_pending`, `lease` |
//!
//! Version 2 added the fencing token of the current claim. A version-1 record reads as a
//! version-2 one with `lease` 0 (no claim was ever fenced), so a data directory written by
//! the previous release opens unchanged; it is rewritten as version 2 when the job next
//! changes. A change to the domain types' fields changes this layout: the test
//! `a_version_2_record_has_this_exact_layout` fails until a new version is added here.
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
use crate::domain::{Cursor, Interaction, Job};

/// The job record version this release writes.
pub const JOB_VERSION: u8 = 2;

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

/// Version 1: the same, without `lease`.
#[derive(Deserialize)]
struct StoredJobV1 {
    job: Job,
    seq: u64,
    log_pending: bool,
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
                job: old.job,
                seq: old.seq,
                log_pending: old.log_pending,
                lease: 0,
            })
        }
        (JOB_VERSION, body) => codec::decode_body(body),
        (found, _) => Err(CodecError::UnknownVersion {
            found,
            newest: JOB_VERSION,
        }),
    }
}

pub fn encode_interaction(entry: &Interaction) -> Result<Vec<u8>, CodecError> {
    codec::encode(codec::FORMAT_VERSION, entry)
}

pub fn decode_interaction(bytes: &[u8]) -> Result<Interaction, CodecError> {
    codec::decode(codec::FORMAT_VERSION, bytes)
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

    #[test]
    fn a_version_2_record_has_this_exact_layout() {
        // If this fails, the stored layout changed: add a version above instead of editing
        // these bytes, and a reader for the old one.
        let bytes = encode_job(&sample()).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "02", // record version
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
                "02",
                "01",
                "03",
                "03", // priority, attempts, max, state completed
                "01",
                "0102",
                "0103",
                "01",                           // created, started, finished, run_at
                "01026f6b00016d01040509030107", // result: reply, fallback, model, usage, at, latency
                "00",
                "01016b",
                "00", // error, idempotency key, request id
                "fb2c01",
                "01",
                "fb2b01", // seq 300, log_pending, lease 299
            ),
        );
        assert_eq!(decode_job(&bytes).unwrap(), sample());
    }

    #[test]
    fn a_version_1_record_still_reads() {
        #[derive(Serialize)]
        struct V1<'a> {
            job: &'a Job,
            seq: u64,
            log_pending: bool,
        }
        let new = sample();
        let old = codec::encode(
            1,
            &V1 {
                job: &new.job,
                seq: new.seq,
                log_pending: new.log_pending,
            },
        )
        .unwrap();
        let read = decode_job(&old).unwrap();
        assert_eq!(read.job, new.job);
        assert_eq!((read.seq, read.log_pending, read.lease), (300, true, 0));
        let mut unknown = encode_job(&new).unwrap();
        unknown[0] = 3;
        assert!(matches!(
            decode_job(&unknown),
            Err(CodecError::UnknownVersion {
                found: 3,
                newest: 2
            })
        ));
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
