//! A custom agent: `http_check` says whether an HTTP endpoint answers 2xx/3xx.
//! Its catalog entry is `catalog/http_check/action.toml` (`agent_type = "http_check"`), so
//! the engine sends its steps to the queue `agent.http_check`, which this agent serves.
//! Run it: see `src/main.rs`, or host it in the server's process with
//! `chiffon_server::AppOptions::with_agent(HealthCheckAgent)` (README.md).
use chiffon_agent_kit::{Agent, AgentError, TaskContext, TaskOutcome};
use chiffon_protocol::WorkRequest;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub struct HealthCheckAgent;

/// The status code of `GET path` on `host` (`HOST:PORT`): plain HTTP/1.1 over TCP.
async fn get_status(host: &str, path: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut line = String::new(); // the status line is all we need
    BufReader::new(s).take(1024).read_line(&mut line).await?;
    let code = line.split(' ').nth(1).and_then(|c| c.parse().ok());
    code.ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

impl Agent for HealthCheckAgent {
    fn agent_type(&self) -> &str {
        "http_check"
    }
    fn actions(&self) -> Vec<String> {
        vec!["http_check".into()]
    }
    async fn handle(&self, work: WorkRequest, ctx: TaskContext) -> Result<TaskOutcome, AgentError> {
        let url = work
            .parameters
            .get("url")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(AgentError::InvalidParameters(format!("bad url `{url}`")));
        };
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = format!("{host}{}", if host.contains(':') { "" } else { ":80" });
        ctx.progress(10, format!("connecting to {host}"));
        let code = tokio::select! {
            r = get_status(&host, path) => r.map_err(|e| AgentError::failed(format!("{url}: {e}")))?,
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
