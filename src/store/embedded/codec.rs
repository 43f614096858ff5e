//! The record codec: bincode 2 (serde) behind a leading format-version byte.
//!
//! Every value the embedded store writes goes through [`encode`] and is read back through
//! [`decode`] (one known version) or [`split`] and [`decode_body`] (a reader that still
//! knows older layouts, `record.rs`). An unknown version or a damaged record is a
//! [`CodecError`], never a panic or silently wrong data.

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("record has format version {found}, this release reads versions up to {newest}")]
    UnknownVersion { found: u8, newest: u8 },
    #[error("record could not be decoded: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("record could not be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
}

/// The largest record chatq will decode; a damaged length prefix cannot make it allocate more.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_RECORD_BYTES>,
> {
    bincode::config::standard().with_limit::<MAX_RECORD_BYTES>()
}

/// Encodes `value` as `[version, bincode...]`.
pub fn encode<T: Serialize>(version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(128);
    out.push(version);
    bincode::serde::encode_into_std_write(value, &mut out, config())?;
    Ok(out)
}

/// The version byte and the body of a record.
pub fn split(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    Ok((version, body))
}

/// Decodes a record body, checking that every byte was used.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(body, config())?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

/// Decodes a record written by [`encode`] with `version`, the only one this type has had.
pub fn decode<T: DeserializeOwned>(version: u8, bytes: &[u8]) -> Result<T, CodecError> {
    let (found, body) = split(bytes)?;
    if found != version {
        return Err(CodecError::UnknownVersion {
            found,
            newest: version,
        });
    }
    decode_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// Any version byte: the codec only carries it.
    const FORMAT_VERSION: u8 = 1;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u32,
        b: Option<String>,
    }

    #[test]
    fn round_trips_with_version_byte() {
        let s = Sample {
            a: 7,
            b: Some("x".into()),
        };
        let bytes = encode(FORMAT_VERSION, &s).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Sample>(FORMAT_VERSION, &bytes).unwrap(), s);
    }

    #[test]
    fn unknown_version_is_an_error() {
        let mut bytes = encode(FORMAT_VERSION, &Sample { a: 1, b: None }).unwrap();
        bytes[0] = 99;
        let err = decode::<Sample>(FORMAT_VERSION, &bytes).unwrap_err();
        assert!(matches!(err, CodecError::UnknownVersion { found: 99, .. }));
        assert!(err.to_string().contains("version 99"));
    }

    #[test]
    fn a_huge_length_prefix_is_an_error_not_an_allocation() {
        // Version byte, a = 7, Some, then a varint length of u64::MAX for the string.
        let mut bytes = vec![FORMAT_VERSION, 7, 1, 253];
        bytes.extend([255; 8]);
        assert!(matches!(
            decode::<Sample>(FORMAT_VERSION, &bytes),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn empty_truncated_and_trailing_records_are_errors() {
        assert!(matches!(
            decode::<Sample>(FORMAT_VERSION, &[]),
            Err(CodecError::Empty)
        ));
        let bytes = encode(
            FORMAT_VERSION,
            &Sample {
                a: 1,
                b: Some("hello".into()),
            },
        )
        .unwrap();
        assert!(decode::<Sample>(FORMAT_VERSION, &bytes[..bytes.len() - 2]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode::<Sample>(FORMAT_VERSION, &longer),
            Err(CodecError::Trailing(1))
        ));
    }
}
