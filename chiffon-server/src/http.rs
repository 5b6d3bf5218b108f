//! The axum application: [`router`] wires every route of CONTRACT.md's HTTP API with its
//! middleware (trace ids, auth, body limit, request tracing), and [`openapi`] is the
//! document generated from the handlers.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use chiffon_core::engine::Engine;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::auth::{self, Auth};
use crate::config::ServerConfig;
use crate::routes;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub auth: Arc<Auth>,
    pub server: ServerConfig,
    /// Ends long-lived responses (SSE) so a graceful shutdown does not wait for them.
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("engine", &self.engine)
            .field("auth", &self.auth.enabled())
            .finish()
    }
}

impl AppState {
    pub fn new(engine: Engine, auth: Auth, server: ServerConfig) -> Self {
        AppState {
            engine,
            auth: Arc::new(auth),
            server,
            shutdown: CancellationToken::new(),
        }
    }

    /// Event streams end when `token` is cancelled.
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }
}

/// The HTTP API.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/request", post(routes::submit))
        .route("/request/{id}", get(routes::get_request))
        .route("/approve", post(routes::approve))
        .route("/cancel/{id}", post(routes::cancel))
        .route("/requests", get(routes::list))
        .route("/request/{id}/events", get(routes::events))
        .route("/request/{id}/logs", get(routes::logs))
        .route("/agents", get(routes::agents))
        .route("/costs", get(routes::costs))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        // `route_layer`: unknown routes answer 404 (5505) rather than 401.
        .route_layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/health", get(routes::health))
        .merge(protected)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.server.body_limit_bytes))
        .layer(TraceLayer::new_for_http())
        .layer(axum::middleware::from_fn(auth::trace_id))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Chiffon",
        description = "Orchestrated infrastructure automation: requests in plain words are planned as catalog actions, approved, executed by agents and audited. Errors are `{\"error\": {\"code\", \"message\", \"details\", \"trace_id\"}}`; send `x-trace-id` to choose the trace id."
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
        routes::costs,
        routes::metrics,
        routes::openapi,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "requests", description = "Submit, inspect, approve and cancel requests"),
        (name = "fleet", description = "Agents and LLM spend"),
        (name = "system", description = "Health, metrics and this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document of every route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
