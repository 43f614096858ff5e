//! Discord's request signatures: Ed25519 over `X-Signature-Timestamp` followed by the raw
//! body, with the application's public key. A request that fails any check changes nothing.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};

/// Requests signed longer ago (or ahead) than this are refused: a captured request cannot be
/// replayed later.
pub const MAX_SKEW_SECS: u64 = 300;

/// Why a request was refused (the answer is 401 whatever it is; the reason goes to the log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the X-Signature-Ed25519 or X-Signature-Timestamp header is missing")]
    Missing,
    #[error("the signature is not 64 bytes of hex")]
    Malformed,
    #[error("the timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("the timestamp is more than {MAX_SKEW_SECS} s off")]
    Stale,
    #[error("the signature does not match")]
    Forged,
}

/// The application's public key, parsed once.
#[derive(Debug, Clone)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses the 64 hex digits the Developer Portal shows.
    pub fn from_hex(hex_key: &str) -> Result<Self, String> {
        let bytes: [u8; 32] = hex::decode(hex_key.trim())
            .map_err(|e| format!("not hex: {e}"))?
            .try_into()
            .map_err(|_| "an Ed25519 public key is 32 bytes (64 hex digits)".to_owned())?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|e| format!("not an Ed25519 public key: {e}"))
    }

    /// Checks one request: the headers' signature over `timestamp ++ body`, and the
    /// timestamp against `now_secs`.
    pub fn verify(
        &self,
        signature: Option<&str>,
        timestamp: Option<&str>,
        body: &[u8],
        now_secs: u64,
    ) -> Result<(), Refused> {
        let (Some(signature), Some(timestamp)) = (signature, timestamp) else {
            return Err(Refused::Missing);
        };
        let signature: [u8; 64] = hex::decode(signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(Refused::Malformed)?;
        let at: u64 = timestamp.parse().map_err(|_| Refused::BadTimestamp)?;
        if at.abs_diff(now_secs) > MAX_SKEW_SECS {
            return Err(Refused::Stale);
        }
        let mut message = Vec::with_capacity(timestamp.len() + body.len());
        message.extend_from_slice(timestamp.as_bytes());
        message.extend_from_slice(body);
        self.0
            .verify(&message, &Signature::from_bytes(&signature))
            .map_err(|_| Refused::Forged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn keys() -> (SigningKey, PublicKey) {
        let signing = SigningKey::from_bytes(&[7; 32]);
        let public = PublicKey::from_hex(&hex::encode(signing.verifying_key().as_bytes())).unwrap();
        (signing, public)
    }

    fn sign(key: &SigningKey, timestamp: &str, body: &[u8]) -> String {
        let mut message = timestamp.as_bytes().to_vec();
        message.extend_from_slice(body);
        hex::encode(key.sign(&message).to_bytes())
    }

    #[test]
    fn a_signed_request_passes_and_every_fault_is_refused() {
        let (signing, public) = keys();
        let body = br#"{"type":1}"#;
        let now = 1_800_000_000;
        let ts = now.to_string();
        let good = sign(&signing, &ts, body);
        assert_eq!(public.verify(Some(&good), Some(&ts), body, now), Ok(()));
        assert_eq!(
            public.verify(None, Some(&ts), body, now),
            Err(Refused::Missing)
        );
        assert_eq!(
            public.verify(Some(&good), None, body, now),
            Err(Refused::Missing)
        );
        assert_eq!(
            public.verify(Some("zz"), Some(&ts), body, now),
            Err(Refused::Malformed)
        );
        assert_eq!(
            public.verify(Some(&good), Some(&ts), br#"{"type":2}"#, now),
            Err(Refused::Forged),
            "another body"
        );
        let other = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(
            public.verify(Some(&sign(&other, &ts, body)), Some(&ts), body, now),
            Err(Refused::Forged),
            "another key"
        );
        let old = (now - MAX_SKEW_SECS - 1).to_string();
        assert_eq!(
            public.verify(Some(&sign(&signing, &old, body)), Some(&old), body, now),
            Err(Refused::Stale)
        );
        assert_eq!(
            public.verify(Some(&good), Some("soon"), body, now),
            Err(Refused::BadTimestamp)
        );
        assert!(PublicKey::from_hex("abcd").is_err());
    }
}
