//! Strict parsing of an LLM's answer into a validated [`Plan`].
//!
//! The answer must be one JSON object `{"summary", "steps", "risks"}`, optionally inside a
//! single ```` ```json ```` fence and nothing else. Every step must name a catalog action
//! and pass its schema; `agent_type` and `resources` come from the catalog, never from
//! the answer.

use chiffon_protocol::ErrorCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::catalog::{Catalog, CatalogError};
use crate::llm::{truncate, LlmError};
use crate::model::{Plan, PlanStep};

/// A plan longer than this is refused: no request needs it, and a runaway answer must
/// not become a runaway execution.
pub const MAX_STEPS: usize = 50;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    summary: String,
    steps: Vec<RawStep>,
    #[serde(default)]
    risks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    action: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    reason: String,
}

fn invalid(code: ErrorCode, message: impl Into<String>) -> LlmError {
    LlmError::InvalidPlan {
        code,
        message: message.into(),
    }
}

/// The JSON text inside an optional Markdown fence.
fn unfence(text: &str) -> Result<&str, LlmError> {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return Ok(t);
    };
    let (lang, body) = rest.split_once('\n').unwrap_or((rest, ""));
    if !(lang.trim().is_empty() || lang.trim().eq_ignore_ascii_case("json")) {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            format!("the answer is fenced as `{}`, not json", lang.trim()),
        ));
    }
    body.trim_end()
        .strip_suffix("```")
        .map(str::trim)
        .ok_or_else(|| {
            invalid(
                ErrorCode::LlmInvalidResponse,
                "the answer opens a ``` fence and does not close it",
            )
        })
}

/// Parses and validates an answer. The returned plan has no provider, model or costs yet.
pub fn parse_plan(answer: &str, catalog: &Catalog) -> Result<Plan, LlmError> {
    let json = unfence(answer)?;
    if !json.starts_with('{') {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            format!(
                "the answer is not a JSON object: {}",
                truncate(answer.trim(), 200)
            ),
        ));
    }
    let raw: RawPlan = serde_json::from_str(json).map_err(|e| {
        invalid(
            ErrorCode::LlmInvalidResponse,
            format!("the answer is not a plan object: {e}"),
        )
    })?;
    if raw.summary.trim().is_empty() {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            "the plan's summary is empty",
        ));
    }
    if raw.steps.is_empty() {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            format!(
                "the plan has no steps: {}",
                truncate(raw.summary.trim(), 300)
            ),
        ));
    }
    if raw.steps.len() > MAX_STEPS {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            format!(
                "the plan has {} steps, more than {MAX_STEPS}",
                raw.steps.len()
            ),
        ));
    }
    let mut steps = Vec::with_capacity(raw.steps.len());
    for (i, s) in raw.steps.into_iter().enumerate() {
        let at = |e: CatalogError| invalid(e.code(), format!("step {}: {e}", i + 1));
        let spec = catalog.get(&s.action).map_err(at)?;
        let parameters = spec.validate(&s.parameters).map_err(at)?;
        steps.push(PlanStep {
            action: spec.name.clone(),
            parameters,
            agent_type: spec.agent_type.clone(),
            resources: spec.resources.clone(),
            reason: s.reason,
            provenance: Default::default(),
        });
    }
    Ok(Plan {
        summary: raw.summary.trim().to_string(),
        steps,
        risks: raw.risks,
        estimated_cost_usd: 0.0,
        llm_cost_usd: 0.0,
        provider: String::new(),
        model: String::new(),
        cached: false,
    })
}

/// Checks a stored plan against the catalog again (a cached plan, for instance) and
/// refreshes what comes from the catalog.
pub fn revalidate(plan: &Plan, catalog: &Catalog) -> Result<Plan, LlmError> {
    let mut out = plan.clone();
    for (i, s) in out.steps.iter_mut().enumerate() {
        let at = |e: CatalogError| invalid(e.code(), format!("step {}: {e}", i + 1));
        let spec = catalog.get(&s.action).map_err(at)?;
        s.parameters = spec.validate(&s.parameters).map_err(at)?;
        s.agent_type = spec.agent_type.clone();
        s.resources = spec.resources.clone();
    }
    Ok(out)
}

/// The sum of the actions' declared costs, USD.
pub fn actions_cost_usd(plan: &Plan, catalog: &Catalog) -> f64 {
    plan.steps
        .iter()
        .filter_map(|s| catalog.actions.get(&s.action))
        .map(|a| a.cost_usd)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences() {
        assert_eq!(unfence("{}").unwrap(), "{}");
        assert_eq!(unfence("```json\n{\"a\":1}\n```").unwrap(), "{\"a\":1}");
        assert_eq!(unfence("  ```\n{}\n```  ").unwrap(), "{}");
        assert!(unfence("```yaml\na: 1\n```").is_err());
        assert!(unfence("```json\n{}").is_err());
    }

    #[test]
    fn refuses_prose() {
        let c = Catalog::default();
        for bad in [
            "Here is the plan: {\"summary\":\"s\",\"steps\":[]}",
            "{\"summary\":\"s\",\"steps\":[]} hope this helps",
            "[]",
            "",
            "{\"summary\":\"s\",\"steps\":[],\"extra\":1}",
            "{\"summary\":\"s\",\"steps\":[]}",
        ] {
            let e = parse_plan(bad, &c).unwrap_err();
            assert_eq!(e.code(), ErrorCode::LlmInvalidResponse, "{bad}");
        }
    }
}
