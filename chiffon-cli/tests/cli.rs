//! The `chiffon` binary against a server started in this process on 127.0.0.1:0 (SQLite store
//! in a temporary folder, in-process bus and agents, a planner double), and the local
//! commands (`run`, `audit`, `migrate`) on their own temporary folders.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chiffon_core::model::RequestStatus;
use chiffon_server::testing::{fixture_catalog, start_app};
use chiffon_server::App;
use serde_json::Value;
use uuid::Uuid;

struct Server {
    app: App,
    url: String,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(dir.path(), vec![]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.serve(listener).unwrap();
    Server {
        app,
        url: format!("http://{addr}"),
        _dir: dir,
    }
}

/// Runs the binary off the async runtime (it blocks until the command exits).
async fn chiffon(args: Vec<String>, dir: Option<&Path>) -> Output {
    chiffon_env(args, dir, &[]).await
}

/// [`chiffon`] with extra environment variables.
async fn chiffon_env(args: Vec<String>, dir: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let dir = dir.map(Path::to_path_buf);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chiffon"));
        cmd.args(&args)
            .env_remove("CHIFFON_URL")
            .env_remove("CHIFFON_TOKEN")
            .env_remove("CHIFFON_CONFIG")
            .env_remove("CHIFFON_AMQP_URL")
            .env_remove("CHIFFON_DATABASE_URL")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("OLLAMA_HOST")
            .env_remove("CHIFFON_AUDIT_KEY")
            .envs(env)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null());
        if let Some(d) = dir {
            cmd.current_dir(d);
        }
        cmd.output().unwrap()
    })
    .await
    .unwrap()
}

fn args(server: &str, rest: &[&str]) -> Vec<String> {
    let mut v = vec!["--server".to_string(), server.to_string()];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stdout(o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_status_list_approve_logs_with_json() {
    let s = server().await;
    let o = chiffon(args(&s.url, &["--json", "request", "deploy steps=2"]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let accepted = json(&o);
    assert_eq!(accepted["status"], "planning");
    let id: Uuid = accepted["request_id"].as_str().unwrap().parse().unwrap();
    s.app
        .engine()
        .wait_until(id, &[RequestStatus::AwaitingApproval])
        .await
        .unwrap();

    let o = chiffon(args(&s.url, &["--json", "status", &id.to_string()]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["id"], id.to_string());
    assert_eq!(v["status"], "awaiting_approval");
    assert_eq!(v["plan"]["steps"].as_array().unwrap().len(), 2);

    let o = chiffon(args(&s.url, &["status", &id.to_string()]), None).await;
    assert!(o.status.success());
    let human = stdout(&o);
    assert!(
        human.contains("awaiting_approval") && human.contains("plan: 2 noop step(s)"),
        "{human}"
    );
    assert!(human.contains("estimated cost $"), "{human}");

    let o = chiffon(
        args(&s.url, &["--json", "list", "--status", "awaiting_approval"]),
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&o);
    assert!(v["requests"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == id.to_string()));

    let o = chiffon(
        args(
            &s.url,
            &["approve", &id.to_string(), "--comment", "ship it"],
        ),
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("plan: 2 noop step(s)"),
        "approve shows the plan: {out}"
    );
    assert!(out.contains(&format!("approved {id}")), "{out}");

    // `watch` piped: plain lines, exit 0 on completion, the outcome last.
    let o = chiffon(args(&s.url, &["watch", &id.to_string()]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.lines().any(|l| l.starts_with("status: ")), "{out}");
    assert!(
        out.trim_end().lines().last().unwrap().contains("completed"),
        "{out}"
    );

    let o = chiffon(args(&s.url, &["--json", "logs", &id.to_string()]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!json(&o)["lines"].as_array().unwrap().is_empty());

    for cmd in ["agents", "costs"] {
        let o = chiffon(args(&s.url, &["--json", cmd]), None).await;
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
        assert!(json(&o).is_object());
    }
    s.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_wait_follows_to_the_end_and_reject_cancel_work() {
    let s = server().await;
    // An approver acts while `request --wait` follows.
    let engine = s.app.engine().clone();
    let approver = tokio::spawn(async move {
        for _ in 0..200 {
            let list = engine
                .list(&chiffon_core::model::RequestFilter {
                    status: Some(RequestStatus::AwaitingApproval),
                    ..Default::default()
                })
                .await
                .unwrap();
            if let Some(r) = list.first() {
                engine.approve(r.id, "anna", None).await.unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nothing to approve");
    });
    let o = chiffon(
        args(&s.url, &["--json", "request", "--wait", "x sleep=100"]),
        None,
    )
    .await;
    approver.await.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["status"], "completed");

    let id = s
        .app
        .engine()
        .submit(chiffon_core::engine::SubmitRequest {
            text: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    s.app
        .engine()
        .wait_until(id, &[RequestStatus::AwaitingApproval])
        .await
        .unwrap();
    let o = chiffon(args(&s.url, &["--json", "reject", &id.to_string()]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["status"], "rejected");
    // Rejecting again: one error line, non-zero exit, the code in it.
    let o = chiffon(args(&s.url, &["reject", &id.to_string()]), None).await;
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("5301"), "{err}");
    assert!(stdout(&o).contains("rejected"), "the plan was shown first");

    let id = s
        .app
        .engine()
        .submit(chiffon_core::engine::SubmitRequest {
            text: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let o = chiffon(args(&s.url, &["--json", "cancel", &id.to_string()]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["status"], "cancelled");

    let o = chiffon(args(&s.url, &["status", &Uuid::new_v4().to_string()]), None).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("5102"), "{}", stderr(&o));
    s.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_is_one_line_naming_the_url() {
    // A port that was free a moment ago.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let o = chiffon(args(&url, &["list"]), None).await;
    assert!(!o.status.success());
    assert!(o.stdout.is_empty());
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(&url), "{err}");
    assert!(err.starts_with("chiffon: "), "{err}");
}

fn local_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Writes `chiffon.toml` in `dir` (the fixture catalog, an audit repository and a SQLite
/// database in `dir`, the offline planner only) and returns its path.
fn offline_config(dir: &Path) -> String {
    std::fs::write(
        dir.join("chiffon.toml"),
        format!(
            "playbooks = {:?}\naudit_repo = {:?}\ndatabase_url = {:?}\n[llm]\norder = [\"offline\"]\n",
            fixture_catalog().display().to_string(),
            dir.join("audit").display().to_string(),
            format!("sqlite://{}", dir.join("chiffon.db").display()),
        ),
    )
    .unwrap();
    dir.join("chiffon.toml").display().to_string()
}

fn local_args(dir: &Path, rest: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
    let db = format!("sqlite://{}", dir.join("chiffon.db").display());
    // Flags of the subcommand.
    if matches!(rest.first().copied(), Some("run") | Some("migrate")) {
        v.push("--database-url".into());
        v.push(db);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_yes_executes_with_the_offline_planner_and_audit_verifies() {
    let dir = local_dir();
    let config = offline_config(dir.path());

    // Not on a terminal and no --yes: refused before anything happens.
    let o = chiffon(
        vec![
            "--config".into(),
            config.clone(),
            "run".into(),
            "noop ping".into(),
        ],
        Some(dir.path()),
    )
    .await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));

    let o = chiffon(
        vec![
            "--config".into(),
            config.clone(),
            "run".into(),
            "noop ping".into(),
            "--yes".into(),
        ],
        Some(dir.path()),
    )
    .await;
    assert!(
        o.status.success(),
        "stdout {} stderr {}",
        stdout(&o),
        stderr(&o)
    );
    let out = stdout(&o);
    assert!(out.contains("completed"), "{out}");
    assert!(out.contains("audit commit"), "{out}");
    assert!(
        stderr(&o).contains("plan:"),
        "the plan is shown: {}",
        stderr(&o)
    );

    // A dry run needs no approval, so no --yes either.
    let o = chiffon(
        vec![
            "--config".into(),
            config.clone(),
            "--json".into(),
            "run".into(),
            "noop ping".into(),
            "--dry-run".into(),
        ],
        Some(dir.path()),
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["status"], "completed");
    assert_eq!(v["approver"], "policy:dry_run");

    let o = chiffon(
        vec![
            "--config".into(),
            config.clone(),
            "--json".into(),
            "audit".into(),
            "verify".into(),
        ],
        Some(dir.path()),
    )
    .await;
    assert!(o.status.success(), "{} {}", stdout(&o), stderr(&o));
    let v = json(&o);
    assert_eq!(v["ok"], true);
    assert!(v["chain"]["entries_checked"].as_u64().unwrap() > 3);

    let o = chiffon(
        vec![
            "--config".into(),
            config.clone(),
            "--json".into(),
            "audit".into(),
        ],
        Some(dir.path()),
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let entries = json(&o);
    let events: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for e in ["received", "planned", "approved", "completed", "committed"] {
        assert!(events.contains(&e), "{e} missing from {events:?}");
    }
}

/// `CHIFFON_AUDIT_KEY` keys the chain of what `chiffon run` records: `audit verify` passes
/// with the key and fails with another key or none, and the key never shows in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_key_keys_the_chain_and_verify_needs_it() {
    let dir = local_dir();
    let config = offline_config(dir.path());
    let key = "audit-key-kept-elsewhere-0123";
    let o = chiffon_env(
        vec![
            "--config".into(),
            config.clone(),
            "run".into(),
            "noop ping".into(),
            "--yes".into(),
        ],
        Some(dir.path()),
        &[("CHIFFON_AUDIT_KEY", key)],
    )
    .await;
    assert!(o.status.success(), "{} {}", stdout(&o), stderr(&o));
    let verify = |env: &'static [(&'static str, &'static str)]| {
        let config = config.clone();
        let dir = dir.path().to_path_buf();
        async move {
            chiffon_env(
                vec![
                    "--config".into(),
                    config,
                    "--json".into(),
                    "audit".into(),
                    "verify".into(),
                ],
                Some(&dir),
                env,
            )
            .await
        }
    };
    let o = verify(&[("CHIFFON_AUDIT_KEY", "audit-key-kept-elsewhere-0123")]).await;
    assert!(o.status.success(), "{} {}", stdout(&o), stderr(&o));
    assert_eq!(json(&o)["ok"], true);
    for env in [&[][..], &[("CHIFFON_AUDIT_KEY", "some-other-key")][..]] {
        let o = verify(env).await;
        assert!(!o.status.success(), "{}", stdout(&o));
        let v = json(&o);
        assert_eq!(v["ok"], false);
        assert_eq!(v["chain"]["first_bad_seq"], 1, "{v}");
        assert!(!stdout(&o).contains(key) && !stderr(&o).contains(key));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_database() {
    let dir = local_dir();
    let o = chiffon(local_args(dir.path(), &["migrate"]), Some(dir.path())).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("migrations applied"), "{}", stdout(&o));
    assert!(dir.path().join("chiffon.db").exists());
    let o = chiffon(
        {
            let mut a = vec!["--json".to_string()];
            a.extend(local_args(dir.path(), &["migrate"]));
            a
        },
        Some(dir.path()),
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["backend"], "sqlite");

    let o = chiffon(
        vec![
            "migrate".into(),
            "--database-url".into(),
            "mysql://nope".into(),
        ],
        Some(dir.path()),
    )
    .await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("mysql"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_api_and_stops_on_sigterm() {
    use std::io::BufRead;
    let dir = local_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chiffon"))
        .args(["--json", "up", "--bind", "127.0.0.1:0", "--playbooks"])
        .arg(fixture_catalog())
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.path().join("up.db").display()))
        .env_remove("CHIFFON_AMQP_URL")
        .env_remove("CHIFFON_CONFIG")
        .env("RUST_LOG", "error")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child_stderr = child.stderr.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(v["bus"], "memory");
    assert_eq!(v["store"], "sqlite");
    assert_eq!(v["agents"].as_array().unwrap().len(), 2);
    let url = v["url"].as_str().unwrap().to_string();

    let o = chiffon(args(&url, &["--json", "request", "x"]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let health: Value = reqwest::get(format!("{url}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");

    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "graceful exit after SIGTERM: {status:?}");
    assert!(dir.path().join("up.db").exists());
    assert!(dir.path().join(".chiffon/audit").exists());
    // Not on a terminal: the log went to a file, and stderr said where.
    assert!(dir.path().join(".chiffon/up.log").is_file());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child_stderr, &mut err).unwrap();
    assert!(err.contains("the log goes to .chiffon/up.log"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sent_and_refusals_are_one_line() {
    use chiffon_server::config::{Role, TokenConfig};
    let dir = tempfile::tempdir().unwrap();
    let tokens = vec![TokenConfig {
        name: Some("vera".into()),
        token: "viewer-token-0123456789".into(),
        role: Role::Viewer,
    }];
    let app = start_app(dir.path(), tokens).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", app.serve(listener).unwrap());

    let o = chiffon(args(&url, &["list"]), None).await;
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("5503"), "{err}");

    let o = chiffon(
        args(
            &url,
            &["--token", "viewer-token-0123456789", "--json", "list"],
        ),
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(json(&o)["requests"].is_array());

    let o = chiffon(
        args(
            &url,
            &["--token", "viewer-token-0123456789", "request", "x"],
        ),
        None,
    )
    .await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("5504"), "{}", stderr(&o));
    app.shutdown().await;
}

/// `ansible-playbook`: `CHIFFON_ANSIBLE_PLAYBOOK`, the repository's `.venv` (made by
/// `scripts/ansible.sh`), or `PATH`.
fn ansible_playbook() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("CHIFFON_ANSIBLE_PLAYBOOK") {
        return Some(p.into());
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/ansible-playbook");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("ansible-playbook"))
            .find(|p| p.is_file())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_yes_executes_a_real_playbook_on_localhost() {
    let Some(ansible) = ansible_playbook() else {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("ansible-playbook not found under CI=true: run scripts/ansible.sh");
        }
        eprintln!("SKIPPED: ansible-playbook not found (run scripts/ansible.sh)");
        return;
    };
    let dir = local_dir();
    let playbooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../playbooks");
    let target = dir.path().join("made-by-chiffon");
    let o = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        let target = target.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_chiffon"))
                .arg("run")
                .arg(format!("create directory {}", target.display()))
                .arg("--yes")
                .arg("--playbooks")
                .arg(&playbooks)
                .arg("--database-url")
                .arg(format!("sqlite://{}", dir.join("chiffon.db").display()))
                .env("CHIFFON_ANSIBLE_PLAYBOOK", &ansible)
                .env("CHIFFON_LLM_ORDER", "offline")
                .env_remove("CHIFFON_AMQP_URL")
                .env_remove("CHIFFON_CONFIG")
                .env("RUST_LOG", "error")
                .current_dir(&dir)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        o.status.success(),
        "stdout {} stderr {}",
        stdout(&o),
        stderr(&o)
    );
    assert!(target.is_dir(), "the playbook created {}", target.display());
    let out = stdout(&o);
    assert!(
        out.contains("completed") && out.contains("audit commit"),
        "{out}"
    );
    assert!(
        stderr(&o).contains("ensure_directory"),
        "the plan was shown: {}",
        stderr(&o)
    );
}

/// Submits `text` under `id` and waits until it is planned.
async fn submit_as(s: &Server, id: Uuid, text: &str) {
    s.app
        .engine()
        .submit(chiffon_core::engine::SubmitRequest {
            text: text.into(),
            request_id: Some(id),
            ..Default::default()
        })
        .await
        .unwrap();
    s.app
        .engine()
        .wait_until(id, &[RequestStatus::AwaitingApproval])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_by_unique_prefix_or_last_and_one_name_for_the_id() {
    let s = server().await;
    // Two ids that share their first 8 characters, a third that shares nothing with them.
    let mut bytes = *Uuid::new_v4().as_bytes();
    bytes[15] = 0;
    let a = Uuid::from_bytes(bytes);
    bytes[15] = 1;
    let b = Uuid::from_bytes(bytes);
    bytes[0] ^= 0xff;
    let c = Uuid::from_bytes(bytes);
    for id in [a, b, c] {
        submit_as(&s, id, "x").await;
    }
    let (a_text, c_text) = (a.to_string(), c.to_string());

    let o = chiffon(args(&s.url, &["--json", "status", &c_text[..6]]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["request_id"], c_text, "{v}");
    assert_eq!(v["id"], c_text, "`id` stays as an alias");

    // Shared by two: ambiguous, naming both; one line, non-zero.
    let o = chiffon(args(&s.url, &["status", &a_text[..8]]), None).await;
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("{} is ambiguous", &a_text[..8])),
        "{err}"
    );
    assert!(
        err.contains(&a_text) && err.contains(&b.to_string()),
        "{err}"
    );

    let unknown = format!("{:02x}{}", bytes[0] ^ 0x0f, &c_text[2..8]);
    let o = chiffon(args(&s.url, &["status", &unknown]), None).await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("no request starts with {unknown}")),
        "{}",
        stderr(&o)
    );
    let o = chiffon(args(&s.url, &["status", "abcde"]), None).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("6 to 36"), "{}", stderr(&o));

    // --last: the newest, for every command that takes an id.
    let o = chiffon(args(&s.url, &["--json", "logs", "--last"]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["request_id"], c_text);
    let o = chiffon(args(&s.url, &["--json", "reject", &a_text]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["request_id"], a_text);
    assert_eq!(json(&o)["status"], "rejected");
    let o = chiffon(args(&s.url, &["--json", "cancel", "--last"]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["request_id"], c_text);
    let o = chiffon(args(&s.url, &["watch", &c_text[..6]]), None).await;
    assert_eq!(o.status.code(), Some(1), "cancelled: {}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("{c_text} cancelled")),
        "{}",
        stdout(&o)
    );

    // Every answer names the id `request_id`.
    let o = chiffon(args(&s.url, &["--json", "list"]), None).await;
    for r in json(&o)["requests"].as_array().unwrap() {
        assert_eq!(r["request_id"], r["id"]);
    }
    let o = chiffon(args(&s.url, &["--json", "request", "x"]), None).await;
    assert!(json(&o)["request_id"].is_string());
    s.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_marks_cut_text_and_agents_say_how_fresh() {
    let s = server().await;
    let long = format!("noop {}", "very long words ".repeat(10));
    submit_as(&s, Uuid::new_v4(), &long).await;
    let o = chiffon(args(&s.url, &["list"]), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    assert!(line.trim_end().ends_with('…'), "{line}");
    assert!(line.contains("noop very long words"), "{line}");

    let mut out = String::new();
    for _ in 0..100 {
        let o = chiffon(args(&s.url, &["agents"]), None).await;
        assert!(o.status.success(), "{}", stderr(&o));
        out = stdout(&o);
        if out.lines().count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        out.lines().all(|l| l.contains("fresh (heartbeat ")),
        "{out}"
    );
    let o = chiffon(args(&s.url, &["--json", "agents"]), None).await;
    for a in json(&o)["agents"].as_array().unwrap() {
        assert_eq!(a["liveness"], "fresh");
    }
    s.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_lists_the_catalog_with_parameters() {
    let playbooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../playbooks");
    let dir = local_dir();
    let o = chiffon(
        vec![
            "actions".into(),
            "--playbooks".into(),
            playbooks.display().to_string(),
        ],
        Some(dir.path()),
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("ensure_directory  (agent infrastructure"),
        "{out}"
    );
    assert!(
        out.contains("mode: string, optional, default \"0755\", pattern ^0[0-7]{3}$"),
        "{out}"
    );
    let o = chiffon(
        vec![
            "--json".into(),
            "actions".into(),
            "--playbooks".into(),
            playbooks.display().to_string(),
        ],
        Some(dir.path()),
    )
    .await;
    let v = json(&o);
    let ensure = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "ensure_directory")
        .unwrap()
        .clone();
    assert_eq!(ensure["parameters"]["mode"]["type"], "string");
    assert_eq!(ensure["parameters"]["mode"]["default"], "0755");

    // No catalog where it looks: the error says which flag to use, once.
    let o = chiffon(vec!["actions".into()], Some(dir.path())).await;
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--playbooks"), "{err}");
}

/// A reader that went away (`chiffon actions | head -1`): no "Broken pipe", status 141.
#[test]
fn a_closed_pipe_ends_quietly_with_141() {
    let playbooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../playbooks");
    for json in [false, true] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // closed before the first write
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chiffon"));
        if json {
            cmd.arg("--json");
        }
        let o = cmd
            .arg("actions")
            .arg("--playbooks")
            .arg(&playbooks)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(141), "{}", stderr(&o));
        assert!(o.stderr.is_empty(), "{}", stderr(&o));
    }
    // Through a shell, as people write it.
    let o = Command::new("bash")
        .arg("-c")
        .arg(r#"set -o pipefail; "$0" actions --playbooks "$1" | head -1; echo "status ${PIPESTATUS[0]}" >&2"#)
        .arg(env!("CARGO_BIN_EXE_chiffon"))
        .arg(&playbooks)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(
        !err.contains("Broken pipe") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(stdout(&o).lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_is_one_line_that_names_bind() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = local_dir();
    let o = chiffon(
        vec![
            "up".into(),
            "--bind".into(),
            addr.clone(),
            "--playbooks".into(),
            fixture_catalog().display().to_string(),
            "--database-url".into(),
            format!("sqlite://{}", dir.path().join("up.db").display()),
        ],
        Some(dir.path()),
    )
    .await;
    assert!(!o.status.success());
    let err = stderr(&o);
    let last = err.trim_end().lines().last().unwrap();
    assert!(last.contains(&addr) && last.contains("--bind"), "{err}");
    // Each cause once: the OS's words appear one time.
    assert_eq!(last.matches("in use").count(), 1, "{err}");
    drop(busy);
}
