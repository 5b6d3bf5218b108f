//! The action catalog: `playbooks/ACTION/action.toml` (+ `playbook.yml`) and
//! `playbooks/inventory.ini`. The only actions that ever run are the ones here, with
//! parameters that pass [`ActionSpec::validate`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chiffon_protocol::{ErrorCode, Resources};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

mod schema;

/// A parameter's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    Integer,
    Boolean,
}

/// One parameter of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    #[serde(rename = "type")]
    pub kind: ParamType,
    #[serde(default)]
    pub required: bool,
    /// A regular expression a string must match (anchored as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<toml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Accept Jinja template markers (`{{`, `{%`, `{#`) in this string. Off by default:
    /// values are data, and a marker in one is refused before it gets near Ansible. Even a
    /// raw value reaches Ansible marked `!unsafe`, so it is written literally, never
    /// evaluated; `raw` only lets it through validation (for example a file that is itself
    /// a template for another tool). None of the shipped actions declares it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw: bool,
    /// Longest string accepted, in bytes (default and ceiling: [`MAX_STRING_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// Inclusive bounds of an integer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
}

/// `action.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// The folder's name; not in the file.
    #[serde(default)]
    pub name: String,
    pub description: String,
    pub agent_type: String,
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub auto_approve: bool,
    #[serde(default)]
    pub check_mode: bool,
    /// A cost the action itself declares (USD), added to the plan's estimate.
    #[serde(default)]
    pub cost_usd: f64,
    /// Seconds after which the step is stopped (and the agent considered silent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamSpec>,
    #[serde(default)]
    pub resources: Resources,
    /// `playbooks/ACTION/playbook.yml` when it exists (`noop` has none).
    #[serde(skip)]
    pub playbook: Option<PathBuf>,
}

/// A catalog failed to load, or parameters failed their schema.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    #[error("catalog {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("unknown action `{0}`")]
    UnknownAction(String),
    #[error("action `{action}`: parameter `{parameter}`: {message}")]
    InvalidParameter {
        action: String,
        parameter: String,
        message: String,
    },
}

impl CatalogError {
    pub fn code(&self) -> ErrorCode {
        match self {
            CatalogError::Invalid { .. } => ErrorCode::InvalidCatalog,
            CatalogError::UnknownAction(_) => ErrorCode::PlanUnknownAction,
            CatalogError::InvalidParameter { .. } => ErrorCode::PlanInvalidParameter,
        }
    }
}

impl ActionSpec {
    /// Checks `params` against the schema and returns them completed with defaults.
    /// Unknown parameters, missing required ones, wrong types, pattern or bound failures
    /// are errors.
    pub fn validate(
        &self,
        params: &Map<String, Value>,
    ) -> Result<Map<String, Value>, CatalogError> {
        let bad = |p: &str, m: String| CatalogError::InvalidParameter {
            action: self.name.clone(),
            parameter: p.to_string(),
            message: m,
        };
        for k in params.keys() {
            if !self.parameters.contains_key(k) {
                return Err(bad(k, "unknown parameter".into()));
            }
        }
        let mut out = Map::new();
        for (name, spec) in &self.parameters {
            let value = match params.get(name) {
                Some(Value::Null) | None => match &spec.default {
                    Some(d) => toml_to_json(d),
                    None if spec.required => return Err(bad(name, "is required".into())),
                    None => continue,
                },
                Some(v) => v.clone(),
            };
            let value = match (spec.kind, value) {
                (ParamType::String, Value::String(s)) => {
                    check_string(spec, &s).map_err(|m| bad(name, m))?;
                    Value::String(s)
                }
                (ParamType::Integer, Value::Number(n)) if n.is_i64() => {
                    let i = n.as_i64().unwrap_or_default();
                    if spec.min.is_some_and(|m| i < m) || spec.max.is_some_and(|m| i > m) {
                        return Err(bad(
                            name,
                            format!("{i} is outside {:?}..={:?}", spec.min, spec.max),
                        ));
                    }
                    Value::from(i)
                }
                (ParamType::Boolean, Value::Bool(b)) => Value::Bool(b),
                (kind, v) => {
                    return Err(bad(
                        name,
                        format!("expected {kind:?}, got {v}").to_lowercase(),
                    ))
                }
            };
            out.insert(name.clone(), value);
        }
        Ok(out)
    }
}

/// The longest string parameter accepted (bytes).
pub const MAX_STRING_BYTES: usize = 4096;

/// Jinja's statement, expression and comment openers. A value holding one is refused unless
/// its parameter declares `raw = true`.
pub const TEMPLATE_MARKERS: [&str; 3] = ["{{", "{%", "{#"];

/// Checks one string value: length, NUL, template markers, pattern. The message never
/// quotes a long value back (it may be hostile or secret); short ones are quoted escaped.
fn check_string(spec: &ParamSpec, s: &str) -> Result<(), String> {
    let limit = spec
        .max_length
        .unwrap_or(MAX_STRING_BYTES)
        .min(MAX_STRING_BYTES);
    if s.len() > limit {
        return Err(format!("is longer than {limit} bytes"));
    }
    if s.contains('\0') {
        return Err("contains a NUL character".into());
    }
    if !spec.raw {
        if let Some(m) = TEMPLATE_MARKERS.iter().find(|m| s.contains(**m)) {
            return Err(format!(
                "contains the template marker `{m}`: parameter values are data, never templates"
            ));
        }
    }
    if let Some(p) = &spec.pattern {
        if !pattern_matches(p, s) {
            return Err(format!("{} does not match {p}", quote_short(s)));
        }
    }
    Ok(())
}

fn quote_short(s: &str) -> String {
    if s.chars().count() <= 80 {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(60).collect();
        format!("{head:?}… ({} bytes)", s.len())
    }
}

/// Names Ansible gives a meaning of its own: a parameter called so could change how the
/// play connects or what runs (`ansible_ssh_common_args`, `ansible_python_interpreter`…).
const RESERVED_PARAMETER_NAMES: [&str; 16] = [
    "hostvars",
    "groups",
    "group_names",
    "inventory_hostname",
    "inventory_hostname_short",
    "inventory_dir",
    "inventory_file",
    "playbook_dir",
    "play_hosts",
    "role_path",
    "omit",
    "environment",
    "vars",
    "lookup",
    "query",
    "q",
];

/// A parameter name must be a plain identifier that neither Ansible nor Chiffon reserves.
fn check_parameter_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok_start = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !ok_start
        || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        || name.len() > 64
    {
        return Err("parameter names are [a-z_][a-z0-9_]*, at most 64 bytes".into());
    }
    if name.starts_with("ansible_") || name.starts_with("chiffon_") {
        return Err("the prefixes `ansible_` and `chiffon_` are reserved".into());
    }
    if RESERVED_PARAMETER_NAMES.contains(&name) {
        return Err(format!("`{name}` is reserved by Ansible"));
    }
    Ok(())
}

fn toml_to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The loaded catalog.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub root: PathBuf,
    pub actions: BTreeMap<String, ActionSpec>,
    /// Host names from `inventory.ini` (without group headers or variables).
    pub hosts: Vec<String>,
    /// sha256 over every `action.toml` and the inventory: the plan cache's catalog key.
    pub fingerprint: String,
}

impl Catalog {
    /// Loads every `*/action.toml` under `root` and `root/inventory.ini`.
    pub fn load(root: impl AsRef<Path>) -> Result<Catalog, CatalogError> {
        let root = root.as_ref().to_path_buf();
        let invalid = |p: &Path, m: String| CatalogError::Invalid {
            path: p.display().to_string(),
            message: m,
        };
        let entries = std::fs::read_dir(&root).map_err(|e| invalid(&root, e.to_string()))?;
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("action.toml").is_file())
            .collect();
        dirs.sort();
        let mut hasher = Sha256::new();
        let mut actions = BTreeMap::new();
        for dir in dirs {
            let file = dir.join("action.toml");
            let text = std::fs::read_to_string(&file).map_err(|e| invalid(&file, e.to_string()))?;
            hasher.update(file.to_string_lossy().as_bytes());
            hasher.update(text.as_bytes());
            let mut spec: ActionSpec =
                toml::from_str(&text).map_err(|e| invalid(&file, e.to_string()))?;
            spec.name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !spec
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(invalid(&file, "action names are [A-Za-z0-9_]".into()));
            }
            if spec.agent_type.is_empty()
                || !spec
                    .agent_type
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
            {
                return Err(invalid(&file, "agent_type is [a-z0-9_-]+".into()));
            }
            for (pname, p) in &spec.parameters {
                check_parameter_name(pname)
                    .map_err(|m| invalid(&file, format!("parameter {pname}: {m}")))?;
                if p.kind != ParamType::String && (p.raw || p.max_length.is_some()) {
                    return Err(invalid(
                        &file,
                        format!("parameter {pname}: raw and max_length apply to strings only"),
                    ));
                }
                if let Some(pat) = &p.pattern {
                    validate_pattern(pat)
                        .map_err(|m| invalid(&file, format!("parameter {pname}: {m}")))?;
                }
                if let Some(toml::Value::String(d)) = &p.default {
                    check_string(p, d).map_err(|m| {
                        invalid(&file, format!("parameter {pname}: its default {m}"))
                    })?;
                }
            }
            let playbook = dir.join("playbook.yml");
            spec.playbook = playbook.is_file().then_some(playbook);
            actions.insert(spec.name.clone(), spec);
        }
        let inv = root.join("inventory.ini");
        let hosts = match std::fs::read_to_string(&inv) {
            Ok(text) => {
                hasher.update(text.as_bytes());
                parse_inventory_hosts(&text)
            }
            Err(_) => Vec::new(),
        };
        Ok(Catalog {
            root,
            actions,
            hosts,
            fingerprint: hex::encode(hasher.finalize()),
        })
    }

    pub fn get(&self, action: &str) -> Result<&ActionSpec, CatalogError> {
        self.actions
            .get(action)
            .ok_or_else(|| CatalogError::UnknownAction(action.to_string()))
    }
}

fn parse_inventory_hosts(text: &str) -> Vec<String> {
    let mut hosts = Vec::new();
    let mut in_vars = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_vars = line.contains(":vars") || line.contains(":children");
            continue;
        }
        if in_vars {
            continue;
        }
        if let Some(h) = line.split_whitespace().next() {
            if !hosts.iter().any(|x| x == h) {
                hosts.push(h.to_string());
            }
        }
    }
    hosts
}

// A deliberately small regular-expression subset, so the catalog needs no regex engine:
// `^`, `$`, literals, `.`, escapes `\d \w \s \.`, classes `[a-z0-9_.-]` (with ranges),
// and the quantifiers `* + ? {n} {n,m}`.
#[derive(Debug, Clone)]
enum Atom {
    Any,
    Lit(char),
    Class(Vec<(char, char)>, bool),
}

#[derive(Debug, Clone)]
struct Piece {
    atom: Atom,
    min: usize,
    max: usize,
}

fn parse_pattern(p: &str) -> Result<(bool, Vec<Piece>, bool), String> {
    let mut chars: Vec<char> = p.chars().collect();
    let anchored_start = chars.first() == Some(&'^');
    if anchored_start {
        chars.remove(0);
    }
    let anchored_end =
        chars.last() == Some(&'$') && !(chars.len() >= 2 && chars[chars.len() - 2] == '\\');
    if anchored_end {
        chars.pop();
    }
    let mut pieces = Vec::new();
    let mut i = 0;
    let esc = |c: char| -> Result<Atom, String> {
        Ok(match c {
            'd' => Atom::Class(vec![('0', '9')], false),
            'w' => Atom::Class(vec![('a', 'z'), ('A', 'Z'), ('0', '9'), ('_', '_')], false),
            's' => Atom::Class(
                vec![(' ', ' '), ('\t', '\t'), ('\n', '\n'), ('\r', '\r')],
                false,
            ),
            c if !c.is_ascii_alphanumeric() => Atom::Lit(c),
            c => return Err(format!("unsupported escape \\{c}")),
        })
    };
    while i < chars.len() {
        let atom = match chars[i] {
            '.' => Atom::Any,
            '\\' => {
                i += 1;
                esc(*chars.get(i).ok_or("dangling \\")?)?
            }
            '[' => {
                i += 1;
                let neg = chars.get(i) == Some(&'^');
                if neg {
                    i += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let c = *chars.get(i).ok_or("unclosed [")?;
                    if c == ']' && !first {
                        break;
                    }
                    first = false;
                    let lo = if c == '\\' {
                        i += 1;
                        match esc(*chars.get(i).ok_or("dangling \\")?)? {
                            Atom::Lit(l) => l,
                            Atom::Class(r, _) => {
                                ranges.extend(r);
                                i += 1;
                                continue;
                            }
                            Atom::Any => unreachable!(),
                        }
                    } else {
                        c
                    };
                    if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|c| *c != ']')
                    {
                        ranges.push((lo, chars[i + 2]));
                        i += 3;
                    } else {
                        ranges.push((lo, lo));
                        i += 1;
                    }
                }
                Atom::Class(ranges, neg)
            }
            c @ ('(' | ')' | '|' | '*' | '+' | '?' | '{' | '}' | '^' | '$') => {
                return Err(format!("unsupported pattern syntax `{c}`"))
            }
            c => Atom::Lit(c),
        };
        i += 1;
        let (min, max) = match chars.get(i) {
            Some('*') => (0, usize::MAX),
            Some('+') => (1, usize::MAX),
            Some('?') => (0, 1),
            Some('{') => {
                let end = chars[i..]
                    .iter()
                    .position(|c| *c == '}')
                    .ok_or("unclosed {")?
                    + i;
                let body: String = chars[i + 1..end].iter().collect();
                let (a, b) = match body.split_once(',') {
                    Some((a, "")) => (a.trim().parse().map_err(|_| "bad {n,}")?, usize::MAX),
                    Some((a, b)) => (
                        a.trim().parse().map_err(|_| "bad {n,m}")?,
                        b.trim().parse().map_err(|_| "bad {n,m}")?,
                    ),
                    None => {
                        let n = body.trim().parse().map_err(|_| "bad {n}")?;
                        (n, n)
                    }
                };
                i = end;
                (a, b)
            }
            _ => {
                i -= 1;
                (1, 1)
            }
        };
        i += 1;
        pieces.push(Piece { atom, min, max });
    }
    Ok((anchored_start, pieces, anchored_end))
}

fn atom_matches(a: &Atom, c: char) -> bool {
    match a {
        Atom::Any => c != '\n',
        Atom::Lit(l) => *l == c,
        Atom::Class(r, neg) => r.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *neg,
    }
}

fn match_here(pieces: &[Piece], s: &[char], end: bool) -> bool {
    let Some((p, rest)) = pieces.split_first() else {
        return !end || s.is_empty();
    };
    let mut n = 0;
    while n < p.min {
        if n >= s.len() || !atom_matches(&p.atom, s[n]) {
            return false;
        }
        n += 1;
    }
    loop {
        if match_here(rest, &s[n..], end) {
            return true;
        }
        if n >= p.max || n >= s.len() || !atom_matches(&p.atom, s[n]) {
            return false;
        }
        n += 1;
    }
}

/// Whether `pattern` is in the supported subset.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    parse_pattern(pattern).map(|_| ())
}

/// Matches `s` against a catalog pattern (see [`validate_pattern`]).
pub fn pattern_matches(pattern: &str, s: &str) -> bool {
    let Ok((start, pieces, end)) = parse_pattern(pattern) else {
        return false;
    };
    let chars: Vec<char> = s.chars().collect();
    if start {
        return match_here(&pieces, &chars, end);
    }
    (0..=chars.len()).any(|i| match_here(&pieces, &chars[i..], end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("^[A-Za-z0-9_.-]+$", "nas-01.lan"));
        assert!(!pattern_matches("^[A-Za-z0-9_.-]+$", "nas; rm -rf /"));
        assert!(!pattern_matches("^[A-Za-z0-9_.-]+$", ""));
        assert!(pattern_matches("^/[\\w./-]*$", "/tmp/chiffon/x.conf"));
        assert!(!pattern_matches("^/[\\w./-]*$", "relative"));
        assert!(pattern_matches("^0[0-7]{3}$", "0644"));
        assert!(!pattern_matches("^0[0-7]{3}$", "0844"));
        assert!(validate_pattern("(a|b)").is_err());
        assert!(pattern_matches("ab", "xxabyy"));
    }

    #[test]
    fn validate_params() {
        let spec: ActionSpec = toml::from_str(
            r#"
            description = "d"
            agent_type = "infrastructure"
            [parameters.host]
            type = "string"
            required = true
            pattern = "^[a-z]+$"
            [parameters.port]
            type = "integer"
            default = 8080
            min = 1
            max = 65535
            "#,
        )
        .unwrap();
        let ok = spec
            .validate(serde_json::json!({"host": "nas"}).as_object().unwrap())
            .unwrap();
        assert_eq!(ok["port"], 8080);
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"host": "NAS!"}),
            serde_json::json!({"host": "nas", "port": "80"}),
            serde_json::json!({"host": "nas", "port": 70000}),
            serde_json::json!({"host": "nas", "extra": 1}),
        ] {
            let err = spec.validate(bad.as_object().unwrap()).unwrap_err();
            assert_eq!(err.code(), ErrorCode::PlanInvalidParameter, "{bad}");
        }
    }

    fn spec_with(extra: &str) -> ActionSpec {
        toml::from_str(&format!(
            "description = \"d\"\nagent_type = \"infrastructure\"\n\
             [parameters.content]\ntype = \"string\"\n{extra}"
        ))
        .unwrap()
    }

    fn check(spec: &ActionSpec, v: &str) -> Result<Map<String, Value>, CatalogError> {
        spec.validate(serde_json::json!({ "content": v }).as_object().unwrap())
    }

    #[test]
    fn template_markers_are_refused_unless_raw() {
        let spec = spec_with("");
        for hostile in [
            "{{ lookup('pipe', 'touch /tmp/x') }}",
            "a {% for x in y %}{% endfor %}",
            "{# comment #}",
            "x{{y",
        ] {
            let e = check(&spec, hostile).unwrap_err();
            assert_eq!(e.code(), ErrorCode::PlanInvalidParameter);
            assert!(e.to_string().contains("template marker"), "{e}");
        }
        // Braces that are not markers are data.
        check(&spec, "{ \"json\": [1, 2] } and ${HOME} and { {").unwrap();
        let raw = spec_with("raw = true");
        check(&raw, "{{ literally }}").unwrap();
    }

    #[test]
    fn nul_and_length_are_refused() {
        let spec = spec_with("max_length = 10");
        assert!(check(&spec, "a\0b")
            .unwrap_err()
            .to_string()
            .contains("NUL"));
        assert!(check(&spec, "0123456789x")
            .unwrap_err()
            .to_string()
            .contains("longer than 10"));
        check(&spec, "0123456789").unwrap();
        let unbounded = spec_with("");
        let long = "x".repeat(MAX_STRING_BYTES + 1);
        let e = check(&unbounded, &long).unwrap_err().to_string();
        assert!(e.contains("longer than 4096"), "{e}");
        assert!(
            !e.contains(&long[..100]),
            "a long value is never echoed back"
        );
    }

    #[test]
    fn reserved_and_odd_parameter_names_are_refused() {
        for bad in [
            "ansible_ssh_common_args",
            "ansible_python_interpreter",
            "chiffon_task_id",
            "hostvars",
            "environment",
            "Upper",
            "with-dash",
            "1x",
            "",
        ] {
            assert!(check_parameter_name(bad).is_err(), "{bad}");
        }
        for good in ["host", "path", "exec_start", "_x", "port2"] {
            check_parameter_name(good).unwrap();
        }
    }

    #[test]
    fn a_catalog_with_a_reserved_name_or_hostile_default_does_not_load() {
        for (name, toml) in [
            (
                "reserved",
                "[parameters.ansible_connection]\ntype = \"string\"\n",
            ),
            (
                "hostile_default",
                "[parameters.x]\ntype = \"string\"\ndefault = \"{{ lookup('env', 'HOME') }}\"\n",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let action = dir.path().join(name);
            std::fs::create_dir(&action).unwrap();
            std::fs::write(
                action.join("action.toml"),
                format!("description = \"d\"\nagent_type = \"infrastructure\"\n{toml}"),
            )
            .unwrap();
            let e = Catalog::load(dir.path()).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidCatalog, "{name}: {e}");
        }
    }

    #[test]
    fn the_shipped_catalog_loads_and_declares_no_raw_parameter() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../playbooks");
        let catalog = Catalog::load(&root).unwrap();
        assert!(catalog.actions.len() >= 6);
        for a in catalog.actions.values() {
            for (n, p) in &a.parameters {
                assert!(!p.raw, "{}.{n} declares raw = true", a.name);
            }
        }
    }

    #[test]
    fn inventory_hosts() {
        let h = parse_inventory_hosts(
            "[local]\nlocalhost ansible_connection=local\n[nas]\nnas.lan\n[all:vars]\nx=1\n",
        );
        assert_eq!(h, vec!["localhost", "nas.lan"]);
    }
}
