//! LLM providers and the wrappers that make them safe to call from the planner.
//!
//! The [`LlmProvider`] trait is small on purpose; everything cross-cutting is a wrapper
//! that implements the same trait (tower style):
//! - [`providers`]: Anthropic Messages, OpenAI-compatible chat completions, Ollama, over
//!   reqwest, each speaking its own wire format.
//! - [`retry::Retry`]: bounded exponential backoff with jitter for transient errors,
//!   honouring `retry-after`.
//! - [`budget::Budget`]: reserves the worst-case cost of each call in the [`Store`] before
//!   it, settles the real cost after, so budgets hold across restarts and instances.
//! - [`circuit::CircuitBreaker`]: stops calling a provider that keeps failing.
//! - [`router`]: the [`router::Router`] built from [`router::LlmConfig`]
//!   (`CHIFFON_LLM_ORDER` semantics), and [`router::attempt`], one provider's call, which
//!   reports a skip as a [`router::FallbackEvent`] so the engine can audit it. The planner
//!   walks the links ([`crate::planner::chain`]).
//!
//! [`Store`]: crate::store::Store

pub mod budget;
pub mod circuit;
pub mod pricing;
pub mod providers;
pub mod retry;
pub mod router;

use std::time::Duration;

use async_trait::async_trait;
use chiffon_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::StoreError;

pub use budget::Budget;
pub use circuit::{CircuitBreaker, CircuitConfig};
pub use pricing::Pricing;
pub use providers::{
    AnthropicConfig, AnthropicProvider, ApiKey, MaxTokensField, OllamaConfig, OllamaProvider,
    OpenAiConfig, OpenAiProvider,
};
pub use retry::{Retry, RetryConfig};
pub use router::{Accepted, FallbackEvent, Link, LlmConfig, ProviderEntry, Router};

/// Who said a [`Message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of the conversation (the system prompt travels separately).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Message {
            role: Role::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Message {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// One completion call.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub system: String,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub temperature: f32,
    /// The request this call plans, recorded with the spend; not sent to the provider.
    pub request_id: Option<Uuid>,
    /// Ask for the answer through the provider's structured-output feature (Anthropic tool
    /// use, OpenAI `response_format`, Ollama `format`); `None`: free text.
    pub output: Option<OutputSchema>,
}

/// The JSON shape an answer must have, for a provider's structured-output feature. The
/// answer comes back as [`Completion::text`] holding that JSON (a tool's input serialised),
/// so the caller parses and validates it exactly as a free-text answer.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSchema {
    /// A name fit for a tool or a `json_schema` (`[A-Za-z0-9_-]{1,64}`), e.g. `submit_plan`.
    pub name: String,
    pub description: String,
    /// The JSON Schema (an object schema), for Anthropic's tool `input_schema` and
    /// Ollama's `format`.
    pub schema: serde_json::Value,
    /// The same shape as OpenAI's strict mode takes it: every property required (optional
    /// ones nullable), `additionalProperties: false` everywhere, no `default`.
    pub strict_schema: serde_json::Value,
}

impl OutputSchema {
    /// Bytes of the larger schema as sent: it is part of the prompt the provider bills.
    pub fn wire_len(&self) -> usize {
        self.schema
            .to_string()
            .len()
            .max(self.strict_schema.to_string().len())
            + self.name.len()
            + self.description.len()
    }
}

impl CompletionRequest {
    /// A system prompt and one user message, `max_tokens` 1024, temperature 0.
    pub fn new(system: impl Into<String>, user: impl Into<String>) -> Self {
        CompletionRequest {
            system: system.into(),
            messages: vec![Message::user(user)],
            max_tokens: 1024,
            temperature: 0.0,
            request_id: None,
            output: None,
        }
    }

    /// Bytes of prompt text (system, messages and the output schema, which a provider
    /// bills as input too).
    pub fn prompt_len(&self) -> usize {
        self.system.len()
            + self.messages.iter().map(|m| m.content.len()).sum::<usize>()
            + self.output.as_ref().map_or(0, OutputSchema::wire_len)
    }
}

/// A provider's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The model that answered (as the provider names it).
    pub model: String,
    /// What the call cost at the provider's prices, USD micro-dollars.
    pub cost_micros: i64,
    /// The model declined to answer and said why (OpenAI's `message.refusal`, Anthropic's
    /// `stop_reason: "refusal"`); `text` may then be empty.
    pub refusal: Option<String>,
}

/// Errors of an [`LlmProvider`] and its wrappers. Classify with [`LlmError::code`] and
/// [`LlmError::is_transient`], never by the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// HTTP 429.
    #[error("rate limited: {message}")]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// Any other non-success HTTP status (5xx, Anthropic's 529 overloaded, 4xx).
    #[error("http {status}: {message}")]
    Http {
        status: u16,
        message: String,
        /// The raw body, truncated.
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("no answer in time")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Any other failure of the HTTP exchange.
    #[error("request failed: {0}")]
    Request(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// HTTP 401/403: the key is missing, wrong or lacks permission.
    #[error("authentication failed (http {status}): {message}")]
    Auth { status: u16, message: String },
    /// The answer is not in the provider's wire format.
    #[error("invalid response: {message}")]
    InvalidResponse { message: String, raw: String },
    /// The call's worst-case cost would pass the provider's monthly budget.
    #[error(
        "provider {provider}: monthly budget {} would be exceeded (spent {}, reserved {}, this call up to {})",
        usd(.budget_usd), usd(.spent_usd), usd(.reserved_usd), usd(.needed_usd)
    )]
    BudgetExhausted {
        provider: String,
        budget_usd: f64,
        spent_usd: f64,
        reserved_usd: f64,
        needed_usd: f64,
    },
    /// The budget could not be checked, so the call was not made.
    #[error("budget bookkeeping failed: {0}")]
    Store(#[source] StoreError),
    #[error("provider {provider}: circuit open after repeated failures, retry in {retry_in:?}")]
    CircuitOpen {
        provider: String,
        retry_in: Duration,
    },
    /// The completion is not a valid plan (see [`crate::planner`]).
    #[error("invalid plan: {message}")]
    InvalidPlan { code: ErrorCode, message: String },
    #[error("invalid llm configuration: {0}")]
    Config(String),
    /// The model declined to plan the request and said why. Not a provider failure: no
    /// other provider, and not the offline planner, is asked to guess instead.
    #[error("the model declined: {reason}")]
    Refused { reason: String },
}

impl LlmError {
    /// The code this error is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            LlmError::RateLimited { .. } => ErrorCode::LlmRateLimited,
            LlmError::Http { .. } | LlmError::Connect(_) | LlmError::Request(_) => {
                ErrorCode::LlmUnavailable
            }
            LlmError::Timeout => ErrorCode::LlmTimeout,
            LlmError::Auth { .. } => ErrorCode::LlmAuth,
            LlmError::InvalidResponse { .. } => ErrorCode::LlmInvalidResponse,
            LlmError::BudgetExhausted { .. } => ErrorCode::LlmBudgetExhausted,
            LlmError::Store(e) => e.code(),
            LlmError::CircuitOpen { .. } => ErrorCode::CircuitOpen,
            LlmError::InvalidPlan { code, .. } => *code,
            LlmError::Config(_) => ErrorCode::InvalidConfig,
            LlmError::Refused { .. } => ErrorCode::LlmRefused,
        }
    }

    /// Whether the same call may succeed if retried after a pause (429, 5xx, 408, 529,
    /// timeouts, refused connections).
    pub fn is_transient(&self) -> bool {
        match self {
            LlmError::RateLimited { .. }
            | LlmError::Timeout
            | LlmError::Connect(_)
            | LlmError::Request(_) => true,
            LlmError::Http { status, .. } => *status >= 500 || *status == 408,
            _ => false,
        }
    }

    /// Whether the provider may have done (and billed) the work although no answer came:
    /// the request went out and the answer timed out or broke off. The budget counts such
    /// a call at its worst case.
    pub fn may_be_billed(&self) -> bool {
        matches!(self, LlmError::Timeout | LlmError::Request(_))
    }

    /// How long the provider asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::RateLimited { retry_after, .. } | LlmError::Http { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// Whether this error says something about the provider's health (and so counts for
    /// the circuit breaker). A budget, a bookkeeping or a configuration problem does not.
    pub fn is_provider_failure(&self) -> bool {
        !matches!(
            self,
            LlmError::BudgetExhausted { .. }
                | LlmError::Store(_)
                | LlmError::CircuitOpen { .. }
                | LlmError::Config(_)
                | LlmError::Refused { .. }
        )
    }

    /// Whether the server rejected the request's structured-output parameter (a 400 or 422
    /// whose message or body names one of `fields`), so the call may be made again asking
    /// for free text instead.
    pub fn rejects_structured_output(&self, fields: &[&str]) -> bool {
        match self {
            LlmError::Http {
                status: 400 | 422,
                message,
                body,
                ..
            } => {
                let text = format!("{message} {body}").to_ascii_lowercase();
                fields.iter().any(|f| text.contains(f))
            }
            _ => false,
        }
    }
}

/// A large language model behind an API. Object-safe: the router holds
/// `Arc<dyn LlmProvider>`.
#[async_trait]
pub trait LlmProvider: Send + Sync + 'static {
    /// The configured name (`anthropic`, `openai`, `ollama`, …), used in budgets and audit.
    fn name(&self) -> &str;
    /// The model asked for.
    fn model(&self) -> &str;
    /// Prices per million tokens, for reservations and cost.
    fn pricing(&self) -> Pricing;
    async fn complete(&self, req: CompletionRequest) -> Result<Completion, LlmError>;
    /// The caller rejected a completion this provider returned (for example an invalid
    /// plan). Wrappers pass it down; the circuit breaker counts it as a failure.
    fn record_rejection(&self, _error: &LlmError) {}
}

#[async_trait]
impl<P: LlmProvider + ?Sized> LlmProvider for std::sync::Arc<P> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn model(&self) -> &str {
        (**self).model()
    }
    fn pricing(&self) -> Pricing {
        (**self).pricing()
    }
    async fn complete(&self, req: CompletionRequest) -> Result<Completion, LlmError> {
        (**self).complete(req).await
    }
    fn record_rejection(&self, error: &LlmError) {
        (**self).record_rejection(error)
    }
}

/// The current month in UTC, `YYYY-MM`, as budgets are kept.
pub fn current_month() -> String {
    chrono::Utc::now().format("%Y-%m").to_string()
}

/// Dollars for people: at least cents, and the micro-dollars when they matter
/// (`$100.00`, `$0.00275`).
pub fn usd(amount: &f64) -> String {
    let s = format!("{amount:.6}");
    let s = s.trim_end_matches('0');
    let decimals = s.split_once('.').map_or(0, |(_, d)| d.len());
    if decimals < 2 {
        format!("${amount:.2}")
    } else {
        format!("${s}")
    }
}

/// Truncates a body kept in an error so a huge answer never floods logs or the audit.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
