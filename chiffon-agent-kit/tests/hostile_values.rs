//! Hostile parameter values against the real `ansible-playbook`: a value is data and never
//! becomes code, at every layer.
//!
//! - The catalog refuses template markers before anything runs (the agent validates again).
//! - Below the catalog, the executor alone still holds: values reach Ansible tagged
//!   `!unsafe`, so a `{{ lookup('pipe', …) }}` is written literally, in a normal run and in
//!   check mode, through `copy` and through a `template` file; no canary file appears and
//!   no environment secret leaks.
//! - Every shipped playbook run with `--check` changes nothing on disk.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chiffon_agent_kit::{
    Agent, AnsibleConfig, AnsibleExecutor, InfraAgent, InfraConfig, PlaybookRun, TaskContext,
};
use chiffon_core::catalog::Catalog;
use chiffon_protocol::ErrorCode;
use serde_json::{json, Map, Value};

fn config(state: &Path) -> AnsibleConfig {
    AnsibleConfig {
        playbook_bin: Some(common::ansible_playbook()),
        state_dir: Some(state.to_path_buf()),
    }
}

fn ctx(dry: bool) -> TaskContext {
    TaskContext::detached(
        uuid::Uuid::new_v4(),
        dry,
        Instant::now() + Duration::from_secs(120),
    )
}

/// Runs a catalog playbook through the executor with `vars` as they are: no catalog
/// validation, as if a bug or a `raw = true` parameter let a hostile value through.
async fn run_unvalidated(
    state: &Path,
    action: &str,
    vars: Value,
    check: bool,
) -> chiffon_agent_kit::TaskOutcome {
    let root = common::playbooks();
    let playbook = root.join(action).join("playbook.yml");
    let inventory = root.join("inventory.ini");
    let callbacks = root.join("callback_plugins");
    let vars: Map<String, Value> = vars.as_object().unwrap().clone();
    AnsibleExecutor::new(config(state))
        .run(
            PlaybookRun {
                playbook: &playbook,
                inventory: &inventory,
                callback_dir: &callbacks,
                extra_vars: &vars,
                check,
            },
            &ctx(check),
        )
        .await
        .unwrap_or_else(|e| panic!("{action}: {e}"))
}

fn hostile(canary: &Path) -> Vec<String> {
    let c = canary.display();
    vec![
        format!("{{{{ lookup('pipe', 'touch {c}') }}}}"),
        format!("{{% set x = lookup('pipe', 'touch {c}') %}}{{{{ x }}}}"),
        format!("{{{{ query('pipe', 'touch {c}') | first }}}}"),
        "{{ lookup('env', 'CHIFFON_TEST_SECRET') }}".to_string(),
        format!("{{# comment #}}{{{{ '{c}' | realpath }}}}\"\n'\\ end"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_and_the_agent_refuse_template_markers() {
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    let agent = InfraAgent::new(InfraConfig {
        playbooks: common::playbooks(),
        ansible: config(&dir.path().join("ansible")),
    })
    .unwrap();
    for value in hostile(&canary) {
        for (action, params) in [
            (
                "write_config",
                json!({"path": dir.path().join("c.conf"), "content": value}),
            ),
            (
                "install_service_file",
                json!({"unit_name": "x", "exec_start": format!("/bin/{value}"), "unit_dir": dir.path()}),
            ),
            (
                "install_service_file",
                json!({"unit_name": "x", "exec_start": "/bin/true", "service_description": value, "unit_dir": dir.path()}),
            ),
        ] {
            let work = common::work("infrastructure", action, params);
            for dry in [false, true] {
                let err = agent.handle(work.clone(), ctx(dry)).await.unwrap_err();
                assert_eq!(err.code(), ErrorCode::InvalidParameters, "{action}: {err}");
            }
        }
    }
    assert!(!canary.exists(), "a refused value ran anyway");
    assert!(!dir.path().join("c.conf").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_reach_ansible_unsafe_and_are_written_literally() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("ansible");
    let canary = dir.path().join("canary");
    // A secret in the agent's environment must not be readable through a value.
    std::env::set_var("CHIFFON_TEST_SECRET", "s3cr3t-from-the-environment");
    for (i, value) in hostile(&canary).into_iter().enumerate() {
        // Check mode first: it must not evaluate the value either.
        for check in [true, false] {
            let file = dir.path().join(format!("out/{i}.conf"));
            let out = run_unvalidated(
                &state,
                "write_config",
                json!({"host": "localhost", "path": file, "content": value, "mode": "0644"}),
                check,
            )
            .await;
            assert!(
                !out.output.contains("s3cr3t") && !out.diff.unwrap_or_default().contains("s3cr3t"),
                "the environment leaked"
            );
            if !check {
                assert_eq!(std::fs::read_to_string(&file).unwrap(), value);
            }
            let unit_dir = dir.path().join(format!("units{i}"));
            run_unvalidated(
                &state,
                "install_service_file",
                json!({"host": "localhost", "unit_name": "x", "exec_start": format!("/bin/{value}"),
                       "service_description": value, "unit_dir": unit_dir}),
                check,
            )
            .await;
            if !check {
                let unit = std::fs::read_to_string(unit_dir.join("x.service")).unwrap();
                assert!(unit.contains(&format!("Description={value}")), "{unit}");
                assert!(unit.contains(&format!("ExecStart=/bin/{value}")), "{unit}");
                assert!(!unit.contains("s3cr3t"));
            }
        }
    }
    assert!(!canary.exists(), "a value was evaluated as a template");
}

/// Every file under `root`: path → (mode, content or "dir").
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if meta.is_dir() {
            out.insert(p.clone(), (mode, "dir".into()));
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            out.insert(
                p.clone(),
                (
                    mode,
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into(),
                ),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_playbook_changes_nothing_in_check_mode() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("existing")).unwrap();
    std::fs::write(work.join("existing/app.conf"), "old = 1\n").unwrap();
    let catalog = Catalog::load(common::playbooks()).unwrap();
    let agent = InfraAgent::new(InfraConfig {
        playbooks: common::playbooks(),
        ansible: config(&dir.path().join("ansible")),
    })
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Parameters aimed at `work`, one set per shipped action; a new action must add its own.
    let params: BTreeMap<&str, Vec<Value>> = BTreeMap::from([
        (
            "deploy_kuma",
            vec![json!({"host": "localhost", "compose_dir": work.join("kuma")})],
        ),
        (
            "ensure_directory",
            vec![
                json!({"path": work.join("new/dir"), "mode": "0700"}),
                json!({"path": work.join("existing"), "mode": "0700"}),
            ],
        ),
        (
            "install_service_file",
            vec![
                json!({"unit_name": "demo", "exec_start": "/usr/bin/sleep 1", "unit_dir": work.join("units")}),
            ],
        ),
        ("noop", vec![json!({})]),
        (
            "probe_port",
            vec![json!({"tcp_port": port, "wait_seconds": 1})],
        ),
        (
            "write_config",
            vec![
                json!({"path": work.join("c/app.conf"), "content": "x = 1\n"}),
                json!({"path": work.join("existing/app.conf"), "content": "new = 2\n", "mode": "0600"}),
            ],
        ),
    ]);
    let shipped: Vec<&str> = catalog.actions.keys().map(String::as_str).collect();
    assert_eq!(
        shipped,
        params.keys().copied().collect::<Vec<_>>(),
        "every shipped action is covered"
    );
    let before = snapshot(&work);
    for (action, cases) in &params {
        assert!(
            catalog.get(action).unwrap().check_mode,
            "{action} declares check_mode"
        );
        for p in cases {
            let w = common::work("infrastructure", action, p.clone());
            let out = agent
                .handle(w, ctx(true))
                .await
                .unwrap_or_else(|e| panic!("{action} --check: {e}"));
            assert!(out.diff.is_some(), "{action}: a dry run returns a diff");
        }
        assert_eq!(snapshot(&work), before, "{action} --check changed the disk");
    }
    drop(listener);
}
