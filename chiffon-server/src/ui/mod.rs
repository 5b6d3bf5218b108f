//! The web console for the person in the loop: server-rendered HTML (askama templates in
//! `chiffon-server/templates/`, embedded in the binary) and a little plain JavaScript
//! (`static/console.js`) on the SSE stream for live updates. No Node build, nothing fetched
//! at run time.
//!
//! Routes (all behind the `Host` allow-list and the cross-site guard, like the API; none in
//! the OpenAPI document, which describes the JSON API):
//!
//! - `/ui/` requests, `/ui/request/{id}` one request (plan, dry-run diffs, costs, approvals,
//!   live progress) with approve/reject for approvers, `/ui/agents`, `/ui/costs`,
//!   `/ui/audit` (entries and the chain's verification);
//! - `/ui/login`, `/ui/logout` (with tokens configured; see [`session`]);
//! - `/ui/request/{id}/events`: the request's SSE stream for the session (a browser's
//!   `EventSource` cannot send a bearer token);
//! - `/ui/static/console.{js,css}`.
//!
//! Every HTML answer carries a strict Content-Security-Policy (scripts only from
//! `/ui/static/`, no inline script or style), `frame-ancestors 'none'`,
//! `X-Frame-Options: DENY`, `Referrer-Policy: same-origin` and `nosniff`. Templates escape
//! every value; nothing from a user, an LLM or an agent is ever marked safe.
//!
//! Handlers read through [`chiffon_core::engine::Engine`] and decide nothing themselves.

pub mod session;
mod views;

use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use chiffon_core::model::{RequestFilter, RequestStatus};
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::Identity;
use crate::config::Role;
use crate::dto::MAX_COMMENT_LEN;
use crate::error::{AppError, Path};
use crate::http::AppState;
use session::{cookie_value, same_token, Session, Sessions, LOGIN_COOKIE, SESSION_COOKIE};
pub use views::*;

const CSS: &str = include_str!("../../static/console.css");
const JS: &str = include_str!("../../static/console.js");

/// The policy every console answer carries.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes (merged into [`crate::http::router`]).
pub fn router(state: &AppState) -> Router<AppState> {
    let pages = Router::new()
        .route("/ui/", get(requests_page))
        .route("/ui/request/{id}", get(request_page))
        .route("/ui/request/{id}/decide", post(decide))
        .route("/ui/request/{id}/events", get(crate::routes::events))
        .route("/ui/agents", get(agents_page))
        .route("/ui/costs", get(costs_page))
        .route("/ui/audit", get(audit_page))
        .route("/ui/logout", post(logout))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ));
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/static/console.css", get(css))
        .route("/ui/static/console.js", get(js))
        .merge(pages)
        .layer(axum::middleware::from_fn(security_headers))
}

/// `GET /` from a browser (one that accepts `text/html`) goes to the console.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: under it a browser sends `Origin: null` with the console's own
    // form posts, which the cross-site guard rightly refuses.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CSS,
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        JS,
    )
        .into_response()
}

/// The caller of a console page: the session's identity and CSRF token.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub identity: Identity,
    pub csrf: String,
    /// Tokens are configured (show logout).
    pub auth: bool,
}

/// Resolves the [`Viewer`] (and its [`Identity`], for the shared SSE handler); without a
/// session, pages redirect to the login form and other requests get 401.
async fn require_session(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let viewer = if !state.auth.enabled() {
        Viewer {
            identity: Identity {
                name: "local".into(),
                role: Role::Admin,
                anonymous: true,
            },
            csrf: state.sessions.anonymous_csrf.clone(),
            auth: false,
        }
    } else {
        match cookie_value(req.headers(), SESSION_COOKIE).and_then(|id| state.sessions.get(id)) {
            Some(Session { identity, csrf, .. }) => Viewer {
                identity,
                csrf,
                auth: true,
            },
            None => {
                let page = req.method() == axum::http::Method::GET
                    && !req.uri().path().ends_with("/events");
                if page {
                    return Redirect::to("/ui/login").into_response();
                }
                return UiError::new(StatusCode::UNAUTHORIZED, "log in first (/ui/login)")
                    .into_response();
            }
        }
    };
    req.extensions_mut().insert(viewer.identity.clone());
    req.extensions_mut().insert(viewer);
    next.run(req).await
}

/// An error page (HTML) with the API's status and message.
#[derive(Debug)]
pub struct UiError {
    status: StatusCode,
    message: String,
}

impl UiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        UiError {
            status,
            message: message.into(),
        }
    }
}

impl From<AppError> for UiError {
    fn from(e: AppError) -> Self {
        let status = e.status();
        // A 5xx's text may hold a database's: it stays in the log.
        let message = if status.is_server_error() {
            tracing::error!(code = %e.code, message = %crate::redact_for_logs(&e.message), "console error");
            format!("internal error ({})", e.code.code())
        } else {
            format!("{} ({})", e.message, e.code.code())
        };
        UiError { status, message }
    }
}

impl From<chiffon_core::engine::EngineError> for UiError {
    fn from(e: chiffon_core::engine::EngineError) -> Self {
        AppError::from(e).into()
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let page = ErrorPage {
            status: self.status.as_u16(),
            message: self.message,
        };
        (self.status, render(&page)).into_response()
    }
}

fn render<T: Template>(t: &T) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "template error").into_response()
        }
    }
}

// ---- login ----

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    csrf: String,
}

async fn login_form(State(state): State<AppState>) -> Response {
    if !state.auth.enabled() {
        return Redirect::to("/ui/").into_response();
    }
    let csrf = session::random_token();
    let cookie = state.sessions.cookie(
        LOGIN_COOKIE,
        &csrf,
        Some(std::time::Duration::from_secs(3600)),
    );
    let mut resp = render(&LoginPage {
        csrf,
        error: String::new(),
    });
    set_cookie(&mut resp, &cookie);
    resp
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Form<LoginForm>,
) -> Response {
    if !state.auth.enabled() {
        return Redirect::to("/ui/").into_response();
    }
    let expected = cookie_value(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !same_token(expected, &form.csrf) {
        return UiError::new(
            StatusCode::FORBIDDEN,
            "the login form expired or was not this server's: reload it",
        )
        .into_response();
    }
    let Some(identity) = state.auth.identify(form.token.trim()) else {
        let mut resp = render(&LoginPage {
            csrf: form.csrf.clone(),
            error: "unknown token".into(),
        });
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        return resp;
    };
    tracing::info!(who = %identity.name, "console login");
    let id = state.sessions.open(identity);
    let mut resp = Redirect::to("/ui/").into_response();
    set_cookie(
        &mut resp,
        &state
            .sessions
            .cookie(SESSION_COOKIE, &id, Some(session::SESSION_TTL)),
    );
    set_cookie(
        &mut resp,
        &state
            .sessions
            .cookie(LOGIN_COOKIE, "", Some(std::time::Duration::ZERO)),
    );
    resp
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
    form: Form<CsrfForm>,
) -> Result<Response, UiError> {
    check_csrf(&viewer, &form.csrf)?;
    if let Some(id) = cookie_value(&headers, SESSION_COOKIE) {
        state.sessions.close(id);
    }
    let mut resp = Redirect::to(if viewer.auth { "/ui/login" } else { "/ui/" }).into_response();
    set_cookie(
        &mut resp,
        &state
            .sessions
            .cookie(SESSION_COOKIE, "", Some(std::time::Duration::ZERO)),
    );
    Ok(resp)
}

fn set_cookie(resp: &mut Response, cookie: &str) {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn check_csrf(viewer: &Viewer, presented: &str) -> Result<(), UiError> {
    if same_token(&viewer.csrf, presented) {
        Ok(())
    } else {
        Err(UiError::new(
            StatusCode::FORBIDDEN,
            "the form's CSRF token does not match this session: reload the page",
        ))
    }
}

// ---- pages ----

#[derive(Debug, Deserialize)]
struct ListParams {
    status: Option<String>,
}

async fn requests_page(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<ListParams>,
) -> Result<Response, UiError> {
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    let filter_status = match status {
        None => None,
        Some(s) => Some(RequestStatus::parse(s).ok_or_else(|| {
            UiError::new(StatusCode::BAD_REQUEST, format!("unknown status `{s}`"))
        })?),
    };
    let requests = state
        .engine
        .list(&RequestFilter {
            status: filter_status,
            limit: Some(100),
            ..Default::default()
        })
        .await?;
    Ok(render(&RequestsPage {
        nav: Nav::new(&viewer, "requests"),
        status: status.unwrap_or("").to_string(),
        statuses: RequestStatus::ALL
            .iter()
            .map(|s| (s.as_str(), Some(s.as_str()) == status))
            .collect(),
        rows: requests.iter().map(RequestRow::from).collect(),
    }))
}

async fn request_page(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<Uuid>,
) -> Result<Response, UiError> {
    let view = state.engine.get(id).await?;
    let audit = state.engine.audit_log(Some(id), 0, 500).await?;
    let costs = state.engine.costs().await?;
    let logs = state.engine.logs(id, None, 500).await?;
    let page = RequestPage::build(
        Nav::new(&viewer, "requests"),
        &viewer.identity,
        state.engine.config().approval.four_eyes,
        view,
        &audit,
        &costs,
        &logs,
    );
    Ok(render(&page))
}

#[derive(Debug, Deserialize)]
struct DecideForm {
    csrf: String,
    decision: String,
    #[serde(default)]
    comment: String,
}

async fn decide(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<Uuid>,
    form: Form<DecideForm>,
) -> Result<Response, UiError> {
    check_csrf(&viewer, &form.csrf)?;
    let who = &viewer.identity;
    who.require(Role::Approver, "approve or reject requests")?;
    let comment = form.comment.trim();
    if comment.chars().count() > MAX_COMMENT_LEN {
        return Err(UiError::new(
            StatusCode::BAD_REQUEST,
            format!("the comment is longer than {MAX_COMMENT_LEN} characters"),
        ));
    }
    if comment.contains('\0') {
        return Err(UiError::new(
            StatusCode::BAD_REQUEST,
            "the comment holds a NUL character",
        ));
    }
    let comment = (!comment.is_empty()).then(|| comment.to_string());
    match form.decision.as_str() {
        "approve" => state.engine.approve(id, &who.name, comment).await?,
        "reject" => state.engine.reject(id, &who.name, comment).await?,
        other => {
            return Err(UiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown decision `{other}`"),
            ))
        }
    };
    tracing::info!(request = %id, approver = %who.name, decision = %form.decision, "approval decision (console)");
    Ok(Redirect::to(&format!("/ui/request/{id}")).into_response())
}

async fn agents_page(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
) -> Result<Response, UiError> {
    let agents = state.engine.agents().await?;
    let max_age = state.engine.config().dispatch.heartbeat_max_age;
    Ok(render(&AgentsPage {
        nav: Nav::new(&viewer, "agents"),
        rows: agents
            .iter()
            .map(|a| AgentRow::new(a, max_age, chrono::Utc::now()))
            .collect(),
    }))
}

async fn costs_page(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
) -> Result<Response, UiError> {
    let lines = state.engine.costs().await?;
    Ok(render(&CostsPage {
        nav: Nav::new(&viewer, "costs"),
        month: chrono::Utc::now().format("%Y-%m").to_string(),
        rows: lines.iter().map(CostRow::from).collect(),
    }))
}

#[derive(Debug, Deserialize)]
struct AuditParams {
    after: Option<i64>,
    verify: Option<String>,
}

async fn audit_page(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<AuditParams>,
) -> Result<Response, UiError> {
    const PAGE: u32 = 200;
    let after = q.after.unwrap_or(0).max(0);
    let entries = state.engine.audit_log(None, after, PAGE).await?;
    let verify = match q.verify {
        Some(_) => Some(VerifyView::from(&state.engine.verify_audit().await?)),
        None => None,
    };
    let next = (entries.len() as u32 == PAGE)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    Ok(render(&AuditPage {
        nav: Nav::new(&viewer, "audit"),
        rows: entries.iter().map(AuditRow::from).collect(),
        verify,
        next_after: next.map(|n| n.to_string()).unwrap_or_default(),
    }))
}

/// Shared by the API's fallback: where `GET /` from a browser goes.
pub fn root_redirect() -> Response {
    Redirect::to("/ui/").into_response()
}

/// Sessions as kept in [`AppState`].
pub type SharedSessions = Arc<Sessions>;
