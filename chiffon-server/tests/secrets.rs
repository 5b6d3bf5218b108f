//! The server fills the engine's redactor from every secret its configuration holds: an
//! LLM provider answering 401 with a body that echoes the API key and an API token leaves
//! neither in the request's stored error, the audit log or the served request.

use std::time::Duration;

use axum::routing::post;
use chiffon_core::engine::SubmitRequest;
use chiffon_core::llm::{AnthropicConfig, ApiKey};
use chiffon_core::model::RequestStatus;
use chiffon_server::config::{Role, TokenConfig};
use chiffon_server::testing::temp_config;
use chiffon_server::{App, AppOptions};

const KEY: &str = "sk-ant-api03-SERVERsecretKEY-0123456789";
const TOKEN: &str = "approver-token-SECRET-0123456789";

/// An Anthropic Messages endpoint that refuses the key and quotes it (and the token).
async fn echoing_anthropic() -> String {
    let app = axum::Router::new().route(
        "/v1/messages",
        post(|| async {
            let body = serde_json::json!({"type": "error", "error": {
                "type": "authentication_error",
                "message": format!("invalid x-api-key {KEY}; caller token {TOKEN}"),
            }});
            (
                axum::http::StatusCode::UNAUTHORIZED,
                [("content-type", "application/json")],
                body.to_string(),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoed_key_and_token_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = temp_config(
        dir.path(),
        vec![TokenConfig {
            name: Some("alice".into()),
            token: TOKEN.into(),
            role: Role::Approver,
        }],
    );
    config.llm.order = vec!["anthropic".into()];
    config.llm.offline = false;
    config.llm.anthropic = Some(AnthropicConfig {
        base_url: echoing_anthropic().await,
        api_key: ApiKey::new(KEY),
        ..Default::default()
    });
    config.finish().unwrap();
    let app = App::start_with(
        config,
        AppOptions {
            no_agents: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let engine = app.engine().clone();
    let r = engine
        .submit(SubmitRequest {
            text: "Ensure the directory /tmp/x exists".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::Failed]),
    )
    .await
    .expect("planning ends")
    .unwrap();
    let served = serde_json::to_string(&engine.get(r.id).await.unwrap()).unwrap();
    let error = done.error.expect("an error is stored");
    assert!(error.message.contains("[REDACTED]"), "{}", error.message);
    let audit = engine.audit_log(Some(r.id), 0, 100).await.unwrap();
    assert!(audit.iter().any(|e| e.event == "fallback"));
    let texts = std::iter::once(served)
        .chain(std::iter::once(error.message.clone()))
        .chain(audit.iter().map(|e| serde_json::to_string(e).unwrap()));
    for text in texts {
        assert!(
            !text.contains(KEY) && !text.contains("SERVERsecretKEY"),
            "{text}"
        );
        assert!(!text.contains(TOKEN), "{text}");
    }
    assert!(chiffon_server::redact_for_logs(&format!("log {TOKEN}")).contains("[REDACTED]"));
    app.shutdown().await;
}
