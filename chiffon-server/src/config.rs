//! The one place Chiffon's binaries read configuration.
//!
//! Precedence, lowest first: built-in defaults, the TOML file (`--config PATH` or
//! `CHIFFON_CONFIG`), environment variables (CONTRACT.md's table), command-line flags
//! ([`ConfigOverrides`]). The result is a [`Config`] that [`crate::app`] turns into a running
//! system; nothing below this module reads the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use chiffon_core::engine::EngineConfig;
use chiffon_core::llm::providers::ApiKey;
use chiffon_core::llm::router::parse_order;
use chiffon_core::llm::{AnthropicConfig, LlmConfig, OllamaConfig, OpenAiConfig};
use chiffon_core::planner::PlannerConfig;
use chiffon_core::redact::{url_password, Redactor};
use chiffon_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

/// Where the CLI finds the server when neither `--server` nor `CHIFFON_URL` says.
pub const DEFAULT_SERVER_URL: &str = "http://127.0.0.1:8080";
/// `CHIFFON_DATABASE_URL`'s default: the embedded store.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://.chiffon/chiffon.db";
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";

/// Configuration could not be read or is invalid (code 5601). Messages name the key and the
/// problem, never the value: a value may be a token, a key or a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::InvalidConfig
    }
}

/// A token's role. Each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads.
    Viewer,
    /// + submits requests and cancels its own.
    Requester,
    /// + approves and rejects.
    Approver,
    /// Everything, including cancelling anyone's request.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Requester => "requester",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[tokens]]` entry.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it: recorded as requester, approver and actor. Defaults to the role.
    #[serde(default)]
    pub name: Option<String>,
    pub token: String,
    pub role: Role,
}

impl TokenConfig {
    /// The identity recorded for this token's actions.
    pub fn identity(&self) -> String {
        match &self.name {
            Some(n) if !n.trim().is_empty() => n.trim().to_string(),
            _ => self.role.as_str().to_string(),
        }
    }
}

// Tokens never reach logs, not even through `{:?}`.
impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token", &"***")
            .field("role", &self.role)
            .finish()
    }
}

/// `[server]`: the HTTP API's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest accepted request body; larger ones get 413 (5502).
    pub body_limit_bytes: usize,
    /// SSE keep-alive comment interval, seconds.
    pub sse_keepalive_secs: u64,
    /// Largest page `GET /requests` and `GET /request/{id}/logs` return.
    pub max_page: u32,
    /// The server's address as people reach it (`https://chiffon.example.com`), for links
    /// to the console in webhooks; unset: `http://` + the bind address.
    pub public_url: Option<String>,
    /// Host names the server answers besides the loopback names and the bind address
    /// (`CHIFFON_ALLOWED_HOSTS`, comma-separated): the names clients and proxies use to reach
    /// it. Any other `Host` gets 421 (5507), which stops DNS-rebinding pages.
    pub allowed_hosts: Vec<String>,
    /// Mark the web console's cookies `Secure` (browsers then send them over HTTPS only):
    /// turn on when TLS terminates in front of the server.
    pub secure_cookies: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            body_limit_bytes: 64 * 1024,
            sse_keepalive_secs: 15,
            max_page: 1000,
            public_url: None,
            allowed_hosts: Vec::new(),
            secure_cookies: false,
        }
    }
}

/// `[agents]`: the built-in agents started in-process when no AMQP URL is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsConfig {
    /// Start the infrastructure and desktop agents in-process on the in-process bus.
    pub in_process: bool,
    /// `ansible-playbook` to use; unset: found on `PATH` (or `.venv/bin`).
    pub ansible_playbook: Option<PathBuf>,
    /// Tasks each in-process agent runs at once.
    pub max_concurrent: usize,
    /// Milliseconds a task runs before an in-process agent sends its first `work_status`;
    /// a shorter task sends only its `work_result`. 0: statuses from the start.
    pub status_delay_ms: u64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            in_process: true,
            ansible_playbook: None,
            max_concurrent: 4,
            status_delay_ms: 1000,
        }
    }
}

/// Everything the server, `chiffon up` and `chiffon run` are configured with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `postgres://…` or `sqlite://PATH` (`CHIFFON_DATABASE_URL`).
    pub database_url: String,
    /// RabbitMQ; unset: the in-process bus with in-process agents (`CHIFFON_AMQP_URL`).
    pub amqp_url: Option<String>,
    /// Listen address (`CHIFFON_BIND`).
    pub bind: String,
    /// The action catalog (`CHIFFON_PLAYBOOKS`).
    pub playbooks: PathBuf,
    /// The git audit trail (`CHIFFON_AUDIT_REPO`), created if missing.
    pub audit_repo: PathBuf,
    pub server: ServerConfig,
    pub agents: AgentsConfig,
    /// Providers, order, prices and budgets.
    pub llm: LlmConfig,
    /// Plan cache and LLM answer limits.
    pub planner: PlannerConfig,
    /// Approval policy, cost limit, dispatch.
    pub engine: EngineConfig,
    /// API tokens; none: the server binds loopback only and runs without auth.
    pub tokens: Vec<TokenConfig>,
    /// `[[webhooks]]`: where status changes are POSTed (see [`crate::webhooks`]).
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// `CHIFFON_AUDIT_KEY` (environment only, never in the file): the audit chain's HMAC
    /// key. Kept so the redactor strikes it.
    #[serde(skip)]
    pub audit_key: Option<ApiKey>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: DEFAULT_DATABASE_URL.into(),
            amqp_url: None,
            bind: DEFAULT_BIND.into(),
            playbooks: PathBuf::from("playbooks"),
            audit_repo: PathBuf::from(".chiffon/audit"),
            server: ServerConfig::default(),
            agents: AgentsConfig::default(),
            llm: LlmConfig::default(),
            planner: PlannerConfig::default(),
            engine: EngineConfig::default(),
            tokens: Vec::new(),
            webhooks: Vec::new(),
            audit_key: None,
        }
    }
}

/// Command-line flags that win over the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct ConfigOverrides {
    pub database_url: Option<String>,
    pub amqp_url: Option<String>,
    pub bind: Option<String>,
    pub playbooks: Option<PathBuf>,
    pub audit_repo: Option<PathBuf>,
}

impl Config {
    /// Reads the file (`path`, else `CHIFFON_CONFIG`, else none), then the process
    /// environment, then `overrides`, and validates the result.
    pub fn load(path: Option<&Path>, overrides: &ConfigOverrides) -> Result<Config, ConfigError> {
        Config::load_with(path, overrides, |k| std::env::var(k).ok())
    }

    /// [`Config::load`] with the environment given as a function (tests).
    pub fn load_with(
        path: Option<&Path>,
        overrides: &ConfigOverrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let path: Option<PathBuf> = path
            .map(Path::to_path_buf)
            .or_else(|| nonempty(&env, "CHIFFON_CONFIG").map(PathBuf::from));
        let mut config = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|e| match e {
                    ConfigError::Parse { message, .. } => ConfigError::Parse {
                        path: p.display().to_string(),
                        message,
                    },
                    other => other,
                })?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.apply_overrides(overrides);
        config.finish()?;
        Ok(config)
    }

    /// Parses a TOML document (no environment, no validation).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<toml>".into(),
            message: describe_toml_error(text, &e),
        })
    }

    /// Applies CONTRACT.md's environment variables over the file's values.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = nonempty(&env, "CHIFFON_DATABASE_URL") {
            self.database_url = v;
        }
        if let Some(v) = nonempty(&env, "CHIFFON_AMQP_URL") {
            self.amqp_url = Some(v);
        }
        if let Some(v) = nonempty(&env, "CHIFFON_BIND") {
            self.bind = v;
        }
        if let Some(v) = nonempty(&env, "CHIFFON_PLAYBOOKS") {
            self.playbooks = PathBuf::from(v);
        }
        if let Some(v) = nonempty(&env, "CHIFFON_AUDIT_REPO") {
            self.audit_repo = PathBuf::from(v);
        }
        // Broker users that may act as agents / submit requests on the bus (SECURITY.md).
        if let Some(v) = nonempty(&env, "CHIFFON_AGENT_USERS") {
            self.engine.bus.agent_users = split_list(&v);
        }
        if let Some(v) = nonempty(&env, "CHIFFON_REQUESTER_USERS") {
            self.engine.bus.requester_users = split_list(&v);
        }
        if let Some(v) = nonempty(&env, "CHIFFON_ALLOWED_HOSTS") {
            self.server.allowed_hosts = split_list(&v);
        }
        // The agent binaries read the same variable; in-process agents follow it too.
        if let Some(v) = nonempty(&env, "CHIFFON_ANSIBLE_PLAYBOOK") {
            self.agents.ansible_playbook = Some(PathBuf::from(v));
        }
        // A provider is enabled by its key (or, for the OpenAI wire format and Ollama, its
        // address); the file may still set its model, prices and budget.
        let key = nonempty(&env, "ANTHROPIC_API_KEY");
        let base = nonempty(&env, "ANTHROPIC_BASE_URL");
        if key.is_some() || (base.is_some() && self.llm.anthropic.is_some()) {
            let c = self
                .llm
                .anthropic
                .get_or_insert_with(AnthropicConfig::default);
            if let Some(k) = key {
                c.api_key = ApiKey::new(k);
            }
            if let Some(b) = base {
                c.base_url = b;
            }
        }
        let key = nonempty(&env, "OPENAI_API_KEY");
        let base = nonempty(&env, "OPENAI_BASE_URL");
        if key.is_some() || base.is_some() {
            let c = self.llm.openai.get_or_insert_with(OpenAiConfig::default);
            if let Some(k) = key {
                c.api_key = ApiKey::new(k);
            }
            if let Some(b) = base {
                c.base_url = b;
            }
        }
        if let Some(host) = nonempty(&env, "OLLAMA_HOST") {
            let c = self.llm.ollama.get_or_insert_with(OllamaConfig::default);
            c.host = if host.contains("://") {
                host
            } else {
                format!("http://{host}")
            };
        }
        // A model by environment applies to a provider that is enabled (by its key or
        // address above, or by its section in the file); alone it enables nothing.
        if let Some(m) = nonempty(&env, "CHIFFON_ANTHROPIC_MODEL") {
            if let Some(c) = self.llm.anthropic.as_mut() {
                c.model = m;
            }
        }
        if let Some(m) = nonempty(&env, "CHIFFON_OPENAI_MODEL") {
            if let Some(c) = self.llm.openai.as_mut() {
                c.model = m;
            }
        }
        if let Some(m) = nonempty(&env, "CHIFFON_OLLAMA_MODEL") {
            if let Some(c) = self.llm.ollama.as_mut() {
                c.model = m;
            }
        }
        if let Some(order) = nonempty(&env, "CHIFFON_LLM_ORDER") {
            self.llm.order = parse_order(&order).map_err(|_| {
                ConfigError::Invalid(ORDER_PROBLEM.replace("{key}", "CHIFFON_LLM_ORDER"))
            })?;
        }
        // Not used by the engine yet; read so that the redactor strikes it everywhere.
        self.audit_key = nonempty(&env, "CHIFFON_AUDIT_KEY").map(ApiKey::new);
        Ok(())
    }

    pub fn apply_overrides(&mut self, o: &ConfigOverrides) {
        if let Some(v) = &o.database_url {
            self.database_url = v.clone();
        }
        if let Some(v) = &o.amqp_url {
            self.amqp_url = Some(v.clone());
        }
        if let Some(v) = &o.bind {
            self.bind = v.clone();
        }
        if let Some(v) = &o.playbooks {
            self.playbooks = v.clone();
        }
        if let Some(v) = &o.audit_repo {
            self.audit_repo = v.clone();
        }
    }

    /// Validates, and fills what follows from the rest (the engine's budget table from the
    /// providers' budgets, for `costs`).
    pub fn finish(&mut self) -> Result<(), ConfigError> {
        self.bind_addr()?;
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
            || self.database_url.starts_with("sqlite:"))
        {
            return Err(ConfigError::Invalid(format!(
                "database_url (CHIFFON_DATABASE_URL): {}neither postgres://… nor sqlite://PATH",
                scheme_of(&self.database_url)
            )));
        }
        if let Some(a) = &self.amqp_url {
            if !(a.starts_with("amqp://") || a.starts_with("amqps://")) {
                return Err(ConfigError::Invalid(format!(
                    "amqp_url (CHIFFON_AMQP_URL): {}does not start with amqp:// or amqps://",
                    scheme_of(a)
                )));
            }
        }
        parse_order(&self.llm.order.join(","))
            .map_err(|_| ConfigError::Invalid(ORDER_PROBLEM.replace("{key}", "llm.order")))?;
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            // Short tokens are guessable; the check also catches a forgotten placeholder.
            if t.token.trim().len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "tokens[{i}] ({}): a token needs at least 16 characters",
                    t.identity()
                )));
            }
            if !seen.insert(t.token.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "tokens[{i}] ({}): the same token is listed twice",
                    t.identity()
                )));
            }
        }
        for hook in &self.webhooks {
            hook.validate().map_err(ConfigError::Invalid)?;
        }
        if let Some(limit) = self.engine.approval.cost_limit_usd {
            if !(limit.is_finite() && limit >= 0.0) {
                return Err(ConfigError::Invalid(
                    "engine.approval.cost_limit_usd must be a non-negative number".into(),
                ));
            }
        }
        for (i, h) in self.server.allowed_hosts.iter().enumerate() {
            if crate::guard::normalize_host(h).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "server.allowed_hosts[{i}] `{h}` is not a host name or address"
                )));
            }
        }
        if self.server.max_page == 0 {
            return Err(ConfigError::Invalid(
                "server.max_page must be at least 1".into(),
            ));
        }
        if self.server.body_limit_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "server.body_limit_bytes must be at least 1024".into(),
            ));
        }
        let budgets = [
            (
                "anthropic",
                self.llm
                    .anthropic
                    .as_ref()
                    .and_then(|c| c.monthly_budget_usd),
            ),
            (
                "openai",
                self.llm.openai.as_ref().and_then(|c| c.monthly_budget_usd),
            ),
            (
                "ollama",
                self.llm.ollama.as_ref().and_then(|c| c.monthly_budget_usd),
            ),
        ];
        for (name, budget) in budgets {
            if let Some(b) = budget {
                self.engine.budgets.entry(name.to_string()).or_insert(b);
            }
        }
        Ok(())
    }

    /// The listen address.
    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.bind.parse().map_err(|_| {
            ConfigError::Invalid("bind (CHIFFON_BIND, --bind): not an IP:PORT address".into())
        })
    }

    /// Every secret this configuration holds (LLM API keys, API tokens, passwords in the
    /// database, AMQP and LLM URLs, the audit key), as the [`Redactor`] that the engine,
    /// the providers and the logs strike them with.
    pub fn redactor(&self) -> Redactor {
        let mut secrets: Vec<String> = Vec::new();
        let mut urls: Vec<&str> = vec![&self.database_url];
        urls.extend(self.amqp_url.as_deref());
        if let Some(a) = &self.llm.anthropic {
            secrets.push(a.api_key.expose().to_string());
            urls.push(&a.base_url);
        }
        if let Some(o) = &self.llm.openai {
            secrets.push(o.api_key.expose().to_string());
            urls.push(&o.base_url);
        }
        if let Some(o) = &self.llm.ollama {
            urls.push(&o.host);
        }
        secrets.extend(self.tokens.iter().map(|t| t.token.clone()));
        secrets.extend(self.webhooks.iter().map(|w| w.secret.clone()));
        secrets.extend(self.audit_key.iter().map(|k| k.expose().to_string()));
        for url in urls {
            secrets.extend(url_password(url));
        }
        Redactor::new(secrets)
    }

    /// Where people open the console: `server.public_url`, else `http://BIND`.
    pub fn console_url(&self) -> String {
        match &self.server.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.bind),
        }
    }

    /// Whether API tokens are configured (otherwise: loopback only, no auth).
    pub fn auth_enabled(&self) -> bool {
        !self.tokens.is_empty()
    }
}

/// `scheme `x`, ` for a URL-looking value, to say which scheme was refused: the scheme
/// alone (letters, digits, `+.-`) holds no secret; anything else is not quoted.
fn scheme_of(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme.len() <= 16
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c)) =>
        {
            format!("scheme `{scheme}` is ")
        }
        _ => "the value is ".into(),
    }
}

const ORDER_PROBLEM: &str =
    "{key}: unknown or repeated provider name (expected anthropic, openai, ollama, offline)";

/// A TOML error as the key and the problem, without the value or the offending line (which
/// the parser's own message quotes, and which may hold a token).
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let problem = value_free(e.message());
    let Some(span) = e.span() else {
        return problem;
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    // The table the line is in: the last header above it.
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|h| h.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line
        .split_once('=')
        .filter(|(k, _)| line_start + k.len() <= start)
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || "_-.".contains(c)));
    let key = match (table, key) {
        (Some(t), Some(k)) => format!(", key `{t}.{k}`"),
        (None, Some(k)) => format!(", key `{k}`"),
        (Some(t), None) => format!(", in [{t}]"),
        (None, None) => String::new(),
    };
    format!("line {line_no}{key}: {problem}")
}

/// serde's messages quote the value they refused (`invalid type: string "…", expected …`,
/// `unknown variant `…``); keep what was expected and leave the value out.
fn value_free(message: &str) -> String {
    let message = message.lines().next().unwrap_or("").trim();
    for prefix in ["invalid type", "invalid value", "unknown variant"] {
        if message.starts_with(prefix) {
            return match message.find(", expected ") {
                Some(i) => format!("{prefix}{}", &message[i..]),
                None => prefix.to_string(),
            };
        }
    }
    message.to_string()
}

fn nonempty(env: &impl Fn(&str) -> Option<String>, key: &str) -> Option<String> {
    env(key)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

/// A comma-separated list, trimmed, without empty items.
fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load_with(None, &ConfigOverrides::default(), env(&[])).unwrap();
        assert_eq!(c.database_url, "sqlite://.chiffon/chiffon.db");
        assert_eq!(c.bind, "127.0.0.1:8080");
        assert_eq!(c.playbooks, PathBuf::from("playbooks"));
        assert_eq!(c.audit_repo, PathBuf::from(".chiffon/audit"));
        assert!(c.amqp_url.is_none());
        assert!(c.llm.anthropic.is_none() && c.llm.openai.is_none() && c.llm.ollama.is_none());
        assert!(!c.auth_enabled());
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chiffon.toml");
        std::fs::write(
            &path,
            r#"
database_url = "sqlite://file.db"
bind = "127.0.0.1:9000"
playbooks = "from-file"

[llm.openai]
model = "gpt-test"
monthly_budget_usd = 7.5

[engine.approval]
cost_limit_usd = 2.0

[[tokens]]
name = "alice"
token = "alice-token-0123456789"
role = "approver"
"#,
        )
        .unwrap();
        let e = env(&[
            ("CHIFFON_DATABASE_URL", "postgres://u:secret@db/chiffon"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:4000/v1"),
            ("OLLAMA_HOST", "127.0.0.1:11434"),
            ("CHIFFON_LLM_ORDER", "ollama, claude"),
            (
                "CHIFFON_ANSIBLE_PLAYBOOK",
                "/opt/ansible/bin/ansible-playbook",
            ),
        ]);
        let flags = ConfigOverrides {
            bind: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let c = Config::load_with(Some(&path), &flags, e).unwrap();
        assert_eq!(c.database_url, "postgres://u:secret@db/chiffon");
        assert_eq!(c.bind, "127.0.0.1:0");
        assert_eq!(c.playbooks, PathBuf::from("from-file"));
        let openai = c.llm.openai.as_ref().unwrap();
        assert_eq!(openai.model, "gpt-test");
        assert_eq!(openai.base_url, "http://127.0.0.1:4000/v1");
        assert_eq!(
            c.llm.ollama.as_ref().unwrap().host,
            "http://127.0.0.1:11434"
        );
        assert_eq!(c.llm.order, vec!["ollama", "anthropic"]);
        assert_eq!(
            c.agents.ansible_playbook,
            Some(PathBuf::from("/opt/ansible/bin/ansible-playbook"))
        );
        assert_eq!(c.engine.approval.cost_limit_usd, Some(2.0));
        assert_eq!(c.engine.budgets.get("openai"), Some(&7.5));
        assert_eq!(c.tokens[0].identity(), "alice");
        assert_eq!(c.tokens[0].role, Role::Approver);
        assert!(!format!("{c:?}").contains("alice-token-0123456789"));
    }

    #[test]
    fn models_by_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chiffon.toml");
        std::fs::write(
            &path,
            "[llm.anthropic]\nmodel = \"from-file\"\n[llm.openai]\nmodel = \"gpt-file\"\n",
        )
        .unwrap();
        let e = env(&[
            ("ANTHROPIC_API_KEY", "sk-ant-test-key"),
            ("OLLAMA_HOST", "127.0.0.1:11434"),
            ("CHIFFON_ANTHROPIC_MODEL", "claude-env"),
            ("CHIFFON_OPENAI_MODEL", "gpt-env"),
            ("CHIFFON_OLLAMA_MODEL", "llama-env"),
        ]);
        let c = Config::load_with(Some(&path), &ConfigOverrides::default(), e).unwrap();
        assert_eq!(c.llm.anthropic.as_ref().unwrap().model, "claude-env");
        assert_eq!(c.llm.openai.as_ref().unwrap().model, "gpt-env");
        assert_eq!(c.llm.ollama.as_ref().unwrap().model, "llama-env");

        // Without the variables the file's models stand; a model alone enables nothing.
        let c = Config::load_with(
            Some(&path),
            &ConfigOverrides::default(),
            env(&[("ANTHROPIC_API_KEY", "sk-ant-test-key")]),
        )
        .unwrap();
        assert_eq!(c.llm.anthropic.as_ref().unwrap().model, "from-file");
        assert_eq!(c.llm.openai.as_ref().unwrap().model, "gpt-file");
        let c = Config::load_with(
            None,
            &ConfigOverrides::default(),
            env(&[("CHIFFON_OLLAMA_MODEL", "llama-env")]),
        )
        .unwrap();
        assert!(c.llm.ollama.is_none());
    }

    #[test]
    fn config_file_named_by_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "bind = \"127.0.0.1:7777\"\n").unwrap();
        let p = path.display().to_string();
        let c = Config::load_with(
            None,
            &ConfigOverrides::default(),
            env(&[("CHIFFON_CONFIG", &p)]),
        )
        .unwrap();
        assert_eq!(c.bind, "127.0.0.1:7777");
    }

    #[test]
    fn bad_config_is_a_5601_error() {
        let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
            ("unknown_key = 1\n", vec![]),
            ("bind = \"not an address\"\n", vec![]),
            ("[[tokens]]\ntoken = \"short\"\nrole = \"viewer\"\n", vec![]),
            (
                "[[tokens]]\ntoken = \"long-enough-token-1234\"\nrole = \"boss\"\n",
                vec![],
            ),
            ("", vec![("CHIFFON_LLM_ORDER", "gemini")]),
            ("", vec![("CHIFFON_DATABASE_URL", "mysql://x")]),
            ("", vec![("CHIFFON_AMQP_URL", "http://rabbit")]),
            ("[server]\nallowed_hosts = [\"bad host\"]\n", vec![]),
            ("", vec![("CHIFFON_ALLOWED_HOSTS", "ok.example, a/b")]),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, (text, vars)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.toml"));
            std::fs::write(&path, text).unwrap();
            let err = Config::load_with(Some(&path), &ConfigOverrides::default(), env(&vars))
                .expect_err(text);
            assert_eq!(err.code().code(), 5601, "{err}");
            assert!(!err.to_string().is_empty());
        }
        let missing = dir.path().join("missing.toml");
        let err =
            Config::load_with(Some(&missing), &ConfigOverrides::default(), env(&[])).unwrap_err();
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn allowed_hosts_from_file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[server]\nallowed_hosts = [\"chiffon.lan\"]\n").unwrap();
        let c = Config::load_with(Some(&path), &ConfigOverrides::default(), env(&[])).unwrap();
        assert_eq!(c.server.allowed_hosts, vec!["chiffon.lan"]);
        let c = Config::load_with(
            Some(&path),
            &ConfigOverrides::default(),
            env(&[("CHIFFON_ALLOWED_HOSTS", " ops.example.com, [fd00::1] ,")]),
        )
        .unwrap();
        assert_eq!(c.server.allowed_hosts, vec!["ops.example.com", "[fd00::1]"]);
    }

    #[test]
    fn webhooks_parse_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[server]\npublic_url = \"https://c.example/\"\n\
             [[webhooks]]\nurl = \"https://h.example/x\"\nsecret = \"s3cr3t-webhook-key\"\n\
             events = [\"request.failed\"]\nformat = \"slack\"\n",
        )
        .unwrap();
        let c = Config::load_with(Some(&path), &ConfigOverrides::default(), env(&[])).unwrap();
        assert_eq!(c.webhooks.len(), 1);
        assert_eq!(c.console_url(), "https://c.example");
        assert!(c
            .redactor()
            .redact("x s3cr3t-webhook-key")
            .contains("[REDACTED]"));
        std::fs::write(
            &path,
            "[[webhooks]]\nurl = \"https://h.example/x\"\nsecret = \"s3cr3t-webhook-key\"\nevents = [\"request.nope\"]\n",
        )
        .unwrap();
        let e = Config::load_with(Some(&path), &ConfigOverrides::default(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("request.nope") && !e.contains("s3cr3t"), "{e}");
    }

    #[test]
    fn config_errors_never_print_values() {
        let secret = "s3cr3t-VALUE-0123456789";
        let files = [
            ("[[tokens]]\ntoken = 12345678901\nrole = \"viewer\"\n".to_string(), "12345678901", "key `tokens.token`"),
            (format!("[[tokens]]\ntoken = \"long-enough-token-1234\"\nrole = \"{secret}\"\n"), secret, "key `tokens.role`: unknown variant, expected one of"),
            (format!("[llm.anthropic]\napi_key = \"{secret}\"\nmodel = \"m\"\ntimeout_secs = \"{secret}\"\n"), secret, "line 4, key `llm.anthropic.timeout_secs`: invalid type, expected u64"),
            (format!("[llm.openai]\napi_key = \"{secret}\n"), secret, "line 2"),
            (format!("database_url = [\"{secret}\"]\n"), secret, "key `database_url`: invalid type, expected a string"),
            (format!("bind = \"{secret}\"\n"), secret, "bind (CHIFFON_BIND, --bind): not an IP:PORT address"),
            (format!("database_url = \"mysql://u:{secret}@db/x\"\n"), secret, "database_url (CHIFFON_DATABASE_URL)"),
            (format!("[llm]\norder = [\"{secret}\"]\n"), secret, "llm.order: unknown or repeated provider name"),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, (text, value, expected)) in files.iter().enumerate() {
            let path = dir.path().join(format!("{i}.toml"));
            std::fs::write(&path, text).unwrap();
            let err = Config::load_with(Some(&path), &ConfigOverrides::default(), env(&[]))
                .expect_err(text)
                .to_string();
            assert!(!err.contains(value), "{text}: {err}");
            assert!(!err.contains("s3cr3t"), "{text}: {err}");
            assert!(err.contains(expected), "{text}: {err}");
        }
        for (k, v) in [
            ("CHIFFON_DATABASE_URL", format!("mysql://u:{secret}@db/x")),
            ("CHIFFON_AMQP_URL", format!("http://u:{secret}@rabbit")),
            ("CHIFFON_BIND", secret.to_string()),
            ("CHIFFON_LLM_ORDER", secret.to_string()),
        ] {
            let err = Config::load_with(None, &ConfigOverrides::default(), env(&[(k, &v)]))
                .expect_err(k)
                .to_string();
            assert!(!err.contains("s3cr3t"), "{k}: {err}");
            assert!(err.contains(k), "{k}: {err}");
            if k == "CHIFFON_DATABASE_URL" {
                assert!(err.contains("scheme `mysql` is neither"), "{err}");
            }
        }
    }

    #[test]
    fn the_redactor_holds_every_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[llm.ollama]\nhost = \"http://u:ollama-pass-5678@gpu:11434\"\n\n\
             [[tokens]]\ntoken = \"token-for-alice-0123456789\"\nrole = \"admin\"\n",
        )
        .unwrap();
        let c = Config::load_with(
            Some(&path),
            &ConfigOverrides::default(),
            env(&[
                ("CHIFFON_DATABASE_URL", "postgres://u:db%2Fpass-1234@db/x"),
                ("CHIFFON_AMQP_URL", "amqp://u:amqp-pass-1234@rabbit/%2f"),
                ("ANTHROPIC_API_KEY", "sk-ant-key-0123456789"),
                ("OPENAI_API_KEY", "sk-openai-key-0123456789"),
                (
                    "OPENAI_BASE_URL",
                    "http://proxy:llm-proxy-pass@litellm:4000/v1",
                ),
                ("CHIFFON_AUDIT_KEY", "audit-hmac-key-0123456789"),
            ]),
        )
        .unwrap();
        let secrets = [
            "db%2Fpass-1234",
            "db/pass-1234",
            "amqp-pass-1234",
            "sk-ant-key-0123456789",
            "sk-openai-key-0123456789",
            "llm-proxy-pass",
            "ollama-pass-5678",
            "token-for-alice-0123456789",
            "audit-hmac-key-0123456789",
        ];
        let text = secrets.join(" | ");
        let redacted = c.redactor().redact(&text).into_owned();
        assert_eq!(
            redacted,
            vec![chiffon_core::redact::REDACTED; secrets.len()].join(" | ")
        );
        assert!(!format!("{c:?}").contains("audit-hmac-key"));
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../../chiffon.example.toml");
        let mut c = Config::from_toml(text).unwrap();
        c.finish().unwrap();
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    }
}
