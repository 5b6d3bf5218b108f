//! # chiffon-server
//!
//! Chiffon's HTTP API (axum) and the composition root that turns a [`Config`] into a running
//! system. The binary `chiffon-server` and the CLI's `chiffon up` / `chiffon run` are thin
//! layers over this library:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use chiffon_server::{App, Config, ConfigOverrides};
//! let config = Config::load(None, &ConfigOverrides::default())?;
//! let app = App::start(config).await?;          // store, bus, agents, planner, engine
//! let listener = app.bind().await?;              // loopback only without tokens
//! let addr = app.serve(listener)?;               // the HTTP API
//! println!("listening on http://{addr}");
//! app.shutdown_token().cancelled().await;       // e.g. cancelled on SIGTERM
//! app.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Module map: [`config`] (the one place configuration is read), [`app`] (composition and
//! shutdown), [`http`] (the router and OpenAPI document), [`guard`] (the `Host` allow-list and
//! the cross-site check), [`routes`] (handlers), [`dto`] (bodies), [`auth`] (tokens, roles,
//! trace ids), [`error`] (the error body), [`metrics`].
//!
//! Architecture invariant: frontends hold no business logic. Handlers parse, authorise,
//! call [`chiffon_core::engine::Engine`] and render.

pub mod app;
pub mod auth;
pub mod config;
pub mod dto;
pub mod error;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod routes;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use app::{App, AppOptions, StartError};
pub use config::{Config, ConfigError, ConfigOverrides, Role};
pub use http::{openapi, openapi_document, router, AppState};

/// Resolves when the process gets SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    init_tracing_with_default("info")
}

/// `tracing` to stderr, filtered by `RUST_LOG`, else by `default`.
pub fn init_tracing_with_default(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
