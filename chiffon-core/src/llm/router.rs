//! Provider order and fallback.
//!
//! [`attempt`] calls one provider and lets the caller judge its answer; a provider skipped
//! or failed becomes a [`FallbackEvent`] (provider, code, reason) that the engine writes to
//! the audit log. The walk over the links is the planner's ([`crate::planner::chain`]).
//! [`Router`] is the configured order
//! (`CHIFFON_LLM_ORDER` semantics: `anthropic,openai,ollama` then `offline`), each provider
//! wrapped as `CircuitBreaker<Retry<Budget<Provider>>>`, with the offline planner as a link
//! of its own.

use std::sync::Arc;
use std::time::Duration;

use chiffon_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

use super::{
    AnthropicConfig, AnthropicProvider, Budget, CircuitBreaker, CircuitConfig, Completion,
    CompletionRequest, LlmError, LlmProvider, OllamaConfig, OllamaProvider, OpenAiConfig,
    OpenAiProvider, Retry, RetryConfig,
};
use crate::model::micros_to_usd;
use crate::store::Store;

/// The name of the offline planner in the order.
pub const OFFLINE: &str = "offline";

/// A provider was skipped or failed and the next one was tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FallbackEvent {
    pub provider: String,
    pub model: String,
    pub code: ErrorCode,
    /// Why, in words (names the budget and the spend for a budget skip).
    pub reason: String,
    /// What the failed attempt cost (an invalid plan is billed), USD, and its tokens.
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A completion the caller accepted, with who made it.
#[derive(Debug, Clone)]
pub struct Accepted<T> {
    pub value: T,
    pub completion: Completion,
    pub provider: String,
    pub model: String,
}

/// Calls one provider and lets `accept` judge the completion. A rejected completion is
/// reported to the provider ([`LlmProvider::record_rejection`]) and counts as its failure.
pub async fn attempt<T, F>(
    provider: &dyn LlmProvider,
    req: &CompletionRequest,
    accept: &mut F,
) -> Result<Accepted<T>, (FallbackEvent, LlmError)>
where
    F: FnMut(&Completion) -> Result<T, LlmError> + Send,
{
    let event = |e: &LlmError, billed: Option<&Completion>| FallbackEvent {
        provider: provider.name().to_string(),
        model: provider.model().to_string(),
        code: e.code(),
        reason: e.to_string(),
        cost_usd: micros_to_usd(billed.map_or(0, |c| c.cost_micros)),
        input_tokens: billed.map_or(0, |c| c.input_tokens),
        output_tokens: billed.map_or(0, |c| c.output_tokens),
    };
    match provider.complete(req.clone()).await {
        Ok(completion) => match accept(&completion) {
            Ok(value) => Ok(Accepted {
                value,
                provider: provider.name().to_string(),
                model: completion.model.clone(),
                completion,
            }),
            Err(e) => {
                // A refusal is an answer, not a fault of the provider's.
                if !matches!(e, LlmError::Refused { .. }) {
                    provider.record_rejection(&e);
                }
                Err((event(&e, Some(&completion)), e))
            }
        },
        Err(e) => Err((event(&e, None), e)),
    }
}

/// The `[llm]` configuration: order and providers. A provider is enabled when its table
/// is present (the binaries fill it from `ANTHROPIC_API_KEY`, `OPENAI_*`, `OLLAMA_HOST`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Provider names in the order tried: `anthropic` (alias `claude`), `openai`, `ollama`,
    /// `offline`. See [`parse_order`].
    pub order: Vec<String>,
    /// Append the offline planner when `order` does not name it.
    pub offline: bool,
    pub anthropic: Option<AnthropicConfig>,
    pub openai: Option<OpenAiConfig>,
    pub ollama: Option<OllamaConfig>,
    pub retry: RetryConfig,
    pub circuit: CircuitConfig,
    /// How long a budget reservation holds budget unless settled, seconds: a reservation
    /// left by a crashed process stops counting after it. Raised per provider to its
    /// longest possible call (timeout times attempts, plus the pauses, plus a minute).
    pub reservation_lease_secs: u64,
    /// Secrets the providers strike from the errors they return, besides their own key
    /// (the binaries fill it from every secret they read); never serialised.
    #[serde(skip)]
    pub redactor: crate::redact::Redactor,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            order: default_order(),
            offline: true,
            anthropic: None,
            openai: None,
            ollama: None,
            retry: RetryConfig::default(),
            circuit: CircuitConfig::default(),
            reservation_lease_secs: crate::model::DEFAULT_RESERVATION_LEASE.as_secs(),
            redactor: Default::default(),
        }
    }
}

impl LlmConfig {
    /// The lease of a provider's reservations: the configured lease, or longer when one
    /// call through the retries can take longer (`timeout` per attempt).
    pub fn reservation_lease(&self, timeout: Duration) -> Duration {
        let attempts = self.retry.max_attempts.max(1);
        let pause =
            Duration::from_millis(self.retry.max_backoff_ms.max(self.retry.max_retry_after_ms));
        let longest = timeout.saturating_mul(attempts) + pause.saturating_mul(attempts - 1);
        Duration::from_secs(self.reservation_lease_secs).max(longest + Duration::from_secs(60))
    }
}

/// `anthropic, openai, ollama, offline`.
pub fn default_order() -> Vec<String> {
    ["anthropic", "openai", "ollama", OFFLINE]
        .map(String::from)
        .to_vec()
}

/// Parses a `CHIFFON_LLM_ORDER` value (comma-separated, case-insensitive; `claude` is
/// `anthropic`). Unknown or repeated names are a [`LlmError::Config`].
pub fn parse_order(s: &str) -> Result<Vec<String>, LlmError> {
    let mut out: Vec<String> = Vec::new();
    for raw in s.split(',') {
        let name = raw.trim().to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        let name = match name.as_str() {
            "claude" | "anthropic" => "anthropic",
            "openai" => "openai",
            "ollama" => "ollama",
            OFFLINE => OFFLINE,
            other => {
                return Err(LlmError::Config(format!(
                    "unknown llm provider `{other}` in the order (expected anthropic, openai, ollama, offline)"
                )))
            }
        };
        if out.iter().any(|n| n == name) {
            return Err(LlmError::Config(format!(
                "llm provider `{name}` named twice in the order"
            )));
        }
        out.push(name.to_string());
    }
    Ok(out)
}

/// One link of the planning chain.
#[derive(Clone)]
pub enum Link {
    Llm(Arc<dyn LlmProvider>),
    /// The deterministic, local planner ([`crate::planner::offline`]).
    Offline,
}

impl Link {
    pub fn name(&self) -> &str {
        match self {
            Link::Llm(p) => p.name(),
            Link::Offline => OFFLINE,
        }
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::Llm(p) => write!(f, "Llm({}/{})", p.name(), p.model()),
            Link::Offline => f.write_str("Offline"),
        }
    }
}

/// A provider with its budget, for [`Router::layered`].
#[derive(Debug, Clone)]
pub struct ProviderEntry<P> {
    pub provider: P,
    pub monthly_budget_usd: Option<f64>,
    /// The provider's request timeout (one attempt), which the reservation lease outlasts.
    pub timeout: Duration,
}

/// The planning chain in the configured order.
#[derive(Debug, Clone, Default)]
pub struct Router {
    links: Vec<Link>,
}

impl Router {
    /// A chain as given (custom providers, tests).
    pub fn new(links: Vec<Link>) -> Self {
        Router { links }
    }

    /// Builds the configured chain: each enabled provider named in the order, wrapped as
    /// `CircuitBreaker<Retry<Budget<_>>>` over `store`; names whose provider is not
    /// configured are left out (see [`Router::names`]).
    pub fn from_config(config: &LlmConfig, store: Arc<dyn Store>) -> Result<Router, LlmError> {
        let order = parse_order(&config.order.join(","))?;
        let mut links = Vec::new();
        for name in &order {
            let link = match name.as_str() {
                "anthropic" => match &config.anthropic {
                    Some(c) => Some(Self::layered(
                        ProviderEntry {
                            provider: AnthropicProvider::new(c)?.with_redactor(&config.redactor),
                            monthly_budget_usd: c.monthly_budget_usd,
                            timeout: Duration::from_secs(c.timeout_secs.max(1)),
                        },
                        store.clone(),
                        config,
                    )),
                    None => None,
                },
                "openai" => match &config.openai {
                    Some(c) => Some(Self::layered(
                        ProviderEntry {
                            provider: OpenAiProvider::new(c)?.with_redactor(&config.redactor),
                            monthly_budget_usd: c.monthly_budget_usd,
                            timeout: Duration::from_secs(c.timeout_secs.max(1)),
                        },
                        store.clone(),
                        config,
                    )),
                    None => None,
                },
                "ollama" => match &config.ollama {
                    Some(c) => Some(Self::layered(
                        ProviderEntry {
                            provider: OllamaProvider::new(c)?.with_redactor(&config.redactor),
                            monthly_budget_usd: c.monthly_budget_usd,
                            timeout: Duration::from_secs(c.timeout_secs.max(1)),
                        },
                        store.clone(),
                        config,
                    )),
                    None => None,
                },
                _ => Some(Link::Offline),
            };
            links.extend(link);
        }
        if config.offline && !order.iter().any(|n| n == OFFLINE) {
            links.push(Link::Offline);
        }
        Ok(Router { links })
    }

    /// Wraps a provider the way [`Router::from_config`] does:
    /// `CircuitBreaker<Retry<Budget<P>>>`. The breaker is outermost so an open circuit
    /// costs no reservation; the budget is innermost so every HTTP call, retries included,
    /// has a reservation of its own: a retry after a timeout (which the provider may have
    /// billed) is reserved again, and an exhausted budget ends the retries.
    pub fn layered<P: LlmProvider>(
        entry: ProviderEntry<P>,
        store: Arc<dyn Store>,
        config: &LlmConfig,
    ) -> Link {
        let budget = Budget::new(entry.provider, store, entry.monthly_budget_usd)
            .with_lease(config.reservation_lease(entry.timeout));
        let retry = Retry::new(budget, config.retry.clone());
        Link::Llm(Arc::new(CircuitBreaker::new(retry, config.circuit.clone())))
    }

    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// The links' names in order, e.g. `["anthropic", "ollama", "offline"]`.
    pub fn names(&self) -> Vec<String> {
        self.links.iter().map(|l| l.name().to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders() {
        assert_eq!(
            parse_order("Claude, openai,,ollama").unwrap(),
            vec!["anthropic", "openai", "ollama"]
        );
        assert_eq!(parse_order("offline").unwrap(), vec!["offline"]);
        assert_eq!(
            parse_order("gpt").unwrap_err().code(),
            ErrorCode::InvalidConfig
        );
        assert!(parse_order("ollama,ollama").is_err());
        assert_eq!(LlmConfig::default().order, default_order());
    }

    #[test]
    fn leases_outlast_the_longest_call() {
        let c = LlmConfig::default();
        // 3 attempts of 60 s and two pauses of at most 30 s, plus a minute: under the default.
        assert_eq!(
            c.reservation_lease(Duration::from_secs(60)),
            Duration::from_secs(600)
        );
        // Ollama's 180 s: 540 + 60 + 60.
        assert_eq!(
            c.reservation_lease(Duration::from_secs(180)),
            Duration::from_secs(660)
        );
        let short = LlmConfig {
            reservation_lease_secs: 1,
            ..Default::default()
        };
        assert!(short.reservation_lease(Duration::from_secs(1)) > Duration::from_secs(60));
    }

    #[test]
    fn config_from_toml() {
        let c: LlmConfig = toml::from_str(
            r#"
            order = ["ollama", "anthropic"]
            [anthropic]
            api_key = "k"
            monthly_budget_usd = 20.0
            [ollama]
            host = "127.0.0.1:11434"
            "#,
        )
        .unwrap();
        let a = c.anthropic.as_ref().unwrap();
        assert_eq!(a.monthly_budget_usd, Some(20.0));
        assert_eq!(a.input_usd_per_mtok, 3.0);
        assert_eq!(c.ollama.as_ref().unwrap().monthly_budget_usd, None);
        assert!(c.openai.is_none());
        assert!(toml::from_str::<LlmConfig>("bogus = 1").is_err());
    }
}
