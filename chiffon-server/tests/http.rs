//! The HTTP API through `router()` with `tower::ServiceExt::oneshot`: a real engine on a
//! temporary SQLite store, the in-process bus, the in-process infrastructure agent (answering
//! `noop` without Ansible) and a planner double.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use chiffon_core::model::RequestStatus;
use chiffon_server::config::{Role, TokenConfig};
use chiffon_server::testing::start_app;
use chiffon_server::App;
use futures::StreamExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use uuid::Uuid;

const VIEWER: &str = "viewer-token-0123456789";
const REQUESTER: &str = "requester-token-0123456789";
const OTHER_REQUESTER: &str = "other-requester-token-0123";
const APPROVER: &str = "approver-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

fn tokens() -> Vec<TokenConfig> {
    let t = |name: &str, token: &str, role| TokenConfig {
        name: Some(name.into()),
        token: token.into(),
        role,
    };
    vec![
        t("vera", VIEWER, Role::Viewer),
        t("rick", REQUESTER, Role::Requester),
        t("olga", OTHER_REQUESTER, Role::Requester),
        t("anna", APPROVER, Role::Approver),
        t("root", ADMIN, Role::Admin),
    ]
}

struct T {
    app: App,
    router: Router,
    _dir: tempfile::TempDir,
}

async fn setup(with_tokens: bool) -> T {
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(dir.path(), if with_tokens { tokens() } else { vec![] }).await;
    let router = app.router();
    T {
        app,
        router,
        _dir: dir,
    }
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
    text: String,
}

impl T {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Body>,
        json: bool,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if json {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        let req = b.body(body.unwrap_or_else(Body::empty)).unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Resp {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    async fn get(&self, uri: &str, token: Option<&str>) -> Resp {
        self.call("GET", uri, token, None, false).await
    }

    async fn post(&self, uri: &str, token: Option<&str>, body: Value) -> Resp {
        self.call("POST", uri, token, Some(Body::from(body.to_string())), true)
            .await
    }

    async fn submit(&self, token: Option<&str>, text: &str) -> Uuid {
        let r = self.post("/request", token, json!({ "text": text })).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        r.body["request_id"].as_str().unwrap().parse().unwrap()
    }

    async fn wait(&self, id: Uuid, status: RequestStatus) {
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            self.app.engine().wait_until(id, &[status]),
        )
        .await
        .expect("request reached the status in time")
        .unwrap();
        assert_eq!(r.status, status, "{r:?}");
    }
}

fn assert_error(r: &Resp, status: StatusCode, code: u64) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["error"]["code"], json!(code), "{}", r.text);
    assert!(r.body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(r.body["error"]["details"].is_object());
    let trace = r.body["error"]["trace_id"].as_str().unwrap();
    assert!(!trace.is_empty());
    assert_eq!(r.headers["x-trace-id"].to_str().unwrap(), trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_submit_approve_complete_with_logs_and_commit() {
    let t = setup(false).await;
    let r = t
        .call(
            "POST",
            "/request",
            None,
            Some(Body::from(
                json!({"text": "do it steps=2", "requester": "bob"}).to_string(),
            )),
            true,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.body["status"], "planning");
    assert_eq!(r.body["requester"], "bob");
    let id: Uuid = r.body["request_id"].as_str().unwrap().parse().unwrap();

    t.wait(id, RequestStatus::AwaitingApproval).await;
    let r = t.get(&format!("/request/{id}"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["status"], "awaiting_approval");
    assert_eq!(r.body["plan"]["provider"], "mock");
    assert_eq!(r.body["plan"]["steps"].as_array().unwrap().len(), 2);
    assert_eq!(r.body["steps"].as_array().unwrap().len(), 2);

    let r = t
        .post(
            "/approve",
            None,
            json!({"request_id": id, "approved": true, "comment": "fine"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["approver"], "local");
    t.wait(id, RequestStatus::Completed).await;

    let r = t.get(&format!("/request/{id}"), None).await;
    assert_eq!(r.body["status"], "completed");
    for s in r.body["steps"].as_array().unwrap() {
        assert_eq!(s["status"], "completed", "{s}");
    }
    // The audit commit follows the terminal status.
    let mut commit = Value::Null;
    for _ in 0..100 {
        commit = t.get(&format!("/request/{id}"), None).await.body["commit_id"].clone();
        if commit.is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(commit.as_str().is_some_and(|c| c.len() >= 7), "{commit}");

    let r = t.get(&format!("/request/{id}/logs"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["request_id"], json!(id));
    assert!(
        !r.body["lines"].as_array().unwrap().is_empty(),
        "{}",
        r.text
    );

    let r = t.get("/requests?status=completed", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let listed = r.body["requests"].as_array().unwrap();
    assert!(listed.iter().any(|x| x["id"] == json!(id)));
    assert!(listed.iter().all(|x| x["status"] == "completed"));

    let r = t.get("/metrics", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(
        r.text.contains("chiffon_requests{status=\"completed\"} 1"),
        "{}",
        r.text
    );
    assert!(
        r.text
            .contains("chiffon_dispatch_to_result_seconds_count 2"),
        "{}",
        r.text
    );
    assert!(
        r.text
            .contains("chiffon_queue_depth{queue=\"orchestrator.requests\"}"),
        "{}",
        r.text
    );
    assert!(r.text.contains("# TYPE chiffon_llm_spend_usd gauge"));

    // Heartbeats carry sampled host metrics, so the first may trail the first result.
    let mut r = t.get("/agents", None).await;
    for _ in 0..100 {
        if r.body["agents"].as_array().is_some_and(|a| a.len() >= 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        r = t.get("/agents", None).await;
    }
    assert_eq!(r.status, StatusCode::OK);
    let agents = r.body["agents"].as_array().unwrap();
    assert!(
        agents.iter().any(|a| a["agent_type"] == "infrastructure"),
        "{}",
        r.text
    );
    assert!(
        agents.iter().any(|a| a["agent_type"] == "desktop"),
        "{}",
        r.text
    );

    let r = t.get("/costs", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body["providers"].is_array());
    assert!(r.body["month"].as_str().unwrap().len() == 7);

    let r = t.get("/health", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["status"], "ok");
    assert_eq!(r.body["store_backend"], "sqlite");
    assert_eq!(r.body["bus_backend"], "memory");
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_id_flows_from_the_header_into_the_request() {
    let t = setup(false).await;
    let req = Request::builder()
        .method("POST")
        .uri("/request")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-trace-id", "trace-abc-123")
        .body(Body::from(json!({"text": "x"}).to_string()))
        .unwrap();
    let resp = t.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(resp.headers()["x-trace-id"], "trace-abc-123");
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["trace_id"], "trace-abc-123");
    let id: Uuid = body["request_id"].as_str().unwrap().parse().unwrap();
    let stored = t.app.engine().get(id).await.unwrap();
    assert_eq!(stored.request.trace_id, "trace-abc-123");
    // Generated when absent.
    let r = t.get("/health", None).await;
    assert_eq!(r.headers["x-trace-id"].to_str().unwrap().len(), 32);
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_never_500() {
    let t = setup(false).await;
    let r = t
        .call(
            "POST",
            "/request",
            None,
            Some(Body::from("{not json")),
            true,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, 5501);
    let r = t.post("/request", None, json!({"text": 42})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, 5501);
    let r = t.post("/request", None, json!({"words": "x"})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, 5501);
    let r = t
        .call(
            "POST",
            "/request",
            None,
            Some(Body::from(json!({"text": "x"}).to_string())),
            false,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, 5501);
    let r = t.post("/request", None, json!({"text": "   "})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, 5501);
    let big = json!({ "text": "a".repeat(100 * 1024) });
    let r = t.post("/request", None, big).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, 5502);

    let unknown = Uuid::new_v4();
    assert_error(
        &t.get(&format!("/request/{unknown}"), None).await,
        StatusCode::NOT_FOUND,
        5102,
    );
    assert_error(
        &t.get(&format!("/request/{unknown}/logs"), None).await,
        StatusCode::NOT_FOUND,
        5102,
    );
    assert_error(
        &t.get(&format!("/request/{unknown}/events"), None).await,
        StatusCode::NOT_FOUND,
        5102,
    );
    assert_error(
        &t.post(&format!("/cancel/{unknown}"), None, json!({})).await,
        StatusCode::NOT_FOUND,
        5102,
    );
    let r = t
        .post(
            "/approve",
            None,
            json!({"request_id": unknown, "approved": true}),
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, 5102);
    assert_error(
        &t.get("/request/not-a-uuid", None).await,
        StatusCode::BAD_REQUEST,
        5501,
    );
    assert_error(
        &t.get("/requests?status=bogus", None).await,
        StatusCode::BAD_REQUEST,
        5501,
    );
    assert_error(
        &t.get("/requests?limit=-3", None).await,
        StatusCode::BAD_REQUEST,
        5501,
    );
    assert_error(
        &t.get("/no/such/route", None).await,
        StatusCode::NOT_FOUND,
        5505,
    );
    assert_error(
        &t.call("DELETE", "/health", None, None, false).await,
        StatusCode::NOT_FOUND,
        5505,
    );

    // Approving twice: the second is an illegal transition.
    let id = t.submit(None, "x").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let r = t
        .post(
            "/approve",
            None,
            json!({"request_id": id, "approved": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = t
        .post(
            "/approve",
            None,
            json!({"request_id": id, "approved": false}),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, 5301);
    assert_eq!(r.body["error"]["details"]["request_id"], json!(id));
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_cancel_and_failed_planning() {
    let t = setup(false).await;
    let id = t.submit(None, "x").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let r = t
        .post(
            "/approve",
            None,
            json!({"request_id": id, "approved": false, "comment": "no"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["status"], "rejected");
    assert_eq!(r.body["approval_comment"], "no");

    let id = t.submit(None, "x").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let r = t.post(&format!("/cancel/{id}"), None, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["status"], "cancelled");
    let r = t.post(&format!("/cancel/{id}"), None, json!({})).await;
    assert_error(&r, StatusCode::CONFLICT, 5301);

    let id = t.submit(None, "unplannable").await;
    t.wait(id, RequestStatus::Failed).await;
    let r = t.get(&format!("/request/{id}"), None).await;
    assert_eq!(r.body["error"]["code"], 5207);
    assert_eq!(r.body["error"]["name"], "no_plan");
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles() {
    let t = setup(true).await;
    // /health is open; everything else needs a token.
    assert_eq!(t.get("/health", None).await.status, StatusCode::OK);
    assert_error(
        &t.get("/requests", None).await,
        StatusCode::UNAUTHORIZED,
        5503,
    );
    assert_error(
        &t.get("/openapi.json", None).await,
        StatusCode::UNAUTHORIZED,
        5503,
    );
    assert_error(
        &t.get("/requests", Some("wrong-token-0123456789")).await,
        StatusCode::UNAUTHORIZED,
        5503,
    );
    let r = t.call("GET", "/requests", None, None, false).await;
    assert!(!r.text.contains(VIEWER));
    assert_eq!(
        t.get("/requests", Some(VIEWER)).await.status,
        StatusCode::OK
    );

    // A viewer cannot submit; a requester can, and is recorded as the requester whatever the
    // body says.
    let r = t.post("/request", Some(VIEWER), json!({"text": "x"})).await;
    assert_error(&r, StatusCode::FORBIDDEN, 5504);
    let r = t
        .post(
            "/request",
            Some(REQUESTER),
            json!({"text": "x", "requester": "someone-else"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.body["requester"], "rick");
    let id: Uuid = r.body["request_id"].as_str().unwrap().parse().unwrap();
    t.wait(id, RequestStatus::AwaitingApproval).await;

    // Viewer and requester may not approve; the approver may.
    let body = json!({"request_id": id, "approved": true});
    assert_error(
        &t.post("/approve", Some(VIEWER), body.clone()).await,
        StatusCode::FORBIDDEN,
        5504,
    );
    assert_error(
        &t.post("/approve", Some(REQUESTER), body.clone()).await,
        StatusCode::FORBIDDEN,
        5504,
    );
    let r = t.post("/approve", Some(APPROVER), body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["approver"], "anna");

    // Cancel own only (admin: any).
    let id = t.submit(Some(REQUESTER), "x").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let r = t
        .post(&format!("/cancel/{id}"), Some(OTHER_REQUESTER), json!({}))
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, 5504);
    let r = t
        .post(&format!("/cancel/{id}"), Some(REQUESTER), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id = t.submit(Some(REQUESTER), "x").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let r = t
        .post(&format!("/cancel/{id}"), Some(ADMIN), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_status_steps_and_progress_then_ends() {
    let t = setup(false).await;
    let id = t.submit(None, "two slow steps steps=2 sleep=150").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let req = Request::builder()
        .uri(format!("/request/{id}/events"))
        .body(Body::empty())
        .unwrap();
    let resp = t.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = resp.into_body().into_data_stream();

    let engine = t.app.engine().clone();
    let approver = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        engine.approve(id, "anna", None).await.unwrap();
    });

    let mut text = String::new();
    let read = async {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the stream ends after the terminal status");
    approver.await.unwrap();

    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_string());
                }
                if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str::<Value>(v).ok();
                }
            }
            Some((name?, data?))
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(events[0].0, "status", "{text}");
    assert_eq!(events[0].1["status"], "awaiting_approval");
    assert!(names.contains(&"step"), "{names:?}");
    assert!(names.contains(&"progress"), "{names:?}");
    assert!(events
        .iter()
        .any(|(n, d)| n == "step" && d["status"] == "completed" && d["seq"] == 1));
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "status");
    assert_eq!(data["status"], "completed");
    assert!(events
        .iter()
        .any(|(n, d)| n == "status" && d["status"] == "running"));

    // A stream opened after the end gives the final status and ends at once.
    let r = t.get(&format!("/request/{id}/events"), None).await;
    assert!(r.text.contains("\"status\":\"completed\""), "{}", r.text);
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_every_route() {
    let t = setup(false).await;
    let r = t.get("/openapi.json", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let paths = r.body["paths"].as_object().unwrap();
    for (path, method) in [
        ("/request", "post"),
        ("/request/{id}", "get"),
        ("/approve", "post"),
        ("/cancel/{id}", "post"),
        ("/health", "get"),
        ("/requests", "get"),
        ("/request/{id}/events", "get"),
        ("/request/{id}/logs", "get"),
        ("/agents", "get"),
        ("/costs", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    let schemas = r.body["components"]["schemas"].as_object().unwrap();
    for s in [
        "SubmitBody",
        "RequestDto",
        "ErrorResponse",
        "EventDto",
        "HealthDto",
    ] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
    assert!(r.body["components"]["securitySchemes"]["bearer"].is_object());
    // The document served is the one the library generates.
    assert_eq!(
        r.body,
        serde_json::to_value(chiffon_server::openapi()).unwrap()
    );
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_event_streams_end_on_shutdown() {
    let t = setup(false).await;
    let id = t.submit(None, "x").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let resp = t
        .router
        .clone()
        .oneshot(
            Request::builder()
                .uri(format!("/request/{id}/events"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut stream = resp.into_body().into_data_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("awaiting_approval"));
    let reader = tokio::spawn(async move { while stream.next().await.is_some() {} });
    // The request is still awaiting approval: only the shutdown can end this stream.
    tokio::time::timeout(Duration::from_secs(30), t.app.shutdown())
        .await
        .expect("shutdown does not wait for open streams");
    tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the stream ended")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_only_loopback_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = chiffon_server::testing::temp_config(dir.path(), vec![]);
    config.bind = "0.0.0.0:0".into();
    let app = chiffon_server::testing::start_app_with(config).await;
    let err = app.bind().await.unwrap_err();
    assert_eq!(err.code().code(), 5601, "{err}");
    assert!(err.to_string().contains("without API tokens"), "{err}");
    app.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = chiffon_server::testing::temp_config(dir.path(), tokens());
    config.bind = "0.0.0.0:0".into();
    let app = chiffon_server::testing::start_app_with(config).await;
    let listener = app
        .bind()
        .await
        .expect("with tokens any address may be bound");
    assert!(app.serve(listener).is_ok());
    app.shutdown().await;
}
