//! The planner: a request in plain words becomes a validated [`Plan`].
//!
//! It walks the [`Router`]'s links in order, each a [`PlanSource`], through
//! [`chain::walk`], the one fallback there is. An LLM link gets the prompt of [`prompt`]
//! (role, rules, the whole catalog, the inventory) and the plan's JSON Schema generated
//! from the catalog ([`schema`]), which each provider asks for through its structured
//! output (free text where the server has none); the answer is parsed strictly and
//! validated against the catalog ([`parse`]) either way. An unknown action, a parameter
//! that fails its schema or a malformed answer counts as that provider's failure and the
//! next link is tried. A refusal (no steps, a reason) ends planning: the request fails
//! with [`ErrorCode::LlmRefused`] and the model's reason, and no other link, the offline
//! planner included, is asked to guess. The [`offline`] link plans with no LLM at all. Every skip comes back as a
//! [`FallbackEvent`] for the audit log, on success and on failure.
//!
//! Plans made by an LLM are cached ([`cache`]): the same normalised request against the
//! same catalog (and dry-run flag) reuses the plan at no LLM cost (`cached = true`).
//! Offline plans are not cached, so an LLM gets its chance again once one is back.

pub mod cache;
pub mod chain;
pub mod eval;
pub mod offline;
pub mod parse;
pub mod prompt;
pub mod provenance;
pub mod schema;

use std::sync::Arc;

use chiffon_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::Catalog;
use crate::llm::router::{FallbackEvent, Router};
use crate::model::{micros_to_usd, Plan};
use crate::store::Store;

pub use chain::{PlanSource, Walked};
pub use offline::{OfflineError, OfflinePlanner};

/// The `[planner]` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlannerConfig {
    /// Reuse plans for the same normalised request and catalog.
    pub cache: bool,
    /// The LLM's answer budget; also what the worst-case reservation counts.
    pub max_tokens: u32,
    pub temperature: f32,
    /// How strongly the offline planner must match an action.
    pub offline_min_score: f64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            cache: true,
            max_tokens: 2048,
            temperature: 0.0,
            offline_min_score: OfflinePlanner::default().min_score,
        }
    }
}

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    pub dry_run: bool,
    /// Recorded with the LLM spend.
    pub request_id: Option<Uuid>,
}

/// What planning used, for the audit's `planned` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanUsage {
    /// The link that made the plan (`anthropic`, `openai`, `ollama`, `offline`), or the
    /// one that made the cached plan.
    pub provider: String,
    pub model: String,
    /// Tokens of every LLM call this planning made (rejected answers included).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// What this planning cost (rejected answers included), USD; 0 for a cache hit.
    pub llm_cost_usd: f64,
    pub cached: bool,
}

/// A plan and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOutcome {
    pub plan: Plan,
    /// Every provider skipped or failed before the one that planned, in order.
    pub events: Vec<FallbackEvent>,
    pub usage: PlanUsage,
}

/// No link could plan the request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    /// [`ErrorCode::NoPlan`] when every link failed, [`ErrorCode::LlmRefused`] when a
    /// model declined (the message carries its reason).
    pub code: ErrorCode,
    pub message: String,
    /// Every provider skipped or failed, in order (the offline planner's failure included;
    /// for a refusal, last, the refusing provider's with its cost).
    pub events: Vec<FallbackEvent>,
    /// The offline planner's refusal, when it had the last word: what it refused and why
    /// (`reason`, and `verb`, `value`, `host`, `hosts`… as they apply); `{}` otherwise.
    pub details: serde_json::Value,
}

/// Plans requests. Cheap to clone.
#[derive(Clone)]
pub struct Planner {
    router: Router,
    store: Arc<dyn Store>,
    config: PlannerConfig,
}

impl std::fmt::Debug for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planner")
            .field("router", &self.router)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Planner {
    /// `store` keeps the plan cache (the router's budgets have their own handle).
    pub fn new(router: Router, store: Arc<dyn Store>, config: PlannerConfig) -> Self {
        Planner {
            router,
            store,
            config,
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// Plans `text` against `catalog`.
    pub async fn plan(
        &self,
        catalog: &Catalog,
        text: &str,
        options: &PlanOptions,
    ) -> Result<PlanOutcome, PlanError> {
        if text.trim().is_empty() {
            return Err(PlanError {
                code: ErrorCode::NoPlan,
                message: "the request text is empty".into(),
                events: Vec::new(),
                details: serde_json::json!({}),
            });
        }
        let key = cache::cache_key(text, &catalog.fingerprint, options.dry_run);
        // Only LLM plans are cached: a chain without an LLM plans offline (deterministic,
        // free) and never asks the cache.
        let has_llm = self
            .router
            .links()
            .iter()
            .any(|l| matches!(l, crate::llm::router::Link::Llm(_)));
        if self.config.cache && has_llm {
            if let Some(hit) = self.cached(&key, catalog).await {
                return Ok(hit);
            }
        }
        let ask = chain::Ask {
            catalog,
            text,
            dry_run: options.dry_run,
            request_id: options.request_id,
            max_tokens: self.config.max_tokens,
            temperature: self.config.temperature,
            offline_min_score: self.config.offline_min_score,
            prompt: Default::default(),
        };
        let mut events: Vec<FallbackEvent> = Vec::new();
        let sources: Vec<&dyn PlanSource> = self
            .router
            .links()
            .iter()
            .map(|l| l as &dyn PlanSource)
            .collect();
        let (walked, spent) = chain::walk(&sources, &ask, &mut events).await;
        let llm_cost = micros_to_usd(spent.cost_micros);
        let verdict = match walked {
            Walked::Planned(p) => {
                let mut plan = p.plan;
                plan.llm_cost_usd = llm_cost;
                // The person approving sees who was passed over, and why.
                plan.skipped = events
                    .iter()
                    .map(|e| crate::model::SkippedProvider {
                        provider: e.provider.clone(),
                        model: e.model.clone(),
                        code: e.code,
                        reason: e.reason.clone(),
                    })
                    .collect();
                plan.estimated_cost_usd += llm_cost;
                if p.cacheable && self.config.cache {
                    if let Err(e) = self.store.cache_plan(&key, &plan).await {
                        tracing::warn!(error = %e, "cannot cache plan");
                    }
                }
                let usage = PlanUsage {
                    provider: plan.provider.clone(),
                    model: plan.model.clone(),
                    input_tokens: spent.input_tokens,
                    output_tokens: spent.output_tokens,
                    llm_cost_usd: llm_cost,
                    cached: false,
                };
                return Ok(PlanOutcome {
                    plan,
                    events,
                    usage,
                });
            }
            Walked::Refused { reason } => {
                let (provider, model) = events
                    .last()
                    .map(|e| (e.provider.clone(), e.model.clone()))
                    .unwrap_or_default();
                tracing::info!(%provider, %reason, "the model declined to plan");
                return Err(PlanError {
                    code: ErrorCode::LlmRefused,
                    message: format!("{provider} ({model}) declined to plan the request: {reason}"),
                    details: serde_json::json!({ "reason": reason, "provider": provider }),
                    events,
                });
            }
            Walked::Exhausted { verdict } => verdict,
        };
        let message = if events.is_empty() {
            "no planner is configured (the provider order is empty)".to_string()
        } else {
            let reasons: Vec<String> = events
                .iter()
                .map(|e| format!("{}: {}", e.provider, e.reason))
                .collect();
            format!("no provider could plan the request: {}", reasons.join("; "))
        };
        // The offline planner's refusal is the last word: its code (5207, or 5206 for a value
        // that fails the schema) and what it refused.
        let (code, details) = verdict.unwrap_or((ErrorCode::NoPlan, serde_json::json!({})));
        Err(PlanError {
            code,
            message,
            events,
            details,
        })
    }

    async fn cached(&self, key: &str, catalog: &Catalog) -> Option<PlanOutcome> {
        let plan = match self.store.cached_plan(key).await {
            Ok(p) => p?,
            Err(e) => {
                tracing::warn!(error = %e, "plan cache unavailable");
                return None;
            }
        };
        // The key covers the catalog's fingerprint; checking again costs little and keeps
        // a hand-edited cache row from ever reaching an agent.
        let mut plan = match parse::revalidate(&plan, catalog) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cached plan no longer valid");
                return None;
            }
        };
        plan.cached = true;
        plan.llm_cost_usd = 0.0;
        plan.estimated_cost_usd = parse::actions_cost_usd(&plan, catalog);
        let usage = PlanUsage {
            provider: plan.provider.clone(),
            model: plan.model.clone(),
            input_tokens: 0,
            output_tokens: 0,
            llm_cost_usd: 0.0,
            cached: true,
        };
        Some(PlanOutcome {
            plan,
            events: Vec::new(),
            usage,
        })
    }
}
