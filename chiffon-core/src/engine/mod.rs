//! The orchestrator engine: the request lifecycle from plain words to a recorded outcome.
//!
//! [`Engine`] is a cheap-to-clone handle. Frontends call its methods (`submit`, `approve`,
//! `cancel`, `get`, `subscribe`, …); [`Engine::run`] drives the background work: intake
//! from `orchestrator.requests`, results and heartbeats from `orchestrator.results`,
//! dispatch of ready steps to agents with room, retries, timeouts and approval expiry.
//!
//! Architecture invariants:
//! - Every status change goes through [`crate::store::Store::transition`] /
//!   `update_step`, conditional on the status read, so several engine instances can share
//!   one database and bus: a step is marked `dispatched` (conditionally) *before* it is
//!   published, so no two instances dispatch it, and a result applies only to the step's
//!   current attempt while it is `dispatched`/`running`, so duplicates never apply twice.
//! - Every decision is appended to the audit log.

mod dispatch;
mod events;
pub mod gate;
mod lifecycle;
mod planning;
mod preview;
mod rejected;
mod runtime;
mod trail;
pub mod waiting;
pub use runtime::MAX_FAILED_DELIVERIES;

/// What planning returns: the planner's own outcome and error, for every [`PlanProvider`].
pub use crate::planner::{PlanError, PlanOutcome, PlanUsage};
pub use events::{EngineEvent, EventHub, Subscription};
pub use lifecycle::{AuditReport, MAX_TEXT_LEN};
pub use planning::CatalogPlanner;
pub use rejected::{RejectedMessage, REJECTION_LOG_INTERVAL};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chiffon_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::audit::git::GitTrail;
use crate::catalog::{Catalog, CatalogError};
use crate::model::{Request, Step};
use crate::store::{Store, StoreError};
use crate::transport::{Transport, TransportError};

/// What a request asks for, as a frontend hands it in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub text: String,
    /// Shown as the request's requester; an admin may name someone else.
    #[serde(default)]
    pub requester: Option<String>,
    /// The authenticated identity submitting it (`token:NAME`, `bus:USER`, `local`):
    /// what the four-eyes rule compares. Defaults to the requester.
    #[serde(default)]
    pub submitted_by: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    /// Carried into every bus message and log line; generated when absent.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// Idempotency: submitting the same id twice returns the first request.
    #[serde(default)]
    pub request_id: Option<Uuid>,
}

/// A request with its steps: what `GET /request/{id}` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestView {
    #[serde(flatten)]
    pub request: Request,
    pub steps: Vec<Step>,
    /// Why a `queued` (or `running`) request is not moving: no agent of the type, none
    /// alive, none with the resources (which), a retry backing off, a step nobody took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_reason: Option<String>,
}

/// Input of planning.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub request_id: Uuid,
    pub text: String,
    pub dry_run: bool,
}

/// What the engine needs from the planner: implemented by [`crate::planner`]'s planner and by
/// test doubles.
#[async_trait]
pub trait PlanProvider: Send + Sync + 'static {
    async fn plan(&self, input: &PlanInput) -> Result<PlanOutcome, PlanError>;
}

/// The approval gate's policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalConfig {
    /// The approver must differ from the requester.
    pub four_eyes: bool,
    /// Plans estimated above this (USD) are rejected before anyone is asked.
    pub cost_limit_usd: Option<f64>,
    /// Auto-approve plans whose every action is marked `auto_approve` and whose estimated
    /// cost is at most this (USD). Off (`None`) by default.
    pub auto_approve_max_cost_usd: Option<f64>,
    /// A request awaiting approval longer than this is rejected (`approval_expired`).
    #[serde(with = "secs_opt")]
    pub expire_after: Option<Duration>,
    /// Dry runs change nothing, so they skip the gate (audited as rule `dry_run`).
    pub dry_run_skips_approval: bool,
    /// While a plan awaits approval, run each check-mode step in check mode and show what
    /// it would change (`plan.steps[i].preview`).
    pub preview: bool,
}

impl Default for ApprovalConfig {
    fn default() -> Self {
        ApprovalConfig {
            four_eyes: false,
            cost_limit_usd: None,
            auto_approve_max_cost_usd: None,
            expire_after: Some(Duration::from_secs(24 * 3600)),
            dry_run_skips_approval: true,
            preview: true,
        }
    }
}

/// Dispatch, retry and timeout settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Attempts per step for transient failures and timeouts (1 = no retry).
    pub max_attempts: u32,
    /// First retry backoff; doubles each attempt (with jitter), capped at 60 s.
    #[serde(with = "secs")]
    pub retry_backoff: Duration,
    /// A step with no result after this (or the action's `timeout_seconds`) timed out.
    #[serde(with = "secs")]
    pub step_timeout: Duration,
    /// After a cancel of a running step, wait this long for the agent to confirm.
    #[serde(with = "secs")]
    pub cancel_timeout: Duration,
    /// Heartbeats older than this do not count as capacity.
    #[serde(with = "secs")]
    pub heartbeat_max_age: Duration,
    /// Steps claimed per dispatch round.
    pub batch: u32,
    /// Background sweep interval (dispatch, timeouts, expiry) when nothing wakes it earlier.
    #[serde(with = "secs")]
    pub tick: Duration,
    /// Planners (LLM calls, the offline planner) running at once; storing their plans
    /// does not hold a slot.
    pub planning_concurrency: usize,
    /// Unacked deliveries held per consumer.
    pub prefetch: u16,
    /// The lease on a request being planned, renewed every third of it while planning
    /// runs; a request whose planner died is resumed once it lapses.
    #[serde(with = "secs")]
    pub planning_lease: Duration,
    /// How long an automatic dry run before approval may take before it shows as failed.
    #[serde(with = "secs")]
    pub preview_timeout: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            max_attempts: 3,
            retry_backoff: Duration::from_secs(2),
            step_timeout: Duration::from_secs(3600),
            cancel_timeout: Duration::from_secs(30),
            heartbeat_max_age: Duration::from_secs(60),
            batch: 64,
            tick: Duration::from_millis(500),
            planning_concurrency: 8,
            prefetch: 64,
            preview_timeout: Duration::from_secs(120),
            planning_lease: Duration::from_secs(30),
        }
    }
}

/// Who may publish what on the bus (SECURITY.md). The broker authenticates every
/// publisher: RabbitMQ refuses a message whose `user_id` property is not the publishing
/// connection's user, so [`crate::transport::Delivery::publisher`] can be trusted. A
/// message without one is refused outright. The engine then decides:
/// - heartbeats, `work_status`, `work_result` and `error` only from agent users; a step's
///   attempt is bound to the agent it was dispatched to (or the first agent user that
///   reports on it), and everything else about that attempt is refused;
/// - `user_request` only from requester users, recorded as submitted by `bus:USER`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusAuthConfig {
    /// Broker users that may act as agents. Empty: every authenticated publisher may (a
    /// broker with one shared user; the server warns at start).
    pub agent_users: Vec<String>,
    /// Broker users that may submit requests on `orchestrator.requests`. Empty: every
    /// authenticated publisher that is not an agent user.
    pub requester_users: Vec<String>,
}

impl BusAuthConfig {
    /// Whether agent users are named (otherwise any authenticated publisher is an agent).
    pub fn is_open(&self) -> bool {
        self.agent_users.is_empty()
    }

    pub fn may_act_as_agent(&self, user: &str) -> bool {
        self.agent_users.is_empty() || self.agent_users.iter().any(|u| u == user)
    }

    pub fn may_submit(&self, user: &str) -> bool {
        if self.requester_users.is_empty() {
            self.agent_users.is_empty() || !self.agent_users.iter().any(|u| u == user)
        } else {
            self.requester_users.iter().any(|u| u == user)
        }
    }
}

/// The engine's configuration (a section of the TOML file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Names this instance in step claims and logs; unique per process.
    pub instance_id: String,
    pub approval: ApprovalConfig,
    pub dispatch: DispatchConfig,
    /// Monthly budgets per provider (USD), shown by `costs`.
    pub budgets: BTreeMap<String, f64>,
    /// Who may publish what on the bus.
    pub bus: BusAuthConfig,
    /// Secrets struck from what the engine persists: audit entries and a request's error
    /// (see [`crate::redact`]). The binaries fill it from every secret they read; never
    /// serialised.
    #[serde(skip)]
    pub redactor: crate::redact::Redactor,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            instance_id: format!("engine-{}", Uuid::new_v4().simple()),
            approval: ApprovalConfig::default(),
            dispatch: DispatchConfig::default(),
            budgets: BTreeMap::new(),
            bus: BusAuthConfig::default(),
            redactor: Default::default(),
        }
    }
}

/// Errors of the engine's operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("request {0} not found")]
    NotFound(Uuid),
    #[error("request {id} is {status}: cannot {action}")]
    IllegalTransition {
        id: Uuid,
        status: String,
        action: &'static str,
    },
    #[error("four-eyes rule: {approver} requested {id} and cannot approve it")]
    FourEyes { id: Uuid, approver: String },
    /// A bus message from a publisher that may not send it.
    #[error("publisher not allowed: {0}")]
    PublisherNotAllowed(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::NotFound(_) => ErrorCode::NotFound,
            EngineError::IllegalTransition { .. } => ErrorCode::IllegalTransition,
            EngineError::FourEyes { .. } => ErrorCode::FourEyesViolation,
            EngineError::Invalid(_) => ErrorCode::BadRequest,
            EngineError::PublisherNotAllowed(_) => ErrorCode::PublisherNotAllowed,
            EngineError::Store(e) => e.code(),
            EngineError::Transport(e) => e.code(),
            EngineError::Catalog(e) => e.code(),
        }
    }
}

/// LLM spend of one provider this month against its budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostLine {
    pub provider: String,
    pub month: String,
    pub spent_usd: f64,
    pub reserved_usd: f64,
    /// `None`: no budget configured (free or unlimited).
    pub budget_usd: Option<f64>,
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: String,
    pub store: String,
    pub bus: String,
    /// The git audit trail: `ok`, or the last commit's failure until one succeeds.
    pub audit: String,
    pub store_backend: String,
    pub bus_backend: String,
    pub instance_id: String,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    pub dispatched_total: u64,
    pub results_total: u64,
    pub duplicate_results_total: u64,
    /// Bus messages refused for their publisher (none, not allowed, another agent's task).
    pub refused_messages_total: u64,
    /// Messages dead-lettered after failing [`MAX_FAILED_DELIVERIES`] times.
    pub dead_lettered_after_retries_total: u64,
    pub retries_total: u64,
    pub timeouts_total: u64,
    /// Dispatch-to-result latency histogram: (upper bound in seconds, cumulative count).
    pub latency_buckets: Vec<(f64, u64)>,
    pub latency_sum_seconds: f64,
    pub latency_count: u64,
}

/// Everything the engine is built from.
pub struct EngineParts {
    pub store: Arc<dyn Store>,
    pub transport: Arc<dyn Transport>,
    pub planner: Arc<dyn PlanProvider>,
    pub catalog: Arc<Catalog>,
    /// The git audit trail; `None` disables commits (tests of other parts).
    pub git: Option<Arc<GitTrail>>,
    pub config: EngineConfig,
}

/// The orchestrator engine. Clone it freely: clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<lifecycle::Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("instance", &self.inner.config.instance_id)
            .finish()
    }
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

mod secs_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<f64>::deserialize(d)? {
            Some(v) => Duration::try_from_secs_f64(v)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

/// Runs a store call again while the database is unavailable (a restart, a cut
/// connection): up to 6 tries over about 6 s, with the shared backoff. Other errors, and
/// the last unavailability, are returned.
pub(crate) async fn with_store_retry<T, F, Fut>(mut call: F) -> Result<T, crate::store::StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
{
    let backoff = crate::retry::Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(3),
    };
    let mut retry = 0;
    loop {
        match call().await {
            Err(crate::store::StoreError::Unavailable(_)) if retry < 5 => {
                retry += 1;
                tokio::time::sleep(backoff.delay(retry)).await;
            }
            other => return other,
        }
    }
}
