//! `GET /metrics` in the Prometheus text exposition format.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use chiffon_core::engine::{Engine, EngineError};
use chiffon_core::model::RequestStatus;

/// Renders every metric. Queue depths that cannot be read (a bus hiccup) are left out
/// rather than failing the scrape.
pub async fn render(engine: &Engine) -> Result<String, EngineError> {
    let mut out = String::with_capacity(4096);
    let counts = engine.store().request_counts().await?;
    metric_header(&mut out, "chiffon_requests", "gauge", "Requests by status.");
    for status in RequestStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let _ = writeln!(out, "chiffon_requests{{status=\"{status}\"}} {n}");
    }

    let m = engine.metrics();
    let wh = &*crate::webhooks::METRICS;
    for (name, help, value) in [
        (
            "chiffon_steps_dispatched_total",
            "Steps published to agents.",
            m.dispatched_total,
        ),
        (
            "chiffon_results_total",
            "Step results applied.",
            m.results_total,
        ),
        (
            "chiffon_duplicate_results_total",
            "Duplicate results ignored.",
            m.duplicate_results_total,
        ),
        (
            "chiffon_bus_messages_refused_total",
            "Bus messages refused for their publisher (unauthenticated, not allowed, or another agent's task).",
            m.refused_messages_total,
        ),
        (
            "chiffon_bus_messages_dead_lettered_after_retries_total",
            "Bus messages dead-lettered after failing too many times in a row.",
            m.dead_lettered_after_retries_total,
        ),
        (
            "chiffon_step_retries_total",
            "Step retries scheduled.",
            m.retries_total,
        ),
        (
            "chiffon_step_timeouts_total",
            "Steps that timed out.",
            m.timeouts_total,
        ),
        (
            "chiffon_webhook_deliveries_total",
            "Webhook POSTs answered 2xx.",
            wh.delivered.load(Ordering::Relaxed),
        ),
        (
            "chiffon_webhook_failures_total",
            "Webhook events given up after every retry (or refused with a 4xx).",
            wh.failed.load(Ordering::Relaxed),
        ),
        (
            "chiffon_webhook_retries_total",
            "Webhook POSTs tried again.",
            wh.retries.load(Ordering::Relaxed),
        ),
        (
            "chiffon_webhook_missed_total",
            "Status changes the webhook notifier fell too far behind to send.",
            wh.lagged.load(Ordering::Relaxed),
        ),
    ] {
        metric_header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }

    metric_header(
        &mut out,
        "chiffon_event_channels",
        "gauge",
        "Live-event channels held (requests being watched).",
    );
    let _ = writeln!(out, "chiffon_event_channels {}", engine.event_channels());

    let name = "chiffon_dispatch_to_result_seconds";
    metric_header(
        &mut out,
        name,
        "histogram",
        "Seconds from dispatching a step to its result.",
    );
    for (le, count) in &m.latency_buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", m.latency_count);
    let _ = writeln!(out, "{name}_sum {}", m.latency_sum_seconds);
    let _ = writeln!(out, "{name}_count {}", m.latency_count);

    let costs = engine.costs().await?;
    metric_header(
        &mut out,
        "chiffon_llm_spend_usd",
        "gauge",
        "LLM spend this month per provider (USD).",
    );
    for c in &costs {
        let _ = writeln!(
            out,
            "chiffon_llm_spend_usd{{provider=\"{}\",month=\"{}\"}} {}",
            escape(&c.provider),
            c.month,
            c.spent_usd
        );
    }
    metric_header(
        &mut out,
        "chiffon_llm_budget_usd",
        "gauge",
        "Monthly LLM budget per provider (USD).",
    );
    for c in &costs {
        if let Some(b) = c.budget_usd {
            let _ = writeln!(
                out,
                "chiffon_llm_budget_usd{{provider=\"{}\"}} {b}",
                escape(&c.provider)
            );
        }
    }
    metric_header(
        &mut out,
        "chiffon_llm_calls",
        "gauge",
        "LLM calls this month per provider.",
    );
    for c in &costs {
        let _ = writeln!(
            out,
            "chiffon_llm_calls{{provider=\"{}\"}} {}",
            escape(&c.provider),
            c.calls
        );
    }

    let transport = engine.transport();
    metric_header(
        &mut out,
        "chiffon_queue_depth",
        "gauge",
        "Messages ready in each fixed queue.",
    );
    for q in transport.topology().fixed_queues() {
        match transport.queue_depth(&q).await {
            Ok(n) => {
                let _ = writeln!(out, "chiffon_queue_depth{{queue=\"{}\"}} {n}", escape(&q));
            }
            Err(e) => tracing::debug!(queue = %q, error = %e, "queue depth unavailable"),
        }
    }
    Ok(out)
}

fn metric_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
