//! Which HTTP requests the server answers at all, before authentication and on every route
//! (`/health` included):
//!
//! - **Host allow-list.** A page on `evil.example` whose name is re-pointed at 127.0.0.1
//!   (DNS rebinding) reaches a loopback server as "same origin"; only its `Host` header gives
//!   it away. The server answers the loopback names, its bind address and
//!   `server.allowed_hosts`; any other host (or none) gets 421 (5507).
//! - **Cross-site writes.** A state-changing request (POST, PUT, PATCH, DELETE) that a browser
//!   marks as coming from another site (`Sec-Fetch-Site` other than `same-origin`/`none`, or
//!   an `Origin` whose host is not allowed, or `Origin: null`) gets 403 (5508). CLI, curl and
//!   scripts send neither header and pass.
//!
//! A token does not lift either check: a browser may hold one (or a proxy may add it).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chiffon_protocol::ErrorCode;
use serde_json::json;

use crate::error::AppError;

/// The hosts the server answers.
#[derive(Debug, Clone, Default)]
pub struct HostPolicy {
    /// Normalized (lowercase, no port, no brackets) names and addresses.
    hosts: HashSet<String>,
}

impl HostPolicy {
    /// Loopback names and addresses, `bind`'s address (unless it is a wildcard such as
    /// 0.0.0.0, which names no host), and `extra` (`server.allowed_hosts`; entries that are
    /// not host names are ignored here, refused by the configuration's validation).
    pub fn new(bind: Option<SocketAddr>, extra: &[String]) -> Self {
        let mut hosts: HashSet<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .map(str::to_string)
            .collect();
        if let Some(addr) = bind {
            if !addr.ip().is_unspecified() {
                hosts.insert(addr.ip().to_string());
            }
        }
        hosts.extend(extra.iter().filter_map(|h| normalize_host(h)));
        HostPolicy { hosts }
    }

    /// Whether `value` (a `Host` header or URI authority, port optional) names this server.
    pub fn allows(&self, value: &str) -> bool {
        let Some(host) = normalize_host(value) else {
            return false;
        };
        if self.hosts.contains(&host) {
            return true;
        }
        // An address literal of the loopback network cannot be a rebound name.
        host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// The host part of `HOST[:PORT]` (IPv6 in brackets, or bare), lowercase, without a trailing
/// dot, addresses in their canonical form; `None` when it is not a host name or address.
pub fn normalize_host(value: &str) -> Option<String> {
    let value = value.trim();
    if value.is_empty() || value.len() > 255 {
        return None;
    }
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = inner.parse().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (ip.to_string(), port)
    } else if value.matches(':').count() >= 2 {
        // A bare IPv6 address (not valid in a Host header, but clear).
        let ip: Ipv6Addr = value.parse().ok()?;
        (ip.to_string(), None)
    } else {
        let (host, port) = match value.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        };
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            && !host.starts_with('.')
            && !host.contains("..");
        if !valid {
            return None;
        }
        (host, port)
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    Some(host)
}

/// The middleware: 421 for a host not on the list, 403 for a cross-site write.
pub async fn check(State(policy): State<Arc<HostPolicy>>, req: Request, next: Next) -> Response {
    if let Err(e) = check_host(&policy, &req) {
        return e.into_response();
    }
    if !is_safe(req.method()) {
        if let Err(e) = check_cross_site(&policy, req.headers()) {
            return e.into_response();
        }
    }
    next.run(req).await
}

fn check_host(policy: &HostPolicy, req: &Request) -> Result<(), AppError> {
    let header = match req.headers().get(header::HOST) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| host_error("(not text)"))?),
    };
    // An absolute-form request line carries the authority itself; both must be allowed.
    let authority = req.uri().authority().map(|a| a.as_str());
    let authority = authority.map(|a| a.rsplit_once('@').map_or(a, |(_, host)| host));
    if header.is_none() && authority.is_none() {
        return Err(AppError::new(
            ErrorCode::HostNotAllowed,
            "the request names no host (send a `Host` header)",
        )
        .with_details(json!({ "host": null })));
    }
    for host in [header, authority].into_iter().flatten() {
        if !policy.allows(host) {
            return Err(host_error(host));
        }
    }
    Ok(())
}

fn host_error(host: &str) -> AppError {
    AppError::new(
        ErrorCode::HostNotAllowed,
        format!(
            "this server does not answer for host `{host}`; add it to server.allowed_hosts (CHIFFON_ALLOWED_HOSTS) if it is yours"
        ),
    )
    .with_details(json!({ "host": host }))
}

fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

fn check_cross_site(policy: &HostPolicy, headers: &HeaderMap) -> Result<(), AppError> {
    let refuse = |header: &str, value: &str| {
        Err(AppError::new(
            ErrorCode::CrossSiteRequest,
            format!("cross-site request refused ({header}: {value})"),
        )
        .with_details(json!({ "header": header, "value": value })))
    };
    if let Some(v) = headers.get("sec-fetch-site") {
        let site = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
        if site != "same-origin" && site != "none" {
            return refuse("sec-fetch-site", &site);
        }
    }
    if let Some(v) = headers.get(header::ORIGIN) {
        let origin = v.to_str().unwrap_or("").trim();
        let host = origin
            .split_once("://")
            .map(|(_, rest)| rest)
            .filter(|rest| !rest.contains('/') && !rest.contains('@'));
        if !host.is_some_and(|h| policy.allows(h)) {
            return refuse("origin", origin);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_part_is_compared_without_port_or_brackets() {
        assert_eq!(
            normalize_host("LocalHost:8080").as_deref(),
            Some("localhost")
        );
        assert_eq!(normalize_host("localhost.").as_deref(), Some("localhost"));
        assert_eq!(normalize_host("[::1]:8080").as_deref(), Some("::1"));
        assert_eq!(normalize_host("[0:0:0:0:0:0:0:1]").as_deref(), Some("::1"));
        assert_eq!(normalize_host("::1").as_deref(), Some("::1"));
        assert_eq!(normalize_host("127.0.0.1:80").as_deref(), Some("127.0.0.1"));
        for bad in [
            "",
            "a b",
            "[::1",
            "[::1]x",
            "host:",
            "host:port",
            "a/b",
            "..",
            "x:123456",
        ] {
            assert_eq!(normalize_host(bad), None, "{bad}");
        }
    }

    #[test]
    fn loopback_bind_and_configured_hosts_only() {
        let p = HostPolicy::new(
            Some("10.1.2.3:8080".parse().unwrap()),
            &["Chiffon.LAN".into(), "[fd00::1]".into()],
        );
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "127.0.0.2",
            "[::1]:8080",
            "10.1.2.3:8080",
            "chiffon.lan",
            "chiffon.lan:443",
            "[fd00::1]:8080",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.1.2.4",
            "",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
        // A wildcard bind names no host.
        let p = HostPolicy::new(Some("0.0.0.0:8080".parse().unwrap()), &[]);
        assert!(!p.allows("0.0.0.0"));
    }
}
