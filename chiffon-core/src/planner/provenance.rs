//! Where a plan's values came from, for plans that do not say it themselves (an LLM's):
//! a value found in the request's text is `text`, the catalog's default is `default`,
//! anything else is `inferred` (the planner chose it; the person approving should look).
//! The offline planner records it as it reads the text, and is not second-guessed here.

use serde_json::Value;

use crate::catalog::Catalog;
use crate::model::{ParamSource, Plan};

/// Fills `provenance` of every step that has none.
pub fn annotate(plan: &mut Plan, catalog: &Catalog, text: &str) {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '"' | '\'' | '(' | ')'))
        .map(|w| w.trim_end_matches(['.', '?', '!', ':']))
        .filter(|w| !w.is_empty())
        .collect();
    for step in &mut plan.steps {
        if !step.provenance.is_empty() {
            continue;
        }
        let spec = catalog.actions.get(&step.action);
        for (k, v) in &step.parameters {
            let default = spec
                .and_then(|a| a.parameters.get(k))
                .and_then(|p| p.default.as_ref())
                .and_then(|d| serde_json::to_value(d).ok());
            let in_text = match v {
                Value::String(s) if !s.trim().is_empty() => {
                    let s = s.to_lowercase();
                    lower.contains(&s)
                        || (s.len() == 4 && s.starts_with('0') && words.contains(&&s[1..]))
                }
                Value::Number(n) => {
                    let n = n.to_string();
                    words.iter().any(|w| {
                        *w == n
                            || w.trim_start_matches(|c: char| !c.is_ascii_digit()) == n
                            || w.trim_end_matches(|c: char| !c.is_ascii_digit()) == n
                    })
                }
                _ => false,
            };
            let src = if in_text {
                ParamSource::Text
            } else if default.as_ref() == Some(v) {
                ParamSource::Default
            } else {
                ParamSource::Inferred
            };
            step.provenance.insert(k.clone(), src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PlanStep;
    use serde_json::json;

    #[test]
    fn marks_text_default_and_inferred() {
        let catalog =
            Catalog::load(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../playbooks"))
                .unwrap();
        let mut plan = Plan {
            summary: String::new(),
            steps: vec![PlanStep {
                action: "ensure_directory".into(),
                parameters:
                    json!({"host": "localhost", "path": "/srv/x", "mode": "0700", "owner": "bob"})
                        .as_object()
                        .cloned()
                        .unwrap(),
                agent_type: "infrastructure".into(),
                resources: Default::default(),
                reason: String::new(),
                provenance: Default::default(),
            }],
            risks: vec![],
            estimated_cost_usd: 0.0,
            llm_cost_usd: 0.0,
            provider: "openai".into(),
            model: "m".into(),
            cached: false,
        };
        annotate(&mut plan, &catalog, "Create /srv/x with mode 700");
        let p = &plan.steps[0].provenance;
        assert_eq!(p["path"], ParamSource::Text);
        assert_eq!(p["mode"], ParamSource::Text);
        assert_eq!(p["host"], ParamSource::Default);
        assert_eq!(p["owner"], ParamSource::Inferred);
    }
}
