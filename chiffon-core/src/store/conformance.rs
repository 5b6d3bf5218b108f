//! The store conformance suite: one set of cases every [`Store`] implementation passes.
//!
//! A test file builds a [`Harness`] (a fresh, empty store plus raw SQL access for the
//! tampering cases) and expands [`store_conformance_tests!`](crate::store_conformance_tests)
//! with it, which gives one `#[tokio::test]` per case:
//!
//! ```text
//! async fn harness() -> Option<Harness> { /* a fresh store, or None to skip */ }
//! chiffon_core::store_conformance_tests!(harness);
//! ```

use async_trait::async_trait;
use chrono::{Duration as ChronoDuration, Timelike, Utc};
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

use chiffon_protocol::{
    CpuMetrics, ErrorCode, ErrorPayload, GpuMetrics, Heartbeat, MemoryMetrics, Resources,
};

use super::{Store, StoreError};
use crate::audit::{chain, AuditEvent};
use crate::model::*;

/// Raw SQL on the store's database, for cases that tamper with rows behind its back.
#[async_trait]
pub trait RawSql: Send + Sync {
    /// Executes `sql`; returns the rows affected.
    async fn execute_raw(&self, sql: &str) -> Result<u64, StoreError>;
}

#[cfg(feature = "postgres")]
#[async_trait]
impl RawSql for super::postgres::PgStore {
    async fn execute_raw(&self, sql: &str) -> Result<u64, StoreError> {
        super::postgres::PgStore::execute_raw(self, sql).await
    }
}

#[cfg(feature = "sqlite")]
#[async_trait]
impl RawSql for super::sqlite::SqliteStore {
    async fn execute_raw(&self, sql: &str) -> Result<u64, StoreError> {
        super::sqlite::SqliteStore::execute_raw(self, sql).await
    }
}

/// A fresh, empty store for one case, and whatever must live as long as it (a temporary
/// folder, a guard that drops the test database).
pub struct Harness {
    pub store: Arc<dyn Store>,
    pub raw: Arc<dyn RawSql>,
    // Declared last: dropped after the store.
    _guard: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}

impl Harness {
    pub fn new<S>(store: S, guard: impl Send + Sync + 'static) -> Harness
    where
        S: Store + RawSql + Clone,
    {
        Harness {
            store: Arc::new(store.clone()),
            raw: Arc::new(store),
            _guard: Box::new(guard),
        }
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each on a fresh store from
/// `$make`: an async fn returning `Option<Harness>` (`None`: the service is unreachable and
/// the test is skipped; the constructor decides, and fails instead under `CI=true`).
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:path) => {
        $crate::store_conformance_tests!(@cases $make;
            health_and_migrate,
            request_lifecycle,
            illegal_transition,
            lost_race_conflict,
            transition_is_atomic,
            transition_stores_its_audit_entries,
            group_commit,
            concurrent_transitions,
            not_found,
            list_filter_order,
            step_updates,
            steps_of_several_requests,
            queued_with_its_first_step_dispatched,
            concurrent_claims,
            claim_respects_not_before_and_lease,
            release_step,
            overdue_steps,
            logs_order_and_after_id,
            heartbeats_and_agents,
            identities_and_step_binding,
            step_previews,
            planning_leases,
            llm_reserve_over_budget,
            llm_concurrent_reservations,
            llm_settle_and_monthly_spend,
            llm_overage_closes_the_provider,
            llm_reservation_lease,
            plan_cache,
            audit_append_and_read,
            audit_concurrent_appenders,
            group_commits_race_for_the_head,
            concurrent_groups_name_their_newest_entries,
            audit_detects_altered_details,
            audit_detects_deleted_rows,
            audit_detects_a_log_cut_back,
            commit_id_and_counts,
            git_backlog,
            group_advance,
            group_batches,
            outbox,
            born_claimed,
            reported_by_binds_the_attempt,
            group_previews,
            group_rows_keep_their_values,
        );
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some(h) = $make().await else { return };
                $crate::store::conformance::$case(&h).await;
            }
        )*
    };
}

// ---- fixtures ----

fn new_request(text: &str) -> NewRequest {
    NewRequest {
        id: Uuid::new_v4(),
        trace_id: format!("trace-{}", Uuid::new_v4()),
        text: text.to_string(),
        requester: "alice".into(),
        submitted_by: "token:alice".into(),
        dry_run: false,
    }
}

fn plan(steps: usize) -> Plan {
    Plan {
        summary: format!("a plan of {steps} steps"),
        steps: (0..steps)
            .map(|i| PlanStep {
                action: format!("action_{i}"),
                parameters: json!({"host": "nas", "n": i, "nested": {"b": [1, 2.5], "a": null}})
                    .as_object()
                    .cloned()
                    .unwrap(),
                agent_type: "infrastructure".into(),
                resources: Resources {
                    gpu: i % 2 == 1,
                    memory_gb: 1.5,
                },
                reason: format!("because {i}"),
                provenance: Default::default(),
            })
            .collect(),
        risks: vec!["downtime".into()],
        estimated_cost_usd: 0.0125,
        llm_cost_usd: 0.0025,
        provider: "anthropic".into(),
        model: "claude".into(),
        cached: false,
        skipped: Vec::new(),
    }
}

fn with_plan(p: Plan) -> RequestPatch {
    RequestPatch {
        plan: Some(p),
        ..Default::default()
    }
}

fn assert_micros(at: chrono::DateTime<Utc>) {
    assert_eq!(
        at.nanosecond() % 1000,
        0,
        "{at} is not truncated to microseconds"
    );
}

fn assert_conflict(r: Result<impl std::fmt::Debug, StoreError>, current: Option<&str>) {
    match r {
        Err(e @ StoreError::Conflict { .. }) => {
            assert_eq!(e.code(), ErrorCode::Conflict);
            if let StoreError::Conflict { current: c, .. } = &e {
                assert_eq!(c.as_deref(), current, "{e}");
            }
        }
        other => panic!("expected a conflict (current {current:?}), got {other:?}"),
    }
}

fn assert_not_found(r: Result<impl std::fmt::Debug, StoreError>) {
    match r {
        Err(e @ StoreError::NotFound { .. }) => assert_eq!(e.code(), ErrorCode::NotFound),
        other => panic!("expected not found, got {other:?}"),
    }
}

/// A new request queued with an `n`-step plan (its first step `ready`).
async fn queued_with_plan(s: &dyn Store, text: &str, n: usize) -> Request {
    let req = s.create_request(&new_request(text)).await.unwrap();
    s.transition(
        req.id,
        RequestStatus::Planning,
        RequestStatus::Queued,
        &with_plan(plan(n)),
    )
    .await
    .unwrap()
}

/// A request with an `n`-step plan, queued, its steps `ready`.
async fn queued_with_ready_steps(s: &dyn Store, n: usize) -> (Request, Vec<Step>) {
    let req = queued_with_plan(s, "ready steps", n).await;
    // The first became ready as the request was queued; the others are made ready too.
    let mut steps = Vec::new();
    for st in s.steps(req.id).await.unwrap() {
        steps.push(
            s.update_step(
                st.task_id,
                &[StepStatus::Pending, StepStatus::Ready],
                StepStatus::Ready,
                &StepPatch::default(),
            )
            .await
            .unwrap(),
        );
    }
    (req, steps)
}

fn heartbeat(agent: &str, cpu: f64) -> Heartbeat {
    Heartbeat {
        agent_id: agent.into(),
        agent_type: "desktop".into(),
        hostname: format!("{agent}.lan"),
        cpu: Some(CpuMetrics {
            percent: cpu,
            cores: 8,
            load_1m: 0.5,
        }),
        memory: Some(MemoryMetrics {
            used_gb: 3.5,
            total_gb: 16.0,
        }),
        gpus: vec![GpuMetrics {
            index: 0,
            name: "RTX".into(),
            utilization_percent: 12.0,
            memory_used_gb: 1.0,
            memory_total_gb: 24.0,
        }],
        running_tasks: 1,
        max_tasks: Some(2),
        queue: Some(format!("agent.desktop.{agent}")),
        actions: vec!["gpu_status".into()],
    }
}

fn reservation(provider: &str, month: &str, amount: i64, budget: i64) -> LlmReservation {
    LlmReservation {
        provider: provider.into(),
        model: "m".into(),
        month: month.into(),
        amount_micros: amount,
        budget_micros: budget,
        request_id: None,
        lease: DEFAULT_RESERVATION_LEASE,
    }
}

fn reserved_id(r: Reservation) -> Uuid {
    match r {
        Reservation::Reserved { id } => id,
        other => panic!("expected a reservation, got {other:?}"),
    }
}

/// A status change (with `plan`, if given) and its `planned` entry numbered `n`.
fn planned_change(
    id: Uuid,
    from: RequestStatus,
    to: RequestStatus,
    plan: Option<Plan>,
    n: u64,
) -> GroupWrite {
    GroupWrite::Transition {
        id,
        from,
        to,
        patch: Box::new(RequestPatch {
            plan,
            audit: vec![audit_entry(Some(id), AuditEvent::Planned, n)],
            ..Default::default()
        }),
    }
}

fn audit_entry(request_id: Option<Uuid>, event: AuditEvent, n: u64) -> NewAuditEntry {
    NewAuditEntry {
        request_id,
        actor: "engine".into(),
        event,
        details: json!({"n": n, "z": "last", "a": [1.25, "x", null], "nested": {"k": true}}),
    }
}

// ---- cases ----

pub async fn health_and_migrate(h: &Harness) {
    let s = &*h.store;
    assert!(matches!(s.backend(), "postgres" | "sqlite"));
    s.health().await.unwrap();
    // Migrations were applied on connect; applying them again changes nothing.
    s.migrate().await.unwrap();
    s.migrate().await.unwrap();
    let v = s.verify_audit().await.unwrap();
    assert!(v.ok && v.entries_checked == 0, "{v:?}");
}

pub async fn request_lifecycle(h: &Harness) {
    let s = &*h.store;
    let new = new_request("deploy uptime kuma on nas");
    let created = s.create_request(&new).await.unwrap();
    assert_eq!(created.id, new.id);
    assert_eq!(created.status, RequestStatus::Planning);
    assert_eq!(created.text, new.text);
    assert_eq!(created.trace_id, new.trace_id);
    assert_eq!(created.plan, None);
    assert_micros(created.created_at);
    assert_eq!(created.created_at, created.updated_at);
    assert_eq!(s.get_request(new.id).await.unwrap(), created);
    assert_conflict(s.create_request(&new).await, None);
    assert!(s.steps(new.id).await.unwrap().is_empty());

    let p = plan(3);
    let awaiting = s
        .transition(
            new.id,
            RequestStatus::Planning,
            RequestStatus::AwaitingApproval,
            &with_plan(p.clone()),
        )
        .await
        .unwrap();
    assert_eq!(awaiting.status, RequestStatus::AwaitingApproval);
    assert_eq!(awaiting.plan.as_ref(), Some(&p));
    assert!(awaiting.updated_at >= created.updated_at);
    assert_micros(awaiting.updated_at);
    let steps = s.steps(new.id).await.unwrap();
    assert_eq!(steps.len(), 3);
    for (i, st) in steps.iter().enumerate() {
        assert_eq!(st.seq as usize, i);
        assert_eq!(st.request_id, new.id);
        assert_eq!(st.status, StepStatus::Pending);
        assert_eq!(st.action, p.steps[i].action);
        assert_eq!(st.parameters, p.steps[i].parameters);
        assert_eq!(st.resources, p.steps[i].resources);
        assert_eq!(st.agent_type, "infrastructure");
        assert_eq!(st.attempt, 0);
        assert_eq!(st.progress, 0);
        assert_eq!(st.agent_id, None);
        assert_eq!(s.get_step(st.task_id).await.unwrap(), *st);
    }
    let ids: HashSet<Uuid> = steps.iter().map(|s| s.task_id).collect();
    assert_eq!(ids.len(), 3, "fresh task ids");
    assert!(!ids.contains(&new.id));

    let queued = s
        .transition(
            new.id,
            RequestStatus::AwaitingApproval,
            RequestStatus::Queued,
            &RequestPatch {
                approver: Some("bob".into()),
                approval_comment: Some("go".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(queued.approver.as_deref(), Some("bob"));
    assert_eq!(queued.approval_comment.as_deref(), Some("go"));
    assert_eq!(
        queued.plan.as_ref(),
        Some(&p),
        "a patch without a plan keeps it"
    );
    s.transition(
        new.id,
        RequestStatus::Queued,
        RequestStatus::Running,
        &RequestPatch::default(),
    )
    .await
    .unwrap();
    let err = ErrorPayload::new(ErrorCode::Internal, "boom").with_details(json!({"step": 2}));
    let done = s
        .transition(
            new.id,
            RequestStatus::Running,
            RequestStatus::Failed,
            &RequestPatch {
                error: Some(err.clone()),
                commit_id: Some("abc123".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(done.status, RequestStatus::Failed);
    assert_eq!(done.error.as_ref(), Some(&err));
    assert_eq!(done.commit_id.as_deref(), Some("abc123"));
    assert_eq!(done.approver.as_deref(), Some("bob"));
    assert_eq!(done.created_at, created.created_at);
    assert_eq!(s.get_request(new.id).await.unwrap(), done);
    assert_eq!(
        s.steps(new.id).await.unwrap().len(),
        3,
        "steps inserted once"
    );
}

pub async fn illegal_transition(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    for (from, to) in [
        (RequestStatus::Planning, RequestStatus::Running),
        (RequestStatus::Planning, RequestStatus::Completed),
        (RequestStatus::Completed, RequestStatus::Running),
        (RequestStatus::Planning, RequestStatus::Planning),
    ] {
        match s.transition(r.id, from, to, &RequestPatch::default()).await {
            Err(e @ StoreError::Conflict { .. }) => {
                assert!(e.to_string().contains("illegal transition"), "{e}");
                assert_eq!(e.code(), ErrorCode::Conflict);
            }
            other => panic!("{from} -> {to}: expected an illegal transition, got {other:?}"),
        }
    }
    // Nothing changed, and no plan's steps were written by the refused transition.
    assert!(s
        .transition(
            r.id,
            RequestStatus::Planning,
            RequestStatus::Running,
            &with_plan(plan(2))
        )
        .await
        .is_err());
    let again = s.get_request(r.id).await.unwrap();
    assert_eq!(again, r);
    assert!(s.steps(r.id).await.unwrap().is_empty());
}

pub async fn lost_race_conflict(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    s.transition(
        r.id,
        RequestStatus::Planning,
        RequestStatus::AwaitingApproval,
        &with_plan(plan(2)),
    )
    .await
    .unwrap();
    // A second engine still believes the request is planning.
    assert_conflict(
        s.transition(
            r.id,
            RequestStatus::Planning,
            RequestStatus::Queued,
            &with_plan(plan(5)),
        )
        .await,
        Some("awaiting_approval"),
    );
    let now = s.get_request(r.id).await.unwrap();
    assert_eq!(now.status, RequestStatus::AwaitingApproval);
    assert_eq!(now.plan.unwrap().steps.len(), 2);
    assert_eq!(
        s.steps(r.id).await.unwrap().len(),
        2,
        "the loser's steps are not written"
    );
}

pub async fn transition_is_atomic(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    let queued = s
        .transition(
            r.id,
            RequestStatus::Planning,
            RequestStatus::Queued,
            &with_plan(plan(3)),
        )
        .await
        .unwrap();
    // The status update succeeds but the steps cannot be written (the request has steps
    // already): the whole transition is rolled back.
    let mut other = plan(2);
    other.summary = "another plan".into();
    match s
        .transition(
            r.id,
            RequestStatus::Queued,
            RequestStatus::Running,
            &with_plan(other),
        )
        .await
    {
        Err(e @ StoreError::Conflict { .. }) => {
            assert!(e.to_string().contains("already has steps"), "{e}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(s.get_request(r.id).await.unwrap(), queued);
    assert_eq!(s.steps(r.id).await.unwrap().len(), 3);
}

/// A transition's audit entries are stored with it or not at all: concurrent transitions
/// of one request leave exactly the winner's entries, chained, and a transition rolled
/// back (its steps could not be written) leaves none.
pub async fn transition_stores_its_audit_entries(h: &Harness) {
    let s = &h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..6u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let patch = RequestPatch {
                plan: Some(plan(2)),
                audit: vec![
                    audit_entry(Some(r.id), AuditEvent::Planned, u64::from(i)),
                    audit_entry(Some(r.id), AuditEvent::AutoApproved, u64::from(i)),
                ],
                ..Default::default()
            };
            s.transition(r.id, RequestStatus::Planning, RequestStatus::Queued, &patch)
                .await
                .map(|_| i)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(i) => winners.push(i),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one transition wins");
    let entries = s.audit_log(Some(r.id), 0, 100).await.unwrap();
    let events: Vec<&str> = entries.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        events,
        ["planned", "auto_approved"],
        "only the winner's entries"
    );
    for e in &entries {
        assert_eq!(e.details["n"], json!(winners[0]), "{e:?}");
    }
    // Rolled back: the status changes, but the plan's steps collide with the stored ones.
    let rolled_back = RequestPatch {
        plan: Some(plan(1)),
        audit: vec![audit_entry(Some(r.id), AuditEvent::Cancelled, 99)],
        ..Default::default()
    };
    assert!(s
        .transition(
            r.id,
            RequestStatus::Queued,
            RequestStatus::Running,
            &rolled_back
        )
        .await
        .is_err());
    assert_eq!(
        s.get_request(r.id).await.unwrap().status,
        RequestStatus::Queued
    );
    assert_eq!(s.audit_log(Some(r.id), 0, 100).await.unwrap().len(), 2);
    // Without a plan: the change and its entry, in one transaction.
    let cancel = RequestPatch {
        audit: vec![audit_entry(Some(r.id), AuditEvent::Cancelled, 7)],
        ..Default::default()
    };
    s.transition(
        r.id,
        RequestStatus::Queued,
        RequestStatus::Cancelled,
        &cancel,
    )
    .await
    .unwrap();
    let entries = s.audit_log(Some(r.id), 0, 100).await.unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[2].event, AuditEvent::Cancelled);
    let v = s.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.entries_checked, 3);
}

/// Several status changes and plain entries in one transaction: each change's outcome in
/// its slot, the entries of the changes that applied and the plain ones in order, one chain;
/// a group that cannot be written (steps that already exist) stores nothing of it.
pub async fn group_commit(h: &Harness) {
    let s = &*h.store;
    let a = s.create_request(&new_request("a")).await.unwrap();
    let b = s.create_request(&new_request("b")).await.unwrap();
    let change = planned_change;
    let slots = s
        .commit_group(&[
            GroupWrite::Audit(vec![audit_entry(Some(a.id), AuditEvent::Received, 1)]),
            change(
                a.id,
                RequestStatus::Planning,
                RequestStatus::Queued,
                Some(plan(2)),
                2,
            ),
            // Lost its race: b is not queued.
            change(b.id, RequestStatus::Queued, RequestStatus::Running, None, 3),
            change(
                Uuid::new_v4(),
                RequestStatus::Planning,
                RequestStatus::Queued,
                None,
                4,
            ),
            GroupWrite::Audit(vec![audit_entry(Some(b.id), AuditEvent::Received, 5)]),
        ])
        .await
        .unwrap();
    assert_eq!(slots.len(), 5);
    assert!(matches!(slots[0], Ok(Written::Appended)));
    assert_eq!(written_request(&slots[1]).status, RequestStatus::Queued);
    assert_conflict(
        slots[2].as_ref().map(|_| ()).map_err(clone_err),
        Some("planning"),
    );
    assert_not_found(slots[3].as_ref().map(|_| ()).map_err(clone_err));
    assert!(matches!(slots[4], Ok(Written::Appended)));
    assert_eq!(s.steps(a.id).await.unwrap().len(), 2);
    let ns: Vec<serde_json::Value> = s
        .audit_log(None, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.details["n"].clone())
        .collect();
    assert_eq!(
        ns,
        [json!(1), json!(2), json!(5)],
        "in order, the loser's left out"
    );
    // Steps that already exist fail the whole group: b's change is not stored either.
    let err = s
        .commit_group(&[
            change(
                b.id,
                RequestStatus::Planning,
                RequestStatus::Queued,
                None,
                6,
            ),
            change(
                a.id,
                RequestStatus::Queued,
                RequestStatus::Running,
                Some(plan(1)),
                7,
            ),
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already has steps"), "{err}");
    assert_eq!(
        s.get_request(b.id).await.unwrap().status,
        RequestStatus::Planning
    );
    assert_eq!(s.audit_log(None, 0, 100).await.unwrap().len(), 3);
    assert!(s.verify_audit().await.unwrap().ok);
    assert!(s.commit_group(&[]).await.unwrap().is_empty());
    // A new request with its entry; its id again is a conflict in its slot, and nothing.
    let c = new_request("c");
    let create = GroupWrite::Create {
        request: Box::new(c.clone()),
        audit: vec![audit_entry(Some(c.id), AuditEvent::Received, 8)],
    };
    let slots = s
        .commit_group(&[create.clone(), create.clone()])
        .await
        .unwrap();
    assert_eq!(written_request(&slots[0]).status, RequestStatus::Planning);
    assert_conflict(slots[1].as_ref().map(|_| ()).map_err(clone_err), None);
    assert_eq!(s.audit_log(Some(c.id), 0, 10).await.unwrap().len(), 1);
    // A step change with its log lines and entries; one that lost its race stores neither.
    // Queued made the first step ready, in the same transaction; the second waits.
    let steps = s.steps(a.id).await.unwrap();
    assert_eq!(steps[0].status, StepStatus::Ready);
    assert!(steps[0].ready_at.is_some());
    assert_eq!(steps[1].status, StepStatus::Pending);
    let second = steps[1].clone();
    let step_write = |from: StepStatus, n| GroupWrite::Step {
        task_id: second.task_id,
        from: vec![from],
        to: StepStatus::Ready,
        patch: Box::default(),
        logs: vec![NewLogLine {
            request_id: a.id,
            task_id: Some(second.task_id),
            at: Utc::now(),
            kind: "result".into(),
            progress: None,
            message: format!("line {n}"),
        }],
        audit: vec![audit_entry(Some(a.id), AuditEvent::StepResult, n)],
    };
    let slots = s
        .commit_group(&[
            step_write(StepStatus::Pending, 9),
            step_write(StepStatus::Pending, 10),
        ])
        .await
        .unwrap();
    match &slots[0] {
        Ok(Written::Step(step)) => assert_eq!(step.status, StepStatus::Ready),
        other => panic!("expected the step, got {other:?}"),
    }
    assert_conflict(
        slots[1].as_ref().map(|_| ()).map_err(clone_err),
        Some("ready"),
    );
    let logs = s.logs(a.id, None, 10).await.unwrap();
    let messages: Vec<&str> = logs.iter().map(|l| l.line.message.as_str()).collect();
    assert_eq!(messages, ["line 9"]);
    let ns: Vec<serde_json::Value> = s
        .audit_log(Some(a.id), 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.details["n"].clone())
        .collect();
    assert_eq!(ns, [json!(1), json!(2), json!(9)]);
    let v = s.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
}

fn written_request(slot: &Result<Written, StoreError>) -> &Request {
    match slot {
        Ok(Written::Request(r)) => r,
        other => panic!("expected a request, got {other:?}"),
    }
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Conflict { message, current } => StoreError::Conflict {
            message: message.clone(),
            current: current.clone(),
        },
        StoreError::NotFound { what } => StoreError::not_found(what.clone()),
        other => StoreError::Corrupt(other.to_string()),
    }
}

pub async fn concurrent_transitions(h: &Harness) {
    let s = &h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let to = if i % 2 == 0 {
                RequestStatus::Queued
            } else {
                RequestStatus::Cancelled
            };
            let patch = if to == RequestStatus::Queued {
                with_plan(plan(3))
            } else {
                RequestPatch::default()
            };
            s.transition(r.id, RequestStatus::Planning, to, &patch)
                .await
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(req) => won.push(req),
            Err(StoreError::Conflict { current, .. }) => assert!(current.is_some()),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one engine wins the transition");
    let final_req = s.get_request(r.id).await.unwrap();
    assert_eq!(final_req.status, won[0].status);
    let n_steps = s.steps(r.id).await.unwrap().len();
    assert_eq!(
        n_steps,
        if won[0].status == RequestStatus::Queued {
            3
        } else {
            0
        }
    );
}

pub async fn not_found(h: &Harness) {
    let s = &*h.store;
    let id = Uuid::new_v4();
    assert_not_found(s.get_request(id).await);
    assert_not_found(
        s.transition(
            id,
            RequestStatus::Planning,
            RequestStatus::Queued,
            &RequestPatch::default(),
        )
        .await,
    );
    assert_not_found(s.steps(id).await);
    assert_not_found(s.get_step(id).await);
    assert_not_found(
        s.update_step(
            id,
            &[StepStatus::Pending],
            StepStatus::Ready,
            &StepPatch::default(),
        )
        .await,
    );
    assert_not_found(s.release_step(id, "me").await);
    assert_not_found(
        s.settle_llm(
            id,
            &LlmSettlement {
                input_tokens: 1,
                output_tokens: 1,
                cost_micros: 1,
                ok: true,
            },
        )
        .await,
    );
    // Log lines of a request that does not exist are refused, not orphaned.
    let line = NewLogLine {
        request_id: id,
        task_id: None,
        at: Utc::now(),
        kind: "engine".into(),
        progress: None,
        message: "x".into(),
    };
    assert_not_found(s.append_logs(&[line]).await);
    assert!(s.logs(id, None, 10).await.unwrap().is_empty());
    assert!(s.audit_log(Some(id), 0, 10).await.unwrap().is_empty());
    assert_eq!(s.cached_plan("missing").await.unwrap(), None);
}

pub async fn list_filter_order(h: &Harness) {
    let s = &*h.store;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(
            s.create_request(&new_request(&format!("r{i}")))
                .await
                .unwrap(),
        );
        // Distinct creation instants, so "newest first" has one answer.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let all = s.list_requests(&RequestFilter::default()).await.unwrap();
    let ids: Vec<Uuid> = all.iter().map(|r| r.id).collect();
    let expect: Vec<Uuid> = made.iter().rev().map(|r| r.id).collect();
    assert_eq!(ids, expect, "newest first");

    let cut = Utc::now();
    tokio::time::sleep(Duration::from_millis(3)).await;
    for r in [&made[1], &made[3]] {
        s.transition(
            r.id,
            RequestStatus::Planning,
            RequestStatus::Cancelled,
            &RequestPatch::default(),
        )
        .await
        .unwrap();
    }
    let cancelled = s
        .list_requests(&RequestFilter {
            status: Some(RequestStatus::Cancelled),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        cancelled.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![made[3].id, made[1].id]
    );
    let limited = s
        .list_requests(&RequestFilter {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        limited.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![made[4].id, made[3].id]
    );
    let stale = s
        .list_requests(&RequestFilter {
            status: Some(RequestStatus::Planning),
            updated_before: Some(cut),
            limit: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        stale.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![made[4].id, made[2].id, made[0].id]
    );
    let none = s
        .list_requests(&RequestFilter {
            status: Some(RequestStatus::Cancelled),
            updated_before: Some(cut),
            limit: None,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
    // Paging by creation: the next page starts before the oldest of the page before.
    let next = s
        .list_requests(&RequestFilter {
            created_before: Some(limited[1].created_at),
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![made[2].id, made[1].id]
    );

    // By id prefix: three ids that share their first 6 characters, two their first 34.
    let mut bytes = *Uuid::new_v4().as_bytes();
    bytes[15] = 0;
    let a = Uuid::from_bytes(bytes);
    bytes[15] = 1;
    let b = Uuid::from_bytes(bytes);
    bytes[3] ^= 0xff;
    let c = Uuid::from_bytes(bytes);
    for id in [a, b, c] {
        s.create_request(&NewRequest {
            id,
            ..new_request("prefixed")
        })
        .await
        .unwrap();
    }
    let by_prefix = |p: String, limit: Option<u32>| {
        let s = h.store.clone();
        async move {
            let mut ids: Vec<Uuid> = s
                .list_requests(&RequestFilter {
                    id_prefix: Some(p),
                    limit,
                    ..Default::default()
                })
                .await
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect();
            ids.sort();
            ids
        }
    };
    let text = a.to_string();
    let mut abc = vec![a, b, c];
    abc.sort();
    assert_eq!(by_prefix(text[..6].to_string(), None).await, abc);
    assert_eq!(by_prefix(text[..6].to_uppercase(), None).await, abc);
    assert_eq!(by_prefix(text[..6].to_string(), Some(2)).await.len(), 2);
    assert_eq!(by_prefix(text[..34].to_string(), None).await, vec![a, b]);
    assert_eq!(by_prefix(text.clone(), None).await, vec![a]);
    assert_eq!(
        by_prefix(text[..9].to_string(), None).await.len(),
        2,
        "a hyphen in its place"
    );
    assert!(by_prefix(format!("{}-{}", &text[..4], &text[4..8]), None)
        .await
        .is_empty());
}

pub async fn step_updates(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    s.transition(
        r.id,
        RequestStatus::Planning,
        RequestStatus::Queued,
        &with_plan(plan(2)),
    )
    .await
    .unwrap();
    // The second: queued made the first ready already.
    let st = s.steps(r.id).await.unwrap().remove(1);
    let before = Utc::now() - ChronoDuration::seconds(1);
    let ready = s
        .update_step(
            st.task_id,
            &[StepStatus::Pending],
            StepStatus::Ready,
            &StepPatch::default(),
        )
        .await
        .unwrap();
    assert_eq!(ready.status, StepStatus::Ready);
    let ready_at = ready.ready_at.expect("a ready step has ready_at");
    assert!(ready_at >= before);
    assert_micros(ready_at);

    // Wrong `from`: a conflict naming the status found, and nothing changes.
    assert_conflict(
        s.update_step(
            st.task_id,
            &[StepStatus::Pending, StepStatus::Running],
            StepStatus::Dispatched,
            &StepPatch::default(),
        )
        .await,
        Some("ready"),
    );
    assert_conflict(
        s.update_step(
            st.task_id,
            &[],
            StepStatus::Dispatched,
            &StepPatch::default(),
        )
        .await,
        Some("ready"),
    );
    assert_eq!(s.get_step(st.task_id).await.unwrap(), ready);

    let t0 = Utc::now();
    let deadline = t0 + ChronoDuration::seconds(600);
    let dispatched = s
        .update_step(
            st.task_id,
            &[StepStatus::Ready],
            StepStatus::Dispatched,
            &StepPatch {
                attempt: Some(1),
                agent_id: Some("infra-1".into()),
                queue: Some("agent.infrastructure".into()),
                dispatched_at: Some(t0),
                deadline_at: Some(deadline),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(dispatched.attempt, 1);
    assert_eq!(dispatched.agent_id.as_deref(), Some("infra-1"));
    assert_eq!(dispatched.queue.as_deref(), Some("agent.infrastructure"));
    assert_eq!(
        dispatched.dispatched_at.unwrap().timestamp_micros(),
        t0.timestamp_micros()
    );
    assert_micros(dispatched.dispatched_at.unwrap());
    assert_eq!(dispatched.ready_at, Some(ready_at), "kept when not patched");

    let running = s
        .update_step(
            st.task_id,
            &[StepStatus::Dispatched, StepStatus::Running],
            StepStatus::Running,
            &StepPatch {
                progress: Some(40),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(running.progress, 40);
    assert_eq!(running.agent_id.as_deref(), Some("infra-1"));

    let err = ErrorPayload::new(ErrorCode::Internal, "partial").with_details(json!({"rc": 2}));
    let done = s
        .update_step(
            st.task_id,
            &[StepStatus::Running],
            StepStatus::Completed,
            &StepPatch {
                progress: Some(100),
                output: Some("ok: [nas]\n".into()),
                diff: Some("--- before\n+++ after\n".into()),
                changed: Some(true),
                error: Some(err.clone()),
                finished_at: Some(Utc::now()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(done.status, StepStatus::Completed);
    assert_eq!(done.progress, 100);
    assert_eq!(done.output.as_deref(), Some("ok: [nas]\n"));
    assert_eq!(done.diff.as_deref(), Some("--- before\n+++ after\n"));
    assert_eq!(done.changed, Some(true));
    assert_eq!(done.error.as_ref(), Some(&err));
    assert!(done.finished_at.is_some());
    assert_eq!(done.attempt, 1);
    assert_eq!(s.get_step(st.task_id).await.unwrap(), done);

    // The other step (the first, made ready by queueing) was untouched.
    let other = s.steps(r.id).await.unwrap().remove(0);
    assert_eq!(other.status, StepStatus::Ready);
    assert_eq!(other.attempt, 0);
    assert_eq!(other.output, None);
}

pub async fn concurrent_claims(h: &Harness) {
    let s = &h.store;
    let (_, steps) = queued_with_ready_steps(&**s, 50).await;
    let all: HashSet<Uuid> = steps.iter().map(|s| s.task_id).collect();
    let mut claimers = Vec::new();
    for owner in ["engine-a", "engine-b"] {
        let s = s.clone();
        claimers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = s
                    .claim_ready_steps(owner, 7, Duration::from_secs(300))
                    .await
                    .unwrap();
                if batch.is_empty() {
                    break;
                }
                assert!(batch.len() <= 7);
                assert!(batch.iter().all(|st| st.status == StepStatus::Ready));
                got.extend(batch.into_iter().map(|st| st.task_id));
                tokio::task::yield_now().await;
            }
            got
        }));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for c in claimers {
        let got = c.await.unwrap();
        total += got.len();
        seen.extend(got);
    }
    assert_eq!(total, 50, "every step claimed exactly once");
    assert_eq!(seen, all);
    assert!(s
        .claim_ready_steps("engine-c", 10, Duration::from_secs(300))
        .await
        .unwrap()
        .is_empty());
}

pub async fn claim_respects_not_before_and_lease(h: &Harness) {
    let s = &*h.store;
    let (r, steps) = queued_with_ready_steps(s, 4).await;
    // Step 0 backs off for an hour; steps 1-3 are ready in ready_at order.
    s.update_step(
        steps[0].task_id,
        &[StepStatus::Ready],
        StepStatus::Ready,
        &StepPatch {
            not_before: Some(Utc::now() + ChronoDuration::hours(1)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        s.claim_ready_steps("a", 0, Duration::from_secs(60))
            .await
            .unwrap()
            .len(),
        0
    );
    let first = s
        .claim_ready_steps("a", 2, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|st| st.seq).collect::<Vec<_>>(),
        vec![1, 2],
        "oldest ready_at first"
    );
    // A claim with no lease left is free again.
    let expiring = s.claim_ready_steps("b", 5, Duration::ZERO).await.unwrap();
    assert_eq!(
        expiring.iter().map(|st| st.seq).collect::<Vec<_>>(),
        vec![3]
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = s
        .claim_ready_steps("c", 5, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(again.iter().map(|st| st.seq).collect::<Vec<_>>(), vec![3]);
    // Pending steps are never claimed (a request awaiting approval has only those).
    let r2 = s.create_request(&new_request("pending")).await.unwrap();
    s.transition(
        r2.id,
        RequestStatus::Planning,
        RequestStatus::AwaitingApproval,
        &with_plan(plan(3)),
    )
    .await
    .unwrap();
    assert!(s
        .claim_ready_steps("d", 10, Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.steps(r.id).await.unwrap().len(), 4);
}

pub async fn release_step(h: &Harness) {
    let s = &*h.store;
    let (_, steps) = queued_with_ready_steps(s, 2).await;
    let claimed = s
        .claim_ready_steps("owner", 1, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let id = claimed[0].task_id;
    assert_eq!(id, steps[0].task_id);
    // Only the owner gives it back.
    assert_conflict(s.release_step(id, "someone-else").await, Some("ready"));
    s.release_step(id, "owner").await.unwrap();
    assert_eq!(
        s.get_step(id).await.unwrap(),
        steps[0],
        "released unchanged"
    );
    assert_conflict(s.release_step(id, "owner").await, Some("ready"));
    let both = s
        .claim_ready_steps("other", 5, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(both.len(), 2);
    // update_step drops the claim: a step sent back to ready is claimable at once.
    s.update_step(
        id,
        &[StepStatus::Ready],
        StepStatus::Dispatched,
        &StepPatch::default(),
    )
    .await
    .unwrap();
    assert_conflict(s.release_step(id, "other").await, Some("dispatched"));
    s.update_step(
        id,
        &[StepStatus::Dispatched],
        StepStatus::Ready,
        &StepPatch::default(),
    )
    .await
    .unwrap();
    let back = s
        .claim_ready_steps("third", 5, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(
        back.iter().map(|st| st.task_id).collect::<Vec<_>>(),
        vec![id]
    );
}

pub async fn overdue_steps(h: &Harness) {
    let s = &*h.store;
    let (_, steps) = queued_with_ready_steps(s, 5).await;
    let now = Utc::now();
    let set = |i: usize, to: StepStatus, deadline_secs: i64| {
        let task_id = steps[i].task_id;
        async move {
            s.update_step(
                task_id,
                &[StepStatus::Ready],
                to,
                &StepPatch {
                    deadline_at: Some(now + ChronoDuration::seconds(deadline_secs)),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }
    };
    set(0, StepStatus::Dispatched, -10).await;
    set(1, StepStatus::Running, -20).await;
    set(2, StepStatus::Running, 60).await;
    set(3, StepStatus::Completed, -30).await;
    // Step 4 stays ready with no deadline.
    let overdue = s.overdue_steps(now, 10).await.unwrap();
    assert_eq!(
        overdue.iter().map(|st| st.seq).collect::<Vec<_>>(),
        vec![1, 0],
        "earliest deadline first"
    );
    assert_eq!(s.overdue_steps(now, 1).await.unwrap().len(), 1);
    let later = s
        .overdue_steps(now + ChronoDuration::seconds(120), 10)
        .await
        .unwrap();
    assert_eq!(
        later.iter().map(|st| st.seq).collect::<Vec<_>>(),
        vec![1, 0, 2]
    );
}

pub async fn logs_order_and_after_id(h: &Harness) {
    let s = &*h.store;
    let a = s.create_request(&new_request("a")).await.unwrap();
    let b = s.create_request(&new_request("b")).await.unwrap();
    let line = |req: Uuid, i: u32| NewLogLine {
        request_id: req,
        task_id: i.is_multiple_of(2).then(Uuid::new_v4),
        at: Utc::now(),
        kind: if i.is_multiple_of(2) {
            "output"
        } else {
            "status"
        }
        .into(),
        progress: (i % 2 == 1).then_some(i * 10),
        message: format!("line {i}"),
    };
    s.append_logs(&[line(a.id, 0), line(b.id, 100), line(a.id, 1)])
        .await
        .unwrap();
    s.append_logs(&[]).await.unwrap();
    // Through a group commit, as the engine writes an agent's progress.
    let slots = s
        .commit_group(&[GroupWrite::Logs((2..6).map(|i| line(a.id, i)).collect())])
        .await
        .unwrap();
    assert!(matches!(slots[0], Ok(Written::Appended)));
    let all = s.logs(a.id, None, 100).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|l| l.line.message.as_str())
            .collect::<Vec<_>>(),
        (0..6).map(|i| format!("line {i}")).collect::<Vec<_>>()
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(all[1].line.progress, Some(10));
    assert_eq!(all[1].line.kind, "status");
    assert!(all[0].line.task_id.is_some());
    assert_eq!(all[0].line.progress, None);
    assert_micros(all[0].line.at);
    let after = s.logs(a.id, Some(all[2].id), 2).await.unwrap();
    assert_eq!(after, all[3..5].to_vec());
    assert!(s.logs(a.id, Some(all[5].id), 10).await.unwrap().is_empty());
    let bl = s.logs(b.id, None, 10).await.unwrap();
    assert_eq!(bl.len(), 1);
    assert_eq!(bl[0].line.message, "line 100");
}

pub async fn heartbeats_and_agents(h: &Harness) {
    let s = &*h.store;
    assert!(s.agents().await.unwrap().is_empty());
    let t0 = Utc::now();
    s.record_heartbeat(&heartbeat("alpha", 10.0), t0, Some("agent-a"))
        .await
        .unwrap();
    s.record_heartbeat(&heartbeat("beta", 20.0), t0, Some("agent-b"))
        .await
        .unwrap();
    let newer = heartbeat("alpha", 55.5);
    let t1 = t0 + ChronoDuration::seconds(10);
    s.record_heartbeat(&newer, t1, Some("agent-a"))
        .await
        .unwrap();
    // A late heartbeat does not replace a newer one.
    s.record_heartbeat(
        &heartbeat("alpha", 99.0),
        t0 + ChronoDuration::seconds(5),
        Some("agent-a"),
    )
    .await
    .unwrap();
    let agents = s.agents().await.unwrap();
    assert_eq!(
        agents
            .iter()
            .map(|a| a.agent_id.as_str())
            .collect::<Vec<_>>(),
        vec!["alpha", "beta"]
    );
    assert_eq!(agents[0].heartbeat, newer);
    assert_eq!(
        agents[0].last_seen.timestamp_micros(),
        t1.timestamp_micros()
    );
    assert_eq!(agents[0].hostname, "alpha.lan");
    assert_eq!(agents[0].agent_type, "desktop");
    assert_micros(agents[0].last_seen);
    // Every heartbeat left a resource_metrics row.
    let rows = h
        .raw
        .execute_raw("UPDATE resource_metrics SET running_tasks = running_tasks")
        .await
        .unwrap();
    assert_eq!(rows, 4);
    assert_eq!(agents[0].broker_user.as_deref(), Some("agent-a"));

    // Another broker user cannot take a live agent's id over.
    let e = s
        .record_heartbeat(
            &heartbeat("alpha", 1.0),
            t1 + ChronoDuration::seconds(1),
            Some("mallory"),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    assert_eq!(s.agents().await.unwrap()[0].heartbeat, newer);
    // Once it has been silent long enough, the id may move to another user.
    let later = t1 + crate::store::AGENT_TAKEOVER_AFTER + ChronoDuration::seconds(1);
    s.record_heartbeat(&heartbeat("alpha", 2.0), later, Some("agent-a2"))
        .await
        .unwrap();
    assert_eq!(
        s.agents().await.unwrap()[0].broker_user.as_deref(),
        Some("agent-a2")
    );
}

pub async fn identities_and_step_binding(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    assert_eq!(r.submitted_by, "token:alice");
    assert_eq!(
        s.get_request(r.id).await.unwrap().submitted_by,
        "token:alice"
    );
    s.transition(
        r.id,
        RequestStatus::Planning,
        RequestStatus::Queued,
        &with_plan(plan(1)),
    )
    .await
    .unwrap();
    let st = s.steps(r.id).await.unwrap().remove(0);
    assert_eq!(st.broker_user, None);
    assert_eq!(st.status, StepStatus::Ready, "queued made it ready");
    let attempt1 = StepPatch {
        attempt: Some(1),
        ..Default::default()
    };
    s.update_step(
        st.task_id,
        &[StepStatus::Ready],
        StepStatus::Dispatched,
        &attempt1,
    )
    .await
    .unwrap();
    // Not the current attempt: nothing is bound.
    assert!(!s
        .bind_step_publisher(st.task_id, 2, "agent-a")
        .await
        .unwrap());
    assert!(s
        .bind_step_publisher(st.task_id, 1, "agent-a")
        .await
        .unwrap());
    assert!(s
        .bind_step_publisher(st.task_id, 1, "agent-a")
        .await
        .unwrap());
    assert!(!s
        .bind_step_publisher(st.task_id, 1, "mallory")
        .await
        .unwrap());
    assert_eq!(
        s.get_step(st.task_id).await.unwrap().broker_user.as_deref(),
        Some("agent-a")
    );
    // A new attempt starts unbound and may go to another agent.
    s.update_step(
        st.task_id,
        &[StepStatus::Dispatched],
        StepStatus::Ready,
        &StepPatch::default(),
    )
    .await
    .unwrap();
    let attempt2 = StepPatch {
        attempt: Some(2),
        ..Default::default()
    };
    s.update_step(
        st.task_id,
        &[StepStatus::Ready],
        StepStatus::Dispatched,
        &attempt2,
    )
    .await
    .unwrap();
    assert_eq!(s.get_step(st.task_id).await.unwrap().broker_user, None);
    // Two agents racing for one attempt: exactly one wins.
    let (a, b) = tokio::join!(
        s.bind_step_publisher(st.task_id, 2, "agent-b"),
        s.bind_step_publisher(st.task_id, 2, "agent-c"),
    );
    assert!(a.unwrap() ^ b.unwrap());
}

/// A step change made by a report (`reported_by`) binds the attempt to its reporter in the
/// same statement, and is refused for an attempt bound to someone else.
pub async fn reported_by_binds_the_attempt(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    s.transition(
        r.id,
        RequestStatus::Planning,
        RequestStatus::Queued,
        &with_plan(plan(1)),
    )
    .await
    .unwrap();
    let st = s.steps(r.id).await.unwrap().remove(0);
    let dispatch = |attempt: u32, to: Option<&str>| StepPatch {
        attempt: Some(attempt),
        reported_by: to.map(String::from),
        ..Default::default()
    };
    // Dispatched to an agent's own queue: bound by the mark itself.
    s.update_step(
        st.task_id,
        &[StepStatus::Ready],
        StepStatus::Dispatched,
        &dispatch(1, Some("agent-a")),
    )
    .await
    .unwrap();
    assert_eq!(
        s.get_step(st.task_id).await.unwrap().broker_user.as_deref(),
        Some("agent-a")
    );
    let report = |by: &str| StepPatch {
        progress: Some(10),
        reported_by: Some(by.into()),
        ..Default::default()
    };
    let active = [StepStatus::Dispatched, StepStatus::Running];
    assert!(matches!(
        s.update_step(st.task_id, &active, StepStatus::Running, &report("mallory"))
            .await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(s.get_step(st.task_id).await.unwrap().progress, 0);
    let running = s
        .update_step(st.task_id, &active, StepStatus::Running, &report("agent-a"))
        .await
        .unwrap();
    assert_eq!(running.progress, 10);
    // A new attempt on the shared queue starts unbound; the first report binds it.
    s.update_step(
        st.task_id,
        &active,
        StepStatus::Ready,
        &StepPatch::default(),
    )
    .await
    .unwrap();
    s.update_step(
        st.task_id,
        &[StepStatus::Ready],
        StepStatus::Dispatched,
        &dispatch(2, None),
    )
    .await
    .unwrap();
    assert_eq!(s.get_step(st.task_id).await.unwrap().broker_user, None);
    let (by_b, by_c) = (report("agent-b"), report("agent-c"));
    let (b, c) = tokio::join!(
        s.update_step(st.task_id, &active, StepStatus::Running, &by_b),
        s.update_step(st.task_id, &active, StepStatus::Running, &by_c),
    );
    assert!(
        b.is_ok() ^ c.is_ok(),
        "exactly one reporter wins the attempt"
    );
    let winner = if b.is_ok() { "agent-b" } else { "agent-c" };
    let step = s.get_step(st.task_id).await.unwrap();
    assert_eq!(step.broker_user.as_deref(), Some(winner));
    assert_eq!(step.attempt, 2);
}

pub async fn step_previews(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    s.transition(
        r.id,
        RequestStatus::Planning,
        RequestStatus::AwaitingApproval,
        &with_plan(plan(2)),
    )
    .await
    .unwrap();
    let st = s.steps(r.id).await.unwrap().remove(0);
    assert_eq!(st.preview, None);
    let now = Utc::now();
    let mut p = StepPreview {
        status: PreviewStatus::Pending,
        task_id: Uuid::new_v4(),
        changed: None,
        diff: None,
        error: None,
        broker_user: None,
        requested_at: now,
        deadline_at: now + ChronoDuration::seconds(60),
        finished_at: None,
    };
    assert!(s.step_by_preview(p.task_id).await.unwrap().is_none());
    s.start_step_preview(st.task_id, &p).await.unwrap();
    let found = s.step_by_preview(p.task_id).await.unwrap().unwrap();
    assert_eq!(found.task_id, st.task_id);
    assert_eq!(
        found.preview.as_ref().unwrap().status,
        PreviewStatus::Pending
    );
    // Once only: the first outcome stays.
    p.status = PreviewStatus::Completed;
    p.changed = Some(true);
    p.diff = Some("--- a\n+++ b\n".into());
    assert!(s.finish_step_preview(st.task_id, &p).await.unwrap());
    let mut late = p.clone();
    late.status = PreviewStatus::Failed;
    assert!(!s.finish_step_preview(st.task_id, &late).await.unwrap());
    // Another preview task id never finishes this one.
    let mut other = p.clone();
    other.task_id = Uuid::new_v4();
    assert!(!s.finish_step_preview(st.task_id, &other).await.unwrap());
    let got = s.get_step(st.task_id).await.unwrap().preview.unwrap();
    assert_eq!(got.status, PreviewStatus::Completed);
    assert_eq!(got.diff.as_deref(), Some("--- a\n+++ b\n"));
    // The other step has none; an unknown step is NotFound.
    assert_eq!(s.steps(r.id).await.unwrap()[1].preview, None);
    assert!(matches!(
        s.start_step_preview(Uuid::new_v4(), &p).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// A preview and its entry commit together (`GroupWrite::Preview`): its outcome is stored
/// once, and a write that does not apply leaves no entry.
pub async fn group_previews(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    s.transition(
        r.id,
        RequestStatus::Planning,
        RequestStatus::AwaitingApproval,
        &with_plan(plan(1)),
    )
    .await
    .unwrap();
    let st = s.steps(r.id).await.unwrap().remove(0);
    let now = Utc::now();
    let pending = StepPreview {
        status: PreviewStatus::Pending,
        task_id: Uuid::new_v4(),
        changed: None,
        diff: None,
        error: None,
        broker_user: None,
        requested_at: now,
        deadline_at: now + ChronoDuration::seconds(60),
        finished_at: None,
    };
    let done = StepPreview {
        status: PreviewStatus::Completed,
        changed: Some(false),
        ..pending.clone()
    };
    let write = |task_id: Uuid, preview: &StepPreview, start: bool, n: u64| GroupWrite::Preview {
        task_id,
        preview: Box::new(preview.clone()),
        start,
        audit: vec![audit_entry(
            Some(r.id),
            if start {
                AuditEvent::PreviewStarted
            } else {
                AuditEvent::PreviewFinished
            },
            n,
        )],
    };
    let events = || async {
        s.audit_log(Some(r.id), 0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect::<Vec<_>>()
    };
    let slots = s
        .commit_group(&[
            write(st.task_id, &pending, true, 1),
            // Unknown step: nothing stored, no entry.
            write(Uuid::new_v4(), &pending, true, 2),
        ])
        .await
        .unwrap();
    assert!(matches!(slots[0], Ok(Written::Appended)));
    assert!(matches!(slots[1], Err(StoreError::Conflict { .. })));
    assert_eq!(events().await, vec![AuditEvent::PreviewStarted]);
    let slots = s
        .commit_group(&[
            write(st.task_id, &done, false, 3),
            // A second outcome of the same preview: refused, no entry.
            write(st.task_id, &done, false, 4),
        ])
        .await
        .unwrap();
    assert!(matches!(slots[0], Ok(Written::Appended)));
    assert!(matches!(slots[1], Err(StoreError::Conflict { .. })));
    assert_eq!(
        events().await,
        vec![AuditEvent::PreviewStarted, AuditEvent::PreviewFinished]
    );
    let got = s.get_step(st.task_id).await.unwrap().preview.unwrap();
    assert_eq!(got.status, PreviewStatus::Completed);
    assert!(s.verify_audit().await.unwrap().ok);
}

pub async fn planning_leases(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    let long = Duration::from_secs(60);
    // Never claimed and fresh: nobody resumes it yet.
    let long_ago = Utc::now() - ChronoDuration::minutes(5);
    assert!(s.planning_to_resume(long_ago, 10).await.unwrap().is_empty());
    // Never claimed and stale: resumed.
    let soon = Utc::now() + ChronoDuration::seconds(1);
    assert_eq!(s.planning_to_resume(soon, 10).await.unwrap()[0].id, r.id);
    assert!(s.claim_planning(r.id, "a", long).await.unwrap());
    assert!(
        !s.claim_planning(r.id, "b", long).await.unwrap(),
        "held by a"
    );
    assert!(s.claim_planning(r.id, "a", long).await.unwrap(), "a renews");
    assert!(
        s.planning_to_resume(soon, 10).await.unwrap().is_empty(),
        "leased"
    );
    // a's lease lapses (a died): b may take it, and it is listed to resume.
    assert!(s
        .claim_planning(r.id, "a", Duration::from_millis(1))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        s.planning_to_resume(long_ago, 10).await.unwrap()[0].id,
        r.id
    );
    assert!(s.claim_planning(r.id, "b", long).await.unwrap());
    assert!(!s.claim_planning(r.id, "a", long).await.unwrap());
    // Out of planning: nobody claims it.
    s.transition(
        r.id,
        RequestStatus::Planning,
        RequestStatus::Failed,
        &RequestPatch::default(),
    )
    .await
    .unwrap();
    assert!(!s.claim_planning(r.id, "b", long).await.unwrap());
    assert!(s.planning_to_resume(soon, 10).await.unwrap().is_empty());
}

pub async fn llm_reserve_over_budget(h: &Harness) {
    let s = &*h.store;
    let month = "2026-03";
    let first = reserved_id(
        s.reserve_llm(&reservation("anthropic", month, 600, 1000))
            .await
            .unwrap(),
    );
    assert_eq!(
        s.reserve_llm(&reservation("anthropic", month, 500, 1000))
            .await
            .unwrap(),
        Reservation::OverBudget {
            spent_micros: 0,
            reserved_micros: 600
        }
    );
    // Exactly at the budget is allowed.
    let second = reserved_id(
        s.reserve_llm(&reservation("anthropic", month, 400, 1000))
            .await
            .unwrap(),
    );
    assert_ne!(first, second);
    assert!(matches!(
        s.reserve_llm(&reservation("anthropic", month, 1, 1000))
            .await
            .unwrap(),
        Reservation::OverBudget { .. }
    ));
    // Settling for less than reserved frees the difference.
    s.settle_llm(
        first,
        &LlmSettlement {
            input_tokens: 1000,
            output_tokens: 200,
            cost_micros: 100,
            ok: true,
        },
    )
    .await
    .unwrap();
    reserved_id(
        s.reserve_llm(&reservation("anthropic", month, 500, 1000))
            .await
            .unwrap(),
    );
    assert_eq!(
        s.reserve_llm(&reservation("anthropic", month, 1, 1000))
            .await
            .unwrap(),
        Reservation::OverBudget {
            spent_micros: 100,
            reserved_micros: 900
        }
    );
    // Another provider has its own budget.
    reserved_id(
        s.reserve_llm(&reservation("openai", month, 1000, 1000))
            .await
            .unwrap(),
    );
    // A zero budget (a free provider reserves zero) still takes zero-cost calls.
    reserved_id(
        s.reserve_llm(&reservation("ollama", month, 0, 0))
            .await
            .unwrap(),
    );
}

pub async fn llm_concurrent_reservations(h: &Harness) {
    let s = &h.store;
    let fits = 7;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.reserve_llm(&reservation("anthropic", "2026-04", 100, 100 * fits))
                .await
                .unwrap()
        }));
    }
    let mut reserved = 0;
    for t in tasks {
        if let Reservation::Reserved { .. } = t.await.unwrap() {
            reserved += 1;
        }
    }
    assert_eq!(reserved, fits, "exactly the reservations that fit succeed");
    let spend = s.llm_spend("2026-04").await.unwrap();
    assert_eq!(spend.len(), 1);
    assert_eq!(spend[0].reserved_micros, 100 * fits);
    assert_eq!(spend[0].spent_micros, 0);
}

pub async fn llm_settle_and_monthly_spend(h: &Harness) {
    let s = &*h.store;
    let settle = |cost: i64, input: u64, output: u64| LlmSettlement {
        input_tokens: input,
        output_tokens: output,
        cost_micros: cost,
        ok: true,
    };
    let big = 1_000_000_000;
    let req = s.create_request(&new_request("x")).await.unwrap();
    let mut r = reservation("anthropic", "2026-05", 5000, big);
    r.request_id = Some(req.id);
    let a1 = reserved_id(s.reserve_llm(&r).await.unwrap());
    let a2 = reserved_id(
        s.reserve_llm(&reservation("anthropic", "2026-05", 5000, big))
            .await
            .unwrap(),
    );
    let a3 = reserved_id(
        s.reserve_llm(&reservation("anthropic", "2026-05", 5000, big))
            .await
            .unwrap(),
    );
    let o1 = reserved_id(
        s.reserve_llm(&reservation("openai", "2026-05", 2000, big))
            .await
            .unwrap(),
    );
    let june = reserved_id(
        s.reserve_llm(&reservation("anthropic", "2026-06", 7000, big))
            .await
            .unwrap(),
    );
    s.settle_llm(a1, &settle(1234, 100, 10)).await.unwrap();
    s.settle_llm(a2, &settle(4321, 200, 20)).await.unwrap();
    s.settle_llm(o1, &settle(2500, 300, 30)).await.unwrap();
    s.settle_llm(june, &settle(7000, 1, 1)).await.unwrap();
    // Settling twice is refused and counts nothing.
    assert_conflict(s.settle_llm(a1, &settle(1, 1, 1)).await, Some("settled"));
    // A failed call that still cost something is settled too.
    let mut failed = settle(11, 5, 0);
    failed.ok = false;
    s.settle_llm(a3, &failed).await.unwrap();

    let may = s.llm_spend("2026-05").await.unwrap();
    assert_eq!(
        may,
        vec![
            ProviderSpend {
                provider: "anthropic".into(),
                month: "2026-05".into(),
                spent_micros: 1234 + 4321 + 11,
                reserved_micros: 0,
                calls: 3,
                input_tokens: 305,
                output_tokens: 30,
            },
            ProviderSpend {
                provider: "openai".into(),
                month: "2026-05".into(),
                spent_micros: 2500,
                reserved_micros: 0,
                calls: 1,
                input_tokens: 300,
                output_tokens: 30,
            },
        ]
    );
    let jun = s.llm_spend("2026-06").await.unwrap();
    assert_eq!(jun.len(), 1);
    assert_eq!(jun[0].spent_micros, 7000);
    assert_eq!(jun[0].calls, 1);
    assert!(s.llm_spend("2026-07").await.unwrap().is_empty());
    // An open reservation shows as reserved.
    reserved_id(
        s.reserve_llm(&reservation("openai", "2026-05", 99, big))
            .await
            .unwrap(),
    );
    let may = s.llm_spend("2026-05").await.unwrap();
    assert_eq!(may[1].reserved_micros, 99);
    assert_eq!(may[1].spent_micros, 2500);
}

/// A provider that bills more than was reserved: the overage is recorded in full, and
/// once spend reaches the budget nothing more is reserved, not even a free call.
pub async fn llm_overage_closes_the_provider(h: &Harness) {
    let s = &*h.store;
    let month = "2026-09";
    let bill = |cost: i64| LlmSettlement {
        input_tokens: 10,
        output_tokens: 1000,
        cost_micros: cost,
        ok: true,
    };
    let a = reserved_id(
        s.reserve_llm(&reservation("anthropic", month, 300, 1000))
            .await
            .unwrap(),
    );
    let b = reserved_id(
        s.reserve_llm(&reservation("anthropic", month, 300, 1000))
            .await
            .unwrap(),
    );
    s.settle_llm(a, &bill(2000)).await.unwrap();
    assert_eq!(
        s.reserve_llm(&reservation("anthropic", month, 1, 1000))
            .await
            .unwrap(),
        Reservation::OverBudget {
            spent_micros: 2000,
            reserved_micros: 300
        }
    );
    // The call already in flight still records what it cost.
    s.settle_llm(b, &bill(500)).await.unwrap();
    for amount in [1, 0] {
        assert_eq!(
            s.reserve_llm(&reservation("anthropic", month, amount, 1000))
                .await
                .unwrap(),
            Reservation::OverBudget {
                spent_micros: 2500,
                reserved_micros: 0
            },
            "closed for the month"
        );
    }
    let spend = s.llm_spend(month).await.unwrap();
    assert_eq!(
        (
            spend[0].spent_micros,
            spend[0].calls,
            spend[0].output_tokens
        ),
        (2500, 2, 2000)
    );
    // Another month is open again.
    reserved_id(
        s.reserve_llm(&reservation("anthropic", "2026-10", 300, 1000))
            .await
            .unwrap(),
    );
}

/// A reservation never settled (its process crashed) stops counting once its lease has
/// passed; settled late, its real cost is still recorded.
pub async fn llm_reservation_lease(h: &Harness) {
    let s = &*h.store;
    let month = "2026-11";
    let mut crashed = reservation("anthropic", month, 600, 1000);
    crashed.lease = Duration::from_millis(700);
    let crashed = reserved_id(s.reserve_llm(&crashed).await.unwrap());
    assert_eq!(
        s.reserve_llm(&reservation("anthropic", month, 500, 1000))
            .await
            .unwrap(),
        Reservation::OverBudget {
            spent_micros: 0,
            reserved_micros: 600
        }
    );
    assert_eq!(s.llm_spend(month).await.unwrap()[0].reserved_micros, 600);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        s.llm_spend(month).await.unwrap()[0].reserved_micros,
        0,
        "an expired reservation no longer counts"
    );
    let live = reserved_id(
        s.reserve_llm(&reservation("anthropic", month, 500, 1000))
            .await
            .unwrap(),
    );
    assert_eq!(s.llm_spend(month).await.unwrap()[0].reserved_micros, 500);
    // The crashed caller comes back after all: its cost counts, its reservation not again.
    s.settle_llm(
        crashed,
        &LlmSettlement {
            input_tokens: 1,
            output_tokens: 1,
            cost_micros: 100,
            ok: true,
        },
    )
    .await
    .unwrap();
    reserved_id(
        s.reserve_llm(&reservation("anthropic", month, 400, 1000))
            .await
            .unwrap(),
    );
    assert_eq!(
        s.reserve_llm(&reservation("anthropic", month, 1, 1000))
            .await
            .unwrap(),
        Reservation::OverBudget {
            spent_micros: 100,
            reserved_micros: 900
        }
    );
    s.settle_llm(
        live,
        &LlmSettlement {
            input_tokens: 1,
            output_tokens: 1,
            cost_micros: 50,
            ok: true,
        },
    )
    .await
    .unwrap();
    let spend = s.llm_spend(month).await.unwrap();
    assert_eq!((spend[0].spent_micros, spend[0].calls), (150, 2));
    assert_eq!(spend[0].reserved_micros, 400);
}

pub async fn plan_cache(h: &Harness) {
    let s = &*h.store;
    assert_eq!(s.cached_plan("k1").await.unwrap(), None);
    let p = plan(2);
    s.cache_plan("k1", &p).await.unwrap();
    assert_eq!(s.cached_plan("k1").await.unwrap(), Some(p.clone()));
    let mut p2 = plan(3);
    p2.summary = "replaced".into();
    s.cache_plan("k1", &p2).await.unwrap();
    assert_eq!(s.cached_plan("k1").await.unwrap(), Some(p2));
    assert_eq!(s.cached_plan("k2").await.unwrap(), None);
}

pub async fn audit_append_and_read(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    assert!(s.append_audit(&[]).await.unwrap().is_empty());
    let batch = s
        .append_audit(&[
            audit_entry(Some(r.id), AuditEvent::Received, 1),
            audit_entry(None, AuditEvent::AgentError, 2),
            audit_entry(Some(r.id), AuditEvent::Planned, 3),
        ])
        .await
        .unwrap();
    let more = s
        .append_audit(&[audit_entry(Some(r.id), AuditEvent::Approved, 4)])
        .await
        .unwrap();
    let last = s
        .append_audit(&[audit_entry(None, AuditEvent::MessageRefused, 5)])
        .await
        .unwrap();
    let all: Vec<AuditEntry> = batch.into_iter().chain(more).chain(last).collect();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(all[0].prev_hash, chain::GENESIS);
    for w in all.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
    }
    for e in &all {
        assert_micros(e.at);
        let text = serde_json::to_string(&e.details).unwrap();
        assert_eq!(
            e.hash,
            chain::entry_hash(
                None,
                &e.prev_hash,
                e.seq,
                e.at,
                e.request_id,
                &e.actor,
                &e.event,
                &text
            )
        );
    }
    assert_eq!(s.audit_log(None, 0, 100).await.unwrap(), all);
    assert_eq!(s.audit_log(None, 2, 2).await.unwrap(), all[2..4].to_vec());
    let mine = s.audit_log(Some(r.id), 0, 100).await.unwrap();
    assert_eq!(
        mine.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
    assert_eq!(
        s.audit_log(Some(r.id), 1, 1).await.unwrap(),
        vec![all[2].clone()]
    );
    let v = s.verify_audit().await.unwrap();
    assert_eq!(
        v,
        AuditVerification {
            ok: true,
            entries_checked: 5,
            first_bad_seq: None,
            problem: None
        }
    );
}

pub async fn audit_concurrent_appenders(h: &Harness) {
    let s = &h.store;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..5u64 {
                let batch = s
                    .append_audit(&[
                        audit_entry(None, AuditEvent::ALL[t as usize], i * 2),
                        audit_entry(None, AuditEvent::ALL[t as usize], i * 2 + 1),
                    ])
                    .await
                    .unwrap();
                assert_eq!(batch.len(), 2);
                assert_eq!(batch[1].seq, batch[0].seq + 1, "a batch stays together");
                assert_eq!(batch[1].prev_hash, batch[0].hash);
                mine.extend(batch);
            }
            mine
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await.unwrap().into_iter().map(|e| e.seq));
    }
    seqs.sort();
    assert_eq!(
        seqs,
        (1..=80).collect::<Vec<i64>>(),
        "a linear chain, no fork"
    );
    let all = s.audit_log(None, 0, 1000).await.unwrap();
    assert_eq!(all.len(), 80);
    let v = s.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.entries_checked, 80);
}

/// Group commits racing for the audit chain's head (one store, or several instances on one
/// database): one chain, no fork and no entry lost, each request naming its own entry. A
/// store that assumes the head it last moved (PostgreSQL) finds it moved by the others and
/// applies its group again with the head locked.
pub async fn group_commits_race_for_the_head(h: &Harness) {
    let s = &h.store;
    // Warm: this store has moved the head once.
    s.append_audit(&[audit_entry(None, AuditEvent::Received, 0)])
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..5u64 {
                let r = new_request(&format!("{t}-{i}"));
                let slots = s
                    .commit_group(&[
                        GroupWrite::Create {
                            request: Box::new(r.clone()),
                            audit: vec![audit_entry(Some(r.id), AuditEvent::Received, t * 10 + i)],
                        },
                        GroupWrite::Audit(vec![audit_entry(None, AuditEvent::Planned, t * 10 + i)]),
                    ])
                    .await
                    .unwrap();
                assert!(slots.iter().all(|s| s.is_ok()), "{slots:?}");
                ids.push(r.id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let all = s.audit_log(None, 0, 1000).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=81).collect::<Vec<i64>>(),
        "a linear chain, no fork, nothing lost"
    );
    for id in ids {
        assert_eq!(s.audit_log(Some(id), 0, 10).await.unwrap().len(), 1);
    }
    let v = s.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
    // And on after the race, from the head as it is.
    let r = new_request("after");
    s.commit_group(&[GroupWrite::Create {
        request: Box::new(r.clone()),
        audit: vec![audit_entry(Some(r.id), AuditEvent::Received, 99)],
    }])
    .await
    .unwrap();
    assert_eq!(s.audit_log(None, 81, 10).await.unwrap().len(), 1);
    assert!(s.verify_audit().await.unwrap().ok);
}

/// Groups committed side by side (as the engine does, up to
/// [`Requests::concurrent_groups`](crate::store::Requests::concurrent_groups)), some of their
/// status changes refused (so the entries after them move up the chain): the chain stays
/// linear, and each request changed names its own newest entry, whichever group reached
/// the head first.
pub async fn concurrent_groups_name_their_newest_entries(h: &Harness) {
    let s = &h.store;
    let mut ids = Vec::new();
    for i in 0..40u64 {
        let r = new_request(&format!("c-{i}"));
        s.commit_group(&[GroupWrite::Create {
            request: Box::new(r.clone()),
            audit: vec![audit_entry(Some(r.id), AuditEvent::Received, i)],
        }])
        .await
        .unwrap();
        ids.push(r.id);
    }
    let rejected = |id: Uuid, from: RequestStatus, n: u64| GroupWrite::Transition {
        id,
        from,
        to: RequestStatus::Rejected,
        patch: Box::new(RequestPatch {
            audit: vec![
                audit_entry(Some(id), AuditEvent::Planned, n),
                audit_entry(Some(id), AuditEvent::Rejected, n),
            ],
            ..Default::default()
        }),
    };
    let mut tasks = Vec::new();
    for (t, chunk) in ids.chunks(5).enumerate() {
        let s = s.clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            // Every other request from a status it is not in: refused, no entries.
            let writes: Vec<GroupWrite> = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let from = if i % 2 == 0 {
                        RequestStatus::Planning
                    } else {
                        RequestStatus::AwaitingApproval
                    };
                    rejected(*id, from, t as u64)
                })
                .chain([GroupWrite::Audit(vec![audit_entry(
                    None,
                    AuditEvent::Planned,
                    0,
                )])])
                .collect();
            let slots = s.commit_group(&writes).await.unwrap();
            for (i, slot) in slots.iter().take(chunk.len()).enumerate() {
                assert_eq!(slot.is_ok(), i % 2 == 0, "{slot:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = s.audit_log(None, 0, 1000).await.unwrap();
    // 40 received, 3 per accepted group of 5 pairs of entries (3 accepted: 6), 8 plain.
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=40 + 8 * 6 + 8).collect::<Vec<i64>>(),
        "a linear chain, no fork, nothing lost"
    );
    for (i, id) in ids.iter().enumerate() {
        let r = s.get_request(*id).await.unwrap();
        let mine = s.audit_log(Some(*id), 0, 10).await.unwrap();
        if i % 5 % 2 == 0 {
            assert_eq!(r.status, RequestStatus::Rejected);
            assert_eq!(mine.len(), 3);
        } else {
            assert_eq!(r.status, RequestStatus::Planning);
            assert_eq!(mine.len(), 1);
        }
        // The request names its newest entry.
        let newest = mine.iter().map(|e| e.seq).max().unwrap();
        let named = h
            .raw
            .execute_raw(&format!(
                "UPDATE tasks SET text = text WHERE text = 'c-{i}' AND audit_seq = {newest}"
            ))
            .await
            .unwrap();
        assert_eq!(
            named, 1,
            "request {i} does not name its newest entry {newest}"
        );
    }
    // Verify checks that each request's stored newest entry is one of its own.
    let v = s.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
}

pub async fn audit_detects_altered_details(h: &Harness) {
    let s = &*h.store;
    for i in 0..5 {
        s.append_audit(&[audit_entry(None, AuditEvent::Dispatched, i)])
            .await
            .unwrap();
    }
    assert!(s.verify_audit().await.unwrap().ok);
    let n = h
        .raw
        .execute_raw(r#"UPDATE audit_log SET details = '{"n":999}' WHERE seq = 3"#)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let v = s.verify_audit().await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, Some(3), "{v:?}");
    assert_eq!(v.entries_checked, 2);
    assert!(v.problem.as_deref().unwrap().contains("altered"), "{v:?}");

    // Same JSON value, different text: also not what was hashed.
    h.raw
        .execute_raw(r#"UPDATE audit_log SET details = '{"n":999 }' WHERE seq = 3"#)
        .await
        .unwrap();
    let v = s.verify_audit().await.unwrap();
    assert_eq!(v.first_bad_seq, Some(3), "{v:?}");

    // Another field, another row: the first bad one is reported.
    h.raw
        .execute_raw("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
        .await
        .unwrap();
    let v = s.verify_audit().await.unwrap();
    assert_eq!(v.first_bad_seq, Some(2), "{v:?}");

    // Details that are not JSON at all: still readable, and still caught.
    h.raw
        .execute_raw("UPDATE audit_log SET details = 'not json' WHERE seq = 1")
        .await
        .unwrap();
    let rows = s.audit_log(None, 0, 10).await.unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0].details, json!("not json"));
    let v = s.verify_audit().await.unwrap();
    assert_eq!(v.first_bad_seq, Some(1), "{v:?}");
    assert_eq!(v.entries_checked, 0);
}

pub async fn audit_detects_deleted_rows(h: &Harness) {
    let s = &*h.store;
    s.append_audit(
        &(0..4)
            .map(|i| audit_entry(None, AuditEvent::Dispatched, i))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert!(s.verify_audit().await.unwrap().ok);
    // Deleting the newest row leaves a valid-looking chain: only the head tells.
    assert_eq!(
        h.raw
            .execute_raw("DELETE FROM audit_log WHERE seq = 4")
            .await
            .unwrap(),
        1
    );
    let v = s.verify_audit().await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, Some(4), "{v:?}");
    assert_eq!(v.entries_checked, 3);
    assert!(v.problem.as_deref().unwrap().contains("deleted"), "{v:?}");
    // A row in the middle.
    h.raw
        .execute_raw("DELETE FROM audit_log WHERE seq = 2")
        .await
        .unwrap();
    let v = s.verify_audit().await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, Some(3), "{v:?}");
    assert!(v.problem.as_deref().unwrap().contains("missing"), "{v:?}");
}

/// The newest entries deleted and the chain's head moved back to the last one kept: the
/// chain alone is valid, but a request's status change names an entry that is gone.
pub async fn audit_detects_a_log_cut_back(h: &Harness) {
    let s = &*h.store;
    let r = s.create_request(&new_request("x")).await.unwrap();
    s.append_audit(&[audit_entry(Some(r.id), AuditEvent::Received, 1)])
        .await
        .unwrap();
    let patch = RequestPatch {
        audit: vec![
            audit_entry(Some(r.id), AuditEvent::Planned, 2),
            audit_entry(Some(r.id), AuditEvent::Rejected, 3),
        ],
        ..Default::default()
    };
    s.transition(
        r.id,
        RequestStatus::Planning,
        RequestStatus::Rejected,
        &patch,
    )
    .await
    .unwrap();
    s.append_audit(&[audit_entry(None, AuditEvent::AgentError, 4)])
        .await
        .unwrap();
    let v = s.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
    // Cut back to entry 2: the head moved back with it, so the chain itself is whole.
    for sql in [
        "DELETE FROM audit_log WHERE seq > 2",
        "UPDATE audit_head SET last_seq = 2, last_hash = (SELECT hash FROM audit_log WHERE seq = 2)",
    ] {
        h.raw.execute_raw(sql).await.unwrap();
    }
    let v = s.verify_audit().await.unwrap();
    assert!(!v.ok, "a log cut back passed: {v:?}");
    assert_eq!(v.first_bad_seq, Some(3), "{v:?}");
    assert_eq!(v.entries_checked, 2);
    let why = v.problem.unwrap();
    assert!(
        why.contains(&r.id.to_string()) && why.contains("missing"),
        "{why}"
    );
}

/// Two store instances (two pools, as two orchestrator processes would have) on one
/// database: claims, reservations and audit appends stay exclusive across them.
pub async fn commit_id_and_counts(h: &Harness) {
    let s = &*h.store;
    let a = new_request("first");
    let b = new_request("second");
    s.create_request(&a).await.unwrap();
    s.create_request(&b).await.unwrap();
    s.transition(
        b.id,
        RequestStatus::Planning,
        RequestStatus::Failed,
        &RequestPatch::default(),
    )
    .await
    .unwrap();
    let mut counts = s.request_counts().await.unwrap();
    counts.sort_by_key(|(st, _)| st.as_str());
    assert_eq!(
        counts,
        vec![(RequestStatus::Failed, 1), (RequestStatus::Planning, 1)]
    );
    let commit = "0123456789abcdef0123456789abcdef01234567";
    s.set_commit_id(b.id, commit).await.unwrap();
    s.set_commit_id(b.id, commit).await.unwrap();
    assert_eq!(
        s.get_request(b.id).await.unwrap().commit_id.as_deref(),
        Some(commit)
    );
    assert_conflict(
        s.set_commit_id(b.id, "ffffffffffffffffffffffffffffffffffffffff")
            .await,
        Some(commit),
    );
    assert!(matches!(
        s.set_commit_id(Uuid::new_v4(), commit).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// The git trail's backlog: requests that ended after approval without a commit id or a
/// refusal, oldest first; a `Commit` write takes one out of it, once.
pub async fn git_backlog(h: &Harness) {
    let s = &*h.store;
    let approved = RequestPatch {
        approver: Some("bob".into()),
        ..Default::default()
    };
    let mut ids = Vec::new();
    for text in ["never approved", "completed", "failed", "still queued"] {
        let r = s.create_request(&new_request(text)).await.unwrap();
        ids.push(r.id);
        if text == "never approved" {
            s.transition(
                r.id,
                RequestStatus::Planning,
                RequestStatus::Cancelled,
                &RequestPatch::default(),
            )
            .await
            .unwrap();
            continue;
        }
        s.transition(
            r.id,
            RequestStatus::Planning,
            RequestStatus::Queued,
            &approved,
        )
        .await
        .unwrap();
        let end = match text {
            "completed" => RequestStatus::Completed,
            "failed" => RequestStatus::Failed,
            _ => continue,
        };
        s.transition(r.id, RequestStatus::Queued, end, &RequestPatch::default())
            .await
            .unwrap();
        // Distinct end times, so the order is known.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let later = Utc::now() + ChronoDuration::seconds(1);
    let backlog = |before, limit| async move {
        s.uncommitted(before, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(backlog(later, 10).await, vec![ids[1], ids[2]]);
    assert_eq!(backlog(later, 1).await, vec![ids[1]]);
    let long_ago = Utc::now() - ChronoDuration::hours(1);
    assert_eq!(backlog(long_ago, 10).await, Vec::<Uuid>::new());

    let commit = "0123456789abcdef0123456789abcdef01234567";
    let before = s.audit_log(None, 0, 100).await.unwrap().len();
    let write = |id, commit: Result<&str, &str>, n| GroupWrite::Commit {
        id,
        commit: commit.map(str::to_string).map_err(str::to_string),
        audit: vec![audit_entry(Some(id), AuditEvent::Committed, n)],
    };
    let slots = s
        .commit_group(&[
            write(ids[1], Ok(commit), 1),
            write(ids[2], Err("a different record is committed"), 2),
            write(Uuid::new_v4(), Ok(commit), 3),
        ])
        .await
        .unwrap();
    assert_eq!(
        written_request(&slots[0]).commit_id.as_deref(),
        Some(commit)
    );
    assert_eq!(written_request(&slots[1]).commit_id, None);
    assert!(matches!(slots[2], Err(StoreError::Conflict { .. })));
    assert_eq!(s.audit_log(None, 0, 100).await.unwrap().len(), before + 2);
    assert_eq!(backlog(later, 10).await, Vec::<Uuid>::new());
    // Stored once: a second outcome (another instance, a retry) changes nothing.
    let slots = s
        .commit_group(&[write(
            ids[1],
            Ok("ffffffffffffffffffffffffffffffffffffffff"),
            4,
        )])
        .await
        .unwrap();
    assert!(matches!(slots[0], Err(StoreError::Conflict { .. })));
    assert_eq!(s.audit_log(None, 0, 100).await.unwrap().len(), before + 2);
    assert_eq!(
        s.get_request(ids[1]).await.unwrap().commit_id.as_deref(),
        Some(commit)
    );
    assert!(s.verify_audit().await.unwrap().ok);
}

/// A completed step's result moves its request on in the same transaction: the next step
/// becomes ready, and after the last one the request completes with its entry; a step that
/// did not complete moves nothing.
pub async fn group_advance(h: &Harness) {
    let s = &*h.store;
    let r = queued_with_plan(s, "two steps", 2).await;
    let steps = s.steps(r.id).await.unwrap();
    let finish = |task_id, to| GroupWrite::Step {
        task_id,
        from: vec![StepStatus::Ready],
        to,
        patch: Box::new(StepPatch {
            finished_at: Some(Utc::now()),
            ..Default::default()
        }),
        logs: Vec::new(),
        audit: Vec::new(),
    };
    let advance = |after_seq, n| GroupWrite::Advance {
        request_id: r.id,
        after_seq,
        audit: vec![audit_entry(Some(r.id), AuditEvent::Completed, n)],
    };
    // A step that failed moves nothing on.
    let other = queued_with_plan(s, "fails", 2).await;
    let other_steps = s.steps(other.id).await.unwrap();
    let slots = s
        .commit_group(&[
            finish(other_steps[0].task_id, StepStatus::Failed),
            GroupWrite::Advance {
                request_id: other.id,
                after_seq: 0,
                audit: vec![audit_entry(Some(other.id), AuditEvent::Completed, 0)],
            },
        ])
        .await
        .unwrap();
    assert!(matches!(slots[1], Ok(Written::Advanced(None))));
    assert_eq!(
        s.steps(other.id).await.unwrap()[1].status,
        StepStatus::Pending
    );
    assert_eq!(
        s.get_request(other.id).await.unwrap().status,
        RequestStatus::Queued
    );

    let slots = s
        .commit_group(&[
            finish(steps[0].task_id, StepStatus::Completed),
            advance(0, 1),
        ])
        .await
        .unwrap();
    assert!(matches!(slots[1], Ok(Written::Advanced(None))));
    assert_eq!(s.steps(r.id).await.unwrap()[1].status, StepStatus::Ready);
    assert_eq!(
        s.get_request(r.id).await.unwrap().status,
        RequestStatus::Queued
    );
    // A copy of that result again: the step is no longer ready, nothing moves.
    let slots = s
        .commit_group(&[
            finish(steps[0].task_id, StepStatus::Completed),
            advance(0, 2),
        ])
        .await
        .unwrap();
    assert!(matches!(slots[0], Err(StoreError::Conflict { .. })));
    assert!(matches!(slots[1], Ok(Written::Advanced(None))));

    let slots = s
        .commit_group(&[
            finish(steps[1].task_id, StepStatus::Completed),
            advance(1, 3),
        ])
        .await
        .unwrap();
    match &slots[1] {
        Ok(Written::Advanced(Some(done))) => assert_eq!(done.status, RequestStatus::Completed),
        other => panic!("expected the completed request, got {other:?}"),
    }
    assert_eq!(
        s.get_request(r.id).await.unwrap().status,
        RequestStatus::Completed
    );
    let ns: Vec<serde_json::Value> = s
        .audit_log(Some(r.id), 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.details["n"].clone())
        .collect();
    assert_eq!(ns, [json!(3)], "the completion's entry, once");
    // Completed already: advancing again completes nothing twice.
    let slots = s.commit_group(&[advance(1, 4)]).await.unwrap();
    assert!(matches!(slots[0], Ok(Written::Advanced(None))));
    assert_eq!(s.audit_log(Some(r.id), 0, 100).await.unwrap().len(), 1);
    assert!(s.verify_audit().await.unwrap().ok);
}

/// Many requests' writes of one kind in one group are applied together (multi-row
/// statements), with the outcomes of applying them one by one: each slot its own, a write
/// that lost its race (or may not apply) changes and appends nothing, the entries of the
/// others chain in the group's order, and each request names its own newest entry even when
/// a loser before it left a gap (verify checks that).
pub async fn group_batches(h: &Harness) {
    let s = &*h.store;
    let old = s.create_request(&new_request("old")).await.unwrap();
    let news: Vec<NewRequest> = (0..3).map(|i| new_request(&format!("n{i}"))).collect();
    let ids: Vec<Uuid> = news.iter().map(|r| r.id).collect();
    let n_of = |entries: Vec<AuditEntry>| -> Vec<serde_json::Value> {
        entries
            .into_iter()
            .map(|e| e.details["n"].clone())
            .collect()
    };
    let log_after = |seq: i64| async move { n_of(s.audit_log(None, seq, 100).await.unwrap()) };
    let head = |entries: &[AuditEntry]| entries.last().map_or(0, |e| e.seq);
    let mut seen = head(&s.audit_log(None, 0, 1000).await.unwrap());

    // New requests, one with an existing id (and the claim it would have been born with).
    let create = |r: &NewRequest, n| GroupWrite::Create {
        request: Box::new(r.clone()),
        audit: vec![audit_entry(Some(r.id), AuditEvent::Received, n)],
    };
    let mut dup = new_request("dup");
    dup.id = old.id;
    let slots = s
        .commit_group(&[
            create(&news[0], 1),
            create(&dup, 2),
            GroupWrite::ClaimPlanning {
                id: dup.id,
                owner: "me".into(),
                lease: Duration::from_secs(30),
            },
            create(&news[1], 3),
            create(&news[2], 4),
        ])
        .await
        .unwrap();
    assert_eq!(written_request(&slots[0]).id, ids[0]);
    assert_conflict(slots[1].as_ref().map(|_| ()).map_err(clone_err), None);
    assert_conflict(slots[2].as_ref().map(|_| ()).map_err(clone_err), None);
    assert_eq!(written_request(&slots[3]).text, "n1");
    assert_eq!(written_request(&slots[4]).status, RequestStatus::Planning);
    assert_eq!(s.get_request(old.id).await.unwrap().text, "old");
    assert_eq!(log_after(seen).await, [json!(1), json!(3), json!(4)]);
    assert!(s.verify_audit().await.unwrap().ok);
    seen = head(&s.audit_log(None, seen, 100).await.unwrap());

    // Their plans, queued; a change that lost its race and an illegal one between them.
    let change = planned_change;
    let (planning, queued, running) = (
        RequestStatus::Planning,
        RequestStatus::Queued,
        RequestStatus::Running,
    );
    let slots = s
        .commit_group(&[
            change(ids[0], planning, queued, Some(plan(2)), 5),
            change(old.id, queued, running, None, 6),
            change(ids[1], planning, queued, Some(plan(2)), 7),
            change(ids[2], planning, RequestStatus::Completed, None, 8),
            change(ids[2], planning, queued, Some(plan(2)), 9),
        ])
        .await
        .unwrap();
    assert_eq!(written_request(&slots[0]).status, queued);
    assert_conflict(
        slots[1].as_ref().map(|_| ()).map_err(clone_err),
        Some("planning"),
    );
    assert_eq!(written_request(&slots[2]).status, queued);
    assert_conflict(slots[3].as_ref().map(|_| ()).map_err(clone_err), None);
    assert_eq!(written_request(&slots[4]).status, queued);
    assert_eq!(log_after(seen).await, [json!(5), json!(7), json!(9)]);
    assert!(s.verify_audit().await.unwrap().ok);
    seen = head(&s.audit_log(None, seen, 100).await.unwrap());
    let mut steps = Vec::new();
    for id in &ids {
        let st = s.steps(*id).await.unwrap();
        assert_eq!(
            st.iter().map(|s| s.status).collect::<Vec<_>>(),
            [StepStatus::Ready, StepStatus::Pending]
        );
        steps.push(st);
    }

    // Their first steps dispatched with their messages and the requests running; a mark
    // that lost its race, and so its message, store nothing.
    let now = Utc::now();
    let mark = |task_id, from| GroupWrite::Step {
        task_id,
        from: vec![from],
        to: StepStatus::Dispatched,
        patch: Box::new(StepPatch {
            attempt: Some(1),
            queue: Some("agent.infrastructure".into()),
            dispatched_at: Some(now),
            ..Default::default()
        }),
        logs: Vec::new(),
        audit: Vec::new(),
    };
    let message = |task_id| {
        GroupWrite::Send(OutboxMessage {
            id: Uuid::now_v7(),
            task_id,
            attempt: 1,
            queue: "agent.infrastructure".into(),
            body: "{}".into(),
            created_at: now,
        })
    };
    let slots = s
        .commit_group(&[
            mark(steps[0][0].task_id, StepStatus::Ready),
            mark(steps[1][0].task_id, StepStatus::Ready),
            mark(steps[2][1].task_id, StepStatus::Ready),
            mark(steps[2][0].task_id, StepStatus::Ready),
            message(steps[0][0].task_id),
            message(steps[1][0].task_id),
            message(steps[2][1].task_id),
            message(steps[2][0].task_id),
            change(ids[0], queued, running, None, 10),
            change(ids[1], queued, running, None, 11),
            change(ids[2], queued, running, None, 12),
        ])
        .await
        .unwrap();
    for i in [0, 1, 3] {
        match &slots[i] {
            Ok(Written::Step(st)) => {
                assert_eq!((st.status, st.attempt), (StepStatus::Dispatched, 1))
            }
            other => panic!("expected the dispatched step, got {other:?}"),
        }
        assert!(matches!(slots[i + 4], Ok(Written::Appended)));
    }
    assert_conflict(
        slots[2].as_ref().map(|_| ()).map_err(clone_err),
        Some("pending"),
    );
    assert_conflict(slots[6].as_ref().map(|_| ()).map_err(clone_err), None);
    for slot in &slots[8..] {
        assert_eq!(written_request(slot).status, running);
    }
    let due: Vec<Uuid> = s
        .outbox_due(now + ChronoDuration::seconds(1), 100)
        .await
        .unwrap()
        .iter()
        .map(|m| m.task_id)
        .collect();
    assert_eq!(due.len(), 3);
    assert!(!due.contains(&steps[2][1].task_id));
    assert_eq!(log_after(seen).await, [json!(10), json!(11), json!(12)]);
    seen = head(&s.audit_log(None, seen, 100).await.unwrap());

    // Results with their lines and entries, each moving its request on: the second steps
    // become ready, nothing completes.
    let result = |task_id, request_id, from, n| GroupWrite::Step {
        task_id,
        from: vec![from],
        to: StepStatus::Completed,
        patch: Box::new(StepPatch {
            finished_at: Some(Utc::now()),
            ..Default::default()
        }),
        logs: vec![NewLogLine {
            request_id,
            task_id: Some(task_id),
            at: Utc::now(),
            kind: "result".into(),
            progress: Some(100),
            message: format!("done {n}"),
        }],
        audit: vec![audit_entry(Some(request_id), AuditEvent::StepResult, n)],
    };
    let advance = |request_id, after_seq, n| GroupWrite::Advance {
        request_id,
        after_seq,
        audit: vec![audit_entry(Some(request_id), AuditEvent::Completed, n)],
    };
    let mut writes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let n = 13 + 2 * i as u64;
        writes.push(result(steps[i][0].task_id, *id, StepStatus::Dispatched, n));
        writes.push(advance(*id, 0, n + 1));
    }
    let slots = s.commit_group(&writes).await.unwrap();
    for i in 0..3 {
        assert!(matches!(slots[2 * i], Ok(Written::Step(_))));
        assert!(matches!(slots[2 * i + 1], Ok(Written::Advanced(None))));
        assert_eq!(s.steps(ids[i]).await.unwrap()[1].status, StepStatus::Ready);
        assert_eq!(s.get_request(ids[i]).await.unwrap().status, running);
        let lines = s.logs(ids[i], None, 10).await.unwrap();
        assert_eq!(lines.len(), 1);
    }
    assert_eq!(log_after(seen).await, [json!(13), json!(15), json!(17)]);
    seen = head(&s.audit_log(None, seen, 100).await.unwrap());

    // The last results: the first and third complete their requests; the second lost its
    // race (its step is ready, not dispatched), so its request does not complete, and the
    // third's entry takes the place the second's would have.
    let slots = s
        .commit_group(&[
            result(steps[0][1].task_id, ids[0], StepStatus::Ready, 19),
            advance(ids[0], 1, 20),
            result(steps[1][1].task_id, ids[1], StepStatus::Dispatched, 21),
            advance(ids[1], 1, 22),
            result(steps[2][1].task_id, ids[2], StepStatus::Ready, 23),
            advance(ids[2], 1, 24),
        ])
        .await
        .unwrap();
    assert_conflict(
        slots[2].as_ref().map(|_| ()).map_err(clone_err),
        Some("ready"),
    );
    assert!(matches!(slots[3], Ok(Written::Advanced(None))));
    for i in [1, 5] {
        match &slots[i] {
            Ok(Written::Advanced(Some(r))) => assert_eq!(r.status, RequestStatus::Completed),
            other => panic!("expected the completed request, got {other:?}"),
        }
    }
    assert_eq!(s.get_request(ids[1]).await.unwrap().status, running);
    assert_eq!(s.logs(ids[1], None, 10).await.unwrap().len(), 1);
    assert_eq!(
        log_after(seen).await,
        [json!(19), json!(23), json!(20), json!(24)],
        "the results, then the completions"
    );
    assert!(s.verify_audit().await.unwrap().ok);
    seen = head(&s.audit_log(None, seen, 100).await.unwrap());

    // Their git records, each stored once.
    let commit = |id, n| GroupWrite::Commit {
        id,
        commit: Ok(format!("{n:040x}")),
        audit: vec![audit_entry(Some(id), AuditEvent::Committed, n)],
    };
    let slots = s
        .commit_group(&[
            commit(ids[0], 25),
            commit(ids[2], 26),
            commit(Uuid::now_v7(), 27),
        ])
        .await
        .unwrap();
    assert_eq!(
        written_request(&slots[0]).commit_id.as_deref(),
        Some(format!("{:040x}", 25).as_str())
    );
    assert!(slots[1].is_ok());
    assert_conflict(slots[2].as_ref().map(|_| ()).map_err(clone_err), None);
    let slots = s
        .commit_group(&[commit(ids[0], 28), commit(ids[2], 29)])
        .await
        .unwrap();
    assert!(slots
        .iter()
        .all(|s| matches!(s, Err(StoreError::Conflict { .. }))));
    assert_eq!(log_after(seen).await, [json!(25), json!(26)]);
    assert!(s.verify_audit().await.unwrap().ok);
}

/// The steps of several requests in one read: each request's in plan order, as `steps`
/// gives them; a request without a plan, or unknown, is absent.
pub async fn steps_of_several_requests(h: &Harness) {
    let s = &*h.store;
    let mut planned = Vec::new();
    for n in [2, 3] {
        planned.push(queued_with_plan(s, "planned", n).await.id);
    }
    let bare = s.create_request(&new_request("no plan")).await.unwrap();
    let unknown = Uuid::now_v7();
    let all = s
        .steps_of(&[planned[1], bare.id, unknown, planned[0]])
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    for id in &planned {
        assert_eq!(all[id], s.steps(*id).await.unwrap());
    }
    assert_eq!(
        all[&planned[1]].iter().map(|s| s.seq).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(s.steps_of(&[]).await.unwrap().is_empty());
}

/// A plan queued with the id of its first step chosen by the caller, that step marked
/// dispatched with its message in the outbox and the request running, in one group commit:
/// all of it applies, in that order, and the step never shows as claimable. Without the
/// queued plan (a request no longer planning) none of it applies.
pub async fn queued_with_its_first_step_dispatched(h: &Harness) {
    let s = &*h.store;
    let group = |id: Uuid, first: Uuid| {
        let now = Utc::now();
        vec![
            GroupWrite::Transition {
                id,
                from: RequestStatus::Planning,
                to: RequestStatus::Queued,
                patch: Box::new(RequestPatch {
                    first_step_id: Some(first),
                    audit: vec![audit_entry(Some(id), AuditEvent::AutoApproved, 1)],
                    ..with_plan(plan(2))
                }),
            },
            GroupWrite::Step {
                task_id: first,
                from: vec![StepStatus::Ready],
                to: StepStatus::Dispatched,
                patch: Box::new(StepPatch {
                    attempt: Some(1),
                    queue: Some("agent.infrastructure".into()),
                    dispatched_at: Some(now),
                    deadline_at: Some(now + ChronoDuration::minutes(5)),
                    ..Default::default()
                }),
                logs: vec![],
                audit: vec![audit_entry(Some(id), AuditEvent::Dispatched, 2)],
            },
            GroupWrite::Send(OutboxMessage {
                id: Uuid::now_v7(),
                task_id: first,
                attempt: 1,
                queue: "agent.infrastructure".into(),
                body: "{}".into(),
                created_at: now - ChronoDuration::seconds(60),
            }),
            GroupWrite::Transition {
                id,
                from: RequestStatus::Queued,
                to: RequestStatus::Running,
                patch: Box::default(),
            },
        ]
    };
    let req = s
        .create_request(&new_request("straight to its agent"))
        .await
        .unwrap();
    let first = Uuid::now_v7();
    let slots = s.commit_group(&group(req.id, first)).await.unwrap();
    assert!(slots.iter().all(Result::is_ok), "{slots:?}");
    assert_eq!(
        s.get_request(req.id).await.unwrap().status,
        RequestStatus::Running
    );
    let steps = s.steps(req.id).await.unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].task_id, first);
    assert_eq!(
        (steps[0].status, steps[0].attempt),
        (StepStatus::Dispatched, 1)
    );
    assert_ne!(steps[1].task_id, first);
    assert_eq!(steps[1].status, StepStatus::Pending);
    assert!(s
        .claim_ready_steps("other", 10, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    let due = s.outbox_due(Utc::now(), 10).await.unwrap();
    assert_eq!(due.iter().map(|m| m.task_id).collect::<Vec<_>>(), [first]);
    let events: Vec<String> = s
        .audit_log(Some(req.id), 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(events, ["auto_approved", "dispatched"]);

    // Cancelled while it was planned: nothing is queued, marked or sent.
    let gone = s
        .create_request(&new_request("cancelled first"))
        .await
        .unwrap();
    s.transition(
        gone.id,
        RequestStatus::Planning,
        RequestStatus::Cancelled,
        &RequestPatch::default(),
    )
    .await
    .unwrap();
    let slots = s
        .commit_group(&group(gone.id, Uuid::now_v7()))
        .await
        .unwrap();
    assert!(slots.iter().all(Result::is_err), "{slots:?}");
    assert!(s.steps(gone.id).await.unwrap().is_empty());
    assert_eq!(s.outbox_due(Utc::now(), 10).await.unwrap().len(), 1);
    assert!(s.verify_audit().await.unwrap().ok);
}

/// Outbox messages are stored only with their step's mark (dispatched, that attempt),
/// listed once due, oldest first, and deleted once sent.
pub async fn outbox(h: &Harness) {
    let s = &*h.store;
    let (_, steps) = queued_with_ready_steps(s, 2).await;
    let now = Utc::now();
    s.update_step(
        steps[0].task_id,
        &[StepStatus::Ready],
        StepStatus::Dispatched,
        &StepPatch {
            attempt: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let message = |task_id, attempt, age: i64| OutboxMessage {
        id: Uuid::now_v7(),
        task_id,
        attempt,
        queue: "agent.infrastructure".into(),
        body: format!("{{\"attempt\": {attempt}}}"),
        created_at: now - ChronoDuration::seconds(age),
    };
    let first = message(steps[0].task_id, 1, 30);
    let later = message(steps[0].task_id, 1, 20);
    let slots = s
        .commit_group(&[
            GroupWrite::Send(later.clone()),
            GroupWrite::Send(first.clone()),
            // Not the step's attempt, and a step not dispatched: not stored.
            GroupWrite::Send(message(steps[0].task_id, 2, 30)),
            GroupWrite::Send(message(steps[1].task_id, 1, 30)),
        ])
        .await
        .unwrap();
    assert!(matches!(slots[0], Ok(Written::Appended)));
    assert!(matches!(slots[1], Ok(Written::Appended)));
    assert!(matches!(slots[2], Err(StoreError::Conflict { .. })));
    assert!(matches!(slots[3], Err(StoreError::Conflict { .. })));
    let due = s.outbox_due(now, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![first.id, later.id],
        "oldest first"
    );
    assert_eq!(due[0].body, first.body);
    assert_eq!(due[0].queue, first.queue);
    assert_eq!(due[0].attempt, 1);
    assert_eq!(
        due[0].created_at.timestamp_micros(),
        first.created_at.timestamp_micros()
    );
    assert_eq!(s.outbox_due(now, 1).await.unwrap().len(), 1);
    assert!(s
        .outbox_due(now - ChronoDuration::seconds(25), 10)
        .await
        .unwrap()
        .iter()
        .all(|m| m.id == first.id));
    s.commit_group(&[GroupWrite::Sent(vec![first.id, Uuid::now_v7()])])
        .await
        .unwrap();
    assert_eq!(
        s.outbox_due(now, 10)
            .await
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>(),
        vec![later.id]
    );
}

/// A request created and claimed for planning in one group: born claimed; another owner's
/// claim in a later group is a conflict in its slot, the owner's own renewal is not.
pub async fn born_claimed(h: &Harness) {
    let s = &*h.store;
    let new = new_request("born claimed");
    let claim = |owner: &str| GroupWrite::ClaimPlanning {
        id: new.id,
        owner: owner.into(),
        lease: Duration::from_secs(60),
    };
    let create = |n| GroupWrite::Create {
        request: Box::new(new.clone()),
        audit: vec![audit_entry(Some(new.id), AuditEvent::Received, n)],
    };
    let slots = s.commit_group(&[create(1), claim("a")]).await.unwrap();
    assert_eq!(written_request(&slots[0]).status, RequestStatus::Planning);
    assert!(matches!(slots[1], Ok(Written::Appended)));
    let slots = s.commit_group(&[claim("b"), claim("a")]).await.unwrap();
    assert!(matches!(slots[0], Err(StoreError::Conflict { .. })));
    assert!(matches!(slots[1], Ok(Written::Appended)));
    assert!(!s
        .claim_planning(new.id, "b", Duration::from_secs(60))
        .await
        .unwrap());
    // The same id created again with another's claim: neither is stored.
    let slots = s.commit_group(&[create(2), claim("b")]).await.unwrap();
    assert!(matches!(slots[0], Err(StoreError::Conflict { .. })));
    assert!(matches!(slots[1], Err(StoreError::Conflict { .. })));
    assert!(s
        .claim_planning(new.id, "a", Duration::from_secs(60))
        .await
        .unwrap());
    // Nothing to resume: its lease holds.
    assert!(s
        .planning_to_resume(Utc::now() + ChronoDuration::hours(1), 10)
        .await
        .unwrap()
        .is_empty());
}

pub async fn two_instances(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let (req, steps) = queued_with_ready_steps(&*a, 40).await;
    assert_eq!(
        b.get_request(req.id).await.unwrap().status,
        RequestStatus::Queued
    );
    let mut tasks = Vec::new();
    for (i, s) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            let owner = format!("engine-{i}");
            let mut claimed = Vec::new();
            loop {
                let batch = s
                    .claim_ready_steps(&owner, 3, Duration::from_secs(300))
                    .await
                    .unwrap();
                if batch.is_empty() {
                    break;
                }
                claimed.extend(batch.into_iter().map(|st| st.task_id));
            }
            let mut reserved = 0;
            for _ in 0..5 {
                if let Reservation::Reserved { .. } = s
                    .reserve_llm(&reservation("anthropic", "2026-08", 10, 100))
                    .await
                    .unwrap()
                {
                    reserved += 1;
                }
            }
            for n in 0..5 {
                s.append_audit(&[audit_entry(None, AuditEvent::Dispatched, n)])
                    .await
                    .unwrap();
            }
            (claimed, reserved)
        }));
    }
    let mut claimed = Vec::new();
    let mut reserved = 0;
    for t in tasks {
        let (c, r) = t.await.unwrap();
        claimed.extend(c);
        reserved += r;
    }
    let unique: HashSet<Uuid> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), 40, "no step claimed twice");
    assert_eq!(unique, steps.iter().map(|s| s.task_id).collect());
    assert_eq!(reserved, 10, "the budget fits exactly 10 reservations");
    let v = b.verify_audit().await.unwrap();
    assert!(v.ok && v.entries_checked == 20, "{v:?}");
}

/// A group's writes of one kind go to the database as one multi-row statement per batch:
/// each value comes back as it was written,
/// whatever it holds (quotes, commas, braces, backslashes, `NULL` as text, non-ASCII) and
/// however many rows there are (more than one batch).
pub async fn group_rows_keep_their_values(h: &Harness) {
    let s = &*h.store;
    let odd = |i: usize| format!("a \"quoted\", {{braced}} \\ NULL é\u{1F600} '{i}'");
    let n = super::sql::BATCH_ROWS + 7;
    let reqs: Vec<NewRequest> = (0..n)
        .map(|i| {
            let mut r = new_request(&odd(i));
            r.requester = format!("user,{i}");
            r.dry_run = i % 3 == 0;
            r
        })
        .collect();
    let writes: Vec<GroupWrite> = reqs
        .iter()
        .map(|r| GroupWrite::Create {
            request: Box::new(r.clone()),
            audit: vec![audit_entry(Some(r.id), AuditEvent::Received, 1)],
        })
        .collect();
    let slots = s.commit_group(&writes).await.unwrap();
    for (r, slot) in reqs.iter().zip(&slots) {
        let got = written_request(slot);
        assert_eq!(
            (got.id, &got.text, &got.requester),
            (r.id, &r.text, &r.requester)
        );
        assert_eq!(got.dry_run, r.dry_run);
    }

    // Their plans, with odd parameters; every other one with an approver, the others with
    // an empty comment.
    let plan_of = |i: usize| {
        let mut p = plan(1 + i % 2);
        p.steps[0]
            .parameters
            .insert("odd".into(), json!({ "v": odd(i), "list": [odd(i), null] }));
        p
    };
    let writes: Vec<GroupWrite> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| GroupWrite::Transition {
            id: r.id,
            from: RequestStatus::Planning,
            to: RequestStatus::Queued,
            patch: Box::new(RequestPatch {
                plan: Some(plan_of(i)),
                approver: (i % 2 == 0).then(|| odd(i)),
                approval_comment: (i % 2 == 1).then(String::new),
                audit: vec![audit_entry(Some(r.id), AuditEvent::Planned, 2)],
                ..Default::default()
            }),
        })
        .collect();
    for slot in s.commit_group(&writes).await.unwrap() {
        assert_eq!(written_request(&slot).status, RequestStatus::Queued);
    }
    let ids: Vec<Uuid> = reqs.iter().map(|r| r.id).collect();
    let steps = s.steps_of(&ids).await.unwrap();
    let mut firsts = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let got = s.get_request(r.id).await.unwrap();
        assert_eq!(got.plan.as_ref(), Some(&plan_of(i)));
        assert_eq!(got.approver, (i % 2 == 0).then(|| odd(i)));
        assert_eq!(got.approval_comment, (i % 2 == 1).then(String::new));
        let st = &steps[&r.id];
        assert_eq!(st.len(), 1 + i % 2);
        assert_eq!(st[0].parameters, plan_of(i).steps[0].parameters);
        assert_eq!(st[0].status, StepStatus::Ready);
        firsts.push(st[0].task_id);
    }

    // Their first steps changed at once: some fields set, others left as they were.
    let writes: Vec<GroupWrite> = firsts
        .iter()
        .enumerate()
        .map(|(i, t)| GroupWrite::Step {
            task_id: *t,
            from: vec![StepStatus::Ready, StepStatus::Pending],
            to: StepStatus::Dispatched,
            patch: Box::new(StepPatch {
                attempt: Some(1),
                agent_id: (i % 2 == 0).then(|| odd(i)),
                output: (i % 3 == 0).then(|| odd(i)),
                changed: (i % 4 == 0).then_some(i % 8 == 0),
                ..Default::default()
            }),
            logs: vec![NewLogLine {
                request_id: reqs[i].id,
                task_id: Some(*t),
                at: Utc::now(),
                kind: "status".into(),
                progress: (i % 2 == 0).then_some(50),
                message: odd(i),
            }],
            audit: vec![],
        })
        .collect();
    for slot in s.commit_group(&writes).await.unwrap() {
        assert!(matches!(slot, Ok(Written::Step(ref st)) if st.status == StepStatus::Dispatched));
    }
    for (i, t) in firsts.iter().enumerate() {
        let st = s.get_step(*t).await.unwrap();
        assert_eq!(st.agent_id, (i % 2 == 0).then(|| odd(i)));
        assert_eq!(st.output, (i % 3 == 0).then(|| odd(i)));
        assert_eq!(st.changed, (i % 4 == 0).then_some(i % 8 == 0));
        let logs = s.logs(reqs[i].id, None, 10).await.unwrap();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].line.message, odd(i));
        assert_eq!(logs[0].line.progress, (i % 2 == 0).then_some(50));
    }
    let v = s.verify_audit().await.unwrap();
    assert!(v.ok && v.entries_checked == 2 * n as u64, "{v:?}");
}
