//! The infrastructure agent with the real `ansible-playbook`, on the in-process bus and on
//! RabbitMQ: progress reaches the results queue, the change is on disk, a second run changes
//! nothing, a dry run returns the diff and changes nothing, cancel kills the process group.

mod common;

use std::time::Duration;

use chiffon_agent_kit::{
    process_group_alive, AnsibleConfig, InfraAgent, InfraConfig, Runner, RunnerConfig,
};
use chiffon_protocol::{Cancel, Envelope, ErrorCode, Message, TaskState};
use common::{bus, work, Bus, Kind};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn start(bus: &Bus, state: &std::path::Path) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let agent = InfraAgent::new(InfraConfig {
        playbooks: common::playbooks(),
        ansible: AnsibleConfig {
            playbook_bin: Some(common::ansible_playbook()),
            state_dir: Some(state.to_path_buf()),
        },
    })
    .unwrap();
    let runner = Runner::new(
        bus.transport.clone(),
        agent,
        RunnerConfig {
            max_concurrent: 2,
            heartbeat_interval: Duration::from_secs(60),
            // Every status from the start: these tests watch progress and the pid.
            status_delay: Duration::ZERO,
            ..RunnerConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let s = stop.clone();
    let h = tokio::spawn(async move { runner.run(s).await.unwrap() });
    (stop, h)
}

async fn playbook_run_second_run_and_dry_run(kind: Kind) {
    let Some(bus) = bus(kind).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut results = bus.collect_results().await;
    let (stop, runner) = start(&bus, &dir.path().join("ansible"));
    let queue = bus.transport.topology().agent_queue("infrastructure");
    let path = dir.path().join("etc/app.conf");
    let params = json!({"path": path.to_str().unwrap(), "content": "a = 1\n", "mode": "0640"});

    // First run: changes the file, with rising progress on the results queue.
    let w = work("infrastructure", "write_config", params.clone());
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 120).await;
    assert_eq!(r.status, TaskState::Completed, "{r:#?}");
    assert_eq!(r.changed, Some(true));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "a = 1\n");
    let statuses = results.statuses_of(w.task_id);
    assert_eq!(statuses.first().map(|s| s.status), Some(TaskState::Running));
    let progress: Vec<u32> = statuses.iter().map(|s| s.progress).collect();
    assert!(
        progress.windows(2).all(|p| p[0] <= p[1]),
        "progress rises: {progress:?}"
    );
    assert!(
        progress.iter().filter(|p| **p > 0 && **p < 100).count() >= 2,
        "intermediate progress: {progress:?}"
    );
    assert_eq!(progress.last(), Some(&100));
    let lines: Vec<&String> = statuses.iter().flat_map(|s| &s.lines).collect();
    assert!(
        lines.iter().any(|l| l.contains("TASK [Write the file]")),
        "{lines:?}"
    );
    assert!(r.output.contains("PLAY RECAP"), "{}", r.output);
    assert!(
        r.resource_usage.cpu_hours > 0.0,
        "ansible used cpu: {:?}",
        r.resource_usage
    );
    assert!(
        r.resource_usage.memory_peak_gb > 0.001,
        "{:?}",
        r.resource_usage
    );
    assert!(r.duration_seconds > 0.0);

    // Second run: idempotent.
    let w2 = work("infrastructure", "write_config", params);
    bus.send(&queue, &w2).await;
    let r2 = results.result_of(w2.task_id, 120).await;
    assert_eq!(r2.status, TaskState::Completed, "{r2:#?}");
    assert_eq!(r2.changed, Some(false), "second run changes nothing");

    // Dry run of a different content: a diff, nothing written.
    let mut w3 = work(
        "infrastructure",
        "write_config",
        json!({"path": path.to_str().unwrap(), "content": "a = 2\n", "mode": "0640"}),
    );
    w3.dry_run = true;
    bus.send(&queue, &w3).await;
    let r3 = results.result_of(w3.task_id, 120).await;
    assert_eq!(r3.status, TaskState::Completed, "{r3:#?}");
    let diff = r3.diff.expect("a dry run returns the diff");
    assert!(diff.contains("-a = 1") && diff.contains("+a = 2"), "{diff}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "a = 1\n",
        "dry run changed nothing"
    );

    // Invalid parameters never reach ansible.
    let w4 = work(
        "infrastructure",
        "write_config",
        json!({"path": "relative; rm -rf /"}),
    );
    bus.send(&queue, &w4).await;
    let r4 = results.result_of(w4.task_id, 30).await;
    assert_eq!(r4.status, TaskState::Failed);
    assert_eq!(r4.error.unwrap().code, ErrorCode::InvalidParameters);

    stop.cancel();
    runner.await.unwrap();
    bus.cleanup().await;
}

async fn cancel_kills_the_playbook(kind: Kind) {
    let Some(bus) = bus(kind).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut results = bus.collect_results().await;
    let (stop, runner) = start(&bus, &dir.path().join("ansible"));
    let queue = bus.transport.topology().agent_queue("infrastructure");
    // A closed port: wait_for keeps polling for two minutes.
    let w = work(
        "infrastructure",
        "probe_port",
        json!({"tcp_port": 9, "wait_seconds": 120}),
    );
    bus.send(&queue, &w).await;
    let env = results
        .wait_for("the pid in a status", 60, |e| {
            matches!(&e.body, Message::WorkStatus(s) if s.task_id == w.task_id && s.message.contains("(pid "))
        })
        .await;
    let Message::WorkStatus(s) = env.body else {
        unreachable!()
    };
    let pid: u32 = s
        .message
        .rsplit("(pid ")
        .next()
        .unwrap()
        .trim_end_matches(')')
        .parse()
        .unwrap();
    assert!(process_group_alive(pid), "ansible runs");
    // Let it reach the long task.
    results
        .wait_for("the wait_for task", 60, |e| {
            matches!(&e.body, Message::WorkStatus(s) if s.task_id == w.task_id && s.message.contains("Wait for the port"))
        })
        .await;
    bus.transport
        .broadcast(&Envelope::new(
            "t",
            None,
            Message::Cancel(Cancel {
                task_id: w.task_id,
                reason: Some("test".into()),
            }),
        ))
        .await
        .unwrap();
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Cancelled, "{r:#?}");
    assert_eq!(r.error.unwrap().code, ErrorCode::TaskCancelled);
    assert!(
        r.duration_seconds < 100.0,
        "cancelled long before wait_for gave up"
    );
    assert!(!process_group_alive(pid), "the whole process group is gone");
    stop.cancel();
    runner.await.unwrap();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playbook_memory() {
    playbook_run_second_run_and_dry_run(Kind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playbook_amqp() {
    playbook_run_second_run_and_dry_run(Kind::Amqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_memory() {
    cancel_kills_the_playbook(Kind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_amqp() {
    cancel_kills_the_playbook(Kind::Amqp).await;
}

#[tokio::test]
async fn missing_ansible_says_how_to_install() {
    let err = chiffon_agent_kit::find_ansible_playbook(Some(std::path::Path::new(
        "/nonexistent/ansible-playbook",
    )));
    // A venv or PATH install may exist here; the explicit path alone must not be used.
    if let Err(e) = err {
        assert_eq!(e.code(), ErrorCode::AnsibleMissing);
        let m = e.to_string();
        assert!(
            m.contains("scripts/ansible.sh") && m.contains("pip install ansible-core"),
            "{m}"
        );
    }
    let agent = InfraAgent::new(InfraConfig {
        playbooks: common::playbooks(),
        ansible: AnsibleConfig::default(),
    })
    .unwrap();
    for a in [
        "deploy_kuma",
        "write_config",
        "ensure_directory",
        "install_service_file",
        "probe_port",
        "noop",
    ] {
        assert!(
            chiffon_agent_kit::Agent::actions(&agent).contains(&a.to_string()),
            "{a}"
        );
    }
}

/// The play sees its task's identity, `chiffon_task_id` and `chiffon_attempt`, and can key
/// a side effect on it: the retry of a task whose first attempt already acted (a redelivery
/// after a crash past the side effect) does not act again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_playbook_sees_its_task_id_and_attempt() {
    let Some(bus) = bus(Kind::Memory).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog");
    let action = catalog.join("once_per_task");
    std::fs::create_dir_all(&action).unwrap();
    std::fs::copy(
        common::playbooks().join("inventory.ini"),
        catalog.join("inventory.ini"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        common::playbooks().join("callback_plugins"),
        catalog.join("callback_plugins"),
    )
    .unwrap();
    std::fs::write(
        action.join("action.toml"),
        "description = \"Appends a line once per task\"\nagent_type = \"infrastructure\"\n\n\
         [parameters.dir]\ntype = \"string\"\nrequired = true\npattern = \"^/[\\\\w./-]+$\"\n",
    )
    .unwrap();
    std::fs::write(
        action.join("playbook.yml"),
        r#"---
- name: Append a line once per task
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Say who runs
      ansible.builtin.copy:
        dest: "{{ dir }}/identity"
        content: "{{ chiffon_task_id }} {{ chiffon_attempt }}\n"
    - name: Append, unless this task already did
      ansible.builtin.command:
        argv: [sh, -c, 'echo ran >> "$1"', sh, "{{ dir }}/runs"]
        creates: "{{ dir }}/done-{{ chiffon_task_id }}"
    - name: Mark this task done
      ansible.builtin.copy:
        dest: "{{ dir }}/done-{{ chiffon_task_id }}"
        content: ""
"#,
    )
    .unwrap();
    let agent = InfraAgent::new(InfraConfig {
        playbooks: catalog.clone(),
        ansible: AnsibleConfig {
            playbook_bin: Some(common::ansible_playbook()),
            state_dir: Some(dir.path().join("ansible")),
        },
    })
    .unwrap();
    let runner = Runner::new(bus.transport.clone(), agent, RunnerConfig::default());
    let stop = CancellationToken::new();
    let serving = tokio::spawn(runner.run(stop.clone()));
    let mut results = bus.collect_results().await;
    let queue = bus.transport.topology().agent_queue("infrastructure");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();

    let mut w = work(
        "infrastructure",
        "once_per_task",
        json!({"dir": out.to_str().unwrap()}),
    );
    for attempt in [1, 2] {
        w.attempt = attempt;
        bus.send(&queue, &w).await;
        let r = results.result_of(w.task_id, 120).await;
        results.seen.clear();
        assert_eq!(r.status, TaskState::Completed, "{r:#?}");
        assert_eq!(
            std::fs::read_to_string(out.join("identity")).unwrap(),
            format!("{} {attempt}\n", w.task_id)
        );
    }
    assert_eq!(
        std::fs::read_to_string(out.join("runs")).unwrap(),
        "ran\n",
        "the side effect happened once for the task"
    );
    // Another task is another key.
    let w2 = work(
        "infrastructure",
        "once_per_task",
        json!({"dir": out.to_str().unwrap()}),
    );
    bus.send(&queue, &w2).await;
    assert_eq!(
        results.result_of(w2.task_id, 120).await.status,
        TaskState::Completed
    );
    assert_eq!(
        std::fs::read_to_string(out.join("runs")).unwrap(),
        "ran\nran\n"
    );
    stop.cancel();
    serving.await.unwrap().unwrap();
}
