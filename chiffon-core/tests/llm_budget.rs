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

// ---- the budget is a hard cap ----

#[tokio::test]
async fn every_provider_sends_the_max_tokens_it_reserved() {
    let (_dir, store) = sqlite_store().await;
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, "x", 10, 20)],
    )
    .await;
    let o = MockLlm::start(Wire::OpenAi, vec![Reply::text(Wire::OpenAi, "x", 10, 20)]).await;
    let l = MockLlm::start(Wire::Ollama, vec![Reply::text(Wire::Ollama, "x", 10, 20)]).await;
    let anthropic = AnthropicProvider::new(&AnthropicConfig {
        base_url: a.base_url(),
        api_key: KEY.into(),
        ..Default::default()
    })
    .unwrap();
    let ollama = OllamaProvider::new(&OllamaConfig {
        host: l.base_url(),
        ..Default::default()
    })
    .unwrap();
    let req = request();
    Budget::new(anthropic, store.clone(), Some(1.0))
        .complete(req.clone())
        .await
        .unwrap();
    Budget::new(openai(&o.base_url()), store.clone(), Some(1.0))
        .complete(req.clone())
        .await
        .unwrap();
    Budget::new(ollama, store.clone(), Some(1.0))
        .complete(req.clone())
        .await
        .unwrap();
    assert_eq!(a.bodies()[0]["max_tokens"], req.max_tokens);
    assert_eq!(o.bodies()[0]["max_tokens"], req.max_tokens);
    assert_eq!(l.bodies()[0]["options"]["num_predict"], req.max_tokens);
    // Newer OpenAI models take the cap as `max_completion_tokens`.
    Budget::new(
        OpenAiProvider::new(&OpenAiConfig {
            base_url: o.base_url(),
            api_key: KEY.into(),
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
            ..Default::default()
        })
        .unwrap(),
        store.clone(),
        Some(1.0),
    )
    .complete(req.clone())
    .await
    .unwrap();
    let body = &o.bodies()[1];
    assert_eq!(body["max_completion_tokens"], req.max_tokens);
    assert!(body.get("max_tokens").is_none());
}

/// An Anthropic-wire server that ignores `max_tokens` and bills 40 times the worst case
/// of each call, against 40 concurrent plannings and a budget of three worst cases.
async fn overbilling_provider_is_closed(store: Arc<dyn chiffon_core::store::Store>) {
    use chiffon_core::planner::{prompt, PlanOptions, Planner, PlannerConfig};

    let catalog = fixture_catalog();
    let text = "Deploy Uptime Kuma on the NAS on port 8080";
    let max_tokens = 500;
    let pricing = Pricing::new(3.0, 15.0);
    let worst = pricing.worst_case_micros(&prompt::planning_request(
        &catalog, text, false, max_tokens, 0.0,
    ));
    let budget_micros = 3 * worst;
    // The bill: what the prompt really took, and 40 worst cases' worth of output.
    let output_tokens = (40 * worst / 15) as u64;
    let billed = pricing.cost_micros(2000, output_tokens);
    assert!(billed > 30 * worst);
    let answer = plan_answer(serde_json::json!([{
        "action": "deploy_kuma",
        "parameters": {"host": "nas.lan", "port": 8080},
        "reason": "asked for"
    }]));
    let s = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, &answer, 2000, output_tokens)
            .delayed(Duration::from_millis(200))],
    )
    .await;
    let config = LlmConfig {
        anthropic: Some(AnthropicConfig {
            base_url: s.base_url(),
            api_key: KEY.into(),
            monthly_budget_usd: Some(budget_micros as f64 / 1e6),
            ..Default::default()
        }),
        ..Default::default()
    };
    let planner = Planner::new(
        Router::from_config(&config, store.clone()).unwrap(),
        store.clone(),
        PlannerConfig {
            cache: false,
            max_tokens,
            ..Default::default()
        },
    );
    let catalog = Arc::new(catalog);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (planner, catalog) = (planner.clone(), catalog.clone());
        tasks.push(tokio::spawn(async move {
            planner
                .plan(&catalog, text, &PlanOptions::default())
                .await
                .map(|o| (o.plan.provider, o.events))
                .map_err(|e| e.events)
        }));
    }
    let (mut by_llm, mut refused) = (0, 0);
    for t in tasks {
        let (provider, events) = match t.await.unwrap() {
            Ok(x) => x,
            Err(events) => (String::new(), events),
        };
        if provider == "anthropic" {
            by_llm += 1;
            assert!(events.is_empty());
        } else {
            // Refused before any HTTP call, and the fallback says why.
            assert_eq!(events[0].provider, "anthropic");
            assert_eq!(events[0].code, ErrorCode::LlmBudgetExhausted, "{events:?}");
            refused += 1;
        }
    }
    let calls = s.hits() as i64;
    assert_eq!(calls, by_llm);
    assert_eq!(by_llm + refused, 40);
    // No call starts unless its worst case fits: at most three at once, then closed.
    assert!((1..=3).contains(&calls), "{calls} calls");
    for body in s.bodies() {
        assert_eq!(
            body["max_tokens"], max_tokens,
            "the reserved max_tokens is sent"
        );
    }
    let spend = store.llm_spend(&current_month()).await.unwrap();
    let sp = spend.iter().find(|x| x.provider == "anthropic").unwrap();
    // Every overbilled call is recorded in full...
    assert_eq!(sp.spent_micros, calls * billed);
    assert_eq!(sp.calls as i64, calls);
    assert_eq!(sp.reserved_micros, 0);
    // ...the spend passes the budget by no more than the overage of the calls in flight...
    assert!(sp.spent_micros > budget_micros);
    assert!(sp.spent_micros - budget_micros <= calls * (billed - worst));
    // ...and the provider stays closed: refused with no HTTP call, whatever its size.
    let e = Budget::new(
        AnthropicProvider::new(config.anthropic.as_ref().unwrap()).unwrap(),
        store.clone(),
        config.anthropic.as_ref().unwrap().monthly_budget_usd,
    )
    .complete(CompletionRequest {
        max_tokens: 1,
        ..CompletionRequest::new("", "x")
    })
    .await
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmBudgetExhausted);
    assert_eq!(s.hits() as i64, calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overbilling_provider_is_closed_sqlite() {
    let (_dir, store) = sqlite_store().await;
    overbilling_provider_is_closed(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overbilling_provider_is_closed_postgres() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let store = chiffon_core::store::connect(&db.url()).await.unwrap();
    overbilling_provider_is_closed(store).await;
}

/// A process that crashed mid-call never settles its reservation: the reservation holds
/// budget until its lease passes, then stops counting.
async fn crashed_reservation_expires(store: Arc<dyn chiffon_core::store::Store>) {
    let slow = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, "x", 100, 250).delayed(Duration::from_secs(30))],
    )
    .await;
    let fast = MockLlm::start(Wire::OpenAi, vec![Reply::text(Wire::OpenAi, "x", 100, 250)]).await;
    // One worst case (about 3,100 micro-dollars) fits in $0.005, two do not.
    let crashing = Budget::new(openai(&slow.base_url()), store.clone(), Some(0.005))
        .with_lease(Duration::from_millis(1500));
    let mut call = Box::pin(crashing.complete(request()));
    // Run the call until it has reserved and is waiting for the answer, then "crash":
    // the future is leaked, never dropped, so nothing settles the reservation.
    tokio::select! {
        _ = &mut call => panic!("the slow call answered"),
        _ = async { while slow.hits() == 0 { tokio::time::sleep(Duration::from_millis(10)).await } } => {}
    }
    std::mem::forget(call);
    let other = Budget::new(openai(&fast.base_url()), store.clone(), Some(0.005));
    let e = other.complete(request()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmBudgetExhausted, "{e}");
    let spend = store.llm_spend(&current_month()).await.unwrap();
    assert!(spend[0].reserved_micros > 0);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let spend = store.llm_spend(&current_month()).await.unwrap();
    assert_eq!(spend[0].reserved_micros, 0, "the lease has passed");
    other.complete(request()).await.unwrap();
    assert_eq!(fast.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_reservation_expires_sqlite() {
    let (_dir, store) = sqlite_store().await;
    crashed_reservation_expires(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_reservation_expires_postgres() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let store = chiffon_core::store::connect(&db.url()).await.unwrap();
    crashed_reservation_expires(store).await;
}

/// A call whose answer times out may have been billed: it counts at its worst case, and
/// each retry reserves again, so retries stop when the budget is spent.
#[tokio::test]
async fn timed_out_calls_count_at_their_worst_case_and_each_retry_reserves() {
    let (_dir, store) = sqlite_store().await;
    let s = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, "x", 100, 250).delayed(Duration::from_secs(2))],
    )
    .await;
    let worst = Pricing::new(2.5, 10.0).worst_case_micros(&request());
    let budget_micros = worst * 5 / 2;
    let config = LlmConfig {
        retry: RetryConfig {
            max_attempts: 3,
            initial_backoff_ms: 10,
            max_backoff_ms: 20,
            max_retry_after_ms: 1000,
        },
        ..Default::default()
    };
    let provider = openai(&s.base_url())
        .with_timeout(Duration::from_secs(1), Duration::from_millis(200))
        .unwrap();
    let Link::Llm(p) = Router::layered(
        ProviderEntry {
            provider,
            monthly_budget_usd: Some(budget_micros as f64 / 1e6),
            timeout: Duration::from_millis(200),
        },
        store.clone(),
        &config,
    ) else {
        panic!("an llm link")
    };
    let e = p.complete(request()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmBudgetExhausted, "{e}");
    assert_eq!(s.hits(), 2, "the third attempt found no budget");
    let spend = store.llm_spend(&current_month()).await.unwrap();
    let sp = spend.iter().find(|x| x.provider == "openai").unwrap();
    assert_eq!(
        (sp.spent_micros, sp.calls, sp.reserved_micros),
        (2 * worst, 2, 0)
    );
}

/// A call abandoned mid-flight (its request cancelled) may still be billed: its
/// reservation is settled at the worst case at once, not left to its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_counts_at_its_worst_case() {
    let (_dir, store) = sqlite_store().await;
    let s = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, "x", 100, 250).delayed(Duration::from_secs(30))],
    )
    .await;
    let worst = Pricing::new(2.5, 10.0).worst_case_micros(&request());
    let p = Arc::new(Budget::new(openai(&s.base_url()), store.clone(), Some(1.0)));
    let task = tokio::spawn({
        let p = p.clone();
        async move { p.complete(request()).await }
    });
    while s.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    let _ = task.await;
    let mut sp = None;
    for _ in 0..100 {
        let spend = store.llm_spend(&current_month()).await.unwrap();
        sp = spend.into_iter().find(|x| x.provider == "openai");
        if sp.as_ref().is_some_and(|x| x.calls == 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sp = sp.unwrap();
    assert_eq!(
        (sp.spent_micros, sp.reserved_micros, sp.calls),
        (worst, 0, 1)
    );
}

/// A structured Anthropic call with prompt caching: the reservation counts the schema and
/// prices the whole prompt as cache writes, so it bounds the real cost, which is settled at
/// cache prices.
#[tokio::test]
async fn a_cached_structured_call_is_reserved_at_its_dearest_and_settled_at_cache_prices() {
    let (_dir, store) = sqlite_store().await;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"answer": {"type": "string", "description": "x".repeat(3000)}},
        "required": ["answer"],
        "additionalProperties": false,
    });
    let req = CompletionRequest {
        output: Some(OutputSchema {
            name: "submit_answer".into(),
            description: "the answer".into(),
            schema: schema.clone(),
            strict_schema: schema,
        }),
        ..request()
    };
    // A real server bills fewer tokens than the estimate (a third of the bytes, plus the
    // tool overhead): the whole prompt written to the cache, the whole max_tokens out.
    let prompt_tokens = (req.prompt_len() / 4) as u64 + 300;
    let s = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::tool_use(
            "submit_answer",
            serde_json::json!({"answer": "a"}),
            3,
            prompt_tokens - 3,
            0,
            u64::from(req.max_tokens),
        )],
    )
    .await;
    let provider = AnthropicProvider::new(&AnthropicConfig {
        base_url: s.base_url(),
        api_key: KEY.into(),
        ..Default::default()
    })
    .unwrap();
    let worst = provider.pricing().worst_case_micros(&req);
    // Without the schema and at the plain input price the reservation would be smaller
    // than what the call can cost.
    assert!(Pricing::new(3.0, 15.0).worst_case_micros(&request()) < worst);
    let p = Budget::new(provider, store.clone(), Some(100.0));
    let c = p.complete(req).await.unwrap();
    let expected = 3 * 3 + ((prompt_tokens - 3) as f64 * 3.75).ceil() as i64 + 300 * 15;
    assert_eq!(c.cost_micros, expected);
    assert!(c.cost_micros <= worst, "{} > {worst}", c.cost_micros);
    let spend = store.llm_spend(&current_month()).await.unwrap();
    let sp = spend.iter().find(|s| s.provider == "anthropic").unwrap();
    assert_eq!((sp.spent_micros, sp.reserved_micros), (expected, 0));
    assert_eq!(sp.input_tokens, prompt_tokens);

    // A budget the plain worst case fits but the cached, structured one does not: refused
    // before any call.
    let tight = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, "x", 1, 1)],
    )
    .await;
    let (_dir2, store2) = sqlite_store().await;
    let provider = AnthropicProvider::new(&AnthropicConfig {
        base_url: tight.base_url(),
        api_key: KEY.into(),
        ..Default::default()
    })
    .unwrap();
    let req = CompletionRequest {
        output: c_output(),
        ..request()
    };
    let worst = provider.pricing().worst_case_micros(&req);
    let p = Budget::new(
        provider,
        store2,
        Some(chiffon_core::model::micros_to_usd(worst - 1)),
    );
    let e = p.complete(req).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmBudgetExhausted);
    assert_eq!(tight.hits(), 0);
}

fn c_output() -> Option<OutputSchema> {
    let schema = serde_json::json!({"type": "object", "properties": {}, "required": [], "additionalProperties": false});
    Some(OutputSchema {
        name: "submit_answer".into(),
        description: "d".into(),
        schema: schema.clone(),
        strict_schema: schema,
    })
}
