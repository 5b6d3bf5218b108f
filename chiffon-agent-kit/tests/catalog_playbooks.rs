//! Every catalog playbook that runs against localhost, with the real `ansible-playbook`:
//! the first run changes something observable, the second changes nothing, and the
//! `deploy_kuma` dry run returns its compose file as a diff and writes nothing.

mod common;

use std::time::{Duration, Instant};

use chiffon_agent_kit::{
    Agent, AgentError, AnsibleConfig, InfraAgent, InfraConfig, TaskContext, TaskOutcome,
};
use chiffon_core::catalog::Catalog;
use chiffon_protocol::ErrorCode;
use serde_json::{json, Value};

fn agent(state: &std::path::Path) -> InfraAgent {
    InfraAgent::new(InfraConfig {
        playbooks: common::playbooks(),
        ansible: AnsibleConfig {
            playbook_bin: Some(common::ansible_playbook()),
            state_dir: Some(state.to_path_buf()),
        },
    })
    .unwrap()
}

async fn run(
    a: &InfraAgent,
    action: &str,
    params: Value,
    dry: bool,
) -> Result<TaskOutcome, AgentError> {
    let mut w = common::work("infrastructure", action, params);
    w.dry_run = dry;
    let ctx = TaskContext::detached(w.task_id, dry, Instant::now() + Duration::from_secs(120));
    let out = a.handle(w, ctx.clone()).await;
    if out.is_ok() {
        assert_eq!(ctx.snapshot().progress, 100, "{action}");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_playbooks_change_once_then_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(&dir.path().join("ansible"));
    let d = dir.path();
    let cases = [
        (
            "write_config",
            json!({"path": d.join("c/app.conf"), "content": "x = 1\n"}),
        ),
        (
            "ensure_directory",
            json!({"path": d.join("data/sub"), "mode": "0700"}),
        ),
        (
            "install_service_file",
            json!({"unit_name": "demo", "exec_start": "/usr/bin/sleep 1000", "unit_dir": d.join("units")}),
        ),
    ];
    for (action, params) in cases {
        let first = run(&a, action, params.clone(), false).await.unwrap();
        assert_eq!(first.changed, Some(true), "{action} changes the first time");
        let second = run(&a, action, params, false).await.unwrap();
        assert_eq!(second.changed, Some(false), "{action} is idempotent");
    }
    assert_eq!(
        std::fs::read_to_string(d.join("c/app.conf")).unwrap(),
        "x = 1\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("data/sub"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let unit = std::fs::read_to_string(d.join("units/demo.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/sleep 1000"), "{unit}");

    // probe_port changes nothing and reports what it saw.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let open = run(
        &a,
        "probe_port",
        json!({"tcp_port": port, "require_open": true}),
        false,
    )
    .await
    .unwrap();
    assert_eq!(open.changed, Some(false));
    assert!(
        open.output.contains(&format!("127.0.0.1:{port} is open")),
        "{}",
        open.output
    );
    drop(l);
    let closed = run(
        &a,
        "probe_port",
        json!({"tcp_port": port, "wait_seconds": 1, "require_open": true}),
        false,
    )
    .await;
    let err = closed.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ActionFailed);
    assert!(err.to_string().contains("is closed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_kuma_dry_run_shows_the_compose_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(&dir.path().join("ansible"));
    let compose = dir.path().join("kuma");
    let out = run(
        &a,
        "deploy_kuma",
        json!({"host": "localhost", "version": "1.23.16", "web_port": 3901, "compose_dir": compose}),
        true,
    )
    .await
    .unwrap();
    let diff = out.diff.unwrap();
    assert!(
        diff.contains("+    image: louislam/uptime-kuma:1.23.16"),
        "{diff}"
    );
    assert!(diff.contains("3901:3001"), "{diff}");
    assert!(!compose.exists(), "check mode wrote nothing");
}

#[test]
fn catalog_loads_with_the_contract_format() {
    let c = Catalog::load(common::playbooks()).unwrap();
    assert!(c.hosts.contains(&"localhost".to_string()) && c.hosts.contains(&"nas".to_string()));
    let kuma = c.get("deploy_kuma").unwrap();
    assert!(kuma.check_mode && !kuma.auto_approve);
    assert_eq!(kuma.resources.memory_gb, 2.0);
    assert!(kuma.parameters["host"].required);
    let noop = c.get("noop").unwrap();
    assert!(noop.playbook.is_none() && noop.auto_approve);
    for (name, spec) in &c.actions {
        assert!(
            !spec.keywords.is_empty() && !spec.description.is_empty(),
            "{name}"
        );
        assert_eq!(spec.playbook.is_some(), name != "noop", "{name}");
        // Defaults pass their own schema, given a sample of each required parameter.
        let samples =
            json!({"host": "nas", "unit_name": "demo", "exec_start": "/usr/bin/x", "tcp_port": 80});
        let required: serde_json::Map<String, Value> = spec
            .parameters
            .iter()
            .filter(|(_, p)| p.required)
            .map(|(k, _)| (k.clone(), samples[k.as_str()].clone()))
            .collect();
        spec.validate(&required)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // Shell metacharacters never pass a pattern.
    let bad = json!({"host": "nas; rm -rf /"});
    assert!(kuma.validate(bad.as_object().unwrap()).is_err());
}
