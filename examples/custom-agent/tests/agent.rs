//! The custom agent on the in-process bus and on RabbitMQ (`CHIFFON_TEST_AMQP_URL`, default
//! the local guest; its own queue names; under `CI=true` an unreachable broker fails), fed
//! `work_request`s as the engine would send them.

use std::sync::Arc;
use std::time::Duration;

use chiffon_agent_kit::{Runner, RunnerConfig};
use chiffon_core::transport::amqp::AmqpTransport;
use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::{ConsumeOptions, Consumer, Topology, Transport};
use chiffon_protocol::{Envelope, ErrorCode, Message, TaskState, WorkRequest, WorkResult};
use custom_agent::HealthCheckAgent;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A web server answering `status` to everything.
async fn http_server(status: &'static str) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.read(&mut [0; 1024]).await;
            let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    addr
}

fn work(url: String) -> WorkRequest {
    WorkRequest {
        agent_type: "http_check".into(),
        task_id: uuid::Uuid::new_v4(),
        action: "http_check".into(),
        parameters: [("url".to_string(), url.into())].into_iter().collect(),
        resources_required: Default::default(),
        dry_run: false,
        attempt: 1,
        timeout_seconds: Some(30),
    }
}

/// Sends `w` to `agent.http_check` (under the bus's prefix) and waits for its result, with the progress seen.
async fn run(
    bus: &Arc<dyn Transport>,
    results: &mut Consumer,
    w: WorkRequest,
) -> (WorkResult, Vec<u32>) {
    let id = w.task_id;
    let queue = bus.topology().agent_queue("http_check");
    bus.publish(&queue, &Envelope::new("t", None, Message::WorkRequest(w)))
        .await
        .unwrap();
    let mut progress = Vec::new();
    loop {
        let d = tokio::time::timeout(Duration::from_secs(30), results.next())
            .await
            .expect("a result within 30 s")
            .unwrap()
            .unwrap();
        d.ack().await.unwrap();
        match d.parse().unwrap().body {
            Message::WorkStatus(s) if s.task_id == id => progress.push(s.progress),
            Message::WorkResult(r) if r.task_id == id => return (r, progress),
            _ => {}
        }
    }
}

#[tokio::test]
async fn checks_endpoints_on_the_in_process_bus() {
    let bus: Arc<dyn Transport> = Arc::new(MemoryTransport::new(Topology::contract()));
    exercise(bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_endpoints_over_rabbitmq() {
    let url = std::env::var("CHIFFON_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let prefix = format!("t{}.", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let amqp = match AmqpTransport::connect(&url, Topology::with_prefix(&prefix)).await {
        Ok(t) => t,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("RabbitMQ unreachable under CI=true: {e}")
        }
        Err(e) => return eprintln!("SKIPPED: RabbitMQ unreachable: {e}"),
    };
    exercise(Arc::new(amqp.clone())).await;
    let _ = amqp.delete_topology().await;
    amqp.close().await;
}

/// The agent served on `bus`: a healthy endpoint, a failing one, a bad URL.
async fn exercise(bus: Arc<dyn Transport>) {
    bus.declare_topology().await.unwrap();
    let queue = bus.topology().agent_queue("http_check");
    bus.declare_queue(&queue).await.unwrap();
    let results_queue = bus.topology().results_queue.clone();
    let mut results = bus
        .consume(&results_queue, ConsumeOptions::default())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let runner = Runner::new(bus.clone(), HealthCheckAgent, RunnerConfig::default());
    let serving = tokio::spawn(runner.run(stop.clone()));

    let ok = http_server("200 OK").await;
    let (r, progress) = run(&bus, &mut results, work(format!("http://{ok}/health"))).await;
    assert_eq!(r.status, TaskState::Completed, "{r:?}");
    assert_eq!(r.output, format!("http://{ok}/health is healthy (200)"));
    assert!(progress.contains(&100), "{progress:?}");

    let bad = http_server("503 Service Unavailable").await;
    let (r, _) = run(&bus, &mut results, work(format!("http://{bad}/"))).await;
    assert_eq!(r.status, TaskState::Failed);
    let e = r.error.unwrap();
    assert_eq!(e.code, ErrorCode::ActionFailed);
    assert!(e.message.contains("503"), "{}", e.message);

    let (r, _) = run(&bus, &mut results, work("ftp://example.com/".into())).await;
    assert_eq!(r.status, TaskState::Failed);
    assert!(r.error.unwrap().message.contains("bad url"));

    stop.cancel();
    serving.await.unwrap().unwrap();
}

#[test]
fn its_catalog_entry_loads_and_routes_to_agent_http_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("catalog");
    let catalog = chiffon_core::catalog::Catalog::load(&root).unwrap();
    let spec = catalog.get("http_check").unwrap();
    assert_eq!(spec.agent_type, "http_check");
    assert!(spec.playbook.is_none());
    assert_eq!(
        Topology::contract().agent_queue(&spec.agent_type),
        "agent.http_check"
    );
    let mut ok = serde_json::Map::new();
    ok.insert("url".into(), "http://127.0.0.1:8080/health".into());
    assert!(spec.validate(&ok).is_ok());
    let mut bad = serde_json::Map::new();
    bad.insert("url".into(), "http://x/{{ lookup('env', 'HOME') }}".into());
    assert!(spec.validate(&bad).is_err());
}
