//! The three wire formats: Anthropic Messages, OpenAI-compatible chat completions (also a
//! LiteLLM proxy, vLLM or a llama.cpp server) and Ollama's `/api/chat`.
//!
//! Each provider owns one `reqwest::Client` (connection pool, connect and request
//! timeouts), built from its serde `*Config`.

mod anthropic;
mod ollama;
mod openai;

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

use super::{truncate, LlmError};
use crate::redact::Redactor;

pub use anthropic::{AnthropicConfig, AnthropicProvider};
pub use ollama::{OllamaConfig, OllamaProvider};
pub use openai::{MaxTokensField, OpenAiConfig, OpenAiProvider};

/// How much of a raw body an error keeps.
const RAW_LIMIT: usize = 2000;

/// An API key: serialised as the plain string, never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl From<&str> for ApiKey {
    fn from(s: &str) -> Self {
        ApiKey(s.to_string())
    }
}

pub(crate) fn build_client(
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<reqwest::Client, LlmError> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .build()
        .map_err(|e| LlmError::Config(format!("cannot build http client: {e}")))
}

pub(crate) fn map_send_error(e: reqwest::Error, redactor: &Redactor) -> LlmError {
    let timeout = e.is_timeout();
    let connect = e.is_connect();
    // The error quotes the URL, which may hold credentials: keep it only when it is clean.
    let text = e.to_string();
    let source: Box<dyn std::error::Error + Send + Sync> = match redactor.redact(&text) {
        std::borrow::Cow::Borrowed(_) => Box::new(e),
        std::borrow::Cow::Owned(clean) => clean.into(),
    };
    if timeout {
        LlmError::Timeout
    } else if connect {
        LlmError::Connect(source)
    } else {
        LlmError::Request(source)
    }
}

/// What a provider strikes from the error text it keeps: its key and any password in its
/// URL (an API that echoes the key it was sent must not put it in an [`LlmError`]).
pub(crate) fn provider_redactor(key: Option<&ApiKey>, url: &str) -> Redactor {
    Redactor::new(key.map(|k| k.expose().to_string())).with(crate::redact::url_password(url))
}

/// The chat format OpenAI-compatible servers and Ollama share: the system prompt as a
/// `system` message, then the conversation.
pub(crate) fn chat_messages(req: &super::CompletionRequest) -> Vec<serde_json::Value> {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if !req.system.is_empty() {
        messages.push(serde_json::json!({"role": "system", "content": req.system}));
    }
    messages.extend(
        req.messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content})),
    );
    messages
}

pub(crate) fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// `retry-after`: delay-seconds (integer or decimal) or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// Sends a request and returns the body of a success; maps every failure to an
/// [`LlmError`], with `error_message` pulling the provider's message out of an error body.
/// Every piece of the provider's error text is passed through `redactor`.
pub(crate) async fn send(
    rb: reqwest::RequestBuilder,
    error_message: fn(&str) -> Option<String>,
    redactor: &Redactor,
) -> Result<String, LlmError> {
    let resp = rb.send().await.map_err(|e| map_send_error(e, redactor))?;
    let status = resp.status();
    let after = retry_after(resp.headers());
    let body = resp.text().await.map_err(|e| map_send_error(e, redactor))?;
    if status.is_success() {
        return Ok(body);
    }
    let body = redactor.redact(&body).into_owned();
    let message = error_message(&body).unwrap_or_else(|| {
        status
            .canonical_reason()
            .unwrap_or("unexpected status")
            .to_lowercase()
    });
    // Again after JSON unescaping: `\/` or `\u002b` in the body hid the key from the pass
    // over the raw text.
    let message = redactor.redact(&message).into_owned();
    let status = status.as_u16();
    Err(match status {
        401 | 403 => LlmError::Auth { status, message },
        429 => LlmError::RateLimited {
            retry_after: after,
            message,
        },
        _ => LlmError::Http {
            status,
            message,
            body: truncate(&body, RAW_LIMIT),
            retry_after: after,
        },
    })
}

/// Deserialises a success body, keeping the raw text (redacted) in the error.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    body: &str,
    redactor: &Redactor,
) -> Result<T, LlmError> {
    serde_json::from_str(body).map_err(|e| LlmError::InvalidResponse {
        message: format!("unexpected response body: {e}"),
        raw: truncate(&redactor.redact(body), RAW_LIMIT),
    })
}

fn secs(s: &u64) -> Duration {
    Duration::from_secs((*s).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after", "0.5".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn keys_do_not_print() {
        let k = ApiKey::new("sk-secret");
        assert!(!format!("{k:?}").contains("secret"));
        assert_eq!(serde_json::to_string(&k).unwrap(), "\"sk-secret\"");
        assert_eq!(
            join_url("http://h/v1/", "/chat/completions"),
            "http://h/v1/chat/completions"
        );
    }
}
