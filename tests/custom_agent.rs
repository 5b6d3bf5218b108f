//! The custom agent of `examples/custom-agent`, hosted in the server's process
//! (`AppOptions::with_agent`): a request in plain words, planned by the offline planner from
//! the example's catalog entry, approved over HTTP, dispatched to `agent.http_check` on the
//! in-process bus, and completed by the agent.

use std::path::PathBuf;
use std::time::Duration;

use chiffon_core::catalog::Catalog;
use chiffon_server::{App, AppOptions, Config};
use custom_agent::HealthCheckAgent;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_planned_as_http_check_runs_on_the_hosted_agent() {
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web_addr = web.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = web.accept().await {
            let _ = s.read(&mut [0; 1024]).await;
            let _ = s
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let catalog = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/custom-agent/catalog");
    let mut config = Config {
        database_url: format!("sqlite://{}", dir.path().join("chiffon.db").display()),
        bind: "127.0.0.1:0".into(),
        playbooks: catalog.clone(),
        audit_repo: dir.path().join("audit"),
        ..Config::default()
    };
    // Only the hosted agent: no Ansible here.
    config.agents.in_process = false;
    config.engine.dispatch.tick = Duration::from_millis(100);
    let options = AppOptions {
        catalog: Some(std::sync::Arc::new(Catalog::load(&catalog).unwrap())),
        ..Default::default()
    }
    .with_agent(HealthCheckAgent);
    let app = App::start_with(config, options).await.unwrap();
    assert!(
        app.in_process_agents()
            .iter()
            .any(|a| a.starts_with("http_check-")),
        "{:?}",
        app.in_process_agents()
    );
    let addr = app
        .serve(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        .unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let get = |id: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http
                .get(format!("{base}/request/{id}"))
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()
        }
    };

    let text = format!("Check that http://{web_addr}/health answers");
    let r = http
        .post(format!("{base}/request"))
        .json(&json!({ "text": text }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut body = Value::Null;
    for _ in 0..200 {
        body = get(id.clone()).await;
        if body["status"] != "planning" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body["status"], "awaiting_approval", "{body:#}");
    assert_eq!(body["plan"]["provider"], "offline");
    let step = &body["plan"]["steps"][0];
    assert_eq!(step["action"], "http_check", "{body:#}");
    assert_eq!(step["agent_type"], "http_check");
    assert_eq!(
        step["parameters"]["url"],
        format!("http://{web_addr}/health")
    );

    let r = http
        .post(format!("{base}/approve"))
        .json(&json!({ "request_id": id, "approved": true }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    for _ in 0..300 {
        body = get(id.clone()).await;
        if ["completed", "failed", "cancelled"].contains(&body["status"].as_str().unwrap()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(body["status"], "completed", "{body:#}");
    let output = body.to_string();
    assert!(output.contains("is healthy (204)"), "{body:#}");
    app.shutdown().await;
}
