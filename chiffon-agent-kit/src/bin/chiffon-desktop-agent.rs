//! `chiffon-desktop-agent`: serves `agent.desktop.{hostname}`: heartbeats with CPU, load,
//! memory and GPUs, the `metrics_snapshot` action, and catalog playbooks run on this host.

use anyhow::Context;
use chiffon_agent_kit::cli::{init_tracing, shutdown_on_signals, AgentArgs};
use chiffon_agent_kit::{DesktopAgent, InfraAgent, InfraConfig, Runner};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "chiffon-desktop-agent",
    version,
    about = "Chiffon's desktop (metrics) agent"
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
                "chiffon-desktop-agent: {}",
                chiffon_agent_kit::cli::error_line(&e)
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let local = match InfraAgent::new(InfraConfig {
        playbooks: cli.agent.playbooks.clone(),
        ansible: cli.agent.ansible_config(),
    }) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!("no catalog ({e}): serving metrics only");
            None
        }
    };
    let agent = DesktopAgent::new(cli.agent.hostname(), local);
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
