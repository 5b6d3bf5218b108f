//! An action's parameters as a JSON Schema, for asking an LLM for a plan through its
//! structured-output feature (tool input schemas, `response_format`, Ollama's `format`).
//!
//! The schema states what [`ActionSpec::validate`] checks (types, required parameters,
//! patterns, bounds) so that a model that honours it produces valid parameters; the answer
//! is still validated, since not every server enforces a schema. Patterns pass through as
//! written: the catalog's small regex subset is also valid ECMA-262 (JSON Schema) syntax
//! with the same meaning. `agent_type` and resources are never asked for: they come from
//! the catalog.

use serde_json::{json, Map, Value};

use super::{toml_to_json, ActionSpec, ParamType, MAX_STRING_BYTES};

impl ActionSpec {
    /// The JSON Schema of this action's `parameters` object.
    ///
    /// `strict` shapes it for OpenAI's strict structured outputs: every property is listed
    /// in `required`, an optional one accepts `null` (which [`ActionSpec::validate`] reads
    /// as "leave it out"), and keywords strict mode does not take (`default`, `maxLength`)
    /// are left out, the default being named in the description instead.
    pub fn parameters_schema(&self, strict: bool) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for (name, p) in &self.parameters {
            let kind = match p.kind {
                ParamType::String => "string",
                ParamType::Integer => "integer",
                ParamType::Boolean => "boolean",
            };
            let optional = !p.required || p.default.is_some();
            let mut o = Map::new();
            if strict && optional {
                o.insert("type".into(), json!([kind, "null"]));
            } else {
                o.insert("type".into(), json!(kind));
            }
            if let Some(pat) = &p.pattern {
                o.insert("pattern".into(), json!(pat));
            }
            if let Some(m) = p.min {
                o.insert("minimum".into(), json!(m));
            }
            if let Some(m) = p.max {
                o.insert("maximum".into(), json!(m));
            }
            let mut description = p.description.clone().unwrap_or_default();
            if let Some(d) = &p.default {
                let d = toml_to_json(d);
                if strict {
                    if !description.is_empty() {
                        description.push_str(". ");
                    }
                    description.push_str(&format!("Default {d} (null keeps it)"));
                } else {
                    o.insert("default".into(), d);
                }
            }
            if !strict && p.kind == ParamType::String {
                let max = p
                    .max_length
                    .unwrap_or(MAX_STRING_BYTES)
                    .min(MAX_STRING_BYTES);
                o.insert("maxLength".into(), json!(max));
            }
            if !description.is_empty() {
                o.insert("description".into(), json!(description));
            }
            if strict || !optional {
                required.push(json!(name));
            }
            properties.insert(name.clone(), Value::Object(o));
        }
        json!({
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::ParamSpec;
    use super::*;

    fn spec() -> ActionSpec {
        let mut a: ActionSpec = toml::from_str(
            r#"
            description = "d"
            agent_type = "infrastructure"
            [parameters.host]
            type = "string"
            required = true
            pattern = "^[A-Za-z0-9_.-]+$"
            [parameters.port]
            type = "integer"
            default = 3001
            min = 1
            max = 65535
            "#,
        )
        .unwrap();
        a.name = "deploy".into();
        a.parameters.insert(
            "force".into(),
            ParamSpec {
                kind: ParamType::Boolean,
                required: false,
                pattern: None,
                default: None,
                description: Some("Overwrite".into()),
                raw: false,
                max_length: None,
                min: None,
                max: None,
            },
        );
        a
    }

    #[test]
    fn plain_schema_states_the_catalog() {
        let s = spec().parameters_schema(false);
        assert_eq!(s["required"], json!(["host"]));
        assert_eq!(s["additionalProperties"], json!(false));
        assert_eq!(s["properties"]["host"]["type"], "string");
        assert_eq!(s["properties"]["host"]["pattern"], "^[A-Za-z0-9_.-]+$");
        assert_eq!(s["properties"]["host"]["maxLength"], MAX_STRING_BYTES);
        assert_eq!(s["properties"]["port"]["default"], 3001);
        assert_eq!(s["properties"]["port"]["minimum"], 1);
        assert_eq!(s["properties"]["port"]["maximum"], 65535);
        assert_eq!(s["properties"]["force"]["type"], "boolean");
    }

    #[test]
    fn strict_schema_requires_everything_and_allows_null_for_optional() {
        let s = spec().parameters_schema(true);
        assert_eq!(s["required"], json!(["force", "host", "port"]));
        assert_eq!(s["properties"]["host"]["type"], "string");
        assert_eq!(s["properties"]["port"]["type"], json!(["integer", "null"]));
        assert_eq!(s["properties"]["force"]["type"], json!(["boolean", "null"]));
        assert!(s["properties"]["port"].get("default").is_none());
        assert!(s["properties"]["host"].get("maxLength").is_none());
        assert!(s["properties"]["port"]["description"]
            .as_str()
            .unwrap()
            .contains("3001"));
        // `null` for an optional parameter validates as "use the default".
        let a = spec();
        let params = json!({"host": "nas", "port": null, "force": null});
        let out = a.validate(params.as_object().unwrap()).unwrap();
        assert_eq!(out["port"], 3001);
        assert!(!out.contains_key("force"));
    }
}
