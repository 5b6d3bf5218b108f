//! The custom agent `http_check`, served on RabbitMQ, or demonstrated on the in-process bus.
//!
//! Over RabbitMQ (with a server on the same broker and `catalog/http_check` in its catalog):
//!
//! ```sh
//! CHIFFON_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run -p custom-agent
//! ```
//!
//! It serves the queue `agent.http_check` until ctrl-c. Without `CHIFFON_AMQP_URL` it runs a
//! demo on the in-process bus: it starts a local HTTP server, sends the agent one
//! `work_request` as the orchestrator would, and prints what came back (a task this short
//! sends no status of its own; the one here carries its output line, which the result's
//! `output` does not repeat):
//!
//! ```text
//! $ cargo run -p custom-agent
//! work_status: 100% healthy
//! work_result: completed: http://127.0.0.1:PORT/health is healthy (200)
//! ```
use std::sync::Arc;

use chiffon_agent_kit::cli::shutdown_on_signals;
use chiffon_agent_kit::{Runner, RunnerConfig};
use chiffon_core::transport::amqp::AmqpTransport;
use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::{ConsumeOptions, Topology, Transport};
use chiffon_protocol::{Envelope, Message, WorkRequest};
use custom_agent::HealthCheckAgent;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Ok(url) = std::env::var("CHIFFON_AMQP_URL") {
        let bus = Arc::new(AmqpTransport::connect(&url, Topology::contract()).await?);
        let runner = Runner::new(bus, HealthCheckAgent, RunnerConfig::default());
        eprintln!("serving agent.http_check as {}", runner.agent_id());
        return Ok(runner.run(shutdown_on_signals()).await?);
    }

    // The demo: a web server that answers 200, the agent on the in-process bus, and what the
    // orchestrator would do: publish a work_request, read orchestrator.results.
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = web.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = web.accept().await {
            let _ = s.read(&mut [0; 1024]).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    let bus: Arc<dyn Transport> = Arc::new(MemoryTransport::new(Topology::contract()));
    bus.declare_topology().await?;
    let mut results = bus
        .consume("orchestrator.results", ConsumeOptions::default())
        .await?;
    let stop = CancellationToken::new();
    let runner = Runner::new(bus.clone(), HealthCheckAgent, RunnerConfig::default());
    let serving = tokio::spawn(runner.run(stop.clone()));

    let work = WorkRequest {
        agent_type: "http_check".into(),
        task_id: uuid::Uuid::new_v4(),
        action: "http_check".into(),
        parameters: [("url".into(), format!("http://{addr}/health").into())]
            .into_iter()
            .collect(),
        resources_required: Default::default(),
        dry_run: false,
        attempt: 1,
        timeout_seconds: Some(30),
    };
    let queue = bus.topology().agent_queue("http_check"); // "agent.http_check"
    bus.declare_queue(&queue).await?;
    bus.publish(
        &queue,
        &Envelope::new("demo", None, Message::WorkRequest(work)),
    )
    .await?;
    while let Some(delivery) = results.next().await {
        let delivery = delivery?;
        delivery.ack().await?;
        match delivery.parse()?.body {
            Message::WorkStatus(s) if !s.message.is_empty() => {
                println!("work_status: {}% {}", s.progress, s.message)
            }
            Message::WorkResult(r) => {
                let error = r.error.map(|e| e.message).unwrap_or_default();
                println!("work_result: {}: {}{error}", r.status.as_str(), r.output);
                break;
            }
            _ => {}
        }
    }
    stop.cancel();
    serving.await??;
    Ok(())
}
