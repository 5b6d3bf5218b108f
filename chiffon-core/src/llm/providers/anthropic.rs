//! Anthropic Messages API: `POST {base}/v1/messages` with `x-api-key` and
//! `anthropic-version: 2023-06-01`; the answer's `content[]` blocks and
//! `usage.input_tokens`/`usage.output_tokens` (plus `cache_creation_input_tokens` and
//! `cache_read_input_tokens`); errors `{"type":"error","error":{"type":…,"message":…}}`
//! (429 with `retry-after`, 529 overloaded).
//!
//! A request with an [`OutputSchema`] offers one tool whose `input_schema` is that schema
//! and forces it (`tool_choice: {"type":"tool","name":…}`); the answer is the `tool_use`
//! block's `input`, handed on as JSON text. Text blocks stay the fallback: a model that
//! answers in prose anyway, and a server that rejects `tools` with a 400, which switches
//! this provider to free text for good. The system prompt (which holds the catalog) is sent
//! as a text block with `cache_control: {"type":"ephemeral"}`, so the tools and system
//! prefix is cached between calls; cache writes and reads are priced apart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{build_client, join_url, parse_body, provider_redactor, secs, send, ApiKey, RAW_LIMIT};
use crate::llm::{
    truncate, Completion, CompletionRequest, LlmError, LlmProvider, OutputSchema, Pricing,
};

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
    /// Price of prompt-cache writes, USD per million tokens; `None`: 1.25 times the input
    /// price (Anthropic's 5-minute cache).
    pub cache_write_usd_per_mtok: Option<f64>,
    /// Price of prompt-cache reads; `None`: 0.1 times the input price.
    pub cache_read_usd_per_mtok: Option<f64>,
    /// Mark the system prompt (and so the tools and catalog before it) for caching.
    pub prompt_cache: bool,
    /// Ask for plans through tool use; `false`: free text only.
    pub structured_output: bool,
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
            cache_write_usd_per_mtok: None,
            cache_read_usd_per_mtok: None,
            prompt_cache: true,
            structured_output: true,
            monthly_budget_usd: Some(100.0),
            timeout_secs: 60,
            connect_timeout_secs: 10,
        }
    }
}

impl AnthropicConfig {
    /// With the prompt cache on, cache writes and reads have their own prices (and the
    /// reservation's worst case counts the prompt at the dearer write price).
    pub fn pricing(&self) -> Pricing {
        let p = Pricing::new(self.input_usd_per_mtok, self.output_usd_per_mtok);
        if self.prompt_cache {
            p.with_cache(self.cache_write_usd_per_mtok, self.cache_read_usd_per_mtok)
        } else {
            p
        }
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
    /// Cleared for good once the server rejects `cache_control` or `tools` (shared by
    /// clones).
    prompt_cache: Arc<AtomicBool>,
    /// Cleared for good once the server rejects `tools` or `cache_control`.
    structured: Arc<AtomicBool>,
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
            prompt_cache: Arc::new(AtomicBool::new(config.prompt_cache)),
            structured: Arc::new(AtomicBool::new(config.structured_output)),
        })
    }

    /// Whether calls still ask for structured output (false once the server rejected it).
    pub fn structured_output(&self) -> bool {
        self.structured.load(Ordering::Relaxed)
    }

    fn body(&self, req: &CompletionRequest, output: Option<&OutputSchema>, cache: bool) -> Value {
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
            body["system"] = if cache {
                // Caches the prefix up to here: the tools, then the system prompt.
                json!([{"type": "text", "text": req.system, "cache_control": {"type": "ephemeral"}}])
            } else {
                json!(req.system)
            };
        }
        if let Some(o) = output {
            body["tools"] = json!([{
                "name": o.name,
                "description": o.description,
                "input_schema": o.schema,
            }]);
            body["tool_choice"] = json!({"type": "tool", "name": o.name});
        }
        body
    }

    async fn call(&self, body: &Value) -> Result<String, LlmError> {
        let rb = self
            .client
            .post(&self.url)
            .header("x-api-key", self.api_key.expose())
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(body);
        send(rb, error_message, &self.redactor).await
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
    #[serde(default)]
    stop_reason: Option<String>,
    usage: Usage,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// A `tool_use` block's tool and arguments.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
}

#[derive(Deserialize)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

/// What a server that does not know tool use or prompt caching names in its 400.
const STRUCTURED_FIELDS: [&str; 4] = ["tools", "tool_choice", "input_schema", "cache_control"];

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
        let output = req.output.as_ref().filter(|_| self.structured_output());
        let cache = self.prompt_cache.load(Ordering::Relaxed);
        let raw = match self.call(&self.body(&req, output, cache)).await {
            Err(e)
                if (output.is_some() || cache)
                    && e.rejects_structured_output(&STRUCTURED_FIELDS) =>
            {
                // A server (a proxy, an older gateway) that knows the plain Messages API
                // only: ask for free text, as before tool use, from now on.
                tracing::warn!(provider = Self::NAME, error = %e, "tool use or prompt caching rejected: asking for free text from now on");
                self.structured.store(false, Ordering::Relaxed);
                self.prompt_cache.store(false, Ordering::Relaxed);
                self.call(&self.body(&req, None, false)).await?
            }
            r => r?,
        };
        let resp: MessagesResponse = parse_body(&raw, &self.redactor)?;
        let tool_input = output.and_then(|o| {
            resp.content
                .iter()
                .find(|b| b.kind == "tool_use" && b.name.as_deref() == Some(o.name.as_str()))
                .and_then(|b| b.input.as_ref())
        });
        let text: String = match tool_input {
            Some(input) => input.to_string(),
            None => resp
                .content
                .iter()
                .filter(|b| b.kind == "text")
                .filter_map(|b| b.text.as_deref())
                .collect(),
        };
        let refusal = (resp.stop_reason.as_deref() == Some("refusal"))
            .then(|| "the model stopped with stop_reason `refusal`".to_string());
        if text.is_empty() && refusal.is_none() {
            return Err(LlmError::InvalidResponse {
                message: "no text or tool_use content in the answer".into(),
                raw: truncate(&self.redactor.redact(&raw), RAW_LIMIT),
            });
        }
        let u = &resp.usage;
        let (written, read) = (
            u.cache_creation_input_tokens.unwrap_or(0),
            u.cache_read_input_tokens.unwrap_or(0),
        );
        Ok(Completion {
            text,
            // Every prompt token, cached or not: `input_tokens` counts only the uncached.
            input_tokens: u.input_tokens.saturating_add(written).saturating_add(read),
            output_tokens: u.output_tokens,
            model: resp.model.unwrap_or_else(|| self.model.clone()),
            cost_micros: self.pricing.cost_micros_cached(
                u.input_tokens,
                written,
                read,
                u.output_tokens,
            ),
            refusal,
        })
    }
}
