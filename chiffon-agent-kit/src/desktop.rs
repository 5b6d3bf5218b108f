//! The desktop agent: one per workstation, consuming `agent.desktop.{hostname}`. It reports
//! the host's CPU, load, memory and GPUs (its heartbeats carry them too) and runs catalog
//! playbooks locally on that host.

use std::sync::{Arc, Mutex};

use chiffon_core::transport::Topology;
use chiffon_protocol::WorkRequest;

use crate::agent::{Agent, AgentError, TaskContext, TaskOutcome};
use crate::infra::InfraAgent;
use crate::metrics::MetricsCollector;

/// The agent type of [`DesktopAgent`].
pub const DESKTOP_AGENT_TYPE: &str = "desktop";
/// The action that returns the host's metrics as JSON.
pub const METRICS_SNAPSHOT: &str = "metrics_snapshot";

/// Metrics snapshots, plus every catalog playbook run on this host.
pub struct DesktopAgent {
    hostname: String,
    metrics: Arc<Mutex<MetricsCollector>>,
    local: Option<InfraAgent>,
}

impl std::fmt::Debug for DesktopAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesktopAgent")
            .field("hostname", &self.hostname)
            .finish()
    }
}

impl DesktopAgent {
    /// `local`: the executor for catalog playbooks (`None`: metrics only).
    pub fn new(hostname: impl Into<String>, local: Option<InfraAgent>) -> Self {
        DesktopAgent {
            hostname: hostname.into(),
            metrics: Arc::new(Mutex::new(MetricsCollector::new(true))),
            local,
        }
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }
}

impl Agent for DesktopAgent {
    fn agent_type(&self) -> &str {
        DESKTOP_AGENT_TYPE
    }

    /// `metrics_snapshot`, `noop` and every catalog action that has a playbook.
    fn actions(&self) -> Vec<String> {
        let mut a = vec![METRICS_SNAPSHOT.to_string()];
        if let Some(local) = &self.local {
            a.extend(
                local
                    .catalog()
                    .actions
                    .values()
                    .filter(|s| s.playbook.is_some() || s.name == "noop")
                    .map(|s| s.name.clone()),
            );
        }
        a
    }

    fn queue(&self, topology: &Topology, _hostname: &str) -> String {
        topology.desktop_queue(&self.hostname)
    }

    async fn handle(&self, work: WorkRequest, ctx: TaskContext) -> Result<TaskOutcome, AgentError> {
        if work.action == METRICS_SNAPSHOT {
            let metrics = self.metrics.clone();
            let sample = tokio::task::spawn_blocking(move || {
                metrics.lock().unwrap_or_else(|e| e.into_inner()).sample()
            })
            .await
            .map_err(|e| AgentError::Crashed(Box::new(e)))?;
            let mut json = sample.to_json();
            json["hostname"] = self.hostname.clone().into();
            ctx.progress(100, "metrics collected");
            return Ok(TaskOutcome {
                output: json.to_string(),
                changed: Some(false),
                diff: None,
            });
        }
        match &self.local {
            Some(local) => {
                // "Locally": the playbook targets this host whatever the request said.
                let mut work = work;
                if let Ok(spec) = local.catalog().get(&work.action) {
                    if spec.parameters.contains_key("host") {
                        work.parameters
                            .insert("host".into(), serde_json::Value::from("localhost"));
                    }
                }
                local.run_action(&work, &ctx).await
            }
            None => Err(AgentError::ActionNotSupported(work.action)),
        }
    }
}
