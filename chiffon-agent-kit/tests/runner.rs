//! The runner on both buses: garbage is dead-lettered while it keeps serving, heartbeats
//! carry real figures, unknown actions and deadlines fail with their codes, a finished task
//! redelivered is answered from the result cache, and a runner that stops or is killed
//! mid-task leaves its request to a second runner, which completes it once.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chiffon_agent_kit::{
    Agent, AgentError, InfraAgent, InfraConfig, Runner, RunnerConfig, TaskContext, TaskOutcome,
};
use chiffon_core::transport::ConsumeOptions;
use chiffon_protocol::{Envelope, ErrorCode, Message, TaskState, WorkRequest};
use common::{bus, work, Bus, Kind};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn infra() -> InfraAgent {
    InfraAgent::new(InfraConfig {
        playbooks: common::playbooks(),
        ..InfraConfig::default()
    })
    .unwrap()
}

fn config(id: &str) -> RunnerConfig {
    RunnerConfig {
        agent_id: Some(id.into()),
        heartbeat_interval: Duration::from_millis(300),
        ..RunnerConfig::default()
    }
}

fn spawn<A: Agent>(
    bus: &Bus,
    agent: A,
    cfg: RunnerConfig,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let runner = Runner::new(bus.transport.clone(), agent, cfg);
    let stop = CancellationToken::new();
    let s = stop.clone();
    (
        stop,
        tokio::spawn(async move { runner.run(s).await.unwrap() }),
    )
}

async fn garbage_is_dead_lettered(kind: Kind) {
    let Some(bus) = bus(kind).await else { return };
    let mut results = bus.collect_results().await;
    let (stop, h) = spawn(&bus, infra(), config("g1"));
    let queue = bus.transport.topology().agent_queue("infrastructure");
    bus.transport.declare_queue(&queue).await.unwrap();
    bus.transport
        .publish_bytes(&queue, b"{not json".to_vec())
        .await
        .unwrap();
    let e = results
        .wait_for("error reply", 30, |e| matches!(&e.body, Message::Error(_)))
        .await;
    let Message::Error(err) = e.body else {
        unreachable!()
    };
    assert_eq!(err.code, ErrorCode::MalformedMessage);
    // A valid envelope of the wrong type, and one with a bad version.
    let wrong = Envelope::new(
        "trace-x",
        None,
        Message::Cancel(chiffon_protocol::Cancel {
            task_id: uuid::Uuid::new_v4(),
            reason: None,
        }),
    );
    bus.transport.publish(&queue, &wrong).await.unwrap();
    let e = results
        .wait_for("error for wrong type", 30, |e| e.trace_id == "trace-x")
        .await;
    assert!(
        matches!(&e.body, Message::Error(p) if p.code == ErrorCode::InvalidField),
        "{e:?}"
    );

    // Both are in the dead-letter queue, never lost.
    let dlq = bus.transport.topology().dead_letter_queue.clone();
    let mut dead = bus
        .transport
        .consume(&dlq, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(10), dead.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        bodies.push(d.body.clone());
        d.ack().await.unwrap();
    }
    assert!(bodies.contains(&b"{not json".to_vec()));

    // And the runner keeps serving.
    let w = work("infrastructure", "noop", json!({"message": "still here"}));
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Completed);
    assert_eq!(r.output, "still here");
    stop.cancel();
    h.await.unwrap();
    drop(dead);
    bus.cleanup().await;
}

#[tokio::test]
async fn garbage_memory() {
    garbage_is_dead_lettered(Kind::Memory).await;
}

#[tokio::test]
async fn garbage_amqp() {
    garbage_is_dead_lettered(Kind::Amqp).await;
}

async fn heartbeats_unknown_actions_deadlines(kind: Kind) {
    let Some(bus) = bus(kind).await else { return };
    let mut results = bus.collect_results().await;
    let (stop, h) = spawn(&bus, infra(), config("hb1"));
    let hb = results
        .wait_for(
            "heartbeat",
            30,
            |e| matches!(&e.body, Message::Heartbeat(h) if h.agent_id == "hb1" && h.cpu.as_ref().is_some_and(|c| c.cores > 0)),
        )
        .await;
    let Message::Heartbeat(hb) = hb.body else {
        unreachable!()
    };
    let (cpu, memory) = (hb.cpu.clone().unwrap(), hb.memory.clone().unwrap());
    assert!(memory.total_gb > 0.0 && memory.used_gb > 0.0, "{hb:?}");
    assert!(memory.used_gb <= memory.total_gb);
    assert!((0.0..=100.0).contains(&cpu.percent));
    assert_eq!(hb.agent_type, "infrastructure");
    assert!(hb.actions.contains(&"noop".to_string()));
    assert_eq!(
        hb.queue.as_deref(),
        Some(
            bus.transport
                .topology()
                .agent_queue("infrastructure")
                .as_str()
        )
    );

    let queue = bus.transport.topology().agent_queue("infrastructure");
    let w = work("infrastructure", "reboot_the_world", json!({}));
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Failed);
    assert_eq!(r.error.unwrap().code, ErrorCode::ActionNotSupported);

    let mut w = work("infrastructure", "noop", json!({"sleep_ms": 60000}));
    w.timeout_seconds = Some(1);
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Failed);
    assert_eq!(r.error.unwrap().code, ErrorCode::TaskDeadline);
    assert!(r.duration_seconds < 30.0);
    stop.cancel();
    h.await.unwrap();
    bus.cleanup().await;
}

#[tokio::test]
async fn heartbeats_and_failures_memory() {
    heartbeats_unknown_actions_deadlines(Kind::Memory).await;
}

#[tokio::test]
async fn heartbeats_and_failures_amqp() {
    heartbeats_unknown_actions_deadlines(Kind::Amqp).await;
}

/// Counts how often it really runs.
struct Counting(Arc<AtomicU32>);

impl Agent for Counting {
    fn agent_type(&self) -> &str {
        "counting"
    }
    fn actions(&self) -> Vec<String> {
        vec!["count".into()]
    }
    async fn handle(&self, _w: WorkRequest, ctx: TaskContext) -> Result<TaskOutcome, AgentError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        ctx.output_line(format!("run {n}"));
        Ok(TaskOutcome::output(format!("run {n}")))
    }
}

#[tokio::test]
async fn redelivered_finished_task_is_answered_from_the_cache() {
    let Some(bus) = bus(Kind::Memory).await else {
        return;
    };
    let mut results = bus.collect_results().await;
    let runs = Arc::new(AtomicU32::new(0));
    let (stop, h) = spawn(&bus, Counting(runs.clone()), config("c1"));
    let queue = bus.transport.topology().agent_queue("counting");
    let w = work("counting", "count", json!({}));
    bus.send(&queue, &w).await;
    let first = results
        .wait_for(
            "result",
            30,
            |e| matches!(&e.body, Message::WorkResult(r) if r.task_id == w.task_id),
        )
        .await;
    bus.send(&queue, &w).await;
    results.drain_for(1000).await;
    let copies: Vec<&Envelope> = results
        .seen
        .iter()
        .filter(|e| matches!(&e.body, Message::WorkResult(r) if r.task_id == w.task_id))
        .collect();
    assert_eq!(copies.len(), 2, "the redelivery is answered");
    assert_eq!(
        copies[1].message_id, first.message_id,
        "with the stored result"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "and not run again");
    // A new attempt is new work.
    let mut w2 = w.clone();
    w2.attempt = 2;
    bus.send(&queue, &w2).await;
    results.drain_for(1000).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    stop.cancel();
    h.await.unwrap();
}

async fn stopped_runner_requeues(kind: Kind) {
    let Some(bus) = bus(kind).await else { return };
    let mut results = bus.collect_results().await;
    let cfg = RunnerConfig {
        shutdown_grace: Duration::ZERO,
        ..config("first")
    };
    let (stop, h) = spawn(&bus, infra(), cfg);
    let queue = bus.transport.topology().agent_queue("infrastructure");
    let w = work(
        "infrastructure",
        "noop",
        json!({"sleep_ms": 2000, "message": "done"}),
    );
    bus.send(&queue, &w).await;
    results
        .wait_for("accepted by first", 30, |e| matches!(&e.body, Message::WorkStatus(s) if s.task_id == w.task_id && s.agent_id.as_deref() == Some("first")))
        .await;
    stop.cancel();
    h.await.unwrap();
    let (stop2, h2) = spawn(&bus, infra(), config("second"));
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Completed);
    assert_eq!(r.agent_id.as_deref(), Some("second"));
    results.drain_for(1500).await;
    assert_eq!(results.results_of(w.task_id).len(), 1, "completed once");
    stop2.cancel();
    h2.await.unwrap();
    bus.cleanup().await;
}

#[tokio::test]
async fn shutdown_requeues_memory() {
    stopped_runner_requeues(Kind::Memory).await;
}

#[tokio::test]
async fn shutdown_requeues_amqp() {
    stopped_runner_requeues(Kind::Amqp).await;
}

/// The real binary, killed with SIGKILL mid-task: RabbitMQ redelivers its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_agent_binary_task_is_redelivered_and_completed_once() {
    let Some(bus) = bus(Kind::Amqp).await else {
        return;
    };
    let mut results = bus.collect_results().await;
    let queue = bus.transport.topology().agent_queue("infrastructure");
    bus.transport.declare_queue(&queue).await.unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chiffon-infra-agent"))
        .args([
            "--amqp-url",
            &common::amqp_url(),
            "--queue-prefix",
            &bus.prefix,
            "--agent-id",
            "doomed",
        ])
        .arg("--playbooks")
        .arg(common::playbooks())
        .arg("--state-dir")
        .arg(std::env::temp_dir().join(format!(
            "chiffon-agent-test-{}",
            uuid::Uuid::new_v4().simple()
        )))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let w = work(
        "infrastructure",
        "noop",
        json!({"sleep_ms": 3000, "message": "survived"}),
    );
    bus.send(&queue, &w).await;
    results
        .wait_for("accepted by the child", 60, |e| matches!(&e.body, Message::WorkStatus(s) if s.task_id == w.task_id && s.agent_id.as_deref() == Some("doomed")))
        .await;
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let (stop, h) = spawn(&bus, infra(), config("rescuer"));
    let r = results.result_of(w.task_id, 60).await;
    assert_eq!(r.status, TaskState::Completed, "{r:?}");
    assert_eq!(r.agent_id.as_deref(), Some("rescuer"));
    assert_eq!(r.output, "survived");
    results.drain_for(1500).await;
    assert_eq!(results.results_of(w.task_id).len(), 1, "completed once");
    stop.cancel();
    h.await.unwrap();
    bus.cleanup().await;
}

/// The real binary on SIGTERM: stops taking work, finishes what it runs, exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_agent_binary_finish_its_task() {
    let Some(bus) = bus(Kind::Amqp).await else {
        return;
    };
    let mut results = bus.collect_results().await;
    let queue = bus.transport.topology().agent_queue("infrastructure");
    bus.transport.declare_queue(&queue).await.unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chiffon-infra-agent"))
        .args([
            "--amqp-url",
            &common::amqp_url(),
            "--queue-prefix",
            &bus.prefix,
        ])
        .args(["--agent-id", "polite", "--shutdown-grace", "30"])
        .arg("--playbooks")
        .arg(common::playbooks())
        .arg("--state-dir")
        .arg(std::env::temp_dir().join(format!(
            "chiffon-agent-test-{}",
            uuid::Uuid::new_v4().simple()
        )))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let w = work(
        "infrastructure",
        "noop",
        json!({"sleep_ms": 1500, "message": "finished"}),
    );
    bus.send(&queue, &w).await;
    results
        .wait_for("accepted by the child", 60, |e| {
            matches!(&e.body, Message::WorkStatus(s) if s.task_id == w.task_id && s.agent_id.as_deref() == Some("polite"))
        })
        .await;
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let r = results.result_of(w.task_id, 60).await;
    assert_eq!(r.status, TaskState::Completed, "{r:?}");
    assert_eq!(r.agent_id.as_deref(), Some("polite"));
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(bus.transport.queue_depth(&queue).await.unwrap(), 0);
    bus.cleanup().await;
}

struct Panicky;

impl Agent for Panicky {
    fn agent_type(&self) -> &str {
        "panicky"
    }
    fn actions(&self) -> Vec<String> {
        vec!["explode".into(), "fine".into()]
    }
    async fn handle(&self, w: WorkRequest, _ctx: TaskContext) -> Result<TaskOutcome, AgentError> {
        if w.action == "explode" {
            panic!("kaboom");
        }
        Ok(TaskOutcome::output("fine"))
    }
}

#[tokio::test]
async fn a_panicking_handler_fails_its_task_and_the_runner_keeps_serving() {
    let Some(bus) = bus(Kind::Memory).await else {
        return;
    };
    let mut results = bus.collect_results().await;
    let (stop, h) = spawn(&bus, Panicky, config("p1"));
    let queue = bus.transport.topology().agent_queue("panicky");
    let w = work("panicky", "explode", json!({}));
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Failed);
    let e = r.error.unwrap();
    assert_eq!(e.code, ErrorCode::ExecutorCrashed);
    assert!(e.message.contains("kaboom"), "{}", e.message);
    let w = work("panicky", "fine", json!({}));
    bus.send(&queue, &w).await;
    assert_eq!(
        results.result_of(w.task_id, 30).await.status,
        TaskState::Completed
    );
    stop.cancel();
    h.await.unwrap();
}

/// Only the orchestrator hands out work: a `work_request` published by any other broker
/// user (another agent, a frontend) is answered with a 5009 error, dead-lettered and never
/// run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_from_a_publisher_other_than_the_orchestrator_is_never_run() {
    use chiffon_core::transport::memory::MemoryTransport;
    use chiffon_core::transport::{Topology, Transport};
    let topology = Topology::with_prefix(&format!(
        "o{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let base = MemoryTransport::new(topology);
    let orchestrator = base.with_identity("chiffon-orchestrator");
    let other_agent = base.with_identity("agent-b");
    let agent_bus: Arc<dyn Transport> = Arc::new(base.with_identity("agent-a"));
    let ran = Arc::new(AtomicU32::new(0));
    let cfg = RunnerConfig {
        orchestrator_users: vec!["chiffon-orchestrator".into()],
        ..config("o1")
    };
    let runner = Runner::new(agent_bus.clone(), Counting(ran.clone()), cfg);
    let stop = CancellationToken::new();
    let s = stop.clone();
    let h = tokio::spawn(async move { runner.run(s).await.unwrap() });
    let t = orchestrator.topology().clone();
    orchestrator.declare_topology().await.unwrap();
    let queue = t.agent_queue("counting");
    orchestrator.declare_queue(&queue).await.unwrap();
    let mut results = orchestrator
        .consume(&t.results_queue, ConsumeOptions { prefetch: 64 })
        .await
        .unwrap();
    let send = |w: &WorkRequest| Envelope::new("t", None, Message::WorkRequest(w.clone()));
    let forged = work("counting", "count", json!({}));
    other_agent.publish(&queue, &send(&forged)).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let d = results.next().await.unwrap().unwrap();
            d.ack().await.unwrap();
            if let Message::Error(e) = d.parse().unwrap().body {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(refused.code, ErrorCode::PublisherNotAllowed);
    assert!(refused.message.contains("agent-b"), "{}", refused.message);
    // The error reply goes out first, then the request is dead-lettered.
    tokio::time::timeout(Duration::from_secs(10), async {
        while orchestrator
            .queue_depth(&t.dead_letter_queue)
            .await
            .unwrap()
            < 1
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the forged request was dead-lettered");

    let real = work("counting", "count", json!({}));
    orchestrator.publish(&queue, &send(&real)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let d = results.next().await.unwrap().unwrap();
            d.ack().await.unwrap();
            if let Message::WorkResult(r) = d.parse().unwrap().body {
                assert_eq!(r.task_id, real.task_id);
                return;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "only the orchestrator's work ran"
    );
    stop.cancel();
    h.await.unwrap();
}

/// Prints `lines`, reports progress, sleeps `sleep_ms`, prints `after`, and answers
/// `output` (empty: the runner's tail of the lines).
struct Talky;

impl Agent for Talky {
    fn agent_type(&self) -> &str {
        "talky"
    }
    fn actions(&self) -> Vec<String> {
        vec!["talk".into()]
    }
    async fn handle(&self, w: WorkRequest, ctx: TaskContext) -> Result<TaskOutcome, AgentError> {
        let strings = |k: &str| -> Vec<String> {
            w.parameters
                .get(k)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        for line in strings("lines") {
            ctx.output_line(line);
        }
        ctx.progress(50, "half way");
        let ms = w.parameters.get("sleep_ms").and_then(|v| v.as_u64());
        let ms = ms.unwrap_or(0);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = ctx.cancelled() => return Err(AgentError::Cancelled),
        }
        for line in strings("after") {
            ctx.output_line(line);
        }
        let output = w.parameters.get("output").and_then(|v| v.as_str());
        Ok(TaskOutcome::output(output.unwrap_or_default()))
    }
}

/// A task shorter than `status_delay` is two messages on the bus, its `work_request` and
/// its `work_result`, whose output holds its lines; when the output does not hold them, one
/// status carries them first. A longer task's first status (`running`) comes after the
/// delay with the lines and progress so far, and no line is lost.
async fn short_tasks_send_only_their_result(kind: Kind) {
    let Some(bus) = bus(kind).await else { return };
    let mut results = bus.collect_results().await;
    let cfg = config("talky1");
    assert_eq!(cfg.status_delay, Duration::from_secs(1), "the default");
    let (stop, h) = spawn(&bus, Talky, cfg);
    let queue = bus.transport.topology().agent_queue("talky");

    // Short, and the output is its lines: the result alone.
    let w = work("talky", "talk", json!({"lines": ["one", "two"]}));
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Completed);
    assert_eq!(r.output, "one\ntwo");
    results.drain_for(300).await;
    assert!(results.statuses_of(w.task_id).is_empty(), "no status");
    assert_eq!(results.results_of(w.task_id).len(), 1);

    // Short, with an output of its own: one status carries the lines, then the result.
    let w = work(
        "talky",
        "talk",
        json!({"lines": ["three", "four"], "output": "summary"}),
    );
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.output, "summary");
    let statuses = results.statuses_of(w.task_id);
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(statuses[0].status, TaskState::Running);
    assert_eq!(statuses[0].lines, ["three", "four"]);
    assert_eq!(statuses[0].progress, 50);

    // Longer than the delay: the first status after it, with what accumulated; the rest
    // flows as before.
    let w = work(
        "talky",
        "talk",
        json!({"lines": ["five"], "sleep_ms": 1800, "after": ["six"], "output": "done"}),
    );
    let sent = std::time::Instant::now();
    bus.send(&queue, &w).await;
    let first = results
        .wait_for(
            "the first status",
            30,
            |e| matches!(&e.body, Message::WorkStatus(s) if s.task_id == w.task_id),
        )
        .await;
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "not before the delay: {waited:?}"
    );
    let Message::WorkStatus(first) = first.body else {
        unreachable!()
    };
    assert_eq!(first.status, TaskState::Running);
    assert_eq!(
        (first.progress, first.lines.clone()),
        (50, vec!["five".to_string()])
    );
    assert_eq!(first.attempt, Some(1));
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.output, "done");
    let lines: Vec<String> = results
        .statuses_of(w.task_id)
        .into_iter()
        .flat_map(|s| s.lines)
        .collect();
    assert_eq!(lines, ["five", "six"], "every line, once");

    stop.cancel();
    h.await.unwrap();
    bus.cleanup().await;
}

#[tokio::test]
async fn short_tasks_send_only_their_result_memory() {
    short_tasks_send_only_their_result(Kind::Memory).await;
}

#[tokio::test]
async fn short_tasks_send_only_their_result_amqp() {
    short_tasks_send_only_their_result(Kind::Amqp).await;
}
