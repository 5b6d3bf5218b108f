//! Ollama: `POST {host}/api/chat` with `stream: false`; the answer's `message.content`,
//! `prompt_eval_count` and `eval_count`; errors `{"error": "…"}`.
//!
//! A request with an [`OutputSchema`] sends it as `format` (Ollama 0.5 and later constrain
//! the answer to it); the answer is still `message.content`, a JSON string. A server that
//! rejects `format` with a 400 is asked again for free text, and from then on only for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{build_client, join_url, parse_body, provider_redactor, secs, send, RAW_LIMIT};
use crate::llm::{
    truncate, Completion, CompletionRequest, LlmError, LlmProvider, OutputSchema, Pricing,
};

/// The Ollama provider's configuration (the `[llm.ollama]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OllamaConfig {
    /// `OLLAMA_HOST`, e.g. `http://127.0.0.1:11434`.
    pub host: String,
    pub model: String,
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    /// Local inference is free: no budget by default.
    pub monthly_budget_usd: Option<f64>,
    /// Local models on a CPU can be slow: a longer default than the hosted APIs.
    pub timeout_secs: u64,
    pub connect_timeout_secs: u64,
    /// Ask for plans with a `format` schema; `false`: free text only.
    pub structured_output: bool,
}

impl Default for OllamaConfig {
    fn default() -> Self {
        OllamaConfig {
            host: "http://127.0.0.1:11434".into(),
            model: "neural-chat".into(),
            input_usd_per_mtok: 0.0,
            output_usd_per_mtok: 0.0,
            monthly_budget_usd: None,
            timeout_secs: 180,
            connect_timeout_secs: 5,
            structured_output: true,
        }
    }
}

impl OllamaConfig {
    pub fn pricing(&self) -> Pricing {
        Pricing::new(self.input_usd_per_mtok, self.output_usd_per_mtok)
    }
}

/// A local Ollama server.
#[derive(Debug, Clone)]
pub struct OllamaProvider {
    client: reqwest::Client,
    url: String,
    model: String,
    pricing: Pricing,
    /// Strikes the key (and any URL password) from error text.
    redactor: crate::redact::Redactor,
    /// Cleared for good once the server rejects `format` (shared by clones).
    structured: Arc<AtomicBool>,
}

impl OllamaProvider {
    pub const NAME: &'static str = "ollama";

    pub fn new(config: &OllamaConfig) -> Result<Self, LlmError> {
        let host = config.host.trim();
        if host.is_empty() {
            return Err(LlmError::Config("ollama: host is empty".into()));
        }
        // OLLAMA_HOST is often given without a scheme (`127.0.0.1:11434`).
        let host = if host.contains("://") {
            host.to_string()
        } else {
            format!("http://{host}")
        };
        Ok(OllamaProvider {
            client: build_client(
                secs(&config.connect_timeout_secs),
                secs(&config.timeout_secs),
            )?,
            url: join_url(&host, "/api/chat"),
            model: config.model.clone(),
            pricing: config.pricing(),
            redactor: provider_redactor(None, &host),
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
            "stream": false,
            "options": {"temperature": req.temperature, "num_predict": req.max_tokens},
        });
        if let Some(o) = output {
            body["format"] = o.schema.clone();
        }
        body
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
    message: ChatMessage,
    #[serde(default)]
    prompt_eval_count: u64,
    #[serde(default)]
    eval_count: u64,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    content: String,
}

fn error_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("error")?.as_str().map(str::to_string)
}

#[async_trait]
impl LlmProvider for OllamaProvider {
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
        let call = |body: Value| {
            send(
                self.client.post(&self.url).json(&body),
                error_message,
                &self.redactor,
            )
        };
        let raw = match call(self.body(&req, output)).await {
            Err(e) if output.is_some() && e.rejects_structured_output(&["format"]) => {
                tracing::warn!(provider = Self::NAME, error = %e, "format rejected: asking for free text from now on");
                self.structured.store(false, Ordering::Relaxed);
                call(self.body(&req, None)).await?
            }
            r => r?,
        };
        let resp: ChatResponse = parse_body(&raw, &self.redactor)?;
        if resp.message.content.is_empty() {
            return Err(LlmError::InvalidResponse {
                message: "no message content in the answer".into(),
                raw: truncate(&self.redactor.redact(&raw), RAW_LIMIT),
            });
        }
        Ok(Completion {
            text: resp.message.content,
            input_tokens: resp.prompt_eval_count,
            output_tokens: resp.eval_count,
            model: resp.model.unwrap_or_else(|| self.model.clone()),
            cost_micros: self
                .pricing
                .cost_micros(resp.prompt_eval_count, resp.eval_count),
            refusal: None,
        })
    }
}
