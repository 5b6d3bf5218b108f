//! `chiffon eval-planner`: runs the planner evaluation corpus against the offline planner
//! (the default) or one configured LLM provider, and prints accuracy, wrong plans and
//! refusals. Exits non-zero when any plan contradicts or differs from its request.

use std::path::{Path, PathBuf};

use anyhow::Context;
use chiffon_core::catalog::Catalog;
use chiffon_core::planner::eval::{judge, Corpus, Figures, Verdict};
use chiffon_core::planner::offline::OfflinePlanner;
use chiffon_core::planner::{PlanOptions, Planner, PlannerConfig};
use chiffon_server::{Config, ConfigOverrides};
use serde_json::json;

use crate::print_json;

/// Where the corpus lives in a checkout.
pub const DEFAULT_CORPUS: &str = "chiffon-core/tests/fixtures/planner_corpus.toml";

pub async fn eval_planner(
    config: Option<&Path>,
    o: ConfigOverrides,
    corpus: Option<PathBuf>,
    provider: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    let mut config = Config::load(config, &o)?;
    let path = corpus.unwrap_or_else(|| PathBuf::from(DEFAULT_CORPUS));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the corpus {}", path.display()))?;
    let corpus = Corpus::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let catalog = Catalog::load(&config.playbooks)?;
    let provider = provider.unwrap_or_else(|| "offline".into());
    let planner = if provider == "offline" {
        None
    } else {
        // Only the named provider, no fallback and no cache: its own answers are measured.
        config.llm.order = vec![provider.clone()];
        config.llm.offline = false;
        let store = chiffon_server::app::open_store(&config).await?;
        let router = chiffon_core::llm::Router::from_config(&config.llm, store.clone())
            .map_err(|e| anyhow::anyhow!("provider {provider}: {e}"))?;
        let cfg = PlannerConfig {
            cache: false,
            ..config.planner.clone()
        };
        Some(Planner::new(router, store, cfg))
    };
    let offline = OfflinePlanner {
        min_score: config.planner.offline_min_score,
    };
    let mut figures = Figures::default();
    let mut wrong = Vec::new();
    let mut refused = Vec::new();
    for case in &corpus.cases {
        let outcome = match &planner {
            None => offline.plan(&catalog, &case.text).map_err(|e| e.message),
            Some(p) => p
                .plan(&catalog, &case.text, &PlanOptions::default())
                .await
                .map(|o| o.plan)
                .map_err(|e| e.message),
        };
        let v = judge(case, outcome.as_ref().map_err(String::as_str), &catalog);
        match &v {
            Verdict::Wrong(d) => wrong.push(json!({"text": case.text, "wrong": d})),
            Verdict::Refused(r) => refused.push(json!({"text": case.text, "refused": r})),
            _ => {}
        }
        figures.add(case, &v);
    }
    if json {
        print_json(&json!({
            "provider": provider,
            "corpus": path.display().to_string(),
            "figures": figures,
            "accuracy": figures.accuracy(),
            "wrong": wrong,
            "refused": refused,
        }))?;
    } else {
        println!("planner: {provider}; corpus: {}", path.display());
        for w in &wrong {
            println!(
                "WRONG   {}: {}",
                w["text"],
                w["wrong"].as_str().unwrap_or("")
            );
        }
        for r in &refused {
            println!(
                "refused {}: {}",
                r["text"],
                r["refused"].as_str().unwrap_or("")
            );
        }
        println!("{figures}");
    }
    Ok(if wrong.is_empty() { 0 } else { 1 })
}
