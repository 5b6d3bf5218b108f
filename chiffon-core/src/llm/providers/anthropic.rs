//! Anthropic Messages API: `POST {base}/v1/messages` with `x-api-key` and
//! `anthropic-version: 2023-06-01`; the answer's `content[]` text blocks and
//! `usage.input_tokens`/`usage.output_tokens`; errors
//! `{"type":"error","error":{"type":…,"message":…}}` (429 with `retry-after`, 529 overloaded).

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{build_client, join_url, parse_body, provider_redactor, secs, send, ApiKey, RAW_LIMIT};
use crate::llm::{truncate, Completion, CompletionRequest, LlmError, LlmProvider, Pricing};

pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The Claude provider's configuration (the `[llm.anthropic]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnthropicConfig {
    pub base_url: String,
    pub api_key: ApiKey,
    pub model: String,
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    /// `None`: no budget (never skipped for cost).
    pub monthly_budget_usd: Option<f64>,
    pub timeout_secs: u64,
    pub connect_timeout_secs: u64,
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        AnthropicConfig {
            base_url: "https://api.anthropic.com".into(),
            api_key: ApiKey::default(),
            model: "claude-sonnet-4-5".into(),
            input_usd_per_mtok: 3.0,
            output_usd_per_mtok: 15.0,
            monthly_budget_usd: Some(100.0),
            timeout_secs: 60,
            connect_timeout_secs: 10,
        }
    }
}

impl AnthropicConfig {
    pub fn pricing(&self) -> Pricing {
        Pricing::new(self.input_usd_per_mtok, self.output_usd_per_mtok)
    }
}

/// Claude over the Messages API.
#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    client: reqwest::Client,
    url: String,
    api_key: ApiKey,
    model: String,
    pricing: Pricing,
    /// Strikes the key (and any URL password) from error text.
    redactor: crate::redact::Redactor,
}

impl AnthropicProvider {
    pub const NAME: &'static str = "anthropic";

    pub fn new(config: &AnthropicConfig) -> Result<Self, LlmError> {
        if config.api_key.is_empty() {
            return Err(LlmError::Config("anthropic: api_key is empty".into()));
        }
        Ok(AnthropicProvider {
            client: build_client(
                secs(&config.connect_timeout_secs),
                secs(&config.timeout_secs),
            )?,
            url: join_url(&config.base_url, "/v1/messages"),
            api_key: config.api_key.clone(),
            model: config.model.clone(),
            pricing: config.pricing(),
            redactor: provider_redactor(Some(&config.api_key), &config.base_url),
        })
    }

    /// Also strikes `redactor`'s secrets (every configured one) from the errors it returns.
    pub fn with_redactor(mut self, redactor: &crate::redact::Redactor) -> Self {
        self.redactor = self.redactor.merge(redactor);
        self
    }

    /// For tests: a shorter request timeout than whole seconds allow.
    pub fn with_timeout(mut self, connect: Duration, request: Duration) -> Result<Self, LlmError> {
        self.client = build_client(connect, request)?;
        Ok(self)
    }
}

#[derive(Deserialize)]
struct MessagesResponse {
    #[serde(default)]
    model: Option<String>,
    content: Vec<ContentBlock>,
    usage: Usage,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
}

fn error_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?;
    let kind = e.get("type").and_then(|t| t.as_str()).unwrap_or("error");
    let msg = e.get("message").and_then(|t| t.as_str()).unwrap_or("");
    Some(format!("{kind}: {msg}"))
}

#[async_trait]
impl LlmProvider for AnthropicProvider {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn pricing(&self) -> Pricing {
        self.pricing
    }

    async fn complete(&self, req: CompletionRequest) -> Result<Completion, LlmError> {
        let messages: Vec<_> = req
            .messages
            .iter()
            .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
            .collect();
        let mut body = json!({
            "model": self.model,
            "max_tokens": req.max_tokens,
            "messages": messages,
            "temperature": req.temperature,
        });
        if !req.system.is_empty() {
            body["system"] = json!(req.system);
        }
        let rb = self
            .client
            .post(&self.url)
            .header("x-api-key", self.api_key.expose())
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body);
        let raw = send(rb, error_message, &self.redactor).await?;
        let resp: MessagesResponse = parse_body(&raw, &self.redactor)?;
        let text: String = resp
            .content
            .iter()
            .filter(|b| b.kind == "text")
            .filter_map(|b| b.text.as_deref())
            .collect();
        if text.is_empty() {
            return Err(LlmError::InvalidResponse {
                message: "no text content in the answer".into(),
                raw: truncate(&self.redactor.redact(&raw), RAW_LIMIT),
            });
        }
        Ok(Completion {
            text,
            input_tokens: resp.usage.input_tokens,
            output_tokens: resp.usage.output_tokens,
            model: resp.model.unwrap_or_else(|| self.model.clone()),
            cost_micros: self
                .pricing
                .cost_micros(resp.usage.input_tokens, resp.usage.output_tokens),
        })
    }
}
