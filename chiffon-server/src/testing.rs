//! Test helpers (feature `test-utils`): a planner double and an app on a temporary SQLite
//! store, the in-process bus and the in-process agents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use chiffon_core::engine::{PlanError, PlanInput, PlanOutcome, PlanProvider, PlanUsage};
use chiffon_core::model::{Plan, PlanStep};
use chiffon_protocol::{ErrorCode, Resources};
use serde_json::{json, Map};

use crate::config::{Config, TokenConfig};
use crate::{App, AppOptions};

/// A planner double that reads its plan from the request text, so tests say what they want:
/// `steps=N` noop steps (default 1), each sleeping `sleep=MS`, an estimated cost of
/// `cost=USD`; `unplannable` fails planning with 5207.
#[derive(Debug, Clone, Default)]
pub struct MockPlanner;

fn arg<T: std::str::FromStr>(text: &str, key: &str) -> Option<T> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

#[async_trait]
impl PlanProvider for MockPlanner {
    async fn plan(&self, input: &PlanInput) -> Result<PlanOutcome, PlanError> {
        if input.text.contains("unplannable") {
            return Err(PlanError {
                code: ErrorCode::NoPlan,
                message: "the mock planner was told not to plan".into(),
                events: vec![],
                details: serde_json::json!({}),
            });
        }
        let steps: usize = arg(&input.text, "steps").unwrap_or(1);
        let sleep: u64 = arg(&input.text, "sleep").unwrap_or(0);
        let cost: f64 = arg(&input.text, "cost").unwrap_or(0.0);
        let plan = Plan {
            summary: format!("{steps} noop step(s)"),
            steps: (0..steps)
                .map(|i| {
                    let mut parameters = Map::new();
                    parameters.insert("message".into(), json!(format!("step {i} done")));
                    parameters.insert("sleep_ms".into(), json!(sleep));
                    PlanStep {
                        action: "noop".into(),
                        parameters,
                        agent_type: "infrastructure".into(),
                        resources: Resources::default(),
                        reason: "the test asked for it".into(),
                        provenance: Default::default(),
                    }
                })
                .collect(),
            risks: vec![],
            estimated_cost_usd: cost,
            llm_cost_usd: 0.0,
            provider: "mock".into(),
            model: "mock-1".into(),
            cached: false,
            skipped: Vec::new(),
        };
        Ok(PlanOutcome {
            plan,
            events: vec![],
            usage: PlanUsage {
                provider: "mock".into(),
                model: "mock-1".into(),
                input_tokens: 0,
                output_tokens: 0,
                llm_cost_usd: 0.0,
                cached: false,
            },
        })
    }
}

/// The catalog fixture of chiffon-server's tests (`noop` and an inventory).
pub fn fixture_catalog() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/catalog")
}

/// A configuration over a fresh temporary folder: SQLite store, audit repo, in-process bus.
pub fn temp_config(dir: &Path, tokens: Vec<TokenConfig>) -> Config {
    let mut config = Config {
        database_url: format!("sqlite://{}", dir.join("chiffon.db").display()),
        bind: "127.0.0.1:0".into(),
        playbooks: fixture_catalog(),
        audit_repo: dir.join("audit"),
        tokens,
        ..Config::default()
    };
    config.engine.dispatch.tick = std::time::Duration::from_millis(100);
    config.engine.dispatch.retry_backoff = std::time::Duration::from_millis(100);
    config
}

/// An app over `temp_config` with the [`MockPlanner`] and the in-process agents.
pub async fn start_app(dir: &Path, tokens: Vec<TokenConfig>) -> App {
    start_app_with(temp_config(dir, tokens)).await
}

pub async fn start_app_with(config: Config) -> App {
    App::start_with(
        config,
        AppOptions {
            planner: Some(Arc::new(MockPlanner)),
            ..Default::default()
        },
    )
    .await
    .expect("start the test app")
}
