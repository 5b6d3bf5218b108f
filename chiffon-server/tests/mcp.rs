//! The MCP server at `/mcp` through `router()`: JSON-RPC as an MCP client sends it, behind the
//! same tokens and roles as the HTTP API. (examples/mcp/run.sh drives it with the official
//! Python SDK, over HTTP and stdio, against a real server.)

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use chiffon_server::config::{Role, TokenConfig};
use chiffon_server::testing::start_app;
use serde_json::{json, Value};
use tower::ServiceExt;

const VIEWER: &str = "viewer-token-0123456789";
const REQUESTER: &str = "requester-token-0123456789";
const OTHER_REQUESTER: &str = "other-requester-token-0123";

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
    ]
}

/// One JSON-RPC request to `/mcp`; the HTTP status and the JSON-RPC answer.
async fn rpc(
    router: &Router,
    token: Option<&str>,
    method: &str,
    params: Value,
) -> (StatusCode, Value) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let mut req = Request::builder()
        .method("POST")
        .uri("/mcp")
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    // A JSON answer, or one SSE event whose data is the answer.
    let json = serde_json::from_str(&text).unwrap_or_else(|_| {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v.get("id").is_some())
            .unwrap_or(Value::Null)
    });
    (status, json)
}

async fn tool(router: &Router, token: &str, name: &str, args: Value) -> Value {
    let (status, answer) = rpc(
        router,
        Some(token),
        "tools/call",
        json!({"name": name, "arguments": args}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["result"].clone()
}

fn error_code(result: &Value) -> u64 {
    assert_eq!(result["isError"], true, "{result}");
    result["structuredContent"]["error"]["code"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_behind_tokens_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(dir.path(), tokens()).await;
    let router = app.router();

    let (status, _) = rpc(&router, None, "tools/list", json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, init) = rpc(
        &router,
        Some(VIEWER),
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{init}");
    assert_eq!(init["result"]["serverInfo"]["name"], "chiffon", "{init}");

    let (_, listed) = rpc(&router, Some(VIEWER), "tools/list", json!({})).await;
    let mut names: Vec<&str> = listed["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cancel_request",
            "get_request",
            "list_actions",
            "list_requests",
            "submit_request"
        ]
    );

    let actions = tool(&router, VIEWER, "list_actions", json!({})).await;
    let noop = &actions["structuredContent"]["actions"][0];
    assert_eq!(noop["name"], "noop", "{actions}");
    assert_eq!(noop["parameters"]["type"], "object");

    // A viewer reads but may not submit.
    let refused = tool(
        &router,
        VIEWER,
        "submit_request",
        json!({"text": "steps=1"}),
    )
    .await;
    assert_eq!(error_code(&refused), 5504);
    assert!(
        refused["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("error 5504 forbidden:"),
        "{refused}"
    );

    let submitted = tool(
        &router,
        REQUESTER,
        "submit_request",
        json!({"text": "steps=1", "dry_run": false}),
    )
    .await;
    assert_eq!(submitted["isError"], false, "{submitted}");
    let id = submitted["structuredContent"]["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        submitted["structuredContent"]["console_url"],
        format!("http://127.0.0.1:8080/ui/request/{id}")
    );
    let got = tool(&router, VIEWER, "get_request", json!({"request_id": id})).await;
    assert_eq!(got["structuredContent"]["id"], id.as_str(), "{got}");
    let listed = tool(&router, VIEWER, "list_requests", json!({"limit": 10})).await;
    assert_eq!(
        listed["structuredContent"]["requests"][0]["id"],
        id.as_str(),
        "{listed}"
    );

    // Cancel: another requester's request is not theirs; its owner may.
    let other = tool(
        &router,
        OTHER_REQUESTER,
        "cancel_request",
        json!({"request_id": id}),
    )
    .await;
    assert_eq!(error_code(&other), 5504);
    let viewer = tool(&router, VIEWER, "cancel_request", json!({"request_id": id})).await;
    assert_eq!(error_code(&viewer), 5504);
    let cancelled = tool(
        &router,
        REQUESTER,
        "cancel_request",
        json!({"request_id": id}),
    )
    .await;
    assert_eq!(
        cancelled["structuredContent"]["status"], "cancelled",
        "{cancelled}"
    );

    // Bad input is a 5501 tool error, never pasted into a path; unknown ids are 5102.
    for (name, args) in [
        ("get_request", json!({"request_id": "../approve"})),
        ("get_request", json!({})),
        ("list_requests", json!({"status": "sleeping"})),
        ("list_requests", json!({"limit": 0})),
        ("submit_request", json!({"text": "x", "dry_run": "yes"})),
    ] {
        let r = tool(&router, REQUESTER, name, args.clone()).await;
        assert_eq!(error_code(&r), 5501, "{name} {args}: {r}");
    }
    let missing = tool(
        &router,
        VIEWER,
        "get_request",
        json!({"request_id": uuid::Uuid::new_v4().to_string()}),
    )
    .await;
    assert_eq!(error_code(&missing), 5102);
    let blank = tool(&router, REQUESTER, "submit_request", json!({"text": "   "})).await;
    assert_eq!(error_code(&blank), 5501);

    // No tool approves.
    let (_, approve) = rpc(
        &router,
        Some(REQUESTER),
        "tools/call",
        json!({"name": "approve_request", "arguments": {"request_id": id}}),
    )
    .await;
    assert_eq!(approve["error"]["code"], -32602, "{approve}");
    app.shutdown().await;
}
