//! The HTTP API's one error type and the extractors whose rejections use it.
//!
//! Every error response is `{"error": {"code", "message", "details", "trace_id"}}` with the
//! status of the code's row in `ErrorCode`'s table. Bad input never becomes a 500: the
//! JSON, path and query extractors here map their rejections to 5501/5502.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chiffon_core::engine::EngineError;
use chiffon_protocol::ErrorCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

tokio::task_local! {
    /// The trace id of the HTTP request being served; set by the trace-id middleware so
    /// errors raised anywhere below it carry it.
    pub(crate) static TRACE_ID: String;
}

/// The current request's trace id, if inside one.
pub fn current_trace_id() -> Option<String> {
    TRACE_ID.try_with(|t| t.clone()).ok()
}

/// An error answered to an HTTP client.
#[derive(Debug, Clone)]
pub struct AppError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Value,
}

impl AppError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        AppError {
            code,
            message: message.into(),
            details: json!({}),
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        AppError::new(ErrorCode::BadRequest, message)
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// The error body's inner object.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// 5001-5999, see `chiffon-protocol`'s table.
    pub code: u16,
    pub message: String,
    #[schema(value_type = Object)]
    pub details: Value,
    pub trace_id: String,
}

/// `{"error": {…}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code.code(), message = %self.message, "request failed");
        } else {
            tracing::debug!(code = self.code.code(), message = %self.message, "request refused");
        }
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.code.code(),
                message: self.message,
                details: self.details,
                trace_id: current_trace_id().unwrap_or_default(),
            },
        };
        (status, axum::Json(body)).into_response()
    }
}

impl From<EngineError> for AppError {
    fn from(e: EngineError) -> Self {
        let code = e.code();
        let details = match &e {
            EngineError::NotFound(id) => json!({ "request_id": id }),
            EngineError::IllegalTransition { id, status, action } => {
                json!({ "request_id": id, "status": status, "action": action })
            }
            EngineError::FourEyes { id, approver } => {
                json!({ "request_id": id, "approver": approver })
            }
            _ => json!({}),
        };
        AppError::new(code, e.to_string()).with_details(details)
    }
}

/// `axum::Json` whose rejections are [`AppError`]s: too large → 413 (5502), anything else
/// (syntax, types, content type) → 400 (5501).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn json_rejection(r: JsonRejection) -> AppError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return AppError::new(ErrorCode::PayloadTooLarge, "request body is too large");
    }
    AppError::bad_request(format!("invalid JSON body: {}", r.body_text()))
}

/// `axum::extract::Path` with 400 (5501) rejections.
#[derive(Debug, Clone)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(r) => Err(path_rejection(r)),
        }
    }
}

fn path_rejection(r: PathRejection) -> AppError {
    AppError::bad_request(format!("invalid path: {}", r.body_text()))
}

/// `axum::extract::Query` with 400 (5501) rejections.
#[derive(Debug, Clone)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(r) => Err(query_rejection(r)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> AppError {
    AppError::bad_request(format!("invalid query: {}", r.body_text()))
}
