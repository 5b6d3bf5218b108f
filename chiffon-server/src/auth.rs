//! Bearer tokens with roles, and the trace id of each HTTP request.
//!
//! Tokens are compared in constant time and never logged. With no tokens configured every
//! caller is the loopback user `local` with the admin role; the server refuses to listen on
//! anything but loopback in that case (see [`crate::app`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chiffon_protocol::ErrorCode;
use serde_json::json;

use crate::config::{Role, TokenConfig};
use crate::error::{AppError, TRACE_ID};

/// `x-trace-id`: taken from the request when present, generated otherwise, echoed in the
/// response and carried into the submitted request and its bus messages.
pub const TRACE_HEADER: HeaderName = HeaderName::from_static("x-trace-id");

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Recorded as requester, approver and actor.
    pub name: String,
    pub role: Role,
    /// No tokens are configured (loopback only).
    pub anonymous: bool,
}

impl Identity {
    /// Refuses with 403 (5504) unless the role is at least `role`.
    pub fn require(&self, role: Role, what: &str) -> Result<(), AppError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(AppError::new(
                ErrorCode::Forbidden,
                format!("the {} role may not {what}", self.role),
            )
            .with_details(json!({ "role": self.role, "needs": role })))
        }
    }
}

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Vec<TokenConfig>,
}

impl Auth {
    pub fn new(tokens: Vec<TokenConfig>) -> Self {
        Auth { tokens }
    }

    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The identity a presented token belongs to. Every token is compared (in constant time)
    /// so the time taken does not tell which one nearly matched.
    pub fn identify(&self, presented: &str) -> Option<Identity> {
        let mut found = None;
        for t in &self.tokens {
            if constant_time_eq(t.token.as_bytes(), presented.as_bytes()) && found.is_none() {
                found = Some(Identity {
                    name: t.identity(),
                    role: t.role,
                    anonymous: false,
                });
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Resolves the caller's [`Identity`] into the request's extensions, or answers 401 (5503).
pub async fn require_token(
    State(auth): State<Arc<Auth>>,
    mut req: Request,
    next: Next,
) -> Response {
    if !auth.enabled() {
        req.extensions_mut().insert(Identity {
            name: "local".into(),
            role: Role::Admin,
            anonymous: true,
        });
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let Some(presented) = presented else {
        return AppError::new(
            ErrorCode::Unauthorized,
            "missing `Authorization: Bearer TOKEN` header",
        )
        .into_response();
    };
    match auth.identify(presented) {
        Some(identity) => {
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        None => AppError::new(ErrorCode::Unauthorized, "unknown API token").into_response(),
    }
}

/// Takes or makes the trace id, runs the request inside it (a tracing span and the task-local
/// errors read) and echoes it in the response.
pub async fn trace_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&TRACE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    req.extensions_mut().insert(TraceId(id.clone()));
    let span = tracing::info_span!("http", trace_id = %id, method = %req.method(), path = %req.uri().path());
    let fut = TRACE_ID.scope(id.clone(), next.run(req));
    let mut resp = tracing::Instrument::instrument(fut, span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(TRACE_HEADER, v);
    }
    resp
}

/// The trace id of the request, as an extension for handlers.
#[derive(Debug, Clone)]
pub struct TraceId(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly() {
        let auth = Auth::new(vec![TokenConfig {
            name: Some("ann".into()),
            token: "0123456789abcdef".into(),
            role: Role::Approver,
        }]);
        assert_eq!(auth.identify("0123456789abcdef").unwrap().name, "ann");
        assert!(auth.identify("0123456789abcdeF").is_none());
        assert!(auth.identify("0123456789abcde").is_none());
        assert!(auth.identify("").is_none());
        let id = auth.identify("0123456789abcdef").unwrap();
        assert!(id.require(Role::Approver, "approve").is_ok());
        let err = id.require(Role::Admin, "do everything").unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
    }
}
