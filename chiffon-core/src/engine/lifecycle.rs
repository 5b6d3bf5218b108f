//! The public operations of the engine and the lifecycle decisions they make.

use super::gate;
use crate::audit::{entries, AuditEvent};
use crate::model::{GroupWrite, Written};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chiffon_protocol::{Cancel, Envelope, ErrorCode, ErrorPayload, Message};
use chrono::Utc;
use serde_json::json;
use tokio::sync::{broadcast, Notify, Semaphore};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::*;
use crate::model::{
    micros_to_usd, AgentRecord, AuditEntry, AuditVerification, LogLine, NewAuditEntry, NewRequest,
    RequestFilter, RequestPatch, RequestStatus, StepPatch, StepStatus,
};

/// A git lock file older than this was left by a crashed writer.
pub(super) const STALE_GIT_LOCK: std::time::Duration = std::time::Duration::from_secs(10);

/// A record waiting longer than this for its commit means the trail lags: `/health` says so.
const GIT_LAG_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Status changes kept for a slow notifier.
const STATUS_CHANGES_BACKLOG: usize = 1024;

/// Longest request text accepted.
pub const MAX_TEXT_LEN: usize = 10_000;

const LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 300.0,
];

#[derive(Default)]
pub(super) struct Metrics {
    pub dispatched: AtomicU64,
    pub results: AtomicU64,
    pub duplicates: AtomicU64,
    /// Bus messages refused: no authenticated publisher, or one that may not send them.
    pub refused: AtomicU64,
    /// Messages dead-lettered after failing too many times in a row.
    pub delivery_limit: AtomicU64,
    /// Failed deliveries per message id, for [`MAX_FAILED_DELIVERIES`].
    pub failed_deliveries: Mutex<std::collections::HashMap<Uuid, u32>>,
    pub retries: AtomicU64,
    pub timeouts: AtomicU64,
    latency: Mutex<([u64; LATENCY_BOUNDS.len()], f64, u64)>,
}

impl Metrics {
    pub fn observe_latency(&self, seconds: f64) {
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in LATENCY_BOUNDS.iter().enumerate() {
            if seconds <= *b {
                l.0[i] += 1;
            }
        }
        l.1 += seconds;
        l.2 += 1;
    }
}

/// Writes for the group writer, committed in the same transaction, and where their
/// outcomes go (one slot each, in order).
type GroupJob = (
    Vec<GroupWrite>,
    tokio::sync::oneshot::Sender<Vec<Result<Written, StoreError>>>,
);

/// Most writes one group commit holds.
const GROUP_BATCH: usize = 256;

/// Tries after the first while the database is unavailable: backoff from 100 ms doubling
/// to 1 s (with jitter), about 24 s in all. The pauses stay short because status changes
/// wait on this writer: once the database is back, work goes on within a second.
const GROUP_RETRIES: u32 = 34;

/// The same error again, for each waiter of a group that failed whole.
pub(super) fn each_waiter(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(_) => StoreError::Unavailable(e.to_string().into()),
        StoreError::NotFound { what } => StoreError::not_found(what.clone()),
        StoreError::Conflict { message, current } => StoreError::Conflict {
            message: message.clone(),
            current: current.clone(),
        },
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        _ => StoreError::Backend(e.to_string().into()),
    }
}

/// The first failure among a group's slots other than a lost race (a `Conflict`: changed
/// meanwhile, which the caller accepts).
fn failed(slots: &[Result<Written, StoreError>]) -> Option<EngineError> {
    slots.iter().find_map(|slot| match slot {
        Err(StoreError::Conflict { .. }) | Ok(_) => None,
        Err(e) => Some(each_waiter(e).into()),
    })
}

/// How long a write nobody waits on (see [`can_wait`]) may be held back for a group that
/// commits anyway.
const HOLD_BACK: std::time::Duration = std::time::Duration::from_millis(50);

/// Writes no decision waits on: outbox rows the broker confirmed (the relay looks only at
/// rows older than [`super::runtime::OUTBOX_AFTER`]) and the git trail's commit ids. They
/// ride along with the next group commit rather than costing one of their own (at most
/// [`HOLD_BACK`] later).
fn can_wait(job: &GroupJob) -> bool {
    job.0
        .iter()
        .all(|w| matches!(w, GroupWrite::Sent(_) | GroupWrite::Commit { .. }))
}

/// Group commit for request status changes and audit entries: the writes of concurrent
/// callers are committed in one transaction ([`Store::commit_group`]): each status change
/// with its own entries, the chain's head locked once per group, not once per decision.
/// Each caller waits for its own outcome. Writes nobody waits on ([`can_wait`]) join the
/// next group instead of committing alone. A database that is restarting is waited for
/// (up to about 24 s). A group that fails for one write's sake (steps that cannot be
/// written) is split: each write is tried alone, so only that one fails.
///
/// Up to [`Store::concurrent_groups`] groups commit at once (two on PostgreSQL): the next
/// group is gathered when one finishes, so it holds everything that arrived meanwhile.
fn spawn_group_writer(store: Arc<dyn Store>) -> tokio::sync::mpsc::Sender<GroupJob> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<GroupJob>(1024);
    tokio::spawn(async move {
        // Jobs held back, and since when.
        let mut held: Vec<GroupJob> = Vec::new();
        let mut held_since = tokio::time::Instant::now();
        let mut open = true;
        let lanes = store.concurrent_groups().max(1);
        let slots = Arc::new(tokio::sync::Semaphore::new(lanes));
        while open || !held.is_empty() {
            // A free lane first: jobs arriving while every lane is busy join the next group.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let next = if held.is_empty() {
                rx.recv().await
            } else if open {
                tokio::time::timeout_at(held_since + HOLD_BACK, rx.recv())
                    .await
                    .unwrap_or(None)
            } else {
                None
            };
            let mut jobs = Vec::new();
            let mut n = 0;
            match next {
                Some(job) => {
                    n += job.0.len();
                    jobs.push(job);
                }
                // Closed, or held back long enough: what is held commits now.
                None => open = !rx.is_closed() && open,
            }
            while n < GROUP_BATCH && !jobs.is_empty() {
                match rx.try_recv() {
                    Ok(job) => {
                        n += job.0.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            let urgent = jobs.iter().any(|j| !can_wait(j));
            let waited = held_since.elapsed() >= HOLD_BACK;
            if !jobs.is_empty() && !urgent && open && (held.is_empty() || !waited) {
                if held.is_empty() {
                    held_since = tokio::time::Instant::now();
                }
                held.extend(jobs);
                continue;
            }
            jobs.append(&mut held);
            if jobs.is_empty() {
                continue;
            }
            let store = store.clone();
            tokio::spawn(async move {
                commit_jobs(store.as_ref(), jobs).await;
                drop(slot);
            });
        }
        // Every group in progress ends before the writer does.
        let _ = slots.acquire_many(lanes as u32).await;
    });
    tx
}

/// Commits the jobs as one group and answers each its outcomes; a group that fails for one
/// job's sake is split, each job tried alone.
async fn commit_jobs(store: &dyn Store, jobs: Vec<GroupJob>) {
    let sizes: Vec<usize> = jobs.iter().map(|j| j.0.len()).collect();
    let (writes, waiters): (Vec<Vec<GroupWrite>>, Vec<_>) = jobs.into_iter().unzip();
    let all: Vec<GroupWrite> = writes.iter().flatten().cloned().collect();
    match commit_retrying(store, &all).await {
        Ok(slots) => {
            let mut slots = slots.into_iter();
            for (size, done) in sizes.into_iter().zip(waiters) {
                let _ = done.send(slots.by_ref().take(size).collect());
            }
        }
        Err(e) if writes.len() > 1 && !e.is_transient() => {
            // Each job alone: only the one that cannot be written fails.
            for (w, done) in writes.iter().zip(waiters) {
                let slots = match commit_retrying(store, w).await {
                    Ok(slots) => slots,
                    Err(e) => w.iter().map(|_| Err(each_waiter(&e))).collect(),
                };
                let _ = done.send(slots);
            }
        }
        Err(e) => {
            for (w, done) in writes.iter().zip(waiters) {
                let _ = done.send(w.iter().map(|_| Err(each_waiter(&e))).collect());
            }
        }
    }
}

/// [`Store::commit_group`], waiting through an outage. Only an outage is retried; if a
/// commit succeeded but its answer was lost, the retry finds the status changes made (each
/// a conflict now, stored once) and appends the plain entries again (a duplicate in the log
/// rather than a decision missing from it).
async fn commit_retrying(
    store: &dyn Store,
    writes: &[GroupWrite],
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let backoff = crate::retry::Backoff {
        initial: std::time::Duration::from_millis(100),
        max: std::time::Duration::from_secs(1),
    };
    let mut retry = 0;
    loop {
        match store.commit_group(writes).await {
            Err(e @ StoreError::Unavailable(_)) if retry < GROUP_RETRIES => {
                retry += 1;
                tracing::warn!(error = %e, writes = writes.len(), retry, "group commit waits for the database");
                tokio::time::sleep(backoff.delay(retry)).await;
            }
            other => return other,
        }
    }
}

/// Most records one git batch commits.
pub(super) const GIT_BATCH: usize = 256;

/// Memory (GiB) promised to an agent by one dispatch: (task, GiB, dispatched at).
pub(super) type Reservation = (Uuid, f64, chrono::DateTime<Utc>);

pub(super) struct Inner {
    pub store: Arc<dyn Store>,
    pub transport: Arc<dyn Transport>,
    pub planner: Arc<dyn PlanProvider>,
    pub catalog: Arc<Catalog>,
    pub git: Option<Arc<GitTrail>>,
    pub config: EngineConfig,
    pub events: EventHub,
    /// Wakes the dispatcher (approval, result, heartbeat).
    pub wake: Notify,
    pub planning: Arc<Semaphore>,
    pub tasks: TaskTracker,
    pub metrics: Metrics,
    pub declared: Mutex<std::collections::HashSet<String>>,
    /// The group-commit task for new requests, status changes and audit entries, started on
    /// first use.
    pub group_writer: std::sync::OnceLock<tokio::sync::mpsc::Sender<GroupJob>>,
    /// The git trail's writer ([`super::trail`]), started on first use.
    pub git_writer: std::sync::OnceLock<tokio::sync::mpsc::Sender<super::trail::TrailJob>>,
    /// Since when the git writer has had records waiting (unset when it has none): `/health`
    /// is degraded while that is longer than [`GIT_LAG_LIMIT`].
    pub git_busy_since: Arc<Mutex<Option<std::time::Instant>>>,
    /// Requests this instance is planning now.
    pub planning_now: Mutex<std::collections::HashSet<Uuid>>,
    /// Requests someone waits on in [`Engine::wait_until`] (how many waiters), with the
    /// newest version this instance stored: a waiter told of the status it waits for takes
    /// it from here instead of reading it back.
    pub waited: Mutex<std::collections::HashMap<Uuid, (usize, Option<Request>)>>,
    /// Memory promised to agents by dispatches their last heartbeat cannot show yet:
    /// agent id → (task, GiB, dispatched at).
    pub reservations: Mutex<std::collections::HashMap<String, Vec<Reservation>>>,
    /// Senders whose messages were dead-lettered, for `GET /agents` and quiet logs.
    pub rejected: super::rejected::RejectedLog,
    /// Every request status change this instance made, for notifiers (webhooks). Bounded:
    /// a receiver that falls behind loses the oldest, never slows the engine.
    pub status_changes: broadcast::Sender<Request>,
    /// The last git trail failure, cleared by the next commit that succeeds: `/health` is
    /// degraded while it is set.
    pub git_error: Mutex<Option<String>>,
}

/// The result of verifying the audit trail: the hash chain and the git commits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    pub chain: AuditVerification,
    /// Terminal requests that were approved and have no audit commit.
    pub missing_commits: Vec<Uuid>,
    /// Finished requests whose git record does not verify: missing at the tip, changed
    /// after it was written, its commit not in the branch's history, or no audit entries.
    #[serde(default)]
    pub record_problems: Vec<crate::audit::git::RecordProblem>,
    /// The newest chain head anchored in git, and whether the log still agrees with it.
    #[serde(default)]
    pub anchor: Option<String>,
    /// Everything wrong, in words.
    #[serde(default)]
    pub problems: Vec<String>,
    pub ok: bool,
}

impl Engine {
    /// Builds an engine; call [`Engine::run`] to start its background work.
    pub fn new(parts: EngineParts) -> Engine {
        let planning = Arc::new(Semaphore::new(
            parts.config.dispatch.planning_concurrency.max(1),
        ));
        Engine {
            inner: Arc::new(Inner {
                store: parts.store,
                transport: parts.transport,
                planner: parts.planner,
                catalog: parts.catalog,
                git: parts.git,
                config: parts.config,
                events: EventHub::default(),
                wake: Notify::new(),
                planning,
                tasks: TaskTracker::new(),
                metrics: Metrics::default(),
                declared: Mutex::new(Default::default()),
                reservations: Mutex::new(Default::default()),
                planning_now: Mutex::new(Default::default()),
                waited: Mutex::new(Default::default()),
                group_writer: std::sync::OnceLock::new(),
                git_writer: std::sync::OnceLock::new(),
                git_busy_since: Arc::new(Mutex::new(None)),
                rejected: Default::default(),
                status_changes: broadcast::channel(STATUS_CHANGES_BACKLOG).0,
                git_error: Mutex::new(None),
            }),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.inner.catalog
    }

    /// Accepts a request: stores it (`planning`), audits it, and plans it in the background.
    /// Submitting an existing `request_id` again returns that request unchanged.
    pub async fn submit(&self, req: SubmitRequest) -> Result<Request, EngineError> {
        let text = req.text.trim().to_string();
        if text.is_empty() {
            return Err(EngineError::Invalid("text must not be empty".into()));
        }
        if [
            &text,
            req.requester.as_deref().unwrap_or_default(),
            req.submitted_by.as_deref().unwrap_or_default(),
        ]
        .iter()
        .any(|s| s.contains('\0'))
        {
            return Err(EngineError::Invalid(
                "text and requester must not contain NUL characters".into(),
            ));
        }
        if text.len() > MAX_TEXT_LEN {
            return Err(EngineError::Invalid(format!(
                "text is longer than {MAX_TEXT_LEN} bytes"
            )));
        }
        let new = NewRequest {
            id: req.request_id.unwrap_or_else(Uuid::now_v7),
            trace_id: req
                .trace_id
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| Uuid::new_v4().simple().to_string()),
            text,
            requester: req
                .requester
                .clone()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "anonymous".into()),
            submitted_by: req
                .submitted_by
                .or(req.requester)
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "anonymous".into()),
            dry_run: req.dry_run,
        };
        // Stored with its `received` entry, group-committed with other callers' writes; a
        // resubmitted id stores neither again.
        let received = vec![NewAuditEntry {
            request_id: Some(new.id),
            actor: new.requester.clone(),
            event: AuditEvent::Received,
            details: json!({ "text": new.text, "dry_run": new.dry_run, "trace_id": new.trace_id }),
        }];
        let id = new.id;
        // Born claimed for planning by this instance (its lease in the same transaction):
        // a planner that dies is replaced once the lease lapses.
        let mut slots = self
            .group_writes(vec![
                GroupWrite::Create {
                    request: Box::new(new),
                    audit: received,
                },
                GroupWrite::ClaimPlanning {
                    id,
                    owner: self.inner.config.instance_id.clone(),
                    lease: self.inner.config.dispatch.planning_lease,
                },
            ])
            .await
            .into_iter();
        let created = slots.next().unwrap_or_else(|| {
            Err(StoreError::Corrupt(
                "a new request without its outcome".into(),
            ))
        });
        let claimed = matches!(slots.next(), Some(Ok(_)));
        let request = match created {
            Ok(Written::Request(r)) => r,
            Err(StoreError::Conflict { .. }) => {
                return Ok(self.inner.store.get_request(id).await?)
            }
            Ok(_) => return Err(StoreError::Corrupt("a new request without its row".into()).into()),
            Err(e) => return Err(e.into()),
        };
        let engine = self.clone();
        let r = request.clone();
        self.inner
            .tasks
            .spawn(async move { engine.plan_request(r, claimed).await });
        Ok(request)
    }

    /// Plans a request in `planning` and moves it on: to `awaiting_approval`, straight to
    /// `queued` under an auto-approval rule, `rejected` above the cost limit, or `failed`.
    /// `claimed`: this instance holds its planning lease already (it just created it).
    pub(super) async fn plan_request(&self, request: Request, claimed: bool) {
        // One planning per request per instance (the sweeper may find it stale meanwhile).
        if !self
            .inner
            .planning_now
            .lock()
            .map(|mut s| s.insert(request.id))
            .unwrap_or(false)
        {
            return;
        }
        struct Done<'a>(&'a Inner, Uuid);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                if let Ok(mut s) = self.0.planning_now.lock() {
                    s.remove(&self.1);
                }
            }
        }
        let _done = Done(&self.inner, request.id);
        let waiting = std::time::Instant::now();
        let Ok(permit) = self.inner.planning.clone().acquire_owned().await else {
            return;
        };
        // A lease taken at creation may have lapsed while the request waited for a planning
        // slot (another instance may hold it now): then it is claimed again, as any other.
        let claimed = claimed && waiting.elapsed() < self.inner.config.dispatch.planning_lease / 3;
        // Planning is claimed with a lease, renewed while it runs: another instance (or
        // this one after a restart) resumes a request whose planner died once the lease
        // lapses, and never plans one someone else is planning.
        let lease = self.inner.config.dispatch.planning_lease;
        let owner = self.inner.config.instance_id.clone();
        // A cut connection is waited through: a request never claimed is resumed by the
        // sweeper only after STALE_PLANNING (it may be waiting for a planning slot).
        let claim = async {
            if claimed {
                return Ok(true);
            }
            with_store_retry(|| self.inner.store.claim_planning(request.id, &owner, lease)).await
        };
        match claim.await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(request = %request.id, "planned elsewhere (or no longer planning)");
                return;
            }
            Err(e) => {
                tracing::warn!(request = %request.id, error = %e, "planning not claimed; the sweeper retries");
                return;
            }
        }
        let renewing = {
            let store = self.inner.store.clone();
            let id = request.id;
            let owner = owner.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    match store.claim_planning(id, &owner, lease).await {
                        Ok(true) => {}
                        // Ended (no longer planning) or taken over: stop renewing.
                        Ok(false) => break,
                        Err(e) => {
                            tracing::warn!(request = %id, error = %e, "planning lease not renewed")
                        }
                    }
                }
            })
        };
        struct Abort(tokio::task::JoinHandle<()>);
        impl Drop for Abort {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _renewing = Abort(renewing);
        let input = PlanInput {
            request_id: request.id,
            text: request.text.clone(),
            dry_run: request.dry_run,
        };
        let outcome = self.inner.planner.plan(&input).await;
        // The slot bounds planners (LLM calls) at once, not requests waiting for their
        // plan to be stored: it is free for the next one now. (Held through the store
        // write, it capped the whole engine at `planning_concurrency` group commits' worth
        // of requests.) The lease is still renewed until the plan is stored.
        drop(permit);
        let mut audit = match &outcome {
            Ok(o) => entries::planning(request.id, &o.events, Some(&o.usage)),
            Err(f) => entries::planning(request.id, &f.events, None),
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(f) => {
                audit.push(NewAuditEntry {
                    request_id: Some(request.id),
                    actor: "planner".into(),
                    event: AuditEvent::PlanFailed,
                    details: json!({ "code": f.code.code(), "message": f.message, "details": f.details }),
                });
                let patch = RequestPatch {
                    error: Some(ErrorPayload {
                        details: f.details,
                        ..ErrorPayload::new(f.code, f.message)
                    }),
                    audit,
                    ..Default::default()
                };
                self.set_status(
                    request.id,
                    RequestStatus::Planning,
                    RequestStatus::Failed,
                    patch,
                )
                .await
                .ok();
                return;
            }
        };
        let plan = outcome.plan;
        if request.dry_run {
            if let Some(step) = plan.steps.iter().find(|s| {
                !self
                    .inner
                    .catalog
                    .actions
                    .get(&s.action)
                    .is_some_and(|a| a.check_mode)
            }) {
                let msg = format!(
                    "dry run impossible: action `{}` has no check mode",
                    step.action
                );
                audit.push(NewAuditEntry {
                    request_id: Some(request.id),
                    actor: "engine".into(),
                    event: AuditEvent::PlanFailed,
                    details: json!({ "code": ErrorCode::ActionNotSupported.code(), "message": msg }),
                });
                let patch = RequestPatch {
                    plan: Some(plan),
                    error: Some(ErrorPayload::new(ErrorCode::ActionNotSupported, msg)),
                    audit,
                    ..Default::default()
                };
                self.set_status(
                    request.id,
                    RequestStatus::Planning,
                    RequestStatus::Failed,
                    patch,
                )
                .await
                .ok();
                return;
            }
        }
        audit.push(NewAuditEntry {
            request_id: Some(request.id),
            actor: "planner".into(),
            event: AuditEvent::Planned,
            details: json!({
                "provider": plan.provider, "model": plan.model, "cached": plan.cached,
                "input_tokens": outcome.usage.input_tokens, "output_tokens": outcome.usage.output_tokens,
                "llm_cost_usd": plan.llm_cost_usd, "estimated_cost_usd": plan.estimated_cost_usd,
                "steps": plan.steps.iter().map(|s| s.action.as_str()).collect::<Vec<_>>(),
                "summary": plan.summary,
            }),
        });
        match gate::after_planning(
            &self.inner.config.approval,
            &self.inner.catalog,
            &request,
            &plan,
        ) {
            gate::PlanGate::Reject {
                actor,
                code,
                reason,
                limit_usd,
            } => {
                audit.push(NewAuditEntry {
                    request_id: Some(request.id),
                    actor: actor.clone(),
                    event: AuditEvent::Rejected,
                    details: json!({ "reason": reason, "limit_usd": limit_usd, "estimated_cost_usd": plan.estimated_cost_usd }),
                });
                let patch = RequestPatch {
                    plan: Some(plan),
                    error: Some(ErrorPayload::new(code, reason)),
                    approver: Some(actor),
                    audit,
                    ..Default::default()
                };
                self.set_status(
                    request.id,
                    RequestStatus::Planning,
                    RequestStatus::Rejected,
                    patch,
                )
                .await
                .ok();
                return;
            }
            gate::PlanGate::AutoApprove { rule } => {
                audit.push(NewAuditEntry {
                    request_id: Some(request.id),
                    actor: format!("policy:{rule}"),
                    event: AuditEvent::AutoApproved,
                    details: json!({ "rule": rule, "estimated_cost_usd": plan.estimated_cost_usd }),
                });
                // Queued with its first step dispatched when it can go straight to its
                // agent type's queue, else ready for the dispatcher (one transaction either
                // way); a plan without steps has nothing to run and ends now.
                let first = plan
                    .steps
                    .first()
                    .and_then(|s| self.dispatch_first(&request, s));
                let patch = RequestPatch {
                    plan: Some(plan),
                    approver: Some(format!("policy:{rule}")),
                    audit,
                    ..Default::default()
                };
                if let Ok(queued) = self
                    .queue_planned(request.id, RequestStatus::Planning, patch, first)
                    .await
                {
                    if queued.plan.as_ref().is_none_or(|p| p.steps.is_empty()) {
                        self.promote_next(request.id).await.ok();
                    }
                }
                return;
            }
            gate::PlanGate::AwaitApproval => {}
        }
        let patch = RequestPatch {
            plan: Some(plan),
            audit,
            ..Default::default()
        };
        if let Ok(waiting) = self
            .set_status(
                request.id,
                RequestStatus::Planning,
                RequestStatus::AwaitingApproval,
                patch,
            )
            .await
        {
            self.start_previews(&waiting).await;
        }
    }

    /// Approves a request awaiting approval; it is queued for dispatch.
    pub async fn approve(
        &self,
        id: Uuid,
        approver: &str,
        comment: Option<String>,
    ) -> Result<Request, EngineError> {
        let request = self.get_request(id).await?;
        if request.status != RequestStatus::AwaitingApproval {
            return Err(EngineError::IllegalTransition {
                id,
                status: request.status.to_string(),
                action: "approve",
            });
        }
        // Authenticated identities are compared: the one that submitted the request (an
        // admin filing it "as bob" is still its submitter) and the requester it names.
        if !gate::may_approve(&self.inner.config.approval, &request, approver) {
            self.audit(vec![NewAuditEntry {
                request_id: Some(id),
                actor: approver.to_string(),
                event: AuditEvent::ApprovalRefused,
                details: json!({
                    "reason": "four-eyes rule: the approver must differ from the submitter and the requester",
                    "submitted_by": request.submitted_by,
                    "requester": request.requester,
                }),
            }])
            .await;
            return Err(EngineError::FourEyes {
                id,
                approver: approver.to_string(),
            });
        }
        let patch = RequestPatch {
            approver: Some(approver.to_string()),
            approval_comment: comment.clone(),
            audit: vec![NewAuditEntry {
                request_id: Some(id),
                actor: approver.to_string(),
                event: AuditEvent::Approved,
                details: json!({ "comment": comment }),
            }],
            ..Default::default()
        };
        let updated = self
            .transition_checked(
                id,
                RequestStatus::AwaitingApproval,
                RequestStatus::Queued,
                patch,
                "approve",
            )
            .await?;
        // Its first step became ready with the change; a plan without steps ends now.
        if updated.plan.as_ref().is_none_or(|p| p.steps.is_empty()) {
            self.promote_next(id).await?;
        }
        Ok(updated)
    }

    /// Rejects a request awaiting approval.
    pub async fn reject(
        &self,
        id: Uuid,
        approver: &str,
        comment: Option<String>,
    ) -> Result<Request, EngineError> {
        let patch = RequestPatch {
            approver: Some(approver.to_string()),
            approval_comment: comment.clone(),
            audit: vec![NewAuditEntry {
                request_id: Some(id),
                actor: approver.to_string(),
                event: AuditEvent::Rejected,
                details: json!({ "comment": comment }),
            }],
            ..Default::default()
        };
        let updated = self
            .transition_checked(
                id,
                RequestStatus::AwaitingApproval,
                RequestStatus::Rejected,
                patch,
                "reject",
            )
            .await?;
        Ok(updated)
    }

    /// Cancels a request in any non-terminal status. A running step is sent `cancel` on
    /// `chiffon.control`; the request ends `cancelled` when the agent confirms or after the
    /// cancel timeout.
    pub async fn cancel(&self, id: Uuid, by: &str) -> Result<Request, EngineError> {
        for _ in 0..5 {
            let request = self.get_request(id).await?;
            if request.status.is_terminal() {
                return Err(EngineError::IllegalTransition {
                    id,
                    status: request.status.to_string(),
                    action: "cancel",
                });
            }
            let steps = self.inner.store.steps(id).await?;
            let now = Utc::now();
            let active: Vec<&Step> = steps
                .iter()
                .filter(|s| matches!(s.status, StepStatus::Dispatched | StepStatus::Running))
                .collect();
            // Steps not started are cancelled now, in the same commit as the decision's
            // entry (with the marks of the running ones, when there are any).
            let mut writes: Vec<GroupWrite> = steps
                .iter()
                .filter(|s| matches!(s.status, StepStatus::Pending | StepStatus::Ready))
                .map(|s| GroupWrite::Step {
                    task_id: s.task_id,
                    from: vec![s.status],
                    to: StepStatus::Cancelled,
                    patch: Box::new(StepPatch {
                        finished_at: Some(now),
                        ..Default::default()
                    }),
                    logs: Vec::new(),
                    audit: Vec::new(),
                })
                .collect();
            let not_started = writes.len();
            if active.is_empty() {
                writes.push(GroupWrite::Audit(vec![NewAuditEntry {
                    request_id: Some(id),
                    actor: by.to_string(),
                    event: AuditEvent::CancelRequested,
                    details: json!({ "from": request.status }),
                }]));
                if let Some(e) = failed(&self.group_writes(writes).await) {
                    return Err(e);
                }
                let error =
                    ErrorPayload::new(ErrorCode::RequestCancelled, format!("cancelled by {by}"));
                self.finish(
                    id,
                    Some(request.status),
                    RequestStatus::Cancelled,
                    Some(error),
                )
                .await?;
                let now = self.get_request(id).await?;
                if now.status == RequestStatus::Cancelled {
                    return Ok(now);
                }
                // The status moved under us (planning finished, a step was dispatched): look again.
                continue;
            }
            let deadline = now
                + chrono::Duration::from_std(self.inner.config.dispatch.cancel_timeout)
                    .unwrap_or_default();
            // Each running step is marked with the request, with its `cancel_requested`
            // entry in the same commit: the decision is in the log exactly when it is made.
            writes.extend(active.iter().map(|s| GroupWrite::Step {
                task_id: s.task_id,
                from: vec![s.status],
                to: s.status,
                patch: Box::new(StepPatch {
                    error: Some(ErrorPayload::new(
                        ErrorCode::TaskCancelled,
                        format!("cancel requested by {by}"),
                    )),
                    deadline_at: Some(deadline),
                    ..Default::default()
                }),
                logs: Vec::new(),
                audit: vec![NewAuditEntry {
                    request_id: Some(id),
                    actor: by.to_string(),
                    event: AuditEvent::CancelRequested,
                    details: json!({ "tasks": [s.task_id] }),
                }],
            }));
            let slots = self.group_writes(writes).await;
            if let Some(e) = failed(&slots) {
                return Err(e);
            }
            for (s, slot) in active.iter().zip(&slots[not_started..]) {
                // It ended (or moved on) meanwhile: nothing to tell its agent.
                if slot.is_err() {
                    continue;
                }
                let env = Envelope::new(
                    request.trace_id.clone(),
                    Some(id),
                    Message::Cancel(Cancel {
                        task_id: s.task_id,
                        reason: Some(format!("cancelled by {by}")),
                    }),
                );
                // Recorded already: if the message cannot go, the step ends at its cancel
                // deadline instead (its timeout reads the cancel request).
                if let Err(e) = self.inner.transport.broadcast(&env).await {
                    tracing::warn!(task = %s.task_id, error = %e, "cancel message not published; the step ends at its cancel deadline");
                }
            }
            return self.get_request(id).await;
        }
        Err(EngineError::Store(StoreError::Conflict {
            message: "the request kept changing while being cancelled".into(),
            current: None,
        }))
    }

    /// A request with its steps.
    pub async fn get(&self, id: Uuid) -> Result<RequestView, EngineError> {
        let request = self.get_request(id).await?;
        let mut steps = self.inner.store.steps(id).await?;
        let now = chrono::Utc::now();
        for s in &mut steps {
            super::preview::settle_overdue(s, now);
        }
        let waiting_reason = if matches!(
            request.status,
            RequestStatus::Queued | RequestStatus::Running
        ) {
            let agents = self.inner.store.agents().await?;
            super::waiting::waiting_reason(
                &request,
                &steps,
                &agents,
                chrono::TimeDelta::from_std(self.inner.config.dispatch.heartbeat_max_age)
                    .unwrap_or(chrono::TimeDelta::MAX),
                chrono::Utc::now(),
            )
        } else {
            None
        };
        Ok(RequestView {
            request,
            steps,
            waiting_reason,
        })
    }

    /// Requests, newest first.
    pub async fn list(&self, filter: &RequestFilter) -> Result<Vec<Request>, EngineError> {
        Ok(self.inner.store.list_requests(filter).await?)
    }

    /// The request's execution log.
    pub async fn logs(
        &self,
        id: Uuid,
        after_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LogLine>, EngineError> {
        self.get_request(id).await?;
        Ok(self.inner.store.logs(id, after_id, limit).await?)
    }

    /// Live events of a request from now on (status changes, progress, output lines).
    pub fn subscribe(&self, id: Uuid) -> broadcast::Receiver<EngineEvent> {
        self.inner.events.subscribe(id)
    }

    /// Every status change this instance makes from now on (the request as it is after
    /// the change). Each change is made by exactly one instance (the transition is
    /// conditional), so a notifier on every instance notifies each change once.
    pub fn subscribe_status_changes(&self) -> broadcast::Receiver<Request> {
        self.inner.status_changes.subscribe()
    }

    /// Known agents with their last heartbeat.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, EngineError> {
        Ok(self.inner.store.agents().await?)
    }

    /// LLM spend this month per provider against its budget.
    pub async fn costs(&self) -> Result<Vec<CostLine>, EngineError> {
        let month = Utc::now().format("%Y-%m").to_string();
        let spend = self.inner.store.llm_spend(&month).await?;
        let mut lines: Vec<CostLine> = spend
            .into_iter()
            .map(|s| CostLine {
                budget_usd: self.inner.config.budgets.get(&s.provider).copied(),
                provider: s.provider,
                month: s.month,
                spent_usd: micros_to_usd(s.spent_micros),
                reserved_usd: micros_to_usd(s.reserved_micros),
                calls: s.calls,
                input_tokens: s.input_tokens,
                output_tokens: s.output_tokens,
            })
            .collect();
        for (provider, budget) in &self.inner.config.budgets {
            if !lines.iter().any(|l| &l.provider == provider) {
                lines.push(CostLine {
                    provider: provider.clone(),
                    month: month.clone(),
                    spent_usd: 0.0,
                    reserved_usd: 0.0,
                    budget_usd: Some(*budget),
                    calls: 0,
                    input_tokens: 0,
                    output_tokens: 0,
                });
            }
        }
        Ok(lines)
    }

    /// The audit log (all, or one request's), in order.
    pub async fn audit_log(
        &self,
        request_id: Option<Uuid>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, EngineError> {
        Ok(self
            .inner
            .store
            .audit_log(request_id, after_seq, limit)
            .await?)
    }

    /// Checks the audit log's hash chain and that every approved request that ended has its
    /// git commit.
    pub async fn verify_audit(&self) -> Result<AuditReport, EngineError> {
        // Records still waiting for their commits are written first: what is missing
        // afterwards is missing.
        self.flush_trail(std::time::Duration::from_secs(60)).await;
        let chain = self.inner.store.verify_audit().await?;
        let mut problems = Vec::new();
        if !chain.ok {
            problems.push(format!(
                "the audit chain is broken at entry {}: {}",
                chain
                    .first_bad_seq
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "?".into()),
                chain.problem.as_deref().unwrap_or("mismatch")
            ));
        }
        // One pass over the log: which requests have entries, and each record's hash.
        let mut with_entries = std::collections::HashSet::new();
        let mut digests = std::collections::HashMap::new();
        let mut after = 0i64;
        loop {
            let page = self.inner.store.audit_log(None, after, 1000).await?;
            for e in &page {
                if let Some(id) = e.request_id {
                    with_entries.insert(id);
                    if e.event == AuditEvent::Committed {
                        if let Some(d) = e.details.get("record_sha256").and_then(|d| d.as_str()) {
                            digests.insert(id, d.to_string());
                        }
                    }
                }
            }
            match page.last() {
                Some(last) if page.len() == 1000 => after = last.seq,
                _ => break,
            }
        }
        let mut missing = Vec::new();
        let mut record_problems = Vec::new();
        let mut history = None;
        for status in [
            RequestStatus::Completed,
            RequestStatus::Failed,
            RequestStatus::Cancelled,
        ] {
            let mut before = None;
            loop {
                let filter = RequestFilter {
                    status: Some(status),
                    created_before: before,
                    limit: Some(1000),
                    ..Default::default()
                };
                let page = self.inner.store.list_requests(&filter).await?;
                let mut expected = Vec::new();
                for r in page.iter().filter(|r| r.approver.is_some()) {
                    if !with_entries.contains(&r.id) {
                        record_problems.push(crate::audit::git::RecordProblem {
                            id: r.id,
                            reason: "it ended after approval but the audit log has no entry for it (rows deleted?)".into(),
                        });
                    }
                    match &r.commit_id {
                        Some(c) => expected.push(crate::audit::git::ExpectedRecord {
                            id: r.id,
                            commit: c.clone(),
                            digest: digests.get(&r.id).cloned(),
                        }),
                        None => missing.push(r.id),
                    }
                }
                // The branch's history is walked once, for the first page that needs it;
                // then one look at the tip's tree per request: O(n) for the whole trail.
                if let (Some(git), false) = (&self.inner.git, expected.is_empty()) {
                    let git = git.clone();
                    let known = history.take();
                    let (found, read) = tokio::task::spawn_blocking(move || {
                        let history = match known {
                            Some(h) => h,
                            None => git.history()?,
                        };
                        let found = git.verify_records_in(&history, &expected)?;
                        Ok::<_, crate::audit::git::AuditError>((found, history))
                    })
                    .await
                    .map_err(|e| EngineError::Invalid(format!("git verify task failed: {e}")))?
                    .map_err(|e| EngineError::Invalid(format!("git verify: {e}")))?;
                    history = Some(read);
                    for p in found {
                        if p.reason.contains("missing at the branch tip") {
                            missing.push(p.id);
                        } else {
                            record_problems.push(p);
                        }
                    }
                }
                if page.len() < 1000 {
                    break;
                }
                before = page.last().map(|r| r.created_at);
            }
        }
        for id in &missing {
            problems.push(format!(
                "request {id} ended after approval and has no audit commit"
            ));
        }
        for p in &record_problems {
            problems.push(format!("request {}: {}", p.id, p.reason));
        }
        // The newest chain head anchored in git must still be in the log, unchanged: a log
        // truncated, rewritten and re-chained, or emptied, no longer has it.
        let mut anchor = None;
        if let Some(git) = &self.inner.git {
            let git = git.clone();
            let latest = tokio::task::spawn_blocking(move || {
                let latest = git.latest_anchor(1000);
                // What the verification read is not kept cached in this process.
                if let Err(e) = git.release_caches() {
                    tracing::warn!(error = %e, "reopening the audit trail after verify failed");
                }
                latest
            })
            .await
            .map_err(|e| EngineError::Invalid(format!("git verify task failed: {e}")))?
            .map_err(|e| EngineError::Invalid(format!("git verify: {e}")))?;
            if let Some(a) = latest {
                let now = self.inner.store.audit_hash_at(a.seq).await?;
                let agrees = now.as_deref() == Some(a.hash.as_str());
                anchor = Some(format!(
                    "entry {} anchored in git {}",
                    a.seq,
                    if agrees { "matches" } else { "DIFFERS" }
                ));
                if !agrees {
                    problems.push(match now {
                        None => format!(
                            "the audit log no longer has entry {} that git anchored: it was truncated or emptied",
                            a.seq
                        ),
                        Some(_) => format!(
                            "audit entry {} differs from the hash anchored in git: the log was rewritten",
                            a.seq
                        ),
                    });
                }
            }
        }
        let ok = problems.is_empty();
        Ok(AuditReport {
            chain,
            missing_commits: missing,
            record_problems,
            anchor,
            problems,
            ok,
        })
    }

    /// The store's and the bus's state.
    pub async fn health(&self) -> Health {
        let store = match self.inner.store.health().await {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        };
        let bus = match self.inner.transport.health().await {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        };
        let audit = match self
            .inner
            .git_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            Some(e) => format!("error: the last audit commit failed: {e}"),
            None => match *self
                .inner
                .git_busy_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
            {
                Some(since) if since.elapsed() > GIT_LAG_LIMIT => format!(
                    "error: the git trail lags: records have waited for their commits for {} s",
                    since.elapsed().as_secs()
                ),
                _ => "ok".to_string(),
            },
        };
        Health {
            audit: audit.clone(),
            status: if store == "ok" && bus == "ok" && audit == "ok" {
                "ok"
            } else {
                "degraded"
            }
            .into(),
            store,
            bus,
            store_backend: self.inner.store.backend().into(),
            bus_backend: self.inner.transport.backend().into(),
            instance_id: self.inner.config.instance_id.clone(),
        }
    }

    /// Counters and the dispatch-to-result latency histogram.
    pub fn metrics(&self) -> MetricsSnapshot {
        let m = &self.inner.metrics;
        let l = m.latency.lock().unwrap_or_else(|e| e.into_inner());
        MetricsSnapshot {
            dispatched_total: m.dispatched.load(Ordering::Relaxed),
            results_total: m.results.load(Ordering::Relaxed),
            duplicate_results_total: m.duplicates.load(Ordering::Relaxed),
            refused_messages_total: m.refused.load(Ordering::Relaxed),
            dead_lettered_after_retries_total: m.delivery_limit.load(Ordering::Relaxed),
            retries_total: m.retries.load(Ordering::Relaxed),
            timeouts_total: m.timeouts.load(Ordering::Relaxed),
            latency_buckets: LATENCY_BOUNDS
                .iter()
                .copied()
                .zip(l.0.iter().copied())
                .collect(),
            latency_sum_seconds: l.1,
            latency_count: l.2,
        }
    }

    /// Waits until the request is in a terminal status (or `statuses` if given), following
    /// its events. Reads the store first, and again after a missed event or no news for a
    /// while (another instance may have moved it), so nothing is missed; a wanted status
    /// this instance stored and announced is answered with the version it stored.
    pub async fn wait_until(
        &self,
        id: Uuid,
        statuses: &[RequestStatus],
    ) -> Result<Request, EngineError> {
        // Registered before the first read: a change stored after it is kept for us.
        struct Waiting<'a>(&'a Inner, Uuid);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                let mut w = self.0.waited.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(slot) = w.get_mut(&self.1) {
                    slot.0 -= 1;
                    if slot.0 == 0 {
                        w.remove(&self.1);
                    }
                }
            }
        }
        self.inner
            .waited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_insert((0, None))
            .0 += 1;
        let _waiting = Waiting(&self.inner, id);
        let mut rx = self.subscribe(id);
        let wanted = |s: &RequestStatus| s.is_terminal() || statuses.contains(s);
        let mut told = None;
        loop {
            // The version this instance stored with the status it announced, else the store's.
            let stored = told.and_then(|status| {
                let w = self.inner.waited.lock().unwrap_or_else(|e| e.into_inner());
                w.get(&id)
                    .and_then(|slot| slot.1.clone())
                    .filter(|r| r.status == status)
            });
            let r = match stored {
                Some(r) => r,
                None => self.get_request(id).await?,
            };
            if wanted(&r.status) {
                return Ok(r);
            }
            told = None;
            // Read the request again only when its status may be one we wait for: a status
            // event naming one, a missed event (lagged or closed), or no news for a while
            // (another instance may have moved it). Step, output and progress events and
            // other statuses cost no read.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Ok(EngineEvent::Status { status, .. })) if wanted(&status) => {
                        told = Some(status);
                        break;
                    }
                    Ok(Ok(_)) => continue,
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) | Err(_) => break,
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        rx = self.subscribe(id);
                        break;
                    }
                }
            }
        }
    }

    // ---- internals shared with the runtime ----

    pub(super) async fn get_request(&self, id: Uuid) -> Result<Request, EngineError> {
        match self.inner.store.get_request(id).await {
            Err(StoreError::NotFound { .. }) => Err(EngineError::NotFound(id)),
            other => Ok(other?),
        }
    }

    async fn transition_checked(
        &self,
        id: Uuid,
        from: RequestStatus,
        to: RequestStatus,
        patch: RequestPatch,
        action: &'static str,
    ) -> Result<Request, EngineError> {
        match self.set_status(id, from, to, patch).await {
            Err(EngineError::Store(StoreError::Conflict { current, .. })) => {
                Err(EngineError::IllegalTransition {
                    id,
                    status: current.unwrap_or_else(|| "changed".into()),
                    action,
                })
            }
            Err(EngineError::Store(StoreError::NotFound { .. })) => Err(EngineError::NotFound(id)),
            other => other,
        }
    }

    /// A conditional status change that also publishes the status event.
    pub(super) async fn set_status(
        &self,
        id: Uuid,
        from: RequestStatus,
        to: RequestStatus,
        patch: RequestPatch,
    ) -> Result<Request, EngineError> {
        // Group-committed with other callers' writes, its entries with it; waits through a
        // database outage (a change whose commit was lost on the way back comes back as a
        // conflict, stored once).
        let updated = match self
            .group_write(GroupWrite::Transition {
                id,
                from,
                to,
                patch: Box::new(patch),
            })
            .await?
        {
            Written::Request(r) => r,
            _ => {
                return Err(
                    StoreError::Corrupt("a status change without its outcome".into()).into(),
                )
            }
        };
        self.changed(&updated);
        if to == RequestStatus::Queued {
            self.inner.wake.notify_one();
        }
        Ok(updated)
    }

    /// Tells notifiers and live events about a status change this instance stored.
    pub(super) fn changed(&self, updated: &Request) {
        if let Some(slot) = self
            .inner
            .waited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&updated.id)
        {
            slot.1 = Some(updated.clone());
        }
        // No receiver (no notifier configured) is fine.
        let _ = self.inner.status_changes.send(updated.clone());
        self.inner.events.publish(EngineEvent::Status {
            request_id: updated.id,
            status: updated.status,
            at: updated.updated_at,
        });
    }

    /// A request this instance ended: notifiers and live events told, the git trail handed
    /// its record.
    pub(super) fn ended(&self, request: Request) {
        self.changed(&request);
        self.trail_ended(request);
    }

    /// Marks the first pending step ready when no step is active or failed; finishes the
    /// request when every step completed. Safe to call again (conditional updates).
    pub(super) async fn promote_next(&self, id: Uuid) -> Result<(), EngineError> {
        let steps = self.inner.store.steps(id).await?;
        if steps.iter().any(|s| {
            matches!(
                s.status,
                StepStatus::Ready
                    | StepStatus::Dispatched
                    | StepStatus::Running
                    | StepStatus::Failed
                    | StepStatus::Cancelled
            )
        }) {
            return Ok(());
        }
        if let Some(next) = steps.iter().find(|s| s.status == StepStatus::Pending) {
            let patch = StepPatch {
                ready_at: Some(Utc::now()),
                ..Default::default()
            };
            match self
                .inner
                .store
                .update_step(
                    next.task_id,
                    &[StepStatus::Pending],
                    StepStatus::Ready,
                    &patch,
                )
                .await
            {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            self.inner.wake.notify_one();
            return Ok(());
        }
        // Every step is completed or skipped.
        self.finish(id, None, RequestStatus::Completed, None).await
    }

    /// Ends a request: the terminal transition with its error and its entry, stored
    /// together; then the git trail is handed the ended request (an approved one gets its
    /// commit in the background; [`super::trail`]). `from`: the status the caller saw;
    /// `None` for whichever of `queued`/`running` the request is in (an execution ending).
    /// Any other status means someone else moved it on: nothing to do.
    pub(super) async fn finish(
        &self,
        id: Uuid,
        from: Option<RequestStatus>,
        to: RequestStatus,
        error: Option<ErrorPayload>,
    ) -> Result<(), EngineError> {
        let Some(ended) = AuditEvent::ended(to) else {
            return Err(EngineError::Invalid(format!(
                "a request cannot end in `{}`",
                to.as_str()
            )));
        };
        let patch = RequestPatch {
            error: error.clone(),
            audit: vec![NewAuditEntry {
                request_id: Some(id),
                actor: "engine".into(),
                event: ended,
                details: match &error {
                    Some(e) => json!({ "code": e.code.code(), "message": e.message }),
                    None => json!({}),
                },
            }],
            ..Default::default()
        };
        // The end and its entry are stored together; a lost race (another instance finished
        // it, or the status moved on) stores neither. An execution ends from `running`
        // (where dispatch put it) or, rarely, `queued`: read only when `running` was wrong.
        let mut from_status = from.unwrap_or(RequestStatus::Running);
        for _ in 0..3 {
            match self.set_status(id, from_status, to, patch.clone()).await {
                Ok(ended) => {
                    self.trail_ended(ended);
                    return Ok(());
                }
                Err(EngineError::Store(StoreError::Conflict { .. })) => {}
                Err(e) => return Err(e),
            }
            if from.is_some() {
                return Ok(());
            }
            from_status = self.get_request(id).await?.status;
            if !matches!(from_status, RequestStatus::Queued | RequestStatus::Running) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Appends to the audit log. A failure is logged, never swallowed silently: the
    /// decision itself is already stored, and `audit verify` shows the gap.
    pub(super) async fn audit(&self, entries: Vec<NewAuditEntry>) {
        if entries.is_empty() {
            return;
        }
        let n = entries.len();
        if let Err(e) = self.group_write(GroupWrite::Audit(entries)).await {
            tracing::error!(error = %e, entries = n, "audit append failed");
        }
    }

    /// Hands a write to the group writer and waits for its outcome.
    pub(super) async fn group_write(&self, write: GroupWrite) -> Result<Written, StoreError> {
        self.group_writes(vec![write])
            .await
            .pop()
            .unwrap_or_else(|| Err(StoreError::Corrupt("a write without its outcome".into())))
    }

    /// Hands writes to the group writer, to be committed in one transaction (with other
    /// callers' writes), and waits for their outcomes, in order.
    pub(super) async fn group_writes(
        &self,
        mut writes: Vec<GroupWrite>,
    ) -> Vec<Result<Written, StoreError>> {
        for w in &mut writes {
            self.redact_write(w);
        }
        let writer = self
            .inner
            .group_writer
            .get_or_init(|| spawn_group_writer(self.inner.store.clone()));
        let (done, wait) = tokio::sync::oneshot::channel();
        let n = writes.len();
        let stopped = |n| {
            (0..n)
                .map(|_| Err(StoreError::Unavailable("the group writer stopped".into())))
                .collect()
        };
        match writer.send((writes, done)).await {
            Ok(()) => wait.await.unwrap_or_else(|_| stopped(n)),
            Err(_) => stopped(n),
        }
    }

    /// Redaction choke point: no configured secret reaches the append-only audit log or a
    /// request's error.
    fn redact_write(&self, write: &mut GroupWrite) {
        let redactor = &self.inner.config.redactor;
        match write {
            GroupWrite::Transition { patch, .. } => {
                if let Some(e) = patch.error.as_mut() {
                    redactor.redact_error(e);
                }
            }
            GroupWrite::Commit {
                commit: Err(why), ..
            } => *why = redactor.redact(why).into_owned(),
            _ => {}
        }
        if let Some(entries) = write.audit_mut() {
            *entries = redactor.redact_audit(std::mem::take(entries));
        }
    }
}
