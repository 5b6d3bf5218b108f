//! Runs one catalog playbook with the real `ansible-playbook`, no shell anywhere.
//!
//! - Parameters (already validated) go to a YAML extra-vars file (`-e @FILE`) in which every
//!   string is tagged `!unsafe`, so Ansible never templates a value: `{{ lookup('pipe', …) }}`
//!   in a parameter is written literally, even under `--check`. Strings are written as YAML
//!   double-quoted scalars with every non-printable or non-ASCII character escaped, so no
//!   value can end the scalar or add a key. The catalog's `inventory.ini` goes with `-i`; a
//!   dry run adds `--check --diff`.
//! - The same file gives the play the task's identity, `chiffon_task_id` (the step's uuid,
//!   the same on every attempt and redelivery) and `chiffon_attempt` (1, 2, …): a playbook
//!   may key a side effect that must happen once on them (`playbooks/README.md`). The
//!   catalog refuses parameters named `chiffon_*`, and so does the file, so a parameter can
//!   never pose as either.
//! - Progress and results come from the catalog's callback plugin
//!   (`playbooks/callback_plugins/chiffon_events.py`), enabled as a *notification* callback:
//!   it prints one `CHIFFON_EVENT {json}` line per play/task/diff/recap event while the
//!   default human output keeps streaming. We chose it over `--list-tasks` (a second
//!   ansible run per task, and it cannot see results) and over the `json` stdout callback
//!   (needs the `ansible.posix` collection, and prints everything only at the end).
//! - The child runs in its own process group; cancel or deadline sends SIGTERM to the group,
//!   then SIGKILL after a short grace, so ansible's forked workers and their modules die too.
//! - The child is spawned with `std::process::Command` and reaped with `wait4` on a blocking
//!   thread (not `tokio::process`, which reaps the child itself and throws the rusage away):
//!   that gives the exact CPU seconds of ansible and every worker it waited for, and the peak
//!   RSS of its largest process. Output pipes are read asynchronously.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;

use crate::agent::{AgentError, TaskContext, TaskOutcome};
use crate::sys::{self, ExitKind};

const EVENT_PREFIX: &str = "CHIFFON_EVENT ";
/// Lines of output kept for the failure message and the result's output.
const OUTPUT_TAIL: usize = 60;
/// Most bytes of diff returned.
const MAX_DIFF_BYTES: usize = 256 * 1024;
/// Time between SIGTERM and SIGKILL to the process group.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Where to find `ansible-playbook` and where it may write.
#[derive(Debug, Clone, Default)]
pub struct AnsibleConfig {
    /// An explicit `ansible-playbook` (the binaries fill it from `CHIFFON_ANSIBLE_PLAYBOOK`).
    /// Unset: `./.venv/bin/ansible-playbook`, then `$PATH`.
    pub playbook_bin: Option<PathBuf>,
    /// `ANSIBLE_HOME`/`ANSIBLE_LOCAL_TEMP` root. Unset: `$TMPDIR/chiffon-ansible`.
    pub state_dir: Option<PathBuf>,
}

/// Finds `ansible-playbook`: the explicit path, then `./.venv/bin/ansible-playbook`, then
/// every directory of `$PATH`.
pub fn find_ansible_playbook(explicit: Option<&Path>) -> Result<PathBuf, AgentError> {
    let mut searched = Vec::new();
    if let Some(p) = explicit {
        if is_executable(p) {
            return Ok(p.to_path_buf());
        }
        searched.push(p.display().to_string());
    }
    let venv = PathBuf::from(".venv/bin/ansible-playbook");
    if is_executable(&venv) {
        return Ok(std::fs::canonicalize(&venv).unwrap_or(venv));
    }
    searched.push(venv.display().to_string());
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("ansible-playbook");
            if is_executable(&c) {
                return Ok(c);
            }
        }
    }
    searched.push("$PATH".into());
    Err(AgentError::AnsibleMissing {
        searched: searched.join(", "),
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One playbook run.
#[derive(Debug, Clone)]
pub struct PlaybookRun<'a> {
    pub playbook: &'a Path,
    pub inventory: &'a Path,
    /// `callback_plugins/` of the catalog.
    pub callback_dir: &'a Path,
    pub extra_vars: &'a Map<String, Value>,
    pub check: bool,
}

/// Runs playbooks; cheap to clone.
#[derive(Debug, Clone)]
pub struct AnsibleExecutor {
    config: AnsibleConfig,
}

#[derive(Debug, Default)]
struct RunState {
    total: u32,
    done: u32,
    current_done: bool,
    diffs: String,
    changed: u64,
    failures: u64,
    unreachable: u64,
    saw_stats: bool,
    failed_msgs: Vec<String>,
    tail: VecDeque<String>,
}

impl AnsibleExecutor {
    pub fn new(config: AnsibleConfig) -> Self {
        AnsibleExecutor { config }
    }

    /// Where ansible's state and the running-groups record live.
    pub fn state_dir(&self) -> PathBuf {
        self.config
            .state_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("chiffon-ansible"))
    }

    /// Kills what a dead predecessor left running (see [`reap_orphans`]).
    pub fn reap_orphans(&self) -> Vec<u32> {
        reap_orphans(&self.state_dir())
    }

    /// The `ansible-playbook` this executor would run.
    pub fn ansible_playbook(&self) -> Result<PathBuf, AgentError> {
        find_ansible_playbook(self.config.playbook_bin.as_deref())
    }

    /// Runs the playbook, streaming lines and progress into `ctx`; returns `changed` from the
    /// recap and, for a check run, the diff.
    pub async fn run(
        &self,
        run: PlaybookRun<'_>,
        ctx: &TaskContext,
    ) -> Result<TaskOutcome, AgentError> {
        let bin = self.ansible_playbook()?;
        let state_dir = self.state_dir();
        let local_tmp = state_dir.join("tmp");
        let marker = uuid::Uuid::new_v4().simple().to_string();
        std::fs::create_dir_all(&local_tmp).map_err(crashed)?;
        let mut vars = tempfile::Builder::new()
            .prefix("chiffon-vars-")
            .suffix(".yml")
            .tempfile_in(&state_dir)
            .map_err(crashed)?;
        let mut yaml = unsafe_extra_vars(run.extra_vars).map_err(AgentError::InvalidParameters)?;
        yaml.push_str(&identity_vars(ctx));
        std::io::Write::write_all(&mut vars, yaml.as_bytes()).map_err(crashed)?;
        std::io::Write::flush(&mut vars).map_err(crashed)?;

        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("-i")
            .arg(run.inventory)
            .arg("-e")
            .arg(format!("@{}", vars.path().display()));
        if run.check {
            cmd.arg("--check").arg("--diff");
        }
        cmd.arg(run.playbook)
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("ANSIBLE_LOCAL_TEMP", &local_tmp)
            .env("ANSIBLE_HOME", &state_dir)
            .env("ANSIBLE_CALLBACK_PLUGINS", run.callback_dir)
            .env("ANSIBLE_CALLBACKS_ENABLED", "chiffon_events")
            .env("PYTHONUNBUFFERED", "1")
            // Every process of this run carries it, also ansible's workers, which leave
            // the process group (setsid): cancel and orphan reaping find them by it.
            .env(sys::PLAY_MARKER, &marker)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AgentError::AnsibleMissing {
                searched: bin.display().to_string(),
            },
            _ => crashed(e),
        })?;
        let pid = child.id();
        // Written down until it is reaped: if this agent dies (kill -9), its successor kills
        // the group instead of letting it run beside the re-run.
        let _running = RunningGroup::record(&state_dir, pid, &marker);
        // Kills the run if this future is dropped before the child was reaped.
        let guard = GroupGuard {
            pgid: pid,
            marker: marker.clone(),
            reaped: Arc::new(AtomicBool::new(false)),
        };
        let stdout = child.stdout.take().map(OwnedFd::from);
        let stderr = child.stderr.take().map(OwnedFd::from);
        // `child` is reaped by wait4 below, not by std.
        drop(child);
        let reaped = guard.reaped.clone();
        let mut waiter = tokio::task::spawn_blocking(move || {
            let r = sys::wait_child(pid);
            reaped.store(true, Ordering::SeqCst);
            r
        });
        ctx.progress(
            1,
            format!(
                "running ansible-playbook {} (pid {pid})",
                run.playbook.display()
            ),
        );

        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
        for fd in [stdout, stderr].into_iter().flatten() {
            let tx = tx.clone();
            let rd = pipe::Receiver::from_owned_fd(fd).map_err(crashed)?;
            tokio::spawn(async move {
                let mut lines = BufReader::new(rd).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(line).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);

        let mut st = RunState::default();
        let mut cancelled = false;
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut output_open = true;
        let mut waited = None;
        // After the child exits, a grandchild that kept the pipe open must not hold us up.
        let mut drain_until: Option<tokio::time::Instant> = None;
        loop {
            if waited.is_some() && !output_open {
                break;
            }
            tokio::select! {
                line = rx.recv(), if output_open => match line {
                    Some(line) => handle_line(&line, &mut st, ctx),
                    None => output_open = false,
                },
                r = &mut waiter, if waited.is_none() => {
                    waited = Some(r);
                    drain_until = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
                _ = sleep_until_opt(drain_until) => break,
                _ = ctx.cancelled(), if !cancelled && waited.is_none() => {
                    cancelled = true;
                    sys::kill_play(pid, &marker, libc::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
                }
                _ = sleep_until_opt(kill_at), if waited.is_none() => {
                    sys::kill_play(pid, &marker, libc::SIGKILL);
                    kill_at = None;
                }
            }
        }
        let Some(waited) = waited else {
            return Err(AgentError::failed("ansible-playbook was not reaped"));
        };
        let (exit, usage) = waited
            .map_err(|e| crashed(std::io::Error::other(e)))?
            .map_err(crashed)?;
        // Workers that outlived ansible-playbook (they should not) go with it.
        sys::kill_play(pid, &marker, libc::SIGKILL);
        drop(guard);
        ctx.record_child_usage(usage);
        drop(vars);

        if cancelled || ctx.is_cancelled() {
            return Err(AgentError::Cancelled);
        }
        let tail: Vec<String> = st.tail.iter().cloned().collect();
        let details = serde_json::json!({
            "exit": match exit { ExitKind::Code(c) => Value::from(c), ExitKind::Signal(s) => Value::from(format!("signal {s}")) },
            "failures": st.failures,
            "unreachable": st.unreachable,
            "failed_tasks": st.failed_msgs,
            "output_tail": tail,
        });
        match exit {
            ExitKind::Code(0) => {}
            ExitKind::Code(c) => {
                let why = st
                    .failed_msgs
                    .last()
                    .cloned()
                    .unwrap_or_else(|| tail.last().cloned().unwrap_or_default());
                return Err(AgentError::ActionFailed {
                    message: format!("ansible-playbook exited with status {c}: {why}"),
                    details,
                });
            }
            ExitKind::Signal(s) => {
                return Err(AgentError::ActionFailed {
                    message: format!("ansible-playbook was killed by signal {s}"),
                    details,
                })
            }
        }
        ctx.progress(100, "playbook finished");
        let mut diff = st.diffs;
        if diff.len() > MAX_DIFF_BYTES {
            let mut cut = MAX_DIFF_BYTES;
            while !diff.is_char_boundary(cut) {
                cut -= 1;
            }
            diff.truncate(cut);
            diff.push_str("\n… (diff truncated)\n");
        }
        Ok(TaskOutcome {
            output: tail.join("\n"),
            changed: st.saw_stats.then_some(st.changed > 0),
            diff: run.check.then_some(diff),
        })
    }
}

/// The folder where running playbook process groups are written down.
fn running_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("running")
}

/// A file `running/PGID` holding "OWNER_PID OWNER_START_TIME MARKER", removed once the
/// group is reaped.
struct RunningGroup(Option<PathBuf>);

impl RunningGroup {
    fn record(state_dir: &Path, pgid: u32, marker: &str) -> RunningGroup {
        let dir = running_dir(state_dir);
        let me = std::process::id();
        let start = sys::process_start_time(me).unwrap_or(0);
        let path = dir.join(pgid.to_string());
        let ok = std::fs::create_dir_all(&dir).is_ok()
            && std::fs::write(&path, format!("{me} {start} {marker}\n")).is_ok();
        RunningGroup(ok.then_some(path))
    }
}

impl Drop for RunningGroup {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Kills the playbook process groups an agent that died (kill -9, a crash) left running,
/// so they never run beside the step's re-run; returns their ids. Only groups whose owner
/// is gone (pid and start time) and that still run `ansible` are touched.
pub fn reap_orphans(state_dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(running_dir(state_dir)) else {
        return Vec::new();
    };
    let mut killed = Vec::new();
    for e in entries.flatten() {
        let Some(pgid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let mut fields = text.split_whitespace();
        let mut f = fields.by_ref().take(2).map(|x| x.parse::<u64>().ok());
        let (owner, start) = (f.next().flatten(), f.next().flatten());
        // Only our own markers (a uuid's hex digits): a stray file names nothing else.
        let marker = fields
            .next()
            .filter(|m| m.len() == 32 && m.bytes().all(|b| b.is_ascii_hexdigit()))
            .unwrap_or("");
        let owner_alive = match (owner, start) {
            (Some(pid), Some(start)) => {
                u32::try_from(pid).ok().and_then(sys::process_start_time) == Some(start)
            }
            _ => false,
        };
        if owner_alive {
            continue;
        }
        if sys::group_runs(pgid, "ansible") {
            tracing::warn!(pgid, "killing the playbook a dead agent left running");
            sys::kill_play(pgid, marker, libc::SIGKILL);
            killed.push(pgid);
        } else if !marker.is_empty() {
            // The group's leader is gone (its id may name another group by now); its
            // workers, in their own sessions, may not be.
            sys::kill_marked(marker, libc::SIGKILL);
        }
        let _ = std::fs::remove_file(e.path());
    }
    killed
}

/// The extra vars that say which task and attempt the play runs: the lines the executor
/// appends to [`unsafe_extra_vars`]'s file (their names are refused there).
fn identity_vars(ctx: &TaskContext) -> String {
    let mut out = String::from("chiffon_task_id: !unsafe ");
    yaml_double_quoted(&ctx.task_id().to_string(), &mut out);
    out.push_str(&format!("\nchiffon_attempt: {}\n", ctx.attempt()));
    out
}

/// The extra-vars file: one `name: value` line per parameter, every string tagged
/// `!unsafe` (Ansible's documented marking for data that must never be templated). Only
/// flat maps of strings, integers and booleans are written; anything else is refused, as
/// are names that are not plain identifiers and the prefixes `ansible_` and `chiffon_`
/// (Ansible's own variables, and the task identity the executor adds).
pub fn unsafe_extra_vars(vars: &Map<String, Value>) -> Result<String, String> {
    let mut out = String::from("---\n");
    for (name, value) in vars {
        let plain = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain || name.starts_with("ansible_") {
            return Err(format!("parameter name `{name}` is not a plain identifier"));
        }
        if name.starts_with("chiffon_") {
            return Err(format!(
                "parameter name `{name}` is reserved: `chiffon_*` variables are set by the agent"
            ));
        }
        out.push_str(name);
        out.push_str(": ");
        match value {
            Value::String(s) => {
                out.push_str("!unsafe ");
                yaml_double_quoted(s, &mut out);
            }
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) if n.is_i64() || n.is_u64() => out.push_str(&n.to_string()),
            other => {
                return Err(format!(
                    "parameter `{name}`: only strings, integers and booleans reach Ansible, got {}",
                    match other {
                        Value::Null => "null",
                        Value::Number(_) => "a fraction",
                        Value::Array(_) => "an array",
                        _ => "an object",
                    }
                ))
            }
        }
        out.push('\n');
    }
    Ok(out)
}

/// A YAML double-quoted scalar: printable ASCII as is (but `"` and `\`), everything else as
/// an escape, so the reader (PyYAML) sees exactly the original characters.
fn yaml_double_quoted(s: &str, out: &mut String) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xFF => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c if (c as u32) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08X}", c as u32);
            }
        }
    }
    out.push('"');
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn handle_line(line: &str, st: &mut RunState, ctx: &TaskContext) {
    let Some(json) = line.strip_prefix(EVENT_PREFIX) else {
        if st.tail.len() >= OUTPUT_TAIL {
            st.tail.pop_front();
        }
        st.tail.push_back(line.to_string());
        ctx.output_line(line);
        return;
    };
    let Ok(ev) = serde_json::from_str::<Value>(json) else {
        ctx.output_line(line);
        return;
    };
    let s = |k: &str| ev.get(k).and_then(Value::as_str).unwrap_or_default();
    match s("event") {
        "play_start" => {
            st.total += ev.get("tasks").and_then(Value::as_u64).unwrap_or(0) as u32;
            ctx.progress(progress(st), format!("play: {}", s("name")));
        }
        "task_start" => {
            st.current_done = false;
            ctx.progress(progress(st), format!("task: {}", s("name")));
        }
        "task_result" => {
            if !st.current_done {
                st.current_done = true;
                st.done += 1;
            }
            if s("status") == "failed" || s("status") == "unreachable" {
                st.failed_msgs
                    .push(format!("{} on {}: {}", s("task"), s("host"), s("msg")));
            }
            ctx.progress(
                progress(st),
                format!("{}: {} on {}", s("status"), s("task"), s("host")),
            );
        }
        "diff" => {
            let d = s("diff");
            if !d.trim().is_empty() {
                st.diffs.push_str(d);
            }
        }
        "stats" => {
            st.saw_stats = true;
            if let Some(hosts) = ev.get("hosts").and_then(Value::as_object) {
                for h in hosts.values() {
                    let n = |k: &str| h.get(k).and_then(Value::as_u64).unwrap_or(0);
                    st.changed += n("changed");
                    st.failures += n("failures");
                    st.unreachable += n("unreachable");
                }
            }
        }
        _ => {}
    }
}

/// 2..=99 while running: done tasks over the tasks in the plays seen so far.
fn progress(st: &RunState) -> u32 {
    if st.total == 0 {
        return 2;
    }
    (2 + (97 * st.done.min(st.total)) / st.total).min(99)
}

fn crashed<E: std::error::Error + Send + Sync + 'static>(e: E) -> AgentError {
    AgentError::Crashed(Box::new(e))
}

struct GroupGuard {
    pgid: u32,
    marker: String,
    reaped: Arc<AtomicBool>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        // Once reaped, the pid may be reused: never signal it then.
        if !self.reaped.load(Ordering::SeqCst) {
            sys::kill_play(self.pgid, &self.marker, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn events_drive_progress_changed_and_diff() {
        let ctx = TaskContext::detached(uuid::Uuid::new_v4(), true, Instant::now());
        let mut st = RunState::default();
        let lines = [
            r#"CHIFFON_EVENT {"event": "play_start", "name": "p", "tasks": 2}"#,
            r#"CHIFFON_EVENT {"event": "task_start", "name": "one"}"#,
            "changed: [localhost]",
            r#"CHIFFON_EVENT {"event": "task_result", "status": "changed", "host": "localhost", "task": "one", "msg": ""}"#,
            r#"CHIFFON_EVENT {"event": "diff", "host": "localhost", "task": "one", "diff": "--- before\n+++ after\n"}"#,
            r#"CHIFFON_EVENT {"event": "task_start", "name": "two"}"#,
            r#"CHIFFON_EVENT {"event": "task_result", "status": "failed", "host": "localhost", "task": "two", "msg": "boom"}"#,
            r#"CHIFFON_EVENT {"event": "stats", "hosts": {"localhost": {"changed": 1, "failures": 1, "unreachable": 0}}}"#,
        ];
        let mut seen = Vec::new();
        for l in lines {
            handle_line(l, &mut st, &ctx);
            seen.push(ctx.snapshot().progress);
        }
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(st.done, 2);
        assert_eq!(progress(&st), 99);
        assert_eq!((st.changed, st.failures), (1, 1));
        assert!(st.diffs.contains("+++ after"));
        assert_eq!(st.failed_msgs, vec!["two on localhost: boom"]);
        // Only the human line is output; events are not.
        assert_eq!(ctx.snapshot().tail, vec!["changed: [localhost]"]);
    }

    #[test]
    fn extra_vars_are_unsafe_and_escaped() {
        let vars = serde_json::json!({
            "content": "{{ lookup('pipe', 'id') }}\n\"quoted\" \\ back\ttab é 🦀 \u{7f}",
            "port": 8080,
            "flag": true,
        });
        let y = unsafe_extra_vars(vars.as_object().unwrap()).unwrap();
        assert_eq!(
            y,
            "---\ncontent: !unsafe \"{{ lookup('pipe', 'id') }}\\x0A\\\"quoted\\\" \\\\ back\\x09tab \\xE9 \\U0001F980 \\x7F\"\nflag: true\nport: 8080\n"
        );
        for bad in [
            serde_json::json!({ "ansible_connection": "local" }),
            serde_json::json!({ "chiffon_task_id": "forged" }),
            serde_json::json!({ "chiffon_attempt": 1 }),
            serde_json::json!({ "x: 1\ny": "v" }),
            serde_json::json!({ "x": [1] }),
            serde_json::json!({ "x": 1.5 }),
            serde_json::json!({ "x": null }),
        ] {
            assert!(
                unsafe_extra_vars(bad.as_object().unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_task_identity_follows_the_parameters() {
        let ctx = TaskContext::detached(uuid::Uuid::from_u128(0xabc), false, Instant::now());
        assert_eq!(
            identity_vars(&ctx),
            "chiffon_task_id: !unsafe \"00000000-0000-0000-0000-000000000abc\"\nchiffon_attempt: 1\n"
        );
    }

    #[test]
    fn explicit_missing_binary_is_not_used() {
        let r = find_ansible_playbook(Some(Path::new("/nonexistent/ansible-playbook")));
        if let Ok(p) = r {
            assert_ne!(p, Path::new("/nonexistent/ansible-playbook"));
        }
    }
}
