//! The offline planner: the last link of the chain, deterministic and local.
//!
//! It scores every catalog action against the request's words (keywords, the action's
//! name, the words of its description, its parameter names), picks the best one (or one
//! per clause when the text clearly asks for several things: "… and then …", "…; …"), and
//! fills the parameters it can read from the text: hosts named in the inventory (also by
//! their first label: "the NAS" is `nas.lan`), versions (`v1.2.3`, `version 2`), absolute
//! paths, URLs, ports (`port 8080`), `key=value` pairs, quoted strings, booleans (`force`,
//! `no force`), numbers next to a parameter's name, and words next to it (`service nginx`).
//! Defaults come from the catalog and the result passes [`ActionSpec::validate`]. When it
//! cannot, it says what it could not work out: which action, which parameter.

use chiffon_protocol::ErrorCode;
use serde_json::{Map, Value};

use crate::catalog::{pattern_matches, ActionSpec, Catalog, ParamSpec, ParamType};
use crate::model::{Plan, PlanStep};

/// `provider` of an offline plan.
pub const PROVIDER: &str = "offline";
/// `model` of an offline plan (the matching scheme's version).
pub const MODEL: &str = "keyword-match-v1";

/// The offline planner could not plan the request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct OfflineError {
    pub message: String,
    /// The action it settled on, if it got that far.
    pub action: Option<String>,
    /// The parameter it could not work out.
    pub parameter: Option<String>,
}

impl OfflineError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::NoPlan
    }
}

/// The offline planner. `min_score` is how strongly the text must match an action (a
/// keyword is worth 3, a word of the action's name 2, a word of its description 1).
#[derive(Debug, Clone)]
pub struct OfflinePlanner {
    pub min_score: f64,
}

impl Default for OfflinePlanner {
    fn default() -> Self {
        OfflinePlanner { min_score: 2.0 }
    }
}

const STOPWORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "to", "on", "in", "of", "for", "with", "at", "by", "from", "is",
    "are", "be", "it", "its", "this", "that", "these", "those", "please", "can", "could", "would",
    "you", "me", "my", "our", "we", "i", "then", "also", "into", "onto", "as", "so", "do", "does",
    "make", "sure", "now", "some", "any", "all", "just", "there", "here", "via", "using", "use",
    "new", "run", "will", "should", "must", "let", "lets", "which", "what", "when", "where", "how",
    "if", "not", "no", "without", "after", "before", "up", "out",
];

const NEGATIONS: &[&str] = &[
    "no", "not", "without", "don't", "dont", "never", "disable", "skip",
];

fn is_stopword(w: &str) -> bool {
    STOPWORDS.contains(&w)
}

/// Lowercase alphanumeric words.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// Whether two words are the same word up to an ending (`deploy`/`deployment`,
/// `update`/`updating`, `service`/`services`).
fn similar(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if short.len() < 4 || long.len() - short.len() > 5 {
        return false;
    }
    let stem = if short.len() >= 5 {
        short.strip_suffix('e').unwrap_or(short)
    } else {
        short
    };
    long.starts_with(stem)
}

/// A whitespace token of the original text with the punctuation around it removed.
#[derive(Debug, Clone)]
struct Token {
    raw: String,
    lower: String,
}

fn tokens(text: &str) -> Vec<Token> {
    text.split_whitespace()
        .map(|t| {
            let t = t.trim_matches(|c: char| {
                matches!(
                    c,
                    ',' | ';' | '!' | '?' | '(' | ')' | '"' | '\'' | '`' | '[' | ']' | '“' | '”'
                )
            });
            let t = t.trim_end_matches(['.', ':']);
            Token {
                raw: t.to_string(),
                lower: t.to_lowercase(),
            }
        })
        .filter(|t| !t.raw.is_empty())
        .collect()
}

/// What the text says, gathered once.
#[derive(Debug, Default)]
struct Facts {
    tokens: Vec<Token>,
    words: Vec<String>,
    hosts: Vec<String>,
    versions: Vec<String>,
    /// Absolute paths with the word before them.
    paths: Vec<(String, String)>,
    urls: Vec<String>,
    ports: Vec<i64>,
    pairs: Vec<(String, String)>,
    quoted: Vec<String>,
}

fn is_version(s: &str) -> bool {
    let bare = s.strip_prefix(['v', 'V']).unwrap_or(s);
    let core = bare.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    // An IPv4 address is a host, not a version.
    let ipv4 = bare == s && parts.len() == 4 && core == s;
    numeric && !ipv4
}

fn quoted_strings(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let close = match c {
            '"' => '"',
            '“' => '”',
            '`' => '`',
            // An apostrophe inside a word (don't) is not a quote.
            '\'' if i == 0 || !chars[i - 1].is_alphanumeric() => '\'',
            _ => {
                i += 1;
                continue;
            }
        };
        // `key="value"` belongs to the pair, not to the free quoted strings.
        let after_eq = i > 0 && chars[i - 1] == '=';
        match chars[i + 1..].iter().position(|&x| x == close) {
            Some(len) => {
                let s: String = chars[i + 1..i + 1 + len].iter().collect();
                if !after_eq && !s.trim().is_empty() {
                    out.push(s);
                }
                i += len + 2;
            }
            None => i += 1,
        }
    }
    out
}

fn pairs(text: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    for (i, &c) in chars.iter().enumerate() {
        if c != '=' || i == 0 {
            continue;
        }
        let mut start = i;
        while start > 0
            && (chars[start - 1].is_alphanumeric() || matches!(chars[start - 1], '_' | '-'))
        {
            start -= 1;
        }
        if start == i {
            continue;
        }
        let key: String = chars[start..i].iter().collect();
        let rest = &chars[i + 1..];
        let value: String = match rest.first() {
            Some(&q @ ('"' | '\'')) => match rest[1..].iter().position(|&x| x == q) {
                Some(len) => rest[1..1 + len].iter().collect(),
                None => continue,
            },
            Some(_) => {
                let v: String = rest.iter().take_while(|c| !c.is_whitespace()).collect();
                v.trim_end_matches([',', ';', '.']).to_string()
            }
            None => continue,
        };
        if !value.is_empty() {
            out.push((key.to_lowercase().replace('-', "_"), value));
        }
    }
    out
}

/// Inventory hosts the text names: the full name, its first label (`nas` for `nas.lan`),
/// its name without a trailing number when only one host has it (`web` for `web-01` alone),
/// or `localhost` for "locally"/"this machine".
fn mentioned_hosts(toks: &[Token], words: &[String], inventory: &[String]) -> Vec<String> {
    let mut found: Vec<(usize, String)> = Vec::new();
    let alpha = |h: &str| {
        h.split('.')
            .next()
            .unwrap_or(h)
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '_')
            .to_lowercase()
    };
    for h in inventory {
        let hl = h.to_lowercase();
        // A numeric first label (an IP address) would match any number in the text.
        let first = hl
            .split('.')
            .next()
            .filter(|f| !f.chars().all(|c| c.is_ascii_digit()))
            .unwrap_or(&hl)
            .to_string();
        let a = alpha(h);
        let a_unique = !a.is_empty() && inventory.iter().filter(|o| alpha(o) == a).count() == 1;
        let pos = toks.iter().position(|t| {
            t.lower == hl
                || t.lower == first
                || (a_unique && a.len() >= 2 && t.lower == a)
                // `nas.lan` in the text names the inventory's `nas`.
                || (!hl.contains('.') && t.lower.split('.').next() == Some(hl.as_str()))
        });
        if let Some(p) = pos {
            found.push((p, h.clone()));
        } else if hl == "localhost" {
            let local = words.iter().position(|w| w == "locally").or_else(|| {
                words.windows(2).position(|w| {
                    matches!(w[0].as_str(), "this" | "local")
                        && matches!(w[1].as_str(), "machine" | "host" | "computer")
                })
            });
            if let Some(p) = local {
                found.push((p, h.clone()));
            }
        }
    }
    found.sort();
    found.into_iter().map(|(_, h)| h).collect()
}

impl Facts {
    fn gather(text: &str, catalog: &Catalog) -> Facts {
        let toks = tokens(text);
        let words = words(text);
        let mut f = Facts {
            hosts: mentioned_hosts(&toks, &words, &catalog.hosts),
            pairs: pairs(text),
            quoted: quoted_strings(text),
            ..Facts::default()
        };
        for (i, t) in toks.iter().enumerate() {
            let prev = if i > 0 {
                toks[i - 1].lower.clone()
            } else {
                String::new()
            };
            let next = toks.get(i + 1);
            if t.raw.contains('=') {
                continue;
            }
            if t.lower.starts_with("http://") || t.lower.starts_with("https://") {
                f.urls.push(t.raw.clone());
            } else if t.raw.starts_with('/') && t.raw.len() > 1 {
                f.paths.push((t.raw.clone(), prev.clone()));
            } else if is_version(&t.raw) {
                f.versions.push(t.raw.clone());
                if let Some(s) = t.raw.strip_prefix(['v', 'V']) {
                    f.versions.push(s.to_string());
                }
            }
            if t.lower == "version" || t.lower == "tag" || t.lower == "release" {
                if let Some(n) = next {
                    if !is_stopword(&n.lower) && !f.versions.contains(&n.raw) {
                        f.versions.insert(0, n.raw.clone());
                    }
                }
            }
            if t.lower == "port" {
                if let Some(p) = next.and_then(|n| n.raw.parse::<i64>().ok()) {
                    f.ports.push(p);
                }
            }
            // host:8080
            if let Some((_, p)) = t.raw.rsplit_once(':') {
                if !t.lower.starts_with("http") {
                    if let Ok(p) = p.parse::<i64>() {
                        f.ports.push(p);
                    }
                }
            }
        }
        f.tokens = toks;
        f.words = words;
        f
    }
}

/// An action's match against a text.
#[derive(Debug, Clone)]
struct Score {
    action: String,
    score: f64,
    matched: Vec<String>,
}

fn score(spec: &ActionSpec, words: &[String]) -> Score {
    let has = |w: &str| words.iter().any(|t| similar(t, w));
    let mut score = 0.0;
    let mut matched: Vec<String> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut add = |w: String, points: f64, matched: &mut Vec<String>| {
        if seen.contains(&w) {
            return;
        }
        seen.push(w.clone());
        score += points;
        matched.push(w);
    };
    for k in &spec.keywords {
        let kw = self::words(k);
        if !kw.is_empty() && kw.iter().all(|w| has(w)) {
            add(k.to_lowercase(), 3.0, &mut matched);
        }
    }
    for w in spec.name.split('_').map(str::to_lowercase) {
        if w.len() >= 3 && !is_stopword(&w) && has(&w) {
            add(w, 2.0, &mut matched);
        }
    }
    for w in self::words(&spec.description) {
        if w.len() >= 3 && !is_stopword(&w) && has(&w) {
            add(w, 1.0, &mut matched);
        }
    }
    for p in spec.parameters.keys() {
        for w in p.split('_').map(str::to_lowercase) {
            if w.len() >= 3 && !is_stopword(&w) && has(&w) {
                add(w, 0.5, &mut matched);
            }
        }
    }
    Score {
        action: spec.name.clone(),
        score,
        matched,
    }
}

/// Whether a value fits a parameter's schema.
fn fits(spec: &ParamSpec, v: &Value) -> bool {
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

fn is_host_param(name: &str) -> bool {
    matches!(
        name,
        "host" | "hosts" | "hostname" | "target" | "server" | "node" | "machine"
    ) || name.ends_with("_host")
}

fn is_path_param(name: &str) -> bool {
    matches!(
        name,
        "path"
            | "dest"
            | "destination"
            | "src"
            | "source"
            | "file"
            | "dir"
            | "directory"
            | "folder"
    ) || name.ends_with("_path")
        || name.ends_with("_dir")
        || name.ends_with("_file")
}

fn is_source_param(name: &str) -> bool {
    name.starts_with("src") || name.starts_with("source") || name.starts_with("from")
}

fn is_dest_param(name: &str) -> bool {
    name.starts_with("dest") || name.starts_with("target") || name.starts_with("to_")
}

/// Words a value must never be taken from: fillers and the words that chose the action.
fn is_filler(w: &str, matched: &[String]) -> bool {
    is_stopword(w)
        || NEGATIONS.contains(&w)
        || matched.iter().any(|m| similar(m, w))
        || matches!(w, "named" | "called" | "=" | ":")
}

/// Fills one action's parameters from the text; `fallback` is the whole request when
/// `facts` is one clause of it.
fn fill(
    spec: &ActionSpec,
    facts: &Facts,
    fallback: Option<&Facts>,
    matched: &[String],
) -> Result<Map<String, Value>, OfflineError> {
    let mut out = Map::new();
    let mut used: Vec<String> = Vec::new();
    // Required parameters first, so they get first pick of free values.
    let mut names: Vec<&String> = spec.parameters.keys().collect();
    names.sort_by_key(|n| !spec.parameters[*n].required);
    for name in names {
        let p = &spec.parameters[name];
        let mut found = find_value(name, p, facts, &used, matched);
        if found.is_none() {
            if let Some(all) = fallback {
                found = find_value(name, p, all, &used, matched);
            }
        }
        match found {
            Some(v) => {
                if let Value::String(s) = &v {
                    used.push(s.clone());
                }
                out.insert(name.clone(), v);
            }
            None if p.required && p.default.is_none() => {
                return Err(missing(spec, name, p, facts, fallback));
            }
            None => {}
        }
    }
    spec.validate(&out).map_err(|e| OfflineError {
        message: format!(
            "matched action `{}` but its parameters do not fit: {e}",
            spec.name
        ),
        action: Some(spec.name.clone()),
        parameter: match e {
            crate::catalog::CatalogError::InvalidParameter { parameter, .. } => Some(parameter),
            _ => None,
        },
    })
}

fn missing(
    spec: &ActionSpec,
    name: &str,
    p: &ParamSpec,
    facts: &Facts,
    fallback: Option<&Facts>,
) -> OfflineError {
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
        let all = fallback.unwrap_or(facts);
        if all.hosts.is_empty() {
            message.push_str("; name one of the inventory's hosts");
        }
    }
    message.push_str(&format!("; say it as `{name}=VALUE`"));
    OfflineError {
        message,
        action: Some(spec.name.clone()),
        parameter: Some(name.to_string()),
    }
}

/// The first candidate that fits the parameter.
fn pick(p: &ParamSpec, mut cands: impl Iterator<Item = Value>) -> Option<Value> {
    cands.find(|v| fits(p, v))
}

fn find_value(
    name: &str,
    p: &ParamSpec,
    f: &Facts,
    used: &[String],
    matched: &[String],
) -> Option<Value> {
    // 1. key=value, taken as written: a value that fails the schema is reported by the
    // validation rather than silently replaced by a guess.
    if let Some((_, v)) = f.pairs.iter().find(|(k, _)| k == name) {
        return Some(typed(p.kind, v).unwrap_or_else(|| Value::String(v.clone())));
    }
    let free = |s: &String| !used.contains(s);
    // 2. by what the parameter is
    if p.kind == ParamType::String {
        if is_host_param(name) {
            if let Some(v) = pick(
                p,
                f.hosts
                    .iter()
                    .filter(|s| free(s))
                    .cloned()
                    .map(Value::String),
            ) {
                return Some(v);
            }
        }
        if name.contains("version") || matches!(name, "tag" | "release") {
            if let Some(v) = pick(p, f.versions.iter().cloned().map(Value::String)) {
                return Some(v);
            }
        }
        if name.contains("url") {
            if let Some(v) = pick(
                p,
                f.urls
                    .iter()
                    .filter(|s| free(s))
                    .cloned()
                    .map(Value::String),
            ) {
                return Some(v);
            }
        }
        if is_path_param(name)
            || p.pattern
                .as_deref()
                .is_some_and(|pat| pat.starts_with("^/"))
        {
            let prefer: &[&str] = if is_source_param(name) {
                &["from"]
            } else if is_dest_param(name) {
                &["to", "into", "in", "at", "under"]
            } else {
                &[]
            };
            let avoid: &[&str] = if is_source_param(name) {
                &["to", "into"]
            } else if is_dest_param(name) {
                &["from"]
            } else {
                &[]
            };
            let free_paths = || f.paths.iter().filter(|(s, _)| free(s));
            let preferred = free_paths().filter(|(_, before)| prefer.contains(&before.as_str()));
            let others = free_paths().filter(|(_, before)| {
                !prefer.contains(&before.as_str()) && !avoid.contains(&before.as_str())
            });
            if let Some(v) = pick(
                p,
                preferred
                    .chain(others)
                    .map(|(s, _)| Value::String(s.clone())),
            ) {
                return Some(v);
            }
        }
    }
    if p.kind == ParamType::Integer && (name == "port" || name.ends_with("_port")) {
        if let Some(v) = pick(p, f.ports.iter().map(|&n| Value::from(n))) {
            return Some(v);
        }
    }
    // 3. next to the parameter's name: `service nginx`, `3 replicas`, `force`, `no force`
    let name_words: Vec<String> = name.split('_').map(str::to_lowercase).collect();
    let n = name_words.len();
    let toks = &f.tokens;
    for i in 0..toks.len().saturating_sub(n - 1) {
        let at = toks[i..i + n]
            .iter()
            .zip(&name_words)
            .all(|(t, w)| similar(&t.lower, w) && t.lower.len() + 2 >= w.len());
        if !at {
            continue;
        }
        match p.kind {
            ParamType::Boolean => {
                let negated = toks[i.saturating_sub(2)..i]
                    .iter()
                    .any(|t| NEGATIONS.contains(&t.lower.as_str()));
                return Some(Value::Bool(!negated));
            }
            ParamType::Integer => {
                let after = toks.get(i + n).and_then(|t| t.raw.parse::<i64>().ok());
                let before = i
                    .checked_sub(1)
                    .and_then(|j| toks[j].raw.parse::<i64>().ok());
                if let Some(v) = pick(p, after.into_iter().chain(before).map(Value::from)) {
                    return Some(v);
                }
            }
            ParamType::String => {
                let mut after = toks[i + n..].iter();
                let mut next = after.next();
                while next.is_some_and(|t| {
                    matches!(t.lower.as_str(), "named" | "called" | "is" | "=" | ":")
                }) {
                    next = after.next();
                }
                let before = i.checked_sub(1).map(|j| &toks[j]);
                let cands = next
                    .into_iter()
                    .chain(before)
                    .filter(|t| !is_filler(&t.lower, matched) && free(&t.raw))
                    .map(|t| Value::String(t.raw.clone()));
                if let Some(v) = pick(p, cands) {
                    return Some(v);
                }
            }
        }
    }
    if p.kind == ParamType::String {
        // 4. a quoted string
        if let Some(v) = pick(
            p,
            f.quoted
                .iter()
                .filter(|s| free(s))
                .cloned()
                .map(Value::String),
        ) {
            return Some(v);
        }
        // 5. a required name nothing else claims: the one word left over
        // ("restart nginx on the nas").
        if p.required && !is_host_param(name) && !is_path_param(name) && !name.contains("url") {
            let left = f.tokens.iter().filter(|t| {
                !is_filler(&t.lower, matched)
                    && free(&t.raw)
                    && !f.hosts.iter().any(|h| h.eq_ignore_ascii_case(&t.raw))
                    && !f
                        .hosts
                        .iter()
                        .any(|h| h.to_lowercase().split('.').next() == Some(t.lower.as_str()))
                    && !t.raw.contains('=')
                    && !t.raw.starts_with('/')
                    && t.raw.parse::<f64>().is_err()
            });
            if let Some(v) = pick(p, left.map(|t| Value::String(t.raw.clone()))) {
                return Some(v);
            }
        }
    }
    None
}

/// Splits on the phrases that clearly separate several things to do.
fn clauses(text: &str) -> Vec<String> {
    let lower = text.to_ascii_lowercase();
    let seps = [
        " and then ",
        ", then ",
        "; then ",
        " then ",
        "; ",
        " after that ",
        " afterwards ",
        " followed by ",
        " and also ",
    ];
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for sep in seps {
        let mut from = 0;
        while let Some(pos) = lower[from..].find(sep) {
            let start = from + pos;
            let end = start + sep.len();
            if !cuts.iter().any(|&(s, e)| start < e && s < end) {
                cuts.push((start, end));
            }
            from = end;
        }
    }
    cuts.sort();
    let mut out = Vec::new();
    let mut prev = 0;
    for (s, e) in cuts {
        out.push(text[prev..s].to_string());
        prev = e;
    }
    out.push(text[prev..].to_string());
    out.into_iter()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

impl OfflinePlanner {
    /// The actions ranked by how well they match `text`, best first (ties by name).
    pub fn rank(&self, catalog: &Catalog, text: &str) -> Vec<(String, f64)> {
        self.scores(catalog, &words(text))
            .into_iter()
            .map(|s| (s.action, s.score))
            .collect()
    }

    fn scores(&self, catalog: &Catalog, words: &[String]) -> Vec<Score> {
        let mut v: Vec<Score> = catalog.actions.values().map(|a| score(a, words)).collect();
        v.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.action.cmp(&b.action))
        });
        v
    }

    /// The best action for a clause, if it is clear.
    fn choose(&self, catalog: &Catalog, text: &str) -> Result<Score, OfflineError> {
        let ranked = self.scores(catalog, &words(text));
        let Some(best) = ranked.first().filter(|s| s.score >= self.min_score) else {
            let mut names: Vec<&str> = catalog.actions.keys().map(String::as_str).collect();
            names.truncate(20);
            return Err(OfflineError {
                message: format!(
                    "no catalog action matches the request `{}` (actions: {})",
                    text.trim(),
                    names.join(", ")
                ),
                action: None,
                parameter: None,
            });
        };
        if let Some(second) = ranked.get(1).filter(|s| s.score == best.score) {
            return Err(OfflineError {
                message: format!(
                    "could not decide between actions `{}` and `{}` for `{}`: both match {}",
                    best.action,
                    second.action,
                    text.trim(),
                    best.matched.join(", ")
                ),
                action: None,
                parameter: None,
            });
        }
        Ok(best.clone())
    }

    /// Plans `text` against `catalog`, or says what it could not work out.
    pub fn plan(&self, catalog: &Catalog, text: &str) -> Result<Plan, OfflineError> {
        let parts = clauses(text);
        let all = Facts::gather(text, catalog);
        if parts.len() > 1 {
            let chosen: Result<Vec<Score>, _> =
                parts.iter().map(|c| self.choose(catalog, c)).collect();
            if let Ok(chosen) = chosen {
                let mut steps = Vec::new();
                for (clause, s) in parts.iter().zip(chosen) {
                    let facts = Facts::gather(clause, catalog);
                    steps.push(self.step(catalog, &s, &facts, Some(&all))?);
                }
                return Ok(self.finish(catalog, steps));
            }
        }
        let s = self.choose(catalog, text)?;
        let step = self.step(catalog, &s, &all, None)?;
        Ok(self.finish(catalog, vec![step]))
    }

    fn step(
        &self,
        catalog: &Catalog,
        s: &Score,
        facts: &Facts,
        fallback: Option<&Facts>,
    ) -> Result<PlanStep, OfflineError> {
        let spec = catalog.get(&s.action).map_err(|e| OfflineError {
            message: e.to_string(),
            action: Some(s.action.clone()),
            parameter: None,
        })?;
        let parameters = fill(spec, facts, fallback, &s.matched)?;
        Ok(PlanStep {
            action: spec.name.clone(),
            parameters,
            agent_type: spec.agent_type.clone(),
            resources: spec.resources.clone(),
            reason: format!("matched {}", s.matched.join(", ")),
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
        Plan {
            summary,
            steps,
            risks: vec![
                "planned offline by keyword matching, without an LLM: check the actions and their parameters before approving".into(),
            ],
            estimated_cost_usd: cost,
            llm_cost_usd: 0.0,
            provider: PROVIDER.into(),
            model: MODEL.into(),
            cached: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_words() {
        assert!(similar("deploy", "deployment"));
        assert!(similar("update", "updating"));
        assert!(similar("services", "service"));
        assert!(!similar("nas", "nasty"));
        assert!(!similar("port", "important"));
    }

    #[test]
    fn text_facts() {
        assert!(is_version("v1.2.3"));
        assert!(is_version("2.0"));
        assert!(is_version("1.2.3-rc1"));
        assert!(!is_version("1"));
        assert!(!is_version("a.b"));
        assert!(!is_version("10.0.0.5"));
        assert!(is_version("v1.2.3.4"));
        let toks = tokens("run 10 iterations on 10.0.0.5");
        let w = words("run 10 iterations on 10.0.0.5");
        assert_eq!(
            mentioned_hosts(&toks, &w, &["10.0.0.5".into(), "nas.lan".into()]),
            vec!["10.0.0.5"]
        );
        assert!(mentioned_hosts(
            &tokens("run 10 times"),
            &words("run 10 times"),
            &["10.0.0.5".into()]
        )
        .is_empty());
        let t = "probe nas.lan";
        assert_eq!(
            mentioned_hosts(&tokens(t), &words(t), &["nas".into()]),
            vec!["nas"]
        );
        assert_eq!(
            quoted_strings(r#"write "hello world" and don't 'x y' k="v""#),
            vec!["hello world", "x y"]
        );
        assert_eq!(
            pairs(r#"mode=0600 content="a b", force=true."#),
            vec![
                ("mode".to_string(), "0600".to_string()),
                ("content".to_string(), "a b".to_string()),
                ("force".to_string(), "true".to_string())
            ]
        );
        assert_eq!(
            clauses("deploy kuma on nas and then restart nginx; back up /etc"),
            vec!["deploy kuma on nas", "restart nginx", "back up /etc"]
        );
    }
}
