//! [`CircuitBreaker`]: after N consecutive failures, stop calling a provider for a
//! cool-down, then let one trial call through (half-open).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Completion, CompletionRequest, LlmError, LlmProvider, Pricing};

/// When the breaker opens and for how long (the `[llm.circuit]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitConfig {
    /// Consecutive failures that open the circuit (0: never opens).
    pub failure_threshold: u32,
    pub cooldown_ms: u64,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            failure_threshold: 5,
            cooldown_ms: 60_000,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    /// A trial call is in flight after a cool-down; others are still refused.
    trial: bool,
}

/// Wraps a provider; counts its failures (and rejected completions) and refuses calls with
/// [`LlmError::CircuitOpen`] while open.
#[derive(Debug)]
pub struct CircuitBreaker<P> {
    inner: P,
    config: CircuitConfig,
    state: Mutex<State>,
}

impl<P: LlmProvider> CircuitBreaker<P> {
    pub fn new(inner: P, config: CircuitConfig) -> Self {
        CircuitBreaker {
            inner,
            config,
            state: Mutex::new(State::default()),
        }
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Whether calls are refused right now.
    pub fn is_open(&self) -> bool {
        let s = self.lock();
        s.open_until.is_some_and(|t| Instant::now() < t) || s.trial
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a pair of counters: a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a call, or says how long the circuit stays open.
    fn admit(&self) -> Result<(), Duration> {
        let mut s = self.lock();
        let now = Instant::now();
        match s.open_until {
            Some(t) if now < t => Err(t - now),
            Some(_) if s.trial => Err(Duration::ZERO),
            Some(_) => {
                s.trial = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn on_success(&self) {
        let mut s = self.lock();
        *s = State::default();
    }

    fn on_failure(&self) {
        let mut s = self.lock();
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        s.trial = false;
        let threshold = self.config.failure_threshold;
        if threshold > 0 && (s.consecutive_failures >= threshold || s.open_until.is_some()) {
            s.open_until = Some(Instant::now() + Duration::from_millis(self.config.cooldown_ms));
            tracing::warn!(
                provider = self.inner.name(),
                failures = s.consecutive_failures,
                "llm circuit opened"
            );
        }
    }

    /// Gives a trial slot back when the call said nothing about the provider's health.
    fn on_neutral(&self) {
        self.lock().trial = false;
    }
}

#[async_trait]
impl<P: LlmProvider> LlmProvider for CircuitBreaker<P> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    fn pricing(&self) -> Pricing {
        self.inner.pricing()
    }

    async fn complete(&self, req: CompletionRequest) -> Result<Completion, LlmError> {
        if let Err(retry_in) = self.admit() {
            return Err(LlmError::CircuitOpen {
                provider: self.inner.name().to_string(),
                retry_in,
            });
        }
        match self.inner.complete(req).await {
            Ok(c) => {
                self.on_success();
                Ok(c)
            }
            Err(e) => {
                if e.is_provider_failure() {
                    self.on_failure();
                } else {
                    self.on_neutral();
                }
                Err(e)
            }
        }
    }

    fn record_rejection(&self, error: &LlmError) {
        self.on_failure();
        self.inner.record_rejection(error)
    }
}
