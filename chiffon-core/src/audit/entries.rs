//! Audit entries built from what the engine's collaborators report, so every caller writes
//! the same event, actor and details for the same fact.

use serde_json::json;
use uuid::Uuid;

use super::AuditEvent;
use crate::llm::router::FallbackEvent;
use crate::model::NewAuditEntry;
use crate::planner::PlanUsage;

/// The entries of one planning, in order: each link passed over (a failure or a skip is a
/// `fallback`, a model that declined the request an `llm_refused`, with what the attempt
/// cost), then a `cache_hit` when the plan was reused.
pub fn planning(
    request_id: Uuid,
    passed_over: &[FallbackEvent],
    usage: Option<&PlanUsage>,
) -> Vec<NewAuditEntry> {
    let mut entries: Vec<NewAuditEntry> = passed_over
        .iter()
        .map(|e| NewAuditEntry {
            request_id: Some(request_id),
            actor: "planner".into(),
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
        })
        .collect();
    if let Some(u) = usage.filter(|u| u.cached) {
        entries.push(NewAuditEntry {
            request_id: Some(request_id),
            actor: "planner".into(),
            event: AuditEvent::CacheHit,
            details: json!({ "provider": u.provider, "model": u.model, "llm_cost_usd": 0.0 }),
        });
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use chiffon_protocol::ErrorCode;

    fn event(code: ErrorCode) -> FallbackEvent {
        FallbackEvent {
            provider: "anthropic".into(),
            model: "m".into(),
            code,
            reason: "r".into(),
            cost_usd: 0.5,
            input_tokens: 3,
            output_tokens: 4,
        }
    }

    #[test]
    fn refusals_fallbacks_and_cache_hits() {
        let id = Uuid::now_v7();
        let usage = PlanUsage {
            provider: "openai".into(),
            model: "x".into(),
            input_tokens: 0,
            output_tokens: 0,
            llm_cost_usd: 0.0,
            cached: true,
        };
        let entries = planning(
            id,
            &[
                event(ErrorCode::LlmUnavailable),
                event(ErrorCode::LlmRefused),
            ],
            Some(&usage),
        );
        let events: Vec<AuditEvent> = entries.iter().map(|e| e.event).collect();
        assert_eq!(
            events,
            [
                AuditEvent::Fallback,
                AuditEvent::LlmRefused,
                AuditEvent::CacheHit
            ]
        );
        assert_eq!(entries[0].details["cost_usd"], json!(0.5));
        assert_eq!(entries[2].details["provider"], json!("openai"));
        let fresh = PlanUsage {
            cached: false,
            ..usage
        };
        assert!(planning(id, &[], Some(&fresh)).is_empty());
    }
}
