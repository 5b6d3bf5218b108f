//! The template agent of `examples/custom_agent.rs`, run against the in-process bus.

mod common;

#[allow(dead_code)]
#[path = "../examples/custom_agent.rs"]
mod custom_agent;

use chiffon_agent_kit::{Runner, RunnerConfig};
use chiffon_protocol::{ErrorCode, TaskState};
use common::{bus, work, Kind};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A one-route HTTP server answering `status` to everything.
async fn http_server(status: &'static str) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(format!("HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await;
        }
    });
    addr
}

#[tokio::test]
async fn example_agent_completes_work() {
    let bus = bus(Kind::Memory).await.unwrap();
    let mut results = bus.collect_results().await;
    let runner = Runner::new(
        bus.transport.clone(),
        custom_agent::HealthCheckAgent,
        RunnerConfig::default(),
    );
    let stop = CancellationToken::new();
    let h = tokio::spawn(runner.run(stop.clone()));
    let queue = bus.transport.topology().agent_queue("healthcheck");

    let ok = http_server("200 OK").await;
    let w = work(
        "healthcheck",
        "http_check",
        json!({"url": format!("http://{ok}/health")}),
    );
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Completed, "{r:?}");
    assert_eq!(r.output, format!("http://{ok}/health is healthy (200)"));
    assert!(results
        .statuses_of(w.task_id)
        .iter()
        .any(|s| s.progress == 100));

    let bad = http_server("503 Service Unavailable").await;
    let w = work(
        "healthcheck",
        "http_check",
        json!({"url": format!("http://{bad}/")}),
    );
    bus.send(&queue, &w).await;
    let r = results.result_of(w.task_id, 30).await;
    assert_eq!(r.status, TaskState::Failed);
    let e = r.error.unwrap();
    assert_eq!(e.code, ErrorCode::ActionFailed);
    assert!(e.message.contains("503"), "{}", e.message);

    stop.cancel();
    h.await.unwrap().unwrap();
}
