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
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "127.0.0.1:8080");
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if json {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        self.send(b.body(body.unwrap_or_else(Body::empty)).unwrap())
            .await
    }

    /// Sends `req` as built (no `Host` added).
    async fn send(&self, req: Request<Body>) -> Resp {
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
    // The audit commit is written just after the end, and a request that just ended is
    // answered with it: the first read that shows the end shows the commit.
    let commit = r.body["commit_id"].clone();
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
    // Every answer names the id `request_id` (`id` stays, as an alias).
    assert!(listed.iter().all(|x| x["request_id"] == x["id"]));
    let prefix = id.to_string()[..8].to_uppercase();
    let r = t
        .get(&format!("/requests?id_prefix={prefix}&limit=2"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let found: Vec<&Value> = r.body["requests"].as_array().unwrap().iter().collect();
    assert_eq!(found.len(), 1, "{}", r.text);
    assert_eq!(found[0]["request_id"], json!(id));

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
    assert!(r.text.contains("chiffon_event_channels 0"), "{}", r.text);

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
    // Just heard from: fresh, with the age and the limit it is measured against.
    for a in agents {
        assert_eq!(a["liveness"], "fresh", "{a}");
        assert!(
            a["heartbeat_age_secs"].as_i64().is_some_and(|s| s >= 0),
            "{a}"
        );
        assert!(
            a["heartbeat_max_age_secs"].as_u64().is_some_and(|s| s > 0),
            "{a}"
        );
    }

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
        .header(header::HOST, "localhost")
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
    assert_error(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE, 5510);
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
    let r = t.call("DELETE", "/health", None, None, false).await;
    assert_error(&r, StatusCode::METHOD_NOT_ALLOWED, 5509);
    assert_eq!(r.headers[header::ALLOW], "GET,HEAD");
    let r = t.get("/approve", None).await;
    assert_error(&r, StatusCode::METHOD_NOT_ALLOWED, 5509);
    assert_eq!(r.headers[header::ALLOW], "POST");

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
    // Statuses from the start: these steps are shorter than the default delay, which would
    // leave them only their results.
    let dir = tempfile::tempdir().unwrap();
    let mut config = chiffon_server::testing::temp_config(dir.path(), vec![]);
    config.agents.status_delay_ms = 0;
    let app = chiffon_server::testing::start_app_with(config).await;
    let router = app.router();
    let t = T {
        app,
        router,
        _dir: dir,
    };
    let id = t.submit(None, "two slow steps steps=2 sleep=150").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let req = Request::builder()
        .uri(format!("/request/{id}/events"))
        .header(header::HOST, "localhost")
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
    // The document served is the one the library generates for this configuration.
    assert_eq!(r.body, chiffon_server::openapi());
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
                .header(header::HOST, "localhost")
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

fn with_host(method: &str, uri: &str, host: Option<&str>) -> axum::http::request::Builder {
    let b = Request::builder().method(method).uri(uri);
    match host {
        Some(h) => b.header(header::HOST, h),
        None => b,
    }
}

fn json_post(uri: &str, host: &str) -> axum::http::request::Builder {
    with_host("POST", uri, Some(host)).header(header::CONTENT_TYPE, "application/json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_hosts_are_answered() {
    let t = setup(false).await;
    let submit = json!({"text": "x"}).to_string();
    // A DNS-rebinding page: its own name, the server's address.
    for host in [
        "evil.example",
        "evil.example:8080",
        "127.0.0.1.nip.io:8080",
        "localhost.evil.example",
        "10.0.0.1",
        "[fd00::1]:8080",
        "bad host",
    ] {
        for (method, uri) in [("GET", "/health"), ("GET", "/requests"), ("GET", "/nope")] {
            let r = t
                .send(
                    with_host(method, uri, Some(host))
                        .body(Body::empty())
                        .unwrap(),
                )
                .await;
            assert_error(&r, StatusCode::MISDIRECTED_REQUEST, 5507);
        }
        let r = t
            .send(
                json_post("/request", host)
                    .body(Body::from(submit.clone()))
                    .unwrap(),
            )
            .await;
        assert_error(&r, StatusCode::MISDIRECTED_REQUEST, 5507);
    }
    // No Host at all (HTTP/1.0), and an absolute URI naming another host.
    let r = t
        .send(
            with_host("GET", "/health", None)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_error(&r, StatusCode::MISDIRECTED_REQUEST, 5507);
    let r = t
        .send(
            with_host("GET", "http://evil.example/health", Some("127.0.0.1"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_error(&r, StatusCode::MISDIRECTED_REQUEST, 5507);
    // Nothing was submitted by the refused requests.
    assert!(t.get("/requests", None).await.body["requests"]
        .as_array()
        .unwrap()
        .is_empty());

    for host in [
        "localhost",
        "LOCALHOST:8080",
        "localhost.:8080",
        "127.0.0.1",
        "127.0.0.1:8080",
        "[::1]:8080",
        "[::1]",
    ] {
        let r = t
            .send(
                with_host("GET", "/health", Some(host))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{host}: {}", r.text);
    }
    let r = t
        .send(
            with_host(
                "GET",
                "http://localhost:8080/health",
                Some("localhost:8080"),
            )
            .body(Body::empty())
            .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    t.app.shutdown().await;

    // With tokens: a valid token does not make a foreign host acceptable; configured names
    // (server.allowed_hosts) are.
    let dir = tempfile::tempdir().unwrap();
    let mut config = chiffon_server::testing::temp_config(dir.path(), tokens());
    config.server.allowed_hosts = vec!["chiffon.lan".into(), "[fd00::1]".into()];
    let app = chiffon_server::testing::start_app_with(config).await;
    let t = T {
        router: app.router(),
        app,
        _dir: dir,
    };
    let r = t
        .send(
            with_host("GET", "/requests", Some("evil.example"))
                .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_error(&r, StatusCode::MISDIRECTED_REQUEST, 5507);
    for host in ["chiffon.lan", "Chiffon.LAN:8443", "[fd00::1]:8080"] {
        let r = t
            .send(
                with_host("GET", "/requests", Some(host))
                    .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{host}: {}", r.text);
    }
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_writes_are_refused() {
    let t = setup(false).await;
    let submit = json!({"text": "x"}).to_string();
    let post = |headers: &[(&str, &str)]| {
        let mut b = json_post("/request", "127.0.0.1:8080");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::from(submit.clone())).unwrap()
    };
    for headers in [
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site")],
        vec![("origin", "http://evil.example")],
        vec![("origin", "https://evil.example:8080")],
        vec![("origin", "null")],
        vec![("origin", "garbage")],
        vec![
            ("origin", "http://localhost:8080"),
            ("sec-fetch-site", "cross-site"),
        ],
    ] {
        let r = t.send(post(&headers)).await;
        assert_error(&r, StatusCode::FORBIDDEN, 5508);
    }
    assert!(t.get("/requests", None).await.body["requests"]
        .as_array()
        .unwrap()
        .is_empty());
    // The web console's own pages, and clients that send neither header.
    for headers in [
        vec![],
        vec![("sec-fetch-site", "same-origin")],
        vec![("sec-fetch-site", "none")],
        vec![("origin", "http://localhost:8080")],
        vec![("origin", "http://127.0.0.1:8080")],
        vec![
            ("origin", "http://[::1]:8080"),
            ("sec-fetch-site", "same-origin"),
        ],
    ] {
        let r = t.send(post(&headers)).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{headers:?}: {}", r.text);
    }
    // Safe methods are not writes.
    let r = t
        .send(
            with_host("GET", "/requests", Some("localhost"))
                .header("origin", "http://evil.example")
                .header("sec-fetch-site", "cross-site")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    t.app.shutdown().await;

    // A token does not lift it: approving from another site is refused before the token is read.
    let t = setup(true).await;
    let id = t.submit(Some(REQUESTER), "x").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let r = t
        .send(
            json_post("/approve", "localhost")
                .header(header::AUTHORIZATION, format!("Bearer {APPROVER}"))
                .header("origin", "http://evil.example")
                .body(Body::from(
                    json!({"request_id": id, "approved": true}).to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, 5508);
    let r = t.get(&format!("/request/{id}"), Some(VIEWER)).await;
    assert_eq!(r.body["status"], "awaiting_approval");
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_the_stores_cannot_keep_and_odd_bodies_are_400() {
    let t = setup(false).await;
    let long = chiffon_core::engine::MAX_TEXT_LEN;
    for body in [
        json!({"text": "a\u{0}b"}),
        json!({"text": "x", "requester": "bob\u{0}"}),
        json!({"text": "x", "te\u{0}xt": 1}),
        json!(["x", null, false]),
        json!("x"),
        json!(null),
        json!(42),
        json!({"text": "\u{feff}\u{1}"}),
        json!({"text": "a".repeat(long + 1)}),
        json!({"text": "é".repeat(long / 2 + 1)}),
        json!({"text": "x", "requester": "r".repeat(201)}),
    ] {
        let r = t.post("/request", None, body.clone()).await;
        assert_error(&r, StatusCode::BAD_REQUEST, 5501);
        assert!(!r.text.contains("\\u0000b"), "{}", r.text);
    }
    let r = t.post("/request", None, json!({"text": "a\u{0}b"})).await;
    assert_eq!(r.body["error"]["details"]["field"], "/text", "{}", r.text);
    // Exactly at the limits is accepted.
    let r = t
        .post(
            "/request",
            None,
            json!({"text": "a".repeat(long), "requester": "r".repeat(200)}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let r = t
        .call(
            "POST",
            "/request",
            None,
            Some(Body::from(json!({"text": "x"}).to_string())),
            false,
        )
        .await;
    assert_error(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE, 5510);
    let req = with_host("POST", "/request", Some("localhost"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(json!({"text": "x"}).to_string()))
        .unwrap();
    assert_error(&t.send(req).await, StatusCode::UNSUPPORTED_MEDIA_TYPE, 5510);
    let req = with_host("POST", "/request", Some("localhost"))
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(json!({"text": "x"}).to_string()))
        .unwrap();
    assert_eq!(t.send(req).await.status, StatusCode::ACCEPTED);

    let unknown = Uuid::new_v4();
    for body in [
        json!({"request_id": unknown, "approved": true, "comment": "ok\u{0}"}),
        json!({"request_id": unknown, "approved": true, "comment": "c".repeat(2001)}),
        json!([unknown, true, null]),
    ] {
        let r = t.post("/approve", None, body).await;
        assert_error(&r, StatusCode::BAD_REQUEST, 5501);
    }

    for query in [
        "before=-262143-01-01T00:00:00Z",
        "before=%2B262142-12-31T23:59:59Z",
        "before=10001-01-01T00:00:00Z",
        "limit=0",
        "limit=1001",
        "limit=4294967296",
        "status=",
        "status=%00",
        "status=completed%00",
        "id_prefix=",
        "id_prefix=abcde",
        "id_prefix=abcdeg",
        "id_prefix=abcdef%00",
        "id_prefix=0123456789abcdef0123456789abcdef01234",
    ] {
        let r = t.get(&format!("/requests?{query}"), None).await;
        assert_error(&r, StatusCode::BAD_REQUEST, 5501);
    }
    for query in [
        "before=0000-01-01T00:00:00Z",
        "before=0000-01-01T00:00:00%2B23:59",
        "before=9999-12-31T23:59:59.999999-23:59",
        "limit=1000",
        "limit=1",
        "id_prefix=ABCDEF-0",
        "id_prefix=------",
    ] {
        let r = t.get(&format!("/requests?{query}"), None).await;
        assert_eq!(r.status, StatusCode::OK, "{query}: {}", r.text);
    }
    let r = t.get("/requests?before=9999-12-31T23:59:59Z", None).await;
    assert_eq!(
        r.body["requests"].as_array().unwrap().len(),
        2,
        "{}",
        r.text
    );
    let id = t.submit(None, "x").await;
    for query in ["limit=0", "limit=1001"] {
        let r = t.get(&format!("/request/{id}/logs?{query}"), None).await;
        assert_error(&r, StatusCode::BAD_REQUEST, 5501);
    }
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_of_unknown_or_left_requests_hold_no_channel() {
    let t = setup(false).await;
    let engine = t.app.engine().clone();
    for _ in 0..500 {
        let r = t
            .get(&format!("/request/{}/events", Uuid::new_v4()), None)
            .await;
        assert_error(&r, StatusCode::NOT_FOUND, 5102);
    }
    assert_eq!(engine.event_channels(), 0, "unknown ids allocate nothing");

    // A watcher of a live request holds its channel until it leaves.
    let id = t.submit(None, "x").await;
    t.wait(id, RequestStatus::AwaitingApproval).await;
    let open = || async {
        let resp = t
            .router
            .clone()
            .oneshot(
                with_host("GET", &format!("/request/{id}/events"), Some("localhost"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut stream = resp.into_body().into_data_stream();
        let first = stream.next().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("awaiting_approval"));
        stream
    };
    let a = open().await;
    let b = open().await;
    assert_eq!(engine.event_channels(), 1);
    drop(a);
    assert_eq!(engine.event_channels(), 1, "one watcher is left");
    drop(b);
    assert_eq!(engine.event_channels(), 0, "the last watcher freed it");

    // A stream of an ended request gives its status, ends, and holds nothing.
    engine.cancel(id, "local").await.unwrap();
    let r = t.get(&format!("/request/{id}/events"), None).await;
    assert!(r.text.contains("\"status\":\"cancelled\""), "{}", r.text);
    assert_eq!(engine.event_channels(), 0);
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_configuration_and_the_validators() {
    fn ops(doc: &Value) -> Vec<(String, String, Value)> {
        let mut out = vec![];
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                out.push((path.clone(), method.clone(), op.clone()));
            }
        }
        out
    }
    // Without tokens: no security scheme, no 401.
    let dir = tempfile::tempdir().unwrap();
    let mut config = chiffon_server::testing::temp_config(dir.path(), vec![]);
    config.server.max_page = 77;
    let app = chiffon_server::testing::start_app_with(config.clone()).await;
    let t = T {
        router: app.router(),
        app,
        _dir: dir,
    };
    let doc = t.get("/openapi.json", None).await.body;
    assert_eq!(
        doc,
        chiffon_server::openapi_document(false, &config.server),
        "served as built"
    );
    assert!(doc["components"].get("securitySchemes").is_none());
    for (path, method, op) in ops(&doc) {
        let responses = op["responses"].as_object().unwrap();
        assert!(op.get("security").is_none(), "{method} {path}");
        assert!(!responses.contains_key("401"), "{method} {path}");
        assert!(responses.contains_key("421"), "{method} {path}");
        if method == "post" {
            assert!(responses.contains_key("403"), "{method} {path}");
        }
        for (status, r) in responses {
            assert!(r["description"].is_string(), "{method} {path} {status}");
        }
    }
    for path in ["/request", "/approve"] {
        let responses = &doc["paths"][path]["post"]["responses"];
        for status in ["400", "413", "415"] {
            assert!(responses.get(status).is_some(), "{path} {status}");
        }
    }
    let text = &doc["components"]["schemas"]["SubmitBody"]["properties"]["text"];
    assert_eq!(text["minLength"], 1);
    assert_eq!(
        text["maxLength"],
        json!(chiffon_core::engine::MAX_TEXT_LEN),
        "{text}"
    );
    assert_eq!(text["pattern"], chiffon_server::dto::TEXT_PATTERN);
    let comment = &doc["components"]["schemas"]["ApproveBody"]["properties"]["comment"];
    assert_eq!(comment["maxLength"], 2000);
    assert_eq!(comment["pattern"], chiffon_server::dto::NO_NUL_PATTERN);
    for path in ["/requests", "/request/{id}/logs"] {
        let params = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
        let limit = params.iter().find(|p| p["name"] == "limit").unwrap();
        assert_eq!(limit["schema"]["minimum"], 1, "{path}");
        assert_eq!(limit["schema"]["maximum"], 77, "{path}");
    }
    let params = doc["paths"]["/requests"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let status = params.iter().find(|p| p["name"] == "status").unwrap();
    assert_eq!(
        status["schema"]["$ref"], "#/components/schemas/StatusDto",
        "{status}"
    );
    let statuses = doc["components"]["schemas"]["StatusDto"]["enum"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(statuses, RequestStatus::ALL.len());
    // The limit the document states is the one enforced.
    assert_error(
        &t.get("/requests?limit=78", None).await,
        StatusCode::BAD_REQUEST,
        5501,
    );
    assert_eq!(
        t.get("/requests?limit=77", None).await.status,
        StatusCode::OK
    );
    t.app.shutdown().await;

    // With tokens: the bearer scheme, and 401/403 with `security` on every route but /health.
    let t = setup(true).await;
    let doc = t.get("/openapi.json", Some(VIEWER)).await.body;
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (path, method, op) in ops(&doc) {
        let responses = op["responses"].as_object().unwrap();
        if path == "/health" {
            assert!(op.get("security").is_none());
            assert!(!responses.contains_key("401"));
        } else {
            assert_eq!(op["security"], json!([{"bearer": []}]), "{method} {path}");
            assert!(responses.contains_key("401"), "{method} {path}");
            assert!(responses.contains_key("403"), "{method} {path}");
        }
    }
    t.app.shutdown().await;
}
