//! The console's pages: askama templates and the plain strings they show, built from the
//! engine's model. Every field is escaped by the templates.

use std::time::Duration;

use askama::Template;
use chiffon_core::engine::{AuditReport, CostLine, RequestView};
use chiffon_core::model::{AgentRecord, AuditEntry, LogLine, Request};
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Viewer;
use crate::auth::Identity;
use crate::config::Role;

/// The header every page shares.
#[derive(Debug, Clone)]
pub struct Nav {
    pub who: String,
    pub role: String,
    pub csrf: String,
    pub auth: bool,
    pub active: &'static str,
}

impl Nav {
    pub fn new(viewer: &Viewer, active: &'static str) -> Self {
        Nav {
            who: viewer.identity.name.clone(),
            role: viewer.identity.role.to_string(),
            csrf: viewer.csrf.clone(),
            auth: viewer.auth,
            active,
        }
    }
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn usd(v: f64) -> String {
    format!("${v:.4}")
}

/// A JSON value as one line of text: strings bare, the rest as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub status: u16,
    pub message: String,
}

#[derive(Template)]
#[template(path = "login.html")]
pub struct LoginPage {
    pub csrf: String,
    pub error: String,
}

#[derive(Template)]
#[template(path = "requests.html")]
pub struct RequestsPage {
    pub nav: Nav,
    pub status: String,
    /// Each status and whether it is the filter's.
    pub statuses: Vec<(&'static str, bool)>,
    pub rows: Vec<RequestRow>,
}

#[derive(Debug, Clone)]
pub struct RequestRow {
    pub id: String,
    pub short_id: String,
    pub text: String,
    pub status: String,
    pub requester: String,
    pub created: String,
    pub cost: String,
}

impl From<&Request> for RequestRow {
    fn from(r: &Request) -> Self {
        let id = r.id.to_string();
        RequestRow {
            short_id: id[..8].to_string(),
            id,
            text: r.text.chars().take(140).collect(),
            status: r.status.as_str().to_string(),
            requester: r.requester.clone(),
            created: when(r.created_at),
            cost: r
                .plan
                .as_ref()
                .map(|p| usd(p.estimated_cost_usd))
                .unwrap_or_default(),
        }
    }
}

#[derive(Template)]
#[template(path = "request.html")]
pub struct RequestPage {
    pub nav: Nav,
    pub id: String,
    pub text: String,
    pub status: String,
    pub terminal: bool,
    pub dry_run: bool,
    pub requester: String,
    pub submitted_by: String,
    pub created: String,
    pub updated: String,
    pub error: String,
    /// Why a queued request waits (`waiting_reason`), when the engine says.
    pub waiting: String,
    pub commit: String,
    pub approver: String,
    pub approval_comment: String,
    pub plan: Option<PlanView>,
    pub planning: Vec<PlanningEvent>,
    pub approvals: Vec<ApprovalEvent>,
    pub four_eyes: bool,
    /// Awaiting approval and the viewer's role may decide.
    pub can_decide: bool,
    /// Why this viewer cannot decide (four-eyes), shown next to the buttons.
    pub decide_note: String,
    pub steps: Vec<StepView>,
    pub logs: Vec<LogView>,
}

#[derive(Debug, Clone)]
pub struct PlanView {
    pub summary: String,
    pub provider: String,
    pub model: String,
    pub cached: bool,
    pub estimated_cost: String,
    pub llm_cost: String,
    pub budget: String,
    pub risks: Vec<String>,
    pub steps: Vec<PlanStepView>,
}

#[derive(Debug, Clone)]
pub struct PlanStepView {
    pub n: usize,
    pub action: String,
    pub agent_type: String,
    pub resources: String,
    pub reason: String,
    pub params: Vec<ParamView>,
    /// The step's dry run before approval (`preview`), when the engine made one.
    pub preview: Option<PreviewView>,
}

#[derive(Debug, Clone)]
pub struct ParamView {
    pub name: String,
    pub value: String,
    /// `text` (taken from the request) or `default` (the catalog's), when the plan says.
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct PreviewView {
    pub changed: String,
    pub diff: String,
}

#[derive(Debug, Clone)]
pub struct PlanningEvent {
    pub event: String,
    pub provider: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct ApprovalEvent {
    pub at: String,
    pub event: String,
    pub actor: String,
    pub comment: String,
}

#[derive(Debug, Clone)]
pub struct StepView {
    pub seq: u32,
    pub action: String,
    pub status: String,
    pub progress: u32,
    pub agent: String,
    pub attempt: u32,
    pub changed: String,
    pub output: String,
    pub diff: String,
    pub error: String,
}

#[derive(Debug, Clone)]
pub struct LogView {
    pub id: i64,
    pub at: String,
    pub kind: String,
    pub message: String,
}

/// The engine's automatic dry run of a step awaiting approval.
fn step_preview(p: &chiffon_core::model::StepPreview) -> PreviewView {
    use chiffon_core::model::PreviewStatus;
    PreviewView {
        changed: match (p.status, &p.error, p.changed) {
            (PreviewStatus::Pending, _, _) => "running…".into(),
            (_, Some(e), _) => format!("failed ({} {}): {}", e.code.code(), e.code, e.message),
            (_, None, Some(true)) => "would change".into(),
            (_, None, Some(false)) => "no change".into(),
            (_, None, None) => "done".into(),
        },
        diff: p.diff.clone().unwrap_or_default(),
    }
}

fn preview(v: &Value) -> Option<PreviewView> {
    let p = v.get("preview")?;
    if p.is_null() {
        return None;
    }
    Some(PreviewView {
        changed: match p.get("changed").and_then(Value::as_bool) {
            Some(true) => "would change".into(),
            Some(false) => "no change".into(),
            None => String::new(),
        },
        diff: p
            .get("diff")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    })
}

impl RequestPage {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        nav: Nav,
        who: &Identity,
        four_eyes: bool,
        view: RequestView,
        audit: &[AuditEntry],
        costs: &[CostLine],
        logs: &[LogLine],
    ) -> Self {
        let r = view.request;
        let step_previews: Vec<Option<PreviewView>> =
            (0..r.plan.as_ref().map_or(0, |p| p.steps.len()))
                .map(|i| {
                    view.steps
                        .iter()
                        .find(|st| st.seq as usize == i)
                        .and_then(|st| st.preview.as_ref())
                        .map(step_preview)
                })
                .collect();
        let plan = r.plan.as_ref().map(|p| {
            let budget = costs
                .iter()
                .find(|c| c.provider == p.provider)
                .map(|c| match c.budget_usd {
                    Some(b) => format!(
                        "{} left of {} this month",
                        usd((b - c.spent_usd - c.reserved_usd).max(0.0)),
                        usd(b)
                    ),
                    None => "no budget (free or unlimited)".into(),
                })
                .unwrap_or_else(|| "no budget (free or unlimited)".into());
            PlanView {
                summary: p.summary.clone(),
                provider: p.provider.clone(),
                model: p.model.clone(),
                cached: p.cached,
                estimated_cost: usd(p.estimated_cost_usd),
                llm_cost: usd(p.llm_cost_usd),
                budget,
                risks: p.risks.clone(),
                steps: p
                    .steps
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        // Read through JSON so fields the model grows (provenance, preview)
                        // show up without this page knowing their Rust types.
                        let v = serde_json::to_value(s).unwrap_or(Value::Null);
                        let provenance = v.get("provenance").cloned().unwrap_or(Value::Null);
                        PlanStepView {
                            n: i + 1,
                            action: s.action.clone(),
                            agent_type: s.agent_type.clone(),
                            resources: format!(
                                "{} GiB memory{}",
                                s.resources.memory_gb,
                                if s.resources.gpu { ", a GPU" } else { "" }
                            ),
                            reason: s.reason.clone(),
                            params: s
                                .parameters
                                .iter()
                                .map(|(k, val)| ParamView {
                                    name: k.clone(),
                                    value: text(val),
                                    source: provenance.get(k).map(text).unwrap_or_default(),
                                })
                                .collect(),
                            preview: step_previews
                                .get(i)
                                .cloned()
                                .flatten()
                                .or_else(|| preview(&v)),
                        }
                    })
                    .collect(),
            }
        });
        let mut planning = Vec::new();
        let mut approvals = Vec::new();
        for e in audit {
            match e.event.as_str() {
                "fallback" | "skipped" => planning.push(PlanningEvent {
                    event: e.event.clone(),
                    provider: e.details.get("provider").map(text).unwrap_or_default(),
                    reason: e
                        .details
                        .get("reason")
                        .or_else(|| e.details.get("message"))
                        .map(text)
                        .unwrap_or_default(),
                }),
                "approved" | "rejected" | "auto_approved" | "approval_refused" => {
                    approvals.push(ApprovalEvent {
                        at: when(e.at),
                        event: e.event.clone(),
                        actor: e.actor.clone(),
                        comment: e
                            .details
                            .get("comment")
                            .or_else(|| e.details.get("reason"))
                            .or_else(|| e.details.get("rule"))
                            .filter(|v| !v.is_null())
                            .map(text)
                            .unwrap_or_default(),
                    })
                }
                _ => {}
            }
        }
        let awaiting = r.status == chiffon_core::model::RequestStatus::AwaitingApproval;
        let may = who.role >= Role::Approver;
        let decide_note = if four_eyes && may && awaiting && r.submitted_by == who.name {
            "four-eyes is on: you submitted this request, so another approver must decide".into()
        } else {
            String::new()
        };
        // Read through JSON so the field shows up once the model carries it.
        let waiting = serde_json::to_value(&r)
            .ok()
            .and_then(|v| v.get("waiting_reason").filter(|w| !w.is_null()).map(text))
            .unwrap_or_default();
        RequestPage {
            nav,
            waiting,
            id: r.id.to_string(),
            text: r.text.clone(),
            status: r.status.as_str().to_string(),
            terminal: r.status.is_terminal(),
            dry_run: r.dry_run,
            requester: r.requester.clone(),
            submitted_by: r.submitted_by.clone(),
            created: when(r.created_at),
            updated: when(r.updated_at),
            error: r
                .error
                .as_ref()
                .map(|e| format!("{} ({})", e.message, e.code.code()))
                .unwrap_or_default(),
            commit: r.commit_id.clone().unwrap_or_default(),
            approver: r.approver.clone().unwrap_or_default(),
            approval_comment: r.approval_comment.clone().unwrap_or_default(),
            plan,
            planning,
            approvals,
            four_eyes,
            can_decide: awaiting && may,
            decide_note,
            steps: view
                .steps
                .iter()
                .map(|s| StepView {
                    seq: s.seq,
                    action: s.action.clone(),
                    status: s.status.as_str().to_string(),
                    progress: s.progress,
                    agent: s.agent_id.clone().unwrap_or_default(),
                    attempt: s.attempt,
                    changed: match s.changed {
                        Some(true) => "changed".into(),
                        Some(false) => "unchanged".into(),
                        None => String::new(),
                    },
                    output: s.output.clone().unwrap_or_default(),
                    diff: s.diff.clone().unwrap_or_default(),
                    error: s
                        .error
                        .as_ref()
                        .map(|e| format!("{} ({})", e.message, e.code.code()))
                        .unwrap_or_default(),
                })
                .collect(),
            logs: logs
                .iter()
                .map(|l| LogView {
                    id: l.id,
                    at: l.line.at.format("%H:%M:%S").to_string(),
                    kind: l.line.kind.clone(),
                    message: l.line.message.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Template)]
#[template(path = "agents.html")]
pub struct AgentsPage {
    pub nav: Nav,
    pub rows: Vec<AgentRow>,
}

#[derive(Debug, Clone)]
pub struct AgentRow {
    pub agent_id: String,
    pub agent_type: String,
    pub hostname: String,
    /// `fresh`, `stale` or `offline`.
    pub state: &'static str,
    pub age: String,
    pub resources: String,
    pub running: String,
    pub broker_user: String,
    pub actions: String,
}

impl AgentRow {
    /// Fresh within `max_age` of its last heartbeat (what the scheduler trusts), stale up to
    /// three times that, offline after.
    pub fn new(a: &AgentRecord, max_age: Duration, now: DateTime<Utc>) -> Self {
        let age = (now - a.last_seen).num_seconds().max(0) as u64;
        let max = max_age.as_secs().max(1);
        let state = if age <= max {
            "fresh"
        } else if age <= 3 * max {
            "stale"
        } else {
            "offline"
        };
        let hb = &a.heartbeat;
        let cpu = match &hb.cpu {
            Some(c) => format!("{} cores at {:.0}%", c.cores, c.percent),
            None => "CPU not reported".to_string(),
        };
        let memory = match &hb.memory {
            Some(m) => format!("{:.1}/{:.1} GiB memory", m.used_gb, m.total_gb),
            None => "memory not reported".to_string(),
        };
        let mut resources = format!("{cpu}, {memory}");
        for g in &hb.gpus {
            resources.push_str(&format!(
                "; GPU {} {} {:.1}/{:.1} GiB",
                g.index, g.name, g.memory_used_gb, g.memory_total_gb
            ));
        }
        AgentRow {
            agent_id: a.agent_id.clone(),
            agent_type: a.agent_type.clone(),
            hostname: a.hostname.clone(),
            state,
            age: format!("{age} s ago"),
            resources,
            running: match hb.max_tasks {
                Some(m) => format!("{} of {m}", hb.running_tasks),
                None => hb.running_tasks.to_string(),
            },
            broker_user: a.broker_user.clone().unwrap_or_default(),
            actions: hb.actions.join(", "),
        }
    }
}

#[derive(Template)]
#[template(path = "costs.html")]
pub struct CostsPage {
    pub nav: Nav,
    pub month: String,
    pub rows: Vec<CostRow>,
}

#[derive(Debug, Clone)]
pub struct CostRow {
    pub provider: String,
    pub spent: String,
    pub reserved: String,
    pub budget: String,
    pub remaining: String,
    /// 0-100, for the bar.
    pub percent: u32,
    pub calls: u64,
    pub tokens: String,
}

impl From<&CostLine> for CostRow {
    fn from(c: &CostLine) -> Self {
        let used = c.spent_usd + c.reserved_usd;
        CostRow {
            provider: c.provider.clone(),
            spent: usd(c.spent_usd),
            reserved: usd(c.reserved_usd),
            budget: c.budget_usd.map(usd).unwrap_or_else(|| "none".into()),
            remaining: c
                .budget_usd
                .map(|b| usd((b - used).max(0.0)))
                .unwrap_or_default(),
            percent: match c.budget_usd {
                Some(b) if b > 0.0 => ((used / b) * 100.0).clamp(0.0, 100.0) as u32,
                Some(_) => 100,
                None => 0,
            },
            calls: c.calls,
            tokens: format!("{} in / {} out", c.input_tokens, c.output_tokens),
        }
    }
}

#[derive(Template)]
#[template(path = "audit.html")]
pub struct AuditPage {
    pub nav: Nav,
    pub rows: Vec<AuditRow>,
    pub verify: Option<VerifyView>,
    pub next_after: String,
}

#[derive(Debug, Clone)]
pub struct AuditRow {
    pub seq: i64,
    pub at: String,
    pub request: String,
    pub actor: String,
    pub event: String,
    pub details: String,
}

impl From<&AuditEntry> for AuditRow {
    fn from(e: &AuditEntry) -> Self {
        AuditRow {
            seq: e.seq,
            at: when(e.at),
            request: e.request_id.map(|r| r.to_string()).unwrap_or_default(),
            actor: e.actor.clone(),
            event: e.event.clone(),
            details: e.details.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VerifyView {
    pub ok: bool,
    pub checked: u64,
    pub problem: String,
    pub missing: Vec<String>,
}

impl From<&AuditReport> for VerifyView {
    fn from(r: &AuditReport) -> Self {
        VerifyView {
            ok: r.ok,
            checked: r.chain.entries_checked,
            problem: match (&r.chain.first_bad_seq, &r.chain.problem) {
                (Some(seq), Some(p)) => format!("entry {seq}: {p}"),
                (None, Some(p)) => p.clone(),
                _ => String::new(),
            },
            missing: r.missing_commits.iter().map(|u| u.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_step_preview_and_provenance_are_read_when_present() {
        let step = json!({
            "action": "write_config",
            "parameters": { "path": "/tmp/x", "mode": "0644" },
            "provenance": { "path": "text", "mode": "default" },
            "preview": { "changed": true, "diff": "+++ after: /tmp/x" }
        });
        let p = preview(&step).unwrap();
        assert_eq!(p.changed, "would change");
        assert_eq!(p.diff, "+++ after: /tmp/x");
        assert_eq!(text(&step["provenance"]["path"]), "text");
        assert!(preview(&json!({ "action": "noop" })).is_none());
        assert!(preview(&json!({ "preview": null })).is_none());
    }
}
