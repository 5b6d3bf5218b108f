//! The engine's view of the planner: [`CatalogPlanner`] adapts [`crate::planner::Planner`]
//! to [`PlanProvider`], turning its fallbacks and cache hits into audit events.

use crate::audit::AuditEvent;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::{PlanEvent, PlanFailure, PlanInput, PlanOutcome, PlanProvider};
use crate::catalog::Catalog;
use crate::llm::router::FallbackEvent;
use crate::planner::{PlanOptions, Planner};

/// The real planner over one catalog.
#[derive(Clone)]
pub struct CatalogPlanner {
    planner: Planner,
    catalog: Arc<Catalog>,
}

impl CatalogPlanner {
    pub fn new(planner: Planner, catalog: Arc<Catalog>) -> Self {
        CatalogPlanner { planner, catalog }
    }
}

fn fallback(e: &FallbackEvent) -> PlanEvent {
    PlanEvent {
        // A model that declined did not fail: audited as what it is.
        event: if e.code == chiffon_protocol::ErrorCode::LlmRefused {
            AuditEvent::LlmRefused
        } else {
            AuditEvent::Fallback
        },
        details: json!({
            "provider": e.provider, "model": e.model, "code": e.code.code(), "reason": e.reason,
            "cost_usd": e.cost_usd, "input_tokens": e.input_tokens, "output_tokens": e.output_tokens,
        }),
    }
}

#[async_trait]
impl PlanProvider for CatalogPlanner {
    async fn plan(&self, input: &PlanInput) -> Result<PlanOutcome, PlanFailure> {
        let opts = PlanOptions {
            dry_run: input.dry_run,
            request_id: Some(input.request_id),
        };
        match self.planner.plan(&self.catalog, &input.text, &opts).await {
            Ok(mut o) => {
                let mut events: Vec<PlanEvent> = o.events.iter().map(fallback).collect();
                // The person approving sees who was passed over, and why.
                o.plan.skipped = o
                    .events
                    .iter()
                    .map(|e| crate::model::SkippedProvider {
                        provider: e.provider.clone(),
                        model: e.model.clone(),
                        code: e.code,
                        reason: e.reason.clone(),
                    })
                    .collect();
                if o.usage.cached {
                    events.push(PlanEvent {
                        event: AuditEvent::CacheHit,
                        details: json!({ "provider": o.usage.provider, "model": o.usage.model, "llm_cost_usd": 0.0 }),
                    });
                }
                Ok(PlanOutcome {
                    plan: o.plan,
                    events,
                    input_tokens: o.usage.input_tokens,
                    output_tokens: o.usage.output_tokens,
                })
            }
            Err(e) => Err(PlanFailure {
                code: e.code,
                message: e.message,
                events: e.events.iter().map(fallback).collect(),
                details: e.details,
            }),
        }
    }
}
