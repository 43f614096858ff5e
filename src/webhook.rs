//! Webhooks (DESIGN §16): a job submitted with a `callback_url` has its finished view POSTed
//! there, signed per the Standard Webhooks specification, through the same durable outbox as
//! Discord replies: at least once, retried with backoff for 24 hours, across restarts.
//!
//! Only hosts named by `--webhook-allow-host` are accepted (none by default), so chatq cannot
//! be made an open relay towards internal addresses. Signing: `webhook-id` (the delivery's id,
//! the same on every retry, for receivers to drop repeats), `webhook-timestamp` (Unix
//! seconds), and `webhook-signature: v1,<base64 of HMAC-SHA256(key, id.timestamp.body)>` with
//! the key of `--webhook-secret` (`whsec_` and base64, as the specification writes it).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

/// How long a webhook delivery is retried.
pub const RETRY_FOR_MS: u64 = 24 * 3_600_000;

/// The webhook key, decoded from `whsec_…`.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Secret {
    /// Reads `whsec_<base64>` (the prefix may be left out).
    pub fn parse(text: &str) -> Result<Self, String> {
        let encoded = text.trim().strip_prefix("whsec_").unwrap_or(text.trim());
        let key = STANDARD
            .decode(encoded)
            .map_err(|e| format!("not base64 after whsec_: {e}"))?;
        if key.len() < 24 {
            return Err("the key must be at least 24 bytes".to_owned());
        }
        Ok(Self(key))
    }

    /// The `webhook-signature` value for one message.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        // HMAC takes keys of any length.
        let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// Webhook settings: where chatq may post, and with which key.
#[derive(Debug, Clone, Default)]
pub struct WebhookConfig {
    /// Host names (lower case) a `callback_url` may point at.
    pub allow_hosts: Vec<String>,
    pub secret: Option<Secret>,
}

impl WebhookConfig {
    /// Checks a `callback_url`: http(s), no credentials, a host on the allow list.
    pub fn check(&self, url: &str) -> Result<reqwest::Url, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("callback_url must be http or https".to_owned());
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("callback_url must not carry credentials".to_owned());
        }
        let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
        if !self.allow_hosts.contains(&host) {
            return Err(format!(
                "the host {host:?} is not allowed for webhooks (--webhook-allow-host)"
            ));
        }
        if self.secret.is_none() {
            return Err("webhooks need --webhook-secret on the server".to_owned());
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The example of the Standard Webhooks specification and its reference libraries.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(Secret::parse("whsec_short").is_err());
    }

    #[test]
    fn only_allowed_hosts_over_http_without_credentials() {
        let config = WebhookConfig {
            allow_hosts: vec!["hooks.example".into()],
            secret: Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").ok(),
        };
        assert!(config.check("https://hooks.example/x").is_ok());
        assert!(config.check("https://HOOKS.example/x").is_ok());
        for bad in [
            "https://evil.example/x",
            "ftp://hooks.example/x",
            "https://u:p@hooks.example/x",
            "not a url",
            "http://169.254.169.254/latest",
        ] {
            assert!(config.check(bad).is_err(), "{bad}");
        }
    }
}
