//! The axum application: [`router`] wires every route of CONTRACT.md's HTTP API with its
//! middleware (trace ids, the host and cross-site guard, auth, body limit, request tracing),
//! and [`openapi_document`] is the document generated from the handlers and completed for
//! the running configuration.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use chiffon_core::engine::Engine;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::auth::{self, Auth};
use crate::config::ServerConfig;
use crate::guard::{self, HostPolicy};
use crate::routes;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub auth: Arc<Auth>,
    pub server: ServerConfig,
    /// Ends long-lived responses (SSE) so a graceful shutdown does not wait for them.
    pub shutdown: CancellationToken,
    /// The hosts this server answers.
    pub hosts: Arc<HostPolicy>,
    /// `GET /openapi.json`, built once for this configuration.
    pub openapi: Arc<Value>,
    /// The web console's sessions.
    pub sessions: Arc<crate::ui::session::Sessions>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("engine", &self.engine)
            .field("auth", &self.auth.enabled())
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl AppState {
    /// Answers the loopback names and `server.allowed_hosts`; add the bind address with
    /// [`AppState::with_bind`].
    pub fn new(engine: Engine, auth: Auth, server: ServerConfig) -> Self {
        let openapi = Arc::new(openapi_document(auth.enabled(), &server));
        let sessions = Arc::new(crate::ui::session::Sessions::new(server.secure_cookies));
        AppState {
            sessions,
            engine,
            auth: Arc::new(auth),
            hosts: Arc::new(HostPolicy::new(None, &server.allowed_hosts)),
            server,
            shutdown: CancellationToken::new(),
            openapi,
        }
    }

    /// Event streams end when `token` is cancelled.
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// Also answers the host of the address the server listens on.
    pub fn with_bind(mut self, addr: Option<SocketAddr>) -> Self {
        self.hosts = Arc::new(HostPolicy::new(addr, &self.server.allowed_hosts));
        self
    }
}

/// The HTTP API, the web console ([`crate::ui`]) and the MCP server at `/mcp` ([`crate::mcp`]).
pub fn router(state: AppState) -> Router {
    // The MCP tools call the API in process, through the same layers, with the caller's token.
    let mcp = crate::mcp::service(
        build(state.clone(), None),
        &state.server,
        state.shutdown.clone(),
    );
    build(state, Some(mcp))
}

type McpService = rmcp::transport::streamable_http_server::StreamableHttpService<
    crate::mcp::ChiffonMcp<crate::mcp::InProcessApi>,
    rmcp::transport::streamable_http_server::session::never::NeverSessionManager,
>;

fn build(state: AppState, mcp: Option<McpService>) -> Router {
    let mut protected = Router::new()
        .route("/request", post(routes::submit))
        .route("/request/{id}", get(routes::get_request))
        .route("/approve", post(routes::approve))
        .route("/cancel/{id}", post(routes::cancel))
        .route("/requests", get(routes::list))
        .route("/request/{id}/events", get(routes::events))
        .route("/request/{id}/logs", get(routes::logs))
        .route("/agents", get(routes::agents))
        .route("/actions", get(routes::actions))
        .route("/costs", get(routes::costs))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi));
    if let Some(mcp) = mcp {
        // Not in the OpenAPI document: MCP is JSON-RPC, described by its own protocol.
        protected = protected.route_service("/mcp", mcp);
    }
    let protected = protected
        // `route_layer`: unknown routes answer 404 (5505) rather than 401.
        .route_layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/health", get(routes::health))
        .merge(protected)
        .merge(crate::ui::router(&state))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.server.body_limit_bytes))
        .layer(TraceLayer::new_for_http())
        // Before auth and on every route, /health and unknown routes included.
        .layer(axum::middleware::from_fn_with_state(
            state.hosts.clone(),
            guard::check,
        ))
        .layer(axum::middleware::from_fn(auth::trace_id))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Chiffon",
        description = "Orchestrated infrastructure automation: requests in plain words are planned as catalog actions, approved, executed by agents and audited. Errors are `{\"error\": {\"code\", \"message\", \"details\", \"trace_id\"}}`; send `x-trace-id` to choose the trace id. Every route answers 421 (5507) to a `Host` not on the server's allow-list, 403 (5508) to a cross-site browser write, and 405 (5509, with `Allow`) to a method it does not serve."
    ),
    paths(
        routes::submit,
        routes::get_request,
        routes::approve,
        routes::cancel,
        routes::health,
        routes::list,
        routes::events,
        routes::logs,
        routes::agents,
        routes::actions,
        routes::costs,
        routes::metrics,
        routes::openapi,
    ),
    tags(
        (name = "requests", description = "Submit, inspect, approve and cancel requests"),
        (name = "fleet", description = "Agents, the action catalog and LLM spend"),
        (name = "system", description = "Health, metrics and this document"),
    )
)]
struct ApiDoc;

/// The OpenAPI document of every route for a server without tokens and default limits.
pub fn openapi() -> Value {
    openapi_document(false, &ServerConfig::default())
}

/// The OpenAPI document of every route as this configuration serves them: the answers every
/// route shares (421 for a host not allowed, 403 for a cross-site write), `limit`'s maximum,
/// and, only when tokens are configured, the bearer scheme with 401/403 on every route but
/// `/health`.
pub fn openapi_document(auth: bool, server: &ServerConfig) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    let error = |description: &str| {
        json!({
            "description": description,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorResponse" } } }
        })
    };
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            let open = path == "/health";
            for (method, op) in item.iter_mut() {
                let writes = matches!(method.as_str(), "post" | "put" | "patch" | "delete");
                let Some(op) = op.as_object_mut() else {
                    continue;
                };
                if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                    for p in params.iter_mut() {
                        if p["name"] == "limit" {
                            p["schema"]["maximum"] = json!(server.max_page);
                        }
                    }
                }
                let responses = op
                    .entry("responses")
                    .or_insert_with(|| json!({}))
                    .as_object_mut();
                let Some(responses) = responses else { continue };
                // OpenAPI requires a description on every response.
                for r in responses.values_mut() {
                    if let Some(r) = r.as_object_mut() {
                        r.entry("description").or_insert_with(|| json!("OK"));
                    }
                }
                responses.insert(
                    "421".into(),
                    error("The `Host` is not one this server answers (5507)"),
                );
                let mut forbidden = Vec::new();
                if auth && !open {
                    responses.insert(
                        "401".into(),
                        error("No valid `Authorization: Bearer TOKEN` (5503)"),
                    );
                    forbidden.push("the token's role may not do this (5504)");
                }
                if writes {
                    forbidden.push("a cross-site browser request (5508)");
                }
                if path == "/approve" {
                    forbidden.push("the four-eyes rule (5302)");
                }
                if !forbidden.is_empty() {
                    let text = forbidden.join("; ");
                    let mut first = text[..1].to_uppercase();
                    first.push_str(&text[1..]);
                    responses.insert("403".into(), error(&first));
                }
                if auth && !open {
                    op.insert("security".into(), json!([{ "bearer": [] }]));
                }
            }
        }
    }
    // Each Server-Sent Event as a client reads it: its name, and data holding an `EventDto`.
    let sse = &mut doc["paths"]["/request/{id}/events"]["get"]["responses"]["200"]["content"]
        ["text/event-stream"]["schema"];
    if sse.is_object() {
        *sse = json!({
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": { "type": "string", "enum": ["status", "step", "progress", "output"] },
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": { "$ref": "#/components/schemas/EventDto" }
                }
            }
        });
    }
    if auth {
        doc["components"]["securitySchemes"] =
            json!({ "bearer": { "type": "http", "scheme": "bearer" } });
    }
    doc
}
