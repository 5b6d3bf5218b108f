//! `chiffon`: the command line of Chiffon.
//!
//! Commands that talk to a server (`request`, `status`, `list`, `approve`, `reject`,
//! `cancel`, `watch`, `logs`, `agents`, `costs`) use its HTTP API; `up`, `run`, `audit` and
//! `migrate` run locally through the `chiffon-server` library. `--json` prints only JSON on
//! stdout. Errors are one line on stderr and a non-zero exit status.

mod client;
mod local;
mod render;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use chiffon_server::dto::{
    AgentsDto, ApproveBody, CostsDto, EventDto, LogsDto, RequestDto, RequestListDto, StatusDto,
    SubmitBody, SubmitResponse,
};
use clap::{Parser, Subcommand};
use serde_json::Value;
use uuid::Uuid;

use crate::client::Client;

#[derive(Debug, Parser)]
#[command(
    name = "chiffon",
    version,
    about = "Chiffon: infrastructure requests in plain words, planned, approved, executed and audited"
)]
struct Cli {
    /// The server's URL.
    #[arg(long, global = true, env = "CHIFFON_URL", default_value = chiffon_server::config::DEFAULT_SERVER_URL)]
    server: String,
    /// Bearer token sent to the server.
    #[arg(long, global = true, env = "CHIFFON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Machine-readable output: only JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// TOML configuration file (for `up`, `run`, `audit`, `migrate`).
    #[arg(long, global = true, env = "CHIFFON_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole system in one process: server, orchestrator, in-process bus and agents.
    Up {
        /// Listen address (default CHIFFON_BIND or 127.0.0.1:8080).
        #[arg(long)]
        bind: Option<String>,
        /// Database URL (default CHIFFON_DATABASE_URL or sqlite://.chiffon/chiffon.db).
        #[arg(long)]
        database_url: Option<String>,
        /// Action catalog folder (default CHIFFON_PLAYBOOKS or ./playbooks).
        #[arg(long)]
        playbooks: Option<PathBuf>,
    },
    /// One shot without a server: plan, show, ask, execute, stream, print the outcome.
    Run {
        text: String,
        /// Approve without asking.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Check mode: show what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Database URL (default CHIFFON_DATABASE_URL or sqlite://.chiffon/chiffon.db).
        #[arg(long)]
        database_url: Option<String>,
        /// Action catalog folder.
        #[arg(long)]
        playbooks: Option<PathBuf>,
    },
    /// Submit a request to the server.
    Request {
        text: String,
        /// Follow it until it ends.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        dry_run: bool,
    },
    /// Show a request.
    Status { id: Uuid },
    /// List requests, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Approve a request awaiting approval (shows its plan, cost and dry-run diff first).
    Approve {
        id: Uuid,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject a request awaiting approval.
    Reject {
        id: Uuid,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Cancel a request.
    Cancel { id: Uuid },
    /// Follow a request live.
    Watch { id: Uuid },
    /// The execution log.
    Logs { id: Uuid },
    /// Known agents.
    Agents,
    /// LLM spend this month.
    Costs,
    /// The audit log; `verify` checks its hash chain and the git trail.
    Audit {
        #[command(subcommand)]
        action: Option<AuditAction>,
        /// Only this request's entries.
        #[arg(long)]
        request: Option<Uuid>,
        /// Entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Apply database migrations.
    Migrate {
        #[arg(long)]
        database_url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditAction {
    /// Check the hash chain and that every approved request that ended has its git commit.
    Verify,
}

fn main() {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Up { .. } | Command::Run { .. }) {
        chiffon_server::init_tracing_with_default(if matches!(cli.command, Command::Up { .. }) {
            "info"
        } else {
            "warn"
        });
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chiffon: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let line = chiffon_server::redact_for_logs(&format!("{e:#}").replace('\n', " "));
            eprintln!("chiffon: {line}");
            1
        }
    };
    std::process::exit(code);
}

/// Prints a value as JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.json;
    match cli.command {
        Command::Up {
            bind,
            database_url,
            playbooks,
        } => {
            local::up(
                cli.config.as_deref(),
                local::overrides(database_url, bind, playbooks),
                json,
            )
            .await
        }
        Command::Run {
            text,
            yes,
            dry_run,
            database_url,
            playbooks,
        } => {
            local::run(
                cli.config.as_deref(),
                local::overrides(database_url, None, playbooks),
                &text,
                yes,
                dry_run,
                json,
            )
            .await
        }
        Command::Audit {
            action,
            request,
            after,
            limit,
        } => {
            local::audit(
                cli.config.as_deref(),
                matches!(action, Some(AuditAction::Verify)),
                request,
                after,
                limit,
                json,
            )
            .await
        }
        Command::Migrate { database_url } => {
            local::migrate(
                cli.config.as_deref(),
                local::overrides(database_url, None, None),
                json,
            )
            .await
        }
        other => {
            let client = Client::new(&cli.server, cli.token)?;
            remote(&client, other, json).await
        }
    }
}

async fn remote(client: &Client, command: Command, json: bool) -> anyhow::Result<i32> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::Request {
            text,
            wait,
            dry_run,
        } => {
            let body = SubmitBody {
                text,
                requester: None,
                dry_run,
            };
            let accepted: SubmitResponse = client.post("/request", Some(&body)).await?;
            if !wait {
                if json {
                    print_json(&accepted)?;
                } else {
                    writeln!(
                        out,
                        "submitted {} ({}); follow it with `chiffon watch {}`",
                        accepted.request_id,
                        render::status_str(accepted.status),
                        accepted.request_id
                    )?;
                }
                return Ok(0);
            }
            if !json {
                writeln!(out, "submitted {}", accepted.request_id)?;
            }
            drop(out);
            follow(client, accepted.request_id, json, true).await
        }
        Command::Status { id } => {
            let v: Value = client.get(&format!("/request/{id}")).await?;
            if json {
                print_json(&v)?;
            } else {
                let r: RequestDto = serde_json::from_value(v).context("reading the request")?;
                render::request(&r, &mut out)?;
            }
            Ok(0)
        }
        Command::List { status, limit } => {
            let mut path = format!("/requests?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={}", urlencode(&s)));
            }
            let v: Value = client.get(&path).await?;
            if json {
                print_json(&v)?;
            } else {
                let l: RequestListDto = serde_json::from_value(v).context("reading the list")?;
                render::list(&l, &mut out)?;
            }
            Ok(0)
        }
        Command::Approve { id, comment } => decide(client, id, true, comment, json).await,
        Command::Reject { id, comment } => decide(client, id, false, comment, json).await,
        Command::Cancel { id } => {
            let v: Value = client
                .post::<(), Value>(&format!("/cancel/{id}"), None)
                .await?;
            if json {
                print_json(&v)?;
            } else {
                let r: RequestDto = serde_json::from_value(v)?;
                writeln!(out, "request {}: {}", r.id, render::status_str(r.status))?;
                if !render::is_terminal(r.status) {
                    writeln!(out, "cancel sent to the running step")?;
                }
            }
            Ok(0)
        }
        Command::Watch { id } => {
            drop(out);
            follow(client, id, json, false).await
        }
        Command::Logs { id } => {
            let v: Value = client.get(&format!("/request/{id}/logs")).await?;
            if json {
                print_json(&v)?;
            } else {
                let l: LogsDto = serde_json::from_value(v)?;
                render::logs(&l, &mut out)?;
            }
            Ok(0)
        }
        Command::Agents => {
            let v: Value = client.get("/agents").await?;
            if json {
                print_json(&v)?;
            } else {
                let a: AgentsDto = serde_json::from_value(v)?;
                render::agents(&a, &mut out)?;
            }
            Ok(0)
        }
        Command::Costs => {
            let v: Value = client.get("/costs").await?;
            if json {
                print_json(&v)?;
            } else {
                let c: CostsDto = serde_json::from_value(v)?;
                render::costs(&c, &mut out)?;
            }
            Ok(0)
        }
        Command::Up { .. }
        | Command::Run { .. }
        | Command::Audit { .. }
        | Command::Migrate { .. } => bail!("this command runs locally"),
    }
}

/// `approve` / `reject`: show the plan, its cost and any dry-run diff, then decide.
async fn decide(
    client: &Client,
    id: Uuid,
    approved: bool,
    comment: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    let current: RequestDto = client.get(&format!("/request/{id}")).await?;
    if !json {
        let mut err = std::io::stdout().lock();
        render::request(&current, &mut err)?;
    }
    let body = ApproveBody {
        request_id: id,
        approved,
        comment,
    };
    let v: Value = client.post("/approve", Some(&body)).await?;
    if json {
        print_json(&v)?;
    } else {
        let r: RequestDto = serde_json::from_value(v)?;
        println!(
            "{} {}: now {}",
            if approved { "approved" } else { "rejected" },
            r.id,
            render::status_str(r.status)
        );
    }
    Ok(0)
}

/// Follows a request's events to its end. `final_json`: with `--json`, print the final
/// request (for `request --wait`) instead of one JSON line per event (for `watch`).
async fn follow(client: &Client, id: Uuid, json: bool, final_json: bool) -> anyhow::Result<i32> {
    let current: RequestDto = client.get(&format!("/request/{id}")).await?;
    let steps = |r: &RequestDto| -> Vec<String> {
        r.plan
            .as_ref()
            .map(|p| p.steps.iter().map(|s| s.action.clone()).collect())
            .unwrap_or_default()
    };
    let mut progress = (!json || final_json).then(|| render::Progress::new(steps(&current), json));
    let mut stream = client.events(&format!("/request/{id}/events")).await?;
    let mut last_status = current.status;
    let mut hinted = false;
    while let Some(ev) = stream.next().await? {
        let dto: EventDto = match serde_json::from_str(&ev.data) {
            Ok(d) => d,
            Err(_) => continue,
        };
        if json && !final_json {
            print_json_line(
                &serde_json::json!({ "event": ev.event, "data": serde_json::from_str::<Value>(&ev.data).unwrap_or(Value::Null) }),
            )?;
        }
        if let EventDto::Status { status, .. } = &dto {
            last_status = *status;
            if *status == StatusDto::Queued || *status == StatusDto::AwaitingApproval {
                // The plan is known now: name the steps.
                if let Some(p) = progress.as_mut() {
                    if let Ok(r) = client.get::<RequestDto>(&format!("/request/{id}")).await {
                        p.set_steps(steps(&r));
                    }
                }
            }
            if *status == StatusDto::AwaitingApproval && !hinted && !json {
                hinted = true;
                eprintln!("waiting for approval: chiffon approve {id}");
            }
        }
        if let Some(p) = progress.as_mut() {
            p.event(&dto);
        }
        if matches!(&dto, EventDto::Status { status, .. } if render::is_terminal(*status)) {
            break;
        }
    }
    if let Some(p) = &progress {
        p.finish();
    }
    if !render::is_terminal(last_status) {
        bail!("the event stream of {id} ended before the request did (server stopped?)");
    }
    let end: RequestDto = client.get(&format!("/request/{id}")).await?;
    if json {
        if final_json {
            print_json(&end)?;
        }
    } else {
        let mut out = std::io::stdout().lock();
        outcome_line(&end, &mut out)?;
    }
    let code = exit_for(end.status);
    if code != 0 {
        eprintln!(
            "chiffon: request {id} ended {}",
            render::status_str(end.status)
        );
    }
    Ok(code)
}

pub fn print_json_line(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// The last line: how it ended, and where it is recorded.
pub fn outcome_line(r: &RequestDto, out: &mut impl Write) -> std::io::Result<()> {
    let summary = r
        .plan
        .as_ref()
        .map(|p| p.summary.clone())
        .unwrap_or_else(|| r.text.clone());
    write!(out, "{} {}: {summary}", r.id, render::status_str(r.status))?;
    if let Some(e) = &r.error {
        write!(out, " ({} {}: {})", e.code, e.name, e.message)?;
    }
    if let Some(c) = &r.commit_id {
        write!(out, "; audit commit {c}")?;
    }
    writeln!(out)
}

/// 0 when the request completed, 1 otherwise.
pub fn exit_for(s: StatusDto) -> i32 {
    if s == StatusDto::Completed {
        0
    } else {
        1
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
