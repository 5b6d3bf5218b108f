//! The engine's domain types: requests, plans, steps, log lines, agents, audit entries.
//! Boundary types (stored as JSON, returned by the API) derive serde.

use chiffon_protocol::{ErrorPayload, Heartbeat, Resources};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// A request's status, as stored and as returned everywhere (see CONTRACT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Planning,
    AwaitingApproval,
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    Rejected,
}

impl RequestStatus {
    pub const ALL: [RequestStatus; 8] = [
        RequestStatus::Planning,
        RequestStatus::AwaitingApproval,
        RequestStatus::Queued,
        RequestStatus::Running,
        RequestStatus::Completed,
        RequestStatus::Failed,
        RequestStatus::Cancelled,
        RequestStatus::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Planning => "planning",
            RequestStatus::AwaitingApproval => "awaiting_approval",
            RequestStatus::Queued => "queued",
            RequestStatus::Running => "running",
            RequestStatus::Completed => "completed",
            RequestStatus::Failed => "failed",
            RequestStatus::Cancelled => "cancelled",
            RequestStatus::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<RequestStatus> {
        RequestStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RequestStatus::Completed
                | RequestStatus::Failed
                | RequestStatus::Cancelled
                | RequestStatus::Rejected
        )
    }

    /// The one place the lifecycle's legal transitions are written down.
    pub fn can_transition_to(self, next: RequestStatus) -> bool {
        use RequestStatus::*;
        matches!(
            (self, next),
            (
                Planning,
                AwaitingApproval | Queued | Failed | Cancelled | Rejected
            ) | (AwaitingApproval, Queued | Rejected | Cancelled)
                | (Queued, Running | Cancelled | Failed | Completed)
                | (Running, Completed | Failed | Cancelled)
        )
    }
}

impl std::fmt::Display for RequestStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a plan as the planner proposes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanStep {
    pub action: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Filled from the catalog, never from the LLM.
    #[serde(default)]
    pub agent_type: String,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub reason: String,
    /// Where each parameter's value came from: the request's text, or the catalog's
    /// default (an LLM's value not found in the text is `inferred`). Empty in plans stored
    /// before it existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provenance: BTreeMap<String, ParamSource>,
}

/// Where a plan step's parameter value came from, shown to the person who approves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamSource {
    /// Written in the request.
    Text,
    /// The catalog's default: the request said nothing about it.
    Default,
    /// Neither in the text nor the default: an LLM's choice.
    Inferred,
}

impl ParamSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamSource::Text => "text",
            ParamSource::Default => "default",
            ParamSource::Inferred => "inferred",
        }
    }
}

/// A validated plan: only catalog actions with schema-valid parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub summary: String,
    pub steps: Vec<PlanStep>,
    #[serde(default)]
    pub risks: Vec<String>,
    /// LLM spend of planning it plus the actions' declared costs, in USD.
    #[serde(default)]
    pub estimated_cost_usd: f64,
    /// The LLM spend alone, in USD.
    #[serde(default)]
    pub llm_cost_usd: f64,
    pub provider: String,
    pub model: String,
    /// Taken from the plan cache (no LLM call).
    #[serde(default)]
    pub cached: bool,
    /// Providers tried before the one that planned it, and why each was passed over (over
    /// budget, unreachable, an invalid answer…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedProvider>,
}

/// A provider the planner passed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedProvider {
    pub provider: String,
    pub model: String,
    pub code: chiffon_protocol::ErrorCode,
    pub reason: String,
}

/// A request (a row of `tasks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: Uuid,
    pub trace_id: String,
    pub text: String,
    pub requester: String,
    /// The authenticated identity that submitted it (`token:NAME`, `bus:USER`, `local`):
    /// what the four-eyes rule compares, whatever `requester` says.
    pub submitted_by: String,
    pub dry_run: bool,
    pub status: RequestStatus,
    pub plan: Option<Plan>,
    pub approver: Option<String>,
    pub approval_comment: Option<String>,
    pub error: Option<ErrorPayload>,
    pub commit_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What [`crate::store::Store::create_request`] needs.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: Uuid,
    pub trace_id: String,
    pub text: String,
    pub requester: String,
    /// The authenticated identity that submitted it.
    pub submitted_by: String,
    pub dry_run: bool,
}

/// One write of a group commit ([`crate::store::Requests::commit_group`]).
#[derive(Debug, Clone)]
pub enum GroupWrite {
    /// A new request (in `planning`) and its entries (its `received`). A duplicate id is a
    /// `Conflict` in its slot and stores nothing.
    Create {
        request: Box<NewRequest>,
        audit: Vec<NewAuditEntry>,
    },
    /// A conditional status change, as [`crate::store::Requests::transition`].
    Transition {
        id: Uuid,
        from: RequestStatus,
        to: RequestStatus,
        patch: Box<RequestPatch>,
    },
    /// A conditional step change, as [`crate::store::Steps::update_step`], with the log
    /// lines and audit entries of what it records (a result).
    Step {
        task_id: Uuid,
        from: Vec<StepStatus>,
        to: StepStatus,
        patch: Box<StepPatch>,
        logs: Vec<NewLogLine>,
        audit: Vec<NewAuditEntry>,
    },
    /// Audit entries no status change carries.
    Audit(Vec<NewAuditEntry>),
    /// Execution log lines (an agent's progress and output). Slot `Appended`.
    Logs(Vec<NewLogLine>),
    /// After a step completed (a `Step` write earlier in the same group): the request's
    /// next step (`after_seq + 1`) made ready if step `after_seq` is `completed` and the
    /// next one `pending`, or, when every step is completed or skipped,
    /// the request completed (from `queued` or `running`) with these entries. Slot:
    /// `Advanced` with the completed request, or without one (a next step made ready, or
    /// nothing to do).
    Advance {
        request_id: Uuid,
        after_seq: u32,
        audit: Vec<NewAuditEntry>,
    },
    /// Claims (or renews) the planning of a request for `owner` until now + `lease`, as
    /// [`crate::store::Requests::claim_planning`]: slot `Appended` if claimed, else a
    /// `Conflict`. After a `Create` in the same group, a new request is born claimed.
    ClaimPlanning {
        id: Uuid,
        owner: String,
        lease: std::time::Duration,
    },
    /// A work message for the outbox, stored only if its step is `dispatched` with its
    /// attempt (marked earlier in the same group); slot `Appended`, or a `Conflict`.
    Send(OutboxMessage),
    /// Outbox messages the broker confirmed (or that must not go): deleted.
    Sent(Vec<Uuid>),
    /// A step's automatic dry run with its entry: `start` records it (replacing any earlier
    /// one of the step; a `Conflict` if the step is unknown), otherwise its outcome is
    /// stored once (a `Conflict` unless that preview is still pending). Slot `Appended`.
    Preview {
        task_id: Uuid,
        preview: Box<StepPreview>,
        start: bool,
        audit: Vec<NewAuditEntry>,
    },
    /// The git trail's outcome for an ended request: its commit id, or why it has none
    /// (a failure that retrying cannot mend), with its entry. Stored once: a request that
    /// has either already is a `Conflict` in its slot and stores nothing.
    Commit {
        id: Uuid,
        commit: Result<String, String>,
        audit: Vec<NewAuditEntry>,
    },
}

impl GroupWrite {
    /// The audit entries this write carries (appended if it applies), if it can carry any.
    pub fn audit_mut(&mut self) -> Option<&mut Vec<NewAuditEntry>> {
        match self {
            GroupWrite::Create { audit, .. }
            | GroupWrite::Step { audit, .. }
            | GroupWrite::Advance { audit, .. }
            | GroupWrite::Commit { audit, .. }
            | GroupWrite::Preview { audit, .. }
            | GroupWrite::Audit(audit) => Some(audit),
            GroupWrite::Transition { patch, .. } => Some(&mut patch.audit),
            GroupWrite::ClaimPlanning { .. }
            | GroupWrite::Send(_)
            | GroupWrite::Sent(_)
            | GroupWrite::Logs(_) => None,
        }
    }

    /// The audit entries this write carries, if it can carry any.
    pub fn audit(&self) -> Option<&[NewAuditEntry]> {
        match self {
            GroupWrite::Create { audit, .. }
            | GroupWrite::Step { audit, .. }
            | GroupWrite::Advance { audit, .. }
            | GroupWrite::Commit { audit, .. }
            | GroupWrite::Preview { audit, .. }
            | GroupWrite::Audit(audit) => Some(audit),
            GroupWrite::Transition { patch, .. } => Some(&patch.audit),
            GroupWrite::ClaimPlanning { .. }
            | GroupWrite::Send(_)
            | GroupWrite::Sent(_)
            | GroupWrite::Logs(_) => None,
        }
    }
}

/// A message waiting in the outbox: published by the dispatcher after the commit that
/// stored it, or, if that never happened (a crash, a failed publish), by the engine's relay.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// Its envelope's message id.
    pub id: Uuid,
    pub task_id: Uuid,
    pub attempt: u32,
    pub queue: String,
    /// The envelope, as JSON.
    pub body: String,
    pub created_at: DateTime<Utc>,
}

/// What one write of a group commit stored.
#[derive(Debug, Clone)]
pub enum Written {
    /// The request as created or changed.
    Request(Request),
    /// The step as changed.
    Step(Step),
    /// Audit entries appended.
    Appended,
    /// What an `Advance` did: the request, when it completed it.
    Advanced(Option<Request>),
}

/// Fields a transition may set along with the status. `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct RequestPatch {
    /// Stores the plan and creates its steps (status `pending`) in the same transaction.
    pub plan: Option<Plan>,
    pub approver: Option<String>,
    pub approval_comment: Option<String>,
    pub error: Option<ErrorPayload>,
    pub commit_id: Option<String>,
    /// With a plan stored as the request is queued: the task id its first step is stored
    /// under (the engine marks that step dispatched in the same group commit, so it needs
    /// the id first). Otherwise the store chooses every step's id.
    pub first_step_id: Option<Uuid>,
    /// Audit entries for the decision this change records, appended to the audit log in the
    /// same transaction: the change and its entries are stored together or not at all (a
    /// change that loses its race leaves no entry behind).
    pub audit: Vec<NewAuditEntry>,
}

/// Filter for [`crate::store::Store::list_requests`]; newest first.
#[derive(Debug, Clone, Default)]
pub struct RequestFilter {
    pub status: Option<RequestStatus>,
    /// Only requests last updated before this instant.
    pub updated_before: Option<DateTime<Utc>>,
    /// Only requests created before this instant: the cursor for the next page (the
    /// oldest `created_at` of the page before).
    pub created_before: Option<DateTime<Utc>>,
    /// Only requests whose id, written canonically (lowercase hex, hyphens at positions 8,
    /// 13, 18 and 23), starts with this (case-insensitive); see [`id_prefix_range`].
    pub id_prefix: Option<String>,
    pub limit: Option<u32>,
}

/// The ids that start with `prefix` as an inclusive range (`[lowest, highest]`), which
/// both stores compare as they order ids (bytewise); `None` when no id can start with it
/// (a character other than hex and `-`, a hyphen out of place, longer than an id).
pub fn id_prefix_range(prefix: &str) -> Option<(Uuid, Uuid)> {
    const CANONICAL: &str = "00000000-0000-0000-0000-000000000000";
    if prefix.len() > CANONICAL.len() {
        return None;
    }
    let mut hex = String::with_capacity(32);
    for (c, slot) in prefix.chars().zip(CANONICAL.chars()) {
        match (c, slot) {
            ('-', '-') => {}
            (c, '0') if c.is_ascii_hexdigit() => hex.push(c.to_ascii_lowercase()),
            _ => return None,
        }
    }
    let low = Uuid::parse_str(&format!("{hex:0<32}")).ok()?;
    let high = Uuid::parse_str(&format!("{hex:f<32}")).ok()?;
    Some((low, high))
}

/// A step's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Waits for the steps before it.
    Pending,
    /// May be dispatched now (waits for an agent with capacity).
    Ready,
    /// Published to an agent's queue.
    Dispatched,
    /// The agent reported it started.
    Running,
    Completed,
    Failed,
    Cancelled,
    /// Never ran because an earlier step failed or the request ended.
    Skipped,
}

impl StepStatus {
    pub const ALL: [StepStatus; 8] = [
        StepStatus::Pending,
        StepStatus::Ready,
        StepStatus::Dispatched,
        StepStatus::Running,
        StepStatus::Completed,
        StepStatus::Failed,
        StepStatus::Cancelled,
        StepStatus::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Ready => "ready",
            StepStatus::Dispatched => "dispatched",
            StepStatus::Running => "running",
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
            StepStatus::Cancelled => "cancelled",
            StepStatus::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<StepStatus> {
        StepStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Completed
                | StepStatus::Failed
                | StepStatus::Cancelled
                | StepStatus::Skipped
        )
    }
}

/// A step of a request's plan, as stored (`plan_steps`). `task_id` is the id agents see.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub request_id: Uuid,
    /// 0-based position in the plan.
    pub seq: u32,
    pub task_id: Uuid,
    pub action: String,
    pub parameters: Map<String, Value>,
    pub agent_type: String,
    pub resources: Resources,
    pub status: StepStatus,
    /// 0 before the first dispatch; each dispatch counts one up.
    pub attempt: u32,
    pub agent_id: Option<String>,
    /// The queue it was dispatched to.
    pub queue: Option<String>,
    /// The broker user the current attempt is bound to: the agent it was dispatched to, or
    /// the first authenticated agent that reported on it. Status, results and log lines of
    /// the attempt are accepted from this publisher only.
    #[serde(default)]
    pub broker_user: Option<String>,
    pub progress: u32,
    pub output: Option<String>,
    pub diff: Option<String>,
    pub changed: Option<bool>,
    pub error: Option<ErrorPayload>,
    pub ready_at: Option<DateTime<Utc>>,
    pub dispatched_at: Option<DateTime<Utc>>,
    /// Past this instant with no result, the step has timed out.
    pub deadline_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Retry not before this instant (transient failures back off).
    pub not_before: Option<DateTime<Utc>>,
    /// The automatic dry run shown before approval (check-mode actions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<StepPreview>,
}

/// Where a step's automatic dry run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreviewStatus {
    /// Published; no answer yet.
    Pending,
    Completed,
    /// The check run failed, or no agent answered in time, or none could take it.
    Failed,
}

/// A step's automatic dry run: what running it would change, seen before approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepPreview {
    pub status: PreviewStatus,
    /// The task id of the check run (not the step's).
    pub task_id: Uuid,
    /// Whether the check run would change anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// Unified diff of what it would change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorPayload>,
    /// The broker user whose result this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_user: Option<String>,
    pub requested_at: DateTime<Utc>,
    /// No answer by then: failed.
    pub deadline_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// Fields [`crate::store::Store::update_step`] may set along with the status. `None` leaves a
/// field as it is.
#[derive(Debug, Clone, Default)]
pub struct StepPatch {
    pub attempt: Option<u32>,
    pub agent_id: Option<String>,
    pub queue: Option<String>,
    pub progress: Option<u32>,
    pub output: Option<String>,
    pub diff: Option<String>,
    pub changed: Option<bool>,
    pub error: Option<ErrorPayload>,
    pub ready_at: Option<DateTime<Utc>>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub not_before: Option<DateTime<Utc>>,
    /// The broker user reporting on (or sent) the step's attempt (after this change): the
    /// change applies only if that attempt is bound to no one or to this user, and binds
    /// it, in the same statement (two agents racing cannot both win).
    pub reported_by: Option<String>,
}

/// A line of `execution_logs` to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewLogLine {
    pub request_id: Uuid,
    pub task_id: Option<Uuid>,
    pub at: DateTime<Utc>,
    /// `status`, `output`, `result`, `error` or `engine`.
    pub kind: String,
    pub progress: Option<u32>,
    pub message: String,
}

/// A stored line of `execution_logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub id: i64,
    #[serde(flatten)]
    pub line: NewLogLine,
}

/// An agent as last seen through its heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub agent_id: String,
    /// The broker user its heartbeats are published by; another user cannot take the id
    /// over while the agent is alive.
    #[serde(default)]
    pub broker_user: Option<String>,
    pub agent_type: String,
    pub hostname: String,
    pub last_seen: DateTime<Utc>,
    pub heartbeat: Heartbeat,
}

/// Outcome of [`crate::store::Store::reserve_llm`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reservation {
    /// Reserved; settle it with this id.
    Reserved { id: Uuid },
    /// The reservation would pass the budget.
    OverBudget {
        spent_micros: i64,
        reserved_micros: i64,
    },
}

/// A reservation request: the worst-case cost of one LLM call.
#[derive(Debug, Clone)]
pub struct LlmReservation {
    pub provider: String,
    pub model: String,
    /// `YYYY-MM`, UTC.
    pub month: String,
    pub amount_micros: i64,
    pub budget_micros: i64,
    pub request_id: Option<Uuid>,
    /// How long the reservation counts against the budget unless settled: one left open
    /// by a crashed process stops holding budget once its lease has passed. Longer than
    /// the call can take (timeouts times attempts), so a live call never loses it.
    pub lease: std::time::Duration,
}

/// The default [`LlmReservation::lease`]: longer than a hosted provider's default timeout
/// times its attempts.
pub const DEFAULT_RESERVATION_LEASE: std::time::Duration = std::time::Duration::from_secs(600);

/// The real cost of a reserved call (settles the reservation).
#[derive(Debug, Clone)]
pub struct LlmSettlement {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micros: i64,
    pub ok: bool,
}

/// Spend of one provider in one month.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderSpend {
    pub provider: String,
    pub month: String,
    /// Settled spend, USD micro-dollars.
    pub spent_micros: i64,
    /// Reserved, not yet settled and not expired (see [`LlmReservation::lease`]).
    pub reserved_micros: i64,
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// An audit entry to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAuditEntry {
    pub request_id: Option<Uuid>,
    /// Who decided: a user, `engine`, an agent id, a rule.
    pub actor: String,
    /// What was decided (stored as [`AuditEvent::as_str`]).
    pub event: crate::audit::AuditEvent,
    pub details: Value,
}

/// A stored, hash-chained audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub request_id: Option<Uuid>,
    pub actor: String,
    pub event: String,
    pub details: Value,
    /// Hash of the entry before (64 zeros for the first).
    pub prev_hash: String,
    /// sha256 over `prev_hash` and this entry's canonical content; see [`crate::audit::chain`].
    pub hash: String,
}

/// Result of verifying the audit chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditVerification {
    pub ok: bool,
    pub entries_checked: u64,
    /// The first bad entry's seq, and why.
    pub first_bad_seq: Option<i64>,
    pub problem: Option<String>,
}

/// Micro-dollars from dollars.
pub fn usd_to_micros(usd: f64) -> i64 {
    (usd * 1_000_000.0).round() as i64
}

/// Dollars from micro-dollars.
pub fn micros_to_usd(micros: i64) -> f64 {
    micros as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefix_ranges() {
        let (lo, hi) = id_prefix_range("ABCdef12-3").unwrap();
        assert_eq!(lo.to_string(), "abcdef12-3000-0000-0000-000000000000");
        assert_eq!(hi.to_string(), "abcdef12-3fff-ffff-ffff-ffffffffffff");
        let id = "0189f0e2-1c2d-7e3f-8a4b-5c6d7e8f9a0b";
        assert_eq!(
            id_prefix_range(id),
            Some((id.parse().unwrap(), id.parse().unwrap()))
        );
        assert!(
            id_prefix_range("abcdef12-").is_some(),
            "a hyphen in its place"
        );
        for nothing in ["abcd-ef", "abcdefgh", "abcdef123", &format!("{id}0")] {
            assert_eq!(id_prefix_range(nothing), None, "{nothing}");
        }
    }

    #[test]
    fn transitions() {
        use RequestStatus::*;
        assert!(Planning.can_transition_to(AwaitingApproval));
        assert!(Planning.can_transition_to(Queued));
        assert!(AwaitingApproval.can_transition_to(Queued));
        assert!(!AwaitingApproval.can_transition_to(Running));
        assert!(!Completed.can_transition_to(Running));
        for s in RequestStatus::ALL {
            if s.is_terminal() {
                assert!(RequestStatus::ALL.iter().all(|n| !s.can_transition_to(*n)));
            }
            assert_eq!(RequestStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        for s in StepStatus::ALL {
            assert_eq!(StepStatus::parse(s.as_str()), Some(s));
        }
    }
}
