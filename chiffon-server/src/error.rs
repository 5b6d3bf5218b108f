//! The HTTP API's one error type and the extractors whose rejections use it.
//!
//! Every error response is `{"error": {"code", "message", "details", "trace_id"}}` with the
//! status of the code's row in `ErrorCode`'s table. Bad input never becomes a 500: the
//! JSON, path and query extractors here map their rejections to 5501 (400), 5502 (413) and
//! 5510 (415), and refuse what the stores cannot keep (NUL characters). A 5xx answer never
//! carries internal text (database errors): the client gets the code's meaning and the trace
//! id, the log gets the message.

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
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
        let trace_id = current_trace_id().unwrap_or_default();
        let (message, details) = if status.is_server_error() {
            // The message may hold a database's or broker's text: it stays in the log.
            tracing::error!(
                trace_id = %trace_id,
                code = self.code.code(),
                message = %self.message,
                details = %self.details,
                "request failed"
            );
            (self.code.meaning().to_string(), json!({}))
        } else {
            tracing::debug!(code = self.code.code(), message = %self.message, "request refused");
            (self.message, self.details)
        };
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.code.code(),
                message,
                details,
                trace_id,
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

/// A JSON body whose rejections are [`AppError`]s: not `application/json` → 415 (5510); too
/// large → 413 (5502); not JSON, not an object, a NUL character in any string or key, or
/// fields that do not fit `T` → 400 (5501).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json_content_type(req.headers()) {
            return Err(AppError::new(
                ErrorCode::UnsupportedMediaType,
                "expected a JSON body with `Content-Type: application/json`",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::new(ErrorCode::PayloadTooLarge, "request body is too large")
            } else {
                AppError::bad_request(format!("cannot read the body: {}", r.body_text()))
            }
        })?;
        parse_json_object(&bytes).map(Json)
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `application/json` or `application/*+json`, parameters (charset) allowed.
fn is_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json") && !sub.contains('/'))
}

/// Parses a request body that must be a JSON object free of NUL characters into `T`.
pub fn parse_json_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| AppError::bad_request(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(AppError::bad_request("the body must be a JSON object")
            .with_details(json!({ "found": json_type(&value) })));
    }
    if let Some(at) = find_nul(&value, "") {
        return Err(
            AppError::bad_request("NUL characters (\\u0000) are not accepted in text")
                .with_details(json!({ "field": at })),
        );
    }
    serde_json::from_value::<T>(value)
        .map_err(|e| AppError::bad_request(format!("invalid JSON body: {e}")))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The JSON pointer of the first string or key holding a NUL character.
fn find_nul(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::String(s) if s.contains('\0') => Some(at.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_nul(item, &format!("{at}/{i}"))),
        Value::Object(map) => map.iter().find_map(|(k, item)| {
            let here = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
            if k.contains('\0') {
                Some(here.replace('\0', "\\u0000"))
            } else {
                find_nul(item, &here)
            }
        }),
        _ => None,
    }
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
        if parts.uri.query().is_some_and(|q| q.contains("%00")) {
            return Err(AppError::bad_request(
                "NUL characters (%00) are not accepted in the query",
            ));
        }
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(r) => Err(query_rejection(r)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> AppError {
    AppError::bad_request(format!("invalid query: {}", r.body_text()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(resp: Response) -> Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn server_errors_keep_internal_text_in_the_log() {
        let e = AppError::new(
            ErrorCode::Internal,
            "error returned from database: invalid byte sequence for encoding \"UTF8\": 0x00",
        )
        .with_details(json!({ "sql": "INSERT INTO tasks …" }));
        let resp = TRACE_ID
            .scope("t-1".to_string(), async move { e.into_response() })
            .await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let v = body(resp).await;
        assert_eq!(v["error"]["code"], 5506);
        assert_eq!(v["error"]["message"], ErrorCode::Internal.meaning());
        assert_eq!(v["error"]["details"], json!({}));
        assert_eq!(v["error"]["trace_id"], "t-1");
        assert!(!v.to_string().contains("database"), "{v}");

        // Client errors keep their message: it is about the client's input.
        let resp = AppError::bad_request("unknown status `x`").into_response();
        assert_eq!(body(resp).await["error"]["message"], "unknown status `x`");
    }

    #[test]
    fn json_bodies_must_be_nul_free_objects() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct B {
            text: String,
            #[serde(default)]
            tags: Vec<String>,
        }
        assert!(parse_json_object::<B>(br#"{"text": "ok"}"#).is_ok());
        for (input, field) in [
            (r#"{"text": "a\u0000"}"#, Some("/text")),
            (r#"{"text": "a", "tags": ["x", "\u0000"]}"#, Some("/tags/1")),
            (r#"["a"]"#, None),
            (r#""a""#, None),
            ("{", None),
        ] {
            let e = parse_json_object::<B>(input.as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{input}");
            if let Some(f) = field {
                assert_eq!(e.details["field"], f, "{input}");
            }
        }
        // An escaped backslash before `u0000` is text, not NUL.
        assert!(parse_json_object::<B>(br#"{"text": "\\u0000"}"#).is_ok());
    }
}
