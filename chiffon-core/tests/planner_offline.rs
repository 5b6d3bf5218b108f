//! The offline planner against the fixture catalog: requests to expected actions and
//! parameters, and the "could not work out" errors.

mod llm_support;

use chiffon_core::planner::offline::{OfflinePlanner, MODEL, PROVIDER};
use chiffon_protocol::ErrorCode;
use llm_support::fixture_catalog;
use serde_json::{json, Value};

fn plan(text: &str) -> chiffon_core::model::Plan {
    OfflinePlanner::default()
        .plan(&fixture_catalog(), text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn one(text: &str) -> (String, Value) {
    let p = plan(text);
    assert_eq!(p.steps.len(), 1, "{text}: {:?}", p.steps);
    let s = &p.steps[0];
    (s.action.clone(), Value::Object(s.parameters.clone()))
}

#[test]
fn picks_actions_and_reads_parameters() {
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "Deploy Uptime Kuma on the NAS",
            "deploy_kuma",
            json!({"host": "nas.lan", "version": "latest", "port": 3001}),
        ),
        (
            "deploy kuma v1.23.4 on web-01 port 8080",
            "deploy_kuma",
            json!({"host": "web-01", "version": "v1.23.4", "port": 8080}),
        ),
        (
            "set up uptime monitoring locally, version 2",
            "deploy_kuma",
            json!({"host": "localhost", "version": "2", "port": 3001}),
        ),
        (
            "restart nginx on the nas",
            "restart_service",
            json!({"host": "nas.lan", "service": "nginx"}),
        ),
        (
            "Please restart the docker service on web-02.",
            "restart_service",
            json!({"host": "web-02", "service": "docker"}),
        ),
        (
            "back up /srv/data on the NAS to /mnt/backup without compression",
            "backup_directory",
            json!({"host": "nas.lan", "path": "/srv/data", "dest": "/mnt/backup", "compress": false}),
        ),
        (
            "backup /etc on localhost",
            "backup_directory",
            json!({"host": "localhost", "path": "/etc", "dest": "/var/backups", "compress": true}),
        ),
        (
            "write 'hello world' to /tmp/chiffon/hello.txt with mode=0600 and force",
            "write_file",
            json!({"host": "localhost", "path": "/tmp/chiffon/hello.txt", "content": "hello world", "mode": "0600", "force": true}),
        ),
        (
            "open https://example.com/status in the browser",
            "open_url",
            json!({"url": "https://example.com/status"}),
        ),
        (
            "run the gpu benchmark with 50 iterations",
            "run_benchmark",
            json!({"iterations": 50}),
        ),
        (
            "install htop version 3.0.5 on web-01",
            "install_package",
            json!({"host": "web-01", "package": "htop", "version": "3.0.5"}),
        ),
        (
            "install package=curl host=nas.lan",
            "install_package",
            json!({"host": "nas.lan", "package": "curl"}),
        ),
        ("ping the agents", "noop", json!({})),
        (
            "install a unit called myapp that runs /usr/bin/myapp",
            "install_unit",
            json!({"unit_name": "myapp", "exec_start": "/usr/bin/myapp"}),
        ),
    ];
    for (text, action, params) in cases {
        let (a, p) = one(text);
        assert_eq!(a, action, "{text}");
        assert_eq!(p, params, "{text}");
    }
}

#[test]
fn fills_catalog_fields_and_cost() {
    let p = plan("run the gpu benchmark");
    assert_eq!(p.provider, PROVIDER);
    assert_eq!(p.model, MODEL);
    assert!(!p.cached);
    assert_eq!(p.llm_cost_usd, 0.0);
    assert_eq!(p.estimated_cost_usd, 0.5);
    let s = &p.steps[0];
    assert_eq!(s.agent_type, "infrastructure");
    assert!(s.resources.gpu);
    assert_eq!(s.resources.memory_gb, 8.0);
    assert!(!p.summary.is_empty());
    assert!(!p.risks.is_empty());
    assert!(s.reason.contains("benchmark"));
    assert_eq!(
        plan("open https://x.org in the browser").steps[0].agent_type,
        "desktop"
    );
}

#[test]
fn several_steps_when_asked_for_several_things() {
    let p = plan("deploy kuma on the nas and then restart nginx on web-01");
    let got: Vec<(&str, Value)> = p
        .steps
        .iter()
        .map(|s| (s.action.as_str(), Value::Object(s.parameters.clone())))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "deploy_kuma",
                json!({"host": "nas.lan", "version": "latest", "port": 3001})
            ),
            (
                "restart_service",
                json!({"host": "web-01", "service": "nginx"})
            ),
        ]
    );
    // A host named once serves the later clauses too.
    let p = plan("back up /var/lib/app on the nas; then restart the app service");
    assert_eq!(p.steps.len(), 2);
    assert_eq!(p.steps[1].parameters["host"], "nas.lan");
    assert_eq!(p.steps[1].parameters["service"], "app");
}

#[test]
fn says_what_it_could_not_work_out() {
    let planner = OfflinePlanner::default();
    let catalog = fixture_catalog();

    let e = planner.plan(&catalog, "make me a sandwich").unwrap_err();
    assert_eq!(e.code(), ErrorCode::NoPlan);
    assert_eq!(e.action, None);
    assert!(
        e.message.contains("no catalog action performs 'make'"),
        "{e}"
    );
    assert_eq!(e.details["verb"], "make");

    let e = planner.plan(&catalog, "deploy uptime kuma").unwrap_err();
    assert_eq!(e.action.as_deref(), Some("deploy_kuma"));
    assert_eq!(e.parameter.as_deref(), Some("host"));
    assert!(e.message.contains("`host`"), "{e}");

    // `web` names two hosts: not a host at all.
    let e = planner.plan(&catalog, "deploy kuma on web").unwrap_err();
    assert_eq!(e.parameter.as_deref(), Some("host"));

    let e = planner
        .plan(&catalog, "install a package on the nas")
        .unwrap_err();
    assert_eq!(e.action.as_deref(), Some("install_package"));
    assert_eq!(e.parameter.as_deref(), Some("package"));

    // A value given explicitly that fails the schema is reported, not dropped.
    let e = planner
        .plan(&catalog, "deploy kuma on the nas port=99999")
        .unwrap_err();
    assert_eq!(e.parameter.as_deref(), Some("port"), "{e}");

    // Two verbs and nothing to act on: the first clause lacks its values.
    let e = planner.plan(&catalog, "restart and install").unwrap_err();
    assert_eq!(e.action.as_deref(), Some("restart_service"), "{e}");

    // A self-correcting request is not guessed at: "probe" is no verb of this catalog.
    let e = planner
        .plan(&catalog, "probe: deploy kuma on 10.0.0.5? no, on nas.lan")
        .unwrap_err();
    assert_eq!(e.details["verb"], "probe", "{e}");
}

#[test]
fn refuses_rather_than_guesses() {
    let planner = OfflinePlanner::default();
    let catalog = fixture_catalog();
    let refused = |text: &str| planner.plan(&catalog, text).expect_err(text);
    for (text, verb) in [
        ("delete the file /tmp/x", "delete"),
        ("uninstall htop on web-01", "uninstall"),
        ("stop nginx on the nas", "stop"),
        ("disable the backup of /srv on the nas", "disable"),
    ] {
        let e = refused(text);
        assert_eq!(e.code(), ErrorCode::NoPlan);
        assert_eq!(e.details["verb"], verb, "{text}: {e}");
        assert!(
            e.message
                .contains(&format!("no catalog action performs '{verb}'")),
            "{e}"
        );
        assert!(
            e.message.contains("restart_service"),
            "lists what it can do: {e}"
        );
    }
    for text in [
        "don't restart nginx on the nas",
        "never install htop on web-01",
    ] {
        assert_eq!(refused(text).reason(), "negated", "{text}");
    }
    // An unknown host is refused with the inventory's hosts.
    let e = refused("restart nginx on db7");
    assert_eq!(e.reason(), "unknown_host");
    assert_eq!(e.details["host"], "db7");
    assert!(
        e.message.contains("localhost, nas.lan, web-01, web-02"),
        "{e}"
    );
    // A value no parameter takes is named.
    let e = refused("restart nginx on the nas with mode 0700");
    assert_eq!(e.reason(), "unaccounted_value", "{e}");
    assert!(e.message.contains("0700"), "{e}");
    // The object must be something the action handles.
    assert_eq!(refused("create a user named alice").reason(), "no_object");
}

#[test]
fn marks_where_each_value_came_from() {
    use chiffon_core::model::ParamSource;
    let p = plan("backup /etc on localhost");
    let s = &p.steps[0];
    assert_eq!(s.provenance["host"], ParamSource::Text);
    assert_eq!(s.provenance["path"], ParamSource::Text);
    assert_eq!(s.provenance["dest"], ParamSource::Default);
    assert_eq!(s.provenance["compress"], ParamSource::Default);
    // Several objects, one step each.
    let p = plan("back up /srv/a and /srv/b on the nas");
    let paths: Vec<&Value> = p.steps.iter().map(|s| &s.parameters["path"]).collect();
    assert_eq!(paths, vec!["/srv/a", "/srv/b"]);
}

#[test]
fn ranking_is_deterministic() {
    let planner = OfflinePlanner::default();
    let c = fixture_catalog();
    let a = planner.rank(&c, "deploy kuma on the nas");
    assert_eq!(a, planner.rank(&c, "deploy kuma on the nas"));
    assert_eq!(a[0].0, "deploy_kuma");
}

/// The planner's verbs follow the catalog it is given: a verb one catalog adds is read
/// against that catalog only, whichever catalogs were planned against before.
#[test]
fn each_catalog_is_read_with_its_own_verbs() {
    let plain = fixture_catalog();
    let mut more = plain.clone();
    more.actions
        .get_mut("deploy_kuma")
        .expect("the fixture deploys kuma")
        .verbs
        .push("roll out".into());
    let planner = OfflinePlanner::default();
    let text = "roll out uptime kuma on the nas";
    // Each after the other, in both orders.
    for (catalog, knows) in [
        (&more, true),
        (&plain, false),
        (&plain, false),
        (&more, true),
    ] {
        match planner.plan(catalog, text) {
            Ok(p) if knows => assert_eq!(p.steps[0].action, "deploy_kuma"),
            Err(e) if !knows => assert!(e.message.contains("no verb"), "{e}"),
            other => panic!("{text} (knows `roll out`: {knows}): {other:?}"),
        }
    }
}
