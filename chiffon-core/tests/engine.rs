//! The engine's lifecycle with mock agents, on SQLite + the in-process bus and on
//! PostgreSQL + RabbitMQ.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chiffon_core::audit::git::GitTrail;
use chiffon_core::catalog::Catalog;
use chiffon_core::engine::*;
use chiffon_core::llm::FallbackEvent;
use chiffon_core::model::*;
use chiffon_core::store::Store;
use chiffon_core::transport::{ConsumeOptions, Transport};
use chiffon_protocol::*;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn catalog() -> Arc<Catalog> {
    Arc::new(
        Catalog::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/engine_catalog"
        ))
        .unwrap(),
    )
}

/// Plans "a, b" as the steps `a` then `b`, validated against the catalog like the real
/// planner; "unknown" actions fail planning with 5205.
struct ListPlanner {
    catalog: Arc<Catalog>,
}

#[async_trait]
impl PlanProvider for ListPlanner {
    async fn plan(&self, input: &PlanInput) -> Result<PlanOutcome, PlanError> {
        let mut steps = Vec::new();
        let mut cost = 0.01;
        for name in input.text.split(',').map(str::trim) {
            let spec = self.catalog.get(name).map_err(|e| PlanError {
                code: e.code(),
                message: e.to_string(),
                events: vec![],
                details: serde_json::json!({}),
            })?;
            let parameters = spec.validate(&Map::new()).unwrap();
            cost += spec.cost_usd;
            steps.push(PlanStep {
                action: name.into(),
                parameters,
                agent_type: spec.agent_type.clone(),
                resources: spec.resources.clone(),
                reason: "asked for".into(),
                provenance: Default::default(),
            });
        }
        Ok(PlanOutcome {
            plan: Plan {
                summary: format!("run {}", input.text),
                steps,
                risks: vec![],
                estimated_cost_usd: cost,
                llm_cost_usd: 0.01,
                provider: "test".into(),
                model: "list".into(),
                cached: false,
                skipped: Vec::new(),
            },
            events: vec![FallbackEvent {
                provider: "nowhere".into(),
                model: "none".into(),
                code: chiffon_protocol::ErrorCode::LlmUnavailable,
                reason: "not there".into(),
                cost_usd: 0.0,
                input_tokens: 0,
                output_tokens: 0,
            }],
            usage: PlanUsage {
                provider: "test".into(),
                model: "list".into(),
                input_tokens: 10,
                output_tokens: 5,
                llm_cost_usd: 0.01,
                cached: false,
            },
        })
    }
}

/// An agent that behaves by action name; counts the work it starts.
#[derive(Clone)]
struct MockAgent {
    transport: Arc<dyn Transport>,
    started: Arc<AtomicU32>,
    flaky_seen: Arc<std::sync::Mutex<std::collections::HashSet<Uuid>>>,
}

impl MockAgent {
    fn spawn(transport: Arc<dyn Transport>, stop: CancellationToken) -> MockAgent {
        let agent = MockAgent {
            transport,
            started: Arc::new(AtomicU32::new(0)),
            flaky_seen: Default::default(),
        };
        let a = agent.clone();
        tokio::spawn(async move { a.run(stop).await });
        agent
    }

    async fn run(self, stop: CancellationToken) {
        let t = self.transport.topology().clone();
        let queue = t.agent_queue("infrastructure");
        self.transport.declare_topology().await.unwrap();
        self.transport.declare_queue(&queue).await.unwrap();
        let mut consumer = self
            .transport
            .consume(&queue, ConsumeOptions { prefetch: 16 })
            .await
            .unwrap();
        let control = self.transport.subscribe_control().await.unwrap();
        let control = Arc::new(tokio::sync::Mutex::new(control));
        loop {
            let d = tokio::select! {
                _ = stop.cancelled() => return,
                d = consumer.next() => match d { Some(Ok(d)) => d, _ => return },
            };
            let env = d.parse().unwrap();
            let Message::WorkRequest(w) = env.body.clone() else {
                panic!("not a work request")
            };
            self.started.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            let control = control.clone();
            tokio::spawn(async move {
                // `quiet` is a short task: its result alone, as the agent kit's runner sends.
                let quiet = w.action == "quiet";
                if !quiet {
                    me.status(&env, &w, 10, "started").await;
                }
                let (status, error) = match w.action.as_str() {
                    "broken" => (
                        TaskState::Failed,
                        Some(ErrorPayload::new(ErrorCode::ActionFailed, "it broke")),
                    ),
                    "flaky" => {
                        let first = me.flaky_seen.lock().unwrap().insert(w.task_id);
                        if first {
                            (
                                TaskState::Failed,
                                Some(ErrorPayload::new(ErrorCode::ExecutorCrashed, "flaked")),
                            )
                        } else {
                            (TaskState::Completed, None)
                        }
                    }
                    "hang" => {
                        d.ack().await.unwrap();
                        return;
                    }
                    "slow" => {
                        let mut c = control.lock().await;
                        loop {
                            let Some(m) = c.next().await else { return };
                            if let Message::Cancel(cancel) = m.body {
                                if cancel.task_id == w.task_id {
                                    break;
                                }
                            }
                        }
                        (
                            TaskState::Cancelled,
                            Some(ErrorPayload::new(ErrorCode::TaskCancelled, "cancelled")),
                        )
                    }
                    _ => (TaskState::Completed, None),
                };
                if !quiet {
                    me.status(&env, &w, 60, "working").await;
                }
                let result = WorkResult {
                    task_id: w.task_id,
                    status,
                    output: if quiet {
                        "quiet line 1\nquiet line 2".into()
                    } else {
                        format!("ran {}", w.action)
                    },
                    duration_seconds: 0.01,
                    resource_usage: Default::default(),
                    error,
                    changed: Some(true),
                    diff: w.dry_run.then(|| "--- before\n+++ after\n".to_string()),
                    attempt: w.attempt,
                    agent_id: Some("mock-1".into()),
                };
                let results = me.transport.topology().results_queue.clone();
                let reply = env.reply(Message::WorkResult(result));
                me.transport.publish(&results, &reply).await.unwrap();
                if w.action == "dup" {
                    me.transport.publish(&results, &reply).await.unwrap();
                }
                d.ack().await.unwrap();
            });
        }
    }

    async fn status(&self, env: &Envelope, w: &WorkRequest, progress: u32, msg: &str) {
        let s = WorkStatus {
            task_id: w.task_id,
            status: TaskState::Running,
            progress,
            message: msg.into(),
            metrics: None,
            lines: vec![format!("{msg} {}", w.action)],
            agent_id: Some("mock-1".into()),
            attempt: Some(w.attempt),
        };
        let results = self.transport.topology().results_queue.clone();
        self.transport
            .publish(&results, &env.reply(Message::WorkStatus(s)))
            .await
            .unwrap();
    }
}

struct Harness {
    engine: Engine,
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    agent: Option<MockAgent>,
    stop: CancellationToken,
    git_dir: tempfile::TempDir,
    _guard: Box<dyn std::any::Any + Send>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn test_config(f: impl FnOnce(&mut EngineConfig)) -> EngineConfig {
    let mut c = EngineConfig::default();
    c.dispatch.tick = Duration::from_millis(50);
    c.dispatch.retry_backoff = Duration::from_millis(20);
    c.dispatch.cancel_timeout = Duration::from_secs(2);
    // Most tests count what the mock agent runs, or take work off the queue themselves:
    // the automatic dry run is on only where a test asks for it.
    c.approval.preview = false;
    f(&mut c);
    c
}

/// An engine over the test catalog and its list planner, not run.
fn new_engine(
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    git: &std::path::Path,
    config: EngineConfig,
) -> Engine {
    let cat = catalog();
    Engine::new(EngineParts {
        store,
        transport,
        planner: Arc::new(ListPlanner {
            catalog: cat.clone(),
        }),
        catalog: cat,
        git: Some(Arc::new(GitTrail::open_or_init(git).unwrap())),
        config,
    })
}

async fn start_engine(
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    git: &std::path::Path,
    config: EngineConfig,
    stop: &CancellationToken,
) -> Engine {
    let engine = new_engine(store, transport, git, config);
    let e = engine.clone();
    let s = stop.clone();
    tokio::spawn(async move { e.run(s).await.unwrap() });
    engine
}

/// Submits `ok_action` as alice, waits for its plan, approves it as bob and waits until it
/// completed (20 s each).
async fn ok_action_approved_and_completed(engine: &Engine) -> Request {
    let r = engine
        .submit(SubmitRequest {
            text: "ok_action".into(),
            requester: Some("alice".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::AwaitingApproval]),
    )
    .await
    .unwrap()
    .unwrap();
    engine.approve(r.id, "bob", None).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::Completed]),
    )
    .await
    .unwrap()
    .unwrap()
}

async fn harness(backend: &str, with_agent: bool, config: EngineConfig) -> Option<Harness> {
    let (store, transport, guard): (
        Arc<dyn Store>,
        Arc<dyn Transport>,
        Box<dyn std::any::Any + Send>,
    ) = match backend {
        "sqlite" => {
            let (s, dir) = support::sqlite_store().await;
            (s, support::memory_transport(), Box::new(dir))
        }
        _ => {
            let (s, db) = support::pg_store().await?;
            let (t, cleanup) = support::amqp_transport().await?;
            (s, t, Box::new((cleanup, db)))
        }
    };
    let stop = CancellationToken::new();
    let git_dir = tempfile::tempdir().unwrap();
    let engine = start_engine(
        store.clone(),
        transport.clone(),
        git_dir.path(),
        config,
        &stop,
    )
    .await;
    let agent = with_agent.then(|| MockAgent::spawn(transport.clone(), stop.clone()));
    Some(Harness {
        engine,
        store,
        transport,
        agent,
        stop,
        git_dir,
        _guard: guard,
    })
}

impl Harness {
    async fn submit(&self, text: &str, requester: &str, dry_run: bool) -> Uuid {
        let r = self
            .engine
            .submit(SubmitRequest {
                text: text.into(),
                requester: Some(requester.into()),
                dry_run,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.status, RequestStatus::Planning);
        r.id
    }

    async fn wait(&self, id: Uuid, status: RequestStatus) -> Request {
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            self.engine.wait_until(id, &[status]),
        )
        .await
        .unwrap_or_else(|_| panic!("request {id} never reached {status}"))
        .unwrap();
        assert_eq!(
            r.status, status,
            "request ended {:?}: {:?}",
            r.status, r.error
        );
        r
    }

    /// The request once the git trail has stored its commit id (written in the background,
    /// just after the request ends).
    async fn committed(&self, id: Uuid) -> Request {
        committed(&self.engine, id).await
    }

    /// The request's audit events. An ended request's last entries are appended just
    /// after its status changes: wait (briefly) for them.
    async fn events(&self, id: Uuid) -> Vec<String> {
        let ended = self.engine.get(id).await.is_ok_and(|v| {
            v.request.approver.is_some()
                && matches!(
                    v.request.status,
                    RequestStatus::Completed | RequestStatus::Failed | RequestStatus::Cancelled
                )
        });
        for _ in 0..100 {
            let events: Vec<String> = self
                .engine
                .audit_log(Some(id), 0, 1000)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.event)
                .collect();
            if !ended
                || events
                    .iter()
                    .any(|e| e == "committed" || e == "commit_failed")
            {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the audit of {id} never got its last entries")
    }

    fn git_log(&self) -> String {
        let out = std::process::Command::new("git")
            .args([
                "--git-dir",
                &self.git_dir.path().display().to_string(),
                "log",
                "--all",
                "--format=%an|%s",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.is_empty() {
            // A non-bare repository keeps its objects under .git.
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(self.git_dir.path())
                .args(["log", "--all", "--format=%an|%s"])
                .output()
                .unwrap();
            return String::from_utf8_lossy(&out.stdout).to_string();
        }
        text
    }
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite_memory {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name("sqlite").await } )*
        }
        mod postgres_amqp {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name("postgres").await } )*
        }
    };
}

both_backends!(
    approve_runs_to_completion_with_audit_and_commit,
    reject_is_recorded,
    cost_limit_rejects_before_asking,
    four_eyes_refuses_self_approval,
    auto_approval_skips_the_gate_and_says_why,
    dry_run_runs_in_check_mode,
    cancel_while_queued_and_awaiting,
    cancel_while_running_stops_the_agent,
    transient_failure_is_retried,
    permanent_failure_fails_the_request,
    agent_timeout_retries_then_fails,
    duplicate_results_apply_once,
    a_result_without_statuses_completes_its_step,
    unknown_action_is_never_executed,
    waits_for_capacity_then_dispatches,
    bus_intake_plans_like_http,
    two_engines_share_one_store_and_bus,
    audit_verify_detects_missing_commit,
    forged_bus_messages_are_refused,
    a_message_that_keeps_failing_is_dead_lettered,
    an_agent_error_is_acked_only_once_recorded,
    rejected_heartbeats_are_listed_until_fixed,
    agent_output_is_redacted_everywhere,
    a_plan_awaiting_approval_shows_its_dry_run,
    a_preview_nobody_answers_shows_as_failed,
    audit_verify_catches_a_rechained_or_emptied_log,
    a_keyed_chain_catches_a_rewrite_after_the_newest_anchor,
    a_failing_git_trail_degrades_health_and_a_stale_lock_is_cleared,
    planning_a_dead_instance_held_resumes_when_its_lease_lapses,
    a_crash_between_commit_and_status_keeps_the_one_commit,
    a_crash_between_mark_and_publish_is_relayed_from_the_outbox,
    an_auto_approved_first_step_goes_straight_to_its_agent,
);

async fn approve_runs_to_completion_with_audit_and_commit(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h.submit("ok_action, ok_action", "alice", false).await;
    let mut events = h.engine.subscribe(id);
    let r = h.wait(id, RequestStatus::AwaitingApproval).await;
    let plan = r.plan.unwrap();
    assert_eq!(plan.steps.len(), 2);
    assert_eq!(plan.steps[0].parameters["note"], "hello");
    assert!(
        h.agent.as_ref().unwrap().started.load(Ordering::SeqCst) == 0,
        "nothing runs before approval"
    );
    h.engine
        .approve(id, "bob", Some("looks fine".into()))
        .await
        .unwrap();
    let r = h.wait(id, RequestStatus::Completed).await;
    assert_eq!(r.approver.as_deref(), Some("bob"));
    assert_eq!(r.approval_comment.as_deref(), Some("looks fine"));
    let view = h.engine.get(id).await.unwrap();
    assert!(
        view.steps
            .iter()
            .all(|s| s.status == StepStatus::Completed && s.attempt == 1),
        "{:?}",
        view.steps
    );
    assert_eq!(view.steps[1].output.as_deref(), Some("ran ok_action"));
    // Live events: progress and output as they happened, then the final status.
    let mut kinds = Vec::new();
    while let Ok(ev) = events.try_recv() {
        kinds.push(ev.name());
    }
    assert!(
        kinds.contains(&"progress") && kinds.contains(&"output"),
        "{kinds:?}"
    );
    let logs = h.engine.logs(id, None, 100).await.unwrap();
    assert!(logs
        .iter()
        .any(|l| l.line.kind == "output" && l.line.message.contains("working ok_action")));
    let audit = h.events(id).await;
    for e in [
        "received",
        "fallback",
        "planned",
        "approved",
        "dispatched",
        "step_result",
        "completed",
        "committed",
    ] {
        assert!(audit.iter().any(|a| a == e), "audit lacks {e}: {audit:?}");
    }
    let commit = h
        .engine
        .get(id)
        .await
        .unwrap()
        .request
        .commit_id
        .expect("commit id stored");
    assert_eq!(commit.len(), 40);
    let log = h.git_log();
    assert!(
        log.contains(&format!("bob|infra({id}): run ok_action, ok_action")),
        "{log}"
    );
    let report = h.engine.verify_audit().await.unwrap();
    assert!(report.ok, "{report:?}");
}

async fn reject_is_recorded(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h.submit("ok_action", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    h.engine
        .reject(id, "bob", Some("not today".into()))
        .await
        .unwrap();
    let r = h.wait(id, RequestStatus::Rejected).await;
    assert_eq!(r.approver.as_deref(), Some("bob"));
    assert!(h.events(id).await.contains(&"rejected".to_string()));
    // A rejected request cannot be approved afterwards.
    let err = h.engine.approve(id, "bob", None).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::IllegalTransition);
    assert_eq!(h.agent.as_ref().unwrap().started.load(Ordering::SeqCst), 0);
}

async fn cost_limit_rejects_before_asking(backend: &str) {
    let config = test_config(|c| c.approval.cost_limit_usd = Some(1.0));
    let Some(h) = harness(backend, true, config).await else {
        return;
    };
    let id = h.submit("costly", "alice", false).await;
    let r = h.wait(id, RequestStatus::Rejected).await;
    assert_eq!(r.error.unwrap().code, ErrorCode::CostLimitExceeded);
    assert!(r.plan.is_some(), "the plan is kept so the person sees why");
    let ok = h.submit("ok_action", "alice", false).await;
    h.wait(ok, RequestStatus::AwaitingApproval).await;
}

async fn four_eyes_refuses_self_approval(backend: &str) {
    let config = test_config(|c| c.approval.four_eyes = true);
    let Some(h) = harness(backend, true, config).await else {
        return;
    };
    let id = h.submit("ok_action", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    let err = h.engine.approve(id, "alice", None).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::FourEyesViolation);
    assert_eq!(
        h.engine.get(id).await.unwrap().request.status,
        RequestStatus::AwaitingApproval
    );
    h.engine.approve(id, "bob", None).await.unwrap();
    h.wait(id, RequestStatus::Completed).await;

    // An admin filing a request "as bob" is still its submitter: neither the admin nor bob
    // may approve it alone.
    let r = h
        .engine
        .submit(SubmitRequest {
            text: "ok_action".into(),
            requester: Some("bob".into()),
            submitted_by: Some("token:admin".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    h.wait(r.id, RequestStatus::AwaitingApproval).await;
    for who in ["token:admin", "bob"] {
        let err = h.engine.approve(r.id, who, None).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::FourEyesViolation, "{who}");
    }
    h.engine.approve(r.id, "token:carol", None).await.unwrap();
    h.wait(r.id, RequestStatus::Completed).await;
}

async fn auto_approval_skips_the_gate_and_says_why(backend: &str) {
    let config = test_config(|c| c.approval.auto_approve_max_cost_usd = Some(0.5));
    let Some(h) = harness(backend, true, config).await else {
        return;
    };
    let id = h.submit("auto_ok", "alice", false).await;
    let r = h.wait(id, RequestStatus::Completed).await;
    assert_eq!(
        r.approver.as_deref(),
        Some("policy:auto_approve_under_0.5_usd")
    );
    let audit = h.engine.audit_log(Some(id), 0, 100).await.unwrap();
    let auto = audit
        .iter()
        .find(|e| e.event == "auto_approved")
        .expect("auto_approved audited");
    assert_eq!(auto.details["rule"], "auto_approve_under_0.5_usd");
    // An action not marked auto_approve still waits for a person.
    let other = h.submit("ok_action", "alice", false).await;
    h.wait(other, RequestStatus::AwaitingApproval).await;
}

async fn dry_run_runs_in_check_mode(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h.submit("ok_action", "alice", true).await;
    let r = h.wait(id, RequestStatus::Completed).await;
    assert!(r.dry_run);
    assert_eq!(r.approver.as_deref(), Some("policy:dry_run"));
    let view = h.engine.get(id).await.unwrap();
    assert_eq!(
        view.steps[0].diff.as_deref(),
        Some("--- before\n+++ after\n"),
        "the agent got dry_run = true"
    );
}

async fn cancel_while_queued_and_awaiting(backend: &str) {
    // No agent and a big memory need: the request stays queued.
    let Some(h) = harness(backend, false, test_config(|_| {})).await else {
        return;
    };
    let waiting = h.submit("ok_action", "alice", false).await;
    h.wait(waiting, RequestStatus::AwaitingApproval).await;
    h.engine.cancel(waiting, "alice").await.unwrap();
    h.wait(waiting, RequestStatus::Cancelled).await;
    let queued = h.submit("big_job", "alice", false).await;
    h.wait(queued, RequestStatus::AwaitingApproval).await;
    h.engine.approve(queued, "bob", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.engine.get(queued).await.unwrap().request.status,
        RequestStatus::Queued
    );
    h.engine.cancel(queued, "bob").await.unwrap();
    h.wait(queued, RequestStatus::Cancelled).await;
    let r = h.committed(queued).await;
    assert!(
        r.commit_id.is_some(),
        "an approved request that ended is committed"
    );
    let view = h.engine.get(queued).await.unwrap();
    assert!(view.steps.iter().all(|s| s.status == StepStatus::Cancelled));
    let err = h.engine.cancel(queued, "bob").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::IllegalTransition);
}

async fn cancel_while_running_stops_the_agent(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h.submit("slow, ok_action", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    h.engine.approve(id, "bob", None).await.unwrap();
    h.wait(id, RequestStatus::Running).await;
    // Wait until the agent has it.
    for _ in 0..100 {
        if h.engine.get(id).await.unwrap().steps[0].status == StepStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.engine.cancel(id, "bob").await.unwrap();
    h.wait(id, RequestStatus::Cancelled).await;
    let r = h.committed(id).await;
    let view = h.engine.get(id).await.unwrap();
    assert_eq!(view.steps[0].status, StepStatus::Cancelled);
    assert_eq!(view.steps[1].status, StepStatus::Cancelled);
    assert_eq!(
        h.agent.as_ref().unwrap().started.load(Ordering::SeqCst),
        1,
        "the second step never ran"
    );
    assert!(r.commit_id.is_some());
    let audit = h.events(id).await;
    assert!(audit.contains(&"cancel_requested".to_string()), "{audit:?}");
}

async fn transient_failure_is_retried(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h.submit("flaky", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    h.engine.approve(id, "bob", None).await.unwrap();
    h.wait(id, RequestStatus::Completed).await;
    let view = h.engine.get(id).await.unwrap();
    assert_eq!(view.steps[0].attempt, 2);
    assert!(h.events(id).await.contains(&"retry".to_string()));
    assert!(h.engine.metrics().retries_total >= 1);
}

async fn permanent_failure_fails_the_request(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h.submit("broken, ok_action", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    h.engine.approve(id, "bob", None).await.unwrap();
    let r = h.wait(id, RequestStatus::Failed).await;
    assert_eq!(r.error.unwrap().code, ErrorCode::ActionFailed);
    let view = h.engine.get(id).await.unwrap();
    assert_eq!(view.steps[0].status, StepStatus::Failed);
    assert_eq!(
        view.steps[0].attempt, 1,
        "permanent failures are not retried"
    );
    assert_eq!(view.steps[1].status, StepStatus::Skipped);
    assert!(h.committed(id).await.commit_id.is_some());
}

async fn agent_timeout_retries_then_fails(backend: &str) {
    let config = test_config(|c| c.dispatch.max_attempts = 2);
    let Some(h) = harness(backend, true, config).await else {
        return;
    };
    let id = h.submit("hang", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    h.engine.approve(id, "bob", None).await.unwrap();
    let r = h.wait(id, RequestStatus::Failed).await;
    assert_eq!(r.error.unwrap().code, ErrorCode::AgentTimeout);
    assert_eq!(h.engine.get(id).await.unwrap().steps[0].attempt, 2);
    let audit = h.events(id).await;
    assert!(
        audit.contains(&"timeout_retry".to_string()) && audit.contains(&"timeout".to_string()),
        "{audit:?}"
    );
}

async fn duplicate_results_apply_once(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h.submit("dup, ok_action", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    h.engine.approve(id, "bob", None).await.unwrap();
    h.wait(id, RequestStatus::Completed).await;
    let dup_step = h.engine.get(id).await.unwrap().steps[0].clone();
    // The second copy is recorded, once, as a duplicate of the applied result.
    let duplicates = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let d: Vec<AuditEntry> = h
                .engine
                .audit_log(Some(id), 0, 1000)
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.event == "duplicate_result")
                .collect();
            if !d.is_empty() {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the duplicate is recorded");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit = h.events(id).await;
    assert_eq!(
        audit.iter().filter(|e| *e == "duplicate_result").count(),
        1,
        "{audit:?}"
    );
    let d = &duplicates[0].details;
    assert_eq!(d["task_id"], json!(dup_step.task_id), "{d}");
    assert_eq!(d["attempt"], json!(1), "{d}");
    assert_eq!(d["step_status"], json!("completed"), "{d}");
    assert_eq!(d["reason"], json!("the attempt already ended"), "{d}");
    // Applied once: one result per step, one result line in the log, the step unchanged.
    assert_eq!(
        audit.iter().filter(|e| *e == "step_result").count(),
        2,
        "{audit:?}"
    );
    assert_eq!(
        audit.iter().filter(|e| *e == "dispatched").count(),
        2,
        "{audit:?}"
    );
    let results = h
        .engine
        .logs(id, None, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.line.kind == "result" && l.line.task_id == Some(dup_step.task_id))
        .count();
    assert_eq!(results, 1);
    let now = h.engine.get(id).await.unwrap().steps[0].clone();
    assert_eq!(now, dup_step, "the duplicate changed nothing");
    assert_eq!(h.engine.metrics().duplicate_results_total, 1);
}

/// A short task reports with its result alone (no `work_status`): the step goes from
/// `dispatched` to `completed`, the request from queued through running to completed, and
/// the result's output lines are logged and shown live as the step's output.
async fn a_result_without_statuses_completes_its_step(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h.submit("quiet", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    let mut events = h.engine.subscribe(id);
    h.engine.approve(id, "bob", None).await.unwrap();
    h.wait(id, RequestStatus::Completed).await;
    let view = h.engine.get(id).await.unwrap();
    let step = &view.steps[0];
    assert_eq!(step.status, StepStatus::Completed);
    assert_eq!(step.progress, 100);
    assert_eq!(step.agent_id.as_deref(), Some("mock-1"));
    assert_eq!(step.output.as_deref(), Some("quiet line 1\nquiet line 2"));
    let (dispatched, finished) = (step.dispatched_at.unwrap(), step.finished_at.unwrap());
    assert!(dispatched <= finished, "{dispatched} {finished}");
    let mut seen = Vec::new();
    // The last status event may follow the stored status by a moment.
    while !seen.iter().any(|e| e == "completed") {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap_or_else(|_| panic!("no `completed` event: {seen:?}"))
            .unwrap();
        match ev {
            EngineEvent::Status { status, .. } => seen.push(status.as_str().to_string()),
            EngineEvent::Step { status, .. } => seen.push(format!("step {}", status.as_str())),
            EngineEvent::Output { line, .. } => seen.push(line),
            _ => {}
        }
    }
    let order = [
        "running",
        "step dispatched",
        "quiet line 1",
        "quiet line 2",
        "step completed",
        "completed",
    ];
    let mut at = 0;
    for e in &seen {
        if at < order.len() && e == order[at] {
            at += 1;
        }
    }
    assert_eq!(at, order.len(), "live events in order {order:?}: {seen:?}");
    let logs = h.engine.logs(id, None, 100).await.unwrap();
    let output: Vec<&str> = logs
        .iter()
        .filter(|l| l.line.kind == "output")
        .map(|l| l.line.message.as_str())
        .collect();
    assert_eq!(output, ["quiet line 1", "quiet line 2"]);
    assert!(logs.iter().any(|l| l.line.kind == "result"));
    let audit = h.events(id).await;
    assert!(audit.contains(&"step_result".to_string()), "{audit:?}");
    assert!(
        !audit.contains(&"duplicate_result".to_string()),
        "{audit:?}"
    );
}

async fn unknown_action_is_never_executed(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h
        .submit("ok_action, rm_rf_everything", "alice", false)
        .await;
    let r = h.wait(id, RequestStatus::Failed).await;
    assert_eq!(r.error.unwrap().code, ErrorCode::PlanUnknownAction);
    assert!(r.plan.is_none());
    assert_eq!(h.agent.as_ref().unwrap().started.load(Ordering::SeqCst), 0);
    assert!(h.events(id).await.contains(&"plan_failed".to_string()));
}

fn heartbeat(free_gb: f64, queue: &str) -> Heartbeat {
    Heartbeat {
        agent_id: "infra-1".into(),
        agent_type: "infrastructure".into(),
        hostname: "host-1".into(),
        cpu: Some(CpuMetrics {
            percent: 10.0,
            cores: 2,
            load_1m: 0.1,
        }),
        memory: Some(MemoryMetrics {
            used_gb: 16.0 - free_gb,
            total_gb: 16.0,
        }),
        gpus: vec![],
        running_tasks: 0,
        max_tasks: Some(4),
        queue: Some(queue.into()),
        actions: vec![],
    }
}

async fn waits_for_capacity_then_dispatches(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let t = h.transport.topology().clone();
    let queue = t.agent_queue("infrastructure");
    let results = t.results_queue.clone();
    let hb = |free| Envelope::new("hb", None, Message::Heartbeat(heartbeat(free, &queue)));
    h.transport.declare_topology().await.unwrap();
    h.transport.publish(&results, &hb(2.0)).await.unwrap();
    let first = h.submit("big_job", "alice", false).await;
    let second = h.submit("big_job", "alice", false).await;
    for id in [first, second] {
        h.wait(id, RequestStatus::AwaitingApproval).await;
        h.engine.approve(id, "bob", None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = h.engine.get(first).await.unwrap();
    assert_eq!(
        waiting.request.status,
        RequestStatus::Queued,
        "2 GiB free is not enough"
    );
    // The person sees why.
    let why = waiting.waiting_reason.expect("a queued request says why");
    assert!(
        why.contains("infra-1 has 2.0 GiB of memory free, the step needs"),
        "{why}"
    );
    assert_eq!(h.agent.as_ref().unwrap().started.load(Ordering::SeqCst), 0);
    // Room for one: the older request goes first.
    h.transport.publish(&results, &hb(10.0)).await.unwrap();
    h.wait(first, RequestStatus::Completed).await;
    assert_eq!(
        h.engine.get(second).await.unwrap().request.status,
        RequestStatus::Queued
    );
    h.transport.publish(&results, &hb(10.0)).await.unwrap();
    h.wait(second, RequestStatus::Completed).await;
    let agents = h.engine.agents().await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].heartbeat.memory.as_ref().unwrap().total_gb, 16.0);
}

/// A heartbeat that does not parse is dead-lettered and listed (agent id, field, count)
/// until that agent's heartbeats parse again; one without resources is accepted as such.
async fn rejected_heartbeats_are_listed_until_fixed(backend: &str) {
    let Some(h) = harness(backend, false, test_config(|_| {})).await else {
        return;
    };
    let t = h.transport.topology().clone();
    h.transport.declare_topology().await.unwrap();
    let agent_id = format!("py-{}", Uuid::new_v4().simple());
    let doc = |memory: Value| {
        let mut payload = json!({ "agent_id": agent_id, "agent_type": "python", "hostname": "py" });
        if !memory.is_null() {
            payload["memory"] = memory;
        }
        serde_json::to_vec(&json!({
            "message_id": Uuid::new_v4(), "trace_id": "hb", "request_id": null,
            "message_type": "heartbeat", "timestamp": chrono::Utc::now(), "version": 1,
            "payload": payload,
        }))
        .unwrap()
    };
    for _ in 0..3 {
        h.transport
            .publish_bytes(&t.results_queue, doc(json!({ "available_gb": 3 })))
            .await
            .unwrap();
    }
    let listed = || {
        h.engine
            .rejected_messages()
            .into_iter()
            .find(|r| r.agent_id.as_deref() == Some(agent_id.as_str()))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let r = loop {
        match listed() {
            Some(r) if r.count == 3 => break r,
            _ if std::time::Instant::now() > deadline => panic!("not listed: {:?}", listed()),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(r.code, 5004);
    assert_eq!(r.field.as_deref(), Some("payload.memory.total_gb"));
    assert_eq!(r.message_type.as_deref(), Some("heartbeat"));
    assert!(r.reason.contains("payload.memory.total_gb"), "{r:?}");
    // Resources unknown is allowed: the agent registers, and the rejection is forgotten.
    h.transport
        .publish_bytes(&t.results_queue, doc(Value::Null))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while listed().is_some() {
        assert!(std::time::Instant::now() < deadline, "still listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agents = h.engine.agents().await.unwrap();
    let a = agents.iter().find(|a| a.agent_id == agent_id).unwrap();
    assert_eq!(
        (a.heartbeat.memory.as_ref(), a.heartbeat.cpu.as_ref()),
        (None, None)
    );
}

async fn bus_intake_plans_like_http(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let t = h.transport.topology().clone();
    // A frontend declares the topology before publishing (the engine may not have yet).
    h.transport.declare_topology().await.unwrap();
    let msg = Envelope::new(
        "chat-1",
        None,
        Message::UserRequest(UserRequest {
            text: "ok_action".into(),
            requester: Some("carol".into()),
            dry_run: false,
        }),
    );
    h.transport.publish(&t.requests_queue, &msg).await.unwrap();
    // Redelivery or a second publish of the same message maps to the same request.
    h.transport.publish(&t.requests_queue, &msg).await.unwrap();
    h.transport
        .publish_bytes(&t.requests_queue, b"not json".to_vec())
        .await
        .unwrap();
    let id = msg.message_id;
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(v) = h.engine.get(id).await {
                if v.request.status == RequestStatus::AwaitingApproval {
                    return v.request;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    // The requester is the broker-authenticated publisher, never the body's `requester`.
    let publisher = if backend == "sqlite" {
        "local"
    } else {
        "guest"
    };
    assert_eq!(r.requester, format!("bus:{publisher}"));
    assert_eq!(r.submitted_by, format!("bus:{publisher}"));
    assert_eq!(r.trace_id, "chat-1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = h.engine.list(&RequestFilter::default()).await.unwrap();
    assert_eq!(
        all.len(),
        1,
        "the duplicate message did not make a second request"
    );
    let dead = h.transport.queue_depth(&t.dead_letter_queue).await.unwrap();
    assert_eq!(dead, 1, "garbage was dead-lettered");
}

async fn two_engines_share_one_store_and_bus(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let git2 = tempfile::tempdir().unwrap();
    let second = start_engine(
        h.store.clone(),
        h.transport.clone(),
        h.git_dir.path(),
        test_config(|c| c.instance_id = "engine-two".into()),
        &h.stop,
    )
    .await;
    drop(git2);
    let mut ids = Vec::new();
    for i in 0..20 {
        let e = if i % 2 == 0 { &h.engine } else { &second };
        let r = e
            .submit(SubmitRequest {
                text: "ok_action, ok_action".into(),
                requester: Some("alice".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(r.id);
    }
    for (i, id) in ids.iter().enumerate() {
        h.wait(*id, RequestStatus::AwaitingApproval).await;
        let e = if i % 2 == 0 { &second } else { &h.engine };
        e.approve(*id, "bob", None).await.unwrap();
    }
    for id in &ids {
        h.wait(*id, RequestStatus::Completed).await;
    }
    assert_eq!(
        h.agent.as_ref().unwrap().started.load(Ordering::SeqCst),
        40,
        "every step ran exactly once"
    );
    for id in &ids {
        let audit = h.events(*id).await;
        assert_eq!(audit.iter().filter(|e| *e == "dispatched").count(), 2);
        assert_eq!(
            audit.iter().filter(|e| *e == "committed").count(),
            1,
            "{audit:?}"
        );
    }
    let report = h.engine.verify_audit().await.unwrap();
    assert!(report.ok, "{report:?}");
}

async fn audit_verify_detects_missing_commit(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    let id = h.submit("ok_action", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    h.engine.approve(id, "bob", None).await.unwrap();
    h.wait(id, RequestStatus::Completed).await;
    assert!(h.engine.verify_audit().await.unwrap().ok);
    // A second engine with an empty git repository sees the commit missing.
    let other_git = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let other = start_engine(
        h.store.clone(),
        h.transport.clone(),
        other_git.path(),
        test_config(|_| {}),
        &stop,
    )
    .await;
    let report = other.verify_audit().await.unwrap();
    stop.cancel();
    assert!(!report.ok);
    assert_eq!(report.missing_commits, vec![id]);
}

/// The deployment database `chiffon` (made by `scripts/services.sh`) gets the contract's
/// tables: migrations are idempotent and leave what `psql` should show.
#[tokio::test]
async fn contract_tables_in_the_chiffon_database() {
    let admin = support::pg_admin_url();
    let cut = admin.rfind('/').unwrap();
    let url = format!("{}/chiffon", &admin[..cut]);
    let store = match chiffon_core::store::connect(&url).await {
        Ok(s) => s,
        Err(e) => {
            return support::unavailable::<()>("PostgreSQL database chiffon", e).unwrap_or(())
        }
    };
    store.migrate().await.unwrap();
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
            .fetch_all(&mut c)
            .await
            .unwrap();
    for t in [
        "tasks",
        "execution_logs",
        "resource_metrics",
        "audit_log",
        "plan_steps",
        "agents",
        "llm_usage",
    ] {
        assert!(tables.iter().any(|x| x == t), "{t} missing: {tables:?}");
    }
}

/// Bus handles for named broker users: in-process identities on the memory bus, real
/// RabbitMQ users (created for the test, deleted after) on the broker.
struct Users {
    base: Arc<dyn Transport>,
    memory: Option<chiffon_core::transport::memory::MemoryTransport>,
    created: Vec<String>,
    suffix: String,
}

impl Users {
    async fn new(backend: &str, base: Arc<dyn Transport>) -> Users {
        let memory = (backend == "sqlite").then(|| {
            chiffon_core::transport::memory::MemoryTransport::new(base.topology().clone())
        });
        Users {
            base,
            memory,
            created: Vec::new(),
            suffix: Uuid::new_v4().simple().to_string()[..8].to_string(),
        }
    }

    fn name(&self, user: &str) -> String {
        if self.memory.is_some() {
            user.to_string()
        } else {
            format!("{user}-{}", self.suffix)
        }
    }

    async fn transport(&mut self, user: &str) -> Arc<dyn Transport> {
        let name = self.name(user);
        if let Some(m) = &self.memory {
            return Arc::new(m.with_identity(&name));
        }
        let ctl = |args: &[&str]| {
            let out = std::process::Command::new("rabbitmqctl")
                .args(args)
                .output()
                .expect("rabbitmqctl runs");
            assert!(
                out.status.success(),
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ctl(&["add_user", &name, "pw-for-test"]);
        self.created.push(name.clone());
        ctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        let url = support::amqp_url();
        let host = url.split('@').nth(1).expect("amqp url with credentials");
        let url = format!("amqp://{name}:pw-for-test@{host}");
        Arc::new(
            chiffon_core::transport::amqp::AmqpTransport::connect(
                &url,
                self.base.topology().clone(),
            )
            .await
            .unwrap(),
        )
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for u in &self.created {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["delete_user", u])
                .output();
        }
    }
}

/// The broker trusts no body field: a result, status or heartbeat counts only from the
/// authenticated agent user the attempt is bound to, a bus request's requester is its
/// publisher, and a result must say which attempt it answers.
async fn forged_bus_messages_are_refused(backend: &str) {
    let (store, base, _guard): (
        Arc<dyn Store>,
        Arc<dyn Transport>,
        Box<dyn std::any::Any + Send>,
    ) = match backend {
        "sqlite" => {
            let (s, dir) = support::sqlite_store().await;
            (s, support::memory_transport(), Box::new(dir))
        }
        _ => {
            let Some((s, db)) = support::pg_store().await else {
                return;
            };
            let Some((t, cleanup)) = support::amqp_transport().await else {
                return;
            };
            (s, t, Box::new((cleanup, db)))
        }
    };
    let mut users = Users::new(backend, base).await;
    let engine_bus = users.transport("orchestrator").await;
    let agent_a = users.transport("agent-a").await;
    let agent_b = users.transport("agent-b").await;
    let mallory = users.transport("mallory").await;
    let config = test_config(|c| {
        c.bus.agent_users = vec![users.name("agent-a"), users.name("agent-b")];
    });
    let stop = CancellationToken::new();
    let git = tempfile::tempdir().unwrap();
    let engine = start_engine(store.clone(), engine_bus.clone(), git.path(), config, &stop).await;
    let t = engine_bus.topology().clone();
    engine_bus.declare_topology().await.unwrap();
    let queue = t.agent_queue("infrastructure");
    engine_bus.declare_queue(&queue).await.unwrap();
    let mut work = agent_a
        .consume(&queue, ConsumeOptions { prefetch: 4 })
        .await
        .unwrap();

    let r = engine
        .submit(SubmitRequest {
            text: "ok_action".into(),
            requester: Some("alice".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::AwaitingApproval]),
    )
    .await
    .unwrap()
    .unwrap();
    engine.approve(r.id, "bob", None).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), work.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        d.publisher.as_deref(),
        Some(users.name("orchestrator").as_str())
    );
    let env = d.parse().unwrap();
    let Message::WorkRequest(w) = env.body.clone() else {
        panic!("not work")
    };
    d.ack().await.unwrap();
    let results = t.results_queue.clone();
    let status = |progress: u32| {
        env.reply(Message::WorkStatus(WorkStatus {
            task_id: w.task_id,
            status: TaskState::Running,
            progress,
            message: "working".into(),
            metrics: None,
            lines: vec![],
            agent_id: Some("a-1".into()),
            attempt: Some(w.attempt),
        }))
    };
    let result = |attempt: u32| {
        env.reply(Message::WorkResult(WorkResult {
            task_id: w.task_id,
            status: TaskState::Completed,
            output: "forged?".into(),
            duration_seconds: 1.0,
            resource_usage: Default::default(),
            error: None,
            changed: Some(true),
            diff: None,
            attempt,
            agent_id: Some("a-1".into()),
        }))
    };
    // agent-a reports first: the attempt is bound to it.
    agent_a.publish(&results, &status(10)).await.unwrap();
    let step_running = || async {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let st = store.get_step(w.task_id).await.unwrap();
                if st.status == StepStatus::Running {
                    return st;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap()
    };
    let st = step_running().await;
    assert_eq!(
        st.broker_user.as_deref(),
        Some(users.name("agent-a").as_str())
    );

    let dead_before = engine_bus.queue_depth(&t.dead_letter_queue).await.unwrap();
    // Another agent user, a non-agent user, and a result without its attempt.
    agent_b.publish(&results, &result(w.attempt)).await.unwrap();
    agent_b.publish(&results, &status(99)).await.unwrap();
    mallory.publish(&results, &result(w.attempt)).await.unwrap();
    let mut no_attempt: serde_json::Value =
        serde_json::from_slice(&result(w.attempt).to_bytes()).unwrap();
    no_attempt["payload"]
        .as_object_mut()
        .unwrap()
        .remove("attempt");
    agent_a
        .publish_bytes(&results, serde_json::to_vec(&no_attempt).unwrap())
        .await
        .unwrap();
    // Heartbeats: mallory is no agent; agent-b may not take over agent-a's id.
    let hb = |id: &str| {
        let mut h = heartbeat(8.0, &queue);
        h.agent_id = id.into();
        Envelope::new("hb", None, Message::Heartbeat(h))
    };
    agent_a.publish(&results, &hb("a-1")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.agents().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    mallory.publish(&results, &hb("m-1")).await.unwrap();
    agent_b.publish(&results, &hb("a-1")).await.unwrap();
    // A bus request naming "bob" as requester, from mallory (not an agent: may request),
    // and one from agent-a (agents may not).
    let ask = |text: &str| {
        Envelope::new(
            "bus-req",
            None,
            Message::UserRequest(UserRequest {
                text: text.into(),
                requester: Some("bob".into()),
                dry_run: false,
            }),
        )
    };
    let from_mallory = ask("ok_action");
    mallory
        .publish(&t.requests_queue, &from_mallory)
        .await
        .unwrap();
    let from_agent = ask("ok_action");
    agent_a
        .publish(&t.requests_queue, &from_agent)
        .await
        .unwrap();

    let expected_dead = dead_before + 7;
    tokio::time::timeout(Duration::from_secs(20), async {
        while engine_bus.queue_depth(&t.dead_letter_queue).await.unwrap() < expected_dead {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("every forged message is dead-lettered");
    let st = store.get_step(w.task_id).await.unwrap();
    assert_eq!(
        st.status,
        StepStatus::Running,
        "a forged result completed nothing"
    );
    assert_eq!(st.progress, 10, "a forged status moved nothing");
    let agents = store.agents().await.unwrap();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(
        agents[0].broker_user.as_deref(),
        Some(users.name("agent-a").as_str())
    );
    let req = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(v) = engine.get(from_mallory.message_id).await {
                return v.request;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(req.requester, format!("bus:{}", users.name("mallory")));
    assert!(
        engine.get(from_agent.message_id).await.is_err(),
        "agents may not submit"
    );
    let events: Vec<String> = engine
        .audit_log(Some(r.id), 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert!(
        events.iter().filter(|e| *e == "message_refused").count() >= 2,
        "{events:?}"
    );

    // The real agent's result applies.
    agent_a.publish(&results, &result(w.attempt)).await.unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::Completed]),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(done.status, RequestStatus::Completed);
    stop.cancel();
}

/// A store and bus of `backend` with the database's URL, for tests that act on the database
/// behind the engine's back (as a crash or a superuser would). The guard drops them.
type RawBackend = (
    Arc<dyn Store>,
    Arc<dyn Transport>,
    String,
    Box<dyn std::any::Any + Send>,
);

async fn raw_backend(backend: &str) -> Option<RawBackend> {
    Some(match backend {
        "sqlite" => {
            let (s, dir) = support::sqlite_store().await;
            let url = format!("sqlite://{}", dir.path().join("chiffon.db").display());
            (s, support::memory_transport(), url, Box::new(dir))
        }
        _ => {
            let (s, db) = support::pg_store().await?;
            let (t, cleanup) = support::amqp_transport().await?;
            let url = db.url.clone();
            (s, t, url, Box::new((cleanup, db)))
        }
    })
}

/// An engine started over a raw backend (whose tables the test may break), the bus's
/// queues declared: the engine, its bus, the database URL and what must live as long.
struct RawEngine {
    engine: Engine,
    transport: Arc<dyn Transport>,
    url: String,
    stop: CancellationToken,
    _keep: (Box<dyn std::any::Any + Send>, tempfile::TempDir),
}

async fn raw_engine(backend: &str) -> Option<RawEngine> {
    let (store, transport, url, guard) = raw_backend(backend).await?;
    let stop = CancellationToken::new();
    let git = tempfile::tempdir().unwrap();
    let engine = start_engine(
        store,
        transport.clone(),
        git.path(),
        test_config(|_| {}),
        &stop,
    )
    .await;
    transport.declare_topology().await.unwrap();
    Some(RawEngine {
        engine,
        transport,
        url,
        stop,
        _keep: (guard, git),
    })
}

/// Runs `sql` on the database at `url` directly.
async fn raw_sql(url: &str, sql: String) {
    use sqlx::Connection;
    if url.starts_with("sqlite") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut c)
            .await
            .unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut c)
            .await
            .unwrap();
    }
}

/// A message whose processing fails every time (here: the steps table is gone, an error
/// the engine cannot tell from a passing outage) is retried a bounded number of times, then
/// dead-lettered: never requeued forever.
async fn a_message_that_keeps_failing_is_dead_lettered(backend: &str) {
    let Some(RawEngine {
        engine,
        transport,
        url: raw_url,
        stop,
        _keep,
    }) = raw_engine(backend).await
    else {
        return;
    };
    let t = transport.topology().clone();
    raw_sql(
        &raw_url,
        "ALTER TABLE plan_steps RENAME TO plan_steps_gone".into(),
    )
    .await;
    let result = Envelope::new(
        "t",
        Some(Uuid::new_v4()),
        Message::WorkResult(WorkResult {
            task_id: Uuid::new_v4(),
            status: TaskState::Completed,
            output: String::new(),
            duration_seconds: 0.0,
            resource_usage: Default::default(),
            error: None,
            changed: None,
            diff: None,
            attempt: 1,
            agent_id: None,
        }),
    );
    transport.publish(&t.results_queue, &result).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while transport.queue_depth(&t.dead_letter_queue).await.unwrap() < 1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the failing message was dead-lettered");
    assert_eq!(engine.metrics().dead_lettered_after_retries_total, 1);
    stop.cancel();
}

/// An agent's error report is the decision itself: it is in the audit log once acked, and a
/// report whose entry cannot be stored is not acked away (it is dead-lettered, kept).
async fn an_agent_error_is_acked_only_once_recorded(backend: &str) {
    let Some(RawEngine {
        engine,
        transport,
        url: raw_url,
        stop,
        _keep,
    }) = raw_engine(backend).await
    else {
        return;
    };
    let t = transport.topology().clone();
    let report = |request: Uuid| {
        Envelope::new(
            "t",
            Some(request),
            Message::Error(ErrorPayload::new(
                ErrorCode::ActionFailed,
                "the agent could not start the playbook",
            )),
        )
    };
    let first = Uuid::new_v4();
    transport
        .publish(&t.results_queue, &report(first))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let log = engine.audit_log(Some(first), 0, 10).await.unwrap();
            if log
                .iter()
                .any(|e| e.event == chiffon_core::audit::AuditEvent::AgentError)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the agent's error is in the audit log");
    // The log cannot be written: the report is not acked as if recorded.
    raw_sql(
        &raw_url,
        "ALTER TABLE audit_log RENAME TO audit_log_gone".into(),
    )
    .await;
    transport
        .publish(&t.results_queue, &report(Uuid::new_v4()))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while transport.queue_depth(&t.dead_letter_queue).await.unwrap() < 1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the unrecorded report was dead-lettered, not acked");
    stop.cancel();
}

/// A configured secret echoed by an agent (in progress lines, the output, an error) is
/// struck from the execution log, the step, and the git record.
async fn agent_output_is_redacted_everywhere(backend: &str) {
    const SECRET: &str = "s3cr3t-agent-echo-0123456789";
    let config = test_config(|c| {
        c.redactor = chiffon_core::redact::Redactor::new([SECRET]);
    });
    let Some(h) = harness(backend, false, config).await else {
        return;
    };
    let t = h.transport.topology().clone();
    let queue = t.agent_queue("infrastructure");
    h.transport.declare_topology().await.unwrap();
    h.transport.declare_queue(&queue).await.unwrap();
    let mut work = h
        .transport
        .consume(&queue, ConsumeOptions { prefetch: 4 })
        .await
        .unwrap();
    let id = h.submit("ok_action", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    h.engine.approve(id, "bob", None).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), work.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let env = d.parse().unwrap();
    let Message::WorkRequest(w) = env.body.clone() else {
        panic!("not work")
    };
    d.ack().await.unwrap();
    let status = env.reply(Message::WorkStatus(WorkStatus {
        task_id: w.task_id,
        status: TaskState::Running,
        progress: 50,
        message: format!("token={SECRET}"),
        metrics: None,
        lines: vec![format!("env: KEY={SECRET}")],
        agent_id: None,
        attempt: Some(w.attempt),
    }));
    h.transport
        .publish(&t.results_queue, &status)
        .await
        .unwrap();
    let result = env.reply(Message::WorkResult(WorkResult {
        task_id: w.task_id,
        status: TaskState::Failed,
        output: format!("output {SECRET}"),
        duration_seconds: 1.0,
        resource_usage: Default::default(),
        error: Some(ErrorPayload::new(
            ErrorCode::ActionFailed,
            format!("failed: {SECRET}"),
        )),
        changed: None,
        diff: Some(format!("+{SECRET}")),
        attempt: w.attempt,
        agent_id: None,
    }));
    h.transport
        .publish(&t.results_queue, &result)
        .await
        .unwrap();
    h.wait(id, RequestStatus::Failed).await;
    h.committed(id).await;
    let view = h.engine.get(id).await.unwrap();
    let everything = format!(
        "{}\n{}\n{}",
        serde_json::to_string(&view).unwrap(),
        serde_json::to_string(&h.engine.logs(id, None, 1000).await.unwrap()).unwrap(),
        h.git_log(),
    );
    assert!(!everything.contains(SECRET), "{everything}");
    assert!(everything.contains("[REDACTED]"), "{everything}");
    let show = std::process::Command::new("git")
        .args([
            "--git-dir",
            &h.git_dir.path().display().to_string(),
            "log",
            "-p",
            "--all",
        ])
        .output()
        .unwrap();
    let record = String::from_utf8_lossy(&show.stdout);
    assert!(record.contains(&id.to_string()), "{record}");
    assert!(!record.contains(SECRET), "{record}");
}

async fn preview_of(h: &Harness, id: Uuid, done: bool) -> StepPreview {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let v = h.engine.get(id).await.unwrap();
            if let Some(p) = v.steps[0].preview.clone() {
                if !done || p.status != PreviewStatus::Pending {
                    return p;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the preview settles")
}

/// While a plan awaits approval, each check-mode step runs in check mode over the bus and
/// the person sees what it would change; the step itself does not run until approved.
async fn a_plan_awaiting_approval_shows_its_dry_run(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|c| c.approval.preview = true)).await else {
        return;
    };
    let id = h.submit("ok_action", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    let p = preview_of(&h, id, true).await;
    assert_eq!(p.status, PreviewStatus::Completed, "{p:?}");
    assert_eq!(p.changed, Some(true));
    assert_eq!(p.diff.as_deref(), Some("--- before\n+++ after\n"));
    let v = h.engine.get(id).await.unwrap();
    assert_eq!(
        v.steps[0].status,
        StepStatus::Pending,
        "the step itself did not run"
    );
    assert_eq!(v.steps[0].attempt, 0);
    assert_eq!(h.agent.as_ref().unwrap().started.load(Ordering::SeqCst), 1);
    assert!(h.events(id).await.contains(&"preview_finished".to_string()));
    h.engine.approve(id, "bob", None).await.unwrap();
    h.wait(id, RequestStatus::Completed).await;
    assert_eq!(h.agent.as_ref().unwrap().started.load(Ordering::SeqCst), 2);
    // The preview stays on record beside the real run.
    let v = h.engine.get(id).await.unwrap();
    assert_eq!(
        v.steps[0].preview.as_ref().unwrap().status,
        PreviewStatus::Completed
    );
    assert_eq!(v.steps[0].diff, None, "the real run is not a dry run");
}

/// No agent answers: the preview shows as failed once its time is up, and approval is not
/// blocked.
async fn a_preview_nobody_answers_shows_as_failed(backend: &str) {
    let config = test_config(|c| {
        c.approval.preview = true;
        c.dispatch.preview_timeout = Duration::from_secs(1);
    });
    let Some(h) = harness(backend, false, config).await else {
        return;
    };
    let id = h.submit("ok_action", "alice", false).await;
    h.wait(id, RequestStatus::AwaitingApproval).await;
    let p = preview_of(&h, id, false).await;
    assert_eq!(p.status, PreviewStatus::Pending);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let p = preview_of(&h, id, true).await;
    assert_eq!(p.status, PreviewStatus::Failed);
    let e = p.error.unwrap();
    assert_eq!(e.code, ErrorCode::AgentTimeout);
    assert!(
        e.message
            .contains("no agent answered the dry run within 1 s"),
        "{}",
        e.message
    );
    h.engine.approve(id, "bob", None).await.unwrap();
    assert_eq!(
        h.engine.get(id).await.unwrap().request.status,
        RequestStatus::Queued
    );
}

/// A database superuser rewrites an audit row and recomputes the whole chain (the chain
/// alone still verifies), or empties the log: the chain head anchored in git catches both,
/// and a finished request without entries is reported.
async fn audit_verify_catches_a_rechained_or_emptied_log(backend: &str) {
    use chiffon_core::audit::chain::{entry_hash, GENESIS};
    let Some((store, transport, raw_url, _guard)) = raw_backend(backend).await else {
        return;
    };
    let stop = CancellationToken::new();
    let git = tempfile::tempdir().unwrap();
    let engine = start_engine(
        store.clone(),
        transport.clone(),
        git.path(),
        test_config(|_| {}),
        &stop,
    )
    .await;
    let _agent = MockAgent::spawn(transport.clone(), stop.clone());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = ok_action_approved_and_completed(&engine).await;
        ids.push(r.id);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = engine.verify_audit().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert!(
        report.anchor.as_deref().unwrap().contains("matches"),
        "{report:?}"
    );

    // Rewrite entry 1 ("received" of the first request) and recompute every hash after it.
    let entries = engine.audit_log(None, 0, 10_000).await.unwrap();
    let mut prev = GENESIS.to_string();
    let mut rows = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let details = if i == 0 {
            serde_json::json!({ "text": "something harmless", "dry_run": false })
        } else {
            e.details.clone()
        };
        let text = serde_json::to_string(&details).unwrap();
        let hash = entry_hash(
            None,
            &prev,
            e.seq,
            e.at,
            e.request_id,
            &e.actor,
            &e.event,
            &text,
        );
        rows.push((e.seq, text, prev.clone(), hash.clone()));
        prev = hash;
    }
    let last = entries.last().unwrap().seq;
    let mut sql = String::new();
    for (seq, text, p, h) in &rows {
        sql.push_str(&format!(
            "UPDATE audit_log SET details = '{}', prev_hash = '{p}', hash = '{h}' WHERE seq = {seq};\n",
            text.replace('\'', "''")
        ));
    }
    sql.push_str(&format!(
        "UPDATE audit_head SET last_seq = {last}, last_hash = '{prev}' WHERE id = 1;\n"
    ));
    raw_sql(&raw_url, sql).await;
    let report = engine.verify_audit().await.unwrap();
    assert!(report.chain.ok, "the recomputed chain verifies on its own");
    assert!(!report.ok, "but git's anchor does not agree");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("differs from the hash anchored in git")),
        "{:?}",
        report.problems
    );

    // Empty the log and reset the head: the anchor's entry is gone, and finished requests
    // have no entries.
    raw_sql(
        &raw_url,
        format!(
        "DELETE FROM audit_log; UPDATE audit_head SET last_seq = 0, last_hash = '{GENESIS}' WHERE id = 1;"
    ))
    .await;
    let report = engine.verify_audit().await.unwrap();
    // The chain is empty and whole, but the requests name entries that are gone.
    assert!(
        !report.chain.ok && report.chain.entries_checked == 0,
        "{report:?}"
    );
    assert!(
        report.chain.problem.as_deref().unwrap().contains("missing"),
        "{report:?}"
    );
    assert!(!report.ok);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("truncated or emptied")),
        "{:?}",
        report.problems
    );
    for id in &ids {
        assert!(
            report
                .record_problems
                .iter()
                .any(|p| p.id == *id && p.reason.contains("no entry")),
            "{:?}",
            report.record_problems
        );
    }
    stop.cancel();
}

/// With `CHIFFON_AUDIT_KEY` the chain is an HMAC chain: a database writer without the key
/// who rewrites the newest entries (after the newest git anchor, where the anchor cannot
/// see) and re-chains them is caught, as is verifying with another key or none. (Without
/// a key a re-chained log passes the chain check: `audit_verify_catches_a_rechained_or_
/// emptied_log` shows the git anchor catching it, up to the newest anchor only.)
async fn a_keyed_chain_catches_a_rewrite_after_the_newest_anchor(backend: &str) {
    use chiffon_core::audit::chain::{entry_hash, AuditKey};
    let Some((_plain, transport, raw_url, _guard)) = raw_backend(backend).await else {
        return;
    };
    let key = AuditKey::new("an audit key kept outside the database").unwrap();
    let store = chiffon_core::store::connect_with(&raw_url, Some(key.clone()))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let git = tempfile::tempdir().unwrap();
    let engine = start_engine(
        store.clone(),
        transport.clone(),
        git.path(),
        test_config(|_| {}),
        &stop,
    )
    .await;
    let _agent = MockAgent::spawn(transport.clone(), stop.clone());
    let r = ok_action_approved_and_completed(&engine).await;
    // Wait for the git writer's commit and its "committed" entry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = engine.audit_log(Some(r.id), 0, 100).await.unwrap();
        if log.iter().any(|e| e.event == "committed") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no committed entry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = engine.verify_audit().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    let entries = engine.audit_log(None, 0, 10_000).await.unwrap();
    assert!(entries.len() >= 4);
    // Every entry is keyed: none has its plain SHA-256.
    for e in &entries {
        let text = serde_json::to_string(&e.details).unwrap();
        let plain = entry_hash(
            None,
            &e.prev_hash,
            e.seq,
            e.at,
            e.request_id,
            &e.actor,
            &e.event,
            &text,
        );
        assert_ne!(plain, e.hash, "entry {} is not keyed", e.seq);
    }

    // Without the key: forge the last entry (the newest, after any anchor) and re-chain it.
    let last = entries.last().unwrap();
    let forged = serde_json::json!({ "forged": true });
    let text = serde_json::to_string(&forged).unwrap();
    let hash = entry_hash(
        None,
        &last.prev_hash,
        last.seq,
        last.at,
        last.request_id,
        &last.actor,
        &last.event,
        &text,
    );
    raw_sql(
        &raw_url,
        format!(
            "UPDATE audit_log SET details = '{text}', hash = '{hash}' WHERE seq = {seq};\n\
             UPDATE audit_head SET last_hash = '{hash}' WHERE id = 1;",
            seq = last.seq
        ),
    )
    .await;
    let report = engine.verify_audit().await.unwrap();
    assert!(!report.ok && !report.chain.ok, "{report:?}");
    assert_eq!(report.chain.first_bad_seq, Some(last.seq));
    assert!(
        report
            .chain
            .problem
            .as_deref()
            .unwrap()
            .contains("not keyed"),
        "{report:?}"
    );

    // Verified with another key, or with none, the chain does not verify at all.
    for other in [None, AuditKey::new("another key")] {
        let s = chiffon_core::store::connect_with(&raw_url, other)
            .await
            .unwrap();
        let v = s.verify_audit().await.unwrap();
        assert!(!v.ok);
        assert_eq!(v.first_bad_seq, Some(1), "{v:?}");
    }
    stop.cancel();
}

/// The request once its commit id is stored (the git trail writes it in the background).
async fn committed(engine: &Engine, id: Uuid) -> Request {
    for _ in 0..400 {
        let r = engine.get(id).await.unwrap().request;
        if r.commit_id.is_some() {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("request {id} has no commit id after 20 s");
}

/// A git trail that cannot commit shows in `/health` (degraded) until a commit succeeds; a
/// lock left by a crashed writer is cleared once it is stale, so the trail recovers.
async fn a_failing_git_trail_degrades_health_and_a_stale_lock_is_cleared(backend: &str) {
    let Some(h) = harness(backend, true, test_config(|_| {})).await else {
        return;
    };
    assert_eq!(h.engine.health().await.audit, "ok");
    let run = |h: &Harness| {
        let engine = h.engine.clone();
        async move {
            let r = engine
                .submit(SubmitRequest {
                    text: "ok_action".into(),
                    requester: Some("alice".into()),
                    ..Default::default()
                })
                .await
                .unwrap();
            tokio::time::timeout(
                Duration::from_secs(20),
                engine.wait_until(r.id, &[RequestStatus::AwaitingApproval]),
            )
            .await
            .unwrap()
            .unwrap();
            engine.approve(r.id, "bob", None).await.unwrap();
            tokio::time::timeout(
                Duration::from_secs(30),
                engine.wait_until(r.id, &[RequestStatus::Completed]),
            )
            .await
            .unwrap()
            .unwrap()
        }
    };
    run(&h).await;
    // A writer "crashed" just now while moving the branch: its lock is fresh, so it stays.
    let lock = h.git_dir.path().join("refs/heads/main.lock");
    std::fs::write(&lock, "").unwrap();
    let locked = run(&h).await;
    // Everything waiting is tried: this one fails and stays in the backlog.
    h.engine.flush_trail(Duration::from_secs(30)).await;
    let r = h.engine.get(locked.id).await.unwrap().request;
    assert_eq!(r.commit_id, None, "no commit while the branch is locked");
    let health = h.engine.health().await;
    assert_eq!(health.status, "degraded");
    assert!(health.audit.contains("main.lock"), "{}", health.audit);
    // Later the lock is stale: the next commit clears it and the trail recovers.
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&lock)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let r = run(&h).await;
    assert!(h.committed(r.id).await.commit_id.is_some());
    assert!(!lock.exists());
    // The one that waited is written from the backlog.
    h.engine.flush_trail(Duration::from_secs(30)).await;
    assert!(h.committed(locked.id).await.commit_id.is_some());
    assert_eq!(h.engine.health().await.audit, "ok");
}

/// An instance died while planning (its lease is in the store): another resumes the request
/// once the lease lapses, not before, and not after five minutes.
async fn planning_a_dead_instance_held_resumes_when_its_lease_lapses(backend: &str) {
    let Some(h) = harness(backend, false, test_config(|_| {})).await else {
        return;
    };
    let r = h
        .store
        .create_request(&NewRequest {
            id: Uuid::now_v7(),
            trace_id: "t".into(),
            text: "ok_action".into(),
            requester: "alice".into(),
            submitted_by: "alice".into(),
            dry_run: false,
        })
        .await
        .unwrap();
    assert!(h
        .store
        .claim_planning(r.id, "instance-that-died", Duration::from_secs(2))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        h.engine.get(r.id).await.unwrap().request.status,
        RequestStatus::Planning,
        "not while the lease holds"
    );
    let t0 = std::time::Instant::now();
    h.wait(r.id, RequestStatus::AwaitingApproval).await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

/// The server died after the request's git commit was written but before its final status
/// was stored: the request is still `running`, its steps all done. The sweeper finishes it
/// again; the record is rebuilt from stored facts only, byte for byte the same, so the
/// commit already written is found and becomes the request's commit id (not a second commit,
/// and not a "different record" failure leaving it without one).
async fn a_crash_between_commit_and_status_keeps_the_one_commit(backend: &str) {
    let Some((store, transport, raw_url, _guard)) = raw_backend(backend).await else {
        return;
    };
    let stop = CancellationToken::new();
    let git = tempfile::tempdir().unwrap();
    let engine = start_engine(
        store.clone(),
        transport.clone(),
        git.path(),
        test_config(|_| {}),
        &stop,
    )
    .await;
    let _agent = MockAgent::spawn(transport.clone(), stop.clone());
    let r = engine
        .submit(SubmitRequest {
            text: "ok_action".into(),
            requester: Some("alice".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::AwaitingApproval]),
    )
    .await
    .unwrap()
    .unwrap();
    engine.approve(r.id, "bob", None).await.unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::Completed]),
    )
    .await
    .unwrap()
    .unwrap();
    let commit = committed(&engine, done.id)
        .await
        .commit_id
        .expect("a commit id");
    // The state the crash left: committed in git, still running in the store, untouched
    // for longer than the sweeper waits.
    let id = if raw_url.starts_with("sqlite") {
        format!("X'{}'", r.id.simple())
    } else {
        format!("'{}'", r.id)
    };
    raw_sql(
        &raw_url,
        format!(
            "UPDATE tasks SET status = 'running', commit_id = NULL, \
             updated_at = '2020-01-01T00:00:00.000000Z' WHERE id = {id}"
        ),
    )
    .await;
    let again = tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::Completed]),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(again.status, RequestStatus::Completed);
    let again = committed(&engine, r.id).await;
    assert_eq!(again.commit_id.as_deref(), Some(commit.as_str()));
    let out = std::process::Command::new("git")
        .args([
            "--git-dir",
            &git.path().display().to_string(),
            "log",
            "--format=%s",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        log.matches(&r.id.to_string()).count(),
        1,
        "one commit for the request: {log}"
    );
    stop.cancel();
}

/// The dispatcher died after the transaction that marked a step `dispatched` (with its
/// message in the outbox) and before the publish: nothing is on the bus, and the step's
/// deadline is an hour away. The engine's relay publishes the stored message, the agent
/// runs that attempt once, and the request completes; the outbox is emptied.
async fn a_crash_between_mark_and_publish_is_relayed_from_the_outbox(backend: &str) {
    let Some((store, transport, _raw_url, _guard)) = raw_backend(backend).await else {
        return;
    };
    let r = store
        .create_request(&NewRequest {
            id: Uuid::now_v7(),
            trace_id: "outbox".into(),
            text: "ok_action".into(),
            requester: "alice".into(),
            submitted_by: "alice".into(),
            dry_run: false,
        })
        .await
        .unwrap();
    let plan = Plan {
        summary: "run ok_action".into(),
        steps: vec![PlanStep {
            action: "ok_action".into(),
            parameters: Map::new(),
            agent_type: "infrastructure".into(),
            resources: Default::default(),
            reason: "asked for".into(),
            provenance: Default::default(),
        }],
        risks: vec![],
        estimated_cost_usd: 0.0,
        llm_cost_usd: 0.0,
        provider: "test".into(),
        model: "list".into(),
        cached: false,
        skipped: Vec::new(),
    };
    store
        .transition(
            r.id,
            RequestStatus::Planning,
            RequestStatus::Queued,
            &RequestPatch {
                plan: Some(plan),
                approver: Some("bob".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let step = store.steps(r.id).await.unwrap().remove(0);
    let queue = transport.topology().agent_queue("infrastructure");
    let now = chrono::Utc::now();
    let env = Envelope::new(
        "outbox",
        Some(r.id),
        Message::WorkRequest(WorkRequest {
            agent_type: "infrastructure".into(),
            task_id: step.task_id,
            action: "ok_action".into(),
            parameters: Map::new(),
            resources_required: Default::default(),
            dry_run: false,
            attempt: 1,
            timeout_seconds: Some(3600),
        }),
    );
    // What the dispatcher committed before it died: the mark, the message, `running`.
    let slots = store
        .commit_group(&[
            GroupWrite::Step {
                task_id: step.task_id,
                from: vec![StepStatus::Ready],
                to: StepStatus::Dispatched,
                patch: Box::new(StepPatch {
                    attempt: Some(1),
                    queue: Some(queue.clone()),
                    dispatched_at: Some(now),
                    deadline_at: Some(now + chrono::TimeDelta::hours(1)),
                    ..Default::default()
                }),
                logs: vec![],
                audit: vec![],
            },
            GroupWrite::Send(OutboxMessage {
                id: env.message_id,
                task_id: step.task_id,
                attempt: 1,
                queue: queue.clone(),
                body: serde_json::to_string(&env).unwrap(),
                created_at: now - chrono::TimeDelta::seconds(60),
            }),
            GroupWrite::Transition {
                id: r.id,
                from: RequestStatus::Queued,
                to: RequestStatus::Running,
                patch: Box::default(),
            },
        ])
        .await
        .unwrap();
    assert!(slots.iter().all(Result::is_ok), "{slots:?}");
    assert_eq!(
        store
            .outbox_due(chrono::Utc::now(), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    let stop = CancellationToken::new();
    let git = tempfile::tempdir().unwrap();
    let engine = start_engine(
        store.clone(),
        transport.clone(),
        git.path(),
        test_config(|_| {}),
        &stop,
    )
    .await;
    let agent = MockAgent::spawn(transport.clone(), stop.clone());
    let done = tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::Completed]),
    )
    .await
    .expect("the relay published the stored message")
    .unwrap();
    assert_eq!(done.status, RequestStatus::Completed, "{:?}", done.error);
    let step = store.get_step(step.task_id).await.unwrap();
    assert_eq!(step.attempt, 1, "the stored attempt ran, not a retry");
    assert_eq!(agent.started.load(Ordering::SeqCst), 1);
    let mut left = usize::MAX;
    for _ in 0..100 {
        left = store
            .outbox_due(chrono::Utc::now() + chrono::TimeDelta::seconds(1), 10)
            .await
            .unwrap()
            .len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "the outbox is emptied");
    stop.cancel();
}

/// An auto-approved plan's first step, needing no agent chosen for it, is dispatched in the
/// transaction that queues the plan and published at once: it reaches its agent's queue with
/// no dispatcher running (this engine is never run), the request `running`, its entries in
/// order. The step after it waits, pending.
async fn an_auto_approved_first_step_goes_straight_to_its_agent(backend: &str) {
    let Some((store, transport, _url, _guard)) = raw_backend(backend).await else {
        return;
    };
    transport.declare_topology().await.unwrap();
    let queue = transport.topology().agent_queue("infrastructure");
    let mut work = transport
        .consume(&queue, ConsumeOptions { prefetch: 4 })
        .await
        .unwrap();
    let git = tempfile::tempdir().unwrap();
    let engine = new_engine(
        store.clone(),
        transport.clone(),
        git.path(),
        test_config(|c| c.approval.auto_approve_max_cost_usd = Some(0.5)),
    );
    let r = engine
        .submit(SubmitRequest {
            text: "auto_ok, auto_ok".into(),
            requester: Some("alice".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), work.next())
        .await
        .expect("the first step reaches its agent without a dispatcher")
        .unwrap()
        .unwrap();
    let env = d.parse().unwrap();
    d.ack().await.unwrap();
    let Message::WorkRequest(w) = env.body else {
        panic!("not a work request: {:?}", env.body)
    };
    assert_eq!(env.request_id, Some(r.id));
    assert_eq!((w.action.as_str(), w.attempt), ("auto_ok", 1));
    let view = engine.get(r.id).await.unwrap();
    assert_eq!(view.request.status, RequestStatus::Running);
    assert_eq!(
        view.request.approver.as_deref(),
        Some("policy:auto_approve_under_0.5_usd")
    );
    assert_eq!(view.steps[0].task_id, w.task_id);
    assert_eq!(view.steps[0].status, StepStatus::Dispatched);
    assert_eq!(view.steps[0].attempt, 1);
    assert_eq!(view.steps[0].queue.as_deref(), Some(queue.as_str()));
    assert_eq!(view.steps[1].status, StepStatus::Pending);
    let events: Vec<String> = engine
        .audit_log(Some(r.id), 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    let at = |name: &str| {
        events
            .iter()
            .position(|e| e == name)
            .unwrap_or_else(|| panic!("no {name} in {events:?}"))
    };
    assert!(at("received") < at("planned"), "{events:?}");
    assert!(at("planned") < at("auto_approved"), "{events:?}");
    assert!(at("auto_approved") < at("dispatched"), "{events:?}");
    // Its outbox row goes once the broker confirmed the message.
    for _ in 0..100 {
        if store
            .outbox_due(chrono::Utc::now() + chrono::TimeDelta::hours(1), 10)
            .await
            .unwrap()
            .is_empty()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the outbox row of a published message stayed");
}
