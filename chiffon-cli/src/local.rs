//! Commands that run without a server, through the `chiffon-server` library: `up`, `run`,
//! `audit`, `migrate` and `actions`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chiffon_core::catalog::Catalog;
use chiffon_core::engine::SubmitRequest;
use chiffon_core::model::RequestStatus;
use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::Topology;
use chiffon_server::config::redact_url;
use chiffon_server::dto::{EventDto, RequestDto};
use chiffon_server::{App, AppOptions, Config, ConfigOverrides};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use crate::{exit_for, outcome_line, print_json, print_json_line, render};

pub fn overrides(
    database_url: Option<String>,
    bind: Option<String>,
    playbooks: Option<PathBuf>,
) -> ConfigOverrides {
    ConfigOverrides {
        database_url,
        bind,
        playbooks,
        ..Default::default()
    }
}

fn load(config: Option<&Path>, o: &ConfigOverrides) -> anyhow::Result<Config> {
    Ok(Config::load(config, o)?)
}

/// Where `chiffon up` writes its log: `Some((path, file))` for a file, `None` for stderr.
/// `--log-file -` is stderr, `--log-file PATH` that file; by default stderr only in the
/// foreground of a terminal (stdout and stderr both terminals), else `.chiffon/up.log`, so
/// a `chiffon up &` does not scribble over the terminal it shares with `chiffon watch`.
pub fn up_log_file(log_file: Option<&Path>) -> anyhow::Result<Option<(PathBuf, std::fs::File)>> {
    let path = match log_file {
        Some(p) if p == Path::new("-") => return Ok(None),
        Some(p) => p.to_path_buf(),
        None if std::io::stdout().is_terminal()
            && std::io::stderr().is_terminal()
            && !in_background() =>
        {
            return Ok(None)
        }
        None => PathBuf::from(".chiffon/up.log"),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for the log", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening the log file {}", path.display()))?;
    Ok(Some((path, file)))
}

/// Whether this process runs in the background of its terminal (`chiffon up &`): its
/// process group is not the terminal's foreground group. Linux only (`/proc`); elsewhere,
/// never.
fn in_background() -> bool {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return false;
    };
    // After the command name in parentheses: state ppid pgrp session tty_nr tpgid …
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<i64> = rest
        .split_whitespace()
        .skip(1)
        .take(5)
        .filter_map(|f| f.parse().ok())
        .collect();
    match fields.as_slice() {
        [_ppid, pgrp, _session, tty, tpgid] => *tty != 0 && *tpgid > 0 && tpgid != pgrp,
        _ => false,
    }
}

/// `chiffon actions`: the catalog the configuration names (`--playbooks`,
/// `CHIFFON_PLAYBOOKS`, `./playbooks`), read from its folder.
pub fn actions(config: Option<&Path>, o: ConfigOverrides, json: bool) -> anyhow::Result<i32> {
    let config = load(config, &o)?;
    let catalog = Catalog::load(&config.playbooks)?;
    if json {
        print_json(&json!({
            "playbooks": config.playbooks.display().to_string(),
            "actions": catalog.actions.values().collect::<Vec<_>>(),
        }))?;
    } else {
        render::actions(&catalog, &mut std::io::stdout().lock())?;
    }
    Ok(0)
}

/// The whole system in one process until SIGTERM or ctrl-c.
pub async fn up(config: Option<&Path>, o: ConfigOverrides, json: bool) -> anyhow::Result<i32> {
    let config = load(config, &o)?;
    let app = App::start(config).await?;
    let listener = app.bind().await?;
    let addr = app.serve(listener)?;
    let url = format!("http://{addr}");
    let health = app.engine().health().await;
    if json {
        // One line, so a supervising script can read it before the process ends.
        print_json_line(&json!({
            "url": url,
            "store": health.store_backend,
            "bus": health.bus_backend,
            "agents": app.in_process_agents(),
        }))?;
    } else {
        println!(
            "chiffon is up at {url} (store {}, bus {}, {} in-process agents); ctrl-c stops it",
            health.store_backend,
            health.bus_backend,
            app.in_process_agents().len()
        );
    }
    std::io::stdout().flush().ok();
    let stop = app.shutdown_token();
    tokio::select! {
        _ = chiffon_server::shutdown_signal() => {},
        _ = stop.cancelled() => tracing::warn!("a component stopped"),
    }
    app.shutdown().await;
    Ok(0)
}

fn whoami() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "local".into())
}

/// Plan, show, ask (or `--yes`), execute, stream, print the outcome and the audit commit.
pub async fn run(
    config: Option<&Path>,
    o: ConfigOverrides,
    text: &str,
    yes: bool,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    // Refuse before doing anything when nobody could answer the question.
    if !yes && !dry_run && !std::io::stdin().is_terminal() {
        bail!("stdin is not a terminal: pass --yes to approve the plan without asking");
    }
    let config = load(config, &o)?;
    let app = App::start(config).await?;
    let result = run_in(&app, text, yes, dry_run, json).await;
    app.shutdown().await;
    result
}

async fn run_in(
    app: &App,
    text: &str,
    yes: bool,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let engine = app.engine();
    let user = whoami();
    let request = engine
        .submit(SubmitRequest {
            text: text.to_string(),
            requester: Some(user.clone()),
            submitted_by: Some(format!("local:{user}")),
            dry_run,
            trace_id: None,
            request_id: None,
        })
        .await?;
    let id = request.id;
    // Subscribed before anything can run, so no event is missed.
    let mut rx = engine.subscribe(id);
    let planned = engine
        .wait_until(
            id,
            &[
                RequestStatus::AwaitingApproval,
                RequestStatus::Queued,
                RequestStatus::Running,
            ],
        )
        .await?;
    let view: RequestDto = engine.get(id).await?.into();
    if let Some(plan) = &view.plan {
        let mut err = std::io::stderr().lock();
        render::plan(plan, &mut err)?;
    }
    match planned.status {
        RequestStatus::AwaitingApproval => {
            let approve = yes || ask("Execute this plan? [y/N] ")?;
            if !approve {
                engine
                    .reject(id, &user, Some("declined at the prompt".into()))
                    .await?;
                eprintln!("not approved; request {id} rejected");
                return Ok(1);
            }
            engine
                .approve(id, &user, Some("chiffon run".into()))
                .await?;
        }
        s if s.is_terminal() => {
            let r: RequestDto = engine.get(id).await?.into();
            return finish(&r, json);
        }
        _ => {} // auto-approved (dry run or policy)
    }
    let steps: Vec<String> = view
        .plan
        .as_ref()
        .map(|p| p.steps.iter().map(|s| s.action.clone()).collect())
        .unwrap_or_default();
    let mut progress = render::Progress::new(steps, json);
    // ctrl-c or SIGTERM cancels the request (stopping a running playbook) and waits for it.
    let interrupt = chiffon_server::shutdown_signal();
    tokio::pin!(interrupt);
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = &mut interrupt, if !interrupted => {
                interrupted = true;
                eprintln!("interrupted: cancelling {id}");
                if let Err(e) = engine.cancel(id, &user).await {
                    tracing::debug!(error = %e, "cancel after interrupt");
                }
            }
            next = tokio::time::timeout(Duration::from_millis(500), rx.recv()) => match next {
                Ok(Ok(ev)) => {
                    let last = ev.is_final();
                    progress.event(&EventDto::from(ev));
                    if last {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    if matches!(e, RecvError::Closed) {
                        rx = engine.subscribe(id);
                    }
                    if engine.get(id).await?.request.status.is_terminal() {
                        break;
                    }
                }
                // Quiet for a while: make sure the end was not missed.
                Err(_) => {
                    if engine.get(id).await?.request.status.is_terminal() {
                        break;
                    }
                }
            },
        }
    }
    progress.finish();
    // The audit commit is written just after the terminal status; give it a moment.
    engine.settled(id, Duration::from_secs(5)).await?;
    let end: RequestDto = engine.get(id).await?.into();
    finish(&end, json)
}

fn finish(r: &RequestDto, json: bool) -> anyhow::Result<i32> {
    if json {
        print_json(r)?;
    } else {
        let mut out = std::io::stdout().lock();
        if r.dry_run {
            // What a real run would change: the point of a dry run.
            for s in r.steps.iter().flatten() {
                if let Some(d) = s.diff.as_deref().filter(|d| !d.trim().is_empty()) {
                    writeln!(out, "step {} {} would change:", s.seq + 1, s.action)?;
                    for line in d.lines() {
                        writeln!(out, "  {line}")?;
                    }
                }
            }
        }
        outcome_line(r, &mut out)?;
    }
    let code = exit_for(r.status);
    if code != 0 {
        eprintln!(
            "chiffon: request {} ended {}",
            r.request_id,
            render::status_str(r.status)
        );
    }
    Ok(code)
}

fn ask(question: &str) -> anyhow::Result<bool> {
    eprint!("{question}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the answer")?;
    Ok(matches!(
        line.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// An engine over the configured store only: no bus, no agents, no background work.
async fn offline_app(config: Option<&Path>) -> anyhow::Result<App> {
    let config = load(config, &ConfigOverrides::default())?;
    let options = AppOptions {
        transport: Some(Arc::new(MemoryTransport::new(Topology::contract()))),
        catalog: Some(Arc::new(Catalog::default())),
        no_engine: true,
        no_agents: true,
        ..Default::default()
    };
    Ok(App::start_with(config, options).await?)
}

/// `chiffon audit [verify]`.
pub async fn audit(
    config: Option<&Path>,
    verify: bool,
    request: Option<Uuid>,
    after: i64,
    limit: u32,
    json: bool,
) -> anyhow::Result<i32> {
    let app = offline_app(config).await?;
    let engine = app.engine().clone();
    let code = if verify {
        let report = engine.verify_audit().await?;
        if json {
            print_json(&report)?;
        } else if report.ok {
            println!(
                "audit log ok: {} entries verified, every approved request that ended has its git commit with the recorded content{}",
                report.chain.entries_checked,
                report
                    .anchor
                    .as_deref()
                    .map(|a| format!("; {a}"))
                    .unwrap_or_default()
            );
        } else {
            for p in &report.problems {
                println!("audit: {p}");
            }
        }
        if report.ok {
            0
        } else {
            eprintln!("chiffon: audit verification failed");
            1
        }
    } else {
        let entries = engine.audit_log(request, after, limit).await?;
        if json {
            print_json(&entries)?;
        } else {
            let mut out = std::io::stdout().lock();
            for e in &entries {
                writeln!(
                    out,
                    "{:>6} {} {:<20} {:<16} {} {}",
                    e.seq,
                    e.at.format("%Y-%m-%d %H:%M:%S"),
                    e.event,
                    e.actor,
                    e.request_id.map(|r| r.to_string()).unwrap_or_default(),
                    e.details
                )?;
            }
        }
        0
    };
    app.shutdown().await;
    Ok(code)
}

/// `chiffon migrate`: opening the store applies pending migrations.
pub async fn migrate(config: Option<&Path>, o: ConfigOverrides, json: bool) -> anyhow::Result<i32> {
    let config = load(config, &o)?;
    let store = chiffon_server::app::open_store(&config).await?;
    store.migrate().await.context("applying migrations")?;
    let url = redact_url(&config.database_url);
    if json {
        print_json(&json!({ "database": url, "backend": store.backend(), "migrated": true }))?;
    } else {
        println!("migrations applied to {url} ({})", store.backend());
    }
    Ok(0)
}
