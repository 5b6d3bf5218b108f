//! Strict parsing of an LLM's answer into a validated [`Plan`].
//!
//! The answer must be one JSON object `{"summary", "steps", "risks", "refusal"?}`,
//! optionally inside a single ```` ```json ```` fence and nothing else; it is the same
//! whether it came as free text or through a provider's structured output (a tool's
//! input, a `json_schema` answer, an Ollama `format` answer), and so are the checks. A
//! `refusal` with no steps is the model declining: [`LlmError::Refused`] with its reason,
//! which ends planning instead of falling back. Every step must name a catalog action
//! and pass its schema; `agent_type` and `resources` come from the catalog, never from
//! the answer. The answer is untrusted: NUL characters anywhere (neither database stores
//! them) and sizes past the bounds below (summary, steps, parameter strings, reasons,
//! risks) make it an invalid response, so the next provider is tried; errors quote it only
//! shortened and with control characters escaped.

use chiffon_protocol::ErrorCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::catalog::{Catalog, CatalogError};
use crate::llm::{truncate, LlmError};
use crate::model::{Plan, PlanStep};

// Bounds on an answer. An LLM's output is untrusted input: a runaway or hostile answer
// is refused as invalid (the next provider is tried) rather than stored, shown to an
// approver or executed.

/// A plan longer than this is refused: no request needs it, and a runaway answer must
/// not become a runaway execution.
pub const MAX_STEPS: usize = 20;
/// Longest plan summary, in characters (it is one line for people and a commit subject).
pub const MAX_SUMMARY_CHARS: usize = 500;
/// Longest string parameter value, in characters (a file's content included).
pub const MAX_PARAMETER_CHARS: usize = 8192;
/// Longest step reason and risk, in characters.
pub const MAX_NOTE_CHARS: usize = 1000;
/// Longest action name (catalog names are short; a long one is quoted in the error).
pub const MAX_ACTION_CHARS: usize = 128;
/// Most risks listed.
pub const MAX_RISKS: usize = 20;
/// Largest answer parsed at all, in bytes.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    summary: String,
    steps: Vec<RawStep>,
    #[serde(default)]
    risks: Vec<String>,
    /// The model declines, and says why (`null` when it does not: strict schemas list it).
    #[serde(default)]
    refusal: Option<String>,
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

/// A piece of an untrusted answer fit to quote in an error (which reaches the audit log
/// and the databases): shortened, with control characters escaped.
fn excerpt(s: &str, max: usize) -> String {
    let short = truncate(s, max);
    if short.chars().any(|c| c.is_control() && c != '\n') {
        short
            .chars()
            .map(|c| {
                if c.is_control() && c != '\n' {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        short
    }
}

/// Where in the answer a NUL character is, if anywhere: neither database stores one, and
/// no plan needs one.
fn find_nul(v: &Value, at: &mut String) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let len = at.len();
            at.push_str(&format!("[{i}]"));
            let found = find_nul(item, at);
            if !found {
                at.truncate(len);
            }
            found
        }),
        Value::Object(map) => map.iter().any(|(k, item)| {
            let len = at.len();
            if k.contains('\0') {
                at.push_str(" (a key)");
                return true;
            }
            at.push('.');
            at.push_str(k);
            let found = find_nul(item, at);
            if !found {
                at.truncate(len);
            }
            found
        }),
        _ => false,
    }
}

fn too_long(what: &str, s: &str, max: usize) -> Result<(), LlmError> {
    let n = s.chars().count();
    if n > max {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            format!("{what} has {n} characters, more than {max}"),
        ));
    }
    Ok(())
}

/// A model's refusal, checked like any other part of an answer (size, NUL) and fit to show
/// to the person: shortened, control characters escaped.
pub fn refusal(reason: &str) -> LlmError {
    let reason = reason.trim();
    if reason.contains('\0') {
        return invalid(
            ErrorCode::LlmInvalidResponse,
            "the refusal contains a NUL character",
        );
    }
    if let Err(e) = too_long("the refusal", reason, MAX_NOTE_CHARS) {
        return e;
    }
    LlmError::Refused {
        reason: excerpt(reason, MAX_NOTE_CHARS),
    }
}

/// Parses and validates a completion: the provider's own refusal signal (OpenAI's
/// `message.refusal`) first, then the answer's text with [`parse_plan`].
pub fn parse_completion(c: &crate::llm::Completion, catalog: &Catalog) -> Result<Plan, LlmError> {
    if let Some(r) = &c.refusal {
        return Err(refusal(r));
    }
    parse_plan(&c.text, catalog)
}

/// Parses and validates an answer. The returned plan has no provider, model or costs yet.
pub fn parse_plan(answer: &str, catalog: &Catalog) -> Result<Plan, LlmError> {
    if answer.len() > MAX_ANSWER_BYTES {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            format!(
                "the answer has {} bytes, more than {MAX_ANSWER_BYTES}",
                answer.len()
            ),
        ));
    }
    if answer.contains('\0') {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            "the answer contains a NUL character",
        ));
    }
    let json = unfence(answer)?;
    if !json.starts_with('{') {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            format!(
                "the answer is not a JSON object: {}",
                excerpt(answer.trim(), 200)
            ),
        ));
    }
    let value: Value = serde_json::from_str(json).map_err(|e| {
        invalid(
            ErrorCode::LlmInvalidResponse,
            format!("the answer is not a plan object: {e}"),
        )
    })?;
    // `\u0000` escapes decode to NUL: refused before any of it is quoted or stored.
    let mut at = String::from("the answer");
    if find_nul(&value, &mut at) {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            format!("{} contains a NUL character", excerpt(&at, 200)),
        ));
    }
    let raw: RawPlan = serde_json::from_value(value).map_err(|e| {
        invalid(
            ErrorCode::LlmInvalidResponse,
            format!("the answer is not a plan object: {e}"),
        )
    })?;
    if let Some(reason) = raw.refusal.as_deref().filter(|r| !r.trim().is_empty()) {
        if !raw.steps.is_empty() {
            return Err(invalid(
                ErrorCode::LlmInvalidResponse,
                "the answer both declines (refusal) and plans steps",
            ));
        }
        return Err(refusal(reason));
    }
    if raw.summary.trim().is_empty() {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            "the plan's summary is empty",
        ));
    }
    too_long("the plan's summary", raw.summary.trim(), MAX_SUMMARY_CHARS)?;
    if raw.risks.len() > MAX_RISKS {
        return Err(invalid(
            ErrorCode::LlmInvalidResponse,
            format!(
                "the plan lists {} risks, more than {MAX_RISKS}",
                raw.risks.len()
            ),
        ));
    }
    for (i, r) in raw.risks.iter().enumerate() {
        too_long(&format!("risk {}", i + 1), r, MAX_NOTE_CHARS)?;
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
        too_long(
            &format!("step {}'s action", i + 1),
            &s.action,
            MAX_ACTION_CHARS,
        )?;
        too_long(
            &format!("step {}'s reason", i + 1),
            &s.reason,
            MAX_NOTE_CHARS,
        )?;
        for (name, v) in &s.parameters {
            if let Value::String(text) = v {
                too_long(
                    &format!("step {}'s parameter `{}`", i + 1, excerpt(name, 64)),
                    text,
                    MAX_PARAMETER_CHARS,
                )?;
            }
        }
        let at = |e: CatalogError| invalid(e.code(), format!("step {}: {e}", i + 1));
        let spec = catalog.get(&s.action).map_err(at)?;
        let parameters = spec.validate(&s.parameters).map_err(at)?;
        steps.push(PlanStep {
            action: spec.name.clone(),
            parameters,
            agent_type: spec.agent_type.clone(),
            resources: spec.resources.clone(),
            reason: s.reason,
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
    fn refusals_are_their_own_outcome() {
        let c = Catalog::default();
        let e = parse_plan(
            r#"{"summary":"no","steps":[],"risks":[],"refusal":"wiping disks is not in the catalog"}"#,
            &c,
        )
        .unwrap_err();
        assert_eq!(e.code(), ErrorCode::LlmRefused);
        assert!(e.to_string().contains("wiping disks"), "{e}");
        // A null or blank refusal is no refusal: an empty plan stays invalid.
        for answer in [
            r#"{"summary":"s","steps":[],"risks":[],"refusal":null}"#,
            r#"{"summary":"s","steps":[],"risks":[],"refusal":"  "}"#,
        ] {
            assert_eq!(
                parse_plan(answer, &c).unwrap_err().code(),
                ErrorCode::LlmInvalidResponse
            );
        }
        let long = format!(
            r#"{{"summary":"s","steps":[],"refusal":"{}"}}"#,
            "x".repeat(MAX_NOTE_CHARS + 1)
        );
        assert_eq!(
            parse_plan(&long, &c).unwrap_err().code(),
            ErrorCode::LlmInvalidResponse
        );
        assert_eq!(
            refusal("a\u{1b}[31mb").to_string(),
            "the model declined: a\\u{1b}[31mb"
        );
    }

    #[test]
    fn excerpts_escape_control_characters() {
        assert_eq!(excerpt("a\u{0}b\nc", 100), "a\\u{0}b\nc");
        assert_eq!(excerpt("plain", 100), "plain");
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
