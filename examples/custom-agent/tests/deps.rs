//! A custom agent builds only what an agent needs: the orchestrator's database, git and
//! HTTP-client crates must stay out of its dependency tree (`cargo tree -p custom-agent`).

#[test]
fn no_database_git_or_http_client_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "custom-agent",
            "--prefix",
            "none",
            "--edges",
            "normal,build,dev",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let forbidden = ["sqlx", "libsqlite3-sys", "git2", "libgit2-sys", "reqwest"];
    let found: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| {
            forbidden
                .iter()
                .any(|f| name == f || name.starts_with(&format!("{f}-")))
        })
        .collect();
    assert!(found.is_empty(), "custom-agent depends on {found:?}");
    assert!(
        tree.lines().any(|l| l.starts_with("chiffon-agent-kit ")),
        "{tree}"
    );
}
