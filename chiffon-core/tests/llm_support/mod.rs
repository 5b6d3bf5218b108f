//! Local HTTP servers that speak the three LLM wire formats (and their errors), for the
//! provider, router and planner tests. Each server checks what a real one would (path,
//! auth headers, body shape, and the structured-output fields: Anthropic `tools`,
//! `tool_choice` and `cache_control` blocks, OpenAI `response_format` with strict mode's
//! schema rules, Ollama `format`) and answers a scripted sequence of replies (the last one
//! repeats). [`MockLlm::start_plain`] is a server that knows none of those fields and
//! answers them with the 400 such a server sends.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{json, Value};

pub const KEY: &str = "test-key";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Anthropic,
    OpenAi,
    Ollama,
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Option<Duration>,
}

impl Reply {
    /// A successful completion in the wire's format.
    pub fn text(wire: Wire, text: &str, input_tokens: u64, output_tokens: u64) -> Reply {
        let body = match wire {
            Wire::Anthropic => json!({
                "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-test",
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
            }),
            Wire::OpenAi => json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-test",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}
            }),
            Wire::Ollama => json!({
                "model": "llama-test", "created_at": "2026-11-24T10:00:00Z",
                "message": {"role": "assistant", "content": text},
                "done": true, "done_reason": "stop", "total_duration": 1000,
                "prompt_eval_count": input_tokens, "eval_count": output_tokens
            }),
        };
        Reply {
            status: 200,
            headers: vec![],
            body: body.to_string(),
            delay: None,
        }
    }

    /// An error in the wire's format.
    pub fn error(wire: Wire, status: u16, kind: &str, message: &str) -> Reply {
        let body = match wire {
            Wire::Anthropic => {
                json!({"type": "error", "error": {"type": kind, "message": message}})
            }
            Wire::OpenAi => {
                json!({"error": {"message": message, "type": kind, "param": null, "code": kind}})
            }
            Wire::Ollama => json!({"error": message}),
        };
        Reply {
            status,
            headers: vec![],
            body: body.to_string(),
            delay: None,
        }
    }

    /// Anthropic: the answer as a `tool_use` block (what a forced tool produces), with
    /// prompt-cache usage.
    pub fn tool_use(
        tool: &str,
        input: Value,
        input_tokens: u64,
        cache_write: u64,
        cache_read: u64,
        output_tokens: u64,
    ) -> Reply {
        let body = json!({
            "id": "msg_02", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": tool, "input": input}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {
                "input_tokens": input_tokens, "output_tokens": output_tokens,
                "cache_creation_input_tokens": cache_write, "cache_read_input_tokens": cache_read
            }
        });
        Reply {
            status: 200,
            headers: vec![],
            body: body.to_string(),
            delay: None,
        }
    }

    /// OpenAI: a structured-output refusal (`content` null, `refusal` set).
    pub fn openai_refusal(reason: &str, input_tokens: u64, output_tokens: u64) -> Reply {
        let body = json!({
            "id": "chatcmpl-2", "object": "chat.completion", "created": 1, "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": reason}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}
        });
        Reply {
            status: 200,
            headers: vec![],
            body: body.to_string(),
            delay: None,
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn delayed(mut self, d: Duration) -> Reply {
        self.delay = Some(d);
        self
    }
}

struct Inner {
    wire: Wire,
    /// The API key the server expects.
    key: String,
    replies: Mutex<VecDeque<Reply>>,
    hits: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
    /// Knows the structured-output fields (else answers them with a 400).
    structured: bool,
}

/// A running mock server.
pub struct MockLlm {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockLlm {
    pub async fn start(wire: Wire, replies: Vec<Reply>) -> MockLlm {
        MockLlm::start_with_key(wire, KEY, replies).await
    }

    /// A server that expects `key` instead of [`KEY`].
    pub async fn start_with_key(wire: Wire, key: &str, replies: Vec<Reply>) -> MockLlm {
        MockLlm::start_inner(wire, key, replies, true).await
    }

    /// A server without structured output: a request with `tools`/`cache_control`
    /// (Anthropic), `response_format` (OpenAI) or a `format` schema (Ollama) gets the 400
    /// such a server answers.
    pub async fn start_plain(wire: Wire, replies: Vec<Reply>) -> MockLlm {
        MockLlm::start_inner(wire, KEY, replies, false).await
    }

    async fn start_inner(wire: Wire, key: &str, replies: Vec<Reply>, structured: bool) -> MockLlm {
        let inner = Arc::new(Inner {
            structured,
            wire,
            key: key.to_string(),
            replies: Mutex::new(replies.into()),
            hits: AtomicUsize::new(0),
            bodies: Mutex::new(Vec::new()),
        });
        let path = match wire {
            Wire::Anthropic => "/v1/messages",
            Wire::OpenAi => "/v1/chat/completions",
            Wire::Ollama => "/api/chat",
        };
        let app = axum::Router::new()
            .route(path, post(handle))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        MockLlm { addr, inner, task }
    }

    /// The base URL a provider config takes.
    pub fn base_url(&self) -> String {
        match self.inner.wire {
            Wire::OpenAi => format!("http://{}/v1", self.addr),
            _ => format!("http://{}", self.addr),
        }
    }

    /// Requests that reached the handler (also the rejected ones).
    pub fn hits(&self) -> usize {
        self.inner.hits.load(Ordering::SeqCst)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.inner.bodies.lock().unwrap().clone()
    }
}

/// OpenAI strict mode's rules, as the API enforces them before any generation: every
/// object lists all its properties in `required` and sets `additionalProperties: false`;
/// the root is an object, not `anyOf`; no `default`.
pub fn strict_schema_error(v: &Value, at: &str) -> Option<String> {
    let o = v.as_object()?;
    if let Some(props) = o.get("properties").and_then(Value::as_object) {
        let req: Vec<&str> = o
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(k) = props.keys().find(|k| !req.contains(&k.as_str())) {
            return Some(format!("In context=({at}), 'required' is required to be supplied and to be an array including every key in properties. Missing '{k}'."));
        }
        if o.get("additionalProperties") != Some(&json!(false)) {
            return Some(format!("In context=({at}), 'additionalProperties' is required to be supplied and to be false."));
        }
        for (k, p) in props {
            if let Some(e) = strict_schema_error(p, &format!("{at}, 'properties', '{k}'")) {
                return Some(e);
            }
        }
    }
    if o.contains_key("default") {
        return Some(format!("In context=({at}), 'default' is not permitted."));
    }
    for key in ["items", "anyOf"] {
        match o.get(key) {
            Some(Value::Array(a)) => {
                for (i, x) in a.iter().enumerate() {
                    if let Some(e) = strict_schema_error(x, &format!("{at}, '{key}', '{i}'")) {
                        return Some(e);
                    }
                }
            }
            Some(x) => {
                if let Some(e) = strict_schema_error(x, &format!("{at}, '{key}'")) {
                    return Some(e);
                }
            }
            None => {}
        }
    }
    None
}

fn check_structured(wire: Wire, structured: bool, body: &Value) -> Result<(), Reply> {
    let bad = |m: &str| Err(Reply::error(wire, 400, "invalid_request_error", m));
    match wire {
        Wire::Anthropic => {
            let system_blocks = body["system"].is_array();
            if !structured {
                if body.get("tools").is_some() {
                    return bad("tools: Extra inputs are not permitted");
                }
                if system_blocks
                    && body["system"]
                        .as_array()
                        .is_some_and(|b| b.iter().any(|b| b.get("cache_control").is_some()))
                {
                    return bad("system.0.cache_control: Extra inputs are not permitted");
                }
                return Ok(());
            }
            if system_blocks {
                let ok = body["system"].as_array().is_some_and(|b| {
                    b.iter().all(|b| {
                        b["type"] == "text"
                            && b["text"].is_string()
                            && (b.get("cache_control").is_none()
                                || b["cache_control"] == json!({"type": "ephemeral"}))
                    })
                });
                if !ok {
                    return bad("system: each block must be {type: text, text, cache_control?: {type: ephemeral}}");
                }
            }
            if let Some(tools) = body.get("tools") {
                let names: Vec<&str> = match tools.as_array() {
                    Some(t) if !t.is_empty() => t.iter().filter_map(|t| t["name"].as_str()).collect(),
                    _ => return bad("tools: Input should be a valid list"),
                };
                let ok = tools.as_array().unwrap().iter().all(|t| {
                    t["name"].as_str().is_some_and(|n| {
                        !n.is_empty()
                            && n.len() <= 64
                            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    }) && t["input_schema"]["type"] == "object"
                });
                if !ok {
                    return bad("tools.0.input_schema: Input tag does not match the expected type 'object'");
                }
                match &body["tool_choice"] {
                    Value::Null => {}
                    c if c["type"] == "tool" => {
                        if !c["name"].as_str().is_some_and(|n| names.contains(&n)) {
                            return bad("tool_choice.name: tool not found in tools");
                        }
                    }
                    c if c["type"] == "auto" || c["type"] == "any" || c["type"] == "none" => {}
                    _ => return bad("tool_choice: unknown type"),
                }
            } else if body.get("tool_choice").is_some() {
                return bad("tool_choice may only be specified while providing tools");
            }
        }
        Wire::OpenAi => {
            let Some(rf) = body.get("response_format") else {
                return Ok(());
            };
            if !structured {
                return Err(Reply::error(
                    wire,
                    400,
                    "invalid_request_error",
                    "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
                ));
            }
            match rf["type"].as_str() {
                Some("text") | Some("json_object") => {}
                Some("json_schema") => {
                    let js = &rf["json_schema"];
                    if !js["name"].as_str().is_some_and(|n| !n.is_empty() && n.len() <= 64) {
                        return bad("Missing required parameter: 'response_format.json_schema.name'.");
                    }
                    if js["schema"]["type"] != "object" {
                        return bad("Invalid schema for response_format: schema must be a JSON Schema of 'type: \"object\"'.");
                    }
                    if js["strict"] == json!(true) {
                        if let Some(e) = strict_schema_error(&js["schema"], "") {
                            let name = js["name"].as_str().unwrap_or("");
                            return bad(&format!("Invalid schema for response_format '{name}': {e}"));
                        }
                    }
                }
                _ => return bad("Invalid value for 'response_format.type'."),
            }
        }
        Wire::Ollama => match body.get("format") {
            None => {}
            Some(Value::String(f)) if f == "json" => {}
            Some(f) if structured && f["type"] == "object" => {}
            Some(_) if !structured => {
                return Err(Reply::error(
                    wire,
                    400,
                    "",
                    "json: cannot unmarshal object into Go struct field ChatRequest.format of type string",
                ))
            }
            Some(_) => return Err(Reply::error(wire, 400, "", "invalid format: expected \"json\" or a JSON schema")),
        },
    }
    Ok(())
}

fn check(wire: Wire, key: &str, headers: &HeaderMap, body: &Value) -> Result<(), Reply> {
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
    match wire {
        Wire::Anthropic => {
            if h("x-api-key") != key {
                return Err(Reply::error(
                    wire,
                    401,
                    "authentication_error",
                    "invalid x-api-key",
                ));
            }
            if h("anthropic-version") != "2023-06-01" {
                return Err(Reply::error(
                    wire,
                    400,
                    "invalid_request_error",
                    "anthropic-version header is required",
                ));
            }
            let ok = body["model"].is_string()
                && body["max_tokens"].is_u64()
                && body["messages"].as_array().is_some_and(|m| {
                    !m.is_empty()
                        && m.iter()
                            .all(|m| m["role"] == "user" || m["role"] == "assistant")
                })
                && (body.get("system").is_none()
                    || body["system"].is_string()
                    || body["system"].is_array());
            if !ok {
                return Err(Reply::error(wire, 400, "invalid_request_error", "bad body"));
            }
        }
        Wire::OpenAi => {
            if h("authorization") != format!("Bearer {key}") {
                return Err(Reply::error(
                    wire,
                    401,
                    "invalid_request_error",
                    "Incorrect API key provided",
                ));
            }
            let ok = body["model"].is_string()
                && body["messages"].as_array().is_some_and(|m| {
                    m.first().is_some_and(|f| f["role"] == "system")
                        && m.iter().all(|m| m["content"].is_string())
                });
            if !ok {
                return Err(Reply::error(wire, 400, "invalid_request_error", "bad body"));
            }
        }
        Wire::Ollama => {
            let ok = body["model"].is_string()
                && body["stream"] == json!(false)
                && body["messages"].as_array().is_some_and(|m| !m.is_empty());
            if !ok {
                return Err(Reply::error(
                    wire,
                    400,
                    "",
                    "bad body: stream must be false",
                ));
            }
        }
    }
    Ok(())
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    inner.hits.fetch_add(1, Ordering::SeqCst);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    inner.bodies.lock().unwrap().push(body.clone());
    let checked = check(inner.wire, &inner.key, &headers, &body)
        .and_then(|()| check_structured(inner.wire, inner.structured, &body));
    let reply = match checked {
        Err(r) => r,
        Ok(()) => {
            let mut q = inner.replies.lock().unwrap();
            if q.len() > 1 {
                q.pop_front().unwrap()
            } else {
                q.front().cloned().expect("no reply scripted")
            }
        }
    };
    if let Some(d) = reply.delay {
        tokio::time::sleep(d).await;
    }
    let mut resp = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (k, v) in reply.headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

/// A port nothing listens on (bound, then released).
pub async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

pub fn fixture_catalog() -> chiffon_core::catalog::Catalog {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/catalog");
    chiffon_core::catalog::Catalog::load(dir).unwrap()
}

/// A fresh SQLite store in a temporary folder (kept alive by the returned guard).
pub async fn sqlite_store() -> (tempfile::TempDir, Arc<dyn chiffon_core::store::Store>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = chiffon_core::store::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    (dir, store)
}

/// A plan answer as an LLM would write it.
pub fn plan_answer(steps: Value) -> String {
    json!({"summary": "deploy uptime kuma on the nas", "steps": steps, "risks": ["kuma restarts"]})
        .to_string()
}

/// A fresh PostgreSQL database (`chiffon_llm_<random>`) through
/// `CHIFFON_TEST_DATABASE_URL`, dropped with the guard. `None` after a loud skip line when
/// PostgreSQL is unreachable outside CI; under `CI=true` it fails.
pub struct PgDb {
    admin: String,
    name: String,
}

impl PgDb {
    pub async fn create() -> Option<PgDb> {
        use sqlx::Connection;
        let admin = std::env::var("CHIFFON_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let mut conn = match sqlx::PgConnection::connect(&admin).await {
            Ok(c) => c,
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("PostgreSQL unreachable at {admin} (CI=true: not skipping): {e}");
                }
                eprintln!("SKIPPED: PostgreSQL unreachable at {admin}: {e}");
                return None;
            }
        };
        let name = format!("chiffon_llm_{}", uuid::Uuid::new_v4().simple());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.ok();
        Some(PgDb { admin, name })
    }

    pub fn url(&self) -> String {
        let base = self.admin.split('?').next().unwrap_or(&self.admin);
        let host_start = base.find("://").map_or(0, |i| i + 3);
        let path_start = base[host_start..]
            .find('/')
            .map_or(base.len(), |i| host_start + i);
        format!("{}/{}", &base[..path_start], self.name)
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // A thread with its own runtime: Drop may run inside the test's runtime.
        let done = std::thread::spawn(move || -> Result<(), sqlx::Error> {
            use sqlx::Connection;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(sqlx::Error::Io)?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(done, Ok(Ok(()))) {
            eprintln!("warning: test database {} not dropped", self.name);
        }
    }
}
