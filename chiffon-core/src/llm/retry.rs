//! [`Retry`]: retries transient failures with bounded exponential backoff and jitter.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Completion, CompletionRequest, LlmError, LlmProvider, Pricing};

/// How [`Retry`] retries (the `[llm.retry]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Calls in all, the first included (1: no retry).
    pub max_attempts: u32,
    /// The first pause; each retry doubles it, up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// A `retry-after` longer than this is not waited for: the error goes up at once so
    /// the next provider is tried instead.
    pub max_retry_after_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            initial_backoff_ms: 500,
            max_backoff_ms: 8_000,
            max_retry_after_ms: 30_000,
        }
    }
}

impl RetryConfig {
    /// The pause before retry number `retry` (1-based), without `retry-after`: full
    /// exponential value with up to half of it taken off at random, so clients that failed
    /// together do not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        crate::retry::Backoff {
            initial: Duration::from_millis(self.initial_backoff_ms),
            max: Duration::from_millis(self.max_backoff_ms),
        }
        .delay(retry)
    }
}

/// Wraps a provider and retries its transient errors.
#[derive(Debug, Clone)]
pub struct Retry<P> {
    inner: P,
    config: RetryConfig,
}

impl<P: LlmProvider> Retry<P> {
    pub fn new(inner: P, config: RetryConfig) -> Self {
        Retry { inner, config }
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }
}

#[async_trait]
impl<P: LlmProvider> LlmProvider for Retry<P> {
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
        let attempts = self.config.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            let err = match self.inner.complete(req.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) => e,
            };
            if !err.is_transient() || attempt >= attempts {
                return Err(err);
            }
            let wait = match err.retry_after() {
                Some(after) if after > Duration::from_millis(self.config.max_retry_after_ms) => {
                    return Err(err)
                }
                Some(after) => after,
                None => self.config.backoff(attempt),
            };
            tracing::debug!(
                provider = self.inner.name(),
                attempt,
                wait_ms = wait.as_millis() as u64,
                error = %err,
                "retrying llm call"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn record_rejection(&self, error: &LlmError) {
        self.inner.record_rejection(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let c = RetryConfig {
            max_attempts: 5,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            max_retry_after_ms: 0,
        };
        for _ in 0..50 {
            let b1 = c.backoff(1).as_millis();
            assert!((50..=100).contains(&b1), "{b1}");
            let b3 = c.backoff(3).as_millis();
            assert!((200..=400).contains(&b3), "{b3}");
            assert!(c.backoff(40).as_millis() <= 1000);
        }
    }
}
