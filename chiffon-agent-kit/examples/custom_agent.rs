//! A complete custom Chiffon agent in under 60 lines: `http_check` answers whether an HTTP
//! endpoint responds with a 2xx or 3xx status. Copy this file to start a new agent type.
//!
//! Run: `CHIFFON_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run -p chiffon-agent-kit --example custom_agent`
//! It consumes `agent.healthcheck`; a `work_request` with `"action": "http_check"` and
//! `"parameters": {"url": "http://127.0.0.1:8080/health"}` gets `work_status` messages and a
//! `work_result` ("… is healthy (200)") on `orchestrator.results`; heartbeats every 15 s.
use std::sync::Arc;

use chiffon_agent_kit::{Agent, AgentError, Runner, RunnerConfig, TaskContext, TaskOutcome};
use chiffon_protocol::WorkRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct HealthCheckAgent;

impl Agent for HealthCheckAgent {
    fn agent_type(&self) -> &str {
        "healthcheck"
    }
    fn actions(&self) -> Vec<String> {
        vec!["http_check".into()]
    }
    async fn handle(&self, work: WorkRequest, ctx: TaskContext) -> Result<TaskOutcome, AgentError> {
        let url = work
            .parameters
            .get("url")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            AgentError::InvalidParameters(format!("`url` must start with http://, got `{url}`"))
        })?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        ctx.progress(10, format!("connecting to {host}"));
        let check = async {
            let mut s = tokio::net::TcpStream::connect(host).await?;
            s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
                .await?;
            let mut buf = vec![0; 512];
            let n = s.read(&mut buf).await?;
            Ok::<_, std::io::Error>(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            )
        };
        let status_line = tokio::select! {
            r = check => r.map_err(|e| AgentError::failed(format!("{url}: {e}")))?,
            _ = ctx.cancelled() => return Err(AgentError::Cancelled),
        };
        ctx.output_line(status_line.clone());
        let code: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if !(200..400).contains(&code) {
            return Err(AgentError::failed(format!(
                "{url} answered `{status_line}`"
            )));
        }
        ctx.progress(100, "healthy");
        Ok(TaskOutcome::output(format!("{url} is healthy ({code})")))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("CHIFFON_AMQP_URL")?;
    let topology = chiffon_core::transport::Topology::contract();
    let bus = chiffon_core::transport::amqp::AmqpTransport::connect(&url, topology).await?;
    let shutdown = chiffon_agent_kit::cli::shutdown_on_signals();
    Runner::new(Arc::new(bus), HealthCheckAgent, RunnerConfig::default())
        .run(shutdown)
        .await?;
    Ok(())
}
