//! [`Redactor`]: keeps configured secrets out of what Chiffon stores, shows and logs.
//!
//! Text from outside (an LLM provider's error body, an agent's error, a driver's message)
//! may echo a secret: an API that answers 401 with the key it was sent, a connection error
//! that quotes its URL. The binaries build one `Redactor` from every secret they read (LLM
//! API keys, HTTP API tokens, passwords in database and AMQP URLs, the audit key) and hand
//! it to the engine, which applies it where text is persisted (audit entries, a request's
//! error); each LLM provider also redacts its own key from the error text it keeps, so an
//! [`crate::llm::LlmError`] never carries it.
//!
//! Every occurrence of a secret becomes [`REDACTED`]. Secrets shorter than
//! [`MIN_SECRET_LEN`] are ignored: they would match ordinary words, and redaction cannot
//! protect a secret that short anyway. The redactor also replaces NUL characters, which
//! neither database can store, with U+FFFD, since it sits where text is persisted.

use std::borrow::Cow;
use std::sync::Arc;

use chiffon_protocol::ErrorPayload;
use serde_json::Value;

use crate::model::NewAuditEntry;

/// What a secret is replaced with.
pub const REDACTED: &str = "[REDACTED]";
/// Shorter secrets are not redacted (see the module docs).
pub const MIN_SECRET_LEN: usize = 8;

/// A set of secrets to strike from text. Cheap to clone (one `Arc`); `Debug` shows only
/// how many secrets it holds.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret that contains another is replaced whole.
    secrets: Arc<[String]>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl PartialEq for Redactor {
    fn eq(&self, other: &Self) -> bool {
        self.secrets == other.secrets
    }
}

impl Redactor {
    /// A redactor for `secrets` (blank and short ones are left out, duplicates merged).
    pub fn new<I, S>(secrets: I) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Redactor::default().with(secrets)
    }

    /// This redactor and `more` secrets.
    pub fn with<I, S>(&self, more: I) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut all: Vec<String> = self.secrets.to_vec();
        for s in more {
            let s = s.as_ref().trim();
            if s.chars().count() >= MIN_SECRET_LEN && !all.iter().any(|a| a == s) {
                all.push(s.to_string());
            }
        }
        all.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Redactor {
            secrets: all.into(),
        }
    }

    /// This redactor and `other`'s secrets.
    pub fn merge(&self, other: &Redactor) -> Redactor {
        self.with(other.secrets.iter())
    }

    /// How many secrets it strikes.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `text` with every secret replaced by [`REDACTED`] and NUL by U+FFFD; borrowed when
    /// there is nothing to replace.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let hit = text.contains('\0') || self.secrets.iter().any(|s| text.contains(s.as_str()));
        if !hit {
            return Cow::Borrowed(text);
        }
        let mut out = text.replace('\0', "\u{FFFD}");
        for s in self.secrets.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), REDACTED);
            }
        }
        Cow::Owned(out)
    }

    /// Redacts a string in place.
    pub fn redact_string(&self, s: &mut String) {
        if let Cow::Owned(clean) = self.redact(s) {
            *s = clean;
        }
    }

    /// Redacts every string (and object key) of a JSON value in place.
    pub fn redact_json(&self, v: &mut Value) {
        match v {
            Value::String(s) => self.redact_string(s),
            Value::Array(items) => items.iter_mut().for_each(|i| self.redact_json(i)),
            Value::Object(map) => {
                let dirty = map.keys().any(|k| matches!(self.redact(k), Cow::Owned(_)));
                if dirty {
                    let old = std::mem::take(map);
                    for (k, mut item) in old {
                        self.redact_json(&mut item);
                        map.insert(self.redact(&k).into_owned(), item);
                    }
                } else {
                    map.values_mut().for_each(|i| self.redact_json(i));
                }
            }
            _ => {}
        }
    }

    /// Redacts an error's message and details in place.
    pub fn redact_error(&self, e: &mut ErrorPayload) {
        self.redact_string(&mut e.message);
        self.redact_json(&mut e.details);
    }

    /// Audit entries with their actor and details redacted (what [`crate::engine::Engine`]
    /// appends; the event is a name from [`crate::audit::AuditEvent`]).
    pub fn redact_audit(&self, mut entries: Vec<NewAuditEntry>) -> Vec<NewAuditEntry> {
        for e in &mut entries {
            self.redact_string(&mut e.actor);
            self.redact_json(&mut e.details);
        }
        entries
    }
}

/// The password of a URL's `user:password@` part, as written and percent-decoded (a
/// driver's message may quote either). Empty when the URL has none.
pub fn url_password(url: &str) -> Vec<String> {
    let Some(scheme_end) = url.find("://") else {
        return Vec::new();
    };
    let rest = &url[scheme_end + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return Vec::new();
    };
    let Some((_, password)) = authority[..at].split_once(':') else {
        return Vec::new();
    };
    if password.is_empty() {
        return Vec::new();
    }
    let mut out = vec![password.to_string()];
    let decoded = percent_decode(password);
    if decoded != password {
        out.push(decoded);
    }
    out
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strikes_every_secret_longest_first() {
        let r = Redactor::new([
            "sk-ant-secret-1234",
            "sk-ant-secret-1234-longer",
            "",
            "short",
        ]);
        assert_eq!(r.len(), 2, "blank and short secrets are ignored");
        assert_eq!(
            r.redact("key sk-ant-secret-1234-longer and sk-ant-secret-1234."),
            "key [REDACTED] and [REDACTED]."
        );
        assert!(matches!(r.redact("nothing here"), Cow::Borrowed(_)));
        assert_eq!(r.redact("a\0b"), "a\u{FFFD}b");
        assert_eq!(Redactor::default().redact("short"), "short");
        assert!(!format!("{r:?}").contains("sk-ant"));
    }

    #[test]
    fn json_errors_and_audit_entries() {
        let r = Redactor::new(["tok-0123456789abcdef"]);
        let mut v =
            json!({"a": ["x tok-0123456789abcdef"], "tok-0123456789abcdef": {"n": 1}, "k": 2});
        r.redact_json(&mut v);
        assert_eq!(
            v,
            json!({"a": ["x [REDACTED]"], "[REDACTED]": {"n": 1}, "k": 2})
        );
        let mut e = ErrorPayload::new(
            chiffon_protocol::ErrorCode::LlmAuth,
            "bad key tok-0123456789abcdef",
        );
        r.redact_error(&mut e);
        assert_eq!(e.message, "bad key [REDACTED]");
        let entries = r.redact_audit(vec![NewAuditEntry {
            request_id: None,
            actor: "planner".into(),
            event: crate::audit::AuditEvent::Fallback,
            details: json!({"reason": "tok-0123456789abcdef"}),
        }]);
        assert_eq!(entries[0].details["reason"], "[REDACTED]");
        let more = Redactor::new(["another-secret-value"]).merge(&r);
        assert_eq!(more.len(), 2);
    }

    #[test]
    fn url_passwords() {
        assert_eq!(
            url_password("postgres://u:s%40cret-pass@db:5432/x"),
            vec!["s%40cret-pass".to_string(), "s@cret-pass".to_string()]
        );
        assert_eq!(
            url_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            vec!["guest".to_string()]
        );
        assert!(url_password("sqlite://a.db").is_empty());
        assert!(url_password("http://user@host/").is_empty());
        assert!(url_password("http://host/p?x=a:b@c").is_empty());
    }
}
