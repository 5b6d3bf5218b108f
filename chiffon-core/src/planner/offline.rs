//! The offline planner: the last link of the chain, deterministic and local.
//!
//! It plans only what it reads for sure, and refuses the rest with the reason:
//!
//! 1. **The verb decides what is done.** Each action declares the verbs it performs
//!    (`verbs` in `action.toml`). A request's verb that no action performs ("delete",
//!    "uninstall", "stop"…), a destructive verb anywhere in it, or a negation ("don't",
//!    "never", "without creating…") fails planning with the list of what the catalog can
//!    do. Keywords only choose among the actions that perform the verb, and the object of
//!    the verb ("a *user*") must be something the chosen action handles.
//! 2. **Every value is accounted for.** Paths, numbers, quoted strings, hosts, modes,
//!    owners, durations, `key=value` pairs and "fail if closed"-like conditions found in
//!    the text must each land in a parameter, or planning fails naming the value. Several
//!    objects ("/a and /b", "ports 22 and 80") give one step each. Hosts must be in the
//!    inventory. Each step records, per parameter, whether its value came from the text or
//!    is the catalog's default ([`ParamSource`]).
//!
//! The request is split into clauses ("…, then …", "…; …", "… and VERB …"), each planned
//! as above; a host named once serves the other clauses.

// Token positions are the point of most loops here: indexes, not iterators.
#![allow(clippy::needless_range_loop)]

use std::collections::BTreeMap;

use chiffon_protocol::ErrorCode;
use serde_json::{json, Map, Value};

use crate::catalog::{pattern_matches, ActionSpec, Catalog, ParamSpec, ParamType};
use crate::model::{ParamSource, Plan, PlanStep};

/// `provider` of an offline plan.
pub const PROVIDER: &str = "offline";
/// `model` of an offline plan (the matching scheme's version).
pub const MODEL: &str = "verb-match-v2";

/// The offline planner could not plan the request (it refused rather than guess).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct OfflineError {
    pub message: String,
    /// The action it settled on, if it got that far.
    pub action: Option<String>,
    /// The parameter it could not work out, or the one a refused value was meant for.
    pub parameter: Option<String>,
    /// What the refusal is about: `reason` (`no_verb`, `unknown_verb`, `negated`,
    /// `no_object`, `ambiguous`, `several_objects`, `unaccounted_value`, `unknown_host`,
    /// `missing_parameter`, `invalid_parameter`), and `verb`, `value`, `host`, `hosts`,
    /// `catalog` as they apply.
    pub details: Value,
}

impl OfflineError {
    /// [`ErrorCode::PlanInvalidParameter`] when a value the text gives fails the schema,
    /// [`ErrorCode::NoPlan`] otherwise.
    pub fn code(&self) -> ErrorCode {
        if self.details["reason"] == "invalid_parameter" {
            ErrorCode::PlanInvalidParameter
        } else {
            ErrorCode::NoPlan
        }
    }

    /// Why it refused, as in `details.reason`.
    pub fn reason(&self) -> &str {
        self.details["reason"].as_str().unwrap_or("")
    }

    fn with(mut self, spec: &ActionSpec, parameter: &str) -> Self {
        self.action = Some(spec.name.clone());
        self.parameter = Some(parameter.to_string());
        self
    }
}

fn refuse(reason: &str, message: String, extra: Value) -> OfflineError {
    let mut details = json!({ "reason": reason });
    if let (Some(d), Value::Object(e)) = (details.as_object_mut(), extra) {
        d.extend(e);
    }
    OfflineError {
        message,
        action: None,
        parameter: None,
        details,
    }
}

/// The offline planner. `min_score` is how strongly the verb's object must match an
/// action's keywords when several actions perform the verb (a keyword word at the object's
/// head counts 4, elsewhere in the object 3, elsewhere in the request 1; the action's
/// name holding the verb 0.25, its keywords 0.5).
#[derive(Debug, Clone)]
pub struct OfflinePlanner {
    pub min_score: f64,
}

impl Default for OfflinePlanner {
    fn default() -> Self {
        OfflinePlanner { min_score: 0.25 }
    }
}

// ---------------------------------------------------------------------------------------
// Vocabulary

#[rustfmt::skip]
const STOPWORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "to", "on", "in", "of", "for", "with", "at", "by", "from", "is",
    "are", "be", "it", "its", "it's", "this", "that", "these", "those", "please", "can", "could",
    "would", "you", "me", "my", "our", "we", "i", "i'd", "i'm", "then", "also", "into", "onto",
    "as", "so", "do", "does", "some", "any", "all", "just", "there", "here", "via", "using", "will",
    "should", "must", "let", "let's", "which", "what", "when", "where", "how", "if", "up", "out",
    "kindly", "want", "like", "need", "needs", "go", "ahead", "now", "new", "exists", "exist",
    "existing", "there's", "one", "called", "named", "under", "inside", "within", "whether",
    "whose", "sure", "make", "get", "have", "has", "been", "being", "again", "quickly", "right",
    "away", "asap", "thanks", "thank", "hey", "hi", "ok", "okay", "yes", "both", "each", "every",
    "same", "own", "their", "your", "his", "her", "them", "they", "he", "she", "file's",
    "already", "still", "only", "too", "very", "really", "set", "give", "put", "present",
    "available", "correct", "proper", "properly", "was", "were", "am", "but", "because",
    "while", "about", "above", "below", "over", "per", "than", "once", "twice", "something",
];

/// Negations: a request holding one that no parameter explains is refused.
#[rustfmt::skip]
const NEGATIONS: &[&str] = &[
    "don't", "dont", "not", "never", "no", "without", "cannot", "can't", "cant", "won't",
    "wont", "shouldn't", "mustn't", "didn't", "doesn't", "isn't", "aren't", "neither", "nor",
    "avoid", "refrain",
];

/// Verbs the catalog may not perform: recognised so the refusal names them. A catalog
/// action that declares one performs it.
#[rustfmt::skip]
const OTHER_VERBS: &[&str] = &[
    "delete", "remove", "uninstall", "stop", "disable", "purge", "close", "destroy", "kill",
    "erase", "wipe", "drop", "shut down", "shutdown", "take down", "tear down", "turn off",
    "get rid of", "clean", "clean up", "clear", "empty", "truncate", "revoke", "unmount",
    "terminate", "rm", "rmdir", "unlink", "undeploy", "downgrade", "restart", "reboot", "reload",
    "start", "enable", "open", "move", "rename", "copy", "chmod", "chown", "download", "upload",
    "backup", "back up", "restore", "roll back", "rollback", "reset", "block", "unblock", "allow",
    "deny", "edit", "modify", "append", "read", "show", "list", "print", "cat", "monitor",
    "touch", "scale", "migrate", "mount", "format", "fix", "debug", "send", "email", "notify",
    "build", "compile", "upgrade", "update", "patch", "replace", "change", "add", "register",
    "sync", "pull", "push", "clone", "fetch", "schedule", "kill off", "flush", "rotate", "apply",
    "grant", "lock", "unlock", "run", "execute", "launch", "spin up", "bring up", "bring down",
    "spin down", "deactivate", "activate", "make", "probe", "check", "test", "scan", "verify",
    "bake", "cook", "order", "buy", "mask", "unmask", "forget", "cancel", "abort",
];

/// Verbs that undo or destroy: refused wherever they appear in a clause (not only first).
#[rustfmt::skip]
const DESTRUCTIVE: &[&str] = &[
    "delete", "remove", "uninstall", "stop", "disable", "purge", "destroy", "kill", "erase",
    "wipe", "shut down", "shutdown", "take down", "tear down", "turn off", "get rid of",
    "truncate", "revoke", "unmount", "terminate", "rm", "rmdir", "unlink", "undeploy",
    "deactivate", "bring down", "spin down",
];

/// Words that introduce a value: left unexplained, they make the request refused.
#[rustfmt::skip]
const INTRODUCERS: &[&str] = &[
    "named", "called", "owner", "owned", "user", "group", "chown", "belonging", "belongs",
    "containing", "contains", "content", "contents", "description", "described", "fail",
    "failing", "fails", "require", "requires", "required", "recursively", "recursive", "sudo",
    "root", "timeout", "retry", "retries", "every", "daily", "hourly", "weekly", "cron", "mode",
    "permissions", "perms", "chmod",
];

const HOST_NOUNS: &[&str] = &["host", "server", "machine", "node", "box", "computer", "vm"];

/// Words after "on"/"to"/"at" that are not host names.
#[rustfmt::skip]
const NOT_HOSTS: &[&str] = &[
    "port", "ports", "startup", "boot", "reboot", "demand", "it", "them", "disk", "top",
    "success", "failure", "error", "mode", "permissions", "version", "tag", "release", "be",
    "read", "write", "everyone", "all", "default", "defaults", "tcp", "path",
    "folder", "directory", "file", "files", "wait", "localhost", "least", "most", "once",
    "otherwise", "open", "closed", "listen", "listening", "seconds", "minutes", "content",
];

/// Words that end the verb's object: they introduce a value ("htop *version* 3").
#[rustfmt::skip]
const HEAD_STOPS: &[&str] = &[
    "version", "tag", "release", "port", "ports", "mode", "permissions", "owner", "host",
    "description", "content", "wait", "timeout",
];

#[rustfmt::skip]
const PREPOSITIONS: &[&str] = &[
    "on", "onto", "to", "at", "in", "into", "under", "with", "for", "from", "named", "called",
    "that", "which", "as", "using", "containing", "owned", "by", "mode", "via", "inside",
    "within", "whose", "listening", "running", "runs", "where", "so", "if", "and", "of",
];

/// Words that change nothing in a request: politeness, conditions the actions meet anyway
/// (they are idempotent), the nouns of the catalog's things.
#[rustfmt::skip]
const HARMLESS: &[&str] = &[
    "quickly", "today", "exists", "missing", "unless", "otherwise", "already", "twice",
    "anyway", "still", "afterwards", "there", "thing", "things", "whatever", "fine", "good",
    "again", "exactly", "please", "thanks", "kindly", "new", "private", "shared", "empty",
    "temporary", "temp", "local", "main", "default", "public", "fresh", "another", "extra",
    "separate", "dedicated", "single", "little", "simple", "basic", "small", "custom", "data",
    "docker", "compose", "container", "instance", "stack", "web", "page", "interface", "ui",
    "project", "it", "one", "answer", "answers", "responds", "respond", "accepting",
    "connections", "something", "anything", "listens", "listening", "reachable", "running",
    "up", "live", "alive", "work", "works", "working", "me", "us", "for", "file", "files",
    "folder", "directory", "config", "configuration", "settings", "name", "path", "location",
    "place", "called", "named", "exist", "present", "all", "agents", "pipeline", "app",
    "application", "wait", "waiting", "seconds", "second", "minutes", "minute", "hour",
    "hours", "sec", "secs", "min", "mins", "s", "ms", "number", "tcp", "command", "unit",
    "service", "systemd", "status", "monitoring", "monitor", "uptime", "kuma", "version",
    "tag", "release", "latest", "port", "ports", "mode", "permissions", "owner", "host",
    "machine", "server", "box", "node", "computer", "local", "locally", "nothing", "closed",
    "open", "whether", "check", "checking", "is", "are", "was", "able", "make", "sure",
    "exists", "ensure", "ready", "before", "after", "first", "last", "next", "both",
];

/// A word the planner knows: a stopword, a verb, a catalog keyword or name word, a
/// parameter's name word, or a harmless one. Any other word may carry meaning the plan
/// would drop ("behind nginx", "with https"), so a clause holding one is refused.
fn known_word(w: &str, catalog: &Catalog, verbs: &Verbs) -> bool {
    let w = w.trim_matches('\'');
    if w.is_empty()
        || is_stopword(w)
        || HARMLESS.contains(&w)
        || PREPOSITIONS.contains(&w)
        || HOST_NOUNS.contains(&w)
        || HEAD_STOPS.contains(&w)
        || NEGATIONS.contains(&w)
        || INTRODUCERS.contains(&w)
        || unit(w).is_some()
        || number_word(w).is_some()
        || verbs
            .all
            .iter()
            .any(|(words, _)| words.iter().any(|v| is_verb_form(v, w)))
    {
        return true;
    }
    catalog.actions.values().any(|a| {
        a.keywords
            .iter()
            .flat_map(|k| k.split_whitespace())
            .chain(a.name.split('_'))
            .chain(a.parameters.keys().flat_map(|p| p.split('_')))
            .map(str::to_lowercase)
            // Exactly the word or its plural: "startup" is not "start".
            .any(|k| k == w || format!("{k}s") == w || format!("{k}es") == w)
    })
}

fn is_stopword(w: &str) -> bool {
    STOPWORDS.contains(&w)
}

/// Whether two words are the same word up to an ending (`deploy`/`deployment`,
/// `service`/`services`).
fn similar(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if short.len() < 4 || long.len() - short.len() > 4 {
        return false;
    }
    let stem = if short.len() >= 5 {
        short.strip_suffix('e').unwrap_or(short)
    } else {
        short
    };
    long.starts_with(stem)
}

/// One edit (insertion, deletion, substitution or swap of neighbours) apart.
fn one_typo(a: &str, b: &str) -> bool {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a == b || a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    let p = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if a.len() == b.len() {
        if a[p + 1..] == b[p + 1..] {
            return true;
        }
        p + 1 < a.len() && a[p] == b[p + 1] && a[p + 1] == b[p] && a[p + 2..] == b[p + 2..]
    } else if a.len() > b.len() {
        a[p + 1..] == b[p..]
    } else {
        b[p + 1..] == a[p..]
    }
}

/// The forms of a one-word verb: `create`, `creates`, `created`, `creating`, `stopped`.
/// Whether `w` is one of the forms of verb `v` ([`verb_forms`]), without building them
/// (the planner asks this for every word against every verb).
fn is_verb_form(v: &str, w: &str) -> bool {
    if let Some(rest) = w.strip_prefix(v) {
        if matches!(rest, "" | "s" | "es") {
            return true;
        }
        if v.ends_with('e') {
            if rest == "d" {
                return true;
            }
        } else {
            if matches!(rest, "ed" | "ing") {
                return true;
            }
            if let Some(r) = v.chars().last().and_then(|last| rest.strip_prefix(last)) {
                if matches!(r, "ed" | "ing") {
                    return true;
                }
            }
        }
    }
    v.strip_suffix('e')
        .and_then(|stem| w.strip_prefix(stem))
        .is_some_and(|rest| rest == "ing")
}

#[cfg(test)]
fn verb_forms(v: &str) -> Vec<String> {
    let mut out = vec![v.to_string(), format!("{v}s"), format!("{v}es")];
    if let Some(stem) = v.strip_suffix('e') {
        out.push(format!("{v}d"));
        out.push(format!("{stem}ing"));
    } else {
        out.push(format!("{v}ed"));
        out.push(format!("{v}ing"));
        if let Some(last) = v.chars().last() {
            out.push(format!("{v}{last}ed"));
            out.push(format!("{v}{last}ing"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Tokens

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Word,
    Path,
    /// `~/x`, `./x`, `x/y`: not an absolute path.
    RelPath,
    Quoted,
    Number,
    Url,
    Pair,
    Version,
    /// An IP address.
    Address,
    /// `name.tld`, `app.conf`: a host or a file name.
    Dotted,
    /// `host:1234`, `:8080`, `22/tcp`.
    HostPort,
    /// `-p`, `--force`.
    Flag,
    /// `30s`, `500ms`, `2min`.
    Duration,
    /// Anything else with odd characters.
    Other,
}

#[derive(Debug, Clone)]
struct Tok {
    raw: String,
    lower: String,
    kind: Kind,
    /// The value: a quoted string's inside, a pair's value, a host:port's port.
    value: String,
    /// A pair's key, a host:port's host.
    key: String,
    /// Punctuation that ended it (`,`, `;`, `.`), for clause and list boundaries.
    end: Option<char>,
}

impl Tok {
    fn is_word(&self, w: &str) -> bool {
        self.kind == Kind::Word && self.lower == w
    }
    /// A value that must land in a parameter: anything but a plain word, and words with
    /// digits in them (`web-03`, `db1`), which are names.
    fn is_value(&self) -> bool {
        self.kind != Kind::Word || self.lower.chars().any(|c| c.is_ascii_digit())
    }
}

fn is_ipv4(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()))
}

fn is_version(s: &str) -> bool {
    let bare = s.strip_prefix(['v', 'V']).unwrap_or(s);
    let core = bare.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = parts
        .iter()
        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    numeric && (parts.len() >= 2 || (bare != s && !core.is_empty())) && !is_ipv4(s)
}

fn duration_secs(s: &str) -> Option<(i64, &'static str)> {
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    unit(&s[digits.len()..]).map(|u| (n, u))
}

/// A time unit word: `s`, `seconds`, `ms`, `min`, `hours`…
fn unit(u: &str) -> Option<&'static str> {
    Some(match u {
        "ms" | "msec" | "millisecond" | "milliseconds" => "ms",
        "s" | "sec" | "secs" | "second" | "seconds" => "s",
        "m" | "min" | "mins" | "minute" | "minutes" => "min",
        "h" | "hr" | "hrs" | "hour" | "hours" => "h",
        _ => return None,
    })
}

fn number_word(w: &str) -> Option<i64> {
    Some(match w {
        "one" | "a" | "an" => 1,
        "two" => 2,
        "three" => 3,
        "four" => 4,
        "five" => 5,
        "six" => 6,
        "seven" => 7,
        "eight" => 8,
        "nine" => 9,
        "ten" => 10,
        "fifteen" => 15,
        "twenty" => 20,
        "thirty" => 30,
        "forty" => 40,
        "fifty" => 50,
        "sixty" => 60,
        "ninety" => 90,
        _ => return None,
    })
}

fn classify(raw: &str) -> Kind {
    let lower = raw.to_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Kind::Url;
    }
    if raw.starts_with('/') && raw.len() > 1 {
        return Kind::Path;
    }
    if raw.starts_with("~/") || raw.starts_with("./") || raw.starts_with("../") {
        return Kind::RelPath;
    }
    if raw.starts_with('-') && raw.len() > 1 {
        return Kind::Flag;
    }
    if raw.chars().all(|c| c.is_ascii_digit()) {
        return Kind::Number;
    }
    if duration_secs(&lower).is_some() {
        return Kind::Duration;
    }
    if raw.find('=').is_some_and(|eq| eq > 0) {
        return Kind::Pair;
    }
    if is_ipv4(raw) {
        return Kind::Address;
    }
    if is_version(raw) {
        return Kind::Version;
    }
    if let Some((_, p)) = raw.rsplit_once(':') {
        if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) {
            return Kind::HostPort;
        }
    }
    if let Some((a, b)) = raw.split_once('/') {
        let tcp = |s: &str| matches!(s.to_lowercase().as_str(), "tcp" | "udp");
        if (tcp(a) && b.chars().all(|c| c.is_ascii_digit()))
            || (tcp(b) && a.chars().all(|c| c.is_ascii_digit()) && !a.is_empty())
        {
            return Kind::HostPort;
        }
        return Kind::RelPath;
    }
    if raw.contains('.') && raw.split('.').all(|p| !p.is_empty()) {
        return Kind::Dotted;
    }
    let wordy = raw
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '\'' | '’'));
    if wordy {
        Kind::Word
    } else {
        Kind::Other
    }
}

fn tokenize(text: &str) -> Vec<Tok> {
    let chars: Vec<char> = text.chars().collect();
    let mut out: Vec<Tok> = Vec::new();
    let mut i = 0;
    let closer = |c: char| match c {
        '"' => Some('"'),
        '“' => Some('”'),
        '`' => Some('`'),
        '\'' => Some('\''),
        '‘' => Some('’'),
        _ => None,
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if let Some(close) = closer(c) {
            let end = chars[i + 1..]
                .iter()
                .position(|&x| x == close)
                .map(|p| p + i + 1);
            if let Some(end) = end {
                let inner: String = chars[i + 1..end].iter().collect();
                let mut j = end + 1;
                let mut endp = None;
                while j < chars.len() && matches!(chars[j], ',' | ';' | '.' | '!' | '?' | ')' | ':')
                {
                    if chars[j] != ')' && chars[j] != ':' {
                        endp = endp.or(Some(chars[j]));
                    }
                    j += 1;
                }
                let inner_trim = inner.trim();
                let kind = if inner_trim.starts_with('/') {
                    Kind::Path
                } else if classify(inner_trim) == Kind::Url {
                    Kind::Url
                } else {
                    Kind::Quoted
                };
                out.push(Tok {
                    raw: inner.clone(),
                    lower: inner.to_lowercase(),
                    kind,
                    value: inner,
                    key: String::new(),
                    end: endp,
                });
                i = j;
                continue;
            }
        }
        // A plain token, with `key="a b"` read as one.
        let mut j = i;
        let mut s = String::new();
        while j < chars.len() && !chars[j].is_whitespace() {
            if chars[j] == '=' && j + 1 < chars.len() && matches!(chars[j + 1], '"' | '\'') {
                let q = chars[j + 1];
                if let Some(p) = chars[j + 2..].iter().position(|&x| x == q) {
                    s.extend(&chars[j..j + 2 + p + 1]);
                    j = j + 2 + p + 1;
                    continue;
                }
            }
            s.push(chars[j]);
            j += 1;
        }
        i = j;
        let mut t = s.as_str();
        t = t.trim_start_matches(['(', '[', '"', '\'', '“', '‘']);
        let mut end = None;
        while let Some(last) = t.chars().last() {
            let trailing = matches!(
                last,
                ',' | ';' | '!' | '?' | ')' | ']' | '"' | '”' | '’' | ':'
            ) || (last == '.' && !t.ends_with("..") && t != ".");
            if !trailing {
                break;
            }
            if matches!(last, ',' | ';' | '.' | '?' | '!') && end.is_none() {
                end = Some(if last == '!' || last == '?' {
                    '.'
                } else {
                    last
                });
            }
            t = &t[..t.len() - last.len_utf8()];
        }
        if t.is_empty() {
            if let (Some(e), Some(prev)) = (end, out.last_mut()) {
                prev.end = prev.end.or(Some(e));
            }
            continue;
        }
        let kind = classify(t);
        let (key, value) = match kind {
            Kind::Pair => {
                let (k, v) = t.split_once('=').unwrap_or((t, ""));
                let v = v.trim_matches(['"', '\'']);
                (k.to_lowercase().replace('-', "_"), v.to_string())
            }
            Kind::HostPort => {
                if let Some((h, p)) = t.rsplit_once(':') {
                    (h.to_string(), p.to_string())
                } else {
                    let (a, b) = t.split_once('/').unwrap_or((t, ""));
                    let port = if a.chars().all(|c| c.is_ascii_digit()) {
                        a
                    } else {
                        b
                    };
                    (String::new(), port.to_string())
                }
            }
            _ => (String::new(), t.to_string()),
        };
        out.push(Tok {
            raw: t.to_string(),
            lower: t.to_lowercase().replace('’', "'"),
            kind,
            value,
            key,
            end,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// The catalog's verbs

struct Verbs {
    /// (words of the verb, the verb as written): longest first.
    all: Vec<(Vec<String>, String)>,
}

impl Verbs {
    /// The catalog's verbs, built once for each catalog content (its actions' names and
    /// verbs, which are all they are built from): a plan does not rebuild them. The last
    /// catalog's are kept.
    fn of(catalog: &Catalog) -> std::sync::Arc<Verbs> {
        use std::hash::{Hash, Hasher};
        static LAST: std::sync::Mutex<Option<(u64, std::sync::Arc<Verbs>)>> =
            std::sync::Mutex::new(None);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        catalog.actions.len().hash(&mut h);
        for a in catalog.actions.values() {
            a.name.hash(&mut h);
            a.verbs.hash(&mut h);
        }
        let key = h.finish();
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, verbs)) = &*last {
            if *k == key {
                return verbs.clone();
            }
        }
        let verbs = std::sync::Arc::new(Verbs::new(catalog));
        *last = Some((key, verbs.clone()));
        verbs
    }

    fn new(catalog: &Catalog) -> Verbs {
        let mut set: Vec<String> = OTHER_VERBS.iter().map(|s| s.to_string()).collect();
        for a in catalog.actions.values() {
            set.extend(a.performs());
        }
        set.sort();
        set.dedup();
        let mut all: Vec<(Vec<String>, String)> = set
            .into_iter()
            .map(|v| (v.split_whitespace().map(str::to_string).collect(), v))
            .collect();
        all.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Verbs { all }
    }

    /// The verb whose words start at `toks[i]` (exact forms only): (verb, words used).
    fn at(&self, toks: &[Tok], i: usize) -> Option<(String, usize)> {
        for (words, verb) in &self.all {
            let n = words.len();
            if i + n > toks.len() {
                continue;
            }
            let ok = words.iter().enumerate().all(|(k, w)| {
                let t = &toks[i + k];
                t.kind == Kind::Word
                    && if k == 0 {
                        is_verb_form(w, &t.lower)
                    } else {
                        t.lower == *w
                    }
            });
            if ok {
                return Some((verb.clone(), n));
            }
        }
        None
    }

    /// A one-word verb one typo away from `w` (`creat`, `delte`), when only one is.
    fn typo(&self, w: &str) -> Option<String> {
        if w.chars().count() < 4 || is_stopword(w) {
            return None;
        }
        let hits: Vec<&String> = self
            .all
            .iter()
            .filter(|(words, _)| words.len() == 1)
            .filter(|(words, _)| words[0].len() >= 4 && one_typo(w, &words[0]))
            .map(|(_, v)| v)
            .collect();
        (hits.len() == 1).then(|| hits[0].clone())
    }
}

/// What the catalog can do, for refusals: `action (verb/verb: description)`.
fn can_do(catalog: &Catalog) -> Vec<String> {
    catalog
        .actions
        .values()
        .map(|a| format!("{} ({}: {})", a.name, a.performs().join("/"), a.description))
        .collect()
}

fn capabilities(catalog: &Catalog) -> String {
    can_do(catalog).join("; ")
}

// ---------------------------------------------------------------------------------------
// Clauses

/// Splits the tokens where the text clearly asks for several things: "then", ";", a
/// sentence end, "after that", "and"/"," followed by a verb.
fn clauses(toks: &[Tok], verbs: &Verbs) -> Vec<Vec<Tok>> {
    let mut out: Vec<Vec<Tok>> = Vec::new();
    let mut cur: Vec<Tok> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let t = &toks[i];
        if t.is_word("then") || t.is_word("afterwards") || t.is_word("finally") {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            i += 1;
            continue;
        }
        if t.is_word("after") && toks.get(i + 1).is_some_and(|n| n.is_word("that")) {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            i += 2;
            continue;
        }
        if (t.is_word("and") || t.is_word("also") || t.is_word("plus"))
            && !cur.is_empty()
            && next_is_verb(toks, i + 1, verbs)
        {
            out.push(std::mem::take(&mut cur));
            i += 1;
            continue;
        }
        let end = t.end;
        cur.push(t.clone());
        i += 1;
        let split = match end {
            Some(';') | Some('.') => true,
            Some(',') => next_is_verb(toks, i, verbs),
            _ => false,
        };
        if split && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn next_is_verb(toks: &[Tok], mut i: usize, verbs: &Verbs) -> bool {
    while toks
        .get(i)
        .is_some_and(|t| t.is_word("then") || t.is_word("also") || t.is_word("please"))
    {
        i += 1;
    }
    verbs.at(toks, i).is_some()
}

// ---------------------------------------------------------------------------------------
// Choosing the action

#[derive(Debug, Clone)]
struct Choice {
    action: String,
    verb: String,
    /// The word read as the verb through a typo.
    typo: Option<String>,
    /// Index of the token after the verb.
    after_verb: usize,
    /// Index of the verb's first token.
    verb_at: usize,
    matched: Vec<String>,
    /// The object's head word (the last word of the noun phrase after the verb).
    head: Option<(usize, String)>,
}

/// The object keywords of an action for `verb`: its keywords and name words, but the verb.
fn object_words(spec: &ActionSpec, verb: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in spec
        .keywords
        .iter()
        .map(|k| k.to_lowercase())
        .chain(spec.name.split('_').map(str::to_lowercase))
    {
        if k.len() < 2 || k == verb || is_stopword(&k) {
            continue;
        }
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

fn keyword_at(words: &[String], toks: &[Tok], i: usize) -> Option<(String, usize)> {
    let mut best: Option<(String, usize)> = None;
    for k in words {
        let parts: Vec<&str> = k.split_whitespace().collect();
        let n = parts.len();
        if i + n > toks.len() {
            continue;
        }
        let ok = parts.iter().enumerate().all(|(j, p)| {
            let t = &toks[i + j];
            t.kind == Kind::Word
                && (similar(&t.lower, p)
                    || (p.len() >= 5 && t.lower.len() >= 5 && one_typo(&t.lower, p)))
        });
        if ok && best.as_ref().is_none_or(|(_, m)| n > *m) {
            best = Some((k.clone(), n));
        }
    }
    best
}

/// The clause's verb: (verb, typo read, index, index after it).
fn find_verb(
    toks: &[Tok],
    verbs: &Verbs,
    catalog: &Catalog,
) -> Result<(String, Option<String>, usize, usize), OfflineError> {
    // "Is port 22 open on the nas?"
    if toks
        .first()
        .is_some_and(|t| t.is_word("is") || t.is_word("are") || t.is_word("whether"))
    {
        let checks = catalog
            .actions
            .values()
            .any(|a| a.performs().iter().any(|v| v == "check"));
        if checks {
            return Ok(("check".into(), None, 0, 1));
        }
    }
    for i in 0..toks.len() {
        // A typo in the first words ("creat", "delte").
        if i < 4 && toks[i].kind == Kind::Word && verbs.at(toks, i).is_none() {
            if let Some(v) = verbs.typo(&toks[i].lower) {
                return Ok((v, Some(toks[i].raw.clone()), i, i + 1));
            }
        }
        // "make sure" is "ensure"; "make" alone is a verb of its own.
        if toks[i].is_word("make") && toks.get(i + 1).is_some_and(|t| t.is_word("sure")) {
            return Ok(("ensure".into(), None, i, i + 2));
        }
        if let Some((v, n)) = verbs.at(toks, i) {
            return Ok((v, None, i, i + n));
        }
    }
    Err(refuse(
        "no_verb",
        format!(
            "found no verb saying what to do in `{}`; the catalog can: {}",
            join_raw(toks),
            capabilities(catalog)
        ),
        json!({ "catalog": can_do(catalog) }),
    ))
}

fn join_raw(toks: &[Tok]) -> String {
    toks.iter()
        .map(describe_value)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The negation in the clause, if any, outside the positions `explained`.
fn negation(toks: &[Tok], explained: &[bool]) -> Option<String> {
    for (i, t) in toks.iter().enumerate() {
        if t.kind != Kind::Word || explained.get(i).copied().unwrap_or(false) {
            continue;
        }
        if NEGATIONS.contains(&t.lower.as_str()) {
            let phrase = if t.lower == "not" && i > 0 && toks[i - 1].kind == Kind::Word {
                format!("{} not", toks[i - 1].raw)
            } else {
                t.raw.clone()
            };
            return Some(phrase);
        }
    }
    None
}

/// The head of the verb's object: the last plain word of the noun phrase after the verb.
fn object_head(toks: &[Tok], after: usize) -> Option<(usize, String)> {
    let mut head = None;
    for (i, t) in toks.iter().enumerate().skip(after) {
        if t.kind != Kind::Word {
            break;
        }
        let w = t.lower.as_str();
        if (PREPOSITIONS.contains(&w) || HEAD_STOPS.contains(&w)) && head.is_some() {
            break;
        }
        if is_stopword(w) || NEGATIONS.contains(&w) {
            if head.is_some() && t.end.is_some() {
                break;
            }
            continue;
        }
        head = Some((i, t.lower.clone()));
        if t.end.is_some() {
            break;
        }
    }
    head
}

type Ranked = (String, f64, Vec<String>);

/// (action, score, matched keywords) for every action.
fn scores(catalog: &Catalog, toks: &[Tok], verb: &str, after: usize) -> Vec<Ranked> {
    let head = object_head(toks, after).map(|h| h.0);
    let phrase_end = head.map(|h| h + 1).unwrap_or(after);
    catalog
        .actions
        .values()
        .map(|a| {
            let words = object_words(a, verb);
            let mut score = 0.0;
            let mut matched = Vec::new();
            let mut i = 0;
            while i < toks.len() {
                if let Some((k, n)) = keyword_at(&words, toks, i) {
                    let in_object = i >= after && i < phrase_end;
                    let is_head = head.is_some_and(|h| h >= i && h < i + n);
                    let weight = if is_head {
                        4.0
                    } else if in_object {
                        3.0
                    } else {
                        1.0
                    };
                    score += n as f64 * weight;
                    if !matched.contains(&k) {
                        matched.push(k);
                    }
                    i += n;
                } else {
                    i += 1;
                }
            }
            // Ties between actions that both perform the verb go to the one named for it
            // ("install htop": install_package rather than install_unit).
            if a.keywords.iter().any(|k| k.eq_ignore_ascii_case(verb)) {
                score += 0.5;
            }
            if a.name.split('_').any(|w| w == verb) {
                score += 0.25;
            }
            (a.name.clone(), score, matched)
        })
        .collect()
}

impl OfflinePlanner {
    /// The actions that perform the request's (first clause's) verb, ranked by how well
    /// its object matches, best first; empty when no action performs it.
    pub fn rank(&self, catalog: &Catalog, text: &str) -> Vec<(String, f64)> {
        let verbs = Verbs::of(catalog);
        let toks = tokenize(text);
        let Some(first) = clauses(&toks, &verbs).into_iter().next() else {
            return Vec::new();
        };
        let Ok((verb, _, _, after)) = find_verb(&first, &verbs, catalog) else {
            return Vec::new();
        };
        let mut v = scores(catalog, &first, &verb, after);
        v.retain(|(a, _, _)| {
            catalog
                .actions
                .get(a)
                .is_some_and(|s| s.performs().contains(&verb))
        });
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.into_iter().map(|(a, s, _)| (a, s)).collect()
    }

    fn choose(
        &self,
        catalog: &Catalog,
        toks: &[Tok],
        verbs: &Verbs,
    ) -> Result<Choice, OfflineError> {
        let (verb, typo, verb_at, after) = find_verb(toks, verbs, catalog)?;
        // Negated before the verb: "don't create", "never write", "do not deploy".
        if let Some(neg) = negation(&toks[..verb_at], &[]) {
            return Err(refuse(
                "negated",
                format!(
                    "the request is negated (`{neg} {verb}`): the planner plans what to do, never what not to do; nothing was planned"
                ),
                json!({ "verb": verb, "negation": neg }),
            ));
        }
        let performers: Vec<&ActionSpec> = catalog
            .actions
            .values()
            .filter(|a| a.performs().contains(&verb))
            .collect();
        if performers.is_empty() {
            return Err(refuse(
                "unknown_verb",
                format!(
                    "no catalog action performs '{verb}'{}; the catalog can: {}",
                    typo.as_ref()
                        .map(|t| format!(" (read `{t}` as '{verb}')"))
                        .unwrap_or_default(),
                    capabilities(catalog)
                ),
                json!({ "verb": verb, "catalog": can_do(catalog) }),
            ));
        }
        // A destructive verb anywhere else in the clause: "write … and remove it".
        for i in after..toks.len() {
            if let Some((v, _)) = verbs.at(toks, i) {
                if DESTRUCTIVE.contains(&v.as_str())
                    && !catalog.actions.values().any(|a| a.performs().contains(&v))
                {
                    return Err(refuse(
                        "unknown_verb",
                        format!(
                            "no catalog action performs '{v}' (the request also asks to {v}); the catalog can: {}",
                            capabilities(catalog)
                        ),
                        json!({ "verb": v, "catalog": can_do(catalog) }),
                    ));
                }
            }
        }
        let mut ranked = scores(catalog, toks, &verb, after);
        ranked.retain(|(a, _, _)| performers.iter().any(|p| &p.name == a));
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let head = object_head(toks, after);
        let best = ranked[0].clone();
        if ranked.len() > 1 {
            let second = &ranked[1];
            if best.1 < self.min_score {
                let names: Vec<&str> = ranked.iter().map(|r| r.0.as_str()).collect();
                let what = head.as_ref().map(|h| h.1.clone()).unwrap_or_default();
                let examples: Vec<String> = performers
                    .iter()
                    .map(|p| {
                        format!(
                            "{verb} {}",
                            object_words(p, &verb).first().cloned().unwrap_or_default()
                        )
                    })
                    .collect();
                return Err(refuse(
                    "no_object",
                    format!(
                        "'{verb}' {}: several actions perform '{verb}' ({}) and the request does not say which; name the object (e.g. {})",
                        if what.is_empty() {
                            "what?".to_string()
                        } else {
                            format!("'{what}' is not something the catalog can {verb}")
                        },
                        names.join(", "),
                        examples.join(", ")
                    ),
                    json!({ "verb": verb, "object": what, "actions": names }),
                ));
            }
            if second.1 == best.1 {
                return Err(refuse(
                    "ambiguous",
                    format!(
                        "could not decide between actions `{}` and `{}` for '{verb}': both match {}",
                        best.0,
                        second.0,
                        best.2.join(", ")
                    ),
                    json!({ "verb": verb, "actions": [best.0, second.0] }),
                ));
            }
        }
        Ok(Choice {
            action: best.0,
            verb,
            typo,
            after_verb: after,
            verb_at,
            matched: best.2,
            head,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Values

/// A clause being read: its tokens, and which of them a parameter (or the verb, or the
/// object) has accounted for.
struct Reader<'a> {
    toks: &'a [Tok],
    used: Vec<bool>,
    hosts: &'a [String],
    /// Inventory host → its `ansible_host`.
    addresses: &'a BTreeMap<String, String>,
}

/// A parameter's values (several: one step each), with the tokens they came from.
#[derive(Debug, Clone)]
struct Found {
    values: Vec<Value>,
    toks: Vec<usize>,
}

/// A host mention: token indexes, the inventory host (None: unknown), as written.
type HostMention = (Vec<usize>, Option<String>, String);

impl Reader<'_> {
    fn free(&self, i: usize) -> bool {
        i < self.toks.len() && !self.used[i]
    }
    fn word(&self, i: usize, w: &str) -> bool {
        self.toks.get(i).is_some_and(|t| t.is_word(w))
    }
    fn any_word(&self, i: usize, ws: &[&str]) -> bool {
        self.toks
            .get(i)
            .is_some_and(|t| t.kind == Kind::Word && ws.contains(&t.lower.as_str()))
    }
    fn take(&mut self, idx: &[usize]) {
        for &i in idx {
            if i < self.used.len() {
                self.used[i] = true;
            }
        }
    }

    /// The inventory host a name stands for: the full name, its first label (`nas` for
    /// `nas.lan`), `nas.lan` for `nas`, or its name without a trailing number when only one
    /// host has it.
    fn inventory_host_of(&self, kind: Kind, l: &str) -> Option<String> {
        if !matches!(kind, Kind::Word | Kind::Dotted | Kind::Address) {
            return None;
        }
        let alpha = |h: &str| {
            h.split('.')
                .next()
                .unwrap_or(h)
                .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '_')
                .to_lowercase()
        };
        for h in self.hosts {
            let hl = h.to_lowercase();
            let first = hl
                .split('.')
                .next()
                .filter(|f| !f.chars().all(|c| c.is_ascii_digit()))
                .unwrap_or(&hl)
                .to_string();
            let a = alpha(h);
            let a_unique =
                !a.is_empty() && self.hosts.iter().filter(|o| alpha(o) == a).count() == 1;
            // Its address, as the inventory gives it: `nas.lan` for `nas`.
            let address = self
                .addresses
                .get(h)
                .is_some_and(|a| a.eq_ignore_ascii_case(l));
            if l == hl
                || (l == first && kind == Kind::Word)
                || (a_unique && a.len() >= 3 && l == a && a != "localhost")
                || address
            {
                return Some(h.clone());
            }
        }
        None
    }

    fn inventory_host(&self, t: &Tok) -> Option<String> {
        self.inventory_host_of(t.kind, &t.lower)
    }

    /// Host mentions in the clause, known or not.
    fn host_mentions(&self) -> Vec<HostMention> {
        let toks = self.toks;
        let mut out: Vec<HostMention> = Vec::new();
        let mut seen: Vec<usize> = Vec::new();
        let local = self.hosts.iter().find(|h| *h == "localhost").cloned();
        for (i, t) in toks.iter().enumerate() {
            if !self.free(i) {
                continue;
            }
            if let Some(h) = self.inventory_host(t) {
                let mut idx = vec![i];
                // "the nas box", "host nas"
                if self.any_word(i + 1, HOST_NOUNS) {
                    idx.push(i + 1);
                }
                if i > 0 && self.any_word(i - 1, HOST_NOUNS) && self.free(i - 1) {
                    idx.push(i - 1);
                }
                seen.extend(&idx);
                out.push((idx, Some(h), t.raw.clone()));
                continue;
            }
            // "locally", "this machine", "the local host"
            if t.is_word("locally") {
                seen.push(i);
                out.push((vec![i], local.clone(), t.raw.clone()));
                continue;
            }
            if (t.is_word("this") || t.is_word("local"))
                && self.any_word(
                    i + 1,
                    &["machine", "host", "computer", "box", "server", "node"],
                )
            {
                seen.extend([i, i + 1]);
                out.push((
                    vec![i, i + 1],
                    local.clone(),
                    format!("{} {}", t.raw, toks[i + 1].raw),
                ));
                continue;
            }
        }
        // Unknown names where a host would be: "on db1", "to the web server", "host x".
        for i in 0..toks.len() {
            if !self.free(i) || seen.contains(&i) {
                continue;
            }
            let prep = self.any_word(i, &["on", "onto", "to", "at", "against", "across"]);
            let host_word = self.any_word(i, &["host", "hostname", "server", "machine", "node"]);
            if !(prep || host_word) {
                continue;
            }
            let mut j = i + 1;
            if self.word(j, "the") || self.word(j, "my") || self.word(j, "our") {
                j += 1;
            }
            let noun_first = self.any_word(j, HOST_NOUNS);
            if noun_first {
                j += 1;
            }
            let Some(c) = toks.get(j) else { continue };
            if seen.contains(&j) || !self.free(j) {
                continue;
            }
            let plausible = match c.kind {
                Kind::Address | Kind::Dotted => true,
                Kind::Word => {
                    let w = c.lower.as_str();
                    let known = is_stopword(w)
                        || NOT_HOSTS.contains(&w)
                        || NEGATIONS.contains(&w)
                        || HOST_NOUNS.contains(&w)
                        || number_word(w).is_some();
                    !known
                }
                _ => false,
            };
            if plausible {
                let mut idx = vec![j];
                if noun_first {
                    idx.push(j - 1);
                }
                if self.any_word(j + 1, HOST_NOUNS) {
                    idx.push(j + 1);
                }
                seen.extend(&idx);
                out.push((idx, None, c.raw.clone()));
            }
        }
        // The rest of a list of hosts: "on nas and web-03", "on nas, db1".
        let mut k = 0;
        while k < out.len() {
            let last = *out[k].0.iter().max().unwrap_or(&0);
            let mut j = last + 1;
            let joined = if self.any_word(j, &["and", "or"]) {
                j += 1;
                true
            } else {
                toks[last].end == Some(',')
            };
            if joined && self.free(j) && !seen.contains(&j) {
                if let Some(c) = toks.get(j) {
                    let name_like = match c.kind {
                        Kind::Address | Kind::Dotted => true,
                        Kind::Word => {
                            c.lower.chars().any(|ch| ch.is_ascii_digit() || ch == '-')
                                || self.inventory_host(c).is_some()
                        }
                        _ => false,
                    };
                    if name_like {
                        seen.push(j);
                        let h = self.inventory_host(c);
                        let mut idx = vec![j];
                        if j > last + 1 {
                            idx.push(j - 1);
                        }
                        out.push((idx, h, c.raw.clone()));
                    }
                }
            }
            k += 1;
        }
        out.sort_by_key(|m| m.0[0]);
        out
    }
}

fn is_host_param(name: &str) -> bool {
    matches!(
        name,
        "host" | "hosts" | "hostname" | "server" | "node" | "machine"
    ) || name.ends_with("_host")
}

fn is_target_param(name: &str) -> bool {
    matches!(name, "target" | "address" | "destination_host")
}

fn is_path_param(name: &str, p: &ParamSpec) -> bool {
    p.kind == ParamType::String
        && (p
            .pattern
            .as_deref()
            .is_some_and(|pat| pat.starts_with("^/"))
            || matches!(
                name,
                "path" | "dest" | "src" | "source" | "file" | "dir" | "directory"
            )
            || name.ends_with("_path")
            || name.ends_with("_dir"))
}

fn is_exec_param(name: &str) -> bool {
    name.starts_with("exec") || name == "command" || name == "cmd" || name.ends_with("_command")
}

fn is_mode_param(name: &str, p: &ParamSpec) -> bool {
    p.kind == ParamType::String
        && (name == "mode" || name.ends_with("_mode") || name == "permissions")
}

fn is_owner_param(name: &str) -> bool {
    matches!(name, "owner" | "user" | "owner_user")
}

fn is_port_param(name: &str, p: &ParamSpec) -> bool {
    p.kind == ParamType::Integer && (name == "port" || name.ends_with("_port"))
}

fn duration_unit_of(name: &str) -> Option<&'static str> {
    if name.ends_with("_ms") || name.ends_with("_millis") {
        Some("ms")
    } else if name.ends_with("_seconds") || name.ends_with("_secs") || name == "timeout" {
        Some("s")
    } else {
        None
    }
}

fn is_version_param(name: &str) -> bool {
    name.contains("version") || matches!(name, "tag" | "release")
}

fn is_text_param(name: &str, p: &ParamSpec) -> bool {
    p.kind == ParamType::String
        && (matches!(name, "content" | "contents" | "message" | "text" | "body")
            || name.contains("description"))
}

fn name_words(name: &str) -> Vec<String> {
    name.split('_').map(str::to_lowercase).collect()
}

fn to_secs(n: i64, unit: &str) -> Option<i64> {
    match unit {
        "s" => Some(n),
        "min" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
}

fn to_ms(n: i64, unit: &str) -> Option<i64> {
    match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
}

/// Durations in the clause: (token indexes, amount, unit).
fn durations(r: &Reader) -> Vec<(Vec<usize>, i64, &'static str)> {
    let toks = r.toks;
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let t = &toks[i];
        if !r.free(i) {
            i += 1;
            continue;
        }
        if t.kind == Kind::Duration {
            if let Some((n, u)) = duration_secs(&t.lower) {
                out.push((vec![i], n, u));
            }
        } else if t.kind == Kind::Number
            || (t.kind == Kind::Word && number_word(&t.lower).is_some())
        {
            let n = t.raw.parse::<i64>().ok().or_else(|| number_word(&t.lower));
            let u = toks
                .get(i + 1)
                .filter(|u| u.kind == Kind::Word)
                .and_then(|u| unit(&u.lower));
            if let (Some(n), Some(u)) = (n, u) {
                out.push((vec![i, i + 1], n, u));
                i += 2;
                continue;
            }
        } else if t.is_word("half") && r.word(i + 1, "a") && r.any_word(i + 2, &["minute", "min"]) {
            out.push((vec![i, i + 1, i + 2], 30, "s"));
            i += 3;
            continue;
        }
        i += 1;
    }
    out
}

type Read = Result<Option<Found>, OfflineError>;

fn found(values: Vec<Value>, toks: Vec<usize>) -> Read {
    Ok(Some(Found { values, toks }))
}

/// Reads the value(s) of one parameter from the clause.
fn find_param(r: &Reader, name: &str, p: &ParamSpec, spec: &ActionSpec, choice: &Choice) -> Read {
    let toks = r.toks;
    // 1. name=value, as written.
    if let Some(i) =
        (0..toks.len()).find(|&i| r.free(i) && toks[i].kind == Kind::Pair && toks[i].key == name)
    {
        let v = &toks[i].value;
        let v = if is_mode_param(name, p) {
            normalise_mode(v)
        } else {
            v.clone()
        };
        let value = typed(p.kind, &v).unwrap_or(Value::String(v));
        return found(vec![value], vec![i]);
    }
    // 2. by what the parameter is.
    if is_host_param(name) || is_target_param(name) {
        return hosts(r, name, spec);
    }
    if is_exec_param(name) {
        return Ok(command(r));
    }
    if is_path_param(name, p) {
        return Ok(paths(r, name, spec));
    }
    if is_mode_param(name, p) {
        return Ok(mode(r));
    }
    if is_owner_param(name) {
        return Ok(owner(r));
    }
    if let Some(u) = duration_unit_of(name) {
        if let Some((idx, n, unit)) = durations(r).into_iter().next() {
            let v = if u == "ms" {
                to_ms(n, unit)
            } else {
                to_secs(n, unit)
            };
            return match v {
                Some(v) => found(vec![Value::from(v)], idx),
                None => Err(refuse(
                    "unaccounted_value",
                    format!(
                        "`{name}` of `{}` is in whole {}; the request says {n} {unit}",
                        spec.name,
                        if u == "ms" { "milliseconds" } else { "seconds" }
                    ),
                    json!({ "value": format!("{n}{unit}"), "parameter": name }),
                )),
            };
        }
    }
    if is_port_param(name, p) {
        return ports(r, name, spec);
    }
    if p.kind == ParamType::String && is_version_param(name) {
        return Ok(version(r));
    }
    if p.kind == ParamType::String && name.contains("url") {
        if let Some(i) = (0..toks.len()).find(|&i| r.free(i) && toks[i].kind == Kind::Url) {
            return found(vec![Value::String(toks[i].value.clone())], vec![i]);
        }
        return Ok(None);
    }
    if p.kind == ParamType::Boolean {
        return Ok(boolean(r, name));
    }
    if is_text_param(name, p) {
        return Ok(text_value(r, name, spec));
    }
    // 3. next to the parameter's name: `service nginx`, `50 iterations`, `named x`.
    if let Some(f) = next_to_name(r, name, p, choice) {
        return Ok(Some(f));
    }
    if p.kind == ParamType::String {
        return Ok(a_name(r, name, p, spec, choice));
    }
    Ok(None)
}

fn hosts(r: &Reader, name: &str, spec: &ActionSpec) -> Read {
    let toks = r.toks;
    let mut values = Vec::new();
    let mut idx = Vec::new();
    let mentions = r.host_mentions();
    // "nas or localhost": alternatives, which the caller refuses.
    for w in mentions.windows(2) {
        let (a, b) = (w[0].0.iter().max(), w[1].0.iter().min());
        if let (Some(&a), Some(&b)) = (a, b) {
            if b == a + 2 && toks[a + 1].is_word("or") {
                idx.push(a + 1);
            }
        }
    }
    for (ix, h, written) in mentions {
        match h {
            // A probe target is an address: as written ("nas.lan" stays "nas.lan").
            Some(_) if is_target_param(name) && toks[ix[0]].kind != Kind::Word => {
                values.push(Value::String(written))
            }
            Some(h) => values.push(Value::String(h)),
            None if is_target_param(name) && toks[ix[0]].kind != Kind::Word => {
                values.push(Value::String(written))
            }
            None => return Err(unknown_host(&written, r.hosts, name, spec)),
        }
        idx.extend(ix);
    }
    if is_target_param(name) {
        // host:port — the port is left for the port parameter.
        for t in toks
            .iter()
            .filter(|t| t.kind == Kind::HostPort && !t.key.is_empty())
        {
            let kind = classify(&t.key);
            match r.inventory_host_of(kind, &t.key.to_lowercase()) {
                Some(h) => values.push(Value::String(h)),
                None if kind == Kind::Word && t.key != "localhost" => {
                    return Err(unknown_host(&t.key, r.hosts, name, spec))
                }
                None => values.push(Value::String(t.key.clone())),
            }
        }
    }
    if values.is_empty() {
        return Ok(None);
    }
    dedup(&mut values);
    found(values, idx)
}

fn mode(r: &Reader) -> Option<Found> {
    let toks = r.toks;
    for i in 0..toks.len() {
        if !r.free(i) {
            continue;
        }
        let t = &toks[i];
        if r.any_word(
            i,
            &[
                "mode",
                "permissions",
                "permission",
                "perms",
                "chmod",
                "perm",
            ],
        ) {
            let mut lead = vec![i];
            let mut j = i + 1;
            while r.any_word(j, &["to", "of", "set", "as", "at", "is", "should", "be"]) {
                lead.push(j);
                j += 1;
            }
            if let Some(n) = toks.get(j).filter(|n| n.kind == Kind::Number) {
                lead.push(j);
                return Some(Found {
                    values: vec![Value::String(normalise_mode(&n.raw))],
                    toks: lead,
                });
            }
            continue;
        }
        let octal = t.kind == Kind::Number
            && (3..=4).contains(&t.raw.len())
            && t.raw.chars().all(|c| ('0'..='7').contains(&c));
        if octal && (t.raw.starts_with('0') || (i > 0 && r.any_word(i - 1, &["with", "at"]))) {
            return Some(Found {
                values: vec![Value::String(normalise_mode(&t.raw))],
                toks: vec![i],
            });
        }
    }
    None
}

fn owner(r: &Reader) -> Option<Found> {
    let toks = r.toks;
    for i in 0..toks.len() {
        if !r.free(i) {
            continue;
        }
        let two = (r.word(i, "owned") && r.word(i + 1, "by"))
            || ((r.word(i, "belonging") || r.word(i, "belongs")) && r.word(i + 1, "to"));
        let mut lead: Vec<usize> = if two {
            vec![i, i + 1]
        } else if r.any_word(i, &["owner", "chown", "user"]) {
            let mut l = vec![i];
            if r.any_word(i + 1, &["is", "to", "of"]) {
                l.push(i + 1);
            }
            l
        } else {
            continue;
        };
        let mut j = lead.last().copied().unwrap_or(i) + 1;
        if r.word(j, "user") {
            lead.push(j);
            j += 1;
        }
        if let Some(t) = toks
            .get(j)
            .filter(|t| matches!(t.kind, Kind::Word | Kind::Quoted | Kind::Other))
        {
            lead.push(j);
            return Some(Found {
                values: vec![Value::String(t.value.clone())],
                toks: lead,
            });
        }
    }
    None
}

fn ports(r: &Reader, name: &str, spec: &ActionSpec) -> Read {
    let toks = r.toks;
    let parse = |s: &str| Value::from(s.parse::<i64>().unwrap_or(i64::MAX));
    let mut values = Vec::new();
    let mut idx: Vec<usize> = Vec::new();
    let mut mentions = 0;
    for i in 0..toks.len() {
        if !r.free(i) || idx.contains(&i) {
            continue;
        }
        let t = &toks[i];
        if t.kind == Kind::HostPort {
            values.push(parse(&t.value));
            idx.push(i);
            mentions += 1;
            continue;
        }
        if r.any_word(i, &["port", "ports"]) {
            let mut j = i + 1;
            let mut lead = vec![i];
            if r.any_word(j, &["number", "numbers", "is"]) {
                lead.push(j);
                j += 1;
            }
            let mut any = false;
            while let Some(n) = toks.get(j).filter(|n| n.kind == Kind::Number) {
                values.push(parse(&n.raw));
                lead.push(j);
                any = true;
                if n.end == Some(',') && toks.get(j + 1).is_some_and(|t| t.kind == Kind::Number) {
                    j += 1;
                    continue;
                }
                if r.any_word(j + 1, &["and", "or"])
                    && toks.get(j + 2).is_some_and(|t| t.kind == Kind::Number)
                {
                    lead.push(j + 1);
                    j += 2;
                    continue;
                }
                break;
            }
            if any {
                idx.extend(lead);
                mentions += 1;
            }
            continue;
        }
        // "8080 port", "tcp 22"
        let port_after = r.any_word(i + 1, &["port"]);
        let tcp_before = i > 0 && r.any_word(i - 1, &["tcp"]);
        if t.kind == Kind::Number && (port_after || tcp_before) {
            values.push(parse(&t.raw));
            idx.push(i);
            if port_after {
                idx.push(i + 1);
            }
            if tcp_before {
                idx.push(i - 1);
            }
            mentions += 1;
        }
    }
    dedup(&mut values);
    if mentions > 1 && values.len() > 1 {
        let list: Vec<String> = values.iter().map(Value::to_string).collect();
        return Err(refuse(
            "several_objects",
            format!(
                "the request gives the ports {} in different places for `{name}` of `{}`; say them as one list (\"ports 22 and 80\") or one per request",
                list.join(", "),
                spec.name
            ),
            json!({ "value": list, "parameter": name }),
        ));
    }
    if values.is_empty() {
        return Ok(None);
    }
    found(values, idx)
}

fn version(r: &Reader) -> Option<Found> {
    let toks = r.toks;
    let one = |v: &str, idx: Vec<usize>| {
        Some(Found {
            values: vec![Value::String(v.to_string())],
            toks: idx,
        })
    };
    for i in 0..toks.len() {
        if !r.free(i) {
            continue;
        }
        let t = &toks[i];
        if r.any_word(i, &["version", "tag", "release"]) {
            let next = toks.get(i + 1).filter(|n| {
                matches!(
                    n.kind,
                    Kind::Version | Kind::Number | Kind::Word | Kind::Dotted | Kind::Quoted
                ) && !is_stopword(&n.lower)
            });
            if let Some(n) = next {
                return one(&n.value, vec![i, i + 1]);
            }
            if i > 0 && r.free(i - 1) && toks[i - 1].kind == Kind::Version {
                return one(&toks[i - 1].raw, vec![i - 1, i]);
            }
            if i > 0 && r.free(i - 1) && r.word(i - 1, "latest") {
                return one("latest", vec![i - 1, i]);
            }
        }
        if t.kind == Kind::Version {
            return one(&t.raw, vec![i]);
        }
        if t.kind == Kind::HostPort && is_version(&t.value) {
            return one(&t.value, vec![i]);
        }
    }
    None
}

fn next_to_name(r: &Reader, name: &str, p: &ParamSpec, choice: &Choice) -> Option<Found> {
    let toks = r.toks;
    let last = name_words(name).last().cloned().unwrap_or_default();
    for i in 0..toks.len() {
        if !r.free(i) || toks[i].kind != Kind::Word || !similar(&toks[i].lower, &last) {
            continue;
        }
        match p.kind {
            ParamType::Integer => {
                let mut j = i + 1;
                let mut lead = vec![i];
                while r.any_word(j, &["of", "to", "is"]) {
                    lead.push(j);
                    j += 1;
                }
                if toks
                    .get(j)
                    .is_some_and(|n| n.kind == Kind::Number && r.free(j))
                {
                    lead.push(j);
                    return Some(Found {
                        values: vec![Value::from(toks[j].raw.parse::<i64>().unwrap_or(i64::MAX))],
                        toks: lead,
                    });
                }
                if i > 0 && toks[i - 1].kind == Kind::Number && r.free(i - 1) {
                    return Some(Found {
                        values: vec![Value::from(
                            toks[i - 1].raw.parse::<i64>().unwrap_or(i64::MAX),
                        )],
                        toks: vec![i - 1, i],
                    });
                }
            }
            ParamType::String => {
                let mut j = i + 1;
                let mut lead = vec![i];
                while r.any_word(j, &["named", "called", "is"]) {
                    lead.push(j);
                    j += 1;
                }
                if toks.get(j).is_some_and(|n| r.free(j) && name_value_ok(n)) {
                    lead.push(j);
                    return Some(Found {
                        values: vec![Value::String(strip_unit_suffix(&toks[j].value))],
                        toks: lead,
                    });
                }
                let before = i
                    .checked_sub(1)
                    .filter(|&b| r.free(b) && name_value_ok(&toks[b]) && b >= choice.after_verb);
                if let Some(b) = before {
                    return Some(Found {
                        values: vec![Value::String(strip_unit_suffix(&toks[b].value))],
                        toks: vec![b, i],
                    });
                }
            }
            ParamType::Boolean => {}
        }
    }
    None
}

/// A name: "named x", "called x", "x.service", the object itself ("restart nginx"), or
/// "for x" ("a unit file for myapp") when the action needs one.
fn a_name(
    r: &Reader,
    name: &str,
    p: &ParamSpec,
    spec: &ActionSpec,
    choice: &Choice,
) -> Option<Found> {
    let toks = r.toks;
    let one = |v: String, idx: Vec<usize>| {
        Some(Found {
            values: vec![Value::String(v)],
            toks: idx,
        })
    };
    for i in 0..toks.len() {
        if !r.free(i) {
            continue;
        }
        // "called web", but not "called Web Server": a name of several words is no name.
        let one_word = |j: usize| {
            toks[j].end.is_some()
                || toks.get(j + 1).is_none_or(|n| {
                    n.kind != Kind::Word
                        || is_stopword(&n.lower)
                        || PREPOSITIONS.contains(&n.lower.as_str())
                        || ["run", "exec", "start", "launch"]
                            .iter()
                            .any(|v| n.lower.starts_with(v))
                })
        };
        if r.any_word(i, &["named", "called"])
            && toks
                .get(i + 1)
                .is_some_and(|n| r.free(i + 1) && name_value_ok(n))
            && one_word(i + 1)
        {
            return one(strip_unit_suffix(&toks[i + 1].value), vec![i, i + 1]);
        }
        if toks[i].kind == Kind::Dotted
            && toks[i].lower.ends_with(".service")
            && name.contains("name")
        {
            return one(strip_unit_suffix(&toks[i].raw), vec![i]);
        }
    }
    if !p.required {
        return None;
    }
    if let Some((h, w)) = &choice.head {
        let kw = object_words(spec, &choice.verb);
        if r.free(*h) && !kw.iter().any(|k| similar(k, w)) && name_value_ok(&toks[*h]) {
            return one(toks[*h].raw.clone(), vec![*h]);
        }
    }
    for i in 0..toks.len() {
        if r.free(i)
            && r.word(i, "for")
            && toks
                .get(i + 1)
                .is_some_and(|n| r.free(i + 1) && name_value_ok(n))
        {
            return one(strip_unit_suffix(&toks[i + 1].value), vec![i, i + 1]);
        }
    }
    None
}

fn name_value_ok(t: &Tok) -> bool {
    match t.kind {
        Kind::Word => {
            !is_stopword(&t.lower)
                && !PREPOSITIONS.contains(&t.lower.as_str())
                && !NEGATIONS.contains(&t.lower.as_str())
        }
        Kind::Dotted | Kind::Quoted => !t.value.contains(char::is_whitespace),
        _ => false,
    }
}

fn strip_unit_suffix(s: &str) -> String {
    s.strip_suffix(".service").unwrap_or(s).to_string()
}

fn normalise_mode(s: &str) -> String {
    if s.len() == 3 && s.chars().all(|c| ('0'..='7').contains(&c)) {
        format!("0{s}")
    } else {
        s.to_string()
    }
}

fn dedup(v: &mut Vec<Value>) {
    let mut seen: Vec<Value> = Vec::new();
    v.retain(|x| {
        if seen.contains(x) {
            false
        } else {
            seen.push(x.clone());
            true
        }
    });
}

/// Paths for a path parameter; with several path parameters, the preposition before each
/// path says which: `to`/`into`/`in`/`under` for a destination or folder, `from` for a
/// source. A list ("/a, /b and /c") gives one step per path.
fn paths(r: &Reader, name: &str, spec: &ActionSpec) -> Option<Found> {
    let toks = r.toks;
    let path_params: Vec<&String> = spec
        .parameters
        .iter()
        .filter(|(n, p)| is_path_param(n, p) && !is_exec_param(n))
        .map(|(n, _)| n)
        .collect();
    let dest_like = |n: &str| {
        n.starts_with("dest")
            || n.ends_with("_dir")
            || n.starts_with("target")
            || n.starts_with("to_")
    };
    let mut values = Vec::new();
    let mut idx = Vec::new();
    for i in 0..toks.len() {
        if !r.free(i) || toks[i].kind != Kind::Path {
            continue;
        }
        let before = if i > 0 {
            toks[i - 1].lower.as_str()
        } else {
            ""
        };
        let into = matches!(before, "to" | "into" | "in" | "under" | "inside" | "at");
        let from = before == "from";
        let called = matches!(before, "called" | "named");
        let ok = if path_params.len() <= 1 {
            true
        } else if dest_like(name) {
            into
        } else if name.starts_with("src") || name.starts_with("source") {
            from || !into
        } else {
            // The main path: not the one a destination claims.
            !into || !path_params.iter().any(|n| dest_like(n))
        };
        if !ok {
            continue;
        }
        values.push(Value::String(toks[i].value.trim().to_string()));
        idx.push(i);
        if into || from || called {
            idx.push(i - 1);
        }
        let and_next = r.any_word(i + 1, &["and", "or"])
            && toks.get(i + 2).is_some_and(|t| t.kind == Kind::Path);
        let comma_next =
            toks[i].end == Some(',') && toks.get(i + 1).is_some_and(|t| t.kind == Kind::Path);
        if !(and_next || comma_next) {
            break;
        }
        if and_next {
            idx.push(i + 1);
        }
    }
    if values.is_empty() {
        return None;
    }
    dedup(&mut values);
    Some(Found { values, toks: idx })
}

/// The command a service runs: a quoted command, or a path and the arguments after it.
fn command(r: &Reader) -> Option<Found> {
    let toks = r.toks;
    let run_words = [
        "runs",
        "run",
        "running",
        "execute",
        "executes",
        "executing",
        "exec",
        "command",
        "starts",
        "start",
        "starting",
        "launches",
        "launch",
        "launching",
        "execstart",
    ];
    let start = (0..toks.len())
        .find(|&i| {
            r.free(i) && toks[i].kind == Kind::Path && i > 0 && r.any_word(i - 1, &run_words)
        })
        .or_else(|| {
            (0..toks.len()).find(|&i| {
                r.free(i)
                    && toks[i].kind == Kind::Path
                    && !(i > 0 && r.any_word(i - 1, &["into", "in", "under", "to", "inside"]))
            })
        })?;
    let t = &toks[start];
    let mut idx = vec![start];
    if start > 0 && r.any_word(start - 1, &run_words) {
        idx.push(start - 1);
    }
    // A quoted command is whole.
    if t.raw.contains(char::is_whitespace) || t.end.is_some() {
        return Some(Found {
            values: vec![Value::String(t.value.trim().to_string())],
            toks: idx,
        });
    }
    let mut cmd = vec![t.raw.clone()];
    let mut j = start + 1;
    while let Some(a) = toks.get(j) {
        let boundary = a.kind == Kind::Word
            && matches!(
                a.lower.as_str(),
                "on" | "into"
                    | "in"
                    | "under"
                    | "as"
                    | "described"
                    | "description"
                    | "named"
                    | "called"
                    | "and"
                    | "then"
                    | "with"
                    | "to"
                    | "onto"
                    | "for"
                    | "at"
            );
        if boundary || !r.free(j) {
            break;
        }
        cmd.push(match a.kind {
            Kind::Quoted => format!("'{}'", a.raw),
            _ => a.raw.clone(),
        });
        idx.push(j);
        if a.end.is_some() {
            break;
        }
        j += 1;
    }
    Some(Found {
        values: vec![Value::String(cmd.join(" "))],
        toks: idx,
    })
}

/// Free text: a quoted string after its name or a word that introduces it, else the one
/// quoted string left when this is the action's only free-text parameter.
fn text_value(r: &Reader, name: &str, spec: &ActionSpec) -> Option<Found> {
    let toks = r.toks;
    let words = name_words(name);
    let intro = |i: usize| -> Option<Vec<usize>> {
        let t = toks.get(i)?;
        if t.kind != Kind::Word {
            return None;
        }
        let w = t.lower.as_str();
        let lead_ok = words.iter().any(|n| similar(n, w))
            || matches!(
                w,
                "containing"
                    | "contains"
                    | "content"
                    | "contents"
                    | "saying"
                    | "says"
                    | "reading"
                    | "text"
                    | "with"
                    | "message"
                    | "described"
                    | "description"
            );
        if !lead_ok {
            return None;
        }
        let mut lead = vec![i];
        let mut j = i + 1;
        while r.any_word(j, &["as", "of", "is", "the", "content", "contents", "text"]) {
            lead.push(j);
            j += 1;
        }
        (toks.get(j)?.kind == Kind::Quoted && r.free(j)).then(|| {
            lead.push(j);
            lead
        })
    };
    let describes = |w: &str| w == "described" || w == "description";
    for i in 0..toks.len() {
        if !r.free(i) {
            continue;
        }
        if let Some(lead) = intro(i) {
            // "described as 'x'" belongs to a description, not to a content.
            let w = toks[i].lower.as_str();
            if describes(w) != name.contains("description") && w != "with" {
                continue;
            }
            let q = *lead.last().unwrap_or(&i);
            return Some(Found {
                values: vec![Value::String(unescape(&toks[q].value))],
                toks: lead,
            });
        }
    }
    let texts = spec
        .parameters
        .iter()
        .filter(|(n, p)| is_text_param(n, p))
        .count();
    let quoted: Vec<usize> = (0..toks.len())
        .filter(|&i| r.free(i) && toks[i].kind == Kind::Quoted)
        .collect();
    if texts == 1 && quoted.len() == 1 {
        let q = quoted[0];
        return Some(Found {
            values: vec![Value::String(unescape(&toks[q].value))],
            toks: vec![q],
        });
    }
    None
}

fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

/// A boolean: its name next to a negation or not (`force`, `no force`, `without
/// compression`), or the phrases of a failure condition (`fail if closed`, `must be
/// open`, `don't fail`, `just report`).
fn boolean(r: &Reader, name: &str) -> Option<Found> {
    let toks = r.toks;
    let words = name_words(name);
    let negated_before = |i: usize| -> Vec<usize> {
        (i.saturating_sub(2)..i)
            .filter(|&j| {
                r.free(j)
                    && toks[j].kind == Kind::Word
                    && NEGATIONS.contains(&toks[j].lower.as_str())
            })
            .collect()
    };
    let condition = words
        .iter()
        .any(|w| matches!(w.as_str(), "require" | "fail" | "strict" | "must"));
    let yes = |neg: &[usize], mut idx: Vec<usize>| {
        idx.extend(neg);
        Some(Found {
            values: vec![Value::Bool(neg.is_empty())],
            toks: idx,
        })
    };
    if condition {
        for i in 0..toks.len() {
            if !r.free(i) {
                continue;
            }
            if r.any_word(i, &["fail", "fails", "failing", "error", "abort"]) {
                let mut idx = vec![i];
                let mut j = i + 1;
                while j < toks.len() && j <= i + 7 && toks[j].kind == Kind::Word {
                    let w = toks[j].lower.as_str();
                    let part = matches!(
                        w,
                        "if" | "when"
                            | "unless"
                            | "it"
                            | "it's"
                            | "is"
                            | "the"
                            | "port"
                            | "not"
                            | "isn't"
                            | "closed"
                            | "close"
                            | "down"
                            | "unreachable"
                            | "open"
                            | "otherwise"
                            | "shut"
                            | "refused"
                            | "stays"
                            | "remains"
                            | "still"
                            | "that"
                            | "this"
                            | "be"
                            | "doesn't"
                            | "does"
                    );
                    if !part {
                        break;
                    }
                    idx.push(j);
                    j += 1;
                    if toks[j - 1].end.is_some() {
                        break;
                    }
                }
                return yes(&negated_before(i), idx);
            }
            let demand = [
                "must",
                "should",
                "needs",
                "has",
                "require",
                "requires",
                "required",
                "expect",
                "expecting",
            ];
            if r.any_word(i, &demand) {
                // "must be open", "require it to be open", "has to be open"
                let mut idx = vec![i];
                let mut j = i + 1;
                let filler = [
                    "to", "be", "it", "the", "port", "that", "is", "it's", "being",
                ];
                while j <= i + 5 && r.any_word(j, &filler) {
                    idx.push(j);
                    j += 1;
                }
                if r.any_word(j, &["open", "listening", "reachable", "up"]) {
                    idx.push(j);
                    return yes(&negated_before(i), idx);
                }
            }
            if (r.word(i, "just") || r.word(i, "only"))
                && r.any_word(i + 1, &["report", "check", "tell"])
            {
                return Some(Found {
                    values: vec![Value::Bool(false)],
                    toks: vec![i, i + 1],
                });
            }
        }
        return None;
    }
    for i in 0..toks.len() {
        if !r.free(i) || toks[i].kind != Kind::Word {
            continue;
        }
        let hit = words
            .iter()
            .any(|w| w.len() >= 4 && similar(&toks[i].lower, w))
            || toks[i].lower == name;
        if hit {
            return yes(&negated_before(i), vec![i]);
        }
    }
    None
}

fn typed(kind: ParamType, s: &str) -> Option<Value> {
    match kind {
        ParamType::String => Some(Value::String(s.to_string())),
        ParamType::Integer => s.parse::<i64>().ok().map(Value::from),
        ParamType::Boolean => match s.to_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Some(Value::Bool(true)),
            "false" | "no" | "off" | "0" => Some(Value::Bool(false)),
            _ => None,
        },
    }
}

fn unknown_host(written: &str, hosts: &[String], param: &str, spec: &ActionSpec) -> OfflineError {
    OfflineError {
        message: format!(
            "unknown host '{written}': not in the inventory (hosts: {}); action `{}` needs `{param}` to be one of them",
            hosts.join(", "),
            spec.name
        ),
        action: Some(spec.name.clone()),
        parameter: Some(param.to_string()),
        details: json!({ "reason": "unknown_host", "host": written, "hosts": hosts }),
    }
}

fn describe_value(t: &Tok) -> String {
    match t.kind {
        Kind::Quoted => format!("'{}'", t.raw),
        _ => t.raw.clone(),
    }
}

// ---------------------------------------------------------------------------------------
// Planning

type StepParams = (Map<String, Value>, BTreeMap<String, ParamSource>);

/// One clause read into steps.
struct ClausePlan {
    steps: Vec<StepParams>,
    choice: Choice,
    /// Host parameters the clause did not name (filled from another clause's host).
    hostless: Vec<String>,
}

impl OfflinePlanner {
    /// Plans `text` against `catalog`, or says why it will not.
    pub fn plan(&self, catalog: &Catalog, text: &str) -> Result<Plan, OfflineError> {
        let verbs = Verbs::of(catalog);
        let toks = tokenize(text);
        let parts = clauses(&toks, &verbs);
        if parts.is_empty() {
            return Err(refuse("empty", "the request is empty".into(), json!({})));
        }
        let mut planned: Vec<ClausePlan> = Vec::new();
        for part in &parts {
            planned.push(self.clause(catalog, part, &verbs)?);
        }
        // A host named in one clause serves the clauses that name none.
        let mut named: Vec<Value> = Vec::new();
        for c in &planned {
            for (params, prov) in &c.steps {
                for (k, src) in prov {
                    if *src == ParamSource::Text && (is_host_param(k) || is_target_param(k)) {
                        if let Some(h) = params.get(k) {
                            named.push(h.clone());
                        }
                    }
                }
            }
        }
        dedup(&mut named);
        let mut steps = Vec::new();
        for c in planned {
            let spec = catalog
                .get(&c.choice.action)
                .map_err(|e| refuse("catalog", e.to_string(), json!({})))?;
            for (mut params, mut prov) in c.steps {
                for h in &c.hostless {
                    if named.len() == 1 {
                        params.insert(h.clone(), named[0].clone());
                        prov.insert(h.clone(), ParamSource::Text);
                    } else if spec
                        .parameters
                        .get(h)
                        .is_some_and(|p| p.required && p.default.is_none())
                    {
                        return Err(missing(spec, h, &spec.parameters[h], &catalog.hosts));
                    }
                }
                let full = spec.validate(&params).map_err(|e| invalid(spec, e))?;
                for k in full.keys() {
                    prov.entry(k.clone()).or_insert(ParamSource::Default);
                }
                let mut reason = format!("'{}'", c.choice.verb);
                if let Some(t) = &c.choice.typo {
                    reason.push_str(&format!(" (read from `{t}`)"));
                }
                if !c.choice.matched.is_empty() {
                    reason.push_str(&format!(" + {}", c.choice.matched.join(", ")));
                }
                steps.push(PlanStep {
                    action: spec.name.clone(),
                    parameters: full,
                    agent_type: spec.agent_type.clone(),
                    resources: spec.resources.clone(),
                    reason,
                    provenance: prov,
                });
            }
        }
        Ok(self.finish(catalog, steps))
    }

    fn clause(
        &self,
        catalog: &Catalog,
        toks: &[Tok],
        verbs: &Verbs,
    ) -> Result<ClausePlan, OfflineError> {
        let choice = self.choose(catalog, toks, verbs)?;
        let spec = catalog
            .get(&choice.action)
            .map_err(|e| refuse("catalog", e.to_string(), json!({})))?;
        let mut r = Reader {
            toks,
            used: vec![false; toks.len()],
            hosts: &catalog.hosts,
            addresses: &catalog.addresses,
        };
        for i in choice.verb_at..choice.after_verb {
            r.used[i] = true;
        }
        // The specific readers claim their values before the general ones.
        let rank = |n: &str| -> u8 {
            let p = &spec.parameters[n];
            if toks.iter().any(|t| t.kind == Kind::Pair && t.key == n) {
                0
            } else if is_exec_param(n) {
                1
            } else if is_text_param(n, p) {
                2
            } else if is_path_param(n, p) {
                3
            } else if duration_unit_of(n).is_some() || is_mode_param(n, p) || is_owner_param(n) {
                4
            } else if is_host_param(n) || is_target_param(n) {
                5
            } else if is_port_param(n, p) {
                6
            } else if p.kind == ParamType::Boolean || is_version_param(n) {
                7
            } else if p.required {
                8
            } else {
                9
            }
        };
        let mut names: Vec<&String> = spec.parameters.keys().collect();
        names.sort_by_key(|n| (rank(n), n.to_string()));
        let mut single = Map::new();
        let mut fan: Option<(String, Vec<Value>)> = None;
        let mut hostless = Vec::new();
        for name in names {
            let p = &spec.parameters[name];
            let got = find_param(&r, name, p, spec, &choice).map_err(|e| e.with(spec, name))?;
            match got {
                Some(f) => {
                    r.take(&f.toks);
                    if f.values.len() > 1 {
                        let either = f.toks.iter().any(|&i| toks[i].is_word("or"));
                        let object = p.required
                            || is_path_param(name, p)
                            || is_host_param(name)
                            || is_target_param(name);
                        if either || !object {
                            let list: Vec<String> = f.values.iter().map(Value::to_string).collect();
                            return Err(OfflineError {
                                message: format!(
                                    "the request gives {} for `{name}` of `{}`{}; ask for one value per request",
                                    list.join(if either { " or " } else { " and " }),
                                    spec.name,
                                    if either { ", as alternatives" } else { ", which takes one" }
                                ),
                                action: Some(spec.name.clone()),
                                parameter: Some(name.clone()),
                                details: json!({ "reason": "several_objects", "parameter": name, "value": list }),
                            });
                        }
                        if let Some((other, _)) = &fan {
                            return Err(OfflineError {
                                message: format!(
                                    "the request gives several values for both `{other}` and `{name}` of `{}`; ask for one combination per request",
                                    spec.name
                                ),
                                action: Some(spec.name.clone()),
                                parameter: Some(name.clone()),
                                details: json!({ "reason": "several_objects", "parameters": [other, name] }),
                            });
                        }
                        fan = Some((name.clone(), f.values));
                    } else if let Some(v) = f.values.into_iter().next() {
                        single.insert(name.clone(), v);
                    }
                }
                None if is_host_param(name) || is_target_param(name) => hostless.push(name.clone()),
                // The thing acted on is never a default: "Create a directory" names none.
                None if (p.required && p.default.is_none())
                    || (name == "path" && is_path_param(name, p)) =>
                {
                    return Err(missing(spec, name, p, &catalog.hosts));
                }
                None => {}
            }
        }
        // The object's head word is accounted for when it names the action.
        if let Some((h, w)) = &choice.head {
            let kw = object_words(spec, &choice.verb);
            let names_it = kw.iter().any(|k| {
                k.split_whitespace()
                    .any(|p| similar(p, w) || (p.len() >= 5 && w.len() >= 5 && one_typo(p, w)))
            });
            if names_it {
                r.used[*h] = true;
            } else if !r.used[*h] {
                return Err(OfflineError {
                    message: format!(
                        "no catalog action performs '{}' on '{w}' (`{}` {}s {}); the catalog can: {}",
                        choice.verb,
                        spec.name,
                        choice.verb,
                        kw.join(", "),
                        capabilities(catalog)
                    ),
                    action: None,
                    parameter: None,
                    details: json!({ "reason": "no_object", "verb": choice.verb, "object": w, "catalog": can_do(catalog) }),
                });
            }
        }
        // A proper name in the object that the action does not know ("Deploy *Prometheus*
        // monitoring", "Install *Docker*") is another product, not this action's object.
        if let Some((h, _)) = &choice.head {
            let kw = object_words(spec, &choice.verb);
            for i in choice.after_verb..*h {
                let t = &toks[i];
                let proper = t.kind == Kind::Word
                    && t.raw.chars().next().is_some_and(char::is_uppercase)
                    && !is_stopword(&t.lower);
                let known = kw
                    .iter()
                    .any(|k| k.split_whitespace().any(|p| similar(p, &t.lower)));
                if proper && !known && !r.used[i] && r.inventory_host(t).is_none() {
                    return Err(OfflineError {
                        message: format!(
                            "no catalog action performs '{}' on '{}': `{}` {}s {}; the catalog can: {}",
                            choice.verb,
                            t.raw,
                            spec.name,
                            choice.verb,
                            kw.join(", "),
                            capabilities(catalog)
                        ),
                        action: None,
                        parameter: None,
                        details: json!({ "reason": "no_object", "verb": choice.verb, "object": t.raw, "catalog": can_do(catalog) }),
                    });
                }
            }
        }
        // Every value the clause gives must have landed somewhere.
        let params = spec
            .parameters
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        for (i, t) in toks.iter().enumerate() {
            if r.used[i] {
                continue;
            }
            let introduced = t.kind == Kind::Word && INTRODUCERS.contains(&t.lower.as_str());
            let unknown = t.kind == Kind::Word && !known_word(&t.lower, catalog, verbs);
            if !(t.is_value() || introduced || unknown) {
                continue;
            }
            let what = if introduced {
                let next: Vec<String> = toks[i + 1..].iter().take(2).map(describe_value).collect();
                format!("{} {}", t.raw, next.join(" ")).trim().to_string()
            } else {
                describe_value(t)
            };
            return Err(OfflineError {
                message: format!(
                    "the request gives `{what}` but `{}` has no parameter it fits (parameters: {params}); refusing rather than dropping it",
                    spec.name
                ),
                action: Some(spec.name.clone()),
                parameter: None,
                details: json!({ "reason": "unaccounted_value", "value": what }),
            });
        }
        if let Some(neg) = negation(toks, &r.used) {
            return Err(OfflineError {
                message: format!(
                    "the request holds a negation (`{neg}`) that no parameter of `{}` explains; refusing rather than guessing what not to do",
                    spec.name
                ),
                action: Some(spec.name.clone()),
                parameter: None,
                details: json!({ "reason": "negated", "negation": neg, "verb": choice.verb }),
            });
        }
        let mut prov: BTreeMap<String, ParamSource> = single
            .keys()
            .map(|k| (k.clone(), ParamSource::Text))
            .collect();
        let steps = match fan {
            Some((name, values)) => {
                prov.insert(name.clone(), ParamSource::Text);
                values
                    .into_iter()
                    .map(|v| {
                        let mut p = single.clone();
                        p.insert(name.clone(), v);
                        (p, prov.clone())
                    })
                    .collect()
            }
            None => vec![(single, prov)],
        };
        Ok(ClausePlan {
            steps,
            choice,
            hostless,
        })
    }

    fn finish(&self, catalog: &Catalog, steps: Vec<PlanStep>) -> Plan {
        let summary = steps
            .iter()
            .map(|s| {
                let desc = catalog
                    .actions
                    .get(&s.action)
                    .map(|a| a.description.as_str())
                    .unwrap_or("");
                let params: Vec<String> = s
                    .parameters
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("{desc} ({} {})", s.action, params.join(" "))
                    .trim()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("; then ");
        let cost: f64 = steps
            .iter()
            .filter_map(|s| catalog.actions.get(&s.action))
            .map(|a| a.cost_usd)
            .sum();
        let defaults: Vec<String> = steps
            .iter()
            .flat_map(|s| {
                s.provenance
                    .iter()
                    .filter(|(_, src)| **src == ParamSource::Default)
                    .map(move |(k, _)| format!("{}.{k}", s.action))
            })
            .collect();
        let mut risks = vec![
            "planned offline without an LLM, from the request's verb and the values it gives: check the actions and parameters before approving".to_string(),
        ];
        if !defaults.is_empty() {
            risks.push(format!(
                "not said in the request, so the catalog's defaults: {}",
                defaults.join(", ")
            ));
        }
        Plan {
            summary,
            steps,
            risks,
            estimated_cost_usd: cost,
            llm_cost_usd: 0.0,
            provider: PROVIDER.into(),
            model: MODEL.into(),
            cached: false,
            skipped: Vec::new(),
        }
    }
}

fn invalid(spec: &ActionSpec, e: crate::catalog::CatalogError) -> OfflineError {
    let parameter = match &e {
        crate::catalog::CatalogError::InvalidParameter { parameter, .. } => Some(parameter.clone()),
        _ => None,
    };
    OfflineError {
        message: format!(
            "matched action `{}` but a value the request gives does not fit: {e}",
            spec.name
        ),
        action: Some(spec.name.clone()),
        parameter: parameter.clone(),
        details: json!({ "reason": "invalid_parameter", "parameter": parameter, "error": e.to_string() }),
    }
}

fn missing(spec: &ActionSpec, name: &str, p: &ParamSpec, hosts: &[String]) -> OfflineError {
    let kind = format!("{:?}", p.kind).to_lowercase();
    let mut message = format!(
        "matched action `{}` ({}) but could not work out its required parameter `{name}` ({kind}",
        spec.name, spec.description
    );
    if let Some(pat) = &p.pattern {
        message.push_str(&format!(", pattern {pat}"));
    }
    message.push_str(") from the request");
    if is_host_param(name) {
        message.push_str(&format!(
            "; name one of the inventory's hosts: {}",
            hosts.join(", ")
        ));
    }
    message.push_str(&format!("; say it as `{name}=VALUE`"));
    OfflineError {
        message,
        action: Some(spec.name.clone()),
        parameter: Some(name.to_string()),
        details: json!({ "reason": "missing_parameter", "parameter": name, "hosts": hosts }),
    }
}

/// Whether a value fits a parameter's schema.
pub fn fits(spec: &ParamSpec, v: &Value) -> bool {
    match (spec.kind, v) {
        (ParamType::String, Value::String(s)) => {
            s.len() <= 4096
                && spec
                    .pattern
                    .as_deref()
                    .is_none_or(|p| pattern_matches(p, s))
        }
        (ParamType::Integer, Value::Number(n)) => n
            .as_i64()
            .is_some_and(|i| spec.min.is_none_or(|m| i >= m) && spec.max.is_none_or(|m| i <= m)),
        (ParamType::Boolean, Value::Bool(_)) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_words_and_typos() {
        assert!(similar("deploy", "deployment"));
        assert!(similar("services", "service"));
        assert!(!similar("nas", "nasty"));
        assert!(!similar("port", "important"));
        assert!(one_typo("creat", "create"));
        assert!(one_typo("delte", "delete"));
        assert!(one_typo("wirte", "write"));
        assert!(!one_typo("create", "create"));
        assert!(!one_typo("remote", "delete"));
        assert!(verb_forms("stop").contains(&"stopped".to_string()));
        // The check the planner uses agrees with the forms, and takes nothing else.
        for v in [
            "stop", "create", "deploy", "check", "restart", "back up", "go", "e",
        ] {
            for f in verb_forms(v) {
                assert!(is_verb_form(v, &f), "{v}: {f}");
            }
            for other in [
                String::new(),
                format!("{v}x"),
                format!("{v}edd"),
                format!("re{v}"),
                format!("{v}ings"),
                v.chars().skip(1).collect::<String>(),
            ] {
                assert_eq!(
                    is_verb_form(v, &other),
                    verb_forms(v).contains(&other),
                    "{v}: {other}"
                );
            }
        }
        assert!(verb_forms("create").contains(&"creating".to_string()));
    }

    #[test]
    fn tokens_keep_values_whole() {
        let t = tokenize(
            r#"Write "a = 1" to '/tmp/x y' with mode=0600 content="b c", on nas.lan:22 -p 30s."#,
        );
        let kinds: Vec<Kind> = t.iter().map(|t| t.kind).collect();
        assert_eq!(
            kinds,
            vec![
                Kind::Word,
                Kind::Quoted,
                Kind::Word,
                Kind::Path,
                Kind::Word,
                Kind::Pair,
                Kind::Pair,
                Kind::Word,
                Kind::HostPort,
                Kind::Flag,
                Kind::Duration
            ]
        );
        assert_eq!(t[6].value, "b c");
        assert_eq!(t[6].end, Some(','));
        assert_eq!(t[3].value, "/tmp/x y");
        assert!(is_version("v1.2.3") && is_version("2.0") && !is_version("10.0.0.5"));
        assert!(is_version("v2") && !is_version("2"));
    }
}
