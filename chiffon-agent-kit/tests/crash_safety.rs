//! What survives an agent's death.
//!
//! - A step finished just before the agent died (its result written to the durable ledger,
//!   the request not yet acked) is answered from the ledger when the request comes again,
//!   by a new runner in a new process memory: it does not run twice.
//! - A playbook an agent was running when it was killed (kill -9) does not run on beside
//!   the re-run: the next agent on the host kills the orphaned process group at start.
//! - The real agent process, on RabbitMQ, killed (SIGKILL, through its failpoints) after a
//!   playbook's side effect but before its result is sent, or after the result is sent but
//!   before the request is acked: the broker redelivers the request to the next agent, which
//!   answers it from the ledger; the side effect happened once.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chiffon_agent_kit::{
    process_group_alive, Agent, AgentError, AnsibleConfig, InfraAgent, InfraConfig, Runner,
    RunnerConfig, TaskContext, TaskOutcome,
};
use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::{ConsumeOptions, Topology, Transport};
use chiffon_protocol::{Envelope, Message, TaskState, WorkRequest};
use common::{bus, work, Kind};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

async fn next_result(
    results: &mut chiffon_core::transport::Consumer,
) -> chiffon_protocol::WorkResult {
    let fut = async {
        loop {
            let d = results.next().await.unwrap().unwrap();
            d.ack().await.unwrap();
            if let Message::WorkResult(r) = d.parse().unwrap().body {
                return r;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("a result")
}

struct Counting(Arc<AtomicU32>);

impl Agent for Counting {
    fn agent_type(&self) -> &str {
        "counting"
    }
    fn actions(&self) -> Vec<String> {
        vec!["count".into()]
    }
    async fn handle(&self, _w: WorkRequest, _ctx: TaskContext) -> Result<TaskOutcome, AgentError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(TaskOutcome::output(format!("run {n}")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_attempt_is_answered_from_the_ledger_after_a_restart() {
    let ledger = tempfile::tempdir().unwrap();
    let topology = Topology::with_prefix(&format!(
        "l{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let bus = MemoryTransport::new(topology.clone());
    bus.declare_topology().await.unwrap();
    let queue = topology.agent_queue("counting");
    bus.declare_queue(&queue).await.unwrap();
    let mut results = bus
        .consume(&topology.results_queue, ConsumeOptions { prefetch: 64 })
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let start = |runs: Arc<AtomicU32>| {
        let cfg = RunnerConfig {
            agent_id: Some("ledgered".into()),
            ledger_dir: Some(ledger.path().to_path_buf()),
            heartbeat_interval: Duration::from_secs(3600),
            ..RunnerConfig::default()
        };
        let runner = Runner::new(Arc::new(bus.clone()), Counting(runs), cfg);
        let stop = CancellationToken::new();
        let s = stop.clone();
        (
            stop,
            tokio::spawn(async move { runner.run(s).await.unwrap() }),
        )
    };
    let w = work("counting", "count", json!({}));
    let env = Envelope::new("t", None, Message::WorkRequest(w.clone()));
    let (stop, h) = start(runs.clone());
    bus.publish(&queue, &env).await.unwrap();
    let first = next_result(&mut results).await;
    assert_eq!(first.output, "run 1");
    stop.cancel();
    h.await.unwrap();
    // A new runner (a restarted agent: nothing in memory) gets the same request again, as
    // the broker redelivers one that was never acked.
    let (stop, h) = start(runs.clone());
    bus.publish(&queue, &env).await.unwrap();
    let again = next_result(&mut results).await;
    assert_eq!(again.task_id, w.task_id);
    assert_eq!(again.status, TaskState::Completed);
    assert_eq!(
        again.output, "run 1",
        "the recorded result, not a second run"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the step ran once");
    stop.cancel();
    h.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_playbook_is_stopped_by_the_next_agent() {
    let Some(bus) = bus(Kind::Amqp).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
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
            // Statuses from the start: the test reads the playbook's pid from the first.
            "--status-delay-ms",
            "0",
        ])
        .arg("--playbooks")
        .arg(common::playbooks())
        .arg("--state-dir")
        .arg(state.path().join("agent"))
        .env("CHIFFON_ANSIBLE_PLAYBOOK", common::ansible_playbook())
        .env("TMPDIR", state.path())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // A playbook that runs for a while: waiting on a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let w = work(
        "infrastructure",
        "probe_port",
        json!({"tcp_port": port, "wait_seconds": 60}),
    );
    bus.send(&queue, &w).await;
    let started = results
        .wait_for("the playbook started", 60, |e| {
            matches!(&e.body, Message::WorkStatus(s) if s.task_id == w.task_id && s.message.contains("(pid "))
        })
        .await;
    let Message::WorkStatus(s) = started.body else {
        unreachable!()
    };
    let pid: u32 = s
        .message
        .rsplit_once("(pid ")
        .and_then(|(_, p)| p.trim_end_matches(')').parse().ok())
        .unwrap();
    // Killed while ansible waits silently on the port: a playbook that prints would die of
    // SIGPIPE on its own once its reader is gone; a silent one runs on.
    results
        .wait_for("ansible is in its long task", 60, |e| {
            matches!(&e.body, Message::WorkStatus(s) if s.task_id == w.task_id && s.message.contains("Wait for the port"))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.start_kill().unwrap(); // SIGKILL: the agent dies, its playbook does not.
    child.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(process_group_alive(pid), "the orphaned playbook still runs");
    // The next agent on this host (same state folder) stops it when it starts.
    let _next = InfraAgent::new(InfraConfig {
        playbooks: common::playbooks(),
        ansible: AnsibleConfig {
            playbook_bin: Some(common::ansible_playbook()),
            state_dir: Some(state.path().join("chiffon-ansible")),
        },
    })
    .unwrap();
    let gone = async {
        while process_group_alive(pid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), gone)
        .await
        .expect("the orphaned playbook was killed");
    // Its workers too: ansible's workers leave the group (setsid) and outlive its leader
    // unless found otherwise. Everything the dead agent started has its TMPDIR.
    let marked = format!("TMPDIR={}", state.path().display());
    let left = async {
        loop {
            let pids = processes_with_env(&marked);
            if pids.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), left)
        .await
        .is_err()
    {
        panic!(
            "processes of the dead agent's playbook still run: {:?}",
            processes_with_env(&marked)
        );
    }
    bus.cleanup().await;
}

/// Live processes whose environment holds `kv` (`NAME=value`), with their command lines.
fn processes_with_env(kv: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if !zombie && env.split(|b| *b == 0).any(|x| x == kv.as_bytes()) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

/// A catalog of the repository's inventory and callback plugin plus `append_line`, whose
/// playbook appends a line to a file: a side effect that counts its runs.
fn counting_catalog(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("catalog");
    std::fs::create_dir_all(root.join("append_line")).unwrap();
    std::fs::create_dir_all(root.join("callback_plugins")).unwrap();
    let repo = common::playbooks();
    std::fs::copy(repo.join("inventory.ini"), root.join("inventory.ini")).unwrap();
    for e in std::fs::read_dir(repo.join("callback_plugins")).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), root.join("callback_plugins").join(e.file_name())).unwrap();
        }
    }
    std::fs::write(
        root.join("append_line/action.toml"),
        r#"description = "Append one line to a file (counts its runs)"
agent_type = "infrastructure"
keywords = ["append"]
verbs = ["append"]
auto_approve = false
check_mode = false
timeout_seconds = 120

[parameters.path]
type = "string"
description = "the file to append to"
pattern = "^/[\\w./-]+$"

[resources]
gpu = false
memory_gb = 0.1
"#,
    )
    .unwrap();
    std::fs::write(
        root.join("append_line/playbook.yml"),
        r#"---
- name: Append a line
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Append
      ansible.builtin.shell:
        cmd: 'echo ran >> "$MARK"'
      environment:
        MARK: "{{ path }}"
"#,
    )
    .unwrap();
    root
}

/// The infrastructure agent binary on RabbitMQ with the given catalog and state folder.
fn infra_agent(
    bus: &common::Bus,
    catalog: &std::path::Path,
    state: &std::path::Path,
    failpoint: Option<&str>,
) -> tokio::process::Child {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_chiffon-infra-agent"));
    c.args([
        "--amqp-url",
        &common::amqp_url(),
        "--queue-prefix",
        &bus.prefix,
        "--agent-id",
        "ledgered-infra",
    ])
    .arg("--playbooks")
    .arg(catalog)
    .arg("--state-dir")
    .arg(state.join("agent"))
    .env("CHIFFON_ANSIBLE_PLAYBOOK", common::ansible_playbook())
    .env("TMPDIR", state)
    .env_remove("CHIFFON_AGENT_FAILPOINT")
    .kill_on_drop(true);
    if let Some(point) = failpoint {
        c.env("CHIFFON_AGENT_FAILPOINT", point);
    }
    c.spawn().unwrap()
}

async fn killed_after_the_side_effect(failpoint: &str) {
    let Some(bus) = bus(Kind::Amqp).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let catalog = counting_catalog(dir.path());
    let mark = dir.path().join("runs.txt");
    let mut results = bus.collect_results().await;
    let queue = bus.transport.topology().agent_queue("infrastructure");
    bus.transport.declare_queue(&queue).await.unwrap();
    let w = work(
        "infrastructure",
        "append_line",
        json!({"path": mark.display().to_string()}),
    );
    let mut doomed = infra_agent(&bus, &catalog, dir.path(), Some(failpoint));
    bus.send(&queue, &w).await;
    let died = tokio::time::timeout(Duration::from_secs(120), doomed.wait())
        .await
        .expect("the agent reached its failpoint")
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(died.signal(), Some(9), "killed at {failpoint}: {died:?}");
    let runs = || {
        std::fs::read_to_string(&mark)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(runs(), 1, "the playbook ran before the agent died");
    // Before its ack the request is still the broker's: it comes again to the next agent,
    // which answers it from the ledger instead of running the playbook again.
    let _next = infra_agent(&bus, &catalog, dir.path(), None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let want = if failpoint == "before_ack" { 2 } else { 1 };
    while results.results_of(w.task_id).len() < want && tokio::time::Instant::now() < deadline {
        results.drain_for(200).await;
    }
    let got = results.results_of(w.task_id);
    assert_eq!(got.len(), want, "results: {got:#?}");
    for r in &got {
        assert_eq!(r.status, TaskState::Completed, "{r:#?}");
        assert_eq!(r.attempt, w.attempt);
    }
    // Give a wrongful second run time to show.
    results.drain_for(1500).await;
    assert_eq!(runs(), 1, "the step ran once, whatever the agent's death");
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_after_the_side_effect_before_sending_its_result_does_not_run_it_again() {
    killed_after_the_side_effect("before_publish").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_after_sending_its_result_before_the_ack_does_not_run_it_again() {
    killed_after_the_side_effect("before_ack").await;
}
