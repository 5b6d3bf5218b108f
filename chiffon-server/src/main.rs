//! `chiffon-server`: the HTTP API and the orchestrator in one process. With
//! `CHIFFON_AMQP_URL` unset it also runs the infrastructure and desktop agents in-process.

use std::path::PathBuf;

use chiffon_server::{App, Config, ConfigOverrides};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "chiffon-server",
    version,
    about = "Chiffon's HTTP API and orchestrator"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "CHIFFON_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides CHIFFON_BIND and the file).
    #[arg(long)]
    bind: Option<String>,
    /// Database URL (overrides CHIFFON_DATABASE_URL and the file).
    #[arg(long)]
    database_url: Option<String>,
    /// RabbitMQ URL (overrides CHIFFON_AMQP_URL and the file).
    #[arg(long)]
    amqp_url: Option<String>,
    /// Action catalog folder (overrides CHIFFON_PLAYBOOKS and the file).
    #[arg(long)]
    playbooks: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    chiffon_server::init_tracing();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!(
            "chiffon-server: {}",
            chiffon_server::redact_for_logs(&e.to_string())
        );
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let overrides = ConfigOverrides {
        database_url: cli.database_url,
        amqp_url: cli.amqp_url,
        bind: cli.bind,
        playbooks: cli.playbooks,
        audit_repo: None,
    };
    let config = Config::load(cli.config.as_deref(), &overrides)?;
    let app = App::start(config).await?;
    let listener = app.bind().await?;
    let addr = app.serve(listener)?;
    tracing::info!(%addr, "chiffon-server ready");
    let stop = app.shutdown_token();
    tokio::select! {
        _ = chiffon_server::shutdown_signal() => tracing::info!("shutting down"),
        _ = stop.cancelled() => tracing::warn!("a component stopped; shutting down"),
    }
    app.shutdown().await;
    Ok(())
}
