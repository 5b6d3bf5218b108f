//! The MCP server: Chiffon's requests as tools for an AI assistant, on the official Rust SDK
//! (`rmcp`, pinned in the workspace). Every use of `rmcp` is in this module, because its API
//! changes often.
//!
//! Tools: `list_actions`, `submit_request`, `get_request`, `list_requests`,
//! `cancel_request`. No tool approves: approval stays with a person.
//!
//! A tool does nothing itself: it is one call of the HTTP API ([`HttpApi`]), so tokens,
//! roles, ownership, validation and errors are the API's own. Two transports:
//! - streamable HTTP at `/mcp` ([`service`], mounted by [`crate::http::router`] behind the
//!   `Host`/cross-site guard and the bearer tokens); each tool call goes through the same
//!   router in process ([`InProcessApi`]), with the caller's `Authorization` header;
//! - stdio ([`serve_stdio`]): `chiffon mcp`, whose [`HttpApi`] is an HTTP client of a server
//!   (`--server`, `--token`).
//!
//! An API error comes back as a tool error (`isError: true`) whose structured content is the
//! API's `{"error": {"code": 5xxx, "message", …}}` and whose text is `error 5xxx name: message`.

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request};
use axum::Router;
use chiffon_protocol::ErrorCode;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use uuid::Uuid;

use crate::auth::{TraceId, TRACE_HEADER};
use crate::config::ServerConfig as HttpServerConfig;

/// The statuses `list_requests` filters by (CONTRACT.md).
const STATUSES: &[&str] = &[
    "planning",
    "awaiting_approval",
    "queued",
    "running",
    "completed",
    "failed",
    "cancelled",
    "rejected",
];

/// One call of the HTTP API.
#[derive(Debug, Clone)]
pub struct ApiCall {
    pub method: Method,
    /// Path and query, e.g. `/requests?limit=5`.
    pub path: String,
    pub body: Option<Value>,
    /// The MCP client's HTTP request headers when it came over HTTP (its `Authorization`
    /// and trace id are forwarded); empty over stdio.
    pub caller: HeaderMap,
}

/// The API's answer: its status and JSON body.
#[derive(Debug, Clone)]
pub struct ApiAnswer {
    pub status: u16,
    pub body: Value,
}

/// Where the tools send their calls: the HTTP API of a Chiffon server.
pub trait HttpApi: Send + Sync + 'static {
    /// Sends `call`. `Err` is a transport failure (the server cannot be reached), with a
    /// message for the user; an API error is an `Ok` answer with a 4xx/5xx status.
    fn call(&self, call: ApiCall) -> impl Future<Output = Result<ApiAnswer, String>> + Send;

    /// The web console's address of a request, as the MCP client should open it.
    fn console_url(&self, caller: &HeaderMap, request_id: &str) -> String;
}

/// The server's own router, called in process: what `/mcp` uses.
#[derive(Clone)]
pub struct InProcessApi {
    router: Router,
}

impl std::fmt::Debug for InProcessApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InProcessApi")
    }
}

impl InProcessApi {
    /// `router` is the HTTP API (without `/mcp`).
    pub fn new(router: Router) -> Self {
        InProcessApi { router }
    }
}

impl HttpApi for InProcessApi {
    async fn call(&self, call: ApiCall) -> Result<ApiAnswer, String> {
        // The outer request already passed the Host guard; the inner one names loopback.
        let mut req = Request::builder()
            .method(call.method)
            .uri(&call.path)
            .header(header::HOST, "localhost");
        if let Some(auth) = call.caller.get(header::AUTHORIZATION) {
            req = req.header(header::AUTHORIZATION, auth);
        }
        if let Some(trace) = call.caller.get(&TRACE_HEADER) {
            req = req.header(&TRACE_HEADER, trace);
        }
        let req = match call.body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .map_err(|e| e.to_string())?;
        let resp = self
            .router
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .map_err(|e| e.to_string())?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(ApiAnswer { status, body })
    }

    fn console_url(&self, caller: &HeaderMap, request_id: &str) -> String {
        let host = caller
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let scheme = match caller
            .get("x-forwarded-proto")
            .and_then(|h| h.to_str().ok())
        {
            Some("https") => "https",
            _ => "http",
        };
        format!("{scheme}://{host}/ui/request/{request_id}")
    }
}

/// The MCP server over an [`HttpApi`].
pub struct ChiffonMcp<A> {
    api: Arc<A>,
}

impl<A> Clone for ChiffonMcp<A> {
    fn clone(&self) -> Self {
        ChiffonMcp {
            api: self.api.clone(),
        }
    }
}

impl<A> std::fmt::Debug for ChiffonMcp<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChiffonMcp")
    }
}

impl<A: HttpApi> ChiffonMcp<A> {
    pub fn new(api: A) -> Self {
        ChiffonMcp { api: Arc::new(api) }
    }

    /// The tools' descriptions and input schemas.
    pub fn tools() -> Vec<Tool> {
        let schema = |v: Value| -> Arc<JsonObject> {
            Arc::new(match v {
                Value::Object(m) => m,
                _ => Map::new(),
            })
        };
        let id = json!({"type": "string", "format": "uuid", "description": "the request's id"});
        let read_only = ToolAnnotations::new().read_only(true);
        vec![
            Tool::new(
                "list_actions",
                "The action catalog: every action a plan may use, with its description, the agent type that runs it and its parameters as a JSON Schema.",
                schema(json!({"type": "object", "properties": {}, "additionalProperties": false})),
            )
            .annotate(read_only.clone()),
            Tool::new(
                "submit_request",
                "Submit a request in plain words (\"Ensure the directory /srv/www exists\"). It is planned from the catalog and then waits for a person to approve it in the web console or with `chiffon approve`; this tool cannot approve. Answers request_id, status and the console URL.",
                schema(json!({
                    "type": "object",
                    "properties": {
                        "text": {"type": "string", "minLength": 1, "maxLength": 10000, "description": "what to do, in plain words"},
                        "dry_run": {"type": "boolean", "description": "run the plan in check mode: report what would change, change nothing", "default": false}
                    },
                    "required": ["text"],
                    "additionalProperties": false
                })),
            )
            .annotate(ToolAnnotations::new().read_only(false).destructive(false).idempotent(false)),
            Tool::new(
                "get_request",
                "A request: text, status, plan (steps, parameters, estimated cost, who planned it), dry-run previews, waiting reason, per-step status and output, error, audit commit.",
                schema(json!({"type": "object", "properties": {"request_id": id}, "required": ["request_id"], "additionalProperties": false})),
            )
            .annotate(read_only.clone()),
            Tool::new(
                "list_requests",
                "Requests, newest first, optionally only those in one status.",
                schema(json!({
                    "type": "object",
                    "properties": {
                        "status": {"type": "string", "enum": STATUSES},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "at most this many (default 50)"}
                    },
                    "additionalProperties": false
                })),
            )
            .annotate(read_only),
            Tool::new(
                "cancel_request",
                "Cancel a request that is planning, awaiting approval, queued or running (a running step is stopped). A requester may cancel its own requests.",
                schema(json!({"type": "object", "properties": {"request_id": id}, "required": ["request_id"], "additionalProperties": false})),
            )
            .annotate(ToolAnnotations::new().read_only(false).destructive(true).idempotent(true)),
        ]
    }

    /// Runs tool `name` with `args` for a caller with these HTTP headers.
    pub async fn run_tool(
        &self,
        name: &str,
        args: &JsonObject,
        caller: HeaderMap,
    ) -> CallToolResult {
        let call = |method: Method, path: String, body: Option<Value>| ApiCall {
            method,
            path,
            body,
            caller: caller.clone(),
        };
        let request = match name {
            "list_actions" => call(Method::GET, "/actions".into(), None),
            "submit_request" => {
                let Some(text) = args.get("text").and_then(Value::as_str) else {
                    return bad_input("`text` (a string) is required");
                };
                let dry_run = match args.get("dry_run") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return bad_input("`dry_run` must be a boolean"),
                };
                call(
                    Method::POST,
                    "/request".into(),
                    Some(json!({"text": text, "dry_run": dry_run})),
                )
            }
            "get_request" | "cancel_request" => {
                let id = match request_id(args) {
                    Ok(id) => id,
                    Err(e) => return e,
                };
                if name == "get_request" {
                    call(Method::GET, format!("/request/{id}"), None)
                } else {
                    call(Method::POST, format!("/cancel/{id}"), None)
                }
            }
            "list_requests" => {
                let mut query = Vec::new();
                match args.get("status") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) if STATUSES.contains(&s.as_str()) => {
                        query.push(format!("status={s}"))
                    }
                    Some(_) => {
                        return bad_input(&format!(
                            "`status` must be one of {}",
                            STATUSES.join(", ")
                        ))
                    }
                }
                match args.get("limit") {
                    None | Some(Value::Null) => {}
                    Some(v) => match v.as_u64().filter(|n| (1..=1000).contains(n)) {
                        Some(n) => query.push(format!("limit={n}")),
                        None => return bad_input("`limit` must be an integer from 1 to 1000"),
                    },
                }
                let q = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", query.join("&"))
                };
                call(Method::GET, format!("/requests{q}"), None)
            }
            other => return bad_input(&format!("unknown tool `{other}`")),
        };
        let answer = match self.api.call(request).await {
            Ok(a) => a,
            Err(message) => {
                return tool_error(json!({"error": {
                    "code": ErrorCode::Internal.code(),
                    "message": format!("cannot reach the Chiffon server: {message}"),
                    "details": {},
                }}))
            }
        };
        if answer.status >= 400 {
            let body = if answer.body.get("error").is_some() {
                answer.body
            } else {
                json!({"error": {"code": ErrorCode::Internal.code(), "message": format!("the server answered HTTP {}", answer.status), "details": {}}})
            };
            return tool_error(body);
        }
        let mut body = answer.body;
        if name == "submit_request" {
            if let Some(id) = body
                .get("request_id")
                .and_then(Value::as_str)
                .map(str::to_string)
            {
                body["console_url"] = Value::String(self.api.console_url(&caller, &id));
            }
        }
        let text = serde_json::to_string_pretty(&body).unwrap_or_default();
        let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
        if body.is_object() {
            result.structured_content = Some(body);
        }
        result
    }
}

fn request_id(args: &JsonObject) -> Result<Uuid, CallToolResult> {
    let raw = args
        .get("request_id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_input("`request_id` (a string) is required"))?;
    // Parsed, never pasted into a path as given.
    Uuid::parse_str(raw.trim()).map_err(|_| bad_input("`request_id` is not a request id (a UUID)"))
}

fn bad_input(message: &str) -> CallToolResult {
    tool_error(json!({"error": {
        "code": ErrorCode::BadRequest.code(),
        "message": message,
        "details": {},
    }}))
}

/// A tool error carrying the API's error body; its text leads with the code.
fn tool_error(body: Value) -> CallToolResult {
    let code = body["error"]["code"].as_u64().unwrap_or(0);
    let name = u16::try_from(code)
        .ok()
        .and_then(ErrorCode::from_code)
        .map(|c| c.name())
        .unwrap_or("error");
    let message = body["error"]["message"].as_str().unwrap_or("");
    let mut result = CallToolResult::error(vec![ContentBlock::text(format!(
        "error {code} {name}: {message}"
    ))]);
    result.structured_content = Some(body);
    result
}

impl<A: HttpApi> ServerHandler for ChiffonMcp<A> {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("chiffon", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Chiffon plans infrastructure changes asked for in plain words as steps from a \
                 catalog of Ansible playbooks; a person approves each plan before it runs. \
                 Use list_actions to see what can be done, submit_request to ask, get_request \
                 to follow it (its status, plan, dry-run previews, results). Approval is not a \
                 tool: point the user to the console URL.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(Self::tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let mut caller = HeaderMap::new();
        if let Some(parts) = context.extensions.get::<axum::http::request::Parts>() {
            caller = parts.headers.clone();
            // The trace id the outer request was given, so both calls log under it.
            if let Some(TraceId(id)) = parts.extensions.get::<TraceId>() {
                if let Ok(v) = HeaderValue::from_str(id) {
                    caller.insert(&TRACE_HEADER, v);
                }
            }
        }
        // An unknown tool (say, an approval tool a client hoped for) is a protocol error.
        if !Self::tools().iter().any(|t| t.name == request.name) {
            return Err(ErrorData::invalid_params(
                format!("unknown tool `{}`", request.name),
                None,
            ));
        }
        let args = request.arguments.unwrap_or_default();
        Ok(self.run_tool(&request.name, &args, caller).await.into())
    }
}

/// The streamable HTTP service for `/mcp`: stateless (no sessions to keep or steal; each
/// POST carries its own token), JSON answers, the body limit of the API. Host and Origin
/// checks are the router's ([`crate::guard`]), which runs before this.
pub fn service(
    api: Router,
    server: &HttpServerConfig,
    shutdown: CancellationToken,
) -> StreamableHttpService<ChiffonMcp<InProcessApi>, NeverSessionManager> {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .disable_allowed_hosts()
        .with_max_request_body_bytes(server.body_limit_bytes)
        .with_cancellation_token(shutdown.child_token());
    let api = InProcessApi::new(api);
    StreamableHttpService::new(
        move || Ok(ChiffonMcp::new(api.clone())),
        Arc::new(NeverSessionManager::default()),
        config,
    )
}

/// Serves the tools on stdin/stdout until the client closes them: `chiffon mcp`.
pub async fn serve_stdio<A: HttpApi>(api: A) -> Result<(), String> {
    let running = ChiffonMcp::new(api)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| e.to_string())?;
    running.waiting().await.map_err(|e| e.to_string())?;
    Ok(())
}
