//! The planning prompt: the role and rules, the whole catalog (every action's description,
//! parameters with types, patterns, defaults and bounds, resources) and the inventory's
//! hosts, and the one JSON shape the answer must have. The request also carries that shape
//! as a schema ([`super::schema`]) for the providers' structured output.

use serde_json::{json, Map, Value};

use crate::catalog::{Catalog, ParamType};
use crate::llm::CompletionRequest;

const ROLE_AND_RULES: &str = "\
You are the planner of Chiffon, an infrastructure automation system. You turn a request \
written in plain words into a plan: an ordered list of steps, each step one action from the \
catalog below with its parameters. A person reviews the plan before anything runs.

Rules:
1. Use only actions from the catalog, by their exact name. Never invent an action. You may \
decline: if the catalog cannot do what is asked, or the request should not be done, answer \
with an empty \"steps\" list and say why in \"refusal\" (and in one line in \"summary\"). \
A person sees the reason; nobody guesses a plan for you.
2. Give every required parameter. Each value must have the declared JSON type (string, \
integer or boolean) and match the parameter's pattern and bounds. Leave out (or set to null) a \
parameter whose default fits. Never add a parameter the action does not declare.
3. Host parameters name hosts from the inventory below, exactly as written there.
4. Steps run one after the other, in the order given. Keep the plan as short as the request allows.
5. In \"risks\", list what could go wrong (downtime, data loss, wrong host); an empty list if none.
6. When you are given the submit_plan tool or a response schema, answer through it. \
Otherwise answer with ONLY one JSON object, no prose before or after it, no comments, in \
exactly this shape (\"refusal\" null unless you decline):
{\"summary\": \"one line saying what the plan does\", \"steps\": [{\"action\": \"NAME\", \
\"parameters\": {\"PARAM\": VALUE}, \"reason\": \"why this step\"}], \"risks\": [\"...\"], \
\"refusal\": null}";

/// The catalog as the prompt shows it: a JSON array, one object per action.
pub fn catalog_json(catalog: &Catalog) -> Value {
    let actions: Vec<Value> = catalog
        .actions
        .values()
        .map(|a| {
            let mut params = Map::new();
            for (name, p) in &a.parameters {
                let mut o = Map::new();
                let kind = match p.kind {
                    ParamType::String => "string",
                    ParamType::Integer => "integer",
                    ParamType::Boolean => "boolean",
                };
                o.insert("type".into(), json!(kind));
                o.insert("required".into(), json!(p.required));
                if let Some(pat) = &p.pattern {
                    o.insert("pattern".into(), json!(pat));
                }
                if let Some(d) = &p.default {
                    o.insert(
                        "default".into(),
                        serde_json::to_value(d).unwrap_or(Value::Null),
                    );
                }
                if let Some(m) = p.min {
                    o.insert("min".into(), json!(m));
                }
                if let Some(m) = p.max {
                    o.insert("max".into(), json!(m));
                }
                if let Some(d) = &p.description {
                    o.insert("description".into(), json!(d));
                }
                params.insert(name.clone(), Value::Object(o));
            }
            let mut o = json!({
                "name": a.name,
                "description": a.description,
                "agent_type": a.agent_type,
                "parameters": params,
                "resources": {"gpu": a.resources.gpu, "memory_gb": a.resources.memory_gb},
            });
            if !a.keywords.is_empty() {
                o["keywords"] = json!(a.keywords);
            }
            if a.cost_usd > 0.0 {
                o["cost_usd"] = json!(a.cost_usd);
            }
            if a.check_mode {
                o["supports_dry_run"] = json!(true);
            }
            o
        })
        .collect();
    Value::Array(actions)
}

/// The system prompt: role, rules, catalog, inventory.
pub fn system_prompt(catalog: &Catalog) -> String {
    let catalog_text =
        serde_json::to_string_pretty(&catalog_json(catalog)).unwrap_or_else(|_| "[]".into());
    let hosts = if catalog.hosts.is_empty() {
        "(none)".to_string()
    } else {
        catalog.hosts.join(", ")
    };
    format!("{ROLE_AND_RULES}\n\nCatalog of actions:\n{catalog_text}\n\nHosts in the inventory: {hosts}\n")
}

/// The user message: the request, and whether it is a dry run.
pub fn user_prompt(text: &str, dry_run: bool) -> String {
    let mut s = format!("Request:\n{}\n", text.trim());
    if dry_run {
        s.push_str(
            "\nThis is a dry run: the steps will run in check mode and change nothing. Plan them as for a real run.\n",
        );
    }
    s.push_str("\nAnswer with the JSON plan only.");
    s
}

/// The whole completion request for planning `text`, asking for the plan's schema through
/// each provider's structured output.
pub fn planning_request(
    catalog: &Catalog,
    text: &str,
    dry_run: bool,
    max_tokens: u32,
    temperature: f32,
) -> CompletionRequest {
    let mut req = CompletionRequest::new(system_prompt(catalog), user_prompt(text, dry_run));
    req.max_tokens = max_tokens;
    req.temperature = temperature;
    req.output = Some(super::schema::output_schema(catalog));
    req
}
