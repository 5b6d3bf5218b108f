//! The console's sessions and CSRF tokens.
//!
//! With API tokens configured, a person logs in with a token once: the server keeps a random
//! session id → identity map in memory (with an expiry) and sets only that id in an
//! `HttpOnly`, `SameSite=Strict` cookie; the token itself never reaches a cookie. Each
//! session carries a CSRF token that every form repeats in a hidden field. Without tokens
//! (loopback only) every visitor is the admin `local`, and the forms carry a per-process
//! CSRF token.
//!
//! Sessions live in this process only: a restart logs everyone out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

use crate::auth::Identity;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "chiffon_session";
/// The login form's CSRF cookie (double submit: there is no session yet).
pub const LOGIN_COOKIE: &str = "chiffon_login";
/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once; the oldest go first.
const MAX_SESSIONS: usize = 10_000;

/// A logged-in person.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity: Identity,
    pub csrf: String,
    expires: Instant,
}

/// Sessions and the anonymous CSRF token.
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    /// The forms' CSRF token when no API tokens are configured.
    pub anonymous_csrf: String,
    /// Mark cookies `Secure` (`server.secure_cookies`).
    pub secure: bool,
}

/// 244 random bits as 64 hex characters (two v4 uuids: the OS's random source).
pub fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Sessions {
    pub fn new(secure: bool) -> Self {
        Sessions {
            map: Mutex::new(HashMap::new()),
            anonymous_csrf: random_token(),
            secure,
        }
    }

    /// Opens a session; returns its id (for the cookie).
    pub fn open(&self, identity: Identity) -> String {
        let id = random_token();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            id.clone(),
            Session {
                identity,
                csrf: random_token(),
                expires: now + SESSION_TTL,
            },
        );
        id
    }

    /// The live session `id` names.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// A `Set-Cookie` value: HttpOnly, SameSite=Strict, path `/ui` (the console only; the
    /// session's events stream lives under it), `Secure` when configured.
    pub fn cookie(&self, name: &str, value: &str, max_age: Option<Duration>) -> String {
        let mut c = format!("{name}={value}; Path=/ui; HttpOnly; SameSite=Strict");
        if let Some(age) = max_age {
            c.push_str(&format!("; Max-Age={}", age.as_secs()));
        }
        if self.secure {
            c.push_str("; Secure");
        }
        c
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// Compares two CSRF tokens in constant time.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use axum::http::HeaderValue;

    #[test]
    fn sessions_open_find_and_close() {
        let s = Sessions::new(false);
        let id = s.open(Identity {
            name: "anna".into(),
            role: Role::Approver,
            anonymous: false,
        });
        assert_eq!(id.len(), 64);
        let got = s.get(&id).unwrap();
        assert_eq!(got.identity.name, "anna");
        assert_ne!(got.csrf, id);
        assert!(s.get("nope").is_none());
        s.close(&id);
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn cookies_are_parsed_and_flagged() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; chiffon_session=abc"),
        );
        assert_eq!(cookie_value(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie_value(&h, "b"), None);
        let c = Sessions::new(true).cookie(SESSION_COOKIE, "x", None);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert!(!Sessions::new(false)
            .cookie("a", "b", None)
            .contains("Secure"));
        assert!(same_token("abc", "abc") && !same_token("abc", "abd") && !same_token("a", "ab"));
    }
}
