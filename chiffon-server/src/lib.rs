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
pub mod webhooks;

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

/// `tracing` to stderr, filtered by `RUST_LOG`, else by `default`. Every line passes
/// through the secrets given to [`redact_logs`].
pub fn init_tracing_with_default(default: &str) {
    init_tracing_ansi(default, true)
}

fn init_tracing_ansi(default: &str, ansi: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(RedactedStderr);
    // Colours only where they were before: a file gets none.
    let _ = if ansi {
        builder.try_init()
    } else {
        builder.with_ansi(false).try_init()
    };
}

/// Like [`init_tracing_with_default`], but the lines go to `file` (appended) instead of
/// stderr: for `chiffon up` in the background, whose stderr is a terminal someone else uses.
pub fn init_tracing_to_file(default: &str, file: std::fs::File) {
    let _ = LOG_FILE.set(std::sync::Mutex::new(file));
    init_tracing_ansi(default, false)
}

/// Where log lines go instead of stderr, once set.
static LOG_FILE: std::sync::OnceLock<std::sync::Mutex<std::fs::File>> = std::sync::OnceLock::new();

/// The secrets struck from log lines (the process's logger is global, so this is too).
static LOG_REDACTOR: std::sync::RwLock<Option<chiffon_core::redact::Redactor>> =
    std::sync::RwLock::new(None);

/// Adds `redactor`'s secrets to those struck from every log line ([`App::start`] does it
/// with the configuration's secrets).
pub fn redact_logs(redactor: &chiffon_core::redact::Redactor) {
    if redactor.is_empty() {
        return;
    }
    let mut r = LOG_REDACTOR.write().unwrap_or_else(|e| e.into_inner());
    *r = Some(match r.as_ref() {
        Some(old) => old.merge(redactor),
        None => redactor.clone(),
    });
}

/// `text` as it may be logged or printed: the secrets given to [`redact_logs`] struck.
pub fn redact_for_logs(text: &str) -> String {
    match LOG_REDACTOR
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        Some(r) => r.redact(text).into_owned(),
        None => text.to_string(),
    }
}

/// Hands the subscriber one buffer per event and writes it, redacted, to stderr (or the log
/// file) when the event is complete, so a secret is never split across writes.
struct RedactedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactedStderr {
    type Writer = RedactedLine;
    fn make_writer(&'a self) -> RedactedLine {
        RedactedLine(Vec::new())
    }
}

struct RedactedLine(Vec<u8>);

impl std::io::Write for RedactedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactedLine {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let line = redact_for_logs(&String::from_utf8_lossy(&self.0));
        match LOG_FILE.get() {
            Some(file) => {
                let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                let _ = std::io::Write::write_all(&mut *file, line.as_bytes());
            }
            None => {
                let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            }
        }
    }
}
