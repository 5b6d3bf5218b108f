//! A hostile LLM answer through the whole engine, on SQLite and PostgreSQL (which refuses
//! NUL): a plan holding a NUL character is an invalid answer, the next provider plans, the
//! request moves on to approval instead of staying in `planning`, and the fallback is
//! audited. A model that declines fails the request with its reason (`llm_refused`),
//! audited as such, with no other planner asked.

mod llm_support;

use std::sync::Arc;
use std::time::Duration;

use chiffon_core::engine::{CatalogPlanner, Engine, EngineConfig, EngineParts, SubmitRequest};
use chiffon_core::llm::*;
use chiffon_core::model::RequestStatus;
use chiffon_core::planner::{Planner, PlannerConfig};
use chiffon_core::store::Store;
use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::Topology;
use chiffon_protocol::ErrorCode;
use llm_support::*;
use serde_json::json;

async fn nul_plan_falls_back(store: Arc<dyn Store>) {
    let step = json!([{"action": "deploy_kuma", "parameters": {"host": "nas.lan"}, "reason": "x"}]);
    let hostile = json!({"summary": "deploy kuma\u{0}", "steps": step, "risks": []});
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, &hostile.to_string(), 100, 10)],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &plan_answer(step), 100, 10)],
    )
    .await;
    let llm = LlmConfig {
        order: vec!["anthropic".into(), "openai".into()],
        offline: false,
        anthropic: Some(AnthropicConfig {
            base_url: a.base_url(),
            api_key: KEY.into(),
            ..Default::default()
        }),
        openai: Some(OpenAiConfig {
            base_url: o.base_url(),
            api_key: KEY.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let catalog = Arc::new(fixture_catalog());
    let planner = Planner::new(
        Router::from_config(&llm, store.clone()).unwrap(),
        store.clone(),
        PlannerConfig::default(),
    );
    let engine = Engine::new(EngineParts {
        store: store.clone(),
        transport: Arc::new(MemoryTransport::new(Topology::with_prefix(&format!(
            "h{}.",
            uuid::Uuid::new_v4().simple()
        )))),
        planner: Arc::new(CatalogPlanner::new(planner, catalog.clone())),
        catalog,
        git: None,
        config: EngineConfig::default(),
    });
    let r = engine
        .submit(SubmitRequest {
            text: "Deploy Uptime Kuma on the NAS".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let planned = tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(
            r.id,
            &[RequestStatus::AwaitingApproval, RequestStatus::Failed],
        ),
    )
    .await
    .expect("planning ends")
    .unwrap();
    assert_eq!(
        planned.status,
        RequestStatus::AwaitingApproval,
        "{planned:?}"
    );
    let plan = planned.plan.unwrap();
    assert_eq!(plan.provider, "openai");
    assert!(!plan.summary.contains('\0'));
    let audit = store.audit_log(Some(r.id), 0, 100).await.unwrap();
    let fallback = audit.iter().find(|e| e.event == "fallback").unwrap();
    assert_eq!(fallback.details["provider"], "anthropic");
    assert_eq!(
        fallback.details["code"],
        ErrorCode::LlmInvalidResponse.code()
    );
    let reason = fallback.details["reason"].as_str().unwrap();
    assert!(reason.contains("summary contains a NUL"), "{reason}");
    assert!(audit.iter().any(|e| e.event == "planned"));
    assert!(store.verify_audit().await.unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nul_plan_falls_back_sqlite() {
    let (_dir, store) = sqlite_store().await;
    nul_plan_falls_back(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nul_plan_falls_back_postgres() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let store = chiffon_core::store::connect(&db.url()).await.unwrap();
    nul_plan_falls_back(store).await;
}

async fn refusal_fails_the_request(store: Arc<dyn Store>) {
    let refusal = json!({
        "summary": "declined",
        "steps": [],
        "risks": [],
        "refusal": "deploying to a host named in a prompt injection is not something I will plan"
    });
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::tool_use("submit_plan", refusal, 100, 0, 0, 10)],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &plan_answer(json!([])), 100, 10)],
    )
    .await;
    let llm = LlmConfig {
        order: vec!["anthropic".into(), "openai".into()],
        // The offline planner could plan this text: it must not be asked to.
        offline: true,
        anthropic: Some(AnthropicConfig {
            base_url: a.base_url(),
            api_key: KEY.into(),
            ..Default::default()
        }),
        openai: Some(OpenAiConfig {
            base_url: o.base_url(),
            api_key: KEY.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let catalog = Arc::new(fixture_catalog());
    let planner = Planner::new(
        Router::from_config(&llm, store.clone()).unwrap(),
        store.clone(),
        PlannerConfig::default(),
    );
    let engine = Engine::new(EngineParts {
        store: store.clone(),
        transport: Arc::new(MemoryTransport::new(Topology::with_prefix(&format!(
            "h{}.",
            uuid::Uuid::new_v4().simple()
        )))),
        planner: Arc::new(CatalogPlanner::new(planner, catalog.clone())),
        catalog,
        git: None,
        config: EngineConfig::default(),
    });
    let r = engine
        .submit(SubmitRequest {
            text: "Deploy Uptime Kuma on the NAS".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(20),
        engine.wait_until(
            r.id,
            &[RequestStatus::AwaitingApproval, RequestStatus::Failed],
        ),
    )
    .await
    .expect("planning ends")
    .unwrap();
    assert_eq!(done.status, RequestStatus::Failed, "{done:?}");
    assert!(done.plan.is_none());
    let error = done.error.unwrap();
    assert_eq!(error.code, ErrorCode::LlmRefused);
    assert!(
        error.message.contains("prompt injection"),
        "{}",
        error.message
    );
    assert_eq!(o.hits(), 0);
    let audit = store.audit_log(Some(r.id), 0, 100).await.unwrap();
    let refused = audit.iter().find(|e| e.event == "llm_refused").unwrap();
    assert_eq!(refused.details["provider"], "anthropic");
    assert_eq!(refused.details["code"], ErrorCode::LlmRefused.code());
    assert!(!audit.iter().any(|e| e.event == "fallback"));
    let failed = audit.iter().find(|e| e.event == "plan_failed").unwrap();
    assert_eq!(failed.details["code"], ErrorCode::LlmRefused.code());
    assert!(store.verify_audit().await.unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_fails_the_request_sqlite() {
    let (_dir, store) = sqlite_store().await;
    refusal_fails_the_request(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_fails_the_request_postgres() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let store = chiffon_core::store::connect(&db.url()).await.unwrap();
    refusal_fails_the_request(store).await;
}
