//! Secrets stay out of what Chiffon stores and shows: an LLM provider that answers 401 with
//! a body echoing the API key (and another configured secret, and a NUL) leaves neither in
//! the request's stored error, the audit log or the error text, on SQLite and PostgreSQL.

mod llm_support;

use std::sync::Arc;
use std::time::Duration;

use chiffon_core::engine::{CatalogPlanner, Engine, EngineConfig, EngineParts, SubmitRequest};
use chiffon_core::llm::*;
use chiffon_core::model::RequestStatus;
use chiffon_core::planner::{Planner, PlannerConfig};
use chiffon_core::redact::{Redactor, REDACTED};
use chiffon_core::store::Store;
use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::Topology;
use chiffon_protocol::ErrorCode;
use llm_support::*;

const ANTHROPIC_KEY: &str = "sk-ant-api03-Zx9SECRETkeyVALUE-0123456789abcdef";
/// A secret the provider does not know (say, a proxy's token it echoes): only the
/// engine's redactor can strike it.
const OTHER_SECRET: &str = "proxy-token-9f8e7d6c5b4a";

fn assert_clean(what: &str, text: &str) {
    assert!(
        !text.contains(ANTHROPIC_KEY),
        "{what} leaks the API key: {text}"
    );
    assert!(
        !text.contains("Zx9SECRETkeyVALUE"),
        "{what} leaks part of the API key: {text}"
    );
    assert!(
        !text.contains(OTHER_SECRET),
        "{what} leaks a secret: {text}"
    );
    assert!(!text.contains('\0'), "{what} holds a NUL: {text:?}");
}

async fn echoing_server() -> MockLlm {
    MockLlm::start_with_key(
        Wire::Anthropic,
        ANTHROPIC_KEY,
        vec![Reply::error(
            Wire::Anthropic,
            401,
            "authentication_error",
            &format!("invalid x-api-key: {ANTHROPIC_KEY} (proxy token {OTHER_SECRET})\u{0}"),
        )],
    )
    .await
}

fn anthropic(url: String) -> AnthropicConfig {
    AnthropicConfig {
        base_url: url,
        api_key: ANTHROPIC_KEY.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_provider_error_never_carries_its_key() {
    let s = echoing_server().await;
    let e = AnthropicProvider::new(&anthropic(s.base_url()))
        .unwrap()
        .complete(CompletionRequest::new("sys", "hi"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmAuth);
    let text = e.to_string();
    assert!(text.contains(REDACTED), "{text}");
    assert!(!text.contains(ANTHROPIC_KEY), "{text}");
    assert!(!format!("{e:?}").contains(ANTHROPIC_KEY));
}

#[tokio::test]
async fn configured_providers_strike_every_configured_secret() {
    let s = echoing_server().await;
    let (_dir, store) = sqlite_store().await;
    let llm = LlmConfig {
        order: vec!["anthropic".into()],
        anthropic: Some(anthropic(s.base_url())),
        redactor: Redactor::new([OTHER_SECRET]),
        ..Default::default()
    };
    let router = Router::from_config(&llm, store).unwrap();
    let [Link::Llm(provider), Link::Offline] = router.links() else {
        panic!("expected the configured provider, then offline: {router:?}")
    };
    let e = provider
        .complete(CompletionRequest::new("sys", "hi"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmAuth);
    assert_clean("the error", &e.to_string());
    assert_clean("the error's debug form", &format!("{e:?}"));
}

#[tokio::test]
async fn a_key_echoed_json_escaped_is_redacted_too() {
    // A key with `/` and `+`, echoed as `\/` and `\u002b`: the raw body does not contain it,
    // the message decoded from it does.
    let key = "sk-ant-api03-ab/cd+ef-0123456789";
    let body = format!(
        r#"{{"type":"error","error":{{"type":"authentication_error","message":"bad key {}"}}}}"#,
        key.replace('/', "\\/").replace('+', "\\u002b")
    );
    let s = MockLlm::start_with_key(
        Wire::Anthropic,
        key,
        vec![Reply {
            status: 401,
            headers: vec![],
            body,
            delay: None,
        }],
    )
    .await;
    let e = AnthropicProvider::new(&AnthropicConfig {
        base_url: s.base_url(),
        api_key: key.into(),
        ..Default::default()
    })
    .unwrap()
    .complete(CompletionRequest::new("sys", "hi"))
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "authentication failed (http 401): authentication_error: bad key [REDACTED]"
    );
}

async fn leaked_key_is_redacted(store: Arc<dyn Store>) {
    let s = echoing_server().await;
    let llm = LlmConfig {
        order: vec!["anthropic".into()],
        offline: false,
        anthropic: Some(anthropic(s.base_url())),
        ..Default::default()
    };
    let catalog = Arc::new(fixture_catalog());
    let planner = Planner::new(
        Router::from_config(&llm, store.clone()).unwrap(),
        store.clone(),
        PlannerConfig {
            cache: false,
            ..Default::default()
        },
    );
    let config = EngineConfig {
        redactor: Redactor::new([ANTHROPIC_KEY, OTHER_SECRET]),
        ..Default::default()
    };
    let engine = Engine::new(EngineParts {
        store: store.clone(),
        transport: Arc::new(MemoryTransport::new(Topology::with_prefix(&format!(
            "s{}.",
            uuid::Uuid::new_v4().simple()
        )))),
        planner: Arc::new(CatalogPlanner::new(planner, catalog.clone())),
        catalog,
        git: None,
        config,
    });
    let r = engine
        .submit(SubmitRequest {
            text: "Deploy Uptime Kuma on the NAS".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(r.id, &[RequestStatus::Failed]),
    )
    .await
    .expect("planning ends")
    .unwrap();

    let stored = store.get_request(r.id).await.unwrap();
    let error = stored.error.expect("the request's error is stored");
    assert_eq!(error.code, ErrorCode::NoPlan);
    assert!(
        error.message.contains("authentication failed"),
        "{}",
        error.message
    );
    assert!(error.message.contains(REDACTED), "{}", error.message);
    assert_clean("the stored error", &serde_json::to_string(&error).unwrap());
    assert_clean(
        "the request as served",
        &serde_json::to_string(&engine.get(r.id).await.unwrap()).unwrap(),
    );

    let audit = store.audit_log(Some(r.id), 0, 100).await.unwrap();
    let events: Vec<_> = audit.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, vec!["received", "fallback", "plan_failed"]);
    assert_eq!(audit[1].details["code"], ErrorCode::LlmAuth.code());
    for entry in &audit {
        assert_clean(
            &format!("audit entry {}", entry.event),
            &serde_json::to_string(entry).unwrap(),
        );
    }
    assert!(store.verify_audit().await.unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaked_key_is_redacted_everywhere_sqlite() {
    let (_dir, store) = sqlite_store().await;
    leaked_key_is_redacted(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaked_key_is_redacted_everywhere_postgres() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let store = chiffon_core::store::connect(&db.url()).await.unwrap();
    leaked_key_is_redacted(store).await;
}
