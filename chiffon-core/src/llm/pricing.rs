//! Prices and cost arithmetic, in USD micro-dollars so sums are exact.

use serde::{Deserialize, Serialize};

use super::CompletionRequest;

/// The most one call is ever recorded as costing: a billion dollars.
pub const MAX_COST_MICROS: i64 = 1_000_000_000_000_000;

/// A provider's price table: USD per million input and output tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Pricing {
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
}

impl Pricing {
    pub const FREE: Pricing = Pricing {
        input_usd_per_mtok: 0.0,
        output_usd_per_mtok: 0.0,
    };

    pub fn new(input_usd_per_mtok: f64, output_usd_per_mtok: f64) -> Self {
        Pricing {
            input_usd_per_mtok,
            output_usd_per_mtok,
        }
    }

    pub fn is_free(&self) -> bool {
        self.input_usd_per_mtok <= 0.0 && self.output_usd_per_mtok <= 0.0
    }

    /// The cost of a call, rounded up to the next micro-dollar. Capped at [`MAX_COST_MICROS`]
    /// so that absurd usage figures from a provider keep budget sums far from overflowing.
    pub fn cost_micros(&self, input_tokens: u64, output_tokens: u64) -> i64 {
        // USD per million tokens is exactly micro-dollars per token.
        let micros = input_tokens as f64 * self.input_usd_per_mtok.max(0.0)
            + output_tokens as f64 * self.output_usd_per_mtok.max(0.0);
        (micros.ceil() as i64).min(MAX_COST_MICROS)
    }

    /// The most a call can cost: its estimated prompt plus `max_tokens` of output.
    pub fn worst_case_micros(&self, req: &CompletionRequest) -> i64 {
        self.cost_micros(estimate_tokens(req.prompt_len()), u64::from(req.max_tokens))
    }
}

/// A deliberately pessimistic token estimate for `bytes` of prompt (a third of the bytes,
/// where English averages a quarter), plus some per-call overhead: a reservation that is too
/// small could let concurrent calls pass the budget.
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(3) + 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs() {
        let p = Pricing::new(3.0, 15.0);
        assert_eq!(p.cost_micros(1_000_000, 0), 3_000_000);
        assert_eq!(p.cost_micros(1000, 100), 3000 + 1500);
        assert_eq!(Pricing::FREE.cost_micros(10_000, 10_000), 0);
        let mut req = CompletionRequest::new("s".repeat(300), "u".repeat(300));
        req.max_tokens = 1000;
        // 600 bytes -> 200 + 16 tokens in, 1000 out.
        assert_eq!(p.worst_case_micros(&req), 216 * 3 + 1000 * 15);
        assert!(p.worst_case_micros(&req) >= p.cost_micros(150, 1000));
        assert_eq!(crate::llm::usd(&100.0), "$100.00");
        assert_eq!(crate::llm::usd(&0.5), "$0.50");
        assert_eq!(crate::llm::usd(&0.00275), "$0.00275");
        assert_eq!(crate::llm::usd(&0.0), "$0.00");
    }
}
