//! `chiffon-infra-agent`: serves `agent.infrastructure`, running catalog playbooks with
//! `ansible-playbook`. Stops on SIGTERM (finishing or requeueing what it holds).

use anyhow::Context;
use chiffon_agent_kit::cli::{init_tracing, shutdown_on_signals, AgentArgs};
use chiffon_agent_kit::{InfraAgent, InfraConfig, Runner};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "chiffon-infra-agent",
    version,
    about = "Chiffon's infrastructure (Ansible) agent"
)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "chiffon-infra-agent: {}",
                chiffon_agent_kit::cli::error_line(&e)
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let agent = InfraAgent::new(InfraConfig {
        playbooks: cli.agent.playbooks.clone(),
        ansible: cli.agent.ansible_config(),
    })
    .with_context(|| format!("loading the catalog {}", cli.agent.playbooks.display()))?;
    match agent.executor().ansible_playbook() {
        Ok(p) => tracing::info!(ansible_playbook = %p.display(), "found ansible"),
        Err(e) => tracing::warn!("{e}"),
    }
    let transport = cli.agent.transport().await.context("connecting the bus")?;
    let runner = Runner::new(transport, agent, cli.agent.runner_config());
    tracing::info!(
        agent_id = runner.agent_id(),
        queue = runner.queue(),
        "serving"
    );
    runner.run(shutdown_on_signals()).await?;
    Ok(())
}
