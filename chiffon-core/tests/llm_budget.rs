//! `Budget` against a real store: reservations before the call, settlement after,
//! exhaustion named with provider, budget and spend, and no overspending under
//! concurrency, across two instances sharing one database.

mod llm_support;

use std::sync::Arc;
use std::time::Duration;

use chiffon_core::llm::*;
use chiffon_core::model::usd_to_micros;
use chiffon_protocol::ErrorCode;
use llm_support::*;

fn openai(url: &str) -> OpenAiProvider {
    OpenAiProvider::new(&OpenAiConfig {
        base_url: url.into(),
        api_key: KEY.into(),
        model: "gpt-test".into(),
        ..Default::default()
    })
    .unwrap()
}

fn request() -> CompletionRequest {
    let mut r = CompletionRequest::new("sys", "plan this");
    r.max_tokens = 300;
    r
}

#[tokio::test]
async fn spend_is_recorded_and_failures_cost_nothing() {
    let (_dir, store) = sqlite_store().await;
    let ok = MockLlm::start(Wire::OpenAi, vec![Reply::text(Wire::OpenAi, "x", 100, 250)]).await;
    let p = Budget::new(openai(&ok.base_url()), store.clone(), Some(50.0));
    let c = p.complete(request()).await.unwrap();
    assert_eq!(c.cost_micros, 250 + 2500);

    let bad = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::error(Wire::OpenAi, 500, "server_error", "boom")],
    )
    .await;
    let p = Budget::new(openai(&bad.base_url()), store.clone(), Some(50.0));
    p.complete(request()).await.unwrap_err();

    let spend = store.llm_spend(&current_month()).await.unwrap();
    let s = spend.iter().find(|s| s.provider == "openai").unwrap();
    assert_eq!(s.spent_micros, 2750);
    assert_eq!(s.reserved_micros, 0, "every reservation settled");
    assert_eq!((s.input_tokens, s.output_tokens), (100, 250));
}

#[tokio::test]
async fn exhausted_budget_names_provider_budget_and_spend() {
    let (_dir, store) = sqlite_store().await;
    let s = MockLlm::start(Wire::OpenAi, vec![Reply::text(Wire::OpenAi, "x", 100, 250)]).await;
    // Worst case of one call is about 3,100 micro-dollars: $0.005 allows one.
    let p = Budget::new(openai(&s.base_url()), store.clone(), Some(0.005));
    p.complete(request()).await.unwrap();
    let e = p.complete(request()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmBudgetExhausted);
    match &e {
        LlmError::BudgetExhausted {
            provider,
            budget_usd,
            spent_usd,
            ..
        } => {
            assert_eq!(provider, "openai");
            assert_eq!(*budget_usd, 0.005);
            assert_eq!(usd_to_micros(*spent_usd), 2750);
        }
        other => panic!("{other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("openai") && msg.contains("budget $0.005") && msg.contains("spent $0.00275"),
        "{msg}"
    );
    assert_eq!(s.hits(), 1, "an exhausted budget makes no call");
}

#[tokio::test]
async fn concurrent_calls_on_two_instances_never_overspend() {
    let (_dir, store) = sqlite_store().await;
    never_overspend(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_on_two_postgres_instances_never_overspend() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    // Two orchestrator instances: two stores (two pools) on one database.
    let a = chiffon_core::store::connect(&db.url()).await.unwrap();
    let b = chiffon_core::store::connect(&db.url()).await.unwrap();
    never_overspend(a, b).await;
}

async fn never_overspend(
    store: Arc<dyn chiffon_core::store::Store>,
    other: Arc<dyn chiffon_core::store::Store>,
) {
    let s = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, "x", 100, 250).delayed(Duration::from_millis(100))],
    )
    .await;
    let budget_usd = 0.01;
    // Two orchestrator instances: two wrappers over their stores.
    let a = Arc::new(Budget::new(
        openai(&s.base_url()),
        store.clone(),
        Some(budget_usd),
    ));
    let b = Arc::new(Budget::new(openai(&s.base_url()), other, Some(budget_usd)));
    let mut tasks = Vec::new();
    for i in 0..24 {
        let p = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move { p.complete(request()).await }));
    }
    let mut ok = 0;
    let mut exhausted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), ErrorCode::LlmBudgetExhausted, "{e}");
                exhausted += 1;
            }
        }
    }
    let spend = store.llm_spend(&current_month()).await.unwrap();
    let sp = spend.iter().find(|x| x.provider == "openai").unwrap();
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
    assert_eq!(sp.spent_micros, ok * 2750);
    assert!(sp.spent_micros <= usd_to_micros(budget_usd), "{sp:?}");
    assert_eq!(sp.reserved_micros, 0);
    assert_eq!(s.hits() as i64, ok);
}

#[tokio::test]
async fn unlimited_budget_still_records_calls() {
    let (_dir, store) = sqlite_store().await;
    let s = MockLlm::start(Wire::Ollama, vec![Reply::text(Wire::Ollama, "x", 10, 20)]).await;
    let p = Budget::new(
        OllamaProvider::new(&OllamaConfig {
            host: s.base_url(),
            ..Default::default()
        })
        .unwrap(),
        store.clone(),
        None,
    );
    for _ in 0..3 {
        p.complete(request()).await.unwrap();
    }
    let spend = store.llm_spend(&current_month()).await.unwrap();
    let sp = spend.iter().find(|x| x.provider == "ollama").unwrap();
    assert_eq!(sp.spent_micros, 0);
    assert_eq!(sp.calls, 3);
    assert_eq!((sp.input_tokens, sp.output_tokens), (30, 60));
}
