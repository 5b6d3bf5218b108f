//! Prices and cost arithmetic, in USD micro-dollars so sums are exact.

use serde::{Deserialize, Serialize};

use super::CompletionRequest;

/// The most one call is ever recorded as costing: a billion dollars.
pub const MAX_COST_MICROS: i64 = 1_000_000_000_000_000;

/// A provider's price table: USD per million input and output tokens, and for prompt
/// caching (Anthropic's `cache_control`) per million tokens written to and read from the
/// cache. Without caching both cache prices equal the input price.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Pricing {
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    #[serde(default)]
    pub cache_write_usd_per_mtok: f64,
    #[serde(default)]
    pub cache_read_usd_per_mtok: f64,
}

/// Anthropic's price of writing the prompt cache (5-minute entries), times the input price.
pub const CACHE_WRITE_FACTOR: f64 = 1.25;
/// Anthropic's price of reading the prompt cache, times the input price.
pub const CACHE_READ_FACTOR: f64 = 0.1;

/// Tokens of a request's structured-output machinery the prompt text does not show: the
/// system prompt a provider adds for tool use (Anthropic: a few hundred tokens for a forced
/// tool) and the tool definitions' framing. Counted in every worst case that asks for it.
pub const STRUCTURED_OUTPUT_OVERHEAD_TOKENS: u64 = 600;

impl Pricing {
    pub const FREE: Pricing = Pricing {
        input_usd_per_mtok: 0.0,
        output_usd_per_mtok: 0.0,
        cache_write_usd_per_mtok: 0.0,
        cache_read_usd_per_mtok: 0.0,
    };

    /// Cache writes and reads at the input price (a provider without prompt caching).
    pub fn new(input_usd_per_mtok: f64, output_usd_per_mtok: f64) -> Self {
        Pricing {
            input_usd_per_mtok,
            output_usd_per_mtok,
            cache_write_usd_per_mtok: input_usd_per_mtok,
            cache_read_usd_per_mtok: input_usd_per_mtok,
        }
    }

    /// With prompt-cache prices: given ones, or Anthropic's
    /// ([`CACHE_WRITE_FACTOR`], [`CACHE_READ_FACTOR`] times the input price).
    pub fn with_cache(
        mut self,
        write_usd_per_mtok: Option<f64>,
        read_usd_per_mtok: Option<f64>,
    ) -> Self {
        self.cache_write_usd_per_mtok =
            write_usd_per_mtok.unwrap_or(self.input_usd_per_mtok * CACHE_WRITE_FACTOR);
        self.cache_read_usd_per_mtok =
            read_usd_per_mtok.unwrap_or(self.input_usd_per_mtok * CACHE_READ_FACTOR);
        self
    }

    pub fn is_free(&self) -> bool {
        self.input_usd_per_mtok <= 0.0
            && self.output_usd_per_mtok <= 0.0
            && self.cache_write_usd_per_mtok <= 0.0
            && self.cache_read_usd_per_mtok <= 0.0
    }

    /// The dearest price any prompt token can be billed at (plain, cache write or read).
    pub fn max_input_usd_per_mtok(&self) -> f64 {
        self.input_usd_per_mtok
            .max(self.cache_write_usd_per_mtok)
            .max(self.cache_read_usd_per_mtok)
    }

    /// The cost of a call, rounded up to the next micro-dollar. Capped at [`MAX_COST_MICROS`]
    /// so that absurd usage figures from a provider keep budget sums far from overflowing.
    pub fn cost_micros(&self, input_tokens: u64, output_tokens: u64) -> i64 {
        self.cost_micros_cached(input_tokens, 0, 0, output_tokens)
    }

    /// The cost of a call that wrote `cache_write_tokens` to the prompt cache and read
    /// `cache_read_tokens` from it besides its `input_tokens` (Anthropic reports the three
    /// apart), rounded up and capped as [`Pricing::cost_micros`].
    pub fn cost_micros_cached(
        &self,
        input_tokens: u64,
        cache_write_tokens: u64,
        cache_read_tokens: u64,
        output_tokens: u64,
    ) -> i64 {
        // USD per million tokens is exactly micro-dollars per token.
        let micros = input_tokens as f64 * self.input_usd_per_mtok.max(0.0)
            + cache_write_tokens as f64 * self.cache_write_usd_per_mtok.max(0.0)
            + cache_read_tokens as f64 * self.cache_read_usd_per_mtok.max(0.0)
            + output_tokens as f64 * self.output_usd_per_mtok.max(0.0);
        (micros.ceil() as i64).min(MAX_COST_MICROS)
    }

    /// The most a call can cost: its estimated prompt (schema included, plus the
    /// structured-output overhead when it asks for one) at the dearest input price (a
    /// cache write costs more than plain input), plus `max_tokens` of output.
    pub fn worst_case_micros(&self, req: &CompletionRequest) -> i64 {
        let mut prompt = estimate_tokens(req.prompt_len());
        if req.output.is_some() {
            prompt += STRUCTURED_OUTPUT_OVERHEAD_TOKENS;
        }
        let dearest = Pricing {
            input_usd_per_mtok: self.max_input_usd_per_mtok(),
            ..*self
        };
        dearest.cost_micros(prompt, u64::from(req.max_tokens))
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
        // Prompt caching: writes at 1.25x, reads at 0.1x the input price.
        let c = Pricing::new(3.0, 15.0).with_cache(None, None);
        assert_eq!(
            c.cost_micros_cached(100, 1000, 10_000, 10),
            300 + 3750 + 3000 + 150
        );
        assert_eq!(c.max_input_usd_per_mtok(), 3.75);
        // The worst case prices every prompt token as a cache write.
        assert_eq!(
            c.worst_case_micros(&req),
            (216.0 * 3.75f64).ceil() as i64 + 1000 * 15
        );
        assert!(c.worst_case_micros(&req) >= c.cost_micros_cached(0, 216, 0, 1000));
        let custom = Pricing::new(3.0, 15.0).with_cache(Some(6.0), Some(0.0));
        assert_eq!(custom.cost_micros_cached(0, 10, 10, 0), 60);
        assert_eq!(crate::llm::usd(&100.0), "$100.00");
        assert_eq!(crate::llm::usd(&0.5), "$0.50");
        assert_eq!(crate::llm::usd(&0.00275), "$0.00275");
        assert_eq!(crate::llm::usd(&0.0), "$0.00");
    }
}
