//! Local HTTP servers that speak the three LLM wire formats (and their errors), for the
//! provider, router and planner tests. Each server checks what a real one would (path,
//! auth headers, body shape) and answers a scripted sequence of replies (the last one
//! repeats).
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
        let inner = Arc::new(Inner {
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
                && (body.get("system").is_none() || body["system"].is_string());
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
    let reply = match check(inner.wire, &inner.key, &headers, &body) {
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
