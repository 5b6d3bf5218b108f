//! Throughput and latency of a durable no-op request end to end: submit, plan (offline
//! planner), audited auto-approval, dispatch over the bus, an agent runs `noop`, the result
//! is stored, the audit chain is appended and the git commit written.
//!
//! Run (SQLite + in-process bus, 2000 requests, 64 in flight):
//!
//! ```sh
//! cargo bench --bench noop_pipeline
//! cargo bench --bench noop_pipeline -- 5000 128
//! CHIFFON_BENCH_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/chiffon_bench \
//! CHIFFON_BENCH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/chiffon cargo bench --bench noop_pipeline
//! ```
//!
//! You will see requests per second and the submit-to-completed latency percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chiffon_agent_kit::infra::{InfraAgent, InfraConfig};
use chiffon_agent_kit::runner::{Runner, RunnerConfig};
use chiffon_core::engine::SubmitRequest;
use chiffon_core::model::RequestStatus;
use chiffon_core::transport::amqp::AmqpTransport;
use chiffon_core::transport::{Topology, Transport};
use chiffon_server::{App, AppOptions, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let total: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let in_flight: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let dir = tempfile::tempdir()?;
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config = Config {
        database_url: std::env::var("CHIFFON_BENCH_DATABASE_URL")
            .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("bench.db").display())),
        amqp_url: std::env::var("CHIFFON_BENCH_AMQP_URL").ok(),
        playbooks: repo.join("playbooks"),
        audit_repo: dir.path().join("audit"),
        ..Config::default()
    };
    config.llm.order = vec!["offline".into()];
    config.engine.approval.auto_approve_max_cost_usd = Some(0.01);
    config.engine.dispatch.tick = Duration::from_millis(20);
    let mut options = AppOptions::default();
    let mut agent = None;
    if let Some(url) = &config.amqp_url {
        // Own names on the broker, and the agent in this process on the same bus.
        let prefix = format!("bench{}.", std::process::id());
        let transport: Arc<dyn Transport> =
            Arc::new(AmqpTransport::connect(url, Topology::with_prefix(&prefix)).await?);
        transport.declare_topology().await?;
        let infra = InfraAgent::new(InfraConfig {
            playbooks: repo.join("playbooks"),
            ..InfraConfig::default()
        })?;
        let runner = Runner::new(
            transport.clone(),
            infra,
            RunnerConfig {
                max_concurrent: in_flight,
                ..RunnerConfig::default()
            },
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        agent = Some((tokio::spawn(async move { runner.run(s).await }), stop));
        options.transport = Some(transport);
    } else {
        config.agents.max_concurrent = in_flight;
    }
    let app = App::start_with(config, options).await?;
    let engine = app.engine().clone();
    println!(
        "noop pipeline: {total} requests, {in_flight} in flight, store {}, bus {}",
        engine.store().backend(),
        engine.transport().backend()
    );

    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut handles = Vec::with_capacity(total);
    for i in 0..total {
        let permit = sem.clone().acquire_owned().await?;
        let engine = engine.clone();
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = engine
                .submit(SubmitRequest {
                    text: "noop".into(),
                    requester: Some(format!("bench-{}", i % 8)),
                    ..Default::default()
                })
                .await?;
            let done = engine.wait_until(r.id, &[]).await?;
            drop(permit);
            anyhow::ensure!(
                done.status == RequestStatus::Completed,
                "request {} ended {}: {:?}",
                r.id,
                done.status,
                done.error
            );
            Ok::<Duration, anyhow::Error>(t.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for h in handles {
        latencies.push(h.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{:.0} requests/s ({total} in {:.2}s); latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        total as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.90).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    let report = engine.verify_audit().await?;
    println!(
        "audit: chain ok = {}, {} entries, missing commits {}",
        report.chain.ok,
        report.chain.entries_checked,
        report.missing_commits.len()
    );
    app.shutdown().await;
    if let Some((task, stop)) = agent {
        stop.cancel();
        let _ = task.await;
    }
    Ok(())
}
