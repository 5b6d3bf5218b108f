//! Planner evaluation: a corpus of plain requests with the plan each must give (actions
//! and the parameters the text sets) or a refusal, and the judge that scores any planner
//! against it. `chiffon-core/tests/fixtures/planner_corpus.toml` is the corpus for the
//! shipped catalog; `chiffon eval-planner` runs it against the offline planner or an LLM.
//!
//! A plan is **right** when it has exactly the expected actions in order, each listed
//! parameter has the expected value, and every parameter not listed holds the catalog's
//! default (a value the request did not give is not invented). Anything else planned is
//! **wrong**; a refusal of a request an action fits is **refused** (safe, but counts
//! against accuracy).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::catalog::Catalog;
use crate::model::Plan;

/// The corpus file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Corpus {
    #[serde(rename = "case", default)]
    pub cases: Vec<Case>,
}

/// One request and what must come of it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub text: String,
    /// The plan an action fits; absent when the request must be refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<ExpectedStep>>,
    /// Why it must be refused (free text, for the reader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refuse: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedStep {
    pub action: String,
    /// The parameters the text sets; every other one must hold its default.
    #[serde(default)]
    pub params: toml::Table,
}

impl Corpus {
    pub fn parse(text: &str) -> Result<Corpus, String> {
        let c: Corpus = toml::from_str(text).map_err(|e| e.to_string())?;
        for (i, case) in c.cases.iter().enumerate() {
            if case.steps.is_some() == case.refuse.is_some() {
                return Err(format!(
                    "case {} ({:?}): give exactly one of `steps` and `refuse`",
                    i + 1,
                    case.text
                ));
            }
        }
        Ok(c)
    }
}

/// What came of one case.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// An action fits and the plan is the expected one.
    Right,
    /// An action fits but the planner refused (with its reason).
    Refused(String),
    /// A plan that contradicts or differs from the request (what differs).
    Wrong(String),
    /// No action fits and the planner refused.
    RightlyRefused,
}

/// Judges a planner's outcome for `case`.
pub fn judge(case: &Case, outcome: Result<&Plan, &str>, catalog: &Catalog) -> Verdict {
    match (&case.steps, outcome) {
        (None, Err(_)) => Verdict::RightlyRefused,
        (None, Ok(plan)) => Verdict::Wrong(format!(
            "planned {} but the request must be refused ({})",
            describe(plan),
            case.refuse.as_deref().unwrap_or("")
        )),
        (Some(_), Err(e)) => Verdict::Refused(e.to_string()),
        (Some(expected), Ok(plan)) => match differs(expected, plan, catalog) {
            None => Verdict::Right,
            Some(d) => Verdict::Wrong(format!("{d}; planned {}", describe(plan))),
        },
    }
}

fn describe(plan: &Plan) -> String {
    plan.steps
        .iter()
        .map(|s| format!("{} {}", s.action, Value::Object(s.parameters.clone())))
        .collect::<Vec<_>>()
        .join(", then ")
}

fn differs(expected: &[ExpectedStep], plan: &Plan, catalog: &Catalog) -> Option<String> {
    let want: Vec<&str> = expected.iter().map(|s| s.action.as_str()).collect();
    let got: Vec<&str> = plan.steps.iter().map(|s| s.action.as_str()).collect();
    if want != got {
        return Some(format!("actions {got:?} instead of {want:?}"));
    }
    for (i, (e, s)) in expected.iter().zip(&plan.steps).enumerate() {
        let e_params: Map<String, Value> = e
            .params
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(Value::Null)))
            .collect();
        for (k, v) in &e_params {
            if s.parameters.get(k) != Some(v) {
                return Some(format!(
                    "step {}: `{k}` is {} instead of {v}",
                    i + 1,
                    s.parameters
                        .get(k)
                        .map(Value::to_string)
                        .unwrap_or("unset".into())
                ));
            }
        }
        let spec = catalog.actions.get(&s.action);
        for (k, v) in &s.parameters {
            if e_params.contains_key(k) {
                continue;
            }
            let default = spec
                .and_then(|a| a.parameters.get(k))
                .and_then(|p| p.default.as_ref())
                .and_then(|d| serde_json::to_value(d).ok());
            if default.as_ref() != Some(v) {
                return Some(format!(
                    "step {}: `{k}` is {v}, which the request does not give (default {})",
                    i + 1,
                    default.map(|d| d.to_string()).unwrap_or("none".into())
                ));
            }
        }
    }
    None
}

/// The figures of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    pub total: usize,
    /// Requests an action fits.
    pub fit: usize,
    pub planned_right: usize,
    /// Requests an action fits that were refused.
    pub refused: usize,
    /// Plans that contradict or differ from the request (fit or not).
    pub wrong: usize,
    /// Requests no action fits.
    pub no_fit: usize,
    pub no_fit_refused: usize,
}

impl Figures {
    pub fn add(&mut self, case: &Case, v: &Verdict) {
        self.total += 1;
        if case.steps.is_some() {
            self.fit += 1;
        } else {
            self.no_fit += 1;
        }
        match v {
            Verdict::Right => self.planned_right += 1,
            Verdict::Refused(_) => self.refused += 1,
            Verdict::Wrong(_) => self.wrong += 1,
            Verdict::RightlyRefused => self.no_fit_refused += 1,
        }
    }

    /// Planned right over requests an action fits.
    pub fn accuracy(&self) -> f64 {
        if self.fit == 0 {
            1.0
        } else {
            self.planned_right as f64 / self.fit as f64
        }
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests: {} an action fits, planned right {} ({:.1}%), refused {}; {} no action fits, refused {}; wrong plans {}",
            self.total,
            self.fit,
            self.planned_right,
            self.accuracy() * 100.0,
            self.refused,
            self.no_fit,
            self.no_fit_refused,
            self.wrong
        )
    }
}
