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
//! You will see requests per second and the submit-to-completed latency percentiles, then
//! the sequential latency (one request at a time), and when a broker is given
//! (`CHIFFON_BENCH_AMQP_URL`, or `CHIFFON_BENCH_RAW_AMQP_URL` for the yardstick alone) raw
//! RabbitMQ persistent request/reply measured in the same run and the ratio. On PostgreSQL
//! it also prints transactions and WAL fsyncs per request (from `pg_stat_database` and
//! `pg_stat_wal`), and the process's resident memory at the end.
//!
//! `CHIFFON_BENCH_STORED=100000` first stores that many finished requests (rejected at
//! planning, each with its audit entries) through the store, so the memory and the speed
//! are measured with a history behind them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chiffon_agent_kit::infra::{InfraAgent, InfraConfig};
use chiffon_agent_kit::runner::{Runner, RunnerConfig};
use chiffon_core::audit::AuditEvent;
use chiffon_core::engine::SubmitRequest;
use chiffon_core::model::{GroupWrite, NewAuditEntry, NewRequest, RequestPatch, RequestStatus};
use chiffon_core::transport::amqp::AmqpTransport;
use chiffon_core::transport::{Topology, Transport};
use chiffon_server::{App, AppOptions, Config};

#[path = "support/raw_amqp.rs"]
mod raw_amqp;

/// PostgreSQL's own counters: committed transactions (every autocommitted statement is one)
/// in this database, and WAL fsyncs (cluster-wide).
async fn pg_counters(url: &str) -> Option<(i64, i64)> {
    use sqlx::Row;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .ok()?;
    let xacts: i64 =
        sqlx::query("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&pool)
            .await
            .ok()?
            .try_get(0)
            .ok()?;
    let syncs: i64 = sqlx::query("SELECT wal_sync FROM pg_stat_wal")
        .fetch_one(&pool)
        .await
        .ok()?
        .try_get(0)
        .ok()?;
    pool.close().await;
    Some((xacts, syncs))
}

/// The resident set size of this process and the part of it that is mapped files (the git
/// trail's packs, which libgit2 maps), in MiB (Linux).
fn rss_mib() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("RssFile:")?))
}

/// Stores `n` finished requests (rejected at planning, with their `received` and `rejected`
/// entries) through the store's group commit, 500 at a time.
async fn preseed(engine: &chiffon_core::engine::Engine, n: usize) -> anyhow::Result<()> {
    let store = engine.store();
    let mut left = n;
    while left > 0 {
        let batch = left.min(500);
        left -= batch;
        let mut writes = Vec::with_capacity(batch * 2);
        for _ in 0..batch {
            let id = uuid::Uuid::now_v7();
            let entry = |event, details| NewAuditEntry {
                request_id: Some(id),
                actor: "bench".into(),
                event,
                details,
            };
            writes.push(GroupWrite::Create {
                request: Box::new(NewRequest {
                    id,
                    trace_id: id.simple().to_string(),
                    text: "noop (stored before the run)".into(),
                    requester: "bench-history".into(),
                    submitted_by: "bench-history".into(),
                    dry_run: false,
                }),
                audit: vec![entry(AuditEvent::Received, serde_json::json!({}))],
            });
            writes.push(GroupWrite::Transition {
                id,
                from: RequestStatus::Planning,
                to: RequestStatus::Rejected,
                patch: Box::new(RequestPatch {
                    audit: vec![entry(
                        AuditEvent::Rejected,
                        serde_json::json!({ "reason": "history" }),
                    )],
                    ..Default::default()
                }),
            });
        }
        for slot in store.commit_group(&writes).await? {
            slot?;
        }
    }
    Ok(())
}

/// Bytes of the files under `path`.
fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

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

    let stored: usize = std::env::var("CHIFFON_BENCH_STORED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if stored > 0 {
        let t = Instant::now();
        preseed(&engine, stored).await?;
        println!(
            "history: {stored} finished requests stored first ({:.1}s)",
            t.elapsed().as_secs_f64()
        );
    }

    let pg_url = std::env::var("CHIFFON_BENCH_DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"));
    let pg_before = match &pg_url {
        Some(u) => pg_counters(u).await,
        None => None,
    };
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
    // Each request's task is reaped as soon as it ends: a finished task held until the end
    // keeps its allocation (several KiB), which the memory figure would count.
    let mut running = tokio::task::JoinSet::new();
    let mut latencies = Vec::with_capacity(total);
    for i in 0..total {
        let permit = sem.clone().acquire_owned().await?;
        while let Some(done) = running.try_join_next() {
            latencies.push(done??);
        }
        let engine = engine.clone();
        running.spawn(async move {
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
        });
    }
    while let Some(done) = running.join_next().await {
        latencies.push(done??);
    }
    let elapsed = started.elapsed();
    let rate = total as f64 / elapsed.as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{:.0} requests/s ({total} in {:.2}s); latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        rate,
        elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.90).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    // PostgreSQL's counters for the concurrent run (the pipeline's only database user here).
    if let (Some(url), Some((x0, s0))) = (&pg_url, pg_before) {
        if let Some((x1, s1)) = pg_counters(url).await {
            println!(
                "postgres: {:.1} transactions and {:.2} WAL fsyncs per request",
                (x1 - x0) as f64 / total as f64,
                (s1 - s0) as f64 / total as f64
            );
        }
    }

    // One request at a time: the latency a person sees on an idle system.
    let sequential = (total / 10).clamp(10, 200);
    let mut seq_times = Vec::with_capacity(sequential);
    for i in 0..sequential {
        let t = Instant::now();
        let r = engine
            .submit(SubmitRequest {
                text: "noop".into(),
                requester: Some(format!("bench-seq-{}", i % 8)),
                ..Default::default()
            })
            .await?;
        let done = engine.wait_until(r.id, &[]).await?;
        anyhow::ensure!(
            done.status == RequestStatus::Completed,
            "request {} ended {}",
            r.id,
            done.status
        );
        seq_times.push(t.elapsed());
    }
    seq_times.sort();
    let seq_p50 = seq_times[seq_times.len() / 2];
    println!(
        "sequential: {sequential} requests one at a time; latency p50 {:.1} ms, p90 {:.1} ms",
        ms(seq_p50),
        ms(seq_times[seq_times.len() * 9 / 10])
    );

    // Before verifying: verification reads the whole trail and holds more than serving did.
    let served_rss = rss_mib();
    let report = engine.verify_audit().await?;
    println!(
        "audit: chain ok = {}, {} entries, missing commits {}",
        report.chain.ok,
        report.chain.entries_checked,
        report.missing_commits.len()
    );
    println!(
        "git trail: {:.1} MiB on disk",
        dir_bytes(&dir.path().join("audit")) as f64 / (1024.0 * 1024.0)
    );
    if let (Some((served, served_files)), Some((rss, files))) = (served_rss, rss_mib()) {
        println!(
            "memory: {served:.1} MiB resident after the runs ({served_files:.1} MiB of it \
             mapped files: the program and the trail's packs), {rss:.1} MiB after verifying \
             the audit trail ({files:.1} MiB) (orchestrator, agent and benchmark in one process)"
        );
    }
    app.shutdown().await;
    if let Some((task, stop)) = agent {
        stop.cancel();
        let _ = task.await;
    }

    // The yardstick, on the same machine in the same run.
    let raw_url = std::env::var("CHIFFON_BENCH_AMQP_URL")
        .or_else(|_| std::env::var("CHIFFON_BENCH_RAW_AMQP_URL"))
        .ok();
    if let Some(url) = raw_url {
        let raw = raw_amqp::measure(&url, total.max(1000), in_flight, sequential).await?;
        println!(
            "raw RabbitMQ persistent request/reply (confirms, manual acks): {:.0} round trips/s at {in_flight} in flight; sequential p50 {:.2} ms",
            raw.rate,
            ms(raw.sequential_p50)
        );
        println!(
            "ratio: throughput {:.3} of raw; sequential p50 {:.1}x raw",
            rate / raw.rate,
            ms(seq_p50) / ms(raw.sequential_p50).max(1e-3)
        );
    }
    Ok(())
}
