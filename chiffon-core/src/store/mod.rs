//! The `Store` trait: everything the engine persists, behind one mockable boundary.
//!
//! Two implementations with the same behaviour, written once (`store/sql.rs`: the statements,
//! over a small dialect per database) and checked by one conformance suite
//! ([`conformance`], behind the `test-utils` feature):
//! - [`postgres::PgStore`] (feature `postgres`): the production store; several orchestrator
//!   instances may share one database.
//! - [`sqlite::SqliteStore`] (feature `sqlite`): the embedded default (`sqlite://PATH`).
//!
//! Architecture invariant: every status change is conditional on the current status
//! (`UPDATE … WHERE status = $from`), so concurrent engines never overwrite each other; a
//! change that lost the race is a [`StoreError::Conflict`] naming the status found.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

use chiffon_protocol::{ErrorCode, Heartbeat};

use crate::model::*;

#[cfg(feature = "test-utils")]
pub mod conformance;
// The one SQL implementation both backends expand (its macros must come first).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[macro_use]
mod sql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod waves;

/// Errors of a [`Store`]. Backend errors are boxed so sqlx types never leak.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{what} not found")]
    NotFound { what: String },
    /// A conditional update found another status (or a duplicate key).
    #[error("conflict: {message}")]
    Conflict {
        message: String,
        current: Option<String>,
    },
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("migration failed: {0}")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NotFound { .. } => ErrorCode::NotFound,
            StoreError::Conflict { .. } => ErrorCode::Conflict,
            StoreError::Unavailable(_) => ErrorCode::StoreUnavailable,
            StoreError::Migration(_) => ErrorCode::MigrationFailed,
            StoreError::Corrupt(_) => ErrorCode::AuditChainBroken,
            StoreError::Backend(_) => ErrorCode::Internal,
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        StoreError::NotFound { what: what.into() }
    }
}

/// `plan_steps.preview_status` of a preview.
pub(crate) fn preview_status_str(s: crate::model::PreviewStatus) -> &'static str {
    match s {
        crate::model::PreviewStatus::Pending => "pending",
        crate::model::PreviewStatus::Completed => "completed",
        crate::model::PreviewStatus::Failed => "failed",
    }
}

/// How long an agent must be silent before another broker user may register its id.
pub const AGENT_TAKEOVER_AFTER: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// Requests (`tasks`): creation, conditional status changes, planning leases.
#[async_trait]
pub trait Requests: Send + Sync {
    /// Inserts a request in status `planning`. A duplicate id is a `Conflict`.
    async fn create_request(&self, req: &NewRequest) -> Result<Request, StoreError>;

    async fn get_request(&self, id: Uuid) -> Result<Request, StoreError>;

    /// The requests of these ids that exist, in no particular order (one read for many).
    async fn get_requests(&self, ids: &[Uuid]) -> Result<Vec<Request>, StoreError>;

    /// Newest first.
    async fn list_requests(&self, filter: &RequestFilter) -> Result<Vec<Request>, StoreError>;

    /// Moves a request from `from` to `to` and applies `patch`, atomically and only if its
    /// status is still `from`; otherwise `Conflict` with the status found. Checks
    /// [`RequestStatus::can_transition_to`]. A patch with a plan also inserts its steps
    /// (status `pending`, fresh task ids) in the same transaction; entering `queued` makes
    /// the first step `ready` (it joins the dispatch queue) in it too.
    async fn transition(
        &self,
        id: Uuid,
        from: RequestStatus,
        to: RequestStatus,
        patch: &RequestPatch,
    ) -> Result<Request, StoreError>;

    /// Several writes in one transaction, in order: the engine's group commit. A `Create`
    /// inserts a request as [`Requests::create_request`] (a duplicate id is a `Conflict` in
    /// its slot); each transition is checked and applied as [`Requests::transition`], its
    /// outcome in its slot (a status found changed, or an unknown request, is an error there
    /// and changes nothing); a `Step` change likewise, as [`Steps::update_step`], with its
    /// log lines; an `Audit` write's slot is `Appended`. The entries of the writes that
    /// applied are appended in order, under one lock of the chain's head, and each request
    /// created or changed names its newest entry (`audit_seq`). An
    /// error of the group itself (the database; steps that cannot be written) is the outer
    /// error: nothing of the group is stored. Groups may be committed side by side (up to
    /// [`Requests::concurrent_groups`]): the chain takes their entries in the order they
    /// commit.
    async fn commit_group(
        &self,
        writes: &[GroupWrite],
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError>;

    /// How many group commits the engine may run at once on this store: more than one
    /// where the database runs transactions side by side (each group waits for the
    /// chain's head only for its last statements), one where a write transaction holds the
    /// whole database.
    fn concurrent_groups(&self) -> usize {
        1
    }

    /// Records the audit commit of a request (any status); only sets it once.
    async fn set_commit_id(&self, id: Uuid, commit_id: &str) -> Result<(), StoreError>;

    /// Requests that ended after approval (`completed`, `failed`, `cancelled` with an
    /// approver) and updated before `ended_before`, whose git record is neither written
    /// (no commit id) nor refused for good (a `Commit` write with an error): the git
    /// trail's durable backlog, oldest first.
    async fn uncommitted(
        &self,
        ended_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Request>, StoreError>;

    /// How many requests are in each status (for `/metrics`).
    async fn request_counts(&self) -> Result<Vec<(RequestStatus, u64)>, StoreError>;

    /// Claims (or renews) the planning of request `id` for `owner` until now + `lease`:
    /// only while it is `planning` and nobody else holds an unexpired claim. Returns whether
    /// `owner` holds it now.
    async fn claim_planning(
        &self,
        id: Uuid,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError>;

    /// Requests in `planning` nobody is planning: their claim lapsed, or they were never
    /// claimed and last changed before `stale_unleased`. Oldest first.
    async fn planning_to_resume(
        &self,
        stale_unleased: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Request>, StoreError>;
}

/// A plan's steps (`plan_steps`): conditional updates, dispatch claims, publisher binding, dry-run previews, deadlines.
#[async_trait]
pub trait Steps: Send + Sync {
    /// Outbox messages stored before `before`, oldest first: the ones whose publish never
    /// happened (or was never confirmed).
    async fn outbox_due(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<OutboxMessage>, StoreError>;

    /// A request's steps in plan order.
    async fn steps(&self, request_id: Uuid) -> Result<Vec<Step>, StoreError>;

    /// The steps of several requests, each request's in plan order (a request without
    /// steps, or unknown, is absent). The SQL stores read them in one statement; the
    /// default reads them one request at a time.
    async fn steps_of(
        &self,
        request_ids: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, Vec<Step>>, StoreError> {
        let mut out = std::collections::HashMap::with_capacity(request_ids.len());
        for id in request_ids {
            match self.steps(*id).await {
                Ok(steps) if !steps.is_empty() => {
                    out.insert(*id, steps);
                }
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn get_step(&self, task_id: Uuid) -> Result<Step, StoreError>;

    /// Moves a step to `to` and applies `patch`, only if its status is one of `from`;
    /// otherwise `Conflict`. Also releases any dispatch claim on it.
    async fn update_step(
        &self,
        task_id: Uuid,
        from: &[StepStatus],
        to: StepStatus,
        patch: &StepPatch,
    ) -> Result<Step, StoreError>;

    /// Claims up to `limit` `ready` steps whose `not_before` has passed and that no one else
    /// holds, oldest `ready_at` first, for `lease`. Two concurrent claimers never get the
    /// same step (PostgreSQL: `FOR UPDATE SKIP LOCKED`).
    async fn claim_ready_steps(
        &self,
        owner: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<Step>, StoreError>;

    /// Gives a claimed step back without changing it (no agent had room).
    async fn release_step(&self, task_id: Uuid, owner: &str) -> Result<(), StoreError>;

    /// Binds the step's attempt `attempt` (if it is the current one) to the publisher
    /// `broker_user`, unless that attempt is already bound to another publisher. Returns
    /// whether `broker_user` is now the attempt's publisher.
    async fn bind_step_publisher(
        &self,
        task_id: Uuid,
        attempt: u32,
        broker_user: &str,
    ) -> Result<bool, StoreError>;

    /// Records that the step's automatic dry run was published (`preview.task_id`,
    /// status `pending`), replacing an earlier one.
    async fn start_step_preview(
        &self,
        task_id: Uuid,
        preview: &StepPreview,
    ) -> Result<(), StoreError>;

    /// The step whose dry-run task is `preview_task_id`, if any.
    async fn step_by_preview(&self, preview_task_id: Uuid) -> Result<Option<Step>, StoreError>;

    /// Stores the dry run's outcome, once: only while that preview task is still pending.
    /// Returns whether it was stored.
    async fn finish_step_preview(
        &self,
        task_id: Uuid,
        preview: &StepPreview,
    ) -> Result<bool, StoreError>;

    /// Steps `dispatched` or `running` whose `deadline_at` is before `now`.
    async fn overdue_steps(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Step>, StoreError>;
}

/// Execution logs (`execution_logs`).
#[async_trait]
pub trait Logs: Send + Sync {
    async fn append_logs(&self, lines: &[NewLogLine]) -> Result<(), StoreError>;

    /// A request's log lines in order, after `after_id` if given.
    async fn logs(
        &self,
        request_id: Uuid,
        after_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LogLine>, StoreError>;
}

/// Agents and their resource metrics (`agents`, `resource_metrics`).
#[async_trait]
pub trait Agents: Send + Sync {
    /// Upserts the agent and appends a `resource_metrics` row.
    /// `broker_user` is the publisher the broker authenticated. An agent id registered by
    /// another broker user is refused (`Conflict`) until that agent has been silent for
    /// [`AGENT_TAKEOVER_AFTER`].
    async fn record_heartbeat(
        &self,
        hb: &Heartbeat,
        at: DateTime<Utc>,
        broker_user: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Every agent seen, with its last heartbeat.
    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
}

/// LLM spend against monthly budgets (`llm_budget`, `llm_usage`): reservations and settlements.
#[async_trait]
pub trait BudgetLedger: Send + Sync {
    /// Atomically reserves `amount_micros` against the provider's monthly budget: succeeds
    /// only if settled spend + open reservations + amount <= budget, even with concurrent
    /// reservers on several instances. A reservation counts until it is settled or its
    /// [`LlmReservation::lease`] has passed (a crashed caller's reservation then stops
    /// holding budget).
    async fn reserve_llm(&self, r: &LlmReservation) -> Result<Reservation, StoreError>;

    /// Replaces a reservation by the real cost and token counts (in full, also when the
    /// cost passes what was reserved, and also after the lease has passed).
    async fn settle_llm(&self, reservation: Uuid, s: &LlmSettlement) -> Result<(), StoreError>;

    /// Spend per provider for `month` (`YYYY-MM`).
    async fn llm_spend(&self, month: &str) -> Result<Vec<ProviderSpend>, StoreError>;
}

/// Plans reused for the same request and catalog (`plan_cache`).
#[async_trait]
pub trait PlanCache: Send + Sync {
    async fn cached_plan(&self, key: &str) -> Result<Option<Plan>, StoreError>;

    async fn cache_plan(&self, key: &str, plan: &Plan) -> Result<(), StoreError>;
}

/// The append-only, hash-chained audit log (`audit_log`, `audit_head`).
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Appends entries in order, chaining each to the one before; safe with concurrent
    /// appenders on several instances (the chain never forks).
    async fn append_audit(&self, entries: &[NewAuditEntry]) -> Result<Vec<AuditEntry>, StoreError>;

    /// Entries in seq order, for one request or all, after `after_seq`.
    async fn audit_log(
        &self,
        request_id: Option<Uuid>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;

    /// Recomputes the whole chain; detects altered, inserted or deleted rows.
    async fn verify_audit(&self) -> Result<AuditVerification, StoreError>;

    /// The audit chain's head: the last sequence number and its hash.
    async fn audit_head(&self) -> Result<(i64, String), StoreError>;

    /// The hash of audit entry `seq`, if it exists.
    async fn audit_hash_at(&self, seq: i64) -> Result<Option<String>, StoreError>;
}

/// Persistence for the engine: the sum of one small trait per concern, each mockable on
/// its own. Object-safe: the engine holds an `Arc<dyn Store>` (whose methods need no import).
#[async_trait]
pub trait Store:
    Requests + Steps + Logs + Agents + BudgetLedger + PlanCache + AuditLog + Send + Sync + 'static
{
    /// `postgres` or `sqlite`.
    fn backend(&self) -> &'static str;

    /// Applies pending migrations (also done on connect).
    async fn migrate(&self) -> Result<(), StoreError>;

    /// A cheap round trip (`SELECT 1`).
    async fn health(&self) -> Result<(), StoreError>;
}

/// Whether a reservation fits: settled spend, open (unexpired) reservations and this one
/// within the budget. Once spend alone reaches the budget nothing that costs anything fits,
/// so a provider that billed past its budget is closed for the month.
pub(crate) fn fits_budget(spent: i64, open: i64, r: &LlmReservation) -> bool {
    spent
        .saturating_add(open)
        .saturating_add(r.amount_micros.max(0))
        <= r.budget_micros
}

/// When a reservation made at `at` stops counting. Capped at a year, so the timestamp
/// stays one both databases store and compare as they should.
pub(crate) fn lease_end(at: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    let lease = lease.min(Duration::from_secs(366 * 24 * 3600));
    at + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::zero())
}

/// Opens the store a URL names: `postgres://…`/`postgresql://…` or `sqlite://PATH`
/// (the file and its folder are created). Migrations are applied.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    connect_with(url, None).await
}

/// [`connect`], with the audit chain keyed by `audit_key` (`CHIFFON_AUDIT_KEY`) when given.
pub async fn connect_with(
    url: &str,
    audit_key: Option<crate::audit::chain::AuditKey>,
) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(Arc::new(
            postgres::PgStore::connect(url)
                .await?
                .with_audit_key(audit_key),
        ));
    }
    if url.starts_with("sqlite:") {
        #[cfg(feature = "sqlite")]
        return Ok(Arc::new(
            sqlite::SqliteStore::connect(url)
                .await?
                .with_audit_key(audit_key),
        ));
    }
    drop(audit_key);
    Err(StoreError::Unavailable(
        format!("unsupported database URL `{url}` (expected postgres://… or sqlite://PATH, with the matching feature)").into(),
    ))
}
