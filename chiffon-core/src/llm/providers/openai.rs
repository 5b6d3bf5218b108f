//! OpenAI-compatible chat completions: `POST {base}/chat/completions` with
//! `Authorization: Bearer KEY`; the answer's `choices[0].message.content` and
//! `usage.prompt_tokens`/`usage.completion_tokens`; errors
//! `{"error":{"message":…,"type":…,"code":…}}`. Also serves a LiteLLM proxy, vLLM or a
//! llama.cpp server (which may need no key).
//!
//! A request with an [`OutputSchema`] asks for it with `response_format:
//! {"type":"json_schema","json_schema":{"name","strict":true,"schema"}}` (the schema in
//! strict mode's shape); the answer is `message.content`, a JSON string, or
//! `message.refusal` when the model declines. A server that rejects `response_format` with
//! a 400 is asked again for free text, and from then on only for free text.

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

/// The OpenAI-compatible provider's configuration (the `[llm.openai]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Includes the version path: `https://api.openai.com/v1`.
    pub base_url: String,
    /// Empty: no `Authorization` header (local servers).
    pub api_key: ApiKey,
    pub model: String,
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    pub monthly_budget_usd: Option<f64>,
    pub timeout_secs: u64,
    pub connect_timeout_secs: u64,
    /// The body field that carries the call's output cap (the reservation's `max_tokens`).
    /// OpenAI's newer models (o-series, gpt-5) refuse `max_tokens` and need
    /// `max_completion_tokens`; local servers know `max_tokens`.
    pub max_tokens_field: MaxTokensField,
    /// Ask for plans with `response_format` (a strict JSON schema); `false`: free text
    /// only (servers without structured outputs).
    pub structured_output: bool,
}

/// Which field of an OpenAI-compatible body caps the answer's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    #[default]
    MaxTokens,
    MaxCompletionTokens,
}

impl MaxTokensField {
    pub fn as_str(self) -> &'static str {
        match self {
            MaxTokensField::MaxTokens => "max_tokens",
            MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "https://api.openai.com/v1".into(),
            api_key: ApiKey::default(),
            model: "gpt-4o".into(),
            input_usd_per_mtok: 2.5,
            output_usd_per_mtok: 10.0,
            monthly_budget_usd: Some(50.0),
            timeout_secs: 60,
            connect_timeout_secs: 10,
            max_tokens_field: MaxTokensField::default(),
            structured_output: true,
        }
    }
}

impl OpenAiConfig {
    pub fn pricing(&self) -> Pricing {
        Pricing::new(self.input_usd_per_mtok, self.output_usd_per_mtok)
    }
}

/// A chat-completions endpoint.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    client: reqwest::Client,
    url: String,
    api_key: ApiKey,
    model: String,
    pricing: Pricing,
    /// Strikes the key (and any URL password) from error text.
    redactor: crate::redact::Redactor,
    max_tokens_field: MaxTokensField,
    /// Cleared for good once the server rejects `response_format` (shared by clones).
    structured: Arc<AtomicBool>,
}

impl OpenAiProvider {
    pub const NAME: &'static str = "openai";

    pub fn new(config: &OpenAiConfig) -> Result<Self, LlmError> {
        if config.base_url.trim().is_empty() {
            return Err(LlmError::Config("openai: base_url is empty".into()));
        }
        Ok(OpenAiProvider {
            client: build_client(
                secs(&config.connect_timeout_secs),
                secs(&config.timeout_secs),
            )?,
            url: join_url(&config.base_url, "/chat/completions"),
            api_key: config.api_key.clone(),
            model: config.model.clone(),
            pricing: config.pricing(),
            redactor: provider_redactor(Some(&config.api_key), &config.base_url),
            max_tokens_field: config.max_tokens_field,
            structured: Arc::new(AtomicBool::new(config.structured_output)),
        })
    }

    /// Whether calls still ask for structured output (false once the server rejected it).
    pub fn structured_output(&self) -> bool {
        self.structured.load(Ordering::Relaxed)
    }

    fn body(&self, req: &CompletionRequest, output: Option<&OutputSchema>) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": super::chat_messages(req),
            "temperature": req.temperature,
        });
        // The cap the budget reserved for: a call without it could bill any length.
        body[self.max_tokens_field.as_str()] = json!(req.max_tokens);
        if let Some(o) = output {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {
                    "name": o.name,
                    "description": o.description,
                    "strict": true,
                    "schema": o.strict_schema,
                },
            });
        }
        body
    }

    async fn call(&self, body: &Value) -> Result<String, LlmError> {
        let mut rb = self.client.post(&self.url).json(body);
        if !self.api_key.is_empty() {
            rb = rb.bearer_auth(self.api_key.expose());
        }
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
struct ChatResponse {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    /// Set instead of `content` when the model declines a structured-output request.
    #[serde(default)]
    refusal: Option<String>,
}

/// What a server without structured outputs names in its 400.
const STRUCTURED_FIELDS: [&str; 2] = ["response_format", "json_schema"];

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

fn error_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?;
    let msg = e
        .get("message")
        .and_then(|t| t.as_str())
        .or_else(|| e.as_str())?;
    match e.get("type").and_then(|t| t.as_str()) {
        Some(kind) => Some(format!("{kind}: {msg}")),
        None => Some(msg.to_string()),
    }
}

#[async_trait]
impl LlmProvider for OpenAiProvider {
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
        let raw = match self.call(&self.body(&req, output)).await {
            Err(e) if output.is_some() && e.rejects_structured_output(&STRUCTURED_FIELDS) => {
                tracing::warn!(provider = Self::NAME, error = %e, "response_format rejected: asking for free text from now on");
                self.structured.store(false, Ordering::Relaxed);
                self.call(&self.body(&req, None)).await?
            }
            r => r?,
        };
        let resp: ChatResponse = parse_body(&raw, &self.redactor)?;
        let invalid = |m: &str| LlmError::InvalidResponse {
            message: m.to_string(),
            raw: truncate(&self.redactor.redact(&raw), RAW_LIMIT),
        };
        let message = resp
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| invalid("no choices in the answer"))?
            .message;
        let refusal = message.refusal.filter(|r| !r.trim().is_empty());
        let text = message.content.unwrap_or_default();
        if text.is_empty() && refusal.is_none() {
            return Err(invalid("no message content in the answer"));
        }
        let usage = resp
            .usage
            .ok_or_else(|| invalid("no usage in the answer"))?;
        Ok(Completion {
            text,
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            model: resp.model.unwrap_or_else(|| self.model.clone()),
            // Cached prompt tokens (`prompt_tokens_details.cached_tokens`) are billed at a
            // discount: counting them at the full price errs on the safe side.
            cost_micros: self
                .pricing
                .cost_micros(usage.prompt_tokens, usage.completion_tokens),
            refusal,
        })
    }
}
