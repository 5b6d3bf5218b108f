//! A complete custom agent: `http_check` says whether an HTTP endpoint answers 2xx/3xx.
//! Run: `CHIFFON_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run -p chiffon-agent-kit --example custom_agent`.
//! It serves `agent.healthcheck`: a `work_request` for `http_check` with `{"url": "http://…"}`
//! gets `work_status` and a `work_result` ("… is healthy (200)") on `orchestrator.results`.
use chiffon_agent_kit::cli::shutdown_on_signals;
use chiffon_agent_kit::{Agent, AgentError, Runner, RunnerConfig, TaskContext, TaskOutcome};
use chiffon_core::transport::{amqp::AmqpTransport, Topology};
use chiffon_protocol::WorkRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct HealthCheckAgent;

async fn get_status(host: &str, path: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0; 64];
    let n = s.read(&mut buf).await?;
    let head = String::from_utf8_lossy(&buf[..n]);
    Ok(head.split(' ').nth(1).unwrap_or("").parse().unwrap_or(0))
}

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
            .map_or("", |v| v.as_str().unwrap_or(""));
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(AgentError::InvalidParameters(format!("bad url `{url}`")));
        };
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        ctx.progress(10, format!("connecting to {host}"));
        let code = tokio::select! {
            r = get_status(host, path) => r.map_err(|e| AgentError::failed(format!("{url}: {e}")))?,
            _ = ctx.cancelled() => return Err(AgentError::Cancelled),
        };
        ctx.output_line(format!("{url} answered {code}"));
        if !(200..400).contains(&code) {
            return Err(AgentError::failed(format!("{url} answered {code}")));
        }
        ctx.progress(100, "healthy");
        Ok(TaskOutcome::output(format!("{url} is healthy ({code})")))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("CHIFFON_AMQP_URL")?;
    let bus = std::sync::Arc::new(AmqpTransport::connect(&url, Topology::contract()).await?);
    let runner = Runner::new(bus, HealthCheckAgent, RunnerConfig::default());
    Ok(runner.run(shutdown_on_signals()).await?)
}
