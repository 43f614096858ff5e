//! The OpenAI-compatible upstream client: `POST {base}/chat/completions`.
//!
//! One reqwest client is built at start and reused (connection pool, request timeout). Errors
//! say whether they are worth retrying and, for a 429 or 503 with `Retry-After`, how long
//! the upstream asked us to wait; the worker decides from that, not from strings. The API
//! key is sent as a bearer token and never appears in an error, a log line or the log.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bot::prompt::WireMessage;
use crate::domain::Usage;
use crate::secret::Secret;

/// The longest body text kept from an upstream error.
const MAX_ERROR_BODY: usize = 2_000;

/// Where and how to call the upstream. The model to ask for is part of each request
/// ([`CompletionRequest::model`]), named once in the configuration.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL, such as `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    pub api_key: Secret,
    pub timeout: Duration,
}

/// Token usage as the upstream sends it. Separate from the recorded [`Usage`], so a field an
/// upstream adds (or leaves out) changes nothing chatq stores.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    total_tokens: u32,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
        }
    }
}

/// One chat completion request.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionRequest<'a> {
    pub model: &'a str,
    pub messages: &'a [WireMessage],
    pub max_tokens: u32,
    pub temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    /// Ask for server-sent events instead of one JSON answer.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

#[derive(Debug, Deserialize)]
struct CompletionResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ChoiceMessage>,
}

#[derive(Debug, Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

/// What the upstream answered.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamReply {
    /// The reply text; `None` when the upstream sent no content.
    pub content: Option<String>,
    pub model: String,
    pub usage: Option<Usage>,
    pub latency: Duration,
}

/// A failed upstream call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpstreamError {
    #[error("OpenAI request failed with status {status}: {body}")]
    Status {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("OpenAI request timed out after {0:?}")]
    Timeout(Duration),
    #[error("could not reach the OpenAI API: {0}")]
    Connect(String),
    #[error("OpenAI answer could not be read: {0}")]
    InvalidResponse(String),
}

impl UpstreamError {
    /// Worth retrying: 408, 429, 5xx, connection failures and timeouts.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                *status == 408 || *status == 429 || (500..=599).contains(status)
            }
            Self::Timeout(_) | Self::Connect(_) => true,
            Self::InvalidResponse(_) => false,
        }
    }

    /// How long the upstream asked us to wait before the next try.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(86_400.0)));
        }
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The client. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Upstream {
    client: reqwest::Client,
    url: String,
    config: UpstreamConfig,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(64)
            .user_agent(concat!("chatq/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        Ok(Self {
            client,
            url,
            config,
        })
    }

    /// Removes the API key from text that came back from the upstream, in case it echoes it.
    fn scrub(&self, text: &str) -> String {
        let key = self.config.api_key.expose();
        let mut out: String = text.chars().take(MAX_ERROR_BODY).collect();
        if key.len() >= 8 && out.contains(key) {
            out = out.replace(key, "[redacted]");
        }
        out
    }

    fn classify(&self, e: reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::Timeout(self.config.timeout)
        } else if e.is_decode() {
            UpstreamError::InvalidResponse(self.scrub(&e.to_string()))
        } else {
            // Connect errors and connections cut mid-answer are both worth another try.
            UpstreamError::Connect(self.scrub(&e.without_url().to_string()))
        }
    }

    async fn send(
        &self,
        request: &CompletionRequest<'_>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let response = self
            .client
            .post(&self.url)
            .bearer_auth(self.config.api_key.expose())
            .json(request)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
            let body = response.text().await.unwrap_or_default();
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                body: self.scrub(body.trim()),
                retry_after,
            });
        }
        Ok(response)
    }

    /// Sends one non-streaming chat completion request.
    pub async fn complete(
        &self,
        request: &CompletionRequest<'_>,
    ) -> Result<UpstreamReply, UpstreamError> {
        let started = Instant::now();
        let response = self.send(request).await?;
        let bytes = response.bytes().await.map_err(|e| self.classify(e))?;
        let parsed: CompletionResponse = serde_json::from_slice(&bytes)
            .map_err(|e| UpstreamError::InvalidResponse(e.to_string()))?;
        let content = parsed
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.message)
            .and_then(|m| m.content);
        Ok(UpstreamReply {
            content,
            model: parsed.model.unwrap_or_else(|| request.model.to_owned()),
            usage: parsed.usage.map(Usage::from),
            latency: started.elapsed(),
        })
    }
}

/// A streamed request that failed, and whether any text had reached `on_delta` before.
#[derive(Debug)]
pub struct StreamFailure {
    pub error: UpstreamError,
    pub streamed: bool,
}

#[derive(Debug, Deserialize)]
struct StreamChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<StreamChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Option<ChoiceMessage>,
}

impl Upstream {
    /// Sends a streaming request and hands each piece of reply text to `on_delta` as it
    /// arrives. Returns the whole reply at the end.
    pub async fn complete_streaming(
        &self,
        request: &CompletionRequest<'_>,
        on_delta: &mut (dyn FnMut(&str) + Send),
    ) -> Result<UpstreamReply, StreamFailure> {
        use futures_util::StreamExt;

        let started = Instant::now();
        let fail = |error, streamed| StreamFailure { error, streamed };
        let response = self.send(request).await.map_err(|e| fail(e, false))?;
        let mut body = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::with_capacity(1024);
        let mut text = String::new();
        let mut model = None;
        let mut usage = None;
        let mut done = false;
        while !done {
            let Some(chunk) = body.next().await else {
                break;
            };
            let chunk = chunk.map_err(|e| fail(self.classify(e), !text.is_empty()))?;
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim().strip_prefix("data:") else {
                    continue; // comments, event names, blank separators
                };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    break;
                }
                let parsed: StreamChunk = serde_json::from_str(data).map_err(|e| {
                    fail(
                        UpstreamError::InvalidResponse(e.to_string()),
                        !text.is_empty(),
                    )
                })?;
                if let Some(error) = parsed.error {
                    let message = self.scrub(&error.to_string());
                    return Err(fail(
                        UpstreamError::InvalidResponse(message),
                        !text.is_empty(),
                    ));
                }
                model = parsed.model.or(model);
                usage = parsed.usage.or(usage);
                let delta = parsed
                    .choices
                    .into_iter()
                    .next()
                    .and_then(|c| c.delta)
                    .and_then(|d| d.content);
                if let Some(delta) = delta.filter(|d| !d.is_empty()) {
                    on_delta(&delta);
                    text.push_str(&delta);
                }
            }
        }
        if !done {
            return Err(fail(
                UpstreamError::Connect("the stream ended before [DONE]".to_owned()),
                !text.is_empty(),
            ));
        }
        Ok(UpstreamReply {
            content: Some(text),
            model: model.unwrap_or_else(|| request.model.to_owned()),
            usage: usage.map(Usage::from),
            latency: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_classification() {
        let status = |s| UpstreamError::Status {
            status: s,
            body: String::new(),
            retry_after: None,
        };
        for s in [408, 429, 500, 502, 503, 599] {
            assert!(status(s).is_transient(), "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert!(!status(s).is_transient(), "{s}");
        }
        assert!(UpstreamError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(UpstreamError::Connect("refused".into()).is_transient());
        assert!(!UpstreamError::InvalidResponse("x".into()).is_transient());
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after(" 1.5 ", now),
            Some(Duration::from_millis(1_500))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
