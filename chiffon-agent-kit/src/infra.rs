//! The infrastructure agent: runs catalog actions (`playbooks/ACTION/playbook.yml`) with
//! `ansible-playbook`; `noop` is answered without Ansible.

use std::path::PathBuf;
use std::time::Duration;

use chiffon_core::catalog::{ActionSpec, Catalog};
use chiffon_protocol::WorkRequest;
use serde_json::Value;

use crate::agent::{Agent, AgentError, TaskContext, TaskOutcome};
use crate::ansible::{AnsibleConfig, AnsibleExecutor, PlaybookRun};

/// The agent type of [`InfraAgent`].
pub const INFRA_AGENT_TYPE: &str = "infrastructure";

/// Configuration of an [`InfraAgent`].
#[derive(Debug, Clone)]
pub struct InfraConfig {
    /// The catalog folder (`./playbooks`).
    pub playbooks: PathBuf,
    pub ansible: AnsibleConfig,
}

impl Default for InfraConfig {
    fn default() -> Self {
        InfraConfig {
            playbooks: PathBuf::from("playbooks"),
            ansible: AnsibleConfig::default(),
        }
    }
}

/// Runs the catalog's `infrastructure` actions.
#[derive(Debug, Clone)]
pub struct InfraAgent {
    catalog: Catalog,
    executor: AnsibleExecutor,
}

impl InfraAgent {
    /// Loads the catalog. `ansible-playbook` is looked up per task, so an agent started
    /// before Ansible was installed works once it is.
    pub fn new(config: InfraConfig) -> Result<Self, AgentError> {
        let catalog = Catalog::load(&config.playbooks).map_err(AgentError::Catalog)?;
        let executor = AnsibleExecutor::new(config.ansible);
        // A predecessor killed mid-playbook left its ansible running: stop it before the
        // step is redelivered and run again.
        executor.reap_orphans();
        Ok(InfraAgent { catalog, executor })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn executor(&self) -> &AnsibleExecutor {
        &self.executor
    }

    /// Actions of the catalog for `agent_type`.
    pub(crate) fn actions_for(&self, agent_type: &str) -> Vec<String> {
        self.catalog
            .actions
            .values()
            .filter(|a| a.agent_type == agent_type)
            .map(|a| a.name.clone())
            .collect()
    }

    /// Validates and runs one catalog action, whatever its agent type (the desktop agent
    /// runs playbooks locally through this too).
    pub async fn run_action(
        &self,
        work: &WorkRequest,
        ctx: &TaskContext,
    ) -> Result<TaskOutcome, AgentError> {
        let spec = self
            .catalog
            .get(&work.action)
            .map_err(|_| AgentError::ActionNotSupported(work.action.clone()))?;
        let params = spec
            .validate(&work.parameters)
            .map_err(AgentError::Catalog)?;
        if work.action == "noop" {
            return noop(&params, ctx).await;
        }
        self.run_playbook(spec, &params, ctx).await
    }

    async fn run_playbook(
        &self,
        spec: &ActionSpec,
        params: &serde_json::Map<String, Value>,
        ctx: &TaskContext,
    ) -> Result<TaskOutcome, AgentError> {
        let Some(playbook) = &spec.playbook else {
            return Err(AgentError::ActionNotSupported(format!(
                "{} (no playbook.yml in the catalog)",
                spec.name
            )));
        };
        if ctx.dry_run() && !spec.check_mode {
            return Err(AgentError::InvalidParameters(format!(
                "action `{}` cannot run as a dry run (check_mode = false)",
                spec.name
            )));
        }
        let root = &self.catalog.root;
        let inventory = root.join("inventory.ini");
        let callbacks = root.join("callback_plugins");
        self.executor
            .run(
                PlaybookRun {
                    playbook,
                    inventory: &inventory,
                    callback_dir: &callbacks,
                    extra_vars: params,
                    check: ctx.dry_run(),
                },
                ctx,
            )
            .await
    }
}

async fn noop(
    params: &serde_json::Map<String, Value>,
    ctx: &TaskContext,
) -> Result<TaskOutcome, AgentError> {
    let ms = params.get("sleep_ms").and_then(Value::as_u64).unwrap_or(0);
    if ms > 0 {
        ctx.progress(10, format!("sleeping {ms} ms"));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = ctx.cancelled() => return Err(AgentError::Cancelled),
        }
    }
    let msg = params
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("noop")
        .to_string();
    ctx.progress(100, "done");
    Ok(TaskOutcome {
        output: msg,
        changed: Some(false),
        diff: ctx.dry_run().then(String::new),
    })
}

impl Agent for InfraAgent {
    fn agent_type(&self) -> &str {
        INFRA_AGENT_TYPE
    }

    fn actions(&self) -> Vec<String> {
        self.actions_for(INFRA_AGENT_TYPE)
    }

    async fn handle(&self, work: WorkRequest, ctx: TaskContext) -> Result<TaskOutcome, AgentError> {
        self.run_action(&work, &ctx).await
    }
}
