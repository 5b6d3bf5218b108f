//! The planning chain: every source of plans behind one trait, walked in one place.
//!
//! A [`PlanSource`] is one link of the configured order: an LLM provider behind the
//! planning prompt ([`Link::Llm`]: its answer parsed and validated against the catalog), or
//! the offline planner ([`Link::Offline`]). [`walk`] asks them in order and is the only
//! fallback there is: the first proposal wins; a failure or a skip becomes a
//! [`FallbackEvent`] and the next source is asked; a model that declines the request ends
//! the walk (no other source is asked to guess); the offline planner's refusal is the last
//! word when nothing after it plans.

use async_trait::async_trait;
use chiffon_protocol::ErrorCode;

use super::{offline, parse, provenance, OfflinePlanner};
use crate::catalog::Catalog;
use crate::llm::router::{attempt, FallbackEvent, Link};
use crate::llm::{CompletionRequest, LlmError};
use crate::model::{usd_to_micros, Plan};

/// What every source is asked.
#[derive(Debug)]
pub struct Ask<'a> {
    pub catalog: &'a Catalog,
    pub text: &'a str,
    pub dry_run: bool,
    /// Recorded with the LLM spend.
    pub request_id: Option<uuid::Uuid>,
    /// The LLM's answer budget and temperature.
    pub max_tokens: u32,
    pub temperature: f32,
    /// How strongly the offline planner must match an action.
    pub offline_min_score: f64,
    /// The planning prompt, built by the first LLM source that needs it (the catalog and
    /// its schema are large: a chain that reaches no LLM never builds it).
    pub prompt: std::sync::OnceLock<CompletionRequest>,
}

impl Ask<'_> {
    /// The planning prompt ([`super::prompt::planning_request`]), built once.
    pub fn request(&self) -> &CompletionRequest {
        self.prompt.get_or_init(|| {
            let mut req = super::prompt::planning_request(
                self.catalog,
                self.text,
                self.dry_run,
                self.max_tokens,
                self.temperature,
            );
            req.request_id = self.request_id;
            req
        })
    }
}

/// A plan a source proposes: validated against the catalog, its `provider` and `model`
/// set, `estimated_cost_usd` the actions' cost alone (the chain adds the LLM spend).
#[derive(Debug, Clone)]
pub struct Proposal {
    pub plan: Plan,
    /// What the call that made it cost, and its tokens.
    pub cost_micros: i64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Whether the plan may be reused for the same request (LLM plans; offline plans are
    /// cheap to make again, and an LLM gets its chance once one is back).
    pub cacheable: bool,
}

/// A source that did not plan.
#[derive(Debug, Clone)]
pub struct Declined {
    /// For the audit log: who, why, and what the attempt cost.
    pub event: FallbackEvent,
    /// The model declined the request itself (its reason): the walk ends here.
    pub refused: Option<String>,
    /// The offline planner's refusal of the request's content (its code and what it
    /// refused): the walk's outcome when nothing after it plans.
    pub verdict: Option<(ErrorCode, serde_json::Value)>,
}

/// One link of the planning chain.
#[async_trait]
pub trait PlanSource: Send + Sync {
    fn name(&self) -> &str;
    async fn propose(&self, ask: &Ask<'_>) -> Result<Proposal, Declined>;
}

#[async_trait]
impl PlanSource for Link {
    fn name(&self) -> &str {
        Link::name(self)
    }

    async fn propose(&self, ask: &Ask<'_>) -> Result<Proposal, Declined> {
        match self {
            Link::Llm(provider) => {
                let mut accept =
                    |c: &crate::llm::Completion| parse::parse_completion(c, ask.catalog);
                match attempt(provider.as_ref(), ask.request(), &mut accept).await {
                    Ok(a) => {
                        let mut plan = a.value;
                        provenance::annotate(&mut plan, ask.catalog, ask.text);
                        plan.provider = a.provider;
                        plan.model = a.model;
                        plan.estimated_cost_usd = parse::actions_cost_usd(&plan, ask.catalog);
                        Ok(Proposal {
                            plan,
                            cost_micros: a.completion.cost_micros,
                            input_tokens: a.completion.input_tokens,
                            output_tokens: a.completion.output_tokens,
                            cacheable: true,
                        })
                    }
                    Err((event, LlmError::Refused { reason })) => Err(Declined {
                        event,
                        refused: Some(reason),
                        verdict: None,
                    }),
                    Err((event, _)) => Err(Declined {
                        event,
                        refused: None,
                        verdict: None,
                    }),
                }
            }
            Link::Offline => {
                let planner = OfflinePlanner {
                    min_score: ask.offline_min_score,
                };
                match planner.plan(ask.catalog, ask.text) {
                    Ok(plan) => Ok(Proposal {
                        plan,
                        cost_micros: 0,
                        input_tokens: 0,
                        output_tokens: 0,
                        cacheable: false,
                    }),
                    Err(e) => Err(Declined {
                        verdict: Some((e.code(), e.details.clone())),
                        event: FallbackEvent {
                            provider: offline::PROVIDER.into(),
                            model: offline::MODEL.into(),
                            code: e.code(),
                            reason: e.message,
                            cost_usd: 0.0,
                            input_tokens: 0,
                            output_tokens: 0,
                        },
                        refused: None,
                    }),
                }
            }
        }
    }
}

/// What a walk spent, over every source it asked (rejected answers included).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    pub cost_micros: i64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The walk's result: the winning proposal, or why nothing planned.
#[derive(Debug)]
pub enum Walked {
    Planned(Proposal),
    /// A model declined the request; its event is the last of the events.
    Refused {
        reason: String,
    },
    /// No source planned; the offline planner's verdict when it had one.
    Exhausted {
        verdict: Option<(ErrorCode, serde_json::Value)>,
    },
}

/// Asks `sources` in order (see the module docs). Every source that did not plan is in
/// `events`, in order, and everything spent is summed in the returned [`Spent`].
pub async fn walk(
    sources: &[&dyn PlanSource],
    ask: &Ask<'_>,
    events: &mut Vec<FallbackEvent>,
) -> (Walked, Spent) {
    let mut spent = Spent::default();
    let mut verdict = None;
    for source in sources {
        match source.propose(ask).await {
            Ok(p) => {
                spent.cost_micros += p.cost_micros;
                spent.input_tokens += p.input_tokens;
                spent.output_tokens += p.output_tokens;
                return (Walked::Planned(p), spent);
            }
            Err(d) => {
                spent.cost_micros += usd_to_micros(d.event.cost_usd);
                spent.input_tokens += d.event.input_tokens;
                spent.output_tokens += d.event.output_tokens;
                tracing::info!(provider = %d.event.provider, code = %d.event.code, reason = %d.event.reason, "planning fell back");
                events.push(d.event);
                if let Some(reason) = d.refused {
                    return (Walked::Refused { reason }, spent);
                }
                if d.verdict.is_some() {
                    verdict = d.verdict;
                }
            }
        }
    }
    (Walked::Exhausted { verdict }, spent)
}
