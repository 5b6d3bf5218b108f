//! Webhooks end to end: a real app (SQLite, in-process bus and agents) POSTs signed events
//! to a local receiver; a receiver that fails twice gets the event on the third try; the
//! Slack format and event filters hold; the secret is never in what the server shows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use chiffon_core::engine::SubmitRequest;
use chiffon_core::model::RequestStatus;
use chiffon_server::testing::{start_app_with, temp_config};
use chiffon_server::webhooks::{signature, WebhookConfig, WebhookFormat};
use serde_json::Value;

/// (webhook name, headers, body) of each POST received.
type Received = Vec<(String, HeaderMap, Vec<u8>)>;

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Received>>,
    /// Answers 500 this many times first.
    fail_first: Arc<Mutex<u32>>,
}

async fn receive(
    State(r): State<Receiver>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if name == "flaky" {
        let mut left = r.fail_first.lock().unwrap();
        if *left > 0 {
            *left -= 1;
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
    }
    r.got.lock().unwrap().push((name, headers, body.to_vec()));
    StatusCode::NO_CONTENT
}

async fn receiver() -> (String, Receiver) {
    let r = Receiver {
        fail_first: Arc::new(Mutex::new(2)),
        ..Default::default()
    };
    let app = Router::new()
        .route("/hook/{name}", post(receive))
        .with_state(r.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_are_posted_signed_retried_and_filtered() {
    let (base, rx) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = temp_config(dir.path(), vec![]);
    config.server.public_url = Some("https://chiffon.example".into());
    let hook = |name: &str, events: Option<Vec<&str>>, format| WebhookConfig {
        url: format!("{base}/hook/{name}"),
        secret: format!("whsec-{name}-0123456789"),
        events: events.map(|e| e.into_iter().map(String::from).collect()),
        format,
    };
    config.webhooks = vec![
        hook("all", None, WebhookFormat::Json),
        hook(
            "flaky",
            Some(vec!["request.completed"]),
            WebhookFormat::Json,
        ),
        hook(
            "slack",
            Some(vec!["request.awaiting_approval"]),
            WebhookFormat::Slack,
        ),
    ];
    let app = start_app_with(config).await;
    let engine = app.engine();
    let r = engine
        .submit(SubmitRequest {
            text: "steps=1 <b>deploy</b>".into(),
            requester: Some("alice".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::AwaitingApproval]),
    )
    .await
    .unwrap()
    .unwrap();
    engine.approve(r.id, "bob", None).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::Completed]),
    )
    .await
    .unwrap()
    .unwrap();
    // all: awaiting_approval + completed; flaky: completed (third try); slack: awaiting.
    tokio::time::timeout(Duration::from_secs(20), async {
        while rx.got.lock().unwrap().len() < 4 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("four deliveries");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 4, "no extra deliveries");
    let events = |name: &str| -> Vec<Value> {
        got.iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, h, body)| {
                // Every body is signed with its webhook's secret.
                let sig = h["x-chiffon-signature"].to_str().unwrap();
                assert_eq!(
                    sig,
                    signature(format!("whsec-{name}-0123456789").as_bytes(), body)
                );
                assert_ne!(sig, signature(b"another-secret", body));
                serde_json::from_slice(body).unwrap()
            })
            .collect()
    };
    let all = events("all");
    let names: Vec<&str> = all.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(names, ["request.awaiting_approval", "request.completed"]);
    let done = &all[1];
    assert_eq!(done["request_id"], r.id.to_string());
    assert_eq!(done["status"], "completed");
    assert_eq!(done["requester"], "alice");
    assert_eq!(done["text"], "steps=1 <b>deploy</b>");
    assert_eq!(
        done["url"],
        format!("https://chiffon.example/ui/request/{}", r.id)
    );
    assert!(done["at"].as_str().unwrap().contains('T'));
    let flaky = events("flaky");
    assert_eq!(flaky.len(), 1);
    assert_eq!(flaky[0]["event"], "request.completed");
    let slack = events("slack");
    assert_eq!(slack.len(), 1);
    let text = slack[0]["text"].as_str().unwrap();
    assert!(text.contains("awaits your approval"), "{text}");
    assert!(
        text.contains("&lt;b&gt;deploy&lt;/b&gt;"),
        "Slack markup escaped: {text}"
    );
    assert_eq!(
        slack[0].as_object().unwrap().len(),
        1,
        "Slack gets only `text`"
    );
    let m = &*chiffon_server::webhooks::METRICS;
    assert!(m.retries.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert_eq!(m.failed.load(std::sync::atomic::Ordering::Relaxed), 0);
    app.shutdown().await;
}
