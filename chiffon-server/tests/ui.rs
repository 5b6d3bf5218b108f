//! The web console through `router()` with `oneshot`: redirects, login and sessions, CSRF,
//! roles, security headers, escaping, and that the OpenAPI document leaves the HTML out.
//! (`ui_browser.rs` drives the same pages in a real Chromium.)

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use chiffon_core::engine::SubmitRequest;
use chiffon_core::model::RequestStatus;
use chiffon_server::config::{Role, TokenConfig};
use chiffon_server::testing::start_app;
use chiffon_server::App;
use tower::ServiceExt;
use uuid::Uuid;

const VIEWER: &str = "viewer-token-0123456789";
const APPROVER: &str = "approver-token-0123456789";
const REQUESTER: &str = "requester-token-0123456789";

fn tokens() -> Vec<TokenConfig> {
    let t = |name: &str, token: &str, role| TokenConfig {
        name: Some(name.into()),
        token: token.into(),
        role,
    };
    vec![
        t("vera", VIEWER, Role::Viewer),
        t("anna", APPROVER, Role::Approver),
        t("rick", REQUESTER, Role::Requester),
    ]
}

struct T {
    app: App,
    router: Router,
    _dir: tempfile::TempDir,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Resp {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with(&format!("{name}=")))
            .map(str::to_string)
    }
}

async fn setup(with_tokens: bool) -> T {
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(dir.path(), if with_tokens { tokens() } else { vec![] }).await;
    let router = app.router();
    T {
        app,
        router,
        _dir: dir,
    }
}

/// The value of `name="NAME" value="…"` in a page (the hidden CSRF field).
fn hidden(html: &str, name: &str) -> String {
    let key = format!("name=\"{name}\" value=\"");
    let start = html.find(&key).expect("the hidden field") + key.len();
    html[start..].split('"').next().unwrap().to_string()
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

impl T {
    async fn call(&self, method: &str, uri: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "127.0.0.1:8080");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        if method == "POST" {
            b = b.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        let resp = self
            .router
            .clone()
            .oneshot(b.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 10 << 20)
            .await
            .unwrap();
        Resp {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).to_string(),
        }
    }

    /// Logs in with `token`; returns the session's `Cookie` header value.
    async fn login(&self, token: &str) -> String {
        let form = self.call("GET", "/ui/login", &[], "").await;
        assert_eq!(form.status, StatusCode::OK);
        let csrf = hidden(&form.text, "csrf");
        let login_cookie = cookie_pair(&form.cookie("chiffon_login").unwrap());
        let resp = self
            .call(
                "POST",
                "/ui/login",
                &[("cookie", &login_cookie)],
                &format!("token={token}&csrf={csrf}"),
            )
            .await;
        assert_eq!(resp.status, StatusCode::SEE_OTHER, "{}", resp.text);
        assert_eq!(resp.location(), "/ui/");
        let set = resp.cookie("chiffon_session").expect("a session cookie");
        assert!(set.contains("HttpOnly"), "{set}");
        assert!(set.contains("SameSite=Strict"), "{set}");
        assert!(!set.contains(token), "the token never reaches a cookie");
        cookie_pair(&set)
    }

    async fn awaiting(&self, text: &str) -> Uuid {
        let r = self
            .app
            .engine()
            .submit(SubmitRequest {
                text: text.into(),
                requester: Some("rick".into()),
                submitted_by: Some("rick".into()),
                dry_run: false,
                trace_id: None,
                request_id: None,
            })
            .await
            .unwrap();
        let r = self
            .app
            .engine()
            .wait_until(r.id, &[RequestStatus::AwaitingApproval])
            .await
            .unwrap();
        assert_eq!(r.status, RequestStatus::AwaitingApproval);
        r.id
    }
}

#[tokio::test]
async fn root_redirects_browsers_only() {
    let t = setup(false).await;
    let r = t
        .call(
            "GET",
            "/",
            &[("accept", "text/html,application/xhtml+xml")],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/ui/");
    let r = t
        .call("GET", "/", &[("accept", "application/json")], "")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.text.contains("5505"), "{}", r.text);
    let r = t.call("POST", "/", &[("accept", "text/html")], "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pages_carry_security_headers_and_escape() {
    let t = setup(false).await;
    let id = t.awaiting("<script>alert('x')</script> & steps=1").await;
    for path in [
        "/ui/".to_string(),
        format!("/ui/request/{id}"),
        "/ui/agents".into(),
        "/ui/costs".into(),
        "/ui/audit?verify=1".into(),
    ] {
        let r = t.call("GET", &path, &[], "").await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        assert!(!csp.contains("unsafe-inline"));
        assert_eq!(r.headers["x-frame-options"], "DENY");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        assert_eq!(r.headers["referrer-policy"], "same-origin");
        assert!(!r.text.contains("<script>alert"), "{path} escapes");
        assert!(!r.text.contains("<script>"), "{path}: no inline script");
    }
    let page = t.call("GET", &format!("/ui/request/{id}"), &[], "").await;
    assert!(page.text.contains("&#60;script&#62;alert") || page.text.contains("&lt;script&gt;"));
    assert!(page.text.contains("id=\"approve\""), "local is an admin");
    let audit = t.call("GET", "/ui/audit?verify=1", &[], "").await;
    assert!(audit.text.contains("id=\"verify-result\""));
    assert!(audit.text.contains("Verified"), "{}", audit.text);
    let js = t.call("GET", "/ui/static/console.js", &[], "").await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(js.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let r = t.call("GET", "/ui/request/not-a-uuid", &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .call("GET", &format!("/ui/request/{}", Uuid::nil()), &[], "")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
}

#[tokio::test]
async fn without_tokens_local_approves_with_the_csrf_token() {
    let t = setup(false).await;
    let id = t.awaiting("steps=1").await;
    let page = t.call("GET", &format!("/ui/request/{id}"), &[], "").await;
    let csrf = hidden(&page.text, "csrf");
    let uri = format!("/ui/request/{id}/decide");
    let r = t
        .call("POST", &uri, &[], "csrf=wrong&decision=approve")
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .call(
            "POST",
            &uri,
            &[],
            &format!("csrf={csrf}&decision=approve&comment=fine+by+me"),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let done = t.app.engine().wait_until(id, &[]).await.unwrap();
    assert_eq!(done.status, RequestStatus::Completed);
    assert_eq!(done.approver.as_deref(), Some("local"));
    assert_eq!(done.approval_comment.as_deref(), Some("fine by me"));
    // Deciding again is the engine's 409, shown as a page.
    let r = t
        .call("POST", &uri, &[], &format!("csrf={csrf}&decision=reject"))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.text.contains("<html"));
}

#[tokio::test]
async fn login_sessions_roles_and_cross_site() {
    let t = setup(true).await;
    let id = t.awaiting("steps=1").await;

    // No session: pages go to the login form, other requests are refused.
    let r = t.call("GET", "/ui/", &[], "").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/ui/login");
    let r = t
        .call("GET", &format!("/ui/request/{id}/events"), &[], "")
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A bearer token does not open the console: only a session does.
    let r = t
        .call(
            "GET",
            "/ui/",
            &[("authorization", &format!("Bearer {APPROVER}"))],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);

    // The login form's own CSRF check, and a wrong token.
    let form = t.call("GET", "/ui/login", &[], "").await;
    let csrf = hidden(&form.text, "csrf");
    let login_cookie = cookie_pair(&form.cookie("chiffon_login").unwrap());
    let r = t
        .call(
            "POST",
            "/ui/login",
            &[],
            &format!("token={APPROVER}&csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "no login cookie");
    let r = t
        .call(
            "POST",
            "/ui/login",
            &[("cookie", &login_cookie)],
            &format!("token=nope&csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.text.contains("unknown token"));

    // A viewer reads but sees no buttons, and its POST is refused.
    let viewer = t.login(VIEWER).await;
    let page = t
        .call(
            "GET",
            &format!("/ui/request/{id}"),
            &[("cookie", &viewer)],
            "",
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("noop"), "the plan is shown");
    assert!(!page.text.contains("id=\"approve\""));
    let vcsrf = hidden(&page.text, "csrf");
    let uri = format!("/ui/request/{id}/decide");
    let r = t
        .call(
            "POST",
            &uri,
            &[("cookie", &viewer)],
            &format!("csrf={vcsrf}&decision=approve"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert!(r.text.contains("5504"), "{}", r.text);

    // An approver's form needs its own session's CSRF token.
    let approver = t.login(APPROVER).await;
    let page = t
        .call(
            "GET",
            &format!("/ui/request/{id}"),
            &[("cookie", &approver)],
            "",
        )
        .await;
    assert!(page.text.contains("id=\"approve\""));
    let acsrf = hidden(&page.text, "csrf");
    assert_ne!(acsrf, vcsrf);
    let r = t
        .call(
            "POST",
            &uri,
            &[("cookie", &approver)],
            &format!("csrf={vcsrf}&decision=approve"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "another session's token");

    // A cross-site post is refused by the guard, session cookie or not.
    let r = t
        .call(
            "POST",
            &uri,
            &[
                ("cookie", &approver),
                ("origin", "http://evil.example"),
                ("sec-fetch-site", "cross-site"),
            ],
            &format!("csrf={acsrf}&decision=approve"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.text.contains("5508"), "{}", r.text);
    let now = t.app.engine().get(id).await.unwrap().request;
    assert_eq!(now.status, RequestStatus::AwaitingApproval);

    let r = t
        .call(
            "POST",
            &uri,
            &[("cookie", &approver), ("origin", "http://127.0.0.1:8080")],
            &format!("csrf={acsrf}&decision=reject&comment=not+today"),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let now = t.app.engine().get(id).await.unwrap().request;
    assert_eq!(now.status, RequestStatus::Rejected);
    assert_eq!(now.approver.as_deref(), Some("anna"));

    // Logout ends the session.
    let r = t
        .call(
            "POST",
            "/ui/logout",
            &[("cookie", &approver)],
            &format!("csrf={acsrf}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let r = t.call("GET", "/ui/", &[("cookie", &approver)], "").await;
    assert_eq!(r.location(), "/ui/login");
}

#[tokio::test]
async fn the_openapi_document_leaves_the_console_out() {
    let doc = chiffon_server::openapi();
    let paths = doc["paths"].as_object().unwrap();
    assert!(
        paths.keys().all(|p| !p.starts_with("/ui")),
        "{:?}",
        paths.keys()
    );
}
