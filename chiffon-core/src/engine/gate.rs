//! The approval gate as pure decisions: what happens to a fresh plan, and whether someone
//! may approve. No I/O here; `lifecycle.rs` carries the decisions out (status change and
//! audit entries), so the policy is written, read and tested in one place.

use chiffon_protocol::ErrorCode;

use super::ApprovalConfig;
use crate::catalog::Catalog;
use crate::model::{Plan, Request};

/// What the gate decides for a request that has just been planned.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanGate {
    /// Refused before anyone is asked (the cost limit): `actor` is the rule.
    Reject {
        actor: String,
        code: ErrorCode,
        reason: String,
        limit_usd: f64,
    },
    /// Queued without a person under `rule` (`dry_run`, `auto_approve_under_X_usd`); the
    /// approver recorded is `policy:RULE`.
    AutoApprove { rule: String },
    /// A person decides.
    AwaitApproval,
}

/// The gate's decision for `plan` of `request`: the cost limit first, then the
/// auto-approval rules (a dry run; every action marked `auto_approve` and the estimate
/// within `auto_approve_max_cost_usd`), otherwise a person.
pub fn after_planning(
    policy: &ApprovalConfig,
    catalog: &Catalog,
    request: &Request,
    plan: &Plan,
) -> PlanGate {
    if let Some(limit) = policy.cost_limit_usd {
        // NaN is never within a limit.
        if plan.estimated_cost_usd.is_nan() || plan.estimated_cost_usd > limit {
            return PlanGate::Reject {
                actor: "policy:cost_limit".into(),
                code: ErrorCode::CostLimitExceeded,
                reason: format!(
                    "estimated cost ${:.4} is above the per-request limit ${limit:.4}",
                    plan.estimated_cost_usd
                ),
                limit_usd: limit,
            };
        }
    }
    if request.dry_run && policy.dry_run_skips_approval {
        return PlanGate::AutoApprove {
            rule: "dry_run".into(),
        };
    }
    if let Some(max) = policy.auto_approve_max_cost_usd {
        let all_marked = !plan.steps.is_empty()
            && plan.steps.iter().all(|s| {
                catalog
                    .actions
                    .get(&s.action)
                    .is_some_and(|a| a.auto_approve)
            });
        if all_marked && plan.estimated_cost_usd <= max {
            return PlanGate::AutoApprove {
                rule: format!("auto_approve_under_{max}_usd"),
            };
        }
    }
    PlanGate::AwaitApproval
}

/// Whether `approver` (an authenticated identity) may approve `request`: under the
/// four-eyes rule not the identity that submitted it, nor the requester it names.
pub fn may_approve(policy: &ApprovalConfig, request: &Request, approver: &str) -> bool {
    !(policy.four_eyes && (approver == request.submitted_by || approver == request.requester))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn catalog() -> Catalog {
        Catalog::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/engine_catalog"
        ))
        .unwrap()
    }

    fn request(dry_run: bool) -> Request {
        serde_json::from_value(json!({
            "id": uuid::Uuid::now_v7(), "trace_id": "t", "text": "x", "requester": "alice",
            "submitted_by": "token:ops", "dry_run": dry_run, "status": "planning",
            "plan": null, "approver": null, "approval_comment": null, "error": null,
            "commit_id": null, "created_at": chrono::Utc::now(), "updated_at": chrono::Utc::now(),
        }))
        .unwrap()
    }

    fn plan(actions: &[&str], cost: f64) -> Plan {
        let mut plan: Plan = serde_json::from_value(json!({
            "summary": "s", "provider": "offline", "model": "rules",
            "steps": actions.iter().map(|a| json!({ "action": a })).collect::<Vec<_>>(),
        }))
        .unwrap();
        plan.estimated_cost_usd = cost;
        plan
    }

    #[test]
    fn the_cost_limit_comes_first_then_the_rules_then_a_person() {
        let cat = catalog();
        let policy = ApprovalConfig {
            cost_limit_usd: Some(1.0),
            auto_approve_max_cost_usd: Some(0.5),
            ..Default::default()
        };
        // Over the limit: refused, even as a dry run and even if every action is marked.
        for dry_run in [false, true] {
            match after_planning(&policy, &cat, &request(dry_run), &plan(&["auto_ok"], 2.0)) {
                PlanGate::Reject { actor, code, .. } => {
                    assert_eq!(actor, "policy:cost_limit");
                    assert_eq!(code, ErrorCode::CostLimitExceeded);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            after_planning(
                &policy,
                &cat,
                &request(false),
                &plan(&["auto_ok"], f64::NAN)
            ),
            PlanGate::Reject { .. }
        ));
        assert_eq!(
            after_planning(&policy, &cat, &request(true), &plan(&["ok_action"], 0.9)),
            PlanGate::AutoApprove {
                rule: "dry_run".into()
            }
        );
        assert_eq!(
            after_planning(&policy, &cat, &request(false), &plan(&["auto_ok"], 0.1)),
            PlanGate::AutoApprove {
                rule: "auto_approve_under_0.5_usd".into()
            }
        );
        // One unmarked action, an estimate above the rule's bound, or no steps: a person.
        for p in [
            plan(&["auto_ok", "ok_action"], 0.1),
            plan(&["auto_ok"], 0.6),
            plan(&[], 0.0),
        ] {
            assert_eq!(
                after_planning(&policy, &cat, &request(false), &p),
                PlanGate::AwaitApproval
            );
        }
        // Without the rule (the default), marked actions still need a person.
        assert_eq!(
            after_planning(
                &ApprovalConfig::default(),
                &cat,
                &request(false),
                &plan(&["auto_ok"], 0.0)
            ),
            PlanGate::AwaitApproval
        );
    }

    #[test]
    fn four_eyes_compares_the_submitter_and_the_requester() {
        let r = request(false);
        let off = ApprovalConfig::default();
        assert!(may_approve(&off, &r, "alice"));
        let on = ApprovalConfig {
            four_eyes: true,
            ..Default::default()
        };
        assert!(!may_approve(&on, &r, "alice"));
        assert!(!may_approve(&on, &r, "token:ops"));
        assert!(may_approve(&on, &r, "token:bob"));
    }
}
