//! `chiffon`: the command line of Chiffon.
//!
//! Commands that talk to a server (`request`, `status`, `list`, `approve`, `reject`,
//! `cancel`, `watch`, `logs`, `agents`, `costs`) use its HTTP API; `up`, `run`, `audit`,
//! `migrate` and `actions` run locally through the `chiffon-server` library. `--json` prints
//! only JSON on stdout. Errors are one line on stderr (each cause once, and a hint where one
//! helps) and a non-zero exit status. A reader that goes away (`chiffon list | head`) ends
//! the command quietly with status 141, as a shell reports a program killed by SIGPIPE.

mod client;
mod errors;
mod local;
mod render;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use chiffon_server::dto::{
    AgentsDto, ApproveBody, CostsDto, EventDto, LogsDto, RequestDto, RequestListDto, StatusDto,
    SubmitBody, SubmitResponse,
};
use clap::{Args, Parser, Subcommand};
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
        /// Write the log here (`-`: stderr). Default: stderr on a terminal in the foreground,
        /// else `.chiffon/up.log`, so a background `chiffon up` leaves the terminal alone.
        #[arg(long)]
        log_file: Option<PathBuf>,
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
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// List requests, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Approve a request awaiting approval (shows its plan, cost and dry-run diff first).
    Approve {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject a request awaiting approval.
    Reject {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Cancel a request.
    Cancel {
        #[command(flatten)]
        target: Target,
    },
    /// Follow a request live.
    Watch {
        #[command(flatten)]
        target: Target,
    },
    /// The execution log.
    Logs {
        #[command(flatten)]
        target: Target,
    },
    /// Known agents, and whether each is fresh, stale (missing heartbeats) or offline.
    Agents,
    /// The action catalog: each action and its parameters (read from the catalog folder).
    Actions {
        /// Action catalog folder (default CHIFFON_PLAYBOOKS or ./playbooks).
        #[arg(long)]
        playbooks: Option<PathBuf>,
    },
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

/// Which request: an id, a unique prefix of one, or `--last`.
#[derive(Debug, Args)]
struct Target {
    /// The request's id, or a unique prefix of it (6 characters or more).
    #[arg(required_unless_present = "last")]
    id: Option<String>,
    /// The newest request.
    #[arg(long, conflicts_with = "id")]
    last: bool,
}

#[derive(Debug, Subcommand)]
enum AuditAction {
    /// Check the hash chain and that every approved request that ended has its git commit.
    Verify,
}

fn main() {
    errors::quiet_on_broken_pipe();
    let cli = Cli::parse();
    match &cli.command {
        Command::Up { log_file, .. } => match local::up_log_file(log_file.as_deref()) {
            Ok(Some((path, file))) => {
                eprintln!("chiffon: the log goes to {}", path.display());
                chiffon_server::init_tracing_to_file("info", file);
            }
            Ok(None) => chiffon_server::init_tracing_with_default("info"),
            Err(e) => errors::exit_with(&e),
        },
        Command::Run { .. } => chiffon_server::init_tracing_with_default("warn"),
        _ => {}
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
    match rt.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => errors::exit_with(&e),
    }
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
            log_file: _,
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
        Command::Actions { playbooks } => local::actions(
            cli.config.as_deref(),
            local::overrides(None, None, playbooks),
            json,
        ),
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
        Command::Status { target } => {
            let id = resolve(client, &target).await?;
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
        Command::Approve { target, comment } => {
            let id = resolve(client, &target).await?;
            decide(client, id, true, comment, json).await
        }
        Command::Reject { target, comment } => {
            let id = resolve(client, &target).await?;
            decide(client, id, false, comment, json).await
        }
        Command::Cancel { target } => {
            let id = resolve(client, &target).await?;
            let v: Value = client
                .post::<(), Value>(&format!("/cancel/{id}"), None)
                .await?;
            if json {
                print_json(&v)?;
            } else {
                let r: RequestDto = serde_json::from_value(v)?;
                writeln!(
                    out,
                    "request {}: {}",
                    r.request_id,
                    render::status_str(r.status)
                )?;
                if !render::is_terminal(r.status) {
                    writeln!(out, "cancel sent to the running step")?;
                }
            }
            Ok(0)
        }
        Command::Watch { target } => {
            let id = resolve(client, &target).await?;
            drop(out);
            follow(client, id, json, false).await
        }
        Command::Logs { target } => {
            let id = resolve(client, &target).await?;
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
        | Command::Actions { .. }
        | Command::Migrate { .. } => bail!("this command runs locally"),
    }
}

/// The request a [`Target`] names. A prefix is resolved by the server (`id_prefix`, at most
/// two answers), so it is right however many requests there are.
async fn resolve(client: &Client, target: &Target) -> anyhow::Result<Uuid> {
    if target.last {
        let newest: RequestListDto = client.get("/requests?limit=1").await?;
        return newest
            .requests
            .first()
            .map(|r| r.request_id)
            .ok_or_else(|| anyhow!("no requests yet, so no --last"));
    }
    let given = target.id.as_deref().unwrap_or_default().trim();
    if let Ok(id) = Uuid::parse_str(given) {
        return Ok(id);
    }
    let n = given.chars().count();
    if !(6..=36).contains(&n) || !given.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        bail!("`{given}` is not a request id, nor a prefix of one (6 to 36 hex digits and `-`)");
    }
    let found: RequestListDto = client
        .get(&format!("/requests?id_prefix={given}&limit=2"))
        .await?;
    match found.requests.as_slice() {
        [] => bail!("no request starts with {given}"),
        [one] => Ok(one.request_id),
        [a, b, ..] => bail!(
            "{given} is ambiguous: matches {}, {}…; give more characters",
            a.request_id,
            b.request_id
        ),
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
            r.request_id,
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
    write!(
        out,
        "{} {}: {summary}",
        r.request_id,
        render::status_str(r.status)
    )?;
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
