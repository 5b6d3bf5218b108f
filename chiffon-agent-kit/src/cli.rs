//! Flags shared by the agent binaries (kept in the library so both binaries agree).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::{Topology, Transport, TransportError};
use tokio_util::sync::CancellationToken;

use crate::ansible::AnsibleConfig;
use crate::runner::RunnerConfig;

/// Command-line flags and environment variables of `chiffon-infra-agent` and
/// `chiffon-desktop-agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// RabbitMQ URL. Unset: an in-process bus (useful only for trying the binary alone).
    #[arg(long, env = "CHIFFON_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// The action catalog folder.
    #[arg(long, env = "CHIFFON_PLAYBOOKS", default_value = "playbooks")]
    pub playbooks: PathBuf,
    /// Tasks run at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Host name reported in heartbeats (and the desktop queue's name).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Agent id. Unset: `{type}-{hostname}-{random}`.
    #[arg(long)]
    pub agent_id: Option<String>,
    /// Prefix of every exchange and queue name (tests on a shared broker).
    #[arg(long, default_value = "")]
    pub queue_prefix: String,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 15)]
    pub heartbeat_seconds: u64,
    /// Seconds a task may run when its request sets no timeout.
    #[arg(long, default_value_t = 3600)]
    pub default_timeout: u64,
    /// Seconds running tasks may take to finish on SIGTERM before they are requeued.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Milliseconds a task runs before its first `work_status`: a task that finishes
    /// sooner sends only its `work_result` (0: a status as soon as it starts).
    #[arg(long, env = "CHIFFON_AGENT_STATUS_DELAY_MS", default_value_t = 1000)]
    pub status_delay_ms: u64,
    /// Seconds to keep trying to reach RabbitMQ at start (it may start after the agent).
    #[arg(long, default_value_t = 30)]
    pub connect_wait_seconds: u64,
    /// The `ansible-playbook` to run (else ./.venv/bin, then $PATH).
    #[arg(long, env = "CHIFFON_ANSIBLE_PLAYBOOK")]
    pub ansible_playbook: Option<PathBuf>,
    /// Broker users whose work this agent runs (the orchestrator's), comma-separated.
    /// Unset: any authenticated publisher's (see SECURITY.md).
    #[arg(long, env = "CHIFFON_ORCHESTRATOR_USERS", value_delimiter = ',')]
    pub orchestrator_users: Vec<String>,
    /// Where the agent keeps its durable ledger of finished attempts (so a step finished
    /// just before a crash is answered, not run again).
    #[arg(
        long,
        env = "CHIFFON_AGENT_STATE_DIR",
        default_value = ".chiffon/agent"
    )]
    pub state_dir: PathBuf,
}

impl AgentArgs {
    pub fn hostname(&self) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(crate::metrics::hostname)
    }

    pub fn runner_config(&self) -> RunnerConfig {
        RunnerConfig {
            agent_id: self.agent_id.clone(),
            hostname: self.hostname(),
            max_concurrent: self.concurrency,
            heartbeat_interval: Duration::from_secs(self.heartbeat_seconds.max(1)),
            default_timeout: Duration::from_secs(self.default_timeout.max(1)),
            shutdown_grace: Duration::from_secs(self.shutdown_grace),
            status_delay: Duration::from_millis(self.status_delay_ms),
            orchestrator_users: self
                .orchestrator_users
                .iter()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect(),
            ledger_dir: Some(self.state_dir.clone()),
            ..RunnerConfig::default()
        }
    }

    pub fn ansible_config(&self) -> AnsibleConfig {
        AnsibleConfig {
            playbook_bin: self.ansible_playbook.clone(),
            state_dir: None,
        }
    }

    /// Connects the bus the flags name.
    pub async fn transport(&self) -> Result<Arc<dyn Transport>, TransportError> {
        let topology = Topology::with_prefix(&self.queue_prefix);
        match &self.amqp_url {
            Some(url) => {
                let until =
                    tokio::time::Instant::now() + Duration::from_secs(self.connect_wait_seconds);
                let mut delay = Duration::from_millis(200);
                loop {
                    match chiffon_core::transport::amqp::AmqpTransport::connect(
                        url,
                        topology.clone(),
                    )
                    .await
                    {
                        Ok(t) => return Ok(Arc::new(t)),
                        Err(e)
                            if e.is_transient() && tokio::time::Instant::now() + delay < until =>
                        {
                            tracing::warn!(error = %e, "bus not reachable yet; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            None => {
                tracing::warn!(
                    "CHIFFON_AMQP_URL unset: serving an in-process bus nobody else can reach"
                );
                Ok(Arc::new(MemoryTransport::new(topology)))
            }
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    t.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown signal received");
        t.cancel();
    });
    token
}

/// One line for an error and its causes, skipping a cause whose text the line already
/// holds (our error types print their source in their own message too).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
