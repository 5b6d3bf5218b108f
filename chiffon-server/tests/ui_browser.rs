//! The web console in a real browser: headless Chromium driven through WebDriver
//! (`chromedriver` on a free loopback port, spoken to with reqwest and JSON), against a real
//! server (SQLite, the in-process bus and agents, the real catalog, the offline planner and
//! the real `ansible-playbook`).
//!
//! It logs in with a token, reads a dry run's diff, reads a plan, sees a cross-site form post
//! refused, approves, and watches the page follow the request to `completed` by itself; a
//! viewer sees no approve button.
//!
//! Needs `chromium` and `chromedriver` (`scripts/chromium.sh` installs them) and
//! `ansible-playbook` (`CHIFFON_ANSIBLE_PLAYBOOK`, or `./.venv` from `scripts/ansible.sh`).
//! Without them the test is skipped, except under `CI=true`, where it fails.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chiffon_core::engine::SubmitRequest;
use chiffon_core::model::RequestStatus;
use chiffon_server::config::{Role, TokenConfig};
use chiffon_server::testing::temp_config;
use chiffon_server::{App, AppOptions};
use serde_json::{json, Value};
use uuid::Uuid;

const APPROVER: &str = "approver-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips (or, under CI, fails) when a prerequisite is missing.
fn missing(what: &str) {
    if in_ci() {
        panic!("{what} is missing (CI=true: a missing browser or tool fails the test; run scripts/chromium.sh and scripts/ansible.sh)");
    }
    eprintln!("skipped: {what} is missing (scripts/chromium.sh, scripts/ansible.sh install it)");
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn ansible() -> Option<PathBuf> {
    std::env::var_os("CHIFFON_ANSIBLE_PLAYBOOK")
        .map(PathBuf::from)
        .or_else(|| Some(repo().join(".venv/bin/ansible-playbook")))
        .filter(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A chromedriver process and one browser session.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The browser is chromedriver's child in chromedriver's own process group: the whole
        // group goes, so a browser whose session did not end cleanly is not left running.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .map(|r| r.json::<Value>());
            if let Some(body) = ready {
                if body.await.is_ok_and(|v| v["value"]["ready"] == true) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut b = Browser {
            http,
            base,
            session: String::new(),
            driver,
        };
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,1400"]
            }
        }}});
        let v = b.cmd(reqwest::Method::POST, "/session", caps).await;
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        b
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}/session", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let mut req = self.http.request(method.clone(), &url);
        if method != reqwest::Method::GET {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("webdriver");
        let v: Value = resp.json().await.expect("webdriver json");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        let v = self
            .cmd(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
        assert!(v.is_null(), "navigate {url}: {v}");
    }

    async fn url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", Value::Null)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn source(&self) -> String {
        self.cmd(reqwest::Method::GET, "/source", Value::Null)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The elements matching `css` (none is not an error).
    async fn all(&self, css: &str) -> Vec<String> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/elements",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        if std::env::var_os("UI_DEBUG").is_some() {
            eprintln!("elements {css}: {v}");
        }
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn find(&self, css: &str) -> String {
        self.all(css)
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no element {css}"))
    }

    async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::GET,
            &format!("/element/{id}/text"),
            Value::Null,
        )
        .await
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        let v = self
            .cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/click"),
                json!({}),
            )
            .await;
        assert!(v.is_null(), "click {css}: {v}");
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        let v = self
            .cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/value"),
                json!({ "text": text }),
            )
            .await;
        assert!(v.is_null(), "type into {css}: {v}");
    }

    /// Polls `css`'s text until `want` holds or `secs` pass; the page may reload meanwhile.
    async fn wait_text(&self, css: &str, secs: u64, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(id) = self.all(css).await.into_iter().next() {
                let v = self
                    .cmd(
                        reqwest::Method::GET,
                        &format!("/element/{id}/text"),
                        Value::Null,
                    )
                    .await;
                if let Some(t) = v.as_str() {
                    last = t.to_string();
                    if want(&last) {
                        return last;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{css} never matched; last text {last:?}");
    }

    async fn login(&self, server: &str, token: &str) {
        self.goto(&format!("{server}/ui/")).await;
        assert!(
            self.url().await.ends_with("/ui/login"),
            "sent to the login form"
        );
        self.type_into("#token", token).await;
        self.click("#login button").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.url().await.ends_with("/ui/") {
            if Instant::now() > deadline {
                panic!(
                    "login did not land on /ui/: {} {}",
                    self.url().await,
                    self.source().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn close(self) {
        self.cmd(reqwest::Method::DELETE, "", Value::Null).await;
    }
}

async fn submit(app: &App, text: &str, dry_run: bool, until: RequestStatus) -> Uuid {
    let r = app
        .engine()
        .submit(SubmitRequest {
            text: text.into(),
            requester: Some("rick".into()),
            submitted_by: Some("rick".into()),
            dry_run,
            trace_id: None,
            request_id: None,
        })
        .await
        .unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(60),
        app.engine().wait_until(r.id, &[until]),
    )
    .await
    .expect("the request settles")
    .unwrap();
    assert_eq!(done.status, until, "{done:?}");
    r.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_in_the_browser_and_watch_it_complete() {
    let (Some(chromium), Some(chromedriver)) = (
        which("chromium").or_else(|| which("chromium-browser")),
        which("chromedriver"),
    ) else {
        return missing("chromium or chromedriver");
    };
    let Some(ansible) = ansible() else {
        return missing("ansible-playbook");
    };

    let dir = tempfile::tempdir().unwrap();
    let t = |name: &str, token: &str, role| TokenConfig {
        name: Some(name.into()),
        token: token.into(),
        role,
    };
    let mut config = temp_config(
        dir.path(),
        vec![
            t("anna", APPROVER, Role::Approver),
            t("vera", VIEWER, Role::Viewer),
        ],
    );
    config.playbooks = repo().join("playbooks");
    config.agents.ansible_playbook = Some(ansible);
    let app = App::start_with(config, AppOptions::default())
        .await
        .expect("start the app");
    let listener = app.bind().await.unwrap();
    let addr = app.serve(listener).unwrap();
    let server = format!("http://127.0.0.1:{}", addr.port());

    let target = dir.path().join("etc/app.conf");
    let text = format!("Write the config file {}", target.display());
    // A dry run (check mode, no approval) and the real request awaiting approval.
    let dry = submit(&app, &text, true, RequestStatus::Completed).await;
    assert!(!target.exists(), "a dry run changes nothing");
    let real = submit(&app, &text, false, RequestStatus::AwaitingApproval).await;

    let b = Browser::start(&chromium, &chromedriver).await;
    b.login(&server, APPROVER).await;
    assert_eq!(b.text("#who").await, "anna");
    let list = b.source().await;
    assert!(list.contains(&real.to_string()) && list.contains(&dry.to_string()));

    // The dry run's diff.
    b.goto(&format!("{server}/ui/request/{dry}")).await;
    let diff = b.text(".step-diff").await;
    assert!(diff.contains("+++ after"), "{diff}");
    assert!(diff.contains("managed by chiffon"), "{diff}");

    // The plan awaiting approval.
    b.goto(&format!("{server}/ui/request/{real}")).await;
    assert_eq!(b.text("#status").await, "awaiting_approval");
    let plan = b.text("#plan").await;
    assert!(plan.contains("write_config"), "{plan}");
    assert!(plan.contains(&target.display().to_string()), "{plan}");
    // Its automatic dry run, made while it awaits approval: what approving would change.
    for _ in 0..120 {
        b.goto(&format!("{server}/ui/request/{real}")).await;
        if b.source().await.contains("dry run: would change") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let preview = b.text("#plan-step-1 .preview").await;
    assert!(preview.contains("dry run: would change"), "{preview}");
    assert!(preview.contains("managed by chiffon"), "{preview}");
    assert!(!target.exists(), "the preview changed nothing");
    assert!(b.text("#planner").await.starts_with("offline"));

    // A page on another site posting the approval form is refused (Origin: null here).
    let forged = format!(
        "data:text/html,<form method=post action='{server}/ui/request/{real}/decide'>\
         <input name=csrf value=x><input name=decision value=approve></form>\
         <script>document.forms[0].submit()</script>"
    );
    b.goto(&forged).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.source().await.contains("5508") {
        assert!(
            Instant::now() < deadline,
            "the cross-site post was not refused: {}",
            b.source().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let now = app.engine().get(real).await.unwrap().request;
    assert_eq!(
        now.status,
        RequestStatus::AwaitingApproval,
        "nothing was decided"
    );

    // Approve with a comment; the page follows the request to its end by itself.
    b.goto(&format!("{server}/ui/request/{real}")).await;
    b.type_into("#comment", "looks right").await;
    b.click("#approve").await;
    b.wait_text("#status", 90, |s| s == "completed").await;
    assert!(
        b.text("#commit").await.len() >= 7,
        "the audit commit is shown"
    );
    assert!(b.text("#approvals").await.contains("looks right"));
    assert!(target.exists(), "ansible wrote the file");
    let done = app.engine().get(real).await.unwrap().request;
    assert_eq!(done.approver.as_deref(), Some("anna"));

    // The other pages render.
    for (path, want) in [
        ("/ui/agents", "fresh"),
        ("/ui/costs", "LLM spend"),
        ("/ui/audit", "approved"),
    ] {
        b.goto(&format!("{server}{path}")).await;
        let body = b.text("main").await;
        assert!(body.contains(want), "{path}: {body}");
    }
    b.click("#verify").await;
    b.wait_text("#verify-result", 20, |s| s.starts_with("Verified"))
        .await;

    // A viewer sees the plan of a request awaiting approval but no buttons.
    let pending = submit(&app, &text, false, RequestStatus::AwaitingApproval).await;
    b.click("#logout").await;
    b.login(&server, VIEWER).await;
    b.goto(&format!("{server}/ui/request/{pending}")).await;
    assert_eq!(b.text("#status").await, "awaiting_approval");
    assert!(b.text("#plan").await.contains("write_config"));
    assert!(
        b.all("#approve").await.is_empty(),
        "no approve button for a viewer"
    );
    assert!(b.all("#reject").await.is_empty());

    b.close().await;
    app.shutdown().await;
}
