//! The handlers: parse, authorise, call the engine, render. No lifecycle decisions here.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chiffon_core::engine::{EngineEvent, SubmitRequest, MAX_TEXT_LEN};
use chiffon_core::model::{RequestFilter, RequestStatus};
use chiffon_protocol::ErrorCode;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use futures::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use crate::auth::{Identity, TraceId};
use crate::config::Role;
use crate::dto::*;
use crate::error::{AppError, ErrorResponse, Json, Path, Query};
use crate::http::AppState;

const DEFAULT_LIST_LIMIT: u32 = 50;
const DEFAULT_LOG_LIMIT: u32 = 1000;

/// Submit a request in plain words; it is planned in the background.
#[utoipa::path(
    post, path = "/request", tag = "requests",
    request_body = SubmitBody,
    responses(
        (status = 202, description = "Accepted; planning", body = SubmitResponse),
        (status = 400, description = "Malformed body: not a JSON object, wrong fields, blank or too long text, a NUL character", body = ErrorResponse),
        (status = 413, description = "Body larger than `server.body_limit_bytes`", body = ErrorResponse),
        (status = 415, description = "Body is not `application/json`", body = ErrorResponse),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store or bus unavailable", body = ErrorResponse),
    )
)]
pub async fn submit(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
    Extension(trace): Extension<TraceId>,
    Json(body): Json<SubmitBody>,
) -> Result<(StatusCode, Json<SubmitResponse>), AppError> {
    who.require(Role::Requester, "submit requests")?;
    check_text(&body.text)?;
    check_len("requester", body.requester.as_deref(), MAX_REQUESTER_LEN)?;
    // Only an admin (or the unauthenticated loopback user) may submit on someone's behalf.
    let requester = match body.requester {
        Some(r) if who.role >= Role::Admin && !r.trim().is_empty() => r,
        _ => who.name.clone(),
    };
    let request = state
        .engine
        .submit(SubmitRequest {
            text: body.text,
            requester: Some(requester),
            submitted_by: Some(who.name.clone()),
            dry_run: body.dry_run,
            trace_id: Some(trace.0),
            request_id: None,
        })
        .await?;
    tracing::info!(request = %request.id, requester = %request.requester, "request submitted");
    Ok((
        StatusCode::ACCEPTED,
        Json(SubmitResponse {
            request_id: request.id,
            status: request.status.into(),
            trace_id: request.trace_id,
            requester: request.requester,
            dry_run: request.dry_run,
            created_at: request.created_at,
            url: format!("/request/{}", request.id),
            events_url: format!("/request/{}/events", request.id),
        }),
    ))
}

/// A request with its plan, steps, outcome and audit commit.
#[utoipa::path(
    get, path = "/request/{id}", tag = "requests",
    params(("id" = Uuid, Path, description = "Request id")),
    responses(
        (status = 200, body = RequestDto),
        (status = 400, description = "Not a uuid", body = ErrorResponse),
        (status = 404, description = "Unknown request", body = ErrorResponse),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store unavailable", body = ErrorResponse),
    )
)]
pub async fn get_request(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<Uuid>,
) -> Result<Json<RequestDto>, AppError> {
    who.require(Role::Viewer, "read requests")?;
    // A request that just ended is answered with its audit commit id (written by the git
    // trail just after the end): a client that sees the end sees the commit.
    Ok(Json(
        state.engine.get_settled(id, SETTLE_LIMIT).await?.into(),
    ))
}

/// Approve (`approved: true`) or reject (`approved: false`) a request awaiting approval.
#[utoipa::path(
    post, path = "/approve", tag = "requests",
    request_body = ApproveBody,
    responses(
        (status = 200, description = "The request after the decision", body = RequestDto),
        (status = 400, description = "Malformed body: not a JSON object, wrong fields, too long comment, a NUL character", body = ErrorResponse),
        (status = 403, description = "The four-eyes rule, a role that may not approve, or a cross-site request", body = ErrorResponse),
        (status = 404, description = "Unknown request", body = ErrorResponse),
        (status = 409, description = "Not awaiting approval", body = ErrorResponse),
        (status = 413, description = "Body larger than `server.body_limit_bytes`", body = ErrorResponse),
        (status = 415, description = "Body is not `application/json`", body = ErrorResponse),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store or bus unavailable", body = ErrorResponse),
    )
)]
pub async fn approve(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
    Json(body): Json<ApproveBody>,
) -> Result<Json<RequestDto>, AppError> {
    who.require(Role::Approver, "approve or reject requests")?;
    check_len("comment", body.comment.as_deref(), MAX_COMMENT_LEN)?;
    let request = if body.approved {
        state
            .engine
            .approve(body.request_id, &who.name, body.comment)
            .await?
    } else {
        state
            .engine
            .reject(body.request_id, &who.name, body.comment)
            .await?
    };
    tracing::info!(request = %request.id, approver = %who.name, approved = body.approved, "approval decision");
    Ok(Json(request.into()))
}

/// Cancel a request that is planning, awaiting approval, queued or running.
#[utoipa::path(
    post, path = "/cancel/{id}", tag = "requests",
    params(("id" = Uuid, Path, description = "Request id")),
    responses(
        (status = 200, description = "Cancelled, or cancel sent to the running step", body = RequestDto),
        (status = 400, description = "Not a uuid", body = ErrorResponse),
        (status = 404, description = "Unknown request", body = ErrorResponse),
        (status = 409, description = "Already ended", body = ErrorResponse),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store or bus unavailable", body = ErrorResponse),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<Uuid>,
) -> Result<Json<RequestDto>, AppError> {
    who.require(Role::Requester, "cancel requests")?;
    if who.role < Role::Admin {
        let view = state.engine.get(id).await?;
        if view.request.requester != who.name {
            return Err(AppError::new(
                ErrorCode::Forbidden,
                format!("{} may only cancel its own requests", who.name),
            )
            .with_details(json!({ "request_id": id, "requester": view.request.requester })));
        }
    }
    let request = state.engine.cancel(id, &who.name).await?;
    Ok(Json(request.into()))
}

/// Liveness and the store's and the bus's state. Needs no token.
#[utoipa::path(
    get, path = "/health", tag = "system",
    responses((status = 200, body = HealthDto))
)]
pub async fn health(State(state): State<AppState>) -> Json<HealthDto> {
    Json(HealthDto::new(
        state.engine.health().await,
        state.auth.enabled(),
    ))
}

/// Requests, newest first.
#[utoipa::path(
    get, path = "/requests", tag = "requests",
    params(ListQuery),
    responses(
        (status = 200, body = RequestListDto),
        (status = 400, description = "Unknown status, `limit` out of range, `before` not an RFC 3339 instant of years 0000-9999, `id_prefix` shorter than 6 or longer than 36 characters or not hex digits and `-`", body = ErrorResponse),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store unavailable", body = ErrorResponse),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
    Query(q): Query<ListQuery>,
) -> Result<Json<RequestListDto>, AppError> {
    who.require(Role::Viewer, "read requests")?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(RequestStatus::parse(s).ok_or_else(|| {
            AppError::bad_request(format!("unknown status `{s}`")).with_details(json!({
                "allowed": RequestStatus::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>()
            }))
        })?),
    };
    let limit = check_limit(q.limit, DEFAULT_LIST_LIMIT, state.server.max_page)?;
    let before = q.before.map(check_before).transpose()?;
    let id_prefix = q.id_prefix.map(check_id_prefix).transpose()?;
    let requests = state
        .engine
        .list(&RequestFilter {
            status,
            created_before: before,
            id_prefix,
            limit: Some(limit),
            ..Default::default()
        })
        .await?;
    Ok(Json(RequestListDto {
        requests: requests.into_iter().map(Into::into).collect(),
    }))
}

/// The request's execution log.
#[utoipa::path(
    get, path = "/request/{id}/logs", tag = "requests",
    params(("id" = Uuid, Path, description = "Request id"), LogsQuery),
    responses(
        (status = 200, body = LogsDto),
        (status = 400, description = "Not a uuid, `limit` out of range", body = ErrorResponse),
        (status = 404, description = "Unknown request", body = ErrorResponse),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store unavailable", body = ErrorResponse),
    )
)]
pub async fn logs(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<Uuid>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<LogsDto>, AppError> {
    who.require(Role::Viewer, "read logs")?;
    let limit = check_limit(q.limit, DEFAULT_LOG_LIMIT, state.server.max_page)?;
    let lines = state.engine.logs(id, q.after, limit).await?;
    Ok(Json(LogsDto {
        request_id: id,
        lines: lines.into_iter().map(Into::into).collect(),
    }))
}

/// Live events of a request as Server-Sent Events: first a `status` event with the current
/// status, then `status`, `step`, `progress` and `output` events as they happen; the stream
/// ends after the terminal status.
#[utoipa::path(
    get, path = "/request/{id}/events", tag = "requests",
    params(("id" = Uuid, Path, description = "Request id")),
    responses(
        (status = 200, description = "`text/event-stream`; each event's data is one of these", content_type = "text/event-stream", body = EventDto),
        (status = 400, description = "Not a uuid", body = ErrorResponse),
        (status = 404, description = "Unknown request", body = ErrorResponse),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store unavailable", body = ErrorResponse),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<Uuid>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, AppError> {
    who.require(Role::Viewer, "read events")?;
    // Reads before subscribing: an unknown id is answered 404 and allocates nothing. The
    // subscription frees the request's channel when the stream is dropped (the client left).
    let (current, sub) = state.engine.follow_events(id).await?;
    let engine = state.engine.clone();
    let first = EventDto::Status {
        request_id: id,
        status: current.status.into(),
        at: current.updated_at,
    };
    let stream = futures::stream::unfold(
        (Some(first), sub, engine),
        move |(pending, sub, engine)| async move {
            if let Some(ev) = pending {
                return Some((sse_event(&ev), (None, sub, engine)));
            }
            let mut sub = sub?;
            match sub.recv().await {
                Ok(ev) => {
                    let last = ev.is_final();
                    if last {
                        // The stream ends settled: an approved request's audit commit id
                        // (written just after the end) is there for the client's next read.
                        let _ = engine.settled(id, SETTLE_LIMIT).await;
                    }
                    let dto = EventDto::from(ev);
                    Some((sse_event(&dto), (None, (!last).then_some(sub), engine)))
                }
                // Too slow, or the channel went away: say where the request stands now.
                Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {
                    let closed = sub.is_closed();
                    let r = engine.get(id).await.ok()?;
                    let ev = EngineEvent::Status {
                        request_id: id,
                        status: r.request.status,
                        at: r.request.updated_at,
                    };
                    let last = ev.is_final();
                    if last {
                        let _ = engine.settled(id, SETTLE_LIMIT).await;
                    }
                    if closed && !last {
                        sub.renew();
                    }
                    Some((
                        sse_event(&ev.into()),
                        (None, (!last).then_some(sub), engine),
                    ))
                }
            }
        },
    );
    let stream = stream.take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(
        KeepAlive::new().interval(Duration::from_secs(state.server.sse_keepalive_secs.max(1))),
    ))
}

/// How long an event stream's end waits for the ended request's audit commit id.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

fn sse_event(ev: &EventDto) -> Result<Event, Infallible> {
    let data = serde_json::to_string(ev).unwrap_or_else(|_| "{}".into());
    Ok(Event::default().event(ev.name()).data(data))
}

/// The action catalog: every action a plan may name, with its parameters as a JSON Schema.
#[utoipa::path(
    get, path = "/actions", tag = "fleet",
    responses(
        (status = 200, body = ActionsDto),
    )
)]
pub async fn actions(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
) -> Result<Json<ActionsDto>, AppError> {
    who.require(Role::Viewer, "read the catalog")?;
    let catalog = state.engine.catalog();
    Ok(Json(ActionsDto {
        actions: catalog.actions.values().map(Into::into).collect(),
    }))
}

/// Known agents with their last heartbeat and resources.
#[utoipa::path(
    get, path = "/agents", tag = "fleet",
    responses(
        (status = 200, body = AgentsDto),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store unavailable", body = ErrorResponse),
    )
)]
pub async fn agents(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
) -> Result<Json<AgentsDto>, AppError> {
    who.require(Role::Viewer, "read agents")?;
    let agents = state.engine.agents().await?;
    let now = Utc::now();
    let max_age = state.engine.config().dispatch.heartbeat_max_age;
    Ok(Json(AgentsDto {
        agents: agents
            .into_iter()
            .map(|a| AgentDto::new(a, now, max_age))
            .collect(),
        rejected: state
            .engine
            .rejected_messages()
            .into_iter()
            .map(Into::into)
            .collect(),
    }))
}

/// LLM spend this month per provider against its budget.
#[utoipa::path(
    get, path = "/costs", tag = "fleet",
    responses(
        (status = 200, body = CostsDto),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store unavailable", body = ErrorResponse),
    )
)]
pub async fn costs(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
) -> Result<Json<CostsDto>, AppError> {
    who.require(Role::Viewer, "read costs")?;
    let lines = state.engine.costs().await?;
    // A float `sum()` of nothing is -0.0, which prints as "$-0.0000".
    let total = lines.iter().fold(0.0, |acc, l| acc + l.spent_usd);
    Ok(Json(CostsDto {
        month: chrono::Utc::now().format("%Y-%m").to_string(),
        providers: lines.into_iter().map(Into::into).collect(),
        total_spent_usd: total,
    }))
}

/// Prometheus text format: requests by status, dispatch-to-result latency, LLM spend, queue
/// depths, counters.
#[utoipa::path(
    get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
        (status = 500, description = "Internal error (see the log with the trace id)", body = ErrorResponse),
        (status = 503, description = "Store unavailable", body = ErrorResponse),
    )
)]
pub async fn metrics(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
) -> Result<Response, AppError> {
    who.require(Role::Viewer, "read metrics")?;
    let text = crate::metrics::render(&state.engine).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// This document (built for this server's configuration: its limits, and its security
/// scheme when tokens are configured).
#[utoipa::path(
    get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
pub async fn openapi(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
) -> Result<Response, AppError> {
    who.require(Role::Viewer, "read the API document")?;
    Ok(axum::Json(state.openapi.clone()).into_response())
}

/// Any route that does not exist; `GET /` from a browser (`Accept: text/html`) is
/// redirected to the web console.
pub async fn not_found(
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    if method == axum::http::Method::GET && uri.path() == "/" && crate::ui::wants_html(&headers) {
        return crate::ui::root_redirect();
    }
    AppError::new(ErrorCode::RouteNotFound, format!("no route {}", uri.path())).into_response()
}

/// A known route with the wrong method (axum adds the `Allow` header).
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> AppError {
    AppError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
    .with_details(json!({ "method": method.as_str() }))
}

/// `text`: at least one visible character (see [`TEXT_PATTERN`]), at most [`MAX_TEXT_LEN`]
/// characters, and at most [`MAX_TEXT_LEN`] bytes once trimmed (the engine's limit).
fn check_text(text: &str) -> Result<(), AppError> {
    if !text.chars().any(|c| !is_blank(c)) {
        return Err(AppError::bad_request("text must hold a visible character")
            .with_details(json!({ "field": "text" })));
    }
    if text.chars().count() > MAX_TEXT_LEN || text.trim().len() > MAX_TEXT_LEN {
        return Err(AppError::bad_request(format!(
            "text is longer than {MAX_TEXT_LEN} characters (or bytes of UTF-8)"
        ))
        .with_details(json!({ "field": "text", "max_length": MAX_TEXT_LEN })));
    }
    Ok(())
}

fn check_len(field: &str, value: Option<&str>, max: usize) -> Result<(), AppError> {
    if value.is_some_and(|v| v.chars().count() > max) {
        return Err(
            AppError::bad_request(format!("{field} is longer than {max} characters"))
                .with_details(json!({ "field": field, "max_length": max })),
        );
    }
    Ok(())
}

/// `limit`: 1 to `server.max_page`.
fn check_limit(limit: Option<u32>, default: u32, max_page: u32) -> Result<u32, AppError> {
    match limit {
        None => Ok(default.min(max_page)),
        Some(n) if (1..=max_page).contains(&n) => Ok(n),
        Some(n) => Err(AppError::bad_request(format!(
            "limit {n} is out of range: 1 to {max_page}"
        ))
        .with_details(json!({ "field": "limit", "minimum": 1, "maximum": max_page }))),
    }
}

/// `id_prefix`: 6 to 36 characters, hex digits and `-` (a prefix no id can have, a hyphen
/// out of place, matches nothing rather than being refused: the pattern says no more).
fn check_id_prefix(prefix: String) -> Result<String, AppError> {
    let n = prefix.chars().count();
    if !(MIN_ID_PREFIX_LEN..=36).contains(&n)
        || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
    {
        return Err(AppError::bad_request(format!(
            "id_prefix must be {MIN_ID_PREFIX_LEN} to 36 hex digits and `-`"
        ))
        .with_details(json!({
            "field": "id_prefix",
            "min_length": MIN_ID_PREFIX_LEN,
            "max_length": 36,
            "pattern": "^[0-9A-Fa-f-]{6,36}$",
        })));
    }
    Ok(prefix)
}

/// `before`: an instant RFC 3339 can write (years 0000-9999, whatever the offset), brought
/// into the range every store can compare (years 0001-9999) without changing the answer.
fn check_before(before: DateTime<Utc>) -> Result<DateTime<Utc>, AppError> {
    if !(-1..=10_000).contains(&before.year()) {
        return Err(AppError::bad_request(
            "before is out of range: an RFC 3339 instant of years 0000-9999",
        )
        .with_details(json!({ "field": "before" })));
    }
    let min = Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).single();
    let max = Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).single();
    Ok(match (min, max) {
        (Some(min), _) if before < min => min,
        (_, Some(max)) if before > max => max,
        _ => before,
    })
}
