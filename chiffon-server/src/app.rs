//! The composition root: from a [`Config`], the running system.
//!
//! [`App::start`] opens the store, the bus (RabbitMQ when `amqp_url` is set; otherwise the
//! in-process bus with the infrastructure and desktop agents started in this process), the
//! catalog, the git audit trail and the planner, builds the [`Engine`] and starts its
//! background work. `chiffon-server`, `chiffon up` and `chiffon run` all go through here;
//! [`App::serve`] adds the HTTP API. [`App::shutdown`] stops everything gracefully
//! (a `CancellationToken` and a `TaskTracker`).
//!
//! Custom agents can live in the same process: [`AppOptions::with_agent`] hosts any
//! [`Agent`] on the app's bus (see `examples/custom-agent`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use chiffon_agent_kit::{
    Agent, AnsibleConfig, DesktopAgent, InfraAgent, InfraConfig, Runner, RunnerConfig, RunnerError,
};
use chiffon_core::audit::git::GitTrail;
use chiffon_core::catalog::{Catalog, CatalogError};
use chiffon_core::engine::{CatalogPlanner, Engine, EngineParts, PlanProvider};
use chiffon_core::planner::Planner;
use chiffon_core::store::{Store, StoreError};
use chiffon_core::transport::amqp::AmqpTransport;
use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::{Topology, Transport, TransportError};
use chiffon_protocol::ErrorCode;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::{redact_url, Config, ConfigError};
use crate::http::{router, AppState};

/// The system could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: StoreError,
    },
    #[error("message bus {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: TransportError,
    },
    #[error("action catalog: {0}")]
    Catalog(#[from] CatalogError),
    #[error("audit repository {path}: {message}")]
    Git { path: String, message: String },
    #[error("planner: {0}")]
    Planner(String),
    #[error("in-process agent: {0}")]
    Agent(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StartError::Config(e) => e.code(),
            StartError::Store { source, .. } => source.code(),
            StartError::Transport { source, .. } => source.code(),
            StartError::Catalog(e) => e.code(),
            StartError::Git { .. } => ErrorCode::GitCommitFailed,
            StartError::Planner(_) => ErrorCode::InvalidConfig,
            StartError::Agent(_) => ErrorCode::InvalidConfig,
            StartError::Bind { .. } => ErrorCode::InvalidConfig,
        }
    }
}

/// How [`App::start_with`] deviates from the configuration (tests, offline commands).
#[derive(Default)]
pub struct AppOptions {
    /// Use this planner instead of the configured provider chain.
    pub planner: Option<Arc<dyn PlanProvider>>,
    /// Use this bus instead of the configured one.
    pub transport: Option<Arc<dyn Transport>>,
    /// Use this catalog instead of loading the configured folder.
    pub catalog: Option<Arc<Catalog>>,
    /// Do not start the engine's background work (intake, dispatch, sweeps): for commands
    /// that only read (`audit`).
    pub no_engine: bool,
    /// Never start the built-in in-process agents, whatever the configuration says.
    pub no_agents: bool,
    /// Agents to host in this process on the app's bus (in-process or RabbitMQ), whatever
    /// `agents.in_process` and `no_agents` say: [`AppOptions::with_agent`].
    pub agents: Vec<HostedAgent>,
}

impl AppOptions {
    /// Hosts `agent` in this process: a [`Runner`] with the default [`RunnerConfig`] serves
    /// its queue `agent.{agent_type}` on the app's bus and stops with the app. The catalog
    /// entries whose `agent_type` is the agent's are dispatched to it.
    ///
    /// ```no_run
    /// # use chiffon_agent_kit::{Agent, AgentError, TaskContext, TaskOutcome};
    /// # struct HealthCheckAgent;
    /// # impl Agent for HealthCheckAgent {
    /// #     fn agent_type(&self) -> &str { "http_check" }
    /// #     fn actions(&self) -> Vec<String> { vec!["http_check".into()] }
    /// #     async fn handle(&self, _: chiffon_protocol::WorkRequest, _: TaskContext) -> Result<TaskOutcome, AgentError> { Ok(TaskOutcome::output("ok")) }
    /// # }
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use chiffon_server::{App, AppOptions, Config, ConfigOverrides};
    /// let config = Config::load(None, &ConfigOverrides::default())?;
    /// let app = App::start_with(config, AppOptions::default().with_agent(HealthCheckAgent)).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_agent<A: Agent>(self, agent: A) -> Self {
        self.with_agent_config(agent, RunnerConfig::default())
    }

    /// [`AppOptions::with_agent`] with the runner's configuration given.
    pub fn with_agent_config<A: Agent>(mut self, agent: A, config: RunnerConfig) -> Self {
        self.agents.push(HostedAgent::new(agent, config));
        self
    }
}

/// One agent hosted in the app's process ([`AppOptions::with_agent`]). The agent's type is
/// erased here so that agents of different types fit in one list.
pub struct HostedAgent {
    agent_type: String,
    #[allow(clippy::type_complexity)]
    start: Box<
        dyn FnOnce(
                Arc<dyn Transport>,
                CancellationToken,
            ) -> (String, BoxFuture<'static, Result<(), RunnerError>>)
            + Send,
    >,
}

impl HostedAgent {
    pub fn new<A: Agent>(agent: A, config: RunnerConfig) -> Self {
        HostedAgent {
            agent_type: agent.agent_type().to_string(),
            start: Box::new(move |transport, stop| {
                let runner = Runner::new(transport, agent, config);
                let id = runner.agent_id().to_string();
                (id, Box::pin(runner.run(stop)))
            }),
        }
    }

    pub fn agent_type(&self) -> &str {
        &self.agent_type
    }
}

impl std::fmt::Debug for HostedAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedAgent")
            .field("agent_type", &self.agent_type)
            .finish()
    }
}

impl std::fmt::Debug for AppOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppOptions")
            .field("planner", &self.planner.is_some())
            .field("transport", &self.transport.as_ref().map(|t| t.backend()))
            .field("no_engine", &self.no_engine)
            .field("no_agents", &self.no_agents)
            .field("agents", &self.agents)
            .finish()
    }
}

/// A running Chiffon: engine, bus, agents (when in-process) and, after [`App::serve`], the
/// HTTP API.
pub struct App {
    config: Config,
    engine: Engine,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    agents: Vec<String>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("engine", &self.engine)
            .field("agents", &self.agents)
            .finish()
    }
}

impl App {
    /// Starts everything the configuration describes.
    pub async fn start(config: Config) -> Result<App, StartError> {
        App::start_with(config, AppOptions::default()).await
    }

    pub async fn start_with(config: Config, options: AppOptions) -> Result<App, StartError> {
        // Every secret the configuration holds is struck from what is stored and logged.
        let redactor = config.redactor();
        crate::redact_logs(&redactor);
        let store = open_store(&config).await?;
        let catalog = match options.catalog {
            Some(c) => c,
            None => Arc::new(Catalog::load(&config.playbooks)?),
        };
        let (transport, in_process_bus) = match options.transport {
            Some(t) => {
                let memory = t.backend() == "memory";
                (t, memory)
            }
            None => match &config.amqp_url {
                Some(url) => {
                    let t = AmqpTransport::connect(url, Topology::contract())
                        .await
                        .map_err(|source| StartError::Transport {
                            url: redact_url(url),
                            source,
                        })?;
                    if config.engine.bus.is_open() {
                        tracing::warn!(
                            broker_user = t.user(),
                            "no engine.bus.agent_users configured: every authenticated broker user may act as an agent (see SECURITY.md)"
                        );
                    }
                    (Arc::new(t) as Arc<dyn Transport>, false)
                }
                None => (
                    Arc::new(MemoryTransport::new(Topology::contract())) as Arc<dyn Transport>,
                    true,
                ),
            },
        };
        let git = {
            let path = config.audit_repo.clone();
            let trail = tokio::task::spawn_blocking(move || GitTrail::open_or_init(&path))
                .await
                .map_err(|e| StartError::Git {
                    path: config.audit_repo.display().to_string(),
                    message: e.to_string(),
                })?
                .map_err(|e| StartError::Git {
                    path: config.audit_repo.display().to_string(),
                    message: e.to_string(),
                })?;
            Arc::new(trail)
        };
        let planner = match options.planner {
            Some(p) => p,
            None => build_planner(&config, store.clone(), catalog.clone())?,
        };
        let mut engine_config = config.engine.clone();
        engine_config.redactor = engine_config.redactor.merge(&redactor);
        let engine = Engine::new(EngineParts {
            store,
            transport: transport.clone(),
            planner,
            catalog,
            git: Some(git),
            config: engine_config,
        });

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut app = App {
            config,
            engine,
            shutdown,
            tasks,
            agents: Vec::new(),
        };
        if !options.no_engine {
            let engine = app.engine.clone();
            let stop = app.shutdown.clone();
            // The engine declares the topology before consuming; agents started below
            // declare theirs too, so the order between them does not matter.
            app.tasks.spawn(async move {
                if let Err(e) = engine.run(stop.clone()).await {
                    tracing::error!(error = %e, "engine stopped with an error");
                    stop.cancel();
                }
            });
        }
        if !app.config.webhooks.is_empty() {
            let console = app.config.console_url();
            app.tasks.spawn(crate::webhooks::run(
                app.engine.clone(),
                app.config.webhooks.clone(),
                console,
                crate::webhooks::METRICS.clone(),
                app.shutdown.clone(),
            ));
        }
        if in_process_bus && app.config.agents.in_process && !options.no_agents {
            app.start_agents(transport.clone())?;
        }
        for hosted in options.agents {
            let agent_type = hosted.agent_type.clone();
            let (id, run) = (hosted.start)(transport.clone(), app.shutdown.clone());
            tracing::info!(agent = %id, %agent_type, "hosting agent in process");
            app.agents.push(id);
            app.tasks.spawn(async move {
                if let Err(e) = run.await {
                    tracing::error!(error = %e, %agent_type, "in-process agent stopped");
                }
            });
        }
        Ok(app)
    }

    /// The infrastructure and desktop agents on the in-process bus.
    fn start_agents(&mut self, transport: Arc<dyn Transport>) -> Result<(), StartError> {
        let infra = InfraAgent::new(InfraConfig {
            playbooks: self.config.playbooks.clone(),
            ansible: AnsibleConfig {
                playbook_bin: self.config.agents.ansible_playbook.clone(),
                ..Default::default()
            },
        })
        .map_err(|e| StartError::Agent(e.to_string()))?;
        if let Err(e) = infra.executor().ansible_playbook() {
            tracing::warn!("{e}; playbook actions will fail until ansible-core is installed");
        }
        let runner_config = RunnerConfig {
            max_concurrent: self.config.agents.max_concurrent.max(1),
            status_delay: Duration::from_millis(self.config.agents.status_delay_ms),
            ..Default::default()
        };
        let desktop = DesktopAgent::new(runner_config.hostname.clone(), Some(infra.clone()));
        let infra_runner = Runner::new(transport.clone(), infra, runner_config.clone());
        let desktop_runner = Runner::new(transport, desktop, runner_config);
        self.agents.push(infra_runner.agent_id().to_string());
        self.agents.push(desktop_runner.agent_id().to_string());
        let stop = self.shutdown.clone();
        self.tasks.spawn(async move {
            if let Err(e) = infra_runner.run(stop).await {
                tracing::error!(error = %e, "in-process infrastructure agent stopped");
            }
        });
        let stop = self.shutdown.clone();
        self.tasks.spawn(async move {
            if let Err(e) = desktop_runner.run(stop).await {
                tracing::error!(error = %e, "in-process desktop agent stopped");
            }
        });
        tracing::info!(agents = ?self.agents, "in-process agents started");
        Ok(())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Ids of the agents running in this process.
    pub fn in_process_agents(&self) -> &[String] {
        &self.agents
    }

    /// Cancelled when the app shuts down (or the engine fails).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The HTTP API over this app's engine, answering the configured bind address's host.
    pub fn router(&self) -> Router {
        self.router_for(self.config.bind_addr().ok())
    }

    /// The HTTP API answering `addr`'s host (besides loopback and `server.allowed_hosts`).
    fn router_for(&self, addr: Option<SocketAddr>) -> Router {
        router(
            AppState::new(
                self.engine.clone(),
                Auth::new(self.config.tokens.clone()),
                self.config.server.clone(),
            )
            .with_bind(addr)
            .with_shutdown(self.shutdown.clone()),
        )
    }

    /// Binds the configured address, refusing a non-loopback one when no tokens are
    /// configured.
    pub async fn bind(&self) -> Result<TcpListener, StartError> {
        let addr = self.config.bind_addr()?;
        check_bind(addr, self.config.auth_enabled())?;
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: addr.to_string(),
                source,
            })
    }

    /// Serves the HTTP API on `listener` until shutdown; returns the bound address.
    pub fn serve(&self, listener: TcpListener) -> Result<SocketAddr, StartError> {
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: "listener".into(),
            source,
        })?;
        check_bind(addr, self.config.auth_enabled())?;
        if self.config.auth_enabled() {
            tracing::info!(%addr, tokens = self.config.tokens.len(), "HTTP API listening");
        } else {
            tracing::warn!(%addr, "HTTP API listening WITHOUT authentication (no [[tokens]] configured): loopback only");
        }
        let app = self.router_for(Some(addr));
        let stop = self.shutdown.clone();
        self.tasks.spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "HTTP server failed");
                stop.cancel();
            }
        });
        Ok(addr)
    }

    /// Stops taking work, lets running tasks finish (bounded by the agents' grace), and
    /// waits for every background task.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(60), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 60 s");
        }
    }
}

/// Without tokens only loopback may be bound: anyone who can reach the port could
/// otherwise approve and run playbooks.
pub fn check_bind(addr: SocketAddr, auth_enabled: bool) -> Result<(), ConfigError> {
    if !auth_enabled && !addr.ip().is_loopback() {
        return Err(ConfigError::Invalid(format!(
            "refusing to listen on {addr} without API tokens: configure [[tokens]] or bind a loopback address"
        )));
    }
    Ok(())
}

/// Opens (and migrates) the configured store, its audit chain keyed by `CHIFFON_AUDIT_KEY`
/// when that is set.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    let url = &config.database_url;
    let key = config
        .audit_key
        .as_ref()
        .and_then(|k| chiffon_core::audit::chain::AuditKey::new(k.expose()));
    chiffon_core::store::connect_with(url, key)
        .await
        .map_err(|source| StartError::Store {
            url: redact_url(url),
            source,
        })
}

/// The configured provider chain (down to the offline planner) as the engine's planner.
pub fn build_planner(
    config: &Config,
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
) -> Result<Arc<dyn PlanProvider>, StartError> {
    let mut llm = config.llm.clone();
    llm.redactor = llm.redactor.merge(&config.redactor());
    let router = chiffon_core::llm::Router::from_config(&llm, store.clone())
        .map_err(|e| StartError::Planner(e.to_string()))?;
    tracing::info!(providers = ?router.names(), "planning chain");
    let planner = Planner::new(router, store, config.planner.clone());
    Ok(Arc::new(CatalogPlanner::new(planner, catalog)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_tokens_means_loopback_only() {
        assert!(check_bind("127.0.0.1:8080".parse().unwrap(), false).is_ok());
        assert!(check_bind("[::1]:8080".parse().unwrap(), false).is_ok());
        let err = check_bind("0.0.0.0:8080".parse().unwrap(), false).unwrap_err();
        assert_eq!(err.code().code(), 5601);
        assert!(check_bind("0.0.0.0:8080".parse().unwrap(), true).is_ok());
    }
}
