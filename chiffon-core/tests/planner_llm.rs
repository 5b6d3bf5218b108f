//! The planner over the configured router, against local servers speaking each wire
//! format and a real (SQLite) store: success, 429 then success, 500 fallback, budget
//! exhausted fallback, invalid plans (unknown action, bad parameter, not JSON) fallback,
//! all down to the offline planner, circuit breaker, plan cache.

mod llm_support;

use chiffon_core::llm::router::LlmConfig;
use chiffon_core::llm::*;
use chiffon_core::planner::{PlanOptions, Planner, PlannerConfig};
use chiffon_protocol::ErrorCode;
use llm_support::*;
use serde_json::json;

const TEXT: &str = "Deploy Uptime Kuma on the NAS on port 8080";

fn good_plan() -> String {
    plan_answer(json!([{
        "action": "deploy_kuma",
        "parameters": {"host": "nas.lan", "port": 8080},
        "reason": "kuma is the uptime monitor"
    }]))
}

fn config(anthropic: Option<String>, openai: Option<String>, ollama: Option<String>) -> LlmConfig {
    LlmConfig {
        anthropic: anthropic.map(|u| AnthropicConfig {
            base_url: u,
            api_key: KEY.into(),
            model: "claude-test".into(),
            ..Default::default()
        }),
        openai: openai.map(|u| OpenAiConfig {
            base_url: u,
            api_key: KEY.into(),
            model: "gpt-test".into(),
            ..Default::default()
        }),
        ollama: ollama.map(|u| OllamaConfig {
            host: u,
            model: "llama-test".into(),
            ..Default::default()
        }),
        retry: RetryConfig {
            max_attempts: 2,
            initial_backoff_ms: 10,
            max_backoff_ms: 20,
            max_retry_after_ms: 5_000,
        },
        circuit: CircuitConfig {
            failure_threshold: 3,
            cooldown_ms: 60_000,
        },
        ..Default::default()
    }
}

async fn planner(
    cfg: &LlmConfig,
    cache: bool,
) -> (
    tempfile::TempDir,
    std::sync::Arc<dyn chiffon_core::store::Store>,
    Planner,
) {
    let (dir, store) = sqlite_store().await;
    let router = Router::from_config(cfg, store.clone()).unwrap();
    let planner = Planner::new(
        router,
        store.clone(),
        PlannerConfig {
            cache,
            ..Default::default()
        },
    );
    (dir, store, planner)
}

#[tokio::test]
async fn plans_with_the_first_provider_and_records_its_spend() {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(
            Wire::Anthropic,
            &format!("```json\n{}\n```", good_plan()),
            2000,
            300,
        )],
    )
    .await;
    let (_d, store, planner) = planner(&config(Some(a.base_url()), None, None), true).await;
    let catalog = fixture_catalog();
    let id = uuid::Uuid::new_v4();
    let out = planner
        .plan(
            &catalog,
            TEXT,
            &PlanOptions {
                dry_run: false,
                request_id: Some(id),
            },
        )
        .await
        .unwrap();
    let p = &out.plan;
    assert_eq!(
        (p.provider.as_str(), p.model.as_str()),
        ("anthropic", "claude-test")
    );
    assert!(out.events.is_empty());
    assert_eq!(p.steps.len(), 1);
    let s = &p.steps[0];
    assert_eq!(s.action, "deploy_kuma");
    // Filled from the catalog: defaults, agent type, resources.
    assert_eq!(s.parameters["version"], "latest");
    assert_eq!(s.parameters["port"], 8080);
    assert_eq!(s.agent_type, "infrastructure");
    assert_eq!(s.resources.memory_gb, 2.0);
    assert_eq!(p.risks, vec!["kuma restarts"]);
    // 2000 in at $3, 300 out at $15 per million.
    assert!((p.llm_cost_usd - 0.0105).abs() < 1e-9, "{}", p.llm_cost_usd);
    assert!((p.estimated_cost_usd - 0.0105).abs() < 1e-9);
    assert_eq!(
        (out.usage.input_tokens, out.usage.output_tokens),
        (2000, 300)
    );
    assert!(!out.usage.cached);

    // The prompt carried the catalog, the inventory and the rules (a text answer to the
    // tool request: the free-text fallback).
    let body = &a.bodies()[0];
    assert_eq!(
        body["system"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    assert_eq!(body["tools"][0]["name"], "submit_plan");
    let system = body["system"][0]["text"].as_str().unwrap();
    for needle in [
        "deploy_kuma",
        "restart_service",
        "^[A-Za-z0-9_.-]+$",
        "nas.lan",
        "ONLY one JSON object",
        "\"default\": 3001",
    ] {
        assert!(system.contains(needle), "system prompt lacks {needle}");
    }
    assert!(body["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains(TEXT));
    assert_eq!(body["max_tokens"], 2048);

    let spend = store.llm_spend(&current_month()).await.unwrap();
    let sp = spend.iter().find(|s| s.provider == "anthropic").unwrap();
    assert_eq!(
        (sp.spent_micros, sp.reserved_micros, sp.calls),
        (10500, 0, 1)
    );
}

#[tokio::test]
async fn the_plan_cache_reuses_plans_at_no_cost() {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, &good_plan(), 2000, 300)],
    )
    .await;
    let cfg = config(Some(a.base_url()), None, None);
    let (_d, store, cached) = planner(&cfg, true).await;
    let catalog = fixture_catalog();
    let opts = PlanOptions::default();
    let first = cached.plan(&catalog, TEXT, &opts).await.unwrap();
    let again = cached
        .plan(
            &catalog,
            "  deploy uptime KUMA on the   nas on port 8080 ",
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(a.hits(), 1);
    assert!(again.plan.cached && again.usage.cached);
    assert_eq!(again.plan.llm_cost_usd, 0.0);
    assert_eq!(again.usage.llm_cost_usd, 0.0);
    assert_eq!(again.plan.steps, first.plan.steps);
    assert_eq!(again.plan.provider, "anthropic");

    // A dry run is another key.
    cached
        .plan(
            &catalog,
            TEXT,
            &PlanOptions {
                dry_run: true,
                request_id: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(a.hits(), 2);

    // Turned off, the cache is neither read nor written.
    let off = Planner::new(
        Router::from_config(&cfg, store.clone()).unwrap(),
        store.clone(),
        PlannerConfig {
            cache: false,
            ..Default::default()
        },
    );
    let p = off.plan(&catalog, TEXT, &opts).await.unwrap();
    assert!(!p.plan.cached);
    assert_eq!(a.hits(), 3);
}

#[tokio::test]
async fn invalid_plans_count_as_failures_and_fall_back() {
    let unknown = plan_answer(json!([{"action": "format_disk", "parameters": {}, "reason": "x"}]));
    let bad_param = plan_answer(
        json!([{"action": "deploy_kuma", "parameters": {"host": "NAS; rm -rf /"}, "reason": "x"}]),
    );
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, &unknown, 1000, 100)],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &bad_param, 1000, 100)],
    )
    .await;
    let l = MockLlm::start(
        Wire::Ollama,
        vec![Reply::text(
            Wire::Ollama,
            &format!("Sure! Here is your plan:\n{}", good_plan()),
            1000,
            100,
        )],
    )
    .await;
    let (_d, _s, planner) = planner(
        &config(Some(a.base_url()), Some(o.base_url()), Some(l.base_url())),
        true,
    )
    .await;
    let out = planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    let codes: Vec<_> = out
        .events
        .iter()
        .map(|e| (e.provider.as_str(), e.code))
        .collect();
    assert_eq!(
        codes,
        vec![
            ("anthropic", ErrorCode::PlanUnknownAction),
            ("openai", ErrorCode::PlanInvalidParameter),
            ("ollama", ErrorCode::LlmInvalidResponse),
        ]
    );
    assert!(
        out.events[0].reason.contains("format_disk"),
        "{}",
        out.events[0].reason
    );
    assert!(
        out.events[1].reason.contains("host"),
        "{}",
        out.events[1].reason
    );
    // Invalid answers are not retried: one call each.
    assert_eq!((a.hits(), o.hits(), l.hits()), (1, 1, 1));
    // The offline planner made the plan; the rejected answers' spend is counted.
    assert_eq!(out.plan.provider, "offline");
    assert_eq!(out.plan.steps[0].parameters["host"], "nas.lan");
    assert_eq!(out.plan.steps[0].parameters["port"], 8080);
    let billed = (1000.0 * 3.0 + 100.0 * 15.0 + 1000.0 * 2.5 + 100.0 * 10.0) / 1e6;
    assert!(
        (out.usage.llm_cost_usd - billed).abs() < 1e-9,
        "{}",
        out.usage.llm_cost_usd
    );
    assert!((out.plan.llm_cost_usd - billed).abs() < 1e-9);
    assert_eq!(
        (out.usage.input_tokens, out.usage.output_tokens),
        (3000, 300)
    );
    assert_eq!(out.events[0].input_tokens, 1000);

    // An offline plan is not cached: the LLMs get their chance again.
    planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(a.hits(), 2);
}

#[tokio::test]
async fn a_later_provider_plans_after_an_invalid_answer() {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, "I cannot help", 10, 10)],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &good_plan(), 10, 10)],
    )
    .await;
    let (_d, _s, planner) =
        planner(&config(Some(a.base_url()), Some(o.base_url()), None), true).await;
    let out = planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (out.plan.provider.as_str(), out.plan.model.as_str()),
        ("openai", "gpt-test")
    );
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.events[0].code, ErrorCode::LlmInvalidResponse);
}

#[tokio::test]
async fn rate_limited_then_success() {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![
            Reply::error(
                Wire::Anthropic,
                429,
                "rate_limit_error",
                "Number of requests has exceeded your rate limit",
            )
            .header("retry-after", "1"),
            Reply::text(Wire::Anthropic, &good_plan(), 10, 10),
        ],
    )
    .await;
    let (_d, store, planner) = planner(&config(Some(a.base_url()), None, None), true).await;
    let out = planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(out.plan.provider, "anthropic");
    assert!(out.events.is_empty());
    assert_eq!(a.hits(), 2);
    let spend = store.llm_spend(&current_month()).await.unwrap();
    assert_eq!(
        spend
            .iter()
            .find(|s| s.provider == "anthropic")
            .unwrap()
            .reserved_micros,
        0
    );
}

#[tokio::test]
async fn server_errors_fall_back_to_the_next_provider() {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::error(
            Wire::Anthropic,
            500,
            "api_error",
            "Internal server error",
        )],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &good_plan(), 10, 10)],
    )
    .await;
    let (_d, _s, planner) =
        planner(&config(Some(a.base_url()), Some(o.base_url()), None), true).await;
    let out = planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(out.plan.provider, "openai");
    assert_eq!(a.hits(), 2, "retried once (max_attempts 2), then fell back");
    assert_eq!(out.events[0].provider, "anthropic");
    assert_eq!(out.events[0].code, ErrorCode::LlmUnavailable);
    assert!(
        out.events[0].reason.contains("api_error"),
        "{}",
        out.events[0].reason
    );
}

#[tokio::test]
async fn an_exhausted_budget_falls_back() {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, &good_plan(), 10, 10)],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &good_plan(), 10, 10)],
    )
    .await;
    let mut cfg = config(Some(a.base_url()), Some(o.base_url()), None);
    cfg.anthropic.as_mut().unwrap().monthly_budget_usd = Some(0.001);
    let (_d, _s, planner) = planner(&cfg, true).await;
    let out = planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(out.plan.provider, "openai");
    assert_eq!(a.hits(), 0);
    let e = &out.events[0];
    assert_eq!(
        (e.provider.as_str(), e.code),
        ("anthropic", ErrorCode::LlmBudgetExhausted)
    );
    assert!(
        e.reason.contains("budget $0.001") && e.reason.contains("spent $0.00"),
        "{}",
        e.reason
    );
}

#[tokio::test]
async fn all_down_plans_offline_and_says_what_it_could_not_do() {
    let cfg = config(
        Some(dead_url().await),
        Some(format!("{}/v1", dead_url().await)),
        Some(dead_url().await),
    );
    let (_d, _s, planner) = planner(&cfg, true).await;
    let out = planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(out.plan.provider, "offline");
    assert_eq!(out.usage.provider, "offline");
    let codes: Vec<_> = out.events.iter().map(|e| e.code).collect();
    assert_eq!(codes, vec![ErrorCode::LlmUnavailable; 3]);

    let e = planner
        .plan(
            &fixture_catalog(),
            "deploy uptime kuma",
            &PlanOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NoPlan);
    assert_eq!(e.events.len(), 4);
    let last = e.events.last().unwrap();
    assert_eq!(
        (last.provider.as_str(), last.code),
        ("offline", ErrorCode::NoPlan)
    );
    assert!(e.message.contains("`host`"), "{}", e.message);

    let e = planner
        .plan(&fixture_catalog(), "   ", &PlanOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NoPlan);
}

#[tokio::test]
async fn the_circuit_opens_after_repeated_failures() {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::error(
            Wire::Anthropic,
            529,
            "overloaded_error",
            "Overloaded",
        )],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &good_plan(), 10, 10)],
    )
    .await;
    let mut cfg = config(Some(a.base_url()), Some(o.base_url()), None);
    cfg.circuit.failure_threshold = 2;
    let (_d, _s, planner) = planner(&cfg, false).await;
    for _ in 0..2 {
        let out = planner
            .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
            .await
            .unwrap();
        assert_eq!(out.events[0].code, ErrorCode::LlmUnavailable);
    }
    assert_eq!(a.hits(), 4);
    let out = planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(out.plan.provider, "openai");
    assert_eq!(
        out.events[0].code,
        ErrorCode::CircuitOpen,
        "{:?}",
        out.events
    );
    assert_eq!(a.hits(), 4, "an open circuit makes no call");
}

#[tokio::test]
async fn the_order_decides() {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, &good_plan(), 10, 10)],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &good_plan(), 10, 10)],
    )
    .await;
    let mut cfg = config(Some(a.base_url()), Some(o.base_url()), None);
    cfg.order = chiffon_core::llm::router::parse_order("openai,claude,ollama").unwrap();
    let (_d, store, planner) = planner(&cfg, false).await;
    assert_eq!(
        planner.router().names(),
        vec!["openai", "anthropic", "offline"]
    );
    let out = planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(out.plan.provider, "openai");

    cfg.order = vec!["offline".into(), "anthropic".into()];
    let offline_first = Planner::new(
        Router::from_config(&cfg, store.clone()).unwrap(),
        store.clone(),
        PlannerConfig::default(),
    );
    let out = offline_first
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(out.plan.provider, "offline");
    assert_eq!(a.hits(), 0);

    cfg.order = vec!["anthropic".into()];
    cfg.offline = false;
    assert_eq!(
        Router::from_config(&cfg, store.clone()).unwrap().names(),
        vec!["anthropic"]
    );
}

// ---- hostile answers ----

/// Each provider in turn answers `answers[i]`; every answer must be refused as an invalid
/// response with a reason naming `needles[i]`, and the offline planner plans instead.
async fn hostile_answers_fall_back(answers: [String; 3], needles: [&str; 3]) {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, &answers[0], 100, 10)],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &answers[1], 100, 10)],
    )
    .await;
    let l = MockLlm::start(
        Wire::Ollama,
        vec![Reply::text(Wire::Ollama, &answers[2], 100, 10)],
    )
    .await;
    let (_d, _s, planner) = planner(
        &config(Some(a.base_url()), Some(o.base_url()), Some(l.base_url())),
        true,
    )
    .await;
    let out = planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(out.plan.provider, "offline");
    let got: Vec<_> = out
        .events
        .iter()
        .map(|e| (e.provider.as_str(), e.code))
        .collect();
    assert_eq!(
        got,
        vec![
            ("anthropic", ErrorCode::LlmInvalidResponse),
            ("openai", ErrorCode::LlmInvalidResponse),
            ("ollama", ErrorCode::LlmInvalidResponse),
        ]
    );
    for (e, needle) in out.events.iter().zip(needles) {
        assert!(e.reason.contains(needle), "{needle}: {}", e.reason);
        assert!(!e.reason.contains('\0'), "{:?}", e.reason);
        assert!(e.reason.len() < 600, "{}", e.reason.len());
    }
    assert_eq!((a.hits(), o.hits(), l.hits()), (1, 1, 1));
}

fn kuma_step(host: &str) -> serde_json::Value {
    json!({"action": "deploy_kuma", "parameters": {"host": host, "port": 8080}, "reason": "x"})
}

#[tokio::test]
async fn nul_characters_make_an_answer_invalid() {
    let summary =
        json!({"summary": "deploy\u{0} kuma", "steps": [kuma_step("nas.lan")], "risks": []});
    let action = plan_answer(
        json!([{"action": "deploy_kuma\u{0}", "parameters": {"host": "nas.lan"}, "reason": "x"}]),
    );
    let parameter = plan_answer(json!([{
        "action": "write_file",
        "parameters": {"path": "/tmp/x", "content": "line\u{0}"},
        "reason": "x"
    }]));
    hostile_answers_fall_back(
        [summary.to_string(), action, parameter],
        [
            "the answer.summary contains a NUL",
            "the answer.steps[0].action contains a NUL",
            "the answer.steps[0].parameters.content contains a NUL",
        ],
    )
    .await;
    // A raw NUL (not an escape) and one in a key are refused as well.
    let raw = format!("{}\u{0}", good_plan());
    let key = plan_answer(
        json!([{"action": "deploy_kuma", "parameters": {"host\u{0}": "nas.lan"}, "reason": "x"}]),
    );
    let risk = json!({"summary": "s", "steps": [kuma_step("nas.lan")], "risks": ["ok", "\u{0}"]});
    hostile_answers_fall_back(
        [raw, key, risk.to_string()],
        [
            "the answer contains a NUL",
            "(a key) contains a NUL",
            "the answer.risks[1] contains a NUL",
        ],
    )
    .await;
}

#[tokio::test]
async fn oversized_answers_are_invalid() {
    use chiffon_core::planner::parse::{MAX_PARAMETER_CHARS, MAX_STEPS, MAX_SUMMARY_CHARS};
    let long_summary = json!({
        "summary": "s".repeat(MAX_SUMMARY_CHARS + 1),
        "steps": [kuma_step("nas.lan")],
        "risks": []
    });
    let many_steps = plan_answer(serde_json::Value::Array(
        (0..=MAX_STEPS).map(|_| kuma_step("nas.lan")).collect(),
    ));
    let long_parameter = plan_answer(json!([{
        "action": "write_file",
        "parameters": {"path": "/tmp/x", "content": "c".repeat(MAX_PARAMETER_CHARS + 1)},
        "reason": "x"
    }]));
    hostile_answers_fall_back(
        [long_summary.to_string(), many_steps, long_parameter],
        [
            "summary has 501 characters, more than 500",
            "the plan has 21 steps, more than 20",
            "parameter `content` has 8193 characters, more than 8192",
        ],
    )
    .await;
    // Limits hold at their edge: the largest valid plan is accepted.
    let at_limit = json!({
        "summary": "s".repeat(MAX_SUMMARY_CHARS),
        "steps": (0..MAX_STEPS).map(|_| kuma_step("nas.lan")).collect::<Vec<_>>(),
        "risks": []
    });
    let plan = chiffon_core::planner::parse::parse_plan(&at_limit.to_string(), &fixture_catalog())
        .unwrap();
    assert_eq!(plan.steps.len(), MAX_STEPS);
}

fn good_plan_value() -> serde_json::Value {
    serde_json::from_str(&good_plan()).unwrap()
}

async fn plan_default(
    planner: &Planner,
) -> Result<chiffon_core::planner::PlanOutcome, chiffon_core::planner::PlanError> {
    planner
        .plan(&fixture_catalog(), TEXT, &PlanOptions::default())
        .await
}

#[tokio::test]
async fn anthropic_plans_through_the_submit_plan_tool_at_cache_prices() {
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::tool_use(
            "submit_plan",
            good_plan_value(),
            100,
            3000,
            0,
            300,
        )],
    )
    .await;
    let (_d, store, planner) = planner(&config(Some(a.base_url()), None, None), false).await;
    let out = plan_default(&planner).await.unwrap();
    assert_eq!(out.plan.provider, "anthropic");
    assert_eq!(out.plan.steps[0].action, "deploy_kuma");
    assert_eq!(out.plan.steps[0].parameters["version"], "latest");
    assert_eq!(out.usage.input_tokens, 3100);
    // 100 in at $3, 3000 written to the cache at $3.75, 300 out at $15 per million.
    let spend = store.llm_spend(&current_month()).await.unwrap();
    let sp = spend.iter().find(|s| s.provider == "anthropic").unwrap();
    assert_eq!(
        (sp.spent_micros, sp.reserved_micros),
        (300 + 11_250 + 4_500, 0)
    );
    assert!((out.plan.llm_cost_usd - 0.01605).abs() < 1e-9);

    let body = &a.bodies()[0];
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": "submit_plan"})
    );
    let schema = &body["tools"][0]["input_schema"];
    assert_eq!(schema["type"], "object");
    let variants = schema["properties"]["steps"]["items"]["anyOf"]
        .as_array()
        .unwrap();
    assert_eq!(variants.len(), fixture_catalog().actions.len());
    assert!(variants
        .iter()
        .any(|v| v["properties"]["action"]["enum"] == json!(["deploy_kuma"])));
    assert_eq!(
        body["system"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
}

#[tokio::test]
async fn openai_plans_through_a_strict_json_schema() {
    // Strict mode answers every property: `null` for the ones left to their default.
    let answer = json!({
        "summary": "deploy uptime kuma on the nas",
        "steps": [{"action": "deploy_kuma", "parameters": {"host": "nas.lan", "port": 8080, "version": null}, "reason": "r"}],
        "risks": [],
        "refusal": null
    });
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &answer.to_string(), 100, 50)],
    )
    .await;
    let (_d, _store, planner) = planner(&config(None, Some(o.base_url()), None), false).await;
    let out = plan_default(&planner).await.unwrap();
    assert_eq!(out.plan.provider, "openai");
    assert_eq!(out.plan.steps[0].parameters["version"], "latest");
    assert_eq!(out.plan.steps[0].parameters["port"], 8080);
    // The mock checks strict mode's rules on the catalog's schema: one call, accepted.
    assert_eq!(o.hits(), 1);
    let rf = &o.bodies()[0]["response_format"];
    assert_eq!(rf["type"], "json_schema");
    assert_eq!(rf["json_schema"]["name"], "submit_plan");
    assert_eq!(rf["json_schema"]["strict"], true);
    assert_eq!(
        rf["json_schema"]["schema"]["required"],
        json!(["summary", "steps", "risks", "refusal"])
    );
}

#[tokio::test]
async fn ollama_plans_through_a_format_schema() {
    let l = MockLlm::start(
        Wire::Ollama,
        vec![Reply::text(Wire::Ollama, &good_plan(), 100, 50)],
    )
    .await;
    let (_d, _store, planner) = planner(&config(None, None, Some(l.base_url())), false).await;
    let out = plan_default(&planner).await.unwrap();
    assert_eq!(out.plan.provider, "ollama");
    assert_eq!(l.hits(), 1);
    let format = &l.bodies()[0]["format"];
    assert_eq!(format["type"], "object");
    assert!(format["properties"]["steps"]["items"]["anyOf"].is_array());
}

#[tokio::test]
async fn a_refusal_ends_planning_and_the_offline_planner_does_not_guess() {
    let refusal = json!({
        "summary": "declined",
        "steps": [],
        "risks": [],
        "refusal": "the catalog has nothing that wipes disks"
    });
    let a = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::tool_use("submit_plan", refusal, 100, 0, 0, 20)],
    )
    .await;
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &good_plan(), 10, 10)],
    )
    .await;
    let cfg = config(Some(a.base_url()), Some(o.base_url()), None);
    assert!(cfg.offline);
    let (_d, store, first) = planner(&cfg, true).await;
    // The text would plan offline (it names kuma): the refusal still stands.
    let e = plan_default(&first).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::LlmRefused);
    assert!(
        e.message
            .contains("the catalog has nothing that wipes disks"),
        "{}",
        e.message
    );
    assert!(e.message.contains("anthropic"), "{}", e.message);
    assert_eq!(o.hits(), 0, "no other provider is asked");
    let last = e.events.last().unwrap();
    assert_eq!(
        (last.provider.as_str(), last.code),
        ("anthropic", ErrorCode::LlmRefused)
    );
    assert_eq!(e.events.len(), 1);
    // The refused call was billed and is counted.
    assert!(last.cost_usd > 0.0);
    let spend = store.llm_spend(&current_month()).await.unwrap();
    assert_eq!(
        spend
            .iter()
            .find(|s| s.provider == "anthropic")
            .unwrap()
            .spent_micros,
        600
    );
    // Not cached, not held against the provider: asked again, it is called again.
    let _ = plan_default(&first).await.unwrap_err();
    assert_eq!(a.hits(), 2);

    // OpenAI's own refusal field is a refusal too.
    let o = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::openai_refusal(
            "I'm sorry, I can't assist with that.",
            10,
            5,
        )],
    )
    .await;
    let (_d, _store, planner) = planner(&config(None, Some(o.base_url()), None), false).await;
    let e = plan_default(&planner).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::LlmRefused);
    assert!(e.message.contains("I can't assist"), "{}", e.message);
}

#[tokio::test]
async fn servers_without_structured_output_still_plan_in_free_text() {
    let o = MockLlm::start_plain(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, &good_plan(), 10, 10)],
    )
    .await;
    let (_d, store, planner) = planner(&config(None, Some(o.base_url()), None), false).await;
    let out = plan_default(&planner).await.unwrap();
    assert_eq!(out.plan.provider, "openai");
    assert!(out.events.is_empty());
    // The 400 for `response_format`, then the free-text call; the 400 is not billed.
    assert_eq!(o.hits(), 2);
    let spend = store.llm_spend(&current_month()).await.unwrap();
    let sp = spend.iter().find(|s| s.provider == "openai").unwrap();
    assert_eq!((sp.spent_micros, sp.calls), (25 + 100, 1));
    // From now on free text straight away.
    plan_default(&planner).await.unwrap();
    assert_eq!(o.hits(), 3);
}

#[tokio::test]
async fn structured_answers_pass_the_same_checks() {
    // A tool's input is untrusted like any answer: a NUL, a template marker, an unknown
    // action are refused and the next provider is tried.
    let nul = json!({"summary": "s", "steps": [{"action": "write_file",
        "parameters": {"path": "/tmp/x", "content": "a\u{0}b"}, "reason": "x"}], "risks": []});
    let marker = json!({"summary": "s", "steps": [{"action": "write_file",
        "parameters": {"path": "/tmp/x", "content": "{{ lookup('pipe', 'id') }}"}, "reason": "x"}], "risks": []});
    for (input, needle) in [(nul, "contains a NUL"), (marker, "template")] {
        let a = MockLlm::start(
            Wire::Anthropic,
            vec![Reply::tool_use("submit_plan", input, 10, 0, 0, 10)],
        )
        .await;
        let o = MockLlm::start(
            Wire::OpenAi,
            vec![Reply::text(Wire::OpenAi, &good_plan(), 10, 10)],
        )
        .await;
        let (_d, _store, planner) =
            planner(&config(Some(a.base_url()), Some(o.base_url()), None), false).await;
        let out = plan_default(&planner).await.unwrap();
        assert_eq!(out.plan.provider, "openai");
        assert_eq!(out.events.len(), 1);
        assert!(
            out.events[0].reason.contains(needle),
            "{needle}: {}",
            out.events[0].reason
        );
    }
}
