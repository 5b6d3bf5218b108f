//! The plan's JSON Schema, generated from the catalog, for the providers' structured
//! output: `{summary, steps: [{action, parameters, reason}], risks, refusal}` where each
//! step is one of the catalog's actions with that action's parameter schema (`anyOf`, one
//! branch per action, told apart by `action`'s single-value `enum`).
//!
//! A provider that enforces it can only answer catalog actions with well-typed parameters;
//! the answer still goes through [`super::parse`], which checks everything again (not
//! every server enforces a schema, and no schema states the size, NUL and template-marker
//! limits).

use serde_json::{json, Value};

use super::parse::{MAX_RISKS, MAX_STEPS};
use crate::catalog::Catalog;
use crate::llm::OutputSchema;

/// The tool (Anthropic) and schema (OpenAI) name.
pub const PLAN_TOOL: &str = "submit_plan";

const PLAN_DESCRIPTION: &str = "Submit the plan for the request: catalog actions with their \
parameters, in order. To decline, submit no steps and the reason in `refusal`.";

/// The plan's schema; `strict` in the shape OpenAI's strict mode takes (see
/// [`crate::catalog::ActionSpec::parameters_schema`]).
pub fn plan_schema(catalog: &Catalog, strict: bool) -> Value {
    let variants: Vec<Value> = catalog
        .actions
        .values()
        .map(|a| {
            json!({
                "type": "object",
                "description": a.description,
                "properties": {
                    "action": {"type": "string", "enum": [a.name]},
                    "parameters": a.parameters_schema(strict),
                    "reason": {"type": "string", "description": "Why this step."},
                },
                "required": ["action", "parameters", "reason"],
                "additionalProperties": false,
            })
        })
        .collect();
    let (items, max_steps) = if variants.is_empty() {
        // No action to offer: the only valid plan is a refusal.
        (
            json!({"type": "object", "properties": {}, "required": [], "additionalProperties": false}),
            0,
        )
    } else {
        (json!({"anyOf": variants}), MAX_STEPS)
    };
    let mut risks = json!({
        "type": "array",
        "items": {"type": "string"},
        "description": "What could go wrong (downtime, data loss, wrong host); empty if nothing.",
    });
    if !strict {
        risks["maxItems"] = json!(MAX_RISKS);
    }
    let refusal_type = if strict {
        json!(["string", "null"])
    } else {
        json!("string")
    };
    let mut required = vec!["summary", "steps", "risks"];
    if strict {
        required.push("refusal");
    }
    json!({
        "type": "object",
        "properties": {
            "summary": {"type": "string", "description": "One line saying what the plan does (or why it is refused)."},
            "steps": {"type": "array", "items": items, "maxItems": max_steps},
            "risks": risks,
            "refusal": {
                "type": refusal_type,
                "description": "Only when declining: why the request cannot or should not be planned (steps then empty). Otherwise null or absent.",
            },
        },
        "required": required,
        "additionalProperties": false,
    })
}

/// What the planner asks every provider for.
pub fn output_schema(catalog: &Catalog) -> OutputSchema {
    OutputSchema {
        name: PLAN_TOOL.into(),
        description: PLAN_DESCRIPTION.into(),
        schema: plan_schema(catalog, false),
        strict_schema: plan_schema(catalog, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every object node of a strict schema lists all its properties as required and
    /// forbids others.
    fn assert_strict(v: &Value, at: &str) {
        match v {
            Value::Object(o) => {
                if let Some(Value::Object(props)) = o.get("properties") {
                    let req: Vec<&str> = o["required"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap())
                        .collect();
                    for k in props.keys() {
                        assert!(req.contains(&k.as_str()), "{at}: {k} not required");
                    }
                    assert_eq!(o["additionalProperties"], json!(false), "{at}");
                }
                assert!(o.get("default").is_none(), "{at}: default in strict mode");
                for (k, x) in o {
                    if k != "properties" {
                        assert_strict(x, &format!("{at}.{k}"));
                    }
                }
                if let Some(Value::Object(props)) = o.get("properties") {
                    for (k, x) in props {
                        assert_strict(x, &format!("{at}.{k}"));
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| assert_strict(x, at)),
            _ => {}
        }
    }

    #[test]
    fn empty_catalog_allows_only_a_refusal() {
        let s = plan_schema(&Catalog::default(), false);
        assert_eq!(s["properties"]["steps"]["maxItems"], 0);
        assert_strict(&plan_schema(&Catalog::default(), true), "$");
    }

    #[test]
    fn the_shipped_catalog_makes_a_strict_schema() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/catalog");
        let catalog = Catalog::load(dir).unwrap();
        let strict = plan_schema(&catalog, true);
        assert_strict(&strict, "$");
        let plain = plan_schema(&catalog, false);
        let variants = plain["properties"]["steps"]["items"]["anyOf"]
            .as_array()
            .unwrap();
        assert_eq!(variants.len(), catalog.actions.len());
        let kuma = variants
            .iter()
            .find(|v| v["properties"]["action"]["enum"] == json!(["deploy_kuma"]))
            .unwrap();
        assert_eq!(
            kuma["properties"]["parameters"]["required"],
            json!(["host"])
        );
        // Nothing the catalog decides is asked of the model.
        let text = plain.to_string();
        assert!(!text.contains("agent_type") && !text.contains("memory_gb"));
        assert_eq!(plain["type"], "object");
    }
}
