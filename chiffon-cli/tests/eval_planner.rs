//! `chiffon eval-planner` on the shipped corpus: the offline planner makes no wrong plan.

use std::path::Path;
use std::process::Command;

#[test]
fn eval_planner_reports_the_offline_figures() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chiffon"))
        .args(["--json", "eval-planner", "--playbooks"])
        .arg(root.join("playbooks"))
        .arg("--corpus")
        .arg(root.join("chiffon-core/tests/fixtures/planner_corpus.toml"))
        .current_dir(dir.path())
        .env_remove("CHIFFON_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["provider"], "offline");
    assert_eq!(v["figures"]["wrong"], 0, "{v:#}");
    assert!(v["figures"]["total"].as_u64().unwrap() >= 150);
    assert!(v["accuracy"].as_f64().unwrap() >= 0.9, "{v:#}");

    // A corpus that expects the opposite of what the planner does fails the run.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[case]]\ntext = \"Create the directory /tmp/chiffon/x\"\nrefuse = \"pretend\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chiffon"))
        .args(["eval-planner", "--playbooks"])
        .arg(root.join("playbooks"))
        .arg("--corpus")
        .arg(&bad)
        .current_dir(dir.path())
        .env_remove("CHIFFON_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("WRONG"));
}
