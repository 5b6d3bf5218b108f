//! The three providers against local servers speaking their wire formats, and the
//! retry, circuit-breaker and fallback wrappers (no store needed).

mod llm_support;

use std::time::Duration;

use chiffon_core::llm::*;
use chiffon_protocol::ErrorCode;
use llm_support::*;
use serde_json::json;

fn anthropic(url: &str) -> AnthropicProvider {
    AnthropicProvider::new(&AnthropicConfig {
        base_url: url.into(),
        api_key: KEY.into(),
        model: "claude-test".into(),
        ..Default::default()
    })
    .unwrap()
}

fn openai(url: &str) -> OpenAiProvider {
    OpenAiProvider::new(&OpenAiConfig {
        base_url: url.into(),
        api_key: KEY.into(),
        model: "gpt-test".into(),
        ..Default::default()
    })
    .unwrap()
}

fn ollama(url: &str) -> OllamaProvider {
    OllamaProvider::new(&OllamaConfig {
        host: url.into(),
        model: "llama-test".into(),
        ..Default::default()
    })
    .unwrap()
}

fn quick_retry(attempts: u32) -> RetryConfig {
    RetryConfig {
        max_attempts: attempts,
        initial_backoff_ms: 10,
        max_backoff_ms: 50,
        max_retry_after_ms: 5_000,
    }
}

fn request() -> CompletionRequest {
    let mut r = CompletionRequest::new("you are a test", "say hi");
    r.max_tokens = 100;
    r
}

#[tokio::test]
async fn anthropic_success_speaks_messages_api() {
    let s = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, "hi", 1000, 200)],
    )
    .await;
    let p = anthropic(&s.base_url());
    let c = p.complete(request()).await.unwrap();
    assert_eq!(c.text, "hi");
    assert_eq!((c.input_tokens, c.output_tokens), (1000, 200));
    assert_eq!(c.model, "claude-test");
    // $3 / $15 per million tokens by default.
    assert_eq!(c.cost_micros, 3000 + 3000);
    let body = &s.bodies()[0];
    // The system prompt is a text block marked for the prompt cache.
    assert_eq!(
        body["system"],
        json!([{"type": "text", "text": "you are a test", "cache_control": {"type": "ephemeral"}}])
    );
    assert!(body.get("tools").is_none(), "no schema asked, no tools");
    assert_eq!(body["max_tokens"], 100);
    assert_eq!(body["messages"][0]["role"], "user");
    assert_eq!(body["messages"][0]["content"], "say hi");
}

#[tokio::test]
async fn openai_success_speaks_chat_completions() {
    let s = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, "hello", 400, 100)],
    )
    .await;
    let c = openai(&s.base_url()).complete(request()).await.unwrap();
    assert_eq!(c.text, "hello");
    assert_eq!((c.input_tokens, c.output_tokens), (400, 100));
    assert_eq!(c.cost_micros, 1000 + 1000);
    let body = &s.bodies()[0];
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["content"], "say hi");
}

#[tokio::test]
async fn ollama_success_speaks_api_chat() {
    let s = MockLlm::start(Wire::Ollama, vec![Reply::text(Wire::Ollama, "hey", 30, 7)]).await;
    // OLLAMA_HOST without a scheme.
    let c = ollama(&s.addr.to_string())
        .complete(request())
        .await
        .unwrap();
    assert_eq!(c.text, "hey");
    assert_eq!((c.input_tokens, c.output_tokens), (30, 7));
    assert_eq!(c.cost_micros, 0);
    assert_eq!(s.bodies()[0]["options"]["num_predict"], 100);
}

#[tokio::test]
async fn errors_are_classified() {
    // Wrong key: the server answers 401 in Anthropic's error format.
    let s = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, "x", 1, 1)],
    )
    .await;
    let p = AnthropicProvider::new(&AnthropicConfig {
        base_url: s.base_url(),
        api_key: "wrong".into(),
        ..Default::default()
    })
    .unwrap();
    let e = p.complete(request()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmAuth, "{e}");
    assert!(!e.is_transient());
    assert!(e.to_string().contains("authentication_error"), "{e}");

    let s = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::error(
            Wire::Anthropic,
            529,
            "overloaded_error",
            "Overloaded",
        )],
    )
    .await;
    let e = anthropic(&s.base_url())
        .complete(request())
        .await
        .unwrap_err();
    assert!(matches!(e, LlmError::Http { status: 529, .. }), "{e}");
    assert!(e.is_transient());
    assert_eq!(e.code(), ErrorCode::LlmUnavailable);
    assert!(
        e.to_string().contains("overloaded_error: Overloaded"),
        "{e}"
    );

    let s = MockLlm::start(
        Wire::Ollama,
        vec![Reply::error(
            Wire::Ollama,
            404,
            "",
            "model 'nope' not found",
        )],
    )
    .await;
    let e = ollama(&s.base_url()).complete(request()).await.unwrap_err();
    assert!(matches!(e, LlmError::Http { status: 404, .. }), "{e}");
    assert!(!e.is_transient());
    assert!(e.to_string().contains("model 'nope' not found"));

    let s = MockLlm::start(
        Wire::OpenAi,
        vec![Reply {
            status: 200,
            headers: vec![],
            body: "<html>proxy error</html>".into(),
            delay: None,
        }],
    )
    .await;
    let e = openai(&s.base_url()).complete(request()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmInvalidResponse);
    assert!(matches!(&e, LlmError::InvalidResponse { raw, .. } if raw.contains("proxy error")));

    let e = openai(&dead_url().await)
        .complete(request())
        .await
        .unwrap_err();
    assert!(matches!(e, LlmError::Connect(_)), "{e}");
    assert!(e.is_transient());

    let s = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::text(Wire::OpenAi, "late", 1, 1).delayed(Duration::from_secs(3))],
    )
    .await;
    let p = openai(&s.base_url())
        .with_timeout(Duration::from_secs(1), Duration::from_millis(200))
        .unwrap();
    let e = p.complete(request()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmTimeout, "{e}");
    assert!(e.is_transient());
}

#[tokio::test]
async fn rate_limited_then_success_honours_retry_after() {
    let s = MockLlm::start(
        Wire::Anthropic,
        vec![
            Reply::error(Wire::Anthropic, 429, "rate_limit_error", "slow down")
                .header("retry-after", "1"),
            Reply::text(Wire::Anthropic, "ok", 10, 5),
        ],
    )
    .await;
    let p = Retry::new(anthropic(&s.base_url()), quick_retry(3));
    let started = std::time::Instant::now();
    let c = p.complete(request()).await.unwrap();
    assert_eq!(c.text, "ok");
    assert_eq!(s.hits(), 2);
    // It waited for retry-after (1 s), not for its own 10 ms backoff.
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A retry-after longer than the configured maximum is not waited for.
    let s = MockLlm::start(
        Wire::Anthropic,
        vec![
            Reply::error(Wire::Anthropic, 429, "rate_limit_error", "slow down")
                .header("retry-after", "3600"),
        ],
    )
    .await;
    let e = Retry::new(anthropic(&s.base_url()), quick_retry(3))
        .complete(request())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmRateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3600)));
    assert_eq!(s.hits(), 1);
}

#[tokio::test]
async fn retries_are_bounded_and_skip_permanent_errors() {
    let s = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::error(
            Wire::OpenAi,
            503,
            "server_error",
            "unavailable",
        )],
    )
    .await;
    let e = Retry::new(openai(&s.base_url()), quick_retry(3))
        .complete(request())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::LlmUnavailable);
    assert_eq!(s.hits(), 3);

    let s = MockLlm::start(
        Wire::OpenAi,
        vec![Reply::error(
            Wire::OpenAi,
            400,
            "invalid_request_error",
            "bad model",
        )],
    )
    .await;
    Retry::new(openai(&s.base_url()), quick_retry(3))
        .complete(request())
        .await
        .unwrap_err();
    assert_eq!(s.hits(), 1, "a permanent error is not retried");
}

#[tokio::test]
async fn circuit_opens_after_consecutive_failures_and_recovers() {
    let s = MockLlm::start(
        Wire::OpenAi,
        vec![
            Reply::error(Wire::OpenAi, 500, "server_error", "boom"),
            Reply::error(Wire::OpenAi, 500, "server_error", "boom"),
            Reply::error(Wire::OpenAi, 500, "server_error", "boom"),
            Reply::text(Wire::OpenAi, "back", 1, 1),
        ],
    )
    .await;
    let cb = CircuitBreaker::new(
        openai(&s.base_url()),
        CircuitConfig {
            failure_threshold: 3,
            cooldown_ms: 300,
        },
    );
    for _ in 0..3 {
        let e = cb.complete(request()).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::LlmUnavailable);
    }
    assert!(cb.is_open());
    let e = cb.complete(request()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::CircuitOpen, "{e}");
    assert!(e.code().is_transient());
    assert_eq!(s.hits(), 3, "an open circuit does not call the provider");
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Half-open: one trial call goes through and closes the circuit.
    assert_eq!(cb.complete(request()).await.unwrap().text, "back");
    assert!(!cb.is_open());
    assert_eq!(s.hits(), 4);
}

fn structured_request() -> CompletionRequest {
    let schema = json!({
        "type": "object",
        "properties": {"a": {"type": "integer"}, "note": {"type": "string", "default": "x"}},
        "required": ["a"],
        "additionalProperties": false,
    });
    let strict = json!({
        "type": "object",
        "properties": {"a": {"type": "integer"}, "note": {"type": ["string", "null"]}},
        "required": ["a", "note"],
        "additionalProperties": false,
    });
    CompletionRequest {
        output: Some(OutputSchema {
            name: "submit_answer".into(),
            description: "the answer".into(),
            schema,
            strict_schema: strict,
        }),
        ..request()
    }
}

#[tokio::test]
async fn anthropic_structured_output_is_a_forced_tool_and_the_cache_is_priced() {
    let s = MockLlm::start(
        Wire::Anthropic,
        vec![
            // First call writes the cache, the second reads it.
            Reply::tool_use("submit_answer", json!({"a": 1}), 100, 2000, 0, 50),
            Reply::tool_use("submit_answer", json!({"a": 2}), 100, 0, 2000, 50),
        ],
    )
    .await;
    let p = anthropic(&s.base_url());
    let req = structured_request();
    let c = p.complete(req.clone()).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&c.text).unwrap(),
        json!({"a": 1})
    );
    assert_eq!(c.refusal, None);
    // Every prompt token counts, cached or not.
    assert_eq!((c.input_tokens, c.output_tokens), (2100, 50));
    // $3 input, $3.75 cache write (1.25x), $15 output per million tokens.
    assert_eq!(c.cost_micros, 300 + 7500 + 750);
    let c = p.complete(req.clone()).await.unwrap();
    assert_eq!(c.text, r#"{"a":2}"#);
    // A cache read is $0.30 (0.1x).
    assert_eq!(c.cost_micros, 300 + 600 + 750);
    let body = &s.bodies()[0];
    assert_eq!(body["tools"][0]["name"], "submit_answer");
    assert_eq!(
        body["tools"][0]["input_schema"],
        req.output.as_ref().unwrap().schema
    );
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": "submit_answer"})
    );
    assert_eq!(
        body["system"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    // The reservation's worst case prices the prompt (schema included) as a cache write.
    let pricing = p.pricing();
    assert_eq!(pricing.cache_write_usd_per_mtok, 3.75);
    let prompt = chiffon_core::llm::pricing::estimate_tokens(req.prompt_len())
        + chiffon_core::llm::pricing::STRUCTURED_OUTPUT_OVERHEAD_TOKENS;
    assert!(pricing.worst_case_micros(&req) >= pricing.cost_micros_cached(0, prompt, 0, 100));
    // A text answer to a tool request is still taken (the free-text fallback).
    let s = MockLlm::start(
        Wire::Anthropic,
        vec![Reply::text(Wire::Anthropic, r#"{"a":3}"#, 10, 5)],
    )
    .await;
    let c = anthropic(&s.base_url())
        .complete(structured_request())
        .await
        .unwrap();
    assert_eq!(c.text, r#"{"a":3}"#);
}

#[tokio::test]
async fn openai_structured_output_is_a_strict_json_schema_and_refusals_come_through() {
    let s = MockLlm::start(
        Wire::OpenAi,
        vec![
            Reply::text(Wire::OpenAi, r#"{"a":1,"note":null}"#, 400, 100),
            Reply::openai_refusal("I can't help with that.", 400, 10),
        ],
    )
    .await;
    let p = openai(&s.base_url());
    let req = structured_request();
    let c = p.complete(req.clone()).await.unwrap();
    assert_eq!(c.text, r#"{"a":1,"note":null}"#);
    let body = &s.bodies()[0];
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(
        body["response_format"]["json_schema"]["name"],
        "submit_answer"
    );
    assert_eq!(body["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        body["response_format"]["json_schema"]["schema"],
        req.output.as_ref().unwrap().strict_schema
    );
    let c = p.complete(req).await.unwrap();
    assert_eq!(c.refusal.as_deref(), Some("I can't help with that."));
    assert_eq!(c.text, "");
    assert_eq!(c.cost_micros, 1000 + 100);
    // The mock enforces strict mode's rules as the API does: a schema that breaks them is a
    // 400 naming `response_format`, after which the call is made again in free text.
    assert!(p.structured_output());
    let bad = CompletionRequest {
        output: structured_request().output.map(|mut o| {
            o.strict_schema = o.schema.clone();
            o
        }),
        ..request()
    };
    p.complete(bad).await.unwrap();
    assert_eq!(s.hits(), 4);
    assert!(s.bodies()[2].get("response_format").is_some());
    assert!(s.bodies()[3].get("response_format").is_none());
    assert!(!p.structured_output());
    let strict = llm_support::strict_schema_error(&structured_request().output.unwrap().schema, "");
    assert!(strict.unwrap().contains("Missing 'note'"));
}

#[tokio::test]
async fn ollama_structured_output_is_a_format_schema() {
    let s = MockLlm::start(
        Wire::Ollama,
        vec![Reply::text(Wire::Ollama, r#"{"a":1}"#, 30, 7)],
    )
    .await;
    let req = structured_request();
    let c = ollama(&s.base_url()).complete(req.clone()).await.unwrap();
    assert_eq!(c.text, r#"{"a":1}"#);
    assert_eq!(s.bodies()[0]["format"], req.output.as_ref().unwrap().schema);
    assert_eq!(s.bodies()[0]["stream"], false);
}

#[tokio::test]
async fn servers_without_structured_output_get_free_text_and_it_is_remembered() {
    for (wire, field) in [
        (Wire::Anthropic, "tools"),
        (Wire::OpenAi, "response_format"),
        (Wire::Ollama, "format"),
    ] {
        let s = MockLlm::start_plain(wire, vec![Reply::text(wire, r#"{"a":1}"#, 10, 5)]).await;
        let p: Box<dyn LlmProvider> = match wire {
            Wire::Anthropic => Box::new(anthropic(&s.base_url())),
            Wire::OpenAi => Box::new(openai(&s.base_url())),
            Wire::Ollama => Box::new(ollama(&s.base_url())),
        };
        let c = p.complete(structured_request()).await.unwrap();
        assert_eq!(c.text, r#"{"a":1}"#, "{wire:?}");
        // Rejected with a 400, then asked again for free text.
        assert_eq!(s.hits(), 2, "{wire:?}");
        let bodies = s.bodies();
        assert!(bodies[0].get(field).is_some(), "{wire:?}");
        assert!(bodies[1].get(field).is_none(), "{wire:?}");
        // The provider remembers: the next call goes straight to free text.
        p.complete(structured_request()).await.unwrap();
        assert_eq!(s.hits(), 3, "{wire:?}");
        assert!(s.bodies()[2].get(field).is_none(), "{wire:?}");
        if wire == Wire::Anthropic {
            assert!(
                s.bodies()[2]["system"].is_string(),
                "no cache_control either"
            );
        }
    }
}
