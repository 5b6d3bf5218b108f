//! The planner evaluation: every request of `fixtures/planner_corpus.toml` against the
//! offline planner and the shipped catalog. No plan may contradict or differ from its
//! request, and at least 90% of the requests an action fits must be planned right.

use std::path::Path;

use chiffon_core::catalog::Catalog;
use chiffon_core::model::ParamSource;
use chiffon_core::planner::eval::{judge, Corpus, Figures, Verdict};
use chiffon_core::planner::offline::OfflinePlanner;

#[test]
fn the_offline_planner_never_misreads_the_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let catalog = Catalog::load(root.join("../playbooks")).unwrap();
    let corpus = Corpus::parse(
        &std::fs::read_to_string(root.join("tests/fixtures/planner_corpus.toml")).unwrap(),
    )
    .unwrap();
    assert!(corpus.cases.len() >= 150, "{} cases", corpus.cases.len());
    let planner = OfflinePlanner::default();
    let mut figures = Figures::default();
    let mut wrong = Vec::new();
    let mut refused = Vec::new();
    for case in &corpus.cases {
        let out = planner.plan(&catalog, &case.text);
        let v = judge(case, out.as_ref().map_err(|e| e.message.as_str()), &catalog);
        // Offline plans say where each value came from: listed ones from the text.
        if let (Verdict::Right, Ok(plan), Some(steps)) = (&v, &out, &case.steps) {
            for (s, e) in plan.steps.iter().zip(steps) {
                for k in s.parameters.keys() {
                    let want = if e.params.contains_key(k) {
                        ParamSource::Text
                    } else {
                        ParamSource::Default
                    };
                    assert_eq!(s.provenance.get(k), Some(&want), "{}: `{k}`", case.text);
                }
            }
        }
        match &v {
            Verdict::Wrong(d) => wrong.push(format!("{:?}: {d}", case.text)),
            Verdict::Refused(r) => refused.push(format!("{:?}: {r}", case.text)),
            _ => {}
        }
        figures.add(case, &v);
    }
    println!("{figures}");
    for r in &refused {
        println!("refused {r}");
    }
    assert!(wrong.is_empty(), "wrong plans:\n{}", wrong.join("\n"));
    assert!(
        figures.accuracy() >= 0.9,
        "{figures}\nrefused:\n{}",
        refused.join("\n")
    );
}
