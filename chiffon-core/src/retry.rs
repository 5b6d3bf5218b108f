//! The one retry policy: bounded exponential backoff with jitter, shared by the engine (a
//! step's transient failure or timeout) and the LLM side ([`crate::llm::retry::Retry`]).

use std::time::Duration;

use rand::Rng;

/// Bounded exponential backoff: retry `n` (1-based) waits `initial × 2^(n-1)`, at most
/// `max`, with up to half of it taken off at random so that clients which failed together
/// do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The pause before retry number `retry` (1-based; 0 counts as 1).
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << retry.saturating_sub(1).min(31))
            .min(self.max);
        let half = exp / 2;
        if half.is_zero() {
            return exp;
        }
        exp - half.mul_f64(rand::rng().random_range(0.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_jittered_and_capped() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..200 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            assert!(b.delay(60) <= Duration::from_secs(1));
            assert!(b.delay(60) >= Duration::from_millis(500));
        }
    }
}
