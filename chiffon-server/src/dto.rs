//! The HTTP API's bodies. Handlers serialize exactly these types and the OpenAPI document is
//! derived from them, so the two cannot drift. They mirror chiffon-core's model (which stays
//! free of utoipa) and are built from it with `From`.

use std::collections::BTreeMap;

use chiffon_core::engine::{CostLine, EngineEvent, Health, RejectedMessage, RequestView};
use chiffon_core::model::{AgentRecord, LogLine, Plan, PlanStep, Request, RequestStatus, Step};
use chiffon_protocol::ErrorPayload;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// Longest `requester` accepted (characters).
pub const MAX_REQUESTER_LEN: usize = 200;
/// Longest approval `comment` accepted (characters).
pub const MAX_COMMENT_LEN: usize = 2000;

/// Text with no NUL character (PostgreSQL cannot store one); written out in the schema
/// attributes below, which take literals only.
pub const NO_NUL_PATTERN: &str = "^[^\\u0000]*$";
/// Text with no NUL and at least one visible character: one that is neither a control
/// character nor white space (the set of [`is_blank`]).
pub const TEXT_PATTERN: &str = "^[^\\u0000]*[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff][^\\u0000]*$";

/// Control characters and white space (Unicode `White_Space` and U+FEFF): what a request's
/// text must hold something besides ([`TEXT_PATTERN`]).
pub fn is_blank(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{20}'
        | '\u{7f}'..='\u{a0}'
        | '\u{1680}'
        | '\u{2000}'..='\u{200a}'
        | '\u{2028}'
        | '\u{2029}'
        | '\u{202f}'
        | '\u{205f}'
        | '\u{3000}'
        | '\u{feff}')
}

/// `POST /request`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// What to do, in plain words: at least one visible character, at most 10000 characters
    /// and 10000 bytes of UTF-8 once leading and trailing white space is trimmed.
    #[schema(
        min_length = 1,
        max_length = 10000,
        pattern = "^[^\\u0000]*[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff][^\\u0000]*$"
    )]
    pub text: String,
    /// Who asks; only an admin token (or a server without tokens) may name someone else
    /// than itself.
    #[serde(default)]
    #[schema(max_length = 200, pattern = "^[^\\u0000]*$")]
    pub requester: Option<String>,
    /// Plan and run in check mode: report what would change, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// `202` answer of `POST /request`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SubmitResponse {
    pub request_id: Uuid,
    pub status: StatusDto,
    pub trace_id: String,
    pub requester: String,
    pub dry_run: bool,
    pub created_at: DateTime<Utc>,
    /// `GET` this for the request.
    pub url: String,
    /// `GET` this for its live events (SSE).
    pub events_url: String,
}

/// `POST /approve`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    pub request_id: Uuid,
    /// `true` approves, `false` rejects.
    pub approved: bool,
    #[serde(default)]
    #[schema(max_length = 2000, pattern = "^[^\\u0000]*$")]
    pub comment: Option<String>,
}

/// A request's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusDto {
    Planning,
    AwaitingApproval,
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    Rejected,
}

impl From<RequestStatus> for StatusDto {
    fn from(s: RequestStatus) -> Self {
        match s {
            RequestStatus::Planning => StatusDto::Planning,
            RequestStatus::AwaitingApproval => StatusDto::AwaitingApproval,
            RequestStatus::Queued => StatusDto::Queued,
            RequestStatus::Running => StatusDto::Running,
            RequestStatus::Completed => StatusDto::Completed,
            RequestStatus::Failed => StatusDto::Failed,
            RequestStatus::Cancelled => StatusDto::Cancelled,
            RequestStatus::Rejected => StatusDto::Rejected,
        }
    }
}

/// An error recorded on a request or step.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDto {
    pub code: u16,
    /// The code's snake_case name.
    pub name: String,
    pub message: String,
    #[schema(value_type = Object)]
    pub details: Value,
}

impl From<ErrorPayload> for ErrorDto {
    fn from(e: ErrorPayload) -> Self {
        ErrorDto {
            code: e.code.code(),
            name: e.code.name().to_string(),
            message: e.message,
            details: e.details,
        }
    }
}

/// Resources a step needs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResourcesDto {
    pub gpu: bool,
    pub memory_gb: f64,
}

/// One step of a plan, as planned.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlanStepDto {
    pub action: String,
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    pub agent_type: String,
    pub resources: ResourcesDto,
    pub reason: String,
    /// Where each parameter's value came from: `text` (the request says it), `default`
    /// (the catalog's default) or `inferred` (an LLM's choice the text does not show).
    /// Empty for plans made before it was recorded.
    #[serde(default)]
    pub provenance: BTreeMap<String, String>,
    /// The automatic dry run of this step, run while the plan awaits approval (check-mode
    /// actions only); only in `GET /request/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<PreviewDto>,
}

/// What a step would change, from its check-mode run before approval.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PreviewDto {
    /// `pending`, `completed` or `failed` (a failed preview blocks nothing).
    pub status: String,
    /// Whether the step would change anything.
    pub changed: Option<bool>,
    /// Unified diff of what it would change.
    pub diff: Option<String>,
    pub error: Option<ErrorDto>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<chiffon_core::model::StepPreview> for PreviewDto {
    fn from(p: chiffon_core::model::StepPreview) -> Self {
        PreviewDto {
            status: serde_json::to_value(p.status)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            changed: p.changed,
            diff: p.diff,
            error: p.error.map(Into::into),
            finished_at: p.finished_at,
        }
    }
}

impl From<PlanStep> for PlanStepDto {
    fn from(s: PlanStep) -> Self {
        PlanStepDto {
            action: s.action,
            parameters: s.parameters,
            agent_type: s.agent_type,
            resources: ResourcesDto {
                gpu: s.resources.gpu,
                memory_gb: s.resources.memory_gb,
            },
            reason: s.reason,
            preview: None,
            provenance: s
                .provenance
                .into_iter()
                .map(|(k, v)| (k, v.as_str().to_string()))
                .collect(),
        }
    }
}

/// A validated plan and how it was made.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlanDto {
    pub summary: String,
    pub steps: Vec<PlanStepDto>,
    pub risks: Vec<String>,
    /// LLM spend of planning plus the actions' declared costs (USD).
    pub estimated_cost_usd: f64,
    pub llm_cost_usd: f64,
    /// The provider and model that planned it (`offline` for the local planner).
    pub provider: String,
    pub model: String,
    pub cached: bool,
    /// Providers tried first and passed over, with why (over budget, unreachable, an
    /// invalid answer…).
    #[serde(default)]
    pub skipped: Vec<SkippedDto>,
}

/// A provider the planner passed over.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SkippedDto {
    pub provider: String,
    pub model: String,
    /// The 5xxx code of why.
    pub code: u16,
    pub reason: String,
}

impl From<Plan> for PlanDto {
    fn from(p: Plan) -> Self {
        PlanDto {
            summary: p.summary,
            steps: p.steps.into_iter().map(Into::into).collect(),
            risks: p.risks,
            estimated_cost_usd: p.estimated_cost_usd,
            llm_cost_usd: p.llm_cost_usd,
            provider: p.provider,
            model: p.model,
            cached: p.cached,
            skipped: p
                .skipped
                .into_iter()
                .map(|k| SkippedDto {
                    provider: k.provider,
                    model: k.model,
                    code: k.code.code(),
                    reason: k.reason,
                })
                .collect(),
        }
    }
}

/// A step as it runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepDto {
    pub seq: u32,
    /// The id agents see.
    pub task_id: Uuid,
    pub action: String,
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    pub agent_type: String,
    /// `pending`, `ready`, `dispatched`, `running`, `completed`, `failed`, `cancelled`, `skipped`.
    pub status: String,
    pub attempt: u32,
    pub agent_id: Option<String>,
    /// The broker user the current attempt is bound to (its agent's, as the broker
    /// authenticated it).
    pub broker_user: Option<String>,
    pub progress: u32,
    /// The tail of its output.
    pub output: Option<String>,
    /// What a check-mode run would change.
    pub diff: Option<String>,
    pub changed: Option<bool>,
    pub error: Option<ErrorDto>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<Step> for StepDto {
    fn from(s: Step) -> Self {
        StepDto {
            seq: s.seq,
            task_id: s.task_id,
            action: s.action,
            parameters: s.parameters,
            agent_type: s.agent_type,
            status: s.status.as_str().to_string(),
            attempt: s.attempt,
            agent_id: s.agent_id,
            broker_user: s.broker_user,
            progress: s.progress,
            output: s.output,
            diff: s.diff,
            changed: s.changed,
            error: s.error.map(Into::into),
            dispatched_at: s.dispatched_at,
            finished_at: s.finished_at,
        }
    }
}

/// A request: what `GET /request/{id}` answers (with its steps) and `GET /requests` lists
/// (without).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RequestDto {
    /// The request's id, under the name every answer gives it.
    pub request_id: Uuid,
    /// The same as `request_id` (an alias kept for compatibility).
    pub id: Uuid,
    pub trace_id: String,
    pub text: String,
    pub requester: String,
    /// The authenticated identity that submitted it (what the four-eyes rule compares).
    pub submitted_by: String,
    pub dry_run: bool,
    pub status: StatusDto,
    pub plan: Option<PlanDto>,
    pub approver: Option<String>,
    pub approval_comment: Option<String>,
    pub error: Option<ErrorDto>,
    /// The git commit of its audit record.
    pub commit_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepDto>>,
    /// Why a `queued` or `running` request is not moving (no agent of the type, none alive,
    /// none with the resources it needs…); only in `GET /request/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_reason: Option<String>,
}

impl From<Request> for RequestDto {
    fn from(r: Request) -> Self {
        RequestDto {
            request_id: r.id,
            id: r.id,
            trace_id: r.trace_id,
            text: r.text,
            requester: r.requester,
            submitted_by: r.submitted_by,
            dry_run: r.dry_run,
            status: r.status.into(),
            plan: r.plan.map(Into::into),
            approver: r.approver,
            approval_comment: r.approval_comment,
            error: r.error.map(Into::into),
            commit_id: r.commit_id,
            created_at: r.created_at,
            updated_at: r.updated_at,
            steps: None,
            waiting_reason: None,
        }
    }
}

impl From<RequestView> for RequestDto {
    fn from(v: RequestView) -> Self {
        let mut dto = RequestDto::from(v.request);
        if let Some(plan) = dto.plan.as_mut() {
            for (i, ps) in plan.steps.iter_mut().enumerate() {
                ps.preview = v
                    .steps
                    .iter()
                    .find(|s| s.seq as usize == i)
                    .and_then(|s| s.preview.clone())
                    .map(Into::into);
            }
        }
        dto.steps = Some(v.steps.into_iter().map(Into::into).collect());
        dto.waiting_reason = v.waiting_reason;
        dto
    }
}

/// `GET /requests` parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only requests in this status.
    #[param(value_type = Option<StatusDto>)]
    pub status: Option<String>,
    /// At most this many (default 50; at most `server.max_page`).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only requests created before this instant (RFC 3339, years 0000-9999): the next page
    /// starts before the oldest `created_at` of the page before.
    pub before: Option<DateTime<Utc>>,
    /// Only requests whose id starts with this (6 to 36 characters, hex digits and `-`,
    /// case-insensitive, hyphens where the canonical form has them). With `limit=2`, how a
    /// client resolves a short id: one match is the request, two mean ambiguous.
    #[param(min_length = 6, max_length = 36, pattern = "^[0-9A-Fa-f-]{6,36}$")]
    pub id_prefix: Option<String>,
}

/// Shortest `id_prefix` accepted.
pub const MIN_ID_PREFIX_LEN: usize = 6;

/// `GET /requests`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RequestListDto {
    pub requests: Vec<RequestDto>,
}

/// `GET /request/{id}/logs` parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only lines after this line id.
    pub after: Option<i64>,
    /// At most this many (default 1000; at most `server.max_page`).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// One line of the execution log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogLineDto {
    pub id: i64,
    pub task_id: Option<Uuid>,
    pub at: DateTime<Utc>,
    /// `status`, `output`, `result`, `error` or `engine`.
    pub kind: String,
    pub progress: Option<u32>,
    pub message: String,
}

impl From<LogLine> for LogLineDto {
    fn from(l: LogLine) -> Self {
        LogLineDto {
            id: l.id,
            task_id: l.line.task_id,
            at: l.line.at,
            kind: l.line.kind,
            progress: l.line.progress,
            message: l.line.message,
        }
    }
}

/// `GET /request/{id}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogsDto {
    pub request_id: Uuid,
    pub lines: Vec<LogLineDto>,
}

/// An agent as last seen.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentDto {
    pub agent_id: String,
    /// The broker user that publishes its heartbeats.
    pub broker_user: Option<String>,
    pub agent_type: String,
    pub hostname: String,
    pub last_seen: DateTime<Utc>,
    /// Seconds since its last heartbeat, when this answer was made.
    pub heartbeat_age_secs: i64,
    /// `fresh`, `stale` (beats are being missed) or `offline` (silent for longer than
    /// `heartbeat_max_age_secs`: no work is sent to it).
    pub liveness: String,
    /// The engine's `dispatch.heartbeat_max_age`.
    pub heartbeat_max_age_secs: u64,
    pub running_tasks: u32,
    pub max_tasks: Option<u32>,
    pub queue: Option<String>,
    pub actions: Vec<String>,
    /// The last heartbeat's CPU figures; `null` when the agent did not give them.
    #[schema(value_type = Option<Object>)]
    pub cpu: Value,
    /// `{used_gb, total_gb}`; `null` when the agent did not give them (it then gets only
    /// steps that need no memory and no GPU).
    #[schema(value_type = Option<Object>)]
    pub memory: Value,
    #[schema(value_type = Vec<Object>)]
    pub gpus: Vec<Value>,
}

impl AgentDto {
    /// The agent as seen at `now` by an engine that stops counting heartbeats older than
    /// `heartbeat_max_age`.
    pub fn new(a: AgentRecord, now: DateTime<Utc>, heartbeat_max_age: std::time::Duration) -> Self {
        let max_age =
            chrono::TimeDelta::from_std(heartbeat_max_age).unwrap_or(chrono::TimeDelta::MAX);
        let age = (now - a.last_seen).max(chrono::TimeDelta::zero());
        let hb = a.heartbeat;
        AgentDto {
            heartbeat_age_secs: age.num_seconds(),
            liveness: chiffon_core::engine::waiting::liveness(age, max_age)
                .as_str()
                .to_string(),
            heartbeat_max_age_secs: heartbeat_max_age.as_secs(),
            agent_id: a.agent_id,
            broker_user: a.broker_user,
            agent_type: a.agent_type,
            hostname: a.hostname,
            last_seen: a.last_seen,
            running_tasks: hb.running_tasks,
            max_tasks: hb.max_tasks,
            queue: hb.queue,
            actions: hb.actions,
            cpu: serde_json::to_value(&hb.cpu).unwrap_or(Value::Null),
            memory: serde_json::to_value(&hb.memory).unwrap_or(Value::Null),
            gpus: hb
                .gpus
                .iter()
                .map(|g| serde_json::to_value(g).unwrap_or(Value::Null))
                .collect(),
        }
    }
}

impl From<AgentRecord> for AgentDto {
    /// As seen now, against the default `dispatch.heartbeat_max_age`.
    fn from(a: AgentRecord) -> Self {
        AgentDto::new(
            a,
            Utc::now(),
            chiffon_core::engine::DispatchConfig::default().heartbeat_max_age,
        )
    }
}

/// `GET /agents`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentsDto {
    pub agents: Vec<AgentDto>,
    /// Senders whose messages this server dead-lettered (a heartbeat that does not parse,
    /// a publisher that may not send it), newest first, while they keep failing.
    #[serde(default)]
    pub rejected: Vec<RejectedDto>,
}

/// The latest rejection of one sender's messages.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RejectedDto {
    /// `payload.agent_id`, when it could be read.
    pub agent_id: Option<String>,
    /// The broker user that published it (`user_id`), when given.
    pub publisher: Option<String>,
    pub message_type: Option<String>,
    /// The error code (5001-5999).
    pub code: u16,
    /// The field at fault, as a JSON path (`payload.memory.total_gb`).
    pub field: Option<String>,
    pub reason: String,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    /// Messages of this sender rejected since `first_at`.
    pub count: u64,
}

impl From<RejectedMessage> for RejectedDto {
    fn from(r: RejectedMessage) -> Self {
        RejectedDto {
            agent_id: r.agent_id,
            publisher: r.publisher,
            message_type: r.message_type,
            code: r.code,
            field: r.field,
            reason: r.reason,
            first_at: r.first_at,
            last_at: r.last_at,
            count: r.count,
        }
    }
}

/// One provider's spend this month.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CostLineDto {
    pub provider: String,
    /// `YYYY-MM`, UTC.
    pub month: String,
    pub spent_usd: f64,
    /// Reserved for calls in flight.
    pub reserved_usd: f64,
    /// `null`: no budget (free or unlimited).
    pub budget_usd: Option<f64>,
    pub remaining_usd: Option<f64>,
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl From<CostLine> for CostLineDto {
    fn from(c: CostLine) -> Self {
        CostLineDto {
            remaining_usd: c
                .budget_usd
                .map(|b| (b - c.spent_usd - c.reserved_usd).max(0.0)),
            provider: c.provider,
            month: c.month,
            spent_usd: c.spent_usd,
            reserved_usd: c.reserved_usd,
            budget_usd: c.budget_usd,
            calls: c.calls,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
        }
    }
}

/// `GET /costs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CostsDto {
    pub month: String,
    pub providers: Vec<CostLineDto>,
    pub total_spent_usd: f64,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthDto {
    /// `ok` or `degraded`.
    pub status: String,
    /// `ok` or the error.
    pub store: String,
    pub bus: String,
    /// The git audit trail: `ok`, or the last commit's failure until one succeeds.
    pub audit: String,
    pub store_backend: String,
    pub bus_backend: String,
    pub instance_id: String,
    pub version: String,
    /// Whether API tokens are required.
    pub auth: bool,
}

impl HealthDto {
    pub fn new(h: Health, auth: bool) -> Self {
        HealthDto {
            status: h.status,
            store: h.store,
            bus: h.bus,
            audit: h.audit,
            store_backend: h.store_backend,
            bus_backend: h.bus_backend,
            instance_id: h.instance_id,
            version: env!("CARGO_PKG_VERSION").to_string(),
            auth,
        }
    }
}

/// One Server-Sent Event's `data` (the event's name is the `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventDto {
    /// The request's status changed (the first event gives the status at subscription).
    Status {
        request_id: Uuid,
        status: StatusDto,
        at: DateTime<Utc>,
    },
    /// A step reported progress (0-100).
    Progress {
        request_id: Uuid,
        task_id: Uuid,
        seq: u32,
        progress: u32,
        message: String,
        at: DateTime<Utc>,
    },
    /// A step printed a line.
    Output {
        request_id: Uuid,
        task_id: Uuid,
        seq: u32,
        line: String,
        at: DateTime<Utc>,
    },
    /// A step changed status.
    Step {
        request_id: Uuid,
        task_id: Uuid,
        seq: u32,
        status: String,
        at: DateTime<Utc>,
    },
}

impl EventDto {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            EventDto::Status { .. } => "status",
            EventDto::Progress { .. } => "progress",
            EventDto::Output { .. } => "output",
            EventDto::Step { .. } => "step",
        }
    }
}

impl From<EngineEvent> for EventDto {
    fn from(e: EngineEvent) -> Self {
        match e {
            EngineEvent::Status {
                request_id,
                status,
                at,
            } => EventDto::Status {
                request_id,
                status: status.into(),
                at,
            },
            EngineEvent::Progress {
                request_id,
                task_id,
                seq,
                progress,
                message,
                at,
            } => EventDto::Progress {
                request_id,
                task_id,
                seq,
                progress,
                message,
                at,
            },
            EngineEvent::Output {
                request_id,
                task_id,
                seq,
                line,
                at,
            } => EventDto::Output {
                request_id,
                task_id,
                seq,
                line,
                at,
            },
            EngineEvent::Step {
                request_id,
                task_id,
                seq,
                status,
                at,
            } => EventDto::Step {
                request_id,
                task_id,
                seq,
                status: status.as_str().to_string(),
                at,
            },
        }
    }
}

/// `GET /actions`: the action catalog, by name.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ActionsDto {
    pub actions: Vec<ActionDto>,
}

/// One catalog action, as a planner (or an MCP client) sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ActionDto {
    pub name: String,
    pub description: String,
    /// The agents that run it consume `agent.{agent_type}`.
    pub agent_type: String,
    pub keywords: Vec<String>,
    /// Whether an approval policy may skip the gate for it.
    pub auto_approve: bool,
    /// Whether it can run as a dry run (check mode).
    pub check_mode: bool,
    pub timeout_seconds: Option<u64>,
    /// The parameters as a JSON Schema object (`properties`, `required`).
    #[schema(value_type = Object)]
    pub parameters: Value,
    #[schema(value_type = Object)]
    pub resources: Value,
}

impl From<&chiffon_core::catalog::ActionSpec> for ActionDto {
    fn from(a: &chiffon_core::catalog::ActionSpec) -> Self {
        ActionDto {
            name: a.name.clone(),
            description: a.description.clone(),
            agent_type: a.agent_type.clone(),
            keywords: a.keywords.clone(),
            auto_approve: a.auto_approve,
            check_mode: a.check_mode,
            timeout_seconds: a.timeout_seconds,
            parameters: a.parameters_schema(false),
            resources: serde_json::to_value(&a.resources).unwrap_or_default(),
        }
    }
}
