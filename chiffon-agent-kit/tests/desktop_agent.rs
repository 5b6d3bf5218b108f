//! The desktop agent on its per-host queue, on both buses: heartbeats with real figures,
//! `metrics_snapshot`, and a catalog playbook run locally.

mod common;

use std::time::Duration;

use chiffon_agent_kit::{
    AnsibleConfig, DesktopAgent, InfraAgent, InfraConfig, Runner, RunnerConfig,
};
use chiffon_protocol::{Message, TaskState};
use common::{bus, work, Kind};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

async fn desktop(kind: Kind) {
    let Some(bus) = bus(kind).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut results = bus.collect_results().await;
    let local = InfraAgent::new(InfraConfig {
        playbooks: common::playbooks(),
        ansible: AnsibleConfig {
            playbook_bin: Some(common::ansible_playbook()),
            state_dir: Some(dir.path().join("ansible")),
        },
    })
    .unwrap();
    let host = format!("ws-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let runner = Runner::new(
        bus.transport.clone(),
        DesktopAgent::new(host.clone(), Some(local)),
        RunnerConfig {
            hostname: host.clone(),
            heartbeat_interval: Duration::from_millis(300),
            ..RunnerConfig::default()
        },
    );
    let queue = bus.transport.topology().desktop_queue(&host);
    assert_eq!(runner.queue(), queue);
    let stop = CancellationToken::new();
    let h = tokio::spawn(runner.run(stop.clone()));

    let hb = results
        .wait_for(
            "desktop heartbeat",
            30,
            |e| matches!(&e.body, Message::Heartbeat(h) if h.hostname == host),
        )
        .await;
    let Message::Heartbeat(hb) = hb.body else {
        unreachable!()
    };
    assert_eq!(hb.agent_type, "desktop");
    assert!(
        hb.cpu.as_ref().is_some_and(|c| c.cores >= 1)
            && hb
                .memory
                .as_ref()
                .is_some_and(|m| m.total_gb > 0.0 && m.used_gb > 0.0),
        "{hb:?}"
    );
    assert!(hb.actions.contains(&"metrics_snapshot".to_string()));
    for g in &hb.gpus {
        assert!(g.memory_total_gb > 0.0, "{g:?}");
    }

    let w = work("desktop", "metrics_snapshot", json!({}));
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Completed, "{r:?}");
    let m: Value = serde_json::from_str(&r.output).unwrap();
    assert_eq!(m["hostname"], host.as_str());
    assert!(m["memory"]["total_gb"].as_f64().unwrap() > 0.0, "{m}");
    assert!(m["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(m["gpus"].is_array());

    // A catalog playbook, run on this host whatever `host` the request named.
    let path = dir.path().join("made/by/desktop");
    let w = work(
        "desktop",
        "ensure_directory",
        json!({"host": "nas", "path": path.to_str().unwrap(), "mode": "0750"}),
    );
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 120).await;
    assert_eq!(r.status, TaskState::Completed, "{r:?}");
    assert_eq!(r.changed, Some(true));
    assert!(path.is_dir());

    stop.cancel();
    h.await.unwrap().unwrap();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desktop_memory() {
    desktop(Kind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desktop_amqp() {
    desktop(Kind::Amqp).await;
}
